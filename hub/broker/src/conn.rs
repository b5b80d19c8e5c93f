//! One client connection: CONNECT handshake, then a reader (decode, keepalive, route, acknowledge) and a writer
//! (queued messages, QoS 1 packet ids in flight) polled together in one task, so neither side's full socket buffer
//! can stall the other.

use super::auth::{Action, ConnectInfo, Refusal as AuthRefusal};
use super::core::{ConnId, ConnectRequest, Connected, Message, Qos, Refusal};
use super::{Handle, Out, Shared, topic};
use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, SubAck, SubscribeReasonCode,
    UnsubAck,
};
use rumqttc::mqttbytes::{self, Protocol, QoS};
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// A client that connects but says nothing is dropped after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Buffers that grew past this (a large artifact chunk) are released once empty, so idle connections stay small.
const BUF_KEEP: usize = 16 * 1024;
/// Bytes gathered before a write, so a burst becomes few syscalls.
const WRITE_BATCH: usize = 64 * 1024;
/// QoS 2 packet ids awaiting PUBREL per connection; more means a misbehaving client.
const MAX_AWAITING_REL: usize = 1024;
/// Control packets (acks, PINGRESP) queued for a client that does not read them; beyond this the reader stops
/// reading, so a client that only sends cannot grow the broker's memory.
const MAX_PENDING_CONTROL: usize = 1024;

/// Back-pressure from the writer to the reader for control packets.
#[derive(Debug, Default)]
struct Control {
    pending: AtomicUsize,
    drained: tokio::sync::Notify,
}

impl Control {
    /// Waits until the writer has taken enough queued control packets.
    async fn room(&self) {
        loop {
            let drained = self.drained.notified();
            if self.pending.load(Ordering::Acquire) < MAX_PENDING_CONTROL {
                return;
            }
            drained.await;
        }
    }

    fn send(&self, tx: &mpsc::UnboundedSender<Out>, bytes: Bytes) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let _ = tx.send(Out::Raw(bytes));
    }

    fn taken(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.drained.notify_one();
    }
}

/// Why a connection ended other than by DISCONNECT.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed packet: {0}")]
    Decode(#[from] mqttbytes::Error),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("invalid topic: {0}")]
    Topic(#[from] topic::TopicError),
    #[error("keepalive expired")]
    KeepAlive,
    #[error("connection closed by peer")]
    Eof,
}

/// How the reader side ended without error.
enum Ending {
    /// The client sent DISCONNECT: no will.
    Disconnect,
    /// A newer connection with the same client id took over.
    TakenOver,
}

/// Serves one client over any byte stream (TCP, or TLS over TCP) until it leaves or breaks the protocol.
/// What the listener knows about a connection before its CONNECT.
#[derive(Debug, Clone, Copy)]
pub(super) struct Meta {
    pub peer: SocketAddr,
    pub tls: bool,
    /// SHA-256 of the verified client certificate, on a TLS listener that received one.
    pub cert_sha256: Option<[u8; 32]>,
}

pub(super) async fn run<S>(shared: Arc<Shared>, id: ConnId, stream: S, meta: Meta)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = meta.peer;
    match serve(&shared, id, stream, meta).await {
        Ok(()) => tracing::debug!(%peer, conn = id, "mqtt connection closed"),
        Err(e) => tracing::debug!(%peer, conn = id, error = %e, "mqtt connection ended"),
    }
}

fn qos_in(q: QoS) -> Qos {
    match q {
        QoS::AtMostOnce => Qos::AtMostOnce,
        // QoS 2 is completed with the publisher and forwarded at QoS 1 (the most this broker grants).
        QoS::AtLeastOnce | QoS::ExactlyOnce => Qos::AtLeastOnce,
    }
}

fn encode(packet: &Packet) -> Result<Bytes, ConnError> {
    let mut buf = BytesMut::with_capacity(packet.size());
    packet.write(&mut buf, usize::MAX)?;
    Ok(buf.freeze())
}

