//! `POST /api/v1/location/update` and `POST /api/v1/poll/update`: read the body (plain or gzip, JSON or
//! NDJSON) within its limits, validate every update, and queue them all or none.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use time::OffsetDateTime;

use super::errors::IngestError;
use super::{AppState, StreamIngest};
use crate::model::{self, BodyError, BodyFormat, Update, ValidationRules};
use crate::pipeline::{Chunk, CommitWaiter, Origin, PushError, Reservation};
use crate::wal::codec::{self, WalCodec};
use crate::wal::{DurableRecord, WalError};

/// A 422 lists at most this many broken rules.
const MAX_ERROR_DETAILS: usize = 100;
/// How long a request waits for room in a full queue before its updates go to the write-ahead log's backlog
/// instead. Long enough for a batch or two to commit, so that clients faster than PostgreSQL are paced by their
/// answers; short, so that nobody is held for long.
const ROOM_WAIT: Duration = Duration::from_millis(250);

pub async fn location(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, IngestError> {
    ingest(&req, body, &state, &state.location).await
}

pub async fn poll(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, IngestError> {
    ingest(&req, body, &state, &state.poll).await
}

async fn ingest<T: Update + WalCodec>(
    req: &HttpRequest,
    body: web::Payload,
    state: &AppState,
    stream: &StreamIngest<T>,
) -> Result<HttpResponse, IngestError> {
    match accept(req, body, state, stream).await {
        Ok(Accepted { updates, committed }) => {
            stream.metrics.accepted.inc_by(updates as u64);
            let body = if committed {
                format!("{{\"accepted\":{updates},\"committed\":true}}")
            } else {
                format!("{{\"accepted\":{updates}}}")
            };
            Ok(HttpResponse::Accepted().content_type("application/json").body(body))
        }
        Err(error) => {
            stream.metrics.rejected(error.reason()).inc_by(error.updates());
            Err(error)
        }
    }
}

/// What an accepted request got.
struct Accepted {
    updates: usize,
    /// The updates are committed in PostgreSQL (the request asked `?ack=commit`).
    committed: bool,
}

/// Reads, validates and queues the request's updates, durably when the log is on.
async fn accept<T: Update + WalCodec>(
    req: &HttpRequest,
    body: web::Payload,
    state: &AppState,
    stream: &StreamIngest<T>,
) -> Result<Accepted, IngestError> {
    if !state.is_accepting() {
        return Err(IngestError::ShuttingDown { updates: 0 });
    }
    let wait_for_commit = wants_commit(req)?;
    let format = body_format(req)?;
    let gzip = is_gzip(req)?;
    let limit = state.limits.max_body_bytes;
    let raw = read_body(req, body, limit).await?;
    // A plain body is parsed where it was read; only a gzip body needs a second buffer.
    let bytes = if gzip {
        std::borrow::Cow::Owned(gunzip(&raw, limit)?)
    } else {
        std::borrow::Cow::Borrowed(&raw[..])
    };

    let received_at = OffsetDateTime::now_utc();
    let rules = ValidationRules {
        now: received_at,
        max_future_skew: state.limits.max_future_skew,
        max_age: state.limits.max_age,
        max_attributes_bytes: model::MAX_ATTRIBUTES_BYTES,
    };
    let raw_updates = model::parse_body(&bytes, format, T::FIELDS, state.limits.max_updates).map_err(|e| match e {
        BodyError::InvalidJson { line, column, message } => IngestError::InvalidJson { line, column, message },
        BodyError::TooManyUpdates { limit } => IngestError::TooManyUpdates { limit },
    })?;
    let updates = model::validate_all::<T>(raw_updates, &rules, received_at, MAX_ERROR_DETAILS)
        .map_err(IngestError::InvalidUpdates)?;
    let count = updates.len();
    if count == 0 {
        return Ok(Accepted {
            updates: 0,
            committed: wait_for_commit,
        });
    }
    let (waiter, committed) = match wait_for_commit {
        true => {
            let (waiter, committed) = CommitWaiter::new(count);
            (Some(waiter), Some(committed))
        }
        false => (None, None),
    };
    match &state.wal {
        None => {
            if count > stream.queue.capacity() {
                // Without the log, a request larger than the whole queue could never be taken: no retry helps.
                return Err(IngestError::TooManyUpdates {
                    limit: stream.queue.capacity(),
                });
            }
            let reservation = stream.queue.reserve(count).map_err(|e| push_error(e, count))?;
            reservation.push(Chunk {
                updates,
                origin: Origin::Memory,
                commit: waiter,
            });
        }
        Some(wal) => {
            // A full queue is no refusal here: after a short wait for room, the updates wait in the log until the
            // writers catch up.
            let reservation = match stream.queue.reserve_within(count, ROOM_WAIT).await {
                Ok(reservation) => Some(reservation),
                Err(PushError::Full { .. }) => None,
                Err(e) => return Err(push_error(e, count)),
            };
            let slot = reservation
                .as_ref()
                .map_or_else(|| stream.queue.next_slot() as u16, Reservation::slot);
            let payload = codec::encode_record(slot, &updates);
            let feed = stream.feed.clone();
            // Runs where the record's group is flushed, once the record is on disk, in log order.
            let on_durable =
                Box::new(move |record: &DurableRecord<'_>| feed.offer(record, reservation, updates, waiter));
            let appended = wal.append(payload, on_durable).map_err(|e| log_error(e, count))?;
            if appended.leads {
                // A task of its own, so that the group is flushed even if this request is dropped by its client.
                let wal = Arc::clone(wal);
                actix_web::rt::spawn(async move {
                    // Lets the requests already read on this worker append first, so that one fsync covers them.
                    tokio::task::yield_now().await;
                    wal.flush_when_free().await;
                });
            }
            match appended.durable.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(log_error(e, count)),
                Err(_) => return Err(IngestError::ShuttingDown { updates: count }),
            }
        }
    }
    if let Some(committed) = committed {
        // The writers drain everything before the process stops, so the waiter is dropped unanswered only when
        // the stop timed out: the updates may still be written from the log at the next start.
        committed
            .await
            .map_err(|_| IngestError::ShuttingDown { updates: count })?;
    }
    Ok(Accepted {
        updates: count,
        committed: wait_for_commit,
    })
}

fn push_error(error: PushError, updates: usize) -> IngestError {
    match error {
        PushError::Full { .. } => IngestError::Overloaded { updates },
        PushError::Closed => IngestError::ShuttingDown { updates },
    }
}

fn log_error(error: WalError, updates: usize) -> IngestError {
    match error {
        WalError::Full { .. } => IngestError::LogFull { updates },
        WalError::Closed => IngestError::ShuttingDown { updates },
        WalError::Io(message) => IngestError::Storage { updates, message },
    }
}

/// `?ack=commit` asks for the answer only once the updates are committed in PostgreSQL.
fn wants_commit(req: &HttpRequest) -> Result<bool, IngestError> {
    let mut commit = false;
    for pair in req.query_string().split('&').filter(|p| !p.is_empty()) {
        match pair {
            "ack=commit" => commit = true,
            other => return Err(IngestError::InvalidParameter(other.to_owned())),
        }
    }
    Ok(commit)
}

fn body_format(req: &HttpRequest) -> Result<BodyFormat, IngestError> {
    let Some(value) = req.headers().get(header::CONTENT_TYPE) else {
        // Clients that send no content type mostly send JSON; refusing them would help nobody.
        return Ok(BodyFormat::Json);
    };
    let text = value.to_str().unwrap_or_default();
    let essence = text.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(BodyFormat::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(BodyFormat::Ndjson),
        _ => Err(IngestError::UnsupportedMediaType {
            what: "content type",
            found: text.to_owned(),
        }),
    }
}

fn is_gzip(req: &HttpRequest) -> Result<bool, IngestError> {
    let Some(value) = req.headers().get(header::CONTENT_ENCODING) else {
        return Ok(false);
    };
    let text = value.to_str().unwrap_or_default();
    match text.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(false),
        "gzip" | "x-gzip" => Ok(true),
        _ => Err(IngestError::UnsupportedMediaType {
            what: "content encoding",
            found: text.to_owned(),
        }),
    }
}

/// Reads the body as sent, refusing it as soon as it passes `limit` bytes.
async fn read_body(req: &HttpRequest, mut body: web::Payload, limit: usize) -> Result<web::BytesMut, IngestError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(IngestError::BodyTooLarge { limit_bytes: limit });
    }
    let mut bytes = web::BytesMut::with_capacity(declared.unwrap_or(8 * 1024).min(limit));
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| IngestError::ReadBody { message: e.to_string() })?;
        if bytes.len() + chunk.len() > limit {
            return Err(IngestError::BodyTooLarge { limit_bytes: limit });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Decompresses a gzip body, stopping at `limit` bytes so that a gzip bomb costs at most `limit` of memory.
fn gunzip(compressed: &[u8], limit: usize) -> Result<Vec<u8>, IngestError> {
    let mut out = Vec::with_capacity((compressed.len() * 4).min(limit + 1));
    let mut decoder = flate2::read::MultiGzDecoder::new(compressed).take(limit as u64 + 1);
    decoder
        .read_to_end(&mut out)
        .map_err(|e| IngestError::InvalidEncoding {
            message: format!("gzip: {e}"),
        })?;
    if out.len() > limit {
        return Err(IngestError::BodyTooLarge { limit_bytes: limit });
    }
    Ok(out)
}
