//! The gateway's one Prometheus registry (no global) and the metric handles each part updates.
//!
//! Labelled children are looked up once, at start-up, so that the hot path is an atomic add.
//! `/stats` reads the same handles, so the JSON snapshot and `/metrics` can never disagree.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus::process_collector::ProcessCollector;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::model::tracker::{Protocol, Rejection};

pub const UPDATES_ACCEPTED: &str = "ingest_updates_accepted_total";
pub const UPDATES_REJECTED: &str = "ingest_updates_rejected_total";
pub const UPDATES_WRITTEN: &str = "ingest_updates_written_total";
pub const QUEUE_DEPTH: &str = "ingest_queue_depth";
pub const QUEUE_CAPACITY: &str = "ingest_queue_capacity";
pub const BATCHES_WRITTEN: &str = "ingest_batches_written_total";
pub const BATCH_FAILURES: &str = "ingest_batch_failures_total";
pub const LAST_BATCH_ROWS: &str = "ingest_last_batch_rows";
pub const LAST_BATCH_TIMESTAMP: &str = "ingest_last_batch_timestamp_seconds";
pub const LAST_BATCH_DURATION: &str = "ingest_last_batch_duration_seconds";
pub const OLDEST_PENDING_AGE: &str = "ingest_oldest_pending_age_seconds";
pub const WRITER_STALLED: &str = "ingest_writer_stalled_seconds";
pub const WRITER_RESTARTS: &str = "ingest_writer_restarts_total";
pub const BATCH_ROWS: &str = "ingest_batch_rows";
pub const BATCH_WRITE_DURATION: &str = "ingest_batch_write_duration_seconds";
pub const UPDATES_DUPLICATE: &str = "ingest_updates_duplicate_total";
pub const UPDATES_DEAD_LETTERED: &str = "ingest_updates_dead_lettered_total";
pub const WAL_REPLAYED: &str = "ingest_wal_replayed_updates_total";
pub const WAL_BACKLOG_BYTES: &str = "ingest_wal_backlog_bytes";
pub const WAL_REPLAY_REMAINING_BYTES: &str = "ingest_wal_replay_remaining_bytes";
pub const WAL_BYTES: &str = "ingest_wal_bytes";
pub const WAL_CAPACITY: &str = "ingest_wal_capacity_bytes";
pub const WAL_SEGMENTS: &str = "ingest_wal_segments";
pub const WAL_RECORDS: &str = "ingest_wal_records_total";
pub const WAL_FSYNCS: &str = "ingest_wal_fsyncs_total";
pub const WAL_FSYNC_DURATION: &str = "ingest_wal_fsync_duration_seconds";
pub const WAL_CORRUPT_RECORDS: &str = "ingest_wal_corrupt_records_total";
pub const WAL_WRITE_ERRORS: &str = "ingest_wal_write_errors_total";
pub const HTTP_REQUESTS: &str = "ingest_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "ingest_http_request_duration_seconds";
pub const REQUESTS_BY_KEY: &str = "ingest_requests_by_key_total";
pub const PARTITIONS_CREATED: &str = "ingest_partitions_created_total";
pub const PARTITIONS_DROPPED: &str = "ingest_partitions_dropped_total";
pub const TRACKER_FIXES: &str = "ingest_tracker_fixes_total";
pub const TRACKER_DEAD_LETTERED: &str = "ingest_tracker_dead_lettered_total";
pub const TRACKER_TIME_REPAIRS: &str = "ingest_tracker_time_repairs_total";
pub const TCP_CONNECTIONS: &str = "ingest_tcp_connections";
pub const TCP_CONNECTIONS_REFUSED: &str = "ingest_tcp_connections_refused_total";
pub const TCP_HANDSHAKES_REFUSED: &str = "ingest_tcp_handshakes_refused_total";
pub const TCP_BAD_PACKETS: &str = "ingest_tcp_bad_packets_total";
pub const TCP_INTAKE_WAITS: &str = "ingest_tcp_intake_waits_total";
pub const UPDATES_CONFLICTING: &str = "ingest_updates_conflicting_total";
pub const AUTH_ENABLED: &str = "ingest_auth_enabled";
pub const API_KEYS: &str = "ingest_api_keys";
pub const API_KEYS_FILE_USABLE: &str = "ingest_api_keys_file_usable";
pub const JETSTREAM_RECORDS_REFUSED: &str = "ingest_jetstream_records_refused_total";
pub const JETSTREAM_UPDATES_INVALID: &str = "ingest_jetstream_updates_invalid_total";
pub const COMMIT_NOTICES_REFUSED: &str = "ingest_jetstream_commit_notices_refused_total";

