//! Reading what operators push as a container image (`docker save` output of any Docker version, or an OCI image
//! layout tarball from Podman, skopeo or buildah) into the parts the canonical tarball is written from.
//!
//! Layers are stored uncompressed in the canonical form (gzip layers are inflated here) so that a device checks
//! each layer's digest against the signed diff_id without decompressing anything.

use anyhow::{Context, Result, bail};
use flotilla_shared::Digest;
use flotilla_shared::image::{DockerManifestEntry, ImageParts, OciIndex, OciManifest};
use std::collections::BTreeMap;
use std::io::Read;

/// Reads an image tarball into its config and uncompressed layers.
pub fn read_source(reader: impl Read) -> Result<ImageParts> {
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().context("not a tar archive")? {
        let mut entry = entry.context("reading the image tarball")?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path()?.to_string_lossy().into_owned();
        let path = path.strip_prefix("./").unwrap_or(&path).to_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        files.insert(path, bytes);
    }
    let get = |p: &str| {
        files
            .get(p)
            .with_context(|| format!("the image tarball has no `{p}`"))
    };
    // Docker's loader manifest first (every `docker save`, and Docker 25+ OCI output); then a plain OCI layout.
    let (config, layer_paths) = if let Some(m) = files.get("manifest.json") {
        let entries: Vec<DockerManifestEntry> =
            serde_json::from_slice(m).context("manifest.json is not a docker save manifest")?;
        let [entry] = entries.as_slice() else {
            bail!(
                "the tarball holds {} images; save exactly one (`docker save IMAGE`)",
                entries.len()
            );
        };
        (get(&entry.config)?.clone(), entry.layers.clone())
    } else if let Some(i) = files.get("index.json") {
        let index: OciIndex =
            serde_json::from_slice(i).context("index.json is not an OCI index")?;
        let [desc] = index.manifests.as_slice() else {
            bail!(
                "the OCI index lists {} manifests; save a single platform",
                index.manifests.len()
            );
        };
        let manifest_bytes = get(&blob_of(&desc.digest)?)?;
        let manifest: OciManifest = serde_json::from_slice(manifest_bytes).context(
            "the OCI manifest is not an image manifest (a multi-platform index? save one platform)",
        )?;
        (
            get(&blob_of(&manifest.config.digest)?)?.clone(),
            manifest
                .layers
                .iter()
                .map(|l| blob_of(&l.digest))
                .collect::<Result<_>>()?,
        )
    } else {
        bail!(
            "not an image tarball: neither manifest.json (docker save) nor index.json (OCI layout)"
        );
    };
    let layers = layer_paths
        .iter()
        .map(|p| inflate(get(p)?).with_context(|| format!("layer {p}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(ImageParts { config, layers })
}

fn blob_of(digest: &str) -> Result<String> {
    let d = flotilla_shared::image::parse_oci_digest(digest)
        .with_context(|| format!("unsupported digest {digest:?} (sha256 only)"))?;
    Ok(flotilla_shared::image::blob_path(&d))
}

/// A layer as an uncompressed tar: gzip layers are inflated, others taken as they are.
fn inflate(bytes: &[u8]) -> Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out)?;
        Ok(out)
    } else if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        bail!("zstd-compressed layers are not supported; save the image uncompressed or with gzip")
    } else {
        Ok(bytes.to_vec())
    }
}

/// The digest of the canonical tarball's bytes, for messages.
pub fn describe(image: &flotilla_shared::wire::ContainerImage) -> String {
    let registry = image
        .registry
        .as_ref()
        .map_or_else(String::new, |r| format!(", also from {r}"));
    format!(
        "image {} ({} layer(s)), manifest {}{registry}",
        image.config_digest,
        image.diff_ids.len(),
        Digest::short(&image.manifest_digest)
    )
}
