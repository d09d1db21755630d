//! Hostile requests over HTTP: each gets a clear 4xx quickly, the gateway stays up, and nothing is queued or stored.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use ingest_gateway::model::BodyFormat;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::cases::{self, max_body_bytes, max_updates, Expected, Stream, MAX_ERRORS, NESTING_LEVELS};
use crate::helpers::{eventually, gzip, location_array, location_json, now_rfc3339, spawn_app, Answer, TestApp};

const LOCATION: &str = path(Stream::Location);
const POLL: &str = path(Stream::Poll);
/// A request header: name and value.
type Header = (&'static str, &'static str);
const JSON: Header = ("Content-Type", "application/json");
const NDJSON: Header = ("Content-Type", "application/x-ndjson");
const GZIP: Header = ("Content-Encoding", "gzip");

/// Where the gateway takes `stream`'s updates.
const fn path(stream: Stream) -> &'static str {
    match stream {
        Stream::Location => "/api/v1/location/update",
        Stream::Poll => "/api/v1/poll/update",
    }
}

/// The `Content-Type` of a body framed as `format`.
fn content_type(format: BodyFormat) -> Header {
    match format {
        BodyFormat::Json => JSON,
        BodyFormat::Ndjson => NDJSON,
    }
}

/// Checks `answer` is `status` with the error `code`, and that the request queued nothing on either stream.
fn assert_refused(app: &TestApp, answer: &Answer, status: u16, code: &str, what: &str) {
    assert_eq!(answer.status, status, "{what} → {}", abridged(&answer.body));
    assert_eq!(answer.json()["error"], code, "{what} → {}", abridged(&answer.body));
    assert_nothing_queued(app, what);
}

/// Checks no request so far queued anything on either stream.
fn assert_nothing_queued(app: &TestApp, what: &str) {
    let stats = app.get("/stats").json();
    for stream in ["location", "poll"] {
        assert_eq!(
            stats["streams"][stream]["accepted"], 0,
            "{what}: {stream} accepted something"
        );
        assert_eq!(
            stats["streams"][stream]["queue_depth"], 0,
            "{what}: {stream} queued something"
        );
    }
}

/// Checks a 422 names `field` of update `index` among its details.
fn assert_names(answer: &Answer, index: usize, field: Option<&str>, what: &str) {
    let json = answer.json();
    let details = json["details"].as_array().expect("details");
    assert!(
        names(answer, index, field),
        "{what}: expected update {index} field {field:?} in {details:?}"
    );
}

/// Whether `answer`'s details name `field` of update `index`.
fn names(answer: &Answer, index: usize, field: Option<&str>) -> bool {
    let json: Value = serde_json::from_str(&answer.body).unwrap_or_default();
    let field = field.map_or(Value::Null, Value::from);
    json["details"]
        .as_array()
        .is_some_and(|details| details.iter().any(|d| d["index"] == index && d["field"] == field))
}

/// Whether `answer` is the outcome a shared case expects: the same one the model is held to.
fn is_expected(answer: &Answer, expected: Expected) -> bool {
    let json: Value = serde_json::from_str(&answer.body).unwrap_or_default();
    let is = |status, code: &str| answer.status == status && json["error"] == code;
    match expected {
        Expected::Accepted => answer.status == 202,
        Expected::InvalidJson => is(400, "invalid_json"),
        Expected::TooManyUpdates => is(413, "payload_too_large"),
        Expected::Refused { index, field } => is(422, "invalid_update") && names(answer, index, field),
    }
}

/// Checks `answer` is what `expected` says, and that a refused request queued nothing on either stream.
fn assert_expected(app: &TestApp, answer: &Answer, expected: Expected, what: &str) {
    assert!(
        is_expected(answer, expected),
        "{what}: expected {expected:?}, got {} {}",
        answer.status,
        abridged(&answer.body)
    );
    if expected != Expected::Accepted {
        assert_nothing_queued(app, what);
    }
}

