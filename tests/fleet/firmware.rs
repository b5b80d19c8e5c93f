//! Firmware A/B updates through the agent's built-in backend against Debian's real `fw_printenv`/`fw_setenv` and
//! a redundant U-Boot environment in files: a good update confirmed, a bad one (never healthy, or out of boot
//! attempts) back on the old slot, a power cut (SIGKILL) at every step of the install leaving a bootable old slot,
//! and bad images refused with nothing written to the running slot. U-Boot itself is played by the test: it runs
//! RAUC's boot-script logic (`flotilla_agent_core::boot`) over the same environment and writes the kernel command
//! line the booted system sees.

use flotilla_agent_core::boot::BootEnv;
use flotilla_fleet_tests::bin_dir;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A device's boot storage: two slot files, a redundant U-Boot environment, a kernel command line, agent.toml.
struct Device {
    dir: tempfile::TempDir,
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A system image: distinct bytes per version, 300 KiB (several write buffers, so `mid-write` is mid-write).
fn image(version: u8) -> Vec<u8> {
    (0..300 * 1024u32)
        .map(|i| (i % 251) as u8 ^ version)
        .collect()
}

impl Device {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        std::fs::write(
            p.join("vars.txt"),
            "BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n",
        )
        .expect("vars");
        for env in ["env-a", "env-b"] {
            let ok = Command::new("mkenvimage")
                .args(["-s", "0x4000", "-r", "-o"])
                .arg(p.join(env))
                .arg(p.join("vars.txt"))
                .status()
                .expect("mkenvimage (apt-get install u-boot-tools)");
            assert!(ok.success());
        }
        std::fs::write(
            p.join("fw_env.config"),
            format!(
                "{} 0x0000 0x4000\n{} 0x0000 0x4000\n",
                p.join("env-a").display(),
                p.join("env-b").display()
            ),
        )
        .expect("config");
        std::fs::write(p.join("slot-a"), image(1)).expect("slot a");
        std::fs::write(p.join("slot-b"), b"").expect("slot b");
        std::fs::write(p.join("cmdline"), "console=ttyS0 rauc.slot=A\n").expect("cmdline");
        std::fs::create_dir_all(p.join("data")).expect("data");
        std::fs::write(
            p.join("agent.toml"),
            format!(
                "version = 1\ndata_dir = \"{d}/data\"\nbroker = \"mqtt://127.0.0.1:1\"\n[firmware]\n\
                 slot_a = \"{d}/slot-a\"\nslot_b = \"{d}/slot-b\"\nfw_env_config = \"{d}/fw_env.config\"\n\
                 cmdline = \"{d}/cmdline\"\nconfirm_secs = 60\nreboot_command = [\"true\"]\n",
                d = p.display()
            ),
        )
        .expect("agent.toml");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `flotilla-agent firmware ARGS` with optional extra environment.
    fn agent(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(bin_dir().join("flotilla-agent"))
            .arg("--config")
            .arg(self.path("agent.toml"))
            .arg("firmware")
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("flotilla-agent")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.agent(args, &[]);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn env(&self) -> BootEnv {
        let out = Command::new("fw_printenv")
            .arg("-c")
            .arg(self.path("fw_env.config"))
            .output()
            .expect("fw_printenv");
        let vars: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        BootEnv::parse(&vars).expect("a readable boot environment")
    }

    /// Power-on: U-Boot's boot script picks the slot and counts the attempt; the kernel is told which slot.
    fn boot(&self) -> String {
        let mut env = self.env();
        let slot = env.boot_or_reset();
        std::fs::write(self.path("boot.txt"), env.script()).expect("script");
        let ok = Command::new("fw_setenv")
            .arg("-c")
            .arg(self.path("fw_env.config"))
            .arg("--script")
            .arg(self.path("boot.txt"))
            .status()
            .expect("fw_setenv");
        assert!(ok.success());
        std::fs::write(
            self.path("cmdline"),
            format!("console=ttyS0 rauc.slot={slot}\n"),
        )
        .expect("cmdline");
        slot
    }

    fn slot(&self, s: &str) -> Vec<u8> {
        std::fs::read(self.path(if s == "A" { "slot-a" } else { "slot-b" })).expect("slot")
    }

    fn install(&self, version: u8, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let img = self.path(&format!("image-{version}"));
        std::fs::write(&img, image(version)).expect("image");
        let sum = sha256(&image(version));
        let v = version.to_string();
        let mut args = vec![
            "install",
            img.to_str().expect("path"),
            "--sha256",
            &sum,
            "--version",
            &v,
        ];
        args.extend_from_slice(extra);
        self.agent(&args, env)
    }
}

fn tools_present() -> bool {
    Path::new("/usr/bin/fw_setenv").exists() && Path::new("/usr/bin/mkenvimage").exists()
}

/// A good update: written to B, activated, booted, confirmed; B keeps booting.
#[test]
fn a_good_firmware_update_is_confirmed_and_keeps_booting() {
    assert!(
        tools_present(),
        "u-boot-tools missing (apt-get install u-boot-tools)"
    );
    let d = Device::new();
    assert!(d.install(2, &["--reboot"], &[]).status.success());
    assert_eq!(
        d.slot("B"),
        image(2),
        "the new image is in the inactive slot"
    );
    assert_eq!(d.slot("A"), image(1), "the running slot is untouched");
    assert_eq!(d.boot(), "B");
    let out = d.ok(&["after-boot"]);
    assert!(out.contains("A -> B: Confirm"), "{out}");
    d.ok(&["mark-good"]);
    for _ in 0..5 {
        assert_eq!(d.boot(), "B", "a confirmed slot keeps booting");
        d.ok(&["mark-good"]);
    }
    assert!(d.ok(&["after-boot"]).contains("nothing pending"));
}

/// A bad update ends back on the old slot, reported: marked bad after it never became healthy, or out of boot
/// attempts when the new system never ran the agent at all.
#[test]
fn a_bad_firmware_update_ends_back_on_the_old_slot() {
    assert!(
        tools_present(),
        "u-boot-tools missing (apt-get install u-boot-tools)"
    );
    // Never healthy within confirm_secs: the agent marks its slot bad and reboots.
    let d = Device::new();
    assert!(d.install(2, &["--reboot"], &[]).status.success());
    assert_eq!(d.boot(), "B");
    assert!(d.ok(&["after-boot"]).contains("Confirm"));
    d.ok(&["mark-bad"]);
    assert_eq!(d.boot(), "A", "marked bad: the old slot boots");
    let out = d.ok(&["after-boot"]);
    assert!(
        out.contains("RolledBack") && out.contains("slot B did not boot"),
        "{out}"
    );
    for _ in 0..4 {
        assert_eq!(d.boot(), "A", "the bad slot never boots again");
    }

    // The boot count runs out: the new system never gets to confirm (it hangs before the agent runs).
    let d = Device::new();
    assert!(d.install(2, &["--reboot"], &[]).status.success());
    let boots: Vec<String> = (0..4).map(|_| d.boot()).collect();
    assert_eq!(
        boots,
        ["B", "B", "B", "A"],
        "three attempts, then the old slot"
    );
    let out = d.ok(&["after-boot"]);
    assert!(out.contains("RolledBack"), "{out}");
    assert_eq!(d.slot("A"), image(1));
    assert_eq!(d.boot(), "A");
}

/// A power cut (SIGKILL) at every step of the install: the device boots, and whatever it boots holds a whole,
/// verified system; before the activation that is always the old slot, untouched.
#[test]
fn a_power_cut_at_every_step_of_the_install_leaves_a_bootable_old_slot() {
    assert!(
        tools_present(),
        "u-boot-tools missing (apt-get install u-boot-tools)"
    );
    for (step, activated) in [
        ("before-write", false),
        ("mid-write", false),
        ("written", false),
        ("verified", false),
        ("activated", true),
        ("rebooting", true),
    ] {
        let d = Device::new();
        let out = d.install(2, &["--reboot"], &[("FLOTILLA_FIRMWARE_CRASH_AT", step)]);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{step}: killed at the step ({:?})",
            out.status
        );
        assert_eq!(d.slot("A"), image(1), "{step}: the old slot is untouched");
        let booted = d.boot();
        if activated {
            assert_eq!(booted, "B", "{step}");
            assert_eq!(
                d.slot("B"),
                image(2),
                "{step}: only a whole, verified image is ever activated"
            );
            assert!(d.ok(&["after-boot"]).contains("Confirm"), "{step}");
        } else {
            assert_eq!(booted, "A", "{step}: the half-written slot is not booted");
            let out = d.ok(&["after-boot"]);
            assert!(out.contains("Abandoned"), "{step}: {out}");
            // And the device can update again afterwards.
            assert!(
                d.install(3, &[], &[]).status.success(),
                "{step}: a later update"
            );
            assert_eq!(d.boot(), "B");
            assert_eq!(d.slot("B"), image(3));
        }
    }
}

/// Bad images are refused with typed reasons before the inactive slot is touched, and the running slot never is.
#[test]
fn bad_firmware_images_are_refused_and_nothing_is_written() {
    assert!(
        tools_present(),
        "u-boot-tools missing (apt-get install u-boot-tools)"
    );
    let d = Device::new();
    // A digest that is not the image's (a tampered or wrong image).
    let img = d.path("image-2");
    std::fs::write(&img, image(2)).expect("image");
    let wrong = sha256(b"something else");
    let out = d.agent(
        &[
            "install",
            img.to_str().expect("path"),
            "--sha256",
            &wrong,
            "--version",
            "2",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SHA-256"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A truncated image: the release's digest, half the bytes.
    std::fs::write(&img, &image(2)[..150 * 1024]).expect("truncated");
    let full = sha256(&image(2));
    let out = d.agent(
        &[
            "install",
            img.to_str().expect("path"),
            "--sha256",
            &full,
            "--version",
            "2",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(d.slot("B"), b"", "the inactive slot was not touched");
    assert_eq!(d.slot("A"), image(1), "the running slot was not touched");
    assert_eq!(d.boot(), "A");
    assert!(d.ok(&["status"]).contains("pending None"));
    // A device without a readable booted slot refuses rather than guessing which slot is free.
    std::fs::write(d.path("cmdline"), "console=ttyS0\n").expect("cmdline");
    let out = d.install(2, &[], &[]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("booted slot"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.slot("B"), b"");
}

/// The agent itself confirms a new slot: with the hub reachable it marks the slot good once it has reported;
/// with the hub gone it never becomes healthy, so at `confirm_secs` it marks the slot bad and reboots, and the
/// bootloader brings the old slot back, which the agent then reports as rolled back.
#[test]
fn the_agent_confirms_new_firmware_once_healthy_or_rolls_back_into_the_old_slot() {
    use flotilla_fleet_tests::{AgentSpec, FleetBuilder, wait_for};
    use std::time::Duration;
    assert!(
        tools_present(),
        "u-boot-tools missing (apt-get install u-boot-tools)"
    );
    let mut fleet = FleetBuilder::new()
        .agent(AgentSpec::new("fw-1", "eu-west", 50.1, 8.7))
        .start()
        .expect("fleet");
    let d = Device::new();
    let rebooted = d.path("rebooted");
    let config = fleet.agent("fw-1").config.clone();
    let mut toml = std::fs::read_to_string(&config).expect("agent.toml");
    toml.push_str(&format!(
        "\n[firmware]\nslot_a = \"{}\"\nslot_b = \"{}\"\nfw_env_config = \"{}\"\ncmdline = \"{}\"\nconfirm_secs = 10\n\
         reboot_command = [\"touch\", \"{}\"]\n",
        d.path("slot-a").display(),
        d.path("slot-b").display(),
        d.path("fw_env.config").display(),
        d.path("cmdline").display(),
        rebooted.display()
    ));
    std::fs::write(&config, toml).expect("agent.toml");
    let install = |version: u8| {
        let img = d.path(&format!("image-{version}"));
        std::fs::write(&img, image(version)).expect("image");
        let out = Command::new(bin_dir().join("flotilla-agent"))
            .arg("--config")
            .arg(&config)
            .args([
                "firmware",
                "install",
                img.to_str().expect("path"),
                "--sha256",
                &sha256(&image(version)),
            ])
            .args(["--version", &version.to_string(), "--reboot"])
            .output()
            .expect("flotilla-agent firmware install");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let attempts = |slot: &str| d.env().left.get(slot).copied();

    // A normal boot (no update in flight) resets the running slot's attempts, so power cycles never use them up.
    let agent = fleet.agent_mut("fw-1");
    agent.kill9();
    for _ in 0..2 {
        assert_eq!(d.boot(), "A");
    }
    assert_eq!(attempts("A"), Some(1));
    agent.start().expect("agent");
    wait_for("slot A's attempts reset", Duration::from_secs(60), || {
        (attempts("A") == Some(3)).then_some(())
    })
    .expect("reset");

    // Version 2 into slot B; "power cycle"; the agent comes up connected and confirms B.
    agent.kill9();
    install(2);
    assert!(rebooted.exists(), "the reboot command ran");
    std::fs::remove_file(&rebooted).expect("reset");
    assert_eq!(d.boot(), "B");
    assert_eq!(attempts("B"), Some(2), "U-Boot counted the attempt");
    agent.start().expect("agent");
    wait_for(
        "slot B confirmed by the agent",
        Duration::from_secs(60),
        || (attempts("B") == Some(3) && !agent_pending(&config)).then_some(()),
    )
    .expect("confirmed");

    // Version 3 into slot A, with the hub gone: the new system never reports, so it is marked bad at the deadline.
    agent.kill9();
    install(3);
    std::fs::remove_file(&rebooted).expect("reset");
    fleet.hub.proc.kill9();
    assert_eq!(d.boot(), "A");
    let agent = fleet.agent_mut("fw-1");
    agent.start().expect("agent");
    wait_for(
        "the agent to give up on slot A and reboot",
        Duration::from_secs(60),
        || rebooted.exists().then_some(()),
    )
    .expect("rolled back");
    assert_eq!(attempts("A"), Some(0), "slot A marked bad");
    agent.kill9();
    assert_eq!(d.boot(), "B", "the old slot boots again");
    assert_eq!(d.slot("B"), image(2));
    agent.start().expect("agent");
    agent
        .wait_log(&["firmware update rolled back"], 1)
        .expect("the rollback is reported in the log");
    assert!(!agent_pending(&config), "the update is finished with");
}

/// Whether `flotilla-agent firmware status` shows an update in flight for this agent.
fn agent_pending(config: &Path) -> bool {
    let out = Command::new(bin_dir().join("flotilla-agent"))
        .arg("--config")
        .arg(config)
        .args(["firmware", "status"])
        .output()
        .expect("status");
    !String::from_utf8_lossy(&out.stdout).contains("pending None")
}

/// Finds the file named `name` under `dir` (the hub's blob store).
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(found) = find_file(&p, name) {
                return Some(found);
            }
        } else if e.file_name().to_str() == Some(name) {
            return Some(p);
        }
    }
    None
}

/// Firmware as a release kind, through the hub: a rollout installs it into each device's other slot, the
/// workloads stop before the reboot and come back after it, the device confirms and reports the new version and
/// slot (placement can select on them); an update hold makes it wait; a release for another device type and a
/// truncated image are refused with their reasons and nothing written; a release whose system never boots far
/// enough (U-Boot's attempts run out) is rolled back, reported, and its rollout stops after the canary.
#[test]
fn firmware_rolls_out_through_the_hub_and_bad_releases_stop_after_the_canary() {
    use flotilla_fleet_tests::{AgentSpec, FleetBuilder, PATIENCE, firmware, wait_for};
    assert!(
        tools_present(),
        "u-boot-tools missing (apt-get install u-boot-tools)"
    );
    let ids = ["fw-1", "fw-2"];
    let holds = tempfile::tempdir().expect("tempdir");
    let mut b = FleetBuilder::new();
    for id in ids {
        let mut a = AgentSpec::new(id, "eu-west", 50.1, 8.7);
        a.extra_config = format!(
            "hold_file = \"{}\"\n",
            holds.path().join(format!("{id}.hold")).display()
        );
        b = b.agent(a);
    }
    let mut fleet = b.start().expect("fleet");
    let devices: Vec<Device> = ids.iter().map(|_| Device::new()).collect();
    for (id, d) in ids.iter().zip(&devices) {
        let agent = fleet.agent_mut(id);
        agent.kill9();
        let mut toml = std::fs::read_to_string(&agent.config).expect("agent.toml");
        toml.push_str(&format!(
            "\n[firmware]\ncompatible = \"flotilla-gw\"\nslot_a = \"{}\"\nslot_b = \"{}\"\nfw_env_config = \"{}\"\n\
             cmdline = \"{}\"\nconfirm_secs = 10\nreboot_command = [\"touch\", \"{}\"]\n",
            d.path("slot-a").display(),
            d.path("slot-b").display(),
            d.path("fw_env.config").display(),
            d.path("cmdline").display(),
            d.path("rebooted").display()
        ));
        std::fs::write(&agent.config, toml).expect("agent.toml");
        assert_eq!(d.boot(), "A");
        agent.start().expect("agent");
    }
    let fw_row = |f: &flotilla_fleet_tests::Fleet, id: &str| -> Option<serde_json::Value> {
        f.hub.device(id)?["workloads"]
            .as_array()?
            .iter()
            .find(|w| w["name"] == "os")
            .cloned()
    };
    let f = &fleet;
    // A WASM workload runs beside, to show it is stopped before the reboot and back after it.
    f.hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("sensor");
    f.hub
        .apply(
            "name = \"sensors\"\n[target]\nselector = { role = \"gateway\" }\n[[workloads]]\nname = \"sensor\"\n\
             release = \"sensor@1.0.0\"\ntick_ms = 100\nmemory_mib = 4\ncpu_ms = 20\n",
        )
        .expect("sensors");
    for id in ids {
        f.hub
            .wait_workload(id, "sensor", "running")
            .expect("sensor");
        wait_for(&format!("{id} reports its firmware"), PATIENCE, || {
            let d = f.hub.device(id)?;
            (d["firmware"]["version"] == "factory" && d["firmware"]["slot"] == "A").then_some(())
        })
        .expect("firmware inventory");
    }
    let spec = |version: &str, rollout: &str| {
        format!(
            "name = \"os\"\n[target]\nselector = {{ role = \"gateway\" }}\n[[workloads]]\nname = \"os\"\n\
             kind = \"firmware\"\nrelease = \"os@{version}\"\n{rollout}"
        )
    };
    let plan = "[rollout]\nwaves = [\"canary:50\", \"rest\"]\nsoak_secs = 1\nreport_timeout_secs = 120\n\
                max_failure_ratio = 0.0\n";
    let push = |f: &flotilla_fleet_tests::Fleet, version: &str, bytes: &[u8], compatible: &str| {
        let p = devices[0].path(&format!("os-{version}.img"));
        std::fs::write(&p, bytes).expect("image");
        f.hub
            .push_system("os", version, 1, "firmware", &p, compatible)
            .expect("push firmware")
    };
    push(f, "1.9", &image(7), "flotilla-gw");
    push(f, "2.0", &image(2), "flotilla-gw");

    // 1.9 to both, while fw-2 holds updates: fw-1 installs it; on fw-2 it waits, says why, writes nothing.
    std::fs::write(holds.path().join("fw-2.hold"), "vehicle in motion\n").expect("hold");
    wait_for("fw-2 reports its hold", PATIENCE, || {
        f.hub.device("fw-2").filter(|d| !d["hold"].is_null())
    })
    .expect("hold reported");
    f.hub.apply(&spec("1.9", "")).expect("1.9");
    let held = wait_for("fw-2 waiting for its hold", PATIENCE, || {
        fw_row(f, "fw-2").filter(|w| w["last_error"].as_str().is_some_and(|e| e.contains("held")))
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.device("fw-2")));
    assert_eq!(held["state"], "starting");
    assert_eq!(devices[1].slot("B"), b"", "nothing written while held");
    // Play each device's reboot: the agent ran the reboot command after stopping its workloads; U-Boot then
    // boots the new slot and the agent starts again.
    let reboot = |fleet: &mut flotilla_fleet_tests::Fleet, i: usize, slot: &str| {
        let id = ids[i];
        let d = &devices[i];
        wait_for(&format!("{id} asks for its reboot"), PATIENCE, || {
            d.path("rebooted").exists().then_some(())
        })
        .expect("reboot asked");
        let agent = fleet.agent_mut(id);
        agent
            .wait_log(&["rebooting into the new firmware"], 1)
            .expect("the agent exited for the reboot");
        let log = agent.log();
        let stopped = log.find("shutting down: stopping workloads").expect("stop");
        let rebooting = log.find("rebooting into the new firmware").expect("reboot");
        assert!(stopped < rebooting, "workloads stopped before the reboot");
        std::fs::remove_file(d.path("rebooted")).expect("reset");
        agent.kill9();
        assert_eq!(d.boot(), slot);
        agent.start().expect("agent");
    };
    let confirmed =
        |f: &flotilla_fleet_tests::Fleet, i: usize, version: &str, slot: &str, img: u8| {
            let id = ids[i];
            wait_for(&format!("{id} confirmed on {version}"), PATIENCE, || {
                let d = f.hub.device(id)?;
                let w = fw_row(f, id)?;
                (w["state"] == "running"
                    && w["version"] == version
                    && d["firmware"]["version"] == version
                    && d["firmware"]["slot"] == slot)
                    .then_some(())
            })
            .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.device(id)));
            assert_eq!(devices[i].slot(slot), image(img));
            assert_eq!(
                devices[i].env().left.get(slot),
                Some(&3),
                "{slot} marked good"
            );
            f.hub
                .wait_workload(id, "sensor", "running")
                .expect("the workload is back after the reboot");
        };
    reboot(&mut fleet, 0, "B");
    confirmed(&fleet, 0, "1.9", "B", 7);
    assert_eq!(devices[1].slot("B"), b"", "nothing written while held");
    std::fs::remove_file(holds.path().join("fw-2.hold")).expect("lift");
    reboot(&mut fleet, 1, "B");
    confirmed(&fleet, 1, "1.9", "B", 7);

    // Then 2.0 through a rollout's waves, canary first: into slot A on both.
    let f = &fleet;
    f.hub.apply(&spec("2.0", plan)).expect("rollout 2.0");
    let first = wait_for("the canary asks for its reboot", PATIENCE, || {
        (0..2).find(|&i| devices[i].path("rebooted").exists())
    })
    .expect("canary");
    let slots = ["A", "A"];
    reboot(&mut fleet, first, slots[first]);
    confirmed(&fleet, first, "2.0", slots[first], 2);
    reboot(&mut fleet, 1 - first, slots[1 - first]);
    confirmed(&fleet, 1 - first, "2.0", slots[1 - first], 2);
    let f = &fleet;
    wait_for("the rollout of 2.0 completed", PATIENCE, || {
        let v = f.hub.client.get("/api/v1/rollouts/os").ok()?;
        v["phase"]
            .as_str()
            .is_some_and(|p| p.starts_with("completed"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.client.get("/api/v1/rollouts/os")));
    // Placement sees the firmware: a selector on the version the devices report places on both for 2.0, on
    // none for 1.9 (a dry run of the sensors deployment with each selector).
    let placed = |version: &str| {
        let body = format!(
            "name = \"sensors\"\n[target]\nselector = {{ \"flotilla.io/firmware-version\" = \"{version}\" }}\n\
             [[workloads]]\nname = \"sensor\"\nrelease = \"sensor@1.0.0\"\ntick_ms = 100\nmemory_mib = 4\n\
             cpu_ms = 20\n"
        );
        let dry = f
            .hub
            .client
            .post(
                "/api/v1/deployments?dry_run=true",
                "application/toml",
                body.as_bytes(),
                &[("x-flotilla-force", "true")],
            )
            .expect("dry run");
        dry["dry_run"]["placed"].as_u64()
    };
    assert_eq!(placed("2.0"), Some(2));
    assert_eq!(placed("1.9"), Some(0));

    // A release for another device type: refused, typed, nothing written.
    let before: Vec<Vec<u8>> = devices.iter().map(|d| d.slot("A")).collect();
    let before_b: Vec<Vec<u8>> = devices.iter().map(|d| d.slot("B")).collect();
    push(f, "2.1-other", &image(5), "other-gw");
    f.hub.apply(&spec("2.1-other", "")).expect("apply other");
    for (i, id) in ids.iter().enumerate() {
        let w = wait_for(
            &format!("{id} refuses the other device type"),
            PATIENCE,
            || fw_row(f, id).filter(|w| w["version"] == "2.1-other" && !w["rejected"].is_null()),
        )
        .expect("refused");
        let why = w["rejected"].as_str().unwrap_or_default();
        assert!(
            why.contains("\"other-gw\"") && why.contains("\"flotilla-gw\""),
            "{why}"
        );
        assert_eq!(devices[i].slot("A"), before[i], "{id}: slot A untouched");
        assert_eq!(devices[i].slot("B"), before_b[i], "{id}: slot B untouched");
    }

    // A truncated image (the hub's copy cut short after the push): the download fails its digest check.
    push(f, "2.2", &image(6), "flotilla-gw");
    let blob = find_file(&f.hub.dir, &sha256(&image(6))).expect("the image blob");
    let full = std::fs::read(&blob).expect("blob");
    std::fs::write(&blob, &full[..full.len() / 2]).expect("truncate");
    f.hub.apply(&spec("2.2", "")).expect("apply 2.2");
    for (i, id) in ids.iter().enumerate() {
        let w = wait_for(
            &format!("{id} refuses the truncated image"),
            PATIENCE,
            || fw_row(f, id).filter(|w| w["version"] == "2.2" && !w["rejected"].is_null()),
        )
        .expect("refused");
        let why = w["rejected"].as_str().unwrap_or_default();
        assert!(
            why.contains("SHA-256") || why.contains("larger") || why.contains("stalled"),
            "{why}"
        );
        assert_eq!(devices[i].slot("A"), before[i], "{id}: nothing written");
        assert_eq!(devices[i].slot("B"), before_b[i], "{id}: nothing written");
    }

    // 3.0's system never boots far enough to start the agent: U-Boot's attempts run out and it falls back.
    push(f, "3.0", &image(3), "flotilla-gw");
    f.hub.apply(&spec("2.0", "")).expect("back to 2.0");
    f.hub.apply(&spec("3.0", plan)).expect("rollout 3.0");
    let canary = wait_for("a canary installing 3.0", PATIENCE, || {
        (0..2).find(|&i| devices[i].path("rebooted").exists())
    })
    .expect("canary");
    let (id, d) = (ids[canary], &devices[canary]);
    // 2.0 runs from slots[canary]; 3.0 went into the other one.
    let (old, new) = (slots[canary], if slots[canary] == "A" { "B" } else { "A" });
    let agent = fleet.agent_mut(id);
    agent
        .wait_log(&["rebooting into the new firmware"], 1)
        .expect("exited for the reboot");
    agent.kill9();
    std::fs::remove_file(d.path("rebooted")).expect("reset");
    for _ in 0..3 {
        assert_eq!(
            d.boot(),
            new,
            "3.0 went into the slot 2.0 does not run from"
        );
    }
    assert_eq!(
        d.boot(),
        old,
        "out of attempts: U-Boot falls back to 2.0's slot"
    );
    agent.start().expect("agent");
    let f = &fleet;
    wait_for(
        "the rollout of 3.0 aborted after its canary",
        PATIENCE,
        || {
            let text = f.hub.client.get("/api/v1/rollouts/os").ok()?.to_string();
            (text.contains("\"phase\":\"aborted") && text.contains("did not come up healthy"))
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.client.get("/api/v1/rollouts/os")));
    let other = 1 - canary;
    let other_new = if slots[other] == "A" { "B" } else { "A" };
    assert_ne!(
        devices[other].slot(other_new),
        image(3),
        "the other device never installed 3.0"
    );
    wait_for(&format!("{id} back on 2.0"), PATIENCE, || {
        let w = fw_row(f, id)?;
        (w["state"] == "running" && w["version"] == "2.0").then_some(())
    })
    .expect("back on 2.0");
}
