//! Feeds one stream's writers from the write-ahead log.
//!
//! While the writers keep up, a record is handed to them straight from memory the moment it is durable. When
//! they fall behind (the queue is full: PostgreSQL is slow or away) the record stays on disk only and the stream
//! has a *backlog*: from then on every record of the stream waits its turn on disk, and a refill thread reads
//! them back in log order as the queue makes room, so that a writer still commits each slot's records in order.
//! A restart is the same thing: the previous run's segments are the backlog. So the gateway keeps taking updates
//! for as long as the log has room, while memory stays bounded by the queue. How far the feed has read those
//! segments is its [`ReplayProgress`]: the gateway is not ready until every stream has read them all.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Take};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::record::{self, RecordCodec};
use crate::db::Checkpoint;
use crate::metrics::StreamMetrics;
use crate::model::Update;
use crate::pipeline::{Chunk, CommitWaiter, Delivery, PushError, Reservation, StreamQueue};
use crate::wal::frame::{self, Next};
use crate::wal::{DurableRecord, Segment, SegmentRef};

/// How long the refill thread sleeps when the queue is full before it looks for room again.
const REFILL_RETRY: Duration = Duration::from_millis(2);

/// Updates `start..end` of the log record `lsn`, logged for `slot`, on their way to PostgreSQL: their checkpoint,
/// and a hold on the record's segment until they are committed.
pub struct LoggedDelivery {
    lsn: u64,
    slot: u16,
    start: u32,
    end: u32,
    /// Updates in the whole record.
    total: u32,
    hold: SegmentRef,
}

impl Delivery for LoggedDelivery {
    fn split_off(&mut self, at: usize) -> Box<dyn Delivery> {
        let split = self.start + at as u32;
        let rest = LoggedDelivery {
            start: split,
            hold: self.hold.clone(),
            ..*self
        };
        self.end = split;
        Box::new(rest)
    }

    fn checkpoint(&self) -> Option<Checkpoint> {
        Some(Checkpoint {
            slot: self.slot,
            lsn: self.lsn,
            updates_done: (self.end < self.total).then_some(self.end),
        })
    }

    fn committed(self: Box<Self>) {
        self.hold.committed();
    }
}

/// How far a stream's feed has read back the segments the previous run left (the start-up replay). Written by
/// the refill thread only; read by the progress log, `/readyz` and `/stats`.
#[derive(Debug)]
pub struct ReplayProgress {
    /// Bytes of the previous run's segments. Every stream reads all of them (and queues its own records), so
    /// each stream's replay has the same total.
    total_bytes: u64,
    done_bytes: AtomicU64,
    /// Updates of this stream the replay queued (those already committed before the crash are skipped).
    updates: AtomicU64,
    finished: AtomicBool,
    started: Instant,
}

/// [`ReplayProgress`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplaySnapshot {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub updates: u64,
    pub finished: bool,
}

impl ReplayProgress {
    fn new(total_bytes: u64) -> Self {
        Self {
            total_bytes,
            done_bytes: AtomicU64::new(0),
            updates: AtomicU64::new(0),
            finished: AtomicBool::new(total_bytes == 0),
            started: Instant::now(),
        }
    }

    /// Whether every segment of the previous run has been read back into the queue.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> ReplaySnapshot {
        // `finished` first: once it is seen set, the figures read after it are the final ones.
        let finished = self.is_finished();
        ReplaySnapshot {
            done_bytes: self.done_bytes.load(Ordering::Relaxed),
            total_bytes: self.total_bytes,
            updates: self.updates.load(Ordering::Relaxed),
            finished,
        }
    }
}

struct FeedState {
    /// Segments that hold backlog records, oldest first; empty when there is no backlog.
    holds: VecDeque<Arc<Segment>>,
    /// How many of the first `holds` are the previous run's segments, not yet read back entirely.
    recovered_left: usize,
    /// Bytes of the previous run's segments already read back entirely.
    recovered_read: u64,
    /// Where the backlog starts in the first held segment.
    offset: u64,
    /// Where the backlog ends in the last held segment (the end of its last record of this stream).
    end: u64,
    /// Requests waiting for the commit of a record in the backlog, by lsn.
    waiters: HashMap<u64, Arc<CommitWaiter>>,
    /// No more records will be offered (the log is closed).
    input_closed: bool,
}

