//! API keys and rate limits on a real gateway: who may write which stream and which devices or projects, how
//! fast, what a refusal says — and that nothing refused is stored; the keys file re-read on SIGHUP by a running
//! process without dropping its connections.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use ingest_gateway::config::{RateLimit, Settings};
use ingest_gateway::keys_file::hashed;
use ingest_gateway::startup::Application;

use crate::helpers::{
    connection_string, fresh_database, location_array, location_json, now_rfc3339, shared_cluster, spawn_app, Db,
    GatewayProcess, TestApp,
};

const LOCATION: &str = "/api/v1/location/update";
const POLL: &str = "/api/v1/poll/update";

/// A key as `new-key` makes them (`igk_` and 64 hex digits), different for each `n`.
fn key(n: u8) -> String {
    format!("igk_{}", format!("{n:02x}").repeat(32))
}

/// A keys file in its own directory, removed with it.
struct KeysFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl KeysFile {
    fn new(lines: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = KeysFile {
            path: dir.path().join("api-keys"),
            _dir: dir,
        };
        file.write(lines);
        file
    }

    fn write(&self, lines: &[String]) {
        std::fs::write(&self.path, lines.join("\n") + "\n").unwrap();
    }
}

/// The keys-file line for `key`: its name, hash and grant.
fn line(name: &str, key: &str, grant: &str) -> String {
    format!("{name} {} {grant}", hashed(key))
}

