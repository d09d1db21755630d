//! Builds the gateway — database, migrations, pool, queues, writers, HTTP server — and runs it until stopped.
//! The only module that knows all the others.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, HttpServer};
use anyhow::Context;
use deadpool_postgres::Pool;
use tokio::runtime::Runtime;
use tracing::{info, warn};

use crate::config::Settings;
use crate::db::{self, EmbeddedPostgres, PostgresOptions};
use crate::http::{self, AppState, DatabaseCheck, IngestLimits, StreamIngest};
use crate::metrics::{Metrics, StreamMetrics};
use crate::model::{LocationUpdate, PollResult, Update};
use crate::pipeline::writer::WriterState;
use crate::pipeline::{self, Backoff, BatchPolicy, BatchWriter, CopyRecord, QueueSender, WriterHandle};
use crate::shutdown::{self, ShutdownOutcome};

/// The database the gateway writes to: a server it was given, or one it runs itself.
pub struct Database {
    pub config: tokio_postgres::Config,
    /// Set when the gateway runs its own PostgreSQL; stopped when dropped, after the writers are done.
    pub embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to `DATABASE_URL`, or starts the embedded PostgreSQL under `<data-dir>/postgres`.
    pub fn open(settings: &Settings) -> anyhow::Result<Self> {
        match &settings.database_url {
            Some(url) => {
                let config = url
                    .parse()
                    .context("DATABASE_URL is not a valid PostgreSQL connection string")?;
                Ok(Database { config, embedded: None })
            }
            None => {
                let options = PostgresOptions {
                    data_dir: settings.data_dir.join("postgres"),
                    ephemeral: false,
                };
                let server = EmbeddedPostgres::start(&options).context("could not start the embedded PostgreSQL")?;
                Ok(Database {
                    config: server.config("postgres"),
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
    let database = Database::open(settings)?;
    let runtime = database_runtime()?;
    runtime.block_on(db::migrate::run(&database.config))?;
    Ok(())
}

/// A gateway that is built and bound, ready to run.
pub struct Application {
    listener: TcpListener,
    port: u16,
    state: web::Data<AppState>,
    location_queue: QueueSender<LocationUpdate>,
    poll_queue: QueueSender<PollResult>,
    writers: Vec<WriterHandle>,
    shutdown_timeout: Duration,
    /// Dropped last: the runtime the pool lives on, then the database itself.
    runtime: Runtime,
    database: Database,
}

impl Application {
    /// Opens the database, applies migrations, starts the writers and binds the HTTP port.
    /// Call it outside any async runtime (it blocks on start-up IO).
    pub fn build(settings: &Settings) -> anyhow::Result<Self> {
        let database = Database::open(settings)?;
        let runtime = database_runtime()?;
        runtime
            .block_on(db::migrate::run(&database.config))
            .context("could not apply the migrations")?;

        let writers_per_stream = usize::from(settings.writers);
        // One connection per writer, plus room for readiness checks.
        let pool = {
            let _inside = runtime.enter();
            db::pool::build(database.config.clone(), writers_per_stream * 2 + 2)?
        };
        let metrics = Arc::new(Metrics::new().context("could not register the metrics")?);
        let policy = BatchPolicy {
            max_rows: settings.batch_size as usize,
            flush_interval: settings.flush_interval,
        };
        let capacity = settings.queue_capacity as usize;
        let pipes = PipelineParts {
            pool: &pool,
            runtime: &runtime,
            policy,
            writers: writers_per_stream,
            capacity,
        };
        let (location, mut writers) = pipes.stream::<LocationUpdate>(&metrics.location)?;
        let (poll, poll_writers) = pipes.stream::<PollResult>(&metrics.poll)?;
        writers.extend(poll_writers);
        let (location_queue, poll_queue) = (location.queue.clone(), poll.queue.clone());

        let listener =
            TcpListener::bind(&settings.listen).with_context(|| format!("could not listen on {}", settings.listen))?;
        let port = listener.local_addr()?.port();
        let state = web::Data::new(AppState {
            location,
            poll,
            limits: IngestLimits {
                max_body_bytes: settings.max_body_bytes,
                max_updates: settings.max_updates as usize,
                max_future_skew: settings.max_future_skew,
                max_age: settings.max_age,
            },
            metrics,
            accepting: Arc::new(AtomicBool::new(true)),
            database_check: database_check(&runtime, pool),
        });
        Ok(Application {
            listener,
            port,
            state,
            location_queue,
            poll_queue,
            writers,
            shutdown_timeout: settings.shutdown_timeout,
            runtime,
            database,
        })
    }

    /// The HTTP port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The database connection settings the gateway writes with.
    pub fn database_config(&self) -> &tokio_postgres::Config {
        &self.database.config
    }

    /// Serves until `stop` resolves, then stops without losing what was accepted (within the shutdown timeout).
    /// Runs inside an actix system (`actix_web::rt::System`).
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<ShutdownOutcome> {
        let state = self.state.clone();
        let address = self.listener.local_addr()?;
        let server = HttpServer::new(move || http::app(state.clone()))
            .listen(self.listener)?
            .disable_signals()
            .shutdown_timeout(self.shutdown_timeout.as_secs().max(1))
            .run();
        let server_handle = server.handle();
        let mut server_task = actix_web::rt::spawn(server);
        info!(address = %address, port = self.port, "ingest-gateway is listening");

        let server_failed = tokio::select! {
            () = stop => None,
            result = &mut server_task => Some(result),
        };
        let started = Instant::now();
        let deadline = started + self.shutdown_timeout;

        // 1. Stop taking updates; requests already past the check finish and may still queue theirs.
        self.state.accepting.store(false, Ordering::Release);
        if server_failed.is_none() {
            server_handle.stop(true).await;
        }
        // 2. Nothing more can arrive: close the queues, so writers write what they hold at once, then stop.
        self.location_queue.close();
        self.poll_queue.close();
        let threads: Vec<_> = self.writers.into_iter().map(|w| w.thread).collect();
        let finished = shutdown::wait_for_writers(&threads, deadline).await;
        let unwritten = self.location_queue.pending() + self.poll_queue.pending();
        let outcome = ShutdownOutcome {
            unwritten,
            elapsed: started.elapsed(),
        };
        if finished && unwritten == 0 {
            info!(
                elapsed_ms = outcome.elapsed.as_millis() as u64,
                "stopped; every accepted update is written"
            );
        } else {
            warn!(unwritten, timeout = ?self.shutdown_timeout, "stopped before every accepted update could be written");
        }
        // The pool's connections live on the runtime; dropping it here would block, so let it wind down alone.
        self.runtime.shutdown_background();
        drop(self.database);
        if let Some(result) = server_failed {
            result
                .context("the HTTP server task failed")?
                .context("the HTTP server failed")?;
        }
        Ok(outcome)
    }
}

/// What every stream's pipeline is built from.
struct PipelineParts<'a> {
    pool: &'a Pool,
    runtime: &'a Runtime,
    policy: BatchPolicy,
    writers: usize,
    capacity: usize,
}

impl PipelineParts<'_> {
    /// One stream: its queue and its writers.
    fn stream<T: Update + CopyRecord>(
        &self,
        metrics: &StreamMetrics,
    ) -> anyhow::Result<(StreamIngest<T>, Vec<WriterHandle>)> {
        let (tx, rx) = pipeline::bounded::<T>(self.capacity);
        metrics.queue_capacity.set(self.capacity as i64);
        let mut handles = Vec::with_capacity(self.writers);
        for n in 0..self.writers {
            let writer = BatchWriter {
                name: format!("{}-writer-{n}", T::STREAM),
                queue: rx.clone(),
                policy: self.policy,
                backoff: Backoff::default(),
                pool: self.pool.clone(),
                runtime: self.runtime.handle().clone(),
                metrics: metrics.clone(),
            };
            handles.push(writer.spawn().context("could not start a batch writer thread")?);
        }
        let states: Vec<Arc<WriterState>> = handles.iter().map(|h| h.state.clone()).collect();
        Ok((
            StreamIngest {
                queue: tx,
                metrics: metrics.clone(),
                writers: states,
            },
            handles,
        ))
    }
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
