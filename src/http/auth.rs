//! API keys: who may write which stream, and which devices or projects in it; and the rate limits that go with
//! a key or a client address.
//!
//! The keys file (`INGEST_API_KEYS_FILE`) holds one key per line, never the key itself but its SHA-256:
//!
//! ```text
//! # name     hash of the key           what it may write
//! fleet      sha256:<64 hex digits>    streams=location devices=truck-,van- rate=50:500
//! truck-7    sha256:<64 hex digits>    streams=location device=truck-7
//! pollers    sha256:<64 hex digits>    streams=poll projects=1-100,250
//! ```
//!
//! A device scope names exact ids (`device=`) or prefixes that end with a separator (`devices=truck-`): a key for
//! `truck-1` must never reach `truck-10`, whose fixes it could otherwise claim first.
//!
//! A request names its key with `Authorization: Bearer <key>` or `X-API-Key: <key>`. The key is hashed and the
//! hash looked up among the file's: a plain hash is enough because keys are 32 random bytes (no dictionary to
//! try), and a slow password hash would cost every request. The file is re-read on SIGHUP. A file that cannot be
//! used at a reload does not leave the previous keys in force — the edit may have been the removal of a leaked key
//! — but refuses every write with 503 (clients keep their updates and retry) until a good file is loaded; the log,
//! `ingest_api_keys_file_usable` and `/readyz` say so.
//!
//! The operator's routes (`/metrics`, `/stats`, the status page, `/readyz`'s reasons) need no key, but when keys
//! are in force and they share a listener other machines can reach, they ask for the admin token
//! (`INGEST_ADMIN_TOKEN_FILE`, sent as a Bearer token): a key holder must not read other tenants' key names and
//! volumes, nor strangers the queue fill that times an attack. `/healthz` stays open.

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use actix_web::http::header::{HeaderMap, AUTHORIZATION};
use actix_web::http::StatusCode;
use anyhow::Context;
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

use super::errors::IngestError;
use super::rate_limit::{client_address, AddressLimiter, KeyLimiter, RateRefusal};
use crate::config::{NewKeyArgs, RateLimit, Settings};
use crate::metrics::Metrics;
use crate::model::location::is_valid_device_id;
use crate::model::{DeadLetter, LocationUpdate, PollResult, Update, UpdateError};
use crate::secret_files::{self, FileKind};

/// What every key the gateway makes starts with, so that a leaked one is recognisable (secret scanners, logs).
pub const KEY_PREFIX: &str = "igk_";

/// Random bytes in a key: 256 bits, beyond any guessing.
const KEY_BYTES: usize = 32;

/// The header a client may send its key in instead of `Authorization`.
const X_API_KEY: &str = "x-api-key";

/// A 403 for updates outside the key's scope lists at most this many.
const MAX_SCOPE_DETAILS: usize = 100;

/// The streams a key may be given, in the order the file and the answers name them.
const STREAMS: [&str; 2] = [LocationUpdate::STREAM, PollResult::STREAM];

/// One line of the keys file: a key (by its hash), what it may write, and its own rate, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// The name metrics and logs use for the key: 1–64 of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// SHA-256 of the key as the client sends it.
    pub hash: [u8; 32],
    /// The streams the key may write, among [`STREAMS`].
    pub streams: Vec<&'static str>,
    /// Device-id prefixes a location update must start with one of, each ending with a [`SCOPE_SEPARATORS`]
    /// character; with `device_ids` empty too: any device.
    pub device_prefixes: Vec<String>,
    /// Device ids a location update may name exactly (`device=`).
    pub device_ids: Vec<String>,
    /// Project-id ranges a poll result must fall in one of; empty: any project.
    pub projects: Vec<RangeInclusive<i64>>,
    /// The key's own rate limit, instead of `INGEST_RATE_LIMIT`.
    pub rate: Option<RateLimit>,
}

impl ApiKey {
    pub fn may_write(&self, stream: &str) -> bool {
        self.streams.contains(&stream)
    }

    /// Whether the key may write updates of `device_id`: an exact id, an id under one of its prefixes, or any
    /// device when it has no device scope.
    pub fn may_write_device(&self, device_id: &str) -> bool {
        (self.device_prefixes.is_empty() && self.device_ids.is_empty())
            || self.device_ids.iter().any(|id| id == device_id)
            || self.device_prefixes.iter().any(|p| device_id.starts_with(p.as_str()))
    }

    /// The device scope in words, for a 403: `truck-7 and ids starting with van-`.
    fn device_scope(&self) -> String {
        let ids = self.device_ids.join(", ");
        let prefixes = self.device_prefixes.join(", ");
        match (ids.is_empty(), prefixes.is_empty()) {
            (false, true) => format!("the key may write the devices {ids}"),
            (true, false) => format!("the key may write devices starting with {prefixes}"),
            _ => format!("the key may write the devices {ids} and those starting with {prefixes}"),
        }
    }
}

/// The characters a device-id prefix must end with, so that it stops at a boundary of the ids it covers.
pub const SCOPE_SEPARATORS: [char; 5] = ['-', '.', ':', '_', '/'];

/// A keys file that cannot be used, with the line (1-based) that says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct KeyFileError {
    pub line: usize,
    pub message: String,
}

