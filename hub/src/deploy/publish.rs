//! Placement and desired-state publishing: every deployment is placed by the sans-IO core, each device's workloads
//! are signed into a desired state only when they change (or the signature ages), saved in one transaction and
//! published retained only after it commits.

use super::plan::{Oversize, encode_desired, flatten};
use crate::fleet::device_view;
use crate::hub::{Hub, unix_now};
use anyhow::Result;
use flotilla_hub_core::DeviceView;
use flotilla_mqtt::Publisher;
use flotilla_shared::DeviceId;
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::trust::{self, DocType};
use flotilla_shared::wire::{DesiredState, WorkloadSpec};
use std::collections::BTreeMap;
use std::time::Instant;

/// Lifetime of a signed desired state; re-signed (new generation, same content) when less than a third is left.
pub const DESIRED_TTL_SECS: u64 = 7 * 86_400;

/// What the hub remembers of published desired states, so that an unchanged fleet costs no store reads.
#[derive(Debug, Default)]
pub struct DesiredCache {
    /// The last published (generation, content, expiry) per device.
    pub(super) published: BTreeMap<DeviceId, (u64, Vec<u8>, u64)>,
    /// Desired states saved but not yet accepted by the MQTT client (queue full), by device.
    unpublished: BTreeMap<DeviceId, Vec<u8>>,
    /// While `reconcile_fleet` saves desired states in one transaction: what to publish after it commits.
    batch: Option<Vec<(DeviceId, Vec<u8>)>>,
    /// Whether this process has re-published the stored desired states (once, on the first broker connection).
    republished: bool,
    /// Deployments the last placement pass could not deliver everywhere, with the reason (shown in their status).
    pub failed: BTreeMap<String, String>,
    /// Anti-entropy: per device behind its desired generation, when its state may be re-sent next and the
    /// current backoff.
    resend: BTreeMap<DeviceId, (u64, u64)>,
}

/// First anti-entropy re-send delay after one re-send; doubles while the device stays behind, up to the maximum.
const RESEND_BACKOFF_MIN_SECS: u64 = 5;
const RESEND_BACKOFF_MAX_SECS: u64 = 300;
/// A device that has had its desired state for less than this is not behind yet, only busy receiving it.
const RESEND_GRACE_SECS: u64 = 5;

