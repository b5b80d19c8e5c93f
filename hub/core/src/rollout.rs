//! Progressive rollouts as a sans-IO state machine: ordered waves (canary per region, named regions, the rest),
//! a max number of devices in flight, a soak time, health gates with a failure-ratio threshold and report
//! timeouts, automatic abort with rollback, operator commands (pause, resume, abort, approve), maintenance windows
//! per region in local time, and device-side holds with a deadline policy.
//!
//! Driven as `observe/command/tick(now, ..)`, then `poll_action()` until `None`. Time is unix seconds passed in.
//! The whole state is plain data (`serde`) so the hub persists a snapshot after every transition and a restarted
//! hub continues exactly where it was: actions already emitted are never emitted again.

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

/// Whose clock a maintenance window reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Clock {
    /// A fixed offset from UTC, in minutes (no daylight saving time).
    Offset(i32),
    /// An IANA time zone (`Europe/Berlin`), daylight saving time included, from the bundled time-zone database.
    Zone(String),
}

/// A weekly maintenance window in local wall-clock time.
///
/// Daylight saving time follows the wall clock: on the night clocks go forward, a window inside the skipped hour
/// does not open at all and one spanning it is an hour shorter; on the night they go back, a window inside the
/// repeated hour is open through both passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub clock: Clock,
    /// Bit 0 = Monday ... bit 6 = Sunday.
    pub days: u8,
    /// Minutes since local midnight; `end < start` spans midnight.
    pub start_min: u32,
    pub end_min: u32,
    /// Read each device's own time zone (its `tz` label) instead, where it names a valid zone; `clock` is the
    /// fallback. A wave spanning time zones then updates every device in its own night.
    pub device_zone: bool,
}

/// (weekday with Monday = 0, minute of the day) of `now` on a clock.
fn wall_clock(clock: &Clock, now: u64) -> Option<(u32, u32)> {
    match clock {
        Clock::Offset(min) => {
            let local = i64::try_from(now).ok()? + i64::from(*min) * 60;
            // 1970-01-01 was a Thursday (weekday index 3 with Monday = 0).
            let weekday = u32::try_from((local.div_euclid(86_400) + 3).rem_euclid(7)).ok()?;
            let minute = u32::try_from(local.rem_euclid(86_400) / 60).ok()?;
            Some((weekday, minute))
        }
        Clock::Zone(name) => {
            let tz = jiff::tz::TimeZone::get(name).ok()?;
            let t = jiff::Timestamp::from_second(i64::try_from(now).ok()?).ok()?;
            let local = tz.to_datetime(t);
            let weekday = u32::from(local.weekday().to_monday_zero_offset().unsigned_abs());
            let minute = u32::from(local.hour().unsigned_abs()) * 60
                + u32::from(local.minute().unsigned_abs());
            Some((weekday, minute))
        }
    }
}

/// Whether `name` is a time zone the bundled database knows.
pub fn is_time_zone(name: &str) -> bool {
    jiff::tz::TimeZone::get(name).is_ok()
}

impl Window {
    /// Whether `now` (unix seconds) falls inside the window, for a device whose own time zone is `device_tz`.
    pub fn contains(&self, now: u64, device_tz: Option<&str>) -> bool {
        let own = device_tz
            .filter(|_| self.device_zone)
            .filter(|z| is_time_zone(z))
            .map(|z| Clock::Zone(z.to_owned()));
        let Some((weekday, minute)) = wall_clock(own.as_ref().unwrap_or(&self.clock), now) else {
            return false;
        };
        let open_on = |wd: u32| self.days & (1 << wd) != 0;
        if self.start_min <= self.end_min {
            open_on(weekday) && minute >= self.start_min && minute < self.end_min
        } else {
            (open_on(weekday) && minute >= self.start_min)
                || (open_on((weekday + 6) % 7) && minute < self.end_min)
        }
    }
}

