//! A full queue answers 503 with Retry-After at once; an outage of the database loses nothing that got a 202.

use std::time::Duration;

use ingest_gateway::config::Durability;
use ingest_gateway::db::EmbeddedPostgres;

use crate::helpers::{eventually, fresh_database, location_json, spawn_app_on, Ledger, Load};

const LOCATION: &str = "/api/v1/location/update";

#[test]
fn in_memory_mode_a_full_queue_answers_503_with_retry_after_and_every_202_lands_once_the_database_is_back() {
    let mut cluster = EmbeddedPostgres::start_ephemeral().unwrap();
    let name = fresh_database(&cluster);
    let mut app = spawn_app_on(cluster.config(&name), |s| {
        s.pipeline.queue_capacity = 100;
        s.pipeline.batch_size = 10;
        s.pipeline.writers = 1;
        s.storage.durability = Durability::Memory;
    });
    cluster.stop();

    let mut ledger = Ledger::default();
    for i in 0..250 {
        let id = format!("q-{i}");
        let answer = app.post_json(LOCATION, &location_json(&id));
        match answer.status {
            202 => ledger.acknowledged.insert(id),
            503 => {
                assert_eq!(answer.retry_after.as_deref(), Some("1"));
                assert_eq!(answer.json()["error"], "overloaded");
                ledger.refused.insert(id)
            }
            other => panic!("unexpected {other}: {}", answer.body),
        };
    }
    assert_eq!(ledger.acknowledged.len(), 100, "the queue holds exactly its capacity");
    assert_eq!(ledger.refused.len(), 150);
    let stats = app.get("/stats").json();
    assert_eq!(stats["streams"]["location"]["rejected_by_reason"]["overloaded"], 150);
    assert_eq!(stats["streams"]["location"]["queue_depth"], 100);
    assert!(stats["streams"]["location"]["batch_failures"].as_u64().unwrap() >= 1);
    let ready = app.get("/readyz");
    assert_eq!(ready.status, 503, "{}", ready.body);

    cluster.restart().unwrap();
    app.db = crate::helpers::Db::connect(cluster.config(&name));
    eventually("the queue drains", Duration::from_secs(30), || {
        app.get("/stats").json()["streams"]["location"]["queue_depth"] == 0
    });
    // Readiness follows a database check made every second.
    eventually("the gateway is ready again", Duration::from_secs(10), || {
        app.get("/readyz").status == 200
    });
    assert!(app.stop().is_clean());

    let stored: Vec<(String, i64)> = app.db.device_ids();
    let stored_ids: std::collections::BTreeSet<String> = stored.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(
        stored_ids, ledger.acknowledged,
        "exactly the acknowledged updates are stored"
    );
    assert!(stored.iter().all(|(_, n)| *n == 1));
}

#[test]
fn stopping_the_database_under_load_loses_no_acknowledged_update() {
    let mut cluster = EmbeddedPostgres::start_ephemeral().unwrap();
    let name = fresh_database(&cluster);
    let mut app = spawn_app_on(cluster.config(&name), |s| {
        s.pipeline.queue_capacity = 5_000;
        s.pipeline.batch_size = 100;
        s.pipeline.writers = 2;
    });
    let load = Load::start(&app.address, 3, "load");
    // The outage comes under load, lasts while more is acknowledged (into the log alone), and the load goes on
    // after it: each phase ends on updates acknowledged, however slow the machine.
    load.wait_for_acknowledged(200);
    cluster.stop();
    load.wait_for_acknowledged(200);
    cluster.restart().unwrap();
    load.wait_for_acknowledged(200);
    let ledger = load.stop();
    let outcome = app.stop();
    app.db = crate::helpers::Db::connect(cluster.config(&name));

    assert!(outcome.is_clean(), "{outcome:?}");
    assert!(ledger.other_statuses.is_empty(), "{:?}", ledger.other_statuses);
    assert!(
        ledger.unknown.is_empty(),
        "every request was answered: {:?}",
        ledger.unknown
    );
    assert!(
        ledger.acknowledged.len() >= 600,
        "the load ran: {} acknowledged",
        ledger.acknowledged.len()
    );
    let stored = app.db.device_ids();
    let stored_ids: std::collections::BTreeSet<String> = stored.iter().map(|(id, _)| id.clone()).collect();
    let missing: Vec<_> = ledger.acknowledged.difference(&stored_ids).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged updates are missing: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let unexpected: Vec<_> = stored_ids.difference(&ledger.acknowledged).collect();
    assert!(unexpected.is_empty(), "refused updates were stored: {unexpected:?}");
    eprintln!(
        "outage under load: {} acknowledged, {} refused with 503, {} stored, {} stored twice",
        ledger.acknowledged.len(),
        ledger.refused.len(),
        stored.len(),
        stored.iter().filter(|(_, n)| *n > 1).count()
    );
}

#[test]
fn in_memory_mode_the_queue_is_bounded_by_bytes_too_so_large_updates_cannot_fill_memory() {
    let mut cluster = EmbeddedPostgres::start_ephemeral().unwrap();
    let name = fresh_database(&cluster);
    let app = spawn_app_on(cluster.config(&name), |s| {
        s.pipeline.queue_capacity = 100_000;
        s.pipeline.queue_max_bytes = 256 * 1024;
        s.pipeline.writers = 1;
        s.storage.durability = Durability::Memory;
    });
    cluster.stop();
    // About 4 KiB of attributes each: far fewer than the capacity in updates fit in 256 KiB.
    let padding = "x".repeat(4000);
    let mut taken = 0;
    for i in 0..200 {
        let mut update = location_json(&format!("big-{i}"));
        update.pop();
        update.push_str(&format!(r#","note":"{padding}"}}"#));
        match app.post_json(LOCATION, &update).status {
            202 => taken += 1,
            503 => break,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        (40..100).contains(&taken),
        "about 256 KiB of updates are taken: {taken}"
    );
    let stats = app.get("/stats").json();
    assert_eq!(stats["streams"]["location"]["queue_depth"], taken);
    cluster.restart().unwrap();
}
