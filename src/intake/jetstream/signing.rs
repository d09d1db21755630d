//! Signatures over what crosses NATS: every record a gateway publishes and every commit notice a writer sends back
//! carries an HMAC-SHA256 under a key the gateways and writers share (`INGEST_JETSTREAM_SIGNING_KEY_FILE`). Whoever
//! else can publish in the NATS account — a leaked credential, another application, a user without subject
//! permissions — cannot make a record a writer stores, nor a notice a gateway believes.
//!
//! A record's signature covers its subject (stream and shard), the reply subject it asks commit notices on, and its
//! bytes; a notice's covers the inbox it is sent to, the stream and sequence of the message it confirms and the
//! count.
//! So neither can be moved to another shard, another inbox or another message. A replayed record is the same
//! updates again, which the message ids and the natural keys absorb.
//!
//! The file holds one key per line (at least 32 characters, e.g. `openssl rand -hex 32`; `#` starts a comment):
//! the first signs, every one verifies, so that a key is rotated by adding the new one second, reloading everyone,
//! moving it first, reloading, then removing the old one.

use crate::support::hex::encode as hex;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::secret_files::{self, FileKind};

/// The header that carries a signature: `v1=<64 hex digits>`.
pub const SIGNATURE_HEADER: &str = "Ingest-Signature";

/// Shortest key taken, in bytes.
const MIN_KEY_BYTES: usize = 32;

/// What a signature says of the bytes it came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No signature at all.
    Unsigned,
    /// A signature that none of the keys made over these bytes.
    BadSignature,
}

impl Refusal {
    /// The `reason` label and the dead letter's reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::BadSignature => "bad_signature",
        }
    }
}

/// The shared keys, re-read on SIGHUP.
pub struct SigningKeys {
    path: Option<PathBuf>,
    /// The first signs; all verify.
    keys: RwLock<Arc<Vec<Vec<u8>>>>,
}

type HmacSha256 = Hmac<Sha256>;

impl SigningKeys {
    /// Reads the keys file; refused when others may write it, when it holds no key, or a key shorter than 32 bytes.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let keys = SigningKeys {
            path: Some(path.to_owned()),
            keys: RwLock::new(Arc::new(Vec::new())),
        };
        keys.reload()?;
        Ok(keys)
    }

    /// Keys given directly (tests, tools).
    pub fn from_keys(keys: Vec<Vec<u8>>) -> Self {
        SigningKeys {
            path: None,
            keys: RwLock::new(Arc::new(keys)),
        }
    }

    /// Reads the file again. A file that cannot be used keeps the keys in force: every record signed meanwhile
    /// would otherwise be refused by every writer, and nothing revoked is kept that the file still names.
    pub fn reload(&self) -> anyhow::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let what = "the JetStream signing key file (INGEST_JETSTREAM_SIGNING_KEY_FILE)";
        secret_files::check(path, what, FileKind::Secret)?;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("could not read {what} {}", path.display()))?;
        let mut keys = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let key = line.split('#').next().unwrap_or_default().trim();
            if key.is_empty() {
                continue;
            }
            if key.len() < MIN_KEY_BYTES {
                // Its length only: a key never goes into a message.
                bail!(
                    "{what} {}: line {} holds a key of {} bytes; at least {MIN_KEY_BYTES} are needed (`openssl rand \
                     -hex 32`)",
                    path.display(),
                    index + 1,
                    key.len()
                );
            }
            keys.push(key.as_bytes().to_vec());
        }
        if keys.is_empty() {
            bail!("{what} {} holds no key", path.display());
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        Ok(())
    }

    fn snapshot(&self) -> Arc<Vec<Vec<u8>>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The signature of a record published on `subject`, asking for notices on `reply`.
    pub fn sign_record(&self, subject: &str, reply: Option<&str>, payload: &[u8]) -> String {
        let keys = self.snapshot();
        // `load` and `from_keys` callers give at least one key; an empty set signs with an empty key, which no
        // writer with a real key accepts.
        let key = keys.first().map(Vec::as_slice).unwrap_or_default();
        let mut mac = record_mac(key, subject, reply, payload);
        format!("v1={}", hex(&mac_bytes(&mut mac)))
    }

    /// Whether `signature` is one of the keys' over the record.
    pub fn check_record(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: &[u8],
        signature: Option<&str>,
    ) -> Result<(), Refusal> {
        let tag = parse_signature(signature)?;
        let matches = self
            .snapshot()
            .iter()
            .any(|key| record_mac(key, subject, reply, payload).verify_slice(&tag).is_ok());
        if matches {
            Ok(())
        } else {
            Err(Refusal::BadSignature)
        }
    }

    /// The signature of a commit notice: `updates` of the message at sequence `sequence` of `stream` are
    /// committed, told on `inbox`.
    pub fn sign_notice(&self, inbox: &str, stream: &str, sequence: u64, updates: u32) -> String {
        let keys = self.snapshot();
        let key = keys.first().map(Vec::as_slice).unwrap_or_default();
        let mut mac = notice_mac(key, inbox, stream, sequence, updates);
        format!("v1={}", hex(&mac_bytes(&mut mac)))
    }

    /// Whether `signature` is one of the keys' over the notice.
    pub fn check_notice(
        &self,
        inbox: &str,
        stream: &str,
        sequence: u64,
        updates: u32,
        signature: Option<&str>,
    ) -> Result<(), Refusal> {
        let tag = parse_signature(signature)?;
        let matches = self.snapshot().iter().any(|key| {
            notice_mac(key, inbox, stream, sequence, updates)
                .verify_slice(&tag)
                .is_ok()
        });
        if matches {
            Ok(())
        } else {
            Err(Refusal::BadSignature)
        }
    }
}

