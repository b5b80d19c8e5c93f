//! R3 partition campaign: a seeded storm of partitions, resets and heals across 20 agents while the deployment
//! keeps changing, checked against a history: no lost acknowledgement (the hub's acknowledged generation is
//! committed on the device and the device runs it), no phantom (never above what the hub published), no double
//! application (each generation accepted at most once per agent process), outbox within its cap, and convergence
//! after the last heal.

use flotilla_fleet_tests::{AgentSpec, FleetBuilder, PATIENCE, Rng, firmware, wait_for};
use flotilla_shared::codec;
use flotilla_shared::wire::DesiredState;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn spec(config: u32) -> String {
    format!(
        "name = \"sensors\"\n[target]\nselector = {{ role = \"gateway\" }}\n[[workloads]]\nname = \"sensor\"\n\
         release = \"sensor@1.0.0\"\ntick_ms = 200\nmemory_mib = 4\ncpu_ms = 20\nconfig = {{ round = \"{config}\" }}\n"
    )
}

/// >= 200 seeded faults over 20 agents with 10 deployment changes; history checks and convergence.
#[test]
fn partition_campaign_20_agents() {
    let mut rng = Rng::from_env("partition campaign", 0xc0ff_ee11);
    let regions = ["eu-west", "us-east", "ap-south", "sa-east"];
    let mut builder = FleetBuilder::new().with_proxies();
    for i in 0..20 {
        builder = builder.agent(AgentSpec::new(
            &format!("gw-{i:02}"),
            regions[i % 4],
            10.0,
            10.0,
        ));
    }
    let fleet = builder.start().expect("fleet");
    fleet
        .hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    fleet.hub.apply(&spec(0)).expect("apply");

    let mut faults = 0;
    let mut changes = 0;
    let start = Instant::now();
    while faults < 200 || changes < 10 {
        let a = &fleet.agents[(rng.next_u64() % 20) as usize];
        let proxy = a.proxy.as_ref().expect("proxy");
        match rng.next_u64() % 3 {
            0 => proxy.partition(),
            1 => proxy.reset(),
            _ => proxy.heal(),
        }
        faults += 1;
        if faults % 20 == 0 && changes < 10 {
            changes += 1;
            fleet
                .hub
                .apply(&spec(changes))
                .expect("apply during the storm");
        }
        std::thread::sleep(Duration::from_millis(rng.next_u64() % 60));
    }
    for a in &fleet.agents {
        a.proxy.as_ref().expect("proxy").heal();
    }
    let healed = Instant::now();
    println!(
        "{faults} faults and {changes} deployment changes in {:?}",
        healed - start
    );

    // Convergence: every device acknowledges its latest desired generation and runs the workload.
    for a in &fleet.agents {
        wait_for(&format!("{} converges", a.spec.id), PATIENCE, || {
            let d = fleet.hub.device(&a.spec.id)?;
            (d["applied_generation"] == d["desired_generation"]
                && d["workloads"][0]["state"] == "running")
                .then_some(())
        })
        .expect("converged");
    }
    println!("converged {:?} after the last heal", healed.elapsed());

    // History checks.
    for a in &fleet.agents {
        let d = fleet.hub.device(&a.spec.id).expect("device");
        let (acked, desired) = (
            d["applied_generation"].as_u64().unwrap_or(0),
            d["desired_generation"].as_u64().unwrap_or(0),
        );
        assert!(
            acked <= desired,
            "{}: phantom acknowledgement {acked} > published {desired}",
            a.spec.id
        );
        let store = flotilla_agent::store::Store::open(&a.state_dir()).expect("agent db");
        assert!(store.integrity_ok());
        let committed = store
            .desired()
            .expect("read")
            .map(|s| {
                codec::decode_exact::<DesiredState>(&s.body)
                    .expect("decode")
                    .generation
            })
            .unwrap_or(0);
        assert!(
            acked <= committed,
            "{}: lost acknowledgement: hub has {acked}, device committed {committed}",
            a.spec.id
        );
        let outbox_bytes: u64 = store
            .outbox_peek(100_000)
            .expect("outbox")
            .iter()
            .map(|r| (r.1.len() + r.2.len()) as u64)
            .sum();
        assert!(
            outbox_bytes <= 4 * 1024 * 1024,
            "{}: outbox above its cap",
            a.spec.id
        );
        let mut accepted: BTreeMap<String, u32> = BTreeMap::new();
        for line in a
            .log()
            .lines()
            .filter(|l| l.contains("\"message\":\"desired state accepted\""))
        {
            let g = line
                .split("\"generation\":")
                .nth(1)
                .and_then(|r| r.split([',', '}']).next())
                .unwrap_or("?");
            *accepted.entry(g.to_owned()).or_default() += 1;
        }
        assert!(
            accepted.values().all(|n| *n == 1),
            "{}: a generation applied twice: {accepted:?}",
            a.spec.id
        );
        assert_eq!(
            a.log().matches("artifact verified and cached").count(),
            1,
            "{} downloaded once",
            a.spec.id
        );
    }
}

