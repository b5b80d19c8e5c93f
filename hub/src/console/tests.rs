//! Rendering tests: every page rendered from fixed fixture data and compared with its snapshot in `snapshots/`
//! (`UPDATE_EXPECT=1 cargo test -p flotilla-hub console` rewrites them; review the diff). Plus the properties no
//! snapshot review should have to catch: no token in any page, a CSRF token in every form that changes state,
//! no action buttons for a viewer, no inline script or style.

use super::map::Colouring;
use super::model::*;
use super::views::{self, ApplyOutcome, AuditQuery, DeviceQuery, Frame};
use expect_test::{ExpectFile, expect_file};
use std::collections::BTreeMap;

const NOW: u64 = 1_796_000_000;
const CSRF: &str = "c5rf0000000000000000000000000000000000000000000000000000000000ff";

fn frame(role: &'static str) -> Frame<'static> {
    Frame {
        name: "ops-eu",
        role,
        regions: None,
        csrf: CSRF,
        admin: role == "admin",
        now: NOW,
    }
}

fn counts(devices: u32, offline: u32, converged: u32, failing: u32, held: u32) -> Counts {
    Counts {
        devices,
        online: devices - offline,
        offline,
        converged,
        failing,
        held,
    }
}

fn summary() -> Summary {
    let v = |p: &[(&str, u32)]| {
        p.iter()
            .map(|(k, n)| (k.to_string(), *n))
            .collect::<BTreeMap<_, _>>()
    };
    Summary {
        total: counts(1240, 12, 1190, 3, 4),
        regions: vec![
            Region {
                region: Some("eu-west".into()),
                counts: counts(800, 4, 770, 3, 4),
                centre: Some(Centre {
                    lat: 51.5,
                    lon: -3.0,
                }),
                versions: v(&[("1.4.0", 600), ("1.5.0", 200)]),
                zones: vec![
                    Zone {
                        zone: Some("dublin".into()),
                        counts: counts(500, 2, 480, 3, 0),
                        centre: Some(Centre {
                            lat: 53.3,
                            lon: -6.3,
                        }),
                        versions: v(&[("1.4.0", 300), ("1.5.0", 200)]),
                    },
                    Zone {
                        zone: Some("paris".into()),
                        counts: counts(300, 2, 290, 0, 4),
                        centre: Some(Centre {
                            lat: 48.9,
                            lon: 2.4,
                        }),
                        versions: v(&[("1.4.0", 300)]),
                    },
                ],
            },
            Region {
                region: Some("us-east".into()),
                counts: counts(440, 8, 420, 0, 0),
                centre: Some(Centre {
                    lat: 40.7,
                    lon: -74.0,
                }),
                versions: v(&[("1.4.0", 440)]),
                zones: vec![Zone {
                    zone: None,
                    counts: counts(440, 8, 420, 0, 0),
                    centre: Some(Centre {
                        lat: 40.7,
                        lon: -74.0,
                    }),
                    versions: v(&[("1.4.0", 440)]),
                }],
            },
        ],
    }
}

fn rollout_rows() -> Vec<RolloutRow> {
    vec![RolloutRow {
        deployment: "sensor".into(),
        phase: "wave 2 of 3".into(),
        paused: false,
        finished: false,
        waves: 3,
        devices: 800,
        counts: [
            ("healthy".to_owned(), 210),
            ("pending".to_owned(), 588),
            ("updating".to_owned(), 2),
        ]
        .into(),
        started_at: NOW - 900,
        finished_at: None,
        soak_left_secs: None,
    }]
}

fn device() -> Device {
    Device {
        id: "gw-dub-0001".into(),
        online: true,
        last_seen: NOW - 12,
        region: Some("eu-west".into()),
        zone: Some("dublin".into()),
        labels: [("site".to_owned(), "plant-7".to_owned())].into(),
        arch: "aarch64".into(),
        agent_version: "0.1.0".into(),
        memory_mib: 512,
        runtimes: vec!["wasm".into(), "container".into()],
        desired_generation: 7,
        applied_generation: 7,
        workloads: vec![
            Workload {
                name: "sensor".into(),
                state: "running".into(),
                healthy: true,
                version: Some("1.5.0".into()),
                release: "ab".repeat(32),
                restarts: 0,
                ..Workload::default()
            },
            Workload {
                name: "uplink".into(),
                state: "backing-off".into(),
                version: Some("2.0.1".into()),
                release: "cd".repeat(32),
                restarts: 4,
                last_error: Some("exit code 2 <after 3 s>".into()),
                ..Workload::default()
            },
        ],
        effective_config: Some(
            [
                ("sensor".to_owned(), "rate=5".to_owned()),
                ("uplink".to_owned(), String::new()),
            ]
            .into(),
        ),
        recent_reports: vec![
            ReportLine {
                at: NOW - 30,
                last_at: NOW - 12,
                reports: 4,
                applied_generation: 7,
                summary: "1 of 2 running; uplink backing-off".into(),
            },
            ReportLine {
                at: NOW - 300,
                last_at: NOW - 300,
                reports: 1,
                applied_generation: 6,
                summary: "2 of 2 running".into(),
            },
        ],
        ..Device::default()
    }
}

fn rollout(phase: &str, paused: bool) -> Rollout {
    let dev = |d: &str, s: &str| WaveDevice {
        device: d.into(),
        status: Some(s.into()),
        detail: None,
        stage: None,
    };
    Rollout {
        deployment: "sensor".into(),
        phase: phase.into(),
        paused,
        finished: false,
        current_wave: Some(2),
        soak_secs: 300,
        soak_left_secs: Some(125),
        manual_approval: true,
        max_failure_ratio: 0.1,
        windows: vec![WindowState {
            region: "eu-west".into(),
            open: true,
        }],
        waves: vec![
            Wave {
                wave: 1,
                devices: vec![dev("gw-1", "healthy"), dev("gw-2", "healthy")],
            },
            Wave {
                wave: 2,
                devices: vec![
                    dev("gw-3", "healthy"),
                    dev("gw-4", "updating"),
                    WaveDevice {
                        device: "gw-5".into(),
                        status: Some("failed".into()),
                        detail: Some("sensor exited with code 2".into()),
                        stage: None,
                    },
                    dev("gw-6", "held"),
                    dev("gw-7", "pending"),
                ],
            },
            Wave {
                wave: 3,
                devices: vec![dev("gw-8", "pending")],
            },
        ],
        left_out: vec![],
        history: vec![
            HistoryLine {
                at: NOW - 600,
                event: "wave 1 started (2 devices)".into(),
            },
            HistoryLine {
                at: NOW - 300,
                event: "wave 2 started (5 devices)".into(),
            },
        ],
    }
}

fn report() -> Report {
    Report {
        outcome: String::new(),
        total_secs: 600,
        gates: vec![GateEval {
            at: NOW - 300,
            wave: 0,
            passed: true,
            failed: 0,
            undetermined: 0,
            judged: 2,
            detail: "0 of 2 failed (limit 10%)".into(),
        }],
        operators: vec![],
    }
}

fn deployment() -> Deployment {
    Deployment {
        name: "sensor".into(),
        revision: Some(3),
        revisions: vec![
            Revision {
                revision: 2,
                at: NOW - 86_400,
            },
            Revision {
                revision: 3,
                at: NOW - 900,
            },
        ],
        workloads: vec!["sensor".into()],
        placed: 2,
        running: 1,
        devices: vec![
            Placed {
                device: "gw-1".into(),
                online: true,
                workloads: vec![PlacedState {
                    workload: "sensor".into(),
                    state: "running".into(),
                }],
            },
            Placed {
                device: "gw-2".into(),
                online: false,
                workloads: vec![PlacedState {
                    workload: "sensor".into(),
                    state: "pending".into(),
                }],
            },
        ],
    }
}

fn audit_rows() -> Vec<AuditEntry> {
    vec![
        AuditEntry {
            at: NOW - 60,
            who: "ops-us".into(),
            action: "denied".into(),
            detail: "ops-us is limited to us-east; device gw-dub-0001 reaches eu-west".into(),
        },
        AuditEntry {
            at: NOW - 900,
            who: "admin".into(),
            action: "apply".into(),
            detail: "sensor revision 3".into(),
        },
    ]
}

/// Every page the console renders, by snapshot name.
fn pages() -> Vec<(&'static str, String)> {
    let admin = frame("admin");
    let viewer = frame("viewer");
    let mut scoped = frame("operator");
    let scope = ["eu-west".to_owned()];
    scoped.regions = Some(&scope);
    let mut stream = Stream {
        stream: "metrics".into(),
        content_type: Some("metrics".into()),
        records: 120,
        gaps: 1,
        ..Stream::default()
    };
    stream.metrics.insert("temp_c".into(), 21.5);
    stream
        .points
        .insert("temp_c".into(), vec![20.0, 20.5, 21.0, 21.5, 21.2]);
    let why = vec![
        (
            "sensor".to_owned(),
            "running release sensor 1.5.0".to_owned(),
        ),
        (
            "uplink".to_owned(),
            "backing off after exit code 2".to_owned(),
        ),
        (
            "camera".to_owned(),
            "not placed: deployment camera targets label site=plant-9".to_owned(),
        ),
    ];
    let q = DeviceQuery {
        region: "eu-west".into(),
        state: "failing".into(),
        sort: "last_seen".into(),
        desc: true,
        page: 1,
        ..DeviceQuery::default()
    };
    let diff = Diff {
        from: 2,
        to: 3,
        changes: vec!["workload sensor: release sensor@1.4.0 -> sensor@1.5.0".into()],
        unified: "--- revision 2\n+++ revision 3\n@@ -3 +3 @@\n-release = \"sensor@1.4.0\"\n+release = \"sensor@1.5.0\"\n".into(),
    };
    let release = Release {
        name: "sensor".into(),
        version: "1.5.0".into(),
        epoch: 1,
        digest: "ef".repeat(32),
        artifact: "01".repeat(32),
        size: 40_960,
        created_at: NOW - 7200,
        precompiled: vec!["x86_64".into(), "aarch64".into()],
    };
    vec![
        (
            "login",
            views::login(CSRF, Some("Not logged in: unknown token")).into_string(),
        ),
        (
            "overview-health",
            views::overview(&scoped, &summary(), &rollout_rows(), Colouring::Health).into_string(),
        ),
        (
            "overview-version",
            views::overview(&admin, &summary(), &rollout_rows(), Colouring::Version).into_string(),
        ),
        (
            "devices",
            views::devices(&admin, &[device()], 120, &q, None).into_string(),
        ),
        (
            "device",
            views::device(&admin, &device(), &why, &[stream], Some(&audit_rows())).into_string(),
        ),
        (
            "releases",
            views::releases(&viewer, std::slice::from_ref(&release)).into_string(),
        ),
        (
            "release",
            views::release(&viewer, &release, Some(12)).into_string(),
        ),
        (
            "deployments-refused",
            views::deployments(
                &admin,
                &[deployment()],
                true,
                Some(&ApplyOutcome::Refused(
                    "spec: line 3: unknown field `relase`".into(),
                )),
                "[deployment]\nname = \"sensor\"\nrelase = 1\n",
            )
            .into_string(),
        ),
        (
            "deployment-diff",
            views::deployment(&admin, &deployment(), None, Some(&diff)).into_string(),
        ),
        (
            "rollouts",
            views::rollouts(&admin, &rollout_rows()).into_string(),
        ),
        (
            "rollout-operator",
            views::rollout(
                &admin,
                &rollout("awaiting approval for wave 3", false),
                &report(),
                true,
                None,
            )
            .into_string(),
        ),
        (
            "rollout-viewer",
            views::rollout(
                &viewer,
                &rollout("wave 2 of 3", true),
                &report(),
                false,
                None,
            )
            .into_string(),
        ),
        (
            "audit",
            views::audit(
                &admin,
                &audit_rows(),
                &AuditQuery {
                    action: "denied".into(),
                    ..AuditQuery::default()
                },
            )
            .into_string(),
        ),
        (
            "problem",
            views::problem(
                &scoped,
                "/devices",
                403,
                "ops-eu is limited to eu-west; device gw-nyc-1 reaches us-east",
            )
            .into_string(),
        ),
    ]
}

fn snapshot(name: &str) -> ExpectFile {
    // expect_file! takes a literal path relative to this file; one file per page.
    match name {
        "login" => expect_file!["snapshots/login.html"],
        "overview-health" => expect_file!["snapshots/overview-health.html"],
        "overview-version" => expect_file!["snapshots/overview-version.html"],
        "devices" => expect_file!["snapshots/devices.html"],
        "device" => expect_file!["snapshots/device.html"],
        "releases" => expect_file!["snapshots/releases.html"],
        "release" => expect_file!["snapshots/release.html"],
        "deployments-refused" => expect_file!["snapshots/deployments-refused.html"],
        "deployment-diff" => expect_file!["snapshots/deployment-diff.html"],
        "rollouts" => expect_file!["snapshots/rollouts.html"],
        "rollout-operator" => expect_file!["snapshots/rollout-operator.html"],
        "rollout-viewer" => expect_file!["snapshots/rollout-viewer.html"],
        "audit" => expect_file!["snapshots/audit.html"],
        "problem" => expect_file!["snapshots/problem.html"],
        other => panic!("no snapshot for page {other}"),
    }
}

/// Line breaks between tags, so a snapshot diff shows the element that changed rather than one long line.
fn pretty(html: &str) -> String {
    html.replace("><", ">\n<") + "\n"
}

#[test]
fn every_page_matches_its_snapshot() {
    for (name, html) in pages() {
        snapshot(name).assert_eq(&pretty(&html));
    }
}

#[test]
fn no_page_has_inline_script_or_style() {
    for (name, html) in pages() {
        assert!(
            !html.contains("<script>") && !html.contains("<style"),
            "{name}: inline script or style"
        );
        assert!(
            !html.contains(" style=\""),
            "{name}: a style attribute (the CSP refuses them)"
        );
        assert!(
            !html.contains(" onclick=") && !html.contains(" onload="),
            "{name}: an inline event handler"
        );
        for script in html.match_indices("<script") {
            let tag = &html[script.0
                ..html[script.0..]
                    .find('>')
                    .map_or(html.len(), |e| script.0 + e)];
            assert!(
                tag.contains("src=\"/static/"),
                "{name}: script without a same-origin src: {tag}"
            );
        }
    }
}

#[test]
fn every_state_changing_form_carries_the_csrf_token() {
    for (name, html) in pages() {
        for (at, _) in html.match_indices("method=\"post\"") {
            let end = html[at..].find("</form>").map_or(html.len(), |e| at + e);
            let form = &html[at..end];
            assert!(
                form.contains(&format!("name=\"csrf\" value=\"{CSRF}\"")),
                "{name}: a POST form without the CSRF token: {form}"
            );
        }
    }
}

#[test]
fn a_viewer_sees_no_action_buttons_and_an_operator_does() {
    let pages = pages();
    let get = |n: &str| {
        pages
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, h)| h.clone())
            .unwrap_or_default()
    };
    let viewer = get("rollout-viewer");
    for action in ["pause", "resume", "approve", "abort"] {
        assert!(
            !viewer.contains(&format!("/rollouts/sensor/{action}")),
            "viewer page offers {action}"
        );
    }
    let op = get("rollout-operator");
    for action in ["pause", "approve", "abort"] {
        assert!(
            op.contains(&format!("action=\"/rollouts/sensor/{action}\"")),
            "operator page lacks {action}"
        );
    }
    assert!(
        op.contains(views::ABORT_TEXT),
        "Abort is explained in a sentence"
    );
    assert!(
        !get("releases").contains("Apply"),
        "nothing to apply on the viewer's releases page"
    );
}

