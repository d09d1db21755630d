//! The write-ahead log: what makes a `202` survive a crash.
//!
//! An accepted request's updates are appended as one record; the request is answered only once the record is on
//! disk (`fdatasync`). Records appended while an fsync is under way wait and share the next one (group commit),
//! so a busy gateway pays one fsync per group, not per request. Only after its fsync is a record handed to its
//! writer's queue (in log order), so nothing reaches PostgreSQL that the log might lose.
//!
//! The log is a directory of segment files (`<seq>.wal`), each zero-filled a stretch ahead of its records
//! ([`ZERO_AHEAD`]): a group then lands in blocks the file already has, and its `fdatasync` writes the data alone,
//! not the file's new size as well (measured: 80 µs against 130 µs). A zero tail is read as the end of the records.
//! The log A segment is removed once every update in it is
//! committed in PostgreSQL — the last [`SegmentRef`] to it is committed — so the log holds only what is not yet
//! written, bounded by `max_bytes` (a full log answers 503). At start-up the segments left by the previous run are
//! read back ([`Recovery`]); a damaged record (checksum) is skipped and a torn tail ignored, each counted and
//! logged, never a crash loop.
//!
//! A record is opaque bytes to the log, but for its first [`LSN_BYTES`]: the log sequence number, filled in by
//! [`Wal::append`]. The log knows nothing of the rest of the gateway: it reports what it does to a
//! [`WalObserver`], and a committed update's hold on its segment is a plain [`SegmentRef`].
//!
//! Non-goals: replication, reading the log for anything but replay, compaction.

pub mod frame;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

/// Bytes at the start of every record's payload that hold its log sequence number (u64, little-endian).
pub const LSN_BYTES: usize = 8;

/// How far ahead of its records a segment is zero-filled. The group that passes the zeroed part writes the next
/// stretch of zeros with its records, so one fsync in this many bytes of log also writes the file's size; the
/// others write data only. Small enough that that one fsync stays short.
pub const ZERO_AHEAD: u64 = 1024 * 1024;

/// Zeros written by [`ZERO_AHEAD`] a piece at a time.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// The log sequence number of a record's payload; `None` for one too short to hold it.
pub fn record_lsn(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(..LSN_BYTES)?.try_into().ok()?))
}

/// What the log tells its owner as it works, so that the owner can keep metrics; every method defaults to nothing.
pub trait WalObserver: Send + Sync {
    /// The log's bytes on disk are now `bytes`.
    fn bytes_on_disk(&self, _bytes: u64) {}
    /// A segment file was created (`+1`) or removed (`-1`).
    fn segments_changed(&self, _delta: i64) {}
    /// A group of records was written and fsynced.
    fn flushed(&self, _outcome: FlushOutcome) {}
    /// A group could not be written; its requests are refused.
    fn write_failed(&self) {}
    /// A damaged record (checksum, torn tail, undecodable) was found while reading the log back.
    fn corrupt_record(&self) {}
}

/// What one group commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushOutcome {
    pub records: usize,
    pub bytes: usize,
    /// Time to write and fsync the group.
    pub elapsed: Duration,
}

/// Where and how big.
#[derive(Debug, Clone)]
pub struct WalConfig {
    pub dir: PathBuf,
    /// Bound on the log's bytes on disk; an append that would pass it is refused.
    pub max_bytes: u64,
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
}

/// Why an append was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalError {
    #[error("the log holds {used} of {max} bytes; {wanted} more do not fit")]
    Full { used: u64, max: u64, wanted: u64 },
    #[error("the log could not be written: {0}")]
    Io(String),
    #[error("a record must start with {LSN_BYTES} bytes for its sequence number")]
    TooShort,
    #[error("the log is closed")]
    Closed,
}

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {path}")]
pub struct WalOpenError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn open_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WalOpenError + 'a {
    move |source| WalOpenError {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The log's size on disk, shared by every segment.
struct Accounting {
    live_bytes: AtomicU64,
    max_bytes: u64,
    observer: Arc<dyn WalObserver>,
}

impl Accounting {
    fn reserve(&self, bytes: u64) -> Result<(), WalError> {
        let max = self.max_bytes;
        self.live_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= max).then_some(used + bytes)
            })
            .map(|used| self.observer.bytes_on_disk(used + bytes))
            .map_err(|used| WalError::Full {
                used,
                max,
                wanted: bytes,
            })
    }

    fn release(&self, bytes: u64) {
        let before = self.live_bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.observer.bytes_on_disk(before.saturating_sub(bytes));
    }
}