/// Why updates were refused: a small fixed set, never an error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    InvalidJson,
    PayloadTooLarge,
    UnsupportedMediaType,
    InvalidUpdate,
    Overloaded,
    ShuttingDown,
    /// The write-ahead log is at its size bound.
    LogFull,
    /// The write-ahead log could not be written (disk full, IO error).
    StorageError,
    /// The body arrived too slowly, or not whole in time.
    BodyTimeout,
    /// No API key, or one the gateway does not know.
    Unauthorized,
    /// A stream or an update outside what the request's API key may write.
    Forbidden,
    /// Over the rate limit of the request's API key or client address.
    RateLimited,
}

impl RejectReason {
    pub const ALL: [RejectReason; 12] = [
        RejectReason::InvalidJson,
        RejectReason::PayloadTooLarge,
        RejectReason::UnsupportedMediaType,
        RejectReason::InvalidUpdate,
        RejectReason::Overloaded,
        RejectReason::ShuttingDown,
        RejectReason::LogFull,
        RejectReason::StorageError,
        RejectReason::BodyTimeout,
        RejectReason::Unauthorized,
        RejectReason::Forbidden,
        RejectReason::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::PayloadTooLarge => "payload_too_large",
            RejectReason::UnsupportedMediaType => "unsupported_media_type",
            RejectReason::InvalidUpdate => "invalid_update",
            RejectReason::Overloaded => "overloaded",
            RejectReason::ShuttingDown => "shutting_down",
            RejectReason::LogFull => "log_full",
            RejectReason::StorageError => "storage_error",
            RejectReason::BodyTimeout => "body_timeout",
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::Forbidden => "forbidden",
            RejectReason::RateLimited => "rate_limited",
        }
    }
}

/// Every metric of the gateway.
pub struct Metrics {
    /// What `/metrics` encodes.
    pub registry: Registry,
    /// Request counts and latencies by route and status.
    pub http: HttpMetrics,
    /// The `location` stream.
    pub location: StreamMetrics,
    /// The `poll` stream.
    pub poll: StreamMetrics,
    /// The `dead_letter` stream: tracker fixes that can never be stored, on their way to `dead_letters`.
    pub dead_letter: StreamMetrics,
    /// The write-ahead log.
    pub wal: WalMetrics,
    /// Ingest requests by API key name and outcome; the names come from the operator's keys file, so the label
    /// set stays as small as that file.
    pub requests_by_key: IntCounterVec,
    /// Time partitions made and dropped, by `stream`.
    pub partitions: PartitionMetrics,
    /// What the trackers' own protocols brought, by `protocol`.
    pub trackers: TrackerMetrics,
    /// The hardware trackers' TCP listeners, by `protocol`.
    pub tcp: TcpMetrics,
    /// The gateway's access control, for alerts on a gateway open to anyone or refusing everyone.
    pub access: AccessMetrics,
    /// Records and notices refused at the JetStream trust boundary.
    pub jetstream: JetStreamMetrics,
}

/// Whether writes need a key, and whether the keys file in force can be used.
#[derive(Clone)]
pub struct AccessMetrics {
    /// 1 when writes need an API key, 0 when anyone may write.
    pub auth_enabled: IntGauge,
    /// Keys in force.
    pub keys: IntGauge,
    /// 1 while the keys file loaded at the last (re)load could be used; 0 when it could not, and every write is
    /// refused until it can.
    pub keys_file_usable: IntGauge,
}

