//! The `dead_letter` stream: tracker fixes that can never be stored, handed to the intake as the tracker routes hand
//! them, land in `dead_letters` with every column, through the write-ahead log, once — across a restart too.

use std::time::Duration;

use ingest_gateway::db::EmbeddedPostgres;
use ingest_gateway::intake::{Ack, Receipt};
use ingest_gateway::model::DeadLetter;
use time::macros::datetime;
use time::OffsetDateTime;

use crate::helpers::{block_on, eventually, fresh_database, spawn_app, spawn_app_on, TestApp};

/// A refused OsmAnd fix of `device_id` (none when `None`), received at `received_at`.
fn letter(device_id: Option<&str>, received_at: OffsetDateTime) -> DeadLetter {
    DeadLetter {
        stream: "location".into(),
        protocol: "osmand".into(),
        reason: "null_island".into(),
        message: "lat and lon are both 0".into(),
        device_id: device_id.map(str::to_owned),
        payload: format!(
            r#"{{"id":{},"lat":"0","lon":"0","timestamp":"1764547200"}}"#,
            serde_json::to_string(&device_id).unwrap()
        ),
        received_at,
    }
}

fn submit(app: &TestApp, letters: Vec<DeadLetter>, ack: Ack) -> Receipt {
    block_on(app.state().dead_letters.submit(letters, ack)).expect("the letters are taken")
}

/// The device ids in `dead_letters`, in order, with how often each occurs.
fn stored_devices(app: &TestApp) -> Vec<(Option<String>, i64)> {
    app.db
        .query("SELECT device_id, count(*) FROM dead_letters GROUP BY device_id ORDER BY device_id")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn two_letters_committed_through_the_intake_are_in_dead_letters_with_every_column() {
    let app = spawn_app(|_| {});
    let received_at = datetime!(2026-11-22 10:00:00.123456 UTC);
    let letters = vec![letter(Some("truck-1"), received_at), letter(None, received_at)];

    let receipt = submit(&app, letters.clone(), Ack::Committed);

    assert_eq!(
        receipt,
        Receipt {
            updates: 2,
            committed: Some(true)
        }
    );
    let rows = app.db.query(
        "SELECT stream, payload::text, error, reason, protocol, device_id, received_at, sqlstate, \
                failed_at > now() - interval '1 minute' \
           FROM dead_letters ORDER BY id",
    );
    assert_eq!(rows.len(), 2);
    for (row, sent) in rows.iter().zip(&letters) {
        assert_eq!(row.get::<_, String>(0), "location");
        let payload: serde_json::Value = serde_json::from_str(&row.get::<_, String>(1)).unwrap();
        assert_eq!(
            payload,
            serde_json::from_str::<serde_json::Value>(&sent.payload).unwrap()
        );
        assert_eq!(row.get::<_, String>(2), "lat and lon are both 0");
        assert_eq!(row.get::<_, String>(3), "null_island");
        assert_eq!(row.get::<_, String>(4), "osmand");
        assert_eq!(row.get::<_, Option<String>>(5), sent.device_id);
        assert_eq!(row.get::<_, OffsetDateTime>(6), received_at);
        assert_eq!(row.get::<_, Option<String>>(7), None, "no database error");
        assert!(row.get::<_, bool>(8), "failed_at keeps its default");
    }
    // `accepted` is counted by the route that answers; the intake counts what it wrote.
    let stats = app.get("/stats").json();
    let stream = &stats["streams"]["dead_letter"];
    assert_eq!(
        (stream["written"].as_u64(), stream["queue_depth"].as_u64()),
        (Some(2), Some(0)),
        "{stats}"
    );
    assert_eq!(stream["dead_lettered"], 0, "{stats}");
    assert_eq!(
        stats["streams"]["location"]["written"], 0,
        "the letters are not location updates"
    );
    let metrics = app.get("/metrics").body;
    assert!(
        metrics.contains(r#"ingest_updates_written_total{stream="dead_letter"} 2"#),
        "{metrics}"
    );
}

#[test]
fn a_letter_postgresql_could_not_take_as_sent_lands_made_storable_not_refused() {
    let app = spawn_app(|_| {});
    let mut odd = letter(Some("truck-\0"), datetime!(2026-11-22 10:00 UTC));
    odd.payload = "id=truck-\0&lat=0&lon=0".into();
    odd.message.push('\0');

    let receipt = submit(&app, vec![odd], Ack::Committed);

    assert_eq!(receipt.committed, Some(true));
    let rows = app
        .db
        .query("SELECT device_id, error, payload->>'unparsed', sqlstate FROM dead_letters");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), "truck-\u{FFFD}");
    assert_eq!(rows[0].get::<_, String>(1), "lat and lon are both 0\u{FFFD}");
    assert_eq!(rows[0].get::<_, String>(2), "id=truck-\u{FFFD}&lat=0&lon=0");
    assert_eq!(rows[0].get::<_, Option<String>>(3), None);
    assert_eq!(app.get("/stats").json()["streams"]["dead_letter"]["dead_lettered"], 0);
}

