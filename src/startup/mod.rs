//! Builds the gateway — database, migrations, pool, queues, writers, write-ahead log and its replay, HTTP
//! server — and runs it until stopped. The only module that knows all the others.

pub mod data_dir;

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, HttpServer};
use anyhow::Context;
use deadpool_postgres::Pool;
use tokio::runtime::Runtime;
use tracing::{info, warn};

use crate::config::{Durability, Settings};
use crate::db::{self, Checkpoint, EmbeddedPostgres, PostgresOptions};
use crate::http::{self, AppState, DatabaseCheck, IngestLimits, StreamIngest};
use crate::metrics::{Metrics, StreamMetrics};
use crate::model::{LocationUpdate, PollResult, Update};
use crate::pipeline::writer::WriterState;
use crate::pipeline::{self, Backoff, BatchPolicy, BatchWriter, CopyRecord, StreamQueue, WriterHandle};
use crate::shutdown::{self, ShutdownOutcome};
use crate::wal::codec::WalCodec;
use crate::wal::feed::LogFeed;
use crate::wal::{Recovery, Segment, Wal, WalConfig};
use data_dir::DataDir;

/// Size at which a log segment is closed and a new one started.
const WAL_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

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
    let _data_dir = DataDir::open(&settings.data_dir)?;
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
    location_queue: Arc<StreamQueue<LocationUpdate>>,
    poll_queue: Arc<StreamQueue<PollResult>>,
    wal: Option<Arc<Wal>>,
    location_feed: Arc<LogFeed<LocationUpdate>>,
    poll_feed: Arc<LogFeed<PollResult>>,
    /// The feeds' refill threads: they finish once the log is closed and its backlog queued.
    feeds: Vec<std::thread::JoinHandle<()>>,
    writers: Vec<WriterHandle>,
    shutdown_timeout: Duration,
    /// Dropped last: the runtime the pool lives on, then the database itself, then the data directory's lock.
    runtime: Runtime,
    database: Database,
    data_dir: DataDir,
}

impl Application {
    /// Opens the database, applies migrations, starts the writers, replays the write-ahead log left by the
    /// previous run and binds the HTTP port. Call it outside any async runtime (it blocks on start-up IO).
    pub fn build(settings: &Settings) -> anyhow::Result<Self> {
        // First of all: a second process on the same directory must not touch its database or its log.
        let mut data_dir = DataDir::open(&settings.data_dir)?;
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
        let instance: Arc<str> = data_dir.instance().into();
        let parts = PipelineParts {
            instance: instance.clone(),
            pool: &pool,
            runtime: &runtime,
            policy: BatchPolicy {
                max_rows: settings.batch_size as usize,
                flush_interval: settings.flush_interval,
            },
            writers: writers_per_stream,
            capacity: settings.queue_capacity as usize,
        };
        let (location, mut writers) = parts.stream::<LocationUpdate>(&metrics.location)?;
        let (poll, poll_writers) = parts.stream::<PollResult>(&metrics.poll)?;
        writers.extend(poll_writers);

        // Whatever the durability now, a log left by an earlier run holds acknowledged updates: replay it.
        let wal_config = WalConfig {
            dir: settings.data_dir.join("wal"),
            max_bytes: settings.wal_max_bytes,
            segment_bytes: WAL_SEGMENT_BYTES.min(settings.wal_max_bytes / 4).max(1),
        };
        let mut recovery =
            Recovery::open(wal_config, metrics.wal.clone()).context("could not open the write-ahead log")?;
        let mut progress = runtime
            .block_on(load_checkpoints(&pool, &mut data_dir))
            .context("could not read the log progress")?;
        let last_lsn = recovery.last_lsn().context("could not read the write-ahead log")?;
        let committed_lsn = progress
            .values()
            .flat_map(|slots| slots.values().map(|p| p.lsn))
            .max()
            .unwrap_or(0);
        let recovered = std::mem::take(&mut recovery.segments);
        let location = location.with_feed(recovered.clone(), progress.remove(LocationUpdate::STREAM))?;
        let poll = poll.with_feed(recovered, progress.remove(PollResult::STREAM))?;
        let feeds = vec![location.feed_thread, poll.feed_thread];
        let (location, poll) = (location.ingest, poll.ingest);
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

        let listener =
            TcpListener::bind(&settings.listen).with_context(|| format!("could not listen on {}", settings.listen))?;
        let port = listener.local_addr()?.port();
        let (location_queue, poll_queue) = (location.queue.clone(), poll.queue.clone());
        let (location_feed, poll_feed) = (location.feed.clone(), poll.feed.clone());
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
            wal: wal.clone(),
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
            wal,
            location_feed,
            poll_feed,
            feeds,
            writers,
            shutdown_timeout: settings.shutdown_timeout,
            runtime,
            database,
            data_dir,
        })
    }

    /// The HTTP port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
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
        // 2. Nothing more can arrive: the log writes its last group, the queues close, the writers write what
        //    they hold at once, then stop.
        if let Some(wal) = &self.wal {
            wal.close();
        }
        self.location_feed.close_input();
        self.poll_feed.close_input();
        let fed = shutdown::wait_for_threads(&self.feeds, deadline).await;
        // Closing the queues before the feeds are done would strand the backlog; a timed-out stop leaves it in
        // the log for the next start.
        self.location_queue.close();
        self.poll_queue.close();
        let threads: Vec<_> = self.writers.into_iter().map(|w| w.thread).collect();
        let finished = fed && shutdown::wait_for_threads(&threads, deadline).await;
        if !finished {
            self.location_queue.abandon();
            self.poll_queue.abandon();
        }
        let unwritten = self.location_queue.pending()
            + self.poll_queue.pending()
            + usize::from(!self.location_feed.is_caught_up())
            + usize::from(!self.poll_feed.is_caught_up());
        let outcome = ShutdownOutcome {
            unwritten,
            elapsed: started.elapsed(),
        };
        if finished && unwritten == 0 {
            info!(
                elapsed_ms = outcome.elapsed.as_millis() as u64,
                "stopped; every accepted update is written"
            );
        } else if self.wal.is_some() {
            warn!(unwritten, timeout = ?self.shutdown_timeout, "stopped before every accepted update was written; the write-ahead log keeps them for the next start");
        } else {
            warn!(unwritten, timeout = ?self.shutdown_timeout, "stopped before every accepted update was written; with durability=memory they are lost");
        }
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

