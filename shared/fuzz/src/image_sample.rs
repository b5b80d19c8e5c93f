//! The canonical image tarball the `image_verify` fuzz target checks against (and seeds its corpus with).

use flotilla_shared::image::{self, ImageParts};
use std::sync::OnceLock;

/// A canonical tarball (written once) and its signed identity.
pub fn sample() -> &'static (Vec<u8>, flotilla_shared::wire::ContainerImage) {
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