/// What happens when a device holds an update past the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldDeadline {
    /// The device counts as failed (and may trip the gate).
    Fail,
    /// The rollout proceeds without the device; it stays on its current version.
    Proceed,
}

/// The rollout plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub waves: Vec<Wave>,
    /// Seconds every device of a wave must stay healthy before the wave counts as done.
    pub soak_secs: u64,
    /// Devices updating at the same time (0 = no limit).
    pub max_in_flight: u32,
    /// Abort when failed devices / wave size exceeds this.
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
}

impl DeviceStatus {
    /// A short name for tables and APIs: `pending`, `waiting-for-window`, `updating`, `healthy`, `held`,
    /// `failed`, `skipped`, `rolled-back`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::WaitingForWindow => "waiting-for-window",
            Self::Updating { .. } => "updating",
            Self::Healthy { .. } => "healthy",
            Self::Held { .. } => "held",
            Self::Failed { .. } => "failed",
            Self::Skipped => "skipped",
            Self::RolledBack { .. } => "rolled-back",
        }
    }

    /// Why, for the states that have a reason.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Held { reason, .. } | Self::Failed { reason } | Self::RolledBack { reason } => {
                Some(reason)
            }
            _ => None,
        }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    Assign { device: DeviceId, version: Version },
}

/// The rollout's overall phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    Wave(usize),
    AwaitingApproval(usize),
    Completed,
    Aborted { reason: String },
}

/// A rollout in progress (or finished). Plain data: snapshot it with serde after every call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    #[serde(skip)]
    actions: VecDeque<Action>,
}

impl Rollout {
    /// Plans waves over `members` (device, region) and starts wave 0.
    pub fn start(plan: Plan, members: &[(DeviceId, Option<String>)], now: u64) -> Self {
        Self::start_with_zones(plan, members, BTreeMap::new(), now)
    }

    /// [`Rollout::start`], with the members' own time zones (for windows with `device_zone`).
    pub fn start_with_zones(
        plan: Plan,
        members: &[(DeviceId, Option<String>)],
        device_zones: BTreeMap<DeviceId, String>,
        now: u64,
    ) -> Self {
        let regions: BTreeMap<DeviceId, Option<String>> = members.iter().cloned().collect();
        let waves = plan_waves(&plan.waves, &regions);
        let status = regions
            .keys()
            .map(|d| (d.clone(), DeviceStatus::Pending))
            .collect();
        let mut r = Self {
            plan,
            waves,
            regions,
            status,
            on_new: BTreeSet::new(),
            phase: Phase::Wave(0),
            paused: false,
            soak_start: None,
            history: vec![],
            device_zones,
            actions: VecDeque::new(),
        };
        let sizes: Vec<String> = r.waves.iter().map(|w| w.len().to_string()).collect();
        r.log(
            now,
            format!(
                "started: {} waves of sizes [{}]",
                r.waves.len(),
                sizes.join(", ")
            ),
        );
        r.step(now);
        r
    }

