//! The variants the benchmark measures, and how one run of each becomes a `Measurement`.
//!
//! Each run starts what is under test, applies the load, waits until what was accepted has landed, stops it, and
//! turns what was seen into one [`Measurement`].
//!
//! Rows landed per second is measured from the start of the load until the flow of rows into PostgreSQL stops
//! (read every 100 ms from each variant's own counter, checked against `count(*)` at the end). For the gateway
//! this excludes the last partial batches, which wait for the flush interval (10 s by default) once the load
//! stops: counting that idle wait would measure the flush setting, not the throughput. Those rows are written at
//! the stop (SIGTERM flushes) and counted in the table check.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ingest_gateway::db::EmbeddedPostgres;

use crate::pg::Admin;
use crate::procs::{self, Monitor, Sample, Service};
use crate::wrk::{self, WrkOutcome};

/// Rows per COPY in the sink ceiling: the gateway's default batch size.
pub const SINK_BATCH_ROWS: usize = 1000;
/// Parallel writers: the gateway's default (`INGEST_WRITERS`), so the sink ceiling uses as many psql processes.
pub const WRITERS: usize = 2;
/// How long the counter must stand still after the load before only flush-interval batches are assumed left.
const STILL_FOR: Duration = Duration::from_secs(2);
/// The longest wait for the gateway to write what it accepted after the load.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Rates in the plot are taken over windows this long, smoothing the 100 ms counter readings.
const PLOT_WINDOW_SECS: f64 = 0.5;

/// The request a wrk script sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One update per request (`single.lua`).
    Single,
    /// A JSON array of 1000 updates per request (`batch1000.lua`).
    Batch1000,
    /// One update per request, answered once committed in PostgreSQL (`single.lua` on `?ack=commit`).
    SingleCommit,
    /// One fix per `GET /api/v1/osmand?id=…&lat=…`, the query form of Traccar Client and the OsmAnd app
    /// (`osmand.lua`): set against `Single`, what the tracker route costs beyond the native one.
    Osmand,
    /// An Overland batch of 200 GeoJSON Features per request (`overland200.lua`): set against `Batch1000`.
    Overland200,
    /// Teltonika units over TCP, not HTTP: 1000 connections, Codec 8 packets of 10 records, each unit waiting for
    /// its answer before the next (the generator in `teltonika.rs`, not wrk): set against `Batch1000`.
    Teltonika,
}

impl Shape {
    fn script(self) -> &'static str {
        match self {
            Shape::Single | Shape::SingleCommit => "single.lua",
            Shape::Batch1000 => "batch1000.lua",
            Shape::Osmand => "osmand.lua",
            Shape::Overland200 => "overland200.lua",
            // Never run by wrk: `Bench::gateway` drives it with its own generator.
            Shape::Teltonika => "teltonika (no wrk script)",
        }
    }

    pub fn updates_per_request(self) -> u64 {
        match self {
            Shape::Single | Shape::SingleCommit | Shape::Osmand => 1,
            Shape::Batch1000 => 1000,
            Shape::Overland200 => 200,
            Shape::Teltonika => crate::teltonika::RECORDS_PER_PACKET as u64,
        }
    }

    /// The route the requests go to.
    pub fn path(self) -> &'static str {
        match self {
            Shape::Single | Shape::Batch1000 => "/api/v1/location/update",
            Shape::SingleCommit => "/api/v1/location/update?ack=commit",
            Shape::Osmand => "/api/v1/osmand",
            Shape::Overland200 => "/api/v1/overland",
            Shape::Teltonika => "INGEST_TELTONIKA_LISTEN (TCP)",
        }
    }

    /// How variant names call the requests.
    pub fn label(self) -> &'static str {
        match self {
            Shape::Single => "single",
            Shape::Batch1000 => "1000/request",
            Shape::SingleCommit => "single ?ack=commit",
            Shape::Osmand => "osmand GET",
            Shape::Overland200 => "overland 200/request",
            Shape::Teltonika => "teltonika 1000 units × 10/packet",
        }
    }
}

