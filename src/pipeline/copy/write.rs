//! The write algorithm of one batch: the fast path straight into the table, and the fallback under savepoints
//! that absorbs retries through staging and isolates refused rows by bisection.

use std::time::{Duration, Instant};

use deadpool_postgres::{Pool, StatementCache};
use tokio_postgres::Transaction;

use super::error::{classify, CopyError, Failure};
use super::staging::copy_rows;
use super::{notify_channel, BoxedWrite, CopyRecord};
use crate::db::positions::{self, Checkpoint};

/// A batch that does not finish in this time is abandoned (and retried): a hung connection must not stall a
/// writer forever.
pub(super) const BATCH_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a committed batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Rows stored.
    pub inserted: u64,
    /// Rows absorbed because a row with the same key and content was already stored.
    pub duplicates: u64,
    /// Rows whose key was already stored with other content, kept in `dead_letters` (reason `conflict`).
    pub conflicting: u64,
    /// Rows PostgreSQL refused for good, kept in `dead_letters`.
    pub dead_lettered: u64,
    pub elapsed: Duration,
}

/// Where a batch's rows came from in a gateway's log: recorded with the batch, so that a replay skips them.
#[derive(Debug, Clone, Copy)]
pub struct LogPositions<'a> {
    /// The gateway that logged the rows.
    pub instance: &'a str,
    pub checkpoints: &'a [Checkpoint],
}

/// Writes `rows` and the log positions they bring their slots to, in one transaction; with `keep_latest`, the
/// stream's "latest per key" table too. Listeners of the stream's channel hear of the batch when it commits.
pub async fn write_batch<T: CopyRecord>(
    pool: &Pool,
    stream: &str,
    rows: &[T],
    positions: LogPositions<'_>,
    keep_latest: bool,
) -> Result<WriteOutcome, CopyError> {
    let started = Instant::now();
    let write = async {
        let mut object = pool.get().await?;
        let statements = object.statement_cache.clone();
        let client: &mut tokio_postgres::Client = &mut object;
        // The common case first: the whole batch straight into the table, without a savepoint (under one,
        // every row would get a subtransaction id). Only a batch PostgreSQL refuses is done again, row-aware.
        let tx = client.transaction().await?;
        let refused = match copy_rows(&tx, stream, rows, false).await {
            Ok(copied) => {
                let inserted = copied.inserted;
                let all: Vec<&T> = rows.iter().collect();
                after_rows(&tx, &statements, stream, rows, &all, positions, keep_latest).await?;
                tx.commit().await?;
                return Ok(WriteOutcome {
                    inserted,
                    ..WriteOutcome::default()
                });
            }
            Err(error) => match classify(&error) {
                Failure::Transient => return Err(error.into()),
                refused => refused,
            },
        };
        tx.rollback().await?;
        let mut tx = client.transaction().await?;
        let mut outcome = WriteOutcome::default();
        let mut conflicting = Vec::new();
        let dedup = refused == Failure::Duplicate;
        write_rows(&mut tx, stream, rows, 0, dedup, &mut outcome, &mut conflicting).await?;
        conflicting.sort_unstable();
        let kept: Vec<&T> = rows
            .iter()
            .enumerate()
            .filter(|(i, _)| conflicting.binary_search(i).is_err())
            .map(|(_, row)| row)
            .collect();
        after_rows(&tx, &statements, stream, rows, &kept, positions, keep_latest).await?;
        tx.commit().await?;
        Ok::<_, CopyError>(outcome)
    };
    let mut outcome = tokio::time::timeout(BATCH_WRITE_TIMEOUT, write)
        .await
        .map_err(|_| CopyError::Timeout(BATCH_WRITE_TIMEOUT))??;
    outcome.elapsed = started.elapsed();
    Ok(outcome)
}

