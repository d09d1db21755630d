//! Several gateways on one database, as behind a load balancer: one killed with SIGKILL at random moments under
//! load and restarted loses and duplicates nothing acknowledged; a data directory belongs to one process; and a
//! deployment from before gateway identities upgrades without losing or replaying anything.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::helpers::{
    connection_string, crash_seed, eventually, fresh_database, gateway_command, shared_cluster, Db, GatewayProcess,
    Lcg, Ledger, Load,
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
    let mut gateways: Vec<_> = envs.iter().map(|e| GatewayProcess::start(e)).collect();
    let mut ledger = Ledger::default();
    let mut loads: Vec<Option<Load>> = gateways
        .iter()
        .enumerate()
        .map(|(i, gateway)| Some(Load::start(&gateway.address, 2, &format!("replica{i}-run0"))))
        .collect();
    let rounds = 6;
    for round in 1..=rounds {
        let victim = rng.next_ms(2) as usize;
        // A kill lands while the victim takes load: after some of it is acknowledged, at a random moment later.
        loads[victim]
            .as_ref()
            .expect("a load per gateway")
            .wait_for_acknowledged(50);
        std::thread::sleep(Duration::from_millis(rng.next_ms(1200)));
        gateways[victim].kill();
        if let Some(load) = loads[victim].take() {
            ledger.merge(load.stop());
        }
        gateways[victim] = GatewayProcess::start(&envs[victim]);
        loads[victim] = Some(Load::start(
            &gateways[victim].address,
            2,
            &format!("replica{victim}-run{round}"),
        ));
    }
    for load in loads.iter().flatten() {
        load.wait_for_acknowledged(50);
    }
    for load in loads.into_iter().flatten() {
        ledger.merge(load.stop());
    }
    for gateway in gateways {
        assert!(gateway.terminate().success(), "the last runs stop cleanly");
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
    let first = GatewayProcess::start(&gateway_envs(&url, dir.path()));
    let address = first.address.clone();

    let started = Instant::now();
    let mut second = gateway_command(&["serve"], &gateway_envs(&url, dir.path()))
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
    assert!(stderr.contains(&format!("pid {}", first.pid())), "{stderr}");
    assert!(stats(&address).is_some(), "the first one still serves");
    assert!(first.terminate().success());
}

#[test]
fn a_gateway_from_before_identities_claims_its_log_positions_and_replays_nothing_twice() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let url = connection_string(&cluster.config(&name));
    let dir = tempfile::tempdir().unwrap();
    let envs = gateway_envs(&url, dir.path());
    // Killed under load: some of its log is committed, some not.
    let mut gateway = GatewayProcess::start(&envs);
    let load = Load::start(&gateway.address, 2, "upgrade");
    load.wait_for_acknowledged(500);
    gateway.kill();
    let ledger = load.stop();
    // What an older gateway leaves: a log, positions without an owner, no identity.
    std::fs::remove_file(dir.path().join("instance-id")).unwrap();
    let db = Db::connect(cluster.config(&name));
    db.execute("UPDATE ingest_wal_progress SET instance = ''");
    assert!(
        std::fs::read_dir(dir.path().join("wal")).unwrap().next().is_some(),
        "a log is left"
    );

    let gateway = GatewayProcess::start(&envs);
    let address = gateway.address.clone();
    eventually("the log is replayed", Duration::from_secs(60), || {
        stats(&address).is_some_and(|s| {
            s["streams"]["location"]["queue_depth"] == 0 && s["streams"]["location"]["wal_backlog_bytes"] == 0
        })
    });
    let after = stats(&address).unwrap();
    assert!(gateway.terminate().success());

    ledger.assert_stored_exactly_once("upgrade", &db.device_ids());
    assert_eq!(
        after["streams"]["location"]["duplicate"], 0,
        "nothing committed before the upgrade is written again: {after}"
    );
    let unowned = db.query("SELECT count(*) FROM ingest_wal_progress WHERE instance = ''");
    assert_eq!(unowned[0].get::<_, i64>(0), 0, "the old positions are claimed");
}
