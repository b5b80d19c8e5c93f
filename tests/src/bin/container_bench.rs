//! Container start benchmark, side by side in one run on this machine's Docker engine:
//! - apply (hub API) -> the device reports the container running, for one device (image cached and loaded; each
//!   round changes the spec, so a new container is created and started), against `docker run -d` of the same
//!   image on the same engine;
//! - agent `kill -9` + restart with 10 running containers -> all 10 adopted (0 restarts expected);
//! - image delivery of a new image (a distinct variant each round): over MQTT chunks from the hub, and pulled
//!   from a loopback `docker-registry`, in MB/s of the uncompressed image and as desired -> running.
//!
//! Usage: `container-bench [ROUNDS]` (default 20). Build first: `cargo build --release -p flotilla-hub
//! -p flotilla-agent -p flotilla-fleet-tests --bins`, run `target/release/container-bench`.

use anyhow::{Context, Result};
use flotilla_fleet_tests::{
    AgentSpec, DockerCleanup, FleetBuilder, Registry, busybox_image, docker, image_variant,
};
use std::time::{Duration, Instant};

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

/// A shell that exits on SIGTERM at once (as PID 1 it would otherwise ignore it and wait out the stop timeout).
const COMMAND: &str = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done";

/// The bench deployment: workloads `names` on the bench device.
fn spec(device: &str, names: &[String]) -> String {
    let mut s = format!("name = \"bench\"\n[target]\nselector = {{ device = \"{device}\" }}\n");
    for n in names {
        s += &format!(
            "[[workloads]]\nname = \"{n}\"\nrelease = \"{n}@1.0.0\"\nkind = \"container\"\n\
             memory_mib = 16\nrestart = \"always\"\nhealth_secs = 1\n\
             command = [\"/bin/sh\", \"-c\", \"{COMMAND}\"]\n"
        );
    }
    s
}

