//! From accepted updates to rows in PostgreSQL: a bounded queue per stream, batch writers on their own threads,
//! and the binary `COPY` that writes each batch.
//!
//! - [`queue`]: the bounded queue (the only user of `crossbeam_channel`).
//! - [`batch`]: the pure batching rule (size or age, clock injected).
//! - [`writer`]: drains a queue on its own thread, writes batches, retries with capped backoff.
//! - [`copy`]: binary `COPY … FROM STDIN` of one batch; the only SQL writer.

pub mod batch;
pub mod copy;
pub mod queue;
pub mod writer;

pub use batch::{Batch, BatchPolicy, Batcher};
pub use copy::{CopyRecord, LogPositions, WriteOutcome};
pub use queue::{
    bounded, Chunk, CommitToken, CommitWaiter, Origin, PushError, QueueReceiver, Reservation, StreamQueue,
};
pub use writer::{Backoff, BatchWriter, WriterHandle};