/// What is measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    HttpCeiling,
    SinkCeiling,
    NaiveBaseline,
    Gateway {
        shape: Shape,
        /// `--durability` mode, when the gateway has that setting.
        durability: Option<String>,
        /// Whether this is the gateway's default mode (what `--min-ceiling-ratio` checks).
        default_mode: bool,
    },
    /// A gateway publishing to a single-node JetStream, and a writer process consuming it.
    JetStream {
        shape: Shape,
    },
}

#[derive(Debug, Clone)]
pub struct Variant {
    pub kind: Kind,
    pub name: String,
}

impl Variant {
    pub fn new(kind: Kind) -> Variant {
        let name = match &kind {
            Kind::HttpCeiling => "HTTP ceiling (parse + 202)".to_owned(),
            Kind::SinkCeiling => format!("sink ceiling (psql \\copy, {WRITERS}×)"),
            Kind::NaiveBaseline => "naive baseline (INSERT per request)".to_owned(),
            Kind::Gateway { shape, durability, .. } => match durability {
                Some(mode) => format!("gateway {}, {mode}", shape.label()),
                None => format!("gateway {}", shape.label()),
            },
            Kind::JetStream { shape } => format!("gateway {}, jetstream + writer", shape.label()),
        };
        Variant { kind, name }
    }

    /// A short name for scratch files.
    pub fn slug(&self) -> String {
        self.name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect::<String>()
            .split('-')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("-")
    }
}

/// One variant's figures from one round.
#[derive(Debug, Clone, Default)]
pub struct Measurement {
    pub round: u32,
    /// Rows landed in PostgreSQL per second (the HTTP ceiling: updates parsed per second; nothing lands).
    pub rows_per_sec: f64,
    /// Rows in the table after the variant (the HTTP ceiling: updates parsed).
    pub rows: u64,
    /// Updates answered as accepted per second over wrk's run (202; on a tracker route, its client's success).
    pub accepted_rows_per_sec: Option<f64>,
    pub wrk: Option<WrkOutcome>,
    /// Peak resident memory of the server under test.
    pub peak_rss_kib: Option<u64>,
    /// CPU seconds of the server under test over its whole life (the sink: of the psql processes).
    pub cpu_secs: Option<f64>,
    /// CPU seconds of the load generator: wrk over its run; for the sink, the psql processes, which are both.
    pub load_cpu_secs: Option<f64>,
    /// Seconds from the start of the load until the last counted row landed.
    pub landed_secs: f64,
    /// Rows per second over time since the start of the load, for the plot.
    pub series: Vec<(f64, f64)>,
    /// Share of the machine's CPU (all cores) that processes outside the benchmark took during the variant.
    pub others_cpu_share: f64,
    /// CPU seconds of the PostgreSQL server and its backends during the variant.
    pub pg_cpu_secs: f64,
    /// `cpu_secs` by process, when the server under test is several (the JetStream variant: gateway, writer,
    /// nats-server); empty when it is one.
    pub cpu_parts: Vec<(&'static str, f64)>,
    /// The Teltonika variant: the gateway's resident memory with every unit's connection open, right after the
    /// load (before the connections close).
    pub connections_rss_kib: Option<u64>,
    /// Anything a reader should know about this run (rows missing, an unclean exit…).
    pub notes: Vec<String>,
}

/// Everything the variants share: the server, the binaries, the settings.
pub struct Bench {
    pub repo: PathBuf,
    pub gateway_bin: PathBuf,
    pub self_exe: PathBuf,
    pub pg: EmbeddedPostgres,
    /// Logs, COPY files and the gateways' data directories: inside the server's temporary directory, so that
    /// they go with it.
    pub scratch_dir: PathBuf,
    pub admin: Admin,
    pub database_url: String,
    pub duration_secs: u64,
    pub connections: u32,
    pub wrk_threads: u32,
    /// HTTP workers of every server: the number of cores, actix-web's default and so the gateway's.
    pub workers: usize,
}

impl Bench {
    /// Measures one variant once, on emptied tables.
    pub fn measure(&self, variant: &Variant, round: u32) -> anyhow::Result<Measurement> {
        let before = procs::CpuSnapshot::take(self.pg.pid());
        self.admin.reset().context("could not empty the tables")?;
        let mut m = match &variant.kind {
            Kind::HttpCeiling => self.http_ceiling(variant, round),
            Kind::SinkCeiling => self.sink_ceiling(variant, round),
            Kind::NaiveBaseline => self.naive_baseline(variant, round),
            Kind::Gateway { shape, durability, .. } => self.gateway(variant, round, *shape, durability.as_deref()),
            Kind::JetStream { shape } => self.jetstream(variant, round, *shape),
        }
        .with_context(|| format!("{} (round {round}) failed", variant.name))?;
        m.round = round;
        let after = procs::CpuSnapshot::take(self.pg.pid());
        m.others_cpu_share = before.others_share(&after, self.workers);
        m.pg_cpu_secs = before.tree_secs_since(&after);
        Ok(m)
    }