    /// Decodes a snapshot the hub stored (postcard), also in the layout before windows had time zones (a fixed
    /// offset, no device clocks), so a hub upgraded mid-rollout continues it.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes::<Self>(bytes).or_else(|e| {
            postcard::from_bytes::<legacy::RolloutV1>(bytes)
                .map(legacy::RolloutV1::upgrade)
                .map_err(|_| e)
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
                _ => None,
            };
            t = match (t, due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        t
    }

    /// A device's report, interpreted. Only devices on the new release are judged.
    pub fn observe(&mut self, now: u64, device: &DeviceId, obs: Observation) {
        if self.is_finished() || !self.on_new.contains(device) {
            return;
        }
        let Some(current) = self.status.get(device).cloned() else {
            return;
        };
        let next = match (&current, obs) {
            (DeviceStatus::Updating { .. } | DeviceStatus::Held { .. }, Observation::Healthy) => {
                DeviceStatus::Healthy { since: now }
            }
            (
                DeviceStatus::Updating { .. }
                | DeviceStatus::Healthy { .. }
                | DeviceStatus::Held { .. },
                Observation::Unhealthy(r),
            ) => DeviceStatus::Failed { reason: r },
            (DeviceStatus::Updating { .. }, Observation::Held(reason)) => {
                DeviceStatus::Held { since: now, reason }
            }
            _ => return,
        };
        if next != current {
            self.log(now, format!("{device}: {next}"));
            if let DeviceStatus::Failed { .. } = next {
                // A failed device goes back at once; the gate decides whether the rollout continues.
                self.revert(device);
            }
            self.status.insert(device.clone(), next);
        }
        self.step(now);
    }

    /// Timeouts, windows and soak progress.
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
                Some(DeviceStatus::WaitingForWindow) => Some(DeviceStatus::Pending),
                _ => None,
            };
            if let Some(next) = next {
                if matches!(next, DeviceStatus::Failed { .. } | DeviceStatus::Skipped) {
                    self.log(now, format!("{id}: {next:?}"));
                    self.revert(&id);
                }
                self.status.insert(id, next);
            }
        }
        self.step(now);
    }

    pub fn command(&mut self, now: u64, cmd: Command) -> Result<(), CommandError> {
        match (&self.phase, cmd) {
            (Phase::Completed, _) => return Err(CommandError::Finished("completed")),
            (Phase::Aborted { .. }, _) => return Err(CommandError::Finished("aborted")),
            (_, Command::Pause) if self.paused => return Err(CommandError::AlreadyPaused),
            (_, Command::Pause) => self.paused = true,
            (_, Command::Resume) if !self.paused => return Err(CommandError::NotPaused),
            (_, Command::Resume) => self.paused = false,
            (_, Command::Abort) => {
                self.abort(now, "aborted by the operator".into());
                return Ok(());
            }
            (Phase::AwaitingApproval(next), Command::Approve) => self.phase = Phase::Wave(*next),
            (_, Command::Approve) => return Err(CommandError::NotAwaitingApproval),
        }
        self.log(now, format!("operator: {cmd:?}"));
        self.step(now);
        Ok(())
    }

    fn revert(&mut self, device: &DeviceId) {
        if self.on_new.remove(device) {
            self.actions.push_back(Action::Assign {
                device: device.clone(),
                version: Version::Old,
            });
        }
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
        self.phase = Phase::Aborted { reason };
        self.soak_start = None;
    }

    fn window_open(&self, device: &DeviceId, now: u64) -> bool {
        let region = self.regions.get(device).cloned().flatten();
        region
            .and_then(|r| self.plan.windows.get(&r))
            .is_none_or(|w| w.contains(now, self.device_zones.get(device).map(String::as_str)))
    }

    /// Advances the current wave: gate check, assignments within limits and windows, completion and soak.
    fn step(&mut self, now: u64) {
        let Phase::Wave(w) = self.phase else { return };
        let Some(wave) = self.waves.get(w).cloned() else {
            self.phase = Phase::Completed;
            self.log(now, "completed".into());
            return;
        };
        let failed = wave
            .iter()
            .filter(|d| matches!(self.status.get(*d), Some(DeviceStatus::Failed { .. })))
            .count();
        if !wave.is_empty() && failed as f64 / wave.len() as f64 > self.plan.max_failure_ratio {
            self.abort(
                now,
                format!(
                    "wave {w}: {failed} of {} devices failed the health gate",
                    wave.len()
                ),
            );
            return;
        }
        if !self.paused {
            let mut in_flight = self
                .status
                .values()
                .filter(|s| matches!(s, DeviceStatus::Updating { .. }))
                .count();
            for d in &wave {
                if self.plan.max_in_flight > 0 && in_flight >= self.plan.max_in_flight as usize {
                    break;
                }
                if self.status.get(d) != Some(&DeviceStatus::Pending) {
                    continue;
                }
                if !self.window_open(d, now) {
                    self.status
                        .insert(d.clone(), DeviceStatus::WaitingForWindow);
                    continue;
                }
                self.status
                    .insert(d.clone(), DeviceStatus::Updating { since: now });
                self.on_new.insert(d.clone());
                self.actions.push_back(Action::Assign {
                    device: d.clone(),
                    version: Version::New,
                });
                in_flight += 1;
            }
        }
        let settled = wave.iter().all(|d| {
            matches!(
                self.status.get(d),
                Some(
                    DeviceStatus::Healthy { .. }
                        | DeviceStatus::Failed { .. }
                        | DeviceStatus::Skipped
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
        self.log(
            now,
            format!("wave {w} done ({failed} failed of {})", wave.len()),
        );
        let next = w + 1;
        if next >= self.waves.len() {
            self.phase = Phase::Completed;
            self.log(now, "completed".into());
        } else if self.plan.manual_approval {
            self.phase = Phase::AwaitingApproval(next);
        } else {
            self.phase = Phase::Wave(next);
            self.step(now);
        }
    }
}

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

/// Snapshot layouts of earlier hubs, decoded once and upgraded.
mod legacy {
    use super::{
        BTreeMap, BTreeSet, Clock, DeviceId, DeviceStatus, HoldDeadline, Phase, Plan, Rollout,
        TelemetryGate, Wave, Window,
    };
    use serde::Deserialize;
    use std::collections::VecDeque;

    /// A window before time zones: a fixed UTC offset.
    #[derive(Deserialize)]
    struct WindowV1 {
        utc_offset_min: i32,
        days: u8,
        start_min: u32,
        end_min: u32,
    }

    #[derive(Deserialize)]
    struct PlanV1 {
        waves: Vec<Wave>,
        soak_secs: u64,
        max_in_flight: u32,
        max_failure_ratio: f64,
        report_timeout_secs: u64,
        manual_approval: bool,
        windows: BTreeMap<String, WindowV1>,
        max_hold_secs: u64,
        on_hold_deadline: HoldDeadline,
        telemetry_gates: Vec<TelemetryGate>,
    }

    #[derive(Deserialize)]
    pub(super) struct RolloutV1 {
        plan: PlanV1,
        waves: Vec<Vec<DeviceId>>,
        regions: BTreeMap<DeviceId, Option<String>>,
        status: BTreeMap<DeviceId, DeviceStatus>,
        on_new: BTreeSet<DeviceId>,
        phase: Phase,
        paused: bool,
        soak_start: Option<u64>,
        history: Vec<(u64, String)>,
    }

    impl RolloutV1 {
        pub(super) fn upgrade(self) -> Rollout {
            let p = self.plan;
            Rollout {
                plan: Plan {
                    waves: p.waves,
                    soak_secs: p.soak_secs,
                    max_in_flight: p.max_in_flight,
                    max_failure_ratio: p.max_failure_ratio,
                    report_timeout_secs: p.report_timeout_secs,
                    manual_approval: p.manual_approval,
                    windows: p
                        .windows
                        .into_iter()
                        .map(|(region, w)| {
                            let window = Window {
                                clock: Clock::Offset(w.utc_offset_min),
                                days: w.days,
                                start_min: w.start_min,
                                end_min: w.end_min,
                                device_zone: false,
                            };
                            (region, window)
                        })
                        .collect(),
                    max_hold_secs: p.max_hold_secs,
                    on_hold_deadline: p.on_hold_deadline,
                    telemetry_gates: p.telemetry_gates,
                },
                waves: self.waves,
                regions: self.regions,
                status: self.status,
                on_new: self.on_new,
                phase: self.phase,
                paused: self.paused,
                soak_start: self.soak_start,
                history: self.history,
                device_zones: BTreeMap::new(),
                actions: VecDeque::new(),
            }
        }
    }
}
