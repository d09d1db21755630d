//! The NATS JetStream backend of the intake: many stateless gateways publish into one replicated stream per
//! update kind, and batch writers anywhere consume it. A `202` means JetStream acknowledged the publish (stored on
//! a quorum of its replicas).
//!
//! - [`publish`]: the gateway's side: a request's updates join one message per shard shared with the requests
//!   that arrive while the shard's previous message awaits its ack, with a `Nats-Msg-Id` derived from the
//!   content; a request is answered once every message holding its updates is acknowledged.
//! - [`consume`]: the writers' side: shard leases (PostgreSQL advisory locks), one pull consumer per leased
//!   shard, and the delivery that acks a message only after its batch is committed.
//! - [`signing`]: the HMAC-SHA256 over each record and each commit notice.
//!
//! # NATS is a trust boundary
//! Whoever may publish on `ingest.>` in the NATS account could otherwise write any device and any project, past the
//! API keys and the validation. So every record is signed by the gateway with the key it shares with the writers,
//! and a writer keeps in `dead_letters` (reason `unsigned`, `bad_signature` or `undecodable`), never in the tables,
//! a record whose signature does not hold; it validates the updates of a signed one again, with the same rules,
//! and keeps those that break one (reason `invalid`). Commit notices go only to subjects under the inbox prefix,
//! signed, and a gateway believes only a signed notice for a message it published.
//!
//! # Layout in JetStream
//! Stream `INGEST_LOCATION` holds subjects `ingest.location.<shard>` (likewise `INGEST_POLL`, `ingest.poll.*`, and
//! `INGEST_DEAD_LETTER`, `ingest.dead_letter.*`, for the tracker fixes kept in `dead_letters`), with work-queue
//! retention: a message leaves the stream once a writer acks it, so the stream holds exactly the backlog. An
//! update's shard is a hash of its natural key (device, project) modulo the shard count, so that one device's
//! updates stay in one subject, in order. Each shard has one durable pull consumer, `<stream>-<shard>`.

pub mod consume;
pub mod publish;
pub mod signing;

use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use tracing::info;

use crate::config::Settings;
use crate::model::recheck::RecheckRules;
use crate::model::{DeadLetter, LocationUpdate, PollResult};

/// The stream metadata key that records the shard count the stream was made for.
const SHARDS_METADATA: &str = "ingest_shards";

/// What every gateway and writer must agree on about the JetStream side.
#[derive(Debug, Clone)]
pub struct JetStreamSettings {
    pub shards: u16,
    pub replicas: usize,
    pub duplicate_window: Duration,
    pub max_bytes: i64,
    pub publish_timeout: Duration,
    pub ack_wait: Duration,
    /// The rules the writers check each update against again (the gateways' window).
    pub recheck: RecheckRules,
    /// The subjects commit notices may go to: `<prefix>.…` (`INGEST_NATS_INBOX_PREFIX`).
    pub inbox_prefix: String,
}

impl JetStreamSettings {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            shards: settings.jetstream.jetstream_shards,
            replicas: usize::from(settings.jetstream.jetstream_replicas),
            duplicate_window: settings.jetstream.jetstream_duplicate_window,
            max_bytes: i64::try_from(settings.jetstream.jetstream_max_bytes).unwrap_or(i64::MAX),
            publish_timeout: settings.jetstream.jetstream_publish_timeout,
            ack_wait: settings.jetstream.jetstream_ack_wait,
            recheck: RecheckRules {
                max_future_skew: settings.limits.max_future_skew,
                max_age: settings.limits.max_age,
            },
            inbox_prefix: settings.jetstream.nats_inbox_prefix.clone(),
        }
    }
}

/// The update's natural key, as bytes to hash into a shard: one key's updates always go to the same shard.
pub trait ShardKey {
    fn shard_key(&self) -> ShardKeyBytes<'_>;
}

/// A natural key's bytes (borrowed text or an inline number).
pub enum ShardKeyBytes<'a> {
    Text(&'a str),
    Number(i64),
}

impl ShardKey for LocationUpdate {
    fn shard_key(&self) -> ShardKeyBytes<'_> {
        ShardKeyBytes::Text(&self.device_id)
    }
}

impl ShardKey for PollResult {
    fn shard_key(&self) -> ShardKeyBytes<'_> {
        ShardKeyBytes::Number(self.project_id)
    }
}

impl ShardKey for DeadLetter {
    /// The device the letter names, so that one device's letters are written in order; the protocol for a letter
    /// that names none.
    fn shard_key(&self) -> ShardKeyBytes<'_> {
        ShardKeyBytes::Text(self.device_id.as_deref().unwrap_or(&self.protocol))
    }
}

