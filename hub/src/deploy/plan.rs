//! Fleet planning: every deployment placed by the sans-IO core, and the result grouped per device, so that one
//! pass can publish it and an apply can try a candidate set of deployments without storing or publishing anything.

use crate::hub::{DESIRED_TTL_SECS, Hub};
use crate::spec::Deployment;
use flotilla_hub_core::rollout::{DeviceStatus, Phase};
use flotilla_hub_core::{DeviceView, place};
use flotilla_shared::DeviceId;
use flotilla_shared::codec::{self, EncodeError, Message};
use flotilla_shared::trust::{self, DocType};
use flotilla_shared::wire::{DesiredState, SealedSecret, WorkloadSpec};
use std::collections::{BTreeMap, BTreeSet};

/// What placing a set of deployments gives.
#[derive(Debug, Default)]
pub struct FleetPlan {
    /// Per device, the workloads of each deployment placed on it, in deployment-name order.
    pub per_device: BTreeMap<DeviceId, Vec<(String, Vec<WorkloadSpec>)>>,
    /// Per deployment, the devices it is placed on.
    pub placements: BTreeMap<String, BTreeSet<DeviceId>>,
    /// Per deployment, the devices it was placed on before this plan (as stored), read once for both uses.
    pub previous: BTreeMap<String, BTreeSet<DeviceId>>,
    /// Deployments that could not be resolved, with the reason; the others are planned regardless.
    pub unresolved: BTreeMap<String, String>,
    /// Per device, workloads to stage ahead of a rollout's cutover (`pre_download`).
    pub staged: BTreeMap<DeviceId, Vec<WorkloadSpec>>,
}

/// A device's desired state would not fit its envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversize {
    pub len: usize,
    pub cap: usize,
}

impl std::fmt::Display for Oversize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "its signed desired state would be {:.1} KiB, over the {} KiB cap",
            self.len as f64 / 1024.0,
            self.cap / 1024
        )
    }
}

/// Encodes a signed desired state, telling an oversized one apart from other failures.
pub(crate) fn encode_desired(signed: &flotilla_shared::wire::Signed) -> Result<Vec<u8>, Oversize> {
    match codec::encode(&Message::DesiredState(signed.clone())) {
        Ok(bytes) => Ok(bytes),
        Err(EncodeError::TooLarge { len, cap, .. }) => Err(Oversize { len, cap }),
        // A signed document is plain bytes: serialising it cannot fail for any other reason than its size, and
        // if it ever did, refusing it as unpublishable is the safe answer.
        Err(_) => Err(Oversize { len: 0, cap: 0 }),
    }
}

