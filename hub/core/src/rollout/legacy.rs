//! Snapshot layouts of earlier hubs (positional postcard), decoded once and upgraded, so a hub upgraded in the
//! middle of a rollout continues it. Snapshots written since are self-describing JSON, where a new field needs only
//! a `#[serde(default)]`, so this list should not grow.

use super::{Clock, DeviceStatus, HoldDeadline, Phase, Plan, Rollout, TelemetryGate, Wave, Window};
use flotilla_shared::DeviceId;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// A window before time zones: a fixed UTC offset.
#[derive(Deserialize)]
struct WindowV1 {
    utc_offset_min: i32,
    days: u8,
    start_min: u32,
    end_min: u32,
}

impl WindowV1 {
    fn upgrade(self) -> Window {
        Window {
            clock: Clock::Offset(self.utc_offset_min),
            days: self.days,
            start_min: self.start_min,
            end_min: self.end_min,
            device_zone: false,
        }
    }
}

/// The plan of both postcard layouts, generic over the window type.
#[derive(Deserialize)]
struct PlanV<W> {
    waves: Vec<Wave>,
    soak_secs: u64,
    max_in_flight: u32,
    max_failure_ratio: f64,
    report_timeout_secs: u64,
    manual_approval: bool,
    windows: BTreeMap<String, W>,
    max_hold_secs: u64,
    on_hold_deadline: HoldDeadline,
    telemetry_gates: Vec<TelemetryGate>,
}

impl<W> PlanV<W> {
    fn upgrade(self, window: impl Fn(W) -> Window) -> Plan {
        Plan {
            waves: self.waves,
            soak_secs: self.soak_secs,
            max_in_flight: self.max_in_flight,
            max_failure_ratio: self.max_failure_ratio,
            report_timeout_secs: self.report_timeout_secs,
            manual_approval: self.manual_approval,
            windows: self
                .windows
                .into_iter()
                .map(|(r, w)| (r, window(w)))
                .collect(),
            max_hold_secs: self.max_hold_secs,
            on_hold_deadline: self.on_hold_deadline,
            telemetry_gates: self.telemetry_gates,
            ..Plan::default()
        }
    }
}

/// The first layout: windows with a fixed offset, no device clocks.
#[derive(Deserialize)]
pub(super) struct RolloutV1 {
    plan: PlanV<WindowV1>,
    waves: Vec<Vec<DeviceId>>,
    regions: BTreeMap<DeviceId, Option<String>>,
    status: BTreeMap<DeviceId, DeviceStatus>,
    on_new: BTreeSet<DeviceId>,
    phase: Phase,
    paused: bool,
    soak_start: Option<u64>,
    history: Vec<(u64, String)>,
}

/// The second layout: time-zone windows and device clocks (hubs of 2026-12-06).
#[derive(Deserialize)]
pub(super) struct RolloutV2 {
    plan: PlanV<Window>,
    waves: Vec<Vec<DeviceId>>,
    regions: BTreeMap<DeviceId, Option<String>>,
    status: BTreeMap<DeviceId, DeviceStatus>,
    on_new: BTreeSet<DeviceId>,
    phase: Phase,
    paused: bool,
    soak_start: Option<u64>,
    history: Vec<(u64, String)>,
    device_zones: BTreeMap<DeviceId, String>,
}

impl RolloutV1 {
    pub(super) fn upgrade(self) -> Rollout {
        Rollout {
            plan: self.plan.upgrade(WindowV1::upgrade),
            waves: self.waves,
            regions: self.regions,
            status: self.status,
            on_new: self.on_new,
            phase: self.phase,
            paused: self.paused,
            soak_start: self.soak_start,
            history: self.history,
            ..Rollout::default()
        }
    }
}

impl RolloutV2 {
    pub(super) fn upgrade(self) -> Rollout {
        // Those layouts had no offline handling: devices were all treated as online, which is what an empty
        // offline set says; wave times start unknown.
        Rollout {
            plan: self.plan.upgrade(|w| w),
            waves: self.waves,
            regions: self.regions,
            status: self.status,
            on_new: self.on_new,
            phase: self.phase,
            paused: self.paused,
            soak_start: self.soak_start,
            history: self.history,
            device_zones: self.device_zones,
            ..Rollout::default()
        }
    }
}
