//! Progress of long work — the replay of the previous run's log at start-up, writing what was accepted at a
//! stop — logged at a steady pace: how much is done of how much, the rate, and the time left, so that an
//! operator watching a slow start or stop can tell a long wait from a stuck one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use crate::intake::feed::ReplayProgress;

/// The rate of some work, measured between one report and the next: a recent rate, so that the time left
/// follows a database that slows down or comes back, rather than an average over the whole run.
#[derive(Debug, Clone, Copy)]
pub struct Meter {
    last_at: Instant,
    last_done: u64,
}

impl Meter {
    /// Starts measuring from `done` units at `now`.
    pub fn new(done: u64, now: Instant) -> Self {
        Self {
            last_at: now,
            last_done: done,
        }
    }

    /// Units per second since the previous call (or since `new`); 0 when no time has passed.
    pub fn rate(&mut self, done: u64, now: Instant) -> f64 {
        let seconds = now.saturating_duration_since(self.last_at).as_secs_f64();
        let progress = done.saturating_sub(self.last_done);
        self.last_at = now;
        self.last_done = done;
        if seconds > 0.0 {
            progress as f64 / seconds
        } else {
            0.0
        }
    }
}

/// Whole seconds left for `remaining` units at `per_s`; `None` when nothing moves (the time left is unknown).
pub fn seconds_left(remaining: u64, per_s: f64) -> Option<u64> {
    if remaining == 0 {
        Some(0)
    } else if per_s > 0.0 {
        Some((remaining as f64 / per_s).ceil() as u64)
    } else {
        None
    }
}

/// `done` of `total` in percent, to one decimal (100 when there is nothing to do).
pub fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        (done.min(total) as f64 * 1000.0 / total as f64).round() / 10.0
    }
}

/// Logs each stream's start-up replay at once and then every `interval`, until every stream has read back the
/// previous run's log (each stream logs its own completion, in the feed).
pub async fn report_replay(replays: Vec<(&'static str, Arc<ReplayProgress>)>, interval: Duration) {
    let now = Instant::now();
    let mut meters: Vec<Meter> = replays
        .iter()
        .map(|(_, replay)| Meter::new(replay.snapshot().done_bytes, now))
        .collect();
    let mut first = true;
    loop {
        let now = Instant::now();
        let mut replaying = false;
        for ((stream, replay), meter) in replays.iter().zip(&mut meters) {
            let replay = replay.snapshot();
            let bytes_per_s = meter.rate(replay.done_bytes, now);
            if replay.finished {
                continue;
            }
            replaying = true;
            let remaining = replay.total_bytes.saturating_sub(replay.done_bytes);
            // The first report comes before anything could be measured: it gives the size of the work only.
            let (bytes_per_s, eta_s) = if first {
                (None, None)
            } else {
                (Some(bytes_per_s.round() as u64), seconds_left(remaining, bytes_per_s))
            };
            info!(
                stream = *stream,
                done_bytes = replay.done_bytes,
                total_bytes = replay.total_bytes,
                percent = percent(replay.done_bytes, replay.total_bytes),
                updates = replay.updates,
                bytes_per_s,
                eta_s,
                "replaying the write-ahead log"
            );
        }
        if !replaying {
            return;
        }
        first = false;
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_meter_measures_since_its_previous_reading() {
        let start = Instant::now();
        let mut meter = Meter::new(100, start);
        assert_eq!(meter.rate(300, start + Duration::from_secs(2)), 100.0);
        assert_eq!(meter.rate(300, start + Duration::from_secs(4)), 0.0);
        assert_eq!(meter.rate(400, start + Duration::from_secs(4)), 0.0, "no time passed");
    }

    #[test]
    fn the_time_left_is_unknown_only_while_nothing_moves() {
        assert_eq!(seconds_left(1000, 300.0), Some(4));
        assert_eq!(seconds_left(0, 0.0), Some(0));
        assert_eq!(seconds_left(1000, 0.0), None);
    }

    #[test]
    fn percent_has_one_decimal_and_nothing_to_do_is_done() {
        assert_eq!(percent(1, 3), 33.3);
        assert_eq!(percent(5, 5), 100.0);
        assert_eq!(percent(0, 0), 100.0);
        assert_eq!(percent(7, 5), 100.0);
    }
}
