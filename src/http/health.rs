//! `GET /healthz` (the process serves HTTP) and `GET /readyz` (the database answers, the gateway takes updates,
//! the log the previous run left is read back and no queue is above its high-water mark).

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

/// A queue filled above this share of its capacity makes the gateway not ready, so that a load balancer sends
/// traffic elsewhere before clients start getting 503.
const HIGH_WATER_MARK: f64 = 0.9;

/// The body of `/healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Liveness {
    /// Always `ok`: whoever can read it was answered by a live process.
    pub status: LivenessStatus,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LivenessStatus {
    Ok,
}

/// The body of `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`, or `not_ready` with the reasons.
    pub status: ReadinessStatus,
    /// Why the gateway is not ready, one sentence each; absent when it is.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReadinessStatus {
    Ready,
    NotReady,
}

/// Liveness: the process serves HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "get_liveness",
    tag = "operations",
    responses((status = 200, description = "The process serves HTTP", body = Liveness)),
)]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Liveness {
        status: LivenessStatus::Ok,
    })
}

/// Readiness: the database answers, the gateway takes updates and no queue is above 90 % of its capacity.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "get_readiness",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to take updates", body = Readiness),
        (status = 503, description = "Not ready: the reasons say why", body = Readiness),
    ),
)]
pub async fn readyz(req: actix_web::HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let mut reasons = Vec::new();
    if state.access.keys().is_some_and(|keys| !keys.is_usable()) {
        reasons.push("the API keys file cannot be used: every write is refused until it is fixed".to_owned());
    }
    if !state.is_accepting() {
        reasons.push("shutting down".to_owned());
    }
    // Updates sent now would wait behind the previous run's log: let a load balancer send them elsewhere.
    if state.location.is_replaying() || state.poll.is_replaying() || state.dead_letters.is_replaying() {
        reasons.push("replaying".to_owned());
    }
    for (name, (pending, capacity)) in [
        ("location", state.location.queue_fill()),
        ("poll", state.poll.queue_fill()),
        ("dead_letter", state.dead_letters.queue_fill()),
    ] {
        if pending as f64 > capacity as f64 * HIGH_WATER_MARK {
            reasons.push(format!("the {name} queue holds {pending} of {capacity} updates"));
        }
    }
    for (name, stall) in [
        ("location", state.location.writer_stall()),
        ("poll", state.poll.writer_stall()),
        ("dead_letter", state.dead_letters.writer_stall()),
    ] {
        if let Some((failing, reason)) = stall.filter(|(d, _)| *d >= state.stall_timeout) {
            reasons.push(format!(
                "the {name} writers have failed to write for {} s ({reason})",
                failing.as_secs()
            ));
        }
    }
    if !state.location.queue_reachable() {
        reasons.push("not connected to NATS".to_owned());
    }
    if !state.database.is_up() {
        reasons.push("the database does not answer".to_owned());
    }
    let ready = reasons.is_empty();
    // Without the admin token where one is needed, the status only: the reasons would help whoever times an attack.
    if !super::operator_admitted(&req) {
        reasons.clear();
    }
    if ready {
        HttpResponse::Ok().json(Readiness {
            status: ReadinessStatus::Ready,
            reasons,
        })
    } else {
        HttpResponse::ServiceUnavailable().json(Readiness {
            status: ReadinessStatus::NotReady,
            reasons,
        })
    }
}
