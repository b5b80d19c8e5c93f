//! Workload secrets: `flotilla secret set NAME --deployment D` stores the value sealed to the hub's secrets key
//! (`keys/secrets.key`, 0600; the database only ever holds sealed bytes), and every workload of D gets a reference
//! to it in its spec. When a device's desired state is signed, each referenced secret is opened in memory and
//! sealed again to that device's own X25519 key (from its inventory), so only that device can read it. The API
//! never returns a value, and nothing here logs one.

use crate::hub::{Hub, HubError, unix_now};
use flotilla_shared::DeviceId;
use flotilla_shared::seal::{self, MAX_SECRET_BYTES, SealingKey};
use flotilla_shared::wire::{SealedSecret, SecretRef, WorkloadSpec};

/// A secret's name: like a label, so it is safe in topics, paths and logs.
fn valid_name(name: &str) -> Result<(), HubError> {
    flotilla_shared::Label::new(name)
        .map(|_| ())
        .map_err(|e| HubError::BadRequest(format!("secret name: {e}")))
}

impl Hub {
    /// Sets a deployment's secret to `value` (a new version; its workloads restart with it). Returns the version.
    pub fn set_secret(
        &mut self,
        deployment: &str,
        name: &str,
        value: &[u8],
        who: &str,
    ) -> Result<u64, HubError> {
        valid_name(name)?;
        if !self.deployments.contains_key(deployment) {
            return Err(HubError::NotFound(format!(
                "no deployment {deployment}; apply it first, then set its secrets"
            )));
        }
        if value.is_empty() || value.len() > MAX_SECRET_BYTES {
            return Err(HubError::BadRequest(format!(
                "secret value: {} bytes; a secret holds 1 to {MAX_SECRET_BYTES} bytes",
                value.len()
            )));
        }
        let key = self.secrets_key.as_ref().ok_or_else(|| {
            HubError::Conflict("this hub has no secrets key (keys/secrets.key)".into())
        })?;
        let sealed = seal::seal(&key.public(), value);
        let now = unix_now();
        let version = self.store.transaction(|s| {
            let v = s.set_secret(deployment, name, &sealed, value.len(), now)?;
            s.audit(
                now,
                who,
                "secret",
                &format!(
                    "{deployment}/{name} set (version {v}, {} bytes)",
                    value.len()
                ),
            )?;
            Ok(v)
        })?;
        tracing::info!(deployment, secret = name, version, "secret set");
        self.dirty = true;
        self.reconcile_fleet()
            .map_err(|e| HubError::Internal(e.to_string()))?;
        Ok(version)
    }

    /// A deployment's secrets: names, versions, sizes and when they changed; never values.
    pub fn list_secrets(
        &self,
        deployment: &str,
    ) -> Result<Vec<(String, u64, usize, u64)>, HubError> {
        Ok(self
            .store
            .deployment_secrets(deployment)?
            .into_iter()
            .map(|r| (r.name, r.version, r.size, r.updated_at))
            .collect())
    }

    /// The references every workload of `deployment` carries.
    pub(crate) fn secret_refs(&self, deployment: &str) -> Result<Vec<SecretRef>, HubError> {
        Ok(self
            .store
            .deployment_secrets(deployment)?
            .into_iter()
            .map(|r| SecretRef {
                deployment: r.deployment,
                name: r.name,
                version: r.version,
            })
            .collect())
    }

    /// Seals every secret the workloads reference to `device`'s own key. A device that registered no sealing key,
    /// or a secret that no longer opens, gets no sealed value: its workload then fails to start saying why.
    pub(crate) fn seal_for(
        &self,
        device: &DeviceId,
        workloads: &[WorkloadSpec],
    ) -> Vec<SealedSecret> {
        let wanted = workloads.iter().any(|w| !w.secrets.is_empty());
        if !wanted {
            return vec![];
        }
        let Some(hub_key) = &self.secrets_key else {
            return vec![];
        };
        let Some(device_key) = self
            .store
            .device(device)
            .ok()
            .flatten()
            .and_then(|d| d.inventory.sealing_key)
        else {
            tracing::warn!(device = %device, "device has no sealing key; its secrets are not sent");
            return vec![];
        };
        let mut out = Vec::new();
        for w in workloads {
            for r in &w.secrets {
                let plain = self
                    .store
                    .secret(&r.deployment, &r.name, r.version)
                    .ok()
                    .flatten()
                    .map(|row| open_hub_copy(hub_key, &row.sealed));
                match plain {
                    Some(Ok(value)) => out.push(SealedSecret {
                        workload: w.name.clone(),
                        name: r.name.clone(),
                        version: r.version,
                        sealed: seal::seal(&device_key, &value),
                    }),
                    _ => tracing::warn!(
                        deployment = %r.deployment, secret = %r.name, version = r.version,
                        "secret cannot be opened on the hub; not sent"
                    ),
                }
            }
        }
        out
    }
}

fn open_hub_copy(key: &SealingKey, sealed: &[u8]) -> Result<Vec<u8>, seal::SealError> {
    key.open(sealed)
}