impl Hub {
    /// Anti-entropy: the device's retained desired state may have been lost or replaced (a broker restarted
    /// without persistence, a stray retained publish), so hand the stored one to the broker again. Called when a
    /// device comes online and when it reports a generation below the one it should have; re-sends back off while
    /// the device stays behind, so a device that cannot catch up costs one message per few minutes, not per report.
    pub(crate) fn resend_desired(&mut self, device: &DeviceId, why: &str) {
        if self.access.is_revoked(device) {
            return;
        }
        let now = unix_now();
        if let Some((next_at, _)) = self.desired.resend.get(device)
            && now < *next_at
        {
            return;
        }
        let signed = match self.store.desired(device) {
            Ok(Some((_, _, signed, _))) => signed,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(device = %device, error = %e, "cannot read the stored desired state");
                return;
            }
        };
        let Ok(bytes) = encode_desired(&signed) else {
            return;
        };
        let backoff = self
            .desired
            .resend
            .get(device)
            .map_or(RESEND_BACKOFF_MIN_SECS, |(_, b)| {
                (b * 2).min(RESEND_BACKOFF_MAX_SECS)
            });
        self.desired
            .resend
            .insert(device.clone(), (now + backoff, backoff));
        tracing::info!(device = %device, reason = why, "desired state re-sent");
        self.metrics.desired_resent += 1;
        self.send_desired(device.clone(), bytes);
    }

    /// A report: a device behind its desired generation for longer than it takes to deliver one gets its state
    /// again; one that caught up (or that refused this very generation, which a re-send would not change) is done.
    pub(crate) fn check_behind(
        &mut self,
        device: &DeviceId,
        report: &flotilla_shared::wire::Report,
    ) {
        let Some((desired, expires)) = self.desired.published.get(device).map(|(g, _, e)| (*g, *e))
        else {
            return;
        };
        let issued_at = expires.saturating_sub(DESIRED_TTL_SECS);
        let refused = report
            .last_rejection
            .as_ref()
            .is_some_and(|r| r.generation >= desired);
        if report.applied_generation >= desired || refused {
            self.desired.resend.remove(device);
            return;
        }
        if unix_now().saturating_sub(issued_at) >= RESEND_GRACE_SECS {
            self.resend_desired(device, "reported behind its desired generation");
        }
    }

    /// The broker (re)connected: the first time in this process, hand it every stored desired state.
    pub(crate) fn on_broker_connected(&mut self) {
        if !self.desired.republished {
            self.republish_stored();
        }
    }

    /// Places every deployment and publishes changed desired states. A deployment that cannot be resolved, or that
    /// would push a device's desired state over its cap, is marked failed (see [`DesiredCache::failed`]) and left
    /// out; every other deployment still reaches its devices.
    pub fn reconcile_fleet(&mut self) -> Result<()> {
        let started = Instant::now();
        let now = unix_now();
        self.refresh_telemetry_declarations();
        // A revoked device is out of placement, and gets no desired state at all.
        let views: Vec<DeviceView> = self.store.with_devices(|rows| {
            rows.filter(|d| !self.access.is_revoked(&d.id))
                .map(device_view)
                .collect()
        })?;
        let plan = self.plan_fleet(&self.deployments, &views, now)?;
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        for (name, reason) in &plan.unresolved {
            tracing::error!(deployment = %name, error = %reason, "cannot resolve deployment");
            failed.insert(name.clone(), reason.clone());
        }
        for (name, chosen) in &plan.placements {
            if plan.previous.get(name) != Some(chosen) {
                let chosen: Vec<DeviceId> = chosen.iter().cloned().collect();
                self.store.set_placements(name, &chosen)?;
            }
            // Telemetry resolves a stream declared by several deployments by where each is placed.
            if self.telemetry.decls.declares(name)
                && !self.telemetry.decls.placement_is(name, chosen)
            {
                self.telemetry
                    .decls
                    .set_placement(name, Some(chosen.clone()));
            }
        }
        let mut per_device = plan.per_device;
        let staged_per_device = plan.staged;
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
        'devices: for d in views.iter().map(|v| &v.id) {
            let mut groups = per_device.remove(d).unwrap_or_default();
            loop {
                let staged = staged_per_device.get(d).cloned().unwrap_or_default();
                match self.publish_desired_staged(d, flatten(&groups), staged, now) {
                    Ok(Ok(())) => break,
                    // Too large: leave out the last deployment (in name order) on this device and try again, so
                    // that one oversized deployment cannot keep the others from the device.
                    Ok(Err(over)) => match groups.pop() {
                        Some((name, _)) => {
                            tracing::error!(deployment = %name, device = %d, "left out: {over}");
                            failed
                                .entry(name)
                                .or_insert_with(|| format!("not delivered to device {d}: {over}"));
                        }
                        None => break,
                    },
                    Err(e) => {
                        result = Err(e);
                        break 'devices;
                    }
                }
            }
        }
        let batch = self.desired.batch.take().unwrap_or_default();
        if let Err(e) = result.and_then(|()| Ok(self.store.commit()?)) {
            self.slis.error(crate::slis::ControlPlaneError::Store);
            self.store.rollback();
            // The cache holds generations that were never committed; it reloads from the store on a miss.
            self.desired.published.clear();
            return Err(e);
        }
        // Scheduling latency: from the operator change (or rollout step) that made this pass publish.
        if let Some(changed) = self.inflight.changed_at.take() {
            let secs = changed.elapsed().as_secs_f64();
            for _ in &batch {
                self.slis.scheduling.observe(secs);
            }
        }
        for (device, bytes) in batch {
            self.send_desired(device, bytes);
        }
        self.desired.failed = failed;
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
            self.slis.error(crate::slis::ControlPlaneError::Publish);
            self.desired.unpublished.insert(device, bytes);
            self.dirty = true;
            return;
        }
        self.metrics.desired_published += 1;
        tracing::debug!(device = %device, "desired state published");
    }

    /// Signs and publishes a device's desired state if its content changed or its signature is getting old.
    #[cfg(test)]
    pub(crate) fn publish_desired(
        &mut self,
        device: &DeviceId,
        workloads: Vec<WorkloadSpec>,
        now: u64,
    ) -> Result<Result<(), Oversize>> {
        self.publish_desired_staged(device, workloads, vec![], now)
    }

    /// [`Hub::publish_desired`], with workloads to stage ahead of a cutover. Staging is an optimisation: when
    /// it would make the state too large, the state goes without it.
    pub(crate) fn publish_desired_staged(
        &mut self,
        device: &DeviceId,
        workloads: Vec<WorkloadSpec>,
        staged: Vec<WorkloadSpec>,
        now: u64,
    ) -> Result<Result<(), Oversize>> {
        if staged.is_empty() {
            return self.sign_and_publish(device, workloads, staged, now);
        }
        match self.sign_and_publish(device, workloads.clone(), staged, now)? {
            Ok(()) => Ok(Ok(())),
            Err(over) => {
                tracing::warn!(device = %device, "staging left out: {over}");
                self.sign_and_publish(device, workloads, vec![], now)
            }
        }
    }

    fn sign_and_publish(
        &mut self,
        device: &DeviceId,
        workloads: Vec<WorkloadSpec>,
        staged: Vec<WorkloadSpec>,
        now: u64,
    ) -> Result<Result<(), Oversize>> {
        // The stored content is the workloads' encoding (what `device show` and placement read back), followed,
        // when there are any, by the staged specs' (so a change there is a change of content too).
        let mut content = postcard::to_stdvec(&workloads)?;
        if !staged.is_empty() {
            content.extend(postcard::to_stdvec(&staged)?);
        }
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
                return Ok(Ok(()));
            }
            Some((g, ..)) => g + 1,
            // A device with nothing deployed and no history gets nothing (no retained message to clean up).
            None if workloads.is_empty() => return Ok(Ok(())),
            None => 1,
        };
        // Sealed afresh at every signing (sealing is randomised); `content` leaves them out, so an unchanged
        // state with unchanged secret versions is not re-signed.
        let sealed = self.seal_for(device, &workloads);
        let ds = DesiredState {
            device: device.clone(),
            generation,
            issued_at: now,
            expires_at: now + DESIRED_TTL_SECS,
            workloads,
            sealed,
            staged,
        };
        let signed = trust::sign(DocType::DesiredState, &ds, &[&self.hub_key]);
        let bytes = match encode_desired(&signed) {
            Ok(b) => b,
            Err(over) => return Ok(Err(over)),
        };
        // Persist first: a crash after publishing but before saving would reuse the generation number.
        self.store
            .save_desired(device, generation, &content, &signed, now, ds.expires_at)?;
        self.desired
            .published
            .insert(device.clone(), (generation, content, ds.expires_at));
        tracing::info!(device = %device, generation, workloads = ds.workloads.len(), "desired state signed");
        self.inflight.published(
            device,
            generation,
            ds.workloads
                .iter()
                .map(|w| (w.name.to_string(), w.release))
                .collect(),
            Instant::now(),
        );
        match &mut self.desired.batch {
            // Published by `reconcile_fleet` once the batch has committed.
            Some(batch) => batch.push((device.clone(), bytes)),
            None => self.send_desired(device.clone(), bytes),
        }
        Ok(Ok(()))
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
        hub.publish_desired(&dev, vec![], t0)
            .expect("publish")
            .expect("fits");
        assert_eq!(
            generation(&hub),
            0,
            "nothing to publish for an empty device without history"
        );
        hub.publish_desired(&dev, vec![spec("a")], t0)
            .expect("publish")
            .expect("fits");
        assert_eq!(generation(&hub), 1);
        hub.publish_desired(&dev, vec![spec("a")], t0 + 86_400)
            .expect("publish")
            .expect("fits");
        assert_eq!(
            generation(&hub),
            1,
            "unchanged content, fresh signature: no new generation"
        );
        hub.publish_desired(&dev, vec![spec("a")], t0 + DESIRED_TTL_SECS * 2 / 3 + 1)
            .expect("publish")
            .expect("fits");
        assert_eq!(generation(&hub), 2, "re-signed before expiry");
        hub.publish_desired(&dev, vec![spec("a"), spec("b")], t0 + DESIRED_TTL_SECS)
            .expect("publish")
            .expect("fits");
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
                .expect("publish")
                .expect("fits");
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

