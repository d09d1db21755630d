//! Whether a key may write a request: its stream, then each update against the key's device or project scope.
//! One update outside the scope refuses the whole request, naming it.

use super::access::KeyEntry;
use crate::http::errors::IngestError;
use crate::keys_file::ApiKey;
use crate::model::{DeadLetter, LocationUpdate, PollResult, Update, UpdateError};

/// A 403 for updates outside the key's scope lists at most this many.
const MAX_SCOPE_DETAILS: usize = 100;

impl KeyEntry {
    /// Refuses the whole request when the key may not write `T`'s stream.
    pub fn check_stream<T: Update>(&self) -> Result<(), IngestError> {
        if self.key.may_write(T::STREAM) {
            return Ok(());
        }
        Err(IngestError::StreamNotAllowed {
            key: self.key.name.clone(),
            stream: T::STREAM,
            allowed: self.key.streams.clone(),
        })
    }

    /// Refuses the whole request when one of its updates is outside the key's scope.
    pub fn check_scope<T: Scoped>(&self, updates: &[T]) -> Result<(), IngestError> {
        let mut outside = 0usize;
        let mut errors = Vec::new();
        for (index, update) in updates.iter().enumerate() {
            if let Some((field, reason)) = update.outside(&self.key) {
                outside += 1;
                if errors.len() < MAX_SCOPE_DETAILS {
                    errors.push(UpdateError {
                        index,
                        field: Some(field.to_owned()),
                        reason,
                    });
                }
            }
        }
        if outside == 0 {
            return Ok(());
        }
        Err(IngestError::OutOfScope {
            key: self.key.name.clone(),
            updates: outside,
            errors,
        })
    }
}

