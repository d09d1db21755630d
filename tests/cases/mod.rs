//! The hostile request bodies both test binaries try, each with the outcome it must get: `model_properties.rs` holds
//! the parser and the rules to them, `api/hostile.rs` the gateway over HTTP, so that the two cannot drift apart.
//!
//! The limits are the settings' defaults, those the gateway runs with unless told otherwise, so that a changed
//! default moves every case sized against it.

use std::sync::LazyLock;

use ingest_gateway::config::Settings;
use ingest_gateway::model::BodyFormat;

// Read once: parsing the command line on every call would weigh on the property tests, which ask for a limit per
// case.
static DEFAULTS: LazyLock<Settings> = LazyLock::new(Settings::defaults);

/// The body limit, in bytes after decompression.
pub fn max_body_bytes() -> usize {
    DEFAULTS.limits.max_body_bytes
}

/// The most updates one request may hold.
pub fn max_updates() -> usize {
    usize::try_from(DEFAULTS.limits.max_updates).expect("the update limit fits a usize")
}

/// The most broken rules a 422 lists. The gateway's own constant is private to its request handler, hence this copy.
pub const MAX_ERRORS: usize = 100;

/// What a request must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// 202: every update is taken.
    Accepted,
    /// 400 `invalid_json`: the body is not JSON the gateway can read.
    InvalidJson,
    /// 413 `payload_too_large`: more updates than one request may hold.
    TooManyUpdates,
    /// 422 `invalid_update`, with `field` of update `index` among the broken rules (`None`: the update as a whole,
    /// which is not an object).
    Refused { index: usize, field: Option<&'static str> },
}

/// Shorthand for the most common outcome: the first update refused on `field`.
const fn refused(field: &'static str) -> Expected {
    Expected::Refused {
        index: 0,
        field: Some(field),
    }
}

/// The two kinds of update the gateway takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Location,
    Poll,
}

impl Stream {
    /// A valid update made `at` (RFC 3339) with `field` set to the raw JSON `value`: in place of the update's own
    /// field of that name, or added as an unknown one. `field` goes between the quotes as written, escapes and all.
    pub fn update_with(self, at: &str, field: &str, value: &str) -> String {
        let at = format!("\"{at}\"");
        let mut fields = match self {
            Stream::Location => vec![("device_id", "\"d\""), ("recorded_at", &at), ("lat", "1"), ("lon", "2")],
            Stream::Poll => vec![("project_id", "1"), ("polled_at", &at), ("success", "true")],
        };
        match fields.iter_mut().find(|(name, _)| *name == field) {
            Some(own) => own.1 = value,
            None => fields.push((field, value)),
        }
        let fields: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", fields.join(","))
    }
}

/// One update with one field set to a raw JSON value, and what it must get.
#[derive(Debug, Clone)]
pub struct FieldCase {
    pub stream: Stream,
    pub field: &'static str,
    pub value: String,
    pub expected: Expected,
}

impl FieldCase {
    fn new(stream: Stream, field: &'static str, value: &str, expected: Expected) -> Self {
        FieldCase {
            stream,
            field,
            value: value.to_owned(),
            expected,
        }
    }

    /// The update, made `at` (RFC 3339).
    pub fn body(&self, at: &str) -> String {
        self.stream.update_with(at, self.field, &self.value)
    }
}

