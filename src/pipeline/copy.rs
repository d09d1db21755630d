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

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use deadpool_postgres::Pool;
use futures_util::SinkExt;
use time::OffsetDateTime;
use tokio_postgres::Transaction;

use crate::db::checkpoint::{self, Checkpoint};
use crate::model::{DeadLetter, LocationUpdate, PollResult};

/// A batch that does not finish in this time is abandoned (and retried): a hung connection must not stall a
/// writer forever.
const BATCH_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01).
const POSTGRES_EPOCH_UNIX_SECS: i64 = 946_684_800;

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
    fn keep_latest<'a>(_tx: &'a Transaction<'_>, _rows: &'a [&'a Self]) -> BoxedWrite<'a>
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

/// Why a batch was not written; every cause here is worth a retry (rows refused for good are dead-lettered).
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("could not get a database connection")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("the batch transaction failed")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the batch did not finish within {0:?}")]
    Timeout(Duration),
}

impl CopyError {
    /// Why, in a word that makes a small label set: the SQLSTATE class (`sqlstate_42` for a privilege, say), or
    /// `connection` / `timeout` when PostgreSQL gave no code.
    pub fn reason(&self) -> String {
        let code = match self {
            CopyError::Postgres(e) => e.code(),
            CopyError::Pool(deadpool_postgres::PoolError::Backend(e)) => e.code(),
            CopyError::Timeout(_) => return "timeout".to_owned(),
            CopyError::Pool(_) => None,
        };
        match code {
            Some(state) => format!("sqlstate_{}", &state.code()[..2]),
            None => "connection".to_owned(),
        }
    }
}

impl CopyError {
    /// Whether trying again can succeed: a connection, a timeout, or a database error [`classify`] calls transient.
    pub fn is_retriable(&self) -> bool {
        match self {
            CopyError::Postgres(e) => classify(e) == Failure::Transient,
            CopyError::Pool(_) | CopyError::Timeout(_) => true,
        }
    }
}

/// What a database error means for the rows that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Retrying can fix it: the connection, the server's state, a conflict with another transaction.
    Transient,
    /// A row with the same natural key is already stored.
    Duplicate,
    /// PostgreSQL refuses the row itself: retrying would fail the same way.
    Rejected,
}

/// Sorts an error into [`Failure`]; kept apart from the IO so that the rule is plain to read and test.
pub fn classify(error: &tokio_postgres::Error) -> Failure {
    let Some(state) = error.code() else {
        return Failure::Transient;
    };
    let code = state.code();
    if code == "23505" {
        return Failure::Duplicate;
    }
    // 22 data exception, 23 integrity constraint, P0 raised by a trigger, 2F/39 routine errors, 44 check option.
    if ["22", "23", "P0", "2F", "39", "44"]
        .iter()
        .any(|class| code.starts_with(class))
    {
        Failure::Rejected
    } else {
        Failure::Transient
    }
}

