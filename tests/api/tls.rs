//! TLS against real processes: HTTPS with certificates the tests make, mutual TLS, a new certificate served after
//! SIGHUP on a running gateway without dropping a connection, broken files refused at start and kept out on a
//! reload; and TLS to a PostgreSQL that the test has take TLS connections on TCP.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ingest_gateway::db::{DatabaseUrl, EmbeddedPostgres};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::helpers::{
    connection_string, eventually, free_port, fresh_database, gateway_command, location_json, shared_cluster,
    spawn_app, spawn_app_on, Db, GatewayProcess,
};

/// A certificate authority made for one test.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (a server's, or with `client` a client's) and its key, both PEM.
    fn certificate_for(&self, names: &[&str], client: bool) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (certificate.pem(), key.serialize_pem())
    }

    /// Writes a server certificate for localhost into `dir` as `<stem>.pem` and `<stem>.key`.
    fn write_server(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.certificate_for(&["localhost", "127.0.0.1"], false);
        let (cert_path, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        (cert_path, key_path)
    }
}

/// One HTTPS connection to a gateway, kept open across requests (keep-alive).
struct Https {
    tls: ClientConnection,
    socket: TcpStream,
}

impl Https {
    /// Connects to `port` on 127.0.0.1 as a client that trusts `ca_pem` and presents `client` (certificate and key
    /// PEM) when given, and completes the handshake.
    fn connect(port: u16, ca_pem: &str, client: Option<&(String, String)>) -> io::Result<Https> {
        let mut roots = RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(certificate.unwrap()).unwrap();
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(cert.as_bytes())
                        .collect::<Result<_, _>>()
                        .unwrap(),
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let mut tls = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
        let mut socket = TcpStream::connect(("127.0.0.1", port))?;
        socket.set_read_timeout(Some(Duration::from_secs(10)))?;
        while tls.is_handshaking() {
            tls.complete_io(&mut socket)?;
        }
        Ok(Https { tls, socket })
    }

    /// Sends one request and reads its answer; returns the status. A handshake the server refused shows here (with
    /// TLS 1.3 the server judges the client's certificate after the client has finished its side).
    fn request(&mut self, method: &str, path: &str, body: &str) -> io::Result<u16> {
        let mut stream = rustls::Stream::new(&mut self.tls, &mut self.socket);
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        stream.flush()?;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            answer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&answer[..head_end]).to_ascii_lowercase();
        let status = head[9..12].parse().expect("a status code");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while answer.len() < head_end + length {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            answer.extend_from_slice(&chunk[..n]);
        }
        Ok(status)
    }

    /// Why the server ended the connection right after the handshake: with TLS 1.3 it judges the client's
    /// certificate once the client has finished its side, and says so with an alert. (A request sent first could
    /// meet the closed socket instead of the alert.)
    fn refusal(mut self) -> String {
        let mut byte = [0u8; 1];
        match rustls::Stream::new(&mut self.tls, &mut self.socket).read(&mut byte) {
            Ok(n) => panic!("the server went on ({n} bytes)"),
            Err(e) => e.to_string(),
        }
    }

    /// The certificate the server presented.
    fn served_certificate(&self) -> CertificateDer<'static> {
        self.tls.peer_certificates().expect("a finished handshake")[0].clone()
    }
}

fn port_of(address: &str) -> u16 {
    address.rsplit(':').next().unwrap().parse().unwrap()
}

fn first_certificate(pem_path: &Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(pem_path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
}

#[test]
fn https_takes_updates_with_a_certificate_the_client_trusts() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test server CA");
    let (cert, key) = ca.write_server(dir.path(), "server");
    let app = spawn_app(|s| {
        s.http.tls_cert = Some(cert.clone());
        s.http.tls_key = Some(key.clone());
    });
    let port = port_of(&app.address);

    let mut https = Https::connect(port, &ca.pem(), None).expect("the handshake succeeds");
    assert_eq!(https.served_certificate(), first_certificate(&cert));
    assert_eq!(
        https
            .request("POST", "/api/v1/location/update", &location_json("tls-1"))
            .unwrap(),
        202
    );
    assert_eq!(
        https.request("GET", "/healthz", "").unwrap(),
        200,
        "the connection is kept"
    );
    eventually("the update lands", Duration::from_secs(10), || {
        app.db.count("location_updates") == 1
    });

    // A client of another CA does not trust the gateway.
    let stranger = Ca::new("another CA");
    assert!(Https::connect(port, &stranger.pem(), None).is_err());
}

