//! `POST /api/v1/location/update` and `POST /api/v1/poll/update`: read the body (plain or gzip, JSON or
//! NDJSON) within its limits, validate every update, hand them all to the intake, and turn its answer into a
//! status.

use std::io::Read;
use std::net::IpAddr;
use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use futures_util::StreamExt;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::Required;
use utoipa::ToSchema;

use super::auth::{KeyEntry, Scoped};
use super::errors::IngestError;
use super::limits::{BudgetShare, Holder, UNCOUNTED_BYTES};
use super::{AppState, IngestLimits};
use crate::intake::record::RecordCodec;
use crate::intake::{Ack, Intake, Receipt, SubmitError};
use crate::model::body::{self, JsonBody, ParseLimits};
use crate::model::{self, BodyError, BodyFormat, LocationUpdate, PollResult, Update, ValidationRules};

/// A 422 lists at most this many broken rules.
const MAX_ERROR_DETAILS: usize = 100;
/// Bodies larger than this are inflated and parsed on the blocking pool rather than on the event loop.
const OFF_LOOP_BYTES: usize = 64 * 1024;
/// A gzip body larger than this is inflated off the event loop: JSON shrinks a dozen times or more.
const OFF_LOOP_GZIP_BYTES: usize = 4 * 1024;
/// A gzip body may always expand to this much, whatever its ratio: tiny bodies compress well.
const GZIP_FREE_BYTES: usize = 64 * 1024;
/// The first room made for a body: what the budget leaves out of every request, so that a small body never
/// touches it.
const FIRST_ROOM_BYTES: usize = UNCOUNTED_BYTES;
/// What the limit's label says when a client address is refused for its failed keys.
const FAILED_KEYS: &str = "client address after failed API keys";

// Named without generics: the path attributes below read a generic type as one they must compose.
type LocationBody = JsonBody<LocationUpdate>;
type PollBody = JsonBody<PollResult>;

/// The one query parameter taken: `?ack=commit`.
const ACK_COMMIT: (&str, &str) = ("ack", "commit");
/// `Content-Encoding`s of a plain body, as the header reads once trimmed: an empty one lists no coding. A
/// missing header is one too.
const IDENTITY_ENCODINGS: [&str; 2] = ["identity", ""];
/// `Content-Encoding`s of a gzip body.
const GZIP_ENCODINGS: [&str; 2] = ["gzip", "x-gzip"];

/// The query and header parameters of both ingest routes, for the OpenAPI document: written out here rather
/// than in the path attributes so that they come from the values the handler matches, and so that an optional
/// header is not described as one that may be `null`.
struct IngestParameters;

impl utoipa::IntoParams for IngestParameters {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let (ack, commit) = ACK_COMMIT;
        let one_of = |values: Vec<&str>| ObjectBuilder::new().schema_type(Type::String).enum_values(Some(values));
        let encodings = IDENTITY_ENCODINGS.iter().chain(&GZIP_ENCODINGS).copied().collect();
        vec![
            ParameterBuilder::new()
                .name(ack)
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(format!(
                    "`{commit}`: answer only once the updates are committed in PostgreSQL (their batch is written \
                     at once). No other query parameter is taken."
                )))
                .schema(Some(one_of(vec![commit])))
                .build(),
            ParameterBuilder::new()
                .name("Content-Encoding")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(
                    "How the body is compressed, if it is; the body limit applies after decompression.",
                ))
                .schema(Some(one_of(encodings)))
                .build(),
        ]
    }
}

/// The body of a `202`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    /// How many updates the request held: all of them were accepted.
    pub accepted: usize,
    /// Sent only with `?ack=commit`: `true` once the updates are committed in PostgreSQL; `false` when the commit
    /// did not come within `INGEST_COMMIT_WAIT` (the updates are durable, and written later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub committed: Option<bool>,
}

