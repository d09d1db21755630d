//! Wire payloads → validated updates. Pure: no IO, no clock of its own (the caller passes `now`).
//!
//! A request body is read into [`RawUpdate`]s (known fields kept as JSON values, unknown ones gathered as
//! attributes) by [`body::parse_body`], then each is turned into a domain type ([`LocationUpdate`],
//! [`PollResult`]) by [`Update::validate`], which reports every broken rule rather than the first one. Each
//! stream's OpenAPI schema (`utoipa::ToSchema`) is built from the same ranges its validator checks.
//!
//! [`recheck`] applies the same rules again to updates read back from a queue others can write to (JetStream).
//!
//! A [`DeadLetter`] (a tracker's fix that can never be stored) is not read from a body: the tracker routes make
//! it, and it travels through the same intake as the updates so that it is as durable as they are.

pub mod body;
pub mod dead_letter;
mod fields;
pub mod location;
pub mod poll;
pub mod recheck;
pub mod tracker;

pub use body::{parse_body, BodyError, BodyFormat, RawUpdate};
pub use dead_letter::DeadLetter;
pub use fields::{FieldError, IntegerRange, NumberRange, Scalar, ValidationRules, MAX_ATTRIBUTES_BYTES};
pub use location::LocationUpdate;
pub use poll::PollResult;

use time::OffsetDateTime;

/// One kind of update (one stream): how its wire form is read and checked.
pub trait Update: Sized + Send + 'static {
    /// The stream's name in URLs, logs and metric labels.
    const STREAM: &'static str;
    /// The field names the stream knows; every other field goes to `attributes`.
    const FIELDS: &'static [&'static str];

    /// About how much memory the update takes, inline and on the heap: what the queue's byte bound counts.
    fn memory_bytes(&self) -> usize;

    /// Checks every rule; on failure returns every broken rule, not just the first.
    fn validate(
        raw: RawUpdate<'_>,
        rules: &ValidationRules,
        received_at: OffsetDateTime,
    ) -> Result<Self, Vec<FieldError>>;
}

/// One rule broken by one update of a request: what a 422 lists.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UpdateError {
    /// Position of the update in the request, 0-based (for NDJSON, among the non-blank lines).
    pub index: usize,
    /// The field that breaks the rule; `None` when the update as a whole is wrong (not an object).
    pub field: Option<String>,
    /// What the rule is, in one short phrase.
    pub reason: String,
}

/// Validates every update of a request: all of them, or the list of what is wrong (at most `max_errors`).
pub fn validate_all<U: Update>(
    raw: Vec<RawUpdate<'_>>,
    rules: &ValidationRules,
    received_at: OffsetDateTime,
    max_errors: usize,
) -> Result<Vec<U>, ValidationFailure> {
    let mut valid = Vec::with_capacity(raw.len());
    let mut errors = Vec::new();
    let mut invalid_updates = 0usize;
    for (index, update) in raw.into_iter().enumerate() {
        match U::validate(update, rules, received_at) {
            Ok(update) if errors.is_empty() => valid.push(update),
            Ok(_) => {}
            Err(field_errors) => {
                invalid_updates += 1;
                for e in field_errors {
                    if errors.len() < max_errors {
                        errors.push(UpdateError {
                            index,
                            field: e.field,
                            reason: e.reason,
                        });
                    }
                }
            }
        }
    }
    if invalid_updates == 0 {
        Ok(valid)
    } else {
        Err(ValidationFailure {
            invalid_updates,
            errors,
        })
    }
}

/// Why a request's updates were refused.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationFailure {
    /// How many updates broke at least one rule.
    pub invalid_updates: usize,
    /// The broken rules, capped so that a huge bad request gets a bounded answer.
    pub errors: Vec<UpdateError>,
}
