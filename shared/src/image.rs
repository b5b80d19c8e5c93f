//! Container image tarballs: the canonical form a container release signs, and the device's check of it.
//!
//! The hub turns whatever the operator pushes (`docker save` output, an OCI layout) into one canonical tarball
//! that is both an OCI image layout and loadable by every Docker-compatible engine's `load`:
//!
//! ```text
//! oci-layout                  {"imageLayoutVersion":"1.0.0"}
//! index.json                  one manifest descriptor, no ref-name annotation (no tag)
//! manifest.json               the Docker loader's view: [{"Config": "blobs/sha256/C", "RepoTags": null, "Layers": [...]}]
//! blobs/sha256/C              the image config (its digest is the image ID)
//! blobs/sha256/M              the OCI manifest
//! blobs/sha256/L1 ...         uncompressed layers, so each blob digest is also its diff_id
//! ```
//!
//! Entries are sorted and their headers deterministic, so pushing the same image twice gives the same artifact
//! digest. [`verify`] is what a device runs over the verified artifact before handing it to the engine: every
//! blob hashes to its name, nothing else is in the tar (no legacy `repositories`, no tags, no links), and the
//! config, manifest and layers are the ones the release signed. It reads the tar once, streaming; only metadata
//! (capped at [`MAX_METADATA`]) is kept in memory.

use crate::ids::Digest;
use crate::wire::{ContainerImage, ImageProblem};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

/// Largest metadata file (config, manifests, index) kept in memory.
pub const MAX_METADATA: u64 = 1 << 20;

const MANIFEST_MEDIA: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_MEDIA: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_MEDIA: &str = "application/vnd.oci.image.layer.v1.tar";
/// Annotations that make a loader tag the image.
const TAG_ANNOTATIONS: [&str; 2] = [
    "org.opencontainers.image.ref.name",
    "io.containerd.image.name",
];

/// One entry of the Docker loader's `manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DockerManifestEntry {
    #[serde(rename = "Config")]
    pub config: String,
    #[serde(rename = "RepoTags", default)]
    pub repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    pub layers: Vec<String>,
}

/// An OCI content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An OCI image manifest (the fields Flotilla reads and writes).
#[derive(Debug, Serialize, Deserialize)]
pub struct OciManifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// An OCI image index (`index.json`).
#[derive(Debug, Serialize, Deserialize)]
pub struct OciIndex {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// The part of an image config that names the layers.
#[derive(Debug, Deserialize)]
pub struct ConfigRootfs {
    pub rootfs: Rootfs,
}

#[derive(Debug, Deserialize)]
pub struct Rootfs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

/// `sha256:<hex>` as OCI writes digests.
pub fn oci_digest(d: &Digest) -> String {
    format!("sha256:{}", d.to_hex())
}

/// Parses `sha256:<64 hex>`.
pub fn parse_oci_digest(s: &str) -> Option<Digest> {
    Digest::from_hex(s.strip_prefix("sha256:")?).ok()
}

/// The path of a blob inside the canonical tarball.
pub fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.to_hex())
}

/// The parts of an image, ready to be written as the canonical tarball.
#[derive(Debug)]
pub struct ImageParts {
    pub config: Vec<u8>,
    /// Uncompressed layer tars, bottom first.
    pub layers: Vec<Vec<u8>>,
}

