//! The processes under test: start, watch and stop them, with the CPU and memory the kernel accounted to them.
//!
//! A server is started and waited for until it answers; its peak memory and the variant's progress counter are
//! sampled while the load runs; it is stopped with SIGTERM and reaped with `wait4` for its CPU time and peak RSS.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ingest_gateway::support::process::{die_with_parent, send_signal};

/// How often the progress counter (rows landed) is read while the load runs.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// How often the process's peak resident memory is read.
const RSS_EVERY: Duration = Duration::from_millis(100);

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it a moment later).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("could not find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A `GET` on 127.0.0.1: the status and the body. Small and blocking, for `/stats` and readiness probes.
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of headers in the response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status in the response")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body
}

/// The last `lines` lines of a text file (empty when it cannot be read), for error messages.
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

/// What the kernel accounted to a process over its whole life.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User plus system CPU time.
    pub cpu_secs: f64,
    /// Peak resident set size.
    pub max_rss_kib: u64,
    pub exit_code: Option<i32>,
}

/// A server process under test; killed if dropped while still running (an error path), so none is left behind.
pub struct Service {
    pub name: String,
    pub port: u16,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl Service {
    /// Starts `command` with its output in `log_path` and waits until `GET ready_path` answers 200.
    pub fn start(
        name: &str,
        mut command: Command,
        port: u16,
        log_path: &Path,
        ready_path: &str,
        timeout: Duration,
    ) -> anyhow::Result<Service> {
        let log =
            std::fs::File::create(log_path).with_context(|| format!("could not create {}", log_path.display()))?;
        command
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(std::process::Stdio::null());
        die_with_parent(&mut command, libc::SIGKILL);
        let child = command.spawn().with_context(|| format!("could not start {name}"))?;
        let mut service = Service {
            name: name.to_owned(),
            port,
            log_path: log_path.to_owned(),
            child: Some(child),
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = service.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    service.child = None;
                    bail!(
                        "{name} exited with {status} before it was ready; its log:\n{}",
                        service.log_tail()
                    );
                }
            }
            if matches!(http_get(port, ready_path), Ok((200, _))) {
                return Ok(service);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name} did not answer {ready_path} within {timeout:?}; its log:\n{}",
                    service.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_tail(&self) -> String {
        file_tail(&self.log_path, 30)
    }

    /// Sends SIGTERM (a graceful stop: the gateway writes everything it accepted) and waits for the exit, up to
    /// `timeout`, then kills. Returns what the kernel accounted to the process.
    pub fn stop(mut self, timeout: Duration) -> anyhow::Result<Usage> {
        let Some(child) = self.child.take() else {
            bail!("{} is not running", self.name);
        };
        let pid = child.id();
        send_signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        let mut killed = false;
        loop {
            if let Some(usage) = reap(pid, false)? {
                if killed {
                    bail!(
                        "{} did not stop within {timeout:?} of SIGTERM and was killed",
                        self.name
                    );
                }
                return Ok(usage);
            }
            if Instant::now() >= deadline && !killed {
                send_signal(&child, libc::SIGKILL);
                killed = true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reaps `pid` with `wait4`, which also returns the child's resource usage (std's `Child::wait` does not).
/// `None` while it still runs (unless `block`).
pub fn reap(pid: u32, block: bool) -> anyhow::Result<Option<Usage>> {
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = if block { 0 } else { libc::WNOHANG };
    // SAFETY: both pointers are to live locals of the right types; pid is our own child's.
    let reaped = unsafe { libc::wait4(pid as libc::pid_t, &mut status, flags, &mut rusage) };
    if reaped == 0 {
        return Ok(None);
    }
    if reaped < 0 {
        return Err(io::Error::last_os_error()).context("wait4 failed");
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Some(Usage {
        cpu_secs: secs(rusage.ru_utime) + secs(rusage.ru_stime),
        max_rss_kib: u64::try_from(rusage.ru_maxrss).unwrap_or(0),
        exit_code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
    }))
}

/// `VmHWM` (peak resident memory) from /proc/<pid>/status.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// `VmRSS` (resident memory now) from /proc/<pid>/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One reading of a variant's progress counter: seconds since the load started, rows landed so far.
pub type Sample = (f64, u64);

/// Reads a progress counter and a process's peak memory on its own thread while the load runs.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    /// Taken by [`Monitor::finish`]; a monitor dropped on an error path only stops its thread.
    handle: Option<JoinHandle<u64>>,
}

/// What a monitor saw.
pub struct MonitorOutcome {
    pub samples: Vec<Sample>,
    /// Highest `VmHWM` seen, 0 without a process to watch.
    pub peak_rss_kib: u64,
}

impl Monitor {
    /// Starts sampling; `t0` is the start of the load, `progress` returns rows landed so far (or `None` when it
    /// could not be read this time).
    pub fn start(t0: Instant, pid: Option<u32>, mut progress: Box<dyn FnMut() -> Option<u64> + Send>) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (stop_flag, shared) = (stop.clone(), samples.clone());
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            let mut next_progress = Instant::now();
            let mut next_rss = Instant::now();
            while !stop_flag.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now >= next_progress {
                    if let Some(rows) = progress() {
                        if let Ok(mut samples) = shared.lock() {
                            samples.push((t0.elapsed().as_secs_f64(), rows));
                        }
                    }
                    // A slow read must not make the next ones fire back to back.
                    next_progress = (next_progress + PROGRESS_EVERY).max(Instant::now());
                }
                if now >= next_rss {
                    if let Some(kib) = pid.and_then(peak_rss_kib) {
                        peak = peak.max(kib);
                    }
                    next_rss = (next_rss + RSS_EVERY).max(Instant::now());
                }
                let wake = next_progress.min(next_rss);
                std::thread::sleep(
                    wake.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(20)),
                );
            }
            peak
        });
        Monitor {
            stop,
            samples,
            handle: Some(handle),
        }
    }

    /// The latest sample, for deciding when the variant has drained.
    pub fn latest(&self) -> Option<Sample> {
        self.samples.lock().ok().and_then(|s| s.last().copied())
    }

    pub fn finish(mut self) -> MonitorOutcome {
        self.stop.store(true, Ordering::Relaxed);
        let peak_rss_kib = self.handle.take().and_then(|h| h.join().ok()).unwrap_or(0);
        let samples = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        MonitorOutcome { samples, peak_rss_kib }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// CPU seconds spent so far, from three places: the whole machine (`/proc/stat`), this benchmark and every child
/// it has reaped (getrusage), and a process tree that is still running (the PostgreSQL server and its backends).
/// Their differences over a variant tell how much CPU processes outside the benchmark took meanwhile — on a
/// shared machine, the reason two rounds disagree.
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    at: Instant,
    machine_busy_secs: f64,
    own_secs: f64,
    tree_secs: f64,
}

