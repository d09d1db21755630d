//! Parsing bounded by what it allocates: an update keeps at most `INGEST_MAX_UNKNOWN_FIELDS` unknown fields, and
//! many senders of 8 MiB bodies of updates with ~1,300 small unknown fields each (refused, but only once read
//! and parsed) cannot take the gateway binary past its idle memory, the body budget and a margin, while
//! `/healthz` keeps answering.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::attack::{probe_healthz, send_whole, vm_kib, Latencies, LOCATION, MIB};
use crate::helpers::{connection_string, fresh_database, location_json, shared_cluster, spawn_app, GatewayProcess};

/// The body budget of the attacked gateway: low, so that the parse structures on top of it would show.
const BUDGET_MIB: u64 = 64;
/// What the gateway may hold beyond its idle memory and the budget: buffers of the connections, the allocator's
/// slack, the blocking pool's stacks.
const MARGIN_MIB: u64 = 96;
const SENDERS: usize = 24;
const ATTACK: Duration = Duration::from_secs(20);

/// Every two-character key of `0-9 a-z`: 1,296 distinct small unknown fields.
fn unknown_fields() -> String {
    let alphabet: Vec<char> = ('0'..='9').chain('a'..='z').collect();
    let mut fields = String::new();
    for a in &alphabet {
        for b in &alphabet {
            fields.push_str(&format!(r#","{a}{b}":1"#));
        }
    }
    fields
}

/// Just under 8 MiB: an array of updates that each carry [`unknown_fields`]. They are refused (old, and too many
/// unknown fields), but only after they were read.
fn attack_body() -> Vec<u8> {
    let update = format!(
        r#"{{"device_id":"t-1","recorded_at":"2020-01-01T00:00:00Z","lat":0,"lon":0{}}}"#,
        unknown_fields()
    );
    let count = (8 * MIB as usize - 2) / (update.len() + 1);
    format!("[{}]", vec![update.as_str(); count].join(",")).into_bytes()
}

#[test]
fn many_senders_of_8_mib_bodies_of_unknown_fields_stay_within_the_body_budget_and_healthz_keeps_answering() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let data_dir = tempfile::tempdir().unwrap();
    let envs = [
        ("DATABASE_URL", connection_string(&cluster.config(&name))),
        ("INGEST_DATA_DIR", data_dir.path().display().to_string()),
        ("INGEST_MAX_INFLIGHT_BODY_BYTES", (BUDGET_MIB * MIB).to_string()),
        // Each sender is a client of its own behind a proxy: no per-client share stops them, only the budget.
        ("INGEST_TRUSTED_PROXIES", "127.0.0.1".to_owned()),
    ];
    let gateway = GatewayProcess::start(&envs);
    std::thread::sleep(Duration::from_millis(500));
    let idle_mib = vm_kib(gateway.pid(), "VmRSS") / 1024;
    let body = Arc::new(attack_body());
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::new()));

    let senders: Vec<_> = (0..SENDERS)
        .map(|i| {
            let (address, body, stop, statuses) =
                (gateway.address.clone(), body.clone(), stop.clone(), statuses.clone());
            std::thread::spawn(move || {
                let forwarded = vec![format!("X-Forwarded-For: 10.9.0.{}", i + 1)];
                while !stop.load(Ordering::Relaxed) {
                    let status = send_whole(&address, LOCATION, &forwarded, &body);
                    statuses.lock().unwrap().push(status);
                }
            })
        })
        .collect();
    let probe = probe_healthz(&gateway.address, Duration::from_millis(50), stop.clone());
    // The attack lasts ATTACK at least, and until a few of its bodies have been read whole and refused, however
    // slow the machine: the peak is measured over an attack that got through to the parser.
    let attack_started = std::time::Instant::now();
    crate::helpers::eventually(
        "three of the attack's bodies are read and refused",
        Duration::from_secs(300),
        || statuses.lock().unwrap().iter().filter(|s| **s == Some(422)).count() >= 3,
    );
    std::thread::sleep(ATTACK.saturating_sub(attack_started.elapsed()));
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.join().unwrap();
    }
    let health = Latencies::new(probe.join().expect("/healthz answered every probe"));
    let peak_mib = vm_kib(gateway.pid(), "VmHWM") / 1024;

    let statuses = statuses.lock().unwrap();
    let count = |wanted: Option<u16>| statuses.iter().filter(|s| **s == wanted).count();
    eprintln!(
        "{SENDERS} senders of {:.1} MiB bodies of {} unknown fields per update for {ATTACK:?}: {} requests ({} \
         422, {} 503, {} cut); rss idle {idle_mib} MiB, peak {peak_mib} MiB (budget {BUDGET_MIB} MiB); /healthz \
         p50 {:?}, p99 {:?}, max {:?} over {} probes",
        body.len() as f64 / MIB as f64,
        unknown_fields().matches(':').count(),
        statuses.len(),
        count(Some(422)),
        count(Some(503)),
        count(None),
        health.percentile(50),
        health.percentile(99),
        health.percentile(100),
        health.0.len(),
    );
    assert!(count(Some(422)) > 0, "the attack's bodies were read and refused");
    assert!(
        statuses.iter().all(|s| matches!(s, Some(422 | 503) | None)),
        "only refusals: {statuses:?}"
    );
    assert!(
        peak_mib <= idle_mib + BUDGET_MIB + MARGIN_MIB,
        "peak rss {peak_mib} MiB, idle {idle_mib} MiB, budget {BUDGET_MIB} MiB"
    );
    // Generous, for a debug build on two shared cores; the release figure is in docs/security.md.
    assert!(
        health.percentile(50) < Duration::from_millis(250),
        "/healthz p50 {:?}",
        health.percentile(50)
    );
}

/// A location update carrying `n` distinct unknown fields.
fn with_unknown_fields(device_id: &str, n: usize) -> String {
    let mut update = location_json(device_id);
    update.pop();
    for i in 0..n {
        update.push_str(&format!(r#","f{i}":{i}"#));
    }
    update.push('}');
    update
}

#[test]
fn an_update_with_more_unknown_fields_than_the_cap_gets_422_naming_attributes_and_one_at_the_cap_is_stored() {
    let app = spawn_app(|_| {});

    let at_cap = app.post_json(LOCATION, &with_unknown_fields("at-cap", 64));
    let past_cap = app.post_json(LOCATION, &with_unknown_fields("past-cap", 65));

    assert_eq!(at_cap.status, 202, "{}", at_cap.body);
    assert_eq!(past_cap.status, 422, "{}", past_cap.body);
    let detail = &past_cap.json()["details"][0];
    assert_eq!(detail["field"], "attributes", "{detail}");
    let reason = detail["reason"].as_str().unwrap();
    assert!(
        reason.contains("65 unknown fields") && reason.contains("64"),
        "{reason}"
    );
    crate::helpers::eventually("the update at the cap lands", Duration::from_secs(10), || {
        app.db.count("location_updates") == 1
    });
}
