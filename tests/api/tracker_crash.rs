//! Simulated GPS trackers, one per protocol, each buffering its fixes and retrying them as its real client
//! does, against the gateway binary killed twice with SIGKILL and its PostgreSQL restarted once: every valid fix is
//! stored exactly once, every fix that can never be stored is kept in `dead_letters` (more than once only where a
//! kill cut the answer to a request that carried it, so that the client sent it again), and no tracker's queue is
//! ever held up by a fix the gateway cannot store.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::OffsetDateTime;

use crate::helpers::{crash_seed, free_port, gateway_envs, Db, GatewayProcess, Lcg, OwnDatabase};

const FIXES_PER_TRACKER: usize = 2_500;
/// Each simulator drives several devices, each with its own buffer, as a fleet of phones running one app would.
const DEVICES_PER_TRACKER: usize = 4;
/// One fix in a hundred can never be stored.
const INVALID_PER_TRACKER: usize = FIXES_PER_TRACKER / 100;
/// Overland's smallest batch setting (its default is 200): more batches, so more of them are cut by the kills.
const OVERLAND_BATCH: usize = 50;
/// Seconds between two fixes of one device.
const FIX_SPACING_S: i64 = 7;
/// How often a device records a fix on the test's clock: a phone's seconds scaled down, so that the trackers send
/// all through the kills and the outage, each buffering what it records while the gateway does not answer.
const RECORD_EVERY: Duration = Duration::from_millis(20);
/// Overland's send interval (its settings run from 1 s to 30 min), scaled down likewise.
const OVERLAND_SEND_INTERVAL: Duration = Duration::from_millis(250);
/// The clients' backoff, from their seconds and minutes scaled down to milliseconds so that the test is quick.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Beyond this the test fails rather than waits: a stuck tracker must show as a failure, not a hang.
const TIME_LIMIT: Duration = Duration::from_secs(300);

/// One position as a phone or a vehicle unit recorded it.
#[derive(Debug, Clone)]
struct Fix {
    device: String,
    /// Unix seconds: every client here sends whole seconds.
    at: i64,
    /// When, after the simulation starts, the device records it and puts it in its client's buffer.
    recorded: Duration,
    lat: f64,
    lon: f64,
    speed_mps: f64,
    heading_deg: f64,
    accuracy_m: f64,
    altitude_m: f64,
    battery_pct: u8,
    /// The `reason` of its dead letter, for a fix that can never be stored.
    invalid: Option<&'static str>,
}

/// The four protocols, each with the requests its real client sends and the answer that client counts as success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tracker {
    /// Traccar Client, the legacy Android app: a POST with every field in the query and an empty body.
    Osmand,
    /// OwnTracks for Android in HTTP mode.
    Owntracks,
    /// Overland for iOS: batches of GeoJSON Features.
    Overland,
    /// A Traccar server forwarding the positions of a binary device (`forward.type=json`).
    Traccar,
}

impl Tracker {
    const ALL: [Tracker; 4] = [Tracker::Osmand, Tracker::Owntracks, Tracker::Overland, Tracker::Traccar];

