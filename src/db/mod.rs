//! The database side: the connection pool, the migrations, the time partitions, the embedded PostgreSQL, the
//! committed log positions, the JetStream shard leases and TLS to PostgreSQL.

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
