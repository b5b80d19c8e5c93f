//! The two-key trust model (TUF/Uptane style): signing and sans-IO verification of roots, releases, desired states
//! and device reports. See `ARCHITECTURE.md` ("Trust model") and `../shared/docs/TRUST_MODEL.md`.
//!
//! Nothing here reads a clock, a file or the network: time arrives as `now`, the persisted floor as [`TrustFloor`].

use crate::codec::{DecodeError, decode_exact};
use crate::ids::{DeviceId, Digest, WorkloadName};
use crate::wire::{
    DesiredState, PublicKey, RejectReason, Release, Report, Root, SignatureEntry, Signed, UnixSecs,
    WorkloadKind, WorkloadSpec,
};
use ed25519_dalek::{Signer, Verifier as _};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet};

/// Which role a document is signed for. The role name is prefixed to the signed bytes (domain separation), so a
/// signature made for one kind of document can never be replayed as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocType {
    Root,
    Release,
    DesiredState,
    Report,
}

impl DocType {
    fn context(self) -> &'static [u8] {
        match self {
            Self::Root => b"flotilla/v1/root\0",
            Self::Release => b"flotilla/v1/release\0",
            Self::DesiredState => b"flotilla/v1/desired-state\0",
            Self::Report => b"flotilla/v1/report\0",
        }
    }
}

/// An ed25519 private key. Deliberately not `Clone` and not `Debug`-printing the secret.
pub struct SigningKey(ed25519_dalek::SigningKey);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", hex::encode(key_id(&self.public())))
    }
}

const SECRET_HEADER: &str = "flotilla-ed25519-secret-v1";
const PUBLIC_HEADER: &str = "flotilla-ed25519-public-v1";

/// Why a key file could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    #[error("not a Flotilla key file (expected first line {expected:?})")]
    BadHeader { expected: &'static str },
    #[error("key material is not 64 hex characters")]
    BadHex,
}

fn parse_key_text(text: &str, header: &'static str) -> Result<[u8; 32], KeyFileError> {
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some(header) {
        return Err(KeyFileError::BadHeader { expected: header });
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(lines.next().unwrap_or("").trim(), &mut out)
        .map_err(|_| KeyFileError::BadHex)?;
    Ok(out)
}

impl SigningKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        Self(ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng))
    }
    /// A deterministic key from a 32-byte seed (tests and simulators).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }
    /// The key file text (header line + hex seed). The caller writes it with mode 0600.
    pub fn to_file_text(&self) -> String {
        format!("{SECRET_HEADER}\n{}\n", hex::encode(self.0.to_bytes()))
    }
    pub fn from_file_text(text: &str) -> Result<Self, KeyFileError> {
        parse_key_text(text, SECRET_HEADER).map(Self::from_seed)
    }
    fn sign_entry(&self, doc: DocType, body: &[u8]) -> SignatureEntry {
        let sig = self.0.sign(&signing_input(doc, body));
        SignatureEntry {
            key_id: key_id(&self.public()),
            sig: sig.to_bytes().to_vec(),
        }
    }
}

impl PublicKey {
    pub fn to_file_text(&self) -> String {
        format!("{PUBLIC_HEADER}\n{}\n", hex::encode(self.0))
    }
    pub fn from_file_text(text: &str) -> Result<Self, KeyFileError> {
        parse_key_text(text, PUBLIC_HEADER).map(PublicKey)
    }
}

/// `n` random bytes from the operating system, as lowercase hex (nonces, tokens).
pub fn random_hex(n: usize) -> String {
    use rand_core::RngCore;
    let mut b = vec![0u8; n];
    rand_core::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// First 8 bytes of SHA-256 of the public key.
pub fn key_id(pk: &PublicKey) -> [u8; 8] {
    let h = Sha256::digest(pk.0);
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[..8]);
    id
}

fn signing_input(doc: DocType, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(doc.context().len() + body.len());
    v.extend_from_slice(doc.context());
    v.extend_from_slice(body);
    v
}

/// Encodes `value` and signs the encoded bytes with each key.
pub fn sign<T: Serialize>(doc: DocType, value: &T, keys: &[&SigningKey]) -> Signed {
    // postcard cannot fail on our wire types (no maps with non-string keys, no unsupported types).
    let body = postcard::to_stdvec(value).unwrap_or_default();
    let signatures = keys.iter().map(|k| k.sign_entry(doc, &body)).collect();
    Signed { body, signatures }
}

