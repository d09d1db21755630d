//! The intake: where validated updates are handed over, whatever transport brought them. It decides what a `202`
//! promises and keeps that promise: [`Intake::submit`] returns only once the updates are as safe as the gateway's
//! durability says (in memory, or fsynced in the write-ahead log), or committed in PostgreSQL when asked.
//!
//! - [`log`]: the write-ahead-log backend: append, group commit, then hand the updates on.
//! - [`feed`]: from the log to the queue, and the backlog read back when the writers fall behind or after a
//!   restart.
//! - [`record`]: the binary record a request becomes in the log.
//! - [`jetstream`]: the NATS JetStream backend: publishing sharded messages (a `202` once JetStream acknowledged
//!   them) and, for the writers, the shard consumers that feed the queue.

pub mod feed;
pub mod jetstream;
pub mod log;
pub mod record;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::StreamMetrics;
use crate::model::Update;
use crate::pipeline::{Chunk, CommitWaiter, PushError, StreamQueue, WriterState};
use crate::wal::Wal;
use feed::{LogFeed, ReplayProgress, ReplaySnapshot};
use record::RecordCodec;

/// How long a request waits for room in a full queue before its updates go to the write-ahead log's backlog
/// instead. Long enough for a batch or two to commit, so that clients faster than PostgreSQL are paced by their
/// answers; short, so that nobody is held for long.
const FULL_QUEUE_WAIT: Duration = Duration::from_millis(250);

/// When a submission is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Once the updates are as durable as the gateway promises (memory or log).
    Durable,
    /// Once the updates are committed in PostgreSQL.
    Committed,
}

/// What an accepted submission got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub updates: usize,
    /// With [`Ack::Committed`]: whether the updates were committed in PostgreSQL within the commit wait (when not,
    /// they are durable as the gateway promises, and committed later). `None` when the commit was not asked for.
    pub committed: Option<bool>,
}

/// Why a submission was refused; nothing of it is kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the gateway is stopping")]
    ShuttingDown,
    #[error("the queue is full")]
    Overloaded,
    /// Without the log, a submission larger than the whole queue could never be taken: no retry helps.
    #[error("more updates than the queue holds ({limit})")]
    LargerThanQueue { limit: usize },
    #[error("the write-ahead log is full")]
    LogFull,
    #[error("the write-ahead log could not be written: {0}")]
    LogWrite(String),
    /// The shared queue (JetStream) did not store the updates: unreachable, no quorum, full or too slow.
    #[error("the queue server did not store the updates: {0}")]
    Unavailable(String),
}

/// Open while the gateway takes updates; closed once, when it starts to stop. Shared by every stream.
#[derive(Debug, Clone, Default)]
pub struct Gate {
    closed: Arc<AtomicBool>,
}

impl Gate {
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// From now on every submission is refused with [`SubmitError::ShuttingDown`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// One stream's intake: its queue, the log (when updates are made durable there) and the log's feed.
pub struct Intake<T> {
    queue: Arc<StreamQueue<T>>,
    /// The log every submission is appended to; `None` when a `202` promises memory only.
    wal: Option<Arc<Wal>>,
    /// Hands logged updates to the queue, or keeps them on disk while the writers are behind; also replays the
    /// log a previous run left, whatever the durability now.
    feed: Arc<LogFeed<T>>,
    gate: Gate,
    metrics: StreamMetrics,
    /// The writers draining the queue, for the age of the oldest update not yet written.
    writers: Vec<Arc<WriterState>>,
    /// Longest a submission waits for its commit ([`Ack::Committed`]).
    commit_wait: Duration,
    /// Set with `INGEST_QUEUE=jetstream`: submissions are published there instead of queued here.
    publisher: Option<Box<dyn jetstream::publish::Publish<T>>>,
}

impl<T: Update + RecordCodec> Intake<T> {
    pub fn new(
        queue: Arc<StreamQueue<T>>,
        wal: Option<Arc<Wal>>,
        feed: Arc<LogFeed<T>>,
        gate: Gate,
        metrics: StreamMetrics,
        writers: Vec<Arc<WriterState>>,
        commit_wait: Duration,
    ) -> Self {
        Self {
            queue,
            wal,
            feed,
            gate,
            metrics,
            writers,
            commit_wait,
            publisher: None,
        }
    }

