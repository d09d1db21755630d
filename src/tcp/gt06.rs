//! GT06's session over TCP (`INGEST_GT06_LISTEN`, Traccar's port 5023): a login (protocol `0x01`, the IMEI in
//! BCD), then location, alarm, heartbeat and status packets, each answered with `78 78 05 <protocol> <serial>
//! <crc> 0D 0A` as the device expects — a packet that carries a fix only once the fix is durable. A frame whose CRC
//! does not match is not answered (the device sends it again) and counted; bytes that are no frame at all close
//! the connection, as the stream cannot be followed past them.
//!
//! The decoding itself is the model's ([`crate::model::tracker::gt06`]).

use std::collections::HashMap;
use std::sync::Mutex;

use time::{OffsetDateTime, UtcOffset};

use super::{BadPacket, Decoded, DeviceProtocol, Framing};
use crate::model::tracker::gt06::{self, Garbage, Gt06Error, Login, Message, Session};
use crate::model::tracker::Protocol;

/// Devices whose login declared a time zone, remembered at most: beyond this, a newly admitted device's times are
/// read as UTC (and, if it sends its local time, land outside the time window as dead letters, not as wrong rows).
const MAX_DECLARED_ZONES: usize = 100_000;

/// GT06 and the units that copy it.
#[derive(Debug, Default)]
pub struct Gt06 {
    /// The time zone each admitted device's login declared, by IMEI: its later packets' times are read in it.
    /// Only the zones other than UTC, and only once the device is let in.
    zones: Mutex<HashMap<String, UtcOffset>>,
}

/// What the answer to a frame needs.
#[derive(Debug)]
pub struct Answer {
    /// The reply the device waits for, if any.
    reply: Option<Vec<u8>>,
    /// A login's IMEI and declared zone, kept once the device is let in.
    login: Option<Login>,
}

impl DeviceProtocol for Gt06 {
    type Answer = Answer;

    fn protocol(&self) -> Protocol {
        Protocol::Gt06
    }

    fn frame(&self, _identified: bool, buf: &[u8]) -> Framing {
        match gt06::frame(buf) {
            gt06::Framing::Frame { len, .. } => Framing::Frame(len),
            // Its length and stop bits hold: the frame is read, found damaged, counted and not answered.
            gt06::Framing::Garbage {
                reason: Garbage::BadCrc,
                len,
            } => Framing::Frame(len),
            gt06::Framing::Garbage {
                reason: Garbage::TooLong,
                ..
            } => Framing::Unreadable(BadPacket::Oversized),
            gt06::Framing::Garbage { .. } => Framing::Unreadable(BadPacket::Malformed),
            gt06::Framing::Incomplete { len } => Framing::Incomplete { frame_bytes: len },
        }
    }

    fn decode(&self, device: Option<&str>, bytes: &[u8]) -> Result<Decoded<Answer>, BadPacket> {
        let gt06::Framing::Frame { frame, .. } = gt06::frame(bytes) else {
            // `frame` hands over whole frames only, and those with a bad CRC.
            return Err(BadPacket::BadCrc);
        };
        let mut session = Session::default();
        if let Some(imei) = device {
            let utc_offset = self.zones.lock().ok().and_then(|zones| zones.get(imei).copied());
            session.log_in(Login {
                imei: imei.to_owned(),
                utc_offset,
            });
        }
        let decoded = session
            .read(&frame, OffsetDateTime::now_utc())
            .map_err(|error| match error {
                // A packet before the login, or a login without an IMEI: nothing says whose it is.
                Gt06Error::NotLoggedIn { .. } | Gt06Error::ShortLogin { .. } => BadPacket::Malformed,
            })?;
        Ok(match decoded.message {
            Message::Login(login) => Decoded::Identification {
                device_id: login.imei.clone(),
                answer: Answer {
                    reply: decoded.reply,
                    login: Some(login),
                },
            },
            Message::Fix(fix) => Decoded::Records {
                fixes: vec![*fix],
                answer: Answer {
                    reply: decoded.reply,
                    login: None,
                },
            },
            Message::NoFix => Decoded::Reply(decoded.reply),
        })
    }