/// Takes location updates.
///
/// One JSON object, a JSON array of them, or NDJSON (one object per line). The request is all-or-nothing: every
/// update is validated before any is accepted.
#[utoipa::path(
    post,
    path = "/api/v1/location/update",
    operation_id = "post_location_updates",
    tag = "ingest",
    params(IngestParameters),
    request_body(
        description = "One update (object), many (array), or NDJSON: one update per line, blank lines skipped \
            (also as `application/ndjson` or `application/jsonl`). A request without `Content-Type` is read as \
            JSON. At most 8 MiB after decompression and 10 000 updates by default (`INGEST_MAX_BODY_BYTES`, \
            `INGEST_MAX_UPDATES`).",
        content(
            (inline(LocationBody) = "application/json"),
            (String = "application/x-ndjson"),
        ),
    ),
    responses(
        (status = 202, description = "Every update was accepted: with `wal` durability (the default) it is on \
            disk; with `?ack=commit`, committed in PostgreSQL.", body = Accepted),
        IngestError,
    ),
)]
pub async fn location(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, IngestError> {
    ingest(&req, body, &state, &state.location).await
}

/// Takes poll results.
///
/// One JSON object, a JSON array of them, or NDJSON (one object per line). The request is all-or-nothing: every
/// result is validated before any is accepted.
#[utoipa::path(
    post,
    path = "/api/v1/poll/update",
    operation_id = "post_poll_results",
    tag = "ingest",
    params(IngestParameters),
    request_body(
        description = "One result (object), many (array), or NDJSON: one result per line, blank lines skipped \
            (also as `application/ndjson` or `application/jsonl`). A request without `Content-Type` is read as \
            JSON. At most 8 MiB after decompression and 10 000 results by default (`INGEST_MAX_BODY_BYTES`, \
            `INGEST_MAX_UPDATES`).",
        content(
            (inline(PollBody) = "application/json"),
            (String = "application/x-ndjson"),
        ),
    ),
    responses(
        (status = 202, description = "Every result was accepted: with `wal` durability (the default) it is on \
            disk; with `?ack=commit`, committed in PostgreSQL.", body = Accepted),
        IngestError,
    ),
)]
pub async fn poll(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, IngestError> {
    ingest(&req, body, &state, &state.poll).await
}

async fn ingest<T: Update + RecordCodec + Scoped + Send + 'static>(
    req: &HttpRequest,
    body: web::Payload,
    state: &AppState,
    stream: &Intake<T>,
) -> Result<HttpResponse, IngestError> {
    let metrics = stream.metrics();
    let peer = state
        .access
        .client_address(req.peer_addr().map(|a| a.ip()), req.headers());
    let result = match identify_throttled(state, peer, || state.access.identify(req.headers())) {
        Ok(caller) => {
            let result = accept(req, body, state, stream, caller.as_deref(), peer).await;
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
            Ok(HttpResponse::Accepted().json(Accepted {
                accepted: updates,
                committed,
            }))
        }
        Err(error) => {
            metrics.rejected(error.reason()).inc_by(error.updates());
            Err(error)
        }
    }
}

/// The caller `identify` finds, unless its client address has failed too many key checks of late: then 429, before
/// any key is looked up, so that guessing keys is slow however fast the guesses come. Every 401 counts.
pub(super) fn identify_throttled(
    state: &AppState,
    peer: Option<IpAddr>,
    identify: impl FnOnce() -> Result<Option<Arc<KeyEntry>>, IngestError>,
) -> Result<Option<Arc<KeyEntry>>, IngestError> {
    if let Some(address) = peer {
        state
            .auth_failures
            .check(address)
            .map_err(|retry_after_secs| IngestError::RateLimited {
                limit: FAILED_KEYS,
                updates: 0,
                retry_after_secs,
            })?;
    }
    let identified = identify();
    if let (Err(IngestError::MissingKey | IngestError::UnknownKey), Some(address)) = (&identified, peer) {
        state.auth_failures.record(address);
    }
    identified
}

/// Who holds a request's share of the body budget: its client address and its key.
pub(super) fn budget_holders(peer: Option<IpAddr>, caller: Option<&KeyEntry>) -> [Option<Holder>; 2] {
    [
        peer.map(Holder::address),
        caller.map(|c| Holder::Key(c.key.name.clone())),
    ]
}

