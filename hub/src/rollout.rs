//! The rollout driver: feeds the sans-IO rollout state machine (`flotilla_hub_core::rollout`) with device reports,
//! presence, telemetry gates, what is out of service elsewhere (budgets) and time; persists its snapshot after every
//! transition; makes an abort's rollback permanent; remembers releases that failed on a device; and takes operator
//! commands. Placement reads the rollout's assignments (`on_new`) when it builds desired states.

use crate::fleet::device_view;
use crate::hub::{Hub, HubError, unix_now};
use crate::spec::{self, Deployment};
use crate::store::Store;
use anyhow::Result;
use flotilla_hub_core::rollout::{self, Member, Observation, Phase, Rollout};
use flotilla_shared::DeviceId;
use flotilla_shared::wire::WorkloadState;
use std::collections::BTreeMap;

/// A rollout the hub drives, with the two versions of the deployment it moves devices between.
#[derive(Debug)]
pub struct DeploymentRollout {
    pub rollout: Rollout,
    pub stable_source: String,
    pub target_source: String,
    pub(crate) stable: Option<Deployment>,
    /// The last snapshot written to the store (writes happen only on change).
    pub(crate) persisted: Vec<u8>,
    /// Its outcome is counted in `flotilla_rollouts_finished_total` (set at load for finished ones: a restart
    /// must not count them again).
    pub(crate) outcome_counted: bool,
}

/// Loads every persisted rollout: a restarted hub continues each from its last persisted transition.
pub fn load(store: &Store) -> Result<BTreeMap<String, DeploymentRollout>> {
    let mut rollouts = BTreeMap::new();
    for (name, stable_source, target_source, snapshot) in store.rollouts()? {
        match Rollout::from_snapshot(&snapshot) {
            Ok(rollout) => {
                let stable = spec::parse(&name, &stable_source).ok();
                rollouts.insert(
                    name,
                    DeploymentRollout {
                        outcome_counted: rollout.is_finished(),
                        rollout,
                        stable_source,
                        target_source,
                        stable,
                        persisted: snapshot,
                    },
                );
            }
            Err(e) => {
                tracing::error!(deployment = %name, error = %e, "stored rollout does not decode")
            }
        }
    }
    Ok(rollouts)
}

