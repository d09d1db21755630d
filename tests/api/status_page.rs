//! `GET /` serves the status page — HTML, with a strict Content-Security-Policy — and only `/` does; the figures
//! it draws come from `/stats`. (The page itself is driven in a browser by `tests/browser/status_page.py`.)

use crate::helpers::spawn_app;

#[test]
fn the_root_serves_the_status_page_with_a_strict_content_security_policy() {
    let app = spawn_app(|_| {});
    let response = ureq::get(&format!("{}/", app.address)).call().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.content_type(), "text/html");
    let policy = response.header("Content-Security-Policy").unwrap().to_owned();
    assert_eq!(response.header("X-Content-Type-Options"), Some("nosniff"));
    let page = response.into_string().unwrap();
    assert!(page.contains("<title>ingest-gateway"));
    assert!(page.contains("fetch('stats'"), "the page draws /stats");
    for directive in [
        "default-src 'none'",
        "script-src 'sha256-",
        "style-src 'sha256-",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{directive} missing from {policy}");
    }
    assert!(!policy.contains("unsafe"), "{policy}");
}

#[test]
fn only_the_exact_root_is_the_page_and_other_unknown_paths_keep_the_json_404() {
    let app = spawn_app(|_| {});
    for path in ["/index.html", "/status", "//", "/stats/"] {
        let answer = app.get(path);
        assert_eq!(answer.status, 404, "{path}");
        assert_eq!(answer.json()["error"], "not_found", "{path}");
    }
}

#[test]
fn stats_carry_the_clock_and_the_replay_the_page_shows() {
    let app = spawn_app(|_| {});
    let stats = app.get("/stats").json();
    assert!(stats["now_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let location = &stats["streams"]["location"];
    assert_eq!(location["replaying"], false);
    assert_eq!(location["replay_done_bytes"], 0);
    assert_eq!(location["replay_total_bytes"], 0);
}
