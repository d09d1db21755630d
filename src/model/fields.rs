//! Field-level rules shared by both streams: timestamps, numbers in a range, the attributes' size and count.

use std::borrow::Cow;
use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, SchemaType, Type};

use super::body::Attributes;

/// The rules that depend on settings and on the clock.
#[derive(Debug, Clone)]
pub struct ValidationRules {
    /// The gateway's clock when the request arrived.
    pub now: OffsetDateTime,
    /// How far in the future a timestamp may be.
    pub max_future_skew: Duration,
    /// How old a timestamp may be.
    pub max_age: Duration,
    /// Largest serialized size of the unknown fields of one update.
    pub max_attributes_bytes: usize,
}

/// Serialized size limit of the `attributes` of one update.
pub const MAX_ATTRIBUTES_BYTES: usize = 4096;

impl ValidationRules {
    /// Rules with the documented defaults at `now`.
    pub fn with_defaults(now: OffsetDateTime) -> Self {
        Self {
            now,
            max_future_skew: Duration::from_secs(5 * 60),
            max_age: Duration::from_secs(30 * 86_400),
            max_attributes_bytes: MAX_ATTRIBUTES_BYTES,
        }
    }
}

/// The values a number field takes: finite, from `min`, up to `max` (or below it when `max_exclusive`). The
/// validators check it and the OpenAPI document shows it, so the two cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NumberRange {
    /// The smallest value taken.
    pub min: f64,
    /// The largest value taken, or, with `max_exclusive`, the first one refused.
    pub max: f64,
    pub max_exclusive: bool,
}

/// The values an integer field takes: `min` to `max`, both included.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntegerRange {
    /// The smallest value taken.
    pub min: i64,
    /// The largest value taken.
    pub max: i64,
}

/// Whether an update must carry a field. An optional field may also be `null`, which means absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presence {
    Required,
    Optional,
}

impl Presence {
    /// The JSON type of a field of this presence: `null` is allowed where the field may be absent.
    pub(crate) fn schema_type(self, of: Type) -> SchemaType {
        match self {
            Presence::Required => SchemaType::Type(of),
            Presence::Optional => SchemaType::from_iter([of, Type::Null]),
        }
    }
}

impl NumberRange {
    /// Whether `n` is a value of this range (finite, within it).
    pub fn contains(self, n: f64) -> bool {
        let above = if self.max_exclusive {
            n >= self.max
        } else {
            n > self.max
        };
        n.is_finite() && n >= self.min && !above
    }

    /// The JSON Schema of a field that [`Checker::number`] accepts with this range.
    pub(crate) fn schema(self, presence: Presence, description: &str) -> Schema {
        let builder = ObjectBuilder::new()
            .schema_type(presence.schema_type(Type::Number))
            .description(Some(description))
            .minimum(Some(self.min));
        let builder = if self.max_exclusive {
            builder.exclusive_maximum(Some(self.max))
        } else {
            builder.maximum(Some(self.max))
        };
        builder.build().into()
    }
}

impl IntegerRange {
    /// The JSON Schema of a field that [`Checker::integer`] accepts with this range.
    pub(crate) fn schema(self, presence: Presence, description: &str) -> Schema {
        ObjectBuilder::new()
            .schema_type(presence.schema_type(Type::Integer))
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .description(Some(description))
            .minimum(Some(self.min))
            .maximum(Some(self.max))
            .build()
            .into()
    }
}

/// The JSON Schema of a field that [`Checker::timestamp`] reads. The window around the gateway's clock cannot be
/// written in JSON Schema; the description says it.
pub(crate) fn timestamp_schema(description: &str) -> Schema {
    OneOfBuilder::new()
        .description(Some(format!(
            "{description}: an RFC 3339 timestamp with offset, or integer Unix milliseconds; not more than the \
             allowed skew (5 min by default) in the future, not older than the allowed age (30 days by default)"
        )))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64))),
        )
        .build()
        .into()
}

/// One broken rule of one field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// The field; `None` for the update as a whole.
    pub field: Option<String>,
    /// What is wrong, as a short phrase.
    pub reason: String,
}

impl FieldError {
    pub(crate) fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_owned()),
            reason: reason.into(),
        }
    }
}

/// A known field's value as sent: scalars are kept, objects and arrays are skipped over (no field takes them),
/// so that a hostile value costs no memory.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'de> {
    Null,
    Bool(bool),
    Int(i64),
    /// An integer above `i64::MAX`.
    BigInt(u64),
    Float(f64),
    /// Borrowed from the body unless it had escapes: a timestamp is only parsed, and a string field kept is copied
    /// once, into the validated update.
    String(Cow<'de, str>),
    /// An object or an array.
    Compound,
}

