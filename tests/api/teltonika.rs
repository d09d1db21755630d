//! Teltonika units over TCP, against a real gateway and PostgreSQL: Traccar's vectors, sent as a unit sends them,
//! land as rows with the values they carry and are acknowledged with their record counts; damaged, cut, oversized,
//! dripping or unknown units' bytes are never stored nor acknowledged, close the connection and are counted; and
//! simulated units that buffer, resend and reconnect as real ones do lose and duplicate nothing while the gateway
//! is killed twice.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest_gateway::model::tracker::teltonika::{crc16_ibm, decode_packet, CRC_BYTES, HEADER_BYTES};
use ingest_gateway::model::tracker::{check, Checked, Protocol};
use ingest_gateway::model::ValidationRules;
use serde_json::Value;
use time::OffsetDateTime;

use crate::helpers::{
    crash_seed, eventually, free_port, gateway_envs, spawn_app, Db, GatewayProcess, Lcg, OwnDatabase, TestApp,
};
use crate::tcp_units::{self, metric};

/// Traccar's Teltonika test vectors (traccar/traccar `TeltonikaProtocolDecoderTest.java`): a codec each, records
/// with and without satellites, and the attribute values Traccar's test checks.
const VECTORS: [(&str, usize, &str); 7] = [
    (
        "Codec 8 Extended, 2 records, BLE sensor tags (an FMC in Barcelona)",
        2,
        "000000000000010e8e020000019769de9f9800015299f718b278040018007708000000000013000b00ef0100f00000150500\
         c80000450100010100b30000020000030000b401017c00000500b5001a00b6000c004238d40043000000440000000200f100\
         00539b00100000efc70001004e000000000000000000000000019769de5d3b00015299f718b27804001800770800002c3500\
         01000000000000000000012c3500700124050f4e65766572615f33000000000000000f067cd9f4110c4006020c8f0701340e\
         020c1c24050f4e65766572615f31000000000000000f067cd9f411334606020c380701340e020c2624050f4e65766572615f\
         32000000000000000f067cd9f411464706020c240701360e020c26020000a8b0",
    ),
    (
        "Codec 8 Extended, 1 record without satellites",
        1,
        "00000000000000728e010000018b23dd796300fbf7263c24f9e11a0000000000000002240001000000000000000000010224\
         004501210001e50110cde39f7e42bb55aa788e4a29ed650055020ab70a8f264c6000ffff6b210001b00110f89b907e42bb55\
         aaa3463b29ed650055020ab708bb2600ae0500096c01000051d4",
    ),
    (
        "Codec 16, 4 records",
        4,
        "00000000000003831004000001735ace37f80000e3b9331c71e290006900e211005100fd072e1600010100160300470300f0\
         0100150400b20000c80000ef01009000004f00005101005201005300005538006e00006f00007a03007d00007f5600890000\
         fd0200fe1f09004326b00044000000b5000b00b6000600427029001800540046015d00ce4ec10080000f0f00f10000515400\
         cd007404ab00d80f5022a1005000000054005400000000005600015568005700000060005800000420006800001113006d30\
         3330300071fffd8c85008700000020008800000002008a000155f5008b0000b86000000001735ace3ca80000e3b08a1c71dd\
         29006900e311005100fd072e1600010100160300470300f00100150400b20000c80000ef01009000004f0000510100520100\
         5300005537006e00006f00007a03007d00007f5600890000fd0200fe1d09004326ac0044000000b5000b00b600060042701f\
         001800540046015d00ce4ec10080000f0f00f10000515400cd007404ab00d80f5022ce005000000054005400000000005600\
         01556800570000006000580000041f006800001113006d303330300071fffd8c85008700000020008800000002008a000155\
         f5008b0000b86000000001735ace3fc80000e3a7c01c71d7c2006900e311005100fd072e1600010100160300470300f00100\
         150400b20000c80000ef01009000004f00005101005201005300005537006e00006f00007a03007d00007f5600890000fd02\
         00fe2309004326ac0044000000b5000b00b6000600427015001800540046015e00ce4ec10080000f0f00f10000515400cd00\
         7404ab00d80f5022e700500000005400540000000000560001556800570000006000580000041f006800001113006d303330\
         300071fffd8c85008700000020008800000002008a000155f5008b0000b86000000001735ace3ffa0000e3a7c01c71d7c200\
         6900e311005100fd072e1600010100160300470300f00100150400b20000c80000ef01009000004f00005101005201005300\
         005537006e00006f00007a03007d00007f5600890000fd0300fe2309004326ac0044000000b5000b00b60006004270150018\
         00540046015e00ce4ec10080000f0f00f10000515400cd007404ab00d80f5022e70050000000540054000000000056000155\
         6800570000006000580000041f006800001113006d303330300071fffd8c85008700000020008800000002008a000155f500\
         8b0000b86000040000eb85",
    ),
    (
        "Codec 8, 1 record at 83 km/h (Vienna)",
        1,
        "000000000000004c08010000016818d500580009c28d9f1cb3757a00be00c60f0053000f06f0011503c80001011d00fc0007\
         423799180053cdf80dce426f430f88190bb8560bb802f100005aa110002887e000010000ee8d",
    ),
    (
        "Codec 8 Extended with a VIN",
        1,
        "00000000000000818e0100000166e368a510000f0d8b5b20961c35008d010308000000000014000900ef0000f00100500100\
         150400c800004501001e00002500002900000a00b5000800b60007004230dc0018000000430fcb0044005f001103de001200\
         e50013001200240000000000000001010000113141314a433534343452373235323336370100005e99",
    ),
    (
        "Codec 8, 14 records",
        14,
        "0000000000000401080e0000015d12cc211000fadaf627186742f5000d0048080006000a040100f001500515000342318a43\
         0fe344000003c700000000f1000068b61000001b05000000015d12c6683800fadaf72118673f820000000000000000070301\
         00f00050040342318a430fe344000001f1000068b6000000015d12bd407800fadaf72118673f820000000000000000070301\
         00f000500403423179430fe144000001f1000068b6000000015d12b414d000fadaf72118673f82000400900c0000fa120a01\
         00f00050051502080007010552090e6f4bfa000542316a430fe14400000600006202b203c700002328f1000068b61000001b\
         05000000015d12b3074800fadaf2821867436a000400890d00170011090100f00150011502081007010553090e6f4d054231\
         fb430fe14400000603ae6202a003c700002328f1000068b61000001b05000000015d12b2ff7800fadaee89186747c6000500\
         9a0d001d0011090100f00150011502081b07010553090e6f4d05423125430fe144000006050862029e03c700002328f10000\
         68b61000001b05000000015d12b2e42000fadae8cf18675e0a000300a60d00210011090101f0015001150208240703055409\
         0e6f4d0542310a430fe14400000606cf62029703c700002328f1000068b61000001b05000000015d12b2d48000fadae05818\
         676a16000400930c00240011090100f00150011502082207010554090e6f4e05423738430fe144000006066a62029303c700\
         002328f1000068b61000001b05000000015d12b2a1b800fadac33e18678e48000600940d00150011090101f0015005150008\
         1907030553090e6f4e054239cc430fe14400000607c662028603c700002328f1000000001000001b05000000015d12b29dd0\
         00fadac19d18678fc8000700820d00110011090100f00150051500081607030553090e6f4e054238c8430fe14400000606d9\
         62028503c700002328f1000000001000001b05000000015d12b299e800fadabfa9186790e3000700670d00110011090101f0\
         0150051500081407030553090e6f4e054231e5430fe144000006060a62028403c700002328f1000000001000001b05000000\
         015d12b2960000fadabd4018679104000600510d00120011090101f00150051500081207030553090e6f4e054231ce430fe1\
         44000006057062028303c700002328f1000000001000001b05000000015d12b27aa800fadaa96518678b7c000600470d0012\
         0011090101f00150051500081807030551090e6f4e05423a70430fe144000006074462027c03c700002328f1000000001000\
         001b05000000015d12b276c000fadaa73f18678ae60006003b0d000e0011090101f00150051500081607030551090e6f4e05\
         423a5a430fe14400000606b762027b03c700002328f1000000001000001b05000e000007a4",
    ),
    (
        "Codec 8 Extended with an EYE sensor's temperature",
        1,
        "00000000000000628e0100000193011f1ec8003fa9def2fc401ea4000d00000400000000000f000700ef0000f00000150500\
         c8000045012a34492a3800000600b5001300b60011004230aa00430fb7004400002a30fb5d000200f10000c7420010000001\
         4900000000010000fbff",
    ),
];

