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
    let beside: Vec<_> = std::fs::read_dir(fleet.root.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("sensor"))
        .collect();
    assert_eq!(
        beside.len(),
        1,
        "release push writes nothing beside the artifact: {beside:?}"
    );
    assert!(ok(hub, &["release", "ls"]).contains("sensor"));
    let spec = fleet.root.path().join("sensors.toml");
    std::fs::write(&spec, "name = \"sensors\"\n[[workloads]]\nname = \"sensor\"\nrelease = \"sensor@1.0.0\"\ntick_ms = 100\nconfig = { site = \"cli-test\" }\n")
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
    // `logs` asks the device over MQTT: the sample guest logs its configuration when it starts.
    let logs = ok(hub, &["logs", "gw-1", "sensor", "--lines", "20"]);
    assert!(logs.contains("site=cli-test"), "{logs}");
    let out = cli(hub, &["logs", "gw-1", "nosuch"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such workload"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

/// A command whose reader has gone away (`flotilla device ls | head -3`) ends quietly: exit 0 or 141 (as a shell
/// reports SIGPIPE), nothing on stderr about a panic. The pipe's read end is closed before the command starts, so
/// its very first write fails, every time.
#[test]
fn closed_stdout_pipe_ends_quietly() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    for args in [
        &["device", "ls"][..],
        &["device", "ls", "-o", "json"],
        &["device", "show", "gw-1"],
        &["release", "ls"],
        &["deploy", "ls"],
        &["keys", "--help"],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(bin_dir().join("flotilla"))
            .args(args)
            .env("FLOTILLA_SERVER", &hub.api)
            .env("FLOTILLA_TOKEN_FILE", hub.dir.join("admin.token"))
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0 | 141)),
            "{args:?}: {:?}\n{stderr}",
            out.status
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
    }
}

/// Logs written to a file or a pipe carry no ANSI colour codes: the hub's log (stderr to a file) and the
/// agent's text log; the demo keeps its logs in files under its directory, so its table stays readable.
#[test]
fn no_ansi_codes_when_not_a_terminal() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    wait_for("the hub to log", PATIENCE, || {
        let log = fleet.hub.proc.log_text();
        log.contains("hub connected to broker").then_some(())
    })
    .expect("hub log");
    let hub_log = fleet.hub.proc.log_text();
    assert!(!hub_log.contains('\x1b'), "ANSI in the hub log:\n{hub_log}");
    // The agent's text format (the harness runs agents with JSON logs): an invalid config is logged as text.
    let out = Command::new(bin_dir().join("flotilla-agent"))
        .args([
            "--config",
            "/nonexistent/agent.toml",
            "--log-format",
            "text",
        ])
        .output()
        .expect("agent runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.is_empty() && !stderr.contains('\x1b'), "{stderr}");
    // The demo: its table on stdout has no log lines in it, and its logs are plain files.
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
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains('\x1b') && !stdout.contains(" INFO "),
        "{stdout}"
    );
    assert!(
        !stderr.contains(" INFO "),
        "hub logs leaked to the terminal: {stderr}"
    );
    let demo = dir.path().join(".flotilla-demo");
    let hub_log = std::fs::read_to_string(demo.join("hub.log")).expect("hub.log");
    assert!(
        hub_log.contains("device enrolled") && !hub_log.contains('\x1b'),
        "{hub_log}"
    );
    // The printed hints work as shown: the PATH line names the directory that holds both binaries.
    let path_line = stdout
        .lines()
        .find(|l| l.contains("export PATH="))
        .expect("a PATH hint");
    let bin = path_line
        .split("PATH=\"")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .expect("PATH value");
    assert!(
        std::path::Path::new(bin).join("flotilla").exists(),
        "{path_line}"
    );
    assert!(
        std::path::Path::new(bin).join("flotilla-agent").exists(),
        "{path_line}"
    );
}

/// Every binary answers `--help` with exit 0 and a usage text (the simulator used to fail with "invalid digit").
#[test]
fn every_binary_answers_help() {
    for bin in [
        "flotilla",
        "flotilla-agent",
        "flotilla-sim",
        "broker-fanout",
        "build-firmware",
    ] {
        let out = Command::new(bin_dir().join(bin))
            .arg("--help")
            .output()
            .expect("runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{bin} --help: {:?}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.to_lowercase().contains("usage"), "{bin}: {stdout}");
    }
}

/// `flotilla device show` prints a readable summary by default and the API's JSON with `-o json`.
#[test]
fn device_show_is_a_table_by_default() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    wait_for("gw-1 to report", PATIENCE, || {
        hub.device("gw-1").filter(|d| d["online"] == true)
    })
    .expect("online");
    let text = ok(hub, &["device", "show", "gw-1"]);
    assert!(
        text.contains("device:")
            && text.contains("gw-1")
            && text.contains("region:")
            && text.contains("eu-west"),
        "{text}"
    );
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err(),
        "not JSON: {text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(hub, &["device", "show", "gw-1", "-o", "json"])).expect("json");
    assert_eq!(json["id"], "gw-1");
}
