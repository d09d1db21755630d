//! Group commit: records appended while a group's fsync runs wait and share the next one, led by the append that
//! opened the group; each record is handed on, in log order, only once it is on disk.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::error;

use super::file_io::write_all_at;
use super::segment::{Accounting, ActiveSegment, Segment, SegmentRef};
use super::{frame, FlushOutcome, WalError, LSN_BYTES};

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

pub(super) struct Pending {
    lsn: u64,
    /// Where the frame starts in the group's buffer, and its length.
    buf_offset: usize,
    len: usize,
    on_durable: OnDurable,
    done: oneshot::Sender<Result<(), WalError>>,
}

pub(super) struct State {
    /// Framed records appended since the last flush took the buffer: the next group.
    pub(super) buf: Vec<u8>,
    pub(super) pending: Vec<Pending>,
    pub(super) next_lsn: u64,
    /// A leader was named since the last flush took the buffer, and will flush: later appends join its group.
    pub(super) leader_named: bool,
    pub(super) closed: bool,
}

/// The running log.
///
/// Group commit without a flusher thread: the append that opens a group makes its caller the group's leader,
/// which flushes once the other requests ready on its worker have appended. The acknowledged path then hands
/// nothing to another thread; a second leader waits (without blocking its worker) while the first one's fsync
/// runs, and takes everything appended meanwhile as one group.
pub struct Wal {
    pub(super) state: Mutex<State>,
    /// Held for a group's write and fsync; taken before `state`, never after.
    pub(super) file: Mutex<ActiveSegment>,
    /// Woken when a group's fsync is over and `file` free.
    pub(super) file_free: tokio::sync::Notify,
    pub(super) accounting: Arc<Accounting>,
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

impl ActiveSegment {
    pub(super) fn write_group(&mut self, buf: &[u8], pending: Vec<Pending>, accounting: &Arc<Accounting>) {
        let observer = &accounting.observer;
        let started = Instant::now();
        let at = self.segment.bytes.load(Ordering::Acquire);
        let written = write_all_at(self.file.as_mut(), buf, at).and_then(|()| {
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
}