    /// As in `dead_letters.protocol`.
    fn name(self) -> &'static str {
        match self {
            Tracker::Osmand => "osmand",
            Tracker::Owntracks => "owntracks",
            Tracker::Overland => "overland",
            Tracker::Traccar => "traccar",
        }
    }

    /// The id the gateway stores for device `d`, shaped as each client's ids are.
    fn device_id(self, d: usize) -> String {
        match self {
            // The legacy app's random numeric id.
            Tracker::Osmand => format!("4824117{d}"),
            // `X-Limit-U:X-Limit-D`.
            Tracker::Owntracks => format!("jane{d}:phone"),
            Tracker::Overland => format!("iphone-{d}"),
            // The unit's IMEI, as Traccar's `device.uniqueId`.
            Tracker::Traccar => format!("35630704244101{d}"),
        }
    }

    /// How many fixes from the head of the buffer one request carries.
    fn batch(self) -> usize {
        match self {
            Tracker::Overland => OVERLAND_BATCH,
            _ => 1,
        }
    }

    /// Sends `fixes` (and, for Overland, the newest fix as `current` when the backlog is longer than the batch).
    fn send(self, agent: &ureq::Agent, base: &str, fixes: &[Fix], newest: Option<&Fix>) -> Answer {
        let result = match self {
            Tracker::Osmand => {
                let f = &fixes[0];
                // traccar-client-android `ProtocolFormatter.kt`: speed in knots, accuracy in metres.
                let url = format!(
                    "{base}/api/v1/osmand?id={}&timestamp={}&lat={}&lon={}&speed={}&bearing={}&altitude={}&accuracy={}&batt={}",
                    f.device,
                    f.at,
                    f.lat,
                    f.lon,
                    f.speed_mps * 1.943844,
                    f.heading_deg,
                    f.altitude_m,
                    f.accuracy_m,
                    f64::from(f.battery_pct)
                );
                agent.post(&url).send_bytes(&[])
            }
            Tracker::Owntracks => {
                let f = &fixes[0];
                let (user, device) = f.device.split_once(':').expect("user:device");
                let body = json!({
                    "_type": "location",
                    "tid": "JJ",
                    "lat": f.lat,
                    "lon": f.lon,
                    "tst": f.at,
                    "acc": f.accuracy_m.round() as i64,
                    "vel": (f.speed_mps * 3.6).round() as i64,
                    "batt": f.battery_pct,
                });
                agent
                    .post(&format!("{base}/api/v1/owntracks"))
                    .set("Content-Type", "application/json; charset=utf-8")
                    .set("User-Agent", "Owntracks-Android/gms/420412000")
                    .set("X-Limit-U", user)
                    .set("X-Limit-D", device)
                    .send_string(&body.to_string())
            }
            Tracker::Overland => {
                let mut body = json!({ "locations": fixes.iter().map(overland_feature).collect::<Vec<_>>() });
                if let Some(newest) = newest {
                    body["current"] = overland_feature(newest);
                }
                agent
                    .post(&format!("{base}/api/v1/overland"))
                    .set("Content-Type", "application/json")
                    .send_string(&body.to_string())
            }
            Tracker::Traccar => {
                let f = &fixes[0];
                let at = jackson_time(f.at);
                let body = json!({
                    "position": {
                        "id": 0,
                        "attributes": {"sat": 9, "ignition": true, "motion": true, "batteryLevel": f.battery_pct},
                        "deviceId": 7,
                        "protocol": "teltonika",
                        "serverTime": jackson_time(f.at + 1),
                        "deviceTime": at,
                        "fixTime": at,
                        "outdated": false,
                        "valid": true,
                        "latitude": f.lat,
                        "longitude": f.lon,
                        "altitude": f.altitude_m,
                        "speed": f.speed_mps * 1.943844,
                        "course": f.heading_deg,
                        "address": null,
                        "accuracy": 0.0,
                        "network": null,
                        "geofenceIds": null,
                    },
                    "device": {
                        "id": 7,
                        "attributes": {},
                        "groupId": 0,
                        "name": "Truck 7",
                        "uniqueId": f.device,
                        "status": "online",
                        "lastUpdate": jackson_time(f.at + 1),
                        "positionId": 0,
                        "disabled": false,
                    },
                });
                agent
                    .post(&format!("{base}/api/v1/traccar"))
                    .set("Content-Type", "application/json")
                    .send_string(&body.to_string())
            }
        };
        answer_of(result)
    }

    /// Whether the client deletes what it sent on this answer.
    fn succeeded(self, status: u16, body: &str) -> bool {
        match self {
            // Overland-iOS deletes its batch only on a JSON object with "result":"ok"; the gateway sends exactly this.
            Tracker::Overland => status == 200 && body == r#"{"result":"ok"}"#,
            Tracker::Osmand | Tracker::Owntracks | Tracker::Traccar => (200..300).contains(&status),
        }
    }

    /// The fix time a dead letter's payload (the request's own fields) carries.
    fn letter_time(self, payload: &Value) -> Option<i64> {
        let iso = |v: &Value| {
            v.as_str()
                .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
                .map(OffsetDateTime::unix_timestamp)
        };
        match self {
            Tracker::Osmand => payload["timestamp"].as_str()?.parse().ok(),
            Tracker::Owntracks => payload["tst"].as_i64(),
            Tracker::Overland => iso(&payload["properties"]["timestamp"]),
            Tracker::Traccar => iso(&payload["position"]["fixTime"]),
        }
    }

    fn from_name(name: &str) -> Option<Tracker> {
        Tracker::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// A Feature as Overland-iOS writes it: `[lon, lat]`, speed in m/s, whole-second UTC time.
fn overland_feature(f: &Fix) -> Value {
    let timestamp = OffsetDateTime::from_unix_timestamp(f.at)
        .unwrap()
        .format(format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z"))
        .unwrap();
    json!({
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [f.lon, f.lat]},
        "properties": {
            "timestamp": timestamp,
            "altitude": f.altitude_m,
            "speed": f.speed_mps,
            "horizontal_accuracy": f.accuracy_m,
            "vertical_accuracy": -1,
            "motion": ["driving"],
            "battery_state": "unplugged",
            "battery_level": f64::from(f.battery_pct) / 100.0,
            "wifi": "",
            "device_id": f.device,
        },
    })
}

/// A time as Traccar's Jackson writes it: `2026-11-22T11:59:00.000+00:00`.
fn jackson_time(at: i64) -> String {
    OffsetDateTime::from_unix_timestamp(at)
        .unwrap()
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]+00:00"
        ))
        .unwrap()
}

