//! Every setting of the gateway: its default (one that works on a laptop), its flag and its environment variable.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

pub mod reference;

/// The command line: a subcommand (default `serve`) and the settings, which every subcommand accepts.
#[derive(Debug, Parser)]
#[command(name = "ingest-gateway", version, about, long_about = None)]
pub struct Cli {
    /// What to do; `serve` when none is given.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The settings, shared by all subcommands.
    #[command(flatten)]
    pub settings: Settings,
}

/// The subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Apply the migrations, then take updates over HTTP and write them to PostgreSQL (the default).
    Serve,
    /// Apply the pending migrations, make the time partitions and exit.
    Migrate,
    /// Make a new API key: print it (once) and the line to add to the API keys file.
    NewKey(NewKeyArgs),
    /// Run only the batch writers, reading from JetStream (`INGEST_QUEUE=jetstream`); no ingest endpoints, only
    /// `/metrics`, `/stats`, `/readyz` and `/healthz` on the listeners.
    Write,
    /// Write the settings table of the configuration reference (`docs/configuration.md`) from these definitions.
    #[command(hide = true)]
    SettingsReference {
        /// The page whose table is written again, between its markers.
        page: PathBuf,
    },
}

/// What a new API key may do; the printed line says the same in the keys file's format.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct NewKeyArgs {
    /// The key's name, as metrics and logs show it: 1–64 of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// The streams the key may write, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "location,poll")]
    pub streams: Vec<String>,
    /// A device the key may write, exactly (repeat for several): a key for one device.
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// A prefix the device ids of the key's location updates must start with, ending with one of `- . : _ /` so
    /// that it cannot reach other devices' ids (repeat for several).
    #[arg(long = "device-prefix")]
    pub device_prefixes: Vec<String>,
    /// The project ids the key's poll results may carry: ranges and single ids, comma-separated (`1-100,250`).
    #[arg(long)]
    pub projects: Option<String>,
    /// The key's own rate limit, instead of INGEST_RATE_LIMIT: updates per second, then optionally `:burst`.
    #[arg(long)]
    pub rate: Option<RateLimit>,
}

/// A rate limit: updates per second, and how many may come at once after a pause (the burst). Written `100`
/// (burst: one second's worth) or `100:1000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: NonZeroU32,
    /// The most updates let through at once; a request with more is refused whatever the wait.
    pub burst: NonZeroU32,
}

impl std::str::FromStr for RateLimit {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let number = |part: &str| part.trim().parse::<NonZeroU32>().ok();
        let (rate, burst) = match text.split_once(':') {
            Some((rate, burst)) => (number(rate), number(burst)),
            None => (number(text), number(text)),
        };
        match (rate, burst) {
            (Some(per_second), Some(burst)) => Ok(RateLimit { per_second, burst }),
            _ => Err(format!(
                "{text:?} is not a rate limit: write updates per second, optionally with a burst, such as 100 or 100:1000"
            )),
        }
    }
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.per_second, self.burst)
    }
}

/// A share of a whole in percent, from 1 to 100: written `10` or `10%`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent(u8);

impl Percent {
    pub fn get(self) -> u8 {
        self.0
    }
}

impl std::str::FromStr for Percent {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let digits = text.trim().trim_end_matches('%').trim_end();
        digits
            .parse::<u8>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .map(Percent)
            .ok_or_else(|| {
                format!("{text:?} is not a share in percent: write a whole number from 1 to 100, such as 10")
            })
    }
}

impl std::fmt::Display for Percent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%", self.0)
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// What a `202` promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Durability {
    /// The updates are in the write-ahead log on disk (fsynced): a crash loses nothing.
    Wal,
    /// The updates are in memory only: fastest, and lost if the process dies before they are written.
    Memory,
}

/// Where accepted updates wait for the writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueKind {
    /// In this gateway: its write-ahead log or memory (`INGEST_DURABILITY`), written by its own writers.
    Local,
    /// A NATS JetStream stream shared by many gateways and writers: a `202` means JetStream stored the updates.
    Jetstream,
}

