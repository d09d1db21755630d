//! The body budget grows only with the bytes that arrive, and limits come before work: hundreds of connections
//! that declare large bodies and trickle them cannot crowd an honest client out, a client over its rate is refused
//! before its body is read, every request costs its client at least one token, and repeated 401s from one address
//! are refused before any key is looked up.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest_gateway::config::RateLimit;

use crate::attack::{head, socket_address, status_of, LOCATION, MIB};
use crate::helpers::{
    connection_string, eventually, fresh_database, location_array, location_json, now_rfc3339, shared_cluster,
    spawn_app, GatewayProcess,
};

/// The gateway binary on a database of its own, believing `X-Forwarded-For` from the test (its proxy), with
/// `envs` on top.
fn gateway_behind_a_proxy(envs: &[(&str, String)]) -> (GatewayProcess, tempfile::TempDir) {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let data_dir = tempfile::tempdir().unwrap();
    let mut all = vec![
        ("DATABASE_URL", connection_string(&cluster.config(&name))),
        ("INGEST_DATA_DIR", data_dir.path().display().to_string()),
        ("INGEST_TRUSTED_PROXIES", "127.0.0.1".to_owned()),
    ];
    all.extend(envs.iter().cloned());
    (GatewayProcess::start(&all), data_dir)
}

/// One connection of the trickling attacker: a request head declaring `declared` bytes, then 1,100 bytes a second,
/// just above the gateway's minimum rate.
struct Trickle {
    stream: TcpStream,
    declared: usize,
    sent: usize,
}

const ATTACKER: &str = "X-Forwarded-For: 203.0.113.66";
const TRICKLE_BYTES: usize = 1100;

impl Trickle {
    fn open(address: &str, declared: usize) -> Option<Trickle> {
        let mut stream = TcpStream::connect(socket_address(address)).ok()?;
        stream
            .write_all(head(LOCATION, declared, &[ATTACKER.to_owned()]).as_bytes())
            .ok()?;
        stream.set_nonblocking(true).ok()?;
        Some(Trickle {
            stream,
            declared,
            sent: 0,
        })
    }

    /// Sends the next second's bytes; false once the gateway answered or closed the connection.
    fn tick(&mut self) -> bool {
        let mut answer = [0u8; 512];
        match self.stream.read(&mut answer) {
            Ok(_) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
        let n = TRICKLE_BYTES.min(self.declared - self.sent);
        match self.stream.write(&vec![b' '; n]) {
            Ok(written) => {
                self.sent += written;
                self.sent < self.declared
            }
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        }
    }
}

/// The trickling attack: 40 connections declaring 8 MiB, 200 declaring 40 kB and 400 declaring 17 kB, each
/// trickling ~1.1 KB/s; a connection the gateway ends is opened again at the next second. `trickling` is set once
/// every connection is open and has sent its first second's bytes.
fn trickle_attack(
    address: String,
    stop: Arc<AtomicBool>,
    trickling: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let sizes: Vec<usize> = std::iter::repeat_n(8 * MIB as usize, 40)
            .chain(std::iter::repeat_n(40_000, 200))
            .chain(std::iter::repeat_n(17_000, 400))
            .collect();
        let mut open: Vec<Option<Trickle>> = sizes.iter().map(|&size| Trickle::open(&address, size)).collect();
        let mut reopened = 0;
        while !stop.load(Ordering::Relaxed) {
            let tick = Instant::now();
            for (slot, &size) in open.iter_mut().zip(&sizes) {
                if !slot.as_mut().is_some_and(Trickle::tick) {
                    *slot = Trickle::open(&address, size);
                    reopened += 1;
                }
            }
            trickling.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
        }
        reopened
    })
}

/// A valid update padded with blanks to 20 KiB: more than the bytes of a request that the budget leaves out.
fn honest_body() -> String {
    let update = location_json("honest");
    format!("{update}{}", " ".repeat(20 * 1024 - update.len()))
}

