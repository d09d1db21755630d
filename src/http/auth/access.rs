//! The keys in force and their reload, the admin token of the operator's routes, and [`Access`]: who may write
//! (the key a request presents) and how fast (the key's and the client address's rate limits).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use actix_web::http::header::{HeaderMap, AUTHORIZATION};
use actix_web::http::StatusCode;
use anyhow::Context;
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use tracing::{error, info, warn};

use crate::config::{RateLimit, Settings};
use crate::http::errors::IngestError;
use crate::http::rate_limit::{client_address, AddressLimiter, KeyLimiter, RateRefusal};
use crate::keys_file::{hash_key, parse_keys, same_hash, ApiKey};
use crate::metrics::Metrics;
use crate::secret_files::{self, FileKind};

/// The header a client may send its key in instead of `Authorization`.
const X_API_KEY: &str = "x-api-key";

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
pub(super) const OUTCOMES: [&str; 5] = ["accepted", "forbidden", "rate_limited", "refused", "unavailable"];

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
    pub(super) limiter: Option<Arc<KeyLimiter>>,
    /// Indexed like [`OUTCOMES`], looked up once at load.
    pub(super) outcomes: [IntCounter; 5],
}

impl KeyEntry {
    /// Counts a request of this key that ended with `status`.
    pub fn count(&self, status: StatusCode) {
        self.outcomes[outcome_index(status)].inc();
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
            .json(crate::http::errors::ErrorBody::new("unauthorized", message, vec![]))
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
        let keys = match &settings.auth.api_keys_file {
            Some(path) => Some(Arc::new(ApiKeys::load(path, settings.auth.rate_limit, metrics)?)),
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
            .auth
            .admin_token_file
            .as_deref()
            .map(AdminToken::load)
            .transpose()?
            .map(Arc::new);
        // Without keys there is nobody to give INGEST_RATE_LIMIT to but the client addresses.
        let per_address = settings
            .auth
            .rate_limit_per_address
            .or(if keys.is_none() { settings.auth.rate_limit } else { None })
            .map(AddressLimiter::new);
        Ok(Access {
            keys,
            per_address,
            trusted_proxies: settings.auth.trusted_proxies.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

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
}