/// The shard of `update`: FNV-1a of its key, so that every gateway, whatever its build, agrees.
pub fn shard_of<T: ShardKey>(update: &T, shards: u16) -> u16 {
    let number;
    let bytes: &[u8] = match update.shard_key() {
        ShardKeyBytes::Text(text) => text.as_bytes(),
        ShardKeyBytes::Number(n) => {
            number = n.to_le_bytes();
            &number
        }
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(shards.max(1))) as u16
}

/// The JetStream stream of update kind `stream` (`location` → `INGEST_LOCATION`).
pub fn stream_name(stream: &str) -> String {
    format!("INGEST_{}", stream.to_ascii_uppercase())
}

/// The subject of one shard of update kind `stream`.
pub fn subject(stream: &str, shard: u16) -> String {
    format!("ingest.{stream}.{shard}")
}

/// The identity under which the writers record each shard's committed stream sequence in
/// `ingest_wal_progress` (the shard is the slot): shared by every writer, whichever process holds the shard.
pub fn checkpoint_instance(stream: &str) -> String {
    format!("jetstream:{}", stream_name(stream))
}

/// Connects to NATS with the settings' servers, credentials and TLS. The client reconnects by itself forever;
/// the first connection must succeed (a gateway that cannot reach NATS at start-up refuses to start).
pub async fn connect(settings: &Settings, name: &str) -> anyhow::Result<async_nats::Client> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        // Each gateway holds many requests in flight: room for their publishes while a connection is re-made.
        .client_capacity(65_536)
        // Replies (JetStream's, and the writers' commit notices) come under one prefix, which NATS permissions can
        // confine to this deployment.
        .custom_inbox_prefix(settings.jetstream.nats_inbox_prefix.clone());
    if let Some(path) = &settings.jetstream.nats_creds {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("could not read the NATS credentials file {}", path.display()))?;
    }
    match (&settings.jetstream.nats_user, &settings.jetstream.nats_password) {
        (Some(user), Some(password)) => options = options.user_and_password(user.clone(), password.clone()),
        (None, None) => {}
        _ => bail!("INGEST_NATS_USER and INGEST_NATS_PASSWORD go together"),
    }
    if let Some(token) = &settings.jetstream.nats_token {
        options = options.token(token.clone());
    }
    if let Some(ca) = &settings.jetstream.nats_tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    match (&settings.jetstream.nats_tls_cert, &settings.jetstream.nats_tls_key) {
        (Some(cert), Some(key)) => options = options.add_client_certificate(cert.clone(), key.clone()),
        (None, None) => {}
        _ => bail!("INGEST_NATS_TLS_CERT and INGEST_NATS_TLS_KEY go together"),
    }
    let servers: Vec<async_nats::ServerAddr> = settings
        .jetstream
        .nats_url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .with_context(|| format!("INGEST_NATS_URL: {} is not a NATS server address", redacted(s)))
        })
        .collect::<anyhow::Result<_>>()?;
    if servers.is_empty() {
        bail!("INGEST_NATS_URL names no server");
    }
    options.connect(servers).await.with_context(|| {
        format!(
            "could not connect to NATS at {}",
            redacted(&settings.jetstream.nats_url)
        )
    })
}

/// Whether a commit notice may be sent to `subject`: one token of `A-Z a-z 0-9 _ -` under `<prefix>.`, as the
/// client's inboxes are — never a subject a message chose elsewhere (another stream, another application).
pub fn is_inbox_subject(prefix: &str, subject: &str) -> bool {
    subject
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|token| {
            !token.is_empty()
                && token.len() <= 64
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        })
}

/// NATS server addresses as they may be shown: a password (or a token in the user's place) replaced by `***`.
pub fn redacted(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let (scheme, rest) = match url.split_once("://") {
                Some((scheme, rest)) => (Some(scheme), rest),
                None => (None, url),
            };
            let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let shown = match rest[..host_end].rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = match userinfo.split_once(':') {
                        Some((user, _password)) => format!("{user}:***"),
                        None => "***".to_owned(),
                    };
                    format!("{user}@{host}{}", &rest[host_end..])
                }
                None => rest.to_owned(),
            };
            match scheme {
                Some(scheme) => format!("{scheme}://{shown}"),
                None => shown,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The JetStream stream exists with other settings than this process's.
#[derive(Debug, thiserror::Error)]
#[error(
    "JetStream stream {stream} does not match the settings: {differences}; change the settings to match, or change \
     the stream (a shard count can change only once the stream is empty and recreated)"
)]
pub struct SettingsMismatch {
    pub stream: String,
    pub differences: String,
}

/// The stream configuration the settings ask for.
fn wanted_config(stream: &str, js: &JetStreamSettings) -> stream::Config {
    stream::Config {
        name: stream_name(stream),
        subjects: vec![format!("ingest.{stream}.*")],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        num_replicas: js.replicas,
        duplicate_window: js.duplicate_window,
        max_bytes: js.max_bytes,
        // A full stream refuses new messages (the gateway answers 503) rather than dropping acknowledged ones.
        discard: DiscardPolicy::New,
        metadata: [(SHARDS_METADATA.to_owned(), js.shards.to_string())].into(),
        ..Default::default()
    }
}