/// Reads a whole keys file: every line must hold, or none is used.
pub fn parse_keys(text: &str) -> Result<Vec<ApiKey>, KeyFileError> {
    let mut keys: Vec<(usize, ApiKey)> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        // No field may hold `#`, so a comment can start anywhere.
        let content = raw.split('#').next().unwrap_or_default().trim();
        if content.is_empty() {
            continue;
        }
        let fail = |message: String| KeyFileError { line, message };
        // `imeis=` (which tracker units may connect over TCP) is read by `crate::tcp::imeis`.
        let key = parse_line(&crate::tcp::imeis::without_imeis(content)).map_err(fail)?;
        if let Some((earlier, _)) = keys.iter().find(|(_, k)| k.name == key.name) {
            return Err(fail(format!(
                "the name {:?} is already used on line {earlier}",
                key.name
            )));
        }
        if let Some((earlier, _)) = keys.iter().find(|(_, k)| k.hash == key.hash) {
            return Err(fail(format!("the same key as line {earlier}")));
        }
        keys.push((line, key));
    }
    Ok(keys.into_iter().map(|(_, key)| key).collect())
}

/// One line without its comment: `<name> sha256:<hex> streams=… [devices=…] [projects=…] [rate=…]`.
fn parse_line(content: &str) -> Result<ApiKey, String> {
    // A key pasted where its hash belongs must not be echoed into the error, and so into the log.
    if content.split_whitespace().any(|t| t.starts_with(KEY_PREFIX)) {
        return Err(
            "this line holds a key itself, not its hash: the file holds sha256:<hash of the key> \
             (`ingest-gateway new-key` prints the line)"
                .to_owned(),
        );
    }
    let mut tokens = content.split_whitespace();
    let name = tokens.next().unwrap_or_default();
    if !is_valid_name(name) {
        return Err(format!(
            "{name:?} is not a key name: 1–64 of A-Z a-z 0-9 . _ - (a line is: name sha256:<hash of the key> \
             streams=…)"
        ));
    }
    let hash = parse_hash(tokens.next().unwrap_or_default())?;
    let mut streams = None;
    let mut device_prefixes = None;
    let mut device_ids = None;
    let mut projects = None;
    let mut rate = None;
    for token in tokens {
        let Some((field, value)) = token.split_once('=') else {
            return Err(format!("{token:?} is not field=value"));
        };
        let repeated = match field {
            "streams" => streams.replace(parse_streams(value)?).is_some(),
            "devices" => device_prefixes.replace(parse_prefixes(value)?).is_some(),
            "device" => device_ids.replace(parse_device_ids(value)?).is_some(),
            "projects" => projects.replace(parse_projects(value)?).is_some(),
            "rate" => rate.replace(value.parse::<RateLimit>()?).is_some(),
            other => {
                return Err(format!(
                    "unknown field {other:?} (the fields are streams, device, devices, projects and rate)"
                ))
            }
        };
        if repeated {
            return Err(format!("{field}= is given twice"));
        }
    }
    let streams = streams.ok_or("streams= is missing: say which streams the key may write (location, poll)")?;
    let device_prefixes = device_prefixes.unwrap_or_default();
    let device_ids = device_ids.unwrap_or_default();
    let projects = projects.unwrap_or_default();
    // A scope for a stream the key may not write is a mistake in the file, not a harmless extra.
    if !device_prefixes.is_empty() && !streams.contains(&LocationUpdate::STREAM) {
        return Err("devices= is given but the key may not write location updates".to_owned());
    }
    if !device_ids.is_empty() && !streams.contains(&LocationUpdate::STREAM) {
        return Err("device= is given but the key may not write location updates".to_owned());
    }
    if !projects.is_empty() && !streams.contains(&PollResult::STREAM) {
        return Err("projects= is given but the key may not write poll results".to_owned());
    }
    Ok(ApiKey {
        name: name.to_owned(),
        hash,
        streams,
        device_prefixes,
        device_ids,
        projects,
        rate,
    })
}

fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn parse_hash(token: &str) -> Result<[u8; 32], String> {
    let hex = token
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("{token:?} is not sha256:<64 hex digits of the key's SHA-256>"))?;
    let mut hash = [0u8; 32];
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "the hash must be 64 hex digits, found {} characters",
            hex.len()
        ));
    }
    for (byte, pair) in hash.iter_mut().zip(hex.as_bytes().chunks(2)) {
        // Two ASCII hex digits, checked above.
        let digits = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
        *byte = u8::from_str_radix(digits, 16).map_err(|e| e.to_string())?;
    }
    Ok(hash)
}

fn parse_streams(value: &str) -> Result<Vec<&'static str>, String> {
    let mut streams = Vec::new();
    for name in value.split(',') {
        let stream = STREAMS
            .iter()
            .find(|s| **s == name)
            .ok_or_else(|| format!("unknown stream {name:?} (the streams are location and poll)"))?;
        if !streams.contains(stream) {
            streams.push(*stream);
        }
    }
    Ok(streams)
}

fn parse_prefixes(value: &str) -> Result<Vec<String>, String> {
    value
        .split(',')
        .map(|prefix| {
            // A prefix no device id could start with would silently refuse everything.
            let body = prefix.strip_suffix('/').unwrap_or(prefix);
            if !is_valid_device_id(body) {
                return Err(format!(
                    "{prefix:?} is not a device-id prefix: 1–64 of A-Z a-z 0-9 . _ : -"
                ));
            }
            // `truck-1` would cover `truck-10` … `truck-19` too, whose fixes its holder could claim first.
            if !prefix.ends_with(SCOPE_SEPARATORS) {
                return Err(format!(
                    "devices={prefix} would also cover other devices ({prefix}0, {prefix}x, …): a prefix must end \
                     with one of - . : _ / (devices={prefix}-), and one device is device={prefix}"
                ));
            }
            Ok(prefix.to_owned())
        })
        .collect()
}

fn parse_device_ids(value: &str) -> Result<Vec<String>, String> {
    value
        .split(',')
        .map(|id| {
            if is_valid_device_id(id) {
                Ok(id.to_owned())
            } else {
                Err(format!("{id:?} is not a device id: 1–64 of A-Z a-z 0-9 . _ : -"))
            }
        })
        .collect()
}