/// One tracker's fixes, one buffer per device, oldest first, with `INVALID_PER_TRACKER` fixes that can never be
/// stored (half at 0,0, half at latitude 95) at random places.
fn plan(tracker: Tracker, rng: &mut Lcg, first_at: i64) -> Vec<VecDeque<Fix>> {
    let mut invalid = BTreeSet::new();
    while invalid.len() < INVALID_PER_TRACKER {
        invalid.insert(rng.next_ms(FIXES_PER_TRACKER as u64) as usize);
    }
    let mut buffers = vec![VecDeque::new(); DEVICES_PER_TRACKER];
    let mut invalid_seen = 0;
    for i in 0..FIXES_PER_TRACKER {
        let d = i % DEVICES_PER_TRACKER;
        let mut fix = Fix {
            device: tracker.device_id(d),
            at: first_at + (i / DEVICES_PER_TRACKER) as i64 * FIX_SPACING_S,
            recorded: RECORD_EVERY * (i / DEVICES_PER_TRACKER) as u32,
            lat: micro_degrees(48_000_000 + rng.next_ms(1_000_000) as i64),
            lon: micro_degrees(2_000_000 + rng.next_ms(1_000_000) as i64),
            speed_mps: rng.next_ms(3_000) as f64 / 100.0,
            heading_deg: rng.next_ms(360) as f64,
            accuracy_m: 3.0 + rng.next_ms(30) as f64,
            altitude_m: 30.0 + rng.next_ms(100) as f64,
            battery_pct: 20 + rng.next_ms(80) as u8,
            invalid: None,
        };
        if invalid.contains(&i) {
            if invalid_seen % 2 == 0 {
                (fix.lat, fix.lon) = (0.0, 0.0);
                fix.invalid = Some("null_island");
            } else {
                fix.lat = 95.0;
                fix.invalid = Some("bad_coordinates");
            }
            invalid_seen += 1;
        }
        buffers[d].push_back(fix);
    }
    buffers
}

/// A coordinate with six decimals, as phones report them: its shortest text is those six decimals, which every
/// JSON and query reader turns back into the same number.
fn micro_degrees(micro: i64) -> f64 {
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
        .parse()
        .unwrap()
}

