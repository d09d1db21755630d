//! The batching rule, pure and with the clock passed in: a batch is due when it holds `max_rows` rows or when
//! its oldest row has waited `flush_interval`, whichever comes first.

use std::time::{Duration, Instant};

/// When a batch is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Rows per COPY at most.
    pub max_rows: usize,
    /// Longest time an accepted update waits before its batch is written.
    pub flush_interval: Duration,
}

/// Gathers chunks of updates into batches of at most `max_rows`.
///
/// A chunk larger than the room left is split: what does not fit is carried into the next batches, keeping its
/// arrival time, so a 10 000-update request becomes ten full batches. Invariant: rows are carried only while
/// the current batch is full.
#[derive(Debug)]
pub struct Batcher<T> {
    policy: BatchPolicy,
    rows: Vec<T>,
    /// When the oldest row of `rows` arrived.
    first_at: Option<Instant>,
    carry: Vec<T>,
    carry_since: Option<Instant>,
}

impl<T> Batcher<T> {
    pub fn new(policy: BatchPolicy) -> Self {
        Self {
            policy,
            rows: Vec::new(),
            first_at: None,
            carry: Vec::new(),
            carry_since: None,
        }
    }

    /// Adds a chunk that arrived at `now`. Call only while the batch is not full.
    pub fn push(&mut self, mut chunk: Vec<T>, now: Instant) {
        debug_assert!(!self.is_full() && self.carry.is_empty());
        if chunk.is_empty() {
            return;
        }
        self.first_at.get_or_insert(now);
        let room = self.policy.max_rows - self.rows.len();
        if self.rows.is_empty() && chunk.len() <= room {
            // The common case: the chunk becomes the batch without a copy.
            self.rows = chunk;
        } else if chunk.len() <= room {
            self.rows.append(&mut chunk);
        } else {
            self.rows.extend(chunk.drain(..room));
            self.carry = chunk;
            self.carry_since = Some(now);
        }
    }

    pub fn is_full(&self) -> bool {
        self.rows.len() >= self.policy.max_rows
    }

    /// No rows held at all, neither in the batch nor carried.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.carry.is_empty()
    }

    pub fn has_rows(&self) -> bool {
        !self.rows.is_empty()
    }

    /// When the current batch must be written at the latest.
    pub fn deadline(&self) -> Option<Instant> {
        self.first_at.map(|at| at + self.policy.flush_interval)
    }

    /// Whether the current batch must be written now.
    pub fn is_due(&self, now: Instant) -> bool {
        self.is_full() || self.deadline().is_some_and(|d| d <= now)
    }

    /// When the oldest row held (in the batch or carried) arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.first_at.or(self.carry_since)
    }

    /// Takes the current batch and starts the next one from the carried rows.
    pub fn take(&mut self) -> Vec<T> {
        let batch = std::mem::take(&mut self.rows);
        self.first_at = None;
        if !self.carry.is_empty() {
            self.first_at = self.carry_since;
            if self.carry.len() <= self.policy.max_rows {
                self.rows = std::mem::take(&mut self.carry);
                self.carry_since = None;
            } else {
                self.rows = self.carry.drain(..self.policy.max_rows).collect();
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POLICY: BatchPolicy = BatchPolicy {
        max_rows: 3,
        flush_interval: Duration::from_secs(10),
    };

    #[test]
    fn a_batch_is_due_when_full_or_when_its_oldest_row_has_waited_the_interval() {
        let t0 = Instant::now();
        let mut b = Batcher::new(POLICY);
        assert_eq!(b.deadline(), None);
        b.push(vec![1], t0);
        assert!(!b.is_due(t0 + Duration::from_secs(9)));
        assert!(b.is_due(t0 + Duration::from_secs(10)));
        b.push(vec![2, 3], t0 + Duration::from_secs(5));
        assert!(b.is_due(t0));
        assert_eq!(
            b.deadline(),
            Some(t0 + Duration::from_secs(10)),
            "the oldest row sets the deadline"
        );
        assert_eq!(b.take(), vec![1, 2, 3]);
        assert!(b.is_empty());
    }

    #[test]
    fn a_large_chunk_is_split_into_full_batches_in_order() {
        let t0 = Instant::now();
        let mut b = Batcher::new(POLICY);
        b.push(vec![1], t0);
        b.push((2..=8).collect(), t0 + Duration::from_secs(1));
        assert_eq!(b.take(), vec![1, 2, 3]);
        assert_eq!(
            b.deadline(),
            Some(t0 + Duration::from_secs(11)),
            "carried rows keep their arrival time"
        );
        assert_eq!(b.take(), vec![4, 5, 6]);
        assert!(!b.is_full());
        b.push(vec![9], t0);
        assert_eq!(b.take(), vec![7, 8, 9]);
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
                b.push((next..next + len as u32).collect(), now);
                next += len as u32;
            }
            while !b.is_empty() {
                out.push(b.take());
            }
            prop_assert!(out.iter().all(|batch| !batch.is_empty() && batch.len() <= max_rows));
            prop_assert_eq!(out.concat(), (0..next).collect::<Vec<_>>());
        }
    }
}
