//! The agent's main loop: the one owner of the store, the reconciler, the trust state and the workloads.
//!
//! Every reason to wake up is an [`Event`]; the loop routes it to the concern that owns it, drains the
//! reconciler's actions into the runtime, and reports when the observable state changed. Nothing here blocks for
//! long: compiles and guest code run on workload threads, MQTT I/O on the link task. The concerns, each in its own
//! module as an `impl Agent` block with its state in its own field:
//! - [`crate::trust`]: identity, root chain, floor, verification at boot;
//! - [`crate::desired`]: accepting desired states and turning them into the reconciler's input;
//! - [`crate::fetch`]: artifact and release transfer over MQTT, staging, disk checks;
//! - [`crate::gc`]: which cached artifacts are kept;
//! - [`crate::holds`]: update holds (hold file, guest holds);
//! - [`crate::outbox`]: telemetry store-and-forward;
//! - [`crate::report`]: signed reports and presence; [`crate::metrics`]: the agent's own metrics.

use crate::config::{Config, PositionSource};
use crate::fetch::Fetch;
use crate::gc::ArtifactHistory;
use crate::holds::Holds;
use crate::inventory::read_position;
use crate::runtime::{RunningWorkload, Runtime, RuntimeEvent, StartRequest};
use crate::store::Store;
use crate::trust::{Trust, load_trust};
use anyhow::{Context, Result};
use flotilla_agent_core::{Action, Millis, Reconciler};
use flotilla_mqtt::{Link, LinkEvent, LinkSettings, Publisher, TlsSettings};
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::wire::{
    ArtifactRef, DesiredState, Inventory, LatLon, Presence, RejectReason, Rejection, Release,
    Signed, WorkloadKind, WorkloadSpec,
};
use flotilla_shared::{DeviceId, Digest, WorkloadName};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub use crate::enroll::{EnrollError, enroll};

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

/// The running agent.
pub struct Agent {
    pub(crate) cfg: Config,
    pub(crate) store: Store,
    pub(crate) trust: Trust,
    runtime: Arc<dyn Runtime>,
    /// The container runtime, when `[container]` is enabled; containers are refused without it.
    pub(crate) containers: Option<crate::runtime::container::ContainerRuntime>,
    pub(crate) reconciler: Reconciler,
    running: BTreeMap<WorkloadName, Box<dyn RunningWorkload>>,
    pub(crate) accepted: Option<(Signed, DesiredState)>,
    /// A verified desired state that could not be persisted yet (disk full); retried on every tick.
    pub(crate) unpersisted: Option<Signed>,
    /// The accepted desired state (or the root) has expired: keep running, install nothing new.
    pub(crate) frozen: bool,
    pub(crate) releases: BTreeMap<Digest, Release>,
    pub(crate) workload_rejects: BTreeMap<WorkloadName, RejectReason>,
    pub(crate) fetches: BTreeMap<ArtifactRef, Fetch>,
    /// Registry pulls of container images, per artifact digest (in memory: after a restart the engine is asked
    /// again, which needs no network when it has the image).
    pub(crate) pulls: BTreeMap<Digest, crate::fetch::Pull>,
    /// Downloaded container tarballs being checked against their signed image (off the loop's thread).
    pub(crate) checking: BTreeSet<Digest>,
    /// Releases staged ahead of a cutover: failures and container image preloads.
    pub(crate) staging: crate::staging::Staging,
    pub(crate) rejection: Option<Rejection>,
    pub(crate) position: Option<LatLon>,
    pub(crate) holds: Holds,
    /// Per workload, the spec and artifact that last started successfully (persisted): what keeps running when
    /// the wanted release cannot, across restarts too.
    pub(crate) last_good: BTreeMap<WorkloadName, (WorkloadSpec, Digest)>,
    /// When the database's WAL was last checkpointed.
    pub(crate) last_checkpoint: Instant,
    /// When loaded images were last collected by age and disk watermark (besides after every change).
    last_image_gc: Instant,
    pub(crate) artifact_history: ArtifactHistory,
    pub(crate) link: Option<Link>,
    pub(crate) connected: bool,
    pub(crate) reconnects: u64,
    /// The inventory the hub last received from this connection; a report carries the inventory whenever the
    /// current one differs (a moved device, a changed label), and always first after connecting.
    pub(crate) inventory_sent: Option<Inventory>,
    /// A new firmware slot proving itself (`firmware.rs`): confirmed once healthy, marked bad at the deadline.
    pub(crate) firmware_confirm: Option<crate::firmware::Confirming>,
    /// Firmware and agent releases: installs, the agent's trial, rolled-back releases (`system.rs`).
    pub(crate) system: crate::system::SystemUpdates,
    epoch: Instant,
    pub(crate) last_report: Instant,
    last_metrics: Instant,
    pub(crate) rt_tx: mpsc::Sender<RuntimeEvent>,
    rt_rx: Option<mpsc::Receiver<RuntimeEvent>>,
    /// Latest metrics snapshot for the optional Prometheus endpoint (written by the loop, read by the server).
    metrics_tx: tokio::sync::watch::Sender<Vec<(String, f64)>>,
    link_rx: Option<mpsc::Receiver<LinkEvent>>,
    /// Client certificate renewal and rotation.
    pub(crate) renewal: crate::credentials::Renewal,
    /// The key the hub seals this device's workload secrets to.
    pub(crate) sealing: flotilla_shared::seal::SealingKey,
    /// The service manager's notify socket (systemd `Type=notify`): ready, watchdog, stopping.
    notifier: crate::notify::Notifier,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("device", &self.trust.device)
            .finish_non_exhaustive()
    }
}

