//! Wire types: everything that crosses MQTT or is stored signed. Only this crate derives serde for them.
//!
//! A change to any type here changes the encoding and must bump [`crate::codec::PROTOCOL_VERSION`]. Field order
//! matters (postcard has no field names), so new fields go at the end together with a version bump.

use crate::ids::{DeviceId, Digest, Label, WorkloadName};
use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch. All protocol timestamps use it; cores receive `now` from their shell.
pub type UnixSecs = u64;

/// One ed25519 signature and the id of the key that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    /// First 8 bytes of SHA-256 of the public key; selects the key, never trusted on its own.
    pub key_id: [u8; 8],
    /// 64 signature bytes (a `Vec` because serde has no 64-byte arrays; the length is checked on verification).
    pub sig: Vec<u8>,
}

/// A signed document: the exact encoded body bytes and the signatures over them.
///
/// Signatures cover a domain-separation prefix plus `body`, never a re-encoding, so verification is over the
/// exact bytes that were signed. The body is decoded only after the signatures check out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub body: Vec<u8>,
    pub signatures: Vec<SignatureEntry>,
}

/// An ed25519 public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

/// The trust root: who may sign what. Signed by a threshold of its own root keys (and, for rotation, the previous
/// root's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    pub version: u32,
    pub expires_at: UnixSecs,
    pub root_keys: Vec<PublicKey>,
    pub root_threshold: u8,
    pub release_keys: Vec<PublicKey>,
    pub release_threshold: u8,
    pub hub_keys: Vec<PublicKey>,
    pub hub_threshold: u8,
}

/// What kind of artifact a workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WorkloadKind {
    Wasm,
    Container,
    /// A system image for the device's other boot slot (A/B), installed through the agent's update backend and
    /// confirmed after a reboot. Never run as a workload; its release names the device type (`compatible`).
    Firmware,
    /// A new `flotilla-agent` binary, staged beside the running one and switched to under the launcher, which
    /// switches back if it does not come up healthy. Its release names the CPU architecture (`compatible`).
    Agent,
}

impl WorkloadKind {
    /// `wasm`, `container`, `firmware`, `agent`: the names specs and the CLI use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Wasm => "wasm",
            Self::Container => "container",
            Self::Firmware => "firmware",
            Self::Agent => "agent",
        }
    }

    /// The inverse of [`WorkloadKind::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Wasm, Self::Container, Self::Firmware, Self::Agent]
            .into_iter()
            .find(|k| k.name() == s)
    }

    /// Firmware and agent releases update the device itself: one at a time, never run by the reconciler.
    pub fn is_system(self) -> bool {
        matches!(self, Self::Firmware | Self::Agent)
    }
}

/// A module compiled ahead of time for one target and engine, signed as part of its [`Release`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Precompiled {
    pub target: String,
    pub engine_fingerprint: String,
    pub digest: Digest,
    pub size: u64,
}

/// A release: says that an artifact exists and may run. Signed by a threshold of release keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub name: WorkloadName,
    pub version: String,
    /// Security epoch: a device never accepts a release of a lower epoch than it has accepted for this name.
    pub epoch: u32,
    pub kind: WorkloadKind,
    pub artifact_digest: Digest,
    pub artifact_size: u64,
    pub precompiled: Vec<Precompiled>,
    /// For container releases: what the artifact (a canonical image tarball, see [`crate::image`]) must contain.
    pub image: Option<ContainerImage>,
    /// For firmware and agent releases: what the device must be to install it (RAUC's `compatible` device type
    /// for firmware, the CPU architecture for an agent, as `std::env::consts::ARCH` names it). Signed, so a
    /// release built for other hardware is refused before a byte of it is written.
    pub compatible: Option<String>,
}

/// The identity of a container image, signed in its release and checked on the device before and after the load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerImage {
    /// SHA-256 of the image config: the image ID on Docker's classic store, balenaEngine and Podman.
    pub config_digest: Digest,
    /// SHA-256 of the OCI manifest: the image ID on Docker's containerd image store.
    pub manifest_digest: Digest,
    /// The uncompressed layers' digests, bottom first (the config's `rootfs.diff_ids`).
    pub diff_ids: Vec<Digest>,
    /// An optional second source for connected sites: `registry/repository@sha256:<manifest digest>` (always a
    /// digest, never a tag; see [`crate::image::check_registry_ref`]). The agent tries it first and falls back to
    /// the MQTT-delivered tarball; either way the engine's image must have the signed config digest.
    pub registry: Option<String>,
}

