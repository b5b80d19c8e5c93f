//! The Sparkplug B feed (`serve --sparkplug`) read by an independent decoder: pysparkplug (Python, its own code
//! generated from the Eclipse Tahu `.proto`) subscribes with a region's feed credential, and the test checks the
//! birth, data and death rules over what it decoded: births with sequence 0 and a `bdSeq`, data in sequence with
//! metrics their birth declared, a death with its birth's `bdSeq` when the device dies (`kill -9`: the broker's
//! last will), the next birth one `bdSeq` later, QoS 0 births and data and QoS 1 deaths, one region only, and a
//! host application's rebirth request (NCMD) answered with a birth.

use flotilla_fleet_tests::{AgentSpec, ChildLines, FleetBuilder, PATIENCE, firmware, wait_for};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/sparkplug_sub.py")
}

/// The Sparkplug rules over one node's decoded messages, from its first birth or death on. Returns the `count`
/// values its data carried.
fn check_rules(msgs: &[Value]) -> Vec<u64> {
    let start = msgs
        .iter()
        .position(|m| m["kind"] == "NBIRTH" || m["kind"] == "NDEATH")
        .expect("a birth or death");
    let mut birth: Option<&Value> = None;
    let mut last_death_bd: Option<u64> = None;
    let mut next_seq = 0u64;
    let mut counts = Vec::new();
    for m in &msgs[start..] {
        assert!(m.get("error").is_none(), "undecodable: {m}");
        match m["kind"].as_str() {
            Some("NBIRTH") => {
                assert_eq!(
                    (m["seq"].as_u64(), m["qos"].as_u64()),
                    (Some(0), Some(0)),
                    "{m}"
                );
                let bd = m["metrics"]
                    .as_array()
                    .and_then(|ms| ms.iter().find(|x| x["name"] == "bdSeq"))
                    .and_then(|x| x["value"].as_u64())
                    .expect("bdSeq in the birth");
                if let Some(d) = last_death_bd.take() {
                    assert_eq!(bd, (d + 1) % 256, "a new session after a death: {m}");
                }
                assert!(
                    m["metrics"]
                        .as_array()
                        .is_some_and(|ms| ms.iter().any(|x| x["name"] == "Node Control/Rebirth")),
                    "{m}"
                );
                birth = Some(m);
                next_seq = 1;
            }
            Some("NDATA") => {
                let b = birth.expect("data only after a birth");
                assert_eq!(
                    (m["seq"].as_u64(), m["qos"].as_u64()),
                    (Some(next_seq), Some(0)),
                    "{m}"
                );
                next_seq = (next_seq + 1) % 256;
                for x in m["metrics"].as_array().expect("metrics") {
                    let declared = b["metrics"]
                        .as_array()
                        .and_then(|ms| ms.iter().find(|d| d["name"] == x["name"]))
                        .unwrap_or_else(|| panic!("{x} not declared by the birth {b}"));
                    assert_eq!(declared["datatype"], x["datatype"], "{x}");
                    if x["name"] == "count" {
                        assert_eq!(x["datatype"], "UINT64", "{x}");
                        counts.push(x["value"].as_u64().expect("count"));
                    }
                }
            }
            Some("NDEATH") => {
                assert_eq!(m["qos"].as_u64(), Some(1), "{m}");
                let bd = m["bd_seq"].as_u64().expect("bdSeq in the death");
                if let Some(b) = birth.take() {
                    let born = b["metrics"]
                        .as_array()
                        .and_then(|ms| ms.iter().find(|x| x["name"] == "bdSeq"))
                        .and_then(|x| x["value"].as_u64());
                    assert_eq!(Some(bd), born, "a death names its birth's bdSeq");
                }
                last_death_bd = Some(bd);
            }
            other => panic!("unexpected message kind {other:?}: {m}"),
        }
    }
    counts
}

#[test]
fn sparkplug_births_data_and_deaths_decode_with_an_independent_decoder() {
    let mut fleet = FleetBuilder::new()
        .hub_args(&["--sparkplug"])
        .agent(AgentSpec::new("eu-1", "eu-west", 52.52, 13.40))
        .agent(AgentSpec::new("us-1", "us-east", 40.71, -74.00))
        .start()
        .expect("fleet starts");
    let hub = &fleet.hub;
    hub.push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    hub.apply(
        "name = \"sensors\"\n[placement]\npolicy = \"every\"\n[[workloads]]\nname = \"sensor\"\n\
         release = \"sensor@1.0.0\"\ntick_ms = 100\nmemory_mib = 4\ncpu_ms = 20\n\
         telemetry = { count = \"u64le\" }\n",
    )
    .expect("apply");
    for d in ["eu-1", "us-1"] {
        hub.wait_workload(d, "sensor", "running").expect("running");
    }
    let (user, password, client_id) = hub
        .feed_credential("scada", &["eu-west"])
        .expect("feed credential");
    let port = hub.mqtt_port.to_string();
    let sub = ChildLines::spawn(Command::new("python3").arg(script()).args([
        "127.0.0.1",
        &port,
        &user,
        &password,
        &client_id,
        "spBv1.0/eu-west/#",
        "spBv1.0/us-east/#",
        // As a host application that starts after the nodes: ask for births (the second is not its region).
        "rebirth:spBv1.0/eu-west/NCMD/eu-1",
        "rebirth:spBv1.0/us-east/NCMD/us-1",
    ]));
    let mut msgs: Vec<Value> = Vec::new();
    let read = |msgs: &mut Vec<Value>, until: &dyn Fn(&[Value]) -> bool| {
        wait_for("Sparkplug messages", PATIENCE, || {
            while let Ok(l) = sub.rx.try_recv() {
                msgs.push(serde_json::from_str(&l).expect("JSON line"));
            }
            until(msgs).then_some(())
        })
        .expect("messages");
    };
    // Data flows; then the device dies without a goodbye and comes back.
    read(&mut msgs, &|m| {
        let after_birth = m.iter().skip_while(|x| x["kind"] != "NBIRTH");
        after_birth.filter(|x| x["kind"] == "NDATA").count() >= 5
    });
    let agent = fleet.agent_mut("eu-1");
    agent.kill9();
    read(&mut msgs, &|m| m.iter().any(|x| x["kind"] == "NDEATH"));
    agent.start().expect("restart");
    read(&mut msgs, &|m| {
        let after = m.iter().skip_while(|x| x["kind"] != "NDEATH").skip(1);
        after.filter(|x| x["kind"] == "NDATA").count() >= 3
    });

    // The subscription to us-east was refused (not the credential's region): nothing from us-east arrives.
    let nodes: Vec<&str> = msgs.iter().filter_map(|m| m["node"].as_str()).collect();
    assert!(nodes.iter().all(|n| *n == "eu-1"), "{nodes:?}");
    assert!(msgs.iter().all(|m| m["group"] == "eu-west"), "{msgs:?}");
    // The rebirth request was answered with a birth before the kill, so the rules cover the session the
    // subscriber joined, the death and the next session.
    let first = |kind: &str| msgs.iter().position(|m| m["kind"] == kind);
    assert!(
        matches!((first("NBIRTH"), first("NDEATH")), (Some(b), Some(d)) if b < d),
        "{msgs:?}"
    );
    let counts = check_rules(&msgs);
    assert!(counts.len() >= 8, "{counts:?}");
    // The counter restarts with the workload after the kill; within each run it only goes up.
    let drops = counts.windows(2).filter(|w| w[1] < w[0]).count();
    assert!(drops <= 1, "{counts:?}");
}
