//! The cluster's files handled without following links: as root the set-up hands directories to the server's
//! user and writes files it will read, and a link planted in the data directory must not make root give away or
//! overwrite another file.

use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::{io_error, EmbeddedPostgresError};
use crate::support::atomic_file;

/// Checks that the server user can walk down to `dir` (every ancestor searchable by it): a root-owned `0700`
/// home directory on the way is the usual reason a root-run gateway cannot start its PostgreSQL.
pub(super) fn check_reachable(dir: &Path, run_as: Option<(u32, u32)>) -> Result<(), EmbeddedPostgresError> {
    use std::os::unix::fs::MetadataExt;
    let Some((uid, gid)) = run_as else { return Ok(()) };
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(ancestor) else { continue };
        let mode = meta.mode();
        let searchable = if meta.uid() == uid {
            mode & 0o100 != 0
        } else if meta.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !searchable {
            return Err(EmbeddedPostgresError::Unreachable {
                uid,
                data_dir: dir.to_owned(),
                blocked: ancestor.to_owned(),
            });
        }
    }
    Ok(())
}

/// Gives `dir` to the server user (when running as root) with `mode`. Through a handle opened without following
/// a link, so that a link swapped in after any check is refused, not given away.
pub(super) fn hand_over(dir: &Path, run_as: Option<(u32, u32)>, mode: u32) -> Result<(), EmbeddedPostgresError> {
    if let Some((uid, gid)) = run_as {
        let handle = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
            .open(dir)
            .map_err(io_error("could not open", dir))?;
        std::os::unix::fs::fchown(&handle, Some(uid), Some(gid)).map_err(io_error("could not hand over", dir))?;
        handle
            .set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_error("could not set mode", dir))?;
    }
    Ok(())
}

/// Refuses `path` when it is a symbolic link (a missing path is fine: it is created after).
pub(super) fn refuse_symlink(path: &Path) -> Result<(), EmbeddedPostgresError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(EmbeddedPostgresError::SymbolicLink(path.to_owned())),
        _ => Ok(()),
    }
}

/// A directory that is neither empty nor a cluster is someone else's: left alone, and never handed over.
pub(super) fn check_is_cluster_or_empty(dir: &Path) -> Result<(), EmbeddedPostgresError> {
    if dir.join("PG_VERSION").exists() {
        return Ok(());
    }
    let not_empty = fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    if not_empty {
        return Err(EmbeddedPostgresError::NotACluster(dir.to_owned()));
    }
    Ok(())
}

/// Reads a file of the cluster without following a link in its last component.
pub(super) fn read_nofollow(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Writes `contents` as `dir/name`, mode 0600, owned by `owner` when given: a new file renamed into place, so a
/// link planted at the name is replaced rather than followed, and a crash leaves the old file or the new one.
pub(super) fn replace_private_file(
    dir: &Path,
    name: &str,
    contents: &[u8],
    owner: Option<(u32, u32)>,
) -> Result<(), EmbeddedPostgresError> {
    let path = dir.join(name);
    let temp = dir.join(format!(".{name}.new"));
    atomic_file::replace(&path, &temp, contents, owner).map_err(io_error("could not write", &path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::embedded::cluster::PG_HBA;

    #[test]
    fn a_link_planted_where_a_file_is_replaced_is_replaced_itself_and_its_target_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, "precious").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("pg_hba.conf")).unwrap();
        assert!(matches!(
            read_nofollow(&dir.path().join("pg_hba.conf")),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP)
        ));
        replace_private_file(dir.path(), "pg_hba.conf", PG_HBA.as_bytes(), None).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
        assert_eq!(fs::read_to_string(dir.path().join("pg_hba.conf")).unwrap(), PG_HBA);
    }
}