/// A segment file: removed from disk when dropped, unless an update it holds was dropped uncommitted.
pub struct Segment {
    path: PathBuf,
    dir: PathBuf,
    bytes: AtomicU64,
    /// Set when an update of this segment was abandoned before its commit: the file must stay for a replay.
    keep: AtomicBool,
    /// Offsets of damaged records already counted: every stream's feed reads the segment, one counts.
    reported_faults: Mutex<Vec<u64>>,
    /// Set when a damaged record was found in it: once done with, the file is kept aside (renamed), never
    /// deleted, for whoever wants to look at it.
    damaged: AtomicBool,
    accounting: Arc<Accounting>,
}

impl Segment {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counts a fault at `offset` once, however many readers find it; returns whether this was the first. A
    /// `damaged` record (not a write cut short at the end) keeps the segment aside once it is done with.
    pub fn report_fault(&self, offset: u64, damaged: bool) -> bool {
        let mut reported = self.reported_faults.lock().unwrap_or_else(|p| p.into_inner());
        if reported.contains(&offset) {
            return false;
        }
        reported.push(offset);
        if damaged {
            self.damaged.store(true, Ordering::Release);
        }
        self.accounting.observer.corrupt_record();
        true
    }

    /// Bytes of the file known to be on disk (written and fsynced).
    pub fn durable_len(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.keep.load(Ordering::Acquire) {
            return;
        }
        if self.damaged.load(Ordering::Acquire) {
            let aside = self.path.with_extension("wal.damaged");
            match fs::rename(&self.path, &aside) {
                Ok(()) => {
                    sync_dir(&self.dir);
                    warn!(path = %aside.display(), "a log segment with a damaged record is kept aside, not deleted");
                }
                Err(e) => warn!(path = %self.path.display(), error = %e, "could not keep a damaged log segment aside"),
            }
            self.accounting.release(self.bytes.load(Ordering::Acquire));
            self.accounting.observer.segments_changed(-1);
            return;
        }
        match fs::remove_file(&self.path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %self.path.display(), error = %e, "could not remove a written log segment"),
        }
        self.accounting.release(self.bytes.load(Ordering::Acquire));
        self.accounting.observer.segments_changed(-1);
    }
}

/// Holds a segment on disk until the updates it was given with are committed.
pub struct SegmentRef {
    segment: Option<Arc<Segment>>,
}

impl SegmentRef {
    /// A hold on `segment` for updates read back from it.
    pub fn new(segment: &Arc<Segment>) -> Self {
        Self {
            segment: Some(segment.clone()),
        }
    }

    /// The updates are committed: the hold goes, and the segment with it once nobody else holds it.
    pub fn committed(mut self) {
        self.segment = None;
    }
}

impl Clone for SegmentRef {
    /// A second hold for part of the same updates (a record split over batches).
    fn clone(&self) -> Self {
        Self {
            segment: self.segment.clone(),
        }
    }
}

impl Drop for SegmentRef {
    fn drop(&mut self) {
        if let Some(segment) = self.segment.take() {
            segment.keep.store(true, Ordering::Release);
        }
    }
}

/// A record just made durable: where it is.
pub struct DurableRecord<'a> {
    pub lsn: u64,
    pub segment: &'a Arc<Segment>,
    /// Byte offset of the record's frame in the segment file.
    pub offset: u64,
    /// Bytes of the frame.
    pub len: u64,
}