    pub fn scratch(&self, name: &str) -> PathBuf {
        self.scratch_dir.join(name)
    }

    pub fn script(&self, shape: Shape) -> PathBuf {
        self.repo.join("loadtest").join("wrk").join(shape.script())
    }

    /// The URL of `shape`'s route on a server at `port`.
    pub fn url(shape: Shape, port: u16) -> String {
        format!("http://127.0.0.1:{port}{}", shape.path())
    }

    pub fn wrk(&self, shape: Shape, port: u16) -> anyhow::Result<WrkOutcome> {
        wrk::run(
            &self.script(shape),
            &Self::url(shape, port),
            self.wrk_threads,
            self.connections,
            self.duration_secs,
        )
    }

    /// A bench server (this binary's hidden subcommand) on a free port.
    fn bench_server(&self, variant: &Variant, round: u32, subcommand: &str) -> anyhow::Result<Service> {
        let port = procs::free_port()?;
        let mut command = Command::new(&self.self_exe);
        command
            .arg(subcommand)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--workers", &self.workers.to_string()]);
        if subcommand == "naive-server" {
            command.args(["--database-url", &self.database_url]);
        }
        let log = self.scratch(&format!("{}-{round}.log", variant.slug()));
        Service::start(&variant.name, command, port, &log, "/healthz", Duration::from_secs(30))
    }

    fn http_ceiling(&self, variant: &Variant, round: u32) -> anyhow::Result<Measurement> {
        let service = self.bench_server(variant, round, "ceiling-server")?;
        let t0 = Instant::now();
        let monitor = Monitor::start(t0, service.pid(), counter_progress(service.port));
        let wrk = self.wrk(Shape::Single, service.port)?;
        let seen = monitor.finish();
        let usage = service.stop(Duration::from_secs(15))?;
        let rows = wrk.accepted * Shape::Single.updates_per_request();
        Ok(Measurement {
            rows_per_sec: rows as f64 / wrk.duration_secs,
            rows,
            accepted_rows_per_sec: Some(rows as f64 / wrk.duration_secs),
            peak_rss_kib: Some(seen.peak_rss_kib.max(usage.max_rss_kib)),
            cpu_secs: Some(usage.cpu_secs),
            load_cpu_secs: Some(wrk.cpu_secs),
            landed_secs: wrk.duration_secs,
            series: rates(&seen.samples),
            wrk: Some(wrk),
            ..Measurement::default()
        })
    }

