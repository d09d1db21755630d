//! `GET /stats` (a JSON snapshot for humans and scripts) and `GET /metrics` (Prometheus text), both read from
//! the same metric handles.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::{web, HttpResponse};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::AppState;
use crate::config::Durability;
use crate::intake::feed::ReplaySnapshot;
use crate::metrics::{RejectReason, StreamMetrics, TcpMetrics, TrackerMetrics, WalMetrics};
use crate::model::tracker::{Protocol, Rejection};

/// The body of `/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Stats {
    /// The gateway's clock (Unix milliseconds), so that a reader computes rates without trusting its own.
    pub now_unix_ms: u64,
    /// What a `202` promises: `wal` (on disk) or `memory`.
    #[schema(pattern = "^(wal|memory)$")]
    pub durability: &'static str,
    /// Each stream's figures.
    pub streams: Streams,
    /// The write-ahead log's figures.
    pub wal: WalStats,
    /// What each tracker protocol brought (`osmand`, `owntracks`, `overland`, `traccar`, `teltonika`).
    pub trackers: BTreeMap<&'static str, TrackerStats>,
    /// Who may write.
    pub auth: AuthStats,
}

/// Whether writes need an API key, as `ingest_auth_enabled`, `ingest_api_keys` and `ingest_api_keys_file_usable`
/// say.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuthStats {
    /// Whether writes need an API key; `false`: anyone who reaches the gateway may write any device.
    pub enabled: bool,
    /// Keys in force.
    pub keys: i64,
    /// Whether the keys file could be used at its last load; `false`: every write is refused until it can.
    pub keys_file_usable: bool,
}

/// One tracker protocol's figures since the gateway started.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrackerStats {
    /// Fixes handed to the location stream.
    pub stored: u64,
    /// Fixes that can never be stored, answered as success and kept in `dead_letters`, by reason.
    pub dead_lettered: BTreeMap<&'static str, u64>,
    /// Messages that are no fix (an OwnTracks `lwt`, an Overland visit): answered, not stored.
    pub ignored: u64,
    /// Fix times moved forward by 1024 GPS weeks.
    pub time_repairs: u64,
    /// The device connections of a protocol spoken over TCP (`teltonika`); absent for the HTTP protocols.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpStats>,
}

/// A TCP tracker protocol's connections since the gateway started.
#[derive(Debug, Serialize, ToSchema)]
pub struct TcpStats {
    /// Device connections open now.
    pub connections: i64,
    /// Connections closed as soon as accepted, by reason (`total_limit`, `address_limit`).
    pub connections_refused: BTreeMap<String, u64>,
    /// Devices refused at their handshake (or at a packet, once their id was taken out of the keys), by reason
    /// (`unknown_device`, `invalid_device_id`, `revoked`, `shutting_down`).
    pub handshakes_refused: BTreeMap<String, u64>,
    /// Packets not acknowledged because they could not be read, by reason (`bad_crc`, `malformed`, `oversized`,
    /// `unsupported_codec`, `read_timeout`).
    pub bad_packets: BTreeMap<String, u64>,
    /// Packets whose submission waited for a full intake, the device not read meanwhile, by reason.
    pub intake_waits: BTreeMap<String, u64>,
}

/// Each stream's figures.
#[derive(Debug, Serialize, ToSchema)]
pub struct Streams {
    /// `POST /api/v1/location/update`.
    pub location: StreamStats,
    /// `POST /api/v1/poll/update`.
    pub poll: StreamStats,
    /// The fixes the tracker routes answered as success but can never store, on their way to `dead_letters`
    /// (`accepted`: handed over, `written`: stored there).
    pub dead_letter: StreamStats,
}

