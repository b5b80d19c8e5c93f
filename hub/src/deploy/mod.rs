//! Deployments: loading, resolving (release names to signed release digests) and applying operator specs. Placement
//! and the signing and publishing of desired states live in [`publish`]; explanations for operators in [`why`].

mod admit;
pub mod diff;
pub mod dryrun;
pub mod plan;
pub mod publish;
pub mod secrets;
pub mod why;

use crate::fleet::device_view;
use crate::hub::{Hub, HubError, unix_now};
use crate::spec::{self, Deployment, ReleaseRef};
use crate::store::Store;
use anyhow::Result;
use flotilla_hub_core::DeviceView;
use flotilla_shared::DeviceId;
use flotilla_shared::wire::{WorkloadKind, WorkloadSpec};
use plan::flatten;
use std::collections::{BTreeMap, BTreeSet};

/// Loads every stored deployment; one that no longer parses is logged and skipped, the others still run.
pub fn load(store: &Store) -> Result<BTreeMap<String, Deployment>> {
    let mut deployments = BTreeMap::new();
    for (name, source, ..) in store.deployments()? {
        match spec::parse(&name, &source) {
            Ok(d) => {
                deployments.insert(name, d);
            }
            Err(e) => {
                tracing::error!(deployment = %name, error = %e, "stored deployment no longer parses")
            }
        }
    }
    Ok(deployments)
}

impl Hub {
    /// Resolves a deployment's workloads into specs (release digests and kinds).
    pub(crate) fn resolve(&self, d: &Deployment) -> Result<Vec<WorkloadSpec>, HubError> {
        let mut out = Vec::new();
        // Every workload of the deployment may read the deployment's secrets.
        let secrets = self.secret_refs(d.name.as_str())?;
        for (i, w) in d.workloads.iter().enumerate() {
            let row = match &w.release {
                ReleaseRef::Version { name, version } => {
                    self.store.release_by_version(name, version)?
                }
                ReleaseRef::Digest(dg) => self.store.release_by_digest(dg)?,
            }
            .ok_or_else(|| self.no_such_release(i, &w.release))?;
            if row.release.name != w.name {
                return Err(HubError::BadRequest(format!(
                    "workloads[{i}].release: release is for workload {}, not {}",
                    row.release.name, w.name
                )));
            }
            let kind = row.release.kind;
            // Placement sends firmware and agent releases only to devices that say they can install them, which
            // needs the kind in the spec (it sets the runtime constraint).
            if kind.is_system() && w.kind.is_none() {
                return Err(HubError::BadRequest(format!(
                    "workloads[{i}].kind: release {} is a{} {} release; say kind = \"{}\"",
                    w.release,
                    if kind == WorkloadKind::Agent { "n" } else { "" },
                    kind.name(),
                    kind.name()
                )));
            }
            if w.kind.is_some_and(|k| k != kind) {
                return Err(HubError::BadRequest(format!(
                    "workloads[{i}].kind: the spec says {:?} but release {} is {:?}",
                    w.kind, w.release, kind
                )));
            }
            let container = match kind {
                WorkloadKind::Container => Some(Box::new(
                    w.container
                        .clone()
                        .unwrap_or_else(crate::spec_container::defaults),
                )),
                WorkloadKind::Wasm | WorkloadKind::Firmware | WorkloadKind::Agent => None,
            };
            out.push(WorkloadSpec {
                name: w.name.clone(),
                kind,
                release: row.digest,
                config: w.config.clone(),
                resources: w.resources,
                restart: w.restart,
                health: w.health,
                tick_ms: w.tick_ms,
                geofence: w.geofence.clone(),
                secrets: secrets.clone(),
                container,
            });
        }
        Ok(out)
    }

    /// The error for a spec naming a release the hub does not have: which versions it does have, and how to add one.
    fn no_such_release(&self, i: usize, r: &ReleaseRef) -> HubError {
        let known: Vec<String> = match r {
            ReleaseRef::Version { name, .. } => self
                .store
                .releases()
                .unwrap_or_default()
                .into_iter()
                .filter(|row| row.release.name.as_str() == name)
                .map(|row| row.release.version)
                .collect(),
            ReleaseRef::Digest(_) => vec![],
        };
        let known = match (r, known.is_empty()) {
            (ReleaseRef::Version { name, .. }, true) => {
                format!("the hub has no release of {name} at all")
            }
            (ReleaseRef::Version { name, .. }, false) => {
                format!("releases of {name} on the hub: {}", known.join(", "))
            }
            (ReleaseRef::Digest(_), _) => "no release has that digest".to_owned(),
        };
        HubError::BadRequest(format!(
            "workloads[{i}].release: no release {r} ({known}); push it first with `flotilla release push`"
        ))
    }

