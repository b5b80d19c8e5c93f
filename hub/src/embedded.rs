//! The hub's side of the embedded broker (`flotilla-broker`, feature `embedded-broker`): how the hub sizes it and
//! starts it, and the gauges it adds to `/metrics`. Without the feature the same API refuses to start, so the
//! rest of the hub has no `cfg` of its own.

use std::net::SocketAddr;
use std::path::Path;

#[cfg(feature = "embedded-broker")]
pub use flotilla_broker::tls::ClientAuth;
#[cfg(feature = "embedded-broker")]
pub use flotilla_broker::{Broker, Snapshot};

/// How the TLS listener asks for client certificates (mirrors `flotilla_broker::tls::ClientAuth`).
#[cfg(not(feature = "embedded-broker"))]
#[derive(Debug, Clone, Copy)]
pub enum ClientAuth<'a> {
    None,
    Optional(&'a Path),
    Required(&'a Path),
}

/// Connections the embedded broker accepts before refusing new ones.
pub const MAX_CONNECTIONS: usize = 20_000;

/// The broker configuration `flotilla serve` uses: packets up to the largest envelope plus MQTT framing.
#[cfg(feature = "embedded-broker")]
pub fn config(max_connections: usize) -> flotilla_broker::Config {
    let mut c = flotilla_broker::Config::new(max_connections);
    c.max_packet = flotilla_shared::codec::MAX_ENVELOPE + 1024;
    c
}

/// The broker authenticates and authorises through the hub's credential registry and access policy.
#[cfg(feature = "embedded-broker")]
impl flotilla_broker::auth::Authorizer for crate::access::Credentials {
    fn authenticate(
        &self,
        c: &flotilla_broker::auth::ConnectInfo<'_>,
    ) -> Result<flotilla_broker::auth::Principal, flotilla_broker::auth::Refusal> {
        use crate::access::Denied;
        let given = crate::access::Given {
            client_id: c.client_id,
            username: c.username,
            password: c.password,
            cert_sha256: c.cert_sha256,
        };
        match crate::access::Credentials::authenticate(self, &given) {
            Ok(p) => Ok(p.name().into()),
            Err(Denied::BadCredentials) => Err(flotilla_broker::auth::Refusal::BadCredentials),
            Err(Denied::NotAuthorized) => Err(flotilla_broker::auth::Refusal::NotAuthorized),
        }
    }

    fn allow(&self, principal: &str, action: flotilla_broker::auth::Action, topic: &str) -> bool {
        use crate::access::policy::Access;
        use flotilla_broker::auth::Action;
        let access = match action {
            Action::Publish => Access::Publish,
            Action::PublishRetained => Access::PublishRetained,
            Action::Subscribe => Access::Subscribe,
            Action::Will => Access::Will,
        };
        crate::access::Credentials::allow(self, principal, access, topic)
    }
}

/// Starts the embedded broker on `listen`, and on `tls` (address, certificate, key, client certificates) when
/// given, authenticating every connection against `credentials`. The TLS material is read before anything
/// listens, so a bad file fails the start cleanly.
#[cfg(feature = "embedded-broker")]
pub fn start(
    listen: SocketAddr,
    tls: Option<(SocketAddr, &Path, &Path, ClientAuth<'_>)>,
    credentials: crate::access::Credentials,
) -> anyhow::Result<(Broker, Option<SocketAddr>)> {
    let tls = match tls {
        Some((addr, cert, key, ca)) => {
            Some((addr, flotilla_broker::tls::server_config(cert, key, ca)?))
        }
        None => None,
    };
    let broker = flotilla_broker::start(
        listen,
        config(MAX_CONNECTIONS),
        std::sync::Arc::new(credentials),
    )?;
    let mqtts = match tls {
        Some((addr, config)) => Some(broker.listen_tls(addr, config)?),
        None => None,
    };
    Ok((broker, mqtts))
}

/// Without the embedded broker, there is nothing to run; the hub needs `--broker`.
#[cfg(not(feature = "embedded-broker"))]
#[derive(Debug, Clone)]
pub enum Broker {}

#[cfg(not(feature = "embedded-broker"))]
impl Broker {
    pub fn snapshot(&self) -> Snapshot {
        match *self {}
    }
    pub fn addr(&self) -> SocketAddr {
        match *self {}
    }
    pub fn disconnect(&self, _principal: &str) -> usize {
        match *self {}
    }
}

#[cfg(not(feature = "embedded-broker"))]
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub connections: usize,
    pub retained: usize,
    pub received: u64,
    pub delivered: u64,
    pub dropped_queue_full: u64,
    pub dropped_offline: u64,
    pub denied: [(&'static str, u64); 5],
}

#[cfg(not(feature = "embedded-broker"))]
pub fn start(
    _listen: SocketAddr,
    _tls: Option<(SocketAddr, &Path, &Path, ClientAuth<'_>)>,
    _credentials: crate::access::Credentials,
) -> anyhow::Result<(Broker, Option<SocketAddr>)> {
    anyhow::bail!("this build has no embedded broker; pass --broker mqtt://host:port")
}
