//! GT06 units over TCP, against a real gateway and PostgreSQL: Traccar's vectors, sent after a login as a unit sends
//! them, land as rows (or dead letters) and are answered with the replies the unit waits for once durable; damaged,
//! cut, oversized or headless bytes and packets before a login are never stored nor answered and are counted; an
//! IMEI no key names is refused at its login; and simulated units that resend what was not answered and reconnect
//! lose and duplicate nothing while the gateway is killed twice.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest_gateway::model::tracker::gt06::{self, crc_x25, reply, Login, Message, Session};
use ingest_gateway::model::tracker::{check, Checked, Protocol, TrackerFix};
use ingest_gateway::model::ValidationRules;
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::helpers::{
    crash_seed, eventually, free_port, gateway_envs, spawn_app, Db, GatewayProcess, Lcg, OwnDatabase, TestApp,
};
use crate::tcp_units::{self, metric};

/// Traccar's first login vector (traccar/traccar `Gt06ProtocolDecoderTest.java`): IMEI 864717003283581, serial 9.
const LOGIN: &str = "78780D01086471700328358100093F040D0A";
const IMEI: &str = "864717003283581";

/// Traccar's location, alarm and status vectors of the packets the gateway reads, each with what becomes of it
/// (`None`: a row; `Some(reason)`: a dead letter).
const VECTORS: [(&str, &str, Option<&str>); 10] = [
    (
        "0x12 GPS and cell (Traccar's exact one: 54.94535, 24.01762)",
        "78781f120f0a140e150bc505e51e780293a9e800540000f601006e0055da00035f240d0a",
        None,
    ),
    (
        "0x22 GPS, cell, ignition, upload reason, re-upload",
        "787822220e0914160f07c9021a362805090a7800d8b802d402c30e00a98a0105010213f4bb0d0a",
        None,
    ),
    (
        "0x10 GPS only",
        "787819100e010903230ec803ae32a60653cded00180000020072feb70d0a",
        None,
    ),
    (
        "0x16 alarm: SOS, battery, signal",
        "787826161709130f3a2dcc02c55f2a089f9af9005c210901360481fe066d9b03413e420102035f92fe0d0a",
        None,
    ),
    (
        "0x16 status, standard layout: cell, terminal information, battery, signal",
        "787825160b051b093523cf027ac8360c4657b30014000901cc00266a001e1740050400020008d7b10d0a",
        None,
    ),
    (
        "0x37 GPS, cell and an odometer module",
        "7878353714080d05000ac500a886eb0b7522f000100001fe0a05ea004f1b000001002e0400002328003b0217c0003c0401020001002c468a0d0a",
        None,
    ),
    (
        "0xA0 GPS and a 4G cell",
        "78782aa015041007350eca027ac8a20c4658be00140081cc00000000287d0000000002ea5e010004000009dffc0d0a",
        None,
    ),
    (
        "0x16 tampering alarm without a fix (no satellites, not positioned)",
        "78782516160908063736c0006e70110442fc800000000800000000000000000300002512000473fb0d0a",
        Some("flagged_invalid"),
    ),
    (
        "0x22 not positioned",
        "787822221106160a1016c60278019407c7783800040001940504700046fc01030100065f570d0a",
        Some("flagged_invalid"),
    ),
    (
        "0x34 X1 GPS, a layout not read: kept whole, unanswered as Traccar leaves it",
        "78783c34000000001106190336070903107d51084889b900152e0000000043b101940b00b10000480100000000050001a3422100000001000300011bdc7b5f0d0a",
        Some("bad_field"),
    ),
];

/// Traccar's heartbeat vector: answered, nothing stored.
const HEARTBEAT: &str = "78780a130604ea04000006bc8a0d0a";

/// How long a test waits for an answer the gateway owes; far longer than it takes.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// How long a test waits to be sure no answer comes.
const SILENCE: Duration = Duration::from_millis(700);
/// A reply: `78 78 05 <protocol> <serial> <crc> 0D 0A`.
const REPLY_BYTES: usize = 10;

