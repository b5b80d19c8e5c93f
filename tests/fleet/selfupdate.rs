//! Agent self-update with real agent processes under the real launcher (`flotilla-agent-launcher`): a good new
//! agent (the agent binary itself, as another signed release) takes over, confirms itself and reports; broken
//! ones (one that exits at once, one that hangs without ever connecting, one the kernel cannot execute) are
//! switched back by the launcher, reported as rolled back, never tried again, and a rollout of them stops after
//! its canary; an agent built for another architecture is refused before anything is staged.

use flotilla_fleet_tests::{AgentSpec, Fleet, FleetBuilder, PATIENCE, bin_dir, wait_for};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const IDS: [&str; 3] = ["gw-1", "gw-2", "gw-3"];

fn spec(version: &str, rollout: bool) -> String {
    let plan = if rollout {
        "[rollout]\nwaves = [\"canary:33\", \"rest\"]\nsoak_secs = 1\nreport_timeout_secs = 60\n\
         max_failure_ratio = 0.0\n"
    } else {
        ""
    };
    format!(
        "name = \"agent\"\n[target]\nselector = {{ role = \"gateway\" }}\n[[workloads]]\nname = \"flotilla-agent\"\n\
         kind = \"agent\"\nrelease = \"flotilla-agent@{version}\"\n{plan}"
    )
}

