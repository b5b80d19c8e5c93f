//! MQTT identities and their credentials: the registry the embedded broker authenticates every CONNECT against,
//! and the policy ([`policy`]) it authorises every publish and subscription with.
//!
//! The registry is shared between the hub loop (which writes it: enrollment, revocation, feed credentials,
//! region changes) and the broker's connection tasks (which read it). It sits behind an `RwLock` because every
//! critical section is one map look-up or insert with no `.await` inside, and the broker must answer a CONNECT
//! without a round trip through the hub loop. Secrets are random and high-entropy, so a SHA-256 of each is what
//! is kept (never the secret itself).

pub mod policy;

use flotilla_shared::{DeviceId, Digest};
use policy::{Access, Facts, Principal};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Unknown identity or wrong secret.
    BadCredentials,
    /// Known, but revoked, or connecting with a client id outside its namespace.
    NotAuthorized,
}

#[derive(Debug, Clone)]
struct Entry {
    secret_hash: Digest,
    facts: Facts,
    revoked: bool,
}

#[derive(Debug, Default)]
struct Registry {
    hub: Option<Digest>,
    devices: HashMap<DeviceId, Entry>,
    feeds: HashMap<String, Entry>,
    /// Whether clients without credentials may connect to enroll (on by default).
    anonymous_enrollment: bool,
}

/// The credential registry; cheap to clone (one shared registry).
#[derive(Debug, Clone, Default)]
pub struct Credentials(Arc<RwLock<Registry>>);

/// A device's MQTT secret: HMAC-SHA256 under the hub's enrollment key of the device id and its public key. Derived
/// rather than random, so that an enrollment request answered twice (a lost or slow response, a re-send) gives
/// the device the same secret both times, and only the hash needs storing.
pub fn device_secret(key: &[u8], id: &DeviceId, public_key: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(b"flotilla device mqtt secret v1\0");
    mac.update(id.as_str().as_bytes());
    mac.update(b"\0");
    mac.update(public_key);
    hex::encode(mac.finalize().into_bytes())
}

/// The hash kept for a secret.
pub fn hash_secret(secret: &str) -> Digest {
    Digest::of(secret.as_bytes())
}

impl Credentials {
    /// A registry that knows the hub's own secret and admits anonymous enrollment when `anonymous_enrollment`.
    pub fn new(hub_secret: &str, anonymous_enrollment: bool) -> Self {
        let reg = Registry {
            hub: Some(hash_secret(hub_secret)),
            anonymous_enrollment,
            ..Registry::default()
        };
        Self(Arc::new(RwLock::new(reg)))
    }

    // A panic under the lock leaves maps that are still consistent (every update is one insert or field write),
    // so a poisoned lock is taken over rather than refusing the whole fleet.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers (or replaces) a device's secret hash and region.
    pub fn set_device(
        &self,
        id: &DeviceId,
        secret_hash: Digest,
        region: Option<String>,
        revoked: bool,
    ) {
        self.write().devices.insert(
            id.clone(),
            Entry {
                secret_hash,
                facts: Facts {
                    region,
                    regions: vec![],
                },
                revoked,
            },
        );
    }

    /// A device's region changed (its telemetry topic follows it).
    pub fn set_region(&self, id: &DeviceId, region: Option<String>) {
        if let Some(e) = self.write().devices.get_mut(id) {
            e.facts.region = region;
        }
    }

    /// Refuses the device's credential from now on.
    pub fn revoke(&self, id: &DeviceId) {
        if let Some(e) = self.write().devices.get_mut(id) {
            e.revoked = true;
        }
    }

    /// Whether the device's credential is revoked.
    pub fn is_revoked(&self, id: &DeviceId) -> bool {
        self.read().devices.get(id).is_some_and(|e| e.revoked)
    }

    /// Registers (or replaces) a telemetry feed consumer's secret hash and regions.
    pub fn set_feed(&self, name: &str, secret_hash: Digest, regions: Vec<String>) {
        self.write().feeds.insert(
            name.to_owned(),
            Entry {
                secret_hash,
                facts: Facts {
                    region: None,
                    regions,
                },
                revoked: false,
            },
        );
    }

    /// Authenticates a CONNECT. Username `hub`, a device id, or `feed:NAME` with its secret as the password; no
    /// username only for an anonymous enrollment (client id `enroll-<nonce>`), when allowed. The client id must be
    /// in the principal's namespace ([`policy::client_id_ok`]).
    pub fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Result<Principal, Denied> {
        let reg = self.read();
        let principal = match username {
            None => {
                let nonce = policy::enrollment_nonce(client_id).ok_or(Denied::BadCredentials)?;
                if !reg.anonymous_enrollment {
                    return Err(Denied::NotAuthorized);
                }
                return Ok(Principal::Enroll(nonce.to_owned()));
            }
            Some(user) => {
                let given = hash_secret(password.ok_or(Denied::BadCredentials)?);
                if user == "hub" {
                    (reg.hub == Some(given))
                        .then_some(Principal::Hub)
                        .ok_or(Denied::BadCredentials)?
                } else if let Some(name) = user.strip_prefix("feed:") {
                    let e = reg.feeds.get(name).ok_or(Denied::BadCredentials)?;
                    if e.secret_hash != given {
                        return Err(Denied::BadCredentials);
                    }
                    if e.revoked {
                        return Err(Denied::NotAuthorized);
                    }
                    Principal::Feed(name.to_owned())
                } else {
                    let id = DeviceId::new(user).map_err(|_| Denied::BadCredentials)?;
                    let e = reg.devices.get(&id).ok_or(Denied::BadCredentials)?;
                    if e.secret_hash != given {
                        return Err(Denied::BadCredentials);
                    }
                    if e.revoked {
                        return Err(Denied::NotAuthorized);
                    }
                    Principal::Device(id)
                }
            }
        };
        if !policy::client_id_ok(&principal, client_id) {
            return Err(Denied::NotAuthorized);
        }
        Ok(principal)
    }

