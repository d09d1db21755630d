//! The database side: the connection pool, the migrations, the time partitions, the embedded PostgreSQL (server,
//! cluster set-up, throwaway servers, binary lookup, link-safe files), the committed positions of the log and of
//! JetStream (`positions`), the JetStream shard leases, and the connection string with its TLS to PostgreSQL
//! (`client_tls`).

pub mod client_tls;
pub mod embedded;
pub mod migrate;
pub mod partitions;
pub mod pool;
pub mod positions;
pub mod shard_lease;

pub use client_tls::{DatabaseTls, DatabaseUrl};
pub use embedded::{CommitSafety, EmbeddedPostgres, EmbeddedPostgresError, PostgresOptions};
pub use positions::{Checkpoint, Checkpoints};
