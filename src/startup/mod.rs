//! Builds the gateway — data directory, database, migrations, pool, write-ahead log, one pipeline per stream
//! with its replay, HTTP server — and runs it until stopped. The only module that knows all the others.
//!
//! - [`data_dir`]: the locked data directory and the gateway's identity.
//! - [`listener`]: TCP and Unix-socket listeners.
//! - [`reload`]: what SIGHUP re-reads.
//! - [`streams`]: one generic per-stream builder.
//! - [`tls`]: HTTPS for the TCP listeners, reloaded on SIGHUP.
//! - [`shutdown`]: the stop sequence.

pub mod data_dir;
pub mod listener;
pub mod reload;
pub mod shutdown;
pub mod streams;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpServer};
use anyhow::Context;
use deadpool_postgres::Pool;
use tokio::runtime::Runtime;
use tracing::info;

use crate::config::{Durability, Settings};
use crate::db::{self, EmbeddedPostgres, PostgresOptions};
use crate::http::{self, AppState, DatabaseCheck, IngestLimits};
use crate::intake::Gate;
use crate::metrics::Metrics;
use crate::model::{LocationUpdate, PollResult};
use crate::pipeline::BatchPolicy;
use crate::wal::{Recovery, Wal, WalConfig};
use data_dir::DataDir;
use listener::Listener;
use reload::Reloads;
use shutdown::ShutdownOutcome;
use streams::{StreamHandle, StreamParts};
use tls::ServerTls;

/// Size at which a log segment is closed and a new one started.
const WAL_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// The database the gateway writes to: a server it was given, or one it runs itself.
pub struct Database {
    pub config: tokio_postgres::Config,
    /// TLS, when the connection string asks for it.
    pub tls: db::DatabaseTls,
    /// Set when the gateway runs its own PostgreSQL; stopped when dropped, after the writers are done.
    pub embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to `DATABASE_URL`, or starts the embedded PostgreSQL under `<data-dir>/postgres`.
    pub fn open(settings: &Settings) -> anyhow::Result<Self> {
        match &settings.database_url {
            Some(url) => {
                let db::DatabaseUrl { config, tls } = url.parse().context("DATABASE_URL cannot be used")?;
                info!(tls = ?tls.mode(), "connecting to the PostgreSQL of DATABASE_URL");
                Ok(Database {
                    config,
                    tls,
                    embedded: None,
                })
            }
            None => {
                let options = PostgresOptions {
                    data_dir: settings.data_dir.join("postgres"),
                    ephemeral: false,
                };
                let server = EmbeddedPostgres::start(&options).context("could not start the embedded PostgreSQL")?;
                Ok(Database {
                    config: server.config("postgres"),
                    tls: db::DatabaseTls::off(),
                    embedded: Some(server),
                })
            }
        }
    }
}

/// A runtime for the database side only: the writers enter it to do IO, and the pool's connections live on
/// it, away from the HTTP workers' single-threaded runtimes.
pub fn database_runtime() -> anyhow::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("db")
        .enable_all()
        .build()
        .context("could not start the database runtime")
}

/// `ingest-gateway migrate`: applies the pending migrations and returns.
pub fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let _data_dir = DataDir::open(&settings.data_dir)?;
    let database = Database::open(settings)?;
    let runtime = database_runtime()?;
    runtime.block_on(db::migrate::run(&database.config, &database.tls))?;
    Ok(())
}

/// A gateway that is built and bound, ready to run.
pub struct Application {
    listeners: Vec<Listener>,
    /// The first TCP port bound (0 when there is none).
    port: u16,
    state: web::Data<AppState>,
    gate: Gate,
    wal: Option<Arc<Wal>>,
    streams: Vec<StreamHandle>,
    shutdown_timeout: Duration,
    /// What SIGHUP re-reads; parts register themselves while the gateway is built.
    reloads: Reloads,
    /// HTTPS for the TCP listeners, when configured.
    tls: Option<ServerTls>,
    /// Dropped last: the runtime the pool lives on, then the database itself, then the data directory's lock.
    runtime: Runtime,
    database: Database,
    data_dir: DataDir,
}

