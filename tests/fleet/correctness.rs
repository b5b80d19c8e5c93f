//! Control-loop correctness under bad luck and bad input (issue: anti-entropy, atomic apply, nothing lost on
//! refusal). Each test reproduces what a careless operator or an unlucky network does, against a real hub, broker
//! and agents, and checks that the loop recovers or refuses without losing anything.

use flotilla_fleet_tests::{AgentSpec, FleetBuilder, PATIENCE, firmware, wait_for};
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
    // The hub's state is retained on the broker; a stray privileged client (a misconfigured tool with the hub's
    // credentials; anyone else is refused by the broker) overwrites it while the device is away.
    let stray = hub.privileged_client(&[]).expect("stray client");
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

/// The workload's reported refusal reason, if any.
fn rejected(hub: &flotilla_fleet_tests::Hub, device: &str, workload: &str) -> Option<String> {
    let d = hub.device(device)?;
    d["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["name"] == workload)
        .and_then(|w| w["rejected"].as_str().map(str::to_owned))
}

/// Nothing lost on refusal: the agent refuses an epoch downgrade and keeps the running version; after a `kill -9`
/// and a restart with the hub unreachable, that version runs again from SQLite alone (its spec and artifact are
/// persisted as the last good version, re-verified at boot, and never garbage-collected).
#[test]
fn refused_update_keeps_the_running_version_across_kill9() {
    let mut fleet = FleetBuilder::new()
        .with_proxies()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    hub.push_release("sensor", "2.0.0", 2, &firmware("sensor"))
        .expect("release");
    // A different artifact, so that keeping 2.0.0's cached file is something the collector must get right.
    let mut older = firmware("sensor");
    older.extend(custom_section(64));
    hub.push_release("sensor", "1.0.0", 1, &older)
        .expect("release");
    hub.apply(&sensor_spec("2.0.0", "")).expect("apply 2.0.0");
    wait_for("2.0.0 running", PATIENCE, || {
        (running_version(hub, "gw-1", "sensor")? == "2.0.0").then_some(())
    })
    .expect("running");
    hub.apply(&sensor_spec("1.0.0", "")).expect("apply 1.0.0");
    let reason = wait_for("the downgrade to be refused", PATIENCE, || {
        rejected(hub, "gw-1", "sensor")
    })
    .expect("refused");
    assert!(reason.contains("epoch"), "{reason}");
    assert_eq!(
        running_version(hub, "gw-1", "sensor").as_deref(),
        Some("2.0.0")
    );
    let agent = fleet.agent_mut("gw-1");
    agent.proxy.as_ref().expect("proxy").partition();
    agent.kill9();
    agent.start().expect("restart");
    agent
        .wait_log(&["\"message\":\"running\"", "\"workload\":\"sensor\""], 1)
        .expect("the last good version runs again, offline");
    let artifacts = std::fs::read_dir(agent.state_dir().join("artifacts"))
        .expect("artifacts dir")
        .count();
    assert!(
        artifacts >= 1,
        "the running version's artifact is still cached"
    );
    agent.proxy.as_ref().expect("proxy").heal();
    let hub = &fleet.hub;
    wait_for("the hub to see 2.0.0 running again", PATIENCE, || {
        let d = hub.device("gw-1")?;
        (d["online"] == true
            && running_version(hub, "gw-1", "sensor")? == "2.0.0"
            && rejected(hub, "gw-1", "sensor").is_some())
        .then_some(())
    })
    .expect("running 2.0.0, 1.0.0 still refused");
}

/// A WASM custom section of `len` payload bytes: makes a module as large as a test needs, still valid.
fn custom_section(len: usize) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"padding";
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.extend(std::iter::repeat_n(0u8, len));
    let mut out = vec![0u8];
    leb(body.len(), &mut out);
    out.extend(body);
    out
}

/// A download refused for disk space shows in the device's report at once (not at the next re-plan), and is
/// retried by itself when the space frees up.
#[test]
fn disk_refusal_is_reported_at_once_and_retried() {
    let mut spec = AgentSpec::new("gw-1", "eu-west", 52.5, 13.4);
    spec.extra_limits = "max_data_mib = 6\n".into();
    let fleet = FleetBuilder::new().agent(spec).start().expect("fleet");
    let agent = fleet.agent("gw-1");
    let filler = agent.state_dir().join("filler");
    std::fs::write(&filler, vec![0u8; 3 << 20]).expect("filler");
    let hub = &fleet.hub;
    let mut big = firmware("sensor");
    big.extend(custom_section(2 << 20));
    hub.push_release("sensor", "1.0.0", 1, &big)
        .expect("release");
    hub.apply(&sensor_spec("1.0.0", "")).expect("apply");
    let reason = wait_for("the refusal in a report", PATIENCE, || {
        rejected(hub, "gw-1", "sensor")
    })
    .expect("reported");
    assert!(reason.contains("disk"), "{reason}");
    let why = hub.client.get("/api/v1/why/gw-1/sensor").expect("why");
    assert!(
        why["explanation"]
            .as_str()
            .is_some_and(|w| w.contains("disk")),
        "{why}"
    );
    std::fs::remove_file(&filler).expect("free the space");
    wait_for("sensor running once the space is there", PATIENCE, || {
        running_version(hub, "gw-1", "sensor")
    })
    .expect("retried");
}

