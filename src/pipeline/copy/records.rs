//! The per-stream SQL: each row type's table, columns, natural key, binary encoding, `NOTIFY` summary and
//! "latest per key" upsert.

use bytes::{BufMut, BytesMut};
use deadpool_postgres::StatementCache;
use time::OffsetDateTime;
use tokio_postgres::Transaction;

use super::encode::{
    put_f64, put_jsonb, put_null, put_opt_f64, put_text, put_timestamptz, storable_json, storable_text, without_nul,
};
use super::{BoxedWrite, CopyRecord};
use crate::model::{DeadLetter, LocationUpdate, PollResult};

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn raw_json(attributes: &Option<String>) -> serde_json::Value {
    attributes
        .as_deref()
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// The earliest and latest of some times, as RFC 3339.
fn time_range(times: impl Iterator<Item = OffsetDateTime>) -> (Option<String>, Option<String>) {
    let (min, max) = times.fold(
        (None, None),
        |(min, max): (Option<OffsetDateTime>, Option<OffsetDateTime>), t| {
            (Some(min.map_or(t, |m| m.min(t))), Some(max.map_or(t, |m| m.max(t))))
        },
    );
    (min.map(rfc3339), max.map(rfc3339))
}

impl CopyRecord for LocationUpdate {
    const TABLE: &'static str = "location_updates";
    const COLUMNS: &'static str =
        "device_id, recorded_at, lat, lon, speed_kmh, heading_deg, accuracy_m, attributes, received_at";
    const KEY: &'static str = "device_id, recorded_at";
    const COLUMN_COUNT: i16 = 9;
    const CONTENT: &'static str = "lat, lon, speed_kmh, heading_deg, accuracy_m, attributes";
    const CONFLICT_DEVICE: &'static str = "s.device_id";

    fn encode_copy(&self, out: &mut BytesMut) {
        put_text(out, &self.device_id);
        put_timestamptz(out, self.recorded_at);
        put_f64(out, self.lat);
        put_f64(out, self.lon);
        put_opt_f64(out, self.speed_kmh);
        put_opt_f64(out, self.heading_deg);
        put_opt_f64(out, self.accuracy_m);
        put_jsonb(out, self.attributes.as_deref());
        put_timestamptz(out, self.received_at);
    }

    fn to_json(&self) -> String {
        serde_json::json!({
            "device_id": self.device_id,
            "recorded_at": rfc3339(self.recorded_at),
            "lat": self.lat,
            "lon": self.lon,
            "speed_kmh": self.speed_kmh,
            "heading_deg": self.heading_deg,
            "accuracy_m": self.accuracy_m,
            "attributes": raw_json(&self.attributes),
            "received_at": rfc3339(self.received_at),
        })
        .to_string()
    }

    fn batch_summary(rows: &[Self]) -> serde_json::Value {
        let (from, to) = time_range(rows.iter().map(|r| r.recorded_at));
        let devices: std::collections::HashSet<&str> = rows.iter().map(|r| r.device_id.as_str()).collect();
        serde_json::json!({"rows": rows.len(), "from": from, "to": to, "devices": devices.len()})
    }

    fn keep_latest<'a>(
        tx: &'a Transaction<'_>,
        statements: &'a StatementCache,
        rows: &'a [&'a Self],
    ) -> BoxedWrite<'a> {
        Box::pin(async move {
            // The newest fix of each device in the batch, in device order so that concurrent writers lock rows in
            // one order and cannot deadlock.
            let mut newest: std::collections::BTreeMap<&str, &LocationUpdate> = std::collections::BTreeMap::new();
            for &row in rows {
                let entry = newest.entry(row.device_id.as_str()).or_insert(row);
                if row.recorded_at > entry.recorded_at {
                    *entry = row;
                }
            }
            let rows: Vec<&LocationUpdate> = newest.into_values().collect();
            let column = |f: fn(&LocationUpdate) -> Option<f64>| rows.iter().map(|r| f(r)).collect::<Vec<_>>();
            let device_ids: Vec<&str> = rows.iter().map(|r| r.device_id.as_str()).collect();
            let recorded: Vec<OffsetDateTime> = rows.iter().map(|r| r.recorded_at).collect();
            let lat: Vec<f64> = rows.iter().map(|r| r.lat).collect();
            let lon: Vec<f64> = rows.iter().map(|r| r.lon).collect();
            let attributes: Vec<Option<&str>> = rows.iter().map(|r| r.attributes.as_deref()).collect();
            let received: Vec<OffsetDateTime> = rows.iter().map(|r| r.received_at).collect();
            // Never moved back: a late or retried fix older than the stored one changes nothing.
            let upsert = statements
                .prepare(
                    tx.client(),
                    "INSERT INTO device_positions \
                   (device_id, recorded_at, lat, lon, speed_kmh, heading_deg, accuracy_m, attributes, received_at) \
                 SELECT d, r, la, lo, s, h, a, at::jsonb, rc \
                   FROM unnest($1::text[], $2::timestamptz[], $3::float8[], $4::float8[], $5::float8[], \
                               $6::float8[], $7::float8[], $8::text[], $9::timestamptz[]) \
                        AS u(d, r, la, lo, s, h, a, at, rc) \
                 ON CONFLICT (device_id) DO UPDATE SET \
                   recorded_at = EXCLUDED.recorded_at, lat = EXCLUDED.lat, lon = EXCLUDED.lon, \
                   speed_kmh = EXCLUDED.speed_kmh, heading_deg = EXCLUDED.heading_deg, \
                   accuracy_m = EXCLUDED.accuracy_m, attributes = EXCLUDED.attributes, \
                   received_at = EXCLUDED.received_at \
                 WHERE device_positions.recorded_at < EXCLUDED.recorded_at",
                )
                .await?;
            tx.execute(
                &upsert,
                &[
                    &device_ids,
                    &recorded,
                    &lat,
                    &lon,
                    &column(|r| r.speed_kmh),
                    &column(|r| r.heading_deg),
                    &column(|r| r.accuracy_m),
                    &attributes,
                    &received,
                ],
            )
            .await
            .map(|_| ())
        })
    }
}

