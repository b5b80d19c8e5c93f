//! Revocation and MQTT credentials for people and tools: `flotilla device revoke ID` (disconnect now, refuse the
//! credential from then on, clear the device's retained topics, take it out of placement) and telemetry feed
//! credentials scoped to regions.

use crate::access::hash_secret;
use crate::access::policy::Principal;
use crate::hub::{Hub, HubError, unix_now};
use flotilla_mqtt::Publisher;
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::{DeviceId, Label, trust};

/// A feed credential as handed to its owner (the secret is shown once and not kept).
#[derive(Debug, Clone)]
pub struct FeedCredential {
    pub username: String,
    pub password: String,
    /// Client ids this credential may connect with: this one, or it followed by `-anything`.
    pub client_id: String,
}

impl Hub {
    /// Revokes a device: its connections close at once, its credential is refused from now on, its retained
    /// desired state, root and presence are cleared on the broker, and placement no longer sees it. Enrolling
    /// again needs a new token (and a new key).
    pub fn revoke_device(&mut self, id: &DeviceId, who: &str) -> Result<usize, HubError> {
        if self.store.device(id)?.is_none() {
            return Err(HubError::NotFound(format!("no device {id}")));
        }
        let principal = Principal::Device(id.clone()).name();
        let now = unix_now();
        self.store.revoke_credential(&principal, now)?;
        // Its certificates go on the revocation list an external broker checks.
        self.store.retire_device_certs(id.as_str(), None, now)?;
        self.store.set_rotation_requested(id.as_str(), false, now)?;
        self.access.revoke(id);
        let mut closed = self.broker.as_ref().map_or(0, |b| b.disconnect(&principal));
        // On Mosquitto: the CRL, ACL and password file first, then the live session is taken over and closed.
        if let Some(m) = &mut self.mosquitto {
            if let Err(e) = m.sync_now(&self.store, now) {
                tracing::error!(error = %format!("{e:#}"), "updating the mosquitto files");
            }
            m.end_session(id.as_str());
            closed += usize::from(m.broker.is_some());
        }
        // An empty retained message clears what the broker keeps for the topic (MQTT 3.1.1, 3.3.1.3).
        for leaf in [
            DeviceTopic::Desired,
            DeviceTopic::Root,
            DeviceTopic::Presence,
        ] {
            let _ = self.link.publish(&topics::device(id, leaf), vec![], true);
        }
        let _ = self.store.set_presence(id, false, now);
        self.store.audit(
            now,
            who,
            "revoke",
            &format!("device {id}: {closed} connection(s) closed"),
        )?;
        tracing::warn!(device = %id, closed, "device revoked");
        self.dirty = true;
        self.reconcile_fleet()
            .map_err(|e| HubError::Internal(e.to_string()))?;
        Ok(closed)
    }

    /// Creates (or replaces) a read-only telemetry feed credential for `regions`.
    pub fn create_feed_credential(
        &mut self,
        name: &str,
        regions: Vec<String>,
        who: &str,
    ) -> Result<FeedCredential, HubError> {
        Label::new(name).map_err(|e| HubError::BadRequest(format!("name: {e}")))?;
        if regions.is_empty() {
            return Err(HubError::BadRequest(
                "regions: name at least one region the credential may read".into(),
            ));
        }
        for r in &regions {
            Label::new(r.clone())
                .map_err(|e| HubError::BadRequest(format!("regions: {r:?}: {e}")))?;
        }
        let secret = trust::random_hex(32);
        let hash = hash_secret(&secret);
        let principal = Principal::Feed(name.to_owned()).name();
        let now = unix_now();
        self.store
            .set_credential(&principal, &hash, &regions, now)?;
        let username = format!("feed-{name}");
        self.store.set_password_line(
            &principal,
            &crate::mosquitto::password_line(&username, &secret),
        )?;
        self.access.set_feed(name, hash, regions.clone());
        self.mosquitto_files_changed();
        self.store.audit(
            now,
            who,
            "feed-credential",
            &format!("{principal} for regions {}", regions.join(",")),
        )?;
        Ok(FeedCredential {
            username,
            password: secret,
            client_id: format!("feed-{name}"),
        })
    }
}
