//! Data-driven rollout state-machine tests on a virtual clock: waves, gates, timeouts, commands, maintenance
//! windows, holds, snapshot/resume, and a 1,000-device simulated fleet whose canary fails.

use expect_test::{Expect, expect};
use flotilla_hub_core::rollout::{
    Action, Clock, Command, DeviceStatus, HoldDeadline, Member, Observation, Phase, Plan, Rollout,
    Version, Wave, Window,
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
        offline_grace_secs: 600,
        offline_is_failure: false,
        budgets: vec![],
        pre_download: false,
        download_window: None,
    }
}

fn drain(r: &mut Rollout, out: &mut String) {
    let mut news = vec![];
    let mut olds = vec![];
    let mut remembered = vec![];
    while let Some(action) = r.poll_action() {
        match action {
            Action::Assign {
                device,
                version: Version::New,
            } => news.push(device.to_string()),
            Action::Assign {
                device,
                version: Version::Old,
            } => olds.push(device.to_string()),
            Action::RememberFailure { device, .. } => remembered.push(device.to_string()),
        }
    }
    if !news.is_empty() {
        write!(out, " new[{}]", news.join(" ")).expect("write");
    }
    if !olds.is_empty() {
        write!(out, " old[{}]", olds.join(" ")).expect("write");
    }
    if !remembered.is_empty() {
        write!(out, " remember[{}]", remembered.join(" ")).expect("write");
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
                if let Err(e) = r.command(now, c, "op") {
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
            bad us-0 trap: unreachable| old[us-0 ap-0 eu-0] remember[us-0] => aborted: wave 0: 1 of 3 devices failed the health gate
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
            at 1120                 | old[us-0 ap-0 eu-0] remember[us-0] => aborted: wave 0: 1 of 3 devices failed the health gate
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
            abort                   | old[ap-0 eu-0 eu-1 eu-2 eu-3 eu-4 us-0] => aborted: aborted by the operator (op)
            resume                  | error: the rollout is finished (aborted) => aborted: aborted by the operator (op)
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
    let mut nyc = Member::new(id("nyc-1"), Some("eu-west".to_owned()));
    nyc.tz = Some("America/New_York".to_owned());
    let members = vec![Member::new(id("berlin-1"), Some("eu-west".to_owned())), nyc];
    let assigned = |r: &mut Rollout| {
        let mut out = vec![];
        while let Some(action) = r.poll_action() {
            if let Action::Assign { device, version } = action {
                out.push(format!("{device} {version:?}"));
            }
        }
        out
    };
    // 01:00 in Berlin, 19:00 in New York: nobody yet.
    let mut r = Rollout::begin(p, members, &BTreeMap::new(), at("2026-07-01T23:00:00Z"));
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
    let restored = Rollout::from_snapshot(&r.snapshot()).expect("restore");
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
    assert_eq!(
        restored.plan, r.plan,
        "the same plan, windows as fixed offsets"
    );
    assert_eq!(
        (&restored.waves, &restored.regions, &restored.status),
        (&r.waves, &r.regions, &r.status)
    );
    assert_eq!(
        (&restored.on_new, &restored.phase, &restored.history),
        (&r.on_new, &r.phase, &r.history)
    );
    assert!(Rollout::from_snapshot(&bytes[..bytes.len() / 2]).is_err());
}

/// A snapshot taken mid-wave and restored continues exactly like the original, emitting no action twice.
#[test]
fn snapshot_resume_is_exact() {
    let mut a = Rollout::start(plan(), &members(), 1_000);
    while a.poll_action().is_some() {}
    a.observe(1_010, &id("ap-0"), Observation::Healthy);
    let bytes = a.snapshot();
    let mut b = Rollout::from_snapshot(&bytes).expect("restore");
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
        while let Some(action) = r.poll_action() {
            if let Action::Assign { device, version: v } = action {
                if v == Version::New {
                    ever_new.insert(device.clone());
                }
                version.insert(device, v);
            }
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

/// Runs a script over `members` (steps as in [`check`], plus `offline DEV`, `online DEV`, `retry [DEV..]`,
/// `status DEV..`, and `report`) and returns the trace.
fn trace(plan: Plan, members: Vec<Member>, script: &str) -> String {
    let mut now = 1_000;
    let mut r = Rollout::begin(plan, members, &BTreeMap::new(), now);
    let mut out = String::new();
    write!(out, "{:<24}|", "start").expect("write");
    drain(&mut r, &mut out);
    writeln!(out, " => {}", phase(&r)).expect("write");
    for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let mut extra = String::new();
        match w[0] {
            "at" => {
                now = w[1].parse().expect("time");
                r.tick(now);
            }
            "ok" => w[1..]
                .iter()
                .for_each(|d| r.observe(now, &id(d), Observation::Healthy)),
            "bad" => r.observe(now, &id(w[1]), Observation::Unhealthy(w[2..].join(" "))),
            "offline" => r.set_online(now, &id(w[1]), false),
            "online" => r.set_online(now, &id(w[1]), true),
            "abort" => r.command(now, Command::Abort, "op").expect("abort"),
            "retry" => {
                let ds: Vec<DeviceId> = w[1..].iter().map(|d| id(d)).collect();
                if let Err(e) = r.retry(now, &ds, "op") {
                    extra = format!(" error: {e}");
                }
            }
            "status" => {
                let ss: Vec<String> = w[1..]
                    .iter()
                    .map(|d| format!("{d}={}", r.status[&id(d)]))
                    .collect();
                extra = format!(" {}", ss.join(" "));
            }
            "report" => {
                let rep = r.report(now);
                for wr in &rep.waves {
                    write!(
                        extra,
                        " w{}:{}h/{}f/{}u/{}o",
                        wr.wave, wr.healthy, wr.failed, wr.undetermined, wr.other
                    )
                    .expect("write");
                }
                for l in &rep.left_out {
                    write!(extra, " left-out:{}", l.device).expect("write");
                }
                for g in &rep.gates {
                    let verdict = if g.passed { "passed" } else { "halted" };
                    write!(extra, " gate{}:{verdict}({})", g.wave + 1, g.detail).expect("write");
                }
            }
            other => panic!("unknown step {other}"),
        }
        write!(out, "{line:<24}|{extra}").expect("write");
        drain(&mut r, &mut out);
        writeln!(out, " => {}", phase(&r)).expect("write");
    }
    out
}

fn fleet_with(offline: &[&str], blocked: &[&str]) -> Vec<Member> {
    members()
        .into_iter()
        .map(|(d, region)| {
            let mut m = Member::new(d.clone(), region);
            m.online = !offline.contains(&d.as_str());
            m.blocked = blocked
                .contains(&d.as_str())
                .then(|| "sensor@3.0.0 failed here: trap".to_owned());
            m
        })
        .collect()
}

/// A canary offline at its turn is undetermined, not failed: the wave waits the grace (600 s) and is then judged
/// without it; back online it is updating again and judged like any other device.
#[test]
fn offline_canary_is_undetermined_and_judged_without() {
    let out = trace(
        plan(),
        fleet_with(&["us-0"], &[]),
        "status us-0
         ok ap-0 eu-0
         at 1100
         at 1600
         report
         at 1660
         online us-0
         ok us-0
         status us-0",
    );
    expect![[r#"
        start                   | new[ap-0 eu-0 us-0] => wave 0
        status us-0             | us-0=undetermined: offline => wave 0
        ok ap-0 eu-0            | => wave 0
        at 1100                 | => wave 0
        at 1600                 | => wave 0
        report                  | w1:2h/0f/1u/0o w2:0h/0f/0u/4o w3:0h/0f/0u/8o => wave 0
        at 1660                 | new[eu-1 eu-2 eu-3 eu-4] => wave 1
        online us-0             | => wave 1
        ok us-0                 | => wave 1
        status us-0             | us-0=healthy => wave 1
    "#]]
    .assert_eq(&out);
}

/// A device that goes offline mid-update is undetermined instead of failing at the report timeout; with
/// `offline_is_failure` it fails once the grace is over.
#[test]
fn offline_mid_update_and_offline_is_failure() {
    let script = "ok ap-0 eu-0
                  offline us-0
                  at 1120
                  status us-0
                  at 1600
                  at 1660
                  status us-0";
    let out = trace(plan(), fleet_with(&[], &[]), script);
    expect![[r#"
        start                   | new[ap-0 eu-0 us-0] => wave 0
        ok ap-0 eu-0            | => wave 0
        offline us-0            | => wave 0
        at 1120                 | => wave 0
        status us-0             | us-0=undetermined: offline => wave 0
        at 1600                 | => wave 0
        at 1660                 | new[eu-1 eu-2 eu-3 eu-4] => wave 1
        status us-0             | us-0=undetermined: offline => wave 1
    "#]]
    .assert_eq(&out);
    let mut strict = plan();
    strict.offline_is_failure = true;
    let out = trace(strict, fleet_with(&[], &[]), script);
    expect![[r#"
        start                   | new[ap-0 eu-0 us-0] => wave 0
        ok ap-0 eu-0            | => wave 0
        offline us-0            | => wave 0
        at 1120                 | => wave 0
        status us-0             | us-0=undetermined: offline => wave 0
        at 1600                 | old[us-0 ap-0 eu-0] => aborted: wave 0: 1 of 3 devices failed the health gate
        at 1660                 | => aborted: wave 0: 1 of 3 devices failed the health gate
        status us-0             | us-0=rolled-back: failed (offline for 600 s), then the rollout was aborted => aborted: wave 0: 1 of 3 devices failed the health gate
    "#]]
    .assert_eq(&out);
}

/// An offline device catching up after an abort: it was told the new release at its turn, the abort takes it back,
/// so when it returns it runs the stable one.
#[test]
fn offline_device_catches_up_after_an_abort() {
    let out = trace(
        plan(),
        fleet_with(&["us-0"], &[]),
        "bad eu-0 trap
         online us-0
         status us-0
         report",
    );
    expect![[r#"
        start                   | new[ap-0 eu-0 us-0] => wave 0
        bad eu-0 trap           | old[eu-0 ap-0 us-0] remember[eu-0] => aborted: wave 0: 1 of 3 devices failed the health gate
        online us-0             | => aborted: wave 0: 1 of 3 devices failed the health gate
        status us-0             | us-0=rolled-back: wave 0: 1 of 3 devices failed the health gate => aborted: wave 0: 1 of 3 devices failed the health gate
        report                  | w1:0h/0f/0u/0o w2:0h/0f/0u/4o w3:0h/0f/0u/8o gate1:halted(1/3 failed > max_failure_ratio 0.25) => aborted: wave 0: 1 of 3 devices failed the health gate
    "#]]
    .assert_eq(&out);
}

/// A device where the release failed before is left out of every wave (blocked) until an operator retries it; a
/// completed rollout reopens for the retried device, which then gets the release like the others.
#[test]
fn failed_version_memory_and_retry() {
    let out = trace(
        plan(),
        fleet_with(&[], &["eu-0"]),
        "report
         ok ap-0 eu-1 us-0
         at 1060
         ok eu-2 eu-3 eu-4
         at 1120
         ok ap-1 ap-2 ap-3 ap-4 us-1 us-2 us-3 us-4
         at 1180
         retry ap-1
         retry eu-0
         ok eu-0
         at 1240
         status eu-0",
    );
    expect![[r#"
        start                   | new[ap-0 eu-1 us-0] => wave 0
        report                  | w1:0h/0f/0u/3o w2:0h/0f/0u/3o w3:0h/0f/0u/8o left-out:eu-0 => wave 0
        ok ap-0 eu-1 us-0       | => wave 0
        at 1060                 | new[eu-2 eu-3 eu-4] => wave 1
        ok eu-2 eu-3 eu-4       | => wave 1
        at 1120                 | new[ap-1 ap-2 ap-3 ap-4 us-1 us-2 us-3 us-4] => wave 2
        ok ap-1 ap-2 ap-3 ap-4 us-1 us-2 us-3 us-4| => wave 2
        at 1180                 | => completed
        retry ap-1              | error: nothing to retry: no device of this rollout failed or was left out => completed
        retry eu-0              | new[eu-0] => wave 2
        ok eu-0                 | => wave 2
        at 1240                 | => completed
        status eu-0             | eu-0=healthy => completed
    "#]]
    .assert_eq(&out);
}

/// Two concurrent rollouts (different deployments on the same devices) under a disruption budget of one device per
/// site, and a percentage budget per zone: each rollout counts the other's updating devices, so at no point is
/// more than one device of a site (or 50 % of a zone) out of service across both.
#[test]
fn disruption_budget_across_two_concurrent_rollouts() {
    use flotilla_hub_core::rollout::{Budget, GroupBy, Limit};
    let mut p = plan();
    p.waves = vec![Wave::Rest];
    p.soak_secs = 0;
    p.budgets = vec![
        Budget {
            group_by: GroupBy::Label("site".into()),
            max_unavailable: Limit::Count(1),
        },
        Budget {
            group_by: GroupBy::Zone,
            max_unavailable: Limit::Percent(50),
        },
    ];
    let fleet: Vec<Member> = ["a-0", "a-1", "a-2", "b-0", "b-1", "c-0"]
        .iter()
        .map(|d| {
            let mut m = Member::new(id(d), Some("eu-west".into()));
            m.labels.insert("site".into(), d[..1].to_owned());
            // Sites a and b share zone z1 (5 devices: at most 3 out); c is alone in z2.
            m.zone = Some(if d.starts_with('c') { "z2" } else { "z1" }.to_owned());
            m
        })
        .collect();
    let mut rollouts = [
        Rollout::begin(p.clone(), fleet.clone(), &BTreeMap::new(), 1_000),
        Rollout::begin(p, fleet.clone(), &BTreeMap::new(), 1_000),
    ];
    let mut out = String::new();
    let mut now = 1_000;
    for round in 0..8 {
        now += 10;
        for i in 0..2 {
            let (me, other) = if i == 0 {
                let (a, b) = rollouts.split_at_mut(1);
                (&mut a[0], &b[0])
            } else {
                let (a, b) = rollouts.split_at_mut(1);
                (&mut b[0], &a[0])
            };
            me.refresh_elsewhere(|d| other.is_unavailable(d));
            me.tick(now);
            let mut started = vec![];
            while let Some(action) = me.poll_action() {
                if let Action::Assign { device, .. } = action {
                    started.push(device.to_string());
                }
            }
            writeln!(
                out,
                "round {round} rollout {}: start [{}]",
                "AB".as_bytes()[i] as char,
                started.join(" ")
            )
            .expect("write");
        }
        // The invariant, checked over both rollouts at once.
        for (group, max) in [("a", 1), ("b", 1), ("c", 1)] {
            let out_of_service = fleet
                .iter()
                .filter(|m| m.id.as_str().starts_with(group))
                .filter(|m| rollouts.iter().any(|r| r.is_unavailable(&m.id)))
                .count();
            assert!(
                out_of_service <= max,
                "site {group}: {out_of_service} out at once"
            );
        }
        let z1 = fleet
            .iter()
            .filter(|m| m.zone.as_deref() == Some("z1"))
            .filter(|m| rollouts.iter().any(|r| r.is_unavailable(&m.id)))
            .count();
        assert!(z1 <= 3, "zone z1: {z1} out at once");
        // Everyone updating reports healthy before the next round.
        for r in &mut rollouts {
            let updating: Vec<DeviceId> = r
                .status
                .iter()
                .filter(|(_, s)| matches!(s, DeviceStatus::Updating { .. }))
                .map(|(d, _)| d.clone())
                .collect();
            for d in updating {
                r.observe(now + 5, &d, Observation::Healthy);
            }
        }
    }
    expect![[r#"
        round 0 rollout A: start [a-0 b-0 c-0]
        round 0 rollout B: start []
        round 1 rollout A: start [a-1 b-1]
        round 1 rollout B: start [c-0]
        round 2 rollout A: start [a-2]
        round 2 rollout B: start [b-0]
        round 3 rollout A: start []
        round 3 rollout B: start [b-1 a-0]
        round 4 rollout A: start []
        round 4 rollout B: start [a-1]
        round 5 rollout A: start []
        round 5 rollout B: start [a-2]
        round 6 rollout A: start []
        round 6 rollout B: start []
        round 7 rollout A: start []
        round 7 rollout B: start []
    "#]]
    .assert_eq(&out);
    assert!(rollouts.iter().all(|r| r.phase == Phase::Completed));
}

/// A snapshot in the postcard layout of the hubs of 2026-12-06 (time-zone windows, device clocks, nothing of
/// offline devices or budgets) restores with those as defaults.
#[test]
fn snapshots_from_postcard_hubs_restore() {
    use serde::Serialize;
    #[derive(Serialize)]
    struct PlanV2<'a> {
        waves: &'a Vec<Wave>,
        soak_secs: u64,
        max_in_flight: u32,
        max_failure_ratio: f64,
        report_timeout_secs: u64,
        manual_approval: bool,
        windows: &'a BTreeMap<String, Window>,
        max_hold_secs: u64,
        on_hold_deadline: HoldDeadline,
        telemetry_gates: &'a Vec<flotilla_hub_core::rollout::TelemetryGate>,
    }
    #[derive(Serialize)]
    struct RolloutV2<'a> {
        plan: PlanV2<'a>,
        waves: &'a Vec<Vec<DeviceId>>,
        regions: &'a BTreeMap<DeviceId, Option<String>>,
        status: &'a BTreeMap<DeviceId, DeviceStatus>,
        on_new: &'a std::collections::BTreeSet<DeviceId>,
        phase: &'a Phase,
        paused: bool,
        soak_start: Option<u64>,
        history: &'a Vec<(u64, String)>,
        device_zones: &'a BTreeMap<DeviceId, String>,
    }
    let mut p = plan();
    p.windows.insert(
        "eu-west".into(),
        // Open at the start: 1970-01-01 00:16 UTC is 01:16 in Berlin.
        daily(Clock::Zone("Europe/Berlin".into()), "01:00", "04:00", true),
    );
    let mut r = Rollout::start(p, &members(), 1_000);
    while r.poll_action().is_some() {}
    r.observe(1_010, &id("ap-0"), Observation::Healthy);
    let old = RolloutV2 {
        plan: PlanV2 {
            waves: &r.plan.waves,
            soak_secs: r.plan.soak_secs,
            max_in_flight: r.plan.max_in_flight,
            max_failure_ratio: r.plan.max_failure_ratio,
            report_timeout_secs: r.plan.report_timeout_secs,
            manual_approval: r.plan.manual_approval,
            windows: &r.plan.windows,
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
        device_zones: &r.device_zones,
    };
    let bytes = postcard::to_stdvec(&old).expect("old snapshot");
    let mut restored = Rollout::from_snapshot(&bytes).expect("restores");
    assert_eq!(restored.plan, r.plan);
    assert_eq!((&restored.status, &restored.on_new), (&r.status, &r.on_new));
    assert!(restored.offline.is_empty() && restored.gates.is_empty());
    // It carries on: the rest of the canary reports healthy and the wave moves on after the soak.
    for d in ["eu-0", "us-0"] {
        restored.observe(1_020, &id(d), Observation::Healthy);
    }
    restored.tick(1_080);
    assert_eq!(restored.phase, Phase::Wave(1));
    assert_eq!(restored.wave_times[1].started, Some(1_080));
    while restored.poll_action().is_some() {}
    // And what it writes now is JSON, which restores exactly.
    let again = Rollout::from_snapshot(&restored.snapshot()).expect("json");
    assert_eq!(again, restored);
}

/// Pre-download: the devices of the current wave not moved yet and of the next wave stage, within the download
/// window (here 01:00-05:00 UTC); nobody without `pre_download`, nobody once finished.
#[test]
fn staging_covers_the_current_and_next_wave_inside_the_download_window() {
    let mut p = plan();
    p.max_in_flight = 1;
    assert!(
        Rollout::start(p.clone(), &members(), 1_000)
            .due_for_staging(1_000)
            .is_empty()
    );
    p.pre_download = true;
    // 1970-01-01 00:16 UTC at the start: outside 01:00-05:00.
    p.download_window = Some(daily(Clock::Offset(0), "01:00", "05:00", false));
    let mut r = Rollout::start(p, &members(), 1_000);
    while r.poll_action().is_some() {}
    let names = |v: Vec<DeviceId>| {
        v.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(names(r.due_for_staging(1_000)), "", "outside the window");
    // 02:00: ap-0 updates (max_in_flight 1); eu-0 and us-0 wait their turn in wave 0; wave 1 is eu-1..4.
    assert_eq!(
        names(r.due_for_staging(7_200)),
        "eu-0 us-0 eu-1 eu-2 eu-3 eu-4",
        "the rest of wave 0 and all of wave 1; not wave 2"
    );
    r.command(7_200, Command::Abort, "op").expect("abort");
    assert!(r.due_for_staging(7_200).is_empty(), "finished");
}