/// How a container is replaced by a new version (balena's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateStrategy {
    /// Fetch and load the new image while the old container runs, then swap (the default).
    DownloadThenKill,
    /// Stop the old container first, then fetch and start the new one.
    KillThenDownload,
    /// Stop the old container and remove its image before fetching (devices without room for two images).
    DeleteThenDownload,
}

/// The container's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkMode {
    Bridge,
    None,
    /// The host's network namespace: only where the device's allow-list permits it.
    Host,
}

/// A published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMap {
    pub host: u16,
    pub container: u16,
    pub udp: bool,
}

/// A named volume of the workload mounted at `path`; kept across updates of the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    pub name: String,
    pub path: String,
    pub read_only: bool,
}

/// A health check run inside the container by the engine; the agent restarts the container when it reports
/// unhealthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerHealth {
    pub command: Vec<String>,
    pub interval_secs: u32,
    pub retries: u32,
}

/// Container-only fields of a workload. Typed on purpose: a spec never carries raw engine JSON, so the agent
/// decides every engine setting (and the hardening defaults) itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Replaces the image's command when not empty.
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Where the workload's `config` bytes appear (read-only) inside the container.
    pub config_path: String,
    /// CPU limit in thousandths of a CPU; 0 is no limit.
    pub cpus_milli: u32,
    pub pids: u32,
    pub ports: Vec<PortMap>,
    pub volumes: Vec<VolumeMount>,
    /// Host device paths passed in (each must be on the device's allow-list).
    pub devices: Vec<String>,
    /// Capabilities added to an otherwise empty set (each must be on the device's allow-list).
    pub capabilities: Vec<String>,
    pub network: NetworkMode,
    /// Read-only root file system, with a tmpfs on `/tmp`.
    pub read_only: bool,
    pub user: Option<String>,
    pub health: Option<ContainerHealth>,
    pub stop_timeout_secs: u32,
    pub update_strategy: UpdateStrategy,
    /// Cap on the engine's log file for this container.
    pub log_max_bytes: u64,
}

/// How a workload is restarted when it exits or fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    Never,
    OnFailure,
    Always,
}

/// How the agent decides a workload is healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthRule {
    /// Healthy once it has been running for this many seconds without a failure.
    RunningFor(u32),
    /// A ticked module is healthy while its last `n` ticks succeeded.
    TicksOk(u16),
}

/// Resource limits for one workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Linear-memory (WASM) or cgroup (container) limit in MiB.
    pub memory_mib: u32,
    /// CPU budget per run or per tick, in milliseconds of wall-clock execution before the guest is interrupted.
    pub cpu_ms: u32,
}

/// A geographic position in degrees (WGS84).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatLon {
    pub lat: f64,
    pub lon: f64,
}

/// A region of the earth a workload is confined to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Geofence {
    Circle {
        center: LatLon,
        radius_m: f64,
    },
    Polygon(Vec<LatLon>),
    /// H3 cell indexes (any resolution); the fence is their union.
    H3Cells(Vec<u64>),
}

/// One workload as the hub wants it to run on a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    pub name: WorkloadName,
    pub kind: WorkloadKind,
    /// Digest of the signed [`Release`] body; the release in turn names the artifact.
    pub release: Digest,
    /// Opaque configuration handed to the guest (key=value lines by convention).
    pub config: Vec<u8>,
    pub resources: Resources,
    pub restart: RestartPolicy,
    pub health: HealthRule,
    /// For ticked modules: how often the host calls the guest's `tick` export. `0` means run `_start` once.
    pub tick_ms: u32,
    pub geofence: Option<Geofence>,
    /// The secrets of its deployment it may read, by name and version. A new version changes the spec, so the
    /// workload restarts with the new value; the sealed values travel in [`DesiredState::sealed`].
    pub secrets: Vec<SecretRef>,
    /// Present exactly when `kind` is [`WorkloadKind::Container`]. Boxed: it is larger than the rest of the
    /// spec, and WASM workloads (most of them) do not carry it.
    pub container: Option<Box<ContainerSpec>>,
}