    fn naive_baseline(&self, variant: &Variant, round: u32) -> anyhow::Result<Measurement> {
        let service = self.bench_server(variant, round, "naive-server")?;
        let t0 = Instant::now();
        let monitor = Monitor::start(t0, service.pid(), counter_progress(service.port));
        let wrk = self.wrk(Shape::Single, service.port)?;
        // Requests still in flight when wrk stops finish their INSERT within milliseconds.
        std::thread::sleep(Duration::from_millis(300));
        let seen = monitor.finish();
        let usage = service.stop(Duration::from_secs(15))?;
        let rows = self.admin.count_rows("location_updates")?;
        let mut notes = Vec::new();
        if rows < wrk.accepted {
            notes.push(format!(
                "{} rows answered 202 are not in the table",
                wrk.accepted - rows
            ));
        }
        // Every 202 came after its commit, so the rows landed within wrk's run.
        Ok(Measurement {
            rows_per_sec: rows as f64 / wrk.duration_secs,
            rows,
            accepted_rows_per_sec: Some(wrk.accepted as f64 / wrk.duration_secs),
            peak_rss_kib: Some(seen.peak_rss_kib.max(usage.max_rss_kib)),
            cpu_secs: Some(usage.cpu_secs),
            load_cpu_secs: Some(wrk.cpu_secs),
            landed_secs: wrk.duration_secs,
            series: rates(&seen.samples),
            wrk: Some(wrk),
            notes,
            ..Measurement::default()
        })
    }

    fn sink_ceiling(&self, variant: &Variant, round: u32) -> anyhow::Result<Measurement> {
        let landed = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let counter = landed.clone();
        let monitor = Monitor::start(t0, None, Box::new(move || Some(counter.load(Ordering::Relaxed))));
        let outcome = crate::sink::run(
            &self.database_url,
            &self.scratch(&format!("{}-{round}", variant.slug())),
            WRITERS,
            SINK_BATCH_ROWS,
            Duration::from_secs(self.duration_secs),
            t0,
            landed,
        )?;
        let seen = monitor.finish();
        let rows = self.admin.count_rows("location_updates")?;
        let mut notes = Vec::new();
        if rows != outcome.rows {
            notes.push(format!("psql reported {} rows, the table holds {rows}", outcome.rows));
        }
        Ok(Measurement {
            rows_per_sec: rows as f64 / outcome.last_commit_secs.max(f64::MIN_POSITIVE),
            rows,
            cpu_secs: Some(outcome.psql_cpu_secs),
            load_cpu_secs: Some(outcome.psql_cpu_secs),
            landed_secs: outcome.last_commit_secs,
            series: rates(&seen.samples),
            notes,
            ..Measurement::default()
        })
    }

    /// Starts the gateway with its default settings on a free port and a fresh data directory under the scratch
    /// directory (where a write-ahead log goes); returns it and that directory.
    pub fn start_gateway(&self, slug: &str, durability: Option<&str>) -> anyhow::Result<(Service, PathBuf)> {
        let envs: Vec<(&str, &str)> = durability.map(|mode| ("INGEST_DURABILITY", mode)).into_iter().collect();
        self.start_ingest_process("serve", slug, &envs, "/readyz")
    }

