//! Agent configuration: a versioned TOML file; unknown fields and bad values are rejected at start, naming the field.

use flotilla_shared::wire::LatLon;
use flotilla_shared::{DeviceId, Label};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The only config file version this build reads.
pub const CONFIG_VERSION: u32 = 1;

/// Why a configuration was refused. Always fatal: the agent exits with the "bad configuration" code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    version: u32,
    device_id: Option<String>,
    data_dir: PathBuf,
    broker: String,
    /// Where to enroll, when not at `broker` (an external broker with a separate enrollment listener).
    enroll_broker: Option<String>,
    trust_root: Option<PathBuf>,
    enroll_token: Option<String>,
    region: Option<String>,
    zone: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    position: Option<RawPosition>,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    telemetry: RawTelemetry,
    /// Optional Prometheus endpoint; must be a loopback address.
    metrics_listen: Option<std::net::SocketAddr>,
    /// While this file exists the device holds updates; its first line is the reason.
    hold_file: Option<PathBuf>,
    #[serde(default)]
    container: RawContainer,
    /// Firmware updates through the built-in A/B backend (absent: this device takes no firmware updates).
    firmware: Option<RawFirmware>,
    /// How long a new agent installed by a self-update has to come up healthy (connected, restored, reported)
    /// before the launcher switches back to the previous one.
    #[serde(default = "default_agent_confirm_secs")]
    agent_confirm_secs: u64,
}

fn default_agent_confirm_secs() -> u64 {
    120
}

/// `[firmware]`: two slots (block devices or files) and U-Boot's environment, as RAUC's U-Boot backend uses it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFirmware {
    /// The device type firmware releases must name (RAUC's `compatible`); without it the device takes firmware
    /// updates only by hand (`flotilla-agent firmware install`), none from the hub.
    compatible: Option<String>,
    /// `ab` (the built-in backend, the default) or `rauc` (hands bundles to RAUC's service over D-Bus).
    #[serde(default)]
    backend: FirmwareBackendKind,
    /// The RAUC client (argv before its subcommand), for `backend = "rauc"`.
    #[serde(default = "default_rauc")]
    rauc_command: Vec<String>,
    /// The two slots of the built-in backend (RAUC knows its own from its system.conf).
    slot_a: Option<PathBuf>,
    slot_b: Option<PathBuf>,
    /// `fw_env.config` for `fw_printenv`/`fw_setenv` (default: theirs, `/etc/fw_env.config`).
    fw_env_config: Option<PathBuf>,
    /// Where the booted slot is named (`rauc.slot=A` on the kernel command line).
    #[serde(default = "default_cmdline")]
    cmdline: PathBuf,
    /// How long a new system has to come up healthy before its slot is marked bad.
    #[serde(default = "default_confirm_secs")]
    confirm_secs: u64,
    /// Run to reboot (argv).
    #[serde(default = "default_reboot")]
    reboot_command: Vec<String>,
    /// A new system counts as healthy once its workloads are restored and it has sent a report to the hub
    /// (`true`, the default), or once its workloads are restored even with the hub unreachable (`false`: for
    /// devices that must be able to update while offline).
    #[serde(default = "default_true")]
    confirm_needs_hub: bool,
}

fn default_rauc() -> Vec<String> {
    vec!["rauc".into()]
}

/// Which firmware update backend the agent drives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirmwareBackendKind {
    #[default]
    Ab,
    Rauc,
}

fn default_true() -> bool {
    true
}

fn default_cmdline() -> PathBuf {
    PathBuf::from("/proc/cmdline")
}

fn default_confirm_secs() -> u64 {
    300
}

fn default_reboot() -> Vec<String> {
    vec!["systemctl".into(), "reboot".into()]
}

/// The firmware backend's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareConfig {
    pub compatible: Option<String>,
    pub backend: FirmwareBackendKind,
    pub rauc_command: Vec<String>,
    /// Slot name (`A`, `B`) to its device or file.
    pub slots: BTreeMap<String, PathBuf>,
    pub fw_env_config: Option<PathBuf>,
    pub cmdline: PathBuf,
    pub confirm_secs: u64,
    pub reboot_command: Vec<String>,
    pub confirm_needs_hub: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawContainer {
    /// Drive a Docker-compatible engine at all.
    enabled: bool,
    /// The engine's API socket: Docker, balenaEngine (`/run/balena-engine.sock`) or Podman's Docker-compatible one.
    socket: PathBuf,
    allow_host_network: bool,
    allow_devices: Vec<String>,
    allow_capabilities: Vec<String>,
    image_keep_secs: u64,
    image_gc_high_percent: u8,
    secrets_dir: PathBuf,
}