impl Application {
    /// Opens the database, applies migrations, starts the writers, replays the write-ahead log left by the
    /// previous run and binds the HTTP port. Call it outside any async runtime (it blocks on start-up IO).
    pub fn build(settings: &Settings) -> anyhow::Result<Self> {
        // Broken TLS files stop the gateway before it touches anything.
        let tls = ServerTls::from_settings(settings).context("could not load the TLS files")?;
        let reloads = Reloads::default();
        if let Some(tls) = tls.clone() {
            reloads.register("tls certificates", move || Ok(tls.reload()?));
        }
        // First of all: a second process on the same directory must not touch its database or its log.
        let mut data_dir = DataDir::open(&settings.data_dir)?;
        let database = Database::open(settings)?;
        let runtime = database_runtime()?;
        runtime
            .block_on(db::migrate::run(&database.config, &database.tls))
            .context("could not apply the migrations")?;

        let writers_per_stream = usize::from(settings.writers);
        // One connection per writer, plus room for readiness checks.
        let pool = {
            let _inside = runtime.enter();
            db::pool::build(database.config.clone(), &database.tls, writers_per_stream * 2 + 2)?
        };
        let metrics = Arc::new(Metrics::new().context("could not register the metrics")?);

        // Whatever the durability now, a log left by an earlier run holds acknowledged updates: replay it.
        let wal_config = WalConfig {
            dir: settings.data_dir.join("wal"),
            max_bytes: settings.wal_max_bytes,
            segment_bytes: WAL_SEGMENT_BYTES.min(settings.wal_max_bytes / 4).max(1),
        };
        metrics.wal.capacity.set(wal_config.max_bytes as i64);
        let mut recovery =
            Recovery::open(wal_config, Arc::new(metrics.wal.clone())).context("could not open the write-ahead log")?;
        let mut checkpoints = runtime
            .block_on(load_checkpoints(&pool, &mut data_dir))
            .context("could not read the log progress")?;
        let last_lsn = recovery.last_lsn().context("could not read the write-ahead log")?;
        let committed_lsn = checkpoints
            .values()
            .flat_map(|slots| slots.values().map(|c| c.lsn))
            .max()
            .unwrap_or(0);
        let recovered = std::mem::take(&mut recovery.segments);
        let wal = match settings.durability {
            Durability::Wal => {
                // Past every number used before, even by records whose segments are gone.
                let next_lsn = last_lsn.max(committed_lsn) + 1;
                Some(Arc::new(
                    recovery
                        .start(next_lsn)
                        .context("could not start the write-ahead log")?,
                ))
            }
            Durability::Memory => None,
        };

        let gate = Gate::default();
        let parts = StreamParts {
            instance: data_dir.instance().into(),
            pool: &pool,
            runtime: runtime.handle().clone(),
            policy: BatchPolicy {
                max_rows: settings.batch_size as usize,
                flush_interval: settings.flush_interval,
            },
            writers: writers_per_stream,
            capacity: settings.queue_capacity as usize,
            wal: wal.clone(),
            recovered,
            gate: gate.clone(),
        };
        let (location, location_handle) = parts.build::<LocationUpdate>(&metrics.location, &mut checkpoints)?;
        let (poll, poll_handle) = parts.build::<PollResult>(&metrics.poll, &mut checkpoints)?;
        drop(parts);

        let listeners = listener::open_all(&settings.listen, settings.socket_mode)?;
        let port = listeners
            .iter()
            .find_map(|l| match l {
                Listener::Tcp(tcp) => tcp.local_addr().ok().map(|a| a.port()),
                Listener::Unix(_) => None,
            })
            .unwrap_or(0);
        let state = web::Data::new(AppState {
            location,
            poll,
            limits: IngestLimits {
                max_body_bytes: settings.max_body_bytes,
                max_updates: settings.max_updates as usize,
                max_future_skew: settings.max_future_skew,
                max_age: settings.max_age,
            },
            durability: settings.durability,
            metrics,
            database_check: database_check(&runtime, pool),
            stall_timeout: settings.stall_timeout,
        });
        Ok(Application {
            listeners,
            port,
            state,
            gate,
            wal,
            streams: vec![location_handle, poll_handle],
            shutdown_timeout: settings.shutdown_timeout,
            reloads,
            tls,
            runtime,
            database,
            data_dir,
        })
    }

