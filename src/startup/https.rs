//! HTTPS on the TCP listeners: the certificate chain and key of `INGEST_TLS_CERT` and `INGEST_TLS_KEY` (PEM) and,
//! with `INGEST_TLS_CLIENT_CA`, mutual TLS: a client must present a certificate that one of those CAs signed, or
//! the handshake fails. Unix sockets stay plain (the socket file's permissions say who may send).
//!
//! The files are read again on SIGHUP. Each handshake asks for the certificate and the client verifier of the
//! moment, so the new ones serve the next handshake while connections already open go on with theirs; files that
//! do not load on a reload leave the previous ones in place (the reason is logged), while at start they stop the
//! gateway.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::config::Settings;
use crate::db::client_tls::crypto_provider;

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("INGEST_TLS_CERT and INGEST_TLS_KEY go together: give both for HTTPS, or neither")]
    CertificateWithoutKey,
    #[error(
        "INGEST_TLS_CLIENT_CA asks for client certificates, which needs HTTPS: give INGEST_TLS_CERT and \
         INGEST_TLS_KEY too"
    )]
    ClientCaWithoutCertificate,
    #[error("could not read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{what} {path} holds no certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("the key {key} does not go with the certificate {cert}")]
    Key {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the client CA {path} cannot be used")]
    ClientCa {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("could not set up TLS")]
    Rustls(#[from] rustls::Error),
}

/// The TLS files named by the settings.
#[derive(Debug, Clone)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// HTTPS for the TCP listeners, reloadable: clones share the certificate and the client verifier they serve.
#[derive(Clone)]
pub struct ServerTls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    certificate: Arc<CurrentCertificate>,
    clients: Option<Arc<CurrentClientVerifier>>,
    config: ServerConfig,
}

impl ServerTls {
    /// Loads the files the settings name; `None` when they name none (plain HTTP).
    pub fn from_settings(settings: &Settings) -> Result<Option<Self>, TlsError> {
        let (cert, key) = match (&settings.http.tls_cert, &settings.http.tls_key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            (None, None) if settings.http.tls_client_ca.is_some() => return Err(TlsError::ClientCaWithoutCertificate),
            (None, None) => return Ok(None),
            _ => return Err(TlsError::CertificateWithoutKey),
        };
        let files = TlsFiles {
            cert,
            key,
            client_ca: settings.http.tls_client_ca.clone(),
        };
        let provider = crypto_provider();
        let certificate = Arc::new(CurrentCertificate(RwLock::new(Arc::new(load_certificate(
            &files, &provider,
        )?))));
        let clients = match &files.client_ca {
            Some(ca) => Some(Arc::new(CurrentClientVerifier(RwLock::new(load_client_verifier(
                ca, &provider,
            )?)))),
            None => None,
        };
        let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let builder = match &clients {
            Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_cert_resolver(certificate.clone());
        Ok(Some(ServerTls {
            files,
            provider,
            certificate,
            clients,
            config,
        }))
    }

    /// The rustls configuration for a listener; every clone serves what the last reload loaded.
    pub fn server_config(&self) -> ServerConfig {
        self.config.clone()
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.clients.is_some()
    }

    /// Reads the files again and serves them from the next handshake on; when one does not load, nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        // Everything is loaded before anything is swapped: a broken CA file must not leave a new certificate
        // served with the old verifier, or the other way round.
        let certificate = load_certificate(&self.files, &self.provider)?;
        let verifier = match &self.files.client_ca {
            Some(ca) => Some(load_client_verifier(ca, &self.provider)?),
            None => None,
        };
        *self.certificate.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(certificate);
        if let (Some(current), Some(verifier)) = (&self.clients, verifier) {
            *current.0.write().unwrap_or_else(PoisonError::into_inner) = verifier;
        }
        Ok(())
    }
}

fn read_certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(error)?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}

