//! Placement and desired-state publishing: every deployment is placed by the sans-IO core, each device's workloads
//! are signed into a desired state only when they change (or the signature ages), saved in one transaction and
//! published retained only after it commits.

use crate::fleet::device_view;
use crate::hub::{Hub, unix_now};
use anyhow::Result;
use flotilla_hub_core::{DeviceView, place};
use flotilla_mqtt::Publisher;
use flotilla_shared::DeviceId;
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::trust::{self, DocType};
use flotilla_shared::wire::{DesiredState, WorkloadSpec};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// Lifetime of a signed desired state; re-signed (new generation, same content) when less than a third is left.
pub const DESIRED_TTL_SECS: u64 = 7 * 86_400;

/// What the hub remembers of published desired states, so that an unchanged fleet costs no store reads.
#[derive(Debug, Default)]
pub struct DesiredCache {
    /// The last published (generation, content, expiry) per device.
    published: BTreeMap<DeviceId, (u64, Vec<u8>, u64)>,
    /// Desired states saved but not yet accepted by the MQTT client (queue full), by device.
    unpublished: BTreeMap<DeviceId, Vec<u8>>,
    /// While `reconcile_fleet` saves desired states in one transaction: what to publish after it commits.
    batch: Option<Vec<(DeviceId, Vec<u8>)>>,
    /// Whether this process has re-published the stored desired states (once, on the first broker connection).
    republished: bool,
}

impl Hub {
    /// The broker (re)connected: the first time in this process, hand it every stored desired state.
    pub(crate) fn on_broker_connected(&mut self) {
        if !self.desired.republished {
            self.republish_stored();
        }
    }