/// Reads and validates the request's updates, checks them against the caller's key (when keys are in force) and
/// rate limits, then submits them.
async fn accept<T: Update + RecordCodec + Scoped + Send + 'static>(
    req: &HttpRequest,
    body: web::Payload,
    state: &AppState,
    stream: &Intake<T>,
    caller: Option<&KeyEntry>,
    peer: Option<IpAddr>,
) -> Result<Receipt, IngestError> {
    // Before anything is done for it, a request costs one token of its key's and its address's allowance: one
    // whose allowance is spent is refused without its body being read, and one whose body is then refused (not
    // JSON, too large, `[]`) has paid for that reading.
    state.access.admit(caller, peer, 1)?;
    if !stream.is_accepting() {
        return Err(IngestError::ShuttingDown { updates: 0 });
    }
    refuse_other_origins(req)?;
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
    let limits = &state.limits;
    // The request's bytes, and what parsing keeps of them, count against the process's budget (and its client's
    // and key's shares of it) until its updates are validated; they are freed before any wait for the log or for
    // the commit.
    let (parsed, validated) = {
        let mut share = state.body_budget.share(budget_holders(peer, caller));
        let raw = read_body(req, body, limits, &mut share).await?;
        let rules = ValidationRules {
            now: OffsetDateTime::now_utc(),
            max_future_skew: limits.max_future_skew,
            max_age: limits.max_age,
            max_attributes_bytes: model::MAX_ATTRIBUTES_BYTES,
        };
        let large = is_large(raw.len(), gzip);
        let body_limits = limits.clone();
        let parse = move || {
            let plain = plain_body(raw, gzip, &body_limits, &mut share)?;
            parse_and_validate::<T>(&plain, format, &body_limits, &rules, &mut share)
        };
        if large {
            off_loop(state, parse).await??
        } else {
            parse()?
        }
    };
    // Every update the client made the gateway parse counts, valid or not: the limit bounds the work done.
    state.access.admit_remainder(caller, peer, parsed)?;
    let updates = validated?;
    if let Some(caller) = caller {
        caller.check_scope(&updates)?;
    }
    let count = updates.len();
    stream.submit(updates, ack).await.map_err(|e| submit_error(e, count))
}

/// Parses and validates a whole body, charging `share` for what parsing keeps: how many updates it held, and every
/// update valid or the request refused.
fn parse_and_validate<T: Update>(
    bytes: &[u8],
    format: BodyFormat,
    limits: &IngestLimits,
    rules: &ValidationRules,
    share: &mut BudgetShare,
) -> Result<(usize, Result<Vec<T>, IngestError>), IngestError> {
    let parse_limits = ParseLimits {
        max_updates: limits.max_updates,
        max_unknown_fields: limits.max_unknown_fields,
    };
    let raw_updates = body::parse_body_within(bytes, format, T::FIELDS, parse_limits, &mut |n| share.take(n)).map_err(
        |e| match e {
            BodyError::InvalidJson { line, column, message } => IngestError::InvalidJson { line, column, message },
            BodyError::TooManyUpdates { limit } => IngestError::TooManyUpdates { limit },
            BodyError::OverBudget => IngestError::BodyBudget,
        },
    )?;
    let parsed = raw_updates.len();
    let validated =
        model::validate_all::<T>(raw_updates, rules, rules.now, MAX_ERROR_DETAILS).map_err(IngestError::InvalidUpdates);
    Ok((parsed, validated))
}

pub(super) fn submit_error(error: SubmitError, updates: usize) -> IngestError {
    match error {
        SubmitError::ShuttingDown => IngestError::ShuttingDown { updates },
        SubmitError::Overloaded => IngestError::Overloaded { updates },
        SubmitError::LargerThanQueue { limit } => IngestError::TooManyUpdates { limit },
        SubmitError::LogFull => IngestError::LogFull { updates },
        SubmitError::LogWrite(message) | SubmitError::Unavailable(message) => IngestError::Storage { updates, message },
    }
}