/// The agent's database stays small under steady telemetry: its WAL is checkpointed and capped at 1 MiB
/// (SQLite's default leaves it at ~4 MiB, which starves updates on a small data partition).
#[test]
fn agent_database_wal_stays_bounded() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    hub.push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    // One record every 10 ms: a write transaction into the outbox and one out of it, per record.
    hub.apply(&sensor_spec("1.0.0", "").replace("tick_ms = 100", "tick_ms = 10"))
        .expect("apply");
    let wal = fleet.agent("gw-1").state_dir().join("agent.db-wal");
    let mut largest = 0;
    wait_for("1,500 telemetry records at the hub", PATIENCE, || {
        largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        let t = hub.client.get("/api/v1/devices/gw-1/telemetry").ok()?;
        let records: u64 = t["streams"]
            .as_array()?
            .iter()
            .filter_map(|s| s["records"].as_u64())
            .sum();
        (records >= 1500).then_some(())
    })
    .expect("telemetry flows");
    println!("agent.db-wal high-water mark: {largest} bytes");
    assert!(
        largest <= 1536 * 1024,
        "agent.db-wal reached {largest} bytes (limit 1 MiB plus one transaction)"
    );
}

/// Inventory follows the device: a moved device's new position reaches the hub (not only the first position
/// after connect), and a position file with fields the agent does not know still gives the position.
#[test]
fn position_changes_reach_the_hub() {
    let mut spec = AgentSpec::new("gw-1", "eu-west", 52.5, 13.4);
    spec.position_file = true;
    let fleet = FleetBuilder::new().agent(spec).start().expect("fleet");
    let hub = &fleet.hub;
    let location = |hub: &flotilla_fleet_tests::Hub| -> Option<(f64, f64)> {
        let d = hub.device("gw-1")?;
        Some((
            d["location"]["lat"].as_f64()?,
            d["location"]["lon"].as_f64()?,
        ))
    };
    wait_for("the first position", PATIENCE, || {
        location(hub).filter(|(lat, _)| (*lat - 52.5).abs() < 1e-6)
    })
    .expect("first position");
    let agent = fleet.agent("gw-1");
    agent.set_position(48.137, 11.575).expect("move");
    wait_for("the moved position at the hub", PATIENCE, || {
        location(hub)
            .filter(|(lat, lon)| (*lat - 48.137).abs() < 1e-6 && (*lon - 11.575).abs() < 1e-6)
    })
    .expect("moved");
    let file = agent.dir.join("position.json");
    let tmp = file.with_extension("tmp");
    std::fs::write(
        &tmp,
        r#"{"lat": 50.110, "lon": 8.682, "accuracy_m": 4.5, "source": "gpsd", "at": "2026-12-03T12:00:00Z"}"#,
    )
    .expect("write");
    std::fs::rename(&tmp, &file).expect("rename");
    wait_for(
        "the position from a file with extra fields",
        PATIENCE,
        || location(hub).filter(|(lat, _)| (*lat - 50.110).abs() < 1e-6),
    )
    .expect("extra fields ignored");
}

/// Words, not debug output: an unknown release names the versions the hub has and the fix, and `why` explains
/// a device still on the previous version in a sentence with both versions.
#[test]
fn errors_and_explanations_are_sentences() {
    let fleet = FleetBuilder::new()
        .with_proxies()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    hub.push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    let err = hub
        .apply(&sensor_spec("9.9.9", ""))
        .expect_err("unknown release")
        .to_string();
    assert!(
        err.contains("spec.toml: workloads[0].release: no release sensor@9.9.9")
            && err.contains("releases of sensor on the hub: 1.0.0")
            && err.contains("flotilla release push")
            && !err.contains("Version {"),
        "{err}"
    );
    hub.apply(&sensor_spec("1.0.0", "")).expect("apply");
    wait_for("1.0.0 running", PATIENCE, || {
        running_version(hub, "gw-1", "sensor")
    })
    .expect("running");
    // A new version that takes the device a while to fetch (1 MiB over a 20 KB/s link): `why` says what runs
    // and what is coming.
    let mut bigger = firmware("sensor");
    bigger.extend(custom_section(1 << 20));
    hub.push_release("sensor", "1.1.0", 1, &bigger)
        .expect("release");
    fleet
        .agent("gw-1")
        .proxy
        .as_ref()
        .expect("proxy")
        .set_rate(20_000);
    hub.apply(&sensor_spec("1.1.0", "")).expect("apply 1.1.0");
    let why = wait_for("an explanation naming both versions", PATIENCE, || {
        let v = hub.client.get("/api/v1/why/gw-1/sensor").ok()?;
        let text = v["explanation"].as_str()?.to_owned();
        (text.contains("1.0.0") && text.contains("1.1.0")).then_some(text)
    })
    .expect("why");
    assert!(
        !why.contains("expected another") && !why.contains("Running at"),
        "{why}"
    );
}
