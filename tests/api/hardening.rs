//! The smaller doors, each tried against the real binary or a real database: a keys file broken at a reload refuses
//! every write instead of keeping revoked keys; a keys file others may write refuses the start; symbolic links in the
//! data directory are not followed; a NATS password never reaches the log or `--help`; a partition name chosen by
//! whoever may add a partition is an identifier, never SQL.

use std::process::Stdio;
use std::time::Duration;

use ingest_gateway::db::partitions::{self, PartitionPolicy};
use ingest_gateway::db::{migrate, DatabaseTls};
use ingest_gateway::keys_file::hashed;

use crate::helpers::{
    connection_string, eventually, fresh_database, gateway_command, location_json, refused_start, shared_cluster, Db,
    GatewayProcess,
};

const LOCATION: &str = "/api/v1/location/update";

fn post(address: &str, key: &str) -> (u16, Option<String>) {
    match ureq::post(&format!("{address}{LOCATION}"))
        .set("Content-Type", "application/json")
        .set("Authorization", &format!("Bearer {key}"))
        .send_string(&location_json("truck-1"))
    {
        Ok(r) => (r.status(), None),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().ok()),
        Err(e) => panic!("request failed: {e}"),
    }
}

fn get(address: &str, path: &str) -> (u16, String) {
    match ureq::get(&format!("{address}{path}")).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("request failed: {e}"),
    }
}

#[test]
fn a_keys_file_broken_at_a_reload_refuses_every_write_until_it_is_fixed_instead_of_keeping_revoked_keys() {
    let (leaked, fresh) = ("igk_leaked_key_of_fleet_north", "igk_new_key_of_fleet_north");
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("fleet {} streams=location\n", hashed(leaked))).unwrap();
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let gateway = GatewayProcess::start(&[
        ("DATABASE_URL", connection_string(&cluster.config(&name))),
        ("INGEST_DATA_DIR", dir.path().join("data").display().to_string()),
        ("INGEST_API_KEYS_FILE", keys.display().to_string()),
    ]);
    let address = gateway.address.clone();
    assert_eq!(post(&address, leaked).0, 202);

    // The operator revokes the leaked key, but the edit leaves a typo on another line.
    std::fs::write(
        &keys,
        format!(
            "fleet {} streams=location\nbackfill sha256:12 streams=location\n",
            hashed(fresh)
        ),
    )
    .unwrap();
    assert!(!gateway.reload("api keys"), "the broken file is refused");
    assert!(get(&address, "/metrics").1.contains("ingest_api_keys_file_usable 0"));
    let (leaked_status, body) = post(&address, leaked);
    let fresh_status = post(&address, fresh).0;
    let (ready, readiness) = get(&address, "/readyz");
    let stats: serde_json::Value = serde_json::from_str(&get(&address, "/stats").1).unwrap();
    eprintln!("after a broken reload: the revoked key gets {leaked_status}, the new one {fresh_status}");
    assert_eq!((leaked_status, fresh_status), (503, 503), "{body:?}");
    assert!(body.unwrap_or_default().contains("keys_unusable"));
    assert_eq!(ready, 503);
    assert!(readiness.contains("API keys file cannot be used"), "{readiness}");
    assert_eq!(stats["auth"]["keys_file_usable"], false, "{stats}");

    std::fs::write(&keys, format!("fleet {} streams=location\n", hashed(fresh))).unwrap();
    assert!(gateway.reload("api keys"), "the fixed file is taken");
    assert!(get(&address, "/metrics").1.contains("ingest_api_keys_file_usable 1"));
    assert_eq!((post(&address, fresh).0, post(&address, leaked).0), (202, 401));
    eventually("ready again", Duration::from_secs(10), || {
        get(&address, "/readyz").0 == 200
    });
    assert!(gateway.terminate().success());
}

#[test]
fn a_keys_file_that_others_may_write_refuses_the_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("fleet {} streams=location\n", hashed("igk_x"))).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (status, stderr) = refused_start(&[
        ("INGEST_API_KEYS_FILE", keys.display().to_string()),
        ("INGEST_DATA_DIR", dir.path().join("data").display().to_string()),
    ]);
    assert!(!status.success());
    assert!(stderr.contains("mode 666") && stderr.contains("chmod go-w"), "{stderr}");
}

#[test]
fn a_lock_file_planted_as_a_symbolic_link_refuses_the_start_and_its_target_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "root:secret\n").unwrap();
    std::os::unix::fs::symlink(&victim, data.join("lock")).unwrap();
    let (status, stderr) = refused_start(&[("INGEST_DATA_DIR", data.display().to_string())]);
    assert!(!status.success());
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root:secret\n");
}

#[test]
fn a_nats_password_shows_neither_in_the_start_up_error_nor_in_help() {
    let dir = tempfile::tempdir().unwrap();
    let signing = dir.path().join("signing.key");
    std::fs::write(&signing, "0123456789abcdef0123456789abcdef\n").unwrap();
    let (status, stderr) = refused_start(&[
        ("INGEST_QUEUE", "jetstream".into()),
        ("INGEST_NATS_URL", "nats://ingest:s3cret-pw@127.0.0.1:1".into()),
        ("INGEST_JETSTREAM_SIGNING_KEY_FILE", signing.display().to_string()),
        ("INGEST_DATA_DIR", dir.path().join("data").display().to_string()),
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("could not connect to NATS at nats://ingest:***@127.0.0.1:1"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");

    let help = gateway_command(
        &["--help"],
        &[("INGEST_NATS_URL", "nats://ingest:s3cret-pw@nats:4222".to_owned())],
    )
    .stderr(Stdio::null())
    .output()
    .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("INGEST_NATS_URL") && !help.contains("s3cret-pw"),
        "{help}"
    );
}

#[test]
fn a_partition_named_as_sql_is_dropped_and_indexed_as_a_name_and_its_sql_never_runs() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let config = cluster.config(&name);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(migrate::run(&config, &DatabaseTls::off())).unwrap();
    let db = Db::connect(config.clone());
    // Whoever may add a partition chooses its name; the gateway reads it back from pg_class.
    db.execute(
        r#"CREATE TABLE "x""; CREATE TABLE pwned (); --" PARTITION OF location_updates
             FOR VALUES FROM ('2001-01-01') TO ('2001-01-02');
           CREATE TABLE "y; CREATE TABLE pwned2 (); --" PARTITION OF poll_results
             FOR VALUES FROM ('2001-01-01') TO ('2001-01-02')"#,
    );
    let policy = PartitionPolicy {
        interval: Duration::from_secs(86_400),
        behind: Duration::from_secs(2 * 86_400),
        ahead: Duration::from_secs(86_400),
        retention: Some(Duration::from_secs(30 * 86_400)),
    };
    let table = &partitions::TABLES[0];
    let indexed = runtime.block_on(async {
        let (mut client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        // The history index first (the partition's time is past), then the drop past the retention.
        let indexed = partitions::index_partitions(&client, table).await.unwrap();
        partitions::maintain_all(&mut client, &policy, time::OffsetDateTime::now_utc())
            .await
            .unwrap();
        indexed
    });
    assert!(indexed.iter().any(|n| n.contains("pwned")), "{indexed:?}");
    let injected: i64 = db.query("SELECT count(*) FROM pg_class WHERE relname IN ('pwned', 'pwned2')")[0].get(0);
    let left: i64 = db.query("SELECT count(*) FROM pg_class WHERE relname LIKE '%pwned%'")[0].get(0);
    assert_eq!(
        (injected, left),
        (0, 0),
        "the names' SQL ran, or the partitions were not dropped"
    );
}
