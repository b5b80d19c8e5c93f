//! Fuzz target: the embedded broker's CONNECT/authentication path as the hub configures it. The bytes are framed
//! as MQTT packets (rumqttc's `mqttbytes`, as the broker's connection shell reads them); a CONNECT is
//! authenticated against a registry holding one device, one feed and the hub, and every later PUBLISH and
//! SUBSCRIBE is authorised for the principal it got. Nothing may panic, and the policy's invariants hold: an
//! anonymous client is never more than an enrollment, a wrong secret never authenticates, a device's client
//! certificate authenticates only that device under its own client id, and a device is never allowed a topic of
//! another device.
#![no_main]

use bytes::BytesMut;
use flotilla_hub::access::policy::{Access, Principal};
use flotilla_hub::access::{Credentials, hash_secret};
use flotilla_shared::DeviceId;
use flotilla_shared::topics;
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4::Packet;

fuzz_target!(|data: &[u8]| {
    let creds = Credentials::new("hub-secret", true);
    let a = DeviceId::new("gw-a").expect("id");
    creds.set_device(&a, hash_secret("a-secret"), Some("eu-west".into()), false);
    creds.set_feed("grafana", hash_secret("f-secret"), vec!["eu-west".into()]);
    // gw-a also holds a client certificate (its fingerprint), as after enrollment with a CSR.
    const A_CERT: [u8; 32] = [0xa5; 32];
    creds.add_generation(&a, None, Some(A_CERT));
    let mut buf = BytesMut::from(data);
    let mut principal: Option<Principal> = None;
    while !buf.is_empty() {
        let before = buf.len();
        let packet = match Packet::read(&mut buf, 4096) {
            Ok(p) => p,
            Err(_) => break,
        };
        assert!(buf.len() < before, "framing must make progress");
        match packet {
            Packet::Connect(c) => {
                let user = c.login.as_ref().map(|l| l.username.as_str());
                let pass = c.login.as_ref().map(|l| l.password.as_str());
                // The keep-alive's low bits choose the certificate the TLS layer verified: none, gw-a's, or one
                // the hub never issued.
                let cert = match c.keep_alive % 3 {
                    0 => None,
                    1 => Some(A_CERT),
                    _ => Some([0x5a; 32]),
                };
                let given = flotilla_hub::access::Given {
                    client_id: &c.client_id,
                    username: user,
                    password: pass,
                    cert_sha256: cert,
                };
                let got = creds.authenticate(&given).ok();
                if let (Some(Principal::Device(d)), Some(A_CERT)) = (&got, cert) {
                    assert_eq!(d.as_str(), "gw-a", "gw-a's certificate named another device");
                    assert_eq!(c.client_id, "gw-a", "a certificate with another client id");
                }
                if cert == Some(A_CERT) && got.is_some() {
                    assert!(matches!(got, Some(Principal::Device(_))), "gw-a's certificate as {got:?}");
                }
                match (&got, user, pass) {
                    (Some(Principal::Device(_)), _, _) if cert == Some(A_CERT) => {}
                    (Some(Principal::Hub), _, p) => assert_eq!(p, Some("hub-secret")),
                    (Some(Principal::Device(_)), _, p) => assert_eq!(p, Some("a-secret")),
                    (Some(Principal::Feed(_)), _, p) => assert_eq!(p, Some("f-secret")),
                    (Some(Principal::Enroll(_)), u, _) => assert!(u.is_none()),
                    (None, ..) => {}
                }
                principal = got;
            }
            Packet::Publish(p) => {
                let Some(who) = &principal else { continue };
                let access = if p.retain { Access::PublishRetained } else { Access::Publish };
                let allowed = creds.allow(&who.name(), access, &p.topic);
                if let (Principal::Device(d), true) = (who, allowed) {
                    if let Some((owner, _)) = topics::parse_device(&p.topic) {
                        assert_eq!(&owner, d, "a device published on another device's topic");
                    }
                }
                if let (Principal::Enroll(_) | Principal::Feed(_), true) = (who, allowed) {
                    assert!(p.topic.starts_with("flotilla/v1/enroll/"), "{}", p.topic);
                }
            }
            Packet::Subscribe(s) => {
                let Some(who) = &principal else { continue };
                for f in &s.filters {
                    let allowed = creds.allow(&who.name(), Access::Subscribe, &f.path);
                    if allowed && !matches!(who, Principal::Hub) {
                        assert!(!f.path.starts_with('#') && !f.path.starts_with("$SYS"), "{}", f.path);
                    }
                }
            }
            _ => {}
        }
    }
});
