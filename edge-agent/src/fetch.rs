//! Artifact transfer: release documents and artifact blobs are fetched in chunks over the device's own MQTT
//! connection, checked against free disk space before the first byte, hashed while streaming into a private
//! staging file capped at the signed size, resumed after a restart, and moved into the cache only once verified.

use crate::agent::{Agent, unix_now};
use flotilla_mqtt::Publisher;
use flotilla_shared::codec::{self, MAX_CHUNK_DATA, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::trust::{self, ArtifactVerifier};
use flotilla_shared::wire::{ArtifactChunk, ArtifactRef, ArtifactRequest, RejectReason, Signed};
use flotilla_shared::{Digest, WorkloadName};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// An in-progress download of a release document or artifact.
#[derive(Debug)]
pub struct Fetch {
    size: u64,
    received: u64,
    /// Requests were sent for everything below this offset (at most [`WINDOW`] chunks beyond `received`).
    requested: u64,
    is_blob: bool,
    staging: PathBuf,
    verifier: Option<ArtifactVerifier>,
    buf: Vec<u8>,
    requested_at: Instant,
    stalls: u32,
}

/// A registry pull of a container release's image (the optional second source), per artifact digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pull {
    InFlight,
    /// The engine has the signed image: the tarball is not needed.
    Ready,
    /// The registry could not deliver it (unreachable, refused, or not the signed image): download over MQTT.
    Failed(String),
}

/// Chunk requests a blob download keeps in flight: the transfer streams instead of paying one round trip per
/// chunk (about 10x faster on loopback), while what is in flight stays bounded (512 KiB).
const WINDOW: u64 = 8;

/// A chunk request unanswered for this long is sent again (slow-drip and lost-message protection).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(5);

/// After this many unanswered requests in a row the workload reports `ArtifactStalled` (and the agent keeps trying).
const STALLS_BEFORE_REPORT: u32 = 3;

/// Largest signed release document accepted.
pub(crate) const MAX_RELEASE_DOC: u64 = 16 * 1024;

/// Space kept free beyond an artifact, so the database (which may grow by its WAL limit before a checkpoint) and
/// logs can still be written after a download.
pub(crate) const DISK_RESERVE: u64 = (1 << 20) + crate::store::WAL_LIMIT_BYTES;

/// The space a download of `size` bytes needs: a container image needs room twice, the cached tarball and the
/// engine's copy once loaded.
pub(crate) fn space_needed(size: u64, container: bool) -> u64 {
    if container {
        size.saturating_mul(2)
    } else {
        size
    }
}

/// Refuses a download up front when the artifact plus the reserve does not fit in the free space.
pub(crate) fn disk_check(size: u64, free: u64) -> Result<(), RejectReason> {
    if size.saturating_add(DISK_RESERVE) > free {
        return Err(RejectReason::InsufficientDisk { needed: size, free });
    }
    Ok(())
}

impl Agent {
    /// Whether `artifact` can be started: its verified file is cached, or (a container release offered by a
    /// registry) the engine holds the pulled image.
    pub(crate) fn artifact_ready(&self, artifact: &Digest) -> bool {
        self.pulls.get(artifact) == Some(&Pull::Ready)
            || self.store.has_artifact(artifact).unwrap_or(false)
    }

    /// Starts a registry pull of `release`'s image for `workload` when its release offers one and no pull was
    /// tried yet; returns false when the registry is not (or no longer) an option, so the caller downloads.
    pub(crate) fn pull_from_registry(
        &mut self,
        release: &flotilla_shared::wire::Release,
        workload: &WorkloadName,
    ) -> bool {
        let (Some(rt), Some(image)) = (&self.containers, &release.image) else {
            return false;
        };
        if image.registry.is_none() {
            return false;
        }
        match self.pulls.get(&release.artifact_digest) {
            Some(Pull::Failed(_)) => false,
            Some(_) => true,
            None => {
                tracing::info!(workload = %workload, registry = ?image.registry, "pulling from the registry");
                rt.pull(
                    workload.clone(),
                    release.artifact_digest,
                    image.clone(),
                    self.rt_tx.clone(),
                );
                self.pulls.insert(release.artifact_digest, Pull::InFlight);
                true
            }
        }
    }

