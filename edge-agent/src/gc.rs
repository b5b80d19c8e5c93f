//! Garbage collection of the artifact cache: what the accepted desired state needs, what runs now and what ran
//! before it (kept for a fast rollback) stay; everything else is deleted.

use crate::agent::Agent;
use flotilla_shared::wire::{UpdateStrategy, WorkloadSpec};
use flotilla_shared::{Digest, WorkloadName};
use std::collections::BTreeMap;

/// Per workload: (artifact running now, the one that ran before it), for keeping current + previous.
#[derive(Debug, Default)]
pub struct ArtifactHistory(BTreeMap<WorkloadName, (Digest, Option<Digest>)>);

impl ArtifactHistory {
    /// Records what runs now; returns every previous artifact still remembered.
    pub fn note_running(&mut self, running: &[(WorkloadName, Digest)]) -> Vec<Digest> {
        // Remember, per workload, the artifact that ran before the current one: it is kept for a fast rollback.
        for (name, digest) in running {
            let entry = self.0.entry(name.clone()).or_insert((*digest, None));
            if entry.0 != *digest {
                *entry = (*digest, Some(entry.0));
            }
        }
        self.0.values().filter_map(|(_, p)| *p).collect()
    }

    /// Forgets `name`'s history (its previous version was deleted on purpose).
    pub fn forget(&mut self, name: &WorkloadName) {
        self.0.remove(name);
    }
}

impl Agent {
    /// Delete-then-download: once the old version of a workload has stopped, its image, its cached tarball and
    /// its last good record go, so a device without room for two versions can fetch the new one (which then
    /// starts). Any other workload's use of the same image keeps it.
    pub(crate) fn delete_stopped_version(&mut self, old: &WorkloadSpec) {
        let wanted = self
            .accepted
            .as_ref()
            .and_then(|(_, ds)| ds.workloads.iter().find(|w| w.name == old.name).cloned());
        let delete_first = wanted.as_ref().is_some_and(|w| {
            w.release != old.release
                && w.container
                    .as_ref()
                    .is_some_and(|c| c.update_strategy == UpdateStrategy::DeleteThenDownload)
        });
        if !delete_first {
            return;
        }
        tracing::info!(workload = %old.name, "delete-then-download: removing the old version before the download");
        self.last_good.remove(&old.name);
        let names: Vec<WorkloadName> = self.last_good.keys().cloned().collect();
        if let Err(e) = self.store.retain_last_good(&names) {
            tracing::warn!(error = %e, "cannot forget the deleted version");
        }
        self.artifact_history.forget(&old.name);
        if let (Some(rt), Some(image)) = (
            &self.containers,
            self.releases
                .get(&old.release)
                .and_then(|r| r.image.clone()),
        ) {
            let ids = [
                format!("sha256:{}", image.config_digest.to_hex()),
                format!("sha256:{}", image.manifest_digest.to_hex()),
            ];
            let in_use: Vec<&WorkloadSpec> = self
                .accepted
                .iter()
                .flat_map(|(_, ds)| ds.workloads.iter())
                .chain(self.last_good.values().map(|(spec, _)| spec))
                .filter(|s| s.release == old.release)
                .collect();
            let loaded = self.store.images().unwrap_or_default();
            let remove: Vec<String> = loaded
                .into_iter()
                .filter(|l| in_use.is_empty() && ids.contains(&l.image))
                .map(|l| l.image)
                .collect();
            if !remove.is_empty() {
                rt.remove_images(remove, self.rt_tx.clone());
            }
        }
        // The cached tarball goes with the next collection, which this re-plan runs; the re-plan also starts
        // the download that waited for the delete.
        self.refresh_desired();
    }

    /// Removes container images the agent loaded that neither the current nor the previous version of their
    /// workload uses, nor any wanted or last good spec.
    pub(crate) fn collect_images(&mut self) {
        let Some(rt) = &self.containers else { return };
        let loaded = match self.store.images() {
            Ok(l) => l,
            Err(e) => return tracing::warn!(error = %e, "image index"),
        };
        // Staged images stay too: they were loaded for the coming cutover.
        let specs: Vec<&flotilla_shared::wire::WorkloadSpec> = self
            .accepted
            .iter()
            .flat_map(|(_, ds)| ds.workloads.iter().chain(&ds.staged))
            .chain(self.last_good.values().map(|(spec, _)| spec))
            .collect();
        let workloads = specs.iter().map(|s| s.name.to_string()).collect();
        let in_use = specs
            .iter()
            .filter_map(|spec| self.releases.get(&spec.release)?.image.as_ref())
            .flat_map(|i| {
                [
                    format!("sha256:{}", i.config_digest.to_hex()),
                    format!("sha256:{}", i.manifest_digest.to_hex()),
                ]
            })
            .collect();
        let gc = rt.image_gc(crate::agent::unix_now(), &self.cfg.data_dir);
        let remove =
            flotilla_agent_core::containers::images_to_remove(&loaded, &workloads, &in_use, gc);
        if !remove.is_empty() {
            rt.remove_images(remove, self.rt_tx.clone());
        }
    }

    /// Keeps the artifacts of the desired releases and of whatever is still running (the previous version), and
    /// deletes the rest.
    pub(crate) fn collect_garbage(&mut self, keep: &[Digest]) {
        let running: Vec<(WorkloadName, Digest)> = self
            .reconciler
            .status(self.millis())
            .iter()
            .filter_map(|s| {
                self.releases
                    .get(&s.release)
                    .map(|r| (s.name.clone(), r.artifact_digest))
            })
            .collect();
        let previous = self.artifact_history.note_running(&running);
        let keep: Vec<Digest> = keep
            .iter()
            .chain(running.iter().map(|(_, d)| d))
            .chain(previous.iter())
            // What a workload falls back to when its wanted release cannot run, after a restart too.
            .chain(self.last_good.values().map(|(_, a)| a))
            .copied()
            .collect();
        if keep.is_empty() && self.accepted.is_none() {
            return;
        }
        match self.store.collect_artifacts(&keep) {
            Ok(gone) => {
                for d in gone {
                    let _ = std::fs::remove_file(self.artifact_path(&d));
                }
            }
            Err(e) => tracing::warn!(error = %e, "artifact collection failed"),
        }
    }
}