/// `base` with a custom section of `n` bytes appended: still a valid module, now large enough to need several
/// chunks.
fn padded_wasm(base: &[u8], n: usize) -> Vec<u8> {
    fn leb(mut v: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut payload = vec![3u8];
    payload.extend_from_slice(b"pad");
    payload.resize(payload.len() + n, 0xa5);
    let mut out = base.to_vec();
    out.push(0);
    leb(payload.len(), &mut out);
    out.extend_from_slice(&payload);
    out
}

/// A link that silently drops everything (no reset, no refusal) is noticed through keepalives alone: the hub marks
/// the device offline while its workload keeps running. A deployment made meanwhile arrives after the heal over a
/// slow link (50 kB/s), as a 200 kB artifact fetched in several chunks.
#[test]
fn blackhole_then_slow_link() {
    let fleet = FleetBuilder::new()
        .with_proxies()
        .agent(AgentSpec::new("gw-bh", "eu-west", 10.0, 10.0))
        .start()
        .expect("fleet");
    let one = |version: &str| {
        format!(
            "name = \"sensors\"\n[target]\nselector = {{ role = \"gateway\" }}\n[[workloads]]\nname = \"sensor\"\n\
             release = \"sensor@{version}\"\ntick_ms = 200\nmemory_mib = 4\ncpu_ms = 20\n"
        )
    };
    fleet
        .hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    fleet
        .hub
        .push_release(
            "sensor",
            "2.0.0",
            1,
            &padded_wasm(&firmware("sensor"), 200 * 1024),
        )
        .expect("large release");
    fleet.hub.apply(&one("1.0.0")).expect("apply");
    fleet
        .hub
        .wait_workload("gw-bh", "sensor", "running")
        .expect("running");
    let agent = fleet.agent("gw-bh");
    let proxy = agent.proxy.as_ref().expect("proxy");
    proxy.blackhole();
    let started = Instant::now();
    wait_for("the hub to mark gw-bh offline", PATIENCE, || {
        (fleet.hub.device("gw-bh")?["online"] == false).then_some(())
    })
    .expect("offline through keepalive alone");
    println!("blackhole noticed after {:.1?}", started.elapsed());
    fleet
        .hub
        .apply(&one("2.0.0"))
        .expect("apply while unreachable");
    proxy.set_rate(50_000);
    proxy.heal();
    let healed = Instant::now();
    wait_for("gw-bh on 2.0.0 over the slow link", PATIENCE, || {
        let d = fleet.hub.device("gw-bh")?;
        d["workloads"]
            .as_array()?
            .iter()
            .any(|w| w["name"] == "sensor" && w["state"] == "running" && w["version"] == "2.0.0")
            .then_some(())
    })
    .expect("converged after the heal");
    println!(
        "converged {:.1?} after the heal at 50 kB/s",
        healed.elapsed()
    );
}
