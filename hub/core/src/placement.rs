//! Geo-aware placement: a pure, deterministic function from (devices, target, policy, constraints, previous choice,
//! now) to the set of chosen devices, with a reason for every device that was not chosen.

use flotilla_shared::DeviceId;
use flotilla_shared::geo;
use flotilla_shared::wire::{Geofence, LatLon, WorkloadKind};
use std::collections::{BTreeMap, BTreeSet};

/// What placement knows about a device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceView {
    pub id: DeviceId,
    pub labels: BTreeMap<String, String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub location: Option<LatLon>,
    pub arch: String,
    pub runtimes: Vec<WorkloadKind>,
    pub memory_mib: u32,
    pub online: bool,
    /// Unix seconds since when the device has been offline (None while online).
    pub offline_since: Option<u64>,
}

/// Which devices a deployment may use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Target {
    /// Label equality selector: every pair must match.
    pub selector: BTreeMap<String, String>,
    /// Allowed regions; empty means any.
    pub regions: Vec<String>,
    pub zones: Vec<String>,
    pub geofence: Option<Geofence>,
}

/// Hard requirements on a device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Constraints {
    pub arch: Option<String>,
    pub runtime: Option<WorkloadKind>,
    pub min_memory_mib: u32,
}

/// How many of the eligible devices to choose, and which.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    /// Every eligible device.
    Every,
    /// `count` devices in each region; a chosen device offline for longer than `grace_secs` is replaced by another
    /// healthy device of the same region.
    PerRegion { count: u32, grace_secs: u64 },
    /// The `k` eligible devices nearest to `point`.
    Nearest { k: u32, point: LatLon },
    /// `count` devices spread over zones in proportion to `weights` (zones without a weight get none).
    Spread {
        count: u32,
        weights: BTreeMap<String, u32>,
    },
}

/// Why a device was not chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Excluded {
    /// A selector label is missing or differs: `key`.
    Label(String),
    Region,
    Zone,
    OutsideGeofence,
    Arch,
    Runtime,
    Memory,
    /// Eligible, but the policy chose other devices (count reached, farther away, zone full, offline too long).
    NotChosen,
}

/// The result of placement.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    pub chosen: BTreeSet<DeviceId>,
    pub excluded: BTreeMap<DeviceId, Excluded>,
}

fn eligibility(d: &DeviceView, t: &Target, c: &Constraints) -> Result<(), Excluded> {
    for (k, v) in &t.selector {
        if d.labels.get(k) != Some(v) {
            return Err(Excluded::Label(k.clone()));
        }
    }
    if !t.regions.is_empty() && !d.region.as_ref().is_some_and(|r| t.regions.contains(r)) {
        return Err(Excluded::Region);
    }
    if !t.zones.is_empty() && !d.zone.as_ref().is_some_and(|z| t.zones.contains(z)) {
        return Err(Excluded::Zone);
    }
    if let Some(f) = &t.geofence
        && !geo::contains(f, d.location)
    {
        return Err(Excluded::OutsideGeofence);
    }
    if c.arch.as_ref().is_some_and(|a| a != &d.arch) {
        return Err(Excluded::Arch);
    }
    if c.runtime.is_some_and(|r| !d.runtimes.contains(&r)) {
        return Err(Excluded::Runtime);
    }
    if d.memory_mib < c.min_memory_mib {
        return Err(Excluded::Memory);
    }
    Ok(())
}

/// Whether a device can hold a placement: online, or offline for no longer than the grace period.
fn usable(d: &DeviceView, grace_secs: u64, now: u64) -> bool {
    d.online
        || d.offline_since
            .is_some_and(|s| now.saturating_sub(s) <= grace_secs)
}

