//! One test per attack from `TRUST_MODEL.md` that applies at the protocol layer, each rejected with its own typed
//! reason, plus the valid documents and a properly signed rotation being accepted.

use flotilla_shared::codec::{self, DecodeError, Message};
use flotilla_shared::trust::{
    self, ArtifactError, ArtifactVerifier, DesiredError, DocType, ReleaseError, ReportError,
    RootError, SignatureError, SigningKey, TrustFloor,
};
use flotilla_shared::wire::{
    DesiredState, HealthRule, Precompiled, Release, Report, Resources, RestartPolicy, Root, Signed,
    WorkloadKind, WorkloadSpec,
};
use flotilla_shared::{DeviceId, Digest, WorkloadName};

const NOW: u64 = 1_800_000_000;
const DAY: u64 = 86_400;

/// Keys for one test world: two root keys (threshold 2), two release keys (threshold 2), one hub key.
struct World {
    root_keys: Vec<SigningKey>,
    release_keys: Vec<SigningKey>,
    hub: SigningKey,
    root: Root,
}

fn key(n: u8) -> SigningKey {
    SigningKey::from_seed([n; 32])
}

fn world() -> World {
    let root_keys = vec![key(1), key(2)];
    let release_keys = vec![key(11), key(12)];
    let hub = key(21);
    let root = Root {
        version: 1,
        expires_at: NOW + 365 * DAY,
        root_keys: root_keys.iter().map(SigningKey::public).collect(),
        root_threshold: 2,
        release_keys: release_keys.iter().map(SigningKey::public).collect(),
        release_threshold: 2,
        hub_keys: vec![hub.public()],
        hub_threshold: 1,
    };
    World {
        root_keys,
        release_keys,
        hub,
        root,
    }
}

fn dev(id: &str) -> DeviceId {
    DeviceId::new(id).expect("valid id")
}

fn name(n: &str) -> WorkloadName {
    WorkloadName::new(n).expect("valid name")
}

fn release(n: &str, epoch: u32, artifact: &[u8]) -> Release {
    Release {
        name: name(n),
        version: "1.0.0".into(),
        epoch,
        kind: WorkloadKind::Wasm,
        artifact_digest: Digest::of(artifact),
        artifact_size: artifact.len() as u64,
        precompiled: vec![],
        image: None,
        compatible: None,
    }
}

fn sign_release(w: &World, r: &Release) -> Signed {
    trust::sign(
        DocType::Release,
        r,
        &[&w.release_keys[0], &w.release_keys[1]],
    )
}

fn spec(n: &str, release: &Signed) -> WorkloadSpec {
    WorkloadSpec {
        name: name(n),
        kind: WorkloadKind::Wasm,
        release: trust::document_digest(release),
        config: b"interval=5".to_vec(),
        resources: Resources {
            memory_mib: 16,
            cpu_ms: 50,
        },
        restart: RestartPolicy::OnFailure,
        health: HealthRule::RunningFor(10),
        tick_ms: 1000,
        geofence: None,
        secrets: vec![],
        container: None,
    }
}

fn desired(device: &str, generation: u64, workloads: Vec<WorkloadSpec>) -> DesiredState {
    DesiredState {
        device: dev(device),
        generation,
        issued_at: NOW,
        expires_at: NOW + 7 * DAY,
        workloads,
        sealed: vec![],
        staged: vec![],
    }
}

fn sign_desired(w: &World, ds: &DesiredState) -> Signed {
    trust::sign(DocType::DesiredState, ds, &[&w.hub])
}

fn verify(w: &World, signed: &Signed, floor: &TrustFloor) -> Result<DesiredState, DesiredError> {
    trust::verify_desired(&w.root, &dev("gw-1"), signed, floor, None, NOW)
}

fn good_desired(w: &World) -> Signed {
    let r = sign_release(w, &release("sensor", 1, b"\0asm"));
    sign_desired(w, &desired("gw-1", 5, vec![spec("sensor", &r)]))
}

fn root_signed(root: &Root, keys: &[&SigningKey]) -> Signed {
    trust::sign(DocType::Root, root, keys)
}

