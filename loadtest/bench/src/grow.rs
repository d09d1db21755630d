//! `--grow N`: the storage benchmark. Writes realistic fixes (5,000 devices, one fix every 5 s each, in time
//! order) through the gateway's own batch write (`pipeline::copy::write_batch`: binary COPY, `device_positions`,
//! NOTIFY, in one transaction per 1000-row batch, two writers at once) and reports PostgreSQL's CPU per landed
//! row: first with the schema before time partitions (migrations up to V5) against the current one, on empty
//! tables, then as the current schema's table grows to N rows — its rate and cost at the start and at the end.
//!
//! The HTTP side is left out on purpose: the figures are PostgreSQL's, and the writes are exactly the gateway's.
//! This process's own CPU per row (building the rows and the batches, the client side of COPY) is reported too,
//! with `device_positions` on and off.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::Pool;
use ingest_gateway::db::partitions::{self, PartitionPolicy};
use ingest_gateway::db::{migrate, pool, DatabaseTls, EmbeddedPostgres};
use ingest_gateway::model::LocationUpdate;
use ingest_gateway::pipeline::copy::write_batch;
use ingest_gateway::pipeline::LogPositions;
use time::OffsetDateTime;

use crate::pg::Admin;
use crate::procs::CpuSnapshot;

const DEVICES: u64 = 5_000;
const FIX_EVERY_SECS: i64 = 5;
const BATCH_ROWS: u64 = 1_000;
const WRITERS: u64 = 2;
/// Rows of each measured stretch: the before/after comparison, and the start and the end of the growth.
const MEASURED_ROWS: u64 = 1_000_000;
/// Rounds of the before/after comparison; each schema reported at its cheapest.
const ROUNDS: u32 = 2;

/// One measured stretch of writing.
#[derive(Debug, Clone, Copy)]
struct Stretch {
    rows: u64,
    secs: f64,
    pg_cpu_secs: f64,
    own_cpu_secs: f64,
}

impl Stretch {
    fn rows_per_sec(&self) -> f64 {
        self.rows as f64 / self.secs
    }
    fn pg_us_per_row(&self) -> f64 {
        self.pg_cpu_secs * 1e6 / self.rows as f64
    }
    fn own_us_per_row(&self) -> f64 {
        self.own_cpu_secs * 1e6 / self.rows as f64
    }
}

/// The `n`th fix of the run that starts at `t0`: device `n mod 5000`, its `n div 5000`th fix.
fn fix(n: u64, t0: OffsetDateTime) -> LocationUpdate {
    let device = n % DEVICES;
    let tick = (n / DEVICES) as i64;
    let recorded_at = t0 + time::Duration::seconds(tick * FIX_EVERY_SECS);
    LocationUpdate {
        device_id: format!("truck-{device:05}"),
        recorded_at,
        lat: 48.0 + device as f64 * 1e-4 + tick as f64 * 1e-5,
        lon: 2.0 + device as f64 * 1e-4 - tick as f64 * 1e-5,
        speed_kmh: Some((tick % 90) as f64),
        heading_deg: Some((tick * 7 % 360) as f64),
        accuracy_m: Some(5.0),
        attributes: None,
        received_at: recorded_at + time::Duration::seconds(1),
    }
}

/// Writes fixes `from..to` of the run starting at `t0`, in 1000-row batches by two writers at once.
async fn write(pool: &Pool, from: u64, to: u64, t0: OffsetDateTime, keep_latest: bool) -> anyhow::Result<()> {
    let writer = |lane: u64| async move {
        let mut start = from + lane * BATCH_ROWS;
        while start < to {
            let rows: Vec<LocationUpdate> = (start..(start + BATCH_ROWS).min(to)).map(|n| fix(n, t0)).collect();
            let positions = LogPositions {
                instance: "grow",
                checkpoints: &[],
            };
            write_batch(pool, "location", &rows, positions, keep_latest).await?;
            start += WRITERS * BATCH_ROWS;
        }
        anyhow::Ok(())
    };
    let (a, b) = tokio::join!(writer(0), writer(1));
    a.and(b)
}

/// This process's CPU seconds so far.
fn own_cpu_secs() -> f64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct, and getrusage writes only into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