    /// Validates and stores a deployment spec, then re-places. Nothing changes if anything is invalid.
    ///
    /// Before anything is stored the spec is placed over the fleet as it is now: a deployment whose desired state
    /// would not fit a device is refused naming the workload, one that names a region or zone no device or
    /// enrollment token knows is refused listing the known ones, and one that would remove a workload from every
    /// device it runs on needs `force`.
    pub fn apply(
        &mut self,
        file: &str,
        source: &str,
        who: &str,
        force: bool,
    ) -> Result<(String, u64), HubError> {
        let (d, specs, placed) = self.validate_apply(file, source, force)?;
        let now = unix_now();
        let verdicts = self.admission(source, &d, &specs, &placed)?;
        if let Some(refused) = admit::refusal(file, &verdicts) {
            self.store.audit(
                now,
                who,
                "apply-refused",
                &format!("deployment {}: {refused}", d.name),
            )?;
            return Err(refused);
        }
        let name = d.name.to_string();
        let previous = self.store.deployment_source(&name)?;
        let rollout_from = match (&d.rollout, &previous, self.deployments.get(&name)) {
            (Some(_), Some(prev_source), Some(prev))
                if self.resolve(prev)? != self.resolve(&d)? =>
            {
                Some((prev_source.clone(), prev.clone()))
            }
            _ => None,
        };
        let rev = self.store.upsert_deployment(d.name.as_str(), source, now)?;
        self.store.audit(
            now,
            who,
            "apply",
            &format!("deployment {} revision {rev}", d.name),
        )?;
        if let (Some((stable_source, stable)), Some(plan)) = (rollout_from, d.rollout.clone()) {
            self.begin_rollout(&name, plan, stable_source, stable, &d, source, who, now)?;
        }
        self.deployments.insert(name.clone(), d);
        self.inflight
            .changed_at
            .get_or_insert_with(std::time::Instant::now);
        self.drive_rollouts();
        self.reconcile_fleet()
            .map_err(|e| HubError::Internal(e.to_string()))?;
        Ok((name, rev))
    }

    /// Everything `apply` checks before it changes anything: the spec parses, its releases resolve, its workloads
    /// are not another deployment's, no rollout of it is running, and it places (see [`Hub::apply`]). Returns the
    /// deployment and its resolved workload specs.
    pub(crate) fn validate_apply(
        &self,
        file: &str,
        source: &str,
        force: bool,
    ) -> Result<(Deployment, Vec<WorkloadSpec>, Vec<DeviceId>), HubError> {
        let d = spec::parse(file, source).map_err(|e| HubError::BadRequest(e.to_string()))?;
        let specs = self.resolve(&d).map_err(|e| match e {
            HubError::BadRequest(m) => HubError::BadRequest(format!("{file}: {m}")),
            other => other,
        })?;
        for (other_name, other) in &self.deployments {
            if other_name == d.name.as_str() {
                continue;
            }
            if let Some(w) = d
                .workloads
                .iter()
                .find(|w| other.workloads.iter().any(|o| o.name == w.name))
            {
                return Err(HubError::Conflict(format!(
                    "workload {} is already deployed by deployment {other_name}",
                    w.name
                )));
            }
        }
        let name = d.name.to_string();
        if self
            .rollouts
            .get(&name)
            .is_some_and(|r| !r.rollout.is_finished())
        {
            return Err(HubError::Conflict(format!(
                "a rollout of {name} is in progress; wait for it, or abort it with `flotilla rollout abort {name}`"
            )));
        }
        if !force {
            self.check_known_locations(file, &d)?;
        }
        let placed = self.check_placement(file, &d, &specs, force)?;
        Ok((d, specs, placed))
    }

