//! Data-driven rollout state-machine tests on a virtual clock: waves, gates, timeouts, commands, maintenance
//! windows, holds, snapshot/resume, and a 1,000-device simulated fleet whose canary fails.

use expect_test::{Expect, expect};
use flotilla_hub_core::rollout::{
    Action, Command, DeviceStatus, HoldDeadline, Observation, Phase, Plan, Rollout, Version, Wave,
    Window,
};
use flotilla_shared::DeviceId;
use std::collections::BTreeMap;
use std::fmt::Write;

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).expect("id")
}

/// 5 devices in each of eu-west, us-east, ap-south.
fn members() -> Vec<(DeviceId, Option<String>)> {
    ["eu-west", "us-east", "ap-south"]
        .iter()
        .flat_map(|r| (0..5).map(move |i| (id(&format!("{}-{i}", &r[..2])), Some((*r).to_owned()))))
        .collect()
}

fn plan() -> Plan {
    Plan {
        waves: vec![
            Wave::Canary { percent: 20 },
            Wave::Regions(vec!["eu-west".into()]),
            Wave::Rest,
        ],
        soak_secs: 60,
        max_in_flight: 0,
        max_failure_ratio: 0.25,
        report_timeout_secs: 120,
        manual_approval: false,
        windows: BTreeMap::new(),
        max_hold_secs: 300,
        on_hold_deadline: HoldDeadline::Fail,
        telemetry_gates: vec![],
    }
}

fn drain(r: &mut Rollout, out: &mut String) {
    let mut news = vec![];
    let mut olds = vec![];
    while let Some(Action::Assign { device, version }) = r.poll_action() {
        match version {
            Version::New => news.push(device.to_string()),
            Version::Old => olds.push(device.to_string()),
        }
    }
    if !news.is_empty() {
        write!(out, " new[{}]", news.join(" ")).expect("write");
    }
    if !olds.is_empty() {
        write!(out, " old[{}]", olds.join(" ")).expect("write");
    }
}

fn phase(r: &Rollout) -> String {
    let p = match &r.phase {
        Phase::Wave(w) => format!("wave {w}"),
        Phase::AwaitingApproval(w) => format!("approve? {w}"),
        Phase::Completed => "completed".into(),
        Phase::Aborted { reason } => format!("aborted: {reason}"),
    };
    if r.paused { format!("{p} (paused)") } else { p }
}

/// Lines: `at T`, `ok DEV..`, `bad DEV REASON`, `hold DEV REASON`, `tick`, `pause|resume|abort|approve`,
/// `ok-wave N` (every device of wave N on the new release reports healthy).
fn check(plan: Plan, script: &str, expect: Expect) {
    let mut now = 1_000;
    let mut r = Rollout::start(plan, &members(), now);
    let mut out = String::new();
    write!(out, "{:<24}|", "start").expect("write");
    drain(&mut r, &mut out);
    writeln!(out, " => {}", phase(&r)).expect("write");
    for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w[0] {
            "at" => {
                now = w[1].parse().expect("time");
                r.tick(now);
            }
            "ok" => w[1..]
                .iter()
                .for_each(|d| r.observe(now, &id(d), Observation::Healthy)),
            "ok-wave" => {
                let n: usize = w[1].parse().expect("wave");
                for d in r.waves[n].clone() {
                    r.observe(now, &d, Observation::Healthy);
                }
            }
            "bad" => r.observe(now, &id(w[1]), Observation::Unhealthy(w[2..].join(" "))),
            "hold" => r.observe(now, &id(w[1]), Observation::Held(w[2..].join(" "))),
            "tick" => r.tick(now),
            cmd => {
                let c = match cmd {
                    "pause" => Command::Pause,
                    "resume" => Command::Resume,
                    "abort" => Command::Abort,
                    "approve" => Command::Approve,
                    other => panic!("unknown step {other}"),
                };
                if let Err(e) = r.command(now, c) {
                    write!(out, "{line:<24}| error: {e}").expect("write");
                    writeln!(out, " => {}", phase(&r)).expect("write");
                    continue;
                }
            }
        }
        write!(out, "{line:<24}|").expect("write");
        drain(&mut r, &mut out);
        writeln!(out, " => {}", phase(&r)).expect("write");
    }
    expect.assert_eq(&out);
}

