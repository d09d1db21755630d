//! The Unix-socket listener, for senders on the same host: a request over the socket is taken like one over TCP,
//! the socket file gets the configured mode, and it is gone once the gateway stops.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::helpers::{eventually, location_json, spawn_app};

/// Sends one HTTP/1.1 request over the socket at `path`; returns the status and the body.
fn post_over_socket(path: &Path, route: &str, body: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(path).expect("connect to the gateway's socket");
    write!(
        stream,
        "POST {route} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[test]
fn an_update_sent_over_the_unix_socket_gets_its_202_and_lands() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gateway.sock");
    let mut app = spawn_app(|s| {
        s.http.listen = format!("127.0.0.1:0,unix:{}", socket.display());
        s.http.socket_mode = 0o600;
    });

    let (status, body) = post_over_socket(&socket, "/api/v1/location/update", &location_json("over-socket"));

    assert_eq!(status, 202, "{body}");
    assert_eq!(body, r#"{"accepted":1}"#);
    eventually("the update lands", Duration::from_secs(10), || {
        app.db.count("location_updates") == 1
    });
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(app.get("/healthz").status, 200, "TCP is served alongside");
    assert!(app.stop().is_clean());
    assert!(!socket.exists(), "the socket file is removed at exit");
}
