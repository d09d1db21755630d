//! Time partitions: made ahead and behind so that updates at both edges of the allowed window land; an upgrade
//! from the single tables keeps every row; old partitions dropped past the retention (and a retention shorter
//! than the allowed age refused); the users' queries read indexes, never a whole big partition.

use std::time::Duration;

use ingest_gateway::config::Settings;
use ingest_gateway::db::partitions::{self, TABLES};
use ingest_gateway::db::{migrate, DatabaseTls};
use ingest_gateway::startup::Application;
use time::OffsetDateTime;

use crate::helpers::{eventually, fresh_database, shared_cluster, spawn_app_on, Db};

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap()
}

fn fix(device: &str, at: OffsetDateTime) -> String {
    format!(
        r#"{{"device_id":"{device}","recorded_at":"{}","lat":48.85,"lon":2.35}}"#,
        rfc3339(at)
    )
}

/// The partitions of `table` as (name, from, to) in Unix seconds.
fn partitions_of(config: &tokio_postgres::Config, table: &str) -> Vec<(String, Option<i64>, Option<i64>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let table = TABLES.iter().find(|t| t.table == table).unwrap();
    runtime
        .block_on(async {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            partitions::list(&client, table).await
        })
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.from, p.to))
        .collect()
}

fn covered(parts: &[(String, Option<i64>, Option<i64>)], at: i64) -> bool {
    parts
        .iter()
        .any(|(_, from, to)| from.unwrap_or(i64::MIN) <= at && at < to.unwrap_or(i64::MAX))
}

#[test]
fn partitions_cover_the_allowed_window_and_updates_at_its_edges_land() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let app = spawn_app_on(cluster.config(&name), |s| {
        s.limits.max_age = Duration::from_secs(3 * 86_400);
        s.limits.max_future_skew = Duration::from_secs(3600);
    });
    let now = OffsetDateTime::now_utc();
    for table in ["location_updates", "poll_results"] {
        let parts = partitions_of(&cluster.config(&name), table);
        let oldest = (now - time::Duration::days(3)).unix_timestamp();
        let newest = (now + time::Duration::hours(1)).unix_timestamp();
        assert!(covered(&parts, oldest), "{table}: nothing covers 3 days ago: {parts:?}");
        assert!(
            covered(&parts, newest),
            "{table}: nothing covers the skew ahead: {parts:?}"
        );
        assert!(parts.iter().all(|(_, f, t)| f.is_some() && t.is_some()));
    }

    let oldest = now - time::Duration::days(3) + time::Duration::minutes(1);
    let newest = now + time::Duration::minutes(59);
    let body = format!("[{},{}]", fix("edge-old", oldest), fix("edge-new", newest));
    assert_eq!(app.post_json("/api/v1/location/update", &body).status, 202);
    let poll = format!(
        r#"[{{"project_id":7,"polled_at":"{}","success":true}},{{"project_id":7,"polled_at":"{}","success":false}}]"#,
        rfc3339(oldest),
        rfc3339(newest)
    );
    assert_eq!(app.post_json("/api/v1/poll/update", &poll).status, 202);
    eventually("both edges stored", Duration::from_secs(20), || {
        app.db.count("location_updates") == 2 && app.db.count("poll_results") == 2
    });
    assert_eq!(app.db.count("dead_letters"), 0);
}

