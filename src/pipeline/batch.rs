//! The batching rule, pure and with the clock passed in: a batch is due when it holds `max_rows` rows, when its
//! oldest row has waited `flush_interval`, or at once when a request in it waits for the commit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::delivery::Delivery;
use super::queue::{Chunk, CommitWaiter};

/// When a batch is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Rows per COPY at most.
    pub max_rows: usize,
    /// Longest time an accepted update waits before its batch is written.
    pub flush_interval: Duration,
}

/// Where a run of a batch's rows came from: what the writer reports once they are committed.
pub struct Part {
    /// Rows of the batch from this part.
    pub rows: usize,
    /// Their share of the chunk's queue bytes.
    pub bytes: usize,
    pub delivery: Option<Box<dyn Delivery>>,
    pub commit: Option<Arc<CommitWaiter>>,
}

/// Rows to write in one transaction, and where they came from.
pub struct Batch<T> {
    pub rows: Vec<T>,
    pub parts: Vec<Part>,
}

impl<T> Batch<T> {
    fn new() -> Self {
        Self {
            rows: Vec::new(),
            parts: Vec::new(),
        }
    }
}

/// Gathers chunks into batches of at most `max_rows`.
///
/// A chunk larger than the room left is split: what does not fit is carried into the next batches, keeping its
/// arrival time, so a 10 000-update request becomes ten full batches. Invariant: a chunk is carried only while
/// the current batch is full.
pub struct Batcher<T> {
    policy: BatchPolicy,
    batch: Batch<T>,
    /// When the oldest row of the batch arrived.
    first_at: Option<Instant>,
    /// A request in the batch waits for the commit.
    urgent: bool,
    carry: Option<(Chunk<T>, Instant)>,
}

impl<T> Batcher<T> {
    pub fn new(policy: BatchPolicy) -> Self {
        Self {
            policy,
            batch: Batch::new(),
            first_at: None,
            urgent: false,
            carry: None,
        }
    }

    /// Adds a chunk that arrived at `now`. Call only while the batch is not full.
    pub fn push(&mut self, chunk: Chunk<T>, now: Instant) {
        debug_assert!(!self.is_full() && self.carry.is_none());
        if chunk.updates.is_empty() {
            return;
        }
        self.first_at.get_or_insert(now);
        self.urgent |= chunk.commit.is_some();
        let room = self.policy.max_rows - self.batch.rows.len();
        if let Some(rest) = self.add(chunk, room) {
            self.carry = Some((rest, now));
        }
    }

    /// Moves up to `room` updates of `chunk` into the batch; returns the rest, if any.
    fn add(&mut self, mut chunk: Chunk<T>, room: usize) -> Option<Chunk<T>> {
        let n = chunk.updates.len();
        let taken = n.min(room);
        let rest_updates = if taken < n {
            chunk.updates.split_off(taken)
        } else {
            Vec::new()
        };
        // The bytes follow the rows in proportion; the two shares add up to the chunk's exactly.
        let taken_bytes = if taken < n {
            (chunk.bytes as u128 * taken as u128 / n as u128) as usize
        } else {
            chunk.bytes
        };
        let mut delivery = chunk.delivery;
        let rest_delivery = match &mut delivery {
            Some(d) if taken < n => Some(d.split_off(taken)),
            _ => None,
        };
        if self.batch.rows.is_empty() {
            // The common case: the chunk's rows become the batch's without a copy.
            self.batch.rows = chunk.updates;
        } else {
            self.batch.rows.append(&mut chunk.updates);
        }
        self.batch.parts.push(Part {
            rows: taken,
            bytes: taken_bytes,
            delivery,
            commit: chunk.commit.clone(),
        });
        (taken < n).then(|| Chunk {
            updates: rest_updates,
            bytes: chunk.bytes - taken_bytes,
            delivery: rest_delivery,
            commit: chunk.commit,
        })
    }

    pub fn is_full(&self) -> bool {
        self.batch.rows.len() >= self.policy.max_rows
    }

    /// No rows held at all, neither in the batch nor carried.
    pub fn is_empty(&self) -> bool {
        self.batch.rows.is_empty() && self.carry.is_none()
    }

    pub fn has_rows(&self) -> bool {
        !self.batch.rows.is_empty()
    }

    /// When the current batch must be written at the latest.
    pub fn deadline(&self) -> Option<Instant> {
        self.first_at.map(|at| {
            if self.urgent {
                at
            } else {
                at + self.policy.flush_interval
            }
        })
    }

    /// Whether the current batch must be written now.
    pub fn is_due(&self, now: Instant) -> bool {
        self.is_full() || self.deadline().is_some_and(|d| d <= now)
    }

