//! `--pg-profile`: where PostgreSQL's CPU goes per row of the gateway's batch write. Writes batches through the
//! gateway's own `write_batch` (two writers at once, as the gateway's default) on a PostgreSQL with
//! `pg_stat_statements`, and reports, per workload, the server's CPU per row (all its processes, from /proc) and
//! each statement's share of the execution time: the COPY, the `device_positions` upsert, the checkpoint row,
//! `NOTIFY`, the commit. The rest of the server's CPU (parse, round trips, WAL writer, checkpointer) is the
//! difference.
//!
//! Then one device's track (the last hour, since midnight, 7 days) over 5,000,000 fixes today from 5,000 devices,
//! with and without the current partition's device-first index.
//!
//! Workloads: the benchmark's own (every row a device never seen before, as `batch1000.lua` and `single.lua`
//! send) in 1000-row batches and in the small batches single updates make, and a fleet (5,000 devices, each
//! reporting every 5 s) in 1000-row batches; each with and without `device_positions`, and a bare binary COPY per
//! transaction (what the sink ceiling does) for reference.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use deadpool_postgres::Pool;
use futures_util::SinkExt;
use ingest_gateway::db::partitions::{self, PartitionPolicy};
use ingest_gateway::db::{migrate, pool, DatabaseTls, EmbeddedPostgres};
use ingest_gateway::model::LocationUpdate;
use ingest_gateway::pipeline::copy::{encode_batch, write_batch};
use ingest_gateway::pipeline::LogPositions;
use time::OffsetDateTime;

use crate::pg::Admin;
use crate::procs::CpuSnapshot;

const WRITERS: usize = 2;
const ROWS: u64 = 300_000;

/// Which rows a workload writes.
#[derive(Debug, Clone, Copy)]
enum Rows {
    /// Every row a device of its own, all of a batch at one time: the benchmark's wrk scripts.
    Unique,
    /// 5,000 devices, one fix every 5 s each, in time order.
    Fleet,
}

#[derive(Debug, Clone, Copy)]
enum Write {
    /// The gateway's `write_batch`.
    Gateway { keep_latest: bool },
    /// One binary COPY per transaction, nothing else.
    BareCopy,
}

