//! The record an accepted request becomes in the write-ahead log: a header (`lsn`, stream, slot, update count)
//! and the request's validated updates in a compact binary form, so that a replay needs no JSON parsing and no
//! validation. The lsn comes first, where the log expects it ([`crate::wal::LSN_BYTES`]).

use time::OffsetDateTime;

use crate::model::{DeadLetter, LocationUpdate, PollResult};

/// Bytes of the header: lsn u64, stream u8, slot u16, count u32.
pub const HEADER_BYTES: usize = 8 + 1 + 2 + 4;

/// Identifies a record's stream.
pub const LOCATION_STREAM: u8 = 1;
pub const POLL_STREAM: u8 = 2;
pub const DEAD_LETTER_STREAM: u8 = 3;

/// The header of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Log sequence number: increases by one per record, across restarts.
    pub lsn: u64,
    pub stream: u8,
    /// The writer slot the record was queued for; progress is tracked per (stream, slot).
    pub slot: u16,
    pub count: u32,
}

/// An update type that can be stored in the log.
pub trait RecordCodec: Sized {
    const STREAM_ID: u8;
    fn encode(&self, out: &mut Vec<u8>);
    fn decode(input: &mut Reader<'_>) -> Option<Self>;
}

/// Encodes a record for `updates` queued on `slot`; the lsn is filled in by the log when it is appended.
pub fn encode_record<T: RecordCodec>(slot: u16, updates: &[T]) -> Vec<u8> {
    encode_record_with(slot, updates.iter(), |_| {})
}

/// Encodes a record for `updates` (borrowed), as [`encode_record`] does, and hashes what they say: every byte of
/// each update but its `received_at`, which the codecs write last. A client's retry of a request is the same
/// updates received later, so it gets the same digest while its record differs.
pub fn encode_record_refs_with_digest<T: RecordCodec>(slot: u16, updates: &[&T]) -> (Vec<u8>, [u8; 32]) {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update([T::STREAM_ID]);
    hasher.update(slot.to_le_bytes());
    let payload = encode_record_with(slot, updates.iter().copied(), |encoded| {
        hasher.update(&encoded[..encoded.len() - TIMESTAMP_BYTES]);
    });
    (payload, hasher.finalize().into())
}

/// The one record encoder; `each` sees every update's encoding as it is written.
fn encode_record_with<'a, T: RecordCodec + 'a>(
    slot: u16,
    updates: impl ExactSizeIterator<Item = &'a T>,
    mut each: impl FnMut(&[u8]),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + updates.len() * 96);
    // The lsn's place, filled in by the log when the record is appended.
    out.resize(crate::wal::LSN_BYTES, 0);
    out.push(T::STREAM_ID);
    out.extend_from_slice(&slot.to_le_bytes());
    out.extend_from_slice(&(updates.len() as u32).to_le_bytes());
    for update in updates {
        let start = out.len();
        update.encode(&mut out);
        each(&out[start..]);
    }
    out
}

/// Reads a record's header; `None` for a payload too short to hold one.
pub fn decode_header(payload: &[u8]) -> Option<RecordHeader> {
    let mut r = Reader(payload);
    Some(RecordHeader {
        lsn: r.u64()?,
        stream: r.u8()?,
        slot: r.u16()?,
        count: r.u32()?,
    })
}

/// Reads a record's updates; `None` when the payload does not hold `T`s (a record of another stream or damage
/// that the checksum missed).
pub fn decode_updates<T: RecordCodec>(payload: &[u8]) -> Option<Vec<T>> {
    let header = decode_header(payload)?;
    if header.stream != T::STREAM_ID {
        return None;
    }
    let mut r = Reader(&payload[HEADER_BYTES..]);
    // The count comes from disk: cap the allocation by what the bytes could hold.
    let mut updates = Vec::with_capacity((header.count as usize).min(payload.len() / 8));
    for _ in 0..header.count {
        updates.push(T::decode(&mut r)?);
    }
    r.0.is_empty().then_some(updates)
}

