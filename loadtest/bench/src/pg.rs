//! The benchmark's own throwaway PostgreSQL server, and the admin connection that empties and counts tables.
//!
//! `initdb` + `postgres` from the installed server binaries, on a Unix socket in a temporary directory, with the
//! server's default settings (fsync on), so that every variant writes into the same, realistically configured
//! server.
//!
//! `initdb` and `postgres` refuse to run as root, and this benchmark often runs as root (containers, CI): then
//! both run as the `postgres` user (or `nobody`), in a directory handed to that user.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use ingest_gateway::db::embedded::{find_bin_dir, server_user};

/// The port only names the socket file (`.s.PGSQL.5432`); nothing listens on TCP.
pub const SOCKET_PORT: u16 = 5432;
/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running throwaway server; stopped and its directory removed when dropped.
pub struct TempPostgres {
    bin_dir: PathBuf,
    /// Holds the cluster, the socket, the server log and the benchmark's other scratch files.
    dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl TempPostgres {
    /// Creates a cluster in a new directory under the system temporary directory and starts a server on it.
    pub fn start() -> anyhow::Result<Self> {
        let bin_dir = find_bin_dir().context(
            "PostgreSQL server binaries (initdb, postgres) were not found; install them \
             (Debian/Ubuntu: `apt-get install postgresql`) or point PG_BIN at their directory",
        )?;
        let run_as = server_user();
        remove_stale_dirs();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{nanos:x}", std::process::id()));
        fs::create_dir(&dir).with_context(|| format!("could not create {}", dir.display()))?;
        // The server creates its socket here and the benchmark (maybe root) writes scratch files here: the server
        // user owns it, everyone may enter it.
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .with_context(|| format!("could not hand {} to uid {uid}", dir.display()))?;
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("could not chmod {}", dir.display()))?;

        let mut server = TempPostgres {
            log_path: dir.join("postgres.log"),
            bin_dir,
            dir,
            child: None,
        };
        server.initdb(run_as)?;
        server.spawn(run_as)?;
        Ok(server)
    }

    /// The scratch directory (socket, logs, COPY files, the gateway's data directories).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A `key=value` connection string for `DATABASE_URL`, `psql` and `tokio_postgres`.
    pub fn connection_string(&self, dbname: &str) -> String {
        format!(
            "host={} port={SOCKET_PORT} user=postgres dbname={dbname}",
            self.dir.display()
        )
    }

    /// The server process (the root of its backends), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `postgres --version`, for the report.
    pub fn version(&self) -> String {
        Command::new(self.bin_dir.join("postgres"))
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned())
    }

    fn command(&self, program: &str, run_as: Option<(u32, u32)>) -> anyhow::Result<Command> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("could not open {}", self.log_path.display()))?;
        let log_err = log.try_clone()?;
        let mut command = Command::new(self.bin_dir.join(program));
        if let Some((uid, gid)) = run_as {
            command.uid(uid).gid(gid);
        }
        // The server user may not be allowed into the caller's working directory; a log file, not a pipe, because
        // an unread pipe stalls the server once it is full.
        command
            .current_dir("/")
            .env_remove("PGDATA")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        Ok(command)
    }

    fn initdb(&self, run_as: Option<(u32, u32)>) -> anyhow::Result<()> {
        // --no-sync only skips the final flush of the fresh cluster files; the server itself runs with fsync on.
        let status = self
            .command("initdb", run_as)?
            .arg("-D")
            .arg(self.dir.join("pgdata"))
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .status()
            .context("could not run initdb")?;
        if !status.success() {
            bail!("initdb failed ({status}); its log:\n{}", self.log_tail());
        }
        Ok(())
    }

    fn spawn(&mut self, run_as: Option<(u32, u32)>) -> anyhow::Result<()> {
        let mut command = self.command("postgres", run_as)?;
        command
            .arg("-D")
            .arg(self.dir.join("pgdata"))
            .arg("-k")
            .arg(&self.dir)
            .args(["-p", &SOCKET_PORT.to_string(), "-c", "listen_addresses="]);
        crate::procs::die_with_parent(&mut command, libc::SIGQUIT);
        let child = command.spawn().context("could not run postgres")?;
        self.child = Some(child);

        // Line 8 of postmaster.pid turns to `ready` once the server accepts connections.
        let pid_file = self.dir.join("pgdata").join("postmaster.pid");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    bail!("postgres exited with {status}; its log:\n{}", self.log_tail());
                }
            }
            let ready = fs::read_to_string(&pid_file)
                .map(|text| text.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "postgres was not ready after {START_TIMEOUT:?}; its log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log_path, 20)
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT is the fast shutdown: no waiting for clients, committed data kept.
            crate::procs::signal(child.id(), libc::SIGINT);
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Prefix of the scratch directories; the pid of the benchmark that made one follows.
const DIR_PREFIX: &str = "ingest-bench-";

/// Removes the scratch directories of benchmarks that are gone (stopped with Ctrl-C or killed), which may hold
/// gigabytes of tables and write-ahead logs.
fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists; EPERM means it does, under another user.
        let alive =
            unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive && pid != std::process::id() as libc::pid_t {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The last `lines` lines of a text file (empty when it cannot be read).
pub fn file_tail(path: &Path, lines: usize) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(8192)));
        let _ = file.read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A connection for the benchmark's own statements (create, reset, count), driven by a small runtime of its own
/// so that the rest of the benchmark stays plain blocking code.
pub struct Admin {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Admin {
    pub fn connect(connection_string: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(connection_string, tokio_postgres::NoTls)
                .await
                .with_context(|| format!("could not connect to {connection_string}"))?;
            // The connection only makes progress while `block_on` runs, which is whenever the client is used.
            tokio::spawn(connection);
            anyhow::Ok(client)
        })?;
        Ok(Admin { runtime, client })
    }

    pub fn execute(&self, sql: &str) -> anyhow::Result<()> {
        self.runtime
            .block_on(self.client.batch_execute(sql))
            .with_context(|| format!("{sql} failed"))
    }

    /// One `bigint` from the first column of the first row.
    pub fn query_i64(&self, sql: &str) -> anyhow::Result<i64> {
        let row = self
            .runtime
            .block_on(self.client.query_one(sql, &[]))
            .with_context(|| format!("{sql} failed"))?;
        Ok(row.try_get(0)?)
    }

    pub fn count_rows(&self, table: &str) -> anyhow::Result<u64> {
        let n = self.query_i64(&format!("SELECT count(*) FROM {table}"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Empties every table the migrations made (not their history), whatever later migrations add — a log
    /// position table, dead letters — so each variant starts from the same empty schema; then checkpoints, so the
    /// previous variant's dirty pages are not flushed on the next one's time.
    pub fn reset(&self) -> anyhow::Result<()> {
        let tables: Vec<String> = self
            .runtime
            .block_on(self.client.query(
                "SELECT quote_ident(tablename) FROM pg_tables \
                 WHERE schemaname = 'public' AND tablename <> 'refinery_schema_history'",
                &[],
            ))?
            .iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect::<Result<_, _>>()?;
        if !tables.is_empty() {
            self.execute(&format!("TRUNCATE {}", tables.join(", ")))?;
        }
        self.execute("CHECKPOINT")
    }
}