fn rotated(w: &World, new_root_keys: &[SigningKey]) -> Root {
    Root {
        version: 2,
        root_keys: new_root_keys.iter().map(SigningKey::public).collect(),
        root_threshold: 1,
        ..w.root.clone()
    }
}

/// A valid desired state, release, report and self-signed root are all accepted.
#[test]
fn valid_documents_are_accepted() {
    let w = world();
    let rel = release("sensor", 1, b"\0asm");
    let rel_signed = sign_release(&w, &rel);
    let ds = desired("gw-1", 5, vec![spec("sensor", &rel_signed)]);
    let signed = sign_desired(&w, &ds);
    assert_eq!(verify(&w, &signed, &TrustFloor::default()), Ok(ds.clone()));
    let got = trust::verify_release_for(
        &w.root,
        &rel_signed,
        &ds.workloads[0],
        &TrustFloor::default(),
    );
    assert_eq!(got, Ok(rel));
    let initial = root_signed(&w.root, &[&w.root_keys[0], &w.root_keys[1]]);
    assert_eq!(
        trust::verify_initial_root(&initial, NOW),
        Ok(w.root.clone())
    );
    // The same generation re-delivered byte-identically (a retained message after reconnect) is accepted.
    let floor = TrustFloor {
        generation: 5,
        ..TrustFloor::default()
    };
    let again = trust::verify_desired(
        &w.root,
        &dev("gw-1"),
        &signed,
        &floor,
        Some(&signed.body),
        NOW,
    );
    assert!(again.is_ok());
}

/// Attack: an unsigned desired state.
#[test]
fn rejects_unsigned() {
    let w = world();
    let mut s = good_desired(&w);
    s.signatures.clear();
    assert_eq!(
        verify(&w, &s, &TrustFloor::default()),
        Err(DesiredError::Signature(SignatureError::Unsigned))
    );
}

/// Attack: a desired state signed by a key the root does not name for the hub role (here a release key).
#[test]
fn rejects_unknown_key() {
    let w = world();
    let ds = desired("gw-1", 5, vec![]);
    let s = trust::sign(DocType::DesiredState, &ds, &[&w.release_keys[0]]);
    assert_eq!(
        verify(&w, &s, &TrustFloor::default()),
        Err(DesiredError::Signature(SignatureError::UnknownKey))
    );
}

/// Attack: a release signed by one release key when two are required (the same key twice counts once).
#[test]
fn rejects_below_threshold() {
    let w = world();
    let rel = release("sensor", 1, b"\0asm");
    let one = trust::sign(
        DocType::Release,
        &rel,
        &[&w.release_keys[0], &w.release_keys[0]],
    );
    let err =
        trust::verify_release_for(&w.root, &one, &spec("sensor", &one), &TrustFloor::default());
    assert_eq!(
        err,
        Err(ReleaseError::Signature(SignatureError::BelowThreshold {
            valid: 1,
            needed: 2
        }))
    );
}

/// Attack: one flipped byte anywhere in the signed body.
#[test]
fn rejects_flipped_byte() {
    let w = world();
    let good = good_desired(&w);
    for i in 0..good.body.len() {
        let mut s = good.clone();
        s.body[i] ^= 0x01;
        assert_eq!(
            verify(&w, &s, &TrustFloor::default()),
            Err(DesiredError::Signature(SignatureError::BadSignature)),
            "byte {i}"
        );
    }
    // A flipped bit in the signature itself is caught the same way.
    let mut s = good;
    s.signatures[0].sig[10] ^= 0x80;
    assert_eq!(
        verify(&w, &s, &TrustFloor::default()),
        Err(DesiredError::Signature(SignatureError::BadSignature))
    );
}

/// Attack: a correctly signed desired state for another device.
#[test]
fn rejects_wrong_device() {
    let w = world();
    let s = sign_desired(&w, &desired("gw-2", 5, vec![]));
    assert_eq!(
        verify(&w, &s, &TrustFloor::default()),
        Err(DesiredError::WrongDevice { got: dev("gw-2") })
    );
}

