//! How the agent and hub are run as services: the shipped systemd units pass `systemd-analyze verify`, the agent
//! speaks the notify protocol those units rely on (`READY=1` once its restored workloads run, `WATCHDOG=1` from its
//! loop), and a bad configuration exits with 78, the status the units do not restart on.

use flotilla_fleet_tests::{AgentSpec, FleetBuilder, PATIENCE, bin_dir, firmware};
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
            "/usr/bin/flotilla-agent-launcher",
            &bin.join("flotilla-agent-launcher").display().to_string(),
        )
        .replace(
            "/usr/bin/flotilla-agent ",
            &format!("{} ", bin.join("flotilla-agent").display()),
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

/// Runs `sh -c SCRIPT` in the container as root; its stdout, or a panic with both streams when it fails.
fn exec(container: &str, script: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["exec", container, "sh", "-c", script])
        .output()
        .expect("docker exec");
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes the container when the test ends, passed or not.
struct Container(String);
impl Drop for Container {
    fn drop(&mut self) {
        flotilla_fleet_tests::docker(&["rm", "-f", &self.0]);
    }
}

/// The amd64 agent package in a Debian root (a container made from debootstrap's minbase): it installs its files,
/// the `flotilla` user, the state directory and the conffile; the installed binary, started as the unit starts it
/// (its `User=` and `ExecStart=`) with a notify socket the test listens on, enrolls with a real hub and reports
/// READY, and STOPPING on SIGTERM; an upgrade keeps the edited conffile; a purge removes everything it installed.
#[test]
#[ignore = "needs the built packages and a Debian image: scripts/test-targets.sh"]
fn the_agent_package_installs_runs_upgrades_and_purges_in_debian() {
    let env = |k: &str| {
        std::env::var(k)
            .unwrap_or_else(|_| panic!("{k} is not set: run through scripts/test-targets.sh"))
    };
    let (v1, v2, hub_deb, image) = (
        std::path::PathBuf::from(env("FLOTILLA_DEB_AGENT")),
        std::path::PathBuf::from(env("FLOTILLA_DEB_AGENT_UPGRADE")),
        std::path::PathBuf::from(env("FLOTILLA_DEB_HUB")),
        env("FLOTILLA_DEBIAN_IMAGE"),
    );
    let f = FleetBuilder::new().start().expect("hub");
    let dir = tempfile::tempdir().expect("dir");
    let debs = dir.path().join("debs");
    let notify = dir.path().join("notify");
    for d in [&debs, &notify] {
        std::fs::create_dir(d).expect("dir");
    }
    std::fs::copy(&v1, debs.join("v1.deb")).expect("copy");
    std::fs::copy(&v2, debs.join("v2.deb")).expect("copy");
    std::fs::copy(&hub_deb, debs.join("hub.deb")).expect("copy");
    let listener = UnixDatagram::bind(notify.join("sock")).expect("bind");
    listener
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    // The agent runs as the package's unprivileged user: it must be able to reach the socket.
    use std::os::unix::fs::PermissionsExt;
    for p in [notify.clone(), notify.join("sock")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let name = format!("flotilla-deb-{}", std::process::id());
    let id = flotilla_fleet_tests::docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "-v",
        &format!("{}:/debs:ro", debs.display()),
        "-v",
        &format!("{}:/run/flotilla-notify", notify.display()),
        &image,
        "sleep",
        "infinity",
    ]);
    assert!(!id.is_empty(), "the container from {image} starts");
    let c = Container(name);

    // Install: files, user, state directory, conffile.
    exec(&c.0, "dpkg -i /debs/v1.deb");
    exec(
        &c.0,
        "test -x /usr/bin/flotilla-agent && test -x /usr/bin/flotilla-agent-launcher \
         && test -f /lib/systemd/system/flotilla-agent.service",
    );
    assert!(exec(&c.0, "getent passwd flotilla").contains("/usr/sbin/nologin"));
    assert_eq!(
        exec(&c.0, "stat -c '%U %a' /var/lib/flotilla"),
        "flotilla 700"
    );
    assert!(
        exec(&c.0, "dpkg-query -W -f='${Conffiles}' flotilla-agent")
            .contains("/etc/flotilla/agent.toml")
    );
    // Not configured yet: the shipped example configuration is refused with 78, which the unit does not restart.
    let code = exec(
        &c.0,
        "su -s /bin/sh flotilla -c '/usr/bin/flotilla-agent --config /etc/flotilla/agent.toml' >/dev/null 2>&1; echo $?",
    );
    assert_eq!(code, "78");

    // Configure it (an edit of the conffile) for the real hub, then start it as the unit would.
    let token = f
        .hub
        .enroll_token("eu-west", "eu-west-a", &[("role", "gateway")])
        .expect("token");
    let port = f.hub.mqtts_port().expect("the hub's TLS listener");
    let config = format!(
        "version = 1\ndevice_id = \"deb-1\"\ndata_dir = \"/var/lib/flotilla\"\nbroker = \"mqtts://localhost:{port}\"\n\
         enroll_token = \"{token}\"\nregion = \"eu-west\"\nzone = \"eu-west-a\"\n[position]\nlat = 52.5\nlon = 13.4\n\
         [container]\nenabled = false\n"
    );
    exec(
        &c.0,
        &format!("cat > /etc/flotilla/agent.toml <<'EOT'\n{config}EOT"),
    );
    let unit = exec(&c.0, "cat /lib/systemd/system/flotilla-agent.service");
    let field = |k: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("the unit has {k}="))
            .to_owned()
    };
    let (user, exec_start) = (field("User"), field("ExecStart"));
    exec(
        &c.0,
        &format!(
            "su -s /bin/sh {user} -c 'umask 0077; NOTIFY_SOCKET=/run/flotilla-notify/sock {exec_start} \
             >/tmp/agent.log 2>&1 &'"
        ),
    );
    let mut buf = [0u8; 512];
    let len = listener
        .recv(&mut buf)
        .expect("READY from the packaged agent");
    let ready = String::from_utf8_lossy(&buf[..len]).into_owned();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    flotilla_fleet_tests::wait_for("the packaged agent online at the hub", PATIENCE, || {
        f.hub.device("deb-1").filter(|d| d["online"] == true)
    })
    .expect("online");
    assert_eq!(
        exec(&c.0, "stat -c %U /var/lib/flotilla/agent.db"),
        "flotilla"
    );
    exec(&c.0, "kill -TERM -1 || true");
    let stopping = loop {
        let len = listener.recv(&mut buf).expect("STOPPING on SIGTERM");
        let m = String::from_utf8_lossy(&buf[..len]).into_owned();
        if m.starts_with("STOPPING=1") {
            break m;
        }
    };
    assert!(stopping.starts_with("STOPPING=1"));

    // Upgrade: the edited conffile stays, the version moves on, the state stays.
    exec(&c.0, "dpkg -i /debs/v2.deb");
    assert!(exec(&c.0, "cat /etc/flotilla/agent.toml").contains("device_id = \"deb-1\""));
    let v1_version = exec(&c.0, "dpkg-deb -f /debs/v1.deb Version");
    let v2_version = exec(&c.0, "dpkg-query -W -f='${Version}' flotilla-agent");
    assert_ne!(v1_version, v2_version);
    assert_eq!(v2_version, exec(&c.0, "dpkg-deb -f /debs/v2.deb Version"));
    exec(&c.0, "test -f /var/lib/flotilla/agent.db");

    // Purge: binary, unit, configuration and state are gone, and dpkg no longer knows the package.
    exec(&c.0, "dpkg --purge flotilla-agent");
    exec(
        &c.0,
        "! test -e /usr/bin/flotilla-agent && ! test -e /etc/flotilla && ! test -e /var/lib/flotilla \
         && ! test -e /lib/systemd/system/flotilla-agent.service",
    );
    let status = exec(
        &c.0,
        "dpkg-query -W -f='${Status}' flotilla-agent 2>&1 || true",
    );
    assert!(
        status.contains("not-installed") || status.contains("no packages found"),
        "{status}"
    );

    // The hub package: its binary runs, its unit and state directory are there; a purge keeps the hub's state
    // (its keys and database).
    exec(&c.0, "dpkg -i /debs/hub.deb");
    assert!(exec(&c.0, "/usr/bin/flotilla --version").starts_with("flotilla "));
    exec(&c.0, "test -f /lib/systemd/system/flotilla.service");
    assert_eq!(
        exec(&c.0, "stat -c '%U %a' /var/lib/flotilla-hub"),
        "flotilla 700"
    );
    exec(
        &c.0,
        "dpkg --purge flotilla && test -d /var/lib/flotilla-hub && ! test -e /usr/bin/flotilla",
    );
}
