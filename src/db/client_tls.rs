//! TLS to PostgreSQL, asked for in the connection string the way libpq is asked: `sslmode` and `sslrootcert`.
//! tokio-postgres knows only `disable`, `prefer` and `require` and no `sslrootcert`, so both are taken out of the
//! string here and turned into a rustls client configuration (ring provider) for tokio-postgres-rustls:
//!
//! - unset, `disable`, `allow`, `prefer`: no TLS, as before.
//! - `require`: encrypted, the server's certificate not checked, as libpq does: it stops eavesdroppers, not a
//!   man in the middle. With an `sslrootcert` file it is `verify-ca`, as in libpq.
//! - `verify-ca`: the server's certificate must chain to the CA certificates of the `sslrootcert` file (PEM);
//!   its name is not checked.
//! - `verify-full`: the chain as for `verify-ca`, and the certificate must name the host connected to. Without
//!   `sslrootcert`, or with `sslrootcert=system`, against the system's trusted roots.
//!
//! As in libpq, `sslrootcert=system` alone means `verify-full`, and the weaker modes refuse it: any server a public
//! CA vouched for would pass. A host that is a Unix socket never uses TLS (PostgreSQL offers none there, and libpq
//! ignores `sslmode` for it too). Client certificates (`sslcert`, `sslkey`) are not supported and refused.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

/// What the connection string asked of TLS, after libpq's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Off,
    /// Encrypted, the server's certificate not checked (`require`).
    Encrypt,
    /// Encrypted, the certificate chained to the given CAs, its name not checked (`verify-ca`).
    VerifyCa,
    /// Encrypted, the certificate chained to the roots and naming the host (`verify-full`).
    VerifyFull,
}

/// Why a connection string cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseUrlError {
    #[error("not a valid PostgreSQL connection string")]
    Invalid(#[source] tokio_postgres::Error),
    #[error("sslmode={0:?} is not one of disable, allow, prefer, require, verify-ca, verify-full")]
    SslMode(String),
    #[error("{0} is not supported: the gateway presents no client certificate to PostgreSQL; use a password")]
    ClientCertificate(String),
    #[error(
        "sslmode={0} may not be used with sslrootcert=system: any server a public CA vouched for would pass; use \
         sslmode=verify-full"
    )]
    WeakModeWithSystemRoots(&'static str),
    #[error("sslmode=verify-ca needs sslrootcert=<file of the CA certificates that sign the server's certificate>")]
    VerifyCaWithoutRoots,
    #[error("could not read the CA certificates of sslrootcert {path}")]
    RootCertificates {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("sslrootcert {0} holds no usable CA certificate")]
    NoRootCertificate(PathBuf),
    #[error("could not load the system's trusted root certificates: {0}")]
    SystemRoots(String),
    #[error("could not set up TLS to PostgreSQL")]
    Tls(#[from] rustls::Error),
}

/// A `DATABASE_URL`, read: what tokio-postgres takes, and how the connections are secured.
pub struct DatabaseUrl {
    pub config: tokio_postgres::Config,
    pub tls: DatabaseTls,
}

impl std::str::FromStr for DatabaseUrl {
    type Err = DatabaseUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let (rest, params) = take_tls_params(url);
        let mut config: tokio_postgres::Config = rest.parse().map_err(DatabaseUrlError::Invalid)?;
        if let Some(key) = params.client_certificate {
            return Err(DatabaseUrlError::ClientCertificate(key));
        }
        let (mode, roots) = resolve(&params)?;
        let only_sockets =
            !config.get_hosts().is_empty() && config.get_hosts().iter().all(|h| matches!(h, Host::Unix(_)));
        if mode == TlsMode::Off || only_sockets {
            if params.sslmode.as_deref() == Some("disable") {
                config.ssl_mode(SslMode::Disable);
            }
            return Ok(DatabaseUrl {
                config,
                tls: DatabaseTls::off(),
            });
        }
        config.ssl_mode(SslMode::Require);
        let tls = DatabaseTls::new(mode, roots.as_ref())?;
        Ok(DatabaseUrl { config, tls })
    }
}

/// How connections to PostgreSQL are made: in the clear, or over TLS verified as the connection string asked.
#[derive(Clone)]
pub struct DatabaseTls {
    mode: TlsMode,
    /// `None` when [`TlsMode::Off`].
    connector: Option<MakeRustlsConnect>,
}

