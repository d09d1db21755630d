//! The bounded queue between the HTTP handlers and the batch writers of one stream.
//!
//! Its unit is the update, not the request: room for all of a request's updates is reserved at once
//! ([`StreamQueue::reserve`]), so a request is queued whole or not at all, and an update keeps its room until its
//! batch is committed, so the capacity bounds everything the gateway holds for the stream, including batches
//! being retried while PostgreSQL is away. When there is no room, `reserve` fails at once: it never blocks, which
//! is what lets an HTTP handler answer 503 instead of stalling.
//!
//! Each writer has its own channel (a *slot*), filled in order: a slot's updates are committed in the order
//! they were logged, which is what lets the write-ahead log resume each slot exactly after its last commit.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::delivery::Delivery;
use super::source::Received;

/// Why updates were not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// Not enough room for every update of the request, counted in `what`: updates, or their bytes.
    #[error("the queue holds {pending} of {capacity} {what}; {wanted} more do not fit")]
    Full {
        pending: usize,
        capacity: usize,
        wanted: usize,
        what: &'static str,
    },
    /// The gateway is stopping and takes nothing more.
    #[error("the queue is closed")]
    Closed,
}

/// Wakes a request that waits for its updates to be committed (`?ack=commit`).
pub struct CommitWaiter {
    remaining: AtomicUsize,
    notify: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl CommitWaiter {
    /// A waiter for `updates` updates and the receiver that resolves once all are committed.
    pub fn new(updates: usize) -> (Arc<Self>, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (
            Arc::new(Self {
                remaining: AtomicUsize::new(updates),
                notify: Mutex::new(Some(tx)),
            }),
            rx,
        )
    }

    /// `n` more of the updates are committed.
    pub fn committed(&self, n: usize) {
        if self.remaining.fetch_sub(n, Ordering::AcqRel) == n {
            if let Some(tx) = self.notify.lock().ok().and_then(|mut n| n.take()) {
                let _ = tx.send(());
            }
        }
    }
}

/// A request's updates on their way to a writer.
pub struct Chunk<T> {
    pub updates: Vec<T>,
    /// About how much memory the updates take, as reserved in the queue (set when pushed).
    pub bytes: usize,
    /// The source's side of the updates; `None` for updates held in memory only.
    pub delivery: Option<Box<dyn Delivery>>,
    /// Set when the request waits for the commit: the batch is then written at once.
    pub commit: Option<Arc<CommitWaiter>>,
}

impl<T> Chunk<T> {
    pub fn in_memory(updates: Vec<T>) -> Self {
        Self {
            updates,
            bytes: 0,
            delivery: None,
            commit: None,
        }
    }
}

struct Shared {
    /// Updates accepted and not yet committed: the bound applies to this.
    pending: AtomicUsize,
    capacity: usize,
    /// Approximate memory of those updates: the second bound, so that large updates cannot make a queue of
    /// `capacity` updates take gigabytes.
    pending_bytes: AtomicUsize,
    max_bytes: usize,
    /// Set when the gateway stops taking updates; writers then flush what they hold and drain the rest.
    closed: AtomicBool,
    /// Set when a stop timed out: writers give up what they hold (the log, if any, keeps it for the next start).
    abandoned: AtomicBool,
    /// Woken whenever writers give room back.
    room: tokio::sync::Notify,
    /// Set when a wait for room ran out with nothing committed meanwhile (PostgreSQL down, say); cleared by the
    /// next commit. While set, nobody waits.
    stalled: AtomicBool,
    /// Batches committed so far: tells a wait that ran out whether the writers moved at all.
    commits: AtomicU64,
}

impl Shared {
    fn give_back(&self, updates: usize, bytes: usize) {
        self.pending.fetch_sub(updates, Ordering::AcqRel);
        self.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// The queue of one stream: a shared bound and one channel per writer slot.
pub struct StreamQueue<T> {
    shared: Arc<Shared>,
    slots: Vec<Sender<Chunk<T>>>,
    receivers: Vec<Receiver<Chunk<T>>>,
    next_slot: AtomicUsize,
}

/// A queue holding at most `capacity` updates and about `max_bytes` of them, spread over `slots` writers.
pub fn bounded<T>(capacity: usize, max_bytes: usize, slots: usize) -> Arc<StreamQueue<T>> {
    // The reservation is the bound, so the channels need none of their own: a send can only fail for a
    // disconnected channel. Unbounded channels grow in small blocks as chunks arrive, where a bounded one would
    // allocate and touch a slot for every update the queue may hold (100 000 × 64 bytes per slot and stream)
    // at start, resident for the process's life.
    let (senders, receivers) = (0..slots.max(1)).map(|_| crossbeam_channel::unbounded()).unzip();
    let shared = Arc::new(Shared {
        pending: AtomicUsize::new(0),
        capacity,
        pending_bytes: AtomicUsize::new(0),
        max_bytes,
        closed: AtomicBool::new(false),
        abandoned: AtomicBool::new(false),
        room: tokio::sync::Notify::new(),
        stalled: AtomicBool::new(false),
        commits: AtomicU64::new(0),
    });
    Arc::new(StreamQueue {
        shared,
        slots: senders,
        receivers,
        next_slot: AtomicUsize::new(0),
    })
}

/// Room for some updates, taken from the bound; given back when dropped unless the updates were pushed.
pub struct Reservation<T> {
    queue: Arc<StreamQueue<T>>,
    updates: usize,
    bytes: usize,
    slot: usize,
    pushed: bool,
}

impl<T> Reservation<T> {
    /// The writer slot the updates will go to.
    pub fn slot(&self) -> u16 {
        self.slot as u16
    }

    /// Hands the chunk to its writer.
    pub fn push(mut self, mut chunk: Chunk<T>) {
        debug_assert_eq!(chunk.updates.len(), self.updates);
        chunk.bytes = self.bytes;
        self.pushed = true;
        if self.queue.slots[self.slot].send(chunk).is_err() {
            // Receivers live as long as the queue itself; a closed channel means the writers are gone and the
            // process is ending, where the log (when there is one) still holds the updates.
            self.queue.shared.give_back(self.updates, self.bytes);
        }
    }
}

impl<T> Drop for Reservation<T> {
    fn drop(&mut self) {
        if !self.pushed {
            self.queue.shared.give_back(self.updates, self.bytes);
        }
    }
}

impl<T> StreamQueue<T> {
    /// Reserves room for `updates` updates of about `bytes` on the next slot (round robin), or fails at once.
    pub fn reserve(self: &Arc<Self>, updates: usize, bytes: usize) -> Result<Reservation<T>, PushError> {
        self.reserve_on(updates, bytes, self.next_slot())
    }

    /// [`reserve`](Self::reserve), but when the queue is full, waits up to `max_wait` for the writers to give
    /// room back, so that a client sending faster than PostgreSQL takes its updates is slowed down rather than
    /// answered at once. Fails at once while the queue is stalled: once a wait has run out with nothing committed
    /// meanwhile (PostgreSQL down, say), nobody waits until the next commit.
    pub async fn reserve_within(
        self: &Arc<Self>,
        updates: usize,
        bytes: usize,
        max_wait: Duration,
    ) -> Result<Reservation<T>, PushError> {
        let may_wait = |r: &Result<Reservation<T>, PushError>| {
            matches!(r, Err(PushError::Full { .. }))
                && updates <= self.shared.capacity
                && !self.shared.stalled.load(Ordering::Acquire)
        };
        // The common case, room at once, registers no waiter.
        let first = self.reserve(updates, bytes);
        if !may_wait(&first) {
            return first;
        }
        let deadline = tokio::time::Instant::now() + max_wait;
        let commits_before = self.shared.commits.load(Ordering::Acquire);
        loop {
            // Registered before the attempt, so that room given back in between is not missed.
            let freed = self.shared.room.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let attempt = self.reserve(updates, bytes);
            if !may_wait(&attempt) {
                return attempt;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                if self.shared.commits.load(Ordering::Acquire) == commits_before {
                    self.shared.stalled.store(true, Ordering::Release);
                }
                return self.reserve(updates, bytes);
            }
        }
    }

    /// The next slot in turn.
    pub fn next_slot(&self) -> usize {
        self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len()
    }

    /// Reserves room on a given slot (a replayed record goes back to its own slot).
    pub fn reserve_on(
        self: &Arc<Self>,
        updates: usize,
        bytes: usize,
        slot: usize,
    ) -> Result<Reservation<T>, PushError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        let shared = &self.shared;
        let capacity = shared.capacity;
        shared
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |pending| {
                (pending + updates <= capacity).then_some(pending + updates)
            })
            .map_err(|pending| PushError::Full {
                pending,
                capacity,
                wanted: updates,
                what: "updates",
            })?;
        // An empty queue takes any one request, however large: otherwise a request over the byte bound could
        // never be written.
        let max_bytes = shared.max_bytes;
        let by_bytes = shared
            .pending_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |pending| {
                (pending == 0 || pending + bytes <= max_bytes).then_some(pending + bytes)
            });
        if let Err(pending) = by_bytes {
            shared.pending.fetch_sub(updates, Ordering::AcqRel);
            return Err(PushError::Full {
                pending,
                capacity: max_bytes,
                wanted: bytes,
                what: "bytes",
            });
        }
        Ok(Reservation {
            queue: self.clone(),
            updates,
            bytes,
            slot: slot % self.slots.len(),
            pushed: false,
        })
    }