/// The link's TLS settings from `[tls]` in `agent.toml`.
pub(crate) fn tls_settings(cfg: &Config) -> Option<TlsSettings> {
    tls_settings_to(cfg, &cfg.broker)
}

/// The TLS settings for connecting to `broker` (the device broker, or the enrollment broker).
pub(crate) fn tls_settings_to(
    cfg: &Config,
    broker: &crate::config::BrokerUrl,
) -> Option<TlsSettings> {
    if !broker.tls && cfg.tls.is_none() {
        return None;
    }
    let ca_file = cfg.tls.as_ref().and_then(|t| t.ca_file.clone());
    // A certificate configured by hand wins; otherwise the one the hub issued, once there is one on disk.
    let configured = cfg
        .tls
        .as_ref()
        .and_then(|t| t.client_cert.clone().zip(t.client_key.clone()));
    let (client_cert, client_key) = match configured {
        Some((c, k)) => (Some(c), Some(k)),
        None => {
            let (c, k) = crate::credentials::client_files(&cfg.data_dir);
            if c.exists() && k.exists() {
                (Some(c), Some(k))
            } else {
                (None, None)
            }
        }
    };
    Some(TlsSettings {
        // Without a CA file, the broker is pinned by the CA fingerprint in the enrollment token.
        ca_sha256: if ca_file.is_none() {
            cfg.enroll_token
                .as_deref()
                .and_then(crate::config::token_ca_pin)
        } else {
            None
        },
        ca_file,
        client_cert,
        client_key,
    })
}