    /// The first TCP port actually bound (useful with port 0); 0 when listening on Unix sockets only.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `stop` resolves, then stops without losing what was accepted (within the shutdown timeout).
    /// Runs inside an actix system (`actix_web::rt::System`).
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<ShutdownOutcome> {
        let state = self.state.clone();
        let mut server = HttpServer::new(move || http::app(state.clone()))
            .disable_signals()
            .shutdown_timeout(self.shutdown_timeout.as_secs().max(1));
        // Kept until the server has stopped: a socket file is removed when its listener goes.
        let mut sockets = Vec::new();
        for listener in self.listeners {
            match listener {
                Listener::Tcp(tcp) => {
                    let address = tcp.local_addr()?;
                    server = match &self.tls {
                        Some(tls) => server.listen_rustls_0_23(tcp, tls.server_config())?,
                        None => server.listen(tcp)?,
                    };
                    let (https, client_certificates) =
                        (self.tls.is_some(), self.tls.as_ref().is_some_and(ServerTls::mutual));
                    info!(
                        address = %address,
                        port = address.port(),
                        https,
                        client_certificates,
                        "ingest-gateway is listening"
                    );
                }
                Listener::Unix(socket) => {
                    server = server.listen_uds(socket.listener.try_clone()?)?;
                    info!(socket = %socket.path.display(), "ingest-gateway is listening");
                    sockets.push(socket);
                }
            }
        }
        let server = server.run();
        let server_handle = server.handle();
        let mut server_task = actix_web::rt::spawn(server);
        let reloading = actix_web::rt::spawn(reload::on_sighup(self.reloads.clone()));

        let server_failed = tokio::select! {
            () = stop => None,
            result = &mut server_task => Some(result),
        };
        let stop_transports = async {
            if server_failed.is_none() {
                server_handle.stop(true).await;
            }
        };
        let outcome = shutdown::stop(
            &self.gate,
            stop_transports,
            self.wal.as_deref(),
            self.streams,
            self.shutdown_timeout,
        )
        .await;
        reloading.abort();
        drop(sockets);
        // The pool's connections live on the runtime; dropping it here would block, so let it wind down alone.
        self.runtime.shutdown_background();
        drop(self.database);
        drop(self.data_dir);
        if let Some(result) = server_failed {
            result
                .context("the HTTP server task failed")?
                .context("the HTTP server failed")?;
        }
        Ok(outcome)
    }
}

/// This gateway's committed log positions; first claims those a gateway kept before identities existed, when
/// they are this data directory's.
async fn load_checkpoints(pool: &Pool, data_dir: &mut DataDir) -> anyhow::Result<db::Checkpoints> {
    let client = pool.get().await?;
    if data_dir.adopts_unowned() {
        let adopted = db::checkpoint::adopt_unowned(&**client, data_dir.instance()).await?;
        data_dir.unowned_adopted()?;
        info!(
            positions = adopted,
            instance = data_dir.instance(),
            "log positions from before gateway identities claimed"
        );
    }
    Ok(db::checkpoint::load(&**client, data_dir.instance()).await?)
}

/// The readiness check: a trivial query, run on the database runtime where the pool lives.
fn database_check(runtime: &Runtime, pool: Pool) -> DatabaseCheck {
    let handle = runtime.handle().clone();
    Arc::new(move || {
        let pool = pool.clone();
        let task = handle.spawn(async move { db::pool::ping(&pool).await });
        Box::pin(async move { task.await.unwrap_or(false) })
    })
}
