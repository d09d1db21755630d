//! The real binary under real signals: SIGTERM under load writes every accepted update and exits 0; with no
//! `DATABASE_URL` it runs (and stops) its own PostgreSQL.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ingest_gateway::db::{EmbeddedPostgres, PostgresOptions};

use crate::helpers::{
    connection_string, eventually, fresh_database, location_array, location_json, post_location, shared_cluster, Db,
    GatewayProcess, Ledger,
};

#[test]
fn sigterm_under_load_writes_every_accepted_update_and_exits_0() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let gateway = GatewayProcess::start(&[("DATABASE_URL", connection_string(&cluster.config(&name)))]);
    let running = Arc::new(AtomicBool::new(true));
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..4)
        .map(|t| {
            let (address, running, acknowledged) = (gateway.address.clone(), running.clone(), acknowledged.clone());
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
                        Some(202) => {
                            acknowledged.fetch_add(ids.len(), Ordering::Relaxed);
                            ledger.acknowledged.extend(ids)
                        }
                        Some(503) | None => ledger.refused.extend(ids),
                        Some(other) => ledger.other_statuses.push(other),
                    }
                    i += 1;
                }
                ledger
            })
        })
        .collect();

    // The stop comes in the middle of the load, once a good part of it is acknowledged.
    eventually("500 updates are acknowledged", Duration::from_secs(120), || {
        acknowledged.load(Ordering::Relaxed) >= 500
    });
    let status = gateway.terminate();
    running.store(false, Ordering::Relaxed);
    let mut ledger = Ledger::default();
    for t in load {
        ledger.merge(t.join().unwrap());
    }

    assert!(status.success(), "exit status {status}");
    assert!(ledger.other_statuses.is_empty(), "{:?}", ledger.other_statuses);
    assert!(
        ledger.acknowledged.len() >= 500,
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

    let mut gateway = GatewayProcess::start(&envs);
    assert_eq!(post_location(&gateway.address, &location_json("embedded-1")), Some(202));
    gateway.signal(libc::SIGINT);
    assert!(gateway.wait(Duration::from_secs(120)).success());
    let pg_data = data_dir.path().join("postgres");
    assert!(
        !pg_data.join("postmaster.pid").exists(),
        "the embedded PostgreSQL stopped with the gateway"
    );

    // A second start reuses the cluster: the first row is still there.
    let gateway = GatewayProcess::start(&envs);
    assert_eq!(post_location(&gateway.address, &location_json("embedded-2")), Some(202));
    assert!(gateway.terminate().success());

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