#[test]
fn text_from_devices_is_escaped() {
    let mut d = device();
    d.workloads[0].last_error = Some("<script>alert(1)</script>".into());
    d.labels.insert("x\"><img src=x>".into(), "1".into());
    let html = views::device(&frame("admin"), &d, &[], &[], None).into_string();
    assert!(
        !html.contains("<script>alert"),
        "a device's error text must not become markup"
    );
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!html.contains("<img src=x>"));
}

#[test]
fn device_list_links_keep_the_filters() {
    let q = DeviceQuery {
        region: "eu west".into(),
        label: "site=plant-7".into(),
        ..DeviceQuery::default()
    };
    assert_eq!(
        q.to_query("zone", true, 2),
        "region=eu%20west&label=site%3Dplant-7&sort=zone&desc=true&page=2"
    );
    assert_eq!(DeviceQuery::default().to_query("", false, 0), "");
}

#[test]
fn times_and_durations_read_plainly() {
    let cases = [
        (0, "0 s ago"),
        (59, "59 s ago"),
        (61, "1 min ago"),
        (7200, "2 h ago"),
        (200_000, "2 d ago"),
    ];
    for (d, want) in cases {
        assert_eq!(views::ago(NOW, NOW - d), want);
    }
    assert_eq!(views::when(0), "1970-01-01 00:00:00Z");
    assert_eq!(views::duration(125), "2 min 05 s");
    assert_eq!(views::duration(3720), "1 h 02 min");
}

#[test]
fn wave_progress_counts_each_status_into_one_segment() {
    let d = |s: Option<&str>| WaveDevice {
        device: "d".into(),
        status: s.map(str::to_owned),
        ..WaveDevice::default()
    };
    let devices: Vec<WaveDevice> = [
        Some("healthy"),
        Some("skipped"),
        Some("updating"),
        Some("held"),
        Some("undetermined"),
        Some("failed"),
        Some("rolled-back"),
        Some("blocked"),
        Some("pending"),
        Some("waiting-for-window"),
        Some("waiting-for-budget"),
        None,
    ]
    .into_iter()
    .map(d)
    .collect();
    assert_eq!(
        WaveProgress::of(&devices),
        WaveProgress {
            pending: 4,
            updating: 1,
            healthy: 2,
            failed: 3,
            held: 2
        }
    );
}
