//! Every rule: a request that breaks it gets the right status and detail, and stores nothing.

use serde_json::Value;

use crate::helpers::{gzip, now_rfc3339, spawn_app, TestApp};

const LOCATION: &str = "/api/v1/location/update";
const POLL: &str = "/api/v1/poll/update";

/// Posts `body` and checks the answer is a 422 naming `field` of update `index`.
fn assert_422(app: &TestApp, path: &str, body: &str, index: usize, field: Option<&str>) {
    let answer = app.post_json(path, body);
    assert_eq!(answer.status, 422, "{body} → {}", answer.body);
    let json = answer.json();
    assert_eq!(json["error"], "invalid_update");
    let details = json["details"].as_array().unwrap();
    let named = details
        .iter()
        .any(|d| d["index"] == index && d["field"] == field.map_or(Value::Null, Value::from));
    assert!(named, "{body}: expected update {index} field {field:?} in {details:?}");
    assert!(details
        .iter()
        .all(|d| d["reason"].as_str().is_some_and(|r| !r.is_empty())));
}

/// Checks that nothing was stored, after letting anything queued be written.
fn assert_nothing_stored(mut app: TestApp) {
    let outcome = app.stop();
    assert!(outcome.is_clean());
    assert_eq!(app.db.count("location_updates"), 0);
    assert_eq!(app.db.count("poll_results"), 0);
}

