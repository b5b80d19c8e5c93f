//! The rollout report (`flotilla rollout report`): per wave its start and end, its devices by outcome with the
//! reasons, the gate evaluations, and who paused, approved or aborted; built from the rollout's state alone.

use super::{DeviceStatus, Phase, Rollout};
use serde::{Deserialize, Serialize};

/// When a wave started and ended (unix seconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveTimes {
    pub started: Option<u64>,
    pub ended: Option<u64>,
}

/// One evaluation of a wave's health gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateEval {
    pub at: u64,
    pub wave: usize,
    pub passed: bool,
    pub failed: usize,
    /// Offline past the grace: judged neither way.
    pub undetermined: usize,
    /// Devices the ratio was taken over.
    pub judged: usize,
    pub detail: String,
}

/// An operator command, with who gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorAction {
    pub at: u64,
    pub who: String,
    pub command: String,
}

/// A device in the report: its state and, for failed, held, rolled-back or left-out devices, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceLine {
    pub device: String,
    pub status: &'static str,
    pub reason: Option<String>,
}

/// One wave in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WaveReport {
    /// 1-based, as operators count.
    pub wave: usize,
    pub started: Option<u64>,
    pub ended: Option<u64>,
    pub devices: usize,
    pub healthy: usize,
    pub failed: usize,
    pub undetermined: usize,
    pub held: usize,
    pub rolled_back: usize,
    pub other: usize,
    /// Every device that is not simply healthy, with its state and reason.
    pub exceptions: Vec<DeviceLine>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutReport {
    pub outcome: String,
    pub started_at: u64,
    pub finished_at: Option<u64>,
    /// Finished - started, or now - started while it runs.
    pub total_secs: u64,
    pub waves: Vec<WaveReport>,
    /// Devices left out because the release failed on them before.
    pub left_out: Vec<DeviceLine>,
    pub gates: Vec<super::GateEval>,
    pub operators: Vec<OperatorAction>,
}

impl Rollout {
    /// The report as of `now`.
    pub fn report(&self, now: u64) -> RolloutReport {
        let line = |d: &flotilla_shared::DeviceId| {
            let s = self.status.get(d);
            DeviceLine {
                device: d.to_string(),
                status: s.map_or("unknown", DeviceStatus::name),
                reason: s.and_then(DeviceStatus::detail).map(str::to_owned),
            }
        };
        let waves = self
            .waves
            .iter()
            .enumerate()
            .map(|(i, devices)| {
                let times = self.wave_times.get(i).cloned().unwrap_or_default();
                let mut w = WaveReport {
                    wave: i + 1,
                    started: times.started,
                    ended: times.ended,
                    devices: devices.len(),
                    healthy: 0,
                    failed: 0,
                    undetermined: 0,
                    held: 0,
                    rolled_back: 0,
                    other: 0,
                    exceptions: vec![],
                };
                for d in devices {
                    let status = self.status.get(d);
                    let bucket = match status {
                        Some(DeviceStatus::Healthy { .. }) => &mut w.healthy,
                        Some(DeviceStatus::Failed { .. }) => &mut w.failed,
                        Some(DeviceStatus::Undetermined { .. }) => &mut w.undetermined,
                        Some(DeviceStatus::Held { .. } | DeviceStatus::Skipped) => &mut w.held,
                        Some(DeviceStatus::RolledBack { .. }) => &mut w.rolled_back,
                        _ => &mut w.other,
                    };
                    *bucket += 1;
                    if !matches!(status, Some(DeviceStatus::Healthy { .. })) {
                        w.exceptions.push(line(d));
                    }
                }
                w
            })
            .collect();
        let left_out = self
            .status
            .iter()
            .filter(|(_, s)| matches!(s, DeviceStatus::Blocked { .. }))
            .map(|(d, _)| line(d))
            .collect();
        let outcome = match &self.phase {
            Phase::Wave(w) => format!("running: wave {} of {}", w + 1, self.waves.len()),
            Phase::AwaitingApproval(w) => format!("awaiting approval for wave {}", w + 1),
            Phase::Completed => "completed".into(),
            Phase::Aborted { reason } => format!("aborted: {reason}"),
        };
        RolloutReport {
            outcome,
            started_at: self.started_at,
            finished_at: self.finished_at,
            total_secs: self
                .finished_at
                .unwrap_or(now)
                .saturating_sub(self.started_at),
            waves,
            left_out,
            gates: self.gates.clone(),
            operators: self.operators.clone(),
        }
    }
}
