//! GT06, the binary TCP protocol of Concox trackers and of the many low-cost units that copy it: frames cut from a
//! byte stream, read into [`TrackerFix`]es, and the replies the device waits for. Pure: the listener does the IO.
//!
//! A frame is `78 78` and a 1-byte length, or `79 79` and a 2-byte length; then the protocol number, its content,
//! a 2-byte serial number, the CRC-ITU (CRC-16/X-25) of everything from the length to the serial, and `0D 0A`. The
//! length counts the protocol number through the CRC. A device logs in first (protocol `0x01`, its IMEI in BCD)
//! and every later frame on the connection is that device's. The device is answered with
//! `78 78 05 <protocol> <serial> <crc> 0D 0A`; a packet that carries a fix is answered once the fix is durable.
//!
//! Followed: traccar/traccar `src/main/java/org/traccar/protocol/Gt06FrameDecoder.java` (framing),
//! `Gt06ProtocolDecoder.java` (the messages, the layouts its `decodeVariant` tells apart by length, the alarm
//! codes, which packets are answered and how), and its test vectors, `src/test/.../Gt06ProtocolDecoderTest.java`.
//! Where this differs from Traccar, on purpose:
//! - The CRC is checked, and a frame that does not end in `0D 0A` where its length says is garbage. Traccar checks
//!   neither and, when the length disagrees, cuts the frame at the first `0D 0A`, which can sit inside a frame's
//!   binary fields; a gateway that acknowledges what it stores must not store a misread fix.
//! - A fix with no satellites, or not flagged positioned, is not valid: it becomes a dead letter, not a row.
//! - Layouts Traccar reads only for a device model configured on its server (NT20, XT40, QH302R, LW…, SEEWORLD,
//!   R11, VL…) are read as the standard layout: the gateway has no per-device configuration. Their GPS block is the
//!   same; only some attributes differ.
//! - Fix-carrying packets of other shapes (X1 `0x34`, `0x36`, `0x38`, iButton `0x61`, the modular `0x70`,
//!   the JC100/JC400 alarm `0x95`, AZ735's extended `0x32`) are answered as Traccar answers them but not read:
//!   each becomes a fix marked unreadable, so that it is kept, frame and all, in `dead_letters` rather than
//!   dropped, and can be read there once the gateway learns its layout.
//!
//! Field names in `attributes` are Traccar's (`sat`, `ignition`, `alarm`, `rssi`, `odometer`, …, `batt` for the
//! battery percentage as the other protocols store it), so a device reads the same whether it arrives straight or
//! through a Traccar server's forwarding.

use serde_json::{json, Value};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

use super::TrackerFix;

/// The longest frame taken: more than any packet carrying a fix (under 100 bytes) and than the longest packets of
/// Traccar's tests (a 0x7979 OBD text of 222 bytes); a longer length field is garbage, never waited for.
pub const MAX_FRAME_BYTES: usize = 1024;

const START: u8 = 0x78;
const START_EXTENDED: u8 = 0x79;
const STOP: [u8; 2] = [0x0D, 0x0A];
/// Protocol number, serial number and CRC: the least a length field can count.
const MIN_LENGTH: usize = 5;

/// Protocol numbers, named as in Traccar's decoder.
pub mod protocol {
    pub const LOGIN: u8 = 0x01;
    pub const GPS: u8 = 0x10;
    pub const GPS_LBS_6: u8 = 0x11;
    pub const GPS_LBS_1: u8 = 0x12;
    pub const STATUS: u8 = 0x13;
    pub const GPS_LBS_STATUS_1: u8 = 0x16;
    pub const GPS_LBS_RFID: u8 = 0x17;
    pub const LBS_STATUS: u8 = 0x19;
    pub const GPS_PHONE: u8 = 0x1A;
    pub const GPS_LBS_EXTEND: u8 = 0x1E;
    pub const GPS_LBS_2: u8 = 0x22;
    pub const HEARTBEAT: u8 = 0x23;
    pub const GPS_LBS_DRIVER: u8 = 0x25;
    pub const GPS_LBS_STATUS_2: u8 = 0x26;
    pub const GPS_LBS_STATUS_3: u8 = 0x27;
    pub const GPS_LBS_4: u8 = 0x2D;
    pub const GPS_LBS_5: u8 = 0x31;
    pub const GPS_LBS_STATUS_4: u8 = 0x32;
    pub const GPS_LBS_3: u8 = 0x37;
    pub const ALARM_MODULE: u8 = 0x39;
    pub const GPS_LBS_7: u8 = 0xA0;
    pub const GPS_LBS_STATUS_5: u8 = 0xA2;
    pub const FENCE_SINGLE: u8 = 0xA3;
    pub const FENCE_MULTI: u8 = 0xA4;
    pub const LBS_ALARM: u8 = 0xA5;
    pub const TIME_REQUEST: u8 = 0x8A;
}
use protocol::*;

/// Bytes that are not a frame, by why: the reason a listener counts them under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Garbage {
    /// Bytes before anything that starts a frame (`78 78` or `79 79`).
    NoStart,
    /// A length field smaller than the protocol number, serial and CRC it must count.
    TooShort,
    /// A length field over [`MAX_FRAME_BYTES`].
    TooLong,
    /// No `0D 0A` where the length field says the frame ends.
    NoStop,
    /// The CRC does not match.
    BadCrc,
}

impl Garbage {
    pub const ALL: [Garbage; 5] = [
        Garbage::NoStart,
        Garbage::TooShort,
        Garbage::TooLong,
        Garbage::NoStop,
        Garbage::BadCrc,
    ];

    pub const fn code(self) -> &'static str {
        match self {
            Garbage::NoStart => "no_start",
            Garbage::TooShort => "too_short",
            Garbage::TooLong => "too_long",
            Garbage::NoStop => "no_stop",
            Garbage::BadCrc => "bad_crc",
        }
    }
}

/// One whole frame, its CRC checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Started `79 79`, with a 2-byte length.
    pub extended: bool,
    /// The protocol number: what the content is.
    pub protocol: u8,
    /// Between the protocol number and the serial number.
    pub content: &'a [u8],
    /// The device's number for the frame, which the reply repeats.
    pub serial: u16,
    /// The frame as sent, start to stop bits: what a dead letter keeps.
    pub bytes: &'a [u8],
}

/// What the bytes at the front of a receive buffer are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing<'a> {
    /// A frame, `len` bytes long.
    Frame { frame: Frame<'a>, len: usize },
    /// `len` bytes to drop: they are not a frame.
    Garbage { reason: Garbage, len: usize },
    /// The buffer ends inside a frame (or is empty): read more. `len` is the whole frame's, once its length
    /// field has arrived.
    Incomplete { len: Option<usize> },
}

/// Cuts the first frame off `buf`.
pub fn frame(buf: &[u8]) -> Framing<'_> {
    let extended = match buf {
        [] | [START | START_EXTENDED] => return Framing::Incomplete { len: None },
        [START, START, ..] => false,
        [START_EXTENDED, START_EXTENDED, ..] => true,
        _ => {
            return Framing::Garbage {
                reason: Garbage::NoStart,
                len: next_start(buf, 1),
            }
        }
    };
    let head = if extended { 4 } else { 3 };
    if buf.len() < head {
        return Framing::Incomplete { len: None };
    }
    let length = if extended {
        usize::from(u16::from_be_bytes([buf[2], buf[3]]))
    } else {
        usize::from(buf[2])
    };
    // A bad length field says nothing about where the frame ends: drop only its start and look for the next one.
    let garbage = |reason| Framing::Garbage {
        reason,
        len: next_start(buf, 2),
    };
    if length < MIN_LENGTH {
        return garbage(Garbage::TooShort);
    }
    let len = head + length + STOP.len();
    if len > MAX_FRAME_BYTES {
        return garbage(Garbage::TooLong);
    }
    if buf.len() < len {
        return Framing::Incomplete { len: Some(len) };
    }
    if buf[len - 2..len] != STOP {
        return garbage(Garbage::NoStop);
    }
    let crc_at = len - 4;
    if crc_x25(&buf[2..crc_at]) != u16::from_be_bytes([buf[crc_at], buf[crc_at + 1]]) {
        // The length and the stop bits agree: the frame's end is known, and the device will resend it.
        return Framing::Garbage {
            reason: Garbage::BadCrc,
            len,
        };
    }
    Framing::Frame {
        frame: Frame {
            extended,
            protocol: buf[head],
            content: &buf[head + 1..crc_at - 2],
            serial: u16::from_be_bytes([buf[crc_at - 2], buf[crc_at - 1]]),
            bytes: &buf[..len],
        },
        len,
    }
}

