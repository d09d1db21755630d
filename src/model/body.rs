//! Reads a request body (one JSON object, a JSON array of objects, or NDJSON) into [`RawUpdate`]s without
//! building a JSON tree: known fields become [`Scalar`]s, unknown ones are kept as where they lie in the body (16
//! bytes each, and no more than a cap per update), and the update count is checked while reading so that a body
//! of millions of `{}` never allocates millions of updates.
//!
//! What reading keeps is charged, update by update, to an allowance the caller gives (the gateway's body
//! budget): the memory a body costs is the body and what is read from it, and both are granted before they grow.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::mem::size_of;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use utoipa::openapi::schema::{ArrayBuilder, OneOfBuilder, Schema};
use utoipa::openapi::{Ref, RefOr};

use super::fields::{FieldError, Scalar, MAX_ATTRIBUTES_BYTES};

/// How the body is framed, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`: one object or an array of objects.
    Json,
    /// `application/x-ndjson`: one object per line; blank lines are skipped.
    Ndjson,
}

/// The OpenAPI schema of a JSON body of updates `U`, as [`parse_body`] reads it: one update, or an array of them.
pub struct JsonBody<U>(PhantomData<U>);

impl<U: utoipa::ToSchema> utoipa::PartialSchema for JsonBody<U> {
    fn schema() -> RefOr<Schema> {
        let update = || Ref::from_schema_name(U::name());
        let one_or_many = OneOfBuilder::new()
            .item(update())
            .item(ArrayBuilder::new().items(update()))
            .build();
        Schema::OneOf(one_or_many).into()
    }
}

impl<U: utoipa::ToSchema> utoipa::ToSchema for JsonBody<U> {
    fn name() -> Cow<'static, str> {
        Cow::Owned(format!("{}Body", U::name()))
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((U::name().into_owned(), U::schema()));
        U::schemas(schemas);
    }
}

/// One update as read from the body, before its rules are checked.
#[derive(Debug)]
pub struct RawUpdate<'de> {
    /// The known fields, in the order of the stream's field list; `None` when absent.
    pub known: Vec<Option<Scalar<'de>>>,
    /// The unknown fields, kept as where their raw JSON lies in the body.
    pub attributes: Attributes<'de>,
    /// Bytes of unknown fields seen; past twice the attributes limit they are no longer kept (the update is
    /// refused anyway), so that a body of a million tiny keys costs no more memory than its size.
    pub attributes_bytes: usize,
    /// Set when the update cannot be read at all (not an object, a key given twice).
    pub malformed: Option<FieldError>,
}

/// Unknown fields an update may have when the caller sets no cap (`INGEST_MAX_UNKNOWN_FIELDS`'s default).
pub const DEFAULT_MAX_UNKNOWN_FIELDS: usize = 64;

/// What reading one body may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// Updates in one body at most; one more refuses the body.
    pub max_updates: usize,
    /// Unknown fields of one update at most: past it the update is refused, and no more of its fields are kept.
    pub max_unknown_fields: usize,
}

/// Where one piece of the body lies, as byte offsets: half the size of a slice, and all a kept field needs.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// `None` past 4 GiB, which [`parse_body_within`] refuses before reading.
    fn new(start: usize, end: usize) -> Option<Span> {
        Some(Span {
            start: u32::try_from(start).ok()?,
            end: u32::try_from(end).ok()?,
        })
    }

    fn of(self, body: &str) -> &str {
        // Made from a member serde_json read out of this very body, on character boundaries (quotes, and the
        // ends of a JSON value): it always lies within it.
        body.get(self.start as usize..self.end as usize).unwrap_or_default()
    }
}

/// One kept unknown field: its key between the quotes, as sent (escapes and all), and its value as raw JSON.
#[derive(Debug, Clone, Copy)]
struct Member {
    key: Span,
    value: Span,
}

