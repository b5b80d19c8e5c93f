//! `flotilla keys|root|release sign`: the offline key tool for the two-key trust model.

use crate::keyfile;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use flotilla_shared::trust::{self, DocType};
use flotilla_shared::wire::{Precompiled, Release, Root, WorkloadKind};
use flotilla_shared::{Digest, WorkloadName};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Generate an ed25519 key pair: OUT.key (mode 0600) and OUT.pub.
    Gen {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum RootCmd {
    /// Create and sign a root (version 1, or the next version of --previous for a rotation).
    Create(RootCreate),
    /// Add a signature to an existing root file (for thresholds above one).
    Sign {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Verify a root file (self-signed, or as a rotation of --previous) and print it.
    Show {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        previous: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct RootCreate {
    /// Root signing keys (private) that sign this root; their public halves become the root keys.
    #[arg(long = "root-key", required = true)]
    pub root_keys: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub root_threshold: u8,
    /// Release public keys (repeatable).
    #[arg(long = "release-pub", required = true)]
    pub release_pubs: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub release_threshold: u8,
    /// Hub public keys (repeatable).
    #[arg(long = "hub-pub", required = true)]
    pub hub_pubs: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub hub_threshold: u8,
    #[arg(long, default_value_t = 365)]
    pub expires_in_days: u64,
    /// For a rotation: the current root; the new one gets its version + 1 and must also be signed by its keys.
    #[arg(long)]
    pub previous: Option<PathBuf>,
    /// Private keys of the previous root that co-sign a rotation.
    #[arg(long = "previous-key")]
    pub previous_keys: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ReleaseSign {
    /// The artifact (a .wasm module, or a container image tarball).
    pub artifact: PathBuf,
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub version: String,
    #[arg(long, default_value_t = 0)]
    pub epoch: u32,
    /// What the artifact is: `wasm` (a module), `container` (an image tarball), `firmware` (a system image or RAUC
    /// bundle for the device's other slot) or `agent` (a flotilla-agent binary); the last two need --compatible.
    #[arg(long, default_value = "wasm")]
    pub kind: String,
    /// Release signing keys (repeatable to meet a threshold).
    #[arg(long = "key", required = true)]
    pub keys: Vec<PathBuf>,
    /// For a container: also offer the image from this registry, as `REGISTRY/REPOSITORY@sha256:DIGEST` (the
    /// digest `docker push` printed). Agents try it first and fall back to delivery over MQTT; either way the
    /// image must have the signed config digest.
    #[arg(long)]
    pub registry: Option<String>,
    /// Also sign modules precompiled for these targets, comma-separated (x86_64, aarch64, pulley32, pulley64),
    /// compiled here with the agents' engine settings. An agent runs its own variant without compiling (an agent
    /// built without a compiler needs one); agents of other targets compile the source module.
    #[arg(long, value_delimiter = ',')]
    pub precompile: Vec<String>,
    /// For firmware and agent releases: the hardware it is for, signed into the release and checked by the
    /// device before anything is written (firmware: the device type, as in the agents' `[firmware] compatible`;
    /// agent: the CPU architecture, `x86_64`, `aarch64`, `arm`).
    #[arg(long)]
    pub compatible: Option<String>,
    /// Where to write the signed release. `release sign` defaults to ARTIFACT.release; `release push` writes
    /// nothing unless this is given (the artifact's directory may be read-only).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn parse_kind(s: &str) -> Result<WorkloadKind> {
    WorkloadKind::parse(s).with_context(|| {
        format!("unknown release kind {s:?}: expected wasm, container, firmware or agent")
    })
}

pub fn run_keys(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Gen { out } => {
            let (key, secret, public) = keyfile::generate(&out)?;
            outln!("private key: {} (mode 0600)", secret.display());
            outln!("public key:  {}", public.display());
            outln!("key id:      {}", hex::encode(trust::key_id(&key.public())));
        }
    }
    Ok(())
}

/// A signed release and the bytes it names.
#[derive(Debug)]
pub struct SignedRelease {
    pub signed: flotilla_shared::wire::Signed,
    pub release: Release,
    /// The artifact (for a container: the canonical image tarball).
    pub artifact: Vec<u8>,
    /// The precompiled modules, in the order of `release.precompiled`.
    pub variants: Vec<Vec<u8>>,
}

/// Compiles `wasm` for each named target with the agents' engine settings (see `flotilla_engine`).
fn precompile(wasm: &[u8], targets: &[String]) -> Result<Vec<(Precompiled, Vec<u8>)>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = vec![];
    for name in targets {
        let target = flotilla_engine::Target::parse(name)?;
        if !seen.insert(target) {
            continue;
        }
        let bytes = flotilla_engine::precompile(target, wasm)?;
        out.push((
            Precompiled {
                target: target.name().to_owned(),
                engine_fingerprint: flotilla_engine::fingerprint(target),
                digest: Digest::of(&bytes),
                size: bytes.len() as u64,
            },
            bytes,
        ));
    }
    Ok(out)
}

/// Builds and signs a release for an artifact on disk. A container image (`docker save` or OCI layout tarball) is
/// first rewritten into its canonical form, which is what the release names and what devices receive.
pub fn sign_release(args: &ReleaseSign) -> Result<SignedRelease> {
    let kind = parse_kind(&args.kind)?;
    let file = std::fs::File::open(&args.artifact)
        .with_context(|| format!("reading {}", args.artifact.display()))?;
    let (bytes, image) = match kind {
        WorkloadKind::Wasm | WorkloadKind::Firmware | WorkloadKind::Agent => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::BufReader::new(file), &mut bytes)?;
            (bytes, None)
        }
        WorkloadKind::Container => {
            let parts = crate::image_import::read_source(std::io::BufReader::new(file))
                .with_context(|| {
                    format!("{} is not a usable image tarball", args.artifact.display())
                })?;
            let (bytes, mut image) = flotilla_shared::image::write_canonical(&parts)
                .map_err(|e| anyhow::anyhow!("{}: {e}", args.artifact.display()))?;
            if let Some(r) = &args.registry {
                flotilla_shared::image::check_registry_ref(r)
                    .map_err(|e| anyhow::anyhow!("--registry {r:?}: {e}"))?;
                image.registry = Some(r.clone());
            }
            (bytes, Some(image))
        }
    };
    if args.registry.is_some() && kind != WorkloadKind::Container {
        bail!("--registry is for container releases (--kind container)");
    }
    if !args.precompile.is_empty() && kind != WorkloadKind::Wasm {
        bail!("--precompile is for WASM releases (--kind wasm)");
    }
    match (kind.is_system(), &args.compatible) {
        (true, None) => bail!(
            "a {} release must name the hardware it is for: --compatible DEVICE_TYPE (firmware: the device type \
             in the agents' [firmware] compatible; agent: the CPU architecture, e.g. x86_64 or aarch64)",
            kind.name()
        ),
        (false, Some(_)) => bail!("--compatible is for firmware and agent releases"),
        _ => {}
    }
    if kind == WorkloadKind::Agent && !bytes.starts_with(b"\x7fELF") {
        bail!(
            "{} is not an ELF executable; an agent release is the flotilla-agent binary",
            args.artifact.display()
        );
    }
    let (precompiled, variants) = precompile(&bytes, &args.precompile)?.into_iter().unzip();
    let release = Release {
        name: WorkloadName::new(args.name.clone()).context("--name")?,
        version: args.version.clone(),
        epoch: args.epoch,
        kind,
        artifact_digest: Digest::of(&bytes),
        artifact_size: bytes.len() as u64,
        precompiled,
        image,
        compatible: args.compatible.clone(),
    };
    let keys = args
        .keys
        .iter()
        .map(|p| keyfile::read_signing_key(p))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<_> = keys.iter().collect();
    Ok(SignedRelease {
        signed: trust::sign(DocType::Release, &release, &refs),
        release,
        artifact: bytes,
        variants,
    })
}

pub fn run_release_sign(args: ReleaseSign) -> Result<()> {
    let SignedRelease {
        signed,
        release,
        artifact: bytes,
        variants,
    } = sign_release(&args)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.artifact.with_extension("release"));
    keyfile::write_signed(&out, &signed)?;
    // A container release names the canonical tarball, not the input: write it beside the release for upload.
    if let Some(image) = &release.image {
        let canonical = out.with_extension("image.tar");
        std::fs::write(&canonical, &bytes)
            .with_context(|| format!("writing {}", canonical.display()))?;
        outln!("{}", crate::image_import::describe(image));
        outln!("canonical image tarball written to {}", canonical.display());
    }
    outln!(
        "release {} {} (epoch {}) artifact {} ({} bytes)",
        release.name,
        release.version,
        release.epoch,
        release.artifact_digest,
        release.artifact_size
    );
    // Precompiled variants are uploaded like the artifact: beside the release, named by target.
    for (v, bytes) in release.precompiled.iter().zip(&variants) {
        let path = out.with_extension(format!("{}.cwasm", v.target));
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        outln!(
            "precompiled for {} ({}): {} ({} bytes) written to {}",
            v.target,
            v.engine_fingerprint,
            v.digest,
            v.size,
            path.display()
        );
    }
    outln!("release digest {}", trust::document_digest(&signed));
    outln!("written to {}", out.display());
    Ok(())
}