impl Agent {
    /// Opens state and prepares the runtime; does not touch the network.
    pub fn new(cfg: Config, store: Store, runtime: Arc<dyn Runtime>) -> Result<Self> {
        let trust = load_trust(&store)?.context("not enrolled")?;
        let (rt_tx, rt_rx) = mpsc::channel(1024);
        let rejection = store.rejection()?;
        let last_good = store
            .last_good()?
            .into_iter()
            .map(|(name, spec, artifact)| (name, (spec, artifact)))
            .collect();
        let position = read_position(&cfg.position);
        // Devices enrolled before secrets existed make their sealing key now; the next report registers it.
        let sealing = match store.sealing_key()? {
            Some(bytes) => flotilla_shared::seal::SealingKey::from_bytes(&bytes)
                .context("the stored sealing key")?,
            None => {
                let key = flotilla_shared::seal::SealingKey::generate();
                store.set_sealing_key(&key.to_bytes())?;
                key
            }
        };
        std::fs::create_dir_all(cfg.data_dir.join("artifacts"))?;
        std::fs::create_dir_all(cfg.data_dir.join("staging"))?;
        let now = Instant::now();
        let mut agent = Self {
            cfg,
            store,
            trust,
            runtime,
            containers: None,
            reconciler: Reconciler::new(),
            running: BTreeMap::new(),
            accepted: None,
            unpersisted: None,
            frozen: false,
            releases: BTreeMap::new(),
            workload_rejects: BTreeMap::new(),
            fetches: BTreeMap::new(),
            pulls: BTreeMap::new(),
            checking: BTreeSet::new(),
            staging: Default::default(),
            notifier: crate::notify::Notifier::new(Default::default()),
            rejection,
            position,
            holds: Holds::default(),
            last_good,
            last_checkpoint: now,
            last_image_gc: now,
            artifact_history: ArtifactHistory::default(),
            link: None,
            connected: false,
            reconnects: 0,
            inventory_sent: None,
            firmware_confirm: None,
            system: Default::default(),
            epoch: now,
            last_report: now,
            last_metrics: now,
            rt_tx,
            rt_rx: Some(rt_rx),
            metrics_tx: tokio::sync::watch::channel(Vec::new()).0,
            link_rx: None,
            renewal: crate::credentials::Renewal::default(),
            sealing,
        };
        // Before anything is planned: what the last firmware or agent update became, so a rolled-back release
        // is known as such before the restored desired state could start installing it again.
        agent.system_at_boot();
        agent.firmware_at_boot();
        Ok(agent)
    }

    pub fn device(&self) -> &DeviceId {
        &self.trust.device
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Drives container workloads through `rt` (probing its engine in the background).
    pub fn with_containers(&mut self, rt: crate::runtime::container::ContainerRuntime) {
        self.containers = Some(rt);
    }

    /// The container names the device may run now (each wanted container spec and each last good one), so the
    /// container runtime can remove what a crash or an offline change left behind.
    fn sweep_containers(&self) {
        let Some(rt) = &self.containers else { return };
        let wanted = self
            .accepted
            .iter()
            .flat_map(|(_, ds)| ds.workloads.iter())
            .chain(self.last_good.values().map(|(spec, _)| spec))
            .filter(|spec| spec.kind == flotilla_shared::wire::WorkloadKind::Container);
        let keep = wanted
            .map(|spec| {
                flotilla_agent_core::containers::container_name(
                    &spec.name,
                    &flotilla_agent_core::containers::spec_hash(self.trust.device.as_str(), spec),
                )
            })
            .collect();
        rt.sweep(keep);
    }

    pub(crate) fn millis(&self) -> Millis {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
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
            // Username: the device id; password: the secret the hub issued at enrollment. A device enrolled
            // before brokers authenticated has none, and is refused until it enrolls again.
            credentials: self
                .store
                .mqtt_secret()?
                .map(|secret| (dev.to_string(), secret)),
            last_will: Some((topics::device(dev, DeviceTopic::Presence), offline)),
            subscriptions: vec![
                topics::device(dev, DeviceTopic::Desired),
                topics::device(dev, DeviceTopic::Root),
                topics::device(dev, DeviceTopic::ArtifactChunk),
                topics::device(dev, DeviceTopic::CredentialResponse),
                topics::device(dev, DeviceTopic::LogsRequest),
            ],
            clean_session: true,
            queue: flotilla_mqtt::QUEUE,
        };
        let (link, rx) = flotilla_mqtt::connect(settings)?;
        self.link = Some(link);
        self.link_rx = Some(rx);
        Ok(())
    }

    /// Replaces the link with one that uses the credentials on disk now (after a renewal or rotation). The old
    /// connection is closed cleanly; the new one takes over the session.
    pub(crate) fn reconnect(&mut self) -> Result<()> {
        if let Some(old) = self.link.take() {
            tokio::spawn(async move { old.disconnect().await });
        }
        self.connected = false;
        self.connect()
    }