/// The unknown fields of one update, kept as where they lie in the body rather than as copies: 16 bytes each,
/// and at most the cap of them.
#[derive(Clone)]
pub struct Attributes<'de> {
    /// The whole body: every kept field lies in it.
    body: &'de str,
    members: Vec<Member>,
    /// Unknown fields the update has, kept or not.
    seen: usize,
    /// Unknown fields it may have.
    max: usize,
}

impl<'de> Attributes<'de> {
    fn new(body: &'de str, max: usize) -> Self {
        Attributes {
            body,
            members: Vec::new(),
            seen: 0,
            max,
        }
    }

    /// Kept fields.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Unknown fields the update has, kept or not: more than [`Self::max_fields`] refuses it.
    pub fn fields(&self) -> usize {
        self.seen
    }

    /// Unknown fields an update may have.
    pub fn max_fields(&self) -> usize {
        self.max
    }

    /// The kept field at `index`: its key, unescaped, and its value as the raw JSON that was sent.
    pub fn get(&self, index: usize) -> Option<(Cow<'de, str>, &'de str)> {
        self.members.get(index).map(|m| self.member(*m))
    }

    /// The kept fields in the order they were sent, as [`Self::get`] gives each.
    pub fn iter(&self) -> impl Iterator<Item = (Cow<'de, str>, &'de str)> + '_ {
        self.members.iter().map(|m| self.member(*m))
    }

    fn member(&self, member: Member) -> (Cow<'de, str>, &'de str) {
        let body: &'de str = self.body;
        let key = member.key.of(body);
        let key = if key.contains('\\') {
            // With its quotes, the key is a JSON string serde_json has already read once: it reads again. Should
            // it not, the key as sent is still a faithful (escaped) name.
            let quoted = body
                .get(member.key.start as usize - 1..member.key.end as usize + 1)
                .unwrap_or_default();
            serde_json::from_str::<String>(quoted).map_or(Cow::Borrowed(key), Cow::Owned)
        } else {
            Cow::Borrowed(key)
        };
        (key, member.value.of(body))
    }

    /// Bytes the kept fields take as JSON (`"key":value,`): what the `attributes` column will hold of them.
    fn json_bytes(&self) -> usize {
        self.members
            .iter()
            .map(|m| (m.key.end - m.key.start + m.value.end - m.value.start) as usize + 4)
            .sum()
    }
}

impl fmt::Debug for Attributes<'_> {
    /// The kept fields, not the whole body they point into.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attributes")
            .field("kept", &self.iter().collect::<Vec<_>>())
            .field("seen", &self.seen)
            .field("max", &self.max)
            .finish()
    }
}

/// Why a body could not be read into updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not valid JSON (or NDJSON): where the first error is, 1-based.
    InvalidJson {
        line: usize,
        column: usize,
        message: String,
    },
    /// More updates than allowed in one request.
    TooManyUpdates { limit: usize },
    /// The allowance refused what reading the body would keep: the memory is not there to read it now.
    OverBudget,
}

/// Reads `body` into raw updates for a stream whose known fields are `fields`, with at most
/// [`DEFAULT_MAX_UNKNOWN_FIELDS`] unknown fields per update and no allowance to charge.
pub fn parse_body<'de>(
    body: &'de [u8],
    format: BodyFormat,
    fields: &'static [&'static str],
    max_updates: usize,
) -> Result<Vec<RawUpdate<'de>>, BodyError> {
    let limits = ParseLimits {
        max_updates,
        max_unknown_fields: DEFAULT_MAX_UNKNOWN_FIELDS,
    };
    parse_body_within(body, format, fields, limits, &mut |_| true)
}

