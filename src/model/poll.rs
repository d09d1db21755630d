//! A poll result (the outcome of one check by an uptime or API poller): its fields and rules.

use time::OffsetDateTime;
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;

use super::fields::{timestamp_schema, Checker, FieldError, IntegerRange, Presence, ValidationRules};
use super::{RawUpdate, Update};

/// A poll result that has passed every rule.
#[derive(Debug, Clone, PartialEq)]
pub struct PollResult {
    /// The polled project, 1 … 2^63−1.
    pub project_id: i64,
    /// When the poll ran.
    pub polled_at: OffsetDateTime,
    /// Whether the poll succeeded.
    pub success: bool,
    /// HTTP status seen by the poller, 100 … 599.
    pub status_code: Option<i16>,
    /// Time the polled service took to answer, 0 … 3 600 000 ms.
    pub response_time_ms: Option<i32>,
    /// What went wrong, at most 1 024 characters.
    pub error_message: Option<String>,
    /// Every field the stream does not know, as one JSON object; `None` when there were none.
    pub attributes: Option<String>,
    /// The gateway's clock when the request was accepted.
    pub received_at: OffsetDateTime,
}

const PROJECT_ID: usize = 0;
const POLLED_AT: usize = 1;
const SUCCESS: usize = 2;
const STATUS_CODE: usize = 3;
const RESPONSE_TIME_MS: usize = 4;
const ERROR_MESSAGE: usize = 5;

/// Longest `error_message`, in characters.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 1024;

/// Project ids are positive `bigint`s.
pub const PROJECT_ID_RANGE: IntegerRange = IntegerRange { min: 1, max: i64::MAX };
/// HTTP status codes.
pub const STATUS_CODE_RANGE: IntegerRange = IntegerRange { min: 100, max: 599 };
/// Up to an hour, in milliseconds.
pub const RESPONSE_TIME_MS_RANGE: IntegerRange = IntegerRange { min: 0, max: 3_600_000 };

impl Update for PollResult {
    const STREAM: &'static str = "poll";
    const FIELDS: &'static [&'static str] = &[
        "project_id",
        "polled_at",
        "success",
        "status_code",
        "response_time_ms",
        "error_message",
    ];

    fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.error_message.as_ref().map_or(0, String::capacity)
            + self.attributes.as_ref().map_or(0, String::capacity)
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

        let project_id = c
            .required("project_id", take(PROJECT_ID))
            .and_then(|v| c.integer("project_id", v, PROJECT_ID_RANGE));
        let polled_at = c
            .required("polled_at", take(POLLED_AT))
            .and_then(|v| c.timestamp("polled_at", v, rules));
        let success = c
            .required("success", take(SUCCESS))
            .and_then(|v| c.boolean("success", v));
        let status_code = Checker::optional(take(STATUS_CODE)).map(|v| c.integer("status_code", v, STATUS_CODE_RANGE));
        let response_time_ms =
            Checker::optional(take(RESPONSE_TIME_MS)).map(|v| c.integer("response_time_ms", v, RESPONSE_TIME_MS_RANGE));
        let error_message = Checker::optional(take(ERROR_MESSAGE)).map(|v| {
            c.string("error_message", v)
                .and_then(|m| c.storable("error_message", m))
                .filter(|m| {
                    let ok = m.chars().count() <= MAX_ERROR_MESSAGE_CHARS;
                    if !ok {
                        c.errors
                            .push(FieldError::new("error_message", "must be at most 1024 characters"));
                    }
                    ok
                })
        });
        let attributes = c.attributes(&raw.attributes, raw.attributes_bytes, rules);

        let update = (|| {
            Some(PollResult {
                project_id: project_id?,
                polled_at: polled_at?,
                success: success?,
                // The ranges above fit the column types, so the conversions cannot fail once checked.
                status_code: status_code.flatten().and_then(|n| i16::try_from(n).ok()),
                response_time_ms: response_time_ms.flatten().and_then(|n| i32::try_from(n).ok()),
                error_message: error_message.flatten(),
                attributes,
                received_at,
            })
        })();
        c.finish(update)
    }
}