    fn identification_answer(&self, answer: &Answer, accepted: bool) -> Option<Vec<u8>> {
        if !accepted {
            // GT06 has no refusal: the device is disconnected without a word.
            return None;
        }
        if let (Some(login), Ok(mut zones)) = (&answer.login, self.zones.lock()) {
            match login.utc_offset.filter(|o| !o.is_utc()) {
                Some(offset) if zones.len() < MAX_DECLARED_ZONES || zones.contains_key(&login.imei) => {
                    zones.insert(login.imei.clone(), offset);
                }
                Some(_) => {}
                None => {
                    zones.remove(&login.imei);
                }
            }
        }
        answer.reply.clone()
    }

    fn records_answer(&self, answer: Answer, _records: usize) -> Option<Vec<u8>> {
        answer.reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tracker::gt06::reply;

    fn bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Traccar's login vector with a time zone: IMEI 864717003664467, UTC-4.
    const LOGIN_WEST: &str = "787811010864717003664467100f190a0002c6d20d0a";
    /// Traccar's 0x12 vector at 2015-10-20 14:21:11.
    const FIX: &str = "78781f120f0a140e150bc505e51e780293a9e800540000f601006e0055da00035f240d0a";

    fn fix_time(gt06: &Gt06, device: &str) -> OffsetDateTime {
        match gt06.decode(Some(device), &bytes(FIX)) {
            Ok(Decoded::Records { fixes, answer }) => {
                assert_eq!(answer.reply, Some(reply(0x12, 3, &[])));
                fixes[0].recorded_at.unwrap()
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn frames_bad_crcs_and_garbage_are_told_apart_for_the_connection() {
        let gt06 = Gt06::default();
        let fix = bytes(FIX);
        assert_eq!(gt06.frame(true, &fix), Framing::Frame(fix.len()));
        assert_eq!(
            gt06.frame(true, &fix[..10]),
            Framing::Incomplete {
                frame_bytes: Some(fix.len())
            }
        );
        let mut damaged = fix.clone();
        damaged[12] ^= 1;
        assert_eq!(gt06.frame(true, &damaged), Framing::Frame(fix.len()));
        assert!(matches!(gt06.decode(Some("1"), &damaged), Err(BadPacket::BadCrc)));
        assert_eq!(gt06.frame(true, b"GET /"), Framing::Unreadable(BadPacket::Malformed));
        assert_eq!(
            gt06.frame(true, &[0x79, 0x79, 0xff, 0xff]),
            Framing::Unreadable(BadPacket::Oversized)
        );
        assert!(matches!(gt06.decode(None, &fix), Err(BadPacket::Malformed)));
    }

    #[test]
    fn a_login_is_answered_only_when_accepted_and_its_time_zone_kept_only_then() {
        let gt06 = Gt06::default();
        let Ok(Decoded::Identification { device_id, answer }) = gt06.decode(None, &bytes(LOGIN_WEST)) else {
            panic!("a login")
        };
        assert_eq!(device_id, "864717003664467");
        assert_eq!(gt06.identification_answer(&answer, false), None);
        assert_eq!(
            fix_time(&gt06, &device_id),
            time::macros::datetime!(2015-10-20 14:21:11 UTC)
        );
        assert_eq!(
            gt06.identification_answer(&answer, true),
            Some(reply(0x01, 0x0002, &[]))
        );
        // The unit's later packets are read at UTC-4.
        assert_eq!(
            fix_time(&gt06, &device_id),
            time::macros::datetime!(2015-10-20 18:21:11 UTC)
        );
        assert_eq!(
            fix_time(&gt06, "353588000000001"),
            time::macros::datetime!(2015-10-20 14:21:11 UTC)
        );
    }
}