#[test]
fn each_broken_location_rule_gets_422_with_the_field_and_stores_nothing() {
    let app = spawn_app(|_| {});
    let now = now_rfc3339();
    let update = |device: &str, at: &str, lat: &str, lon: &str, extra: &str| {
        format!(r#"{{"device_id":{device},"recorded_at":{at},"lat":{lat},"lon":{lon}{extra}}}"#)
    };
    let ok_at = format!("\"{now}\"");
    let cases: Vec<(String, &str)> = vec![
        (
            r#"{"recorded_at":"2026-01-01T00:00:00Z","lat":1,"lon":1}"#.to_owned(),
            "device_id",
        ),
        (update("\"\"", &ok_at, "1", "1", ""), "device_id"),
        (
            update(&format!("\"{}\"", "a".repeat(65)), &ok_at, "1", "1", ""),
            "device_id",
        ),
        (update("\"truck 1\"", &ok_at, "1", "1", ""), "device_id"),
        (update("\"trück\"", &ok_at, "1", "1", ""), "device_id"),
        (update("42", &ok_at, "1", "1", ""), "device_id"),
        (update("\"d\"", "\"yesterday\"", "1", "1", ""), "recorded_at"),
        (update("\"d\"", "\"2026-11-22T10:00:00\"", "1", "1", ""), "recorded_at"),
        (update("\"d\"", "\"2099-01-01T00:00:00Z\"", "1", "1", ""), "recorded_at"),
        (update("\"d\"", "\"2000-01-01T00:00:00Z\"", "1", "1", ""), "recorded_at"),
        (update("\"d\"", "1.5", "1", "1", ""), "recorded_at"),
        (update("\"d\"", &ok_at, "90.0001", "1", ""), "lat"),
        (update("\"d\"", &ok_at, "-91", "1", ""), "lat"),
        (update("\"d\"", &ok_at, "\"45\"", "1", ""), "lat"),
        (update("\"d\"", &ok_at, "null", "1", ""), "lat"),
        (update("\"d\"", &ok_at, "1", "180.5", ""), "lon"),
        (update("\"d\"", &ok_at, "1", "[1]", ""), "lon"),
        (update("\"d\"", &ok_at, "1", "1", r#","speed_kmh":400.1"#), "speed_kmh"),
        (update("\"d\"", &ok_at, "1", "1", r#","speed_kmh":-0.1"#), "speed_kmh"),
        (
            update("\"d\"", &ok_at, "1", "1", r#","heading_deg":360"#),
            "heading_deg",
        ),
        (update("\"d\"", &ok_at, "1", "1", r#","heading_deg":-1"#), "heading_deg"),
        (
            update("\"d\"", &ok_at, "1", "1", r#","accuracy_m":100000.5"#),
            "accuracy_m",
        ),
        (update("\"d\"", &ok_at, "1", "1", r#","accuracy_m":true"#), "accuracy_m"),
        (
            update(
                "\"d\"",
                &ok_at,
                "1",
                "1",
                &format!(r#","notes":"{}""#, "x".repeat(4100)),
            ),
            "attributes",
        ),
        (update("\"d\"", &ok_at, "1", "1", r#","lat":2"#), "lat"),
        (update("\"d\"", &ok_at, "1", "1", r#","tag":1,"tag":2"#), "tag"),
    ];
    for (body, field) in &cases {
        assert_422(&app, LOCATION, body, 0, Some(field));
    }
    assert_nothing_stored(app);
}

#[test]
fn each_broken_poll_rule_gets_422_with_the_field_and_stores_nothing() {
    let app = spawn_app(|_| {});
    let now = now_rfc3339();
    let poll = |extra: &str| format!(r#"{{"project_id":1,"polled_at":"{now}","success":true{extra}}}"#);
    let cases: Vec<(String, &str)> = vec![
        (format!(r#"{{"polled_at":"{now}","success":true}}"#), "project_id"),
        (poll(r#","project_id":0"#), "project_id"),
        (poll(r#","project_id":9223372036854775808"#), "project_id"),
        (poll(r#","project_id":1.5"#), "project_id"),
        (poll(r#","project_id":"1""#), "project_id"),
        (r#"{"project_id":1,"success":true}"#.to_owned(), "polled_at"),
        (
            r#"{"project_id":1,"polled_at":"2099-01-01T00:00:00Z","success":true}"#.to_owned(),
            "polled_at",
        ),
        (format!(r#"{{"project_id":1,"polled_at":"{now}"}}"#), "success"),
        (
            format!(r#"{{"project_id":1,"polled_at":"{now}","success":1}}"#),
            "success",
        ),
        (poll(r#","status_code":99"#), "status_code"),
        (poll(r#","status_code":600"#), "status_code"),
        (poll(r#","status_code":200.5"#), "status_code"),
        (poll(r#","response_time_ms":-1"#), "response_time_ms"),
        (poll(r#","response_time_ms":3600001"#), "response_time_ms"),
        (
            poll(&format!(r#","error_message":"{}""#, "e".repeat(1025))),
            "error_message",
        ),
        (poll(r#","error_message":{"a":1}"#), "error_message"),
    ];
    for (body, field) in &cases {
        assert_422(&app, POLL, body, 0, Some(field));
    }
    assert_nothing_stored(app);
}

#[test]
fn one_bad_update_refuses_the_whole_request_and_names_its_index() {
    let app = spawn_app(|_| {});
    let good = crate::helpers::location_json("good");
    let body = format!(
        r#"[{good},{good},{{"device_id":"bad","recorded_at":"{}","lat":100,"lon":0}},{good},7]"#,
        now_rfc3339()
    );

    assert_422(&app, LOCATION, &body, 2, Some("lat"));
    assert_422(&app, LOCATION, &body, 4, None);
    let stats = app.get("/stats").json();
    assert_eq!(stats["streams"]["location"]["rejected_by_reason"]["invalid_update"], 4);
    assert_eq!(stats["streams"]["location"]["accepted"], 0);
    assert_nothing_stored(app);
}

#[test]
fn a_422_lists_at_most_100_details() {
    let app = spawn_app(|_| {});
    let body = format!("[{}]", vec!["{}"; 300].join(","));
    let answer = app.post_json(LOCATION, &body);
    assert_eq!(answer.status, 422);
    assert_eq!(answer.json()["details"].as_array().unwrap().len(), 100);
    assert_nothing_stored(app);
}

#[test]
fn bad_json_gets_400_with_line_and_column() {
    let app = spawn_app(|_| {});
    let cases = [
        ("{\"device_id\":\"a\",\n \"lat\": }", "application/json", 2),
        ("[{\"lat\":NaN}]", "application/json", 1),
        ("{\"lat\":Infinity}", "application/json", 1),
        ("", "application/json", 1),
        ("{\"a\":1} trailing", "application/json", 1),
        ("{\"device_id\":\"a\"}\n{oops}\n", "application/x-ndjson", 2),
        ("\n\n", "application/x-ndjson", 1),
    ];
    for (body, content_type, line) in cases {
        let answer = app.post(LOCATION, body.as_bytes(), &[("Content-Type", content_type)]);
        assert_eq!(answer.status, 400, "{body:?} → {}", answer.body);
        let json = answer.json();
        assert_eq!(json["error"], "invalid_json");
        assert_eq!(json["details"][0]["line"], line, "{body:?} → {}", answer.body);
        assert!(json["details"][0]["column"].is_u64());
    }
    let invalid_utf8 = b"{\"device_id\":\"\xff\xfe\",\"lat\":1}";
    assert_eq!(
        app.post(LOCATION, invalid_utf8, &[("Content-Type", "application/json")])
            .status,
        400
    );
    assert_nothing_stored(app);
}

#[test]
fn too_many_updates_or_too_many_bytes_get_413_with_the_limit() {
    let app = spawn_app(|s| {
        s.limits.max_updates = 10;
        s.limits.max_body_bytes = 64 * 1024;
    });
    let eleven = format!("[{}]", vec![crate::helpers::location_json("d"); 11].join(","));
    let answer = app.post_json(LOCATION, &eleven);
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert_eq!(answer.json()["details"][0]["limit_updates"], 10);

    let ndjson = vec![crate::helpers::location_json("d"); 11].join("\n");
    assert_eq!(
        app.post(LOCATION, ndjson.as_bytes(), &[("Content-Type", "application/x-ndjson")])
            .status,
        413
    );

    let big = format!(r#"{{"device_id":"d","pad":"{}"}}"#, "x".repeat(70 * 1024));
    let answer = app.post_json(LOCATION, &big);
    assert_eq!(answer.status, 413);
    assert_eq!(answer.json()["error"], "payload_too_large");
    assert_eq!(answer.json()["details"][0]["limit_bytes"], 64 * 1024);

    // A gzip bomb: 100 KiB compressed to a few hundred bytes, refused once 64 KiB are decompressed.
    let bomb = gzip(&vec![b' '; 100 * 1024]);
    let answer = app.post(
        LOCATION,
        &bomb,
        &[("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
    );
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert_nothing_stored(app);
}

#[test]
fn other_content_types_and_encodings_get_415_and_corrupt_gzip_gets_400() {
    let app = spawn_app(|_| {});
    let body = crate::helpers::location_json("d");
    for headers in [
        vec![("Content-Type", "text/plain")],
        vec![("Content-Type", "application/x-www-form-urlencoded")],
        vec![("Content-Type", "application/json"), ("Content-Encoding", "br")],
    ] {
        let answer = app.post(LOCATION, body.as_bytes(), &headers);
        assert_eq!(answer.status, 415, "{headers:?}");
        let json = answer.json();
        assert_eq!(json["error"], "unsupported_media_type");
        assert!(json["details"][0]["content_types"]
            .as_array()
            .unwrap()
            .contains(&"application/json".into()));
    }
    let answer = app.post(
        LOCATION,
        b"not gzip at all",
        &[("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
    );
    assert_eq!(answer.status, 400);
    assert_eq!(answer.json()["error"], "invalid_encoding");
    assert_nothing_stored(app);
}

#[test]
fn unknown_routes_and_methods_get_json_errors() {
    let app = spawn_app(|_| {});
    let answer = app.get("/api/v1/nothing");
    assert_eq!(answer.status, 404);
    assert_eq!(answer.json()["error"], "not_found");
    assert_eq!(app.get(LOCATION).status, 405);
}
