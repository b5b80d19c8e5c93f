//! Deployment spec files (TOML): parsing and validation into domain types. Every error names the file, the line
//! (for syntax errors) or the field (for semantic ones), and nothing is applied unless the whole spec is valid.

use crate::telemetry::typed::ContentType;
use flotilla_hub_core::rollout::{
    Budget, Clock, GroupBy, HoldDeadline, Limit, Plan, TelemetryGate, Wave, Window, is_time_zone,
};
use flotilla_hub_core::{Constraints, Policy, Target};
use flotilla_shared::wire::{Geofence, HealthRule, LatLon, Resources, RestartPolicy, WorkloadKind};
use flotilla_shared::{Digest, Label, WorkloadName};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: field `{field}`: {message}")]
    Field {
        file: String,
        field: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    #[serde(default)]
    target: RawTarget,
    #[serde(default)]
    placement: RawPlacement,
    #[serde(default)]
    constraints: RawConstraints,
    workloads: Vec<RawWorkload>,
    rollout: Option<RawRollout>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    /// "canary:PERCENT", "region:NAME[,NAME..]", "rest".
    waves: Vec<String>,
    #[serde(default = "default_soak")]
    soak_secs: u64,
    #[serde(default)]
    max_in_flight: u32,
    #[serde(default = "default_ratio")]
    max_failure_ratio: f64,
    #[serde(default = "default_timeout")]
    report_timeout_secs: u64,
    #[serde(default)]
    manual_approval: bool,
    #[serde(default = "default_hold")]
    max_hold_secs: u64,
    #[serde(default = "default_on_hold")]
    on_hold_deadline: String,
    #[serde(default)]
    windows: BTreeMap<String, RawWindow>,
    #[serde(default)]
    telemetry_gates: Vec<RawGate>,
    /// How long a device offline at its turn may hold up its wave.
    #[serde(default = "default_offline_grace")]
    offline_grace_secs: u64,
    /// Count a device still offline after the grace as failed.
    #[serde(default)]
    offline_is_failure: bool,
    #[serde(default)]
    budgets: Vec<RawBudget>,
    /// Devices of the current and next wave download the release ahead of their cutover.
    #[serde(default)]
    pre_download: bool,
    /// When they may download (local time); any time without.
    download_window: Option<RawWindow>,
}

/// `[[rollout.budgets]] group_by = "zone" | "label:site", max_unavailable = 1 | "25%"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    group_by: String,
    max_unavailable: toml::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    stream: String,
    metric: String,
    max: Option<f64>,
    max_ratio_to_baseline: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    /// A fixed offset from UTC (no daylight saving time); or `tz`.
    utc_offset_min: Option<i32>,
    /// An IANA time zone (`Europe/Berlin`), daylight saving time included.
    tz: Option<String>,
    /// Follow each device's own time zone (its `tz` label) where it has a valid one.
    #[serde(default)]
    device_tz: bool,
    days: Vec<String>,
    start: String,
    end: String,
}

fn default_soak() -> u64 {
    300
}
fn default_ratio() -> f64 {
    0.1
}
fn default_timeout() -> u64 {
    600
}
fn default_hold() -> u64 {
    3600
}
fn default_offline_grace() -> u64 {
    600
}
fn default_on_hold() -> String {
    "fail".into()
}

