//! Trackers' own protocols → location updates. Each protocol's module reads its client's request into
//! [`TrackerFix`]es, already in the stored units (km/h, degrees, metres, UTC); [`check`] then applies the same rules
//! as the native API and says, per fix, whether it is stored or can never be (a [`DeadLetter`]).
//!
//! - [`osmand`]: the OsmAnd protocol (Traccar Client, the OsmAnd app, GPSLogger): query, form or JSON.
//! - [`owntracks`]: OwnTracks in HTTP mode.
//! - [`overland`]: Overland's GeoJSON batches.
//! - [`traccar`]: a Traccar server's `forward.type=json`.
//! - [`teltonika`]: Teltonika units' binary AVL packets (Codec 8, 8 Extended, 16), read from TCP.
//! - [`gt06`]: GT06 (Concox and the units that copy it): binary frames read from TCP, and the replies the device
//!   waits for.
//!
//! Trackers retry a refused point forever, oldest first, so a fix that breaks a rule is not refused: it becomes a
//! dead letter and the request is answered as the client's success. Only what the client or its operator can fix
//! (no device id, a body that is not its protocol, auth, overload) is refused.

pub mod gt06;
pub mod osmand;
pub mod overland;
pub mod owntracks;
pub mod schema;
pub mod teltonika;
pub mod traccar;

use serde_json::{Map, Number, Value};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Duration, OffsetDateTime, PrimitiveDateTime};

use super::fields::unstorable;
use super::location::{is_valid_device_id, ACCURACY_M_RANGE, LAT_RANGE, LON_RANGE, SPEED_KMH_RANGE};
use super::{DeadLetter, LocationUpdate, Update, ValidationRules};

/// Kilometres per hour in one knot.
pub const KMH_PER_KNOT: f64 = 1.852;
/// Kilometres per hour in one metre per second.
pub const KMH_PER_MPS: f64 = 3.6;
/// The GPS week counter's span: a receiver whose firmware predates a rollover reports fixes this far back.
pub const GPS_WEEK_ROLLOVER: Duration = Duration::weeks(1024);
/// A dead letter keeps at most this much of the request's raw fields, as JSON.
const MAX_RAW_BYTES: usize = 8 * 1024;

/// The tracker protocols, each with its own route or TCP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Osmand,
    Owntracks,
    Overland,
    Traccar,
    /// Teltonika's binary protocol, on its own TCP listener (`INGEST_TELTONIKA_LISTEN`).
    Teltonika,
    /// GT06 (Concox and the units that copy it), on its own TCP listener (`INGEST_GT06_LISTEN`).
    Gt06,
}

impl Protocol {
    pub const ALL: [Protocol; 6] = [
        Protocol::Osmand,
        Protocol::Owntracks,
        Protocol::Overland,
        Protocol::Traccar,
        Protocol::Teltonika,
        Protocol::Gt06,
    ];

    /// The protocols hardware units speak over their own TCP connections rather than HTTP.
    pub const TCP: [Protocol; 2] = [Protocol::Teltonika, Protocol::Gt06];

    /// The name in routes, metric labels, `/stats` and `dead_letters.protocol`.
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Osmand => "osmand",
            Protocol::Owntracks => "owntracks",
            Protocol::Overland => "overland",
            Protocol::Traccar => "traccar",
            Protocol::Teltonika => "teltonika",
            Protocol::Gt06 => "gt06",
        }
    }
}

/// Why a fix can never be stored: the `reason` of its dead letter and of its metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Latitude or longitude not finite or out of range.
    BadCoordinates,
    /// Exactly `0,0`: what many devices send before they have a fix.
    NullIsland,
    /// The tracker itself says the fix is not valid (`valid=false`).
    FlaggedInvalid,
    /// Older than the allowed age (even once a GPS week rollover is undone) or too far in the future.
    OutsideTimeWindow,
    /// A field the gateway maps could not be read, or is out of its range.
    BadField,
    /// No latitude and longitude at all.
    NoPosition,
}

impl Rejection {
    pub const ALL: [Rejection; 6] = [
        Rejection::BadCoordinates,
        Rejection::NullIsland,
        Rejection::FlaggedInvalid,
        Rejection::OutsideTimeWindow,
        Rejection::BadField,
        Rejection::NoPosition,
    ];