/// Attack: replay of an older generation, and of the same generation with different bytes.
#[test]
fn rejects_older_generation() {
    let w = world();
    let floor = TrustFloor {
        generation: 6,
        ..TrustFloor::default()
    };
    assert_eq!(
        verify(&w, &good_desired(&w), &floor),
        Err(DesiredError::StaleGeneration { floor: 6, got: 5 })
    );
    let floor = TrustFloor {
        generation: 5,
        ..TrustFloor::default()
    };
    let other = sign_desired(&w, &desired("gw-1", 5, vec![]));
    let accepted = good_desired(&w);
    let got = trust::verify_desired(
        &w.root,
        &dev("gw-1"),
        &other,
        &floor,
        Some(&accepted.body),
        NOW,
    );
    assert_eq!(got, Err(DesiredError::StaleGeneration { floor: 5, got: 5 }));
}

/// Attack: an expired desired state.
#[test]
fn rejects_expired() {
    let w = world();
    let mut ds = desired("gw-1", 5, vec![]);
    ds.expires_at = NOW - 1;
    let s = sign_desired(&w, &ds);
    assert_eq!(
        verify(&w, &s, &TrustFloor::default()),
        Err(DesiredError::Expired {
            expires_at: NOW - 1,
            now: NOW
        })
    );
}

/// Attack: the device clock is set backwards so that stale metadata looks fresh; the highest issued-at ever seen
/// is the floor for "now".
#[test]
fn rejects_clock_set_backwards() {
    let w = world();
    let mut ds = desired("gw-1", 7, vec![]);
    ds.issued_at = NOW - 10 * DAY;
    ds.expires_at = NOW - 3 * DAY;
    let s = sign_desired(&w, &ds);
    // The attacker has set the clock back to a time when the document was valid ...
    let clock = NOW - 5 * DAY;
    // ... but the device has already seen a document issued at NOW.
    let floor = TrustFloor {
        generation: 6,
        issued_at: NOW,
        ..TrustFloor::default()
    };
    let got = trust::verify_desired(&w.root, &dev("gw-1"), &s, &floor, None, clock);
    assert_eq!(
        got,
        Err(DesiredError::Expired {
            expires_at: NOW - 3 * DAY,
            now: NOW
        })
    );
    // Without the floor the same clock would have let it through, which is exactly the attack.
    let naive = trust::verify_desired(
        &w.root,
        &dev("gw-1"),
        &s,
        &TrustFloor::default(),
        None,
        clock,
    );
    assert!(naive.is_ok());
}

/// Attack: the hub names a release digest that no release signed (mix-and-match), or serves a different release
/// (another workload's) under the named digest.
#[test]
fn rejects_mix_and_match() {
    let w = world();
    let good = sign_release(&w, &release("sensor", 1, b"\0asm"));
    let mut s = spec("sensor", &good);
    s.release = Digest::of(b"never released");
    assert!(matches!(
        trust::verify_release_for(&w.root, &good, &s, &TrustFloor::default()),
        Err(ReleaseError::DigestMismatch { .. })
    ));
    let other = sign_release(&w, &release("camera", 1, b"\0asm"));
    let s = spec("sensor", &other);
    assert_eq!(
        trust::verify_release_for(&w.root, &other, &s, &TrustFloor::default()),
        Err(ReleaseError::NameMismatch {
            spec: name("sensor"),
            release: name("camera")
        })
    );
}

/// Attack: a release of a lower security epoch than the device has accepted for that workload.
#[test]
fn rejects_epoch_downgrade() {
    let w = world();
    let old = sign_release(&w, &release("sensor", 1, b"\0asm"));
    let mut floor = TrustFloor::default();
    floor.epochs.insert(name("sensor"), 2);
    assert_eq!(
        trust::verify_release_for(&w.root, &old, &spec("sensor", &old), &floor),
        Err(ReleaseError::EpochDowngrade { floor: 2, got: 1 })
    );
    // A rollback within the same epoch is allowed: that is what automatic rollout rollback uses.
    let same = sign_release(&w, &release("sensor", 2, b"\0asm-old"));
    assert!(trust::verify_release_for(&w.root, &same, &spec("sensor", &same), &floor).is_ok());
}

