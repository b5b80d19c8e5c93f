//! Data-driven rollout state-machine tests on a virtual clock: waves, gates, timeouts, commands, maintenance
//! windows, holds, snapshot/resume, and a 1,000-device simulated fleet whose canary fails.

use expect_test::{Expect, expect};
use flotilla_hub_core::rollout::{
    Action, Clock, Command, DeviceStatus, HoldDeadline, Observation, Phase, Plan, Rollout, Version,
    Wave, Window,
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
            clock: Clock::Offset(60),
            days: 0b001_1111,
            start_min: 3 * 60,
            end_min: 5 * 60,
            device_zone: false,
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
        clock: Clock::Offset(0),
        days: 1 << 3,
        start_min: 22 * 60,
        end_min: 2 * 60,
        device_zone: false,
    };
    let cases = [
        (21 * 3600, false),
        (22 * 3600, true),
        (86_400 + 3600, true),
        (86_400 + 2 * 3600, false),
        (7 * 86_400 + 23 * 3600, true),
    ];
    for (t, want) in cases {
        assert_eq!(w.contains(t, None), want, "t={t}");
    }
}

/// Unix seconds of an RFC 3339 instant.
fn at(s: &str) -> u64 {
    let t: jiff::Timestamp = s.parse().expect("instant");
    u64::try_from(t.as_second()).expect("after 1970")
}

fn daily(clock: Clock, start: &str, end: &str, device_zone: bool) -> Window {
    let min = |s: &str| {
        let (h, m) = s.split_once(':').expect("HH:MM");
        h.parse::<u32>().expect("hour") * 60 + m.parse::<u32>().expect("minute")
    };
    Window {
        clock,
        days: 0x7f,
        start_min: min(start),
        end_min: min(end),
        device_zone,
    }
}

