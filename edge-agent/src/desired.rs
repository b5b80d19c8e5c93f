//! Desired state: accepting a hub-signed desired state (verify, persist, then act), recording refusals, and turning
//! the accepted state, the verified releases, the artifact cache, holds and the position into the reconciler's input.

use crate::agent::{Agent, unix_now};
use crate::fetch::{MAX_RELEASE_DOC, Pull};
use flotilla_agent_core::reconcile::kills_first;
use flotilla_agent_core::{DesiredWorkload, geo};
use flotilla_shared::codec;
use flotilla_shared::trust;
use flotilla_shared::wire::{
    ArtifactRef, DesiredState, RejectReason, Rejection, Signed, UpdateStrategy, WorkloadKind,
    WorkloadSpec,
};
use flotilla_shared::{Digest, WorkloadName};

impl Agent {
    pub(crate) fn on_desired(&mut self, signed: Signed) {
        if self
            .accepted
            .as_ref()
            .is_some_and(|(s, _)| s.body == signed.body)
        {
            return; // A retained re-delivery after reconnect: nothing changed, nothing restarts.
        }
        let t = &self.trust;
        let accepted_body = self.accepted.as_ref().map(|(s, _)| s.body.as_slice());
        let ds = match trust::verify_desired(
            &t.root,
            &t.device,
            &signed,
            &t.floor,
            accepted_body,
            unix_now(),
        ) {
            Ok(ds) => ds,
            Err(e) => {
                let generation =
                    codec::decode_exact::<DesiredState>(&signed.body).map_or(0, |d| d.generation);
                if matches!(
                    e,
                    trust::DesiredError::Expired { .. } | trust::DesiredError::RootExpired { .. }
                ) {
                    self.frozen = true;
                }
                self.reject(generation, (&e).into());
                return;
            }
        };
        if ds.workloads.len() > self.cfg.max_workloads as usize {
            let reason = RejectReason::InvalidSpec(format!(
                "{} workloads exceed this device's limit of {}",
                ds.workloads.len(),
                self.cfg.max_workloads
            ));
            self.reject(ds.generation, reason);
            return;
        }
        // Persist, then act: the floor and the document are durable before anything runs or is reported.
        if let Err(e) = self
            .store
            .accept_desired(ds.generation, ds.issued_at, &signed)
        {
            // A full disk, say: the state is tried again every second, so the device catches up by itself once
            // there is room (the broker delivers a retained state only once per connection).
            tracing::error!(error = %e, "cannot persist desired state; not applying it yet");
            self.unpersisted = Some(signed);
            return;
        }
        self.unpersisted = None;
        self.trust.floor.generation = self.trust.floor.generation.max(ds.generation);
        self.trust.floor.issued_at = self.trust.floor.issued_at.max(ds.issued_at);
        tracing::info!(
            generation = ds.generation,
            workloads = ds.workloads.len(),
            "desired state accepted"
        );
        self.frozen = false;
        if self.rejection.take().is_some() {
            let _ = self.store.set_rejection(None);
        }
        self.workload_rejects.clear();
        // A new state may stage other releases, or the same after space was freed: staging starts over.
        self.staging.failures.clear();
        // Workloads that left the desired state have no version to fall back to any more.
        let names: Vec<WorkloadName> = ds.workloads.iter().map(|w| w.name.clone()).collect();
        self.last_good.retain(|n, _| names.contains(n));
        if let Err(e) = self.store.retain_last_good(&names) {
            tracing::warn!(error = %e, "cannot forget removed workloads' last good versions");
        }
        self.accepted = Some((signed, ds));
        self.refresh_desired();
        self.send_report();
    }

    pub(crate) fn reject(&mut self, generation: u64, reason: RejectReason) {
        tracing::warn!(
            generation,
            ?reason,
            "desired state rejected; previous state keeps running"
        );
        let r = Rejection { generation, reason };
        if let Err(e) = self.store.set_rejection(Some(&r)) {
            tracing::error!(error = %e, "cannot persist rejection");
        }
        self.rejection = Some(r);
        self.send_report();
    }