/// Writes the canonical tarball for `parts` and returns it with the identity a release signs. Fails when the
/// config does not name exactly these layers.
pub fn write_canonical(parts: &ImageParts) -> Result<(Vec<u8>, ContainerImage), ImageProblem> {
    let config_digest = Digest::of(&parts.config);
    let diff_ids: Vec<Digest> = parts.layers.iter().map(|l| Digest::of(l)).collect();
    let named = config_diff_ids(&parts.config)?;
    if named != diff_ids {
        return Err(ImageProblem::NotTheSignedImage(
            "layers (the config's rootfs.diff_ids do not match the layer contents)".into(),
        ));
    }
    let manifest = OciManifest {
        schema_version: 2,
        media_type: Some(MANIFEST_MEDIA.into()),
        config: Descriptor {
            media_type: CONFIG_MEDIA.into(),
            digest: oci_digest(&config_digest),
            size: parts.config.len() as u64,
            annotations: None,
        },
        layers: parts
            .layers
            .iter()
            .zip(&diff_ids)
            .map(|(l, d)| Descriptor {
                media_type: LAYER_MEDIA.into(),
                digest: oci_digest(d),
                size: l.len() as u64,
                annotations: None,
            })
            .collect(),
    };
    let manifest_bytes = json(&manifest)?;
    let manifest_digest = Digest::of(&manifest_bytes);
    let index = OciIndex {
        schema_version: 2,
        media_type: Some("application/vnd.oci.image.index.v1+json".into()),
        manifests: vec![Descriptor {
            media_type: MANIFEST_MEDIA.into(),
            digest: oci_digest(&manifest_digest),
            size: manifest_bytes.len() as u64,
            annotations: None,
        }],
    };
    let docker = vec![DockerManifestEntry {
        config: blob_path(&config_digest),
        repo_tags: None,
        layers: diff_ids.iter().map(blob_path).collect(),
    }];
    let mut blobs: BTreeMap<Digest, &[u8]> = BTreeMap::new();
    blobs.insert(config_digest, &parts.config);
    blobs.insert(manifest_digest, &manifest_bytes);
    for (l, d) in parts.layers.iter().zip(&diff_ids) {
        blobs.insert(*d, l);
    }
    let mut out = tar::Builder::new(Vec::new());
    out.mode(tar::HeaderMode::Deterministic);
    let io = |_| ImageProblem::NotATar;
    append_file(&mut out, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io)?;
    append_file(&mut out, "index.json", &json(&index)?).map_err(io)?;
    append_file(&mut out, "manifest.json", &json(&docker)?).map_err(io)?;
    append_dir(&mut out, "blobs/").map_err(io)?;
    append_dir(&mut out, "blobs/sha256/").map_err(io)?;
    for (d, bytes) in blobs {
        append_file(&mut out, &blob_path(&d), bytes).map_err(io)?;
    }
    let bytes = out.into_inner().map_err(io)?;
    Ok((
        bytes,
        ContainerImage {
            config_digest,
            manifest_digest,
            diff_ids,
            registry: None,
        },
    ))
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, ImageProblem> {
    serde_json::to_vec(v).map_err(|_| ImageProblem::BadMetadata("metadata".into()))
}

fn append_file(b: &mut tar::Builder<Vec<u8>>, path: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    b.append_data(&mut h, path, bytes)
}

fn append_dir(b: &mut tar::Builder<Vec<u8>>, path: &str) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    h.set_mtime(0);
    b.append_data(&mut h, path, std::io::empty())
}

/// The layer digests an image config names in `rootfs.diff_ids`.
pub fn config_diff_ids(config: &[u8]) -> Result<Vec<Digest>, ImageProblem> {
    let bad = || ImageProblem::BadMetadata("image config".into());
    let c: ConfigRootfs = serde_json::from_slice(config).map_err(|_| bad())?;
    if c.rootfs.kind != "layers" {
        return Err(bad());
    }
    c.rootfs
        .diff_ids
        .iter()
        .map(|s| parse_oci_digest(s).ok_or_else(bad))
        .collect()
}

/// What one pass over the tarball collected.
#[derive(Default)]
struct Seen {
    paths: BTreeSet<String>,
    blobs: BTreeSet<Digest>,
    metadata: BTreeMap<String, Vec<u8>>,
}