#[test]
fn trickled_bodies_declaring_large_lengths_cannot_hold_the_budget_and_an_honest_client_keeps_its_202() {
    let (gateway, _data_dir) = gateway_behind_a_proxy(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let trickling = Arc::new(AtomicBool::new(false));
    let attack = trickle_attack(gateway.address.clone(), stop.clone(), trickling.clone());
    // The attacker's connections are all open and trickling before the honest client starts.
    eventually("the attack trickles", Duration::from_secs(120), || {
        trickling.load(Ordering::SeqCst)
    });

    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
    let url = format!("{}{LOCATION}", gateway.address);
    let mut statuses = Vec::new();
    // A fixed number of requests, ten a second at most: some 15 s of the attack, longer on a slow machine.
    for _ in 0..150 {
        let status = match agent
            .post(&url)
            .set("Content-Type", "application/json")
            .set("X-Forwarded-For", "198.51.100.20")
            .send_string(&honest_body())
        {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("{e}"),
        };
        statuses.push(status);
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let reopened = attack.join().unwrap();

    let accepted = statuses.iter().filter(|s| **s == 202).count();
    let mut others = statuses.clone();
    others.retain(|s| *s != 202);
    others.sort_unstable();
    others.dedup();
    eprintln!(
        "640 trickling connections ({reopened} reopened): the honest client's 20 KiB requests got 202 for \
         {accepted} of {} ({:.1} %), otherwise {others:?}",
        statuses.len(),
        100.0 * accepted as f64 / statuses.len() as f64,
    );
    assert!(
        accepted * 100 >= statuses.len() * 99,
        "{accepted} of {} accepted",
        statuses.len()
    );
}

/// A body of about 8 MiB holding 8,500 valid updates.
fn valid_8_mib_body() -> Vec<u8> {
    let at = now_rfc3339();
    let pad = "p".repeat(860);
    let updates: Vec<String> = (0..8_500)
        .map(|i| format!(r#"{{"device_id":"big-{i}","recorded_at":"{at}","lat":1,"lon":2,"pad":"{pad}"}}"#))
        .collect();
    let body = format!("[{}]", updates.join(","));
    assert!(
        body.len() > 7 * MIB as usize && body.len() < 8 * MIB as usize,
        "{}",
        body.len()
    );
    body.into_bytes()
}

/// Sends `body` after its head, the first 256 KiB slowly (1 KiB a millisecond) and the rest at once, and stops as
/// soon as an answer comes: the answer, and how many bytes of the body had been sent when it came (an upper bound
/// on what the gateway read of it; the rest of them were in the sockets' buffers).
fn send_until_answered(address: &str, headers: &[String], body: &[u8]) -> (Vec<u8>, usize) {
    let mut stream = TcpStream::connect(socket_address(address)).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicBool::new(false));
    let (sent_seen, answered_seen) = (sent.clone(), answered.clone());
    let read = std::thread::spawn(move || {
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        let mut sent_then = None;
        loop {
            match reader.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    sent_then.get_or_insert_with(|| sent_seen.load(Ordering::SeqCst));
                    answered_seen.store(true, Ordering::SeqCst);
                    answer.extend_from_slice(&buffer[..n]);
                }
            }
        }
        (answer, sent_then.unwrap_or(usize::MAX))
    });
    stream
        .write_all(head(LOCATION, body.len(), headers).as_bytes())
        .unwrap();
    for chunk in body.chunks(1024) {
        if answered.load(Ordering::SeqCst) {
            break;
        }
        if stream.write_all(chunk).is_err() {
            break;
        }
        let total = sent.fetch_add(chunk.len(), Ordering::SeqCst) + chunk.len();
        if total < 256 * 1024 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    read.join().unwrap()
}

#[test]
fn a_client_over_its_rate_gets_429_before_the_gateway_reads_64_kib_of_its_8_mib_body() {
    let (gateway, _data_dir) = gateway_behind_a_proxy(&[("INGEST_RATE_LIMIT_PER_ADDRESS", "1:10000".to_owned())]);
    let client = "198.51.100.30";
    let post = |body: &str| {
        crate::attack::send_whole(
            &gateway.address,
            LOCATION,
            &[format!("X-Forwarded-For: {client}")],
            body.as_bytes(),
        )
    };
    let body = valid_8_mib_body();
    // The whole burst at once, then single updates until the rate refuses one: the allowance is empty. The rate
    // gives a token back every second, so a machine that stalls for a second between the refusal and the large
    // request lets that one in: the refusal is then made again and the request sent at once after it.
    assert_eq!(post(&location_array("burst", 10_000)), Some(202));
    let mut attempts = 0;
    let (answer, sent) = loop {
        attempts += 1;
        let mut singles = 0;
        while post(&location_json(&format!("single-{attempts}-{singles}"))) != Some(429) {
            singles += 1;
            assert!(singles < 10, "the rate never refused");
        }
        let (answer, sent) = send_until_answered(&gateway.address, &[format!("X-Forwarded-For: {client}")], &body);
        if (status_of(&answer) == Some(429) && sent < 64 * 1024) || attempts == 5 {
            break (answer, sent);
        }
    };

    let status = status_of(&answer);
    eprintln!(
        "over its rate, a {:.1} MiB body got {status:?} when {} KiB of it had been sent",
        body.len() as f64 / MIB as f64,
        sent / 1024
    );
    assert_eq!(status, Some(429), "{}", String::from_utf8_lossy(&answer));
    assert!(
        crate::attack::header_of(&answer, "Retry-After").is_some(),
        "a 429 says when to come back"
    );
    assert!(sent < 64 * 1024, "{sent} bytes of the body were sent before the answer");
}

#[test]
fn every_request_costs_a_token_even_when_its_body_is_refused() {
    let app = spawn_app(|s| s.auth.rate_limit_per_address = Some("1:3".parse::<RateLimit>().unwrap()));
    let too_many = format!("[{}]", vec!["{}"; 10_001].join(","));

    let not_json = app.post_json(LOCATION, "[{");
    let empty = app.post_json(LOCATION, "[]");
    let over_the_update_limit = app.post_json(LOCATION, &too_many);
    let valid = app.post_json(LOCATION, &location_json("after-three-refusals"));

    assert_eq!(
        (not_json.status, empty.status, over_the_update_limit.status),
        (400, 202, 413)
    );
    assert_eq!(valid.status, 429, "{}", valid.body);
    assert_eq!(valid.json()["error"], "rate_limited");
}

fn write_keys_file(dir: &tempfile::TempDir, key: &str) -> std::path::PathBuf {
    let path = dir.path().join("keys");
    let line = format!("fleet {} streams=location\n", ingest_gateway::keys_file::hashed(key));
    std::fs::write(&path, line).unwrap();
    path
}

#[test]
fn repeated_unknown_keys_from_one_address_get_429_before_any_key_is_looked_up() {
    let dir = tempfile::tempdir().unwrap();
    let good = format!("igk_{}", "7".repeat(64));
    let keys = write_keys_file(&dir, &good);
    let app = spawn_app(|s| {
        s.auth.api_keys_file = Some(keys);
        s.auth.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    });
    let post = |key: &str, client: &str| {
        app.post(
            LOCATION,
            location_json("guessed").as_bytes(),
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &format!("Bearer {key}")),
                ("X-Forwarded-For", client),
            ],
        )
    };
    let guesser = "198.51.100.40";

    let mut guesses = Vec::new();
    for i in 0..40 {
        guesses.push(post(&format!("igk_{i:064}"), guesser).status);
    }
    let good_key_from_the_guesser = post(&good, guesser);
    let good_key_from_elsewhere = post(&good, "198.51.100.41");

    let unauthorized = guesses.iter().filter(|s| **s == 401).count();
    eprintln!(
        "40 wrong keys from one address: {unauthorized} got 401, then {:?}",
        &guesses[unauthorized..]
    );
    assert_eq!(unauthorized, 30, "{guesses:?}");
    assert!(guesses[unauthorized..].iter().all(|s| *s == 429), "{guesses:?}");
    assert_eq!(
        good_key_from_the_guesser.status, 429,
        "{}",
        good_key_from_the_guesser.body
    );
    let retry_after: u64 = good_key_from_the_guesser
        .retry_after
        .as_deref()
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(good_key_from_elsewhere.status, 202, "{}", good_key_from_elsewhere.body);
}

