//! `/stats`, `/metrics`, `/healthz` and `/readyz` report the right figures after a known load.

use std::time::Duration;

use crate::helpers::{eventually, location_array, now_rfc3339, spawn_app};

#[test]
fn stats_and_metrics_count_a_known_load_exactly() {
    let app = spawn_app(|_| {});
    for n in [1, 9, 20] {
        assert_eq!(
            app.post_json("/api/v1/location/update", &location_array("obs", n))
                .status,
            202
        );
    }
    let poll = format!(r#"[{{"project_id":1,"polled_at":"{}","success":true}}]"#, now_rfc3339());
    assert_eq!(app.post_json("/api/v1/poll/update", &poll).status, 202);
    assert_eq!(app.post_json("/api/v1/location/update", "[{},{},{}]").status, 422);
    assert_eq!(app.post_json("/api/v1/location/update", "{").status, 400);
    eventually("every update is written", Duration::from_secs(10), || {
        app.db.count("location_updates") == 30 && app.db.count("poll_results") == 1
    });

    let stats = app.get("/stats").json();
    let location = &stats["streams"]["location"];
    assert_eq!(location["accepted"], 30);
    assert_eq!(location["written"], 30);
    assert_eq!(location["rejected"], 4);
    assert_eq!(location["rejected_by_reason"]["invalid_update"], 3);
    assert_eq!(location["rejected_by_reason"]["invalid_json"], 1);
    assert_eq!(location["queue_depth"], 0);
    assert_eq!(location["queue_capacity"], 100_000);
    assert_eq!(location["batch_failures"], 0);
    assert_eq!(location["oldest_pending_age_ms"], 0.0);
    assert!(location["batches_written"].as_u64().unwrap() >= 1);
    assert!(location["last_batch_at"].is_string());
    assert_eq!(stats["streams"]["poll"]["written"], 1);

    let metrics = app.get("/metrics").body;
    for line in [
        r#"ingest_updates_accepted_total{stream="location"} 30"#,
        r#"ingest_updates_written_total{stream="location"} 30"#,
        r#"ingest_updates_written_total{stream="poll"} 1"#,
        r#"ingest_updates_rejected_total{reason="invalid_update",stream="location"} 3"#,
        r#"ingest_queue_depth{stream="location"} 0"#,
        r#"ingest_queue_capacity{stream="poll"} 100000"#,
        r#"ingest_http_requests_total{route="/api/v1/location/update",status="202"} 3"#,
        r#"ingest_http_requests_total{route="/api/v1/location/update",status="422"} 1"#,
        r#"ingest_batch_rows_sum{stream="location"} 30"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing `{line}` in:\n{metrics}");
    }
    for family in [
        "ingest_batch_write_duration_seconds_bucket",
        "ingest_http_request_duration_seconds_bucket",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(family), "missing {family}");
    }
}

#[test]
fn health_and_readiness_answer_when_all_is_well() {
    let app = spawn_app(|_| {});
    assert_eq!(app.get("/healthz").json()["status"], "ok");
    let ready = app.get("/readyz");
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json()["status"], "ready");
}

#[test]
fn a_request_id_is_echoed_when_given_and_made_when_not() {
    let app = spawn_app(|_| {});
    let given = app.post(
        "/api/v1/location/update",
        b"{",
        &[("Content-Type", "application/json"), ("X-Request-Id", "client-42")],
    );
    assert_eq!(given.status, 400);
    assert_eq!(given.request_id.as_deref(), Some("client-42"));
    let made = [app.get("/healthz"), app.get("/healthz")].map(|a| a.request_id.expect("an id is made"));
    assert_ne!(made[0], made[1], "each request gets its own");
}

#[test]
fn with_an_admin_listener_operators_pages_live_apart_from_the_public_port() {
    let admin_port = crate::helpers::free_port();
    let app = spawn_app(|s| s.admin_listen = Some(format!("127.0.0.1:{admin_port}")));
    let admin = format!("http://127.0.0.1:{admin_port}");
    let get = |url: String| match ureq::get(&url).call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{e}"),
    };

    assert_eq!(
        app.post_json("/api/v1/location/update", &crate::helpers::location_json("public"))
            .status,
        202
    );
    for path in ["/metrics", "/stats", "/readyz", "/"] {
        assert_eq!(app.get(path).status, 404, "{path} is not public");
        assert_eq!(get(format!("{admin}{path}")), 200, "{path} is on the admin listener");
    }
    assert_eq!(app.get("/healthz").status, 200);
    assert_eq!(get(format!("{admin}/healthz")), 200);
    let ingest = ureq::post(&format!("{admin}/api/v1/location/update")).send_string("{}");
    assert!(
        matches!(ingest, Err(ureq::Error::Status(404, _))),
        "no ingest on the admin listener"
    );
}