/// The OpenAPI schema of one poll result as sent, built from the ranges [`PollResult::validate`] checks.
impl utoipa::PartialSchema for PollResult {
    fn schema() -> RefOr<Schema> {
        let success = ObjectBuilder::new()
            .schema_type(Type::Boolean)
            .description(Some("Whether the poll succeeded"));
        let error_message = ObjectBuilder::new()
            .schema_type(Presence::Optional.schema_type(Type::String))
            .description(Some(
                "What went wrong; without the NUL character, which PostgreSQL cannot store",
            ))
            .max_length(Some(MAX_ERROR_MESSAGE_CHARS));
        ObjectBuilder::new()
            .description(Some(
                "The result of one poll. Every other field is kept, as sent, in the `attributes` jsonb column (at \
                 most 4 KiB of JSON per update); a key given twice is an error.",
            ))
            .property(
                "project_id",
                PROJECT_ID_RANGE.schema(Presence::Required, "The polled project"),
            )
            .required("project_id")
            .property("polled_at", timestamp_schema("When the poll ran"))
            .required("polled_at")
            .property("success", success)
            .required("success")
            .property(
                "status_code",
                STATUS_CODE_RANGE.schema(Presence::Optional, "HTTP status the poller saw"),
            )
            .property(
                "response_time_ms",
                RESPONSE_TIME_MS_RANGE.schema(Presence::Optional, "How long the polled service took to answer, ms"),
            )
            .property("error_message", error_message)
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .build()
            .into()
    }
}

impl utoipa::ToSchema for PollResult {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_body, BodyFormat};
    use proptest::prelude::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-22 12:00 UTC);

    fn validate(json: &str) -> Result<PollResult, Vec<FieldError>> {
        let mut raw = parse_body(json.as_bytes(), BodyFormat::Json, PollResult::FIELDS, 10).unwrap();
        PollResult::validate(raw.remove(0), &ValidationRules::with_defaults(NOW), NOW)
    }

    fn fields_of(result: Result<PollResult, Vec<FieldError>>) -> Vec<String> {
        result
            .unwrap_err()
            .into_iter()
            .map(|e| e.field.unwrap_or_default())
            .collect()
    }

    #[test]
    fn a_full_poll_result_keeps_every_field() {
        let p = validate(
            r#"{"project_id":9223372036854775807,"polled_at":"2026-11-22T12:00:00Z","success":false,
                "status_code":503,"response_time_ms":3600000,"error_message":"upstream down","region":"eu"}"#,
        )
        .unwrap();
        assert_eq!(p.project_id, i64::MAX);
        assert!(!p.success);
        assert_eq!((p.status_code, p.response_time_ms), (Some(503), Some(3_600_000)));
        assert_eq!(p.error_message.as_deref(), Some("upstream down"));
        assert_eq!(p.attributes.as_deref(), Some(r#"{"region":"eu"}"#));
    }

    #[test]
    fn every_broken_rule_is_reported() {
        let fields = fields_of(validate(
            r#"{"project_id":0,"polled_at":1e3,"success":"yes","status_code":600,"response_time_ms":-1,
                "error_message":5}"#,
        ));
        assert_eq!(
            fields,
            [
                "project_id",
                "polled_at",
                "success",
                "status_code",
                "response_time_ms",
                "error_message"
            ]
            .map(String::from)
        );
    }

    #[test]
    fn project_id_must_be_an_integer_in_range() {
        for id in ["9223372036854775808", "1.5", "-3", "\"7\""] {
            let json = format!(r#"{{"project_id":{id},"polled_at":"2026-11-22T12:00:00Z","success":true}}"#);
            assert_eq!(fields_of(validate(&json)), ["project_id"], "{id}");
        }
    }

    #[test]
    fn error_message_is_counted_in_characters() {
        let ok = "é".repeat(1024);
        let json =
            format!(r#"{{"project_id":1,"polled_at":"2026-11-22T12:00:00Z","success":true,"error_message":"{ok}"}}"#);
        assert!(validate(&json).is_ok());
        let json = json.replace(&ok, &format!("{ok}e"));
        assert_eq!(fields_of(validate(&json)), ["error_message"]);
    }

    proptest! {
        #[test]
        fn status_code_is_accepted_exactly_from_100_to_599(code in -1000i64..2000) {
            let json = format!(r#"{{"project_id":1,"polled_at":"2026-11-22T12:00:00Z","success":true,"status_code":{code}}}"#);
            prop_assert_eq!(validate(&json).is_ok(), (100..=599).contains(&code));
        }

        #[test]
        fn response_time_is_accepted_exactly_up_to_an_hour(ms in -10i64..4_000_000) {
            let json = format!(r#"{{"project_id":1,"polled_at":"2026-11-22T12:00:00Z","success":true,"response_time_ms":{ms}}}"#);
            prop_assert_eq!(validate(&json).is_ok(), (0..=3_600_000).contains(&ms));
        }
    }

    #[test]
    fn the_openapi_schema_lists_every_known_field_and_requires_the_required_ones() {
        let schema = serde_json::to_value(<PollResult as utoipa::PartialSchema>::schema()).unwrap();
        let properties: Vec<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut fields = PollResult::FIELDS.to_vec();
        fields.sort_unstable();
        assert_eq!(properties, fields);
        assert_eq!(
            schema["required"],
            serde_json::json!(["project_id", "polled_at", "success"])
        );
        assert_eq!(schema["additionalProperties"], true);
    }
}
