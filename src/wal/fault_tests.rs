//! The log on a failing disk: `ENOSPC`, `EIO` and short writes injected through the file-I/O seam at each point
//! where the log writes (a group's records, their fsync, the zero fill ahead, a new segment, the cut after a
//! failure). Whatever fails, no record that was refused is handed on or read back, every record that was
//! acknowledged is read back whole, and the log goes on once the disk does.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};

use super::file_io::{FileIo, PlainFiles, SegmentFile};
use super::tests::{config, payload, Counts};
use super::*;

/// The operations the seam offers, each of which can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Sync,
    Create,
    SetLen,
}

/// What an operation does instead of its work.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Fails with this `errno`, having done nothing.
    Fail(i32),
    /// (A write only) writes at most this many bytes and says so.
    Short(usize),
}

/// A planned fault: lets `pass` operations of its kind through first.
struct Planned {
    op: Op,
    pass: usize,
    fault: Fault,
}

/// Plain files whose operations fail as planned, in order.
#[derive(Default)]
struct FailingDisk {
    plan: Mutex<VecDeque<Planned>>,
}

impl FailingDisk {
    fn plan(&self, op: Op, pass: usize, fault: Fault) {
        self.plan.lock().unwrap().push_back(Planned { op, pass, fault });
    }

    /// The fault for this operation, if the first planned one of its kind is due.
    fn fault(&self, op: Op) -> Option<Fault> {
        let mut plan = self.plan.lock().unwrap();
        let at = plan.iter().position(|p| p.op == op)?;
        if plan[at].pass > 0 {
            plan[at].pass -= 1;
            return None;
        }
        plan.remove(at).map(|p| p.fault)
    }

    fn all_used(&self) -> bool {
        self.plan.lock().unwrap().is_empty()
    }
}

fn failure(fault: Fault) -> io::Error {
    match fault {
        Fault::Fail(errno) => io::Error::from_raw_os_error(errno),
        Fault::Short(_) => unreachable!("only a write is cut short"),
    }
}

/// A file of the [`FailingDisk`].
struct FailingFile {
    file: Box<dyn SegmentFile>,
    disk: Arc<FailingDisk>,
}

impl SegmentFile for FailingFile {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
        match self.disk.fault(Op::Write) {
            None => self.file.write_at(buf, offset),
            Some(Fault::Short(n)) => self.file.write_at(&buf[..n.min(buf.len())], offset),
            Some(fault) => Err(failure(fault)),
        }
    }

    fn sync_data(&mut self) -> io::Result<()> {
        match self.disk.fault(Op::Sync) {
            None => self.file.sync_data(),
            Some(fault) => Err(failure(fault)),
        }
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        match self.disk.fault(Op::SetLen) {
            None => self.file.set_len(len),
            Some(fault) => Err(failure(fault)),
        }
    }
}

/// The disk as the log sees it.
struct Io(Arc<FailingDisk>);

impl FileIo for Io {
    fn create(&self, path: &Path) -> io::Result<Box<dyn SegmentFile>> {
        match self.0.fault(Op::Create) {
            None => Ok(Box::new(FailingFile {
                file: PlainFiles.create(path)?,
                disk: self.0.clone(),
            })),
            Some(fault) => Err(failure(fault)),
        }
    }
}

/// A log in `dir` (segments of `segment_bytes`) on a disk that fails as planned.
fn open(dir: &Path, segment_bytes: u64) -> (Wal, Arc<FailingDisk>, Arc<Counts>) {
    let disk = Arc::new(FailingDisk::default());
    let counts = Arc::new(Counts::default());
    let wal = Recovery::open_with(
        config(dir, 1 << 30, segment_bytes),
        counts.clone(),
        Arc::new(Io(disk.clone())),
    )
    .unwrap()
    .start(1)
    .unwrap();
    (wal, disk, counts)
}

/// What one group of `n` records came to: each record's answer, and the lsns handed on as durable.
struct Group {
    answers: Vec<Result<(), WalError>>,
    handed: Vec<u64>,
}

