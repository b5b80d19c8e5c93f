//! Fuzz target: the device CA signing whatever bytes a device sends as a CSR (at enrollment and on `cert/req`).
//! Nothing may panic, and anything signed names the device the hub chose, never what the request asked for.
#![no_main]

use flotilla_hub::pki::DeviceCa;
use flotilla_shared::DeviceId;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn ca() -> &'static DeviceCa {
    static CA: OnceLock<(tempfile::TempDir, DeviceCa)> = OnceLock::new();
    &CA.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = DeviceCa::in_dir(dir.path());
        ca.create().expect("device CA");
        (dir, ca)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let id = DeviceId::new("gw-fuzz").expect("id");
    if let Ok(issued) = ca().issue(data, &id, 3600, 1_800_000_000) {
        assert!(issued.cert.pem.contains("BEGIN CERTIFICATE"));
        assert_eq!(issued.cert.not_after, 1_800_003_600);
    }
});