impl Scalar<'_> {
    fn as_f64(&self) -> Option<f64> {
        match *self {
            Scalar::Int(n) => Some(n as f64),
            Scalar::BigInt(n) => Some(n as f64),
            Scalar::Float(n) => Some(n),
            _ => None,
        }
    }
}

impl<'de> serde::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> serde::de::Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
        Ok(i64::try_from(v).map_or(Scalar::BigInt(v), Scalar::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::String(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::String(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Scalar<'de>, E> {
        Ok(Scalar::String(Cow::Owned(v)))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar<'de>, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Scalar::Compound)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Scalar<'de>, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Scalar::Compound)
    }
}

/// Collects the broken rules of one update while its fields are read.
#[derive(Default)]
pub(crate) struct Checker {
    pub errors: Vec<FieldError>,
}

impl Checker {
    fn fail(&mut self, field: &str, reason: impl Into<String>) {
        self.errors.push(FieldError::new(field, reason));
    }

    /// A required field; JSON `null` counts as missing.
    pub fn required<'de>(&mut self, field: &str, value: Option<Scalar<'de>>) -> Option<Scalar<'de>> {
        match value {
            None | Some(Scalar::Null) => {
                self.fail(field, "is required");
                None
            }
            some => some,
        }
    }

    /// An optional field; JSON `null` counts as absent.
    pub fn optional(value: Option<Scalar<'_>>) -> Option<Scalar<'_>> {
        value.filter(|v| *v != Scalar::Null)
    }

    pub fn string(&mut self, field: &str, value: Scalar<'_>) -> Option<String> {
        match value {
            Scalar::String(s) => Some(s.into_owned()),
            _ => {
                self.fail(field, "must be a string");
                None
            }
        }
    }

    pub fn boolean(&mut self, field: &str, value: Scalar<'_>) -> Option<bool> {
        match value {
            Scalar::Bool(b) => Some(b),
            _ => {
                self.fail(field, "must be true or false");
                None
            }
        }
    }

    /// A finite number within `range`.
    pub fn number(&mut self, field: &str, value: Scalar<'_>, range: NumberRange) -> Option<f64> {
        let NumberRange {
            min,
            max,
            max_exclusive,
        } = range;
        let Some(n) = value.as_f64() else {
            self.fail(field, "must be a number");
            return None;
        };
        let above = if max_exclusive { n >= max } else { n > max };
        if !n.is_finite() || n < min || above {
            let upper = if max_exclusive { "below" } else { "at most" };
            self.fail(field, format!("must be a finite number from {min} and {upper} {max}"));
            return None;
        }
        Some(n)
    }

    /// An integer within `range`.
    pub fn integer(&mut self, field: &str, value: Scalar<'_>, range: IntegerRange) -> Option<i64> {
        let IntegerRange { min, max } = range;
        match value {
            Scalar::Int(n) if (min..=max).contains(&n) => Some(n),
            Scalar::Int(_) | Scalar::BigInt(_) => {
                self.fail(field, format!("must be an integer from {min} to {max}"));
                None
            }
            _ => {
                self.fail(field, "must be an integer");
                None
            }
        }
    }

    /// An RFC 3339 timestamp with offset, or integer Unix milliseconds, within the allowed window.
    pub fn timestamp(&mut self, field: &str, value: Scalar<'_>, rules: &ValidationRules) -> Option<OffsetDateTime> {
        let parsed = match &value {
            Scalar::String(s) => OffsetDateTime::parse(s, &Rfc3339).ok(),
            Scalar::Int(ms) => OffsetDateTime::from_unix_timestamp_nanos(i128::from(*ms) * 1_000_000).ok(),
            _ => None,
        };
        let Some(at) = parsed else {
            self.fail(
                field,
                "must be an RFC 3339 timestamp with offset or integer Unix milliseconds",
            );
            return None;
        };
        if at > rules.now + rules.max_future_skew {
            self.fail(
                field,
                format!(
                    "is more than {} in the future",
                    humantime::format_duration(rules.max_future_skew)
                ),
            );
            return None;
        }
        if at < rules.now - rules.max_age {
            self.fail(
                field,
                format!("is older than {}", humantime::format_duration(rules.max_age)),
            );
            return None;
        }
        Some(at)
    }

    /// The unknown fields as one JSON object, built from the raw JSON that was sent, for the `attributes`
    /// column; `None` when there are none. `seen_bytes` counts them all, even those no longer kept.
    pub fn attributes(
        &mut self,
        attributes: &Attributes<'_>,
        seen_bytes: usize,
        rules: &ValidationRules,
    ) -> Option<String> {
        if attributes.is_empty() && seen_bytes == 0 {
            return None;
        }
        if attributes.fields() > attributes.max_fields() {
            // Reading stopped keeping them at the cap: what was kept is not what was sent.
            self.fail(
                "attributes",
                format!(
                    "has {} unknown fields; at most {} are taken",
                    attributes.fields(),
                    attributes.max_fields()
                ),
            );
            return None;
        }
        if seen_bytes > rules.max_attributes_bytes * 2 {
            // Far over the limit: say so without building the string.
            self.fail("attributes", too_large(seen_bytes, rules));
            return None;
        }
        let mut json = String::with_capacity(seen_bytes + 2);
        json.push('{');
        for (i, (key, value)) in attributes.iter().enumerate() {
            if let Some(reason) = unstorable(&key).or_else(|| unstorable_json(value)) {
                self.fail("attributes", format!("`{key}` {reason}"));
                return None;
            }
            if i > 0 {
                json.push(',');
            }
            // A `&str` always serializes: the only failure serde_json knows here is a non-string map key.
            json.push_str(&serde_json::to_string(key.as_ref()).unwrap_or_default());
            json.push(':');
            json.push_str(value);
        }
        json.push('}');
        if json.len() > rules.max_attributes_bytes {
            self.fail("attributes", too_large(json.len(), rules));
            return None;
        }
        Some(json)
    }

    /// A string PostgreSQL can store in a `text` column (no NUL character).
    pub fn storable(&mut self, field: &str, value: String) -> Option<String> {
        match unstorable(&value) {
            None => Some(value),
            Some(reason) => {
                self.fail(field, reason);
                None
            }
        }
    }

    pub fn finish<T>(self, value: Option<T>) -> Result<T, Vec<FieldError>> {
        match value {
            Some(v) if self.errors.is_empty() => Ok(v),
            _ => Err(self.errors),
        }
    }
}

