//! Container workloads on this machine's real Docker engine: deployed end to end through the hub and the embedded
//! broker, hardened by default, adopted (not restarted) by a restarted agent, brought back from the cached image
//! with no network after the engine lost both the container and the image, crash-loop backoff, allow-list
//! refusals, and the hub refusing a legacy tarball before any device sees it.
//!
//! Device ids carry the test process id: the engine is shared by every test, and an agent removes containers
//! labelled with its device id that it does not want.

use flotilla_fleet_tests::{
    AgentSpec, DockerCleanup, FleetBuilder, PATIENCE, busybox_image, docker, wait_for,
};
use serde_json::Value;

pub(crate) fn device_id(what: &str) -> String {
    format!("ctr-{what}-{}", std::process::id())
}

/// A device id of this test process and its agent in eu-west, labelled `device = <id>` for specs to target.
pub(crate) fn container_agent(what: &str) -> (String, AgentSpec) {
    let id = device_id(what);
    let mut agent = AgentSpec::new(&id, "eu-west", 52.5, 13.4);
    agent.labels.push(("device".into(), id.clone()));
    (id, agent)
}

/// Removes the device's containers when the test ends, however it ends.
pub(crate) fn cleanup(id: &str) -> DockerCleanup {
    DockerCleanup {
        device: id.to_owned(),
        images: vec![],
    }
}

fn spec(device: &str, body: &str) -> String {
    format!(
        "name = \"web\"\n[target]\nselector = {{ device = \"{device}\" }}\n[[workloads]]\nname = \"web\"\n\
         release = \"web@1.0.0\"\nkind = \"container\"\nmemory_mib = 32\nrestart = \"always\"\nhealth_secs = 1\n{body}"
    )
}

/// The one container of `device`'s workload `workload`: (name, inspect JSON).
pub(crate) fn container(device: &str, workload: &str) -> Option<(String, Value)> {
    let ids = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=io.flotilla.device={device}"),
        "--filter",
        &format!("label=io.flotilla.workload={workload}"),
    ]);
    let id = ids.lines().next()?;
    let v: Value = serde_json::from_str(&docker(&["inspect", id])).ok()?;
    let c = v.get(0)?.clone();
    Some((c["Name"].as_str()?.trim_start_matches('/').to_owned(), c))
}

/// A container's stdout and stderr, for failure messages.
pub(crate) fn docker_logs(name: &str) -> String {
    std::process::Command::new("docker")
        .args(["logs", "--tail", "20", name])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default()
}

pub(crate) fn running(device: &str, workload: &str) -> Option<(String, Value)> {
    container(device, workload).filter(|(_, c)| c["State"]["Running"] == true)
}