/// Attack: an older root version is offered as an update.
#[test]
fn rejects_older_root() {
    let w = world();
    let mut v0 = w.root.clone();
    v0.version = 0;
    let s = root_signed(&v0, &[&w.root_keys[0], &w.root_keys[1]]);
    assert_eq!(
        trust::verify_root_rotation(&w.root, &s, NOW),
        Err(RootError::OlderVersion { current: 1, got: 0 })
    );
    // Re-offering the current version is not a rotation either.
    let s = root_signed(&w.root, &[&w.root_keys[0], &w.root_keys[1]]);
    assert_eq!(
        trust::verify_root_rotation(&w.root, &s, NOW),
        Err(RootError::OlderVersion { current: 1, got: 1 })
    );
}

/// Attack: a root rotation signed only by the new root keys (an attacker who made up their own root).
#[test]
fn rejects_rotation_signed_only_by_new_keys() {
    let w = world();
    let new_keys = vec![key(31)];
    let v2 = rotated(&w, &new_keys);
    let s = root_signed(&v2, &[&new_keys[0]]);
    assert_eq!(
        trust::verify_root_rotation(&w.root, &s, NOW),
        Err(RootError::NotSignedByPrevious(SignatureError::UnknownKey))
    );
}

/// A rotation signed by the old threshold and the new keys is accepted, and a chain is applied in order.
#[test]
fn accepts_proper_rotation() {
    let w = world();
    let new_keys = vec![key(31)];
    let v2 = rotated(&w, &new_keys);
    let s2 = root_signed(&v2, &[&w.root_keys[0], &w.root_keys[1], &new_keys[0]]);
    assert_eq!(
        trust::verify_root_rotation(&w.root, &s2, NOW),
        Ok(v2.clone())
    );
    let v3 = Root {
        version: 3,
        ..v2.clone()
    };
    let s3 = root_signed(&v3, &[&new_keys[0]]);
    // The chain may re-deliver versions the device already has; they are skipped.
    let old = root_signed(&w.root, &[&w.root_keys[0], &w.root_keys[1]]);
    assert_eq!(
        trust::verify_root_chain(&w.root, &[old, s2, s3.clone()], NOW),
        Ok(v3)
    );
    // Skipping v2 is refused: the device cannot check v3 against v1's keys.
    assert_eq!(
        trust::verify_root_rotation(&w.root, &s3, NOW),
        Err(RootError::VersionGap { current: 1, got: 3 })
    );
}

/// Attack: a hub key revoked by a root rotation keeps signing desired states.
#[test]
fn rejects_revoked_key_after_rotation() {
    let w = world();
    let new_hub = key(41);
    let v2 = Root {
        version: 2,
        hub_keys: vec![new_hub.public()],
        ..w.root.clone()
    };
    let s2 = root_signed(&v2, &[&w.root_keys[0], &w.root_keys[1]]);
    let root = trust::verify_root_rotation(&w.root, &s2, NOW).expect("rotation accepted");
    let by_old = sign_desired(&w, &desired("gw-1", 9, vec![]));
    let got = trust::verify_desired(
        &root,
        &dev("gw-1"),
        &by_old,
        &TrustFloor::default(),
        None,
        NOW,
    );
    assert_eq!(
        got,
        Err(DesiredError::Signature(SignatureError::UnknownKey))
    );
    let by_new = trust::sign(
        DocType::DesiredState,
        &desired("gw-1", 9, vec![]),
        &[&new_hub],
    );
    assert!(
        trust::verify_desired(
            &root,
            &dev("gw-1"),
            &by_new,
            &TrustFloor::default(),
            None,
            NOW
        )
        .is_ok()
    );
}

