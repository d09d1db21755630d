//! Every way a request can be refused, as one enum: the status code is a `match`, and every body is
//! `{"error": "<code>", "message": "<sentence>", "details": [...]}`. The OpenAPI document's error responses are
//! built here too, from one refusal of each kind, so that they show what the `match`es answer.

use std::collections::BTreeMap;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, Ref, RefOr};
use utoipa::ToSchema;

use crate::metrics::RejectReason;
use crate::model::{UpdateError, ValidationFailure};

/// Seconds a client is told to wait after a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

/// The JSON body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for programs: a short code such as `invalid_update`.
    pub error: &'static str,
    /// What went wrong, for people: one sentence.
    pub message: String,
    /// The particulars, as objects whose fields depend on `error` (e.g. `index`, `field` and `reason` for
    /// `invalid_update`); empty when there are none.
    #[schema(value_type = Vec<Object>)]
    pub details: Vec<Value>,
}

impl ErrorBody {
    pub fn new(error: &'static str, message: impl Into<String>, details: Vec<Value>) -> Self {
        Self {
            error,
            message: message.into(),
            details,
        }
    }
}

/// Why an ingest request was refused; nothing of it was queued.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the body is not valid JSON")]
    InvalidJson {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("the body could not be decoded")]
    InvalidEncoding { message: String },
    #[error("the body could not be read")]
    ReadBody { message: String },
    #[error("the body is larger than {limit_bytes} bytes")]
    BodyTooLarge { limit_bytes: usize },
    #[error("the request holds more than {limit} updates")]
    TooManyUpdates { limit: usize },
    #[error("unsupported {what}: {found}")]
    UnsupportedMediaType { what: &'static str, found: String },
    #[error("{} of the updates break a rule; none was accepted", .0.invalid_updates)]
    InvalidUpdates(ValidationFailure),
    #[error("the queue is full")]
    Overloaded { updates: usize },
    #[error("the gateway is shutting down")]
    ShuttingDown { updates: usize },
    #[error("the write-ahead log is full")]
    LogFull { updates: usize },
    #[error("the updates could not be stored durably: {message}")]
    Storage { updates: usize, message: String },
    #[error("unsupported query parameter: {0}")]
    InvalidParameter(String),
    #[error("the body did not arrive in time ({received_bytes} bytes received)")]
    BodyTimeout { received_bytes: usize },
    #[error("the gateway holds as many request bodies as it may; retry after the Retry-After delay")]
    BodyBudget,
    #[error("the body expands more than {max_ratio} times when decompressed")]
    GzipRatio { max_ratio: usize },
    #[error("an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>")]
    MissingKey,
    #[error("the API key is not known")]
    UnknownKey,
    /// The keys file could not be used at its last reload: rather than keep keys that may have been revoked, every
    /// write is refused until a good file is loaded. 503, so that clients keep their updates and retry.
    #[error("the gateway cannot use its API keys file; every write is refused until it is fixed")]
    KeysUnusable,
    #[error("requests from web pages of another origin ({origin}) are not taken")]
    CrossOrigin { origin: String },
    #[error("the key {key} may not write the {stream} stream")]
    StreamNotAllowed {
        key: String,
        stream: &'static str,
        allowed: Vec<&'static str>,
    },
    #[error("{updates} of the updates are outside what the key {key} may write; none was accepted")]
    OutOfScope {
        key: String,
        updates: usize,
        errors: Vec<UpdateError>,
    },
    #[error("over the rate limit of this {limit}; retry after {retry_after_secs} s")]
    RateLimited {
        limit: &'static str,
        updates: usize,
        retry_after_secs: u64,
    },
    #[error("the request holds more updates than this {limit} may send at once ({burst}); split it")]
    LargerThanBurst { limit: &'static str, burst: u32 },
    /// A tracker's request its client or operator must fix: no device id, or a body not of its protocol.
    #[error("{message}")]
    InvalidTrackerRequest { message: String },
}

impl IngestError {
    /// The reason label under which the refused updates are counted.
    pub fn reason(&self) -> RejectReason {
        match self {
            IngestError::InvalidJson { .. } | IngestError::InvalidEncoding { .. } | IngestError::ReadBody { .. } => {
                RejectReason::InvalidJson
            }
            IngestError::BodyTooLarge { .. } | IngestError::TooManyUpdates { .. } | IngestError::GzipRatio { .. } => {
                RejectReason::PayloadTooLarge
            }
            IngestError::BodyTimeout { .. } => RejectReason::BodyTimeout,
            IngestError::BodyBudget => RejectReason::Overloaded,
            IngestError::UnsupportedMediaType { .. } => RejectReason::UnsupportedMediaType,
            IngestError::InvalidUpdates(_) => RejectReason::InvalidUpdate,
            IngestError::Overloaded { .. } => RejectReason::Overloaded,
            IngestError::ShuttingDown { .. } => RejectReason::ShuttingDown,
            IngestError::LogFull { .. } => RejectReason::LogFull,
            IngestError::Storage { .. } => RejectReason::StorageError,
            IngestError::InvalidParameter(_) => RejectReason::InvalidJson,
            IngestError::MissingKey | IngestError::UnknownKey | IngestError::KeysUnusable => RejectReason::Unauthorized,
            IngestError::StreamNotAllowed { .. } | IngestError::OutOfScope { .. } | IngestError::CrossOrigin { .. } => {
                RejectReason::Forbidden
            }
            IngestError::RateLimited { .. } => RejectReason::RateLimited,
            IngestError::LargerThanBurst { .. } => RejectReason::PayloadTooLarge,
            IngestError::InvalidTrackerRequest { .. } => RejectReason::InvalidUpdate,
        }
    }

    /// How many updates the refusal counts for: the request's updates where they were read, else one.
    pub fn updates(&self) -> u64 {
        match self {
            IngestError::InvalidUpdates(f) => f.invalid_updates.max(1) as u64,
            IngestError::Overloaded { updates }
            | IngestError::ShuttingDown { updates }
            | IngestError::LogFull { updates }
            | IngestError::Storage { updates, .. }
            | IngestError::OutOfScope { updates, .. }
            | IngestError::RateLimited { updates, .. } => (*updates).max(1) as u64,
            _ => 1,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            IngestError::InvalidJson { .. } => "invalid_json",
            IngestError::InvalidEncoding { .. } => "invalid_encoding",
            IngestError::ReadBody { .. } => "invalid_body",
            IngestError::BodyTooLarge { .. } | IngestError::TooManyUpdates { .. } | IngestError::GzipRatio { .. } => {
                "payload_too_large"
            }
            IngestError::BodyTimeout { .. } => "body_timeout",
            IngestError::BodyBudget => "overloaded",
            IngestError::UnsupportedMediaType { .. } => "unsupported_media_type",
            IngestError::InvalidUpdates(_) => "invalid_update",
            IngestError::Overloaded { .. } | IngestError::ShuttingDown { .. } | IngestError::LogFull { .. } => {
                "overloaded"
            }
            IngestError::Storage { .. } => "storage_unavailable",
            IngestError::InvalidParameter(_) => "invalid_parameter",
            IngestError::MissingKey | IngestError::UnknownKey => "unauthorized",
            IngestError::KeysUnusable => "keys_unusable",
            IngestError::StreamNotAllowed { .. } | IngestError::OutOfScope { .. } | IngestError::CrossOrigin { .. } => {
                "forbidden"
            }
            IngestError::RateLimited { .. } => "rate_limited",
            IngestError::LargerThanBurst { .. } => "payload_too_large",
            IngestError::InvalidTrackerRequest { .. } => "invalid_request",
        }
    }

    fn details(&self) -> Vec<Value> {
        match self {
            IngestError::InvalidJson { line, column, message } => {
                vec![json!({"line": line, "column": column, "reason": message})]
            }
            IngestError::InvalidEncoding { message } | IngestError::ReadBody { message } => {
                vec![json!({"reason": message})]
            }
            IngestError::BodyTooLarge { limit_bytes } => vec![json!({"limit_bytes": limit_bytes})],
            IngestError::TooManyUpdates { limit } => vec![json!({"limit_updates": limit})],
            IngestError::UnsupportedMediaType { .. } => vec![json!({
                "content_types": ["application/json", "application/x-ndjson"],
                "content_encodings": ["identity", "gzip"],
            })],
            IngestError::InvalidUpdates(f) => f.errors.iter().map(update_error_json).collect(),
            IngestError::Overloaded { .. }
            | IngestError::ShuttingDown { .. }
            | IngestError::LogFull { .. }
            | IngestError::Storage { .. } => vec![json!({"retry_after_seconds": RETRY_AFTER_SECS})],
            IngestError::InvalidParameter(p) => vec![json!({"parameter": p, "accepted": ["ack=commit"]})],
            IngestError::BodyTimeout { received_bytes } => vec![json!({"received_bytes": received_bytes})],
            IngestError::BodyBudget | IngestError::KeysUnusable => {
                vec![json!({"retry_after_seconds": RETRY_AFTER_SECS})]
            }
            IngestError::GzipRatio { max_ratio } => vec![json!({"max_gzip_ratio": max_ratio})],
            IngestError::MissingKey | IngestError::UnknownKey => {
                vec![json!({"headers": ["Authorization: Bearer <key>", "X-API-Key: <key>"]})]
            }
            IngestError::CrossOrigin { origin } => vec![json!({"origin": origin})],
            IngestError::StreamNotAllowed { stream, allowed, .. } => {
                vec![json!({"stream": stream, "allowed_streams": allowed})]
            }
            IngestError::OutOfScope { errors, .. } => errors.iter().map(update_error_json).collect(),
            IngestError::RateLimited {
                limit,
                retry_after_secs,
                ..
            } => vec![json!({"limit": limit, "retry_after_seconds": retry_after_secs})],
            IngestError::LargerThanBurst { limit, burst } => vec![json!({"limit": limit, "limit_updates": burst})],
            IngestError::InvalidTrackerRequest { .. } => vec![],
        }
    }

    /// One refusal of each kind, with made-up figures: what the OpenAPI document shows.
    fn samples() -> Vec<IngestError> {
        vec![
            IngestError::InvalidJson {
                line: 1,
                column: 12,
                message: "expected `:` at line 1 column 12".to_owned(),
            },
            IngestError::InvalidEncoding {
                message: "gzip: invalid gzip header".to_owned(),
            },
            IngestError::ReadBody {
                message: "the connection was closed before the body was complete".to_owned(),
            },
            IngestError::InvalidParameter("ack=later".to_owned()),
            IngestError::BodyTooLarge { limit_bytes: 8_388_608 },
            IngestError::TooManyUpdates { limit: 10_000 },
            IngestError::UnsupportedMediaType {
                what: "content type",
                found: "text/plain".to_owned(),
            },
            IngestError::InvalidUpdates(ValidationFailure {
                invalid_updates: 1,
                errors: vec![UpdateError {
                    index: 0,
                    field: Some("lat".to_owned()),
                    reason: "must be a finite number from -90 and at most 90".to_owned(),
                }],
            }),
            IngestError::Overloaded { updates: 1 },
            IngestError::ShuttingDown { updates: 1 },
            IngestError::LogFull { updates: 1 },
            IngestError::Storage {
                updates: 1,
                message: "No space left on device (os error 28)".to_owned(),
            },
            IngestError::BodyTimeout { received_bytes: 65536 },
            IngestError::BodyBudget,
            IngestError::GzipRatio { max_ratio: 100 },
            IngestError::MissingKey,
            IngestError::UnknownKey,
            IngestError::KeysUnusable,
            IngestError::CrossOrigin {
                origin: "https://example.com".to_owned(),
            },
            IngestError::StreamNotAllowed {
                key: "pollers".to_owned(),
                stream: "location",
                allowed: vec!["poll"],
            },
            IngestError::OutOfScope {
                key: "fleet-north".to_owned(),
                updates: 1,
                errors: vec![UpdateError {
                    index: 0,
                    field: Some("device_id".to_owned()),
                    reason: "outside the device-id prefixes of the key".to_owned(),
                }],
            },
            IngestError::RateLimited {
                limit: "key",
                updates: 1,
                retry_after_secs: 1,
            },
            IngestError::LargerThanBurst {
                limit: "key",
                burst: 500,
            },
            IngestError::InvalidTrackerRequest {
                message: "no device id: add id=<device> to the URL or the form (or deviceid, ser, aid)".to_owned(),
            },
        ]
    }

    /// A distinct name for each kind of refusal, naming its example in the OpenAPI document. The `match` has no
    /// catch-all, so that a new kind cannot be added without a name; give it a sample in [`Self::samples`] too.
    fn sample_name(&self) -> &'static str {
        match self {
            IngestError::InvalidJson { .. } => "invalid_json",
            IngestError::InvalidEncoding { .. } => "invalid_encoding",
            IngestError::ReadBody { .. } => "invalid_body",
            IngestError::BodyTooLarge { .. } => "body_too_large",
            IngestError::TooManyUpdates { .. } => "too_many_updates",
            IngestError::UnsupportedMediaType { .. } => "unsupported_media_type",
            IngestError::InvalidUpdates(_) => "invalid_update",
            IngestError::Overloaded { .. } => "overloaded",
            IngestError::ShuttingDown { .. } => "shutting_down",
            IngestError::LogFull { .. } => "log_full",
            IngestError::Storage { .. } => "storage_unavailable",
            IngestError::InvalidParameter(_) => "invalid_parameter",
            IngestError::BodyTimeout { .. } => "body_timeout",
            IngestError::BodyBudget => "body_budget",
            IngestError::GzipRatio { .. } => "gzip_ratio",
            IngestError::MissingKey => "missing_key",
            IngestError::UnknownKey => "unknown_key",
            IngestError::KeysUnusable => "keys_unusable",
            IngestError::CrossOrigin { .. } => "cross_origin",
            IngestError::StreamNotAllowed { .. } => "stream_not_allowed",
            IngestError::OutOfScope { .. } => "out_of_scope",
            IngestError::RateLimited { .. } => "rate_limited",
            IngestError::LargerThanBurst { .. } => "larger_than_burst",
            IngestError::InvalidTrackerRequest { .. } => "invalid_tracker_request",
        }
    }

    fn body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), sentence(self), self.details())
    }
}

