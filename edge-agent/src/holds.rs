//! Update holds: while the configured hold file exists, or while a guest holds updates through the host API
//! (`flotilla.hold`), release changes are deferred; what runs keeps running. Holds show in reports.

use crate::agent::Agent;
use flotilla_shared::WorkloadName;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest hold a guest may ask for in one call.
const MAX_GUEST_HOLD: Duration = Duration::from_secs(86_400);

/// The device's current holds.
#[derive(Debug, Default)]
pub struct Holds {
    /// Holds requested by guests through the host API, until their deadline.
    guest: BTreeMap<WorkloadName, (String, Instant)>,
    /// The hold file's reason while it exists.
    file: Option<String>,
}

impl Holds {
    /// Why updates are held at `now`, if they are (the hold file first, then a guest's unexpired hold).
    pub fn reason(&self, now: Instant) -> Option<String> {
        self.file.clone().or_else(|| {
            self.guest
                .iter()
                .find(|(_, (_, until))| *until > now)
                .map(|(n, (r, _))| format!("{n}: {r}"))
        })
    }

    /// Re-reads the hold file (its first line is the reason) and forgets expired guest holds.
    pub fn refresh(&mut self, hold_file: Option<&Path>, now: Instant) {
        self.file = hold_file.and_then(|p| {
            std::fs::read_to_string(p)
                .ok()
                .map(|t| t.lines().next().unwrap_or("held").trim().to_owned())
        });
        self.guest.retain(|_, (_, until)| *until > now);
    }

    /// A guest holds updates for `secs` seconds (capped at a day), or lifts its hold with `secs = 0`.
    pub fn set_guest(&mut self, name: WorkloadName, reason: String, secs: u32, now: Instant) {
        if secs == 0 {
            self.guest.remove(&name);
        } else {
            let secs = Duration::from_secs(u64::from(secs)).min(MAX_GUEST_HOLD);
            self.guest.insert(name, (reason, now + secs));
        }
    }
}

impl Agent {
    /// Why the device is holding updates right now, if it is (hold file, or a guest's unexpired hold).
    pub fn hold_reason(&self) -> Option<String> {
        self.holds.reason(Instant::now())
    }

    /// Re-reads the hold file and expires guest holds; re-plans and reports when the hold state changes.
    pub(crate) fn refresh_holds(&mut self) {
        let before = self.hold_reason();
        self.holds
            .refresh(self.cfg.hold_file.as_deref(), Instant::now());
        if self.hold_reason() != before {
            tracing::info!(hold = ?self.hold_reason(), "update hold changed");
            self.refresh_desired();
            self.send_report();
        }
    }

    /// A guest asked to hold updates (or lift its hold); takes effect now rather than on the next tick.
    pub(crate) fn on_guest_hold(&mut self, name: WorkloadName, reason: String, secs: u32) {
        self.holds.set_guest(name, reason, secs, Instant::now());
        let hold = self.hold_reason();
        self.refresh_desired();
        tracing::info!(hold = ?hold, "guest hold changed");
        self.send_report();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hold file wins over guest holds; a guest hold ends at its deadline or when lifted with 0 seconds.
    #[test]
    fn holds_expire_and_lift() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("hold");
        let t0 = Instant::now();
        let name = WorkloadName::new("sensor").expect("name");
        let mut h = Holds::default();
        h.set_guest(name.clone(), "calibrating".into(), 10, t0);
        assert_eq!(h.reason(t0).as_deref(), Some("sensor: calibrating"));
        assert_eq!(h.reason(t0 + Duration::from_secs(11)), None, "expired");
        std::fs::write(&file, "maintenance\nignored").expect("write");
        h.refresh(Some(&file), t0);
        assert_eq!(h.reason(t0).as_deref(), Some("maintenance"));
        std::fs::remove_file(&file).expect("rm");
        h.refresh(Some(&file), t0);
        assert_eq!(h.reason(t0).as_deref(), Some("sensor: calibrating"));
        h.set_guest(name, String::new(), 0, t0);
        assert_eq!(h.reason(t0), None, "lifted");
    }
}
