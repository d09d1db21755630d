//! The model's rules applied again to updates that were validated somewhere else — a gateway — and read back from a
//! queue another party can write to (JetStream): the same ranges, lengths and storability, so that a record a
//! gateway never made cannot carry what no request could.
//!
//! The time window is judged as the gateway judged it, around the update's `received_at`, and `received_at` itself
//! around when the queue stored the update (`stored_at`): both come from the record, so the verdict on a record is the
//! same at every delivery, however late a writer reads it — a writer that fell a day behind must not refuse what was
//! valid when it was taken.

use std::time::Duration;

use time::OffsetDateTime;

use super::fields::{unstorable, unstorable_json, FieldError, NumberRange, MAX_ATTRIBUTES_BYTES};
use super::location::{is_valid_device_id, ACCURACY_M_RANGE, HEADING_DEG_RANGE, LAT_RANGE, LON_RANGE, SPEED_KMH_RANGE};
use super::poll::{MAX_ERROR_MESSAGE_CHARS, PROJECT_ID_RANGE, RESPONSE_TIME_MS_RANGE, STATUS_CODE_RANGE};
use super::tracker::{Protocol, Rejection};
use super::{DeadLetter, LocationUpdate, PollResult, Update};

/// The settings-dependent rules, as the gateways apply them (`INGEST_MAX_FUTURE_SKEW`, `INGEST_MAX_AGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecheckRules {
    pub max_future_skew: Duration,
    pub max_age: Duration,
}

/// Longest dead-letter text fields taken: far beyond what the tracker routes make (a sentence; at most 8 KiB of the
/// request's fields), short of what would only be a flood.
const MAX_LETTER_MESSAGE_CHARS: usize = 4096;
const MAX_LETTER_PAYLOAD_BYTES: usize = 64 * 1024;

/// An update whose rules can be checked again.
pub trait Recheck {
    /// Every rule the update breaks (empty: none), `stored_at` being when the queue stored it.
    fn recheck(&self, rules: &RecheckRules, stored_at: OffsetDateTime) -> Vec<FieldError>;
}

/// Collects broken rules.
#[derive(Default)]
struct Broken(Vec<FieldError>);

impl Broken {
    fn unless(&mut self, ok: bool, field: &str, reason: impl Into<String>) {
        if !ok {
            self.0.push(FieldError::new(field, reason));
        }
    }

    fn number(&mut self, field: &str, value: f64, range: NumberRange) {
        self.unless(range.contains(value), field, "is not a finite number in its range");
    }

    fn optional_number(&mut self, field: &str, value: Option<f64>, range: NumberRange) {
        if let Some(value) = value {
            self.number(field, value, range);
        }
    }

    /// `at` within the window a gateway takes around `now`.
    fn window(&mut self, field: &str, at: OffsetDateTime, now: OffsetDateTime, rules: &RecheckRules) {
        self.unless(
            at <= now + rules.max_future_skew && at >= now - rules.max_age,
            field,
            "is outside the allowed time window",
        );
    }

    /// `received_at` against when the queue stored the update: a gateway's clock, within the same window.
    fn received(&mut self, received_at: OffsetDateTime, stored_at: OffsetDateTime, rules: &RecheckRules) {
        self.window("received_at", received_at, stored_at, rules);
    }

    /// The unknown fields as a gateway builds them: one JSON object PostgreSQL's `jsonb` can store, at most 4 KiB.
    fn attributes(&mut self, attributes: Option<&str>) {
        let Some(json) = attributes else {
            return;
        };
        let is_object =
            json.starts_with('{') && json.ends_with('}') && serde_json::from_str::<serde::de::IgnoredAny>(json).is_ok();
        self.unless(is_object, "attributes", "is not one JSON object");
        self.unless(
            json.len() <= MAX_ATTRIBUTES_BYTES,
            "attributes",
            format!("takes more than {MAX_ATTRIBUTES_BYTES} bytes"),
        );
        if let Some(reason) = unstorable_json(json) {
            self.0.push(FieldError::new("attributes", reason));
        }
    }

    fn text(&mut self, field: &str, text: &str, max_chars: usize) {
        self.unless(
            text.chars().count() <= max_chars,
            field,
            format!("is longer than {max_chars} characters"),
        );
        if let Some(reason) = unstorable(text) {
            self.0.push(FieldError::new(field, reason));
        }
    }
}

impl Recheck for LocationUpdate {
    fn recheck(&self, rules: &RecheckRules, stored_at: OffsetDateTime) -> Vec<FieldError> {
        let mut b = Broken::default();
        b.unless(
            is_valid_device_id(&self.device_id),
            "device_id",
            "must be 1 to 64 characters of A-Z a-z 0-9 . _ : -",
        );
        b.window("recorded_at", self.recorded_at, self.received_at, rules);
        b.received(self.received_at, stored_at, rules);
        b.number("lat", self.lat, LAT_RANGE);
        b.number("lon", self.lon, LON_RANGE);
        b.optional_number("speed_kmh", self.speed_kmh, SPEED_KMH_RANGE);
        b.optional_number("heading_deg", self.heading_deg, HEADING_DEG_RANGE);
        b.optional_number("accuracy_m", self.accuracy_m, ACCURACY_M_RANGE);
        b.attributes(self.attributes.as_deref());
        b.0
    }
}

