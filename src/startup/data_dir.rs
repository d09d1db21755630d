//! The data directory: held by one process at a time (an `flock`'d lock file), and home of the gateway's stable
//! identity, under which its committed log positions are kept in the shared database.
//!
//! Several gateways may write to one PostgreSQL; each numbers its log records from its own counter, so a position
//! means something only together with the instance that wrote it. The identity is created at first start and
//! kept for good; a data directory copied to another machine brings its identity (and its log) with it.
//!
//! The files it writes there are never reached through a symbolic link: a link planted by another account that can
//! write the directory (a shared volume, a directory that a later start as root inherits) would otherwise have the
//! gateway truncate or overwrite the file it points to.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use tracing::info;

use crate::support::io_context::{self, PathIoError};
use crate::support::{atomic_file, random};

/// The lock file: holds the pid of the process that owns the directory.
const LOCK_FILE: &str = "lock";
/// The instance identity, one line.
const INSTANCE_FILE: &str = "instance-id";
/// Present while the positions a gateway kept before identities existed still have to be claimed by this one.
const ADOPT_MARKER: &str = "adopt-unowned-progress";

/// Why the data directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "the data directory {dir} is in use by another ingest-gateway (pid {pid}); stop it, or give this one its \
         own --data-dir"
    )]
    InUse { dir: PathBuf, pid: String },
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("{path} does not hold an instance identity (32 hex digits); restore it or remove the data directory")]
    BadIdentity { path: PathBuf },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DataDirError + 'a {
    io_context::context(what, path)
}

/// The data directory, locked for this process until dropped.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// This gateway's identity: the key of its committed positions.
    instance: String,
    /// Whether the positions stored without an identity (by a gateway that predates them) are this one's to claim.
    adopts_unowned: bool,
    /// Held open for the lock's sake: the kernel releases an `flock` when its last descriptor closes, so even a
    /// killed process gives the directory up.
    _lock: File,
}

impl DataDir {
    /// Creates the directory if needed, locks it (failing at once if another process holds it) and reads or
    /// creates the instance identity.
    pub fn open(path: &Path) -> Result<Self, DataDirError> {
        fs::create_dir_all(path).map_err(io_error("could not create the data directory", path))?;
        let lock = lock(path)?;
        let instance_path = path.join(INSTANCE_FILE);
        let instance = match fs::read_to_string(&instance_path) {
            Ok(text) => parse_identity(&text).ok_or(DataDirError::BadIdentity {
                path: instance_path.clone(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A log directory without an identity was left by a gateway that kept its positions unowned: they
                // are this directory's, to be claimed before anything is replayed.
                if path.join("wal").exists() {
                    write_durably(&path.join(ADOPT_MARKER), b"")?;
                }
                let instance = new_identity().map_err(io_error("could not make an identity", &instance_path))?;
                write_durably(&instance_path, format!("{instance}\n").as_bytes())?;
                info!(instance = %instance, dir = %path.display(), "new gateway identity created");
                instance
            }
            Err(e) => return Err(io_error("could not read", &instance_path)(e)),
        };
        let adopts_unowned = path.join(ADOPT_MARKER).exists();
        Ok(DataDir {
            path: path.to_owned(),
            instance,
            adopts_unowned,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stable identity of this gateway.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Whether unowned positions (from before identities) should be claimed by this gateway.
    pub fn adopts_unowned(&self) -> bool {
        self.adopts_unowned
    }

    /// Records that the unowned positions are claimed; called once the claim is committed.
    pub fn unowned_adopted(&mut self) -> Result<(), DataDirError> {
        let marker = self.path.join(ADOPT_MARKER);
        match fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("could not remove", &marker)(e)),
        }
        self.adopts_unowned = false;
        Ok(())
    }
}

/// Takes the directory's lock without waiting, and writes this process's pid into the lock file.
fn lock(dir: &Path) -> Result<File, DataDirError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        // A link would make the pid below overwrite whatever file it points to.
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io_error(
            "could not open the lock file (a symbolic link there is refused)",
            &path,
        ))?;
    // SAFETY: flock on a descriptor this function owns; it touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(DataDirError::InUse {
                dir: dir.to_owned(),
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid.to_owned()
                },
            });
        }
        return Err(io_error("could not lock", &path)(error));
    }
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .map_err(io_error("could not write the lock file", &path))?;
    Ok(file)
}

fn parse_identity(text: &str) -> Option<String> {
    let id = text.trim();
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// 128 random bits as 32 hex digits.
fn new_identity() -> io::Result<String> {
    random::hex::<16>()
}

/// Writes a small file so that it exists whole or not at all after a crash: a temporary file, fsynced, renamed.
fn write_durably(path: &Path, contents: &[u8]) -> Result<(), DataDirError> {
    let temp = path.with_extension("tmp");
    atomic_file::replace(path, &temp, contents, None).map_err(io_error("could not write", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::open(dir.path()).unwrap().instance().to_owned();
        assert_eq!(first.len(), 32);
        let again = DataDir::open(dir.path()).unwrap();
        assert_eq!(again.instance(), first);
        assert!(!again.adopts_unowned(), "a new directory has nothing to claim");
    }

    #[test]
    fn a_second_open_of_a_held_directory_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _held = DataDir::open(dir.path()).unwrap();
        let error = DataDir::open(dir.path()).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, DataDirError::InUse { .. }), "{message}");
        assert!(message.contains(&std::process::id().to_string()), "{message}");
    }

    #[test]
    fn a_log_left_without_identity_is_claimed_until_the_claim_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("wal")).unwrap();
        let mut data_dir = DataDir::open(dir.path()).unwrap();
        assert!(data_dir.adopts_unowned());
        drop(data_dir);
        // Not yet recorded: a restart still claims.
        data_dir = DataDir::open(dir.path()).unwrap();
        assert!(data_dir.adopts_unowned());
        data_dir.unowned_adopted().unwrap();
        drop(data_dir);
        assert!(!DataDir::open(dir.path()).unwrap().adopts_unowned());
    }

    #[test]
    fn the_lock_and_the_identity_are_never_written_through_a_symbolic_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "secret\n").unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink(&victim, data.join(LOCK_FILE)).unwrap();
        let refused = DataDir::open(&data).unwrap_err().to_string();
        assert!(refused.contains("symbolic link"), "{refused}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "secret\n");

        fs::remove_file(data.join(LOCK_FILE)).unwrap();
        std::os::unix::fs::symlink(&victim, data.join("instance-id.tmp")).unwrap();
        let opened = DataDir::open(&data).unwrap();
        assert_eq!(opened.instance().len(), 32);
        assert_eq!(
            fs::read_to_string(&victim).unwrap(),
            "secret\n",
            "the link was replaced, its target untouched"
        );
        assert!(!fs::symlink_metadata(data.join(INSTANCE_FILE))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn a_damaged_identity_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(INSTANCE_FILE), "not-an-id\n").unwrap();
        assert!(matches!(
            DataDir::open(dir.path()),
            Err(DataDirError::BadIdentity { .. })
        ));
    }
}
