//! A fix a tracker sent that can never be stored (bad or `0,0` coordinates, flagged invalid, outside the time
//! window, a field of the wrong type): answered as the tracker's success, so that it does not block the device's
//! backlog, and kept in `dead_letters` with its reason and the request's raw fields.

use time::OffsetDateTime;

/// One refused tracker fix, on its way to `dead_letters`. It travels through the same intake as the updates (the
/// log, the queue, the batch writers), so that a fix answered as success is never lost either.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The stream the fix was meant for (`location`).
    pub stream: String,
    /// The tracker protocol that brought it (`osmand`, `owntracks`, `overland`, `traccar`).
    pub protocol: String,
    /// Why it can never be stored, from a small fixed set (see [`crate::model::tracker::Rejection`]).
    pub reason: String,
    /// The same, as one human sentence naming the field.
    pub message: String,
    /// The device the request named, as sent.
    pub device_id: Option<String>,
    /// The raw request fields as one JSON object (never the API key).
    pub payload: String,
    /// The gateway's clock when the request was accepted.
    pub received_at: OffsetDateTime,
}

impl DeadLetter {
    /// The stream's name in logs, metric labels and the log's records.
    pub const STREAM: &'static str = "dead_letter";

    /// About how much memory the letter takes, inline and on the heap: what the queue's byte bound counts.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.stream.capacity()
            + self.protocol.capacity()
            + self.reason.capacity()
            + self.message.capacity()
            + self.device_id.as_ref().map_or(0, String::capacity)
            + self.payload.capacity()
    }
}

impl super::Update for DeadLetter {
    const STREAM: &'static str = DeadLetter::STREAM;
    /// None: dead letters are never read from a request body.
    const FIELDS: &'static [&'static str] = &[];

    fn memory_bytes(&self) -> usize {
        DeadLetter::memory_bytes(self)
    }

    /// Always refuses: the tracker routes make dead letters themselves, and no route reads them from a body.
    fn validate(
        _raw: super::RawUpdate<'_>,
        _rules: &super::ValidationRules,
        _received_at: OffsetDateTime,
    ) -> Result<Self, Vec<super::FieldError>> {
        Err(vec![super::FieldError {
            field: None,
            reason: "dead letters are not taken over the API".to_owned(),
        }])
    }
}
