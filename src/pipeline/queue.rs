//! The bounded queue between the HTTP handlers and the batch writers of one stream.
//!
//! Its unit is the update, not the request: a request's updates travel as one chunk, and room for all of them
//! is reserved at once, so a request is queued whole or not at all. An update keeps its room until its batch is
//! committed, so the capacity bounds everything the gateway holds for the stream, including batches being
//! retried while PostgreSQL is away. When there is no room, [`QueueSender::try_push`] fails at once: it never
//! blocks, which is what lets an HTTP handler answer 503 instead of stalling.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

/// Why updates were not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// Not enough room for every update of the request.
    #[error("the queue holds {pending} of {capacity} updates; {wanted} more do not fit")]
    Full {
        pending: usize,
        capacity: usize,
        wanted: usize,
    },
    /// The gateway is stopping and takes nothing more.
    #[error("the queue is closed")]
    Closed,
}

struct Shared {
    /// Updates accepted and not yet committed: the bound applies to this.
    pending: AtomicUsize,
    capacity: usize,
    /// Set when the gateway stops taking updates; writers then flush what they hold and drain the rest.
    closed: AtomicBool,
}

/// The producing end; cheap to clone (one per HTTP worker).
pub struct QueueSender<T> {
    tx: Sender<Vec<T>>,
    shared: Arc<Shared>,
}

/// The consuming end; each batch writer holds a clone.
pub struct QueueReceiver<T> {
    rx: Receiver<Vec<T>>,
    shared: Arc<Shared>,
}

// Written by hand: a derive would ask `T: Clone`, which the updates need not be.
impl<T> Clone for QueueSender<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<T> Clone for QueueReceiver<T> {
    fn clone(&self) -> Self {
        Self {
            rx: self.rx.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// A queue holding at most `capacity` updates.
pub fn bounded<T>(capacity: usize) -> (QueueSender<T>, QueueReceiver<T>) {
    // Every chunk holds at least one update, so `capacity` chunks always fit: `try_send` can only fail
    // for a disconnected queue, never for a full channel, once room is reserved.
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let shared = Arc::new(Shared {
        pending: AtomicUsize::new(0),
        capacity,
        closed: AtomicBool::new(false),
    });
    (
        QueueSender {
            tx,
            shared: shared.clone(),
        },
        QueueReceiver { rx, shared },
    )
}

impl<T> QueueSender<T> {
    /// Queues every update of `updates`, or none of them.
    pub fn try_push(&self, updates: Vec<T>) -> Result<(), PushError> {
        let wanted = updates.len();
        if wanted == 0 {
            return Ok(());
        }
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        let capacity = self.shared.capacity;
        let reserved = self
            .shared
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |pending| {
                (pending + wanted <= capacity).then_some(pending + wanted)
            });
        if let Err(pending) = reserved {
            return Err(PushError::Full {
                pending,
                capacity,
                wanted,
            });
        }
        match self.tx.try_send(updates) {
            Ok(()) => Ok(()),
            Err(TrySendError::Disconnected(_) | TrySendError::Full(_)) => {
                self.shared.pending.fetch_sub(wanted, Ordering::AcqRel);
                Err(PushError::Closed)
            }
        }
    }

    /// Stops taking updates: every later push fails with [`PushError::Closed`].
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
    }

    /// Updates accepted and not yet committed.
    pub fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::Acquire)
    }

    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }
}

/// What a writer gets when it waits for updates.
#[derive(Debug)]
pub enum Received<T> {
    Chunk(Vec<T>),
    /// Nothing arrived before the deadline.
    Timeout,
    /// The queue is closed and empty: nothing more will come.
    Drained,
}

impl<T> QueueReceiver<T> {
    /// Waits until `deadline` for the next chunk.
    pub fn recv_until(&self, deadline: Instant) -> Received<T> {
        match self.rx.recv_deadline(deadline) {
            Ok(chunk) => Received::Chunk(chunk),
            Err(RecvTimeoutError::Disconnected) => Received::Drained,
            Err(RecvTimeoutError::Timeout) if self.is_closed() && self.rx.is_empty() => Received::Drained,
            Err(RecvTimeoutError::Timeout) => Received::Timeout,
        }
    }

    /// Takes a chunk if one is waiting.
    pub fn try_recv(&self) -> Option<Vec<T>> {
        self.rx.try_recv().ok()
    }

    /// Gives back the room of `n` committed updates.
    pub fn committed(&self, n: usize) {
        self.shared.pending.fetch_sub(n, Ordering::AcqRel);
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_request_is_queued_whole_or_not_at_all() {
        let (tx, rx) = bounded::<u32>(5);
        tx.try_push(vec![1, 2, 3]).unwrap();
        assert_eq!(
            tx.try_push(vec![4, 5, 6]),
            Err(PushError::Full {
                pending: 3,
                capacity: 5,
                wanted: 3
            })
        );
        tx.try_push(vec![4, 5]).unwrap();
        assert_eq!(tx.pending(), 5);
        let Received::Chunk(first) = rx.recv_until(Instant::now()) else {
            panic!("expected a chunk")
        };
        assert_eq!(first, vec![1, 2, 3]);
        // Taking a chunk does not give its room back; committing it does.
        assert!(tx.try_push(vec![7]).is_err());
        rx.committed(3);
        tx.try_push(vec![7, 8, 9]).unwrap();
    }

    #[test]
    fn a_closed_queue_refuses_pushes_and_reports_drained_once_empty() {
        let (tx, rx) = bounded::<u32>(5);
        tx.try_push(vec![1]).unwrap();
        tx.close();
        assert_eq!(tx.try_push(vec![2]), Err(PushError::Closed));
        assert!(matches!(rx.recv_until(Instant::now()), Received::Chunk(_)));
        assert!(matches!(
            rx.recv_until(Instant::now() + Duration::from_millis(1)),
            Received::Drained
        ));
    }
}
