//! Progressive rollouts with real agents: a good release completes region by region; a release whose workload
//! traps on start is stopped after its canary and rolled back; a hub killed with `kill -9` mid-rollout resumes
//! exactly where it was.

use flotilla_fleet_tests::{AgentSpec, Fleet, FleetBuilder, PATIENCE, firmware, wait_for};
use serde_json::Value;

fn spec(version: &str, rollout: &str) -> String {
    format!(
        "name = \"sensors\"\n[target]\nselector = {{ role = \"gateway\" }}\n[[workloads]]\nname = \"sensor\"\n\
         release = \"sensor@{version}\"\ntick_ms = 100\nmemory_mib = 4\ncpu_ms = 20\nhealth_secs = 1\n{rollout}"
    )
}

const PLAN: &str = "[rollout]\nwaves = [\"canary:50\", \"region:eu-west\", \"rest\"]\nsoak_secs = 1\n\
                    report_timeout_secs = 30\nmax_failure_ratio = 0.0\n";

fn fleet(ids: &[(&str, &str)]) -> Fleet {
    let mut b = FleetBuilder::new();
    for (id, region) in ids {
        b = b.agent(AgentSpec::new(id, region, 10.0, 10.0));
    }
    b.start().expect("fleet")
}

fn status(f: &Fleet) -> Value {
    f.hub
        .client
        .get("/api/v1/rollouts/sensors")
        .unwrap_or(Value::Null)
}