async fn measure(
    pg: &EmbeddedPostgres,
    pool: &Pool,
    from: u64,
    to: u64,
    t0: OffsetDateTime,
    keep_latest: bool,
) -> anyhow::Result<Stretch> {
    let (cpu, own, started) = (CpuSnapshot::take(pg.pid()), own_cpu_secs(), Instant::now());
    write(pool, from, to, t0, keep_latest).await?;
    let secs = started.elapsed().as_secs_f64();
    // Backends' CPU is read while they live; a short pause lets the server's own work of the stretch finish.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(Stretch {
        rows: to - from,
        secs,
        pg_cpu_secs: cpu.tree_secs_since(&CpuSnapshot::take(pg.pid())),
        own_cpu_secs: own_cpu_secs() - own,
    })
}

/// Runs the storage benchmark, prints its tables and writes them to `<results_dir>/<stamp>-grow.md`.
pub fn run(rows: u64, results_dir: &Path, stamp: &str) -> anyhow::Result<()> {
    let rows = rows.max(3 * MEASURED_ROWS);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    eprintln!("ingest-bench --grow: starting PostgreSQL");
    let pg = EmbeddedPostgres::start_ephemeral_crash_safe().context("could not start PostgreSQL")?;
    let postgres = Admin::connect(&pg.connection_string("postgres"))?;
    postgres.execute("CREATE DATABASE grow_v5")?;
    postgres.execute("CREATE DATABASE grow_v6")?;
    let tls = DatabaseTls::off();
    let now = OffsetDateTime::now_utc();
    // The growth's fixes end a few minutes ago; the comparison's take the hour before.
    let span = time::Duration::seconds((rows / DEVICES) as i64 * FIX_EVERY_SECS);
    let grow_t0 = now - span - time::Duration::minutes(10);
    let compare_t0 = now - time::Duration::hours(2);
    let policy = PartitionPolicy {
        interval: Duration::from_secs(86_400),
        behind: Duration::from_secs((span.whole_seconds() + 3 * 3600) as u64),
        ahead: Duration::from_secs(3600),
        retention: None,
    };
    let (v5, v6) = (pg.config("grow_v5"), pg.config("grow_v6"));
    let (pool_v5, pool_v6) = runtime.block_on(async {
        migrate::run_to(&v5, &tls, Some(5)).await?;
        migrate::run(&v6, &tls).await?;
        let (mut client, connection) = tls.connect(&v6).await?;
        partitions::maintain_all(&mut client, &policy, now).await?;
        drop(client);
        let _ = connection.await;
        anyhow::Ok((
            pool::build(v5.clone(), &tls, WRITERS as usize)?,
            pool::build(v6.clone(), &tls, WRITERS as usize)?,
        ))
    })?;
    let admin_v5 = Admin::connect(&pg.connection_string("grow_v5"))?;
    let admin_v6 = Admin::connect(&pg.connection_string("grow_v6"))?;

    // Before and after, on empty tables, in turns.
    let variants: [(&str, &Pool, &Admin, bool); 4] = [
        (
            "single table, UNIQUE (device_id, recorded_at) — before (V5)",
            &pool_v5,
            &admin_v5,
            true,
        ),
        (
            "daily partitions, UNIQUE (recorded_at, device_id) — after (V6)",
            &pool_v6,
            &admin_v6,
            true,
        ),
        ("after (V6), without device_positions", &pool_v6, &admin_v6, false),
        ("before (V5), without device_positions", &pool_v5, &admin_v5, false),
    ];
    let mut best: Vec<Option<Stretch>> = vec![None; variants.len()];
    for round in 1..=ROUNDS {
        for (i, (name, pool, admin, keep_latest)) in variants.iter().enumerate() {
            admin.execute("TRUNCATE location_updates, device_positions, ingest_wal_progress; CHECKPOINT")?;
            let m = runtime.block_on(measure(&pg, pool, 0, MEASURED_ROWS, compare_t0, *keep_latest))?;
            eprintln!(
                "  round {round}/{ROUNDS}  {name:<64} {:>8.0} rows/s  PostgreSQL {:.2} µs/row  own {:.2} µs/row",
                m.rows_per_sec(),
                m.pg_us_per_row(),
                m.own_us_per_row()
            );
            if best[i].is_none_or(|b| m.pg_cpu_secs < b.pg_cpu_secs) {
                best[i] = Some(m);
            }
        }
    }
    admin_v5.execute("TRUNCATE location_updates, device_positions")?;

    // The growth: the current schema, from empty to `rows`.
    admin_v6.execute("TRUNCATE location_updates, device_positions, ingest_wal_progress; CHECKPOINT")?;
    eprintln!("ingest-bench --grow: filling to {rows} rows");
    let first = runtime.block_on(measure(&pg, &pool_v6, 0, MEASURED_ROWS, grow_t0, true))?;
    let fill_to = rows - MEASURED_ROWS;
    let mut at = MEASURED_ROWS;
    while at < fill_to {
        let next = (at + 5 * MEASURED_ROWS).min(fill_to);
        runtime.block_on(write(&pool_v6, at, next, grow_t0, true))?;
        at = next;
        eprintln!("  {at} rows");
    }
    admin_v6.execute("CHECKPOINT")?;
    let last = runtime.block_on(measure(&pg, &pool_v6, fill_to, rows, grow_t0, true))?;
    let stored = admin_v6.count_rows("location_updates")?;
    let size = admin_v6.query_i64(
        "SELECT sum(pg_total_relation_size(inhrelid))::bigint FROM pg_inherits \
         WHERE inhparent = 'location_updates'::regclass",
    )?;

    let report = markdown(&variants.map(|v| v.0), &best, first, last, rows, stored, size);
    println!("\n{report}");
    std::fs::create_dir_all(results_dir)?;
    let path = results_dir.join(format!("{stamp}-grow.md"));
    std::fs::write(&path, &report).with_context(|| format!("could not write {}", path.display()))?;
    println!("report: {}", path.display());
    if stored != rows {
        anyhow::bail!("{stored} rows stored of {rows} written");
    }
    Ok(())
}