#[cfg(test)]
mod isolation {
    use crate::hub::test_support::test_hub;
    use crate::hub::{Hub, HubError};
    use flotilla_shared::trust::{self, DocType, SigningKey};
    use flotilla_shared::wire::{DesiredState, Inventory, Release, WorkloadKind};
    use flotilla_shared::{DeviceId, Digest, Label, WorkloadName, codec};

    /// Stores a release `name@1.0.0`, signed with the test hub's key (it holds every role in the test root).
    fn add_release(hub: &Hub, name: &str) {
        let key = SigningKey::from_seed([9; 32]);
        let release = Release {
            name: WorkloadName::new(name).expect("name"),
            version: "1.0.0".into(),
            epoch: 1,
            kind: WorkloadKind::Wasm,
            artifact_digest: Digest([7; 32]),
            artifact_size: 1,
            precompiled: vec![],
            image: None,
            compatible: None,
        };
        let signed = trust::sign(DocType::Release, &release, &[&key]);
        let digest = trust::document_digest(&signed);
        hub.store
            .insert_release(&digest, &release, &signed, 1)
            .expect("release");
    }

    fn add_device(hub: &Hub, id: &str, labels: &[(&str, &str)]) {
        let inv = Inventory {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            region: Label::new("eu-west").ok(),
            zone: None,
            location: None,
            arch: "x86_64".into(),
            runtimes: vec![WorkloadKind::Wasm],
            memory_mib: 512,
            agent_version: "test".into(),
            sealing_key: None,
            container_engine: None,
            firmware: None,
            agent_release: None,
        };
        hub.store
            .insert_device(
                &DeviceId::new(id).expect("id"),
                &SigningKey::from_seed([1; 32]).public(),
                &inv,
                1,
            )
            .expect("device");
    }