/// Every setting, in groups by the part of the gateway that reads them. Durations are written like `250ms`, `10s`,
/// `5m`, `30d`.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    #[command(flatten, next_help_heading = "HTTP listeners")]
    pub http: HttpSettings,

    #[command(flatten, next_help_heading = "Tracker TCP listeners")]
    pub trackers: TrackerSettings,

    #[command(flatten, next_help_heading = "Request limits")]
    pub limits: LimitSettings,

    #[command(flatten, next_help_heading = "Access")]
    pub auth: AuthSettings,

    #[command(flatten, next_help_heading = "Database")]
    pub database: DatabaseSettings,

    #[command(flatten, next_help_heading = "Local state")]
    pub storage: StorageSettings,

    #[command(flatten, next_help_heading = "Batch writers")]
    pub pipeline: PipelineSettings,

    #[command(flatten, next_help_heading = "Partitions")]
    pub partitions: PartitionSettings,

    #[command(flatten, next_help_heading = "JetStream queue")]
    pub jetstream: QueueSettings,

    #[command(flatten, next_help_heading = "Logging")]
    pub log: LogSettings,
}

/// Where and how the HTTP API listens.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpSettings {
    /// Where to listen, comma-separated: TCP addresses (port 0 picks a free port; the log says which) and Unix
    /// sockets as `unix:/path/to/socket`. A socket file left by a dead process is replaced, one another process
    /// listens on is refused, and the file is removed at exit.
    #[arg(long, env = "INGEST_LISTEN", default_value = "127.0.0.1:8080", global = true)]
    pub listen: String,

    /// Where to serve `/metrics`, `/stats`, `/readyz` and the status page apart from the public listeners (same
    /// forms as `--listen`); then the public listeners serve only the ingest routes and `/healthz`. Unset: everything
    /// is served on the public listeners.
    #[arg(long, env = "INGEST_ADMIN_LISTEN", global = true)]
    pub admin_listen: Option<String>,

    /// Where to take the OsmAnd protocol on every path, as a Traccar server's port 5055 does (e.g. `0.0.0.0:5055`;
    /// same forms as `--listen`), so that Traccar Clients change only the host and port; unset: only
    /// `/api/v1/osmand` on the public listeners.
    #[arg(long, env = "INGEST_OSMAND_LISTEN", global = true)]
    pub osmand_listen: Option<String>,

    /// Permissions of a Unix socket listener's file, in octal: who on this host may send.
    #[arg(long, env = "INGEST_SOCKET_MODE", default_value = "660", value_parser = parse_octal_mode, global = true)]
    pub socket_mode: u32,

    /// Certificate chain (PEM, leaf first) for HTTPS on the TCP listeners, with --tls-key; re-read on SIGHUP (see
    /// docs/security.md).
    #[arg(long, env = "INGEST_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert; re-read on SIGHUP.
    #[arg(long, env = "INGEST_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM): HTTPS clients must present a certificate one of them signed (mutual TLS); re-read on
    /// SIGHUP.
    #[arg(long, env = "INGEST_TLS_CLIENT_CA", global = true)]
    pub tls_client_ca: Option<PathBuf>,

    /// Open client connections at most (over all HTTP workers); more wait in the listen backlog.
    #[arg(long, env = "INGEST_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_connections: u32,

    /// Longest a `?ack=commit` request waits for the commit; past it, the answer says the updates are durable but
    /// not yet committed (`"committed": false`).
    #[arg(long, env = "INGEST_COMMIT_WAIT", default_value = "30s", value_parser = parse_duration, global = true)]
    pub commit_wait: Duration,
}

/// Where tracker units' binary TCP protocols are taken, and the bounds on their connections.
#[derive(Debug, Clone, clap::Args)]
pub struct TrackerSettings {
    /// Where to take Teltonika units' binary protocol (Codec 8, 8 Extended, 16) over TCP, comma-separated TCP
    /// addresses (e.g. `0.0.0.0:5027`, Traccar's port for it); unset: no Teltonika listener.
    #[arg(long, env = "INGEST_TELTONIKA_LISTEN", global = true)]
    pub teltonika_listen: Option<String>,

