//! Migrations apply once: a second run applies nothing and leaves the tables as they are.

use ingest_gateway::db::{migrate, DatabaseTls};

use crate::helpers::{fresh_database, shared_cluster, Db};

#[test]
fn a_second_migration_run_applies_nothing() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let config = cluster.config(&name);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let first = runtime.block_on(migrate::run(&config, &DatabaseTls::off())).unwrap();
    let second = runtime.block_on(migrate::run(&config, &DatabaseTls::off())).unwrap();

    assert_eq!(
        first.applied,
        [
            "V1__create_location_updates",
            "V2__create_poll_results",
            "V3__natural_keys_dead_letters_wal_progress",
            "V4__progress_per_instance",
            "V5__device_positions",
            "V6__time_partitions",
            "V7__tracker_dead_letters"
        ]
    );
    assert!(second.applied.is_empty());
    let db = Db::connect(config);
    assert_eq!(db.count("location_updates"), 0);
    assert_eq!(db.count("poll_results"), 0);
    assert_eq!(db.count("dead_letters"), 0);
    assert_eq!(db.count("refinery_schema_history"), 7);
}
