//! The container fields of a workload in a deployment spec: typed, validated, and turned into the wire
//! [`ContainerSpec`]. There is deliberately no way to pass raw engine JSON: every engine setting is decided by
//! the agent from these fields, so hardening defaults cannot be bypassed from a spec.

use flotilla_shared::wire::{
    ContainerHealth, ContainerSpec, NetworkMode, PortMap, UpdateStrategy, VolumeMount,
};
use serde::Deserialize;
use std::collections::BTreeMap;

/// The container-only fields as written in a `[[workloads]]` table.
#[derive(Debug, Default)]
pub(crate) struct RawContainer {
    pub command: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub config_path: Option<String>,
    pub cpus: Option<f64>,
    pub pids: Option<u32>,
    pub ports: Option<Vec<String>>,
    pub volumes: Option<Vec<String>>,
    pub devices: Option<Vec<String>>,
    pub capabilities: Option<Vec<String>>,
    pub network: Option<String>,
    pub read_only: Option<bool>,
    pub user: Option<String>,
    pub healthcheck: Option<RawHealth>,
    pub stop_timeout_secs: Option<u32>,
    pub update_strategy: Option<String>,
    pub log_max_mib: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    pub command: Vec<String>,
    #[serde(default = "default_interval")]
    pub interval_secs: u32,
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_interval() -> u32 {
    10
}
fn default_retries() -> u32 {
    3
}

/// Where a workload's `config` is mounted when the spec does not say.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/flotilla/config";

/// The engine's defaults for a container workload that sets none of these fields.
pub fn defaults() -> ContainerSpec {
    ContainerSpec {
        command: vec![],
        env: vec![],
        config_path: DEFAULT_CONFIG_PATH.into(),
        cpus_milli: 0,
        pids: 256,
        ports: vec![],
        volumes: vec![],
        devices: vec![],
        capabilities: vec![],
        network: NetworkMode::Bridge,
        read_only: true,
        user: None,
        health: None,
        stop_timeout_secs: 10,
        update_strategy: UpdateStrategy::DownloadThenKill,
        log_max_bytes: 10 << 20,
    }
}

impl RawContainer {
    /// Whether any container field was written (they are only allowed on container workloads).
    pub fn any(&self) -> Option<&'static str> {
        [
            (self.command.is_some(), "command"),
            (self.env.is_some(), "env"),
            (self.config_path.is_some(), "config_path"),
            (self.cpus.is_some(), "cpus"),
            (self.pids.is_some(), "pids"),
            (self.ports.is_some(), "ports"),
            (self.volumes.is_some(), "volumes"),
            (self.devices.is_some(), "devices"),
            (self.capabilities.is_some(), "capabilities"),
            (self.network.is_some(), "network"),
            (self.read_only.is_some(), "read_only"),
            (self.user.is_some(), "user"),
            (self.healthcheck.is_some(), "healthcheck"),
            (self.stop_timeout_secs.is_some(), "stop_timeout_secs"),
            (self.update_strategy.is_some(), "update_strategy"),
            (self.log_max_mib.is_some(), "log_max_mib"),
        ]
        .into_iter()
        .find_map(|(set, name)| set.then_some(name))
    }