    /// Recomputes what the reconciler should run from the accepted desired state, verified releases, the artifact
    /// cache, holds and the position; starts downloads for what is missing. A workload whose wanted release cannot
    /// run (refused, not fetched yet, held) keeps its last good version: the one that ran in memory, and after a
    /// restart the one persisted in `last_good`, re-verified at boot.
    pub(crate) fn refresh_desired(&mut self) {
        let Some((_, ds)) = self.accepted.clone() else {
            self.reconciler.set_desired(self.millis(), vec![]);
            return;
        };
        let mut list = Vec::new();
        let mut keep = Vec::new();
        let held = self.hold_reason().is_some();
        // Firmware and agent releases are installed by the system-update concern, never run as workloads.
        let (system, workloads): (Vec<_>, Vec<_>) =
            ds.workloads.into_iter().partition(|w| w.kind.is_system());
        self.plan_system(&system, &mut keep);
        for spec in workloads {
            let inside_fence = spec
                .geofence
                .as_ref()
                .is_none_or(|f| geo::contains(f, self.position));
            let mut artifact = None;
            if spec.kind == WorkloadKind::Container && self.containers.is_none() {
                self.workload_rejects
                    .insert(spec.name.clone(), RejectReason::UnsupportedKind);
            } else if let Some(Err(why)) = self
                .containers
                .as_ref()
                .map(|rt| flotilla_agent_core::containers::allowed(&spec, &rt.allow_list()))
            {
                // The device's allow-list says no: refused before anything is fetched or stopped.
                self.workload_rejects
                    .insert(spec.name.clone(), RejectReason::NotAllowed(why));
            } else if let Some(release) = self.releases.get(&spec.release).cloned() {
                keep.push(release.artifact_digest);
                // Delete-then-download: the old version is stopped and deleted before the new one is fetched.
                let old_first = spec
                    .container
                    .as_ref()
                    .is_some_and(|c| c.update_strategy == UpdateStrategy::DeleteThenDownload)
                    && self
                        .reconciler
                        .running(&spec.name)
                        .is_some_and(|(running, _)| running.release != spec.release);
                let may_fetch =
                    !self.frozen && !old_first && !self.workload_rejects.contains_key(&spec.name);
                match self.store.has_artifact(&release.artifact_digest) {
                    Ok(true) => artifact = Some(release.artifact_digest),
                    Ok(false) if self.pulls.get(&release.artifact_digest) == Some(&Pull::Ready) => {
                        artifact = Some(release.artifact_digest);
                    }
                    // A registry, when the release offers one, is tried first.
                    Ok(false) if may_fetch && self.pull_from_registry(&release, &spec.name) => {}
                    Ok(false) if may_fetch => self.start_fetch(
                        ArtifactRef::Blob(release.artifact_digest),
                        release.artifact_size,
                        &spec.name,
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "artifact index"),
                }
            } else if !self.frozen && !self.workload_rejects.contains_key(&spec.name) {
                self.start_fetch(
                    ArtifactRef::Release(spec.release),
                    MAX_RELEASE_DOC,
                    &spec.name,
                );
            }
            // Read after the fetch started: a download refused up front (disk space) shows in this very plan, and
            // so in the report that follows it, instead of waiting for something else to re-plan.
            let rejected = self.workload_rejects.get(&spec.name).cloned();
            // A hold defers release changes (the download may go ahead); what runs keeps running.
            if held {
                let running = self
                    .reconciler
                    .status(self.millis())
                    .into_iter()
                    .find(|s| s.name == spec.name);
                let same_release = running.as_ref().is_some_and(|s| {
                    s.release == spec.release
                        && s.state == flotilla_shared::wire::WorkloadState::Running
                });
                if !same_release {
                    artifact = None;
                }
            }
            // Kill- and delete-then-download stop the old version instead of keeping it while the new one
            // downloads, unless a hold defers the kill or the new release was refused (then the old one runs on).
            let kill_first = !held && rejected.is_none() && kills_first(&spec);
            // The fallback is looked up (an artifact-index read) only when the wanted version cannot run.
            let fallback = if artifact.is_none() && !kill_first {
                self.fallback(&spec)
            } else {
                None
            };
            let target = match (artifact, fallback) {
                (None, Some((last_spec, last_artifact))) => {
                    keep.push(last_artifact);
                    DesiredWorkload {
                        inside_fence: last_spec
                            .geofence
                            .as_ref()
                            .is_none_or(|f| geo::contains(f, self.position)),
                        spec: last_spec,
                        artifact: Some(last_artifact),
                        rejected,
                    }
                }
                (artifact, _) => DesiredWorkload {
                    spec,
                    artifact,
                    inside_fence,
                    rejected,
                },
            };
            list.push(target);
        }
        self.reconciler.set_desired(self.millis(), list);
        self.promote_staged_epochs();
        self.stage(&mut keep);
        // Until every desired release is known, the cache cannot tell what the new state needs: a new release may
        // name an artifact that a removed workload used (the same image under another name), so nothing is
        // collected now; the refresh after the last release arrives collects.
        let releases_known = self.accepted.as_ref().is_some_and(|(_, ds)| {
            ds.workloads.iter().chain(&ds.staged).all(|w| {
                self.releases.contains_key(&w.release)
                    || self.staging.failures.contains_key(&w.release)
            })
        });
        if releases_known {
            self.collect_garbage(&keep);
            self.collect_images();
        }
    }

    /// A release that was staged (stored without raising the epoch floor) and is now what a desired workload
    /// runs: the floor rises to its epoch, as for any release the device moves to.
    fn promote_staged_epochs(&mut self) {
        let Some((_, ds)) = &self.accepted else {
            return;
        };
        let mut promote = vec![];
        for w in &ds.workloads {
            if let Some(r) = self.releases.get(&w.release)
                && self.trust.floor.epochs.get(&r.name).copied().unwrap_or(0) < r.epoch
            {
                promote.push((w.release, r.name.clone(), r.epoch));
            }
        }
        for (digest, name, epoch) in promote {
            let Ok(Some(signed)) = self.store.release(&digest) else {
                continue;
            };
            if let Err(e) = self.store.accept_release(&digest, &signed, &name, epoch) {
                tracing::error!(error = %e, "cannot persist the epoch of a staged release");
                continue;
            }
            let floor = self.trust.floor.epochs.entry(name).or_insert(0);
            *floor = (*floor).max(epoch);
        }
    }

    /// The last good version of the workload `spec` names, if it differs from `spec`, is still verified (its
    /// release is in the verified set, so it passes the current root and floor) and its artifact is cached.
    fn fallback(&self, spec: &WorkloadSpec) -> Option<(WorkloadSpec, Digest)> {
        let (last, artifact) = self.last_good.get(&spec.name)?;
        if last == spec {
            return None;
        }
        let release = self.releases.get(&last.release)?;
        (release.artifact_digest == *artifact && self.artifact_ready(artifact))
            .then(|| (last.clone(), *artifact))
    }
}
