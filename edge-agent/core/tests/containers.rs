//! Container decisions, data-driven: adopt / start / create / remove, orphans, and the allow-list.

use flotilla_agent_core::containers::{
    AllowList, Bring, Found, allowed, bring_up, container_name, orphans, spec_hash,
};
use flotilla_shared::wire::{
    ContainerSpec, HealthRule, NetworkMode, Resources, RestartPolicy, UpdateStrategy, WorkloadKind,
    WorkloadSpec,
};
use flotilla_shared::{Digest, WorkloadName};
use std::collections::BTreeSet;

fn spec(network: NetworkMode, devices: &[&str], caps: &[&str]) -> WorkloadSpec {
    WorkloadSpec {
        name: WorkloadName::new("web").expect("name"),
        kind: WorkloadKind::Container,
        release: Digest([1; 32]),
        config: vec![],
        resources: Resources {
            memory_mib: 64,
            cpu_ms: 100,
        },
        restart: RestartPolicy::Always,
        health: HealthRule::RunningFor(1),
        tick_ms: 0,
        geofence: None,
        secrets: vec![],
        container: Some(Box::new(ContainerSpec {
            command: vec![],
            env: vec![],
            config_path: "/etc/flotilla/config".into(),
            cpus_milli: 0,
            pids: 256,
            ports: vec![],
            volumes: vec![],
            devices: devices.iter().map(|d| (*d).to_owned()).collect(),
            capabilities: caps.iter().map(|c| (*c).to_owned()).collect(),
            network,
            read_only: true,
            user: None,
            health: None,
            stop_timeout_secs: 10,
            update_strategy: UpdateStrategy::DownloadThenKill,
            log_max_bytes: 10 << 20,
        })),
    }
}

fn found(name: &str, workload: &str, running: bool) -> Found {
    Found {
        name: name.into(),
        workload: workload.into(),
        spec_hash: name.rsplit('_').next().unwrap_or_default().into(),
        running,
    }
}

#[test]
fn bring_up_decides_from_name_and_state_only() {
    let want = "flotilla_web_aaaaaaaaaaaa";
    let cases: Vec<(&str, Vec<Found>, Vec<&str>, Bring)> = vec![
        ("nothing there", vec![], vec![], Bring::Create),
        (
            "running: adopt",
            vec![found(want, "web", true)],
            vec![],
            Bring::Adopt,
        ),
        (
            "exited: start as is",
            vec![found(want, "web", false)],
            vec![],
            Bring::StartExisting,
        ),
        (
            "an old spec of the same workload is removed",
            vec![found("flotilla_web_bbbbbbbbbbbb", "web", true)],
            vec!["flotilla_web_bbbbbbbbbbbb"],
            Bring::Create,
        ),
        (
            "other workloads are not touched",
            vec![
                found("flotilla_db_cccccccccccc", "db", true),
                found(want, "web", true),
            ],
            vec![],
            Bring::Adopt,
        ),
    ];
    for (what, f, remove, bring) in cases {
        let (r, b) = bring_up("web", want, &f);
        assert_eq!(r, remove, "{what}");
        assert_eq!(b, bring, "{what}");
    }
}

#[test]
fn orphans_are_everything_not_kept() {
    let keep = ["flotilla_web_aaaaaaaaaaaa".to_owned()].into();
    let f = vec![
        found("flotilla_web_aaaaaaaaaaaa", "web", true),
        found("flotilla_web_bbbbbbbbbbbb", "web", false),
        found("flotilla_gone_cccccccccccc", "gone", true),
    ];
    assert_eq!(
        orphans(&keep, &f),
        vec!["flotilla_web_bbbbbbbbbbbb", "flotilla_gone_cccccccccccc"]
    );
}

#[test]
fn spec_hash_changes_with_the_spec() {
    let a = spec(NetworkMode::Bridge, &[], &[]);
    let mut b = a.clone();
    assert_eq!(spec_hash("gw-1", &a), spec_hash("gw-1", &b));
    assert_ne!(spec_hash("gw-1", &a), spec_hash("gw-2", &a), "per device");
    b.container.as_mut().expect("c").pids = 100;
    assert_ne!(spec_hash("gw-1", &a), spec_hash("gw-1", &b));
    let h = spec_hash("gw-1", &a);
    assert_eq!(h.len(), 12);
    assert_eq!(container_name(&a.name, &h), format!("flotilla_web_{h}"));
}