/// A workload's reference to one secret of its deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRef {
    /// The deployment the secret belongs to (secrets are set per deployment).
    pub deployment: String,
    pub name: String,
    pub version: u64,
}

/// A secret value sealed to this device's sealing key (see [`crate::seal`]), for one workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    pub workload: WorkloadName,
    pub name: String,
    pub version: u64,
    pub sealed: Vec<u8>,
}

/// The full desired state of one device. Signed by a threshold of hub keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    pub device: DeviceId,
    /// Strictly increasing per device; equal only for byte-identical documents.
    pub generation: u64,
    pub issued_at: UnixSecs,
    pub expires_at: UnixSecs,
    pub workloads: Vec<WorkloadSpec>,
    /// The workloads' secrets, each sealed to this device alone (re-sealed whenever the state is re-signed).
    pub sealed: Vec<SealedSecret>,
    /// Workloads of the release the device will be moved to next (a rollout's coming wave): fetched, verified
    /// and (containers) loaded ahead of the cutover, without touching what runs, so the cutover needs no
    /// download. Never run from here.
    pub staged: Vec<WorkloadSpec>,
}

/// Delivers root rotations: each entry is signed by its predecessor's and its own root keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootUpdate {
    pub chain: Vec<Signed>,
}

/// Observed state of one workload on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkloadState {
    /// Waiting for artifact bytes.
    Downloading,
    /// A container image is being pulled from its registry or loaded into the engine.
    Loading,
    Starting,
    Running,
    /// Ran to completion (command-style guest) and the restart policy says stay down.
    Exited,
    /// Failed and waiting for its backoff to expire before the next start.
    BackingOff,
    /// Failed and the restart policy says stay down.
    Failed,
    /// Not running because the device is outside the workload's geofence.
    HeldByGeofence,
}

/// Why a desired state, release or artifact was refused. Reported to the hub and shown by `flotilla why`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    Malformed,
    Unsigned,
    UnknownKey,
    BadSignature,
    BelowThreshold {
        valid: u8,
        needed: u8,
    },
    WrongDevice,
    StaleGeneration {
        floor: u64,
        got: u64,
    },
    Expired {
        expires_at: UnixSecs,
        now: UnixSecs,
    },
    RootExpired,
    ReleaseMissing,
    ReleaseMismatch,
    EpochDowngrade {
        floor: u32,
        got: u32,
    },
    ArtifactDigestMismatch,
    ArtifactTooLarge,
    ArtifactStalled,
    InsufficientDisk {
        needed: u64,
        free: u64,
    },
    UnsupportedKind,
    InvalidSpec(String),
    /// A container image tarball failed the device's check before the load (nothing was loaded).
    BadImage(ImageProblem),
    /// The spec asks for something this device's local allow-list does not permit (named in the text).
    NotAllowed(String),
    /// The agent has no WASM compiler and the release carries no module precompiled for its target and engine.
    NoPrecompiledVariant {
        target: String,
        fingerprint: String,
    },
    /// A firmware or agent release for other hardware: the release's `compatible` against the device's.
    Incompatible {
        release: String,
        device: String,
    },
    /// The update backend refused the update before activating it (the running system is untouched).
    UpdateRefused(String),
    /// The update was installed and started, did not come up healthy, and the device went back to the previous
    /// version (it is not tried again).
    RolledBack(String),
}

/// What is wrong with a container image tarball, found by [`crate::image::verify`] or after the load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageProblem {
    /// Not a readable tar archive (truncated, or not a tar at all).
    NotATar,
    /// An entry a canonical image tarball does not have (another path, a link, a device node, a duplicate).
    UnexpectedEntry(String),
    /// `repositories` or per-layer `json`/`VERSION` files: the legacy `docker save` format.
    LegacyFormat,
    /// The tarball names a tag: loading it could re-tag an image already on the device.
    Tagged,
    /// A blob's content does not hash to its name.
    BlobDigestMismatch(String),
    /// The config, manifest or layers differ from what the release signed (which one is named).
    NotTheSignedImage(String),
    /// A metadata file is missing, too large or not the JSON it should be (which one is named).
    BadMetadata(String),
    /// After the load the engine has no image with the signed config or manifest digest as its ID.
    LoadedIdMismatch,
}

