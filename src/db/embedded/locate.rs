//! Where the PostgreSQL server binaries are, and which user runs them when the gateway runs as root.

use std::ffi::CString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where `initdb` and `postgres` are: `$PG_BIN`, `pg_config --bindir`, the newest `/usr/lib/postgresql/*/bin`,
/// then `PATH`. As root, `PATH` is not searched (neither for `pg_config` nor for the server): a directory on it
/// that someone else can write would otherwise choose what root runs.
pub fn find_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os("PG_BIN").map(PathBuf::from) {
        return has_server(&dir).then_some(dir);
    }
    // SAFETY: geteuid cannot fail and touches no memory.
    let as_root = unsafe { libc::geteuid() } == 0;
    let from_pg_config = (!as_root).then(|| Command::new("pg_config")).and_then(|mut command| {
        command
            .arg("--bindir")
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    });
    if let Some(dir) = from_pg_config.filter(|d| has_server(d)) {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Some(dir);
    }
    if as_root {
        return None;
    }
    std::env::split_paths(&std::env::var_os("PATH")?).find(|d| has_server(d))
}

/// The user to run the server as: none when not root, else `postgres` or `nobody`.
pub fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid cannot fail; getpwnam is called with valid C strings during start-up, and its result is
    // read at once, before any other call could overwrite the static buffer it points into.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        for name in ["postgres", "nobody"] {
            let cname = CString::new(name).ok()?;
            let entry = libc::getpwnam(cname.as_ptr());
            if !entry.is_null() {
                return Some(((*entry).pw_uid, (*entry).pw_gid));
            }
        }
    }
    None
}