impl Group {
    fn acknowledged(&self) -> bool {
        self.answers.iter().all(Result::is_ok) && self.handed.len() == self.answers.len()
    }

    /// Every record refused with the log's I/O error, and none handed on.
    fn refused(&self) -> bool {
        self.handed.is_empty() && self.answers.iter().all(|a| matches!(a, Err(WalError::Io(_))))
    }
}

/// Appends `n` records as one group; their holds on segments are kept (as uncommitted updates), so files stay.
fn group(wal: &Wal, first: u8, n: u8) -> Group {
    let (tx, rx) = mpsc::channel();
    let waits: Vec<_> = (first..first + n)
        .map(|i| {
            let tx = tx.clone();
            wal.append(
                payload(i),
                Box::new(move |r: &DurableRecord| tx.send((r.lsn, r.token())).unwrap()),
            )
            .unwrap()
            .durable
        })
        .collect();
    wal.flush();
    let answers = waits.into_iter().map(|w| w.blocking_recv().unwrap()).collect();
    drop(tx);
    let handed = rx
        .try_iter()
        .map(|(lsn, token)| {
            std::mem::forget(token);
            lsn
        })
        .collect();
    Group { answers, handed }
}

/// The lsns of the records in the log's files, in order, and the faults met reading them.
fn on_disk(dir: &Path) -> (Vec<u64>, usize) {
    let mut segments: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    segments.sort();
    let (mut lsns, mut faults) = (Vec::new(), 0);
    for segment in segments {
        let bytes = fs::read(&segment).unwrap();
        let mut reader = frame::FrameReader::new(&bytes);
        lsns.extend(reader.by_ref().map(|p| record_lsn(p).unwrap()));
        faults += reader.faults.corrupt_records + usize::from(reader.faults.torn_tail);
    }
    (lsns, faults)
}

fn files(dir: &Path) -> usize {
    fs::read_dir(dir).unwrap().count()
}

const RECORD: u64 = (frame::HEADER_BYTES + LSN_BYTES + 1) as u64;

#[test]
fn enospc_on_a_record_write_refuses_its_group_and_the_next_group_follows_the_last_good_record() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, disk, counts) = open(dir.path(), 1 << 30);
    assert!(group(&wal, 1, 2).acknowledged());
    disk.plan(Op::Write, 0, Fault::Fail(libc::ENOSPC));
    let refused = group(&wal, 3, 2);
    assert!(refused.refused(), "{:?}", refused.answers);
    assert!(
        refused.answers[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("No space left on device"),
        "{:?}",
        refused.answers
    );
    assert_eq!(counts.write_failures.load(Ordering::SeqCst), 1);
    assert_eq!(wal.used_bytes(), 2 * RECORD, "the refused group's space is given back");
    assert!(group(&wal, 5, 1).acknowledged(), "the log goes on once the disk does");
    assert_eq!(on_disk(dir.path()), (vec![1, 2, 5], 0));
    assert_eq!(files(dir.path()), 2, "the failure sealed the segment");
}

#[test]
fn a_short_write_is_followed_by_the_rest_and_the_group_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, disk, _) = open(dir.path(), 1 << 30);
    for _ in 0..3 {
        disk.plan(Op::Write, 0, Fault::Short(5));
    }
    assert!(group(&wal, 1, 3).acknowledged());
    assert!(disk.all_used());
    assert_eq!(on_disk(dir.path()), (vec![1, 2, 3], 0));
}

#[test]
fn a_short_write_then_enospc_leaves_no_part_of_the_refused_group_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, disk, _) = open(dir.path(), 1 << 30);
    assert!(group(&wal, 1, 1).acknowledged());
    disk.plan(Op::Write, 0, Fault::Short(RECORD as usize + 3));
    disk.plan(Op::Write, 0, Fault::Fail(libc::ENOSPC));
    assert!(group(&wal, 2, 3).refused());
    assert!(disk.all_used());
    let first = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    assert_eq!(
        fs::metadata(&first).unwrap().len(),
        RECORD,
        "the sealed segment ends at its last acknowledged record"
    );
    assert!(group(&wal, 5, 1).acknowledged());
    assert_eq!(on_disk(dir.path()), (vec![1, 5], 0));
}

