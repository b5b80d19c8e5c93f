//! The identity model on a real Mosquitto started from `flotilla broker-config mosquitto` and kept current by the
//! hub: agents enroll anonymously, connect with their issued certificate or their password, and every identity is
//! confined to its own topics. Mosquitto grants every SUBACK and drops what a client may not read or write, so
//! the cells here are judged by what is delivered, watched by the hub's own credential.

use crate::access::{Connect, Probe, device_secret, grafana_feed, hub_secret};
use flotilla_fleet_tests::{AgentSpec, Fleet, FleetBuilder, PATIENCE, SecurePorts, wait_for};
use std::path::PathBuf;

fn fleet() -> Fleet {
    let mut b = AgentSpec::new("gw-b", "us-east", 40.7, -74.0);
    b.password_auth = true;
    FleetBuilder::new()
        .broker(flotilla_fleet_tests::BrokerKind::MosquittoSecure)
        .agent(AgentSpec::new("gw-a", "eu-west", 52.5, 13.4))
        .agent(b)
        .start()
        .expect("fleet on the generated mosquitto")
}

fn ports(fleet: &Fleet) -> SecurePorts {
    fleet
        .mosquitto
        .as_ref()
        .and_then(|m| m.secure.clone())
        .expect("generated mosquitto")
}

fn broker_ca(fleet: &Fleet) -> PathBuf {
    fleet.hub.dir.join("tls/broker-ca.pem")
}

/// A copy of gw-a's issued certificate and key (the agent may renew them later).
fn cert_of(fleet: &Fleet, id: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = flotilla_agent::credentials::client_files(&fleet.agent(id).state_dir());
    let dir = fleet.root.path().join(format!("{id}-cert"));
    std::fs::create_dir_all(&dir).expect("dir");
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::copy(cert, &c).expect("cert");
    std::fs::copy(key, &k).expect("key");
    (c, k)
}

