//! Exact device scopes and visible conflicts: a key for `truck-1` never writes `truck-10`, on the JSON route and a
//! tracker route alike; a keys file whose prefix could reach other devices refuses the start, naming its line; and a
//! second write of a stored key with other content is kept in `dead_letters` as a conflict and counted, while an
//! identical retry stays a silent duplicate and `device_positions` keeps the first write.

use ingest_gateway::keys_file::hashed;

use crate::helpers::{
    connection_string, fresh_database, refused_start, shared_cluster, spawn_app, wait_until_all_written, GatewayProcess,
};

const LOCATION: &str = "/api/v1/location/update";
const POLL: &str = "/api/v1/poll/update";

/// A key as `new-key` makes them, different for each `n`.
fn key(n: u8) -> String {
    format!("igk_{}", format!("{n:02x}").repeat(32))
}

/// A fix of `device` at `at` (RFC 3339) at latitude `lat`.
fn fix(device: &str, at: &str, lat: f64) -> String {
    format!(r#"{{"device_id":"{device}","recorded_at":"{at}","lat":{lat},"lon":2.35}}"#)
}

fn a_minute_ago() -> String {
    let at = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    at.replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn post(address: &str, path: &str, body: &str, key: &str) -> u16 {
    match ureq::post(&format!("{address}{path}"))
        .set("Content-Type", "application/json")
        .set("Authorization", &format!("Bearer {key}"))
        .send_string(body)
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("request failed: {e}"),
    }
}

fn get(address: &str, path: &str) -> u16 {
    match ureq::get(&format!("{address}{path}")).call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("request failed: {e}"),
    }
}

#[test]
fn a_key_for_truck_1_writes_truck_1_and_never_truck_10_on_any_route() {
    let truck = key(1);
    let fleet = key(2);
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(
        &keys,
        format!(
            "truck-1 {} streams=location device=truck-1\nfleet {} streams=location devices=van-\n",
            hashed(&truck),
            hashed(&fleet)
        ),
    )
    .unwrap();
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let gateway = GatewayProcess::start(&[
        ("DATABASE_URL", connection_string(&cluster.config(&name))),
        ("INGEST_DATA_DIR", dir.path().join("data").display().to_string()),
        ("INGEST_API_KEYS_FILE", keys.display().to_string()),
    ]);
    let at = a_minute_ago();
    let unix = time::OffsetDateTime::now_utc().unix_timestamp() - 60;

    let mut refused = Vec::new();
    for device in ["truck-10", "truck-1.x", "truck-1-a", "truck-"] {
        refused.push((device, post(&gateway.address, LOCATION, &fix(device, &at, 1.0), &truck)));
        let osmand = format!("/api/v1/osmand/k/{truck}?id={device}&timestamp={unix}&lat=1&lon=2");
        refused.push((device, get(&gateway.address, &osmand)));
    }
    let fleet_outside = post(&gateway.address, LOCATION, &fix("vanity", &at, 1.0), &fleet);
    let own = post(&gateway.address, LOCATION, &fix("truck-1", &at, 1.0), &truck);
    let own_osmand = get(
        &gateway.address,
        &format!("/api/v1/osmand/k/{truck}?id=truck-1&timestamp={}&lat=1&lon=2", unix - 1),
    );
    let fleet_inside = post(&gateway.address, LOCATION, &fix("van-7", &at, 1.0), &fleet);

    eprintln!("scope refusals (device, status): {refused:?}");
    assert!(refused.iter().all(|(_, status)| *status == 403), "{refused:?}");
    assert_eq!(fleet_outside, 403, "devices=van- does not reach vanity");
    assert_eq!((own, own_osmand, fleet_inside), (202, 200, 202));
    let db = crate::helpers::Db::connect(cluster.config(&name));
    wait_until_all_written(&gateway.address);
    assert_eq!(
        db.count("location_updates"),
        3,
        "the three updates in scope are stored, no other"
    );
    let mut devices = db.device_ids();
    devices.sort();
    assert_eq!(devices, [("truck-1".to_owned(), 2), ("van-7".to_owned(), 1)]);
}

