//! The authorisation hook: who a connection is (decided once, at CONNECT) and what it may do (every PUBLISH,
//! every SUBSCRIBE filter, the will). The broker knows nothing of devices or topic schemes; the embedding
//! application implements [`Authorizer`]. Every denial is counted in [`crate::Stats`].

use std::net::SocketAddr;
use std::sync::Arc;

/// The identity a connection was authenticated as, as the authoriser names it (e.g. `device:gw-1`, `hub`).
pub type Principal = Arc<str>;

/// What the broker knows about a connecting client.
#[derive(Debug, Clone, Copy)]
pub struct ConnectInfo<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    /// SHA-256 of the DER client certificate presented on a TLS listener (already verified against the
    /// listener's client CA, when it has one).
    pub cert_sha256: Option<[u8; 32]>,
    /// Whether the connection came in through a TLS listener.
    pub tls: bool,
    pub peer: SocketAddr,
}

/// Why a CONNECT is refused (the CONNACK return code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown identity or wrong credentials (return code 4).
    BadCredentials,
    /// Known, but not allowed to connect like this (return code 5): revoked, wrong client id, ...
    NotAuthorized,
}

/// What a connection asks to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Publish a message that is not retained.
    Publish,
    /// Publish a retained message (or clear one with an empty payload).
    PublishRetained,
    /// Subscribe with this filter (wildcards included: the filter as a whole must be allowed).
    Subscribe,
    /// Register a will on this topic (checked at CONNECT; a refused will refuses the connection).
    Will,
}

impl Action {
    /// The label used in metrics: `publish`, `publish_retained`, `subscribe`, `will`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::PublishRetained => "publish_retained",
            Self::Subscribe => "subscribe",
            Self::Will => "will",
        }
    }
}

/// Decides authentication and authorisation. Called on connection tasks, so implementations must be quick and
/// must not block (look-ups in memory, no I/O).
pub trait Authorizer: Send + Sync + std::fmt::Debug + 'static {
    /// Authenticates a CONNECT: the principal the connection acts as from now on, or a refusal.
    fn authenticate(&self, c: &ConnectInfo<'_>) -> Result<Principal, Refusal>;
    /// Whether `principal` may do `action` on `topic` (a topic name; a filter for [`Action::Subscribe`]).
    fn allow(&self, principal: &str, action: Action, topic: &str) -> bool;
}

/// Lets everyone do everything: for benchmarks and tests of the broker itself, never for a fleet.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authenticate(&self, c: &ConnectInfo<'_>) -> Result<Principal, Refusal> {
        Ok(Arc::from(c.client_id))
    }

    fn allow(&self, _: &str, _: Action, _: &str) -> bool {
        true
    }
}
