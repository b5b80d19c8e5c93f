//! `flotilla deploy diff D --from REV --to REV`: what changed between two kept revisions of a deployment, as the
//! spec text (a unified diff) and as meaning (workloads added or removed, releases, settings, the rollout plan).

use crate::hub::{Hub, HubError};
use crate::spec::{self, Deployment, WorkloadTemplate};
use serde::Serialize;

/// The difference between two revisions.
#[derive(Debug, Serialize)]
pub struct SpecDiff {
    pub deployment: String,
    pub from: u64,
    pub to: u64,
    /// One sentence per change, in spec order.
    pub changes: Vec<String>,
    /// The spec text, as a unified diff.
    pub unified: String,
}

/// What differs between two versions of one workload.
fn workload_changes(a: &WorkloadTemplate, b: &WorkloadTemplate) -> Vec<String> {
    let name = &b.name;
    let mut out = vec![];
    if a.release != b.release {
        out.push(format!(
            "workload {name}: release {} -> {}",
            a.release, b.release
        ));
    }
    let fields: [(&str, bool); 9] = [
        ("resources", a.resources != b.resources),
        ("tick_ms", a.tick_ms != b.tick_ms),
        ("restart", a.restart != b.restart),
        ("health", a.health != b.health),
        ("config", a.config != b.config),
        ("config overrides", a.overrides != b.overrides),
        ("geofence", a.geofence != b.geofence),
        ("container settings", a.container != b.container),
        ("telemetry declarations", a.telemetry != b.telemetry),
    ];
    for (field, changed) in fields {
        if changed {
            out.push(format!("workload {name}: {field} changed"));
        }
    }
    out
}

/// Every change from `a` to `b`, in meaning.
pub fn changes(a: &Deployment, b: &Deployment) -> Vec<String> {
    let mut out = vec![];
    for w in &a.workloads {
        if !b.workloads.iter().any(|x| x.name == w.name) {
            out.push(format!("workload {} removed (was {})", w.name, w.release));
        }
    }
    for w in &b.workloads {
        match a.workloads.iter().find(|x| x.name == w.name) {
            None => out.push(format!("workload {} added ({})", w.name, w.release)),
            Some(old) => out.extend(workload_changes(old, w)),
        }
    }
    if a.target != b.target {
        out.push("target changed (which devices it selects)".into());
    }
    if a.policy != b.policy || a.constraints != b.constraints {
        out.push("placement changed".into());
    }
    match (&a.rollout, &b.rollout) {
        (None, Some(_)) => out.push("[rollout] added: changes roll out wave by wave".into()),
        (Some(_), None) => {
            out.push("[rollout] removed: changes apply to all devices at once".into())
        }
        (Some(x), Some(y)) if x != y => out.push("[rollout] plan changed".into()),
        _ => {}
    }
    out
}

impl Hub {
    /// The difference between revisions `from` and `to` of deployment `name`.
    pub fn deployment_diff(&self, name: &str, from: u64, to: u64) -> Result<SpecDiff, HubError> {
        let source = |rev: u64| -> Result<String, HubError> {
            self.store.deployment_revision(name, rev)?.ok_or_else(|| {
                let kept: Vec<String> = self
                    .store
                    .deployment_revisions(name)
                    .unwrap_or_default()
                    .iter()
                    .map(|(r, _)| r.to_string())
                    .collect();
                HubError::NotFound(format!(
                    "deployment {name} has no revision {rev} (kept: {})",
                    if kept.is_empty() {
                        "none".to_owned()
                    } else {
                        kept.join(", ")
                    }
                ))
            })
        };
        let (a, b) = (source(from)?, source(to)?);
        let parse = |rev: u64, text: &str| {
            spec::parse(&format!("{name} revision {rev}"), text)
                .map_err(|e| HubError::Internal(format!("a kept revision no longer parses: {e}")))
        };
        let changes = changes(&parse(from, &a)?, &parse(to, &b)?);
        let unified = similar::TextDiff::from_lines(&a, &b)
            .unified_diff()
            .context_radius(3)
            .header(
                &format!("{name} revision {from}"),
                &format!("{name} revision {to}"),
            )
            .to_string();
        Ok(SpecDiff {
            deployment: name.to_owned(),
            from,
            to,
            changes,
            unified,
        })
    }
}