    /// Where to take GT06 units' binary protocol (Concox and the many units that copy it) over TCP, comma-separated
    /// TCP addresses (e.g. `0.0.0.0:5023`, Traccar's port for it); unset: no GT06 listener.
    #[arg(long, env = "INGEST_GT06_LISTEN", global = true)]
    pub gt06_listen: Option<String>,

    /// A tracker TCP connection that sends nothing for this long is closed (the unit reconnects when it has data).
    #[arg(long, env = "INGEST_TCP_IDLE_TIMEOUT", default_value = "30m", value_parser = parse_interval, global = true)]
    pub tcp_idle_timeout: Duration,

    /// A tracker's packet (or its handshake) once started must arrive whole within this; past it the connection is
    /// closed unacknowledged.
    #[arg(long, env = "INGEST_TCP_READ_TIMEOUT", default_value = "30s", value_parser = parse_interval, global = true)]
    pub tcp_read_timeout: Duration,

    /// Tracker TCP connections open at once, per protocol; more are closed as soon as they are accepted.
    #[arg(long, env = "INGEST_TCP_MAX_CONNECTIONS", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub tcp_max_connections: u32,

    /// Tracker TCP connections open at once from one source address, per protocol (units behind a mobile
    /// operator's NAT share one).
    #[arg(long, env = "INGEST_TCP_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub tcp_max_connections_per_address: u32,
}

/// The bounds on what one request, and all of them together, may send.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitSettings {
    /// Request body limit in bytes, after decompression (at most 64 MiB); past it, 413.
    #[arg(long, env = "INGEST_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024, value_parser = parse_body_limit, global = true)]
    pub max_body_bytes: usize,

    /// Total time a request body may take to arrive; past it, 408.
    #[arg(long, env = "INGEST_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration, global = true)]
    pub body_timeout: Duration,

    /// Slowest a request body may arrive, in bytes per second on average (after a 5 s grace); 0 for no minimum.
    #[arg(long, env = "INGEST_BODY_MIN_RATE", default_value_t = 1024, global = true)]
    pub body_min_rate: u64,

    /// Bytes of request bodies (and of what parsing keeps of them) the whole process holds at once; a request past
    /// it gets 503 at once.
    #[arg(long, env = "INGEST_MAX_INFLIGHT_BODY_BYTES", default_value_t = 256 * 1024 * 1024, global = true)]
    pub max_inflight_body_bytes: usize,

    /// The most of INGEST_MAX_INFLIGHT_BODY_BYTES one client address, and one API key, may hold at once, in percent
    /// (`10` or `10%`); never less than room for one request of the largest size. A request past it gets 503 while
    /// other clients still get in.
    #[arg(long, env = "INGEST_BODY_BUDGET_SHARE", default_value = "10", global = true)]
    pub body_budget_share: Percent,

    /// How many times its compressed size a gzip body may expand to (bodies up to 64 KiB always may).
    #[arg(long, env = "INGEST_MAX_GZIP_RATIO", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_gzip_ratio: u32,

    /// Updates per request at most.
    #[arg(long, env = "INGEST_MAX_UPDATES", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_updates: u32,

    /// Unknown fields (kept in `attributes`) per update at most; an update with more is refused (422), and no more
    /// of its fields are kept while it is read.
    #[arg(long, env = "INGEST_MAX_UNKNOWN_FIELDS", default_value_t = 64, global = true)]
    pub max_unknown_fields: u16,

    /// How far in the future a `recorded_at` / `polled_at` may be (clock skew of the senders).
    #[arg(long, env = "INGEST_MAX_FUTURE_SKEW", default_value = "5m", value_parser = parse_duration, global = true)]
    pub max_future_skew: Duration,

    /// How old a `recorded_at` / `polled_at` may be.
    #[arg(long, env = "INGEST_MAX_AGE", default_value = "30d", value_parser = parse_duration, global = true)]
    pub max_age: Duration,
}

