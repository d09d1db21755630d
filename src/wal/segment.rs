//! Segment files: a segment's life on disk (created, zero-filled ahead, sealed, removed or kept aside once done
//! with), the holds that keep it while its updates are uncommitted, and the log's size on disk across segments.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};

use super::file_io::{write_all_at, FileIo, SegmentFile};
use super::{frame, open_error, WalConfig, WalError, WalObserver, WalOpenError, ZERO_AHEAD};

/// Zeros written by [`ZERO_AHEAD`] a piece at a time.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// The log's size on disk, shared by every segment.
pub(super) struct Accounting {
    pub(super) live_bytes: AtomicU64,
    pub(super) max_bytes: u64,
    pub(super) observer: Arc<dyn WalObserver>,
}

impl Accounting {
    pub(super) fn reserve(&self, bytes: u64) -> Result<(), WalError> {
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

    pub(super) fn release(&self, bytes: u64) {
        let before = self.live_bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.observer.bytes_on_disk(before.saturating_sub(bytes));
    }
}

/// A segment file: removed from disk when dropped, unless an update it holds was dropped uncommitted.
pub struct Segment {
    pub(super) path: PathBuf,
    pub(super) dir: PathBuf,
    pub(super) bytes: AtomicU64,
    /// Set when an update of this segment was abandoned before its commit: the file must stay for a replay.
    pub(super) keep: AtomicBool,
    /// Offsets of damaged records already counted: every stream's feed reads the segment, one counts.
    pub(super) reported_faults: Mutex<Vec<u64>>,
    /// Set when a damaged record was found in it: once done with, the file is kept aside (renamed), never
    /// deleted, for whoever wants to look at it.
    pub(super) damaged: AtomicBool,
    pub(super) accounting: Arc<Accounting>,
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

pub(super) fn create_segment(
    io: &dyn FileIo,
    config: &WalConfig,
    seq: u64,
    accounting: &Arc<Accounting>,
) -> Result<(Box<dyn SegmentFile>, Arc<Segment>), WalOpenError> {
    let path = config.dir.join(format!("{seq:020}.wal"));
    let file = io
        .create(&path)
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
pub(super) fn written_len(path: &Path) -> io::Result<u64> {
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

/// The segment file records are appended to.
pub(super) struct ActiveSegment {
    pub(super) config: WalConfig,
    /// Where the segment's file is written, and how new ones are created.
    pub(super) io: Arc<dyn FileIo>,
    pub(super) file: Box<dyn SegmentFile>,
    pub(super) segment: Arc<Segment>,
    pub(super) seq: u64,
    /// The file is zero-filled up to here ([`ZERO_AHEAD`]).
    pub(super) zeroed_to: u64,
    /// The previous group's buffer, kept for its capacity.
    pub(super) spare: Vec<u8>,
}

impl ActiveSegment {
    /// Once the records reach `end`, zero-fills the next stretch of the file when they passed the zeroed part, so
    /// that the groups that follow land in blocks the file has. Not past the segment's size, where it rolls.
    /// Only a saving: when the zeros cannot be written (a full disk), what was written of them is given back and
    /// the segment goes on without, so the records never pay for it.
    pub(super) fn zero_ahead(&mut self, end: u64) {
        if end <= self.zeroed_to {
            return;
        }
        let to = (end + ZERO_AHEAD).min(self.config.segment_bytes.max(end));
        let mut at = end;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            if let Err(e) = write_all_at(self.file.as_mut(), &ZEROS[..n], at) {
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
    pub(super) fn roll(&mut self, accounting: &Arc<Accounting>) {
        match create_segment(self.io.as_ref(), &self.config, self.seq + 1, accounting) {
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
