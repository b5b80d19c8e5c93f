//! Container updates on this machine's real Docker engine: the update strategies (delete- and kill-then-download),
//! fifty successive updates in a bounded data directory, recovery from a full disk, and the optional registry
//! source (a real `docker-registry` on loopback), including a registry that serves another image than the signed
//! one and a registry that is down.

use super::containers::{cleanup, container, container_agent, running};
use flotilla_fleet_tests::{
    FleetBuilder, PATIENCE, Registry, busybox_image, docker, image_variant, wait_for,
};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A workload spec for version `v` of release `web` on `device`, with extra TOML lines.
fn web(device: &str, v: u32, extra: &str) -> String {
    format!(
        "name = \"web\"\n[target]\nselector = {{ device = \"{device}\" }}\n[[workloads]]\nname = \"web\"\n\
         release = \"web@{v}.0.0\"\nkind = \"container\"\nmemory_mib = 16\nrestart = \"always\"\n\
         command = [\"/bin/sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done\"]\n{extra}"
    )
}

/// Waits until the device reports version `v` of `web` running and its container runs; returns the image ID.
fn wait_version(fleet: &flotilla_fleet_tests::Fleet, id: &str, v: u32) -> String {
    wait_for(&format!("version {v} running"), PATIENCE, || {
        let d = fleet.hub.device(id)?;
        let w = d["workloads"].as_array()?.first()?.clone();
        (w["version"] == format!("{v}.0.0") && w["state"] == "running").then_some(())?;
        let (_, c) = running(id, "web")?;
        Some(c["Image"].as_str()?.to_owned())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", fleet.hub.device(id)))
}

fn image_present(image: &str) -> bool {
    flotilla_fleet_tests::image_present(image)
}

/// Files in the agent's artifact cache.
fn cached(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("artifacts")).map_or(0, |d| d.count())
}

/// The signed tarball size of release `web@{v}.0.0`.
fn release_size(fleet: &flotilla_fleet_tests::Fleet, v: u32) -> u64 {
    let releases = fleet.hub.client.get("/api/v1/releases").expect("releases");
    releases
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|r| r["name"] == "web" && r["version"] == format!("{v}.0.0"))
        })
        .and_then(|r| r["size"].as_u64())
        .expect("release size")
}

/// Versions 1..=`n` of one busybox image, as canonical tarballs in `dir`.
fn variants(dir: &Path, n: u32) -> Vec<PathBuf> {
    let base = busybox_image(dir, "base").expect("base image");
    (1..=n)
        .map(|v| image_variant(&base, v, dir).expect("variant"))
        .collect()
}

/// Delete-then-download on a device without room for two versions: the old container, image and tarball go
/// first, then the new version is fetched and runs. The same update with download-then-kill is refused up front
/// for disk space, and the running version keeps running.
#[test]
fn delete_then_download_updates_where_two_versions_do_not_fit() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let tars = variants(scratch.path(), 3);
    let size = std::fs::metadata(&tars[0]).expect("size").len();
    // Room for one version (the tarball and the engine's copy, plus the 2 MiB reserve), not for two.
    let mib = |b: f64| b / f64::from(1 << 20);
    let quota = (mib(2.5 * size as f64) + 2.5).ceil() as u64;
    let (id, mut agent) = container_agent("delfirst");
    agent.extra_limits = format!("max_data_mib = {quota}");
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup = cleanup(&id);
    let fleet = FleetBuilder::new().agent(agent).start().expect("fleet");
    let strategy = "update_strategy = \"delete-then-download\"\n";
    for (v, tar) in (1..=3).zip(&tars) {
        fleet
            .hub
            .push_container("web", &format!("{v}.0.0"), 1, tar)
            .expect("release");
    }
    assert!(
        release_size(&fleet, 1) <= size + 4096,
        "variants are about the size measured"
    );
    fleet.hub.apply(&web(&id, 1, strategy)).expect("apply v1");
    let first = wait_version(&fleet, &id, 1);
    fleet.hub.apply(&web(&id, 2, strategy)).expect("apply v2");
    let second = wait_version(&fleet, &id, 2);
    wait_for("the old image removed", PATIENCE, || {
        (!image_present(&first)).then_some(())
    })
    .expect("old image gone");
    let dir = fleet.agent(&id).state_dir();
    wait_for("only the new tarball cached", PATIENCE, || {
        (cached(&dir) == 1).then_some(())
    })
    .expect("one tarball");
    // Download-then-kill (the default) needs room for both: refused up front, version 2 keeps running.
    fleet.hub.apply(&web(&id, 3, "")).expect("apply v3");
    wait_for("the disk refusal", PATIENCE, || {
        let d = fleet.hub.device(&id)?;
        let w = d["workloads"].as_array()?.first()?.clone();
        w["rejected"]
            .as_str()?
            .contains("not enough disk space")
            .then_some(())
    })
    .expect("refused");
    let (_, c) = running(&id, "web").expect("version 2 still runs");
    assert_eq!(c["Image"].as_str(), Some(second.as_str()));
}

