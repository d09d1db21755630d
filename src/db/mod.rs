//! The database side: the connection pool, the migrations, the embedded PostgreSQL and the committed log positions.

pub mod checkpoint;
pub mod embedded;
pub mod migrate;
pub mod pool;

pub use checkpoint::{Checkpoint, Checkpoints};
pub use embedded::{CommitSafety, EmbeddedPostgres, EmbeddedPostgresError, PostgresOptions};
