//! The HTTP API (actix-web): one file per route family, and the state the handlers share.
//!
//! - [`ingest`]: `POST /api/v1/{location,poll}/update`.
//! - [`stats`]: `GET /stats` (JSON) and `GET /metrics` (Prometheus).
//! - [`health`]: `GET /healthz`, `GET /readyz`.
//! - [`errors`]: every refusal as one enum, mapped to a status and a JSON body.
//! - [`request_id`]: `X-Request-Id`, kept or made, echoed, and named in the log.
//! - [`auth`], [`rate_limit`]: API keys and their scopes; rate limits per key and per client address.

pub mod auth;
pub mod errors;
pub mod health;
pub mod ingest;
pub mod rate_limit;
pub mod request_id;
pub mod stats;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpMessage, HttpResponse};
use tracing::warn;

use crate::config::Durability;
use crate::intake::Intake;
use crate::metrics::Metrics;
use crate::model::{LocationUpdate, PollResult};
use request_id::RequestId;

/// Asks whether the database answers; provided by the start-up code, which owns the pool.
pub type DatabaseCheck = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool>>> + Send + Sync>;

/// Limits and rules for request bodies.
#[derive(Debug, Clone)]
pub struct IngestLimits {
    pub max_body_bytes: usize,
    pub max_updates: usize,
    pub max_future_skew: Duration,
    pub max_age: Duration,
}

/// What every handler shares.
pub struct AppState {
    /// Where each stream's validated updates are handed over.
    pub location: Arc<Intake<LocationUpdate>>,
    pub poll: Arc<Intake<PollResult>>,
    pub limits: IngestLimits,
    /// What a `202` promises, as `/stats` reports it.
    pub durability: Durability,
    /// The registry behind `/metrics`, and the figures `/stats` reads.
    pub metrics: Arc<Metrics>,
    /// Asked by `/readyz`.
    pub database_check: DatabaseCheck,
    /// Writers failing for this long make the gateway not ready.
    pub stall_timeout: Duration,
    /// Who may write what, and how fast (API keys, rate limits); checked by the ingest routes only.
    pub access: auth::Access,
}

impl AppState {
    /// Whether updates are taken (the same gate closes every stream).
    pub fn is_accepting(&self) -> bool {
        self.location.is_accepting()
    }

    pub fn refresh_gauges(&self) {
        self.location.refresh_gauges();
        self.poll.refresh_gauges();
    }
}

/// A resource named after its path: the name is the route label of the request metrics, read without allocating.
fn named(path: &'static str) -> actix_web::Resource {
    web::resource(path).name(path)
}

/// Registers every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(named("/api/v1/location/update").route(web::post().to(ingest::location)))
        .service(named("/api/v1/poll/update").route(web::post().to(ingest::poll)))
        .service(named("/stats").route(web::get().to(stats::stats)))
        .service(named("/metrics").route(web::get().to(stats::metrics)))
        .service(named("/healthz").route(web::get().to(health::healthz)))
        .service(named("/readyz").route(web::get().to(health::readyz)))
        .default_service(web::to(|| async {
            HttpResponse::NotFound().json(errors::ErrorBody::new("not_found", "no such route", vec![]))
        }));
}

/// The whole application: routes, shared state, and request metrics around every route.
pub fn app(
    state: web::Data<AppState>,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = ServiceResponse,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let http_metrics = state.metrics.http.clone();
    App::new().app_data(state).configure(routes).wrap_fn(move |req, srv| {
        let started = Instant::now();
        let request_id = RequestId::of(req.headers());
        req.extensions_mut().insert(request_id.clone());
        let response = srv.call(req);
        let http_metrics = http_metrics.clone();
        async move {
            let mut response = response.await?;
            // 503 is the gateway pacing its clients, said by its own metrics; anything else 5xx is a fault.
            if response.status().is_server_error() && response.status() != StatusCode::SERVICE_UNAVAILABLE {
                warn!(
                    request_id = request_id.as_str(),
                    route = response.request().match_name().unwrap_or("unmatched"),
                    status = response.status().as_u16(),
                    "request failed"
                );
            }
            response.headers_mut().insert(request_id::HEADER, request_id.0);
            // The route's name (its pattern), never the raw path, so that the label set stays small.
            let route = response.request().match_name().unwrap_or("unmatched");
            let status = response.status();
            let labels = [route, status.as_str()];
            http_metrics.requests.with_label_values(&labels).inc();
            http_metrics
                .duration
                .with_label_values(&labels)
                .observe(started.elapsed().as_secs_f64());
            Ok(response)
        }
    })
}