impl DatabaseTls {
    /// No TLS (the embedded PostgreSQL, or a connection string that does not ask for it).
    pub fn off() -> Self {
        DatabaseTls {
            mode: TlsMode::Off,
            connector: None,
        }
    }

    fn new(mode: TlsMode, roots: Option<&Roots>) -> Result<Self, DatabaseUrlError> {
        let provider = crypto_provider();
        let algorithms = provider.signature_verification_algorithms;
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            TlsMode::Off => return Ok(Self::off()),
            TlsMode::Encrypt => Arc::new(NameUnchecked {
                roots: None,
                algorithms,
            }),
            TlsMode::VerifyCa => Arc::new(NameUnchecked {
                roots: Some(Arc::new(load_roots(
                    roots.ok_or(DatabaseUrlError::VerifyCaWithoutRoots)?,
                )?)),
                algorithms,
            }),
            TlsMode::VerifyFull => {
                let roots = Arc::new(load_roots(roots.unwrap_or(&Roots::System))?);
                WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| DatabaseUrlError::Tls(rustls::Error::General(e.to_string())))?
            }
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(DatabaseTls {
            mode,
            connector: Some(MakeRustlsConnect::new(config)),
        })
    }

    /// What is asked of TLS.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// The TLS connector, `None` for plain connections.
    pub fn connector(&self) -> Option<&MakeRustlsConnect> {
        self.connector.as_ref()
    }

    /// Opens one connection and drives it in the background on the current runtime until the client is dropped;
    /// the handle yields the connection's error if it broke.
    pub async fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<(Client, tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>), tokio_postgres::Error> {
        Ok(match &self.connector {
            None => {
                let (client, connection) = config.connect(NoTls).await?;
                (client, tokio::spawn(connection))
            }
            Some(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                (client, tokio::spawn(connection))
            }
        })
    }
}

/// Where the trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    /// The system's trusted roots (`sslrootcert=system`).
    System,
    /// The PEM certificates of a file.
    File(PathBuf),
}

/// libpq's TLS parameters, as found in a connection string.
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsParams {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    /// The first parameter that would need a client certificate (`sslcert`, `sslkey`, `sslpassword`).
    client_certificate: Option<String>,
}

/// The mode libpq would use, and the roots to verify against.
fn resolve(params: &TlsParams) -> Result<(TlsMode, Option<Roots>), DatabaseUrlError> {
    let roots = params.sslrootcert.as_deref().map(|r| match r {
        "system" => Roots::System,
        path => Roots::File(PathBuf::from(path)),
    });
    let mode = match (params.sslmode.as_deref(), &roots) {
        (None, Some(Roots::System)) => TlsMode::VerifyFull,
        (None | Some("disable" | "allow" | "prefer"), _) => TlsMode::Off,
        (Some("require"), Some(Roots::File(_))) => TlsMode::VerifyCa,
        (Some("require"), _) => TlsMode::Encrypt,
        (Some("verify-ca"), _) => TlsMode::VerifyCa,
        (Some("verify-full"), _) => TlsMode::VerifyFull,
        (Some(other), _) => return Err(DatabaseUrlError::SslMode(other.to_owned())),
    };
    if roots == Some(Roots::System) {
        match mode {
            TlsMode::Encrypt => return Err(DatabaseUrlError::WeakModeWithSystemRoots("require")),
            TlsMode::VerifyCa => return Err(DatabaseUrlError::WeakModeWithSystemRoots("verify-ca")),
            TlsMode::Off if params.sslmode.is_some() => {
                return Err(DatabaseUrlError::WeakModeWithSystemRoots("disable, allow or prefer"))
            }
            _ => {}
        }
    }
    Ok((mode, roots))
}

fn load_roots(roots: &Roots) -> Result<RootCertStore, DatabaseUrlError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                return Err(DatabaseUrlError::SystemRoots(if errors.is_empty() {
                    "none found".into()
                } else {
                    errors.join("; ")
                }));
            }
        }
        Roots::File(path) => {
            let error = |source| DatabaseUrlError::RootCertificates {
                path: path.clone(),
                source,
            };
            for cert in CertificateDer::pem_file_iter(path).map_err(error)? {
                store.add(cert.map_err(error)?)?;
            }
            if store.is_empty() {
                return Err(DatabaseUrlError::NoRootCertificate(path.clone()));
            }
        }
    }
    Ok(store)
}