/// What follows the rows in a batch's transaction: the "latest" table (from `kept`, the rows that are not
/// conflicts), then the log positions and the notice to the stream's listeners (delivered by PostgreSQL at commit,
/// never for a batch rolled back) in one statement. Both statements are prepared once per connection: parsing and
/// planning them for every batch would cost PostgreSQL more than the statements themselves.
async fn after_rows<T: CopyRecord>(
    tx: &Transaction<'_>,
    statements: &StatementCache,
    stream: &str,
    rows: &[T],
    kept: &[&T],
    positions: LogPositions<'_>,
    keep_latest: bool,
) -> Result<(), tokio_postgres::Error> {
    if keep_latest {
        T::keep_latest(tx, statements, kept).await?;
    }
    let summary = T::batch_summary(rows).to_string();
    positions::record_and_notify(
        tx,
        statements,
        positions.instance,
        stream,
        positions.checkpoints,
        &notify_channel(stream),
        &summary,
    )
    .await
}

/// Writes `rows` (the batch's from index `base` on) under a savepoint: straight `COPY`, or through staging when
/// `dedup`; isolates refused rows; adds the batch indices of conflicting rows to `conflicting`.
fn write_rows<'a, T: CopyRecord>(
    tx: &'a mut Transaction<'_>,
    stream: &'a str,
    rows: &'a [T],
    base: usize,
    dedup: bool,
    outcome: &'a mut WriteOutcome,
    conflicting: &'a mut Vec<usize>,
) -> BoxedWrite<'a> {
    Box::pin(async move {
        let savepoint = tx.transaction().await?;
        let attempt = copy_rows(&savepoint, stream, rows, dedup).await;
        let error = match attempt {
            Ok(copied) => {
                savepoint.commit().await?;
                let conflicts = copied.conflicting.len() as u64;
                outcome.inserted += copied.inserted;
                outcome.conflicting += conflicts;
                outcome.duplicates += (rows.len() as u64).saturating_sub(copied.inserted + conflicts);
                conflicting.extend(copied.conflicting.into_iter().map(|i| base + i));
                return Ok(());
            }
            Err(error) => error,
        };
        let failure = classify(&error);
        if failure == Failure::Transient {
            return Err(error);
        }
        savepoint.rollback().await?;
        match failure {
            Failure::Duplicate if !dedup => write_rows(tx, stream, rows, base, true, outcome, conflicting).await,
            _ if rows.len() == 1 => {
                dead_letter(tx, stream, &rows[0], &error).await?;
                outcome.dead_lettered += 1;
                Ok(())
            }
            _ => {
                let middle = rows.len() / 2;
                let (left, right) = rows.split_at(middle);
                write_rows(tx, stream, left, base, dedup, outcome, conflicting).await?;
                write_rows(tx, stream, right, base + middle, dedup, outcome, conflicting).await
            }
        }
    })
}

/// Keeps a refused row with the database's error.
async fn dead_letter<T: CopyRecord>(
    tx: &mut Transaction<'_>,
    stream: &str,
    row: &T,
    error: &tokio_postgres::Error,
) -> Result<(), tokio_postgres::Error> {
    let (message, sqlstate) = match error.as_db_error() {
        Some(db) => {
            let mut message = db.message().to_owned();
            if let Some(detail) = db.detail() {
                message.push_str(" (");
                message.push_str(detail);
                message.push(')');
            }
            (message, Some(db.code().code().to_owned()))
        }
        None => (error.to_string(), None),
    };
    tracing::warn!(stream, sqlstate = sqlstate.as_deref().unwrap_or(""), error = %message, "row refused by the database, kept in dead_letters");
    const INSERT: &str =
        "INSERT INTO dead_letters (stream, payload, error, sqlstate) VALUES ($1, $2::text::jsonb, $3, $4)";
    let payload = row.to_json();
    let savepoint = tx.transaction().await?;
    match savepoint
        .execute(INSERT, &[&stream, &payload, &message, &sqlstate])
        .await
    {
        Ok(_) => savepoint.commit().await,
        Err(e) if classify(&e) == Failure::Transient => Err(e),
        Err(_) => {
            // Even the row's JSON is refused (validation should make this impossible): keep it as a JSON
            // string rather than let one row hold up its batch forever.
            savepoint.rollback().await?;
            let quoted = serde_json::json!({ "unstorable_payload": payload }).to_string();
            tx.execute(INSERT, &[&stream, &quoted, &message, &sqlstate])
                .await
                .map(|_| ())
        }
    }
}