/// The agent's own workload row for the agent release, as the hub shows it.
fn agent_row(f: &Fleet, id: &str) -> Option<Value> {
    let d = f.hub.device(id)?;
    d["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["name"] == "flotilla-agent")
        .cloned()
}

fn wait_running(f: &Fleet, id: &str, version: &str) {
    wait_for(&format!("{id} running agent {version}"), PATIENCE, || {
        let d = f.hub.device(id)?;
        let w = agent_row(f, id)?;
        (w["state"] == "running" && w["version"] == version && d["agent_release"] == version)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", f.hub.device(id), f.agent(id).log()));
}

fn current(f: &Fleet, id: &str) -> Option<PathBuf> {
    std::fs::read_link(f.agent(id).state_dir().join("agent/current")).ok()
}

/// The release directories (and records) in a device's agent directory.
fn agent_dirs(f: &Fleet, id: &str) -> Vec<String> {
    std::fs::read_dir(f.agent(id).state_dir().join("agent"))
        .expect("agent dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A C program built with the machine's compiler: a real executable that behaves as a broken agent would.
fn compile(dir: &Path, name: &str, body: &str) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, body).expect("source");
    let out = dir.join(name);
    let ok = Command::new("cc")
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc");
    assert!(ok.success(), "cc {name}");
    out
}

/// Runs a rollout of a broken agent `version` and checks it stops after its canary, whose launcher switched
/// it back: the canary reports the rollback with `why` (naming `needle`), runs 1.1.0 again, and the other
/// devices never received the broken release.
fn broken_rollout_stops_after_canary(f: &Fleet, version: &str, needle: &str) {
    f.hub.apply(&spec(version, true)).expect("rollout");
    // Aborted, with the gate naming the rollback and its cause (the previous rollout's state does not count).
    wait_for(
        &format!("the rollout of {version} aborted"),
        PATIENCE,
        || {
            let text = f.hub.client.get("/api/v1/rollouts/agent").ok()?.to_string();
            (text.contains("\"phase\":\"aborted")
                && text.contains("did not come up healthy")
                && text.contains(needle))
            .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.client.get("/api/v1/rollouts/agent")));
    let switched = |id: &str| {
        f.agent(id)
            .log()
            .lines()
            .any(|l| l.contains("switched to") && l.contains(&format!("\"{version}\"")))
    };
    let canary: Vec<&str> = IDS.iter().copied().filter(|id| switched(id)).collect();
    assert_eq!(
        canary.len(),
        1,
        "only the canary tried {version}: {canary:?}"
    );
    let log = f.agent(canary[0]).log();
    assert!(
        log.contains(&format!("rolling back agent {version}")) && log.contains(needle),
        "the launcher rolled the canary back ({needle}): {log}"
    );
    assert!(
        log.contains("agent update rolled back by the launcher"),
        "the old agent picked up the result to report it"
    );
    let dirs = agent_dirs(f, canary[0]);
    assert!(
        !dirs.iter().any(|d| d.starts_with(&format!("{version}-"))),
        "the launcher removed the failed release: {dirs:?}"
    );
    // The canary runs 1.1.0 again (the rollout restored it) under the old binary; so do the others, untouched.
    for id in IDS {
        wait_running(f, id, "1.1.0");
        assert!(
            current(f, id).is_some_and(|c| c.to_string_lossy().starts_with("1.1.0-")),
            "{id}: current points at 1.1.0"
        );
    }
}

#[test]
fn agent_self_update_takes_over_or_is_rolled_back_by_the_launcher() {
    let mut b = FleetBuilder::new();
    for id in IDS {
        let mut a = AgentSpec::new(id, "eu-west", 50.0, 8.0);
        a.extra_config = "agent_confirm_secs = 15\n".into();
        b = b.agent(a);
    }
    let mut f = b.start().expect("fleet");
    // The service's main process is the launcher, as the package's unit runs it.
    for id in IDS {
        let a = f.agent_mut(id);
        a.kill9();
        a.spec.launcher = vec![
            bin_dir()
                .join("flotilla-agent-launcher")
                .to_string_lossy()
                .into_owned(),
            "--state".into(),
            a.state_dir().to_string_lossy().into_owned(),
            "--agent".into(),
        ];
        a.start().expect("start under the launcher");
    }
    let work = tempfile::tempdir().expect("tempdir");
    let arch = std::env::consts::ARCH;

    // 1.1.0: this very agent binary, stripped (a debug build is larger than an upload may be), with bytes
    // appended (a distinct artifact, same code).
    let good = work.path().join("agent-1.1.0");
    let ok = Command::new("strip")
        .arg("-o")
        .arg(&good)
        .arg(bin_dir().join("flotilla-agent"))
        .status()
        .expect("strip (binutils)");
    assert!(ok.success());
    let mut bytes = std::fs::read(&good).expect("agent binary");
    bytes.extend_from_slice(b"flotilla-test-1.1.0");
    std::fs::write(&good, bytes).expect("good");
    f.hub
        .push_system("flotilla-agent", "1.1.0", 1, "agent", &good, arch)
        .expect("push 1.1.0");
    f.hub.apply(&spec("1.1.0", false)).expect("apply 1.1.0");
    for id in IDS {
        wait_running(&f, id, "1.1.0");
        assert!(
            f.agent(id).log().contains("new agent confirmed"),
            "{id}: the new agent confirmed itself"
        );
        let dir = current(&f, id).expect("current link");
        assert!(dir.to_string_lossy().starts_with("1.1.0-"), "{dir:?}");
        assert!(
            !f.agent(id).state_dir().join("agent/trial").exists(),
            "{id}: the trial is over"
        );
    }

    // 1.2.0 exits at once.
    let exits = compile(work.path(), "exits", "int main(void) { return 3; }\n");
    f.hub
        .push_system("flotilla-agent", "1.2.0", 1, "agent", &exits, arch)
        .expect("push 1.2.0");
    broken_rollout_stops_after_canary(&f, "1.2.0", "exited with code 3");

    // 1.3.0 never connects (hangs): out of time after agent_confirm_secs.
    let hangs = compile(
        work.path(),
        "hangs",
        "#include <unistd.h>\nint main(void) { for (;;) pause(); }\n",
    );
    f.hub
        .push_system("flotilla-agent", "1.3.0", 1, "agent", &hangs, arch)
        .expect("push 1.3.0");
    broken_rollout_stops_after_canary(&f, "1.3.0", "did not confirm itself within 15 s");

    // 1.4.0 claims this architecture but the kernel cannot execute it: an ELF object file (e_type ET_REL), so
    // exec fails with ENOEXEC, as it does for another architecture's binary on a device without emulation (a
    // patched machine field would not do here, where binfmt_misc may hand foreign binaries to qemu).
    let mut foreign = std::fs::read(&exits).expect("exits");
    foreign[16] = 1; // e_type = ET_REL
    foreign[17] = 0;
    let foreign_path = work.path().join("foreign");
    std::fs::write(&foreign_path, foreign).expect("foreign");
    f.hub
        .push_system("flotilla-agent", "1.4.0", 1, "agent", &foreign_path, arch)
        .expect("push 1.4.0");
    // (The exec fails with ENOEXEC; execvp then hands the file to /bin/sh, which refuses it with code 2.)
    broken_rollout_stops_after_canary(&f, "1.4.0", "exited with code 2");

    // An agent release for another architecture is refused by the device before anything is staged.
    f.hub
        .push_system("flotilla-agent", "2.0.0", 1, "agent", &good, "riscv64")
        .expect("push 2.0.0");
    f.hub.apply(&spec("2.0.0", false)).expect("apply 2.0.0");
    for id in IDS {
        let w = wait_for(&format!("{id} refuses 2.0.0"), PATIENCE, || {
            agent_row(&f, id).filter(|w| w["version"] == "2.0.0" && !w["rejected"].is_null())
        })
        .expect("refused");
        let why = w["rejected"].as_str().unwrap_or_default();
        assert!(
            why.contains("\"riscv64\"") && why.contains("nothing was installed"),
            "{why}"
        );
        let dirs = agent_dirs(&f, id);
        assert!(!dirs.iter().any(|d| d.starts_with("2.0.0")), "{dirs:?}");
    }
    // Epochs apply to agent releases too: one below the epoch a device accepted is refused.
    f.hub
        .push_system("flotilla-agent", "1.0.9", 0, "agent", &good, arch)
        .expect("push 1.0.9");
    f.hub.apply(&spec("1.0.9", false)).expect("apply 1.0.9");
    for id in IDS {
        let w = wait_for(&format!("{id} refuses epoch 0"), PATIENCE, || {
            agent_row(&f, id).filter(|w| w["version"] == "1.0.9" && !w["rejected"].is_null())
        })
        .expect("refused");
        let why = w["rejected"].as_str().unwrap_or_default();
        assert!(why.contains("security epoch 0, below epoch 1"), "{why}");
    }
    // The agents kept running 1.1.0 throughout, and only it is installed.
    for id in IDS {
        assert!(current(&f, id).is_some_and(|c| c.to_string_lossy().starts_with("1.1.0-")));
        let dirs: Vec<String> = agent_dirs(&f, id)
            .into_iter()
            .filter(|d| d.contains('-'))
            .collect();
        assert_eq!(dirs.len(), 1, "{id}: {dirs:?}");
    }
}
