//! Keeps the stream tables' time partitions: one round before the writers start (so that the first accepted
//! update has its partition), then one every few minutes on the database runtime, over a connection of its own.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use time::OffsetDateTime;
use tokio::runtime::Runtime;
use tracing::{info, warn};

use crate::config::Settings;
use crate::db::partitions::{self, PartitionPolicy, TABLES};
use crate::db::DatabaseTls;
use crate::metrics::Metrics;

/// How often partitions are made, indexed and dropped.
pub const MAINTENANCE_PERIOD: Duration = Duration::from_secs(10 * 60);

/// The policy the settings ask for, checked: partitions ahead cover the allowed skew and two rounds, partitions
/// behind the allowed age.
pub fn policy(settings: &Settings) -> anyhow::Result<PartitionPolicy> {
    let policy = PartitionPolicy {
        interval: settings.partitions.partition_interval,
        behind: settings.limits.max_age,
        ahead: settings.limits.max_future_skew + MAINTENANCE_PERIOD * 2,
        retention: settings.partitions.retention,
    };
    policy.validate()?;
    Ok(policy)
}

/// One round: partitions made and dropped, counted.
async fn round(
    config: &tokio_postgres::Config,
    tls: &DatabaseTls,
    policy: &PartitionPolicy,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let (mut client, connection) = tls.connect(config).await?;
    let changes = partitions::maintain_all(&mut client, policy, OffsetDateTime::now_utc()).await?;
    for (table, change) in TABLES.iter().zip(&changes) {
        metrics
            .partitions
            .created
            .with_label_values(&[table.stream])
            .inc_by(change.created.len() as u64);
        metrics
            .partitions
            .dropped
            .with_label_values(&[table.stream])
            .inc_by(change.dropped.len() as u64);
    }
    drop(client);
    let _ = connection.await;
    Ok(())
}

/// Builds the history index of any partition an earlier release left without one (slow on a big partition:
/// never at start-up).
async fn index_round(config: &tokio_postgres::Config, tls: &DatabaseTls) -> anyhow::Result<()> {
    let (client, connection) = tls.connect(config).await?;
    for table in &TABLES {
        let indexed = partitions::index_partitions(&client, table).await?;
        for name in indexed {
            info!(table = table.table, partition = %name, "history index built");
        }
    }
    drop(client);
    let _ = connection.await;
    Ok(())
}

/// Makes the partitions now (an error refuses the start), then keeps them on `runtime`.
pub fn start(
    runtime: &Runtime,
    config: &tokio_postgres::Config,
    tls: &DatabaseTls,
    policy: PartitionPolicy,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    make_now(runtime, config, tls, &policy, &metrics)?;
    let (config, tls) = (config.clone(), tls.clone());
    runtime.spawn(async move {
        loop {
            if let Err(e) = index_round(&config, &tls).await {
                warn!(error = %format!("{e:#}"), "could not build the history indexes; trying again next round");
            }
            tokio::time::sleep(MAINTENANCE_PERIOD).await;
            if let Err(e) = round(&config, &tls, &policy, &metrics).await {
                warn!(error = %format!("{e:#}"), "could not keep the time partitions; trying again next round");
            }
        }
    });
    Ok(())
}

/// One round, now: the partitions every accepted update needs, and drops past the retention.
pub fn make_now(
    runtime: &Runtime,
    config: &tokio_postgres::Config,
    tls: &DatabaseTls,
    policy: &PartitionPolicy,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    runtime
        .block_on(round(config, tls, policy, metrics))
        .context("could not make the time partitions")
}