#[test]
fn container_end_to_end_adopt_and_offline_reboot() {
    let id = device_id("e2e");
    let mut agent = AgentSpec::new(&id, "eu-west", 52.5, 13.4);
    agent.labels.push(("device".into(), id.clone()));
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup = cleanup(&id);
    let mut fleet = FleetBuilder::new()
        .with_proxies()
        .agent(agent)
        .start()
        .expect("fleet");
    let tar = busybox_image(&fleet.hub.dir, "web").expect("test image");
    fleet
        .hub
        .push_container("web", "1.0.0", 1, &tar)
        .expect("container release");
    // The device reports its engine; placement may require it.
    wait_for("the engine in the inventory", PATIENCE, || {
        let d = fleet.hub.device(&id)?;
        (d["runtimes"].as_array()?.iter().any(|r| r == "container")).then_some(d)
    })
    .expect("engine probed");
    let port = flotilla_fleet_tests::free_port();
    fleet
        .hub
        .apply(&spec(
            &id,
            &format!("command = [\"/bin/sh\", \"-c\", \"echo started; while true; do /bin/api-client POST /v1/telemetry/count 1; \
             /bin/api-client POST /v1/metrics/temp 21.5; sleep 1; done\"]\n\
             env = {{ GREETING = \"hello\" }}\nvolumes = [\"data:/var/lib/web\"]\nports = [\"{port}:8080\"]\n\
             [constraints]\nruntime = \"container\"\n"),
        ))
        .expect("apply");
    fleet
        .hub
        .wait_workload(&id, "web", "running")
        .expect("container running");
    let (name, c) = wait_for("the container", PATIENCE, || running(&id, "web")).expect("container");
    assert!(name.starts_with("flotilla_web_"), "{name}");
    // Hardened by default, restarted by the agent only, logs capped, created by image ID.
    let hc = &c["HostConfig"];
    assert_eq!(hc["ReadonlyRootfs"], true);
    assert_eq!(hc["Privileged"], false);
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
    assert!(
        hc["SecurityOpt"].to_string().contains("no-new-privileges"),
        "{hc}"
    );
    assert_eq!(hc["PidsLimit"], 256);
    assert_eq!(hc["Memory"], 32 << 20);
    assert_eq!(hc["RestartPolicy"]["Name"], "no");
    assert_eq!(hc["LogConfig"]["Type"], "local");
    assert!(
        c["Config"]["Image"]
            .as_str()
            .unwrap_or("")
            .starts_with("sha256:"),
        "{}",
        c["Config"]["Image"]
    );
    assert_eq!(c["Config"]["Labels"]["io.flotilla.managed"], "true");
    assert!(c["Config"]["Env"].to_string().contains("GREETING=hello"));
    // The named volume is the workload's (kept across its updates), the port published as asked.
    let mounts = c["Mounts"].to_string();
    assert!(
        mounts.contains("flotilla_web_data") && mounts.contains("/var/lib/web"),
        "{mounts}"
    );
    assert_eq!(
        hc["PortBindings"]["8080/tcp"][0]["HostPort"],
        port.to_string(),
        "{hc}"
    );
    // The host API socket: telemetry posted inside the container reaches the hub's telemetry feed.
    let mut feed = fleet
        .hub
        .feed_client(
            "containers",
            &["eu-west"],
            &[&format!("flotilla/v1/telemetry/eu-west/{id}/count")],
        )
        .expect("feed");
    let (topic, _) = feed.next_message(PATIENCE).unwrap_or_else(|| {
        panic!(
            "no telemetry record from the container; its output:\n{}",
            docker_logs(&name)
        )
    });
    assert!(topic.ends_with("/count"), "{topic}");
    // `flotilla logs`: the container's output, read from the engine by the device and sent over MQTT.
    let logs = fleet
        .hub
        .client
        .get(&format!("/api/v1/devices/{id}/logs/web?lines=50"))
        .expect("logs");
    let text = logs["text"].as_str().unwrap_or_default();
    assert!(text.contains("started") && text.contains("204"), "{logs}");
    let started_at = c["State"]["StartedAt"].clone();
    let container_id = c["Id"].clone();

    // An agent restart adopts the running container: same container, not restarted.
    let a = fleet.agent_mut(&id);
    a.kill9();
    a.start().expect("restart");
    a.wait_log(&["adopted running container"], 1)
        .expect("adopted");
    let (_, again) = running(&id, "web").expect("still running");
    assert_eq!(again["Id"], container_id);
    assert_eq!(again["State"]["StartedAt"], started_at, "not restarted");

    // Offline reboot after the engine lost the container and the image: back from the cached tarball, no network.
    let image = again["Image"].as_str().unwrap_or_default().to_owned();
    a.proxy.as_ref().expect("proxy").partition();
    a.kill9();
    docker(&["rm", "-f", &name]);
    docker(&["rmi", "-f", &image]);
    assert!(container(&id, "web").is_none());
    a.start().expect("cold start");
    a.wait_log(&["\"message\":\"running\"", "\"workload\":\"web\""], 1)
        .expect("running again offline");
    let (_, back) = wait_for("the container back", PATIENCE, || running(&id, "web")).expect("back");
    assert_ne!(back["Id"], container_id, "re-created");
    let log = a.log();
    assert!(
        log.contains("image loaded"),
        "reloaded from the cache:\n{log}"
    );
    assert!(
        !log.contains("\"message\":\"fetching\""),
        "nothing downloaded:\n{log}"
    );
    assert!(!log.contains("\"message\":\"connected\""), "really offline");
    a.proxy.as_ref().expect("proxy").heal();
    fleet
        .hub
        .wait_workload(&id, "web", "running")
        .expect("hub sees it running");
}

