//! The fleet: who the devices are and what they say. Enrollment ([`enroll`]), reports and presence ([`reports`]),
//! and the views of the device registry that placement and the API read.

pub mod credentials;
pub mod enroll;
pub mod logs;
pub mod recent;
pub mod reports;
pub mod revoke;
pub mod summary;

use crate::store::DeviceRow;
use flotilla_hub_core::DeviceView;
use flotilla_shared::wire::Inventory;

/// The placement core's view of a registered device.
pub(crate) fn device_view(d: &DeviceRow) -> DeviceView {
    DeviceView {
        id: d.id.clone(),
        labels: labels(&d.inventory),
        region: d.inventory.region.as_ref().map(|r| r.to_string()),
        zone: d.inventory.zone.as_ref().map(|z| z.to_string()),
        location: d.inventory.location,
        arch: d.inventory.arch.clone(),
        runtimes: d.inventory.runtimes.clone(),
        memory_mib: d.inventory.memory_mib,
        online: d.online,
        offline_since: d.offline_since,
    }
}

/// A device's labels for placement: its own, and what it says about its system software under `flotilla.io/`
/// (`device-type`, `firmware-version`, `firmware-slot`, `agent-version`), so selectors can target, say, the
/// devices still on an old firmware.
pub(crate) fn labels(inv: &Inventory) -> std::collections::BTreeMap<String, String> {
    let mut out: std::collections::BTreeMap<String, String> = inv.labels.iter().cloned().collect();
    if let Some(fw) = &inv.firmware {
        out.insert("flotilla.io/device-type".into(), fw.compatible.clone());
        out.insert("flotilla.io/firmware-version".into(), fw.version.clone());
        out.insert("flotilla.io/firmware-slot".into(), fw.slot.clone());
    }
    out.insert(
        "flotilla.io/agent-version".into(),
        inv.agent_release
            .clone()
            .unwrap_or_else(|| inv.agent_version.clone()),
    );
    out
}

/// Rejects inventories that would poison placement (non-finite positions, absurd labels).
pub(crate) fn validate_inventory(inv: &Inventory) -> Result<(), String> {
    if let Some(l) = inv.location
        && !(l.lat.is_finite() && l.lon.is_finite() && l.lat.abs() <= 90.0 && l.lon.abs() <= 180.0)
    {
        return Err("location is not a valid latitude/longitude".into());
    }
    if inv.labels.len() > 64
        || inv
            .labels
            .iter()
            .any(|(k, v)| k.len() > 64 || v.len() > 256)
    {
        return Err("too many or too long labels".into());
    }
    let long = |s: &str| s.len() > 128;
    if inv.firmware.as_ref().is_some_and(|f| {
        long(&f.compatible) || long(&f.version) || long(&f.slot) || long(&f.backend)
    }) || inv.agent_release.as_deref().is_some_and(long)
    {
        return Err("too long firmware or agent version fields".into());
    }
    if let Some(e) = &inv.container_engine
        && [&e.name, &e.api_version, &e.storage_driver]
            .iter()
            .any(|s| s.len() > 128)
    {
        return Err("container engine description too long".into());
    }
    Ok(())
}
