//! Other agent builds against a real hub: modules precompiled per target (`release push --precompile`), the agent
//! built without a compiler, and the agent cross-built for ARM, run under qemu-user.
//!
//! The tests that need a separately built agent are `#[ignore]`d in the ordinary run and started by
//! `scripts/test-targets.sh` (part of the README's test command), which builds those agents and names them in the
//! environment. Run explicitly without that environment, they fail rather than pass vacuously.

use flotilla_fleet_tests::{AgentSpec, FleetBuilder, PATIENCE, firmware, wait_for};
use std::path::PathBuf;

fn spec(workloads: &[&str]) -> String {
    let mut s = "name = \"sensors\"\n[target]\nselector = { role = \"gateway\" }\n".to_owned();
    for w in workloads {
        s.push_str(&format!(
            "[[workloads]]\nname = \"{w}\"\nrelease = \"{w}@1.0.0\"\ntick_ms = 100\nmemory_mib = 4\ncpu_ms = 50\n"
        ));
    }
    s
}

/// The `why` explanation of `workload` on `device`.
fn why(fleet: &flotilla_fleet_tests::Fleet, device: &str, workload: &str) -> String {
    fleet
        .hub
        .client
        .get(&format!("/api/v1/why/{device}/{workload}"))
        .ok()
        .and_then(|v| v["explanation"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run this test through scripts/test-targets.sh, which builds that agent")
    })
}

/// `release push --precompile` signs a variant per target; the agent (with a compiler) fetches its own variant and
/// loads it without compiling. The hub refuses a release until every variant it signs has been uploaded.
#[test]
fn an_agent_loads_its_precompiled_variant_instead_of_compiling() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    let wasm = hub.dir.join("sensor.wasm");
    std::fs::write(&wasm, firmware("sensor")).expect("write module");
    let key = hub.release_key();
    let key = key.to_str().expect("utf-8 path");
    let wasm_arg = wasm.to_str().expect("utf-8 path");

    // Signed offline with a variant, but only the source module uploaded: refused, naming the missing variant.
    let out = hub
        .cli(&[
            "release",
            "sign",
            wasm_arg,
            "--name",
            "sensor",
            "--version",
            "0.9.0",
            "--key",
            key,
            "--precompile",
            "x86_64",
        ])
        .expect("release sign");
    assert!(out.contains("precompiled for x86_64"), "{out}");
    hub.client
        .post(
            "/api/v1/artifacts",
            "application/octet-stream",
            &firmware("sensor"),
            &[],
        )
        .expect("upload the source module");
    let signed = flotilla_hub::keyfile::read_signed(&hub.dir.join("sensor.release"))
        .expect("signed release");
    let err = hub
        .client
        .post(
            "/api/v1/releases",
            "application/octet-stream",
            &postcard::to_stdvec(&signed).expect("encode"),
            &[],
        )
        .expect_err("a variant is missing");
    assert!(
        err.to_string().contains("precompiled for x86_64") && err.to_string().contains("400"),
        "{err}"
    );
    // An unknown target is a clear error before anything is signed.
    let bad = hub
        .cli(&[
            "release",
            "push",
            wasm_arg,
            "--name",
            "sensor",
            "--version",
            "0.9.1",
            "--key",
            key,
            "--precompile",
            "armv5",
        ])
        .expect_err("unknown target");
    assert!(
        bad.to_string().contains("unknown precompile target"),
        "{bad}"
    );

    let out = hub
        .cli(&[
            "release",
            "push",
            wasm_arg,
            "--name",
            "sensor",
            "--version",
            "1.0.0",
            "--epoch",
            "1",
            "--key",
            key,
            "--precompile",
            "x86_64,aarch64",
        ])
        .expect("release push --precompile");
    assert!(out.contains("pushed sensor@1.0.0"), "{out}");
    let ls = hub.cli(&["release", "ls"]).expect("release ls");
    assert!(
        ls.lines().any(|l| l.starts_with("sensor ")
            && l.contains("1.0.0")
            && l.ends_with("x86_64,aarch64")),
        "{ls}"
    );
    hub.apply(&spec(&["sensor"])).expect("apply");
    hub.wait_workload("gw-1", "sensor", "running")
        .expect("running");
    let log = fleet.agent("gw-1").log();
    assert!(log.contains("loading precompiled module"), "{log}");
    assert!(!log.contains("compiling module"), "{log}");
    // A release without variants beside it: this agent has a compiler and compiles it.
    hub.push_release("plain", "1.0.0", 1, &firmware("sensor"))
        .expect("push");
    hub.apply(&spec(&["sensor", "plain"])).expect("apply");
    hub.wait_workload("gw-1", "plain", "running")
        .expect("compiled on the device");
    assert!(fleet.agent("gw-1").log().contains("compiling module"));
}