    /// Starts `ingest-gateway <role>` with its default settings but `envs`, on a free port and a fresh data
    /// directory under the scratch directory; returns it once `ready_path` answers, and that directory.
    pub fn start_ingest_process(
        &self,
        role: &str,
        slug: &str,
        envs: &[(&str, &str)],
        ready_path: &str,
    ) -> anyhow::Result<(Service, PathBuf)> {
        let port = procs::free_port()?;
        let data_dir = self.scratch(slug);
        std::fs::create_dir_all(&data_dir)?;
        let mut command = Command::new(&self.gateway_bin);
        command.arg(role);
        // Defaults, whatever this shell has set: only the database, the address, a fresh data directory and
        // `envs` are given.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("INGEST_") {
                command.env_remove(&key);
            }
        }
        command
            .env("DATABASE_URL", &self.database_url)
            .env("INGEST_LISTEN", format!("127.0.0.1:{port}"))
            .env("INGEST_DATA_DIR", &data_dir)
            .envs(envs.iter().copied());
        let log = self.scratch(&format!("{slug}.log"));
        let service = Service::start(role, command, port, &log, ready_path, Duration::from_secs(120))?;
        Ok((service, data_dir))
    }

    fn gateway(
        &self,
        variant: &Variant,
        round: u32,
        shape: Shape,
        durability: Option<&str>,
    ) -> anyhow::Result<Measurement> {
        let slug = format!("{}-{round}", variant.slug());
        let mut notes = Vec::new();
        let (service, data_dir, loader) = if shape == Shape::Teltonika {
            let tcp = std::net::SocketAddr::from(([127, 0, 0, 1], procs::free_port()?));
            let listen = tcp.to_string();
            // Every unit comes from 127.0.0.1: the per-address cap (1000 by default) with room for reconnects
            // while a lost connection's place is being given back.
            let per_address = (2 * crate::teltonika::UNITS).to_string();
            let mut envs = vec![
                ("INGEST_TELTONIKA_LISTEN", listen.as_str()),
                ("INGEST_TCP_MAX_CONNECTIONS_PER_ADDRESS", per_address.as_str()),
            ];
            envs.extend(durability.map(|mode| ("INGEST_DURABILITY", mode)));
            let (service, data_dir) = self.start_ingest_process("serve", &slug, &envs, "/readyz")?;
            let loader = crate::teltonika::Loader::start(&self.self_exe, tcp, self.duration_secs)
                .map_err(|e| e.context(format!("the gateway's log:\n{}", service.log_tail())))?;
            if let Some(kib) = service.pid().and_then(procs::rss_kib) {
                notes.push(format!(
                    "gateway RSS with {} units handshaken, before the load: {:.1} MB",
                    crate::teltonika::UNITS,
                    kib as f64 / 1024.0
                ));
            }
            (service, data_dir, Some(loader))
        } else {
            let (service, data_dir) = self.start_gateway(&slug, durability)?;
            (service, data_dir, None)
        };
        let (port, log) = (service.port, service.log_path.clone());
        let t0 = Instant::now();
        let monitor = Monitor::start(
            t0,
            service.pid(),
            Box::new(move || gateway_stats(port).map(|s| s.written)),
        );
        let mut connections_rss_kib = None;
        let wrk = match loader {
            Some(mut loader) => {
                let outcome = loader.run()?;
                connections_rss_kib = service.pid().and_then(procs::rss_kib);
                // The records of the last packets are durable (answered) but may still be on their way to
                // PostgreSQL: the connections stay open while they land.
                if let Err(note) = wait_until_written(port, &monitor) {
                    notes.push(note);
                }
                let cpu_secs = loader.finish()?;
                WrkOutcome {
                    duration_secs: outcome.secs,
                    requests: outcome.packets,
                    requests_per_sec: outcome.acked as f64 / outcome.secs.max(f64::MIN_POSITIVE),
                    p50_ms: outcome.p50_ms,
                    p99_ms: outcome.p99_ms,
                    max_ms: outcome.max_ms,
                    accepted: outcome.acked,
                    failed: outcome.wrong_answers,
                    failed_detail: if outcome.wrong_answers > 0 {
                        format!("[wrong count={}]", outcome.wrong_answers)
                    } else {
                        String::new()
                    },
                    socket_errors: outcome.socket_errors,
                    cpu_secs,
                }
            }
            None => {
                let wrk = self.wrk(shape, port)?;
                if let Err(note) = wait_until_written(port, &monitor) {
                    notes.push(note);
                }
                wrk
            }
        };
        let seen = monitor.finish();
        let usage = service
            .stop(Duration::from_secs(60))
            .map_err(|e| e.context(format!("the gateway's log:\n{}", procs::file_tail(&log, 20))))?;
        if usage.exit_code != Some(0) {
            notes.push(format!("the gateway exited with {:?} after SIGTERM", usage.exit_code));
        }
        // A write-ahead log of a 1000/request run is up to a gigabyte; the next variants do not need it.
        let _ = std::fs::remove_dir_all(&data_dir);

        let rows = self.admin.count_rows("location_updates")?;
        let accepted = wrk.accepted * shape.updates_per_request();
        if rows < accepted {
            notes.push(format!(
                "{} updates answered as accepted are not in the table",
                accepted - rows
            ));
        }
        // A tracker route answers success for a fix it can never store and keeps it as a dead letter: any here
        // means the script sent fixes the rules refuse, and the variant's rows are fewer than its requests say.
        if matches!(shape, Shape::Osmand | Shape::Overland200 | Shape::Teltonika) {
            match self.admin.count_rows("dead_letters") {
                Ok(0) => {}
                Ok(letters) => notes.push(format!("{letters} fixes were kept as dead letters, not stored")),
                Err(e) => notes.push(format!("the dead letters could not be counted: {e:#}")),
            }
        }
        let (landed_secs, landed_rows) = flow_end(&seen.samples).unwrap_or((t0.elapsed().as_secs_f64(), rows));
        if rows > landed_rows {
            notes.push(format!(
                "{} rows of partial batches were written at the stop and are not counted in rows/s",
                rows - landed_rows
            ));
        }
        Ok(Measurement {
            rows_per_sec: landed_rows as f64 / landed_secs.max(f64::MIN_POSITIVE),
            rows,
            accepted_rows_per_sec: Some(accepted as f64 / wrk.duration_secs),
            peak_rss_kib: Some(seen.peak_rss_kib.max(usage.max_rss_kib)),
            cpu_secs: Some(usage.cpu_secs),
            load_cpu_secs: Some(wrk.cpu_secs),
            landed_secs,
            series: rates(&seen.samples),
            wrk: Some(wrk),
            connections_rss_kib,
            notes,
            ..Measurement::default()
        })
    }
}