/// What the writers refused from JetStream and what the gateways refused of the writers' commit notices. The
/// label values are small fixed sets.
#[derive(Clone)]
pub struct JetStreamMetrics {
    /// Whole records a writer refused, by `stream` and `reason` (`unsigned`, `bad_signature`, `undecodable`), kept
    /// in `dead_letters`.
    pub records_refused: IntCounterVec,
    /// Updates of signed records that broke a rule when a writer checked them again, by `stream`, kept in
    /// `dead_letters` (reason `invalid`).
    pub updates_invalid: IntCounterVec,
    /// Commit notices not sent or not believed, by `reason`: `reply_subject` (a writer asked to send one outside
    /// the inbox prefix), `unsigned`, `bad_signature`, `unknown_message` (a gateway got one it cannot match).
    pub commit_notices_refused: IntCounterVec,
}

/// The tracker routes' figures. The label values come from small fixed sets (the protocols, the outcomes, the
/// reasons a fix can never be stored), named by the model.
#[derive(Clone)]
pub struct TrackerMetrics {
    /// Fixes and messages by `protocol` and `outcome`: `stored`, `dead_lettered`, `ignored` (a message that is
    /// no fix, answered and not stored).
    pub fixes: IntCounterVec,
    /// Fixes that can never be stored, kept in `dead_letters`, by `protocol` and `reason`.
    pub dead_lettered: IntCounterVec,
    /// Fix times moved forward by 1024 GPS weeks (a receiver with the week-rollover bug), by `protocol`.
    pub time_repairs: IntCounterVec,
    /// Every protocol's series of the three, in the order of `Protocol::ALL`.
    by_protocol: Arc<[TrackerCounters]>,
}

impl TrackerMetrics {
    /// Makes every protocol's series of the families, at zero.
    fn new(fixes: IntCounterVec, dead_lettered: IntCounterVec, time_repairs: IntCounterVec) -> Self {
        let by_protocol = Protocol::ALL
            .iter()
            .map(|p| TrackerCounters::new(&fixes, &dead_lettered, &time_repairs, p.name()))
            .collect();
        TrackerMetrics {
            fixes,
            dead_lettered,
            time_repairs,
            by_protocol,
        }
    }

    /// `protocol`'s series, looked up when the metrics were made: a request counts with atomic adds alone.
    pub fn of(&self, protocol: Protocol) -> &TrackerCounters {
        &self.by_protocol[protocol as usize]
    }
}

/// One protocol's series of the tracker counters.
#[derive(Clone)]
pub struct TrackerCounters {
    /// `fixes{outcome="stored"}`.
    pub stored: IntCounter,
    /// `fixes{outcome="dead_lettered"}`.
    pub dead_lettered: IntCounter,
    /// `fixes{outcome="ignored"}`.
    pub ignored: IntCounter,
    pub time_repairs: IntCounter,
    /// `dead_lettered{reason}`, in the order of `Rejection::ALL`.
    by_reason: Vec<IntCounter>,
}

impl TrackerCounters {
    fn new(fixes: &IntCounterVec, dead_lettered: &IntCounterVec, time_repairs: &IntCounterVec, name: &str) -> Self {
        TrackerCounters {
            stored: fixes.with_label_values(&[name, "stored"]),
            dead_lettered: fixes.with_label_values(&[name, "dead_lettered"]),
            ignored: fixes.with_label_values(&[name, "ignored"]),
            time_repairs: time_repairs.with_label_values(&[name]),
            by_reason: Rejection::ALL
                .iter()
                .map(|r| dead_lettered.with_label_values(&[name, r.code()]))
                .collect(),
        }
    }

    /// The `dead_lettered{reason}` series of `rejection`.
    pub fn rejected(&self, rejection: Rejection) -> &IntCounter {
        &self.by_reason[rejection as usize]
    }
}

/// The time partitions' figures, labelled by `stream`.
#[derive(Clone)]
pub struct PartitionMetrics {
    pub created: IntCounterVec,
    /// Dropped past the retention.
    pub dropped: IntCounterVec,
}