impl DurableRecord<'_> {
    /// A hold on the record's segment until its updates are committed.
    pub fn token(&self) -> SegmentRef {
        SegmentRef::new(self.segment)
    }
}

/// Runs once a record is on disk, in log order, on the thread that flushed it: hands the record's updates on.
pub type OnDurable = Box<dyn FnOnce(&DurableRecord<'_>) + Send>;

/// Resolves once the record is on disk (or could not be written).
pub type Durable = oneshot::Receiver<Result<(), WalError>>;

/// An appended record, not yet on disk.
pub struct Appended {
    pub durable: Durable,
    /// Whether this append opened a group: its caller must then call [`Wal::flush`] or [`Wal::flush_when_free`]
    /// (after letting whatever else is ready append to the same group). Every other append joins a group whose leader has not flushed yet.
    pub leads: bool,
}

struct Pending {
    lsn: u64,
    /// Where the frame starts in the group's buffer, and its length.
    buf_offset: usize,
    len: usize,
    on_durable: OnDurable,
    done: oneshot::Sender<Result<(), WalError>>,
}

struct State {
    /// Framed records appended since the last flush took the buffer: the next group.
    buf: Vec<u8>,
    pending: Vec<Pending>,
    next_lsn: u64,
    /// A leader was named since the last flush took the buffer, and will flush: later appends join its group.
    leader_named: bool,
    closed: bool,
}

/// The running log.
///
/// Group commit without a flusher thread: the append that opens a group makes its caller the group's leader,
/// which flushes once the other requests ready on its worker have appended. The acknowledged path then hands
/// nothing to another thread; a second leader waits (without blocking its worker) while the first one's fsync
/// runs, and takes everything appended meanwhile as one group.
pub struct Wal {
    state: Mutex<State>,
    /// Held for a group's write and fsync; taken before `state`, never after.
    file: Mutex<ActiveSegment>,
    /// Woken when a group's fsync is over and `file` free.
    file_free: tokio::sync::Notify,
    accounting: Arc<Accounting>,
}

/// The log directory as the previous run left it.
pub struct Recovery {
    /// Segments in log order. Each is removed once dropped and every update replayed from it is committed.
    pub segments: Vec<Arc<Segment>>,
    config: WalConfig,
    accounting: Arc<Accounting>,
    next_seq: u64,
}

impl Recovery {
    /// Opens the log directory (creating it) and lists the segments of the previous run.
    pub fn open(config: WalConfig, observer: Arc<dyn WalObserver>) -> Result<Self, WalOpenError> {
        fs::create_dir_all(&config.dir).map_err(open_error("could not create the log directory", &config.dir))?;
        let accounting = Arc::new(Accounting {
            live_bytes: AtomicU64::new(0),
            max_bytes: config.max_bytes,
            observer,
        });
        let mut found: Vec<(u64, PathBuf, u64)> = Vec::new();
        for entry in fs::read_dir(&config.dir).map_err(open_error("could not list", &config.dir))? {
            let entry = entry.map_err(open_error("could not list", &config.dir))?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".wal"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let len = written_len(&path).map_err(open_error("could not read", &path))?;
            found.push((seq, path, len));
        }
        found.sort();
        let next_seq = found.last().map_or(1, |(seq, _, _)| seq + 1);
        let segments = found
            .into_iter()
            .map(|(_, path, len)| {
                accounting.live_bytes.fetch_add(len, Ordering::AcqRel);
                accounting.observer.segments_changed(1);
                Arc::new(Segment {
                    path,
                    dir: config.dir.clone(),
                    bytes: AtomicU64::new(len),
                    keep: AtomicBool::new(false),
                    reported_faults: Mutex::new(Vec::new()),
                    damaged: AtomicBool::new(false),
                    accounting: accounting.clone(),
                })
            })
            .collect::<Vec<_>>();
        accounting
            .observer
            .bytes_on_disk(accounting.live_bytes.load(Ordering::Acquire));
        if !segments.is_empty() {
            info!(segments = segments.len(), dir = %config.dir.display(), "found write-ahead log segments to replay");
        }
        Ok(Recovery {
            segments,
            config,
            accounting,
            next_seq,
        })
    }

    /// Starts the log for new records, numbered from `next_lsn`.
    pub fn start(self, next_lsn: u64) -> Result<Wal, WalOpenError> {
        let (file, segment) = create_segment(&self.config, self.next_seq, &self.accounting)?;
        Ok(Wal {
            state: Mutex::new(State {
                buf: Vec::new(),
                pending: Vec::new(),
                next_lsn,
                leader_named: false,
                closed: false,
            }),
            file: Mutex::new(ActiveSegment {
                config: self.config,
                file,
                segment,
                seq: self.next_seq,
                zeroed_to: 0,
                spare: Vec::new(),
            }),
            file_free: tokio::sync::Notify::new(),
            accounting: self.accounting,
        })
    }

    /// The highest lsn in the segments (0 when there are none): new records are numbered after it.
    pub fn last_lsn(&self) -> Result<u64, WalOpenError> {
        // Records are numbered in file order, so the last segment that holds a readable record has the highest.
        for segment in self.segments.iter().rev() {
            let bytes = fs::read(&segment.path).map_err(open_error("could not read", &segment.path))?;
            let written = segment.durable_len().min(bytes.len() as u64) as usize;
            let last = frame::FrameReader::new(&bytes[..written]).filter_map(record_lsn).max();
            if let Some(lsn) = last {
                return Ok(lsn);
            }
        }
        Ok(0)
    }
}

fn create_segment(
    config: &WalConfig,
    seq: u64,
    accounting: &Arc<Accounting>,
) -> Result<(File, Arc<Segment>), WalOpenError> {
    let path = config.dir.join(format!("{seq:020}.wal"));
    // Acknowledged updates are nobody else's business: the segment is readable by the gateway's user only.
    // Written at explicit offsets, not appended: the file is zero-filled ahead of its records.
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(open_error("could not create a log segment", &path))?;
    // The new name must survive a crash too, or its records would vanish with the directory entry.
    sync_dir(&config.dir);
    accounting.observer.segments_changed(1);
    let segment = Arc::new(Segment {
        path,
        dir: config.dir.clone(),
        bytes: AtomicU64::new(0),
        keep: AtomicBool::new(false),
        reported_faults: Mutex::new(Vec::new()),
        damaged: AtomicBool::new(false),
        accounting: accounting.clone(),
    });
    Ok((file, segment))
}

/// The bytes of a segment file its records take: the file without the zero fill no record reached.
fn written_len(path: &Path) -> io::Result<u64> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    // The common case, a segment filled past its zeros (every segment but the last): its last bytes are a
    // record's, and nothing needs reading.
    let mut last = [0u8; frame::HEADER_BYTES];
    let tail = (len as usize).min(last.len());
    file.read_exact_at(&mut last[..tail], len - tail as u64)?;
    if last[..tail].iter().any(|&b| b != 0) {
        return Ok(len);
    }
    Ok(frame::written_len(&fs::read(path)?) as u64)
}

fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        warn!(dir = %dir.display(), error = %e, "could not fsync the log directory");
    }
}

impl Wal {
    /// Appends a record (a payload whose first [`LSN_BYTES`] are filled in here with its lsn). `on_durable` runs, in log
    /// order, once the record is on disk; [`Appended::durable`] resolves then, or with the write error.
    pub fn append(&self, mut payload: Vec<u8>, on_durable: OnDurable) -> Result<Appended, WalError> {
        if payload.len() < LSN_BYTES {
            return Err(WalError::TooShort);
        }
        let framed = frame::framed_len(payload.len()) as u64;
        self.accounting.reserve(framed)?;
        let (done, durable) = oneshot::channel();
        let Ok(mut state) = self.state.lock() else {
            self.accounting.release(framed);
            return Err(WalError::Closed);
        };
        if state.closed {
            drop(state);
            self.accounting.release(framed);
            return Err(WalError::Closed);
        }
        let lsn = state.next_lsn;
        state.next_lsn += 1;
        payload[..LSN_BYTES].copy_from_slice(&lsn.to_le_bytes());
        let buf_offset = state.buf.len();
        frame::encode(&payload, &mut state.buf);
        state.pending.push(Pending {
            lsn,
            buf_offset,
            len: framed as usize,
            on_durable,
            done,
        });
        let leads = !std::mem::replace(&mut state.leader_named, true);
        Ok(Appended { durable, leads })
    }

