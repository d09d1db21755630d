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

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// How long the server may take to accept connections (crash recovery of a large cluster takes a while).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The port names the socket file (`.s.PGSQL.<port>`); nothing listens on TCP.
const SOCKET_PORT: u16 = 5432;
/// Unix socket paths are limited to 107 bytes on Linux.
const MAX_SOCKET_PATH: usize = 100;
/// Prefix of the temporary directories of throwaway clusters.
const EPHEMERAL_PREFIX: &str = "ingest-gateway-pg-";
/// The superuser role the gateway connects as.
const SUPERUSER: &str = "postgres";
/// The superuser's password, in the cluster directory, as a libpq password file (`PGPASSFILE`).
pub const PASSWORD_FILE: &str = "ingest-gateway.pgpass";
/// Random bytes in a password (written as hex).
const PASSWORD_BYTES: usize = 24;
/// The client authentication written into a cluster: the Unix socket only (nothing listens on TCP), and a password
/// even there.
const PG_HBA: &str = "\
# Written by ingest-gateway at every start (edits are lost): the server listens on a Unix socket in a private
# directory only, and even there every role needs its password.
local   all   all   scram-sha-256
";

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
    #[error("{what}: {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> EmbeddedPostgresError + 'a {
    move |source| {
        // ELOOP is what O_NOFOLLOW answers for a link: say so plainly.
        if source.raw_os_error() == Some(libc::ELOOP) {
            return EmbeddedPostgresError::SymbolicLink(path.to_owned());
        }
        EmbeddedPostgresError::Io {
            what,
            path: path.to_owned(),
            source,
        }
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

    fn init_if_needed(&mut self) -> Result<(), EmbeddedPostgresError> {
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
    fn require_passwords(&mut self) -> Result<(), EmbeddedPostgresError> {
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

/// Sends `signal` to `child`, which must not have been waited for yet: once reaped, its pid may name another
/// process. (`Child::kill` sends only SIGKILL.)
pub fn send_signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill has no memory effects; the pid is of a child not yet reaped, so it names no other process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// Has the kernel send `signal` to the process `command` starts when the *thread* that spawns it ends — with the
/// whole process when spawned from the main thread or a thread that lives as long — so a crash or a kill leaves
/// no child running.
pub fn die_with_parent(command: &mut Command, signal: libc::c_int) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Spawns `command` from one long-lived thread: the parent-death signal fires when the *thread* that spawned
/// the child ends, so spawning from a short-lived thread (a test) would stop the server too early.
fn spawn_from_keeper_thread(command: Command) -> io::Result<Child> {
    type Job = (Command, mpsc::Sender<io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("postgres-keeper".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
                // The sender lives in a static, so this thread lives as long as the process.
            })
            .map(|_| ())
            .unwrap_or_else(|e| warn!(error = %e, "could not start the postgres keeper thread"));
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    let sent = keeper
        .lock()
        .map_err(|_| io::Error::other("postgres keeper lock poisoned"))?
        .send((command, reply_tx));
    sent.map_err(|_| io::Error::other("postgres keeper thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("postgres keeper thread is gone"))?
}

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

/// Checks that the server user can walk down to `dir` (every ancestor searchable by it): a root-owned `0700`
/// home directory on the way is the usual reason a root-run gateway cannot start its PostgreSQL.
fn check_reachable(dir: &Path, run_as: Option<(u32, u32)>) -> Result<(), EmbeddedPostgresError> {
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
fn hand_over(dir: &Path, run_as: Option<(u32, u32)>, mode: u32) -> Result<(), EmbeddedPostgresError> {
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
fn refuse_symlink(path: &Path) -> Result<(), EmbeddedPostgresError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(EmbeddedPostgresError::SymbolicLink(path.to_owned())),
        _ => Ok(()),
    }
}

/// A directory that is neither empty nor a cluster is someone else's: left alone, and never handed over.
fn check_is_cluster_or_empty(dir: &Path) -> Result<(), EmbeddedPostgresError> {
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
fn read_nofollow(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .read_to_end(&mut bytes)?;
    Ok(bytes)
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
    let mut bytes = [0u8; PASSWORD_BYTES];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, a live, writable buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        filled += n as usize;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether a `pg_hba.conf` lets a client in without a password: a line whose method is `trust`.
fn lets_anyone_in(hba: &str) -> bool {
    hba.lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        // The method follows the type, database and user fields (and, for host lines, the address).
        .any(|line| line.split_whitespace().skip(3).any(|field| field == "trust"))
}

/// Writes `contents` as `dir/name`, mode 0600, owned by `owner` when given: a new file renamed into place, so a
/// link planted at the name is replaced rather than followed, and a crash leaves the old file or the new one.
fn replace_private_file(
    dir: &Path,
    name: &str,
    contents: &[u8],
    owner: Option<(u32, u32)>,
) -> Result<(), EmbeddedPostgresError> {
    let path = dir.join(name);
    let temp = dir.join(format!(".{name}.new"));
    // Left by a crash; removing a link removes the link, not its target.
    let _ = fs::remove_file(&temp);
    let write = || -> io::Result<()> {
        // `create_new` (O_EXCL) never follows a link.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, &path)
    };
    write().map_err(io_error("could not write", &path))
}

/// The last lines of a log file, for an error message.
fn log_tail(path: &Path) -> String {
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

/// Removes the throwaway clusters of processes that are gone (a test binary exits without dropping statics).
fn remove_stale_ephemeral_dirs() {
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

#[cfg(test)]
mod tests {
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

    #[test]
    fn passwords_are_random_hex() {
        let (a, b) = (random_password().unwrap(), random_password().unwrap());
        assert_eq!(a.len(), PASSWORD_BYTES * 2);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
