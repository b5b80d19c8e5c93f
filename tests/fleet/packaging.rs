//! How the agent and hub are run as services: the shipped systemd units pass `systemd-analyze verify`, the agent
//! speaks the notify protocol those units rely on (`READY=1` once its restored workloads run, `WATCHDOG=1` from its
//! loop), and a bad configuration exits with 78, the status the units do not restart on.

use flotilla_fleet_tests::{AgentSpec, FleetBuilder, bin_dir, firmware};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

/// The shipped unit, pointed at the binaries this build made (verify checks that `ExecStart` exists).
fn unit_for_this_build(name: &str, dir: &Path) -> std::path::PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cross/systemd")
        .join(name);
    let text = std::fs::read_to_string(&shipped).expect("unit");
    let bin = bin_dir();
    let text = text
        .replace(
            "/usr/bin/flotilla-agent",
            &bin.join("flotilla-agent").display().to_string(),
        )
        .replace(
            "/usr/bin/flotilla ",
            &format!("{} ", bin.join("flotilla").display()),
        );
    let out = dir.join(name);
    std::fs::write(&out, text).expect("write");
    out
}

#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("dir");
    for name in ["flotilla-agent.service", "flotilla.service"] {
        let unit = unit_for_this_build(name, dir.path());
        let out = std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .expect("systemd-analyze (Debian's systemd package) runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn agent_reports_ready_after_restore_and_pings_the_watchdog() {
    let mut f = FleetBuilder::new()
        .agent(AgentSpec::new("svc-1", "eu-west", 10.0, 10.0))
        .start()
        .expect("fleet");
    f.hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    f.hub
        .apply(
            "name = \"sensors\"\n[target]\nselector = { role = \"gateway\" }\n[[workloads]]\nname = \"sensor\"\n\
             release = \"sensor@1.0.0\"\ntick_ms = 100\nmemory_mib = 4\ncpu_ms = 20\n",
        )
        .expect("applied");
    f.hub
        .wait_workload("svc-1", "sensor", "running")
        .expect("running");
    // Restart it as systemd would start it: a notify socket, and a 1 s watchdog.
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("notify");
    let listener = UnixDatagram::bind(&socket).expect("bind");
    listener
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let agent = f.agent_mut("svc-1");
    agent.kill9();
    agent.env = vec![
        ("NOTIFY_SOCKET".into(), socket.display().to_string()),
        ("WATCHDOG_USEC".into(), "1000000".into()),
    ];
    agent.start().expect("restarts");
    let mut messages = vec![];
    let start = Instant::now();
    while messages
        .iter()
        .filter(|m: &&String| m.starts_with("WATCHDOG=1"))
        .count()
        < 3
    {
        let mut buf = [0u8; 512];
        let len = listener
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{e}: got {messages:?}"));
        messages.push(String::from_utf8_lossy(&buf[..len]).into_owned());
    }
    assert!(
        messages[0].starts_with("READY=1\nSTATUS=1 workloads restored\n"),
        "{messages:?}"
    );
    // Three pings at half the 1 s timeout: about a second after READY, well under the timeout each.
    assert!(start.elapsed() < Duration::from_secs(20), "{messages:?}");
}

#[test]
fn bad_configuration_exits_78() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "broker = 5\n").expect("write");
    let status = std::process::Command::new(bin_dir().join("flotilla-agent"))
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("runs");
    assert_eq!(status.code(), Some(78));
}