/// How long a test waits for an answer the gateway owes; far longer than it takes.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// How long a test waits to be sure no answer comes.
const SILENCE: Duration = Duration::from_millis(700);

fn bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The handshake of `imei`: its length in two bytes, then its digits.
fn handshake(imei: &str) -> Vec<u8> {
    let mut bytes = (imei.len() as u16).to_be_bytes().to_vec();
    bytes.extend_from_slice(imei.as_bytes());
    bytes
}

/// Writes a packet's CRC again after its data changed.
fn seal(packet: &mut [u8]) {
    let end = packet.len() - CRC_BYTES;
    let crc = crc16_ibm(&packet[HEADER_BYTES..end]);
    packet[end..].copy_from_slice(&u32::from(crc).to_be_bytes());
}

/// `packet` with its records' times moved so that the newest is `newest` (their spacing kept) and its CRC made
/// again: Traccar's vectors are years old, and the gateway keeps 30 days. Nothing else of the vector changes.
fn restamp(packet: &[u8], newest: OffsetDateTime) -> Vec<u8> {
    let fixes = decode_packet(packet, "0").expect("a vector decodes").fixes;
    let millis: Vec<i64> = fixes
        .iter()
        .map(|f| (f.recorded_at.unwrap().unix_timestamp_nanos() / 1_000_000) as i64)
        .collect();
    let shift = (newest.unix_timestamp_nanos() / 1_000_000) as i64 - millis.iter().max().unwrap();
    let mut out = packet.to_vec();
    // Each record starts with its time: found in order, after the codec and the record count.
    let mut from = HEADER_BYTES + 2;
    for at in millis {
        let sent = (at as u64).to_be_bytes();
        let offset = from
            + out[from..]
                .windows(8)
                .position(|w| w == sent)
                .expect("the record's time");
        out[offset..offset + 8].copy_from_slice(&((at + shift) as u64).to_be_bytes());
        from = offset + 8;
    }
    seal(&mut out);
    out
}