/// Picks up to `n` from `pool` (already sorted by preference), keeping previously chosen usable devices first so
/// placements are sticky and do not churn.
fn pick<'a>(
    pool: &[&'a DeviceView],
    n: usize,
    previous: &BTreeSet<DeviceId>,
    grace_secs: u64,
    now: u64,
) -> Vec<&'a DeviceView> {
    let mut out: Vec<&DeviceView> = pool
        .iter()
        .copied()
        .filter(|d| previous.contains(&d.id) && usable(d, grace_secs, now))
        .take(n)
        .collect();
    for d in pool {
        if out.len() >= n {
            break;
        }
        if d.online && !out.iter().any(|o| o.id == d.id) {
            out.push(d);
        }
    }
    out
}

/// Places one deployment. Deterministic: the same inputs give the same output, independent of input order.
pub fn place(
    devices: &[DeviceView],
    target: &Target,
    policy: &Policy,
    constraints: &Constraints,
    previous: &BTreeSet<DeviceId>,
    now: u64,
) -> Placement {
    let mut result = Placement::default();
    let mut eligible: Vec<&DeviceView> = Vec::new();
    for d in devices {
        match eligibility(d, target, constraints) {
            Ok(()) => eligible.push(d),
            Err(why) => {
                result.excluded.insert(d.id.clone(), why);
            }
        }
    }
    eligible.sort_by(|a, b| a.id.cmp(&b.id));
    let chosen: Vec<&DeviceView> = match policy {
        Policy::Every => eligible.clone(),
        Policy::PerRegion { count, grace_secs } => {
            let mut by_region: BTreeMap<Option<&String>, Vec<&DeviceView>> = BTreeMap::new();
            for d in &eligible {
                by_region.entry(d.region.as_ref()).or_default().push(d);
            }
            by_region
                .values()
                .flat_map(|pool| pick(pool, *count as usize, previous, *grace_secs, now))
                .collect()
        }
        Policy::Nearest { k, point } => {
            let mut located: Vec<(f64, &DeviceView)> = eligible
                .iter()
                .filter_map(|d| d.location.map(|l| (geo::distance_m(*point, l), *d)))
                .collect();
            located.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
            located
                .into_iter()
                .filter(|(_, d)| d.online)
                .take(*k as usize)
                .map(|(_, d)| d)
                .collect()
        }
        Policy::Spread { count, weights } => {
            let quotas = spread_quotas(*count, weights);
            let mut out = Vec::new();
            for (zone, quota) in quotas {
                let pool: Vec<&DeviceView> = eligible
                    .iter()
                    .copied()
                    .filter(|d| d.zone.as_deref() == Some(zone.as_str()))
                    .collect();
                out.extend(pick(&pool, quota as usize, previous, 0, now));
            }
            out
        }
    };
    result.chosen = chosen.iter().map(|d| d.id.clone()).collect();
    for d in eligible {
        if !result.chosen.contains(&d.id) {
            result.excluded.insert(d.id.clone(), Excluded::NotChosen);
        }
    }
    result
}

/// Splits `count` over zones in proportion to `weights` with the largest-remainder method (ties by zone name).
pub fn spread_quotas(count: u32, weights: &BTreeMap<String, u32>) -> BTreeMap<String, u32> {
    let total: u64 = weights.values().map(|w| u64::from(*w)).sum();
    let mut out: BTreeMap<String, u32> = weights.keys().map(|z| (z.clone(), 0)).collect();
    if total == 0 {
        return out;
    }
    let mut rema: Vec<(u64, &String)> = Vec::new();
    let mut assigned = 0u32;
    for (z, w) in weights {
        let exact = u64::from(count) * u64::from(*w);
        let q = u32::try_from(exact / total).unwrap_or(u32::MAX);
        assigned += q;
        out.insert(z.clone(), q);
        rema.push((exact % total, z));
    }
    rema.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    for (_, z) in rema
        .into_iter()
        .take(count.saturating_sub(assigned) as usize)
    {
        if let Some(q) = out.get_mut(z) {
            *q += 1;
        }
    }
    out
}
