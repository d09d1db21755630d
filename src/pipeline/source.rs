//! Where a batch writer takes its updates from: a small trait, so that another queue can feed the same writers.

use std::time::Instant;

use super::queue::{Chunk, QueueReceiver};

/// What a writer gets when it waits for updates.
pub enum Received<T> {
    Chunk(Chunk<T>),
    /// Nothing arrived before the deadline.
    Timeout,
    /// The source is closed and empty: nothing more will come.
    Drained,
}

/// A writer's supply of updates.
pub trait Source: Send + 'static {
    /// The update type it supplies.
    type Update;
    /// Waits until `deadline` for the next chunk.
    fn recv_until(&self, deadline: Instant) -> Received<Self::Update>;
    /// Whether nothing is waiting right now.
    fn is_empty(&self) -> bool;
    /// `n` updates taken from this source, holding `bytes` of its room, are committed.
    fn committed(&self, n: usize, bytes: usize);
    /// The gateway is stopping: write what is held at once.
    fn is_closed(&self) -> bool;
    /// The stop timed out: give up what is held (its source keeps it for the next start, if it can).
    fn is_abandoned(&self) -> bool;
}

impl<T: Send + 'static> Source for QueueReceiver<T> {
    type Update = T;

    fn recv_until(&self, deadline: Instant) -> Received<T> {
        QueueReceiver::recv_until(self, deadline)
    }
    fn is_empty(&self) -> bool {
        QueueReceiver::is_empty(self)
    }
    fn committed(&self, n: usize, bytes: usize) {
        QueueReceiver::committed(self, n, bytes)
    }
    fn is_closed(&self) -> bool {
        QueueReceiver::is_closed(self)
    }
    fn is_abandoned(&self) -> bool {
        QueueReceiver::is_abandoned(self)
    }
}
