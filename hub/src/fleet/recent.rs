//! Each device's recent reports, as one-line summaries in memory (the console's device page): the last
//! [`KEEP`] changes of what the device said, a report that says the same as the one before only moving that
//! line's time and count. Memory stays bounded (`KEEP` short lines per device); a hub restart starts them afresh
//! (the full last report is in the store).

use flotilla_shared::DeviceId;
use flotilla_shared::wire::{Report, WorkloadState};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};

/// Lines kept per device.
pub const KEEP: usize = 10;

/// One report, summarised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportLine {
    /// When the hub received the first report this line stands for.
    pub at: u64,
    /// When it received the last one.
    pub last_at: u64,
    /// How many consecutive reports said this.
    pub reports: u32,
    pub applied_generation: u64,
    /// `2 of 3 running; sensor backing-off; hold: in motion; refused generation 7: ...`
    pub summary: String,
}

/// The summary of a report: what changed in it matters to an operator, its counter and time do not.
pub fn summary(r: &Report) -> String {
    let running = r
        .workloads
        .iter()
        .filter(|w| w.state == WorkloadState::Running)
        .count();
    let mut parts = vec![format!("{running} of {} running", r.workloads.len())];
    for w in r
        .workloads
        .iter()
        .filter(|w| w.state != WorkloadState::Running)
    {
        parts.push(format!("{} {}", w.name, crate::api::state_name(w.state)));
    }
    if let Some(h) = &r.hold {
        parts.push(format!("hold: {h}"));
    }
    if let Some(x) = &r.last_rejection {
        parts.push(format!("refused generation {}: {}", x.generation, x.reason));
    }
    parts.join("; ")
}

/// Recent report lines of every device.
#[derive(Debug, Default)]
pub struct RecentReports {
    by_device: HashMap<DeviceId, VecDeque<ReportLine>>,
}

impl RecentReports {
    /// Records a report received at `now`.
    pub fn record(&mut self, device: &DeviceId, r: &Report, now: u64) {
        let lines = self.by_device.entry(device.clone()).or_default();
        let s = summary(r);
        if let Some(last) = lines.back_mut()
            && last.summary == s
            && last.applied_generation == r.applied_generation
        {
            last.last_at = now;
            last.reports = last.reports.saturating_add(1);
            return;
        }
        if lines.len() == KEEP {
            lines.pop_front();
        }
        lines.push_back(ReportLine {
            at: now,
            last_at: now,
            reports: 1,
            applied_generation: r.applied_generation,
            summary: s,
        });
    }

    /// A device's lines, newest first.
    pub fn of(&self, device: &DeviceId) -> Vec<ReportLine> {
        self.by_device
            .get(device)
            .map(|l| l.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets a device (deleted or re-enrolled).
    pub fn forget(&mut self, device: &DeviceId) {
        self.by_device.remove(device);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::wire::WorkloadStatus;

    fn report(generation: u64, states: &[WorkloadState], hold: Option<&str>) -> Report {
        Report {
            device: DeviceId::new("d").expect("id"),
            counter: 1,
            sent_at: 0,
            applied_generation: generation,
            last_rejection: None,
            workloads: states
                .iter()
                .enumerate()
                .map(|(i, s)| WorkloadStatus {
                    name: flotilla_shared::WorkloadName::new(format!("w{i}")).expect("name"),
                    release: flotilla_shared::Digest([0; 32]),
                    state: *s,
                    healthy: true,
                    restarts: 0,
                    last_error: None,
                    rejected: None,
                    exit: None,
                    retry_in_ms: None,
                })
                .collect(),
            inventory: None,
            telemetry_dropped: 0,
            hold: hold.map(str::to_owned),
            staged: vec![],
        }
    }

    #[test]
    fn changes_make_lines_and_repeats_move_the_last_one() {
        use WorkloadState::*;
        let d = DeviceId::new("d").expect("id");
        let mut r = RecentReports::default();
        r.record(&d, &report(1, &[Downloading], None), 10);
        r.record(&d, &report(1, &[Running], None), 11);
        r.record(&d, &report(1, &[Running], None), 40);
        r.record(&d, &report(1, &[Running], Some("in motion")), 50);
        let lines = r.of(&d);
        let got: Vec<(&str, u64, u64, u32)> = lines
            .iter()
            .map(|l| (l.summary.as_str(), l.at, l.last_at, l.reports))
            .collect();
        assert_eq!(
            got,
            [
                ("1 of 1 running; hold: in motion", 50, 50, 1),
                ("1 of 1 running", 11, 40, 2),
                ("0 of 1 running; w0 downloading", 10, 10, 1),
            ]
        );
    }

    #[test]
    fn each_device_keeps_a_bounded_history() {
        let d = DeviceId::new("d").expect("id");
        let mut r = RecentReports::default();
        for g in 0..(KEEP as u64 + 5) {
            r.record(&d, &report(g, &[WorkloadState::Running], None), g);
        }
        let lines = r.of(&d);
        assert_eq!(lines.len(), KEEP);
        assert_eq!(lines[0].applied_generation, KEEP as u64 + 4, "newest first");
        r.forget(&d);
        assert!(r.of(&d).is_empty());
    }
}
