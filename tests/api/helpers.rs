//! The test harness: one throwaway PostgreSQL per test binary (a database per test), the gateway started
//! in-process on a free port, a small HTTP client and a synchronous database client.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ingest_gateway::config::Settings;
use ingest_gateway::db::EmbeddedPostgres;
use ingest_gateway::http::AppState;
use ingest_gateway::startup::shutdown::ShutdownOutcome;
use ingest_gateway::startup::{Application, Role};
use ingest_gateway::wal::file_io::{FileIo, PlainFiles};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio_postgres::NoTls;

/// The cluster shared by the tests that do not stop their database.
pub fn shared_cluster() -> &'static EmbeddedPostgres {
    static CLUSTER: OnceLock<EmbeddedPostgres> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        // The gateway's logs would drown the test report; RUST_LOG=info (or debug) brings them back.
        if std::env::var_os("RUST_LOG").is_some() {
            ingest_gateway::telemetry::init(ingest_gateway::config::LogFormat::Text);
        }
        EmbeddedPostgres::start_ephemeral().expect("start the test PostgreSQL")
    })
}

/// A new, empty database on `cluster`.
pub fn fresh_database(cluster: &EmbeddedPostgres) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = format!("test_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let admin = Db::connect(cluster.config("postgres"));
    admin.execute(&format!("CREATE DATABASE {name}"));
    name
}

/// A synchronous PostgreSQL client for assertions.
pub struct Db {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Db {
    pub fn connect(config: tokio_postgres::Config) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = runtime.block_on(async {
            let (client, connection) = config.connect(NoTls).await.expect("connect to the test database");
            tokio::spawn(connection);
            client
        });
        Db { runtime, client }
    }

