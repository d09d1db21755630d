//! The trackers' own routes: `/api/v1/osmand` (any method; also every path of `INGEST_OSMAND_LISTEN`),
//! `/api/v1/owntracks`, `/api/v1/overland`, `/api/v1/traccar`, each also under `/k/<key>`. Each reads its client's
//! request with the model's protocol reader, hands the fixes to the location intake and the fixes that can never
//! be stored to the dead-letter intake, and answers exactly what its client counts as success, once both are as
//! durable as a `202` on the native routes.

use actix_web::http::header::{self, HeaderMap};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use base64::Engine;
use time::OffsetDateTime;

use super::auth::KeyEntry;
use super::errors::IngestError;
use super::ingest::{
    budget_holders, identify_throttled, is_gzip, is_large, off_loop, plain_body, read_body, refuse_other_origins,
    submit_error,
};
use super::AppState;
use crate::intake::Ack;
use crate::metrics::TrackerMetrics;
use crate::model::tracker::schema::{OsmandForm, OsmandJson, OverlandBatch, OwntracksMessage, TraccarForward};
use crate::model::tracker::{self, Checked, Protocol, Rejection, TrackerError, TrackerRequest, TrackerRequestOutcome};
use crate::model::{self, DeadLetter, LocationUpdate, ValidationRules};

/// The path segment before a key carried in the path: `/api/v1/osmand/k/<key>`, as PhoneTrack does.
pub const KEY_SEGMENT: &str = "k";