    /// Refuses target regions and zones that no enrolled device and no enrollment token names: a typo there
    /// would silently place the deployment nowhere.
    fn check_known_locations(&self, file: &str, d: &Deployment) -> Result<(), HubError> {
        if d.target.regions.is_empty() && d.target.zones.is_empty() {
            return Ok(());
        }
        let (token_regions, token_zones) = self.store.token_locations()?;
        let mut regions: BTreeSet<String> = token_regions.into_iter().collect();
        let mut zones: BTreeSet<String> = token_zones.into_iter().collect();
        self.store.with_devices(|rows| {
            for row in rows {
                regions.extend(row.inventory.region.as_ref().map(|r| r.to_string()));
                zones.extend(row.inventory.zone.as_ref().map(|z| z.to_string()));
            }
        })?;
        let check = |field: &str, wanted: &[String], known: &BTreeSet<String>| match wanted
            .iter()
            .find(|w| !known.contains(*w))
        {
            None => Ok(()),
            Some(unknown) => Err(HubError::BadRequest(format!(
                "{file}: target.{field}: no enrolled device and no enrollment token has {} {unknown:?}; \
                     known {field}: {}. Fix the name, or pass --force for a {} whose devices have not enrolled yet",
                field.trim_end_matches('s'),
                if known.is_empty() {
                    "none yet".to_owned()
                } else {
                    known.iter().cloned().collect::<Vec<_>>().join(", ")
                },
                field.trim_end_matches('s'),
            ))),
        };
        check("regions", &d.target.regions, &regions)?;
        check("zones", &d.target.zones, &zones)
    }

    /// Places the candidate over the fleet without storing anything: every device it would reach must still fit
    /// its desired state, and (unless `force`) no workload may lose every device it is placed on. Returns the
    /// devices it would be placed on.
    fn check_placement(
        &self,
        file: &str,
        d: &Deployment,
        specs: &[WorkloadSpec],
        force: bool,
    ) -> Result<Vec<DeviceId>, HubError> {
        let name = d.name.to_string();
        let now = unix_now();
        let views: Vec<DeviceView> = self
            .store
            .with_devices(|rows| rows.map(device_view).collect())?;
        let mut candidate = self.deployments.clone();
        candidate.insert(name.clone(), d.clone());
        let plan = self.plan_fleet(&candidate, &views, now)?;
        let placed = plan.placements.get(&name).cloned().unwrap_or_default();
        let fits = self.fit_check(now);
        // The new specs on every device it is placed on, as if any rollout had already reached them all.
        for device in &placed {
            let mut groups = plan.per_device.get(device).cloned().unwrap_or_default();
            for (n, s) in &mut groups {
                if *n == name {
                    *s = specs.to_vec();
                }
            }
            if let Err(over) = fits.check(device, flatten(&groups)) {
                let (i, w) = largest_workload(d, specs);
                return Err(HubError::BadRequest(format!(
                    "{file}: workloads[{i}] ({w}): device {device} cannot take this deployment: {over}. \
                     Make the workload's `config` smaller, or split the deployment; nothing was applied"
                )));
            }
        }
        if force {
            return Ok(placed.into_iter().collect());
        }
        let Some(old) = self.deployments.get(&name) else {
            return Ok(placed.into_iter().collect());
        };
        let before = self.store.placements(&name)?;
        if before.is_empty() {
            return Ok(placed.into_iter().collect());
        }
        for w in &old.workloads {
            let kept = d.workloads.iter().any(|n| n.name == w.name) && !placed.is_empty();
            if !kept {
                let shown: Vec<String> = before.iter().take(5).map(|d| d.to_string()).collect();
                let more = before.len().saturating_sub(shown.len());
                return Err(HubError::Conflict(format!(
                    "{file}: this change would remove workload {} from every device it runs on ({} device{}: {}{}). \
                     If that is what you want, apply it again with --force",
                    w.name,
                    before.len(),
                    if before.len() == 1 { "" } else { "s" },
                    shown.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    },
                )));
            }
        }
        Ok(placed.into_iter().collect())
    }

    pub fn delete_deployment(&mut self, name: &str, who: &str) -> Result<(), HubError> {
        if !self.store.delete_deployment(name)? {
            return Err(HubError::NotFound(format!("no deployment {name}")));
        }
        self.deployments.remove(name);
        self.inflight
            .changed_at
            .get_or_insert_with(std::time::Instant::now);
        self.store
            .audit(unix_now(), who, "delete", &format!("deployment {name}"))?;
        self.reconcile_fleet()
            .map_err(|e| HubError::Internal(e.to_string()))?;
        Ok(())
    }

    pub fn deployments(&self) -> &BTreeMap<String, Deployment> {
        &self.deployments
    }
}

/// The workload of `d` with the largest encoded spec (what to point at when a desired state is too large).
fn largest_workload(d: &Deployment, specs: &[WorkloadSpec]) -> (usize, String) {
    specs
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| postcard::to_stdvec(s).map_or(0, |b| b.len()))
        .map_or((0, String::new()), |(i, _)| {
            (
                i,
                d.workloads
                    .get(i)
                    .map_or_else(String::new, |w| w.name.to_string()),
            )
        })
}
