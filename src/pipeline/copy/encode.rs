//! The binary `COPY` encoder, and the helpers that make text storable as PostgreSQL `text` and `jsonb`.

use std::borrow::Cow;

use bytes::{BufMut, BytesMut};
use time::OffsetDateTime;

use super::CopyRecord;

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01).
const POSTGRES_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// Encodes rows as a complete binary `COPY` stream: header, tuples, trailer.
pub fn encode_batch<T: CopyRecord>(rows: &[T], out: &mut BytesMut) {
    out.reserve(21 + rows.len() * 96);
    out.put_slice(b"PGCOPY\n\xff\r\n\0");
    out.put_i32(0); // flags
    out.put_i32(0); // header extension length
    for row in rows {
        out.put_i16(T::COLUMN_COUNT);
        row.encode_copy(out);
    }
    out.put_i16(-1);
}

pub(super) fn put_field(out: &mut BytesMut, bytes: &[u8]) {
    out.put_i32(bytes.len() as i32);
    out.put_slice(bytes);
}

pub(super) fn put_null(out: &mut BytesMut) {
    out.put_i32(-1);
}

pub(super) fn put_text(out: &mut BytesMut, s: &str) {
    put_field(out, s.as_bytes());
}

pub(super) fn put_f64(out: &mut BytesMut, v: f64) {
    out.put_i32(8);
    out.put_f64(v);
}

pub(super) fn put_opt_f64(out: &mut BytesMut, v: Option<f64>) {
    match v {
        Some(v) => put_f64(out, v),
        None => put_null(out),
    }
}

pub(super) fn put_timestamptz(out: &mut BytesMut, at: OffsetDateTime) {
    // Microseconds since 2000-01-01 UTC; PostgreSQL keeps no finer precision.
    let micros = (at.unix_timestamp_nanos() / 1_000) as i64 - POSTGRES_EPOCH_UNIX_SECS * 1_000_000;
    out.put_i32(8);
    out.put_i64(micros);
}

pub(super) fn put_jsonb(out: &mut BytesMut, json: Option<&str>) {
    match json {
        // The jsonb binary format is a version byte (1) followed by the JSON text.
        Some(json) => {
            out.put_i32(json.len() as i32 + 1);
            out.put_u8(1);
            out.put_slice(json.as_bytes());
        }
        None => put_null(out),
    }
}

/// `text` as PostgreSQL can store it: it refuses the NUL character in `text` (and `jsonb`).
pub(super) fn storable_text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// `value` with every NUL character in its strings and keys replaced, so that `jsonb` takes it.
pub(super) fn without_nul(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(storable_text(&s).into_owned()),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nul).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (storable_text(&k).into_owned(), without_nul(v)))
                .collect(),
        ),
        other => other,
    }
}

/// A dead letter's payload as `jsonb` can store it. Nothing validates a letter's payload (the routes make it from
/// whatever a tracker sent), and a refused letter would cost a bisection to isolate: so JSON that serde_json reads
/// (no lone surrogate, no number beyond `f64`) is kept as it is unless it escapes a NUL, which is replaced; text
/// that is not such JSON is kept whole as a string, under `unparsed`.
pub(super) fn storable_json(payload: &str) -> Cow<'_, str> {
    match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(_) if !payload.contains("\\u0000") => Cow::Borrowed(payload),
        Ok(value) => Cow::Owned(without_nul(value).to_string()),
        Err(_) => Cow::Owned(serde_json::json!({ "unparsed": storable_text(payload) }).to_string()),
    }
}
