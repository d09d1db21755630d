//! Builds the gateway — data directory, database, migrations, pool, write-ahead log, one pipeline per stream
//! with its replay, HTTP server — and runs it until stopped. The only module that knows all the others.
//!
//! - [`data_dir`]: the locked data directory and the gateway's identity.
//! - [`listener`]: TCP and Unix-socket listeners.
//! - [`new_key`]: the `new-key` command.
//! - [`reload`]: what SIGHUP re-reads.
//! - [`streams`]: one generic per-stream builder.
//! - [`tls`]: HTTPS for the TCP listeners, reloaded on SIGHUP.
//! - [`shutdown`]: the stop sequence.
//! - [`progress`]: the progress of long work (the start-up replay, the stop's drain) in the log.
//! - [`partitions`]: the stream tables' time partitions, made at start-up and on a schedule.

pub mod data_dir;
pub mod listener;
pub mod new_key;
pub mod partitions;
pub mod progress;
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

use crate::config::{Durability, QueueKind, Settings};
use crate::db::{self, EmbeddedPostgres, PostgresOptions};
use crate::http::auth::{Access, OperatorAccess};
use crate::http::limits::{BodyBudget, BodyDeadline};
use crate::http::{self, AppState, DatabaseHealth, IngestLimits, Routes};
use crate::intake::Gate;
use crate::metrics::Metrics;
use crate::model::{DeadLetter, LocationUpdate, PollResult, Update};
use crate::pipeline::BatchPolicy;
use crate::wal::{Recovery, Wal, WalConfig};
use data_dir::DataDir;
use listener::Listener;
use reload::Reloads;
use shutdown::ShutdownOutcome;
use streams::{JetStreamParts, StreamHandle, StreamParts};
use tls::ServerTls;

/// Size at which a log segment is closed and a new one started.
const WAL_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Batch writers of the `dead_letter` stream, whatever `INGEST_WRITERS` says: refused tracker fixes are few, and
/// each writer holds a database connection.
const DEAD_LETTER_WRITERS: usize = 1;

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
                if let Some(host) = remote_without_tls(&config, tls.mode()) {
                    tracing::warn!(
                        host = %host,
                        "DATABASE_URL reaches {host} over the network without TLS (no sslmode, or disable, allow or \
                         prefer): every update, and the password under md5 or password authentication, crosses it in \
                         clear; add sslmode=verify-full (or require)"
                    );
                }
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

/// `ingest-gateway migrate`: applies the pending migrations, makes the time partitions and returns.
pub fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let policy = partitions::policy(settings)?;
    let _data_dir = DataDir::open(&settings.data_dir)?;
    let database = Database::open(settings)?;
    let runtime = database_runtime()?;
    runtime.block_on(db::migrate::run(&database.config, &database.tls))?;
    let metrics = Metrics::new().context("could not register the metrics")?;
    partitions::make_now(&runtime, &database.config, &database.tls, &policy, &metrics)?;
    Ok(())
}

/// How long a start waits for JetStream to answer (its cluster electing a leader) before it gives up.
const JETSTREAM_STARTUP_WAIT: Duration = Duration::from_secs(60);

/// What a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Takes updates over HTTP (and writes them, unless JetStream's local writers are off).
    Serve,
    /// Only writes, from JetStream; its listeners serve the operator's routes only.
    Write,
}

/// A runtime for the NATS client, its shard consumers and their acks.
fn nats_runtime() -> anyhow::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("nats")
        .enable_all()
        .build()
        .context("could not start the NATS runtime")
}

/// A gateway that is built and bound, ready to run.
pub struct Application {
    listeners: Vec<Listener>,
    /// The operator's listeners (`INGEST_ADMIN_LISTEN`); empty when everything is served on `listeners`.
    admin_listeners: Vec<Listener>,
    /// `INGEST_OSMAND_LISTEN`: every path is the OsmAnd protocol.
    osmand_listeners: Vec<Listener>,
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
        let on_jetstream = settings.queue == QueueKind::Jetstream;
        if role == Role::Write && !on_jetstream {
            anyhow::bail!("`write` runs writers that read from JetStream: set INGEST_QUEUE=jetstream");
        }
        // A keys file or TLS files that cannot be used refuse the start before anything is touched.
        let metrics = Arc::new(Metrics::new().context("could not register the metrics")?);
        let access = Access::new(settings, &metrics)?;
        if role == Role::Serve {
            refuse_anonymous_exposure(settings, &access)?;
        }
        if let Some(key) = &settings.tls_key {
            crate::secret_files::check(
                key,
                "the TLS private key (INGEST_TLS_KEY)",
                crate::secret_files::FileKind::Secret,
            )?;
        }
        let tls = ServerTls::from_settings(settings).context("could not load the TLS files")?;
        let partition_policy = partitions::policy(settings)?;
        let reloads = Reloads::default();
        if let Some(tls) = tls.clone() {
            reloads.register("tls certificates", move || Ok(tls.reload()?));
        }
        if let Some(keys) = access.keys() {
            reloads.register("api keys", move || keys.reload());
        }
        if let Some(token) = access.admin_token() {
            reloads.register("admin token", move || token.reload());
        }
        // First of all: a second process on the same directory must not touch its database or its log.
        let mut data_dir = DataDir::open(&settings.data_dir)?;
        let database = Database::open(settings)?;
        let runtime = database_runtime()?;
        runtime
            .block_on(db::migrate::run(&database.config, &database.tls))
            .context("could not apply the migrations")?;
        partitions::start(
            &runtime,
            &database.config,
            &database.tls,
            partition_policy,
            metrics.clone(),
        )?;