/// The verifier of the two modes that do not check the name in the certificate. The handshake's signatures are
/// checked in both, so the session is with whoever holds the key of the certificate shown.
#[derive(Debug)]
struct NameUnchecked {
    /// `None` for `require`: any certificate, as libpq does. `Some` for `verify-ca`: the chain must lead to one of
    /// these roots.
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NameUnchecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(&cert, roots, intermediates, now, self.algorithms.all)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The ring provider, the one every TLS configuration of the gateway uses.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Takes libpq's TLS parameters out of `url` (a URL or `key=value` pairs) and returns the rest, byte for byte, for
/// tokio-postgres to parse. A string this cannot split is returned whole, for tokio-postgres to say what is wrong.
fn take_tls_params(url: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let mut note = |key: &str, value: String| -> bool {
        match key {
            "sslmode" => params.sslmode = Some(value),
            "sslrootcert" => params.sslrootcert = Some(value),
            "sslcert" | "sslkey" | "sslpassword" => {
                params.client_certificate.get_or_insert_with(|| key.to_owned());
            }
            _ => return false,
        }
        true
    };
    let rest = match url_query(url) {
        Some(Some(query)) => {
            let kept: Vec<&str> = url[query.clone()]
                .split('&')
                .filter(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    !note(&percent_decode(key), percent_decode(value))
                })
                .collect();
            let head = &url[..query.start - 1];
            if kept.is_empty() {
                head.to_owned()
            } else {
                format!("{head}?{}", kept.join("&"))
            }
        }
        Some(None) => url.to_owned(),
        None => match keyword_values(url) {
            Some(pairs) => {
                let kept: Vec<&str> = pairs
                    .into_iter()
                    .filter(|(_, key, value)| !note(key, value.clone()))
                    .map(|(span, _, _)| &url[span])
                    .collect();
                kept.join(" ")
            }
            None => url.to_owned(),
        },
    };
    (rest, params)
}

fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// For a URL (`postgres://` or `postgresql://`): `Some` with the byte range of its query (after `?`), if it has
/// one. `None` for the `key=value` form. Finds the query where tokio-postgres does: after the credentials, which
/// end at the first `@`.
fn url_query(url: &str) -> Option<Option<Range<usize>>> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))?;
    let start = url.len() - rest.len();
    let after_credentials = rest.find('@').map_or(0, |at| at + 1);
    Some(
        rest[after_credentials..]
            .find('?')
            .map(|q| start + after_credentials + q + 1..url.len()),
    )
}