fn hhmm(field: &str, s: &str) -> Result<u32, (String, String)> {
    let bad = || (field.to_owned(), format!("{s:?} is not HH:MM"));
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn rollout_plan(r: RawRollout) -> Result<Plan, (String, String)> {
    if r.waves.is_empty() {
        return Err((
            "rollout.waves".into(),
            "at least one wave is required".into(),
        ));
    }
    let mut waves = Vec::new();
    for (i, w) in r.waves.iter().enumerate() {
        let f = format!("rollout.waves[{i}]");
        waves.push(match w.split_once(':') {
            Some(("canary", pct)) => {
                let percent: u32 = pct
                    .parse()
                    .map_err(|_| (f.clone(), format!("{pct:?} is not a percentage")))?;
                if !(1..=100).contains(&percent) {
                    return Err((f, "canary percentage must be 1..100".into()));
                }
                Wave::Canary { percent }
            }
            Some(("region", names)) => {
                Wave::Regions(names.split(',').map(|n| n.trim().to_owned()).collect())
            }
            None if w == "rest" => Wave::Rest,
            _ => {
                return Err((
                    f,
                    format!("{w:?}: use canary:PERCENT, region:NAME[,NAME] or rest"),
                ));
            }
        });
    }
    if !(0.0..=1.0).contains(&r.max_failure_ratio) {
        return Err((
            "rollout.max_failure_ratio".into(),
            "must be between 0 and 1".into(),
        ));
    }
    let mut telemetry_gates = Vec::new();
    for (i, g) in r.telemetry_gates.into_iter().enumerate() {
        if g.max.is_none() && g.max_ratio_to_baseline.is_none() {
            return Err((
                format!("rollout.telemetry_gates[{i}]"),
                "give max and/or max_ratio_to_baseline".into(),
            ));
        }
        telemetry_gates.push(TelemetryGate {
            stream: g.stream,
            metric: g.metric,
            max: g.max,
            max_ratio_to_baseline: g.max_ratio_to_baseline,
        });
    }
    let on_hold_deadline = match r.on_hold_deadline.as_str() {
        "fail" => HoldDeadline::Fail,
        "proceed" => HoldDeadline::Proceed,
        o => {
            return Err((
                "rollout.on_hold_deadline".into(),
                format!("{o:?} is not fail or proceed"),
            ));
        }
    };
    let mut windows = BTreeMap::new();
    for (region, w) in r.windows {
        let window = window(&format!("rollout.windows.{region}"), w)?;
        windows.insert(region, window);
    }
    let download_window = r
        .download_window
        .map(|w| window("rollout.download_window", w))
        .transpose()?;
    let mut budgets = Vec::new();
    for (i, b) in r.budgets.into_iter().enumerate() {
        budgets.push(budget(&format!("rollout.budgets[{i}]"), b)?);
    }
    Ok(Plan {
        waves,
        soak_secs: r.soak_secs,
        max_in_flight: r.max_in_flight,
        max_failure_ratio: r.max_failure_ratio,
        report_timeout_secs: r.report_timeout_secs.max(1),
        manual_approval: r.manual_approval,
        windows,
        max_hold_secs: r.max_hold_secs,
        on_hold_deadline,
        telemetry_gates,
        offline_grace_secs: r.offline_grace_secs,
        offline_is_failure: r.offline_is_failure,
        budgets,
        pre_download: r.pre_download,
        download_window,
    })
}

/// Validates one weekly window (maintenance or download).
fn window(f: &str, w: RawWindow) -> Result<Window, (String, String)> {
    let mut days = 0u8;
    for d in &w.days {
        let i = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
            .iter()
            .position(|x| x == d)
            .ok_or_else(|| (format!("{f}.days"), format!("{d:?} is not mon..sun")))?;
        days |= 1 << i;
    }
    let start_min = hhmm(&format!("{f}.start"), &w.start)?;
    let end_min = hhmm(&format!("{f}.end"), &w.end)?;
    let clock = match (w.utc_offset_min, w.tz) {
        (Some(_), Some(_)) => {
            return Err((f.to_owned(), "give utc_offset_min or tz, not both".into()));
        }
        (Some(min), None) if (-14 * 60..=14 * 60).contains(&min) => Clock::Offset(min),
        (Some(min), None) => {
            return Err((
                format!("{f}.utc_offset_min"),
                format!("{min} is not an offset in minutes (-840..840)"),
            ));
        }
        (None, Some(tz)) if is_time_zone(&tz) => Clock::Zone(tz),
        (None, Some(tz)) => {
            return Err((
                format!("{f}.tz"),
                format!("{tz:?} is not an IANA time zone (like \"Europe/Berlin\")"),
            ));
        }
        (None, None) => Clock::Offset(0),
    };
    Ok(Window {
        clock,
        days,
        start_min,
        end_min,
        device_zone: w.device_tz,
    })
}

/// Validates one disruption budget.
fn budget(f: &str, b: RawBudget) -> Result<Budget, (String, String)> {
    let group_by = match b.group_by.split_once(':') {
        None if b.group_by == "zone" => GroupBy::Zone,
        Some(("label", key)) if !key.is_empty() => GroupBy::Label(key.to_owned()),
        _ => {
            return Err((
                format!("{f}.group_by"),
                format!("{:?}: use \"zone\" or \"label:KEY\"", b.group_by),
            ));
        }
    };
    let bad = || {
        (
            format!("{f}.max_unavailable"),
            "a device count (1 or more) or a percentage (\"25%\", 1..100)".to_owned(),
        )
    };
    let max_unavailable = match &b.max_unavailable {
        toml::Value::Integer(n) if *n >= 1 => Limit::Count(u32::try_from(*n).map_err(|_| bad())?),
        toml::Value::String(p) => {
            let pct: u32 = p
                .strip_suffix('%')
                .and_then(|n| n.trim().parse().ok())
                .ok_or_else(bad)?;
            if !(1..=100).contains(&pct) {
                return Err(bad());
            }
            Limit::Percent(pct)
        }
        _ => return Err(bad()),
    };
    Ok(Budget {
        group_by,
        max_unavailable,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    regions: Vec<String>,
    #[serde(default)]
    zones: Vec<String>,
    geofence: Option<RawGeofence>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGeofence {
    circle: Option<RawCircle>,
    polygon: Option<Vec<[f64; 2]>>,
    h3: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCircle {
    lat: f64,
    lon: f64,
    radius_m: f64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPoint {
    lat: f64,
    lon: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    policy: Option<String>,
    count: Option<u32>,
    grace_secs: Option<u64>,
    k: Option<u32>,
    point: Option<RawPoint>,
    weights: Option<BTreeMap<String, u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConstraints {
    arch: Option<String>,
    runtime: Option<String>,
    #[serde(default)]
    min_memory_mib: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: String,
    release: String,
    #[serde(default = "default_memory")]
    memory_mib: u32,
    #[serde(default = "default_cpu")]
    cpu_ms: u32,
    #[serde(default)]
    tick_ms: u32,
    #[serde(default = "default_restart")]
    restart: String,
    #[serde(default = "default_health")]
    health_secs: u32,
    #[serde(default)]
    config: BTreeMap<String, String>,
    geofence: Option<RawGeofence>,
    /// `wasm` or `container`; taken from the release when left out. Container fields need `container`.
    kind: Option<String>,
    // Container fields (flat in the workload table; serde's `flatten` would defeat `deny_unknown_fields`).
    command: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    config_path: Option<String>,
    cpus: Option<f64>,
    pids: Option<u32>,
    ports: Option<Vec<String>>,
    volumes: Option<Vec<String>>,
    devices: Option<Vec<String>>,
    capabilities: Option<Vec<String>>,
    network: Option<String>,
    read_only: Option<bool>,
    user: Option<String>,
    healthcheck: Option<crate::spec_container::RawHealth>,
    stop_timeout_secs: Option<u32>,
    update_strategy: Option<String>,
    log_max_mib: Option<u32>,
    /// Content types of the workload's telemetry streams, by stream name (`{ count = "u64le" }`).
    #[serde(default)]
    telemetry: BTreeMap<String, String>,
    /// Config layered over `config` by region, zone, labels or device (`[[workloads.overrides]]`).
    #[serde(default)]
    overrides: Vec<RawOverride>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverride {
    #[serde(rename = "match")]
    matches: RawMatch,
    config: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    region: Option<String>,
    zone: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    device: Option<String>,
}

/// Config for the devices an override matches. Layers apply from the least to the most specific (region, zone,
/// labels, device; an override's rank is its most specific key, and every key it has must match), a later one of
/// the same rank over an earlier one; each layer replaces the keys it names and keeps the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigOverride {
    pub region: Option<String>,
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub device: Option<String>,
    pub config: BTreeMap<String, String>,
}

impl ConfigOverride {
    fn rank(&self) -> u8 {
        if self.device.is_some() {
            3
        } else if !self.labels.is_empty() {
            2
        } else if self.zone.is_some() {
            1
        } else {
            0
        }
    }

    fn matches(&self, d: &flotilla_hub_core::DeviceView) -> bool {
        self.region
            .as_ref()
            .is_none_or(|r| d.region.as_ref() == Some(r))
            && self
                .zone
                .as_ref()
                .is_none_or(|z| d.zone.as_ref() == Some(z))
            && self.device.as_ref().is_none_or(|id| d.id.as_str() == id)
            && self.labels.iter().all(|(k, v)| d.labels.get(k) == Some(v))
    }
}

/// A config map as the workload reads it (`key=value` lines).
fn config_bytes(config: &BTreeMap<String, String>) -> Vec<u8> {
    config
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect::<String>()
        .into_bytes()
}

impl WorkloadTemplate {
    /// This workload's config on `device`: the base config with every matching override layered over it.
    pub fn config_for(&self, device: &flotilla_hub_core::DeviceView) -> Vec<u8> {
        let mut layers: Vec<(u8, usize, &ConfigOverride)> = self
            .overrides
            .iter()
            .enumerate()
            .filter(|(_, o)| o.matches(device))
            .map(|(i, o)| (o.rank(), i, o))
            .collect();
        if layers.is_empty() {
            return self.config.clone();
        }
        layers.sort_by_key(|(rank, i, _)| (*rank, *i));
        let mut merged = self.config_map.clone();
        for (_, _, o) in layers {
            merged.extend(o.config.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        config_bytes(&merged)
    }
}

fn default_memory() -> u32 {
    16
}
fn default_cpu() -> u32 {
    100
}
fn default_restart() -> String {
    "on-failure".into()
}
fn default_health() -> u32 {
    5
}

/// How a workload names its release: by `name@version` or by release digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseRef {
    Version { name: String, version: String },
    Digest(Digest),
}

/// As written in a spec: `name@version` or `sha256:<hex>`.
impl std::fmt::Display for ReleaseRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Version { name, version } => write!(f, "{name}@{version}"),
            Self::Digest(d) => write!(f, "sha256:{}", d.to_hex()),
        }
    }
}

/// One validated workload of a deployment (release not yet resolved).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadTemplate {
    pub name: WorkloadName,
    pub release: ReleaseRef,
    pub resources: Resources,
    pub tick_ms: u32,
    pub restart: RestartPolicy,
    pub health: HealthRule,
    pub config: Vec<u8>,
    pub geofence: Option<Geofence>,
    /// The kind the spec declares (checked against the release when resolved).
    pub kind: Option<WorkloadKind>,
    /// The container fields, when the spec declares a container workload.
    pub container: Option<flotilla_shared::wire::ContainerSpec>,
    /// Declared content types of its telemetry streams. Hub-side only: not part of the signed spec, so changing a
    /// declaration restarts nothing.
    pub telemetry: BTreeMap<Label, ContentType>,
    /// `config` as a map, for layering overrides over it.
    pub config_map: BTreeMap<String, String>,
    /// Per-region, zone, label or device config layers ([`WorkloadTemplate::config_for`]).
    pub overrides: Vec<ConfigOverride>,
}

/// A validated deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    pub name: Label,
    pub target: Target,
    pub policy: Policy,
    pub constraints: Constraints,
    pub workloads: Vec<WorkloadTemplate>,
    /// How a change to this deployment is rolled out; `None` means all placed devices at once.
    pub rollout: Option<Plan>,
}

/// Validates one config override: at least one match key, each a valid name.
fn config_override(field: &str, o: RawOverride) -> Result<ConfigOverride, (String, String)> {
    let m = o.matches;
    if m.region.is_none() && m.zone.is_none() && m.labels.is_empty() && m.device.is_none() {
        return Err((
            format!("{field}.match"),
            "needs at least one of region, zone, labels, device".into(),
        ));
    }
    for (key, value) in [
        ("region", &m.region),
        ("zone", &m.zone),
        ("device", &m.device),
    ] {
        if let Some(v) = value {
            Label::new(v.as_str()).map_err(|e| (format!("{field}.match.{key}"), e.to_string()))?;
        }
    }
    Ok(ConfigOverride {
        region: m.region,
        zone: m.zone,
        labels: m.labels,
        device: m.device,
        config: o.config,
    })
}

/// Validates a workload's stream declarations. `agent` and `*.metrics` are the agents' own metric streams.
fn telemetry_streams(
    field: &str,
    raw: &BTreeMap<String, String>,
) -> Result<BTreeMap<Label, ContentType>, (String, String)> {
    let mut out = BTreeMap::new();
    for (stream, ty) in raw {
        let f = format!("{field}.{stream}");
        let name = Label::new(stream.as_str()).map_err(|e| (f.clone(), e.to_string()))?;
        if stream == "agent" || stream.ends_with(".metrics") {
            return Err((
                f,
                "is reserved for metrics (the agent's own, or `<workload>.metrics`)".into(),
            ));
        }
        let ty = ContentType::parse(ty)
            .filter(|t| !t.is_metrics())
            .ok_or_else(|| {
                let names: Vec<&str> = ContentType::ALL
                    .iter()
                    .filter(|t| !t.is_metrics())
                    .map(|t| t.name())
                    .collect();
                (
                    f.clone(),
                    format!("{ty:?} is not one of {}", names.join(", ")),
                )
            })?;
        out.insert(name, ty);
    }
    Ok(out)
}

fn point(field: &str, lat: f64, lon: f64) -> Result<LatLon, (String, String)> {
    if !(lat.is_finite() && (-90.0..=90.0).contains(&lat)) {
        return Err((format!("{field}.lat"), format!("{lat} is not a latitude")));
    }
    if !(lon.is_finite() && (-180.0..=180.0).contains(&lon)) {
        return Err((format!("{field}.lon"), format!("{lon} is not a longitude")));
    }
    Ok(LatLon { lat, lon })
}

fn geofence(field: &str, g: &RawGeofence) -> Result<Geofence, (String, String)> {
    match (&g.circle, &g.polygon, &g.h3) {
        (Some(c), None, None) => {
            let center = point(&format!("{field}.circle"), c.lat, c.lon)?;
            if !(c.radius_m.is_finite() && c.radius_m > 0.0) {
                return Err((
                    format!("{field}.circle.radius_m"),
                    "must be a positive number of metres".into(),
                ));
            }
            Ok(Geofence::Circle {
                center,
                radius_m: c.radius_m,
            })
        }
        (None, Some(poly), None) => {
            if poly.len() < 3 {
                return Err((
                    format!("{field}.polygon"),
                    "needs at least 3 [lat, lon] points".into(),
                ));
            }
            let pts = poly
                .iter()
                .enumerate()
                .map(|(i, [lat, lon])| point(&format!("{field}.polygon[{i}]"), *lat, *lon))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Geofence::Polygon(pts))
        }
        (None, None, Some(cells)) => {
            let mut out = Vec::new();
            for (i, c) in cells.iter().enumerate() {
                let cell: h3o::CellIndex = c.parse().map_err(|_| {
                    (
                        format!("{field}.h3[{i}]"),
                        format!("{c:?} is not an H3 cell index"),
                    )
                })?;
                out.push(u64::from(cell));
            }
            if out.is_empty() {
                return Err((format!("{field}.h3"), "needs at least one cell".into()));
            }
            Ok(Geofence::H3Cells(out))
        }
        _ => Err((
            field.to_owned(),
            "give exactly one of circle, polygon or h3".into(),
        )),
    }
}

/// Parses and validates a spec; `file` is used in error messages only.
pub fn parse(file: &str, text: &str) -> Result<Deployment, SpecError> {
    let raw: RawSpec = toml::from_str(text).map_err(|e| SpecError::Syntax {
        file: file.to_owned(),
        message: e.to_string(),
    })?;
    validate(raw).map_err(|(field, message)| SpecError::Field {
        file: file.to_owned(),
        field,
        message,
    })
}

fn validate(raw: RawSpec) -> Result<Deployment, (String, String)> {
    let name = Label::new(raw.name).map_err(|e| ("name".to_owned(), e.to_string()))?;
    for (i, r) in raw
        .target
        .regions
        .iter()
        .chain(raw.target.zones.iter())
        .enumerate()
    {
        Label::new(r.clone()).map_err(|e| (format!("target.regions/zones[{i}]"), e.to_string()))?;
    }
    let target = Target {
        selector: raw.target.selector,
        regions: raw.target.regions,
        zones: raw.target.zones,
        geofence: raw
            .target
            .geofence
            .as_ref()
            .map(|g| geofence("target.geofence", g))
            .transpose()?,
    };
    let p = raw.placement;
    let need = |v: Option<u32>, f: &str| {
        v.ok_or_else(|| {
            (
                format!("placement.{f}"),
                "required by this policy".to_owned(),
            )
        })
    };
    let policy = match p.policy.as_deref().unwrap_or("every") {
        "every" => Policy::Every,
        "per-region" => Policy::PerRegion {
            count: need(p.count, "count")?,
            grace_secs: p.grace_secs.unwrap_or(300),
        },
        "nearest" => {
            let pt = p.point.ok_or_else(|| {
                (
                    "placement.point".to_owned(),
                    "required by nearest".to_owned(),
                )
            })?;
            Policy::Nearest {
                k: need(p.k, "k")?,
                point: point("placement.point", pt.lat, pt.lon)?,
            }
        }
        "spread" => {
            let weights = p.weights.ok_or_else(|| {
                (
                    "placement.weights".to_owned(),
                    "required by spread".to_owned(),
                )
            })?;
            if weights.values().all(|w| *w == 0) {
                return Err((
                    "placement.weights".into(),
                    "at least one weight must be positive".into(),
                ));
            }
            Policy::Spread {
                count: need(p.count, "count")?,
                weights,
            }
        }
        other => {
            return Err((
                "placement.policy".into(),
                format!("{other:?} is not one of every, per-region, nearest, spread"),
            ));
        }
    };
    let runtime = match raw.constraints.runtime.as_deref() {
        None => None,
        Some(s) => Some(WorkloadKind::parse(s).ok_or_else(|| {
            (
                "constraints.runtime".to_owned(),
                format!("{s:?} is not wasm, container, firmware or agent"),
            )
        })?),
    };
    let constraints = Constraints {
        arch: raw.constraints.arch,
        runtime,
        min_memory_mib: raw.constraints.min_memory_mib,
    };
    if raw.workloads.is_empty() {
        return Err((
            "workloads".into(),
            "at least one workload is required".into(),
        ));
    }
    let mut workloads = Vec::new();
    for (i, w) in raw.workloads.into_iter().enumerate() {
        let f = |x: &str| format!("workloads[{i}].{x}");
        let name = WorkloadName::new(w.name).map_err(|e| (f("name"), e.to_string()))?;
        if workloads.iter().any(|t: &WorkloadTemplate| t.name == name) {
            return Err((f("name"), format!("{name} appears twice")));
        }
        let release = if let Some(hex) = w.release.strip_prefix("sha256:") {
            ReleaseRef::Digest(
                Digest::from_hex(hex).map_err(|_| (f("release"), "bad sha256 digest".into()))?,
            )
        } else if let Some((n, v)) = w.release.split_once('@') {
            ReleaseRef::Version {
                name: n.to_owned(),
                version: v.to_owned(),
            }
        } else {
            return Err((
                f("release"),
                format!("{:?}: use name@version or sha256:<hex>", w.release),
            ));
        };
        let restart = match w.restart.as_str() {
            "never" => RestartPolicy::Never,
            "on-failure" => RestartPolicy::OnFailure,
            "always" => RestartPolicy::Always,
            o => {
                return Err((
                    f("restart"),
                    format!("{o:?} is not never, on-failure or always"),
                ));
            }
        };
        let kind = match w.kind.as_deref() {
            None => None,
            Some(s) => Some(WorkloadKind::parse(s).ok_or_else(|| {
                (
                    f("kind"),
                    format!("{s:?} is not wasm, container, firmware or agent"),
                )
            })?),
        };
        let raw_container = crate::spec_container::RawContainer {
            command: w.command,
            env: w.env,
            config_path: w.config_path,
            cpus: w.cpus,
            pids: w.pids,
            ports: w.ports,
            volumes: w.volumes,
            devices: w.devices,
            capabilities: w.capabilities,
            network: w.network,
            read_only: w.read_only,
            user: w.user,
            healthcheck: w.healthcheck,
            stop_timeout_secs: w.stop_timeout_secs,
            update_strategy: w.update_strategy,
            log_max_mib: w.log_max_mib,
        };
        let container = match (kind, raw_container.any()) {
            (Some(WorkloadKind::Container), _) => Some(
                raw_container
                    .validate()
                    .map_err(|(field, m)| (f(&field), m))?,
            ),
            (_, Some(field)) => {
                return Err((
                    f(field),
                    "applies to container workloads only; add kind = \"container\"".into(),
                ));
            }
            (_, None) => None,
        };
        // Containers get cgroup limits (larger), WASM guests a linear-memory cap.
        let max_memory = if container.is_some() { 65_536 } else { 4096 };
        if !(1..=max_memory).contains(&w.memory_mib) {
            return Err((
                f("memory_mib"),
                format!("{} is outside 1..{max_memory}", w.memory_mib),
            ));
        }
        if w.cpu_ms == 0 {
            return Err((f("cpu_ms"), "must be at least 1".into()));
        }
        if w.tick_ms != 0 && w.tick_ms < 10 {
            return Err((f("tick_ms"), "must be 0 (command) or at least 10".into()));
        }
        let config = config_bytes(&w.config);
        let overrides = w
            .overrides
            .into_iter()
            .enumerate()
            .map(|(j, o)| config_override(&f(&format!("overrides[{j}]")), o))
            .collect::<Result<Vec<_>, _>>()?;
        let geofence = w
            .geofence
            .as_ref()
            .map(|g| geofence(&f("geofence"), g))
            .transpose()?;
        let telemetry = telemetry_streams(&f("telemetry"), &w.telemetry)?;
        workloads.push(WorkloadTemplate {
            name,
            release,
            resources: Resources {
                memory_mib: w.memory_mib,
                cpu_ms: w.cpu_ms,
            },
            tick_ms: w.tick_ms,
            restart,
            health: HealthRule::RunningFor(w.health_secs),
            config,
            geofence,
            kind,
            container,
            telemetry,
            config_map: w.config,
            overrides,
        });
    }
    let rollout = raw.rollout.map(rollout_plan).transpose()?;
    // A firmware or agent workload goes only to devices that can install it; one deployment updates one kind of
    // system software, so its devices are chosen by one runtime.
    let mut constraints = constraints;
    let system: std::collections::HashSet<WorkloadKind> = workloads
        .iter()
        .filter_map(|w| w.kind.filter(|k| k.is_system()))
        .collect();
    match (system.len(), constraints.runtime) {
        (0, _) => {}
        (1, None) => constraints.runtime = system.iter().next().copied(),
        (1, Some(r)) if system.contains(&r) => {}
        _ => {
            return Err((
                "workloads".into(),
                "a deployment updates firmware, the agent or workloads, not a mix: put each in its own \
                 deployment (constraints.runtime must match too)"
                    .into(),
            ));
        }
    }
    if !system.is_empty()
        && workloads
            .iter()
            .any(|w| !w.kind.is_some_and(|k| k.is_system()))
    {
        return Err((
            "workloads".into(),
            "a deployment updates firmware, the agent or workloads, not a mix: put each in its own deployment"
                .into(),
        ));
    }
    Ok(Deployment {
        name,
        target,
        policy,
        constraints,
        workloads,
        rollout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "sensors"
[target]
selector = { role = "sensor" }
regions = ["eu-west", "us-east"]
[placement]
policy = "per-region"
count = 2
[[workloads]]
name = "sensor"
release = "sensor@1.0.0"
tick_ms = 1000
config = { interval = "5" }
"#;

    /// A rollout with a weekday window in eu-west, its clock left to the case.
    const WINDOW: &str = "[rollout]\nwaves = [\"rest\"]\n[rollout.windows.eu-west]\n\
                          days = [\"mon\"]\nstart = \"01:00\"\nend = \"05:00\"\n";

    /// A rollout with one disruption budget, its fields left to the case.
    const BUDGET: &str = "[rollout]\nwaves = [\"rest\"]\n[[rollout.budgets]]\n";

    #[test]
    fn budgets_and_offline_settings() {
        let text = format!(
            "{GOOD}{BUDGET}group_by = \"label:site\"\nmax_unavailable = 2\n\
             [[rollout.budgets]]\ngroup_by = \"zone\"\nmax_unavailable = \"25%\"\n"
        );
        let plan = parse("s.toml", &text)
            .expect("valid")
            .rollout
            .expect("rollout");
        assert_eq!(
            plan.budgets,
            vec![
                Budget {
                    group_by: GroupBy::Label("site".into()),
                    max_unavailable: Limit::Count(2)
                },
                Budget {
                    group_by: GroupBy::Zone,
                    max_unavailable: Limit::Percent(25)
                },
            ]
        );
        assert_eq!(
            (plan.offline_grace_secs, plan.offline_is_failure),
            (600, false)
        );
        let text = format!(
            "{GOOD}[rollout]\nwaves = [\"rest\"]\noffline_grace_secs = 30\noffline_is_failure = true\n"
        );
        let plan = parse("s.toml", &text)
            .expect("valid")
            .rollout
            .expect("rollout");
        assert_eq!(
            (plan.offline_grace_secs, plan.offline_is_failure),
            (30, true)
        );
    }

    #[test]
    fn window_clocks() {
        let window = |extra: &str| {
            let d = parse("s.toml", &format!("{GOOD}{WINDOW}{extra}")).expect("valid");
            d.rollout.expect("rollout").windows["eu-west"].clone()
        };
        let w = window("tz = \"America/New_York\"\ndevice_tz = true\n");
        assert_eq!(
            (w.clock, w.device_zone),
            (Clock::Zone("America/New_York".into()), true)
        );
        assert_eq!(window("utc_offset_min = -300\n").clock, Clock::Offset(-300));
        assert_eq!(window("").clock, Clock::Offset(0));
    }

    /// Config layers: region < zone < labels < device, later over earlier at the same rank, keys merged.
    #[test]
    fn config_overrides_layer_by_specificity() {
        let text = format!(
            "{GOOD}[[workloads.overrides]]\nmatch = {{ device = \"gw-9\" }}\nconfig = {{ interval = \"1\" }}\n\
             [[workloads.overrides]]\nmatch = {{ region = \"eu-west\" }}\nconfig = {{ unit = \"c\", interval = \"9\" }}\n\
             [[workloads.overrides]]\nmatch = {{ labels = {{ site = \"plant-7\" }} }}\nconfig = {{ unit = \"k\" }}\n\
             [[workloads.overrides]]\nmatch = {{ zone = \"eu-b\" }}\nconfig = {{ unit = \"z1\" }}\n\
             [[workloads.overrides]]\nmatch = {{ zone = \"eu-b\", region = \"us-east\" }}\nconfig = {{ unit = \"never\" }}\n\
             [[workloads.overrides]]\nmatch = {{ zone = \"eu-b\" }}\nconfig = {{ unit = \"z2\" }}\n"
        );
        let d = parse("s.toml", &text).expect("valid");
        let w = &d.workloads[0];
        let view = |id: &str, region: &str, zone: &str, site: Option<&str>| {
            flotilla_hub_core::DeviceView {
                id: flotilla_shared::DeviceId::new(id).expect("id"),
                labels: site
                    .map(|s| [("site".to_owned(), s.to_owned())].into())
                    .unwrap_or_default(),
                region: Some(region.into()),
                zone: Some(zone.into()),
                location: None,
                arch: "x86_64".into(),
                runtimes: vec![],
                memory_mib: 64,
                online: true,
                offline_since: None,
            }
        };
        let cases = [
            (view("gw-1", "us-east", "us-a", None), "interval=5\n"),
            (
                view("gw-2", "eu-west", "eu-a", None),
                "interval=9\nunit=c\n",
            ),
            (
                view("gw-3", "eu-west", "eu-b", None),
                "interval=9\nunit=z2\n",
            ),
            (
                view("gw-4", "eu-west", "eu-b", Some("plant-7")),
                "interval=9\nunit=k\n",
            ),
            (
                view("gw-9", "eu-west", "eu-b", Some("plant-7")),
                "interval=1\nunit=k\n",
            ),
            // The zone-and-region layer has the same rank (zone) as the plain zone layers: the last one wins.
            (
                view("gw-5", "us-east", "eu-b", None),
                "interval=5\nunit=z2\n",
            ),
        ];
        for (v, want) in cases {
            assert_eq!(String::from_utf8_lossy(&w.config_for(&v)), want, "{}", v.id);
        }
    }

    /// A good spec parses into the expected policy and workload.
    #[test]
    fn parses_good_spec() {
        let d = parse("s.toml", GOOD).expect("valid");
        assert_eq!(
            d.policy,
            Policy::PerRegion {
                count: 2,
                grace_secs: 300
            }
        );
        assert_eq!(d.workloads[0].config, b"interval=5\n");
        assert!(d.workloads[0].telemetry.is_empty());
        let typed = parse(
            "s.toml",
            &GOOD.replace(
                "tick_ms = 1000",
                "tick_ms = 1000\ntelemetry = { count = \"u64le\", readings = \"json\" }",
            ),
        )
        .expect("valid");
        let streams: Vec<(&str, ContentType)> = typed.workloads[0]
            .telemetry
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(
            streams,
            [
                ("count", ContentType::U64Le),
                ("readings", ContentType::Json)
            ]
        );
        assert_eq!(
            d.workloads[0].release,
            ReleaseRef::Version {
                name: "sensor".into(),
                version: "1.0.0".into()
            }
        );
    }

    /// Malformed and invalid specs are refused with the file and the line or field.
    #[test]
    fn a_system_workload_sets_the_runtime_it_needs() {
        for kind in [WorkloadKind::Firmware, WorkloadKind::Agent] {
            let text = GOOD.replace(
                "tick_ms = 1000",
                &format!("tick_ms = 1000\nkind = \"{}\"", kind.name()),
            );
            let d = parse("deploy/sensors.toml", &text).expect("valid");
            assert_eq!(d.constraints.runtime, Some(kind));
        }
    }

    #[test]
    fn rejects_bad_specs_naming_the_place() {
        let cases: Vec<(String, &str)> = vec![
            ("name = \"x\"\n[[workloads]\n".into(), "line 2"),
            (GOOD.replace("count = 2", "count = \"two\""), "line"),
            (GOOD.replace("policy = \"per-region\"", "policy = \"random\""), "placement.policy"),
            (GOOD.replace("count = 2\n", ""), "placement.count"),
            (GOOD.replace("release = \"sensor@1.0.0\"", "release = \"latest\""), "workloads[0].release"),
            (GOOD.replace("tick_ms = 1000", "tick_ms = 1000\nrestart = \"sometimes\""), "workloads[0].restart"),
            (GOOD.replace("tick_ms = 1000", "tick_ms = 1000\nmemory_mib = 0"), "workloads[0].memory_mib"),
            (GOOD.replace("name = \"sensors\"", "name = \"Sensors!\""), "`name`"),
            (GOOD.replace("[placement]", "colour = \"red\"\n[placement]"), "unknown field"),
            (
                GOOD.replace("regions = [", "geofence = { circle = { lat = 95.0, lon = 0.0, radius_m = 5.0 } }\nregions = ["),
                "target.geofence.circle.lat",
            ),
            (GOOD.replace("regions = [", "geofence = { h3 = [\"zz\"] }\nregions = ["), "target.geofence.h3[0]"),
            (GOOD.replace("tick_ms = 1000", "tick_ms = 1000\ntelemetry = { count = \"u128le\" }"), "workloads[0].telemetry.count"),
            (format!("{GOOD}{WINDOW}tz = \"Europe/Berln\"\n"), "rollout.windows.eu-west.tz"),
            (format!("{GOOD}{WINDOW}tz = \"Europe/Berlin\"\nutc_offset_min = 60\n"), "not both"),
            (format!("{GOOD}{WINDOW}utc_offset_min = 6000\n"), "rollout.windows.eu-west.utc_offset_min"),
            (format!("{GOOD}[[workloads.overrides]]\nmatch = {{}}\nconfig = {{ a = \"b\" }}\n"), "workloads[0].overrides[0].match"),
            (format!("{GOOD}[[workloads.overrides]]\nmatch = {{ region = \"EU!\" }}\nconfig = {{}}\n"), "workloads[0].overrides[0].match.region"),
            (format!("{GOOD}[[workloads.overrides]]\nmatch = {{ city = \"x\" }}\nconfig = {{}}\n"), "unknown field"),
            (GOOD.replace("tick_ms = 1000", "tick_ms = 1000\ntelemetry = { \"x.metrics\" = \"json\" }"), "reserved"),
            (GOOD.replace("tick_ms = 1000", "tick_ms = 1000\ntelemetry = { agent = \"json\" }"), "reserved"),
            (GOOD.replace("tick_ms = 1000", "tick_ms = 1000\ntelemetry = { Bad = \"json\" }"), "workloads[0].telemetry.Bad"),
            (format!("{GOOD}{BUDGET}group_by = \"site\"\nmax_unavailable = 1\n"), "rollout.budgets[0].group_by"),
            (format!("{GOOD}{BUDGET}group_by = \"label:\"\nmax_unavailable = 1\n"), "rollout.budgets[0].group_by"),
            (format!("{GOOD}{BUDGET}group_by = \"zone\"\nmax_unavailable = 0\n"), "rollout.budgets[0].max_unavailable"),
            (format!("{GOOD}{BUDGET}group_by = \"zone\"\nmax_unavailable = \"150%\"\n"), "rollout.budgets[0].max_unavailable"),
            (format!("{GOOD}{BUDGET}group_by = \"zone\"\nmax_unavailable = \"half\"\n"), "rollout.budgets[0].max_unavailable"),
            (format!("{GOOD}{BUDGET}group_by = \"zone\"\nmax_unavailable = 1\nper = \"site\"\n"), "unknown field"),
            (GOOD.replace("tick_ms = 1000", "tick_ms = 1000\nkind = \"kernel\""), "workloads[0].kind"),
            // Firmware and workloads (or firmware and the agent) are updated by separate deployments.
            (GOOD.replace("tick_ms = 1000", "tick_ms = 1000\nkind = \"firmware\"")
                + "[[workloads]]\nname = \"other\"\nrelease = \"other@1\"\n", "not a mix"),
            (GOOD.replace("tick_ms = 1000", "tick_ms = 1000\nkind = \"firmware\"")
                + "[[workloads]]\nname = \"agent\"\nrelease = \"agent@1\"\nkind = \"agent\"\n", "not a mix"),
            (GOOD.replace("[placement]", "[constraints]\nruntime = \"container\"\n[placement]")
                .replace("tick_ms = 1000", "tick_ms = 1000\nkind = \"firmware\""), "not a mix"),
        ];
        for (text, want) in cases {
            let err = parse("deploy/sensors.toml", &text)
                .expect_err(&text)
                .to_string();
            assert!(err.starts_with("deploy/sensors.toml"), "{err}");
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }
}
