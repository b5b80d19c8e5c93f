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

/// What a CONNECT presented.
#[derive(Debug, Clone, Copy)]
pub struct Given<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    /// SHA-256 of the client certificate, already verified by TLS against the device CA (chain and validity).
    pub cert_sha256: Option<[u8; 32]>,
}

impl<'a> Given<'a> {
    /// A username/password CONNECT without a certificate.
    pub fn password(
        client_id: &'a str,
        username: Option<&'a str>,
        password: Option<&'a str>,
    ) -> Self {
        Self {
            client_id,
            username,
            password,
            cert_sha256: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    /// Accepted secret hashes, newest first. An older one is kept after a rotation only until the newest
    /// credential is first used, so a device that missed the response can still connect and ask again.
    secret_hashes: Vec<Digest>,
    /// SHA-256 of the device's accepted client certificates, newest first, with the same rule.
    certs: Vec<[u8; 32]>,
    facts: Facts,
    revoked: bool,
}

impl Entry {
    fn new(secret_hash: Digest, facts: Facts, revoked: bool) -> Self {
        Self {
            secret_hashes: vec![secret_hash],
            certs: vec![],
            facts,
            revoked,
        }
    }

    fn has_older(&self) -> bool {
        self.secret_hashes.len() > 1 || self.certs.len() > 1
    }
}

#[derive(Debug, Default)]
struct Registry {
    hub: Option<Digest>,
    devices: HashMap<DeviceId, Entry>,
    /// Client certificate fingerprint -> the device it was issued to.
    cert_index: HashMap<[u8; 32], DeviceId>,
    feeds: HashMap<String, Entry>,
    /// Devices whose older credentials were dropped when the newest was first used; the hub persists that.
    superseded: Vec<DeviceId>,
    /// Whether clients without credentials may connect to enroll (on by default).
    anonymous_enrollment: bool,
}

impl Registry {
    /// Drops a device's older credentials (its newest one was just used).
    fn supersede(&mut self, id: &DeviceId) {
        if let Some(e) = self.devices.get_mut(id) {
            e.secret_hashes.truncate(1);
            for old in e.certs.drain(1..) {
                self.cert_index.remove(&old);
            }
            self.superseded.push(id.clone());
        }
    }
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

    /// Registers (or replaces) a device's secret hash and region; its certificates are forgotten.
    pub fn set_device(
        &self,
        id: &DeviceId,
        secret_hash: Digest,
        region: Option<String>,
        revoked: bool,
    ) {
        let mut reg = self.write();
        let entry = Entry::new(
            secret_hash,
            Facts {
                region,
                regions: vec![],
            },
            revoked,
        );
        if let Some(old) = reg.devices.insert(id.clone(), entry) {
            for c in old.certs {
                reg.cert_index.remove(&c);
            }
        }
    }

    /// Adds newer credentials for a registered device (a renewal or rotation): the new secret hash and
    /// certificate become the newest; the credentials they replace stay accepted until the new ones are first
    /// used. Only one older generation is kept.
    pub fn add_generation(
        &self,
        id: &DeviceId,
        secret_hash: Option<Digest>,
        cert: Option<[u8; 32]>,
    ) {
        let mut reg = self.write();
        let Some(e) = reg.devices.get_mut(id) else {
            return;
        };
        if let Some(h) = secret_hash {
            e.secret_hashes.insert(0, h);
            e.secret_hashes.truncate(2);
        }
        let mut dropped = Vec::new();
        if let Some(c) = cert {
            e.certs.insert(0, c);
            dropped = e.certs.split_off(e.certs.len().min(2));
        }
        for d in dropped {
            reg.cert_index.remove(&d);
        }
        if let Some(c) = cert {
            reg.cert_index.insert(c, id.clone());
        }
    }

    /// Devices whose older credentials were dropped since the last call (to persist).
    pub fn take_superseded(&self) -> Vec<DeviceId> {
        std::mem::take(&mut self.write().superseded)
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
            Entry::new(
                secret_hash,
                Facts {
                    region: None,
                    regions,
                },
                false,
            ),
        );
    }

    /// Authenticates a CONNECT. A client certificate the device CA issued identifies its device; otherwise username
    /// `hub`, a device id, or `feed-NAME` with its secret as the password; no username only for an anonymous
    /// enrollment (client id `enroll-<nonce>`), when allowed. The client id must be in the principal's namespace
    /// ([`policy::client_id_ok`]). Using a device's newest credential retires its older ones.
    pub fn authenticate(&self, given: &Given<'_>) -> Result<Principal, Denied> {
        let (principal, newest) = self.identify(given)?;
        if !policy::client_id_ok(&principal, given.client_id) {
            return Err(Denied::NotAuthorized);
        }
        if let (Principal::Device(id), true) = (&principal, newest) {
            // Only the rare connection after a rotation takes the write lock.
            if self.read().devices.get(id).is_some_and(Entry::has_older) {
                self.write().supersede(id);
            }
        }
        Ok(principal)
    }

    /// Who the credentials name, and whether it was a device's newest credential.
    fn identify(&self, given: &Given<'_>) -> Result<(Principal, bool), Denied> {
        let reg = self.read();
        if let Some(id) = given
            .cert_sha256
            .and_then(|c| reg.cert_index.get(&c).map(|id| (c, id)))
        {
            let (cert, id) = id;
            let e = reg.devices.get(id).ok_or(Denied::BadCredentials)?;
            if e.revoked {
                return Err(Denied::NotAuthorized);
            }
            // A certificate names its device: a username, if any, must agree.
            if given.username.is_some_and(|u| u != id.as_str()) {
                return Err(Denied::NotAuthorized);
            }
            return Ok((
                Principal::Device(id.clone()),
                e.certs.first() == Some(&cert),
            ));
        }
        let Some(user) = given.username else {
            let nonce = policy::enrollment_nonce(given.client_id).ok_or(Denied::BadCredentials)?;
            if !reg.anonymous_enrollment {
                return Err(Denied::NotAuthorized);
            }
            return Ok((Principal::Enroll(nonce.to_owned()), false));
        };
        let given_hash = hash_secret(given.password.ok_or(Denied::BadCredentials)?);
        if user == "hub" {
            return (reg.hub == Some(given_hash))
                .then_some((Principal::Hub, false))
                .ok_or(Denied::BadCredentials);
        }
        // `feed-NAME` (what is issued now; Mosquitto password files cannot hold a `:` in a username) or the
        // `feed:NAME` issued before.
        if let Some(name) = user
            .strip_prefix("feed-")
            .or_else(|| user.strip_prefix("feed:"))
        {
            let e = reg.feeds.get(name).ok_or(Denied::BadCredentials)?;
            if !e.secret_hashes.contains(&given_hash) {
                return Err(Denied::BadCredentials);
            }
            if e.revoked {
                return Err(Denied::NotAuthorized);
            }
            return Ok((Principal::Feed(name.to_owned()), false));
        }
        let id = DeviceId::new(user).map_err(|_| Denied::BadCredentials)?;
        let e = reg.devices.get(&id).ok_or(Denied::BadCredentials)?;
        let position = e
            .secret_hashes
            .iter()
            .position(|h| *h == given_hash)
            .ok_or(Denied::BadCredentials)?;
        if e.revoked {
            return Err(Denied::NotAuthorized);
        }
        Ok((Principal::Device(id), position == 0))
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
        let ok = |id, user, pass| c.authenticate(&Given::password(id, user, pass));
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
            c.authenticate(&Given::password("enroll-0123456789abcdef", None, None))
        }
    }

