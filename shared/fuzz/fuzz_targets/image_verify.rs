//! The device's container image check over arbitrary bytes: it returns `Ok` or a typed `ImageProblem`, never
//! panics, and accepts nothing but the exact signed image. Seeded with a real canonical tarball whose identity
//! is the one checked against, so mutations explore deep into the tar and the JSON metadata.

#![no_main]

use flotilla_shared::image::{self, ImageParts};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// A canonical tarball (written once) and its signed identity.
fn sample() -> &'static (Vec<u8>, flotilla_shared::wire::ContainerImage) {
    static S: OnceLock<(Vec<u8>, flotilla_shared::wire::ContainerImage)> = OnceLock::new();
    S.get_or_init(|| {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, "hello", &b"hi\n"[..]).expect("layer");
        let layer = b.into_inner().expect("layer");
        let id = image::oci_digest(&flotilla_shared::Digest::of(&layer));
        let config = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{id}"]}}}}"#).into_bytes();
        image::write_canonical(&ImageParts {
            config,
            layers: vec![layer],
        })
        .expect("canonical")
    })
}

fuzz_target!(|data: &[u8]| {
    let (_, signed) = sample();
    if image::verify(data, signed).is_err() {
        return;
    }
    // Accepted: re-read the tar independently. The config blob the Docker loader will read exists under its
    // digest and hashes to the signed config digest, and no entry is a link or outside the layout.
    let config_path = image::blob_path(&signed.config_digest);
    let mut a = tar::Archive::new(data);
    let mut config_ok = false;
    for e in a.entries().expect("verify read this tar") {
        let mut e = e.expect("verify read this entry");
        let kind = e.header().entry_type();
        assert!(
            matches!(kind, tar::EntryType::Regular | tar::EntryType::Directory),
            "accepted a {kind:?} entry"
        );
        let path = e.path().expect("path").to_string_lossy().into_owned();
        let path = path.trim_start_matches("./").to_owned();
        if path == config_path {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut bytes).expect("config");
            assert_eq!(flotilla_shared::Digest::of(&bytes), signed.config_digest);
            config_ok = true;
        }
    }
    assert!(config_ok, "accepted without the signed config blob");
});
