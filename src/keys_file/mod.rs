//! The API keys file (`INGEST_API_KEYS_FILE`): one key per line, never the key itself but its SHA-256, with what
//! it may write over HTTP and which tracker units it lets connect over TCP. Both transports read it from here.
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
//! A plain hash is enough because keys are 32 random bytes (no dictionary to try), and a slow password hash would
//! cost every request.
//!
//! - [`imeis`]: the `imeis=` field, the units a key lets connect over TCP.

pub mod imeis;

use std::ops::RangeInclusive;

use sha2::{Digest, Sha256};

use crate::config::RateLimit;
use crate::model::location::is_valid_device_id;
use crate::model::{LocationUpdate, PollResult, Update};
use crate::support::hex;

/// What every key the gateway makes starts with, so that a leaked one is recognisable (secret scanners, logs).
pub const KEY_PREFIX: &str = "igk_";

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
    pub(crate) fn device_scope(&self) -> String {
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
        // `imeis=` (which tracker units may connect over TCP) is read by [`imeis`].
        let key = parse_line(&imeis::without_imeis(content)).map_err(fail)?;
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
pub(crate) fn parse_line(content: &str) -> Result<ApiKey, String> {
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
    format!("sha256:{}", hex::encode(&hash_key(key.as_bytes())))
}

/// Whether two hashes are equal, taking the same time wherever they differ.
///
/// Only hashes are compared, so an early exit would tell an attacker how many leading bytes of the SHA-256 of
/// *their own guess* match — which does not bring them closer to a key. Comparing in constant time anyway
/// leaves nothing to argue about. `black_box` on every step keeps the optimiser from turning the fold back
/// into a comparison that stops at the first difference.
pub fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_hash_is_the_sha256_of_the_key_in_hex() {
        // `printf %s test | sha256sum`
        assert_eq!(hashed("test"), HASH);
    }
}
