//! Rate limits in updates per second, per API key and per client address, with governor's GCRA: a request of
//! N updates takes N cells at once, or none.
//!
//! A request holding more updates than the burst could never pass, however long it waited, so it is refused
//! with `413` (split it) rather than `429` (which a client would retry for ever).
//!
//! A request takes one cell before its body is read, so that a client whose allowance is spent is refused before
//! the gateway does any work for it, and the rest of its cells once its updates are counted
//! ([`KeyLimiter::admit_remainder`]): every request costs at least one cell, whatever becomes of its body.
//!
//! Each API key gets a direct limiter of its own (one atomic, no lock), because keys may each have their own
//! rate; client addresses, an open set under one rate, share one keyed limiter whose idle entries are swept
//! as it is used, so that its memory stays bounded by the addresses recently seen.
//!
//! Failed key checks are counted per client address apart ([`AuthFailures`]): past a few a minute, the address is
//! refused before any key is looked up, so that keys cannot be guessed at the gateway's speed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

use crate::config::RateLimit;

/// Address checks between two sweeps of the addresses whose allowance is full again.
const SWEEP_EVERY_CHECKS: u64 = 1024;

/// Why a request may not pass now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateRefusal {
    /// Over the rate: enough allowance is back after this many seconds (rounded up, at least 1).
    Wait { retry_after_secs: u64 },
    /// More updates than the burst: it never passes; the client must split it.
    LargerThanBurst { burst: u32 },
}

fn quota(rate: RateLimit) -> Quota {
    Quota::per_second(rate.per_second).allow_burst(rate.burst)
}

/// Seconds for a `Retry-After` header: whole seconds, rounded up, never 0 (which would invite a busy loop).
fn retry_after_secs(wait: Duration) -> u64 {
    let whole = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    whole.max(1)
}

/// The outcome of governor's `check_n` / `check_key_n`, as a refusal or not.
fn decide<P: governor::clock::Reference>(
    outcome: Result<Result<(), governor::NotUntil<P>>, governor::InsufficientCapacity>,
    now: P,
    burst: NonZeroU32,
) -> Result<(), RateRefusal> {
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(RateRefusal::Wait {
            retry_after_secs: retry_after_secs(not_until.wait_time_from(now)),
        }),
        Err(governor::InsufficientCapacity(_)) => Err(RateRefusal::LargerThanBurst { burst: burst.get() }),
    }
}

/// One API key's allowance.
pub struct KeyLimiter {
    rate: RateLimit,
    limiter: DefaultDirectRateLimiter,
}

impl KeyLimiter {
    pub fn new(rate: RateLimit) -> Self {
        KeyLimiter {
            rate,
            limiter: DefaultDirectRateLimiter::direct(quota(rate)),
        }
    }

    /// The rate this limiter keeps (a reload keeps a key's limiter, and so its state, while this is unchanged).
    pub fn rate(&self) -> RateLimit {
        self.rate
    }

    /// Takes `updates` cells, or none; an empty request passes.
    pub fn admit(&self, updates: usize) -> Result<(), RateRefusal> {
        let Some(n) = cells(updates) else { return Ok(()) };
        let outcome = self.limiter.check_n(n);
        decide(outcome, self.limiter.clock().now(), self.rate.burst)
    }

    /// Takes the rest of a request of `updates` updates whose first cell was taken before its body was read.
    pub fn admit_remainder(&self, updates: usize) -> Result<(), RateRefusal> {
        remainder(updates, self.rate.burst, |n| {
            let outcome = self.limiter.check_n(n);
            decide(outcome, self.limiter.clock().now(), self.rate.burst)
        })
    }
}

/// What a request of `updates` updates still owes once its first cell is taken, asked of `check` (cells → the
/// limiter's answer). A request over the burst is refused whole (the burst counts its first cell too), and a
/// refusal tells the time until the whole request, first cell included, would pass: its retry pays both again.
fn remainder(
    updates: usize,
    burst: NonZeroU32,
    check: impl Fn(NonZeroU32) -> Result<(), RateRefusal>,
) -> Result<(), RateRefusal> {
    if updates > burst.get() as usize {
        return Err(RateRefusal::LargerThanBurst { burst: burst.get() });
    }
    let Some(rest) = cells(updates.saturating_sub(1)) else {
        return Ok(());
    };
    match check(rest) {
        Err(RateRefusal::Wait { .. }) => match cells(updates).map(&check) {
            Some(Err(wait @ RateRefusal::Wait { .. })) => Err(wait),
            // The whole request cannot pass when its rest cannot: no answer of this kind comes.
            _ => Err(RateRefusal::Wait { retry_after_secs: 1 }),
        },
        other => other,
    }
}