/// What came back for one request.
enum Answer {
    Answered {
        status: u16,
        body: String,
    },
    /// The connection was refused: the request never reached a gateway.
    NotConnected,
    /// Sent (or perhaps sent), and the connection broke before the whole answer: the gateway may have kept it.
    Cut,
}

fn answer_of(result: Result<ureq::Response, ureq::Error>) -> Answer {
    let response = match result {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) if t.kind() == ureq::ErrorKind::ConnectionFailed => return Answer::NotConnected,
        Err(_) => return Answer::Cut,
    };
    let status = response.status();
    match response.into_string() {
        Ok(body) => Answer::Answered { status, body },
        Err(_) => Answer::Cut,
    }
}

/// One device's client state.
struct Device {
    buffer: VecDeque<Fix>,
    backoff: Duration,
    next_try: Instant,
    retrying: bool,
}

/// What one simulated tracker did.
#[derive(Debug, Default)]
struct TrackerReport {
    fixes: usize,
    requests: usize,
    /// Requests that resent a head the previous attempt did not get acknowledged.
    retries: usize,
    /// Requests whose answer a kill cut.
    cut: usize,
    /// Attempts while no gateway listened.
    not_connected: usize,
    /// Answers the client does not count as success, by status.
    failures: BTreeMap<u16, usize>,
    /// Fixes sent again because a kill cut the answer to a request that carried them.
    resent_after_cut: usize,
    /// For each fix that can never be stored, how many requests carrying it lost their answer to a kill: how
    /// many extra copies of its dead letter a resend may leave.
    letters_cut: BTreeMap<(String, i64), usize>,
    /// Fixes still in the buffers at the end: a blocked tracker.
    left: usize,
}

/// Runs one tracker's devices until every buffer is empty: each sends the head of its own buffer, removes it only
/// on its client's success answer, and otherwise retries the same head after a doubling, capped backoff.
fn simulate(
    tracker: Tracker,
    buffers: Vec<VecDeque<Fix>>,
    base: String,
    acknowledged: Arc<AtomicUsize>,
    halted: Arc<AtomicBool>,
    deadline: Instant,
) -> TrackerReport {
    // Real clients wait 15 s for an answer; a kill breaks the connection at once, so this only bounds a hang.
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(2))
        .timeout(Duration::from_secs(15))
        .build();
    let mut report = TrackerReport {
        fixes: buffers.iter().map(VecDeque::len).sum(),
        ..TrackerReport::default()
    };
    let start = Instant::now();
    let mut devices: Vec<Device> = buffers
        .into_iter()
        .map(|buffer| Device {
            buffer,
            backoff: FIRST_BACKOFF,
            next_try: start,
            retrying: false,
        })
        .collect();
    // A device acts once its backoff or send interval is over and its head fix is recorded.
    let ready = |d: &Device| d.next_try.max(start + d.buffer[0].recorded);
    while let Some(device) = devices
        .iter_mut()
        .filter(|d| !d.buffer.is_empty())
        .min_by_key(|d| ready(d))
    {
        if halted.load(Ordering::Relaxed) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(ready(device).saturating_duration_since(Instant::now()));
        let now = Instant::now();
        let held = device.buffer.iter().take_while(|f| start + f.recorded <= now).count();
        let n = tracker.batch().min(held);
        let batch: Vec<Fix> = device.buffer.iter().take(n).cloned().collect();
        let newest = (held > n).then(|| device.buffer[held - 1].clone());
        report.requests += 1;
        report.retries += usize::from(device.retrying);
        let answer = tracker.send(&agent, &base, &batch, newest.as_ref());
        if let Answer::Answered { status, body } = &answer {
            if tracker.succeeded(*status, body) {
                device.buffer.drain(..n);
                acknowledged.fetch_add(n, Ordering::Relaxed);
                device.backoff = FIRST_BACKOFF;
                device.retrying = false;
                // Overland sends the next batch at once only while a full one is waiting, else at its interval.
                let backlog = held - n;
                device.next_try = if tracker == Tracker::Overland && backlog < OVERLAND_BATCH {
                    Instant::now() + OVERLAND_SEND_INTERVAL
                } else {
                    Instant::now()
                };
                continue;
            }
        }
        match answer {
            Answer::Answered { status, .. } => *report.failures.entry(status).or_default() += 1,
            Answer::NotConnected => report.not_connected += 1,
            Answer::Cut => {
                report.cut += 1;
                report.resent_after_cut += n;
                for fix in batch.iter().filter(|f| f.invalid.is_some()) {
                    *report.letters_cut.entry((fix.device.clone(), fix.at)).or_default() += 1;
                }
            }
        }
        device.retrying = true;
        device.next_try = Instant::now() + device.backoff;
        device.backoff = (device.backoff * 2).min(MAX_BACKOFF);
    }
    report.left = devices.iter().map(|d| d.buffer.len()).sum();
    report
}

