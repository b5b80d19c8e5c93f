//! `flotilla-broker`: the MQTT 3.1.1 broker the hub embeds (its default `embedded-broker` feature), for zero-setup
//! hubs. External brokers (Mosquitto, EMQX, HiveMQ) are used through `--broker` instead; nothing here is required.
//! This crate depends on nothing of the hub: its public API is [`start`], [`Broker::listen_tls`],
//! [`Broker::snapshot`] and [`Config`], plus the sans-IO [`core`] and [`topic`] modules for tests and fuzzing.
//!
//! Built for one hub and many small devices: one task per connection and no router thread (a message is routed on
//! its publisher's task), a subscription tree so routing cost does not grow with the fleet, a few KiB of idle state
//! per connection, and a bounded queue per subscriber so one stalled client cannot grow the broker without limit.
//! - `auth`: the authorisation hook (who a connection is, what it may publish and subscribe to);
//! - `topic`: names, filters and the subscription tree;
//! - `core`: sans-IO sessions, routing, retained messages and wills;
//! - `conn`: the per-connection shell (framing, keepalive, QoS 1 in flight), over TCP or TLS;
//! - `tls`: the optional TLS listener's configuration (server certificate, optional client CA).

pub mod auth;
mod conn;
pub mod core;
pub mod tls;
pub mod topic;

use self::core::{Core, Delivery, Limits, Message};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc;

/// Tunables; [`Config::new`] gives the defaults `flotilla serve` uses.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub max_connections: usize,
    /// Largest packet accepted (remaining length), in bytes.
    pub max_packet: usize,
    /// Messages queued for one connection before new ones are dropped (a subscriber that stopped reading).
    pub max_queued: usize,
    /// Unacknowledged QoS 1 messages per connection.
    pub max_inflight: usize,
    /// QoS 1 messages kept for an offline persistent session.
    pub offline_queue: usize,
}

/// Default packet cap: generous for telemetry and control messages; the hub sets its own envelope cap instead.
pub const DEFAULT_MAX_PACKET: usize = 256 * 1024;

impl Config {
    pub fn new(max_connections: usize) -> Self {
        Self {
            max_connections,
            max_packet: DEFAULT_MAX_PACKET,
            // The hub subscribes to every device's reports: after a fleet-wide deployment all of them may arrive
            // at once, so its queue must hold one burst per device of the largest fleet we size for.
            max_queued: 100_000,
            max_inflight: 256,
            offline_queue: 1_000,
        }
    }
}

/// Counters for operators and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub delivered: AtomicU64,
    /// Dropped because a live subscriber's queue was full.
    pub dropped: AtomicU64,
    /// Refused by the authoriser: connections, and per [`auth::Action`] (publish, retained publish, subscribe,
    /// will).
    pub denied_connect: AtomicU64,
    pub denied_publish: AtomicU64,
    pub denied_publish_retained: AtomicU64,
    pub denied_subscribe: AtomicU64,
    pub denied_will: AtomicU64,
}

impl Stats {
    fn denied(&self, action: auth::Action) -> &AtomicU64 {
        match action {
            auth::Action::Publish => &self.denied_publish,
            auth::Action::PublishRetained => &self.denied_publish_retained,
            auth::Action::Subscribe => &self.denied_subscribe,
            auth::Action::Will => &self.denied_will,
        }
    }
}

/// What every message to a connection's writer is.
#[derive(Debug)]
enum Out {
    /// An application message (counted against the queue bound).
    Msg(Message),
    /// An encoded control packet (CONNACK, PUBACK, SUBACK, ...), in order with the messages.
    Raw(bytes::Bytes),
    /// The client acknowledged this QoS 1 packet id.
    Acked(u16),
    /// Close the connection (taken over by a new one with the same client id).
    Close,
    /// Close the connection of a revoked credential: its will is discarded (the application clears its topics).
    Revoke,
}

#[derive(Debug)]
struct Handle {
    tx: mpsc::UnboundedSender<Out>,
    /// Who this connection was authenticated as.
    principal: auth::Principal,
    /// Messages sent to this connection and not yet written to its socket.
    queued: Arc<AtomicUsize>,
    /// Logged once per connection, not once per dropped message.
    warned: bool,
}

#[derive(Debug)]
struct State {
    core: Core,
    conns: HashMap<core::ConnId, Handle>,
}

/// State shared by all connection tasks. A plain mutex: every critical section is a few map operations and
/// non-blocking channel sends with no `.await` inside, and a router task would add a hop to every message.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    config: Config,
    auth: Arc<dyn auth::Authorizer>,
    stats: Stats,
    next_conn: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves maps that are still consistent (every update is one insert or
        // remove), so a poisoned lock is taken over rather than taking the broker down.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands deliveries to their connections' writers, dropping what a full queue cannot take.
    fn dispatch(&self, state: &mut State, deliveries: Vec<Delivery>) {
        for d in deliveries {
            if let Some(h) = state.conns.get_mut(&d.conn) {
                self.deliver(h, d.conn, d.msg);
            }
        }
    }

    fn deliver(&self, h: &mut Handle, conn: core::ConnId, msg: Message) {
        if h.queued.load(Ordering::Relaxed) >= self.config.max_queued {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if !h.warned {
                h.warned = true;
                tracing::warn!(
                    conn,
                    limit = self.config.max_queued,
                    "subscriber queue full; dropping messages"
                );
            }
            return;
        }
        h.queued.fetch_add(1, Ordering::Relaxed);
        // A closed receiver means the connection is ending; its cleanup runs under this same lock later.
        let _ = h.tx.send(Out::Msg(msg));
    }
}