        let writers_per_stream = usize::from(settings.writers);
        // One connection per writer, plus room for readiness checks.
        let pool = {
            let _inside = runtime.enter();
            db::pool::build(
                database.config.clone(),
                &database.tls,
                writers_per_stream * 2 + DEAD_LETTER_WRITERS + 2,
            )?
        };
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
        if on_jetstream && recovered.iter().any(|s| s.durable_len() > 0) {
            anyhow::bail!(
                "the write-ahead log under {} holds updates a local-queue run accepted: start once with \
                 INGEST_QUEUE=local so that they are written, then switch to jetstream",
                settings.data_dir.join("wal").display()
            );
        }
        let wal = match settings.durability {
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

        let nats = if on_jetstream {
            let consume = role == Role::Write || settings.jetstream_local_writers;
            if consume && settings.queue_capacity < settings.max_updates {
                anyhow::bail!(
                    "INGEST_QUEUE_CAPACITY must hold at least INGEST_MAX_UPDATES updates with JetStream writers"
                );
            }
            // Required: without it, whoever may publish in the NATS account writes past the keys and the rules.
            let Some(signing_path) = &settings.jetstream_signing_key_file else {
                anyhow::bail!(
                    "INGEST_QUEUE=jetstream needs INGEST_JETSTREAM_SIGNING_KEY_FILE: a file holding a key (`openssl rand \
                     -hex 32`), the same on every gateway and writer, with which records and commit notices are \
                     signed, so that nobody else who can publish to NATS can write updates"
                );
            };
            let signing = Arc::new(crate::intake::jetstream::signing::SigningKeys::load(signing_path)?);
            let reloaded = signing.clone();
            reloads.register("jetstream signing keys", move || reloaded.reload());
            let nats_runtime = nats_runtime()?;
            let js = crate::intake::jetstream::JetStreamSettings::from_settings(settings);
            let name = match role {
                Role::Serve => "ingest-gateway",
                Role::Write => "ingest-gateway-writer",
            };
            let client = nats_runtime.block_on(crate::intake::jetstream::connect(settings, name))?;
            nats_runtime.block_on(async {
                let context = async_nats::jetstream::new(client.clone());
                // A cluster that is electing leaders (a node just restarted) answers after a while: retried for
                // a bounded time; a mismatch with the settings is not retried.
                let deadline = tokio::time::Instant::now() + JETSTREAM_STARTUP_WAIT;
                for stream in [LocationUpdate::STREAM, PollResult::STREAM, DeadLetter::STREAM] {
                    loop {
                        match crate::intake::jetstream::ensure_stream(&context, stream, &js).await {
                            Ok(()) => break,
                            Err(e) if e.is::<crate::intake::jetstream::SettingsMismatch>() => return Err(e),
                            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                            Err(e) => {
                                tracing::warn!(error = format!("{e:#}"), "JetStream not ready; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                }
                Ok::<_, anyhow::Error>(())
            })?;
            let parts = JetStreamParts {
                client,
                settings: js,
                publish: role == Role::Serve,
                consume,
                runtime: nats_runtime.handle().clone(),
                signing,
                metrics: metrics.jetstream.clone(),
            };
            Some((parts, nats_runtime))
        } else {
            None
        };

        let gate = Gate::default();
        let mut parts = StreamParts {
            instance: data_dir.instance().into(),
            pool: &pool,
            runtime: runtime.handle().clone(),
            policy: BatchPolicy {
                max_rows: settings.batch_size as usize,
                flush_interval: settings.flush_interval,
            },
            writers: writers_per_stream,
            keep_latest: settings.latest_positions,
            capacity: settings.queue_capacity as usize,
            max_bytes: settings.queue_max_bytes,
            wal: wal.clone(),
            recovered,
            gate: gate.clone(),
            commit_wait: settings.commit_wait,
            jetstream: nats.as_ref().map(|(parts, _)| parts.clone()),
        };
        let (location, location_handle) = parts.build::<LocationUpdate>(&metrics.location, &mut checkpoints)?;
        parts.keep_latest = settings.latest_poll_results;
        let (poll, poll_handle) = parts.build::<PollResult>(&metrics.poll, &mut checkpoints)?;
        parts.keep_latest = false;
        parts.writers = DEAD_LETTER_WRITERS;
        let (dead_letters, dead_letter_handle) = parts.build::<DeadLetter>(&metrics.dead_letter, &mut checkpoints)?;
        drop(parts);
        let nats = match nats {
            Some((parts, nats_runtime)) => {
                let sets: Vec<_> = [&location_handle.shards, &poll_handle.shards, &dead_letter_handle.shards]
                    .into_iter()
                    .flatten()
                    .cloned()
                    .collect();
                let lease_stop = if sets.is_empty() {
                    None
                } else {
                    // The leases' own session: its locks live exactly as long as it does.
                    let lease_pool = {
                        let _inside = runtime.enter();
                        db::pool::build(database.config.clone(), &database.tls, 1)?
                    };
                    let (stop, stopped) = tokio::sync::watch::channel(false);
                    runtime.spawn(crate::intake::jetstream::consume::hold_leases(
                        lease_pool, sets, stopped,
                    ));
                    Some(stop)
                };
                Some((parts.client, lease_stop, nats_runtime))
            }
            None => None,
        };
        // Until every stream has read back what the previous run left, the gateway is not ready; say how it goes.
        runtime.spawn(progress::report_replay(
            vec![
                (LocationUpdate::STREAM, location.replay_progress().clone()),
                (PollResult::STREAM, poll.replay_progress().clone()),
                (DeadLetter::STREAM, dead_letters.replay_progress().clone()),
            ],
            settings.progress_interval,
        ));

        let listeners = listener::open_all(&settings.listen, settings.socket_mode)?;
        let admin_listeners = match &settings.admin_listen {
            Some(list) => listener::open_all(list, settings.socket_mode)?,
            None => Vec::new(),
        };
        let osmand_listeners = match (&settings.osmand_listen, role) {
            (Some(list), Role::Serve) => listener::open_all(list, settings.socket_mode)?,
            _ => Vec::new(),
        };
        let trackers = match role {
            Role::Serve => crate::tcp::TrackerPlan::bind(settings)?,
            Role::Write => None,
        };
        if let Some(units) = trackers.as_ref().and_then(crate::tcp::TrackerPlan::units) {
            reloads.register("tracker units", move || units.reload());
        }
        let port = listeners
            .iter()
            .find_map(|l| match l {
                Listener::Tcp(tcp) => tcp.local_addr().ok().map(|a| a.port()),
                Listener::Unix(_) => None,
            })
            .unwrap_or(0);
        http::trackers::init_metrics(&metrics.trackers);
        for protocol in crate::model::tracker::Protocol::TCP {
            crate::tcp::init_metrics(&metrics, protocol);
        }
        let state = web::Data::new(AppState {
            location,
            poll,
            dead_letters,
            limits: IngestLimits {
                max_body_bytes: settings.max_body_bytes,
                max_updates: settings.max_updates as usize,
                max_future_skew: settings.max_future_skew,
                max_age: settings.max_age,
                body_deadline: BodyDeadline {
                    total: settings.body_timeout,
                    min_bytes_per_sec: settings.body_min_rate,
                },
                max_gzip_ratio: settings.max_gzip_ratio as usize,
                max_unknown_fields: usize::from(settings.max_unknown_fields),
            },
            body_budget: BodyBudget::for_settings(settings),
            auth_failures: http::rate_limit::AuthFailures::new(settings.auth_failures_per_minute),
            durability: settings.durability,
            metrics,
            database: watch_database(&runtime, pool),
            stall_timeout: settings.stall_timeout,
            access,
        });
        Ok(Application {
            listeners,
            admin_listeners,
            osmand_listeners,
            trackers,
            port,
            state,
            gate,
            wal,
            streams: vec![location_handle, poll_handle, dead_letter_handle],
            shutdown_timeout: settings.shutdown_timeout,
            max_connections: settings.max_connections as usize,
            reloads,
            progress_interval: settings.progress_interval,
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
        // Kept until the servers have stopped: a socket file is removed when its listener goes.
        let mut sockets = Vec::new();
        let public_routes = if self.role == Role::Write {
            Routes::Admin
        } else if self.admin_listeners.is_empty() {
            Routes::All
        } else {
            Routes::Public
        };
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        // The operator's routes on the public listeners: with keys in force, only for the admin token's holder where
        // other machines can reach them.
        let exposed = self.listeners.iter().any(listener::is_exposed);
        let operator = if public_routes == Routes::Public {
            OperatorAccess::Open
        } else {
            self.state.access.operator_access(exposed)
        };
        if let OperatorAccess::Token(token) = &operator {
            match token {
                Some(_) => info!("the operator's routes on the public listeners need the admin token"),
                None => tracing::warn!(
                    "API keys are in force and the public listeners are reachable from other machines: /metrics, \
                     /stats and the status page answer 401 there (and /readyz gives no reasons); set \
                     INGEST_ADMIN_TOKEN_FILE or INGEST_ADMIN_LISTEN"
                ),
            }
        }
        let server = ServerPlan {
            state: self.state.clone(),
            routes: public_routes,
            workers,
            max_connections: self.max_connections,
            shutdown_timeout: self.shutdown_timeout,
            tls: self.tls.clone(),
            operator,
        }
        .serve(self.listeners, &mut sockets)?;
        let admin = if self.admin_listeners.is_empty() {
            None
        } else {
            // Few requests, from operators and scrapers: one worker, and its own connection cap.
            let admin = ServerPlan {
                state: self.state.clone(),
                routes: Routes::Admin,
                // The admin listener is meant for a private network: plain HTTP, for scrapers and probes.
                tls: None,
                workers: 1,
                max_connections: ADMIN_MAX_CONNECTIONS,
                shutdown_timeout: self.shutdown_timeout,
                operator: OperatorAccess::Open,
            }
            .serve(self.admin_listeners, &mut sockets)?;
            let handle = admin.handle();
            Some((handle, actix_web::rt::spawn(admin)))
        };
        let osmand = if self.osmand_listeners.is_empty() {
            None
        } else {
            // Trackers on the internet: the public listener's TLS and limits.
            let osmand = ServerPlan {
                state: self.state.clone(),
                routes: Routes::Osmand,
                tls: self.tls.clone(),
                workers,
                max_connections: self.max_connections,
                shutdown_timeout: self.shutdown_timeout,
                operator: OperatorAccess::Open,
            }
            .serve(self.osmand_listeners, &mut sockets)?;
            let handle = osmand.handle();
            Some((handle, actix_web::rt::spawn(osmand)))
        };
        let server_handle = server.handle();
        let mut server_task = actix_web::rt::spawn(server);

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
            result = &mut server_task => Some(result),
        };
        // The tracker units first, before the gate closes: each connection finishes the packet it is storing and
        // gets its answer, then is closed; the units send the rest to whichever gateway they reach next.
        if let Some(trackers) = trackers {
            trackers.stop(self.shutdown_timeout.min(TRACKER_STOP_WAIT)).await;
        }
        let stop_transports = async {
            if server_failed.is_none() {
                server_handle.stop(true).await;
            }
            if let Some((admin, _)) = &admin {
                admin.stop(true).await;
            }
            if let Some((osmand, _)) = &osmand {
                osmand.stop(true).await;
            }
        };
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

/// Longest the stop waits for tracker connections to finish the packet they are storing.
const TRACKER_STOP_WAIT: Duration = Duration::from_secs(5);

/// Connections the admin listener keeps open at most.
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// One HTTP server to start: which routes, on how many workers.
struct ServerPlan {
    state: web::Data<AppState>,
    /// HTTPS for its TCP listeners.
    tls: Option<ServerTls>,
    routes: Routes,
    workers: usize,
    /// Over all its workers.
    max_connections: usize,
    shutdown_timeout: Duration,
    /// Who may read the operator's routes there.
    operator: OperatorAccess,
}

impl ServerPlan {
    /// Binds the server to `listeners` and starts it; Unix sockets are handed to `sockets` to be kept.
    fn serve(
        self,
        listeners: Vec<Listener>,
        sockets: &mut Vec<listener::UnixSocket>,
    ) -> anyhow::Result<actix_web::dev::Server> {
        let (state, routes) = (self.state, self.routes);
        let operator = web::Data::new(self.operator);
        // actix counts connections per worker.
        let mut server = HttpServer::new(move || http::app(state.clone(), routes).app_data(operator.clone()))
            .workers(self.workers)
            .max_connections(self.max_connections.div_ceil(self.workers))
            .disable_signals()
            .shutdown_timeout(self.shutdown_timeout.as_secs().max(1));
        for listener in listeners {
            match listener {
                Listener::Tcp(tcp) => {
                    let address = tcp.local_addr()?;
                    server = match &self.tls {
                        Some(tls) => server.listen_rustls_0_23(tcp, tls.server_config())?,
                        None => server.listen(tcp)?,
                    };
                    match routes {
                        Routes::Admin => {
                            info!(address = %address, admin_port = address.port(), "admin listener is listening")
                        }
                        Routes::All | Routes::Public => {
                            info!(address = %address, port = address.port(), "ingest-gateway is listening")
                        }
                        Routes::Osmand => {
                            info!(address = %address, osmand_port = address.port(), "OsmAnd listener is listening")
                        }
                    }
                }
                Listener::Unix(socket) => {
                    server = server.listen_uds(socket.listener.try_clone()?)?;
                    info!(socket = %socket.path.display(), admin = routes == Routes::Admin, "ingest-gateway is listening");
                    sockets.push(socket);
                }
            }
        }
        Ok(server.run())
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

/// How often the database is asked whether it answers, for `/readyz`.
const DATABASE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps a [`DatabaseHealth`] fresh: a trivial query every second on the database runtime, where the pool lives.
fn watch_database(runtime: &Runtime, pool: Pool) -> Arc<DatabaseHealth> {
    let health = Arc::new(DatabaseHealth::default());
    // The first answer before the gateway listens, so that `/readyz` is right from the start.
    health.set(runtime.block_on(async {
        tokio::time::timeout(DATABASE_CHECK_INTERVAL * 2, db::pool::ping(&pool))
            .await
            .unwrap_or(false)
    }));
    let watched = health.clone();
    runtime.spawn(async move {
        loop {
            let up = tokio::time::timeout(DATABASE_CHECK_INTERVAL * 2, db::pool::ping(&pool))
                .await
                .unwrap_or(false);
            watched.set(up);
            tokio::time::sleep(DATABASE_CHECK_INTERVAL).await;
        }
    });
    health
}

/// Refuses a start that would take anyone's updates from other machines by accident: a public or OsmAnd listener
/// beyond loopback without API keys, unless INGEST_ALLOW_ANONYMOUS says it is meant.
fn refuse_anonymous_exposure(settings: &Settings, access: &Access) -> anyhow::Result<()> {
    if access.requires_keys() || settings.allow_anonymous {
        return Ok(());
    }
    let mut exposed = listener::reachable_from_elsewhere(&settings.listen);
    if let Some(osmand) = &settings.osmand_listen {
        exposed.extend(listener::reachable_from_elsewhere(osmand));
    }
    if let Some(teltonika) = &settings.teltonika_listen {
        exposed.extend(listener::reachable_from_elsewhere(teltonika));
    }
    if let Some(gt06) = &settings.gt06_listen {
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

/// The host a connection to PostgreSQL would reach over the network in clear: a TCP host that is not this machine,
/// with TLS off. `None` for a Unix socket, a loopback host, or TLS.
fn remote_without_tls(config: &tokio_postgres::Config, mode: db::tls::TlsMode) -> Option<String> {
    if mode != db::tls::TlsMode::Off {
        return None;
    }
    let addresses = config.get_hostaddrs();
    config.get_hosts().iter().enumerate().find_map(|(i, host)| {
        let tokio_postgres::config::Host::Tcp(name) = host else {
            return None;
        };
        let local = match addresses.get(i) {
            Some(address) => address.is_loopback(),
            None => {
                name == "localhost"
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        };
        (!local).then(|| name.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(url: &str) -> Option<String> {
        let db::DatabaseUrl { config, tls } = url.parse().unwrap();
        remote_without_tls(&config, tls.mode())
    }

    #[test]
    fn a_remote_database_without_tls_is_named_and_a_local_or_encrypted_one_is_not() {
        assert_eq!(
            remote("postgres://u:p@db.internal/ingest"),
            Some("db.internal".to_owned())
        );
        assert_eq!(
            remote("postgres://u:p@10.0.0.5:5432/ingest?sslmode=prefer"),
            Some("10.0.0.5".to_owned())
        );
        assert_eq!(
            remote("host=db.internal user=u sslmode=disable"),
            Some("db.internal".to_owned())
        );
        assert_eq!(remote("postgres://u:p@db.internal/ingest?sslmode=require"), None);
        assert_eq!(remote("postgres://u:p@localhost/ingest"), None);
        assert_eq!(remote("postgres://u:p@127.0.0.1/ingest"), None);
        assert_eq!(remote("postgres://u:p@[::1]/ingest"), None);
        assert_eq!(remote("host=/run/postgresql user=u"), None);
    }
}
