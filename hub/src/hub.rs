//! The hub loop: the single owner of the hub store. MQTT messages, API calls and ticks arrive as [`Event`]s;
//! placement runs in the sans-IO core; desired states are signed and published retained only when they change.

use crate::spec::{self, Deployment, ReleaseRef};
use crate::store::{DeviceRow, Store, TokenPresets};
use anyhow::{Context, Result};
use flotilla_hub_core::rollout::{self, Observation, Phase, Rollout};
use flotilla_hub_core::{DeviceView, Excluded, place};
use flotilla_mqtt::{Link, LinkEvent, Publisher};
use flotilla_shared::codec::{self, MAX_CHUNK_DATA, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::trust::{self, DocType, SigningKey};
use flotilla_shared::wire::{
    ArtifactChunk, ArtifactRef, ArtifactRequest, DesiredState, EnrollRequest, EnrollResponse,
    Inventory, Root, Signed, WorkloadKind, WorkloadSpec, WorkloadState,
};
use flotilla_shared::{DeviceId, Digest, Label};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek};
use std::time::Instant;
use tokio::sync::mpsc;

/// Lifetime of a signed desired state; re-signed (new generation, same content) when less than a third is left.
pub const DESIRED_TTL_SECS: u64 = 7 * 86_400;

/// A closure run on the hub loop with exclusive access; how API handlers talk to the owner.
pub type Call = Box<dyn FnOnce(&mut Hub) + Send>;

/// Everything the hub loop reacts to.
pub enum Event {
    Link(LinkEvent),
    Call(Call),
    Tick,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Link(e) => write!(f, "Link({e:?})"),
            Self::Call(_) => f.write_str("Call"),
            Self::Tick => f.write_str("Tick"),
        }
    }
}

/// Counters exported on `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct HubMetrics {
    pub desired_published: u64,
    pub reports_accepted: u64,
    pub reports_rejected: u64,
    pub messages_rejected: u64,
    pub chunks_served: u64,
    pub telemetry_records: u64,
    pub enrollments: u64,
    pub last_placement_secs: f64,
    /// Seconds between a report's `sent_at` and its arrival, last seen.
    pub report_lag_secs: f64,
}

/// A rollout the hub drives, with the two versions of the deployment it moves devices between.
#[derive(Debug)]
pub struct DeploymentRollout {
    pub rollout: Rollout,
    pub stable_source: String,
    pub target_source: String,
    stable: Option<Deployment>,
    /// The last snapshot written to the store (writes happen only on change).
    persisted: Vec<u8>,
}

/// What the hub keeps of one telemetry stream of one device (in memory: the latest view, not history).
#[derive(Debug, Clone, Default)]
pub struct StreamStats {
    pub records: u64,
    /// Records whose sequence number was not above the last one seen (redeliveries).
    pub duplicates: u64,
    /// Sequence numbers skipped (records the device dropped from its outbox, or lost).
    pub gaps: u64,
    pub last_seq: u64,
    pub last_at: u64,
    /// Latest value of each named metric (for `Metrics` payloads).
    pub metrics: BTreeMap<String, f64>,
    /// Size of the latest opaque payload (for `Bytes` payloads).
    pub last_bytes: usize,
}

/// The hub's state, owned by its loop.
pub struct Hub {
    pub store: Store,
    link: Link,
    hub_key: SigningKey,
    root: Root,
    root_signed: Signed,
    deployments: BTreeMap<String, Deployment>,
    pub rollouts: BTreeMap<String, DeploymentRollout>,
    pub telemetry: BTreeMap<(DeviceId, String), StreamStats>,
    /// Last telemetry sequence number per device (sequence numbers are per device, across streams).
    telemetry_seq: BTreeMap<DeviceId, u64>,
    known_devices: BTreeSet<DeviceId>,
    published: BTreeMap<DeviceId, (u64, Vec<u8>, u64)>,
    /// Desired states saved but not yet accepted by the MQTT client (queue full), by device.
    unpublished: BTreeMap<DeviceId, Vec<u8>>,
    /// While `reconcile_fleet` saves desired states in one transaction: what to publish after it commits.
    batch: Option<Vec<(DeviceId, Vec<u8>)>>,
    /// Whether this process has re-published the stored desired states (once, on the first broker connection).
    republished: bool,
    pub metrics: HubMetrics,
    dirty: bool,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("deployments", &self.deployments.len())
            .finish_non_exhaustive()
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why an operator request was refused; mapped to HTTP problem responses by the API layer.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::store::StoreError> for HubError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Internal(e.to_string())
    }
}

fn device_view(d: &DeviceRow) -> DeviceView {
    DeviceView {
        id: d.id.clone(),
        labels: d.inventory.labels.iter().cloned().collect(),
        region: d.inventory.region.as_ref().map(|r| r.to_string()),
        zone: d.inventory.zone.as_ref().map(|z| z.to_string()),
        location: d.inventory.location,
        arch: d.inventory.arch.clone(),
        runtimes: d.inventory.runtimes.clone(),
        memory_mib: d.inventory.memory_mib,
        online: d.online,
        offline_since: d.offline_since,
    }
}