/// Reads `body` into raw updates within `limits`, charging `allowance` with about what each update read takes in
/// memory (and will once validated) before the next is read; when it answers false, reading stops with
/// [`BodyError::OverBudget`].
pub fn parse_body_within<'de>(
    body: &'de [u8],
    format: BodyFormat,
    fields: &'static [&'static str],
    limits: ParseLimits,
    allowance: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<RawUpdate<'de>>, BodyError> {
    // The JSON reader does not check the bytes of values it skips over: check the whole body once, up front.
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(e) => {
            let valid = &body[..e.valid_up_to()];
            let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = valid.len() - valid.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
            return Err(BodyError::InvalidJson {
                line,
                column,
                message: "the body is not valid UTF-8".into(),
            });
        }
    };
    if u32::try_from(body.len()).is_err() {
        // Kept fields are offsets of 32 bits; no body limit comes near.
        return Err(BodyError::InvalidJson {
            line: 1,
            column: 0,
            message: "the body is larger than 4 GiB".into(),
        });
    }
    let mut reading = Reading {
        body: text,
        fields,
        limits,
        allowance,
        stopped: None,
    };
    match format {
        BodyFormat::Json => parse_json(&mut reading),
        BodyFormat::Ndjson => parse_ndjson(&mut reading),
    }
}

/// What the reading of one body shares, from its top level down to each update.
struct Reading<'a, 'de> {
    body: &'de str,
    fields: &'static [&'static str],
    limits: ParseLimits,
    allowance: &'a mut dyn FnMut(usize) -> bool,
    /// Why reading stopped early, to tell that apart from bad JSON.
    stopped: Option<BodyError>,
}

/// About what the validated form of an update takes beyond the strings it moves over from its raw form: the
/// update itself (a location update is 120 bytes) and the allocator's due.
const VALIDATED_UPDATE_BYTES: usize = 160;

/// The most reading charges for one update with `known_fields` known fields, beyond the bytes it copies out of the
/// body (strings) or will copy (the attributes' JSON), which the body's own size bounds: the update, its known
/// fields and `max_unknown_fields` kept fields.
pub fn most_held_per_update(known_fields: usize, max_unknown_fields: usize) -> usize {
    2 * size_of::<RawUpdate>()
        + known_fields * size_of::<Option<Scalar>>()
        + max_unknown_fields.next_power_of_two() * size_of::<Member>()
        + VALIDATED_UPDATE_BYTES
}

impl<'de> Reading<'_, 'de> {
    fn update_seed(&self) -> UpdateSeed<'de> {
        UpdateSeed {
            body: self.body,
            fields: self.fields,
            max_unknown_fields: self.limits.max_unknown_fields,
        }
    }

    /// Charges the allowance for `update`, just read: false when it refuses.
    fn charge(&mut self, update: &RawUpdate<'_>) -> bool {
        let strings: usize = update
            .known
            .iter()
            .map(|value| match value {
                // Copied into the validated update if kept; a timestamp is parsed and dropped.
                Some(Scalar::String(s)) => s.len(),
                _ => 0,
            })
            .sum();
        // Twice the update itself: the list of updates doubles as it grows.
        let bytes = 2 * size_of::<RawUpdate>()
            + update.known.capacity() * size_of::<Option<Scalar>>()
            + strings
            + update.attributes.members.capacity() * size_of::<Member>()
            + update.attributes.json_bytes()
            + VALIDATED_UPDATE_BYTES;
        if (self.allowance)(bytes) {
            return true;
        }
        self.stopped = Some(BodyError::OverBudget);
        false
    }
}

fn parse_json<'de>(reading: &mut Reading<'_, 'de>) -> Result<Vec<RawUpdate<'de>>, BodyError> {
    let mut de = serde_json::Deserializer::from_str(reading.body);
    let result = BodySeed { reading: &mut *reading }
        .deserialize(&mut de)
        .and_then(|updates| de.end().map(|()| updates));
    result.map_err(|e| reading.stopped.take().unwrap_or_else(|| invalid_json(&e, 0)))
}

fn parse_ndjson<'de>(reading: &mut Reading<'_, 'de>) -> Result<Vec<RawUpdate<'de>>, BodyError> {
    let max_updates = reading.limits.max_updates;
    let body = reading.body;
    let mut updates = Vec::new();
    for (line_index, line) in body.split('\n').enumerate() {
        if line.bytes().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        if updates.len() == max_updates {
            return Err(BodyError::TooManyUpdates { limit: max_updates });
        }
        let mut de = serde_json::Deserializer::from_str(line);
        let update = reading
            .update_seed()
            .deserialize(&mut de)
            .and_then(|u| de.end().map(|()| u))
            .map_err(|e| invalid_json(&e, line_index))?;
        if !reading.charge(&update) {
            return Err(BodyError::OverBudget);
        }
        updates.push(update);
    }
    if updates.is_empty() {
        return Err(BodyError::InvalidJson {
            line: 1,
            column: 0,
            message: "the body holds no update".into(),
        });
    }
    Ok(updates)
}

