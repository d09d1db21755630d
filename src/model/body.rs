//! Reads a request body (one JSON object, a JSON array of objects, or NDJSON) into [`RawUpdate`]s without
//! building a JSON tree: known fields become [`Scalar`]s, unknown ones stay borrowed raw JSON, and the update
//! count is checked while reading so that a body of millions of `{}` never allocates millions of updates.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

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
    pub known: Vec<Option<Scalar>>,
    /// The unknown fields, kept as the raw JSON that was sent.
    pub attributes: Vec<(Cow<'de, str>, &'de RawValue)>,
    /// Bytes of unknown fields seen; past twice the attributes limit they are no longer kept (the update is
    /// refused anyway), so that a body of a million tiny keys costs no more memory than its size.
    pub attributes_bytes: usize,
    /// Set when the update cannot be read at all (not an object, a key given twice).
    pub malformed: Option<FieldError>,
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
}

/// Reads `body` into raw updates for a stream whose known fields are `fields`.
pub fn parse_body<'de>(
    body: &'de [u8],
    format: BodyFormat,
    fields: &'static [&'static str],
    max_updates: usize,
) -> Result<Vec<RawUpdate<'de>>, BodyError> {
    // The JSON reader does not check the bytes of values it skips over: check the whole body once, up front.
    if let Err(e) = std::str::from_utf8(body) {
        let valid = &body[..e.valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = valid.len() - valid.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
        return Err(BodyError::InvalidJson {
            line,
            column,
            message: "the body is not valid UTF-8".into(),
        });
    }
    match format {
        BodyFormat::Json => parse_json(body, fields, max_updates),
        BodyFormat::Ndjson => parse_ndjson(body, fields, max_updates),
    }
}

fn parse_json<'de>(
    body: &'de [u8],
    fields: &'static [&'static str],
    max_updates: usize,
) -> Result<Vec<RawUpdate<'de>>, BodyError> {
    let too_many = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let seed = BodySeed {
        fields,
        max_updates,
        too_many: &too_many,
    };
    let result = seed.deserialize(&mut de).and_then(|updates| de.end().map(|()| updates));
    result.map_err(|e| {
        if too_many.get() {
            BodyError::TooManyUpdates { limit: max_updates }
        } else {
            invalid_json(&e, 0)
        }
    })
}

fn parse_ndjson<'de>(
    body: &'de [u8],
    fields: &'static [&'static str],
    max_updates: usize,
) -> Result<Vec<RawUpdate<'de>>, BodyError> {
    let mut updates = Vec::new();
    for (line_index, line) in body.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if updates.len() == max_updates {
            return Err(BodyError::TooManyUpdates { limit: max_updates });
        }
        let mut de = serde_json::Deserializer::from_slice(line);
        let update = UpdateSeed { fields }
            .deserialize(&mut de)
            .and_then(|u| de.end().map(|()| u))
            .map_err(|e| invalid_json(&e, line_index))?;
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
struct BodySeed<'a> {
    fields: &'static [&'static str],
    max_updates: usize,
    /// Set when reading stopped because the array holds too many updates, to tell that apart from bad JSON.
    too_many: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for BodySeed<'_> {
    type Value = Vec<RawUpdate<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_> {
    type Value = Vec<RawUpdate<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object or an array of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut updates = Vec::new();
        loop {
            if updates.len() == self.max_updates {
                // One more element, if any, is one too many: stop before reading it.
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    self.too_many.set(true);
                    return Err(de::Error::custom("too many updates"));
                }
                return Ok(updates);
            }
            match seq.next_element_seed(UpdateSeed { fields: self.fields })? {
                Some(update) => updates.push(update),
                None => return Ok(updates),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        UpdateSeed { fields: self.fields }.visit_map(map).map(|u| vec![u])
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
            attributes: Vec::new(),
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
struct UpdateSeed {
    fields: &'static [&'static str],
}

impl<'de> DeserializeSeed<'de> for UpdateSeed {
    type Value = RawUpdate<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UpdateSeed {
    type Value = RawUpdate<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut known: Vec<Option<Scalar>> = vec![None; self.fields.len()];
        let mut attributes = Vec::new();
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
                Key::Other(name) => {
                    let value = map.next_value::<&'de RawValue>()?;
                    attributes_bytes += name.len() + value.get().len() + 4;
                    if attributes_bytes <= 2 * MAX_ATTRIBUTES_BYTES {
                        attributes.push((name, value));
                    }
                }
            }
        }
        if duplicate.is_none() && attributes.len() > 1 {
            // Sorting finds a repeated unknown key in n·log n, whatever the number of keys.
            let mut names: Vec<&str> = attributes.iter().map(|(k, _)| k.as_ref()).collect();
            names.sort_unstable();
            duplicate = names.windows(2).find(|w| w[0] == w[1]).map(|w| w[0].to_owned());
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

/// A key of an update object: the index of a known field, or the name of an attribute.
enum Key<'de> {
    Known(usize),
    Other(Cow<'de, str>),
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
    type Value = Key<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Self::Value, E> {
        Ok(self.find(key).map_or(Key::Other(Cow::Borrowed(key)), Key::Known))
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self
            .find(key)
            .map_or_else(|| Key::Other(Cow::Owned(key.to_owned())), Key::Known))
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
        assert_eq!(u.attributes[0].0, "x");
        assert_eq!(u.attributes[0].1.get(), r#"{"y":[1,2]}"#);
        assert!(u.malformed.is_none());
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