/// Refuses a request a browser sends on behalf of a page of another origin. Senders (trucks, pollers) send no
/// `Origin`; a page that could reach a gateway on its visitor's network could otherwise make the browser post
/// updates without a preflight (no `Content-Type`, or `text/plain`), since the gateway reads such a body as JSON.
pub(super) fn refuse_other_origins(req: &HttpRequest) -> Result<(), IngestError> {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return Ok(());
    };
    let origin_text = origin.to_str().unwrap_or_default();
    let origin_host = origin_text.split_once("://").map_or(origin_text, |(_, host)| host);
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
    if host.is_some_and(|host| host.eq_ignore_ascii_case(origin_host)) {
        return Ok(());
    }
    Err(IngestError::CrossOrigin {
        origin: origin_text.chars().take(200).collect(),
    })
}

/// `?ack=commit` asks for the answer only once the updates are committed in PostgreSQL.
fn wants_commit(req: &HttpRequest) -> Result<bool, IngestError> {
    let mut commit = false;
    for pair in req.query_string().split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(parameter) if parameter == ACK_COMMIT => commit = true,
            _ => return Err(IngestError::InvalidParameter(pair.to_owned())),
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
    // Compared without a lower-cased copy: this runs for every request.
    let essence = text.split(';').next().unwrap_or_default().trim();
    let is = |name: &str| essence.eq_ignore_ascii_case(name);
    if is("application/json") {
        Ok(BodyFormat::Json)
    } else if is("application/x-ndjson") || is("application/ndjson") || is("application/jsonl") {
        Ok(BodyFormat::Ndjson)
    } else {
        Err(IngestError::UnsupportedMediaType {
            what: "content type",
            found: text.to_owned(),
        })
    }
}

pub(super) fn is_gzip(req: &HttpRequest) -> Result<bool, IngestError> {
    let Some(value) = req.headers().get(header::CONTENT_ENCODING) else {
        return Ok(false);
    };
    let unsupported = || IngestError::UnsupportedMediaType {
        what: "content encoding",
        found: String::from_utf8_lossy(value.as_bytes()).into_owned(),
    };
    // A value that is not visible ASCII names no coding this gateway knows; reading it as empty would take it
    // for `identity`.
    let text = value.to_str().map_err(|_| unsupported())?;
    let encoding = text.trim().to_ascii_lowercase();
    if IDENTITY_ENCODINGS.contains(&encoding.as_str()) {
        Ok(false)
    } else if GZIP_ENCODINGS.contains(&encoding.as_str()) {
        Ok(true)
    } else {
        Err(unsupported())
    }
}

/// Whether a body of `len` bytes as sent is inflated and parsed off the event loop.
pub(super) fn is_large(len: usize, gzip: bool) -> bool {
    len > if gzip { OFF_LOOP_GZIP_BYTES } else { OFF_LOOP_BYTES }
}

/// Runs `work` (inflating and parsing a large body) on the blocking pool, once one of the budget's parse permits is
/// free: its milliseconds are kept off the event loop, so that the worker's other connections (health checks
/// included) are served meanwhile, and no more such bodies are worked on at once than leave the event loop a core.
/// The permit goes with the work, and is held until the work ends even when the request is dropped meanwhile.
pub(super) async fn off_loop<R: Send + 'static>(
    state: &AppState,
    work: impl FnOnce() -> R + Send + 'static,
) -> Result<R, IngestError> {
    let permit = state
        .body_budget
        .parse_permit()
        .await
        .ok_or(IngestError::ShuttingDown { updates: 0 })?;
    web::block(move || {
        let result = work();
        drop(permit);
        result
    })
    .await
    .map_err(|_| IngestError::ShuttingDown { updates: 0 })
}

/// The body as JSON: `raw` itself, or inflated when `gzip`, within the limits and charged to `share` as it grows.
pub(super) fn plain_body(
    raw: web::Bytes,
    gzip: bool,
    limits: &IngestLimits,
    share: &mut BudgetShare,
) -> Result<web::Bytes, IngestError> {
    if !gzip {
        return Ok(raw);
    }
    gunzip(&raw, limits, share).map(web::Bytes::from)
}

