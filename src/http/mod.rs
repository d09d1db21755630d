//! The HTTP API (actix-web): one file per route family, and the state the handlers share.
//!
//! - [`ingest`]: `POST /api/v1/{location,poll}/update`.
//! - [`stats`]: `GET /stats` (JSON) and `GET /metrics` (Prometheus).
//! - [`health`]: `GET /healthz`, `GET /readyz`.
//! - [`errors`]: every refusal as one enum, mapped to a status and a JSON body.

pub mod errors;
pub mod health;
pub mod ingest;
pub mod stats;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::{Service, ServiceResponse};
use actix_web::{web, App, HttpResponse};

use crate::config::Durability;
use crate::metrics::{Metrics, StreamMetrics};
use crate::model::{LocationUpdate, PollResult};
use crate::pipeline::writer::WriterState;
use crate::pipeline::StreamQueue;
use crate::wal::feed::LogFeed;
use crate::wal::Wal;

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

/// The HTTP side of one stream.
pub struct StreamIngest<T> {
    pub queue: Arc<StreamQueue<T>>,
    /// Hands logged updates to the queue, or keeps them on disk while the writers are behind.
    pub feed: Arc<LogFeed<T>>,
    pub metrics: StreamMetrics,
    /// The writers draining this stream's queue, for the age of the oldest update not yet written.
    pub writers: Vec<Arc<WriterState>>,
}

impl<T: crate::model::Update + crate::wal::codec::WalCodec> StreamIngest<T> {
    /// Brings the gauges that are read, not counted, up to date; called before `/stats` and `/metrics` answer.
    pub fn refresh_gauges(&self) {
        self.metrics.queue_depth.set(self.queue.pending() as i64);
        self.metrics.queue_capacity.set(self.queue.capacity() as i64);
        self.metrics.backlog_bytes.set(self.feed.backlog_bytes() as i64);
        let now = Instant::now();
        let oldest = self
            .writers
            .iter()
            .filter_map(|w| w.oldest_age(now))
            .max()
            .unwrap_or_default();
        self.metrics.oldest_pending_age.set(oldest.as_secs_f64());
    }
}

/// What every handler shares.
pub struct AppState {
    pub location: StreamIngest<LocationUpdate>,
    pub poll: StreamIngest<PollResult>,
    pub limits: IngestLimits,
    /// What a 202 promises; with `Wal`, `wal` is the log every accepted request is appended to.
    pub durability: Durability,
    pub wal: Option<Arc<Wal>>,
    pub metrics: Arc<Metrics>,
    /// Cleared when the gateway starts to stop: from then on, updates get 503.
    pub accepting: Arc<AtomicBool>,
    pub database_check: DatabaseCheck,
}

impl AppState {
    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
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
        let response = srv.call(req);
        let http_metrics = http_metrics.clone();
        async move {
            let response = response.await?;
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