/// Takes one OsmAnd-protocol request: Traccar Client, the OsmAnd app, GPSLogger.
///
/// `GET` or `POST` (any method on `INGEST_OSMAND_LISTEN`). The fields come from the query string, else from a form body (`application/x-www-form-urlencoded`
/// or no content type), else from Traccar Client's JSON. `id`/`deviceid` name the device (GPSLogger: also `ser`,
/// `aid`); `lat`/`lon` or `location=lat,lon`; `timestamp` in Unix seconds or milliseconds, ISO 8601 or
/// `yyyy-MM-dd HH:mm:ss` (UTC); `speed` in knots (GPSLogger's `s`/`spd` and the JSON in m/s); `bearing`,
/// `altitude`, `accuracy`, `hdop`, `batt`, `charge`, `valid`; every other field goes to `attributes`. A fix that
/// can never be stored is answered `200` too, and kept in `dead_letters`. The key may be given in the path
/// (`/api/v1/osmand/k/<key>`), as `key=` or as HTTP Basic's password.
#[utoipa::path(
    method(get, post),
    path = "/api/v1/osmand",
    operation_id = "post_osmand",
    tag = "trackers",
    request_body(
        description = "A form (`id=…&lat=…&lon=…&timestamp=…`), or Traccar Client's JSON \
            `{\"location\": {\"timestamp\", \"coords\": {…}, \"battery\": {…}}, \"device_id\": …}`; or no body, \
            with the fields in the query string.",
        content(
            (inline(OsmandForm) = "application/x-www-form-urlencoded"),
            (inline(OsmandJson) = "application/json"),
        ),
    ),
    responses(
        (status = 200, description = "Stored (or, for a fix that can never be stored, kept in dead_letters)"),
        IngestError,
    ),
)]
pub async fn osmand(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, IngestError> {
    take(Protocol::Osmand, &req, body, &state).await
}

/// Takes one OwnTracks message (HTTP mode).
///
/// `_type=location` is stored (`lat`, `lon`, `tst` in seconds, `acc`, `vel` in km/h, `cog`, `alt`, `batt`, …);
/// the device is `X-Limit-U:X-Limit-D`, else the `topic` after `owntracks/`, else `tid`. Every other message type
/// and an empty body are answered the same and not stored. The key is HTTP Basic's password (or in the path).
#[utoipa::path(
    post,
    path = "/api/v1/owntracks",
    operation_id = "post_owntracks",
    tag = "trackers",
    request_body(description = "One OwnTracks JSON message", content((inline(OwntracksMessage) = "application/json"))),
    responses(
        (status = 200, description = "Taken: the body is `[]`", body = Vec<Object>),
        IngestError,
    ),
)]
pub async fn owntracks(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, IngestError> {
    take(Protocol::Owntracks, &req, body, &state).await
}

/// Takes one Overland batch: `{"locations": [GeoJSON Feature, …]}`, all or nothing.
///
/// Coordinates are `[lon, lat]`; `timestamp`, `speed` (m/s, negative unknown), `course`, `altitude`,
/// `horizontal_accuracy`, `battery_level` (0–1) and `device_id` come from each Feature's properties (a blank
/// `device_id` is taken from `?device_id=`). Features that are not fixes are skipped; `current` is not stored
/// apart. The key is the Bearer token (or in the path).
#[utoipa::path(
    post,
    path = "/api/v1/overland",
    operation_id = "post_overland",
    tag = "trackers",
    request_body(description = "An Overland batch", content((inline(OverlandBatch) = "application/json"))),
    responses(
        (status = 200, description = "Taken: the body is `{\"result\":\"ok\"}`, the only answer the app \
            deletes its batch on", body = Object),
        IngestError,
    ),
)]
pub async fn overland(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, IngestError> {
    take(Protocol::Overland, &req, body, &state).await
}

/// Takes one position a Traccar server forwards (`forward.type=json`).
///
/// `{"position": {fixTime, latitude, longitude, speed (knots), course, altitude, accuracy, valid, attributes},
/// "device": {uniqueId, name, …}}`: the device is `device.uniqueId`. The key is in the path or the Bearer token.
#[utoipa::path(
    post,
    path = "/api/v1/traccar",
    operation_id = "post_traccar",
    tag = "trackers",
    request_body(
        description = "A forwarded Traccar position",
        content((inline(TraccarForward) = "application/json")),
    ),
    responses(
        (status = 200, description = "Stored (or kept in dead_letters)"),
        IngestError,
    ),
)]
pub async fn traccar(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, IngestError> {
    take(Protocol::Traccar, &req, body, &state).await
}

/// Makes every series of the tracker counters, at zero: a protocol nobody has used yet still shows in `/metrics`
/// (and `rate()` sees its first fix).
pub fn init_metrics(m: &TrackerMetrics) {
    for protocol in Protocol::ALL {
        let name = protocol.name();
        for outcome in ["stored", "dead_lettered", "ignored"] {
            m.fixes.with_label_values(&[name, outcome]);
        }
        for rejection in Rejection::ALL {
            m.dead_lettered.with_label_values(&[name, rejection.code()]);
        }
        m.time_repairs.with_label_values(&[name]);
    }
}

/// What a protocol's client counts as success.
fn success(protocol: Protocol) -> HttpResponse {
    match protocol {
        // No friends' locations or commands to hand back.
        Protocol::Owntracks => HttpResponse::Ok().content_type("application/json").body("[]"),
        Protocol::Overland => HttpResponse::Ok()
            .content_type("application/json")
            .body(r#"{"result":"ok"}"#),
        // An empty body (OsmAnd, Traccar): a Traccar server sends a queued command's text here, which these
        // clients would run. The TCP protocols never reach these routes.
        _ => HttpResponse::Ok().finish(),
    }
}

async fn take(
    protocol: Protocol,
    req: &HttpRequest,
    body: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, IngestError> {
    let location = state.location.metrics();
    let carried = carried_key(req);
    let peer = state
        .access
        .client_address(req.peer_addr().map(|a| a.ip()), req.headers());
    let identify = || state.access.identify_tracker(carried.as_deref(), req.headers());
    // Set once the fixes are in the location intake: a refusal after that (of the dead letters) is not theirs.
    let mut fixes_taken = false;
    let result = match identify_throttled(state, peer, identify) {
        Ok(caller) => {
            let result = accept(protocol, req, body, state, caller.as_deref(), peer, &mut fixes_taken).await;
            if let Some(caller) = caller {
                caller.count(result.as_ref().map_or_else(|e| e.status_code(), |_| StatusCode::OK));
            }
            result
        }
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => Ok(success(protocol)),
        Err(error) => {
            if !fixes_taken {
                location.rejected(error.reason()).inc_by(error.updates());
            }
            Err(error)
        }
    }
}

/// Reads, checks and submits one tracker request, counting what each intake took; `fixes_taken` says whether the
/// location intake took the request's fixes.
async fn accept(
    protocol: Protocol,
    req: &HttpRequest,
    body: web::Payload,
    state: &AppState,
    caller: Option<&KeyEntry>,
    peer: Option<std::net::IpAddr>,
    fixes_taken: &mut bool,
) -> Result<(), IngestError> {
    // As on the native routes: one token before anything is done, the rest once the fixes are counted.
    state.access.admit(caller, peer, 1)?;
    if !state.location.is_accepting() {
        return Err(IngestError::ShuttingDown { updates: 0 });
    }
    refuse_other_origins(req)?;
    if let Some(caller) = caller {
        caller.check_stream::<LocationUpdate>()?;
    }
    let gzip = is_gzip(req)?;
    let limits = &state.limits;
    let now = OffsetDateTime::now_utc();
    let rules = ValidationRules {
        now,
        max_future_skew: limits.max_future_skew,
        max_age: limits.max_age,
        max_attributes_bytes: model::MAX_ATTRIBUTES_BYTES,
    };
    let query = req.query_string().to_owned();
    let headers = TrackerHeaders::of(req.headers());
    let max_fixes = limits.max_updates;
    let checked = {
        let mut share = state.body_budget.share(budget_holders(peer, caller));
        let raw = read_body(req, body, limits, &mut share).await?;
        let large = is_large(raw.len(), gzip);
        let body_limits = limits.clone();
        let parse = move || {
            let bytes = plain_body(raw, gzip, &body_limits, &mut share)?;
            let request = TrackerRequest {
                query: &query,
                body: &bytes,
                json: headers.json,
                limit_user: headers.limit_user.as_deref(),
                limit_device: headers.limit_device.as_deref(),
                basic_user: headers.basic_user.as_deref(),
                max_fixes,
            };
            read(protocol, &request).map(|outcome| CheckedRequest::of(outcome, protocol, &rules))
        };
        if large {
            // An Overland batch of a thousand fixes takes milliseconds: off the event loop.
            off_loop(state, parse).await??
        } else {
            parse()?
        }
    };
    state.access.admit_remainder(caller, peer, checked.count())?;
    if let Some(caller) = caller {
        caller.check_scope(&checked.stored)?;
        caller.check_scope(&checked.letters)?;
    }
    let stored = checked.stored.len();
    let letters = checked.letters.len();
    // The fixes first: when their intake refuses, nothing is kept and the client's resend is stored once. A
    // refusal of the dead letters after them is answered the same way; the resent fixes are then absorbed.
    if stored > 0 {
        state
            .location
            .submit(checked.stored, Ack::Durable)
            .await
            .map_err(|e| submit_error(e, stored))?;
        state.location.metrics().accepted.inc_by(stored as u64);
    }
    *fixes_taken = true;
    let m = state.metrics.trackers.of(protocol);
    m.stored.inc_by(stored as u64);
    if letters > 0 {
        let dead_letters = state.dead_letters.metrics();
        match state.dead_letters.submit(checked.letters, Ack::Durable).await {
            Ok(_) => dead_letters.accepted.inc_by(letters as u64),
            Err(e) => {
                let error = submit_error(e, letters);
                dead_letters.rejected(error.reason()).inc_by(letters as u64);
                return Err(error);
            }
        }
    }
    m.dead_lettered.inc_by(letters as u64);
    m.ignored.inc_by(checked.ignored as u64);
    if checked.time_repairs > 0 {
        m.time_repairs.inc_by(checked.time_repairs);
    }
    for rejection in checked.rejections {
        m.rejected(rejection).inc();
    }
    Ok(())
}

fn read(protocol: Protocol, request: &TrackerRequest<'_>) -> Result<TrackerRequestOutcome, IngestError> {
    let outcome = match protocol {
        Protocol::Osmand => tracker::osmand::parse(request),
        Protocol::Owntracks => tracker::owntracks::parse(request),
        Protocol::Overland => tracker::overland::parse(request),
        Protocol::Traccar => tracker::traccar::parse(request),
        // The hardware protocols are spoken over TCP, never to these routes.
        other => Err(TrackerError::NotTheProtocol(format!(
            "{} is not an HTTP protocol",
            other.name()
        ))),
    };
    outcome.map_err(|e| match e {
        TrackerError::TooManyFixes { limit } => IngestError::TooManyUpdates { limit },
        other => IngestError::InvalidTrackerRequest {
            message: other.to_string(),
        },
    })
}

/// A request's fixes sorted by the rules.
struct CheckedRequest {
    stored: Vec<LocationUpdate>,
    letters: Vec<DeadLetter>,
    /// Why each dead letter can never be stored, for their counter.
    rejections: Vec<Rejection>,
    ignored: usize,
    time_repairs: u64,
}

impl CheckedRequest {
    fn of(outcome: TrackerRequestOutcome, protocol: Protocol, rules: &ValidationRules) -> Self {
        let mut checked = CheckedRequest {
            stored: Vec::with_capacity(outcome.fixes.len()),
            letters: Vec::new(),
            rejections: Vec::new(),
            ignored: outcome.ignored.len(),
            time_repairs: 0,
        };
        for fix in outcome.fixes {
            match tracker::check(fix, protocol, rules) {
                Checked::Stored { update, time_repaired } => {
                    checked.time_repairs += u64::from(time_repaired);
                    checked.stored.push(update);
                }
                Checked::Rejected { letter, rejection } => {
                    checked.rejections.push(rejection);
                    checked.letters.push(letter);
                }
            }
        }
        checked
    }

    /// What the rate limits count: every fix read, stored or not.
    fn count(&self) -> usize {
        (self.stored.len() + self.letters.len()).max(1)
    }
}

/// What the protocols read of the headers, owned so that a large body can be read on another thread.
struct TrackerHeaders {
    json: bool,
    limit_user: Option<String>,
    limit_device: Option<String>,
    basic_user: Option<String>,
}

impl TrackerHeaders {
    fn of(headers: &HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| {
                t.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .eq_ignore_ascii_case("application/json")
            });
        TrackerHeaders {
            json,
            limit_user: text("x-limit-u"),
            limit_device: text("x-limit-d"),
            basic_user: basic_credentials(headers).map(|(user, _)| user),
        }
    }
}

/// HTTP Basic's user and password, when the request carries them.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The key a tracker's request carries where its client can put one: the path (`…/k/<key>`), a `key` query
/// parameter, or HTTP Basic's password. `None`: look in the usual headers (Bearer, `X-API-Key`).
fn carried_key(req: &HttpRequest) -> Option<Vec<u8>> {
    if let Some(key) = req.match_info().get("key") {
        return Some(key.as_bytes().to_vec());
    }
    if let Some(key) = key_in_osmand_path(req.path()) {
        return Some(key.as_bytes().to_vec());
    }
    // Only the key's own field is decoded: the protocol reads the rest.
    let in_query = req.query_string().split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == tracker::osmand::KEY_PARAMETER).then(|| {
            let value = value.replace('+', " ");
            percent_encoding::percent_decode_str(&value).collect::<Vec<u8>>()
        })
    });
    in_query.or_else(|| basic_credentials(req.headers()).map(|(_, password)| password.into_bytes()))
}

/// On the OsmAnd listener every path is the protocol's: `/k/<key>` (or any path ending so) carries the key.
fn key_in_osmand_path(path: &str) -> Option<&str> {
    let mut segments = path.rsplit('/');
    let key = segments.next()?;
    (segments.next()? == KEY_SEGMENT && !key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_in_the_path_is_found_after_its_segment() {
        assert_eq!(key_in_osmand_path("/k/abc"), Some("abc"));
        assert_eq!(key_in_osmand_path("/gps/k/abc"), Some("abc"));
        assert_eq!(key_in_osmand_path("/"), None);
        assert_eq!(key_in_osmand_path("/k/"), None);
        assert_eq!(key_in_osmand_path("/abc"), None);
    }

    #[test]
    fn basic_credentials_are_read_from_the_header() {
        let mut headers = HeaderMap::new();
        // "jane:s3cret"
        headers.insert(
            header::AUTHORIZATION,
            header::HeaderValue::from_static("Basic amFuZTpzM2NyZXQ="),
        );
        assert_eq!(
            basic_credentials(&headers),
            Some(("jane".to_owned(), "s3cret".to_owned()))
        );
    }
}