    /// Places every deployment and publishes changed desired states.
    pub fn reconcile_fleet(&mut self) -> Result<()> {
        let started = Instant::now();
        let now = unix_now();
        let views: Vec<DeviceView> = self
            .store
            .with_devices(|rows| rows.map(device_view).collect())?;
        let mut per_device: BTreeMap<DeviceId, Vec<WorkloadSpec>> = BTreeMap::new();
        for (name, d) in &self.deployments {
            let specs = match self.resolve(d) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(deployment = %name, error = %e, "cannot resolve deployment");
                    continue;
                }
            };
            // During a rollout only the devices it moved run the new specs; everyone else keeps the stable ones.
            let active = self.rollouts.get(name).filter(|r| !r.rollout.is_finished());
            let stable_specs = match active.and_then(|r| r.stable.as_ref()) {
                Some(stable) => Some(self.resolve(stable).map_err(|e| anyhow::anyhow!("{e}"))?),
                None => None,
            };
            let previous: BTreeSet<DeviceId> = self.store.placements(name)?.into_iter().collect();
            let placement = place(&views, &d.target, &d.policy, &d.constraints, &previous, now);
            let chosen: Vec<DeviceId> = placement.chosen.iter().cloned().collect();
            if placement.chosen != previous {
                self.store.set_placements(name, &chosen)?;
            }
            for id in chosen {
                let on_new = active.is_none_or(|r| r.rollout.on_new.contains(&id));
                let use_specs = if on_new {
                    &specs
                } else {
                    stable_specs.as_ref().unwrap_or(&specs)
                };
                per_device
                    .entry(id)
                    .or_default()
                    .extend(use_specs.iter().cloned());
            }
        }
        self.metrics.last_placement_secs = started.elapsed().as_secs_f64();
        for (device, bytes) in std::mem::take(&mut self.desired.unpublished) {
            if self
                .link
                .publish(
                    &topics::device(&device, DeviceTopic::Desired),
                    bytes.clone(),
                    true,
                )
                .is_err()
            {
                self.desired.unpublished.insert(device, bytes);
                self.dirty = true;
            }
        }
        // Every changed desired state is saved in one transaction (one fsync for the fleet, not one per device)
        // and published only after it commits: a crash in between must not leave a published generation the
        // store does not know, which the hub would then reuse for different content.
        self.store.begin()?;
        self.desired.batch = Some(Vec::new());
        let mut result = Ok(());
        for d in views.iter().map(|v| &v.id) {
            let mut workloads = per_device.remove(d).unwrap_or_default();
            workloads.sort_by(|a, b| a.name.cmp(&b.name));
            result = self.publish_desired(d, workloads, now);
            if result.is_err() {
                break;
            }
        }
        let batch = self.desired.batch.take().unwrap_or_default();
        if let Err(e) = result.and_then(|()| Ok(self.store.commit()?)) {
            self.store.rollback();
            // The cache holds generations that were never committed; it reloads from the store on a miss.
            self.desired.published.clear();
            return Err(e);
        }
        for (device, bytes) in batch {
            self.send_desired(device, bytes);
        }
        Ok(())
    }

    /// Publishes every stored desired state once after the hub starts: a previous run may have committed some and
    /// died before handing them to the broker, and placement only publishes what changed. Devices ignore a
    /// re-delivery of the state they already hold.
    fn republish_stored(&mut self) {
        match self.store.all_desired() {
            Ok(all) => {
                let n = all.len();
                for (device, signed) in all {
                    match codec::encode(&Message::DesiredState(signed)) {
                        Ok(bytes) => self.send_desired(device, bytes),
                        Err(e) => {
                            tracing::error!(device = %device, error = %e, "stored desired state")
                        }
                    }
                }
                self.desired.republished = true;
                tracing::info!(
                    devices = n,
                    "stored desired states re-published after start"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read stored desired states; retrying on reconnect")
            }
        }
    }

    /// Hands a saved desired state to the broker, or keeps it for the next tick if the link queue is full.
    fn send_desired(&mut self, device: DeviceId, bytes: Vec<u8>) {
        if let Err(e) = self.link.publish(
            &topics::device(&device, DeviceTopic::Desired),
            bytes.clone(),
            true,
        ) {
            tracing::warn!(device = %device, error = %e, "desired state publish deferred");
            self.desired.unpublished.insert(device, bytes);
            self.dirty = true;
            return;
        }
        self.metrics.desired_published += 1;
        tracing::debug!(device = %device, "desired state published");
    }

    /// Signs and publishes a device's desired state if its content changed or its signature is getting old.
    pub(crate) fn publish_desired(
        &mut self,
        device: &DeviceId,
        workloads: Vec<WorkloadSpec>,
        now: u64,
    ) -> Result<()> {
        let content = postcard::to_stdvec(&workloads)?;
        // The last published (generation, content, expiry) per device, cached: this runs for every device every
        // second, and the store is the source of truth only on a cache miss.
        if !self.desired.published.contains_key(device)
            && let Some((g, c, _, e)) = self.store.desired(device)?
        {
            self.desired.published.insert(device.clone(), (g, c, e));
        }
        let generation = match self.desired.published.get(device) {
            Some((_, c, expires))
                if *c == content && expires.saturating_sub(now) > DESIRED_TTL_SECS / 3 =>
            {
                return Ok(());
            }
            Some((g, ..)) => g + 1,
            // A device with nothing deployed and no history gets nothing (no retained message to clean up).
            None if workloads.is_empty() => return Ok(()),
            None => 1,
        };
        let ds = DesiredState {
            device: device.clone(),
            generation,
            issued_at: now,
            expires_at: now + DESIRED_TTL_SECS,
            workloads,
        };
        let signed = trust::sign(DocType::DesiredState, &ds, &[&self.hub_key]);
        let bytes = codec::encode(&Message::DesiredState(signed.clone()))?;
        // Persist first: a crash after publishing but before saving would reuse the generation number.
        self.store
            .save_desired(device, generation, &content, &signed, now, ds.expires_at)?;
        self.desired
            .published
            .insert(device.clone(), (generation, content, ds.expires_at));
        tracing::info!(device = %device, generation, workloads = ds.workloads.len(), "desired state signed");
        match &mut self.desired.batch {
            // Published by `reconcile_fleet` once the batch has committed.
            Some(batch) => batch.push((device.clone(), bytes)),
            None => self.send_desired(device.clone(), bytes),
        }
        Ok(())
    }

    /// The generation last published to a device (from the in-memory cache when possible).
    pub fn desired_generation(&self, device: &DeviceId) -> u64 {
        match self.desired.published.get(device) {
            Some((g, ..)) => *g,
            None => self
                .store
                .desired(device)
                .ok()
                .flatten()
                .map_or(0, |(g, ..)| g),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DESIRED_TTL_SECS;
    use crate::hub::test_support::{spec, test_hub};
    use crate::hub::{Event, Hub};
    use flotilla_mqtt::LinkEvent;
    use flotilla_shared::DeviceId;
    use flotilla_shared::codec;
    use flotilla_shared::wire::DesiredState;

    /// A new generation is signed only when the content changes or the signature is in its last third of life;
    /// an unchanged state is left alone (the time is a parameter, so no waiting).
    #[tokio::test]
    async fn generation_changes_only_on_content_or_resign() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut hub, _rx) = test_hub(dir.path());
        let dev = DeviceId::new("gw-1").expect("id");
        let generation = |h: &Hub| h.store.desired(&dev).expect("read").map_or(0, |(g, ..)| g);
        let t0 = 1_000_000;
        hub.publish_desired(&dev, vec![], t0).expect("publish");
        assert_eq!(
            generation(&hub),
            0,
            "nothing to publish for an empty device without history"
        );
        hub.publish_desired(&dev, vec![spec("a")], t0)
            .expect("publish");
        assert_eq!(generation(&hub), 1);
        hub.publish_desired(&dev, vec![spec("a")], t0 + 86_400)
            .expect("publish");
        assert_eq!(
            generation(&hub),
            1,
            "unchanged content, fresh signature: no new generation"
        );
        hub.publish_desired(&dev, vec![spec("a")], t0 + DESIRED_TTL_SECS * 2 / 3 + 1)
            .expect("publish");
        assert_eq!(generation(&hub), 2, "re-signed before expiry");
        hub.publish_desired(&dev, vec![spec("a"), spec("b")], t0 + DESIRED_TTL_SECS)
            .expect("publish");
        assert_eq!(generation(&hub), 3, "content changed");
        let (_, _, signed, expires) = hub.store.desired(&dev).expect("read").expect("stored");
        let ds: DesiredState = codec::decode_exact(&signed.body).expect("decode");
        assert_eq!(
            (ds.generation, ds.workloads.len(), expires),
            (3, 2, t0 + 2 * DESIRED_TTL_SECS)
        );
    }

    /// After a restart the hub re-publishes every stored desired state once, on its first broker connection: the
    /// previous process may have committed them and died before handing them to the broker.
    #[tokio::test]
    async fn stored_desired_states_republished_once_after_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut first, _rx1) = test_hub(dir.path());
        for d in ["gw-1", "gw-2"] {
            let d = DeviceId::new(d).expect("id");
            first
                .publish_desired(&d, vec![spec("a")], 1_000_000)
                .expect("publish");
        }
        drop(first);
        let (mut second, _rx2) = test_hub(dir.path());
        assert_eq!(second.metrics.desired_published, 0);
        second.handle(Event::Link(LinkEvent::Connected));
        assert_eq!(second.metrics.desired_published, 2);
        second.handle(Event::Link(LinkEvent::Connected));
        assert_eq!(second.metrics.desired_published, 2, "only once per process");
    }
}