/// Who may write, how fast, and who may read the operational endpoints.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthSettings {
    /// The API keys, one per line (name, SHA-256 of the key, streams, scope; see docs/security.md); re-read on SIGHUP.
    /// Unset: anyone who can reach the gateway may write, and a listener other machines can reach refuses to start
    /// without INGEST_ALLOW_ANONYMOUS.
    #[arg(long, env = "INGEST_API_KEYS_FILE", global = true)]
    pub api_keys_file: Option<PathBuf>,

    /// Take updates without API keys on a listener other machines can reach (a TCP address that is not loopback).
    /// Without INGEST_API_KEYS_FILE and without this, such a listener refuses to start: a gateway open to anyone is
    /// a decision, not an accident.
    #[arg(long, env = "INGEST_ALLOW_ANONYMOUS", default_value_t = false, action = clap::ArgAction::Set, global = true)]
    pub allow_anonymous: bool,

    /// A file whose first line is the token (at least 16 characters) that `/metrics`, `/stats`, the status page and
    /// `/readyz`'s reasons ask for, as `Authorization: Bearer <token>`, on a listener other machines can reach while
    /// API keys are in force and INGEST_ADMIN_LISTEN is unset; re-read on SIGHUP.
    #[arg(long, env = "INGEST_ADMIN_TOKEN_FILE", global = true)]
    pub admin_token_file: Option<PathBuf>,

    /// Each API key's rate limit (a key's own `rate=` wins): updates per second, optionally `:burst` (`100:1000`).
    /// Without API keys, each client address's. Unset: none.
    #[arg(long, env = "INGEST_RATE_LIMIT", global = true)]
    pub rate_limit: Option<RateLimit>,

    /// Each client address's rate limit (an IPv6 client by its /64), with or without API keys; as INGEST_RATE_LIMIT.
    #[arg(long, env = "INGEST_RATE_LIMIT_PER_ADDRESS", global = true)]
    pub rate_limit_per_address: Option<RateLimit>,

    /// Failed key checks (401) a client address may have in a minute; past them its requests get 429, before any
    /// key is looked up, until the minute ends. 0: no limit.
    #[arg(long, env = "INGEST_AUTH_FAILURES_PER_MINUTE", default_value_t = 30, global = true)]
    pub auth_failures_per_minute: u32,

    /// Proxies and load balancers whose `X-Forwarded-For` is believed (addresses or ranges, comma-separated,
    /// e.g. `10.0.0.0/8,::1`): a request from one of them counts as from the client it names. Empty: the TCP peer
    /// is the client.
    #[arg(long, env = "INGEST_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_address_range, global = true)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// The PostgreSQL written to.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseSettings {
    /// PostgreSQL to write to, as a URL or in libpq's `key=value` form (`sslmode` and `sslrootcert` as in libpq; see
    /// docs/security.md); when unset, an embedded PostgreSQL is started under `<data-dir>/postgres`.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
}

/// The process's local state and what a 202 promises.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageSettings {
    /// Local state, for one process at a time (`<data-dir>/lock`): the gateway's identity (`<data-dir>/instance-id`),
    /// the write-ahead log (`<data-dir>/wal`) and the embedded PostgreSQL (`<data-dir>/postgres`, its log in
    /// `<data-dir>/postgres.log`).
    #[arg(long, env = "INGEST_DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,

    /// What a 202 promises: `wal` (on disk, survives a crash) or `memory` (fastest; lost if the process dies).
    #[arg(long, env = "INGEST_DURABILITY", value_enum, default_value_t = Durability::Wal, global = true)]
    pub durability: Durability,

    /// Bound on the write-ahead log's size on disk (under `<data-dir>/wal`); when full, requests get 503.
    #[arg(long, env = "INGEST_WAL_MAX_BYTES", default_value_t = 1 << 30, global = true)]
    pub wal_max_bytes: u64,
}

