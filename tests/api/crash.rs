//! Crashes: the gateway killed with SIGKILL at random moments under load (a short run, and a long one of twenty
//! kills whose figures docs/durability.md publishes), and PostgreSQL killed or stopped under load. At the end, every
//! update that got a 202 is stored exactly once, and nothing that was refused is.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ingest_gateway::db::EmbeddedPostgres;
use ingest_gateway::wal::frame::FrameReader;

use crate::helpers::gateway_envs;
use crate::helpers::{
    connection_string, crash_seed, eventually, free_port, fresh_database, location_array, location_json,
    shared_cluster, spawn_app_on, stats, wait_until_all_written_within, Db, GatewayProcess, Lcg, Ledger, Load,
    OwnDatabase,
};

#[test]
fn sigkill_at_random_moments_under_load_loses_and_duplicates_nothing_acknowledged() {
    let seed = crash_seed();
    let mut rng = Lcg(seed);
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let data_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let address = format!("http://127.0.0.1:{port}");
    let envs = [
        ("DATABASE_URL", connection_string(&cluster.config(&name))),
        ("INGEST_DATA_DIR", data_dir.path().display().to_string()),
        ("INGEST_LISTEN", format!("127.0.0.1:{port}")),
        ("INGEST_BATCH_SIZE", "200".to_owned()),
    ];
    let kills = 5;
    let mut gateway = GatewayProcess::start(&envs);
    let load = Load::start(&address, 3, "crash");
    for _ in 0..kills {
        // The kill moments are random on purpose: from just after a start to well into a run of batches.
        std::thread::sleep(Duration::from_millis(300 + rng.next_ms(1200)));
        gateway.kill();
        gateway = GatewayProcess::start(&envs);
    }
    // The last run takes updates before the load stops, so that its clean stop has acknowledged updates to write.
    load.wait_for_acknowledged(200);
    let ledger = load.stop();
    assert!(gateway.terminate().success(), "the last run stops cleanly");

    let db = Db::connect(cluster.config(&name));
    let stored = db.device_ids();
    ledger.assert_stored_exactly_once(&format!("crash test (seed {seed}, {kills} kills)"), &stored);
    let wal: Vec<_> = std::fs::read_dir(data_dir.path().join("wal")).unwrap().collect();
    assert!(wal.is_empty(), "the clean stop leaves an empty log: {wal:?}");
}

/// Kills of the long crash run.
const KILLS: usize = 20;
/// Clients of the long crash run, each with its own ledger.
const CLIENTS: usize = 4;
/// A client that cannot get a request acknowledged for this long fails the run rather than hangs it.
const RETRY_LIMIT: Duration = Duration::from_secs(120);

/// What one client of the long crash run sent and was told.
#[derive(Debug, Default)]
struct ClientLedger {
    /// Updates that got a 202, by device id (one id per update).
    acknowledged: BTreeSet<String>,
    /// Requests sent more than once because an attempt got no 202 (no answer, or a 503).
    retried: usize,
    /// Requests never acknowledged within [`RETRY_LIMIT`]; must be none.
    abandoned: usize,
    /// Answers other than 202 and 503; must be none.
    other_statuses: Vec<u16>,
}