/// A running broker.
#[derive(Debug, Clone)]
pub struct Broker {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    rt: tokio::runtime::Handle,
}

/// A point-in-time view of the broker for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub connections: usize,
    pub retained: usize,
    pub received: u64,
    pub delivered: u64,
    /// Dropped because a live subscriber's queue was full.
    pub dropped_queue_full: u64,
    /// Dropped from a full offline queue of a persistent session.
    pub dropped_offline: u64,
    /// Refused by the authoriser, by action: `connect`, `publish`, `publish_retained`, `subscribe`, `will`.
    pub denied: [(&'static str, u64); 5],
}

impl Broker {
    /// The plain listener's address (the port it got, when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Adds a TLS listener on `listen` (port 0 picks a free port) that shares sessions, subscriptions and retained
    /// messages with the plain one; returns the address it got. Devices use this one; the hub's own link stays on
    /// the loopback plain listener.
    pub fn listen_tls(
        &self,
        listen: SocketAddr,
        config: Arc<rustls::ServerConfig>,
    ) -> anyhow::Result<SocketAddr> {
        use anyhow::Context;
        let std_listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("binding the MQTT TLS listener to {listen}"))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let shared = self.shared.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        self.rt.spawn(async move {
            match tokio::net::TcpListener::from_std(std_listener) {
                Ok(listener) => accept_loop(listener, shared, Some(acceptor)).await,
                Err(e) => {
                    tracing::error!(error = %e, "embedded broker TLS listener could not start")
                }
            }
        });
        Ok(addr)
    }

    /// Counters and gauges, read under the state lock for a moment.
    pub fn snapshot(&self) -> Snapshot {
        let st = self.shared.lock();
        let stats = &self.shared.stats;
        Snapshot {
            connections: st.core.connections(),
            retained: st.core.retained(),
            received: stats.received.load(Ordering::Relaxed),
            delivered: stats.delivered.load(Ordering::Relaxed),
            dropped_queue_full: stats.dropped.load(Ordering::Relaxed),
            dropped_offline: st.core.dropped_offline,
            denied: [
                ("connect", stats.denied_connect.load(Ordering::Relaxed)),
                ("publish", stats.denied_publish.load(Ordering::Relaxed)),
                (
                    "publish_retained",
                    stats.denied_publish_retained.load(Ordering::Relaxed),
                ),
                ("subscribe", stats.denied_subscribe.load(Ordering::Relaxed)),
                ("will", stats.denied_will.load(Ordering::Relaxed)),
            ],
        }
    }

    /// Closes every connection authenticated as `principal` (a revoked credential); returns how many.
    pub fn disconnect(&self, principal: &str) -> usize {
        let st = self.shared.lock();
        let mut n = 0;
        for h in st.conns.values() {
            if &*h.principal == principal {
                let _ = h.tx.send(Out::Revoke);
                n += 1;
            }
        }
        n
    }
}

/// Starts the broker on `listen` (port 0 picks a free port) in its own threads; returns once it accepts
/// connections, with the address it got. Every connection is authenticated and every action authorised by `auth`.
pub fn start(
    listen: SocketAddr,
    config: Config,
    auth: Arc<dyn auth::Authorizer>,
) -> anyhow::Result<Broker> {
    use anyhow::Context;
    let std_listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("binding the MQTT broker to {listen}"))?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            core: Core::new(Limits {
                max_connections: config.max_connections,
                offline_queue: config.offline_queue,
            }),
            conns: HashMap::new(),
        }),
        config,
        auth,
        stats: Stats::default(),
        next_conn: AtomicU64::new(1),
    });
    // Its own runtime, so routing keeps going while the hub's threads sign and write SQLite.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mqtt-broker")
        .enable_all()
        .build()?;
    let accept_shared = shared.clone();
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(listener) => accept_loop(listener, accept_shared, None).await,
                    Err(e) => tracing::error!(error = %e, "embedded broker could not start"),
                }
            });
        })?;
    Ok(Broker {
        addr,
        shared,
        rt: handle,
    })
}

/// A TLS handshake that has not finished by then is abandoned (it holds a descriptor and a task).
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut backoff = std::time::Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = std::time::Duration::from_millis(5);
                let _ = stream.set_nodelay(true);
                let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                match &tls {
                    None => {
                        let meta = conn::Meta {
                            peer,
                            tls: false,
                            cert_sha256: None,
                        };
                        tokio::spawn(conn::run(shared, id, stream, meta));
                    }
                    Some(acceptor) => {
                        // The handshake runs in the connection's own task, so a slow client delays nobody.
                        let accept = acceptor.accept(stream);
                        tokio::spawn(async move {
                            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, accept).await {
                                Ok(Ok(stream)) => {
                                    let cert_sha256 = stream
                                        .get_ref()
                                        .1
                                        .peer_certificates()
                                        .and_then(|c| c.first())
                                        .map(|der| Sha256::digest(der.as_ref()).into());
                                    let meta = conn::Meta {
                                        peer,
                                        tls: true,
                                        cert_sha256,
                                    };
                                    conn::run(shared, id, stream, meta).await
                                }
                                Ok(Err(e)) => {
                                    tracing::info!(%peer, error = %e, "mqtt tls handshake refused")
                                }
                                Err(_) => tracing::info!(%peer, "mqtt tls handshake timed out"),
                            }
                        });
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors, most likely: wait for connections to close instead of spinning.
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}
