//! Property tests: every message kind round-trips through the envelope, and arbitrary bytes never panic a decoder.

use flotilla_shared::codec::{self, Message};
use flotilla_shared::trust::{self, DocType, SigningKey, TrustFloor};
use flotilla_shared::wire::*;
use flotilla_shared::{DeviceId, Digest, Label, WorkloadName};
use proptest::prelude::*;

fn ident() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,20}"
}

fn signed() -> impl Strategy<Value = Signed> {
    (
        proptest::collection::vec(any::<u8>(), 0..200),
        proptest::collection::vec(
            (any::<[u8; 8]>(), proptest::collection::vec(any::<u8>(), 64)),
            0..3,
        ),
    )
        .prop_map(|(body, sigs)| Signed {
            body,
            signatures: sigs
                .into_iter()
                .map(|(key_id, sig)| SignatureEntry { key_id, sig })
                .collect(),
        })
}

fn digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest)
}

fn artifact_ref() -> impl Strategy<Value = ArtifactRef> {
    prop_oneof![
        digest().prop_map(ArtifactRef::Release),
        digest().prop_map(ArtifactRef::Blob)
    ]
}

fn inventory() -> impl Strategy<Value = Inventory> {
    (
        ident(),
        proptest::option::of(ident()),
        -90.0f64..90.0,
        -180.0f64..180.0,
        any::<u32>(),
    )
        .prop_map(|(label, region, lat, lon, mem)| Inventory {
            labels: vec![("role".into(), label)],
            region: region.map(|r| Label::new(r).expect("grammar")),
            zone: None,
            location: Some(LatLon { lat, lon }),
            arch: "aarch64".into(),
            runtimes: vec![WorkloadKind::Wasm],
            memory_mib: mem,
            agent_version: "0.1.0".into(),
            sealing_key: Some([mem as u8; 32]),
            container_engine: None,
            firmware: None,
            agent_release: None,
        })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        signed().prop_map(Message::DesiredState),
        signed().prop_map(Message::Report),
        proptest::collection::vec(signed(), 0..3)
            .prop_map(|chain| Message::RootUpdate(RootUpdate { chain })),
        (any::<bool>(), any::<u64>()).prop_map(|(online, at)| Message::Presence(Presence {
            online,
            at,
            agent_version: "0.1.0".into()
        })),
        (artifact_ref(), any::<u64>(), any::<u32>()).prop_map(|(what, offset, max_len)| {
            Message::ArtifactRequest(ArtifactRequest {
                what,
                offset,
                max_len,
            })
        }),
        (
            artifact_ref(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..2000)
        )
            .prop_map(|(what, offset, total, data)| Message::ArtifactChunk(
                ArtifactChunk::Data {
                    what,
                    offset,
                    total,
                    data
                }
            )),
        artifact_ref().prop_map(|what| Message::ArtifactChunk(ArtifactChunk::NotFound { what })),
        (
            ident(),
            ident(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..100)
        )
            .prop_map(
                |(d, s, seq, bytes)| Message::Telemetry(vec![TelemetryRecord {
                    device: DeviceId::new(d).expect("grammar"),
                    stream: Label::new(s).expect("grammar"),
                    seq,
                    at: seq / 2,
                    payload: TelemetryPayload::Bytes(bytes),
                }])
            ),
        (ident(), any::<[u8; 32]>(), inventory()).prop_map(|(token, pk, inventory)| {
            Message::EnrollRequest(Box::new(EnrollRequest {
                token,
                public_key: PublicKey(pk),
                requested_id: None,
                inventory,
                csr: Some(pk.to_vec()),
            }))
        }),
        proptest::collection::vec(any::<u8>(), 0..600)
            .prop_map(|csr| Message::CredentialRequest(CredentialRequest { csr })),
        (ident(), any::<u64>()).prop_map(|(pem, t)| Message::CredentialResponse(
            CredentialResponse::Issued {
                cert: IssuedCert {
                    pem,
                    not_before: t / 2,
                    not_after: t,
                },
                mqtt_password: "0123456789abcdef".into(),
            }
        )),
        Just(Message::CredentialResponse(CredentialResponse::RotateNow)),
        (ident(), signed()).prop_map(|(d, root)| Message::EnrollResponse(
            EnrollResponse::Accepted {
                device: DeviceId::new(d).expect("grammar"),
                root,
                mqtt_password: "0123456789abcdef".into(),
                client_cert: None,
            }
        )),
        ident().prop_map(|reason| Message::EnrollResponse(EnrollResponse::Refused { reason })),
    ]
}

