//! Bounds that keep the gateway alive under abuse: request bodies in flight, and what parsing keeps of them, share
//! one byte budget for the whole process, of which one client address or one API key may hold only a share; a body
//! must arrive within a total time and at a minimum rate; and large bodies are inflated and parsed no more at once
//! than leaves the event loop a core. Slow, stalled or many senders can then neither pin memory nor hold
//! connections or cores for long, and one sender cannot take what the others need.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::Settings;
use crate::model::body::most_held_per_update;
use crate::model::{LocationUpdate, PollResult, Update};

/// Bytes of request bodies (as read, and decompressed) and of what parsing keeps of them that the process holds at
/// once, at most. A request that would pass it, or pass its client's or its key's share of it, is refused at once
/// with 503: memory stays bounded whatever many clients send, and one client cannot crowd out the others. The
/// first [`UNCOUNTED_BYTES`] of each request are outside it (bounded instead by the connection cap), so that
/// senders of large stalled bodies cannot crowd out the small requests of everyone else.
#[derive(Debug)]
pub struct BodyBudget {
    in_flight: AtomicUsize,
    max_bytes: usize,
    /// The most one holder (a client address, a key) may hold at once.
    holder_max_bytes: usize,
    /// What each holder holds now; a holder that holds nothing has no entry, so that this stays as small as the
    /// requests in flight.
    holders: Mutex<HashMap<Holder, usize>>,
    /// Large bodies being inflated or parsed on the blocking pool: one per core but one, at least one.
    parse_permits: Arc<Semaphore>,
}

/// Whom a share of the budget is counted against besides the process: a client address (an IPv6 client by its
/// /64, as the rate limits count it) or an API key (by name).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Holder {
    Address(IpAddr),
    Key(String),
}

impl Holder {
    pub fn address(address: IpAddr) -> Holder {
        Holder::Address(super::rate_limit::client(address))
    }
}

/// How much of the budget one holder may hold at least, in largest bodies, besides the parse structures of the most
/// updates: a gzip body, what it inflates to, and the strings and attributes parsing copies out of it. Below that a
/// client could never send a request of the largest size, whatever its shape.
const HOLDER_MIN_BODIES: usize = 3;

impl BodyBudget {
    pub fn new(max_bytes: usize, holder_max_bytes: usize) -> Arc<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            max_bytes,
            holder_max_bytes,
            holders: Mutex::new(HashMap::new()),
            parse_permits: Arc::new(Semaphore::new(parse_permits(cores))),
        })
    }

    /// The budget of `INGEST_MAX_INFLIGHT_BODY_BYTES`, each holder's share `INGEST_BODY_BUDGET_SHARE` of it (but
    /// never less than room for one request of the largest size, however shaped, nor more than the whole).
    pub fn for_settings(settings: &Settings) -> Arc<Self> {
        let max_bytes = settings.limits.max_inflight_body_bytes;
        let share = max_bytes / 100 * usize::from(settings.limits.body_budget_share.get());
        Self::new(max_bytes, share.max(largest_request_bytes(settings)).min(max_bytes))
    }

    /// An empty share of the budget, counted against `holders` too, grown as bytes arrive and given back when
    /// dropped.
    pub fn share(self: &Arc<Self>, holders: [Option<Holder>; 2]) -> BudgetShare {
        BudgetShare {
            budget: self.clone(),
            holders,
            body_bytes: 0,
            parse_bytes: 0,
            bytes: 0,
        }
    }

    /// Bytes held by requests now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Bytes `holder` holds now.
    pub fn held_by(&self, holder: &Holder) -> usize {
        self.lock_holders().get(holder).copied().unwrap_or(0)
    }

    /// The most one holder may hold.
    pub fn holder_max_bytes(&self) -> usize {
        self.holder_max_bytes
    }

    /// Waits for a turn to inflate or parse a large body on the blocking pool; the turn ends when the permit is
    /// dropped. `None` only if the permits were closed, which nothing does.
    pub async fn parse_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.parse_permits.clone().acquire_owned().await.ok()
    }

    fn lock_holders(&self) -> std::sync::MutexGuard<'_, HashMap<Holder, usize>> {
        // The map is only ever changed by whole additions and subtractions: one a panic interrupted is still sound.
        self.holders.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The most one request can hold of the budget: its body, inflated, with everything parsing keeps of the most
/// updates it may hold.
fn largest_request_bytes(settings: &Settings) -> usize {
    let known_fields = LocationUpdate::FIELDS.len().max(PollResult::FIELDS.len());
    let per_update = most_held_per_update(known_fields, usize::from(settings.limits.max_unknown_fields));
    settings
        .limits
        .max_body_bytes
        .saturating_mul(HOLDER_MIN_BODIES)
        .saturating_add((settings.limits.max_updates as usize).saturating_mul(per_update))
}

/// Bytes from which an allocation gets pages of its own, handed back to the system when it is freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const OWN_PAGES_FROM_BYTES: libc::c_int = 1024 * 1024;

