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

/// A device gets new credentials at most this often: each costs a signature and a synchronous commit, and only the
/// device itself can ask, so this bounds what a misbehaving device can make the hub do.
pub const MIN_REISSUE_SECS: u64 = 10;

/// The device CA and how long the certificates it issues live.
#[derive(Debug, Clone)]
pub struct DeviceCerts {
    pub ca: DeviceCa,
    pub lifetime_secs: u64,
    /// When each device last got new credentials (in memory: a restart only forgets the rate limit).
    pub last_issued: std::collections::HashMap<DeviceId, u64>,
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
        // A rotation the operator asked for is answered at once; unsolicited requests are rate-limited.
        let rotation = self.store.rotation_requested(id.as_str()).unwrap_or(false);
        if let Some(last) = self
            .device_certs
            .as_ref()
            .and_then(|c| c.last_issued.get(id))
            && now < last + MIN_REISSUE_SECS
            && !rotation
        {
            // Unanswered: the agent asks again after its retry interval.
            return Err(format!(
                "credential request within {MIN_REISSUE_SECS} s of the last issue; ignored"
            ));
        }
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
        if let Some(c) = &mut self.device_certs {
            c.last_issued.insert(id.clone(), now);
        }
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

#[cfg(test)]
mod tests {
    use crate::access::hash_secret;
    use crate::hub::test_support::test_hub;
    use flotilla_shared::DeviceId;
    use flotilla_shared::trust::SigningKey;
    use flotilla_shared::wire::{CredentialRequest, Inventory, WorkloadKind};

    fn csr() -> CredentialRequest {
        let key = rcgen::KeyPair::generate().expect("key");
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .expect("csr");
        CredentialRequest {
            csr: csr.der().to_vec(),
        }
    }

    /// New credentials go only to a known, unrevoked device, at most once per interval unless the operator asked
    /// for a rotation, and never for a CSR whose signature does not hold.
    #[tokio::test]
    async fn credential_requests_are_checked_and_rate_limited() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut hub, _rx) = test_hub(dir.path());
        let ca = crate::pki::DeviceCa::in_dir(dir.path());
        ca.create().expect("device CA");
        hub.set_device_certs(ca, 3600);
        let id = DeviceId::new("gw-1").expect("id");
        let unknown = DeviceId::new("gw-x").expect("id");
        assert!(hub.on_credential_request(&unknown, &csr()).is_err());
        let inv = Inventory {
            labels: vec![],
            region: None,
            zone: None,
            location: None,
            arch: "x86_64".into(),
            runtimes: vec![WorkloadKind::Wasm],
            memory_mib: 64,
            agent_version: "test".into(),
            sealing_key: None,
            container_engine: None,
            firmware: None,
            agent_release: None,
        };
        hub.store
            .insert_device(&id, &SigningKey::from_seed([1; 32]).public(), &inv, 1)
            .expect("device");
        hub.store
            .set_credential("device:gw-1", &hash_secret("p0"), &[], 1)
            .expect("credential");
        hub.access.set_device(&id, hash_secret("p0"), None, false);

        let mut bad = csr();
        let last = bad.csr.len() - 1;
        bad.csr[last] ^= 1;
        assert!(
            hub.on_credential_request(&id, &bad).is_err(),
            "a CSR that does not verify"
        );
        hub.on_credential_request(&id, &csr())
            .expect("first request");
        let err = hub
            .on_credential_request(&id, &csr())
            .expect_err("a second request at once");
        assert!(err.contains("ignored"), "{err}");
        hub.rotate_device_credentials(&id, "test").expect("rotate");
        hub.on_credential_request(&id, &csr())
            .expect("a rotation the operator asked for is answered at once");
        assert!(!hub.store.rotation_requested("gw-1").expect("read"));
        assert_eq!(hub.store.device_certs(0).expect("certs").len(), 2);
        hub.revoke_device(&id, "test").expect("revoke");
        hub.rotate_device_credentials(&id, "test")
            .expect_err("a revoked device is not rotated");
    }
}