/// What every stream's pipeline is built from.
struct PipelineParts<'a> {
    instance: Arc<str>,
    pool: &'a Pool,
    runtime: &'a Runtime,
    policy: BatchPolicy,
    writers: usize,
    capacity: usize,
}

impl PipelineParts<'_> {
    /// One stream: its queue and a writer per slot.
    fn stream<T: Update + CopyRecord>(
        &self,
        metrics: &StreamMetrics,
    ) -> anyhow::Result<(StreamParts<T>, Vec<WriterHandle>)> {
        let queue = pipeline::bounded::<T>(self.capacity, self.writers);
        metrics.queue_capacity.set(self.capacity as i64);
        let mut handles = Vec::with_capacity(self.writers);
        for slot in 0..self.writers {
            let writer = BatchWriter {
                name: format!("{}-writer-{slot}", T::STREAM),
                stream: T::STREAM,
                instance: self.instance.clone(),
                queue: queue.receiver(slot),
                policy: self.policy,
                backoff: Backoff::default(),
                pool: self.pool.clone(),
                runtime: self.runtime.handle().clone(),
                metrics: metrics.clone(),
            };
            handles.push(writer.spawn().context("could not start a batch writer thread")?);
        }
        let writers: Vec<Arc<WriterState>> = handles.iter().map(|h| h.state.clone()).collect();
        Ok((
            StreamParts {
                queue,
                metrics: metrics.clone(),
                writers,
            },
            handles,
        ))
    }
}

/// A stream's queue and writers, before its log feed is attached.
struct StreamParts<T> {
    queue: Arc<StreamQueue<T>>,
    metrics: StreamMetrics,
    writers: Vec<Arc<WriterState>>,
}

/// A stream ready for the HTTP side, and its feed's refill thread.
struct FedStream<T> {
    ingest: StreamIngest<T>,
    feed_thread: std::thread::JoinHandle<()>,
}

impl<T: Update + WalCodec + CopyRecord> StreamParts<T> {
    /// Attaches the log feed, whose backlog starts as the segments left by the previous run.
    fn with_feed(
        self,
        recovered: Vec<Arc<Segment>>,
        progress: Option<HashMap<u16, Checkpoint>>,
    ) -> anyhow::Result<FedStream<T>> {
        let feed = LogFeed::new(
            self.queue.clone(),
            recovered,
            progress.unwrap_or_default(),
            self.metrics.clone(),
        );
        let feed_thread = feed.spawn().context("could not start a log feed thread")?;
        let ingest = StreamIngest {
            queue: self.queue,
            feed,
            metrics: self.metrics,
            writers: self.writers,
        };
        Ok(FedStream { ingest, feed_thread })
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
