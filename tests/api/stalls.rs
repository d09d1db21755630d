//! Writers that cannot make progress are visible: a privilege revoked under the gateway stalls its writers, which
//! `/stats`, `/metrics` and `/readyz` say with the reason, and everything accepted meanwhile lands once the
//! privilege is granted again.

use std::time::Duration;

use crate::helpers::{eventually, fresh_database, location_json, shared_cluster, spawn_app_on, Db};

#[test]
fn a_writer_stalled_by_a_revoked_privilege_is_visible_and_recovers_when_it_is_granted_again() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let admin = Db::connect(cluster.config(&name));
    let role = format!("writer_{name}");
    admin.execute(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{role}'; ALTER DATABASE {name} OWNER TO {role}; \
         GRANT ALL ON SCHEMA public TO {role}"
    ));
    let mut config = cluster.config(&name);
    config.user(&role).password(&role);
    let app = spawn_app_on(config, |s| s.pipeline.stall_timeout = Duration::from_secs(1));
    let route = "/api/v1/location/update";
    assert_eq!(app.post_json(route, &location_json("before")).status, 202);
    eventually("the first update lands", Duration::from_secs(10), || {
        app.db.count("location_updates") == 1
    });

    admin.execute(&format!("REVOKE INSERT ON location_updates FROM {role}"));
    for i in 0..5 {
        assert_eq!(app.post_json(route, &location_json(&format!("during-{i}"))).status, 202);
    }
    eventually("the stall is visible", Duration::from_secs(30), || {
        let stats = app.get("/stats").json();
        let ready = app.get("/readyz");
        stats["streams"]["location"]["writers_failing_reason"] == "sqlstate_42"
            && ready.status == 503
            && ready.body.contains("failed to write")
    });
    let metrics = app.get("/metrics").body;
    assert!(
        metrics.contains(r#"ingest_writer_stalled_seconds{reason="sqlstate_42",stream="location"}"#),
        "{metrics}"
    );

    admin.execute(&format!("GRANT INSERT ON location_updates TO {role}"));
    eventually("everything accepted lands", Duration::from_secs(30), || {
        app.db.count("location_updates") == 6
    });
    eventually("the gateway is ready again", Duration::from_secs(30), || {
        app.get("/readyz").status == 200
    });
    assert_eq!(
        app.get("/stats").json()["streams"]["location"]["writers_failing_s"],
        0.0
    );
    assert!(app
        .get("/metrics")
        .body
        .contains(r#"ingest_writer_stalled_seconds{reason="none",stream="location"} 0"#));
}
