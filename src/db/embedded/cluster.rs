//! Creating a cluster and keeping it closed: `initdb`, the `postgres` role's random password in a libpq password
//! file, and a `pg_hba.conf` that lets nobody in without it (a cluster made by an earlier version, with `trust`,
//! is upgraded in place at its next start).

use std::io::{self, Write};
use std::path::Path;
use std::process::Stdio;

use tracing::info;

use super::private_files::{check_is_cluster_or_empty, read_nofollow, replace_private_file};
use crate::support::random;

use super::{io_error, log_tail, EmbeddedPostgres, EmbeddedPostgresError, SUPERUSER};

/// The superuser's password, in the cluster directory, as a libpq password file (`PGPASSFILE`).
pub const PASSWORD_FILE: &str = "ingest-gateway.pgpass";
/// Random bytes in a password (written as hex).
const PASSWORD_BYTES: usize = 24;
/// The client authentication written into a cluster: the Unix socket only (nothing listens on TCP), and a password
/// even there.
pub(super) const PG_HBA: &str = "\
# Written by ingest-gateway at every start (edits are lost): the server listens on a Unix socket in a private
# directory only, and even there every role needs its password.
local   all   all   scram-sha-256
";

impl EmbeddedPostgres {
    pub(super) fn init_if_needed(&mut self) -> Result<(), EmbeddedPostgresError> {
        if self.data_dir.join("PG_VERSION").exists() {
            return Ok(());
        }
        check_is_cluster_or_empty(&self.data_dir)?;
        info!(data_dir = %self.data_dir.display(), "creating the embedded PostgreSQL cluster");
        let log = self.log_file()?;
        let log_err = log.try_clone().map_err(io_error("could not open", &self.log_path))?;
        let mut command = self.command("initdb");
        // `reject` until `require_passwords` has set the password and written the real pg_hba.conf: a crash in
        // between leaves a cluster nobody can enter without one, never one anybody can.
        command
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-U", SUPERUSER, "-A", "reject", "-E", "UTF8", "--locale=C"])
            .stdout(log)
            .stderr(log_err);
        if self.ephemeral {
            command.arg("--no-sync");
        }
        let status = command
            .status()
            .map_err(io_error("could not run initdb", &self.bin_dir))?;
        if !status.success() {
            return Err(EmbeddedPostgresError::Initdb {
                status: status.to_string(),
                log: log_tail(&self.log_path),
            });
        }
        Ok(())
    }