/// Why PostgreSQL could not store `text`, if it could not: it refuses the NUL character in `text` and `jsonb`.
pub(crate) fn unstorable(text: &str) -> Option<&'static str> {
    text.contains('\0')
        .then_some("must not contain the NUL character (\\u0000), which PostgreSQL cannot store")
}

/// Largest decimal exponent accepted in attributes: PostgreSQL's `numeric` (which `jsonb` uses for numbers)
/// refuses values far beyond this, and no real measurement needs more.
const MAX_JSON_EXPONENT: u32 = 1000;

const LONE_SURROGATE: &str = "holds a lone UTF-16 surrogate, which PostgreSQL cannot store";

/// Why PostgreSQL's `jsonb` could not store a JSON value that serde_json accepted as raw text, if it could not:
/// an escape that decodes to NUL or to a lone surrogate, or a number whose exponent is beyond `numeric`.
pub(crate) fn unstorable_json(raw: &str) -> Option<&'static str> {
    const NUL: &str = "must not contain the NUL character (\\u0000), which PostgreSQL cannot store";
    let bytes = raw.as_bytes();
    let mut i = 0;
    let mut in_string = false;
    // A high surrogate waits for its low half, which must come next.
    let mut pending_high = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if b == b'\\' && bytes.get(i + 1) == Some(&b'u') {
                let unit = raw.get(i + 2..i + 6).and_then(|h| u16::from_str_radix(h, 16).ok())?;
                match unit {
                    0 => return Some(NUL),
                    0xD800..=0xDBFF if !pending_high => pending_high = true,
                    0xDC00..=0xDFFF if pending_high => pending_high = false,
                    _ if pending_high => return Some(LONE_SURROGATE),
                    0xD800..=0xDFFF => return Some(LONE_SURROGATE),
                    _ => {}
                }
                i += 6;
                continue;
            }
            if pending_high {
                return Some(LONE_SURROGATE);
            }
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'e' | b'E' => {
                    let digits = bytes[i + 1..].iter().skip_while(|c| matches!(c, b'+' | b'-'));
                    let exponent = digits
                        .take_while(|c| c.is_ascii_digit())
                        .fold(0u32, |n, c| n.saturating_mul(10).saturating_add(u32::from(c - b'0')));
                    if exponent > MAX_JSON_EXPONENT {
                        return Some("holds a number whose exponent PostgreSQL cannot store");
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    None
}

fn too_large(bytes: usize, rules: &ValidationRules) -> String {
    format!(
        "the unknown fields take {bytes} bytes as JSON; at most {} are kept",
        rules.max_attributes_bytes
    )
}
