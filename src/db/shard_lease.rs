//! The SQL of JetStream shard leases: PostgreSQL session advisory locks, held by one dedicated connection of each
//! writer process. A lock lives as long as the session: a writer that dies (even by SIGKILL) loses its
//! connection, and PostgreSQL releases its shards at once for another writer to take.
//!
//! Two lock families, in the two-key form `(class, key)`: members (`MEMBER_CLASS`, one per running writer
//! process, so that each can count the others and take a fair share) and shards (`SHARD_CLASS`, key = stream
//! number × 65 536 + shard).

use tokio_postgres::Client;

/// Lock class of writer processes' membership.
const MEMBER_CLASS: i32 = 0x4a53_0001;
/// Lock class of shards.
const SHARD_CLASS: i32 = 0x4a53_0002;
/// Membership keys tried at most: more writer processes than this share the last ones' counts.
const MAX_MEMBERS: i32 = 4096;

/// Takes the first free membership lock; returns its key.
pub async fn join(client: &Client) -> Result<Option<i32>, tokio_postgres::Error> {
    for key in 0..MAX_MEMBERS {
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&MEMBER_CLASS, &key])
            .await?;
        if row.get::<_, bool>(0) {
            return Ok(Some(key));
        }
    }
    Ok(None)
}

/// How many writer processes hold a membership now.
pub async fn members(client: &Client) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_locks \
             WHERE locktype = 'advisory' AND objsubid = 2 AND granted AND classid = ($1::int8 & 4294967295)::oid",
            &[&i64::from(MEMBER_CLASS)],
        )
        .await?;
    Ok(row.get(0))
}

fn shard_key(stream: u8, shard: u16) -> i32 {
    i32::from(stream) * 65_536 + i32::from(shard)
}

/// Tries to take shard `shard` of stream number `stream`; whether it is now this session's.
pub async fn try_take(client: &Client, stream: u8, shard: u16) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2)",
            &[&SHARD_CLASS, &shard_key(stream, shard)],
        )
        .await?;
    Ok(row.get(0))
}

/// Gives shard `shard` of stream number `stream` back.
pub async fn release(client: &Client, stream: u8, shard: u16) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_advisory_unlock($1, $2)",
            &[&SHARD_CLASS, &shard_key(stream, shard)],
        )
        .await?;
    Ok(())
}