/// Where the next frame may start, at or after `from`: a start pair, or a start byte that ends the buffer.
fn next_start(buf: &[u8], from: usize) -> usize {
    (from..buf.len())
        .find(|&i| match &buf[i..] {
            [START, START, ..] | [START_EXTENDED, START_EXTENDED, ..] => true,
            [b] => *b == START || *b == START_EXTENDED,
            _ => false,
        })
        .unwrap_or(buf.len())
}

/// CRC-16/X-25 (GT06's "CRC-ITU"): polynomial 0x1021 reflected, initial and final XOR 0xFFFF. Bitwise: frames
/// are tens of bytes, and a table would be 512 bytes for nothing measurable.
pub fn crc_x25(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFF_u16;
    for &b in bytes {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x8408 } else { crc >> 1 };
        }
    }
    !crc
}

/// A reply in the short form: `78 78 <length> <protocol> <content> <serial> <crc> 0D 0A`.
pub fn reply(protocol: u8, serial: u16, content: &[u8]) -> Vec<u8> {
    // Replies carry at most a time (6 bytes): the length always fits its byte.
    let length = (MIN_LENGTH + content.len()) as u8;
    let mut out = Vec::with_capacity(MIN_LENGTH + content.len() + 5);
    out.extend_from_slice(&[START, START, length, protocol]);
    out.extend_from_slice(content);
    out.extend_from_slice(&serial.to_be_bytes());
    let crc = crc_x25(&out[2..]);
    out.extend_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(&STOP);
    out
}

/// A login: who the device says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// The IMEI: the device id of every later fix on the connection.
    pub imei: String,
    /// The time zone the login's extension declares: the device's times are read in it (as Traccar does when no
    /// zone is configured for the device); `None` when the login has no extension or it holds no valid offset.
    pub utc_offset: Option<UtcOffset>,
}

/// What one frame says.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The device logs in; the listener decides whether it may, then calls [`Session::log_in`].
    Login(Login),
    /// A packet with a GPS fix, which may still be a dead letter (no satellites, no position, a bad date, a
    /// layout not read).
    Fix(Box<TrackerFix>),
    /// A packet without a fix: a heartbeat or status, cell towers, Wi-Fi, a command's answer, a type not known.
    NoFix,
}

/// A frame read: the message, and what the device is answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub message: Message,
    /// The reply, if the device is answered at all: sent once the fix is durable when the message is a fix.
    pub reply: Option<Vec<u8>>,
}

/// Why a frame is refused: not answered, and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Gt06Error {
    /// Only a login may come before a login: nothing else names the device.
    #[error("a packet of protocol {protocol:#04x} before the device logged in")]
    NotLoggedIn { protocol: u8 },
    /// A login without its 8 bytes of IMEI.
    #[error("a login of {len} bytes, without the 8 bytes of an IMEI")]
    ShortLogin { len: usize },
}

impl Gt06Error {
    pub const fn code(self) -> &'static str {
        match self {
            Gt06Error::NotLoggedIn { .. } => "not_logged_in",
            Gt06Error::ShortLogin { .. } => "short_login",
        }
    }
}

/// One connection's state: the device it logged in as.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// The IMEI of the login the listener accepted.
    device_id: Option<String>,
    /// The login's time zone (UTC when it declared none).
    utc_offset: Option<UtcOffset>,
}

impl Session {
    /// The device the connection logged in as, if it has.
    pub fn device_id(&self) -> Option<&str> {
        self.device_id.as_deref()
    }

    /// Accepts a login: later frames are this device's.
    pub fn log_in(&mut self, login: Login) {
        self.device_id = Some(login.imei);
        self.utc_offset = login.utc_offset;
    }

    /// Reads a frame. `now` is the gateway's clock, for the one reply that carries a time.
    pub fn read(&self, frame: &Frame<'_>, now: OffsetDateTime) -> Result<Decoded, Gt06Error> {
        let p = frame.protocol;
        let echo = || Some(reply(p, frame.serial, &[]));
        if p == LOGIN {
            let login = read_login(frame.content)?;
            // Traccar answers a login in the short form even when it came extended.
            return Ok(Decoded {
                message: Message::Login(login),
                reply: echo(),
            });
        }
        let Some(device_id) = self.device_id.as_deref() else {
            return Err(Gt06Error::NotLoggedIn { protocol: p });
        };
        let layout = Layout::of(frame);
        let (message, reply) = if carries_fix(frame, layout) {
            let fix = self.read_fix(frame, layout, device_id);
            (Message::Fix(Box::new(fix)), echo())
        } else if p == TIME_REQUEST {
            let now = now.to_offset(UtcOffset::UTC);
            let time = [
                (now.year() - 2000).clamp(0, 255) as u8,
                now.month() as u8,
                now.day(),
                now.hour(),
                now.minute(),
                now.second(),
            ];
            // Traccar answers a time request with serial 0, not the request's.
            (Message::NoFix, Some(reply(TIME_REQUEST, 0, &time)))
        } else if unread_fix(frame) {
            let mut fix = TrackerFix::new(device_id.to_owned(), json!({ "frame": hex(frame.bytes) }));
            fix.attribute("type", p.into());
            fix.unreadable(
                "frame",
                &format!("is a packet of protocol {p:#04x} in a layout the gateway does not read"),
            );
            let reply = if echoed(frame) { echo() } else { None };
            (Message::Fix(Box::new(fix)), reply)
        } else {
            (Message::NoFix, if echoed(frame) { echo() } else { None })
        };
        Ok(Decoded { message, reply })
    }

    fn read_fix(&self, frame: &Frame<'_>, layout: Layout, device_id: &str) -> TrackerFix {
        let mut fix = TrackerFix::new(device_id.to_owned(), json!({ "frame": hex(frame.bytes) }));
        fix.attribute("type", frame.protocol.into());
        let mut r = Reader(frame.content);
        if read_gps(&mut r, &mut fix, self.utc_offset.unwrap_or(UtcOffset::UTC)).is_none() {
            fix.unreadable("gps", "is cut short: the packet ends inside its GPS block");
            return fix;
        }
        // What follows the GPS block only adds attributes: a packet that ends early keeps its fix and whatever
        // was read before the end (Traccar drops the whole packet).
        let _ = read_extras(&mut r, &mut fix, frame.protocol, layout);
        fix
    }
}

fn read_login(content: &[u8]) -> Result<Login, Gt06Error> {
    let Some(bcd) = content.get(..8) else {
        return Err(Gt06Error::ShortLogin { len: content.len() });
    };
    // 15 digits in 8 BCD bytes: the first nibble is padding (Traccar drops it too).
    let imei = hex(bcd)[1..].to_owned();
    // After the IMEI: a 2-byte type code, then, on newer units, the time zone: its hours × 100 + minutes in the
    // top 12 bits, west of Greenwich when bit 3 is set (Traccar reads it only past 10 bytes).
    let utc_offset = content.get(10..12).and_then(|ext| {
        let bits = u16::from_be_bytes([ext[0], ext[1]]);
        let value = i32::from(bits >> 4);
        let seconds = ((value / 100) * 60 + value % 100) * 60;
        let seconds = if bits & 0x8 != 0 { -seconds } else { seconds };
        UtcOffset::from_whole_seconds(seconds).ok()
    });
    Ok(Login { imei, utc_offset })
}

/// The layouts Traccar's `decodeVariant` tells apart by protocol and length, for the packets read here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Standard,
    Vxt01,
    Gt06eCard,
    Benway,
    S5,
    Wetrust,
    Sl4x,
    Seeworld,
    Rfid,
    Lw4g,
    Trx16i,
}

