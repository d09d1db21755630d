//! Teltonika's session over TCP (`INGEST_TELTONIKA_LISTEN`, Traccar's port 5027): the IMEI handshake (two length
//! bytes and the IMEI; answered `01` to accept, `00` to refuse), then AVL data packets, each answered with the
//! count of its records (four bytes, big-endian) once they are durable. A packet that cannot be read is not
//! answered: the unit sends it again. A lone `FF` between packets is a unit's keep-alive.
//!
//! The decoding itself is the model's ([`crate::model::tracker::teltonika`]).

use super::{BadPacket, Decoded, DeviceProtocol, Framing};
use crate::model::location::DEVICE_ID_MAX_CHARS;
use crate::model::tracker::teltonika::{
    self as avl, PacketError, CRC_BYTES, HANDSHAKE_ACCEPTED, HANDSHAKE_REFUSED, HEADER_BYTES, IMEI_LENGTH_BYTES,
    MIN_DATA_BYTES,
};
use crate::model::tracker::Protocol;

/// The longest packet read. Teltonika's units send at most a few KiB per packet (FMB: 1280 bytes by default); a
/// length beyond this is not a packet, and the connection is closed rather than the bytes awaited.
pub const MAX_PACKET_BYTES: usize = 64 * 1024;

/// What a unit sends between packets to keep its connection open.
const KEEP_ALIVE: u8 = 0xFF;

/// Teltonika's Codec 8 / 8 Extended / 16 over TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct Teltonika;

impl DeviceProtocol for Teltonika {
    /// Answers depend on nothing but the record count.
    type Answer = ();

    fn protocol(&self) -> Protocol {
        Protocol::Teltonika
    }

    fn frame(&self, identified: bool, buf: &[u8]) -> Framing {
        if identified {
            packet_frame(buf)
        } else {
            handshake_frame(buf)
        }
    }

    fn decode(&self, device: Option<&str>, frame: &[u8]) -> Result<Decoded<()>, BadPacket> {
        match device {
            None => Ok(Decoded::Identification {
                // Not ASCII: refused as no device id, never stored.
                device_id: avl::read_imei(frame).unwrap_or_default().to_owned(),
                answer: (),
            }),
            Some(imei) => avl::decode_packet(frame, imei)
                .map(|packet| Decoded::Records {
                    fixes: packet.fixes,
                    answer: (),
                })
                .map_err(|error| match error {
                    PacketError::BadCrc { .. } => BadPacket::BadCrc,
                    PacketError::UnsupportedCodec(_) => BadPacket::UnsupportedCodec,
                    PacketError::Malformed(_) => BadPacket::Malformed,
                }),
        }
    }

    fn identification_answer(&self, _answer: &(), accepted: bool) -> Option<Vec<u8>> {
        Some(vec![if accepted {
            HANDSHAKE_ACCEPTED
        } else {
            HANDSHAKE_REFUSED
        }])
    }

    fn records_answer(&self, _answer: (), records: usize) -> Option<Vec<u8>> {
        Some(avl::records_answer(records).to_vec())
    }
}

/// The handshake: a u16 length, then that many bytes of IMEI.
fn handshake_frame(buf: &[u8]) -> Framing {
    let [high, low, ..] = *buf else {
        return Framing::Incomplete { frame_bytes: None };
    };
    match usize::from(u16::from_be_bytes([high, low])) {
        // Four zero bytes start a data packet: data before the handshake.
        0 => Framing::Unreadable(BadPacket::Malformed),
        length if length > DEVICE_ID_MAX_CHARS => Framing::Unreadable(BadPacket::Oversized),
        length => whole(buf, IMEI_LENGTH_BYTES + length),
    }
}

/// A data packet: four zero bytes, the data length (u32), the data, the CRC (u32).
fn packet_frame(buf: &[u8]) -> Framing {
    if buf.first() == Some(&KEEP_ALIVE) {
        return Framing::Skip(1);
    }
    // Whatever has arrived of the four zero bytes must be zero: anything else is not a packet.
    if buf.iter().take(4).any(|b| *b != 0) {
        return Framing::Unreadable(BadPacket::Malformed);
    }
    let Some(length) = buf.get(4..HEADER_BYTES) else {
        return Framing::Incomplete { frame_bytes: None };
    };
    let data = u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize;
    if data < MIN_DATA_BYTES {
        return Framing::Unreadable(BadPacket::Malformed);
    }
    let total = HEADER_BYTES.saturating_add(data).saturating_add(CRC_BYTES);
    if total > MAX_PACKET_BYTES {
        return Framing::Unreadable(BadPacket::Oversized);
    }
    whole(buf, total)
}

fn whole(buf: &[u8], frame_bytes: usize) -> Framing {
    if buf.len() >= frame_bytes {
        Framing::Frame(frame_bytes)
    } else {
        Framing::Incomplete {
            frame_bytes: Some(frame_bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(identified: bool, bytes: &[u8]) -> Framing {
        Teltonika.frame(identified, bytes)
    }

    #[test]
    fn a_handshake_is_framed_by_its_length() {
        let handshake = b"\x00\x0f356307042441013";
        assert_eq!(frame(false, &handshake[..1]), Framing::Incomplete { frame_bytes: None });
        assert_eq!(
            frame(false, &handshake[..5]),
            Framing::Incomplete { frame_bytes: Some(17) }
        );
        assert_eq!(frame(false, handshake), Framing::Frame(17));
        assert_eq!(
            frame(false, b"\x00\x00\x00\x00"),
            Framing::Unreadable(BadPacket::Malformed)
        );
        assert_eq!(frame(false, b"\x01\x00"), Framing::Unreadable(BadPacket::Oversized));
    }

    #[test]
    fn a_packet_is_framed_by_its_data_length_and_capped() {
        assert_eq!(frame(true, &[0, 0]), Framing::Incomplete { frame_bytes: None });
        assert_eq!(
            frame(true, &[0, 0, 0, 0, 0, 0, 0, 3]),
            Framing::Incomplete { frame_bytes: Some(15) }
        );
        assert_eq!(
            frame(true, &[0, 0, 0, 0, 0, 0, 0, 3, 8, 0, 0, 0, 0, 0, 0]),
            Framing::Frame(15)
        );
        assert_eq!(frame(true, &[0, 0, 1]), Framing::Unreadable(BadPacket::Malformed));
        assert_eq!(
            frame(true, &[0, 0, 0, 0, 0, 0, 0, 0]),
            Framing::Unreadable(BadPacket::Malformed)
        );
        assert_eq!(
            frame(true, &[0, 0, 0, 0, 0, 1, 0, 0]),
            Framing::Unreadable(BadPacket::Oversized)
        );
        assert_eq!(
            frame(true, &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Framing::Unreadable(BadPacket::Oversized)
        );
        assert_eq!(frame(true, &[0xff, 0, 0]), Framing::Skip(1));
    }

    #[test]
    fn the_answers_are_one_byte_for_the_handshake_and_the_record_count_for_a_packet() {
        assert_eq!(Teltonika.identification_answer(&(), true), Some(vec![1]));
        assert_eq!(Teltonika.identification_answer(&(), false), Some(vec![0]));
        assert_eq!(Teltonika.records_answer((), 4), Some(vec![0, 0, 0, 4]));
    }
}