/// The write-ahead log's figures.
#[derive(Clone)]
pub struct WalMetrics {
    /// Bytes of the log on disk (segments not yet deleted).
    pub bytes: IntGauge,
    pub capacity: IntGauge,
    pub segments: IntGauge,
    pub records: IntCounter,
    pub fsyncs: IntCounter,
    pub fsync_duration: Histogram,
    /// Records found damaged (checksum, torn tail) when the log was read back.
    pub corrupt_records: IntCounter,
    pub write_errors: IntCounter,
}

/// The metrics of one stream, children of the labelled families.
#[derive(Clone)]
pub struct StreamMetrics {
    pub accepted: IntCounter,
    /// Indexed like [`RejectReason::ALL`]. A request whose updates could not be counted (bad JSON, too large,
    /// wrong content type) counts as one.
    rejected: Vec<IntCounter>,
    pub written: IntCounter,
    /// Updates absorbed because the same natural key was already stored.
    pub duplicates: IntCounter,
    /// Updates PostgreSQL refused for good, kept in `dead_letters`.
    pub dead_lettered: IntCounter,
    /// Updates read back from the write-ahead log (after a restart, or after writers fell behind).
    pub replayed: IntCounter,
    /// Bytes of write-ahead log waiting to be read back because the writers fell behind (0 when none).
    pub backlog_bytes: IntGauge,
    /// Bytes of the previous run's log not yet read back at start-up (0 once replayed: the gateway can be ready).
    pub replay_remaining_bytes: IntGauge,
    /// Updates accepted and not yet written (in the queue or in a batch being written).
    pub queue_depth: IntGauge,
    pub queue_capacity: IntGauge,
    pub batches_written: IntCounter,
    pub batch_failures: IntCounter,
    pub last_batch_rows: IntGauge,
    pub last_batch_timestamp: Gauge,
    pub last_batch_duration: Gauge,
    pub oldest_pending_age: Gauge,
    /// How long the writers have failed, labelled with why.
    pub stalled: StallGauge,
    pub writer_restarts: IntCounter,
    pub batch_rows: Histogram,
    pub batch_write_duration: Histogram,
    /// Updates whose natural key was already stored with other content, kept in `dead_letters` (reason
    /// `conflict`): a device's broken clock, or someone writing its key first.
    pub conflicting: IntCounter,
}

/// One stream's series of `ingest_writer_stalled_seconds`: a single series, whose `reason` label follows the
/// latest failure, so that a change of reason leaves no stale series behind.
#[derive(Clone)]
pub struct StallGauge {
    family: GaugeVec,
    stream: String,
    /// The reason of the series now exported, if any.
    reason: Arc<Mutex<Option<String>>>,
}

impl StallGauge {
    /// Sets the gauge: `Some((seconds, reason))` while stalled, `None` once writing again.
    pub fn set(&self, stall: Option<(f64, &str)>) {
        let mut current = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let reason = stall.map_or("none", |(_, r)| r);
        if current.as_deref() != Some(reason) {
            if let Some(old) = current.take() {
                let _ = self.family.remove_label_values(&[&self.stream, &old]);
            }
            *current = Some(reason.to_owned());
        }
        self.family
            .with_label_values(&[&self.stream, reason])
            .set(stall.map_or(0.0, |(s, _)| s));
    }
}

impl StreamMetrics {
    pub fn rejected(&self, reason: RejectReason) -> &IntCounter {
        &self.rejected[reason as usize]
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(IntCounter::get).sum()
    }
}

/// Request counts and latencies.
#[derive(Clone)]
pub struct HttpMetrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
}

impl Metrics {
    /// Builds and registers every metric, including the process's own (`process_*`).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c);