impl Layout {
    fn of(frame: &Frame<'_>) -> Layout {
        if frame.extended {
            return Layout::Standard;
        }
        // The length byte: protocol number, content, serial and CRC.
        let length = frame.content.len() + MIN_LENGTH;
        match (frame.protocol, length) {
            (GPS_LBS_1 | GPS_LBS_STATUS_1, 0x24) => Layout::Vxt01,
            (GPS_LBS_1, 0x71..) => Layout::Gt06eCard,
            (GPS_LBS_1, 0x21) => Layout::Benway,
            (GPS_LBS_1, 0x2b) => Layout::S5,
            (GPS_LBS_1, 0x29) => Layout::Wetrust,
            (GPS_LBS_5, 0x2a) | (GPS_LBS_STATUS_4, 0x27 | 0x29) => Layout::Sl4x,
            (GPS_LBS_2, 0x2f) | (GPS_LBS_STATUS_1, 0x26) | (FENCE_SINGLE, 0x0c | 0x18) => Layout::Seeworld,
            (GPS_LBS_RFID, 0x28) => Layout::Rfid,
            (GPS_LBS_STATUS_5, 0x40) => Layout::Lw4g,
            (GPS_LBS_STATUS_1, 0x2d) => Layout::Trx16i,
            _ => Layout::Standard,
        }
    }
}

/// Whether the packet is one of those Traccar reads a GPS block from first, in the layouts read here.
fn carries_fix(frame: &Frame<'_>, layout: Layout) -> bool {
    match frame.protocol {
        GPS | GPS_LBS_6 | GPS_LBS_1 | GPS_LBS_2 | GPS_LBS_DRIVER | GPS_LBS_3 | GPS_LBS_4 | GPS_LBS_5
        | GPS_LBS_STATUS_1 | GPS_LBS_STATUS_2 | GPS_LBS_STATUS_3 | GPS_PHONE | GPS_LBS_EXTEND | GPS_LBS_7
        | FENCE_MULTI | ALARM_MODULE => true,
        // AZ735 sends an extended 0x32 of another shape.
        GPS_LBS_STATUS_4 => !frame.extended,
        // Otherwise the same numbers are Wi-Fi or status packets.
        GPS_LBS_RFID => layout == Layout::Rfid,
        GPS_LBS_STATUS_5 => layout == Layout::Lw4g,
        FENCE_SINGLE => layout != Layout::Seeworld,
        _ => false,
    }
}

/// Packets Traccar reads a fix from in a shape not read here.
fn unread_fix(frame: &Frame<'_>) -> bool {
    match frame.protocol {
        // X1 GPS, TRX16i location, GPS_LBS_8, iButton, modular GPS, JC100/JC400 alarm.
        0x34 | 0x36 | 0x38 | 0x61 | 0x70 | 0x95 => true,
        GPS_LBS_STATUS_4 => frame.extended,
        _ => false,
    }
}

/// Whether Traccar answers a packet (not a login, a fix or a time request) with its echo: every short one but
/// those it answers otherwise or not at all (command answers, Wi-Fi, information, address, photo, the fix shapes
/// it returns early from); of the extended ones, the heartbeat and status kinds it echoes too.
fn echoed(frame: &Frame<'_>) -> bool {
    match frame.protocol {
        0x80..=0x82 | 0x2A | 0x34 | 0x35 | 0x38 | 0x17 | 0x69 | 0xF3 | 0x94 | 0x21 | 0x8C | 0x9B => false,
        STATUS | HEARTBEAT | LBS_STATUS | LBS_ALARM | 0x15 | 0x40 | 0x70 | 0x95 | 0xB2 | 0xF1 | 0xF2 => true,
        _ => !frame.extended,
    }
}

/// Reads the GPS block every fix packet starts with: date-time, GPS info and satellites, latitude and longitude
/// in 1/1,800,000 degree (minutes × 30,000), speed in km/h, course and status. `None` when the packet ends first.
fn read_gps(r: &mut Reader<'_>, fix: &mut TrackerFix, offset: UtcOffset) -> Option<()> {
    let date = r.take(6)?;
    let info = r.u8()?;
    let lat = r.u32()?;
    let lon = r.u32()?;
    let speed = r.u8()?;
    let flags = r.u16()?;
    let satellites = info & 0x0F;
    fix.attribute("sat", satellites.into());
    let positioned = bit(flags.into(), 12);
    fix.valid = positioned && satellites > 0;
    let mut lat = f64::from(lat) / 1_800_000.0;
    let mut lon = f64::from(lon) / 1_800_000.0;
    if !bit(flags.into(), 10) {
        lat = -lat;
    }
    if bit(flags.into(), 11) {
        lon = -lon;
    }
    fix.lat = Some(lat);
    fix.lon = Some(lon);
    fix.speed_kmh = Some(f64::from(speed));
    fix.heading_deg = Some(f64::from(flags & 0x3FF));
    if bit(flags.into(), 14) {
        fix.attribute("ignition", bit(flags.into(), 15).into());
    }
    fix.recorded_at = gps_time(date, offset);
    // A unit without a fix often sends a zeroed date too: its dead letter should say it had no fix.
    if fix.recorded_at.is_none() && fix.valid {
        fix.unreadable("time", "is not a date");
    }
    Some(())
}

fn gps_time(date: &[u8], offset: UtcOffset) -> Option<OffsetDateTime> {
    let month = Month::try_from(date[1]).ok()?;
    let day = Date::from_calendar_date(2000 + i32::from(date[0]), month, date[2]).ok()?;
    let time = Time::from_hms(date[3], date[4], date[5]).ok()?;
    Some(
        PrimitiveDateTime::new(day, time)
            .assume_offset(offset)
            .to_offset(UtcOffset::UTC),
    )
}

/// Everything after the GPS block, in the order of Traccar's decoder for the same protocol and layout.
///
/// The re-upload flag (Traccar's `archive`) is not kept: it says how a fix travelled, not what it is. A unit sends
/// a fix whose reply it missed again with the flag set, and the same fix with other attributes would be a conflict
/// under its natural key rather than the retry it is.
fn read_extras(r: &mut Reader<'_>, fix: &mut TrackerFix, p: u8, layout: Layout) -> Option<()> {
    if has_lbs(p) && r.left() > 0 {
        let has_length = has_status(p)
            && !matches!(p, LBS_STATUS | LBS_ALARM | ALARM_MODULE | GPS_LBS_STATUS_5)
            && !(p == GPS_LBS_STATUS_1 && layout == Layout::Vxt01);
        read_lbs(r, fix, p, layout, has_length)?;
    }
    if has_status(p) {
        if p == GPS_LBS_STATUS_5 {
            r.u8()?; // network indicator
        }
        read_terminal_info(r, fix, layout)?;
        if p == GPS_LBS_STATUS_5 {
            fix.attribute("power", (f64::from(r.u16()?) / 100.0).into());
        }
        read_battery(r, fix)?;
        fix.attribute("rssi", r.u8()?.into());
        let mut extension = u32::from(r.u8()?);
        if matches!(p, GPS_LBS_STATUS_3 | FENCE_MULTI | ALARM_MODULE) {
            // The next byte's top nibble extends the alarm code (Traccar's 0x0107 and 0x010B: jamming).
            extension += u32::from(r.peek()? >> 4) << 8;
        }
        if layout != Layout::Vxt01 {
            add_alarm(fix, alarm(extension, layout));
            if layout == Layout::Trx16i {
                fix.attribute("event", extension.into());
            }
        }
    }
    if matches!(p, GPS_LBS_STATUS_5 | GPS_LBS_STATUS_3 | FENCE_MULTI | ALARM_MODULE) {
        r.u8()?; // language
    }
    if p == GPS_LBS_STATUS_1 && layout == Layout::Trx16i {
        r.u8()?; // language
        driver(fix, r.take(8)?);
    }
    if p == ALARM_MODULE {
        while r.left() > 0 {
            let module = r.u16()?;
            let len = r.u8()?;
            match module {
                0x0018 => fix.attribute("battery", (f64::from(r.u16()?) / 100.0).into()),
                0x0032 => fix.attribute("startupStatus", r.u8()?.into()),
                0x006A => fix.attribute("batt", r.u8()?.into()),
                _ => r.skip(len.into())?,
            }
        }
    }
    if p == GPS_LBS_STATUS_5 {
        fix.attribute("odometer", r.u32()?.into());
        fix.attribute("hours", (u64::from(r.u32()?) * 1000).into());
        r.skip(8)?; // terminal id
        fix.attribute("input", r.u16()?.into());
    }
    if p == GPS_LBS_1 {
        read_gps_lbs_1_tail(r, fix, layout)?;
    }
    if p == GPS_LBS_2 && layout == Layout::Seeworld {
        fix.attribute("ignition", (r.u8()? > 0).into());
        r.u8()?; // reporting mode
        r.u8()?; // supplementary transmission
        fix.attribute("odometer", r.u32()?.into());
        r.u32()?; // travel time
        let t = r.u16()?;
        let t = if bit(t.into(), 15) {
            -i32::from(t & 0x7FFF)
        } else {
            i32::from(t)
        };
        fix.attribute("temp1", (f64::from(t) / 100.0).into());
        fix.attribute("humidity", (f64::from(r.u16()?) / 100.0).into());
    }
    if p == GPS_LBS_STATUS_4 && layout == Layout::Sl4x {
        fix.attribute("altitude", r.i16()?.into());
    }
    if matches!(p, GPS_LBS_2 | GPS_LBS_3 | GPS_LBS_4 | GPS_LBS_5) && r.left() >= 3 {
        fix.attribute("ignition", (r.u8()? > 0).into());
        fix.attribute("event", r.u8()?.into()); // why the unit reported
        r.u8()?; // re-upload
        if layout == Layout::Sl4x {
            if r.left() > 2 {
                fix.attribute("odometer", r.u32()?.into());
            }
            fix.attribute("altitude", r.i16()?.into());
        }
    }
    if p == GPS_LBS_3 {
        let module = r.u16()?;
        let len = r.u8()?;
        match module {
            0x0027 => fix.attribute("power", (f64::from(r.u16()?) / 100.0).into()),
            0x002E => fix.attribute("odometer", r.u32()?.into()),
            0x003B => fix.accuracy_m = Some(f64::from(r.u16()?) / 100.0),
            _ => r.skip(len.into())?,
        }
    }
    if p == GPS_LBS_RFID {
        fix.attribute("driverUniqueId", hex(r.take(8)?).into());
        r.u8()?; // validity
    }
    if r.left() == 3 || r.left() == 7 {
        fix.attribute("ignition", (r.u8()? > 0).into());
        r.u8()?; // upload mode
        r.u8()?; // re-upload
    }
    if r.left() == 4 {
        fix.attribute("odometer", r.u32()?.into());
    }
    if matches!(p, GPS_LBS_STATUS_3 | FENCE_MULTI) {
        fix.attribute("geofence", r.u8()?.into());
    }
    Some(())
}