fn parse_projects(value: &str) -> Result<Vec<RangeInclusive<i64>>, String> {
    let id = |text: &str| {
        text.parse::<i64>()
            .ok()
            .filter(|id| *id >= 1)
            .ok_or_else(|| format!("{text:?} is not a project id (1 … 2^63−1)"))
    };
    value
        .split(',')
        .map(|part| {
            let (low, high) = match part.split_once('-') {
                Some((low, high)) => (id(low)?, id(high)?),
                None => (id(part)?, id(part)?),
            };
            if low > high {
                return Err(format!("{part:?} is an empty range"));
            }
            Ok(low..=high)
        })
        .collect()
}

/// SHA-256 of a key as the client sends it.
pub fn hash_key(key: &[u8]) -> [u8; 32] {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&Sha256::digest(key));
    hash
}

/// A key's hash as the keys file writes it: `sha256:<64 hex digits>` (what `printf %s "$KEY" | sha256sum` prints).
pub fn hashed(key: &str) -> String {
    format!("sha256:{}", to_hex(&hash_key(key.as_bytes())))
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]])
        .map(char::from)
        .collect()
}

/// Whether two hashes are equal, taking the same time wherever they differ.
///
/// Only hashes are compared, so an early exit would tell an attacker how many leading bytes of the SHA-256 of
/// *their own guess* match — which does not bring them closer to a key. Comparing in constant time anyway
/// leaves nothing to argue about. `black_box` on every step keeps the optimiser from turning the fold back
/// into a comparison that stops at the first difference.
fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
    difference == 0
}

/// The key a request presents: `Authorization: Bearer <key>` or `X-API-Key: <key>`.
fn presented_key(headers: &HeaderMap) -> Result<&[u8], IngestError> {
    let bearer = headers.get(AUTHORIZATION).and_then(|value| {
        let value = value.as_bytes();
        let (scheme, token) = value.split_at(value.iter().position(|b| *b == b' ').unwrap_or(value.len()));
        scheme.eq_ignore_ascii_case(b"bearer").then(|| token.trim_ascii())
    });
    let x_api_key = headers.get(X_API_KEY).map(|value| value.as_bytes().trim_ascii());
    match (bearer.filter(|k| !k.is_empty()), x_api_key.filter(|k| !k.is_empty())) {
        (Some(a), Some(b)) if a != b => Err(IngestError::UnknownKey),
        (Some(key), _) | (None, Some(key)) => Ok(key),
        (None, None) => Err(IngestError::MissingKey),
    }
}

/// How a request that presented a known key ended, as the `outcome` label of the per-key counter.
const OUTCOMES: [&str; 5] = ["accepted", "forbidden", "rate_limited", "refused", "unavailable"];

fn outcome_index(status: StatusCode) -> usize {
    match status.as_u16() {
        200..=299 => 0,
        403 => 1,
        429 => 2,
        500..=599 => 4,
        _ => 3,
    }
}

/// A loaded key, as a request that presented it sees it.
pub struct KeyEntry {
    pub key: ApiKey,
    /// Kept across reloads while the key's name and rate stay, so that a reload resets nobody's allowance.
    limiter: Option<Arc<KeyLimiter>>,
    /// Indexed like [`OUTCOMES`], looked up once at load.
    outcomes: [IntCounter; 5],
}

impl KeyEntry {
    /// Counts a request of this key that ended with `status`.
    pub fn count(&self, status: StatusCode) {
        self.outcomes[outcome_index(status)].inc();
    }

    /// Refuses the whole request when the key may not write `T`'s stream.
    pub fn check_stream<T: Update>(&self) -> Result<(), IngestError> {
        if self.key.may_write(T::STREAM) {
            return Ok(());
        }
        Err(IngestError::StreamNotAllowed {
            key: self.key.name.clone(),
            stream: T::STREAM,
            allowed: self.key.streams.clone(),
        })
    }

    /// Refuses the whole request when one of its updates is outside the key's scope.
    pub fn check_scope<T: Scoped>(&self, updates: &[T]) -> Result<(), IngestError> {
        let mut outside = 0usize;
        let mut errors = Vec::new();
        for (index, update) in updates.iter().enumerate() {
            if let Some((field, reason)) = update.outside(&self.key) {
                outside += 1;
                if errors.len() < MAX_SCOPE_DETAILS {
                    errors.push(UpdateError {
                        index,
                        field: Some(field.to_owned()),
                        reason,
                    });
                }
            }
        }
        if outside == 0 {
            return Ok(());
        }
        Err(IngestError::OutOfScope {
            key: self.key.name.clone(),
            updates: outside,
            errors,
        })
    }
}

