//! The operator CLI and the README's main job, run as real processes: `flotilla demo` converges, and the CLI
//! commands work against a running hub (table and JSON output, errors with a non-zero exit).

use flotilla_fleet_tests::{AgentSpec, FleetBuilder, PATIENCE, bin_dir, firmware, wait_for};
use std::process::{Command, Output, Stdio};

fn cli(hub: &flotilla_fleet_tests::Hub, args: &[&str]) -> Output {
    Command::new(bin_dir().join("flotilla"))
        .args(args)
        .env("FLOTILLA_SERVER", &hub.api)
        .env("FLOTILLA_TOKEN_FILE", hub.dir.join("admin.token"))
        .env("FLOTILLA_CONFIG", "/nonexistent/cli.toml")
        .output()
        .expect("runs")
}

fn ok(hub: &flotilla_fleet_tests::Hub, args: &[&str]) -> String {
    let out = cli(hub, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The README's main job: `flotilla demo` starts a hub and six agents in three regions and converges.
#[test]
fn demo_converges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(bin_dir().join("flotilla"))
        .current_dir(dir.path())
        .args([
            "demo",
            "--exit-after-converge",
            "--http",
            "127.0.0.1:0",
            "--mqtt",
            "127.0.0.1:0",
        ])
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("converged: 3 regions, one sensor each"),
        "{stdout}"
    );
}

/// The interactive demo (as `scripts/demo.sh` runs it) stops on SIGTERM, as from systemd or `timeout`, and takes
/// its agents with it. (It used to catch SIGTERM in the hub thread only and hang.)
#[test]
fn demo_stops_on_sigterm() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut demo = Command::new(bin_dir().join("flotilla"))
        .current_dir(dir.path())
        .args(["demo", "--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    let stdout = demo.stdout.take().expect("stdout");
    let mut seen = String::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.expect("stdout line");
        seen += &line;
        seen.push('\n');
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    assert!(seen.contains("converged: 3 regions"), "{seen}");
    let term = Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let status = wait_for("the demo to exit after SIGTERM", PATIENCE, || {
        demo.try_wait().ok().flatten()
    });
    if status.is_err() {
        let _ = demo.kill();
        let _ = demo.wait();
    }
    assert!(status.expect("exited").success());
    // Its agents' data lives under the demo directory; none of them may still be running.
    let pattern = dir.path().display().to_string();
    let left = Command::new("pgrep")
        .args(["-f", &pattern])
        .output()
        .expect("pgrep");
    assert!(
        left.stdout.is_empty(),
        "agents left running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

/// release push, apply, device ls, deploy ls/status, why, rollout status, in table and JSON form.
#[test]
fn cli_against_a_running_hub() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    let wasm = fleet.root.path().join("sensor.wasm");
    std::fs::write(&wasm, firmware("sensor")).expect("write");
    let key = hub.release_key();
    let pushed = ok(
        hub,
        &[
            "release",
            "push",
            wasm.to_str().expect("utf8"),
            "--name",
            "sensor",
            "--version",
            "1.0.0",
            "--key",
            key.to_str().expect("utf8"),
        ],
    );
    assert!(pushed.contains("pushed sensor@1.0.0"), "{pushed}");
    assert!(ok(hub, &["release", "ls"]).contains("sensor"));
    let spec = fleet.root.path().join("sensors.toml");
    std::fs::write(&spec, "name = \"sensors\"\n[[workloads]]\nname = \"sensor\"\nrelease = \"sensor@1.0.0\"\ntick_ms = 100\n")
        .expect("write");
    assert!(
        ok(hub, &["apply", "-f", spec.to_str().expect("utf8")])
            .contains("applied deployment sensors")
    );
    hub.wait_workload("gw-1", "sensor", "running")
        .expect("running");
    let table = ok(hub, &["device", "ls"]);
    assert!(
        table.contains("gw-1") && table.contains("sensor@1.0.0:running"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(hub, &["device", "ls", "--output", "json"])).expect("json");
    assert_eq!(json[0]["id"], "gw-1");
    assert!(ok(hub, &["deploy", "status", "sensors"]).contains("1 of 1 placed devices running"));
    assert!(ok(hub, &["deploy", "ls"]).contains("sensors"));
    assert!(ok(hub, &["why", "gw-1", "sensor"]).contains("running version 1.0.0"));
    // Errors exit non-zero with the hub's explanation.
    let bad = fleet.root.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"sensors\"\n[[workloads]]\nname = \"sensor\"\nrelease = \"latest\"\n",
    )
    .expect("write");
    let out = cli(hub, &["apply", "-f", bad.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("workloads[0].release"));
    let out = cli(hub, &["rollout", "status", "sensors"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("404"));
}