impl Default for RawContainer {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: PathBuf::from("/var/run/docker.sock"),
            allow_host_network: false,
            allow_devices: vec![],
            allow_capabilities: vec![],
            image_keep_secs: 0,
            image_gc_high_percent: 85,
            secrets_dir: PathBuf::from("/run/flotilla/secrets"),
        }
    }
}

/// `[container]`: which engine the agent drives, and the local allow-list a spec cannot widen. Everything beyond
/// the hardened default (host network, host devices, added capabilities) must be both asked for by the signed
/// spec and allowed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerConfig {
    pub enabled: bool,
    pub socket: PathBuf,
    pub allow_host_network: bool,
    pub allow_devices: Vec<String>,
    /// Upper case, without the `CAP_` prefix.
    pub allow_capabilities: Vec<String>,
    /// How long an image beyond each workload's current and previous one stays cached (0: collected at once).
    pub image_keep_secs: u64,
    /// Above this usage of the engine's disk, such images go whatever their age.
    pub image_gc_high_percent: u8,
    /// Where containers' secret files are written (one directory per container, mounted read-only at
    /// `/run/secrets`); must be on a tmpfs, so a secret never reaches a disk.
    pub secrets_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPosition {
    lat: Option<f64>,
    lon: Option<f64>,
    file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_workloads: u32,
    max_memory_mib: u32,
    keepalive_secs: u16,
    report_interval_secs: u32,
    /// Most the agent's data directory (database, artifacts, staging) may use, in MiB; 0 = the partition's free
    /// space is the only limit.
    max_data_mib: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_workloads: 32,
            max_memory_mib: 512,
            keepalive_secs: 60,
            report_interval_secs: 60,
            max_data_mib: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTelemetry {
    outbox_bytes: u64,
    metrics_interval_secs: u32,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            outbox_bytes: 4 * 1024 * 1024,
            metrics_interval_secs: 30,
        }
    }
}

/// Where the device's position comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum PositionSource {
    None,
    Static(LatLon),
    /// A JSON file `{"lat": .., "lon": ..}` rewritten by a GPS daemon; re-read every second.
    File(PathBuf),
}

/// Broker address and transport.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// TLS material for `mqtts://`.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    /// The broker's CA; without it, the CA pinned by the enrollment token's fingerprint.
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub device_id: Option<DeviceId>,
    pub data_dir: PathBuf,
    pub broker: BrokerUrl,
    /// The broker to enroll at: `enroll_broker`, or `broker`.
    pub enroll_broker: BrokerUrl,
    pub tls: Option<TlsFiles>,
    pub trust_root: Option<PathBuf>,
    pub enroll_token: Option<String>,
    pub region: Option<Label>,
    pub zone: Option<Label>,
    pub labels: BTreeMap<String, String>,
    pub position: PositionSource,
    pub max_workloads: u32,
    pub max_memory_mib: u32,
    pub keepalive_secs: u16,
    pub report_interval_secs: u32,
    /// Quota on the data directory in bytes (`limits.max_data_mib`), if any.
    pub max_data_bytes: Option<u64>,
    pub outbox_bytes: u64,
    pub metrics_interval_secs: u32,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub hold_file: Option<PathBuf>,
    pub container: ContainerConfig,
    pub firmware: Option<FirmwareConfig>,
    /// At least 10 s.
    pub agent_confirm_secs: u64,
}

/// Command-line and environment overrides for the common settings.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub broker: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub device_id: Option<String>,
    pub enroll_token: Option<String>,
    pub region: Option<String>,
}

/// The broker CA fingerprint an enrollment token carries (`fet_<secret>.<64 hex digits>`), if any.
pub fn token_ca_pin(token: &str) -> Option<[u8; 32]> {
    let (_, fp) = token.rsplit_once('.')?;
    let bytes = hex::decode(fp).ok()?;
    bytes.try_into().ok()
}

/// Parses `mqtt://host:port` or `mqtts://host:port`.
pub fn parse_broker_url(s: &str) -> Result<BrokerUrl, String> {
    let (tls, rest) = if let Some(r) = s.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = s.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!("{s:?} must start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    Ok(BrokerUrl {
        host: host.to_owned(),
        port,
        tls,
    })
}

