//! What the console's pages show, read from the API's JSON answers: the console is a client of the API (called
//! in-process), and these are its own types, separate from the hub's domain types. Unknown fields are ignored
//! and missing ones default, so an API that grows a field never breaks a page.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Counts {
    pub devices: u32,
    pub online: u32,
    pub offline: u32,
    pub converged: u32,
    pub failing: u32,
    pub held: u32,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
pub struct Centre {
    pub lat: f64,
    pub lon: f64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Zone {
    pub zone: Option<String>,
    pub counts: Counts,
    pub centre: Option<Centre>,
    pub versions: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Region {
    pub region: Option<String>,
    pub counts: Counts,
    pub centre: Option<Centre>,
    pub versions: BTreeMap<String, u32>,
    pub zones: Vec<Zone>,
}

/// `GET /api/v1/fleet/summary`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Summary {
    pub total: Counts,
    pub regions: Vec<Region>,
}

/// One row of `GET /api/v1/rollouts`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RolloutRow {
    pub deployment: String,
    pub phase: String,
    pub paused: bool,
    pub finished: bool,
    pub waves: usize,
    pub devices: usize,
    pub counts: BTreeMap<String, u32>,
    pub started_at: u64,
    pub finished_at: Option<u64>,
    pub soak_left_secs: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Workload {
    pub name: String,
    pub state: String,
    pub healthy: bool,
    pub version: Option<String>,
    pub release: String,
    pub restarts: u32,
    pub last_error: Option<String>,
    pub rejected: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Device {
    pub id: String,
    pub online: bool,
    pub last_seen: u64,
    pub offline_since: Option<u64>,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub arch: String,
    pub agent_version: String,
    pub memory_mib: u32,
    pub runtimes: Vec<String>,
    pub desired_generation: u64,
    pub applied_generation: u64,
    pub rejection: Option<String>,
    pub telemetry_dropped: u64,
    pub hold: Option<String>,
    pub revoked: bool,
    pub workloads: Vec<Workload>,
    pub effective_config: Option<BTreeMap<String, String>>,
    pub recent_reports: Vec<ReportLine>,
}

/// A device's report, summarised by the hub.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ReportLine {
    pub at: u64,
    pub last_at: u64,
    pub reports: u32,
    pub applied_generation: u64,
    pub summary: String,
}

/// A telemetry stream of a device, with its downsampled recent values when the history has them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Stream {
    pub stream: String,
    #[serde(rename = "type")]
    pub content_type: Option<String>,
    pub records: u64,
    pub gaps: u64,
    /// Latest value of each named metric.
    pub metrics: BTreeMap<String, f64>,
    /// Each metric's recent means, oldest first: filled by the console from the history's buckets (not part of
    /// the stream listing).
    #[serde(skip)]
    pub points: BTreeMap<String, Vec<f64>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AuditEntry {
    pub at: u64,
    pub who: String,
    pub action: String,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Release {
    pub name: String,
    pub version: String,
    pub epoch: u64,
    pub digest: String,
    pub artifact: String,
    pub size: u64,
    pub created_at: u64,
    pub precompiled: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Revision {
    pub revision: u64,
    pub at: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PlacedState {
    pub workload: String,
    pub state: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Placed {
    pub device: String,
    pub online: bool,
    pub workloads: Vec<PlacedState>,
}

/// One deployment (`GET /api/v1/deployments` rows, `GET /api/v1/deployments/{name}`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Deployment {
    pub name: String,
    pub revision: Option<u64>,
    pub revisions: Vec<Revision>,
    pub workloads: Vec<String>,
    pub placed: usize,
    pub running: usize,
    pub devices: Vec<Placed>,
}

/// `GET /api/v1/deployments/{name}/diff`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Diff {
    pub from: u64,
    pub to: u64,
    pub changes: Vec<String>,
    pub unified: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct WaveDevice {
    pub device: String,
    pub status: Option<String>,
    pub detail: Option<String>,
    pub stage: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Wave {
    pub wave: usize,
    pub devices: Vec<WaveDevice>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HistoryLine {
    pub at: u64,
    pub event: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct WindowState {
    pub region: String,
    pub open: bool,
}

/// `GET /api/v1/rollouts/{deployment}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Rollout {
    pub deployment: String,
    pub phase: String,
    pub paused: bool,
    pub finished: bool,
    pub current_wave: Option<usize>,
    pub soak_secs: u64,
    pub soak_left_secs: Option<u64>,
    pub manual_approval: bool,
    pub max_failure_ratio: f64,
    pub windows: Vec<WindowState>,
    pub waves: Vec<Wave>,
    pub left_out: Vec<WaveDevice>,
    pub history: Vec<HistoryLine>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct GateEval {
    pub at: u64,
    pub wave: usize,
    pub passed: bool,
    pub failed: usize,
    pub undetermined: usize,
    pub judged: usize,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct OperatorAction {
    pub at: u64,
    pub who: String,
    pub command: String,
}

/// `GET /api/v1/rollouts/{deployment}/report` (the parts the page shows).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Report {
    pub outcome: String,
    pub total_secs: u64,
    pub gates: Vec<GateEval>,
    pub operators: Vec<OperatorAction>,
}

/// A wave's devices counted into the progress bar's segments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaveProgress {
    pub pending: usize,
    pub updating: usize,
    pub healthy: usize,
    pub failed: usize,
    pub held: usize,
}

impl WaveProgress {
    /// Devices of a wave by the rollout statuses the API names (`pending`, `waiting-for-window`, `updating`,
    /// `healthy`, `held`, `failed`, `rolled-back`, `skipped`, `undetermined`, `blocked`).
    pub fn of(devices: &[WaveDevice]) -> Self {
        let mut p = Self::default();
        for d in devices {
            match d.status.as_deref().unwrap_or("pending") {
                "healthy" | "skipped" => p.healthy += 1,
                "updating" => p.updating += 1,
                "held" | "undetermined" => p.held += 1,
                "failed" | "rolled-back" | "blocked" => p.failed += 1,
                _ => p.pending += 1,
            }
        }
        p
    }

    pub fn total(&self) -> usize {
        self.pending + self.updating + self.healthy + self.failed + self.held
    }
}
