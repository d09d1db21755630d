//! The HTTP API (actix-web): one file per route family, and the state the handlers share.
//!
//! - [`ingest`]: `POST /api/v1/{location,poll}/update`.
//! - [`stats`]: `GET /stats` (JSON) and `GET /metrics` (Prometheus).
//! - [`health`]: `GET /healthz`, `GET /readyz`.
//! - [`status`]: `GET /`, the status page (HTML drawn from `/stats`).
//! - [`errors`]: every refusal as one enum, mapped to a status and a JSON body.
//! - [`request_id`]: `X-Request-Id`, kept or made, echoed, and named in the log.
//! - [`openapi`]: `GET /api/v1/openapi.json`, the OpenAPI document generated from the handlers.
//! - [`auth`], [`rate_limit`]: API keys and their scopes; rate limits per key and per client address.
//! - [`trackers`]: the trackers' own protocols (OsmAnd, OwnTracks, Overland, Traccar forwarding).

pub mod auth;
pub mod errors;
pub mod health;
pub mod ingest;
pub mod limits;
pub mod openapi;
pub mod rate_limit;
pub mod request_id;
pub mod stats;
pub mod status;
pub mod trackers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpMessage, HttpResponse};
use tracing::warn;

use crate::config::Durability;
use crate::intake::Intake;
use crate::metrics::Metrics;
use crate::model::{DeadLetter, LocationUpdate, PollResult};
use limits::{BodyBudget, BodyDeadline};
use request_id::RequestId;

/// Whether the database answered its last check: kept fresh in the background by the start-up code, which owns
/// the pool, so that `/readyz` costs no database round trip however often it is asked.
#[derive(Debug, Default)]
pub struct DatabaseHealth {
    up: AtomicBool,
}

impl DatabaseHealth {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn set(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routes {
    /// Everything: ingest and the operator's pages (no separate admin listener).
    All,
    /// What senders need: ingest, `/healthz`.
    Public,
    /// What operators need: `/metrics`, `/stats`, `/readyz`, `/healthz` and the status page.
    Admin,
    /// Every path is the OsmAnd protocol (`INGEST_OSMAND_LISTEN`), as on a Traccar server's port 5055, so that a
    /// fleet of Traccar Clients changes only the host and port.
    Osmand,
}

/// Limits and rules for request bodies.
#[derive(Debug, Clone)]
pub struct IngestLimits {
    pub max_body_bytes: usize,
    pub max_updates: usize,
    pub max_future_skew: Duration,
    pub max_age: Duration,
    /// How fast and how soon a body must arrive.
    pub body_deadline: BodyDeadline,
    /// How many times its compressed size a gzip body may expand to.
    pub max_gzip_ratio: usize,
    /// Unknown fields per update at most.
    pub max_unknown_fields: usize,
}

/// What every handler shares.
pub struct AppState {
    /// Where each stream's validated updates are handed over.
    pub location: Arc<Intake<LocationUpdate>>,
    pub poll: Arc<Intake<PollResult>>,
    /// Where the tracker routes hand over the fixes they answer as success but can never store, so that those
    /// reach `dead_letters` as durably as updates reach their tables.
    pub dead_letters: Arc<Intake<DeadLetter>>,
    pub limits: IngestLimits,
    /// What a `202` promises, as `/stats` reports it.
    pub durability: Durability,
    /// The registry behind `/metrics`, and the figures `/stats` reads.
    pub metrics: Arc<Metrics>,
    /// Read by `/readyz`.
    pub database: Arc<DatabaseHealth>,
    /// Request bodies in flight, for the whole process.
    pub body_budget: Arc<BodyBudget>,
    /// Failed key checks per client address, which past a few a minute refuse the address before key lookup.
    pub auth_failures: rate_limit::AuthFailures,
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
        self.dead_letters.refresh_gauges();
    }
}

/// A resource named after its path: the name is the route label of the request metrics, read without allocating.
fn named(path: &'static str) -> actix_web::Resource {
    web::resource(path).name(path)
}

/// Registers the routes of `which`.
pub fn routes(cfg: &mut web::ServiceConfig, which: Routes) {
    if which == Routes::Osmand {
        // One resource for every path, so that the request metrics name the route rather than `unmatched`.
        cfg.service(
            web::resource("/{path:.*}")
                .name("osmand_listener")
                .route(web::route().to(trackers::osmand)),
        );
        return;
    }
    if which != Routes::Public {
        // Exactly `/`: every other unknown path keeps the JSON 404 below. `/readyz` checks the admin token itself:
        // without it, a load balancer still gets the status, only not the reasons.
        let operator = || actix_web::middleware::from_fn(operator_only);
        cfg.service(named("/").wrap(operator()).route(web::get().to(status::page)));
        cfg.service(named("/stats").wrap(operator()).route(web::get().to(stats::stats)))
            .service(named("/metrics").wrap(operator()).route(web::get().to(stats::metrics)))
            .service(named("/readyz").route(web::get().to(health::readyz)));
    }
    if which != Routes::Admin {
        cfg.service(named("/api/v1/location/update").route(web::post().to(ingest::location)))
            .service(named("/api/v1/poll/update").route(web::post().to(ingest::poll)))
            // OsmAnd clients GET (the OsmAnd app, GPSLogger) or POST (Traccar Client); the others POST. Every
            // method is taken on INGEST_OSMAND_LISTEN, as on a Traccar server.
            .service(
                named("/api/v1/osmand")
                    .route(web::get().to(trackers::osmand))
                    .route(web::post().to(trackers::osmand)),
            )
            .service(
                named("/api/v1/osmand/k/{key}")
                    .route(web::get().to(trackers::osmand))
                    .route(web::post().to(trackers::osmand)),
            )
            .service(named("/api/v1/owntracks").route(web::post().to(trackers::owntracks)))
            .service(named("/api/v1/owntracks/k/{key}").route(web::post().to(trackers::owntracks)))
            .service(named("/api/v1/overland").route(web::post().to(trackers::overland)))
            .service(named("/api/v1/overland/k/{key}").route(web::post().to(trackers::overland)))
            .service(named("/api/v1/traccar").route(web::post().to(trackers::traccar)))
            .service(named("/api/v1/traccar/k/{key}").route(web::post().to(trackers::traccar)))
            .service(named(openapi::PATH).route(web::get().to(openapi::openapi_json)));
    }
    cfg.service(named("/healthz").route(web::get().to(health::healthz)))
        .default_service(web::to(|| async {
            HttpResponse::NotFound().json(errors::ErrorBody::new("not_found", "no such route", vec![]))
        }));
}

/// Lets a request to an operator's route through when the listener's [`auth::OperatorAccess`] admits it (a server
/// started without one is open).
async fn operator_only(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let access = req.app_data::<web::Data<auth::OperatorAccess>>().cloned();
    match access {
        Some(access) if !access.admits(req.headers()) => Ok(req.into_response(access.refusal())),
        _ => next.call(req).await.map(ServiceResponse::map_into_boxed_body),
    }
}

/// Whether the operator's routes may tell a request everything (reasons included): see [`operator_only`].
pub fn operator_admitted(req: &actix_web::HttpRequest) -> bool {
    req.app_data::<web::Data<auth::OperatorAccess>>()
        .is_none_or(|access| access.admits(req.headers()))
}

/// The whole application: routes, shared state, and request metrics around every route.
pub fn app(
    state: web::Data<AppState>,
    which: Routes,
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
    App::new()
        .app_data(state)
        .configure(|cfg| routes(cfg, which))
        .wrap_fn(move |req, srv| {
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
