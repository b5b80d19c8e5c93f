//! Firmware through RAUC: the agent's RAUC backend against Debian's real `rauc` 1.8 service, on a private D-Bus
//! system bus the test starts, with a custom bootloader backend (a script keeping U-Boot's part in files) and
//! two slot files. Bundles are built and signed by `firmware-images/build-rauc-bundle.sh` with test keys made at
//! build time. A bundle signed by a key outside RAUC's keyring is refused by RAUC (the reason reaches the hub,
//! nothing is written); a good one is installed by RAUC, booted, marked good; a release whose system never
//! becomes healthy is marked bad by the agent and the device goes back, reported as rolled back.

use flotilla_fleet_tests::{AgentSpec, Fleet, FleetBuilder, PATIENCE, wait_for};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const BACKEND: &str = r#"#!/bin/sh
# RAUC's custom bootloader backend, keeping the bootloader's state in files beside this script.
d=$(dirname "$0")
case "$1" in
  get-primary) cat "$d/primary" 2>/dev/null || echo A ;;
  set-primary) echo "$2" >"$d/primary" ;;
  get-state) cat "$d/state-$2" 2>/dev/null || echo good ;;
  set-state) echo "$3" >"$d/state-$2" ;;
  get-current) cat "$d/booted" ;;
  *) exit 1 ;;
esac
"#;

/// RAUC's world: its config, keyring, slots, bootloader state, bus and service.
struct Rauc {
    dir: PathBuf,
    bus: Child,
    service: Option<Child>,
}

impl Rauc {
    fn address(&self) -> String {
        format!("unix:path={}", self.dir.join("bus.sock").display())
    }

    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("dir");
        let backend = dir.join("backend.sh");
        std::fs::write(&backend, BACKEND).expect("backend");
        std::fs::set_permissions(
            &backend,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        for slot in ["slot-a", "slot-b"] {
            std::fs::write(dir.join(slot), vec![0u8; 4 << 20]).expect("slot");
        }
        std::fs::write(dir.join("booted"), "A\n").expect("booted");
        std::fs::write(
            dir.join("system.conf"),
            format!(
                "[system]\ncompatible=flotilla-gw\nbootloader=custom\ndata-directory={d}/data\n\n\
                 [handlers]\nbootloader-custom-backend={d}/backend.sh\n\n[keyring]\npath={d}/bundles/keys/release.cert.pem\n\n\
                 [slot.rootfs.0]\ndevice={d}/slot-a\ntype=raw\nbootname=A\n\n\
                 [slot.rootfs.1]\ndevice={d}/slot-b\ntype=raw\nbootname=B\n",
                d = dir.display()
            ),
        )
        .expect("system.conf");
        std::fs::create_dir_all(dir.join("data")).expect("data");
        std::fs::write(
            dir.join("bus.conf"),
            format!(
                "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\" \
                 \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig>\n<type>system</type>\n\
                 <listen>unix:path={}/bus.sock</listen>\n<auth>EXTERNAL</auth>\n<policy context=\"default\">\n\
                 <allow user=\"*\"/><allow own=\"*\"/><allow send_type=\"method_call\"/>\
                 <allow send_destination=\"*\"/><allow receive_sender=\"*\"/>\n</policy>\n</busconfig>\n",
                dir.display()
            ),
        )
        .expect("bus.conf");
        let bus = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", dir.join("bus.conf").display()))
            .arg("--nofork")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (apt-get install dbus)");
        wait_for("the private bus", PATIENCE, || {
            dir.join("bus.sock").exists().then_some(())
        })
        .expect("bus");
        Self {
            dir: dir.to_owned(),
            bus,
            service: None,
        }
    }

