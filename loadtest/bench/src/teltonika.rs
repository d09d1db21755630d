//! The Teltonika variant's load generator: simulated units on the gateway's Teltonika TCP listener
//! (`INGEST_TELTONIKA_LISTEN`), run as a hidden subcommand of this binary so that its CPU is its own (reaped with
//! `wait4`, as wrk's is).
//!
//! Each unit opens a connection and is handshaken (two length bytes and its IMEI, answered `01`); then it sends
//! Codec 8 packets of [`RECORDS_PER_PACKET`] records — each record a new (IMEI, time) — and, as a real unit does,
//! waits for the gateway's answer (the record count, four bytes, sent once the records are durable) before the
//! next. The conversation with the benchmark, on stdin and stdout, lets it read the gateway's memory with every
//! connection open:
//!
//! 1. the generator connects and handshakes every unit, then prints `ready`;
//! 2. it reads a line (`go`), sends packets for the duration, and prints its [`LoadOutcome`] as one JSON line,
//!    connections still open;
//! 3. it closes them and exits when its stdin closes.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Simulated units, each its own TCP connection.
pub const UNITS: usize = 1000;
/// Records in each packet.
pub const RECORDS_PER_PACKET: usize = 10;
/// The generator's threads: two, as wrk's, so that it does not take every core from what it measures.
const THREADS: usize = 2;
/// Connections opened at once while the units come online.
const CONNECTING_AT_ONCE: usize = 100;
/// The longest wait for one answer (a handshake's or a packet's).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Records start this long before the run (well inside the gateway's 30 days) and are a millisecond apart
/// within each unit: the newest is still in the past after 3.6 million records of one unit.
const FIRST_RECORD_AGO_MS: i64 = 3_600_000;

/// What the generator saw, printed as one JSON line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadOutcome {
    /// Seconds from `go` until the last unit stopped (its last answer in, or given up).
    pub secs: f64,
    /// Packets sent.
    pub packets: u64,
    /// Packets answered with their record count.
    pub acked: u64,
    /// Packets answered with another count.
    pub wrong_answers: u64,
    /// Connections that failed, closed or timed out (each unit then connects and handshakes again).
    pub socket_errors: u64,
    /// From a packet's first byte written to its answer read.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The hidden subcommand: runs the units against `addr` and talks to the benchmark on stdin and stdout.
pub fn run_load(addr: SocketAddr, units: usize, duration_secs: u64) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS)
        .enable_all()
        .build()
        .context("could not start the generator's runtime")?;
    let first_ms = now_ms() - FIRST_RECORD_AGO_MS;
    let streams = runtime.block_on(connect_all(addr, units))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin.read_line(&mut line)?;
    if line.trim() != "go" {
        bail!("expected `go` on stdin, read {line:?}");
    }
    let (outcome, streams) = runtime.block_on(drive(addr, streams, first_ms, Duration::from_secs(duration_secs)));
    writeln!(stdout, "{}", serde_json::to_string(&outcome)?)?;
    stdout.flush()?;
    // Connections stay open until the benchmark has read the gateway's memory and closes our stdin.
    while stdin.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {}
    drop(streams);
    Ok(())
}

/// Unit `index`'s IMEI: fifteen digits.
fn imei(index: usize) -> String {
    format!("35{index:013}")
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

async fn connect_all(addr: SocketAddr, units: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut streams = Vec::with_capacity(units);
    for start in (0..units).step_by(CONNECTING_AT_ONCE) {
        let tasks: Vec<_> = (start..units.min(start + CONNECTING_AT_ONCE))
            .map(|i| tokio::spawn(connect(addr, imei(i))))
            .collect();
        for (i, task) in tasks.into_iter().enumerate() {
            let stream = task
                .await?
                .with_context(|| format!("unit {} could not connect to {addr}", start + i))?;
            streams.push(stream);
        }
    }
    Ok(streams)
}

/// Connects and handshakes; the connection once the gateway accepted the IMEI.
async fn connect(addr: SocketAddr, imei: String) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&handshake(&imei)).await?;
    let mut answer = [0u8; 1];
    tokio::time::timeout(ANSWER_TIMEOUT, stream.read_exact(&mut answer))
        .await
        .context("no answer to the handshake")??;
    if answer[0] != 0x01 {
        bail!("the gateway refused IMEI {imei} (answered {:#04x})", answer[0]);
    }
    Ok(stream)
}

/// One unit's tally.
#[derive(Default)]
struct UnitOutcome {
    packets: u64,
    acked: u64,
    wrong_answers: u64,
    socket_errors: u64,
    /// Microseconds from each acknowledged packet's write to its answer.
    latencies_us: Vec<u32>,
}

