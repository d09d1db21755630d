//! IO errors that say what was being done, and to which file: `could not write the lock file: /data/lock`, with
//! the operating system's reason as the cause.

use std::io;
use std::path::{Path, PathBuf};

/// An IO error with what was being done and the path it was done to.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {path}")]
pub struct PathIoError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// For `map_err`: turns an `io::Error` into a [`PathIoError`] saying `what` was being done to `path`, and then into
/// the caller's error type.
pub fn context<'a, E: From<PathIoError>>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> E + 'a {
    move |source| {
        E::from(PathIoError {
            what,
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_operation_and_the_path_and_the_cause_is_kept() {
        let error: PathIoError = context("could not write", Path::new("/data/lock"))(io::Error::other("disk full"));
        assert_eq!(error.to_string(), "could not write: /data/lock");
        assert_eq!(
            std::error::Error::source(&error).map(ToString::to_string).as_deref(),
            Some("disk full")
        );
    }
}
