//! Builds the gateway — data directory, database, migrations, pool, write-ahead log, one pipeline per stream
//! with its replay, HTTP server — and runs it until stopped. The only module that knows all the others.
//!
//! - [`data_dir`]: the locked data directory and the gateway's identity.
//! - [`database`]: the database, its runtime, migrations, pool, log positions and health check.
//! - [`jetstream`]: the NATS client, the JetStream streams and the shard leases.
//! - [`listener`]: TCP and Unix-socket listeners.
//! - [`server`]: every listener bound, and one HTTP server per kind of listener.
//! - [`new_key`]: the `new-key` command.
//! - [`reload`]: what SIGHUP re-reads.
//! - [`streams`]: one generic per-stream builder.
//! - [`https`]: HTTPS for the TCP listeners, reloaded on SIGHUP.
//! - [`shutdown`]: the stop sequence.
//! - [`progress`]: the progress of long work (the start-up replay, the stop's drain) in the log.
//! - [`partition_schedule`]: the stream tables' time partitions, made at start-up and on a schedule.

pub mod data_dir;
pub mod database;
pub mod https;
pub mod jetstream;
pub mod listener;
pub mod new_key;
pub mod partition_schedule;
pub mod progress;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod streams;

use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use anyhow::Context;
use deadpool_postgres::Pool;
use tokio::runtime::Runtime;

use crate::config::{Durability, QueueKind, Settings};
use crate::db::{self, Checkpoints};
use crate::http::auth::Access;
use crate::http::limits::{BodyBudget, BodyDeadline};
use crate::http::{self, AppState, IngestLimits};
use crate::intake::{Gate, Intake};
use crate::metrics::Metrics;
use crate::model::{DeadLetter, LocationUpdate, PollResult, Update};
use crate::pipeline::BatchPolicy;
use crate::wal::file_io::{FileIo, PlainFiles};
use crate::wal::{Recovery, Segment, Wal, WalConfig};
use data_dir::DataDir;
pub use database::{database_runtime, Database};
use https::ServerTls;
use reload::Reloads;
use shutdown::ShutdownOutcome;
use streams::{JetStreamParts, StreamHandle, StreamParts};

/// Size at which a log segment is closed and a new one started.
const WAL_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Batch writers of the `dead_letter` stream, whatever `INGEST_WRITERS` says: refused tracker fixes are few, and
/// each writer holds a database connection.
const DEAD_LETTER_WRITERS: usize = 1;

/// `ingest-gateway migrate`: applies the pending migrations, makes the time partitions and returns.
pub fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let policy = partition_schedule::policy(settings)?;
    let _data_dir = DataDir::open(&settings.storage.data_dir)?;
    let database = Database::open(settings)?;
    let runtime = database_runtime()?;
    runtime.block_on(db::migrate::run(&database.config, &database.tls))?;
    let metrics = Metrics::new().context("could not register the metrics")?;
    partition_schedule::make_now(&runtime, &database.config, &database.tls, &policy, &metrics)?;
    Ok(())
}

/// What a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Takes updates over HTTP (and writes them, unless JetStream's local writers are off).
    Serve,
    /// Only writes, from JetStream; its listeners serve the operator's routes only.
    Write,
}

/// A gateway that is built and bound, ready to run.
pub struct Application {
    /// The HTTP listeners, bound: public, admin and OsmAnd.
    http_listeners: server::HttpListeners,
    /// `INGEST_TELTONIKA_LISTEN`, `INGEST_GT06_LISTEN`: the hardware trackers' TCP listeners, bound.
    trackers: Option<crate::tcp::TrackerPlan>,
    /// The first TCP port bound (0 when there is none).
    port: u16,
    state: web::Data<AppState>,
    gate: Gate,
    wal: Option<Arc<Wal>>,
    streams: Vec<StreamHandle>,
    shutdown_timeout: Duration,
    /// Open client connections at most, over all HTTP workers.
    max_connections: usize,
    /// What SIGHUP re-reads; parts register themselves while the gateway is built.
    reloads: Reloads,
    /// How often the stop logs its progress.
    progress_interval: Duration,
    /// HTTPS for the TCP listeners, when configured.
    tls: Option<ServerTls>,
    role: Role,
    /// With JetStream: the client (flushed at the stop, so that the last acks go out), the lease loop's stop
    /// signal and the runtime they run on.
    nats: Option<(async_nats::Client, Option<tokio::sync::watch::Sender<bool>>, Runtime)>,
    /// Dropped last: the runtime the pool lives on, then the database itself, then the data directory's lock.
    runtime: Runtime,
    database: Database,
    data_dir: DataDir,
}

