//! The hub loop: the single owner of the hub store. MQTT messages, API calls and ticks arrive as [`Event`]s; the
//! loop routes each to the concern that owns it and decides nothing itself:
//! - [`crate::fleet`]: enrollment, presence, reports, the device registry's views;
//! - [`crate::deploy`]: resolving and applying deployments, placement, signing and publishing desired states;
//! - [`crate::rollout`]: the driver around the rollout state machine, and telemetry gates;
//! - [`crate::artifacts`]: the release store and chunk serving;
//! - [`crate::telemetry`]: telemetry ingestion.

use crate::deploy::publish::DesiredCache;
use crate::rollout::DeploymentRollout;
use crate::spec::Deployment;
use crate::store::Store;
use crate::telemetry::Telemetry;
use anyhow::{Context, Result};
use flotilla_mqtt::{Link, LinkEvent};
use flotilla_shared::Digest;
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::trust::{self, SigningKey};
use flotilla_shared::wire::{Root, Signed};
use std::collections::BTreeMap;
use tokio::sync::mpsc;

pub use crate::deploy::publish::DESIRED_TTL_SECS;
pub use crate::telemetry::StreamStats;

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
    /// Desired states handed to the broker again by anti-entropy (device behind, or back online).
    pub desired_resent: u64,
    pub reports_accepted: u64,
    pub reports_rejected: u64,
    pub messages_rejected: u64,
    pub chunks_served: u64,
    pub telemetry_records: u64,
    pub enrollments: u64,
    /// Client certificates and passwords issued after enrollment (renewals and rotations).
    pub credentials_issued: u64,
    pub last_placement_secs: f64,
    /// Whether the hub's own MQTT link is connected to the broker.
    pub link_up: bool,
}

/// The hub's state, owned by its loop. Each concern keeps its own state in its own field; the concerns' handlers
/// live in their modules as `impl Hub` blocks, so the loop below only routes.
pub struct Hub {
    pub store: Store,
    pub(crate) link: Link,
    pub(crate) hub_key: SigningKey,
    pub(crate) root: Root,
    pub(crate) root_signed: Signed,
    pub(crate) deployments: BTreeMap<String, Deployment>,
    pub rollouts: BTreeMap<String, DeploymentRollout>,
    pub telemetry: Telemetry,
    pub(crate) desired: DesiredCache,
    pub metrics: HubMetrics,
    /// The control plane's SLI histograms and counters (shared with the API).
    pub slis: crate::slis::Slis,
    /// Desired states published and not yet acknowledged or running (reconcile lag, start time).
    pub(crate) inflight: crate::slis::InFlight,
    /// Each device's recent reports, summarised (the console's device page).
    pub(crate) recent_reports: crate::fleet::recent::RecentReports,
    /// The MQTT credential registry the embedded broker authenticates against (shared with it).
    pub access: crate::access::Credentials,
    /// SHA-256 of the broker CA's certificate, appended to enrollment tokens (`fet_<secret>.<sha256>`) so a fresh
    /// device pins the broker with nothing but its token; `None` without the generated TLS listener.
    pub(crate) broker_ca_fingerprint: Option<String>,
    /// The key device MQTT secrets are derived under (see [`crate::access::device_secret`]).
    pub(crate) enroll_key: Vec<u8>,
    /// The hub's own sealing key: workload secrets are stored sealed to it (`keys/secrets.key`).
    pub(crate) secrets_key: Option<flotilla_shared::seal::SealingKey>,
    /// The device CA that signs client certificates, when this hub has one.
    pub(crate) device_certs: Option<crate::fleet::credentials::DeviceCerts>,
    /// Where the hub keeps an external Mosquitto's files current, if it does (`serve --mosquitto-dir`).
    pub(crate) mosquitto: Option<crate::mosquitto::Export>,
    /// The embedded broker, when this hub runs one: revocation disconnects through it.
    pub(crate) broker: Option<crate::embedded::Broker>,
    /// Something placement reads changed: re-place on the next tick. The one cross-concern signal.
    pub(crate) dirty: bool,
    /// The admission policy file (`--policy`), re-read when it changes.
    pub(crate) policy: Option<std::cell::RefCell<crate::admission::file::PolicyFile>>,
    /// `flotilla logs` requests waiting for their device's answer.
    pub(crate) pending_logs: crate::fleet::logs::PendingLogs,
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
    /// Refused by the admission policy: every denied rule with its field.
    #[error("{0}")]
    Policy(String),
}

