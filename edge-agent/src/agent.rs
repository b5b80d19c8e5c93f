//! The agent's main loop: the one owner of the store, the reconciler, the trust state and the workloads.
//!
//! Every reason to wake up is an [`Event`]; the loop handles it, drains the reconciler's actions into the runtime,
//! and reports when the observable state changed. Nothing here blocks for long: compiles and guest code run on
//! workload threads, MQTT I/O on the link task.

use crate::config::{Config, PositionSource};
use crate::runtime::{RunningWorkload, Runtime, RuntimeEvent, StartRequest};
use crate::store::Store;
use anyhow::{Context, Result, bail};
use flotilla_agent_core::{Action, DesiredWorkload, Millis, Reconciler, geo};
use flotilla_mqtt::{Link, LinkEvent, LinkSettings, Publisher, TlsSettings};
use flotilla_shared::codec::{self, MAX_CHUNK_DATA, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::trust::{self, ArtifactVerifier, DocType, SigningKey, TrustFloor};
use flotilla_shared::wire::{
    ArtifactChunk, ArtifactRef, ArtifactRequest, DesiredState, EnrollRequest, EnrollResponse,
    Inventory, LatLon, Presence, RejectReason, Rejection, Release, Report, Root, Signed,
    TelemetryPayload, TelemetryRecord, WorkloadKind,
};
use flotilla_shared::{DeviceId, Digest, Label, WorkloadName};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A chunk request unanswered for this long is sent again (slow-drip and lost-message protection).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(5);
/// After this many unanswered requests in a row the workload reports `ArtifactStalled` (and the agent keeps trying).
const STALLS_BEFORE_REPORT: u32 = 3;
/// Largest signed release document accepted.
const MAX_RELEASE_DOC: u64 = 16 * 1024;
/// Outbox records published per drain pass.
const DRAIN_BATCH: usize = 64;

/// Everything the loop reacts to.
#[derive(Debug)]
pub enum Event {
    Link(LinkEvent),
    Runtime(RuntimeEvent),
    /// Once a second: position, fetch deadlines, periodic reports and metrics, outbox drain.
    Tick,
    /// A reconciler deadline (backoff expiry, health transition) passed.
    Timeout,
    Shutdown,
}

/// The agent's unix-time clock; the only place that reads it.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An in-progress download of a release document or artifact.
#[derive(Debug)]
struct Fetch {
    size: u64,
    received: u64,
    staging: PathBuf,
    verifier: Option<ArtifactVerifier>,
    buf: Vec<u8>,
    requested_at: Instant,
    stalls: u32,
}

/// Device identity and trust state loaded from the store.
#[derive(Debug)]
struct Trust {
    device: DeviceId,
    key: SigningKey,
    root: Root,
    floor: TrustFloor,
}

/// The running agent.
pub struct Agent {
    cfg: Config,
    store: Store,
    trust: Trust,
    runtime: Arc<dyn Runtime>,
    reconciler: Reconciler,
    running: BTreeMap<WorkloadName, Box<dyn RunningWorkload>>,
    accepted: Option<(Signed, DesiredState)>,
    /// The accepted desired state (or the root) has expired: keep running, install nothing new.
    frozen: bool,
    releases: BTreeMap<Digest, Release>,
    workload_rejects: BTreeMap<WorkloadName, RejectReason>,
    fetches: BTreeMap<ArtifactRef, Fetch>,
    rejection: Option<Rejection>,
    position: Option<LatLon>,
    /// Holds requested by guests through the host API, until their deadline.
    guest_holds: BTreeMap<WorkloadName, (String, Instant)>,
    /// The hold file's reason while it exists.
    file_hold: Option<String>,
    /// Per workload: (artifact running now, the one that ran before it), for keeping current + previous.
    artifact_history: BTreeMap<WorkloadName, (Digest, Option<Digest>)>,
    link: Option<Link>,
    connected: bool,
    reconnects: u64,
    inventory_sent: bool,
    epoch: Instant,
    last_report: Instant,
    last_metrics: Instant,
    rt_tx: mpsc::Sender<RuntimeEvent>,
    rt_rx: Option<mpsc::Receiver<RuntimeEvent>>,
    /// Latest metrics snapshot for the optional Prometheus endpoint (written by the loop, read by the server).
    metrics_tx: tokio::sync::watch::Sender<Vec<(String, f64)>>,
    link_rx: Option<mpsc::Receiver<LinkEvent>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("device", &self.trust.device)
            .finish_non_exhaustive()
    }
}

fn tls_settings(cfg: &Config) -> Option<TlsSettings> {
    cfg.tls.as_ref().map(|t| TlsSettings {
        ca_file: t.ca_file.clone(),
        client_cert: t.client_cert.clone(),
        client_key: t.client_key.clone(),
    })
}

