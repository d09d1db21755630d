//! From accepted updates to rows in PostgreSQL: a bounded queue per stream, batch writers on their own threads,
//! and the binary `COPY` that writes each batch.
//!
//! - [`queue`]: the bounded queue (the only user of `crossbeam_channel`).
//! - [`source`]: what a writer reads from (the queue, or another source).
//! - [`delivery`]: what a writer tells the source of its updates: checkpoints and commits.
//! - [`batch`]: the pure batching rule (size or age, clock injected).
//! - [`writer`]: drains a source on its own thread, writes batches, retries with capped backoff.
//! - [`copy`]: binary `COPY … FROM STDIN` of one batch; the only SQL writer.

pub mod batch;
pub mod copy;
pub mod delivery;
pub mod queue;
pub mod source;
pub mod writer;

pub use batch::{Batch, BatchPolicy, Batcher};
pub use copy::{CopyRecord, LogPositions, WriteOutcome};
pub use delivery::Delivery;
pub use queue::{bounded, Chunk, CommitWaiter, PushError, QueueReceiver, Reservation, StreamQueue};
pub use source::{Received, Source};
pub use writer::{Backoff, BatchWriter, WriterHandle, WriterState};
