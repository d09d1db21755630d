//! A batch writer: drains one stream's queue on its own OS thread, writes each due batch with binary `COPY`,
//! and retries a failed batch with capped exponential backoff until it is committed. A batch is never dropped:
//! while it waits, its updates keep their room in the queue, so the queue fills and the API answers 503.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use tokio::runtime::Handle;
use tracing::{debug, error, info, warn};

use super::batch::{Batch, BatchPolicy, Batcher};
use super::copy::{self, CopyRecord, LogPositions, WriteOutcome};
use super::delivery;
use super::source::{Received, Source};
use crate::metrics::StreamMetrics;

/// How long an idle writer sleeps in the queue before it looks at the closed flag again.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// How long a writer with a started batch lets updates gather before it looks again. A writer that waited in the
/// queue instead would be woken for every chunk, and each wake costs the request that sends it a system call and
/// the machine a context switch; a batch is due after many chunks anyway.
const LINGER: Duration = Duration::from_millis(2);

/// Capped exponential backoff between attempts at the same batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The wait before attempt `attempt + 1` (attempts count from 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1).min(16)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// How often a writer that keeps failing at its longest backoff says so again.
const STALL_REMINDER: Duration = Duration::from_secs(60);

/// What a writer shares with the rest of the gateway while it runs.
#[derive(Debug, Default)]
pub struct WriterState {
    /// Arrival of the oldest update the writer holds, as nanoseconds after [`epoch`] + 1; 0 when it holds none.
    oldest_held: AtomicU64,
    /// When the writer's current run of failed attempts began, encoded like `oldest_held`; 0 while it writes.
    failing_since: AtomicU64,
    /// Why the last attempt failed (see [`copy::CopyError::reason`]).
    failure_reason: Mutex<String>,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl WriterState {
    fn set_oldest(&self, at: Option<Instant>) {
        let encoded = at.map_or(0, |at| at.saturating_duration_since(epoch()).as_nanos() as u64 + 1);
        self.oldest_held.store(encoded, Ordering::Release);
    }

    fn set_failing(&self, since: Option<Instant>, reason: &str) {
        if since.is_some() {
            *self.failure_reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.to_owned();
        }
        let encoded = since.map_or(0, |at| at.saturating_duration_since(epoch()).as_nanos() as u64 + 1);
        self.failing_since.store(encoded, Ordering::Release);
    }

    /// How long the writer has failed to write its batch, and why; `None` while it writes.
    pub fn stall(&self, now: Instant) -> Option<(Duration, String)> {
        match self.failing_since.load(Ordering::Acquire) {
            0 => None,
            n => Some((
                now.saturating_duration_since(epoch() + Duration::from_nanos(n - 1)),
                self.failure_reason.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            )),
        }
    }

    /// How long the oldest update this writer holds has waited.
    pub fn oldest_age(&self, now: Instant) -> Option<Duration> {
        match self.oldest_held.load(Ordering::Acquire) {
            0 => None,
            n => Some(now.saturating_duration_since(epoch() + Duration::from_nanos(n - 1))),
        }
    }
}

/// A running writer.
pub struct WriterHandle {
    pub state: Arc<WriterState>,
    pub thread: JoinHandle<()>,
}

/// Drains one source (a slot of a queue) into PostgreSQL.
pub struct BatchWriter<S: Source> {
    /// Names the writer in logs: `<stream>-writer-<slot>`.
    pub name: String,
    /// The stream's name, as stored in `dead_letters` and `ingest_wal_progress`.
    pub stream: &'static str,
    /// The gateway's identity, under which its log positions are recorded.
    pub instance: Arc<str>,
    /// Whether batches keep the stream's "latest per key" table (`device_positions`) up to date.
    pub keep_latest: bool,
    pub source: S,
    pub policy: BatchPolicy,
    pub backoff: Backoff,
    pub pool: Pool,
    /// The database runtime: writers are plain threads and enter it only to do IO.
    pub runtime: Handle,
    pub metrics: StreamMetrics,
}

impl<S: Source> BatchWriter<S>
where
    S::Update: CopyRecord,
{
    /// Starts the writer on its own thread. It returns once the queue is closed and everything is written.
    pub fn spawn(self) -> std::io::Result<WriterHandle> {
        let state = Arc::new(WriterState::default());
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || self.run_restarting(&thread_state))?;
        Ok(WriterHandle { state, thread })
    }

    /// Runs the writer; one that panics outside a write is counted and started again. The chunks it held are
    /// dropped: their log segments are kept for the next start (updates held in memory only are lost).
    fn run_restarting(self, state: &WriterState) {
        while std::panic::catch_unwind(AssertUnwindSafe(|| self.run(state))).is_err() {
            self.metrics.writer_restarts.inc();
            error!(writer = %self.name, "batch writer panicked; restarted");
        }
    }