    /// Runs until `shutdown` resolves or an update needs the agent to stop (the return value says which: reboot
    /// into new firmware, or exit for the launcher to start a new agent); then stops workloads, flushes the
    /// outbox and closes cleanly.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<Option<crate::system::Exit>> {
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
            tokio::spawn(crate::metrics::serve(listener, self.metrics_tx.subscribe()));
        }
        self.metrics_tx.send_replace(self.metrics());
        self.sweep_containers();
        self.drain_actions();
        // Restored workloads are starting (from SQLite and the cache, no network): the service is up.
        let restored = self
            .accepted
            .as_ref()
            .map_or(0, |(_, ds)| ds.workloads.len());
        self.notifier
            .ready(&format!("{restored} workloads restored"));
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
            // From the loop itself: a loop that hangs stops pinging, and the service manager restarts the agent.
            self.notifier.watchdog();
            // A reconnect with new credentials made a new link.
            if let Some(rx) = self.link_rx.take() {
                link_rx = Some(rx);
            }
            self.drain_actions();
            if self.reconciler.take_changed() {
                self.save_workload_states();
                self.send_report();
                // The Prometheus endpoint shows a state change at once, not on the next tick.
                if self.cfg.metrics_listen.is_some() {
                    self.metrics_tx.send_replace(self.metrics());
                }
            }
            if self.system.exit.is_some() {
                // Tell the hub where the device is going before it goes.
                self.send_report();
                break;
            }
        }
        self.notifier.stopping();
        self.shutdown(&mut rt_rx).await;
        Ok(self.system.exit)
    }

    /// Talks to the service manager through this notifier (`Notifier::from_env` under systemd).
    pub fn set_notifier(&mut self, notifier: crate::notify::Notifier) {
        self.notifier = notifier;
    }

    fn handle(&mut self, event: Event) {
        let now = self.millis();
        match event {
            Event::Link(LinkEvent::Connected) => {
                self.connected = true;
                self.inventory_sent = None;
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

    /// Routes one MQTT message on this device's topics to the concern that owns it.
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
            (DeviceTopic::CredentialResponse, Message::CredentialResponse(resp)) => {
                self.on_credentials(resp)
            }
            (DeviceTopic::LogsRequest, Message::LogsRequest(req)) => self.on_logs_request(req),
            (leaf, _) => tracing::warn!(?leaf, "message kind does not belong on this topic"),
        }
    }

    /// Routes a runtime event: workload lifecycle to the reconciler, telemetry and holds to their concerns.
    fn on_runtime(&mut self, now: Millis, ev: RuntimeEvent) {
        match ev {
            RuntimeEvent::Started { name, op, result } => {
                // A pulled image the engine lost since has no tarball to load from: pull (or download) again.
                let lost_pull = match (&result, self.reconciler.running(&name)) {
                    (Err(_), Some((_, a)))
                        if self.pulls.get(&a) == Some(&crate::fetch::Pull::Ready)
                            && !self.store.has_artifact(&a).unwrap_or(false) =>
                    {
                        self.pulls.remove(&a);
                        true
                    }
                    _ => false,
                };
                if let Err(e) = &result {
                    tracing::warn!(workload = %name, error = %e, "start failed");
                    self.running.remove(&name);
                } else {
                    tracing::info!(workload = %name, "running");
                }
                let started = result.is_ok();
                self.reconciler.op_finished(now, &name, op, result);
                if started {
                    self.remember_last_good(&name);
                }
                if lost_pull {
                    self.refresh_desired();
                }
            }
            RuntimeEvent::Loading { name, op } => self.reconciler.loading(&name, op),
            RuntimeEvent::ImageChecked {
                digest,
                size,
                staging,
                result,
            } => self.on_image_checked(digest, size, &staging, result),
            RuntimeEvent::Pulled {
                workload,
                artifact,
                result,
            } => self.on_pulled(&workload, artifact, result),
            RuntimeEvent::Exited { name, op, exit } => {
                tracing::info!(workload = %name, ?exit, "exited");
                self.running.remove(&name);
                self.reconciler.exited(now, &name, op, exit);
            }
            RuntimeEvent::Stopped { name, op } => {
                tracing::info!(workload = %name, "stopped");
                let was = self.reconciler.running(&name);
                self.running.remove(&name);
                self.reconciler.op_finished(now, &name, op, Ok(()));
                if let Some((old, _)) = was {
                    self.delete_stopped_version(&old);
                }
            }
            RuntimeEvent::Metric {
                name,
                metric,
                value,
            } => self.on_guest_metric(&name, metric, value),
            RuntimeEvent::Hold { name, reason, secs } => self.on_guest_hold(name, reason, secs),
            RuntimeEvent::Preloaded { artifact, result } => self.on_preloaded(artifact, result),
            RuntimeEvent::FirmwareInstalled { release, result } => {
                self.on_firmware_installed(release, result)
            }
            RuntimeEvent::ImageLoaded { name, image } => {
                if let Err(e) = self.store.record_image(name.as_str(), &image, unix_now()) {
                    tracing::warn!(error = %e, "cannot record a loaded image");
                }
                self.collect_images();
            }
            RuntimeEvent::Logs(resp) => self.send_logs(resp),
            RuntimeEvent::ImagesRemoved(images) => {
                if let Err(e) = self.store.forget_images(&images) {
                    tracing::warn!(error = %e, "cannot forget removed images");
                }
            }
            RuntimeEvent::Telemetry {
                name,
                stream,
                payload,
            } => self.on_guest_telemetry(&name, stream, payload),
        }
    }

    /// Once a second: holds, position, stalled downloads, periodic reports and metrics, the outbox.
    fn on_tick(&mut self) {
        self.refresh_holds();
        self.firmware_tick();
        self.system_tick();
        if let Some(signed) = self.unpersisted.take() {
            self.on_desired(signed);
        }
        if self.cfg.metrics_listen.is_some() {
            self.metrics_tx.send_replace(self.metrics());
        }
        if let PositionSource::File(_) = self.cfg.position {
            let p = read_position(&self.cfg.position);
            if p != self.position {
                tracing::info!(?p, "position changed");
                self.position = p;
                self.refresh_desired();
                // The hub places by position: tell it now, not at the next periodic report.
                self.send_report();
            }
        }
        self.rerequest_stalled_fetches();
        self.retry_refused_downloads();
        self.renew_if_due();
        self.checkpoint_if_due();
        if self.last_image_gc.elapsed() >= Duration::from_secs(60) {
            self.last_image_gc = Instant::now();
            // Images age out and disks fill without any other event.
            self.collect_images();
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
            self.push_agent_metrics();
        }
        self.drain_outbox();
    }

    /// Executes the reconciler's actions: starts go to the runtime, stops to the running handle.
    fn drain_actions(&mut self) {
        while let Some(action) = self.reconciler.poll_action() {
            match action {
                Action::Start {
                    name,
                    op,
                    spec,
                    artifact,
                } => {
                    let secrets = match self.open_secrets(&name, &spec) {
                        Ok(s) => s,
                        Err(e) => {
                            // A start that cannot have its secrets fails like any start, saying which and why.
                            tracing::warn!(workload = %name, error = %e, "start failed");
                            let now = self.millis();
                            self.reconciler.op_finished(now, &name, op, Err(e));
                            continue;
                        }
                    };
                    let image = self
                        .releases
                        .get(&spec.release)
                        .and_then(|r| r.image.clone());
                    let generation = self.accepted.as_ref().map_or(0, |(_, ds)| ds.generation);
                    let kind = spec.kind;
                    let req = StartRequest {
                        name: name.clone(),
                        op,
                        spec,
                        artifact_path: self.artifact_path(&artifact),
                        artifact,
                        image,
                        generation,
                        secrets,
                    };
                    let handle = match (kind, &self.containers) {
                        (WorkloadKind::Wasm, _) => self.runtime.start(req, self.rt_tx.clone()),
                        (WorkloadKind::Container, Some(rt)) => rt.start(req, self.rt_tx.clone()),
                        (WorkloadKind::Firmware | WorkloadKind::Agent, _) => {
                            // Installed by the system-update concern, never planned as workloads.
                            let now = self.millis();
                            self.reconciler.op_finished(
                                now,
                                &name,
                                op,
                                Err("firmware and agent releases are not run as workloads".into()),
                            );
                            continue;
                        }
                        (WorkloadKind::Container, None) => {
                            // Refused before planning (UnsupportedKind); reaching here is a bug, not a crash.
                            let now = self.millis();
                            self.reconciler.op_finished(
                                now,
                                &name,
                                op,
                                Err("container workloads are disabled on this device".into()),
                            );
                            continue;
                        }
                    };
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

    /// Stops every workload (bounded wait), flushes the outbox and says goodbye to the broker.
    async fn shutdown(&mut self, rt_rx: &mut mpsc::Receiver<RuntimeEvent>) {
        tracing::info!("shutting down: stopping workloads");
        let mut op = u64::MAX / 2;
        // Containers keep running for the next agent to adopt; in-process workloads are stopped.
        self.running.retain(|_, h| !h.detach());
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

    /// Persists what `name` runs now as its last good version (a no-op when it is already recorded).
    fn remember_last_good(&mut self, name: &WorkloadName) {
        let Some((spec, artifact)) = self.reconciler.running(name) else {
            return;
        };
        if self.last_good.get(name) == Some(&(spec.clone(), artifact)) {
            return;
        }
        if let Err(e) = self.store.save_last_good(&spec, &artifact) {
            tracing::warn!(workload = %name, error = %e, "cannot persist the last good version");
            return;
        }
        self.last_good.insert(name.clone(), (spec, artifact));
        // The version before the new one is now the previous one: re-plan, so the collection keeps exactly the
        // current and the previous version (the one before that was still running during the last collection).
        self.refresh_desired();
    }

    /// `flotilla logs`: a WASM workload's capture is in memory; a container's is read from the engine by the
    /// container runtime, which answers through a runtime event.
    fn on_logs_request(&mut self, req: flotilla_shared::wire::LogsRequest) {
        let lines = req.lines.clamp(1, 10_000) as usize;
        let spec = self.accepted.as_ref().and_then(|(_, ds)| {
            ds.workloads
                .iter()
                .find(|w| w.name == req.workload)
                .cloned()
        });
        let answer = |text: String, error: Option<String>| flotilla_shared::wire::LogsResponse {
            request: req.request,
            workload: req.workload.clone(),
            text,
            error,
        };
        match (spec, &self.containers) {
            (None, _) => self.send_logs(answer(
                String::new(),
                Some("the device's desired state has no such workload".into()),
            )),
            (Some(spec), Some(rt)) if spec.kind == WorkloadKind::Container => {
                // The version running now: the wanted spec, or the last good one it fell back to.
                let running = self
                    .reconciler
                    .running(&req.workload)
                    .map_or(spec, |(s, _)| s);
                let name = flotilla_agent_core::containers::container_name(
                    &running.name,
                    &flotilla_agent_core::containers::spec_hash(
                        self.trust.device.as_str(),
                        &running,
                    ),
                );
                rt.fetch_logs(name, lines, answer(String::new(), None), self.rt_tx.clone());
            }
            (Some(_), _) => {
                let text = self
                    .running
                    .get(&req.workload)
                    .map(|h| tail_lines(&h.logs(), lines))
                    .unwrap_or_default();
                let error = (!self.running.contains_key(&req.workload))
                    .then(|| "the workload is not running now".to_owned());
                self.send_logs(answer(text, error));
            }
        }
    }

    /// Publishes a logs answer, keeping the newest part when it is too long for one message.
    fn send_logs(&mut self, mut resp: flotilla_shared::wire::LogsResponse) {
        let max = flotilla_shared::wire::LOGS_MAX_BYTES;
        if resp.text.len() > max {
            let mut cut = resp.text.len() - max;
            while !resp.text.is_char_boundary(cut) {
                cut += 1;
            }
            resp.text = resp.text[cut..].to_owned();
        }
        if let (Some(link), Ok(bytes)) = (&self.link, codec::encode(&Message::LogsResponse(resp))) {
            let _ = link.publish(
                &topics::device(&self.trust.device, DeviceTopic::LogsResponse),
                bytes,
                false,
            );
        }
    }

    /// Names of workloads currently running (for tests and metrics).
    pub fn running_names(&self) -> BTreeSet<WorkloadName> {
        self.running.keys().cloned().collect()
    }
}

/// The last `n` lines of `text`.
pub(crate) fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = lines[start..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}
