//! System updates: firmware and agent releases in the desired state. They are fetched and verified like any
//! release (signatures, epochs, chunks, disk checks), then checked against the device (`compatible`), and
//! installed one at a time, never while an update hold is on: firmware through the A/B backend (`firmware.rs`),
//! then a reboot after the workloads stopped; a new agent staged beside the running one and switched to under the
//! launcher (`flotilla-agent-launcher`), which switches back if it does not confirm itself. An update that was
//! rolled back is remembered (SQLite) and refused from then on with its reason, which the report carries to the
//! hub and its rollout.
//!
//! Agent self-update files live in `<data_dir>/agent/` (the launcher's crate documents them): `<dir>/flotilla-
//! agent` and `<dir>/release` per installed release, the `current` link, the `trial` record while a new agent
//! proves itself, and the `result` the launcher leaves after a rollback.

use crate::agent::{Agent, unix_now};
use crate::fetch::MAX_RELEASE_DOC;
use flotilla_shared::Digest;
use flotilla_shared::wire::{
    ArtifactRef, FirmwareInventory, RejectReason, WorkloadKind, WorkloadSpec, WorkloadState,
    WorkloadStatus,
};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Why the loop stops for an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// New firmware is activated: stop the workloads, then reboot into it.
    Reboot,
    /// A new agent is staged and `current` points at it: exit so the launcher starts it.
    SwitchAgent,
}

/// The system-update concern's state.
#[derive(Debug, Default)]
pub struct SystemUpdates {
    /// Releases installed and rolled back on this device (persisted), with the reason.
    pub failed: BTreeMap<Digest, String>,
    /// A firmware image being written to the other slot, off the loop's thread.
    pub installing: Option<Digest>,
    /// This agent is a new one on trial: it confirms itself once healthy; the launcher rolls it back otherwise.
    pub trial: bool,
    /// Set when the loop should stop for an update.
    pub exit: Option<Exit>,
    /// What each system workload of the desired state is doing, for the report.
    pub status: Vec<WorkloadStatus>,
    /// The launcher's state directory (`FLOTILLA_LAUNCHER_STATE`): set when this agent runs under the launcher,
    /// which is what makes agent releases possible.
    pub launcher: Option<PathBuf>,
    /// The firmware slot this system booted from, once the backend has said (it cannot change while this process
    /// runs; with RAUC each question is a D-Bus round trip, asked for every report otherwise).
    pub booted: std::cell::OnceCell<String>,
}

/// A release directory for `version` and `digest`: `<version>-<first 8 hex digits>`, or None when the version
/// cannot be part of a path.
pub fn release_dir(version: &str, digest: &Digest) -> Option<String> {
    let name = format!("{version}-{}", &digest.to_hex()[..8]);
    (!version.is_empty() && flotilla_agent_launcher::valid_dir(&name)).then_some(name)
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Why a system update that is ready to install must wait, if it must: an update hold, another system update being
/// installed or still confirming itself (one at a time: never firmware and the agent together), or an expired
/// desired state.
fn interlock(
    hold: Option<&str>,
    installing: bool,
    confirming: bool,
    frozen: bool,
) -> Option<String> {
    if let Some(h) = hold {
        Some(format!("waiting: updates are held ({h})"))
    } else if installing {
        Some("waiting: another system update is being installed".to_owned())
    } else if confirming {
        Some("waiting: the last system update is still confirming itself".to_owned())
    } else if frozen {
        Some("waiting: the desired state has expired".to_owned())
    } else {
        None
    }
}

/// Removes installed agent releases other than `keep` (the running one and the one before it).
fn remove_other_releases(dir: &Path, keep: &[String]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // The file type of the entry itself: the `current` link to a kept release is not a release directory.
        if e.file_type().is_ok_and(|t| t.is_dir())
            && flotilla_agent_launcher::valid_dir(&name)
            && !keep.contains(&name)
            && let Err(err) = std::fs::remove_dir_all(e.path())
        {
            tracing::warn!(dir = %name, error = %err, "cannot remove an old agent release");
        }
    }
}

fn status(
    spec: &WorkloadSpec,
    state: WorkloadState,
    rejected: Option<RejectReason>,
    note: Option<String>,
) -> WorkloadStatus {
    WorkloadStatus {
        name: spec.name.clone(),
        release: spec.release,
        healthy: state == WorkloadState::Running,
        state,
        restarts: 0,
        last_error: note,
        rejected,
        exit: None,
        retry_in_ms: None,
    }
}

