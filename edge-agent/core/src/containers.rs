//! Container decisions without the engine: names and spec hashes, what to do with the containers the engine
//! reports (adopt, start, create, remove), and the local allow-list check.
//!
//! The agent never rebuilds a desired configuration from what the engine reports (that is how balena got
//! endless re-create loops): a container is identified by its name and `io.flotilla.spec-hash` label, both
//! derived from the signed spec, and is either exactly the wanted one or removed.

use flotilla_shared::wire::{NetworkMode, WorkloadSpec};
use flotilla_shared::{Digest, WorkloadName};
use std::collections::BTreeSet;

/// Label keys put on every container the agent creates.
pub const LABEL_MANAGED: &str = "io.flotilla.managed";
pub const LABEL_DEVICE: &str = "io.flotilla.device";
pub const LABEL_WORKLOAD: &str = "io.flotilla.workload";
pub const LABEL_SPEC_HASH: &str = "io.flotilla.spec-hash";
pub const LABEL_GENERATION: &str = "io.flotilla.generation";
pub const LABEL_RELEASE: &str = "io.flotilla.release";

/// The first 12 hex digits of the SHA-256 of the device id and the spec's canonical (postcard) encoding: any
/// change to the signed spec, release included, gives a new container; and two devices' agents sharing one engine
/// (a test bench, a multi-tenant gateway) never pick the same container name for the same spec.
pub fn spec_hash(device: &str, spec: &WorkloadSpec) -> String {
    let mut bytes = device.as_bytes().to_vec();
    bytes.push(0);
    bytes.extend(postcard::to_stdvec(spec).unwrap_or_default());
    Digest::of(&bytes).to_hex()[..12].to_owned()
}

/// `flotilla_<workload>_<spec hash>`: unique per workload version, valid as an engine container name.
pub fn container_name(workload: &WorkloadName, spec_hash: &str) -> String {
    format!("flotilla_{workload}_{spec_hash}")
}

/// A container the engine reports carrying this device's managed label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub name: String,
    pub workload: String,
    pub spec_hash: String,
    pub running: bool,
}

/// What to do with the wanted container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bring {
    /// It runs already: keep it (an agent restart does not restart a container).
    Adopt,
    /// It exists but is stopped: start it as it is (no re-create).
    StartExisting,
    /// It does not exist (never created, or the engine lost it): create it from the cached image.
    Create,
}

/// How to bring up the container `want` for `workload`, given the managed containers of this device, and which
/// of the workload's other containers (older specs, left over by a crash mid-update) to remove first.
pub fn bring_up(workload: &str, want: &str, found: &[Found]) -> (Vec<String>, Bring) {
    let remove = found
        .iter()
        .filter(|f| f.workload == workload && f.name != want)
        .map(|f| f.name.clone())
        .collect();
    let bring = match found.iter().find(|f| f.name == want) {
        Some(f) if f.running => Bring::Adopt,
        Some(_) => Bring::StartExisting,
        None => Bring::Create,
    };
    (remove, bring)
}

/// The managed containers to remove at start: any, in any state, whose name is not one the device may run now
/// (a wanted spec, or a last good version it may fall back to).
pub fn orphans(keep: &BTreeSet<String>, found: &[Found]) -> Vec<String> {
    found
        .iter()
        .filter(|f| !keep.contains(&f.name))
        .map(|f| f.name.clone())
        .collect()
}

/// The device's local allow-list (`[container]` in `agent.toml`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    pub host_network: bool,
    pub devices: Vec<String>,
    /// Upper case, without `CAP_`.
    pub capabilities: Vec<String>,
}

/// Checks what the spec asks beyond the hardened default against the allow-list. The error says what was asked
/// and that the device's allow-list is the side that said no.
pub fn allowed(spec: &WorkloadSpec, allow: &AllowList) -> Result<(), String> {
    let Some(c) = &spec.container else {
        return Ok(());
    };
    let no = |what: String, key: &str| {
        Err(format!(
            "the signed spec asks for {what}, which this device's allow-list (agent.toml [container] {key}) does \
             not permit"
        ))
    };
    if c.network == NetworkMode::Host && !allow.host_network {
        return no("the host network".into(), "allow_host_network");
    }
    if let Some(d) = c.devices.iter().find(|d| !allow.devices.contains(d)) {
        return no(format!("device {d}"), "allow_devices");
    }
    if let Some(cap) = c
        .capabilities
        .iter()
        .find(|cap| !allow.capabilities.contains(cap))
    {
        return no(format!("capability {cap}"), "allow_capabilities");
    }
    Ok(())
}

/// An image the agent loaded into the engine for a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedImage {
    pub workload: String,
    /// The engine's image ID (`sha256:...`).
    pub image: String,
    /// When it was loaded (unix seconds); later loads of the same image refresh it.
    pub loaded_at: u64,
}

/// When images beyond each workload's current and previous one are collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageGc {
    /// Unix seconds now.
    pub now: u64,
    /// Such an image stays until it was loaded this long ago (0: it goes at once).
    pub keep_secs: u64,
    /// The engine's disk is above its watermark: such images go whatever their age.
    pub disk_high: bool,
}

/// Which loaded images to remove: per workload still on the device (`workloads`) the newest two (the current one
/// and the previous, kept for a fast rollback) stay, and so does every image a wanted or last good spec names
/// (`in_use`); an image several workloads loaded goes only when none keeps it; a removed workload's images go.
/// The rest go once older than `gc.keep_secs`, or at once while the disk is above its watermark, oldest first.
/// Images the agent did not load are never candidates.
pub fn images_to_remove(
    loaded: &[LoadedImage],
    workloads: &BTreeSet<String>,
    in_use: &BTreeSet<String>,
    gc: ImageGc,
) -> Vec<String> {
    let mut by_workload: std::collections::BTreeMap<&str, Vec<&LoadedImage>> =
        std::collections::BTreeMap::new();
    for l in loaded.iter().filter(|l| workloads.contains(&l.workload)) {
        by_workload.entry(&l.workload).or_default().push(l);
    }
    let mut keep: BTreeSet<&str> = in_use.iter().map(String::as_str).collect();
    for images in by_workload.values_mut() {
        images.sort_by(|a, b| b.loaded_at.cmp(&a.loaded_at).then(b.image.cmp(&a.image)));
        keep.extend(images.iter().take(2).map(|l| l.image.as_str()));
    }
    // An image loaded for several workloads is as young as its newest load.
    let mut newest: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for l in loaded {
        let t = newest.entry(l.image.as_str()).or_insert(l.loaded_at);
        *t = (*t).max(l.loaded_at);
    }
    let mut remove: Vec<(u64, &str)> = newest
        .into_iter()
        .filter(|(i, _)| !keep.contains(i))
        .filter(|(_, at)| gc.disk_high || at.saturating_add(gc.keep_secs) <= gc.now)
        .map(|(i, at)| (at, i))
        .collect();
    remove.sort_unstable();
    remove.into_iter().map(|(_, i)| i.to_owned()).collect()
}