    pub const fn code(self) -> &'static str {
        match self {
            Rejection::BadCoordinates => "bad_coordinates",
            Rejection::NullIsland => "null_island",
            Rejection::FlaggedInvalid => "flagged_invalid",
            Rejection::OutsideTimeWindow => "outside_time_window",
            Rejection::BadField => "bad_field",
            Rejection::NoPosition => "no_position",
        }
    }
}

/// Why a whole tracker request is refused: what its client or operator must fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrackerError {
    /// The body is not the protocol's JSON.
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The body is JSON, but not of the protocol's shape.
    #[error("{0}")]
    NotTheProtocol(String),
    /// Nothing names the device.
    #[error("no device id: {0}")]
    NoDevice(&'static str),
    /// The device id breaks the rule every stored id keeps.
    #[error("the device id {0:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ : -")]
    InvalidDevice(String),
    /// More fixes than one request may hold.
    #[error("more than {limit} fixes in one request")]
    TooManyFixes { limit: usize },
}

/// What a request brought besides its fixes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TrackerRequestOutcome {
    /// The fixes, in the order sent.
    pub fixes: Vec<TrackerFix>,
    /// Messages that are not fixes (an OwnTracks `lwt`, an Overland visit), by kind: answered, not stored.
    pub ignored: Vec<&'static str>,
}

/// Where the request came from, as far as the protocols read it: the transport's part, without any IO type.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrackerRequest<'a> {
    /// The URL's query string, undecoded (the API key already removed is not required: `key` is never mapped).
    pub query: &'a str,
    /// The body, decompressed.
    pub body: &'a [u8],
    /// `Content-Type` said JSON.
    pub json: bool,
    /// OwnTracks' `X-Limit-U` and `X-Limit-D` headers.
    pub limit_user: Option<&'a str>,
    pub limit_device: Option<&'a str>,
    /// The user of HTTP Basic, when the request carried it (GPSLogger, OwnTracks): a device id of last resort.
    pub basic_user: Option<&'a str>,
    /// Most fixes one request may hold.
    pub max_fixes: usize,
}

/// A fix as a tracker reported it, converted to the stored units, not yet checked against the rules.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackerFix {
    pub device_id: String,
    /// When the fix was taken; `None` when the tracker sent no time (the receive time is used, as Traccar does).
    pub recorded_at: Option<OffsetDateTime>,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    pub speed_kmh: Option<f64>,
    pub heading_deg: Option<f64>,
    pub accuracy_m: Option<f64>,
    /// `false` when the tracker flags the fix as not valid.
    pub valid: bool,
    /// Every field that maps to no column, under its own name, typed.
    pub attributes: Map<String, Value>,
    /// The first mapped field that could not be read: the fix is a dead letter.
    pub unreadable: Option<String>,
    /// The request's raw fields, for a dead letter.
    pub raw: RawFields,
}

/// A fix's raw fields as the request carried them, turned into JSON only if the fix becomes a dead letter: most
/// fixes are stored, and would pay for a copy nobody reads.
#[derive(Debug, Clone, PartialEq)]
pub enum RawFields {
    Json(Value),
    /// Named fields in the order sent (a query string, a form); a name may repeat.
    Pairs(Vec<(String, Value)>),
}

impl RawFields {
    /// The fields as one JSON object (a repeated name holds the list of its values).
    pub fn to_json(&self) -> String {
        match self {
            RawFields::Json(value) => value.to_string(),
            RawFields::Pairs(pairs) => {
                let mut map = Map::new();
                for (name, value) in pairs {
                    keep_every_value(&mut map, name, value.clone());
                }
                Value::Object(map).to_string()
            }
        }
    }
}

/// The first raw field of that name (`Null` when there is none), as `serde_json::Value` indexes objects.
impl std::ops::Index<&str> for RawFields {
    type Output = Value;

    fn index(&self, name: &str) -> &Value {
        static NULL: Value = Value::Null;
        match self {
            RawFields::Json(value) => &value[name],
            RawFields::Pairs(pairs) => pairs.iter().find(|(n, _)| n == name).map_or(&NULL, |(_, v)| v),
        }
    }
}

