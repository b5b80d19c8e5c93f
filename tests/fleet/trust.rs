//! Every trust-model rejection at the agent level, through the real broker: each forged or stale message is
//! refused with its typed reason (visible in the device's report), and the running workload is never disturbed.

use flotilla_fleet_tests::{
    AgentSpec, Fleet, FleetBuilder, PATIENCE, TestClient, firmware, wait_for,
};
use flotilla_shared::codec::{self, Message};
use flotilla_shared::trust::{self, DocType, SigningKey};
use flotilla_shared::wire::{DesiredState, Signed};
use flotilla_shared::{DeviceId, Digest, topics};
use std::time::Duration;

const RUNNING: &[&str] = &["\"message\":\"running\"", "\"workload\":\"sensor\""];

fn spec(release: &str) -> String {
    format!(
        "name = \"sensors\"\n[target]\nselector = {{ role = \"gateway\" }}\n[[workloads]]\nname = \"sensor\"\n\
         release = \"{release}\"\ntick_ms = 200\nmemory_mib = 4\ncpu_ms = 20\n"
    )
}

fn rejection(fleet: &Fleet) -> String {
    fleet
        .hub
        .device("gw-1")
        .and_then(|d| d["rejection"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Injects `payload` on the device's desired topic and waits for the device to report `reason`.
fn expect_rejected(fleet: &Fleet, client: &TestClient, payload: Vec<u8>, reason: &str) {
    client
        .publish(
            &topics::device(
                &DeviceId::new("gw-1").expect("id"),
                topics::DeviceTopic::Desired,
            ),
            payload,
            false,
        )
        .expect("publish");
    wait_for(&format!("rejection {reason}"), PATIENCE, || {
        rejection(fleet).contains(reason).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; last rejection {:?}", rejection(fleet)));
    // The previous desired state keeps running: same single run, still reported running.
    assert_eq!(
        fleet.hub.workload_state("gw-1", "sensor").as_deref(),
        Some("running")
    );
    let log = fleet.agent("gw-1").log();
    assert_eq!(
        log.lines()
            .filter(|l| RUNNING.iter().all(|n| l.contains(n)))
            .count(),
        1,
        "{reason}: restarted?"
    );
}

fn encode(s: Signed) -> Vec<u8> {
    codec::encode(&Message::DesiredState(s)).expect("encode")
}

/// Unsigned, unknown key, flipped byte, wrong device, older generation, expired, malformed, epoch downgrade and
/// mix-and-match are each refused with the right reason while the workload keeps running.
#[test]
fn agent_rejects_every_attack_and_keeps_running() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    fleet
        .hub
        .push_release("sensor", "1.0.0", 2, &firmware("sensor"))
        .expect("release");
    fleet.hub.apply(&spec("sensor@1.0.0")).expect("apply");
    fleet
        .hub
        .wait_workload("gw-1", "sensor", "running")
        .expect("running");
    fleet.agent("gw-1").wait_log(RUNNING, 1).expect("log");

    // Forged documents reach the device only through a compromised broker or hub link; the broker lets nobody
    // else publish them, so the attacks here come with the hub's own credentials.
    let mut client = fleet
        .hub
        .privileged_client(&["flotilla/v1/dev/gw-1/desired"])
        .expect("client");
    let (_, retained) = wait_for("retained desired state", PATIENCE, || {
        client.next_message(Duration::from_secs(1))
    })
    .expect("retained");
    let Ok(Message::DesiredState(current)) = codec::decode(&retained) else {
        panic!("desired state")
    };
    let current: Signed = current;
    let ds: DesiredState = codec::decode_exact(&current.body).expect("body");
    let hub_key = flotilla_hub::keyfile::read_signing_key(&fleet.hub.dir.join("keys/hub.key"))
        .expect("hub key");
    let now = flotilla_hub::keys_cli::now();
    let with = |f: &dyn Fn(&mut DesiredState)| {
        let mut d = ds.clone();
        f(&mut d);
        d
    };

    // (An unsigned copy of the *accepted* body is ignored as a re-delivery: it changes nothing. A new body is needed.)
    let mut unsigned = trust::sign(
        DocType::DesiredState,
        &with(&|d| d.generation += 10),
        &[&hub_key],
    );
    unsigned.signatures.clear();
    expect_rejected(&fleet, &client, encode(unsigned), "carries no signature");

    let rogue = SigningKey::generate();
    let forged = trust::sign(
        DocType::DesiredState,
        &with(&|d| d.generation += 10),
        &[&rogue],
    );
    expect_rejected(
        &fleet,
        &client,
        encode(forged),
        "a key the device's trust root does not know",
    );

    let mut flipped = trust::sign(
        DocType::DesiredState,
        &with(&|d| d.generation += 10),
        &[&hub_key],
    );
    let last = flipped.body.len() - 1;
    flipped.body[last] ^= 1;
    expect_rejected(
        &fleet,
        &client,
        encode(flipped),
        "a signature does not verify",
    );

    let other = with(&|d| {
        d.device = DeviceId::new("gw-2").expect("id");
        d.generation += 10;
    });
    expect_rejected(
        &fleet,
        &client,
        encode(trust::sign(DocType::DesiredState, &other, &[&hub_key])),
        "addressed to another device",
    );

    let older = with(&|d| d.generation -= 1);
    expect_rejected(
        &fleet,
        &client,
        encode(trust::sign(DocType::DesiredState, &older, &[&hub_key])),
        "is older than generation",
    );

    let expired = with(&|d| {
        d.generation += 10;
        d.issued_at = now - 100;
        d.expires_at = now - 10;
    });
    expect_rejected(
        &fleet,
        &client,
        encode(trust::sign(DocType::DesiredState, &expired, &[&hub_key])),
        "it expired at",
    );

    expect_rejected(
        &fleet,
        &client,
        vec![codec::MAGIC, codec::PROTOCOL_VERSION, 1, 0xff, 0xff],
        "not a valid Flotilla payload",
    );

    // Epoch downgrade through the real release path: a release of epoch 1 after epoch 2 was accepted.
    fleet
        .hub
        .push_release("sensor", "0.9.0", 1, &firmware("sensor"))
        .expect("old release");
    fleet.hub.apply(&spec("sensor@0.9.0")).expect("apply old");
    wait_for("epoch downgrade refused", PATIENCE, || {
        let d = fleet.hub.device("gw-1")?;
        d["workloads"][0]["rejected"]
            .as_str()?
            .contains("below epoch 2")
            .then_some(())
    })
    .expect("epoch downgrade");
    assert_eq!(
        fleet.hub.workload_state("gw-1", "sensor").as_deref(),
        Some("running")
    );
    let why = fleet
        .hub
        .client
        .get("/api/v1/why/gw-1/sensor")
        .expect("why");
    assert!(
        why["explanation"]
            .as_str()
            .unwrap_or("")
            .contains("below epoch 2"),
        "{why}"
    );

    // Mix-and-match: a hub-signed desired state naming a release digest nobody released. The device accepts the
    // directive but cannot get a signed release for it, reports the release missing, and keeps the old version.
    let mixed = with(&|d| {
        d.generation += 100;
        d.issued_at = now;
        d.workloads[0].release = Digest::of(b"never released");
    });
    client
        .publish(
            &topics::device(
                &DeviceId::new("gw-1").expect("id"),
                topics::DeviceTopic::Desired,
            ),
            encode(trust::sign(DocType::DesiredState, &mixed, &[&hub_key])),
            false,
        )
        .expect("publish");
    wait_for("mix-and-match refused", PATIENCE, || {
        let d = fleet.hub.device("gw-1")?;
        d["workloads"][0]["rejected"]
            .as_str()?
            .contains("does not have this release")
            .then_some(())
    })
    .expect("mix-and-match");
    assert_eq!(
        fleet.hub.workload_state("gw-1", "sensor").as_deref(),
        Some("running")
    );
    let log = fleet.agent("gw-1").log();
    assert_eq!(
        log.lines()
            .filter(|l| RUNNING.iter().all(|n| l.contains(n)))
            .count(),
        1
    );
}

/// R9: garbage, truncated and oversized messages on every topic the hub and the agent read leave both running.
#[test]
fn bad_input_on_every_topic() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("gw-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    fleet
        .hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    fleet.hub.apply(&spec("sensor@1.0.0")).expect("apply");
    fleet
        .hub
        .wait_workload("gw-1", "sensor", "running")
        .expect("running");
    let client = fleet.hub.privileged_client(&[]).expect("client");
    let id = DeviceId::new("gw-1").expect("id");
    let payloads: Vec<Vec<u8>> = vec![
        vec![],
        b"garbage".to_vec(),
        vec![codec::MAGIC, codec::PROTOCOL_VERSION, 3, 0xff],
        vec![codec::MAGIC, 99, 1],
        vec![codec::MAGIC, codec::PROTOCOL_VERSION, 1]
            .into_iter()
            .chain(std::iter::repeat_n(0u8, 60_000))
            .collect(),
    ];
    let topics_all: Vec<String> = [
        topics::DeviceTopic::Desired,
        topics::DeviceTopic::Root,
        topics::DeviceTopic::Report,
        topics::DeviceTopic::Presence,
        topics::DeviceTopic::ArtifactRequest,
        topics::DeviceTopic::ArtifactChunk,
    ]
    .into_iter()
    .map(|t| topics::device(&id, t))
    .chain([
        topics::enroll_request("0123456789abcdef0123"),
        "flotilla/v1/telemetry/eu-west/gw-1/x".to_owned(),
    ])
    .collect();
    for t in &topics_all {
        for p in &payloads {
            client.publish(t, p.clone(), false).expect("publish");
        }
    }
    let metrics = || fleet.hub.client.get("/api/v1/health").ok();
    wait_for("hub still answering", PATIENCE, metrics).expect("hub alive");
    wait_for("hub counted the rejects", PATIENCE, || {
        let text = fleet.hub.client.get_text("/metrics").ok()?;
        text.lines()
            .find(|l| l.starts_with("flotilla_messages_rejected_total"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .filter(|n| *n >= 5)
    })
    .expect("rejects counted");
    // The agent is alive, reporting, and its workload untouched.
    let counter_before = fleet.hub.device("gw-1").expect("device")["applied_generation"].clone();
    wait_for("agent still reporting", PATIENCE, || {
        (fleet.hub.workload_state("gw-1", "sensor").as_deref() == Some("running")).then_some(())
    })
    .expect("running");
    assert_eq!(
        fleet.hub.device("gw-1").expect("device")["applied_generation"],
        counter_before
    );
    assert!(
        fleet
            .agent("gw-1")
            .proc
            .as_ref()
            .is_some_and(|p| p.log_text().contains("dropping undecodable message"))
    );
}
