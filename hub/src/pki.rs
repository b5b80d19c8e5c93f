//! The broker's TLS material, made by `flotilla init` (and on first start of an older data directory): a broker CA
//! and a server certificate it signs, kept under `tls/` apart from the trust keys (which sign what devices run;
//! these only secure the transport). Devices pin the CA by its SHA-256, which every enrollment token carries.
//!
//! Beside it, the device CA: it signs each device's MQTT client certificate (subject = device id) from the CSR
//! the agent sends at enrollment and at every renewal, and the revocation list an external broker checks.

use crate::keyfile;
use anyhow::{Context, Result};
use rustls_pki_types::pem::PemObject;
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
        let pem =
            std::fs::read(&self.ca).with_context(|| format!("reading {}", self.ca.display()))?;
        let der = CertificateDer::from_pem_slice(&pem)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.ca.display()))?;
        Ok(flotilla_shared::Digest::of(der.as_ref()).to_hex())
    }
}

/// Paths of the device CA in a data directory.
#[derive(Debug, Clone)]
pub struct DeviceCa {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate the device CA issued, as the hub records it.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: flotilla_shared::wire::IssuedCert,
    /// SHA-256 of the DER certificate: how the embedded broker recognises it.
    pub sha256: [u8; 32],
    /// The serial number (for the revocation list).
    pub serial: Vec<u8>,
}

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    #[error("the certificate signing request is not valid: {0}")]
    BadCsr(String),
    #[error("the device CA cannot sign: {0}")]
    Ca(String),
}

/// Allowed clock skew between hub and device: certificates are valid from a little before they are issued.
const SKEW_SECS: u64 = 300;

fn datetime(unix: u64) -> Result<time::OffsetDateTime, IssueError> {
    let secs = i64::try_from(unix).map_err(|_| IssueError::Ca("time out of range".into()))?;
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| IssueError::Ca(e.to_string()))
}

impl DeviceCa {
    pub fn in_dir(data_dir: &Path) -> Self {
        let tls = data_dir.join("tls");
        Self {
            cert: tls.join("device-ca.pem"),
            key: tls.join("device-ca.key"),
        }
    }

    pub fn exists(&self) -> bool {
        self.cert.exists() && self.key.exists()
    }

