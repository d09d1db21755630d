//! A location update (a GPS fix from a truck): its fields and rules.

use time::OffsetDateTime;
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;

use super::fields::{timestamp_schema, Checker, FieldError, NumberRange, Presence, ValidationRules};
use super::{RawUpdate, Update};

/// A location update that has passed every rule.
#[derive(Debug, Clone, PartialEq)]
pub struct LocationUpdate {
    /// 1–64 chars of `A-Z a-z 0-9 . _ : -`.
    pub device_id: String,
    /// When the device took the fix.
    pub recorded_at: OffsetDateTime,
    /// Latitude, −90 … 90.
    pub lat: f64,
    /// Longitude, −180 … 180.
    pub lon: f64,
    /// Speed, 0 … 400 km/h.
    pub speed_kmh: Option<f64>,
    /// Heading, 0 ≤ h < 360 degrees.
    pub heading_deg: Option<f64>,
    /// Accuracy radius, 0 … 100 000 m.
    pub accuracy_m: Option<f64>,
    /// Every field the stream does not know, as one JSON object; `None` when there were none.
    pub attributes: Option<String>,
    /// The gateway's clock when the request was accepted.
    pub received_at: OffsetDateTime,
}

#[cfg(test)]
impl LocationUpdate {
    /// A fix of `device_id` at 0°, 0° at the Unix epoch, with nothing optional: for tests of what carries updates,
    /// which care about the device, not the fix.
    pub fn at_epoch(device_id: &str) -> Self {
        LocationUpdate {
            device_id: device_id.to_owned(),
            recorded_at: OffsetDateTime::UNIX_EPOCH,
            lat: 0.0,
            lon: 0.0,
            speed_kmh: None,
            heading_deg: None,
            accuracy_m: None,
            attributes: None,
            received_at: OffsetDateTime::UNIX_EPOCH,
        }
    }
}

const DEVICE_ID: usize = 0;
const RECORDED_AT: usize = 1;
const LAT: usize = 2;
const LON: usize = 3;
const SPEED_KMH: usize = 4;
const HEADING_DEG: usize = 5;
const ACCURACY_M: usize = 6;

/// Longest `device_id`, in characters (all of them ASCII).
pub const DEVICE_ID_MAX_CHARS: usize = 64;
/// The characters a `device_id` may hold besides ASCII letters and digits; `-` last, so that the OpenAPI
/// pattern's character class can list them as they are.
const DEVICE_ID_PUNCTUATION: &str = "._:-";

/// Latitude, degrees.
pub const LAT_RANGE: NumberRange = NumberRange {
    min: -90.0,
    max: 90.0,
    max_exclusive: false,
};
/// Longitude, degrees.
pub const LON_RANGE: NumberRange = NumberRange {
    min: -180.0,
    max: 180.0,
    max_exclusive: false,
};
/// Speed, km/h.
pub const SPEED_KMH_RANGE: NumberRange = NumberRange {
    min: 0.0,
    max: 400.0,
    max_exclusive: false,
};
/// Heading, degrees: 360 is written 0.
pub const HEADING_DEG_RANGE: NumberRange = NumberRange {
    min: 0.0,
    max: 360.0,
    max_exclusive: true,
};
/// Accuracy radius, metres.
pub const ACCURACY_M_RANGE: NumberRange = NumberRange {
    min: 0.0,
    max: 100_000.0,
    max_exclusive: false,
};

/// Whether `id` is a valid device id: 1–64 chars of `A-Z a-z 0-9 . _ : -`.
pub fn is_valid_device_id(id: &str) -> bool {
    (1..=DEVICE_ID_MAX_CHARS).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || DEVICE_ID_PUNCTUATION.as_bytes().contains(&b))
}

/// The JSON Schema of a device id, as [`is_valid_device_id`] checks it.
pub(crate) fn device_id_schema(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .min_length(Some(1))
        .max_length(Some(DEVICE_ID_MAX_CHARS))
        .pattern(Some(format!("^[A-Za-z0-9{DEVICE_ID_PUNCTUATION}]+$")))
}