/// Attack: an expired root (and an expired rotation) is refused, also when the clock is wound back.
#[test]
fn rejects_expired_root() {
    let w = world();
    let mut old = w.root.clone();
    old.expires_at = NOW - 1;
    let s = root_signed(&old, &[&w.root_keys[0], &w.root_keys[1]]);
    assert_eq!(
        trust::verify_initial_root(&s, NOW),
        Err(RootError::Expired {
            expires_at: NOW - 1,
            now: NOW
        })
    );
    let ds = sign_desired(&w, &desired("gw-1", 5, vec![]));
    let floor = TrustFloor {
        issued_at: NOW,
        ..TrustFloor::default()
    };
    let got = trust::verify_desired(&old, &dev("gw-1"), &ds, &floor, None, NOW - DAY);
    assert_eq!(
        got,
        Err(DesiredError::RootExpired {
            expires_at: NOW - 1,
            now: NOW
        })
    );
}

/// Attack: malformed, truncated, trailing-garbage and oversized encodings give a typed error, never a panic.
#[test]
fn rejects_malformed_and_oversized() {
    let w = world();
    let good = codec::encode(&Message::DesiredState(good_desired(&w))).expect("encodes");
    for len in 0..good.len() {
        assert!(codec::decode(&good[..len]).is_err(), "truncated at {len}");
    }
    let mut trailing = good.clone();
    trailing.push(0);
    assert_eq!(codec::decode(&trailing), Err(DecodeError::TrailingBytes(1)));
    let mut big = good.clone();
    big.resize(16 * 1024 + 1, 0);
    assert_eq!(
        codec::decode(&big),
        Err(DecodeError::TooLarge {
            len: 16 * 1024 + 1,
            cap: 16 * 1024
        })
    );
    assert_eq!(
        codec::decode(&vec![0u8; 200 * 1024]),
        Err(DecodeError::TooLarge {
            len: 200 * 1024,
            cap: 80 * 1024
        })
    );
    assert_eq!(codec::decode(&[0x00, 1, 1]), Err(DecodeError::BadMagic(0)));
    assert_eq!(
        codec::decode(&[codec::MAGIC, 9, 1]),
        Err(DecodeError::UnsupportedVersion { got: 9 })
    );
    assert_eq!(
        codec::decode(&[codec::MAGIC, codec::PROTOCOL_VERSION, 200]),
        Err(DecodeError::UnknownKind(200))
    );
    // A signed body that is garbage passes the signature check (it was signed) and is then refused as malformed.
    let garbage = trust::sign(DocType::DesiredState, &vec![0xffu8; 3], &[&w.hub]);
    assert!(matches!(
        verify(&w, &garbage, &TrustFloor::default()),
        Err(DesiredError::Malformed(_))
    ));
    // A signature of the wrong length is a bad signature, not a panic.
    let mut short = good_desired(&w);
    short.signatures[0].sig.truncate(10);
    assert_eq!(
        verify(&w, &short, &TrustFloor::default()),
        Err(DesiredError::Signature(SignatureError::BadSignature))
    );
}

/// Attack: artifact bytes that do not match the signed digest, a stream longer than the signed size, and one that
/// ends early (a stalled stream is cut by the agent's deadline and surfaces as truncated).
#[test]
fn rejects_bad_artifact_streams() {
    let bytes = b"\0asm real module";
    let mut v = ArtifactVerifier::new(Digest::of(bytes), bytes.len() as u64);
    v.update(b"\0asm evil module").expect("same length");
    assert!(matches!(
        v.finish(),
        Err(ArtifactError::DigestMismatch { .. })
    ));
    let mut v = ArtifactVerifier::new(Digest::of(bytes), bytes.len() as u64);
    v.update(bytes).expect("exact size");
    assert_eq!(
        v.update(b"more"),
        Err(ArtifactError::TooLarge {
            signed: bytes.len() as u64
        })
    );
    assert!(v.finish().is_err(), "stays refused after overflow");
    let mut v = ArtifactVerifier::new(Digest::of(bytes), bytes.len() as u64);
    v.update(&bytes[..4]).expect("prefix");
    assert_eq!(
        v.finish(),
        Err(ArtifactError::Truncated {
            got: 4,
            signed: bytes.len() as u64
        })
    );
    let mut v = ArtifactVerifier::new(Digest::of(bytes), bytes.len() as u64);
    v.update(&bytes[..5]).expect("part one");
    v.update(&bytes[5..]).expect("part two");
    assert_eq!(v.finish(), Ok(()));
}

