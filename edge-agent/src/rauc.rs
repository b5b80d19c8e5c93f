//! Firmware updates through RAUC (Debian's `rauc` 1.8): the agent checks the bundle against its signed digest,
//! hands it to `rauc install` (RAUC verifies the bundle's own X.509 signature against its keyring, writes the
//! inactive slot and activates it through its bootloader backend), reads `rauc status --output-format=json`, and
//! marks slots with `rauc status mark-good|mark-bad`. The confirm-or-roll-back decisions and the records of the
//! update in flight are the same as the built-in backend's (`firmware.rs`, `flotilla_agent_core::boot`).

use crate::config::FirmwareConfig;
use crate::firmware::{FirmwareBackend, FirmwareError, Records, check_image, run};
use flotilla_agent_core::boot::{self, AfterBoot, Pending};
use std::path::Path;
use std::process::Command;

/// The RAUC backend.
#[derive(Debug, Clone)]
pub struct RaucBackend {
    cfg: FirmwareConfig,
    records: Records,
}

impl RaucBackend {
    pub fn new(cfg: FirmwareConfig, data_dir: &Path) -> Self {
        Self {
            records: Records::new(&cfg, data_dir),
            cfg,
        }
    }

    fn rauc(&self, args: &[&str]) -> Result<String, FirmwareError> {
        let (prog, pre) = self
            .cfg
            .rauc_command
            .split_first()
            .map_or(("rauc", &[][..]), |(p, a)| (p.as_str(), a));
        let mut c = Command::new(prog);
        c.args(pre).args(args);
        run(c, &format!("rauc {}", args.join(" ")))
    }

    /// `rauc status` as JSON.
    fn status_json(&self) -> Result<serde_json::Value, FirmwareError> {
        let text = self.rauc(&["status", "--output-format=json"])?;
        serde_json::from_str(&text).map_err(|e| FirmwareError::Tool {
            command: "rauc status".into(),
            status: "unreadable output".into(),
            stderr: e.to_string(),
        })
    }

    /// Each slot's bootname and boot status, from `rauc status` (slots without a bootname are not A/B slots).
    fn slots(&self, status: &serde_json::Value) -> Vec<(String, String)> {
        status["slots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.as_object()?.values().next().cloned())
            .filter_map(|slot| {
                Some((
                    slot["bootname"].as_str()?.to_owned(),
                    slot["boot_status"].as_str().unwrap_or("").to_owned(),
                ))
            })
            .collect()
    }
}

impl FirmwareBackend for RaucBackend {
    fn name(&self) -> &'static str {
        "rauc"
    }

    fn records(&self) -> &Records {
        &self.records
    }

    fn booted(&self) -> Result<String, FirmwareError> {
        let status = self.status_json()?;
        status["booted"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| FirmwareError::Tool {
                command: "rauc status".into(),
                status: "no booted slot".into(),
                stderr: status.to_string(),
            })
    }

    fn inactive(&self) -> Result<String, FirmwareError> {
        let status = self.status_json()?;
        let booted = status["booted"].as_str().unwrap_or_default().to_owned();
        self.slots(&status)
            .into_iter()
            .map(|(name, _)| name)
            .find(|name| *name != booted)
            .ok_or_else(|| FirmwareError::Tool {
                command: "rauc status".into(),
                status: "no slot besides the booted one".into(),
                stderr: status.to_string(),
            })
    }

    fn install(
        &self,
        image: &Path,
        sha256: &str,
        version: &str,
    ) -> Result<(String, String), FirmwareError> {
        self.records.refuse_if_in_flight()?;
        // The bundle is the signed release's artifact: checked before RAUC sees it (RAUC then checks its own
        // signature, which the release's does not replace).
        check_image(image, sha256)?;
        let (from, to) = (self.booted()?, self.inactive()?);
        self.records.save_pending(&Pending {
            from: from.clone(),
            to: to.clone(),
            version: version.to_owned(),
            rebooted_at: None,
        })?;
        let path = image.to_string_lossy();
        if let Err(e) = self.rauc(&["install", &path]) {
            // RAUC refused or failed before activating anything: no update is in flight.
            self.records.clear_pending();
            return Err(e);
        }
        Ok((from, to))
    }

    fn after_boot(&self, now: u64) -> Result<Option<(Pending, AfterBoot)>, FirmwareError> {
        let Some(p) = self.records.pending()? else {
            return Ok(None);
        };
        let booted = self.booted()?;
        let outcome = boot::after_boot(&p, &booted, now, self.cfg.confirm_secs);
        match &outcome {
            AfterBoot::RolledBack { .. } | AfterBoot::Abandoned => {
                self.rauc(&["status", "mark-bad", "other"])?;
                self.rauc(&["status", "mark-good", "booted"])?;
                self.records.clear_pending();
            }
            AfterBoot::Confirm { .. } => {}
        }
        Ok(Some((p, outcome)))
    }

    fn mark_good(&self) -> Result<String, FirmwareError> {
        self.rauc(&["status", "mark-good", "booted"])?;
        self.records.clear_pending();
        self.booted()
    }

    fn mark_bad(&self) -> Result<String, FirmwareError> {
        self.rauc(&["status", "mark-bad", "booted"])?;
        self.booted()
    }

    fn keep_booting(&self) -> Result<Option<String>, FirmwareError> {
        let status = self.status_json()?;
        let booted = status["booted"].as_str().unwrap_or_default().to_owned();
        let good = self
            .slots(&status)
            .iter()
            .any(|(name, state)| *name == booted && state == "good");
        if good {
            return Ok(None);
        }
        self.rauc(&["status", "mark-good", "booted"])?;
        Ok(Some(booted))
    }

    fn status(&self) -> Result<String, FirmwareError> {
        let status = self.status_json()?;
        let slots: String = self
            .slots(&status)
            .iter()
            .map(|(name, state)| format!("slot {name}: {state}\n"))
            .collect();
        Ok(format!(
            "booted {}\nprimary {}\n{slots}pending {:?}",
            status["booted"].as_str().unwrap_or("?"),
            status["boot_primary"].as_str().unwrap_or("?"),
            self.records.pending()?
        ))
    }
}
