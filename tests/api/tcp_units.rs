//! What the TCP tracker tests (Teltonika, GT06) share: a series of the gateway's metrics by protocol and reason,
//! and whether the gateway closed a unit's connection.

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::time::Duration;

use crate::helpers::TestApp;

/// A series' value in the gateway's `/metrics`, such as
/// `ingest_tcp_bad_packets_total{protocol="teltonika",reason="bad_crc"}`; 0 when it is not there.
pub fn metric(app: &TestApp, series: &str) -> f64 {
    app.get("/metrics")
        .body
        .lines()
        .find_map(|line| line.strip_prefix(series).and_then(|value| value.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// The series of metric `name` for `protocol` and `reason`.
pub fn series(name: &str, protocol: &str, reason: &str) -> String {
    format!("{name}{{protocol=\"{protocol}\",reason=\"{reason}\"}}")
}

/// Whether the gateway closed the connection within `wait`, having sent nothing more.
pub fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut answer = [0u8; 16];
    match stream.read(&mut answer) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
        ),
    }
}
