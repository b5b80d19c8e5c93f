//! Rollout cutover benchmark: wave start (the operator's approval) -> every device of the wave running the new
//! version, with pre-download (the wave staged before its approval) against without, for a WASM release and a
//! container release, in one run. A real hub and real agents on loopback, each device behind a fault proxy that
//! caps its link (a gateway's uplink, not loopback speed); containers on this machine's Docker engine.
//!
//! Usage: `cutover-bench [DEVICES] [LINK_KIB_PER_SEC]` (default 5 devices, 2048 KiB/s). Build first:
//! `cargo build --release -p flotilla-hub -p flotilla-agent -p flotilla-fleet-tests --bins`, run
//! `target/release/cutover-bench`.

use anyhow::{Context, Result, bail};
use flotilla_fleet_tests::{
    AgentSpec, DockerCleanup, Fleet, FleetBuilder, busybox_image_with, firmware, image_variant,
};
use serde_json::Value;
use std::time::{Duration, Instant};

/// A WASM module of about `size` bytes: the sensor firmware with a custom section whose bytes depend on `tag`.
fn padded_wasm(size: usize, tag: u8) -> Vec<u8> {
    let mut m = firmware("sensor");
    let mut section = vec![1, b'p'];
    section.resize(size, tag);
    let mut len = section.len();
    m.push(0);
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            m.push(byte);
            break;
        }
        m.push(byte | 0x80);
    }
    m.extend_from_slice(&section);
    m
}

fn spec(pid: u32, kind: &str, version: &str, rollout: &str) -> String {
    let workload = match kind {
        "wasm" => format!(
            "[[workloads]]\nname = \"sensor\"\nrelease = \"sensor@{version}\"\ntick_ms = 1000\nmemory_mib = 8\n\
             health_secs = 1\n"
        ),
        _ => format!(
            "[[workloads]]\nname = \"svc\"\nrelease = \"svc@{version}\"\nkind = \"container\"\nmemory_mib = 16\n\
             restart = \"always\"\nhealth_secs = 1\n"
        ),
    };
    format!(
        "name = \"{kind}\"\n[target]\nselector = {{ fleet = \"cut-{pid}\" }}\n{workload}{rollout}"
    )
}

/// Whether device `id` reports `workload` running `version` at its latest desired state.
fn running(f: &Fleet, id: &str, workload: &str, version: &str) -> bool {
    f.hub.device(id).is_some_and(|d| {
        d["applied_generation"] == d["desired_generation"]
            && d["workloads"].as_array().is_some_and(|ws| {
                ws.iter().any(|w| {
                    w["name"] == workload && w["state"] == "running" && w["version"] == version
                })
            })
    })
}

fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > limit {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Rolls `kind` out to `version` (canary, then the rest after approval) and returns the seconds from the
/// approval to the whole second wave running it.
fn cutover(
    f: &Fleet,
    pid: u32,
    kind: &str,
    version: &str,
    ids: &[String],
    staged: bool,
) -> Result<f64> {
    let rollout = format!(
        "[rollout]\nwaves = [\"canary:1\", \"rest\"]\nsoak_secs = 1\nreport_timeout_secs = 600\n\
         manual_approval = true\npre_download = {staged}\n"
    );
    f.hub.apply(&spec(pid, kind, version, &rollout))?;
    let status = || {
        f.hub
            .client
            .get(&format!("/api/v1/rollouts/{kind}"))
            .unwrap_or(Value::Null)
    };
    wait("the canary wave", Duration::from_secs(600), || {
        status()["phase"]
            .as_str()
            .is_some_and(|p| p.starts_with("awaiting approval"))
    })?;
    let wave: Vec<String> = status()["waves"][1]["devices"]
        .as_array()
        .context("second wave")?
        .iter()
        .filter_map(|d| d["device"].as_str().map(str::to_owned))
        .collect();
    if staged {
        wait("the second wave staged", Duration::from_secs(600), || {
            let v = status();
            v["waves"][1]["devices"]
                .as_array()
                .is_some_and(|ds| ds.iter().all(|d| d["stage"] == "staged"))
        })?;
    }
    let t0 = Instant::now();
    f.hub.client.post(
        &format!("/api/v1/rollouts/{kind}/approve"),
        "application/json",
        b"{}",
        &[],
    )?;
    wait("the second wave running", Duration::from_secs(600), || {
        let workload = if kind == "wasm" { "sensor" } else { "svc" };
        wave.iter().all(|id| running(f, id, workload, version))
    })?;
    let secs = t0.elapsed().as_secs_f64();
    wait("the rollout to complete", Duration::from_secs(120), || {
        status()["phase"] == "completed"
    })?;
    let _ = ids;
    Ok(secs)
}

fn main() -> Result<()> {
    flotilla_fleet_tests::answer_help(
        "cutover-bench: rollout cutover time with and without pre-download, WASM and container.\n\n\
         Usage: cutover-bench [DEVICES] [LINK_KIB_PER_SEC]",
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    let devices: usize = args
        .first()
        .map_or(Ok(5), |a| a.parse())
        .context("DEVICES")?;
    let kib: u64 = args
        .get(1)
        .map_or(Ok(2048), |a| a.parse())
        .context("LINK_KIB_PER_SEC")?;
    let pid = std::process::id();
    let ids: Vec<String> = (0..devices).map(|i| format!("cut-{pid}-{i}")).collect();
    let _cleanup: Vec<DockerCleanup> = ids
        .iter()
        .map(|id| DockerCleanup {
            device: id.clone(),
            images: vec![],
        })
        .collect();
    let mut b = FleetBuilder::new().with_proxies();
    for id in &ids {
        let mut a = AgentSpec::new(id, "eu-west", 10.0, 10.0);
        a.labels.push(("fleet".into(), format!("cut-{pid}")));
        b = b.agent(a);
    }
    let f = b.start().context("starting the fleet")?;
    for id in &ids {
        if let Some(p) = &f.agent(id).proxy {
            p.set_rate(kib * 1024);
        }
    }
    // WASM: 4 MiB modules, each version distinct.
    const WASM_SIZE: usize = 4 << 20;
    for (v, tag) in [("1.0.0", 1u8), ("2.0.0", 2), ("3.0.0", 3)] {
        f.hub
            .push_release("sensor", v, 1, &padded_wasm(WASM_SIZE, tag))
            .context("pushing a WASM release")?;
    }
    let base = busybox_image_with(
        &f.hub.dir,
        "cut",
        r#"CMD ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"]"#,
    )
    .context("building the image")?;
    let image_size = std::fs::metadata(&base)?.len();
    for (i, v) in ["1.0.0", "2.0.0", "3.0.0"].iter().enumerate() {
        let tar =
            image_variant(&base, u32::try_from(i)? + 1, &f.hub.dir).context("an image variant")?;
        f.hub
            .push_container("svc", v, 1, &tar)
            .context("pushing a container release")?;
    }
    for kind in ["wasm", "ctr"] {
        f.hub.apply(&spec(pid, kind, "1.0.0", ""))?;
    }
    wait("1.0.0 everywhere", Duration::from_secs(900), || {
        ids.iter().all(|id| {
            f.hub.device(id).is_some_and(|d| {
                let ws = d["workloads"].as_array().cloned().unwrap_or_default();
                ws.len() == 2
                    && ws
                        .iter()
                        .all(|w| w["state"] == "running" && w["version"] == "1.0.0")
            })
        })
    })?;
    println!(
        "{devices} devices, links capped at {kib} KiB/s each; WASM module {:.1} MiB, container tarball {:.1} MiB",
        WASM_SIZE as f64 / 1048576.0,
        image_size as f64 / 1048576.0
    );
    println!("| release | without pre-download | with pre-download (staged before the approval) |");
    println!("|---|---|---|");
    for (kind, label) in [("wasm", "WASM"), ("ctr", "container")] {
        let plain = cutover(&f, pid, kind, "2.0.0", &ids, false)?;
        let staged = cutover(&f, pid, kind, "3.0.0", &ids, true)?;
        println!(
            "| {label}, {} devices in the wave | {plain:.2} s | {staged:.2} s ({:.1}x faster) |",
            devices - 1,
            plain / staged
        );
    }
    Ok(())
}