/// Rejects inventories that would poison placement (non-finite positions, absurd labels).
fn validate_inventory(inv: &Inventory) -> Result<(), String> {
    if let Some(l) = inv.location
        && !(l.lat.is_finite() && l.lon.is_finite() && l.lat.abs() <= 90.0 && l.lon.abs() <= 180.0)
    {
        return Err("location is not a valid latitude/longitude".into());
    }
    if inv.labels.len() > 64
        || inv
            .labels
            .iter()
            .any(|(k, v)| k.len() > 64 || v.len() > 256)
    {
        return Err("too many or too long labels".into());
    }
    Ok(())
}

impl Hub {
    pub fn new(store: Store, link: Link, hub_key: SigningKey, root_signed: Signed) -> Result<Self> {
        let root = trust::verify_initial_root(&root_signed, unix_now()).context("hub root")?;
        let mut deployments = BTreeMap::new();
        for (name, source, ..) in store.deployments()? {
            match spec::parse(&name, &source) {
                Ok(d) => {
                    deployments.insert(name, d);
                }
                Err(e) => {
                    tracing::error!(deployment = %name, error = %e, "stored deployment no longer parses")
                }
            }
        }
        let mut rollouts = BTreeMap::new();
        for (name, stable_source, target_source, snapshot) in store.rollouts()? {
            // A restarted hub continues each rollout from its last persisted transition.
            match postcard::from_bytes::<Rollout>(&snapshot) {
                Ok(rollout) => {
                    let stable = spec::parse(&name, &stable_source).ok();
                    rollouts.insert(
                        name,
                        DeploymentRollout {
                            rollout,
                            stable_source,
                            target_source,
                            stable,
                            persisted: snapshot,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(deployment = %name, error = %e, "stored rollout does not decode")
                }
            }
        }
        Ok(Self {
            store,
            link,
            hub_key,
            root,
            root_signed,
            deployments,
            rollouts,
            telemetry: BTreeMap::new(),
            telemetry_seq: BTreeMap::new(),
            known_devices: BTreeSet::new(),
            published: BTreeMap::new(),
            unpublished: BTreeMap::new(),
            batch: None,
            republished: false,
            metrics: HubMetrics::default(),
            dirty: true,
        })
    }

    /// The hub's subscriptions (re-issued on every reconnect by the link).
    pub fn subscriptions() -> Vec<String> {
        vec![
            topics::all_devices(DeviceTopic::Report),
            topics::all_devices(DeviceTopic::Presence),
            topics::all_devices(DeviceTopic::ArtifactRequest),
            topics::ENROLL_REQUESTS.to_owned(),
            topics::telemetry_filter(None),
        ]
    }

    /// Runs the loop until the event channel closes.
    pub async fn run(
        mut self,
        mut link_rx: mpsc::Receiver<LinkEvent>,
        mut calls: mpsc::Receiver<Call>,
    ) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            let ev = tokio::select! {
                Some(e) = link_rx.recv() => Event::Link(e),
                Some(c) = calls.recv() => Event::Call(c),
                _ = tick.tick() => Event::Tick,
                else => break,
            };
            self.handle(ev);
        }
    }

