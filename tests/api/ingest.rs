//! Both streams, every body format, gzip: the rows in the table equal what was sent, field by field.

use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::helpers::{eventually, gzip, now_rfc3339, spawn_app};

const LOCATION: &str = "/api/v1/location/update";
const POLL: &str = "/api/v1/poll/update";

#[test]
fn a_location_update_lands_with_every_field_as_sent() {
    let app = spawn_app(|_| {});
    // An hour ago, in another time zone, with milliseconds: all of it must survive the trip.
    let an_hour_ago = OffsetDateTime::now_utc().replace_nanosecond(250_000_000).unwrap() - time::Duration::hours(1);
    let recorded_at = an_hour_ago
        .to_offset(time::macros::offset!(+2))
        .format(&Rfc3339)
        .unwrap();
    let body = format!(
        r#"{{"device_id":"truck-42:a_b.c","recorded_at":"{recorded_at}","lat":-33.8688,"lon":151.2093,
            "speed_kmh":87.5,"heading_deg":270.25,"accuracy_m":4.5,"driver":{{"name":"Ana","shift":2}},"fuel":0.5}}"#
    );

    let answer = app.post_json(LOCATION, &body);

    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.json(), serde_json::json!({"accepted": 1}));
    eventually("the row is written", Duration::from_secs(10), || {
        app.db.count("location_updates") == 1
    });
    let row = &app.db.query(
        "SELECT device_id, recorded_at, lat, lon, speed_kmh, heading_deg, accuracy_m, attributes::text, \
         received_at FROM location_updates",
    )[0];
    assert_eq!(row.get::<_, String>(0), "truck-42:a_b.c");
    assert_eq!(
        row.get::<_, OffsetDateTime>(1),
        OffsetDateTime::parse(&recorded_at, &Rfc3339).unwrap()
    );
    assert_eq!(row.get::<_, f64>(2), -33.8688);
    assert_eq!(row.get::<_, f64>(3), 151.2093);
    assert_eq!(row.get::<_, Option<f64>>(4), Some(87.5));
    assert_eq!(row.get::<_, Option<f64>>(5), Some(270.25));
    assert_eq!(row.get::<_, Option<f64>>(6), Some(4.5));
    assert_eq!(
        row.get::<_, Option<String>>(7).as_deref(),
        Some(r#"{"fuel": 0.5, "driver": {"name": "Ana", "shift": 2}}"#)
    );
    let received_at: OffsetDateTime = row.get(8);
    assert!((OffsetDateTime::now_utc() - received_at).abs() < time::Duration::minutes(1));
}