/// The certificate chain and its key, checked to go together.
fn load_certificate(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = read_certificates("the certificate", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Read {
        what: "the key",
        path: files.key.clone(),
        source,
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Key {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    })
}

/// A verifier that accepts only client certificates one of the CAs of `path` signed.
fn load_client_verifier(path: &Path, provider: &Arc<CryptoProvider>) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let ca_error = |source: Box<dyn std::error::Error + Send + Sync>| TlsError::ClientCa {
        path: path.to_owned(),
        source,
    };
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates("the client CA", path)? {
        roots.add(certificate).map_err(|e| ca_error(Box::new(e)))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| ca_error(Box::new(e)))
}

/// Serves the certificate of the last (re)load to every handshake.
#[derive(Debug)]
struct CurrentCertificate(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

/// Checks client certificates with the verifier of the last (re)load.
struct CurrentClientVerifier(RwLock<Arc<dyn ClientCertVerifier>>);

impl CurrentClientVerifier {
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl fmt::Debug for CurrentClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CurrentClientVerifier").field(&self.current()).finish()
    }
}

impl ClientCertVerifier for CurrentClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No hints: they would have to outlive a reload that replaces them. A client then offers whichever certificate
    /// it has, which is what clients with one certificate do anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `name` and its key, as PEM files in `dir` named after `stem`.
    fn write_certificate(dir: &Path, stem: &str, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_path, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
        std::fs::write(&cert_path, certificate.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    fn settings(cert: Option<&Path>, key: Option<&Path>, ca: Option<&Path>) -> Settings {
        let mut settings = Settings::defaults();
        settings.http.tls_cert = cert.map(Path::to_owned);
        settings.http.tls_key = key.map(Path::to_owned);
        settings.http.tls_client_ca = ca.map(Path::to_owned);
        settings
    }

    fn served(tls: &ServerTls) -> CertificateDer<'static> {
        tls.certificate.0.read().unwrap().cert[0].clone()
    }

    #[test]
    fn no_files_is_plain_http_and_half_a_configuration_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_certificate(dir.path(), "a", "localhost");
        assert!(ServerTls::from_settings(&settings(None, None, None)).unwrap().is_none());
        assert!(matches!(
            ServerTls::from_settings(&settings(Some(&cert), None, None)),
            Err(TlsError::CertificateWithoutKey)
        ));
        assert!(matches!(
            ServerTls::from_settings(&settings(None, None, Some(&cert))),
            Err(TlsError::ClientCaWithoutCertificate)
        ));
        let tls = ServerTls::from_settings(&settings(Some(&cert), Some(&key), Some(&cert)))
            .unwrap()
            .unwrap();
        assert!(tls.mutual());
    }

    #[test]
    fn a_key_of_another_certificate_or_a_missing_file_is_refused_at_start_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = write_certificate(dir.path(), "a", "localhost");
        let (_, other_key) = write_certificate(dir.path(), "b", "localhost");
        let error = ServerTls::from_settings(&settings(Some(&cert), Some(&other_key), None))
            .err()
            .unwrap();
        assert!(matches!(error, TlsError::Key { .. }), "{error}");
        let missing = dir.path().join("missing.pem");
        let error = ServerTls::from_settings(&settings(Some(&missing), Some(&other_key), None))
            .err()
            .unwrap();
        assert!(error.to_string().contains("missing.pem"), "{error}");
    }

    #[test]
    fn a_reload_serves_the_new_certificate_and_a_broken_file_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_certificate(dir.path(), "live", "localhost");
        let tls = ServerTls::from_settings(&settings(Some(&cert), Some(&key), None))
            .unwrap()
            .unwrap();
        let first = served(&tls);

        let (new_cert, new_key) = write_certificate(dir.path(), "next", "localhost");
        std::fs::rename(&new_cert, &cert).unwrap();
        std::fs::rename(&new_key, &key).unwrap();
        tls.reload().unwrap();
        let second = served(&tls);
        assert_ne!(first, second);

        std::fs::write(&key, "not a key").unwrap();
        assert!(tls.reload().is_err());
        assert_eq!(served(&tls), second, "the previous certificate stays");
        assert_eq!(served(&tls.clone()), second, "clones share what is served");
    }
}