/// Where the next whole record after a damaged one at `from` starts, reading the segment up to `until`; `None`
/// when none follows. Damage is rare, so the rest of the segment is simply read into memory to search it.
/// A segment being read back: its reader, where the reader is, and the end it may read to.
type OpenSegment = (Arc<Segment>, BufReader<Take<File>>, u64, u64);

fn resync_in(segment: &Segment, from: u64, until: u64) -> std::io::Result<Option<u64>> {
    let mut file = File::open(segment.path())?;
    file.seek(SeekFrom::Start(from))?;
    let mut rest = Vec::new();
    (&mut file).take(until - from).read_to_end(&mut rest)?;
    Ok(frame::resync(&rest).map(|skip| from + skip as u64))
}

/// One stream's path from the log to its queue.
pub struct LogFeed<T> {
    queue: Arc<StreamQueue<T>>,
    state: Mutex<FeedState>,
    wake: Condvar,
    /// This stream's committed position per slot: what a replay skips.
    progress: HashMap<u16, Checkpoint>,
    metrics: StreamMetrics,
    replay: Arc<ReplayProgress>,
}

impl<T: Update + RecordCodec> LogFeed<T> {
    /// A feed whose backlog starts as the segments a previous run left (oldest first).
    pub fn new(
        queue: Arc<StreamQueue<T>>,
        recovered: Vec<Arc<Segment>>,
        progress: HashMap<u16, Checkpoint>,
        metrics: StreamMetrics,
    ) -> Arc<Self> {
        let end = recovered.last().map_or(0, |s| s.durable_len());
        let replay = Arc::new(ReplayProgress::new(recovered.iter().map(|s| s.durable_len()).sum()));
        let state = FeedState {
            recovered_left: recovered.len(),
            recovered_read: 0,
            holds: recovered.into(),
            offset: 0,
            end,
            waiters: HashMap::new(),
            input_closed: false,
        };
        Arc::new(Self {
            queue,
            state: Mutex::new(state),
            wake: Condvar::new(),
            progress,
            metrics,
            replay,
        })
    }

    /// How far the start-up replay has come.
    pub fn replay(&self) -> &Arc<ReplayProgress> {
        &self.replay
    }

