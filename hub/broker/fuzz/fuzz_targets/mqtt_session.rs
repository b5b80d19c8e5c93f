//! Fuzz target: the embedded broker's handling of a client's byte stream. The bytes are framed and decoded as the
//! connection shell does (rumqttc's `mqttbytes` decoder with the broker's packet size cap), then applied to the
//! broker core the way `conn.rs` applies them, next to an observer subscribed to everything. Nothing may panic,
//! framing must always make progress, and deliveries may only go to the two live connections.
#![no_main]

use bytes::BytesMut;
use flotilla_broker::core::{ConnectRequest, Connected, Core, Limits, Message, Qos};
use flotilla_broker::topic;
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::Packet;

fn qos(q: QoS) -> Qos {
    match q {
        QoS::AtMostOnce => Qos::AtMostOnce,
        QoS::AtLeastOnce | QoS::ExactlyOnce => Qos::AtLeastOnce,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut core = Core::new(Limits { max_connections: 10, offline_queue: 8 });
    let observer = ConnectRequest { client_id: "observer".into(), clean_session: true, will: None };
    assert!(matches!(core.connect(1, observer), Connected::Accepted { .. }));
    let (granted, _) = core.subscribe(1, &[("#".into(), Qos::AtLeastOnce)]);
    assert_eq!(granted, [Some(Qos::AtLeastOnce)]);
    let mut buf = BytesMut::from(data);
    let mut connected = false;
    while !buf.is_empty() {
        let before = buf.len();
        let Ok(packet) = Packet::read(&mut buf, 4096) else { break };
        assert!(buf.len() < before, "framing made no progress");
        let deliveries = match packet {
            Packet::Connect(c) if !connected => {
                let will = c.last_will.and_then(|w| {
                    topic::validate_name(&w.topic).ok()?;
                    Some(Message { topic: w.topic.into(), payload: w.message, qos: qos(w.qos), retain: w.retain })
                });
                let req = ConnectRequest { client_id: c.client_id, clean_session: c.clean_session, will };
                match core.connect(2, req) {
                    Connected::Accepted { deliveries, .. } => {
                        connected = true;
                        deliveries
                    }
                    Connected::Refused(_) => break,
                }
            }
            _ if !connected => break,
            Packet::Publish(p) => {
                if topic::validate_name(&p.topic).is_err() {
                    break;
                }
                core.publish(Message { topic: p.topic.into(), payload: p.payload, qos: qos(p.qos), retain: p.retain })
            }
            Packet::Subscribe(s) => {
                let filters: Vec<(String, Qos)> = s.filters.into_iter().map(|f| (f.path, qos(f.qos))).collect();
                let (granted, _) = core.subscribe(2, &filters);
                assert_eq!(granted.len(), filters.len());
                Vec::new()
            }
            Packet::Unsubscribe(u) => {
                core.unsubscribe(2, &u.topics);
                Vec::new()
            }
            Packet::Disconnect => core.disconnect(2, true, Vec::new()),
            _ => Vec::new(),
        };
        for d in &deliveries {
            assert!(d.conn == 1 || d.conn == 2, "delivery to a connection that does not exist");
        }
    }
    // An abnormal end: the will (if any) goes to live connections only.
    for d in core.disconnect(2, false, Vec::new()) {
        assert_eq!(d.conn, 1);
    }
});