fn invalid_json(e: &serde_json::Error, line_offset: usize) -> BodyError {
    BodyError::InvalidJson {
        line: e.line() + line_offset,
        column: e.column(),
        message: e.to_string(),
    }
}

/// The top level of a JSON body: an object (one update) or an array of them.
struct BodySeed<'r, 'a, 'de> {
    reading: &'r mut Reading<'a, 'de>,
}

impl<'de> DeserializeSeed<'de> for BodySeed<'_, '_, 'de> {
    type Value = Vec<RawUpdate<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_, '_, 'de> {
    type Value = Vec<RawUpdate<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object or an array of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let max_updates = self.reading.limits.max_updates;
        let mut updates = Vec::new();
        loop {
            if updates.len() == max_updates {
                // One more element, if any, is one too many: stop before reading it.
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    self.reading.stopped = Some(BodyError::TooManyUpdates { limit: max_updates });
                    return Err(de::Error::custom("too many updates"));
                }
                return Ok(updates);
            }
            match seq.next_element_seed(self.reading.update_seed())? {
                Some(update) => {
                    if !self.reading.charge(&update) {
                        return Err(de::Error::custom("over the body budget"));
                    }
                    updates.push(update);
                }
                None => return Ok(updates),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let update = self.reading.update_seed().visit_map(map)?;
        if !self.reading.charge(&update) {
            return Err(de::Error::custom("over the body budget"));
        }
        Ok(vec![update])
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(vec![RawUpdate::not_an_object()])
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(vec![RawUpdate::not_an_object()])
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(vec![RawUpdate::not_an_object()])
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(vec![RawUpdate::not_an_object()])
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(vec![RawUpdate::not_an_object()])
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(vec![RawUpdate::not_an_object()])
    }
}

impl RawUpdate<'_> {
    fn not_an_object() -> Self {
        RawUpdate {
            known: Vec::new(),
            attributes: Attributes::new("", 0),
            attributes_bytes: 0,
            malformed: Some(FieldError {
                field: None,
                reason: "must be a JSON object".into(),
            }),
        }
    }
}

/// One update: an object whose keys are sorted into known fields and attributes.
#[derive(Clone, Copy)]
struct UpdateSeed<'de> {
    /// The whole body, which the kept fields' offsets count from.
    body: &'de str,
    fields: &'static [&'static str],
    max_unknown_fields: usize,
}

impl<'de> UpdateSeed<'de> {
    /// Where the member whose raw value is `value` lies in the body. serde_json hands the value out as a slice of
    /// the body itself, so its offset is a difference of addresses; the key is found by walking back from it.
    fn locate(&self, value: &'de str) -> Option<Member> {
        let start = (value.as_ptr() as usize).checked_sub(self.body.as_ptr() as usize)?;
        let end = start.checked_add(value.len()).filter(|end| *end <= self.body.len())?;
        let (key_start, key_end) = key_before(self.body.as_bytes(), start)?;
        Some(Member {
            key: Span::new(key_start, key_end)?,
            value: Span::new(start, end)?,
        })
    }
}