impl Agent {
    fn agent_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("agent")
    }

    /// The firmware backend, when `[firmware]` is configured.
    pub(crate) fn firmware_backend(&self) -> Option<Box<dyn crate::firmware::FirmwareBackend>> {
        self.cfg
            .firmware
            .clone()
            .map(|f| crate::firmware::backend(f, &self.cfg.data_dir))
    }

    /// The agent release this agent was started from (digest, version), read from the `current` link.
    pub(crate) fn running_agent_release(&self) -> Option<(Digest, String)> {
        self.system.launcher.as_ref()?;
        let text =
            std::fs::read_to_string(self.agent_dir().join("current").join("release")).ok()?;
        let (digest, version) = text.trim().split_once(' ')?;
        Some((Digest::from_hex(digest).ok()?, version.to_owned()))
    }

    /// The booted firmware slot, asked of the backend until it answers once.
    fn booted_slot(&self, b: &dyn crate::firmware::FirmwareBackend) -> Option<String> {
        if let Some(s) = self.system.booted.get() {
            return Some(s.clone());
        }
        let slot = b.booted().ok()?;
        Some(self.system.booted.get_or_init(|| slot).clone())
    }

    /// What the inventory says about the firmware.
    pub(crate) fn firmware_inventory(&self) -> Option<FirmwareInventory> {
        let b = self.firmware_backend()?;
        let compatible = self.cfg.firmware.as_ref()?.compatible.clone()?;
        let slot = self.booted_slot(b.as_ref())?;
        Some(FirmwareInventory {
            compatible,
            version: b
                .records()
                .installed(&slot)
                .map_or_else(|| "factory".to_owned(), |(v, _)| v),
            slot,
            backend: b.name().into(),
        })
    }

    /// At start, before the loop: the rolled-back releases, and what the last agent switch became.
    pub(crate) fn system_at_boot(&mut self) {
        match self.store.failed_updates() {
            Ok(list) => self.system.failed = list.into_iter().collect(),
            Err(e) => tracing::error!(error = %e, "cannot read the failed updates"),
        }
        let launcher = std::env::var_os("FLOTILLA_LAUNCHER_STATE").map(PathBuf::from);
        if let Some(state) = &launcher
            && state != &self.cfg.data_dir
        {
            tracing::warn!(
                launcher = %state.display(),
                data_dir = %self.cfg.data_dir.display(),
                "the launcher's --state is not this agent's data_dir: agent releases are refused until they match"
            );
        }
        self.system.launcher = launcher.filter(|p| p == &self.cfg.data_dir);
        if self.system.launcher.is_none() {
            return;
        }
        let dir = self.agent_dir();
        if let Ok(text) = std::fs::read_to_string(dir.join("result")) {
            let get = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                    .map(str::to_owned)
            };
            if get("status").as_deref() == Some("rolled-back")
                && let Some(release) = get("release").and_then(|d| Digest::from_hex(&d).ok())
            {
                let reason = get("reason").unwrap_or_else(|| "unknown".into());
                tracing::error!(version = ?get("version"), %reason, "agent update rolled back by the launcher");
                self.record_failed(release, "agent", &reason);
            }
            let _ = std::fs::remove_file(dir.join("result"));
        }
        let trial = std::fs::read_to_string(dir.join("trial"))
            .ok()
            .map(|t| flotilla_agent_launcher::Trial::parse(&t));
        let current = std::fs::read_link(dir.join("current"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        match trial {
            Some(Ok(t)) if current.as_deref() == Some(t.to.as_str()) => {
                tracing::info!(version = %t.version, "new agent on trial: confirming once healthy");
                self.system.trial = true;
            }
            // A switch cut short before `current` moved: nothing was switched; the update is tried again.
            Some(_) => {
                tracing::warn!(
                    "an agent switch was interrupted before it happened; trying it again"
                );
                let _ = std::fs::remove_file(dir.join("trial"));
            }
            None => {}
        }
    }

    fn record_failed(&mut self, release: Digest, kind: &str, reason: &str) {
        if let Err(e) = self
            .store
            .record_failed_update(&release, kind, reason, unix_now())
        {
            tracing::error!(error = %e, "cannot persist a rolled-back update");
        }
        self.system.failed.insert(release, reason.to_owned());
    }

    /// A firmware update rolled back at boot: remember the release that was in the failed slot.
    pub(crate) fn firmware_rolled_back(&mut self, slot: &str, reason: &str) {
        let Some((_, digest)) = self
            .firmware_backend()
            .and_then(|b| b.records().installed(slot))
        else {
            return;
        };
        if let Ok(d) = Digest::from_hex(&digest) {
            self.record_failed(d, "firmware", reason);
        }
    }

    /// Each tick while this agent is on trial: healthy (connected and a report with its inventory delivered;
    /// the loop runs only after restore) confirms it, so the launcher stops counting.
    pub(crate) fn system_tick(&mut self) {
        if !(self.system.trial && self.connected && self.inventory_sent.is_some()) {
            return;
        }
        let dir = self.agent_dir();
        let version = self
            .running_agent_release()
            .map_or_else(String::new, |(_, v)| v);
        // What stays on disk once confirmed: this agent and the one before it (to go back to by hand).
        let keep: Vec<String> = std::fs::read_to_string(dir.join("trial"))
            .ok()
            .and_then(|t| flotilla_agent_launcher::Trial::parse(&t).ok())
            .map(|t| t.from.into_iter().chain([t.to]).collect())
            .unwrap_or_default();
        let confirmed = write_atomic(
            &dir.join("result"),
            format!("status=confirmed\nversion={version}\n").as_bytes(),
        )
        .and_then(|()| std::fs::remove_file(dir.join("trial")));
        match confirmed {
            Ok(()) => {
                tracing::info!(%version, "new agent confirmed");
                self.system.trial = false;
                if !keep.is_empty() {
                    remove_other_releases(&dir, &keep);
                }
                self.refresh_desired();
                self.send_report();
            }
            Err(e) => tracing::error!(error = %e, "cannot confirm the new agent"),
        }
    }

    /// Plans the system workloads of the desired state (called from `refresh_desired`): fetches what is missing,
    /// refuses what cannot be installed here, and starts at most one install when nothing holds it back.
    pub(crate) fn plan_system(&mut self, specs: &[WorkloadSpec], keep: &mut Vec<Digest>) {
        let mut out = Vec::new();
        let mut ready = Vec::new();
        for spec in specs {
            let supported = match spec.kind {
                WorkloadKind::Firmware => self
                    .cfg
                    .firmware
                    .as_ref()
                    .and_then(|f| f.compatible.clone()),
                _ => self
                    .system
                    .launcher
                    .as_ref()
                    .map(|_| std::env::consts::ARCH.to_owned()),
            };
            let Some(device) = supported else {
                self.workload_rejects
                    .insert(spec.name.clone(), RejectReason::UnsupportedKind);
                out.push(status(
                    spec,
                    WorkloadState::Failed,
                    Some(RejectReason::UnsupportedKind),
                    None,
                ));
                continue;
            };
            if let Some(reason) = self.system.failed.get(&spec.release) {
                let r = RejectReason::RolledBack(reason.clone());
                out.push(status(spec, WorkloadState::Failed, Some(r), None));
                continue;
            }
            if let Some(r) = self.workload_rejects.get(&spec.name) {
                out.push(status(spec, WorkloadState::Failed, Some(r.clone()), None));
                continue;
            }
            let Some(release) = self.releases.get(&spec.release).cloned() else {
                if !self.frozen {
                    self.start_fetch(
                        ArtifactRef::Release(spec.release),
                        MAX_RELEASE_DOC,
                        &spec.name,
                    );
                }
                out.push(status(spec, WorkloadState::Downloading, None, None));
                continue;
            };
            if release.compatible.as_deref() != Some(device.as_str()) {
                let r = RejectReason::Incompatible {
                    release: release.compatible.clone().unwrap_or_default(),
                    device,
                };
                self.workload_rejects.insert(spec.name.clone(), r.clone());
                out.push(status(spec, WorkloadState::Failed, Some(r), None));
                continue;
            }
            let installed = match spec.kind {
                WorkloadKind::Firmware => self.firmware_backend().is_some_and(|b| {
                    self.booted_slot(b.as_ref())
                        .and_then(|slot| b.records().installed(&slot))
                        .is_some_and(|(_, d)| d == spec.release.to_hex())
                }),
                _ => self
                    .running_agent_release()
                    .is_some_and(|(d, _)| d == spec.release),
            };
            if installed {
                let proving = match spec.kind {
                    WorkloadKind::Firmware => self.firmware_confirm.is_some(),
                    _ => self.system.trial,
                };
                let state = if proving {
                    WorkloadState::Starting
                } else {
                    WorkloadState::Running
                };
                out.push(status(spec, state, None, None));
                continue;
            }
            keep.push(release.artifact_digest);
            match self.store.has_artifact(&release.artifact_digest) {
                Ok(true) => ready.push((spec.clone(), release)),
                Ok(false) => {
                    if !self.frozen {
                        self.start_fetch(
                            ArtifactRef::Blob(release.artifact_digest),
                            release.artifact_size,
                            &spec.name,
                        );
                    }
                    // A download refused up front (disk space) shows in this very plan.
                    let r = self.workload_rejects.get(&spec.name).cloned();
                    let state = if r.is_some() {
                        WorkloadState::Failed
                    } else {
                        WorkloadState::Downloading
                    };
                    out.push(status(spec, state, r, None));
                }
                Err(e) => tracing::error!(error = %e, "artifact index"),
            }
        }
        // Interlocks: one system update at a time, none while a hold is on or another one proves itself.
        let busy = interlock(
            self.hold_reason().as_deref(),
            self.system.installing.is_some() || self.system.exit.is_some(),
            self.firmware_confirm.is_some() || self.system.trial,
            self.frozen,
        );
        for (i, (spec, release)) in ready.into_iter().enumerate() {
            if i > 0 || busy.is_some() {
                let note = busy
                    .clone()
                    .unwrap_or_else(|| "waiting: one system update at a time".into());
                let installing = self.system.installing == Some(spec.release);
                out.push(status(
                    &spec,
                    WorkloadState::Starting,
                    None,
                    (!installing).then_some(note),
                ));
                continue;
            }
            let begun = match spec.kind {
                WorkloadKind::Firmware => self.begin_firmware(&spec, &release),
                _ => self.switch_agent(&spec, &release),
            };
            match begun {
                Ok(()) => out.push(status(&spec, WorkloadState::Starting, None, None)),
                Err(r) => {
                    self.workload_rejects.insert(spec.name.clone(), r.clone());
                    out.push(status(&spec, WorkloadState::Failed, Some(r), None));
                }
            }
        }
        self.system.status = out;
    }

    /// Writes the image to the inactive slot off the loop's thread; the answer comes back as a runtime event.
    fn begin_firmware(
        &mut self,
        spec: &WorkloadSpec,
        release: &flotilla_shared::wire::Release,
    ) -> Result<(), RejectReason> {
        let backend = self
            .firmware_backend()
            .ok_or(RejectReason::UnsupportedKind)?;
        let to = backend
            .inactive()
            .map_err(|e| RejectReason::UpdateRefused(e.to_string()))?;
        backend
            .records()
            .record_installed(&to, &release.version, &spec.release.to_hex())
            .map_err(|e| RejectReason::UpdateRefused(e.to_string()))?;
        let image = self.artifact_path(&release.artifact_digest);
        let sha256 = hex::encode(release.artifact_digest.0);
        let (version, digest, events) = (release.version.clone(), spec.release, self.rt_tx.clone());
        tracing::info!(%version, slot = %to, "installing firmware");
        self.system.installing = Some(spec.release);
        tokio::task::spawn_blocking(move || {
            let result = backend
                .install(&image, &sha256, &version)
                .map(|_| ())
                .map_err(|e| e.to_string());
            let _ = events.blocking_send(crate::runtime::RuntimeEvent::FirmwareInstalled {
                release: digest,
                result,
            });
        });
        Ok(())
    }

    /// The image is in the other slot and activated: stop the workloads and reboot; or it was refused.
    pub(crate) fn on_firmware_installed(&mut self, release: Digest, result: Result<(), String>) {
        self.system.installing = None;
        match result {
            Ok(()) => {
                tracing::info!(%release, "firmware installed and activated; rebooting after the workloads stop");
                self.system.exit = Some(Exit::Reboot);
            }
            Err(e) => {
                tracing::error!(%release, error = %e, "firmware install refused; the running slot is untouched");
                if let Some(spec) = self
                    .accepted
                    .as_ref()
                    .and_then(|(_, ds)| ds.workloads.iter().find(|w| w.release == release).cloned())
                {
                    self.workload_rejects
                        .insert(spec.name, RejectReason::UpdateRefused(e));
                }
                self.refresh_desired();
                self.send_report();
            }
        }
    }

    /// Stages the new agent beside the running one, writes the trial record and switches `current`; the loop then
    /// stops so the launcher starts the new agent.
    fn switch_agent(
        &mut self,
        spec: &WorkloadSpec,
        release: &flotilla_shared::wire::Release,
    ) -> Result<(), RejectReason> {
        let refused = |e: std::io::Error| RejectReason::UpdateRefused(e.to_string());
        let to = release_dir(&release.version, &spec.release).ok_or_else(|| {
            RejectReason::InvalidSpec(format!(
                "agent release version {:?} cannot name a directory",
                release.version
            ))
        })?;
        let dir = self.agent_dir();
        let slot = dir.join(&to);
        std::fs::create_dir_all(&slot).map_err(refused)?;
        let bin = slot.join("flotilla-agent");
        let staged = slot.join("flotilla-agent.tmp");
        std::fs::copy(self.artifact_path(&release.artifact_digest), &staged).map_err(refused)?;
        std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(refused)?;
        std::fs::File::open(&staged)
            .and_then(|f| f.sync_all())
            .map_err(refused)?;
        std::fs::rename(&staged, &bin).map_err(refused)?;
        write_atomic(
            &slot.join("release"),
            format!("{} {}\n", spec.release.to_hex(), release.version).as_bytes(),
        )
        .map_err(refused)?;
        let from = std::fs::read_link(dir.join("current"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        let trial = flotilla_agent_launcher::Trial {
            release: spec.release.to_hex(),
            version: release.version.clone(),
            from,
            to: to.clone(),
            confirm_secs: self.cfg.agent_confirm_secs,
        };
        write_atomic(&dir.join("trial"), trial.render().as_bytes()).map_err(refused)?;
        let tmp = dir.join("current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&to, &tmp)
            .and_then(|()| std::fs::rename(&tmp, dir.join("current")))
            .map_err(|e| {
                let _ = std::fs::remove_file(dir.join("trial"));
                refused(e)
            })?;
        tracing::info!(version = %release.version, dir = %to, "new agent staged and switched to; restarting into it");
        self.system.exit = Some(Exit::SwitchAgent);
        Ok(())
    }

    /// The system workloads' statuses for the report (after the reconciler's).
    pub(crate) fn system_status(&self) -> Vec<WorkloadStatus> {
        self.system.status.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_system_update_waits_for_holds_and_for_any_other_system_update() {
        // (hold, installing, confirming, frozen, what the wait says)
        type Case<'a> = (Option<&'a str>, bool, bool, bool, Option<&'a str>);
        let cases: &[Case] = &[
            (None, false, false, false, None),
            (
                Some("in motion"),
                false,
                false,
                false,
                Some("held (in motion)"),
            ),
            // Firmware being written, or a reboot/switch under way: the agent update waits, and vice versa.
            (None, true, false, false, Some("being installed")),
            // A new slot or a new agent still proving itself: nothing else starts.
            (None, false, true, false, Some("still confirming")),
            (None, false, false, true, Some("expired")),
            // A hold is named first: lifting it is what the operator can do.
            (Some("in motion"), true, true, true, Some("held")),
        ];
        for (hold, installing, confirming, frozen, want) in cases {
            let got = interlock(*hold, *installing, *confirming, *frozen);
            match want {
                None => assert_eq!(got, None),
                Some(w) => assert!(
                    got.as_deref().is_some_and(|g| g.contains(w)),
                    "{got:?} for {w}"
                ),
            }
        }
    }

    #[test]
    fn release_directories_are_one_safe_path_component() {
        let d = Digest([0xab; 32]);
        assert_eq!(release_dir("1.2.0", &d).as_deref(), Some("1.2.0-abababab"));
        for bad in ["../x", "a/b", "", "v 1", "\u{e9}"] {
            assert_eq!(release_dir(bad, &d), None, "{bad:?}");
        }
    }

    #[test]
    fn old_agent_releases_are_removed_but_the_running_and_previous_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["1.0.0-aaaaaaaa", "1.1.0-bbbbbbbb", "1.2.0-cccccccc"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("dir");
        }
        std::fs::write(dir.path().join("trial.invalid"), "x").expect("file");
        std::os::unix::fs::symlink("1.2.0-cccccccc", dir.path().join("current")).expect("link");
        remove_other_releases(
            dir.path(),
            &["1.1.0-bbbbbbbb".into(), "1.2.0-cccccccc".into()],
        );
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "1.1.0-bbbbbbbb",
                "1.2.0-cccccccc",
                "current",
                "trial.invalid"
            ]
        );
    }
}