/// Values the rules could let through but PostgreSQL cannot store: a NUL in text or jsonb, a lone UTF-16 surrogate,
/// a number past numeric's exponent range. Each must be refused with the update, naming where it is, so that it
/// never reaches a COPY whose failure would hold up the batches behind it.
pub fn unstorable() -> Vec<FieldCase> {
    use Stream::{Location, Poll};
    vec![
        FieldCase::new(Location, "note", r#""a\u0000b""#, refused("attributes")),
        FieldCase::new(Location, r#"a\u0000b"#, "1", refused("attributes")),
        FieldCase::new(Location, "note", r#""\ud800""#, refused("attributes")),
        FieldCase::new(Location, "note", r#"["\udc00x"]"#, refused("attributes")),
        FieldCase::new(Location, "n", "1e999999", refused("attributes")),
        FieldCase::new(Location, "n", "-1e-999999", refused("attributes")),
        FieldCase::new(Poll, "error_message", r#""a\u0000b""#, refused("error_message")),
        FieldCase::new(Poll, "x", r#""\u0000""#, refused("attributes")),
    ]
}

/// The counterpart of [`unstorable`]: numbers and escapes that look as odd but that PostgreSQL does store, which
/// must keep passing.
pub fn storable() -> Vec<FieldCase> {
    use Stream::Location;
    vec![
        FieldCase::new(Location, "n", "1e400", Expected::Accepted),
        FieldCase::new(Location, "n", "123456789012345678901234567890", Expected::Accepted),
        FieldCase::new(Location, "s", r#""\u0001\ud83d\ude9a""#, Expected::Accepted),
        FieldCase::new(Location, r#"\u00e9"#, r#""é""#, Expected::Accepted),
    ]
}

/// Numbers out of range for the field they are in. One that not even an f64 holds is refused as serde_json reads
/// it, as NaN would be: the body is not JSON the gateway can read. One past u64 but within f64 is read as an f64, a
/// number out of the field's range, which the rules refuse naming the field.
pub fn numbers_out_of_range() -> Vec<FieldCase> {
    use Stream::{Location, Poll};
    let big = "123456789012345678901234567890";
    vec![
        FieldCase::new(Location, "lat", "1e400", Expected::InvalidJson),
        FieldCase::new(Location, "lon", "-1e400", Expected::InvalidJson),
        FieldCase::new(Location, "speed_kmh", "1e999999999", Expected::InvalidJson),
        FieldCase::new(Poll, "status_code", "1e400", Expected::InvalidJson),
        // An integer too long for even an f64 is out of range the same way.
        FieldCase::new(Location, "lon", &"9".repeat(400), Expected::InvalidJson),
        FieldCase::new(Location, "lat", big, refused("lat")),
        FieldCase::new(Location, "accuracy_m", &format!("-{big}"), refused("accuracy_m")),
        FieldCase::new(Location, "recorded_at", big, refused("recorded_at")),
        FieldCase::new(Poll, "project_id", big, refused("project_id")),
        FieldCase::new(
            Poll,
            "response_time_ms",
            "18446744073709551616",
            refused("response_time_ms"),
        ),
    ]
}

/// How deep the nesting cases go: a parser that recursed once per level would need far more stack for this than any
/// thread has.
pub const NESTING_LEVELS: usize = 1_000_000;

/// What deep nesting is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `[[[…]]]`
    Arrays,
    /// `{"a":{"a":…0}}`
    Objects,
}

impl Shape {
    /// `levels` levels of nesting, closed.
    pub fn closed(self, levels: usize) -> String {
        match self {
            Shape::Arrays => format!("{}{}", "[".repeat(levels), "]".repeat(levels)),
            Shape::Objects => format!("{}0{}", r#"{"a":"#.repeat(levels), "}".repeat(levels)),
        }
    }

    /// `levels` levels of nesting, never closed.
    pub fn unclosed(self, levels: usize) -> String {
        match self {
            Shape::Arrays => "[".repeat(levels),
            Shape::Objects => r#"{"a":"#.repeat(levels),
        }
    }
}

/// Deep nesting in one place of an update, and what it must get.
#[derive(Debug, Clone, Copy)]
pub struct Nesting {
    pub stream: Stream,
    /// The field that holds the nesting; `None` when the nesting is the whole update.
    pub field: Option<&'static str>,
    pub shape: Shape,
    pub expected: Expected,
}

impl Nesting {
    /// The update, made `at` (RFC 3339), with `levels` levels of nesting.
    pub fn body(&self, at: &str, levels: usize) -> String {
        let nested = self.shape.closed(levels);
        match self.field {
            Some(field) => self.stream.update_with(at, field, &nested),
            None => nested,
        }
    }
}

/// Deep nesting read to its end and then refused by the rules, naming where it is: in a known field it is the wrong
/// type, in an unknown one it is far past the attributes limit, and as the whole update it is not an object.
pub fn nesting() -> Vec<Nesting> {
    use Shape::{Arrays, Objects};
    use Stream::{Location, Poll};
    let case = |stream, field, shape, refused_on| Nesting {
        stream,
        field,
        shape,
        expected: Expected::Refused {
            index: 0,
            field: refused_on,
        },
    };
    vec![
        case(Location, Some("lat"), Arrays, Some("lat")),
        case(Location, Some("device_id"), Objects, Some("device_id")),
        case(Location, Some("extra"), Arrays, Some("attributes")),
        case(Location, Some("extra"), Objects, Some("attributes")),
        case(Poll, Some("project_id"), Arrays, Some("project_id")),
        case(Poll, Some("extra"), Objects, Some("attributes")),
        case(Location, None, Arrays, None),
    ]
}

/// Location updates made `at` (RFC 3339) whose nesting never closes, as the whole body and in an unknown field: not
/// JSON, however deep ([`Expected::InvalidJson`]).
pub fn unclosed_nesting(at: &str, levels: usize) -> Vec<String> {
    [Shape::Arrays, Shape::Objects]
        .into_iter()
        .flat_map(|shape| {
            let unclosed = shape.unclosed(levels);
            [Stream::Location.update_with(at, "extra", &unclosed), unclosed]
        })
        .collect()
}

/// `count` empty objects, as one array (JSON) or one per line (NDJSON).
pub fn empty_objects(count: usize, format: BodyFormat) -> String {
    match format {
        BodyFormat::Json => format!("[{}]", vec!["{}"; count].join(",")),
        BodyFormat::Ndjson => "{}\n".repeat(count),
    }
}

/// Counts of empty objects at the update limit and past it, and what each must get: at the limit every update is
/// read, and refused for the fields it lacks; past it the request is refused whole, however far past.
pub fn update_counts() -> Vec<(usize, Expected)> {
    vec![
        (max_updates(), refused("device_id")),
        (max_updates() + 1, Expected::TooManyUpdates),
        (2_000_000, Expected::TooManyUpdates),
    ]
}

/// A location update made `at` (RFC 3339), padded with an unknown string field to exactly `len` bytes.
pub fn padded_to(at: &str, len: usize) -> String {
    let head = Stream::Location.update_with(at, "pad", "\"\"");
    let pad = len.checked_sub(head.len()).expect("room for the update itself");
    Stream::Location.update_with(at, "pad", &format!("\"{}\"", "x".repeat(pad)))
}

/// A body as large as the limit allows, shaped to make the parser allocate as much, or work as long, as it can.
#[derive(Debug, Clone)]
pub struct LargeBody {
    pub what: &'static str,
    pub format: BodyFormat,
    pub body: String,
    /// What the body gets on the location stream.
    pub expected: Expected,
}

/// The largest hostile bodies, made `at` (RFC 3339): each at most the body limit.
pub fn largest_bodies(at: &str) -> Vec<LargeBody> {
    let max_body_bytes = max_body_bytes();
    let max_updates = max_updates();
    let fill = |unit: &str, prefix: &str, suffix: &str| {
        let n = (max_body_bytes - prefix.len() - suffix.len()) / unit.len();
        format!("{prefix}{}{suffix}", unit.repeat(n))
    };
    let mut distinct_keys = String::from("{");
    let mut i = 0u32;
    while distinct_keys.len() < max_body_bytes - 16 {
        distinct_keys.push_str(&format!("\"{i:x}\":0,"));
        i += 1;
    }
    distinct_keys.push_str("\"end\":0}");
    let per_update = max_body_bytes / max_updates;
    let tiny_keys = format!("{{{}\"z\":0}}", "\"\":0,".repeat(per_update / 5 - 2));
    let long_id = format!(r#"{{"device_id":"{}"}}"#, "d".repeat(per_update - 20));
    let body = |what, format, body, expected| LargeBody {
        what,
        format,
        body,
        expected,
    };
    use BodyFormat::{Json, Ndjson};
    vec![
        body(
            "one object with 800 000 distinct keys",
            Json,
            distinct_keys,
            refused("attributes"),
        ),
        // The empty key comes twice in each of these three: the update is refused naming it.
        body(
            "one object with 1.6 million empty keys",
            Json,
            fill("\"\":0,", "{", "\"\":0}"),
            refused(""),
        ),
        body(
            "10 000 updates of tiny keys",
            Json,
            format!("[{}]", vec![tiny_keys.as_str(); max_updates].join(",")),
            refused(""),
        ),
        body(
            "10 000 lines of tiny keys",
            Ndjson,
            vec![tiny_keys.as_str(); max_updates].join("\n"),
            refused(""),
        ),
        body(
            "10 000 updates with long device ids",
            Json,
            format!("[{}]", vec![long_id.as_str(); max_updates].join(",")),
            refused("device_id"),
        ),
        body(
            "10 000 lines with long device ids",
            Ndjson,
            vec![long_id.as_str(); max_updates].join("\n"),
            refused("device_id"),
        ),
        body(
            "an 8 MiB device id",
            Json,
            fill("d", r#"{"device_id":""#, "\"}"),
            refused("device_id"),
        ),
        body(
            "an 8 MiB unknown string",
            Json,
            padded_to(at, max_body_bytes),
            refused("attributes"),
        ),
        body(
            "an 8 MiB string of escapes",
            Json,
            fill("\\u00e9", r#"{"device_id":""#, "\"}"),
            refused("device_id"),
        ),
        body(
            "an 8 MiB number",
            Json,
            fill("9", &format!(r#"{{"device_id":"d","recorded_at":"{at}","lat":"#), "}"),
            Expected::InvalidJson,
        ),
        body(
            "4 million nesting levels",
            Json,
            Shape::Arrays.closed(max_body_bytes / 2),
            Expected::Refused { index: 0, field: None },
        ),
        body(
            "8 MiB of blank lines and then 10 000 updates",
            Ndjson,
            format!("{}{}", "\n".repeat(max_body_bytes - 30_000), "{}\n".repeat(max_updates)),
            refused("device_id"),
        ),
    ]
}
