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
//! A segment is removed once every update in it is committed in PostgreSQL — the last [`SegmentRef`] to it is
//! committed — so the log holds only what is not yet written, bounded by `max_bytes` (a full log answers 503). At
//! start-up the segments left by the previous run are read back ([`Recovery`]); a damaged record (checksum) is
//! skipped and a torn tail ignored, each counted and logged, never a crash loop.
//!
//! A record is opaque bytes to the log, but for its first [`LSN_BYTES`]: the log sequence number, filled in by
//! [`Wal::append`]. The log knows nothing of the rest of the gateway: it reports what it does to a
//! [`WalObserver`], and a committed update's hold on its segment is a plain [`SegmentRef`].
//!
//! Non-goals: replication, reading the log for anything but replay, compaction.
//!
//! # Layout
//! - [`frame`]: a record's bytes in a segment (length, checksum, payload) and reading them back;
//! - `segment`: segment files on disk, the holds that keep them, the log's size across them;
//! - `recovery`: the directory as the previous run left it, and starting the log after it;
//! - `group`: appending records and writing them in groups, one fsync each;
//! - [`file_io`]: the seam every write and fsync of a segment goes through, so that a test can make the disk fail.

#[cfg(test)]
mod fault_tests;
pub mod file_io;
pub mod frame;
mod group;
mod recovery;
mod segment;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use group::{Appended, Durable, DurableRecord, OnDurable, Wal};
pub use recovery::Recovery;
pub use segment::{Segment, SegmentRef};

/// Bytes at the start of every record's payload that hold its log sequence number (u64, little-endian).
pub const LSN_BYTES: usize = 8;

/// How far ahead of its records a segment is zero-filled. The group that passes the zeroed part writes the next
/// stretch of zeros with its records, so one fsync in this many bytes of log also writes the file's size; the
/// others write data only. Small enough that that one fsync stays short.
pub const ZERO_AHEAD: u64 = 1024 * 1024;

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

pub(crate) fn open_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WalOpenError + 'a {
    move |source| WalOpenError {
        what,
        path: path.to_owned(),
        source,
    }
}