    /// Validates the fields; errors are (field, message) with the field relative to the workload.
    pub fn validate(self) -> Result<ContainerSpec, (String, String)> {
        let mut c = defaults();
        let err = |f: &str, m: String| (f.to_owned(), m);
        if let Some(cmd) = self.command {
            if cmd.iter().any(String::is_empty) {
                return Err(err("command", "arguments must not be empty".into()));
            }
            c.command = cmd;
        }
        for (k, v) in self.env.unwrap_or_default() {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(err("env", format!("{k:?} is not a valid variable name")));
            }
            c.env.push((k, v));
        }
        if let Some(p) = self.config_path {
            if !p.starts_with('/') || p.split('/').any(|s| s == "..") {
                return Err(err("config_path", format!("{p:?} is not an absolute path")));
            }
            c.config_path = p;
        }
        if let Some(cpus) = self.cpus {
            if !(cpus.is_finite() && cpus > 0.0 && cpus <= 256.0) {
                return Err(err("cpus", format!("{cpus} is outside (0, 256]")));
            }
            c.cpus_milli = ((cpus * 1000.0).round() as u32).max(1);
        }
        if let Some(p) = self.pids {
            if !(1..=65_536).contains(&p) {
                return Err(err("pids", format!("{p} is outside 1..65536")));
            }
            c.pids = p;
        }
        for (i, p) in self.ports.unwrap_or_default().iter().enumerate() {
            c.ports.push(port(p).ok_or_else(|| {
                err(
                    &format!("ports[{i}]"),
                    format!("{p:?}: use HOST:CONTAINER or HOST:CONTAINER/udp"),
                )
            })?);
        }
        for (i, v) in self.volumes.unwrap_or_default().iter().enumerate() {
            let m = volume(v).ok_or_else(|| {
                err(
                    &format!("volumes[{i}]"),
                    format!("{v:?}: use NAME:/path or NAME:/path:ro (NAME of a-z, 0-9, _ and -)"),
                )
            })?;
            if c.volumes.iter().any(|x: &VolumeMount| x.name == m.name) {
                return Err(err(
                    &format!("volumes[{i}]"),
                    format!("{} appears twice", m.name),
                ));
            }
            c.volumes.push(m);
        }
        for (i, d) in self.devices.unwrap_or_default().into_iter().enumerate() {
            if !d.starts_with("/dev/") || d.split('/').any(|s| s == "..") {
                return Err(err(
                    &format!("devices[{i}]"),
                    format!("{d:?} is not a path under /dev/"),
                ));
            }
            c.devices.push(d);
        }
        for (i, cap) in self
            .capabilities
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let name = cap.trim_start_matches("CAP_").to_ascii_uppercase();
            if name == "ALL"
                || name.is_empty()
                || !name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
            {
                return Err(err(
                    &format!("capabilities[{i}]"),
                    format!("{cap:?} is not a single capability name (ALL is never allowed)"),
                ));
            }
            c.capabilities.push(name);
        }
        if let Some(n) = self.network {
            c.network = match n.as_str() {
                "bridge" => NetworkMode::Bridge,
                "none" => NetworkMode::None,
                "host" => NetworkMode::Host,
                o => return Err(err("network", format!("{o:?} is not bridge, none or host"))),
            };
        }
        if let Some(r) = self.read_only {
            c.read_only = r;
        }
        if let Some(u) = self.user {
            if u.is_empty() || u.contains(char::is_whitespace) {
                return Err(err("user", format!("{u:?} is not a user or UID[:GID]")));
            }
            c.user = Some(u);
        }
        if let Some(h) = self.healthcheck {
            if h.command.is_empty() {
                return Err(err("healthcheck.command", "must not be empty".into()));
            }
            if !(1..=3600).contains(&h.interval_secs) {
                return Err(err(
                    "healthcheck.interval_secs",
                    format!("{} is outside 1..3600", h.interval_secs),
                ));
            }
            if !(1..=100).contains(&h.retries) {
                return Err(err(
                    "healthcheck.retries",
                    format!("{} is outside 1..100", h.retries),
                ));
            }
            c.health = Some(ContainerHealth {
                command: h.command,
                interval_secs: h.interval_secs,
                retries: h.retries,
            });
        }
        if let Some(s) = self.stop_timeout_secs {
            if s > 600 {
                return Err(err("stop_timeout_secs", format!("{s} is above 600")));
            }
            c.stop_timeout_secs = s;
        }
        if let Some(s) = self.update_strategy {
            c.update_strategy = match s.as_str() {
                "download-then-kill" => UpdateStrategy::DownloadThenKill,
                "kill-then-download" => UpdateStrategy::KillThenDownload,
                "delete-then-download" => UpdateStrategy::DeleteThenDownload,
                o => {
                    return Err(err(
                        "update_strategy",
                        format!(
                            "{o:?} is not download-then-kill, kill-then-download or delete-then-download"
                        ),
                    ));
                }
            };
        }
        if let Some(m) = self.log_max_mib {
            if !(1..=1024).contains(&m) {
                return Err(err("log_max_mib", format!("{m} is outside 1..1024")));
            }
            c.log_max_bytes = u64::from(m) << 20;
        }
        Ok(c)
    }
}

