//! Progressive rollouts as a sans-IO state machine: ordered waves (canary per region, named regions, the rest),
//! a max number of devices in flight, disruption budgets per site, a soak time, health gates with a failure-ratio
//! threshold and report timeouts, automatic abort with rollback, operator commands (pause, resume, abort, approve,
//! retry), maintenance windows in local time, device-side holds with a deadline policy, offline devices judged
//! `undetermined` rather than failed, and devices where the release already failed left out.
//!
//! Driven as `observe/set_online/command/tick(now, ..)`, then `poll_action()` until `None`. Time is unix seconds
//! passed in. The whole state is plain data (`serde`) so the hub persists a snapshot after every transition and a
//! restarted hub continues exactly where it was: actions already emitted are never emitted again.

mod budget;
mod legacy;
mod report;
mod window;

pub use budget::{Budget, Elsewhere, GroupBy, Limit};
pub use report::{DeviceLine, GateEval, OperatorAction, RolloutReport, WaveReport, WaveTimes};
pub use window::{Clock, Window, is_time_zone};

use flotilla_shared::DeviceId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// One step of the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Wave {
    /// `percent` of the devices of every region (at least one per region).
    Canary { percent: u32 },
    /// Every remaining device in these regions.
    Regions(Vec<String>),
    /// Every remaining device.
    Rest,
}

/// What happens when a device holds an update past the deadline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldDeadline {
    /// The device counts as failed (and may trip the gate).
    #[default]
    Fail,
    /// The rollout proceeds without the device; it stays on its current version.
    Proceed,
}

/// The rollout plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Plan {
    pub waves: Vec<Wave>,
    /// Seconds every device of a wave must stay healthy before the wave counts as done.
    pub soak_secs: u64,
    /// Devices updating at the same time (0 = no limit).
    pub max_in_flight: u32,
    /// Abort when failed devices / devices judged in the wave exceeds this.
    pub max_failure_ratio: f64,
    /// A device not healthy this long after it was assigned the release counts as failed.
    pub report_timeout_secs: u64,
    pub manual_approval: bool,
    /// Region -> maintenance window; regions without one may update any time.
    pub windows: BTreeMap<String, Window>,
    pub max_hold_secs: u64,
    pub on_hold_deadline: HoldDeadline,
    /// Gates on workload or agent telemetry, evaluated by the hub for every device on the new release.
    pub telemetry_gates: Vec<TelemetryGate>,
    /// How long a device offline at its turn (or gone offline mid-update) may stay `undetermined` before its wave
    /// is judged without it.
    pub offline_grace_secs: u64,
    /// Count a device still offline after the grace as failed (by default it counts as neither).
    pub offline_is_failure: bool,
    /// Disruption budgets: never more devices of one group unavailable at once.
    pub budgets: Vec<Budget>,
    /// Devices of the current and the next wave fetch and verify the new release ahead of their cutover.
    pub pre_download: bool,
    /// When they may (each device's local time, as for maintenance windows); `None` = any time.
    pub download_window: Option<Window>,
}

impl Default for Plan {
    /// The defaults of a `[rollout]` section that names only its waves.
    fn default() -> Self {
        Self {
            waves: vec![Wave::Rest],
            soak_secs: 300,
            max_in_flight: 0,
            max_failure_ratio: 0.1,
            report_timeout_secs: 600,
            manual_approval: false,
            windows: BTreeMap::new(),
            max_hold_secs: 3600,
            on_hold_deadline: HoldDeadline::Fail,
            telemetry_gates: vec![],
            offline_grace_secs: 600,
            offline_is_failure: false,
            budgets: vec![],
            pre_download: false,
            download_window: None,
        }
    }
}

/// A telemetry gate: a named metric of a stream compared to a threshold and/or to the baseline (the mean over the
/// deployment's devices still on the previous release).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryGate {
    pub stream: String,
    pub metric: String,
    /// Fail when the value exceeds this.
    pub max: Option<f64>,
    /// Fail when the value exceeds the baseline by more than this factor (e.g. 1.5 = 50 % worse).
    pub max_ratio_to_baseline: Option<f64>,
}

impl TelemetryGate {
    /// Why `value` fails this gate, if it does. Pure: the hub supplies the value and the baseline.
    pub fn check(&self, value: f64, baseline: Option<f64>) -> Option<String> {
        if let Some(max) = self.max
            && value > max
        {
            return Some(format!(
                "telemetry gate {}/{} = {value} > {max}",
                self.stream, self.metric
            ));
        }
        if let (Some(ratio), Some(base)) = (self.max_ratio_to_baseline, baseline)
            && base > 0.0
            && value > base * ratio
        {
            return Some(format!(
                "telemetry gate {}/{} = {value} > {ratio} x baseline {base}",
                self.stream, self.metric
            ));
        }
        None
    }
}