impl Update for LocationUpdate {
    const STREAM: &'static str = "location";
    const FIELDS: &'static [&'static str] = &[
        "device_id",
        "recorded_at",
        "lat",
        "lon",
        "speed_kmh",
        "heading_deg",
        "accuracy_m",
    ];

    fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.device_id.capacity() + self.attributes.as_ref().map_or(0, String::capacity)
    }

    fn validate(
        raw: RawUpdate<'_>,
        rules: &ValidationRules,
        received_at: OffsetDateTime,
    ) -> Result<Self, Vec<FieldError>> {
        if let Some(e) = raw.malformed {
            return Err(vec![e]);
        }
        let mut known = raw.known;
        let mut take = |i: usize| known.get_mut(i).and_then(Option::take);
        let mut c = Checker::default();

        let device_id = c
            .required("device_id", take(DEVICE_ID))
            .and_then(|v| c.string("device_id", v));
        let device_id = device_id.filter(|id| {
            let ok = is_valid_device_id(id);
            if !ok {
                c.errors.push(FieldError::new(
                    "device_id",
                    "must be 1 to 64 characters of A-Z a-z 0-9 . _ : -",
                ));
            }
            ok
        });
        let recorded_at = c
            .required("recorded_at", take(RECORDED_AT))
            .and_then(|v| c.timestamp("recorded_at", v, rules));
        let lat = c.required("lat", take(LAT)).and_then(|v| c.number("lat", v, LAT_RANGE));
        let lon = c.required("lon", take(LON)).and_then(|v| c.number("lon", v, LON_RANGE));
        let speed_kmh = Checker::optional(take(SPEED_KMH)).map(|v| c.number("speed_kmh", v, SPEED_KMH_RANGE));
        let heading_deg = Checker::optional(take(HEADING_DEG)).map(|v| c.number("heading_deg", v, HEADING_DEG_RANGE));
        let accuracy_m = Checker::optional(take(ACCURACY_M)).map(|v| c.number("accuracy_m", v, ACCURACY_M_RANGE));
        let attributes = c.attributes(&raw.attributes, raw.attributes_bytes, rules);

        let update = (|| {
            Some(LocationUpdate {
                device_id: device_id?,
                recorded_at: recorded_at?,
                lat: lat?,
                lon: lon?,
                // An optional field that was sent but is wrong is an error (in `c`), never an absence.
                speed_kmh: speed_kmh.flatten(),
                heading_deg: heading_deg.flatten(),
                accuracy_m: accuracy_m.flatten(),
                attributes,
                received_at,
            })
        })();
        c.finish(update)
    }
}