/// A good release goes canary -> eu-west -> rest, each wave soaking 60 s.
#[test]
fn happy_path_region_by_region() {
    check(
        plan(),
        "ok ap-0 eu-0 us-0
         at 1059
         at 1060
         ok-wave 1
         at 1120
         ok-wave 2
         at 1180",
        expect![[r#"
            start                   | new[ap-0 eu-0 us-0] => wave 0
            ok ap-0 eu-0 us-0       | => wave 0
            at 1059                 | => wave 0
            at 1060                 | new[eu-1 eu-2 eu-3 eu-4] => wave 1
            ok-wave 1               | => wave 1
            at 1120                 | new[ap-1 ap-2 ap-3 ap-4 us-1 us-2 us-3 us-4] => wave 2
            ok-wave 2               | => wave 2
            at 1180                 | => completed
        "#]],
    );
}

/// One canary of three fails (33 % > 25 %): the rollout aborts and every device on the new release goes back.
#[test]
fn canary_failure_aborts_and_rolls_back() {
    check(
        plan(),
        "ok ap-0 eu-0
         bad us-0 trap: unreachable
         ok us-1
         approve",
        expect![[r#"
            start                   | new[ap-0 eu-0 us-0] => wave 0
            ok ap-0 eu-0            | => wave 0
            bad us-0 trap: unreachable| old[us-0 ap-0 eu-0] => aborted: wave 0: 1 of 3 devices failed the health gate
            ok us-1                 | => aborted: wave 0: 1 of 3 devices failed the health gate
            approve                 | error: the rollout is finished (aborted) => aborted: wave 0: 1 of 3 devices failed the health gate
        "#]],
    );
}

/// A device that never reports healthy fails at the report timeout and trips the gate.
#[test]
fn report_timeout_counts_as_failure() {
    check(
        plan(),
        "ok ap-0 eu-0
         at 1119
         at 1120",
        expect![[r#"
            start                   | new[ap-0 eu-0 us-0] => wave 0
            ok ap-0 eu-0            | => wave 0
            at 1119                 | => wave 0
            at 1120                 | old[us-0 ap-0 eu-0] => aborted: wave 0: 1 of 3 devices failed the health gate
        "#]],
    );
}

/// Manual approval between waves; pause holds new assignments; resume and abort; bad commands are refused.
#[test]
fn operator_commands() {
    let mut p = plan();
    p.manual_approval = true;
    check(
        p,
        "approve
         ok ap-0 eu-0 us-0
         at 1060
         pause
         approve
         resume
         pause
         pause
         ok-wave 1
         at 1200
         resume
         at 1260
         abort
         resume",
        expect![[r#"
            start                   | new[ap-0 eu-0 us-0] => wave 0
            approve                 | error: nothing to approve: the rollout is not waiting for approval => wave 0
            ok ap-0 eu-0 us-0       | => wave 0
            at 1060                 | => approve? 1
            pause                   | => approve? 1 (paused)
            approve                 | => wave 1 (paused)
            resume                  | new[eu-1 eu-2 eu-3 eu-4] => wave 1
            pause                   | => wave 1 (paused)
            pause                   | error: the rollout is already paused => wave 1 (paused)
            ok-wave 1               | => wave 1 (paused)
            at 1200                 | => wave 1 (paused)
            resume                  | => approve? 2
            at 1260                 | => approve? 2
            abort                   | old[ap-0 eu-0 eu-1 eu-2 eu-3 eu-4 us-0] => aborted: aborted by the operator
            resume                  | error: the rollout is finished (aborted) => aborted: aborted by the operator
        "#]],
    );
}

/// At most two devices update at once.
#[test]
fn max_in_flight() {
    let mut p = plan();
    p.max_in_flight = 2;
    check(
        p,
        "ok ap-0
         ok eu-0 us-0",
        expect![[r#"
            start                   | new[ap-0 eu-0] => wave 0
            ok ap-0                 | new[us-0] => wave 0
            ok eu-0 us-0            | => wave 0
        "#]],
    );
}

/// eu-west may only update Mon-Fri 01:00-05:00 local time (UTC+1); its canary waits for the window.
#[test]
fn maintenance_window() {
    // The virtual clock starts at 1_000 s: Thursday 1970-01-01 00:16 UTC, 01:16 local, before the 03:00 window.
    let mut p = plan();
    p.windows.insert(
        "eu-west".into(),
        Window {
            utc_offset_min: 60,
            days: 0b001_1111,
            start_min: 3 * 60,
            end_min: 5 * 60,
        },
    );
    check(
        p,
        "ok ap-0 us-0
         at 7199
         at 7200
         ok eu-0
         at 7260",
        expect![[r#"
            start                   | new[ap-0 us-0] => wave 0
            ok ap-0 us-0            | => wave 0
            at 7199                 | => wave 0
            at 7200                 | new[eu-0] => wave 0
            ok eu-0                 | => wave 0
            at 7260                 | new[eu-1 eu-2 eu-3 eu-4] => wave 1
        "#]],
    );
}

/// Holds: a hold released before the deadline is fine; one past the deadline fails (or is skipped).
#[test]
fn holds_with_deadline() {
    check(
        plan(),
        "hold eu-0 vehicle in motion
         ok ap-0 us-0
         at 1200
         ok eu-0
         at 1260",
        expect![[r#"
            start                   | new[ap-0 eu-0 us-0] => wave 0
            hold eu-0 vehicle in motion| => wave 0
            ok ap-0 us-0            | => wave 0
            at 1200                 | => wave 0
            ok eu-0                 | => wave 0
            at 1260                 | new[eu-1 eu-2 eu-3 eu-4] => wave 1
        "#]],
    );
    let mut p = plan();
    p.on_hold_deadline = HoldDeadline::Proceed;
    check(
        p,
        "hold eu-0 vehicle in motion
         ok ap-0 us-0
         at 1300
         at 1360",
        expect![[r#"
            start                   | new[ap-0 eu-0 us-0] => wave 0
            hold eu-0 vehicle in motion| => wave 0
            ok ap-0 us-0            | => wave 0
            at 1300                 | old[eu-0] => wave 0
            at 1360                 | new[eu-1 eu-2 eu-3 eu-4] => wave 1
        "#]],
    );
    check(
        plan(),
        "hold eu-0 vehicle in motion
         ok ap-0 us-0
         at 1300",
        expect![[r#"
            start                   | new[ap-0 eu-0 us-0] => wave 0
            hold eu-0 vehicle in motion| => wave 0
            ok ap-0 us-0            | => wave 0
            at 1300                 | old[eu-0 ap-0 us-0] => aborted: wave 0: 1 of 3 devices failed the health gate
        "#]],
    );
}

/// Window arithmetic across midnight and weekdays.
#[test]
fn window_contains() {
    // 22:00-02:00 UTC on Thursdays only. 1970-01-01 is a Thursday.
    let w = Window {
        utc_offset_min: 0,
        days: 1 << 3,
        start_min: 22 * 60,
        end_min: 2 * 60,
    };
    let cases = [
        (21 * 3600, false),
        (22 * 3600, true),
        (86_400 + 3600, true),
        (86_400 + 2 * 3600, false),
        (7 * 86_400 + 23 * 3600, true),
    ];
    for (t, want) in cases {
        assert_eq!(w.contains(t), want, "t={t}");
    }
}

/// A snapshot taken mid-wave and restored continues exactly like the original, emitting no action twice.
#[test]
fn snapshot_resume_is_exact() {
    let mut a = Rollout::start(plan(), &members(), 1_000);
    while a.poll_action().is_some() {}
    a.observe(1_010, &id("ap-0"), Observation::Healthy);
    let bytes = postcard::to_stdvec(&a).expect("snapshot");
    let mut b: Rollout = postcard::from_bytes(&bytes).expect("restore");
    assert_eq!(b.poll_action(), None, "restored state re-emits nothing");
    for r in [&mut a, &mut b] {
        r.observe(1_020, &id("eu-0"), Observation::Healthy);
        r.observe(1_030, &id("us-0"), Observation::Healthy);
        r.tick(1_090);
    }
    let drain = |r: &mut Rollout| std::iter::from_fn(|| r.poll_action()).collect::<Vec<_>>();
    assert_eq!(drain(&mut a), drain(&mut b));
    assert_eq!(a, b);
    assert_eq!(a.phase, Phase::Wave(1));
}

/// 1,000 simulated devices in 5 regions; 20 % of the 10 % canary fail their health gate: the rollout aborts
/// before wave 2, no device outside wave 1 ever gets the release, and every wave-1 device ends on the old one.
#[test]
fn thousand_device_fleet_canary_fails() {
    let regions = ["eu-west", "eu-north", "us-east", "us-west", "ap-south"];
    let fleet: Vec<(DeviceId, Option<String>)> = (0..1000)
        .map(|i| (id(&format!("dev-{i:04}")), Some(regions[i % 5].to_owned())))
        .collect();
    let mut p = plan();
    p.waves = vec![
        Wave::Canary { percent: 10 },
        Wave::Regions(vec!["eu-west".into()]),
        Wave::Rest,
    ];
    p.max_failure_ratio = 0.1;
    let mut now = 0;
    let mut r = Rollout::start(p, &fleet, now);
    let wave1: Vec<DeviceId> = r.waves[0].clone();
    assert_eq!(wave1.len(), 100);
    let mut ever_new = std::collections::BTreeSet::new();
    let mut version: BTreeMap<DeviceId, Version> = fleet
        .iter()
        .map(|(d, _)| (d.clone(), Version::Old))
        .collect();
    let mut apply = |r: &mut Rollout, ever_new: &mut std::collections::BTreeSet<DeviceId>| {
        while let Some(Action::Assign { device, version: v }) = r.poll_action() {
            if v == Version::New {
                ever_new.insert(device.clone());
            }
            version.insert(device, v);
        }
    };
    apply(&mut r, &mut ever_new);
    // Simulated agents report in a seeded order; every fifth device (20 %) crashes on start.
    let mut order = wave1.clone();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in (1..order.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        order.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    for (k, d) in order.iter().enumerate() {
        now += 1;
        let obs = if k % 5 == 0 {
            Observation::Unhealthy("trap on start".into())
        } else {
            Observation::Healthy
        };
        r.observe(now, d, obs);
        apply(&mut r, &mut ever_new);
        if r.is_finished() {
            break;
        }
    }
    assert!(matches!(r.phase, Phase::Aborted { .. }), "{:?}", r.phase);
    assert!(
        ever_new.iter().all(|d| wave1.contains(d)),
        "a device outside wave 1 got the release"
    );
    assert!(
        wave1.iter().all(|d| version.get(d) == Some(&Version::Old)),
        "every wave-1 device is back on the old release"
    );
    assert!(
        r.status
            .values()
            .all(|s| !matches!(s, DeviceStatus::Updating { .. }))
    );
    // Every device that ever got the release is rolled back and counted, the failed canaries included.
    assert!(
        ever_new
            .iter()
            .all(|d| matches!(r.status.get(d), Some(DeviceStatus::RolledBack { .. }))),
        "{:?}",
        r.status
    );
    let last = &r.history.last().expect("history").1;
    assert!(
        last.contains(&format!("rolling back {} devices", ever_new.len())),
        "{last} (moved: {})",
        ever_new.len()
    );
    println!(
        "aborted after {} wave-1 reports: {:?}",
        now,
        r.history.last()
    );
}

/// Telemetry gates against a threshold and against the previous version's baseline.
#[test]
fn telemetry_gate_checks() {
    use flotilla_hub_core::rollout::TelemetryGate;
    let g = TelemetryGate {
        stream: "app".into(),
        metric: "errors".into(),
        max: Some(3.0),
        max_ratio_to_baseline: Some(1.5),
    };
    let cases = [
        (2.0, None, false),
        (4.0, None, true),
        (2.0, Some(1.0), true),
        (1.4, Some(1.0), false),
        (2.0, Some(0.0), false),
    ];
    for (value, baseline, fails) in cases {
        assert_eq!(
            g.check(value, baseline).is_some(),
            fails,
            "{value} {baseline:?}"
        );
    }
}