/// `HOST:CONTAINER[/tcp|/udp]`.
fn port(s: &str) -> Option<PortMap> {
    let (ports, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let (h, c) = ports.split_once(':')?;
    let udp = match proto {
        "tcp" => false,
        "udp" => true,
        _ => return None,
    };
    let (host, container): (u16, u16) = (h.parse().ok()?, c.parse().ok()?);
    (host != 0 && container != 0).then_some(PortMap {
        host,
        container,
        udp,
    })
}

/// `NAME:/path[:ro]`.
fn volume(s: &str) -> Option<VolumeMount> {
    let mut parts = s.split(':');
    let name = parts.next()?;
    let path = parts.next()?;
    let read_only = match parts.next() {
        None => false,
        Some("ro") => true,
        Some(_) => return None,
    };
    let name_ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    let path_ok = path.starts_with('/') && path.len() > 1 && !path.split('/').any(|x| x == "..");
    (name_ok && path_ok && parts.next().is_none()).then(|| VolumeMount {
        name: name.into(),
        path: path.into(),
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each bad field is refused naming it; good values land in the typed spec.
    #[test]
    fn fields_validate() {
        let good = RawContainer {
            ports: Some(vec!["8080:80".into(), "5353:53/udp".into()]),
            volumes: Some(vec!["data:/var/lib/app".into(), "cache:/cache:ro".into()]),
            cpus: Some(0.5),
            capabilities: Some(vec!["CAP_NET_BIND_SERVICE".into()]),
            ..Default::default()
        }
        .validate()
        .expect("valid");
        assert_eq!(good.cpus_milli, 500);
        assert_eq!(good.pids, 256);
        assert!(good.read_only);
        assert_eq!(good.capabilities, vec!["NET_BIND_SERVICE".to_owned()]);
        assert_eq!(
            good.ports[1],
            PortMap {
                host: 5353,
                container: 53,
                udp: true
            }
        );
        assert!(good.volumes[1].read_only);

        let cases: Vec<(RawContainer, &str)> = vec![
            (
                RawContainer {
                    ports: Some(vec!["80".into()]),
                    ..Default::default()
                },
                "ports[0]",
            ),
            (
                RawContainer {
                    ports: Some(vec!["0:80".into()]),
                    ..Default::default()
                },
                "ports[0]",
            ),
            (
                RawContainer {
                    volumes: Some(vec!["Data:/x".into()]),
                    ..Default::default()
                },
                "volumes[0]",
            ),
            (
                RawContainer {
                    volumes: Some(vec!["d:/x".into(), "d:/y".into()]),
                    ..Default::default()
                },
                "volumes[1]",
            ),
            (
                RawContainer {
                    volumes: Some(vec!["d:/../etc".into()]),
                    ..Default::default()
                },
                "volumes[0]",
            ),
            (
                RawContainer {
                    capabilities: Some(vec!["ALL".into()]),
                    ..Default::default()
                },
                "capabilities[0]",
            ),
            (
                RawContainer {
                    devices: Some(vec!["/etc/passwd".into()]),
                    ..Default::default()
                },
                "devices[0]",
            ),
            (
                RawContainer {
                    network: Some("container:x".into()),
                    ..Default::default()
                },
                "network",
            ),
            (
                RawContainer {
                    cpus: Some(0.0),
                    ..Default::default()
                },
                "cpus",
            ),
            (
                RawContainer {
                    pids: Some(0),
                    ..Default::default()
                },
                "pids",
            ),
            (
                RawContainer {
                    config_path: Some("etc/x".into()),
                    ..Default::default()
                },
                "config_path",
            ),
            (
                RawContainer {
                    env: Some([("A=B".into(), "1".into())].into()),
                    ..Default::default()
                },
                "env",
            ),
            (
                RawContainer {
                    update_strategy: Some("yolo".into()),
                    ..Default::default()
                },
                "update_strategy",
            ),
            (
                RawContainer {
                    log_max_mib: Some(0),
                    ..Default::default()
                },
                "log_max_mib",
            ),
        ];
        for (raw, field) in cases {
            let (f, msg) = raw.validate().expect_err(field);
            assert_eq!(f, field, "{msg}");
        }
    }
}