    fn run(&self, state: &WriterState) {
        let mut batcher = Batcher::new(self.policy);
        loop {
            if self.source.is_abandoned() {
                return;
            }
            let drained = self.fill(&mut batcher, state);
            if batcher.has_rows() {
                let batch = batcher.take();
                self.write(batch, state);
                state.set_oldest(batcher.oldest());
            }
            if drained && batcher.is_empty() {
                debug!(writer = %self.name, "queue drained, writer stops");
                return;
            }
        }
    }

    /// Takes chunks until the batch is due; returns whether the queue is closed and empty.
    fn fill(&self, batcher: &mut Batcher<S::Update>, state: &WriterState) -> bool {
        loop {
            let now = Instant::now();
            if batcher.is_due(now) {
                self.take_waiting(batcher, state);
                return false;
            }
            // The wait is capped so that a writer notices the queue closing even while its batch is young.
            let deadline = if self.source.is_closed() {
                now
            } else {
                batcher.deadline().map_or(now + IDLE_WAIT, |d| d.min(now + IDLE_WAIT))
            };
            match self.source.recv_until(deadline) {
                Received::Chunk(chunk) => {
                    let now = Instant::now();
                    batcher.push(chunk, now);
                    state.set_oldest(batcher.oldest());
                    if self.source.is_empty() && !batcher.is_due(now) && !self.source.is_closed() {
                        let until_due = batcher.deadline().map_or(LINGER, |d| d.saturating_duration_since(now));
                        std::thread::sleep(LINGER.min(until_due));
                    }
                }
                Received::Timeout if batcher.has_rows() && self.source.is_closed() => return false,
                Received::Timeout => {}
                Received::Drained => return true,
            }
        }
    }

    /// Adds to a due batch every chunk already waiting in the slot, up to a full batch, without waiting for more.
    /// A batch made due by a request that waits for its commit then carries every request that queued while the
    /// previous batch was being written: they share one transaction instead of each waiting for its own, so
    /// answer-after-commit scales with the batch, not with PostgreSQL's commits per second.
    fn take_waiting(&self, batcher: &mut Batcher<S::Update>, state: &WriterState) {
        while !batcher.is_full() && !self.source.is_empty() {
            match self.source.recv_until(Instant::now()) {
                Received::Chunk(chunk) => {
                    batcher.push(chunk, Instant::now());
                    state.set_oldest(batcher.oldest());
                }
                Received::Timeout | Received::Drained => return,
            }
        }
    }

    /// Writes one batch, retrying until it is committed (or the stop gives up), then tells everyone who waits.
    fn write(&self, batch: Batch<S::Update>, state: &WriterState) {
        let checkpoints = delivery::last_per_slot(batch.parts.iter().filter_map(|p| p.delivery.as_deref()));
        let mut attempt = 1u32;
        let mut failing_since = None;
        let mut last_said: Option<(Duration, Instant)> = None;
        let outcome = loop {
            if self.source.is_abandoned() {
                warn!(writer = %self.name, rows = batch.rows.len(), "stop timed out; batch left unwritten");
                // Dropping the parts uncommitted keeps their log segments for the next start.
                return;
            }
            let positions = LogPositions {
                instance: &self.instance,
                checkpoints: &checkpoints,
            };
            // A panic in an attempt (a bug, or a library's) is a failed attempt: the batch is kept and retried.
            let attempted = std::panic::catch_unwind(AssertUnwindSafe(|| {
                self.runtime.block_on(copy::write_batch(
                    &self.pool,
                    self.stream,
                    &batch.rows,
                    positions,
                    self.keep_latest,
                ))
            }));
            let (reason, message) = match attempted {
                Ok(Ok(outcome)) => break outcome,
                Ok(Err(error)) => (error.reason(), error_chain(&error)),
                Err(_) => {
                    self.metrics.writer_restarts.inc();
                    ("panic".to_owned(), "the batch write panicked".to_owned())
                }
            };
            self.metrics.batch_failures.inc();
            let now = Instant::now();
            let since = *failing_since.get_or_insert(now);
            state.set_failing(Some(since), &reason);
            let delay = self.backoff.delay(attempt);
            // Said once per backoff step, then once a minute at the longest: a long outage is a few lines, not one
            // per attempt.
            let say = match last_said {
                Some((said_delay, at)) => said_delay != delay || now.duration_since(at) >= STALL_REMINDER,
                None => true,
            };
            if say {
                last_said = Some((delay, now));
                warn!(
                    writer = %self.name,
                    rows = batch.rows.len(),
                    attempt,
                    failing_for_s = now.duration_since(since).as_secs(),
                    reason = %reason,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %message,
                    "batch write failed, retrying"
                );
            }
            std::thread::sleep(delay);
            attempt = attempt.saturating_add(1);
        };
        if failing_since.is_some() {
            state.set_failing(None, "");
            info!(writer = %self.name, attempts = attempt, "batch written after failures; the writer is back");
        }
        self.record_success(batch.rows.len(), &outcome);
        let bytes = batch.parts.iter().map(|p| p.bytes).sum();
        for part in batch.parts {
            if let Some(delivery) = part.delivery {
                delivery.committed();
            }
            if let Some(waiter) = part.commit {
                waiter.committed(part.rows);
            }
        }
        self.source.committed(batch.rows.len(), bytes);
    }

