//! The database side of the start: the database itself (a server given by `DATABASE_URL` or the embedded one),
//! the runtime its connections live on, migrations and partitions, the pool, the log positions this gateway
//! committed, and the health check `/readyz` reads.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use tokio::runtime::Runtime;
use tracing::info;

use super::data_dir::DataDir;
use super::partition_schedule;
use crate::config::Settings;
use crate::db::partitions::PartitionPolicy;
use crate::db::{self, EmbeddedPostgres, PostgresOptions};
use crate::http::DatabaseHealth;
use crate::metrics::Metrics;

/// The database the gateway writes to: a server it was given, or one it runs itself.
pub struct Database {
    pub config: tokio_postgres::Config,
    /// TLS, when the connection string asks for it.
    pub tls: db::DatabaseTls,
    /// Set when the gateway runs its own PostgreSQL; stopped when dropped, after the writers are done.
    pub embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to `DATABASE_URL`, or starts the embedded PostgreSQL under `<data-dir>/postgres`.
    pub fn open(settings: &Settings) -> anyhow::Result<Self> {
        match &settings.database.database_url {
            Some(url) => {
                let db::DatabaseUrl { config, tls } = url.parse().context("DATABASE_URL cannot be used")?;
                info!(tls = ?tls.mode(), "connecting to the PostgreSQL of DATABASE_URL");
                if let Some(host) = remote_without_tls(&config, tls.mode()) {
                    tracing::warn!(
                        host = %host,
                        "DATABASE_URL reaches {host} over the network without TLS (no sslmode, or disable, allow or \
                         prefer): every update, and the password under md5 or password authentication, crosses it in \
                         clear; add sslmode=verify-full (or require)"
                    );
                }
                Ok(Database {
                    config,
                    tls,
                    embedded: None,
                })
            }
            None => {
                let options = PostgresOptions {
                    data_dir: settings.storage.data_dir.join("postgres"),
                    ephemeral: false,
                };
                let server = EmbeddedPostgres::start(&options).context("could not start the embedded PostgreSQL")?;
                Ok(Database {
                    config: server.config("postgres"),
                    tls: db::DatabaseTls::off(),
                    embedded: Some(server),
                })
            }
        }
    }
}

/// A runtime for the database side only: the writers enter it to do IO, and the pool's connections live on
/// it, away from the HTTP workers' single-threaded runtimes.
pub fn database_runtime() -> anyhow::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("db")
        .enable_all()
        .build()
        .context("could not start the database runtime")
}

/// Opens the database and its runtime, applies the migrations and starts the partition schedule.
pub(super) fn open(
    settings: &Settings,
    partition_policy: PartitionPolicy,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Database, Runtime)> {
    let database = Database::open(settings)?;
    let runtime = database_runtime()?;
    runtime
        .block_on(db::migrate::run(&database.config, &database.tls))
        .context("could not apply the migrations")?;
    partition_schedule::start(
        &runtime,
        &database.config,
        &database.tls,
        partition_policy,
        metrics.clone(),
    )?;
    Ok((database, runtime))
}

/// A pool of `connections` to the database, living on `runtime`.
pub(super) fn pool(database: &Database, runtime: &Runtime, connections: usize) -> anyhow::Result<Pool> {
    let _inside = runtime.enter();
    Ok(db::pool::build(database.config.clone(), &database.tls, connections)?)
}

/// This gateway's committed log positions; first claims those a gateway kept before identities existed, when
/// they are this data directory's.
pub(super) async fn load_checkpoints(pool: &Pool, data_dir: &mut DataDir) -> anyhow::Result<db::Checkpoints> {
    let client = pool.get().await?;
    if data_dir.adopts_unowned() {
        let adopted = db::positions::adopt_unowned(&**client, data_dir.instance()).await?;
        data_dir.unowned_adopted()?;
        info!(
            positions = adopted,
            instance = data_dir.instance(),
            "log positions from before gateway identities claimed"
        );
    }
    Ok(db::positions::load(&**client, data_dir.instance()).await?)
}

/// How often the database is asked whether it answers, for `/readyz`.
const DATABASE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps a [`DatabaseHealth`] fresh: a trivial query every second on the database runtime, where the pool lives.
pub(super) fn watch_database(runtime: &Runtime, pool: Pool) -> Arc<DatabaseHealth> {
    let health = Arc::new(DatabaseHealth::default());
    // The first answer before the gateway listens, so that `/readyz` is right from the start.
    health.set(runtime.block_on(async {
        tokio::time::timeout(DATABASE_CHECK_INTERVAL * 2, db::pool::ping(&pool))
            .await
            .unwrap_or(false)
    }));
    let watched = health.clone();
    runtime.spawn(async move {
        loop {
            let up = tokio::time::timeout(DATABASE_CHECK_INTERVAL * 2, db::pool::ping(&pool))
                .await
                .unwrap_or(false);
            watched.set(up);
            tokio::time::sleep(DATABASE_CHECK_INTERVAL).await;
        }
    });
    health
}

/// The host a connection to PostgreSQL would reach over the network in clear: a TCP host that is not this machine,
/// with TLS off. `None` for a Unix socket, a loopback host, or TLS.
fn remote_without_tls(config: &tokio_postgres::Config, mode: db::client_tls::TlsMode) -> Option<String> {
    if mode != db::client_tls::TlsMode::Off {
        return None;
    }
    let addresses = config.get_hostaddrs();
    config.get_hosts().iter().enumerate().find_map(|(i, host)| {
        let tokio_postgres::config::Host::Tcp(name) = host else {
            return None;
        };
        let local = match addresses.get(i) {
            Some(address) => address.is_loopback(),
            None => {
                name == "localhost"
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        };
        (!local).then(|| name.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(url: &str) -> Option<String> {
        let db::DatabaseUrl { config, tls } = url.parse().unwrap();
        remote_without_tls(&config, tls.mode())
    }

    #[test]
    fn a_remote_database_without_tls_is_named_and_a_local_or_encrypted_one_is_not() {
        assert_eq!(
            remote("postgres://u:p@db.internal/ingest"),
            Some("db.internal".to_owned())
        );
        assert_eq!(
            remote("postgres://u:p@10.0.0.5:5432/ingest?sslmode=prefer"),
            Some("10.0.0.5".to_owned())
        );
        assert_eq!(
            remote("host=db.internal user=u sslmode=disable"),
            Some("db.internal".to_owned())
        );
        assert_eq!(remote("postgres://u:p@db.internal/ingest?sslmode=require"), None);
        assert_eq!(remote("postgres://u:p@localhost/ingest"), None);
        assert_eq!(remote("postgres://u:p@127.0.0.1/ingest"), None);
        assert_eq!(remote("postgres://u:p@[::1]/ingest"), None);
        assert_eq!(remote("host=/run/postgresql user=u"), None);
    }
}
