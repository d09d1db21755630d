//! Runs a PostgreSQL server from the installed server binaries: the gateway's own database when no
//! `DATABASE_URL` is given (persistent, under `<data-dir>/postgres`), and the throwaway clusters of the tests.
//!
//! `initdb` and `postgres` refuse to run as root, and containers often run as root: then both run as the
//! `postgres` user (or `nobody`), in a directory handed to that user. The server listens on a Unix socket only,
//! logs to a file (an unread pipe would stall it once full), sits in its own process group (a Ctrl-C meant for
//! the gateway must not stop the database under the writers that are draining into it), and is told to quit
//! when the gateway's process dies, so a crash never leaves a server holding the data directory.
//!
//! Only the gateway's own user (and root) may reach the server: the socket sits in a directory of mode 0700 owned
//! by the server's user, and even through it every role needs a password (scram-sha-256). The `postgres` role's
//! password is made at random when the cluster is created and kept in the cluster directory, mode 0600, in
//! libpq's password-file format (`PGPASSFILE`). Password rather than peer authentication, because it works the
//! same whether the gateway runs as the server's user or as root (then the client is `root` and the server
//! `postgres`, which peer would need a user-name map for), for every role a caller creates (a map names each one),
//! and for users without a passwd entry. A cluster made by an earlier version (`trust` in `pg_hba.conf`, no
//! password) gets a password and a new `pg_hba.conf` at its next start. As root, the set-up refuses symbolic
//! links where it hands files to the server's user or writes them, so a link planted in the data directory
//! cannot make root give away or overwrite another file.

//!
//! - `cluster`: `initdb`, the superuser's password and `pg_hba.conf`.
//! - `ephemeral`: throwaway servers in temporary directories.
//! - `locate`: the server binaries and the user that runs them.
//! - `private_files`: the cluster's files handled without following links.

mod cluster;
mod ephemeral;
mod locate;
mod private_files;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::support::io_context::{self, PathIoError};
use crate::support::process::spawn_from_keeper_thread;
use crate::support::process::{die_with_parent, send_signal};
pub use cluster::PASSWORD_FILE;
pub use locate::{find_bin_dir, server_user};
use private_files::{check_is_cluster_or_empty, check_reachable, hand_over, refuse_symlink};

/// How long the server may take to accept connections (crash recovery of a large cluster takes a while).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The port names the socket file (`.s.PGSQL.<port>`); nothing listens on TCP.
const SOCKET_PORT: u16 = 5432;
/// Unix socket paths are limited to 107 bytes on Linux.
const MAX_SOCKET_PATH: usize = 100;
/// The superuser role the gateway connects as.
const SUPERUSER: &str = "postgres";

/// How to run the server.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// The cluster directory; `initdb` fills it on first start.
    pub data_dir: PathBuf,
    /// Turns off fsync and friends: for throwaway clusters only, where speed matters and a crash does not.
    pub ephemeral: bool,
}

/// Whether a throwaway server keeps its commits through a crash of its own processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitSafety {
    /// fsync and synchronous commit off: fastest; a killed server loses its last commits.
    Fast,
    /// As a real server: a commit it acknowledged survives `kill -9`.
    Safe,
}

/// Why the server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedPostgresError {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) were not found; install them (Debian/Ubuntu: \
         `apt-get install postgresql`), point PG_BIN at their directory, or set DATABASE_URL to use an existing server"
    )]
    NotInstalled,
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error(
        "PostgreSQL runs as uid {uid} (it refuses root) and cannot reach {data_dir}: {blocked} is not searchable \
         by that user; choose a --data-dir it can reach, run the gateway as a non-root user, or `chmod o+x {blocked}`"
    )]
    Unreachable {
        uid: u32,
        data_dir: PathBuf,
        blocked: PathBuf,
    },
    #[error("{0} is not empty and holds no PostgreSQL cluster; move it away or choose another --data-dir")]
    NotACluster(PathBuf),
    #[error(
        "{0} is a symbolic link; the embedded PostgreSQL's set-up does not follow links where it hands files to the \
         server's user or writes them (a planted link would make it give away or overwrite another file): replace \
         it with a real file or directory, or point --data-dir at the real location"
    )]
    SymbolicLink(PathBuf),
    #[error("{path} holds no password for the postgres role; remove it and the gateway makes a new one")]
    NoPassword { path: PathBuf },
    #[error("could not set the postgres role's password ({status}); the end of the log {log_path}:\n{log}")]
    SetPassword {
        status: String,
        log_path: PathBuf,
        log: String,
    },
    #[error("initdb failed ({status}); its output:\n{log}")]
    Initdb { status: String, log: String },
    #[error("postgres did not start ({reason}); the end of its log {log_path}:\n{log}")]
    Start {
        reason: String,
        log_path: PathBuf,
        log: String,
    },
}