    /// A registry pull ended: the image is in the engine (recorded for collection when this pull brought it), or
    /// the tarball is downloaded over MQTT instead.
    pub(crate) fn on_pulled(
        &mut self,
        workload: &WorkloadName,
        artifact: Digest,
        result: Result<(String, bool), String>,
    ) {
        match result {
            Ok((image, pulled)) => {
                if pulled
                    && let Err(e) = self
                        .store
                        .record_image(workload.as_str(), &image, unix_now())
                {
                    tracing::warn!(error = %e, "cannot record a pulled image");
                }
                self.pulls.insert(artifact, Pull::Ready);
            }
            Err(e) => {
                tracing::warn!(workload = %workload, error = %e, "registry pull failed; downloading over MQTT");
                self.pulls.insert(artifact, Pull::Failed(e));
            }
        }
        self.refresh_desired();
    }

    pub(crate) fn artifact_path(&self, d: &Digest) -> PathBuf {
        // Always a hex digest: nothing from a document or the network ever becomes a path component.
        self.cfg.data_dir.join("artifacts").join(d.to_hex())
    }

    pub(crate) fn start_fetch(&mut self, what: ArtifactRef, size: u64, workload: &WorkloadName) {
        // Downloading, or downloaded and being checked.
        if self.fetches.contains_key(&what)
            || matches!(what, ArtifactRef::Blob(d) if self.checking.contains(&d))
        {
            return;
        }
        let (digest, is_blob) = match what {
            ArtifactRef::Release(d) => (d, false),
            ArtifactRef::Blob(d) => (d, true),
        };
        let staging = self
            .cfg
            .data_dir
            .join("staging")
            .join(format!("{}.part", digest.to_hex()));
        let mut fetch = Fetch {
            size,
            received: 0,
            requested: 0,
            is_blob,
            staging,
            verifier: None,
            buf: Vec::new(),
            requested_at: Instant::now(),
            stalls: 0,
        };
        if is_blob {
            let free = self.free_disk();
            let container = self
                .releases
                .values()
                .any(|r| r.artifact_digest == digest && r.image.is_some());
            let needed = space_needed(size, container);
            if let Err(reason) = disk_check(needed, free) {
                tracing::warn!(workload = %workload, ?reason, "artifact refused before download");
                self.workload_rejects.insert(workload.clone(), reason);
                return;
            }
            let mut verifier = ArtifactVerifier::new(digest, size);
            // Resume: re-hash what an earlier attempt left in staging, then continue from there.
            if let Ok(prefix) = std::fs::read(&fetch.staging)
                && verifier.update(&prefix).is_ok()
            {
                fetch.received = verifier.received();
            } else {
                verifier = ArtifactVerifier::new(digest, size);
                let _ = std::fs::remove_file(&fetch.staging);
            }
            fetch.verifier = Some(verifier);
        }
        tracing::info!(?what, from = fetch.received, size, "fetching");
        self.fetches.insert(what, fetch);
        self.request_next(what);
    }

    /// (Re)starts requesting `what` from what has been received (after connecting, or when answers stalled).
    pub(crate) fn request_next(&mut self, what: ArtifactRef) {
        if let Some(f) = self.fetches.get_mut(&what) {
            f.requested = f.received;
        }
        self.fill_window(what);
    }

    /// Sends chunk requests until [`WINDOW`] are in flight (one for a release document, whose size is unknown).
    fn fill_window(&mut self, what: ArtifactRef) {
        let Some(f) = self.fetches.get_mut(&what) else {
            return;
        };
        f.requested_at = Instant::now();
        if !self.connected {
            return;
        }
        let chunk = MAX_CHUNK_DATA as u64;
        let window = if f.is_blob { WINDOW } else { 1 };
        let end = f.size.min(f.received.saturating_add(window * chunk));
        let mut offsets = Vec::new();
        while f.requested < end || (f.requested == f.received && offsets.is_empty()) {
            offsets.push(f.requested);
            f.requested = f.requested.saturating_add(chunk);
        }
        let topic = topics::device(&self.trust.device, DeviceTopic::ArtifactRequest);
        for offset in offsets {
            let req = Message::ArtifactRequest(ArtifactRequest {
                what,
                offset,
                max_len: u32::try_from(MAX_CHUNK_DATA).unwrap_or(u32::MAX),
            });
            if let (Some(link), Ok(bytes)) = (&self.link, codec::encode(&req)) {
                let _ = link.publish(&topic, bytes, false);
            }
        }
    }

