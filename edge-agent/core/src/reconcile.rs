//! The reconciler: a sans-IO state machine that turns desired workloads and runtime events into start/stop actions.
//!
//! Driven as `handle_*(now, ..)`, then `poll_action()` until `None`, then sleep until `poll_timeout()`. Time is a
//! millisecond counter supplied by the shell. Invariant: at most one operation is in flight per workload; results of
//! superseded operations are ignored by their [`OpId`].

use flotilla_shared::wire::{
    ExitCause, HealthRule, RejectReason, RestartPolicy, UpdateStrategy, WorkloadSpec,
    WorkloadState, WorkloadStatus,
};
use flotilla_shared::{Digest, WorkloadName};
use std::collections::{BTreeMap, VecDeque};

/// Milliseconds on the shell's monotonic clock.
pub type Millis = u64;

/// Identifies one start or stop operation, so late results of superseded operations can be told apart.
pub type OpId = u64;

/// First restart delay; doubles per consecutive failure up to [`BACKOFF_MAX_MS`].
pub const BACKOFF_BASE_MS: Millis = 500;
pub const BACKOFF_MAX_MS: Millis = 60_000;
/// A workload that ran this long since its last start counts as recovered: its failure streak resets.
pub const RECOVERED_AFTER_MS: Millis = 30_000;

/// One workload as the accepted desired state wants it, annotated by the shell with what it knows locally.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredWorkload {
    pub spec: WorkloadSpec,
    /// The verified artifact to run, once it is in the local cache; `None` while downloading.
    pub artifact: Option<Digest>,
    /// Whether the device's position is inside the workload's geofence (always true without a fence).
    pub inside_fence: bool,
    /// Why the workload's release or artifact was refused, if it was; the previous version keeps running.
    pub rejected: Option<RejectReason>,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start {
        name: WorkloadName,
        op: OpId,
        spec: WorkloadSpec,
        artifact: Digest,
    },
    Stop {
        name: WorkloadName,
        op: OpId,
    },
}

/// Why a running workload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Ran to completion (a command-style guest returned from `_start` with status 0).
    Completed,
    Failed(String),
    /// Failed, and the runtime could tell how (exit code, OOM kill, failed health check).
    Ended(ExitCause),
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Idle,
    Starting,
    Running { since: Millis },
    Stopping,
    Completed,
    BackingOff { until: Millis },
    Failed,
}

#[derive(Debug, Clone)]
struct Slot {
    desired: Option<DesiredWorkload>,
    /// The spec and artifact that the runtime is running (or starting) right now.
    running: Option<(WorkloadSpec, Digest)>,
    phase: Phase,
    in_flight: Option<OpId>,
    /// The operation that launched the current run; exits are matched against it.
    start_op: Option<OpId>,
    failures: u32,
    restarts: u32,
    /// The next start is a restart (after a failure, or a completed run under `Always`).
    restart_pending: bool,
    /// The current run has been reported healthy (so the health transition triggers exactly one report).
    healthy_reported: bool,
    last_error: Option<String>,
    /// How the last failed run ended, when the runtime could tell.
    last_exit: Option<ExitCause>,
    /// The current start is loading its image (a container pulled or loaded into the engine).
    loading: bool,
}

impl Slot {
    fn new() -> Self {
        Self {
            desired: None,
            running: None,
            phase: Phase::Idle,
            in_flight: None,
            start_op: None,
            failures: 0,
            restarts: 0,
            restart_pending: false,
            healthy_reported: false,
            last_error: None,
            last_exit: None,
            loading: false,
        }
    }
}

/// The reconcile state machine for all workloads of one device.
#[derive(Debug, Default)]
pub struct Reconciler {
    slots: BTreeMap<WorkloadName, Slot>,
    actions: VecDeque<Action>,
    next_op: OpId,
    /// Set when something a report shows has changed; cleared by [`Reconciler::take_changed`].
    changed: bool,
}