/// Adds one more signature to an already signed document (for thresholds above one, signed on separate machines).
pub fn add_signature(doc: DocType, signed: &mut Signed, key: &SigningKey) {
    let entry = key.sign_entry(doc, &signed.body);
    signed.signatures.retain(|e| e.key_id != entry.key_id);
    signed.signatures.push(entry);
}

/// Identity of a signed document: the digest of its body (signatures excluded, so adding one keeps the identity).
pub fn document_digest(signed: &Signed) -> Digest {
    Digest::of(&signed.body)
}

/// Why a threshold of signatures was not met.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    #[error("document carries no signature")]
    Unsigned,
    #[error("signed only by keys this role does not trust")]
    UnknownKey,
    #[error("a signature by a trusted key does not verify (document altered?)")]
    BadSignature,
    #[error("{valid} valid signatures, {needed} needed")]
    BelowThreshold { valid: u8, needed: u8 },
}

/// Counts distinct trusted keys whose signature over the exact body verifies, and demands `threshold` of them.
fn check_threshold(
    doc: DocType,
    signed: &Signed,
    keys: &[PublicKey],
    threshold: u8,
) -> Result<(), SignatureError> {
    if signed.signatures.is_empty() {
        return Err(SignatureError::Unsigned);
    }
    let trusted: BTreeMap<[u8; 8], &PublicKey> = keys.iter().map(|k| (key_id(k), k)).collect();
    let input = signing_input(doc, &signed.body);
    let mut valid = BTreeSet::new();
    let (mut unknown, mut bad) = (0usize, 0usize);
    for entry in &signed.signatures {
        let Some(pk) = trusted.get(&entry.key_id) else {
            unknown += 1;
            continue;
        };
        let ok = <[u8; 64]>::try_from(entry.sig.as_slice())
            .ok()
            .is_some_and(|raw| {
                let sig = ed25519_dalek::Signature::from_bytes(&raw);
                ed25519_dalek::VerifyingKey::from_bytes(&pk.0).is_ok_and(|vk| {
                    vk.verify_strict(&input, &sig).is_ok() && vk.verify(&input, &sig).is_ok()
                })
            });
        if ok {
            valid.insert(entry.key_id);
        } else {
            bad += 1;
        }
    }
    // A threshold of zero would mean "trust anything"; treat it as one.
    let needed = threshold.max(1);
    if valid.len() >= usize::from(needed) {
        return Ok(());
    }
    Err(if bad > 0 {
        SignatureError::BadSignature
    } else if valid.is_empty() && unknown > 0 {
        SignatureError::UnknownKey
    } else {
        SignatureError::BelowThreshold {
            valid: u8::try_from(valid.len()).unwrap_or(u8::MAX),
            needed,
        }
    })
}

/// What the device has accepted so far; persisted by the agent and only ever raised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustFloor {
    /// Highest desired-state generation accepted.
    pub generation: u64,
    /// Highest `issued_at` ever seen in an accepted desired state; time never runs backwards past it.
    pub issued_at: UnixSecs,
    /// Highest security epoch accepted per workload name.
    pub epochs: BTreeMap<WorkloadName, u32>,
}

impl TrustFloor {
    /// The time used for expiry checks: the clock, but never earlier than what signed metadata proves has passed.
    pub fn effective_now(&self, now: UnixSecs) -> UnixSecs {
        now.max(self.issued_at)
    }
}

