//! The embedded broker against real clients over loopback: rumqttc (the client hub and agents use) for the
//! protocol paths, raw TCP for what a well-behaved client never does (garbage, silence, a stalled reader).

use bytes::BytesMut;
use flotilla_broker::auth::{Action, AllowAll, Authorizer, ConnectInfo, Principal, Refusal};
use flotilla_broker::{self as broker, Broker, Config};
use rumqttc::mqttbytes::v4::{Connect, LastWill, Packet, Publish, Subscribe};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, QoS};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Patience for anything that should happen promptly on loopback.
const PATIENCE: Duration = Duration::from_secs(20);

fn start(config: Config) -> Broker {
    start_with(config, std::sync::Arc::new(AllowAll))
}

fn start_with(config: Config, auth: std::sync::Arc<dyn Authorizer>) -> Broker {
    broker::start("127.0.0.1:0".parse().expect("addr"), config, auth).expect("broker starts")
}

/// A client whose received publishes arrive on a channel; its event loop runs in a task.
struct Client {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Publish>,
    task: tokio::task::JoinHandle<()>,
}

async fn client(b: &Broker, id: &str, subs: &[&str], will: Option<LastWill>) -> Client {
    let mut opts = MqttOptions::new(id, "127.0.0.1", b.addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(w) = will {
        opts.set_last_will(w);
    }
    let (client, mut el): (AsyncClient, EventLoop) = AsyncClient::new(opts, 64);
    for s in subs {
        client
            .subscribe(*s, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let want = subs.len();
    let task = tokio::spawn(async move {
        let mut acked = 0;
        while let Ok(ev) = el.poll().await {
            match ev {
                // Ready means connected: a client without subscriptions is ready at CONNACK, not before (a test
                // that relies on connection order, like takeover, would otherwise race).
                Event::Incoming(rumqttc::Packet::ConnAck(_)) if want == 0 => {
                    let _ = ready_tx.send(());
                }
                Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                    acked += 1;
                    if acked == want {
                        let _ = ready_tx.send(());
                    }
                }
                Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    let _ = tx.send(p);
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(PATIENCE, ready_rx.recv())
        .await
        .expect("subscribed in time");
    Client { client, rx, task }
}

async fn next(c: &mut Client) -> Publish {
    tokio::time::timeout(PATIENCE, c.rx.recv())
        .await
        .expect("a message in time")
        .expect("client running")
}

/// Encodes and writes one packet on a raw connection.
async fn send(s: &mut TcpStream, packet: Packet) {
    let mut buf = BytesMut::new();
    packet.write(&mut buf, usize::MAX).expect("encode");
    s.write_all(&buf).await.expect("write");
}

async fn raw_connect(b: &Broker, connect: Connect) -> TcpStream {
    let mut s = TcpStream::connect(b.addr).await.expect("tcp connect");
    send(&mut s, Packet::Connect(connect)).await;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.expect("connack");
    assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK accepted");
    s
}

#[tokio::test]
async fn qos1_routing_retained_messages_and_wills() {
    let b = start(Config::new(100));
    let mut hub = client(&b, "hub", &["d/+/report", "d/+/presence"], None).await;
    let will = LastWill::new("d/dev1/presence", "offline", QoS::AtLeastOnce, true);
    let dev = client(&b, "dev1", &["d/dev1/desired"], Some(will)).await;
    dev.client
        .publish("d/dev1/presence", QoS::AtLeastOnce, true, "online")
        .await
        .expect("queue");
    dev.client
        .publish("d/dev1/report", QoS::AtLeastOnce, false, "r1")
        .await
        .expect("queue");
    let p = next(&mut hub).await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain),
        ("d/dev1/presence", &b"online"[..], false)
    );
    let p = next(&mut hub).await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("d/dev1/report", &b"r1"[..])
    );

    // A later subscriber gets the retained presence, flagged as retained.
    let mut late = client(&b, "late", &["d/+/presence"], None).await;
    let p = next(&mut late).await;
    assert_eq!((&p.payload[..], p.retain), (&b"online"[..], true));

    // The device vanishes without DISCONNECT: its will reaches subscribers and replaces the retained message.
    dev.task.abort();
    let _ = dev.task.await;
    let p = next(&mut hub).await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("d/dev1/presence", &b"offline"[..])
    );
    let mut later = client(&b, "later", &["d/dev1/presence"], None).await;
    assert_eq!(&next(&mut later).await.payload[..], b"offline");
}

#[tokio::test]
async fn a_second_connection_with_the_same_id_takes_over() {
    let b = start(Config::new(100));
    let mut watcher = client(&b, "watcher", &["x/#"], None).await;
    let will = LastWill::new("x/gone", "old", QoS::AtLeastOnce, false);
    let old = client(&b, "same", &[], Some(will)).await;
    let new = client(&b, "same", &["x/for-new"], None).await;
    // The old connection's will marks the takeover.
    assert_eq!(&next(&mut watcher).await.payload[..], b"old");
    new.client
        .publish("x/for-new", QoS::AtLeastOnce, false, "hi")
        .await
        .expect("queue");
    let _ = next(&mut watcher).await;
    drop(old);
    let mut new = new;
    assert_eq!(&next(&mut new).await.payload[..], b"hi");
}

#[tokio::test]
async fn garbage_and_silence_end_only_the_offending_connection() {
    let b = start(Config::new(100));
    let mut hub = client(&b, "hub", &["p/#"], None).await;

    // Not MQTT at all: the broker closes the socket.
    let mut junk = TcpStream::connect(b.addr).await.expect("connect");
    junk.write_all(&[0xff; 64]).await.expect("write");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(PATIENCE, junk.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "connection closed");

    // A publish with a wildcard topic after a valid CONNECT is a protocol violation: closed, will sent.
    let mut c = Connect::new("bad");
    c.keep_alive = 60;
    c.last_will = Some(LastWill::new("p/bad", "bye", QoS::AtLeastOnce, false));
    let mut bad = raw_connect(&b, c).await;
    send(
        &mut bad,
        Packet::Publish(Publish::new("p/+", QoS::AtMostOnce, "x")),
    )
    .await;
    assert_eq!(&next(&mut hub).await.payload[..], b"bye");

    // A client that goes silent past 1.5 keepalive periods is dropped and its will published.
    let mut c = Connect::new("silent");
    c.keep_alive = 1;
    c.last_will = Some(LastWill::new(
        "p/silent",
        "timeout",
        QoS::AtLeastOnce,
        false,
    ));
    let _silent = raw_connect(&b, c).await;
    assert_eq!(&next(&mut hub).await.payload[..], b"timeout");

    // The broker still routes for everyone else.
    hub.client
        .publish("p/ok", QoS::AtLeastOnce, false, "ok")
        .await
        .expect("queue");
    assert_eq!(&next(&mut hub).await.payload[..], b"ok");
}

#[tokio::test]
async fn a_stalled_subscriber_is_bounded_and_does_not_block_others() {
    let mut config = Config::new(100);
    config.max_queued = 50;
    config.max_inflight = 10;
    let b = start(config);
    let mut fast = client(&b, "fast", &["t"], None).await;
    // Subscribes, then never reads again.
    let mut c = Connect::new("stalled");
    c.keep_alive = 0;
    let mut stalled = raw_connect(&b, c).await;
    let mut sub = Subscribe::new("t", QoS::AtLeastOnce);
    sub.pkid = 1;
    send(&mut stalled, Packet::Subscribe(sub)).await;
    let mut suback = [0u8; 5];
    stalled.read_exact(&mut suback).await.expect("suback");

    let publisher = client(&b, "pub", &[], None).await;
    // Large enough payloads that the stalled socket's buffers fill and the broker must queue, then drop.
    let payload = vec![0u8; 60_000];
    for _ in 0..400 {
        publisher
            .client
            .publish("t", QoS::AtLeastOnce, false, payload.clone())
            .await
            .expect("queue");
        let _ = next(&mut fast).await;
    }
    assert!(
        b.stats().dropped.load(Ordering::Relaxed) > 0,
        "the stalled subscriber's excess was dropped"
    );
}

#[tokio::test]
async fn persistent_session_receives_what_was_published_while_away() {
    let b = start(Config::new(100));
    let mut opts = MqttOptions::new("persist", "127.0.0.1", b.addr.port());
    opts.set_clean_session(false);
    let (c, mut el) = AsyncClient::new(opts.clone(), 16);
    c.subscribe("q", QoS::AtLeastOnce).await.expect("queue");
    loop {
        if let Event::Incoming(rumqttc::Packet::SubAck(_)) = el.poll().await.expect("poll") {
            break;
        }
    }
    c.disconnect().await.expect("queue disconnect");
    while el.poll().await.is_ok() {}
    let publisher = client(&b, "pub", &[], None).await;
    publisher
        .client
        .publish("q", QoS::AtLeastOnce, false, "while-away")
        .await
        .expect("queue");
    // Published once the broker has handled it: a round trip through a subscriber of our own.
    let mut probe = client(&b, "probe", &["q"], None).await;
    publisher
        .client
        .publish("q", QoS::AtLeastOnce, false, "marker")
        .await
        .expect("queue");
    assert_eq!(&next(&mut probe).await.payload[..], b"marker");

    let (_c, mut el) = AsyncClient::new(opts, 16);
    let got = tokio::time::timeout(PATIENCE, async {
        let mut got = vec![];
        while got.len() < 2 {
            if let Event::Incoming(rumqttc::Packet::Publish(p)) = el.poll().await.expect("poll") {
                got.push(p.payload);
            }
        }
        got
    })
    .await
    .expect("backlog in time");
    assert_eq!(got, [&b"while-away"[..], &b"marker"[..]]);
}

/// A toy policy for the hook itself: `alice`/`secret` may publish and subscribe under `alice/`, retain only
/// `alice/state`, and leave a will only on `alice/will`; `bob` is refused, everyone else is anonymous and may do
/// nothing.
#[derive(Debug)]
struct Toy;

impl Authorizer for Toy {
    fn authenticate(&self, c: &ConnectInfo<'_>) -> Result<Principal, Refusal> {
        match (c.username, c.password) {
            (Some("alice"), Some("secret")) if c.client_id == "alice" => Ok("alice".into()),
            (Some("alice"), Some("secret")) => Err(Refusal::NotAuthorized),
            (Some(_), _) => Err(Refusal::BadCredentials),
            (None, _) => Ok("anonymous".into()),
        }
    }

    fn allow(&self, principal: &str, action: Action, topic: &str) -> bool {
        match (principal, action) {
            ("alice", Action::Will) => topic == "alice/will",
            ("alice", Action::PublishRetained) => topic == "alice/state",
            ("alice", _) => topic.starts_with("alice/"),
            _ => false,
        }
    }
}

fn connect_packet(id: &str, login: Option<(&str, &str)>) -> Connect {
    let mut c = Connect::new(id);
    if let Some((u, p)) = login {
        c.set_login(u, p);
    }
    c
}

/// Reads one packet from a raw connection; `buf` keeps what arrived beyond it for the next call.
async fn read(s: &mut TcpStream, buf: &mut BytesMut) -> Packet {
    loop {
        match Packet::read(buf, 1 << 20) {
            Ok(p) => return p,
            Err(_) => {
                let n = tokio::time::timeout(PATIENCE, s.read_buf(buf))
                    .await
                    .expect("in time")
                    .expect("read");
                assert!(n > 0, "closed while waiting for a packet");
            }
        }
    }
}

/// The hook decides CONNECT (bad credentials 4, a wrong client id or a refused will 5), each SUBSCRIBE filter
/// (0x80 for a refused one, the others granted), and each PUBLISH (a refused one is acknowledged and dropped);
/// every denial is counted, and `disconnect` closes a principal's connections.
#[tokio::test]
async fn the_authorizer_decides_connects_subscriptions_and_publishes() {
    let b = start_with(Config::new(100), std::sync::Arc::new(Toy));
    let refused = |code: u8| [0x20, 2, 0, code];
    for (connect, code) in [
        (connect_packet("x", Some(("mallory", "guess"))), 4),
        (connect_packet("bob", Some(("alice", "secret"))), 5),
    ] {
        let mut s = TcpStream::connect(b.addr()).await.expect("tcp");
        send(&mut s, Packet::Connect(connect)).await;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await.expect("connack");
        assert_eq!(ack, refused(code));
    }
    let mut with_will = connect_packet("alice", Some(("alice", "secret")));
    with_will.last_will = Some(LastWill::new(
        "bob/presence",
        "gone",
        rumqttc::mqttbytes::QoS::AtLeastOnce,
        true,
    ));
    let mut s = TcpStream::connect(b.addr()).await.expect("tcp");
    send(&mut s, Packet::Connect(with_will)).await;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.expect("connack");
    assert_eq!(
        ack,
        refused(5),
        "a will on someone else's topic refuses the connection"
    );

    let mut alice = raw_connect(&b, connect_packet("alice", Some(("alice", "secret")))).await;
    let (mut abuf, mut nbuf) = (BytesMut::new(), BytesMut::new());
    let mut sub = Subscribe::new("alice/#", rumqttc::mqttbytes::QoS::AtLeastOnce);
    sub.pkid = 1;
    sub.add("#".into(), rumqttc::mqttbytes::QoS::AtLeastOnce);
    sub.add("$SYS/#".into(), rumqttc::mqttbytes::QoS::AtLeastOnce);
    send(&mut alice, Packet::Subscribe(sub)).await;
    let Packet::SubAck(ack) = read(&mut alice, &mut abuf).await else {
        panic!("expected SUBACK")
    };
    use rumqttc::mqttbytes::v4::SubscribeReasonCode as Code;
    assert_eq!(
        ack.return_codes,
        vec![
            Code::Success(rumqttc::mqttbytes::QoS::AtLeastOnce),
            Code::Failure,
            Code::Failure
        ]
    );
    // Allowed and refused publishes from an anonymous client: both acknowledged, only nothing delivered.
    let mut anon = raw_connect(&b, connect_packet("anon", None)).await;
    let mut p = Publish::new(
        "alice/inbox",
        rumqttc::mqttbytes::QoS::AtLeastOnce,
        "spoofed",
    );
    p.pkid = 7;
    send(&mut anon, Packet::Publish(p)).await;
    assert!(matches!(read(&mut anon, &mut nbuf).await, Packet::PubAck(a) if a.pkid == 7));
    let mut retained = Publish::new(
        "alice/inbox",
        rumqttc::mqttbytes::QoS::AtLeastOnce,
        "not retained here",
    );
    retained.pkid = 8;
    retained.retain = true;
    send(&mut alice, Packet::Publish(retained)).await;
    assert!(matches!(read(&mut alice, &mut abuf).await, Packet::PubAck(a) if a.pkid == 8));
    let mut own = Publish::new("alice/inbox", rumqttc::mqttbytes::QoS::AtLeastOnce, "hello");
    own.pkid = 9;
    send(&mut alice, Packet::Publish(own)).await;
    // Alice receives her own message (she subscribed to alice/#), and only it.
    let mut got = Vec::new();
    while got.len() < 2 {
        match read(&mut alice, &mut abuf).await {
            Packet::Publish(p) => got.push(String::from_utf8_lossy(&p.payload).into_owned()),
            Packet::PubAck(a) => got.push(format!("ack {}", a.pkid)),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        got.contains(&"hello".to_owned()) && got.contains(&"ack 9".to_owned()),
        "{got:?}"
    );
    let snap = b.snapshot();
    let denied: std::collections::BTreeMap<_, _> = snap.denied.into_iter().collect();
    assert_eq!(denied["connect"], 3, "{denied:?}");
    assert_eq!(denied["will"], 1, "{denied:?}");
    assert_eq!(denied["subscribe"], 2, "{denied:?}");
    assert_eq!(denied["publish"], 1, "{denied:?}");
    assert_eq!(denied["publish_retained"], 1, "{denied:?}");
    assert_eq!(b.disconnect("alice"), 1);
    let mut rest = Vec::new();
    let n = tokio::time::timeout(PATIENCE, alice.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read");
    let _ = n;
}
