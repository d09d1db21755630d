//! An attacker's tools, for the tests that try the gateway binary as one: raw HTTP/1.1 over a socket (any declared
//! length, at any pace, from any forwarded address), the process's memory as `/proc` tells it, and latency
//! percentiles.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const LOCATION: &str = "/api/v1/location/update";
pub const MIB: u64 = 1024 * 1024;

/// A field of `/proc/<pid>/status` in KiB: `VmRSS` (resident now) or `VmHWM` (the most it ever was).
pub fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the gateway runs");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// `host:port` of an `http://` address.
pub fn socket_address(address: &str) -> String {
    address.trim_start_matches("http://").to_owned()
}

/// A request head for `path` declaring `content_length`, with `headers` (`Name: value` lines without the end).
pub fn head(path: &str, content_length: usize, headers: &[String]) -> String {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n"
    );
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head
}

/// The status of a raw HTTP answer, once its status line is in.
pub fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|b| *b == b'\n').next()?;
    std::str::from_utf8(line).ok()?.split_whitespace().nth(1)?.parse().ok()
}

/// The value of `name` in a raw HTTP answer's head, if the answer has that header.
pub fn header_of(answer: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(answer);
    let head = text.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// Sends a whole request on a connection of its own, then reads the answer to its end: its status, or `None`
/// when the gateway cut the connection before answering (an early refusal may do that while the body is still
/// being sent).
pub fn send_whole(address: &str, path: &str, headers: &[String], body: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(socket_address(address)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let mut headers = headers.to_vec();
    headers.push("Connection: close".to_owned());
    let sent = stream
        .write_all(head(path, body.len(), &headers).as_bytes())
        .and_then(|()| stream.write_all(body));
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    match status_of(&answer) {
        Some(status) => Some(status),
        None if sent.is_err() => None,
        None => panic!("the gateway closed a whole request without an answer"),
    }
}

/// Durations sorted, for their percentiles.
pub struct Latencies(pub Vec<Duration>);

impl Latencies {
    pub fn new(mut all: Vec<Duration>) -> Self {
        all.sort();
        Latencies(all)
    }

    /// The `p`th percentile (0–100).
    pub fn percentile(&self, p: usize) -> Duration {
        assert!(!self.0.is_empty(), "no latency was measured");
        self.0[(self.0.len() - 1) * p / 100]
    }
}

/// Asks `/healthz` every `every` until `stop`; returns each answer's latency, or panics naming a failed one.
pub fn probe_healthz(address: &str, every: Duration, stop: Arc<AtomicBool>) -> JoinHandle<Vec<Duration>> {
    let url = format!("{address}/healthz");
    std::thread::spawn(move || {
        // A connection per probe, as a load balancer's health check makes: a kept-alive one would hide a full
        // accept queue.
        let mut latencies = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let answer = ureq::get(&url).timeout(Duration::from_secs(30)).call();
            let took = started.elapsed();
            match answer {
                Ok(r) if r.status() == 200 => latencies.push(took),
                Ok(r) => panic!("/healthz answered {}", r.status()),
                Err(e) => panic!("/healthz failed after {took:?}: {e}"),
            }
            std::thread::sleep(every.saturating_sub(took));
        }
        latencies
    })
}