/// A client that posts updates (singles, and every fourth request an array of 20) until told to stop, and sends
/// each request again, unchanged (the same ids and times, so a copy that was stored is absorbed), until it is
/// acknowledged; it finishes the request in hand after being told to stop.
fn crash_client(url: String, client: usize, running: Arc<AtomicBool>) -> JoinHandle<ClientLedger> {
    std::thread::spawn(move || {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
        let mut ledger = ClientLedger::default();
        let mut i = 0;
        while running.load(Ordering::Relaxed) {
            let prefix = format!("kill20-{client}-{i}");
            let (body, ids): (String, Vec<String>) = if i % 4 == 0 {
                (
                    location_array(&prefix, 20),
                    (0..20).map(|k| format!("{prefix}-{k}")).collect(),
                )
            } else {
                (location_json(&prefix), vec![prefix.clone()])
            };
            i += 1;
            let first = Instant::now();
            let mut attempts = 0;
            loop {
                attempts += 1;
                match agent
                    .post(&url)
                    .set("Content-Type", "application/json")
                    .send_string(&body)
                {
                    Ok(r) if r.status() == 202 => {
                        ledger.acknowledged.extend(ids);
                        break;
                    }
                    Ok(r) => ledger.other_statuses.push(r.status()),
                    Err(ureq::Error::Status(503, _)) => {}
                    Err(ureq::Error::Status(code, _)) => ledger.other_statuses.push(code),
                    // Refused, reset or cut off by a kill: maybe stored, maybe not; the retry settles it.
                    Err(_) => {}
                }
                if first.elapsed() > RETRY_LIMIT {
                    ledger.abandoned += 1;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if attempts > 1 {
                ledger.retried += 1;
            }
        }
        ledger
    })
}

/// Records in the log's segments: what a start after a kill reads back (and replays, past what was committed).
fn log_records(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .map(|bytes| FrameReader::new(&bytes).count())
        .sum()
}

#[test]
#[ignore = "long: 20 kills under load; run with --include-ignored"]
fn twenty_sigkills_at_random_moments_under_load_lose_and_duplicate_nothing_acknowledged() {
    let seed = crash_seed();
    let started = Instant::now();
    let mut rng = Lcg(seed);
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let data_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let envs = [
        ("DATABASE_URL", connection_string(&cluster.config(&name))),
        ("INGEST_DATA_DIR", data_dir.path().display().to_string()),
        ("INGEST_LISTEN", format!("127.0.0.1:{port}")),
        ("INGEST_BATCH_SIZE", "200".to_owned()),
    ];
    let mut gateway = GatewayProcess::start(&envs);
    let running = Arc::new(AtomicBool::new(true));
    let url = format!("{}/api/v1/location/update", gateway.address);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| crash_client(url.clone(), c, running.clone()))
        .collect();
    let mut left_in_log = 0;
    for _ in 0..KILLS {
        // Anywhere from just after the gateway took its port to well into a run of group commits and batches.
        std::thread::sleep(Duration::from_millis(rng.next_ms(1500)));
        gateway.kill();
        left_in_log += log_records(&data_dir.path().join("wal"));
        gateway = GatewayProcess::start(&envs);
    }
    running.store(false, Ordering::Relaxed);
    let ledgers: Vec<ClientLedger> = clients
        .into_iter()
        .map(|c| c.join().expect("a client panicked"))
        .collect();
    assert!(gateway.terminate().success(), "the last run stops cleanly");

    let acknowledged: BTreeSet<&String> = ledgers.iter().flat_map(|l| &l.acknowledged).collect();
    let stored = Db::connect(cluster.config(&name)).device_ids();
    let stored_ids: BTreeSet<&String> = stored.iter().map(|(id, _)| id).collect();
    let missing: Vec<&&String> = acknowledged.difference(&stored_ids).collect();
    let duplicated: Vec<&String> = stored.iter().filter(|(_, n)| *n > 1).map(|(id, _)| id).collect();
    let unacknowledged: Vec<&&String> = stored_ids.difference(&acknowledged).collect();
    let retried: usize = ledgers.iter().map(|l| l.retried).sum();
    eprintln!(
        "crash run: seed {seed}, {KILLS} kills, {CLIENTS} clients: {} acknowledged, {} stored, {} missing, {} \
         duplicated, {} stored unacknowledged; {retried} requests retried, {left_in_log} log records read back after \
         the kills; {:.1} s",
        acknowledged.len(),
        stored.len(),
        missing.len(),
        duplicated.len(),
        unacknowledged.len(),
        started.elapsed().as_secs_f64()
    );
    for ledger in &ledgers {
        assert!(ledger.other_statuses.is_empty(), "{:?}", ledger.other_statuses);
        assert_eq!(ledger.abandoned, 0, "a request was never acknowledged");
    }
    assert!(acknowledged.len() > 1000, "the load ran");
    assert!(
        missing.is_empty(),
        "acknowledged but missing: {:?}",
        &missing[..missing.len().min(10)]
    );
    assert!(duplicated.is_empty(), "stored twice: {duplicated:?}");
    // Every request was retried until acknowledged, so nothing stored is unknown to the clients.
    assert!(
        unacknowledged.is_empty(),
        "stored but never acknowledged: {unacknowledged:?}"
    );
    let wal: Vec<_> = std::fs::read_dir(data_dir.path().join("wal")).unwrap().collect();
    assert!(wal.is_empty(), "the clean stop leaves an empty log: {wal:?}");
}

/// The location stream's figures in the `/stats` of the gateway at `address`; `Null` while it does not answer.
fn location_figures(address: &str) -> serde_json::Value {
    stats(address).map_or(serde_json::Value::Null, |s| s["streams"]["location"].clone())
}

/// Waits until the location writers of the gateway at `address` have failed a batch: it has found its database
/// gone.
fn wait_until_the_writers_fail(address: &str) {
    eventually("the writers fail to write", Duration::from_secs(60), || {
        location_figures(address)["writers_failing_reason"].is_string()
    });
}

/// Waits until the location writers of the gateway at `address` write again after an outage: more rows committed
/// than `written_before`, and no writer failing.
fn wait_until_the_writers_write_again(address: &str, written_before: u64) {
    eventually("the writers write again", Duration::from_secs(120), || {
        let figures = location_figures(address);
        figures["written"].as_u64().is_some_and(|n| n > written_before) && figures["writers_failing_reason"].is_null()
    });
}

/// Runs load against a gateway while its database is taken away by `outage` (given the gateway's address), then
/// checks the ledger.
fn database_outage_under_load(tag: &str, outage: impl FnOnce(&mut EmbeddedPostgres, &str)) {
    // A killed server must keep what it acknowledged, as a real one does (the fast test server would not).
    let mut cluster = EmbeddedPostgres::start_ephemeral_crash_safe().unwrap();
    let name = fresh_database(&cluster);
    let mut app = spawn_app_on(cluster.config(&name), |s| {
        s.pipeline.batch_size = 200;
        s.pipeline.shutdown_timeout = Duration::from_secs(60);
    });
    let load = Load::start(&app.address, 3, tag);
    load.wait_for_acknowledged(500);
    outage(&mut cluster, &app.address);
    // The database is back: the load goes on until the writers have committed rows again and more updates are
    // acknowledged, so that the ledger covers before, during and after the outage.
    let written = location_figures(&app.address)["written"]
        .as_u64()
        .expect("/stats answers");
    wait_until_the_writers_write_again(&app.address, written);
    load.wait_for_acknowledged(500);
    let ledger: Ledger = load.stop();
    let started = Instant::now();
    // The backlog is waited for first, however long this machine takes: the stop's own deadline is not what this
    // test checks.
    wait_until_all_written_within(&app.address, Duration::from_secs(600));
    let catch_up = started.elapsed();
    assert!(app.stop().is_clean(), "the gateway stops cleanly once it has caught up");
    app.db = Db::connect(cluster.config(&name));
    let stored = app.db.device_ids();
    ledger.assert_stored_exactly_once(&format!("{tag} (caught up in {catch_up:?})"), &stored);
}

#[test]
fn postgres_killed_and_restarted_under_load_loses_nothing_acknowledged() {
    database_outage_under_load("pg-kill", |cluster, address| {
        cluster.kill();
        wait_until_the_writers_fail(address);
        cluster.restart().unwrap();
    });
}

#[test]
fn postgres_down_for_a_minute_under_load_loses_nothing_acknowledged() {
    database_outage_under_load("pg-minute", |cluster, _| {
        cluster.stop();
        // A minute away is what this test is about: longer than any retry step of the writers.
        std::thread::sleep(Duration::from_secs(60));
        cluster.restart().unwrap();
    });
}

/// Lets `load` get updates acknowledged and written, takes the database away with `outage`, waits until the writers
/// of the gateway at `address` have found it gone, and lets the load get more acknowledged: updates that are only in
/// the log.
fn load_then_outage_then_more(load: &Load, address: &str, outage: impl FnOnce()) {
    load.wait_for_acknowledged(200);
    eventually("rows are written", Duration::from_secs(60), || {
        location_figures(address)["written"].as_u64().is_some_and(|n| n > 0)
    });
    outage();
    wait_until_the_writers_fail(address);
    load.wait_for_acknowledged(200);
}

#[test]
fn a_restart_replays_the_log_and_resumes_exactly_after_what_was_committed() {
    // Kill the gateway while its database is away: everything acknowledged is only in the log.
    let OwnDatabase {
        mut cluster,
        name,
        data_dir,
    } = OwnDatabase::start();
    let envs = gateway_envs(&cluster, &name, &data_dir);
    let mut gateway = GatewayProcess::start(&envs);
    let first = Load::start(&gateway.address, 2, "before");
    load_then_outage_then_more(&first, &gateway.address, || cluster.stop());
    gateway.kill();
    let mut ledger = first.stop();
    cluster.restart().unwrap();

    let gateway = GatewayProcess::start(&envs);
    let db = Db::connect(cluster.config(&name));
    eventually("the log is replayed", Duration::from_secs(60), || {
        let figures = location_figures(&gateway.address);
        figures["queue_depth"] == 0 && figures["wal_backlog_bytes"] == 0 && figures["replaying"] == false
    });
    let second = Load::start(&gateway.address, 2, "after");
    second.wait_for_acknowledged(200);
    ledger.merge(second.stop());
    assert!(gateway.terminate().success());

    let stored = db.device_ids();
    ledger.assert_stored_exactly_once("restart", &stored);
    let progress = db.query("SELECT count(*) FROM ingest_wal_progress");
    assert!(
        progress[0].get::<_, i64>(0) >= 1,
        "the writers recorded their log positions"
    );
}

#[test]
fn a_record_whose_length_is_damaged_costs_only_itself_and_its_segment_is_kept_aside() {
    // Everything acknowledged stays in the log: the database is away until the gateway is killed.
    let OwnDatabase {
        mut cluster,
        name,
        data_dir,
    } = OwnDatabase::start();
    let envs = gateway_envs(&cluster, &name, &data_dir);
    let mut gateway = GatewayProcess::start(&envs);
    cluster.stop();
    for i in 0..5 {
        let body = crate::helpers::location_json(&format!("damaged-{i}"));
        assert_eq!(crate::helpers::post_location(&gateway.address, &body), Some(202));
    }
    gateway.kill();

    // One request, one record: damage the length of the third.
    let wal_dir = data_dir.path().join("wal");
    let segment = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::metadata(p).unwrap().len() > 0)
        .expect("a segment with the records");
    let mut bytes = std::fs::read(&segment).unwrap();
    let mut offset = 0;
    for _ in 0..2 {
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
        offset += 8 + len;
    }
    bytes[offset + 1] ^= 0x10;
    std::fs::write(&segment, &bytes).unwrap();

    cluster.restart().unwrap();
    let gateway = GatewayProcess::start(&envs);
    eventually("the log is replayed", Duration::from_secs(60), || {
        let figures = location_figures(&gateway.address);
        figures["written"] == 4 && figures["queue_depth"] == 0
    });
    let stats = stats(&gateway.address).expect("/stats answers");
    assert_eq!(stats["wal"]["corrupt_records"], 1, "the damage is counted once");
    assert!(gateway.terminate().success());

    let db = Db::connect(cluster.config(&name));
    let mut stored: Vec<String> = db.device_ids().into_iter().map(|(id, _)| id).collect();
    stored.sort();
    assert_eq!(stored, ["damaged-0", "damaged-1", "damaged-3", "damaged-4"]);
    let kept: Vec<_> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".damaged"))
        .collect();
    assert_eq!(kept.len(), 1, "the damaged segment is kept aside: {kept:?}");
}
