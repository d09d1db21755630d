//! The tracker routes against the requests real trackers send (`cases/trackers.rs`), byte for byte over a plain
//! TCP connection: each client gets the answer it counts as success, the right row is stored (or the fix kept as a
//! dead letter), a resend is stored once, and an API key is taken wherever each client can carry one and never
//! written to the log.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine;
use ingest_gateway::keys_file::hashed;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::helpers::{
    connection_string, fresh_database, location_json, shared_cluster, spawn_app, Db, GatewayProcess, TestApp,
};
use crate::tracker_cases::{case, render, Col, Outcome, Protocol, Row, TrackerCase, CASES, OVERLAND_TRIP_SUMMARY};

/// How long a row or dead letter may take to appear once its request was answered: a safety net, not a measure
/// (the writers flush every 100 ms here).
const SETTLE: Duration = Duration::from_secs(15);

/// Numbers the gateway converts (knots, m/s) are compared within this.
const TOLERANCE: f64 = 1e-6;

/// An answer as read off the wire.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    body: String,
}

/// Sends `request` as is on a new connection and reads one answer.
fn exchange(host: &str, request: &[u8]) -> RawAnswer {
    let mut stream = TcpStream::connect(host).unwrap_or_else(|e| panic!("connect to {host}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request).expect("send the request");
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("read the status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {status_line:?}"));
    let (mut length, mut chunked) = (None, false);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("read a header");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).expect("read a chunk size");
            let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).expect("read a chunk");
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        reader.read_exact(&mut body).expect("read the body");
    }
    RawAnswer {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// `host:port` of a gateway's `http://` address: what a client configured with its URL sends as `Host`.
fn host_of(address: &str) -> String {
    address.trim_start_matches("http://").to_owned()
}

/// Why `answer` is not what the client of `protocol` counts as success, if it is not.
fn not_success(protocol: Protocol, answer: &RawAnswer) -> Option<String> {
    if answer.status != 200 {
        return Some(format!(
            "status {} (body {:?}), expected 200",
            answer.status, answer.body
        ));
    }
    match protocol.success_body() {
        None if answer.body.is_empty() => None,
        None => Some(format!("body {:?}, expected an empty body", answer.body)),
        Some(expected) => {
            let expected: Value = serde_json::from_str(expected).unwrap();
            match serde_json::from_str::<Value>(&answer.body) {
                Ok(actual) if actual == expected => None,
                _ => Some(format!("body {:?}, expected {expected}", answer.body)),
            }
        }
    }
}

/// Why the answer to `case` is wrong, if it is.
fn answer_problem(case: &TrackerCase, answer: &RawAnswer) -> Option<String> {
    match case.outcome {
        Outcome::Answered { .. } => not_success(case.protocol, answer),
        Outcome::Refused { status } if answer.status == status => None,
        Outcome::Refused { status } => Some(format!(
            "status {} (body {:?}), expected a refusal with {status}",
            answer.status, answer.body
        )),
    }
}

/// An instant as a PostgreSQL literal.
fn sql_time(t: OffsetDateTime) -> String {
    format!("'{}'::timestamptz", t.format(&Rfc3339).unwrap())
}

/// Polls `query` until it returns a row or [`SETTLE`] has passed since `since`.
fn rows_within(db: &Db, since: Instant, sql: &str) -> Vec<tokio_postgres::Row> {
    loop {
        let rows = db.query(sql);
        if !rows.is_empty() || since.elapsed() > SETTLE {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Posts one native update with `?ack=commit`: once it is answered, every fix handed to the location intake before
/// it is committed too (the app runs one writer, which writes the queue in order).
fn commit_marker(app: &TestApp, device_id: &str) {
    let answer = app.post_json("/api/v1/location/update?ack=commit", &location_json(device_id));
    assert_eq!(answer.status, 202, "the marker is committed: {}", answer.body);
}

/// What is wrong with the stored row `actual` against `expected`, one sentence per column.
fn column_problems(expected: &Row, actual: &tokio_postgres::Row) -> Vec<String> {
    let mut problems = Vec::new();
    let (lat, lon): (f64, f64) = (actual.get("lat"), actual.get("lon"));
    if (lat - expected.lat).abs() > 1e-9 || (lon - expected.lon).abs() > 1e-9 {
        problems.push(format!(
            "position {lat},{lon}, expected {},{}",
            expected.lat, expected.lon
        ));
    }
    for (column, want) in [
        ("speed_kmh", expected.speed_kmh),
        ("heading_deg", expected.heading_deg),
        ("accuracy_m", expected.accuracy_m),
    ] {
        let got: Option<f64> = actual.get(column);
        let right = match want {
            Col::Unchecked => true,
            Col::Null => got.is_none(),
            Col::Is(v) => got.is_some_and(|g| (g - v).abs() <= TOLERANCE * v.abs().max(1.0)),
        };
        if !right {
            problems.push(format!("{column} {got:?}, expected {want:?}"));
        }
    }
    let stored: Value = actual
        .get::<_, Option<String>>("attributes")
        .map(|text| serde_json::from_str(&text).expect("attributes are JSON"))
        .unwrap_or(Value::Object(Default::default()));
    let wanted: Value = serde_json::from_str(expected.attributes).expect("a case's attributes are JSON");
    for (key, want) in wanted.as_object().expect("a case's attributes are an object") {
        let got = stored.get(key);
        let right = match (want, got) {
            (Value::Null, None) => true,
            (Value::Null, Some(_)) | (_, None) => false,
            (Value::Number(w), Some(Value::Number(g))) => {
                let (w, g) = (w.as_f64().unwrap(), g.as_f64().unwrap());
                (w - g).abs() <= TOLERANCE * w.abs().max(1.0)
            }
            (w, Some(g)) => w == g,
        };
        if !right {
            problems.push(format!("attribute {key:?} is {got:?}, expected {want}"));
        }
    }
    problems
}

/// One request sent and when.
struct Sent {
    case: &'static TrackerCase,
    at: OffsetDateTime,
    before: OffsetDateTime,
    after: OffsetDateTime,
}

/// The stored row for `row` of a request sent as `sent`, or why there is none (or more than one).
fn find_row(db: &Db, sent: &Sent, row: &Row, since: Instant) -> Result<tokio_postgres::Row, String> {
    let when = match TrackerCase::expected_time(row, sent.at) {
        Some(t) => format!("= {}", sql_time(t)),
        None => format!(
            "BETWEEN {} AND {}",
            sql_time(sent.before - time::Duration::seconds(1)),
            sql_time(sent.after + time::Duration::seconds(1))
        ),
    };
    let sql = format!(
        "SELECT lat, lon, speed_kmh, heading_deg, accuracy_m, attributes::text AS attributes FROM location_updates \
         WHERE device_id = '{}' AND recorded_at {when}",
        row.device_id
    );
    let mut found = rows_within(db, since, &sql);
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => {
            let stored: Vec<String> = db
                .query(&format!(
                    "SELECT recorded_at::text FROM location_updates WHERE device_id = '{}' ORDER BY 1",
                    row.device_id
                ))
                .iter()
                .map(|r| r.get(0))
                .collect();
            Err(format!(
                "no row for {} at recorded_at {when} (that device's rows: {stored:?})",
                row.device_id
            ))
        }
        n => Err(format!("{n} rows for {} at recorded_at {when}", row.device_id)),
    }
}

/// Every problem with the dead letters `sent` must have left.
fn dead_letter_problems(db: &Db, sent: &Sent, since: Instant) -> Vec<String> {
    let mut problems = Vec::new();
    for letter in sent.case.dead_letters() {
        let sql = format!(
            "SELECT stream, payload::text FROM dead_letters WHERE protocol = '{}' AND reason = '{}' AND device_id = \
             '{}'",
            sent.case.protocol.name(),
            letter.reason,
            letter.device_id
        );
        let found = rows_within(db, since, &sql);
        if found.len() != 1 {
            let kept: Vec<(Option<String>, Option<String>)> = db
                .query(&format!(
                    "SELECT reason, device_id FROM dead_letters WHERE protocol = '{}'",
                    sent.case.protocol.name()
                ))
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            problems.push(format!(
                "{} dead letters ({}, {}), expected 1; that protocol's are {kept:?}",
                found.len(),
                letter.reason,
                letter.device_id
            ));
            continue;
        }
        let (stream, payload): (String, String) = (found[0].get(0), found[0].get(1));
        if stream != "location" {
            problems.push(format!("dead letter's stream is {stream:?}, expected \"location\""));
        }
        if !payload.contains(letter.payload_has) {
            problems.push(format!(
                "dead letter's payload {payload} lacks {:?}",
                letter.payload_has
            ));
        }
    }
    problems
}

/// The stored rows no case expects, as (device id, recorded_at).
fn unexpected_rows(db: &Db, sent: &[Sent]) -> Vec<(String, String)> {
    db.query("SELECT device_id, recorded_at FROM location_updates WHERE device_id NOT LIKE '%-marker'")
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, OffsetDateTime>(1)))
        .filter(|(device, at)| {
            !sent.iter().any(|s| {
                s.case.rows().iter().any(|row| {
                    row.device_id == device
                        && match TrackerCase::expected_time(row, s.at) {
                            Some(t) => t == *at,
                            None => {
                                s.before - time::Duration::seconds(1) <= *at
                                    && *at <= s.after + time::Duration::seconds(1)
                            }
                        }
                })
            })
        })
        .map(|(device, at)| (device, at.format(&Rfc3339).unwrap()))
        .collect()
}

/// The time a case is sent with: an hour back and each case 20 minutes apart, so that two cases of one device never
/// share a time (their rows would be one), all well inside the 30 days the gateway stores.
fn case_time(now: OffsetDateTime, index: usize) -> OffsetDateTime {
    now - time::Duration::hours(1) - time::Duration::minutes(20 * index as i64)
}

/// The value of each sample in a Prometheus text page, by its name and labels as written.
fn samples(page: &str) -> HashMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
        .collect()
}