impl CopyRecord for PollResult {
    const TABLE: &'static str = "poll_results";
    const COLUMNS: &'static str =
        "project_id, polled_at, success, status_code, response_time_ms, error_message, attributes, received_at";
    const KEY: &'static str = "project_id, polled_at";
    const COLUMN_COUNT: i16 = 8;
    const CONTENT: &'static str = "success, status_code, response_time_ms, error_message, attributes";

    fn encode_copy(&self, out: &mut BytesMut) {
        out.put_i32(8);
        out.put_i64(self.project_id);
        put_timestamptz(out, self.polled_at);
        out.put_i32(1);
        out.put_u8(u8::from(self.success));
        match self.status_code {
            Some(code) => {
                out.put_i32(2);
                out.put_i16(code);
            }
            None => put_null(out),
        }
        match self.response_time_ms {
            Some(ms) => {
                out.put_i32(4);
                out.put_i32(ms);
            }
            None => put_null(out),
        }
        match &self.error_message {
            Some(m) => put_text(out, m),
            None => put_null(out),
        }
        put_jsonb(out, self.attributes.as_deref());
        put_timestamptz(out, self.received_at);
    }

    fn to_json(&self) -> String {
        serde_json::json!({
            "project_id": self.project_id,
            "polled_at": rfc3339(self.polled_at),
            "success": self.success,
            "status_code": self.status_code,
            "response_time_ms": self.response_time_ms,
            "error_message": self.error_message,
            "attributes": raw_json(&self.attributes),
            "received_at": rfc3339(self.received_at),
        })
        .to_string()
    }

    fn batch_summary(rows: &[Self]) -> serde_json::Value {
        let (from, to) = time_range(rows.iter().map(|r| r.polled_at));
        let projects: std::collections::HashSet<i64> = rows.iter().map(|r| r.project_id).collect();
        serde_json::json!({"rows": rows.len(), "from": from, "to": to, "projects": projects.len()})
    }