impl std::fmt::Display for ImageProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotATar => f.write_str("it is not a readable tar archive"),
            Self::UnexpectedEntry(p) => write!(f, "it holds an unexpected entry `{p}`"),
            Self::LegacyFormat => f.write_str(
                "it is in the legacy `docker save` format; push it with `flotilla release push --kind container`, \
                 which writes the canonical form",
            ),
            Self::Tagged => f.write_str("it names a tag, and a load must never re-tag an image"),
            Self::BlobDigestMismatch(b) => write!(f, "blob {b} does not hash to its name"),
            Self::NotTheSignedImage(what) => write!(f, "its {what} differs from the signed release"),
            Self::BadMetadata(what) => write!(f, "its {what} is missing or invalid"),
            Self::LoadedIdMismatch => {
                f.write_str("the engine loaded it under another image ID than the signed one")
            }
        }
    }
}

/// Sizes for people: `1.5 MiB`, `512 B`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A sentence for operators (`flotilla why`, the console, logs): what was refused and what fixes it.
impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed => f.write_str("the document is not a valid Flotilla payload"),
            Self::Unsigned => f.write_str("the document carries no signature"),
            Self::UnknownKey => f.write_str(
                "it is signed by a key the device's trust root does not know; check that the hub and the device \
                 use the same root (`flotilla root show`)",
            ),
            Self::BadSignature => f.write_str("a signature does not verify"),
            Self::BelowThreshold { valid, needed } => write!(
                f,
                "only {valid} valid signature(s) where {needed} are required; co-sign it with more keys"
            ),
            Self::WrongDevice => f.write_str("it is addressed to another device"),
            Self::StaleGeneration { floor, got } => write!(
                f,
                "generation {got} is older than generation {floor}, which the device already accepted"
            ),
            Self::Expired { expires_at, now } => write!(
                f,
                "it expired at unix time {expires_at} (device time {now}); the hub re-signs well before expiry, \
                 so check the clocks of the hub and the device"
            ),
            Self::RootExpired => f.write_str(
                "the device's trust root has expired; sign and publish a new root version (`flotilla root sign`)",
            ),
            Self::ReleaseMissing => {
                f.write_str("the hub does not have this release (never pushed, or removed)")
            }
            Self::ReleaseMismatch => f.write_str(
                "the release does not match what the desired state names (its digest or its kind)",
            ),
            Self::EpochDowngrade { floor, got } => write!(
                f,
                "the release has security epoch {got}, below epoch {floor} that this device already accepted for \
                 the workload (anti-rollback); release the version again with --epoch {floor} or higher"
            ),
            Self::ArtifactDigestMismatch => {
                f.write_str("the downloaded artifact's SHA-256 differs from the signed release")
            }
            Self::ArtifactTooLarge => {
                f.write_str("the artifact is larger than the signed release says")
            }
            Self::ArtifactStalled => f.write_str(
                "the artifact download stalled (requests unanswered); the device keeps trying",
            ),
            Self::InsufficientDisk { needed, free } => write!(
                f,
                "not enough disk space: the artifact needs {} plus a reserve, {} is free; free space on the \
                 device's data partition (or raise limits.max_data_mib), the device retries by itself",
                human_bytes(*needed),
                human_bytes(*free)
            ),
            Self::UnsupportedKind => f.write_str("this device cannot run this kind of workload"),
            Self::InvalidSpec(why) => write!(f, "invalid workload spec: {why}"),
            Self::BadImage(p) => write!(f, "the container image was refused before loading: {p}"),
            Self::NotAllowed(why) => write!(f, "refused by the device: {why}"),
            Self::Incompatible { release, device } => write!(
                f,
                "the release is built for {release:?} and this device is {device:?}; nothing was installed"
            ),
            Self::UpdateRefused(why) => {
                write!(f, "the update was refused before activation ({why}); the running system is untouched")
            }
            Self::RolledBack(why) => write!(
                f,
                "the update was installed but did not come up healthy ({why}); the device went back to the \
                 previous version and will not try this release again"
            ),
            Self::NoPrecompiledVariant { target, fingerprint } => write!(
                f,
                "this agent has no WASM compiler and the release has no module precompiled for {target} \
                 (engine {fingerprint}); push the release with --precompile {target}"
            ),
        }
    }
}