impl Config {
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text, overrides)
    }

    pub fn parse(path: &Path, text: &str, ov: &Overrides) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |field: &'static str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        if raw.version != CONFIG_VERSION {
            return Err(invalid(
                "version",
                format!(
                    "{} is not supported (expected {CONFIG_VERSION})",
                    raw.version
                ),
            ));
        }
        let device_id = ov
            .device_id
            .clone()
            .or(raw.device_id)
            .map(DeviceId::new)
            .transpose()
            .map_err(|e| invalid("device_id", e.to_string()))?;
        let broker_s = ov.broker.clone().unwrap_or(raw.broker);
        let broker = parse_broker_url(&broker_s).map_err(|m| invalid("broker", m))?;
        let enroll_broker = match &raw.enroll_broker {
            Some(s) => parse_broker_url(s).map_err(|m| invalid("enroll_broker", m))?,
            None => broker.clone(),
        };
        let tls = raw.tls.map(|t| TlsFiles {
            ca_file: t.ca_file,
            client_cert: t.client_cert,
            client_key: t.client_key,
        });
        let token = ov.enroll_token.clone().or(raw.enroll_token.clone());
        let pinned = token.as_deref().and_then(token_ca_pin).is_some();
        if (broker.tls || enroll_broker.tls)
            && tls.as_ref().and_then(|t| t.ca_file.as_ref()).is_none()
            && !pinned
        {
            return Err(invalid(
                "tls",
                "mqtts:// needs [tls] ca_file, or an enroll_token with the broker's CA fingerprint \
                 (fet_<secret>.<sha256>)"
                    .into(),
            ));
        }
        let label = |field: &'static str, v: Option<String>| {
            v.map(Label::new)
                .transpose()
                .map_err(|e| invalid(field, e.to_string()))
        };
        let region = label("region", ov.region.clone().or(raw.region))?;
        let zone = label("zone", raw.zone)?;
        let position = match raw.position {
            None => PositionSource::None,
            Some(RawPosition {
                lat: Some(lat),
                lon: Some(lon),
                file: None,
            }) => {
                if !(-90.0..=90.0).contains(&lat) {
                    return Err(invalid("position.lat", format!("{lat} is outside -90..90")));
                }
                if !(-180.0..=180.0).contains(&lon) {
                    return Err(invalid(
                        "position.lon",
                        format!("{lon} is outside -180..180"),
                    ));
                }
                PositionSource::Static(LatLon { lat, lon })
            }
            Some(RawPosition {
                lat: None,
                lon: None,
                file: Some(f),
            }) => PositionSource::File(f),
            Some(_) => {
                return Err(invalid(
                    "position",
                    "give either lat and lon, or file".into(),
                ));
            }
        };
        if raw.limits.max_workloads == 0 {
            return Err(invalid("limits.max_workloads", "must be at least 1".into()));
        }
        if let Some(addr) = raw.metrics_listen
            && !addr.ip().is_loopback()
        {
            return Err(invalid(
                "metrics_listen",
                format!("{addr} is not a loopback address"),
            ));
        }
        if raw.telemetry.outbox_bytes < 4096 {
            return Err(invalid(
                "telemetry.outbox_bytes",
                "must be at least 4096".into(),
            ));
        }
        for d in &raw.container.allow_devices {
            if !d.starts_with("/dev/") {
                return Err(invalid(
                    "container.allow_devices",
                    format!("{d:?} is not a path under /dev/"),
                ));
            }
        }
        if !(1..=100).contains(&raw.container.image_gc_high_percent) {
            return Err(invalid(
                "container.image_gc_high_percent",
                format!("{} is outside 1..100", raw.container.image_gc_high_percent),
            ));
        }
        let container = ContainerConfig {
            image_keep_secs: raw.container.image_keep_secs,
            image_gc_high_percent: raw.container.image_gc_high_percent,
            secrets_dir: raw.container.secrets_dir,
            enabled: raw.container.enabled,
            socket: raw.container.socket,
            allow_host_network: raw.container.allow_host_network,
            allow_devices: raw.container.allow_devices,
            allow_capabilities: raw
                .container
                .allow_capabilities
                .iter()
                .map(|c| c.trim_start_matches("CAP_").to_ascii_uppercase())
                .collect(),
        };
        Ok(Self {
            device_id,
            data_dir: ov.data_dir.clone().unwrap_or(raw.data_dir),
            broker,
            enroll_broker,
            tls,
            trust_root: raw.trust_root,
            enroll_token: ov.enroll_token.clone().or(raw.enroll_token),
            region,
            zone,
            labels: raw.labels,
            position,
            max_workloads: raw.limits.max_workloads,
            max_memory_mib: raw.limits.max_memory_mib,
            keepalive_secs: raw.limits.keepalive_secs.max(5),
            report_interval_secs: raw.limits.report_interval_secs.max(1),
            max_data_bytes: (raw.limits.max_data_mib > 0)
                .then(|| raw.limits.max_data_mib.saturating_mul(1024 * 1024)),
            outbox_bytes: raw.telemetry.outbox_bytes,
            metrics_interval_secs: raw.telemetry.metrics_interval_secs.max(1),
            metrics_listen: raw.metrics_listen,
            hold_file: raw.hold_file,
            agent_confirm_secs: raw.agent_confirm_secs.max(10),
            container,
            firmware: match raw.firmware {
                None => None,
                Some(f) => {
                    let slots = match (f.backend, f.slot_a, f.slot_b) {
                        (FirmwareBackendKind::Rauc, _, _) => BTreeMap::new(),
                        (FirmwareBackendKind::Ab, Some(a), Some(b)) if a != b => {
                            [("A".to_owned(), a), ("B".to_owned(), b)].into()
                        }
                        (FirmwareBackendKind::Ab, Some(_), Some(_)) => {
                            return Err(invalid(
                                "firmware.slot_b",
                                "must differ from firmware.slot_a".into(),
                            ));
                        }
                        (FirmwareBackendKind::Ab, ..) => {
                            return Err(invalid(
                                "firmware.slot_a",
                                "the built-in backend needs slot_a and slot_b".into(),
                            ));
                        }
                    };
                    if f.backend == FirmwareBackendKind::Rauc && f.rauc_command.is_empty() {
                        return Err(invalid(
                            "firmware.rauc_command",
                            "must name a program".into(),
                        ));
                    }
                    if f.reboot_command.is_empty() {
                        return Err(invalid(
                            "firmware.reboot_command",
                            "must name a program".into(),
                        ));
                    }
                    Some(FirmwareConfig {
                        compatible: f.compatible,
                        backend: f.backend,
                        rauc_command: f.rauc_command,
                        slots,
                        fw_env_config: f.fw_env_config,
                        cmdline: f.cmdline,
                        confirm_secs: f.confirm_secs.max(10),
                        reboot_command: f.reboot_command,
                        confirm_needs_hub: f.confirm_needs_hub,
                    })
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("agent.toml"), text, &Overrides::default())
    }

    const BASE: &str = "version = 1\ndata_dir = \"/tmp/x\"\nbroker = \"mqtt://127.0.0.1:1883\"\n";

    /// Bad configurations are refused with a message that names the field.
    #[test]
    fn rejects_bad_config_naming_the_field() {
        let cases = [
            (
                "version = 2\ndata_dir = \"/x\"\nbroker = \"mqtt://a\"\n",
                "version",
            ),
            (
                &format!("{BASE}colour = \"red\"\n"),
                "unknown field `colour`",
            ),
            (
                "version = 1\ndata_dir = \"/x\"\nbroker = \"http://a\"\n",
                "broker",
            ),
            (&format!("{BASE}device_id = \"GW/1\"\n"), "device_id"),
            (
                &format!("{BASE}enroll_broker = \"tcp://a:1\"\n"),
                "enroll_broker",
            ),
            (&format!("{BASE}region = \"eu west\"\n"), "region"),
            (
                &format!("{BASE}[position]\nlat = 91.0\nlon = 0.0\n"),
                "position.lat",
            ),
            (&format!("{BASE}[position]\nlat = 1.0\n"), "position"),
            (
                &format!("{BASE}[telemetry]\noutbox_bytes = 10\n"),
                "telemetry.outbox_bytes",
            ),
            (
                "version = 1\ndata_dir = \"/x\"\nbroker = \"mqtts://a:8883\"\n",
                "tls",
            ),
            (
                &format!("{BASE}[container]\nimage_gc_high_percent = 0\n"),
                "container.image_gc_high_percent",
            ),
            (
                &format!("{BASE}[container]\nimage_gc_high_percent = 101\n"),
                "container.image_gc_high_percent",
            ),
            (
                &format!("{BASE}[container]\nimage_keep_secs = -1\n"),
                "image_keep_secs",
            ),
        ];
        for (text, field) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(field), "{err:?} should name {field:?}");
        }
    }

    /// A good configuration parses, with defaults and overrides applied.
    #[test]
    fn parses_and_overrides() {
        let c = parse(&format!(
            "{BASE}region = \"eu-west\"\n[position]\nlat = 52.5\nlon = 13.4\n"
        ))
        .expect("valid");
        assert_eq!(
            c.broker,
            BrokerUrl {
                host: "127.0.0.1".into(),
                port: 1883,
                tls: false
            }
        );
        assert_eq!(
            c.position,
            PositionSource::Static(LatLon {
                lat: 52.5,
                lon: 13.4
            })
        );
        let ov = Overrides {
            broker: Some("mqtt://10.0.0.1:2000".into()),
            ..Overrides::default()
        };
        let c = Config::parse(Path::new("a"), BASE, &ov).expect("valid");
        assert_eq!(c.broker.port, 2000);
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The documented example configuration (`edge-agent/agent.example.toml`) parses: the docs stay true.
    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent.example.toml");
        let c = Config::load(&path, &Overrides::default()).expect("example parses");
        assert_eq!(c.region.as_ref().map(Label::as_str), Some("eu-west"));
        assert_eq!(c.broker.port, 1883);
    }
}