impl Hub {
    /// Places `deployments` over `views` at `now`. During a rollout only the devices it moved get the new specs;
    /// everyone else keeps the stable ones.
    pub(crate) fn plan_fleet(
        &self,
        deployments: &BTreeMap<String, Deployment>,
        views: &[DeviceView],
        now: u64,
    ) -> crate::store::Result<FleetPlan> {
        let mut plan = FleetPlan::default();
        // Only deployments with config overrides need each device's view, to layer its config.
        let by_id: std::collections::HashMap<&DeviceId, &DeviceView> =
            if deployments.values().any(has_overrides) {
                views.iter().map(|v| (&v.id, v)).collect()
            } else {
                Default::default()
            };
        for (name, d) in deployments {
            let specs = match self.resolve(d) {
                Ok(s) => s,
                Err(e) => {
                    plan.unresolved.insert(name.clone(), e.to_string());
                    continue;
                }
            };
            // A running rollout decides per device; a finished one still keeps the devices it left on the previous
            // release there (failed, left out, skipped) while the deployment is the version it rolled out.
            // (The in-memory check first: most completed rollouts pin nothing, and then no store read is needed.)
            let active = self.rollouts.get(name).filter(|r| {
                !r.rollout.is_finished()
                    || (r.rollout.phase == Phase::Completed
                        && r.rollout.keeps_any_previous()
                        && self.store.deployment_source(name).ok().flatten().as_deref()
                            == Some(r.target_source.as_str()))
            });
            let stable_specs = match active
                .and_then(|r| r.stable.as_ref())
                .map(|s| self.resolve(s))
            {
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    plan.unresolved
                        .insert(name.clone(), format!("stable version: {e}"));
                    continue;
                }
                None => None,
            };
            // Devices of the current and next wave fetch the target release ahead of their cutover.
            let staging: BTreeSet<DeviceId> = active
                .filter(|r| !r.rollout.is_finished())
                .map(|r| r.rollout.due_for_staging(now).into_iter().collect())
                .unwrap_or_default();
            let previous: BTreeSet<DeviceId> = self.store.placements(name)?.into_iter().collect();
            let placement = place(views, &d.target, &d.policy, &d.constraints, &previous, now);
            for id in &placement.chosen {
                let on_new = active.is_none_or(|r| {
                    if r.rollout.is_finished() {
                        !r.rollout.keeps_previous(id)
                    } else {
                        r.rollout.on_new.contains(id)
                    }
                });
                let (use_specs, templates) = match (&stable_specs, on_new) {
                    (Some(stable), false) => {
                        (stable, active.and_then(|r| r.stable.as_ref()).unwrap_or(d))
                    }
                    _ => (&specs, d),
                };
                // A device left out because the release failed on it keeps exactly what it runs now (which may
                // be older than this rollout's stable version, when an earlier rollout left it behind too).
                if !on_new
                    && let Some(r) = active
                    && matches!(r.rollout.status.get(id), Some(DeviceStatus::Blocked { .. }))
                    && let Some(frozen) = self.published_specs(id, d)
                {
                    plan.per_device
                        .entry(id.clone())
                        .or_default()
                        .push((name.clone(), frozen));
                    continue;
                }
                let specs_here = layered(use_specs, templates, by_id.get(id).copied());
                plan.per_device
                    .entry(id.clone())
                    .or_default()
                    .push((name.clone(), specs_here));
                if !on_new && staging.contains(id) {
                    let target = layered(&specs, d, by_id.get(id).copied());
                    plan.staged.entry(id.clone()).or_default().extend(target);
                }
            }
            plan.placements.insert(name.clone(), placement.chosen);
            plan.previous.insert(name.clone(), previous);
        }
        Ok(plan)
    }

    /// The specs of `d`'s workloads in the desired state last published to `device`, if it has them all.
    fn published_specs(&self, device: &DeviceId, d: &Deployment) -> Option<Vec<WorkloadSpec>> {
        let content = match self.desired.published.get(device) {
            Some((_, c, _)) => c.clone(),
            None => self.store.desired(device).ok().flatten()?.1,
        };
        let specs: Vec<WorkloadSpec> = postcard::from_bytes(&content).ok()?;
        let mine: Vec<WorkloadSpec> = specs
            .into_iter()
            .filter(|s| d.workloads.iter().any(|w| w.name == s.name))
            .collect();
        (mine.len() == d.workloads.len()).then_some(mine)
    }

    /// A size check for desired states as this hub signs them (see [`FitCheck`]).
    pub(crate) fn fit_check(&self, now: u64) -> FitCheck {
        // The envelope and one hub signature add a fixed number of bytes around the body, apart from the varint
        // of the body's length: measured once on a real signature, so checking a fleet signs nothing more.
        let sample = DesiredState {
            device: DeviceId::new("x").unwrap_or_else(|_| unreachable!("a valid id")),
            generation: u64::MAX,
            issued_at: now,
            expires_at: now + DESIRED_TTL_SECS,
            workloads: vec![],
            sealed: vec![],
            staged: vec![],
        };
        let signed = trust::sign(DocType::DesiredState, &sample, &[&self.hub_key]);
        let encoded = codec::encode(&Message::DesiredState(signed.clone())).map_or(0, |b| b.len());
        // Secrets are sealed at signing; their plaintext sizes (sealing adds a fixed 48 bytes) size the check.
        let secret_sizes = self
            .deployments
            .keys()
            .flat_map(|d| self.store.deployment_secrets(d).unwrap_or_default())
            .map(|r| ((r.deployment, r.name, r.version), r.size))
            .collect();
        FitCheck {
            overhead: encoded.saturating_sub(signed.body.len() + varint_len(signed.body.len())),
            now,
            secret_sizes,
        }
    }
}