fn markdown(
    names: &[&str],
    best: &[Option<Stretch>],
    first: Stretch,
    last: Stretch,
    rows: u64,
    stored: u64,
    size: i64,
) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "## Storage: 1000-row batches of realistic fixes ({DEVICES} devices, one fix every {FIX_EVERY_SECS} s, time \
         order), {WRITERS} writers, the gateway's batch write (COPY, device_positions, NOTIFY)\n\n"
    ));
    out.push_str("| schema | rows/s | PostgreSQL CPU µs/row | this process's CPU µs/row |\n|---|---:|---:|---:|\n");
    for (name, m) in names.iter().zip(best) {
        if let Some(m) = m {
            out.push_str(&format!(
                "| {name} | {:.0} | {:.2} | {:.2} |\n",
                m.rows_per_sec(),
                m.pg_us_per_row(),
                m.own_us_per_row()
            ));
        }
    }
    if let (Some(before), Some(after), Some(bare)) = (best[0], best[1], best[2]) {
        out.push_str(&format!(
            "\nPostgreSQL CPU per row, after ÷ before: **{:.2}**; this process's CPU per row with device_positions ÷ \
             without: {:.2}\n",
            after.pg_us_per_row() / before.pg_us_per_row(),
            after.own_us_per_row() / bare.own_us_per_row()
        ));
    }
    if let (Some(after), Some(before)) = (best[2], best[3]) {
        out.push_str(&format!(
            "PostgreSQL CPU per row without device_positions, after ÷ before: **{:.2}**\n",
            after.pg_us_per_row() / before.pg_us_per_row()
        ));
    }
    out.push_str(&format!(
        "\n## Growth to {rows} rows (stored: {stored}, {:.1} GiB with indexes)\n\n\
         | stretch | rows/s | PostgreSQL CPU µs/row |\n|---|---:|---:|\n\
         | first {MEASURED_ROWS} rows (empty table) | {:.0} | {:.2} |\n\
         | last {MEASURED_ROWS} rows | {:.0} | {:.2} |\n\n\
         Rate full ÷ empty: **{:.2}**\n",
        size as f64 / (1u64 << 30) as f64,
        first.rows_per_sec(),
        first.pg_us_per_row(),
        last.rows_per_sec(),
        last.pg_us_per_row(),
        last.rows_per_sec() / first.rows_per_sec()
    ));
    out
}