/// Progress of a bench server: its `GET /written` counter.
fn counter_progress(port: u16) -> Box<dyn FnMut() -> Option<u64> + Send> {
    Box::new(move || {
        procs::http_get(port, "/written")
            .ok()
            .and_then(|(_, body)| body.trim().parse().ok())
    })
}

/// The gateway's `/stats`, summed over its streams.
pub struct GatewayStats {
    pub written: u64,
    pub queue_depth: u64,
}

pub fn gateway_stats(port: u16) -> Option<GatewayStats> {
    let (status, body) = procs::http_get(port, "/stats").ok()?;
    if status != 200 {
        return None;
    }
    let stats: serde_json::Value = serde_json::from_str(&body).ok()?;
    let streams = stats.get("streams")?.as_object()?;
    let field = |name: &str| -> Option<u64> {
        streams
            .values()
            .map(|s| s.get(name).and_then(|v| v.as_f64()).map(|v| v as u64))
            .sum()
    };
    Some(GatewayStats {
        written: field("written")?,
        queue_depth: field("queue_depth")?,
    })
}

/// After the load: waits until the gateway's queues are empty, or until its written counter has stood still for
/// [`STILL_FOR`] (only partial batches are left, waiting for the flush interval). Returns a note on time-out.
pub fn wait_until_written(port: u16, monitor: &Monitor) -> Result<(), String> {
    let start = Instant::now();
    let mut last: Option<(u64, Instant)> = None;
    loop {
        if let Some(stats) = gateway_stats(port) {
            if stats.queue_depth == 0 {
                // Let the monitor read the final count.
                std::thread::sleep(procs::PROGRESS_EVERY * 2);
                return Ok(());
            }
            match last {
                Some((written, since)) if written == stats.written => {
                    if since.elapsed() >= STILL_FOR {
                        return Ok(());
                    }
                }
                _ => last = Some((stats.written, Instant::now())),
            }
        } else if monitor.latest().is_none() && start.elapsed() > Duration::from_secs(5) {
            return Err("the gateway's /stats could not be read; rows/s is over the whole wait".to_owned());
        }
        if start.elapsed() >= DRAIN_TIMEOUT {
            return Err(format!(
                "the gateway had not written everything {DRAIN_TIMEOUT:?} after the load"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last sample at which the counter rose: when the flow of rows stopped, and how many had landed.
pub fn flow_end(samples: &[Sample]) -> Option<(f64, u64)> {
    let mut end = None;
    for pair in samples.windows(2) {
        if pair[1].1 > pair[0].1 {
            end = Some(pair[1]);
        }
    }
    end
}

/// Rows per second over windows of [`PLOT_WINDOW_SECS`], placed at each window's middle.
pub fn rates(samples: &[Sample]) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &(t, rows)) in samples.iter().enumerate() {
        let (t0, rows0) = samples[start];
        if t - t0 >= PLOT_WINDOW_SECS {
            out.push(((t + t0) / 2.0, rows.saturating_sub(rows0) as f64 / (t - t0)));
            start = i;
        }
    }
    out
}

/// Runs `ingest-gateway --help` (and `serve --help`) and returns its `--durability` modes, the default first, or
/// `None` when the gateway has no such setting.
pub fn durability_modes(gateway: &Path) -> anyhow::Result<Option<Vec<String>>> {
    let mut help = String::new();
    for args in [&["--help"][..], &["serve", "--help"][..]] {
        let out = Command::new(gateway)
            .args(args)
            .output()
            .with_context(|| format!("could not run {}", gateway.display()))?;
        help.push_str(&String::from_utf8_lossy(&out.stdout));
        help.push('\n');
    }
    Ok(parse_durability(&help))
}

fn parse_durability(help: &str) -> Option<Vec<String>> {
    let start = help.find("--durability")?;
    // The option's own text ends where the next option starts.
    let rest = &help[start + "--durability".len()..];
    // Whichever comes first: a short option (`  -h, --help`) or a long one.
    let end = [rest.find("\n  -"), rest.find("\n      --")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(rest.len());
    let own = &rest[..end];
    let bracket = |label: &str| -> Option<String> {
        let at = own.find(label)? + label.len();
        let end = own[at..].find(']')? + at;
        Some(own[at..end].trim().to_owned())
    };
    let mut modes: Vec<String> = bracket("[possible values:")
        .map(|v| {
            v.split(',')
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect()
        })
        .unwrap_or_else(|| vec!["wal".to_owned(), "memory".to_owned()]);
    if let Some(default) = bracket("[default:") {
        modes.retain(|m| *m != default);
        modes.insert(0, default);
    }
    Some(modes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_durability_modes_with_the_default_first() {
        let help = "Options:\n      --listen <LISTEN>  where [default: 127.0.0.1:8080]\n      \
                    --durability <DURABILITY>  what a 202 promises [env: INGEST_DURABILITY=] [default: wal] \
                    [possible values: memory, wal]\n      --writers <N>  [default: 2]\n";
        assert_eq!(
            parse_durability(help),
            Some(vec!["wal".to_owned(), "memory".to_owned()])
        );
    }

    #[test]
    fn another_options_possible_values_further_down_are_not_the_durability_modes() {
        let help = "Options:\n      --durability <DURABILITY>\n          what a 202 promises\n          \
                    [default: wal]\n\n      --local-writers <BOOL>\n          [possible values: true, false]\n  \
                    -h, --help\n";
        assert_eq!(
            parse_durability(help),
            Some(vec!["wal".to_owned(), "memory".to_owned()])
        );
    }

    #[test]
    fn a_gateway_without_durability_has_no_modes() {
        assert_eq!(parse_durability("Options:\n      --writers <N>  [default: 2]\n"), None);
    }

    #[test]
    fn the_flow_ends_at_the_last_rise_of_the_counter() {
        let samples = [(0.1, 0), (0.2, 10), (0.3, 25), (0.4, 25), (0.5, 25)];
        assert_eq!(flow_end(&samples), Some((0.3, 25)));
    }

    #[test]
    fn rates_are_rows_per_second_over_half_second_windows() {
        let samples: Vec<Sample> = (0..=10).map(|i| (f64::from(i) * 0.1, i as u64 * 100)).collect();
        let r = rates(&samples);
        assert_eq!(r.len(), 2);
        assert!((r[0].1 - 1000.0).abs() < 1e-6);
    }
}