    pub fn handle(&mut self, ev: Event) {
        // Placement runs at most once per tick: a burst of enrollments or reports must not cost a fleet-wide
        // re-placement each (API calls that change deployments re-place immediately themselves).
        let tick = matches!(ev, Event::Tick);
        match ev {
            Event::Link(LinkEvent::Connected) => {
                tracing::info!("hub connected to broker");
                self.dirty = true;
                if !self.republished {
                    self.republish_stored();
                }
            }
            Event::Link(LinkEvent::Disconnected(e)) => {
                tracing::warn!(error = %e, "hub lost the broker")
            }
            Event::Link(LinkEvent::Message { topic, payload }) => self.on_message(&topic, &payload),
            Event::Call(f) => f(self),
            Event::Tick => {
                // Grace periods and expiry move with time alone; re-place once a second at most.
                self.dirty = true;
                let now = unix_now();
                self.check_telemetry_gates(now);
                for r in self.rollouts.values_mut() {
                    r.rollout.tick(now);
                }
            }
        }
        self.drive_rollouts();
        if self.dirty && tick {
            self.dirty = false;
            if let Err(e) = self.reconcile_fleet() {
                tracing::error!(error = %e, "placement failed");
            }
        }
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        if let Some(nonce) = topics::parse_enroll_request(topic) {
            match codec::decode(payload) {
                Ok(Message::EnrollRequest(req)) => self.on_enroll(nonce.to_owned(), req),
                _ => self.metrics.messages_rejected += 1,
            }
            return;
        }
        if let Some((_, device, stream)) = topics::parse_telemetry(topic) {
            self.on_telemetry(&device, stream.as_str(), payload);
            return;
        }
        let Some((device, leaf)) = topics::parse_device(topic) else {
            self.metrics.messages_rejected += 1;
            return;
        };
        let msg = match codec::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(topic, error = %e, "undecodable message");
                self.metrics.messages_rejected += 1;
                return;
            }
        };
        let result = match (leaf, msg) {
            (DeviceTopic::Report, Message::Report(signed)) => self.on_report(&device, &signed),
            (DeviceTopic::Presence, Message::Presence(p)) => {
                // Presence is unsigned (the broker's last will); it only moves online/offline, never state.
                if self.store.device_exists(&device).unwrap_or(false) {
                    let _ = self.store.set_presence(&device, p.online, unix_now());
                    self.dirty = true;
                }
                Ok(())
            }
            (DeviceTopic::ArtifactRequest, Message::ArtifactRequest(req)) => {
                self.on_artifact_request(&device, req)
            }
            _ => Err("message kind does not belong on this topic".to_owned()),
        };
        if let Err(e) = result {
            tracing::warn!(device = %device, topic, error = %e, "message rejected");
            self.metrics.messages_rejected += 1;
        }
    }

    /// Telemetry ingestion: per device and stream, counts, gaps, redeliveries and the latest metric values.
    fn on_telemetry(&mut self, device: &DeviceId, stream: &str, payload: &[u8]) {
        let records = match codec::decode(payload) {
            Ok(Message::Telemetry(r)) => r,
            _ => {
                self.metrics.messages_rejected += 1;
                return;
            }
        };
        // Topic and payload must agree; unknown devices are not tracked (the broker's ACLs keep them out).
        if !self.known_devices.contains(device)
            && !self.store.device_exists(device).unwrap_or(false)
        {
            self.metrics.messages_rejected += 1;
            return;
        }
        self.known_devices.insert(device.clone());
        for rec in records {
            if &rec.device != device || rec.stream.as_str() != stream {
                self.metrics.messages_rejected += 1;
                continue;
            }
            self.metrics.telemetry_records += 1;
            let last = self.telemetry_seq.entry(device.clone()).or_insert(0);
            let st = self
                .telemetry
                .entry((device.clone(), stream.to_owned()))
                .or_default();
            if rec.seq <= *last {
                st.duplicates += 1;
                continue;
            }
            if *last > 0 {
                st.gaps += rec.seq - *last - 1;
            }
            *last = rec.seq;
            st.records += 1;
            st.last_seq = rec.seq;
            st.last_at = rec.at;
            match rec.payload {
                flotilla_shared::wire::TelemetryPayload::Bytes(b) => st.last_bytes = b.len(),
                flotilla_shared::wire::TelemetryPayload::Metrics(m) => st.metrics.extend(m),
            }
        }
    }

    fn respond_enroll(&self, nonce: &str, resp: EnrollResponse) {
        if let Ok(bytes) = codec::encode(&Message::EnrollResponse(resp)) {
            let _ = self
                .link
                .publish(&topics::enroll_response(nonce), bytes, false);
        }
    }

    fn on_enroll(&mut self, nonce: String, req: EnrollRequest) {
        let now = unix_now();
        if let Err(e) = validate_inventory(&req.inventory) {
            self.respond_enroll(&nonce, EnrollResponse::Refused { reason: e });
            return;
        }
        let id = match req.requested_id.clone() {
            Some(id) => id,
            None => match DeviceId::new(format!("dev-{}", trust::random_hex(4))) {
                Ok(id) => id,
                Err(_) => return,
            },
        };
        // An already-registered device re-sending its request (lost response) gets the same answer again.
        if let Ok(Some(d)) = self.store.device(&id) {
            let resp = if d.public_key == req.public_key {
                EnrollResponse::Accepted {
                    device: id,
                    root: self.root_signed.clone(),
                }
            } else {
                EnrollResponse::Refused {
                    reason: format!("device id {} is taken", d.id),
                }
            };
            self.respond_enroll(&nonce, resp);
            return;
        }
        // Token use, registration and the audit entry commit together (one fsync, and a token is never burned
        // without a device to show for it).
        let mut inv = req.inventory;
        let key = req.public_key;
        let result = self.store.transaction(|store| {
            let presets = match store.consume_enroll_token(&req.token, &id, now)? {
                Ok(p) => p,
                Err(e) => return Ok(Err(e)),
            };
            apply_presets(&mut inv, &presets);
            store.insert_device(&id, &key, &inv, now)?;
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
        self.metrics.enrollments += 1;
        tracing::info!(device = %id, "device enrolled");
        self.respond_enroll(
            &nonce,
            EnrollResponse::Accepted {
                device: id,
                root: self.root_signed.clone(),
            },
        );
        self.dirty = true;
    }

    fn on_report(&mut self, device: &DeviceId, signed: &Signed) -> Result<(), String> {
        let d = self
            .store
            .device(device)
            .map_err(|e| e.to_string())?
            .ok_or("report from an unknown device")?;
        let report = match trust::verify_report(&d.public_key, device, signed, d.report_counter) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.reports_rejected += 1;
                return Err(e.to_string());
            }
        };
        if let Some(inv) = &report.inventory {
            validate_inventory(inv)?;
        }
        let now = unix_now();
        self.metrics.report_lag_secs = now.saturating_sub(report.sent_at) as f64;
        // What the operator set at enrollment (token presets) stays authoritative over what the device reports.
        let mut report = report;
        let mut inventory_changed = false;
        if let Some(reported) = report.inventory.take() {
            let mut merged = reported;
            for (k, v) in &d.inventory.labels {
                merged.labels.retain(|(k2, _)| k2 != k);
                merged.labels.push((k.clone(), v.clone()));
            }
            merged.region = d.inventory.region.clone().or(merged.region);
            merged.zone = d.inventory.zone.clone().or(merged.zone);
            inventory_changed = merged != d.inventory;
            report.inventory = Some(merged);
        }
        self.store
            .save_report(device, &report, now)
            .map_err(|e| e.to_string())?;
        self.metrics.reports_accepted += 1;
        self.observe_for_rollouts(device, &report, now);
        if inventory_changed || !d.online {
            self.dirty = true;
        }
        Ok(())
    }

    fn on_artifact_request(
        &mut self,
        device: &DeviceId,
        req: ArtifactRequest,
    ) -> Result<(), String> {
        let topic = topics::device(device, DeviceTopic::ArtifactChunk);
        let max = (req.max_len as usize).clamp(1, MAX_CHUNK_DATA);
        let chunk = match req.what {
            ArtifactRef::Release(d) => match self
                .store
                .release_by_digest(&d)
                .map_err(|e| e.to_string())?
            {
                Some(row) => {
                    let bytes = postcard::to_stdvec(&row.signed).map_err(|e| e.to_string())?;
                    slice_chunk(req.what, &bytes, req.offset, max)
                }
                None => ArtifactChunk::NotFound { what: req.what },
            },
            ArtifactRef::Blob(d) => {
                let path = self.store.blob_path(&d);
                match std::fs::File::open(&path) {
                    Ok(mut f) => {
                        let total = f.metadata().map_err(|e| e.to_string())?.len();
                        let offset = req.offset.min(total);
                        f.seek(std::io::SeekFrom::Start(offset))
                            .map_err(|e| e.to_string())?;
                        let mut data =
                            vec![0u8; max.min(usize::try_from(total - offset).unwrap_or(max))];
                        f.read_exact(&mut data).map_err(|e| e.to_string())?;
                        ArtifactChunk::Data {
                            what: req.what,
                            offset,
                            total,
                            data,
                        }
                    }
                    Err(_) => ArtifactChunk::NotFound { what: req.what },
                }
            }
        };
        let bytes = codec::encode(&Message::ArtifactChunk(chunk)).map_err(|e| e.to_string())?;
        self.link
            .publish(&topic, bytes, false)
            .map_err(|e| e.to_string())?;
        self.metrics.chunks_served += 1;
        Ok(())
    }

    /// Resolves a deployment's workloads into specs (release digests and kinds).
    fn resolve(&self, d: &Deployment) -> Result<Vec<WorkloadSpec>, HubError> {
        let mut out = Vec::new();
        for (i, w) in d.workloads.iter().enumerate() {
            let row = match &w.release {
                ReleaseRef::Version { name, version } => {
                    self.store.release_by_version(name, version)?
                }
                ReleaseRef::Digest(dg) => self.store.release_by_digest(dg)?,
            }
            .ok_or_else(|| {
                HubError::BadRequest(format!(
                    "workloads[{i}].release: no such release {:?}",
                    w.release
                ))
            })?;
            if row.release.name != w.name {
                return Err(HubError::BadRequest(format!(
                    "workloads[{i}].release: release is for workload {}, not {}",
                    row.release.name, w.name
                )));
            }
            out.push(WorkloadSpec {
                name: w.name.clone(),
                kind: row.release.kind,
                release: row.digest,
                config: w.config.clone(),
                resources: w.resources,
                restart: w.restart,
                health: w.health,
                tick_ms: w.tick_ms,
                geofence: w.geofence.clone(),
            });
        }
        Ok(out)
    }

    /// Validates and stores a deployment spec, then re-places. Nothing changes if anything is invalid.
    pub fn apply(
        &mut self,
        file: &str,
        source: &str,
        who: &str,
    ) -> Result<(String, u64), HubError> {
        let d = spec::parse(file, source).map_err(|e| HubError::BadRequest(e.to_string()))?;
        self.resolve(&d)?;
        for (other_name, other) in &self.deployments {
            if other_name == d.name.as_str() {
                continue;
            }
            if let Some(w) = d
                .workloads
                .iter()
                .find(|w| other.workloads.iter().any(|o| o.name == w.name))
            {
                return Err(HubError::Conflict(format!(
                    "workload {} is already deployed by deployment {other_name}",
                    w.name
                )));
            }
        }
        let now = unix_now();
        let name = d.name.to_string();
        if self
            .rollouts
            .get(&name)
            .is_some_and(|r| !r.rollout.is_finished())
        {
            return Err(HubError::Conflict(format!(
                "a rollout of {name} is in progress; wait for it, or abort it with `flotilla rollout abort {name}`"
            )));
        }
        let previous = self.store.deployment_source(&name)?;
        let rollout_from = match (&d.rollout, &previous, self.deployments.get(&name)) {
            (Some(_), Some(prev_source), Some(prev))
                if self.resolve(prev)? != self.resolve(&d)? =>
            {
                Some((prev_source.clone(), prev.clone()))
            }
            _ => None,
        };
        let rev = self.store.upsert_deployment(d.name.as_str(), source, now)?;
        self.store.audit(
            now,
            who,
            "apply",
            &format!("deployment {} revision {rev}", d.name),
        )?;
        if let (Some((stable_source, stable)), Some(plan)) = (rollout_from, d.rollout.clone()) {
            let devices = self.store.devices()?;
            let members: Vec<(DeviceId, Option<String>)> = self
                .store
                .placements(&name)?
                .into_iter()
                .map(|id| {
                    let region = devices
                        .iter()
                        .find(|x| x.id == id)
                        .and_then(|x| x.inventory.region.as_ref().map(|r| r.to_string()));
                    (id, region)
                })
                .collect();
            let rollout = Rollout::start(plan, &members, now);
            self.store.audit(
                now,
                who,
                "rollout-start",
                &format!("deployment {name}: {} devices", members.len()),
            )?;
            self.rollouts.insert(
                name.clone(),
                DeploymentRollout {
                    rollout,
                    stable_source,
                    target_source: source.to_owned(),
                    stable: Some(stable),
                    persisted: vec![],
                },
            );
        }
        self.deployments.insert(name.clone(), d);
        self.drive_rollouts();
        self.reconcile_fleet()
            .map_err(|e| HubError::Internal(e.to_string()))?;
        Ok((name, rev))
    }

    pub fn delete_deployment(&mut self, name: &str, who: &str) -> Result<(), HubError> {
        if !self.store.delete_deployment(name)? {
            return Err(HubError::NotFound(format!("no deployment {name}")));
        }
        self.deployments.remove(name);
        self.store
            .audit(unix_now(), who, "delete", &format!("deployment {name}"))?;
        self.reconcile_fleet()
            .map_err(|e| HubError::Internal(e.to_string()))?;
        Ok(())
    }

    pub fn deployments(&self) -> &BTreeMap<String, Deployment> {
        &self.deployments
    }

    /// Stores a release after checking its signatures against the root and that its artifact is present.
    pub fn push_release(
        &mut self,
        signed: Signed,
        who: &str,
    ) -> Result<(Digest, String), HubError> {
        let release: flotilla_shared::wire::Release = codec::decode_exact(&signed.body)
            .map_err(|e| HubError::BadRequest(format!("release: {e}")))?;
        let digest = trust::document_digest(&signed);
        // Verify with the same check a device runs, so a release the fleet would refuse is refused here.
        let probe = WorkloadSpec {
            name: release.name.clone(),
            kind: release.kind,
            release: digest,
            config: vec![],
            resources: flotilla_shared::wire::Resources {
                memory_mib: 1,
                cpu_ms: 1,
            },
            restart: flotilla_shared::wire::RestartPolicy::Never,
            health: flotilla_shared::wire::HealthRule::RunningFor(0),
            tick_ms: 0,
            geofence: None,
        };
        trust::verify_release_for(&self.root, &signed, &probe, &trust::TrustFloor::default())
            .map_err(|e| HubError::BadRequest(format!("release rejected: {e}")))?;
        let blob = self.store.blob_path(&release.artifact_digest);
        let size = std::fs::metadata(&blob).map(|m| m.len()).map_err(|_| {
            HubError::BadRequest(format!(
                "artifact {} has not been uploaded",
                release.artifact_digest
            ))
        })?;
        if size != release.artifact_size {
            return Err(HubError::BadRequest(
                "uploaded artifact size differs from the release".into(),
            ));
        }
        if self
            .store
            .release_by_version(release.name.as_str(), &release.version)?
            .is_some()
        {
            return Err(HubError::Conflict(format!(
                "release {}@{} exists",
                release.name, release.version
            )));
        }
        let now = unix_now();
        self.store.insert_release(&digest, &release, &signed, now)?;
        self.store.audit(
            now,
            who,
            "release",
            &format!("{}@{} {}", release.name, release.version, digest),
        )?;
        Ok((digest, format!("{}@{}", release.name, release.version)))
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
        let tokens: Vec<String> = (0..count)
            .map(|_| format!("fet_{}", trust::random_hex(16)))
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
        for (device, bytes) in std::mem::take(&mut self.unpublished) {
            if self
                .link
                .publish(
                    &topics::device(&device, DeviceTopic::Desired),
                    bytes.clone(),
                    true,
                )
                .is_err()
            {
                self.unpublished.insert(device, bytes);
                self.dirty = true;
            }
        }
        // Every changed desired state is saved in one transaction (one fsync for the fleet, not one per device)
        // and published only after it commits: a crash in between must not leave a published generation the
        // store does not know, which the hub would then reuse for different content.
        self.store.begin()?;
        self.batch = Some(Vec::new());
        let mut result = Ok(());
        for d in views.iter().map(|v| &v.id) {
            let mut workloads = per_device.remove(d).unwrap_or_default();
            workloads.sort_by(|a, b| a.name.cmp(&b.name));
            result = self.publish_desired(d, workloads, now);
            if result.is_err() {
                break;
            }
        }
        let batch = self.batch.take().unwrap_or_default();
        if let Err(e) = result.and_then(|()| Ok(self.store.commit()?)) {
            self.store.rollback();
            // The cache holds generations that were never committed; it reloads from the store on a miss.
            self.published.clear();
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
                self.republished = true;
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
            self.unpublished.insert(device, bytes);
            self.dirty = true;
            return;
        }
        self.metrics.desired_published += 1;
        tracing::debug!(device = %device, "desired state published");
    }

    /// Signs and publishes a device's desired state if its content changed or its signature is getting old.
    fn publish_desired(
        &mut self,
        device: &DeviceId,
        workloads: Vec<WorkloadSpec>,
        now: u64,
    ) -> Result<()> {
        let content = postcard::to_stdvec(&workloads)?;
        // The last published (generation, content, expiry) per device, cached: this runs for every device every
        // second, and the store is the source of truth only on a cache miss.
        if !self.published.contains_key(device)
            && let Some((g, c, _, e)) = self.store.desired(device)?
        {
            self.published.insert(device.clone(), (g, c, e));
        }
        let generation = match self.published.get(device) {
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
        self.published
            .insert(device.clone(), (generation, content, ds.expires_at));
        tracing::info!(device = %device, generation, workloads = ds.workloads.len(), "desired state signed");
        match &mut self.batch {
            // Published by `reconcile_fleet` once the batch has committed.
            Some(batch) => batch.push((device.clone(), bytes)),
            None => self.send_desired(device.clone(), bytes),
        }
        Ok(())
    }

    /// Explains why `device` is or is not running `workload` at the expected version.
    pub fn why(&self, device: &DeviceId, workload: &str) -> Result<String, HubError> {
        let devices = self.store.devices()?;
        let d = devices
            .iter()
            .find(|d| &d.id == device)
            .ok_or_else(|| HubError::NotFound(format!("no device {device}")))?;
        let Some((dep_name, dep)) = self
            .deployments
            .iter()
            .find(|(_, dep)| dep.workloads.iter().any(|w| w.name.as_str() == workload))
        else {
            return Ok(format!("no deployment contains workload {workload}"));
        };
        let views: Vec<DeviceView> = devices.iter().map(device_view).collect();
        let previous: BTreeSet<DeviceId> = self.store.placements(dep_name)?.into_iter().collect();
        let placement = place(
            &views,
            &dep.target,
            &dep.policy,
            &dep.constraints,
            &previous,
            unix_now(),
        );
        if let Some(why) = placement.excluded.get(device) {
            return Ok(format!(
                "not selected by deployment {dep_name}: {}",
                describe_exclusion(why)
            ));
        }
        let expected = self
            .resolve(dep)?
            .into_iter()
            .find(|w| w.name.as_str() == workload);
        let desired_gen = self.store.desired(device)?.map_or(0, |(g, ..)| g);
        let offline = if d.online {
            String::new()
        } else {
            format!(
                " (offline since {})",
                d.offline_since.unwrap_or(d.last_seen)
            )
        };
        let Some(report) = &d.last_report else {
            return Ok(format!(
                "placed by {dep_name}; no report from the device yet{offline}"
            ));
        };
        if let Some(rej) = &report.last_rejection
            && rej.generation >= desired_gen
        {
            return Ok(format!(
                "desired generation {} rejected by the device: {:?}{offline}",
                rej.generation, rej.reason
            ));
        }
        if let Some(hold) = &report.hold {
            return Ok(format!("the device holds updates: {hold}{offline}"));
        }
        if report.applied_generation < desired_gen {
            return Ok(format!(
                "waiting for the device to apply generation {desired_gen} (it has {}){offline}",
                report.applied_generation
            ));
        }
        let Some(st) = report
            .workloads
            .iter()
            .find(|w| w.name.as_str() == workload)
        else {
            return Ok(format!(
                "placed, but the device does not report {workload}{offline}"
            ));
        };
        let at_expected = expected.as_ref().is_some_and(|e| e.release == st.release);
        let version = self
            .store
            .release_by_digest(&st.release)?
            .map_or_else(|| st.release.short(), |r| r.release.version);
        let text = match (st.state, &st.rejected) {
            (_, Some(reason)) => format!(
                "release rejected by the device: {reason:?}; version {version} keeps running"
            ),
            (WorkloadState::Downloading, _) => "waiting for download".to_owned(),
            (WorkloadState::HeldByGeofence, _) => {
                "held by geofence: the device is outside the workload's fence".into()
            }
            (WorkloadState::BackingOff | WorkloadState::Failed, _) => format!(
                "crash-looping ({} restarts), last error: {}",
                st.restarts,
                st.last_error.as_deref().unwrap_or("unknown")
            ),
            (WorkloadState::Running, _) if at_expected => {
                format!("running version {version} (healthy: {})", st.healthy)
            }
            (state, _) => format!(
                "{state:?} at version {version} (expected {})",
                if at_expected { "this" } else { "another" }
            ),
        };
        Ok(format!("{text}{offline}"))
    }

    /// Feeds a device's report to every active rollout that moved it to the new release.
    fn observe_for_rollouts(
        &mut self,
        device: &DeviceId,
        report: &flotilla_shared::wire::Report,
        now: u64,
    ) {
        let names: Vec<String> = self
            .rollouts
            .iter()
            .filter(|(_, r)| !r.rollout.is_finished() && r.rollout.on_new.contains(device))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let Some(target) = self
                .deployments
                .get(&name)
                .and_then(|d| self.resolve(d).ok())
            else {
                continue;
            };
            let mut healthy = true;
            let mut failure = None;
            for spec in &target {
                match report.workloads.iter().find(|w| w.name == spec.name) {
                    Some(w) if w.release == spec.release => {
                        if let Some(reason) = &w.rejected {
                            failure = Some(format!("{}: rejected {reason:?}", w.name));
                        } else if matches!(
                            w.state,
                            WorkloadState::BackingOff | WorkloadState::Failed
                        ) {
                            failure = Some(format!(
                                "{}: {}",
                                w.name,
                                w.last_error
                                    .clone()
                                    .unwrap_or_else(|| format!("{:?}", w.state))
                            ));
                        }
                        healthy &= w.state == WorkloadState::Running && w.healthy;
                    }
                    Some(w) if w.rejected.is_some() => {
                        failure = Some(format!("{}: rejected {:?}", w.name, w.rejected));
                    }
                    _ => healthy = false,
                }
            }
            let obs = match (failure, healthy, &report.hold) {
                (Some(reason), ..) => Observation::Unhealthy(reason),
                (None, true, _) => Observation::Healthy,
                (None, false, Some(hold)) => Observation::Held(hold.clone()),
                (None, false, None) => continue,
            };
            if let Some(r) = self.rollouts.get_mut(&name) {
                r.rollout.observe(now, device, obs);
            }
        }
    }

    /// Evaluates every active rollout's telemetry gates against the ingested telemetry of its devices.
    fn check_telemetry_gates(&mut self, now: u64) {
        let mut verdicts = Vec::new();
        for (name, r) in &self.rollouts {
            if r.rollout.is_finished() || r.rollout.plan.telemetry_gates.is_empty() {
                continue;
            }
            for gate in &r.rollout.plan.telemetry_gates {
                let value_of = |d: &DeviceId| {
                    self.telemetry
                        .get(&(d.clone(), gate.stream.clone()))
                        .and_then(|s| s.metrics.get(&gate.metric))
                        .copied()
                };
                let old: Vec<f64> = r
                    .rollout
                    .regions
                    .keys()
                    .filter(|d| !r.rollout.on_new.contains(*d))
                    .filter_map(&value_of)
                    .collect();
                let baseline =
                    (!old.is_empty()).then(|| old.iter().sum::<f64>() / old.len() as f64);
                for d in &r.rollout.on_new {
                    if let Some(reason) = value_of(d).and_then(|v| gate.check(v, baseline)) {
                        verdicts.push((name.clone(), d.clone(), reason));
                    }
                }
            }
        }
        for (name, device, reason) in verdicts {
            if let Some(r) = self.rollouts.get_mut(&name) {
                r.rollout
                    .observe(now, &device, Observation::Unhealthy(reason));
            }
        }
    }

    /// Applies rollout actions, finishes rollouts, and persists every changed snapshot.
    fn drive_rollouts(&mut self) {
        let now = unix_now();
        let names: Vec<String> = self.rollouts.keys().cloned().collect();
        for name in names {
            let Some(r) = self.rollouts.get_mut(&name) else {
                continue;
            };
            while let Some(rollout::Action::Assign { .. }) = r.rollout.poll_action() {
                // The assignment lives in the rollout state (`on_new`); placement reads it when re-publishing.
                self.dirty = true;
            }
            let snapshot = postcard::to_stdvec(&r.rollout).unwrap_or_default();
            if snapshot == r.persisted {
                continue;
            }
            if let Err(e) =
                self.store
                    .save_rollout(&name, &r.stable_source, &r.target_source, &snapshot, now)
            {
                tracing::error!(deployment = %name, error = %e, "cannot persist rollout");
                continue;
            }
            r.persisted = snapshot;
            self.dirty = true;
            if let Phase::Aborted { reason } = &r.rollout.phase {
                // Make the rollback permanent: the deployment is the stable version again.
                let (stable_source, reason) = (r.stable_source.clone(), reason.clone());
                if self
                    .store
                    .deployment_source(&name)
                    .ok()
                    .flatten()
                    .as_deref()
                    != Some(stable_source.as_str())
                {
                    tracing::warn!(deployment = %name, reason = %reason, "rollout aborted; rolled back");
                    let _ = self.store.set_deployment_source(&name, &stable_source, now);
                    let _ =
                        self.store
                            .audit(now, "hub", "rollout-abort", &format!("{name}: {reason}"));
                    if let Ok(d) = spec::parse(&name, &stable_source) {
                        self.deployments.insert(name.clone(), d);
                    }
                }
            } else if r.rollout.phase == Phase::Completed {
                tracing::info!(deployment = %name, "rollout completed");
            }
        }
    }

    /// Pause, resume, abort or approve the rollout of `deployment`.
    pub fn rollout_command(
        &mut self,
        deployment: &str,
        cmd: rollout::Command,
        who: &str,
    ) -> Result<(), HubError> {
        let r = self
            .rollouts
            .get_mut(deployment)
            .ok_or_else(|| HubError::NotFound(format!("no rollout for deployment {deployment}")))?;
        let now = unix_now();
        r.rollout
            .command(now, cmd)
            .map_err(|e| HubError::Conflict(e.to_string()))?;
        self.store
            .audit(now, who, "rollout", &format!("{deployment}: {cmd:?}"))?;
        self.drive_rollouts();
        self.reconcile_fleet()
            .map_err(|e| HubError::Internal(e.to_string()))?;
        Ok(())
    }

    /// The generation last published to a device (from the in-memory cache when possible).
    pub fn desired_generation(&self, device: &DeviceId) -> u64 {
        match self.published.get(device) {
            Some((g, ..)) => *g,
            None => self
                .store
                .desired(device)
                .ok()
                .flatten()
                .map_or(0, |(g, ..)| g),
        }
    }

    pub fn root(&self) -> &Root {
        &self.root
    }
}