#[test]
fn eio_on_the_fsync_refuses_the_group_and_cuts_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, disk, counts) = open(dir.path(), 1 << 30);
    assert!(group(&wal, 1, 2).acknowledged());
    disk.plan(Op::Sync, 0, Fault::Fail(libc::EIO));
    let refused = group(&wal, 3, 2);
    assert!(refused.refused());
    assert!(
        refused.answers[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("Input/output error"),
        "{:?}",
        refused.answers
    );
    assert_eq!(counts.write_failures.load(Ordering::SeqCst), 1);
    assert!(group(&wal, 5, 2).acknowledged());
    assert_eq!(on_disk(dir.path()), (vec![1, 2, 5, 6], 0));
}

#[test]
fn a_group_whose_failed_write_cannot_be_cut_off_leaves_only_a_torn_tail_after_the_acknowledged_records() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, disk, _) = open(dir.path(), 1 << 30);
    assert!(group(&wal, 1, 2).acknowledged());
    disk.plan(Op::Write, 0, Fault::Short(5));
    disk.plan(Op::Write, 0, Fault::Fail(libc::EIO));
    disk.plan(Op::SetLen, 0, Fault::Fail(libc::EIO));
    assert!(group(&wal, 3, 2).refused());
    assert!(disk.all_used());
    assert!(group(&wal, 5, 1).acknowledged());
    let (lsns, _) = on_disk(dir.path());
    assert_eq!(
        lsns,
        vec![1, 2, 5],
        "the refused group's bytes are never read as records"
    );
}

#[test]
fn a_new_segment_that_cannot_be_created_leaves_the_current_one_growing_until_one_can() {
    let dir = tempfile::tempdir().unwrap();
    // Segments of one byte: every group rolls to a new one.
    let (wal, disk, counts) = open(dir.path(), 1);
    disk.plan(Op::Create, 0, Fault::Fail(libc::ENOSPC));
    assert!(group(&wal, 1, 2).acknowledged());
    assert_eq!(files(dir.path()), 1, "the roll failed");
    assert!(group(&wal, 3, 1).acknowledged());
    assert_eq!(files(dir.path()), 2, "the next roll went through");
    assert!(group(&wal, 4, 1).acknowledged());
    assert_eq!(files(dir.path()), 3);
    assert_eq!(counts.write_failures.load(Ordering::SeqCst), 0);
    assert_eq!(on_disk(dir.path()), (vec![1, 2, 3, 4], 0));
}

#[test]
fn a_failed_write_whose_roll_fails_too_goes_on_in_the_same_segment_after_its_last_good_record() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, disk, _) = open(dir.path(), 1 << 30);
    assert!(group(&wal, 1, 1).acknowledged());
    disk.plan(Op::Write, 0, Fault::Short(3));
    disk.plan(Op::Write, 0, Fault::Fail(libc::ENOSPC));
    disk.plan(Op::Create, 0, Fault::Fail(libc::ENOSPC));
    assert!(group(&wal, 2, 2).refused());
    assert!(disk.all_used());
    assert_eq!(files(dir.path()), 1);
    assert!(group(&wal, 4, 2).acknowledged());
    assert_eq!(on_disk(dir.path()), (vec![1, 4, 5], 0));
}

#[test]
fn enospc_while_zero_filling_ahead_costs_the_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, disk, counts) = open(dir.path(), 1 << 30);
    // The group's own write passes; the first write of zeros after it fails.
    disk.plan(Op::Write, 1, Fault::Fail(libc::ENOSPC));
    assert!(group(&wal, 1, 3).acknowledged());
    assert!(disk.all_used());
    assert_eq!(counts.write_failures.load(Ordering::SeqCst), 0);
    let segment = fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
    assert_eq!(
        fs::metadata(&segment).unwrap().len(),
        3 * RECORD,
        "no zero tail was kept"
    );
    assert!(group(&wal, 4, 1).acknowledged());
    assert_eq!(on_disk(dir.path()), (vec![1, 2, 3, 4], 0));
}