/// Attack: a precompiled module for another engine fingerprint or target is never selected.
#[test]
fn precompiled_only_for_exact_engine() {
    let mut r = release("sensor", 1, b"\0asm");
    r.precompiled.push(Precompiled {
        target: "aarch64-unknown-linux-gnu".into(),
        engine_fingerprint: "wasmtime-48.0.8-a".into(),
        digest: Digest::of(b"cwasm"),
        size: 5,
    });
    assert!(
        trust::select_precompiled(&r, "aarch64-unknown-linux-gnu", "wasmtime-48.0.8-b").is_none()
    );
    assert!(
        trust::select_precompiled(&r, "x86_64-unknown-linux-gnu", "wasmtime-48.0.8-a").is_none()
    );
    assert!(
        trust::select_precompiled(&r, "aarch64-unknown-linux-gnu", "wasmtime-48.0.8-a").is_some()
    );
}

/// Attack: a report replayed (counter not increasing), forged by another device's key, or naming another device.
#[test]
fn rejects_bad_reports() {
    let device_key = key(51);
    let report = Report {
        device: dev("gw-1"),
        counter: 10,
        sent_at: NOW,
        applied_generation: 5,
        last_rejection: None,
        workloads: vec![],
        inventory: None,
        telemetry_dropped: 0,
        hold: None,
        staged: vec![],
    };
    let s = trust::sign(DocType::Report, &report, &[&device_key]);
    assert_eq!(
        trust::verify_report(&device_key.public(), &dev("gw-1"), &s, 9),
        Ok(report.clone())
    );
    assert_eq!(
        trust::verify_report(&device_key.public(), &dev("gw-1"), &s, 10),
        Err(ReportError::Replayed { last: 10, got: 10 })
    );
    let forged = trust::sign(DocType::Report, &report, &[&key(52)]);
    assert_eq!(
        trust::verify_report(&device_key.public(), &dev("gw-1"), &forged, 0),
        Err(ReportError::Signature(SignatureError::UnknownKey))
    );
    assert_eq!(
        trust::verify_report(&device_key.public(), &dev("gw-9"), &s, 0),
        Err(ReportError::WrongDevice { got: dev("gw-1") })
    );
}

/// Attack: a signature made for one document type (a release) replayed as another (a desired state) by a key that
/// holds both roles; domain separation makes it fail.
#[test]
fn rejects_cross_document_replay() {
    let w = world();
    let ds = desired("gw-1", 5, vec![]);
    let mut root = w.root.clone();
    root.hub_keys = vec![w.release_keys[0].public()];
    let as_release = trust::sign(DocType::Release, &ds, &[&w.release_keys[0]]);
    let got = trust::verify_desired(
        &root,
        &dev("gw-1"),
        &as_release,
        &TrustFloor::default(),
        None,
        NOW,
    );
    assert_eq!(
        got,
        Err(DesiredError::Signature(SignatureError::BadSignature))
    );
}

/// A desired state for a device with 3 workloads fits in 512 bytes on the wire, signature and envelope included.
#[test]
fn desired_state_with_three_workloads_fits_512_bytes() {
    let w = world();
    let specs = ["sensor", "uplink", "camera-gate"]
        .iter()
        .map(|n| spec(n, &sign_release(&w, &release(n, 1, n.as_bytes()))))
        .collect();
    let ds = desired("gateway-eu-0042", 1_234_567, specs);
    let bytes = codec::encode(&Message::DesiredState(sign_desired(&w, &ds))).expect("encodes");
    println!(
        "desired state, 3 workloads, signed, in envelope: {} bytes",
        bytes.len()
    );
    assert!(bytes.len() <= 512, "{} bytes", bytes.len());
}