impl Recheck for PollResult {
    fn recheck(&self, rules: &RecheckRules, stored_at: OffsetDateTime) -> Vec<FieldError> {
        let mut b = Broken::default();
        let in_range = |value: i64, range: super::IntegerRange| (range.min..=range.max).contains(&value);
        b.unless(
            in_range(self.project_id, PROJECT_ID_RANGE),
            "project_id",
            "must be an integer from 1",
        );
        b.window("polled_at", self.polled_at, self.received_at, rules);
        b.received(self.received_at, stored_at, rules);
        if let Some(code) = self.status_code {
            b.unless(
                in_range(i64::from(code), STATUS_CODE_RANGE),
                "status_code",
                "must be from 100 to 599",
            );
        }
        if let Some(ms) = self.response_time_ms {
            b.unless(
                in_range(i64::from(ms), RESPONSE_TIME_MS_RANGE),
                "response_time_ms",
                "must be from 0 to 3600000",
            );
        }
        if let Some(message) = &self.error_message {
            b.text("error_message", message, MAX_ERROR_MESSAGE_CHARS);
        }
        b.attributes(self.attributes.as_deref());
        b.0
    }
}

/// A tracker's fix kept as a dead letter: made by the tracker routes from whatever a tracker sent, so its content is
/// free; what is checked is that it names the stream, a protocol and a reason the routes use, and is of a sane size.
impl Recheck for DeadLetter {
    fn recheck(&self, rules: &RecheckRules, stored_at: OffsetDateTime) -> Vec<FieldError> {
        let mut b = Broken::default();
        b.unless(
            self.stream == LocationUpdate::STREAM,
            "stream",
            "is not a stream tracker fixes are meant for",
        );
        b.unless(
            Protocol::ALL.iter().any(|p| p.name() == self.protocol),
            "protocol",
            "is not a tracker protocol",
        );
        b.unless(
            Rejection::ALL.iter().any(|r| r.code() == self.reason),
            "reason",
            "is not a reason a tracker fix is refused for",
        );
        b.unless(
            self.message.chars().count() <= MAX_LETTER_MESSAGE_CHARS,
            "message",
            "is too long",
        );
        b.unless(
            self.payload.len() <= MAX_LETTER_PAYLOAD_BYTES,
            "payload",
            "is too large",
        );
        b.unless(
            self.device_id
                .as_ref()
                .is_none_or(|d| d.chars().count() <= MAX_LETTER_MESSAGE_CHARS),
            "device_id",
            "is too long",
        );
        b.received(self.received_at, stored_at, rules);
        b.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: RecheckRules = RecheckRules {
        max_future_skew: Duration::from_secs(300),
        max_age: Duration::from_secs(30 * 86_400),
    };

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap()
    }

    fn fix() -> LocationUpdate {
        LocationUpdate {
            device_id: "truck-1".into(),
            recorded_at: now() - time::Duration::minutes(1),
            lat: 48.85,
            lon: 2.35,
            speed_kmh: Some(50.0),
            heading_deg: None,
            accuracy_m: None,
            attributes: Some(r#"{"driver":"ana"}"#.into()),
            received_at: now(),
        }
    }

    fn fields(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().filter_map(|e| e.field).collect()
    }

    #[test]
    fn what_a_gateway_accepts_passes_again() {
        assert!(fix().recheck(&RULES, now() + time::Duration::seconds(1)).is_empty());
        let mut edge = fix();
        edge.recorded_at = edge.received_at - RULES.max_age;
        assert!(edge.recheck(&RULES, now()).is_empty(), "the oldest fix a gateway takes");
    }

    #[test]
    fn every_rule_a_forged_fix_breaks_is_named() {
        let mut forged = fix();
        forged.device_id = "truck 1; drop".into();
        forged.lat = f64::NAN;
        forged.lon = 999.0;
        forged.heading_deg = Some(360.0);
        forged.recorded_at = now() - time::Duration::days(365);
        forged.attributes = Some(r#"{"a":"\u0000"}"#.into());
        assert_eq!(
            fields(forged.recheck(&RULES, now())),
            ["device_id", "recorded_at", "lat", "lon", "heading_deg", "attributes"]
        );
        let mut far = fix();
        far.received_at = now() + time::Duration::days(3);
        far.recorded_at = far.received_at;
        assert_eq!(fields(far.recheck(&RULES, now())), ["received_at"]);
        let mut not_object = fix();
        not_object.attributes = Some("[1,2]".into());
        assert_eq!(fields(not_object.recheck(&RULES, now())), ["attributes"]);
    }

    #[test]
    fn a_poll_result_out_of_its_ranges_is_named() {
        let poll = PollResult {
            project_id: 0,
            polled_at: now(),
            success: true,
            status_code: Some(42),
            response_time_ms: Some(-1),
            error_message: Some("x".repeat(2000)),
            attributes: None,
            received_at: now(),
        };
        assert_eq!(
            fields(poll.recheck(&RULES, now())),
            ["project_id", "status_code", "response_time_ms", "error_message"]
        );
    }

    #[test]
    fn a_dead_letter_must_name_a_known_protocol_and_reason() {
        let mut letter = DeadLetter {
            stream: "location".into(),
            protocol: "osmand".into(),
            reason: "null_island".into(),
            message: "lat and lon are both 0".into(),
            device_id: Some("truck-1".into()),
            payload: "{}".into(),
            received_at: now(),
        };
        assert!(letter.recheck(&RULES, now()).is_empty());
        letter.protocol = "evil".into();
        letter.reason = "because".into();
        assert_eq!(fields(letter.recheck(&RULES, now())), ["protocol", "reason"]);
    }
}