/// One stream's figures since the gateway started, as `/metrics` exports them.
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamStats {
    /// Updates answered 202.
    pub accepted: u64,
    /// Updates refused, for every reason.
    pub rejected: u64,
    /// Updates refused, by reason (`invalid_json`, `payload_too_large`, `overloaded`, …).
    pub rejected_by_reason: BTreeMap<&'static str, u64>,
    /// Updates committed in PostgreSQL.
    pub written: u64,
    /// Updates absorbed because their key was already stored.
    pub duplicate: u64,
    /// Updates PostgreSQL refused for good, kept in `dead_letters`.
    pub dead_lettered: u64,
    /// Updates read back from the write-ahead log.
    pub replayed: u64,
    /// Log waiting to be read back because the writers fell behind.
    pub wal_backlog_bytes: i64,
    /// Updates accepted and not yet written.
    pub queue_depth: i64,
    /// The queue's bound.
    pub queue_capacity: i64,
    /// Batches committed.
    pub batches_written: u64,
    /// Failed batch attempts (each is retried).
    pub batch_failures: u64,
    /// Rows in the last batch committed.
    pub last_batch_rows: i64,
    /// When the last batch was committed (RFC 3339); `null` before the first.
    #[schema(format = DateTime)]
    pub last_batch_at: Option<String>,
    /// How long the last batch took to write.
    pub last_batch_duration_ms: f64,
    /// Age of the oldest update accepted and not yet written.
    pub oldest_pending_age_ms: f64,
    /// How long the stream's writers have failed to write (0 while they write).
    pub writers_failing_s: f64,
    /// Why they fail: a SQLSTATE class (`sqlstate_42`), `connection`, `timeout` or `panic`; `null` while they write.
    pub writers_failing_reason: Option<String>,
    /// Whether the log left by the previous run is still being read back.
    pub replaying: bool,
    /// Bytes of that log read back so far.
    pub replay_done_bytes: u64,
    /// Bytes of that log in all.
    pub replay_total_bytes: u64,
    /// Updates whose key was already stored with other content, kept in `dead_letters` (reason `conflict`).
    pub conflicting: u64,
}

/// The write-ahead log.
#[derive(Debug, Serialize, ToSchema)]
pub struct WalStats {
    /// Bytes on disk.
    pub bytes: i64,
    /// The bound on `bytes` (`INGEST_WAL_MAX_BYTES`).
    pub capacity_bytes: i64,
    /// Segment files on disk.
    pub segments: i64,
    /// Appends since start.
    pub records: u64,
    /// Group commits since start.
    pub fsyncs: u64,
    /// Damaged records skipped on read-back.
    pub corrupt_records: u64,
    /// Failed writes.
    pub write_errors: u64,
}

/// The metrics in Prometheus text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "get_metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition (version 0.0.4)", body = String,
        content_type = "text/plain")),
)]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state.refresh_gauges();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.encode())
}

/// A JSON snapshot of every stage.
///
/// Per stream accepted / rejected / written, queue depth and capacity, batches, failures, last batch, oldest
/// pending update; and the write-ahead log.
#[utoipa::path(
    get,
    path = "/stats",
    operation_id = "get_stats",
    tag = "operations",
    responses((status = 200, description = "The figures now", body = Stats)),
)]
pub async fn stats(state: web::Data<AppState>) -> HttpResponse {
    state.refresh_gauges();
    // The gateway's clock, so that a reader computes rates and ages without trusting its own clock or timers.
    let now_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    HttpResponse::Ok().json(Stats {
        now_unix_ms,
        durability: match state.durability {
            Durability::Wal => "wal",
            Durability::Memory => "memory",
        },
        streams: Streams {
            location: stream_stats(
                state.location.metrics(),
                state.location.writer_stall(),
                state.location.replay(),
            ),
            poll: stream_stats(state.poll.metrics(), state.poll.writer_stall(), state.poll.replay()),
            dead_letter: stream_stats(
                state.dead_letters.metrics(),
                state.dead_letters.writer_stall(),
                state.dead_letters.replay(),
            ),
        },
        wal: wal_stats(&state.metrics.wal),
        trackers: tracker_stats(&state.metrics.trackers, &state.metrics.tcp),
        auth: AuthStats {
            enabled: state.metrics.access.auth_enabled.get() == 1,
            keys: state.metrics.access.keys.get(),
            keys_file_usable: state.metrics.access.keys_file_usable.get() == 1
                || state.metrics.access.auth_enabled.get() == 0,
        },
    })
}

