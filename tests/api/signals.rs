//! The real binary under real signals: SIGTERM under load writes every accepted update and exits 0; with no
//! `DATABASE_URL` it runs (and stops) its own PostgreSQL.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use ingest_gateway::db::{EmbeddedPostgres, PostgresOptions};

use crate::helpers::{connection_string, fresh_database, location_array, location_json, shared_cluster, Db, Ledger};

const LOCATION: &str = "/api/v1/location/update";

/// Starts the binary with `envs`; returns it and its HTTP address, read from its JSON log.
fn start_gateway(envs: &[(&str, String)]) -> (Child, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ingest-gateway"));
    command
        .arg("serve")
        .env_remove("DATABASE_URL")
        .env("INGEST_LISTEN", "127.0.0.1:0")
        .env("INGEST_LOG_FORMAT", "json")
        .env("INGEST_FLUSH_INTERVAL", "200ms")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("start the gateway binary");
    let stderr = child.stderr.take().unwrap();
    let (port_tx, port_rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keeps reading to the end so that the gateway never blocks on a full pipe.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(port) = event["port"].as_u64() {
                    let _ = port_tx.send(port);
                }
            }
            if std::env::var_os("RUST_LOG").is_some() {
                eprintln!("gateway: {line}");
            }
        }
    });
    let port = port_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the gateway logs its port");
    (child, format!("http://127.0.0.1:{port}"))
}

fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: the pid is our own child's, not yet waited for.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

fn post(address: &str, body: &str) -> Option<u16> {
    match ureq::post(&format!("{address}{LOCATION}"))
        .set("Content-Type", "application/json")
        .send_string(body)
    {
        Ok(r) => Some(r.status()),
        Err(ureq::Error::Status(code, _)) => Some(code),
        // Refused or reset once the gateway has closed its socket: not acknowledged.
        Err(_) => None,
    }
}

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
                    match post(&address, &body) {
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
    assert_eq!(post(&address, &location_json("embedded-1")), Some(202));
    signal(&child, libc::SIGINT);
    assert!(child.wait().unwrap().success());
    let pg_data = data_dir.path().join("postgres");
    assert!(
        !pg_data.join("postmaster.pid").exists(),
        "the embedded PostgreSQL stopped with the gateway"
    );

    // A second start reuses the cluster: the first row is still there.
    let (mut child, address) = start_gateway(&envs);
    assert_eq!(post(&address, &location_json("embedded-2")), Some(202));
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
