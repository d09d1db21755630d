//! Record framing in a log segment: `[len: u32 LE][crc32: u32 LE][payload; len]`, the checksum covering the
//! length and the payload, so that a torn write or a flipped bit is detected rather than replayed.

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
        loop {
            let rest = &self.bytes[self.offset..];
            if rest.is_empty() {
                return None;
            }
            if rest.len() < HEADER_BYTES {
                self.faults.torn_tail = true;
                return None;
            }
            let len_bytes: [u8; 4] = [rest[0], rest[1], rest[2], rest[3]];
            let len = u32::from_le_bytes(len_bytes) as usize;
            let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
            if len > MAX_PAYLOAD_BYTES || rest.len() - HEADER_BYTES < len {
                // A length past the end is a write cut short, or a length that was itself damaged: either way
                // nothing after it can be framed reliably.
                self.faults.torn_tail = true;
                return None;
            }
            let payload = &rest[HEADER_BYTES..HEADER_BYTES + len];
            self.offset += HEADER_BYTES + len;
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&len_bytes);
            hasher.update(payload);
            if hasher.finalize() == crc {
                return Some(payload);
            }
            self.faults.corrupt_records += 1;
        }
    }
}

/// What the next frame of a stream of records is.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Record(Vec<u8>),
    /// A frame whose checksum did not match; its bytes are skipped.
    Corrupt {
        skipped: u64,
    },
    /// An incomplete frame or a damaged length: nothing after it can be framed reliably.
    Torn,
    /// Exactly at the limit.
    End,
}

/// Reads the next frame from `input`, which holds `remaining` more bytes that may be read.
pub fn read_next(input: &mut impl std::io::Read, remaining: u64) -> std::io::Result<Next> {
    if remaining == 0 {
        return Ok(Next::End);
    }
    if remaining < HEADER_BYTES as u64 {
        return Ok(Next::Torn);
    }
    let mut header = [0u8; HEADER_BYTES];
    input.read_exact(&mut header)?;
    let len_bytes = [header[0], header[1], header[2], header[3]];
    let len = u32::from_le_bytes(len_bytes) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_PAYLOAD_BYTES || (HEADER_BYTES + len) as u64 > remaining {
        return Ok(Next::Torn);
    }
    let mut payload = vec![0u8; len];
    input.read_exact(&mut payload)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len_bytes);
    hasher.update(&payload);
    if hasher.finalize() == crc {
        Ok(Next::Record(payload))
    } else {
        Ok(Next::Corrupt {
            skipped: (HEADER_BYTES + len) as u64,
        })
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
            prop_assert_eq!(reader.faults.torn_tail, !ends.contains(&cut) && cut != 0);
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
            let mut input = bytes;
            let mut remaining = bytes.len() as u64;
            loop {
                match read_next(&mut input, remaining).unwrap() {
                    Next::Record(p) => {
                        remaining -= framed_len(p.len()) as u64;
                        from_stream.push(p);
                    }
                    Next::Corrupt { skipped } => remaining -= skipped,
                    Next::Torn | Next::End => break,
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