/// IANA time zones across the 2026 daylight-saving transitions of Berlin (29 March 02:00 -> 03:00, 25 October
/// 03:00 -> 02:00) and New York (8 March 02:00 -> 03:00, 1 November 02:00 -> 01:00): a window inside the skipped
/// hour never opens that night, one inside the repeated hour is open through both passes, and a fixed offset is an
/// hour off all summer.
#[test]
fn time_zone_windows_across_daylight_saving_transitions() {
    let berlin = || Clock::Zone("Europe/Berlin".into());
    let new_york = || Clock::Zone("America/New_York".into());
    let cases: Vec<(Window, &str, Option<&str>, bool, &str)> = vec![
        // Berlin 02:00-03:00 every day.
        (
            daily(berlin(), "02:00", "03:00", false),
            "2026-03-28T01:30:00Z",
            None,
            true,
            "02:30 CET the night before",
        ),
        (
            daily(berlin(), "02:00", "03:00", false),
            "2026-03-29T00:59:00Z",
            None,
            false,
            "01:59 CET",
        ),
        (
            daily(berlin(), "02:00", "03:00", false),
            "2026-03-29T01:00:00Z",
            None,
            false,
            "03:00 CEST: 02:xx never came",
        ),
        (
            daily(berlin(), "02:00", "03:00", false),
            "2026-03-29T01:30:00Z",
            None,
            false,
            "03:30 CEST",
        ),
        (
            daily(berlin(), "02:00", "03:00", false),
            "2026-10-24T23:59:00Z",
            None,
            false,
            "01:59 CEST",
        ),
        (
            daily(berlin(), "02:00", "03:00", false),
            "2026-10-25T00:00:00Z",
            None,
            true,
            "02:00 CEST, first pass",
        ),
        (
            daily(berlin(), "02:00", "03:00", false),
            "2026-10-25T00:59:00Z",
            None,
            true,
            "02:59 CEST",
        ),
        (
            daily(berlin(), "02:00", "03:00", false),
            "2026-10-25T01:00:00Z",
            None,
            true,
            "02:00 CET, second pass",
        ),
        (
            daily(berlin(), "02:00", "03:00", false),
            "2026-10-25T01:59:00Z",
            None,
            true,
            "02:59 CET",
        ),
        (
            daily(berlin(), "02:00", "03:00", false),
            "2026-10-25T02:00:00Z",
            None,
            false,
            "03:00 CET",
        ),
        // A window spanning the skipped hour is an hour shorter that night.
        (
            daily(berlin(), "01:00", "04:00", false),
            "2026-03-29T00:30:00Z",
            None,
            true,
            "01:30 CET",
        ),
        (
            daily(berlin(), "01:00", "04:00", false),
            "2026-03-29T01:30:00Z",
            None,
            true,
            "03:30 CEST",
        ),
        (
            daily(berlin(), "01:00", "04:00", false),
            "2026-03-29T02:00:00Z",
            None,
            false,
            "04:00 CEST",
        ),
        // Summer: the zone window opens at 02:00 CEST; a fixed +01:00 window is an hour late.
        (
            daily(berlin(), "02:00", "03:00", false),
            "2026-07-01T00:30:00Z",
            None,
            true,
            "02:30 CEST",
        ),
        (
            daily(Clock::Offset(60), "02:00", "03:00", false),
            "2026-07-01T00:30:00Z",
            None,
            false,
            "01:30 at +01:00",
        ),
        (
            daily(Clock::Offset(60), "02:00", "03:00", false),
            "2026-07-01T01:30:00Z",
            None,
            true,
            "03:30 CEST",
        ),
        // New York 01:00-02:00: the repeated hour in November.
        (
            daily(new_york(), "01:00", "02:00", false),
            "2026-11-01T04:59:00Z",
            None,
            false,
            "00:59 EDT",
        ),
        (
            daily(new_york(), "01:00", "02:00", false),
            "2026-11-01T05:30:00Z",
            None,
            true,
            "01:30 EDT",
        ),
        (
            daily(new_york(), "01:00", "02:00", false),
            "2026-11-01T06:30:00Z",
            None,
            true,
            "01:30 EST, again",
        ),
        (
            daily(new_york(), "01:00", "02:00", false),
            "2026-11-01T07:00:00Z",
            None,
            false,
            "02:00 EST",
        ),
        // New York 02:00-03:00: the skipped hour in March.
        (
            daily(new_york(), "02:00", "03:00", false),
            "2026-03-07T07:30:00Z",
            None,
            true,
            "02:30 EST the night before",
        ),
        (
            daily(new_york(), "02:00", "03:00", false),
            "2026-03-08T06:59:00Z",
            None,
            false,
            "01:59 EST",
        ),
        (
            daily(new_york(), "02:00", "03:00", false),
            "2026-03-08T07:00:00Z",
            None,
            false,
            "03:00 EDT",
        ),
        // Each device's own clock, with the window's zone as the fallback.
        (
            daily(berlin(), "02:00", "03:00", true),
            "2026-07-01T06:30:00Z",
            Some("America/New_York"),
            true,
            "02:30 EDT",
        ),
        (
            daily(berlin(), "02:00", "03:00", true),
            "2026-07-01T06:30:00Z",
            None,
            false,
            "08:30 CEST",
        ),
        (
            daily(berlin(), "02:00", "03:00", true),
            "2026-07-01T00:30:00Z",
            Some("Mars/Olympus"),
            true,
            "not a zone: Berlin",
        ),
        // A device's zone is ignored unless the window follows device clocks.
        (
            daily(berlin(), "02:00", "03:00", false),
            "2026-07-01T06:30:00Z",
            Some("America/New_York"),
            false,
            "08:30 CEST",
        ),
    ];
    for (w, t, device, want, why) in cases {
        assert_eq!(
            w.contains(at(t), device),
            want,
            "{t} ({why}) in {w:?} for {device:?}"
        );
    }
}

