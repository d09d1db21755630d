//! Record framing in a log segment: `[len: u32 LE][crc32: u32 LE][payload; len]`, the checksum covering the
//! length and the payload, so that a torn write or a flipped bit is detected rather than replayed.
//!
//! After a damaged frame — whether its payload or its length was hit — reading resumes at the next offset where a
//! whole frame with a matching checksum starts ([`resync`]), so one damaged record costs only itself.
//!
//! A segment's file is zero-filled ahead of its records (so that an fsync writes their data, not the file's size),
//! and a zero tail is the end of the records, not damage: eight zero bytes are never a frame, since the checksum
//! of a zero length is not zero.

/// Bytes before each payload.
pub const HEADER_BYTES: usize = 8;
/// Largest payload accepted on read; anything larger is a corrupt length, not a record.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024 * 1024;

/// Appends one framed record to `out`.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    let len = (payload.len() as u32).to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(payload);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// The framed size of a payload of `len` bytes.
pub fn framed_len(len: usize) -> usize {
    HEADER_BYTES + len
}

/// What reading a segment found besides good records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadFaults {
    /// Records whose checksum did not match; skipped.
    pub corrupt_records: usize,
    /// Whether the segment ends in an incomplete record (a write cut short by a crash); its bytes are ignored.
    pub torn_tail: bool,
}

/// Iterates over the good payloads of a segment's bytes, skipping corrupt records and stopping at a torn tail.
pub struct FrameReader<'a> {
    bytes: &'a [u8],
    offset: usize,
    pub faults: ReadFaults,
}

impl<'a> FrameReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            offset: 0,
            faults: ReadFaults::default(),
        }
    }

    /// Where the next record would start: after a clean read, the length of the good prefix.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

impl<'a> Iterator for FrameReader<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = &self.bytes[self.offset..];
        if rest.is_empty() {
            return None;
        }
        if let Some(payload) = frame_at(rest) {
            self.offset += HEADER_BYTES + payload.len();
            return Some(payload);
        }
        if rest.iter().all(|&b| b == 0) {
            // The zero-filled part of the file that no record reached yet.
            self.offset = self.bytes.len();
            return None;
        }
        let complete = declared_len(rest).is_some_and(|len| HEADER_BYTES + len <= rest.len());
        match resync(rest) {
            Some(skip) => {
                self.faults.corrupt_records += 1;
                self.offset += skip;
                self.next()
            }
            None => {
                // Nothing whole follows: a complete frame was damaged, or the last write was cut short.
                if complete {
                    self.faults.corrupt_records += 1;
                } else {
                    self.faults.torn_tail = true;
                }
                self.offset = self.bytes.len();
                None
            }
        }
    }
}

/// The length a frame at the start of `bytes` declares, if its header is there and the length is plausible.
fn declared_len(bytes: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    (bytes.len() >= HEADER_BYTES && len <= MAX_PAYLOAD_BYTES).then_some(len)
}

/// The payload of the frame at the start of `bytes`, if a whole frame with a matching checksum is there.
pub fn frame_at(bytes: &[u8]) -> Option<&[u8]> {
    let len = declared_len(bytes)?;
    let payload = bytes.get(HEADER_BYTES..HEADER_BYTES + len)?;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().ok()?);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[..4]);
    hasher.update(payload);
    (hasher.finalize() == crc).then_some(payload)
}

/// Where, after the damaged frame at the start of `bytes`, the next whole frame with a matching checksum starts.
/// Every later offset is tried, not the damaged frame's own length: the length may be what was hit, and a wrong
/// one can point past good records. A false match needs a 32-bit checksum to agree by chance.
pub fn resync(bytes: &[u8]) -> Option<usize> {
    // A zero header is never a frame: skipping those first keeps a scan through a zero-filled tail cheap.
    (1..bytes.len()).find(|&at| {
        let rest = &bytes[at..];
        rest.get(..HEADER_BYTES).is_some_and(|h| h != [0u8; HEADER_BYTES]) && frame_at(rest).is_some()
    })
}