/// The error responses of the ingest routes in the OpenAPI document: one per status, each with an example of
/// every refusal that answers it, as [`ResponseError`] renders it.
impl utoipa::IntoResponses for IngestError {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut by_status: BTreeMap<StatusCode, Vec<IngestError>> = BTreeMap::new();
        for sample in IngestError::samples() {
            by_status.entry(sample.status_code()).or_default().push(sample);
        }
        by_status
            .into_iter()
            .map(|(status, samples)| (status.as_str().to_owned(), error_response(status, &samples).into()))
            .collect()
    }
}

/// One error response of the OpenAPI document: `samples` all answer `status`.
fn error_response(status: StatusCode, samples: &[IngestError]) -> Response {
    let mut codes: Vec<&str> = samples.iter().map(IngestError::code).collect();
    codes.dedup();
    let codes = codes.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ");
    let examples = samples.iter().map(|sample| {
        let example = ExampleBuilder::new()
            .summary(sentence(sample))
            .value(serde_json::to_value(sample.body()).ok())
            .build();
        (sample.sample_name(), example)
    });
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name(ErrorBody::name())))
        .examples_from_iter(examples)
        .build();
    let response = ResponseBuilder::new()
        .description(format!(
            "{}: {codes}; nothing of the request was accepted",
            status.canonical_reason().unwrap_or_default()
        ))
        .content("application/json", content);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        let seconds = ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0));
        let retry_after = HeaderBuilder::new()
            .schema(seconds)
            .description(Some("Seconds to wait before sending the request again"))
            .build();
        response.header("Retry-After", retry_after).build()
    } else {
        response.build()
    }
}