/// The `key=value` pairs of a connection string, each with its byte range, its key and its unquoted value; read
/// the way tokio-postgres reads them (values in single quotes, backslash escapes). `None` if it is malformed.
fn keyword_values(text: &str) -> Option<Vec<(Range<usize>, String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = text.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else { break };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        chars.next_if(|(_, c)| *c == '=')?;
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        loop {
            match chars.peek().copied() {
                None if quoted => return None,
                None => break,
                Some((_, '\'')) if quoted => {
                    chars.next();
                    break;
                }
                Some((_, c)) if c.is_whitespace() && !quoted => break,
                Some((_, '\\')) => {
                    chars.next();
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                Some((_, c)) => {
                    chars.next();
                    value.push(c);
                }
            }
        }
        if key.is_empty() {
            return None;
        }
        let end = chars.peek().map_or(text.len(), |(i, _)| *i);
        pairs.push((start..end, key, value));
    }
    Some(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<DatabaseUrl, DatabaseUrlError> {
        url.parse()
    }

    /// A CA certificate (PEM) in a file of a new temporary directory.
    fn ca_file() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.pem()).unwrap();
        let path = path.display().to_string();
        (dir, path)
    }

    #[test]
    fn no_sslmode_or_a_weak_one_keeps_plain_connections() {
        for url in [
            "host=db.example user=gw",
            "host=db.example user=gw sslmode=prefer",
            "host=db.example sslmode=allow user=gw",
            "postgres://gw@db.example/ingest",
            "postgres://gw@db.example/ingest?sslmode=prefer&application_name=x",
        ] {
            let parsed = parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(parsed.tls.mode(), TlsMode::Off, "{url}");
            assert!(parsed.tls.connector().is_none(), "{url}");
            assert_eq!(parsed.config.get_user(), Some("gw"), "{url}");
        }
        let disabled = parse("host=db.example sslmode=disable").unwrap();
        assert_eq!(disabled.config.get_ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn require_encrypts_without_verifying_and_becomes_verify_ca_with_a_root_file() {
        let parsed = parse("host=db.example user=gw sslmode=require").unwrap();
        assert_eq!(parsed.tls.mode(), TlsMode::Encrypt);
        assert!(parsed.tls.connector().is_some());
        assert_eq!(parsed.config.get_ssl_mode(), SslMode::Require);

        let (_dir, ca) = ca_file();
        let parsed = parse(&format!("host=db.example sslmode=require sslrootcert='{ca}'")).unwrap();
        assert_eq!(parsed.tls.mode(), TlsMode::VerifyCa);
    }

    #[test]
    fn verify_modes_map_to_verifying_connectors_in_both_forms() {
        let (_dir, ca) = ca_file();
        let encoded: String = percent_encoding::utf8_percent_encode(&ca, percent_encoding::NON_ALPHANUMERIC).collect();
        for (url, mode) in [
            (
                format!("host=db.example sslmode=verify-ca sslrootcert={ca}"),
                TlsMode::VerifyCa,
            ),
            (
                format!("host=db.example sslmode=verify-full sslrootcert={ca}"),
                TlsMode::VerifyFull,
            ),
            (
                format!("postgresql://gw:pw@db.example:5433/ingest?sslmode=verify-full&sslrootcert={encoded}"),
                TlsMode::VerifyFull,
            ),
            (
                format!("postgres://gw@db.example/ingest?sslrootcert={encoded}&sslmode=verify-ca&connect_timeout=3"),
                TlsMode::VerifyCa,
            ),
        ] {
            let parsed = parse(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(parsed.tls.mode(), mode, "{url}");
            assert_eq!(parsed.config.get_ssl_mode(), SslMode::Require, "{url}");
            assert!(
                parsed.config.get_hosts().contains(&Host::Tcp("db.example".into())),
                "{url}"
            );
        }
        let url = parse(&format!(
            "postgres://gw:pw@db.example:5433/ingest?sslmode=verify-full&sslrootcert={encoded}"
        ))
        .unwrap();
        assert_eq!(url.config.get_ports(), [5433]);
        assert_eq!(url.config.get_password(), Some(&b"pw"[..]));
        assert_eq!(url.config.get_dbname(), Some("ingest"));
    }

    #[test]
    fn a_unix_socket_host_never_uses_tls() {
        let parsed = parse("host=/run/postgresql user=gw sslmode=require").unwrap();
        assert_eq!(parsed.tls.mode(), TlsMode::Off);
    }

    #[test]
    fn what_libpq_refuses_or_the_gateway_cannot_do_is_refused_clearly() {
        assert!(matches!(
            parse("host=db sslmode=verify"),
            Err(DatabaseUrlError::SslMode(m)) if m == "verify"
        ));
        assert!(matches!(
            parse("host=db sslmode=verify-ca"),
            Err(DatabaseUrlError::VerifyCaWithoutRoots)
        ));
        assert!(matches!(
            parse("host=db sslmode=require sslrootcert=system"),
            Err(DatabaseUrlError::WeakModeWithSystemRoots("require"))
        ));
        assert!(matches!(
            parse("host=db sslmode=verify-full sslrootcert=/nonexistent/ca.pem"),
            Err(DatabaseUrlError::RootCertificates { .. })
        ));
        assert!(matches!(
            parse("host=db sslmode=require sslcert=client.pem sslkey=client.key"),
            Err(DatabaseUrlError::ClientCertificate(k)) if k == "sslcert"
        ));
        assert!(matches!(
            parse("host=db port=notanumber"),
            Err(DatabaseUrlError::Invalid(_))
        ));
    }

    #[test]
    fn the_tls_parameters_are_taken_out_and_everything_else_is_kept_as_written() {
        let (rest, params) =
            take_tls_params(r"host=db  sslmode=verify-full password='a b\'c' sslrootcert='/etc/my ca.pem' user=gw");
        assert_eq!(rest, r"host=db password='a b\'c' user=gw");
        assert_eq!(params.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(params.sslrootcert.as_deref(), Some("/etc/my ca.pem"));

        let (rest, params) = take_tls_params("postgres://gw:p%3Fw?@db/x?sslmode=require&application_name=a%26b");
        assert_eq!(rest, "postgres://gw:p%3Fw?@db/x?application_name=a%26b");
        assert_eq!(params.sslmode.as_deref(), Some("require"));

        let (rest, _) = take_tls_params("postgres://db/x?sslmode=require");
        assert_eq!(rest, "postgres://db/x");
        let (rest, params) = take_tls_params("host=db password='unterminated");
        assert_eq!(rest, "host=db password='unterminated");
        assert_eq!(params, TlsParams::default());
    }
}
