//! `GET /stats` (a JSON snapshot for humans and scripts) and `GET /metrics` (Prometheus text), both read from
//! the same metric handles.

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{web, HttpResponse};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::AppState;
use crate::config::Durability;
use crate::intake::feed::ReplaySnapshot;
use crate::metrics::{RejectReason, StreamMetrics};

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state.refresh_gauges();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.encode())
}

pub async fn stats(state: web::Data<AppState>) -> HttpResponse {
    state.refresh_gauges();
    let wal = &state.metrics.wal;
    // The gateway's clock, so that a reader computes rates and ages without trusting its own clock or timers.
    let now_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    HttpResponse::Ok().json(json!({
        "now_unix_ms": now_unix_ms,
        "durability": match state.durability {
            Durability::Wal => "wal",
            Durability::Memory => "memory",
        },
        "streams": {
            "location": stream_stats(state.location.metrics(), state.location.writer_stall(), state.location.replay()),
            "poll": stream_stats(state.poll.metrics(), state.poll.writer_stall(), state.poll.replay()),
        },
        "wal": {
            "bytes": wal.bytes.get(),
            "capacity_bytes": wal.capacity.get(),
            "segments": wal.segments.get(),
            "records": wal.records.get(),
            "fsyncs": wal.fsyncs.get(),
            "corrupt_records": wal.corrupt_records.get(),
            "write_errors": wal.write_errors.get(),
        },
    }))
}

fn stream_stats(m: &StreamMetrics, stall: Option<(std::time::Duration, String)>, replay: ReplaySnapshot) -> Value {
    let rejected_by_reason: Map<String, Value> = RejectReason::ALL
        .iter()
        .map(|r| (r.as_str().to_owned(), m.rejected(*r).get().into()))
        .collect();
    let last_at = m.last_batch_timestamp.get();
    let last_batch_at = (last_at > 0.0)
        .then(|| OffsetDateTime::from_unix_timestamp_nanos((last_at * 1e9) as i128).ok())
        .flatten()
        .and_then(|t| t.format(&Rfc3339).ok());
    json!({
        "accepted": m.accepted.get(),
        "rejected": m.rejected_total(),
        "rejected_by_reason": rejected_by_reason,
        "written": m.written.get(),
        "duplicate": m.duplicates.get(),
        "dead_lettered": m.dead_lettered.get(),
        "replayed": m.replayed.get(),
        "writers_failing_s": stall.as_ref().map_or(0.0, |(d, _)| d.as_secs_f64()),
        "writers_failing_reason": stall.map(|(_, reason)| reason),
        "wal_backlog_bytes": m.backlog_bytes.get(),
        "queue_depth": m.queue_depth.get(),
        "queue_capacity": m.queue_capacity.get(),
        "batches_written": m.batches_written.get(),
        "batch_failures": m.batch_failures.get(),
        "last_batch_rows": m.last_batch_rows.get(),
        "last_batch_at": last_batch_at,
        "last_batch_duration_ms": m.last_batch_duration.get() * 1000.0,
        "oldest_pending_age_ms": (m.oldest_pending_age.get() * 1000.0).round(),
        "replaying": !replay.finished,
        "replay_done_bytes": replay.done_bytes,
        "replay_total_bytes": replay.total_bytes,
    })
}