    /// When the oldest row held (in the batch or carried) arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.first_at.or(self.carry.as_ref().map(|(_, at)| *at))
    }

    /// Takes the current batch and starts the next one from the carried rows.
    pub fn take(&mut self) -> Batch<T> {
        let batch = std::mem::replace(&mut self.batch, Batch::new());
        self.first_at = None;
        self.urgent = false;
        if let Some((chunk, since)) = self.carry.take() {
            self.first_at = Some(since);
            self.urgent = chunk.commit.is_some();
            if let Some(rest) = self.add(chunk, self.policy.max_rows) {
                self.carry = Some((rest, since));
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Checkpoint;
    use proptest::prelude::*;

    const POLICY: BatchPolicy = BatchPolicy {
        max_rows: 3,
        flush_interval: Duration::from_secs(10),
    };

    /// A record's updates `start..end` of `total`, as a log would deliver them.
    struct Span {
        lsn: u64,
        start: usize,
        end: usize,
        total: usize,
    }

    impl Delivery for Span {
        fn split_off(&mut self, at: usize) -> Box<dyn Delivery> {
            let rest = Span {
                lsn: self.lsn,
                start: self.start + at,
                end: self.end,
                total: self.total,
            };
            self.end = self.start + at;
            Box::new(rest)
        }
        fn checkpoint(&self) -> Option<Checkpoint> {
            Some(Checkpoint {
                slot: 0,
                lsn: self.lsn,
                updates_done: (self.end < self.total).then_some(self.end as u32),
            })
        }
        fn committed(self: Box<Self>) {}
    }

    fn logged(updates: Vec<u32>, lsn: u64) -> Chunk<u32> {
        let total = updates.len();
        Chunk {
            updates,
            bytes: total * 10,
            delivery: Some(Box::new(Span {
                lsn,
                start: 0,
                end: total,
                total,
            })),
            commit: None,
        }
    }

    #[test]
    fn a_batch_is_due_when_full_or_when_its_oldest_row_has_waited_the_interval() {
        let t0 = Instant::now();
        let mut b = Batcher::new(POLICY);
        assert_eq!(b.deadline(), None);
        b.push(Chunk::in_memory(vec![1]), t0);
        assert!(!b.is_due(t0 + Duration::from_secs(9)));
        assert!(b.is_due(t0 + Duration::from_secs(10)));
        b.push(Chunk::in_memory(vec![2, 3]), t0 + Duration::from_secs(5));
        assert!(b.is_due(t0));
        assert_eq!(
            b.deadline(),
            Some(t0 + Duration::from_secs(10)),
            "the oldest row sets the deadline"
        );
        assert_eq!(b.take().rows, vec![1, 2, 3]);
        assert!(b.is_empty());
    }

    #[test]
    fn a_request_waiting_for_its_commit_makes_the_batch_due_at_once() {
        let t0 = Instant::now();
        let mut b = Batcher::new(POLICY);
        let (waiter, _rx) = CommitWaiter::new(1);
        b.push(
            Chunk {
                commit: Some(waiter),
                ..Chunk::in_memory(vec![1])
            },
            t0,
        );
        assert!(b.is_due(t0));
    }

    #[test]
    fn a_large_logged_record_is_split_into_full_batches_that_track_its_position() {
        let t0 = Instant::now();
        let mut b = Batcher::new(POLICY);
        b.push(logged(vec![1], 7), t0);
        b.push(logged((2..=8).collect(), 8), t0 + Duration::from_secs(1));
        let ends = |batch: &Batch<u32>| -> Vec<(u64, Option<u32>)> {
            batch
                .parts
                .iter()
                .map(|p| {
                    let c = p.delivery.as_ref().and_then(|d| d.checkpoint()).expect("logged");
                    (c.lsn, c.updates_done)
                })
                .collect()
        };
        let first = b.take();
        assert_eq!(first.rows, vec![1, 2, 3]);
        assert_eq!(ends(&first), [(7, None), (8, Some(2))]);
        assert_eq!(
            b.deadline(),
            Some(t0 + Duration::from_secs(11)),
            "carried rows keep their arrival time"
        );
        let second = b.take();
        assert_eq!(second.rows, vec![4, 5, 6]);
        assert_eq!(ends(&second), [(8, Some(5))]);
        assert!(!b.is_full());
        b.push(logged(vec![9], 9), t0);
        let third = b.take();
        assert_eq!(third.rows, vec![7, 8, 9]);
        assert_eq!(ends(&third), [(8, None), (9, None)]);
        assert!(b.is_empty());
    }

    proptest! {
        #[test]
        fn every_row_comes_out_once_in_order_and_no_batch_is_over_the_limit(
            chunks in prop::collection::vec(1usize..12, 0..30), max_rows in 1usize..8,
        ) {
            let now = Instant::now();
            let mut b = Batcher::new(BatchPolicy { max_rows, flush_interval: Duration::from_secs(1) });
            let mut next = 0u32;
            let mut out = Vec::new();
            for len in chunks {
                while b.is_full() {
                    out.push(b.take());
                }
                b.push(logged((next..next + len as u32).collect(), u64::from(next)), now);
                next += len as u32;
            }
            while !b.is_empty() {
                out.push(b.take());
            }
            prop_assert!(out.iter().all(|batch| !batch.rows.is_empty() && batch.rows.len() <= max_rows));
            prop_assert!(out.iter().all(|batch| batch.parts.iter().map(|p| p.rows).sum::<usize>() == batch.rows.len()));
            prop_assert_eq!(
                out.iter().flat_map(|b| &b.parts).map(|p| p.bytes).sum::<usize>(),
                next as usize * 10,
                "every byte reserved is given back once"
            );
            let rows: Vec<u32> = out.into_iter().flat_map(|b| b.rows).collect();
            prop_assert_eq!(rows, (0..next).collect::<Vec<_>>());
        }
    }
}