/// Where the key of an object member lies (between its quotes) when its value starts at `value_start`. The member
/// has been read as JSON already, so what comes before the value is `"key"`, blanks, `:` and blanks; the opening
/// quote is the first one back that no backslash escapes (a quote inside a key always follows an odd run of
/// backslashes, and the opening one follows a brace, a comma or a blank).
fn key_before(body: &[u8], value_start: usize) -> Option<(usize, usize)> {
    let is_blank = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let before_value = &body[..value_start];
    let colon = before_value.iter().rposition(|b| !is_blank(b))?;
    (body[colon] == b':').then_some(())?;
    let closing = body[..colon].iter().rposition(|b| !is_blank(b))?;
    (body[closing] == b'"').then_some(())?;
    let mut search_end = closing;
    loop {
        let quote = body[..search_end].iter().rposition(|b| *b == b'"')?;
        let backslashes = body[..quote].iter().rev().take_while(|b| **b == b'\\').count();
        if backslashes % 2 == 0 {
            return Some((quote + 1, closing));
        }
        search_end = quote;
    }
}

impl<'de> DeserializeSeed<'de> for UpdateSeed<'de> {
    type Value = RawUpdate<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UpdateSeed<'de> {
    type Value = RawUpdate<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut known: Vec<Option<Scalar<'de>>> = vec![None; self.fields.len()];
        let mut attributes = Attributes::new(self.body, self.max_unknown_fields);
        let mut attributes_bytes = 0usize;
        let mut duplicate: Option<String> = None;
        while let Some(key) = map.next_key_seed(KeySeed { fields: self.fields })? {
            match key {
                Key::Known(i) => {
                    let value = map.next_value::<Scalar>()?;
                    if known[i].replace(value).is_some() && duplicate.is_none() {
                        duplicate = Some(self.fields[i].to_owned());
                    }
                }
                Key::Other { len } => {
                    let value = map.next_value::<&'de RawValue>()?;
                    attributes_bytes += len + value.get().len() + 4;
                    attributes.seen += 1;
                    // Past the cap the update is refused: the fields read on cost nothing but their reading.
                    if attributes_bytes <= 2 * MAX_ATTRIBUTES_BYTES && attributes.seen <= attributes.max {
                        let member = self
                            .locate(value.get())
                            .ok_or_else(|| de::Error::custom("a field that lies outside the body"))?;
                        attributes.members.push(member);
                    }
                }
            }
        }
        if duplicate.is_none() && attributes.len() > 1 {
            // Sorting finds a repeated unknown key in n·log n, whatever the number of keys.
            let mut names: Vec<Cow<'_, str>> = attributes.iter().map(|(k, _)| k).collect();
            names.sort_unstable();
            duplicate = names
                .windows(2)
                .find(|w| w[0] == w[1])
                .map(|w| w[0].clone().into_owned());
        }
        let malformed = duplicate.map(|name| FieldError {
            field: Some(name),
            reason: "appears more than once".into(),
        });
        Ok(RawUpdate {
            known,
            attributes,
            attributes_bytes,
            malformed,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(RawUpdate::not_an_object())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(RawUpdate::not_an_object())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(RawUpdate::not_an_object())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(RawUpdate::not_an_object())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(RawUpdate::not_an_object())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(RawUpdate::not_an_object())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(RawUpdate::not_an_object())
    }
}

/// A key of an update object: the index of a known field, or an attribute and its length once unescaped.
enum Key {
    Known(usize),
    Other { len: usize },
}

struct KeySeed {
    fields: &'static [&'static str],
}

