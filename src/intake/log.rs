//! The write-ahead-log backend of the intake: a submission becomes one log record; it is answered once the record's
//! group is fsynced, and its updates go on to the queue in log order (or wait on disk while the writers are
//! behind). Also the log's metrics: the log reports, this side counts.

use std::sync::Arc;
use std::time::Duration;

use super::feed::LogFeed;
use super::record::{self, RecordCodec};
use super::SubmitError;
use crate::metrics::WalMetrics;
use crate::model::Update;
use crate::pipeline::{CommitWaiter, PushError, Reservation, StreamQueue};
use crate::wal::{DurableRecord, FlushOutcome, Wal, WalError, WalObserver};

/// Appends `updates` as one record and returns once it is on disk.
pub(super) async fn submit<T: Update + RecordCodec>(
    wal: &Arc<Wal>,
    queue: &Arc<StreamQueue<T>>,
    feed: &Arc<LogFeed<T>>,
    updates: Vec<T>,
    waiter: Option<Arc<CommitWaiter>>,
    full_queue_wait: Duration,
) -> Result<(), SubmitError> {
    // A full queue is no refusal here: after a short wait for room, the updates wait in the log until the
    // writers catch up.
    let bytes = super::memory_bytes(&updates);
    let reservation = match queue.reserve_within(updates.len(), bytes, full_queue_wait).await {
        Ok(reservation) => Some(reservation),
        Err(PushError::Full { .. }) => None,
        Err(PushError::Closed) => return Err(SubmitError::ShuttingDown),
    };
    let slot = reservation
        .as_ref()
        .map_or_else(|| queue.next_slot() as u16, Reservation::slot);
    let payload = record::encode_record(slot, &updates);
    let feed = feed.clone();
    // Runs where the record's group is flushed, once the record is on disk, in log order.
    let on_durable = Box::new(move |record: &DurableRecord<'_>| feed.offer(record, reservation, updates, waiter));
    let appended = wal.append(payload, on_durable).map_err(log_error)?;
    if appended.leads {
        // A task of its own, so that the group is flushed even if this request is dropped by its client. It stays
        // on this worker's thread: the requests already read here append first, and one fsync covers them.
        let wal = Arc::clone(wal);
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            wal.flush_when_free().await;
        });
    }
    match appended.durable.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(log_error(e)),
        Err(_) => Err(SubmitError::ShuttingDown),
    }
}

fn log_error(error: WalError) -> SubmitError {
    match error {
        WalError::Full { .. } => SubmitError::LogFull,
        WalError::Closed => SubmitError::ShuttingDown,
        WalError::Io(message) => SubmitError::LogWrite(message),
        WalError::TooShort => SubmitError::LogWrite(error.to_string()),
    }
}

impl WalObserver for WalMetrics {
    fn bytes_on_disk(&self, bytes: u64) {
        self.bytes.set(bytes as i64);
    }

    fn segments_changed(&self, delta: i64) {
        self.segments.add(delta);
    }

    fn flushed(&self, outcome: FlushOutcome) {
        self.fsyncs.inc();
        self.records.inc_by(outcome.records as u64);
        self.fsync_duration.observe(outcome.elapsed.as_secs_f64());
    }

    fn write_failed(&self) {
        self.write_errors.inc();
    }

    fn corrupt_record(&self) {
        self.corrupt_records.inc();
    }
}
