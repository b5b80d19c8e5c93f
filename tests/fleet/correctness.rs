//! Control-loop correctness under bad luck and bad input (issue: anti-entropy, atomic apply, nothing lost on
//! refusal). Each test reproduces what a careless operator or an unlucky network does, against a real hub, broker
//! and agents, and checks that the loop recovers or refuses without losing anything.

use flotilla_fleet_tests::{AgentSpec, FleetBuilder, PATIENCE, TestClient, firmware, wait_for};
use serde_json::Value;

fn sensor_spec(version: &str, target: &str) -> String {
    format!(
        "name = \"sensors\"\n[target]\n{target}\n[[workloads]]\nname = \"sensor\"\nrelease = \"sensor@{version}\"\n\
         tick_ms = 100\nmemory_mib = 4\ncpu_ms = 20\n"
    )
}

/// The release version `device` reports for `workload`, once its report shows it running.
fn running_version(
    hub: &flotilla_fleet_tests::Hub,
    device: &str,
    workload: &str,
) -> Option<String> {
    let d = hub.device(device)?;
    d["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["name"] == workload && w["state"] == "running")
        .and_then(|w| w["version"].as_str().map(str::to_owned))
}

fn generations(hub: &flotilla_fleet_tests::Hub, device: &str) -> Option<(u64, u64)> {
    let d = hub.device(device)?;
    Some((
        d["applied_generation"].as_u64()?,
        d["desired_generation"].as_u64()?,
    ))
}

/// Anti-entropy: while a device is away, its retained desired state is replaced by a stray retained publish.
/// When it comes back it refuses the garbage, reports that it is behind, and the hub hands it the stored state
/// again, so it converges instead of staying on its old generation forever.
#[test]
fn lost_retained_desired_state_is_resent() {
    let mut fleet = FleetBuilder::new()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    for v in ["1.0.0", "1.1.0"] {
        hub.push_release("sensor", v, 1, &firmware("sensor"))
            .expect("release");
    }
    hub.apply(&sensor_spec("1.0.0", "")).expect("apply");
    wait_for("1.0.0 running", PATIENCE, || {
        (running_version(hub, "gw-1", "sensor")? == "1.0.0").then_some(())
    })
    .expect("running");
    fleet.agent_mut("gw-1").kill9();
    let hub = &fleet.hub;
    hub.apply(&sensor_spec("1.1.0", "")).expect("apply 1.1.0");
    let (_, desired) = generations(hub, "gw-1").expect("generations");
    // The hub's state is retained on the broker; a stray client overwrites it while the device is away.
    let stray = TestClient::connect(fleet.broker_port(), &[]).expect("stray client");
    stray
        .publish("flotilla/v1/dev/gw-1/desired", b"garbage".to_vec(), true)
        .expect("publish");
    fleet.agent_mut("gw-1").start().expect("agent restarts");
    let hub = &fleet.hub;
    wait_for("gw-1 to converge on 1.1.0", PATIENCE, || {
        let (applied, want) = generations(hub, "gw-1")?;
        (applied == want && want == desired && running_version(hub, "gw-1", "sensor")? == "1.1.0")
            .then_some(())
    })
    .expect("the hub re-sent the stored desired state");
    let metrics = hub.client.get_text("/metrics").expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("flotilla_desired_resent_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

/// Atomic apply: a spec whose desired state would exceed the 16 KiB cap is refused with the file and the
/// workload, is not stored, and does not stop any other deployment from reaching its devices.
#[test]
fn oversized_apply_is_refused_and_others_go_on() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    hub.push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    hub.push_release("bloat", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    let bloat = format!(
        "name = \"bloat\"\n[[workloads]]\nname = \"bloat\"\nrelease = \"bloat@1.0.0\"\nconfig = {{ blob = \"{}\" }}\n",
        "x".repeat(20_000)
    );
    let err = hub.apply(&bloat).expect_err("refused").to_string();
    assert!(
        err.starts_with("400")
            && err.contains("spec.toml: workloads[0] (bloat)")
            && err.contains("16 KiB cap"),
        "{err}"
    );
    let deployments = hub.client.get("/api/v1/deployments").expect("list");
    assert_eq!(deployments, Value::Array(vec![]), "nothing stored");
    hub.apply(&sensor_spec("1.0.0", "")).expect("apply");
    wait_for("sensor running", PATIENCE, || {
        running_version(hub, "gw-1", "sensor")
    })
    .expect("an unrelated deployment still reaches the device");
}

/// A region nobody knows is refused with the known ones listed; a change that would take a workload off every
/// device it runs on needs --force, and without it nothing changes on the device.
#[test]
fn unknown_regions_and_silent_wipes_are_refused() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .agent(AgentSpec::new("gw-2", "us-east", 40.7, -74.0))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    hub.push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    let err = hub
        .apply(&sensor_spec("1.0.0", "regions = [\"mars-north\"]"))
        .expect_err("unknown region")
        .to_string();
    assert!(
        err.starts_with("400")
            && err.contains("target.regions")
            && err.contains("\"mars-north\"")
            && err.contains("eu-west, us-east"),
        "{err}"
    );
    // A region announced by an enrollment token counts as known, before any of its devices enrolled.
    hub.enroll_token("ap-south", "ap-a", &[]).expect("token");
    hub.apply(&sensor_spec(
        "1.0.0",
        "regions = [\"eu-west\", \"ap-south\"]",
    ))
    .expect("known regions");
    wait_for("sensor running on gw-1", PATIENCE, || {
        running_version(hub, "gw-1", "sensor")
    })
    .expect("running");
    // Selecting a label nobody has would remove the sensor from gw-1: refused, and gw-1 keeps it.
    let wipe = sensor_spec("1.0.0", "selector = { role = \"nobody\" }");
    let err = hub.apply(&wipe).expect_err("needs --force").to_string();
    assert!(
        err.starts_with("409")
            && err.contains("remove workload sensor from every device")
            && err.contains("gw-1"),
        "{err}"
    );
    assert!(running_version(hub, "gw-1", "sensor").is_some());
    // With --force it goes through, and the workload leaves the device.
    hub.client
        .post(
            "/api/v1/deployments",
            "application/toml",
            wipe.as_bytes(),
            &[
                ("x-flotilla-spec-file", "spec.toml"),
                ("x-flotilla-force", "true"),
            ],
        )
        .expect("forced");
    wait_for("sensor gone from gw-1", PATIENCE, || {
        let d = hub.device("gw-1")?;
        d["workloads"].as_array()?.is_empty().then_some(())
    })
    .expect("removed");
}