fn bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Writes a frame's CRC again after its content changed.
fn seal(frame: &mut [u8]) {
    let end = frame.len() - 4;
    let crc = crc_x25(&frame[2..end]);
    frame[end..end + 2].copy_from_slice(&crc.to_be_bytes());
}

/// The date-time of a short frame's GPS block (right after the protocol number; after 4 more bytes for the X1's
/// 0x34) set to `at`, and its CRC made again: Traccar's vectors are years old, and the gateway keeps 30 days.
fn restamp(frame: &[u8], at: OffsetDateTime) -> Vec<u8> {
    let mut out = frame.to_vec();
    let from = if out[3] == 0x34 { 8 } else { 4 };
    out[from..from + 6].copy_from_slice(&[
        (at.year() - 2000) as u8,
        at.month() as u8,
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
    ]);
    seal(&mut out);
    out
}

/// The protocol number and serial of a short frame: what its reply repeats.
fn expected_reply(frame: &[u8]) -> Vec<u8> {
    let n = frame.len();
    reply(frame[3], u16::from_be_bytes([frame[n - 6], frame[n - 5]]), &[])
}

/// The fix the model reads from `frame` for `imei`: what the gateway must have stored or kept.
fn read_fix(frame: &[u8], imei: &str) -> Option<TrackerFix> {
    let gt06::Framing::Frame { frame, .. } = gt06::frame(frame) else {
        panic!("not a frame")
    };
    let mut session = Session::default();
    session.log_in(Login {
        imei: imei.into(),
        utc_offset: None,
    });
    match session.read(&frame, OffsetDateTime::now_utc()).unwrap().message {
        Message::Fix(fix) => Some(*fix),
        _ => None,
    }
}

fn hex_of(bytes: &[u8]) -> String {
    gt06::hex(bytes)
}

/// One unit's connection, as a test drives it.
struct Unit {
    stream: TcpStream,
}

impl Unit {
    fn connect(port: u16) -> Unit {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the GT06 listener");
        Unit { stream }
    }

    fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// The reply that came within `wait`; `None` when nothing came (or the connection closed).
    fn reply(&mut self, wait: Duration) -> Option<Vec<u8>> {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut answer = [0u8; REPLY_BYTES];
        self.stream.read_exact(&mut answer).ok().map(|()| answer.to_vec())
    }

    /// Logs in with Traccar's login vector; its reply.
    fn login(&mut self) -> Option<Vec<u8>> {
        self.send(&bytes(LOGIN));
        self.reply(ANSWER_WAIT)
    }

    /// Whether the gateway closed the connection within `wait`, having sent nothing more.
    fn closed_within(&mut self, wait: Duration) -> bool {
        tcp_units::closed_within(&mut self.stream, wait)
    }
}

fn series(name: &str, reason: &str) -> String {
    tcp_units::series(name, "gt06", reason)
}

fn gt06_app(tune: impl FnOnce(&mut ingest_gateway::config::Settings)) -> (TestApp, u16) {
    let port = free_port();
    let app = spawn_app(|s| {
        s.trackers.gt06_listen = Some(format!("127.0.0.1:{port}"));
        s.pipeline.writers = 1;
        tune(s);
    });
    (app, port)
}