#[test]
fn an_upgrade_from_the_single_tables_keeps_every_row_and_still_absorbs_retries() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let config = cluster.config(&name);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(migrate::run_to(&config, &DatabaseTls::off(), Some(5)))
        .unwrap();
    let db = Db::connect(config.clone());
    // A year of history, some of it a few minutes ahead (clock skew), written by the old release.
    db.execute(
        "INSERT INTO location_updates (device_id, recorded_at, lat, lon, received_at) \
         SELECT 'old-' || (n % 50), now() - interval '365 days' + n * interval '1 hour' + interval '4 minutes', \
                1, 2, now() FROM generate_series(1, 8770) n",
    );
    db.execute(
        "INSERT INTO poll_results (project_id, polled_at, success, received_at) \
         SELECT n % 5, now() - n * interval '1 hour', true, now() FROM generate_series(1, 1000) n",
    );
    let (before, poll_before) = (db.count("location_updates"), db.count("poll_results"));
    let sum_before =
        db.query("SELECT sum(extract(epoch FROM recorded_at))::float8 FROM location_updates")[0].get::<_, f64>(0);

    let app = spawn_app_on(config, |_| {});
    assert_eq!(app.db.count("location_updates"), before);
    assert_eq!(app.db.count("poll_results"), poll_before);
    let sum_after = app
        .db
        .query("SELECT sum(extract(epoch FROM recorded_at))::float8 FROM location_updates")[0]
        .get::<_, f64>(0);
    assert_eq!(sum_before, sum_after);
    let legacy = partitions_of(&cluster.config(&name), "location_updates");
    assert!(
        legacy
            .iter()
            .any(|(n, f, _)| n == "location_updates_legacy" && f.is_none()),
        "the old table is a partition: {legacy:?}"
    );

    // A retry of a row the old release stored (the same fix: 1, 2) is absorbed; a new row lands after it.
    let stored = app.db.query(
        "SELECT device_id, recorded_at FROM location_updates WHERE recorded_at < now() ORDER BY recorded_at DESC LIMIT 1",
    );
    let (device, at): (String, OffsetDateTime) = (stored[0].get(0), stored[0].get(1));
    let retry = format!(
        r#"{{"device_id":"{device}","recorded_at":"{}","lat":1,"lon":2}}"#,
        rfc3339(at)
    );
    let body = format!("[{retry},{}]", fix("new-1", OffsetDateTime::now_utc()));
    assert_eq!(app.post_json("/api/v1/location/update", &body).status, 202);
    eventually("the new row stored", Duration::from_secs(20), || {
        app.db.count("location_updates") == before + 1
    });
    assert_eq!(app.db.count("dead_letters"), 0);
}

#[test]
fn a_retention_shorter_than_the_allowed_age_is_refused() {
    let mut settings = Settings::defaults();
    settings.limits.max_age = Duration::from_secs(30 * 86_400);
    settings.partitions.retention = Some(Duration::from_secs(7 * 86_400));
    settings.storage.data_dir = tempfile::tempdir().unwrap().keep();
    let error = Application::build(&settings).err().expect("refused");
    let message = format!("{error:#}");
    assert!(message.contains("INGEST_RETENTION"), "{message}");
}