pub fn run_root(cmd: RootCmd) -> Result<()> {
    match cmd {
        RootCmd::Create(a) => {
            let signers = a
                .root_keys
                .iter()
                .map(|p| keyfile::read_signing_key(p))
                .collect::<Result<Vec<_>>>()?;
            let pubs = |paths: &[PathBuf]| {
                paths
                    .iter()
                    .map(|p| keyfile::read_public_key(p))
                    .collect::<Result<Vec<_>>>()
            };
            let version = match &a.previous {
                Some(p) => {
                    let prev: Root =
                        flotilla_shared::codec::decode_exact(&keyfile::read_signed(p)?.body)
                            .context("decoding previous root")?;
                    prev.version + 1
                }
                None => 1,
            };
            let root = Root {
                version,
                expires_at: now() + a.expires_in_days * 86_400,
                root_keys: signers.iter().map(|k| k.public()).collect(),
                root_threshold: a.root_threshold,
                release_keys: pubs(&a.release_pubs)?,
                release_threshold: a.release_threshold,
                hub_keys: pubs(&a.hub_pubs)?,
                hub_threshold: a.hub_threshold,
            };
            let prev_keys = a
                .previous_keys
                .iter()
                .map(|p| keyfile::read_signing_key(p))
                .collect::<Result<Vec<_>>>()?;
            let all: Vec<_> = signers.iter().chain(prev_keys.iter()).collect();
            let signed = trust::sign(DocType::Root, &root, &all);
            // Check what we produce with the same code the device runs, so a bad threshold fails here, not there.
            match &a.previous {
                Some(p) => {
                    let prev = keyfile::read_signed(p)?;
                    let prev_root = flotilla_shared::codec::decode_exact(&prev.body)
                        .context("previous root")?;
                    if let Err(e) = trust::verify_root_rotation(&prev_root, &signed, now()) {
                        eprintln!(
                            "note: rotation does not verify yet ({e}); add signatures with `flotilla root sign`"
                        );
                    }
                }
                None => {
                    if let Err(e) = trust::verify_initial_root(&signed, now()) {
                        eprintln!(
                            "note: root does not verify yet ({e}); add signatures with `flotilla root sign`"
                        );
                    }
                }
            }
            keyfile::write_signed(&a.out, &signed)?;
            outln!(
                "root version {} written to {}",
                root.version,
                a.out.display()
            );
        }
        RootCmd::Sign { root, key } => {
            let mut signed = keyfile::read_signed(&root)?;
            let k = keyfile::read_signing_key(&key)?;
            trust::add_signature(DocType::Root, &mut signed, &k);
            keyfile::write_signed(&root, &signed)?;
            outln!(
                "{} now carries {} signatures",
                root.display(),
                signed.signatures.len()
            );
        }
        RootCmd::Show { root, previous } => {
            let signed = keyfile::read_signed(&root)?;
            let verified = match previous {
                Some(p) => {
                    let prev = keyfile::read_signed(&p)?;
                    let prev_root =
                        trust::verify_initial_root(&prev, now()).context("previous root")?;
                    trust::verify_root_rotation(&prev_root, &signed, now())?
                }
                None => trust::verify_initial_root(&signed, now())?,
            };
            outln!(
                "root version {} (verified), expires at {}",
                verified.version,
                verified.expires_at
            );
            outln!(
                "  root keys: {} (threshold {})",
                verified.root_keys.len(),
                verified.root_threshold
            );
            outln!(
                "  release keys: {} (threshold {})",
                verified.release_keys.len(),
                verified.release_threshold
            );
            outln!(
                "  hub keys: {} (threshold {})",
                verified.hub_keys.len(),
                verified.hub_threshold
            );
        }
    }
    Ok(())
}