/// Adds `value` under `name`; a name sent again (`cell` and `wifi` may repeat, as Traccar reads them) makes a list
/// of every value, in the order sent.
pub fn keep_every_value(map: &mut Map<String, Value>, name: &str, value: Value) {
    match map.get_mut(name) {
        Some(Value::Array(list)) => list.push(value),
        Some(first) => *first = Value::Array(vec![first.take(), value]),
        None => {
            map.insert(name.to_owned(), value);
        }
    }
}

impl TrackerFix {
    pub fn new(device_id: String, raw: Value) -> Self {
        TrackerFix {
            device_id,
            recorded_at: None,
            lat: None,
            lon: None,
            speed_kmh: None,
            heading_deg: None,
            accuracy_m: None,
            valid: true,
            attributes: Map::new(),
            unreadable: None,
            raw: RawFields::Json(raw),
        }
    }

    /// Records that `field` could not be read; the first such field is the one a dead letter names.
    pub fn unreadable(&mut self, field: &str, why: &str) {
        if self.unreadable.is_none() {
            self.unreadable = Some(format!("`{field}` {why}"));
        }
    }

    /// A number, from a JSON number or a numeric string; anything else marks `field` unreadable.
    pub fn number(&mut self, field: &str, value: &Value) -> Option<f64> {
        match value {
            Value::Null => None,
            Value::Number(n) => n.as_f64(),
            Value::String(s) if s.trim().is_empty() => None,
            Value::String(s) => match s.trim().parse::<f64>() {
                Ok(n) if n.is_finite() => Some(n),
                _ => {
                    self.unreadable(field, "is not a number");
                    None
                }
            },
            _ => {
                self.unreadable(field, "is not a number");
                None
            }
        }
    }

    /// A speed or a heading, where a negative value (trackers send `-1`) means unknown.
    pub fn known(&mut self, field: &str, value: &Value) -> Option<f64> {
        self.number(field, value).filter(|n| *n >= 0.0)
    }

    /// A boolean as trackers write it: `true`/`false`, `1`/`0`, or a JSON boolean.
    pub fn boolean(&mut self, field: &str, value: &Value) -> Option<bool> {
        match value {
            Value::Bool(b) => Some(*b),
            Value::Number(n) => Some(n.as_f64() != Some(0.0)),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" => Some(true),
                "false" | "0" => Some(false),
                _ => {
                    self.unreadable(field, "is not true or false");
                    None
                }
            },
            _ => {
                self.unreadable(field, "is not true or false");
                None
            }
        }
    }

    /// A time as the OsmAnd protocol writes it; a value that is no time marks `field` unreadable.
    pub fn time(&mut self, field: &str, value: &Value) -> Option<OffsetDateTime> {
        let parsed = match value {
            Value::Null => return None,
            Value::Number(n) => n.as_f64().and_then(unix_seconds_or_millis),
            Value::String(s) => parse_time(s),
            _ => None,
        };
        if parsed.is_none() {
            self.unreadable(field, "is not a time");
        }
        parsed
    }

    /// Keeps `value` as an attribute named `name`.
    pub fn attribute(&mut self, name: &str, value: Value) {
        self.attributes.insert(name.to_owned(), value);
    }
}

/// The fields of a query string or a form body (`a=1&b=x+y`), decoded as browsers encode them: `+` is a space and
/// `%XX` a byte, invalid UTF-8 replaced. A field without `=` has an empty value. Most values are plain digits, so
/// only the text that holds an escape is copied through the decoder.
pub fn form_fields(text: &[u8]) -> impl Iterator<Item = (String, String)> + '_ {
    fn decode(bytes: &[u8]) -> String {
        if !bytes.iter().any(|b| matches!(b, b'%' | b'+')) {
            return String::from_utf8_lossy(bytes).into_owned();
        }
        let spaced: Vec<u8> = bytes.iter().map(|b| if *b == b'+' { b' ' } else { *b }).collect();
        percent_encoding::percent_decode(&spaced)
            .decode_utf8_lossy()
            .into_owned()
    }
    text.split(|b| *b == b'&').filter(|pair| !pair.is_empty()).map(|pair| {
        let (name, value) = match pair.iter().position(|b| *b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &b""[..]),
        };
        (decode(name), decode(value))
    })
}