impl From<crate::store::StoreError> for HubError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl Hub {
    pub fn new(
        store: Store,
        link: Link,
        hub_key: SigningKey,
        root_signed: Signed,
        access: crate::access::Credentials,
    ) -> Result<Self> {
        let root = trust::verify_initial_root(&root_signed, unix_now()).context("hub root")?;
        let deployments = crate::deploy::load(&store)?;
        let rollouts = crate::rollout::load(&store)?;
        Ok(Self {
            store,
            link,
            hub_key,
            root,
            root_signed,
            deployments,
            rollouts,
            telemetry: Telemetry::default(),
            desired: DesiredCache::default(),
            metrics: HubMetrics::default(),
            access,
            enroll_key: trust::random_hex(32).into_bytes(),
            broker_ca_fingerprint: None,
            device_certs: None,
            secrets_key: None,
            mosquitto: None,
            broker: None,
            dirty: true,
            policy: None,
            pending_logs: Default::default(),
            slis: Default::default(),
            inflight: Default::default(),
            recent_reports: Default::default(),
        })
    }

    /// The hub's subscriptions (re-issued on every reconnect by the link).
    pub fn subscriptions() -> Vec<String> {
        vec![
            topics::all_devices(DeviceTopic::Report),
            topics::all_devices(DeviceTopic::Presence),
            topics::all_devices(DeviceTopic::ArtifactRequest),
            topics::all_devices(DeviceTopic::CredentialRequest),
            topics::all_devices(DeviceTopic::LogsResponse),
            topics::ENROLL_REQUESTS.to_owned(),
            topics::telemetry_filter(None),
            // Sparkplug B host applications' commands (rebirth requests); ignored unless `--sparkplug`.
            format!("{}+/NCMD/+", topics::SPARKPLUG_PREFIX),
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
                self.metrics.link_up = true;
                self.sparkplug_rebirth_all();
                self.dirty = true;
                self.on_broker_connected();
            }
            Event::Link(LinkEvent::Disconnected(e)) => {
                self.metrics.link_up = false;
                tracing::warn!(error = %e, "hub lost the broker")
            }
            Event::Link(LinkEvent::Message { topic, payload }) => self.on_message(&topic, &payload),
            Event::Call(f) => f(self),
            Event::Tick => {
                // Grace periods and expiry move with time alone; re-place once a second at most.
                self.dirty = true;
                self.tick_rollouts(unix_now());
                self.persist_superseded();
                self.sync_mosquitto();
            }
        }
        self.drive_rollouts();
        if self.dirty && tick {
            self.dirty = false;
            if let Err(e) = self.reconcile_fleet() {
                self.slis.error(crate::slis::ControlPlaneError::Placement);
                tracing::error!(error = %e, "placement failed");
            }
        }
    }

    /// Routes one MQTT message by topic to the concern that owns it.
    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        if let Some(nonce) = topics::parse_enroll_request(topic) {
            match codec::decode(payload) {
                Ok(Message::EnrollRequest(req)) => self.on_enroll(nonce.to_owned(), *req),
                _ => self.metrics.messages_rejected += 1,
            }
            return;
        }
        if topic.starts_with(topics::SPARKPLUG_PREFIX) {
            self.on_sparkplug_command(topic, payload);
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
            (DeviceTopic::Presence, Message::Presence(p)) => self.on_presence(&device, &p),
            (DeviceTopic::ArtifactRequest, Message::ArtifactRequest(req)) => {
                self.on_artifact_request(&device, req)
            }
            (DeviceTopic::CredentialRequest, Message::CredentialRequest(req)) => {
                self.on_credential_request(&device, &req)
            }
            (DeviceTopic::LogsResponse, Message::LogsResponse(resp)) => {
                self.on_logs_response(&device, resp)
            }
            _ => Err("message kind does not belong on this topic".to_owned()),
        };
        if let Err(e) = result {
            tracing::warn!(device = %device, topic, error = %e, "message rejected");
            self.metrics.messages_rejected += 1;
        }
    }

    /// Sets the key device secrets are derived under; it must stay the same across restarts (the hub's own MQTT
    /// secret is used), or re-sent enrollments would get secrets the stored hashes do not match.
    pub fn set_enroll_key(&mut self, key: &[u8]) {
        self.enroll_key = Digest::of(&[b"flotilla enrollment key\0".as_slice(), key].concat())
            .0
            .to_vec();
    }

    /// Sets the broker CA fingerprint new enrollment tokens carry.
    pub fn set_broker_ca_fingerprint(&mut self, fingerprint: String) {
        self.broker_ca_fingerprint = Some(fingerprint);
    }

    /// Gives the hub the key its stored secrets are sealed to.
    pub fn set_secrets_key(&mut self, key: flotilla_shared::seal::SealingKey) {
        self.secrets_key = Some(key);
    }

    /// Gives the hub its device CA: enrollments with a CSR get a client certificate valid `lifetime_secs`.
    pub fn set_device_certs(&mut self, ca: crate::pki::DeviceCa, lifetime_secs: u64) {
        self.device_certs = Some(crate::fleet::credentials::DeviceCerts {
            ca,
            lifetime_secs,
            last_issued: Default::default(),
        });
    }

    /// Keeps an external Mosquitto's ACL, password files and revocation list current.
    pub fn set_mosquitto_export(&mut self, export: crate::mosquitto::Export) {
        self.mosquitto = Some(export);
    }

    /// Something the Mosquitto files show changed; they are rewritten on the next tick.
    pub(crate) fn mosquitto_files_changed(&mut self) {
        if let Some(m) = &mut self.mosquitto {
            m.changed();
        }
    }

    fn sync_mosquitto(&mut self) {
        if let Some(m) = &mut self.mosquitto {
            match m.sync(&self.store, unix_now()) {
                Ok(true) => tracing::info!(dir = %m.files.dir.display(), "mosquitto files updated"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "updating the mosquitto files")
                }
            }
        }
    }

    /// Checks every apply against the admission policy in this file from now on (re-read when it changes).
    pub fn set_policy(&mut self, file: crate::admission::file::PolicyFile) {
        self.policy = Some(std::cell::RefCell::new(file));
    }

    /// Hands the hub the embedded broker it runs on (for revocation).
    pub fn set_broker(&mut self, broker: crate::embedded::Broker) {
        self.broker = Some(broker);
    }

    pub fn root(&self) -> &Root {
        &self.root
    }
}

/// A hub for unit tests of the concern modules.
#[cfg(test)]
pub(crate) mod test_support {
    use super::Hub;
    use crate::store::Store;
    use flotilla_mqtt::LinkEvent;
    use flotilla_shared::Digest;
    use flotilla_shared::trust::{self, DocType, SigningKey};
    use flotilla_shared::wire::{
        HealthRule, Resources, RestartPolicy, Root, WorkloadKind, WorkloadSpec,
    };

    pub fn spec(name: &str) -> WorkloadSpec {
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
            secrets: vec![],
            container: None,
        }
    }

    /// A hub on the store in `dir`, signing with a fixed key, whose link points at a closed port: publishes queue in
    /// the client, which is all these tests need.
    pub fn test_hub(dir: &std::path::Path) -> (Hub, tokio::sync::mpsc::Receiver<LinkEvent>) {
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
            credentials: None,
            last_will: None,
            subscriptions: vec![],
            clean_session: true,
            queue: 1024,
        })
        .expect("link");
        let store = Store::open(dir).expect("store");
        let access = crate::access::Credentials::new("test-hub-secret", true);
        (
            Hub::new(store, link, key, root_signed, access).expect("hub"),
            rx,
        )
    }
}
