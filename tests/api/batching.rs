//! The batching rule in the running gateway: the size trigger, the interval trigger, several writers.

use std::time::Duration;

use crate::helpers::{eventually, location_array, location_json, spawn_app};

const LOCATION: &str = "/api/v1/location/update";

#[test]
fn a_full_batch_is_written_without_waiting_for_the_interval() {
    // With an hour-long interval, only the size trigger can write these rows.
    let app = spawn_app(|s| {
        s.pipeline.batch_size = 50;
        s.pipeline.writers = 1;
        s.pipeline.flush_interval = Duration::from_secs(3600);
    });

    assert_eq!(app.post_json(LOCATION, &location_array("size", 120)).status, 202);

    // The rows are visible at the commit, the counters just after it: wait for both.
    eventually(
        "two full batches are written and counted",
        Duration::from_secs(10),
        || app.db.count("location_updates") == 100 && app.location_stat("batches_written") == 2,
    );
    let stats = app.get("/stats").json();
    assert_eq!(stats["streams"]["location"]["batches_written"], 2);
    assert_eq!(stats["streams"]["location"]["last_batch_rows"], 50);
    assert_eq!(
        stats["streams"]["location"]["queue_depth"], 20,
        "the last 20 wait for the interval"
    );
}

#[test]
fn a_partial_batch_is_written_once_its_oldest_update_has_waited_the_interval() {
    let app = spawn_app(|s| {
        s.pipeline.batch_size = 1000;
        s.pipeline.flush_interval = Duration::from_millis(300);
    });

    assert_eq!(app.post_json(LOCATION, &location_array("interval", 3)).status, 202);

    eventually(
        "the partial batch is written and counted",
        Duration::from_secs(10),
        || app.db.count("location_updates") == 3 && app.location_stat("batches_written") == 1,
    );
    let stats = app.get("/stats").json();
    assert_eq!(stats["streams"]["location"]["batches_written"], 1);
    assert_eq!(stats["streams"]["location"]["last_batch_rows"], 3);
}

#[test]
fn several_writers_share_the_load_and_write_every_update_once() {
    let mut app = spawn_app(|s| {
        s.pipeline.batch_size = 10;
        s.pipeline.writers = 4;
    });
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let address = app.address.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let body = if i % 5 == 0 {
                        location_array(&format!("w{t}-{i}"), 25)
                    } else {
                        format!("[{}]", location_json(&format!("w{t}-{i}")))
                    };
                    let status = ureq::post(&format!("{address}{LOCATION}"))
                        .set("Content-Type", "application/json")
                        .send_string(&body)
                        .map(|r| r.status())
                        .unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(status, 202);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let batches_written = || app.location_stat("batches_written").as_u64().unwrap();
    // Batches of at most 10 rows: 1160 rows are at least 116 batches, counted just after their commits.
    eventually(
        "every update is written and its batch counted",
        Duration::from_secs(20),
        || app.db.count("location_updates") == 1160 && batches_written() >= 116,
    );
    let batches = batches_written();

    assert!(app.stop().is_clean());
    // 4 threads × (10 arrays of 25 + 40 single updates) = 1160.
    assert_eq!(app.db.count("location_updates"), 1160);
    let duplicated: Vec<_> = app.db.device_ids().into_iter().filter(|(_, n)| *n != 1).collect();
    assert!(duplicated.is_empty(), "{duplicated:?}");
    assert!(batches >= 116, "batches of at most 10 rows: {batches}");
}

#[test]
fn a_request_larger_than_a_batch_is_split_across_batches() {
    let mut app = spawn_app(|s| {
        s.pipeline.batch_size = 100;
        s.pipeline.writers = 2;
    });
    assert_eq!(app.post_json(LOCATION, &location_array("split", 1050)).status, 202);
    assert!(app.stop().is_clean());
    assert_eq!(app.db.count("location_updates"), 1050);
}
