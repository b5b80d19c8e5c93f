//! Data-driven placement tests: each policy, N-per-region failover, constraints, geofences and determinism.

use flotilla_hub_core::placement::spread_quotas;
use flotilla_hub_core::{Constraints, DeviceView, Excluded, Policy, Target, place};
use flotilla_shared::DeviceId;
use flotilla_shared::wire::{Geofence, LatLon, WorkloadKind};
use std::collections::{BTreeMap, BTreeSet};

const NOW: u64 = 10_000;

/// `id region zone lat lon [offline:SECS] [arch:X] [mem:N] [role:R]`
fn fleet(spec: &str) -> Vec<DeviceView> {
    spec.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let mut d = DeviceView {
                id: DeviceId::new(w[0]).expect("id"),
                labels: BTreeMap::from([("role".to_owned(), "sensor".to_owned())]),
                region: Some(w[1].to_owned()),
                zone: Some(w[2].to_owned()),
                location: Some(LatLon {
                    lat: w[3].parse().expect("lat"),
                    lon: w[4].parse().expect("lon"),
                }),
                arch: "x86_64".into(),
                runtimes: vec![WorkloadKind::Wasm],
                memory_mib: 512,
                online: true,
                offline_since: None,
            };
            for opt in &w[5..] {
                let (k, v) = opt.split_once(':').expect("k:v");
                match k {
                    "offline" => {
                        d.online = false;
                        d.offline_since = Some(NOW - v.parse::<u64>().expect("secs"));
                    }
                    "arch" => d.arch = v.into(),
                    "mem" => d.memory_mib = v.parse().expect("mem"),
                    "role" => {
                        d.labels.insert("role".into(), v.into());
                    }
                    _ => panic!("unknown option {k}"),
                }
            }
            d
        })
        .collect()
}

const FLEET: &str = "
    eu-1 eu-west a 52.52 13.40
    eu-2 eu-west b 52.50 13.30
    eu-3 eu-west b 48.13 11.58 role:camera
    us-1 us-east a 40.71 -74.00
    us-2 us-east a 42.36 -71.05 offline:30
    us-3 us-east b 38.90 -77.03 offline:900
    ap-1 ap-south a 1.35 103.81 arch:aarch64
    ap-2 ap-south a 1.30 103.85 mem:32
";

fn ids(s: &BTreeSet<DeviceId>) -> String {
    s.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(" ")
}

fn run(target: Target, policy: Policy, constraints: Constraints, previous: &[&str]) -> String {
    let prev: BTreeSet<DeviceId> = previous
        .iter()
        .map(|p| DeviceId::new(*p).expect("id"))
        .collect();
    let p = place(&fleet(FLEET), &target, &policy, &constraints, &prev, NOW);
    ids(&p.chosen)
}

fn sensors() -> Target {
    Target {
        selector: BTreeMap::from([("role".into(), "sensor".into())]),
        ..Target::default()
    }
}

/// (name, target, policy, constraints, previously chosen, expected choice)
type Case = (
    &'static str,
    Target,
    Policy,
    Constraints,
    Vec<&'static str>,
    &'static str,
);

