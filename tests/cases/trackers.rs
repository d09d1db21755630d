//! The requests real trackers send to the tracker routes, each with the row (or dead letter) it must leave: read by
//! `api/trackers.rs`, which sends every request's bytes to a gateway over a plain TCP connection.
//!
//! Every request is what its client puts on the wire, taken from the client's or its server's own source (named in
//! `source` as `repository:path`). Only these parts are changed, and the test fills them in:
//! - **Times.** The published vectors carry times of 2013–2025, outside the window the gateway stores (30 days back),
//!   so each time value is a placeholder that the test replaces with a recent time *in the same format*:
//!   `{unix_s}` (epoch seconds), `{unix_ms}` (epoch milliseconds), `{iso}` (`2024-05-01T10:20:30Z`), `{iso_ms}`
//!   (`…30.862Z`), `{iso_enc}` (the ISO time URL-encoded as the original was: `10%3A20%3A30Z`), `{sql_enc}`
//!   (`yyyy-MM-dd HH:mm:ss` form-encoded: `2024-05-01+10%3A20%3A30`), `{iso_0700}` (Overland's README form,
//!   `2024-05-01T03:20:30-0700`), `{jackson}` (what Traccar's Jackson writes: `…30.862+00:00`), `{date}`
//!   (`2024-05-01`) and `{unix_s_wnro}` (epoch seconds 1024 weeks early: a GPS week rollover). `{name+N}` and
//!   `{name-N}` are the same time N seconds later or earlier, for requests that carry several times.
//! - **`{host}`** is the address the test connects to, as a client configured with the gateway's URL sends it.
//! - **`{content_length}`** is the body's length once the times are filled in (a time may change it).
//! - **The path** is the gateway's route (`/api/v1/osmand`, …) where the client had its server's (`/`, `/pub`).
//! - **Framing.** The request head is written with `\n` and sent with `\r\n`; the body, after the blank line, is sent
//!   as written. Where a source gives only the URL or the body (a decoder's test), the head around it is the one its
//!   client sends (method, `User-Agent`, `Content-Type` as that client's HTTP library sets them).
//!
//! Any other change to a vector is said in its comment.

use time::{Duration, OffsetDateTime, UtcOffset};

/// The tracker routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Osmand,
    Owntracks,
    Overland,
    Traccar,
}

impl Protocol {
    pub const ALL: [Protocol; 4] = [
        Protocol::Osmand,
        Protocol::Owntracks,
        Protocol::Overland,
        Protocol::Traccar,
    ];

    /// The name in the route, the metric labels and `dead_letters.protocol`.
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Osmand => "osmand",
            Protocol::Owntracks => "owntracks",
            Protocol::Overland => "overland",
            Protocol::Traccar => "traccar",
        }
    }

    pub const fn path(self) -> &'static str {
        match self {
            Protocol::Osmand => "/api/v1/osmand",
            Protocol::Owntracks => "/api/v1/owntracks",
            Protocol::Overland => "/api/v1/overland",
            Protocol::Traccar => "/api/v1/traccar",
        }
    }

    /// The body of the answer the client counts as success (status 200): `None` for an empty body, else JSON.
    pub const fn success_body(self) -> Option<&'static str> {
        match self {
            Protocol::Osmand | Protocol::Traccar => None,
            Protocol::Owntracks => Some("[]"),
            Protocol::Overland => Some(r#"{"result":"ok"}"#),
        }
    }
}

/// When a stored row says the fix was taken.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Time {
    /// The case's time, moved by `offset_s` seconds (the same offset as the placeholder that carried it).
    Sent { offset_s: i64 },
    /// The request named no time: the gateway's clock when it received it.
    Received,
}

/// The case's time, as carried by an unshifted placeholder.
pub const SENT: Time = Time::Sent { offset_s: 0 };

/// What a nullable number column must hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Col {
    Null,
    Is(f64),
    /// Not asserted by the table: a test of its own says what the column must hold.
    Unchecked,
}

/// A row `location_updates` must hold after the request.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub device_id: &'static str,
    pub time: Time,
    pub lat: f64,
    pub lon: f64,
    pub speed_kmh: Col,
    pub heading_deg: Col,
    pub accuracy_m: Col,
    /// A JSON object: each key must be in the row's `attributes` with this value (numbers within a small
    /// tolerance), or, when the value is `null`, must not be there. Keys not named are not asserted.
    pub attributes: &'static str,
}

/// A row `dead_letters` must hold after the request.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter {
    pub device_id: &'static str,
    pub reason: &'static str,
    /// Text the stored `payload` (as JSON text) must contain: the raw fields are kept.
    pub payload_has: &'static str,
}

/// What the gateway must do with the request.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Answered as the client's success, leaving exactly these rows and dead letters.
    Answered {
        rows: &'static [Row],
        dead_letters: &'static [DeadLetter],
    },
    /// Refused with this status, storing nothing: something only the client's operator can fix.
    Refused { status: u16 },
}

/// One request a tracker sends, and what it must leave.
#[derive(Debug, Clone, Copy)]
pub struct TrackerCase {
    pub name: &'static str,
    /// `repository:path` of the vector.
    pub source: &'static str,
    pub protocol: Protocol,
    /// Whether the case's time has a milliseconds part: only where every time the rows are read from carries
    /// milliseconds, so that a time written in whole seconds is still the exact time expected.
    pub millis: bool,
    /// The request as sent, with the placeholders of the header comment.
    pub request: &'static str,
    pub outcome: Outcome,
}

impl TrackerCase {
    pub fn rows(&self) -> &'static [Row] {
        match self.outcome {
            Outcome::Answered { rows, .. } => rows,
            Outcome::Refused { .. } => &[],
        }
    }

    pub fn dead_letters(&self) -> &'static [DeadLetter] {
        match self.outcome {
            Outcome::Answered { dead_letters, .. } => dead_letters,
            Outcome::Refused { .. } => &[],
        }
    }

    /// The case's time for a run at `now`: whole seconds unless [`TrackerCase::millis`].
    pub fn instant(&self, base: OffsetDateTime) -> OffsetDateTime {
        let whole = base.replace_nanosecond(0).expect("zero nanoseconds are valid");
        if self.millis {
            whole + Duration::milliseconds(862)
        } else {
            whole
        }
    }

    /// The bytes to send: placeholders filled with `at` and `host`, the head's lines ended with CRLF.
    pub fn render(&self, at: OffsetDateTime, host: &str) -> Vec<u8> {
        render(self.request, at, host)
    }

    /// When `row` says the fix was taken, for a request rendered with `at` (`None`: the receive time).
    pub fn expected_time(row: &Row, at: OffsetDateTime) -> Option<OffsetDateTime> {
        match row.time {
            Time::Sent { offset_s } => Some(at + Duration::seconds(offset_s)),
            Time::Received => None,
        }
    }
}

