//! The control plane's service level indicators, as Prometheus histograms and counters through
//! `prometheus-client` (OpenMetrics text on `/metrics`):
//!
//! | metric | what it measures |
//! |---|---|
//! | `flotilla_api_request_duration_seconds{method,route,status}` | API latency (M1), per matched route |
//! | `flotilla_scheduling_latency_seconds` | an operator change (apply, delete, rollout step) -> each affected device's desired state handed to the broker |
//! | `flotilla_reconcile_lag_seconds` | a device's desired state published -> its report acknowledges that generation |
//! | `flotilla_workload_start_seconds` | desired state published -> the device reports the workload running at the new release |
//! | `flotilla_report_lag_seconds` | a report's `sent_at` -> the hub receiving it (device clock) |
//! | `flotilla_workload_failed_starts_total{reason}` | restarts after a failed run (`crash`), refused releases (`rejected`) |
//! | `flotilla_rollouts_finished_total{outcome}` | rollouts `completed` or `aborted` |
//! | `flotilla_control_plane_errors_total{kind}` | placement passes, store writes and publishes that failed |
//!
//! The histograms live here (shared, lock-free observes from the hub loop and the API's tasks); scrape-time gauges
//! and the hub's plain counters are encoded next to them by `api::metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub method: String,
    /// The matched route template (`/api/v1/devices/{id}`), never the raw path: bounded cardinality.
    pub route: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Latency buckets from 1 ms to ~65 s (API calls, scheduling).
fn fast() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// Buckets from 10 ms to 30 min (lags that include downloads and device restarts).
fn slow() -> Histogram {
    Histogram::new([
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    ])
}

/// The SLI metrics. Cloning shares them (each metric is reference-counted inside).
#[derive(Clone, Debug)]
pub struct Slis {
    pub api_latency: Family<ApiLabels, Histogram>,
    pub scheduling: Histogram,
    pub reconcile_lag: Histogram,
    pub start_time: Histogram,
    pub report_lag: Histogram,
    pub failed_starts: Family<ReasonLabel, Counter>,
    pub rollouts_finished: Family<OutcomeLabel, Counter>,
    pub errors: Family<KindLabel, Counter>,
}

impl Default for Slis {
    fn default() -> Self {
        let s = Self {
            api_latency: Family::new_with_constructor(fast),
            scheduling: fast(),
            reconcile_lag: slow(),
            start_time: slow(),
            report_lag: slow(),
            failed_starts: Family::default(),
            rollouts_finished: Family::default(),
            errors: Family::default(),
        };
        // Every label value exists from the first scrape, so rates and alert expressions see zeros, not absence.
        for reason in ["crash", "rejected"] {
            drop(s.failed_starts.get_or_create(&ReasonLabel { reason }));
        }
        for outcome in ["completed", "aborted"] {
            drop(s.rollouts_finished.get_or_create(&OutcomeLabel { outcome }));
        }
        for kind in ControlPlaneError::ALL {
            drop(s.errors.get_or_create(&KindLabel { kind: kind.name() }));
        }
        s
    }
}

/// What failed in the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlPlaneError {
    /// A placement pass failed (nothing was published).
    Placement,
    /// A store write failed.
    Store,
    /// The MQTT client refused a desired state (queue full or disconnected); it is retried.
    Publish,
}

impl ControlPlaneError {
    const ALL: [Self; 3] = [Self::Placement, Self::Store, Self::Publish];

    fn name(self) -> &'static str {
        match self {
            Self::Placement => "placement",
            Self::Store => "store",
            Self::Publish => "publish",
        }
    }
}

impl Slis {
    /// Registers every SLI metric (clones sharing the live values) into `reg`.
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "flotilla_api_request_duration_seconds",
            "API request latency by method, matched route and status",
            self.api_latency.clone(),
        );
        reg.register(
            "flotilla_scheduling_latency_seconds",
            "Operator change to each affected device's desired state handed to the broker",
            self.scheduling.clone(),
        );
        reg.register(
            "flotilla_reconcile_lag_seconds",
            "Desired state published to the device acknowledging that generation",
            self.reconcile_lag.clone(),
        );
        reg.register(
            "flotilla_workload_start_seconds",
            "Desired state published to the device reporting the workload running at the new release",
            self.start_time.clone(),
        );
        reg.register(
            "flotilla_report_lag_seconds",
            "Report sent (device clock) to received by the hub",
            self.report_lag.clone(),
        );
        reg.register(
            "flotilla_workload_failed_starts",
            "Workload runs that failed (crash) and releases a device refused (rejected)",
            self.failed_starts.clone(),
        );
        reg.register(
            "flotilla_rollouts_finished",
            "Rollouts that finished, by outcome",
            self.rollouts_finished.clone(),
        );
        reg.register(
            "flotilla_control_plane_errors",
            "Failed placement passes, store writes and desired-state publishes",
            self.errors.clone(),
        );
    }

    pub fn error(&self, kind: ControlPlaneError) {
        self.errors
            .get_or_create(&KindLabel { kind: kind.name() })
            .inc();
    }

    pub fn failed_start(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.failed_starts
                .get_or_create(&ReasonLabel { reason })
                .inc_by(n);
        }
    }

    pub fn rollout_finished(&self, outcome: &'static str) {
        self.rollouts_finished
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }
}