fn describe_exclusion(e: &Excluded) -> String {
    match e {
        Excluded::Label(k) => format!("label selector `{k}` does not match"),
        Excluded::Region => "device region is not targeted".into(),
        Excluded::Zone => "device zone is not targeted".into(),
        Excluded::OutsideGeofence => "device location is outside the target geofence".into(),
        Excluded::Arch => "architecture constraint".into(),
        Excluded::Runtime => "runtime constraint".into(),
        Excluded::Memory => "memory constraint".into(),
        Excluded::NotChosen => "eligible, but the placement policy chose other devices".into(),
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

fn slice_chunk(what: ArtifactRef, bytes: &[u8], offset: u64, max: usize) -> ArtifactChunk {
    let total = bytes.len() as u64;
    let start = usize::try_from(offset.min(total)).unwrap_or(bytes.len());
    let end = start.saturating_add(max).min(bytes.len());
    ArtifactChunk::Data {
        what,
        offset: start as u64,
        total,
        data: bytes[start..end].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::wire::{HealthRule, Resources, RestartPolicy};

    fn spec(name: &str) -> WorkloadSpec {
        WorkloadSpec {
            name: flotilla_shared::WorkloadName::new(name).expect("name"),
            kind: WorkloadKind::Wasm,
            release: Digest([1; 32]),
            config: vec![],
            resources: Resources {
                memory_mib: 1,
                cpu_ms: 1,
            },
            restart: RestartPolicy::Never,
            health: HealthRule::RunningFor(1),
            tick_ms: 0,
            geofence: None,
        }
    }

    /// A hub on the store in `dir`, signing with a fixed key, whose link points at a closed port: publishes queue in
    /// the client, which is all these tests need.
    fn test_hub(dir: &std::path::Path) -> (Hub, tokio::sync::mpsc::Receiver<LinkEvent>) {
        let key = SigningKey::from_seed([9; 32]);
        let root = Root {
            version: 1,
            expires_at: u64::MAX,
            root_keys: vec![key.public()],
            root_threshold: 1,
            release_keys: vec![key.public()],
            release_threshold: 1,
            hub_keys: vec![key.public()],
            hub_threshold: 1,
        };
        let root_signed = trust::sign(DocType::Root, &root, &[&key]);
        let (link, rx) = flotilla_mqtt::connect(flotilla_mqtt::LinkSettings {
            client_id: "test".into(),
            host: "127.0.0.1".into(),
            port: 1,
            keepalive: std::time::Duration::from_secs(30),
            tls: None,
            last_will: None,
            subscriptions: vec![],
            clean_session: true,
            queue: 1024,
        })
        .expect("link");
        let store = Store::open(dir).expect("store");
        (Hub::new(store, link, key, root_signed).expect("hub"), rx)
    }

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