/// Where one device is in the rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceStatus {
    Pending,
    /// Outside its region's maintenance window.
    WaitingForWindow,
    Updating {
        since: u64,
    },
    Healthy {
        since: u64,
    },
    Held {
        since: u64,
        reason: String,
    },
    Failed {
        reason: String,
    },
    /// Held past the deadline under `HoldDeadline::Proceed`: left on its version.
    Skipped,
    RolledBack {
        reason: String,
    },
    // Variants below were added after snapshots were postcard; appending keeps those snapshots decodable.
    /// Offline when its turn came (or it went offline while updating), since `since`: neither healthy nor
    /// failed. It is told the new release and takes it when it comes back.
    Undetermined {
        since: u64,
    },
    /// Left out: the release already failed its health window on this device (`flotilla rollout retry`).
    Blocked {
        reason: String,
    },
    /// Its group's disruption budget is used up; it starts when a device of the group is available again.
    WaitingForBudget {
        group: String,
    },
}

impl DeviceStatus {
    /// A short name for tables and APIs: `pending`, `waiting-for-window`, `waiting-for-budget`, `updating`,
    /// `healthy`, `held`, `failed`, `skipped`, `rolled-back`, `undetermined`, `blocked`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::WaitingForWindow => "waiting-for-window",
            Self::WaitingForBudget { .. } => "waiting-for-budget",
            Self::Updating { .. } => "updating",
            Self::Healthy { .. } => "healthy",
            Self::Held { .. } => "held",
            Self::Failed { .. } => "failed",
            Self::Skipped => "skipped",
            Self::RolledBack { .. } => "rolled-back",
            Self::Undetermined { .. } => "undetermined",
            Self::Blocked { .. } => "blocked",
        }
    }

    /// Why, for the states that have a reason.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Held { reason, .. }
            | Self::Failed { reason }
            | Self::RolledBack { reason }
            | Self::Blocked { reason } => Some(reason),
            Self::WaitingForBudget { group } => Some(group),
            Self::Undetermined { .. } => Some("offline"),
            _ => None,
        }
    }

    /// Whether the device is out of service for a disruption budget: updating, or offline at its turn.
    fn unavailable(&self) -> bool {
        matches!(self, Self::Updating { .. } | Self::Undetermined { .. })
    }
}

/// `failed: trap on start`, `healthy`: how the history and operators read a device's state.
impl std::fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.detail() {
            Some(d) => write!(f, "{}: {d}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// What the hub learned about a device assigned the new release (from its reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// Running the new release and healthy per the workload's health rule.
    Healthy,
    /// Crash-looping, rejected, or failed to start: the reason.
    Unhealthy(String),
    /// The device holds the update ("not now").
    Held(String),
}

/// Operator commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Pause,
    Resume,
    Abort,
    Approve,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("the rollout is finished ({0})")]
    Finished(&'static str),
    #[error("nothing to approve: the rollout is not waiting for approval")]
    NotAwaitingApproval,
    #[error("the rollout is not paused")]
    NotPaused,
    #[error("the rollout is already paused")]
    AlreadyPaused,
    #[error("nothing to retry: no device of this rollout failed or was left out")]
    NothingToRetry,
}

/// Which release a device should run for this deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    Old,
    New,
}

/// What the hub must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Assign {
        device: DeviceId,
        version: Version,
    },
    /// The new release failed its health window on this device: remember it, so later rollouts leave the device
    /// out until an operator retries.
    RememberFailure {
        device: DeviceId,
        reason: String,
    },
}

/// The rollout's overall phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    Wave(usize),
    AwaitingApproval(usize),
    #[default]
    Completed,
    Aborted {
        reason: String,
    },
}

/// One device taking part in a rollout, as the hub knows it at the start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: DeviceId,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Its own time zone (its `tz` label), for windows that follow the device's clock.
    pub tz: Option<String>,
    pub online: bool,
    /// Why it is left out (the release already failed here), if it is.
    pub blocked: Option<String>,
}

impl Member {
    /// An online device in `region`.
    pub fn new(id: DeviceId, region: Option<String>) -> Self {
        Self {
            id,
            region,
            zone: None,
            labels: BTreeMap::new(),
            tz: None,
            online: true,
            blocked: None,
        }
    }
}

