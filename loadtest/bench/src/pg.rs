//! The admin connection to the benchmark's PostgreSQL, which empties and counts the tables between variants.
//!
//! The server itself is the gateway's own throwaway one (`ingest_gateway::db::EmbeddedPostgres`), started with
//! fsync on so that every variant writes into the same, realistically configured server.

use anyhow::Context;

/// A connection for the benchmark's own statements (create, reset, count), driven by a small runtime of its own
/// so that the rest of the benchmark stays plain blocking code.
pub struct Admin {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Admin {
    pub fn connect(connection_string: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(connection_string, tokio_postgres::NoTls)
                .await
                .with_context(|| format!("could not connect to {connection_string}"))?;
            // The connection only makes progress while `block_on` runs, which is whenever the client is used.
            tokio::spawn(connection);
            anyhow::Ok(client)
        })?;
        Ok(Admin { runtime, client })
    }

    pub fn execute(&self, sql: &str) -> anyhow::Result<()> {
        self.runtime
            .block_on(self.client.batch_execute(sql))
            .with_context(|| format!("{sql} failed"))
    }

    /// One `bigint` from the first column of the first row.
    pub fn query_i64(&self, sql: &str) -> anyhow::Result<i64> {
        let row = self
            .runtime
            .block_on(self.client.query_one(sql, &[]))
            .with_context(|| format!("{sql} failed"))?;
        Ok(row.try_get(0)?)
    }

    /// Every row of `sql`, each made into a value by `each`.
    pub fn rows<T>(
        &self,
        sql: &str,
        each: impl Fn(&tokio_postgres::Row) -> anyhow::Result<T>,
    ) -> anyhow::Result<Vec<T>> {
        let rows = self
            .runtime
            .block_on(self.client.query(sql, &[]))
            .with_context(|| format!("{sql} failed"))?;
        rows.iter().map(each).collect()
    }

    pub fn count_rows(&self, table: &str) -> anyhow::Result<u64> {
        let n = self.query_i64(&format!("SELECT count(*) FROM {table}"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Empties every table the migrations made (not their history), whatever later migrations add — a log
    /// position table, dead letters — so each variant starts from the same empty schema; then checkpoints, so the
    /// previous variant's dirty pages are not flushed on the next one's time.
    pub fn reset(&self) -> anyhow::Result<()> {
        let tables: Vec<String> = self
            .runtime
            .block_on(self.client.query(
                "SELECT quote_ident(tablename) FROM pg_tables \
                 WHERE schemaname = 'public' AND tablename <> 'refinery_schema_history'",
                &[],
            ))?
            .iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect::<Result<_, _>>()?;
        if !tables.is_empty() {
            self.execute(&format!("TRUNCATE {}", tables.join(", ")))?;
        }
        self.execute("CHECKPOINT")
    }
}
