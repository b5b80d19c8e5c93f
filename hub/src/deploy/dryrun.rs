//! `flotilla apply --dry-run` (`POST /api/v1/deployments?dry_run=true`): what an apply would change, device by
//! device, computed by the same checks and the same placement pass as the apply itself, with nothing stored,
//! signed or published.

use super::plan::FleetPlan;
use crate::fleet::device_view;
use crate::hub::{Hub, HubError, unix_now};
use flotilla_hub_core::DeviceView;
use flotilla_hub_core::rollout::Rollout;
use flotilla_shared::DeviceId;
use flotilla_shared::wire::WorkloadSpec;
use serde::Serialize;
use std::collections::BTreeMap;

/// What an apply would do.
#[derive(Debug, Serialize)]
pub struct DryRun {
    pub deployment: String,
    /// Devices the deployment would be placed on.
    pub placed: usize,
    /// Devices whose workloads of this deployment would change, in id order.
    pub changes: Vec<DeviceChange>,
    /// Placed devices that would keep exactly what they have.
    pub unchanged: usize,
    /// With a `[rollout]` section and a change of release or spec: the waves the rollout would form.
    pub waves: Option<Vec<Vec<String>>>,
    /// The admission policy's verdict on every rule that applies (empty without a policy).
    pub policy: Vec<crate::admission::Verdict>,
    /// Whether the apply would be refused by the policy (the refusal, as the apply would give it).
    pub refused_by_policy: Option<String>,
}

/// One device's changes.
#[derive(Debug, Serialize)]
pub struct DeviceChange {
    pub device: String,
    pub workloads: Vec<WorkloadChange>,
}

/// One workload's change on a device.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct WorkloadChange {
    pub workload: String,
    /// `add`, `remove` or `update`.
    pub change: &'static str,
    /// Release versions before and after (`null` where it has none).
    pub from: Option<String>,
    pub to: Option<String>,
    /// On an update: the config it reads changes (overrides included).
    pub config_changed: bool,
}

/// This deployment's workloads on each device of a plan.
fn specs_of(plan: &FleetPlan, deployment: &str) -> BTreeMap<DeviceId, Vec<WorkloadSpec>> {
    plan.per_device
        .iter()
        .filter_map(|(id, groups)| {
            groups
                .iter()
                .find(|(name, _)| name == deployment)
                .map(|(_, specs)| (id.clone(), specs.clone()))
        })
        .collect()
}

/// Workload `name` in a device's specs, if it has them.
fn find<'a>(specs: Option<&'a Vec<WorkloadSpec>>, name: &str) -> Option<&'a WorkloadSpec> {
    specs.and_then(|v| v.iter().find(|w| w.name.as_str() == name))
}

impl Hub {
    /// The changes applying `source` would make, without making them. Refused exactly as [`Hub::apply`] would be.
    pub fn apply_dry_run(&self, file: &str, source: &str, force: bool) -> Result<DryRun, HubError> {
        let (d, specs, placed_ids) = self.validate_apply(file, source, force)?;
        let policy = self.admission(source, &d, &specs, &placed_ids)?;
        let refused_by_policy = super::admit::refusal(file, &policy).map(|e| e.to_string());
        let name = d.name.to_string();
        let now = unix_now();
        let views: Vec<DeviceView> = self.store.with_devices(|rows| {
            rows.filter(|r| !self.access.is_revoked(&r.id))
                .map(device_view)
                .collect()
        })?;
        let before = specs_of(&self.plan_fleet(&self.deployments, &views, now)?, &name);
        let mut deployments = self.deployments.clone();
        let rollout_plan = d.rollout.clone();
        let changes_release = self
            .deployments
            .get(&name)
            .is_some_and(|prev| self.resolve(prev).is_ok_and(|p| p != specs));
        deployments.insert(name.clone(), d);
        let plan = self.plan_fleet(&deployments, &views, now)?;
        let after = specs_of(&plan, &name);
        let version = |spec: Option<&WorkloadSpec>| {
            spec.and_then(|s| self.store.release_by_digest(&s.release).ok().flatten())
                .map(|r| r.release.version)
        };
        let mut changes = Vec::new();
        let mut devices: Vec<&DeviceId> = before.keys().chain(after.keys()).collect();
        devices.sort();
        devices.dedup();
        for id in devices {
            let (old, new) = (before.get(id), after.get(id));
            let mut names: Vec<&str> = old
                .into_iter()
                .chain(new)
                .flatten()
                .map(|w| w.name.as_str())
                .collect();
            names.sort_unstable();
            names.dedup();
            let mut workloads = Vec::new();
            for n in names {
                let (o, w) = (find(old, n), find(new, n));
                let change = match (o, w) {
                    (None, Some(_)) => "add",
                    (Some(_), None) => "remove",
                    (Some(a), Some(b)) if a != b => "update",
                    _ => continue,
                };
                workloads.push(WorkloadChange {
                    workload: n.to_owned(),
                    change,
                    from: version(o),
                    to: version(w),
                    config_changed: o.zip(w).is_some_and(|(a, b)| a.config != b.config),
                });
            }
            if !workloads.is_empty() {
                changes.push(DeviceChange {
                    device: id.to_string(),
                    workloads,
                });
            }
        }
        let placed = plan.placements.get(&name).map_or(0, |p| p.len());
        let waves = match (rollout_plan, changes_release) {
            (Some(rp), true) => {
                let region = |id: &DeviceId| {
                    views
                        .iter()
                        .find(|v| &v.id == id)
                        .and_then(|v| v.region.clone())
                };
                let members: Vec<(DeviceId, Option<String>)> = plan
                    .placements
                    .get(&name)
                    .into_iter()
                    .flatten()
                    .map(|id| (id.clone(), region(id)))
                    .collect();
                let r = Rollout::start(rp, &members, now);
                Some(
                    r.waves
                        .iter()
                        .map(|w| w.iter().map(ToString::to_string).collect())
                        .collect(),
                )
            }
            _ => None,
        };
        let changed: std::collections::BTreeSet<&str> =
            changes.iter().map(|c| c.device.as_str()).collect();
        let unchanged = after
            .keys()
            .filter(|id| !changed.contains(id.as_str()))
            .count();
        Ok(DryRun {
            deployment: name,
            placed,
            unchanged,
            changes,
            waves,
            policy,
            refused_by_policy,
        })
    }
}