/// One unit's connection, as a test drives it.
struct Unit {
    stream: TcpStream,
}

impl Unit {
    fn connect(port: u16) -> Unit {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the Teltonika listener");
        Unit { stream }
    }

    /// Sends `imei`'s handshake; the gateway's one-byte answer, `None` when it closed without one.
    fn hello(&mut self, imei: &str) -> Option<u8> {
        self.send(&handshake(imei));
        self.stream.set_read_timeout(Some(ANSWER_WAIT)).unwrap();
        let mut answer = [0u8; 1];
        self.stream.read_exact(&mut answer).ok().map(|()| answer[0])
    }

    /// Sends `bytes`; a connection the gateway closed shows in what comes back, not here.
    fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// The record count the gateway acknowledged within `wait`; `None` when it answered nothing (or closed).
    fn ack(&mut self, wait: Duration) -> Option<u32> {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut answer = [0u8; 4];
        self.stream
            .read_exact(&mut answer)
            .ok()
            .map(|()| u32::from_be_bytes(answer))
    }

    /// Whether the gateway closed the connection within `wait`, having sent nothing more.
    fn closed_within(&mut self, wait: Duration) -> bool {
        tcp_units::closed_within(&mut self.stream, wait)
    }
}

fn series(name: &str, reason: &str) -> String {
    tcp_units::series(name, "teltonika", reason)
}

fn teltonika_app(tune: impl FnOnce(&mut ingest_gateway::config::Settings)) -> (TestApp, u16) {
    let port = free_port();
    let app = spawn_app(|s| {
        s.trackers.teltonika_listen = Some(format!("127.0.0.1:{port}"));
        s.pipeline.writers = 1;
        tune(s);
    });
    (app, port)
}

