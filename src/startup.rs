//! Builds the gateway — database, migrations, pool, queues, writers, write-ahead log and its replay, HTTP
//! server — and runs it until stopped. The only module that knows all the others.

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
use crate::db::{self, EmbeddedPostgres, PostgresOptions};
use crate::http::{self, AppState, DatabaseCheck, IngestLimits, StreamIngest};
use crate::metrics::{Metrics, StreamMetrics};
use crate::model::{LocationUpdate, PollResult, Update};
use crate::pipeline::writer::WriterState;
use crate::pipeline::{
    self, Backoff, BatchPolicy, BatchWriter, Chunk, CopyRecord, Origin, PushError, StreamQueue, WriterHandle,
};
use crate::shutdown::{self, ShutdownOutcome};
use crate::wal::codec::{self, WalCodec};
use crate::wal::frame::FrameReader;
use crate::wal::{RecoveredSegment, Recovery, Wal, WalConfig};

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
    writers: Vec<WriterHandle>,
    shutdown_timeout: Duration,
    /// Dropped last: the runtime the pool lives on, then the database itself.
    runtime: Runtime,
    database: Database,
}

impl Application {
    /// Opens the database, applies migrations, starts the writers, replays the write-ahead log left by the
    /// previous run and binds the HTTP port. Call it outside any async runtime (it blocks on start-up IO).
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
        let parts = PipelineParts {
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
        let progress = runtime
            .block_on(load_progress(&pool))
            .context("could not read the log progress")?;
        let replay = Replay {
            progress: &progress,
            location: &location.queue,
            poll: &poll.queue,
            metrics: &metrics,
        };
        let last_lsn = replay.run(&mut recovery)?;
        let wal = match settings.durability {
            Durability::Wal => {
                let next_lsn = last_lsn.max(progress.values().map(|p| p.lsn).max().unwrap_or(0)) + 1;
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
        // 2. Nothing more can arrive: the log writes its last group, the queues close, the writers write what
        //    they hold at once, then stop.
        if let Some(wal) = &self.wal {
            wal.close();
        }
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
        } else if self.wal.is_some() {
            warn!(unwritten, timeout = ?self.shutdown_timeout, "stopped before every accepted update was written; the write-ahead log keeps them for the next start");
        } else {
            warn!(unwritten, timeout = ?self.shutdown_timeout, "stopped before every accepted update was written; with durability=memory they are lost");
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
    /// One stream: its queue and a writer per slot.
    fn stream<T: Update + CopyRecord>(
        &self,
        metrics: &StreamMetrics,
    ) -> anyhow::Result<(StreamIngest<T>, Vec<WriterHandle>)> {
        let queue = pipeline::bounded::<T>(self.capacity, self.writers);
        metrics.queue_capacity.set(self.capacity as i64);
        let mut handles = Vec::with_capacity(self.writers);
        for slot in 0..self.writers {
            let writer = BatchWriter {
                name: format!("{}-writer-{slot}", T::STREAM),
                stream: T::STREAM,
                queue: queue.receiver(slot),
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
                queue,
                metrics: metrics.clone(),
                writers: states,
            },
            handles,
        ))
    }
}

/// A slot's committed log position, as recorded in `ingest_wal_progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    lsn: u64,
    /// Updates of record `lsn` written; `None` for all.
    updates_done: Option<u32>,
}

async fn load_progress(pool: &Pool) -> anyhow::Result<HashMap<(String, u16), Progress>> {
    let client = pool.get().await?;
    let rows = client
        .query("SELECT stream, slot, lsn, updates_done FROM ingest_wal_progress", &[])
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let slot: i32 = r.get(1);
            let lsn: i64 = r.get(2);
            let done: Option<i32> = r.get(3);
            (
                (r.get(0), slot as u16),
                Progress {
                    lsn: lsn as u64,
                    updates_done: done.map(|d| d as u32),
                },
            )
        })
        .collect())
}

/// Puts the updates of a previous run's log that are not yet committed back into the queues.
struct Replay<'a> {
    progress: &'a HashMap<(String, u16), Progress>,
    location: &'a Arc<StreamQueue<LocationUpdate>>,
    poll: &'a Arc<StreamQueue<PollResult>>,
    metrics: &'a Metrics,
}

impl Replay<'_> {
    /// Replays every segment in log order; returns the highest lsn seen. Blocks while the queues are full: the
    /// writers are running and make room.
    fn run(&self, recovery: &mut Recovery) -> anyhow::Result<u64> {
        let mut last_lsn = 0;
        let segments = std::mem::take(&mut recovery.segments);
        let started = Instant::now();
        let mut replayed = 0usize;
        for segment in segments {
            let bytes = segment
                .read()
                .with_context(|| format!("could not read {}", segment.path.display()))?;
            let mut reader = FrameReader::new(&bytes);
            for payload in reader.by_ref() {
                let Some(header) = codec::decode_header(payload) else {
                    continue;
                };
                last_lsn = last_lsn.max(header.lsn);
                replayed += match header.stream {
                    codec::LOCATION_STREAM => {
                        self.record(payload, header, &segment, self.location, &self.metrics.location)?
                    }
                    codec::POLL_STREAM => self.record(payload, header, &segment, self.poll, &self.metrics.poll)?,
                    _ => 0,
                };
            }
            recovery.record_faults(reader.faults, &segment.path);
            // Dropping our hold: the file goes once the updates queued from it are committed.
        }
        if replayed > 0 {
            info!(
                updates = replayed,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "write-ahead log replayed"
            );
        }
        Ok(last_lsn)
    }

    /// Queues what of one record is not yet committed; returns how many updates that is.
    fn record<T: Update + WalCodec>(
        &self,
        payload: &[u8],
        header: codec::RecordHeader,
        segment: &RecoveredSegment,
        queue: &Arc<StreamQueue<T>>,
        metrics: &StreamMetrics,
    ) -> anyhow::Result<usize> {
        let start = match self.progress.get(&(T::STREAM.to_owned(), header.slot)) {
            Some(p) if header.lsn < p.lsn => return Ok(0),
            Some(p) if header.lsn == p.lsn => match p.updates_done {
                None => return Ok(0),
                Some(done) => done,
            },
            _ => 0,
        };
        let Some(mut updates) = codec::decode_updates::<T>(payload) else {
            self.metrics.wal.corrupt_records.inc();
            warn!(lsn = header.lsn, "a log record could not be decoded; skipped");
            return Ok(0);
        };
        let updates = updates.split_off((start as usize).min(updates.len()));
        if updates.is_empty() {
            return Ok(0);
        }
        let n = updates.len();
        let slot = header.slot as usize % queue.slots();
        let reservation = loop {
            match queue.reserve_on(n, slot) {
                Ok(r) => break r,
                Err(PushError::Full { .. }) => std::thread::sleep(Duration::from_millis(10)),
                Err(PushError::Closed) => anyhow::bail!("the queue closed during the replay"),
            }
        };
        let origin = Origin::Logged {
            lsn: header.lsn,
            slot: header.slot,
            start,
            total: header.count,
            token: Box::new(segment.token()),
        };
        reservation.push(Chunk {
            updates,
            origin,
            commit: None,
        });
        metrics.replayed.inc_by(n as u64);
        Ok(n)
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
