//! The device's container image check over arbitrary bytes: it returns `Ok` or a typed `ImageProblem`, never
//! panics, and accepts nothing but the exact signed image. Seeded with a real canonical tarball whose identity
//! is the one checked against, so mutations explore deep into the tar and the JSON metadata.

#![no_main]

use flotilla_shared::image;
use libfuzzer_sys::fuzz_target;

#[path = "../src/image_sample.rs"]
mod image_sample;
use image_sample::sample;

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