fn new_mac(key: &[u8], domain: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(domain);
    mac
}

/// Each variable part is length-prefixed, so that no two inputs read the same.
fn with_length(mac: &mut HmacSha256, bytes: &[u8]) {
    mac.update(&(bytes.len() as u64).to_le_bytes());
    mac.update(bytes);
}

fn record_mac(key: &[u8], subject: &str, reply: Option<&str>, payload: &[u8]) -> HmacSha256 {
    let mut mac = new_mac(key, b"ingest-gateway record v1\0");
    with_length(&mut mac, subject.as_bytes());
    match reply {
        Some(reply) => {
            mac.update(&[1]);
            with_length(&mut mac, reply.as_bytes());
        }
        None => mac.update(&[0]),
    }
    with_length(&mut mac, payload);
    mac
}

fn notice_mac(key: &[u8], inbox: &str, stream: &str, sequence: u64, updates: u32) -> HmacSha256 {
    let mut mac = new_mac(key, b"ingest-gateway commit notice v1\0");
    with_length(&mut mac, inbox.as_bytes());
    with_length(&mut mac, stream.as_bytes());
    mac.update(&sequence.to_le_bytes());
    mac.update(&updates.to_le_bytes());
    mac
}

fn mac_bytes(mac: &mut HmacSha256) -> [u8; 32] {
    mac.clone().finalize().into_bytes().into()
}