fn row(kind: Rows, n: u64, t0: OffsetDateTime) -> LocationUpdate {
    let (device, at) = match kind {
        Rows::Unique => (format!("wrk1k-1-1-{}-{}", n / 1000, n % 1000), t0),
        Rows::Fleet => (
            format!("truck-{:05}", n % 5000),
            t0 + time::Duration::seconds((n / 5000) as i64 * 5),
        ),
    };
    LocationUpdate {
        device_id: device,
        recorded_at: at,
        lat: 48.0 + (n % 997) as f64 * 1e-3,
        lon: 2.0 + (n % 991) as f64 * 1e-3,
        speed_kmh: Some((n % 130) as f64),
        heading_deg: Some((n % 360) as f64),
        accuracy_m: Some(5.0),
        attributes: Some(r#"{"source":"wrk"}"#.to_owned()),
        received_at: at + time::Duration::seconds(1),
    }
}

async fn run_writes(pool: &Pool, kind: Rows, write: Write, batch: u64, t0: OffsetDateTime) -> anyhow::Result<()> {
    let lane = |lane: u64| async move {
        let mut start = lane * batch;
        let instance = format!("profile-{lane}");
        let mut lsn = 0u64;
        while start < ROWS {
            let rows: Vec<LocationUpdate> = (start..(start + batch).min(ROWS)).map(|n| row(kind, n, t0)).collect();
            lsn += 1;
            let checkpoints = [ingest_gateway::db::positions::Checkpoint {
                slot: 0,
                lsn,
                updates_done: None,
            }];
            match write {
                Write::Gateway { keep_latest } => {
                    let positions = LogPositions {
                        instance: &instance,
                        checkpoints: &checkpoints,
                    };
                    write_batch(pool, "location", &rows, positions, keep_latest).await?;
                }
                Write::BareCopy => {
                    let mut client = pool.get().await?;
                    let tx = client.transaction().await?;
                    let mut bytes = BytesMut::new();
                    encode_batch(&rows, &mut bytes);
                    let sink = tx
                        .copy_in(
                            "COPY location_updates (device_id, recorded_at, lat, lon, speed_kmh, heading_deg, \
                             accuracy_m, attributes, received_at) FROM STDIN (FORMAT binary)",
                        )
                        .await?;
                    let mut sink = std::pin::pin!(sink);
                    sink.send(bytes.freeze()).await?;
                    sink.finish().await?;
                    tx.commit().await?;
                }
            }
            start += WRITERS as u64 * batch;
        }
        anyhow::Ok(())
    };
    let (a, b) = tokio::join!(lane(0), lane(1));
    a.and(b)
}

/// Runs the profile and prints it.
pub fn run() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    eprintln!("ingest-bench --pg-profile: starting PostgreSQL with pg_stat_statements");
    let mut pg = EmbeddedPostgres::start_ephemeral_crash_safe().context("could not start PostgreSQL")?;
    let port = pg.port();
    pg.restart_with(
        port,
        &[
            "shared_preload_libraries=pg_stat_statements",
            "pg_stat_statements.track=all",
            "pg_stat_statements.track_utility=on",
        ],
    )?;
    Admin::connect(&pg.connection_string("postgres"))?.execute("CREATE DATABASE profile")?;
    let tls = DatabaseTls::off();
    let config = pg.config("profile");
    let now = OffsetDateTime::now_utc();
    let policy = PartitionPolicy {
        interval: Duration::from_secs(86_400),
        behind: Duration::from_secs(86_400),
        ahead: Duration::from_secs(86_400),
        retention: None,
    };
    let pool = runtime.block_on(async {
        migrate::run(&config, &tls).await?;
        let (mut client, connection) = tls.connect(&config).await?;
        let driver = tokio::spawn(connection);
        partitions::maintain_all(&mut client, &policy, now).await?;
        drop(client);
        let _ = driver.await;
        anyhow::Ok(pool::build(config.clone(), &tls, WRITERS)?)
    })?;
    let admin = Admin::connect(&pg.connection_string("profile"))?;
    admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")?;
    let t0 = now - time::Duration::minutes(30);

    let workloads: [(&str, Rows, Write, u64); 8] = [
        (
            "bare COPY, unique devices, 1000/batch",
            Rows::Unique,
            Write::BareCopy,
            1000,
        ),
        (
            "gateway, unique devices, 1000/batch",
            Rows::Unique,
            Write::Gateway { keep_latest: true },
            1000,
        ),
        (
            "gateway without device_positions, unique, 1000/batch",
            Rows::Unique,
            Write::Gateway { keep_latest: false },
            1000,
        ),
        (
            "gateway, fleet of 5000, 1000/batch",
            Rows::Fleet,
            Write::Gateway { keep_latest: true },
            1000,
        ),
        ("bare COPY, unique devices, 50/batch", Rows::Unique, Write::BareCopy, 50),
        (
            "gateway, unique devices, 50/batch",
            Rows::Unique,
            Write::Gateway { keep_latest: true },
            50,
        ),
        (
            "gateway, unique devices, 200/batch",
            Rows::Unique,
            Write::Gateway { keep_latest: true },
            200,
        ),
        (
            "gateway without device_positions, unique, 50/batch",
            Rows::Unique,
            Write::Gateway { keep_latest: false },
            50,
        ),
    ];
    // Then the two 1000-row workloads again without the device-first index, for what that index costs.
    let runs = workloads.iter().map(|w| (w.0.to_owned(), w.1, w.2, w.3, true)).chain(
        workloads[..2]
            .iter()
            .map(|w| (format!("{}, without the device-first index", w.0), w.1, w.2, w.3, false)),
    );
    for (name, kind, write, batch, history_index) in runs {
        if !history_index {
            admin.execute(
                "DO $$ DECLARE i text; BEGIN FOR i IN SELECT indexrelid::regclass::text FROM pg_index x \
                   JOIN pg_inherits h ON h.inhrelid = x.indrelid \
                  WHERE h.inhparent = 'location_updates'::regclass AND NOT x.indisunique LOOP \
                   EXECUTE 'DROP INDEX ' || i; END LOOP; END $$",
            )?;
        }
        admin.execute(
            "TRUNCATE location_updates, device_positions, ingest_wal_progress; CHECKPOINT; \
             SELECT pg_stat_statements_reset()",
        )?;
        let before = CpuSnapshot::take(pg.pid());
        let started = Instant::now();
        runtime.block_on(run_writes(&pool, kind, write, batch, t0))?;
        let secs = started.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(200));
        let cpu = before.tree_secs_since(&CpuSnapshot::take(pg.pid()));
        let rows = admin.count_rows("location_updates")?;
        println!(
            "\n### {name}\n{rows} rows, {:.0} rows/s, PostgreSQL CPU {:.2} µs/row",
            rows as f64 / secs,
            cpu * 1e6 / rows as f64
        );
        let statements = runtime_query(
            &admin,
            "SELECT calls, total_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 90) \
               FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%' \
              ORDER BY total_exec_time DESC LIMIT 8",
        )?;
        println!("| statement | calls | exec µs/row |\n|---|---:|---:|");
        for (calls, ms, query) in statements {
            println!("| `{query}` | {calls} | {:.2} |", ms * 1e3 / rows as f64);
        }
    }
    track_queries(&admin)
}