/// Kill-then-download: the old container stops as soon as the new version is wanted, while its image is still
/// downloading (here over a slowed link); the new one starts when it has arrived.
#[test]
fn kill_then_download_stops_the_old_version_first() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let base = busybox_image(scratch.path(), "base").expect("base image");
    let (id, agent) = container_agent("killfirst");
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup = cleanup(&id);
    let fleet = FleetBuilder::new()
        .agent(agent)
        .with_proxies()
        .start()
        .expect("fleet");
    let strategy = "update_strategy = \"kill-then-download\"\n";
    for v in 1..=2 {
        let tar = image_variant(&base, v, scratch.path()).expect("variant");
        fleet
            .hub
            .push_container("web", &format!("{v}.0.0"), 1, &tar)
            .expect("release");
    }
    fleet.hub.apply(&web(&id, 1, strategy)).expect("apply v1");
    wait_version(&fleet, &id, 1);
    let proxy = fleet.agent(&id).proxy.as_ref().expect("proxy");
    // About 20 s for the tarball: long enough to see the old version gone while the new one downloads.
    proxy.set_rate(200_000);
    fleet.hub.apply(&web(&id, 2, strategy)).expect("apply v2");
    wait_for("old version stopped while downloading", PATIENCE, || {
        let d = fleet.hub.device(&id)?;
        let w = d["workloads"].as_array()?.first()?.clone();
        (w["state"] == "downloading" && container(&id, "web").is_none()).then_some(())
    })
    .expect("killed first");
    proxy.set_rate(0);
    wait_version(&fleet, &id, 2);
}

/// Fifty successive updates in a data directory bounded to a few versions: each one fits because collection
/// keeps only the current and the previous version (tarballs and images), and every older image the agent
/// loaded is gone from the engine at the end.
#[test]
fn fifty_updates_stay_within_a_bounded_data_directory() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let base = busybox_image(scratch.path(), "base").expect("base image");
    let first = image_variant(&base, 1, scratch.path()).expect("variant");
    let size = std::fs::metadata(&first).expect("size").len();
    // Current + previous tarball, plus room for the next one twice, plus the reserve: no room for leftovers.
    let quota = ((5 * size) as f64 / f64::from(1 << 20) + 3.0).ceil() as u64;
    let (id, mut agent) = container_agent("fifty");
    agent.extra_limits = format!("max_data_mib = {quota}");
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup = cleanup(&id);
    let fleet = FleetBuilder::new().agent(agent).start().expect("fleet");
    let mut images = Vec::new();
    let t0 = std::time::Instant::now();
    for v in 1..=50 {
        let tar = image_variant(&base, v, scratch.path()).expect("variant");
        fleet
            .hub
            .push_container("web", &format!("{v}.0.0"), 1, &tar)
            .expect("release");
        let _ = std::fs::remove_file(&tar);
        fleet.hub.apply(&web(&id, v, "")).expect("apply");
        images.push(wait_version(&fleet, &id, v));
        eprintln!("version {v} running after {:?}", t0.elapsed());
    }
    let dir = fleet.agent(&id).state_dir();
    wait_for("current and previous tarballs only", PATIENCE, || {
        (cached(&dir) <= 2).then_some(())
    })
    .expect("tarballs collected");
    wait_for("older images removed", PATIENCE, || {
        images[..48].iter().all(|i| !image_present(i)).then_some(())
    })
    .expect("images collected");
    assert!(image_present(&images[48]), "previous image kept");
    assert!(image_present(&images[49]), "current image kept");
}

