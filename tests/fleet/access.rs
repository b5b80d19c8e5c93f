//! Device identity on the wire, against the embedded broker with its defaults: every connection authenticated,
//! client ids bound to identities, per-identity topic ACLs, enrollment confined to its own topics, revocation.

use flotilla_fleet_tests::{AgentSpec, Fleet, FleetBuilder, PATIENCE, firmware, wait_for};
use rumqttc::mqttbytes::v4::SubscribeReasonCode;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// A raw MQTT client that reports SUBACK codes and received messages, for probing the broker's decisions.
pub(crate) struct Probe {
    rt: tokio::runtime::Runtime,
    client: AsyncClient,
    el: EventLoop,
    /// Messages received while waiting for something else, in arrival order.
    inbox: Vec<(String, Vec<u8>)>,
}

/// TLS settings that verify the broker against `broker_ca`, with a client certificate when given.
fn tls_to(broker_ca: &Path, client: Option<(&Path, &Path)>) -> flotilla_mqtt::TlsSettings {
    flotilla_mqtt::TlsSettings {
        ca_file: Some(broker_ca.to_owned()),
        ca_sha256: None,
        client_cert: client.map(|(c, _)| c.to_owned()),
        client_key: client.map(|(_, k)| k.to_owned()),
    }
}

/// How a CONNECT went.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Connect {
    Accepted,
    Refused(String),
}

impl Probe {
    pub(crate) fn connect(
        port: u16,
        client_id: &str,
        creds: Option<(&str, &str)>,
        will: Option<&str>,
    ) -> (Self, Connect) {
        Self::connect_with(port, client_id, creds, will, None)
    }