/// Whether a device's desired state fits its envelope, computed from the unsigned body: signing every device's
/// state to measure it made an apply to 10,000 devices half a second slower.
#[derive(Debug, Clone)]
pub(crate) struct FitCheck {
    overhead: usize,
    now: u64,
    /// (deployment, secret, version) -> plaintext bytes.
    secret_sizes: std::collections::BTreeMap<(String, String, u64), usize>,
}

impl FitCheck {
    pub(crate) fn check(
        &self,
        device: &DeviceId,
        workloads: Vec<WorkloadSpec>,
    ) -> Result<(), Oversize> {
        // Stand-ins of the sealed secrets' exact size (a sealed box is 48 bytes longer than its plaintext).
        let sealed = workloads
            .iter()
            .flat_map(|w| {
                w.secrets.iter().map(|r| SealedSecret {
                    workload: w.name.clone(),
                    name: r.name.clone(),
                    version: r.version,
                    sealed: vec![
                        0;
                        self.secret_sizes
                            .get(&(r.deployment.clone(), r.name.clone(), r.version))
                            .copied()
                            .unwrap_or(0)
                            + 48
                    ],
                })
            })
            .collect();
        let ds = DesiredState {
            device: device.clone(),
            generation: u64::MAX,
            issued_at: self.now,
            expires_at: self.now + DESIRED_TTL_SECS,
            workloads,
            sealed,
            staged: vec![],
        };
        let body = postcard::to_stdvec(&ds).map_or(usize::MAX / 2, |b| b.len());
        let len = body + varint_len(body) + self.overhead;
        let cap = codec::Kind::DesiredState.cap();
        if len > cap {
            return Err(Oversize { len, cap });
        }
        Ok(())
    }
}

/// Bytes of postcard's varint for `n`.
fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// Whether any workload of `d` layers config per device.
/// `specs` (resolved from `templates`) with each workload's config layered for the device `view`, when the
/// templates have overrides and the view is known.
fn layered(
    specs: &[WorkloadSpec],
    templates: &Deployment,
    view: Option<&DeviceView>,
) -> Vec<WorkloadSpec> {
    let mut out = specs.to_vec();
    if let Some(view) = view.filter(|_| has_overrides(templates)) {
        // `resolve` keeps the templates' order: spec i is template i.
        for (spec, t) in out.iter_mut().zip(&templates.workloads) {
            spec.config = t.config_for(view);
        }
    }
    out
}

fn has_overrides(d: &Deployment) -> bool {
    d.workloads.iter().any(|w| !w.overrides.is_empty())
}

/// The workloads of a device's groups, sorted by name (the order a desired state lists them in).
pub(crate) fn flatten(groups: &[(String, Vec<WorkloadSpec>)]) -> Vec<WorkloadSpec> {
    let mut out: Vec<WorkloadSpec> = groups.iter().flat_map(|(_, s)| s.iter().cloned()).collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::test_support::{spec, test_hub};

    /// The computed size is the size of the state as the hub signs and encodes it, for small and large bodies.
    #[tokio::test]
    async fn fit_check_matches_the_signed_envelope() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (hub, _rx) = test_hub(dir.path());
        let fits = hub.fit_check(1_000_000);
        let device = DeviceId::new("gw-1").expect("id");
        for config in [0, 100, 5_000, 16_000, 17_000] {
            let mut w = spec("a");
            w.config = vec![b'x'; config];
            let ds = DesiredState {
                device: device.clone(),
                generation: u64::MAX,
                issued_at: 1_000_000,
                expires_at: 1_000_000 + DESIRED_TTL_SECS,
                workloads: vec![w.clone()],
                sealed: vec![],
                staged: vec![],
            };
            let signed = trust::sign(DocType::DesiredState, &ds, &[&hub.hub_key]);
            let real = codec::encode(&Message::DesiredState(signed));
            match (fits.check(&device, vec![w]), real) {
                (Ok(()), Ok(_)) => {}
                (Err(over), Err(codec::EncodeError::TooLarge { len, .. })) => {
                    assert_eq!(over.len, len)
                }
                (mine, real) => panic!("config {config}: computed {mine:?}, encoder {real:?}"),
            }
        }
    }
}