fn backoff(failures: u32) -> Millis {
    let exp = failures.saturating_sub(1).min(16);
    (BACKOFF_BASE_MS << exp).min(BACKOFF_MAX_MS)
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the desired set. Workloads whose spec and artifact are unchanged are left alone (not restarted).
    pub fn set_desired(&mut self, now: Millis, desired: Vec<DesiredWorkload>) {
        let mut wanted: BTreeMap<WorkloadName, DesiredWorkload> = desired
            .into_iter()
            .map(|d| (d.spec.name.clone(), d))
            .collect();
        for (name, slot) in &mut self.slots {
            let next = wanted.remove(name);
            let same_target = match (&slot.desired, &next) {
                (Some(a), Some(b)) => a.spec == b.spec && a.artifact == b.artifact,
                (None, None) => true,
                _ => false,
            };
            if !same_target {
                // A new target gets a fresh failure budget and may run again even if the old one completed.
                slot.failures = 0;
                if matches!(
                    slot.phase,
                    Phase::Completed | Phase::Failed | Phase::BackingOff { .. }
                ) {
                    slot.phase = Phase::Idle;
                }
            }
            if slot.desired != next {
                self.changed = true;
            }
            slot.desired = next;
        }
        for (name, d) in wanted {
            let mut slot = Slot::new();
            slot.desired = Some(d);
            self.slots.insert(name, slot);
            self.changed = true;
        }
        self.reconcile(now);
    }

    /// A start or stop finished. Results for superseded operations are ignored.
    pub fn op_finished(
        &mut self,
        now: Millis,
        name: &WorkloadName,
        op: OpId,
        result: Result<(), String>,
    ) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        if slot.in_flight != Some(op) {
            return;
        }
        slot.in_flight = None;
        slot.loading = false;
        self.changed = true;
        match (&slot.phase, result) {
            (Phase::Starting, Ok(())) => {
                slot.phase = Phase::Running { since: now };
                slot.healthy_reported = false;
            }
            (Phase::Starting, Err(e)) => {
                slot.running = None;
                Self::fail(slot, now, e);
            }
            (Phase::Stopping, _) => {
                slot.running = None;
                slot.phase = Phase::Idle;
            }
            _ => {}
        }
        self.reconcile(now);
    }

    /// A running workload ended by itself (completed, trapped, killed by a limit).
    pub fn exited(&mut self, now: Millis, name: &WorkloadName, op: OpId, exit: Exit) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        // `op` is the id of the start that launched this run; an exit of an older run is stale.
        if slot.in_flight.is_some()
            || !matches!(slot.phase, Phase::Running { .. })
            || slot.start_op != Some(op)
        {
            return;
        }
        slot.running = None;
        self.changed = true;
        let policy = slot
            .desired
            .as_ref()
            .map_or(RestartPolicy::Never, |d| d.spec.restart);
        match exit {
            Exit::Completed => {
                slot.failures = 0;
                slot.last_error = None;
                slot.last_exit = None;
                slot.restart_pending = policy == RestartPolicy::Always;
                slot.phase = if policy == RestartPolicy::Always {
                    Phase::Idle
                } else {
                    Phase::Completed
                };
            }
            Exit::Failed(e) => Self::fail(slot, now, e),
            Exit::Ended(cause) => {
                Self::fail(slot, now, cause.to_string());
                slot.last_exit = Some(cause);
            }
        }
        self.reconcile(now);
    }

    /// Re-evaluates timers (backoff expiry, health transitions).
    pub fn handle_timeout(&mut self, now: Millis) {
        for slot in self.slots.values_mut() {
            if let Phase::BackingOff { until } = slot.phase
                && now >= until
            {
                slot.phase = Phase::Idle;
                self.changed = true;
            }
            if let Phase::Running { since } = slot.phase
                && slot.failures > 0
                && now.saturating_sub(since) >= RECOVERED_AFTER_MS
            {
                slot.failures = 0;
                self.changed = true;
            }
            if let (Phase::Running { since }, Some(d)) = (&slot.phase, &slot.desired)
                && !slot.healthy_reported
                && now.saturating_sub(*since) >= health_ms(d)
            {
                // Becoming healthy is observable (rollout gates wait for it): report it when it happens.
                slot.healthy_reported = true;
                self.changed = true;
            }
        }
        self.reconcile(now);
    }

    fn fail(slot: &mut Slot, now: Millis, error: String) {
        slot.failures += 1;
        slot.last_exit = None;
        slot.restart_pending = true;
        slot.last_error = Some(error);
        let policy = slot
            .desired
            .as_ref()
            .map_or(RestartPolicy::Never, |d| d.spec.restart);
        slot.phase = if policy == RestartPolicy::Never {
            Phase::Failed
        } else {
            Phase::BackingOff {
                until: now + backoff(slot.failures),
            }
        };
    }

    /// Plans one step per slot without an operation in flight; only queues actions.
    fn reconcile(&mut self, _now: Millis) {
        let mut gone = Vec::new();
        for (name, slot) in &mut self.slots {
            if slot.in_flight.is_some() {
                continue;
            }
            match plan_slot(slot) {
                Step::None => {}
                Step::Forget => gone.push(name.clone()),
                Step::Stop => {
                    self.next_op += 1;
                    slot.in_flight = Some(self.next_op);
                    slot.phase = Phase::Stopping;
                    self.actions.push_back(Action::Stop {
                        name: name.clone(),
                        op: self.next_op,
                    });
                    self.changed = true;
                }
                Step::Start(spec, artifact) => {
                    self.next_op += 1;
                    let op = self.next_op;
                    slot.in_flight = Some(op);
                    slot.start_op = Some(op);
                    if std::mem::take(&mut slot.restart_pending) {
                        slot.restarts += 1;
                    }
                    slot.phase = Phase::Starting;
                    slot.running = Some((spec.clone(), artifact));
                    self.actions.push_back(Action::Start {
                        name: name.clone(),
                        op,
                        spec,
                        artifact,
                    });
                    self.changed = true;
                }
            }
        }
        for name in gone {
            self.slots.remove(&name);
        }
    }

    /// Restores a workload's restart count and last error from before an agent restart (call after
    /// `set_desired`; unknown names are ignored).
    pub fn restore_history(
        &mut self,
        name: &WorkloadName,
        restarts: u32,
        last_error: Option<String>,
    ) {
        if let Some(slot) = self.slots.get_mut(name) {
            slot.restarts = slot.restarts.max(restarts);
            if slot.last_error.is_none() {
                slot.last_error = last_error;
            }
        }
    }

    /// The start `op` of `name` is loading its image (shown as `Loading` until the start finishes).
    pub fn loading(&mut self, name: &WorkloadName, op: OpId) {
        if let Some(slot) = self.slots.get_mut(name)
            && slot.in_flight == Some(op)
            && slot.phase == Phase::Starting
        {
            slot.loading = true;
            self.changed = true;
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next instant at which [`Reconciler::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.slots
            .values()
            .filter_map(|s| match s.phase {
                Phase::BackingOff { until } => Some(until),
                Phase::Running { since } if !s.healthy_reported => {
                    s.desired.as_ref().map(|d| since + health_ms(d))
                }
                Phase::Running { since } if s.failures > 0 => Some(since + RECOVERED_AFTER_MS),
                _ => None,
            })
            .min()
    }

    /// Whether the observable state changed since the last call (the shell then sends a report).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The spec and artifact `name` is running (or starting) right now.
    pub fn running(&self, name: &WorkloadName) -> Option<(WorkloadSpec, Digest)> {
        self.slots.get(name).and_then(|s| s.running.clone())
    }

    /// Names of workloads that are running or starting (what a report calls "up").
    pub fn is_running(&self, name: &WorkloadName) -> bool {
        self.slots
            .get(name)
            .is_some_and(|s| matches!(s.phase, Phase::Running { .. }))
    }

    /// The observed state of every desired workload, for reports.
    pub fn status(&self, now: Millis) -> Vec<WorkloadStatus> {
        self.slots
            .iter()
            .filter_map(|(name, s)| {
                let d = s.desired.as_ref()?;
                let state = match (&s.phase, d.artifact.is_some(), d.inside_fence) {
                    (Phase::Running { .. }, ..) => WorkloadState::Running,
                    (Phase::Starting, ..) if s.loading => WorkloadState::Loading,
                    (Phase::Starting, ..) => WorkloadState::Starting,
                    (Phase::BackingOff { .. }, ..) => WorkloadState::BackingOff,
                    (Phase::Failed, ..) => WorkloadState::Failed,
                    (Phase::Completed, ..) => WorkloadState::Exited,
                    (_, false, _) => WorkloadState::Downloading,
                    (_, true, false) => WorkloadState::HeldByGeofence,
                    (Phase::Idle | Phase::Stopping, true, true) => WorkloadState::Starting,
                };
                let healthy = match s.phase {
                    Phase::Running { since } => now.saturating_sub(since) >= health_ms(d),
                    Phase::Completed => true,
                    _ => false,
                };
                // Report the release actually running; while a new one downloads the old one is still up.
                let release = s
                    .running
                    .as_ref()
                    .map_or(d.spec.release, |(spec, _)| spec.release);
                Some(WorkloadStatus {
                    name: name.clone(),
                    release,
                    state,
                    healthy,
                    restarts: s.restarts,
                    last_error: s.last_error.clone(),
                    rejected: d.rejected.clone(),
                    exit: s.last_exit,
                    retry_in_ms: match s.phase {
                        Phase::BackingOff { until } => Some(until.saturating_sub(now)),
                        _ => None,
                    },
                })
            })
            .collect()
    }
}

fn health_ms(d: &DesiredWorkload) -> Millis {
    match d.spec.health {
        HealthRule::RunningFor(secs) => Millis::from(secs) * 1000,
        HealthRule::TicksOk(n) => Millis::from(n) * Millis::from(d.spec.tick_ms),
    }
}

enum Step {
    None,
    Forget,
    Stop,
    Start(WorkloadSpec, Digest),
}

/// Whether `spec`'s update strategy stops the running version before the new one is downloaded.
pub fn kills_first(spec: &WorkloadSpec) -> bool {
    spec.container.as_ref().is_some_and(|c| {
        matches!(
            c.update_strategy,
            UpdateStrategy::KillThenDownload | UpdateStrategy::DeleteThenDownload
        )
    })
}

/// The planning rule for one slot with no operation in flight.
fn plan_slot(slot: &Slot) -> Step {
    let Some(d) = &slot.desired else {
        return if slot.running.is_some() {
            Step::Stop
        } else {
            Step::Forget
        };
    };
    if let Some((spec, artifact)) = &slot.running {
        let outdated = match d.artifact {
            Some(a) => a != *artifact || *spec != d.spec,
            // Not downloaded yet: the old version keeps running until the new artifact is ready
            // (download-then-kill), unless the spec asks to stop it first (kill- or delete-then-download).
            None => *spec != d.spec && kills_first(&d.spec),
        };
        // Stop an outdated version, and any version when leaving the fence.
        return if outdated || !d.inside_fence {
            Step::Stop
        } else {
            Step::None
        };
    }
    match (&slot.phase, d.artifact, d.inside_fence) {
        (Phase::Idle, Some(artifact), true) => Step::Start(d.spec.clone(), artifact),
        _ => Step::None,
    }
}