    pub(crate) fn fail_fetch(&mut self, what: ArtifactRef, reason: RejectReason) {
        if let Some(f) = self.fetches.remove(&what) {
            let _ = std::fs::remove_file(&f.staging);
        }
        let digest = match what {
            ArtifactRef::Release(d) | ArtifactRef::Blob(d) => d,
        };
        if self.staged_only(&digest) {
            // Staging refuses nothing that runs: the failure is the staged release's alone.
            tracing::warn!(?what, ?reason, "staging failed");
            self.staging.failures.insert(digest, reason);
            self.send_report();
            return;
        }
        let names: Vec<WorkloadName> = self.accepted.as_ref().map_or(vec![], |(_, ds)| {
            ds.workloads
                .iter()
                .filter(|w| {
                    w.release == digest
                        || self
                            .releases
                            .get(&w.release)
                            .is_some_and(|r| r.artifact_digest == digest)
                })
                .map(|w| w.name.clone())
                .collect()
        });
        tracing::warn!(?what, ?reason, "fetch failed");
        for n in names {
            self.workload_rejects.insert(n, reason.clone());
        }
        self.refresh_desired();
        self.send_report();
    }

    pub(crate) fn on_chunk(&mut self, chunk: ArtifactChunk) {
        let (what, offset, total, data) = match chunk {
            ArtifactChunk::Data {
                what,
                offset,
                total,
                data,
            } => (what, offset, total, data),
            ArtifactChunk::NotFound { what } => {
                if self.fetches.contains_key(&what) {
                    self.fail_fetch(what, RejectReason::ReleaseMissing);
                }
                return;
            }
        };
        let Some(f) = self.fetches.get_mut(&what) else {
            return;
        };
        if offset != f.received {
            return; // A duplicate or a late answer to an earlier request; the current request is still pending.
        }
        f.stalls = 0;
        let result: Result<bool, RejectReason> = (|| match what {
            ArtifactRef::Release(_) => {
                if total > f.size || f.received + data.len() as u64 > f.size {
                    return Err(RejectReason::ArtifactTooLarge);
                }
                f.buf.extend_from_slice(&data);
                f.received += data.len() as u64;
                Ok(f.received >= total)
            }
            ArtifactRef::Blob(_) => {
                if total != f.size {
                    return Err(RejectReason::ArtifactTooLarge);
                }
                let v = f.verifier.as_mut().ok_or(RejectReason::Malformed)?;
                v.update(&data).map_err(|e| RejectReason::from(&e))?;
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&f.staging)
                    .map_err(|_| RejectReason::InsufficientDisk {
                        needed: f.size,
                        free: 0,
                    })?;
                file.write_all(&data)
                    .map_err(|_| RejectReason::InsufficientDisk {
                        needed: f.size,
                        free: 0,
                    })?;
                f.received += data.len() as u64;
                Ok(f.received >= f.size)
            }
        })();
        match result {
            Err(reason) => self.fail_fetch(what, reason),
            Ok(false) => self.fill_window(what),
            Ok(true) => self.finish_fetch(what),
        }
    }

    pub(crate) fn finish_fetch(&mut self, what: ArtifactRef) {
        let Some(f) = self.fetches.remove(&what) else {
            return;
        };
        match what {
            ArtifactRef::Release(digest) => {
                let Ok(signed) = codec::decode_exact::<Signed>(&f.buf) else {
                    self.fail_fetch(what, RejectReason::Malformed);
                    return;
                };
                let staged_only = self.staged_only(&digest);
                let Some(spec) = self.accepted.as_ref().and_then(|(_, ds)| {
                    ds.workloads
                        .iter()
                        .chain(&ds.staged)
                        .find(|w| w.release == digest)
                        .cloned()
                }) else {
                    return;
                };
                // Verified, then narrowed to the artifact this agent runs (its precompiled variant, or the
                // source module if it can compile); an agent without a compiler refuses a release with no variant.
                let verified =
                    trust::verify_release_for(&self.trust.root, &signed, &spec, &self.trust.floor)
                        .map_err(|e| RejectReason::from(&e))
                        .and_then(crate::variant::for_this_agent);
                match verified {
                    Ok(release) if staged_only => {
                        // Staged: stored and verified, but the floor stays until a desired state runs it.
                        if let Err(e) = self.store.stage_release(&digest, &signed) {
                            tracing::error!(error = %e, "cannot persist a staged release");
                            return;
                        }
                        self.releases.insert(digest, release);
                        self.refresh_desired();
                        self.send_report();
                    }
                    Ok(release) => {
                        if let Err(e) = self.store.accept_release(
                            &digest,
                            &signed,
                            &release.name,
                            release.epoch,
                        ) {
                            tracing::error!(error = %e, "cannot persist release");
                            return;
                        }
                        let floor = self
                            .trust
                            .floor
                            .epochs
                            .entry(release.name.clone())
                            .or_insert(0);
                        *floor = (*floor).max(release.epoch);
                        self.releases.insert(digest, release);
                        self.refresh_desired();
                    }
                    Err(reason) => {
                        tracing::warn!(workload = %spec.name, %reason, "release rejected");
                        self.fail_fetch(what, reason);
                    }
                }
            }
            ArtifactRef::Blob(digest) => {
                let Some(v) = f.verifier else { return };
                if let Err(e) = v.finish() {
                    let _ = std::fs::remove_file(&f.staging);
                    self.fail_fetch(what, (&e).into());
                    return;
                }
                // A container tarball is checked against its signed image before it enters the cache, so a bad
                // one is refused with its reason while the running version keeps running.
                let image = self
                    .releases
                    .values()
                    .find(|r| r.artifact_digest == digest)
                    .and_then(|r| r.image.clone());
                // The check reads the whole tarball: off the loop's thread, so reports, telemetry and other
                // workloads do not wait for it; the answer comes back as a runtime event.
                if let Some(image) = image {
                    self.checking.insert(digest);
                    let (staging, size, events) = (f.staging.clone(), f.size, self.rt_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let result = std::fs::File::open(&staging)
                            .map_err(|_| flotilla_shared::wire::ImageProblem::NotATar)
                            .and_then(|file| {
                                flotilla_shared::image::verify(
                                    std::io::BufReader::new(file),
                                    &image,
                                )
                            });
                        let _ = events.blocking_send(crate::runtime::RuntimeEvent::ImageChecked {
                            digest,
                            size,
                            staging,
                            result,
                        });
                    });
                    return;
                }
                self.cache_artifact(digest, f.size, &f.staging);
            }
        }
    }

    /// A downloaded container tarball was checked against its signed image: cache it, or refuse it (the running
    /// version keeps running).
    pub(crate) fn on_image_checked(
        &mut self,
        digest: Digest,
        size: u64,
        staging: &std::path::Path,
        result: Result<(), flotilla_shared::wire::ImageProblem>,
    ) {
        self.checking.remove(&digest);
        match result {
            Ok(()) => self.cache_artifact(digest, size, staging),
            Err(problem) => {
                let _ = std::fs::remove_file(staging);
                self.fail_fetch(ArtifactRef::Blob(digest), RejectReason::BadImage(problem));
            }
        }
    }

    /// Moves a verified staging file into the cache and re-plans. The verified file itself becomes the cached
    /// artifact: no verify-then-swap window.
    fn cache_artifact(&mut self, digest: Digest, size: u64, staging: &std::path::Path) {
        let dest = self.artifact_path(&digest);
        let synced = std::fs::File::open(staging).and_then(|file| file.sync_all());
        if let Err(e) = synced.and_then(|()| std::fs::rename(staging, &dest)) {
            tracing::error!(error = %e, "cannot move artifact into the cache");
            return;
        }
        if let Err(e) = self.store.add_artifact(&digest, size, unix_now()) {
            tracing::error!(error = %e, "cannot index artifact");
            return;
        }
        tracing::info!(artifact = %digest, size, "artifact verified and cached");
        self.refresh_desired();
        if self.staged_only(&digest) {
            self.send_report();
        }
    }

    /// Asks again for every chunk unanswered for [`CHUNK_TIMEOUT`] (slow-drip and lost-message protection).
    pub(crate) fn rerequest_stalled_fetches(&mut self) {
        let stalled: Vec<ArtifactRef> = self
            .fetches
            .iter()
            .filter(|(_, f)| self.connected && f.requested_at.elapsed() >= CHUNK_TIMEOUT)
            .map(|(w, _)| *w)
            .collect();
        for what in stalled {
            if let Some(f) = self.fetches.get_mut(&what) {
                f.stalls += 1;
                if f.stalls == STALLS_BEFORE_REPORT {
                    tracing::warn!(?what, "artifact stream stalled");
                }
            }
            self.request_next(what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Downloads that would leave less than the reserve free are refused before a byte is fetched.
    #[test]
    fn disk_check_refuses_up_front() {
        assert_eq!(disk_check(10, 10 + DISK_RESERVE), Ok(()));
        assert_eq!(
            disk_check(11, 10 + DISK_RESERVE),
            Err(RejectReason::InsufficientDisk {
                needed: 11,
                free: 10 + DISK_RESERVE
            })
        );
        assert!(disk_check(u64::MAX, u64::MAX - 1).is_err(), "no overflow");
    }
}