/// One device's track at 5,000,000 fixes today from 5,000 devices: the query over the last hour, since midnight
/// and over 7 days, with the current partition's device-first index and without it (as it was before partitions
/// got it when made), each at its fastest of five runs (`EXPLAIN ANALYZE`'s execution time).
fn track_queries(admin: &Admin) -> anyhow::Result<()> {
    eprintln!("ingest-bench --pg-profile: filling today with 5,000,000 fixes of 5,000 devices");
    // The partitions' device-first indexes again, as the gateway makes them (the profile above dropped them).
    admin.execute(
        "DO $$ DECLARE p text; BEGIN FOR p IN SELECT inhrelid::regclass::text FROM pg_inherits \
           WHERE inhparent = 'location_updates'::regclass LOOP \
           EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I (device_id, recorded_at)', p || '_device_id_idx', p); \
         END LOOP; END $$",
    )?;
    admin.execute(
        "TRUNCATE location_updates, device_positions, ingest_wal_progress; \
         INSERT INTO location_updates (device_id, recorded_at, lat, lon, speed_kmh, received_at) \
         SELECT 'truck-' || lpad((n % 5000)::text, 5, '0'), \
                date_trunc('day', now(), 'UTC') + (n / 5000) * ((now() - date_trunc('day', now(), 'UTC')) / 1000), \
                48 + (n % 997) * 1e-3, 2 + (n % 991) * 1e-3, n % 130, now() \
           FROM generate_series(0, 4999999) n",
    )?;
    admin.execute("VACUUM ANALYZE location_updates")?;
    let windows = [
        ("last hour", "now() - interval '1 hour'"),
        ("since midnight", "date_trunc('day', now(), 'UTC')"),
        ("7 days", "now() - interval '7 days'"),
    ];
    let time_of = |window: &str| -> anyhow::Result<(f64, String)> {
        let mut best = f64::MAX;
        let mut plan = String::new();
        for device in [
            "truck-00077",
            "truck-01234",
            "truck-04321",
            "truck-02500",
            "truck-00001",
        ] {
            let lines = admin.rows(
                &format!(
                    "EXPLAIN ANALYZE SELECT * FROM location_updates \
                      WHERE device_id = '{device}' AND recorded_at > {window} ORDER BY recorded_at"
                ),
                |row| Ok(row.try_get::<_, String>(0)?),
            )?;
            let ms = lines
                .iter()
                .find_map(|l| {
                    l.strip_prefix("Execution Time: ")?
                        .strip_suffix(" ms")?
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or(f64::MAX);
            if ms < best {
                best = ms;
                plan = scans(&lines).join(", ");
            }
        }
        Ok((best, plan))
    };
    println!("\n### One device's track, 5,000,000 fixes today from 5,000 devices\n");
    println!("| window | current partition | ms (fastest of 5 devices) | how the current partition is read |");
    println!("|---|---|---:|---|");
    for with_index in [true, false] {
        if !with_index {
            admin.execute(
                "DO $$ DECLARE i text; BEGIN FOR i IN SELECT indexrelid::regclass::text FROM pg_index x \
                   JOIN pg_inherits h ON h.inhrelid = x.indrelid \
                  WHERE h.inhparent = 'location_updates'::regclass AND NOT x.indisunique LOOP \
                   EXECUTE 'DROP INDEX ' || i; END LOOP; END $$",
            )?;
        }
        for (name, window) in windows {
            let (ms, plan) = time_of(window)?;
            println!(
                "| {name} | {} | {ms:.2} | {plan} |",
                if with_index {
                    "with the device-first index"
                } else {
                    "time-first key only"
                }
            );
        }
    }
    Ok(())
}

/// The scan nodes of an `EXPLAIN ANALYZE` that read rows (of the partitions that hold any), without their costs.
fn scans(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains("Scan") && !l.contains("Bitmap Heap Scan") && !l.contains("actual time=0.000..0.000"))
        .filter(|l| !l.contains(" rows=0 loops"))
        .map(|l| {
            let l = l.trim_start_matches([' ', '-', '>']);
            l.split("  (").next().unwrap_or(l).to_owned()
        })
        .collect()
}

fn runtime_query(admin: &Admin, sql: &str) -> anyhow::Result<Vec<(i64, f64, String)>> {
    admin.rows(sql, |row| {
        Ok((
            row.try_get::<_, i64>(0)?,
            row.try_get::<_, f64>(1)?,
            row.try_get::<_, String>(2)?,
        ))
    })
}