/// How many of a segment's bytes were written: the file without the zero-filled tail no record reached. When the
/// records end cleanly, that is where the zeros start; after a torn or damaged last record, it is the file without
/// its trailing zero bytes, so that the reader finds the damage and reports it.
pub fn written_len(bytes: &[u8]) -> usize {
    let trimmed = bytes.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
    let mut reader = FrameReader::new(bytes);
    let mut end = 0;
    while reader.next().is_some() {
        end = reader.offset();
        if end >= trimmed {
            return end;
        }
    }
    if reader.faults == ReadFaults::default() {
        end
    } else {
        trimmed
    }
}

/// What the next frame of a stream of records is.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Record(Vec<u8>),
    /// Not a whole frame with a matching checksum: the reader [`resync`]s on the bytes from here. `complete` when a
    /// frame of the declared length fits before the limit (it was damaged); otherwise it may be a write cut short.
    Damaged {
        complete: bool,
    },
    /// Exactly at the limit.
    End,
}

/// Reads the next frame from `input`, which holds `remaining` more bytes that may be read.
pub fn read_next(input: &mut impl std::io::Read, remaining: u64) -> std::io::Result<Next> {
    if remaining == 0 {
        return Ok(Next::End);
    }
    if remaining < HEADER_BYTES as u64 {
        return Ok(Next::Damaged { complete: false });
    }
    let mut header = [0u8; HEADER_BYTES];
    input.read_exact(&mut header)?;
    let len_bytes = [header[0], header[1], header[2], header[3]];
    let len = u32::from_le_bytes(len_bytes) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_PAYLOAD_BYTES || (HEADER_BYTES + len) as u64 > remaining {
        return Ok(Next::Damaged { complete: false });
    }
    let mut payload = vec![0u8; len];
    input.read_exact(&mut payload)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len_bytes);
    hasher.update(&payload);
    if hasher.finalize() == crc {
        Ok(Next::Record(payload))
    } else {
        Ok(Next::Damaged { complete: true })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn log_of(payloads: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for p in payloads {
            encode(p, &mut bytes);
            ends.push(bytes.len());
        }
        (bytes, ends)
    }

    #[test]
    fn a_zero_filled_tail_ends_the_records_and_is_no_damage() {
        // The last record's payload ends in zeros: the tail must not cut it.
        let payloads = vec![b"one".to_vec(), vec![9, 0, 0, 0, 0, 0, 0, 0, 0]];
        let (mut bytes, ends) = log_of(&payloads);
        bytes.resize(bytes.len() + 4096, 0);
        let mut reader = FrameReader::new(&bytes);
        let read: Vec<Vec<u8>> = reader.by_ref().map(<[u8]>::to_vec).collect();
        assert_eq!(read, payloads);
        assert_eq!(reader.faults, ReadFaults::default());
        assert_eq!(written_len(&bytes), ends[1]);
        assert_eq!(written_len(&[0; 100]), 0, "a segment no record reached");
    }

    #[test]
    fn a_torn_record_before_a_zero_tail_is_still_torn() {
        let payloads = vec![b"one".to_vec(), vec![7; 100]];
        let (bytes, ends) = log_of(&payloads);
        // The crash wrote the second record's first 50 bytes; the rest of the file is the zero fill.
        let mut file = bytes[..ends[0] + 50].to_vec();
        file.resize(file.len() + 4096, 0);
        let cut = written_len(&file);
        assert_eq!(cut, ends[0] + 50);
        let mut reader = FrameReader::new(&file[..cut]);
        assert_eq!(reader.by_ref().count(), 1);
        assert!(reader.faults.torn_tail);
        // Read with its zero tail, the torn record is found as well.
        let mut whole = FrameReader::new(&file);
        assert_eq!(whole.by_ref().count(), 1);
        assert_ne!(whole.faults, ReadFaults::default());
    }

    #[test]
    fn a_clean_log_reads_back_every_record() {
        let payloads = vec![b"one".to_vec(), Vec::new(), vec![7; 1000]];
        let (bytes, _) = log_of(&payloads);
        let mut reader = FrameReader::new(&bytes);
        let read: Vec<Vec<u8>> = reader.by_ref().map(<[u8]>::to_vec).collect();
        assert_eq!(read, payloads);
        assert_eq!(reader.faults, ReadFaults::default());
    }

    proptest! {
        #[test]
        fn a_log_cut_anywhere_reads_exactly_the_records_before_the_cut(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..20),
            cut in any::<prop::sample::Index>(),
        ) {
            let (bytes, ends) = log_of(&payloads);
            let cut = cut.index(bytes.len() + 1);
            let mut reader = FrameReader::new(&bytes[..cut]);
            let read: Vec<Vec<u8>> = reader.by_ref().map(<[u8]>::to_vec).collect();
            let whole = ends.iter().filter(|&&end| end <= cut).count();
            prop_assert_eq!(&read[..], &payloads[..whole]);
            // A piece of a header that happens to be all zeros cannot be told from the zero fill that follows
            // the records: it is the end, as it holds nothing whole.
            let last_end = if whole == 0 { 0 } else { ends[whole - 1] };
            let torn_piece = bytes[last_end..cut].iter().any(|&b| b != 0);
            prop_assert_eq!(reader.faults.torn_tail, torn_piece);
            prop_assert_eq!(reader.faults.corrupt_records, 0);
        }

        #[test]
        fn a_flipped_payload_byte_loses_that_record_only(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..64), 2..20),
            victim in any::<prop::sample::Index>(),
            position in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let (mut bytes, ends) = log_of(&payloads);
            let victim = victim.index(payloads.len());
            let start = if victim == 0 { 0 } else { ends[victim - 1] };
            let at = start + HEADER_BYTES + position.index(payloads[victim].len());
            bytes[at] ^= 1 << bit;
            let mut reader = FrameReader::new(&bytes);
            let read: Vec<Vec<u8>> = reader.by_ref().map(<[u8]>::to_vec).collect();
            let mut expected = payloads.clone();
            expected.remove(victim);
            prop_assert_eq!(read, expected);
            prop_assert_eq!(reader.faults.corrupt_records, 1);
        }

        #[test]
        fn a_damaged_length_loses_that_record_only(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..64), 2..20),
            victim in any::<prop::sample::Index>(),
            byte in 0usize..4,
            bit in 0u8..8,
        ) {
            let (mut bytes, ends) = log_of(&payloads);
            let victim = victim.index(payloads.len());
            let start = if victim == 0 { 0 } else { ends[victim - 1] };
            bytes[start + byte] ^= 1 << bit;
            let mut reader = FrameReader::new(&bytes);
            let read: Vec<Vec<u8>> = reader.by_ref().map(<[u8]>::to_vec).collect();
            let mut expected = payloads.clone();
            expected.remove(victim);
            prop_assert_eq!(read, expected);
            prop_assert_eq!(
                reader.faults.corrupt_records + usize::from(reader.faults.torn_tail),
                1,
                "one fault: a damaged record, or a last record that now looks cut short"
            );
        }

        #[test]
        fn the_streaming_reader_agrees_with_the_slice_reader(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..10),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let (mut bytes, _) = log_of(&payloads);
            if !bytes.is_empty() {
                let at = flip.index(bytes.len());
                bytes[at] ^= 0x40;
            }
            let bytes = &bytes[..cut.index(bytes.len() + 1)];
            let from_slice: Vec<Vec<u8>> = FrameReader::new(bytes).map(<[u8]>::to_vec).collect();
            let mut from_stream = Vec::new();
            let mut offset = 0;
            loop {
                let mut input = &bytes[offset..];
                match read_next(&mut input, (bytes.len() - offset) as u64).unwrap() {
                    Next::Record(p) => {
                        offset += framed_len(p.len());
                        from_stream.push(p);
                    }
                    Next::Damaged { .. } => match resync(&bytes[offset..]) {
                        Some(skip) => offset += skip,
                        None => break,
                    },
                    Next::End => break,
                }
            }
            prop_assert_eq!(from_stream, from_slice);
        }

        #[test]
        fn any_bytes_read_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let reader = FrameReader::new(&bytes);
            prop_assert!(reader.count() <= bytes.len() / HEADER_BYTES);
        }
    }
}