#[test]
fn a_keys_file_whose_prefix_could_reach_other_devices_refuses_the_start_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(
        &keys,
        format!("# fleet\nfleet {} streams=location devices=truck-1\n", hashed(&key(1))),
    )
    .unwrap();
    let (status, stderr) = refused_start(&[
        ("INGEST_DATA_DIR", dir.path().join("data").display().to_string()),
        ("INGEST_API_KEYS_FILE", keys.display().to_string()),
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("line 2") && stderr.contains("device=truck-1") && stderr.contains("devices=truck-1-"),
        "{stderr}"
    );
}

#[test]
fn a_second_write_of_a_stored_key_with_other_content_is_a_conflict_kept_and_counted_a_retry_is_not() {
    let app = spawn_app(|_| {});
    let at = a_minute_ago();
    let commit = format!("{LOCATION}?ack=commit");

    // The first write, then an identical retry, then the same key with another position (a poisoned or broken
    // clock), then both kinds again within one request.
    assert_eq!(app.post_json(&commit, &fix("truck-1", &at, 1.0)).status, 202);
    assert_eq!(app.post_json(&commit, &fix("truck-1", &at, 1.0)).status, 202);
    assert_eq!(app.post_json(&commit, &fix("truck-1", &at, 2.0)).status, 202);
    let batch = format!(
        "[{},{},{}]",
        fix("truck-2", &at, 5.0),
        fix("truck-2", &at, 5.0),
        fix("truck-2", &at, 6.0)
    );
    assert_eq!(app.post_json(&commit, &batch).status, 202);
    let poll = |success: bool| format!(r#"{{"project_id":7,"polled_at":"{at}","success":{success}}}"#);
    assert_eq!(app.post_json(&format!("{POLL}?ack=commit"), &poll(true)).status, 202);
    assert_eq!(app.post_json(&format!("{POLL}?ack=commit"), &poll(false)).status, 202);

    let stored = app
        .db
        .query("SELECT device_id, lat FROM location_updates ORDER BY device_id");
    let stored: Vec<(String, f64)> = stored.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(stored, [("truck-1".to_owned(), 1.0), ("truck-2".to_owned(), 5.0)]);
    let positions = app
        .db
        .query("SELECT device_id, lat FROM device_positions ORDER BY device_id");
    let positions: Vec<(String, f64)> = positions.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(positions, stored, "a conflict never moves device_positions");
    let letters = app.db.query(
        "SELECT stream, reason, device_id, (payload->>'lat')::float8, error, sqlstate IS NULL \
           FROM dead_letters ORDER BY stream, device_id",
    );
    /// stream, reason, device_id, the refused latitude, error, no SQLSTATE
    type Letter = (String, String, Option<String>, Option<f64>, String, bool);
    let letters: Vec<Letter> = letters
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    eprintln!("conflicts kept: {letters:?}");
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert_eq!(
        letters
            .iter()
            .map(|l| (l.0.as_str(), l.1.as_str(), l.2.as_deref(), l.3))
            .collect::<Vec<_>>(),
        [
            ("location", "conflict", Some("truck-1"), Some(2.0)),
            ("location", "conflict", Some("truck-2"), Some(6.0)),
            ("poll", "conflict", None, None),
        ]
    );
    assert!(
        letters.iter().all(|l| l.4.contains("the first write is kept") && l.5),
        "{letters:?}"
    );
    let refused_success: bool = app
        .db
        .query("SELECT (payload->>'success')::bool FROM dead_letters WHERE stream = 'poll'")[0]
        .get(0);
    assert!(!refused_success, "the poll result kept is the one refused");

    let metrics = app.get("/metrics").body;
    for expected in [
        r#"ingest_updates_conflicting_total{stream="location"} 2"#,
        r#"ingest_updates_conflicting_total{stream="poll"} 1"#,
        r#"ingest_updates_duplicate_total{stream="location"} 2"#,
        r#"ingest_updates_dead_lettered_total{stream="location"} 0"#,
    ] {
        assert!(metrics.contains(expected), "{expected} not in\n{metrics}");
    }
    let stats = app.get("/stats").json();
    assert_eq!(stats["streams"]["location"]["conflicting"], 2, "{stats}");
    assert_eq!(stats["streams"]["location"]["duplicate"], 2, "{stats}");
}