    /// Queues a chunk at once, or fails without blocking.
    pub fn try_push(self: &Arc<Self>, chunk: Chunk<T>) -> Result<(), PushError> {
        if chunk.updates.is_empty() {
            return Ok(());
        }
        self.reserve(chunk.updates.len(), chunk.bytes)?.push(chunk);
        Ok(())
    }

    /// Stops taking updates: every later reservation fails with [`PushError::Closed`].
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
    }

    /// Tells the writers to stop retrying and give up what they hold: the stop has timed out.
    pub fn abandon(&self) {
        self.close();
        self.shared.abandoned.store(true, Ordering::Release);
    }

    /// Updates accepted and not yet committed.
    pub fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::Acquire)
    }

    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The consuming end of one slot.
    pub fn receiver(&self, slot: usize) -> QueueReceiver<T> {
        QueueReceiver {
            rx: self.receivers[slot].clone(),
            shared: self.shared.clone(),
        }
    }
}

/// The consuming end of one slot, held by its writer.
pub struct QueueReceiver<T> {
    rx: Receiver<Chunk<T>>,
    shared: Arc<Shared>,
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

    /// Whether nothing is waiting in this slot right now.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Gives back the room of `n` committed updates of `bytes`.
    pub fn committed(&self, n: usize, bytes: usize) {
        self.shared.give_back(n, bytes);
        self.shared.commits.fetch_add(1, Ordering::AcqRel);
        self.shared.stalled.store(false, Ordering::Release);
        self.shared.room.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    pub fn is_abandoned(&self) -> bool {
        self.shared.abandoned.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn updates(r: Received<u32>) -> Vec<u32> {
        match r {
            Received::Chunk(c) => c.updates,
            _ => panic!("expected a chunk"),
        }
    }

    #[test]
    fn a_request_is_queued_whole_or_not_at_all() {
        let queue = bounded::<u32>(5, usize::MAX, 1);
        let rx = queue.receiver(0);
        queue.try_push(Chunk::in_memory(vec![1, 2, 3])).unwrap();
        let full = queue.try_push(Chunk::in_memory(vec![4, 5, 6])).unwrap_err();
        assert_eq!(
            full,
            PushError::Full {
                pending: 3,
                capacity: 5,
                wanted: 3,
                what: "updates"
            }
        );
        queue.try_push(Chunk::in_memory(vec![4, 5])).unwrap();
        assert_eq!(queue.pending(), 5);
        assert_eq!(updates(rx.recv_until(Instant::now())), vec![1, 2, 3]);
        // Taking a chunk does not give its room back; committing it does.
        assert!(queue.try_push(Chunk::in_memory(vec![7])).is_err());
        rx.committed(3, 0);
        queue.try_push(Chunk::in_memory(vec![7, 8, 9])).unwrap();
    }

    #[test]
    fn a_dropped_reservation_gives_its_room_back() {
        let queue = bounded::<u32>(5, usize::MAX, 2);
        let r = queue.reserve(4, 0).unwrap();
        assert!(queue.reserve(2, 0).is_err());
        drop(r);
        assert_eq!(queue.pending(), 0);
        assert!(queue.reserve(5, 0).is_ok());
    }

    #[tokio::test]
    async fn a_request_finding_the_queue_full_gets_the_room_a_commit_gives_back() {
        let queue = bounded::<u32>(5, usize::MAX, 1);
        let rx = queue.receiver(0);
        queue.try_push(Chunk::in_memory(vec![1, 2, 3, 4])).unwrap();
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move {
                queue
                    .reserve_within(3, 0, Duration::from_secs(60))
                    .await
                    .map(|r| r.updates)
            }
        });
        // Let the waiter find the queue full before the room comes back.
        tokio::task::yield_now().await;
        assert_eq!(updates(rx.recv_until(Instant::now())), vec![1, 2, 3, 4]);
        rx.committed(4, 0);
        assert_eq!(waiting.await.unwrap(), Ok(3));
    }

