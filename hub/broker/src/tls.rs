//! TLS for the embedded broker's device listener (rustls with ring): a server certificate, and optionally a client
//! CA that every device certificate must chain to (mutual TLS), so that only provisioned devices reach the broker.

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the TLS listener could not be configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate or key found ({detail})")]
    Pem { path: PathBuf, detail: String },
    #[error("tls configuration: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Pem {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::Pem {
            path: path.to_owned(),
            detail: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Whether and how the listener asks clients for certificates.
#[derive(Debug, Clone, Copy)]
pub enum ClientAuth<'a> {
    /// No client certificates (server authentication and encryption only).
    None,
    /// A client may present a certificate; if it does, it must chain to this CA (PEM). Clients without one still
    /// connect and authenticate otherwise (password, anonymous enrollment).
    Optional(&'a Path),
    /// Every client must present a certificate that chains to this CA (PEM).
    Required(&'a Path),
}

/// Builds the server configuration from PEM files, asking for client certificates as `client_auth` says.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_auth: ClientAuth<'_>,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(cert)?;
    let key_pem = read(key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsSetupError::Pem {
        path: key.to_owned(),
        detail: e.to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    let (client_ca, optional) = match client_auth {
        ClientAuth::None => (None, false),
        ClientAuth::Optional(ca) => (Some(ca), true),
        ClientAuth::Required(ca) => (Some(ca), false),
    };
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| TlsSetupError::Config(format!("client CA: {e}")))?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| TlsSetupError::Config(format!("client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bad TLS material is a typed error naming the file, raised before anything listens.
    #[test]
    fn bad_files_are_typed_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").expect("write");
        let err = server_config(&missing, &missing, ClientAuth::None).expect_err("missing file");
        assert!(
            matches!(err, TlsSetupError::Read { ref path, .. } if *path == missing),
            "{err}"
        );
        let err = server_config(&junk, &junk, ClientAuth::None).expect_err("no PEM blocks");
        assert!(
            matches!(err, TlsSetupError::Pem { ref path, .. } if *path == junk),
            "{err}"
        );
    }
}
