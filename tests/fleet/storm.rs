//! R7 reconnect storm: 500 simulated agents (real MQTT sessions, real signature checks, real signed reports) and 4
//! real agents lose the broker at once while a new deployment is applied, then all reconnect within a few seconds.
//! Pass: the hub and the broker stay up, and every device converges on the new deployment.

use flotilla_fleet_tests::sim::{REGIONS, SimFleet};
use flotilla_fleet_tests::{AgentSpec, BrokerKind, FleetBuilder, PATIENCE, firmware, wait_for};
use flotilla_fleet_tests::{Fleet, proxy::Proxy};
use std::time::Instant;

const SIMULATED: usize = 500;

fn spec(version: &str) -> String {
    let regions = REGIONS.map(|r| format!("\"{r}\"")).join(", ");
    format!(
        "name = \"fleet\"\n[target]\nregions = [{regions}]\n[[workloads]]\nname = \"sensor\"\n\
         release = \"sensor@{version}\"\ntick_ms = 1000\nmemory_mib = 4\ncpu_ms = 20\n"
    )
}

/// Reads one unlabelled-or-labelled sample from the hub's Prometheus text.
fn metric(fleet: &Fleet, name: &str) -> Option<usize> {
    let text = fleet.hub.client.get_text("/metrics").ok()?;
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

fn bulk_tokens(fleet: &Fleet, count: usize) -> Vec<String> {
    let body = serde_json::json!({"count": count, "labels": {"role": "sim"}, "ttl_secs": 600});
    let v = fleet
        .hub
        .client
        .post(
            "/api/v1/enrollment-tokens",
            "application/json",
            body.to_string().as_bytes(),
            &[],
        )
        .expect("bulk tokens");
    v["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect()
}

fn storm(broker: BrokerKind) {
    let mut builder = FleetBuilder::new().broker(broker).with_proxies();
    for (i, region) in REGIONS.iter().take(4).enumerate() {
        builder = builder.agent(AgentSpec::new(&format!("gw-{i}"), region, 10.0, 10.0));
    }
    let mut fleet = builder.start().expect("fleet");
    let total = SIMULATED + fleet.agents.len();
    // One proxy in front of the broker for all simulated agents: cutting it drops all 500 sessions at once.
    let sim_proxy = Proxy::start(("127.0.0.1", fleet.broker_port())).expect("proxy");
    let mut sim = SimFleet::start(&[sim_proxy.port()], bulk_tokens(&fleet, SIMULATED), 2)
        .expect("simulated fleet");
    wait_for("every device online", PATIENCE, || {
        (metric(&fleet, "flotilla_devices{state=\"online\"}")? >= total).then_some(())
    })
    .expect("online");

    fleet
        .hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release 1");
    fleet
        .hub
        .push_release("sensor", "1.0.1", 1, &firmware("sensor"))
        .expect("release 2");
    fleet.hub.apply(&spec("1.0.0")).expect("apply 1");
    for a in &fleet.agents {
        fleet
            .hub
            .wait_workload(&a.spec.id, "sensor", "running")
            .expect("real agent running");
    }
    wait_for("every device converged on 1.0.0", PATIENCE, || {
        (metric(&fleet, "flotilla_devices_converged")? >= total).then_some(())
    })
    .expect("converged 1");

    // The storm: every session dies at once; the broker publishes 504 last wills and the hub marks them offline.
    sim_proxy.partition();
    for a in &fleet.agents {
        a.proxy.as_ref().expect("proxy").partition();
    }
    wait_for("the hub to see every device offline", PATIENCE, || {
        (metric(&fleet, "flotilla_devices{state=\"online\"}")? == 0).then_some(())
    })
    .expect("offline");
    if broker == BrokerKind::Embedded {
        // The broker's own view agrees: only the hub's session is left.
        wait_for(
            "the embedded broker to hold only the hub's session",
            PATIENCE,
            || (metric(&fleet, "flotilla_broker_connections")? == 1).then_some(()),
        )
        .expect("broker connections");
    }
    // A new deployment while everyone is away: it waits in the broker as retained desired states.
    sim.arm();
    fleet.hub.apply(&spec("1.0.1")).expect("apply 2");
    let healed = Instant::now();
    sim_proxy.heal();
    for a in &fleet.agents {
        a.proxy.as_ref().expect("proxy").heal();
    }
    wait_for("every device back online", PATIENCE, || {
        (metric(&fleet, "flotilla_devices{state=\"online\"}")? >= total).then_some(())
    })
    .expect("back online");
    let reconnected = healed.elapsed();
    let mut applied = 0;
    while applied < SIMULATED {
        match sim.next_done(PATIENCE) {
            Some(_) => applied += 1,
            None => {
                panic!("only {applied} of {SIMULATED} simulated agents applied the new deployment")
            }
        }
    }
    for a in &fleet.agents {
        wait_for(&format!("{} on 1.0.1", a.spec.id), PATIENCE, || {
            let d = fleet.hub.device(&a.spec.id)?;
            d["workloads"]
                .as_array()?
                .iter()
                .any(|w| {
                    w["name"] == "sensor" && w["state"] == "running" && w["version"] == "1.0.1"
                })
                .then_some(())
        })
        .expect("real agent on the new release");
    }
    wait_for("every device converged on 1.0.1", PATIENCE, || {
        (metric(&fleet, "flotilla_devices_converged")? >= total).then_some(())
    })
    .expect("converged 2");
    if broker == BrokerKind::Embedded {
        wait_for(
            "every device and the hub to hold a session",
            PATIENCE,
            || (metric(&fleet, "flotilla_broker_connections")? > total).then_some(()),
        )
        .expect("broker connections after the storm");
        assert_eq!(
            metric(
                &fleet,
                "flotilla_broker_messages_dropped_total{reason=\"queue_full\"}"
            ),
            Some(0),
            "the storm dropped nothing"
        );
    }
    println!(
        "R7 {broker:?}: {total} devices reconnected {:.1?} after the heal, converged {:.1?} after it",
        reconnected,
        healed.elapsed()
    );
    // Still up: both processes alive and the API answering.
    let hub_status = fleet.hub.proc.child.try_wait();
    assert!(matches!(hub_status, Ok(None)), "hub exited: {hub_status:?}");
    if let Some(m) = &mut fleet.mosquitto {
        let status = m.proc.child.try_wait();
        assert!(matches!(status, Ok(None)), "mosquitto exited: {status:?}");
    }
    assert!(fleet.hub.client.get("/api/v1/devices").is_ok());
    drop(sim);
}

#[test]
fn reconnect_storm_embedded_broker() {
    storm(BrokerKind::Embedded);
}

#[test]
fn reconnect_storm_mosquitto() {
    storm(BrokerKind::Mosquitto);
}