#[test]
fn allow_list_names_the_side_that_said_no() {
    let allow = AllowList {
        host_network: false,
        devices: vec!["/dev/ttyUSB0".into()],
        capabilities: vec!["NET_BIND_SERVICE".into()],
    };
    let cases: Vec<(WorkloadSpec, Option<&str>)> = vec![
        (spec(NetworkMode::Bridge, &[], &[]), None),
        (
            spec(NetworkMode::None, &["/dev/ttyUSB0"], &["NET_BIND_SERVICE"]),
            None,
        ),
        (
            spec(NetworkMode::Host, &[], &[]),
            Some("allow_host_network"),
        ),
        (
            spec(NetworkMode::Bridge, &["/dev/mem"], &[]),
            Some("allow_devices"),
        ),
        (
            spec(NetworkMode::Bridge, &[], &["SYS_ADMIN"]),
            Some("allow_capabilities"),
        ),
    ];
    for (s, want) in cases {
        match (allowed(&s, &allow), want) {
            (Ok(()), None) => {}
            (Err(e), Some(key)) => {
                assert!(e.contains(key) && e.contains("allow-list"), "{e}")
            }
            (got, want) => panic!("{got:?} where {want:?} was expected"),
        }
    }
}

#[test]
fn images_keep_current_previous_and_in_use() {
    use flotilla_agent_core::containers::{ImageGc, LoadedImage, images_to_remove};
    let l = |w: &str, i: &str, t: u64| LoadedImage {
        workload: w.into(),
        image: i.into(),
        loaded_at: t,
    };
    let loaded = vec![
        l("web", "sha256:a", 1),
        l("web", "sha256:b", 2),
        l("web", "sha256:c", 3),
        l("web", "sha256:d", 4),
        l("db", "sha256:a", 5),
        l("db", "sha256:x", 1),
    ];
    let at_once = ImageGc {
        now: 100,
        keep_secs: 0,
        disk_high: false,
    };
    let both: BTreeSet<String> = ["web".to_owned(), "db".to_owned()].into();
    let web: BTreeSet<String> = ["web".to_owned()].into();
    // (workloads on the device, in use, policy, what goes: oldest first)
    type Case<'a> = (&'a BTreeSet<String>, Vec<&'a str>, ImageGc, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        // web keeps d, c; db keeps a, x; so b goes (a is kept by db).
        (&both, vec![], at_once, vec!["sha256:b"]),
        // A last good version still naming b keeps it.
        (&both, vec!["sha256:b"], at_once, vec![]),
        // db removed from the device: its images go unless web keeps them; a was loaded last at 5 (for db).
        (
            &web,
            vec![],
            at_once,
            vec!["sha256:x", "sha256:b", "sha256:a"],
        ),
        // Kept for 97 s: only images loaded at or before 3 go.
        (
            &web,
            vec![],
            ImageGc {
                keep_secs: 97,
                ..at_once
            },
            vec!["sha256:x", "sha256:b"],
        ),
        // Kept for an hour: nothing is old enough...
        (
            &web,
            vec![],
            ImageGc {
                keep_secs: 3600,
                ..at_once
            },
            vec![],
        ),
        // ...unless the disk is above its watermark; current and previous stay even then.
        (
            &web,
            vec![],
            ImageGc {
                keep_secs: 3600,
                disk_high: true,
                ..at_once
            },
            vec!["sha256:x", "sha256:b", "sha256:a"],
        ),
    ];
    for (i, (workloads, in_use, gc, want)) in cases.into_iter().enumerate() {
        let in_use = in_use.into_iter().map(str::to_owned).collect();
        assert_eq!(
            images_to_remove(&loaded, workloads, &in_use, gc),
            want,
            "case {i}"
        );
    }
    assert!(images_to_remove(&[], &both, &Default::default(), at_once).is_empty());
}