/// An update a key's scope can exclude.
pub trait Scoped {
    /// The field and the reason when `key` may not write this update.
    fn outside(&self, key: &ApiKey) -> Option<(&'static str, String)>;
}

impl Scoped for LocationUpdate {
    fn outside(&self, key: &ApiKey) -> Option<(&'static str, String)> {
        if key.may_write_device(&self.device_id) {
            return None;
        }
        Some(("device_id", key.device_scope()))
    }
}

/// A tracker's fix that can never be stored still names a device: a key may not write dead letters of devices
/// outside its scope either.
impl Scoped for DeadLetter {
    fn outside(&self, key: &ApiKey) -> Option<(&'static str, String)> {
        let device_id = self.device_id.as_deref()?;
        if key.may_write_device(device_id) {
            return None;
        }
        Some(("device_id", key.device_scope()))
    }
}

impl Scoped for PollResult {
    fn outside(&self, key: &ApiKey) -> Option<(&'static str, String)> {
        if key.projects.is_empty() || key.projects.iter().any(|r| r.contains(&self.project_id)) {
            return None;
        }
        let ranges: Vec<String> = key
            .projects
            .iter()
            .map(|r| {
                if r.start() == r.end() {
                    r.start().to_string()
                } else {
                    format!("{}-{}", r.start(), r.end())
                }
            })
            .collect();
        Some((
            "project_id",
            format!("the key may write projects {}", ranges.join(", ")),
        ))
    }
}

/// The keys in force, re-read from their file on demand (SIGHUP).
pub struct ApiKeys {
    path: PathBuf,
    /// `INGEST_RATE_LIMIT`: the rate of every key without its own.
    default_rate: Option<RateLimit>,
    /// `ingest_requests_by_key_total`.
    by_key: IntCounterVec,
    /// Swapped whole by a reload; a request holds the set it started with.
    current: RwLock<Arc<Vec<Arc<KeyEntry>>>>,
    /// Whether the file could be used at the last (re)load; while it could not, every write is refused.
    usable: AtomicBool,
    /// `ingest_api_keys`.
    keys_gauge: IntGauge,
    /// `ingest_api_keys_file_usable`.
    usable_gauge: IntGauge,
}

impl ApiKeys {
    /// Reads the keys file; a file that cannot be read or has a bad line is an error naming the line.
    pub fn load(path: &Path, default_rate: Option<RateLimit>, metrics: &Metrics) -> anyhow::Result<Self> {
        let keys = ApiKeys {
            path: path.to_owned(),
            default_rate,
            by_key: metrics.requests_by_key.clone(),
            current: RwLock::new(Arc::new(Vec::new())),
            usable: AtomicBool::new(false),
            keys_gauge: metrics.access.keys.clone(),
            usable_gauge: metrics.access.keys_file_usable.clone(),
        };
        keys.reload()?;
        Ok(keys)
    }

    /// Reads the file again and puts its keys in force. A file that cannot be used puts no key in force: every
    /// write is refused (503) until a reload succeeds, since the keys it would keep may be ones just revoked.
    pub fn reload(&self) -> anyhow::Result<()> {
        let keys = match self.read() {
            Ok(keys) => keys,
            Err(e) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Vec::new());
                self.usable.store(false, Ordering::Release);
                self.usable_gauge.set(0);
                self.keys_gauge.set(0);
                error!(
                    file = %self.path.display(),
                    error = format!("{e:#}"),
                    "the api keys file cannot be used: every write is refused until it is fixed and reloaded (SIGHUP)"
                );
                return Err(e);
            }
        };
        self.install(keys);
        Ok(())
    }

    /// Whether the keys file could be used at the last (re)load.
    pub fn is_usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// The file's keys, or why it cannot be used.
    fn read(&self) -> anyhow::Result<Vec<ApiKey>> {
        secret_files::check(&self.path, "the API keys file (INGEST_API_KEYS_FILE)", FileKind::Grants)?;
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("could not read the API keys file {}", self.path.display()))?;
        parse_keys(&text).with_context(|| format!("the API keys file {} cannot be used", self.path.display()))
    }

    fn install(&self, keys: Vec<ApiKey>) {
        let previous = self.snapshot();
        let entries: Vec<Arc<KeyEntry>> = keys
            .into_iter()
            .map(|key| {
                let limiter = key.rate.or(self.default_rate).map(|rate| {
                    previous
                        .iter()
                        .find(|e| e.key.name == key.name)
                        .and_then(|e| e.limiter.clone())
                        .filter(|l| l.rate() == rate)
                        .unwrap_or_else(|| Arc::new(KeyLimiter::new(rate)))
                });
                let outcomes = OUTCOMES.map(|outcome| self.by_key.with_label_values(&[key.name.as_str(), outcome]));
                Arc::new(KeyEntry { key, limiter, outcomes })
            })
            .collect();
        let count = entries.len();
        // A removed key's series would otherwise be exported for ever, counting nothing, under a name that no
        // longer means anything.
        for gone in previous
            .iter()
            .filter(|old| !entries.iter().any(|e| e.key.name == old.key.name))
        {
            for outcome in OUTCOMES {
                let _ = self.by_key.remove_label_values(&[gone.key.name.as_str(), outcome]);
            }
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(entries);
        self.usable.store(true, Ordering::Release);
        self.usable_gauge.set(1);
        self.keys_gauge.set(count as i64);
        info!(keys = count, file = %self.path.display(), "api keys in force");
        if count == 0 {
            warn!(file = %self.path.display(), "the api keys file holds no key: every write is refused");
        }
    }

    fn snapshot(&self) -> Arc<Vec<Arc<KeyEntry>>> {
        // A panic while swapping cannot leave a half-written Arc behind.
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The entry of the key the request presents.
    pub fn identify(&self, headers: &HeaderMap) -> Result<Arc<KeyEntry>, IngestError> {
        if !self.is_usable() {
            return Err(IngestError::KeysUnusable);
        }
        self.identify_key(presented_key(headers)?)
    }

    /// The entry of `key`, wherever the request carried it.
    pub fn identify_key(&self, key: &[u8]) -> Result<Arc<KeyEntry>, IngestError> {
        if !self.is_usable() {
            return Err(IngestError::KeysUnusable);
        }
        let hash = hash_key(key);
        let entries = self.snapshot();
        // Every entry is compared, so that the time taken does not say which one (if any) matched.
        let mut found = None;
        for entry in entries.iter() {
            if same_hash(&entry.key.hash, &hash) {
                found = Some(entry);
            }
        }
        found.cloned().ok_or(IngestError::UnknownKey)
    }
}

/// The admin token of the operator's routes (`INGEST_ADMIN_TOKEN_FILE`), by its hash; re-read on SIGHUP.
pub struct AdminToken {
    path: PathBuf,
    /// `None` after a reload that failed: no token is believed until a good file is loaded.
    hash: RwLock<Option<[u8; 32]>>,
}

/// Shortest admin token taken, in characters.
const ADMIN_TOKEN_MIN_CHARS: usize = 16;

impl AdminToken {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let token = AdminToken {
            path: path.to_owned(),
            hash: RwLock::new(None),
        };
        token.reload()?;
        Ok(token)
    }

    /// Reads the file again; one that cannot be used leaves no token in force.
    pub fn reload(&self) -> anyhow::Result<()> {
        let read = secret_files::read_secret(
            &self.path,
            "the admin token file (INGEST_ADMIN_TOKEN_FILE)",
            ADMIN_TOKEN_MIN_CHARS,
        );
        let hash = read.as_ref().ok().map(|token| hash_key(token.as_bytes()));
        *self.hash.write().unwrap_or_else(|p| p.into_inner()) = hash;
        read.map(|_| ())
    }

    /// Whether `headers` carry the token as `Authorization: Bearer <token>`.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = *self.hash.read().unwrap_or_else(|p| p.into_inner()) else {
            return false;
        };
        match presented_key(headers) {
            Ok(token) => same_hash(&hash_key(token), &expected),
            Err(_) => false,
        }
    }
}