/// The tails of the 0x12 layouts (Traccar's `type == MSG_GPS_LBS_1` block).
fn read_gps_lbs_1_tail(r: &mut Reader<'_>, fix: &mut TrackerFix, layout: Layout) -> Option<()> {
    match layout {
        Layout::Gt06eCard => {
            fix.attribute("odometer", r.u32()?.into());
            let len = r.u8()?;
            let card = ascii(r.take(len.into())?);
            r.u8()?; // alarm
            r.u8()?; // swiped
            fix.attribute("card", card.trim().into());
        }
        Layout::Benway => {
            let mask = u32::from(r.u16()?);
            fix.attribute("ignition", bit(mask, 15).into());
            fix.attribute("in2", bit(mask, 14).into());
            if bit(mask, 12) {
                let value = (mask & 0x1FF) as i32;
                let value = if bit(mask, 9) { -value } else { value };
                fix.attribute("temp1", value.into());
            } else {
                let value = mask & 0x3FF;
                if bit(mask, 13) {
                    fix.attribute("adc1", value.into());
                } else {
                    fix.attribute("adc1", (f64::from(value) / 10.0).into());
                }
            }
        }
        Layout::Vxt01 => {
            read_terminal_info(r, fix, layout)?;
            fix.attribute("power", (f64::from(r.u16()?) / 100.0).into());
            fix.attribute("rssi", r.u8()?.into());
            r.u8()?; // alarm extension
        }
        Layout::S5 => {
            read_terminal_info(r, fix, layout)?;
            fix.attribute("power", (f64::from(r.u16()?) / 100.0).into());
            fix.attribute("rssi", r.u8()?.into());
            add_alarm(fix, alarm(r.u8()?.into(), layout));
            fix.attribute("oil", r.u16()?.into());
            let t = r.u8()?;
            let t = if bit(t.into(), 7) {
                -i32::from(t & 0x7F)
            } else {
                i32::from(t)
            };
            fix.attribute("temp1", t.into());
            fix.attribute("odometer", (u64::from(r.u32()?) * 10).into());
        }
        Layout::Wetrust => {
            fix.attribute("odometer", r.u32()?.into());
            let len = r.u8()?;
            fix.attribute("card", ascii(r.take(len.into())?).into());
            if r.u8()? > 0 {
                add_alarm(fix, Some("general"));
            }
            fix.attribute("cardStatus", r.u8()?.into());
            fix.attribute("drivingTime", r.u16()?.into());
        }
        _ => {}
    }
    Some(())
}

fn has_lbs(p: u8) -> bool {
    matches!(
        p,
        LBS_STATUS
            | GPS_LBS_1
            | GPS_LBS_2
            | GPS_LBS_DRIVER
            | GPS_LBS_3
            | GPS_LBS_4
            | GPS_LBS_5
            | GPS_LBS_6
            | GPS_LBS_STATUS_1
            | GPS_LBS_STATUS_2
            | GPS_LBS_STATUS_3
            | GPS_LBS_STATUS_4
            | GPS_LBS_STATUS_5
            | GPS_LBS_7
            | GPS_LBS_RFID
            | FENCE_MULTI
            | ALARM_MODULE
            | LBS_ALARM
            | FENCE_SINGLE
    )
}

/// Traccar's `hasStatus`, for the fix packets (0x22 and 0x25 have one only on NT models, which are not read).
fn has_status(p: u8) -> bool {
    matches!(
        p,
        GPS_LBS_STATUS_1
            | GPS_LBS_STATUS_2
            | GPS_LBS_STATUS_3
            | GPS_LBS_STATUS_4
            | GPS_LBS_STATUS_5
            | FENCE_MULTI
            | ALARM_MODULE
    )
}

/// The cell tower (LBS: location-based service) block: country, network, area and cell.
fn read_lbs(r: &mut Reader<'_>, fix: &mut TrackerFix, p: u8, layout: Layout, has_length: bool) -> Option<()> {
    let mut length = 0;
    if has_length {
        length = r.u8()?;
        if length == 0 {
            // No cell; some units still send the block zeroed, and Traccar skips it when they do.
            let rest = r.0;
            if rest.iter().take(45).skip(9).all(|&b| b == 0) {
                r.skip(rest.len().min(45))?;
            }
            return Some(());
        }
    }
    let cell_type = if p == ALARM_MODULE { r.u8()? } else { 0 };
    let mcc = r.u16()?;
    let mnc = if bit(mcc.into(), 15) || p == GPS_LBS_6 || layout == Layout::Sl4x {
        r.u16()?
    } else {
        r.u8()?.into()
    };
    let wide = cell_type >= 3 || matches!(p, LBS_ALARM | GPS_LBS_7 | GPS_LBS_STATUS_5);
    let lac = if wide { i64::from(r.i32()?) } else { i64::from(r.u16()?) };
    let cid = if wide || layout == Layout::Sl4x {
        r.u64()? as i64
    } else if matches!(p, GPS_LBS_6 | GPS_LBS_DRIVER) || layout == Layout::Seeworld {
        i64::from(r.u32()?)
    } else {
        i64::from(r.u24()?)
    };
    if cell_type >= 3 {
        r.u16()?; // signal
    } else if p == ALARM_MODULE {
        r.u8()?; // signal
    }
    if lac != 0 || cid != 0 {
        fix.attribute("mcc", (mcc & 0x7FFF).into());
        fix.attribute("mnc", mnc.into());
        fix.attribute("lac", lac.into());
        fix.attribute("cid", cid.into());
    }
    if length > 9 {
        r.skip(usize::from(length) - 9)?;
    }
    Some(())
}

/// The terminal information byte: ignition, charging, fuel cut, and an alarm in bits 3–5.
fn read_terminal_info(r: &mut Reader<'_>, fix: &mut TrackerFix, layout: Layout) -> Option<()> {
    let status = r.u8()?;
    let s = u32::from(status);
    fix.attribute("status", status.into());
    fix.attribute("ignition", bit(s, 1).into());
    fix.attribute("charge", bit(s, 2).into());
    fix.attribute("blocked", bit(s, 7).into());
    let alarm = match (s >> 3) & 0x7 {
        1 => Some("vibration"),
        2 => Some("powerCut"),
        3 => Some("lowBattery"),
        4 => Some("sos"),
        6 => Some("geofence"),
        7 if layout == Layout::Vxt01 => Some("overspeed"),
        7 => Some("removing"),
        _ => None,
    };
    add_alarm(fix, alarm);
    Some(())
}

