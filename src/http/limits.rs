//! Bounds that keep the gateway alive under abuse: request bodies in flight share one byte budget for the whole
//! process, and a body must arrive within a total time and at a minimum rate, so that slow or stalled senders
//! can neither pin memory nor hold connections for long.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Bytes of request bodies (as read, and decompressed) the process holds at once, at most. A request that would
/// pass it is refused at once with 503: memory stays bounded whatever many clients send. The first
/// [`UNCOUNTED_BYTES`] of each request are outside it (bounded instead by the connection cap), so that senders
/// of large stalled bodies cannot crowd out the small requests of everyone else.
#[derive(Debug)]
pub struct BodyBudget {
    in_flight: AtomicUsize,
    max_bytes: usize,
}

impl BodyBudget {
    pub fn new(max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            max_bytes,
        })
    }

    /// An empty share of the budget, grown as bytes arrive and given back when dropped.
    pub fn share(self: &Arc<Self>) -> BudgetShare {
        BudgetShare {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// Bytes held by requests now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// Bytes of each request that do not count against the budget: a single update or a small batch.
pub const UNCOUNTED_BYTES: usize = 16 * 1024;

/// One request's share of the [`BodyBudget`].
#[derive(Debug)]
pub struct BudgetShare {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BudgetShare {
    /// Makes the share cover a request holding `total` bytes (beyond the uncounted ones); false, taking nothing
    /// more, when that would pass the budget.
    pub fn cover(&mut self, total: usize) -> bool {
        let wanted = total.saturating_sub(UNCOUNTED_BYTES);
        wanted <= self.bytes || self.grow(wanted - self.bytes)
    }

    /// Takes `more` bytes from the budget; false (taking nothing) when that would pass it.
    fn grow(&mut self, more: usize) -> bool {
        let max = self.budget.max_bytes;
        let taken = self
            .budget
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(more).filter(|total| *total <= max)
            })
            .is_ok();
        if taken {
            self.bytes += more;
        }
        taken
    }
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        self.budget.in_flight.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// When a body must have arrived: by `total` after its first byte was awaited, and at no less than
/// `min_bytes_per_sec` on average after a short grace (for a slow start on a mobile link).
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline {
    pub total: Duration,
    pub min_bytes_per_sec: u64,
}

/// The grace before the minimum rate applies.
const RATE_GRACE: Duration = Duration::from_secs(5);

impl BodyDeadline {
    /// The latest moment the next chunk may arrive, `received` bytes into a body started at `started`.
    pub fn next_chunk_by(&self, started: Instant, received: usize) -> Instant {
        let by_rate = match self.min_bytes_per_sec {
            0 => self.total,
            rate => RATE_GRACE + Duration::from_secs_f64(received as f64 / rate as f64),
        };
        started + by_rate.min(self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_take_from_one_budget_and_give_back_when_dropped() {
        let budget = BodyBudget::new(100);
        let mut a = budget.share();
        let mut b = budget.share();
        assert!(a.cover(UNCOUNTED_BYTES + 60));
        assert!(!b.cover(UNCOUNTED_BYTES + 50), "past the budget");
        assert!(b.cover(UNCOUNTED_BYTES + 40));
        assert!(b.cover(UNCOUNTED_BYTES + 40), "already covered");
        assert!(budget.share().cover(UNCOUNTED_BYTES), "a small request is always taken");
        assert_eq!(budget.in_flight(), 100);
        drop(a);
        assert_eq!(budget.in_flight(), 40);
        drop(b);
        assert_eq!(budget.in_flight(), 0);
    }

    #[test]
    fn a_body_must_keep_the_minimum_rate_and_finish_within_the_total() {
        let started = Instant::now();
        let deadline = BodyDeadline {
            total: Duration::from_secs(30),
            min_bytes_per_sec: 1000,
        };
        assert_eq!(deadline.next_chunk_by(started, 0), started + Duration::from_secs(5));
        assert_eq!(
            deadline.next_chunk_by(started, 10_000),
            started + Duration::from_secs(15)
        );
        assert_eq!(
            deadline.next_chunk_by(started, 1_000_000),
            started + Duration::from_secs(30)
        );
    }
}