/// Every client address's allowance under one rate.
pub struct AddressLimiter {
    rate: RateLimit,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    checks: AtomicU64,
}

impl AddressLimiter {
    pub fn new(rate: RateLimit) -> Self {
        AddressLimiter {
            rate,
            limiter: DefaultKeyedRateLimiter::keyed(quota(rate)),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes `updates` cells from `address`'s allowance, or none.
    pub fn admit(&self, address: IpAddr, updates: usize) -> Result<(), RateRefusal> {
        let Some(n) = cells(updates) else { return Ok(()) };
        self.check(address, n)
    }

    /// Takes the rest of a request of `updates` updates from `address`'s allowance, as
    /// [`KeyLimiter::admit_remainder`] does.
    pub fn admit_remainder(&self, address: IpAddr, updates: usize) -> Result<(), RateRefusal> {
        remainder(updates, self.rate.burst, |n| self.check(address, n))
    }

    fn check(&self, address: IpAddr, n: NonZeroU32) -> Result<(), RateRefusal> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY_CHECKS == SWEEP_EVERY_CHECKS - 1 {
            self.limiter.retain_recent();
        }
        let outcome = self.limiter.check_key_n(&client(address), n);
        decide(outcome, self.limiter.clock().now(), self.rate.burst)
    }

    /// Addresses with allowance in use (for tests of the sweep).
    pub fn tracked_addresses(&self) -> usize {
        self.limiter.len()
    }
}

/// How long failed key checks are counted together.
const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Failed key checks (401s) per client address, in windows of a minute: past `max_per_minute` in one, the address
/// is refused until the window ends. A fixed window rather than a bucket, so that whether an address is refused can
/// be asked without taking anything.
pub struct AuthFailures {
    /// 0: never refused.
    max_per_minute: u32,
    windows: Mutex<HashMap<IpAddr, FailureWindow>>,
    /// Addresses with a window, read without the lock: while none has failed, a check costs one atomic load.
    tracked: AtomicUsize,
    records: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct FailureWindow {
    started: Instant,
    failures: u32,
}

impl AuthFailures {
    pub fn new(max_per_minute: u32) -> Self {
        AuthFailures {
            max_per_minute,
            windows: Mutex::new(HashMap::new()),
            tracked: AtomicUsize::new(0),
            records: AtomicU64::new(0),
        }
    }

    /// Whether `address` may have its key looked up now; when not, the seconds until it may (at least 1).
    pub fn check(&self, address: IpAddr) -> Result<(), u64> {
        self.check_at(address, Instant::now())
    }

    /// Counts a failed key check of `address`.
    pub fn record(&self, address: IpAddr) {
        self.record_at(address, Instant::now());
    }

    fn check_at(&self, address: IpAddr, now: Instant) -> Result<(), u64> {
        if self.max_per_minute == 0 || self.tracked.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let windows = self.lock();
        match windows.get(&client(address)) {
            Some(w) if w.failures >= self.max_per_minute && now < w.started + AUTH_FAILURE_WINDOW => {
                Err(retry_after_secs(w.started + AUTH_FAILURE_WINDOW - now))
            }
            _ => Ok(()),
        }
    }