/// The voltage level: 0–6 on most units (a percentage in sixths), a percentage on some.
fn read_battery(r: &mut Reader<'_>, fix: &mut TrackerFix) -> Option<()> {
    let level = u32::from(r.u8()?);
    if level <= 6 {
        fix.attribute("batt", (level * 100 / 6).into());
    } else if level <= 100 {
        fix.attribute("batt", level.into());
    }
    Some(())
}

/// Traccar's alarm names for the alarm byte of a status block, for a unit of no configured model.
fn alarm(code: u32, layout: Layout) -> Option<&'static str> {
    let trx16i = layout == Layout::Trx16i;
    Some(match code {
        0x01 => "sos",
        0x02 => "powerCut",
        0x03 => "vibration",
        0x04 => "geofenceEnter",
        0x05 => "geofenceExit",
        0x06 => "overspeed",
        0x09 if trx16i => "geofence",
        0x09 => "vibration",
        0x0E if trx16i => "lowPower",
        0x0E | 0x0F | 0x19 => "lowBattery",
        0x11 => "powerOff",
        0x0C | 0x13 | 0x25 | 0x32 => "tampering",
        0x14 => "door",
        0x18 => "removing",
        0x1A | 0x27 | 0x28 | 0xF1 => "hardBraking",
        0x1B | 0x2A | 0x2B | 0x2E => "hardCornering",
        0x23 => "fallDown",
        0x26 | 0x29 | 0xF0 => "hardAcceleration",
        0x2C | 0xF2 => "accident",
        0x30 | 0x0107 | 0x010B => "jamming",
        0x33 => "lock",
        0x34 => "unlock",
        0x53 => "fuelLeak",
        0x5B | 0x5C => "temperature",
        0xC9 => "idle",
        _ => return None,
    })
}

/// Adds an alarm: a packet can raise two (its status bits and its alarm byte), joined by a comma as Traccar does.
fn add_alarm(fix: &mut TrackerFix, alarm: Option<&str>) {
    let Some(alarm) = alarm else { return };
    let joined = match fix.attributes.get("alarm").and_then(Value::as_str) {
        Some(earlier) => format!("{earlier},{alarm}"),
        None => alarm.to_owned(),
    };
    fix.attribute("alarm", joined.into());
}

/// A driver's RFID card, unless the unit sent zeros for "no card".
fn driver(fix: &mut TrackerFix, id: &[u8]) {
    if id.iter().any(|&b| b != 0) {
        fix.attribute("driverUniqueId", hex(id).into());
    }
}

fn bit(value: u32, index: u32) -> bool {
    (value >> index) & 1 == 1
}