/// Checks a canonical image tarball against the image its release signed, reading it once. Nothing about the
/// tarball is trusted before this returns `Ok`: its digest was checked against the release, but a signer's
/// tooling could still have produced a tarball that loads something else or re-tags an existing image.
pub fn verify(reader: impl Read, signed: &ContainerImage) -> Result<(), ImageProblem> {
    let mut archive = tar::Archive::new(reader);
    let mut seen = Seen::default();
    let entries = archive.entries().map_err(|_| ImageProblem::NotATar)?;
    for entry in entries {
        let mut entry = entry.map_err(|_| ImageProblem::NotATar)?;
        let path = entry
            .path()
            .map_err(|_| ImageProblem::NotATar)?
            .to_string_lossy()
            .into_owned();
        let path = path.strip_prefix("./").unwrap_or(&path).to_owned();
        let kind = entry.header().entry_type();
        // `docker save` of Docker < 25 puts each layer in a directory named by its legacy v1 ID, and the config
        // beside them as `<id>.json`.
        let legacy_dir = path.split('/').next().is_some_and(|top| {
            top.len() >= 64 && top.bytes().take(64).all(|b| b.is_ascii_hexdigit())
        });
        if path == "repositories"
            || legacy_dir
            || path.ends_with("/json")
            || path.ends_with("/VERSION")
            || path.ends_with("/layer.tar")
        {
            return Err(ImageProblem::LegacyFormat);
        }
        if !seen.paths.insert(path.trim_end_matches('/').to_owned()) {
            return Err(ImageProblem::UnexpectedEntry(path));
        }
        match (path.as_str(), kind) {
            ("blobs" | "blobs/" | "blobs/sha256" | "blobs/sha256/", tar::EntryType::Directory) => {}
            ("oci-layout" | "index.json" | "manifest.json", tar::EntryType::Regular) => {
                let bytes = read_capped(&mut entry, &path)?;
                seen.metadata.insert(path, bytes);
            }
            (p, tar::EntryType::Regular) if p.starts_with("blobs/sha256/") => {
                let name = p.trim_start_matches("blobs/sha256/");
                let Some(named) = (name.len() == 64)
                    .then(|| Digest::from_hex(name).ok())
                    .flatten()
                else {
                    return Err(ImageProblem::UnexpectedEntry(path));
                };
                // Metadata blobs are kept to be parsed below; layers are only hashed.
                let keep = named == signed.config_digest || named == signed.manifest_digest;
                let size = entry.size();
                let mut read = 0u64;
                let mut hasher = Sha256::new();
                let mut kept = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = entry.read(&mut buf).map_err(|_| ImageProblem::NotATar)?;
                    if n == 0 {
                        break;
                    }
                    read += n as u64;
                    hasher.update(&buf[..n]);
                    if keep {
                        if kept.len() as u64 + n as u64 > MAX_METADATA {
                            return Err(ImageProblem::BadMetadata(format!(
                                "blob {name} (too large)"
                            )));
                        }
                        kept.extend_from_slice(&buf[..n]);
                    }
                }
                // A tar cut short ends an entry early without an error from the reader.
                if read != size {
                    return Err(ImageProblem::NotATar);
                }
                if Digest(hasher.finalize().into()) != named {
                    return Err(ImageProblem::BlobDigestMismatch(named.to_hex()));
                }
                if keep {
                    seen.metadata.insert(p.to_owned(), kept);
                }
                seen.blobs.insert(named);
            }
            _ => return Err(ImageProblem::UnexpectedEntry(path)),
        }
    }
    check_metadata(&seen, signed)
}

fn read_capped(entry: &mut impl Read, path: &str) -> Result<Vec<u8>, ImageProblem> {
    let mut bytes = Vec::new();
    entry
        .take(MAX_METADATA + 1)
        .read_to_end(&mut bytes)
        .map_err(|_| ImageProblem::NotATar)?;
    if bytes.len() as u64 > MAX_METADATA {
        return Err(ImageProblem::BadMetadata(format!("{path} (too large)")));
    }
    Ok(bytes)
}