/// Who may read the operator's routes on one listener.
#[derive(Clone, Default)]
pub enum OperatorAccess {
    /// Anyone: a loopback or Unix-socket listener, the admin listener, or a gateway without keys.
    #[default]
    Open,
    /// A holder of the admin token; with none configured, nobody (the answer says how to set one).
    Token(Option<Arc<AdminToken>>),
}

impl OperatorAccess {
    /// Whether a request with `headers` may read the operator's routes.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        match self {
            OperatorAccess::Open => true,
            OperatorAccess::Token(token) => token.as_ref().is_some_and(|t| t.admits(headers)),
        }
    }

    /// The 401 of a refused operator request, naming both ways to the routes.
    pub fn refusal(&self) -> actix_web::HttpResponse {
        let message = match self {
            OperatorAccess::Token(Some(_)) => {
                "this route needs the admin token: send Authorization: Bearer <the token of INGEST_ADMIN_TOKEN_FILE>"
            }
            _ => {
                "this route is not served to other machines while API keys are in force: set INGEST_ADMIN_TOKEN_FILE \
                 and send its token as Authorization: Bearer <token>, or serve the operator's routes on \
                 INGEST_ADMIN_LISTEN"
            }
        };
        actix_web::HttpResponse::Unauthorized()
            .insert_header((
                actix_web::http::header::WWW_AUTHENTICATE,
                "Bearer realm=\"ingest-gateway-admin\"",
            ))
            .json(super::errors::ErrorBody::new("unauthorized", message, vec![]))
    }
}

/// Who may write, and how fast: the keys (none: anyone) and the per-address rate limit.
pub struct Access {
    keys: Option<Arc<ApiKeys>>,
    per_address: Option<AddressLimiter>,
    /// `INGEST_TRUSTED_PROXIES`: peers whose `X-Forwarded-For` names the client.
    trusted_proxies: Vec<ipnet::IpNet>,
    /// `INGEST_ADMIN_TOKEN_FILE`, loaded.
    admin_token: Option<Arc<AdminToken>>,
}

impl Access {
    /// From the settings: reads the keys file (an unusable one is an error naming its line), the admin token, and
    /// sets the rate limits. Without a keys file, says loudly that anyone may write.
    pub fn new(settings: &Settings, metrics: &Metrics) -> anyhow::Result<Self> {
        let keys = match &settings.api_keys_file {
            Some(path) => Some(Arc::new(ApiKeys::load(path, settings.rate_limit, metrics)?)),
            None => {
                warn!(
                    "no api keys file (INGEST_API_KEYS_FILE): anyone who can reach the gateway may write updates for \
                     any device or project"
                );
                None
            }
        };
        metrics.access.auth_enabled.set(i64::from(keys.is_some()));
        let admin_token = settings
            .admin_token_file
            .as_deref()
            .map(AdminToken::load)
            .transpose()?
            .map(Arc::new);
        // Without keys there is nobody to give INGEST_RATE_LIMIT to but the client addresses.
        let per_address = settings
            .rate_limit_per_address
            .or(if keys.is_none() { settings.rate_limit } else { None })
            .map(AddressLimiter::new);
        Ok(Access {
            keys,
            per_address,
            trusted_proxies: settings.trusted_proxies.clone(),
            admin_token,
        })
    }

    /// The keys, for whoever reloads them.
    pub fn keys(&self) -> Option<Arc<ApiKeys>> {
        self.keys.clone()
    }

    /// Whether writes need a key.
    pub fn requires_keys(&self) -> bool {
        self.keys.is_some()
    }

    /// The admin token, for whoever reloads it.
    pub fn admin_token(&self) -> Option<Arc<AdminToken>> {
        self.admin_token.clone()
    }

    /// Who may read the operator's routes on a listener that other machines can reach (`exposed`) or not: with
    /// keys in force, only the admin token's holder on an exposed one.
    pub fn operator_access(&self, exposed: bool) -> OperatorAccess {
        if exposed && self.requires_keys() {
            OperatorAccess::Token(self.admin_token.clone())
        } else {
            OperatorAccess::Open
        }
    }

    /// The key the request presents: `None` when the gateway takes requests without keys.
    pub fn identify(&self, headers: &HeaderMap) -> Result<Option<Arc<KeyEntry>>, IngestError> {
        self.keys.as_ref().map(|keys| keys.identify(headers)).transpose()
    }

