//! The broker's decisions without sockets, tasks or clocks: sessions, subscriptions, retained messages and wills.
//! The connection shell (`conn.rs`) feeds in what clients did and delivers what comes out.
//!
//! MQTT 3.1.1 as the broker implements it: QoS 0 and 1 end to end (a QoS 2 publish is accepted with its exactly-once
//! handshake and forwarded at QoS 1; subscriptions are granted at most QoS 1, which the specification allows);
//! clean and persistent sessions (a persistent session keeps its subscriptions and up to
//! [`Limits::offline_queue`] QoS 1 messages while its client is away); retained messages; wills, published when a
//! connection ends without DISCONNECT or is taken over by a new connection with the same client id.

use super::topic::{self, Tree};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// One accepted TCP connection, numbered by the shell.
pub type ConnId = u64;

/// Delivery guarantee of a message or a subscription, as far as this broker goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

/// An application message. Cheap to clone: a fan-out shares the topic and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
}

/// A message for one live connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub conn: ConnId,
    pub msg: Message,
}

/// A client's CONNECT, decoded and with its will validated by the shell.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub client_id: String,
    pub clean_session: bool,
    pub will: Option<Message>,
}

/// Why a CONNECT is refused (maps to a CONNACK return code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An empty client id asks for a persistent session, which could never be resumed.
    IdentifierRejected,
    /// The broker is at its connection limit.
    ServerUnavailable,
}

/// The result of a CONNECT.
#[derive(Debug)]
pub enum Connected {
    Accepted {
        session_present: bool,
        /// The connection this one replaced (same client id): the shell closes it.
        replaced: Option<ConnId>,
        /// Messages queued for a persistent session while it was away, to send after CONNACK.
        backlog: Vec<Message>,
        /// The replaced connection's will, for its subscribers.
        deliveries: Vec<Delivery>,
    },
    Refused(Refusal),
}

/// Bounds that keep one client from growing the broker without limit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// QoS 1 messages kept per persistent session while its client is offline; the oldest are dropped beyond it.
    pub offline_queue: usize,
}

#[derive(Debug, Clone)]
struct Sub {
    client: Arc<str>,
    qos: Qos,
}

#[derive(Debug)]
struct Session {
    conn: Option<ConnId>,
    clean: bool,
    filters: HashMap<String, Qos>,
    offline: VecDeque<Message>,
    will: Option<Message>,
}

/// Broker state. Every method is a plain state transition; nothing here blocks.
#[derive(Debug)]
pub struct Core {
    limits: Limits,
    sessions: HashMap<Arc<str>, Session>,
    by_conn: HashMap<ConnId, Arc<str>>,
    /// Connections taken over by a newer one with the same client id, until they end: what they had in flight
    /// belongs to the session, which lives on.
    retired: HashMap<ConnId, Arc<str>>,
    subs: Tree<Sub>,
    retained: HashMap<Arc<str>, Message>,
    next_generated_id: u64,
    /// Messages dropped from full offline queues, for metrics.
    pub dropped_offline: u64,
}