/// Stops the simulators when the test ends, however it ends.
struct Halt(Arc<AtomicBool>);

impl Drop for Halt {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Polls `condition` every `every` until it holds; fails naming `what` once `deadline` has passed.
fn wait_until(what: &str, deadline: Instant, every: Duration, mut condition: impl FnMut() -> bool) {
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "gave up after {TIME_LIMIT:?} waiting until {what}"
        );
        std::thread::sleep(every);
    }
}

/// The location stream's absorbed duplicates so far in the running gateway (its counters start again at each
/// start), or 0 when it does not answer.
fn duplicates_absorbed(base: &str) -> u64 {
    ureq::get(&format!("{base}/stats"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .and_then(|body| serde_json::from_str::<Value>(&body).ok())
        .and_then(|stats| stats["streams"]["location"]["duplicate"].as_u64())
        .unwrap_or(0)
}

/// The first few of a list, for a failure message.
fn first<T: std::fmt::Debug>(items: &[T]) -> String {
    format!("{} in all, first: {:?}", items.len(), &items[..items.len().min(10)])
}

#[test]
fn a_simulated_tracker_of_each_protocol_loses_and_duplicates_nothing_through_two_kills_and_a_database_restart() {
    let started = Instant::now();
    let deadline = started + TIME_LIMIT;
    let seed = crash_seed();
    let mut rng = Lcg(seed);
    // Its own cluster: this test stops it.
    let OwnDatabase {
        mut cluster,
        name,
        data_dir,
    } = OwnDatabase::start();
    let port = free_port();
    let mut envs = gateway_envs(&cluster, &name, &data_dir);
    // The same port after each restart, as a tracker's configured URL is.
    envs.push(("INGEST_LISTEN", format!("127.0.0.1:{port}")));
    envs.push(("INGEST_FLUSH_INTERVAL", "50ms".to_owned()));
    let mut gateway = GatewayProcess::start(&envs);
    let base = gateway.address.clone();
    let durability = ureq::get(&format!("{base}/stats"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert_eq!(serde_json::from_str::<Value>(&durability).unwrap()["durability"], "wal");

    // Fixes recorded over the last hours, oldest three hours ago.
    let first_at = OffsetDateTime::now_utc().unix_timestamp() - 3 * 3600;
    let plans: Vec<(Tracker, Vec<VecDeque<Fix>>)> = Tracker::ALL
        .into_iter()
        .map(|tracker| (tracker, plan(tracker, &mut rng, first_at)))
        .collect();
    let mut valid: BTreeMap<(String, i64), (f64, f64)> = BTreeMap::new();
    let mut invalid: BTreeMap<(String, i64), (Tracker, &'static str)> = BTreeMap::new();
    for (tracker, buffers) in &plans {
        for fix in buffers.iter().flatten() {
            let key = (fix.device.clone(), fix.at);
            match fix.invalid {
                Some(reason) => assert!(invalid.insert(key, (*tracker, reason)).is_none()),
                None => assert!(valid.insert(key, (fix.lat, fix.lon)).is_none()),
            }
        }
    }
    let total = valid.len() + invalid.len();

    let acknowledged = Arc::new(AtomicUsize::new(0));
    let halt = Halt(Arc::new(AtomicBool::new(false)));
    let simulators: Vec<(Tracker, JoinHandle<TrackerReport>)> = plans
        .into_iter()
        .map(|(tracker, buffers)| {
            let (base, acknowledged, halted) = (base.clone(), acknowledged.clone(), halt.0.clone());
            let thread = std::thread::Builder::new()
                .name(format!("tracker-{}", tracker.name()))
                .spawn(move || simulate(tracker, buffers, base, acknowledged, halted, deadline))
                .unwrap();
            (tracker, thread)
        })
        .collect();

    // The moments are chosen by progress, not by the clock, so that they fall mid-stream on any machine.
    let reached = |share: f64| {
        let target = (total as f64 * share) as usize;
        wait_until(
            &format!("the trackers have {target} fixes acknowledged"),
            deadline,
            Duration::from_millis(1),
            || acknowledged.load(Ordering::Relaxed) >= target,
        );
    };
    let mut absorbed = 0;
    reached(0.30);
    absorbed += duplicates_absorbed(&base);
    gateway.kill();
    gateway = GatewayProcess::start(&envs);
    reached(0.45);
    // Down while the trackers keep sending: the log takes what they send, and its backlog is written later.
    cluster.stop();
    reached(0.55);
    cluster.restart().expect("start PostgreSQL again");
    reached(0.65);
    absorbed += duplicates_absorbed(&base);
    gateway.kill();
    gateway = GatewayProcess::start(&envs);

    let reports: Vec<(Tracker, TrackerReport)> = simulators
        .into_iter()
        .map(|(tracker, thread)| (tracker, thread.join().expect("a simulated tracker panicked")))
        .collect();
    let db = Db::connect(cluster.config(&name));
    wait_until(
        "the location table holds every valid fix and dead_letters every invalid one",
        deadline,
        Duration::from_millis(50),
        || db.count("location_updates") >= valid.len() as i64 && db.count("dead_letters") >= invalid.len() as i64,
    );
    absorbed += duplicates_absorbed(&base);
    assert!(gateway.terminate().success(), "the last run stops cleanly");
    drop(halt);

    // What each tracker did, for the report and for the release notes.
    let sum = |f: fn(&TrackerReport) -> usize| reports.iter().map(|(_, r)| f(r)).sum::<usize>();
    for (tracker, r) in &reports {
        eprintln!(
            "  {:<9} {} fixes, {} requests, {} retries, {} cut by kills, {} refused connections, other answers {:?}, \
             {} left",
            tracker.name(),
            r.fixes,
            r.requests,
            r.retries,
            r.cut,
            r.not_connected,
            r.failures,
            r.left
        );
    }

    // Every valid fix exactly once, with the coordinates its tracker sent, and nothing else.
    let mut stored: BTreeMap<(String, i64), Vec<(f64, f64)>> = BTreeMap::new();
    for row in db.query("SELECT device_id, recorded_at, lat, lon FROM location_updates") {
        let at: OffsetDateTime = row.get(1);
        assert_eq!(at.nanosecond(), 0, "whole seconds were sent");
        stored
            .entry((row.get(0), at.unix_timestamp()))
            .or_default()
            .push((row.get(2), row.get(3)));
    }
    let missing: Vec<_> = valid.keys().filter(|k| !stored.contains_key(*k)).collect();
    let unexpected: Vec<_> = stored.keys().filter(|k| !valid.contains_key(*k)).collect();
    let doubled: Vec<_> = stored.iter().filter(|(_, rows)| rows.len() > 1).collect();
    let moved: Vec<_> = stored
        .iter()
        .filter_map(|(k, rows)| {
            let sent = valid.get(k)?;
            rows.iter().any(|r| r != sent).then_some((k, sent, rows))
        })
        .collect();

    // Every invalid fix in dead_letters with its protocol and reason; a copy more only for a request a kill cut.
    let mut letters: BTreeMap<(String, i64), usize> = BTreeMap::new();
    let mut wrong_letters = Vec::new();
    for row in db.query("SELECT stream, protocol, reason, device_id, payload::text FROM dead_letters") {
        let (stream, protocol, reason, device): (String, Option<String>, Option<String>, Option<String>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let payload: Value = serde_json::from_str(&row.get::<_, String>(4)).unwrap();
        let tracker = protocol.as_deref().and_then(Tracker::from_name);
        let at = tracker.and_then(|t| t.letter_time(&payload));
        let key = device.clone().zip(at);
        match key.as_ref().and_then(|k| invalid.get(k)) {
            Some((sent_by, why))
                if Some(*sent_by) == tracker && reason.as_deref() == Some(*why) && stream == "location" =>
            {
                *letters.entry(key.unwrap()).or_default() += 1;
            }
            _ => wrong_letters.push((stream, protocol, reason, device, payload.to_string())),
        }
    }
    let mut letters_cut: BTreeMap<(String, i64), usize> = BTreeMap::new();
    for (_, r) in &reports {
        letters_cut.extend(r.letters_cut.iter().map(|(k, n)| (k.clone(), *n)));
    }
    let lost_letters: Vec<_> = invalid.keys().filter(|k| !letters.contains_key(*k)).collect();
    let letter_copies: Vec<_> = letters.iter().filter(|(_, n)| **n > 1).collect();
    let unexplained_copies: Vec<_> = letters
        .iter()
        .filter(|(k, n)| **n > 1 + letters_cut.get(*k).copied().unwrap_or(0))
        .map(|(k, n)| (k, n, letters_cut.get(k).copied().unwrap_or(0)))
        .collect();
    let extra_letters: usize = letters.values().map(|n| n - 1).sum();

    eprintln!(
        "tracker crash test (seed {seed}): {total} fixes sent ({} valid, {} invalid) by {} devices in {} requests \
         ({} retries, {} cut by 2 kills, {} refused connections while down); {} rows stored; {} dead letters \
         ({} extra copies from resends of cut requests: {:?}); duplicates absorbed: {absorbed} by the gateway, \
         {} fixes resent after a cut answer; {:.1} s",
        valid.len(),
        invalid.len(),
        Tracker::ALL.len() * DEVICES_PER_TRACKER,
        sum(|r| r.requests),
        sum(|r| r.retries),
        sum(|r| r.cut),
        sum(|r| r.not_connected),
        stored.values().map(Vec::len).sum::<usize>(),
        letters.values().sum::<usize>() + wrong_letters.len(),
        extra_letters,
        letter_copies,
        sum(|r| r.resent_after_cut),
        started.elapsed().as_secs_f64()
    );

    for (tracker, r) in &reports {
        assert_eq!(
            r.left,
            0,
            "the {} tracker was held up: {} fixes never acknowledged",
            tracker.name(),
            r.left
        );
        let client_errors: Vec<_> = r.failures.keys().filter(|s| (400..500).contains(*s)).collect();
        assert!(
            client_errors.is_empty(),
            "the {} tracker was refused with {client_errors:?}: its real client would resend that forever",
            tracker.name()
        );
    }
    assert!(missing.is_empty(), "acknowledged fixes missing: {}", first(&missing));
    assert!(
        unexpected.is_empty(),
        "rows no tracker sent as valid: {}",
        first(&unexpected)
    );
    assert!(doubled.is_empty(), "fixes stored more than once: {}", first(&doubled));
    assert!(
        moved.is_empty(),
        "fixes stored with other coordinates than sent ((key), sent, stored): {}",
        first(&moved)
    );
    assert!(
        lost_letters.is_empty(),
        "invalid fixes with no dead letter: {}",
        first(&lost_letters)
    );
    assert!(
        wrong_letters.is_empty(),
        "dead letters for no invalid fix, or with the wrong protocol, reason or stream: {}",
        first(&wrong_letters)
    );
    assert!(
        unexplained_copies.is_empty(),
        "dead letters kept more often than their fix was sent again after a cut answer ((key), copies, cut): {}",
        first(&unexplained_copies)
    );
}