impl KeySeed {
    fn find(&self, key: &str) -> Option<usize> {
        self.fields.iter().position(|f| *f == key)
    }
}

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    // An escaped key arrives unescaped in serde_json's scratch space: only its length is taken here, and the key
    // is found again in the body when it is needed.
    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.find(key).map_or(Key::Other { len: key.len() }, Key::Known))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: &[&str] = &["a", "b"];

    fn parse(body: &str, format: BodyFormat, max: usize) -> Result<Vec<RawUpdate<'_>>, BodyError> {
        parse_body(body.as_bytes(), format, FIELDS, max)
    }

    #[test]
    fn reads_one_object_an_array_and_ndjson_alike() {
        assert_eq!(parse(r#"{"a":1}"#, BodyFormat::Json, 10).unwrap().len(), 1);
        assert_eq!(parse(r#"[{"a":1},{"b":"x"}]"#, BodyFormat::Json, 10).unwrap().len(), 2);
        assert_eq!(
            parse("{\"a\":1}\n\n{\"b\":2}\n", BodyFormat::Ndjson, 10).unwrap().len(),
            2
        );
    }

    #[test]
    fn sorts_known_fields_from_attributes() {
        let updates = parse(r#"{"b":true,"x":{"y":[1,2]},"a":null}"#, BodyFormat::Json, 10).unwrap();
        let u = &updates[0];
        assert_eq!(u.known, vec![Some(Scalar::Null), Some(Scalar::Bool(true))]);
        assert_eq!(u.attributes.len(), 1);
        let (name, value) = u.attributes.get(0).unwrap();
        assert_eq!(name, "x");
        assert_eq!(value, r#"{"y":[1,2]}"#);
        assert!(u.malformed.is_none());
    }

    #[test]
    fn an_attribute_is_found_in_the_body_whatever_its_escapes_and_spacing() {
        let body = "[{\"a\":1},{ \"q\\\"\\\\\" \t:\r\n [\"v\"] , \"caf\\u00e9\":2,\"\\\\\":{}}]";
        let updates = parse(body, BodyFormat::Json, 10).unwrap();
        let kept: Vec<_> = updates[1].attributes.iter().collect();
        assert_eq!(
            kept,
            [
                (Cow::from("q\"\\"), r#"["v"]"#),
                (Cow::from("café"), "2"),
                (Cow::from("\\"), "{}"),
            ]
        );
        let lines = parse("{\"a\":1}\n\n{\"b\":2, \"x\" : [1] }\n", BodyFormat::Ndjson, 10).unwrap();
        assert_eq!(lines[1].attributes.get(0), Some((Cow::from("x"), "[1]")));
    }

    #[test]
    fn an_escaped_key_repeating_a_plain_one_makes_the_update_malformed() {
        let updates = parse(r#"{"xA":1,"x\u0041":2}"#, BodyFormat::Json, 10).unwrap();
        assert_eq!(updates[0].malformed.as_ref().unwrap().field.as_deref(), Some("xA"));
    }

    fn within<'de>(
        body: &'de str,
        max_unknown_fields: usize,
        allowance: &mut dyn FnMut(usize) -> bool,
    ) -> Result<Vec<RawUpdate<'de>>, BodyError> {
        let limits = ParseLimits {
            max_updates: 10,
            max_unknown_fields,
        };
        parse_body_within(body.as_bytes(), BodyFormat::Json, FIELDS, limits, allowance)
    }

    #[test]
    fn past_the_cap_unknown_fields_are_counted_but_no_longer_kept() {
        let body = r#"{"a":1,"x":1,"y":2,"z":3,"w":4}"#;
        let update = &within(body, 3, &mut |_| true).unwrap()[0];
        assert_eq!((update.attributes.len(), update.attributes.fields()), (3, 4));
        assert_eq!(update.attributes.max_fields(), 3);
        assert_eq!(update.attributes.get(2).unwrap().0, "z");
    }

    #[test]
    fn the_allowance_is_charged_for_every_update_and_a_refusal_stops_the_reading() {
        let body = r#"[{"a":"text","x":1},{},{}]"#;
        let mut charges = Vec::new();
        assert_eq!(
            within(body, 64, &mut |n| {
                charges.push(n);
                true
            })
            .unwrap()
            .len(),
            3
        );
        assert_eq!(charges.len(), 3);
        assert!(
            charges[0] > charges[1],
            "a string and a kept field cost more: {charges:?}"
        );
        assert!(
            charges[1] >= 2 * size_of::<RawUpdate>() + VALIDATED_UPDATE_BYTES,
            "{charges:?}"
        );
        let mut left = 2;
        let refused = within(body, 64, &mut |_| {
            left -= 1;
            left > 0
        });
        assert_eq!(refused.unwrap_err(), BodyError::OverBudget);
        for ndjson in ["{}\n{}\n", "{}"] {
            let result = parse_body_within(
                ndjson.as_bytes(),
                BodyFormat::Ndjson,
                FIELDS,
                ParseLimits {
                    max_updates: 10,
                    max_unknown_fields: 1,
                },
                &mut |_| false,
            );
            assert_eq!(result.unwrap_err(), BodyError::OverBudget);
        }
        assert_eq!(within("{}", 64, &mut |_| false).unwrap_err(), BodyError::OverBudget);
    }

    #[test]
    fn a_key_is_found_back_from_its_value() {
        let body = br#"{"a\"b" : 1,"c\\":2}"#;
        let one = body.iter().position(|b| *b == b'1').unwrap();
        assert_eq!(key_before(body, one), Some((2, 6)));
        let two = body.iter().position(|b| *b == b'2').unwrap();
        assert_eq!(
            &body[key_before(body, two).unwrap().0..key_before(body, two).unwrap().1],
            br#"c\\"#
        );
        assert_eq!(key_before(b"[1]", 1), None);
    }

    #[test]
    fn a_key_given_twice_makes_the_update_malformed() {
        for body in [r#"{"a":1,"a":2}"#, r#"{"x":1,"y":2,"x":3}"#] {
            let updates = parse(body, BodyFormat::Json, 10).unwrap();
            assert_eq!(updates[0].malformed.as_ref().unwrap().reason, "appears more than once");
        }
    }

    #[test]
    fn an_array_over_the_limit_is_refused_before_it_is_read_whole() {
        let body = format!("[{}]", ["{}"; 11].join(","));
        assert_eq!(
            parse(&body, BodyFormat::Json, 10).unwrap_err(),
            BodyError::TooManyUpdates { limit: 10 }
        );
        let ten = format!("[{}]", ["{}"; 10].join(","));
        assert_eq!(parse(&ten, BodyFormat::Json, 10).unwrap().len(), 10);
        let ndjson = "{}\n".repeat(11);
        assert_eq!(
            parse(&ndjson, BodyFormat::Ndjson, 10).unwrap_err(),
            BodyError::TooManyUpdates { limit: 10 }
        );
    }

    #[test]
    fn bad_json_reports_line_and_column() {
        let err = parse("{\"a\":1}\n{\"a\":", BodyFormat::Ndjson, 10).unwrap_err();
        assert!(matches!(err, BodyError::InvalidJson { line: 2, .. }), "{err:?}");
        let err = parse("[{\"a\":1},\n  {\"a\" 1}]", BodyFormat::Json, 10).unwrap_err();
        assert!(
            matches!(err, BodyError::InvalidJson { line: 2, column: 8, .. }),
            "{err:?}"
        );
        for body in ["", "   ", "NaN", r#"{"a":Infinity}"#, "{} {}", r#"{"a":1e999}"#] {
            assert!(
                matches!(parse(body, BodyFormat::Json, 10), Err(BodyError::InvalidJson { .. })),
                "{body}"
            );
        }
    }

    #[test]
    fn deep_nesting_is_read_without_recursion() {
        let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let in_attribute = format!(r#"{{"x":{nested}}}"#);
        let update = &parse(&in_attribute, BodyFormat::Json, 10).unwrap()[0];
        assert!(update.attributes.is_empty(), "too large to keep");
        assert_eq!(update.attributes_bytes, 1 + nested.len() + 4);
        let in_known_field = format!(r#"{{"a":{nested}}}"#);
        assert_eq!(
            parse(&in_known_field, BodyFormat::Json, 10).unwrap()[0].known[0],
            Some(Scalar::Compound)
        );
        assert!(parse(&nested, BodyFormat::Json, 10).unwrap()[0].malformed.is_some());
    }

    #[test]
    fn a_scalar_or_array_where_an_update_belongs_is_malformed() {
        let updates = parse(r#"[1, "x", [2], null, {}]"#, BodyFormat::Json, 10).unwrap();
        assert_eq!(updates.iter().filter(|u| u.malformed.is_some()).count(), 4);
        assert!(parse("42", BodyFormat::Json, 10).unwrap()[0].malformed.is_some());
    }
}
