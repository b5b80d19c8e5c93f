//! Deployments: loading, resolving (release names to signed release digests) and applying operator specs. Placement
//! and the signing and publishing of desired states live in [`publish`]; explanations for operators in [`why`].

pub mod publish;
pub mod why;

use crate::hub::{Hub, HubError, unix_now};
use crate::spec::{self, Deployment, ReleaseRef};
use crate::store::Store;
use anyhow::Result;
use flotilla_shared::wire::WorkloadSpec;
use std::collections::BTreeMap;

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
        for (i, w) in d.workloads.iter().enumerate() {
            let row = match &w.release {
                ReleaseRef::Version { name, version } => {
                    self.store.release_by_version(name, version)?
                }
                ReleaseRef::Digest(dg) => self.store.release_by_digest(dg)?,
            }
            .ok_or_else(|| {
                HubError::BadRequest(format!(
                    "workloads[{i}].release: no such release {:?}",
                    w.release
                ))
            })?;
            if row.release.name != w.name {
                return Err(HubError::BadRequest(format!(
                    "workloads[{i}].release: release is for workload {}, not {}",
                    row.release.name, w.name
                )));
            }
            out.push(WorkloadSpec {
                name: w.name.clone(),
                kind: row.release.kind,
                release: row.digest,
                config: w.config.clone(),
                resources: w.resources,
                restart: w.restart,
                health: w.health,
                tick_ms: w.tick_ms,
                geofence: w.geofence.clone(),
            });
        }
        Ok(out)
    }

    /// Validates and stores a deployment spec, then re-places. Nothing changes if anything is invalid.
    pub fn apply(
        &mut self,
        file: &str,
        source: &str,
        who: &str,
    ) -> Result<(String, u64), HubError> {
        let d = spec::parse(file, source).map_err(|e| HubError::BadRequest(e.to_string()))?;
        self.resolve(&d)?;
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
        let now = unix_now();
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
            self.begin_rollout(&name, plan, stable_source, stable, source, who, now)?;
        }
        self.deployments.insert(name.clone(), d);
        self.drive_rollouts();
        self.reconcile_fleet()
            .map_err(|e| HubError::Internal(e.to_string()))?;
        Ok((name, rev))
    }

    pub fn delete_deployment(&mut self, name: &str, who: &str) -> Result<(), HubError> {
        if !self.store.delete_deployment(name)? {
            return Err(HubError::NotFound(format!("no deployment {name}")));
        }
        self.deployments.remove(name);
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