        let stream = &["stream"];
        let accepted = IntCounterVec::new(Opts::new(UPDATES_ACCEPTED, "Updates answered 202"), stream)?;
        let rejected = IntCounterVec::new(
            Opts::new(
                UPDATES_REJECTED,
                "Updates refused, by reason (a body that could not be read counts as one)",
            ),
            &["stream", "reason"],
        )?;
        let written = IntCounterVec::new(Opts::new(UPDATES_WRITTEN, "Updates committed in PostgreSQL"), stream)?;
        let depth = IntGaugeVec::new(Opts::new(QUEUE_DEPTH, "Updates accepted and not yet written"), stream)?;
        let capacity = IntGaugeVec::new(
            Opts::new(
                QUEUE_CAPACITY,
                "Updates the queue holds before it is full: then `wal` waits in the log, `memory` answers 503",
            ),
            stream,
        )?;
        let batches = IntCounterVec::new(Opts::new(BATCHES_WRITTEN, "Batches committed"), stream)?;
        let failures = IntCounterVec::new(
            Opts::new(BATCH_FAILURES, "Batch writes that failed (and were retried)"),
            stream,
        )?;
        let last_rows = IntGaugeVec::new(Opts::new(LAST_BATCH_ROWS, "Rows in the last batch written"), stream)?;
        let last_at = GaugeVec::new(
            Opts::new(LAST_BATCH_TIMESTAMP, "Unix time the last batch was written"),
            stream,
        )?;
        let last_duration = GaugeVec::new(
            Opts::new(LAST_BATCH_DURATION, "How long the last batch write took"),
            stream,
        )?;
        let stalled = GaugeVec::new(
            Opts::new(
                WRITER_STALLED,
                "How long the stream's writers have failed to write, by why (SQLSTATE class, connection, timeout, \
                 panic); 0 while they write",
            ),
            &["stream", "reason"],
        )?;
        let restarts = IntCounterVec::new(
            Opts::new(WRITER_RESTARTS, "Batch writers that panicked and were restarted"),
            stream,
        )?;
        let oldest = GaugeVec::new(
            Opts::new(
                OLDEST_PENDING_AGE,
                "Age of the oldest update accepted and not yet written (0 when none)",
            ),
            stream,
        )?;
        let batch_rows = HistogramVec::new(
            HistogramOpts::new(BATCH_ROWS, "Rows per batch written").buckets(vec![
                1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
            ]),
            stream,
        )?;
        let batch_seconds = HistogramVec::new(
            HistogramOpts::new(BATCH_WRITE_DURATION, "Time to write one batch (COPY and commit)")
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
            stream,
        )?;
        let duplicates = IntCounterVec::new(
            Opts::new(UPDATES_DUPLICATE, "Updates absorbed as repeats of a stored key"),
            stream,
        )?;
        let dead = IntCounterVec::new(
            Opts::new(
                UPDATES_DEAD_LETTERED,
                "Updates refused by PostgreSQL for good, kept in dead_letters",
            ),
            stream,
        )?;
        let replayed = IntCounterVec::new(
            Opts::new(
                WAL_REPLAYED,
                "Updates read back from the write-ahead log (after a restart, or after writers fell behind)",
            ),
            stream,
        )?;
        let backlog = IntGaugeVec::new(
            Opts::new(
                WAL_BACKLOG_BYTES,
                "Bytes of write-ahead log waiting to be read back into the queue",
            ),
            stream,
        )?;
        let replay_remaining = IntGaugeVec::new(
            Opts::new(
                WAL_REPLAY_REMAINING_BYTES,
                "Bytes of the previous run's write-ahead log not yet read back at start-up",
            ),
            stream,
        )?;
        let wal = WalMetrics {
            bytes: IntGauge::new(WAL_BYTES, "Bytes of write-ahead log on disk")?,
            capacity: IntGauge::new(WAL_CAPACITY, "Bound of the write-ahead log in bytes")?,
            segments: IntGauge::new(WAL_SEGMENTS, "Write-ahead log segment files on disk")?,
            records: IntCounter::new(WAL_RECORDS, "Records appended to the write-ahead log")?,
            fsyncs: IntCounter::new(WAL_FSYNCS, "fsyncs of the write-ahead log (one per group commit)")?,
            fsync_duration: Histogram::with_opts(
                HistogramOpts::new(WAL_FSYNC_DURATION, "Time to write and fsync one group of records")
                    .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16)?),
            )?,
            corrupt_records: IntCounter::new(
                WAL_CORRUPT_RECORDS,
                "Damaged records (checksum mismatch, torn tail) skipped when reading the log back",
            )?,
            write_errors: IntCounter::new(WAL_WRITE_ERRORS, "Failed writes or fsyncs of the write-ahead log")?,
        };
        let requests = IntCounterVec::new(
            Opts::new(HTTP_REQUESTS, "HTTP requests, by route and status"),
            &["route", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(HTTP_REQUEST_DURATION, "HTTP request latency, by route and status")
                .buckets(prometheus::exponential_buckets(0.0001, 2.0, 17)?),
            &["route", "status"],
        )?;

        reg(Box::new(accepted.clone()))?;
        reg(Box::new(rejected.clone()))?;
        reg(Box::new(written.clone()))?;
        reg(Box::new(depth.clone()))?;
        reg(Box::new(capacity.clone()))?;
        reg(Box::new(batches.clone()))?;
        reg(Box::new(failures.clone()))?;
        reg(Box::new(last_rows.clone()))?;
        reg(Box::new(last_at.clone()))?;
        reg(Box::new(last_duration.clone()))?;
        reg(Box::new(oldest.clone()))?;
        reg(Box::new(stalled.clone()))?;
        reg(Box::new(restarts.clone()))?;
        reg(Box::new(batch_rows.clone()))?;
        reg(Box::new(batch_seconds.clone()))?;
        reg(Box::new(duplicates.clone()))?;
        reg(Box::new(dead.clone()))?;
        reg(Box::new(replayed.clone()))?;
        reg(Box::new(backlog.clone()))?;
        reg(Box::new(replay_remaining.clone()))?;
        reg(Box::new(wal.bytes.clone()))?;
        reg(Box::new(wal.capacity.clone()))?;
        reg(Box::new(wal.segments.clone()))?;
        reg(Box::new(wal.records.clone()))?;
        reg(Box::new(wal.fsyncs.clone()))?;
        reg(Box::new(wal.fsync_duration.clone()))?;
        reg(Box::new(wal.corrupt_records.clone()))?;
        reg(Box::new(wal.write_errors.clone()))?;
        reg(Box::new(requests.clone()))?;
        reg(Box::new(duration.clone()))?;
        let requests_by_key = IntCounterVec::new(
            Opts::new(
                REQUESTS_BY_KEY,
                "Ingest requests that presented a known API key, by key name and outcome",
            ),
            &["key", "outcome"],
        )?;
        reg(Box::new(requests_by_key.clone()))?;
        let partitions = PartitionMetrics {
            created: IntCounterVec::new(Opts::new(PARTITIONS_CREATED, "Time partitions made"), stream)?,
            dropped: IntCounterVec::new(
                Opts::new(PARTITIONS_DROPPED, "Time partitions dropped past the retention"),
                stream,
            )?,
        };
        reg(Box::new(partitions.created.clone()))?;
        reg(Box::new(partitions.dropped.clone()))?;
        let trackers = TrackerMetrics::new(
            IntCounterVec::new(
                Opts::new(
                    TRACKER_FIXES,
                    "Fixes and messages of the trackers' own protocols, by outcome (stored, dead_lettered, ignored)",
                ),
                &["protocol", "outcome"],
            )?,
            IntCounterVec::new(
                Opts::new(
                    TRACKER_DEAD_LETTERED,
                    "Tracker fixes that can never be stored, answered as success and kept in dead_letters",
                ),
                &["protocol", "reason"],
            )?,
            IntCounterVec::new(
                Opts::new(
                    TRACKER_TIME_REPAIRS,
                    "Tracker fix times moved forward by 1024 GPS weeks (the week-rollover bug)",
                ),
                &["protocol"],
            )?,
        );
        reg(Box::new(trackers.fixes.clone()))?;
        reg(Box::new(trackers.dead_lettered.clone()))?;
        reg(Box::new(trackers.time_repairs.clone()))?;
        let tcp = TcpMetrics {
            connections: IntGaugeVec::new(
                Opts::new(TCP_CONNECTIONS, "Device connections open on the tracker TCP listeners"),
                &["protocol"],
            )?,
            connections_refused: IntCounterVec::new(
                Opts::new(
                    TCP_CONNECTIONS_REFUSED,
                    "Device connections closed as soon as accepted, by reason (total_limit, address_limit)",
                ),
                &["protocol", "reason"],
            )?,
            handshakes_refused: IntCounterVec::new(
                Opts::new(
                    TCP_HANDSHAKES_REFUSED,
                    "Devices refused at their handshake (or at a packet once their id was removed from the keys), \
                     by reason",
                ),
                &["protocol", "reason"],
            )?,
            bad_packets: IntCounterVec::new(
                Opts::new(
                    TCP_BAD_PACKETS,
                    "Device packets not acknowledged because they could not be read, by reason",
                ),
                &["protocol", "reason"],
            )?,
            intake_waits: IntCounterVec::new(
                Opts::new(
                    TCP_INTAKE_WAITS,
                    "Device packets whose submission waited for a full intake (the device not read meanwhile), \
                     by reason",
                ),
                &["protocol", "reason"],
            )?,
        };
        reg(Box::new(tcp.connections.clone()))?;
        reg(Box::new(tcp.connections_refused.clone()))?;
        reg(Box::new(tcp.handshakes_refused.clone()))?;
        reg(Box::new(tcp.bad_packets.clone()))?;
        reg(Box::new(tcp.intake_waits.clone()))?;
        reg(Box::new(ProcessCollector::for_self()))?;
        let conflicting = IntCounterVec::new(
            Opts::new(
                UPDATES_CONFLICTING,
                "Updates whose natural key was already stored with other content, kept in dead_letters (reason \
                 conflict); the first write is kept",
            ),
            stream,
        )?;
        reg(Box::new(conflicting.clone()))?;

        let for_stream = |name: &str| StreamMetrics {
            accepted: accepted.with_label_values(&[name]),
            rejected: RejectReason::ALL
                .iter()
                .map(|r| rejected.with_label_values(&[name, r.as_str()]))
                .collect(),
            written: written.with_label_values(&[name]),
            duplicates: duplicates.with_label_values(&[name]),
            dead_lettered: dead.with_label_values(&[name]),
            replayed: replayed.with_label_values(&[name]),
            backlog_bytes: backlog.with_label_values(&[name]),
            replay_remaining_bytes: replay_remaining.with_label_values(&[name]),
            queue_depth: depth.with_label_values(&[name]),
            queue_capacity: capacity.with_label_values(&[name]),
            batches_written: batches.with_label_values(&[name]),
            batch_failures: failures.with_label_values(&[name]),
            last_batch_rows: last_rows.with_label_values(&[name]),
            last_batch_timestamp: last_at.with_label_values(&[name]),
            last_batch_duration: last_duration.with_label_values(&[name]),
            oldest_pending_age: oldest.with_label_values(&[name]),
            stalled: StallGauge {
                family: stalled.clone(),
                stream: name.to_owned(),
                reason: Arc::new(Mutex::new(None)),
            },
            writer_restarts: restarts.with_label_values(&[name]),
            batch_rows: batch_rows.with_label_values(&[name]),
            batch_write_duration: batch_seconds.with_label_values(&[name]),
            conflicting: conflicting.with_label_values(&[name]),
        };
        let access = AccessMetrics {
            auth_enabled: IntGauge::new(AUTH_ENABLED, "1 when writes need an API key, 0 when anyone may write")?,
            keys: IntGauge::new(API_KEYS, "API keys in force")?,
            keys_file_usable: IntGauge::new(
                API_KEYS_FILE_USABLE,
                "1 while the API keys file could be used at its last load; 0 when it could not and every write is \
                 refused until it can",
            )?,
        };
        reg(Box::new(access.auth_enabled.clone()))?;
        reg(Box::new(access.keys.clone()))?;
        reg(Box::new(access.keys_file_usable.clone()))?;
        let jetstream = JetStreamMetrics {
            records_refused: IntCounterVec::new(
                Opts::new(
                    JETSTREAM_RECORDS_REFUSED,
                    "JetStream records a writer refused whole (unsigned, bad_signature, undecodable), kept in \
                     dead_letters",
                ),
                &["stream", "reason"],
            )?,
            updates_invalid: IntCounterVec::new(
                Opts::new(
                    JETSTREAM_UPDATES_INVALID,
                    "Updates of signed JetStream records that broke a rule when checked again by a writer, kept in \
                     dead_letters",
                ),
                stream,
            )?,
            commit_notices_refused: IntCounterVec::new(
                Opts::new(
                    COMMIT_NOTICES_REFUSED,
                    "Commit notices not sent (reply_subject) or not believed (unsigned, bad_signature, \
                     unknown_message)",
                ),
                &["reason"],
            )?,
        };
        reg(Box::new(jetstream.records_refused.clone()))?;
        reg(Box::new(jetstream.updates_invalid.clone()))?;
        reg(Box::new(jetstream.commit_notices_refused.clone()))?;
        Ok(Metrics {
            location: for_stream("location"),
            poll: for_stream("poll"),
            dead_letter: for_stream("dead_letter"),
            http: HttpMetrics { requests, duration },
            wal,
            requests_by_key,
            partitions,
            trackers,
            tcp,
            access,
            jetstream,
            registry,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let families = self.registry.gather();
        // Encoding into a String only fails on invalid metric names, which `new` would have refused.
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_default()
    }
}

/// The tracker TCP listeners' figures. The reasons come from small fixed sets named by `crate::tcp`.
#[derive(Clone)]
pub struct TcpMetrics {
    /// Device connections open now.
    pub connections: IntGaugeVec,
    /// Connections closed as soon as accepted: over the total or the per-address cap.
    pub connections_refused: IntCounterVec,
    /// Devices refused at their handshake (an unknown or invalid id, the gateway stopping), or at a packet once
    /// their id was taken out of the keys file.
    pub handshakes_refused: IntCounterVec,
    /// Packets not acknowledged (bad CRC, malformed, oversized, unsupported codec, a read timeout).
    pub bad_packets: IntCounterVec,
    /// Packets whose submission waited for a full intake while the device was not read.
    pub intake_waits: IntCounterVec,
}

impl TcpMetrics {
    /// `protocol`'s series of a `protocol`, `reason` family, by reason: every reason the listener made at start.
    pub fn by_reason(family: &IntCounterVec, protocol: &str) -> BTreeMap<String, u64> {
        use prometheus::core::Collector;
        let mut reasons = BTreeMap::new();
        for metrics in family.collect() {
            for metric in metrics.get_metric() {
                let labels = metric.get_label();
                let label = |name: &str| labels.iter().find(|l| l.name() == name).map(|l| l.value());
                if let (Some(p), Some(reason)) = (label("protocol"), label("reason")) {
                    if p == protocol {
                        reasons.insert(reason.to_owned(), metric.get_counter().get_value() as u64);
                    }
                }
            }
        }
        reasons
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-protocol and per-reason series are found by the enums' positions, which must be those of `ALL`.
    #[test]
    fn each_protocol_and_reason_counts_in_its_own_labelled_series() {
        let metrics = Metrics::new().unwrap();
        let m = &metrics.trackers;
        for (i, protocol) in Protocol::ALL.into_iter().enumerate() {
            let name = protocol.name();
            let counters = m.of(protocol);
            counters.stored.inc_by(1 + i as u64);
            counters.dead_lettered.inc_by(2 + i as u64);
            counters.ignored.inc_by(3 + i as u64);
            counters.time_repairs.inc_by(4 + i as u64);
            assert_eq!(m.fixes.with_label_values(&[name, "stored"]).get(), 1 + i as u64);
            assert_eq!(m.fixes.with_label_values(&[name, "dead_lettered"]).get(), 2 + i as u64);
            assert_eq!(m.fixes.with_label_values(&[name, "ignored"]).get(), 3 + i as u64);
            assert_eq!(m.time_repairs.with_label_values(&[name]).get(), 4 + i as u64);
            for (j, rejection) in Rejection::ALL.into_iter().enumerate() {
                counters.rejected(rejection).inc_by((10 * i + j) as u64);
                assert_eq!(
                    m.dead_lettered.with_label_values(&[name, rejection.code()]).get(),
                    (10 * i + j) as u64
                );
            }
        }
    }
}
