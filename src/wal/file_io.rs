//! The file-I/O seam: every segment the log creates, and every write, fsync and truncation of one, goes through
//! [`FileIo`] and [`SegmentFile`], so that a test can make the disk fail where a real one would (`ENOSPC`, `EIO`, a
//! short write) and watch what the log answers. The gateway uses [`PlainFiles`]; whoever opens the log
//! ([`Recovery::open_with`](super::Recovery::open_with)) may pass another. The trait object is chosen once, when the
//! log opens, and costs one indirect call per write or fsync of a group, next to the fsync itself.
//!
//! Reading the log back (recovery, the replay) uses the files directly: a test damages those on disk instead.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// A segment file open for writing, as the log uses it.
pub trait SegmentFile: Send {
    /// Writes some of `buf` at `offset` and returns how many bytes it wrote; fewer than `buf.len()` is a short
    /// write, which the log follows with another for the rest.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// Makes what was written durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Cuts or extends the file to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// Creates the log's segment files.
pub trait FileIo: Send + Sync {
    /// Creates a new file at `path` for writing; fails if one exists.
    fn create(&self, path: &Path) -> io::Result<Box<dyn SegmentFile>>;
}

/// The files of the file system, as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainFiles;

impl FileIo for PlainFiles {
    fn create(&self, path: &Path) -> io::Result<Box<dyn SegmentFile>> {
        // Acknowledged updates are nobody else's business: the segment is readable by the gateway's user only.
        // Written at explicit offsets, not appended: the file is zero-filled ahead of its records.
        let file = OpenOptions::new().create_new(true).write(true).mode(0o600).open(path)?;
        Ok(Box::new(file))
    }
}

impl SegmentFile for File {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
        FileExt::write_at(self, buf, offset)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

/// Writes all of `buf` at `offset`, following short writes with the rest; the first error ends it, with whatever
/// part was written left in the file for the caller to cut off.
pub(super) fn write_all_at(file: &mut dyn SegmentFile, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.write_at(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the log segment took no more bytes",
                ))
            }
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