#[test]
fn crash_loop_backs_off_and_allow_list_refuses() {
    let (id, agent) = container_agent("refuse");
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup = cleanup(&id);
    let fleet = FleetBuilder::new().agent(agent).start().expect("fleet");
    let tar = busybox_image(&fleet.hub.dir, "web").expect("test image");
    fleet
        .hub
        .push_container("web", "1.0.0", 1, &tar)
        .expect("container release");

    // A container that exits with code 3: reported with its code, restarted with backoff by the agent.
    fleet
        .hub
        .apply(&spec(
            &id,
            "command = [\"/bin/sh\", \"-c\", \"echo dying; exit 3\"]\n",
        ))
        .expect("apply");
    let w = wait_for("the crash loop in the report", PATIENCE, || {
        let d = fleet.hub.device(&id)?;
        let w = d["workloads"].as_array()?.first()?.clone();
        (w["restarts"].as_u64()? >= 2).then_some(w)
    })
    .expect("restarts");
    assert!(
        w["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("exited with code 3"),
        "{w}"
    );
    assert_eq!(w["exit"]["kind"], "code", "a typed cause: {w}");
    assert_eq!(w["exit"]["detail"], 3, "{w}");
    let why = |fleet: &flotilla_fleet_tests::Fleet| {
        fleet
            .hub
            .client
            .get(&format!("/api/v1/why/{id}/web"))
            .expect("why")
            .to_string()
    };

    // A container that needs more memory than its limit: OOM-killed, said so, with the time to the next start.
    fleet
        .hub
        .apply(&spec(
            &id,
            "command = [\"/bin/dd\", \"if=/dev/zero\", \"of=/dev/null\", \"bs=64M\", \"count=1\"]\n",
        ))
        .expect("apply");
    let w = wait_for("the OOM kill in the report", PATIENCE, || {
        let d = fleet.hub.device(&id)?;
        let w = d["workloads"].as_array()?.first()?.clone();
        (w["exit"]["kind"] == "oom-killed" && w["state"] == "backing-off").then_some(w)
    })
    .expect("OOM-killed");
    assert!(w["retry_in_ms"].as_u64().is_some(), "next retry: {w}");
    wait_for("why names the OOM kill", PATIENCE, || {
        let why = why(&fleet);
        (why.contains("OOM-killed (memory limit 32 MiB)") && why.contains("next start in"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", why(&fleet)));

    // Host network is beyond the hardened default: the device's allow-list (empty) refuses it, saying so.
    fleet
        .hub
        .apply(&spec(&id, "network = \"host\"\n"))
        .expect("apply");
    let w = wait_for("the refusal in the report", PATIENCE, || {
        let d = fleet.hub.device(&id)?;
        let w = d["workloads"].as_array()?.first()?.clone();
        w["rejected"]
            .as_str()
            .is_some_and(|r| r.contains("allow_host_network"))
            .then_some(w)
    })
    .expect("refused");
    assert!(
        w["rejected"]
            .as_str()
            .unwrap_or("")
            .contains("refused by the device"),
        "{w}"
    );
    let why = why(&fleet);
    assert!(why.contains("allow_host_network"), "{why}");
    assert!(
        container(&id, "web").is_none_or(|(_, c)| c["HostConfig"]["NetworkMode"] != "host"),
        "no host-network container was created"
    );
}

/// A raw `docker save` tarball (legacy files, a tag inside) signed as a release is refused by the hub with the
/// device's own check, before any device could download it.
#[test]
fn hub_refuses_a_legacy_tagged_tarball() {
    let fleet = FleetBuilder::new().start().expect("fleet");
    let tar = busybox_image(&fleet.hub.dir, "raw").expect("test image");
    let raw = std::fs::read(&tar).expect("tar");
    let parts = flotilla_hub::image_import::read_source(raw.as_slice()).expect("parts");
    let (_, image) = flotilla_shared::image::write_canonical(&parts).expect("canonical");
    let release = flotilla_shared::wire::Release {
        name: flotilla_shared::WorkloadName::new("raw").expect("name"),
        version: "1".into(),
        epoch: 1,
        kind: flotilla_shared::wire::WorkloadKind::Container,
        artifact_digest: flotilla_shared::Digest::of(&raw),
        artifact_size: raw.len() as u64,
        precompiled: vec![],
        image: Some(image),
        compatible: None,
    };
    let key = flotilla_hub::keyfile::read_signing_key(&fleet.hub.release_key()).expect("key");
    let signed =
        flotilla_shared::trust::sign(flotilla_shared::trust::DocType::Release, &release, &[&key]);
    fleet
        .hub
        .client
        .post("/api/v1/artifacts", "application/octet-stream", &raw, &[])
        .expect("artifact upload");
    let err = fleet
        .hub
        .client
        .post(
            "/api/v1/releases",
            "application/octet-stream",
            &postcard::to_stdvec(&signed).expect("encode"),
            &[],
        )
        .expect_err("refused");
    assert!(format!("{err:#}").contains("legacy"), "{err:#}");
}

/// A container writing as fast as it can to stdout stays within its log cap (the engine's `local` driver, two
/// files of half the cap), and one whose health check fails is restarted by the agent, saying why.
#[test]
fn log_cap_and_unhealthy_restart() {
    let (id, agent) = container_agent("logs");
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup = cleanup(&id);
    let fleet = FleetBuilder::new().agent(agent).start().expect("fleet");
    let tar = busybox_image(&fleet.hub.dir, "web").expect("test image");
    for name in ["logger", "sick"] {
        fleet
            .hub
            .push_container(name, "1.0.0", 1, &tar)
            .expect("container release");
    }
    let spec = format!(
        "name = \"noisy\"\n[target]\nselector = {{ device = \"{id}\" }}\n\
         [[workloads]]\nname = \"logger\"\nrelease = \"logger@1.0.0\"\nkind = \"container\"\nmemory_mib = 16\n\
         restart = \"always\"\ncpus = 0.3\nlog_max_mib = 2\n\
         command = [\"/bin/sh\", \"-c\", \"yes 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"]\n\
         [[workloads]]\nname = \"sick\"\nrelease = \"sick@1.0.0\"\nkind = \"container\"\nmemory_mib = 16\n\
         restart = \"always\"\nhealthcheck = {{ command = [\"/bin/false\"], interval_secs = 1, retries = 1 }}\n\
         command = [\"/bin/sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done\"]\n"
    );
    fleet.hub.apply(&spec).expect("apply");
    fleet
        .hub
        .wait_workload(&id, "logger", "running")
        .expect("logger running");
    let (_, c) = wait_for("the logger", PATIENCE, || running(&id, "logger")).expect("logger");
    // Several seconds at well over 10 MB/s: many times the cap written.
    let root = docker(&["info", "-f", "{{.DockerRootDir}}"]);
    let logs = std::path::Path::new(&root)
        .join("containers")
        .join(c["Id"].as_str().expect("id"))
        .join("local-logs");
    let sizes = || -> Vec<u64> {
        std::fs::read_dir(&logs)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .collect()
            })
            .unwrap_or_default()
    };
    // Rotation happened (a second file): the logger has written past the first file's half of the cap.
    wait_for("the log to rotate", PATIENCE, || {
        (sizes().len() >= 2).then_some(())
    })
    .expect("rotated");
    // Then, sampled while it keeps writing, the files never hold more than the cap (plus a block of slack).
    let mut total = 0;
    for _ in 0..20 {
        total = sizes().iter().sum::<u64>();
        assert!(
            total <= (2 << 20) + (256 << 10),
            "log files hold {total} bytes, cap 2 MiB"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(total > 0, "the logger wrote something");

    let w = wait_for("the unhealthy restart in the report", PATIENCE, || {
        let d = fleet.hub.device(&id)?;
        let w = d["workloads"]
            .as_array()?
            .iter()
            .find(|w| w["name"] == "sick")?
            .clone();
        (w["restarts"].as_u64()? >= 1).then_some(w)
    })
    .expect("restarted");
    assert!(
        w["last_error"].as_str().unwrap_or("").contains("unhealthy"),
        "{w}"
    );
}

/// The ROUND of every container of workload `moving` of `id` (any state).
fn rounds_present(id: &str) -> Vec<u64> {
    docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=io.flotilla.device={id}"),
        "--filter",
        "label=io.flotilla.workload=moving",
    ])
    .lines()
    .filter_map(|cid| {
        let env = docker(&["inspect", "-f", "{{json .Config.Env}}", cid]);
        env.split("ROUND=").nth(1)?.split('"').next()?.parse().ok()
    })
    .collect()
}

/// Both workloads run, the device applied the newest generation, and `moving` has exactly one container, of
/// `round`.
fn converged(fleet: &flotilla_fleet_tests::Fleet, id: &str, round: u64) -> Option<()> {
    let d = fleet.hub.device(id)?;
    let all_running = d["workloads"]
        .as_array()?
        .iter()
        .filter(|w| w["state"] == "running")
        .count()
        == 2;
    (all_running
        && d["applied_generation"] == d["desired_generation"]
        && rounds_present(id) == vec![round]
        && container(id, "steady").is_some())
    .then_some(())
}

/// The restart campaign: an agent `kill -9`ed at a seeded random moment while an update of one container is in
/// flight, then restarted, 100 times. After every kill, each container of the updated workload carries the old or
/// the new spec; after every restart the device converges with exactly one container per workload (no orphans in
/// any state); the container that never changed is never restarted.
#[test]
fn restart_campaign_while_updating() {
    let (id, agent) = container_agent("campaign");
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup = cleanup(&id);
    let mut fleet = FleetBuilder::new().agent(agent).start().expect("fleet");
    let tar = busybox_image(&fleet.hub.dir, "web").expect("test image");
    for name in ["steady", "moving"] {
        fleet
            .hub
            .push_container(name, "1.0.0", 1, &tar)
            .expect("container release");
    }
    let cmd = "command = [\"/bin/sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done\"]";
    let spec = |round: u64| {
        format!(
            "name = \"campaign\"\n[target]\nselector = {{ device = \"{id}\" }}\n\
             [[workloads]]\nname = \"steady\"\nrelease = \"steady@1.0.0\"\nkind = \"container\"\nmemory_mib = 16\n\
             restart = \"always\"\n{cmd}\n\
             [[workloads]]\nname = \"moving\"\nrelease = \"moving@1.0.0\"\nkind = \"container\"\nmemory_mib = 16\n\
             restart = \"always\"\nenv = {{ ROUND = \"{round}\" }}\nstop_timeout_secs = 2\n{cmd}\n"
        )
    };
    fleet.hub.apply(&spec(0)).expect("apply");
    wait_for("round 0", PATIENCE, || converged(&fleet, &id, 0)).expect("converged");
    let (_, steady) = running(&id, "steady").expect("steady");
    let mut rng = flotilla_fleet_tests::Rng::from_env("container restart campaign", 0x5eed_c0de);
    let rounds = 100;
    for round in 1..=rounds {
        fleet.hub.apply(&spec(round)).expect("apply");
        // Somewhere in the update: before the device heard of it, while it stops the old container, while it
        // creates the new one, or after.
        let delay = rng.next_u64() % 400;
        std::thread::sleep(std::time::Duration::from_millis(delay));
        let a = fleet.agent_mut(&id);
        a.kill9();
        let present = rounds_present(&id);
        assert!(
            present.iter().all(|r| *r == round || *r == round - 1),
            "round {round} (killed after {delay} ms): containers of rounds {present:?}"
        );
        a.start().expect("restart");
        wait_for(&format!("round {round}"), PATIENCE, || {
            converged(&fleet, &id, round)
        })
        .unwrap_or_else(|e| panic!("{e}: containers of rounds {:?}", rounds_present(&id)));
    }
    let (_, after) = running(&id, "steady").expect("steady");
    assert_eq!(
        after["Id"], steady["Id"],
        "the steady container was never replaced"
    );
    assert_eq!(
        after["State"]["StartedAt"], steady["State"]["StartedAt"],
        "the steady container was never restarted"
    );
    assert_eq!(after["RestartCount"], 0);
}

/// Three successive images of one workload: the engine keeps the current and the previous one (fast rollback);
/// the oldest, which the agent loaded, is removed. An image the agent did not load is never touched.
#[test]
fn images_keep_current_and_previous() {
    let (id, agent) = container_agent("images");
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup = cleanup(&id);
    let fleet = FleetBuilder::new().agent(agent).start().expect("fleet");
    // A bystander image the agent never loaded.
    let bystander_tar = busybox_image(&fleet.hub.dir, "bystander").expect("image");
    let loaded = docker(&["load", "-q", "-i", &bystander_tar.display().to_string()]);
    let bystander = loaded.rsplit(' ').next().unwrap_or_default().to_owned();
    let mut images = Vec::new();
    for v in 1..=3 {
        let tar = busybox_image(&fleet.hub.dir, &format!("web{v}")).expect("test image");
        fleet
            .hub
            .push_container("web", &format!("{v}.0.0"), 1, &tar)
            .expect("container release");
        fleet
            .hub
            .apply(&format!(
                "name = \"web\"\n[target]\nselector = {{ device = \"{id}\" }}\n[[workloads]]\nname = \"web\"\n\
                 release = \"web@{v}.0.0\"\nkind = \"container\"\nmemory_mib = 16\nrestart = \"always\"\n\
                 command = [\"/bin/sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done\"]\n"
            ))
            .expect("apply");
        let image = wait_for(&format!("version {v} running"), PATIENCE, || {
            let d = fleet.hub.device(&id)?;
            let w = d["workloads"].as_array()?.first()?.clone();
            (w["version"] == format!("{v}.0.0") && w["state"] == "running").then_some(())?;
            let (_, c) = running(&id, "web")?;
            Some(c["Image"].as_str()?.to_owned())
        })
        .expect("running");
        images.push(image);
    }
    let present = |image: &str| !docker(&["image", "inspect", "-f", "{{.Id}}", image]).is_empty();
    wait_for("the oldest image removed", PATIENCE, || {
        (!present(&images[0])).then_some(())
    })
    .expect("oldest removed");
    assert!(present(&images[1]), "previous kept");
    assert!(present(&images[2]), "current kept");
    assert!(
        present(&bystander),
        "an image the agent did not load is never removed"
    );
    docker(&["rmi", "-f", &bystander]);
}

/// An image that does not fit twice (the cached tarball and the engine's copy) in the device's data quota is
/// refused before a byte is downloaded, with the numbers, and nothing is loaded.
#[test]
fn an_image_that_does_not_fit_is_refused_up_front() {
    let (id, mut agent) = container_agent("disk");
    // 8 MiB: a 4.4 MiB tarball plus the reserve fits once, not twice.
    agent.extra_limits = "max_data_mib = 8".into();
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup = cleanup(&id);
    let fleet = FleetBuilder::new().agent(agent).start().expect("fleet");
    let tar = busybox_image(&fleet.hub.dir, "web").expect("test image");
    fleet
        .hub
        .push_container("web", "1.0.0", 1, &tar)
        .expect("container release");
    fleet
        .hub
        .apply(&spec(&id, "command = [\"/bin/sh\"]\n"))
        .expect("apply");
    let w = wait_for("the refusal", PATIENCE, || {
        let d = fleet.hub.device(&id)?;
        let w = d["workloads"].as_array()?.first()?.clone();
        w["rejected"]
            .as_str()
            .is_some_and(|r| r.contains("not enough disk space"))
            .then_some(w)
    })
    .expect("refused");
    // Twice the signed tarball's size is what it asks for.
    let releases = fleet.hub.client.get("/api/v1/releases").expect("releases");
    let size = releases
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "web"))
        .and_then(|r| r["size"].as_u64())
        .expect("release size");
    let twice = format!("needs {:.1} MiB", (2 * size) as f64 / (1024.0 * 1024.0));
    assert!(
        w["rejected"].as_str().unwrap_or("").contains(&twice),
        "{w} should say {twice}"
    );
    assert!(container(&id, "web").is_none(), "nothing created");
    let staged = std::fs::read_dir(fleet.agent(&id).state_dir().join("staging"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(staged, 0, "nothing downloaded");
}

/// A rollout of a container release whose image exits on start: the canary fails its health gate, the rollout
/// aborts, and the canary goes back to the previous release (containers, as WASM does).
#[test]
fn container_rollout_aborts_after_the_canary_and_rolls_back() {
    let pid = std::process::id();
    let ids: Vec<(String, &str)> = vec![
        (format!("ctr-roll-{pid}-eu1"), "eu-west"),
        (format!("ctr-roll-{pid}-eu2"), "eu-west"),
        (format!("ctr-roll-{pid}-us1"), "us-east"),
        (format!("ctr-roll-{pid}-us2"), "us-east"),
    ];
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup: Vec<DockerCleanup> = ids.iter().map(|(id, _)| cleanup(id)).collect();
    let mut b = FleetBuilder::new();
    for (id, region) in &ids {
        let mut a = AgentSpec::new(id, region, 10.0, 10.0);
        a.labels.push(("fleet".into(), format!("roll-{pid}")));
        b = b.agent(a);
    }
    let f = b.start().expect("fleet");
    let good = flotilla_fleet_tests::busybox_image_with(
        &f.hub.dir,
        "good",
        r#"CMD ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"]"#,
    )
    .expect("good image");
    let bad = flotilla_fleet_tests::busybox_image_with(
        &f.hub.dir,
        "bad",
        r#"CMD ["/bin/sh", "-c", "echo cannot start; exit 3"]"#,
    )
    .expect("bad image");
    f.hub.push_container("svc", "1.0.0", 1, &good).expect("v1");
    f.hub.push_container("svc", "2.0.0", 1, &bad).expect("v2");
    let spec = |version: &str, rollout: &str| {
        format!(
            "name = \"svc\"\n[target]\nselector = {{ fleet = \"roll-{pid}\" }}\n[[workloads]]\nname = \"svc\"\n\
             release = \"svc@{version}\"\nkind = \"container\"\nmemory_mib = 16\nrestart = \"always\"\n\
             health_secs = 1\n{rollout}"
        )
    };
    let version_of = |id: &str| {
        let d = f.hub.device(id)?;
        let w = &d["workloads"][0];
        (w["state"] == "running" && d["applied_generation"] == d["desired_generation"])
            .then(|| w["version"].as_str().unwrap_or("").to_owned())
    };
    f.hub.apply(&spec("1.0.0", "")).expect("v1 everywhere");
    for (id, _) in &ids {
        wait_for(&format!("{id} on 1.0.0"), PATIENCE, || {
            (version_of(id)? == "1.0.0").then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.device(id)));
    }
    let plan = "[rollout]\nwaves = [\"canary:25\", \"rest\"]\nsoak_secs = 1\nreport_timeout_secs = 30\n\
                max_failure_ratio = 0.0\n";
    f.hub.apply(&spec("2.0.0", plan)).expect("rollout v2");
    let aborted = wait_for("the rollout to abort", PATIENCE, || {
        let v = f.hub.client.get("/api/v1/rollouts/svc").ok()?;
        v["phase"]
            .as_str()
            .is_some_and(|p| p.starts_with("aborted"))
            .then_some(v)
    })
    .expect("aborted");
    assert!(
        aborted["phase"]
            .as_str()
            .unwrap_or("")
            .contains("health gate"),
        "{aborted}"
    );
    for (id, _) in &ids {
        wait_for(&format!("{id} back on 1.0.0"), PATIENCE, || {
            (version_of(id)? == "1.0.0").then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.device(id)));
        let (_, c) = running(id, "svc").expect("a running container");
        assert_eq!(c["Config"]["Labels"]["io.flotilla.managed"], "true");
    }
}

/// Pre-download of a container release: the next wave's device downloads 2.0.0's tarball, checks it and loads
/// the image into the engine while the 1.0.0 container keeps running; with its uplink cut, the approved cutover
/// creates the 2.0.0 container from the image already loaded.
#[test]
fn container_release_is_staged_and_loaded_before_its_cutover() {
    let pid = std::process::id();
    let ids = [format!("ctr-stage-{pid}-a"), format!("ctr-stage-{pid}-b")];
    let _cleanup: Vec<DockerCleanup> = ids.iter().map(|id| cleanup(id)).collect();
    let mut b = FleetBuilder::new().with_proxies();
    for id in &ids {
        let mut a = AgentSpec::new(id, "eu-west", 10.0, 10.0);
        a.labels.push(("fleet".into(), format!("stage-{pid}")));
        b = b.agent(a);
    }
    let f = b.start().expect("fleet");
    let loop_cmd = |tag: &str| {
        format!(
            r#"CMD ["/bin/sh", "-c", "echo {tag}; trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"]"#
        )
    };
    let v1 =
        flotilla_fleet_tests::busybox_image_with(&f.hub.dir, "one", &loop_cmd("one")).expect("v1");
    let v2 =
        flotilla_fleet_tests::busybox_image_with(&f.hub.dir, "two", &loop_cmd("two")).expect("v2");
    f.hub.push_container("svc", "1.0.0", 1, &v1).expect("v1");
    f.hub.push_container("svc", "2.0.0", 1, &v2).expect("v2");
    let spec = |version: &str, rollout: &str| {
        format!(
            "name = \"svc\"\n[target]\nselector = {{ fleet = \"stage-{pid}\" }}\n[[workloads]]\nname = \"svc\"\n\
             release = \"svc@{version}\"\nkind = \"container\"\nmemory_mib = 16\nrestart = \"always\"\n\
             health_secs = 1\n{rollout}"
        )
    };
    let version_of = |id: &str| {
        let d = f.hub.device(id)?;
        let w = &d["workloads"][0];
        (w["state"] == "running" && d["applied_generation"] == d["desired_generation"])
            .then(|| w["version"].as_str().unwrap_or("").to_owned())
    };
    f.hub.apply(&spec("1.0.0", "")).expect("v1 everywhere");
    for id in &ids {
        wait_for(&format!("{id} on 1.0.0"), PATIENCE, || {
            (version_of(id)? == "1.0.0").then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.device(id)));
    }
    let v1_image = running(&ids[1], "svc").expect("v1 container").1["Image"].clone();
    let plan = "[rollout]\nwaves = [\"canary:50\", \"rest\"]\nsoak_secs = 1\nreport_timeout_secs = 120\n\
                manual_approval = true\npre_download = true\n";
    f.hub.apply(&spec("2.0.0", plan)).expect("rollout");
    // ids[0] is the canary; ids[1] stages.
    let stage = || -> Option<String> {
        let v = f.hub.client.get("/api/v1/rollouts/svc").ok()?;
        let d = v["waves"][1]["devices"][0].clone();
        (d["device"] == ids[1].as_str()).then(|| d["stage"].as_str().unwrap_or("").to_owned())
    };
    wait_for("the second device staged 2.0.0", PATIENCE, || {
        (stage()? == "staged").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.client.get("/api/v1/rollouts/svc")));
    // Its 1.0.0 container runs on; the canary's 2.0.0 image is the one staged here too (one shared engine), so
    // what this test can tell is that nothing of ids[1] changed and the cutover needs no link.
    let (name_before, c) = running(&ids[1], "svc").expect("still running 1.0.0");
    assert_eq!(c["Image"], v1_image);
    wait_for("the canary wave to finish", PATIENCE, || {
        let v = f.hub.client.get("/api/v1/rollouts/svc").ok()?;
        v["phase"]
            .as_str()
            .is_some_and(|p| p.starts_with("awaiting approval"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.client.get("/api/v1/rollouts/svc")));
    let agent = f.agent(&ids[1]);
    agent.proxy.as_ref().expect("proxy").blackhole_uplink();
    f.hub
        .client
        .post(
            "/api/v1/rollouts/svc/approve",
            "application/json",
            b"{}",
            &[],
        )
        .expect("approve");
    let (name_after, c) = wait_for("a 2.0.0 container with the uplink cut", PATIENCE, || {
        running(&ids[1], "svc").filter(|(_, c)| c["Image"] != v1_image)
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", container(&ids[1], "svc")));
    assert_ne!(name_before, name_after);
    assert!(docker_logs(&name_after).contains("two"), "{c}");
    agent.proxy.as_ref().expect("proxy").heal();
    wait_for("the rollout completes", PATIENCE, || {
        let v = f.hub.client.get("/api/v1/rollouts/svc").ok()?;
        (v["phase"] == "completed").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.client.get("/api/v1/rollouts/svc")));
}
