//! Disruption budgets: at most `max_unavailable` devices of one group (devices sharing a zone or a label value,
//! e.g. one site) updating or unavailable at once, counted across every wave and every concurrent rollout.

use flotilla_shared::DeviceId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What devices a budget groups by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupBy {
    /// The device's zone.
    Zone,
    /// The value of one of the device's labels (e.g. `site`).
    Label(String),
}

/// How many devices of a group may be unavailable at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Limit {
    Count(u32),
    /// Of the group's size, rounded up, at least one (a budget that allows no device at all would stall every
    /// rollout; a site of one device may always update).
    Percent(u32),
}

/// One disruption budget of a rollout plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    pub group_by: GroupBy,
    pub max_unavailable: Limit,
}

impl Budget {
    /// The group a device with this zone and labels belongs to: `zone=Z` or `LABEL=V`; `None` when it has no such
    /// zone or label (the budget does not limit it).
    pub fn group_of(
        &self,
        zone: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Option<String> {
        match &self.group_by {
            GroupBy::Zone => zone.map(|z| format!("zone={z}")),
            GroupBy::Label(k) => labels.get(k).map(|v| format!("{k}={v}")),
        }
    }

    /// The most devices of a group of `size` that may be unavailable at once.
    pub fn allowed(&self, size: u32) -> u32 {
        match self.max_unavailable {
            Limit::Count(n) => n,
            Limit::Percent(p) => (u64::from(size) * u64::from(p.min(100)))
                .div_ceil(100)
                .max(1)
                .try_into()
                .unwrap_or(u32::MAX),
        }
    }
}

/// Devices unavailable outside one rollout, per group: offline or unhealthy devices and devices updating in other
/// rollouts. The hub computes it from the fleet and hands it to each rollout before driving it.
pub type Elsewhere = BTreeMap<String, BTreeSet<DeviceId>>;

/// Whether one more device of `groups` may start updating, given the devices unavailable in this rollout
/// (`own`) and elsewhere. Returns the first group at its limit.
pub fn blocking_group<'a>(
    budgets: &[Budget],
    groups: &'a [(usize, String)],
    sizes: &BTreeMap<String, u32>,
    own: &BTreeMap<String, BTreeSet<DeviceId>>,
    elsewhere: &Elsewhere,
) -> Option<&'a str> {
    groups.iter().find_map(|(i, key)| {
        let budget = budgets.get(*i)?;
        let allowed = budget.allowed(sizes.get(key).copied().unwrap_or(1));
        let mut busy: BTreeSet<&DeviceId> = own.get(key).into_iter().flatten().collect();
        busy.extend(elsewhere.get(key).into_iter().flatten());
        (busy.len() >= allowed as usize).then_some(key.as_str())
    })
}