pub(super) fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> EmbeddedPostgresError + 'a {
    move |source| {
        // ELOOP is what O_NOFOLLOW answers for a link: say so plainly.
        if source.raw_os_error() == Some(libc::ELOOP) {
            return EmbeddedPostgresError::SymbolicLink(path.to_owned());
        }
        io_context::context(what, path)(source)
    }
}

/// A running PostgreSQL server; stopped (fast shutdown) when dropped.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    /// Names the socket file, and the TCP port when a test has the server listen on TCP too.
    port: u16,
    /// Settings (`-c name=value`) a caller added with [`Self::restart_with`].
    extra_settings: Vec<String>,
    /// The `postgres` role's password, from [`PASSWORD_FILE`].
    password: String,
    log_path: PathBuf,
    ephemeral: bool,
    /// The user the server runs as when the gateway runs as root.
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
    /// The directory of a throwaway server, which [`Self::temp_dir`] lends to callers for their scratch files.
    temp_dir: Option<PathBuf>,
    /// Holds a throwaway cluster (or a short socket directory) and removes it after the server stops.
    _temp_dirs: Vec<tempfile::TempDir>,
}

impl EmbeddedPostgres {
    /// Starts a server on `options.data_dir`, creating the cluster if there is none.
    pub fn start(options: &PostgresOptions) -> Result<Self, EmbeddedPostgresError> {
        let bin_dir = find_bin_dir().ok_or(EmbeddedPostgresError::NotInstalled)?;
        let run_as = server_user();
        let data_dir = &options.data_dir;
        if run_as.is_some() {
            // The directory is about to be given to the server's user: a link would give away its target.
            refuse_symlink(data_dir)?;
        }
        fs::create_dir_all(data_dir).map_err(io_error("could not create the database directory", data_dir))?;
        let data_dir = data_dir
            .canonicalize()
            .map_err(io_error("could not resolve", data_dir))?;
        check_reachable(&data_dir, run_as)?;
        check_is_cluster_or_empty(&data_dir)?;
        hand_over(&data_dir, run_as, 0o700)?;
        let log_path = data_dir.with_extension("log");

        let mut temp_dirs = Vec::new();
        let socket_dir = if data_dir.join(".s.PGSQL.65535").as_os_str().len() <= MAX_SOCKET_PATH {
            data_dir.clone()
        } else {
            let dir = tempfile::Builder::new()
                .prefix("ingest-gateway-sock-")
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .tempdir()
                .map_err(io_error("could not create a socket directory", Path::new("/tmp")))?;
            // Private, as the cluster directory is: whoever can enter it can try the socket.
            hand_over(dir.path(), run_as, 0o700)?;
            let path = dir.path().to_owned();
            temp_dirs.push(dir);
            path
        };

        let mut server = EmbeddedPostgres {
            bin_dir,
            data_dir,
            socket_dir,
            port: SOCKET_PORT,
            extra_settings: Vec::new(),
            password: String::new(),
            log_path,
            ephemeral: options.ephemeral,
            run_as,
            child: None,
            temp_dir: None,
            _temp_dirs: temp_dirs,
        };
        server.init_if_needed()?;
        server.require_passwords()?;
        server.spawn()?;
        Ok(server)
    }