/// One wave spanning two time zones, the window following each device's clock: each device updates in its own
/// night, six hours apart.
#[test]
fn a_wave_across_time_zones_updates_each_device_in_its_own_night() {
    let mut p = plan();
    p.waves = vec![Wave::Rest];
    p.windows.insert(
        "eu-west".into(),
        daily(Clock::Zone("Europe/Berlin".into()), "02:00", "03:00", true),
    );
    let members = vec![
        (id("berlin-1"), Some("eu-west".to_owned())),
        (id("nyc-1"), Some("eu-west".to_owned())),
    ];
    let zones = BTreeMap::from([(id("nyc-1"), "America/New_York".to_owned())]);
    let assigned = |r: &mut Rollout| {
        let mut out = vec![];
        while let Some(Action::Assign { device, version }) = r.poll_action() {
            out.push(format!("{device} {version:?}"));
        }
        out
    };
    // 01:00 in Berlin, 19:00 in New York: nobody yet.
    let mut r = Rollout::start_with_zones(p, &members, zones, at("2026-07-01T23:00:00Z"));
    assert!(assigned(&mut r).is_empty());
    r.tick(at("2026-07-02T00:00:00Z"));
    assert_eq!(assigned(&mut r), ["berlin-1 New"], "02:00 in Berlin");
    r.observe(
        at("2026-07-02T00:01:00Z"),
        &id("berlin-1"),
        Observation::Healthy,
    );
    r.tick(at("2026-07-02T03:00:00Z"));
    assert!(assigned(&mut r).is_empty(), "23:00 in New York");
    r.tick(at("2026-07-02T06:00:00Z"));
    assert_eq!(assigned(&mut r), ["nyc-1 New"], "02:00 in New York");
    assert_eq!(r.phase, Phase::Wave(0));
    // The zones survive a snapshot.
    let restored =
        Rollout::from_snapshot(&postcard::to_stdvec(&r).expect("snapshot")).expect("restore");
    assert_eq!(restored.device_zones, r.device_zones);
}

/// A snapshot written by a hub from before time zones (windows with a fixed `utc_offset_min`, no device zones)
/// still restores, its windows as fixed offsets.
#[test]
fn snapshots_from_before_time_zones_restore() {
    use serde::Serialize;
    #[derive(Serialize)]
    struct WindowV1 {
        utc_offset_min: i32,
        days: u8,
        start_min: u32,
        end_min: u32,
    }
    #[derive(Serialize)]
    struct PlanV1<'a> {
        waves: &'a Vec<Wave>,
        soak_secs: u64,
        max_in_flight: u32,
        max_failure_ratio: f64,
        report_timeout_secs: u64,
        manual_approval: bool,
        windows: BTreeMap<String, WindowV1>,
        max_hold_secs: u64,
        on_hold_deadline: HoldDeadline,
        telemetry_gates: &'a Vec<flotilla_hub_core::rollout::TelemetryGate>,
    }
    #[derive(Serialize)]
    struct RolloutV1<'a> {
        plan: PlanV1<'a>,
        waves: &'a Vec<Vec<DeviceId>>,
        regions: &'a BTreeMap<DeviceId, Option<String>>,
        status: &'a BTreeMap<DeviceId, DeviceStatus>,
        on_new: &'a std::collections::BTreeSet<DeviceId>,
        phase: &'a Phase,
        paused: bool,
        soak_start: Option<u64>,
        history: &'a Vec<(u64, String)>,
    }
    let mut p = plan();
    p.windows.insert(
        "eu-west".into(),
        daily(Clock::Offset(60), "03:00", "05:00", false),
    );
    let mut r = Rollout::start(p, &members(), 1_000);
    while r.poll_action().is_some() {}
    r.observe(1_010, &id("ap-0"), Observation::Healthy);
    let old = RolloutV1 {
        plan: PlanV1 {
            waves: &r.plan.waves,
            soak_secs: r.plan.soak_secs,
            max_in_flight: r.plan.max_in_flight,
            max_failure_ratio: r.plan.max_failure_ratio,
            report_timeout_secs: r.plan.report_timeout_secs,
            manual_approval: r.plan.manual_approval,
            windows: BTreeMap::from([(
                "eu-west".to_owned(),
                WindowV1 {
                    utc_offset_min: 60,
                    days: 0x7f,
                    start_min: 180,
                    end_min: 300,
                },
            )]),
            max_hold_secs: r.plan.max_hold_secs,
            on_hold_deadline: r.plan.on_hold_deadline,
            telemetry_gates: &r.plan.telemetry_gates,
        },
        waves: &r.waves,
        regions: &r.regions,
        status: &r.status,
        on_new: &r.on_new,
        phase: &r.phase,
        paused: r.paused,
        soak_start: r.soak_start,
        history: &r.history,
    };
    let bytes = postcard::to_stdvec(&old).expect("old snapshot");
    let restored = Rollout::from_snapshot(&bytes).expect("restores");
    assert_eq!(restored, r, "the same rollout, windows as fixed offsets");
    assert!(Rollout::from_snapshot(&bytes[..bytes.len() / 2]).is_err());
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
