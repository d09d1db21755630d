//! The fallback's SQL: rows copied into a temporary staging table, moved into the table with
//! `INSERT … ON CONFLICT DO NOTHING`, and rows whose key is stored with other content kept as conflicts.

use bytes::BytesMut;
use futures_util::SinkExt;
use tokio_postgres::Transaction;

use super::encode::encode_batch;
use super::CopyRecord;

/// What one attempt at some rows did.
pub(super) struct Copied {
    /// Rows stored.
    pub(super) inserted: u64,
    /// Positions (in the rows attempted) of the rows kept in `dead_letters` as conflicts.
    pub(super) conflicting: Vec<usize>,
}

/// One attempt at `rows`.
pub(super) async fn copy_rows<T: CopyRecord>(
    tx: &Transaction<'_>,
    stream: &str,
    rows: &[T],
    dedup: bool,
) -> Result<Copied, tokio_postgres::Error> {
    let staging = format!("{}_staging", T::TABLE);
    let target = if dedup {
        // Temporary, per connection; emptied at commit and before each use within a transaction. With its own
        // identity sequence, if the table has one (`dead_letters.id`): `LIKE` copies the column's NOT NULL
        // always, and the COPY, which leaves the column out, would be refused without it. `ingest_row` numbers
        // the rows in the order they are copied (from 1 again at each use), so that the first of two rows with
        // one key is the one kept, and a conflict is known by its place in the batch.
        tx.batch_execute(&format!(
            "CREATE TEMP TABLE IF NOT EXISTS {staging} \
               (LIKE {} INCLUDING DEFAULTS INCLUDING IDENTITY, ingest_row bigserial) \
             ON COMMIT DELETE ROWS; \
             TRUNCATE {staging} RESTART IDENTITY",
            T::TABLE
        ))
        .await?;
        staging.as_str()
    } else {
        T::TABLE
    };
    let mut bytes = BytesMut::new();
    encode_batch(rows, &mut bytes);
    let sink = tx
        .copy_in(&format!("COPY {target} ({}) FROM STDIN (FORMAT binary)", T::COLUMNS))
        .await?;
    let mut sink = std::pin::pin!(sink);
    sink.send(bytes.freeze()).await?;
    let copied = sink.finish().await?;
    if !dedup {
        return Ok(Copied {
            inserted: copied,
            conflicting: Vec::new(),
        });
    }
    // Sorted by key so that concurrent writers take row locks in one order and cannot deadlock; within a key, in
    // the order the rows came, so that the first write wins.
    let inserted = tx
        .execute(
            &format!(
                "INSERT INTO {table} ({cols}) SELECT {cols} FROM {staging} ORDER BY {key}, ingest_row \
                 ON CONFLICT DO NOTHING",
                table = T::TABLE,
                cols = T::COLUMNS,
                key = T::KEY
            ),
            &[],
        )
        .await?;
    let conflicting = if T::CONTENT.is_empty() || inserted == copied {
        Vec::new()
    } else {
        keep_conflicts::<T>(tx, stream, &staging).await?
    };
    Ok(Copied { inserted, conflicting })
}

/// `columns` (comma-separated) each qualified with `alias`: `s.lat, s.lon`.
fn qualified(alias: &str, columns: &str) -> String {
    columns
        .split(',')
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Keeps in `dead_letters` every staged row whose key is stored (by an earlier batch, or by a row before it in
/// this one) with other content, and returns their places in the staging table. A row with the same content is a
/// retry, absorbed as before. The payload is the refused row as JSON; the error names the key and when the row
/// that holds it was received.
async fn keep_conflicts<T: CopyRecord>(
    tx: &Transaction<'_>,
    stream: &str,
    staging: &str,
) -> Result<Vec<usize>, tokio_postgres::Error> {
    let sql = format!(
        "WITH conflicting AS ( \
           SELECT s.ingest_row, to_jsonb(s) - 'ingest_row' AS payload, {device} AS device_id, \
                  s.received_at, t.received_at AS stored_received_at \
             FROM {staging} s JOIN {table} t USING ({key}) \
            WHERE ({ours}) IS DISTINCT FROM ({theirs})), \
         kept AS ( \
           INSERT INTO dead_letters (stream, payload, error, reason, device_id, received_at) \
           SELECT $1, payload, \
                  $2 || coalesce(' (that update was received at ' || \
                    to_char(stored_received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') || ')', ''), \
                  'conflict', device_id, received_at \
             FROM conflicting) \
         SELECT ingest_row FROM conflicting",
        device = T::CONFLICT_DEVICE,
        table = T::TABLE,
        key = T::KEY,
        ours = qualified("s", T::CONTENT),
        theirs = qualified("t", T::CONTENT),
    );
    let error = format!(
        "conflict: a different update with the same {} is stored; the first write is kept",
        T::KEY
    );
    let rows = tx.query(&sql, &[&stream, &error]).await?;
    Ok(rows
        .iter()
        .map(|row| usize::try_from(row.get::<_, i64>(0) - 1).unwrap_or(usize::MAX))
        .collect())
}