fn workload() -> impl Strategy<Value = WorkloadSpec> {
    (
        ident(),
        digest(),
        proptest::collection::vec(any::<u8>(), 0..40),
        1u32..512,
        any::<u32>(),
        -80.0f64..80.0,
    )
        .prop_map(
            |(name, release, config, memory_mib, tick_ms, lat)| WorkloadSpec {
                name: WorkloadName::new(name).expect("grammar"),
                kind: WorkloadKind::Wasm,
                release,
                config,
                resources: Resources {
                    memory_mib,
                    cpu_ms: 100,
                },
                restart: RestartPolicy::Always,
                health: HealthRule::TicksOk(3),
                tick_ms,
                geofence: Some(Geofence::Circle {
                    center: LatLon { lat, lon: 10.0 },
                    radius_m: 500.0,
                }),
                secrets: vec![SecretRef {
                    deployment: "d".into(),
                    name: "token".into(),
                    version: u64::from(tick_ms),
                }],
                container: None,
            },
        )
}

proptest! {
    /// Every message kind survives encode -> decode unchanged.
    #[test]
    fn envelope_round_trips(msg in message()) {
        let bytes = codec::encode(&msg).expect("within caps");
        prop_assert_eq!(codec::decode(&bytes), Ok(msg));
    }

    /// Signed desired states round-trip and verify, whatever the workloads.
    #[test]
    fn desired_state_round_trips(device in ident(), generation in 1u64.., ws in proptest::collection::vec(workload(), 0..4)) {
        let mut seen = std::collections::BTreeSet::new();
        let ws: Vec<_> = ws.into_iter().filter(|w| seen.insert(w.name.clone())).collect();
        let hub = SigningKey::from_seed([7; 32]);
        let root = Root { version: 1, expires_at: u64::MAX, root_keys: vec![hub.public()], root_threshold: 1,
            release_keys: vec![hub.public()], release_threshold: 1, hub_keys: vec![hub.public()], hub_threshold: 1 };
        let device = DeviceId::new(device).expect("grammar");
        let sealed = ws.iter().map(|w| SealedSecret { workload: w.name.clone(), name: "token".into(), version: 1, sealed: vec![7; 60] }).collect();
        let ds = DesiredState { device: device.clone(), generation, issued_at: 1, expires_at: u64::MAX - 1, workloads: ws, sealed, staged: vec![] };
        let signed = trust::sign(DocType::DesiredState, &ds, &[&hub]);
        let bytes = codec::encode(&Message::DesiredState(signed)).expect("within caps");
        let Ok(Message::DesiredState(back)) = codec::decode(&bytes) else { panic!("decodes") };
        prop_assert_eq!(trust::verify_desired(&root, &device, &back, &TrustFloor::default(), None, 2), Ok(ds));
    }

    /// Arbitrary bytes give a value or a typed error, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = codec::decode(&bytes);
        let _ = codec::decode_exact::<DesiredState>(&bytes);
        let _ = codec::decode_exact::<Release>(&bytes);
        let _ = codec::decode_exact::<Report>(&bytes);
        let _ = codec::decode_exact::<Root>(&bytes);
    }

    /// Arbitrary bytes behind a valid header exercise every body decoder.
    #[test]
    fn arbitrary_bodies_never_panic(kind in 1u8..=9, body in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut bytes = vec![codec::MAGIC, codec::PROTOCOL_VERSION, kind];
        bytes.extend(body);
        let _ = codec::decode(&bytes);
    }
}

/// Regression inputs found by `cargo fuzz run envelope`: decoded without panic, and semantically round-tripping.
#[test]
fn fuzz_regressions() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    for entry in std::fs::read_dir(dir).expect("regression dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
        if let Ok(msg) = codec::decode(&bytes) {
            let again = codec::encode(&msg).expect("re-encodes");
            let back = codec::decode(&again).expect("decodes");
            assert_eq!(codec::encode(&back).expect("re-encodes"), again);
        }
    }
}
