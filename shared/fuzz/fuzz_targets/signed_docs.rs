//! Fuzz target: the signed-document decoders and verifiers (desired state, release, root, report) never panic.
#![no_main]

use flotilla_shared::codec::decode_exact;
use flotilla_shared::trust::{self, SigningKey, TrustFloor};
use flotilla_shared::wire::{Root, Signed, WorkloadKind, WorkloadSpec};
use flotilla_shared::{DeviceId, WorkloadName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_seed([1; 32]);
    let root = Root {
        version: 1,
        expires_at: u64::MAX,
        root_keys: vec![key.public()],
        root_threshold: 1,
        release_keys: vec![key.public()],
        release_threshold: 1,
        hub_keys: vec![key.public()],
        hub_threshold: 1,
    };
    let device = DeviceId::new("gw-1").expect("valid");
    // Raw bytes as a Signed wrapper, and raw bytes as a body signed by a trusted key (so decoding is reached).
    let candidates: Vec<Signed> = decode_exact::<Signed>(data)
        .into_iter()
        .chain([trust::sign(trust::DocType::DesiredState, &data.to_vec(), &[&key])])
        .chain([Signed { body: data.to_vec(), signatures: vec![] }])
        .collect();
    for signed in &candidates {
        let _ = trust::verify_desired(&root, &device, signed, &TrustFloor::default(), None, 1);
        let _ = trust::verify_initial_root(signed, 1);
        let _ = trust::verify_root_rotation(&root, signed, 1);
        let _ = trust::verify_report(&key.public(), &device, signed, 0);
        let spec = WorkloadSpec {
            name: WorkloadName::new("w").expect("valid"),
            kind: WorkloadKind::Wasm,
            release: trust::document_digest(signed),
            config: vec![],
            resources: flotilla_shared::wire::Resources { memory_mib: 1, cpu_ms: 1 },
            restart: flotilla_shared::wire::RestartPolicy::Never,
            health: flotilla_shared::wire::HealthRule::RunningFor(1),
            tick_ms: 0,
            geofence: None,
        };
        let _ = trust::verify_release_for(&root, signed, &spec, &TrustFloor::default());
    }
});