#[test]
fn with_a_unique_index_an_operator_added_a_repeated_letter_is_absorbed_as_a_duplicate() {
    let app = spawn_app(|_| {});
    app.db
        .execute("CREATE UNIQUE INDEX one_letter_per_fix ON dead_letters (device_id, received_at)");
    let once = letter(Some("truck-1"), datetime!(2026-11-22 10:00 UTC));

    submit(&app, vec![once.clone()], Ack::Committed);
    // The COPY conflicts, so the batch goes through staging, whose own identity column takes the rows.
    submit(
        &app,
        vec![once, letter(Some("truck-2"), datetime!(2026-11-22 10:00 UTC))],
        Ack::Committed,
    );

    assert_eq!(
        stored_devices(&app),
        [(Some("truck-1".to_owned()), 1), (Some("truck-2".to_owned()), 1)]
    );
    let stats = app.get("/stats").json();
    let stream = &stats["streams"]["dead_letter"];
    assert_eq!(
        (stream["duplicate"].as_u64(), stream["dead_lettered"].as_u64()),
        (Some(1), Some(0)),
        "{stats}"
    );
}

#[test]
fn letters_only_in_the_log_when_the_gateway_stops_land_once_after_the_restart() {
    let mut cluster = EmbeddedPostgres::start_ephemeral().unwrap();
    let name = fresh_database(&cluster);
    let data_dir = tempfile::tempdir().unwrap();
    let dir = data_dir.path().to_owned();
    let tune = move |s: &mut ingest_gateway::config::Settings| {
        s.storage.data_dir = dir.clone();
        s.pipeline.shutdown_timeout = Duration::from_secs(1);
    };
    let mut app = spawn_app_on(cluster.config(&name), tune.clone());
    let at = datetime!(2026-11-22 10:00 UTC);
    // Committed before the outage: in the log as well, behind the position its writer recorded.
    submit(&app, vec![letter(Some("before"), at)], Ack::Committed);
    cluster.stop();

    let receipt = submit(
        &app,
        vec![letter(Some("during-1"), at), letter(Some("during-2"), at)],
        Ack::Durable,
    );
    assert_eq!(receipt.updates, 2);
    assert!(
        !app.stop().is_clean(),
        "the database is down: the stop times out and the log keeps the letters"
    );

    cluster.restart().unwrap();
    let mut app = spawn_app_on(cluster.config(&name), tune);
    eventually("the logged letters land", Duration::from_secs(30), || {
        app.db.count("dead_letters") >= 3
    });
    let stats = app.get("/stats").json();
    assert_eq!(
        stats["streams"]["dead_letter"]["replayed"], 2,
        "the committed letter is skipped, the other two read back: {stats}"
    );
    assert!(app.stop().is_clean());
    let once = |id: &str| (Some(id.to_owned()), 1);
    assert_eq!(
        stored_devices(&app),
        [once("before"), once("during-1"), once("during-2")]
    );
}