#[test]
fn traccars_vectors_sent_after_a_login_land_as_rows_and_are_answered_once_durable() {
    let (app, port) = gt06_app(|_| {});
    let now = OffsetDateTime::now_utc();
    let rules = ValidationRules::with_defaults(now);
    let mut unit = Unit::connect(port);
    let login = bytes(LOGIN);
    let answer = unit.login();
    assert_eq!(
        answer,
        Some(bytes("78780501000955940d0a")),
        "the login is answered with its serial"
    );
    eprintln!(
        "gt06 login: the unit sends {}; the gateway answers {}",
        hex_of(&login),
        hex_of(&answer.unwrap())
    );

    let (mut rows, mut letters) = (Vec::new(), Vec::new());
    for (i, (what, hex, becomes)) in VECTORS.iter().enumerate() {
        let frame = restamp(
            &bytes(hex),
            now - time::Duration::hours(1) + time::Duration::seconds(i as i64),
        );
        unit.send(&frame);
        let expected = expected_reply(&frame);
        if frame[3] == 0x34 {
            assert_eq!(unit.reply(SILENCE), None, "{what}: Traccar does not answer it");
        } else {
            let answer = unit.reply(ANSWER_WAIT);
            assert_eq!(
                answer.as_ref(),
                Some(&expected),
                "{what}: answered with its protocol and serial"
            );
            if i == 0 {
                eprintln!(
                    "gt06 location ({what}): the unit sends {}; the gateway answers {}",
                    hex_of(&frame),
                    hex_of(&expected)
                );
            }
        }
        let fix = read_fix(&frame, IMEI).expect("a fix");
        match (check(fix, Protocol::Gt06, &rules), becomes) {
            (Checked::Stored { update, .. }, None) => rows.push(update),
            (Checked::Rejected { letter, .. }, Some(reason)) => {
                assert_eq!(letter.reason, *reason, "{what}");
                letters.push(letter);
            }
            (other, _) => panic!("{what}: {other:?}"),
        }
    }
    unit.send(&bytes(HEARTBEAT));
    assert_eq!(
        unit.reply(ANSWER_WAIT),
        Some(bytes("7878051300069d4e0d0a")),
        "the heartbeat is answered"
    );

    eventually("every fix is in its table", ANSWER_WAIT, || {
        app.db.count("location_updates") == rows.len() as i64 && app.db.count("dead_letters") == letters.len() as i64
    });
    assert_eq!((rows.len(), letters.len()), (7, 3));
    let stored = app.db.query(
        "SELECT device_id, recorded_at, lat, lon, speed_kmh, heading_deg, accuracy_m, attributes::text \
         FROM location_updates ORDER BY recorded_at",
    );
    for (row, sent) in stored.iter().zip(&rows) {
        let at: OffsetDateTime = row.get(1);
        assert_eq!(
            (row.get::<_, String>(0), at),
            (sent.device_id.clone(), sent.recorded_at)
        );
        assert_eq!((row.get::<_, f64>(2), row.get::<_, f64>(3)), (sent.lat, sent.lon));
        assert_eq!(row.get::<_, Option<f64>>(4), sent.speed_kmh);
        assert_eq!(row.get::<_, Option<f64>>(5), sent.heading_deg);
        assert_eq!(row.get::<_, Option<f64>>(6), None);
        let attributes: Value = serde_json::from_str(&row.get::<_, String>(7)).unwrap();
        let expected: Value = serde_json::from_str(sent.attributes.as_deref().unwrap()).unwrap();
        assert_eq!(attributes, expected, "at {}", sent.recorded_at);
    }
    // The values themselves, as Traccar's test has them.
    let first = &stored[0];
    assert!((first.get::<_, f64>(2) - 54.94535).abs() < 1e-5 && (first.get::<_, f64>(3) - 24.01762).abs() < 1e-5);
    let sos: Value = serde_json::from_str(&stored[3].get::<_, String>(7)).unwrap();
    assert_eq!(
        (&sos["alarm"], &sos["sat"], &sos["type"]),
        (&json!("sos"), &json!(12), &json!(0x16))
    );
    let kept = app
        .db
        .query("SELECT protocol, reason, device_id, payload::text FROM dead_letters ORDER BY reason, payload::text");
    for (row, letter) in kept.iter().zip({
        let mut letters = letters.clone();
        letters.sort_by(|a, b| (&a.reason, &a.payload).cmp(&(&b.reason, &b.payload)));
        letters
    }) {
        assert_eq!(
            (
                row.get::<_, String>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2)
            ),
            ("gt06".to_owned(), letter.reason.clone(), IMEI.to_owned())
        );
        let payload: Value = serde_json::from_str(&row.get::<_, String>(3)).unwrap();
        let expected: Value = serde_json::from_str(&letter.payload).unwrap();
        assert_eq!(payload, expected, "the frame is kept whole");
    }
    let m = |s: &str| metric(&app, s);
    assert_eq!(
        m(r#"ingest_tracker_fixes_total{outcome="stored",protocol="gt06"}"#),
        7.0
    );
    assert_eq!(
        m(r#"ingest_tracker_dead_lettered_total{protocol="gt06",reason="flagged_invalid"}"#),
        2.0
    );
    let stats = app.get("/stats").json();
    assert_eq!(stats["trackers"]["gt06"]["stored"], 7);
    assert!(stats["trackers"]["gt06"]["tcp"]["bad_packets"]["bad_crc"].is_u64());
}

#[test]
fn damaged_cut_oversized_and_headless_bytes_and_packets_before_a_login_are_never_stored_nor_answered_and_are_counted() {
    let (app, port) = gt06_app(|s| s.trackers.tcp_read_timeout = Duration::from_secs(1));
    let good = restamp(
        &bytes(VECTORS[0].1),
        OffsetDateTime::now_utc() - time::Duration::hours(1),
    );
    let counted = |reason: &str| metric(&app, &series("ingest_tcp_bad_packets_total", reason));

    // A bad CRC is not answered (the unit sends the packet again) and the connection stays; the third closes it.
    let mut damaged = good.clone();
    damaged[12] ^= 0x01;
    let mut unit = Unit::connect(port);
    assert!(unit.login().is_some());
    unit.send(&damaged);
    assert_eq!(unit.reply(SILENCE), None, "a bad CRC is not answered");
    assert!(
        !unit.closed_within(SILENCE),
        "one bad packet leaves the connection open"
    );
    unit.send(&damaged);
    unit.send(&damaged);
    assert!(
        unit.closed_within(ANSWER_WAIT),
        "the third bad packet closes the connection"
    );
    assert_eq!(counted("bad_crc"), 3.0);

    // A packet cut short is waited for as long as the read timeout, then the connection is closed.
    let mut unit = Unit::connect(port);
    assert!(unit.login().is_some());
    unit.send(&good[..good.len() / 2]);
    assert!(
        unit.closed_within(ANSWER_WAIT),
        "a truncated packet closes the connection, unanswered"
    );
    assert_eq!(counted("read_timeout"), 1.0);

    // A length beyond the cap closes the connection at once, without waiting for what it announces.
    let mut unit = Unit::connect(port);
    assert!(unit.login().is_some());
    let started = Instant::now();
    unit.send(&[0x79, 0x79, 0xff, 0xff, 0x22]);
    assert!(
        unit.closed_within(ANSWER_WAIT),
        "an oversized length closes the connection"
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "before the read timeout"
    );
    assert_eq!(counted("oversized"), 1.0);

    // Bytes that start no frame: the stream cannot be followed.
    let mut unit = Unit::connect(port);
    unit.send(b"GET / HTTP/1.1\r\n\r\n");
    assert!(
        unit.closed_within(ANSWER_WAIT),
        "bytes that are no frame close the connection"
    );
    assert_eq!(counted("malformed"), 1.0);

    // A location before the login names no device: not answered, counted; the third such packet closes.
    let mut unit = Unit::connect(port);
    unit.send(&good);
    assert_eq!(unit.reply(SILENCE), None, "a location before the login is not answered");
    unit.send(&good);
    unit.send(&good);
    assert!(unit.closed_within(ANSWER_WAIT));
    assert_eq!(counted("malformed"), 4.0);

    app.wait_until_all_written();
    assert_eq!(
        (app.db.count("location_updates"), app.db.count("dead_letters")),
        (0, 0),
        "nothing of it is stored"
    );
    eventually("every connection is closed", ANSWER_WAIT, || {
        metric(&app, r#"ingest_tcp_connections{protocol="gt06"}"#) == 0.0
    });
}

#[test]
fn a_unit_whose_imei_no_key_names_is_refused_at_its_login_never_stored_and_counted() {
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        keys.path(),
        format!(
            "trucks {} streams=location imeis={IMEI}\n",
            ingest_gateway::keys_file::hashed("igk_0123")
        ),
    )
    .unwrap();
    let (app, port) = gt06_app(|s| s.auth.api_keys_file = Some(keys.path().to_owned()));
    let fix = restamp(
        &bytes(VECTORS[0].1),
        OffsetDateTime::now_utc() - time::Duration::hours(1),
    );
    let mut known = Unit::connect(port);
    assert_eq!(known.login(), Some(bytes("78780501000955940d0a")));
    known.send(&fix);
    assert_eq!(known.reply(ANSWER_WAIT), Some(expected_reply(&fix)));

    // Traccar's other login vector: IMEI 123456789012345.
    let mut stranger = Unit::connect(port);
    stranger.send(&bytes("78780D01012345678901234500018CDD0D0A"));
    assert_eq!(stranger.reply(SILENCE), None, "an IMEI no key names is not answered");
    stranger.send(&fix);
    assert!(
        stranger.closed_within(ANSWER_WAIT),
        "and disconnected, its packet unanswered"
    );

    let refused = metric(&app, &series("ingest_tcp_handshakes_refused_total", "unknown_device"));
    assert_eq!(refused, 1.0);
    app.wait_until_all_written();
    assert_eq!(app.db.device_ids(), vec![(IMEI.to_owned(), 1)]);
    assert_eq!(app.db.count("dead_letters"), 0);
}

/// Simulated units and their fixes.
const UNITS: usize = 10;
const FIXES_PER_UNIT: usize = 500;
/// One fix in this many has no satellites: a dead letter.
const INVALID_EVERY: usize = 50;
/// Seconds between two fixes of one unit.
const FIX_SPACING_S: i64 = 10;
/// How often a unit records a fix on the test's clock: its seconds scaled down, so that the units send all through
/// the kills, each buffering what it records while the gateway does not answer.
const RECORD_EVERY: Duration = Duration::from_millis(12);
/// Packets a unit sends before it reads their replies: what a unit flushes from its buffer after a reconnect.
const WINDOW: usize = 10;
/// How long a unit waits for a reply before it takes the connection for dead.
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Beyond this the test fails rather than waits.
const TIME_LIMIT: Duration = Duration::from_secs(300);

/// One fix as a unit records it.
#[derive(Debug, Clone)]
struct Fix {
    /// Unix seconds: GT06 times are whole seconds.
    at: i64,
    /// When, after the simulation starts, the unit records it.
    recorded: Duration,
    /// In 1/1,800,000 degree, as GT06 sends them (north and east).
    lat: u32,
    lon: u32,
    satellites: u8,
    speed: u8,
    course: u16,
}

impl Fix {
    /// The location packet of this fix: 0x22 (GPS, cell, ignition, upload reason, re-upload) or, one in three,
    /// 0x12 (GPS and cell).
    fn packet(&self, serial: u16, reupload: bool) -> Vec<u8> {
        let at = OffsetDateTime::from_unix_timestamp(self.at).unwrap();
        let protocol = if self.at % 3 == 0 { 0x12 } else { 0x22 };
        let mut content = vec![
            (at.year() - 2000) as u8,
            at.month() as u8,
            at.day(),
            at.hour(),
            at.minute(),
            at.second(),
            0xC0 | self.satellites,
        ];
        content.extend_from_slice(&self.lat.to_be_bytes());
        content.extend_from_slice(&self.lon.to_be_bytes());
        content.push(self.speed);
        // Positioned, north; east.
        let flags = self.course | 1 << 12 | 1 << 10;
        content.extend_from_slice(&flags.to_be_bytes());
        content.extend_from_slice(&[0x01, 0xCC, 0x00, 0x28, 0x7D, 0x00, 0x1F, 0x71]); // MCC 460, MNC 0, LAC, cell
        if protocol == 0x22 {
            content.extend_from_slice(&[1, 0, u8::from(reupload)]);
        }
        let mut frame = vec![0x78, 0x78, (content.len() + 5) as u8, protocol];
        frame.extend_from_slice(&content);
        frame.extend_from_slice(&serial.to_be_bytes());
        frame.extend_from_slice(&[0, 0, 0x0D, 0x0A]);
        seal(&mut frame);
        frame
    }
}

fn plan(unit: usize, rng: &mut Lcg, first_at: i64) -> VecDeque<Fix> {
    (0..FIXES_PER_UNIT)
        .map(|i| Fix {
            at: first_at + i as i64 * FIX_SPACING_S,
            recorded: RECORD_EVERY * i as u32,
            lat: 86_000_000 + rng.next_ms(4_000_000) as u32,
            lon: 20_000_000 + rng.next_ms(4_000_000) as u32,
            satellites: if (i + unit).is_multiple_of(INVALID_EVERY) {
                0
            } else {
                4 + rng.next_ms(12) as u8
            },
            speed: rng.next_ms(130) as u8,
            course: rng.next_ms(360) as u16,
        })
        .collect()
}

fn imei_of(unit: usize) -> String {
    format!("3535880{unit:08}")
}

/// The login packet of a 15-digit IMEI: a padding nibble, then its digits in BCD.
fn login_packet(imei: &str, serial: u16) -> Vec<u8> {
    let digits = format!("0{imei}");
    let mut frame = vec![0x78, 0x78, 0x0D, 0x01];
    frame.extend(bytes(&digits));
    frame.extend_from_slice(&serial.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0x0D, 0x0A]);
    seal(&mut frame);
    frame
}

