//! Applies the SQL files of `migrations/` (embedded at build time), recorded in `refinery_schema_history` so
//! that a second start applies nothing.

use tracing::info;

use super::DatabaseTls;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The advisory lock key that serialises migrations between gateways sharing a database ("ingest" in ASCII).
const MIGRATION_LOCK: i64 = 0x696e_6765_7374;

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("could not connect to the database")]
    Connect(#[source] tokio_postgres::Error),
    #[error("could not take the migration lock")]
    Lock(#[source] tokio_postgres::Error),
    #[error("a migration failed")]
    Migration(#[from] refinery::Error),
}

/// What [`run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateOutcome {
    /// The migrations applied now, by name (empty when the schema was up to date).
    pub applied: Vec<String>,
}

/// Applies every pending migration, over a connection secured by `tls`.
pub async fn run(config: &tokio_postgres::Config, tls: &DatabaseTls) -> Result<MigrateOutcome, MigrateError> {
    run_to(config, tls, None).await
}

/// Applies the pending migrations up to version `last` (every one when `None`): a schema as an older release
/// left it, to test an upgrade from it.
pub async fn run_to(
    config: &tokio_postgres::Config,
    tls: &DatabaseTls,
    last: Option<i32>,
) -> Result<MigrateOutcome, MigrateError> {
    let (mut client, connection) = tls.connect(config).await.map_err(MigrateError::Connect)?;
    // Replicas that start together would otherwise apply the same migration twice; the lock is a session's,
    // so it goes with the connection even if this process dies.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(MigrateError::Lock)?;
    let target = last.map_or(refinery::Target::Latest, refinery::Target::Version);
    let report = embedded::migrations::runner()
        .set_target(target)
        .run_async(&mut client)
        .await;
    drop(client);
    // The connection task ends once the client is gone; its own error, if any, already failed the run.
    let _ = connection.await;
    let applied: Vec<String> = report?.applied_migrations().iter().map(|m| m.to_string()).collect();
    info!(applied = applied.len(), migrations = ?applied, "schema is up to date");
    Ok(MigrateOutcome { applied })
}