    pub fn execute(&self, sql: &str) {
        self.runtime
            .block_on(self.client.batch_execute(sql))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub fn query(&self, sql: &str) -> Vec<tokio_postgres::Row> {
        self.runtime
            .block_on(self.client.query(sql, &[]))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub fn count(&self, table: &str) -> i64 {
        self.query(&format!("SELECT count(*) FROM {table}"))[0].get(0)
    }

    /// The `device_id`s in `location_updates`, with how often each occurs.
    pub fn device_ids(&self) -> Vec<(String, i64)> {
        self.query("SELECT device_id, count(*) FROM location_updates GROUP BY device_id")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    /// The `X-Request-Id` the gateway answered with.
    pub request_id: Option<String>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// A gateway running in this process.
pub struct TestApp {
    pub address: String,
    pub db: Db,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<ShutdownOutcome>>>,
    agent: ureq::Agent,
    /// The handlers' shared state, for tests that hand updates to an intake directly; let go of at the stop.
    state: Option<actix_web::web::Data<AppState>>,
    /// The gateway's data directory (its write-ahead log), removed with the app.
    pub data_dir: std::path::PathBuf,
    _data_dir: tempfile::TempDir,
}

/// Starts a gateway on a new database of the shared cluster, with test-friendly settings changed by `tune`.
pub fn spawn_app(tune: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with_log_files(Arc::new(PlainFiles), tune)
}

/// Starts a gateway writing to the database `config` names.
pub fn spawn_app_on(config: tokio_postgres::Config, tune: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_on_with(config, Arc::new(PlainFiles), tune)
}

/// As [`spawn_app`], with the write-ahead log writing its segments through `log_files`: a disk the test controls.
pub fn spawn_app_with_log_files(log_files: Arc<dyn FileIo>, tune: impl FnOnce(&mut Settings)) -> TestApp {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    spawn_app_on_with(cluster.config(&name), log_files, tune)
}

fn spawn_app_on_with(
    config: tokio_postgres::Config,
    log_files: Arc<dyn FileIo>,
    tune: impl FnOnce(&mut Settings),
) -> TestApp {
    let data_dir = tempfile::tempdir().expect("a data directory");
    let mut settings = Settings::defaults();
    settings.storage.data_dir = data_dir.path().to_owned();
    settings.http.listen = "127.0.0.1:0".into();
    settings.database.database_url = Some(connection_string(&config));
    settings.pipeline.flush_interval = Duration::from_millis(100);
    settings.pipeline.shutdown_timeout = Duration::from_secs(20);
    tune(&mut settings);
    let app = Application::build_with(&settings, Role::Serve, log_files).expect("build the gateway");
    let address = format!("http://127.0.0.1:{}", app.port());
    let state = app.state();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(app.run(async {
            let _ = stop_rx.await;
        }))
    });
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
    TestApp {
        address,
        db: Db::connect(config),
        stop: Some(stop_tx),
        thread: Some(thread),
        agent,
        state: Some(state),
        data_dir: data_dir.path().to_owned(),
        _data_dir: data_dir,
    }
}

/// `config` as a key=value connection string.
pub fn connection_string(config: &tokio_postgres::Config) -> String {
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
    };
    let password = config
        .get_password()
        .map(|p| format!(" password={}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    format!(
        "host={host} port={} user={} dbname={}{password}",
        config.get_ports()[0],
        config.get_user().unwrap_or("postgres"),
        config.get_dbname().unwrap_or("postgres")
    )
}

impl TestApp {
    /// POSTs `body` with the given headers.
    pub fn post(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Answer {
        let mut request = self.agent.post(&format!("{}{path}", self.address));
        for (name, value) in headers {
            request = request.set(name, value);
        }
        into_answer(request.send_bytes(body))
    }

    pub fn post_json(&self, path: &str, body: &str) -> Answer {
        self.post(path, body.as_bytes(), &[("Content-Type", "application/json")])
    }

    pub fn get(&self, path: &str) -> Answer {
        into_answer(self.agent.get(&format!("{}{path}", self.address)).call())
    }

    /// One figure of the location stream in `/stats` (`batches_written`, `dead_lettered`, …).
    pub fn location_stat(&self, name: &str) -> serde_json::Value {
        self.get("/stats").json()["streams"]["location"][name].clone()
    }

    /// Waits until every update accepted so far is written (or absorbed, or dead-lettered): nothing queued and
    /// nothing waiting in the log, on every stream. After it, a count of rows is final.
    pub fn wait_until_all_written(&self) {
        wait_until_all_written(&self.address);
    }

    /// The running gateway's shared state: its intakes, as the HTTP handlers see them.
    pub fn state(&self) -> &AppState {
        self.state.as_deref().expect("the gateway runs")
    }

    /// Stops the gateway as SIGTERM would, and returns what the stop achieved.
    /// Its database stays reachable through `db` afterwards.
    pub fn stop(&mut self) -> ShutdownOutcome {
        self.state = None;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let thread = self.thread.take().expect("the gateway runs");
        thread
            .join()
            .expect("the gateway thread panicked")
            .expect("the gateway failed")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if self.thread.is_some() && !std::thread::panicking() {
            self.stop();
        }
    }
}

fn into_answer(result: Result<ureq::Response, ureq::Error>) -> Answer {
    let response = match result {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = response.status();
    let retry_after = response.header("Retry-After").map(str::to_owned);
    let request_id = response.header("X-Request-Id").map(str::to_owned);
    let body = response.into_string().expect("read the answer");
    Answer {
        status,
        retry_after,
        request_id,
        body,
    }
}

/// Waits until the gateway at `address` has written (or absorbed, or dead-lettered) every update it accepted so
/// far: nothing queued and nothing waiting in the log, on every stream, as its `/stats` says. After it, a count of
/// rows is final.
pub fn wait_until_all_written(address: &str) {
    wait_until_all_written_within(address, Duration::from_secs(60));
}

/// [`wait_until_all_written`], for a backlog that may take longer than a minute on a busy machine.
pub fn wait_until_all_written_within(address: &str, timeout: Duration) {
    eventually("every accepted update is written", timeout, || {
        let Some(stats) = stats(address) else {
            return false;
        };
        ["location", "poll", "dead_letter"].iter().all(|stream| {
            let figures = &stats["streams"][stream];
            figures["queue_depth"] == 0 && figures["wal_backlog_bytes"] == 0 && figures["replaying"] == false
        })
    });
}

/// The gateway's `/stats` at `address`, or `None` while it does not answer (it is starting, or gone).
pub fn stats(address: &str) -> Option<serde_json::Value> {
    let body = ureq::get(&format!("{address}/stats")).call().ok()?.into_string().ok()?;
    Some(serde_json::from_str(&body).expect("/stats answers JSON"))
}

/// Waits up to `timeout` for `condition`; panics with `what` if it never holds. Only for conditions that do
/// hold eventually: the timeout is a safety net, not a measurement.
pub fn eventually(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `future` to its end on a runtime of its own, as an HTTP handler would run it on its worker.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(future)
}

/// Now, as RFC 3339.
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap()
}

/// A valid location update for `device_id`.
pub fn location_json(device_id: &str) -> String {
    format!(
        r#"{{"device_id":"{device_id}","recorded_at":"{}","lat":48.85,"lon":2.35}}"#,
        now_rfc3339()
    )
}

/// A JSON array of `n` valid location updates with device ids `<prefix>-0` … `<prefix>-<n-1>`.
pub fn location_array(prefix: &str, n: usize) -> String {
    let items: Vec<String> = (0..n).map(|i| location_json(&format!("{prefix}-{i}"))).collect();
    format!("[{}]", items.join(","))
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Acknowledged and refused device ids, gathered by load threads.
#[derive(Debug, Default)]
pub struct Ledger {
    pub acknowledged: BTreeSet<String>,
    pub refused: BTreeSet<String>,
    /// Sent, but the connection broke before an answer: stored or not, either is right.
    pub unknown: BTreeSet<String>,
    pub other_statuses: Vec<u16>,
}

impl Ledger {
    pub fn merge(&mut self, other: Ledger) {
        self.acknowledged.extend(other.acknowledged);
        self.refused.extend(other.refused);
        self.unknown.extend(other.unknown);
        self.other_statuses.extend(other.other_statuses);
    }

    /// Checks the stored rows against what was answered: every 202 is stored exactly once, and nothing that
    /// was refused is stored. Returns (missing, unexpected, stored twice).
    pub fn compare(&self, stored: &[(String, i64)]) -> (Vec<String>, Vec<String>, Vec<String>) {
        let ids: BTreeSet<&String> = stored.iter().map(|(id, _)| id).collect();
        let missing = self
            .acknowledged
            .iter()
            .filter(|id| !ids.contains(id))
            .cloned()
            .collect();
        let unexpected = ids
            .iter()
            .filter(|id| !self.acknowledged.contains(**id) && !self.unknown.contains(**id))
            .map(|id| (*id).clone())
            .collect();
        let twice = stored
            .iter()
            .filter(|(_, n)| *n > 1)
            .map(|(id, _)| id.clone())
            .collect();
        (missing, unexpected, twice)
    }
}

impl Ledger {
    /// Prints what was answered and what was found under `label`, then checks that every 202 is stored exactly
    /// once and nothing refused is.
    pub fn assert_stored_exactly_once(&self, label: &str, stored: &[(String, i64)]) {
        let (missing, unexpected, twice) = self.compare(stored);
        eprintln!(
            "{label}: {} acknowledged, {} refused, {} unanswered, {} rows found, {} missing, {} unexpected, \
             {} stored twice",
            self.acknowledged.len(),
            self.refused.len(),
            self.unknown.len(),
            stored.len(),
            missing.len(),
            unexpected.len(),
            twice.len()
        );
        assert!(self.other_statuses.is_empty(), "{:?}", self.other_statuses);
        assert!(self.acknowledged.len() > 100, "the load ran");
        assert!(
            missing.is_empty(),
            "acknowledged but missing: {:?}",
            &missing[..missing.len().min(10)]
        );
        assert!(
            unexpected.is_empty(),
            "refused but stored: {:?}",
            &unexpected[..unexpected.len().min(10)]
        );
        assert!(twice.is_empty(), "stored twice: {twice:?}");
    }
}

/// Threads posting location updates (singles, and every fourth request an array of 20) with unique device ids
/// until stopped, recording every answer.
pub struct Load {
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Updates answered 202 so far, over all threads.
    acknowledged: std::sync::Arc<AtomicUsize>,
    threads: Vec<JoinHandle<Ledger>>,
}

impl Load {
    pub fn start(address: &str, threads: usize, tag: &str) -> Load {
        let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let acknowledged = std::sync::Arc::new(AtomicUsize::new(0));
        let threads = (0..threads)
            .map(|t| {
                let (url, running, acknowledged, tag) = (
                    format!("{address}/api/v1/location/update"),
                    running.clone(),
                    acknowledged.clone(),
                    tag.to_owned(),
                );
                std::thread::spawn(move || {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
                    let mut ledger = Ledger::default();
                    let mut i = 0;
                    while running.load(std::sync::atomic::Ordering::Relaxed) {
                        let prefix = format!("{tag}-{t}-{i}");
                        let (body, ids): (String, Vec<String>) = if i % 4 == 0 {
                            (
                                location_array(&prefix, 20),
                                (0..20).map(|k| format!("{prefix}-{k}")).collect(),
                            )
                        } else {
                            (location_json(&prefix), vec![prefix.clone()])
                        };
                        i += 1;
                        match agent
                            .post(&url)
                            .set("Content-Type", "application/json")
                            .send_string(&body)
                        {
                            Ok(r) if r.status() == 202 => {
                                acknowledged.fetch_add(ids.len(), Ordering::Relaxed);
                                ledger.acknowledged.extend(ids)
                            }
                            Ok(r) => ledger.other_statuses.push(r.status()),
                            Err(ureq::Error::Status(503, _)) => ledger.refused.extend(ids),
                            Err(ureq::Error::Status(code, _)) => ledger.other_statuses.push(code),
                            Err(e) if e.kind() == ureq::ErrorKind::ConnectionFailed => {
                                // Never reached the gateway (it is down): certainly not stored.
                                ledger.refused.extend(ids);
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            Err(_) => {
                                ledger.unknown.extend(ids);
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                    ledger
                })
            })
            .collect();
        Load {
            running,
            acknowledged,
            threads,
        }
    }

    /// Waits until `n` more updates than now are answered 202: the load has reached the gateway and runs, however
    /// slow the machine.
    pub fn wait_for_acknowledged(&self, n: usize) {
        let target = self.acknowledged.load(Ordering::Relaxed) + n;
        eventually(
            &format!("{n} more updates are acknowledged"),
            Duration::from_secs(120),
            || self.acknowledged.load(Ordering::Relaxed) >= target,
        );
    }

    pub fn stop(self) -> Ledger {
        self.running.store(false, std::sync::atomic::Ordering::Relaxed);
        let mut ledger = Ledger::default();
        for t in self.threads {
            ledger.merge(t.join().expect("a load thread panicked"));
        }
        ledger
    }
}

/// A free TCP port on 127.0.0.1 (free now; the caller binds it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The variables of the test's own environment a gateway process keeps: what finding programs (and PostgreSQL's,
/// `PG_BIN`), temporary files, the locale and backtraces need. Nothing else, so that an `INGEST_*` or
/// `DATABASE_URL` left in the caller's shell changes nothing a test checks; a test passes what it means to set.
const KEPT_VARIABLES: &[&str] = &["PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "RUST_BACKTRACE", "PG_BIN"];

/// The binary the process tests start: this build's, or the one `INGEST_TEST_GATEWAY_BIN` names, so that the same
/// attacks can measure another build (a release build, or the code before a change).
pub fn gateway_binary() -> std::path::PathBuf {
    std::env::var_os("INGEST_TEST_GATEWAY_BIN").map_or_else(|| env!("CARGO_BIN_EXE_ingest-gateway").into(), Into::into)
}

/// The gateway binary with `args`, in an environment of [`KEPT_VARIABLES`] and `envs` only, its log at `info`
/// (the lines the tests wait for) unless `envs` says otherwise.
pub fn gateway_command(args: &[&str], envs: &[(&str, String)]) -> Command {
    let mut command = Command::new(gateway_binary());
    command.args(args).env_clear().env("RUST_LOG", "info");
    for name in KEPT_VARIABLES {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    for (k, v) in envs {
        command.env(k, v);
    }
    command
}

/// Runs `serve` with `envs` (no database of its own needed: it must stop before it opens one) and returns how it
/// exited and what it wrote on stderr; panics if it is still running after 30 s.
pub fn refused_start(envs: &[(&str, String)]) -> (std::process::ExitStatus, String) {
    let mut all = vec![("INGEST_LISTEN", "127.0.0.1:0".to_owned())];
    all.extend(envs.iter().cloned());
    let mut command = gateway_command(&["serve"], &all);
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("start the gateway binary");
    // Read on a thread of its own, so that a process that writes more than a pipe holds still gets to exit.
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway ran on where it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().expect("read the gateway's stderr"))
}

/// The lines a gateway binary has written to stderr so far, and whether its stderr has closed.
#[derive(Clone, Default)]
pub struct LogLines(
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
);

/// Sets its flag when dropped, however the thread holding it ends.
struct CloseOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl LogLines {
    /// Waits (a few seconds at most) until the process's stderr has closed, so that every line it wrote before
    /// it exited is in.
    fn wait_for_the_end(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.1.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every line, as written.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// The JSON lines whose message is `message`, in order.
    pub fn with_message(&self, message: &str) -> Vec<serde_json::Value> {
        let lines = self.0.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["message"] == message)
            .collect()
    }
}

pub use ingest_gateway::support::process::send_signal as signal;

pub fn post_location(address: &str, body: &str) -> Option<u16> {
    match ureq::post(&format!("{address}/api/v1/location/update"))
        .set("Content-Type", "application/json")
        .send_string(body)
    {
        Ok(r) => Some(r.status()),
        Err(ureq::Error::Status(code, _)) => Some(code),
        // Refused or reset once the gateway has closed its socket: not acknowledged.
        Err(_) => None,
    }
}

/// A small deterministic generator for kill times; its seed is printed by the tests so that a failure can be
/// replayed with `INGEST_CRASH_SEED`.
pub struct Lcg(pub u64);

impl Lcg {
    /// A number below `below`.
    pub fn next_ms(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// The seed of a crash test's random moments: `INGEST_CRASH_SEED` when set (`CRASH_SEED`, its older name, too),
/// otherwise the clock. Printed at once, so that a run that fails or hangs half-way can still be replayed.
pub fn crash_seed() -> u64 {
    let set = ["INGEST_CRASH_SEED", "CRASH_SEED"]
        .iter()
        .find_map(|name| std::env::var(name).ok())
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("the crash seed is a number below 2^64, not {s:?}"))
        });
    let seed = set.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    eprintln!("crash seed {seed} (INGEST_CRASH_SEED={seed} replays its random moments)");
    seed
}

/// What a test that stops or kills the database under a gateway process needs: a throwaway cluster of its own (so
/// that stopping it disturbs no other test), a database on it, and a data directory that outlives the gateway's runs.
pub struct OwnDatabase {
    pub cluster: EmbeddedPostgres,
    pub name: String,
    pub data_dir: tempfile::TempDir,
}

impl OwnDatabase {
    pub fn start() -> Self {
        let cluster = EmbeddedPostgres::start_ephemeral().expect("a throwaway cluster");
        let name = fresh_database(&cluster);
        OwnDatabase {
            cluster,
            name,
            data_dir: tempfile::tempdir().expect("a data directory"),
        }
    }
}

/// The environment of a gateway process writing to `name` on `cluster`, with its log under `data_dir`.
pub fn gateway_envs(
    cluster: &EmbeddedPostgres,
    name: &str,
    data_dir: &tempfile::TempDir,
) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", connection_string(&cluster.config(name))),
        ("INGEST_DATA_DIR", data_dir.path().display().to_string()),
    ]
}

/// A gateway binary that is killed when dropped, so that a test failing half-way leaves no process behind. Its
/// stderr is kept (JSON lines: `INGEST_LOG_FORMAT=json` unless the test says otherwise).
pub struct GatewayProcess {
    child: Child,
    /// Its HTTP address, as it logged it.
    pub address: String,
    log: LogLines,
    /// The data directory when the test named none, removed after the process.
    _data_dir: Option<tempfile::TempDir>,
}

impl GatewayProcess {
    /// Starts `serve` with `envs` on a free port of loopback, in an environment of nothing but `envs` and the few
    /// variables [`gateway_command`] keeps; in a temporary data directory unless `envs` names one.
    pub fn start(envs: &[(&str, String)]) -> Self {
        let mut envs = envs.to_vec();
        let data_dir = if envs.iter().any(|(k, _)| *k == "INGEST_DATA_DIR") {
            None
        } else {
            let dir = tempfile::tempdir().expect("a data directory");
            envs.push(("INGEST_DATA_DIR", dir.path().display().to_string()));
            Some(dir)
        };
        let mut all = vec![
            ("INGEST_LISTEN", "127.0.0.1:0".to_owned()),
            ("INGEST_LOG_FORMAT", "json".to_owned()),
            ("INGEST_FLUSH_INTERVAL", "200ms".to_owned()),
        ];
        all.extend(envs);
        let mut command = gateway_command(&["serve"], &all);
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("start the gateway binary");
        let stderr = child.stderr.take().unwrap();
        let (port_tx, port_rx) = mpsc::channel();
        let log = LogLines::default();
        let kept = log.clone();
        let echo = std::env::var_os("RUST_LOG").is_some();
        std::thread::spawn(move || {
            // Says that every line is in, once the pipe closes: the process (and whatever shared its stderr) is gone.
            let _closed = CloseOnDrop(kept.1.clone());
            // Keeps reading to the end so that the gateway never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                    if let Some(port) = event["port"].as_u64() {
                        let _ = port_tx.send(port);
                    }
                }
                if echo {
                    eprintln!("gateway: {line}");
                }
                kept.0.lock().unwrap().push(line);
            }
        });
        // Owned from here on: a panic below kills the child on the way out.
        let mut gateway = GatewayProcess {
            child,
            address: String::new(),
            log,
            _data_dir: data_dir,
        };
        match port_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(port) => gateway.address = format!("http://127.0.0.1:{port}"),
            Err(_) => {
                gateway.kill();
                gateway.log.wait_for_the_end();
                panic!(
                    "the gateway did not log its port; it wrote:\n{}",
                    gateway.log.lines().join("\n")
                );
            }
        }
        gateway
    }

    /// Its process id, to read its memory and state under `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line it has logged so far.
    pub fn log(&self) -> &LogLines {
        &self.log
    }

    /// Sends it `signal`.
    pub fn signal(&self, signal: libc::c_int) {
        self::signal(&self.child, signal);
    }

    /// Sends SIGHUP and waits until the reload of `what` (as the gateway names it: `api keys`, `tls certificates`,
    /// …) has run; returns whether it succeeded (a failed one keeps what was loaded before).
    pub fn reload(&self, what: &str) -> bool {
        // Each reload of `what` ends in one of two lines: true for "reloaded", false for a failure.
        let outcomes = || -> Vec<bool> {
            self.log
                .lines()
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|l| l["what"] == what)
                .filter_map(|l| match l["message"].as_str() {
                    Some("reloaded") => Some(true),
                    Some("reload failed; the previous one stays") => Some(false),
                    _ => None,
                })
                .collect()
        };
        let before = outcomes().len();
        self.signal(libc::SIGHUP);
        let mut outcome = None;
        eventually(&format!("the {what} reload has run"), Duration::from_secs(30), || {
            outcome = outcomes().get(before).copied();
            outcome.is_some()
        });
        outcome.expect("waited for above")
    }

    /// Waits for it to exit, at most `timeout` (then kills it and panics), and returns how it exited.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the gateway") {
                self.log.wait_for_the_end();
                return status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("the gateway did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How it exited, if it has.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("look at the gateway process")
    }

    /// Kills it with SIGKILL, as a crash or the OOM killer would, and reaps it.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self::signal(&self.child, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// Stops it with SIGTERM and returns how it exited (within two minutes: the stop writes what was accepted).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(120))
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        // A reaped child's pid may already name another process: signal only one still running.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}
