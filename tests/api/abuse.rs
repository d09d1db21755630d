//! Bounded under abuse, tried as an attacker would against a real gateway process: stalled large bodies cannot
//! pin memory, a gzip bomb is refused before it is parsed while `/healthz` keeps answering, and a request waiting
//! for its commit is answered within the commit wait while PostgreSQL is away.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ingest_gateway::db::EmbeddedPostgres;

use crate::helpers::{
    connection_string, eventually, fresh_database, gzip, location_json, shared_cluster, spawn_app_on, GatewayProcess,
};

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024
}

/// Sends the head of an 8 MiB request and 7 MiB of its body, then stalls until the gateway gives up on it.
fn stalled_sender(address: &str) -> std::thread::JoinHandle<()> {
    let address = address.trim_start_matches("http://").to_owned();
    std::thread::spawn(move || {
        let Ok(mut stream) = TcpStream::connect(&address) else {
            return;
        };
        let head = format!(
            "POST /api/v1/location/update HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            8 * 1024 * 1024
        );
        if stream.write_all(head.as_bytes()).is_err() {
            return;
        }
        let chunk = vec![b' '; 64 * 1024];
        for _ in 0..112 {
            if stream.write_all(&chunk).is_err() {
                return;
            }
        }
        // Stalls: waits for whatever the gateway does about it.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
    })
}

#[test]
fn stalled_large_bodies_cannot_pin_memory_and_normal_requests_keep_their_202() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let data_dir = tempfile::tempdir().unwrap();
    let budget_mib = 64;
    let envs = [
        ("DATABASE_URL", connection_string(&cluster.config(&name))),
        ("INGEST_DATA_DIR", data_dir.path().display().to_string()),
        ("INGEST_MAX_INFLIGHT_BODY_BYTES", (budget_mib * 1024 * 1024).to_string()),
        ("INGEST_BODY_TIMEOUT", "10s".to_owned()),
    ];
    let gateway = GatewayProcess::start(&envs);
    let address = gateway.address.clone();
    let idle_rss = rss_mib(gateway.pid());

    let attackers: Vec<_> = (0..150).map(|_| stalled_sender(&address)).collect();
    let mut peak = 0;
    let mut latencies = Vec::new();
    for i in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        peak = peak.max(rss_mib(gateway.pid()));
        let started = Instant::now();
        let status = crate::helpers::post_location(&address, &location_json(&format!("normal-{i}")));
        latencies.push(started.elapsed());
        assert_eq!(status, Some(202), "a normal request is still taken");
    }
    latencies.sort();
    let slowest = latencies[latencies.len() - 1];
    eprintln!(
        "150 stalled 7 MiB bodies: rss idle {idle_rss} MiB, peak {peak} MiB (budget {budget_mib} MiB); \
         normal requests meanwhile: median {:?}, slowest {slowest:?}",
        latencies[latencies.len() / 2]
    );
    assert!(
        peak < idle_rss + budget_mib + 96,
        "memory stays bounded by the body budget: peak {peak} MiB"
    );
    assert!(
        slowest < Duration::from_secs(5),
        "normal requests are not held up: {slowest:?}"
    );
    for attacker in attackers {
        attacker.join().unwrap();
    }
    assert!(gateway.terminate().success());
}

#[test]
fn a_gzip_bomb_is_refused_before_parsing_while_healthz_keeps_answering() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let app = spawn_app_on(cluster.config(&name), |_| {});
    // Almost 8 MiB of the same attribute pair in one update: a few KiB once compressed.
    let mut body = location_json("bomb");
    body.pop();
    while body.len() < 8 * 1024 * 1024 - 64 {
        body.push_str(",\"a\":0");
    }
    body.push('}');
    let compressed = gzip(body.as_bytes());
    let bombs: Vec<_> = (0..8)
        .map(|_| {
            let (address, compressed) = (app.address.clone(), compressed.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let status = match ureq::post(&format!("{address}/api/v1/location/update"))
                    .set("Content-Type", "application/json")
                    .set("Content-Encoding", "gzip")
                    .send_bytes(&compressed)
                {
                    Ok(r) => r.status(),
                    Err(ureq::Error::Status(code, _)) => code,
                    Err(e) => panic!("{e}"),
                };
                (status, started.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        assert_eq!(app.get("/healthz").status, 200);
        slowest = slowest.max(started.elapsed());
    }
    let mut slowest_bomb = Duration::ZERO;
    for bomb in bombs {
        let (status, took) = bomb.join().unwrap();
        assert_eq!(status, 413, "refused for its expansion");
        slowest_bomb = slowest_bomb.max(took);
    }
    eprintln!(
        "8 gzip bombs of {} KiB ({} MiB inflated): each 413 within {slowest_bomb:?}; slowest /healthz meanwhile \
         {slowest:?}",
        compressed.len() / 1024,
        body.len() / (1024 * 1024),
    );
    let answer = app.post(
        "/api/v1/location/update",
        &compressed,
        &[("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
    );
    assert!(answer.body.contains("max_gzip_ratio"), "{}", answer.body);
    assert_eq!(app.db.count("location_updates"), 0);
}

#[test]
fn a_request_waiting_for_its_commit_is_answered_within_the_wait_while_postgresql_is_away() {
    let mut cluster = EmbeddedPostgres::start_ephemeral().unwrap();
    let name = fresh_database(&cluster);
    let mut app = spawn_app_on(cluster.config(&name), |s| s.http.commit_wait = Duration::from_secs(1));
    cluster.stop();

    let answer = app.post_json("/api/v1/location/update?ack=commit", &location_json("waits"));

    assert_eq!(answer.status, 202);
    assert_eq!(answer.body, r#"{"accepted":1,"committed":false}"#);
    cluster.restart().unwrap();
    app.db = crate::helpers::Db::connect(cluster.config(&name));
    eventually(
        "the update lands once PostgreSQL is back",
        Duration::from_secs(60),
        || app.db.count("location_updates") == 1,
    );
}