/// Per-workload observed state in a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    pub name: WorkloadName,
    pub release: Digest,
    pub state: WorkloadState,
    pub healthy: bool,
    pub restarts: u32,
    pub last_error: Option<String>,
    /// A release the workload could not use, with the reason (the previous one keeps running).
    pub rejected: Option<RejectReason>,
    /// How the last run ended, when the runtime could tell (exit code, OOM kill, failed health check).
    pub exit: Option<ExitCause>,
    /// While backing off: milliseconds until the next start.
    pub retry_in_ms: Option<u64>,
}

/// How a run ended, typed, so `why` and the console can name the cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitCause {
    /// The process exited with this code.
    Code(i64),
    /// The kernel killed it at its memory limit.
    OomKilled { limit_mib: u32 },
    /// Its health check failed, so the agent restarted it.
    Unhealthy,
}

impl std::fmt::Display for ExitCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exited with code {c}"),
            Self::OomKilled { limit_mib } => {
                write!(f, "OOM-killed (memory limit {limit_mib} MiB)")
            }
            Self::Unhealthy => {
                f.write_str("unhealthy: the health check failed; restarted by the agent")
            }
        }
    }
}

/// A rejected desired state: the generation and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub generation: u64,
    pub reason: RejectReason,
}

/// What a device is and can do. Sent at enrollment and in reports when it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub labels: Vec<(String, String)>,
    pub region: Option<Label>,
    pub zone: Option<Label>,
    pub location: Option<LatLon>,
    pub arch: String,
    pub runtimes: Vec<WorkloadKind>,
    pub memory_mib: u32,
    pub agent_version: String,
    /// The X25519 public key the hub seals this device's workload secrets to.
    pub sealing_key: Option<[u8; 32]>,
    /// The container engine the agent drives, when one answered its probe.
    pub container_engine: Option<ContainerEngine>,
    /// The device's firmware, when the agent manages it (`[firmware]` in `agent.toml`).
    pub firmware: Option<FirmwareInventory>,
    /// The version of the signed agent release this agent was installed from by a self-update (None: the
    /// packaged binary). `agent_version` is the version the binary was built as.
    pub agent_release: Option<String>,
}

/// The firmware a device booted: its type, version and slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareInventory {
    /// The device type firmware releases must name (RAUC's `compatible`).
    pub compatible: String,
    /// The version of the firmware release installed in the booted slot (`factory` before the first update).
    pub version: String,
    /// The booted slot (`A` or `B`).
    pub slot: String,
    /// The update backend: `ab` (built-in, U-Boot environment) or `rauc`.
    pub backend: String,
}

/// What the device's container engine is and what it can enforce, as probed by the agent at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerEngine {
    /// `Docker Engine 20.10.24`, `Podman Engine 4.3.1`, ...
    pub name: String,
    pub api_version: String,
    /// Whether cgroup memory limits are enforced (without them a `memory_mib` is advisory).
    pub memory_limit: bool,
    pub storage_driver: String,
}

/// Level-based report: the device's whole observed state. Signed by the device key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub device: DeviceId,
    /// Strictly increasing across the device's lifetime (persisted), so replays are detectable.
    pub counter: u64,
    pub sent_at: UnixSecs,
    /// Generation of the desired state the device has accepted and is applying.
    pub applied_generation: u64,
    pub last_rejection: Option<Rejection>,
    pub workloads: Vec<WorkloadStatus>,
    pub inventory: Option<Inventory>,
    /// Telemetry records dropped from the offline outbox because its byte cap was hit.
    pub telemetry_dropped: u64,
    /// The device is holding updates ("not now", e.g. vehicle in motion): the reason. Running workloads stay on
    /// their current release until the hold is lifted.
    pub hold: Option<String>,
    /// Where each release of the desired state's `staged` list is.
    pub staged: Vec<StagedRelease>,
}

/// A staged release's progress on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedRelease {
    pub release: Digest,
    pub state: StageState,
}

/// Where a staged release is: fetching, loading (a container image into the engine), ready for the cutover, or
/// refused (the reason; what runs is untouched).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageState {
    Downloading,
    Loading,
    Staged,
    Failed(RejectReason),
}

