//! The time partitions of `location_updates` and `poll_results`: made ahead and behind so that every accepted
//! update has one, indexed for history once their time is past, dropped whole past the retention. All partition
//! SQL lives here.
//!
//! Each partition gets a unique key that leads with the time (`recorded_at, device_id`): updates arrive in time
//! order, so keys append at the right edge of the index, which costs PostgreSQL well under half of a key that
//! leads with the device. One device's track is read through a second index (`device_id, recorded_at`), made with
//! the partition, so that the current partition answers "where has this truck been today" by the index too and not
//! by scanning every device's rows of the day; a partition made by an earlier release without it gets it built
//! (without blocking the writers) by [`index_partitions`].
//!
//! Gateways sharing a database serialise their changes with an advisory lock, and each reads the partitions
//! that exist after taking it, so two never make the same partition.

use std::time::Duration;

use time::OffsetDateTime;
use tokio_postgres::{Client, GenericClient};
use tracing::{info, warn};

/// The advisory lock that serialises partition changes between gateways ("ingestpt" in ASCII).
const PARTITION_LOCK: i64 = 0x696e_6765_7374_7074;

/// The advisory lock held while history indexes are built, one gateway at a time ("ingestix").
const INDEX_LOCK: i64 = 0x696e_6765_7374_6978;

/// How long a drop may wait for the writers' lock on the table before it is left for the next round.
const DROP_LOCK_TIMEOUT: &str = "5s";

/// A time-partitioned table of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionedTable {
    pub stream: &'static str,
    pub table: &'static str,
    /// The partition key.
    pub time_column: &'static str,
    /// What a history is read by: a device, a project.
    pub key_column: &'static str,
}

/// Both streams' tables.
pub const TABLES: [PartitionedTable; 2] = [
    PartitionedTable {
        stream: "location",
        table: "location_updates",
        time_column: "recorded_at",
        key_column: "device_id",
    },
    PartitionedTable {
        stream: "poll",
        table: "poll_results",
        time_column: "polled_at",
        key_column: "project_id",
    },
];

/// Which partitions must exist, and which may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionPolicy {
    /// The span of one partition; divides a day, so that partitions align with days.
    pub interval: Duration,
    /// How far back partitions are kept ready: the oldest time an update may carry.
    pub behind: Duration,
    /// How far ahead partitions are made: the allowed clock skew and the time until the next round, at least.
    pub ahead: Duration,
    /// Partitions wholly older than this are dropped; `None` keeps everything.
    pub retention: Option<Duration>,
}

/// Why a partition policy cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "INGEST_PARTITION_INTERVAL must be a whole number of hours that divides a day (1h, 2h, 3h, 4h, 6h, 8h, 12h, \
         1d), not {0}"
    )]
    Interval(String),
    #[error(
        "INGEST_RETENTION ({retention}) is shorter than INGEST_MAX_AGE ({max_age}): partitions that can still receive \
         accepted updates would be dropped; raise INGEST_RETENTION or lower INGEST_MAX_AGE"
    )]
    RetentionShorterThanAge { retention: String, max_age: String },
}

impl PartitionPolicy {
    /// Checks the rules: an interval that divides a day, and a retention no shorter than the allowed age (a
    /// shorter one would drop partitions that still receive accepted updates, so it is refused, not clamped).
    pub fn validate(&self) -> Result<(), PolicyError> {
        let secs = self.interval.as_secs();
        if self.interval.subsec_nanos() != 0 || secs == 0 || !secs.is_multiple_of(3600) || 86_400 % secs != 0 {
            return Err(PolicyError::Interval(
                humantime::format_duration(self.interval).to_string(),
            ));
        }
        if let Some(retention) = self.retention {
            if retention < self.behind {
                return Err(PolicyError::RetentionShorterThanAge {
                    retention: humantime::format_duration(retention).to_string(),
                    max_age: humantime::format_duration(self.behind).to_string(),
                });
            }
        }
        Ok(())
    }

    fn interval_secs(&self) -> i64 {
        self.interval.as_secs() as i64
    }
}

/// What one round did to one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableChanges {
    pub created: Vec<String>,
    pub dropped: Vec<String>,
}

/// One partition: its name and bounds in Unix seconds (`None`: unbounded, as the partition of rows from before
/// partitioning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub from: Option<i64>,
    pub to: Option<i64>,
}

/// The partitions of `table`, oldest first.
pub async fn list(
    client: &impl GenericClient,
    table: &PartitionedTable,
) -> Result<Vec<Partition>, tokio_postgres::Error> {
    // The bounds come back as the text of `FOR VALUES FROM (…) TO (…)`, in this session's time format, and are
    // cast back in the same session; MINVALUE / MAXVALUE have no quotes and give NULL.
    let rows = client
        .query(
            "SELECT c.relname::text, \
                    floor(extract(epoch FROM (regexp_match(b.bound, 'FROM \\(''([^'']*)''\\)'))[1]::timestamptz))::bigint, \
                    floor(extract(epoch FROM (regexp_match(b.bound, 'TO \\(''([^'']*)''\\)'))[1]::timestamptz))::bigint \
               FROM pg_inherits i \
               JOIN pg_class c ON c.oid = i.inhrelid \
              CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) b \
              WHERE i.inhparent = $1::text::regclass",
            &[&table.table],
        )
        .await?;
    let mut partitions: Vec<Partition> = rows
        .iter()
        .map(|row| Partition {
            name: row.get(0),
            from: row.get(1),
            to: row.get(2),
        })
        .collect();
    partitions.sort_by_key(|p| (p.from.unwrap_or(i64::MIN), p.name.clone()));
    Ok(partitions)
}