    /// Connection settings for database `dbname` as the `postgres` superuser.
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.socket_dir)
            .port(self.port)
            .user(SUPERUSER)
            .password(&self.password)
            .dbname(dbname);
        config
    }

    /// The same as [`Self::config`], as a connection string for `DATABASE_URL` or `psql` (it holds the password).
    pub fn connection_string(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user={SUPERUSER} password={} dbname={dbname}",
            self.socket_dir.display(),
            self.port,
            self.password
        )
    }

    /// The `postgres` role's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The port: it names the socket file, and is the TCP port when [`Self::restart_with`] made the server listen
    /// on TCP.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory a throwaway server lives in (its cluster and log are inside), removed once the server has
    /// stopped — or, when its process died without stopping it, by a later throwaway server's start, a minute on.
    /// Files a caller keeps here go with the server. `None` for a server on a directory of the caller's.
    pub fn temp_dir(&self) -> Option<&Path> {
        self.temp_dir.as_deref()
    }

    /// The postmaster's process id while the server runs: the parent of every backend, so `/proc` tells the CPU
    /// time the server spends.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What `postgres --version` says of the binaries this server runs (`postgres (PostgreSQL) 15.18`), or
    /// `None` when it cannot be run.
    pub fn version(&self) -> Option<String> {
        Command::new(self.bin_dir.join("postgres"))
            .arg("--version")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    }

    /// Stops the server (fast shutdown: open transactions are rolled back, committed data is kept).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        send_signal(&child, libc::SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    warn!("postgres did not stop in time, killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Kills the server at once, as a crash would (the next start runs crash recovery).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Starts the server again after [`Self::stop`] or [`Self::kill`].
    pub fn restart(&mut self) -> Result<(), EmbeddedPostgresError> {
        if self.child.is_none() {
            self.spawn()?;
        }
        Ok(())
    }

    /// Stops the server and starts it again on `port` with `settings` (`name=value`, as `-c` takes them) on top
    /// of its own: for tests that need, say, a server that also takes TLS connections on TCP.
    pub fn restart_with(&mut self, port: u16, settings: &[&str]) -> Result<(), EmbeddedPostgresError> {
        self.stop();
        self.port = port;
        self.extra_settings = settings.iter().map(|s| (*s).to_owned()).collect();
        self.spawn()
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        // The server user may not be allowed into the gateway's working directory.
        command.current_dir("/").stdin(Stdio::null()).env_remove("PGDATA");
        command
    }

    fn log_file(&self) -> Result<File, EmbeddedPostgresError> {
        // Opened by the gateway, possibly as root, and handed to the server: never through a link, and readable
        // by its owner only (statements that failed are quoted in it).
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.log_path)
            .map_err(io_error("could not open", &self.log_path))
    }

    fn spawn(&mut self) -> Result<(), EmbeddedPostgresError> {
        let log = self.log_file()?;
        let log_err = log.try_clone().map_err(io_error("could not open", &self.log_path))?;
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-k")
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=",
                "-c",
                "max_connections=200",
                "-c",
                "unix_socket_permissions=0700",
            ])
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        if self.ephemeral {
            command.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        for setting in &self.extra_settings {
            command.arg("-c").arg(setting);
        }
        die_with_parent(&mut command, libc::SIGQUIT);
        let child = spawn_from_keeper_thread(command).map_err(io_error("could not run postgres", &self.bin_dir))?;
        self.child = Some(child);
        self.wait_until_ready()
    }

    fn wait_until_ready(&mut self) -> Result<(), EmbeddedPostgresError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid_file = self.data_dir.join("postmaster.pid");
        let child_pid = self.child.as_ref().map(Child::id);
        loop {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(self.start_error(format!("it exited with {status}")));
            }
            // Line 8 of postmaster.pid turns to `ready` once the server accepts connections; line 1 is the pid,
            // which tells our server's file apart from a stale one.
            if let Ok(text) = fs::read_to_string(&pid_file) {
                let lines: Vec<&str> = text.lines().collect();
                let ours = lines.first().and_then(|l| l.trim().parse::<u32>().ok()) == child_pid;
                if ours && lines.get(7).is_some_and(|l| l.trim() == "ready") {
                    info!(socket_dir = %self.socket_dir.display(), "embedded PostgreSQL is ready");
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(self.start_error(format!("not ready after {START_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_error(&self, reason: String) -> EmbeddedPostgresError {
        EmbeddedPostgresError::Start {
            reason,
            log_path: self.log_path.clone(),
            log: log_tail(&self.log_path),
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last lines of a log file, for an error message.
pub(super) fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text.lines()
        .rev()
        .take(20)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}