async fn drive(
    addr: SocketAddr,
    streams: Vec<TcpStream>,
    first_ms: i64,
    duration: Duration,
) -> (LoadOutcome, Vec<TcpStream>) {
    let start = Instant::now();
    let deadline = Arc::new(start + duration);
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(index, stream)| tokio::spawn(unit(addr, index, stream, first_ms, deadline.clone())))
        .collect();
    let mut total = UnitOutcome::default();
    let mut streams = Vec::with_capacity(tasks.len());
    for task in tasks {
        let Ok((outcome, stream)) = task.await else {
            total.socket_errors += 1;
            continue;
        };
        total.packets += outcome.packets;
        total.acked += outcome.acked;
        total.wrong_answers += outcome.wrong_answers;
        total.socket_errors += outcome.socket_errors;
        total.latencies_us.extend(outcome.latencies_us);
        streams.extend(stream);
    }
    let secs = start.elapsed().as_secs_f64();
    total.latencies_us.sort_unstable();
    let (p50, p99, max) = (
        percentile_ms(&total.latencies_us, 0.50),
        percentile_ms(&total.latencies_us, 0.99),
        total.latencies_us.last().map_or(0.0, |us| f64::from(*us) / 1000.0),
    );
    let outcome = LoadOutcome {
        secs,
        packets: total.packets,
        acked: total.acked,
        wrong_answers: total.wrong_answers,
        socket_errors: total.socket_errors,
        p50_ms: p50,
        p99_ms: p99,
        max_ms: max,
    };
    (outcome, streams)
}