/// A gateway in this process with the keys in `keys`, tuned further by `tune`.
fn app_with_keys(keys: &KeysFile, tune: impl FnOnce(&mut Settings)) -> TestApp {
    let path = keys.path.clone();
    spawn_app(move |s| {
        s.auth.api_keys_file = Some(path);
        tune(s);
    })
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

fn post_with_key(app: &TestApp, path: &str, body: &str, key: &str) -> crate::helpers::Answer {
    let auth = bearer(key);
    app.post(
        path,
        body.as_bytes(),
        &[("Content-Type", "application/json"), ("Authorization", &auth)],
    )
}

/// Status and `WWW-Authenticate` of a POST with `headers`.
fn www_authenticate_of(address: &str, headers: &[(&str, &str)]) -> (u16, Option<String>) {
    let mut request = ureq::post(&format!("{address}{LOCATION}"));
    for (name, value) in headers {
        request = request.set(name, value);
    }
    let response = match request.send_string(&location_json("truck-1")) {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    (
        response.status(),
        response.header("WWW-Authenticate").map(str::to_owned),
    )
}

/// Commits one update through `key`, waits until everything accepted is written, and returns how many location
/// rows are stored then: a refused request that had been stored would show.
fn stored_after_a_committed_marker(app: &TestApp, key: &str, device_id: &str) -> i64 {
    let marker = post_with_key(app, &format!("{LOCATION}?ack=commit"), &location_json(device_id), key);
    assert_eq!(marker.status, 202, "{}", marker.body);
    app.wait_until_all_written();
    app.db.count("location_updates")
}

fn poll_json(project_id: i64) -> String {
    format!(
        r#"{{"project_id":{project_id},"polled_at":"{}","success":true}}"#,
        now_rfc3339()
    )
}

#[test]
fn without_a_key_a_write_gets_401_and_nothing_is_stored() {
    let keys = KeysFile::new(&[line("fleet", &key(1), "streams=location")]);
    let app = app_with_keys(&keys, |_| {});

    let answer = app.post_json(LOCATION, &location_json("truck-1"));

    assert_eq!(answer.status, 401, "{}", answer.body);
    assert_eq!(answer.json()["error"], "unauthorized");
    assert!(answer.json()["message"].as_str().unwrap().contains("X-API-Key"));
    let (status, challenge) = www_authenticate_of(&app.address, &[("Content-Type", "application/json")]);
    assert_eq!(
        (status, challenge.as_deref()),
        (401, Some("Bearer realm=\"ingest-gateway\""))
    );
    assert_eq!(stored_after_a_committed_marker(&app, &key(1), "truck-marker"), 1);
}

#[test]
fn an_unknown_key_gets_401_with_a_bearer_challenge_and_nothing_is_stored() {
    let keys = KeysFile::new(&[line("fleet", &key(1), "streams=location")]);
    let app = app_with_keys(&keys, |_| {});

    let answer = post_with_key(&app, LOCATION, &location_json("truck-1"), &key(2));

    assert_eq!(answer.status, 401, "{}", answer.body);
    assert_eq!(answer.json()["error"], "unauthorized");
    let auth = bearer(&key(2));
    let (_, challenge) = www_authenticate_of(&app.address, &[("Authorization", &auth)]);
    let challenge = challenge.expect("a WWW-Authenticate header");
    assert!(
        challenge.starts_with("Bearer ") && challenge.contains("invalid_token"),
        "{challenge}"
    );
    assert_eq!(stored_after_a_committed_marker(&app, &key(1), "truck-marker"), 1);
}

#[test]
fn a_key_gets_403_for_a_stream_it_may_not_write_and_nothing_is_stored() {
    let keys = KeysFile::new(&[line("fleet", &key(1), "streams=location")]);
    let app = app_with_keys(&keys, |_| {});

    let answer = post_with_key(&app, &format!("{POLL}?ack=commit"), &poll_json(7), &key(1));

    assert_eq!(answer.status, 403, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["error"], "forbidden");
    assert_eq!(body["details"][0]["stream"], "poll");
    assert_eq!(body["details"][0]["allowed_streams"], serde_json::json!(["location"]));
    assert_eq!(app.db.count("poll_results"), 0);
}

#[test]
fn one_update_outside_the_keys_devices_refuses_the_whole_request_and_nothing_is_stored() {
    let keys = KeysFile::new(&[line("fleet", &key(1), "streams=location devices=truck-,van-")]);
    let app = app_with_keys(&keys, |_| {});
    let body = format!(
        "[{},{},{}]",
        location_json("truck-1"),
        location_json("car-2"),
        location_json("van-3")
    );

    let answer = post_with_key(&app, LOCATION, &body, &key(1));

    assert_eq!(answer.status, 403, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["error"], "forbidden");
    assert_eq!(body["details"].as_array().unwrap().len(), 1);
    assert_eq!(body["details"][0]["index"], 1);
    assert_eq!(body["details"][0]["field"], "device_id");
    assert_eq!(stored_after_a_committed_marker(&app, &key(1), "truck-marker"), 1);
    assert_eq!(app.db.device_ids(), vec![("truck-marker".to_owned(), 1)]);
}

#[test]
fn updates_inside_the_scope_are_accepted_with_either_header_and_land() {
    let keys = KeysFile::new(&[line("fleet", &key(1), "streams=location devices=truck-")]);
    let app = app_with_keys(&keys, |_| {});

    let by_bearer = post_with_key(
        &app,
        &format!("{LOCATION}?ack=commit"),
        &location_array("truck-a", 3),
        &key(1),
    );
    let by_header = app.post(
        &format!("{LOCATION}?ack=commit"),
        location_json("truck-b").as_bytes(),
        &[("Content-Type", "application/json"), ("X-API-Key", &key(1))],
    );

    assert_eq!(by_bearer.status, 202, "{}", by_bearer.body);
    assert_eq!(by_bearer.json()["accepted"], 3);
    assert_eq!(by_header.status, 202, "{}", by_header.body);
    assert_eq!(app.db.count("location_updates"), 4);
}

#[test]
fn a_poll_key_is_held_to_its_project_range() {
    let keys = KeysFile::new(&[line("pollers", &key(1), "streams=poll projects=1-10,42")]);
    let app = app_with_keys(&keys, |_| {});

    let outside = post_with_key(&app, POLL, &format!("[{},{}]", poll_json(5), poll_json(11)), &key(1));
    let inside = post_with_key(
        &app,
        &format!("{POLL}?ack=commit"),
        &format!("[{},{}]", poll_json(10), poll_json(42)),
        &key(1),
    );

    assert_eq!(outside.status, 403, "{}", outside.body);
    assert_eq!(outside.json()["details"][0]["index"], 1);
    assert_eq!(outside.json()["details"][0]["field"], "project_id");
    assert_eq!(inside.status, 202, "{}", inside.body);
    let stored: Vec<i64> = app
        .db
        .query("SELECT project_id FROM poll_results ORDER BY project_id")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, [10, 42]);
}

#[test]
fn health_stats_and_metrics_stay_open_when_keys_are_in_force() {
    let keys = KeysFile::new(&[line("fleet", &key(1), "streams=location")]);
    let app = app_with_keys(&keys, |_| {});

    for path in ["/healthz", "/readyz", "/stats", "/metrics"] {
        assert_eq!(app.get(path).status, 200, "{path}");
    }
}

#[test]
fn requests_are_counted_by_key_name_and_outcome() {
    let keys = KeysFile::new(&[line("fleet", &key(1), "streams=location devices=truck-")]);
    let app = app_with_keys(&keys, |_| {});

    post_with_key(&app, LOCATION, &location_json("truck-1"), &key(1));
    post_with_key(&app, LOCATION, &location_json("car-1"), &key(1));
    post_with_key(&app, POLL, &poll_json(1), &key(1));
    app.post_json(LOCATION, &location_json("truck-1"));

    let metrics = app.get("/metrics").body;
    for expected in [
        r#"ingest_requests_by_key_total{key="fleet",outcome="accepted"} 1"#,
        r#"ingest_requests_by_key_total{key="fleet",outcome="forbidden"} 2"#,
        r#"ingest_updates_rejected_total{reason="unauthorized",stream="location"} 1"#,
        r#"ingest_updates_rejected_total{reason="forbidden",stream="location"} 1"#,
        r#"ingest_updates_rejected_total{reason="forbidden",stream="poll"} 1"#,
    ] {
        assert!(metrics.contains(expected), "{expected} not in:\n{metrics}");
    }
    assert!(!metrics.contains(&key(1)), "a key appears in /metrics");
}

#[test]
fn over_the_keys_rate_a_request_gets_429_with_retry_after_and_is_not_stored() {
    let keys = KeysFile::new(&[
        line("slow", &key(1), "streams=location rate=1:5"),
        line("other", &key(2), "streams=location"),
    ]);
    let app = app_with_keys(&keys, |_| {});

    let first = post_with_key(&app, LOCATION, &location_array("slow-a", 5), &key(1));
    let spent = post_with_key(&app, LOCATION, &location_array("slow-b", 3), &key(1));
    // One token back: the request's first, taken before its body is read; its other two are not there.
    std::thread::sleep(Duration::from_millis(1100));
    let second = post_with_key(&app, LOCATION, &location_array("slow-c", 3), &key(1));
    std::thread::sleep(Duration::from_millis(1100));
    let too_big = post_with_key(&app, LOCATION, &location_array("slow-d", 6), &key(1));

    assert_eq!(first.status, 202, "{}", first.body);
    // Refused before its body is read: one token, back within a second.
    assert_eq!(spent.status, 429, "{}", spent.body);
    assert_eq!(spent.retry_after.as_deref(), Some("1"));
    assert_eq!(second.status, 429, "{}", second.body);
    assert_eq!(second.json()["error"], "rate_limited");
    // Three updates at one per second: the whole request, its first token again included.
    let retry_after: u64 = second.retry_after.as_deref().expect("Retry-After").parse().unwrap();
    assert!((2..=3).contains(&retry_after), "{retry_after}");
    assert_eq!(second.json()["details"][0]["retry_after_seconds"], retry_after);
    // More than the burst could never pass: split it, do not retry it.
    assert_eq!(too_big.status, 413, "{}", too_big.body);
    assert_eq!(too_big.json()["details"][0]["limit_updates"], 5);
    // Another key has its own allowance (none here: no INGEST_RATE_LIMIT).
    let marker = post_with_key(&app, LOCATION, &location_json("other-marker"), &key(2));
    assert_eq!(marker.status, 202, "{}", marker.body);
    app.wait_until_all_written();
    assert_eq!(app.db.count("location_updates"), 6);
    let metrics = app.get("/metrics").body;
    // The request refused before its body was read counts as one update: its updates were never read.
    assert!(metrics.contains(r#"ingest_updates_rejected_total{reason="rate_limited",stream="location"} 4"#));
    assert!(metrics.contains(r#"ingest_requests_by_key_total{key="slow",outcome="rate_limited"} 2"#));
}

#[test]
fn the_default_rate_applies_to_each_key_apart() {
    let keys = KeysFile::new(&[
        line("a", &key(1), "streams=location"),
        line("b", &key(2), "streams=location"),
    ]);
    let app = app_with_keys(&keys, |s| s.auth.rate_limit = Some("1:2".parse::<RateLimit>().unwrap()));

    assert_eq!(
        post_with_key(&app, LOCATION, &location_array("a", 2), &key(1)).status,
        202
    );
    assert_eq!(
        post_with_key(&app, LOCATION, &location_json("a-more"), &key(1)).status,
        429
    );
    assert_eq!(
        post_with_key(&app, LOCATION, &location_array("b", 2), &key(2)).status,
        202
    );
}

#[test]
fn without_keys_the_rate_limit_is_per_client_address() {
    let app = spawn_app(|s| s.auth.rate_limit_per_address = Some("1:3".parse::<RateLimit>().unwrap()));

    let first = app.post_json(LOCATION, &location_array("addr", 3));
    let second = app.post_json(LOCATION, &location_json("addr-more"));

    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(second.status, 429, "{}", second.body);
    assert_eq!(second.json()["details"][0]["limit"], "client address");
    assert!(second.retry_after.is_some());
}

#[test]
fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_allowance_and_a_stranger_cannot_forge_one() {
    fn behind_proxy(forwarded: &str) -> [(&str, &str); 2] {
        [("Content-Type", "application/json"), ("X-Forwarded-For", forwarded)]
    }
    let app = spawn_app(|s| {
        s.auth.rate_limit_per_address = Some("1:3".parse::<RateLimit>().unwrap());
        s.auth.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    });
    let first = app.post(
        LOCATION,
        location_array("xff-a", 3).as_bytes(),
        &behind_proxy("198.51.100.1"),
    );
    let same_client = app.post(
        LOCATION,
        location_json("xff-a-more").as_bytes(),
        &behind_proxy("198.51.100.1"),
    );
    let other_client = app.post(
        LOCATION,
        location_array("xff-b", 3).as_bytes(),
        &behind_proxy("198.51.100.2"),
    );
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(same_client.status, 429, "{}", same_client.body);
    assert_eq!(other_client.status, 202, "{}", other_client.body);

    // Without a trusted proxy the header is the client's own word: every request counts against its address.
    let app = spawn_app(|s| s.auth.rate_limit_per_address = Some("1:3".parse::<RateLimit>().unwrap()));
    let first = app.post(
        LOCATION,
        location_array("forged-a", 3).as_bytes(),
        &behind_proxy("198.51.100.1"),
    );
    let forged = app.post(
        LOCATION,
        location_json("forged-b").as_bytes(),
        &behind_proxy("198.51.100.2"),
    );
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(forged.status, 429, "{}", forged.body);
}

#[test]
fn a_keys_file_with_a_bad_line_refuses_the_start_and_names_the_line() {
    let keys = KeysFile::new(&[
        line("fleet", &key(1), "streams=location"),
        line("pollers", &key(2), "streams=polls"),
    ]);
    let data_dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::defaults();
    settings.storage.data_dir = data_dir.path().to_owned();
    settings.auth.api_keys_file = Some(keys.path.clone());

    let error = format!(
        "{:#}",
        Application::build(&settings).err().expect("the start is refused")
    );

    assert!(error.contains("line 2") && error.contains("\"polls\""), "{error}");
    assert!(error.contains(&keys.path.display().to_string()), "{error}");
    // Refused before anything was touched.
    assert_eq!(std::fs::read_dir(data_dir.path()).unwrap().count(), 0);
}

/// One HTTP/1.1 connection, kept open across requests.
struct Connection {
    reader: BufReader<TcpStream>,
}

impl Connection {
    fn open(address: &str) -> Self {
        let stream = TcpStream::connect(address.trim_start_matches("http://")).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Connection {
            reader: BufReader::new(stream),
        }
    }

    /// POSTs a location update with `key`; returns the status. Fails if the gateway closed the connection.
    fn post_location(&mut self, key: &str, device_id: &str) -> u16 {
        let body = location_json(device_id);
        let request = format!(
            "POST {LOCATION} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nAuthorization: Bearer \
             {key}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.reader.get_mut().write_all(request.as_bytes()).unwrap();
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line).unwrap();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP answer on the kept connection: {status_line:?}"));
        let mut length = 0;
        loop {
            let mut header = String::new();
            self.reader.read_line(&mut header).unwrap();
            if header == "\r\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        status
    }
}

#[test]
fn sighup_rereads_the_keys_file_without_dropping_connections() {
    let (old, new) = (key(1), key(2));
    let keys = KeysFile::new(&[line("old", &old, "streams=location")]);
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let data_dir = tempfile::tempdir().unwrap();
    let gateway = GatewayProcess::start(&[
        ("DATABASE_URL", connection_string(&cluster.config(&name))),
        ("INGEST_DATA_DIR", data_dir.path().display().to_string()),
        ("INGEST_API_KEYS_FILE", keys.path.display().to_string()),
    ]);
    let address = gateway.address.clone();
    let mut kept = Connection::open(&address);
    assert_eq!(kept.post_location(&old, "before-1"), 202);
    assert_eq!(Connection::open(&address).post_location(&new, "before-2"), 401);

    keys.write(&[line("new", &new, "streams=location")]);
    assert!(gateway.reload("api keys"), "the new file is taken");
    assert_eq!(Connection::open(&address).post_location(&new, "probe"), 202);

    // The connection opened before the reload still serves, under the new keys. (A 401 closes a connection:
    // its body is never read, so it goes last.)
    assert_eq!(kept.post_location(&new, "after-1"), 202);
    assert_eq!(kept.post_location(&old, "after-2"), 401);
    let metrics = ureq::get(&format!("{address}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(metrics.contains(r#"key="new""#), "the new key is counted");
    assert!(
        !metrics.contains(r#"key="old""#),
        "a removed key's series is no longer exported"
    );

    // A file that cannot be used puts no key in force (it may be the edit that revoked a leaked one): every write
    // gets 503 until a good file is loaded, and the gateway runs on.
    keys.write(&["this is not a key line".to_owned()]);
    assert!(!gateway.reload("api keys"), "the broken file is refused");
    assert_eq!(Connection::open(&address).post_location(&new, "after-broken"), 503);
    assert_eq!(Connection::open(&address).post_location(&old, "after-broken-old"), 503);

    let mut gateway = gateway;
    assert!(gateway.try_wait().is_none(), "the gateway runs on");
    assert!(gateway.terminate().success());
    let db = Db::connect(cluster.config(&name));
    let mut stored: Vec<String> = db.device_ids().into_iter().map(|(id, _)| id).collect();
    stored.sort();
    assert_eq!(stored, ["after-1", "before-1", "probe"]);
}