    /// Whether the principal named `name` may do `access` on `topic`. A revoked or unknown principal may do nothing.
    /// Runs for every message: the name is matched by prefix and looked up by `&str`, nothing is allocated.
    pub fn allow(&self, name: &str, access: Access, topic: &str) -> bool {
        if name == "hub" {
            return true;
        }
        let reg = self.read();
        if let Some(id) = name.strip_prefix("device:") {
            return match reg.devices.get(id) {
                Some(e) if !e.revoked => {
                    policy::device_allows(id, e.facts.region.as_deref(), access, topic)
                }
                _ => false,
            };
        }
        if let Some(feed) = name.strip_prefix("feed:") {
            return match reg.feeds.get(feed) {
                Some(e) if !e.revoked => policy::feed_allows(&e.facts.regions, access, topic),
                _ => false,
            };
        }
        match name.strip_prefix("enroll:") {
            Some(nonce) => policy::enroll_allows(nonce, access, topic),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device secrets are stable for the same device and key, and differ across devices, keys and hub keys.
    #[test]
    fn device_secrets_are_derived() {
        let a = DeviceId::new("gw-a").expect("id");
        let b = DeviceId::new("gw-b").expect("id");
        let s = device_secret(b"k1", &a, b"pk");
        assert_eq!(s, device_secret(b"k1", &a, b"pk"));
        assert_eq!(s.len(), 64);
        for other in [
            device_secret(b"k1", &b, b"pk"),
            device_secret(b"k1", &a, b"pk2"),
            device_secret(b"k2", &a, b"pk"),
        ] {
            assert_ne!(s, other);
        }
    }

    /// Each identity authenticates only with its own secret and client id; revocation refuses the device at once.
    #[test]
    fn authentication() {
        let c = Credentials::new("hub-secret", true);
        let a = DeviceId::new("gw-a").expect("id");
        c.set_device(&a, hash_secret("a-secret"), Some("eu-west".into()), false);
        c.set_feed("grafana", hash_secret("f-secret"), vec!["eu-west".into()]);
        let ok = |id, user, pass| c.authenticate(id, user, pass);
        assert_eq!(
            ok("flotilla-hub-1", Some("hub"), Some("hub-secret")),
            Ok(Principal::Hub)
        );
        assert_eq!(
            ok("flotilla-hub-1", Some("hub"), Some("nope")),
            Err(Denied::BadCredentials)
        );
        assert_eq!(
            ok("gw-a", Some("gw-a"), Some("a-secret")),
            Ok(Principal::Device(a.clone()))
        );
        assert_eq!(
            ok("gw-b", Some("gw-a"), Some("a-secret")),
            Err(Denied::NotAuthorized),
            "as another client id"
        );
        assert_eq!(
            ok("gw-a", Some("gw-a"), Some("b-secret")),
            Err(Denied::BadCredentials)
        );
        assert_eq!(ok("gw-a", Some("gw-a"), None), Err(Denied::BadCredentials));
        assert_eq!(
            ok("gw-z", Some("gw-z"), Some("a-secret")),
            Err(Denied::BadCredentials),
            "unknown device"
        );
        assert_eq!(
            ok("feed-grafana", Some("feed:grafana"), Some("f-secret")),
            Ok(Principal::Feed("grafana".into()))
        );
        assert_eq!(
            ok("gw-a", Some("feed:grafana"), Some("f-secret")),
            Err(Denied::NotAuthorized),
            "takeover"
        );
        assert_eq!(
            ok("enroll-0123456789abcdef", None, None),
            Ok(Principal::Enroll("0123456789abcdef".into()))
        );
        assert_eq!(
            ok("gw-a", None, None),
            Err(Denied::BadCredentials),
            "anonymous as a device"
        );
        c.revoke(&a);
        assert_eq!(
            ok("gw-a", Some("gw-a"), Some("a-secret")),
            Err(Denied::NotAuthorized)
        );
        assert!(!c.allow(
            "device:gw-a",
            Access::Publish,
            "flotilla/v1/dev/gw-a/report"
        ));
        let closed = Credentials::new("hub-secret", false);
        assert_eq!(ok_closed(&closed), Err(Denied::NotAuthorized));
        fn ok_closed(c: &Credentials) -> Result<Principal, Denied> {
            c.authenticate("enroll-0123456789abcdef", None, None)
        }
    }
}
