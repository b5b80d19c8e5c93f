//! Admission: the facts of a candidate apply (its workloads' limits and privileges, the releases' names and
//! signers, where it lands, the waves it would form) gathered for the pure rules in [`crate::admission`].

use crate::admission::{Candidate, Verdict, WorkloadFacts, evaluate};
use crate::hub::{Hub, HubError};
use crate::spec::Deployment;
use flotilla_hub_core::rollout::plan_waves;
use flotilla_shared::DeviceId;
use flotilla_shared::wire::{NetworkMode, WorkloadSpec};
use std::collections::{BTreeMap, BTreeSet};

impl Hub {
    /// The verdicts of the admission policy on applying `d` (from `source`, resolved to `specs`) over `placed`;
    /// empty when the hub has no policy.
    pub(crate) fn admission(
        &self,
        source: &str,
        d: &Deployment,
        specs: &[WorkloadSpec],
        placed: &[DeviceId],
    ) -> Result<Vec<Verdict>, HubError> {
        let Some(file) = &self.policy else {
            return Ok(vec![]);
        };
        // Which limits the spec sets itself (a policy may require them), read from the source as written.
        let raw: toml::Value =
            toml::from_str(source).unwrap_or(toml::Value::Table(Default::default()));
        let raw_workloads = raw.get("workloads").and_then(|w| w.as_array());
        let mut workloads = Vec::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            let row = self.store.release_by_digest(&s.release)?;
            let table = raw_workloads
                .and_then(|w| w.get(i))
                .and_then(|w| w.as_table());
            let mut effective = BTreeMap::from([
                ("memory_mib", s.resources.memory_mib),
                ("cpu_ms", s.resources.cpu_ms),
            ]);
            if let Some(c) = &s.container {
                effective.insert("pids", c.pids);
            }
            let set = effective
                .iter()
                .filter(|(k, _)| table.is_some_and(|t| t.contains_key(**k)))
                .map(|(k, v)| (*k, *v))
                .collect();
            workloads.push(WorkloadFacts {
                name: s.name.to_string(),
                release: row
                    .as_ref()
                    .map_or_else(String::new, |r| r.release.name.to_string()),
                signers: row
                    .as_ref()
                    .map(|r| {
                        r.signed
                            .signatures
                            .iter()
                            .map(|e| hex::encode(e.key_id))
                            .collect()
                    })
                    .unwrap_or_default(),
                set,
                effective,
                host_network: s
                    .container
                    .as_ref()
                    .is_some_and(|c| c.network == NetworkMode::Host),
                devices: s.container.as_ref().is_some_and(|c| !c.devices.is_empty()),
                capabilities: s
                    .container
                    .as_ref()
                    .map(|c| c.capabilities.clone())
                    .unwrap_or_default(),
            });
        }
        let mut regions: BTreeMap<DeviceId, Option<String>> = BTreeMap::new();
        for id in placed {
            let region = self.store.device_region(id)?.flatten();
            regions.insert(id.clone(), region);
        }
        let wave_sizes = match &d.rollout {
            Some(plan) => plan_waves(&plan.waves, &regions)
                .iter()
                .map(Vec::len)
                .collect(),
            None => vec![placed.len()],
        };
        let candidate = Candidate {
            workloads,
            regions: regions.values().cloned().collect::<BTreeSet<_>>(),
            placed: placed.len(),
            rollout: d.rollout.as_ref().map(|p| p.waves.clone()),
            wave_sizes,
        };
        let mut file = file.borrow_mut();
        Ok(evaluate(file.current(), &candidate))
    }
}

/// The refusal for a set of verdicts with denials: every denied rule with its field, one per line.
pub(crate) fn refusal(file: &str, verdicts: &[Verdict]) -> Option<HubError> {
    let denied: Vec<String> = verdicts
        .iter()
        .filter(|v| !v.allowed)
        .map(|v| {
            format!(
                "{file}: field `{}`: policy rule {}: {}",
                v.field, v.rule, v.message
            )
        })
        .collect();
    (!denied.is_empty()).then(|| HubError::Policy(denied.join("\n")))
}