impl CpuSnapshot {
    pub fn take(tree_root: Option<u32>) -> CpuSnapshot {
        CpuSnapshot {
            at: Instant::now(),
            machine_busy_secs: machine_busy_secs().unwrap_or(0.0),
            own_secs: own_secs(),
            tree_secs: tree_root.map(tree_secs).unwrap_or(0.0),
        }
    }

    /// The share of the machine's CPU capacity (all cores) that processes outside the benchmark used between
    /// `self` and `later`.
    /// CPU seconds the watched process tree used between `self` and `later`.
    pub fn tree_secs_since(&self, later: &CpuSnapshot) -> f64 {
        (later.tree_secs - self.tree_secs).max(0.0)
    }

    pub fn others_share(&self, later: &CpuSnapshot, cores: usize) -> f64 {
        let elapsed = later.at.duration_since(self.at).as_secs_f64() * cores as f64;
        let ours = (later.own_secs - self.own_secs) + (later.tree_secs - self.tree_secs);
        let others = (later.machine_busy_secs - self.machine_busy_secs) - ours;
        if elapsed > 0.0 {
            (others / elapsed).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Busy time of all cores: user, nice, system, and steal (time another guest took from us). Not irq and softirq:
/// they are charged to no process, and here they are mostly the benchmark's own loopback traffic.
fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …
    let busy = [0, 1, 2, 7].iter().filter_map(|&i| fields.get(i)).sum::<f64>();
    Some(busy / clock_ticks_per_sec())
}

/// This process and its reaped children (wrk, the servers under test, psql, once they have exited).
fn own_secs() -> f64 {
    rusage_secs(libc::RUSAGE_SELF) + rusage_secs(libc::RUSAGE_CHILDREN)
}

/// CPU seconds of every child this process has reaped so far. The difference over one blocking run of a child
/// (wrk) is that child's CPU, as long as no other child is reaped meanwhile: the servers and psql are reaped by
/// the same thread, before or after the load, never during it.
pub fn reaped_children_secs() -> f64 {
    rusage_secs(libc::RUSAGE_CHILDREN)
}

/// User plus system CPU seconds from getrusage; 0 if the call fails.
fn rusage_secs(who: libc::c_int) -> f64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct, and getrusage writes only into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// utime, stime, cutime, cstime and ppid of a process, from /proc/<pid>/stat.
fn proc_stat(pid: u32) -> Option<([f64; 4], u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the fields after it are split from its end.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // After the name: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
    let ticks = [field(11)?, field(12)?, field(13)?, field(14)?];
    Some((ticks, fields.get(1)?.parse().ok()?))
}

/// CPU of a running process, its reaped children and its live children (PostgreSQL's backends).
fn tree_secs(root: u32) -> f64 {
    let Some((ticks, _)) = proc_stat(root) else { return 0.0 };
    let mut total: f64 = ticks.iter().sum();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ticks, ppid)) = proc_stat(pid) {
                if ppid == root {
                    total += ticks[0] + ticks[1];
                }
            }
        }
    }
    total / clock_ticks_per_sec()
}