#[test]
fn with_a_client_ca_only_clients_with_a_certificate_it_signed_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("test server CA");
    let (cert, key) = server_ca.write_server(dir.path(), "server");
    let client_ca = Ca::new("test client CA");
    let client_ca_path = dir.path().join("clients.pem");
    std::fs::write(&client_ca_path, client_ca.pem()).unwrap();
    let app = spawn_app(|s| {
        s.http.tls_cert = Some(cert.clone());
        s.http.tls_key = Some(key.clone());
        s.http.tls_client_ca = Some(client_ca_path.clone());
    });
    let port = port_of(&app.address);
    let update = location_json("mtls-1");

    let mut with_certificate = Https::connect(
        port,
        &server_ca.pem(),
        Some(&client_ca.certificate_for(&["truck-1"], true)),
    )
    .unwrap();
    assert_eq!(
        with_certificate
            .request("POST", "/api/v1/location/update", &update)
            .unwrap(),
        202
    );

    let without = Https::connect(port, &server_ca.pem(), None).map_or_else(|e| e.to_string(), Https::refusal);
    assert!(
        without.contains("CertificateRequired"),
        "no client certificate, no request: {without}"
    );

    let other = Ca::new("a CA the gateway does not know").certificate_for(&["truck-2"], true);
    let stranger = Https::connect(port, &server_ca.pem(), Some(&other)).map_or_else(|e| e.to_string(), Https::refusal);
    assert!(
        stranger.contains("alert"),
        "a certificate of another CA is refused: {stranger}"
    );

    eventually("the accepted update lands", Duration::from_secs(10), || {
        app.db.count("location_updates") == 1
    });
    assert_eq!(app.db.device_ids(), [("mtls-1".to_owned(), 1)]);
}

#[test]
fn sighup_serves_a_new_certificate_keeps_open_connections_and_keeps_the_old_one_when_the_new_files_are_broken() {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test server CA");
    let (cert, key) = ca.write_server(dir.path(), "server");
    let gateway = GatewayProcess::start(&[
        ("DATABASE_URL", connection_string(&cluster.config(&name))),
        ("INGEST_TLS_CERT", cert.display().to_string()),
        ("INGEST_TLS_KEY", key.display().to_string()),
    ]);
    let port = port_of(&gateway.address);
    let mut open = Https::connect(port, &ca.pem(), None).unwrap();
    let first = open.served_certificate();
    assert_eq!(first, first_certificate(&cert));

    // Renewed files, moved into place the way a certificate manager does, then SIGHUP.
    let (new_cert, new_key) = ca.write_server(dir.path(), "renewed");
    let renewed = first_certificate(&new_cert);
    std::fs::rename(&new_cert, &cert).unwrap();
    std::fs::rename(&new_key, &key).unwrap();
    assert!(gateway.reload("tls certificates"), "the renewed files are taken");
    assert_eq!(
        Https::connect(port, &ca.pem(), None).unwrap().served_certificate(),
        renewed
    );
    assert_eq!(
        open.request("POST", "/api/v1/location/update", &location_json("before-reload"))
            .unwrap(),
        202,
        "a connection opened before the reload goes on"
    );

    // A broken key: the reload fails and the renewed certificate stays.
    std::fs::write(&key, "not a key").unwrap();
    assert!(!gateway.reload("tls certificates"), "the broken key is refused");
    let mut after = Https::connect(port, &ca.pem(), None).expect("still serving");
    assert_eq!(after.served_certificate(), renewed);
    assert_eq!(after.request("GET", "/healthz", "").unwrap(), 200);

    assert!(gateway.terminate().success());
    assert_eq!(Db::connect(cluster.config(&name)).count("location_updates"), 1);
}

#[test]
fn broken_tls_files_at_start_stop_the_gateway_with_a_reason_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test server CA");
    let (cert, key) = ca.write_server(dir.path(), "server");
    let missing = dir.path().join("missing-key.pem");
    let run = |envs: &[(&str, &Path)]| {
        let mut all = vec![
            ("INGEST_LISTEN", "127.0.0.1:0".to_owned()),
            ("INGEST_DATA_DIR", dir.path().join("data").display().to_string()),
            ("DATABASE_URL", "host=/nonexistent".to_owned()),
        ];
        all.extend(envs.iter().map(|(k, v)| (*k, v.display().to_string())));
        let output = gateway_command(&["serve"], &all).output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    let (ok, log) = run(&[("INGEST_TLS_CERT", &cert), ("INGEST_TLS_KEY", &missing)]);
    assert!(!ok);
    assert!(log.contains("missing-key.pem"), "{log}");
    let (ok, log) = run(&[("INGEST_TLS_CERT", &cert)]);
    assert!(!ok);
    assert!(log.contains("INGEST_TLS_KEY"), "{log}");
    let (ok, log) = run(&[("INGEST_TLS_CERT", &key), ("INGEST_TLS_KEY", &key)]);
    assert!(!ok);
    assert!(log.contains("holds no certificate"), "{log}");
}