/// The spans in `[from, to)` that no partition covers, split at interval boundaries.
pub fn missing_spans(existing: &[Partition], from: i64, to: i64, interval: i64) -> Vec<(i64, i64)> {
    let mut spans = Vec::new();
    let mut slot = from.div_euclid(interval) * interval;
    while slot < to {
        let mut pieces = vec![(slot, slot + interval)];
        for p in existing {
            let (lo, hi) = (p.from.unwrap_or(i64::MIN), p.to.unwrap_or(i64::MAX));
            pieces = pieces
                .into_iter()
                .flat_map(|(a, b)| {
                    if hi <= a || lo >= b {
                        vec![(a, b)]
                    } else {
                        [(a, lo.min(b)), (hi.max(a), b)]
                            .into_iter()
                            .filter(|(x, y)| x < y)
                            .collect()
                    }
                })
                .collect();
        }
        spans.extend(pieces);
        slot += interval;
    }
    spans
}

/// A partition's name from its table and bounds: `location_updates_20261201_0000_20261202_0000`.
pub fn partition_name(table: &str, from: i64, to: i64) -> String {
    format!("{table}_{}_{}", stamp(from), stamp(to))
}

fn stamp(unix: i64) -> String {
    match OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}{:02}{:02}_{:02}{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        // Out of the time crate's range (beyond year 9999): no partition is ever made there.
        Err(_) => unix.to_string(),
    }
}

/// Makes the partitions `table` lacks for `[now - behind, now + ahead]`, then drops those past the retention.
pub async fn maintain(
    client: &mut Client,
    table: &PartitionedTable,
    policy: &PartitionPolicy,
    now: OffsetDateTime,
) -> Result<TableChanges, tokio_postgres::Error> {
    let now = now.unix_timestamp();
    let interval = policy.interval_secs();
    let mut changes = TableChanges::default();

    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
        .await?;
    let existing = list(&tx, table).await?;
    let from = now - policy.behind.as_secs() as i64;
    let to = now + policy.ahead.as_secs() as i64 + interval;
    for (start, end) in missing_spans(&existing, from, to, interval) {
        let name = partition_name(table.table, start, end);
        // Made apart and attached when complete with its key, so that no row ever lands in a partition without
        // one; attaching an empty table checks nothing and does not block the writers.
        let mut sql = format!(
            "CREATE TABLE {partition} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS); \
             CREATE UNIQUE INDEX {index} ON {partition} ({time}, {key}); ",
            partition = quote_identifier(&name),
            index = quote_identifier(&format!("{name}_key")),
            parent = table.table,
            time = table.time_column,
            key = table.key_column,
        );
        sql.push_str(&history_index_sql(table, &name, false));
        sql.push_str("; ");
        sql.push_str(&format!(
            "ALTER TABLE {parent} ATTACH PARTITION {partition} FOR VALUES FROM (to_timestamp({start})) TO (to_timestamp({end}))",
            parent = table.table,
            partition = quote_identifier(&name),
        ));
        tx.batch_execute(&sql).await?;
        changes.created.push(name);
    }
    tx.commit().await?;

    if let Some(retention) = policy.retention {
        let horizon = now - retention.as_secs() as i64;
        let expired: Vec<Partition> = existing
            .into_iter()
            .filter(|p| p.to.is_some_and(|to| to <= horizon))
            .collect();
        for partition in expired {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
                .await?;
            tx.batch_execute(&format!(
                "SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'; DROP TABLE IF EXISTS {}",
                quote_identifier(&partition.name)
            ))
            .await?;
            tx.commit().await?;
            changes.dropped.push(partition.name);
        }
    }
    Ok(changes)
}

fn history_index_sql(table: &PartitionedTable, partition: &str, concurrently: bool) -> String {
    format!(
        "CREATE INDEX {concurrently} IF NOT EXISTS {index} ON {table} ({key}, {time})",
        concurrently = if concurrently { "CONCURRENTLY" } else { "" },
        index = quote_identifier(&history_index_name(table, partition)),
        table = quote_identifier(partition),
        key = table.key_column,
        time = table.time_column,
    )
}

/// The history index of `partition`: `<partition>_<key column>_idx`.
fn history_index_name(table: &PartitionedTable, partition: &str) -> String {
    format!("{partition}_{}_idx", table.key_column)
}