    /// A device's certificate identifies it without a password, only with its own client id; a rotation keeps the
    /// previous certificate and password working until the new ones are first used, then refuses them.
    #[test]
    fn certificates_and_rotation() {
        let c = Credentials::new("hub-secret", true);
        let a = DeviceId::new("gw-a").expect("id");
        let b = DeviceId::new("gw-b").expect("id");
        c.set_device(&a, hash_secret("a-1"), None, false);
        c.set_device(&b, hash_secret("b-1"), None, false);
        let (cert1, cert2, cert_b) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        c.add_generation(&a, None, Some(cert1));
        c.add_generation(&b, None, Some(cert_b));
        let with_cert = |id, user, pass, cert| {
            c.authenticate(&Given {
                client_id: id,
                username: user,
                password: pass,
                cert_sha256: Some(cert),
            })
        };
        let dev_a = Ok(Principal::Device(a.clone()));
        assert_eq!(with_cert("gw-a", None, None, cert1), dev_a);
        assert_eq!(
            with_cert("gw-a", Some("gw-a"), Some("anything"), cert1),
            dev_a
        );
        assert_eq!(
            with_cert("gw-b", None, None, cert1),
            Err(Denied::NotAuthorized),
            "A's cert as B"
        );
        assert_eq!(
            with_cert("gw-b", Some("gw-b"), Some("b-1"), cert1),
            Err(Denied::NotAuthorized),
            "A's cert with B's password"
        );
        assert_eq!(
            with_cert("gw-a", None, None, [9; 32]),
            Err(Denied::BadCredentials),
            "a certificate the hub never issued"
        );
        // Rotation: both generations work until the new one is used.
        c.add_generation(&a, Some(hash_secret("a-2")), Some(cert2));
        assert_eq!(with_cert("gw-a", None, None, cert1), dev_a);
        assert_eq!(
            c.authenticate(&Given::password("gw-a", Some("gw-a"), Some("a-1"))),
            dev_a
        );
        assert!(c.take_superseded().is_empty());
        assert_eq!(with_cert("gw-a", None, None, cert2), dev_a);
        assert_eq!(c.take_superseded(), vec![a.clone()]);
        assert_eq!(
            with_cert("gw-a", None, None, cert1),
            Err(Denied::BadCredentials)
        );
        assert_eq!(
            c.authenticate(&Given::password("gw-a", Some("gw-a"), Some("a-1"))),
            Err(Denied::BadCredentials)
        );
        assert_eq!(
            c.authenticate(&Given::password("gw-a", Some("gw-a"), Some("a-2"))),
            dev_a
        );
        // B was never touched; revocation refuses a certificate too.
        assert_eq!(
            with_cert("gw-b", None, None, cert_b),
            Ok(Principal::Device(b.clone()))
        );
        c.revoke(&a);
        assert_eq!(
            with_cert("gw-a", None, None, cert2),
            Err(Denied::NotAuthorized)
        );
    }
}
