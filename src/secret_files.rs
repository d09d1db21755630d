//! The files that grant access or hold secrets — the API keys file, the admin token, the JetStream signing key, the
//! TLS private key — checked for who else may change or read them before they are used.
//!
//! The rule: a file that someone other than its owner may **write** is refused, since whoever can write it can mint
//! keys or sign records; a secret that others may **read** is used with a warning, since container platforms
//! commonly mount secrets readable by all (Kubernetes' default mode is 0644) and refusing those would push operators
//! to weaker workarounds. The keys file holds only hashes, so its readability is no concern.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, Context};
use tracing::warn;

/// What a file is, for the checks and the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Grants access but holds no secret (the API keys file: hashes only).
    Grants,
    /// Holds a secret: reading it is enough to misuse it.
    Secret,
}

/// Who besides the owner may touch a file, from its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exposure {
    /// The group or others may write it.
    pub writable_by_others: bool,
    /// The group or others may read it.
    pub readable_by_others: bool,
}

impl Exposure {
    pub fn of_mode(mode: u32) -> Self {
        Exposure {
            writable_by_others: mode & 0o022 != 0,
            readable_by_others: mode & 0o044 != 0,
        }
    }
}

/// Checks `path` (named `what` in messages, e.g. `the API keys file (INGEST_API_KEYS_FILE)`): an error when others
/// may write it, a warning when others may read a secret. The file must exist and be readable.
pub fn check(path: &Path, what: &str, kind: FileKind) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("could not read {what} {}", path.display()))?;
    let mode = meta.mode() & 0o777;
    let exposure = Exposure::of_mode(mode);
    if exposure.writable_by_others {
        bail!(
            "{what} {} may be written by its group or by others (mode {mode:03o}): whoever can write it can grant \
             themselves access; make it writable by its owner only (chmod go-w)",
            path.display()
        );
    }
    if kind == FileKind::Secret && exposure.readable_by_others {
        warn!(
            file = %path.display(),
            mode = format!("{mode:03o}"),
            "{what} may be read by its group or by others; make it readable by the gateway's user only (chmod 600)"
        );
    }
    Ok(())
}

/// Reads a secret from `path` after [`check`]ing it: the file's first line, trimmed, which must have at least
/// `min_chars` characters.
pub fn read_secret(path: &Path, what: &str, min_chars: usize) -> anyhow::Result<String> {
    check(path, what, FileKind::Secret)?;
    let text = std::fs::read_to_string(path).with_context(|| format!("could not read {what} {}", path.display()))?;
    let secret = text.lines().next().unwrap_or_default().trim().to_owned();
    if secret.chars().count() < min_chars {
        // Its length only: the secret itself never goes into a message.
        bail!(
            "{what} {} holds {} characters on its first line; at least {min_chars} are needed (e.g. \
             `openssl rand -hex 32`)",
            path.display(),
            secret.chars().count()
        );
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file_with_mode(dir: &tempfile::TempDir, mode: u32, text: &str) -> std::path::PathBuf {
        let path = dir.path().join(format!("f{mode:o}"));
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_file_others_may_write_is_refused_and_a_secret_others_may_read_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o644, 0o640, 0o400] {
            assert!(
                check(&file_with_mode(&dir, mode, "x"), "the file", FileKind::Secret).is_ok(),
                "{mode:o}"
            );
        }
        for mode in [0o620, 0o602, 0o666, 0o664] {
            let error = check(&file_with_mode(&dir, mode, "x"), "the file", FileKind::Grants).unwrap_err();
            assert!(error.to_string().contains("chmod go-w"), "{mode:o}: {error}");
        }
        assert_eq!(
            Exposure::of_mode(0o644),
            Exposure {
                writable_by_others: false,
                readable_by_others: true
            }
        );
    }

    #[test]
    fn a_secret_is_its_first_line_and_a_short_one_is_refused_without_being_shown() {
        let dir = tempfile::tempdir().unwrap();
        let long = "0123456789abcdef0123456789abcdef";
        let path = file_with_mode(&dir, 0o600, &format!("  {long} \n# a comment\n"));
        assert_eq!(read_secret(&path, "the token", 32).unwrap(), long);
        let short = file_with_mode(&dir, 0o640, "hunter2\n");
        let error = read_secret(&short, "the token", 32).unwrap_err().to_string();
        assert!(error.contains("7 characters") && !error.contains("hunter2"), "{error}");
    }
}
