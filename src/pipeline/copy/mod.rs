//! Writing one batch: binary `COPY` in one transaction with the writer's log position; the only SQL writer.
//!
//! The fast path copies straight into the table. A unique-key conflict (a client retried an update that is
//! already stored) sends the rows through a temporary staging table and `INSERT … ON CONFLICT DO NOTHING`
//! instead, so retries are absorbed and counted. The first write of a natural key wins; a later row with the same
//! key and *other* content is no retry but a conflict (a device's broken clock, or someone claiming its key first):
//! it is counted apart and kept in `dead_letters` with reason `conflict`, so that it never vanishes silently, and
//! it does not move `device_positions`. A row PostgreSQL refuses for good (a constraint, a trigger, a
//! value out of a column's range) is isolated by bisection, each half under its own savepoint, and kept with the
//! database's error in `dead_letters`; every other row of the batch is written. Errors that retrying can fix
//! (connection lost, database restarting, timeout) abort the whole transaction and are retried by the writer.
//! The log position is recorded in the same transaction, so a replay never writes a batch twice.
//!
//! The `dead_letter` stream (tracker fixes that can never be stored) writes into `dead_letters` itself. Its rows
//! are made storable as they are encoded (`storable_json`); one PostgreSQL refuses all the same (a trigger,
//! say) is kept like any other row, as one plain `INSERT` of its JSON, never sent through a batch again.
//!
//! - `write`: the write algorithm (fast path, fallback under savepoints, bisection of refused rows).
//! - `staging`: the staging table and `INSERT … ON CONFLICT` of the fallback, and how conflicts are kept.
//! - `error`: what a database error means for a batch ([`classify`]).
//! - `encode`: the binary `COPY` encoder and the helpers that make text storable.
//! - `records`: the per-stream SQL: each row type's columns, key, `NOTIFY` summary and "latest" upsert.
//! - `refused`: rows a writer refused before a batch, on their way to `dead_letters`.

use std::future::Future;
use std::pin::Pin;

use bytes::BytesMut;
use deadpool_postgres::StatementCache;
use tokio_postgres::Transaction;

mod encode;
mod error;
mod records;
mod refused;
mod staging;
mod write;

pub use encode::encode_batch;
pub use error::{classify, CopyError, Failure};
pub use refused::{keep_refused, Refused};
pub use write::{write_batch, LogPositions, WriteOutcome};

/// A row type written by binary `COPY`.
pub trait CopyRecord: Send + Sync + 'static {
    const TABLE: &'static str;
    /// The column list, in the order [`CopyRecord::encode_copy`] writes them.
    const COLUMNS: &'static str;
    /// The natural key: a second row with the same key is a duplicate. Rows go from staging to the table in its
    /// order; a table without a natural key names the columns to order them by.
    const KEY: &'static str;
    const COLUMN_COUNT: i16;
    /// The columns besides the natural key that say what a row holds — all but `received_at`, which a client's
    /// retry changes: a row whose key is stored with other values here is a conflict, not a retry. Empty for a
    /// table without a natural key.
    const CONTENT: &'static str = "";
    /// The device a conflicting staging row (`s`) names, as SQL, for `dead_letters.device_id`.
    const CONFLICT_DEVICE: &'static str = "NULL";

    /// Appends this row as one binary `COPY` tuple (without the field count).
    fn encode_copy(&self, out: &mut BytesMut);
    /// The row as JSON, for `dead_letters`.
    fn to_json(&self) -> String;
    /// What a committed batch of these rows is said to be on the stream's `NOTIFY` channel.
    fn batch_summary(rows: &[Self]) -> serde_json::Value
    where
        Self: Sized;
    /// Keeps the stream's "latest per key" table up to date with `rows` (those of the batch that are stored or
    /// retries, never a conflict), in the batch's transaction; nothing for a stream without one.
    /// Its statement is prepared through `statements`, once per connection.
    fn keep_latest<'a>(
        _tx: &'a Transaction<'_>,
        _statements: &'a StatementCache,
        _rows: &'a [&'a Self],
    ) -> BoxedWrite<'a>
    where
        Self: Sized,
    {
        Box::pin(async { Ok(()) })
    }
}

/// The `NOTIFY` channel of a stream: `ingest_location`, `ingest_poll`, `ingest_dead_letter`.
pub fn notify_channel(stream: &str) -> String {
    format!("ingest_{stream}")
}

pub type BoxedWrite<'a> = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a>>;