fn wait_phase(f: &Fleet, prefix: &str) -> Value {
    wait_for(&format!("rollout phase {prefix}"), PATIENCE, || {
        let v = status(f);
        v["phase"]
            .as_str()
            .is_some_and(|p| p.starts_with(prefix))
            .then_some(v)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", status(f)))
}

fn wait_version(f: &Fleet, id: &str, version: &str) {
    wait_for(&format!("{id} running {version}"), PATIENCE, || {
        let d = f.hub.device(id)?;
        let w = &d["workloads"][0];
        (w["state"] == "running"
            && w["version"] == version
            && d["applied_generation"] == d["desired_generation"])
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", f.hub.device(id)));
}

fn generation(f: &Fleet, id: &str) -> u64 {
    f.hub
        .device(id)
        .and_then(|d| d["desired_generation"].as_u64())
        .unwrap_or(0)
}

const IDS: &[(&str, &str)] = &[
    ("eu-1", "eu-west"),
    ("eu-2", "eu-west"),
    ("us-1", "us-east"),
    ("us-2", "us-east"),
    ("ap-1", "ap-south"),
    ("ap-2", "ap-south"),
];

/// 2.0.0 rolls out canary -> eu-west -> rest; 3.0.0 (traps on start) aborts after the canary and rolls back.
#[test]
fn good_release_completes_and_bad_release_rolls_back() {
    let f = fleet(IDS);
    f.hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("v1");
    let mut v2 = firmware("sensor");
    v2.extend_from_slice(&[0, 3, 1, b'v', 2]); // a custom section: same code, a distinct artifact
    f.hub.push_release("sensor", "2.0.0", 1, &v2).expect("v2");
    f.hub
        .push_release("sensor", "3.0.0", 1, &firmware("crash-on-start"))
        .expect("v3");
    f.hub.apply(&spec("1.0.0", "")).expect("v1 everywhere");
    for (id, _) in IDS {
        wait_version(&f, id, "1.0.0");
    }

    f.hub.apply(&spec("2.0.0", PLAN)).expect("rollout v2");
    let done = wait_phase(&f, "completed");
    let history: Vec<&str> = done["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["event"].as_str())
        .collect();
    assert!(
        history[0].contains("3 waves of sizes [3, 1, 2]"),
        "{history:?}"
    );
    let order: Vec<&&str> = history
        .iter()
        .filter(|e| e.starts_with("wave") || **e == "completed")
        .collect();
    assert_eq!(order.len(), 4, "{history:?}");
    for (id, _) in IDS {
        wait_version(&f, id, "2.0.0");
    }

    let canary = ["ap-1", "eu-1", "us-1"];
    let others: Vec<(&str, u64)> = IDS
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !canary.contains(id))
        .map(|id| (id, generation(&f, id)))
        .collect();
    f.hub.apply(&spec("3.0.0", PLAN)).expect("rollout v3");
    let aborted = wait_phase(&f, "aborted");
    assert!(
        aborted["phase"]
            .as_str()
            .unwrap_or("")
            .contains("health gate"),
        "{aborted}"
    );
    for (id, _) in IDS {
        wait_version(&f, id, "2.0.0");
    }
    for (id, g) in others {
        assert_eq!(
            generation(&f, id),
            g,
            "{id} outside the canary never got a new desired state"
        );
    }
    let why = f
        .hub
        .client
        .get("/api/v1/deployments/sensors")
        .expect("status");
    assert_eq!(why["running"], 6, "{why}");
    // A device that went 1.0.0 -> 2.0.0 keeps exactly the current and the previous artifact.
    let cached = std::fs::read_dir(f.agent("eu-2").state_dir().join("artifacts"))
        .expect("cache")
        .count();
    assert_eq!(cached, 2, "current + previous artifact kept");
    // The deployment is the stable version again: a later change starts from 2.0.0.
    let err = f
        .hub
        .client
        .post(
            "/api/v1/rollouts/sensors/approve",
            "application/json",
            b"{}",
            &[],
        )
        .expect_err("finished");
    assert!(err.to_string().starts_with("409"), "{err}");
}

/// With manual approval, a hub killed with SIGKILL while waiting for approval comes back in the same state:
/// no wave re-sent, none skipped; approving then completes the rollout.
#[test]
fn hub_kill9_mid_rollout_resumes() {
    let mut f = fleet(&IDS[..4]);
    f.hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("v1");
    let mut v2 = firmware("sensor");
    v2.extend_from_slice(&[0, 3, 1, b'v', 2]);
    f.hub.push_release("sensor", "2.0.0", 1, &v2).expect("v2");
    f.hub.apply(&spec("1.0.0", "")).expect("v1");
    for (id, _) in &IDS[..4] {
        wait_version(&f, id, "1.0.0");
    }
    let plan = "[rollout]\nwaves = [\"canary:50\", \"rest\"]\nsoak_secs = 1\nreport_timeout_secs = 30\n\
                manual_approval = true\n";
    f.hub.apply(&spec("2.0.0", plan)).expect("rollout");
    let before = wait_phase(&f, "awaiting approval");
    let gens: Vec<u64> = IDS[..4].iter().map(|(id, _)| generation(&f, id)).collect();

    f.hub.restart_kill9().expect("hub restarts");
    let after = status(&f);
    assert_eq!(after["phase"], before["phase"]);
    assert_eq!(after["on_new"], before["on_new"]);
    // Wait until the restarted hub has processed fresh reports from the devices (placement runs every second
    // meanwhile); nothing may change before approval.
    wait_for("reports accepted by the restarted hub", PATIENCE, || {
        let text = f.hub.client.get_text("/metrics").ok()?;
        let line = text
            .lines()
            .find(|l| l.starts_with("flotilla_reports_total{result=\"accepted\"}"))?;
        (line.split_whitespace().nth(1)?.parse::<u64>().ok()? >= 4).then_some(())
    })
    .expect("reports after restart");
    for (i, (id, _)) in IDS[..4].iter().enumerate() {
        assert_eq!(
            generation(&f, id),
            gens[i],
            "{id}: generation changed across the hub restart"
        );
    }
    f.hub
        .client
        .post(
            "/api/v1/rollouts/sensors/approve",
            "application/json",
            b"{}",
            &[],
        )
        .expect("approve");
    wait_phase(&f, "completed");
    for (id, _) in &IDS[..4] {
        wait_version(&f, id, "2.0.0");
    }
}

/// A device-side hold ("vehicle in motion") keeps the canary on its version and shows in the rollout and in
/// `why`; lifting it lets the update through and the rollout complete.
#[test]
fn device_hold_defers_the_update() {
    let holds = tempfile::tempdir().expect("tempdir");
    let hold_file = holds.path().join("eu-1.hold");
    let mut b = FleetBuilder::new();
    for (id, region) in &IDS[..2] {
        let mut a = AgentSpec::new(id, region, 10.0, 10.0);
        a.extra_config = format!(
            "hold_file = \"{}\"\n",
            holds.path().join(format!("{id}.hold")).display()
        );
        b = b.agent(a);
    }
    let f = b.start().expect("fleet");
    f.hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("v1");
    let mut v2 = firmware("sensor");
    v2.extend_from_slice(&[0, 3, 1, b'v', 2]);
    f.hub.push_release("sensor", "2.0.0", 1, &v2).expect("v2");
    f.hub.apply(&spec("1.0.0", "")).expect("v1");
    for (id, _) in &IDS[..2] {
        wait_version(&f, id, "1.0.0");
    }
    std::fs::write(&hold_file, "vehicle in motion\n").expect("hold");
    wait_for("hold reported", PATIENCE, || {
        (f.hub.device("eu-1")?["hold"] == "vehicle in motion").then_some(())
    })
    .expect("hold visible");

    let plan = "[rollout]\nwaves = [\"canary:50\", \"rest\"]\nsoak_secs = 1\nreport_timeout_secs = 60\nmax_hold_secs = 600\n";
    f.hub.apply(&spec("2.0.0", plan)).expect("rollout");
    wait_for("canary held", PATIENCE, || {
        let v = status(&f);
        let st = v["waves"][0]["devices"][0]["status"].as_str()?.to_owned();
        (st == "held").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", status(&f)));
    let why = f.hub.client.get("/api/v1/why/eu-1/sensor").expect("why");
    assert!(
        why["explanation"]
            .as_str()
            .unwrap_or("")
            .contains("holds updates: vehicle in motion"),
        "{why}"
    );
    assert_eq!(
        f.hub.workload_state("eu-1", "sensor").as_deref(),
        Some("running")
    );
    assert_eq!(
        f.hub.device("eu-1").expect("device")["workloads"][0]["version"],
        "1.0.0"
    );

    std::fs::remove_file(&hold_file).expect("lift the hold");
    wait_phase(&f, "completed");
    for (id, _) in &IDS[..2] {
        wait_version(&f, id, "2.0.0");
    }
}

/// A release that runs but reports a bad application metric is stopped by a telemetry gate and rolled back.
#[test]
fn telemetry_gate_stops_a_noisy_release() {
    let f = fleet(&IDS[..4]);
    f.hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("v1");
    f.hub
        .push_release("sensor", "2.0.0", 1, &firmware("noisy"))
        .expect("v2");
    f.hub.apply(&spec("1.0.0", "")).expect("v1");
    for (id, _) in &IDS[..4] {
        wait_version(&f, id, "1.0.0");
    }
    let plan = "[rollout]\nwaves = [\"canary:50\", \"rest\"]\nsoak_secs = 30\nreport_timeout_secs = 60\n\
                telemetry_gates = [{ stream = \"sensor.metrics\", metric = \"errors\", max = 1.0 }]\n";
    f.hub.apply(&spec("2.0.0", plan)).expect("rollout");
    let aborted = wait_phase(&f, "aborted");
    let history = aborted["history"].to_string();
    assert!(
        history.contains("telemetry gate sensor.metrics/errors = 5"),
        "{history}"
    );
    for (id, _) in &IDS[..4] {
        wait_version(&f, id, "1.0.0");
    }
}

/// Failed-version memory: 2.0.0 crashes on eu-1 only (its device config override trips the `picky` module). The
/// first rollout completes without it (eu-1 back on 1.0.0); the next rollout of 2.0.0 leaves eu-1 out (its desired
/// state never changes, `why` and the report say why) until `flotilla rollout retry --device eu-1`. The report
/// lists the waves, the gate evaluations and who did what.
#[test]
fn a_failed_release_is_not_retried_by_the_next_rollout() {
    let ids = [
        ("eu-1", "eu-west"),
        ("eu-2", "eu-west"),
        ("us-1", "us-east"),
        ("us-2", "us-east"),
    ];
    let f = fleet(&ids);
    f.hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("v1");
    f.hub
        .push_release("sensor", "2.0.0", 1, &firmware("picky"))
        .expect("v2");
    f.hub.apply(&spec("1.0.0", "")).expect("v1 everywhere");
    for (id, _) in ids {
        wait_version(&f, id, "1.0.0");
    }
    // One wave; a quarter of it may fail. eu-1 gets a config, which `picky` traps on.
    let plan = |tick: u32| {
        format!(
            "[[workloads.overrides]]\nmatch = {{ device = \"eu-1\" }}\nconfig = {{ trip = \"yes\" }}\n\
             [rollout]\nwaves = [\"rest\"]\nsoak_secs = 1\nreport_timeout_secs = 30\nmax_failure_ratio = 0.25\n\
             # tick {tick}\n"
        )
    };
    f.hub.apply(&spec("2.0.0", &plan(1))).expect("rollout 1");
    let done = wait_phase(&f, "completed");
    let statuses = |v: &Value| -> Vec<(String, String)> {
        v["waves"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|w| w["devices"].as_array().cloned().unwrap_or_default())
            .chain(v["left_out"].as_array().cloned().unwrap_or_default())
            .map(|d| (s(&d["device"]), s(&d["status"])))
            .collect()
    };
    assert!(
        statuses(&done).contains(&("eu-1".into(), "failed".into())),
        "{done}"
    );
    wait_version(&f, "eu-1", "1.0.0");
    for id in ["eu-2", "us-1", "us-2"] {
        wait_version(&f, id, "2.0.0");
    }

    // The next rollout of 2.0.0 (a settings change: a faster tick) leaves eu-1 where it is.
    let eu1_generation = generation(&f, "eu-1");
    let next = spec("2.0.0", &plan(2)).replace("tick_ms = 100", "tick_ms = 200");
    f.hub.apply(&next).expect("rollout 2");
    let running = status(&f);
    assert!(
        statuses(&running).contains(&("eu-1".into(), "blocked".into())),
        "{running}"
    );
    let why = f.hub.client.get("/api/v1/why/eu-1/sensor").expect("why");
    let why = why["explanation"].as_str().unwrap_or_default().to_owned();
    assert!(
        why.contains("left out of the rollout") && why.contains("sensor@2.0.0 failed"),
        "{why}"
    );
    let done = wait_phase(&f, "completed");
    assert_eq!(
        generation(&f, "eu-1"),
        eu1_generation,
        "eu-1 was not given 2.0.0 again: {done}"
    );
    wait_version(&f, "eu-1", "1.0.0");
    let report = f
        .hub
        .client
        .get("/api/v1/rollouts/sensors/report")
        .expect("report");
    assert_eq!(report["left_out"][0]["device"], "eu-1", "{report}");
    assert_eq!(report["waves"][0]["healthy"], 3, "{report}");
    assert_eq!(report["gates"][0]["passed"], true, "{report}");

    // The operator retries eu-1: the completed rollout reopens for it and it gets 2.0.0 (and fails again).
    let out = f
        .hub
        .cli(&["rollout", "retry", "sensors", "--device", "eu-1"])
        .expect("retry");
    assert!(out.contains("retrying now: eu-1"), "{out}");
    wait_for("eu-1 failing again after the retry", PATIENCE, || {
        statuses(&status(&f))
            .contains(&("eu-1".into(), "failed".into()))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", status(&f)));
    let table = f
        .hub
        .cli(&["rollout", "report", "sensors"])
        .expect("report");
    assert!(
        table.contains("left out") || table.contains("eu-1 failed"),
        "{table}"
    );
    assert!(table.contains("retry eu-1"), "who retried shows: {table}");
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// Pre-download: the next wave's device fetches and verifies 2.0.0 while 1.0.0 keeps running (its rollout status
/// shows it `staged`); then its uplink is cut (device -> broker: no artifact request, report or keepalive gets
/// through) and the wave is approved. The desired state still arrives, and the device cuts over to 2.0.0 from what
/// it staged, with no download: its database records 2.0.0 as started while the link is still cut. Healed, it
/// reports 2.0.0 and the rollout completes.
#[test]
fn staged_download_then_cutover_with_the_uplink_cut() {
    let f = FleetBuilder::new()
        .with_proxies()
        .agent(AgentSpec::new("eu-1", "eu-west", 10.0, 10.0))
        .agent(AgentSpec::new("eu-2", "eu-west", 10.0, 10.0))
        .start()
        .expect("fleet");
    f.hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("v1");
    // 2.0.0: the same code with a 1.5 MiB custom section, so the download is two dozen chunks, not one.
    let mut v2 = firmware("sensor");
    let payload = vec![7u8; 1536 * 1024];
    let mut section = vec![1, b'x'];
    section.extend_from_slice(&payload);
    let mut len = section.len();
    let mut leb = vec![];
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            leb.push(byte);
            break;
        }
        leb.push(byte | 0x80);
    }
    v2.push(0);
    v2.extend_from_slice(&leb);
    v2.extend_from_slice(&section);
    f.hub.push_release("sensor", "2.0.0", 1, &v2).expect("v2");
    let v2_digest = flotilla_shared::Digest::of(&v2);
    f.hub.apply(&spec("1.0.0", "")).expect("v1 everywhere");
    for id in ["eu-1", "eu-2"] {
        wait_version(&f, id, "1.0.0");
    }
    let plan = "[rollout]\nwaves = [\"canary:50\", \"rest\"]\nsoak_secs = 1\nreport_timeout_secs = 120\n\
                manual_approval = true\npre_download = true\n";
    f.hub.apply(&spec("2.0.0", plan)).expect("rollout");
    wait_version(&f, "eu-1", "2.0.0");
    wait_phase(&f, "awaiting approval");
    let stage_of = |v: &Value, id: &str| -> String {
        v["waves"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|w| w["devices"].as_array().cloned().unwrap_or_default())
            .find(|d| d["device"] == id)
            .and_then(|d| d["stage"].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    wait_for("eu-2 staged 2.0.0", PATIENCE, || {
        (stage_of(&status(&f), "eu-2") == "staged").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", status(&f)));
    // Staging touched nothing that runs.
    let d = f.hub.device("eu-2").expect("eu-2");
    assert_eq!(d["workloads"][0]["version"], "1.0.0", "{d}");
    assert_eq!(d["workloads"][0]["state"], "running", "{d}");

    let agent = f.agent("eu-2");
    agent.proxy.as_ref().expect("proxy").blackhole_uplink();
    f.hub
        .client
        .post(
            "/api/v1/rollouts/sensors/approve",
            "application/json",
            b"{}",
            &[],
        )
        .expect("approve");
    let db = agent.state_dir().join("agent.db");
    let started = || -> Option<Vec<u8>> {
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .ok()?;
        conn.query_row(
            "SELECT artifact FROM last_good WHERE name = 'sensor'",
            [],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .ok()
    };
    wait_for("eu-2 starts 2.0.0 with its uplink cut", PATIENCE, || {
        (started()? == v2_digest.0.to_vec()).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: the device did not cut over from what it staged"));
    agent.proxy.as_ref().expect("proxy").heal();
    wait_version(&f, "eu-2", "2.0.0");
    wait_phase(&f, "completed");
}
