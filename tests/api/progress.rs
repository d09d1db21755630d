//! Long work shows progress: a restart with a large log left behind is not ready ("replaying") until the log is
//! read back and logs how the replay goes; a stop that waits for the database logs how the writing goes.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::gateway_envs;
use crate::helpers::{eventually, location_array, post_location, Db, GatewayProcess, OwnDatabase};

/// Updates per request, and requests, of the log left behind: enough that reading it back through a small
/// queue takes a while.
const PER_REQUEST: usize = 2_000;
const REQUESTS: usize = 100;

/// `GET /readyz`: its status and body.
fn readyz(address: &str) -> (u16, Value) {
    let response = match ureq::get(&format!("{address}/readyz")).call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("/readyz did not answer: {e}"),
    };
    let status = response.status();
    let body = response.into_string().expect("read /readyz");
    (status, serde_json::from_str(&body).expect("/readyz answers JSON"))
}

fn says_replaying(body: &Value) -> bool {
    body["reasons"]
        .as_array()
        .is_some_and(|reasons| reasons.iter().any(|r| r == "replaying"))
}

/// Sends `requests` arrays of `per_request` location updates, each of which must be accepted; returns how many.
fn send_accepted(address: &str, tag: &str, requests: usize, per_request: usize) -> usize {
    for i in 0..requests {
        let body = location_array(&format!("{tag}-{i}"), per_request);
        assert_eq!(post_location(address, &body), Some(202), "request {i} accepted");
    }
    requests * per_request
}

#[test]
fn a_restart_with_a_large_log_is_not_ready_until_the_replay_is_done_and_logs_its_progress() {
    // Updates taken while the database is away are in the log only; the kill leaves all of them there.
    let OwnDatabase {
        mut cluster,
        name,
        data_dir,
    } = OwnDatabase::start();
    let envs = gateway_envs(&cluster, &name, &data_dir);
    let mut gateway = GatewayProcess::start(&envs);
    cluster.stop();
    let sent = send_accepted(&gateway.address, "replay", REQUESTS, PER_REQUEST);
    gateway.kill();
    cluster.restart().unwrap();

    // A small queue and small batches make the replay go at the writers' pace, one batch of 100 at a time.
    let mut envs = envs.to_vec();
    envs.extend([
        ("INGEST_QUEUE_CAPACITY", "500".to_owned()),
        ("INGEST_BATCH_SIZE", "100".to_owned()),
        ("INGEST_PROGRESS_INTERVAL", "200ms".to_owned()),
    ]);
    let gateway = GatewayProcess::start(&envs);
    let address = gateway.address.clone();
    let log = gateway.log().clone();
    let mut answers = Vec::new();
    eventually("the gateway is ready", Duration::from_secs(180), || {
        let (status, body) = readyz(&address);
        answers.push((status, body));
        status == 200
    });
    let (status, body) = &answers[0];
    assert_eq!(*status, 503, "not ready while the log is read back: {body}");
    assert!(says_replaying(body), "{body}");
    let replayed = answers.iter().position(|(_, body)| !says_replaying(body)).unwrap();
    assert!(
        answers[replayed..].iter().all(|(_, body)| !says_replaying(body)),
        "once replayed, it never says replaying again"
    );

    let db = Db::connect(cluster.config(&name));
    eventually("every update of the log is written", Duration::from_secs(120), || {
        db.count("location_updates") == sent as i64
    });
    let metrics = ureq::get(&format!("{address}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"ingest_wal_replay_remaining_bytes{stream="location"} 0"#),
        "the replay gauge is back to 0"
    );
    assert!(gateway.terminate().success());

    let progress: Vec<Value> = log
        .with_message("replaying the write-ahead log")
        .into_iter()
        .filter(|l| l["stream"] == "location")
        .collect();
    for line in &progress {
        eprintln!("{line}");
    }
    assert!(progress.len() >= 2, "the replay logged its progress more than once");
    let total = progress[0]["total_bytes"].as_u64().unwrap();
    assert!(total > 0);
    assert!(progress
        .iter()
        .all(|l| l["total_bytes"] == total && l["percent"].is_f64()));
    assert!(
        progress.iter().any(|l| l["done_bytes"].as_u64().unwrap() < total),
        "a line was logged before the end"
    );
    assert!(
        progress
            .iter()
            .any(|l| l["eta_s"].is_u64() && l["bytes_per_s"].as_u64() > Some(0)),
        "lines give a rate and the time left"
    );
    let done = log.with_message("write-ahead log replayed");
    let location = done
        .iter()
        .find(|l| l["stream"] == "location")
        .expect("the location stream logs the end of its replay");
    assert_eq!(location["updates"], sent as u64, "{location}");
    assert_eq!(location["bytes"], total);
}

#[test]
fn a_stop_that_waits_for_the_database_logs_its_progress_then_writes_everything() {
    let OwnDatabase {
        mut cluster,
        name,
        data_dir,
    } = OwnDatabase::start();
    let mut envs = gateway_envs(&cluster, &name, &data_dir);
    envs.extend([
        ("INGEST_PROGRESS_INTERVAL", "200ms".to_owned()),
        ("INGEST_SHUTDOWN_TIMEOUT", "5m".to_owned()),
    ]);
    let mut gateway = GatewayProcess::start(&envs);
    let log = gateway.log().clone();
    cluster.stop();
    let sent = send_accepted(&gateway.address, "drain", 20, 1_000);
    gateway.signal(libc::SIGTERM);
    eventually("the stop logs its progress", Duration::from_secs(60), || {
        log.with_message("stopping: writing accepted updates").len() >= 3
    });
    cluster.restart().unwrap();
    assert!(gateway.wait(Duration::from_secs(120)).success());

    let db = Db::connect(cluster.config(&name));
    assert_eq!(db.count("location_updates"), sent as i64);
    let start = log.with_message("stopping: writing what was accepted");
    assert_eq!(start.len(), 1, "{start:?}");
    let left = start[0]["updates_left"].as_u64().unwrap() + start[0]["backlog_bytes"].as_u64().unwrap();
    assert!(left > 0, "{}", start[0]);
    let progress = log.with_message("stopping: writing accepted updates");
    for line in &progress {
        eprintln!("{line}");
    }
    assert!(
        progress
            .iter()
            .all(|l| l["updates_written"].is_u64() && l["timeout_left_s"].is_u64()),
        "{progress:?}"
    );
    // While the database is away nothing moves: the time left is not guessed.
    assert!(
        progress[0]["updates_left"].as_u64() > Some(0) && progress[0].get("eta_s").is_none(),
        "{}",
        progress[0]
    );
    assert_eq!(log.with_message("stopped; every accepted update is written").len(), 1);
}