#[test]
fn every_trackers_own_request_gets_its_clients_success_and_leaves_the_right_row_or_dead_letter() {
    let app = spawn_app(|s| s.pipeline.writers = 1);
    let host = host_of(&app.address);
    let now = OffsetDateTime::now_utc();
    let mut failures: Vec<String> = Vec::new();

    let mut sent = Vec::new();
    for (index, case) in CASES.iter().enumerate() {
        let at = case.instant(case_time(now, index));
        let before = OffsetDateTime::now_utc();
        let answer = exchange(&host, &case.render(at, &host));
        let after = OffsetDateTime::now_utc();
        if let Some(problem) = answer_problem(case, &answer) {
            failures.push(format!("{}: answer: {problem}", case.name));
        }
        sent.push(Sent {
            case,
            at,
            before,
            after,
        });
    }
    commit_marker(&app, "trackers-marker");

    let since = Instant::now();
    for s in &sent {
        for row in s.case.rows() {
            match find_row(&app.db, s, row, since) {
                Ok(stored) => failures.extend(
                    column_problems(row, &stored)
                        .into_iter()
                        .map(|p| format!("{}: row {}: {p}", s.case.name, row.device_id)),
                ),
                Err(problem) => failures.push(format!("{}: {problem}", s.case.name)),
            }
        }
        failures.extend(
            dead_letter_problems(&app.db, s, since)
                .into_iter()
                .map(|p| format!("{}: {p}", s.case.name)),
        );
    }
    // Nothing else: ignored messages, refused requests and dead letters left no row, and no dead letter is extra.
    let rows: usize = CASES.iter().map(|c| c.rows().len()).sum();
    let letters: usize = CASES.iter().map(|c| c.dead_letters().len()).sum();
    let stored_rows = app.db.count("location_updates") as usize;
    if stored_rows != rows + 1 {
        failures.push(format!(
            "{stored_rows} rows in location_updates, expected {} (the cases' and the marker); unexpected: {:?}",
            rows + 1,
            unexpected_rows(&app.db, &sent)
        ));
    }
    let kept: i64 = app
        .db
        .query("SELECT count(*) FROM dead_letters WHERE protocol IS NOT NULL")[0]
        .get(0);
    if kept as usize != letters {
        failures.push(format!("{kept} tracker dead letters, expected {letters}"));
    }

    let metrics = samples(&app.get("/metrics").body);
    let value = |sample: String| metrics.get(&sample).copied().unwrap_or(0.0);
    for protocol in Protocol::ALL {
        let of = || CASES.iter().filter(move |c| c.protocol == protocol);
        let name = protocol.name();
        let stored = of().map(|c| c.rows().len()).sum::<usize>() as f64;
        let sample = format!(r#"ingest_tracker_fixes_total{{outcome="stored",protocol="{name}"}}"#);
        if value(sample.clone()) != stored {
            failures.push(format!(
                "metrics: {sample} is {}, expected {stored}",
                value(sample.clone())
            ));
        }
        let mut reasons: HashMap<&str, f64> = HashMap::new();
        for letter in of().flat_map(|c| c.dead_letters()) {
            *reasons.entry(letter.reason).or_default() += 1.0;
        }
        for (reason, count) in reasons {
            let sample = format!(r#"ingest_tracker_dead_lettered_total{{protocol="{name}",reason="{reason}"}}"#);
            if value(sample.clone()) != count {
                failures.push(format!(
                    "metrics: {sample} is {}, expected {count}",
                    value(sample.clone())
                ));
            }
        }
    }
    // The OwnTracks lwt, transition and empty body are ignored messages.
    let ignored = value(r#"ingest_tracker_fixes_total{outcome="ignored",protocol="owntracks"}"#.to_owned());
    if ignored < 2.0 {
        failures.push(format!(
            "metrics: {ignored} ignored OwnTracks messages, expected at least 2"
        ));
    }
    let repairs = value(r#"ingest_tracker_time_repairs_total{protocol="owntracks"}"#.to_owned());
    if repairs != 1.0 {
        failures.push(format!("metrics: {repairs} OwnTracks time repairs, expected 1"));
    }

    // Each failing case once with its source, so that a mismatch can be read against the client's own code.
    let sources: Vec<String> = CASES
        .iter()
        .filter(|c| failures.iter().any(|f| f.starts_with(&format!("{}:", c.name))))
        .map(|c| format!("{}: {}", c.name, c.source))
        .collect();
    assert!(
        failures.is_empty(),
        "{} problems over {} cases:\n{}\n\nsources:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n"),
        sources.join("\n")
    );
}

#[test]
fn each_protocols_resend_of_the_same_bytes_is_answered_again_and_stored_once() {
    let app = spawn_app(|s| s.pipeline.writers = 1);
    let host = host_of(&app.address);
    let now = OffsetDateTime::now_utc();
    let resent = [
        "osmand_query_with_speed_in_knots_and_unknown_fields",
        "traccar_client_legacy_android_post_with_every_field_in_the_query",
        "traccar_client_sdk_form_post",
        "traccar_client_9_json_moving_at_18_67_metres_per_second",
        "owntracks_android_location_named_by_x_limit_headers",
        "overland_app_batch_with_log_visit_and_current",
        "traccar_forward_json_position",
    ];

    let mut sent = Vec::new();
    for (index, name) in resent.iter().enumerate() {
        let case = case(name);
        let at = case.instant(case_time(now, index));
        let bytes = case.render(at, &host);
        let before = OffsetDateTime::now_utc();
        for attempt in ["first", "resend"] {
            let answer = exchange(&host, &bytes);
            assert_eq!(not_success(case.protocol, &answer), None, "{name}, {attempt}");
        }
        sent.push(Sent {
            case,
            at,
            before,
            after: OffsetDateTime::now_utc(),
        });
    }
    commit_marker(&app, "resend-marker");

    let since = Instant::now();
    for s in &sent {
        for row in s.case.rows() {
            // `find_row` fails on two rows as on none.
            if let Err(problem) = find_row(&app.db, s, row, since) {
                panic!("{}: {problem}", s.case.name);
            }
        }
    }
    let rows: usize = sent.iter().map(|s| s.case.rows().len()).sum();
    assert_eq!(
        app.db.count("location_updates") as usize,
        rows + 1,
        "one row per fix, and the marker; unexpected: {:?}",
        unexpected_rows(&app.db, &sent)
    );
}

#[test]
fn a_zero_zero_fix_and_fixes_flagged_not_valid_are_answered_as_success_kept_as_dead_letters_and_not_stored() {
    let app = spawn_app(|s| s.pipeline.writers = 1);
    let host = host_of(&app.address);
    let now = OffsetDateTime::now_utc();
    let refused_fixes = [
        "traccar_client_legacy_android_zero_zero_is_a_dead_letter",
        "osmand_query_flagged_not_valid_is_a_dead_letter",
        "traccar_forward_json_not_valid_is_a_dead_letter",
    ];

    let mut sent = Vec::new();
    for (index, name) in refused_fixes.iter().enumerate() {
        let case = case(name);
        let at = case.instant(case_time(now, index));
        let before = OffsetDateTime::now_utc();
        let answer = exchange(&host, &case.render(at, &host));
        assert_eq!(not_success(case.protocol, &answer), None, "{name}");
        sent.push(Sent {
            case,
            at,
            before,
            after: OffsetDateTime::now_utc(),
        });
    }
    commit_marker(&app, "dead-letter-marker");

    let since = Instant::now();
    for s in &sent {
        let problems = dead_letter_problems(&app.db, s, since);
        assert!(problems.is_empty(), "{}: {problems:?}", s.case.name);
    }
    assert_eq!(
        app.db.device_ids(),
        [("dead-letter-marker".to_owned(), 1)],
        "no fix of these is stored"
    );
    let metrics = samples(&app.get("/metrics").body);
    for (sample, count) in [
        (
            r#"ingest_tracker_dead_lettered_total{protocol="osmand",reason="null_island"}"#,
            1.0,
        ),
        (
            r#"ingest_tracker_dead_lettered_total{protocol="osmand",reason="flagged_invalid"}"#,
            1.0,
        ),
        (
            r#"ingest_tracker_dead_lettered_total{protocol="traccar",reason="flagged_invalid"}"#,
            1.0,
        ),
    ] {
        assert_eq!(metrics.get(sample).copied(), Some(count), "{sample}");
    }
}

/// Sends `case` alone to `app` (as the case numbered `index`), expects its client's success, then commits a marker.
fn send_alone(app: &TestApp, case: &'static TrackerCase, index: usize) -> Sent {
    let host = host_of(&app.address);
    let at = case.instant(case_time(OffsetDateTime::now_utc(), index));
    let before = OffsetDateTime::now_utc();
    let answer = exchange(&host, &case.render(at, &host));
    assert_eq!(not_success(case.protocol, &answer), None, "{}", case.name);
    let sent = Sent {
        case,
        at,
        before,
        after: OffsetDateTime::now_utc(),
    };
    commit_marker(app, "alone-marker");
    sent
}

#[test]
fn a_dead_letter_keeps_every_value_of_a_repeated_osmand_field() {
    let app = spawn_app(|s| s.pipeline.writers = 1);
    let sent = send_alone(&app, case("osmand_query_with_cells_and_wifi_but_no_position"), 0);

    let letters = rows_within(
        &app.db,
        Instant::now(),
        "SELECT payload::text FROM dead_letters WHERE reason = 'no_position'",
    );

    assert_eq!(letters.len(), 1, "{}", sent.case.name);
    let payload: String = letters[0].get(0);
    for value in [
        "257,02,16,2224",
        "257,02,16,2223,-90",
        "00-14-22-01-23-45,-80",
        "00-1C-B3-09-85-15,-70",
    ] {
        assert!(payload.contains(value), "{value} is kept: {payload}");
    }
}

#[test]
fn an_accuracy_of_zero_which_traccar_client_sends_for_every_gps_fix_is_stored_as_no_accuracy() {
    let app = spawn_app(|s| s.pipeline.writers = 1);
    let case = case("traccar_client_legacy_android_post_with_every_field_in_the_query");
    let sent = send_alone(&app, case, 0);

    let stored = find_row(&app.db, &sent, &case.rows()[0], Instant::now()).expect("the fix is stored");

    assert_eq!(stored.get::<_, Option<f64>>("accuracy_m"), None);
}

#[test]
fn an_overland_trip_summary_in_a_batch_is_answered_and_not_stored_as_a_fix() {
    let app = spawn_app(|s| s.pipeline.writers = 1);
    let sent = send_alone(&app, &OVERLAND_TRIP_SUMMARY, 0);

    let row = &OVERLAND_TRIP_SUMMARY.rows()[0];
    let stored = find_row(&app.db, &sent, row, Instant::now()).expect("the fix is stored");

    assert_eq!(column_problems(row, &stored), Vec::<String>::new());
    assert_eq!(
        unexpected_rows(&app.db, std::slice::from_ref(&sent)),
        Vec::<(String, String)>::new(),
        "the trip summary is not stored"
    );
}

// ---- API keys, on the real binary so that its whole log can be read --------------------------------------------

/// A key as `new-key` makes them.
fn key(n: u8) -> String {
    format!("igk_{}", format!("{n:02x}").repeat(32))
}

/// Requests that carry a key where their clients can, all for devices under `truck-1`; `{key}` and `{basic}`
/// (`base64(user:key)`, user first) are filled in by the test.
const KEYED: &[(&str, &str, &str)] = &[
    (
        "osmand, key in the path",
        "truck-1",
        "GET /api/v1/osmand/k/{key}?id=truck-1&timestamp={unix_s}&lat=60.0&lon=30.0 HTTP/1.1\nUser-Agent: OsmAnd~ \
         4.8.6\nHost: {host}\nConnection: Keep-Alive\nAccept-Encoding: gzip\n\n",
    ),
    (
        "osmand, key as a query parameter",
        "truck-1a",
        "GET /api/v1/osmand?id=truck-1a&timestamp={unix_s}&lat=60.0&lon=30.0&key={key} HTTP/1.1\nUser-Agent: \
         OsmAnd~ 4.8.6\nHost: {host}\nConnection: Keep-Alive\nAccept-Encoding: gzip\n\n",
    ),
    (
        "gpslogger, key as the Basic password, device as the Basic user",
        "truck-1-gps",
        "GET /api/v1/osmand?lat=48.8583701&longitude=2.2944813&time={iso_ms}&s=5.19 HTTP/1.1\nAuthorization: \
         Basic {basic}\nHost: {host}\nConnection: Keep-Alive\nAccept-Encoding: gzip\nUser-Agent: okhttp/4.12.0\n\n",
    ),
    (
        "owntracks, key as the Basic password",
        "truck-1:phone",
        "POST /api/v1/owntracks HTTP/1.1\nUser-Agent: Owntracks-Android/gms/420412000\nAuthorization: Basic \
         {basic}\nX-Limit-U: truck-1\nX-Limit-D: phone\nContent-Type: application/json; charset=utf-8\n\
         Content-Length: {content_length}\nHost: {host}\nConnection: Keep-Alive\nAccept-Encoding: gzip\n\n\
         {\"_type\":\"location\",\"lat\":48.85833,\"lon\":2.29513,\"tid\":\"t1\",\"tst\":{unix_s}}",
    ),
    (
        "owntracks, key in the path",
        "truck-1:tablet",
        "POST /api/v1/owntracks/k/{key} HTTP/1.1\nUser-Agent: Owntracks-Android/gms/420412000\nX-Limit-U: \
         truck-1\nX-Limit-D: tablet\nContent-Type: application/json; charset=utf-8\nContent-Length: \
         {content_length}\nHost: {host}\nConnection: Keep-Alive\nAccept-Encoding: gzip\n\n\
         {\"_type\":\"location\",\"lat\":48.85833,\"lon\":2.29513,\"tid\":\"t1\",\"tst\":{unix_s}}",
    ),
    (
        "overland, key as the Bearer token",
        "truck-1-iphone",
        "POST /api/v1/overland HTTP/1.1\nHost: {host}\nContent-Type: application/json\nAccept: */*\n\
         Authorization: Bearer {key}\nUser-Agent: Overland/7.3 (iPhone; iOS 17.5.1; Scale/3.00)\nContent-Length: \
         {content_length}\nConnection: keep-alive\n\n\
         {\"locations\":[{\"type\":\"Feature\",\"geometry\":{\"type\":\"Point\",\"coordinates\":[2.29513,48.85833]},\
         \"properties\":{\"timestamp\":\"{iso}\",\"speed\":1,\"horizontal_accuracy\":5,\"device_id\":\"truck-1-iphone\"}}]}",
    ),
    (
        "traccar forwarding, key as the Bearer token (forward.header)",
        "truck-1-fmb",
        "POST /api/v1/traccar HTTP/1.1\nContent-Type: application/json\nAuthorization: Bearer {key}\nUser-Agent: \
         Jersey/3.1.10 (HttpUrlConnection 17.0.14)\nHost: {host}\nConnection: keep-alive\nContent-Length: \
         {content_length}\n\n\
         {\"position\":{\"id\":0,\"attributes\":{},\"deviceId\":1,\"protocol\":\"teltonika\",\"fixTime\":\"{jackson}\",\
         \"valid\":true,\"latitude\":54.6872,\"longitude\":25.2797,\"altitude\":0.0,\"speed\":0.0,\"course\":0.0,\
         \"accuracy\":0.0},\"device\":{\"id\":1,\"name\":\"Truck 1\",\"uniqueId\":\"truck-1-fmb\"}}",
    ),
];

/// Fills `{key}` and `{basic}` (for `user`), then the case placeholders.
fn keyed_request(template: &str, key: &str, user: &str, at: OffsetDateTime, host: &str) -> Vec<u8> {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{key}"));
    render(&template.replace("{key}", key).replace("{basic}", &basic), at, host)
}

#[test]
fn keys_are_taken_in_the_path_the_query_basic_and_bearer_scoped_to_their_devices_and_never_logged() {
    let fleet = key(1);
    let stranger = key(2);
    let keys_dir = tempfile::tempdir().unwrap();
    let keys_path = keys_dir.path().join("api-keys");
    std::fs::write(
        &keys_path,
        format!(
            "fleet {} streams=location device=truck-1,truck-1a devices=truck-1-,truck-1:\n",
            hashed(&fleet)
        ),
    )
    .unwrap();
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let data_dir = tempfile::tempdir().unwrap();
    // At debug level, so that what a debugging operator would see is checked too; one writer, so that a committed
    // marker is written after everything before it.
    let gateway = GatewayProcess::start(&[
        ("DATABASE_URL", connection_string(&cluster.config(&name))),
        ("INGEST_DATA_DIR", data_dir.path().display().to_string()),
        ("INGEST_API_KEYS_FILE", keys_path.display().to_string()),
        ("INGEST_FLUSH_INTERVAL", "100ms".to_owned()),
        ("INGEST_WRITERS", "1".to_owned()),
        ("RUST_LOG", "debug".to_owned()),
    ]);
    let host = host_of(&gateway.address);
    let now = OffsetDateTime::now_utc();
    let at = |index: usize| case_time(now, index).replace_nanosecond(0).unwrap();

    for (index, (how, device, template)) in KEYED.iter().enumerate() {
        let user = device.split(':').next().unwrap();
        let answer = exchange(&host, &keyed_request(template, &fleet, user, at(index), &host));
        let protocol = Protocol::ALL.into_iter().find(|p| template.contains(p.path())).unwrap();
        assert_eq!(not_success(protocol, &answer), None, "{how}");
    }
    let osmand = |query: &str| {
        format!(
            "GET /api/v1/osmand{query} HTTP/1.1\nUser-Agent: OsmAnd~ 4.8.6\nHost: {{host}}\nConnection: \
             Keep-Alive\nAccept-Encoding: gzip\n\n"
        )
    };
    let refusals = [
        (
            "a device outside the key's scope",
            osmand("/k/{key}?id=truck-2&timestamp={unix_s}&lat=60.0&lon=30.0"),
            &fleet,
            403,
        ),
        (
            "no key",
            osmand("?id=truck-1&timestamp={unix_s}&lat=60.0&lon=30.0"),
            &fleet,
            401,
        ),
        (
            "an unknown key",
            osmand("/k/{key}?id=truck-1&timestamp={unix_s}&lat=60.0&lon=30.0"),
            &stranger,
            401,
        ),
    ];
    for (index, (what, template, key, status)) in refusals.iter().enumerate() {
        let request = keyed_request(template, key, "truck-1", at(KEYED.len() + index), &host);
        assert_eq!(exchange(&host, &request).status, *status, "{what}");
    }
    // A dead letter keeps the request's fields: never the key that came among them.
    let zero = keyed_request(
        &osmand("?id=truck-1-zero&timestamp={unix_s}&lat=0.0&lon=0.0&key={key}"),
        &fleet,
        "",
        at(20),
        &host,
    );
    assert_eq!(
        not_success(Protocol::Osmand, &exchange(&host, &zero)),
        None,
        "a 0,0 fix with a key"
    );

    let marker = ureq::post(&format!("{}/api/v1/location/update?ack=commit", gateway.address))
        .set("Content-Type", "application/json")
        .set("Authorization", &format!("Bearer {fleet}"))
        .send_string(&location_json("truck-1-marker"))
        .expect("the marker is committed");
    assert_eq!(marker.status(), 202);
    let db = Db::connect(cluster.config(&name));
    let mut stored: Vec<String> = db.device_ids().into_iter().map(|(id, _)| id).collect();
    stored.sort();
    let mut expected: Vec<&str> = KEYED.iter().map(|(_, device, _)| *device).collect();
    expected.push("truck-1-marker");
    expected.sort();
    assert_eq!(stored, expected, "every keyed fix stored, nothing refused");
    let attributes: Vec<String> = db
        .query("SELECT coalesce(attributes::text, '') FROM location_updates")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        attributes.iter().all(|a| !a.contains(&fleet) && !a.contains("\"key\"")),
        "the key is no attribute: {attributes:?}"
    );
    let since = Instant::now();
    let letters = rows_within(
        &db,
        since,
        "SELECT payload::text FROM dead_letters WHERE device_id = 'truck-1-zero'",
    );
    assert_eq!(letters.len(), 1, "the 0,0 fix is kept");
    let payload: String = letters[0].get(0);
    assert!(
        !payload.contains(&fleet),
        "the key is not in the dead letter: {payload}"
    );

    let metrics = ureq::get(&format!("{}/metrics", gateway.address))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let log = gateway.log().clone();
    assert!(gateway.terminate().success(), "the gateway stops cleanly");
    let log = log.lines();
    assert!(
        !metrics.contains(&fleet) && !metrics.contains(&stranger),
        "no key in /metrics"
    );
    assert!(log.len() > 5, "the log was read: {log:?}");
    let secrets = [
        fleet.clone(),
        stranger.clone(),
        base64::engine::general_purpose::STANDARD.encode(format!("truck-1:{fleet}")),
        base64::engine::general_purpose::STANDARD.encode(format!("truck-1-gps:{fleet}")),
    ];
    let leaks: Vec<&String> = log
        .iter()
        .filter(|line| secrets.iter().any(|s| line.contains(s.as_str())))
        .collect();
    assert!(leaks.is_empty(), "a key is in the log: {leaks:#?}");
}