/// How accepted updates are queued and written to PostgreSQL in batches.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineSettings {
    /// Rows per COPY at most.
    #[arg(long, env = "INGEST_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub batch_size: u32,

    /// Longest time an accepted update waits before its batch is written.
    #[arg(long, env = "INGEST_FLUSH_INTERVAL", default_value = "10s", value_parser = parse_duration, global = true)]
    pub flush_interval: Duration,

    /// Updates held in memory per stream (accepted, not yet written); beyond it, updates wait in the log (`wal`) or
    /// get 503 (`memory`).
    #[arg(long, env = "INGEST_QUEUE_CAPACITY", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub queue_capacity: u32,

    /// About how much memory a stream's queued updates may take (attributes included); past it, as past the
    /// capacity, updates wait in the log (`wal`) or get 503 (`memory`). An empty queue always takes one request.
    #[arg(long, env = "INGEST_QUEUE_MAX_BYTES", default_value_t = 64 * 1024 * 1024, global = true)]
    pub queue_max_bytes: usize,

    /// Keep `device_positions`, each device's newest fix, up to date in every batch's transaction.
    #[arg(long, env = "INGEST_LATEST_POSITIONS", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub latest_positions: bool,

    /// Keep `project_latest_results`, each project's newest poll result, up to date in every batch's transaction.
    #[arg(long, env = "INGEST_LATEST_POLL_RESULTS", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub latest_poll_results: bool,

    /// Parallel batch writers per stream, each with its own connection.
    #[arg(long, env = "INGEST_WRITERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..), global = true)]
    pub writers: u16,

    /// How long the batch writers may fail to write (database down, privilege revoked, …) before `/readyz` says the
    /// gateway is not ready.
    #[arg(long, env = "INGEST_STALL_TIMEOUT", default_value = "1m", value_parser = parse_duration, global = true)]
    pub stall_timeout: Duration,

    /// How long a stop may take to write what was accepted.
    #[arg(long, env = "INGEST_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration, global = true)]
    pub shutdown_timeout: Duration,
}

/// The time partitions of the update tables.
#[derive(Debug, Clone, clap::Args)]
pub struct PartitionSettings {
    /// The span of one time partition of `location_updates` and `poll_results`: a whole number of hours that divides
    /// a day (`1h`, `2h`, `3h`, `4h`, `6h`, `8h`, `12h`, `1d`); see docs/storage.md.
    #[arg(long, env = "INGEST_PARTITION_INTERVAL", default_value = "1d", value_parser = parse_interval, global = true)]
    pub partition_interval: Duration,

    /// Drop time partitions wholly older than this, whole (no `DELETE`); at least INGEST_MAX_AGE: a shorter one is
    /// refused at start-up, since it would drop partitions that can still receive accepted updates. Unset: keep
    /// everything.
    #[arg(long, env = "INGEST_RETENTION", value_parser = parse_interval, global = true)]
    pub retention: Option<Duration>,
}

/// Where accepted updates wait, and the NATS JetStream that holds them when shared.
#[derive(Debug, Clone, clap::Args)]
pub struct QueueSettings {
    /// Where accepted updates wait for the writers: `local` (this gateway's log or memory) or `jetstream` (a NATS
    /// JetStream stream shared by many gateways and writers).
    #[arg(long, env = "INGEST_QUEUE", value_enum, default_value_t = QueueKind::Local, global = true)]
    pub queue: QueueKind,