#[test]
fn partitions_past_the_retention_are_dropped_whole_and_counted() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let config = cluster.config(&name);
    // A first run keeps ten days; its oldest rows are older than the next run's retention.
    let mut first = spawn_app_on(config.clone(), |s| s.limits.max_age = Duration::from_secs(10 * 86_400));
    let now = OffsetDateTime::now_utc();
    let body = format!(
        "[{},{}]",
        fix("kept", now - time::Duration::days(1)),
        fix("expired", now - time::Duration::days(8))
    );
    assert_eq!(first.post_json("/api/v1/location/update", &body).status, 202);
    eventually("both stored", Duration::from_secs(20), || {
        first.db.count("location_updates") == 2
    });
    first.stop();
    let before = partitions_of(&config, "location_updates").len();

    let second = spawn_app_on(config.clone(), |s| {
        s.limits.max_age = Duration::from_secs(2 * 86_400);
        s.partitions.retention = Some(Duration::from_secs(3 * 86_400));
    });
    let after = partitions_of(&config, "location_updates");
    let horizon = (OffsetDateTime::now_utc() - time::Duration::days(3)).unix_timestamp();
    assert!(after.len() < before, "{before} partitions before, {after:?} after");
    assert!(after.iter().all(|(_, _, to)| to.unwrap() > horizon), "{after:?}");
    assert_eq!(second.db.device_ids(), [("kept".to_owned(), 1)]);
    let metrics = second.get("/metrics").body;
    let dropped = metrics
        .lines()
        .find(|l| l.starts_with("ingest_partitions_dropped_total{stream=\"location\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(dropped >= 5, "{metrics}");
}

#[test]
fn the_track_of_a_device_and_the_latest_positions_are_read_through_indexes() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let app = spawn_app_on(cluster.config(&name), |s| {
        s.limits.max_age = Duration::from_secs(2 * 86_400)
    });
    // Yesterday's partition (its time is past) and the current hour, 200,000 rows each from 2,000 devices.
    let fill = |start: &str| {
        app.db.execute(&format!(
            "INSERT INTO location_updates (device_id, recorded_at, lat, lon, received_at) \
             SELECT 'truck-' || (n % 2000), {start} + (n / 2000) * interval '5 seconds', 1, 2, now() \
               FROM generate_series(0, 199999) n"
        ))
    };
    fill("date_trunc('day', now(), 'UTC') - interval '1 day'");
    fill("now() - interval '9 minutes'");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = cluster.config(&name).connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        partitions::index_partitions(&client, &TABLES[0]).await.unwrap();
    });
    // As the writers keep it: one row per device.
    app.db.execute(
        "INSERT INTO device_positions (device_id, recorded_at, lat, lon, received_at) \
         SELECT DISTINCT ON (device_id) device_id, recorded_at, lat, lon, received_at FROM location_updates \
          ORDER BY device_id, recorded_at DESC",
    );
    app.db.execute("ANALYZE location_updates");
    app.db.execute("ANALYZE device_positions");

    let plan = |sql: &str| -> String {
        app.db
            .query(&format!("EXPLAIN {sql}"))
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let track_yesterday = plan(
        "SELECT * FROM location_updates WHERE device_id = 'truck-42' \
           AND recorded_at >= date_trunc('day', now(), 'UTC') - interval '1 day' \
           AND recorded_at < date_trunc('day', now(), 'UTC') ORDER BY recorded_at",
    );
    assert!(track_yesterday.contains("device_id_idx"), "{track_yesterday}");
    assert!(!track_yesterday.contains("Seq Scan"), "{track_yesterday}");
    let track_now = plan(
        "SELECT * FROM location_updates WHERE device_id = 'truck-42' \
           AND recorded_at >= now() - interval '5 minutes' AND recorded_at < now() ORDER BY recorded_at",
    );
    assert!(track_now.contains("Index"), "{track_now}");
    assert!(!track_now.contains("Seq Scan"), "{track_now}");
    let latest = plan("SELECT * FROM device_positions WHERE device_id = 'truck-42'");
    assert!(latest.contains("device_positions_pkey"), "{latest}");
}

#[test]
fn two_gateways_keeping_partitions_at_once_make_each_partition_once() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let config = cluster.config(&name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(migrate::run(&config, &DatabaseTls::off())).unwrap();
    let policy = partitions::PartitionPolicy {
        interval: Duration::from_secs(3600),
        behind: Duration::from_secs(86_400),
        ahead: Duration::from_secs(3600),
        retention: None,
    };
    let round = || {
        let config = config.clone();
        async move {
            let (mut client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            partitions::maintain_all(&mut client, &policy, OffsetDateTime::now_utc())
                .await
                .unwrap()
        }
    };
    let (a, b) = runtime.block_on(async { tokio::join!(tokio::spawn(round()), tokio::spawn(round())) });
    let made: usize = a
        .unwrap()
        .iter()
        .chain(b.unwrap().iter())
        .map(|c| c.created.len())
        .sum();
    let total = partitions_of(&config, "location_updates").len() + partitions_of(&config, "poll_results").len();
    assert_eq!(made, total);
}
