//! R4 crash campaign: 200 seeded `kill -9`s at random points while the agent applies new desired states,
//! downloads artifacts and commits. After every kill: SQLite integrity is ok, every indexed artifact is complete
//! and verified, and the hub never saw a generation acknowledged that the device had not committed. Periodically
//! (and at the end) the device converges on exactly the desired version.

use flotilla_fleet_tests::{AgentSpec, FleetBuilder, PATIENCE, Rng, firmware, wait_for};
use flotilla_shared::Digest;
use flotilla_shared::codec;
use flotilla_shared::wire::DesiredState;

/// A distinct, valid variant of a module: the same code plus a custom section of `pad` bytes (so downloads take
/// several chunks and kills land mid-transfer).
fn variant(base: &[u8], tag: u32, pad: usize) -> Vec<u8> {
    let name = b"flotilla-variant";
    let mut payload = vec![u8::try_from(name.len()).unwrap_or(0)];
    payload.extend_from_slice(name);
    payload.extend_from_slice(&tag.to_le_bytes());
    payload.resize(payload.len() + pad, 0xab);
    let mut out = base.to_vec();
    out.push(0); // custom section id
    let mut n = payload.len();
    loop {
        let byte = u8::try_from(n & 0x7f).unwrap_or(0);
        n >>= 7;
        out.push(if n == 0 { byte } else { byte | 0x80 });
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&payload);
    out
}

fn spec(version: &str) -> String {
    format!(
        "name = \"sensors\"\n[target]\nselector = {{ role = \"gateway\" }}\n[[workloads]]\nname = \"sensor\"\n\
         release = \"sensor@{version}\"\ntick_ms = 100\nmemory_mib = 4\ncpu_ms = 20\n"
    )
}

/// 200 seeded kill -9s during apply, download and commit; integrity, completeness and ack-safety every time.
#[test]
fn crash_campaign_200_kills() {
    let kills: u32 = std::env::var("FLOTILLA_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut rng = Rng::from_env("crash campaign", 0x5eed_f107);
    let mut fleet = FleetBuilder::new()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    let base = firmware("sensor");
    let mut version = String::new();
    for i in 0..kills {
        version = format!("1.0.{i}");
        let bytes = variant(&base, i, 100_000 + (rng.next_u64() % 100_000) as usize);
        fleet
            .hub
            .push_release("sensor", &version, 1, &bytes)
            .expect("release");
        fleet.hub.apply(&spec(&version)).expect("apply");
        std::thread::sleep(std::time::Duration::from_millis(rng.next_u64() % 300));
        // Disjoint field borrows: the agent mutably, the hub for reading.
        let agent = &mut fleet.agents[0];
        agent.kill9();

        let store = flotilla_agent::store::Store::open(&agent.state_dir()).expect("store opens");
        assert!(
            store.quarantined.is_none(),
            "kill {i}: database had to be quarantined"
        );
        assert!(store.integrity_ok(), "kill {i}: integrity check failed");
        let committed = store
            .desired()
            .expect("read")
            .map(|s| {
                codec::decode_exact::<DesiredState>(&s.body)
                    .expect("stored desired decodes")
                    .generation
            })
            .unwrap_or(0);
        let indexed = store.artifacts().expect("artifacts");
        // Garbage collection keeps at most the desired, the running and the previous version.
        assert!(
            indexed.len() <= 3,
            "kill {i}: {} artifacts kept",
            indexed.len()
        );
        for (digest, size) in indexed {
            let bytes = std::fs::read(agent.state_dir().join("artifacts").join(digest.to_hex()))
                .expect("indexed file exists");
            assert_eq!(
                bytes.len() as u64,
                size,
                "kill {i}: partial artifact indexed"
            );
            assert_eq!(
                Digest::of(&bytes),
                digest,
                "kill {i}: indexed artifact does not match its digest"
            );
        }
        drop(store);
        let acked = fleet
            .hub
            .device("gw-1")
            .and_then(|d| d["applied_generation"].as_u64())
            .unwrap_or(0);
        assert!(
            acked <= committed,
            "kill {i}: hub saw generation {acked} acknowledged, device committed {committed}"
        );

        agent.start().expect("restart");
        if i % 25 == 24 {
            converge(&fleet, &version);
        }
    }
    converge(&fleet, &version);
}

/// The device runs exactly the desired version and acknowledges the desired generation.
fn converge(fleet: &flotilla_fleet_tests::Fleet, version: &str) {
    wait_for(&format!("convergence on {version}"), PATIENCE, || {
        let d = fleet.hub.device("gw-1")?;
        let w = &d["workloads"][0];
        (d["applied_generation"] == d["desired_generation"]
            && w["state"] == "running"
            && w["version"] == version)
            .then_some(())
    })
    .expect("converges");
}