/// The releases (`name@version`) of `target` that `stable` does not run: what a failure of this rollout is
/// remembered against.
pub(crate) fn changed_releases(stable: &Deployment, target: &Deployment) -> Vec<String> {
    let mut out: Vec<String> = target
        .workloads
        .iter()
        .filter(|w| {
            !stable
                .workloads
                .iter()
                .any(|s| s.name == w.name && s.release == w.release)
        })
        .map(|w| w.release.to_string())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Every release (`name@version`) `target` runs.
pub(crate) fn target_releases(target: &Deployment) -> Vec<String> {
    let mut out: Vec<String> = target
        .workloads
        .iter()
        .map(|w| w.release.to_string())
        .collect();
    out.sort();
    out.dedup();
    out
}

impl Hub {
    /// Starts a rollout of `name` from `stable` (its previous version) to `target`, over the devices the
    /// deployment is placed on now. Devices where one of the target's new releases failed before are left out.
    #[allow(clippy::too_many_arguments)] // Reason: the parts of one apply, named at its single call site.
    pub(crate) fn begin_rollout(
        &mut self,
        name: &str,
        plan: rollout::Plan,
        stable_source: String,
        stable: Deployment,
        target: &Deployment,
        target_source: &str,
        who: &str,
        now: u64,
    ) -> Result<(), HubError> {
        let placed = self.store.placements(name)?;
        // Every release of the target counts, not only the changed ones: a device an earlier rollout left behind
        // on an older version is still left out of a release that failed on it.
        let releases = target_releases(target);
        let mut members: Vec<Member> = Vec::with_capacity(placed.len());
        for id in placed {
            // The device as placement sees it; its own time zone is its `tz` label (agent.toml or its token).
            let Some(mut m) = self.store.with_device(&id, |d| {
                let v = device_view(d);
                Member {
                    tz: v.labels.get("tz").cloned(),
                    id: v.id,
                    region: v.region,
                    zone: v.zone,
                    labels: v.labels,
                    online: v.online,
                    blocked: None,
                }
            })?
            else {
                continue;
            };
            m.blocked = self
                .store
                .failed_releases(&id)?
                .into_iter()
                .find(|(release, ..)| releases.contains(release))
                .map(|(release, _, reason, at)| {
                    format!(
                        "{release} failed its health window here at {at} ({reason}); \
                         `flotilla rollout retry {name} --device {id}` gives it another chance"
                    )
                });
            members.push(m);
        }
        // Percentage budgets are of the whole group in the fleet, not only of the devices this deployment runs on.
        let mut sizes: BTreeMap<String, u32> = BTreeMap::new();
        if !plan.budgets.is_empty() {
            self.store.with_devices(|devices| {
                for d in devices {
                    let v = device_view(d);
                    for b in &plan.budgets {
                        if let Some(key) = b.group_of(v.zone.as_deref(), &v.labels) {
                            *sizes.entry(key).or_default() += 1;
                        }
                    }
                }
            })?;
        }
        let count = members.len();
        let rollout = Rollout::begin(plan, members, &sizes, now);
        self.store.audit(
            now,
            who,
            "rollout-start",
            &format!("deployment {name}: {count} devices"),
        )?;
        self.rollouts.insert(
            name.to_owned(),
            DeploymentRollout {
                rollout,
                stable_source,
                target_source: target_source.to_owned(),
                stable: Some(stable),
                persisted: vec![],
                outcome_counted: false,
            },
        );
        // A rollout with budgets starts its first devices once it knows what is out of service elsewhere.
        self.refresh_budgets();
        if let Some(r) = self.rollouts.get_mut(name) {
            r.rollout.tick(now);
        }
        Ok(())
    }

    /// Tells every active rollout with disruption budgets which of its devices are out of service outside it:
    /// offline, a workload not running healthy, or updating in another rollout.
    pub(crate) fn refresh_budgets(&mut self) {
        let with_budgets: Vec<String> = self
            .rollouts
            .iter()
            .filter(|(_, r)| !r.rollout.is_finished() && !r.rollout.plan.budgets.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for name in with_budgets {
            let Some(mut r) = self.rollouts.remove(&name) else {
                continue;
            };
            let others = &self.rollouts;
            let store = &self.store;
            r.rollout.refresh_elsewhere(|d| {
                others.values().any(|o| o.rollout.is_unavailable(d))
                    || store
                        .with_device(d, |row| !row.online || !reports_healthy(row))
                        .ok()
                        .flatten()
                        .unwrap_or(false)
            });
            self.rollouts.insert(name, r);
        }
    }

    /// The rollout of `deployment`, or why there is none.
    pub(crate) fn rollout(&self, deployment: &str) -> Result<&DeploymentRollout, HubError> {
        self.rollouts
            .get(deployment)
            .ok_or_else(|| HubError::NotFound(format!("no rollout for deployment {deployment}")))
    }

    /// A member went offline or came back: every active rollout it belongs to is told.
    pub(crate) fn presence_for_rollouts(&mut self, device: &DeviceId, online: bool, now: u64) {
        for r in self.rollouts.values_mut() {
            if !r.rollout.is_finished() {
                r.rollout.set_online(now, device, online);
            }
        }
    }

    /// `flotilla rollout retry`: forgets the failures of this deployment's new releases (on one device, or on all)
    /// and gives the devices another chance in the rollout when it is running or completed. Returns the devices
    /// the rollout retried and how many remembered failures were forgotten.
    pub fn rollout_retry(
        &mut self,
        deployment: &str,
        device: Option<DeviceId>,
        who: &str,
    ) -> Result<(Vec<String>, usize), HubError> {
        let r = self
            .rollouts
            .get_mut(deployment)
            .ok_or_else(|| HubError::NotFound(format!("no rollout for deployment {deployment}")))?;
        let target = spec::parse(deployment, &r.target_source)
            .map_err(|e| HubError::Internal(format!("stored target of {deployment}: {e}")))?;
        let releases = match &r.stable {
            Some(stable) => changed_releases(stable, &target),
            None => target
                .workloads
                .iter()
                .map(|w| w.release.to_string())
                .collect(),
        };
        let forgotten = self.store.forget_failures(&releases, device.as_ref())?;
        let now = unix_now();
        let devices: Vec<DeviceId> = device.iter().cloned().collect();
        let retried = match r.rollout.retry(now, &devices, who) {
            Ok(ds) => ds.iter().map(|d| d.to_string()).collect(),
            // An aborted rollout is not reopened; forgetting the failure is what lets the next one include it.
            Err(_) if forgotten > 0 => vec![],
            Err(e) => return Err(HubError::Conflict(e.to_string())),
        };
        self.store.audit(
            now,
            who,
            "rollout-retry",
            &format!(
                "{deployment}: {} ({} failures forgotten, {} devices retried)",
                device
                    .as_ref()
                    .map_or("all devices".to_owned(), |d| d.to_string()),
                forgotten,
                retried.len()
            ),
        )?;
        self.drive_rollouts();
        self.reconcile_fleet()
            .map_err(|e| HubError::Internal(e.to_string()))?;
        Ok((retried, forgotten))
    }

    /// Time passes for every rollout: telemetry gates are evaluated, soak and report timeouts advance.
    pub(crate) fn tick_rollouts(&mut self, now: u64) {
        self.check_telemetry_gates(now);
        self.refresh_budgets();
        for r in self.rollouts.values_mut() {
            r.rollout.tick(now);
        }
    }

    /// Feeds a device's report to every active rollout that moved it to the new release.
    pub(crate) fn observe_for_rollouts(
        &mut self,
        device: &DeviceId,
        report: &flotilla_shared::wire::Report,
        now: u64,
    ) {
        let names: Vec<String> = self
            .rollouts
            .iter()
            .filter(|(_, r)| !r.rollout.is_finished() && r.rollout.on_new.contains(device))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let Some(target) = self
                .deployments
                .get(&name)
                .and_then(|d| self.resolve(d).ok())
            else {
                continue;
            };
            let mut healthy = true;
            let mut failure = None;
            for spec in &target {
                match report.workloads.iter().find(|w| w.name == spec.name) {
                    Some(w) if w.release == spec.release => {
                        if let Some(reason) = &w.rejected {
                            failure = Some(format!("{}: refused by the device: {reason}", w.name));
                        } else if matches!(
                            w.state,
                            WorkloadState::BackingOff | WorkloadState::Failed
                        ) {
                            failure = Some(format!(
                                "{}: {}",
                                w.name,
                                w.last_error
                                    .clone()
                                    .unwrap_or_else(|| format!("{:?}", w.state))
                            ));
                        }
                        healthy &= w.state == WorkloadState::Running && w.healthy;
                    }
                    Some(w) if let Some(reason) = &w.rejected => {
                        failure = Some(format!("{}: refused by the device: {reason}", w.name));
                    }
                    _ => healthy = false,
                }
            }
            let obs = match (failure, healthy, &report.hold) {
                (Some(reason), ..) => Observation::Unhealthy(reason),
                (None, true, _) => Observation::Healthy,
                (None, false, Some(hold)) => Observation::Held(hold.clone()),
                (None, false, None) => continue,
            };
            if let Some(r) = self.rollouts.get_mut(&name) {
                r.rollout.observe(now, device, obs);
            }
        }
    }

    /// Evaluates every active rollout's telemetry gates against the ingested telemetry of its devices.
    pub(crate) fn check_telemetry_gates(&mut self, now: u64) {
        let mut verdicts = Vec::new();
        for (name, r) in &self.rollouts {
            if r.rollout.is_finished() || r.rollout.plan.telemetry_gates.is_empty() {
                continue;
            }
            for gate in &r.rollout.plan.telemetry_gates {
                let value_of = |d: &DeviceId| self.telemetry.metric(d, &gate.stream, &gate.metric);
                let old: Vec<f64> = r
                    .rollout
                    .regions
                    .keys()
                    .filter(|d| !r.rollout.on_new.contains(*d))
                    .filter_map(&value_of)
                    .collect();
                let baseline =
                    (!old.is_empty()).then(|| old.iter().sum::<f64>() / old.len() as f64);
                for d in &r.rollout.on_new {
                    if let Some(reason) = value_of(d).and_then(|v| gate.check(v, baseline)) {
                        verdicts.push((name.clone(), d.clone(), reason));
                    }
                }
            }
        }
        for (name, device, reason) in verdicts {
            if let Some(r) = self.rollouts.get_mut(&name) {
                r.rollout
                    .observe(now, &device, Observation::Unhealthy(reason));
            }
        }
    }

    /// Applies rollout actions, finishes rollouts, and persists every changed snapshot.
    pub(crate) fn drive_rollouts(&mut self) {
        let now = unix_now();
        let names: Vec<String> = self.rollouts.keys().cloned().collect();
        for name in names {
            let Some(r) = self.rollouts.get_mut(&name) else {
                continue;
            };
            let mut failures = vec![];
            while let Some(action) = r.rollout.poll_action() {
                match action {
                    rollout::Action::Assign { .. } => {
                        // The assignment lives in the rollout state (`on_new`); placement reads it when
                        // re-publishing.
                        self.dirty = true;
                        self.inflight
                            .changed_at
                            .get_or_insert_with(std::time::Instant::now);
                    }
                    rollout::Action::RememberFailure { device, reason } => {
                        failures.push((device, reason))
                    }
                }
            }
            if !failures.is_empty() {
                // The releases this rollout brought; when it changed only settings, the release it runs.
                let releases = match (&r.stable, spec::parse(&name, &r.target_source)) {
                    (Some(stable), Ok(target)) => {
                        let changed = changed_releases(stable, &target);
                        if changed.is_empty() {
                            target_releases(&target)
                        } else {
                            changed
                        }
                    }
                    (None, Ok(target)) => target_releases(&target),
                    (_, Err(_)) => vec![],
                };
                for (device, reason) in failures {
                    for release in &releases {
                        if let Err(e) = self
                            .store
                            .remember_failure(&device, release, &name, &reason, now)
                        {
                            tracing::error!(device = %device, error = %e, "cannot remember a failed release");
                        }
                    }
                }
            }
            if r.rollout.is_finished() && !r.outcome_counted {
                r.outcome_counted = true;
                self.slis.rollout_finished(match r.rollout.phase {
                    Phase::Completed => "completed",
                    _ => "aborted",
                });
            }
            let snapshot = r.rollout.snapshot();
            if snapshot == r.persisted {
                continue;
            }
            if let Err(e) =
                self.store
                    .save_rollout(&name, &r.stable_source, &r.target_source, &snapshot, now)
            {
                tracing::error!(deployment = %name, error = %e, "cannot persist rollout");
                self.slis.error(crate::slis::ControlPlaneError::Store);
                continue;
            }
            r.persisted = snapshot;
            self.dirty = true;
            if let Phase::Aborted { reason } = &r.rollout.phase {
                // Make the rollback permanent: the deployment is the stable version again.
                let (stable_source, reason) = (r.stable_source.clone(), reason.clone());
                if self
                    .store
                    .deployment_source(&name)
                    .ok()
                    .flatten()
                    .as_deref()
                    != Some(stable_source.as_str())
                {
                    tracing::warn!(deployment = %name, reason = %reason, "rollout aborted; rolled back");
                    let _ = self.store.set_deployment_source(&name, &stable_source, now);
                    let _ =
                        self.store
                            .audit(now, "hub", "rollout-abort", &format!("{name}: {reason}"));
                    if let Ok(d) = spec::parse(&name, &stable_source) {
                        self.deployments.insert(name.clone(), d);
                    }
                }
            } else if r.rollout.phase == Phase::Completed {
                tracing::info!(deployment = %name, "rollout completed");
            }
        }
    }

    /// Pause, resume, abort or approve the rollout of `deployment`; `remark` (an approval's reason, say) goes to
    /// the rollout's history and the audit log with the command.
    pub fn rollout_command(
        &mut self,
        deployment: &str,
        cmd: rollout::Command,
        who: &str,
        remark: Option<&str>,
    ) -> Result<(), HubError> {
        let r = self
            .rollouts
            .get_mut(deployment)
            .ok_or_else(|| HubError::NotFound(format!("no rollout for deployment {deployment}")))?;
        let now = unix_now();
        r.rollout
            .command(now, cmd, who)
            .map_err(|e| HubError::Conflict(e.to_string()))?;
        let detail = match remark {
            Some(m) => {
                r.rollout
                    .history
                    .push((now, format!("{cmd:?} by {who}: {m}").to_lowercase()));
                format!("{deployment}: {cmd:?} ({m})")
            }
            None => format!("{deployment}: {cmd:?}"),
        };
        self.store.audit(now, who, "rollout", &detail)?;
        self.drive_rollouts();
        self.reconcile_fleet()
            .map_err(|e| HubError::Internal(e.to_string()))?;
        Ok(())
    }
}

/// Whether a device's last report has every workload running and healthy (no report yet counts as healthy: the
/// device has nothing to be unhealthy about).
fn reports_healthy(row: &crate::store::DeviceRow) -> bool {
    row.last_report.as_ref().is_none_or(|r| {
        r.workloads
            .iter()
            .all(|w| w.state == WorkloadState::Running && w.healthy)
    })
}