#[test]
fn traccars_vectors_sent_as_a_unit_sends_them_land_as_rows_with_the_values_they_carry() {
    let (app, port) = teltonika_app(|_| {});
    let now = OffsetDateTime::now_utc();
    let rules = ValidationRules::with_defaults(now);
    let (mut rows, mut letters) = (Vec::new(), Vec::new());
    for (i, (what, records, hex)) in VECTORS.iter().enumerate() {
        let imei = format!("3563070424410{i:02}");
        let packet = restamp(&bytes(hex), now - time::Duration::hours(1));
        let mut unit = Unit::connect(port);
        assert_eq!(unit.hello(&imei), Some(1), "{what}: the handshake is accepted");
        unit.send(&packet);
        let ack = unit.ack(ANSWER_WAIT);
        assert_eq!(ack, Some(*records as u32), "{what}: acknowledged with its record count");
        if i == 3 {
            eprintln!(
                "teltonika, {what}: the unit sends {} then {}; the gateway answers {:02x} then {}",
                hex_of(&handshake(&imei)),
                hex_of(&packet),
                1,
                hex_of(&ack.unwrap().to_be_bytes())
            );
        }
        for fix in decode_packet(&packet, &imei).unwrap().fixes {
            match check(fix, Protocol::Teltonika, &rules) {
                Checked::Stored { update, .. } => rows.push(update),
                Checked::Rejected { letter, .. } => letters.push(letter),
            }
        }
    }
    eventually("every record is in its table", ANSWER_WAIT, || {
        app.db.count("location_updates") == rows.len() as i64 && app.db.count("dead_letters") == letters.len() as i64
    });
    assert_eq!(
        (rows.len(), letters.len()),
        (21, 3),
        "the vectors' records with and without satellites"
    );

    let stored = app.db.query(
        "SELECT device_id, recorded_at, lat, lon, speed_kmh, heading_deg, accuracy_m, attributes::text \
         FROM location_updates ORDER BY device_id, recorded_at",
    );
    rows.sort_by(|a, b| (&a.device_id, a.recorded_at).cmp(&(&b.device_id, b.recorded_at)));
    for (row, sent) in stored.iter().zip(&rows) {
        let at: OffsetDateTime = row.get(1);
        assert_eq!(
            (row.get::<_, String>(0), at),
            (sent.device_id.clone(), sent.recorded_at)
        );
        assert_eq!((row.get::<_, f64>(2), row.get::<_, f64>(3)), (sent.lat, sent.lon));
        assert_eq!(row.get::<_, Option<f64>>(4), sent.speed_kmh);
        assert_eq!(row.get::<_, Option<f64>>(5), sent.heading_deg);
        assert_eq!(row.get::<_, Option<f64>>(6), None, "Teltonika sends no accuracy");
        let attributes: Value = serde_json::from_str(&row.get::<_, String>(7)).unwrap();
        let expected: Value = serde_json::from_str(sent.attributes.as_deref().unwrap()).unwrap();
        assert_eq!(attributes, expected, "{} at {}", sent.device_id, sent.recorded_at);
    }
    // The values themselves, read from the table: the Vienna record as Teltonika's documentation lays it out, and
    // the attributes Traccar's test checks.
    let one = |imei: &str, attribute: &str| -> Vec<(f64, f64, f64, f64, Value)> {
        app.db
            .query(&format!(
                "SELECT lat, lon, speed_kmh, heading_deg, (attributes->'{attribute}')::text FROM location_updates \
                 WHERE device_id = '{imei}' ORDER BY recorded_at"
            ))
            .iter()
            .map(|r| {
                let value: Option<String> = r.get(4);
                let value = value.map_or(Value::Null, |v| serde_json::from_str(&v).unwrap());
                (r.get(0), r.get(1), r.get(2), r.get(3), value)
            })
            .collect()
    };
    let vienna = &one("356307042441003", "power")[0];
    assert_eq!(
        (vienna.0, vienna.1, vienna.2, vienna.3, &vienna.4),
        (48.1523066, 16.3745183, 83.0, 198.0, &serde_json::json!(14.233))
    );
    assert_eq!(one("356307042441003", "odometer")[0].4, serde_json::json!(2656224));
    assert_eq!(one("356307042441006", "eyeTemp1")[0].4, serde_json::json!(-11.87));
    // The unit sent the older record second.
    assert_eq!(one("356307042441000", "tag1Name")[0].4, serde_json::json!("Nevera_3"));
    assert_eq!(
        one("356307042441004", "vin")[0].4,
        serde_json::json!("1A1JC5444R7252367")
    );
    let letter = app.db.query(
        "SELECT protocol, reason, device_id, payload::text FROM dead_letters WHERE device_id = '356307042441001'",
    );
    let payload: Value = serde_json::from_str(&letter[0].get::<_, String>(3)).unwrap();
    assert_eq!(
        (
            letter[0].get::<_, String>(0),
            letter[0].get::<_, String>(1),
            letter[0].get::<_, String>(2)
        ),
        (
            "teltonika".to_owned(),
            "no_position".to_owned(),
            "356307042441001".to_owned()
        )
    );
    assert_eq!(
        (payload["satellites"].as_u64(), payload["latitude"].as_f64()),
        (Some(0), Some(62.0355866))
    );
    let m = |s: &str| metric(&app, s);
    assert_eq!(
        m(r#"ingest_tracker_fixes_total{outcome="stored",protocol="teltonika"}"#),
        rows.len() as f64
    );
    assert_eq!(
        m(r#"ingest_tracker_dead_lettered_total{protocol="teltonika",reason="no_position"}"#),
        3.0
    );
    let stats = app.get("/stats").json();
    assert_eq!(stats["trackers"]["teltonika"]["stored"], rows.len());
    assert!(stats["trackers"]["teltonika"]["tcp"]["bad_packets"]["bad_crc"].is_u64());
    assert!(stats["trackers"]["osmand"].get("tcp").is_none());
}

#[test]
fn damaged_cut_oversized_and_dripping_packets_are_never_stored_nor_acknowledged_close_the_connection_and_are_counted() {
    let (app, port) = teltonika_app(|s| s.trackers.tcp_read_timeout = Duration::from_secs(1));
    let imei = "356307042441013";
    let good = restamp(
        &bytes(VECTORS[3].2),
        OffsetDateTime::now_utc() - time::Duration::hours(1),
    );
    let counted = |reason: &str| metric(&app, &series("ingest_tcp_bad_packets_total", reason));

    // A bad CRC is not acknowledged (the unit sends the packet again) and the connection stays; the third closes it.
    let mut damaged = good.clone();
    damaged[30] ^= 0x01;
    let mut unit = Unit::connect(port);
    assert_eq!(unit.hello(imei), Some(1));
    unit.send(&damaged);
    assert_eq!(unit.ack(SILENCE), None, "a bad CRC is not acknowledged");
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
    assert_eq!(unit.hello(imei), Some(1));
    unit.send(&good[..good.len() / 2]);
    assert!(
        unit.closed_within(ANSWER_WAIT),
        "a truncated packet closes the connection, unacknowledged"
    );
    assert_eq!(counted("read_timeout"), 1.0);

    // A length beyond the cap closes the connection at once, without waiting for what it announces.
    let mut unit = Unit::connect(port);
    assert_eq!(unit.hello(imei), Some(1));
    let started = Instant::now();
    unit.send(&[0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff, 0x08, 0x01]);
    assert!(
        unit.closed_within(ANSWER_WAIT),
        "an oversized length closes the connection"
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "before the read timeout"
    );
    assert_eq!(counted("oversized"), 1.0);

    // A whole packet dripping a byte every 100 ms would take 9 s: the read timeout closes it first.
    let mut unit = Unit::connect(port);
    assert_eq!(unit.hello(imei), Some(1));
    let started = Instant::now();
    for byte in &good[..20] {
        unit.send(std::slice::from_ref(byte));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        unit.closed_within(ANSWER_WAIT),
        "a dripping packet closes the connection, unacknowledged"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(counted("read_timeout"), 2.0);

    // A packet before the handshake: no unit sends that.
    let mut unit = Unit::connect(port);
    unit.send(&good);
    assert!(
        unit.closed_within(ANSWER_WAIT),
        "data before the handshake closes the connection"
    );
    assert_eq!(counted("malformed"), 1.0);

    app.wait_until_all_written();
    assert_eq!(
        (app.db.count("location_updates"), app.db.count("dead_letters")),
        (0, 0),
        "nothing of it is stored"
    );
    eventually("every connection is closed", ANSWER_WAIT, || {
        metric(&app, r#"ingest_tcp_connections{protocol="teltonika"}"#) == 0.0
    });
}

#[test]
fn a_unit_whose_imei_no_key_names_is_refused_at_its_handshake_never_stored_and_counted() {
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        keys.path(),
        format!(
            "trucks {} streams=location imeis=356307042441013\n",
            ingest_gateway::keys_file::hashed("igk_0123")
        ),
    )
    .unwrap();
    let (app, port) = teltonika_app(|s| s.auth.api_keys_file = Some(keys.path().to_owned()));
    let packet = restamp(
        &bytes(VECTORS[3].2),
        OffsetDateTime::now_utc() - time::Duration::hours(1),
    );
    let mut known = Unit::connect(port);
    assert_eq!(known.hello("356307042441013"), Some(1));
    known.send(&packet);
    assert_eq!(known.ack(ANSWER_WAIT), Some(1));

    let mut stranger = Unit::connect(port);
    assert_eq!(
        stranger.hello("356307042441014"),
        Some(0),
        "an IMEI no key names is refused"
    );
    stranger.send(&packet);
    assert!(
        stranger.closed_within(ANSWER_WAIT),
        "and disconnected, its packet unacknowledged"
    );
    let mut invalid = Unit::connect(port);
    assert_eq!(
        invalid.hello("3563070/42441014"),
        Some(0),
        "so is an id no device may have"
    );
    assert!(invalid.closed_within(ANSWER_WAIT));

    let refused = |reason: &str| metric(&app, &series("ingest_tcp_handshakes_refused_total", reason));
    assert_eq!((refused("unknown_device"), refused("invalid_device_id")), (1.0, 1.0));
    app.wait_until_all_written();
    assert_eq!(app.db.device_ids(), vec![("356307042441013".to_owned(), 1)]);
    assert_eq!(app.db.count("dead_letters"), 0);
}

#[test]
fn a_full_intake_holds_a_units_packet_unacknowledged_until_its_records_are_taken() {
    let OwnDatabase {
        mut cluster,
        name,
        data_dir: _data_dir,
    } = OwnDatabase::start();
    let port = free_port();
    let app = crate::helpers::spawn_app_on(cluster.config(&name), |s| {
        s.trackers.teltonika_listen = Some(format!("127.0.0.1:{port}"));
        s.storage.durability = ingest_gateway::config::Durability::Memory;
        s.pipeline.queue_capacity = 20;
        s.pipeline.writers = 1;
    });
    let now = OffsetDateTime::now_utc();
    let unit_records = |first: usize, n: usize| {
        (first..first + n)
            .map(|i| Record::valid(now - time::Duration::hours(1) + time::Duration::seconds(i as i64), i))
            .collect::<Vec<_>>()
    };
    let mut unit = Unit::connect(port);
    assert_eq!(unit.hello("356307042441013"), Some(1));
    // PostgreSQL away: the first 20 records fill the queue, and stay there.
    cluster.stop();
    unit.send(&encode(&unit_records(0, 20), false));
    assert_eq!(unit.ack(ANSWER_WAIT), Some(20));
    // The next packet finds the intake full: it is not acknowledged, and the unit is not read meanwhile.
    unit.send(&encode(&unit_records(20, 10), true));
    assert_eq!(
        unit.ack(Duration::from_secs(2)),
        None,
        "no ack while the intake is full"
    );
    let waits = metric(&app, &series("ingest_tcp_intake_waits_total", "overloaded"));
    assert!(waits >= 1.0, "the wait is counted: {waits}");
    // PostgreSQL back: the queue drains, the held packet is taken, and only then acknowledged.
    cluster.restart().expect("start PostgreSQL again");
    assert_eq!(unit.ack(Duration::from_secs(60)), Some(10));
    // The test's own connection did not outlive the restart.
    let db = Db::connect(cluster.config(&name));
    eventually("all 30 records are stored", Duration::from_secs(30), || {
        db.count("location_updates") == 30
    });
    drop(app);
}

/// Records per simulated unit, and units.
const RECORDS_PER_UNIT: usize = 1_000;
const UNITS: usize = 20;
/// Most records in one packet, as Teltonika's units send them.
const MAX_RECORDS_PER_PACKET: usize = 50;
/// One record in a hundred can never be stored (half without satellites, half at 0,0).
const INVALID_EVERY: usize = 100;
/// How often a unit records, on the test's clock: its seconds scaled down so that units send all through the
/// kills, buffering what they record while no gateway answers.
const RECORD_EVERY: Duration = Duration::from_millis(10);
/// How often a unit sends what it holds, on the test's clock (a unit's send period, scaled down like its records):
/// a packet carries the records of a period, and a backlog goes in packets of 50.
const SEND_EVERY: Duration = Duration::from_millis(200);
/// Seconds between two records of one unit, on the unit's clock.
const RECORD_SPACING_S: i64 = 7;
/// How long a unit waits for a packet's acknowledgement before it closes the connection and sends it again.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// The units' reconnection backoff, scaled down from their seconds.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Beyond this the test fails rather than waits.
const TIME_LIMIT: Duration = Duration::from_secs(300);

/// One AVL record as a unit buffers it.
#[derive(Debug, Clone)]
struct Record {
    at_ms: i64,
    /// When, after the simulation starts, the unit records it.
    recorded: Duration,
    /// 1e-7 degrees.
    lat: i32,
    lon: i32,
    satellites: u8,
    speed: u16,
    angle: u16,
    odometer: u32,
    /// The `reason` of its dead letter, for a record that can never be stored.
    invalid: Option<&'static str>,
}

impl Record {
    fn valid(at: OffsetDateTime, i: usize) -> Record {
        Record {
            at_ms: (at.unix_timestamp_nanos() / 1_000_000) as i64,
            recorded: Duration::ZERO,
            lat: 481_523_066 + i as i32,
            lon: 163_745_183 - i as i32,
            satellites: 12,
            speed: (i % 120) as u16,
            angle: (i % 360) as u16,
            odometer: 1_000 * i as u32,
            invalid: None,
        }
    }
}

/// A packet of `records` as a unit encodes it: Codec 8, or Codec 8 Extended (two-byte ids and counts), with the
/// IO elements units send most (ignition, movement, battery level, external voltage, odometer).
fn encode(records: &[Record], extended: bool) -> Vec<u8> {
    let mut data = vec![if extended { 0x8E } else { 0x08 }, records.len() as u8];
    let number = |data: &mut Vec<u8>, n: u16| {
        if extended {
            data.extend_from_slice(&n.to_be_bytes());
        } else {
            data.push(n as u8);
        }
    };
    for r in records {
        data.extend_from_slice(&r.at_ms.to_be_bytes());
        data.push(0);
        data.extend_from_slice(&r.lon.to_be_bytes());
        data.extend_from_slice(&r.lat.to_be_bytes());
        data.extend_from_slice(&120i16.to_be_bytes());
        data.extend_from_slice(&r.angle.to_be_bytes());
        data.push(r.satellites);
        data.extend_from_slice(&r.speed.to_be_bytes());
        number(&mut data, 0); // event IO id
        number(&mut data, 5); // IO elements in all
        number(&mut data, 3);
        for (id, value) in [(239u16, 1u8), (240, u8::from(r.speed > 0)), (113, 87)] {
            number(&mut data, id);
            data.push(value);
        }
        number(&mut data, 1);
        number(&mut data, 66);
        data.extend_from_slice(&12_874u16.to_be_bytes());
        number(&mut data, 1);
        number(&mut data, 16);
        data.extend_from_slice(&r.odometer.to_be_bytes());
        number(&mut data, 0); // 8-byte elements
        if extended {
            data.extend_from_slice(&0u16.to_be_bytes()); // variable-length elements
        }
    }
    data.push(records.len() as u8);
    let mut packet = vec![0, 0, 0, 0];
    packet.extend_from_slice(&(data.len() as u32).to_be_bytes());
    packet.extend_from_slice(&data);
    packet.extend_from_slice(&u32::from(crc16_ibm(&data)).to_be_bytes());
    packet
}

/// One unit's records, oldest first, with one in [`INVALID_EVERY`] that can never be stored.
fn plan(unit: usize, rng: &mut Lcg, first_at_ms: i64) -> VecDeque<Record> {
    (0..RECORDS_PER_UNIT)
        .map(|i| {
            let mut record = Record {
                at_ms: first_at_ms + i as i64 * RECORD_SPACING_S * 1000,
                recorded: RECORD_EVERY * i as u32,
                lat: 480_000_000 + rng.next_ms(10_000_000) as i32,
                lon: 20_000_000 + rng.next_ms(10_000_000) as i32,
                satellites: 4 + rng.next_ms(16) as u8,
                speed: rng.next_ms(130) as u16,
                angle: rng.next_ms(360) as u16,
                odometer: (i * 117) as u32,
                invalid: None,
            };
            if (i + unit).is_multiple_of(INVALID_EVERY) {
                if (i / INVALID_EVERY).is_multiple_of(2) {
                    record.satellites = 0;
                    record.invalid = Some("no_position");
                } else {
                    (record.lat, record.lon) = (0, 0);
                    record.invalid = Some("null_island");
                }
            }
            record
        })
        .collect()
}

/// What one simulated unit did.
#[derive(Debug, Default)]
struct UnitReport {
    records: usize,
    packets: usize,
    /// Packets sent again because the previous attempt was not acknowledged.
    resends: usize,
    /// Packets whose acknowledgement never came (a kill cut the connection, or it timed out).
    unacknowledged: usize,
    connections: usize,
    /// Connection attempts while no gateway listened.
    refused_connections: usize,
    /// For each record that can never be stored, how many packets carrying it went unacknowledged: how many extra
    /// copies of its dead letter a resend may leave.
    letters_cut: BTreeMap<(String, i64), usize>,
    /// Records still buffered at the end: a unit held up.
    left: usize,
}

/// Connects and says who it is; the connection once the gateway accepted the IMEI.
fn connect(port: u16, imei: &str) -> std::io::Result<TcpStream> {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(ACK_TIMEOUT))?;
    stream.write_all(&handshake(imei))?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer)?;
    if answer[0] != 1 {
        return Err(std::io::Error::new(ErrorKind::PermissionDenied, "IMEI refused"));
    }
    Ok(stream)
}

/// Runs one unit until its buffer is empty: it sends up to 50 of the records it holds, removes them only once the
/// gateway acknowledged that many, and otherwise closes the connection, waits a doubling, capped backoff,
/// reconnects and sends the same packet again.
fn simulate(
    unit: usize,
    mut buffer: VecDeque<Record>,
    port: u16,
    acknowledged: Arc<AtomicUsize>,
    halted: Arc<AtomicBool>,
    deadline: Instant,
) -> UnitReport {
    let imei = format!("35630704244{unit:04}");
    let extended = unit % 2 == 1;
    let mut report = UnitReport {
        records: buffer.len(),
        ..UnitReport::default()
    };
    let start = Instant::now();
    let mut connection: Option<TcpStream> = None;
    let mut backoff = FIRST_BACKOFF;
    let mut resending = false;
    let mut next_send = start;
    while let Some(head) = buffer.front() {
        if halted.load(Ordering::Relaxed) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(
            (start + head.recorded)
                .max(next_send)
                .saturating_duration_since(Instant::now()),
        );
        let stream = match connection.as_mut() {
            Some(stream) => stream,
            None => match connect(port, &imei) {
                Ok(stream) => {
                    report.connections += 1;
                    connection.insert(stream)
                }
                Err(e) => {
                    assert_ne!(e.kind(), ErrorKind::PermissionDenied, "unit {imei} refused");
                    report.refused_connections += 1;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        let now = Instant::now();
        let held = buffer.iter().take_while(|r| start + r.recorded <= now).count();
        let n = held.clamp(1, MAX_RECORDS_PER_PACKET);
        let packet: Vec<Record> = buffer.iter().take(n).cloned().collect();
        report.packets += 1;
        report.resends += usize::from(resending);
        let mut answer = [0u8; 4];
        let acked = stream
            .write_all(&encode(&packet, extended))
            .and_then(|()| stream.read_exact(&mut answer))
            .map(|()| u32::from_be_bytes(answer));
        match acked {
            Ok(count) => {
                assert_eq!(count as usize, n, "unit {imei}: the ack counts the packet's records");
                buffer.drain(..n);
                acknowledged.fetch_add(n, Ordering::Relaxed);
                backoff = FIRST_BACKOFF;
                resending = false;
                // A backlog goes out at once; otherwise the unit sends at its next period.
                next_send = if held - n >= MAX_RECORDS_PER_PACKET {
                    Instant::now()
                } else {
                    Instant::now() + SEND_EVERY
                };
            }
            Err(_) => {
                report.unacknowledged += 1;
                for record in packet.iter().filter(|r| r.invalid.is_some()) {
                    *report.letters_cut.entry((imei.clone(), record.at_ms)).or_default() += 1;
                }
                connection = None;
                resending = true;
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
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
fn simulated_units_lose_and_duplicate_no_record_through_two_kills_of_the_gateway() {
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
    envs.push(("INGEST_TELTONIKA_LISTEN", format!("127.0.0.1:{port}")));
    envs.push(("INGEST_FLUSH_INTERVAL", "50ms".to_owned()));
    let mut gateway = GatewayProcess::start(&envs);

    // Records of the last hours, oldest three hours ago.
    let first_at_ms = (OffsetDateTime::now_utc().unix_timestamp() - 3 * 3600) * 1000;
    let plans: Vec<VecDeque<Record>> = (0..UNITS).map(|u| plan(u, &mut rng, first_at_ms)).collect();
    let mut valid: BTreeMap<(String, i64), (i32, i32)> = BTreeMap::new();
    let mut invalid: BTreeMap<(String, i64), &'static str> = BTreeMap::new();
    for (unit, records) in plans.iter().enumerate() {
        let imei = format!("35630704244{unit:04}");
        for r in records {
            match r.invalid {
                Some(reason) => invalid.insert((imei.clone(), r.at_ms), reason),
                None => valid.insert((imei.clone(), r.at_ms), (r.lat, r.lon)).map(|_| ""),
            };
        }
    }
    let total = valid.len() + invalid.len();
    assert_eq!(total, UNITS * RECORDS_PER_UNIT);

    let acknowledged = Arc::new(AtomicUsize::new(0));
    let halt = Halt(Arc::new(AtomicBool::new(false)));
    let units: Vec<_> = plans
        .into_iter()
        .enumerate()
        .map(|(unit, records)| {
            let (acknowledged, halted) = (acknowledged.clone(), halt.0.clone());
            std::thread::Builder::new()
                .name(format!("unit-{unit}"))
                .spawn(move || simulate(unit, records, port, acknowledged, halted, deadline))
                .unwrap()
        })
        .collect();

    // The kills fall at moments chosen by acknowledged progress, so that they land mid-stream on any machine.
    let reached = |share: f64| {
        let target = (total as f64 * share) as usize;
        while acknowledged.load(Ordering::Relaxed) < target {
            assert!(
                Instant::now() < deadline,
                "gave up waiting for {target} acknowledged records"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let mut duplicates = 0;
    reached(0.30);
    duplicates += gateway_duplicates(&gateway.address);
    gateway.kill();
    let first_kill = acknowledged.load(Ordering::Relaxed);
    gateway = GatewayProcess::start(&envs);
    reached(0.65);
    duplicates += gateway_duplicates(&gateway.address);
    gateway.kill();
    let second_kill = acknowledged.load(Ordering::Relaxed);
    gateway = GatewayProcess::start(&envs);

    let reports: Vec<UnitReport> = units
        .into_iter()
        .map(|u| u.join().expect("a simulated unit panicked"))
        .collect();
    let db = Db::connect(cluster.config(&name));
    let wait_until = Instant::now() + Duration::from_secs(60);
    while db.count("location_updates") < valid.len() as i64 || db.count("dead_letters") < invalid.len() as i64 {
        assert!(Instant::now() < wait_until, "the tables never held every record");
        std::thread::sleep(Duration::from_millis(50));
    }
    duplicates += gateway_duplicates(&gateway.address);
    assert!(gateway.terminate().success(), "the last run stops cleanly");
    drop(halt);

    let sum = |f: fn(&UnitReport) -> usize| reports.iter().map(f).sum::<usize>();
    let mut stored: BTreeMap<(String, i64), Vec<(f64, f64)>> = BTreeMap::new();
    for row in db.query("SELECT device_id, recorded_at, lat, lon FROM location_updates") {
        let at: OffsetDateTime = row.get(1);
        let key = (row.get(0), (at.unix_timestamp_nanos() / 1_000_000) as i64);
        stored.entry(key).or_default().push((row.get(2), row.get(3)));
    }
    let missing: Vec<_> = valid.keys().filter(|k| !stored.contains_key(*k)).collect();
    let unexpected: Vec<_> = stored.keys().filter(|k| !valid.contains_key(*k)).collect();
    let doubled: Vec<_> = stored.iter().filter(|(_, rows)| rows.len() > 1).collect();
    let moved: Vec<_> = stored
        .iter()
        .filter(|(k, rows)| {
            valid.get(*k).is_some_and(|(lat, lon)| {
                rows.iter()
                    .any(|r| *r != (f64::from(*lat) / 1e7, f64::from(*lon) / 1e7))
            })
        })
        .collect();
    let mut letters: BTreeMap<(String, i64), usize> = BTreeMap::new();
    let mut wrong_letters = Vec::new();
    for row in db.query("SELECT protocol, reason, device_id, payload::text FROM dead_letters") {
        let (protocol, reason, device): (Option<String>, Option<String>, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        let payload: Value = serde_json::from_str(&row.get::<_, String>(3)).unwrap();
        let key = device.clone().zip(payload["timestamp_ms"].as_i64());
        match key.as_ref().and_then(|k| invalid.get(k)) {
            Some(why) if protocol.as_deref() == Some("teltonika") && reason.as_deref() == Some(*why) => {
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
        "teltonika crash test (seed {seed}): {total} records ({} valid, {} invalid) from {UNITS} units in {} packets \
         ({} resent, {} unacknowledged, {} connections, {} refused while down); kills at {first_kill} and \
         {second_kill} acknowledged records; {} rows stored, {} missing, {} twice; {} dead letters ({} extra copies \
         from resends of unacknowledged packets); duplicates absorbed: {duplicates}; {:.1} s",
        valid.len(),
        invalid.len(),
        sum(|r| r.packets),
        sum(|r| r.resends),
        sum(|r| r.unacknowledged),
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
    assert_eq!(sum(|r| r.records), total);
    let first = |n: usize| n.min(10);
    assert!(
        missing.is_empty(),
        "acknowledged records missing: {:?}",
        &missing[..first(missing.len())]
    );
    assert!(
        unexpected.is_empty(),
        "rows nobody sent: {:?}",
        &unexpected[..first(unexpected.len())]
    );
    assert!(
        doubled.is_empty(),
        "records stored twice: {:?}",
        &doubled[..first(doubled.len())]
    );
    assert!(
        moved.is_empty(),
        "records stored with other coordinates: {:?}",
        &moved[..first(moved.len())]
    );
    assert!(
        lost_letters.is_empty(),
        "invalid records with no dead letter: {lost_letters:?}"
    );
    assert!(
        wrong_letters.is_empty(),
        "dead letters for no invalid record: {wrong_letters:?}"
    );
    assert!(
        unexplained.is_empty(),
        "dead letters kept more often than their packet was sent again: {unexplained:?}"
    );
}

/// The location stream's duplicates absorbed by the running gateway, or 0 when it does not answer.
fn gateway_duplicates(base: &str) -> u64 {
    ureq::get(&format!("{base}/stats"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .and_then(|body| serde_json::from_str::<Value>(&body).ok())
        .and_then(|stats| stats["streams"]["location"]["duplicate"].as_u64())
        .unwrap_or(0)
}
