//! TLS to PostgreSQL (rustls), as libpq's `sslmode` and `sslrootcert` in `DATABASE_URL` ask:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | – |
//! | `prefer` (default) | if the server offers it | not checked (as libpq) |
//! | `require` | always | not checked, unless `sslrootcert` is given: then as `verify-ca` (as libpq) |
//! | `verify-ca` | always | signed by a root of `sslrootcert` (or the system's) |
//! | `verify-full` | always | that, and issued for the host name in the URL |
//!
//! tokio-postgres knows only `disable`, `prefer` and `require` and refuses the other
//! parameters, so [`PgTls::split_url`] takes them out of the URL before it is parsed.
//! `sslrootcert=system` (PostgreSQL 16's spelling), or no `sslrootcert` with a verifying
//! mode, uses the operating system's roots.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the roots a verifying mode checks the server against come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// The operating system's (`sslrootcert=system`, or none given).
    System,
    /// A PEM file of one or more certificates.
    File(PathBuf),
}

/// How Cascade speaks TLS to one PostgreSQL server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PgTls {
    pub mode: SslMode,
    /// `sslrootcert`, when the URL gives one.
    pub roots: Option<Roots>,
}

impl PgTls {
    /// Takes `sslmode` and `sslrootcert` out of a `postgresql://` URL: the URL that remains
    /// (for tokio-postgres) and what they ask. Client certificates (`sslcert`, `sslkey`) are
    /// refused by name rather than ignored.
    pub fn split_url(url: &str) -> Result<(String, PgTls), String> {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), PgTls::default()));
        };
        let mut tls = PgTls::default();
        let mut mode_given = false;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            match key {
                "sslmode" => {
                    mode_given = true;
                    tls.mode = SslMode::parse(&value).ok_or_else(|| {
                        format!(
                            "sslmode {value:?} is not one of disable, allow, prefer, require, \
                             verify-ca, verify-full"
                        )
                    })?;
                }
                "sslrootcert" if value == "system" => tls.roots = Some(Roots::System),
                "sslrootcert" => tls.roots = Some(Roots::File(PathBuf::from(value))),
                "sslcert" | "sslkey" | "sslpassword" => {
                    return Err(format!(
                        "{key}: client certificates are not supported; authenticate with a \
                         password (over verify-full)"
                    ));
                }
                _ => kept.push(pair),
            }
        }
        // libpq: require with a root certificate verifies the chain, as verify-ca.
        if tls.mode == SslMode::Require && matches!(tls.roots, Some(Roots::File(_))) {
            tls.mode = SslMode::VerifyCa;
        }
        // libpq 16: sslrootcert=system means verify-full unless said otherwise, and refuses
        // any mode that would not check the certificate against the system's roots.
        if tls.roots == Some(Roots::System) {
            if !mode_given {
                tls.mode = SslMode::VerifyFull;
            } else if tls.mode != SslMode::VerifyFull {
                return Err(format!(
                    "sslrootcert=system needs sslmode=verify-full (got sslmode={}): the \
                     system's roots only mean something when the server's name is checked",
                    tls.mode.as_str()
                ));
            }
        }
        let url = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((url, tls))
    }

    /// What tokio-postgres is told: whether TLS is skipped, tried or required.
    pub fn tokio_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Tokio;
        match self.mode {
            SslMode::Disable => Tokio::Disable,
            SslMode::Prefer => Tokio::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Tokio::Require,
        }
    }

    /// Whether the server's identity is checked (`verify-full`), for `cascade check`.
    pub fn verifies_host(&self) -> bool {
        self.mode == SslMode::VerifyFull
    }

    /// The rustls connector for this mode. Reads the root certificates now, so a missing or
    /// unreadable `sslrootcert` fails at startup, naming the file. With `disable`
    /// tokio-postgres never calls it (one connector type keeps every connection's type one).
    pub fn connector(&self) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(Relaxed {
                provider,
                chain: None,
            }),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = Arc::new(self.root_store()?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| format!("TLS roots: {e}"))?;
                if self.mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(Relaxed {
                        provider,
                        chain: Some(webpki),
                    })
                }
            }
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    fn root_store(&self) -> Result<RootCertStore, String> {
        let mut store = RootCertStore::empty();
        match &self.roots {
            Some(Roots::File(path)) => {
                for cert in read_certs(path)? {
                    store
                        .add(cert)
                        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                }
            }
            None | Some(Roots::System) => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(format!(
                        "sslmode={} needs root certificates: none found in the system's store \
                         (install ca-certificates) and no sslrootcert in DATABASE_URL",
                        self.mode.as_str()
                    ));
                }
            }
        }
        Ok(store)
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("sslrootcert {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "sslrootcert {}: no certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

/// `%2F` → `/` and the like, for file paths in URL parameters.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The modes that check less than `verify-full`. `prefer` and `require` (`chain: None`):
/// encrypted, the certificate not checked (libpq's meaning of those modes; a self-signed
/// server certificate, as Debian's default, works). `verify-ca` (`chain: Some`): the chain
/// must lead to a trusted root, the name in it may be any. Either way the handshake's
/// signatures are checked, so the session is bound to the certificate's key.
#[derive(Debug)]
struct Relaxed {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_parameters_leave_the_url_and_others_stay() {
        let (url, tls) = PgTls::split_url(
            "postgresql://u:p@db:5432/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(url, "postgresql://u:p@db:5432/app?application_name=x");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.roots, Some(Roots::File("/etc/ca.pem".into())));

        let (url, tls) = PgTls::split_url("postgresql://u@db/app").unwrap();
        assert_eq!(url, "postgresql://u@db/app");
        assert_eq!(tls, PgTls::default());
        assert_eq!(tls.mode, SslMode::Prefer);

        let (url, tls) = PgTls::split_url("postgresql://u@db/app?sslmode=disable").unwrap();
        assert_eq!(url, "postgresql://u@db/app");
        assert_eq!(tls.mode, SslMode::Disable);
    }

    #[test]
    fn require_with_a_root_certificate_verifies_the_chain_as_libpq_does() {
        let (_, tls) =
            PgTls::split_url("postgresql://u@db/app?sslmode=require&sslrootcert=/ca.pem").unwrap();
        assert_eq!(tls.mode, SslMode::VerifyCa);
        let (_, tls) =
            PgTls::split_url("postgresql://u@db/app?sslmode=verify-full&sslrootcert=system")
                .unwrap();
        assert_eq!(tls.roots, Some(Roots::System));
        // As libpq 16: system alone means verify-full; a weaker mode beside it is refused.
        let (_, tls) = PgTls::split_url("postgresql://u@db/app?sslrootcert=system").unwrap();
        assert_eq!(tls.mode, SslMode::VerifyFull);
        let err = PgTls::split_url("postgresql://u@db/app?sslmode=require&sslrootcert=system")
            .unwrap_err();
        assert!(err.contains("verify-full"), "{err}");
    }

    #[test]
    fn unknown_modes_and_client_certificates_are_refused_by_name() {
        let err = PgTls::split_url("postgresql://u@db/app?sslmode=verify").unwrap_err();
        assert!(err.contains("sslmode \"verify\""), "{err}");
        let err = PgTls::split_url("postgresql://u@db/app?sslcert=/c.pem").unwrap_err();
        assert!(err.starts_with("sslcert"), "{err}");
    }

    #[test]
    fn a_missing_root_file_is_named_when_the_connector_is_built() {
        let tls = PgTls {
            mode: SslMode::VerifyFull,
            roots: Some(Roots::File("/nonexistent/ca.pem".into())),
        };
        let err = tls.connector().err().expect("refused");
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