/// The OpenAPI schema of one location update as sent, built from the ranges [`LocationUpdate::validate`] checks.
impl utoipa::PartialSchema for LocationUpdate {
    fn schema() -> RefOr<Schema> {
        let device_id = device_id_schema("The device that took the fix");
        ObjectBuilder::new()
            .description(Some(
                "A GPS fix. Every other field is kept, as sent, in the `attributes` jsonb column (at most 4 KiB \
                 of JSON per update); a key given twice is an error.",
            ))
            .property("device_id", device_id)
            .required("device_id")
            .property("recorded_at", timestamp_schema("When the device took the fix"))
            .required("recorded_at")
            .property("lat", LAT_RANGE.schema(Presence::Required, "Latitude, degrees"))
            .required("lat")
            .property("lon", LON_RANGE.schema(Presence::Required, "Longitude, degrees"))
            .required("lon")
            .property("speed_kmh", SPEED_KMH_RANGE.schema(Presence::Optional, "Speed, km/h"))
            .property(
                "heading_deg",
                HEADING_DEG_RANGE.schema(Presence::Optional, "Heading, degrees clockwise from north"),
            )
            .property(
                "accuracy_m",
                ACCURACY_M_RANGE.schema(Presence::Optional, "Accuracy radius, metres"),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .build()
            .into()
    }
}

impl utoipa::ToSchema for LocationUpdate {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_body, BodyFormat};
    use proptest::prelude::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-22 12:00 UTC);

    fn validate(json: &str) -> Result<LocationUpdate, Vec<FieldError>> {
        let mut raw = parse_body(json.as_bytes(), BodyFormat::Json, LocationUpdate::FIELDS, 10).unwrap();
        LocationUpdate::validate(raw.remove(0), &ValidationRules::with_defaults(NOW), NOW)
    }

    fn fields_of(result: Result<LocationUpdate, Vec<FieldError>>) -> Vec<String> {
        result
            .unwrap_err()
            .into_iter()
            .map(|e| e.field.unwrap_or_default())
            .collect()
    }

    #[test]
    fn a_full_update_keeps_every_field_and_the_unknown_ones_as_attributes() {
        let u = validate(
            r#"{"device_id":"truck-1","recorded_at":"2026-11-22T11:59:00+01:00","lat":45.5,"lon":-73.25,
                "speed_kmh":88.5,"heading_deg":359.9,"accuracy_m":3,"driver":"ana","temp":{"c":4}}"#,
        )
        .unwrap();
        assert_eq!(u.device_id, "truck-1");
        assert_eq!(u.recorded_at, datetime!(2026-11-22 10:59 UTC));
        assert_eq!((u.lat, u.lon), (45.5, -73.25));
        assert_eq!(
            (u.speed_kmh, u.heading_deg, u.accuracy_m),
            (Some(88.5), Some(359.9), Some(3.0))
        );
        assert_eq!(u.attributes.as_deref(), Some(r#"{"driver":"ana","temp":{"c":4}}"#));
        assert_eq!(u.received_at, NOW);
    }

    #[test]
    fn unix_milliseconds_are_a_timestamp_and_optional_fields_may_be_null() {
        let ms = NOW.unix_timestamp() * 1000 - 1500;
        let u = validate(&format!(
            r#"{{"device_id":"a","recorded_at":{ms},"lat":0,"lon":0,"speed_kmh":null}}"#
        ))
        .unwrap();
        assert_eq!(u.recorded_at, NOW - time::Duration::milliseconds(1500));
        assert_eq!((u.speed_kmh, u.attributes), (None, None));
    }

    #[test]
    fn every_broken_rule_is_reported_not_just_the_first() {
        let fields = fields_of(validate(
            r#"{"device_id":"no spaces","recorded_at":"yesterday","lat":91,"lon":"0","speed_kmh":-1,
                "heading_deg":360,"accuracy_m":100001}"#,
        ));
        assert_eq!(
            fields,
            [
                "device_id",
                "recorded_at",
                "lat",
                "lon",
                "speed_kmh",
                "heading_deg",
                "accuracy_m"
            ]
            .map(String::from)
        );
    }

    #[test]
    fn missing_required_fields_are_each_named() {
        assert_eq!(
            fields_of(validate("{}")),
            ["device_id", "recorded_at", "lat", "lon"].map(String::from)
        );
    }

    #[test]
    fn timestamps_outside_the_window_are_refused() {
        for at in ["2026-11-22T12:05:01Z", "2026-10-23T11:59:59Z", "2026-11-22T12:00:00"] {
            let json = format!(r#"{{"device_id":"a","recorded_at":"{at}","lat":0,"lon":0}}"#);
            assert_eq!(fields_of(validate(&json)), ["recorded_at"], "{at}");
        }
        let ok = r#"{"device_id":"a","recorded_at":"2026-11-22T12:05:00Z","lat":0,"lon":0}"#;
        assert!(validate(ok).is_ok());
    }

    #[test]
    fn attributes_over_four_kib_are_refused() {
        let big = "x".repeat(5000);
        let json = format!(r#"{{"device_id":"a","recorded_at":"2026-11-22T12:00:00Z","lat":0,"lon":0,"n":"{big}"}}"#);
        assert_eq!(fields_of(validate(&json)), ["attributes"]);
    }

    proptest! {
        #[test]
        fn latitude_is_accepted_exactly_within_its_range(lat in -1000.0f64..1000.0) {
            let json = format!(r#"{{"device_id":"a","recorded_at":"2026-11-22T12:00:00Z","lat":{lat:?},"lon":0}}"#);
            prop_assert_eq!(validate(&json).is_ok(), (-90.0..=90.0).contains(&lat));
        }

        #[test]
        fn heading_is_accepted_exactly_in_zero_to_below_360(h in -10.0f64..370.0) {
            let json = format!(
                r#"{{"device_id":"a","recorded_at":"2026-11-22T12:00:00Z","lat":0,"lon":0,"heading_deg":{h:?}}}"#
            );
            prop_assert_eq!(validate(&json).is_ok(), (0.0..360.0).contains(&h));
        }

        #[test]
        fn device_id_rule_matches_its_definition(id in "[ -~]{0,70}") {
            let expected = !id.is_empty() && id.len() <= 64
                && id.chars().all(|c| c.is_ascii_alphanumeric() || ".:_-".contains(c));
            let json = format!(
                r#"{{"device_id":{},"recorded_at":"2026-11-22T12:00:00Z","lat":0,"lon":0}}"#,
                serde_json::to_string(&id).unwrap()
            );
            prop_assert_eq!(validate(&json).is_ok(), expected);
        }

        #[test]
        fn unix_millisecond_timestamps_follow_the_window(offset_ms in -31i64 * 86_400_000..10 * 60_000) {
            let ms = NOW.unix_timestamp() * 1000 + offset_ms;
            let json = format!(r#"{{"device_id":"a","recorded_at":{ms},"lat":0,"lon":0}}"#);
            let expected = (-30 * 86_400_000..=5 * 60_000).contains(&offset_ms);
            prop_assert_eq!(validate(&json).is_ok(), expected);
        }
    }

    #[test]
    fn the_openapi_schema_lists_every_known_field_and_requires_the_required_ones() {
        let schema = serde_json::to_value(<LocationUpdate as utoipa::PartialSchema>::schema()).unwrap();
        let properties: Vec<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut fields = LocationUpdate::FIELDS.to_vec();
        fields.sort_unstable();
        assert_eq!(properties, fields);
        assert_eq!(
            schema["required"],
            serde_json::json!(["device_id", "recorded_at", "lat", "lon"])
        );
        assert_eq!(schema["additionalProperties"], true);
    }
}