/// Reads the body as sent, refusing it as soon as it passes the size limit or its share of the process's body
/// budget, or when it arrives too slowly.
pub(super) async fn read_body(
    req: &HttpRequest,
    mut body: web::Payload,
    limits: &IngestLimits,
    share: &mut BudgetShare,
) -> Result<web::Bytes, IngestError> {
    let limit = limits.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(IngestError::BodyTooLarge { limit_bytes: limit });
    }
    // Room for the body grows with what arrives, each step granted by the budget before it is taken: a length that
    // is declared but not sent holds nothing. The steps double (so the body is copied about twice at most) and stop
    // at the declared length, so that what the budget is charged is what the buffer takes.
    let most = declared.unwrap_or(limit);
    let mut bytes: Vec<u8> = Vec::new();
    let started = tokio::time::Instant::now();
    loop {
        let next_by = limits.body_deadline.next_chunk_by(started, bytes.len());
        let chunk = match tokio::time::timeout_at(next_by, body.next()).await {
            Ok(Some(chunk)) => chunk.map_err(|e| IngestError::ReadBody { message: e.to_string() })?,
            Ok(None) => break,
            Err(_) => {
                return Err(IngestError::BodyTimeout {
                    received_bytes: bytes.len(),
                })
            }
        };
        let needed = bytes.len() + chunk.len();
        if needed > limit {
            return Err(IngestError::BodyTooLarge { limit_bytes: limit });
        }
        if needed > bytes.capacity() {
            let room = (bytes.capacity() * 2).max(FIRST_ROOM_BYTES).min(most).max(needed);
            if !share.cover(room) {
                return Err(IngestError::BodyBudget);
            }
            bytes.reserve_exact(room - bytes.len());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(web::Bytes::from(bytes))
}

/// Decompresses a gzip body, stopping at the body limit and at `max_gzip_ratio` times the compressed size, so that
/// a gzip bomb costs little memory and little parsing.
fn gunzip(compressed: &[u8], limits: &IngestLimits, share: &mut BudgetShare) -> Result<Vec<u8>, IngestError> {
    let by_ratio = compressed
        .len()
        .saturating_mul(limits.max_gzip_ratio)
        .max(GZIP_FREE_BYTES);
    if by_ratio < limits.max_body_bytes {
        return gunzip_within(compressed, by_ratio, share).map_err(|e| match e {
            IngestError::BodyTooLarge { .. } => IngestError::GzipRatio {
                max_ratio: limits.max_gzip_ratio,
            },
            other => other,
        });
    }
    gunzip_within(compressed, limits.max_body_bytes, share)
}

/// Inflates `compressed` up to `limit` bytes; its room doubles as it fills, each step granted by the budget (which
/// still holds the compressed body) before it is taken.
fn gunzip_within(compressed: &[u8], limit: usize, share: &mut BudgetShare) -> Result<Vec<u8>, IngestError> {
    let mut decoder = flate2::read::MultiGzDecoder::new(compressed).take(limit as u64 + 1);
    let mut out: Vec<u8> = Vec::new();
    let mut filled = 0;
    loop {
        if filled == out.len() {
            let room = (out.len() * 2).max(GZIP_FREE_BYTES).min(limit + 1);
            if room == out.len() {
                // `take` stops the decoder at one byte past the limit: this is it.
                break;
            }
            if !share.cover(compressed.len() + room) {
                return Err(IngestError::BodyBudget);
            }
            out.reserve_exact(room - out.len());
            out.resize(room, 0);
        }
        let read = decoder
            .read(&mut out[filled..])
            .map_err(|e| IngestError::InvalidEncoding {
                message: format!("gzip: {e}"),
            })?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    out.truncate(filled);
    if filled > limit {
        return Err(IngestError::BodyTooLarge { limit_bytes: limit });
    }
    Ok(out)
}
