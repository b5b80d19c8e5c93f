//! Enrollment: one-time tokens (created by operators, with label/region/zone presets) are exchanged over MQTT for a
//! device id and the trust root; token use, registration and the audit entry commit together.

use super::validate_inventory;
use crate::access::policy::{self, Principal};
use crate::access::{device_secret, hash_secret};
use crate::hub::{Hub, HubError, unix_now};
use crate::store::TokenPresets;
use flotilla_mqtt::Publisher;
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics;
use flotilla_shared::trust;
use flotilla_shared::wire::{EnrollRequest, EnrollResponse, Inventory, IssuedCert, WorkloadKind};
use flotilla_shared::{DeviceId, Label};

impl Hub {
    fn respond_enroll(&self, nonce: &str, resp: EnrollResponse) {
        if let Ok(bytes) = codec::encode(&Message::EnrollResponse(resp)) {
            let _ = self
                .link
                .publish(&topics::enroll_response(nonce), bytes, false);
        }
    }

    pub(crate) fn on_enroll(&mut self, nonce: String, req: EnrollRequest) {
        let now = unix_now();
        if let Err(e) = validate_inventory(&req.inventory) {
            self.respond_enroll(&nonce, EnrollResponse::Refused { reason: e });
            return;
        }
        let id = match req.requested_id.clone() {
            Some(id) if policy::reserved_device_id(id.as_str()) => {
                let reason = format!(
                    "device id {id} is reserved (ids may not start with enroll-, feed- or flotilla-hub)"
                );
                self.respond_enroll(&nonce, EnrollResponse::Refused { reason });
                return;
            }
            Some(id) => id,
            None => match DeviceId::new(format!("dev-{}", trust::random_hex(4))) {
                Ok(id) => id,
                Err(_) => return,
            },
        };
        let principal = Principal::Device(id.clone()).name();
        let revoked = self.store.credential_revoked(&principal).unwrap_or(false);
        // An already-registered device re-sending its request (lost response) gets a fresh secret (the hub keeps
        // only hashes, so it cannot send the first one again). A revoked device enrolls again only with a new
        // token and a new key.
        let mut replaces_revoked = false;
        if let Ok(Some(d)) = self.store.device(&id) {
            if revoked && d.public_key != req.public_key {
                replaces_revoked = true;
            } else {
                let resp = if revoked {
                    EnrollResponse::Refused {
                        reason: format!(
                            "device {id} is revoked; enroll again with a new token and a new key (remove the \
                             agent's data directory)"
                        ),
                    }
                } else if d.public_key == req.public_key {
                    // The response was lost: the same password (derived), and a certificate for the CSR.
                    let client_cert = match self.enrollment_cert(&id, req.csr.as_deref(), now) {
                        Ok(c) => c,
                        Err(reason) => {
                            self.respond_enroll(&nonce, EnrollResponse::Refused { reason });
                            return;
                        }
                    };
                    EnrollResponse::Accepted {
                        device: id.clone(),
                        root: self.root_signed.clone(),
                        mqtt_password: device_secret(&self.enroll_key, &id, &d.public_key.0),
                        client_cert,
                    }
                } else {
                    EnrollResponse::Refused {
                        reason: format!("device id {} is taken", d.id),
                    }
                };
                self.respond_enroll(&nonce, resp);
                return;
            }
        }
        // A CSR that cannot be signed refuses the enrollment before the token is used.
        let issued = match (req.csr.as_deref(), &self.device_certs) {
            (Some(csr), Some(certs)) => match certs.ca.issue(csr, &id, certs.lifetime_secs, now) {
                Ok(i) => Some(i),
                Err(e) => {
                    let reason = e.to_string();
                    self.respond_enroll(&nonce, EnrollResponse::Refused { reason });
                    return;
                }
            },
            _ => None,
        };
        // Token use, registration and the audit entry commit together (one fsync, and a token is never burned
        // without a device to show for it).
        let mut inv = req.inventory;
        let key = req.public_key;
        let mqtt_password = device_secret(&self.enroll_key, &id, &key.0);
        let secret_hash = hash_secret(&mqtt_password);
        let result = self.store.transaction(|store| {
            let presets = match store.consume_enroll_token(&req.token, &id, now)? {
                Ok(p) => p,
                Err(e) => return Ok(Err(e)),
            };
            apply_presets(&mut inv, &presets);
            if replaces_revoked {
                store.delete_device(&id)?;
            }
            store.insert_device(&id, &key, &inv, now)?;
            store.set_credential(&principal, &secret_hash, &[], now)?;
            store.set_password_line(
                &principal,
                &crate::mosquitto::password_line(id.as_str(), &mqtt_password),
            )?;
            store.audit(
                now,
                &format!("device:{id}"),
                "enroll",
                "enrolled with a one-time token",
            )?;
            Ok(Ok(presets))
        });
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(device = %id, error = %e, "enrollment refused");
                self.respond_enroll(
                    &nonce,
                    EnrollResponse::Refused {
                        reason: e.to_string(),
                    },
                );
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "enrollment store error");
                return;
            }
        }
        self.access.set_device(
            &id,
            secret_hash,
            inv.region.as_ref().map(|r| r.to_string()),
            false,
        );
        let client_cert = issued.and_then(|i| match self.record_device_cert(&id, &i, now) {
            Ok(()) => {
                self.access.add_generation(&id, None, Some(i.sha256));
                Some(i.cert)
            }
            Err(e) => {
                // The device still has its password and renews its certificate later.
                tracing::error!(device = %id, error = %e, "client certificate not recorded");
                None
            }
        });
        self.mosquitto_files_changed();
        self.metrics.enrollments += 1;
        tracing::info!(device = %id, "device enrolled");
        self.respond_enroll(
            &nonce,
            EnrollResponse::Accepted {
                device: id,
                root: self.root_signed.clone(),
                mqtt_password,
                client_cert,
            },
        );
        self.dirty = true;
    }

    /// Issues the client certificate an enrollment asked for (none without a CSR or without a device CA), and
    /// registers it with the broker.
    fn enrollment_cert(
        &mut self,
        id: &DeviceId,
        csr: Option<&[u8]>,
        now: u64,
    ) -> Result<Option<IssuedCert>, String> {
        let Some(csr) = csr else { return Ok(None) };
        let Some(issued) = self.issue_device_cert(id, csr, now)? else {
            return Ok(None);
        };
        self.access.add_generation(id, None, Some(issued.sha256));
        Ok(Some(issued.cert))
    }

    pub fn create_enroll_token(
        &mut self,
        presets: TokenPresets,
        ttl_secs: u64,
        who: &str,
    ) -> Result<String, HubError> {
        let mut t = self.create_enroll_tokens(presets, ttl_secs, 1, who)?;
        t.pop()
            .ok_or_else(|| HubError::Internal("no token created".into()))
    }

    /// Creates `count` one-time tokens with the same presets, in one transaction.
    pub fn create_enroll_tokens(
        &mut self,
        presets: TokenPresets,
        ttl_secs: u64,
        count: usize,
        who: &str,
    ) -> Result<Vec<String>, HubError> {
        if let Some(r) = &presets.region {
            Label::new(r.clone()).map_err(|e| HubError::BadRequest(format!("region: {e}")))?;
        }
        if let Some(z) = &presets.zone {
            Label::new(z.clone()).map_err(|e| HubError::BadRequest(format!("zone: {e}")))?;
        }
        // The kubeadm join pattern: the token carries the broker CA's fingerprint, so the device can verify the
        // broker on first contact with nothing else configured.
        let suffix = self
            .broker_ca_fingerprint
            .as_ref()
            .map_or(String::new(), |fp| format!(".{fp}"));
        let tokens: Vec<String> = (0..count)
            .map(|_| format!("fet_{}{suffix}", trust::random_hex(16)))
            .collect();
        let now = unix_now();
        self.store
            .add_enroll_tokens(&tokens, &presets, now + ttl_secs.max(1))?;
        self.store.audit(
            now,
            who,
            "enroll-token",
            &format!("{count} x region={:?} ttl={ttl_secs}s", presets.region),
        )?;
        Ok(tokens)
    }
}

fn apply_presets(inv: &mut Inventory, p: &TokenPresets) {
    for (k, v) in &p.labels {
        inv.labels.retain(|(k2, _)| k2 != k);
        inv.labels.push((k.clone(), v.clone()));
    }
    if let Some(r) = p.region.clone().and_then(|r| Label::new(r).ok()) {
        inv.region = Some(r);
    }
    if let Some(z) = p.zone.clone().and_then(|z| Label::new(z).ok()) {
        inv.zone = Some(z);
    }
    if !inv.runtimes.contains(&WorkloadKind::Wasm) && inv.runtimes.is_empty() {
        inv.runtimes.push(WorkloadKind::Wasm);
    }
}
