//! What the cheaper write must keep: a batch that mixes retries and new updates stores each new one once and no
//! row twice, also when the gateway is killed in the middle of the path that sorts them out; and one device's
//! track reads through an index in every partition, the current one included.

use std::time::Duration;

use time::OffsetDateTime;

use crate::helpers::{
    eventually, fresh_database, gateway_envs, post_location, shared_cluster, spawn_app_on, Db, GatewayProcess,
    OwnDatabase,
};

/// `n` updates of devices `<prefix>-<first>` … at one fixed time, so that sending them again is a retry.
fn fixes(prefix: &str, range: std::ops::Range<usize>, at: OffsetDateTime) -> Vec<String> {
    let at = at
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    range
        .map(|i| format!(r#"{{"device_id":"{prefix}-{i}","recorded_at":"{at}","lat":48.85,"lon":2.35}}"#))
        .collect()
}

/// Retries and new updates interleaved: every other one a retry.
fn mixed(retries: &[String], new: &[String]) -> String {
    let items: Vec<&String> = retries.iter().zip(new).flat_map(|(a, b)| [a, b]).collect();
    format!("[{}]", items.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","))
}

fn assert_each_stored_once(db: &Db, expected: usize) {
    let stored = db.query(
        "SELECT count(*), count(DISTINCT (device_id, recorded_at)), \
                (SELECT count(*) FROM device_positions), (SELECT count(*) FROM dead_letters) \
           FROM location_updates",
    );
    let (rows, keys, positions, letters): (i64, i64, i64, i64) =
        (stored[0].get(0), stored[0].get(1), stored[0].get(2), stored[0].get(3));
    assert_eq!(rows, expected as i64, "every update stored");
    assert_eq!(keys, rows, "no update stored twice");
    assert_eq!(positions, expected as i64, "one latest position per device");
    assert_eq!(letters, 0, "a retry is absorbed, not kept as a conflict");
}

#[test]
fn a_batch_mixing_retries_and_new_updates_stores_each_new_one_once() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let app = spawn_app_on(cluster.config(&name), |s| s.pipeline.batch_size = 10_000);
    let at = OffsetDateTime::now_utc() - time::Duration::minutes(2);
    let first = fixes("mix", 0..300, at);
    let answer = app.post_json("/api/v1/location/update", &format!("[{}]", first.join(",")));
    assert_eq!(answer.status, 202, "{answer:?}");
    eventually("the first updates stored", Duration::from_secs(30), || {
        app.db.count("location_updates") == 300
    });
    // One request, so one batch: the fast path meets a unique violation and the fallback sorts the batch out.
    let new = fixes("mix", 300..600, at);
    let answer = app.post_json("/api/v1/location/update", &mixed(&first, &new));
    assert_eq!(answer.status, 202, "{answer:?}");
    eventually("the new updates stored", Duration::from_secs(30), || {
        app.db.count("location_updates") >= 600
    });
    assert_each_stored_once(&app.db, 600);
    let body = app.get("/metrics").body;
    assert!(
        body.lines()
            .any(|l| l == r#"ingest_updates_duplicate_total{stream="location"} 300"#),
        "the retries are counted as duplicates:\n{}",
        body.lines()
            .filter(|l| l.contains("duplicate"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn sigkill_in_the_middle_of_the_fallback_stores_each_update_once() {
    let db = OwnDatabase::start();
    let envs = gateway_envs(&db.cluster, &db.name, &db.data_dir);
    let mut gateway = GatewayProcess::start(&envs);
    let check = Db::connect(db.cluster.config(&db.name));
    let at = OffsetDateTime::now_utc() - time::Duration::minutes(2);
    let first = fixes("kill", 0..200, at);
    assert_eq!(
        post_location(&gateway.address, &format!("[{}]", first.join(","))),
        Some(202)
    );
    eventually("the first updates stored", Duration::from_secs(30), || {
        check.count("location_updates") == 200
    });

    // The fallback keeps conflicts in dead_letters after it has moved the new rows in; holding a lock on that
    // table stops it there, its new rows written but not committed.
    let blocker = Db::connect(db.cluster.config(&db.name));
    blocker.execute("BEGIN; LOCK TABLE dead_letters IN SHARE MODE");
    let new = fixes("kill", 200..400, at);
    assert_eq!(post_location(&gateway.address, &mixed(&first, &new)), Some(202));
    eventually("the fallback waits on the lock", Duration::from_secs(30), || {
        let waiting: i64 = check.query(
            "SELECT count(*) FROM pg_stat_activity \
              WHERE wait_event_type = 'Lock' AND query LIKE 'WITH conflicting%'",
        )[0]
        .get(0);
        waiting == 1
    });
    gateway.kill();
    blocker.execute("ROLLBACK");
    assert_eq!(
        check.count("location_updates"),
        200,
        "nothing of the killed batch is committed"
    );

    // The log replays the acknowledged request: its retries are absorbed again, its new updates stored once.
    let gateway = GatewayProcess::start(&envs);
    eventually("the replay stores the new updates", Duration::from_secs(30), || {
        check.count("location_updates") >= 400
    });
    assert!(gateway.terminate().success(), "the gateway stops cleanly");
    assert_each_stored_once(&check, 400);
}

#[test]
fn a_track_reads_through_an_index_in_every_partition_the_current_one_included() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let app = spawn_app_on(cluster.config(&name), |s| {
        s.limits.max_age = Duration::from_secs(8 * 86_400)
    });
    // Today's partition as the writers fill it: 200,000 fixes of 2,000 devices since midnight.
    app.db.execute(
        "INSERT INTO location_updates (device_id, recorded_at, lat, lon, received_at) \
         SELECT 'truck-' || (n % 2000), \
                date_trunc('day', now(), 'UTC') \
                  + (n / 2000) * (least(now() - date_trunc('day', now(), 'UTC'), interval '23 hours') / 100), \
                1, 2, now() \
           FROM generate_series(0, 199999) n",
    );
    app.db.execute("ANALYZE location_updates");
    let current = format!(
        "location_updates_{}",
        app.db.query("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')")[0].get::<_, String>(0)
    );
    let plan = |window: &str| -> String {
        app.db
            .query(&format!(
                "EXPLAIN SELECT * FROM location_updates WHERE device_id = 'truck-42' AND recorded_at > {window} \
                 ORDER BY recorded_at"
            ))
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for window in [
        "now() - interval '1 hour'",
        "date_trunc('day', now(), 'UTC')",
        "now() - interval '7 days'",
    ] {
        let plan = plan(window);
        // Partitions ahead of now are empty, and an empty table is read at no cost whatever the plan.
        assert!(!plan.contains(&format!("Seq Scan on {current}_")), "{window}:\n{plan}");
        assert!(
            plan.contains(&format!("Index Scan using {current}_"))
                || plan.contains(&format!("Bitmap Index Scan on {current}_")),
            "the current partition {current} is read by an index ({window}):\n{plan}"
        );
        if !window.contains("hour") {
            // Since midnight, the time-first key would read every device's fixes of the day.
            assert!(
                plan.lines()
                    .any(|l| l.contains(&format!("{current}_")) && l.contains("_device_id_idx")),
                "{window}:\n{plan}"
            );
        }
    }
}