/// The agent built without Cranelift runs a release precompiled for it, and refuses one without its variant with
/// a typed reason that `why` shows, while the other workload keeps running.
#[test]
#[ignore = "needs the precompiled-only agent build: scripts/test-targets.sh"]
fn a_precompiled_only_agent_runs_variants_and_refuses_releases_without_one() {
    let binary = PathBuf::from(required_env("FLOTILLA_AGENT_PRECOMPILED_ONLY"));
    let mut a = AgentSpec::new("gw-1", "eu-west", 52.5, 13.4);
    a.binary = Some(binary);
    let fleet = FleetBuilder::new().agent(a).start().expect("fleet");
    let hub = &fleet.hub;
    let wasm = hub.dir.join("sensor.wasm");
    std::fs::write(&wasm, firmware("sensor")).expect("write module");
    hub.push_wasm_precompiled("sensor", "1.0.0", 1, &wasm, &["x86_64", "aarch64"])
        .expect("push with variants");
    hub.push_release("bare", "1.0.0", 1, &firmware("sensor"))
        .expect("push without variants");
    hub.apply(&spec(&["sensor", "bare"])).expect("apply");
    hub.wait_workload("gw-1", "sensor", "running")
        .expect("the precompiled release runs");
    let explanation = wait_for("the refusal in why", PATIENCE, || {
        let w = why(&fleet, "gw-1", "bare");
        w.contains("no WASM compiler").then_some(w)
    })
    .expect("refused with its reason");
    assert!(explanation.contains("--precompile x86_64"), "{explanation}");
    let log = fleet.agent("gw-1").log();
    assert!(log.contains("loading precompiled module"), "{log}");
    assert!(!log.contains("compiling module"), "{log}");
    assert_eq!(
        hub.workload_state("gw-1", "sensor").as_deref(),
        Some("running")
    );
}

/// The agent cross-built for ARM, run under qemu-user against the x86_64 hub: it enrolls, runs a signed WASM
/// workload compiled on the device and one precompiled for its target, its telemetry arrives, and after a
/// `kill -9` with the broker unreachable it brings both back from SQLite alone.
#[test]
#[ignore = "needs the cross-built agent and qemu: scripts/test-targets.sh"]
fn a_cross_built_agent_under_qemu_enrolls_runs_reports_and_restarts_offline() {
    let binary = PathBuf::from(required_env("FLOTILLA_CROSS_AGENT"));
    let launcher: Vec<String> = required_env("FLOTILLA_CROSS_LAUNCHER")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let target = required_env("FLOTILLA_CROSS_PRECOMPILE");
    let mut a = AgentSpec::new("arm-1", "eu-west", 52.5, 13.4);
    a.binary = Some(binary);
    a.launcher = launcher;
    let mut fleet = FleetBuilder::new()
        .with_proxies()
        .agent(a)
        .start()
        .expect("the emulated agent enrolls");
    let version = fleet.hub.device("arm-1").expect("device")["agent_version"].clone();
    assert!(version.is_string(), "{version}");
    let wasm = fleet.hub.dir.join("sensor.wasm");
    std::fs::write(&wasm, firmware("sensor")).expect("write module");
    fleet
        .hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("source-only release");
    fleet
        .hub
        .push_wasm_precompiled("fast", "1.0.0", 1, &wasm, &[&target])
        .expect("precompiled release");
    fleet.hub.apply(&spec(&["sensor", "fast"])).expect("apply");
    for w in ["sensor", "fast"] {
        fleet
            .hub
            .wait_workload("arm-1", w, "running")
            .expect("running under emulation");
    }
    let log = fleet.agent("arm-1").log();
    assert!(log.contains("compiling module"), "{log}");
    assert!(log.contains("loading precompiled module"), "{log}");
    wait_for("telemetry from the emulated agent", PATIENCE, || {
        let v = fleet
            .hub
            .client
            .get("/api/v1/devices/arm-1/telemetry")
            .ok()?;
        (v["streams"][0]["records"].as_u64()? >= 2).then_some(())
    })
    .expect("telemetry arrives");

    let agent = fleet.agent_mut("arm-1");
    agent.proxy.as_ref().expect("proxy").partition();
    agent.kill9();
    agent.start().expect("restart");
    agent
        .wait_log(&["\"message\":\"running\""], 2)
        .expect("both workloads back without the hub");
    let log = agent.log();
    assert!(!log.contains("\"message\":\"fetching\""), "{log}");
    assert!(!log.contains("\"message\":\"connected\""), "{log}");
    agent.proxy.as_ref().expect("proxy").heal();
    agent
        .wait_log(&["\"message\":\"connected\""], 1)
        .expect("reconnects");
}