/// Creates the stream of `stream`, or checks that the one there matches the settings; a mismatch is an error
/// that says which setting differs, since gateways and writers that disagree would lose the order of updates
/// or their deduplication.
pub async fn ensure_stream(context: &Context, stream: &str, js: &JetStreamSettings) -> anyhow::Result<()> {
    let wanted = wanted_config(stream, js);
    let name = wanted.name.clone();
    let existing = match context.get_stream(&name).await {
        Ok(mut found) => Some(
            found
                .info()
                .await
                .context("could not read the JetStream stream")?
                .config
                .clone(),
        ),
        Err(e)
            if matches!(e.kind(), GetStreamErrorKind::JetStream(ref err)
                if err.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            None
        }
        Err(e) => return Err(e).with_context(|| format!("could not look up JetStream stream {name}")),
    };
    let Some(found) = existing else {
        context
            .create_stream(wanted)
            .await
            .with_context(|| format!("could not create JetStream stream {name}"))?;
        info!(stream = %name, shards = js.shards, replicas = js.replicas, "JetStream stream created");
        return Ok(());
    };
    let mut differences = Vec::new();
    if found.subjects != wanted.subjects {
        differences.push(format!("subjects {:?}, expected {:?}", found.subjects, wanted.subjects));
    }
    if found.retention != RetentionPolicy::WorkQueue {
        differences.push(format!("retention {:?}, expected WorkQueue", found.retention));
    }
    if found.storage != StorageType::File {
        differences.push(format!("storage {:?}, expected File", found.storage));
    }
    if found.num_replicas != wanted.num_replicas {
        differences.push(format!(
            "{} replicas, INGEST_JETSTREAM_REPLICAS says {}",
            found.num_replicas, wanted.num_replicas
        ));
    }
    if found.duplicate_window != wanted.duplicate_window {
        differences.push(format!(
            "duplicate window {:?}, INGEST_JETSTREAM_DUPLICATE_WINDOW says {:?}",
            found.duplicate_window, wanted.duplicate_window
        ));
    }
    if found.max_bytes != wanted.max_bytes {
        differences.push(format!(
            "max bytes {}, INGEST_JETSTREAM_MAX_BYTES says {}",
            found.max_bytes, wanted.max_bytes
        ));
    }
    if found.discard != DiscardPolicy::New {
        differences.push("discard policy old, expected new".to_owned());
    }
    let shards = found.metadata.get(SHARDS_METADATA).cloned().unwrap_or_default();
    if shards != js.shards.to_string() {
        differences.push(format!(
            "made for {shards:?} shards, INGEST_JETSTREAM_SHARDS says {}",
            js.shards
        ));
    }
    if !differences.is_empty() {
        return Err(SettingsMismatch {
            stream: name,
            differences: differences.join("; "),
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(device: &str) -> LocationUpdate {
        LocationUpdate::at_epoch(device)
    }

    #[test]
    fn one_device_always_lands_in_one_shard_within_range() {
        for shards in [1u16, 7, 16, 1024] {
            for device in ["truck-1", "truck-2", "", "a-very-long-device-name-0123456789"] {
                let a = shard_of(&location(device), shards);
                assert!(a < shards);
                assert_eq!(a, shard_of(&location(device), shards));
            }
        }
    }

    #[test]
    fn a_commit_notice_goes_only_to_one_inbox_under_the_prefix() {
        assert!(is_inbox_subject("_INBOX", "_INBOX.aB3dE9fGh1"));
        assert!(is_inbox_subject("_INBOX_ingest.gw", "_INBOX_ingest.gw.x1"));
        for refused in [
            "_INBOX",
            "_INBOX.",
            "_INBOX.a.b",
            "_INBOX.>",
            "_INBOX.*",
            "_INBOXa.b",
            "ingest.location.3",
            "$JS.API.STREAM.DELETE.INGEST_LOCATION",
            "anything.you.like",
        ] {
            assert!(!is_inbox_subject("_INBOX", refused), "{refused}");
        }
    }

    #[test]
    fn a_password_or_token_in_a_nats_url_is_never_shown() {
        assert_eq!(
            redacted("nats://u:s3cret@host:4222, tls://tok3n@other:4222/x,nats://plain:4222"),
            "nats://u:***@host:4222,tls://***@other:4222/x,nats://plain:4222"
        );
        assert_eq!(redacted("u:p@a@host"), "u:***@host");
        assert!(!redacted("nats://a:b@c").contains('b'));
    }

    #[test]
    fn devices_spread_over_the_shards() {
        let mut seen = [0usize; 16];
        for i in 0..1600 {
            seen[usize::from(shard_of(&location(&format!("truck-{i}")), 16))] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
    }
}