impl Application {
    /// Opens the database, applies migrations, starts the writers, replays the write-ahead log left by the
    /// previous run and binds the HTTP port. Call it outside any async runtime (it blocks on start-up IO).
    pub fn build(settings: &Settings) -> anyhow::Result<Self> {
        Self::build_as(settings, Role::Serve)
    }

    /// As [`Application::build`], for `role`.
    pub fn build_as(settings: &Settings, role: Role) -> anyhow::Result<Self> {
        Self::build_with(settings, role, Arc::new(PlainFiles))
    }

    /// As [`Application::build_as`], with the write-ahead log writing its segments through `log_files` instead of
    /// the file system as it is: how a test in the same process gives the gateway a disk that fails.
    pub fn build_with(settings: &Settings, role: Role, log_files: Arc<dyn FileIo>) -> anyhow::Result<Self> {
        let on_jetstream = settings.jetstream.queue == QueueKind::Jetstream;
        if role == Role::Write && !on_jetstream {
            anyhow::bail!("`write` runs writers that read from JetStream: set INGEST_QUEUE=jetstream");
        }
        // A keys file or TLS files that cannot be used refuse the start before anything is touched.
        let metrics = Arc::new(Metrics::new().context("could not register the metrics")?);
        let (access, tls) = load_access(settings, role, &metrics)?;
        let partition_policy = partition_schedule::policy(settings)?;
        let reloads = reloads(&access, tls.as_ref());
        // First of all: a second process on the same directory must not touch its database or its log.
        let mut data_dir = DataDir::open(&settings.storage.data_dir)?;
        let (database, runtime) = database::open(settings, partition_policy, &metrics)?;
        let writers_per_stream = usize::from(settings.pipeline.writers);
        // One connection per writer, plus room for readiness checks.
        let pool = database::pool(&database, &runtime, writers_per_stream * 2 + DEAD_LETTER_WRITERS + 2)?;
        let log = open_log(
            settings,
            &metrics,
            &runtime,
            &pool,
            &mut data_dir,
            on_jetstream,
            log_files,
        )?;
        let nats = if on_jetstream {
            Some(jetstream::connect(settings, role, &metrics, &reloads)?)
        } else {
            None
        };
        let streams = build_streams(
            settings,
            &metrics,
            &pool,
            &runtime,
            &data_dir,
            log,
            nats.as_ref().map(|(parts, _)| parts.clone()),
        )?;
        let nats = match nats {
            Some((parts, nats_runtime)) => Some(jetstream::hold_leases(
                parts,
                nats_runtime,
                &runtime,
                &database,
                &streams.handles,
            )?),
            None => None,
        };
        report_replay(settings, &runtime, &streams);
        let bound = server::bind(settings, role, &reloads)?;
        init_transport_metrics(&metrics);
        let Streams {
            intakes,
            handles,
            wal,
            gate,
        } = streams;
        let state = app_state(
            settings,
            intakes,
            metrics,
            database::watch_database(&runtime, pool),
            access,
        );
        Ok(Application {
            http_listeners: bound.http,
            trackers: bound.trackers,
            port: bound.port,
            state,
            gate,
            wal,
            streams: handles,
            shutdown_timeout: settings.pipeline.shutdown_timeout,
            max_connections: settings.http.max_connections as usize,
            reloads,
            progress_interval: settings.log.progress_interval,
            tls,
            role,
            nats,
            runtime,
            database,
            data_dir,
        })
    }