/// A rollout in progress (or finished). Plain data: snapshot it with [`Rollout::snapshot`] after every call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rollout {
    pub plan: Plan,
    pub waves: Vec<Vec<DeviceId>>,
    pub regions: BTreeMap<DeviceId, Option<String>>,
    pub status: BTreeMap<DeviceId, DeviceStatus>,
    /// Devices currently told to run the new release.
    pub on_new: BTreeSet<DeviceId>,
    pub phase: Phase,
    pub paused: bool,
    /// When every device of the current wave first became healthy (soak start).
    pub soak_start: Option<u64>,
    /// Human-readable history: (time, event).
    pub history: Vec<(u64, String)>,
    /// Each member's own time zone (its `tz` label), for windows that follow the device's clock.
    pub device_zones: BTreeMap<DeviceId, String>,
    /// Members the hub last saw offline.
    pub offline: BTreeSet<DeviceId>,
    /// Each member's disruption-budget groups: (budget index, group key).
    pub groups: BTreeMap<DeviceId, Vec<(usize, String)>>,
    /// Devices per group key in the fleet, for percentage budgets.
    pub group_sizes: BTreeMap<String, u32>,
    /// When each wave started and ended.
    pub wave_times: Vec<WaveTimes>,
    /// Every health-gate evaluation: at each wave's end, and the one that halted the rollout.
    pub gates: Vec<GateEval>,
    /// Operator commands with who gave them.
    pub operators: Vec<OperatorAction>,
    pub started_at: u64,
    pub finished_at: Option<u64>,
    /// Devices unavailable outside this rollout, per group; refreshed by the hub before every call, never stored.
    #[serde(skip)]
    pub elsewhere: Elsewhere,
    #[serde(skip)]
    actions: VecDeque<Action>,
}

impl Rollout {
    /// Plans waves over `members` (device, region), all online, and starts wave 0.
    pub fn start(plan: Plan, members: &[(DeviceId, Option<String>)], now: u64) -> Self {
        let members: Vec<Member> = members
            .iter()
            .map(|(id, region)| Member::new(id.clone(), region.clone()))
            .collect();
        Self::begin(plan, members, &BTreeMap::new(), now)
    }

    /// Plans waves over `members` and starts wave 0. Blocked members take no wave; `fleet_group_sizes` gives the
    /// size of each disruption-budget group in the whole fleet (groups missing from it count this rollout's
    /// members).
    pub fn begin(
        plan: Plan,
        members: Vec<Member>,
        fleet_group_sizes: &BTreeMap<String, u32>,
        now: u64,
    ) -> Self {
        let mut regions = BTreeMap::new();
        let mut status = BTreeMap::new();
        let mut device_zones = BTreeMap::new();
        let mut offline = BTreeSet::new();
        let mut groups: BTreeMap<DeviceId, Vec<(usize, String)>> = BTreeMap::new();
        let mut group_sizes: BTreeMap<String, u32> = BTreeMap::new();
        let mut eligible = BTreeMap::new();
        for m in members {
            let keys: Vec<(usize, String)> = plan
                .budgets
                .iter()
                .enumerate()
                .filter_map(|(i, b)| Some((i, b.group_of(m.zone.as_deref(), &m.labels)?)))
                .collect();
            for (_, key) in &keys {
                *group_sizes.entry(key.clone()).or_default() += 1;
            }
            if !keys.is_empty() {
                groups.insert(m.id.clone(), keys);
            }
            if let Some(tz) = m.tz {
                device_zones.insert(m.id.clone(), tz);
            }
            if !m.online {
                offline.insert(m.id.clone());
            }
            match m.blocked {
                Some(reason) => status.insert(m.id.clone(), DeviceStatus::Blocked { reason }),
                None => {
                    eligible.insert(m.id.clone(), m.region.clone());
                    status.insert(m.id.clone(), DeviceStatus::Pending)
                }
            };
            regions.insert(m.id, m.region);
        }
        for (key, size) in &mut group_sizes {
            if let Some(fleet) = fleet_group_sizes.get(key) {
                *size = (*size).max(*fleet);
            }
        }
        let waves = plan_waves(&plan.waves, &eligible);
        let blocked = regions.len() - eligible.len();
        let mut r = Self {
            plan,
            wave_times: vec![WaveTimes::default(); waves.len()],
            waves,
            regions,
            status,
            device_zones,
            offline,
            groups,
            group_sizes,
            phase: Phase::Wave(0),
            started_at: now,
            ..Self::default()
        };
        let sizes: Vec<String> = r.waves.iter().map(|w| w.len().to_string()).collect();
        let left_out = if blocked > 0 {
            format!("; {blocked} devices left out where the release failed before")
        } else {
            String::new()
        };
        r.log(
            now,
            format!(
                "started: {} waves of sizes [{}]{left_out}",
                r.waves.len(),
                sizes.join(", ")
            ),
        );
        // With budgets, the first devices start at the first tick, once the hub has said what is out of service
        // elsewhere (`refresh_elsewhere`); without, at once.
        if r.plan.budgets.is_empty() {
            r.step(now);
        }
        r
    }

