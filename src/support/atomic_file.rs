//! Replacing a small file so that a crash leaves the old contents or the new, never a torn file, and never through
//! a link: a new file next to it (`O_EXCL`, mode 0600), fsynced, renamed over the old one, then the directory
//! fsynced so that the rename itself survives a power cut.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `contents` as `path` through the temporary file `temp` (in the same directory), mode 0600, owned by
/// `owner` when given. A file or a link left at `temp` (by a crash, or planted) is removed first: a link itself,
/// never its target.
pub fn replace(path: &Path, temp: &Path, contents: &[u8], owner: Option<(u32, u32)>) -> io::Result<()> {
    match fs::remove_file(temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // `create_new` (O_EXCL) never follows a link; O_NOFOLLOW says so again.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(temp)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    }
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(temp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_file_is_replaced_whole_with_mode_0600_and_a_planted_link_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (path, temp) = (dir.path().join("file"), dir.path().join(".file.new"));
        let target = dir.path().join("target");
        fs::write(&target, "precious").unwrap();
        std::os::unix::fs::symlink(&target, &temp).unwrap();
        replace(&path, &temp, b"one", None).unwrap();
        replace(&path, &temp, b"two", None).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "two");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
        assert!(!temp.exists());
    }
}
