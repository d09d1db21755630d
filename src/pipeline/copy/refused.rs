//! Rows a writer refused before they reached a batch, kept in `dead_letters` in one statement.

use deadpool_postgres::Pool;
use time::OffsetDateTime;

use super::encode::{storable_json, storable_text};
use super::error::CopyError;
use super::write::BATCH_WRITE_TIMEOUT;

/// What a writer refused before it reached a batch — a JetStream record without a valid signature, or an update
/// that broke a rule when checked again — on its way to `dead_letters`.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub stream: &'static str,
    /// From a small fixed set: `unsigned`, `bad_signature`, `undecodable`, `invalid`.
    pub reason: &'static str,
    /// Why, in a sentence.
    pub error: String,
    /// JSON: the update, or what can be said of a record that cannot be read.
    pub payload: String,
    pub device_id: Option<String>,
    pub received_at: Option<OffsetDateTime>,
}

/// Keeps `rows` in `dead_letters`, in one statement; their text is made storable first, since nothing vouches for
/// it. Every error is returned: the caller retries what retrying can fix ([`classify`](super::error::classify)).
pub async fn keep_refused(pool: &Pool, rows: &[Refused]) -> Result<(), CopyError> {
    if rows.is_empty() {
        return Ok(());
    }
    let stream: Vec<&str> = rows.iter().map(|r| r.stream).collect();
    let payload: Vec<String> = rows.iter().map(|r| storable_json(&r.payload).into_owned()).collect();
    let error: Vec<String> = rows.iter().map(|r| storable_text(&r.error).into_owned()).collect();
    let reason: Vec<&str> = rows.iter().map(|r| r.reason).collect();
    let device_id: Vec<Option<String>> = rows
        .iter()
        .map(|r| r.device_id.as_deref().map(|d| storable_text(d).into_owned()))
        .collect();
    let received_at: Vec<Option<OffsetDateTime>> = rows.iter().map(|r| r.received_at).collect();
    let write = async {
        let client = pool.get().await?;
        client
            .execute(
                "INSERT INTO dead_letters (stream, payload, error, reason, device_id, received_at) \
                 SELECT s, p::jsonb, e, r, d, t \
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[]) \
                        AS u(s, p, e, r, d, t)",
                &[&stream, &payload, &error, &reason, &device_id, &received_at],
            )
            .await?;
        Ok::<_, CopyError>(())
    };
    tokio::time::timeout(BATCH_WRITE_TIMEOUT, write)
        .await
        .map_err(|_| CopyError::Timeout(BATCH_WRITE_TIMEOUT))?
}