async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Packet, ConnError> {
    loop {
        match Packet::read(buf, max_packet) {
            Ok(p) => {
                if buf.is_empty() && buf.capacity() > BUF_KEEP {
                    *buf = BytesMut::with_capacity(512);
                }
                return Ok(p);
            }
            Err(mqttbytes::Error::InsufficientBytes(n)) => {
                buf.reserve(n.max(256));
                if rd.read_buf(buf).await? == 0 {
                    return Err(ConnError::Eof);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Counts a denial and logs the first few of a connection (a misbehaving client must not flood the log).
fn denied(shared: &Shared, logged: &mut u32, principal: &str, action: Action, topic: &str) {
    shared.stats.denied(action).fetch_add(1, Ordering::Relaxed);
    if *logged < DENIALS_LOGGED {
        *logged += 1;
        tracing::warn!(
            principal,
            action = action.label(),
            topic,
            "mqtt access denied"
        );
    }
}

/// Denials logged per connection; the rest are only counted.
const DENIALS_LOGGED: u32 = 3;

async fn serve<S>(
    shared: &Arc<Shared>,
    id: ConnId,
    mut stream: S,
    meta: Meta,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max_packet = shared.config.max_packet;
    let mut rbuf = BytesMut::with_capacity(512);
    let first = tokio::time::timeout(
        CONNECT_TIMEOUT,
        read_packet(&mut stream, &mut rbuf, max_packet),
    )
    .await
    .map_err(|_| ConnError::Protocol("no CONNECT within 10 s"))??;
    let Packet::Connect(connect) = first else {
        return Err(ConnError::Protocol("the first packet must be CONNECT"));
    };
    if connect.protocol != Protocol::V4 {
        let nack = ConnAck::new(ConnectReturnCode::RefusedProtocolVersion, false);
        stream.write_all(&encode(&Packet::ConnAck(nack))?).await?;
        return Err(ConnError::Protocol("only MQTT 3.1.1 is spoken here"));
    }
    let info = ConnectInfo {
        client_id: &connect.client_id,
        username: connect.login.as_ref().map(|l| l.username.as_str()),
        password: connect.login.as_ref().map(|l| l.password.as_str()),
        cert_sha256: meta.cert_sha256,
        tls: meta.tls,
        peer: meta.peer,
    };
    let authenticated = shared.auth.authenticate(&info).and_then(|p| {
        // A will is published in the client's name: it must be a topic the client may publish on itself.
        match &connect.last_will {
            Some(w) if !shared.auth.allow(&p, Action::Will, &w.topic) => {
                shared.stats.denied_will.fetch_add(1, Ordering::Relaxed);
                Err(AuthRefusal::NotAuthorized)
            }
            _ => Ok(p),
        }
    });
    let principal = match authenticated {
        Ok(p) => p,
        Err(why) => {
            shared.stats.denied_connect.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %meta.peer, client_id = %connect.client_id, ?why, "mqtt connection refused");
            let code = match why {
                AuthRefusal::BadCredentials => ConnectReturnCode::BadUserNamePassword,
                AuthRefusal::NotAuthorized => ConnectReturnCode::NotAuthorized,
            };
            stream
                .write_all(&encode(&Packet::ConnAck(ConnAck::new(code, false)))?)
                .await?;
            return Err(ConnError::Protocol("not authenticated"));
        }
    };
    let will = match connect.last_will {
        Some(w) => {
            topic::validate_name(&w.topic)?;
            Some(Message {
                topic: w.topic.into(),
                // A copy: the will may live for days and must not pin the read buffer.
                payload: Bytes::copy_from_slice(&w.message),
                qos: qos_in(w.qos),
                retain: w.retain,
            })
        }
        None => None,
    };
    let request = ConnectRequest {
        client_id: connect.client_id,
        clean_session: connect.clean_session,
        will,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    // Encoded before the session is registered: nothing may fail between registering it and owning its cleanup.
    let connack = |present| {
        encode(&Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            present,
        )))
    };
    let (connack_new, connack_present) = (connack(false)?, connack(true)?);
    let control = Arc::new(Control::default());
    let refused = {
        let mut st = shared.lock();
        match st.core.connect(id, request) {
            Connected::Refused(why) => Some(why),
            Connected::Accepted {
                session_present,
                replaced,
                backlog,
                deliveries,
            } => {
                if let Some(h) = replaced.and_then(|old| st.conns.remove(&old)) {
                    let _ = h.tx.send(Out::Close);
                }
                // CONNACK is queued under the lock, so no message routed to this connection can precede it.
                let ack = if session_present {
                    connack_present
                } else {
                    connack_new
                };
                control.send(&tx, ack);
                let mut handle = Handle {
                    tx: tx.clone(),
                    principal: principal.clone(),
                    queued: queued.clone(),
                    warned: false,
                };
                for msg in backlog {
                    shared.deliver(&mut handle, id, msg);
                }
                st.conns.insert(id, handle);
                shared.dispatch(&mut st, deliveries);
                None
            }
        }
    };
    if let Some(why) = refused {
        let code = match why {
            Refusal::IdentifierRejected => ConnectReturnCode::BadClientId,
            Refusal::ServerUnavailable => ConnectReturnCode::ServiceUnavailable,
        };
        stream
            .write_all(&encode(&Packet::ConnAck(ConnAck::new(code, false)))?)
            .await?;
        return Err(ConnError::Protocol("connection refused"));
    }
    let keepalive = connect.keep_alive;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut writer = Writer {
        inflight: VecDeque::new(),
        backlog: VecDeque::new(),
        pkid: 0,
        buf: BytesMut::new(),
        max_inflight: shared.config.max_inflight,
        queued,
        control: control.clone(),
        revoked: false,
    };
    let ended = tokio::select! {
        r = read_loop(shared, id, &principal, &mut rd, rbuf, keepalive, &tx, &control) => r,
        r = writer.run(&mut wr, &mut rx) => r.map(|()| Ending::TakenOver),
    };
    let graceful = matches!(ended, Ok(Ending::Disconnect)) || writer.revoked;
    {
        let mut st = shared.lock();
        // Once the handle is gone nothing more is routed here, so draining now loses no message.
        st.conns.remove(&id);
        let unacked = writer.unacked(&mut rx);
        let deliveries = st.core.disconnect(id, graceful, unacked);
        shared.dispatch(&mut st, deliveries);
    }
    ended.map(|_| ())
}

#[allow(clippy::too_many_arguments)] // Reason: the connection's parts, passed once from `serve`.
async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Shared,
    id: ConnId,
    principal: &str,
    rd: &mut R,
    mut buf: BytesMut,
    keepalive: u16,
    tx: &mpsc::UnboundedSender<Out>,
    control: &Control,
) -> Result<Ending, ConnError> {
    // MQTT 3.1.1, 3.1.2.10: one and a half keepalive periods of silence end the connection.
    let grace = (keepalive > 0).then(|| Duration::from_millis(u64::from(keepalive) * 1500));
    let max_packet = shared.config.max_packet;
    let mut awaiting_rel: HashSet<u16> = HashSet::new();
    let mut logged = 0;
    let raw = |p: Packet| -> Result<(), ConnError> {
        control.send(tx, encode(&p)?);
        Ok(())
    };
    // A client that stops reading its acknowledgements is given the keepalive grace (or a minute) to resume.
    let patience = grace.unwrap_or(Duration::from_secs(60));
    loop {
        tokio::time::timeout(patience, control.room())
            .await
            .map_err(|_| ConnError::Protocol("client does not read its acknowledgements"))?;
        let packet = match grace {
            Some(g) => tokio::time::timeout(g, read_packet(rd, &mut buf, max_packet))
                .await
                .map_err(|_| ConnError::KeepAlive)??,
            None => read_packet(rd, &mut buf, max_packet).await?,
        };
        match packet {
            Packet::Publish(p) => {
                topic::validate_name(&p.topic)?;
                let first_time = match p.qos {
                    QoS::ExactlyOnce => {
                        if awaiting_rel.len() >= MAX_AWAITING_REL && !awaiting_rel.contains(&p.pkid)
                        {
                            return Err(ConnError::Protocol(
                                "too many QoS 2 messages awaiting PUBREL",
                            ));
                        }
                        awaiting_rel.insert(p.pkid)
                    }
                    _ => true,
                };
                let action = if p.retain {
                    Action::PublishRetained
                } else {
                    Action::Publish
                };
                // A refused publish is acknowledged and dropped: MQTT 3.1.1 has no negative PUBACK, and a client
                // that is not acknowledged would only send it again.
                let allowed = shared.auth.allow(principal, action, &p.topic);
                if !allowed && first_time {
                    denied(shared, &mut logged, principal, action, &p.topic);
                }
                if first_time && allowed {
                    let msg = Message {
                        topic: p.topic.into(),
                        payload: p.payload,
                        qos: qos_in(p.qos),
                        retain: p.retain,
                    };
                    shared.stats.received.fetch_add(1, Ordering::Relaxed);
                    let mut st = shared.lock();
                    let deliveries = st.core.publish(msg);
                    shared
                        .stats
                        .delivered
                        .fetch_add(deliveries.len() as u64, Ordering::Relaxed);
                    shared.dispatch(&mut st, deliveries);
                }
                // Acknowledged only once every subscriber's queue holds the message.
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => raw(Packet::PubAck(PubAck::new(p.pkid)))?,
                    QoS::ExactlyOnce => raw(Packet::PubRec(PubRec::new(p.pkid)))?,
                }
            }
            Packet::PubAck(a) => {
                let _ = tx.send(Out::Acked(a.pkid));
            }
            Packet::PubRel(r) => {
                awaiting_rel.remove(&r.pkid);
                raw(Packet::PubComp(PubComp::new(r.pkid)))?;
            }
            Packet::Subscribe(s) => {
                // Each filter is authorised as a whole: one that could match a topic the principal may not read
                // is refused (0x80 in the SUBACK), never silently narrowed.
                let allowed: Vec<bool> = s
                    .filters
                    .iter()
                    .map(|f| shared.auth.allow(principal, Action::Subscribe, &f.path))
                    .collect();
                for (f, ok) in s.filters.iter().zip(&allowed) {
                    if !ok {
                        denied(shared, &mut logged, principal, Action::Subscribe, &f.path);
                    }
                }
                let filters: Vec<(String, Qos)> = s
                    .filters
                    .into_iter()
                    .zip(&allowed)
                    .filter(|(_, ok)| **ok)
                    .map(|(f, _)| (f.path, qos_in(f.qos)))
                    .collect();
                let mut st = shared.lock();
                let (granted, retained) = st.core.subscribe(id, &filters);
                let mut granted = granted.into_iter();
                let codes = allowed
                    .iter()
                    .map(|ok| match ok.then(|| granted.next()).flatten().flatten() {
                        Some(Qos::AtMostOnce) => SubscribeReasonCode::Success(QoS::AtMostOnce),
                        Some(Qos::AtLeastOnce) => SubscribeReasonCode::Success(QoS::AtLeastOnce),
                        None => SubscribeReasonCode::Failure,
                    })
                    .collect();
                // SUBACK first, then the retained messages, all under the lock so nothing overtakes them.
                raw(Packet::SubAck(SubAck::new(s.pkid, codes)))?;
                if let Some(h) = st.conns.get_mut(&id) {
                    for msg in retained {
                        shared.deliver(h, id, msg);
                    }
                }
            }
            Packet::Unsubscribe(u) => {
                shared.lock().core.unsubscribe(id, &u.topics);
                raw(Packet::UnsubAck(UnsubAck::new(u.pkid)))?;
            }
            Packet::PingReq => raw(Packet::PingResp)?,
            Packet::Disconnect => return Ok(Ending::Disconnect),
            Packet::Connect(_) => return Err(ConnError::Protocol("second CONNECT")),
            Packet::PubRec(_)
            | Packet::PubComp(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp => return Err(ConnError::Protocol("packet a client must not send")),
        }
    }
}

/// The sending side: turns queued messages into PUBLISH packets and tracks QoS 1 ones until acknowledged.
struct Writer {
    /// (packet id, message) in send order.
    inflight: VecDeque<(u16, Message)>,
    /// QoS 1 messages waiting for a free in-flight slot.
    backlog: VecDeque<Message>,
    pkid: u16,
    buf: BytesMut,
    max_inflight: usize,
    queued: Arc<AtomicUsize>,
    control: Arc<Control>,
    /// Closed because its credential was revoked: the will is not published.
    revoked: bool,
}

impl Writer {
    async fn run<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        rx: &mut mpsc::UnboundedReceiver<Out>,
    ) -> Result<(), ConnError> {
        loop {
            let Some(first) = rx.recv().await else {
                return Ok(());
            };
            let mut close = self.take(first);
            while !close && self.buf.len() < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(out) => close = self.take(out),
                    Err(_) => break,
                }
            }
            if !self.buf.is_empty() {
                wr.write_all(&self.buf).await?;
                self.buf.clear();
                if self.buf.capacity() > BUF_KEEP {
                    self.buf = BytesMut::new();
                }
            }
            if close {
                return Ok(());
            }
        }
    }

    /// Handles one item; true when the connection is to close.
    fn take(&mut self, out: Out) -> bool {
        match out {
            Out::Msg(m) => {
                if m.qos == Qos::AtLeastOnce && self.inflight.len() >= self.max_inflight {
                    self.backlog.push_back(m);
                } else {
                    self.send(m);
                }
            }
            Out::Raw(bytes) => {
                self.buf.extend_from_slice(&bytes);
                self.control.taken();
            }
            Out::Acked(pkid) => {
                if let Some(i) = self.inflight.iter().position(|(p, _)| *p == pkid) {
                    self.inflight.remove(i);
                }
                while self.inflight.len() < self.max_inflight {
                    let Some(m) = self.backlog.pop_front() else {
                        break;
                    };
                    self.send(m);
                }
            }
            Out::Close => return true,
            Out::Revoke => {
                self.revoked = true;
                return true;
            }
        }
        false
    }

    fn send(&mut self, m: Message) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        if m.qos == Qos::AtLeastOnce {
            let pkid = self.next_pkid();
            write_publish(&mut self.buf, &m, pkid);
            self.inflight.push_back((pkid, m));
        } else {
            write_publish(&mut self.buf, &m, 0);
        }
    }

    fn next_pkid(&mut self) -> u16 {
        // At most `max_inflight` (far below 65,535) ids are taken, so this ends quickly.
        loop {
            self.pkid = self.pkid.wrapping_add(1);
            if self.pkid != 0 && !self.inflight.iter().any(|(p, _)| *p == self.pkid) {
                return self.pkid;
            }
        }
    }

    /// QoS 1 messages this connection took on and never had acknowledged, oldest first.
    fn unacked(&mut self, rx: &mut mpsc::UnboundedReceiver<Out>) -> Vec<Message> {
        let mut out: Vec<Message> = self.inflight.drain(..).map(|(_, m)| m).collect();
        out.extend(self.backlog.drain(..));
        while let Ok(item) = rx.try_recv() {
            if let Out::Msg(m) = item {
                out.push(m);
            }
        }
        out.retain(|m| m.qos == Qos::AtLeastOnce);
        out
    }
}