/// A unit: a packet, its answer, the next, until the deadline; the connection again after a failure.
async fn unit(
    addr: SocketAddr,
    index: usize,
    stream: TcpStream,
    first_ms: i64,
    deadline: Arc<Instant>,
) -> (UnitOutcome, Option<TcpStream>) {
    let imei = imei(index);
    let mut out = UnitOutcome::default();
    let mut stream = Some(stream);
    // Spread over the units, so that no two send the same position.
    let (lat, lon) = (481_523_066 + index as i32 * 1_000, 163_745_183 - index as i32 * 1_000);
    let mut next_ms = first_ms;
    let mut packet = Vec::with_capacity(64 + RECORDS_PER_PACKET * 64);
    let mut answer = [0u8; 4];
    while Instant::now() < *deadline {
        let mut connection = match stream.take() {
            Some(s) => s,
            None => match connect(addr, imei.clone()).await {
                Ok(s) => s,
                Err(_) => {
                    out.socket_errors += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Every record a new time, whether or not the packet is answered: a resend is never a retry here.
        encode(&mut packet, next_ms, lat, lon, RECORDS_PER_PACKET);
        next_ms += RECORDS_PER_PACKET as i64;
        let sent = Instant::now();
        out.packets += 1;
        let exchange = async {
            connection.write_all(&packet).await?;
            connection.read_exact(&mut answer).await
        };
        match tokio::time::timeout(ANSWER_TIMEOUT, exchange).await {
            Ok(Ok(_)) => {
                if u32::from_be_bytes(answer) as usize == RECORDS_PER_PACKET {
                    out.acked += 1;
                    let us = sent.elapsed().as_micros();
                    out.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                } else {
                    out.wrong_answers += 1;
                }
                stream = Some(connection);
            }
            _ => out.socket_errors += 1,
        }
    }
    (out, stream)
}

/// The handshake of `imei`: its length in two bytes, then its digits.
pub fn handshake(imei: &str) -> Vec<u8> {
    let mut bytes = (imei.len() as u16).to_be_bytes().to_vec();
    bytes.extend_from_slice(imei.as_bytes());
    bytes
}

/// Writes into `packet` a Codec 8 packet of `records` records, a millisecond apart from `first_ms`, with the IO
/// elements units send most (ignition, movement, battery level, external voltage, odometer), as
/// `tests/api/teltonika.rs` encodes them.
pub fn encode(packet: &mut Vec<u8>, first_ms: i64, lat: i32, lon: i32, records: usize) {
    packet.clear();
    packet.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    packet.push(0x08);
    packet.push(records as u8);
    for i in 0..records {
        let speed = (i % 120) as u16;
        packet.extend_from_slice(&(first_ms + i as i64).to_be_bytes());
        packet.push(0); // priority
        packet.extend_from_slice(&(lon - i as i32).to_be_bytes());
        packet.extend_from_slice(&(lat + i as i32).to_be_bytes());
        packet.extend_from_slice(&120i16.to_be_bytes()); // altitude
        packet.extend_from_slice(&((i % 360) as u16).to_be_bytes()); // angle
        packet.push(12); // satellites
        packet.extend_from_slice(&speed.to_be_bytes());
        packet.extend_from_slice(&[0, 5, 3]); // event IO id, IO elements in all, 1-byte elements
        packet.extend_from_slice(&[239, 1, 240, u8::from(speed > 0), 113, 87]);
        packet.extend_from_slice(&[1, 66]); // 2-byte elements: external voltage
        packet.extend_from_slice(&12_874u16.to_be_bytes());
        packet.extend_from_slice(&[1, 16]); // 4-byte elements: odometer
        packet.extend_from_slice(&(1_000 * i as u32).to_be_bytes());
        packet.push(0); // 8-byte elements
    }
    packet.push(records as u8);
    let data_len = packet.len() - 8;
    packet[4..8].copy_from_slice(&(data_len as u32).to_be_bytes());
    let crc = crc16_ibm(&packet[8..]);
    packet.extend_from_slice(&u32::from(crc).to_be_bytes());
}

/// CRC-16/IBM: polynomial 0x8005 reflected (0xA001), initial value 0, no final XOR.
pub fn crc16_ibm(data: &[u8]) -> u16 {
    let mut crc = 0u16;
    for byte in data {
        crc ^= u16::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
        }
    }
    crc
}

fn percentile_ms(sorted_us: &[u32], share: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let at = ((sorted_us.len() as f64 * share).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[at]) / 1000.0
}

/// The generator as the benchmark runs it: started, handshaken, driven, read.
pub struct Loader {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Loader {
    /// Starts the generator (this binary's hidden subcommand) and waits until every unit is handshaken.
    pub fn start(self_exe: &std::path::Path, addr: SocketAddr, duration_secs: u64) -> anyhow::Result<Loader> {
        let mut command = std::process::Command::new(self_exe);
        command
            .arg("teltonika-load")
            .args(["--addr", &addr.to_string()])
            .args(["--units", &UNITS.to_string()])
            .args(["--duration", &duration_secs.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        ingest_gateway::support::process::die_with_parent(&mut command, libc::SIGKILL);
        let mut child = command
            .spawn()
            .context("could not start the Teltonika load generator")?;
        let stdin = child.stdin.take();
        let stdout = std::io::BufReader::new(child.stdout.take().context("no stdout")?);
        let mut loader = Loader { child, stdin, stdout };
        let line = loader.line()?;
        if line != "ready" {
            bail!("the Teltonika load generator did not get its units online: {line:?}");
        }
        Ok(loader)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the Teltonika load generator exited early (its error is above)");
        }
        Ok(line.trim().to_owned())
    }

    /// Sends `go` and waits for the load's end; the connections are still open after it.
    pub fn run(&mut self) -> anyhow::Result<LoadOutcome> {
        let stdin = self.stdin.as_mut().context("the generator's stdin is closed")?;
        writeln!(stdin, "go")?;
        stdin.flush()?;
        let line = self.line()?;
        serde_json::from_str(&line).with_context(|| format!("could not read the generator's outcome {line:?}"))
    }

    /// Closes the connections (the generator exits) and returns its CPU seconds.
    pub fn finish(mut self) -> anyhow::Result<f64> {
        drop(self.stdin.take());
        let usage =
            crate::procs::reap(self.child.id(), true)?.context("the Teltonika load generator was not reaped")?;
        Ok(usage.cpu_secs)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Only on an error path: `finish` has reaped it otherwise, and a kill then fails harmlessly.
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_codec_8_with_their_length_count_and_crc() {
        let mut packet = Vec::new();
        encode(
            &mut packet,
            1_700_000_000_000,
            481_523_066,
            163_745_183,
            RECORDS_PER_PACKET,
        );
        assert_eq!(&packet[..4], &[0, 0, 0, 0]);
        let length = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]) as usize;
        assert_eq!(packet.len(), 8 + length + 4);
        let data = &packet[8..8 + length];
        assert_eq!((data[0], data[1]), (0x08, RECORDS_PER_PACKET as u8));
        assert_eq!(data[length - 1], RECORDS_PER_PACKET as u8);
        let crc = u32::from_be_bytes(packet[packet.len() - 4..].try_into().unwrap());
        assert_eq!(crc, u32::from(crc16_ibm(data)));
    }

    #[test]
    fn the_gateway_reads_every_record_with_its_own_time() {
        let mut packet = Vec::new();
        encode(
            &mut packet,
            1_700_000_000_000,
            481_523_066,
            163_745_183,
            RECORDS_PER_PACKET,
        );
        let decoded = ingest_gateway::model::tracker::teltonika::decode_packet(&packet, &imei(7)).unwrap();
        assert_eq!(decoded.fixes.len(), RECORDS_PER_PACKET);
        let times: std::collections::BTreeSet<_> = decoded.fixes.iter().map(|f| f.recorded_at).collect();
        assert_eq!(times.len(), RECORDS_PER_PACKET);
        assert!(decoded.fixes.iter().all(|f| f.lat.is_some() && f.device_id == imei(7)));
    }

    #[test]
    fn the_crc_is_crc_16_ibm() {
        // The check value of CRC-16/ARC.
        assert_eq!(crc16_ibm(b"123456789"), 0xBB3D);
    }

    #[test]
    fn percentiles_are_taken_from_the_sorted_latencies() {
        let us: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&us, 0.5), 50.0);
        assert_eq!(percentile_ms(&us, 0.99), 99.0);
        assert_eq!(percentile_ms(&[], 0.99), 0.0);
    }
}
