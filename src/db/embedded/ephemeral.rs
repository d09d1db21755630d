//! Throwaway servers for tests and the benchmark: a cluster in a new temporary directory, removed when the server
//! is dropped, or by a later start when the process that made it died first.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::private_files::hand_over;
use super::{io_error, CommitSafety, EmbeddedPostgres, EmbeddedPostgresError, PostgresOptions};

/// Prefix of the temporary directories of throwaway clusters.
const EPHEMERAL_PREFIX: &str = "ingest-gateway-pg-";

impl EmbeddedPostgres {
    /// Starts a throwaway server in a new temporary directory, removed when the server is dropped.
    pub fn start_ephemeral() -> Result<Self, EmbeddedPostgresError> {
        Self::start_temporary(CommitSafety::Fast)
    }

    /// Starts a throwaway server that keeps acknowledged commits when killed, for crash tests.
    pub fn start_ephemeral_crash_safe() -> Result<Self, EmbeddedPostgresError> {
        Self::start_temporary(CommitSafety::Safe)
    }

    fn start_temporary(safety: CommitSafety) -> Result<Self, EmbeddedPostgresError> {
        remove_stale_ephemeral_dirs();
        let dir = tempfile::Builder::new()
            .prefix(EPHEMERAL_PREFIX)
            .tempdir()
            .map_err(io_error("could not create a temporary directory", Path::new("/tmp")))?;
        fs::write(dir.path().join("owner.pid"), std::process::id().to_string())
            .map_err(io_error("could not write", dir.path()))?;
        let mut server = Self::start(&PostgresOptions {
            data_dir: dir.path().join("pgdata"),
            ephemeral: safety == CommitSafety::Fast,
        })?;
        hand_over(dir.path(), server.run_as, 0o755)?;
        server.temp_dir = Some(dir.path().to_owned());
        server._temp_dirs.push(dir);
        Ok(server)
    }
}

/// Removes the throwaway clusters of processes that are gone (a test binary exits without dropping statics).
pub(super) fn remove_stale_ephemeral_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(EPHEMERAL_PREFIX) {
            continue;
        }
        let owner = fs::read_to_string(entry.path().join("owner.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        // SAFETY: signal 0 only checks that the process exists.
        let alive = owner.is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0);
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(60));
        if !alive && old {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