/// The probes' own text payloads, sorted and deduplicated (the hub's binary envelopes and empty messages left out).
fn texts(messages: Vec<(String, Vec<u8>)>) -> Vec<String> {
    let mut out: Vec<String> = messages
        .into_iter()
        .filter(|(_, p)| !p.is_empty() && p.first() != Some(&flotilla_shared::codec::MAGIC))
        .map(|(_, p)| String::from_utf8_lossy(&p).into_owned())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn tls(fleet: &Fleet, creds: Option<(&str, &str)>, port: u16, id: &str) -> (Probe, Connect) {
    Probe::connect_tls(port, id, creds, &broker_ca(fleet))
}

/// The ACL matrix on the generated Mosquitto: device A (certificate), device B (password), a region feed consumer,
/// an anonymous enrollment client and the hub, against own topics, the other device's, `#`, `+` patterns and
/// `$SYS/#`, for subscribe, publish, retained publish and will. Exactly the allowed cells get through.
#[test]
fn acl_matrix_against_the_generated_mosquitto() {
    let mut fleet = fleet();
    let p = ports(&fleet);
    let ca = broker_ca(&fleet);
    let (a_cert, a_key) = cert_of(&fleet, "gw-a");
    let b_secret = device_secret(&fleet, "gw-b");
    let (feed_user, feed_pass) = grafana_feed(&fleet);
    assert_eq!(feed_user, "feed-grafana");

    // A's certificate names gw-a whatever client id it asks for: connecting "as gw-b" cannot touch B's session.
    let (_, as_b) = Probe::connect_cert(p.cert, "gw-b", None, &ca, &a_cert, &a_key);
    assert_eq!(
        as_b,
        Connect::Accepted,
        "Mosquitto renames the client to gw-a"
    );
    let log = fleet.agent("gw-b").log();
    assert!(
        !log.contains("\"message\":\"disconnected\""),
        "B kept its session:\n{log}"
    );
    // No certificate, or a wrong password: refused.
    assert!(matches!(
        tls(&fleet, None, p.cert, "gw-a").1,
        Connect::Refused(_)
    ));
    assert!(matches!(
        tls(&fleet, Some(("gw-b", "wrong")), p.password, "gw-b").1,
        Connect::Refused(_)
    ));
    assert!(matches!(
        tls(&fleet, None, p.password, "gw-b").1,
        Connect::Refused(_)
    ));

    // From here the probes are the devices: stop the agents so nothing fights over the client ids.
    fleet.agent_mut("gw-a").kill9();
    fleet.agent_mut("gw-b").kill9();

    let hub_pass = hub_secret(&fleet);
    let (mut hub, ok) = Probe::connect(
        p.local,
        "flotilla-hub-probe",
        Some(("hub", &hub_pass)),
        None,
    );
    assert_eq!(ok, Connect::Accepted);
    assert!(hub.subscribe("flotilla/#"), "the hub reads the fleet");
    assert!(
        hub.subscribe("spBv1.0/+/NCMD/+"),
        "the hub reads Sparkplug commands"
    );
    let marker = "flotilla/v1/probe/marker";

    let (mut a, ok) = Probe::connect_cert(p.cert, "gw-a", None, &ca, &a_cert, &a_key);
    assert_eq!(ok, Connect::Accepted);
    let (mut b, ok) = tls(&fleet, Some(("gw-b", &b_secret)), p.password, "gw-b");
    assert_eq!(ok, Connect::Accepted);
    // The hub writes the new credential into Mosquitto's password file on its next tick.
    let mut f = wait_for("the feed credential on mosquitto", PATIENCE, || {
        let (probe, ok) = tls(
            &fleet,
            Some((&feed_user, &feed_pass)),
            p.clients,
            "feed-grafana",
        );
        (ok == Connect::Accepted).then_some(probe)
    })
    .expect("feed accepted");
    let nonce = "00112233445566778899aabbccddeeff";
    let (mut e, ok) = tls(&fleet, None, p.clients, &format!("enroll-{nonce}"));
    assert_eq!(ok, Connect::Accepted, "anonymous enrollment");

    // Subscriptions: granted by Mosquitto, judged by what arrives.
    for filter in [
        "flotilla/v1/dev/gw-a/desired",
        "flotilla/v1/dev/gw-a/cert/resp",
        "flotilla/v1/dev/gw-a/artifact/chunk",
        "flotilla/v1/dev/gw-b/desired",
        "flotilla/v1/dev/+/desired",
        "flotilla/v1/telemetry/#",
        "#",
        "$SYS/#",
    ] {
        a.subscribe(filter);
    }
    for filter in ["flotilla/v1/telemetry/#", "flotilla/v1/dev/+/desired", "#"] {
        f.subscribe(filter);
    }
    let own_resp = format!("flotilla/v1/enroll/enroll-{nonce}/resp");
    for filter in [
        own_resp.clone(),
        "flotilla/v1/enroll/+/resp".to_owned(),
        "flotilla/v1/dev/+/desired".to_owned(),
        "#".to_owned(),
    ] {
        e.subscribe(&filter);
    }
    // What the hub publishes: each subscriber must get exactly its own. Each probe's marker is a topic it may
    // read, published last (Mosquitto keeps one publisher's order), so anything leaked would arrive before it.
    // (Markers are on topics nobody retains, so no retained message can end a wait early.)
    let (a_marker, f_marker) = (
        "flotilla/v1/dev/gw-a/artifact/chunk",
        "flotilla/v1/telemetry/eu-west/probe/marker",
    );
    for (topic, body) in [
        ("flotilla/v1/dev/gw-a/desired", "to a"),
        ("flotilla/v1/dev/gw-a/cert/resp", "cert to a"),
        ("flotilla/v1/dev/gw-b/desired", "to b"),
        ("flotilla/v1/dev/gw-b/cert/resp", "cert to b"),
        ("flotilla/v1/telemetry/eu-west/gw-a/count", "eu telemetry"),
        ("flotilla/v1/telemetry/us-east/gw-b/count", "us telemetry"),
        // The hub's JSON and Sparkplug B republications, per region like the raw feed.
        ("flotilla/v1/feed/json/eu-west/gw-a/count", "eu json"),
        ("flotilla/v1/feed/json/us-east/gw-b/count", "us json"),
        ("spBv1.0/eu-west/NDATA/gw-a", "eu sparkplug"),
        ("spBv1.0/us-east/NDATA/gw-b", "us sparkplug"),
        (
            "flotilla/v1/enroll/enroll-ffeeddccbbaa99887766554433221100/resp",
            "other enrollment",
        ),
        (a_marker, ""),
        (f_marker, ""),
        (own_resp.as_str(), "own enrollment"),
    ] {
        hub.publish(topic, body.as_bytes(), false);
    }
    assert_eq!(
        texts(a.messages_until(a_marker)),
        ["cert to a", "to a"],
        "device A reads only its own topics"
    );
    assert_eq!(
        texts(f.messages_until(f_marker)),
        ["eu json", "eu sparkplug", "eu telemetry"],
        "the feed reads only its region's telemetry"
    );
    assert_eq!(
        texts(e.messages_until(&own_resp)),
        Vec::<String>::new(),
        "an enrollment reads nothing before its own response"
    );
    hub.publish(marker, b"", false);
    let _ = hub.messages_until(marker);
    // Publishes: the hub sees only the allowed ones.
    a.publish("flotilla/v1/dev/gw-a/report", b"a own report", false);
    a.publish(
        "flotilla/v1/telemetry/eu-west/gw-a/count",
        b"a own telemetry",
        false,
    );
    a.publish("flotilla/v1/dev/gw-b/report", b"a spoofs b", false);
    a.publish(
        "flotilla/v1/dev/gw-b/presence",
        b"a retains b presence",
        true,
    );
    a.publish(
        "flotilla/v1/dev/gw-a/desired",
        b"a retains own desired",
        true,
    );
    a.publish(
        "flotilla/v1/telemetry/us-east/gw-a/count",
        b"a wrong region",
        false,
    );
    a.publish(
        "flotilla/v1/telemetry/eu-west/gw-b/count",
        b"a as b telemetry",
        false,
    );
    b.publish("flotilla/v1/dev/gw-b/report", b"b own report", false);
    b.publish(
        "flotilla/v1/telemetry/us-east/gw-b/count",
        b"b own telemetry",
        false,
    );
    b.publish("flotilla/v1/dev/gw-a/desired", b"b retains a desired", true);
    f.publish(
        "flotilla/v1/telemetry/eu-west/gw-a/count",
        b"feed publishes",
        false,
    );
    // A Sparkplug host application's rebirth request: to its own region's nodes only.
    f.publish("spBv1.0/eu-west/NCMD/gw-a", b"feed rebirth request", false);
    f.publish(
        "spBv1.0/us-east/NCMD/gw-b",
        b"feed command elsewhere",
        false,
    );
    a.publish("spBv1.0/eu-west/NCMD/gw-a", b"device command", false);
    e.publish(
        &format!("flotilla/v1/enroll/enroll-{nonce}/req"),
        b"own enrollment request",
        false,
    );
    e.publish(
        "flotilla/v1/dev/gw-a/desired",
        b"anonymous retains a desired",
        true,
    );
    e.publish(
        "flotilla/v1/enroll/enroll-ffeeddccbbaa99887766554433221100/req",
        b"anonymous as another",
        false,
    );
    // A will on another device's presence: A's connection drops without a DISCONNECT.
    let (will_probe, ok) = Probe::connect_will_cert(
        p.cert,
        "gw-a",
        "flotilla/v1/dev/gw-b/presence",
        &ca,
        &a_cert,
        &a_key,
    );
    assert_eq!(ok, Connect::Accepted);
    // Dropped without a DISCONNECT: Mosquitto would publish the will now, if it were allowed. A new connection
    // under the same id publishes after that point, so a will that got through arrives before the marker.
    drop(will_probe);
    let (mut a2, ok) = Probe::connect_cert(p.cert, "gw-a", None, &ca, &a_cert, &a_key);
    assert_eq!(ok, Connect::Accepted);
    a2.publish("flotilla/v1/dev/gw-a/report", b"a after the will", false);
    hub.publish(marker, b"", false);
    assert_eq!(
        texts(hub.messages_until(marker)),
        [
            "a after the will",
            "a own report",
            "a own telemetry",
            "b own report",
            "b own telemetry",
            "feed rebirth request",
            "own enrollment request"
        ],
        "only the allowed publishes reach the hub"
    );
    // Nothing retained by anyone but the hub: a new subscriber to the devices' desired states gets only the hub's.
    let (mut late, ok) =
        Probe::connect(p.local, "flotilla-hub-late", Some(("hub", &hub_pass)), None);
    assert_eq!(ok, Connect::Accepted);
    late.subscribe("flotilla/v1/dev/+/desired");
    late.subscribe("flotilla/v1/dev/+/presence");
    late.subscribe(marker);
    late.publish(marker, b"", false);
    let retained = texts(late.messages_until(marker));
    assert!(
        retained.is_empty(),
        "foreign retained messages: {retained:?}"
    );
}

/// Revocation on Mosquitto: the hub rewrites the revocation list and ACL, reloads Mosquitto and ends the
/// device's session at once; its certificate is refused in the TLS handshake from then on, and its retained topics
/// are cleared. The other device keeps working.
#[test]
fn revocation_on_the_generated_mosquitto() {
    let fleet = fleet();
    let p = ports(&fleet);
    let ca = broker_ca(&fleet);
    let (a_cert, a_key) = cert_of(&fleet, "gw-a");
    let t0 = std::time::Instant::now();
    let v = fleet
        .hub
        .client
        .post(
            "/api/v1/devices/gw-a/revoke",
            "application/json",
            b"{}",
            &[],
        )
        .expect("revoke");
    assert_eq!(v["revoked"], true, "{v}");
    let agent = fleet.agent("gw-a");
    agent
        .wait_log(&["\"message\":\"disconnected\""], 1)
        .expect("the live session ended");
    println!("revocation -> agent disconnected in {:?}", t0.elapsed());
    wait_for("the revoked certificate refused", PATIENCE, || {
        matches!(
            Probe::connect_cert(p.cert, "gw-a", None, &ca, &a_cert, &a_key).1,
            Connect::Refused(_)
        )
        .then_some(())
    })
    .expect("refused");
    let crl = std::fs::read_to_string(p.dir.join("devices.crl")).expect("crl");
    assert!(crl.contains("BEGIN X509 CRL"));
    assert_eq!(fleet.hub.device("gw-a").expect("device")["online"], false);
    wait_for("gw-b still online", PATIENCE, || {
        (fleet.hub.device("gw-b")?["online"] == true).then_some(())
    })
    .expect("gw-b online");
}
