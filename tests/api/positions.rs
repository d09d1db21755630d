//! Each device's newest fix in `device_positions`, kept in the batch's transaction and never moved back by a late
//! update; each project's newest poll result likewise; and the notice on `ingest_<stream>` that a batch committed,
//! for a downstream listener.

use std::sync::mpsc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::helpers::{eventually, fresh_database, shared_cluster, spawn_app_on};

/// A location update of `device` taken `minutes_ago`.
fn fix(device: &str, minutes_ago: i64, lat: f64) -> String {
    let at = time::OffsetDateTime::now_utc() - time::Duration::minutes(minutes_ago);
    let at = at.format(&time::format_description::well_known::Rfc3339).unwrap();
    format!(r#"{{"device_id":"{device}","recorded_at":"{at}","lat":{lat},"lon":2.35}}"#)
}

/// Listens on `channel` with a connection of its own; every notice's payload arrives on the receiver.
fn listen(config: tokio_postgres::Config, channel: &str) -> mpsc::Receiver<String> {
    let (notices, received) = mpsc::channel();
    let (ready, listening) = mpsc::channel();
    let channel = channel.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (client, mut connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
            let messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            let pump = tokio::spawn(async move {
                futures_util::pin_mut!(messages);
                while let Some(Ok(message)) = messages.next().await {
                    if let tokio_postgres::AsyncMessage::Notification(notice) = message {
                        if notices.send(notice.payload().to_owned()).is_err() {
                            break;
                        }
                    }
                }
            });
            client.batch_execute(&format!("LISTEN {channel}")).await.unwrap();
            ready.send(()).unwrap();
            let _ = pump.await;
        });
    });
    listening.recv().unwrap();
    received
}

#[test]
fn the_newest_fix_of_each_device_is_kept_and_a_late_one_does_not_move_it_back() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let notices = listen(cluster.config(&name), "ingest_location");
    let app = spawn_app_on(cluster.config(&name), |_| {});
    let route = "/api/v1/location/update";

    let batch = format!(
        "[{},{},{}]",
        fix("truck-1", 10, 1.0),
        fix("truck-1", 5, 2.0),
        fix("truck-2", 7, 3.0)
    );
    assert_eq!(app.post_json(route, &batch).status, 202);
    eventually("the batch lands", Duration::from_secs(10), || {
        app.db.count("location_updates") == 3
    });
    // Late: older than what truck-1 already has.
    assert_eq!(app.post_json(route, &fix("truck-1", 8, 9.0)).status, 202);
    eventually("the late fix lands", Duration::from_secs(10), || {
        app.db.count("location_updates") == 4
    });

    let positions: Vec<(String, f64)> = app
        .db
        .query("SELECT device_id, lat FROM device_positions ORDER BY device_id")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(positions, [("truck-1".to_owned(), 2.0), ("truck-2".to_owned(), 3.0)]);

    let first: serde_json::Value =
        serde_json::from_str(&notices.recv_timeout(Duration::from_secs(10)).expect("a notice")).unwrap();
    assert_eq!(first["rows"], 3);
    assert_eq!(first["devices"], 2);
    assert!(first["from"].as_str().unwrap() < first["to"].as_str().unwrap());
}

#[test]
fn without_latest_positions_the_table_is_left_alone() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let app = spawn_app_on(cluster.config(&name), |s| s.pipeline.latest_positions = false);
    assert_eq!(
        app.post_json("/api/v1/location/update", &fix("van-1", 1, 1.0)).status,
        202
    );
    eventually("the update lands", Duration::from_secs(10), || {
        app.db.count("location_updates") == 1
    });
    assert_eq!(app.db.count("device_positions"), 0);
}

/// A poll result of `project` taken `minutes_ago`.
fn poll(project: i64, minutes_ago: i64, success: bool) -> String {
    let at = time::OffsetDateTime::now_utc() - time::Duration::minutes(minutes_ago);
    let at = at.format(&time::format_description::well_known::Rfc3339).unwrap();
    format!(r#"{{"project_id":{project},"polled_at":"{at}","success":{success}}}"#)
}

#[test]
fn the_newest_result_of_each_project_is_kept_and_a_late_one_does_not_move_it_back() {
    let route = "/api/v1/poll/update";
    let app = crate::helpers::spawn_app(|_| {});
    let batch = format!("[{},{},{}]", poll(1, 10, true), poll(1, 5, false), poll(2, 7, true));
    assert_eq!(app.post_json(route, &batch).status, 202);
    eventually("the batch lands", Duration::from_secs(10), || {
        app.db.count("poll_results") == 3
    });
    assert_eq!(app.post_json(route, &poll(1, 8, true)).status, 202);
    eventually("the late result lands", Duration::from_secs(10), || {
        app.db.count("poll_results") == 4
    });
    let latest: Vec<(i64, bool)> = app
        .db
        .query("SELECT project_id, success FROM project_latest_results ORDER BY project_id")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(latest, [(1, false), (2, true)]);

    let off = crate::helpers::spawn_app(|s| s.pipeline.latest_poll_results = false);
    assert_eq!(off.post_json(route, &poll(3, 1, true)).status, 202);
    eventually("the result lands", Duration::from_secs(10), || {
        off.db.count("poll_results") == 1
    });
    assert_eq!(off.db.count("project_latest_results"), 0);
}