/// `name` as an SQL identifier: in double quotes, a quote within doubled. Partition names are read back from the
/// catalog, where whoever may add a partition chose them: unquoted, such a name would be SQL run with the gateway's
/// rights.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Builds the history index (`device_id, recorded_at`) of every partition of `table` that has none — those an
/// earlier release made, which built it only once a partition's time was past, the current partition included —
/// without blocking the writers (`CONCURRENTLY`); one gateway at a time. Returns the partitions indexed.
pub async fn index_partitions(client: &Client, table: &PartitionedTable) -> Result<Vec<String>, tokio_postgres::Error> {
    let got_lock: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&INDEX_LOCK])
        .await?
        .get(0);
    if !got_lock {
        // Another gateway is building them.
        return Ok(Vec::new());
    }
    let result = index_unlocked(client, table).await;
    client.execute("SELECT pg_advisory_unlock($1)", &[&INDEX_LOCK]).await?;
    result
}

async fn index_unlocked(client: &Client, table: &PartitionedTable) -> Result<Vec<String>, tokio_postgres::Error> {
    // A valid index that leads with the key column is enough, whatever its name (the partition of rows from
    // before partitioning has its old unique key).
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
              WHERE i.inhparent = $1::text::regclass \
                AND NOT EXISTS (SELECT 1 FROM pg_index x \
                                  JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0] \
                                 WHERE x.indrelid = c.oid AND x.indisvalid AND a.attname = $2)",
            &[&table.table, &table.key_column],
        )
        .await?;
    let candidates: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let mut indexed = Vec::new();
    for name in candidates {
        // A build interrupted earlier leaves an invalid index of the same name: drop it first.
        client
            .batch_execute(&format!(
                "DROP INDEX CONCURRENTLY IF EXISTS {}",
                quote_identifier(&history_index_name(table, &name))
            ))
            .await?;
        client.batch_execute(&history_index_sql(table, &name, true)).await?;
        indexed.push(name);
    }
    Ok(indexed)
}

/// One round over both tables: make what is missing, drop what is past the retention; logged. Returns each
/// table's changes, in [`TABLES`] order.
pub async fn maintain_all(
    client: &mut Client,
    policy: &PartitionPolicy,
    now: OffsetDateTime,
) -> Result<Vec<TableChanges>, tokio_postgres::Error> {
    let mut all = Vec::new();
    for table in &TABLES {
        let changes = maintain(client, table, policy, now).await?;
        if !changes.created.is_empty() {
            info!(table = table.table, created = changes.created.len(), first = %changes.created[0], last = %changes.created[changes.created.len() - 1], "partitions made");
        }
        for name in &changes.dropped {
            warn!(table = table.table, partition = %name, "partition dropped: past the retention");
        }
        all.push(changes);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3600;
    const DAY: i64 = 86_400;

    fn partition(from: Option<i64>, to: Option<i64>) -> Partition {
        Partition {
            name: "p".into(),
            from,
            to,
        }
    }

    #[test]
    fn with_no_partitions_every_slot_is_missing() {
        assert_eq!(
            missing_spans(&[], DAY + HOUR, 3 * DAY, DAY),
            [(DAY, 2 * DAY), (2 * DAY, 3 * DAY)]
        );
    }

    #[test]
    fn the_partition_of_older_rows_leaves_only_what_follows_it() {
        let legacy = partition(None, Some(2 * DAY));
        assert_eq!(missing_spans(&[legacy], 0, 3 * DAY, DAY), [(2 * DAY, 3 * DAY)]);
    }

    #[test]
    fn partitions_of_another_interval_are_filled_around() {
        // Hourly partitions for 10:00–12:00, now daily: the rest of that day is made in two pieces.
        let hours = [
            partition(Some(10 * HOUR), Some(11 * HOUR)),
            partition(Some(11 * HOUR), Some(12 * HOUR)),
        ];
        assert_eq!(
            missing_spans(&hours, 0, DAY - 1, DAY),
            [(0, 10 * HOUR), (12 * HOUR, DAY)]
        );
    }

    #[test]
    fn a_name_says_the_bounds() {
        assert_eq!(
            partition_name("location_updates", 1_764_547_200, 1_764_633_600),
            "location_updates_20251201_0000_20251202_0000"
        );
    }

    #[test]
    fn an_interval_must_divide_a_day_and_retention_cover_the_age() {
        let policy = |interval: u64, retention: Option<u64>| PartitionPolicy {
            interval: Duration::from_secs(interval),
            behind: Duration::from_secs(30 * DAY as u64),
            ahead: Duration::from_secs(300),
            retention: retention.map(Duration::from_secs),
        };
        assert!(policy(DAY as u64, None).validate().is_ok());
        assert!(policy(6 * HOUR as u64, None).validate().is_ok());
        assert!(policy(5 * HOUR as u64, None).validate().is_err());
        assert!(policy(7 * DAY as u64, None).validate().is_err());
        assert!(policy(90, None).validate().is_err());
        assert!(policy(DAY as u64, Some(30 * DAY as u64)).validate().is_ok());
        assert!(matches!(
            policy(DAY as u64, Some(7 * DAY as u64)).validate(),
            Err(PolicyError::RetentionShorterThanAge { .. })
        ));
    }
}