fn parse_signature(signature: Option<&str>) -> Result<[u8; 32], Refusal> {
    let text = signature.ok_or(Refusal::Unsigned)?;
    let hex = text.trim().strip_prefix("v1=").ok_or(Refusal::BadSignature)?;
    let mut tag = [0u8; 32];
    if hex.len() != 64 {
        return Err(Refusal::BadSignature);
    }
    for (byte, pair) in tag.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let digits = std::str::from_utf8(pair).map_err(|_| Refusal::BadSignature)?;
        *byte = u8::from_str_radix(digits, 16).map_err(|_| Refusal::BadSignature)?;
    }
    Ok(tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn keys(names: &[&str]) -> SigningKeys {
        SigningKeys::from_keys(names.iter().map(|k| k.repeat(32).into_bytes()).collect())
    }

    #[test]
    fn a_record_verifies_only_with_its_subject_reply_bytes_and_a_shared_key() {
        let signer = keys(&["a"]);
        let signature = signer.sign_record("ingest.location.3", Some("_INBOX.x"), b"record");
        let check = |subject, reply, payload: &[u8], signature: Option<&str>| {
            signer.check_record(subject, reply, payload, signature)
        };
        assert_eq!(
            check("ingest.location.3", Some("_INBOX.x"), b"record", Some(&signature)),
            Ok(())
        );
        for (subject, reply, payload) in [
            ("ingest.location.4", Some("_INBOX.x"), &b"record"[..]),
            ("ingest.location.3", Some("_INBOX.y"), b"record"),
            ("ingest.location.3", None, b"record"),
            ("ingest.location.3", Some("_INBOX.x"), b"recorD"),
        ] {
            assert_eq!(
                check(subject, reply, payload, Some(&signature)),
                Err(Refusal::BadSignature)
            );
        }
        assert_eq!(
            check("ingest.location.3", Some("_INBOX.x"), b"record", None),
            Err(Refusal::Unsigned)
        );
        assert_eq!(
            keys(&["b"]).check_record("ingest.location.3", Some("_INBOX.x"), b"record", Some(&signature)),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            check("ingest.location.3", Some("_INBOX.x"), b"record", Some("v1=00")),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn during_a_rotation_the_first_key_signs_and_every_key_verifies() {
        let old = keys(&["a"]);
        let both = keys(&["b", "a"]);
        let by_old = old.sign_record("s", None, b"p");
        let by_new = both.sign_record("s", None, b"p");
        assert_eq!(both.check_record("s", None, b"p", Some(&by_old)), Ok(()));
        assert_eq!(both.check_record("s", None, b"p", Some(&by_new)), Ok(()));
        assert_eq!(
            old.check_record("s", None, b"p", Some(&by_new)),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn a_notice_is_bound_to_its_inbox_message_and_count() {
        let signer = keys(&["a"]);
        let signature = signer.sign_notice("_INBOX.x", "location", 42, 7);
        assert_eq!(
            signer.check_notice("_INBOX.x", "location", 42, 7, Some(&signature)),
            Ok(())
        );
        assert!(signer
            .check_notice("_INBOX.x", "location", 43, 7, Some(&signature))
            .is_err());
        assert!(signer
            .check_notice("_INBOX.x", "location", 42, 8, Some(&signature))
            .is_err());
        assert!(signer
            .check_notice("_INBOX.y", "location", 42, 7, Some(&signature))
            .is_err());
        // Each stream numbers its messages from 1: message 42 of another stream is another message.
        assert!(signer
            .check_notice("_INBOX.x", "poll", 42, 7, Some(&signature))
            .is_err());
        // A record's signature is no notice's, whatever the bytes.
        assert!(signer
            .check_notice(
                "_INBOX.x",
                "location",
                42,
                7,
                Some(&signer.sign_record("_INBOX.x", None, b""))
            )
            .is_err());
    }

    #[test]
    fn a_key_file_needs_long_keys_and_no_writer_but_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        std::fs::write(&path, "# rotation: new first\n0123456789abcdef0123456789abcdef\n\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(SigningKeys::load(&path).is_ok());
        std::fs::write(&path, "short-key\n").unwrap();
        let error = SigningKeys::load(&path).err().unwrap().to_string();
        assert!(
            error.contains("line 1") && error.contains("9 bytes") && !error.contains("short-key"),
            "{error}"
        );
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(SigningKeys::load(&path).err().unwrap().to_string().contains("no key"));
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(SigningKeys::load(&path)
            .err()
            .unwrap()
            .to_string()
            .contains("chmod go-w"));
    }
}