    /// The key of a tracker request, found where its client can put it (the path, a `key` query parameter, HTTP
    /// Basic's password), else in the headers as on every route; `None` when the gateway takes requests without
    /// keys.
    pub fn identify_tracker(
        &self,
        carried: Option<&[u8]>,
        headers: &HeaderMap,
    ) -> Result<Option<Arc<KeyEntry>>, IngestError> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        match carried.filter(|k| !k.is_empty()) {
            Some(key) => keys.identify_key(key).map(Some),
            None => keys.identify(headers).map(Some),
        }
    }

    /// The address a request's rate is counted under: the TCP peer's, or behind a trusted proxy the client's it
    /// names. `None` for a Unix-socket client.
    pub fn client_address(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer?;
        if self.trusted_proxies.is_empty() {
            return Some(peer);
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .filter_map(|value| value.to_str().ok())
            .collect::<Vec<_>>();
        Some(client_address(peer, forwarded.into_iter(), &self.trusted_proxies))
    }

    /// Takes `updates` from the key's allowance, then from the client address's.
    pub fn admit(&self, caller: Option<&KeyEntry>, peer: Option<IpAddr>, updates: usize) -> Result<(), IngestError> {
        if let Some(limiter) = caller.and_then(|c| c.limiter.as_deref()) {
            limiter.admit(updates).map_err(|r| rate_error(r, "API key", updates))?;
        }
        // A Unix-socket client has no address: it is on this host, and the socket's mode says who may send.
        if let (Some(limiter), Some(address)) = (&self.per_address, peer) {
            limiter
                .admit(address, updates)
                .map_err(|r| rate_error(r, "client address", updates))?;
        }
        Ok(())
    }

    // Limits before work: a request takes one cell with `admit(…, 1)` before its body is read, and the rest here
    // once its updates are counted (see `rate_limit`).

    /// Takes the rest of a request of `updates` updates from the key's allowance, then from the client address's:
    /// its first cell was taken before its body was read.
    pub fn admit_remainder(
        &self,
        caller: Option<&KeyEntry>,
        peer: Option<IpAddr>,
        updates: usize,
    ) -> Result<(), IngestError> {
        if let Some(limiter) = caller.and_then(|c| c.limiter.as_deref()) {
            limiter
                .admit_remainder(updates)
                .map_err(|r| rate_error(r, "API key", updates))?;
        }
        if let (Some(limiter), Some(address)) = (&self.per_address, peer) {
            limiter
                .admit_remainder(address, updates)
                .map_err(|r| rate_error(r, "client address", updates))?;
        }
        Ok(())
    }
}

fn rate_error(refusal: RateRefusal, limit: &'static str, updates: usize) -> IngestError {
    match refusal {
        RateRefusal::Wait { retry_after_secs } => IngestError::RateLimited {
            limit,
            updates,
            retry_after_secs,
        },
        RateRefusal::LargerThanBurst { burst } => IngestError::LargerThanBurst { limit, burst },
    }
}

/// A key made by `ingest-gateway new-key`: the key, shown once, and its line for the keys file.
pub struct NewKey {
    pub key: String,
    pub line: String,
}