fn inventory(cfg: &Config, position: Option<LatLon>) -> Inventory {
    Inventory {
        labels: cfg
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        region: cfg.region.clone(),
        zone: cfg.zone.clone(),
        location: position,
        arch: std::env::consts::ARCH.to_owned(),
        runtimes: vec![WorkloadKind::Wasm],
        memory_mib: cfg.max_memory_mib,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// Reads the position source once. A file that is missing or malformed means "position unknown".
fn read_position(src: &PositionSource) -> Option<LatLon> {
    match src {
        PositionSource::None => None,
        PositionSource::Static(p) => Some(*p),
        PositionSource::File(path) => {
            let text = std::fs::read_to_string(path).ok()?;
            let (mut lat, mut lon) = (None, None);
            // `{"lat": 52.5, "lon": 13.4}`: parsed by hand to keep serde_json out of the agent.
            for part in text
                .trim()
                .trim_start_matches('{')
                .trim_end_matches('}')
                .split(',')
            {
                let (k, v) = part.split_once(':')?;
                let v: f64 = v.trim().parse().ok()?;
                match k.trim().trim_matches('"') {
                    "lat" => lat = Some(v),
                    "lon" => lon = Some(v),
                    _ => {}
                }
            }
            let p = LatLon {
                lat: lat?,
                lon: lon?,
            };
            (p.lat.is_finite() && p.lon.is_finite() && p.lat.abs() <= 90.0 && p.lon.abs() <= 180.0)
                .then_some(p)
        }
    }
}

/// Enrolls with the hub over MQTT: presents the one-time token and a fresh public key, receives the device id and
/// the trust root, and stores both. Refusal is a configuration error (a bad token will not fix itself).
pub async fn enroll(cfg: &Config, store: &mut Store) -> Result<(), EnrollError> {
    let token = cfg.enroll_token.clone().ok_or(EnrollError::NoToken)?;
    let key = SigningKey::generate();
    let nonce = trust::random_hex(16);
    let settings = LinkSettings {
        client_id: format!("enroll-{nonce}"),
        host: cfg.broker.host.clone(),
        port: cfg.broker.port,
        keepalive: Duration::from_secs(30),
        tls: tls_settings(cfg),
        last_will: None,
        subscriptions: vec![topics::enroll_response(&nonce)],
        clean_session: true,
        queue: flotilla_mqtt::QUEUE,
    };
    let (link, mut rx) =
        flotilla_mqtt::connect(settings).map_err(|e| EnrollError::Transient(e.to_string()))?;
    let request = codec::encode(&Message::EnrollRequest(EnrollRequest {
        token,
        public_key: key.public(),
        requested_id: cfg.device_id.clone(),
        inventory: inventory(cfg, read_position(&cfg.position)),
    }))
    .map_err(|e| EnrollError::Transient(e.to_string()))?;
    let pinned = match &cfg.trust_root {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|e| EnrollError::Config(format!("trust_root {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    let mut connected = false;
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(LinkEvent::Connected) => {
                    connected = true;
                    link.publish(&topics::enroll_request(&nonce), request.clone(), false)
                        .map_err(|e| EnrollError::Transient(e.to_string()))?;
                }
                Some(LinkEvent::Disconnected(e)) => {
                    connected = false;
                    tracing::warn!(error = %e, "enrollment: broker unreachable, retrying");
                }
                Some(LinkEvent::Message { payload, .. }) => match codec::decode(&payload) {
                    Ok(Message::EnrollResponse(EnrollResponse::Accepted { device, root })) => {
                        let verified = trust::verify_initial_root(&root, unix_now())
                            .map_err(|e| EnrollError::Config(format!("hub sent an invalid root: {e}")))?;
                        if let Some(pinned) = &pinned {
                            let pinned: Signed = codec::decode_exact(pinned)
                                .map_err(|e| EnrollError::Config(format!("trust_root: {e}")))?;
                            if pinned.body != root.body {
                                return Err(EnrollError::Config("hub's root differs from the pinned trust_root".into()));
                            }
                        }
                        store.save_identity(&device, &key.to_file_text(), &root, verified.version)
                            .map_err(|e| EnrollError::Transient(e.to_string()))?;
                        link.disconnect().await;
                        tracing::info!(device = %device, "enrolled");
                        return Ok(());
                    }
                    Ok(Message::EnrollResponse(EnrollResponse::Refused { reason })) => {
                        link.disconnect().await;
                        return Err(EnrollError::Refused(reason));
                    }
                    _ => tracing::warn!("enrollment: ignoring unexpected message"),
                },
                None => return Err(EnrollError::Transient("mqtt link closed".into())),
            },
            _ = ticker.tick() => {
                if connected {
                    // No answer yet (a lost message, or the hub was restarting): ask again.
                    let _ = link.publish(&topics::enroll_request(&nonce), request.clone(), false);
                }
            }
        }
    }
}

/// Space kept free beyond an artifact, so the database and logs can still be written after a download.
const DISK_RESERVE: u64 = 1 << 20;

/// Refuses a download up front when the artifact plus the reserve does not fit in the free space.
fn disk_check(size: u64, free: u64) -> Result<(), RejectReason> {
    if size.saturating_add(DISK_RESERVE) > free {
        return Err(RejectReason::InsufficientDisk { needed: size, free });
    }
    Ok(())
}

/// Why enrollment did not complete.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("no identity yet and no enroll_token configured")]
    NoToken,
    #[error("enrollment refused by the hub: {0}")]
    Refused(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Transient(String),
}

/// Loads identity and trust from the store, re-verifying every root in the stored chain.
fn load_trust(store: &Store) -> Result<Option<Trust>> {
    let Some((device, secret)) = store.identity()? else {
        return Ok(None);
    };
    let key = SigningKey::from_file_text(&secret).context("stored device key")?;
    let roots = store.roots()?;
    let (first, rest) = roots
        .split_first()
        .context("identity without a trust root")?;
    // Signatures are re-checked at boot; expiry is not (time 0), so an expired root keeps running workloads but
    // freezes updates (checked again in verify_desired with the real clock).
    let mut root = trust::verify_initial_root(first, 0).context("stored root")?;
    root = trust::verify_root_chain(&root, rest, 0).context("stored root chain")?;
    let floor = store.floor()?;
    Ok(Some(Trust {
        device,
        key,
        root,
        floor,
    }))
}

impl Agent {
    /// Opens state and prepares the runtime; does not touch the network.
    pub fn new(cfg: Config, store: Store, runtime: Arc<dyn Runtime>) -> Result<Self> {
        let trust = load_trust(&store)?.context("not enrolled")?;
        let (rt_tx, rt_rx) = mpsc::channel(1024);
        let rejection = store.rejection()?;
        let position = read_position(&cfg.position);
        std::fs::create_dir_all(cfg.data_dir.join("artifacts"))?;
        std::fs::create_dir_all(cfg.data_dir.join("staging"))?;
        let now = Instant::now();
        Ok(Self {
            cfg,
            store,
            trust,
            runtime,
            reconciler: Reconciler::new(),
            running: BTreeMap::new(),
            accepted: None,
            frozen: false,
            releases: BTreeMap::new(),
            workload_rejects: BTreeMap::new(),
            fetches: BTreeMap::new(),
            rejection,
            position,
            guest_holds: BTreeMap::new(),
            file_hold: None,
            artifact_history: BTreeMap::new(),
            link: None,
            connected: false,
            reconnects: 0,
            inventory_sent: false,
            epoch: now,
            last_report: now,
            last_metrics: now,
            rt_tx,
            rt_rx: Some(rt_rx),
            metrics_tx: tokio::sync::watch::channel(Vec::new()).0,
            link_rx: None,
        })
    }

    pub fn device(&self) -> &DeviceId {
        &self.trust.device
    }

    fn millis(&self) -> Millis {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Brings back every desired workload from SQLite alone: the stored desired state is re-verified, its releases
    /// re-verified, and whatever has its artifact in the cache starts immediately.
    pub fn restore(&mut self) -> Result<()> {
        let Some(signed) = self.store.desired()? else {
            return Ok(());
        };
        let t = &self.trust;
        match trust::verify_desired(
            &t.root,
            &t.device,
            &signed,
            &t.floor,
            Some(&signed.body),
            unix_now(),
        ) {
            Ok(ds) => self.accepted = Some((signed, ds)),
            Err(trust::DesiredError::Expired { .. } | trust::DesiredError::RootExpired { .. }) => {
                // Availability: keep running what was accepted; freeze protection: install nothing new.
                let ds: DesiredState = codec::decode_exact(&signed.body)?;
                tracing::warn!(
                    generation = ds.generation,
                    "stored desired state expired; running it frozen"
                );
                self.frozen = true;
                self.accepted = Some((signed, ds));
            }
            Err(e) => bail!("stored desired state does not verify: {e}"),
        }
        if let Some((_, ds)) = &self.accepted {
            for w in ds.workloads.clone() {
                if let Some(signed) = self.store.release(&w.release)? {
                    match trust::verify_release_for(
                        &self.trust.root,
                        &signed,
                        &w,
                        &self.trust.floor,
                    ) {
                        Ok(r) => {
                            self.releases.insert(w.release, r);
                        }
                        Err(e) => {
                            tracing::warn!(workload = %w.name, error = %e, "stored release no longer verifies")
                        }
                    }
                }
            }
        }
        self.refresh_desired();
        for (name, restarts, last_error) in self.store.workload_states()? {
            self.reconciler.restore_history(&name, restarts, last_error);
        }
        Ok(())
    }

    /// Connects the device's MQTT link (returns immediately; the link connects in the background).
    pub fn connect(&mut self) -> Result<()> {
        let dev = &self.trust.device;
        let offline = codec::encode(&Message::Presence(Presence {
            online: false,
            at: unix_now(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }))?;
        let settings = LinkSettings {
            client_id: dev.to_string(),
            host: self.cfg.broker.host.clone(),
            port: self.cfg.broker.port,
            keepalive: Duration::from_secs(u64::from(self.cfg.keepalive_secs)),
            tls: tls_settings(&self.cfg),
            last_will: Some((topics::device(dev, DeviceTopic::Presence), offline)),
            subscriptions: vec![
                topics::device(dev, DeviceTopic::Desired),
                topics::device(dev, DeviceTopic::Root),
                topics::device(dev, DeviceTopic::ArtifactChunk),
            ],
            clean_session: true,
            queue: flotilla_mqtt::QUEUE,
        };
        let (link, rx) = flotilla_mqtt::connect(settings)?;
        self.link = Some(link);
        self.link_rx = Some(rx);
        Ok(())
    }

    /// Runs until `shutdown` resolves; then stops workloads, flushes the outbox and closes cleanly.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let mut rt_rx = self.rt_rx.take().context("run called twice")?;
        let mut link_rx = self.link_rx.take();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        if let Some(addr) = self.cfg.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics_listen {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "prometheus endpoint");
            tokio::spawn(serve_metrics(listener, self.metrics_tx.subscribe()));
        }
        self.metrics_tx.send_replace(self.metrics());
        self.drain_actions();
        loop {
            let deadline = self
                .reconciler
                .poll_timeout()
                .map(|ms| self.epoch + Duration::from_millis(ms));
            let event = tokio::select! {
                Some(ev) = async { match link_rx.as_mut() { Some(rx) => rx.recv().await, None => None } } => Event::Link(ev),
                Some(ev) = rt_rx.recv() => Event::Runtime(ev),
                _ = tick.tick() => Event::Tick,
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d.into()).await, None => std::future::pending().await } } => Event::Timeout,
                () = &mut shutdown => Event::Shutdown,
            };
            if matches!(event, Event::Shutdown) {
                break;
            }
            self.handle(event);
            self.drain_actions();
            if self.reconciler.take_changed() {
                self.save_workload_states();
                self.send_report();
            }
        }
        self.shutdown(&mut rt_rx).await;
        Ok(())
    }

    fn handle(&mut self, event: Event) {
        let now = self.millis();
        match event {
            Event::Link(LinkEvent::Connected) => {
                self.connected = true;
                self.inventory_sent = false;
                tracing::info!(device = %self.trust.device, "connected");
                self.publish_presence(true);
                self.send_report();
                self.drain_outbox();
                for what in self.fetches.keys().copied().collect::<Vec<_>>() {
                    self.request_next(what);
                }
            }
            Event::Link(LinkEvent::Disconnected(e)) => {
                if self.connected {
                    self.reconnects += 1;
                    tracing::warn!(error = %e, "disconnected");
                }
                self.connected = false;
            }
            Event::Link(LinkEvent::Message { topic, payload }) => self.on_message(&topic, &payload),
            Event::Runtime(ev) => self.on_runtime(now, ev),
            Event::Tick => self.on_tick(),
            Event::Timeout => self.reconciler.handle_timeout(now),
            Event::Shutdown => {}
        }
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        let Some((device, leaf)) = topics::parse_device(topic) else {
            return;
        };
        if device != self.trust.device {
            return;
        }
        let msg = match codec::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(topic, error = %e, "dropping undecodable message");
                if leaf == DeviceTopic::Desired {
                    self.reject(0, RejectReason::Malformed);
                }
                return;
            }
        };
        match (leaf, msg) {
            (DeviceTopic::Desired, Message::DesiredState(signed)) => self.on_desired(signed),
            (DeviceTopic::Root, Message::RootUpdate(update)) => self.on_root(&update.chain),
            (DeviceTopic::ArtifactChunk, Message::ArtifactChunk(chunk)) => self.on_chunk(chunk),
            (leaf, _) => tracing::warn!(?leaf, "message kind does not belong on this topic"),
        }
    }

    fn reject(&mut self, generation: u64, reason: RejectReason) {
        tracing::warn!(
            generation,
            ?reason,
            "desired state rejected; previous state keeps running"
        );
        let r = Rejection { generation, reason };
        if let Err(e) = self.store.set_rejection(Some(&r)) {
            tracing::error!(error = %e, "cannot persist rejection");
        }
        self.rejection = Some(r);
        self.send_report();
    }

    fn on_root(&mut self, chain: &[Signed]) {
        match trust::verify_root_chain(&self.trust.root, chain, unix_now()) {
            Ok(root) if root.version > self.trust.root.version => {
                for s in chain {
                    if let Ok(r) = codec::decode_exact::<Root>(&s.body)
                        && r.version > self.trust.root.version
                        && r.version <= root.version
                        && let Err(e) = self.store.save_root(r.version, s)
                    {
                        tracing::error!(error = %e, "cannot persist root");
                        return;
                    }
                }
                tracing::info!(version = root.version, "trust root rotated");
                self.trust.root = root;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "root update rejected"),
        }
    }

    fn on_desired(&mut self, signed: Signed) {
        if self
            .accepted
            .as_ref()
            .is_some_and(|(s, _)| s.body == signed.body)
        {
            return; // A retained re-delivery after reconnect: nothing changed, nothing restarts.
        }
        let t = &self.trust;
        let accepted_body = self.accepted.as_ref().map(|(s, _)| s.body.as_slice());
        let ds = match trust::verify_desired(
            &t.root,
            &t.device,
            &signed,
            &t.floor,
            accepted_body,
            unix_now(),
        ) {
            Ok(ds) => ds,
            Err(e) => {
                let generation =
                    codec::decode_exact::<DesiredState>(&signed.body).map_or(0, |d| d.generation);
                if matches!(
                    e,
                    trust::DesiredError::Expired { .. } | trust::DesiredError::RootExpired { .. }
                ) {
                    self.frozen = true;
                }
                self.reject(generation, (&e).into());
                return;
            }
        };
        if ds.workloads.len() > self.cfg.max_workloads as usize {
            let reason = RejectReason::InvalidSpec(format!(
                "{} workloads exceed this device's limit of {}",
                ds.workloads.len(),
                self.cfg.max_workloads
            ));
            self.reject(ds.generation, reason);
            return;
        }
        // Persist, then act: the floor and the document are durable before anything runs or is reported.
        if let Err(e) = self
            .store
            .accept_desired(ds.generation, ds.issued_at, &signed)
        {
            tracing::error!(error = %e, "cannot persist desired state; not applying it");
            return;
        }
        self.trust.floor.generation = self.trust.floor.generation.max(ds.generation);
        self.trust.floor.issued_at = self.trust.floor.issued_at.max(ds.issued_at);
        tracing::info!(
            generation = ds.generation,
            workloads = ds.workloads.len(),
            "desired state accepted"
        );
        self.frozen = false;
        if self.rejection.take().is_some() {
            let _ = self.store.set_rejection(None);
        }
        self.workload_rejects.clear();
        self.accepted = Some((signed, ds));
        self.refresh_desired();
        self.send_report();
    }

    /// Why the device is holding updates right now, if it is (hold file, or a guest's unexpired hold).
    pub fn hold_reason(&self) -> Option<String> {
        let now = Instant::now();
        self.file_hold.clone().or_else(|| {
            self.guest_holds
                .iter()
                .find(|(_, (_, until))| *until > now)
                .map(|(n, (r, _))| format!("{n}: {r}"))
        })
    }

    /// Re-reads the hold file and expires guest holds; re-plans and reports when the hold state changes.
    fn refresh_holds(&mut self) {
        let before = self.hold_reason();
        self.file_hold = self.cfg.hold_file.as_ref().and_then(|p| {
            std::fs::read_to_string(p)
                .ok()
                .map(|t| t.lines().next().unwrap_or("held").trim().to_owned())
        });
        let now = Instant::now();
        self.guest_holds.retain(|_, (_, until)| *until > now);
        if self.hold_reason() != before {
            tracing::info!(hold = ?self.hold_reason(), "update hold changed");
            self.refresh_desired();
            self.send_report();
        }
    }

    /// Recomputes what the reconciler should run from the accepted desired state, verified releases, the artifact
    /// cache and the position; starts downloads for what is missing.
    fn refresh_desired(&mut self) {
        let Some((_, ds)) = self.accepted.clone() else {
            self.reconciler.set_desired(self.millis(), vec![]);
            return;
        };
        let mut list = Vec::new();
        let mut keep = Vec::new();
        for spec in ds.workloads {
            let inside_fence = spec
                .geofence
                .as_ref()
                .is_none_or(|f| geo::contains(f, self.position));
            let mut rejected = self.workload_rejects.get(&spec.name).cloned();
            let mut artifact = None;
            if spec.kind != WorkloadKind::Wasm {
                rejected = Some(RejectReason::UnsupportedKind);
            } else if let Some(release) = self.releases.get(&spec.release).cloned() {
                keep.push(release.artifact_digest);
                match self.store.has_artifact(&release.artifact_digest) {
                    Ok(true) => artifact = Some(release.artifact_digest),
                    Ok(false) if !self.frozen && rejected.is_none() => self.start_fetch(
                        ArtifactRef::Blob(release.artifact_digest),
                        release.artifact_size,
                        &spec.name,
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "artifact index"),
                }
            } else if !self.frozen && rejected.is_none() {
                self.start_fetch(
                    ArtifactRef::Release(spec.release),
                    MAX_RELEASE_DOC,
                    &spec.name,
                );
            }
            // A hold defers release changes (the download may go ahead); what runs keeps running.
            if self.hold_reason().is_some() {
                let running = self
                    .reconciler
                    .status(self.millis())
                    .into_iter()
                    .find(|s| s.name == spec.name);
                let same_release = running.as_ref().is_some_and(|s| {
                    s.release == spec.release
                        && s.state == flotilla_shared::wire::WorkloadState::Running
                });
                if !same_release {
                    artifact = None;
                }
            }
            list.push(DesiredWorkload {
                spec,
                artifact,
                inside_fence,
                rejected,
            });
        }
        self.reconciler.set_desired(self.millis(), list);
        self.collect_garbage(&keep);
    }

    /// Keeps the artifacts of the desired releases and of whatever is still running (the previous version), and
    /// deletes the rest.
    fn collect_garbage(&mut self, keep: &[Digest]) {
        let running: Vec<(WorkloadName, Digest)> = self
            .reconciler
            .status(self.millis())
            .iter()
            .filter_map(|s| {
                self.releases
                    .get(&s.release)
                    .map(|r| (s.name.clone(), r.artifact_digest))
            })
            .collect();
        // Remember, per workload, the artifact that ran before the current one: it is kept for a fast rollback.
        for (name, digest) in &running {
            let entry = self
                .artifact_history
                .entry(name.clone())
                .or_insert((*digest, None));
            if entry.0 != *digest {
                *entry = (*digest, Some(entry.0));
            }
        }
        let previous: Vec<Digest> = self
            .artifact_history
            .values()
            .filter_map(|(_, p)| *p)
            .collect();
        let keep: Vec<Digest> = keep
            .iter()
            .chain(running.iter().map(|(_, d)| d))
            .chain(previous.iter())
            .copied()
            .collect();
        if keep.is_empty() && self.accepted.is_none() {
            return;
        }
        match self.store.collect_artifacts(&keep) {
            Ok(gone) => {
                for d in gone {
                    let _ = std::fs::remove_file(self.artifact_path(&d));
                }
            }
            Err(e) => tracing::warn!(error = %e, "artifact collection failed"),
        }
    }

    fn artifact_path(&self, d: &Digest) -> PathBuf {
        // Always a hex digest: nothing from a document or the network ever becomes a path component.
        self.cfg.data_dir.join("artifacts").join(d.to_hex())
    }

    fn start_fetch(&mut self, what: ArtifactRef, size: u64, workload: &WorkloadName) {
        if self.fetches.contains_key(&what) {
            return;
        }
        let (digest, is_blob) = match what {
            ArtifactRef::Release(d) => (d, false),
            ArtifactRef::Blob(d) => (d, true),
        };
        let staging = self
            .cfg
            .data_dir
            .join("staging")
            .join(format!("{}.part", digest.to_hex()));
        let mut fetch = Fetch {
            size,
            received: 0,
            staging,
            verifier: None,
            buf: Vec::new(),
            requested_at: Instant::now(),
            stalls: 0,
        };
        if is_blob {
            let free = rustix::fs::statvfs(&self.cfg.data_dir)
                .map_or(u64::MAX, |s| s.f_bavail.saturating_mul(s.f_frsize));
            if let Err(reason) = disk_check(size, free) {
                tracing::warn!(workload = %workload, ?reason, "artifact refused before download");
                self.workload_rejects.insert(workload.clone(), reason);
                return;
            }
            let mut verifier = ArtifactVerifier::new(digest, size);
            // Resume: re-hash what an earlier attempt left in staging, then continue from there.
            if let Ok(prefix) = std::fs::read(&fetch.staging)
                && verifier.update(&prefix).is_ok()
            {
                fetch.received = verifier.received();
            } else {
                verifier = ArtifactVerifier::new(digest, size);
                let _ = std::fs::remove_file(&fetch.staging);
            }
            fetch.verifier = Some(verifier);
        }
        tracing::info!(?what, from = fetch.received, size, "fetching");
        self.fetches.insert(what, fetch);
        self.request_next(what);
    }

    fn request_next(&mut self, what: ArtifactRef) {
        let Some(f) = self.fetches.get_mut(&what) else {
            return;
        };
        f.requested_at = Instant::now();
        if !self.connected {
            return;
        }
        let req = Message::ArtifactRequest(ArtifactRequest {
            what,
            offset: f.received,
            max_len: u32::try_from(MAX_CHUNK_DATA).unwrap_or(u32::MAX),
        });
        if let (Some(link), Ok(bytes)) = (&self.link, codec::encode(&req)) {
            let _ = link.publish(
                &topics::device(&self.trust.device, DeviceTopic::ArtifactRequest),
                bytes,
                false,
            );
        }
    }

    fn fail_fetch(&mut self, what: ArtifactRef, reason: RejectReason) {
        if let Some(f) = self.fetches.remove(&what) {
            let _ = std::fs::remove_file(&f.staging);
        }
        let digest = match what {
            ArtifactRef::Release(d) | ArtifactRef::Blob(d) => d,
        };
        let names: Vec<WorkloadName> = self.accepted.as_ref().map_or(vec![], |(_, ds)| {
            ds.workloads
                .iter()
                .filter(|w| {
                    w.release == digest
                        || self
                            .releases
                            .get(&w.release)
                            .is_some_and(|r| r.artifact_digest == digest)
                })
                .map(|w| w.name.clone())
                .collect()
        });
        tracing::warn!(?what, ?reason, "fetch failed");
        for n in names {
            self.workload_rejects.insert(n, reason.clone());
        }
        self.refresh_desired();
        self.send_report();
    }

    fn on_chunk(&mut self, chunk: ArtifactChunk) {
        let (what, offset, total, data) = match chunk {
            ArtifactChunk::Data {
                what,
                offset,
                total,
                data,
            } => (what, offset, total, data),
            ArtifactChunk::NotFound { what } => {
                if self.fetches.contains_key(&what) {
                    self.fail_fetch(what, RejectReason::ReleaseMissing);
                }
                return;
            }
        };
        let Some(f) = self.fetches.get_mut(&what) else {
            return;
        };
        if offset != f.received {
            return; // A duplicate or a late answer to an earlier request; the current request is still pending.
        }
        f.stalls = 0;
        let result: Result<bool, RejectReason> = (|| match what {
            ArtifactRef::Release(_) => {
                if total > f.size || f.received + data.len() as u64 > f.size {
                    return Err(RejectReason::ArtifactTooLarge);
                }
                f.buf.extend_from_slice(&data);
                f.received += data.len() as u64;
                Ok(f.received >= total)
            }
            ArtifactRef::Blob(_) => {
                if total != f.size {
                    return Err(RejectReason::ArtifactTooLarge);
                }
                let v = f.verifier.as_mut().ok_or(RejectReason::Malformed)?;
                v.update(&data).map_err(|e| RejectReason::from(&e))?;
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&f.staging)
                    .map_err(|_| RejectReason::InsufficientDisk {
                        needed: f.size,
                        free: 0,
                    })?;
                file.write_all(&data)
                    .map_err(|_| RejectReason::InsufficientDisk {
                        needed: f.size,
                        free: 0,
                    })?;
                f.received += data.len() as u64;
                Ok(f.received >= f.size)
            }
        })();
        match result {
            Err(reason) => self.fail_fetch(what, reason),
            Ok(false) => self.request_next(what),
            Ok(true) => self.finish_fetch(what),
        }
    }

    fn finish_fetch(&mut self, what: ArtifactRef) {
        let Some(f) = self.fetches.remove(&what) else {
            return;
        };
        match what {
            ArtifactRef::Release(digest) => {
                let Ok(signed) = codec::decode_exact::<Signed>(&f.buf) else {
                    self.fail_fetch(what, RejectReason::Malformed);
                    return;
                };
                let Some(spec) = self
                    .accepted
                    .as_ref()
                    .and_then(|(_, ds)| ds.workloads.iter().find(|w| w.release == digest).cloned())
                else {
                    return;
                };
                match trust::verify_release_for(&self.trust.root, &signed, &spec, &self.trust.floor)
                {
                    Ok(release) => {
                        if let Err(e) = self.store.accept_release(
                            &digest,
                            &signed,
                            &release.name,
                            release.epoch,
                        ) {
                            tracing::error!(error = %e, "cannot persist release");
                            return;
                        }
                        let floor = self
                            .trust
                            .floor
                            .epochs
                            .entry(release.name.clone())
                            .or_insert(0);
                        *floor = (*floor).max(release.epoch);
                        self.releases.insert(digest, release);
                        self.refresh_desired();
                    }
                    Err(e) => {
                        tracing::warn!(workload = %spec.name, error = %e, "release rejected");
                        self.fail_fetch(what, (&e).into());
                    }
                }
            }
            ArtifactRef::Blob(digest) => {
                let Some(v) = f.verifier else { return };
                if let Err(e) = v.finish() {
                    let _ = std::fs::remove_file(&f.staging);
                    self.fail_fetch(what, (&e).into());
                    return;
                }
                // The verified staging file itself becomes the cached artifact: no verify-then-swap window.
                let dest = self.artifact_path(&digest);
                let synced = std::fs::File::open(&f.staging).and_then(|file| file.sync_all());
                if let Err(e) = synced.and_then(|()| std::fs::rename(&f.staging, &dest)) {
                    tracing::error!(error = %e, "cannot move artifact into the cache");
                    return;
                }
                if let Err(e) = self.store.add_artifact(&digest, f.size, unix_now()) {
                    tracing::error!(error = %e, "cannot index artifact");
                    return;
                }
                tracing::info!(artifact = %digest, size = f.size, "artifact verified and cached");
                self.refresh_desired();
            }
        }
    }

    fn on_runtime(&mut self, now: Millis, ev: RuntimeEvent) {
        match ev {
            RuntimeEvent::Started { name, op, result } => {
                if let Err(e) = &result {
                    tracing::warn!(workload = %name, error = %e, "start failed");
                    self.running.remove(&name);
                } else {
                    tracing::info!(workload = %name, "running");
                }
                self.reconciler.op_finished(now, &name, op, result);
            }
            RuntimeEvent::Exited { name, op, exit } => {
                tracing::info!(workload = %name, ?exit, "exited");
                self.running.remove(&name);
                self.reconciler.exited(now, &name, op, exit);
            }
            RuntimeEvent::Stopped { name, op } => {
                tracing::info!(workload = %name, "stopped");
                self.running.remove(&name);
                self.reconciler.op_finished(now, &name, op, Ok(()));
            }
            RuntimeEvent::Metric {
                name,
                metric,
                value,
            } => {
                if !value.is_finite() {
                    return;
                }
                if let Ok(stream) = Label::new(format!("{name}.metrics")) {
                    self.push_telemetry(stream, TelemetryPayload::Metrics(vec![(metric, value)]));
                }
            }
            RuntimeEvent::Hold { name, reason, secs } => {
                if secs == 0 {
                    self.guest_holds.remove(&name);
                } else {
                    let until = Instant::now() + Duration::from_secs(u64::from(secs.min(86_400)));
                    self.guest_holds.insert(name, (reason, until));
                }
                // Take effect now rather than on the next tick.
                let before = self.hold_reason();
                self.refresh_desired();
                tracing::info!(hold = ?before, "guest hold changed");
                self.send_report();
            }
            RuntimeEvent::Telemetry {
                name,
                stream,
                payload,
            } => {
                let Ok(stream) = Label::new(stream) else {
                    tracing::warn!(workload = %name, "telemetry stream name invalid; dropped");
                    return;
                };
                self.push_telemetry(stream, TelemetryPayload::Bytes(payload));
            }
        }
    }

    fn push_telemetry(&mut self, stream: Label, payload: TelemetryPayload) {
        let device = self.trust.device.clone();
        let topic = topics::telemetry(self.cfg.region.as_ref(), &device, &stream);
        let at = unix_now();
        let pushed = self.store.outbox_push_with(self.cfg.outbox_bytes, |seq| {
            let rec = TelemetryRecord {
                device,
                stream,
                seq,
                at,
                payload,
            };
            (
                topic,
                codec::encode(&Message::Telemetry(vec![rec])).unwrap_or_default(),
            )
        });
        match pushed {
            Ok(dropped) if dropped > 0 => {
                tracing::warn!(dropped, "telemetry outbox full; oldest records dropped")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "telemetry outbox write failed"),
        }
        self.drain_outbox();
    }

    /// Publishes the outbox in order while connected; records leave the outbox once handed to the MQTT client.
    fn drain_outbox(&mut self) {
        let Some(link) = self.link.clone() else {
            return;
        };
        while self.connected {
            let rows = match self.store.outbox_peek(DRAIN_BATCH) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "outbox read failed");
                    return;
                }
            };
            if rows.is_empty() {
                return;
            }
            let mut last = None;
            for (seq, topic, payload) in &rows {
                if link.publish(topic, payload.clone(), false).is_err() {
                    break; // Client queue full: resume on the next tick.
                }
                last = Some(*seq);
            }
            let Some(last) = last else { return };
            if let Err(e) = self.store.outbox_delete_through(last) {
                tracing::error!(error = %e, "outbox delete failed");
                return;
            }
            if rows.len() < DRAIN_BATCH {
                return;
            }
        }
    }

    fn on_tick(&mut self) {
        self.refresh_holds();
        if self.cfg.metrics_listen.is_some() {
            self.metrics_tx.send_replace(self.metrics());
        }
        if let PositionSource::File(_) = self.cfg.position {
            let p = read_position(&self.cfg.position);
            if p != self.position {
                tracing::info!(?p, "position changed");
                self.position = p;
                self.refresh_desired();
            }
        }
        let stalled: Vec<ArtifactRef> = self
            .fetches
            .iter()
            .filter(|(_, f)| self.connected && f.requested_at.elapsed() >= CHUNK_TIMEOUT)
            .map(|(w, _)| *w)
            .collect();
        for what in stalled {
            if let Some(f) = self.fetches.get_mut(&what) {
                f.stalls += 1;
                if f.stalls == STALLS_BEFORE_REPORT {
                    tracing::warn!(?what, "artifact stream stalled");
                }
            }
            self.request_next(what);
        }
        if self.last_report.elapsed()
            >= Duration::from_secs(u64::from(self.cfg.report_interval_secs))
        {
            self.send_report();
        }
        if self.last_metrics.elapsed()
            >= Duration::from_secs(u64::from(self.cfg.metrics_interval_secs))
        {
            self.last_metrics = Instant::now();
            let metrics = self.metrics();
            if let Ok(stream) = Label::new("agent") {
                self.push_telemetry(stream, TelemetryPayload::Metrics(metrics));
            }
        }
        self.drain_outbox();
    }

    /// The agent's own metrics, published on the `agent` telemetry stream.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let status = self.reconciler.status(self.millis());
        let running = status
            .iter()
            .filter(|s| s.state == flotilla_shared::wire::WorkloadState::Running)
            .count();
        let restarts: u32 = status.iter().map(|s| s.restarts).sum();
        let rss = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<f64>().ok())
            })
            .map_or(0.0, |pages| pages * 4096.0);
        let cpu = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
            })
            .unwrap_or(0.0);
        let disk_free = rustix::fs::statvfs(&self.cfg.data_dir)
            .map_or(0.0, |s| (s.f_bavail * s.f_frsize) as f64);
        vec![
            ("workloads_desired".into(), status.len() as f64),
            ("workloads_running".into(), running as f64),
            ("restarts_total".into(), f64::from(restarts)),
            ("rss_bytes".into(), rss),
            ("cpu_seconds_total".into(), cpu),
            ("disk_free_bytes".into(), disk_free),
            ("mqtt_reconnects_total".into(), self.reconnects as f64),
            (
                "telemetry_dropped_total".into(),
                self.store.counter("telemetry_dropped").unwrap_or(0) as f64,
            ),
            (
                "applied_generation".into(),
                self.trust.floor.generation as f64,
            ),
        ]
    }

    fn save_workload_states(&mut self) {
        let states: Vec<(WorkloadName, u32, Option<String>)> = self
            .reconciler
            .status(self.millis())
            .into_iter()
            .map(|s| (s.name, s.restarts, s.last_error))
            .collect();
        if let Err(e) = self.store.save_workload_states(&states) {
            tracing::warn!(error = %e, "cannot persist workload state");
        }
    }

    fn publish_presence(&self, online: bool) {
        let Some(link) = &self.link else { return };
        let p = Presence {
            online,
            at: unix_now(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        };
        if let Ok(bytes) = codec::encode(&Message::Presence(p)) {
            let _ = link.publish(
                &topics::device(&self.trust.device, DeviceTopic::Presence),
                bytes,
                true,
            );
        }
    }

    /// The full observed state, signed with the device key and a persisted monotonic counter.
    pub fn build_report(&mut self) -> Result<Signed> {
        let counter = self.store.next_counter("report")?;
        let report = Report {
            device: self.trust.device.clone(),
            counter,
            sent_at: unix_now(),
            applied_generation: self.accepted.as_ref().map_or(0, |(_, ds)| ds.generation),
            last_rejection: self.rejection.clone(),
            workloads: self.reconciler.status(self.millis()),
            inventory: (!self.inventory_sent).then(|| inventory(&self.cfg, self.position)),
            telemetry_dropped: self.store.counter("telemetry_dropped")?,
            hold: self.hold_reason(),
        };
        Ok(trust::sign(DocType::Report, &report, &[&self.trust.key]))
    }

    fn send_report(&mut self) {
        self.last_report = Instant::now();
        if !self.connected {
            return; // Level-based: the next connect sends the then-current state.
        }
        let signed = match self.build_report() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot build report");
                return;
            }
        };
        let Some(link) = &self.link else { return };
        match codec::encode(&Message::Report(signed)) {
            Ok(bytes) => {
                if link
                    .publish(
                        &topics::device(&self.trust.device, DeviceTopic::Report),
                        bytes,
                        false,
                    )
                    .is_ok()
                {
                    self.inventory_sent = true;
                }
            }
            Err(e) => tracing::error!(error = %e, "report too large"),
        }
    }

    fn drain_actions(&mut self) {
        while let Some(action) = self.reconciler.poll_action() {
            match action {
                Action::Start {
                    name,
                    op,
                    spec,
                    artifact,
                } => {
                    let req = StartRequest {
                        name: name.clone(),
                        op,
                        spec,
                        artifact_path: self.artifact_path(&artifact),
                        artifact,
                    };
                    let handle = self.runtime.start(req, self.rt_tx.clone());
                    self.running.insert(name, handle);
                }
                Action::Stop { name, op } => match self.running.get_mut(&name) {
                    Some(h) => h.stop(op),
                    None => {
                        // Nothing runs under that name (it exited meanwhile): the stop is trivially done.
                        let now = self.millis();
                        self.reconciler.op_finished(now, &name, op, Ok(()));
                    }
                },
            }
        }
    }

    async fn shutdown(&mut self, rt_rx: &mut mpsc::Receiver<RuntimeEvent>) {
        tracing::info!("shutting down: stopping workloads");
        let mut op = u64::MAX / 2;
        for h in self.running.values_mut() {
            op += 1;
            h.stop(op);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.running.is_empty() {
            match tokio::time::timeout_at(deadline, rt_rx.recv()).await {
                Ok(Some(
                    RuntimeEvent::Stopped { name, .. } | RuntimeEvent::Exited { name, .. },
                )) => {
                    tracing::info!(workload = %name, "stopped");
                    self.running.remove(&name);
                }
                Ok(Some(RuntimeEvent::Started {
                    name,
                    result: Err(_),
                    ..
                })) => {
                    self.running.remove(&name);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        self.drain_outbox();
        self.publish_presence(false);
        if let Some(link) = &self.link {
            // Give the client a moment to hand queued publishes to the socket before the clean disconnect.
            tokio::time::sleep(Duration::from_millis(200)).await;
            link.disconnect().await;
        }
    }

    /// Names of workloads currently running (for tests and metrics).
    pub fn running_names(&self) -> BTreeSet<WorkloadName> {
        self.running.keys().cloned().collect()
    }
}

/// A minimal Prometheus text endpoint: any request gets the latest snapshot. Bound to loopback only (checked at
/// config load), so it needs no authentication.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    rx: tokio::sync::watch::Receiver<Vec<(String, f64)>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let snapshot = rx.borrow().clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            // Read (and ignore) the request head; a slow client gets a bounded wait.
            let _ = tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf)).await;
            let mut body = String::new();
            for (name, value) in snapshot {
                body.push_str(&format!(
                    "# TYPE flotilla_agent_{name} gauge\nflotilla_agent_{name} {value}\n"
                ));
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Downloads that would leave less than the reserve free are refused before a byte is fetched.
    #[test]
    fn disk_check_refuses_up_front() {
        assert_eq!(disk_check(10, 10 + DISK_RESERVE), Ok(()));
        assert_eq!(
            disk_check(11, 10 + DISK_RESERVE),
            Err(RejectReason::InsufficientDisk {
                needed: 11,
                free: 10 + DISK_RESERVE
            })
        );
        assert!(disk_check(u64::MAX, u64::MAX - 1).is_err(), "no overflow");
    }

    /// Position files with bad or out-of-range values mean "position unknown", never a bogus position.
    #[test]
    fn position_file_parsing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pos.json");
        let cases = [
            (
                "{\"lat\": 52.5, \"lon\": 13.4}",
                Some(LatLon {
                    lat: 52.5,
                    lon: 13.4,
                }),
            ),
            ("{\"lat\": 95.0, \"lon\": 13.4}", None),
            ("{\"lat\": \"x\"}", None),
            ("garbage", None),
        ];
        for (text, want) in cases {
            std::fs::write(&path, text).expect("write");
            assert_eq!(
                read_position(&PositionSource::File(path.clone())),
                want,
                "{text}"
            );
        }
        assert_eq!(
            read_position(&PositionSource::File(dir.path().join("missing"))),
            None
        );
    }
}