/// Seconds of the day of an RFC 3339 UTC timestamp (`2026-12-06T03:07:43.310660Z`).
fn secs_of_day(ts: &str) -> Option<f64> {
    let t = ts.split_once('T')?.1.trim_end_matches('Z');
    let mut p = t.split(':');
    let (h, m, s): (f64, f64, f64) = (
        p.next()?.parse().ok()?,
        p.next()?.parse().ok()?,
        p.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The agent's JSON log lines with their time of day in seconds.
fn log_events(log: &str) -> impl Iterator<Item = (f64, serde_json::Value)> + '_ {
    log.lines().filter_map(|line| {
        let v = serde_json::from_str::<serde_json::Value>(line).ok()?;
        let t = v["timestamp"].as_str().and_then(secs_of_day)?;
        Some((t, v))
    })
}

/// Per round, milliseconds from "desired state accepted" to the next "running" in the agent's JSON log.
fn device_side(log: &str) -> Vec<f64> {
    let mut out = Vec::new();
    let mut accepted = None;
    for (t, v) in log_events(log) {
        match v["fields"]["message"].as_str() {
            Some("desired state accepted") => accepted = Some(t),
            Some("running") => {
                if let Some(a) = accepted.take() {
                    out.push((t - a) * 1e3);
                }
            }
            _ => {}
        }
    }
    out
}

/// Milliseconds from the last log line with message `from` (and `what` containing `what`, if given) to the next
/// line with message `to`.
fn span(log: &str, from: &str, what: Option<&str>, to: &str) -> Option<f64> {
    let mut start = None;
    let mut last = None;
    for (t, v) in log_events(log) {
        let msg = v["fields"]["message"].as_str().unwrap_or("");
        let what_ok =
            what.is_none_or(|w| v["fields"]["what"].as_str().is_some_and(|x| x.contains(w)));
        if msg == from && what_ok {
            start = Some(t);
        } else if msg == to
            && let Some(s) = start.take()
        {
            last = Some((t - s) * 1e3);
        }
    }
    last
}

/// Applies a spec that may remove the previous round's workload (hence forced).
fn apply(fleet: &flotilla_fleet_tests::Fleet, spec: &str) -> Result<()> {
    fleet.hub.client.post(
        "/api/v1/deployments",
        "application/toml",
        spec.as_bytes(),
        &[
            ("x-flotilla-spec-file", "bench.toml"),
            ("x-flotilla-force", "true"),
        ],
    )?;
    Ok(())
}

/// Polls the hub until the device reports `workload` running at the desired generation.
fn poll(fleet: &flotilla_fleet_tests::Fleet, id: &str, workload: &str, round: usize) -> Result<()> {
    let t = Instant::now();
    loop {
        if let Some(d) = fleet.hub.device(id) {
            let w = d["workloads"]
                .as_array()
                .and_then(|ws| ws.iter().find(|w| w["name"] == workload).cloned());
            let gen_ok = d["applied_generation"] == d["desired_generation"];
            if gen_ok && w.is_some_and(|w| w["state"] == "running") {
                return Ok(());
            }
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "round {round} timed out"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let id = format!("bench-{}", std::process::id());
    let mut agent = AgentSpec::new(&id, "eu-west", 52.5, 13.4);
    agent.labels.push(("device".into(), id.clone()));
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup = DockerCleanup {
        device: id.clone(),
        images: vec![],
    };
    let mut fleet = FleetBuilder::new().agent(agent).start()?;
    let tar = busybox_image(&fleet.hub.dir, "bench")?;
    // One release name per round (a workload's release carries its name); all share one image tarball.
    let names: Vec<String> = (0..=rounds.max(10)).map(|i| format!("c{i}")).collect();
    for n in &names {
        fleet.hub.push_container(n, "1.0.0", 1, &tar)?;
    }
    // Warm-up: the first apply downloads and loads the image.
    let t = Instant::now();
    apply(&fleet, &spec(&id, &names[..1]))?;
    poll(&fleet, &id, "c0", 0)?;
    println!(
        "first apply (download {} KiB over MQTT + load + start): {:.0} ms",
        std::fs::metadata(&tar)?.len() / 1024,
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut ours = Vec::new();
    let mut mixed = Vec::new();
    // Each timed round starts a new workload (a new container from the loaded image) beside the previous one, as
    // `docker run` starts one beside nothing; an untimed apply then removes the previous one and waits until it
    // is gone. `mixed` times the other shape: the new one starts while the old one is being removed.
    let gone = |workload: &str| -> Result<()> {
        let t = Instant::now();
        while !docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=io.flotilla.device={id}"),
            "--filter",
            &format!("label=io.flotilla.workload={workload}"),
        ])
        .is_empty()
        {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(60),
                "{workload} not removed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    };
    for round in 1..=rounds {
        let t = Instant::now();
        apply(&fleet, &spec(&id, &names[round - 1..=round]))?;
        poll(&fleet, &id, &names[round], round)?;
        ours.push(t.elapsed().as_secs_f64() * 1e3);
        apply(&fleet, &spec(&id, &names[round..=round]))?;
        gone(&names[round - 1])?;
    }
    let log = fleet.agent(&id).log();
    for round in 1..=rounds.min(10) {
        // Back and forth between two workloads: each apply starts one and removes the other.
        let (new, old) = if round % 2 == 1 {
            (0, rounds)
        } else {
            (rounds, 0)
        };
        let t = Instant::now();
        apply(&fleet, &spec(&id, &names[new..=new]))?;
        poll(&fleet, &id, &names[new], round)?;
        mixed.push(t.elapsed().as_secs_f64() * 1e3);
        gone(&names[old])?;
    }
    // On the device: desired state accepted -> the new workload running (from the agent's own log timestamps).
    // For a breakdown of where a round's time goes: `CONTAINER_BENCH_LOG=path`.
    if let Ok(path) = std::env::var("CONTAINER_BENCH_LOG") {
        std::fs::write(path, &log)?;
    }
    let mut device = device_side(&log);
    // The first round downloaded the image.
    if !device.is_empty() {
        device.remove(0);
    }
    // docker run of the same (already loaded) image on the same engine.
    let image = docker(&[
        "ps",
        "--filter",
        &format!("label=io.flotilla.device={id}"),
        "--format",
        "{{.Image}}",
    ]);
    let image = image
        .lines()
        .next()
        .context("the bench container's image")?
        .to_owned();
    let mut plain = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let cid = docker(&["run", "-d", "--rm", &image, "/bin/sh", "-c", COMMAND]);
        plain.push(t.elapsed().as_secs_f64() * 1e3);
        docker(&["rm", "-f", &cid]);
    }
    let (o50, o95) = (percentile(&mut ours, 0.5), percentile(&mut ours, 0.95));
    let (d50, d95) = (percentile(&mut plain, 0.5), percentile(&mut plain, 0.95));
    println!(
        "apply -> running (hub API, one device, {rounds} rounds): p50 {o50:.0} ms, p95 {o95:.0} ms"
    );
    println!(
        "docker run -d (same image, same engine, {rounds} rounds):  p50 {d50:.0} ms, p95 {d95:.0} ms"
    );
    println!("ratio p50: {:.2}x", o50 / d50);
    println!(
        "apply -> running while the previous workload is removed at the same time ({} rounds): p50 {:.0} ms ({:.2}x)",
        mixed.len(),
        percentile(&mut mixed, 0.5),
        percentile(&mut mixed, 0.5) / d50
    );
    let (v50, v95) = (percentile(&mut device, 0.5), percentile(&mut device, 0.95));
    println!(
        "on the device, desired state accepted -> running ({} rounds, release document fetched over MQTT included): \
         p50 {v50:.0} ms, p95 {v95:.0} ms; ratio to docker run p50: {:.2}x",
        device.len(),
        v50 / d50
    );

    // Ten containers, then an agent kill -9 and restart: time until all ten are adopted.
    apply(&fleet, &spec(&id, &names[..10]))?;
    for n in &names[..10] {
        poll(&fleet, &id, n, 0)?;
    }
    // The ten containers' IDs, to tell an adopted container from a re-created one.
    let ids = || -> Vec<String> {
        (0..10)
            .map(|i| {
                docker(&[
                    "ps",
                    "--filter",
                    &format!("label=io.flotilla.workload=c{i}"),
                    "--filter",
                    &format!("label=io.flotilla.device={id}"),
                    "--format",
                    "{{.ID}} {{.RunningFor}}",
                ])
            })
            .collect()
    };
    let started = ids();
    let a = fleet.agent_mut(&id);
    a.kill9();
    let t = Instant::now();
    a.start()?;
    loop {
        if a.log().matches("adopted running container").count() >= 10 {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(30),
            "adoption timed out:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let adopt = t.elapsed().as_secs_f64() * 1e3;
    let after = ids();
    let same = started
        .iter()
        .zip(&after)
        .filter(|(b, a)| b.split(' ').next() == a.split(' ').next())
        .count();
    println!(
        "agent restart (process start included) -> 10 containers adopted: {adopt:.0} ms; {same}/10 the same containers (0 restarts)"
    );

    // Image delivery: a new image each round, over MQTT chunks, then from a loopback registry.
    let registry = Registry::start()?;
    let dl_rounds = 3;
    let mut results: Vec<(&str, Vec<f64>, Vec<f64>)> = Vec::new();
    for source in ["MQTT chunks", "loopback registry"] {
        let (mut mbps, mut total) = (Vec::new(), Vec::new());
        for r in 0..dl_rounds {
            let n = if source == "MQTT chunks" {
                1000 + r
            } else {
                2000 + r
            };
            let variant = image_variant(&tar, n, &fleet.hub.dir)?;
            let size = std::fs::metadata(&variant)?.len() as f64;
            let name = format!("d{n}");
            if source == "MQTT chunks" {
                fleet.hub.push_container(&name, "1.0.0", 1, &variant)?;
            } else {
                let reference = registry.push(&variant, &format!("v{n}"))?;
                fleet
                    .hub
                    .push_container_with_registry(&name, "1.0.0", 1, &variant, &reference)?;
            }
            apply(&fleet, &spec(&id, std::slice::from_ref(&name)))?;
            poll(&fleet, &id, &name, r as usize)?;
            let log = fleet.agent(&id).log();
            let transfer = if source == "MQTT chunks" {
                span(
                    &log,
                    "fetching",
                    Some("Blob"),
                    "artifact verified and cached",
                )
            } else {
                span(&log, "pulling from the registry", None, "image pulled")
            }
            .context("transfer timestamps in the agent log")?;
            mbps.push(size / 1e6 / (transfer / 1e3));
            total.push(*device_side(&log).last().context("desired -> running")?);
        }
        results.push((source, mbps, total));
    }
    for (source, mut mbps, mut total) in results {
        println!(
            "image delivery of a new {:.1} MB image, {source} ({dl_rounds} rounds): transfer p50 {:.1} MB/s \
             (MQTT: download + hash + image check; registry: pull + extract by the engine), desired -> running \
             p50 {:.0} ms",
            std::fs::metadata(&tar)?.len() as f64 / 1e6,
            percentile(&mut mbps, 0.5),
            percentile(&mut total, 0.5)
        );
    }
    Ok(())
}