/// A value sent as text (a query or form field), typed as Traccar types its attributes: a number if it reads as
/// one, then a boolean, else the text.
pub fn typed(text: &str) -> Value {
    if let Ok(n) = text.parse::<i64>() {
        return Value::Number(n.into());
    }
    if let Some(n) = text.parse::<f64>().ok().and_then(Number::from_f64) {
        return Value::Number(n);
    }
    match text {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::String(text.to_owned()),
    }
}

/// Unix time as the OsmAnd protocol sends it: seconds below 2^31, milliseconds above
/// (traccar/traccar `OsmAndProtocolDecoder.java`).
fn unix_seconds_or_millis(n: f64) -> Option<OffsetDateTime> {
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let nanos = if n < 2_147_483_648.0 { n * 1e9 } else { n * 1e6 };
    OffsetDateTime::from_unix_timestamp_nanos(nanos.round() as i128).ok()
}

/// A time as trackers send it: Unix seconds or milliseconds, ISO 8601 (an offset, or none for UTC), or
/// `yyyy-MM-dd HH:mm:ss`, read as UTC (Traccar reads it in its server's zone; a gateway has no zone to guess).
pub fn parse_time(text: &str) -> Option<OffsetDateTime> {
    let text = text.trim();
    if let Ok(n) = text.parse::<f64>() {
        return unix_seconds_or_millis(n);
    }
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(at);
    }
    // Overland (Apple's ISO 8601 formatter) writes the offset without a colon: `2015-10-01T08:00:00-0700`.
    let compact_offset = format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]][offset_hour sign:mandatory][offset_minute]"
    );
    if let Ok(at) = OffsetDateTime::parse(text, compact_offset) {
        return Some(at);
    }
    let iso = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]");
    let sql = format_description!("[year]-[month]-[day] [hour]:[minute]:[second][optional [.[subsecond]]]");
    PrimitiveDateTime::parse(text, iso)
        .or_else(|_| PrimitiveDateTime::parse(text, sql))
        .ok()
        .map(PrimitiveDateTime::assume_utc)
}

/// The device id a request names, checked: what scopes and the natural key are about. The candidates are tried
/// in order, and the first valid one is taken (an OwnTracks topic with a space in it falls back to the `tid`);
/// when none is valid, the first one sent is named in the refusal.
pub fn device_id(candidates: &[Option<&str>], missing: &'static str) -> Result<String, TrackerError> {
    let mut sent = candidates.iter().flatten().map(|s| s.trim()).filter(|s| !s.is_empty());
    let first = sent.next().ok_or(TrackerError::NoDevice(missing))?;
    std::iter::once(first)
        .chain(sent)
        .find(|id| is_valid_device_id(id))
        .map(str::to_owned)
        .ok_or_else(|| TrackerError::InvalidDevice(first.chars().take(80).collect()))
}

/// What [`check`] made of a fix.
#[derive(Debug, Clone, PartialEq)]
pub enum Checked {
    /// Stored; `time_repaired` when its time was moved 1024 GPS weeks forward.
    Stored {
        update: LocationUpdate,
        time_repaired: bool,
    },
    /// Can never be stored.
    Rejected { letter: DeadLetter, rejection: Rejection },
}