fn tracker_stats(m: &TrackerMetrics, tcp: &TcpMetrics) -> BTreeMap<&'static str, TrackerStats> {
    Protocol::ALL
        .iter()
        .map(|p| {
            let name = p.name();
            let dead_lettered = Rejection::ALL
                .iter()
                .map(|r| (r.code(), m.dead_lettered.with_label_values(&[name, r.code()]).get()))
                .collect();
            let stats = TrackerStats {
                stored: m.fixes.with_label_values(&[name, "stored"]).get(),
                dead_lettered,
                ignored: m.fixes.with_label_values(&[name, "ignored"]).get(),
                time_repairs: m.time_repairs.with_label_values(&[name]).get(),
                tcp: Protocol::TCP.contains(p).then(|| TcpStats {
                    connections: tcp.connections.with_label_values(&[name]).get(),
                    connections_refused: TcpMetrics::by_reason(&tcp.connections_refused, name),
                    handshakes_refused: TcpMetrics::by_reason(&tcp.handshakes_refused, name),
                    bad_packets: TcpMetrics::by_reason(&tcp.bad_packets, name),
                    intake_waits: TcpMetrics::by_reason(&tcp.intake_waits, name),
                }),
            };
            (name, stats)
        })
        .collect()
}

fn stream_stats(m: &StreamMetrics, stall: Option<(Duration, String)>, replay: ReplaySnapshot) -> StreamStats {
    let rejected_by_reason = RejectReason::ALL
        .iter()
        .map(|r| (r.as_str(), m.rejected(*r).get()))
        .collect();
    let last_at = m.last_batch_timestamp.get();
    let last_batch_at = (last_at > 0.0)
        .then(|| OffsetDateTime::from_unix_timestamp_nanos((last_at * 1e9) as i128).ok())
        .flatten()
        .and_then(|t| t.format(&Rfc3339).ok());
    StreamStats {
        accepted: m.accepted.get(),
        rejected: m.rejected_total(),
        rejected_by_reason,
        written: m.written.get(),
        duplicate: m.duplicates.get(),
        dead_lettered: m.dead_lettered.get(),
        replayed: m.replayed.get(),
        wal_backlog_bytes: m.backlog_bytes.get(),
        queue_depth: m.queue_depth.get(),
        queue_capacity: m.queue_capacity.get(),
        batches_written: m.batches_written.get(),
        batch_failures: m.batch_failures.get(),
        last_batch_rows: m.last_batch_rows.get(),
        last_batch_at,
        last_batch_duration_ms: m.last_batch_duration.get() * 1000.0,
        oldest_pending_age_ms: (m.oldest_pending_age.get() * 1000.0).round(),
        writers_failing_s: stall.as_ref().map_or(0.0, |(d, _)| d.as_secs_f64()),
        writers_failing_reason: stall.map(|(_, reason)| reason),
        replaying: !replay.finished,
        replay_done_bytes: replay.done_bytes,
        replay_total_bytes: replay.total_bytes,
        conflicting: m.conflicting.get(),
    }
}

fn wal_stats(wal: &WalMetrics) -> WalStats {
    WalStats {
        bytes: wal.bytes.get(),
        capacity_bytes: wal.capacity.get(),
        segments: wal.segments.get(),
        records: wal.records.get(),
        fsyncs: wal.fsyncs.get(),
        corrupt_records: wal.corrupt_records.get(),
        write_errors: wal.write_errors.get(),
    }
}