    fn record_success(&self, rows: usize, outcome: &WriteOutcome) {
        let m = &self.metrics;
        let elapsed = outcome.elapsed;
        m.written.inc_by(outcome.inserted);
        m.duplicates.inc_by(outcome.duplicates);
        m.conflicting.inc_by(outcome.conflicting);
        m.dead_lettered.inc_by(outcome.dead_lettered);
        m.batches_written.inc();
        m.last_batch_rows.set(rows as i64);
        m.last_batch_duration.set(elapsed.as_secs_f64());
        m.last_batch_timestamp.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        m.batch_rows.observe(rows as f64);
        m.batch_write_duration.observe(elapsed.as_secs_f64());
        debug!(
            writer = %self.name,
            rows,
            inserted = outcome.inserted,
            duplicates = outcome.duplicates,
            conflicting = outcome.conflicting,
            dead_lettered = outcome.dead_lettered,
            elapsed_ms = elapsed.as_millis() as u64,
            "batch written"
        );
    }
}

/// An error and its causes on one line: `copy failed: db error: connection refused`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::pipeline::queue::{Chunk, CommitWaiter};
    use std::sync::atomic::AtomicUsize;

    /// A source that panics on its first read, then reports itself drained.
    struct PanicsOnce {
        reads: AtomicUsize,
    }

    impl Source for PanicsOnce {
        type Update = crate::model::LocationUpdate;
        fn recv_until(&self, _deadline: Instant) -> Received<Self::Update> {
            if self.reads.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("a bug in the source");
            }
            Received::Drained
        }
        fn is_empty(&self) -> bool {
            true
        }
        fn committed(&self, _n: usize, _bytes: usize) {}
        fn is_closed(&self) -> bool {
            false
        }
        fn is_abandoned(&self) -> bool {
            false
        }
    }

    /// A runtime for a writer, and a pool that is never asked for a connection in these tests.
    fn runtime_and_unconnected_pool() -> (tokio::runtime::Runtime, Pool) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pool = {
            let _inside = runtime.enter();
            crate::db::pool::build(tokio_postgres::Config::new(), &crate::db::DatabaseTls::off(), 1).unwrap()
        };
        (runtime, pool)
    }

    #[test]
    fn a_writer_that_panics_is_restarted_and_counted() {
        let (runtime, pool) = runtime_and_unconnected_pool();
        let metrics = Metrics::new().unwrap().location;
        let writer = BatchWriter {
            name: "location-writer-0".into(),
            stream: "location",
            instance: "test".into(),
            keep_latest: false,
            source: PanicsOnce {
                reads: AtomicUsize::new(0),
            },
            policy: BatchPolicy {
                max_rows: 10,
                flush_interval: Duration::from_secs(1),
            },
            backoff: Backoff::default(),
            pool,
            runtime: runtime.handle().clone(),
            metrics: metrics.clone(),
        };
        let handle = writer.spawn().unwrap();
        handle.thread.join().expect("the panic stays inside the writer");
        assert_eq!(metrics.writer_restarts.get(), 1);
    }

    #[test]
    fn a_batch_due_for_a_waiting_request_takes_every_request_already_queued() {
        let (runtime, pool) = runtime_and_unconnected_pool();
        let update = crate::model::LocationUpdate::at_epoch;
        let queue = crate::pipeline::queue::bounded(100, usize::MAX, 1);
        let (waiter, _committed) = CommitWaiter::new(1);
        queue
            .try_push(Chunk {
                commit: Some(waiter),
                ..Chunk::in_memory(vec![update("1")])
            })
            .unwrap();
        // Queued while the previous batch was being written: they go in the same transaction.
        queue
            .try_push(Chunk::in_memory(vec![update("2"), update("3")]))
            .unwrap();
        queue.try_push(Chunk::in_memory(vec![update("4")])).unwrap();
        let writer = BatchWriter {
            name: "location-writer-0".into(),
            stream: "location",
            instance: "test".into(),
            keep_latest: false,
            source: queue.receiver(0),
            policy: BatchPolicy {
                max_rows: 3,
                flush_interval: Duration::from_secs(3600),
            },
            backoff: Backoff::default(),
            pool,
            runtime: runtime.handle().clone(),
            metrics: Metrics::new().unwrap().location,
        };
        let mut batcher = Batcher::new(writer.policy);
        let state = WriterState::default();
        assert!(!writer.fill(&mut batcher, &state));
        let devices =
            |rows: Vec<crate::model::LocationUpdate>| rows.into_iter().map(|u| u.device_id).collect::<Vec<_>>();
        assert_eq!(
            devices(batcher.take().rows),
            ["1", "2", "3"],
            "up to a full batch, at once"
        );
        assert!(batcher.is_empty(), "the fourth waits for the next batch");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        let delays: Vec<_> = (1..=8).map(|a| b.delay(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(5));
    }
}