    #[tokio::test]
    async fn once_a_wait_for_room_runs_out_nobody_waits_until_the_next_commit() {
        let queue = bounded::<u32>(2, usize::MAX, 1);
        let rx = queue.receiver(0);
        queue.try_push(Chunk::in_memory(vec![1, 2])).unwrap();
        let full = |r: Result<Reservation<u32>, PushError>| matches!(r, Err(PushError::Full { .. }));
        assert!(full(queue.reserve_within(1, 0, Duration::from_millis(1)).await));
        // Stalled: even a wait of an hour answers at once.
        assert!(full(queue.reserve_within(1, 0, Duration::from_secs(3600)).await));
        assert_eq!(updates(rx.recv_until(Instant::now())), vec![1, 2]);
        rx.committed(2, 0);
        assert!(queue.reserve_within(2, 0, Duration::from_secs(3600)).await.is_ok());
    }

    #[tokio::test]
    async fn a_wait_that_runs_out_while_the_writers_commit_does_not_stall_the_queue() {
        let queue = bounded::<u32>(2, usize::MAX, 1);
        let rx = queue.receiver(0);
        queue.try_push(Chunk::in_memory(vec![1])).unwrap();
        queue.try_push(Chunk::in_memory(vec![2])).unwrap();
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.reserve_within(2, 0, Duration::from_millis(50)).await.is_ok() }
        });
        tokio::task::yield_now().await;
        // One commit: the writers move, but the room given back is too little for the waiter.
        assert_eq!(updates(rx.recv_until(Instant::now())), vec![1]);
        rx.committed(1, 0);
        assert!(!waiting.await.unwrap());
        assert!(!queue.shared.stalled.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn a_request_larger_than_the_queue_does_not_wait() {
        let queue = bounded::<u32>(2, usize::MAX, 1);
        assert!(matches!(
            queue.reserve_within(3, 0, Duration::from_secs(3600)).await,
            Err(PushError::Full { .. })
        ));
    }

    #[test]
    fn the_byte_bound_holds_but_an_empty_queue_takes_any_one_request() {
        let queue = bounded::<u32>(100, 1000, 1);
        let rx = queue.receiver(0);
        let big = queue.reserve(1, 5000).expect("an empty queue takes it");
        assert!(matches!(
            queue.reserve(1, 1),
            Err(PushError::Full { what: "bytes", .. })
        ));
        assert_eq!(queue.pending(), 1, "the refused reservation took nothing");
        big.push(Chunk::in_memory(vec![1]));
        let Received::Chunk(chunk) = rx.recv_until(Instant::now()) else {
            panic!("a chunk")
        };
        rx.committed(chunk.updates.len(), chunk.bytes);
        assert!(queue.reserve(1, 600).is_ok());
    }

    #[test]
    fn requests_are_spread_over_the_slots_in_turn() {
        let queue = bounded::<u32>(10, usize::MAX, 2);
        for i in 0..4 {
            queue.try_push(Chunk::in_memory(vec![i])).unwrap();
        }
        let now = Instant::now();
        assert_eq!(updates(queue.receiver(0).recv_until(now)), vec![0]);
        assert_eq!(updates(queue.receiver(1).recv_until(now)), vec![1]);
        assert_eq!(updates(queue.receiver(0).recv_until(now)), vec![2]);
        assert_eq!(updates(queue.receiver(1).recv_until(now)), vec![3]);
    }

    #[test]
    fn a_closed_queue_refuses_pushes_and_reports_drained_once_empty() {
        let queue = bounded::<u32>(5, usize::MAX, 1);
        let rx = queue.receiver(0);
        queue.try_push(Chunk::in_memory(vec![1])).unwrap();
        queue.close();
        assert_eq!(
            queue.try_push(Chunk::in_memory(vec![2])).unwrap_err(),
            PushError::Closed
        );
        assert!(matches!(rx.recv_until(Instant::now()), Received::Chunk(_)));
        assert!(matches!(
            rx.recv_until(Instant::now() + Duration::from_millis(1)),
            Received::Drained
        ));
    }

    #[test]
    fn a_commit_waiter_fires_once_every_part_is_committed() {
        let (waiter, mut rx) = CommitWaiter::new(5);
        waiter.committed(3);
        assert!(rx.try_recv().is_err());
        waiter.committed(2);
        assert!(rx.try_recv().is_ok());
    }
}
