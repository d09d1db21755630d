//! `/stats`, `/metrics`, `/healthz` and `/readyz` report the right figures after a known load.

use std::collections::{BTreeMap, BTreeSet};
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
    let app = spawn_app(|s| s.http.admin_listen = Some(format!("127.0.0.1:{admin_port}")));
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

/// The metric table of docs/observability.md: for each metric name it lists, the types its row gives.
fn documented_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let page = include_str!("../../docs/observability.md");
    let table = page
        .split("| metric | type | meaning |")
        .nth(1)
        .expect("docs/observability.md has the metric table");
    let mut metrics = BTreeMap::new();
    for row in table.lines().skip(1).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let types: BTreeSet<String> = cells[2].split([',', '/']).map(|t| t.trim().to_owned()).collect();
        for name in cells[1].split('`').skip(1).step_by(2) {
            // `ingest_http_requests_total{route,status}`: the name without its labels.
            let name = name.split('{').next().unwrap_or(name);
            metrics.insert(name.to_owned(), types.clone());
        }
    }
    metrics
}

/// The metric names src/metrics.rs defines, as its `pub const NAME: &str = "ingest_…";` lines give them.
fn defined_metric_names() -> BTreeSet<String> {
    include_str!("../../src/metrics.rs")
        .lines()
        .filter(|l| l.starts_with("pub const ") && l.contains(": &str = \"ingest_"))
        .filter_map(|l| l.split('"').nth(1))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_metric_table_of_the_docs_lists_every_metric_the_gateway_defines_and_exports_with_its_type() {
    let documented = documented_metrics();
    let defined = defined_metric_names();
    let listed: BTreeSet<String> = documented
        .keys()
        .filter(|name| name.starts_with("ingest_"))
        .cloned()
        .collect();
    let undocumented: Vec<_> = defined.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&defined).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/observability.md's metric table differs from src/metrics.rs: defined but not listed {undocumented:?}, \
         listed but not defined {unknown:?}"
    );

    // What a running gateway with every listener exports: each family is listed, with the type it has.
    let app = spawn_app(|s| {
        s.trackers.teltonika_listen = Some("127.0.0.1:0".to_owned());
        s.trackers.gt06_listen = Some("127.0.0.1:0".to_owned());
    });
    assert_eq!(
        app.post_json("/api/v1/location/update", &location_array("families", 2))
            .status,
        202
    );
    app.wait_until_all_written();
    let metrics = app.get("/metrics").body;
    let mut exported = 0;
    for line in metrics.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut words = line.split_whitespace().skip(2);
        let (name, kind) = (words.next().unwrap(), words.next().unwrap());
        let key = if name.starts_with("process_") {
            "process_*"
        } else {
            name
        };
        let types = documented
            .get(key)
            .unwrap_or_else(|| panic!("{name} is exported but not in docs/observability.md's metric table"));
        if key != "process_*" {
            assert!(types.contains(kind), "{name} is a {kind}; the docs say {types:?}");
            exported += 1;
        }
    }
    assert!(exported > 30, "the gateway exported {exported} families of its own");
}

#[test]
fn the_docs_name_every_reason_an_update_is_refused_for() {
    let page = include_str!("../../docs/observability.md");
    let row = page
        .lines()
        .find(|l| l.starts_with("| `ingest_updates_rejected_total{reason}`"))
        .expect("the row of ingest_updates_rejected_total");
    let meaning = row.split('|').nth(3).unwrap();
    let documented: BTreeSet<&str> = meaning.split('`').skip(1).step_by(2).collect();
    let reasons: BTreeSet<&str> = ingest_gateway::metrics::RejectReason::ALL
        .iter()
        .map(|r| r.as_str())
        .collect();
    assert_eq!(documented, reasons, "docs/observability.md against RejectReason");
}
