//! What both targets do with an input: the first byte picks the body format and the update limit, the rest is the
//! body, which is parsed and validated as the gateway does, checking the model's promises on the way.

use ingest_gateway::model::{parse_body, validate_all, BodyError, BodyFormat, Update, ValidationRules};
use time::macros::datetime;
use time::OffsetDateTime;

/// A fixed clock, so that an input that fails once fails again when replayed.
const NOW: OffsetDateTime = datetime!(2026-11-22 12:00 UTC);
/// What the gateway passes: a 422 lists at most this many broken rules.
const MAX_ERRORS: usize = 100;

pub fn parse_and_validate<U: Update>(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    // One bit flips the format, so the fuzzer carries what it learns from one format to the other.
    let format = match selector & 1 {
        0 => BodyFormat::Json,
        _ => BodyFormat::Ndjson,
    };
    // The real limit needs bodies longer than the fuzzer tries; a small one reaches the refusal path too.
    let max_updates = match selector & 2 {
        0 => 10_000,
        _ => 1 + usize::from(selector >> 2),
    };
    let raw = match parse_body(body, format, U::FIELDS, max_updates) {
        Ok(raw) => raw,
        Err(BodyError::InvalidJson { line, message, .. }) => {
            assert!(line >= 1 && !message.is_empty());
            return;
        }
        Err(BodyError::TooManyUpdates { limit }) => {
            assert_eq!(limit, max_updates);
            return;
        }
    };
    let count = raw.len();
    assert!(
        count <= max_updates,
        "{count} updates read with a limit of {max_updates}"
    );
    match validate_all::<U>(raw, &ValidationRules::with_defaults(NOW), NOW, MAX_ERRORS) {
        Ok(valid) => assert_eq!(valid.len(), count),
        Err(failure) => {
            assert!((1..=count).contains(&failure.invalid_updates));
            assert!(failure.errors.len() <= MAX_ERRORS);
            // Every refused update says why, up to the cap.
            assert!(failure.errors.len() >= failure.invalid_updates.min(MAX_ERRORS));
            for e in &failure.errors {
                assert!(e.index < count && !e.reason.is_empty(), "{e:?}");
            }
        }
    }
}