    /// Writes and fsyncs every record appended so far as one group, then hands each on and resolves its
    /// [`Durable`]. Blocks while another group's fsync runs, then takes what was appended meanwhile.
    pub fn flush(&self) {
        self.flush_group(self.file.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// [`flush`](Self::flush) for a leader on an async worker: while another group's fsync runs, it waits without
    /// blocking the thread, which goes on reading requests that join this group.
    pub async fn flush_when_free(&self) {
        // The common case, a free file, registers no waiter.
        if let Ok(active) = self.file.try_lock() {
            return self.flush_group(active);
        }
        loop {
            // Registered before the attempt, so that the end of the other fsync in between is not missed.
            let free = self.file_free.notified();
            tokio::pin!(free);
            free.as_mut().enable();
            // The guard must not live across the wait: a task holding one could not move between threads.
            if let Some(active) = self.try_lock_file() {
                return self.flush_group(active);
            }
            free.await;
        }
    }

    fn try_lock_file(&self) -> Option<MutexGuard<'_, ActiveSegment>> {
        match self.file.try_lock() {
            Ok(active) => Some(active),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    fn flush_group(&self, mut active: MutexGuard<'_, ActiveSegment>) {
        let taken = {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            state.leader_named = false;
            if state.buf.is_empty() {
                None
            } else {
                let spare = std::mem::take(&mut active.spare);
                Some((
                    std::mem::replace(&mut state.buf, spare),
                    std::mem::take(&mut state.pending),
                ))
            }
        };
        if let Some((mut buf, pending)) = taken {
            active.write_group(&buf, pending, &self.accounting);
            buf.clear();
            active.spare = buf;
        }
        drop(active);
        self.file_free.notify_waiters();
    }

    /// Refuses new records and writes those appended. Segments stay until their updates are committed.
    pub fn close(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.closed = true;
        }
        self.flush();
    }

    /// Bytes of log on disk.
    pub fn used_bytes(&self) -> u64 {
        self.accounting.live_bytes.load(Ordering::Acquire)
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

/// The segment file records are appended to.
struct ActiveSegment {
    config: WalConfig,
    file: File,
    segment: Arc<Segment>,
    seq: u64,
    /// The file is zero-filled up to here ([`ZERO_AHEAD`]).
    zeroed_to: u64,
    /// The previous group's buffer, kept for its capacity.
    spare: Vec<u8>,
}

impl ActiveSegment {
    fn write_group(&mut self, buf: &[u8], pending: Vec<Pending>, accounting: &Arc<Accounting>) {
        let observer = &accounting.observer;
        let started = Instant::now();
        let at = self.segment.bytes.load(Ordering::Acquire);
        let written = self.file.write_all_at(buf, at).and_then(|()| {
            self.zero_ahead(at + buf.len() as u64);
            self.file.sync_data()
        });
        match written {
            Ok(()) => {
                let base = self.segment.bytes.fetch_add(buf.len() as u64, Ordering::AcqRel);
                observer.flushed(FlushOutcome {
                    records: pending.len(),
                    bytes: buf.len(),
                    elapsed: started.elapsed(),
                });
                for p in pending {
                    let record = DurableRecord {
                        lsn: p.lsn,
                        segment: &self.segment,
                        offset: base + p.buf_offset as u64,
                        len: p.len as u64,
                    };
                    (p.on_durable)(&record);
                    let _ = p.done.send(Ok(()));
                }
                if self.segment.bytes.load(Ordering::Acquire) >= self.config.segment_bytes {
                    self.roll(accounting);
                }
            }
            Err(e) => {
                observer.write_failed();
                error!(error = %e, records = pending.len(), "could not write the log; the requests are refused");
                // Cut off whatever part of the group reached the file, so the next group does not follow garbage.
                let good = self.segment.bytes.load(Ordering::Acquire);
                let _ = self.file.set_len(good);
                // Seal the segment, so that its space comes back as soon as its updates are written: with a
                // full disk, nothing else frees any.
                self.roll(accounting);
                accounting.release(buf.len() as u64);
                let message = e.to_string();
                for p in pending {
                    let _ = p.done.send(Err(WalError::Io(message.clone())));
                }
            }
        }
    }

    /// Once the records reach `end`, zero-fills the next stretch of the file when they passed the zeroed part, so
    /// that the groups that follow land in blocks the file has. Not past the segment's size, where it rolls.
    /// Only a saving: when the zeros cannot be written (a full disk), what was written of them is given back and
    /// the segment goes on without, so the records never pay for it.
    fn zero_ahead(&mut self, end: u64) {
        if end <= self.zeroed_to {
            return;
        }
        let to = (end + ZERO_AHEAD).min(self.config.segment_bytes.max(end));
        let mut at = end;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            if let Err(e) = self.file.write_all_at(&ZEROS[..n], at) {
                debug!(error = %e, "could not zero-fill the log segment ahead; it grows as it is written");
                let _ = self.file.set_len(end);
                self.zeroed_to = u64::MAX;
                return;
            }
            at += n as u64;
        }
        self.zeroed_to = to;
    }

    /// Starts a new segment; the old one is removed once its last update is committed.
    fn roll(&mut self, accounting: &Arc<Accounting>) {
        match create_segment(&self.config, self.seq + 1, accounting) {
            Ok((file, segment)) => {
                self.seq += 1;
                self.file = file;
                self.segment = segment;
                self.zeroed_to = 0;
            }
            Err(e) => warn!(error = %e, "could not start a new log segment; the current one grows"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Counts what the log reports, as the gateway's metrics would.
    #[derive(Default)]
    struct Counts {
        bytes: AtomicU64,
        segments: std::sync::atomic::AtomicI64,
        fsyncs: AtomicU64,
    }

    impl WalObserver for Counts {
        fn bytes_on_disk(&self, bytes: u64) {
            self.bytes.store(bytes, Ordering::SeqCst);
        }
        fn segments_changed(&self, delta: i64) {
            self.segments.fetch_add(delta, Ordering::SeqCst);
        }
        fn flushed(&self, _outcome: FlushOutcome) {
            self.fsyncs.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn config(dir: &Path, max_bytes: u64, segment_bytes: u64) -> WalConfig {
        WalConfig {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes,
        }
    }

    fn payload(n: u8) -> Vec<u8> {
        let mut p = vec![0; LSN_BYTES];
        p.push(n);
        p
    }

    /// Appends and waits; returns the tokens handed to the "writer".
    fn append_all(wal: &Wal, payloads: Vec<Vec<u8>>) -> Vec<(u64, SegmentRef)> {
        let (tx, rx) = mpsc::channel();
        let mut waits = Vec::new();
        for p in payloads {
            let tx = tx.clone();
            waits.push(
                wal.append(
                    p,
                    Box::new(move |r: &DurableRecord| tx.send((r.lsn, r.token())).unwrap()),
                )
                .unwrap()
                .durable,
            );
        }
        wal.flush();
        for w in waits {
            w.blocking_recv().unwrap().unwrap();
        }
        drop(tx);
        rx.iter().collect()
    }

    /// For what happens on disk after the fsync the test waited for.
    fn wait_until(mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "condition never held");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn read_back(dir: &Path, counts: &Arc<Counts>) -> Vec<u64> {
        let recovery = Recovery::open(config(dir, 1 << 30, 1 << 20), counts.clone()).unwrap();
        let mut lsns = Vec::new();
        for s in &recovery.segments {
            let bytes = fs::read(s.path()).unwrap();
            lsns.extend(frame::FrameReader::new(&bytes).map(|p| record_lsn(p).unwrap()));
        }
        assert_eq!(recovery.last_lsn().unwrap(), lsns.last().copied().unwrap_or(0));
        // Keep the files for later looks: nothing here is committed.
        for s in &recovery.segments {
            s.keep.store(true, Ordering::Release);
        }
        lsns
    }

    #[test]
    fn appended_records_are_durable_in_order_and_read_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let counts = Arc::new(Counts::default());
        let wal = Recovery::open(config(dir.path(), 1 << 30, 64), counts.clone())
            .unwrap()
            .start(10)
            .unwrap();
        let handed = append_all(&wal, (0..20).map(payload).collect());
        assert_eq!(
            handed.iter().map(|(lsn, _)| *lsn).collect::<Vec<_>>(),
            (10..30).collect::<Vec<_>>()
        );
        // The roll follows the fsync that the appends waited for.
        wait_until(|| counts.segments.load(Ordering::SeqCst) > 1);
        // Simulate a crash: nothing committed, the process gone.
        for (_, token) in handed {
            std::mem::forget(token);
        }
        std::mem::forget(wal);
        assert_eq!(read_back(dir.path(), &counts), (10..30).collect::<Vec<_>>());
    }

    #[test]
    fn a_segment_is_zero_filled_ahead_and_its_zero_tail_is_read_as_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let counts = Arc::new(Counts::default());
        let wal = Recovery::open(config(dir.path(), 1 << 30, 1 << 30), counts.clone())
            .unwrap()
            .start(1)
            .unwrap();
        let handed = append_all(&wal, (0..5).map(payload).collect());
        let written = 5 * frame::framed_len(payload(0).len()) as u64;
        for (_, token) in handed {
            std::mem::forget(token);
        }
        std::mem::forget(wal);
        let segment = fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        assert_eq!(fs::metadata(&segment).unwrap().len(), written + ZERO_AHEAD);
        let recovery = Recovery::open(config(dir.path(), 1 << 30, 1 << 30), counts.clone()).unwrap();
        assert_eq!(recovery.segments[0].durable_len(), written);
        assert_eq!(counts.bytes.load(Ordering::SeqCst), written);
        assert_eq!(recovery.last_lsn().unwrap(), 5);
        for s in &recovery.segments {
            s.keep.store(true, Ordering::Release);
        }
        assert_eq!(read_back(dir.path(), &counts), vec![1, 2, 3, 4, 5]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..Default::default() })]

        /// A crash cuts the log anywhere in its last segment; reopening reads back exactly the whole records
        /// before the cut, in order, and new records are numbered after them.
        #[test]
        fn a_log_cut_anywhere_reopens_with_exactly_the_whole_records_before_the_cut(
            groups in proptest::collection::vec(1usize..6, 1..12),
            segment_bytes in 16u64..400,
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let counts = Arc::new(Counts::default());
            let wal = Recovery::open(config(dir.path(), 1 << 30, segment_bytes), counts.clone())
                .unwrap()
                .start(1)
                .unwrap();
            let mut handed = Vec::new();
            let mut n = 0u8;
            for size in groups {
                handed.extend(append_all(&wal, (0..size).map(|_| { n += 1; payload(n) }).collect()));
            }
            // The crash: nothing committed, nothing closed.
            for (_, token) in handed {
                std::mem::forget(token);
            }
            std::mem::forget(wal);
            let mut segments: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
            segments.sort();
            let last = segments.iter().rev().find(|p| fs::metadata(p).unwrap().len() > 0).unwrap().clone();
            let bytes = fs::read(&last).unwrap();
            let cut = cut.index(bytes.len() + 1);
            fs::write(&last, &bytes[..cut]).unwrap();
            let whole_in_last = frame::FrameReader::new(&bytes[..cut]).count();
            let lost = frame::FrameReader::new(&bytes).count() - whole_in_last;

            let read = read_back(dir.path(), &counts);
            let expected: Vec<u64> = (1..=u64::from(n) - lost as u64).collect();
            proptest::prop_assert_eq!(read, expected);
        }
    }

    #[tokio::test]
    async fn a_leader_on_an_async_worker_flushes_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let counts = Arc::new(Counts::default());
        let wal = Recovery::open(config(dir.path(), 1 << 30, 1 << 20), counts.clone())
            .unwrap()
            .start(1)
            .unwrap();
        // The "writer" keeps every record's segment, as uncommitted updates do.
        let (tx, rx) = mpsc::channel();
        let append = |n: u8| {
            let tx = tx.clone();
            wal.append(
                payload(n),
                Box::new(move |r: &DurableRecord| tx.send(r.token()).unwrap()),
            )
            .unwrap()
        };
        let first = append(1);
        let second = append(2);
        assert!(
            first.leads && !second.leads,
            "the second record joins the first one's group"
        );
        wal.flush_when_free().await;
        assert_eq!(first.durable.await.unwrap(), Ok(()));
        assert_eq!(second.durable.await.unwrap(), Ok(()));
        assert_eq!(counts.fsyncs.load(Ordering::SeqCst), 1);
        let third = append(3);
        assert!(third.leads, "after a flush, the next append opens a new group");
        // Closing writes the group whose leader never flushed.
        drop(wal);
        let tokens: Vec<SegmentRef> = rx.try_iter().collect();
        assert_eq!(tokens.len(), 3);
        assert_eq!(read_back(dir.path(), &counts), vec![1, 2, 3]);
    }

    #[test]
    fn a_segment_is_removed_once_every_record_in_it_is_committed() {
        let dir = tempfile::tempdir().unwrap();
        let counts = Arc::new(Counts::default());
        let wal = Recovery::open(config(dir.path(), 1 << 30, 1), counts.clone())
            .unwrap()
            .start(1)
            .unwrap();
        // One at a time, so that each record is its own group and (with tiny segments) its own segment.
        let mut handed: Vec<_> = (0..3).flat_map(|i| append_all(&wal, vec![payload(i)])).collect();
        let files = || fs::read_dir(dir.path()).unwrap().count();
        wait_until(|| files() == 4);
        let (_, token) = handed.remove(1);
        token.committed();
        assert_eq!(files(), 3);
        for (_, token) in handed {
            token.committed();
        }
        wal.close();
        drop(wal);
        assert_eq!(files(), 0, "an empty, committed log leaves nothing behind");
        assert_eq!(counts.bytes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn an_update_dropped_uncommitted_keeps_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let counts = Arc::new(Counts::default());
        let wal = Recovery::open(config(dir.path(), 1 << 30, 1), counts.clone())
            .unwrap()
            .start(1)
            .unwrap();
        let handed = append_all(&wal, vec![payload(1)]);
        drop(handed);
        drop(wal);
        assert_eq!(read_back(dir.path(), &counts), vec![1]);
    }

    #[test]
    fn a_full_log_refuses_appends_until_space_is_freed() {
        let dir = tempfile::tempdir().unwrap();
        let counts = Arc::new(Counts::default());
        let record = frame::framed_len(payload(0).len()) as u64;
        let wal = Recovery::open(config(dir.path(), record * 2, 1), counts.clone())
            .unwrap()
            .start(1)
            .unwrap();
        let handed = append_all(&wal, vec![payload(1), payload(2)]);
        assert!(matches!(
            wal.append(payload(3), Box::new(|_: &DurableRecord| {})),
            Err(WalError::Full { .. })
        ));
        for (_, token) in handed {
            token.committed();
        }
        wait_until(|| wal.used_bytes() == 0);
        assert_eq!(append_all(&wal, vec![payload(3)]).len(), 1);
    }
}
