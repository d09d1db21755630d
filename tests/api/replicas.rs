//! Several gateways on one database, as behind a load balancer: one killed with SIGKILL at random moments under
//! load and restarted loses and duplicates nothing acknowledged; a data directory belongs to one process; and a
//! deployment from before gateway identities upgrades without losing or replaying anything.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::{
    connection_string, crash_seed, eventually, fresh_database, shared_cluster, signal, start_gateway, Db, Lcg, Ledger,
    Load,
};

fn gateway_envs(database_url: &str, data_dir: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", database_url.to_owned()),
        ("INGEST_DATA_DIR", data_dir.display().to_string()),
        ("INGEST_BATCH_SIZE", "200".to_owned()),
    ]
}

fn stats(address: &str) -> Option<serde_json::Value> {
    let body = ureq::get(&format!("{address}/stats")).call().ok()?.into_string().ok()?;
    serde_json::from_str(&body).ok()
}

#[test]
fn two_gateways_on_one_database_lose_and_duplicate_nothing_when_one_is_killed_at_random_moments() {
    let seed = crash_seed();
    let mut rng = Lcg(seed);
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let url = connection_string(&cluster.config(&name));
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let envs: Vec<_> = dirs.iter().map(|d| gateway_envs(&url, d.path())).collect();
    let mut gateways: Vec<_> = envs.iter().map(|e| start_gateway(e)).collect();
    let mut ledger = Ledger::default();
    let mut loads: Vec<Option<Load>> = gateways
        .iter()
        .enumerate()
        .map(|(i, (_, address))| Some(Load::start(address, 2, &format!("replica{i}-run0"))))
        .collect();
    let rounds = 6;
    for round in 1..=rounds {
        std::thread::sleep(Duration::from_millis(400 + rng.next_ms(1200)));
        let victim = rng.next_ms(2) as usize;
        signal(&gateways[victim].0, libc::SIGKILL);
        gateways[victim].0.wait().unwrap();
        if let Some(load) = loads[victim].take() {
            ledger.merge(load.stop());
        }
        gateways[victim] = start_gateway(&envs[victim]);
        loads[victim] = Some(Load::start(
            &gateways[victim].1,
            2,
            &format!("replica{victim}-run{round}"),
        ));
    }
    std::thread::sleep(Duration::from_millis(500));
    for load in loads.into_iter().flatten() {
        ledger.merge(load.stop());
    }
    for (gateway, _) in &mut gateways {
        signal(gateway, libc::SIGTERM);
        assert!(gateway.wait().unwrap().success(), "the last runs stop cleanly");
    }

    let db = Db::connect(cluster.config(&name));
    ledger.assert_stored_exactly_once(&format!("two replicas (seed {seed}, {rounds} kills)"), &db.device_ids());
    let instances = db.query("SELECT count(DISTINCT instance) FROM ingest_wal_progress");
    assert_eq!(
        instances[0].get::<_, i64>(0),
        2,
        "each gateway keeps its own log positions"
    );
}

#[test]
fn a_second_process_on_a_held_data_directory_exits_at_once_naming_the_first() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let url = connection_string(&cluster.config(&name));
    let dir = tempfile::tempdir().unwrap();
    let (mut first, address) = start_gateway(&gateway_envs(&url, dir.path()));

    let started = Instant::now();
    let mut second = Command::new(env!("CARGO_BIN_EXE_ingest-gateway"))
        .arg("serve")
        .env("DATABASE_URL", &url)
        .env("INGEST_DATA_DIR", dir.path())
        .env("INGEST_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    second.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = second.wait().unwrap();

    assert!(!status.success(), "the second process refuses to run");
    assert!(started.elapsed() < Duration::from_secs(30), "it exits at once");
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", first.id())), "{stderr}");
    assert!(stats(&address).is_some(), "the first one still serves");
    signal(&first, libc::SIGTERM);
    assert!(first.wait().unwrap().success());
}

#[test]
fn a_gateway_from_before_identities_claims_its_log_positions_and_replays_nothing_twice() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let url = connection_string(&cluster.config(&name));
    let dir = tempfile::tempdir().unwrap();
    let envs = gateway_envs(&url, dir.path());
    // Killed under load: some of its log is committed, some not.
    let (mut gateway, address) = start_gateway(&envs);
    let load = Load::start(&address, 2, "upgrade");
    std::thread::sleep(Duration::from_millis(1500));
    signal(&gateway, libc::SIGKILL);
    gateway.wait().unwrap();
    let ledger = load.stop();
    // What an older gateway leaves: a log, positions without an owner, no identity.
    std::fs::remove_file(dir.path().join("instance-id")).unwrap();
    let db = Db::connect(cluster.config(&name));
    db.execute("UPDATE ingest_wal_progress SET instance = ''");
    assert!(
        std::fs::read_dir(dir.path().join("wal")).unwrap().next().is_some(),
        "a log is left"
    );

    let (mut gateway, address) = start_gateway(&envs);
    eventually("the log is replayed", Duration::from_secs(60), || {
        stats(&address).is_some_and(|s| {
            s["streams"]["location"]["queue_depth"] == 0 && s["streams"]["location"]["wal_backlog_bytes"] == 0
        })
    });
    let after = stats(&address).unwrap();
    signal(&gateway, libc::SIGTERM);
    assert!(gateway.wait().unwrap().success());

    ledger.assert_stored_exactly_once("upgrade", &db.device_ids());
    assert_eq!(
        after["streams"]["location"]["duplicate"], 0,
        "nothing committed before the upgrade is written again: {after}"
    );
    let unowned = db.query("SELECT count(*) FROM ingest_wal_progress WHERE instance = ''");
    assert_eq!(unowned[0].get::<_, i64>(0), 0, "the old positions are claimed");
}