    /// Submissions go to JetStream from now on (the queue is then fed by the shard consumers, if any).
    pub fn with_publisher(mut self, publisher: Box<dyn jetstream::publish::Publish<T>>) -> Self {
        self.publisher = Some(publisher);
        self
    }

    /// Whether the queue server (JetStream) is reachable; always with the local queue.
    pub fn queue_reachable(&self) -> bool {
        self.publisher.as_ref().is_none_or(|p| p.is_connected())
    }

    /// The stream's queue, which the writers drain.
    pub fn queue(&self) -> &Arc<StreamQueue<T>> {
        &self.queue
    }

    /// Whether submissions are taken; lets a transport refuse before it reads a body.
    pub fn is_accepting(&self) -> bool {
        self.gate.is_open()
    }

    /// Takes `updates` whole or not at all, and answers as `ack` asks.
    pub async fn submit(&self, updates: Vec<T>, ack: Ack) -> Result<Receipt, SubmitError> {
        if !self.gate.is_open() {
            return Err(SubmitError::ShuttingDown);
        }
        let count = updates.len();
        if count == 0 {
            let committed = (ack == Ack::Committed).then_some(true);
            return Ok(Receipt { updates: 0, committed });
        }
        if let Some(publisher) = &self.publisher {
            return self.publish(publisher.as_ref(), updates, ack).await;
        }
        let (waiter, commit) = match ack {
            Ack::Committed => {
                let (waiter, commit) = CommitWaiter::new(count);
                (Some(waiter), Some(commit))
            }
            Ack::Durable => (None, None),
        };
        match &self.wal {
            None => {
                if count > self.queue.capacity() {
                    return Err(SubmitError::LargerThanQueue {
                        limit: self.queue.capacity(),
                    });
                }
                let bytes = memory_bytes(&updates);
                let reservation = self.queue.reserve(count, bytes).map_err(push_error)?;
                reservation.push(Chunk {
                    updates,
                    bytes,
                    delivery: None,
                    commit: waiter,
                });
            }
            Some(wal) => log::submit(wal, &self.queue, &self.feed, updates, waiter, FULL_QUEUE_WAIT).await?,
        }
        let committed = match commit {
            // Bounded, so that a request does not wait as long as PostgreSQL is away: past the wait, the answer says
            // the updates are accepted but not yet committed.
            Some(commit) => match tokio::time::timeout(self.commit_wait, commit).await {
                Ok(Ok(())) => Some(true),
                // The writers drain everything before the process stops, so the waiter is dropped unanswered only
                // when the stop timed out: the updates may still be written from the log at the next start.
                Ok(Err(_)) => return Err(SubmitError::ShuttingDown),
                Err(_) => Some(false),
            },
            None => None,
        };
        Ok(Receipt {
            updates: count,
            committed,
        })
    }

    /// The JetStream path: answered once JetStream stored every update; with [`Ack::Committed`], then waits for
    /// the writers' commit notices (see [`jetstream::consume`]) up to the commit wait.
    async fn publish(
        &self,
        publisher: &dyn jetstream::publish::Publish<T>,
        updates: Vec<T>,
        ack: Ack,
    ) -> Result<Receipt, SubmitError> {
        let count = updates.len();
        let published = publisher.publish(updates, ack == Ack::Committed).await?;
        let committed = match published.commits {
            Some(notices) => {
                // Messages JetStream already held came from an earlier request: whether they are committed is not
                // known here, so the answer cannot say they are. Only signed notices for this request's messages
                // count (see `jetstream::publish::CommitNotices`).
                let done = notices.wait(self.commit_wait).await;
                Some(done && published.duplicates == 0)
            }
            None => None,
        };
        Ok(Receipt {
            updates: count,
            committed,
        })
    }

