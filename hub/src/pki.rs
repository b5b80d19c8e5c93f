//! The broker's TLS material, made by `flotilla init` (and on first start of an older data directory): a broker CA
//! and a server certificate it signs, kept under `tls/` apart from the trust keys (which sign what devices run;
//! these only secure the transport). Devices pin the CA by its SHA-256, which every enrollment token carries.

use crate::keyfile;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Paths of the broker's TLS material in a data directory.
#[derive(Debug, Clone)]
pub struct BrokerPki {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    /// The server certificate followed by the CA (devices find the CA to pin in the chain).
    pub server_chain: PathBuf,
    pub server_key: PathBuf,
}

impl BrokerPki {
    pub fn in_dir(data_dir: &Path) -> Self {
        let tls = data_dir.join("tls");
        Self {
            ca: tls.join("broker-ca.pem"),
            ca_key: tls.join("broker-ca.key"),
            server_chain: tls.join("server.pem"),
            server_key: tls.join("server.key"),
        }
    }

    pub fn exists(&self) -> bool {
        [&self.ca, &self.server_chain, &self.server_key]
            .iter()
            .all(|p| p.exists())
    }

    /// Creates the CA and a server certificate for `hosts` (DNS names or IP addresses). Keys are 0600.
    pub fn create(&self, hosts: &[String]) -> Result<()> {
        if let Some(dir) = self.ca.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Flotilla broker CA");
        ca_params.not_after = rcgen::date_time_ymd(2046, 1, 1);
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(hosts.to_vec())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Flotilla broker");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(&self.ca, ca.pem())?;
        keyfile::write_private(&self.ca_key, &ca_key.serialize_pem())?;
        std::fs::write(&self.server_chain, format!("{}{}", cert.pem(), ca.pem()))?;
        keyfile::write_private(&self.server_key, &key.serialize_pem())?;
        Ok(())
    }

    /// The SHA-256 of the CA certificate (DER), as hex: what an enrollment token pins.
    pub fn ca_fingerprint(&self) -> Result<String> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let pem =
            std::fs::read(&self.ca).with_context(|| format!("reading {}", self.ca.display()))?;
        let der = CertificateDer::from_pem_slice(&pem)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.ca.display()))?;
        Ok(flotilla_shared::Digest::of(der.as_ref()).to_hex())
    }
}

/// The names the server certificate is made for: localhost, the loopback addresses, this machine's hostname, and
/// whatever `extra` names (`--broker-host`).
pub fn default_hosts(extra: &[String]) -> Vec<String> {
    let mut hosts = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            hosts.push(h.to_owned());
        }
    }
    for e in extra {
        if !hosts.contains(e) {
            hosts.push(e.clone());
        }
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated chain is server certificate then CA, the CA's fingerprint is stable, and keys are private.
    #[test]
    fn creates_a_ca_and_a_server_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = BrokerPki::in_dir(dir.path());
        assert!(!pki.exists());
        pki.create(&default_hosts(&["hub.example".into()]))
            .expect("create");
        assert!(pki.exists());
        let chain = std::fs::read_to_string(&pki.server_chain).expect("chain");
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        let fp = pki.ca_fingerprint().expect("fingerprint");
        assert_eq!(fp.len(), 64);
        assert_eq!(fp, pki.ca_fingerprint().expect("again"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pki.server_key)
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "server key is private");
    }
}