    /// NATS servers, comma-separated (`nats://host:4222,tls://other:4222`); the client fails over between them and
    /// reconnects forever. A password in a URL is never shown (here, in errors or in the log).
    #[arg(
        long,
        env = "INGEST_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true,
        hide_env_values = true
    )]
    pub nats_url: String,

    /// NATS credentials file (`.creds`: a user JWT and its NKey seed).
    #[arg(long, env = "INGEST_NATS_CREDS", global = true)]
    pub nats_creds: Option<PathBuf>,

    /// NATS user name, with --nats-password.
    #[arg(long, env = "INGEST_NATS_USER", global = true)]
    pub nats_user: Option<String>,

    /// NATS password of --nats-user.
    #[arg(long, env = "INGEST_NATS_PASSWORD", global = true, hide_env_values = true)]
    pub nats_password: Option<String>,

    /// NATS authentication token.
    #[arg(long, env = "INGEST_NATS_TOKEN", global = true, hide_env_values = true)]
    pub nats_token: Option<String>,

    /// CA certificates (PEM) that sign the NATS servers' certificates; set, TLS is required.
    #[arg(long, env = "INGEST_NATS_TLS_CA", global = true)]
    pub nats_tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for NATS servers that verify clients, with --nats-tls-key.
    #[arg(long, env = "INGEST_NATS_TLS_CERT", global = true)]
    pub nats_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --nats-tls-cert.
    #[arg(long, env = "INGEST_NATS_TLS_KEY", global = true)]
    pub nats_tls_key: Option<PathBuf>,

    /// The NATS subjects under which gateways take replies (`<prefix>.<random>`): JetStream's answers and the
    /// writers' commit notices. A writer sends a commit notice only to a subject under it. Give gateways and writers
    /// the same one; NATS permissions can then confine replies to it.
    #[arg(long, env = "INGEST_NATS_INBOX_PREFIX", default_value = "_INBOX", value_parser = parse_inbox_prefix, global = true)]
    pub nats_inbox_prefix: String,

    /// Subjects per stream that updates are sharded over by their natural key (device, project); each shard is
    /// written by one writer at a time, in order. Fixed once the JetStream stream exists.
    #[arg(long, env = "INGEST_JETSTREAM_SHARDS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024), global = true)]
    pub jetstream_shards: u16,

    /// Copies JetStream keeps of each message (1, 3 or 5; 3 in a cluster).
    #[arg(long, env = "INGEST_JETSTREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5), global = true)]
    pub jetstream_replicas: u8,

    /// How long JetStream remembers a message id: a retried request within it is stored once.
    #[arg(long, env = "INGEST_JETSTREAM_DUPLICATE_WINDOW", default_value = "2m", value_parser = parse_interval, global = true)]
    pub jetstream_duplicate_window: Duration,

    /// Bound on each JetStream stream's unwritten messages in bytes; when full, requests get 503.
    #[arg(long, env = "INGEST_JETSTREAM_MAX_BYTES", default_value_t = 1 << 30, global = true)]
    pub jetstream_max_bytes: u64,

    /// Longest a request waits for JetStream to acknowledge its updates before it gets 503.
    #[arg(long, env = "INGEST_JETSTREAM_PUBLISH_TIMEOUT", default_value = "5s", value_parser = parse_interval, global = true)]
    pub jetstream_publish_timeout: Duration,

    /// How long a message handed to a writer may stay unacknowledged before JetStream hands it out again.
    #[arg(long, env = "INGEST_JETSTREAM_ACK_WAIT", default_value = "60s", value_parser = parse_interval, global = true)]
    pub jetstream_ack_wait: Duration,

    /// With `INGEST_QUEUE=jetstream`, whether `serve` also runs batch writers (`false`: a gateway only; run
    /// `ingest-gateway write` processes).
    #[arg(long, env = "INGEST_JETSTREAM_LOCAL_WRITERS", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub jetstream_local_writers: bool,

    /// A file of JetStream signing keys, one per line (at least 32 characters each, e.g. `openssl rand -hex 32`): the
    /// first signs, every one verifies (for rotation). Gateways sign every record they publish with it and writers
    /// refuse, into `dead_letters`, every record without a valid signature; commit notices are signed too. Required
    /// with INGEST_QUEUE=jetstream; the same file on every gateway and writer; re-read on SIGHUP.
    #[arg(long, env = "INGEST_JETSTREAM_SIGNING_KEY_FILE", global = true)]
    pub jetstream_signing_key_file: Option<PathBuf>,
}

/// What the log looks like.
#[derive(Debug, Clone, clap::Args)]
pub struct LogSettings {
    /// Log format: `text` (lines for a person) or `json` (one object per line, for log shippers). `RUST_LOG`
    /// filters the lines (default `info`).
    #[arg(long, env = "INGEST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// How often long work (the replay of the log at start-up, writing what was accepted at a stop) logs its
    /// progress.
    #[arg(long, env = "INGEST_PROGRESS_INTERVAL", default_value = "5s", value_parser = parse_interval, global = true)]
    pub progress_interval: Duration,
}

/// A NATS inbox prefix: subject tokens of `A-Z a-z 0-9 _ -`, separated by dots, no wildcard.
fn parse_inbox_prefix(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.split('.').all(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        });
    if ok {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is not a NATS subject prefix: dot-separated tokens of A-Z a-z 0-9 _ - (such as _INBOX)"
        ))
    }
}