/// Makes a key from the system's random source and the keys-file line that grants it `args`.
pub fn new_key(args: &NewKeyArgs) -> anyhow::Result<NewKey> {
    let mut bytes = [0u8; KEY_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("could not read random bytes: {e}"))?;
    let key = format!("{KEY_PREFIX}{}", to_hex(&bytes));
    let mut line = format!("{} {} streams={}", args.name, hashed(&key), args.streams.join(","));
    if !args.devices.is_empty() {
        line += &format!(" device={}", args.devices.join(","));
    }
    if !args.device_prefixes.is_empty() {
        line += &format!(" devices={}", args.device_prefixes.join(","));
    }
    if let Some(projects) = &args.projects {
        line += &format!(" projects={projects}");
    }
    if let Some(rate) = &args.rate {
        line += &format!(" rate={rate}");
    }
    // The line is read back as the gateway will read it, so that a mistake shows now, not at the next reload.
    parse_line(&line).map_err(|message| anyhow::anyhow!("{message}"))?;
    Ok(NewKey { key, line })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    const HASH: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const OTHER_HASH: &str = "sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    fn one(line: &str) -> Result<ApiKey, KeyFileError> {
        parse_keys(line).map(|mut keys| keys.remove(0))
    }

    fn error_of(text: &str) -> KeyFileError {
        parse_keys(text).expect_err("the file is refused")
    }

    #[test]
    fn a_line_gives_a_name_a_hash_streams_and_a_scope() {
        let key = one(&format!(
            "fleet {HASH} streams=location devices=truck-,van- rate=5:50  # the north depot"
        ))
        .unwrap();
        assert_eq!(key.name, "fleet");
        assert_eq!(key.hash, hash_key(b"test"));
        assert_eq!(key.streams, ["location"]);
        assert_eq!(key.device_prefixes, ["truck-", "van-"]);
        assert!(key.projects.is_empty());
        assert_eq!(key.rate, Some("5:50".parse().unwrap()));
    }

    #[test]
    fn projects_are_ranges_and_single_ids() {
        let key = one(&format!("pollers {HASH} streams=poll projects=1-100,250")).unwrap();
        assert_eq!(key.projects, vec![1..=100, 250..=250]);
    }

    #[test]
    fn comments_and_blank_lines_are_skipped_and_errors_name_their_line() {
        let text = format!("# keys\n\nfleet {HASH} streams=location\n  # more\npollers {OTHER_HASH} streams=pol\n");
        let error = error_of(&text);
        assert_eq!(error.line, 5);
        assert!(error.message.contains("unknown stream \"pol\""), "{}", error.message);
        assert!(error.to_string().starts_with("line 5: "));
    }

    #[test]
    fn every_mistake_in_a_line_is_refused() {
        let cases = [
            (format!("bad/name {HASH} streams=poll"), "not a key name"),
            ("fleet streams=poll".to_owned(), "not sha256:"),
            ("fleet sha256:abc streams=poll".to_owned(), "64 hex digits"),
            (format!("fleet {KEY_PREFIX}0123 streams=poll"), "a key itself"),
            (format!("fleet {HASH} streams=poll {KEY_PREFIX}0123"), "a key itself"),
            (format!("fleet {HASH}"), "streams= is missing"),
            (
                format!("fleet {HASH} streams=poll devices=truck-"),
                "may not write location",
            ),
            (
                format!("fleet {HASH} streams=location projects=1-5"),
                "may not write poll",
            ),
            (format!("fleet {HASH} streams=poll projects=5-1"), "empty range"),
            (format!("fleet {HASH} streams=poll projects=0"), "not a project id"),
            (
                format!("fleet {HASH} streams=location devices=a-,b/c"),
                "not a device-id prefix",
            ),
            (
                format!("fleet {HASH} streams=location devices="),
                "not a device-id prefix",
            ),
            (format!("fleet {HASH} streams=poll streams=location"), "given twice"),
            (format!("fleet {HASH} streams=poll colour=red"), "unknown field"),
            (format!("fleet {HASH} streams=poll rate=fast"), "not a rate limit"),
            (format!("fleet {HASH} streams=poll loose"), "not field=value"),
            (
                format!("fleet {HASH} streams=location devices=truck-1"),
                "must end with one of - . : _ /",
            ),
            (
                format!("fleet {HASH} streams=location devices=truck-,van"),
                "devices=van would",
            ),
            (
                format!("fleet {HASH} streams=location devices=/"),
                "not a device-id prefix",
            ),
            (format!("fleet {HASH} streams=location device=a/b"), "not a device id"),
            (
                format!("fleet {HASH} streams=poll device=truck-1"),
                "may not write location",
            ),
        ];
        for (line, expected) in cases {
            let error = error_of(&line);
            assert!(error.message.contains(expected), "{line}: {}", error.message);
        }
    }

    #[test]
    fn a_name_or_a_key_given_twice_is_refused() {
        let names = error_of(&format!("a {HASH} streams=poll\na {OTHER_HASH} streams=poll"));
        assert_eq!((names.line, names.message.contains("line 1")), (2, true));
        let hashes = error_of(&format!("a {HASH} streams=poll\nb {HASH} streams=poll"));
        assert_eq!(hashes.line, 2);
    }

    #[test]
    fn an_empty_file_holds_no_key() {
        assert_eq!(parse_keys("# nobody yet\n"), Ok(vec![]));
    }

    fn location(device_id: &str) -> LocationUpdate {
        LocationUpdate::at_epoch(device_id)
    }

    fn poll(project_id: i64) -> PollResult {
        PollResult {
            project_id,
            polled_at: time::OffsetDateTime::UNIX_EPOCH,
            success: true,
            status_code: None,
            response_time_ms: None,
            error_message: None,
            attributes: None,
            received_at: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_device_is_in_scope_when_its_id_starts_with_a_prefix() {
        let key = one(&format!("fleet {HASH} streams=location devices=truck-,van-")).unwrap();
        assert_eq!(location("truck-1").outside(&key), None);
        assert_eq!(location("van-").outside(&key), None);
        let (field, reason) = location("Truck-1").outside(&key).unwrap();
        assert_eq!(field, "device_id");
        assert!(reason.contains("truck-, van-"), "{reason}");
        let anyone = one(&format!("all {HASH} streams=location")).unwrap();
        assert_eq!(location("anything").outside(&anyone), None);
    }

    #[test]
    fn a_device_key_reaches_its_own_id_and_nothing_that_merely_starts_with_it() {
        let key = one(&format!("truck-1 {HASH} streams=location device=truck-1,van-2")).unwrap();
        assert_eq!(key.device_ids, ["truck-1", "van-2"]);
        assert_eq!(location("truck-1").outside(&key), None);
        assert_eq!(location("van-2").outside(&key), None);
        for other in ["truck-10", "truck-1.x", "truck-1-a", "truck-", "Truck-1"] {
            let (field, reason) = location(other).outside(&key).expect(other);
            assert_eq!(field, "device_id");
            assert!(reason.contains("truck-1, van-2"), "{reason}");
        }
        let both = one(&format!(
            "mixed {HASH} streams=location device=truck-1 devices=truck-1-,van:"
        ))
        .unwrap();
        for inside in ["truck-1", "truck-1-fmb", "van:9"] {
            assert_eq!(location(inside).outside(&both), None, "{inside}");
        }
        assert!(location("truck-10")
            .outside(&both)
            .unwrap()
            .1
            .contains("truck-1 and those starting with"));
    }

    #[test]
    fn every_kind_of_update_is_held_to_the_same_device_scope() {
        let key = one(&format!(
            "truck-1 {HASH} streams=location,poll device=truck-1 projects=7"
        ))
        .unwrap();
        let letter = |device: Option<&str>| DeadLetter {
            stream: "location".into(),
            protocol: "osmand".into(),
            reason: "null_island".into(),
            message: "lat and lon are both 0".into(),
            device_id: device.map(str::to_owned),
            payload: "{}".into(),
            received_at: time::OffsetDateTime::UNIX_EPOCH,
        };
        assert_eq!(location("truck-1").outside(&key), None);
        assert_eq!(letter(Some("truck-1")).outside(&key), None);
        assert!(location("truck-10").outside(&key).is_some());
        assert_eq!(
            letter(Some("truck-10")).outside(&key),
            location("truck-10").outside(&key),
            "a dead letter is refused as its fix would be"
        );
        assert_eq!(poll(7).outside(&key), None);
        assert!(poll(70).outside(&key).is_some());
    }

    #[test]
    fn a_project_is_in_scope_inside_a_range() {
        let key = one(&format!("pollers {HASH} streams=poll projects=1-100,250")).unwrap();
        for inside in [1, 100, 250] {
            assert_eq!(poll(inside).outside(&key), None, "{inside}");
        }
        for outside in [101, 249, 251, i64::MAX] {
            assert!(poll(outside).outside(&key).is_some(), "{outside}");
        }
        assert!(poll(101).outside(&key).unwrap().1.contains("1-100, 250"));
    }

    #[test]
    fn one_update_out_of_scope_refuses_the_request_and_is_named() {
        let key = one(&format!("fleet {HASH} streams=location devices=truck-")).unwrap();
        let metrics = Metrics::new().unwrap();
        let entry = KeyEntry {
            key,
            limiter: None,
            outcomes: OUTCOMES.map(|o| metrics.requests_by_key.with_label_values(&["fleet", o])),
        };
        let updates = [location("truck-1"), location("car-2"), location("truck-3")];
        match entry.check_scope(&updates) {
            Err(IngestError::OutOfScope { updates, errors, .. }) => {
                assert_eq!(updates, 1);
                assert_eq!(errors[0].index, 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(entry.check_scope(&updates[..1]).is_ok());
        assert!(entry.check_stream::<PollResult>().is_err());
        assert!(entry.check_stream::<LocationUpdate>().is_ok());
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn a_key_comes_as_a_bearer_token_or_in_x_api_key() {
        let key = |pairs| {
            presented_key(&headers(pairs))
                .map(<[u8]>::to_vec)
                .map_err(|e| e.to_string())
        };
        assert_eq!(key(&[("authorization", "Bearer abc")]), Ok(b"abc".to_vec()));
        assert_eq!(key(&[("authorization", "bearer  abc ")]), Ok(b"abc".to_vec()));
        assert_eq!(key(&[("x-api-key", "abc")]), Ok(b"abc".to_vec()));
        assert_eq!(
            key(&[("authorization", "Bearer abc"), ("x-api-key", "abc")]),
            Ok(b"abc".to_vec())
        );
        let missing = IngestError::MissingKey.to_string();
        assert_eq!(key(&[]), Err(missing.clone()));
        assert_eq!(key(&[("authorization", "Basic YTpi")]), Err(missing.clone()));
        assert_eq!(key(&[("authorization", "Bearer")]), Err(missing));
        let unknown = IngestError::UnknownKey.to_string();
        assert_eq!(
            key(&[("authorization", "Bearer abc"), ("x-api-key", "xyz")]),
            Err(unknown)
        );
    }

    #[test]
    fn hashes_are_equal_only_when_every_byte_is() {
        let a = hash_key(b"a");
        let mut b = a;
        assert!(same_hash(&a, &b));
        b[31] ^= 1;
        assert!(!same_hash(&a, &b));
        b = a;
        b[0] ^= 0x80;
        assert!(!same_hash(&a, &b));
    }

    #[test]
    fn a_new_key_is_random_and_its_line_holds_its_hash() {
        let args = NewKeyArgs {
            name: "fleet".into(),
            streams: vec!["location".into()],
            devices: vec![],
            device_prefixes: vec!["truck-".into()],
            projects: None,
            rate: Some("10:100".parse().unwrap()),
        };
        let made = new_key(&args).unwrap();
        assert!(made.key.starts_with(KEY_PREFIX));
        assert_eq!(made.key.len(), KEY_PREFIX.len() + 64);
        let key = one(&made.line).unwrap();
        assert_eq!(key.hash, hash_key(made.key.as_bytes()));
        assert_eq!(key.device_prefixes, ["truck-"]);
        assert_ne!(new_key(&args).unwrap().key, made.key);
        assert!(!made.line.contains(&made.key[KEY_PREFIX.len()..]));
    }

    #[test]
    fn a_new_key_with_a_bad_scope_is_refused() {
        let args = NewKeyArgs {
            name: "pollers".into(),
            streams: vec!["poll".into()],
            devices: vec![],
            device_prefixes: vec!["truck-".into()],
            projects: None,
            rate: None,
        };
        let error = new_key(&args).err().unwrap().to_string();
        assert!(error.contains("may not write location"), "{error}");
    }

    #[test]
    fn a_new_key_for_one_device_writes_that_device_only() {
        let args = NewKeyArgs {
            name: "truck-7".into(),
            streams: vec!["location".into()],
            devices: vec!["truck-7".into()],
            device_prefixes: vec![],
            projects: None,
            rate: None,
        };
        let made = new_key(&args).unwrap();
        assert!(made.line.contains(" device=truck-7"), "{}", made.line);
        let key = one(&made.line).unwrap();
        assert_eq!(location("truck-7").outside(&key), None);
        assert!(location("truck-70").outside(&key).is_some());

        let loose = NewKeyArgs {
            devices: vec![],
            device_prefixes: vec!["truck-7".into()],
            ..args
        };
        let error = new_key(&loose).err().unwrap().to_string();
        assert!(error.contains("device=truck-7"), "{error}");
    }

    #[test]
    fn a_hash_is_the_sha256_of_the_key_in_hex() {
        // `printf %s test | sha256sum`
        assert_eq!(hashed("test"), HASH);
    }
}
