//! The database side: the connection pool, the migrations, the time partitions, the embedded PostgreSQL (server,
//! cluster set-up, throwaway servers, binary lookup, link-safe files), the committed log positions, the JetStream
//! shard leases, and the connection string with its TLS to PostgreSQL (`client_tls`).

pub mod checkpoint;
pub mod client_tls;
pub mod embedded;
pub mod migrate;
pub mod partitions;
pub mod pool;
pub mod shard_lease;

pub use checkpoint::{Checkpoint, Checkpoints};
pub use client_tls::{DatabaseTls, DatabaseUrl};
pub use embedded::{CommitSafety, EmbeddedPostgres, EmbeddedPostgresError, PostgresOptions};
