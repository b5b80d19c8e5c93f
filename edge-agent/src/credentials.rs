//! The device's MQTT credentials after enrollment: the client certificate the hub's device CA issued (its key
//! never leaves the device), renewed over MQTT when two thirds of its lifetime have passed, and rotated at once
//! when the hub asks (`flotilla device rotate-credentials`). New credentials are written to disk before the link
//! reconnects with them; the hub keeps the previous ones valid until the new ones are first used, so a crash or a
//! lost message at any point leaves the device able to connect.

use crate::agent::{Agent, unix_now};
use crate::store::Store;
use flotilla_mqtt::Publisher;
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::wire::{CredentialRequest, CredentialResponse, IssuedCert};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A renewal request with no answer is sent again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Where the issued certificate and its key live in the data directory (both 0600).
pub fn client_files(data_dir: &Path) -> (PathBuf, PathBuf) {
    (
        data_dir.join("mqtt-client.pem"),
        data_dir.join("mqtt-client.key"),
    )
}

/// A fresh key pair and a CSR for it (DER). The request's subject is rcgen's default and does not matter: the hub
/// names the certificate after the device id it knows, whatever a request says.
pub fn new_csr() -> Result<(String, Vec<u8>), rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Writes `contents` to `path` atomically (a temporary file renamed over it), readable by the owner only.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Stores an issued certificate with its key (key first: a certificate on disk always has its key beside it)
/// and remembers its validity for renewal.
pub fn save_issued(
    data_dir: &Path,
    store: &Store,
    key_pem: &str,
    cert: &IssuedCert,
) -> Result<(), crate::store::StoreError> {
    let (cert_path, key_path) = client_files(data_dir);
    // The pair must change together: the old certificate goes first, so a crash in between leaves a key with no
    // certificate (the agent then connects with its password) rather than a certificate with the wrong key.
    match std::fs::remove_file(&cert_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    write_private(&key_path, key_pem)?;
    write_private(&cert_path, &cert.pem)?;
    store.set_cert_validity(cert.not_before, cert.not_after)
}

/// When a certificate valid from `not_before` to `not_after` should be renewed: two thirds into its life.
pub fn renew_at(not_before: u64, not_after: u64) -> u64 {
    not_before + not_after.saturating_sub(not_before) / 3 * 2
}

/// The renewal concern's state.
#[derive(Debug, Default)]
pub struct Renewal {
    /// The key of the request in flight and when it was sent.
    pending: Option<(String, Instant)>,
    /// After a refusal (a hub without a device CA), ask again only after this.
    quiet_until: Option<Instant>,
}

impl Agent {
    /// Whether the agent connects with the certificate the hub issued (TLS, no certificate configured by hand).
    pub(crate) fn uses_issued_cert(&self) -> bool {
        crate::agent::tls_settings(&self.cfg).is_some()
            && self
                .cfg
                .tls
                .as_ref()
                .is_none_or(|t| t.client_cert.is_none())
    }

    /// Renews the client certificate when it is due (checked every tick while connected).
    pub(crate) fn renew_if_due(&mut self) {
        if !self.connected || !self.uses_issued_cert() {
            return;
        }
        let due = match self.store.cert_validity() {
            Ok(Some((nb, na))) => unix_now() >= renew_at(nb, na),
            // No certificate yet (enrolled without one, or by an older hub): ask for one.
            Ok(None) => true,
            Err(e) => {
                tracing::warn!(error = %e, "reading certificate validity");
                false
            }
        };
        if due {
            self.request_credentials("renewal");
        }
    }

    /// Sends a CSR for a new key, unless one is already in flight and recent.
    pub(crate) fn request_credentials(&mut self, why: &str) {
        if self
            .renewal
            .pending
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < RETRY_AFTER)
            || self.renewal.quiet_until.is_some_and(|t| Instant::now() < t)
        {
            return;
        }
        let (key, csr) = match new_csr() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot make a certificate request");
                return;
            }
        };
        let Ok(payload) = codec::encode(&Message::CredentialRequest(CredentialRequest { csr }))
        else {
            return;
        };
        let topic = topics::device(&self.trust.device, DeviceTopic::CredentialRequest);
        if let Some(link) = &self.link
            && link.publish(&topic, payload, false).is_ok()
        {
            tracing::info!(why, "requested new credentials");
            self.renewal.pending = Some((key, Instant::now()));
        }
    }

    /// The hub's answer on `cert/resp`.
    pub(crate) fn on_credentials(&mut self, resp: CredentialResponse) {
        match resp {
            CredentialResponse::RotateNow => {
                // A rotation replaces any renewal in flight, and ends a quiet period after a refusal.
                self.renewal.pending = None;
                self.renewal.quiet_until = None;
                self.request_credentials("rotation asked by the hub");
            }
            CredentialResponse::Refused { reason } => {
                tracing::warn!(
                    reason,
                    "credential request refused; asking again in an hour"
                );
                self.renewal.pending = None;
                self.renewal.quiet_until = Some(Instant::now() + Duration::from_secs(3600));
            }
            CredentialResponse::Issued {
                cert,
                mqtt_password,
            } => {
                let Some((key, _)) = self.renewal.pending.take() else {
                    tracing::warn!("credentials issued for no request in flight; ignored");
                    return;
                };
                let saved = save_issued(&self.cfg.data_dir, &self.store, &key, &cert)
                    .and_then(|()| self.store.set_mqtt_secret(&mqtt_password));
                match saved {
                    Ok(()) => {
                        tracing::info!(
                            not_after = cert.not_after,
                            "new credentials stored; reconnecting with them"
                        );
                        if let Err(e) = self.reconnect() {
                            tracing::error!(error = %e, "reconnecting with new credentials");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "could not store new credentials"),
                }
            }
        }
    }
}
