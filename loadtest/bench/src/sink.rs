//! The sink ceiling: binary COPY batches fed to psql, the most rows/s this PostgreSQL takes.
//!
//! 1000-row batches go into `location_updates` (same table, same indexes) with no HTTP, JSON or queue in front —
//! `psql`'s `\copy … WITH (FORMAT binary)` from files written here, as many psql processes as the gateway has
//! writers. Each `\copy` is its own transaction, as each gateway batch is.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use ingest_gateway::support::process::die_with_parent;

/// The columns the gateway's COPY writes, in its order.
const COLUMNS: &str = "device_id, recorded_at, lat, lon, speed_kmh, heading_deg, accuracy_m, attributes, received_at";
/// Printed by psql after each `\copy`, so the benchmark sees each batch commit as it happens.
const MARKER: &str = "ingest-bench-batch-done";
/// `\copy` commands queued per psql process: one running, one waiting, so psql never idles between batches.
const PIPELINE: usize = 2;
/// Seconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// What the sink ceiling did.
pub struct SinkOutcome {
    /// Rows in batches psql reported done.
    pub rows: u64,
    /// Seconds from the start until the last batch committed.
    pub last_commit_secs: f64,
    /// CPU seconds of the psql processes (not of the server).
    pub psql_cpu_secs: f64,
}

/// Runs `processes` psql processes, each copying `rows_per_batch`-row batches until `duration` has passed;
/// `landed` counts committed rows as they commit.
pub fn run(
    connection: &str,
    dir: &Path,
    processes: usize,
    rows_per_batch: usize,
    duration: Duration,
    t0: Instant,
    landed: Arc<AtomicU64>,
) -> anyhow::Result<SinkOutcome> {
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let deadline = t0 + duration;
    let last_commit = Arc::new(Mutex::new(0.0_f64));
    // Spawned here, on the calling (main) thread, so that the parent-death signal outlives the worker threads.
    let mut children = Vec::new();
    for index in 0..processes {
        let log_path = dir.join(format!("psql-{index}.log"));
        let log = fs::File::create(&log_path)?;
        let mut command = Command::new("psql");
        command
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", connection])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        die_with_parent(&mut command, libc::SIGKILL);
        let mut child = command
            .spawn()
            .context("could not run psql (Debian/Ubuntu: `apt-get install postgresql-client`)")?;
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let (Some(stdin), Some(stdout)) = (stdin, stdout) else {
            bail!("psql started without pipes");
        };
        let batch = Batch {
            dir: dir.to_owned(),
            process: index,
            rows: rows_per_batch,
        };
        let (landed, last_commit) = (landed.clone(), last_commit.clone());
        let worker = std::thread::spawn(move || drive(stdin, stdout, batch, deadline, t0, &landed, &last_commit));
        children.push((child, worker, log_path));
    }

    let mut rows = 0;
    let mut psql_cpu_secs = 0.0;
    let mut failure = None;
    for (child, worker, log_path) in children {
        let driven = worker
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a psql driver thread panicked")));
        let usage = crate::procs::reap(child.id(), true)?;
        psql_cpu_secs += usage.map(|u| u.cpu_secs).unwrap_or(0.0);
        match driven {
            Ok(n) => rows += n,
            Err(e) => {
                failure.get_or_insert(e.context(format!("psql said:\n{}", crate::procs::file_tail(&log_path, 10))));
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let last_commit_secs = last_commit.lock().map(|t| *t).unwrap_or(0.0);
    Ok(SinkOutcome {
        rows,
        last_commit_secs,
        psql_cpu_secs,
    })
}

/// Where one psql process's batch files go and how big they are.
struct Batch {
    dir: PathBuf,
    process: usize,
    rows: usize,
}

/// Feeds one psql process `\copy` commands until the deadline, keeping [`PIPELINE`] in flight; returns rows copied.
fn drive(
    mut stdin: ChildStdin,
    stdout: ChildStdout,
    batch: Batch,
    deadline: Instant,
    t0: Instant,
    landed: &AtomicU64,
    last_commit: &Mutex<f64>,
) -> anyhow::Result<u64> {
    let mut reader = BufReader::new(stdout);
    let mut in_flight: VecDeque<PathBuf> = VecDeque::new();
    let mut rng = XorShift::new(batch.process as u64 + 1);
    let mut sent = 0_u64;
    let mut rows = 0_u64;
    let mut line = String::new();
    loop {
        while in_flight.len() < PIPELINE && Instant::now() < deadline {
            let path = batch.dir.join(format!("batch-{}-{sent}.pgcopy", batch.process));
            let prefix = format!("sink-{}-{sent}-", batch.process);
            fs::write(&path, encode_batch(&prefix, batch.rows, &mut rng))
                .with_context(|| format!("could not write {}", path.display()))?;
            writeln!(
                stdin,
                "\\copy location_updates ({COLUMNS}) FROM '{}' WITH (FORMAT binary)\n\\echo {MARKER}",
                path.display()
            )?;
            stdin.flush()?;
            in_flight.push_back(path);
            sent += 1;
        }
        let Some(oldest) = in_flight.front() else { break };
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("psql exited while copying {}", oldest.display());
        }
        if line.trim() == MARKER {
            rows += batch.rows as u64;
            landed.fetch_add(batch.rows as u64, Ordering::Relaxed);
            if let Ok(mut t) = last_commit.lock() {
                *t = t.max(t0.elapsed().as_secs_f64());
            }
            if let Some(done) = in_flight.pop_front() {
                let _ = fs::remove_file(done);
            }
        }
    }
    // End of input: psql quits.
    drop(stdin);
    Ok(rows)
}

/// A small deterministic generator for plausible coordinates; the data only has to look like the gateway's.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1_u64 << 53) as f64
    }
}