/// An address range written as `10.0.0.0/8` or `2001:db8::/32`, or one address (`192.0.2.7`, `::1`).
fn parse_address_range(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| format!("{text:?} is neither an address nor an address range like 10.0.0.0/8"))
}

impl Settings {
    /// The defaults alone, whatever the environment holds: tests start from here, so that an `INGEST_*` variable
    /// left exported in the caller's shell changes nothing they check. (`serve` reads the environment through
    /// [`Cli`]'s parse.)
    pub fn defaults() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        // Without its variable, a setting has only its default; the variables are read when the command is built,
        // so they are removed before the parse.
        let command = Cli::command().mut_args(|arg| arg.env(None));
        // Parsing an empty command line cannot fail: every setting has a default.
        let matches = command.get_matches_from(["ingest-gateway"]);
        Cli::from_arg_matches(&matches)
            .expect("every setting has a default")
            .settings
    }
}

/// The longest duration a setting takes: far beyond any sensible value, and far enough from the limits of the
/// clocks' arithmetic that adding it to now, or taking it from now, cannot overflow.
const MAX_SETTING_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses `250ms`, `10s`, `5m`, `30d`, up to 100 years.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| format!("{e} (write durations like 250ms, 10s, 5m)"))?;
    if duration > MAX_SETTING_DURATION {
        return Err("must be at most 100 years".to_owned());
    }
    Ok(duration)
}

/// The largest body limit: a request's updates go into one log record, which the log caps at 256 MiB; a body
/// of a few MiB already holds ten thousand updates.
const MAX_BODY_LIMIT_BYTES: usize = 64 * 1024 * 1024;

/// Parses a body limit in bytes, from 1 to 64 MiB.
fn parse_body_limit(text: &str) -> Result<usize, String> {
    let bytes: usize = text
        .trim()
        .parse()
        .map_err(|e| format!("{e} (write a number of bytes)"))?;
    if !(1..=MAX_BODY_LIMIT_BYTES).contains(&bytes) {
        return Err(format!("must be from 1 to {MAX_BODY_LIMIT_BYTES} bytes (64 MiB)"));
    }
    Ok(bytes)
}

/// Parses a duration that must not be zero: something is done every time it passes.
fn parse_interval(text: &str) -> Result<Duration, String> {
    parse_duration(text).and_then(|d| {
        if d.is_zero() {
            Err("must be longer than zero".to_owned())
        } else {
            Ok(d)
        }
    })
}