    /// The first TCP port actually bound (useful with port 0); 0 when listening on Unix sockets only.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The state the handlers share, for code in the same process that hands updates to an intake without HTTP
    /// (the tests do). Whoever holds it should let go of it once [`Application::run`] returns.
    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// Serves until `stop` resolves, then stops without losing what was accepted (within the shutdown timeout).
    /// Runs inside an actix system (`actix_web::rt::System`).
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<ShutdownOutcome> {
        let reloading = actix_web::rt::spawn(reload::on_sighup(self.reloads.clone()));
        let mut servers = server::start(
            self.http_listeners,
            self.role,
            &self.state,
            self.tls.as_ref(),
            self.max_connections,
            self.shutdown_timeout,
        )?;

        let trackers = match self.trackers {
            Some(plan) => Some(plan.start(crate::tcp::Intakes {
                location: self.state.location.clone(),
                dead_letters: self.state.dead_letters.clone(),
                max_future_skew: self.state.limits.max_future_skew,
                max_age: self.state.limits.max_age,
                metrics: self.state.metrics.clone(),
            })?),
            None => None,
        };

        let server_failed = tokio::select! {
            () = stop => None,
            result = &mut servers.public_task => Some(result),
        };
        // The tracker units first, before the gate closes: each connection finishes the packet it is storing and
        // gets its answer, then is closed; the units send the rest to whichever gateway they reach next.
        if let Some(trackers) = trackers {
            trackers.stop(self.shutdown_timeout.min(TRACKER_STOP_WAIT)).await;
        }
        let stop_transports = servers.stop(server_failed.is_none());
        // The shard consumers stop first, so that the drain below ends: what they queued is still written.
        if let Some((_, Some(lease_stop), _)) = &self.nats {
            lease_stop.send_replace(true);
        }
        let outcome = shutdown::stop(
            &self.gate,
            stop_transports,
            self.wal.as_deref(),
            self.streams,
            self.shutdown_timeout,
            self.progress_interval,
        )
        .await;
        reloading.abort();
        if let Some((client, _, nats_runtime)) = self.nats {
            // The acks of the last commits are sent from the NATS runtime: give them a moment, then flush.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
            nats_runtime.shutdown_background();
        }
        drop(servers);
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

/// Longest the stop waits for tracker connections to finish the packet they are storing.
const TRACKER_STOP_WAIT: Duration = Duration::from_secs(5);

/// The keys, the admin token and the HTTPS files, checked and loaded: a file that cannot be used refuses the start
/// before anything is touched, and so does a listener open to other machines without keys.
fn load_access(settings: &Settings, role: Role, metrics: &Metrics) -> anyhow::Result<(Access, Option<ServerTls>)> {
    let access = Access::new(settings, metrics)?;
    if role == Role::Serve {
        refuse_anonymous_exposure(settings, &access)?;
    }
    if let Some(key) = &settings.http.tls_key {
        crate::secret_files::check(
            key,
            "the TLS private key (INGEST_TLS_KEY)",
            crate::secret_files::FileKind::Secret,
        )?;
    }
    let tls = ServerTls::from_settings(settings).context("could not load the TLS files")?;
    Ok((access, tls))
}

/// What SIGHUP re-reads of what [`load_access`] loaded; later steps register their own.
fn reloads(access: &Access, tls: Option<&ServerTls>) -> Reloads {
    let reloads = Reloads::default();
    if let Some(tls) = tls.cloned() {
        reloads.register("tls certificates", move || Ok(tls.reload()?));
    }
    if let Some(keys) = access.keys() {
        reloads.register("api keys", move || keys.reload());
    }
    if let Some(token) = access.admin_token() {
        reloads.register("admin token", move || token.reload());
    }
    reloads
}

/// The write-ahead log as the previous run left it, and what the streams replay from it.
struct OpenedLog {
    /// The log new submissions go to; `None` with `durability=memory` or JetStream.
    wal: Option<Arc<Wal>>,
    /// The segments the previous run left, oldest first.
    recovered: Vec<Arc<Segment>>,
    /// This gateway's committed log positions.
    checkpoints: Checkpoints,
}

/// Opens the write-ahead log and reads how far the database has it: whatever the durability now, a log left by
/// an earlier run holds acknowledged updates, which the streams replay.
fn open_log(
    settings: &Settings,
    metrics: &Metrics,
    runtime: &Runtime,
    pool: &Pool,
    data_dir: &mut DataDir,
    on_jetstream: bool,
    log_files: Arc<dyn FileIo>,
) -> anyhow::Result<OpenedLog> {
    let wal_config = WalConfig {
        dir: settings.storage.data_dir.join("wal"),
        max_bytes: settings.storage.wal_max_bytes,
        segment_bytes: WAL_SEGMENT_BYTES.min(settings.storage.wal_max_bytes / 4).max(1),
    };
    metrics.wal.capacity.set(wal_config.max_bytes as i64);
    let mut recovery = Recovery::open_with(wal_config, Arc::new(metrics.wal.clone()), log_files)
        .context("could not open the write-ahead log")?;
    let checkpoints = runtime
        .block_on(database::load_checkpoints(pool, data_dir))
        .context("could not read the log progress")?;
    let last_lsn = recovery.last_lsn().context("could not read the write-ahead log")?;
    let committed_lsn = checkpoints
        .values()
        .flat_map(|slots| slots.values().map(|c| c.lsn))
        .max()
        .unwrap_or(0);
    let recovered = std::mem::take(&mut recovery.segments);
    if on_jetstream && recovered.iter().any(|s| s.durable_len() > 0) {
        anyhow::bail!(
            "the write-ahead log under {} holds updates a local-queue run accepted: start once with \
             INGEST_QUEUE=local so that they are written, then switch to jetstream",
            settings.storage.data_dir.join("wal").display()
        );
    }
    let wal = match settings.storage.durability {
        _ if on_jetstream => None,
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
    Ok(OpenedLog {
        wal,
        recovered,
        checkpoints,
    })
}

/// The three streams, built: their intakes, and the handles the stop sequence drains.
struct Streams {
    intakes: Intakes,
    handles: Vec<StreamHandle>,
    /// The log new submissions go to, shared by the streams' intakes.
    wal: Option<Arc<Wal>>,
    /// Closed first at the stop: new submissions get 503.
    gate: Gate,
}

/// The intakes of the location, poll and dead-letter streams.
type Intakes = (
    Arc<Intake<LocationUpdate>>,
    Arc<Intake<PollResult>>,
    Arc<Intake<DeadLetter>>,
);

/// Builds every stream the same way: its queue and writers, and the feed that replays what the previous run left.
fn build_streams(
    settings: &Settings,
    metrics: &Metrics,
    pool: &Pool,
    runtime: &Runtime,
    data_dir: &DataDir,
    log: OpenedLog,
    jetstream: Option<JetStreamParts>,
) -> anyhow::Result<Streams> {
    let gate = Gate::default();
    let OpenedLog {
        wal,
        recovered,
        mut checkpoints,
    } = log;
    let mut parts = StreamParts {
        instance: data_dir.instance().into(),
        pool,
        runtime: runtime.handle().clone(),
        policy: BatchPolicy {
            max_rows: settings.pipeline.batch_size as usize,
            flush_interval: settings.pipeline.flush_interval,
        },
        writers: usize::from(settings.pipeline.writers),
        keep_latest: settings.pipeline.latest_positions,
        capacity: settings.pipeline.queue_capacity as usize,
        max_bytes: settings.pipeline.queue_max_bytes,
        wal: wal.clone(),
        recovered,
        gate: gate.clone(),
        commit_wait: settings.http.commit_wait,
        jetstream,
    };
    let (location, location_handle) = parts.build::<LocationUpdate>(&metrics.location, &mut checkpoints)?;
    parts.keep_latest = settings.pipeline.latest_poll_results;
    let (poll, poll_handle) = parts.build::<PollResult>(&metrics.poll, &mut checkpoints)?;
    parts.keep_latest = false;
    parts.writers = DEAD_LETTER_WRITERS;
    let (dead_letters, dead_letter_handle) = parts.build::<DeadLetter>(&metrics.dead_letter, &mut checkpoints)?;
    drop(parts);
    Ok(Streams {
        intakes: (location, poll, dead_letters),
        handles: vec![location_handle, poll_handle, dead_letter_handle],
        wal,
        gate,
    })
}

/// Until every stream has read back what the previous run left, the gateway is not ready; says how it goes.
fn report_replay(settings: &Settings, runtime: &Runtime, streams: &Streams) {
    let (location, poll, dead_letters) = &streams.intakes;
    runtime.spawn(progress::report_replay(
        vec![
            (LocationUpdate::STREAM, location.replay_progress().clone()),
            (PollResult::STREAM, poll.replay_progress().clone()),
            (DeadLetter::STREAM, dead_letters.replay_progress().clone()),
        ],
        settings.log.progress_interval,
    ));
}

/// The transports' per-protocol series, exported from the start (at zero) so that dashboards show them.
fn init_transport_metrics(metrics: &Metrics) {
    http::trackers::init_metrics(&metrics.trackers);
    for protocol in crate::model::tracker::Protocol::TCP {
        crate::tcp::init_metrics(metrics, protocol);
    }
}

/// The state every handler shares: the intakes, the request limits and who may write.
fn app_state(
    settings: &Settings,
    (location, poll, dead_letters): Intakes,
    metrics: Arc<Metrics>,
    database: Arc<http::DatabaseHealth>,
    access: Access,
) -> web::Data<AppState> {
    web::Data::new(AppState {
        location,
        poll,
        dead_letters,
        limits: IngestLimits {
            max_body_bytes: settings.limits.max_body_bytes,
            max_updates: settings.limits.max_updates as usize,
            max_future_skew: settings.limits.max_future_skew,
            max_age: settings.limits.max_age,
            body_deadline: BodyDeadline {
                total: settings.limits.body_timeout,
                min_bytes_per_sec: settings.limits.body_min_rate,
            },
            max_gzip_ratio: settings.limits.max_gzip_ratio as usize,
            max_unknown_fields: usize::from(settings.limits.max_unknown_fields),
        },
        body_budget: BodyBudget::for_settings(settings),
        auth_failures: http::rate_limit::AuthFailures::new(settings.auth.auth_failures_per_minute),
        durability: settings.storage.durability,
        metrics,
        database,
        stall_timeout: settings.pipeline.stall_timeout,
        access,
    })
}

/// Refuses a start that would take anyone's updates from other machines by accident: a public or OsmAnd listener
/// beyond loopback without API keys, unless INGEST_ALLOW_ANONYMOUS says it is meant.
fn refuse_anonymous_exposure(settings: &Settings, access: &Access) -> anyhow::Result<()> {
    if access.requires_keys() || settings.auth.allow_anonymous {
        return Ok(());
    }
    let mut exposed = listener::reachable_from_elsewhere(&settings.http.listen);
    if let Some(osmand) = &settings.http.osmand_listen {
        exposed.extend(listener::reachable_from_elsewhere(osmand));
    }
    if let Some(teltonika) = &settings.trackers.teltonika_listen {
        exposed.extend(listener::reachable_from_elsewhere(teltonika));
    }
    if let Some(gt06) = &settings.trackers.gt06_listen {
        exposed.extend(listener::reachable_from_elsewhere(gt06));
    }
    if exposed.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "the gateway would listen on {} without API keys: anyone who reaches it could write updates for any device or \
         project. Set INGEST_API_KEYS_FILE (`ingest-gateway new-key` makes keys), or, to take updates from anyone on \
         purpose, INGEST_ALLOW_ANONYMOUS=true",
        exposed.join(", ")
    )
}