/// Per device, the generation last handed to the broker and when, until the device acknowledges it (reconcile
/// lag) and runs its workloads (start time). Owned by the hub loop; one entry per device at most (a newer publish
/// replaces an unfinished one), so a device that never answers costs one entry.
#[derive(Debug, Default)]
pub struct InFlight {
    /// device -> (generation, published at, workloads whose running state is still awaited: (name, release)).
    pending: HashMap<flotilla_shared::DeviceId, Pending>,
    /// When an operator change that is not yet published was made (scheduling latency's start).
    pub changed_at: Option<Instant>,
}

#[derive(Debug)]
struct Pending {
    generation: u64,
    at: Instant,
    acknowledged: bool,
    starting: Vec<(String, flotilla_shared::Digest)>,
}

impl InFlight {
    /// A desired state was handed to the broker.
    pub fn published(
        &mut self,
        device: &flotilla_shared::DeviceId,
        generation: u64,
        workloads: Vec<(String, flotilla_shared::Digest)>,
        at: Instant,
    ) {
        self.pending.insert(
            device.clone(),
            Pending {
                generation,
                at,
                acknowledged: false,
                starting: workloads,
            },
        );
    }

    /// A report arrived: observes reconcile lag once the generation is acknowledged, and start time for each
    /// awaited workload now running at its release.
    pub fn reported(
        &mut self,
        slis: &Slis,
        device: &flotilla_shared::DeviceId,
        applied: u64,
        running: impl Fn(&str, &flotilla_shared::Digest) -> bool,
        now: Instant,
    ) {
        let Some(p) = self.pending.get_mut(device) else {
            return;
        };
        if applied < p.generation {
            return;
        }
        let elapsed = now.saturating_duration_since(p.at).as_secs_f64();
        if !p.acknowledged {
            p.acknowledged = true;
            slis.reconcile_lag.observe(elapsed);
        }
        p.starting.retain(|(name, release)| {
            let up = running(name, release);
            if up {
                slis.start_time.observe(elapsed);
            }
            !up
        });
        if p.starting.is_empty() {
            self.pending.remove(device);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::{DeviceId, Digest};
    use std::time::Duration;

    #[test]
    fn lags_are_observed_once_per_generation_and_workload() {
        let slis = Slis::default();
        let mut f = InFlight::default();
        let d = DeviceId::new("gw-1").expect("id");
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let t0 = Instant::now();
        f.published(&d, 5, vec![("x".into(), a), ("y".into(), b)], t0);
        // An older generation acknowledges nothing.
        f.reported(&slis, &d, 4, |_, _| true, t0 + Duration::from_secs(1));
        assert_eq!(slis.reconcile_lag.count(), 0);
        // Acknowledged; x running at its release, y still downloading.
        f.reported(
            &slis,
            &d,
            5,
            |n, r| n == "x" && *r == a,
            t0 + Duration::from_secs(2),
        );
        assert_eq!(
            (slis.reconcile_lag.count(), slis.start_time.count()),
            (1, 1)
        );
        f.reported(
            &slis,
            &d,
            5,
            |n, r| n == "x" && *r == a,
            t0 + Duration::from_secs(3),
        );
        assert_eq!(
            (slis.reconcile_lag.count(), slis.start_time.count()),
            (1, 1)
        );
        f.reported(&slis, &d, 5, |_, _| true, t0 + Duration::from_secs(10));
        assert_eq!(
            (slis.reconcile_lag.count(), slis.start_time.count()),
            (1, 2)
        );
        assert!((slis.start_time.sum() - 12.0).abs() < 1e-9);
        // Done: later reports observe nothing.
        f.reported(&slis, &d, 6, |_, _| true, t0 + Duration::from_secs(20));
        assert_eq!(
            (slis.reconcile_lag.count(), slis.start_time.count()),
            (1, 2)
        );
        // A newer publish replaces an unfinished one.
        f.published(&d, 7, vec![("x".into(), b)], t0);
        f.published(&d, 8, vec![], t0);
        f.reported(&slis, &d, 7, |_, _| true, t0 + Duration::from_secs(1));
        assert_eq!(slis.reconcile_lag.count(), 1);
        f.reported(&slis, &d, 8, |_, _| true, t0 + Duration::from_secs(1));
        assert_eq!(
            (slis.reconcile_lag.count(), slis.start_time.count()),
            (2, 2)
        );
    }
}