#[derive(Debug, Default)]
struct UnitReport {
    fixes: usize,
    packets: usize,
    resends: usize,
    connections: usize,
    refused_connections: usize,
    /// For each fix without satellites, how many of its packets went unanswered: how many extra copies of its dead
    /// letter a resend may leave.
    letters_cut: BTreeMap<(String, i64), usize>,
    left: usize,
}

/// Connects and logs in; the connection once the gateway answered the login.
fn connect(port: u16, imei: &str, serial: &mut u16) -> std::io::Result<TcpStream> {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    *serial = serial.wrapping_add(1);
    let login = login_packet(imei, *serial);
    stream.write_all(&login)?;
    let mut answer = [0u8; REPLY_BYTES];
    stream.read_exact(&mut answer)?;
    assert_eq!(
        answer.to_vec(),
        expected_reply(&login),
        "unit {imei}: the login's reply"
    );
    Ok(stream)
}

/// Runs one unit until its buffer is empty: it sends up to [`WINDOW`] of the fixes it holds, each a packet with a
/// serial of its own, and drops a fix only once the reply with that packet's serial came; a reply that does not
/// come within [`REPLY_TIMEOUT`] (or a closed connection) makes it reconnect after a doubling, capped backoff and
/// send what was not answered again, flagged as re-uploaded.
fn simulate(
    unit: usize,
    mut buffer: VecDeque<Fix>,
    port: u16,
    answered: Arc<AtomicUsize>,
    halted: Arc<AtomicBool>,
    deadline: Instant,
) -> UnitReport {
    let imei = imei_of(unit);
    let mut report = UnitReport {
        fixes: buffer.len(),
        ..UnitReport::default()
    };
    let start = Instant::now();
    let mut connection: Option<TcpStream> = None;
    let mut backoff = FIRST_BACKOFF;
    let mut serial: u16 = 0;
    let mut resending = false;
    while let Some(head) = buffer.front() {
        if halted.load(Ordering::Relaxed) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep((start + head.recorded).saturating_duration_since(Instant::now()));
        let stream = match connection.as_mut() {
            Some(stream) => stream,
            None => match connect(port, &imei, &mut serial) {
                Ok(stream) => {
                    report.connections += 1;
                    connection.insert(stream)
                }
                Err(_) => {
                    report.refused_connections += 1;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        let now = Instant::now();
        let held = buffer.iter().take_while(|f| start + f.recorded <= now).count();
        let n = held.clamp(1, WINDOW);
        let mut sent = Vec::with_capacity(n);
        let mut burst = Vec::new();
        for fix in buffer.iter().take(n) {
            serial = serial.wrapping_add(1);
            let packet = fix.packet(serial, resending);
            sent.push(expected_reply(&packet));
            burst.extend_from_slice(&packet);
        }
        report.packets += n;
        report.resends += if resending { n } else { 0 };
        let mut replied = 0;
        let mut broken = stream.write_all(&burst).is_err();
        while !broken && replied < n {
            let mut answer = [0u8; REPLY_BYTES];
            match stream.read_exact(&mut answer) {
                Ok(()) => {
                    assert_eq!(answer.to_vec(), sent[replied], "unit {imei}: replies come in order");
                    replied += 1;
                }
                Err(_) => broken = true,
            }
        }
        buffer.drain(..replied);
        answered.fetch_add(replied, Ordering::Relaxed);
        if broken {
            for fix in buffer.iter().take(n - replied).filter(|f| f.satellites == 0) {
                *report.letters_cut.entry((imei.clone(), fix.at)).or_default() += 1;
            }
            connection = None;
            resending = true;
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        } else {
            backoff = FIRST_BACKOFF;
            resending = false;
        }
    }
    report.left = buffer.len();
    report
}

/// Stops the simulated units when the test ends, however it ends.
struct Halt(Arc<AtomicBool>);

impl Drop for Halt {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn simulated_units_lose_and_duplicate_no_fix_through_two_kills_of_the_gateway() {
    let started = Instant::now();
    let deadline = started + TIME_LIMIT;
    let seed = crash_seed();
    let mut rng = Lcg(seed);
    let OwnDatabase {
        cluster,
        name,
        data_dir,
    } = OwnDatabase::start();
    let port = free_port();
    let mut envs = gateway_envs(&cluster, &name, &data_dir);
    // The same port after each restart, as a unit's configured server is.
    envs.push(("INGEST_GT06_LISTEN", format!("127.0.0.1:{port}")));
    envs.push(("INGEST_FLUSH_INTERVAL", "50ms".to_owned()));
    let mut gateway = GatewayProcess::start(&envs);

    let first_at = OffsetDateTime::now_utc().unix_timestamp() - 3 * 3600;
    let plans: Vec<VecDeque<Fix>> = (0..UNITS).map(|u| plan(u, &mut rng, first_at)).collect();
    let mut valid: BTreeMap<(String, i64), (u32, u32)> = BTreeMap::new();
    let mut invalid: BTreeMap<(String, i64), ()> = BTreeMap::new();
    for (unit, fixes) in plans.iter().enumerate() {
        for f in fixes {
            let key = (imei_of(unit), f.at);
            if f.satellites == 0 {
                invalid.insert(key, ());
            } else {
                valid.insert(key, (f.lat, f.lon));
            }
        }
    }
    let total = valid.len() + invalid.len();
    assert_eq!(total, UNITS * FIXES_PER_UNIT);

    let answered = Arc::new(AtomicUsize::new(0));
    let halt = Halt(Arc::new(AtomicBool::new(false)));
    let units: Vec<_> = plans
        .into_iter()
        .enumerate()
        .map(|(unit, fixes)| {
            let (answered, halted) = (answered.clone(), halt.0.clone());
            std::thread::Builder::new()
                .name(format!("gt06-unit-{unit}"))
                .spawn(move || simulate(unit, fixes, port, answered, halted, deadline))
                .unwrap()
        })
        .collect();

    // The kills fall at moments chosen by answered progress, so that they land mid-stream on any machine.
    let reached = |share: f64| {
        let target = (total as f64 * share) as usize;
        while answered.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "gave up waiting for {target} answered fixes");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    reached(0.30);
    gateway.kill();
    let first_kill = answered.load(Ordering::Relaxed);
    gateway = GatewayProcess::start(&envs);
    reached(0.65);
    gateway.kill();
    let second_kill = answered.load(Ordering::Relaxed);
    gateway = GatewayProcess::start(&envs);

    let reports: Vec<UnitReport> = units
        .into_iter()
        .map(|u| u.join().expect("a simulated unit panicked"))
        .collect();
    let db = Db::connect(cluster.config(&name));
    let wait_until = Instant::now() + Duration::from_secs(60);
    while db.count("location_updates") < valid.len() as i64 || db.count("dead_letters") < invalid.len() as i64 {
        assert!(
            Instant::now() < wait_until,
            "the tables never held every fix: {} rows of {}, {} dead letters of {}; units: {reports:?}",
            db.count("location_updates"),
            valid.len(),
            db.count("dead_letters"),
            invalid.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let duplicates = ureq::get(&format!("{}/stats", gateway.address))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .and_then(|body| serde_json::from_str::<Value>(&body).ok())
        .and_then(|stats| stats["streams"]["location"]["duplicate"].as_u64())
        .unwrap_or(0);
    assert!(gateway.terminate().success(), "the last run stops cleanly");
    drop(halt);

    let sum = |f: fn(&UnitReport) -> usize| reports.iter().map(f).sum::<usize>();
    let mut stored: BTreeMap<(String, i64), Vec<(f64, f64)>> = BTreeMap::new();
    for row in db.query("SELECT device_id, recorded_at, lat, lon FROM location_updates") {
        let at: OffsetDateTime = row.get(1);
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
        .filter(|(k, rows)| {
            valid.get(*k).is_some_and(|(lat, lon)| {
                rows.iter()
                    .any(|r| *r != (f64::from(*lat) / 1_800_000.0, f64::from(*lon) / 1_800_000.0))
            })
        })
        .collect();
    let mut letters: BTreeMap<(String, i64), usize> = BTreeMap::new();
    let mut wrong_letters = Vec::new();
    for row in db.query("SELECT protocol, reason, device_id, payload::text FROM dead_letters") {
        let (protocol, reason, device): (Option<String>, Option<String>, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        let payload: Value = serde_json::from_str(&row.get::<_, String>(3)).unwrap();
        // The dead letter keeps the frame: read it again for the fix's time.
        let at = payload["frame"]
            .as_str()
            .zip(device.as_deref())
            .and_then(|(frame, device)| read_fix(&bytes(frame), device))
            .and_then(|fix| fix.recorded_at)
            .map(|at| at.unix_timestamp());
        let key = device.clone().zip(at);
        match key.as_ref().filter(|k| invalid.contains_key(*k)) {
            Some(_) if protocol.as_deref() == Some("gt06") && reason.as_deref() == Some("flagged_invalid") => {
                *letters.entry(key.unwrap()).or_default() += 1;
            }
            _ => wrong_letters.push((protocol, reason, device, payload.to_string())),
        }
    }
    let mut letters_cut: BTreeMap<(String, i64), usize> = BTreeMap::new();
    for r in &reports {
        letters_cut.extend(r.letters_cut.iter().map(|(k, n)| (k.clone(), *n)));
    }
    let lost_letters: Vec<_> = invalid.keys().filter(|k| !letters.contains_key(*k)).collect();
    let unexplained: Vec<_> = letters
        .iter()
        .filter(|(k, n)| **n > 1 + letters_cut.get(*k).copied().unwrap_or(0))
        .collect();

    eprintln!(
        "gt06 crash test (seed {seed}): {total} fixes ({} valid, {} without satellites) from {UNITS} units in {} \
         packets ({} resent, {} connections, {} refused while down); kills at {first_kill} and {second_kill} \
         answered fixes; {} rows stored, {} missing, {} twice; {} dead letters ({} extra copies from resends of \
         unanswered packets); resends absorbed by the last run: {duplicates}; {:.1} s",
        valid.len(),
        invalid.len(),
        sum(|r| r.packets),
        sum(|r| r.resends),
        sum(|r| r.connections),
        sum(|r| r.refused_connections),
        stored.values().map(Vec::len).sum::<usize>(),
        missing.len(),
        doubled.len(),
        letters.values().sum::<usize>() + wrong_letters.len(),
        letters.values().map(|n| n - 1).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(sum(|r| r.left), 0, "every unit emptied its buffer");
    assert_eq!(sum(|r| r.fixes), total);
    let first = |n: usize| n.min(10);
    assert!(
        missing.is_empty(),
        "answered fixes missing: {:?}",
        &missing[..first(missing.len())]
    );
    assert!(
        unexpected.is_empty(),
        "rows nobody sent: {:?}",
        &unexpected[..first(unexpected.len())]
    );
    assert!(
        doubled.is_empty(),
        "fixes stored twice: {:?}",
        &doubled[..first(doubled.len())]
    );
    assert!(
        moved.is_empty(),
        "fixes stored with other coordinates: {:?}",
        &moved[..first(moved.len())]
    );
    assert!(
        lost_letters.is_empty(),
        "fixes without satellites and no dead letter: {lost_letters:?}"
    );
    assert!(
        wrong_letters.is_empty(),
        "dead letters for no such fix: {wrong_letters:?}"
    );
    assert!(
        unexplained.is_empty(),
        "dead letters kept more often than their packet was sent again: {unexplained:?}"
    );
}