/// A cursor over encoded bytes; every read fails softly on short input.
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.u64().map(|n| n as i64)
    }
    fn f64(&mut self) -> Option<f64> {
        self.u64().map(f64::from_bits)
    }
    fn bool(&mut self) -> Option<bool> {
        self.u8().map(|b| b != 0)
    }
    fn timestamp(&mut self) -> Option<OffsetDateTime> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.i64()?)).ok()
    }
    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
    /// An optional value: a presence byte, then the value.
    fn opt<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        match self.u8()? {
            0 => Some(None),
            _ => read(self).map(Some),
        }
    }
}

/// A timestamp's width in a record.
const TIMESTAMP_BYTES: usize = 8;

fn put_timestamp(out: &mut Vec<u8>, at: OffsetDateTime) {
    // Timestamps are validated to lie within weeks of now, far inside the ±292 years an i64 of nanoseconds holds.
    out.extend_from_slice(&(at.unix_timestamp_nanos() as i64).to_le_bytes());
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt<T>(out: &mut Vec<u8>, value: Option<T>, put: impl FnOnce(&mut Vec<u8>, T)) {
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put(out, v);
        }
    }
}

fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_bits().to_le_bytes());
}

impl RecordCodec for LocationUpdate {
    const STREAM_ID: u8 = LOCATION_STREAM;

    fn encode(&self, out: &mut Vec<u8>) {
        put_string(out, &self.device_id);
        put_timestamp(out, self.recorded_at);
        put_f64(out, self.lat);
        put_f64(out, self.lon);
        put_opt(out, self.speed_kmh, put_f64);
        put_opt(out, self.heading_deg, put_f64);
        put_opt(out, self.accuracy_m, put_f64);
        put_opt(out, self.attributes.as_deref(), put_string);
        // Last, so that a content digest can leave it out (see `encode_record_refs_with_digest`).
        put_timestamp(out, self.received_at);
    }

    fn decode(r: &mut Reader<'_>) -> Option<Self> {
        Some(LocationUpdate {
            device_id: r.string()?,
            recorded_at: r.timestamp()?,
            lat: r.f64()?,
            lon: r.f64()?,
            speed_kmh: r.opt(Reader::f64)?,
            heading_deg: r.opt(Reader::f64)?,
            accuracy_m: r.opt(Reader::f64)?,
            attributes: r.opt(Reader::string)?,
            received_at: r.timestamp()?,
        })
    }
}

impl RecordCodec for PollResult {
    const STREAM_ID: u8 = POLL_STREAM;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.project_id.to_le_bytes());
        put_timestamp(out, self.polled_at);
        out.push(u8::from(self.success));
        put_opt(out, self.status_code, |o, v| o.extend_from_slice(&v.to_le_bytes()));
        put_opt(out, self.response_time_ms, |o, v| o.extend_from_slice(&v.to_le_bytes()));
        put_opt(out, self.error_message.as_deref(), put_string);
        put_opt(out, self.attributes.as_deref(), put_string);
        // Last, as for locations.
        put_timestamp(out, self.received_at);
    }

    fn decode(r: &mut Reader<'_>) -> Option<Self> {
        Some(PollResult {
            project_id: r.i64()?,
            polled_at: r.timestamp()?,
            success: r.bool()?,
            status_code: r.opt(|r| r.u16().map(|n| n as i16))?,
            response_time_ms: r.opt(|r| r.u32().map(|n| n as i32))?,
            error_message: r.opt(Reader::string)?,
            attributes: r.opt(Reader::string)?,
            received_at: r.timestamp()?,
        })
    }
}

impl RecordCodec for DeadLetter {
    const STREAM_ID: u8 = DEAD_LETTER_STREAM;

    fn encode(&self, out: &mut Vec<u8>) {
        put_string(out, &self.stream);
        put_string(out, &self.protocol);
        put_string(out, &self.reason);
        put_string(out, &self.message);
        put_opt(out, self.device_id.as_deref(), put_string);
        put_string(out, &self.payload);
        // Last, as for locations: a tracker's retry of the same refused fix is the same letter received later.
        put_timestamp(out, self.received_at);
    }