#[test]
fn a_poll_result_lands_with_every_field_as_sent_and_absent_optionals_are_null() {
    let app = spawn_app(|_| {});
    let ms = OffsetDateTime::now_utc().unix_timestamp() * 1000 - 1234;
    let body = format!(
        r#"[{{"project_id":9007199254740993,"polled_at":{ms},"success":false,"status_code":503,
              "response_time_ms":1500,"error_message":"upstream said \"no\"","region":"eu-west"}},
            {{"project_id":7,"polled_at":"{}","success":true}}]"#,
        now_rfc3339()
    );

    let answer = app.post_json(POLL, &body);

    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.json()["accepted"], 2);
    eventually("both rows are written", Duration::from_secs(10), || {
        app.db.count("poll_results") == 2
    });
    let rows = app.db.query(
        "SELECT project_id, polled_at, success, status_code, response_time_ms, error_message, attributes::text \
         FROM poll_results ORDER BY project_id DESC",
    );
    assert_eq!(rows[0].get::<_, i64>(0), 9_007_199_254_740_993);
    let polled_at: OffsetDateTime = rows[0].get(1);
    assert_eq!((polled_at.unix_timestamp_nanos() / 1_000_000) as i64, ms);
    assert!(!rows[0].get::<_, bool>(2));
    assert_eq!(rows[0].get::<_, Option<i16>>(3), Some(503));
    assert_eq!(rows[0].get::<_, Option<i32>>(4), Some(1500));
    assert_eq!(
        rows[0].get::<_, Option<String>>(5).as_deref(),
        Some(r#"upstream said "no""#)
    );
    assert_eq!(
        rows[0].get::<_, Option<String>>(6).as_deref(),
        Some(r#"{"region": "eu-west"}"#)
    );
    assert_eq!(rows[1].get::<_, i64>(0), 7);
    assert!(rows[1].get::<_, bool>(2));
    assert_eq!(rows[1].get::<_, Option<i16>>(3), None);
    assert_eq!(rows[1].get::<_, Option<i32>>(4), None);
    assert_eq!(rows[1].get::<_, Option<String>>(5), None);
    assert_eq!(rows[1].get::<_, Option<String>>(6), None);
}

#[test]
fn arrays_ndjson_and_gzip_bodies_all_land() {
    let app = spawn_app(|_| {});
    let one = |id: &str| crate::helpers::location_json(id);
    let array = format!("[{},{}]", one("array-0"), one("array-1"));
    let ndjson = format!("{}\n{}\n\n{}\n", one("ndjson-0"), one("ndjson-1"), one("ndjson-2"));
    let gz_array = gzip(format!("[{},{}]", one("gz-array-0"), one("gz-array-1")).as_bytes());
    let gz_ndjson = gzip(format!("{}\n{}", one("gz-ndjson-0"), one("gz-ndjson-1")).as_bytes());

    let answers = [
        app.post(
            LOCATION,
            array.as_bytes(),
            &[("Content-Type", "application/json; charset=utf-8")],
        ),
        app.post(LOCATION, ndjson.as_bytes(), &[("Content-Type", "application/x-ndjson")]),
        app.post(
            LOCATION,
            &gz_array,
            &[("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
        ),
        app.post(
            LOCATION,
            &gz_ndjson,
            &[("Content-Type", "application/x-ndjson"), ("Content-Encoding", "gzip")],
        ),
    ];

    let accepted: Vec<u64> = answers.iter().map(|a| a.json()["accepted"].as_u64().unwrap()).collect();
    assert_eq!(accepted, [2, 3, 2, 2]);
    eventually("all rows are written", Duration::from_secs(10), || {
        app.db.count("location_updates") == 9
    });
    let mut ids: Vec<String> = app
        .db
        .device_ids()
        .into_iter()
        .map(|(id, n)| {
            assert_eq!(n, 1);
            id
        })
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "array-0",
            "array-1",
            "gz-array-0",
            "gz-array-1",
            "gz-ndjson-0",
            "gz-ndjson-1",
            "ndjson-0",
            "ndjson-1",
            "ndjson-2"
        ]
    );
}

#[test]
fn a_request_without_content_type_is_read_as_json() {
    let app = spawn_app(|_| {});
    let answer = app.post(LOCATION, crate::helpers::location_json("no-type").as_bytes(), &[]);
    assert_eq!(answer.status, 202, "{}", answer.body);
}

#[test]
fn a_web_page_of_another_origin_cannot_make_a_browser_post_updates() {
    let app = spawn_app(|_| {});
    let forged_body = crate::helpers::location_json("from-another-page");
    let own_body = crate::helpers::location_json("from-its-own-page");

    // What a page's `fetch(…, {mode: "no-cors", body: blob})` sends: an Origin and no Content-Type.
    let forged = app.post(
        "/api/v1/location/update",
        forged_body.as_bytes(),
        &[("Origin", "https://evil.example")],
    );
    let same_origin = app.post(
        "/api/v1/location/update",
        own_body.as_bytes(),
        &[("Origin", &app.address), ("Content-Type", "application/json")],
    );

    assert_eq!(forged.status, 403, "{}", forged.body);
    assert_eq!(forged.json()["error"], "forbidden");
    assert_eq!(
        same_origin.status, 202,
        "a page served by the gateway itself may post: {}",
        same_origin.body
    );
    eventually("the page's own update lands", Duration::from_secs(10), || {
        app.db.count("location_updates") == 1
    });
    let stored = app.db.device_ids();
    assert_eq!(
        stored,
        [("from-its-own-page".to_owned(), 1)],
        "the forged update is not stored"
    );
}