/// Why a root (initial or rotation) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RootError {
    #[error("malformed root: {0}")]
    Malformed(#[from] DecodeError),
    #[error("root signatures: {0}")]
    Signature(SignatureError),
    #[error("rotation not signed by a threshold of the previous root's keys: {0}")]
    NotSignedByPrevious(SignatureError),
    #[error("root version {got} is not newer than the current version {current}")]
    OlderVersion { current: u32, got: u32 },
    #[error("root version {got} skips versions after {current}; deliver the whole chain")]
    VersionGap { current: u32, got: u32 },
    #[error("root expired at {expires_at} (now {now})")]
    Expired { expires_at: UnixSecs, now: UnixSecs },
    #[error("root is inconsistent: {0}")]
    Invalid(&'static str),
}

fn check_root_shape(root: &Root) -> Result<(), RootError> {
    let roles = [
        (
            &root.root_keys,
            root.root_threshold,
            "root threshold exceeds root keys or is zero",
        ),
        (
            &root.release_keys,
            root.release_threshold,
            "release threshold exceeds release keys or is zero",
        ),
        (
            &root.hub_keys,
            root.hub_threshold,
            "hub threshold exceeds hub keys or is zero",
        ),
    ];
    for (keys, threshold, msg) in roles {
        let distinct: BTreeSet<_> = keys.iter().collect();
        if threshold == 0 || usize::from(threshold) > distinct.len() {
            return Err(RootError::Invalid(msg));
        }
    }
    Ok(())
}

/// Verifies a self-signed root to pin at enrollment (trust on first use of a root the operator distributed).
pub fn verify_initial_root(signed: &Signed, now: UnixSecs) -> Result<Root, RootError> {
    let root: Root = decode_exact(&signed.body)?;
    check_root_shape(&root)?;
    check_threshold(DocType::Root, signed, &root.root_keys, root.root_threshold)
        .map_err(RootError::Signature)?;
    if root.expires_at <= now {
        return Err(RootError::Expired {
            expires_at: root.expires_at,
            now,
        });
    }
    Ok(root)
}

/// Verifies root version N+1 against the trusted version N: it must be signed by a threshold of N's root keys
/// *and* a threshold of its own.
pub fn verify_root_rotation(
    current: &Root,
    signed: &Signed,
    now: UnixSecs,
) -> Result<Root, RootError> {
    let next: Root = decode_exact(&signed.body)?;
    if next.version <= current.version {
        return Err(RootError::OlderVersion {
            current: current.version,
            got: next.version,
        });
    }
    if next.version != current.version + 1 {
        return Err(RootError::VersionGap {
            current: current.version,
            got: next.version,
        });
    }
    check_root_shape(&next)?;
    check_threshold(
        DocType::Root,
        signed,
        &current.root_keys,
        current.root_threshold,
    )
    .map_err(RootError::NotSignedByPrevious)?;
    check_threshold(DocType::Root, signed, &next.root_keys, next.root_threshold)
        .map_err(RootError::Signature)?;
    if next.expires_at <= now {
        return Err(RootError::Expired {
            expires_at: next.expires_at,
            now,
        });
    }
    Ok(next)
}

/// Applies a chain of rotations in order; versions at or below the current one are skipped (re-delivery of a
/// retained chain), anything else must verify or the whole update is refused.
pub fn verify_root_chain(
    current: &Root,
    chain: &[Signed],
    now: UnixSecs,
) -> Result<Root, RootError> {
    let mut root = current.clone();
    for signed in chain {
        match verify_root_rotation(&root, signed, now) {
            Ok(next) => root = next,
            Err(RootError::OlderVersion { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(root)
}

/// Why a desired state was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DesiredError {
    #[error("malformed desired state: {0}")]
    Malformed(#[from] DecodeError),
    #[error("desired state signatures: {0}")]
    Signature(SignatureError),
    #[error("desired state is for device {got}, not this one")]
    WrongDevice { got: DeviceId },
    #[error("generation {got} is older than the accepted {floor} (or equal with different bytes)")]
    StaleGeneration { floor: u64, got: u64 },
    #[error("desired state expired at {expires_at}; effective now {now}")]
    Expired { expires_at: UnixSecs, now: UnixSecs },
    #[error("trust root expired at {expires_at}; effective now {now}")]
    RootExpired { expires_at: UnixSecs, now: UnixSecs },
    #[error("workload {0} appears twice")]
    DuplicateWorkload(WorkloadName),
}

/// Verifies a desired state for `device` against the root and the persisted floor.
///
/// `accepted_body` is the body of the currently accepted desired state: a document with the same generation is
/// accepted only if it is byte-identical (a retained re-delivery).
pub fn verify_desired(
    root: &Root,
    device: &DeviceId,
    signed: &Signed,
    floor: &TrustFloor,
    accepted_body: Option<&[u8]>,
    now: UnixSecs,
) -> Result<DesiredState, DesiredError> {
    check_threshold(
        DocType::DesiredState,
        signed,
        &root.hub_keys,
        root.hub_threshold,
    )
    .map_err(DesiredError::Signature)?;
    let ds: DesiredState = decode_exact(&signed.body)?;
    if &ds.device != device {
        return Err(DesiredError::WrongDevice { got: ds.device });
    }
    let same_as_accepted = accepted_body == Some(signed.body.as_slice());
    if ds.generation < floor.generation || (ds.generation == floor.generation && !same_as_accepted)
    {
        return Err(DesiredError::StaleGeneration {
            floor: floor.generation,
            got: ds.generation,
        });
    }
    let eff = floor.effective_now(now);
    if root.expires_at <= eff {
        return Err(DesiredError::RootExpired {
            expires_at: root.expires_at,
            now: eff,
        });
    }
    if ds.expires_at <= eff {
        return Err(DesiredError::Expired {
            expires_at: ds.expires_at,
            now: eff,
        });
    }
    let mut names = BTreeSet::new();
    for w in &ds.workloads {
        if !names.insert(&w.name) {
            return Err(DesiredError::DuplicateWorkload(w.name.clone()));
        }
    }
    Ok(ds)
}

/// Why a release could not be used for a workload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    #[error("malformed release: {0}")]
    Malformed(#[from] DecodeError),
    #[error("release signatures: {0}")]
    Signature(SignatureError),
    #[error("release digest {got} is not the {expected} the desired state names (mix-and-match)")]
    DigestMismatch { expected: Digest, got: Digest },
    #[error("release is for workload {release}, desired state says {spec}")]
    NameMismatch {
        spec: WorkloadName,
        release: WorkloadName,
    },
    #[error("release kind differs from the desired state's")]
    KindMismatch,
    #[error("security epoch {got} is below the accepted {floor}")]
    EpochDowngrade { floor: u32, got: u32 },
}

/// Verifies a release document fetched by digest for `spec` and checks the anti-rollback epoch floor.
pub fn verify_release_for(
    root: &Root,
    signed: &Signed,
    spec: &WorkloadSpec,
    floor: &TrustFloor,
) -> Result<Release, ReleaseError> {
    let got = document_digest(signed);
    if got != spec.release {
        return Err(ReleaseError::DigestMismatch {
            expected: spec.release,
            got,
        });
    }
    check_threshold(
        DocType::Release,
        signed,
        &root.release_keys,
        root.release_threshold,
    )
    .map_err(ReleaseError::Signature)?;
    let release: Release = decode_exact(&signed.body)?;
    if release.name != spec.name {
        return Err(ReleaseError::NameMismatch {
            spec: spec.name.clone(),
            release: release.name,
        });
    }
    // A container release must say which image its tarball holds; a WASM release must not claim one. Firmware
    // and agent releases must name the hardware they are for, and only they may.
    if release.kind != spec.kind
        || (release.kind == WorkloadKind::Container) != release.image.is_some()
        || release.kind.is_system() != release.compatible.is_some()
    {
        return Err(ReleaseError::KindMismatch);
    }
    let epoch_floor = floor.epochs.get(&spec.name).copied().unwrap_or(0);
    if release.epoch < epoch_floor {
        return Err(ReleaseError::EpochDowngrade {
            floor: epoch_floor,
            got: release.epoch,
        });
    }
    Ok(release)
}

/// Picks the precompiled module signed for exactly this target and engine; anything else means "compile from the
/// signed source module".
pub fn select_precompiled<'a>(
    release: &'a Release,
    target: &str,
    engine_fingerprint: &str,
) -> Option<&'a crate::wire::Precompiled> {
    release
        .precompiled
        .iter()
        .find(|p| p.target == target && p.engine_fingerprint == engine_fingerprint)
}

/// Why artifact bytes were refused while streaming.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArtifactError {
    #[error("stream exceeds the signed size of {signed} bytes")]
    TooLarge { signed: u64 },
    #[error("stream ended at {got} of {signed} bytes")]
    Truncated { got: u64, signed: u64 },
    #[error("artifact digest {got} does not match the signed {expected}")]
    DigestMismatch { expected: Digest, got: Digest },
}

/// Hashes artifact bytes as they stream in and enforces the signed size as a hard cap.
#[derive(Debug, Clone)]
pub struct ArtifactVerifier {
    expected: Digest,
    size: u64,
    seen: u64,
    hasher: Sha256,
}

impl ArtifactVerifier {
    pub fn new(expected: Digest, size: u64) -> Self {
        Self {
            expected,
            size,
            seen: 0,
            hasher: Sha256::new(),
        }
    }
    /// Feeds the next bytes; refuses (and stays refused) as soon as the stream passes the signed size.
    pub fn update(&mut self, bytes: &[u8]) -> Result<(), ArtifactError> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if self.seen.saturating_add(len) > self.size {
            self.seen = self.size.saturating_add(1);
            return Err(ArtifactError::TooLarge { signed: self.size });
        }
        self.seen += len;
        self.hasher.update(bytes);
        Ok(())
    }
    pub fn received(&self) -> u64 {
        self.seen
    }
    pub fn finish(self) -> Result<(), ArtifactError> {
        if self.seen > self.size {
            return Err(ArtifactError::TooLarge { signed: self.size });
        }
        if self.seen < self.size {
            return Err(ArtifactError::Truncated {
                got: self.seen,
                signed: self.size,
            });
        }
        let got = Digest(self.hasher.finalize().into());
        if got != self.expected {
            return Err(ArtifactError::DigestMismatch {
                expected: self.expected,
                got,
            });
        }
        Ok(())
    }
}

/// Why a device report was refused by the hub.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    #[error("malformed report: {0}")]
    Malformed(#[from] DecodeError),
    #[error("report signature: {0}")]
    Signature(SignatureError),
    #[error("report names device {got}, but arrived on another device's topic")]
    WrongDevice { got: DeviceId },
    #[error("report counter {got} is not above the last accepted {last} (replay)")]
    Replayed { last: u64, got: u64 },
}

/// Verifies a report with the device's enrolled key and its monotonic counter.
pub fn verify_report(
    device_key: &PublicKey,
    device: &DeviceId,
    signed: &Signed,
    last_counter: u64,
) -> Result<Report, ReportError> {
    check_threshold(DocType::Report, signed, std::slice::from_ref(device_key), 1)
        .map_err(ReportError::Signature)?;
    let report: Report = decode_exact(&signed.body)?;
    if &report.device != device {
        return Err(ReportError::WrongDevice { got: report.device });
    }
    if report.counter <= last_counter {
        return Err(ReportError::Replayed {
            last: last_counter,
            got: report.counter,
        });
    }
    Ok(report)
}

impl From<&SignatureError> for RejectReason {
    fn from(e: &SignatureError) -> Self {
        match e {
            SignatureError::Unsigned => Self::Unsigned,
            SignatureError::UnknownKey => Self::UnknownKey,
            SignatureError::BadSignature => Self::BadSignature,
            SignatureError::BelowThreshold { valid, needed } => Self::BelowThreshold {
                valid: *valid,
                needed: *needed,
            },
        }
    }
}

impl From<&DesiredError> for RejectReason {
    fn from(e: &DesiredError) -> Self {
        match e {
            DesiredError::Malformed(_) => Self::Malformed,
            DesiredError::Signature(s) => s.into(),
            DesiredError::WrongDevice { .. } => Self::WrongDevice,
            DesiredError::StaleGeneration { floor, got } => Self::StaleGeneration {
                floor: *floor,
                got: *got,
            },
            DesiredError::Expired { expires_at, now } => Self::Expired {
                expires_at: *expires_at,
                now: *now,
            },
            DesiredError::RootExpired { .. } => Self::RootExpired,
            DesiredError::DuplicateWorkload(n) => {
                Self::InvalidSpec(format!("workload {n} appears twice"))
            }
        }
    }
}

impl From<&ReleaseError> for RejectReason {
    fn from(e: &ReleaseError) -> Self {
        match e {
            ReleaseError::Malformed(_) => Self::Malformed,
            ReleaseError::Signature(s) => s.into(),
            ReleaseError::DigestMismatch { .. }
            | ReleaseError::NameMismatch { .. }
            | ReleaseError::KindMismatch => Self::ReleaseMismatch,
            ReleaseError::EpochDowngrade { floor, got } => Self::EpochDowngrade {
                floor: *floor,
                got: *got,
            },
        }
    }
}

impl From<&ArtifactError> for RejectReason {
    fn from(e: &ArtifactError) -> Self {
        match e {
            ArtifactError::TooLarge { .. } => Self::ArtifactTooLarge,
            ArtifactError::Truncated { .. } => Self::ArtifactStalled,
            ArtifactError::DigestMismatch { .. } => Self::ArtifactDigestMismatch,
        }
    }
}