    /// Starts the refill thread.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let feed = self.clone();
        std::thread::Builder::new()
            .name(format!("{}-log-feed", T::STREAM))
            .spawn(move || feed.refill())
    }

    fn lock(&self) -> MutexGuard<'_, FeedState> {
        // The state stays consistent even if a holder panicked: every update to it is a single assignment.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Called by the group's flush, in log order, once a record of this stream is durable: queues its updates
    /// at once when there is no backlog and room was reserved; otherwise they wait on disk.
    pub fn offer(
        &self,
        record: &DurableRecord<'_>,
        reservation: Option<Reservation<T>>,
        updates: Vec<T>,
        waiter: Option<Arc<CommitWaiter>>,
    ) {
        let mut state = self.lock();
        if state.holds.is_empty() {
            if let Some(reservation) = reservation {
                let total = updates.len() as u32;
                let delivery = LoggedDelivery {
                    lsn: record.lsn,
                    slot: reservation.slot(),
                    start: 0,
                    end: total,
                    total,
                    hold: record.token(),
                };
                reservation.push(Chunk {
                    updates,
                    bytes: 0,
                    delivery: Some(Box::new(delivery)),
                    commit: waiter,
                });
                return;
            }
            state.holds.push_back(record.segment.clone());
            state.offset = record.offset;
            info!(
                stream = T::STREAM,
                "writers fall behind: updates now wait in the write-ahead log"
            );
        } else if !state.holds.back().is_some_and(|last| Arc::ptr_eq(last, record.segment)) {
            state.holds.push_back(record.segment.clone());
        }
        state.end = record.offset + record.len;
        if let Some(waiter) = waiter {
            state.waiters.insert(record.lsn, waiter);
        }
        drop(state);
        // The reservation (if any) is dropped here and its room given back: the updates are read back later.
        self.wake.notify_one();
    }

    /// No more records will be offered; the refill thread stops once the backlog is queued.
    pub fn close_input(&self) {
        self.lock().input_closed = true;
        self.wake.notify_all();
    }

    /// Whether every record offered so far has been queued.
    pub fn is_caught_up(&self) -> bool {
        self.lock().holds.is_empty()
    }

    /// Bytes of log between the backlog's start and its end (records of other streams included).
    pub fn backlog_bytes(&self) -> u64 {
        let state = self.lock();
        let n = state.holds.len();
        state
            .holds
            .iter()
            .enumerate()
            .map(|(i, s)| if i + 1 == n { state.end } else { s.durable_len() })
            .sum::<u64>()
            .saturating_sub(state.offset)
    }

    /// The refill thread: reads the backlog back, in order, into the queue.
    fn refill(self: Arc<Self>) {
        // The segment being read, where its reader is, and how far it may read: the durable end when it was opened.
        // A segment is zero-filled ahead of its records, so a reader allowed past that end would buffer zeros
        // where records are written later; it is opened again once the records reach further.
        let mut open: Option<OpenSegment> = None;
        loop {
            let (segment, from, until) = {
                let mut state = self.lock();
                loop {
                    let Some(first) = state.holds.front().cloned() else {
                        // Let go of the last segment read: an open file keeps its disk space after removal.
                        open = None;
                        if state.input_closed {
                            return;
                        }
                        state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                        continue;
                    };
                    let last = state.holds.len() == 1;
                    let until = if last { state.end } else { first.durable_len() };
                    if state.offset < until {
                        break (first, state.offset, until);
                    }
                    state.holds.pop_front();
                    state.offset = 0;
                    open = None;
                    if state.recovered_left > 0 {
                        state.recovered_left -= 1;
                        state.recovered_read += until;
                        self.replayed_up_to(state.recovered_read, state.recovered_left == 0);
                    }
                    if state.holds.is_empty() {
                        state.end = 0;
                        info!(
                            stream = T::STREAM,
                            "write-ahead log backlog queued; writers are fed from memory again"
                        );
                    }
                }
            };
            let reader = match &mut open {
                Some((s, reader, pos, limit)) if Arc::ptr_eq(s, &segment) && *pos == from && until <= *limit => reader,
                _ => match File::open(segment.path()).and_then(|mut f| f.seek(SeekFrom::Start(from)).map(|_| f)) {
                    Ok(file) => {
                        let reader = BufReader::new(file.take(until - from));
                        &mut open.insert((segment.clone(), reader, from, until)).1
                    }
                    Err(e) => {
                        warn!(path = %segment.path().display(), error = %e, "could not read a log segment; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                        open = None;
                        continue;
                    }
                },
            };
            let next = match frame::read_next(reader, until - from) {
                Ok(next) => next,
                Err(e) => {
                    warn!(path = %segment.path().display(), error = %e, "could not read a log segment; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                    open = None;
                    continue;
                }
            };
            let advanced = match next {
                Next::Record(payload) => {
                    let len = frame::framed_len(payload.len()) as u64;
                    if !self.queue_record(&payload, &segment, from) {
                        return;
                    }
                    from + len
                }
                Next::Damaged { complete } => {
                    // The reader stopped somewhere inside the damaged frame: the next read reopens where it must.
                    open = None;
                    match resync_in(&segment, from, until) {
                        Ok(Some(next)) => {
                            self.fault(
                                &segment,
                                from,
                                true,
                                "a damaged log record is skipped; replay goes on after it",
                            );
                            next
                        }
                        Ok(None) if complete => {
                            self.fault(&segment, from, true, "a damaged log record ends a log segment; skipped");
                            until
                        }
                        Ok(None) => {
                            self.fault(
                                &segment,
                                from,
                                false,
                                "a torn record ends a log segment; the rest of it is skipped",
                            );
                            until
                        }
                        Err(e) => {
                            warn!(path = %segment.path().display(), error = %e, "could not read a log segment; retrying");
                            std::thread::sleep(Duration::from_secs(1));
                            continue;
                        }
                    }
                }
                Next::End => until,
            };
            if let Some((_, _, pos, _)) = &mut open {
                *pos = advanced;
            }
            let mut state = self.lock();
            if state.holds.front().is_some_and(|s| Arc::ptr_eq(s, &segment)) {
                state.offset = advanced;
                if state.recovered_left > 0 {
                    self.replayed_up_to(state.recovered_read + advanced, false);
                }
            }
        }
    }

    /// Records how many bytes of the previous run's segments are read back, and whether that is all of them.
    fn replayed_up_to(&self, done_bytes: u64, finished: bool) {
        self.replay.done_bytes.store(done_bytes, Ordering::Relaxed);
        if finished {
            self.replay.finished.store(true, Ordering::Release);
            let replay = self.replay.snapshot();
            info!(
                stream = T::STREAM,
                updates = replay.updates,
                bytes = replay.total_bytes,
                elapsed_ms = self.replay.started.elapsed().as_millis() as u64,
                "write-ahead log replayed"
            );
        }
    }

    fn fault(&self, segment: &Segment, offset: u64, damaged: bool, message: &'static str) {
        if segment.report_fault(offset, damaged) {
            warn!(path = %segment.path().display(), offset, "{message}");
        }
    }

    /// Queues what of a record belongs to this stream and is not yet committed, waiting for room; returns
    /// false when the queue closed under it.
    fn queue_record(&self, payload: &[u8], segment: &Arc<Segment>, offset: u64) -> bool {
        let Some(header) = record::decode_header(payload).filter(|h| h.stream == T::STREAM_ID) else {
            return true;
        };
        let start = match self.progress.get(&header.slot) {
            Some(p) if header.lsn < p.lsn => return true,
            Some(p) if header.lsn == p.lsn => match p.updates_done {
                None => return true,
                Some(done) => done,
            },
            _ => 0,
        };
        let Some(mut updates) = record::decode_updates::<T>(payload) else {
            self.fault(segment, offset, true, "a log record could not be decoded; skipped");
            return true;
        };
        let updates = updates.split_off((start as usize).min(updates.len()));
        let waiter = self.lock().waiters.remove(&header.lsn);
        if updates.is_empty() {
            return true;
        }
        let n = updates.len();
        let slot = header.slot as usize % self.queue.slots();
        // A record larger than the whole queue goes in pieces, each tracked by its position in the record.
        let piece = self.queue.capacity().max(1);
        let mut rest = updates;
        let mut start = start;
        let mut waiter = waiter;
        while !rest.is_empty() {
            let tail = rest.split_off(piece.min(rest.len()));
            let pieces_left = !tail.is_empty();
            let updates = std::mem::replace(&mut rest, tail);
            let reservation = loop {
                match self
                    .queue
                    .reserve_on(updates.len(), super::memory_bytes(&updates), slot)
                {
                    Ok(r) => break r,
                    Err(PushError::Full { .. }) => std::thread::sleep(REFILL_RETRY),
                    Err(PushError::Closed) => return false,
                }
            };
            let len = updates.len() as u32;
            let delivery = LoggedDelivery {
                lsn: header.lsn,
                slot: header.slot,
                start,
                end: start + len,
                total: header.count,
                hold: SegmentRef::new(segment),
            };
            // The waiter counts every update of the record, so each piece carries it.
            let commit = if pieces_left { waiter.clone() } else { waiter.take() };
            reservation.push(Chunk {
                updates,
                bytes: 0,
                delivery: Some(Box::new(delivery)),
                commit,
            });
            start += len;
        }
        self.metrics.replayed.inc_by(n as u64);
        if !self.replay.is_finished() {
            self.replay.updates.fetch_add(n as u64, Ordering::Relaxed);
        }
        true
    }
}
