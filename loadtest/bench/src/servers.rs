//! The HTTP ceiling and naive baseline servers that the gateway is measured against.
//!
//! The benchmark runs both as child processes of its own binary (hidden subcommands), so that each has its own
//! CPU and memory accounting, like the gateway:
//!
//! - the **HTTP ceiling** reads the body, parses it with serde_json and answers 202: what actix-web and JSON
//!   parsing alone cost on this machine, with nothing queued or written;
//! - the **naive baseline** does what a first version of such a service would: one `INSERT` per request through a
//!   deadpool pool, answering 202 after the row is committed.
//!
//! Both answer on the gateway's route, so the same wrk script drives all three, and both count what they
//! accepted (`GET /written`) so the benchmark can plot progress without `count(*)` scans.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::{web, App, HttpResponse, HttpServer};
use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The gateway's default body limit, so large requests are not refused here and accepted there.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Where both servers take updates: the gateway's route, so the same wrk scripts drive them.
const UPDATE_PATH: &str = "/api/v1/location/update";
/// deadpool's default pool size for this many cores is cores × 4: the pool a naive service would get.
const POOL_CONNECTIONS_PER_CORE: usize = 4;

const INSERT: &str = "INSERT INTO location_updates \
    (device_id, recorded_at, lat, lon, speed_kmh, heading_deg, accuracy_m, attributes, received_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::jsonb, $9)";

/// Updates accepted so far (ceiling: parsed; baseline: committed).
#[derive(Default)]
struct Counter(AtomicU64);

/// One location update as the naive baseline reads it: the gateway's fields, anything else kept as attributes.
#[derive(Deserialize)]
struct LocationPayload {
    device_id: String,
    recorded_at: String,
    lat: f64,
    lon: f64,
    speed_kmh: Option<f64>,
    heading_deg: Option<f64>,
    accuracy_m: Option<f64>,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

fn accepted(n: u64) -> HttpResponse {
    HttpResponse::Accepted()
        .content_type("application/json")
        .body(format!("{{\"accepted\":{n}}}"))
}

fn refused(status: actix_web::http::StatusCode, reason: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(serde_json::json!({ "error": reason.to_string() }).to_string())
}

async fn written(counter: web::Data<Counter>) -> HttpResponse {
    HttpResponse::Ok().body(counter.0.load(Ordering::Relaxed).to_string())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().finish()
}

/// The HTTP ceiling: parse and discard.
async fn parse_and_discard(counter: web::Data<Counter>, body: web::Bytes) -> HttpResponse {
    let n = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Array(updates)) => updates.len() as u64,
        Ok(_) => 1,
        Err(e) => return refused(actix_web::http::StatusCode::BAD_REQUEST, e),
    };
    counter.0.fetch_add(n, Ordering::Relaxed);
    accepted(n)
}

/// Runs an actix-web server with `routes` (plus the body limit and `/healthz`) until SIGTERM.
fn serve(
    listen: SocketAddr,
    workers: usize,
    what: &str,
    routes: impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
) -> anyhow::Result<()> {
    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(move || {
            App::new()
                .app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
                .route("/healthz", web::get().to(healthz))
                .configure(routes.clone())
        })
        .workers(workers)
        .shutdown_timeout(5)
        .bind(listen)
        .with_context(|| format!("could not listen on {listen}"))?
        .run()
        .await
        .with_context(|| format!("{what} failed"))
    })
}

/// Runs the HTTP ceiling server until SIGTERM.
pub fn run_ceiling(listen: SocketAddr, workers: usize) -> anyhow::Result<()> {
    let counter = web::Data::new(Counter::default());
    serve(listen, workers, "the ceiling server", move |app| {
        app.app_data(counter.clone())
            .route(UPDATE_PATH, web::post().to(parse_and_discard))
            .route("/written", web::get().to(written));
    })
}

struct Naive {
    pool: Pool,
    counter: Counter,
}

/// The naive baseline: one INSERT (one transaction, one WAL flush) per request.
async fn insert_one(state: web::Data<Naive>, body: web::Bytes) -> HttpResponse {
    use actix_web::http::StatusCode;
    let update: LocationPayload = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(e) => return refused(StatusCode::BAD_REQUEST, e),
    };
    let recorded_at = match OffsetDateTime::parse(&update.recorded_at, &Rfc3339) {
        Ok(t) => t,
        Err(e) => return refused(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    let attributes = (!update.other.is_empty()).then(|| serde_json::Value::Object(update.other).to_string());
    let client = match state.pool.get().await {
        Ok(client) => client,
        Err(e) => return refused(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let statement = match client.prepare_cached(INSERT).await {
        Ok(statement) => statement,
        Err(e) => return refused(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let inserted = client
        .execute(
            &statement,
            &[
                &update.device_id,
                &recorded_at,
                &update.lat,
                &update.lon,
                &update.speed_kmh,
                &update.heading_deg,
                &update.accuracy_m,
                &attributes,
                &OffsetDateTime::now_utc(),
            ],
        )
        .await;
    match inserted {
        Ok(_) => {
            state.counter.0.fetch_add(1, Ordering::Relaxed);
            accepted(1)
        }
        Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn naive_written(state: web::Data<Naive>) -> HttpResponse {
    HttpResponse::Ok().body(state.counter.0.load(Ordering::Relaxed).to_string())
}

/// Runs the naive baseline server until SIGTERM.
pub fn run_naive(listen: SocketAddr, workers: usize, database_url: &str) -> anyhow::Result<()> {
    let config: tokio_postgres::Config = database_url.parse().context("bad --database-url")?;
    let manager = Manager::from_config(
        config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(workers * POOL_CONNECTIONS_PER_CORE)
        .build()
        .context("could not build the pool")?;
    let state = web::Data::new(Naive {
        pool,
        counter: Counter::default(),
    });
    serve(listen, workers, "the naive baseline server", move |app| {
        app.app_data(state.clone())
            .route(UPDATE_PATH, web::post().to(insert_one))
            .route("/written", web::get().to(naive_written));
    })
}