/// Fills a request template (see the header comment) and frames it.
pub fn render(template: &str, at: OffsetDateTime, host: &str) -> Vec<u8> {
    let (head, body) = template
        .split_once("\n\n")
        .unwrap_or_else(|| panic!("a request template needs a blank line after its head: {template}"));
    let body = fill(body, at, host, None);
    let head = fill(head, at, host, Some(body.len()));
    let mut bytes = head.replace('\n', "\r\n").into_bytes();
    bytes.extend_from_slice(b"\r\n\r\n");
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

/// Replaces every known `{placeholder}` of `text`; anything else between braces (JSON) is left alone.
fn fill(text: &str, at: OffsetDateTime, host: &str, content_length: Option<usize>) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let replaced = after.find('}').and_then(|close| {
            let name = &after[..close];
            let value = match name {
                "host" => Some(host.to_owned()),
                "content_length" => content_length.map(|n| n.to_string()),
                _ => time_placeholder(name, at),
            };
            value.map(|v| (v, close))
        });
        match replaced {
            Some((value, close)) => {
                out.push_str(&value);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `name`, `name+N` or `name-N` rendered at `at` (+/- N seconds), or `None` if it is no time placeholder.
fn time_placeholder(spec: &str, at: OffsetDateTime) -> Option<String> {
    let (name, offset) = match spec.find(['+', '-']) {
        Some(i) => (&spec[..i], spec[i..].parse::<i64>().ok()?),
        None => (spec, 0),
    };
    let t = at + Duration::seconds(offset);
    let utc = t.to_offset(UtcOffset::UTC);
    let (date, clock) = (
        format!("{:04}-{:02}-{:02}", utc.year(), u8::from(utc.month()), utc.day()),
        format!("{:02}:{:02}:{:02}", utc.hour(), utc.minute(), utc.second()),
    );
    let ms = format!("{:03}", utc.millisecond());
    Some(match name {
        "unix_s" => t.unix_timestamp().to_string(),
        "unix_ms" => (t.unix_timestamp_nanos() / 1_000_000).to_string(),
        "unix_s_wnro" => (t - Duration::weeks(1024)).unix_timestamp().to_string(),
        "iso" => format!("{date}T{clock}Z"),
        "iso_ms" => format!("{date}T{clock}.{ms}Z"),
        "iso_enc" => format!("{date}T{}Z", clock.replace(':', "%3A")),
        "sql_enc" => format!("{date}+{}", clock.replace(':', "%3A")),
        "jackson" => format!("{date}T{clock}.{ms}+00:00"),
        "date" => date,
        "iso_0700" => {
            let local = t.to_offset(UtcOffset::from_hms(-7, 0, 0).expect("-07:00 is a valid offset"));
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}-0700",
                local.year(),
                u8::from(local.month()),
                local.day(),
                local.hour(),
                local.minute(),
                local.second()
            )
        }
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------------------------
// The head each client's HTTP library sends, around a decoder test's URL or body.

/// The OsmAnd app's live monitoring (Android `HttpURLConnection`, a GET), the client of Traccar's query vectors.
macro_rules! osmand_app_get {
    ($query:literal) => {
        concat!(
            "GET /api/v1/osmand",
            $query,
            " HTTP/1.1\nUser-Agent: OsmAnd~ 4.8.6\nHost: {host}\nConnection: Keep-Alive\nAccept-Encoding: gzip\n\n"
        )
    };
}

/// Traccar Client 9.x (transistorsoft background geolocation on OkHttp): one location, JSON.
macro_rules! traccar_client_9_json {
    ($body:literal) => {
        concat!(
            "POST /api/v1/osmand HTTP/1.1\nContent-Type: application/json; charset=utf-8\nContent-Length: \
             {content_length}\nHost: {host}\nConnection: Keep-Alive\nAccept-Encoding: gzip\nUser-Agent: \
             okhttp/4.12.0\n\n",
            $body
        )
    };
}

/// OwnTracks for Android in HTTP mode with no identification set (OkHttp): no `X-Limit-*` headers.
macro_rules! owntracks_android_anonymous {
    ($body:literal) => {
        concat!(
            "POST /api/v1/owntracks HTTP/1.1\nUser-Agent: Owntracks-Android/gms/420412000\nContent-Type: \
             application/json; charset=utf-8\nContent-Length: {content_length}\nHost: {host}\nConnection: \
             Keep-Alive\nAccept-Encoding: gzip\n\n",
            $body
        )
    };
}

/// OwnTracks for Android in HTTP mode with user `jane`, password `secret` and device `nokia` set, as
/// `HttpMessageProcessorEndpoint.getRequest` adds them before OkHttp's own headers.
macro_rules! owntracks_android_identified {
    ($body:literal) => {
        concat!(
            "POST /api/v1/owntracks HTTP/1.1\nUser-Agent: Owntracks-Android/gms/420412000\nAuthorization: Basic \
             amFuZTpzZWNyZXQ=\nX-Limit-U: jane\nX-Limit-D: nokia\nContent-Type: application/json; \
             charset=utf-8\nContent-Length: {content_length}\nHost: {host}\nConnection: Keep-Alive\n\
             Accept-Encoding: gzip\n\n",
            $body
        )
    };
}

/// OwnTracks for iOS (NSURLSession): the device is named only by `topic` in the body.
macro_rules! owntracks_ios {
    ($body:literal) => {
        concat!(
            "POST /api/v1/owntracks HTTP/1.1\nHost: {host}\nContent-Type: application/json\nAccept: */*\n\
             User-Agent: OwnTracks/18.3.2 CFNetwork/1568.100.1 Darwin/24.0.0\nAccept-Language: en-GB,en;q=0.9\n\
             Content-Length: {content_length}\nAccept-Encoding: gzip, deflate, br\nConnection: keep-alive\n\n",
            $body
        )
    };
}

/// Overland for iOS (AFNetworking's JSON serializer), with an access token set.
macro_rules! overland_ios {
    ($body:literal) => {
        concat!(
            "POST /api/v1/overland HTTP/1.1\nHost: {host}\nContent-Type: application/json\nAccept: */*\n\
             Authorization: Bearer xxxxxx\nAccept-Language: en-GB;q=1\nUser-Agent: Overland/7.3 (iPhone; iOS \
             17.5.1; Scale/3.00)\nContent-Length: {content_length}\nAccept-Encoding: gzip, deflate, br\n\
             Connection: keep-alive\n\n",
            $body
        )
    };
}

/// A Traccar server's `forward.type=json` (Jersey over `HttpURLConnection`).
macro_rules! traccar_forward {
    ($body:literal) => {
        concat!(
            "POST /api/v1/traccar HTTP/1.1\nContent-Type: application/json\nUser-Agent: Jersey/3.1.10 \
             (HttpUrlConnection 17.0.14)\nHost: {host}\nAccept: text/html, image/gif, image/jpeg, *; q=.2, */*; \
             q=.2\nConnection: keep-alive\nContent-Length: {content_length}\n\n",
            $body
        )
    };
}

/// A row with only the required columns set and every optional one asserted `NULL`.
const fn row(device_id: &'static str, time: Time, lat: f64, lon: f64) -> Row {
    Row {
        device_id,
        time,
        lat,
        lon,
        speed_kmh: Col::Null,
        heading_deg: Col::Null,
        accuracy_m: Col::Null,
        attributes: "{}",
    }
}

const OSMAND_TEST: &str = "traccar/traccar:src/test/java/org/traccar/protocol/OsmAndProtocolDecoderTest.java";
const OWNTRACKS_TEST: &str = "traccar/traccar:src/test/java/org/traccar/protocol/OwnTracksProtocolDecoderTest.java";
const FORWARD_JSON: &str = "traccar/traccar:src/main/java/org/traccar/forward/PositionForwarderJson.java \
                            (+ forward/PositionData.java, model/Position.java, model/Device.java)";

/// Every case, in the order the test sends them.
pub const CASES: &[TrackerCase] = &[
    // ---- OsmAnd protocol: Traccar's decoder tests (testDecodeQuery), each URL as the OsmAnd app GETs it ----------
    TrackerCase {
        name: "osmand_query_with_an_encoded_iso_time",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: false,
        request: osmand_app_get!(
            "?id=902064&lat=42.06288&lon=-88.23412&timestamp={iso_enc}&hdop=6.0&altitude=224.0&speed=0.0"
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(0.0),
                attributes: r#"{"hdop":6.0,"altitude":224.0}"#,
                ..row("902064", SENT, 42.06288, -88.23412)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        name: "osmand_query_with_epoch_milliseconds",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: true,
        request: osmand_app_get!(
            "?id=902064&lat=42.06288&lon=-88.23412&timestamp={unix_ms}&hdop=6.0&altitude=224.0&speed=0.0"
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(0.0),
                attributes: r#"{"hdop":6.0,"altitude":224.0}"#,
                ..row("902064", SENT, 42.06288, -88.23412)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // `yyyy-MM-dd HH:mm:ss` is the server's local time in Traccar; the gateway reads it as UTC.
        name: "osmand_query_with_a_form_encoded_sql_time_and_the_id_last",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: false,
        request: osmand_app_get!(
            "?lat=49.60688&lon=6.15788&timestamp={sql_enc}&altitude=384.7&speed=0.0&id=353861053849681"
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(0.0),
                attributes: r#"{"altitude":384.7}"#,
                ..row("353861053849681", SENT, 49.60688, 6.15788)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        name: "osmand_query_with_epoch_seconds_bearing_and_hdop",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: false,
        request: osmand_app_get!(
            "?id=123456&timestamp={unix_s}&lat=60.0&lon=30.0&speed=0.0&bearing=0.0&altitude=0&hdop=0.0"
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(0.0),
                heading_deg: Col::Is(0.0),
                attributes: r#"{"altitude":0,"hdop":0.0}"#,
                ..row("123456", SENT, 60.0, 30.0)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        name: "osmand_query_with_only_id_time_and_position",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: false,
        request: osmand_app_get!("?id=123456&timestamp={unix_s}&lat=60.0&lon=30.0"),
        outcome: Outcome::Answered {
            rows: &[row("123456", SENT, 60.0, 30.0)],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // No time at all: Traccar stamps the fix with its own clock.
        name: "osmand_query_without_a_time_named_by_deviceid_with_heading",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: false,
        request: osmand_app_get!("?lat=60.0&lon=30.0&speed=0.0&heading=0.0&vacc=0&hacc=0&altitude=0&deviceid=123456"),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(0.0),
                heading_deg: Col::Is(0.0),
                attributes: r#"{"vacc":0,"hacc":0,"altitude":0}"#,
                ..row("123456", Time::Received, 60.0, 30.0)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        name: "osmand_query_without_a_time_with_battery_percent",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: false,
        request: osmand_app_get!(
            "?id=861001000719969&lat=41.666667&lon=-0.883333&altitude=350.059479&speed=0.000000&batt=87"
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(0.0),
                attributes: r#"{"batt":87,"altitude":350.059479}"#,
                ..row("861001000719969", Time::Received, 41.666667, -0.883333)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        name: "osmand_query_with_location_as_one_lat_lon_pair",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: false,
        request: osmand_app_get!("?id=123456&timestamp={unix_s}&location=60.0,30.0"),
        outcome: Outcome::Answered {
            rows: &[row("123456", SENT, 60.0, 30.0)],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // 40 knots; `ignition`, `rpm`, `fuel` are no field of the protocol: attributes, typed.
        name: "osmand_query_with_speed_in_knots_and_unknown_fields",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: false,
        request: osmand_app_get!(
            "?id=123456789012345&timestamp={unix_s}&lat=40.7232948571&lon=-74.0061408571&bearing=7.19889788244\
             &speed=40&ignition=true&rpm=933&fuel=24"
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(74.08),
                heading_deg: Col::Is(7.19889788244),
                attributes: r#"{"ignition":true,"rpm":933,"fuel":24}"#,
                ..row("123456789012345", SENT, 40.7232948571, -74.0061408571)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // Cells and Wi-Fi but no latitude/longitude: Traccar falls back on the last known position, which a
        // gateway without state cannot; the fix is kept as a dead letter. That it keeps every repeated `cell` and
        // `wifi` (Traccar's decoder reads them all) is a test of its own.
        name: "osmand_query_with_cells_and_wifi_but_no_position",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: false,
        request: osmand_app_get!(
            "?id=123456&timestamp={unix_s}&cell=257,02,16,2224&cell=257,02,16,2223,-90&wifi=00-14-22-01-23-45,-80\
             &wifi=00-1C-B3-09-85-15,-70"
        ),
        outcome: Outcome::Answered {
            rows: &[],
            dead_letters: &[DeadLetter {
                device_id: "123456",
                reason: "no_position",
                payload_has: "\"cell\"",
            }],
        },
    },
    TrackerCase {
        // The decoder test's `verifyNull`: nothing names the device, which only the client's operator can fix.
        name: "osmand_query_without_a_device_id_is_refused",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: false,
        request: osmand_app_get!("?timestamp={unix_s}&lat=60.0&lon=30.0"),
        outcome: Outcome::Refused { status: 400 },
    },
    TrackerCase {
        // The decoder test's own time, 2013-08-22, kept: even 1024 weeks later it is not a plausible time.
        name: "osmand_query_with_the_vectors_own_2013_time_is_a_dead_letter",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: false,
        request: osmand_app_get!("?id=123456&timestamp=1377177267&lat=60.0&lon=30.0"),
        outcome: Outcome::Answered {
            rows: &[],
            dead_letters: &[DeadLetter {
                device_id: "123456",
                reason: "outside_time_window",
                payload_has: "1377177267",
            }],
        },
    },
    TrackerCase {
        // The test's plain vector with the decoder's `valid` field (`OsmAndProtocolDecoder.java`) set to false.
        name: "osmand_query_flagged_not_valid_is_a_dead_letter",
        source: "traccar/traccar:src/main/java/org/traccar/protocol/OsmAndProtocolDecoder.java (`valid`), \
                 vector from OsmAndProtocolDecoderTest.java",
        protocol: Protocol::Osmand,
        millis: false,
        request: osmand_app_get!("?id=123456&timestamp={unix_s}&lat=60.0&lon=30.0&valid=false"),
        outcome: Outcome::Answered {
            rows: &[],
            dead_letters: &[DeadLetter {
                device_id: "123456",
                reason: "flagged_invalid",
                payload_has: "\"valid\"",
            }],
        },
    },
    TrackerCase {
        // A decimal comma, as apps that format numbers with the phone's locale send it (GPSLogger's
        // `CustomUrlManager` replaces `,` by `.` for that reason): the speed cannot be read.
        name: "osmand_query_with_a_decimal_comma_speed_is_a_dead_letter",
        source: "vector from OsmAndProtocolDecoderTest.java; the comma from \
                 mendhak/gpslogger:gpslogger/src/main/java/com/mendhak/gpslogger/senders/customurl/CustomUrlManager.java",
        protocol: Protocol::Osmand,
        millis: false,
        request: osmand_app_get!("?id=123456&timestamp={unix_s}&lat=60.0&lon=30.0&speed=12,5&bearing=0.0"),
        outcome: Outcome::Answered {
            rows: &[],
            dead_letters: &[DeadLetter {
                device_id: "123456",
                reason: "bad_field",
                payload_has: "12,5",
            }],
        },
    },
    // ---- OsmAnd protocol: Traccar Client 9.x JSON (OsmAndProtocolDecoderTest.testDecodeJson) -------------------
    TrackerCase {
        // Speed in m/s, heading -1 (unknown), battery level 0–1; `_` repeats the fix as a query string for servers
        // that do not read JSON.
        name: "traccar_client_9_json_with_unknown_heading_and_full_battery",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: true,
        request: traccar_client_9_json!(
            r#"{"location":{"timestamp":"{iso_ms}","coords":{"latitude":37.4219983,"longitude":-122.084,"accuracy":5,"speed":0,"heading":-1,"altitude":5},"is_moving":false,"odometer":0,"event":"motionchange","battery":{"level":1,"is_charging":false},"activity":{"type":"still"},"extras":{},"_":"&id=48241179&lat=37.4219983&lon=-122.084&timestamp={iso_ms}&"},"device_id":"48241179"}"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(0.0),
                heading_deg: Col::Null,
                accuracy_m: Col::Is(5.0),
                attributes: r#"{"batt":100,"altitude":5}"#,
                ..row("48241179", SENT, 37.4219983, -122.084)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        name: "traccar_client_9_json_with_typed_extras",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: true,
        request: traccar_client_9_json!(
            r#"{"location":{"timestamp":"{iso_ms}","coords":{"latitude":37.4219983,"longitude":-122.084,"accuracy":5,"speed":0,"heading":-1,"altitude":5},"is_moving":false,"odometer":0,"event":"motionchange","battery":{"level":1,"is_charging":false},"activity":{"type":"still"},"extras":{"device_string_test":"long_device_id","device_bool_test":true,"device_bool_false_test":false,"device_integer_test":1,"device_integer_twelve_test":12,"device_double_test":1.345,"device_very_long_double_test":1763636.3442},"_":"&id=48241179&lat=37.4219983&lon=-122.084&timestamp={iso_ms}&"},"device_id":"48241179"}"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(0.0),
                accuracy_m: Col::Is(5.0),
                attributes: r#"{"device_string_test":"long_device_id","device_bool_test":true,"device_bool_false_test":false,"device_integer_test":1,"device_integer_twelve_test":12,"device_double_test":1.345,"device_very_long_double_test":1763636.3442,"batt":100}"#,
                ..row("48241179", SENT, 37.4219983, -122.084)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // An iOS simulator fix: speed, heading and battery level all -1 (unknown).
        name: "traccar_client_9_json_with_every_unknown_as_minus_one",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: true,
        request: traccar_client_9_json!(
            r#"{"location":{"extras":{},"mock":true,"coords":{"speed_accuracy":-1,"speed":-1,"longitude":-122.406417,"ellipsoidal_altitude":0,"floor":null,"heading_accuracy":-1,"latitude":37.785834000000001,"accuracy":5,"altitude_accuracy":-1,"altitude":0,"heading":-1},"is_moving":false,"age":188,"odometer":0,"uuid":"2FB04C65-99CF-42AB-8DD3-EBCB4B108BF8","event":"motionchange","battery":{"level":-1,"is_charging":false},"activity":{"type":"unknown","confidence":100},"timestamp":"{iso_ms}"},"device_id":"658765"}"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Null,
                heading_deg: Col::Null,
                accuracy_m: Col::Is(5.0),
                attributes: r#"{"batt":null,"altitude":0}"#,
                ..row("658765", SENT, 37.785834, -122.406417)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        name: "traccar_client_9_json_moving_at_18_67_metres_per_second",
        source: OSMAND_TEST,
        protocol: Protocol::Osmand,
        millis: true,
        request: traccar_client_9_json!(
            r#"{"location":{"event":"motionchange","is_moving":false,"uuid":"0e9a2473-a9a7-4c00-997b-fb97d2154e75","timestamp":"{iso_ms}","odometer":0,"coords":{"latitude":-6.1148096,"longitude":106.6837015,"accuracy":3.8,"speed":18.67,"speed_accuracy":0.26,"heading":63,"heading_accuracy":0.28,"altitude":35.7,"altitude_accuracy":3.8},"activity":{"type":"still","confidence":100},"battery":{"is_charging":false,"level":0.79},"extras":{}},"device_id":"8737767034"}"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(67.212),
                heading_deg: Col::Is(63.0),
                accuracy_m: Col::Is(3.8),
                attributes: r#"{"batt":79,"altitude":35.7}"#,
                ..row("8737767034", SENT, -6.1148096, 106.6837015)
            }],
            dead_letters: &[],
        },
    },
    // ---- OsmAnd protocol: the Traccar Client apps -------------------------------------------------------------
    TrackerCase {
        // `ProtocolFormatter.formatRequest` appends every field to the server URL's query, and `RequestManager`
        // POSTs it with no body; Android's `HttpURLConnection` (OkHttp inside) adds the form Content-Type and
        // `Content-Length: 0`. The field order and number rendering are `ProtocolFormatterTest`'s; its values are
        // all 0.0 (an empty `Location`), so this fix's values are a real one's. `accuracy=0.0` is what the app sends
        // for every GPS-provider fix (`Position.kt` keeps the accuracy of other providers only): that it is stored
        // as no accuracy is a test of its own.
        name: "traccar_client_legacy_android_post_with_every_field_in_the_query",
        source: "traccar/traccar-client-android:app/src/main/java/org/traccar/client/ProtocolFormatter.kt \
                 (+ RequestManager.kt, Position.kt, app/src/test/java/org/traccar/client/ProtocolFormatterTest.kt)",
        protocol: Protocol::Osmand,
        millis: false,
        request: "POST /api/v1/osmand?id=123456789012345&timestamp={unix_s}&lat=52.5162746&lon=13.3777041\
                  &speed=21.382284&bearing=92.0&altitude=34.0&accuracy=0.0&batt=87.0&alarm=alert%20message HTTP/1.1\n\
                  Content-Type: application/x-www-form-urlencoded\n\
                  User-Agent: Dalvik/2.1.0 (Linux; U; Android 14; Pixel 7 Build/UQ1A.240205.004)\n\
                  Host: {host}\nConnection: Keep-Alive\nAccept-Encoding: gzip\nContent-Length: 0\n\n",
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(39.6),
                heading_deg: Col::Is(92.0),
                accuracy_m: Col::Unchecked,
                attributes: r#"{"batt":87,"altitude":34.0,"alarm":"alert message"}"#,
                ..row("123456789012345", SENT, 52.5162746, 13.3777041)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // `ProtocolFormatterTest.testFormatRequest` byte for byte (bar the time and the route): an empty
        // `Location` is 0.0, 0.0, which many devices send before their first fix.
        name: "traccar_client_legacy_android_zero_zero_is_a_dead_letter",
        source: "traccar/traccar-client-android:app/src/test/java/org/traccar/client/ProtocolFormatterTest.kt",
        protocol: Protocol::Osmand,
        millis: false,
        request: "POST /api/v1/osmand?id=123456789012345&timestamp={unix_s}&lat=0.0&lon=0.0&speed=0.0&bearing=0.0\
                  &altitude=0.0&accuracy=0.0&batt=0.0 HTTP/1.1\n\
                  Content-Type: application/x-www-form-urlencoded\n\
                  User-Agent: Dalvik/2.1.0 (Linux; U; Android 14; Pixel 7 Build/UQ1A.240205.004)\n\
                  Host: {host}\nConnection: Keep-Alive\nAccept-Encoding: gzip\nContent-Length: 0\n\n",
        outcome: Outcome::Answered {
            rows: &[],
            dead_letters: &[DeadLetter {
                device_id: "123456789012345",
                reason: "null_island",
                payload_has: "\"lat\"",
            }],
        },
    },
    TrackerCase {
        // `HttpUploader.upload` without `uploadJson`: Ktor's `submitForm`, one position per POST, speed already in
        // knots (m/s × 1.94384, two decimals), battery an integer percent.
        name: "traccar_client_sdk_form_post",
        source: "traccar/traccar-client-sdk:core/src/commonMain/kotlin/org/traccar/client/HttpUploader.kt \
                 (+ Position.kt, androidMain/.../AndroidBatteryProcessor.kt)",
        protocol: Protocol::Osmand,
        millis: false,
        request: "POST /api/v1/osmand HTTP/1.1\nAccept: */*\nAccept-Charset: UTF-8\nUser-Agent: Ktor client\n\
                  Content-Type: application/x-www-form-urlencoded; charset=UTF-8\nContent-Length: {content_length}\n\
                  Host: {host}\nConnection: Keep-Alive\nAccept-Encoding: gzip\n\n\
                  id=48241179&lat=-6.1148096&lon=106.6837015&timestamp={unix_s}&accuracy=3.8&altitude=35.7\
                  &speed=36.29&bearing=63.0&batt=79&charge=false&battery_health=good&battery_voltage=4123\
                  &battery_temp=29.5",
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(67.20908),
                heading_deg: Col::Is(63.0),
                accuracy_m: Col::Is(3.8),
                attributes: r#"{"batt":79,"altitude":35.7,"charge":false,"battery_health":"good","battery_voltage":4123,"battery_temp":29.5}"#,
                ..row("48241179", SENT, -6.1148096, 106.6837015)
            }],
            dead_letters: &[],
        },
    },
    // ---- OsmAnd protocol: GPSLogger's custom URL ------------------------------------------------------------
    TrackerCase {
        // The default URL (`PreferenceHelper.getCustomLoggingUrl`), GET (the default method), with `&aid=%AID`
        // added because the default names no device. `%TIME` is ISO with milliseconds, URL-encoded then with `%3A`
        // turned back into `:` (`Strings.getUrlEncodedString`); `%SPD` is m/s.
        name: "gpslogger_default_url_with_the_android_id",
        source: "mendhak/gpslogger:gpslogger/src/main/java/com/mendhak/gpslogger/common/PreferenceHelper.java \
                 (+ senders/customurl/CustomUrlManager.java, common/Strings.java, \
                 assets/text/faq/faq16-custom-url.md)",
        protocol: Protocol::Osmand,
        millis: true,
        request: "GET /api/v1/osmand?lat=48.8583701&longitude=2.2944813&time={iso_ms}&s=5.19&aid=3f2a9c1b7d5e4a60 \
                  HTTP/1.1\nHost: {host}\nConnection: Keep-Alive\nAccept-Encoding: gzip\nUser-Agent: okhttp/4.12.0\n\n",
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(18.684),
                ..row("3f2a9c1b7d5e4a60", SENT, 48.8583701, 2.2944813)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // The default URL verbatim, with the Basic auth GPSLogger's Custom URL screen offers (`CustomUrlRequest`
        // sends it pre-emptively): the user name is the only thing naming the device.
        name: "gpslogger_default_url_verbatim_named_by_its_basic_auth_user",
        source: "mendhak/gpslogger:gpslogger/src/main/java/com/mendhak/gpslogger/common/PreferenceHelper.java \
                 (+ loggers/customurl/CustomUrlRequest.java)",
        protocol: Protocol::Osmand,
        millis: true,
        request: "GET /api/v1/osmand?lat=48.8583701&longitude=2.2944813&time={iso_ms}&s=5.19 HTTP/1.1\n\
                  Authorization: Basic cGl4ZWwtNzpzZWNyZXQ=\nHost: {host}\nConnection: Keep-Alive\n\
                  Accept-Encoding: gzip\nUser-Agent: okhttp/4.12.0\n\n",
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(18.684),
                ..row("pixel-7", SENT, 48.8583701, 2.2944813)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // `?%ALL`: every placeholder in `getFormattedTextblock`'s order. On Android 8+ `%SER` is the Android id
        // (`Strings.getBuildSerial`), so `aid` and `ser` agree; the phone is set to UTC, so `%TIMEOFFSET` ends in
        // `Z`. Both `timestamp` (s) and `time` (ms) are sent: the case's time has no milliseconds, so either reads
        // the same instant.
        name: "gpslogger_all_placeholders",
        source: "mendhak/gpslogger:gpslogger/src/main/java/com/mendhak/gpslogger/senders/customurl/CustomUrlManager.java",
        protocol: Protocol::Osmand,
        millis: false,
        request: "GET /api/v1/osmand?lat=48.8583701&lon=2.2944813&sat=9&desc=&alt=63.0&acc=3.9&dir=211.0&prov=gps\
                  &spd_kph=18.684000205993652&spd=5.19&timestamp={unix_s}&timeoffset={iso_ms}&time={iso_ms}\
                  &starttimestamp={unix_s-3600}&date={date}&batt=87.0&ischarging=false&aid=3f2a9c1b7d5e4a60\
                  &ser=3f2a9c1b7d5e4a60&act=&filename=20240501&profile=Default+Profile&hdop=0.8&vdop=1.1&pdop=1.4\
                  &dist=1234& HTTP/1.1\nHost: {host}\nConnection: Keep-Alive\nAccept-Encoding: gzip\n\
                  User-Agent: okhttp/4.12.0\n\n",
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(18.684),
                heading_deg: Col::Is(211.0),
                accuracy_m: Col::Is(3.9),
                attributes: r#"{"altitude":63.0,"batt":87,"hdop":0.8,"sat":9,"prov":"gps","ischarging":false}"#,
                ..row("3f2a9c1b7d5e4a60", SENT, 48.8583701, 2.2944813)
            }],
            dead_letters: &[],
        },
    },
    // ---- OwnTracks: Traccar's decoder tests, then the booklet ----------------------------------------------------
    TrackerCase {
        name: "owntracks_android_location_named_by_tid",
        source: OWNTRACKS_TEST,
        protocol: Protocol::Owntracks,
        millis: false,
        request: owntracks_android_anonymous!(
            r#"{"_type":"location","acc":15,"alt":440,"batt":46,"conn":"w","lat":46.0681247,"lon":11.1512805,"t":"u","tid":"5t","tst":{unix_s},"vac":2,"vel":0}"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(0.0),
                accuracy_m: Col::Is(15.0),
                attributes: r#"{"altitude":440,"batt":46,"conn":"w","vac":2}"#,
                ..row("5t", SENT, 46.0681247, 11.1512805)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        name: "owntracks_minimal_location",
        source: OWNTRACKS_TEST,
        protocol: Protocol::Owntracks,
        millis: false,
        request: owntracks_android_anonymous!(
            r#"{"lon":2.29513,"lat":48.85833,"tst":{unix_s},"_type":"location","tid":"JJ"}"#
        ),
        outcome: Outcome::Answered {
            rows: &[row("JJ", SENT, 48.85833, 2.29513)],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // `vel` is km/h, `cog` degrees.
        name: "owntracks_location_with_velocity_and_course",
        source: OWNTRACKS_TEST,
        protocol: Protocol::Owntracks,
        millis: false,
        request: owntracks_android_anonymous!(
            r#"{"cog":271,"lon":2.29513,"acc":5,"vel":61,"vac":21,"lat":48.85833,"tst":{unix_s},"alt":167,"_type":"location","tid":"JJ","t":"u","batt":67}"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(61.0),
                heading_deg: Col::Is(271.0),
                accuracy_m: Col::Is(5.0),
                attributes: r#"{"altitude":167,"batt":67}"#,
                ..row("JJ", SENT, 48.85833, 2.29513)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        name: "owntracks_location_with_short_coordinates",
        source: OWNTRACKS_TEST,
        protocol: Protocol::Owntracks,
        millis: false,
        request: owntracks_android_anonymous!(
            r#"{"lat":48.85,"lon":2.295,"_type":"location","tid":"JJ","tst":{unix_s}}"#
        ),
        outcome: Outcome::Answered {
            rows: &[row("JJ", SENT, 48.85, 2.295)],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // iOS: the topic names user and device; `created_at` (when the message was built) is not the fix time.
        name: "owntracks_ios_location_named_by_topic",
        source: OWNTRACKS_TEST,
        protocol: Protocol::Owntracks,
        millis: false,
        request: owntracks_ios!(
            r#"{"lon":-122,"acc":5,"created_at":{unix_s+246},"lat":37,"topic":"owntracks/ckrey/22A67880-15C3-41A6-9157-25545C7993AC","t":"u","m":1,"tst":{unix_s},"conn":"w","alt":0,"_type":"location","tid":"AC"}"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                accuracy_m: Col::Is(5.0),
                attributes: r#"{"altitude":0,"conn":"w"}"#,
                ..row("ckrey:22A67880-15C3-41A6-9157-25545C7993AC", SENT, 37.0, -122.0)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // A Queclink tracker behind qtripp, which publishes OwnTracks JSON.
        name: "owntracks_qtripp_location_with_cell_fields",
        source: OWNTRACKS_TEST,
        protocol: Protocol::Owntracks,
        millis: false,
        request: owntracks_ios!(
            r#"{"topic":"owntracks/qtripp/865284041968706","lat":47.420051,"lon":13.654704,"vel":0,"cog":113,"tst":{unix_s},"mcc":232,"mnc":1,"lac":"4F4D","cid":"673A","_type":"location","acc":10,"alt":1113,"t":"I","don":105,"tid":"CS"}"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(0.0),
                heading_deg: Col::Is(113.0),
                accuracy_m: Col::Is(10.0),
                attributes: r#"{"altitude":1113,"mcc":232,"lac":"4F4D"}"#,
                ..row("qtripp:865284041968706", SENT, 47.420051, 13.654704)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // The booklet's location (quicksetup.md) as Android sends it over HTTP: with the identification headers and
        // the pseudo-topic `owntracks/http/<tid>` that `HttpMessageProcessorEndpoint.onFinalizeMessage` adds to the
        // body (the booklet shows the MQTT payload, which has none). The headers name the device.
        name: "owntracks_android_location_named_by_x_limit_headers",
        source: "owntracks/booklet:docs/guide/quicksetup.md, headers from docs/tech/http.md and \
                 owntracks/android:project/app/src/main/java/org/owntracks/android/services/HttpMessageProcessorEndpoint.kt",
        protocol: Protocol::Owntracks,
        millis: false,
        request: owntracks_android_identified!(
            r#"{"_type":"location","SSID":"mywifi","alt":154,"batt":53,"conn":"w","created_at":{unix_s+1},"lat":48.856826,"lon":2.292713,"tid":"j1","topic":"owntracks/http/j1","tst":{unix_s},"vel":0}"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(0.0),
                attributes: r#"{"altitude":154,"batt":53,"SSID":"mywifi"}"#,
                ..row("jane:nokia", SENT, 48.856826, 2.292713)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // Android with a user name but no device id set sends `X-Limit-U` alone.
        name: "owntracks_android_location_named_by_the_user_header_alone",
        source: "owntracks/android:project/app/src/main/java/org/owntracks/android/services/HttpMessageProcessorEndpoint.kt, \
                 body from OwnTracksProtocolDecoderTest.java",
        protocol: Protocol::Owntracks,
        millis: false,
        request: "POST /api/v1/owntracks HTTP/1.1\nUser-Agent: Owntracks-Android/gms/420412000\nX-Limit-U: jane\n\
                  Content-Type: application/json; charset=utf-8\nContent-Length: {content_length}\nHost: {host}\n\
                  Connection: Keep-Alive\nAccept-Encoding: gzip\n\n\
                  {\"lon\":2.29513,\"lat\":48.85833,\"tst\":{unix_s},\"_type\":\"location\",\"tid\":\"JJ\"}",
        outcome: Outcome::Answered {
            rows: &[row("jane", SENT, 48.85833, 2.29513)],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // The booklet's example of an iOS payload (pretty-printed as there): only `topic` names the device.
        name: "owntracks_ios_booklet_location_named_by_topic",
        source: "owntracks/booklet:docs/features/traccar.md",
        protocol: Protocol::Owntracks,
        millis: false,
        request: owntracks_ios!(
            r#"{
  "cog": 271,
  "batt": 41,
  "lon": 2.29513,
  "acc": 5,
  "vel": 61,
  "vac": 21,
  "lat": 48.85833,
  "t": "u",
  "tst": {unix_s},
  "alt": 167,
  "_type": "location",
  "topic": "owntracks/jane/iphone",
  "p": 71,
  "tid": "JJ"
}
"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(61.0),
                heading_deg: Col::Is(271.0),
                accuracy_m: Col::Is(5.0),
                attributes: r#"{"altitude":167,"batt":41,"p":71}"#,
                ..row("jane:iphone", SENT, 48.85833, 2.29513)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // The booklet's endpoint test: `jo` builds the body and `curl --data` posts it, so it arrives as a form
        // Content-Type. (The script's URL is unquoted, so the shell cuts it at `&`: only `?u=jane` is sent.)
        name: "owntracks_booklet_curl_test_with_a_form_content_type",
        source: "owntracks/booklet:docs/tech/http.md",
        protocol: Protocol::Owntracks,
        millis: false,
        request: "POST /api/v1/owntracks?u=jane HTTP/1.1\nHost: {host}\nUser-Agent: curl/8.5.0\nAccept: */*\n\
                  Content-Length: {content_length}\nContent-Type: application/x-www-form-urlencoded\n\n\
                  {\"_type\":\"location\",\"t\":\"u\",\"batt\":11,\"lat\":48.856826,\"lon\":2.292713,\"tid\":\"JJ\",\
                  \"tst\":{unix_s},\"topic\":\"owntracks/jane/phone\"}",
        outcome: Outcome::Answered {
            rows: &[Row {
                attributes: r#"{"batt":11}"#,
                ..row("jane:phone", SENT, 48.856826, 2.292713)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // A phone whose GPS reports fixes 1024 weeks back: `tst` 1068138065 against `created_at` 1687453740 in
        // owntracks/android#1431. The gateway undoes the rollover.
        name: "owntracks_fix_1024_weeks_back_is_repaired",
        source: "owntracks/android#1431 (tst vs created_at), body from owntracks/booklet:docs/guide/quicksetup.md",
        protocol: Protocol::Owntracks,
        millis: false,
        request: owntracks_android_identified!(
            r#"{"_type":"location","SSID":"mywifi","alt":154,"batt":53,"conn":"w","created_at":{unix_s+1},"lat":48.856826,"lon":2.292713,"tid":"j1","topic":"owntracks/http/j1","tst":{unix_s_wnro},"vel":0}"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(0.0),
                attributes: r#"{"altitude":154,"batt":53}"#,
                ..row("jane:nokia", SENT, 48.856826, 2.292713)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // `_type=lwt` (json.md): the broker's last will, posted as any other message in HTTP mode.
        name: "owntracks_lwt_is_answered_and_not_stored",
        source: "owntracks/booklet:docs/tech/json.md (`_type=lwt`)",
        protocol: Protocol::Owntracks,
        millis: false,
        request: owntracks_android_identified!(r#"{"_type":"lwt","tst":{unix_s}}"#),
        outcome: Outcome::Answered {
            rows: &[],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // The booklet's transition, pretty-printed as there: it carries a position, but is an event, not a fix.
        name: "owntracks_transition_is_answered_and_not_stored",
        source: "owntracks/booklet:docs/features/waypoints.md",
        protocol: Protocol::Owntracks,
        millis: false,
        request: owntracks_ios!(
            r#"{
      "_type": "transition",
      "desc": "My favorite coffee shop (Delaville)",
      "event": "enter",
      "lat": 48.87069,
      "lon": 2.34916,
      "rid": "f7676c",
      "tid": "j1",
      "tst": {unix_s},
      "wtst": 1610104395
}"#
        ),
        outcome: Outcome::Answered {
            rows: &[],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // "the length of the payload may be zero if a friend is deleted from the app … it is best to ignore
        // zero-length payloads".
        name: "owntracks_empty_body_is_answered_and_not_stored",
        source: "owntracks/booklet:docs/tech/http.md",
        protocol: Protocol::Owntracks,
        millis: false,
        request: "POST /api/v1/owntracks HTTP/1.1\nUser-Agent: Owntracks-Android/gms/420412000\nX-Limit-U: jane\n\
                  X-Limit-D: nokia\nContent-Length: 0\nHost: {host}\nConnection: Keep-Alive\nAccept-Encoding: gzip\n\n",
        outcome: Outcome::Answered {
            rows: &[],
            dead_letters: &[],
        },
    },
    // ---- Overland ----------------------------------------------------------------------------------------------
    TrackerCase {
        // The README's request, pretty-printed as there. Two changes: its `"current": { ... }, (optional)` and
        // `"trip": …` lines are not JSON and are left out, and `device_id` holds the id the settings configure (the
        // README shows it unset). Speed is m/s, `battery_level` 0–1; the time has the README's `-0700` offset.
        name: "overland_readme_example",
        source: "aaronpk/Overland-iOS:README.md",
        protocol: Protocol::Overland,
        millis: false,
        request: overland_ios!(
            r#"{
  "locations": [
    {
      "type": "Feature",
      "geometry": {
        "type": "Point",
        "coordinates": [
          -122.030581, 
          37.331800
        ]
      },
      "properties": {
        "timestamp": "{iso_0700}",
        "altitude": 0,
        "speed": 4,
        "horizontal_accuracy": 30,
        "vertical_accuracy": -1,
        "motion": ["driving","stationary"],
        "pauses": false,
        "activity": "other_navigation",
        "desired_accuracy": 100,
        "deferred": 1000,
        "significant_change": "disabled",
        "locations_in_payload": 1,
        "battery_state": "charging",
        "battery_level": 0.80,
        "device_id": "overland-readme",
        "wifi": ""
      }
    }
  ]
}"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(14.4),
                accuracy_m: Col::Is(30.0),
                attributes: r#"{"altitude":0,"batt":80,"battery_state":"charging"}"#,
                ..row("overland-readme", SENT, 37.3318, -122.030581)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // What `GLManager.m` really queues and sends: fixes from `currentDictionaryFromLocation` (UTC `…Z` times,
        // `course`, integer speed, -1 when unknown), and in the same batch a log entry (`logAction`, no geometry
        // when no fix is known yet) and a visit (`didVisit`), neither of which is a fix; `current` (sent when the
        // backlog exceeds a batch) is the newest point, which the app still holds and sends in a later batch. Only
        // the two fixes are stored. (A finished trip in the batch is `OVERLAND_TRIP_SUMMARY`.)
        name: "overland_app_batch_with_log_visit_and_current",
        source: "aaronpk/Overland-iOS:GPSLogger/GLManager.m (sendQueueNow, currentDictionaryFromLocation, logAction, \
                 didVisit, addMetadataToUpdate)",
        protocol: Protocol::Overland,
        millis: false,
        request: overland_ios!(
            r#"{"locations":[{"type":"Feature","geometry":{"type":"Point","coordinates":[-122.0305812,37.3318004]},"properties":{"timestamp":"{iso-30}","altitude":12,"speed":4,"course":271,"horizontal_accuracy":5,"vertical_accuracy":3,"speed_accuracy":0.5,"course_accuracy":12.5,"motion":["driving"],"device_id":"overland-7","wifi":"","battery_state":"unplugged","battery_level":0.75}},{"type":"Feature","geometry":{"type":"Point","coordinates":[-122.0311,37.3322]},"properties":{"timestamp":"{iso}","altitude":13,"speed":-1,"course":-1,"horizontal_accuracy":10,"vertical_accuracy":4,"speed_accuracy":-1,"course_accuracy":-1,"motion":[],"device_id":"overland-7","wifi":"","battery_state":"unplugged","battery_level":0.75}},{"type":"Feature","properties":{"timestamp":"{iso+5}","action":"paused_location_updates","device_id":"overland-7","wifi":"","battery_state":"unplugged","battery_level":0.75}},{"type":"Feature","geometry":{"type":"Point","coordinates":[-122.0311,37.3322]},"properties":{"timestamp":"{iso+10}","action":"visit","arrival_date":"{iso-600}","departure_date":null,"horizontal_accuracy":65,"device_id":"overland-7","wifi":"","battery_state":"unplugged","battery_level":0.75}}],"current":{"type":"Feature","geometry":{"type":"Point","coordinates":[-122.0402,37.3391]},"properties":{"timestamp":"{iso+60}","altitude":14,"speed":9,"course":180,"horizontal_accuracy":5,"vertical_accuracy":3,"speed_accuracy":0.4,"course_accuracy":10,"motion":["driving"],"device_id":"overland-7","wifi":"","battery_state":"unplugged","battery_level":0.74}}}"#
        ),
        outcome: Outcome::Answered {
            rows: &[
                Row {
                    speed_kmh: Col::Is(14.4),
                    heading_deg: Col::Is(271.0),
                    accuracy_m: Col::Is(5.0),
                    attributes: r#"{"altitude":12,"batt":75}"#,
                    ..row("overland-7", Time::Sent { offset_s: -30 }, 37.3318004, -122.0305812)
                },
                Row {
                    speed_kmh: Col::Null,
                    heading_deg: Col::Null,
                    accuracy_m: Col::Is(10.0),
                    attributes: r#"{"altitude":13,"batt":75}"#,
                    ..row("overland-7", SENT, 37.3322, -122.0311)
                },
            ],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // A batch whose first point is 0,0 (a fix before the first real one): the batch is still answered "ok", or
        // the app would resend it forever; the good point is stored and the bad one kept as a dead letter.
        name: "overland_batch_with_a_zero_zero_point",
        source: "aaronpk/Overland-iOS:GPSLogger/GLManager.m (currentDictionaryFromLocation)",
        protocol: Protocol::Overland,
        millis: false,
        request: overland_ios!(
            r#"{"locations":[{"type":"Feature","geometry":{"type":"Point","coordinates":[0,0]},"properties":{"timestamp":"{iso-60}","altitude":0,"speed":-1,"course":-1,"horizontal_accuracy":-1,"vertical_accuracy":-1,"speed_accuracy":-1,"course_accuracy":-1,"motion":[],"device_id":"overland-8","wifi":"","battery_state":"unplugged","battery_level":0.5}},{"type":"Feature","geometry":{"type":"Point","coordinates":[-122.0305812,37.3318004]},"properties":{"timestamp":"{iso}","altitude":12,"speed":1,"course":90,"horizontal_accuracy":8,"vertical_accuracy":3,"speed_accuracy":0.5,"course_accuracy":12.5,"motion":["walking"],"device_id":"overland-8","wifi":"","battery_state":"unplugged","battery_level":0.5}}]}"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(3.6),
                heading_deg: Col::Is(90.0),
                accuracy_m: Col::Is(8.0),
                attributes: r#"{"altitude":12,"batt":50}"#,
                ..row("overland-8", SENT, 37.3318004, -122.0305812)
            }],
            dead_letters: &[DeadLetter {
                device_id: "overland-8",
                reason: "null_island",
                payload_has: "overland-8",
            }],
        },
    },
    // ---- Traccar forwarding (forward.type=json) ----------------------------------------------------------------
    TrackerCase {
        // `PositionData` as Traccar's `ObjectMapper` writes it (fields in declaration order, base classes first,
        // dates as ISO with `+00:00`, `@JsonIgnore`d ones left out): a Teltonika fix. Speed is knots; `accuracy`
        // is 0.0 when the device reports none (a Java double's default), so NULL; `batteryLevel` is a percent.
        name: "traccar_forward_json_position",
        source: FORWARD_JSON,
        protocol: Protocol::Traccar,
        millis: true,
        request: traccar_forward!(
            r#"{"position":{"id":0,"attributes":{"priority":0,"sat":11,"event":0,"ignition":true,"motion":true,"io69":1,"distance":12.34,"totalDistance":123456.78,"hours":3600000,"batteryLevel":87},"deviceId":12,"protocol":"teltonika","serverTime":"{jackson+2}","deviceTime":"{jackson}","fixTime":"{jackson}","valid":true,"latitude":54.6872,"longitude":25.2797,"altitude":112.0,"speed":27.0,"course":180.0,"address":null,"accuracy":0.0,"network":null,"geofenceIds":null},"device":{"id":12,"attributes":{},"groupId":0,"calendarId":0,"name":"Truck 7","uniqueId":"356307042441013","status":"online","lastUpdate":"{jackson+2}","positionId":0,"phone":null,"model":"FMB920","contact":null,"category":"truck","disabled":false,"expirationTime":null}}"#
        ),
        outcome: Outcome::Answered {
            rows: &[Row {
                speed_kmh: Col::Is(50.004),
                heading_deg: Col::Is(180.0),
                accuracy_m: Col::Null,
                attributes: r#"{"altitude":112.0,"ignition":true,"sat":11,"batt":87}"#,
                ..row("356307042441013", SENT, 54.6872, 25.2797)
            }],
            dead_letters: &[],
        },
    },
    TrackerCase {
        // Traccar forwards fixes its decoder marked not valid (`filter.invalid` is off by default).
        name: "traccar_forward_json_not_valid_is_a_dead_letter",
        source: FORWARD_JSON,
        protocol: Protocol::Traccar,
        millis: true,
        request: traccar_forward!(
            r#"{"position":{"id":0,"attributes":{"sat":0,"ignition":false,"motion":false},"deviceId":12,"protocol":"teltonika","serverTime":"{jackson+2}","deviceTime":"{jackson}","fixTime":"{jackson}","valid":false,"latitude":54.6871,"longitude":25.2796,"altitude":0.0,"speed":0.0,"course":0.0,"address":null,"accuracy":0.0,"network":null,"geofenceIds":null},"device":{"id":12,"attributes":{},"groupId":0,"calendarId":0,"name":"Truck 7","uniqueId":"356307042441013","status":"online","lastUpdate":"{jackson+2}","positionId":0,"phone":null,"model":"FMB920","contact":null,"category":"truck","disabled":false,"expirationTime":null}}"#
        ),
        outcome: Outcome::Answered {
            rows: &[],
            dead_letters: &[DeadLetter {
                device_id: "356307042441013",
                reason: "flagged_invalid",
                payload_has: "\"valid\"",
            }],
        },
    },
    TrackerCase {
        // An out-of-range latitude such as traccar/traccar#2418 reports from an H02 device (-270.6).
        name: "traccar_forward_json_latitude_out_of_range_is_a_dead_letter",
        source: "traccar/traccar#2418 (latitude -270.6), body shaped by PositionForwarderJson.java",
        protocol: Protocol::Traccar,
        millis: true,
        request: traccar_forward!(
            r#"{"position":{"id":0,"attributes":{"sat":4},"deviceId":13,"protocol":"h02","serverTime":"{jackson+2}","deviceTime":"{jackson}","fixTime":"{jackson}","valid":true,"latitude":-270.6,"longitude":30.5,"altitude":0.0,"speed":0.0,"course":0.0,"address":null,"accuracy":0.0,"network":null,"geofenceIds":null},"device":{"id":13,"attributes":{},"groupId":0,"calendarId":0,"name":"Van 3","uniqueId":"4210012345","status":"online","lastUpdate":"{jackson+2}","positionId":0,"phone":null,"model":null,"contact":null,"category":null,"disabled":false,"expirationTime":null}}"#
        ),
        outcome: Outcome::Answered {
            rows: &[],
            dead_letters: &[DeadLetter {
                device_id: "4210012345",
                reason: "bad_coordinates",
                payload_has: "-270.6",
            }],
        },
    },
];

/// A batch with a fix and the trip summary `GLManager.writeTripToDB` queues when a trip ends: a Point Feature at
/// the last fix's coordinates, stamped with the trip's end, whose `properties.type` is `"trip"` (the app's own
/// `numberOfObjectsInQueue` counts it as a trip, not a location). It is no fix: only the fix is stored.
pub const OVERLAND_TRIP_SUMMARY: TrackerCase = TrackerCase {
    name: "overland_trip_summary_is_not_a_fix",
    source: "aaronpk/Overland-iOS:GPSLogger/GLManager.m (writeTripToDB, numberOfObjectsInQueue)",
    protocol: Protocol::Overland,
    millis: false,
    request: overland_ios!(
        r#"{"locations":[{"type":"Feature","geometry":{"type":"Point","coordinates":[-122.0311,37.3322]},"properties":{"timestamp":"{iso}","altitude":13,"speed":2,"course":45,"horizontal_accuracy":10,"vertical_accuracy":4,"speed_accuracy":0.5,"course_accuracy":10,"motion":["driving"],"device_id":"overland-9","wifi":"","battery_state":"unplugged","battery_level":0.75}},{"type":"Feature","geometry":{"type":"Point","coordinates":[-122.0311,37.3322]},"properties":{"timestamp":"{iso+20}","type":"trip","mode":"car","start":"{iso-900}","end":"{iso+20}","start_location":null,"end_location":null,"duration":920,"distance":5230.5,"stopped_automatically":false,"steps":0,"device_id":"overland-9","wifi":"","battery_state":"unplugged","battery_level":0.75}}]}"#
    ),
    outcome: Outcome::Answered {
        rows: &[Row {
            speed_kmh: Col::Is(7.2),
            heading_deg: Col::Is(45.0),
            accuracy_m: Col::Is(10.0),
            attributes: r#"{"altitude":13,"batt":75}"#,
            ..row("overland-9", SENT, 37.3322, -122.0311)
        }],
        dead_letters: &[],
    },
};

/// The case named `name`.
pub fn case(name: &str) -> &'static TrackerCase {
    CASES
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no tracker case named {name}"))
}
