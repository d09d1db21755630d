//! The database side: the connection pool, the migrations and the embedded PostgreSQL.

pub mod embedded;
pub mod migrate;
pub mod pool;

pub use embedded::{CommitSafety, EmbeddedPostgres, EmbeddedPostgresError, PostgresOptions};