/// Encodes rows as a complete binary `COPY` stream: header, tuples, trailer.
pub fn encode_batch<T: CopyRecord>(rows: &[T], out: &mut BytesMut) {
    out.reserve(21 + rows.len() * 96);
    out.put_slice(b"PGCOPY\n\xff\r\n\0");
    out.put_i32(0); // flags
    out.put_i32(0); // header extension length
    for row in rows {
        out.put_i16(T::COLUMN_COUNT);
        row.encode_copy(out);
    }
    out.put_i16(-1);
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
        let client: &mut tokio_postgres::Client = &mut object;
        // The common case first: the whole batch straight into the table, without a savepoint (under one,
        // every row would get a subtransaction id). Only a batch PostgreSQL refuses is done again, row-aware.
        let tx = client.transaction().await?;
        let refused = match copy_rows(&tx, stream, rows, false).await {
            Ok(copied) => {
                let inserted = copied.inserted;
                let all: Vec<&T> = rows.iter().collect();
                after_rows(&tx, stream, rows, &all, keep_latest).await?;
                checkpoint::record(&tx, positions.instance, stream, positions.checkpoints).await?;
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
        after_rows(&tx, stream, rows, &kept, keep_latest).await?;
        checkpoint::record(&tx, positions.instance, stream, positions.checkpoints).await?;
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
/// conflicts), and the notice to the stream's listeners (delivered by PostgreSQL at commit, never for a batch
/// rolled back).
async fn after_rows<T: CopyRecord>(
    tx: &Transaction<'_>,
    stream: &str,
    rows: &[T],
    kept: &[&T],
    keep_latest: bool,
) -> Result<(), tokio_postgres::Error> {
    if keep_latest {
        T::keep_latest(tx, kept).await?;
    }
    let summary = T::batch_summary(rows).to_string();
    tx.execute("SELECT pg_notify($1, $2)", &[&notify_channel(stream), &summary])
        .await
        .map(|_| ())
}

pub type BoxedWrite<'a> = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a>>;

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

/// What one attempt at some rows did.
struct Copied {
    /// Rows stored.
    inserted: u64,
    /// Positions (in the rows attempted) of the rows kept in `dead_letters` as conflicts.
    conflicting: Vec<usize>,
}

/// One attempt at `rows`.
async fn copy_rows<T: CopyRecord>(
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
/// it. Every error is returned: the caller retries what retrying can fix ([`classify`]).
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

fn put_field(out: &mut BytesMut, bytes: &[u8]) {
    out.put_i32(bytes.len() as i32);
    out.put_slice(bytes);
}

fn put_null(out: &mut BytesMut) {
    out.put_i32(-1);
}

fn put_text(out: &mut BytesMut, s: &str) {
    put_field(out, s.as_bytes());
}

fn put_f64(out: &mut BytesMut, v: f64) {
    out.put_i32(8);
    out.put_f64(v);
}

fn put_opt_f64(out: &mut BytesMut, v: Option<f64>) {
    match v {
        Some(v) => put_f64(out, v),
        None => put_null(out),
    }
}

fn put_timestamptz(out: &mut BytesMut, at: OffsetDateTime) {
    // Microseconds since 2000-01-01 UTC; PostgreSQL keeps no finer precision.
    let micros = (at.unix_timestamp_nanos() / 1_000) as i64 - POSTGRES_EPOCH_UNIX_SECS * 1_000_000;
    out.put_i32(8);
    out.put_i64(micros);
}

fn put_jsonb(out: &mut BytesMut, json: Option<&str>) {
    match json {
        // The jsonb binary format is a version byte (1) followed by the JSON text.
        Some(json) => {
            out.put_i32(json.len() as i32 + 1);
            out.put_u8(1);
            out.put_slice(json.as_bytes());
        }
        None => put_null(out),
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn raw_json(attributes: &Option<String>) -> serde_json::Value {
    attributes
        .as_deref()
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// The earliest and latest of some times, as RFC 3339.
fn time_range(times: impl Iterator<Item = OffsetDateTime>) -> (Option<String>, Option<String>) {
    let (min, max) = times.fold(
        (None, None),
        |(min, max): (Option<OffsetDateTime>, Option<OffsetDateTime>), t| {
            (Some(min.map_or(t, |m| m.min(t))), Some(max.map_or(t, |m| m.max(t))))
        },
    );
    (min.map(rfc3339), max.map(rfc3339))
}

impl CopyRecord for LocationUpdate {
    const TABLE: &'static str = "location_updates";
    const COLUMNS: &'static str =
        "device_id, recorded_at, lat, lon, speed_kmh, heading_deg, accuracy_m, attributes, received_at";
    const KEY: &'static str = "device_id, recorded_at";
    const COLUMN_COUNT: i16 = 9;
    const CONTENT: &'static str = "lat, lon, speed_kmh, heading_deg, accuracy_m, attributes";
    const CONFLICT_DEVICE: &'static str = "s.device_id";

    fn encode_copy(&self, out: &mut BytesMut) {
        put_text(out, &self.device_id);
        put_timestamptz(out, self.recorded_at);
        put_f64(out, self.lat);
        put_f64(out, self.lon);
        put_opt_f64(out, self.speed_kmh);
        put_opt_f64(out, self.heading_deg);
        put_opt_f64(out, self.accuracy_m);
        put_jsonb(out, self.attributes.as_deref());
        put_timestamptz(out, self.received_at);
    }

    fn to_json(&self) -> String {
        serde_json::json!({
            "device_id": self.device_id,
            "recorded_at": rfc3339(self.recorded_at),
            "lat": self.lat,
            "lon": self.lon,
            "speed_kmh": self.speed_kmh,
            "heading_deg": self.heading_deg,
            "accuracy_m": self.accuracy_m,
            "attributes": raw_json(&self.attributes),
            "received_at": rfc3339(self.received_at),
        })
        .to_string()
    }

    fn batch_summary(rows: &[Self]) -> serde_json::Value {
        let (from, to) = time_range(rows.iter().map(|r| r.recorded_at));
        let devices: std::collections::HashSet<&str> = rows.iter().map(|r| r.device_id.as_str()).collect();
        serde_json::json!({"rows": rows.len(), "from": from, "to": to, "devices": devices.len()})
    }

    fn keep_latest<'a>(tx: &'a Transaction<'_>, rows: &'a [&'a Self]) -> BoxedWrite<'a> {
        Box::pin(async move {
            // The newest fix of each device in the batch, in device order so that concurrent writers lock rows in
            // one order and cannot deadlock.
            let mut newest: std::collections::BTreeMap<&str, &LocationUpdate> = std::collections::BTreeMap::new();
            for &row in rows {
                let entry = newest.entry(row.device_id.as_str()).or_insert(row);
                if row.recorded_at > entry.recorded_at {
                    *entry = row;
                }
            }
            let rows: Vec<&LocationUpdate> = newest.into_values().collect();
            let column = |f: fn(&LocationUpdate) -> Option<f64>| rows.iter().map(|r| f(r)).collect::<Vec<_>>();
            let device_ids: Vec<&str> = rows.iter().map(|r| r.device_id.as_str()).collect();
            let recorded: Vec<OffsetDateTime> = rows.iter().map(|r| r.recorded_at).collect();
            let lat: Vec<f64> = rows.iter().map(|r| r.lat).collect();
            let lon: Vec<f64> = rows.iter().map(|r| r.lon).collect();
            let attributes: Vec<Option<&str>> = rows.iter().map(|r| r.attributes.as_deref()).collect();
            let received: Vec<OffsetDateTime> = rows.iter().map(|r| r.received_at).collect();
            // Never moved back: a late or retried fix older than the stored one changes nothing.
            tx.execute(
                "INSERT INTO device_positions \
                   (device_id, recorded_at, lat, lon, speed_kmh, heading_deg, accuracy_m, attributes, received_at) \
                 SELECT d, r, la, lo, s, h, a, at::jsonb, rc \
                   FROM unnest($1::text[], $2::timestamptz[], $3::float8[], $4::float8[], $5::float8[], \
                               $6::float8[], $7::float8[], $8::text[], $9::timestamptz[]) \
                        AS u(d, r, la, lo, s, h, a, at, rc) \
                 ON CONFLICT (device_id) DO UPDATE SET \
                   recorded_at = EXCLUDED.recorded_at, lat = EXCLUDED.lat, lon = EXCLUDED.lon, \
                   speed_kmh = EXCLUDED.speed_kmh, heading_deg = EXCLUDED.heading_deg, \
                   accuracy_m = EXCLUDED.accuracy_m, attributes = EXCLUDED.attributes, \
                   received_at = EXCLUDED.received_at \
                 WHERE device_positions.recorded_at < EXCLUDED.recorded_at",
                &[
                    &device_ids,
                    &recorded,
                    &lat,
                    &lon,
                    &column(|r| r.speed_kmh),
                    &column(|r| r.heading_deg),
                    &column(|r| r.accuracy_m),
                    &attributes,
                    &received,
                ],
            )
            .await
            .map(|_| ())
        })
    }
}

impl CopyRecord for PollResult {
    const TABLE: &'static str = "poll_results";
    const COLUMNS: &'static str =
        "project_id, polled_at, success, status_code, response_time_ms, error_message, attributes, received_at";
    const KEY: &'static str = "project_id, polled_at";
    const COLUMN_COUNT: i16 = 8;
    const CONTENT: &'static str = "success, status_code, response_time_ms, error_message, attributes";

    fn encode_copy(&self, out: &mut BytesMut) {
        out.put_i32(8);
        out.put_i64(self.project_id);
        put_timestamptz(out, self.polled_at);
        out.put_i32(1);
        out.put_u8(u8::from(self.success));
        match self.status_code {
            Some(code) => {
                out.put_i32(2);
                out.put_i16(code);
            }
            None => put_null(out),
        }
        match self.response_time_ms {
            Some(ms) => {
                out.put_i32(4);
                out.put_i32(ms);
            }
            None => put_null(out),
        }
        match &self.error_message {
            Some(m) => put_text(out, m),
            None => put_null(out),
        }
        put_jsonb(out, self.attributes.as_deref());
        put_timestamptz(out, self.received_at);
    }

    fn to_json(&self) -> String {
        serde_json::json!({
            "project_id": self.project_id,
            "polled_at": rfc3339(self.polled_at),
            "success": self.success,
            "status_code": self.status_code,
            "response_time_ms": self.response_time_ms,
            "error_message": self.error_message,
            "attributes": raw_json(&self.attributes),
            "received_at": rfc3339(self.received_at),
        })
        .to_string()
    }

    fn batch_summary(rows: &[Self]) -> serde_json::Value {
        let (from, to) = time_range(rows.iter().map(|r| r.polled_at));
        let projects: std::collections::HashSet<i64> = rows.iter().map(|r| r.project_id).collect();
        serde_json::json!({"rows": rows.len(), "from": from, "to": to, "projects": projects.len()})
    }

    fn keep_latest<'a>(tx: &'a Transaction<'_>, rows: &'a [&'a Self]) -> BoxedWrite<'a> {
        Box::pin(async move {
            // The newest result of each project in the batch, in project order (one lock order for all writers).
            let mut newest: std::collections::BTreeMap<i64, &PollResult> = std::collections::BTreeMap::new();
            for &row in rows {
                let entry = newest.entry(row.project_id).or_insert(row);
                if row.polled_at > entry.polled_at {
                    *entry = row;
                }
            }
            let rows: Vec<&PollResult> = newest.into_values().collect();
            let projects: Vec<i64> = rows.iter().map(|r| r.project_id).collect();
            let polled: Vec<OffsetDateTime> = rows.iter().map(|r| r.polled_at).collect();
            let success: Vec<bool> = rows.iter().map(|r| r.success).collect();
            let status: Vec<Option<i16>> = rows.iter().map(|r| r.status_code).collect();
            let response: Vec<Option<i32>> = rows.iter().map(|r| r.response_time_ms).collect();
            let error: Vec<Option<&str>> = rows.iter().map(|r| r.error_message.as_deref()).collect();
            let attributes: Vec<Option<&str>> = rows.iter().map(|r| r.attributes.as_deref()).collect();
            let received: Vec<OffsetDateTime> = rows.iter().map(|r| r.received_at).collect();
            // Never moved back: a late or retried result older than the stored one changes nothing.
            tx.execute(
                "INSERT INTO project_latest_results \
                   (project_id, polled_at, success, status_code, response_time_ms, error_message, attributes, \
                    received_at) \
                 SELECT p, t, s, c, r, e, at::jsonb, rc \
                   FROM unnest($1::int8[], $2::timestamptz[], $3::bool[], $4::int2[], $5::int4[], $6::text[], \
                               $7::text[], $8::timestamptz[]) AS u(p, t, s, c, r, e, at, rc) \
                 ON CONFLICT (project_id) DO UPDATE SET \
                   polled_at = EXCLUDED.polled_at, success = EXCLUDED.success, status_code = EXCLUDED.status_code, \
                   response_time_ms = EXCLUDED.response_time_ms, error_message = EXCLUDED.error_message, \
                   attributes = EXCLUDED.attributes, received_at = EXCLUDED.received_at \
                 WHERE project_latest_results.polled_at < EXCLUDED.polled_at",
                &[
                    &projects,
                    &polled,
                    &success,
                    &status,
                    &response,
                    &error,
                    &attributes,
                    &received,
                ],
            )
            .await
            .map(|_| ())
        })
    }
}

/// `text` as PostgreSQL can store it: it refuses the NUL character in `text` (and `jsonb`).
fn storable_text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// `value` with every NUL character in its strings and keys replaced, so that `jsonb` takes it.
fn without_nul(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(storable_text(&s).into_owned()),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nul).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (storable_text(&k).into_owned(), without_nul(v)))
                .collect(),
        ),
        other => other,
    }
}

/// A dead letter's payload as `jsonb` can store it. Nothing validates a letter's payload (the routes make it from
/// whatever a tracker sent), and a refused letter would cost a bisection to isolate: so JSON that serde_json reads
/// (no lone surrogate, no number beyond `f64`) is kept as it is unless it escapes a NUL, which is replaced; text
/// that is not such JSON is kept whole as a string, under `unparsed`.
fn storable_json(payload: &str) -> Cow<'_, str> {
    match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(_) if !payload.contains("\\u0000") => Cow::Borrowed(payload),
        Ok(value) => Cow::Owned(without_nul(value).to_string()),
        Err(_) => Cow::Owned(serde_json::json!({ "unparsed": storable_text(payload) }).to_string()),
    }
}

/// The refused tracker fixes of the `dead_letter` stream, in `dead_letters` next to the rows PostgreSQL refused:
/// `reason` and `protocol` set (NULL for those), `error` the letter's sentence, `sqlstate` NULL.
impl CopyRecord for DeadLetter {
    const TABLE: &'static str = "dead_letters";
    const COLUMNS: &'static str = "stream, payload, error, reason, protocol, device_id, received_at";
    /// No natural key: `id` is an identity, so a COPY never conflicts unless an operator adds a unique index, and
    /// then staging is gone through in the order the letters came.
    const KEY: &'static str = "received_at";
    const COLUMN_COUNT: i16 = 7;

    fn encode_copy(&self, out: &mut BytesMut) {
        put_text(out, &storable_text(&self.stream));
        put_jsonb(out, Some(&storable_json(&self.payload)));
        put_text(out, &storable_text(&self.message));
        put_text(out, &storable_text(&self.reason));
        put_text(out, &storable_text(&self.protocol));
        match &self.device_id {
            Some(device_id) => put_text(out, &storable_text(device_id)),
            None => put_null(out),
        }
        put_timestamptz(out, self.received_at);
    }

    fn to_json(&self) -> String {
        let payload = serde_json::from_str(&storable_json(&self.payload)).unwrap_or(serde_json::Value::Null);
        // Storable as `jsonb` whatever the letter holds: the last resort of a letter PostgreSQL refused must not be
        // refused too.
        without_nul(serde_json::json!({
            "stream": self.stream,
            "protocol": self.protocol,
            "reason": self.reason,
            "message": self.message,
            "device_id": self.device_id,
            "payload": payload,
            "received_at": rfc3339(self.received_at),
        }))
        .to_string()
    }

    fn batch_summary(rows: &[Self]) -> serde_json::Value {
        let (from, to) = time_range(rows.iter().map(|r| r.received_at));
        let mut reasons: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
        for row in rows {
            *reasons.entry(row.reason.as_str()).or_default() += 1;
        }
        serde_json::json!({"rows": rows.len(), "from": from, "to": to, "reasons": reasons})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn a_location_row_encodes_to_the_binary_copy_layout() {
        let row = LocationUpdate {
            device_id: "ab".into(),
            recorded_at: datetime!(2000-01-01 00:00:01 UTC),
            lat: 1.5,
            lon: -2.0,
            speed_kmh: None,
            heading_deg: Some(0.0),
            accuracy_m: None,
            attributes: Some("{}".into()),
            received_at: datetime!(1999-12-31 23:59:59 UTC),
        };
        let mut out = BytesMut::new();
        encode_batch(&[row], &mut out);
        let mut expected = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        expected.extend_from_slice(&9i16.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 2, b'a', b'b']);
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&1_000_000i64.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&1.5f64.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&(-2.0f64).to_be_bytes());
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&0.0f64.to_be_bytes());
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 3, 1, b'{', b'}']);
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&(-1_000_000i64).to_be_bytes());
        expected.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(&out[..], &expected[..]);
    }

    fn letter(device_id: Option<&str>, payload: &str) -> DeadLetter {
        DeadLetter {
            stream: "location".into(),
            protocol: "osmand".into(),
            reason: "null_island".into(),
            message: "lat and lon are both 0".into(),
            device_id: device_id.map(str::to_owned),
            payload: payload.into(),
            received_at: datetime!(2000-01-01 00:00:02 UTC),
        }
    }

    #[test]
    fn a_dead_letter_encodes_to_the_binary_copy_layout() {
        let mut out = BytesMut::new();
        encode_batch(&[letter(Some("t1"), "{}"), letter(None, "{}")], &mut out);
        let text = |expected: &mut Vec<u8>, s: &str| {
            expected.extend_from_slice(&(s.len() as i32).to_be_bytes());
            expected.extend_from_slice(s.as_bytes());
        };
        let mut expected = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        for device_id in [Some("t1"), None] {
            expected.extend_from_slice(&7i16.to_be_bytes());
            text(&mut expected, "location");
            expected.extend_from_slice(&[0, 0, 0, 3, 1, b'{', b'}']);
            text(&mut expected, "lat and lon are both 0");
            text(&mut expected, "null_island");
            text(&mut expected, "osmand");
            match device_id {
                Some(id) => text(&mut expected, id),
                None => expected.extend_from_slice(&(-1i32).to_be_bytes()),
            }
            expected.extend_from_slice(&[0, 0, 0, 8]);
            expected.extend_from_slice(&2_000_000i64.to_be_bytes());
        }
        expected.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(&out[..], &expected[..]);
    }

    #[test]
    fn a_dead_letter_payload_is_made_storable_and_its_json_always_is() {
        assert!(matches!(storable_json(r#"{"lat":"0"}"#), Cow::Borrowed(_)));
        assert_eq!(
            storable_json(r#"{"a\u0000":"b\u0000"}"#),
            "{\"a\u{FFFD}\":\"b\u{FFFD}\"}"
        );
        assert_eq!(storable_json("id=1&lat=x\0"), "{\"unparsed\":\"id=1&lat=x\u{FFFD}\"}");
        assert_eq!(storable_json(r#"{"n":1e999999}"#), r#"{"unparsed":"{\"n\":1e999999}"}"#);

        let mut odd = letter(Some("t\0"), r#"{"s":"\u0000"}"#);
        odd.message.push('\0');
        let json = odd.to_json();
        assert!(!json.contains('\0') && !json.contains("\\u0000"), "{json}");
        let mut out = BytesMut::new();
        odd.encode_copy(&mut out);
        let holds = |needle: &str| out.windows(needle.len()).any(|w| w == needle.as_bytes());
        assert!(holds("t\u{FFFD}") && holds("both 0\u{FFFD}") && holds("{\"s\":\"\u{FFFD}\"}"));
    }
}