    /// Updates in the queue (accepted, not yet committed) and its capacity.
    pub fn queue_fill(&self) -> (usize, usize) {
        (self.queue.pending(), self.queue.capacity())
    }

    pub fn metrics(&self) -> &StreamMetrics {
        &self.metrics
    }

    /// How far the replay of the log the previous run left has come.
    pub fn replay_progress(&self) -> &Arc<ReplayProgress> {
        self.feed.replay()
    }

    /// Whether the log the previous run left is still being read back.
    pub fn is_replaying(&self) -> bool {
        !self.feed.replay().is_finished()
    }

    pub fn replay(&self) -> ReplaySnapshot {
        self.feed.replay().snapshot()
    }

    /// Brings the gauges that are read, not counted, up to date; called before `/stats` and `/metrics` answer.
    pub fn refresh_gauges(&self) {
        self.metrics.queue_depth.set(self.queue.pending() as i64);
        self.metrics.queue_capacity.set(self.queue.capacity() as i64);
        self.metrics.backlog_bytes.set(self.feed.backlog_bytes() as i64);
        let replay = self.replay();
        self.metrics
            .replay_remaining_bytes
            .set(replay.total_bytes.saturating_sub(replay.done_bytes) as i64);
        let now = Instant::now();
        let oldest = self
            .writers
            .iter()
            .filter_map(|w| w.oldest_age(now))
            .max()
            .unwrap_or_default();
        self.metrics.oldest_pending_age.set(oldest.as_secs_f64());
        let stall = self.writer_stall();
        self.metrics
            .stalled
            .set(stall.as_ref().map(|(d, reason)| (d.as_secs_f64(), reason.as_str())));
    }

    /// How long this stream's writers have failed to write, and why (the longest-failing writer's); `None` while
    /// every writer writes.
    pub fn writer_stall(&self) -> Option<(Duration, String)> {
        let now = Instant::now();
        self.writers.iter().filter_map(|w| w.stall(now)).max_by_key(|(d, _)| *d)
    }
}

/// The stop sequence's view of a stream, whatever its update type.
pub trait Drain: Send + Sync {
    /// No more records will come from the log: the feed stops once its backlog is queued.
    fn close_input(&self);
    /// Nothing more will be queued: the writers write what they hold, then stop.
    fn close_queue(&self);
    /// The stop timed out: the writers give up what they hold (the log keeps it for the next start).
    fn abandon(&self);
    /// Accepted updates not yet committed (an unread backlog counts as one).
    fn unwritten(&self) -> usize;
    /// Updates committed since the start, for the stop's progress.
    fn written(&self) -> u64;
    /// Updates in the queue, not yet committed.
    fn queued(&self) -> usize;
    /// Bytes of log not yet read back into the queue.
    fn backlog_bytes(&self) -> u64;
}

impl<T: Update + RecordCodec> Drain for Intake<T> {
    fn close_input(&self) {
        self.feed.close_input();
    }

    fn close_queue(&self) {
        self.queue.close();
    }

    fn abandon(&self) {
        self.queue.abandon();
    }

    fn unwritten(&self) -> usize {
        self.queue.pending() + usize::from(!self.feed.is_caught_up())
    }

    fn written(&self) -> u64 {
        self.metrics.written.get()
    }

    fn queued(&self) -> usize {
        self.queue.pending()
    }

    fn backlog_bytes(&self) -> u64 {
        self.feed.backlog_bytes()
    }
}

/// About how much memory `updates` take: what the queue's byte bound counts.
pub fn memory_bytes<T: Update>(updates: &[T]) -> usize {
    updates.iter().map(Update::memory_bytes).sum()
}

fn push_error(error: PushError) -> SubmitError {
    match error {
        PushError::Full { .. } => SubmitError::Overloaded,
        PushError::Closed => SubmitError::ShuttingDown,
    }
}
