//! Device credentials after enrollment: client certificates issued by the device CA (from the CSR the agent sends
//! at enrollment and on `dev/{id}/cert/req` before its certificate expires), new MQTT passwords with them, and
//! operator-requested rotation (`flotilla device rotate-credentials ID`). A device's previous credentials stay
//! valid until it first connects with the new ones (the broker's registry retires them then and this module
//! persists that), so a response lost in transit never locks a device out.

use crate::access::hash_secret;
use crate::access::policy::Principal;
use crate::hub::{Hub, HubError, unix_now};
use crate::pki::{DeviceCa, Issued};
use flotilla_mqtt::Publisher;
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::wire::{CredentialRequest, CredentialResponse};
use flotilla_shared::{DeviceId, trust};

/// Default lifetime of a device's client certificate; the agent renews it after two thirds of that.
pub const DEFAULT_CERT_LIFETIME_SECS: u64 = 30 * 24 * 3600;

/// The device CA and how long the certificates it issues live.
#[derive(Debug, Clone)]
pub struct DeviceCerts {
    pub ca: DeviceCa,
    pub lifetime_secs: u64,
}

impl Hub {
    /// Signs a device's CSR and records the certificate (store and broker registry). `None` when this hub has
    /// no device CA.
    pub(crate) fn issue_device_cert(
        &mut self,
        id: &DeviceId,
        csr: &[u8],
        now: u64,
    ) -> Result<Option<Issued>, String> {
        let Some(certs) = &self.device_certs else {
            return Ok(None);
        };
        let issued = certs
            .ca
            .issue(csr, id, certs.lifetime_secs, now)
            .map_err(|e| e.to_string())?;
        self.record_device_cert(id, &issued, now)?;
        Ok(Some(issued))
    }

    /// Stores an issued certificate (fingerprint, serial, expiry).
    pub(crate) fn record_device_cert(
        &mut self,
        id: &DeviceId,
        issued: &Issued,
        now: u64,
    ) -> Result<(), String> {
        self.store
            .add_device_cert(
                id.as_str(),
                &issued.sha256,
                &issued.serial,
                issued.cert.not_after,
                now,
            )
            .map_err(|e| e.to_string())
    }

    fn respond_credentials(&self, id: &DeviceId, resp: CredentialResponse) {
        if let Ok(bytes) = codec::encode(&Message::CredentialResponse(resp)) {
            let _ = self.link.publish(
                &topics::device(id, DeviceTopic::CredentialResponse),
                bytes,
                false,
            );
        }
    }

    /// A device asks for new credentials (renewal before expiry, or the rotation the hub asked for). Only the
    /// device itself can publish on its `cert/req` topic (the broker's ACL), so the request is its own.
    pub(crate) fn on_credential_request(
        &mut self,
        id: &DeviceId,
        req: &CredentialRequest,
    ) -> Result<(), String> {
        let principal = Principal::Device(id.clone()).name();
        if self.store.device(id).map_err(|e| e.to_string())?.is_none()
            || self.store.credential_revoked(&principal).unwrap_or(true)
        {
            return Err("credential request from an unknown or revoked device".into());
        }
        let now = unix_now();
        let issued = match self.issue_device_cert(id, &req.csr, now) {
            Ok(Some(i)) => i,
            Ok(None) => {
                self.respond_credentials(
                    id,
                    CredentialResponse::Refused {
                        reason: "this hub issues no client certificates (no device CA)".into(),
                    },
                );
                return Ok(());
            }
            Err(reason) => {
                self.respond_credentials(
                    id,
                    CredentialResponse::Refused {
                        reason: reason.clone(),
                    },
                );
                return Err(reason);
            }
        };
        let password = trust::random_hex(32);
        let hash = hash_secret(&password);
        let previous = self
            .store
            .secret_hash(&principal)
            .map_err(|e| e.to_string())?;
        self.store
            .transaction(|s| {
                if let Some(p) = &previous {
                    s.set_previous_secret(&principal, Some(p))?;
                }
                s.set_credential(&principal, &hash, &[], now)?;
                s.set_password_line(
                    &principal,
                    &crate::mosquitto::password_line(id.as_str(), &password),
                )?;
                s.set_rotation_requested(id.as_str(), false, now)?;
                s.audit(
                    now,
                    &principal,
                    "credentials",
                    &format!(
                        "new client certificate (valid until {}) and MQTT password",
                        issued.cert.not_after
                    ),
                )
            })
            .map_err(|e| e.to_string())?;
        self.access
            .add_generation(id, Some(hash), Some(issued.sha256));
        self.metrics.credentials_issued += 1;
        self.mosquitto_files_changed();
        tracing::info!(device = %id, not_after = issued.cert.not_after, "device credentials issued");
        self.respond_credentials(
            id,
            CredentialResponse::Issued {
                cert: issued.cert,
                mqtt_password: password,
            },
        );
        Ok(())
    }

    /// `flotilla device rotate-credentials ID`: asks the device for a new key now (at once when it is online,
    /// else when it next comes online). Returns whether the device was online.
    pub fn rotate_device_credentials(
        &mut self,
        id: &DeviceId,
        who: &str,
    ) -> Result<bool, HubError> {
        let d = self
            .store
            .device(id)?
            .ok_or_else(|| HubError::NotFound(format!("no device {id}")))?;
        let principal = Principal::Device(id.clone()).name();
        if self.store.credential_revoked(&principal)? {
            return Err(HubError::Conflict(format!(
                "device {id} is revoked; it can only enroll again with a new token"
            )));
        }
        if self.device_certs.is_none() {
            return Err(HubError::Conflict(
                "this hub has no device CA to issue new certificates with".into(),
            ));
        }
        let now = unix_now();
        self.store.set_rotation_requested(id.as_str(), true, now)?;
        self.store
            .audit(now, who, "rotate-credentials", &format!("device {id}"))?;
        if d.online {
            self.respond_credentials(id, CredentialResponse::RotateNow);
        }
        Ok(d.online)
    }

    /// A device came online: ask again for a rotation it has not done yet.
    pub(crate) fn resume_rotation(&mut self, id: &DeviceId) {
        if self.store.rotation_requested(id.as_str()).unwrap_or(false) {
            self.respond_credentials(id, CredentialResponse::RotateNow);
        }
    }

    /// Persists what the broker's registry did on its own: devices that connected with their newest credentials
    /// and so retired the older ones (their certificates go on the revocation list).
    pub(crate) fn persist_superseded(&mut self) {
        let superseded = self.access.take_superseded();
        if superseded.is_empty() {
            return;
        }
        let now = unix_now();
        for id in &superseded {
            let principal = Principal::Device(id.clone()).name();
            let r = self
                .store
                .set_previous_secret(&principal, None)
                .and_then(|()| self.store.retire_older_certs(id.as_str(), now));
            if let Err(e) = r {
                tracing::error!(device = %id, error = %e, "could not persist retired credentials");
            }
        }
        // Retired certificates go on the revocation list.
        self.mosquitto_files_changed();
    }
}
