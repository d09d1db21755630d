//! The log's own tests: durability and order, zero fill, cuts anywhere, group leaders, segment removal, a full log.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use super::*;

/// Counts what the log reports, as the gateway's metrics would.
#[derive(Default)]
pub(super) struct Counts {
    pub(super) bytes: AtomicU64,
    pub(super) segments: std::sync::atomic::AtomicI64,
    pub(super) fsyncs: AtomicU64,
    pub(super) write_failures: AtomicU64,
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
    fn write_failed(&self) {
        self.write_failures.fetch_add(1, Ordering::SeqCst);
    }
}

pub(super) fn config(dir: &Path, max_bytes: u64, segment_bytes: u64) -> WalConfig {
    WalConfig {
        dir: dir.to_owned(),
        max_bytes,
        segment_bytes,
    }
}

pub(super) fn payload(n: u8) -> Vec<u8> {
    let mut p = vec![0; LSN_BYTES];
    p.push(n);
    p
}

/// Appends and waits; returns the tokens handed to the "writer".
pub(super) fn append_all(wal: &Wal, payloads: Vec<Vec<u8>>) -> Vec<(u64, SegmentRef)> {
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
pub(super) fn wait_until(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "condition never held");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

pub(super) fn read_back(dir: &Path, counts: &Arc<Counts>) -> Vec<u64> {
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