fn ascii(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Lower-case hex, as Traccar's `ByteBufUtil.hexDump`.
pub use crate::support::hex::encode as hex;

/// Big-endian reads off the front of a packet's content; each `None` when the content ends first.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    fn left(&self) -> usize {
        self.0.len()
    }

    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn i16(&mut self) -> Option<i16> {
        self.u16().map(|v| v as i16)
    }

    fn u24(&mut self) -> Option<u32> {
        self.take(3).map(|b| u32::from_be_bytes([0, b[0], b[1], b[2]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self) -> Option<i32> {
        self.u32().map(|v| v as i32)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::macros::{datetime, offset};

    const IMEI: &str = "864717003283581";

    fn bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A frame as a device builds it.
    fn encode(extended: bool, protocol: u8, content: &[u8], serial: u16) -> Vec<u8> {
        let length = content.len() + MIN_LENGTH;
        let mut out = if extended {
            let mut head = vec![START_EXTENDED, START_EXTENDED];
            head.extend_from_slice(&(length as u16).to_be_bytes());
            head
        } else {
            vec![START, START, length as u8]
        };
        out.push(protocol);
        out.extend_from_slice(content);
        out.extend_from_slice(&serial.to_be_bytes());
        let crc = crc_x25(&out[2..]);
        out.extend_from_slice(&crc.to_be_bytes());
        out.extend_from_slice(&STOP);
        out
    }

    fn logged_in() -> Session {
        let mut session = Session::default();
        session.log_in(Login {
            imei: IMEI.into(),
            utc_offset: None,
        });
        session
    }

    fn read_with(session: &Session, hex: &str) -> Result<Decoded, Gt06Error> {
        let buf = bytes(hex);
        match frame(&buf) {
            Framing::Frame { frame, len } => {
                assert_eq!(len, buf.len(), "{hex} is one frame");
                session.read(&frame, datetime!(2026-11-22 12:00 UTC))
            }
            other => panic!("{hex} is not a frame: {other:?}"),
        }
    }

    fn read(hex: &str) -> Decoded {
        read_with(&logged_in(), hex).unwrap()
    }

    fn fix(hex: &str) -> TrackerFix {
        match read(hex).message {
            Message::Fix(fix) => *fix,
            other => panic!("{hex} carries no fix: {other:?}"),
        }
    }

    /// Every piece `buf` is cut into: frames' protocols, and garbage by reason.
    fn cut(mut buf: &[u8]) -> (Vec<u8>, Vec<Garbage>) {
        let (mut frames, mut garbage) = (Vec::new(), Vec::new());
        loop {
            match frame(buf) {
                Framing::Frame { frame, len } => {
                    frames.push(frame.protocol);
                    buf = &buf[len..];
                }
                Framing::Garbage { reason, len } => {
                    garbage.push(reason);
                    buf = &buf[len..];
                }
                Framing::Incomplete { .. } => return (frames, garbage),
            }
        }
    }

    #[test]
    fn the_crc_is_crc_16_x_25() {
        // The catalogue's check value of CRC-16/X-25 (also called CRC-16/IBM-SDLC).
        assert_eq!(crc_x25(b"123456789"), 0x906E);
    }

    #[test]
    fn traccar_logins_give_the_imei_and_are_answered_with_their_serial() {
        #[rustfmt::skip]
        let cases = [
            ("78780D01086471700328358100093F040D0A", "864717003283581", None, "78780501000955940d0a"),
            ("78780D01012345678901234500018CDD0D0A", "123456789012345", None, "787805010001d9dc0d0a"),
            ("78780d0103534190360660610003c3df0d0a", "353419036066061", None, ""),
            // Newer units add a time zone: 0x000 east (UTC), 0x190 = 400 with the west bit: UTC-4.
            ("787811010863586038760942a0010000010aa4000d0a", "863586038760942", Some(offset!(UTC)), ""),
            ("787811010864717003664467100f190a0002c6d20d0a", "864717003664467", Some(offset!(-4)), ""),
        ];
        for (hex, imei, utc_offset, answer) in cases {
            let decoded = read_with(&Session::default(), hex).unwrap();
            let expected = Login {
                imei: imei.into(),
                utc_offset,
            };
            assert_eq!(decoded.message, Message::Login(expected), "{hex}");
            let serial = u16::from_be_bytes([bytes(hex)[bytes(hex).len() - 6], bytes(hex)[bytes(hex).len() - 5]]);
            assert_eq!(decoded.reply, Some(reply(LOGIN, serial, &[])), "{hex}");
            if !answer.is_empty() {
                assert_eq!(decoded.reply, Some(bytes(answer)), "{hex}");
            }
        }
    }

    #[test]
    fn a_packet_before_the_login_is_refused() {
        // Traccar's first vector: an empty 0x12 on a connection that has not logged in.
        let refused = read_with(&Session::default(), "787805120099abec0d0a");
        assert_eq!(refused, Err(Gt06Error::NotLoggedIn { protocol: GPS_LBS_1 }));
        let heartbeat = read_with(&Session::default(), "78780a130604ea04000006bc8a0d0a");
        assert_eq!(heartbeat, Err(Gt06Error::NotLoggedIn { protocol: STATUS }));
        // Once logged in, the same empty packet is a fix that can never be stored: answered, and a dead letter.
        let empty = fix("787805120099abec0d0a");
        assert!(empty.unreadable.is_some());
        assert_eq!(read("787805120099abec0d0a").reply, Some(reply(GPS_LBS_1, 0x0099, &[])));
    }

    /// Traccar's `verifyPosition` vectors of the packets read here (its test checks the time, a valid latitude and
    /// longitude, speed and course in range; one checks exact values): each decodes to the fix worked out by hand
    /// from its bytes, at `valid = positioned && satellites > 0`.
    #[test]
    fn traccar_location_vectors_decode_to_the_fixes_traccars_test_expects() {
        #[rustfmt::skip]
        let cases = [
            // Traccar's exact expectation: 2015-10-20 14:21:11, valid, 54.94535, 24.01762.
            ("78781f120f0a140e150bc505e51e780293a9e800540000f601006e0055da00035f240d0a",
             datetime!(2015-10-20 14:21:11 UTC), 54.945347, 24.017622, 0, 0, 5, true),
            ("787823120f081b121d37cb01c8e2cc08afd3c020d50201940701d600a1190041ee100576d1470d0a",
             datetime!(2015-08-27 18:29:55 UTC), 16.634709, 80.967076, 32, 258, 11, true),
            ("787819100b031a0b1b31cc027ac7fd0c4657bf0115210001001cc6070d0a",
             datetime!(2011-03-26 11:27:49 UTC), 23.111678, 114.409208, 1, 289, 12, true),
            ("787819100e010903230ec803ae32a60653cded00180000020072feb70d0a",
             datetime!(2014-01-09 03:35:14 UTC), -34.304377, -58.975278, 0, 0, 8, true),
            ("787821120c010c0f151fcf027ac8840c4657ec00140001cc00287d001f720001000f53a00d0a",
             datetime!(2012-01-12 15:21:31 UTC), 23.111753, 114.409233, 0, 0, 15, true),
            ("787825160b051b093523cf027ac8360c4657b30014000901cc00266a001e1740050400020008d7b10d0a",
             datetime!(2011-05-27 09:53:35 UTC), 23.111710, 114.409202, 0, 0, 15, true),
            ("7878471e0e03110b0511c501c664fd074db73f0218a602e003433a002fed40433a0056e14e433a0056104e433a0056fd53433a002eed55433a007e4b57433a002ee25aff00020120f6720d0a",
             datetime!(2014-03-17 11:05:17 UTC), -16.543998, -68.074275, 2, 166, 5, true),
            ("787822220e0914160f07c9021a362805090a7800d8b802d402c30e00a98a0105010213f4bb0d0a",
             datetime!(2014-09-20 22:15:07 UTC), -19.595684, -46.932547, 0, 184, 9, true),
            ("78781f12110819110216d402f250340828924055d4c801944600d300c09501429c830d0a",
             datetime!(2017-08-25 17:02:22 UTC), 27.463709, 76.042560, 85, 200, 4, true),
            ("78782516110819110208d402f264dc08289a4058d4c70901944600d300c0954606040600014057e90d0a",
             datetime!(2017-08-25 17:02:08 UTC), 27.466647, 76.043698, 88, 199, 4, true),
            ("787822220f0c1d023305c9027ac8180c46586000140001cc00287d001f71000001000820860d0a",
             datetime!(2015-12-29 02:51:05 UTC), 23.111693, 114.409298, 0, 0, 9, true),
            ("78782222120616083817c5050cc8c801a819d600152400e8011dbf003332000000004862500d0a",
             datetime!(2018-06-22 08:56:23 UTC), 47.068840, 15.441043, 0, 292, 5, true),
            ("7878353714080d05000ac500a886eb0b7522f000100001fe0a05ea004f1b000001002e0400002328003b0217c0003c0401020001002c468a0d0a",
             datetime!(2020-08-13 05:00:10 UTC), -6.135882, 106.792240, 0, 0, 5, true),
            ("7878251610051b0f1c34c5022515d504b5dcd20738080902d4022bdf009cba5006640201006759680d0a",
             datetime!(2016-05-27 15:28:52 UTC), -19.991585, -43.904117, 7, 8, 5, true),
            ("787821121303120b2524c70138e363085b549003d43301940057d200cd52c000006aa1ca0d0a",
             datetime!(2019-03-18 11:37:36 UTC), 11.391913, 77.890640, 3, 51, 7, true),
            ("787840a2180b0f0f3407cf00602cd208354064001c6a02dc650000698100000000095674c9114100002a04000100004b31000000000863829079286793020001a22a8f0d0a",
             datetime!(2024-11-15 15:52:07 UTC), 3.501628, -76.504233, 0, 106, 15, true),
            ("787840a218061b0e0f05cf021d22430aa2660b005c00014e140000026500000000024d4e02114504df06031c010007d00000000000086973105524576500c802a86fda0d0a",
             datetime!(2024-06-27 14:15:05 UTC), 19.702082, -99.119508, 0, 0, 15, true),
            ("787822221607160f1000cf0225e03f0bd723182c149701cc0075c300933301000002a5f0860d0a",
             datetime!(2022-07-22 15:16:00 UTC), 20.020373, 110.360333, 44, 151, 15, true),
            ("78782aa015041007350eca027ac8a20c4658be00140081cc00000000287d0000000002ea5e010004000009dffc0d0a",
             datetime!(2021-04-16 07:53:14 UTC), 23.111770, 114.409350, 0, 0, 10, true),
            ("78782111150b0b022c30c804b7af7808810cb0003c00012e02d075df0084890c000679950d0a",
             datetime!(2021-11-11 02:44:48 UTC), 43.970484, -79.263956, 0, 0, 8, true),
            ("78782727110c0b0e170f850450059107f461ae001c7e0a81360104cb8a00bef32806030c02ff000316b10d0a",
             datetime!(2017-12-11 14:23:15 UTC), 40.196205, -74.142390, 0, 126, 5, true),
            ("78782732180214123324ca0162bdf0041f45d900190b0a02d4000bc5270000ec025206040202005e07e10d0a",
             datetime!(2024-02-20 18:51:36 UTC), -12.915760, -38.421312, 0, 267, 10, true),
            ("78782ea4110c0c02281bf6026c18720c38d22800149c1181cc00010000260e000000000615f8012c05041102ff001058fd0d0a",
             datetime!(2017-12-12 02:40:27 UTC), 22.576988, 113.916893, 0, 156, 6, true),
            // Not flagged positioned.
            ("787822221106160a1016c60278019407c7783800040001940504700046fc01030100065f570d0a",
             datetime!(2017-06-22 10:16:22 UTC), 23.010642, 72.507196, 0, 0, 6, false),
            ("7878252612030c063816c3026c10540c38c9700144030901cc002866000eee0c06040302000da2db0d0a",
             datetime!(2018-03-12 06:56:22 UTC), 22.575833, 113.915653, 1, 3, 3, false),
            // Flagged positioned, with no satellites.
            ("78781f12110616091835d0024bb93007d3fb783dd4c501940500f2006c8504a6e0370d0a",
             datetime!(2017-06-22 09:24:53 UTC), 21.398356, 72.962769, 61, 197, 0, false),
            // Neither, at 0,0 (south: the north bit is not set either).
            ("78782322110c070f1b0270000000000000000000040081360104cb8a00bef3000000000523030d0a",
             datetime!(2017-12-07 15:27:02 UTC), -0.0, 0.0, 0, 0, 0, false),
        ];
        for (hex, at, lat, lon, speed, course, satellites, valid) in cases {
            let fix = fix(hex);
            assert_eq!(fix.device_id, IMEI);
            assert_eq!(fix.recorded_at, Some(at), "{hex}");
            assert!((fix.lat.unwrap() - lat).abs() < 1e-6, "{hex}: {:?}", fix.lat);
            assert!((fix.lon.unwrap() - lon).abs() < 1e-6, "{hex}: {:?}", fix.lon);
            assert_eq!(fix.speed_kmh, Some(f64::from(speed)), "{hex}");
            assert_eq!(fix.heading_deg, Some(f64::from(course)), "{hex}");
            assert_eq!(fix.attributes["sat"], json!(satellites), "{hex}");
            assert_eq!(fix.valid, valid, "{hex}");
            assert_eq!(fix.unreadable, None, "{hex}");
            assert_eq!(fix.attributes["type"], json!(bytes(hex)[3]), "{hex}");
            assert_eq!(fix.raw["frame"], json!(hex.to_ascii_lowercase()), "{hex}");
            let serial = &bytes(hex)[bytes(hex).len() - 6..bytes(hex).len() - 4];
            let serial = u16::from_be_bytes([serial[0], serial[1]]);
            assert_eq!(read(hex).reply, Some(reply(bytes(hex)[3], serial, &[])), "{hex}");
        }
    }

    /// Traccar's `verifyAttribute` vectors of the packets read here, with the attribute its test checks.
    #[test]
    fn traccar_attribute_vectors_give_the_attributes_traccars_test_checks() {
        #[rustfmt::skip]
        let cases = [
            // 0x16 SEEWORLD layout (4-byte cell id): battery, alarm.
            ("78782616170a080c0e24c0027c58ad0c2b8b0100454e0901cc0025030328e7a0005d4b13021ec373170d0a", "batt", json!(93)),
            ("787826161709130f3a2dcc02c55f2a089f9af9005c210901360481fe066d9b03413e420102035f92fe0d0a", "alarm", json!("sos")),
            ("78782f221709130f3a32cc02c55f2a089f9afc005c2101360481fe066d9b03000000000025d4000000000020002d036049d70d0a", "temp1", json!(0.32)),
            ("787829a01707150f2d0ecd01635100041e96d000087c02d4020000912e000000000718798d000e0006ed3ce50d0a", "ignition", json!(false)),
            // 0x16 VXT01 layout: the SOS is in the terminal information's alarm bits.
            ("7878241617070a150e24ca01fba0040780e177005c0001720253360027db6204e40400004bf1e90d0a", "alarm", json!("sos")),
            ("78782912170316053b3bcf015b51220af1201105d56100000000000000000000869c0130010000000238d1af0d0a", "drivingTime", json!(0)),
            ("78782526160913063918c002780fab0c44750f00040008027f14084c0038420600030c020007398e0d0a", "alarm", json!("tampering")),
            ("78782516160908063736c0006e70110442fc800000000800000000000000000300002512000473fb0d0a", "alarm", json!("tampering")),
            ("7878241216040e102c22cf00915ffb04c6016300195a02d402283b00753f400571040001dda4880d0a", "ignition", json!(false)),
            ("78782b1215050d03041bcf031ff30a0be795bc001c17014e14a065dd95314504b6040000001c00000cd90ab8fb6f0d0a", "temp1", json!(0x1c)),
            ("78784a1614051c150204ec02777e560c2a2a2a5314af000000000000040000000000000000000000000000000000000000000000000000000000000000000000000000007e061b0982004b24c00d0a", "batt", json!(100)),
            ("7878251613020c12141ac5027951430c2a16f60014000900000000001a00007c550300020002f1e70d0a", "alarm", json!("removing")),
            ("78782a31180613012b39cc0274c4dc050d7cd000180002d4000ac3c70dbdc4150100000000000002a6000ea40b0d0a", "altitude", json!(678)),
            ("7878281718060e021831c6026e8acc0c361b1000140001cc00286d000f4dbf0000012ca7e001000004b2630d0a", "driverUniqueId", json!("bf0000012ca7e001")),
            ("78782d16190c1d0e3b03cf026cc8d40c367d800014000801cc0025ef40e88c450604e801c3000001453f920100271e590d0a", "driverUniqueId", json!("c3000001453f9201")),
            ("78782d16190c1d0f0b07cf026cc89c0c367cf00014000801cc0025ef40e88c460604ea01c3000001453f9201000c103a0d0a", "event", json!(0xEA)),
            ("78782da41a0509160203cf05be31f80c306530001c0010012ed000007ef40000000006428b074205041302ff0009389c0d0a", "alarm", json!("tampering")),
        ];
        for (hex, name, value) in cases {
            let fix = fix(hex);
            assert_eq!(fix.attributes.get(name), Some(&value), "{hex}: {:?}", fix.attributes);
        }
        // `verifyAttributes`: the packet has attributes beyond its position.
        for hex in [
            "7878711213081f081d0fc6017ba3fa0ac62a923e550e02080503f300b26d000000004b20202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202030300017c7470d0a",
            "787825160f0c1d0a2b21c8027ac8040c46581000146f0901cc00287d001f714804040301001c84cf0d0a",
        ] {
            assert!(fix(hex).attributes.len() > 2, "{hex}");
        }
    }

    #[test]
    fn fields_past_the_content_are_not_read_from_the_serial_and_crc() {
        // Traccar's test expects altitude -31703 from this SL4X 0x32: its decoder reads past the content into
        // the CRC (0x8429) for it. Here the fix keeps what the content holds.
        let fix = fix("7878293218061301261ccd0274c4ad050d7c960018000a02d4000ac3c70dbdc40b46f004210202af001784290d0a");
        assert_eq!(fix.attributes.get("altitude"), None);
        assert_eq!(fix.attributes["mcc"], json!(724));
        assert!(fix.valid);
    }

    #[test]
    fn a_status_packet_reads_the_cell_tower_battery_signal_and_alarm() {
        // 0x16 of the standard layout: LBS length 9, MCC 460, MNC 0, LAC 0x266A, cell 0x1E17; terminal info 0x40
        // (GPS on, nothing else), voltage level 5 of 6, GSM signal 4, no alarm, language 2.
        let fix = fix("787825160B051B093523CF027AC8360C4657B30014000901CC00266A001E1740050400020008D7B10D0A");
        let expected = json!({
            "type": 0x16, "sat": 15, "mcc": 460, "mnc": 0, "lac": 0x266A, "cid": 0x1E17, "status": 0x40,
            "ignition": false, "charge": false, "blocked": false, "batt": 83, "rssi": 4,
        });
        assert_eq!(Value::Object(fix.attributes), expected);
    }

    #[test]
    fn heartbeats_and_other_packets_without_a_fix_are_answered_at_once() {
        for hex in [
            "78780a130604ea04000006bc8a0d0a",
            "7878131302801900002e42016f000000003a0177ef180d0a",
            "78780B23C00122040001000818720D0A",
            "78781219028f0a29e10036f12003040102000875dc0d0a",
        ] {
            let decoded = read(hex);
            let b = bytes(hex);
            assert_eq!(decoded.message, Message::NoFix, "{hex}");
            let serial = u16::from_be_bytes([b[b.len() - 6], b[b.len() - 5]]);
            assert_eq!(decoded.reply, Some(reply(b[3], serial, &[])), "{hex}");
        }
        assert_eq!(
            read("78780a130604ea04000006bc8a0d0a").reply,
            Some(bytes("7878051300069d4e0d0a"))
        );
        // Command answers are not answered; nor Traccar's 0x94 information packets.
        assert_eq!(read("78788b818300000000534545464e2626004f04220045042626262b37393035343031353534362626262626260410041b0415041a04210415041926262b373930363433333031313526260410043d044f26262b373936303437383430363426260412043e0432043026262b373932383834373738383126262626262626262626262626262626232300020022155d0d0a").reply, None);
        assert_eq!(read("7979000894000000000338ba0d0a").reply, None);
        // The Wi-Fi and cell-only 0xA2 of units other than LW4G holds no fix.
        assert_eq!(read("78787aa2110c0e06372c813601040000591200000000009d7c01040000591200000000009d7c01040000591200000000009d7c01040000591200000000009d7c01040000591200000000009d7c01040000591200000000009d7c01040000591200000000009d7c0104ff02001801eb4039d10000000000000004fabeb50d0a").message, Message::NoFix);
    }

    #[test]
    fn fix_packets_of_layouts_not_read_are_kept_whole_as_dead_letters_and_answered_as_traccar_answers_them() {
        // X1 GPS: Traccar returns its position without answering.
        let hex = "78783c34000000001106190336070903107d51084889b900152e0000000043b101940b00b10000480100000000050001a3422100000001000300011bdc7b5f0d0a";
        let x1 = read(hex);
        assert_eq!(x1.reply, None);
        let Message::Fix(fix) = x1.message else { panic!("a fix") };
        assert!(fix.unreadable.as_deref().unwrap().contains("0x34"));
        assert_eq!(fix.raw["frame"], json!(hex));
        // JC100 alarm: answered.
        let alarm = read("78780c95130a071223200100013ad10d0a");
        assert!(matches!(alarm.message, Message::Fix(fix) if fix.unreadable.is_some()));
        assert!(alarm.reply.is_some());
    }

    #[test]
    fn a_time_request_is_answered_with_the_gateways_utc_time() {
        let decoded = read("7878058A000688290D0A");
        assert_eq!(decoded.message, Message::NoFix);
        assert_eq!(decoded.reply, Some(reply(TIME_REQUEST, 0, &[26, 11, 22, 12, 0, 0])));
    }

    #[test]
    fn times_are_read_in_the_zone_the_login_declared() {
        let mut session = Session::default();
        let Message::Login(login) = read_with(&session, "787811010864717003664467100f190a0002c6d20d0a")
            .unwrap()
            .message
        else {
            panic!("a login")
        };
        session.log_in(login);
        let Message::Fix(fix) = read_with(
            &session,
            "78781f120f0a140e150bc505e51e780293a9e800540000f601006e0055da00035f240d0a",
        )
        .unwrap()
        .message
        else {
            panic!("a fix")
        };
        // 14:21:11 at UTC-4.
        assert_eq!(fix.recorded_at, Some(datetime!(2015-10-20 18:21:11 UTC)));
        assert_eq!(fix.device_id, "864717003664467");
    }

    #[test]
    fn a_fix_without_a_valid_date_is_unreadable_only_when_it_claims_a_position() {
        let mut content = bytes("0f0a140e150bc505e51e780293a9e800540000f601006e0055da00");
        content[1] = 13; // month 13
        let f = |content: &[u8]| {
            let buf = encode(false, GPS_LBS_1, content, 1);
            let Framing::Frame { frame, .. } = frame(&buf) else {
                panic!()
            };
            match logged_in()
                .read(&frame, datetime!(2026-11-22 12:00 UTC))
                .unwrap()
                .message
            {
                Message::Fix(fix) => *fix,
                other => panic!("{other:?}"),
            }
        };
        assert!(f(&content).unreadable.is_some());
        content[16] &= !0x10; // not positioned
        let fix = f(&content);
        assert_eq!((fix.unreadable, fix.valid, fix.recorded_at), (None, false, None));
    }

    #[test]
    fn a_fix_sent_again_as_a_re_upload_reads_the_same() {
        // Traccar's 0x22 vector, live (re-upload byte 0x00) and as its unit sends it again (0x01).
        let live = bytes("787822220e0914160f07c9021a362805090a7800d8b802d402c30e00a98a0105000213f4bb0d0a");
        let mut again = live.clone();
        again[32] = 0x01;
        let read = |frame: &[u8]| {
            let mut frame = frame.to_vec();
            let end = frame.len() - 4;
            let crc = crc_x25(&frame[2..end]);
            frame[end..end + 2].copy_from_slice(&crc.to_be_bytes());
            fix(&hex(&frame))
        };
        let (live, again) = (read(&live), read(&again));
        assert_eq!(live.attributes, again.attributes);
        assert_eq!(live.attributes["event"], json!(5));
    }

    #[test]
    fn ignition_in_the_course_word_is_read_when_the_unit_flags_it() {
        let mut content = bytes("0f0a140e150bc505e51e780293a9e800540000f601006e0055da00");
        content[16] |= 0x40 | 0x80;
        let buf = encode(false, GPS, &content[..18], 7);
        let Framing::Frame { frame, .. } = frame(&buf) else {
            panic!()
        };
        let Message::Fix(fix) = logged_in()
            .read(&frame, datetime!(2026-11-22 12:00 UTC))
            .unwrap()
            .message
        else {
            panic!()
        };
        assert_eq!(fix.attributes["ignition"], json!(true));
    }

    #[test]
    fn traccar_vectors_whose_crc_or_length_is_wrong_are_garbage_here() {
        #[rustfmt::skip]
        let cases: [(&str, &[Garbage]); 6] = [
            // A 0x27 and a 0xA4 whose alarm byte was edited without the CRC.
            ("78782627100419092d07c5027ac91c0c4658000005370900000000000000008002001900ff00004df60d0a", &[Garbage::BadCrc]),
            ("78782da4150817073b10cf032eea9c0b6ce0800015141001cc0100009a00000000000a6f24014605041900ff01908a640d0a", &[Garbage::BadCrc]),
            ("78781f120b081d112e10cc027ac7eb0c46584900148f01cc00287d001fb8000380810d0a", &[Garbage::BadCrc]),
            ("787811010123456789012345100B3201000171930D0A", &[Garbage::BadCrc]),
            // Lengths one short of the bytes sent: no stop bits where the length says, and no frame start after.
            ("78781511170103100e1f9904efe30400a97f88003410ffdd000d0a", &[Garbage::NoStop]),
            ("7878121011091c0b1b2999058508040097a89e0034520d0a", &[Garbage::NoStop]),
        ];
        for (hex, garbage) in cases {
            assert_eq!(cut(&bytes(hex)), (vec![], garbage.to_vec()), "{hex}");
        }
        // A login cut short: the length promises more than came, and the listener waits (then times out).
        assert_eq!(
            frame(&bytes("78780d010359339075005244340d0a")),
            Framing::Incomplete { len: Some(18) }
        );
    }

    #[test]
    fn frames_are_cut_from_a_stream_across_reads_and_past_garbage() {
        let login = bytes("78780D01086471700328358100093F040D0A");
        let fix = bytes("78781f120f0a140e150bc505e51e780293a9e800540000f601006e0055da00035f240d0a");
        let mut stream = b"\x00\x0d\x0aAT+".to_vec();
        stream.extend_from_slice(&login);
        stream.extend_from_slice(&fix);
        assert_eq!(cut(&stream), (vec![LOGIN, GPS_LBS_1], vec![Garbage::NoStart]));
        // Byte by byte: incomplete until the last byte of each frame.
        for end in 0..login.len() {
            let len = (end >= 3).then_some(login.len());
            assert_eq!(frame(&login[..end]), Framing::Incomplete { len }, "{end}");
        }
        // A bad CRC drops exactly its frame; the next one is read.
        let mut bad = fix.clone();
        bad[10] ^= 0x01;
        bad.extend_from_slice(&login);
        assert_eq!(cut(&bad), (vec![LOGIN], vec![Garbage::BadCrc]));
        // Extended frames.
        let extended = encode(true, HEARTBEAT, &[0x40, 0x04, 0x02], 0x0102);
        assert_eq!(cut(&extended), (vec![HEARTBEAT], vec![]));
    }

    #[test]
    fn length_fields_out_of_bounds_are_garbage_and_never_waited_for() {
        assert_eq!(
            frame(&bytes("7979ffff01")),
            Framing::Garbage {
                reason: Garbage::TooLong,
                len: 5
            }
        );
        assert_eq!(cut(&bytes("787801080d0a")), (vec![], vec![Garbage::TooShort]));
        // A start byte at the very end may be half of the next frame's start.
        assert_eq!(
            frame(&bytes("000078")),
            Framing::Garbage {
                reason: Garbage::NoStart,
                len: 2
            }
        );
    }

    #[test]
    fn replies_are_short_frames_with_the_crc_over_length_to_serial() {
        assert_eq!(reply(LOGIN, 0x0009, &[]), bytes("78780501000955940d0a"));
        assert_eq!(reply(GPS_LBS_1, 0x0003, &[]), bytes("787805120003903f0d0a"));
        let time = reply(TIME_REQUEST, 0, &[26, 11, 22, 12, 0, 0]);
        assert_eq!(cut(&time), (vec![TIME_REQUEST], vec![]));
    }

    proptest! {
        #[test]
        fn any_bytes_are_cut_without_panicking_and_always_move_on(buf in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut rest = &buf[..];
            loop {
                match frame(rest) {
                    Framing::Frame { len, .. } | Framing::Garbage { len, .. } => {
                        prop_assert!(len > 0 && len <= rest.len());
                        rest = &rest[len..];
                    }
                    Framing::Incomplete { .. } => {
                        prop_assert!(rest.len() < MAX_FRAME_BYTES);
                        break;
                    }
                }
            }
        }

        #[test]
        fn any_content_of_any_protocol_is_framed_back_and_read_without_panicking(
            extended in any::<bool>(),
            protocol in any::<u8>(),
            content in proptest::collection::vec(any::<u8>(), 0..200),
            serial in any::<u16>(),
        ) {
            let buf = encode(extended, protocol, &content, serial);
            let Framing::Frame { frame, len } = frame(&buf) else { panic!("not a frame") };
            prop_assert_eq!(len, buf.len());
            prop_assert_eq!((frame.extended, frame.protocol, frame.content, frame.serial), (extended, protocol, &content[..], serial));
            let _ = logged_in().read(&frame, datetime!(2026-11-22 12:00 UTC));
        }
    }
}