impl Core {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            sessions: HashMap::new(),
            by_conn: HashMap::new(),
            retired: HashMap::new(),
            subs: Tree::default(),
            retained: HashMap::new(),
            next_generated_id: 0,
            dropped_offline: 0,
        }
    }

    /// Live connections.
    pub fn connections(&self) -> usize {
        self.by_conn.len()
    }

    /// Retained messages held.
    pub fn retained(&self) -> usize {
        self.retained.len()
    }

    /// A new connection sent CONNECT.
    pub fn connect(&mut self, conn: ConnId, req: ConnectRequest) -> Connected {
        let client_id = if req.client_id.is_empty() {
            if !req.clean_session {
                return Connected::Refused(Refusal::IdentifierRejected);
            }
            self.next_generated_id += 1;
            format!("flotilla-broker-auto-{}", self.next_generated_id)
        } else {
            req.client_id
        };
        let existing = self.sessions.get(client_id.as_str()).and_then(|s| s.conn);
        if existing.is_none() && self.by_conn.len() >= self.limits.max_connections {
            return Connected::Refused(Refusal::ServerUnavailable);
        }
        // Taking over a live session ends the old connection abnormally: its will goes out, as Mosquitto does.
        let mut deliveries = Vec::new();
        if let Some(old) = existing {
            if let Some(client) = self.by_conn.remove(&old) {
                self.retired.insert(old, client);
            }
            let will = self
                .sessions
                .get_mut(client_id.as_str())
                .and_then(|s| s.will.take());
            if let Some(will) = will {
                deliveries = self.publish(will);
            }
        }
        let client: Arc<str> = client_id.into();
        let mut session_present = false;
        let mut backlog = Vec::new();
        match self.sessions.get_mut(&client) {
            Some(s) if !req.clean_session && !s.clean => {
                session_present = true;
                backlog = s.offline.drain(..).collect();
                s.conn = Some(conn);
                s.will = req.will;
            }
            _ => {
                self.drop_session(&client);
                self.sessions.insert(
                    client.clone(),
                    Session {
                        conn: Some(conn),
                        clean: req.clean_session,
                        filters: HashMap::new(),
                        offline: VecDeque::new(),
                        will: req.will,
                    },
                );
            }
        }
        self.by_conn.insert(conn, client);
        Connected::Accepted {
            session_present,
            replaced: existing,
            backlog,
            deliveries,
        }
    }

    /// A connection ended. `graceful` means the client sent DISCONNECT (no will). `unacked` are QoS 1 messages the
    /// connection had not had acknowledged; a persistent session keeps them for its next connection.
    pub fn disconnect(
        &mut self,
        conn: ConnId,
        graceful: bool,
        unacked: Vec<Message>,
    ) -> Vec<Delivery> {
        // A connection that was taken over no longer owns its session, but its unacknowledged messages go on to
        // the session's current connection (or its offline queue), as MQTT requires of a persistent session.
        if let Some(client) = self.retired.remove(&conn) {
            return self.hand_over(&client, unacked);
        }
        let Some(client) = self.by_conn.remove(&conn) else {
            return Vec::new();
        };
        let Some(session) = self.sessions.get_mut(&client) else {
            return Vec::new();
        };
        let will = session.will.take();
        if session.clean {
            self.drop_session(&client);
        } else {
            session.conn = None;
            for msg in unacked.into_iter().rev() {
                session.offline.push_front(msg);
            }
            while session.offline.len() > self.limits.offline_queue {
                session.offline.pop_front();
                self.dropped_offline += 1;
            }
        }
        match will {
            Some(will) if !graceful => self.publish(will),
            _ => Vec::new(),
        }
    }

    /// SUBSCRIBE: returns the granted QoS per filter (`None` for a refused filter) and the retained messages the new
    /// subscriptions match, to send after SUBACK.
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        filters: &[(String, Qos)],
    ) -> (Vec<Option<Qos>>, Vec<Message>) {
        let Some(client) = self.by_conn.get(&conn).cloned() else {
            return (vec![None; filters.len()], Vec::new());
        };
        let mut granted = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        for (filter, qos) in filters {
            if topic::validate_filter(filter).is_err() {
                granted.push(None);
                continue;
            }
            let qos = *qos;
            let sub = Sub {
                client: client.clone(),
                qos,
            };
            self.subs.insert(filter, sub, |s| s.client == client);
            if let Some(s) = self.sessions.get_mut(&client) {
                s.filters.insert(filter.clone(), qos);
            }
            granted.push(Some(qos));
            let mut send = |m: &Message| {
                retained.push(Message {
                    qos: m.qos.min(qos),
                    retain: true,
                    ..m.clone()
                })
            };
            if filter.contains(['+', '#']) {
                self.retained
                    .values()
                    .filter(|m| topic::matches(filter, &m.topic))
                    .for_each(&mut send);
            } else if let Some(m) = self.retained.get(filter.as_str()) {
                send(m);
            }
        }
        (granted, retained)
    }

    /// UNSUBSCRIBE.
    pub fn unsubscribe(&mut self, conn: ConnId, filters: &[String]) {
        let Some(client) = self.by_conn.get(&conn).cloned() else {
            return;
        };
        for filter in filters {
            self.subs.remove(filter, |s| s.client == client);
            if let Some(s) = self.sessions.get_mut(&client) {
                s.filters.remove(filter);
            }
        }
    }

    /// A PUBLISH (or a will): updates the retained store and returns one delivery per live subscriber. Persistent
    /// sessions that are offline queue QoS 1 messages instead.
    pub fn publish(&mut self, msg: Message) -> Vec<Delivery> {
        if msg.retain {
            if msg.payload.is_empty() {
                self.retained.remove(&msg.topic);
            } else {
                // A copy, so a retained payload never pins the connection buffer it was read into.
                let stored = Message {
                    payload: Bytes::copy_from_slice(&msg.payload),
                    ..msg.clone()
                };
                self.retained.insert(msg.topic.clone(), stored);
            }
        }
        // Overlapping filters of one client deliver once, at the highest granted QoS.
        // Indexed by client, so a broadcast to N subscribers costs N lookups, not N^2 comparisons; first-seen order
        // is kept.
        let mut targets: Vec<(Arc<str>, Qos)> = Vec::new();
        let mut seen: HashMap<Arc<str>, usize> = HashMap::new();
        self.subs
            .for_each_match(&msg.topic, |s| match seen.get(&s.client) {
                Some(&i) => targets[i].1 = targets[i].1.max(s.qos),
                None => {
                    seen.insert(s.client.clone(), targets.len());
                    targets.push((s.client.clone(), s.qos));
                }
            });
        let mut out = Vec::with_capacity(targets.len());
        for (client, qos) in targets {
            let Some(session) = self.sessions.get_mut(&client) else {
                continue;
            };
            // Established subscriptions receive RETAIN = 0 (MQTT 3.1.1, 3.3.1.3).
            let m = Message {
                qos: msg.qos.min(qos),
                retain: false,
                ..msg.clone()
            };
            match session.conn {
                Some(conn) => out.push(Delivery { conn, msg: m }),
                None if m.qos == Qos::AtLeastOnce => {
                    session.offline.push_back(m);
                    if session.offline.len() > self.limits.offline_queue {
                        session.offline.pop_front();
                        self.dropped_offline += 1;
                    }
                }
                None => {}
            }
        }
        out
    }

    /// Messages a retired connection left unacknowledged, for the session that lives on (persistent only).
    fn hand_over(&mut self, client: &Arc<str>, unacked: Vec<Message>) -> Vec<Delivery> {
        let Some(session) = self.sessions.get_mut(client) else {
            return Vec::new();
        };
        if session.clean {
            return Vec::new();
        }
        match session.conn {
            Some(conn) => unacked
                .into_iter()
                .map(|msg| Delivery { conn, msg })
                .collect(),
            None => {
                session.offline.extend(unacked);
                while session.offline.len() > self.limits.offline_queue {
                    session.offline.pop_front();
                    self.dropped_offline += 1;
                }
                Vec::new()
            }
        }
    }

    fn drop_session(&mut self, client: &Arc<str>) {
        if let Some(old) = self.sessions.remove(client) {
            for filter in old.filters.keys() {
                self.subs.remove(filter, |s| s.client == *client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &str, qos: Qos, retain: bool) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos,
            retain,
        }
    }

    fn core() -> Core {
        Core::new(Limits {
            max_connections: 3,
            offline_queue: 2,
        })
    }

    fn connect(
        core: &mut Core,
        conn: ConnId,
        id: &str,
        clean: bool,
        will: Option<Message>,
    ) -> Connected {
        core.connect(
            conn,
            ConnectRequest {
                client_id: id.into(),
                clean_session: clean,
                will,
            },
        )
    }

    /// Renders deliveries as `conn:topic=payload@qos[r]`, so a test reads as a transcript.
    fn show(ds: &[Delivery]) -> Vec<String> {
        ds.iter()
            .map(|d| {
                format!(
                    "{}:{}={}@{}{}",
                    d.conn,
                    d.msg.topic,
                    String::from_utf8_lossy(&d.msg.payload),
                    d.msg.qos as u8,
                    if d.msg.retain { "r" } else { "" }
                )
            })
            .collect()
    }

    #[test]
    fn routes_to_matching_subscribers_once_at_min_qos() {
        let mut c = core();
        connect(&mut c, 1, "hub", true, None);
        connect(&mut c, 2, "dev", true, None);
        let (granted, _) = c.subscribe(
            1,
            &[
                ("d/+/report".into(), Qos::AtLeastOnce),
                ("d/#".into(), Qos::AtMostOnce),
                ("bad/#/x".into(), Qos::AtLeastOnce),
            ],
        );
        assert_eq!(
            granted,
            [Some(Qos::AtLeastOnce), Some(Qos::AtMostOnce), None]
        );
        c.subscribe(2, &[("d/dev/desired".into(), Qos::AtMostOnce)]);
        assert_eq!(
            show(&c.publish(msg("d/dev/report", "r", Qos::AtLeastOnce, true))),
            ["1:d/dev/report=r@1"]
        );
        assert_eq!(
            show(&c.publish(msg("d/dev/desired", "s", Qos::AtLeastOnce, false))),
            ["1:d/dev/desired=s@0", "2:d/dev/desired=s@0"]
        );
        c.unsubscribe(1, &["d/#".into()]);
        assert_eq!(
            show(&c.publish(msg("d/dev/desired", "t", Qos::AtLeastOnce, false))),
            ["2:d/dev/desired=t@0"]
        );
    }

    #[test]
    fn retained_messages_reach_later_subscribers_and_empty_payload_clears() {
        let mut c = core();
        connect(&mut c, 1, "a", true, None);
        c.publish(msg("p/1", "on", Qos::AtLeastOnce, true));
        c.publish(msg("p/2", "on", Qos::AtMostOnce, true));
        let (_, r) = c.subscribe(1, &[("p/+".into(), Qos::AtLeastOnce)]);
        let mut seen: Vec<_> = r
            .iter()
            .map(|m| (m.topic.to_string(), m.qos, m.retain))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("p/1".into(), Qos::AtLeastOnce, true),
                ("p/2".into(), Qos::AtMostOnce, true)
            ]
        );
        c.publish(msg("p/1", "", Qos::AtLeastOnce, true));
        assert_eq!(c.retained(), 1);
        let (_, r) = c.subscribe(1, &[("p/2".into(), Qos::AtMostOnce)]);
        assert_eq!(r.len(), 1, "exact filter finds its retained message");
    }

    #[test]
    fn will_goes_out_on_abnormal_end_and_takeover_but_not_on_disconnect() {
        let mut c = core();
        connect(&mut c, 1, "hub", true, None);
        c.subscribe(1, &[("p/#".into(), Qos::AtLeastOnce)]);
        let will = || Some(msg("p/dev", "offline", Qos::AtLeastOnce, true));
        connect(&mut c, 2, "dev", true, will());
        assert_eq!(show(&c.disconnect(2, false, vec![])), ["1:p/dev=offline@1"]);
        connect(&mut c, 3, "dev", true, will());
        assert!(
            c.disconnect(3, true, vec![]).is_empty(),
            "DISCONNECT discards the will"
        );
        connect(&mut c, 4, "dev", true, will());
        let Connected::Accepted {
            replaced,
            deliveries,
            ..
        } = connect(&mut c, 5, "dev", true, will())
        else {
            panic!("refused")
        };
        assert_eq!(replaced, Some(4));
        assert_eq!(show(&deliveries), ["1:p/dev=offline@1"]);
        assert!(
            c.disconnect(4, false, vec![]).is_empty(),
            "the replaced connection owns nothing"
        );
        assert_eq!(c.connections(), 2);
    }

    #[test]
    fn persistent_session_keeps_subscriptions_and_queues_while_away() {
        let mut c = core();
        connect(&mut c, 1, "dev", false, None);
        c.subscribe(1, &[("x".into(), Qos::AtLeastOnce)]);
        let unacked = vec![msg("x", "0", Qos::AtLeastOnce, false)];
        c.disconnect(1, false, unacked);
        c.publish(msg("x", "1", Qos::AtLeastOnce, false));
        c.publish(msg("x", "q0", Qos::AtMostOnce, false));
        c.publish(msg("x", "2", Qos::AtLeastOnce, false));
        assert_eq!(c.dropped_offline, 1, "queue of 2 keeps the newest");
        let Connected::Accepted {
            session_present,
            backlog,
            ..
        } = connect(&mut c, 2, "dev", false, None)
        else {
            panic!("refused")
        };
        assert!(session_present);
        let payloads: Vec<_> = backlog.iter().map(|m| m.payload.clone()).collect();
        assert_eq!(
            payloads,
            [Bytes::from_static(b"1"), Bytes::from_static(b"2")]
        );
        assert_eq!(
            show(&c.publish(msg("x", "3", Qos::AtLeastOnce, false))),
            ["2:x=3@1"]
        );
        // A clean connect discards the stored session.
        c.disconnect(2, true, vec![]);
        let Connected::Accepted {
            session_present, ..
        } = connect(&mut c, 3, "dev", true, None)
        else {
            panic!("refused")
        };
        assert!(!session_present);
        assert!(c.publish(msg("x", "4", Qos::AtLeastOnce, false)).is_empty());
    }

    #[test]
    fn a_taken_over_connection_hands_its_unacked_messages_to_the_session() {
        let mut c = core();
        connect(&mut c, 1, "dev", false, None);
        c.subscribe(1, &[("x".into(), Qos::AtLeastOnce)]);
        // Connection 1 is replaced while it still holds a message it never had acknowledged.
        connect(&mut c, 2, "dev", false, None);
        let unacked = vec![msg("x", "in-flight", Qos::AtLeastOnce, false)];
        assert_eq!(show(&c.disconnect(1, false, unacked)), ["2:x=in-flight@1"]);
        // With a clean session the same hand-over delivers nothing.
        connect(&mut c, 3, "tmp", true, None);
        connect(&mut c, 4, "tmp", true, None);
        assert!(
            c.disconnect(3, false, vec![msg("x", "lost", Qos::AtLeastOnce, false)])
                .is_empty()
        );
    }

    #[test]
    fn refusals() {
        let mut c = core();
        assert!(matches!(
            connect(&mut c, 1, "", false, None),
            Connected::Refused(Refusal::IdentifierRejected)
        ));
        assert!(matches!(
            connect(&mut c, 1, "", true, None),
            Connected::Accepted { .. }
        ));
        connect(&mut c, 2, "b", true, None);
        connect(&mut c, 3, "c", true, None);
        assert!(matches!(
            connect(&mut c, 4, "d", true, None),
            Connected::Refused(Refusal::ServerUnavailable)
        ));
        assert!(
            matches!(
                connect(&mut c, 5, "c", true, None),
                Connected::Accepted {
                    replaced: Some(3),
                    ..
                }
            ),
            "takeover is allowed at the limit"
        );
    }

    /// One step of the model test; indices pick among what exists, modulo its size.
    #[derive(Debug, Clone)]
    enum Op {
        Connect {
            client: usize,
            clean: bool,
        },
        Disconnect {
            conn: usize,
            graceful: bool,
        },
        Subscribe {
            conn: usize,
            filter: usize,
            qos1: bool,
        },
        Unsubscribe {
            conn: usize,
            filter: usize,
        },
        Publish {
            topic: usize,
            qos1: bool,
            retain: bool,
        },
    }

    const CLIENTS: [&str; 3] = ["a", "b", "c"];
    const FILTERS: [&str; 5] = ["d/+/r", "d/#", "d/1/r", "#", "x"];
    const TOPICS: [&str; 4] = ["d/1/r", "d/2/r", "x", "d"];

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0..3usize, any::<bool>()).prop_map(|(client, clean)| Op::Connect { client, clean }),
            (0..8usize, any::<bool>())
                .prop_map(|(conn, graceful)| Op::Disconnect { conn, graceful }),
            (0..8usize, 0..5usize, any::<bool>()).prop_map(|(conn, filter, qos1)| Op::Subscribe {
                conn,
                filter,
                qos1
            }),
            (0..8usize, 0..5usize).prop_map(|(conn, filter)| Op::Unsubscribe { conn, filter }),
            (0..4usize, any::<bool>(), any::<bool>()).prop_map(|(topic, qos1, retain)| {
                Op::Publish {
                    topic,
                    qos1,
                    retain,
                }
            }),
        ]
    }

    /// The specification, written the slow and obvious way.
    #[derive(Debug, Default)]
    struct ModelSession {
        conn: Option<ConnId>,
        clean: bool,
        filters: HashMap<&'static str, Qos>,
        offline: usize,
    }

    proptest::proptest! {
        // Offline-queue overflow needs a long run of the right steps; 2,000 cases find it (256 did not).
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Random connects, disconnects, takeovers, subscriptions and publishes across three clients: the core
        /// delivers exactly to the live sessions with a matching filter, once each, at the right QoS, and a
        /// resumed persistent session gets exactly what it missed.
        #[test]
        fn core_agrees_with_a_model(ops in proptest::collection::vec(op(), 1..60)) {
            let limit = 3;
            let mut c = Core::new(Limits { max_connections: 100, offline_queue: limit });
            let mut model: HashMap<&str, ModelSession> = HashMap::new();
            let mut live: Vec<(ConnId, &str)> = Vec::new();
            let mut next: ConnId = 0;
            let qos = |q1: bool| if q1 { Qos::AtLeastOnce } else { Qos::AtMostOnce };
            for op in ops {
                match op {
                    Op::Connect { client, clean } => {
                        let id = CLIENTS[client];
                        next += 1;
                        let Connected::Accepted { session_present, replaced, backlog, .. } = c.connect(
                            next,
                            ConnectRequest { client_id: id.into(), clean_session: clean, will: None },
                        ) else {
                            panic!("refused below the limit")
                        };
                        let old = model.get(id).and_then(|s| s.conn);
                        proptest::prop_assert_eq!(replaced, old);
                        live.retain(|(_, cl)| *cl != id);
                        let resume = !clean && model.get(id).is_some_and(|s| !s.clean);
                        proptest::prop_assert_eq!(session_present, resume);
                        if resume {
                            let s = model.get_mut(id).expect("resumed session exists");
                            proptest::prop_assert_eq!(backlog.len(), s.offline.min(limit));
                            s.offline = 0;
                            s.conn = Some(next);
                        } else {
                            proptest::prop_assert!(backlog.is_empty());
                            model.insert(id, ModelSession { conn: Some(next), clean, ..Default::default() });
                        }
                        live.push((next, id));
                    }
                    Op::Disconnect { conn, graceful } => {
                        if live.is_empty() { continue; }
                        let (cid, id) = live.remove(conn % live.len());
                        proptest::prop_assert!(c.disconnect(cid, graceful, vec![]).is_empty(), "no wills here");
                        let s = model.get_mut(id).expect("live session exists");
                        if s.clean { model.remove(id); } else { s.conn = None; }
                    }
                    Op::Subscribe { conn, filter, qos1 } => {
                        if live.is_empty() { continue; }
                        let (cid, id) = live[conn % live.len()];
                        let (granted, _) = c.subscribe(cid, &[(FILTERS[filter].into(), qos(qos1))]);
                        proptest::prop_assert_eq!(granted, vec![Some(qos(qos1))]);
                        model.get_mut(id).expect("live").filters.insert(FILTERS[filter], qos(qos1));
                    }
                    Op::Unsubscribe { conn, filter } => {
                        if live.is_empty() { continue; }
                        let (cid, id) = live[conn % live.len()];
                        c.unsubscribe(cid, &[FILTERS[filter].into()]);
                        model.get_mut(id).expect("live").filters.remove(FILTERS[filter]);
                    }
                    Op::Publish { topic, qos1, retain } => {
                        let t = TOPICS[topic];
                        let got = c.publish(msg(t, "p", qos(qos1), retain));
                        let mut got: Vec<(ConnId, Qos)> = got.iter().map(|d| (d.conn, d.msg.qos)).collect();
                        got.sort();
                        let mut want = Vec::new();
                        for s in model.values_mut() {
                            let best = s.filters.iter().filter(|(f, _)| topic::matches(f, t)).map(|(_, q)| *q).max();
                            let Some(best) = best else { continue };
                            let q = qos(qos1).min(best);
                            match s.conn {
                                Some(conn) => want.push((conn, q)),
                                None if q == Qos::AtLeastOnce => s.offline += 1,
                                None => {}
                            }
                        }
                        want.sort();
                        proptest::prop_assert_eq!(got, want, "deliveries for {}", t);
                    }
                }
                proptest::prop_assert_eq!(c.connections(), live.len());
            }
        }
    }
}