    /// A deployment `name` (one workload of the same name) on devices whose label `key` is `value`, with a config
    /// of `config_bytes`.
    fn spec(name: &str, key: &str, value: &str, config_bytes: usize) -> String {
        format!(
            "name = \"{name}\"\n[target]\nselector = {{ {key} = \"{value}\" }}\n[[workloads]]\nname = \"{name}\"\n\
             release = \"{name}@1.0.0\"\nconfig = {{ blob = \"{}\" }}\n",
            "x".repeat(config_bytes)
        )
    }

    fn workloads(hub: &Hub, id: &str) -> Vec<String> {
        hub.store
            .desired(&DeviceId::new(id).expect("id"))
            .expect("read")
            .map(|(_, _, signed, _)| {
                let ds: DesiredState = codec::decode_exact(&signed.body).expect("decode");
                ds.workloads.iter().map(|w| w.name.to_string()).collect()
            })
            .unwrap_or_default()
    }

    /// An apply that would push a device's desired state over its cap is refused before anything is stored, with
    /// the file and the workload; a deployment that only later stops fitting (a new device that two deployments
    /// target) is left out on that device and marked failed, while every other deployment and device carries on.
    #[tokio::test]
    async fn oversized_deployments_are_refused_or_isolated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut hub, _rx) = test_hub(dir.path());
        for r in ["alpha", "beta", "huge"] {
            add_release(&hub, r);
        }
        add_device(&hub, "gw-b", &[("role", "gw")]);
        let err = hub
            .apply(
                "huge.toml",
                &spec("huge", "role", "gw", 20_000),
                "test",
                false,
            )
            .expect_err("refused");
        let HubError::BadRequest(msg) = err else {
            panic!("{err:?}")
        };
        assert!(
            msg.contains("huge.toml: workloads[0] (huge)") && msg.contains("16 KiB cap"),
            "{msg}"
        );
        assert!(
            hub.store.deployment_source("huge").expect("read").is_none(),
            "a refused spec is not stored"
        );
        hub.apply(
            "alpha.toml",
            &spec("alpha", "site", "a", 9_000),
            "test",
            false,
        )
        .expect("alpha fits (no device yet)");
        hub.apply(
            "beta.toml",
            &spec("beta", "role", "gw", 9_000),
            "test",
            false,
        )
        .expect("beta fits");
        assert_eq!(workloads(&hub, "gw-b"), ["beta"]);
        // A device both target enrolls: alpha (first by name) reaches it, beta is left out there and marked failed.
        add_device(&hub, "gw-ab", &[("role", "gw"), ("site", "a")]);
        hub.reconcile_fleet().expect("placement goes on");
        assert_eq!(workloads(&hub, "gw-ab"), ["alpha"]);
        assert_eq!(workloads(&hub, "gw-b"), ["beta"], "beta still reaches gw-b");
        let reason = hub.desired.failed.get("beta").expect("beta marked failed");
        assert!(
            reason.contains("gw-ab") && reason.contains("cap"),
            "{reason}"
        );
        assert!(!hub.desired.failed.contains_key("alpha"));
        // Shrinking beta's config makes it fit again: the failure clears and gw-ab gets both.
        hub.apply("beta.toml", &spec("beta", "role", "gw", 100), "test", false)
            .expect("smaller beta");
        assert_eq!(workloads(&hub, "gw-ab"), ["alpha", "beta"]);
        assert!(hub.desired.failed.is_empty(), "{:?}", hub.desired.failed);
    }
}