fn update_error_json(e: &UpdateError) -> Value {
    json!({"index": e.index, "field": e.field, "reason": e.reason})
}

impl ResponseError for IngestError {
    fn status_code(&self) -> StatusCode {
        match self {
            IngestError::InvalidJson { .. } | IngestError::InvalidEncoding { .. } | IngestError::ReadBody { .. } => {
                StatusCode::BAD_REQUEST
            }
            IngestError::BodyTooLarge { .. } | IngestError::TooManyUpdates { .. } | IngestError::GzipRatio { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            IngestError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            IngestError::BodyBudget => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::InvalidUpdates(_) => StatusCode::UNPROCESSABLE_ENTITY,
            IngestError::Overloaded { .. }
            | IngestError::ShuttingDown { .. }
            | IngestError::LogFull { .. }
            | IngestError::Storage { .. } => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::InvalidParameter(_) => StatusCode::BAD_REQUEST,
            IngestError::MissingKey | IngestError::UnknownKey => StatusCode::UNAUTHORIZED,
            IngestError::KeysUnusable => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::StreamNotAllowed { .. } | IngestError::OutOfScope { .. } | IngestError::CrossOrigin { .. } => {
                StatusCode::FORBIDDEN
            }
            IngestError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            IngestError::LargerThanBurst { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::InvalidTrackerRequest { .. } => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if self.status_code() == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS.to_string()));
        }
        match self {
            IngestError::RateLimited { retry_after_secs, .. } => {
                response.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            // RFC 6750: a missing key gets the scheme only; a wrong one is also told it is invalid.
            IngestError::MissingKey => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"ingest-gateway\""));
            }
            IngestError::UnknownKey => {
                response.insert_header((
                    header::WWW_AUTHENTICATE,
                    "Bearer realm=\"ingest-gateway\", error=\"invalid_token\"",
                ));
            }
            _ => {}
        }
        response.json(self.body())
    }
}

/// The human message: the error's own text, made a sentence.
fn sentence(error: &IngestError) -> String {
    let text = match error {
        IngestError::Overloaded { .. } => "the queue is full; retry after the Retry-After delay".to_owned(),
        IngestError::ShuttingDown { .. } => {
            "the gateway is shutting down; retry on another instance or later".to_owned()
        }
        // The operating system's words (paths, device names) are for the operator's log, not for clients.
        IngestError::Storage { .. } => {
            "the updates could not be stored durably; retry after the Retry-After delay".to_owned()
        }
        other => other.to_string(),
    };
    let mut chars = text.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().collect::<String>() + chars.as_str() + ".")
        .unwrap_or_default()
}