    fn decode(r: &mut Reader<'_>) -> Option<Self> {
        Some(DeadLetter {
            stream: r.string()?,
            protocol: r.string()?,
            reason: r.string()?,
            message: r.string()?,
            device_id: r.opt(Reader::string)?,
            payload: r.string()?,
            received_at: r.timestamp()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::macros::datetime;

    fn location(i: u32) -> LocationUpdate {
        LocationUpdate {
            device_id: format!("dev-{i}"),
            recorded_at: datetime!(2026-11-22 10:00:00.123456789 UTC),
            lat: -12.5,
            lon: f64::from(i),
            speed_kmh: i.is_multiple_of(2).then_some(3.25),
            heading_deg: None,
            accuracy_m: Some(0.0),
            attributes: i.is_multiple_of(3).then(|| r#"{"a":"é"}"#.to_owned()),
            received_at: datetime!(2026-11-22 10:00:01 UTC),
        }
    }

    #[test]
    fn records_round_trip_with_their_header() {
        let updates: Vec<_> = (0..5).map(location).collect();
        let mut payload = encode_record(3, &updates);
        payload[..8].copy_from_slice(&42u64.to_le_bytes());
        assert_eq!(
            decode_header(&payload),
            Some(RecordHeader {
                lsn: 42,
                stream: LOCATION_STREAM,
                slot: 3,
                count: 5
            })
        );
        assert_eq!(decode_updates::<LocationUpdate>(&payload), Some(updates));
        assert_eq!(
            decode_updates::<PollResult>(&payload),
            None,
            "a record of another stream is refused"
        );
    }

    #[test]
    fn poll_results_round_trip() {
        let p = PollResult {
            project_id: i64::MAX,
            polled_at: datetime!(2026-11-22 10:00 UTC),
            success: false,
            status_code: Some(503),
            response_time_ms: Some(3_600_000),
            error_message: Some("down".into()),
            attributes: None,
            received_at: datetime!(2026-11-22 10:00:02 UTC),
        };
        let payload = encode_record(0, std::slice::from_ref(&p));
        assert_eq!(decode_updates::<PollResult>(&payload), Some(vec![p]));
    }

    fn dead_letter(device_id: Option<&str>) -> DeadLetter {
        DeadLetter {
            stream: "location".into(),
            protocol: "osmand".into(),
            reason: "null_island".into(),
            message: "lat and lon are both 0".into(),
            device_id: device_id.map(str::to_owned),
            payload: r#"{"id":"é-1","lat":"0","lon":"0"}"#.into(),
            received_at: datetime!(2026-11-22 10:00:03.5 UTC),
        }
    }

    #[test]
    fn dead_letters_round_trip_and_are_not_read_as_another_stream() {
        let letters = vec![dead_letter(Some("truck-1")), dead_letter(None)];
        let payload = encode_record(0, &letters);
        assert_eq!(decode_header(&payload).map(|h| h.stream), Some(DEAD_LETTER_STREAM));
        assert_eq!(decode_updates::<DeadLetter>(&payload), Some(letters));
        assert_eq!(decode_updates::<LocationUpdate>(&payload), None);
    }

    #[test]
    fn a_dead_letter_received_later_has_the_same_content_digest() {
        let first = dead_letter(Some("truck-1"));
        let mut again = first.clone();
        again.received_at += time::Duration::seconds(30);
        let (record_a, digest_a) = encode_record_refs_with_digest(0, &[&first]);
        let (record_b, digest_b) = encode_record_refs_with_digest(0, &[&again]);
        assert_ne!(record_a, record_b);
        assert_eq!(digest_a, digest_b);
        let mut other = first.clone();
        other.reason = "invalid".into();
        assert_ne!(encode_record_refs_with_digest(0, &[&other]).1, digest_a);
    }

    proptest! {
        #[test]
        fn truncated_or_garbage_payloads_decode_to_none_without_panic(cut in 0usize..400, junk in prop::collection::vec(any::<u8>(), 0..64)) {
            let payload = encode_record(1, &[location(1), location(2)]);
            let cut = cut.min(payload.len() - 1);
            prop_assert_eq!(decode_updates::<LocationUpdate>(&payload[..cut]), None);
            let _ = decode_updates::<LocationUpdate>(&junk);
            let _ = decode_updates::<PollResult>(&junk);
            let _ = decode_updates::<DeadLetter>(&junk);
        }
    }
}