    fn record_at(&self, address: IpAddr, now: Instant) {
        if self.max_per_minute == 0 {
            return;
        }
        let mut windows = self.lock();
        if self.records.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY_CHECKS == SWEEP_EVERY_CHECKS - 1 {
            windows.retain(|_, w| now < w.started + AUTH_FAILURE_WINDOW);
        }
        let window = windows.entry(client(address)).or_insert(FailureWindow {
            started: now,
            failures: 0,
        });
        if now >= window.started + AUTH_FAILURE_WINDOW {
            *window = FailureWindow {
                started: now,
                failures: 0,
            };
        }
        window.failures = window.failures.saturating_add(1);
        self.tracked.store(windows.len(), Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, FailureWindow>> {
        // Windows are replaced whole: one a panic interrupted is still sound.
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Addresses with a window (for tests of the sweep).
    pub fn tracked_addresses(&self) -> usize {
        self.lock().len()
    }
}

/// The client an address stands for: an IPv4 address, or an IPv6 /64 — one host usually holds a whole /64, and
/// counting each of its addresses apart would let it rotate past the limit.
pub(super) fn client(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// The client a request comes from. When the TCP peer is a trusted proxy, `X-Forwarded-For` (every value, in
/// order; each proxy appends the address it got the request from) is read from the right: the first address that
/// is not a trusted proxy is the client. Entries left of it were written by the client itself and are not
/// believed, and an entry that is not an address ends the walk at the last proxy that could be trusted.
pub fn client_address<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    let is_trusted = |address: &IpAddr| trusted.iter().any(|net| net.contains(&canonical(*address)));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    for entry in forwarded_for.rev().flat_map(|value| value.rsplit(',')) {
        let Some(address) = parse_forwarded(entry.trim()) else {
            break;
        };
        client = address;
        if !is_trusted(&address) {
            break;
        }
    }
    client
}

/// An address of `X-Forwarded-For`: bare, or as some proxies write it, with a port (`192.0.2.1:5000`,
/// `[2001:db8::1]:5000`).
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    entry
        .parse()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

/// An IPv4 client reaching an IPv6 socket arrives as `::ffff:a.b.c.d`; ranges are written for the IPv4 form.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        IpAddr::V4(_) => address,
    }
}

/// `updates` as governor cells; `None` for an empty request, which costs nothing.
fn cells(updates: usize) -> Option<NonZeroU32> {
    // More than u32::MAX updates cannot pass any burst, and saturating keeps that true.
    NonZeroU32::new(u32::try_from(updates).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(text: &str) -> RateLimit {
        text.parse().unwrap()
    }

    #[test]
    fn a_request_takes_as_many_cells_as_it_has_updates() {
        let limiter = KeyLimiter::new(rate("1:10"));
        assert_eq!(limiter.admit(6), Ok(()));
        assert_eq!(limiter.admit(4), Ok(()));
        assert_eq!(limiter.admit(1), Err(RateRefusal::Wait { retry_after_secs: 1 }));
    }

    #[test]
    fn retry_after_covers_the_whole_request_rounded_up() {
        let limiter = KeyLimiter::new(rate("2:10"));
        assert_eq!(limiter.admit(10), Ok(()));
        // 5 updates at 2 per second: 2.5 s, said as 3.
        assert_eq!(limiter.admit(5), Err(RateRefusal::Wait { retry_after_secs: 3 }));
    }

    #[test]
    fn a_request_larger_than_the_burst_never_passes() {
        let limiter = KeyLimiter::new(rate("100:50"));
        assert_eq!(limiter.admit(51), Err(RateRefusal::LargerThanBurst { burst: 50 }));
        // And it took nothing.
        assert_eq!(limiter.admit(50), Ok(()));
    }

    #[test]
    fn an_empty_request_costs_nothing() {
        let limiter = KeyLimiter::new(rate("1:1"));
        assert_eq!(limiter.admit(1), Ok(()));
        assert_eq!(limiter.admit(0), Ok(()));
    }

    #[test]
    fn addresses_have_separate_allowances_and_an_ipv6_client_is_its_64() {
        let limiter = AddressLimiter::new(rate("1:2"));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(limiter.admit(a, 2), Ok(()));
        assert!(limiter.admit(a, 1).is_err());
        assert_eq!(limiter.admit(b, 2), Ok(()));
        let v6_one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6_other: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(limiter.admit(v6_one, 2), Ok(()));
        assert!(limiter.admit(v6_other, 1).is_err());
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(limiter.admit(mapped, 1).is_err());
    }

    #[test]
    fn idle_addresses_are_swept() {
        let limiter = AddressLimiter::new(rate("1000000:1"));
        for i in 0..(SWEEP_EVERY_CHECKS * 2) {
            let address = IpAddr::from(std::net::Ipv4Addr::from(i as u32));
            let _ = limiter.admit(address, 1);
        }
        // At a million per second, every address is full again within microseconds: the sweeps dropped them.
        std::thread::sleep(Duration::from_millis(5));
        let _ = limiter.admit(IpAddr::from([10, 0, 0, 1]), 1);
        assert!(
            limiter.tracked_addresses() < SWEEP_EVERY_CHECKS as usize + 2,
            "{}",
            limiter.tracked_addresses()
        );
    }

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
        let trusted = nets(&["10.0.0.0/8"]);
        let stranger: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(
            client_address(stranger, ["198.51.100.1"].into_iter(), &trusted),
            stranger
        );
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let client: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(client_address(proxy, ["198.51.100.1"].into_iter(), &trusted), client);
        // A proxy that got the request over IPv6 from an IPv4 client.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(client_address(mapped, ["198.51.100.1"].into_iter(), &trusted), client);
        // No header: the proxy itself.
        assert_eq!(client_address(proxy, std::iter::empty(), &trusted), proxy);
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_client_and_what_the_client_wrote_is_ignored() {
        let trusted = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let client: IpAddr = "198.51.100.7".parse().unwrap();
        // The client forged "1.2.3.4"; two proxies of ours appended what they saw.
        let headers = ["1.2.3.4, 198.51.100.7", "10.0.0.2"];
        assert_eq!(client_address(proxy, headers.into_iter(), &trusted), client);
        assert_eq!(
            client_address(proxy, ["[2001:db8::5]:443, 198.51.100.7:5000"].into_iter(), &trusted),
            client
        );
        // Garbage stops the walk at the last proxy that could be trusted.
        let second: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            client_address(proxy, ["198.51.100.7, nonsense, 10.0.0.2"].into_iter(), &trusted),
            second
        );
    }

    #[test]
    fn a_request_pays_its_first_cell_before_its_body_and_the_rest_after() {
        let limiter = KeyLimiter::new(rate("1:5"));
        assert_eq!(limiter.admit(1), Ok(()));
        assert_eq!(limiter.admit_remainder(5), Ok(()), "4 more: the burst");
        assert_eq!(limiter.admit(1), Err(RateRefusal::Wait { retry_after_secs: 1 }));
        let limiter = KeyLimiter::new(rate("1:5"));
        assert_eq!(limiter.admit(1), Ok(()));
        assert_eq!(limiter.admit_remainder(1), Ok(()), "a single update owes nothing more");
        assert_eq!(limiter.admit_remainder(0), Ok(()), "nor does an empty body");
        assert_eq!(limiter.admit(4), Ok(()));
    }

    #[test]
    fn a_request_over_the_burst_is_refused_whole_after_its_first_cell() {
        let limiter = KeyLimiter::new(rate("100:5"));
        assert_eq!(limiter.admit(1), Ok(()));
        assert_eq!(
            limiter.admit_remainder(6),
            Err(RateRefusal::LargerThanBurst { burst: 5 })
        );
        assert_eq!(limiter.admit(4), Ok(()), "only the first cell was taken");
        let addresses = AddressLimiter::new(rate("100:5"));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            addresses.admit_remainder(a, 6),
            Err(RateRefusal::LargerThanBurst { burst: 5 })
        );
    }

