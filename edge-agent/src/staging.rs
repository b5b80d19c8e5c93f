//! Staging: the releases a desired state lists under `staged` (a rollout's coming wave) are fetched, verified and,
//! for containers, loaded into the engine ahead of their cutover, without touching what runs. A staged release's
//! document is stored without raising the epoch floor (the device has not moved to it; a rollback must stay
//! possible); the floor rises when a desired state actually runs it. Staged artifacts are kept by the collection
//! and count against the disk checks like any other download. A failure here refuses nothing that runs: it is
//! reported per release, and the cutover then downloads (and may refuse) as without staging.

use crate::agent::Agent;
use crate::fetch::{MAX_RELEASE_DOC, Pull, disk_check, space_needed};
use flotilla_shared::Digest;
use flotilla_shared::wire::{
    ArtifactRef, RejectReason, StageState, StagedRelease, WorkloadKind, WorkloadSpec,
};
use std::collections::BTreeMap;

/// A staged container image's load into the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preload {
    InFlight,
    Done,
    Failed(String),
}

/// Staging state kept beside the fetches (in memory: after a restart the stored documents and cached artifacts
/// make staging resume where it was, at no cost but an engine check).
#[derive(Debug, Default)]
pub struct Staging {
    /// Staged releases (or artifacts) that could not be staged, with why; not retried for this desired state.
    pub failures: BTreeMap<Digest, RejectReason>,
    /// Container images being loaded, or loaded, ahead of their cutover, per artifact.
    pub preloads: BTreeMap<Digest, Preload>,
}

impl Agent {
    /// The staged specs of the accepted desired state.
    fn staged_specs(&self) -> Vec<WorkloadSpec> {
        self.accepted
            .as_ref()
            .map(|(_, ds)| ds.staged.clone())
            .unwrap_or_default()
    }

    /// Advances staging for the accepted desired state; pushes the artifacts to keep onto `keep`. Called from
    /// every re-plan.
    pub(crate) fn stage(&mut self, keep: &mut Vec<Digest>) {
        if self.frozen {
            return;
        }
        for spec in self.staged_specs() {
            if self.staging.failures.contains_key(&spec.release)
                || (spec.kind == WorkloadKind::Container && self.containers.is_none())
            {
                continue;
            }
            let Some(release) = self.releases.get(&spec.release).cloned() else {
                self.start_fetch(
                    ArtifactRef::Release(spec.release),
                    MAX_RELEASE_DOC,
                    &spec.name,
                );
                continue;
            };
            let artifact = release.artifact_digest;
            keep.push(artifact);
            if self.staging.failures.contains_key(&artifact) {
                continue;
            }
            let cached = self.store.has_artifact(&artifact).unwrap_or(false);
            if !cached && self.pulls.get(&artifact) != Some(&Pull::Ready) {
                if self.fetches.contains_key(&ArtifactRef::Blob(artifact))
                    || self.checking.contains(&artifact)
                {
                    continue;
                }
                // Checked here rather than in the download, which would hold the refusal against the workload
                // that runs now.
                let needed = space_needed(release.artifact_size, release.image.is_some());
                if let Err(reason) = disk_check(needed, self.free_disk()) {
                    tracing::warn!(workload = %spec.name, ?reason, "staging refused before download");
                    self.staging.failures.insert(artifact, reason);
                    continue;
                }
                self.start_fetch(
                    ArtifactRef::Blob(artifact),
                    release.artifact_size,
                    &spec.name,
                );
                continue;
            }
            if let (true, Some(image), Some(rt)) = (cached, release.image.clone(), &self.containers)
                && !self.staging.preloads.contains_key(&artifact)
            {
                self.staging.preloads.insert(artifact, Preload::InFlight);
                rt.preload(
                    spec.name.clone(),
                    artifact,
                    self.artifact_path(&artifact),
                    image,
                    self.rt_tx.clone(),
                );
            }
        }
    }

    /// A staged image load ended.
    pub(crate) fn on_preloaded(&mut self, artifact: Digest, result: Result<(), String>) {
        let state = match result {
            Ok(()) => Preload::Done,
            Err(e) => {
                tracing::warn!(%artifact, error = %e, "staged image not loaded; the cutover loads it");
                Preload::Failed(e)
            }
        };
        self.staging.preloads.insert(artifact, state);
        self.send_report();
    }

    /// Whether `digest` (a release or an artifact) belongs only to staged workloads of the accepted state.
    pub(crate) fn staged_only(&self, digest: &Digest) -> bool {
        let Some((_, ds)) = &self.accepted else {
            return false;
        };
        let matches = |w: &WorkloadSpec| {
            w.release == *digest
                || self
                    .releases
                    .get(&w.release)
                    .is_some_and(|r| r.artifact_digest == *digest)
        };
        ds.staged.iter().any(matches) && !ds.workloads.iter().any(matches)
    }

    /// Where each staged release is, for the report.
    pub(crate) fn staged_status(&self) -> Vec<StagedRelease> {
        let mut out: Vec<StagedRelease> = vec![];
        for spec in self.staged_specs() {
            if out.iter().any(|s| s.release == spec.release) {
                continue;
            }
            let state = if let Some(reason) = self.staging.failures.get(&spec.release) {
                StageState::Failed(reason.clone())
            } else if spec.kind == WorkloadKind::Container && self.containers.is_none() {
                StageState::Failed(RejectReason::UnsupportedKind)
            } else {
                match self.releases.get(&spec.release) {
                    None => StageState::Downloading,
                    Some(r) => match (
                        self.staging.failures.get(&r.artifact_digest),
                        self.artifact_ready(&r.artifact_digest),
                        r.image.is_some(),
                        self.staging.preloads.get(&r.artifact_digest),
                    ) {
                        (Some(reason), ..) => StageState::Failed(reason.clone()),
                        (None, false, ..) => StageState::Downloading,
                        (None, true, false, _) => StageState::Staged,
                        // The cutover loads it itself if this load failed: the artifact is here.
                        (None, true, true, Some(Preload::Done | Preload::Failed(_))) => {
                            StageState::Staged
                        }
                        (None, true, true, _) => StageState::Loading,
                    },
                }
            };
            out.push(StagedRelease {
                release: spec.release,
                state,
            });
        }
        out
    }
}