    /// Makes sure the `postgres` role has the password of [`PASSWORD_FILE`] (making one when there is none), and
    /// that `pg_hba.conf` lets nobody in without a password. Runs before the server starts.
    pub(super) fn require_passwords(&mut self) -> Result<(), EmbeddedPostgresError> {
        let password_path = self.data_dir.join(PASSWORD_FILE);
        self.password = match read_password_file(&password_path)? {
            Some(password) => password,
            None => {
                let password = random_password().map_err(io_error("could not make a password", &password_path))?;
                // The role first, the file after: a crash in between leaves no file, so the next start sets a
                // new password again rather than trusting a file the role does not match.
                self.set_superuser_password(&password)?;
                let line =
                    format!("# the password of the role {SUPERUSER}, for PGPASSFILE\n*:*:*:{SUPERUSER}:{password}\n");
                replace_private_file(&self.data_dir, PASSWORD_FILE, line.as_bytes(), self.run_as)?;
                password
            }
        };
        let hba_path = self.data_dir.join("pg_hba.conf");
        let hba = read_nofollow(&hba_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .map_err(io_error("could not read", &hba_path))?;
        if hba != PG_HBA {
            if lets_anyone_in(&hba) {
                // A cluster made by an earlier version: upgraded in place.
                info!(
                    path = %hba_path.display(),
                    "pg_hba.conf of the embedded PostgreSQL let clients in without a password; rewritten to require one"
                );
            }
            replace_private_file(&self.data_dir, "pg_hba.conf", PG_HBA.as_bytes(), self.run_as)?;
        }
        Ok(())
    }

    /// Sets the superuser's password with the server in single-user mode, which needs no connection and so no
    /// authentication. Only the SCRAM verifier reaches the server (and its log, were the statement to fail).
    fn set_superuser_password(&self, password: &str) -> Result<(), EmbeddedPostgresError> {
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        let log = self.log_file()?;
        let log_err = log.try_clone().map_err(io_error("could not open", &self.log_path))?;
        let mut command = self.command("postgres");
        command
            .arg("--single")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-c", "exit_on_error=on"]);
        if self.ephemeral {
            command.args(["-c", "fsync=off"]);
        }
        command.arg(SUPERUSER).stdin(Stdio::piped()).stdout(log).stderr(log_err);
        let mut child = command
            .spawn()
            .map_err(io_error("could not run postgres", &self.bin_dir))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A server that exits before reading answers through its status below.
            let _ = writeln!(stdin, "ALTER ROLE {SUPERUSER} PASSWORD '{verifier}'");
        }
        let status = child
            .wait()
            .map_err(io_error("could not run postgres", &self.bin_dir))?;
        if !status.success() {
            return Err(EmbeddedPostgresError::SetPassword {
                status: status.to_string(),
                log_path: self.log_path.clone(),
                log: log_tail(&self.log_path),
            });
        }
        Ok(())
    }
}

/// The password in a libpq password file (`host:port:database:user:password` lines), or `None` when there is no
/// file yet.
fn read_password_file(path: &Path) -> Result<Option<String>, EmbeddedPostgresError> {
    let bytes = match read_nofollow(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("could not read", path)(e)),
    };
    let text = String::from_utf8_lossy(&bytes);
    // The gateway writes hex passwords, so no field holds an escaped colon.
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(':').map(|(_, password)| password.to_owned()))
        .filter(|p| !p.is_empty())
        .map(Some)
        .ok_or_else(|| EmbeddedPostgresError::NoPassword { path: path.to_owned() })
}

/// A new password: random bytes from the kernel, as hex.
fn random_password() -> io::Result<String> {
    random::hex::<PASSWORD_BYTES>()
}

/// Whether a `pg_hba.conf` lets a client in without a password: a line whose method is `trust`.
fn lets_anyone_in(hba: &str) -> bool {
    hba.lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        // The method follows the type, database and user fields (and, for host lines, the address).
        .any(|line| line.split_whitespace().skip(3).any(|field| field == "trust"))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_trust_line_lets_anyone_in_but_a_comment_or_a_name_does_not() {
        assert!(lets_anyone_in("local all all trust\n"));
        assert!(lets_anyone_in("host all all 127.0.0.1/32 trust\n"));
        assert!(!lets_anyone_in(PG_HBA));
        assert!(!lets_anyone_in(
            "# local all all trust\nlocal all all scram-sha-256 # not trust\n"
        ));
        assert!(!lets_anyone_in("local trust trust scram-sha-256\n"));
    }

    #[test]
    fn a_password_file_yields_its_password_and_a_file_without_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PASSWORD_FILE);
        assert!(read_password_file(&path).unwrap().is_none());
        replace_private_file(dir.path(), PASSWORD_FILE, b"# comment\n*:*:*:postgres:abc123\n", None).unwrap();
        assert_eq!(read_password_file(&path).unwrap().as_deref(), Some("abc123"));
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        fs::write(&path, "# nothing\n").unwrap();
        assert!(matches!(
            read_password_file(&path),
            Err(EmbeddedPostgresError::NoPassword { .. })
        ));
    }

    #[test]
    fn passwords_are_random_hex() {
        let (a, b) = (random_password().unwrap(), random_password().unwrap());
        assert_eq!(a.len(), PASSWORD_BYTES * 2);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