    /// Starts RAUC's service as the system booted from `slot` (a reboot, as far as RAUC can tell).
    fn boot(&mut self, slot: &str) {
        if let Some(mut s) = self.service.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        std::fs::write(self.dir.join("booted"), format!("{slot}\n")).expect("booted");
        let log = std::fs::File::create(self.dir.join(format!("service-{slot}.log"))).expect("log");
        let child = Command::new("rauc")
            .arg(format!("--conf={}", self.dir.join("system.conf").display()))
            .arg("service")
            .arg(format!("--override-boot-slot={slot}"))
            .env("DBUS_SYSTEM_BUS_ADDRESS", self.address())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("rauc service");
        self.service = Some(child);
        wait_for("rauc service on the bus", PATIENCE, || {
            let out = Command::new("rauc")
                .args(["status", "--output-format=json"])
                .env("DBUS_SYSTEM_BUS_ADDRESS", self.address())
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (out.status.success() && text.contains(&format!("\"booted\":\"{slot}\""))).then_some(())
        })
        .expect("rauc service");
    }

    fn state(&self, slot: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("state-{slot}")))
            .unwrap_or_else(|_| "good".into())
            .trim()
            .to_owned()
    }

    fn bundle(&self, version: &str, signer: &str) -> PathBuf {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-images/build-rauc-bundle.sh");
        let out = Command::new(script)
            .arg(self.dir.join("bundles"))
            .args([version, "flotilla-gw", signer])
            .output()
            .expect("build-rauc-bundle.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    }
}

impl Drop for Rauc {
    fn drop(&mut self) {
        if let Some(mut s) = self.service.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = self.bus.kill();
        let _ = self.bus.wait();
    }
}

fn fw_row(f: &Fleet, id: &str) -> Option<serde_json::Value> {
    f.hub.device(id)?["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["name"] == "os")
        .cloned()
}

fn spec(version: &str) -> String {
    format!(
        "name = \"os\"\n[target]\nselector = {{ role = \"gateway\" }}\n[[workloads]]\nname = \"os\"\n\
         kind = \"firmware\"\nrelease = \"os@{version}\"\n"
    )
}

#[test]
fn rauc_installs_marks_good_and_bad_and_refuses_a_bundle_outside_its_keyring() {
    for tool in ["rauc", "dbus-daemon", "mksquashfs", "mkfs.ext4", "openssl"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} missing (apt-get install rauc dbus squashfs-tools e2fsprogs openssl)"
        );
    }
    let work = tempfile::tempdir().expect("tempdir");
    let mut rauc = Rauc::new(&work.path().join("rauc"));
    let good = rauc.bundle("2.0", "release");
    let bad = rauc.bundle("3.0", "release");
    let rogue = rauc.bundle("2.1-rogue", "rogue");
    rauc.boot("A");

    let mut fleet = FleetBuilder::new()
        .agent(AgentSpec::new("rauc-1", "eu-west", 50.1, 8.7))
        .start()
        .expect("fleet");
    let rebooted = work.path().join("rebooted");
    {
        let agent = fleet.agent_mut("rauc-1");
        agent.kill9();
        let mut toml = std::fs::read_to_string(&agent.config).expect("agent.toml");
        toml.push_str(&format!(
            "\n[firmware]\nbackend = \"rauc\"\ncompatible = \"flotilla-gw\"\nconfirm_secs = 10\n\
             reboot_command = [\"touch\", \"{}\"]\n",
            rebooted.display()
        ));
        std::fs::write(&agent.config, toml).expect("agent.toml");
        agent
            .env
            .push(("DBUS_SYSTEM_BUS_ADDRESS".into(), rauc.address()));
        agent.start().expect("agent");
    }
    let f = &fleet;
    wait_for("the device reports RAUC's slot", PATIENCE, || {
        let d = f.hub.device("rauc-1")?;
        (d["firmware"]["backend"] == "rauc" && d["firmware"]["slot"] == "A").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.device("rauc-1")));
    let push = |f: &Fleet, version: &str, path: &Path| {
        f.hub
            .push_system("os", version, 1, "firmware", path, "flotilla-gw")
            .expect("push");
    };
    let slot_b = || std::fs::read(rauc.dir.join("slot-b")).expect("slot b");
    let empty = slot_b();

    // Signed by a key RAUC's keyring does not hold: RAUC refuses it; the reason reaches the hub.
    push(f, "2.1-rogue", &rogue);
    f.hub.apply(&spec("2.1-rogue")).expect("apply rogue");
    let w = wait_for("RAUC's refusal reported", PATIENCE, || {
        fw_row(f, "rauc-1").filter(|w| w["version"] == "2.1-rogue" && !w["rejected"].is_null())
    })
    .expect("refused");
    let why = w["rejected"].as_str().unwrap_or_default();
    eprintln!("RAUC's refusal as the hub shows it: {why}");
    assert!(
        why.contains("refused before activation") && why.contains("rauc install"),
        "{why}"
    );
    assert_eq!(slot_b(), empty, "nothing written to the other slot");
    assert_eq!(std::fs::read_to_string(rauc.dir.join("primary")).ok(), None);

    // A good bundle: RAUC writes slot B and makes it primary; after the "reboot" the agent marks it good.
    push(f, "2.0", &good);
    f.hub.apply(&spec("2.0")).expect("apply 2.0");
    wait_for("the reboot asked for", PATIENCE, || {
        rebooted.exists().then_some(())
    })
    .expect("reboot");
    assert_eq!(
        std::fs::read_to_string(rauc.dir.join("primary"))
            .ok()
            .as_deref(),
        Some("B\n"),
        "RAUC activated slot B"
    );
    assert_ne!(slot_b(), empty, "RAUC wrote slot B");
    std::fs::remove_file(&rebooted).expect("reset");
    let agent = fleet.agent_mut("rauc-1");
    agent.kill9();
    rauc.boot("B");
    agent.start().expect("agent");
    let f = &fleet;
    wait_for("2.0 confirmed through RAUC", PATIENCE, || {
        let d = f.hub.device("rauc-1")?;
        let w = fw_row(f, "rauc-1")?;
        (w["state"] == "running"
            && d["firmware"]["version"] == "2.0"
            && d["firmware"]["slot"] == "B")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.device("rauc-1")));
    assert_eq!(
        rauc.state("B"),
        "good",
        "marked good through rauc status mark-good"
    );

    // 3.0 into slot A; its system never gets a report through (the hub is down): marked bad at the deadline.
    push(f, "3.0", &bad);
    f.hub.apply(&spec("3.0")).expect("apply 3.0");
    wait_for("the reboot asked for", PATIENCE, || {
        rebooted.exists().then_some(())
    })
    .expect("reboot");
    std::fs::remove_file(&rebooted).expect("reset");
    fleet.hub.proc.kill9();
    let agent = fleet.agent_mut("rauc-1");
    agent.kill9();
    rauc.boot("A");
    agent.start().expect("agent");
    wait_for("slot A marked bad and the reboot asked", PATIENCE, || {
        rebooted.exists().then_some(())
    })
    .expect("gave up");
    assert_eq!(
        rauc.state("A"),
        "bad",
        "marked bad through rauc status mark-bad"
    );
    agent.kill9();
    rauc.boot("B");
    fleet.hub.restart_kill9().expect("hub back");
    let agent = fleet.agent_mut("rauc-1");
    agent.start().expect("agent");
    let f = &fleet;
    let w = wait_for("the rollback reported", PATIENCE, || {
        fw_row(f, "rauc-1").filter(|w| w["version"] == "3.0" && !w["rejected"].is_null())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.device("rauc-1")));
    let why = w["rejected"].as_str().unwrap_or_default();
    assert!(why.contains("did not come up healthy"), "{why}");
    assert_eq!(rauc.state("B"), "good");
    let d = f.hub.device("rauc-1").expect("device");
    assert_eq!(d["firmware"]["slot"], "B");
    assert_eq!(d["firmware"]["version"], "2.0");
}
