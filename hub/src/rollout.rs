//! The rollout driver: feeds the sans-IO rollout state machine (`flotilla_hub_core::rollout`) with device reports,
//! telemetry gates and time, persists its snapshot after every transition, makes an abort's rollback permanent,
//! and takes operator commands. Placement reads the rollout's assignments (`on_new`) when it builds desired states.

use crate::hub::{Hub, HubError, unix_now};
use crate::spec::{self, Deployment};
use crate::store::Store;
use anyhow::Result;
use flotilla_hub_core::rollout::{self, Observation, Phase, Rollout};
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

impl Hub {
    /// Starts a rollout of `name` from `stable` (its previous version) to `target_source`, over the devices the
    /// deployment is placed on now.
    #[allow(clippy::too_many_arguments)] // Reason: the parts of one apply, named at its single call site.
    pub(crate) fn begin_rollout(
        &mut self,
        name: &str,
        plan: rollout::Plan,
        stable_source: String,
        stable: Deployment,
        target_source: &str,
        who: &str,
        now: u64,
    ) -> Result<(), HubError> {
        let placed = self.store.placements(name)?;
        let mut members: Vec<(DeviceId, Option<String>)> = Vec::with_capacity(placed.len());
        // A device's own time zone is its `tz` label (set in agent.toml or by its enrollment token).
        let mut zones = BTreeMap::new();
        for id in placed {
            let (region, tz) = self
                .store
                .with_device(&id, |d| {
                    let tz = d.inventory.labels.iter().rev().find(|(k, _)| k == "tz");
                    (
                        d.inventory.region.as_ref().map(|r| r.to_string()),
                        tz.map(|(_, v)| v.clone()),
                    )
                })?
                .unwrap_or_default();
            if let Some(tz) = tz {
                zones.insert(id.clone(), tz);
            }
            members.push((id, region));
        }
        let rollout = Rollout::start_with_zones(plan, &members, zones, now);
        self.store.audit(
            now,
            who,
            "rollout-start",
            &format!("deployment {name}: {} devices", members.len()),
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
        Ok(())
    }

    /// Time passes for every rollout: telemetry gates are evaluated, soak and report timeouts advance.
    pub(crate) fn tick_rollouts(&mut self, now: u64) {
        self.check_telemetry_gates(now);
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
            while let Some(rollout::Action::Assign { .. }) = r.rollout.poll_action() {
                // The assignment lives in the rollout state (`on_new`); placement reads it when re-publishing.
                self.dirty = true;
                self.inflight
                    .changed_at
                    .get_or_insert_with(std::time::Instant::now);
            }
            if r.rollout.is_finished() && !r.outcome_counted {
                r.outcome_counted = true;
                self.slis.rollout_finished(match r.rollout.phase {
                    Phase::Completed => "completed",
                    _ => "aborted",
                });
            }
            let snapshot = postcard::to_stdvec(&r.rollout).unwrap_or_default();
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

    /// Pause, resume, abort or approve the rollout of `deployment`.
    pub fn rollout_command(
        &mut self,
        deployment: &str,
        cmd: rollout::Command,
        who: &str,
    ) -> Result<(), HubError> {
        let r = self
            .rollouts
            .get_mut(deployment)
            .ok_or_else(|| HubError::NotFound(format!("no rollout for deployment {deployment}")))?;
        let now = unix_now();
        r.rollout
            .command(now, cmd)
            .map_err(|e| HubError::Conflict(e.to_string()))?;
        self.store
            .audit(now, who, "rollout", &format!("{deployment}: {cmd:?}"))?;
        self.drive_rollouts();
        self.reconcile_fleet()
            .map_err(|e| HubError::Internal(e.to_string()))?;
        Ok(())
    }
}