/// Each policy against the same fleet, with the expected choice.
#[test]
fn policies() {
    let per_region = Policy::PerRegion {
        count: 1,
        grace_secs: 60,
    };
    let cases: Vec<Case> = vec![
        (
            "every sensor",
            sensors(),
            Policy::Every,
            Constraints::default(),
            vec![],
            "ap-1 ap-2 eu-1 eu-2 us-1 us-2 us-3",
        ),
        (
            "every in eu-west",
            Target {
                regions: vec!["eu-west".into()],
                ..Target::default()
            },
            Policy::Every,
            Constraints::default(),
            vec![],
            "eu-1 eu-2 eu-3",
        ),
        (
            "one per region",
            sensors(),
            per_region.clone(),
            Constraints::default(),
            vec![],
            "ap-1 eu-1 us-1",
        ),
        // Sticky: a previously chosen, online device keeps the placement.
        (
            "sticky",
            sensors(),
            per_region.clone(),
            Constraints::default(),
            vec!["eu-2", "us-1"],
            "ap-1 eu-2 us-1",
        ),
        // us-2 is offline but within the 60 s grace: it keeps its placement.
        (
            "within grace",
            sensors(),
            per_region.clone(),
            Constraints::default(),
            vec!["us-2"],
            "ap-1 eu-1 us-2",
        ),
        // us-3 has been offline for 900 s: another healthy device of the region takes over.
        (
            "failover",
            sensors(),
            per_region,
            Constraints::default(),
            vec!["us-3"],
            "ap-1 eu-1 us-1",
        ),
        (
            "two nearest to Berlin",
            sensors(),
            Policy::Nearest {
                k: 2,
                point: LatLon {
                    lat: 52.52,
                    lon: 13.40,
                },
            },
            Constraints::default(),
            vec![],
            "eu-1 eu-2",
        ),
        (
            "spread 2:1 over zones a and b",
            sensors(),
            Policy::Spread {
                count: 3,
                weights: BTreeMap::from([("a".into(), 2), ("b".into(), 1)]),
            },
            Constraints::default(),
            vec![],
            "ap-1 ap-2 eu-2",
        ),
        (
            "arch and memory constraints",
            sensors(),
            Policy::Every,
            Constraints {
                arch: Some("x86_64".into()),
                runtime: Some(WorkloadKind::Wasm),
                min_memory_mib: 64,
            },
            vec![],
            "eu-1 eu-2 us-1 us-2 us-3",
        ),
        (
            "container runtime nobody has",
            sensors(),
            Policy::Every,
            Constraints {
                runtime: Some(WorkloadKind::Container),
                ..Constraints::default()
            },
            vec![],
            "",
        ),
        (
            "geofence around Berlin",
            Target {
                geofence: Some(Geofence::Circle {
                    center: LatLon {
                        lat: 52.51,
                        lon: 13.35,
                    },
                    radius_m: 20_000.0,
                }),
                ..Target::default()
            },
            Policy::Every,
            Constraints::default(),
            vec![],
            "eu-1 eu-2",
        ),
    ];
    for (name, target, policy, constraints, prev, want) in cases {
        assert_eq!(run(target, policy, constraints, &prev), want, "{name}");
    }
}

/// Every device that is not chosen gets a reason, and the reasons name the rule.
#[test]
fn exclusion_reasons() {
    let target = Target {
        regions: vec!["eu-west".into(), "ap-south".into()],
        ..sensors()
    };
    let c = Constraints {
        arch: Some("x86_64".into()),
        min_memory_mib: 64,
        ..Constraints::default()
    };
    let p = place(
        &fleet(FLEET),
        &target,
        &Policy::PerRegion {
            count: 1,
            grace_secs: 0,
        },
        &c,
        &BTreeSet::new(),
        NOW,
    );
    let got: Vec<String> = p
        .excluded
        .iter()
        .map(|(d, why)| format!("{d}={why:?}"))
        .collect();
    assert_eq!(
        got,
        vec![
            "ap-1=Arch",
            "ap-2=Memory",
            "eu-2=NotChosen",
            "eu-3=Label(\"role\")",
            "us-1=Region",
            "us-2=Region",
            "us-3=Region"
        ]
    );
    assert_eq!(
        p.excluded.get(&DeviceId::new("eu-1").expect("id")),
        None::<&Excluded>
    );
}

/// Placement does not depend on the order devices are listed in, and is stable across calls.
#[test]
fn deterministic() {
    let mut devices = fleet(FLEET);
    let policy = Policy::Spread {
        count: 4,
        weights: BTreeMap::from([("a".into(), 1), ("b".into(), 1)]),
    };
    let first = place(
        &devices,
        &sensors(),
        &policy,
        &Constraints::default(),
        &BTreeSet::new(),
        NOW,
    );
    devices.reverse();
    let second = place(
        &devices,
        &sensors(),
        &policy,
        &Constraints::default(),
        &BTreeSet::new(),
        NOW,
    );
    assert_eq!(first, second);
    devices.rotate_left(3);
    assert_eq!(
        first,
        place(
            &devices,
            &sensors(),
            &policy,
            &Constraints::default(),
            &BTreeSet::new(),
            NOW
        )
    );
}

/// Largest-remainder quotas sum to the count and follow the weights.
#[test]
fn quotas() {
    let w = BTreeMap::from([
        ("a".to_owned(), 1),
        ("b".to_owned(), 1),
        ("c".to_owned(), 1),
    ]);
    assert_eq!(
        spread_quotas(4, &w).values().copied().collect::<Vec<_>>(),
        vec![2, 1, 1]
    );
    let w = BTreeMap::from([("a".to_owned(), 3), ("b".to_owned(), 1)]);
    assert_eq!(
        spread_quotas(8, &w).values().copied().collect::<Vec<_>>(),
        vec![6, 2]
    );
    assert!(spread_quotas(5, &BTreeMap::new()).is_empty());
}