    fn keep_latest<'a>(
        tx: &'a Transaction<'_>,
        statements: &'a StatementCache,
        rows: &'a [&'a Self],
    ) -> BoxedWrite<'a> {
        Box::pin(async move {
            // The newest result of each project in the batch, in project order (one lock order for all writers).
            let mut newest: std::collections::BTreeMap<i64, &PollResult> = std::collections::BTreeMap::new();
            for &row in rows {
                let entry = newest.entry(row.project_id).or_insert(row);
                if row.polled_at > entry.polled_at {
                    *entry = row;
                }
            }
            let rows: Vec<&PollResult> = newest.into_values().collect();
            let projects: Vec<i64> = rows.iter().map(|r| r.project_id).collect();
            let polled: Vec<OffsetDateTime> = rows.iter().map(|r| r.polled_at).collect();
            let success: Vec<bool> = rows.iter().map(|r| r.success).collect();
            let status: Vec<Option<i16>> = rows.iter().map(|r| r.status_code).collect();
            let response: Vec<Option<i32>> = rows.iter().map(|r| r.response_time_ms).collect();
            let error: Vec<Option<&str>> = rows.iter().map(|r| r.error_message.as_deref()).collect();
            let attributes: Vec<Option<&str>> = rows.iter().map(|r| r.attributes.as_deref()).collect();
            let received: Vec<OffsetDateTime> = rows.iter().map(|r| r.received_at).collect();
            // Never moved back: a late or retried result older than the stored one changes nothing.
            let upsert = statements
                .prepare(
                    tx.client(),
                    "INSERT INTO project_latest_results \
                   (project_id, polled_at, success, status_code, response_time_ms, error_message, attributes, \
                    received_at) \
                 SELECT p, t, s, c, r, e, at::jsonb, rc \
                   FROM unnest($1::int8[], $2::timestamptz[], $3::bool[], $4::int2[], $5::int4[], $6::text[], \
                               $7::text[], $8::timestamptz[]) AS u(p, t, s, c, r, e, at, rc) \
                 ON CONFLICT (project_id) DO UPDATE SET \
                   polled_at = EXCLUDED.polled_at, success = EXCLUDED.success, status_code = EXCLUDED.status_code, \
                   response_time_ms = EXCLUDED.response_time_ms, error_message = EXCLUDED.error_message, \
                   attributes = EXCLUDED.attributes, received_at = EXCLUDED.received_at \
                 WHERE project_latest_results.polled_at < EXCLUDED.polled_at",
                )
                .await?;
            tx.execute(
                &upsert,
                &[
                    &projects,
                    &polled,
                    &success,
                    &status,
                    &response,
                    &error,
                    &attributes,
                    &received,
                ],
            )
            .await
            .map(|_| ())
        })
    }
}

/// The refused tracker fixes of the `dead_letter` stream, in `dead_letters` next to the rows PostgreSQL refused:
/// `reason` and `protocol` set (NULL for those), `error` the letter's sentence, `sqlstate` NULL.
impl CopyRecord for DeadLetter {
    const TABLE: &'static str = "dead_letters";
    const COLUMNS: &'static str = "stream, payload, error, reason, protocol, device_id, received_at";
    /// No natural key: `id` is an identity, so a COPY never conflicts unless an operator adds a unique index, and
    /// then staging is gone through in the order the letters came.
    const KEY: &'static str = "received_at";
    const COLUMN_COUNT: i16 = 7;

    fn encode_copy(&self, out: &mut BytesMut) {
        put_text(out, &storable_text(&self.stream));
        put_jsonb(out, Some(&storable_json(&self.payload)));
        put_text(out, &storable_text(&self.message));
        put_text(out, &storable_text(&self.reason));
        put_text(out, &storable_text(&self.protocol));
        match &self.device_id {
            Some(device_id) => put_text(out, &storable_text(device_id)),
            None => put_null(out),
        }
        put_timestamptz(out, self.received_at);
    }

    fn to_json(&self) -> String {
        let payload = serde_json::from_str(&storable_json(&self.payload)).unwrap_or(serde_json::Value::Null);
        // Storable as `jsonb` whatever the letter holds: the last resort of a letter PostgreSQL refused must not be
        // refused too.
        without_nul(serde_json::json!({
            "stream": self.stream,
            "protocol": self.protocol,
            "reason": self.reason,
            "message": self.message,
            "device_id": self.device_id,
            "payload": payload,
            "received_at": rfc3339(self.received_at),
        }))
        .to_string()
    }