/// Parses an octal file mode such as `660` or `0o660`.
fn parse_octal_mode(text: &str) -> Result<u32, String> {
    let digits = text.trim().trim_start_matches("0o");
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{text:?} is not an octal file mode such as 660"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::str::FromStr;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_documented_table() {
        let s = Settings::defaults();
        assert_eq!(s.http.listen, "127.0.0.1:8080");
        assert_eq!(s.http.socket_mode, 0o660);
        assert_eq!(s.pipeline.batch_size, 1000);
        assert_eq!(s.pipeline.flush_interval, Duration::from_secs(10));
        assert_eq!(s.pipeline.queue_capacity, 100_000);
        assert_eq!(s.pipeline.writers, 2);
        assert_eq!(s.limits.max_body_bytes, 8_388_608);
        assert_eq!(s.limits.max_updates, 10_000);
        assert_eq!(s.pipeline.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(s.log.progress_interval, Duration::from_secs(5));
        assert_eq!(s.log.log_format, LogFormat::Text);
        assert_eq!(s.storage.durability, Durability::Wal);
        assert_eq!(s.storage.wal_max_bytes, 1 << 30);
        assert_eq!(s.pipeline.stall_timeout, Duration::from_secs(60));
        assert_eq!(s.partitions.partition_interval, Duration::from_secs(86_400));
        assert_eq!(s.partitions.retention, None);
    }

    #[test]
    fn the_defaults_are_the_same_in_an_environment_full_of_settings() {
        // The check runs in a child process: changing this process's environment would race the other tests.
        let output = std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args(["--exact", "config::tests::defaults_match_the_documented_table"])
            .env("INGEST_LISTEN", "0.0.0.0:1")
            .env("INGEST_BATCH_SIZE", "7")
            .env("INGEST_DURABILITY", "memory")
            .env("INGEST_WAL_MAX_BYTES", "not a number")
            .output()
            .expect("run the test binary");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("1 passed"), "{stdout}");
    }

    #[test]
    fn flags_take_durations_with_units() {
        let cli = Cli::parse_from([
            "ingest-gateway",
            "serve",
            "--flush-interval",
            "250ms",
            "--max-age",
            "2d",
        ]);
        assert_eq!(cli.command, Some(Command::Serve));
        assert_eq!(cli.settings.pipeline.flush_interval, Duration::from_millis(250));
        assert_eq!(cli.settings.limits.max_age, Duration::from_secs(2 * 86_400));
    }

    #[test]
    fn a_duration_beyond_a_century_is_refused_rather_than_overflowing_the_clocks_later() {
        let refused = Cli::try_parse_from(["ingest-gateway", "--max-age", "1000years"]).unwrap_err();
        assert!(refused.to_string().contains("at most 100 years"), "{refused}");
        assert!(Cli::try_parse_from(["ingest-gateway", "--flush-interval", "99years"]).is_ok());
        let refused = Cli::try_parse_from(["ingest-gateway", "--max-body-bytes", "300000000"]).unwrap_err();
        assert!(refused.to_string().contains("64 MiB"), "{refused}");
    }

    #[test]
    fn a_socket_mode_is_octal() {
        assert_eq!(parse_octal_mode("660"), Ok(0o660));
        assert_eq!(parse_octal_mode("0o600"), Ok(0o600));
        assert!(parse_octal_mode("999").is_err());
        assert!(parse_octal_mode("1777").is_err());
    }

    #[test]
    fn a_progress_interval_of_zero_is_refused() {
        assert!(Cli::try_parse_from(["ingest-gateway", "--progress-interval", "0s"]).is_err());
    }

    #[test]
    fn a_rate_limit_is_per_second_with_an_optional_burst() {
        let limit = |text: &str| text.parse::<RateLimit>().map(|r| (r.per_second.get(), r.burst.get()));
        assert_eq!(limit("100"), Ok((100, 100)));
        assert_eq!(limit("5:50"), Ok((5, 50)));
        assert!(limit("0").is_err());
        assert!(limit("10:0").is_err());
        assert!(limit("10/s").is_err());
        assert_eq!(
            RateLimit::from_str("5:50").map(|r| r.to_string()),
            Ok("5:50".to_owned())
        );
    }

    #[test]
    fn new_key_takes_streams_prefixes_and_projects() {
        let cli = Cli::parse_from([
            "ingest-gateway",
            "new-key",
            "fleet",
            "--streams",
            "location",
            "--device-prefix",
            "truck-",
            "--device-prefix",
            "van-",
        ]);
        let Some(Command::NewKey(args)) = cli.command else {
            panic!("not new-key: {:?}", cli.command)
        };
        assert_eq!(args.name, "fleet");
        assert_eq!(args.streams, ["location"]);
        assert_eq!(args.device_prefixes, ["truck-", "van-"]);
    }

    #[test]
    fn the_bounds_on_bodies_keys_and_fields_have_their_documented_defaults() {
        let s = Settings::defaults();
        assert_eq!(s.limits.body_budget_share.get(), 10);
        assert_eq!(s.limits.max_unknown_fields, 64);
        assert_eq!(s.auth.auth_failures_per_minute, 30);
        let share = |text: &str| text.parse::<Percent>().map(Percent::get);
        assert_eq!(share("25%"), Ok(25));
        assert_eq!(share(" 100 "), Ok(100));
        assert!(share("0").is_err());
        assert!(share("101%").is_err());
        assert!(share("ten").is_err());
    }

    #[test]
    fn a_duration_without_unit_is_refused() {
        assert!(Cli::try_parse_from(["ingest-gateway", "--flush-interval", "10"]).is_err());
    }
}