/// A tmpfs mounted over a directory, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full disk: the data directory (a small tmpfs) is filled while version 1 runs and version 2 is deployed.
/// The agent keeps running and keeps version 1 up; once space is back (nobody touches the agent), it accepts and
/// runs version 2 by itself.
#[test]
fn a_full_disk_is_survived_and_recovered_from_without_help() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let base = busybox_image(scratch.path(), "base").expect("base image");
    let (id, agent) = container_agent("enospc");
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup = cleanup(&id);
    let mut fleet = FleetBuilder::new().agent(agent).start().expect("fleet");
    wait_for("enrolled and online", PATIENCE, || {
        (fleet.hub.device(&id)?["online"] == true).then_some(())
    })
    .expect("online");
    // Move the agent's state onto a 48 MiB tmpfs (a real file system that can fill up).
    let state = fleet.agent(&id).state_dir();
    fleet.agent_mut(&id).kill9();
    let saved = state.with_extension("saved");
    std::fs::rename(&state, &saved).expect("move state");
    std::fs::create_dir(&state).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&state)
        .status()
        .expect("mount");
    assert!(
        mounted.success(),
        "mounting a tmpfs needs root (CI runs as root)"
    );
    let _tmpfs = Tmpfs(state.clone());
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", saved.display()))
        .arg(&state)
        .status()
        .expect("cp");
    assert!(copied.success());
    fleet.agent_mut(&id).start().expect("restart");
    for v in 1..=2 {
        let tar = image_variant(&base, v, scratch.path()).expect("variant");
        fleet
            .hub
            .push_container("web", &format!("{v}.0.0"), 1, &tar)
            .expect("release");
    }
    fleet.hub.apply(&web(&id, 1, "")).expect("apply v1");
    let first = wait_version(&fleet, &id, 1);
    // Fill the file system to the last byte.
    let filler = state.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 1 << 16];
        while f.write_all(&block).is_ok() {}
        let mut byte = [0u8; 1];
        while f.write_all(&byte).is_ok() {
            byte[0] = 1;
        }
    }
    fleet.hub.apply(&web(&id, 2, "")).expect("apply v2");
    // The agent says why it cannot take version 2: the database cannot persist it, or the download is refused.
    wait_for("the full disk noticed", PATIENCE, || {
        let agent = fleet.agent(&id);
        let log = agent.log();
        let refused = fleet.hub.device(&id).is_some_and(|d| {
            d["workloads"][0]["rejected"]
                .as_str()
                .is_some_and(|r| r.contains("not enough disk space"))
        });
        (refused || log.contains("cannot persist desired state")).then_some(())
    })
    .expect("noticed");
    let (_, c) = running(&id, "web").expect("version 1 keeps running on a full disk");
    assert_eq!(c["Image"].as_str(), Some(first.as_str()));
    std::fs::remove_file(&filler).expect("space back");
    wait_version(&fleet, &id, 2);
    let agent = fleet.agent_mut(&id);
    let alive = agent
        .proc
        .as_mut()
        .is_some_and(|p| p.child.try_wait().ok().flatten().is_none());
    assert!(alive, "the agent never exited: {}", agent.log());
    agent.kill9();
}

/// The registry source: a release offering its image from a loopback registry is pulled from there (no tarball
/// over MQTT); a release whose registry serves another image than the signed one falls back to the signed
/// tarball over MQTT and the foreign image is removed; with the registry down the tarball comes over MQTT too.
#[test]
fn registry_first_with_fallback_to_mqtt() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let tars = variants(scratch.path(), 4);
    let mut registry = Registry::start().expect("registry");
    let refs: Vec<String> = tars
        .iter()
        .enumerate()
        .map(|(i, t)| registry.push(t, &format!("v{}", i + 1)).expect("push"))
        .collect();
    let (id, agent) = container_agent("registry");
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup = cleanup(&id);
    let fleet = FleetBuilder::new().agent(agent).start().expect("fleet");
    let dir = fleet.agent(&id).state_dir();
    // Version 1 from the registry.
    fleet
        .hub
        .push_container_with_registry("web", "1.0.0", 1, &tars[0], &refs[0])
        .expect("release");
    fleet.hub.apply(&web(&id, 1, "")).expect("apply v1");
    let first = wait_version(&fleet, &id, 1);
    let digests = docker(&["image", "inspect", "-f", "{{json .RepoDigests}}", &first]);
    assert!(digests.contains(&refs[0]), "pulled: {digests}");
    assert_eq!(cached(&dir), 0, "no tarball came over MQTT");
    // Version 2's release names the registry's version 3: not the signed image.
    fleet
        .hub
        .push_container_with_registry("web", "2.0.0", 1, &tars[1], &refs[2])
        .expect("release");
    fleet.hub.apply(&web(&id, 2, "")).expect("apply v2");
    wait_version(&fleet, &id, 2);
    assert_eq!(cached(&dir), 1, "version 2's tarball came over MQTT");
    assert!(
        fleet
            .agent(&id)
            .log()
            .contains("the registry served another image than the signed one"),
        "the mismatch is logged"
    );
    assert!(!image_present(&refs[2]), "the foreign image was removed");
    // The registry goes down: version 4 comes over MQTT.
    registry.stop();
    fleet
        .hub
        .push_container_with_registry("web", "4.0.0", 1, &tars[3], &refs[3])
        .expect("release");
    fleet.hub.apply(&web(&id, 4, "")).expect("apply v4");
    wait_version(&fleet, &id, 4);
}
