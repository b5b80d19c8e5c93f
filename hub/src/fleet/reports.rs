//! Device reports and presence: a report is verified against the device's key and its monotonic counter, merged
//! with what the operator set at enrollment, stored, and fed to active rollouts; presence only moves a device
//! online or offline.

use super::validate_inventory;
use crate::hub::{Hub, unix_now};
use crate::slis::ControlPlaneError;
use flotilla_shared::DeviceId;
use flotilla_shared::trust;
use flotilla_shared::wire::{Presence, Report, Signed, WorkloadState};

impl Hub {
    pub(crate) fn on_report(&mut self, device: &DeviceId, signed: &Signed) -> Result<(), String> {
        let d = self
            .store
            .device(device)
            .map_err(|e| e.to_string())?
            .ok_or("report from an unknown device")?;
        let report = match trust::verify_report(&d.public_key, device, signed, d.report_counter) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.reports_rejected += 1;
                return Err(e.to_string());
            }
        };
        if let Some(inv) = &report.inventory {
            validate_inventory(inv)?;
        }
        let now = unix_now();
        self.slis
            .report_lag
            .observe(now.saturating_sub(report.sent_at) as f64);
        self.count_failed_starts(&d, &report);
        // What the operator set at enrollment (token presets) stays authoritative over what the device reports.
        let mut report = report;
        let mut inventory_changed = false;
        if let Some(reported) = report.inventory.take() {
            let mut merged = reported;
            for (k, v) in &d.inventory.labels {
                merged.labels.retain(|(k2, _)| k2 != k);
                merged.labels.push((k.clone(), v.clone()));
            }
            merged.region = d.inventory.region.clone().or(merged.region);
            merged.zone = d.inventory.zone.clone().or(merged.zone);
            inventory_changed = merged != d.inventory;
            if merged.region != d.inventory.region {
                // Its telemetry topic follows its region.
                self.access
                    .set_region(device, merged.region.as_ref().map(|r| r.to_string()));
            }
            report.inventory = Some(merged);
        }
        if let Err(e) = self.store.save_report(device, &report, now) {
            self.slis.error(ControlPlaneError::Store);
            return Err(e.to_string());
        }
        self.metrics.reports_accepted += 1;
        self.recent_reports.record(device, &report, now);
        self.inflight.reported(
            &self.slis,
            device,
            report.applied_generation,
            |name, release| {
                report.workloads.iter().any(|w| {
                    w.name.as_str() == name
                        && w.release == *release
                        && w.state == WorkloadState::Running
                })
            },
            std::time::Instant::now(),
        );
        self.check_behind(device, &report);
        self.observe_for_rollouts(device, &report, now);
        if inventory_changed || !d.online {
            self.dirty = true;
        }
        Ok(())
    }

    /// Failed starts since the device's previous report: restarts that went up, and releases newly refused.
    fn count_failed_starts(&self, before: &crate::store::DeviceRow, report: &Report) {
        let prev = before.last_report.as_ref();
        for w in &report.workloads {
            let old = prev.and_then(|p| p.workloads.iter().find(|o| o.name == w.name));
            let restarts_before = old
                .filter(|o| o.release == w.release)
                .map_or(0, |o| o.restarts);
            self.slis.failed_start(
                "crash",
                u64::from(w.restarts.saturating_sub(restarts_before)),
            );
            let newly_rejected = w.rejected.is_some()
                && old.is_none_or(|o| o.rejected.is_none() || o.release != w.release);
            self.slis
                .failed_start("rejected", u64::from(newly_rejected));
        }
    }

    /// Presence is unsigned (the broker's last will); it only moves online/offline, never state.
    pub(crate) fn on_presence(&mut self, device: &DeviceId, p: &Presence) -> Result<(), String> {
        if self.store.device_exists(device).unwrap_or(false) {
            let now = unix_now();
            let _ = self.store.set_presence(device, p.online, now);
            self.presence_for_rollouts(device, p.online, now);
            self.dirty = true;
            self.sparkplug_presence(device, p.online);
            if p.online {
                self.resend_desired(device, "came online");
                self.resume_rotation(device);
            }
        }
        Ok(())
    }
}
