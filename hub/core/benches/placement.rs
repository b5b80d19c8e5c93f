//! Placement benchmark: 100,000 devices across 20 regions, each policy, median and max of several runs.
//! Run: `cargo bench -p flotilla-hub-core --bench placement`.

use flotilla_hub_core::{Constraints, DeviceView, Policy, Target, place};
use flotilla_shared::DeviceId;
use flotilla_shared::wire::{Geofence, LatLon, WorkloadKind};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

fn fleet(n: usize) -> Vec<DeviceView> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..n)
        .map(|i| DeviceView {
            id: DeviceId::new(format!("dev-{i:06}")).unwrap_or_else(|_| unreachable!()),
            labels: BTreeMap::from([(
                "role".into(),
                if i % 10 == 0 { "camera" } else { "sensor" }.into(),
            )]),
            region: Some(format!("region-{}", i % 20)),
            zone: Some(format!("zone-{}", i % 3)),
            location: Some(LatLon {
                lat: (rnd() % 18000) as f64 / 100.0 - 90.0,
                lon: (rnd() % 36000) as f64 / 100.0 - 180.0,
            }),
            arch: if i % 4 == 0 { "aarch64" } else { "x86_64" }.into(),
            runtimes: vec![WorkloadKind::Wasm],
            memory_mib: 256 + (i % 4) as u32 * 256,
            online: i % 50 != 0,
            offline_since: (i % 50 == 0).then_some(1_000),
        })
        .collect()
}

fn main() {
    let devices = fleet(100_000);
    let target = Target {
        selector: BTreeMap::from([("role".into(), "sensor".into())]),
        geofence: Some(Geofence::Circle {
            center: LatLon { lat: 0.0, lon: 0.0 },
            radius_m: 15_000_000.0,
        }),
        ..Target::default()
    };
    let constraints = Constraints {
        runtime: Some(WorkloadKind::Wasm),
        min_memory_mib: 256,
        ..Constraints::default()
    };
    let policies = [
        ("every", Policy::Every),
        (
            "per-region(5)",
            Policy::PerRegion {
                count: 5,
                grace_secs: 300,
            },
        ),
        (
            "nearest(100)",
            Policy::Nearest {
                k: 100,
                point: LatLon {
                    lat: 52.5,
                    lon: 13.4,
                },
            },
        ),
        (
            "spread(1000)",
            Policy::Spread {
                count: 1000,
                weights: BTreeMap::from([("zone-0".into(), 2), ("zone-1".into(), 1)]),
            },
        ),
    ];
    println!("placement of {} devices (target <= 1 s)", devices.len());
    for (name, policy) in policies {
        let mut times = Vec::new();
        let mut chosen = 0;
        for _ in 0..7 {
            let t = Instant::now();
            let p = place(
                &devices,
                &target,
                &policy,
                &constraints,
                &BTreeSet::new(),
                10_000,
            );
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            chosen = p.chosen.len();
        }
        times.sort_by(f64::total_cmp);
        println!(
            "  {name:<14} median {:>7.1} ms  max {:>7.1} ms  chosen {chosen}",
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
}
