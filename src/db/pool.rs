//! The deadpool-postgres pool that the batch writers and the readiness check share.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::DatabaseTls;

/// How long a connection attempt, or a wait for a free connection, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds a pool of at most `max_size` connections, secured by `tls`. Connections are opened lazily, so this never
/// fails for an unreachable database; call it inside the database runtime so that connection tasks live there.
pub fn build(
    mut config: tokio_postgres::Config,
    tls: &DatabaseTls,
    max_size: usize,
) -> Result<Pool, deadpool_postgres::BuildError> {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("ingest-gateway");
    }
    // `Fast` recycling checks only that the connection is open: a broken one is dropped, not handed out again.
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match tls.connector() {
        Some(connector) => Manager::from_config(config, connector.clone(), manager_config),
        None => Manager::from_config(config, NoTls, manager_config),
    };
    Pool::builder(manager)
        .max_size(max_size)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .runtime(Runtime::Tokio1)
        .build()
}

/// Whether the database answers a trivial query.
pub async fn ping(pool: &Pool) -> bool {
    let check = async {
        let client = pool.get().await.ok()?;
        client.simple_query("SELECT 1").await.ok()
    };
    matches!(tokio::time::timeout(CONNECT_TIMEOUT, check).await, Ok(Some(_)))
}