/// Makes the allocator give every buffer of a MiB or more (request bodies, mostly) pages of its own, handed back to
/// the system when it is freed. glibc otherwise raises that threshold to the size of each large buffer freed (up
/// to 32 MiB): from the first large body on, bodies are carved out of its arenas, which stay resident at their
/// peak, and the process holds far more than the budget grants — 64 MiB of budget and 24 senders of 8 MiB bodies
/// measured 153–166 MiB of peak resident memory that way, 97 MiB with the threshold fixed. The cost is a few page
/// faults per large body. Call once at start-up, before other threads allocate.
pub fn give_large_buffers_their_own_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets one of the allocator's tunables, which takes effect for later allocations; it is
    // called before the other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_PAGES_FROM_BYTES);
    }
}

/// Large bodies worked on at once with `cores` cores: one core is left to the event loop, whose workers answer
/// everyone else meanwhile (health checks included).
fn parse_permits(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

/// Bytes of each request that do not count against the budget: a single update or a small batch.
pub const UNCOUNTED_BYTES: usize = 16 * 1024;

/// What parsing takes from the budget at once: it asks for a little at every update, and a lock per update would
/// cost more than the update.
const PARSE_STEP_BYTES: usize = 64 * 1024;

/// One request's share of the [`BodyBudget`].
#[derive(Debug)]
pub struct BudgetShare {
    budget: Arc<BodyBudget>,
    /// Whom the share counts against besides the process.
    holders: [Option<Holder>; 2],
    /// Bytes of body held (as read, and decompressed).
    body_bytes: usize,
    /// Bytes of what parsing keeps.
    parse_bytes: usize,
    /// Bytes taken from the budget: the two above, without the uncounted ones, and what parsing took ahead.
    bytes: usize,
}

impl BudgetShare {
    /// Makes the share cover a request holding `total` bytes of body; false, taking nothing more, when that would
    /// pass the budget or a holder's share of it.
    pub fn cover(&mut self, total: usize) -> bool {
        let wanted = (total.max(self.body_bytes) + self.parse_bytes).saturating_sub(UNCOUNTED_BYTES);
        if wanted > self.bytes && !self.grow(wanted - self.bytes) {
            return false;
        }
        self.body_bytes = total.max(self.body_bytes);
        true
    }

    /// Makes the share cover `more` bytes of what parsing keeps, taking from the budget in steps; false, taking
    /// nothing more, when that would pass the budget or a holder's share of it.
    pub fn take(&mut self, more: usize) -> bool {
        let parse_bytes = self.parse_bytes.saturating_add(more);
        let wanted = (self.body_bytes + parse_bytes).saturating_sub(UNCOUNTED_BYTES);
        if wanted > self.bytes {
            let needed = wanted - self.bytes;
            // A step ahead when it fits, what is needed otherwise: the last step may not fit whole.
            if !self.grow(needed.max(PARSE_STEP_BYTES)) && !self.grow(needed) {
                return false;
            }
        }
        self.parse_bytes = parse_bytes;
        true
    }

    /// Takes `more` bytes from the budget and from each holder's share; false (taking nothing) when that would pass
    /// any of them.
    fn grow(&mut self, more: usize) -> bool {
        let budget = &*self.budget;
        let mut holders = if self.holders.iter().any(Option::is_some) {
            let map = budget.lock_holders();
            let within = |holder: &Holder| {
                map.get(holder)
                    .copied()
                    .unwrap_or(0)
                    .checked_add(more)
                    .is_some_and(|held| held <= budget.holder_max_bytes)
            };
            if !self.holders.iter().flatten().all(within) {
                return false;
            }
            Some(map)
        } else {
            None
        };
        let max = budget.max_bytes;
        let taken = budget
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(more).filter(|total| *total <= max)
            })
            .is_ok();
        if !taken {
            return false;
        }
        if let Some(map) = holders.as_mut() {
            for holder in self.holders.iter().flatten() {
                match map.get_mut(holder) {
                    Some(held) => *held += more,
                    None => {
                        map.insert(holder.clone(), more);
                    }
                }
            }
        }
        self.bytes += more;
        true
    }
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        self.budget.in_flight.fetch_sub(self.bytes, Ordering::AcqRel);
        let mut map = self.budget.lock_holders();
        for holder in self.holders.iter().flatten() {
            if let Some(held) = map.get_mut(holder) {
                *held = held.saturating_sub(self.bytes);
                if *held == 0 {
                    map.remove(holder);
                }
            }
        }
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

    const NOBODY: [Option<Holder>; 2] = [None, None];

    #[test]
    fn shares_take_from_one_budget_and_give_back_when_dropped() {
        let budget = BodyBudget::new(100, 100);
        let mut a = budget.share(NOBODY);
        let mut b = budget.share(NOBODY);
        assert!(a.cover(UNCOUNTED_BYTES + 60));
        assert!(!b.cover(UNCOUNTED_BYTES + 50), "past the budget");
        assert!(b.cover(UNCOUNTED_BYTES + 40));
        assert!(b.cover(UNCOUNTED_BYTES + 40), "already covered");
        assert!(
            budget.share(NOBODY).cover(UNCOUNTED_BYTES),
            "a small request is always taken"
        );
        assert_eq!(budget.in_flight(), 100);
        drop(a);
        assert_eq!(budget.in_flight(), 40);
        drop(b);
        assert_eq!(budget.in_flight(), 0);
    }

    fn address(text: &str) -> Option<Holder> {
        Some(Holder::address(text.parse().unwrap()))
    }

    #[test]
    fn a_holder_may_hold_only_its_share_and_others_still_get_theirs() {
        let budget = BodyBudget::new(1000, 300);
        let client = [address("192.0.2.1"), Some(Holder::Key("fleet".into()))];
        let mut first = budget.share(client.clone());
        let mut second = budget.share(client.clone());
        assert!(first.cover(UNCOUNTED_BYTES + 200));
        assert!(
            !second.cover(UNCOUNTED_BYTES + 200),
            "past the address's and the key's share"
        );
        assert!(second.cover(UNCOUNTED_BYTES + 100), "up to the share");
        let same_key_elsewhere = [address("192.0.2.2"), Some(Holder::Key("fleet".into()))];
        assert!(
            !budget.share(same_key_elsewhere).cover(UNCOUNTED_BYTES + 1),
            "the key's share is spent"
        );
        let mut other = budget.share([address("192.0.2.3"), None]);
        assert!(other.cover(UNCOUNTED_BYTES + 300), "another client has its own share");
        assert_eq!(budget.held_by(client[0].as_ref().unwrap()), 300);
        drop((first, second));
        assert_eq!(budget.held_by(client[0].as_ref().unwrap()), 0);
        assert_eq!(budget.held_by(&Holder::Key("fleet".into())), 0);
        assert!(
            budget.lock_holders().len() == 1,
            "only the holder that still holds bytes is kept"
        );
        drop(other);
        assert!(budget.lock_holders().is_empty());
        assert_eq!(budget.in_flight(), 0);
    }

    #[test]
    fn an_ipv6_client_holds_its_share_as_its_64() {
        let budget = BodyBudget::new(1000, 300);
        let mut one = budget.share([address("2001:db8:1:2::1"), None]);
        assert!(one.cover(UNCOUNTED_BYTES + 300));
        assert!(!budget
            .share([address("2001:db8:1:2::ffff"), None])
            .cover(UNCOUNTED_BYTES + 1));
        assert!(budget
            .share([address("2001:db8:1:3::1"), None])
            .cover(UNCOUNTED_BYTES + 1));
    }

    #[test]
    fn parsing_takes_in_steps_and_the_last_step_may_be_short() {
        let budget = BodyBudget::new(PARSE_STEP_BYTES + 1000, PARSE_STEP_BYTES + 1000);
        let mut share = budget.share([address("192.0.2.1"), None]);
        assert!(share.cover(UNCOUNTED_BYTES + 100));
        assert!(share.take(10));
        assert_eq!(budget.in_flight(), 100 + PARSE_STEP_BYTES, "a whole step ahead");
        assert!(share.take(PARSE_STEP_BYTES - 10), "within the step already taken");
        assert_eq!(budget.in_flight(), 100 + PARSE_STEP_BYTES);
        assert!(share.take(900), "what is left, though a step would not fit");
        assert!(!share.take(1), "the budget is spent");
        assert_eq!(budget.in_flight(), PARSE_STEP_BYTES + 1000);
        drop(share);
        assert_eq!(budget.in_flight(), 0);
        assert!(budget.lock_holders().is_empty());
    }

    #[test]
    fn a_holders_share_is_a_fraction_of_the_budget_but_room_for_the_largest_request() {
        let mut settings = Settings::defaults();
        settings.limits.max_inflight_body_bytes = 1 << 30;
        settings.limits.max_body_bytes = 8 << 20;
        assert_eq!(
            BodyBudget::for_settings(&settings).holder_max_bytes(),
            (1 << 30) / 100 * 10
        );
        settings.limits.max_inflight_body_bytes = 256 << 20;
        let largest = largest_request_bytes(&settings);
        // Three bodies of 8 MiB, and 10 000 updates of 64 kept unknown fields each.
        assert!((32 << 20..48 << 20).contains(&largest), "{largest}");
        assert_eq!(BodyBudget::for_settings(&settings).holder_max_bytes(), largest);
        settings.limits.max_inflight_body_bytes = 16 << 20;
        assert_eq!(
            BodyBudget::for_settings(&settings).holder_max_bytes(),
            16 << 20,
            "never more than the whole"
        );
    }

    #[test]
    fn large_bodies_are_worked_on_one_per_core_but_one() {
        assert_eq!(parse_permits(1), 1);
        assert_eq!(parse_permits(2), 1);
        assert_eq!(parse_permits(8), 7);
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
