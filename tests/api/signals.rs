//! The real binary under real signals: SIGTERM under load writes every accepted update and exits 0; with no
//! `DATABASE_URL` it runs (and stops) its own PostgreSQL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ingest_gateway::db::{EmbeddedPostgres, PostgresOptions};

use crate::helpers::{
    connection_string, fresh_database, location_array, location_json, post_location, shared_cluster, signal,
    start_gateway, Db, Ledger,
};

#[test]
fn sigterm_under_load_writes_every_accepted_update_and_exits_0() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let (mut child, address) = start_gateway(&[("DATABASE_URL", connection_string(&cluster.config(&name)))]);
    let running = Arc::new(AtomicBool::new(true));
    let load: Vec<_> = (0..4)
        .map(|t| {
            let (address, running) = (address.clone(), running.clone());
            std::thread::spawn(move || {
                let mut ledger = Ledger::default();
                let mut i = 0;
                while running.load(Ordering::Relaxed) {
                    let prefix = format!("term-{t}-{i}");
                    let (body, ids): (String, Vec<String>) = if i % 3 == 0 {
                        (
                            location_array(&prefix, 50),
                            (0..50).map(|k| format!("{prefix}-{k}")).collect(),
                        )
                    } else {
                        (location_json(&prefix), vec![prefix.clone()])
                    };
                    match post_location(&address, &body) {
                        Some(202) => ledger.acknowledged.extend(ids),
                        Some(503) | None => ledger.refused.extend(ids),
                        Some(other) => ledger.other_statuses.push(other),
                    }
                    i += 1;
                }
                ledger
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, libc::SIGTERM);
    let status = child.wait().unwrap();
    running.store(false, Ordering::Relaxed);
    let mut ledger = Ledger::default();
    for t in load {
        ledger.merge(t.join().unwrap());
    }

    assert!(status.success(), "exit status {status}");
    assert!(ledger.other_statuses.is_empty(), "{:?}", ledger.other_statuses);
    assert!(
        ledger.acknowledged.len() > 50,
        "the load ran: {}",
        ledger.acknowledged.len()
    );
    let db = Db::connect(cluster.config(&name));
    let stored: std::collections::BTreeSet<String> = db.device_ids().into_iter().map(|(id, _)| id).collect();
    let missing: Vec<_> = ledger.acknowledged.difference(&stored).take(10).collect();
    assert!(
        missing.is_empty(),
        "acknowledged updates missing after SIGTERM: {missing:?}"
    );
    assert_eq!(db.count("location_updates") as usize, ledger.acknowledged.len());
}

#[test]
fn with_no_database_url_the_gateway_runs_its_own_postgres_and_keeps_the_data() {
    let data_dir = tempfile::tempdir().unwrap();
    let envs = [("INGEST_DATA_DIR", data_dir.path().display().to_string())];

    let (mut child, address) = start_gateway(&envs);
    assert_eq!(post_location(&address, &location_json("embedded-1")), Some(202));
    signal(&child, libc::SIGINT);
    assert!(child.wait().unwrap().success());
    let pg_data = data_dir.path().join("postgres");
    assert!(
        !pg_data.join("postmaster.pid").exists(),
        "the embedded PostgreSQL stopped with the gateway"
    );

    // A second start reuses the cluster: the first row is still there.
    let (mut child, address) = start_gateway(&envs);
    assert_eq!(post_location(&address, &location_json("embedded-2")), Some(202));
    signal(&child, libc::SIGTERM);
    assert!(child.wait().unwrap().success());

    let server = EmbeddedPostgres::start(&PostgresOptions {
        data_dir: pg_data,
        ephemeral: false,
    })
    .unwrap();
    let db = Db::connect(server.config("postgres"));
    let mut ids: Vec<String> = db.device_ids().into_iter().map(|(id, _)| id).collect();
    ids.sort();
    assert_eq!(ids, ["embedded-1", "embedded-2"]);
}
