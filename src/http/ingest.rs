//! `POST /api/v1/location/update` and `POST /api/v1/poll/update`: read the body (plain or gzip, JSON or
//! NDJSON) within its limits, validate every update, hand them all to the intake, and turn its answer into a
//! status.

use std::io::Read;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use futures_util::StreamExt;
use time::OffsetDateTime;

use super::auth::{KeyEntry, Scoped};
use super::errors::IngestError;
use super::AppState;
use crate::intake::record::RecordCodec;
use crate::intake::{Ack, Intake, Receipt, SubmitError};
use crate::model::{self, BodyError, BodyFormat, Update, ValidationRules};

/// A 422 lists at most this many broken rules.
const MAX_ERROR_DETAILS: usize = 100;

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

async fn ingest<T: Update + RecordCodec + Scoped>(
    req: &HttpRequest,
    body: web::Payload,
    state: &AppState,
    stream: &Intake<T>,
) -> Result<HttpResponse, IngestError> {
    let metrics = stream.metrics();
    let result = match state.access.identify(req.headers()) {
        Ok(caller) => {
            let result = accept(req, body, state, stream, caller.as_deref()).await;
            if let Some(caller) = caller {
                caller.count(
                    result
                        .as_ref()
                        .map_or_else(|e| e.status_code(), |_| StatusCode::ACCEPTED),
                );
            }
            result
        }
        Err(error) => Err(error),
    };
    match result {
        Ok(Receipt { updates, committed }) => {
            metrics.accepted.inc_by(updates as u64);
            let body = if committed {
                format!("{{\"accepted\":{updates},\"committed\":true}}")
            } else {
                format!("{{\"accepted\":{updates}}}")
            };
            Ok(HttpResponse::Accepted().content_type("application/json").body(body))
        }
        Err(error) => {
            metrics.rejected(error.reason()).inc_by(error.updates());
            Err(error)
        }
    }
}

/// Reads and validates the request's updates, checks them against the caller's key (when keys are in force) and
/// rate limits, then submits them.
async fn accept<T: Update + RecordCodec + Scoped>(
    req: &HttpRequest,
    body: web::Payload,
    state: &AppState,
    stream: &Intake<T>,
    caller: Option<&KeyEntry>,
) -> Result<Receipt, IngestError> {
    if !stream.is_accepting() {
        return Err(IngestError::ShuttingDown { updates: 0 });
    }
    // Before the body is read: a key that may not write here need not send it.
    if let Some(caller) = caller {
        caller.check_stream::<T>()?;
    }
    let ack = if wants_commit(req)? {
        Ack::Committed
    } else {
        Ack::Durable
    };
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
    // Every update the client made the gateway parse counts, valid or not: the limit bounds the work done.
    let peer = req.peer_addr().map(|a| a.ip());
    state.access.admit(caller, peer, raw_updates.len())?;
    let updates = model::validate_all::<T>(raw_updates, &rules, received_at, MAX_ERROR_DETAILS)
        .map_err(IngestError::InvalidUpdates)?;
    if let Some(caller) = caller {
        caller.check_scope(&updates)?;
    }
    let count = updates.len();
    stream.submit(updates, ack).await.map_err(|e| submit_error(e, count))
}

fn submit_error(error: SubmitError, updates: usize) -> IngestError {
    match error {
        SubmitError::ShuttingDown => IngestError::ShuttingDown { updates },
        SubmitError::Overloaded => IngestError::Overloaded { updates },
        SubmitError::LargerThanQueue { limit } => IngestError::TooManyUpdates { limit },
        SubmitError::LogFull => IngestError::LogFull { updates },
        SubmitError::LogWrite(message) => IngestError::Storage { updates, message },
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