/// Applies the native API's rules to a tracker's fix. `rules.now` is the receive time.
pub fn check(fix: TrackerFix, protocol: Protocol, rules: &ValidationRules) -> Checked {
    let now = rules.now;
    let reject = |fix: TrackerFix, rejection: Rejection, message: String| {
        let mut payload = fix.raw.to_json();
        if payload.len() > MAX_RAW_BYTES {
            let mut end = MAX_RAW_BYTES;
            while !payload.is_char_boundary(end) {
                end -= 1;
            }
            payload = serde_json::json!({"truncated": true, "prefix": &payload[..end]}).to_string();
        }
        Checked::Rejected {
            letter: DeadLetter {
                stream: <LocationUpdate as Update>::STREAM.to_owned(),
                protocol: protocol.name().to_owned(),
                reason: rejection.code().to_owned(),
                message,
                device_id: Some(fix.device_id),
                payload,
                received_at: now,
            },
            rejection,
        }
    };
    if let Some(why) = fix.unreadable.clone() {
        return reject(fix, Rejection::BadField, why);
    }
    let (Some(lat), Some(lon)) = (fix.lat, fix.lon) else {
        return reject(
            fix,
            Rejection::NoPosition,
            "the fix has no latitude and longitude".into(),
        );
    };
    if !fix.valid {
        return reject(
            fix,
            Rejection::FlaggedInvalid,
            "the tracker flags the fix as not valid".into(),
        );
    }
    if !LAT_RANGE.contains(lat) || !LON_RANGE.contains(lon) {
        return reject(
            fix,
            Rejection::BadCoordinates,
            format!("latitude {lat} or longitude {lon} is out of range"),
        );
    }
    if lat == 0.0 && lon == 0.0 {
        return reject(
            fix,
            Rejection::NullIsland,
            "latitude and longitude are both 0, what trackers send without a fix".into(),
        );
    }
    let earliest = now - rules.max_age;
    let latest = now + rules.max_future_skew;
    let mut recorded_at = fix.recorded_at.unwrap_or(now);
    let mut time_repaired = false;
    if recorded_at < earliest {
        let repaired = recorded_at + GPS_WEEK_ROLLOVER;
        if (earliest..=latest).contains(&repaired) {
            recorded_at = repaired;
            time_repaired = true;
        }
    }
    if !(earliest..=latest).contains(&recorded_at) {
        return reject(
            fix,
            Rejection::OutsideTimeWindow,
            format!(
                "the fix time {} is outside the allowed window",
                recorded_at.format(&Rfc3339).unwrap_or_default()
            ),
        );
    }
    let speed_kmh = fix.speed_kmh;
    if speed_kmh.is_some_and(|s| !SPEED_KMH_RANGE.contains(s)) {
        return reject(fix, Rejection::BadField, "the speed is over 400 km/h".into());
    }
    // 360° is north as much as 0° is; trackers send either.
    let heading_deg = fix.heading_deg.map(|h| if h == 360.0 { 0.0 } else { h });
    if heading_deg.is_some_and(|h| h >= 360.0) {
        return reject(fix, Rejection::BadField, "the heading is 360 degrees or more".into());
    }
    // Trackers send 0 (and negative values) for "no accuracy": Traccar Client's legacy app does for every GPS fix
    // (traccar/traccar-client-android `Position.kt`).
    let accuracy_m = fix.accuracy_m.filter(|a| *a > 0.0);
    if accuracy_m.is_some_and(|a| !ACCURACY_M_RANGE.contains(a)) {
        return reject(fix, Rejection::BadField, "the accuracy is over 100 km".into());
    }
    if unstorable(&fix.device_id).is_some() {
        return reject(fix, Rejection::BadField, "the device id holds a NUL character".into());
    }
    let attributes = if fix.attributes.is_empty() {
        None
    } else {
        let json = Value::Object(fix.attributes.clone()).to_string();
        if json.len() > rules.max_attributes_bytes {
            return reject(
                fix,
                Rejection::BadField,
                format!(
                    "the unmapped fields take {} bytes as JSON; at most {} are kept",
                    json.len(),
                    rules.max_attributes_bytes
                ),
            );
        }
        if json.contains("\\u0000") {
            return reject(fix, Rejection::BadField, "a field holds a NUL character".into());
        }
        Some(json)
    };
    Checked::Stored {
        update: LocationUpdate {
            device_id: fix.device_id,
            recorded_at,
            lat,
            lon,
            speed_kmh,
            heading_deg,
            accuracy_m,
            attributes,
            received_at: now,
        },
        time_repaired,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-22 12:00 UTC);

    fn fix(lat: f64, lon: f64) -> TrackerFix {
        let mut f = TrackerFix::new("truck-1".into(), serde_json::json!({"lat": lat, "lon": lon}));
        f.lat = Some(lat);
        f.lon = Some(lon);
        f
    }

    fn rejection(f: TrackerFix) -> Option<Rejection> {
        match check(f, Protocol::Osmand, &ValidationRules::with_defaults(NOW)) {
            Checked::Stored { .. } => None,
            Checked::Rejected { rejection, .. } => Some(rejection),
        }
    }

    #[test]
    fn times_are_read_in_every_form_the_osmand_protocol_allows() {
        let at = datetime!(2016-01-27 18:55:47 UTC);
        assert_eq!(parse_time("1453920947"), Some(at));
        assert_eq!(parse_time("1453920947000"), Some(at));
        assert_eq!(parse_time("2016-01-27T18:55:47Z"), Some(at));
        assert_eq!(parse_time("2016-01-27T19:55:47+01:00"), Some(at));
        assert_eq!(parse_time("2016-01-27T18:55:47"), Some(at));
        assert_eq!(parse_time("2016-01-27 18:55:47"), Some(at));
        assert_eq!(parse_time("2016-01-27T10:55:47-0800"), Some(at));
        assert_eq!(
            parse_time("2025-06-15T13:45:12.862Z"),
            Some(datetime!(2025-06-15 13:45:12.862 UTC))
        );
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn a_fix_without_a_time_is_taken_at_the_receive_time() {
        match check(fix(1.0, 2.0), Protocol::Osmand, &ValidationRules::with_defaults(NOW)) {
            Checked::Stored { update, time_repaired } => {
                assert_eq!(update.recorded_at, NOW);
                assert!(!time_repaired);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fix_1024_weeks_behind_is_moved_forward_and_said_so() {
        let mut f = fix(1.0, 2.0);
        f.recorded_at = Some(NOW - Duration::hours(1) - GPS_WEEK_ROLLOVER);
        match check(f, Protocol::Owntracks, &ValidationRules::with_defaults(NOW)) {
            Checked::Stored { update, time_repaired } => {
                assert_eq!(update.recorded_at, NOW - Duration::hours(1));
                assert!(time_repaired);
            }
            other => panic!("{other:?}"),
        }
        let mut f = fix(1.0, 2.0);
        f.recorded_at = Some(NOW - Duration::days(400));
        assert_eq!(rejection(f), Some(Rejection::OutsideTimeWindow));
    }

    #[test]
    fn fixes_that_can_never_be_stored_say_why() {
        assert_eq!(rejection(fix(0.0, 0.0)), Some(Rejection::NullIsland));
        assert_eq!(rejection(fix(91.0, 0.0)), Some(Rejection::BadCoordinates));
        assert_eq!(rejection(fix(f64::NAN, 0.0)), Some(Rejection::BadCoordinates));
        let mut f = fix(1.0, 1.0);
        f.valid = false;
        assert_eq!(rejection(f), Some(Rejection::FlaggedInvalid));
        let mut f = fix(1.0, 1.0);
        f.number("speed", &Value::String("fast".into()));
        assert_eq!(rejection(f), Some(Rejection::BadField));
        let mut f = fix(1.0, 1.0);
        f.lat = None;
        assert_eq!(rejection(f), Some(Rejection::NoPosition));
        let mut f = fix(1.0, 1.0);
        f.recorded_at = Some(NOW + Duration::hours(1));
        assert_eq!(rejection(f), Some(Rejection::OutsideTimeWindow));
        assert_eq!(rejection(fix(0.0, 1.0)), None);
    }

    #[test]
    fn a_dead_letter_keeps_the_raw_fields_the_reason_and_the_device() {
        match check(fix(0.0, 0.0), Protocol::Traccar, &ValidationRules::with_defaults(NOW)) {
            Checked::Rejected { letter, .. } => {
                assert_eq!(letter.protocol, "traccar");
                assert_eq!(letter.reason, "null_island");
                assert_eq!(letter.device_id.as_deref(), Some("truck-1"));
                assert_eq!(letter.stream, "location");
                assert_eq!(letter.payload, r#"{"lat":0.0,"lon":0.0}"#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn form_fields_are_decoded_as_browsers_encode_them() {
        let fields: Vec<(String, String)> =
            form_fields(b"id=t%201&time=2016-01-27+18%3A55%3A47&flag&&=x&bad=%ff").collect();
        assert_eq!(
            fields,
            [
                ("id", "t 1"),
                ("time", "2016-01-27 18:55:47"),
                ("flag", ""),
                ("", "x"),
                ("bad", "\u{fffd}"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn text_values_are_typed_as_traccar_types_them() {
        assert_eq!(typed("933"), serde_json::json!(933));
        assert_eq!(typed("24.5"), serde_json::json!(24.5));
        assert_eq!(typed("true"), serde_json::json!(true));
        assert_eq!(typed("on"), serde_json::json!("on"));
    }
}