    fn params() -> Result<rcgen::CertificateParams> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Flotilla device CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params.not_after = rcgen::date_time_ymd(2046, 1, 1);
        Ok(params)
    }

    /// Creates the CA (key 0600).
    pub fn create(&self) -> Result<()> {
        if let Some(dir) = self.cert.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let key = rcgen::KeyPair::generate()?;
        let cert = Self::params()?.self_signed(&key)?;
        keyfile::write_private(&self.key, &key.serialize_pem())?;
        std::fs::write(&self.cert, cert.pem())?;
        Ok(())
    }

    /// The CA as an issuer: its stored key with parameters read back from its own certificate, so the issuer
    /// name in every device certificate matches the CA certificate byte for byte.
    fn issuer(&self) -> Result<rcgen::Issuer<'static, rcgen::KeyPair>, IssueError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| IssueError::Ca(format!("{}: {e}", p.display())))
        };
        let key = rcgen::KeyPair::from_pem(&read(&self.key)?)
            .map_err(|e| IssueError::Ca(format!("{}: {e}", self.key.display())))?;
        rcgen::Issuer::from_ca_cert_pem(&read(&self.cert)?, key)
            .map_err(|e| IssueError::Ca(format!("{}: {e}", self.cert.display())))
    }

    /// Signs `csr_der` (PKCS#10, its own signature checked) as a client certificate for `device`, valid
    /// `lifetime_secs` from `now`. Only the CSR's public key is used: the subject, names and usages are ours.
    pub fn issue(
        &self,
        csr_der: &[u8],
        device: &flotilla_shared::DeviceId,
        lifetime_secs: u64,
        now: u64,
    ) -> Result<Issued, IssueError> {
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der);
        let mut csr = rcgen::CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| IssueError::BadCsr(e.to_string()))?;
        let serial: Vec<u8> = {
            let mut s = hex::decode(flotilla_shared::trust::random_hex(16))
                .map_err(|e| IssueError::Ca(e.to_string()))?;
            // A positive 128-bit serial (the top bit clear), as RFC 5280 asks.
            if let Some(b) = s.first_mut() {
                *b &= 0x7f;
            }
            s
        };
        let not_after = now.saturating_add(lifetime_secs.max(60));
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| IssueError::Ca(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, device.as_str());
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.not_before = datetime(now.saturating_sub(SKEW_SECS))?;
        params.not_after = datetime(not_after)?;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer()?)
            .map_err(|e| IssueError::Ca(e.to_string()))?;
        Ok(Issued {
            sha256: flotilla_shared::Digest::of(cert.der().as_ref()).0,
            cert: flotilla_shared::wire::IssuedCert {
                pem: cert.pem(),
                not_before: now,
                not_after,
            },
            serial,
        })
    }

    /// A revocation list (PEM) of `serials`, valid for `validity_secs` from `now`, numbered `number`.
    pub fn crl(
        &self,
        serials: &[(Vec<u8>, u64)],
        number: u64,
        now: u64,
        validity_secs: u64,
    ) -> Result<String, IssueError> {
        let params = rcgen::CertificateRevocationListParams {
            this_update: datetime(now)?,
            next_update: datetime(now + validity_secs.max(60))?,
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|(serial, at)| {
                    Ok(rcgen::RevokedCertParams {
                        serial_number: rcgen::SerialNumber::from_slice(serial),
                        revocation_time: datetime(*at)?,
                        reason_code: None,
                        invalidity_date: None,
                    })
                })
                .collect::<Result<_, IssueError>>()?,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer()?)
            .and_then(|c| c.pem())
            .map_err(|e| IssueError::Ca(e.to_string()))
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

    /// The subject common names of a PEM certificate, and the certificate's public key bytes.
    fn subject_and_key(pem: &str) -> (Vec<String>, Vec<u8>) {
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
        let cn = parsed
            .subject()
            .iter_common_name()
            .filter_map(|c| c.as_str().ok().map(str::to_owned))
            .collect();
        (cn, parsed.public_key().subject_public_key.data.to_vec())
    }

    /// The device CA signs a CSR with the device id as the subject, ignoring what the CSR asked for, and refuses
    /// a CSR whose signature does not match its key.
    #[test]
    fn device_ca_issues_from_a_csr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = DeviceCa::in_dir(dir.path());
        ca.create().expect("create");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut asked =
            rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).expect("params");
        asked
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gw-b");
        let csr = asked.serialize_request(&key).expect("csr");
        let id = flotilla_shared::DeviceId::new("gw-a").expect("id");
        let issued = ca
            .issue(csr.der(), &id, 3600, 1_800_000_000)
            .expect("issue");
        assert_eq!(issued.cert.not_after, 1_800_003_600);
        let (cn, public) = subject_and_key(&issued.cert.pem);
        assert_eq!(cn, ["gw-a"]);
        assert_eq!(public, key.public_key_raw(), "the CSR's key");
        let der = rustls_pki_types::CertificateDer::from_pem_slice(issued.cert.pem.as_bytes())
            .expect("pem");
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
        assert!(
            parsed.subject_alternative_name().ok().flatten().is_none(),
            "no names from the CSR"
        );
        let mut bad = csr.der().to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            ca.issue(&bad, &id, 3600, 0),
            Err(IssueError::BadCsr(_))
        ));
        assert!(matches!(
            ca.issue(b"junk", &id, 3600, 0),
            Err(IssueError::BadCsr(_))
        ));
        let crl = ca
            .crl(
                &[(issued.serial.clone(), 1_800_000_100)],
                1,
                1_800_000_200,
                3600,
            )
            .expect("crl");
        assert!(crl.contains("BEGIN X509 CRL"));
    }

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

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever bytes arrive as a CSR (random, or a valid request with bytes flipped), signing never panics,
        /// and anything it does sign names the device and carries the key of the request that was sent.
        #[test]
        fn csr_bytes_never_mislead_the_ca(
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), 1u8..=255), 0..4),
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let ca = DeviceCa::in_dir(dir.path());
            ca.create().expect("create");
            let key = rcgen::KeyPair::generate().expect("key");
            let csr = rcgen::CertificateParams::default().serialize_request(&key).expect("csr");
            let mut bytes = csr.der().to_vec();
            for (at, x) in &flips {
                let i = at % bytes.len();
                bytes[i] ^= x;
            }
            let id = flotilla_shared::DeviceId::new("gw-a").expect("id");
            let _ = ca.issue(&junk, &id, 3600, 1_800_000_000);
            if let Ok(issued) = ca.issue(&bytes, &id, 3600, 1_800_000_000) {
                let (cn, public) = subject_and_key(&issued.cert.pem);
                proptest::prop_assert_eq!(cn, vec!["gw-a".to_owned()]);
                proptest::prop_assert_eq!(public, key.public_key_raw().to_vec());
            }
        }
    }
}