/// Connects with `url` (a DATABASE_URL) and says whether the session is encrypted.
fn session_is_encrypted(url: &str) -> Result<bool, String> {
    let DatabaseUrl { config, tls } = url.parse().map_err(|e| format!("{e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, _connection) = tls.connect(&config).await.map_err(|e| format!("{e:?}"))?;
        let row = client
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get(0))
    })
}

/// Has `cluster` take TLS connections on TCP (and only those), with a certificate for `localhost` that `ca`
/// signed; returns the port.
fn serve_tls_on_tcp(cluster: &mut EmbeddedPostgres, ca: &Ca) -> u16 {
    let data_dir = cluster.data_dir().to_owned();
    let (cert, key) = ca.certificate_for(&["localhost"], false);
    let owner = ingest_gateway::db::embedded::server_user();
    for (name, contents) in [("server.crt", cert), ("server.key", key)] {
        let path = data_dir.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
        }
    }
    let hba = data_dir.join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).unwrap();
    rules.push_str("hostssl all all 127.0.0.1/32 scram-sha-256\n");
    std::fs::write(&hba, rules).unwrap();
    let port = free_port();
    cluster
        .restart_with(
            port,
            &[
                "listen_addresses=127.0.0.1",
                "ssl=on",
                "ssl_cert_file=server.crt",
                "ssl_key_file=server.key",
            ],
        )
        .expect("restart PostgreSQL with TLS");
    port
}

#[test]
fn postgres_over_tls_encrypts_with_require_and_verifies_as_verify_ca_and_verify_full_ask() {
    let mut cluster = EmbeddedPostgres::start_ephemeral().expect("start PostgreSQL");
    let ca = Ca::new("test database CA");
    let port = serve_tls_on_tcp(&mut cluster, &ca);
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("root.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let other_ca_path = dir.path().join("other.pem");
    std::fs::write(&other_ca_path, Ca::new("another CA").pem()).unwrap();
    let base = |host: &str| {
        format!(
            "host={host} port={port} user=postgres password={} dbname=postgres",
            cluster.password()
        )
    };
    let (ca, other) = (ca_path.display(), other_ca_path.display());

    assert_eq!(
        session_is_encrypted(&format!("{} sslmode=require", base("localhost"))),
        Ok(true)
    );
    assert_eq!(
        session_is_encrypted(&format!("{} sslmode=verify-full sslrootcert={ca}", base("localhost"))),
        Ok(true)
    );
    let url = format!(
        "postgresql://postgres:{}@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}",
        cluster.password(),
        percent_encode(&ca.to_string())
    );
    assert_eq!(session_is_encrypted(&url), Ok(true), "{url}");
    // The certificate names localhost, not 127.0.0.1: verify-ca does not care, verify-full does.
    assert_eq!(
        session_is_encrypted(&format!("{} sslmode=verify-ca sslrootcert={ca}", base("127.0.0.1"))),
        Ok(true)
    );
    let wrong_name = session_is_encrypted(&format!("{} sslmode=verify-full sslrootcert={ca}", base("127.0.0.1")));
    assert!(
        wrong_name.as_ref().is_err_and(|e| e.contains("NotValidForName")),
        "{wrong_name:?}"
    );
    let wrong_ca = session_is_encrypted(&format!(
        "{} sslmode=verify-full sslrootcert={other}",
        base("localhost")
    ));
    assert!(
        wrong_ca.as_ref().is_err_and(|e| e.contains("UnknownIssuer")),
        "{wrong_ca:?}"
    );
    // Without sslmode the gateway connects in the clear, which this server refuses on TCP.
    assert!(session_is_encrypted(&base("localhost")).is_err());
}

#[test]
fn the_gateway_writes_through_tls_when_its_database_url_asks_for_verify_full() {
    let mut cluster = EmbeddedPostgres::start_ephemeral().expect("start PostgreSQL");
    let ca = Ca::new("test database CA");
    let port = serve_tls_on_tcp(&mut cluster, &ca);
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("root.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let name = fresh_database(&cluster);
    let url = format!(
        "host=localhost port={port} user=postgres password={} dbname={name} sslmode=verify-full sslrootcert={}",
        cluster.password(),
        ca_path.display()
    );

    let app = spawn_app_on(cluster.config(&name), |s| s.database.database_url = Some(url.clone()));
    assert_eq!(
        app.post_json("/api/v1/location/update", &location_json("over-tls"))
            .status,
        202
    );
    eventually("the update lands", Duration::from_secs(10), || {
        app.db.count("location_updates") == 1
    });
    let encrypted: i64 = app.db.query(&format!(
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE datname = '{name}' AND application_name = 'ingest-gateway' AND ssl"
    ))[0]
        .get(0);
    assert!(encrypted > 0, "the gateway's connections are encrypted");
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