/// Encodes a PUBLISH by hand: the shared topic and payload are copied once into the write buffer, with no
/// intermediate packet struct per subscriber.
fn write_publish(buf: &mut BytesMut, m: &Message, pkid: u16) {
    let qos1 = m.qos == Qos::AtLeastOnce;
    let remaining = 2 + m.topic.len() + if qos1 { 2 } else { 0 } + m.payload.len();
    buf.reserve(5 + remaining);
    buf.put_u8(0x30 | if qos1 { 0b010 } else { 0 } | u8::from(m.retain));
    let mut len = remaining;
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
    // Topics arrive as MQTT strings (u16 length), so they always fit.
    buf.put_u16(m.topic.len() as u16);
    buf.put_slice(m.topic.as_bytes());
    if qos1 {
        buf.put_u16(pkid);
    }
    buf.put_slice(&m.payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand encoder must produce what rumqttc's decoder reads back, for both QoS and sizes around the
    /// remaining-length boundaries.
    #[test]
    fn write_publish_round_trips_through_rumqttc() {
        for (qos, size) in [
            (Qos::AtMostOnce, 0),
            (Qos::AtLeastOnce, 10),
            (Qos::AtLeastOnce, 200),
            (Qos::AtMostOnce, 20_000),
        ] {
            let m = Message {
                topic: "flotilla/v1/devices/d1/desired".into(),
                payload: Bytes::from(vec![7u8; size]),
                qos,
                retain: size == 10,
            };
            let mut buf = BytesMut::new();
            write_publish(&mut buf, &m, 42);
            let Ok(Packet::Publish(p)) = Packet::read(&mut buf, 1 << 20) else {
                panic!("not a publish")
            };
            assert!(buf.is_empty());
            assert_eq!(p.topic, *m.topic);
            assert_eq!(p.payload, m.payload);
            assert_eq!(p.retain, m.retain);
            assert_eq!(p.pkid, if qos == Qos::AtLeastOnce { 42 } else { 0 });
        }
    }

    proptest::proptest! {
        /// Whatever a client sends, framing and decoding return a packet or an error, never a panic, and never
        /// claim more bytes than were there.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while !buf.is_empty() {
                let before = buf.len();
                match Packet::read(&mut buf, 1024) {
                    Ok(Packet::Publish(p)) => { let _ = topic::validate_name(&p.topic); }
                    Ok(Packet::Subscribe(s)) => {
                        for f in &s.filters { let _ = topic::validate_filter(&f.path); }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
                proptest::prop_assert!(buf.len() < before);
            }
        }
    }
}
