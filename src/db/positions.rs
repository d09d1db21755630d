//! Committed positions (`ingest_wal_progress`) of both sources of updates: a gateway's write-ahead log records
//! (keyed by the gateway's instance identity, the stream and the log slot) and JetStream stream sequences (keyed by
//! `jetstream:<stream>`, the stream and the shard as the slot). Written in each batch's transaction, read at start-up
//! or when a shard is taken, so that a replay resumes exactly after the last commit. The only SQL that touches the
//! table.
//!
//! Gateways sharing a database number their records independently, so one's position says nothing of another's
//! records; a JetStream shard's position is shared by whichever process holds the shard.
//!
//! The table keeps its older name, from when it held only log positions: renaming it would take a migration, and
//! every gateway sharing the database to be upgraded at once, for nothing a query or an operator would notice.

use std::collections::HashMap;

use deadpool_postgres::StatementCache;
use tokio_postgres::{GenericClient, Transaction};

/// How far one log slot's records are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub slot: u16,
    /// The last record whose updates are (at least partly) committed.
    pub lsn: u64,
    /// How many of that record's updates are committed; `None` for all of them. A record larger than a batch is
    /// committed in several pieces.
    pub updates_done: Option<u32>,
}

/// Every slot's checkpoint of one gateway, by stream, then by slot.
pub type Checkpoints = HashMap<String, HashMap<u16, Checkpoint>>;

/// Reads the checkpoints of `instance`.
pub async fn load(client: &impl GenericClient, instance: &str) -> Result<Checkpoints, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT stream, slot, lsn, updates_done FROM ingest_wal_progress WHERE instance = $1",
            &[&instance],
        )
        .await?;
    let mut checkpoints = Checkpoints::new();
    for row in rows {
        let slot = row.get::<_, i32>(1) as u16;
        let checkpoint = Checkpoint {
            slot,
            lsn: row.get::<_, i64>(2) as u64,
            updates_done: row.get::<_, Option<i32>>(3).map(|n| n as u32),
        };
        checkpoints.entry(row.get(0)).or_default().insert(slot, checkpoint);
    }
    Ok(checkpoints)
}

/// Records the slots' checkpoints in the batch's transaction and tells `channel`'s listeners `message` (at
/// commit), in one statement, prepared once per connection through `statements`: one round trip and no parsing per
/// batch.
pub async fn record_and_notify(
    tx: &Transaction<'_>,
    statements: &StatementCache,
    instance: &str,
    stream: &str,
    checkpoints: &[Checkpoint],
    channel: &str,
    message: &str,
) -> Result<(), tokio_postgres::Error> {
    let statement = statements
        .prepare(
            tx.client(),
            "WITH progress AS ( \
               INSERT INTO ingest_wal_progress (instance, stream, slot, lsn, updates_done) \
               SELECT $1, $2, s, l, u FROM unnest($3::int4[], $4::int8[], $5::int4[]) AS p(s, l, u) \
               ON CONFLICT (instance, stream, slot) \
               DO UPDATE SET lsn = EXCLUDED.lsn, updates_done = EXCLUDED.updates_done) \
             SELECT pg_notify($6, $7)",
        )
        .await?;
    let slots: Vec<i32> = checkpoints.iter().map(|c| i32::from(c.slot)).collect();
    let lsns: Vec<i64> = checkpoints.iter().map(|c| c.lsn as i64).collect();
    let done: Vec<Option<i32>> = checkpoints.iter().map(|c| c.updates_done.map(|n| n as i32)).collect();
    tx.execute(
        &statement,
        &[&instance, &stream, &slots, &lsns, &done, &channel, &message],
    )
    .await
    .map(|_| ())
}

/// Gives the checkpoints kept before gateways had identities (instance `''`) to `instance`; returns how many.
/// Called once, by the gateway whose data directory holds the log they describe.
pub async fn adopt_unowned(client: &impl GenericClient, instance: &str) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE ingest_wal_progress SET instance = $1 WHERE instance = ''",
            &[&instance],
        )
        .await
}