/// An update a key's scope can exclude.
pub trait Scoped {
    /// The field and the reason when `key` may not write this update.
    fn outside(&self, key: &ApiKey) -> Option<(&'static str, String)>;
}

impl Scoped for LocationUpdate {
    fn outside(&self, key: &ApiKey) -> Option<(&'static str, String)> {
        if key.may_write_device(&self.device_id) {
            return None;
        }
        Some(("device_id", key.device_scope()))
    }
}

/// A tracker's fix that can never be stored still names a device: a key may not write dead letters of devices
/// outside its scope either.
impl Scoped for DeadLetter {
    fn outside(&self, key: &ApiKey) -> Option<(&'static str, String)> {
        let device_id = self.device_id.as_deref()?;
        if key.may_write_device(device_id) {
            return None;
        }
        Some(("device_id", key.device_scope()))
    }
}

impl Scoped for PollResult {
    fn outside(&self, key: &ApiKey) -> Option<(&'static str, String)> {
        if key.projects.is_empty() || key.projects.iter().any(|r| r.contains(&self.project_id)) {
            return None;
        }
        let ranges: Vec<String> = key
            .projects
            .iter()
            .map(|r| {
                if r.start() == r.end() {
                    r.start().to_string()
                } else {
                    format!("{}-{}", r.start(), r.end())
                }
            })
            .collect();
        Some((
            "project_id",
            format!("the key may write projects {}", ranges.join(", ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::auth::access::OUTCOMES;
    use crate::keys_file::{parse_keys, KeyFileError};
    use crate::metrics::Metrics;

    const HASH: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn one(line: &str) -> Result<ApiKey, KeyFileError> {
        parse_keys(line).map(|mut keys| keys.remove(0))
    }

    fn location(device_id: &str) -> LocationUpdate {
        LocationUpdate::at_epoch(device_id)
    }

    fn poll(project_id: i64) -> PollResult {
        PollResult {
            project_id,
            polled_at: time::OffsetDateTime::UNIX_EPOCH,
            success: true,
            status_code: None,
            response_time_ms: None,
            error_message: None,
            attributes: None,
            received_at: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_device_is_in_scope_when_its_id_starts_with_a_prefix() {
        let key = one(&format!("fleet {HASH} streams=location devices=truck-,van-")).unwrap();
        assert_eq!(location("truck-1").outside(&key), None);
        assert_eq!(location("van-").outside(&key), None);
        let (field, reason) = location("Truck-1").outside(&key).unwrap();
        assert_eq!(field, "device_id");
        assert!(reason.contains("truck-, van-"), "{reason}");
        let anyone = one(&format!("all {HASH} streams=location")).unwrap();
        assert_eq!(location("anything").outside(&anyone), None);
    }

    #[test]
    fn a_device_key_reaches_its_own_id_and_nothing_that_merely_starts_with_it() {
        let key = one(&format!("truck-1 {HASH} streams=location device=truck-1,van-2")).unwrap();
        assert_eq!(key.device_ids, ["truck-1", "van-2"]);
        assert_eq!(location("truck-1").outside(&key), None);
        assert_eq!(location("van-2").outside(&key), None);
        for other in ["truck-10", "truck-1.x", "truck-1-a", "truck-", "Truck-1"] {
            let (field, reason) = location(other).outside(&key).expect(other);
            assert_eq!(field, "device_id");
            assert!(reason.contains("truck-1, van-2"), "{reason}");
        }
        let both = one(&format!(
            "mixed {HASH} streams=location device=truck-1 devices=truck-1-,van:"
        ))
        .unwrap();
        for inside in ["truck-1", "truck-1-fmb", "van:9"] {
            assert_eq!(location(inside).outside(&both), None, "{inside}");
        }
        assert!(location("truck-10")
            .outside(&both)
            .unwrap()
            .1
            .contains("truck-1 and those starting with"));
    }

    #[test]
    fn every_kind_of_update_is_held_to_the_same_device_scope() {
        let key = one(&format!(
            "truck-1 {HASH} streams=location,poll device=truck-1 projects=7"
        ))
        .unwrap();
        let letter = |device: Option<&str>| DeadLetter {
            stream: "location".into(),
            protocol: "osmand".into(),
            reason: "null_island".into(),
            message: "lat and lon are both 0".into(),
            device_id: device.map(str::to_owned),
            payload: "{}".into(),
            received_at: time::OffsetDateTime::UNIX_EPOCH,
        };
        assert_eq!(location("truck-1").outside(&key), None);
        assert_eq!(letter(Some("truck-1")).outside(&key), None);
        assert!(location("truck-10").outside(&key).is_some());
        assert_eq!(
            letter(Some("truck-10")).outside(&key),
            location("truck-10").outside(&key),
            "a dead letter is refused as its fix would be"
        );
        assert_eq!(poll(7).outside(&key), None);
        assert!(poll(70).outside(&key).is_some());
    }

    #[test]
    fn a_project_is_in_scope_inside_a_range() {
        let key = one(&format!("pollers {HASH} streams=poll projects=1-100,250")).unwrap();
        for inside in [1, 100, 250] {
            assert_eq!(poll(inside).outside(&key), None, "{inside}");
        }
        for outside in [101, 249, 251, i64::MAX] {
            assert!(poll(outside).outside(&key).is_some(), "{outside}");
        }
        assert!(poll(101).outside(&key).unwrap().1.contains("1-100, 250"));
    }

    #[test]
    fn one_update_out_of_scope_refuses_the_request_and_is_named() {
        let key = one(&format!("fleet {HASH} streams=location devices=truck-")).unwrap();
        let metrics = Metrics::new().unwrap();
        let entry = KeyEntry {
            key,
            limiter: None,
            outcomes: OUTCOMES.map(|o| metrics.requests_by_key.with_label_values(&["fleet", o])),
        };
        let updates = [location("truck-1"), location("car-2"), location("truck-3")];
        match entry.check_scope(&updates) {
            Err(IngestError::OutOfScope { updates, errors, .. }) => {
                assert_eq!(updates, 1);
                assert_eq!(errors[0].index, 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(entry.check_scope(&updates[..1]).is_ok());
        assert!(entry.check_stream::<PollResult>().is_err());
        assert!(entry.check_stream::<LocationUpdate>().is_ok());
    }
}