/// Opens a connection from `client` declaring `declared` bytes and sends `sent` of them: the answer if one comes
/// within a second, and the connection (kept open, and so its body held) when none does.
fn hold_body(address: &str, client: &str, declared: usize, sent: usize) -> (Option<Vec<u8>>, TcpStream) {
    let mut stream = TcpStream::connect(socket_address(address)).unwrap();
    let forwarded = [format!("X-Forwarded-For: {client}")];
    let _ = stream
        .write_all(head(LOCATION, declared, &forwarded).as_bytes())
        .and_then(|()| stream.write_all(&vec![b' '; sent]));
    stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut answer = vec![0u8; 4096];
    match stream.read(&mut answer) {
        Ok(n) if n > 0 => {
            answer.truncate(n);
            (Some(answer), stream)
        }
        _ => (None, stream),
    }
}

#[test]
fn one_client_past_its_share_of_the_body_budget_gets_503_while_another_gets_in() {
    let app = spawn_app(|s| {
        s.limits.max_body_bytes = MIB as usize;
        s.limits.max_updates = 1000;
        s.limits.max_inflight_body_bytes = 64 * MIB as usize;
        s.auth.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    });
    // A client may hold a tenth of the budget, or room for the largest request when that is more: a few bodies.
    let share = app.state().body_budget.holder_max_bytes();
    assert!(share < 8 * MIB as usize, "{share}");
    // What a body of 1 MiB takes, once the first bytes that every request may hold for free are past.
    let fits = share / (MIB as usize - 16 * 1024);
    let hoarder = "203.0.113.9";

    let held: Vec<_> = (0..fits + 2)
        .map(|_| hold_body(&app.address, hoarder, MIB as usize, 900 * 1024))
        .collect();
    let honest_update = location_json("past-the-hoarder");
    let honest_body = format!("{honest_update}{}", " ".repeat(900 * 1024));
    let honest = app.post(
        LOCATION,
        honest_body.as_bytes(),
        &[
            ("Content-Type", "application/json"),
            ("X-Forwarded-For", "198.51.100.50"),
        ],
    );

    let refused: Vec<&Vec<u8>> = held.iter().filter_map(|(answer, _)| answer.as_ref()).collect();
    eprintln!(
        "one client sending {} bodies of 900 KiB: {} held, {} refused; another client: {}",
        held.len(),
        held.len() - refused.len(),
        refused.len(),
        honest.status
    );
    assert_eq!(
        held.len() - refused.len(),
        fits,
        "as many bodies as fit the client's share"
    );
    for answer in refused {
        assert_eq!(status_of(answer), Some(503), "{}", String::from_utf8_lossy(answer));
        assert!(
            crate::attack::header_of(answer, "Retry-After").is_some(),
            "a 503 says when to come back"
        );
    }
    assert_eq!(honest.status, 202, "{}", honest.body);
    drop(held);
}
