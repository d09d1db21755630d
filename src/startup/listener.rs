//! The addresses the gateway listens on: TCP addresses, and Unix sockets for senders on the same host (no TCP
//! stack, no port to exhaust, and access governed by the socket file's permissions).
//!
//! `INGEST_LISTEN` is a comma-separated list: `127.0.0.1:8080`, `unix:/run/ingest/gateway.sock`, or both. A socket
//! file left by a gateway that died is replaced at start; one another process still listens on is never taken.
//! The socket file is removed when the gateway stops.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use tracing::warn;

/// Why a listener could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("INGEST_LISTEN is empty; give a TCP address (127.0.0.1:8080) or a socket (unix:/path/to/socket)")]
    Empty,
    #[error("unix: needs a path, as in unix:/run/ingest/gateway.sock")]
    NoSocketPath,
    #[error("could not listen on {address}")]
    Tcp {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("another process listens on {0}; stop it or choose another socket path")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; it is left alone: choose another socket path")]
    NotASocket(PathBuf),
    #[error("{what}: {path}")]
    Socket {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One open listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixSocket),
}

/// A bound Unix socket; its file is removed when dropped, if it is still the one this process bound.
pub struct UnixSocket {
    pub listener: UnixListener,
    pub path: PathBuf,
    /// Device and inode of the socket file bound: a file another gateway put at the same path later is not ours.
    identity: (u64, u64),
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                warn!(path = %self.path.display(), error = %e, "could not remove the socket file");
            }
        }
    }
}

/// Opens every address of `list` (comma-separated); a socket file gets permissions `socket_mode`.
pub fn open_all(list: &str, socket_mode: u32) -> Result<Vec<Listener>, ListenError> {
    let listeners = list
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|address| match address.strip_prefix("unix:") {
            Some("") => Err(ListenError::NoSocketPath),
            Some(path) => bind_unix(Path::new(path), socket_mode).map(Listener::Unix),
            None => TcpListener::bind(address)
                .map(Listener::Tcp)
                .map_err(|source| ListenError::Tcp {
                    address: address.to_owned(),
                    source,
                }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if listeners.is_empty() {
        return Err(ListenError::Empty);
    }
    Ok(listeners)
}

fn bind_unix(path: &Path, mode: u32) -> Result<UnixSocket, ListenError> {
    let error = |what: &'static str| {
        move |source| ListenError::Socket {
            what,
            path: path.to_owned(),
            source,
        }
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => return Err(ListenError::NotASocket(path.to_owned())),
        Ok(_) => {
            // A socket file nobody answers on was left by a process that died: replace it.
            if UnixStream::connect(path).is_ok() {
                return Err(ListenError::SocketInUse(path.to_owned()));
            }
            fs::remove_file(path).map_err(error("could not remove the stale socket file"))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(error("could not look at the socket path")(e)),
    }
    let listener = UnixListener::bind(path).map_err(error("could not create the socket"))?;
    let meta = fs::symlink_metadata(path).map_err(error("could not look at the socket"))?;
    let socket = UnixSocket {
        listener,
        path: path.to_owned(),
        identity: (meta.dev(), meta.ino()),
    };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(error("could not set the socket's mode"))?;
    Ok(socket)
}

/// The TCP addresses of `list` (as `INGEST_LISTEN` writes them) that other machines can reach: every one that is not
/// a loopback address, or that names a host which does not resolve to loopback only. Unix sockets are reached from
/// this host only.
pub fn reachable_from_elsewhere(list: &str) -> Vec<String> {
    use std::net::ToSocketAddrs;
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.starts_with("unix:"))
        .filter(|address| match address.to_socket_addrs() {
            Ok(mut resolved) => !resolved.all(|a| a.ip().is_loopback()),
            // Taken as exposed: binding it fails later anyway, with the reason.
            Err(_) => true,
        })
        .map(str::to_owned)
        .collect()
}

/// Whether other machines can reach `listener`.
pub fn is_exposed(listener: &Listener) -> bool {
    match listener {
        Listener::Tcp(tcp) => tcp.local_addr().map_or(true, |a| !a.ip().is_loopback()),
        Listener::Unix(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_and_unix_addresses_open_together_and_the_socket_file_goes_with_its_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        let listeners = open_all(&format!("127.0.0.1:0, unix:{}", path.display()), 0o600).unwrap();
        assert!(matches!(listeners[0], Listener::Tcp(_)));
        assert!(matches!(listeners[1], Listener::Unix(_)));
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        drop(listeners);
        assert!(!path.exists());
    }

    #[test]
    fn only_addresses_beyond_loopback_are_reachable_from_elsewhere() {
        let list = "127.0.0.1:8080, [::1]:8081, localhost:8082, unix:/run/g.sock, 0.0.0.0:8083, [::]:8084, 10.1.2.3:80";
        assert_eq!(
            reachable_from_elsewhere(list),
            ["0.0.0.0:8083", "[::]:8084", "10.1.2.3:80"]
        );
        let listeners = open_all("127.0.0.1:0", 0o600).unwrap();
        assert!(!is_exposed(&listeners[0]));
    }

    #[test]
    fn a_stale_socket_is_replaced_but_a_live_one_or_another_file_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        let address = format!("unix:{}", path.display());
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a dead listener leaves its file");
        let live = open_all(&address, 0o660).unwrap();
        assert!(matches!(open_all(&address, 0o660), Err(ListenError::SocketInUse(_))));
        drop(live);
        fs::write(&path, "data").unwrap();
        assert!(matches!(open_all(&address, 0o660), Err(ListenError::NotASocket(_))));
        assert_eq!(fs::read_to_string(&path).unwrap(), "data");
    }
}