/// Stops the gateway (everything accepted is written by then) and checks that no table holds a row.
fn assert_nothing_stored(mut app: TestApp) {
    assert!(app.stop().is_clean());
    for table in ["location_updates", "poll_results", "dead_letters"] {
        assert_eq!(app.db.count(table), 0, "{table}");
    }
}

/// The first 300 characters of an answer, so that a failure message stays readable.
fn abridged(text: &str) -> String {
    text.chars().take(300).collect()
}

/// A location update made now with `field` set to the raw JSON `value` (replacing it when it is a known field).
fn location_with(field: &str, value: &str) -> String {
    Stream::Location.update_with(&now_rfc3339(), field, value)
}

/// A poll result made now with `field` set to the raw JSON `value` (replacing it when it is a known field).
fn poll_with(field: &str, value: &str) -> String {
    Stream::Poll.update_with(&now_rfc3339(), field, value)
}

/// Sends a request written by hand, for what an HTTP client will not send (a Content-Length that lies, a chunked
/// body) and for bodies the gateway refuses before reading them whole. The body goes out on its own thread, so that
/// an answer that comes early is still read, and a write cut short by the gateway closing is no failure.
fn send_raw(app: &TestApp, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Answer {
    let address = app.address.trim_start_matches("http://");
    let stream = TcpStream::connect(address).expect("connect to the gateway");
    // Past this the gateway hangs: it waits for a body it should have refused.
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(&body));
    });

    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("an answer before the read timeout");
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {line:?}"));
    let mut length = None;
    loop {
        line.clear();
        reader.read_line(&mut line).expect("the answer's headers");
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = vec![0; length.unwrap_or(0)];
    reader.read_exact(&mut body).expect("the answer's body");
    // Unblocks the sender if the gateway stopped reading.
    let _ = stream.shutdown(Shutdown::Both);
    sender.join().unwrap();
    Answer {
        status,
        retry_after: None,
        request_id: None,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// `body` as `Transfer-Encoding: chunked`, in 64 KiB chunks.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 1000 + 16);
    for chunk in body.chunks(64 * 1024) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// This process's resident memory, from a given moment to its peak since (Linux only).
struct MemoryPeak {
    resident_at_start: u64,
}

impl MemoryPeak {
    /// Resets the kernel's peak mark to now; `None` where there is no such mark to read.
    fn start() -> Option<Self> {
        // Writing 5 clears VmHWM, so that what other tests held earlier does not count.
        std::fs::write("/proc/self/clear_refs", "5").ok()?;
        Some(MemoryPeak {
            resident_at_start: Self::read("VmRSS:")?,
        })
    }

    /// How far the peak rose above what was resident at the start.
    fn growth(&self) -> Option<u64> {
        Some(Self::read("VmHWM:")?.saturating_sub(self.resident_at_start))
    }

    fn read(field: &str) -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

#[test]
fn deeply_nested_json_gets_422_naming_where_it_is_or_400_when_unclosed() {
    let app = spawn_app(|_| {});
    let at = now_rfc3339();
    for case in cases::nesting() {
        let body = case.body(&at, NESTING_LEVELS);
        let what = format!("{NESTING_LEVELS} levels of {:?} in {:?}", case.shape, case.field);
        for content_type in [JSON, NDJSON] {
            let answer = app.post(path(case.stream), body.as_bytes(), &[content_type]);
            assert_expected(&app, &answer, case.expected, &what);
        }
    }
    for unclosed in cases::unclosed_nesting(&at, NESTING_LEVELS) {
        let answer = app.post_json(LOCATION, &unclosed);
        assert_expected(&app, &answer, Expected::InvalidJson, "unclosed nesting");
    }
    assert_nothing_stored(app);
}

#[test]
fn nesting_that_fits_the_attribute_limit_is_stored_as_sent() {
    // The counterpart of the refusals above: deep but small attributes are PostgreSQL's to parse, and it does.
    let mut app = spawn_app(|_| {});
    let levels = 2_000;
    let nested = format!("{}\"deep\"{}", "[".repeat(levels), "]".repeat(levels));
    let answer = app.post_json(LOCATION, &location_with("extra", &nested));
    assert_eq!(answer.status, 202, "{}", abridged(&answer.body));
    assert!(app.stop().is_clean());
    let depth = format!("attributes #>> '{{extra{}}}'", ",0".repeat(levels));
    let rows = app.db.query(&format!("SELECT {depth} FROM location_updates"));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, Option<String>>(0).as_deref(), Some("deep"));
}

#[test]
fn a_number_beyond_f64_gets_400_and_one_beyond_i64_but_within_f64_gets_422() {
    let app = spawn_app(|_| {});
    let at = now_rfc3339();
    for case in cases::numbers_out_of_range() {
        let body = case.body(&at);

        let answer = app.post_json(path(case.stream), &body);

        assert_expected(&app, &answer, case.expected, &body);
        if case.expected == Expected::InvalidJson {
            let reason = answer.json()["details"][0]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            assert!(reason.contains("number out of range"), "{body} → {reason}");
        }
    }
    assert_nothing_stored(app);
}

/// `json` with its one `\u{1}` replaced by `bytes`: `format!` cannot write invalid UTF-8 itself.
fn splice(json: &str, bytes: &[u8]) -> Vec<u8> {
    let (before, after) = json.split_once('\u{1}').expect("a placeholder");
    [before.as_bytes(), bytes, after.as_bytes()].concat()
}

#[test]
fn invalid_utf8_anywhere_in_a_string_or_key_gets_400() {
    let app = spawn_app(|_| {});
    let second_line = format!("{}\n{}", location_json("a"), location_with("device_id", "\"\u{1}\""));
    let cases: Vec<(&str, &str, Vec<u8>, Header)> = vec![
        (
            "a lone continuation byte in device_id",
            LOCATION,
            splice(&location_with("device_id", "\"\u{1}\""), b"\x80"),
            JSON,
        ),
        (
            "a cut-off sequence in an unknown field",
            LOCATION,
            splice(&location_with("note", "\"x\u{1}\""), b"\xe2\x82"),
            JSON,
        ),
        (
            "an overlong encoding in an unknown key",
            LOCATION,
            splice(&location_with("k\u{1}", "1"), b"\xc0\xaf"),
            JSON,
        ),
        (
            "a code point past U+10FFFF deep in an unknown field",
            LOCATION,
            splice(&location_with("note", "{\"a\":[\"\u{1}\"]}"), b"\xf4\x90\x80\x80"),
            JSON,
        ),
        (
            "a surrogate encoded as UTF-8 in error_message",
            POLL,
            splice(&poll_with("error_message", "\"\u{1}\""), b"\xed\xa0\x80"),
            JSON,
        ),
        (
            "a stray byte on the second line",
            LOCATION,
            splice(&second_line, b"\xff"),
            NDJSON,
        ),
        (
            "a body in UTF-16",
            LOCATION,
            location_json("a").encode_utf16().flat_map(u16::to_le_bytes).collect(),
            JSON,
        ),
    ];
    for (what, path, body, content_type) in &cases {
        let answer = app.post(path, body, &[*content_type]);
        assert_refused(&app, &answer, 400, "invalid_json", what);
    }
    assert_nothing_stored(app);
}

#[test]
fn invalid_utf8_inside_a_skipped_value_gets_400_too() {
    let app = spawn_app(|_| {});
    for (what, path, body) in [
        ("in lat's array", LOCATION, location_with("lat", "[\"\u{1}\"]")),
        ("in an update that is an array", LOCATION, "[[\"\u{1}\"]]".to_owned()),
        (
            "in project_id's object",
            POLL,
            poll_with("project_id", "{\"a\":\"\u{1}\"}"),
        ),
    ] {
        let answer = app.post(path, &splice(&body, b"\xff"), &[JSON]);
        assert_refused(&app, &answer, 400, "invalid_json", what);
    }
    assert_nothing_stored(app);
}

#[test]
fn a_key_given_twice_gets_422_naming_the_key() {
    let app = spawn_app(|_| {});
    let at = now_rfc3339();
    let twice = |extra: &str| format!(r#"{{"device_id":"d","recorded_at":"{at}","lat":1,"lon":2,{extra}}}"#);
    let cases = [
        (LOCATION, twice(r#""lat":1"#), 0, "lat"),
        (LOCATION, twice(r#""device_id":"e""#), 0, "device_id"),
        (LOCATION, twice(r#""tag":1,"tag":1"#), 0, "tag"),
        // The same key spelled with an escape is still the same key.
        (LOCATION, twice(r#""\u006cat":1"#), 0, "lat"),
        (LOCATION, twice(r#""x":1,"\u0078":2"#), 0, "x"),
        (
            LOCATION,
            format!(
                "[{},{},{}]",
                location_json("a"),
                location_json("b"),
                twice(r#""lon":2"#)
            ),
            2,
            "lon",
        ),
        (POLL, poll_with("success", "true,\"success\":false"), 0, "success"),
        (POLL, poll_with("project_id", "1,\"project_id\":2"), 0, "project_id"),
    ];
    for (path, body, index, field) in &cases {
        let answer = app.post_json(path, body);
        assert_refused(&app, &answer, 422, "invalid_update", body);
        assert_names(&answer, *index, Some(field), body);
        let details = answer.json()["details"].clone();
        assert!(
            details
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["reason"] == "appears more than once"),
            "{body}: {details}"
        );
    }
    let lines = format!("{}\n{}", location_json("a"), twice(r#""lat":1"#));
    let answer = app.post(LOCATION, lines.as_bytes(), &[NDJSON]);
    assert_refused(&app, &answer, 422, "invalid_update", "ndjson");
    assert_names(&answer, 1, Some("lat"), "ndjson");
    assert_nothing_stored(app);
}

#[test]
fn nan_and_infinity_tokens_get_400_wherever_they_are() {
    let app = spawn_app(|_| {});
    for token in [
        "NaN",
        "Infinity",
        "-Infinity",
        "nan",
        "inf",
        "+1",
        ".5",
        "01",
        "1.",
        "-",
    ] {
        for (path, body, content_type) in [
            (LOCATION, location_with("lat", token), JSON),
            (
                LOCATION,
                location_with("extra", &format!("[1,{{\"a\":{token}}}]")),
                JSON,
            ),
            (POLL, poll_with("response_time_ms", token), JSON),
            (LOCATION, token.to_owned(), JSON),
            (LOCATION, format!("[{},{token}]", location_json("a")), JSON),
            (
                LOCATION,
                format!("{}\n{}", location_json("a"), location_with("lon", token)),
                NDJSON,
            ),
        ] {
            let answer = app.post(path, body.as_bytes(), &[content_type]);
            assert_refused(&app, &answer, 400, "invalid_json", &body);
        }
    }
    assert_nothing_stored(app);
}

#[test]
fn ten_thousand_tiny_updates_in_one_request_are_accepted_and_every_one_lands() {
    let app = spawn_app(|_| {});
    let max_updates = max_updates();
    let answer = app.post_json(LOCATION, &location_array("tiny", max_updates));
    assert_eq!(answer.status, 202, "{}", abridged(&answer.body));
    assert_eq!(answer.json()["accepted"], max_updates);

    let at = now_rfc3339();
    let lines: Vec<String> = (1..=max_updates)
        .map(|p| format!(r#"{{"project_id":{p},"polled_at":"{at}","success":true}}"#))
        .collect();
    let answer = app.post(POLL, lines.join("\n").as_bytes(), &[NDJSON]);
    assert_eq!(answer.status, 202, "{}", abridged(&answer.body));
    assert_eq!(answer.json()["accepted"], max_updates);

    eventually("all 20 000 rows are written", Duration::from_secs(60), || {
        app.db.count("location_updates") == max_updates as i64 && app.db.count("poll_results") == max_updates as i64
    });
    assert_eq!(app.db.device_ids().len(), max_updates, "each device once");
    assert_eq!(app.db.count("dead_letters"), 0);
}

#[test]
fn ten_thousand_and_one_updates_get_413_and_store_nothing() {
    let app = spawn_app(|_| {});
    let max_updates = max_updates();
    let one_too_many = location_array("over", max_updates + 1);
    let lines = vec![location_json("over"); max_updates + 1].join("\n");
    let at = now_rfc3339();
    let polls = format!(
        "[{}]",
        vec![format!(r#"{{"project_id":1,"polled_at":"{at}","success":true}}"#); max_updates + 1].join(",")
    );
    let gzipped = gzip(one_too_many.as_bytes());
    for (path, body, headers) in [
        (LOCATION, one_too_many.as_bytes(), &[JSON][..]),
        (LOCATION, lines.as_bytes(), &[NDJSON]),
        (POLL, polls.as_bytes(), &[JSON]),
        (LOCATION, &gzipped, &[JSON, GZIP]),
    ] {
        let answer = app.post(path, body, headers);
        assert_refused(&app, &answer, 413, "payload_too_large", "10 001 updates");
        assert_eq!(answer.json()["details"][0]["limit_updates"], max_updates);
    }
    assert_nothing_stored(app);
}

#[test]
fn ten_thousand_empty_objects_get_422_with_exactly_100_details() {
    let app = spawn_app(|_| {});
    let body = cases::empty_objects(max_updates(), BodyFormat::Json);
    let answer = app.post_json(LOCATION, &body);
    assert_refused(&app, &answer, 422, "invalid_update", "10 000 empty objects");
    let json = answer.json();
    let details = json["details"].as_array().unwrap();
    assert_eq!(details.len(), MAX_ERRORS);
    // Four required fields per update: the first MAX_ERRORS / 4 updates fill the list.
    assert_eq!(
        details[0],
        serde_json::json!({"index": 0, "field": "device_id", "reason": "is required"})
    );
    assert!(details
        .iter()
        .all(|d| d["index"].as_u64().unwrap() < MAX_ERRORS as u64 / 4));
    assert!(
        json["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{} of the updates", max_updates())),
        "{}",
        json["message"]
    );
    let stats = app.get("/stats").json();
    assert_eq!(
        stats["streams"]["location"]["rejected_by_reason"]["invalid_update"],
        max_updates()
    );
    assert_nothing_stored(app);
}

#[test]
fn empty_objects_up_to_the_update_limit_get_422_and_past_it_get_413_however_many() {
    let app = spawn_app(|_| {});
    for (count, expected) in cases::update_counts() {
        for format in [BodyFormat::Json, BodyFormat::Ndjson] {
            let body = cases::empty_objects(count, format);

            let answer = app.post(LOCATION, body.as_bytes(), &[content_type(format)]);

            assert_expected(&app, &answer, expected, &format!("{count} empty objects, {format:?}"));
        }
    }
    assert_nothing_stored(app);
}

/// A location update made now, padded with an unknown string field to exactly `len` bytes.
fn padded_to(len: usize) -> String {
    cases::padded_to(&now_rfc3339(), len)
}

#[test]
fn an_8_mib_string_gets_422_at_the_body_limit_and_413_one_byte_past_it() {
    let app = spawn_app(|_| {});
    let max_body_bytes = max_body_bytes();
    let at_limit = padded_to(max_body_bytes);
    assert_eq!(at_limit.len(), max_body_bytes);
    let answer = app.post_json(LOCATION, &at_limit);
    assert_refused(&app, &answer, 422, "invalid_update", "8 MiB string at the limit");
    assert_names(&answer, 0, Some("attributes"), "8 MiB string at the limit");

    let past_limit = padded_to(max_body_bytes + 1);
    let length = past_limit.len().to_string();
    // Refused from the declared length before the body is read, and by count when no length is declared.
    let declared = send_raw(
        &app,
        LOCATION,
        &[JSON, ("Content-Length", &length)],
        past_limit.clone().into_bytes(),
    );
    assert_refused(
        &app,
        &declared,
        413,
        "payload_too_large",
        "declared one byte past the limit",
    );
    assert_eq!(declared.json()["details"][0]["limit_bytes"], max_body_bytes);
    let streamed = send_raw(
        &app,
        LOCATION,
        &[JSON, ("Transfer-Encoding", "chunked")],
        chunked(past_limit.as_bytes()),
    );
    assert_refused(
        &app,
        &streamed,
        413,
        "payload_too_large",
        "streamed one byte past the limit",
    );
    assert_nothing_stored(app);
}

#[test]
fn a_gzip_bomb_gets_413_without_being_inflated() {
    let app = spawn_app(|_| {});
    // 1 GiB of zeros, compressed 1 MiB at a time so that the test never holds more than that; the fast level keeps
    // the test quick and still packs the gigabyte into less than the body limit.
    let max_body_bytes = max_body_bytes();
    let zeros = vec![0u8; 1024 * 1024];
    let compress = |level, times| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), level);
        for _ in 0..times {
            encoder.write_all(&zeros).unwrap();
        }
        encoder.finish().unwrap()
    };
    let bomb = compress(flate2::Compression::fast(), 1024);
    // 4 GiB as 4096 gzip members of 1 MiB each, about 4 MiB in all: a decoder that reads member after member must
    // stop as early.
    let member = compress(flate2::Compression::best(), 1);
    let members: Vec<u8> = member.iter().copied().cycle().take(member.len() * 4096).collect();
    for body in [&bomb, &members] {
        // Under the limit as sent: what must be refused is what they inflate to.
        assert!(body.len() < max_body_bytes, "{} bytes", body.len());
    }

    let before = MemoryPeak::start();
    for (what, body) in [("1 GiB in one member", &bomb), ("4 GiB in 4096 members", &members)] {
        let answer = app.post(LOCATION, body, &[JSON, GZIP]);
        assert_refused(&app, &answer, 413, "payload_too_large", what);
        assert_eq!(answer.json()["details"][0]["limit_bytes"], max_body_bytes);
    }
    if let Some(grown) = before.and_then(|b| b.growth()) {
        eprintln!("refusing the bombs raised this process's peak by {grown} bytes");
        // Other tests share this process, hence the loose bound; inflating the larger bomb would take 4 GiB.
        assert!(
            grown < 1 << 30,
            "this process grew by {grown} bytes while refusing the bombs"
        );
    }
    assert_nothing_stored(app);
}

#[test]
fn a_gzip_body_cut_short_or_corrupt_gets_400() {
    let app = spawn_app(|_| {});
    let whole = gzip(location_json("cut").as_bytes());
    // Every cut, from nothing at all through the header, the compressed data and the trailer.
    for len in 0..whole.len() {
        let answer = app.post(LOCATION, &whole[..len], &[JSON, GZIP]);
        assert_refused(
            &app,
            &answer,
            400,
            "invalid_encoding",
            &format!("cut at {len} of {}", whole.len()),
        );
    }
    let mut bad_checksum = whole.clone();
    let crc = bad_checksum.len() - 8;
    bad_checksum[crc] ^= 0xff;
    let answer = app.post(LOCATION, &bad_checksum, &[JSON, GZIP]);
    assert_refused(&app, &answer, 400, "invalid_encoding", "bad checksum");
    let trailing = [whole.as_slice(), b"garbage"].concat();
    let answer = app.post(LOCATION, &trailing, &[JSON, GZIP]);
    assert_refused(&app, &answer, 400, "invalid_encoding", "garbage after the member");
    assert_nothing_stored(app);
}

#[test]
fn a_declared_content_length_over_the_limit_gets_413_before_any_body_is_sent() {
    let app = spawn_app(|_| {});
    for length in [max_body_bytes() + 1, 1 << 30, usize::MAX] {
        let length = length.to_string();
        // Only a few bytes follow: a gateway that waited for the body would hang here until the read timeout.
        let answer = send_raw(&app, LOCATION, &[JSON, ("Content-Length", &length)], b"[{".to_vec());
        assert_refused(&app, &answer, 413, "payload_too_large", &length);
    }
    assert_nothing_stored(app);
}

#[test]
fn an_ndjson_line_of_9_mib_gets_413() {
    let app = spawn_app(|_| {});
    let line = padded_to(max_body_bytes() + 1024 * 1024);
    let length = line.len().to_string();
    let answer = send_raw(
        &app,
        LOCATION,
        &[NDJSON, ("Content-Length", &length)],
        line.clone().into_bytes(),
    );
    assert_refused(&app, &answer, 413, "payload_too_large", "9 MiB line, declared");
    let answer = send_raw(
        &app,
        LOCATION,
        &[NDJSON, ("Transfer-Encoding", "chunked")],
        chunked(line.as_bytes()),
    );
    assert_refused(&app, &answer, 413, "payload_too_large", "9 MiB line, streamed");
    assert_nothing_stored(app);
}

#[test]
fn an_empty_json_array_is_accepted_as_zero_updates_and_stores_nothing() {
    // The gateway answers `[]` with 202 and a count of 0 (it skips the queue for an empty request), unlike an
    // NDJSON body without a line, which holds no update at all and gets 400.
    let app = spawn_app(|_| {});
    for path in [LOCATION, POLL] {
        let answer = app.post_json(path, "[]");
        assert_eq!(answer.status, 202, "{}", answer.body);
        assert_eq!(answer.json(), serde_json::json!({"accepted": 0}));
        let answer = app.post_json(path, " [ \n ] ");
        assert_eq!(answer.status, 202, "{}", answer.body);
    }
    let answer = app.post(LOCATION, b"\n \n", &[NDJSON]);
    assert_refused(&app, &answer, 400, "invalid_json", "blank NDJSON");
    let answer = app.post(LOCATION, b"[]", &[NDJSON]);
    assert_refused(&app, &answer, 422, "invalid_update", "an NDJSON line that is an array");
    assert_names(&answer, 0, None, "an NDJSON line that is an array");
    assert_nothing_stored(app);
}

#[test]
fn an_update_postgresql_cannot_store_gets_422_and_the_stream_keeps_flowing() {
    let app = spawn_app(|_| {});
    let at = now_rfc3339();
    // Every case is sent before failing, so that one run shows each answer.
    let wrong: Vec<String> = cases::unstorable()
        .iter()
        .filter_map(|case| {
            let body = case.body(&at);
            let answer = app.post_json(path(case.stream), &body);
            (!is_expected(&answer, case.expected)).then(|| format!("{body} → {} {}", answer.status, answer.body))
        })
        .collect();
    assert!(wrong.is_empty(), "expected 422:\n{}", wrong.join("\n"));
    let answer = app.post_json(LOCATION, &location_json("after"));
    assert_eq!(answer.status, 202);
    eventually("the next update is written", Duration::from_secs(10), || {
        app.db.count("location_updates") == 1
    });
    assert_eq!(app.db.count("dead_letters"), 0);
}

#[test]
fn numbers_and_escapes_postgresql_does_store_are_accepted_and_written() {
    // The counterpart of the test above, against PostgreSQL itself: what the rules let through, jsonb takes.
    let mut app = spawn_app(|_| {});
    let storable = cases::storable();
    for (i, case) in storable.iter().enumerate() {
        // A second apart: the same device at the same moment would be one update, stored once.
        let at = OffsetDateTime::now_utc() - time::Duration::seconds(i as i64);
        let body = case.body(&at.format(&Rfc3339).unwrap());

        let answer = app.post_json(path(case.stream), &body);

        assert_expected(&app, &answer, case.expected, &body);
    }
    // Stopping writes everything accepted: a value PostgreSQL refused would be a dead letter by then.
    assert!(app.stop().is_clean());
    assert_eq!(app.db.count("dead_letters"), 0);
    assert_eq!(app.db.count("location_updates"), storable.len() as i64);
}

#[test]
fn a_body_at_the_size_limit_gets_a_clear_4xx_whatever_its_shape() {
    let app = spawn_app(|_| {});
    for cases::LargeBody {
        what,
        format,
        body,
        expected,
    } in cases::largest_bodies(&now_rfc3339())
    {
        let answer = app.post(LOCATION, body.as_bytes(), &[content_type(format)]);

        assert_expected(&app, &answer, expected, what);
    }
    assert_nothing_stored(app);
}