/// The cross-checks between the loader's manifest, the OCI index and manifest, the config and the signature.
fn check_metadata(seen: &Seen, signed: &ContainerImage) -> Result<(), ImageProblem> {
    let meta = |name: &str| {
        seen.metadata
            .get(name)
            .ok_or_else(|| ImageProblem::BadMetadata(name.to_owned()))
    };
    meta("oci-layout")?;
    // The Docker loader's view: one image, no tags, exactly the signed config and layers.
    let docker: Vec<DockerManifestEntry> = serde_json::from_slice(meta("manifest.json")?)
        .map_err(|_| ImageProblem::BadMetadata("manifest.json".into()))?;
    let [entry] = docker.as_slice() else {
        return Err(ImageProblem::BadMetadata(
            "manifest.json (not one image)".into(),
        ));
    };
    if entry.repo_tags.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ImageProblem::Tagged);
    }
    if entry.config != blob_path(&signed.config_digest) {
        return Err(ImageProblem::NotTheSignedImage("config".into()));
    }
    let signed_layers: Vec<String> = signed.diff_ids.iter().map(blob_path).collect();
    if entry.layers != signed_layers {
        return Err(ImageProblem::NotTheSignedImage("layers".into()));
    }
    // The OCI view: one manifest, untagged, the signed one.
    let index: OciIndex = serde_json::from_slice(meta("index.json")?)
        .map_err(|_| ImageProblem::BadMetadata("index.json".into()))?;
    let [desc] = index.manifests.as_slice() else {
        return Err(ImageProblem::BadMetadata(
            "index.json (not one manifest)".into(),
        ));
    };
    if desc
        .annotations
        .as_ref()
        .is_some_and(|a| TAG_ANNOTATIONS.iter().any(|k| a.contains_key(*k)))
    {
        return Err(ImageProblem::Tagged);
    }
    if parse_oci_digest(&desc.digest) != Some(signed.manifest_digest) {
        return Err(ImageProblem::NotTheSignedImage("manifest".into()));
    }
    let manifest: OciManifest = serde_json::from_slice(meta(&blob_path(&signed.manifest_digest))?)
        .map_err(|_| ImageProblem::BadMetadata("OCI manifest".into()))?;
    if parse_oci_digest(&manifest.config.digest) != Some(signed.config_digest) {
        return Err(ImageProblem::NotTheSignedImage("config".into()));
    }
    let manifest_layers: Vec<Option<Digest>> = manifest
        .layers
        .iter()
        .map(|l| parse_oci_digest(&l.digest))
        .collect();
    if manifest_layers
        != signed
            .diff_ids
            .iter()
            .copied()
            .map(Some)
            .collect::<Vec<_>>()
    {
        return Err(ImageProblem::NotTheSignedImage("layers".into()));
    }
    let config = meta(&blob_path(&signed.config_digest))?;
    if config_diff_ids(config)? != signed.diff_ids {
        return Err(ImageProblem::NotTheSignedImage("layers".into()));
    }
    for d in &signed.diff_ids {
        if !seen.blobs.contains(d) {
            return Err(ImageProblem::BadMetadata(format!("layer {}", d.short())));
        }
    }
    Ok(())
}

/// Longest registry reference accepted (Docker's own limit on a repository name is 255).
pub const MAX_REGISTRY_REF: usize = 512;

/// Checks a registry reference for a signed release: `host[:port]/path@sha256:<64 lowercase hex>`. Only digest
/// references: a tag can be moved, a digest cannot, so what is signed is what is pulled.
pub fn check_registry_ref(r: &str) -> Result<(), String> {
    if r.len() > MAX_REGISTRY_REF {
        return Err(format!("longer than {MAX_REGISTRY_REF} bytes"));
    }
    let (name, digest) = r
        .split_once("@sha256:")
        .ok_or("must name its image by digest: REGISTRY/REPOSITORY@sha256:<64 hex digits>")?;
    if digest.len() != 64
        || !digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err("the digest after @sha256: must be 64 lowercase hex digits".into());
    }
    let (host, path) = name
        .split_once('/')
        .ok_or("must start with the registry's host: REGISTRY/REPOSITORY@sha256:...")?;
    // Docker reads the first component as a registry host only if it has a dot or a colon, or is localhost.
    if !(host.contains('.') || host.contains(':') || host == "localhost") {
        return Err(format!(
            "{host:?} is not a registry host (it needs a dot or a port, or is localhost)"
        ));
    }
    let host_ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    let path_ok = !path.is_empty()
        && path.split('/').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        });
    if !host_ok || !path_ok {
        return Err(
            "registry host or repository has characters a registry reference cannot have".into(),
        );
    }
    Ok(())
}