    /// Connects over TLS to the hub's device listener, presenting a client certificate (PEM files).
    pub(crate) fn connect_cert(
        port: u16,
        client_id: &str,
        creds: Option<(&str, &str)>,
        broker_ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> (Self, Connect) {
        let tls = tls_to(broker_ca, Some((cert, key)));
        Self::connect_with(port, client_id, creds, None, Some(tls))
    }

    /// Connects over TLS with a password (or anonymously), no client certificate.
    pub(crate) fn connect_tls(
        port: u16,
        client_id: &str,
        creds: Option<(&str, &str)>,
        broker_ca: &Path,
    ) -> (Self, Connect) {
        Self::connect_with(port, client_id, creds, None, Some(tls_to(broker_ca, None)))
    }

    /// Connects with a client certificate and a will on `will`.
    pub(crate) fn connect_will_cert(
        port: u16,
        client_id: &str,
        will: &str,
        broker_ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> (Self, Connect) {
        let tls = tls_to(broker_ca, Some((cert, key)));
        Self::connect_with(port, client_id, None, Some(will), Some(tls))
    }

    pub(crate) fn connect_with(
        port: u16,
        client_id: &str,
        creds: Option<(&str, &str)>,
        will: Option<&str>,
        tls: Option<flotilla_mqtt::TlsSettings>,
    ) -> (Self, Connect) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let host = if tls.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        };
        let mut opts = MqttOptions::new(client_id, host, port);
        opts.set_keep_alive(Duration::from_secs(30));
        if let Some((u, p)) = creds {
            opts.set_credentials(u, p);
        }
        if let Some(topic) = will {
            opts.set_last_will(LastWill::new(topic, "gone", QoS::AtLeastOnce, true));
        }
        if let Some(tls) = &tls {
            let config = flotilla_mqtt::tls_client_config(tls).expect("tls settings");
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(config)),
            ));
        }
        let (client, mut el) = AsyncClient::new(opts, 16);
        let outcome = rt.block_on(async {
            tokio::time::timeout(PATIENCE, async {
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => return Connect::Accepted,
                        Ok(_) => {}
                        Err(e) => return Connect::Refused(e.to_string()),
                    }
                }
            })
            .await
            .expect("a CONNACK in time")
        });
        let probe = Self {
            rt,
            client,
            el,
            inbox: Vec::new(),
        };
        (probe, outcome)
    }

    /// Polls until `want` picks an incoming packet, keeping every PUBLISH that arrives meanwhile in the inbox.
    pub(crate) fn poll_for<T>(
        &mut self,
        what: &str,
        mut want: impl FnMut(&Packet) -> Option<T>,
    ) -> T {
        let (el, inbox) = (&mut self.el, &mut self.inbox);
        self.rt.block_on(async {
            tokio::time::timeout(PATIENCE, async {
                loop {
                    if let Ok(Event::Incoming(p)) = el.poll().await {
                        if let Packet::Publish(m) = &p {
                            inbox.push((m.topic.clone(), m.payload.to_vec()));
                        }
                        if let Some(v) = want(&p) {
                            return v;
                        }
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{what} in time"))
        })
    }

    /// Subscribes to `filter` and says whether the broker granted it.
    pub(crate) fn subscribe(&mut self, filter: &str) -> bool {
        let client = self.client.clone();
        let filter_owned = filter.to_owned();
        self.rt.block_on(async move {
            client
                .subscribe(filter_owned, QoS::AtLeastOnce)
                .await
                .expect("queue");
        });
        self.poll_for("a SUBACK", |p| match p {
            Packet::SubAck(a) => Some(matches!(
                a.return_codes[..],
                [SubscribeReasonCode::Success(_)]
            )),
            _ => None,
        })
    }

    /// Publishes and waits for the PUBACK (the broker acknowledges refused publishes too, and drops them).
    pub(crate) fn publish(&mut self, topic: &str, payload: &[u8], retain: bool) {
        let client = self.client.clone();
        let (topic, payload) = (topic.to_owned(), payload.to_vec());
        self.rt.block_on(async move {
            client
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .await
                .expect("queue");
        });
        self.poll_for("a PUBACK", |p| matches!(p, Packet::PubAck(_)).then_some(()));
    }

    /// Every message received until one arrives on `marker` (which the caller published after everything else,
    /// on a topic this client is subscribed to): the broker delivers in order, so nothing else is still coming.
    pub(crate) fn messages_until(&mut self, marker: &str) -> Vec<(String, Vec<u8>)> {
        if !self.inbox.iter().any(|(t, _)| t == marker) {
            self.poll_for("the marker", |p| match p {
                Packet::Publish(m) if m.topic == marker => Some(()),
                _ => None,
            });
        }
        let all = std::mem::take(&mut self.inbox);
        all.into_iter().take_while(|(t, _)| t != marker).collect()
    }
}

fn two_devices() -> Fleet {
    FleetBuilder::new()
        .agent(AgentSpec::new("gw-a", "eu-west", 52.5, 13.4))
        .agent(AgentSpec::new("gw-b", "us-east", 40.7, -74.0))
        .start()
        .expect("fleet")
}

/// The MQTT secret the hub issued to an agent at enrollment (read from the agent's own database).
pub(crate) fn device_secret(fleet: &Fleet, id: &str) -> String {
    let store =
        flotilla_agent::store::Store::open(&fleet.agent(id).state_dir()).expect("agent store");
    store.mqtt_secret().expect("read").expect("a secret")
}

/// A read-only feed credential `grafana` for eu-west: (username, password).
pub(crate) fn grafana_feed(fleet: &Fleet) -> (String, String) {
    let feed = fleet
        .hub
        .client
        .post(
            "/api/v1/feed-credentials",
            "application/json",
            br#"{"name": "grafana", "regions": ["eu-west"]}"#,
            &[],
        )
        .expect("feed credential");
    let get = |k: &str| feed[k].as_str().expect(k).to_owned();
    (get("username"), get("password"))
}

pub(crate) fn hub_secret(fleet: &Fleet) -> String {
    std::fs::read_to_string(fleet.hub.dir.join("mqtt-hub.secret"))
        .expect("hub secret")
        .trim()
        .to_owned()
}

fn denied(fleet: &Fleet, action: &str) -> u64 {
    let m = fleet.hub.client.get_text("/metrics").expect("metrics");
    let key = format!("flotilla_broker_denied_total{{action=\"{action}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The ACL matrix against the embedded broker: identities {device A, the hub, a region feed consumer, an
/// anonymous enrollment, an anonymous client} x targets {own topics, device B's, `#`, `+` patterns, `$SYS/#`} x
/// {subscribe, publish, retained publish, will}. Exactly the allowed cells succeed; every refusal is counted.
#[test]
fn acl_matrix_against_the_embedded_broker() {
    let fleet = two_devices();
    let port = fleet.broker_port();
    let a_secret = device_secret(&fleet, "gw-a");
    let (_, feed_pass) = grafana_feed(&fleet);
    // Bad input to the credential and revocation calls is refused with a reason, and changes nothing.
    for (body, needle) in [
        (&br#"{"name": "nothing", "regions": []}"#[..], "regions"),
        (br#"{"name": "Bad Name", "regions": ["eu-west"]}"#, "name"),
    ] {
        let err = fleet
            .hub
            .client
            .post("/api/v1/feed-credentials", "application/json", body, &[])
            .expect_err("refused")
            .to_string();
        assert!(err.starts_with("400") && err.contains(needle), "{err}");
    }
    let err = fleet
        .hub
        .client
        .post(
            "/api/v1/devices/no-such-device/revoke",
            "application/json",
            b"{}",
            &[],
        )
        .expect_err("unknown device")
        .to_string();
    assert!(err.starts_with("404"), "{err}");
    let hub_pass = hub_secret(&fleet);

    // Who may connect at all.
    assert!(matches!(
        Probe::connect(port, "test-anon", None, None).1,
        Connect::Refused(_)
    ));
    assert!(matches!(
        Probe::connect(port, "gw-a", Some(("gw-a", "wrong")), None).1,
        Connect::Refused(_)
    ));
    assert!(matches!(
        Probe::connect(
            port,
            "gw-a-2",
            Some(("gw-a", &a_secret)),
            Some("flotilla/v1/dev/gw-b/presence")
        )
        .1,
        Connect::Refused(_)
    ));
    let wills_before = denied(&fleet, "will");
    let (_, will) = Probe::connect(
        port,
        "gw-a",
        Some(("gw-a", &a_secret)),
        Some("flotilla/v1/dev/gw-b/presence"),
    );
    assert!(
        matches!(will, Connect::Refused(_)),
        "a will on B's presence"
    );
    assert!(denied(&fleet, "will") > wills_before);

    // Device A.
    let (mut a, ok) = Probe::connect(port, "gw-a", Some(("gw-a", &a_secret)), None);
    assert_eq!(ok, Connect::Accepted);
    for (filter, allowed) in [
        ("flotilla/v1/dev/gw-a/desired", true),
        ("flotilla/v1/dev/gw-a/root", true),
        ("flotilla/v1/dev/gw-a/artifact/chunk", true),
        ("flotilla/v1/dev/gw-b/desired", false),
        ("flotilla/v1/dev/+/desired", false),
        ("flotilla/v1/dev/gw-a/#", false),
        ("flotilla/v1/telemetry/#", false),
        ("flotilla/v1/enroll/+/req", false),
        ("#", false),
        ("$SYS/#", false),
    ] {
        assert_eq!(a.subscribe(filter), allowed, "device A subscribes {filter}");
    }
    // The hub watches what A's publishes do.
    let (mut hub, ok) = Probe::connect(port, "flotilla-hub-probe", Some(("hub", &hub_pass)), None);
    assert_eq!(ok, Connect::Accepted);
    assert!(hub.subscribe("#"), "the hub reads everything");
    a.publish("flotilla/v1/dev/gw-b/report", b"spoofed report", false);
    a.publish("flotilla/v1/dev/gw-b/presence", b"spoofed presence", true);
    a.publish(
        "flotilla/v1/dev/gw-a/desired",
        b"own desired, retained",
        true,
    );
    a.publish(
        "flotilla/v1/telemetry/us-east/gw-a/count",
        b"wrong region",
        false,
    );
    a.publish(
        "flotilla/v1/telemetry/eu-west/gw-b/count",
        b"another id",
        false,
    );
    a.publish(
        "flotilla/v1/telemetry/eu-west/gw-a/count",
        b"own telemetry",
        false,
    );
    hub.publish("probe/marker", b"", false);
    let seen = hub.messages_until("probe/marker");
    let payloads: Vec<&[u8]> = seen.iter().map(|(_, p)| p.as_slice()).collect();
    assert!(payloads.contains(&&b"own telemetry"[..]), "{seen:?}");
    for refused in [
        &b"spoofed report"[..],
        b"spoofed presence",
        b"own desired, retained",
        b"wrong region",
        b"another id",
    ] {
        assert!(
            !payloads.contains(&refused),
            "{:?} got through",
            String::from_utf8_lossy(refused)
        );
    }

    // A region feed consumer: read-only, its regions only.
    let (mut f, ok) = Probe::connect(
        port,
        "feed-grafana",
        Some(("feed:grafana", &feed_pass)),
        None,
    );
    assert_eq!(ok, Connect::Accepted);
    for (filter, allowed) in [
        ("flotilla/v1/telemetry/eu-west/#", true),
        ("flotilla/v1/telemetry/eu-west/+/count", true),
        ("flotilla/v1/telemetry/us-east/#", false),
        ("flotilla/v1/telemetry/+/gw-a/count", false),
        ("flotilla/v1/telemetry/#", false),
        ("flotilla/v1/dev/+/desired", false),
        ("#", false),
        ("$SYS/#", false),
    ] {
        assert_eq!(f.subscribe(filter), allowed, "feed subscribes {filter}");
    }
    f.publish(
        "flotilla/v1/telemetry/eu-west/gw-a/count",
        b"feed publish",
        false,
    );
    // A feed consumer cannot pose as a device's client id (that would take over its session).
    assert!(matches!(
        Probe::connect(port, "gw-a", Some(("feed:grafana", &feed_pass)), None).1,
        Connect::Refused(_)
    ));

    // An anonymous enrollment: its own request and response only; nobody else's tokens.
    let nonce = "00112233445566778899aabbccddeeff";
    let (mut e, ok) = Probe::connect(port, &format!("enroll-{nonce}"), None, None);
    assert_eq!(ok, Connect::Accepted);
    for (filter, allowed) in [
        (format!("flotilla/v1/enroll/enroll-{nonce}/resp"), true),
        ("flotilla/v1/enroll/+/req".to_owned(), false),
        ("flotilla/v1/enroll/#".to_owned(), false),
        (
            "flotilla/v1/enroll/enroll-ffeeddccbbaa99887766554433221100/resp".to_owned(),
            false,
        ),
        ("flotilla/v1/dev/+/desired".to_owned(), false),
        ("#".to_owned(), false),
    ] {
        assert_eq!(
            e.subscribe(&filter),
            allowed,
            "enrollment subscribes {filter}"
        );
    }
    e.publish("flotilla/v1/dev/gw-a/desired", b"anonymous retained", true);
    hub.publish("probe/marker", b"", false);
    let seen = hub.messages_until("probe/marker");
    assert!(
        !seen
            .iter()
            .any(|(_, p)| p == b"feed publish" || p == b"anonymous retained"),
        "{seen:?}"
    );
    for action in [
        "connect",
        "publish",
        "publish_retained",
        "subscribe",
        "will",
    ] {
        assert!(
            denied(&fleet, action) > 0,
            "denials of {action} are counted"
        );
    }
}

/// Device A's credential cannot connect as device B nor take over B's session; B stays connected and working.
#[test]
fn a_device_credential_cannot_take_over_another_device() {
    let fleet = two_devices();
    let port = fleet.broker_port();
    let a_secret = device_secret(&fleet, "gw-a");
    wait_for("both online", PATIENCE, || {
        let b = fleet.hub.device("gw-b")?;
        (b["online"] == true).then_some(())
    })
    .expect("online");
    let (_, outcome) = Probe::connect(port, "gw-b", Some(("gw-a", &a_secret)), None);
    assert!(matches!(outcome, Connect::Refused(_)), "{outcome:?}");
    let (_, outcome) = Probe::connect(port, "gw-b", Some(("gw-b", &a_secret)), None);
    assert!(matches!(outcome, Connect::Refused(_)), "{outcome:?}");
    // B's own session was never touched: its agent logged no disconnection.
    let log = fleet.agent("gw-b").log();
    assert!(!log.contains("\"message\":\"disconnected\""), "{log}");
}

/// An anonymous client that tries to overwrite a device's retained desired state and to read other devices'
/// traffic gets nothing; the device, restarted afterwards, receives the hub's genuine state and runs it.
#[test]
fn anonymous_clients_cannot_poison_or_read_the_fleet() {
    let mut fleet = two_devices();
    fleet
        .hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    fleet
        .hub
        .apply("name = \"sensors\"\n[[workloads]]\nname = \"sensor\"\nrelease = \"sensor@1.0.0\"\ntick_ms = 100\n")
        .expect("apply");
    fleet
        .hub
        .wait_workload("gw-a", "sensor", "running")
        .expect("running");
    let port = fleet.broker_port();
    let nonce = "0123456789abcdef0123456789abcdef";
    let (mut anon, ok) = Probe::connect(port, &format!("enroll-{nonce}"), None, None);
    assert_eq!(
        ok,
        Connect::Accepted,
        "enrollment stays open to anonymous clients"
    );
    assert!(!anon.subscribe("flotilla/v1/dev/+/desired"));
    assert!(!anon.subscribe("flotilla/v1/telemetry/#"));
    anon.publish("flotilla/v1/dev/gw-a/desired", b"garbage", true);
    assert!(anon.subscribe(&format!("flotilla/v1/enroll/enroll-{nonce}/resp")));
    let agent = fleet.agent_mut("gw-a");
    agent.kill9();
    agent.start().expect("restart");
    agent
        .wait_log(&["\"message\":\"running\"", "\"workload\":\"sensor\""], 1)
        .expect("runs again");
    let log = agent.log();
    assert!(
        !log.contains("desired state rejected"),
        "the garbage never reached it:\n{log}"
    );
}

/// Revocation: the device is disconnected at once, cannot reconnect, and its retained topics are gone.
#[test]
fn revoked_device_is_disconnected_and_stays_out() {
    let fleet = two_devices();
    let hub = &fleet.hub;
    hub.push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    hub.apply("name = \"sensors\"\n[[workloads]]\nname = \"sensor\"\nrelease = \"sensor@1.0.0\"\ntick_ms = 100\n")
        .expect("apply");
    hub.wait_workload("gw-a", "sensor", "running")
        .expect("running");
    let t0 = Instant::now();
    let v = hub
        .client
        .post(
            "/api/v1/devices/gw-a/revoke",
            "application/json",
            b"{}",
            &[],
        )
        .expect("revoke");
    assert_eq!(v["connections_closed"], 1, "{v}");
    let agent = fleet.agent("gw-a");
    agent
        .wait_log(&["\"message\":\"disconnected\""], 1)
        .expect("disconnected");
    println!(
        "revocation -> agent saw the disconnect in {:?}",
        t0.elapsed()
    );
    // Its reconnects are refused (counted as denied connects), and the hub never sees it online again.
    let refused = denied(&fleet, "connect");
    wait_for("a refused reconnect", PATIENCE, || {
        (denied(&fleet, "connect") > refused).then_some(())
    })
    .expect("reconnect refused");
    let d = hub.device("gw-a").expect("device");
    assert_eq!(
        (d["online"].as_bool(), d["revoked"].as_bool()),
        (Some(false), Some(true)),
        "{d}"
    );
    // Nothing retained is left for it: a subscriber gets no desired state, root or presence before a marker.
    let (mut probe, ok) = Probe::connect(
        fleet.broker_port(),
        "flotilla-hub-probe",
        Some(("hub", &hub_secret(&fleet))),
        None,
    );
    assert_eq!(ok, Connect::Accepted);
    assert!(probe.subscribe("flotilla/v1/dev/gw-a/#"));
    assert!(probe.subscribe("probe/marker"));
    probe.publish("probe/marker", b"", false);
    let seen = probe.messages_until("probe/marker");
    assert!(
        seen.iter().all(|(_, p)| p.is_empty()),
        "retained state left: {:?}",
        seen.iter().map(|(t, _)| t).collect::<Vec<_>>()
    );
    // gw-b is untouched.
    hub.wait_workload("gw-b", "sensor", "running")
        .expect("gw-b keeps running");
}

/// Secure by default: a hub started with its defaults serves devices over TLS, and an agent whose config names
/// only `mqtts://host:port` and an enrollment token verifies the broker against the CA fingerprint in the token,
/// enrolls, and runs a workload. A token whose fingerprint is not the broker's CA gets no connection at all.
#[test]
fn agents_pin_the_broker_through_their_token() {
    let mut spec = AgentSpec::new("gw-tls", "eu-west", 52.5, 13.4);
    spec.pinned_tls = true;
    let fleet = FleetBuilder::new().agent(spec).start().expect("fleet");
    let hub = &fleet.hub;
    let config = std::fs::read_to_string(&fleet.agent("gw-tls").config).expect("config");
    assert!(
        config.contains("mqtts://localhost:") && !config.contains("[tls]"),
        "{config}"
    );
    let token = hub.enroll_token("eu-west", "eu-a", &[]).expect("token");
    let (secret, fingerprint) = token.rsplit_once('.').expect("a pinned token");
    assert!(
        secret.starts_with("fet_") && fingerprint.len() == 64,
        "{token}"
    );
    hub.push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    hub.apply("name = \"sensors\"\n[[workloads]]\nname = \"sensor\"\nrelease = \"sensor@1.0.0\"\ntick_ms = 100\n")
        .expect("apply");
    hub.wait_workload("gw-tls", "sensor", "running")
        .expect("running over the pinned TLS listener");
    // The same listener with a token that pins another CA: the handshake fails before any MQTT.
    let wrong = format!("{secret}.{}", "0".repeat(64));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let port = hub.mqtts_port().expect("tls port");
    let outcome = rt.block_on(async {
        let (_link, mut rx) = flotilla_mqtt::connect(flotilla_mqtt::LinkSettings {
            client_id: "enroll-00112233445566778899aabbccddeeff".into(),
            host: "localhost".into(),
            port,
            keepalive: Duration::from_secs(5),
            tls: Some(flotilla_mqtt::TlsSettings {
                ca_file: None,
                ca_sha256: flotilla_agent::config::token_ca_pin(&wrong),
                client_cert: None,
                client_key: None,
            }),
            credentials: None,
            last_will: None,
            subscriptions: vec![],
            clean_session: true,
            queue: 16,
        })
        .expect("settings");
        tokio::time::timeout(PATIENCE, rx.recv()).await
    });
    assert!(
        matches!(&outcome, Ok(Some(flotilla_mqtt::LinkEvent::Disconnected(e))) if e.contains("pinned CA")),
        "{outcome:?}"
    );
}

/// Client certificates: an agent on the TLS listener gets a certificate for its own key at enrollment (subject:
/// its device id) and connects with it; the certificate alone authenticates it, and only as itself. It is renewed
/// over MQTT two thirds into its life (60 s here) and the agent reconnects with the new one, after which the old
/// certificate is refused. `rotate-credentials` gives it a new key, certificate and password at once; the old
/// password is refused once the new credentials are in use. The device stays online and running throughout.
#[test]
fn device_certificates_are_issued_renewed_and_rotated() {
    let mut spec = AgentSpec::new("gw-cert", "eu-west", 52.5, 13.4);
    spec.pinned_tls = true;
    let fleet = FleetBuilder::new()
        .hub_args(&["--device-cert-secs", "60"])
        .agent(spec)
        .agent(AgentSpec::new("gw-other", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    let agent = fleet.agent("gw-cert");
    let port = hub.mqtts_port().expect("tls port");
    let broker_ca = hub.dir.join("tls/broker-ca.pem");
    let (cert, key) = flotilla_agent::credentials::client_files(&agent.state_dir());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key).expect("key").permissions(),
    );
    assert_eq!(mode & 0o077, 0, "the client key is private");
    // Keep the first certificate to try it after renewal.
    let first = fleet.root.path().join("first");
    std::fs::create_dir_all(&first).expect("dir");
    let (cert1, key1) = (first.join("cert.pem"), first.join("key.pem"));
    std::fs::copy(&cert, &cert1).expect("copy");
    std::fs::copy(&key, &key1).expect("copy");
    let text = std::fs::read_to_string(&cert1).expect("cert");
    assert!(text.contains("BEGIN CERTIFICATE"), "{text}");

    // The certificate alone authenticates the device, as itself only.
    let accepted = |cert: &Path, key: &Path, id: &str| {
        Probe::connect_cert(port, id, None, &broker_ca, cert, key).1 == Connect::Accepted
    };
    assert!(accepted(&cert1, &key1, "gw-cert"), "its own certificate");
    assert!(!accepted(&cert1, &key1, "gw-other"), "as another device");
    let other_secret = device_secret(&fleet, "gw-other");
    let (_, as_other) = Probe::connect_cert(
        port,
        "gw-other",
        Some(("gw-other", &other_secret)),
        &broker_ca,
        &cert1,
        &key1,
    );
    assert!(
        matches!(as_other, Connect::Refused(_)),
        "A's certificate with B's password: {as_other:?}"
    );
    // Our probe took over the agent's session for a moment; it reconnects by itself.
    wait_for("gw-cert back online", PATIENCE, || {
        (hub.device("gw-cert")?["online"] == true).then_some(())
    })
    .expect("online");

    // Renewal two thirds into the certificate's life, then the agent reconnects with the new certificate.
    agent
        .wait_log(&["requested new credentials", "renewal"], 1)
        .expect("renewal requested");
    agent
        .wait_log(&["new credentials stored"], 1)
        .expect("renewed");
    assert_ne!(
        std::fs::read(&cert).expect("cert"),
        std::fs::read(&cert1).expect("cert"),
        "a new certificate"
    );
    wait_for("the old certificate refused", PATIENCE, || {
        (!accepted(&cert1, &key1, "gw-cert")).then_some(())
    })
    .expect("old certificate refused after the new one was used");
    wait_for("gw-cert online on its new certificate", PATIENCE, || {
        (hub.device("gw-cert")?["online"] == true).then_some(())
    })
    .expect("online");

    // Operator rotation: new key, certificate and password; the old password is refused once they are in use.
    let old_password = device_secret(&fleet, "gw-cert");
    let renewals = agent.log().matches("new credentials stored").count();
    let v = hub
        .client
        .post(
            "/api/v1/devices/gw-cert/rotate-credentials",
            "application/json",
            b"{}",
            &[],
        )
        .expect("rotate");
    assert_eq!(v["rotation_requested"], true, "{v}");
    agent
        .wait_log(
            &["requested new credentials", "rotation asked by the hub"],
            1,
        )
        .expect("rotation requested");
    agent
        .wait_log(&["new credentials stored"], renewals + 1)
        .expect("rotated");
    assert_ne!(
        device_secret(&fleet, "gw-cert"),
        old_password,
        "a new password"
    );
    let metrics = hub.client.get_text("/metrics").expect("metrics");
    assert!(
        metrics.contains("flotilla_credentials_issued_total 2\n"),
        "a renewal and a rotation:\n{metrics}"
    );
    wait_for("the old password refused", PATIENCE, || {
        let (_, outcome) = Probe::connect(
            fleet.broker_port(),
            "gw-cert",
            Some(("gw-cert", &old_password)),
            None,
        );
        matches!(outcome, Connect::Refused(_)).then_some(())
    })
    .expect("old password refused");
    wait_for("gw-cert online after rotation", PATIENCE, || {
        (hub.device("gw-cert")?["online"] == true).then_some(())
    })
    .expect("online");
    let err = hub
        .client
        .post(
            "/api/v1/devices/no-such/rotate-credentials",
            "application/json",
            b"{}",
            &[],
        )
        .expect_err("unknown device")
        .to_string();
    assert!(err.starts_with("404"), "{err}");
}

/// A deployment named `name` of release `name@VERSION` (the sensor guest) on the gateways of `regions`; with `rollout`, rolled out with
/// manual approval.
fn scoped_spec(name: &str, regions: &str, version: &str, rollout: bool) -> String {
    let plan = if rollout {
        "[rollout]\nwaves = [\"rest\"]\nmanual_approval = true\n"
    } else {
        ""
    };
    format!(
        "name = \"{name}\"\n[target]\nselector = {{ role = \"gateway\" }}\nregions = [{regions}]\n\
         [[workloads]]\nname = \"{name}\"\nrelease = \"{name}@{version}\"\ntick_ms = 100\nmemory_mib = 4\n\
         cpu_ms = 20\nhealth_secs = 1\n{plan}"
    )
}

/// A token limited to eu-west sees and acts only there, through the API and the CLI alike: the device list is
/// filtered, a us-east device's detail, `why` and telemetry are refused, a rollout that reaches us-east can be
/// neither watched nor commanded while an eu-west one can; calls that are not region-aware refuse scoped tokens
/// altogether; admin tokens cannot be scoped; every refusal is a 403 with the reason and an audit entry.
#[test]
fn region_scoped_tokens_see_and_act_only_in_their_regions() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("eu-1", "eu-west", 52.5, 13.4))
        .agent(AgentSpec::new("us-1", "us-east", 40.7, -74.0))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    for name in ["eu", "both"] {
        for v in ["1.0.0", "2.0.0"] {
            hub.push_release(name, v, 1, &firmware("sensor"))
                .expect("release");
        }
    }
    for (name, regions) in [("eu", "\"eu-west\""), ("both", "\"eu-west\", \"us-east\"")] {
        hub.apply(&scoped_spec(name, regions, "1.0.0", false))
            .expect("first version");
    }
    hub.wait_workload("us-1", "both", "running")
        .expect("running");
    hub.wait_workload("eu-1", "eu", "running").expect("running");
    for (name, regions) in [("eu", "\"eu-west\""), ("both", "\"eu-west\", \"us-east\"")] {
        hub.apply(&scoped_spec(name, regions, "2.0.0", true))
            .expect("rollout starts");
    }

    let out = hub
        .cli(&[
            "token",
            "--name",
            "ops-eu",
            "--role",
            "operator",
            "--regions",
            "eu-west",
        ])
        .expect("scoped token");
    let token = out.trim().to_owned();
    let ops = flotilla_hub::client::Client::new(&hub.api, &token);
    let forbidden = |e: anyhow::Error, needle: &str| {
        let e = e.to_string();
        assert!(e.starts_with("403") && e.contains(needle), "{e}");
    };

    // Devices: filtered list; the other region's device refused in every view.
    let list = ops.get("/api/v1/devices").expect("list");
    let ids: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, ["eu-1"]);
    assert!(ops.get("/api/v1/devices/eu-1").is_ok());
    assert!(ops.get("/api/v1/why/eu-1/eu").is_ok());
    for path in [
        "/api/v1/devices/us-1",
        "/api/v1/why/us-1/both",
        "/api/v1/devices/us-1/telemetry",
        "/api/v1/devices/us-1/logs/both",
    ] {
        forbidden(ops.get(path).expect_err(path), "us-east");
    }
    // Rollouts: one within eu-west is watched and commanded; one reaching us-east is not.
    assert!(ops.get("/api/v1/rollouts/eu").is_ok());
    ops.post("/api/v1/rollouts/eu/pause", "application/json", b"{}", &[])
        .expect("pause within scope");
    ops.post("/api/v1/rollouts/eu/resume", "application/json", b"{}", &[])
        .expect("resume within scope");
    for action in ["pause", "approve", "abort"] {
        let path = format!("/api/v1/rollouts/both/{action}");
        forbidden(
            ops.post(&path, "application/json", b"{}", &[])
                .expect_err(&path),
            "the rollout of both reaches us-east",
        );
    }
    forbidden(
        ops.get("/api/v1/rollouts/both").expect_err("status"),
        "us-east",
    );
    forbidden(
        ops.post(
            "/api/v1/rollouts/both/retry",
            "application/json",
            b"{}",
            &[],
        )
        .expect_err("retry"),
        "us-east",
    );
    let status = hub
        .client
        .get("/api/v1/rollouts/both")
        .expect("admin sees it");
    assert_eq!(status["paused"], false, "{status}");
    // Calls that do not check regions refuse scoped tokens instead of acting on the whole fleet (an enrollment
    // token could enroll a device anywhere); the release catalogue, which belongs to no region, is readable.
    forbidden(
        ops.post("/api/v1/enrollment-tokens", "application/json", b"{}", &[])
            .expect_err("enrollment token"),
        "limited to regions",
    );
    assert!(
        ops.get("/api/v1/releases").is_ok(),
        "the catalogue is readable"
    );
    forbidden(ops.get("/api/v1/audit").expect_err("audit"), "needs Admin");

    // Deployments: only those confined to eu-west are listed, read and changed; an apply must stay within it.
    let names = |v: Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["name"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(names(ops.get("/api/v1/deployments").expect("list")), ["eu"]);
    assert!(ops.get("/api/v1/deployments/eu").is_ok());
    forbidden(
        ops.get("/api/v1/deployments/both").expect_err("status"),
        "deployment both targets eu-west, us-east",
    );
    forbidden(
        ops.get("/api/v1/deployments/both/secrets")
            .expect_err("secrets"),
        "us-east",
    );
    forbidden(
        ops.delete("/api/v1/deployments/both").expect_err("delete"),
        "us-east",
    );
    hub.push_release("mine", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    let apply = |spec: String| {
        ops.post(
            "/api/v1/deployments",
            "application/toml",
            spec.as_bytes(),
            &[("x-flotilla-spec-file", "spec.toml")],
        )
    };
    for (spec, why) in [
        (
            scoped_spec("mine", "\"eu-west\", \"us-east\"", "1.0.0", false),
            "targets eu-west, us-east",
        ),
        (
            scoped_spec("mine", "\"eu-west\"", "1.0.0", false)
                .replace("regions = [\"eu-west\"]\n", ""),
            "names no target regions",
        ),
        // Same name as a deployment that reaches us-east: no taking it over by narrowing it.
        (
            scoped_spec("both", "\"eu-west\"", "1.0.0", false),
            "deployment both targets eu-west, us-east",
        ),
    ] {
        forbidden(apply(spec).expect_err(why), why);
    }
    apply(scoped_spec("mine", "\"eu-west\"", "1.0.0", false)).expect("an apply within eu-west");
    hub.wait_workload("eu-1", "mine", "running")
        .expect("placed by the scoped operator");
    assert_eq!(hub.workload_state("us-1", "mine"), None);

    // The CLI obeys the same scope.
    let table = hub.cli(&["device", "ls", "--token", &token]).expect("ls");
    assert!(table.contains("eu-1") && !table.contains("us-1"), "{table}");
    let err = hub
        .cli(&["rollout", "pause", "both", "--token", &token])
        .expect_err("cli pause");
    assert!(err.to_string().contains("403"), "{err}");
    hub.cli(&["rollout", "pause", "eu", "--token", &token])
        .expect("cli pause within scope");

    // Admin tokens cannot be scoped; bad region lists are refused; ls shows the scope.
    let err = hub
        .cli(&[
            "token",
            "--name",
            "x",
            "--role",
            "admin",
            "--regions",
            "eu-west",
        ])
        .expect_err("scoped admin");
    assert!(err.to_string().contains("cannot be limited"), "{err}");
    let err = hub
        .client
        .post(
            "/api/v1/tokens",
            "application/json",
            br#"{"name":"y","role":"viewer","regions":[]}"#,
            &[],
        )
        .expect_err("empty regions");
    assert!(err.to_string().starts_with("400"), "{err}");
    let ls = hub.cli(&["token", "ls"]).expect("ls");
    assert!(
        ls.lines()
            .any(|l| l.starts_with("ops-eu") && l.contains("eu-west")),
        "{ls}"
    );
    // Every refusal is in the audit log, with its reason.
    let audit = hub.client.get("/api/v1/audit").expect("audit");
    let denied: Vec<&Value> = audit
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["action"] == "denied" && e["who"] == "ops-eu")
        .collect();
    assert!(denied.len() >= 10, "{audit}");
    assert!(
        denied.iter().any(|e| e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("the rollout of both reaches us-east"))),
        "{audit}"
    );
}