    fn batch_summary(rows: &[Self]) -> serde_json::Value {
        let (from, to) = time_range(rows.iter().map(|r| r.received_at));
        let mut reasons: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
        for row in rows {
            *reasons.entry(row.reason.as_str()).or_default() += 1;
        }
        serde_json::json!({"rows": rows.len(), "from": from, "to": to, "reasons": reasons})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::copy::encode_batch;
    use std::borrow::Cow;
    use time::macros::datetime;

    #[test]
    fn a_location_row_encodes_to_the_binary_copy_layout() {
        let row = LocationUpdate {
            device_id: "ab".into(),
            recorded_at: datetime!(2000-01-01 00:00:01 UTC),
            lat: 1.5,
            lon: -2.0,
            speed_kmh: None,
            heading_deg: Some(0.0),
            accuracy_m: None,
            attributes: Some("{}".into()),
            received_at: datetime!(1999-12-31 23:59:59 UTC),
        };
        let mut out = BytesMut::new();
        encode_batch(&[row], &mut out);
        let mut expected = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        expected.extend_from_slice(&9i16.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 2, b'a', b'b']);
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&1_000_000i64.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&1.5f64.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&(-2.0f64).to_be_bytes());
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&0.0f64.to_be_bytes());
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 3, 1, b'{', b'}']);
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&(-1_000_000i64).to_be_bytes());
        expected.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(&out[..], &expected[..]);
    }

    fn letter(device_id: Option<&str>, payload: &str) -> DeadLetter {
        DeadLetter {
            stream: "location".into(),
            protocol: "osmand".into(),
            reason: "null_island".into(),
            message: "lat and lon are both 0".into(),
            device_id: device_id.map(str::to_owned),
            payload: payload.into(),
            received_at: datetime!(2000-01-01 00:00:02 UTC),
        }
    }

    #[test]
    fn a_dead_letter_encodes_to_the_binary_copy_layout() {
        let mut out = BytesMut::new();
        encode_batch(&[letter(Some("t1"), "{}"), letter(None, "{}")], &mut out);
        let text = |expected: &mut Vec<u8>, s: &str| {
            expected.extend_from_slice(&(s.len() as i32).to_be_bytes());
            expected.extend_from_slice(s.as_bytes());
        };
        let mut expected = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        for device_id in [Some("t1"), None] {
            expected.extend_from_slice(&7i16.to_be_bytes());
            text(&mut expected, "location");
            expected.extend_from_slice(&[0, 0, 0, 3, 1, b'{', b'}']);
            text(&mut expected, "lat and lon are both 0");
            text(&mut expected, "null_island");
            text(&mut expected, "osmand");
            match device_id {
                Some(id) => text(&mut expected, id),
                None => expected.extend_from_slice(&(-1i32).to_be_bytes()),
            }
            expected.extend_from_slice(&[0, 0, 0, 8]);
            expected.extend_from_slice(&2_000_000i64.to_be_bytes());
        }
        expected.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(&out[..], &expected[..]);
    }

    #[test]
    fn a_dead_letter_payload_is_made_storable_and_its_json_always_is() {
        assert!(matches!(storable_json(r#"{"lat":"0"}"#), Cow::Borrowed(_)));
        assert_eq!(
            storable_json(r#"{"a\u0000":"b\u0000"}"#),
            "{\"a\u{FFFD}\":\"b\u{FFFD}\"}"
        );
        assert_eq!(storable_json("id=1&lat=x\0"), "{\"unparsed\":\"id=1&lat=x\u{FFFD}\"}");
        assert_eq!(storable_json(r#"{"n":1e999999}"#), r#"{"unparsed":"{\"n\":1e999999}"}"#);

        let mut odd = letter(Some("t\0"), r#"{"s":"\u0000"}"#);
        odd.message.push('\0');
        let json = odd.to_json();
        assert!(!json.contains('\0') && !json.contains("\\u0000"), "{json}");
        let mut out = BytesMut::new();
        odd.encode_copy(&mut out);
        let holds = |needle: &str| out.windows(needle.len()).any(|w| w == needle.as_bytes());
        assert!(holds("t\u{FFFD}") && holds("both 0\u{FFFD}") && holds("{\"s\":\"\u{FFFD}\"}"));
    }
}