impl StageState {
    /// `downloading`, `loading`, `staged`, `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Downloading => "downloading",
            Self::Loading => "loading",
            Self::Staged => "staged",
            Self::Failed(_) => "failed",
        }
    }
}

/// Online/offline marker (the offline form is the MQTT last will).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub online: bool,
    pub at: UnixSecs,
    pub agent_version: String,
}

/// Which bytes an agent asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ArtifactRef {
    /// A signed release document, by the digest of its body.
    Release(Digest),
    /// Artifact bytes, by content digest.
    Blob(Digest),
}

/// A request for a range of an artifact (resumable: the agent asks from the offset it already has).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRequest {
    pub what: ArtifactRef,
    pub offset: u64,
    pub max_len: u32,
}

/// One chunk of an artifact, or a refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArtifactChunk {
    Data {
        what: ArtifactRef,
        offset: u64,
        total: u64,
        data: Vec<u8>,
    },
    NotFound {
        what: ArtifactRef,
    },
}

/// One telemetry sample: from a guest (its stream) or from the agent itself (stream `agent`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRecord {
    pub device: DeviceId,
    pub stream: Label,
    /// Per-device sequence number; consumers see gaps when the outbox dropped records.
    pub seq: u64,
    pub at: UnixSecs,
    pub payload: TelemetryPayload,
}

/// A telemetry value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TelemetryPayload {
    /// Opaque bytes published by a guest.
    Bytes(Vec<u8>),
    /// Named numeric metrics (agent metrics, or guest gauges and counters).
    Metrics(Vec<(String, f64)>),
}

/// Enrollment: the agent presents a one-time token and its freshly generated public key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token: String,
    pub public_key: PublicKey,
    pub requested_id: Option<DeviceId>,
    pub inventory: Inventory,
    /// A PKCS#10 certificate signing request (DER) for the device's MQTT client certificate. The agent keeps the
    /// private key; the hub's device CA signs the request with the device id as the subject.
    pub csr: Option<Vec<u8>>,
}

/// A client certificate the hub's device CA issued (PEM), and its validity in Unix seconds: `not_before` is when
/// it was issued (the certificate itself is valid from a few minutes earlier, for clock skew), so renewal can
/// be planned as a fraction of `not_after - not_before`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    pub pem: String,
    pub not_before: UnixSecs,
    pub not_after: UnixSecs,
}

/// Agent -> hub on `dev/{id}/cert/req`, sent over its authenticated connection: new credentials, for a key pair
/// the agent just generated (renewal before expiry, or rotation when the hub asked for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRequest {
    /// PKCS#10 request (DER) for the new key.
    pub csr: Vec<u8>,
}

/// Hub -> agent on `dev/{id}/cert/resp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CredentialResponse {
    /// New credentials: a certificate for the requested key and a new MQTT password. The previous ones stay valid
    /// until the device first connects with the new ones, so a lost response never locks a device out.
    Issued {
        cert: IssuedCert,
        mqtt_password: String,
    },
    /// The operator asked for a rotation (`flotilla device rotate-credentials`): send a request now.
    RotateNow,
    Refused {
        reason: String,
    },
}

/// The hub's answer to an enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollResponse {
    /// `mqtt_password` is the device's MQTT secret (username: its device id); only its hash stays on the hub.
    Accepted {
        device: DeviceId,
        root: Signed,
        mqtt_password: String,
        /// The client certificate for the request's CSR, when it carried one.
        client_cert: Option<IssuedCert>,
    },
    Refused {
        reason: String,
    },
}

/// Hub -> device: the last `lines` lines of a workload's stdout and stderr (`flotilla logs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    /// Chosen by the hub to match the answer to the request.
    pub request: u64,
    pub workload: WorkloadName,
    pub lines: u32,
}

/// Device -> hub: a workload's last output lines (at most [`LOGS_MAX_BYTES`], newest last), or why there are none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsResponse {
    pub request: u64,
    pub workload: WorkloadName,
    pub text: String,
    pub error: Option<String>,
}

/// Most log text one answer carries (the tail is kept).
pub const LOGS_MAX_BYTES: usize = 32 * 1024;
