//! Admission policy (`flotilla serve --policy policy.toml`): rules every apply (and so every rollout start) is
//! checked against before anything is stored. The rules and their evaluation are pure (this module); reading and
//! reloading the file is [`file`]. A refusal names the rule and the spec field.

pub mod file;

use flotilla_hub_core::rollout::Wave;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// A resource bound: the spec must set the field (`required`) and/or stay at or under `max`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bound {
    #[serde(default)]
    pub required: bool,
    pub max: Option<u32>,
}

/// `[resources]`: bounds on `memory_mib`, `cpu_ms` and (containers) `pids`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceRules {
    pub memory_mib: Option<Bound>,
    pub cpu_ms: Option<Bound>,
    pub pids: Option<Bound>,
}

/// `[[releases]]`: in these regions, only these release names (a trailing `*` matches a prefix) and only releases
/// signed by one of these release keys (key ids as `flotilla keys` prints them).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRule {
    /// Regions the rule applies to; `["*"]` for every region.
    pub regions: Vec<String>,
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub signers: Vec<String>,
}

/// Container privileges a region may use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privileges {
    #[serde(default)]
    pub host_network: bool,
    #[serde(default)]
    pub devices: bool,
    /// Capabilities it may add (`NET_ADMIN`, ...); `["*"]` for any.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// `[containers]`: host network, devices and added capabilities are forbidden, except what `allow` grants every
/// region and `regions.NAME` grants one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerRules {
    #[serde(default)]
    pub allow: Privileges,
    #[serde(default)]
    pub regions: BTreeMap<String, Privileges>,
}

/// `[rollout]`: when a `[rollout]` section is required, and what it must look like.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRules {
    /// A change placed on more devices than this needs a `[rollout]` section.
    pub required_above_devices: Option<usize>,
    /// A rollout's first wave must be a canary.
    #[serde(default)]
    pub canary_required: bool,
    /// No wave (and no apply without a rollout) may reach more devices than this at once.
    pub max_wave_size: Option<usize>,
}

/// The whole policy file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub resources: ResourceRules,
    #[serde(default)]
    pub releases: Vec<ReleaseRule>,
    pub containers: Option<ContainerRules>,
    #[serde(default)]
    pub rollout: RolloutRules,
}

/// Why a policy file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub message: String,
}

impl Policy {
    /// Parses and checks a policy file's text.
    pub fn parse(file: &str, text: &str) -> Result<Self, PolicyError> {
        let err = |message: String| PolicyError {
            file: file.to_owned(),
            message,
        };
        let p: Policy = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        for (i, r) in p.releases.iter().enumerate() {
            if r.regions.is_empty() {
                return Err(err(format!(
                    "releases[{i}].regions: name at least one region, or \"*\""
                )));
            }
            if r.names.is_empty() && r.signers.is_empty() {
                return Err(err(format!("releases[{i}]: give names and/or signers")));
            }
            if let Some(bad) = r
                .signers
                .iter()
                .find(|s| s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(err(format!(
                    "releases[{i}].signers: {bad:?} is not a key id (16 hex digits, as `flotilla keys` prints)"
                )));
            }
        }
        Ok(p)
    }
}

/// One workload of the candidate, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadFacts {
    pub name: String,
    /// The release's name.
    pub release: String,
    /// Key ids (hex) that signed the release.
    pub signers: Vec<String>,
    /// Each field the spec sets explicitly, with its value (`memory_mib`, `cpu_ms`; `pids` for containers).
    pub set: BTreeMap<&'static str, u32>,
    /// The effective values (defaults included).
    pub effective: BTreeMap<&'static str, u32>,
    pub host_network: bool,
    pub devices: bool,
    pub capabilities: Vec<String>,
}

/// What an apply would do, as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub workloads: Vec<WorkloadFacts>,
    /// Regions of the devices it would be placed on (`None` for devices without one).
    pub regions: BTreeSet<Option<String>>,
    pub placed: usize,
    /// The `[rollout]` waves as written, when there is a section.
    pub rollout: Option<Vec<Wave>>,
    /// The sizes of the waves a rollout would form (or of the one change without a rollout).
    pub wave_sizes: Vec<usize>,
}

/// One rule's verdict.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    /// `resources.memory_mib`, `releases[0]`, `containers`, `rollout.max_wave_size`, ...
    pub rule: String,
    /// The spec field it is about.
    pub field: String,
    pub allowed: bool,
    pub message: String,
}

fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// Every rule of `policy` that applies to `c`, with its verdict.
pub fn evaluate(policy: &Policy, c: &Candidate) -> Vec<Verdict> {
    let mut out = vec![];
    let mut verdict = |rule: String, field: String, allowed: bool, message: String| {
        out.push(Verdict {
            rule,
            field,
            allowed,
            message,
        })
    };
    let bounds = [
        ("memory_mib", &policy.resources.memory_mib),
        ("cpu_ms", &policy.resources.cpu_ms),
        ("pids", &policy.resources.pids),
    ];
    for (i, w) in c.workloads.iter().enumerate() {
        for (key, bound) in bounds {
            let Some(bound) = bound else { continue };
            // `pids` applies to containers only: they are the workloads that have it.
            if !w.effective.contains_key(key) {
                continue;
            }
            let field = format!("workloads[{i}].{key}");
            let rule = format!("resources.{key}");
            if bound.required && !w.set.contains_key(key) {
                verdict(rule, field, false, format!("{}: {key} must be set", w.name));
                continue;
            }
            match (bound.max, w.effective.get(key)) {
                // 0 means "no limit" for pids: above any maximum.
                (Some(max), Some(&v)) if v > max || (key == "pids" && v == 0) => verdict(
                    rule,
                    field,
                    false,
                    format!("{}: {key} = {v} is above the maximum {max}", w.name),
                ),
                (_, v) => verdict(
                    rule,
                    field,
                    true,
                    format!(
                        "{}: {key} = {}",
                        w.name,
                        v.map_or("-".into(), |v| v.to_string())
                    ),
                ),
            }
        }
    }
    for (r, rule) in policy.releases.iter().enumerate() {
        let applies = rule.regions.iter().any(|p| p == "*")
            || c.regions
                .iter()
                .flatten()
                .any(|region| rule.regions.contains(region));
        if !applies {
            continue;
        }
        for (i, w) in c.workloads.iter().enumerate() {
            let field = format!("workloads[{i}].release");
            let name_ok =
                rule.names.is_empty() || rule.names.iter().any(|p| name_matches(p, &w.release));
            let signer_ok = rule.signers.is_empty()
                || w.signers
                    .iter()
                    .any(|s| rule.signers.iter().any(|a| a.eq_ignore_ascii_case(s)));
            let message = match (name_ok, signer_ok) {
                (true, true) => format!(
                    "{}: release {} allowed in {:?}",
                    w.name, w.release, rule.regions
                ),
                (false, _) => format!(
                    "{}: release {} is not allowed in {:?} (allowed: {})",
                    w.name,
                    w.release,
                    rule.regions,
                    rule.names.join(", ")
                ),
                (true, false) => format!(
                    "{}: release {} is signed by {} and {:?} allows only {}",
                    w.name,
                    w.release,
                    w.signers.join(", "),
                    rule.regions,
                    rule.signers.join(", ")
                ),
            };
            verdict(
                format!("releases[{r}]"),
                field,
                name_ok && signer_ok,
                message,
            );
        }
    }
    if let Some(rules) = &policy.containers {
        // A privilege is allowed when every region the deployment reaches grants it.
        let granted = |f: &dyn Fn(&Privileges) -> bool| {
            f(&rules.allow)
                || (!c.regions.is_empty()
                    && c.regions
                        .iter()
                        .all(|r| r.as_ref().and_then(|r| rules.regions.get(r)).is_some_and(f)))
        };
        for (i, w) in c.workloads.iter().enumerate() {
            let checks: [(bool, &str, bool); 2] = [
                (w.host_network, "network", granted(&|p| p.host_network)),
                (w.devices, "devices", granted(&|p| p.devices)),
            ];
            for (used, key, ok) in checks {
                if used {
                    verdict(
                        "containers".into(),
                        format!("workloads[{i}].container.{key}"),
                        ok,
                        format!(
                            "{}: {} {}",
                            w.name,
                            if key == "network" {
                                "host network"
                            } else {
                                "host devices"
                            },
                            if ok {
                                "allowed"
                            } else {
                                "are forbidden in the regions it reaches"
                            }
                        ),
                    );
                }
            }
            for cap in &w.capabilities {
                let ok = granted(&|p| {
                    p.capabilities
                        .iter()
                        .any(|a| a == "*" || a.eq_ignore_ascii_case(cap))
                });
                verdict(
                    "containers".into(),
                    format!("workloads[{i}].container.capabilities"),
                    ok,
                    format!(
                        "{}: capability {cap} {}",
                        w.name,
                        if ok {
                            "allowed"
                        } else {
                            "is forbidden in the regions it reaches"
                        }
                    ),
                );
            }
        }
    }
    let r = &policy.rollout;
    if let Some(n) = r.required_above_devices {
        let ok = c.rollout.is_some() || c.placed <= n;
        verdict(
            "rollout.required_above_devices".into(),
            "rollout".into(),
            ok,
            if ok {
                format!(
                    "{} devices placed (a [rollout] is required above {n})",
                    c.placed
                )
            } else {
                format!(
                    "{} devices placed: above {n}, a change needs a [rollout] section",
                    c.placed
                )
            },
        );
    }
    if r.canary_required
        && let Some(waves) = &c.rollout
    {
        let ok = matches!(waves.first(), Some(Wave::Canary { .. }));
        verdict(
            "rollout.canary_required".into(),
            "rollout.waves[0]".into(),
            ok,
            if ok {
                "the first wave is a canary".into()
            } else {
                "the first wave must be a canary (\"canary:PERCENT\")".into()
            },
        );
    }
    if let Some(max) = r.max_wave_size {
        let biggest = c.wave_sizes.iter().enumerate().max_by_key(|(_, n)| **n);
        if let Some((i, &n)) = biggest {
            let field = if c.rollout.is_some() {
                format!("rollout.waves[{i}]")
            } else {
                "rollout".into()
            };
            let ok = n <= max;
            verdict(
                "rollout.max_wave_size".into(),
                field,
                ok,
                if ok {
                    format!("the largest wave has {n} devices (at most {max})")
                } else if c.rollout.is_some() {
                    format!(
                        "wave {} would reach {n} devices at once; at most {max}",
                        i + 1
                    )
                } else {
                    format!(
                        "without a [rollout] this change reaches {n} devices at once; at most {max}"
                    )
                },
            );
        }
    }
    out
}

#[cfg(test)]
mod tests;