/// One batch in PostgreSQL's binary COPY format: header, `rows` tuples of the gateway's columns (the same
/// values the wrk scripts send, with `{"source":"wrk"}` as attributes), trailer. Device ids are unique
/// (`<prefix><i>`), so a unique key on `(device_id, recorded_at)` would take every row.
fn encode_batch(prefix: &str, rows: usize, rng: &mut XorShift) -> Vec<u8> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let now_pg_micros = (now.as_secs() as i64 - PG_EPOCH_UNIX_SECS) * 1_000_000 + i64::from(now.subsec_micros());
    // Whole seconds, as the wrk scripts send.
    let recorded_at = now_pg_micros - now_pg_micros % 1_000_000;
    let attributes = br#"{"source":"wrk"}"#;

    let mut out = Vec::with_capacity(19 + rows * 160 + 2);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0_i32.to_be_bytes()); // flags: no OIDs
    out.extend_from_slice(&0_i32.to_be_bytes()); // header extension length
    let field = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    for i in 0..rows {
        out.extend_from_slice(&9_i16.to_be_bytes());
        field(&mut out, format!("{prefix}{i}").as_bytes());
        field(&mut out, &recorded_at.to_be_bytes());
        field(&mut out, &(48.0 + rng.next_f64() * 6.0).to_be_bytes());
        field(&mut out, &(2.0 + rng.next_f64() * 12.0).to_be_bytes());
        field(&mut out, &(rng.next_f64() * 130.0).to_be_bytes());
        field(&mut out, &(rng.next_f64() * 359.9).to_be_bytes());
        field(&mut out, &(3.0 + (rng.next_f64() * 47.0).floor()).to_be_bytes());
        // jsonb's binary form: a version byte (1), then the JSON text.
        out.extend_from_slice(&(attributes.len() as i32 + 1).to_be_bytes());
        out.push(1);
        out.extend_from_slice(attributes);
        field(&mut out, &now_pg_micros.to_be_bytes());
    }
    out.extend_from_slice(&(-1_i16).to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_has_the_copy_header_one_tuple_per_row_and_the_trailer() {
        let bytes = encode_batch("d-", 3, &mut XorShift::new(1));
        assert!(bytes.starts_with(b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0"));
        assert!(bytes.ends_with(&[0xff, 0xff]));
        // Walk the tuples: each has 9 fields, each field a length and that many bytes.
        let mut at = 19;
        let mut tuples = 0;
        loop {
            let fields = i16::from_be_bytes([bytes[at], bytes[at + 1]]);
            at += 2;
            if fields == -1 {
                break;
            }
            assert_eq!(fields, 9);
            for _ in 0..fields {
                let len = i32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
                at += 4 + len as usize;
            }
            tuples += 1;
        }
        assert_eq!(tuples, 3);
        assert_eq!(at, bytes.len());
    }
}