    /// The stored form: self-describing JSON, so a field added later decodes from older snapshots by its default.
    pub fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a snapshot the hub stored: JSON, or one of the positional (postcard) layouts of earlier hubs, so a
    /// hub upgraded mid-rollout continues it.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, SnapshotError> {
        if bytes.first() == Some(&b'{') {
            return serde_json::from_slice(bytes).map_err(|e| SnapshotError(e.to_string()));
        }
        postcard::from_bytes::<legacy::RolloutV2>(bytes)
            .map(legacy::RolloutV2::upgrade)
            .or_else(|e| {
                postcard::from_bytes::<legacy::RolloutV1>(bytes)
                    .map(legacy::RolloutV1::upgrade)
                    .map_err(|_| SnapshotError(e.to_string()))
            })
    }

    fn log(&mut self, now: u64, what: String) {
        self.history.push((now, what));
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Completed | Phase::Aborted { .. })
    }

    /// The wave a device belongs to.
    pub fn wave_of(&self, device: &DeviceId) -> Option<usize> {
        self.waves.iter().position(|w| w.contains(device))
    }

    /// Whether a device stays on the previous release once this rollout is finished: it failed, was left out,
    /// skipped or rolled back. Everyone else of a completed rollout runs the new one.
    pub fn keeps_previous(&self, device: &DeviceId) -> bool {
        match &self.phase {
            Phase::Aborted { .. } => true,
            _ => matches!(
                self.status.get(device),
                Some(
                    DeviceStatus::Failed { .. }
                        | DeviceStatus::Blocked { .. }
                        | DeviceStatus::Skipped
                        | DeviceStatus::RolledBack { .. }
                )
            ),
        }
    }

    /// Devices that should stage the new release now (`pre_download`): those of the current wave (or the one
    /// awaiting approval) and the next that have not been moved yet, inside the download window.
    pub fn due_for_staging(&self, now: u64) -> Vec<DeviceId> {
        if !self.plan.pre_download {
            return vec![];
        }
        let w = match self.phase {
            Phase::Wave(w) | Phase::AwaitingApproval(w) => w,
            Phase::Completed | Phase::Aborted { .. } => return vec![],
        };
        self.waves
            .iter()
            .skip(w)
            .take(2)
            .flatten()
            .filter(|d| {
                matches!(
                    self.status.get(*d),
                    Some(
                        DeviceStatus::Pending
                            | DeviceStatus::WaitingForWindow
                            | DeviceStatus::WaitingForBudget { .. }
                    )
                )
            })
            .filter(|d| {
                self.plan.download_window.as_ref().is_none_or(|win| {
                    win.contains(now, self.device_zones.get(*d).map(String::as_str))
                })
            })
            .cloned()
            .collect()
    }

    /// Whether any member stays on the previous release ([`Rollout::keeps_previous`]).
    pub fn keeps_any_previous(&self) -> bool {
        self.status.keys().any(|d| self.keeps_previous(d))
    }

    /// The next time [`Rollout::tick`] has something to do.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.is_finished() {
            return None;
        }
        let mut t: Option<u64> = self.soak_start.map(|s| s + self.plan.soak_secs);
        for s in self.status.values() {
            let due = match s {
                DeviceStatus::Updating { since } => Some(since + self.plan.report_timeout_secs),
                DeviceStatus::Held { since, .. } => Some(since + self.plan.max_hold_secs),
                DeviceStatus::Undetermined { since } => Some(since + self.plan.offline_grace_secs),
                _ => None,
            };
            t = match (t, due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        t
    }

    /// A device's report, interpreted. Only devices on the new release are judged. A report also says the device
    /// is online.
    pub fn observe(&mut self, now: u64, device: &DeviceId, obs: Observation) {
        self.offline.remove(device);
        if self.is_finished() || !self.on_new.contains(device) {
            return;
        }
        let Some(current) = self.status.get(device).cloned() else {
            return;
        };
        let next = match (&current, obs) {
            (
                DeviceStatus::Updating { .. }
                | DeviceStatus::Held { .. }
                | DeviceStatus::Undetermined { .. },
                Observation::Healthy,
            ) => DeviceStatus::Healthy { since: now },
            (
                DeviceStatus::Updating { .. }
                | DeviceStatus::Healthy { .. }
                | DeviceStatus::Held { .. }
                | DeviceStatus::Undetermined { .. },
                Observation::Unhealthy(r),
            ) => DeviceStatus::Failed { reason: r },
            (DeviceStatus::Updating { .. }, Observation::Held(reason)) => {
                DeviceStatus::Held { since: now, reason }
            }
            _ => return,
        };
        if next != current {
            self.log(now, format!("{device}: {next}"));
            if let DeviceStatus::Failed { reason } = &next {
                // A failed device goes back at once; the gate decides whether the rollout continues.
                self.revert(device);
                self.actions.push_back(Action::RememberFailure {
                    device: device.clone(),
                    reason: reason.clone(),
                });
            }
            self.status.insert(device.clone(), next);
        }
        self.step(now);
    }

    /// The hub saw a member go offline or come back. An updating device that goes offline is undetermined (not
    /// failed); one that comes back is updating again, with a fresh report timeout.
    pub fn set_online(&mut self, now: u64, device: &DeviceId, online: bool) {
        if !self.regions.contains_key(device) {
            return;
        }
        let changed = if online {
            self.offline.remove(device)
        } else {
            self.offline.insert(device.clone())
        };
        if !changed || self.is_finished() {
            return;
        }
        let next = match (self.status.get(device), online) {
            (Some(DeviceStatus::Updating { .. }), false) => {
                Some(DeviceStatus::Undetermined { since: now })
            }
            (Some(DeviceStatus::Undetermined { .. }), true) => {
                Some(DeviceStatus::Updating { since: now })
            }
            _ => None,
        };
        if let Some(next) = next {
            self.log(now, format!("{device}: {next}"));
            self.status.insert(device.clone(), next);
        }
        self.step(now);
    }

    /// Timeouts, windows, budgets and soak progress.
    pub fn tick(&mut self, now: u64) {
        if self.is_finished() {
            return;
        }
        let ids: Vec<DeviceId> = self.status.keys().cloned().collect();
        for id in ids {
            let next = match self.status.get(&id) {
                Some(DeviceStatus::Updating { since })
                    if now >= since + self.plan.report_timeout_secs =>
                {
                    Some(DeviceStatus::Failed {
                        reason: format!("not healthy within {} s", self.plan.report_timeout_secs),
                    })
                }
                Some(DeviceStatus::Held { since, .. })
                    if now >= since + self.plan.max_hold_secs =>
                {
                    Some(match self.plan.on_hold_deadline {
                        HoldDeadline::Fail => DeviceStatus::Failed {
                            reason: "held past the deadline".into(),
                        },
                        HoldDeadline::Proceed => DeviceStatus::Skipped,
                    })
                }
                Some(DeviceStatus::Undetermined { since })
                    if self.plan.offline_is_failure
                        && now >= since + self.plan.offline_grace_secs =>
                {
                    Some(DeviceStatus::Failed {
                        reason: format!("offline for {} s", self.plan.offline_grace_secs),
                    })
                }
                Some(DeviceStatus::WaitingForWindow | DeviceStatus::WaitingForBudget { .. }) => {
                    Some(DeviceStatus::Pending)
                }
                _ => None,
            };
            if let Some(next) = next {
                if matches!(next, DeviceStatus::Failed { .. } | DeviceStatus::Skipped) {
                    self.log(now, format!("{id}: {next}"));
                    self.revert(&id);
                }
                // Only a release that did not come up healthy in time is remembered; a hold or an offline device
                // says nothing about the release.
                if let (Some(DeviceStatus::Updating { .. }), DeviceStatus::Failed { reason }) =
                    (self.status.get(&id), &next)
                {
                    self.actions.push_back(Action::RememberFailure {
                        device: id.clone(),
                        reason: reason.clone(),
                    });
                }
                self.status.insert(id, next);
            }
        }
        self.step(now);
    }

    /// Pause, resume, abort or approve, by `who`.
    pub fn command(&mut self, now: u64, cmd: Command, who: &str) -> Result<(), CommandError> {
        match (&self.phase, cmd) {
            (Phase::Completed, _) => return Err(CommandError::Finished("completed")),
            (Phase::Aborted { .. }, _) => return Err(CommandError::Finished("aborted")),
            (_, Command::Pause) if self.paused => return Err(CommandError::AlreadyPaused),
            (_, Command::Pause) => self.paused = true,
            (_, Command::Resume) if !self.paused => return Err(CommandError::NotPaused),
            (_, Command::Resume) => self.paused = false,
            (_, Command::Abort) => {
                self.operators.push(OperatorAction {
                    at: now,
                    who: who.to_owned(),
                    command: format!("{cmd:?}").to_lowercase(),
                });
                self.abort(now, format!("aborted by the operator ({who})"));
                return Ok(());
            }
            (Phase::AwaitingApproval(next), Command::Approve) => {
                let next = *next;
                self.phase = Phase::Wave(next);
                self.wave_started(next, now);
            }
            (_, Command::Approve) => return Err(CommandError::NotAwaitingApproval),
        }
        self.operators.push(OperatorAction {
            at: now,
            who: who.to_owned(),
            command: format!("{cmd:?}").to_lowercase(),
        });
        self.log(now, format!("operator {who}: {cmd:?}"));
        self.step(now);
        Ok(())
    }

    /// Gives devices that failed, were left out or skipped another chance (all of them when `devices` is
    /// empty). A finished rollout that completed is reopened at its last wave for them; an aborted one is not
    /// (the hub still forgets the failures, so the next rollout includes the devices). Returns the devices retried.
    pub fn retry(
        &mut self,
        now: u64,
        devices: &[DeviceId],
        who: &str,
    ) -> Result<Vec<DeviceId>, CommandError> {
        if let Phase::Aborted { .. } = self.phase {
            return Err(CommandError::Finished("aborted"));
        }
        let chosen: Vec<DeviceId> = self
            .status
            .iter()
            .filter(|(d, _)| devices.is_empty() || devices.contains(d))
            .filter(|(_, s)| {
                matches!(
                    s,
                    DeviceStatus::Failed { .. }
                        | DeviceStatus::Blocked { .. }
                        | DeviceStatus::Skipped
                )
            })
            .map(|(d, _)| d.clone())
            .collect();
        if chosen.is_empty() {
            return Err(CommandError::NothingToRetry);
        }
        for d in &chosen {
            if self.wave_of(d).is_none() {
                // Left out at the start: it joins the last wave.
                match self.waves.last_mut() {
                    Some(w) => w.push(d.clone()),
                    None => {
                        self.waves.push(vec![d.clone()]);
                        self.wave_times.push(WaveTimes::default());
                    }
                }
            }
            self.status.insert(d.clone(), DeviceStatus::Pending);
        }
        if self.phase == Phase::Completed {
            let last = self.waves.len().saturating_sub(1);
            self.phase = Phase::Wave(last);
            self.finished_at = None;
            if let Some(t) = self.wave_times.get_mut(last) {
                t.ended = None;
            }
            self.log(now, format!("reopened at wave {} for a retry", last + 1));
        }
        self.operators.push(OperatorAction {
            at: now,
            who: who.to_owned(),
            command: format!(
                "retry {}",
                chosen
                    .iter()
                    .map(|d| d.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        });
        self.log(
            now,
            format!("operator {who}: retry {} devices", chosen.len()),
        );
        self.step(now);
        Ok(chosen)
    }

    fn revert(&mut self, device: &DeviceId) {
        if self.on_new.remove(device) {
            self.actions.push_back(Action::Assign {
                device: device.clone(),
                version: Version::Old,
            });
        }
    }

    fn wave_started(&mut self, wave: usize, now: u64) {
        // Snapshots of earlier hubs have no wave times.
        if self.wave_times.len() < self.waves.len() {
            self.wave_times
                .resize(self.waves.len(), WaveTimes::default());
        }
        if let Some(t) = self.wave_times.get_mut(wave)
            && t.started.is_none()
        {
            t.started = Some(now);
        }
    }

    fn finish(&mut self, now: u64, phase: Phase) {
        self.phase = phase;
        self.finished_at = Some(now);
        self.soak_start = None;
    }

    fn abort(&mut self, now: u64, reason: String) {
        // Devices that failed went back to the old release the moment they failed; they are rolled back as much
        // as the ones still on the new release, and are counted and shown as such.
        let failed: Vec<(DeviceId, String)> = self
            .status
            .iter()
            .filter_map(|(d, s)| match s {
                DeviceStatus::Failed { reason } => Some((d.clone(), reason.clone())),
                _ => None,
            })
            .collect();
        self.log(
            now,
            format!(
                "aborted: {reason}; rolling back {} devices ({} of them already back after failing)",
                self.on_new.len() + failed.len(),
                failed.len()
            ),
        );
        for (d, why) in failed {
            self.status.insert(
                d,
                DeviceStatus::RolledBack {
                    reason: format!("failed ({why}), then the rollout was aborted"),
                },
            );
        }
        for d in std::mem::take(&mut self.on_new) {
            self.actions.push_back(Action::Assign {
                device: d.clone(),
                version: Version::Old,
            });
            self.status.insert(
                d,
                DeviceStatus::RolledBack {
                    reason: reason.clone(),
                },
            );
        }
        if let Phase::Wave(w) | Phase::AwaitingApproval(w) = self.phase
            && let Some(t) = self.wave_times.get_mut(w)
        {
            t.ended.get_or_insert(now);
        }
        self.finish(now, Phase::Aborted { reason });
    }

    fn window_open(&self, device: &DeviceId, now: u64) -> bool {
        let region = self.regions.get(device).cloned().flatten();
        region
            .and_then(|r| self.plan.windows.get(&r))
            .is_none_or(|w| w.contains(now, self.device_zones.get(device).map(String::as_str)))
    }

    /// Whether this rollout has a device out of service right now (updating, or offline at its turn): what other
    /// rollouts' disruption budgets count.
    pub fn is_unavailable(&self, device: &DeviceId) -> bool {
        !self.is_finished()
            && self
                .status
                .get(device)
                .is_some_and(DeviceStatus::unavailable)
    }

    /// Recomputes which of this rollout's budgeted devices are out of service outside it (`unavailable_elsewhere`
    /// answers for one device: offline, unhealthy, or updating in another rollout). The hub calls it before
    /// driving the rollout; a rollout without budgets skips it.
    pub fn refresh_elsewhere(&mut self, unavailable_elsewhere: impl Fn(&DeviceId) -> bool) {
        self.elsewhere.clear();
        for (d, keys) in &self.groups {
            if unavailable_elsewhere(d) {
                for (_, key) in keys {
                    self.elsewhere
                        .entry(key.clone())
                        .or_default()
                        .insert(d.clone());
                }
            }
        }
    }

    /// Devices unavailable in this rollout, per budget group.
    fn unavailable_by_group(&self) -> BTreeMap<String, BTreeSet<DeviceId>> {
        let mut out: BTreeMap<String, BTreeSet<DeviceId>> = BTreeMap::new();
        for (d, keys) in &self.groups {
            if self.status.get(d).is_some_and(DeviceStatus::unavailable) {
                for (_, key) in keys {
                    out.entry(key.clone()).or_default().insert(d.clone());
                }
            }
        }
        out
    }

    /// Whether an undetermined device's grace is over, so its wave is judged without it.
    fn grace_over(&self, status: Option<&DeviceStatus>, now: u64) -> bool {
        matches!(status, Some(DeviceStatus::Undetermined { since }) if now >= since + self.plan.offline_grace_secs)
    }

    /// Advances the current wave: gate check, assignments within limits, budgets and windows, completion and soak.
    fn step(&mut self, now: u64) {
        let Phase::Wave(w) = self.phase else { return };
        let Some(wave) = self.waves.get(w).cloned() else {
            self.log(now, "completed".into());
            self.finish(now, Phase::Completed);
            return;
        };
        self.wave_started(w, now);
        let count = |f: &dyn Fn(&DeviceStatus) -> bool| {
            wave.iter()
                .filter(|d| self.status.get(*d).is_some_and(f))
                .count()
        };
        let failed = count(&|s| matches!(s, DeviceStatus::Failed { .. }));
        // Devices offline past the grace are judged neither way: the ratio is over the devices that were judged.
        let undetermined = wave
            .iter()
            .filter(|d| self.grace_over(self.status.get(*d), now))
            .count();
        let judged = wave.len() - undetermined;
        if judged > 0 && failed as f64 / judged as f64 > self.plan.max_failure_ratio {
            let reason = format!("wave {w}: {failed} of {judged} devices failed the health gate");
            self.gates.push(GateEval {
                at: now,
                wave: w,
                passed: false,
                failed,
                undetermined,
                judged,
                detail: format!(
                    "{failed}/{judged} failed > max_failure_ratio {}",
                    self.plan.max_failure_ratio
                ),
            });
            self.abort(now, reason);
            return;
        }
        if !self.paused {
            // Devices of earlier waves that an operator retried start before this wave's own.
            let candidates: Vec<DeviceId> = self.waves[..=w].iter().flatten().cloned().collect();
            let mut in_flight = self
                .status
                .values()
                .filter(|s| matches!(s, DeviceStatus::Updating { .. }))
                .count();
            let mut busy = if self.plan.budgets.is_empty() {
                BTreeMap::new()
            } else {
                self.unavailable_by_group()
            };
            for d in &candidates {
                if self.plan.max_in_flight > 0 && in_flight >= self.plan.max_in_flight as usize {
                    break;
                }
                if !matches!(
                    self.status.get(d),
                    Some(DeviceStatus::Pending | DeviceStatus::WaitingForBudget { .. })
                ) {
                    continue;
                }
                if !self.window_open(d, now) {
                    self.status
                        .insert(d.clone(), DeviceStatus::WaitingForWindow);
                    continue;
                }
                let groups = self.groups.get(d).map(Vec::as_slice).unwrap_or_default();
                if let Some(group) = budget::blocking_group(
                    &self.plan.budgets,
                    groups,
                    &self.group_sizes,
                    &busy,
                    &self.elsewhere,
                ) {
                    let next = DeviceStatus::WaitingForBudget {
                        group: group.to_owned(),
                    };
                    self.status.insert(d.clone(), next);
                    continue;
                }
                for (_, key) in groups {
                    busy.entry(key.clone()).or_default().insert(d.clone());
                }
                // A device offline at its turn is told the new release all the same (it takes it when it comes
                // back) but is undetermined: it does not hold up the wave beyond the grace, nor count in flight.
                let next = if self.offline.contains(d) {
                    DeviceStatus::Undetermined { since: now }
                } else {
                    in_flight += 1;
                    DeviceStatus::Updating { since: now }
                };
                if matches!(next, DeviceStatus::Undetermined { .. }) {
                    self.log(now, format!("{d}: {next}"));
                }
                self.status.insert(d.clone(), next);
                self.on_new.insert(d.clone());
                self.actions.push_back(Action::Assign {
                    device: d.clone(),
                    version: Version::New,
                });
            }
        }
        // Devices of earlier waves count too: a retried device, or one back from offline and updating now.
        let settled = self.waves[..=w].iter().flatten().all(|d| {
            let s = self.status.get(d);
            self.grace_over(s, now)
                || matches!(
                    s,
                    Some(
                        DeviceStatus::Healthy { .. }
                            | DeviceStatus::Failed { .. }
                            | DeviceStatus::Skipped
                            | DeviceStatus::Blocked { .. }
                    )
                )
        });
        if !settled {
            self.soak_start = None;
            return;
        }
        let start = *self.soak_start.get_or_insert(now);
        if now < start + self.plan.soak_secs || self.paused {
            return;
        }
        self.soak_start = None;
        self.gates.push(GateEval {
            at: now,
            wave: w,
            passed: true,
            failed,
            undetermined,
            judged,
            detail: format!(
                "{failed}/{judged} failed <= max_failure_ratio {}, soaked {} s",
                self.plan.max_failure_ratio, self.plan.soak_secs
            ),
        });
        if let Some(t) = self.wave_times.get_mut(w) {
            t.ended = Some(now);
        }
        let undetermined_note = if undetermined > 0 {
            format!(", {undetermined} undetermined")
        } else {
            String::new()
        };
        self.log(
            now,
            format!("wave {w} done ({failed} failed of {judged}{undetermined_note})"),
        );
        let next = w + 1;
        if next >= self.waves.len() {
            self.log(now, "completed".into());
            self.finish(now, Phase::Completed);
        } else if self.plan.manual_approval {
            self.phase = Phase::AwaitingApproval(next);
        } else {
            self.phase = Phase::Wave(next);
            self.step(now);
        }
    }
}

/// Why a stored snapshot could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rollout snapshot does not decode: {0}")]
pub struct SnapshotError(String);

/// Splits devices into waves. Deterministic: devices are taken in id order within each region.
pub fn plan_waves(
    waves: &[Wave],
    regions: &BTreeMap<DeviceId, Option<String>>,
) -> Vec<Vec<DeviceId>> {
    let mut remaining: BTreeSet<DeviceId> = regions.keys().cloned().collect();
    let mut out = Vec::new();
    for wave in waves {
        let chosen: Vec<DeviceId> = match wave {
            Wave::Canary { percent } => {
                let mut by_region: BTreeMap<Option<&String>, Vec<&DeviceId>> = BTreeMap::new();
                for d in &remaining {
                    by_region
                        .entry(regions.get(d).and_then(|r| r.as_ref()))
                        .or_default()
                        .push(d);
                }
                by_region
                    .values()
                    .flat_map(|ds| {
                        let n = (ds.len() * (*percent).min(100) as usize)
                            .div_ceil(100)
                            .max(1);
                        ds.iter().take(n).map(|d| (*d).clone()).collect::<Vec<_>>()
                    })
                    .collect()
            }
            Wave::Regions(rs) => remaining
                .iter()
                .filter(|d| {
                    regions
                        .get(*d)
                        .cloned()
                        .flatten()
                        .is_some_and(|r| rs.contains(&r))
                })
                .cloned()
                .collect(),
            Wave::Rest => remaining.iter().cloned().collect(),
        };
        for d in &chosen {
            remaining.remove(d);
        }
        if !chosen.is_empty() {
            out.push(chosen);
        }
    }
    out
}