    #[test]
    fn a_refused_rest_says_when_the_whole_request_would_pass() {
        let limiter = KeyLimiter::new(rate("1:10"));
        assert_eq!(limiter.admit(7), Ok(()));
        assert_eq!(limiter.admit(1), Ok(()));
        // 3 cells were left, one is taken: the rest of 5 (4) waits 2 s, the whole 5 again 3 s.
        assert_eq!(
            limiter.admit_remainder(5),
            Err(RateRefusal::Wait { retry_after_secs: 3 })
        );
        let addresses = AddressLimiter::new(rate("1:10"));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(addresses.admit(a, 8), Ok(()));
        assert_eq!(
            addresses.admit_remainder(a, 5),
            Err(RateRefusal::Wait { retry_after_secs: 3 })
        );
    }

    #[test]
    fn an_address_past_its_failures_is_refused_until_its_minute_ends() {
        let failures = AuthFailures::new(3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let start = Instant::now();
        assert_eq!(failures.check_at(a, start), Ok(()));
        for _ in 0..3 {
            failures.record_at(a, start);
        }
        assert_eq!(failures.check_at(a, start + Duration::from_secs(20)), Err(40));
        assert_eq!(failures.check_at(b, start), Ok(()), "another address is not refused");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        for _ in 0..3 {
            failures.record_at(v6, start);
        }
        assert!(
            failures.check_at("2001:db8::ffff".parse().unwrap(), start).is_err(),
            "the same /64"
        );
        assert_eq!(
            failures.check_at(a, start + AUTH_FAILURE_WINDOW),
            Ok(()),
            "a new minute"
        );
        failures.record_at(a, start + AUTH_FAILURE_WINDOW);
        assert_eq!(
            failures.check_at(a, start + AUTH_FAILURE_WINDOW),
            Ok(()),
            "counted afresh"
        );
        let off = AuthFailures::new(0);
        for _ in 0..10 {
            off.record_at(a, start);
        }
        assert_eq!(off.check_at(a, start), Ok(()));
    }

    #[test]
    fn addresses_whose_minute_has_ended_are_swept() {
        let failures = AuthFailures::new(3);
        let start = Instant::now();
        for i in 0..(SWEEP_EVERY_CHECKS * 2) {
            failures.record_at(IpAddr::from(std::net::Ipv4Addr::from(i as u32)), start);
        }
        failures.record_at(IpAddr::from([10, 0, 0, 1]), start + AUTH_FAILURE_WINDOW * 2);
        let later = start + AUTH_FAILURE_WINDOW * 2;
        for i in 0..SWEEP_EVERY_CHECKS {
            failures.record_at(IpAddr::from([10, 1, (i >> 8) as u8, i as u8]), later);
        }
        assert!(
            failures.tracked_addresses() <= SWEEP_EVERY_CHECKS as usize + 1,
            "{}",
            failures.tracked_addresses()
        );
    }

    #[test]
    fn retry_after_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
    }
}
