//! Prometheus `/metrics` through `prometheus-client` (OpenMetrics text): the SLIs (`crate::slis`), the hub's
//! counters, fleet gauges computed at scrape time, telemetry and the embedded broker's counters; and the OpenAPI
//! document. Scrape-time values are registered as fresh metrics into a registry built per scrape, next to clones
//! of the live SLI metrics, so one encoder writes them all.

use super::{ApiResult, ApiState};
use crate::hub::{Hub, HubError};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use flotilla_shared::wire::WorkloadState;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;

/// Families here use `Vec<(String, String)>` label sets: any label names, built at scrape time.
type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    reg.register(name, help, ConstCounter::new(v));
}

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    reg.register(name, help, ConstGauge::new(v));
}

fn counter_family(reg: &mut Registry, name: &str, help: &str, values: &[(Labels, u64)]) {
    let f = Family::<Labels, Counter>::default();
    for (l, v) in values {
        f.get_or_create(l).inc_by(*v);
    }
    reg.register(name, help, f);
}

fn gauge_family(reg: &mut Registry, name: &str, help: &str, values: &[(Labels, i64)]) {
    let f = Family::<Labels, Gauge>::default();
    for (l, v) in values {
        f.get_or_create(l).set(*v);
    }
    reg.register(name, help, f);
}

fn to_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Registers everything the hub loop owns (read in one call into the loop).
fn hub_metrics(h: &Hub, reg: &mut Registry) -> Result<(), HubError> {
    // One pass over the cached rows, no copies: scrapes must stay cheap at 10,000+ devices.
    let (mut total, mut online) = (0usize, 0usize);
    let (mut desired, mut acked, mut converged) = (0u64, 0u64, 0usize);
    let mut regions: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    // Per region: devices holding updates, and devices with a workload failing (crash loop, failed, refused).
    let mut held: BTreeMap<String, usize> = BTreeMap::new();
    let mut failing: BTreeMap<String, usize> = BTreeMap::new();
    h.store.with_devices(|devs| {
        for d in devs {
            let g = h.desired_generation(&d.id);
            let a = d.last_report.as_ref().map_or(0, |r| r.applied_generation);
            total += 1;
            online += usize::from(d.online);
            desired += g;
            acked += a;
            converged += usize::from(a >= g);
            let region = d
                .inventory
                .region
                .as_ref()
                .map_or(flotilla_shared::topics::NO_REGION, |r| r.as_str());
            let e = regions.entry(region.to_owned()).or_default();
            e.0 += usize::from(d.online);
            e.1 += usize::from(!d.online);
            if let Some(r) = &d.last_report {
                *held.entry(region.to_owned()).or_default() += usize::from(r.hold.is_some());
                let bad = r.workloads.iter().any(|w| {
                    w.rejected.is_some()
                        || matches!(w.state, WorkloadState::BackingOff | WorkloadState::Failed)
                });
                *failing.entry(region.to_owned()).or_default() += usize::from(bad);
            }
        }
    })?;
    let m = &h.metrics;
    gauge_family(
        reg,
        "flotilla_devices",
        "Registered devices by presence",
        &[
            (labels(&[("state", "online")]), to_i64(online)),
            (labels(&[("state", "offline")]), to_i64(total - online)),
        ],
    );
    let per_region: Vec<(Labels, i64)> = regions
        .iter()
        .flat_map(|(r, (on, off))| {
            [
                (labels(&[("region", r), ("state", "online")]), to_i64(*on)),
                (labels(&[("region", r), ("state", "offline")]), to_i64(*off)),
            ]
        })
        .collect();
    gauge_family(
        reg,
        "flotilla_region_devices",
        "Registered devices by region and presence",
        &per_region,
    );
    let by_region = |m: &BTreeMap<String, usize>| -> Vec<(Labels, i64)> {
        m.iter()
            .map(|(r, n)| (labels(&[("region", r)]), to_i64(*n)))
            .collect()
    };
    gauge_family(
        reg,
        "flotilla_devices_held",
        "Devices holding updates (hold file or guest hold), by region",
        &by_region(&held),
    );
    gauge_family(
        reg,
        "flotilla_devices_failing",
        "Devices with a workload crash-looping, failed or refusing its release, by region",
        &by_region(&failing),
    );
    gauge_family(
        reg,
        "flotilla_generation_sum",
        "Sum over devices of the desired and the acknowledged generation",
        &[
            (
                labels(&[("kind", "desired")]),
                i64::try_from(desired).unwrap_or(i64::MAX),
            ),
            (
                labels(&[("kind", "acknowledged")]),
                i64::try_from(acked).unwrap_or(i64::MAX),
            ),
        ],
    );
    gauge(
        reg,
        "flotilla_devices_converged",
        "Devices that acknowledged their desired generation",
        to_i64(converged),
    );
    gauge(
        reg,
        "flotilla_devices_behind",
        "Devices that have not acknowledged their desired generation (the scheduling backlog)",
        to_i64(total - converged),
    );
    reg.register(
        "flotilla_placement_duration_seconds",
        "Duration of the last placement pass",
        ConstGauge::new(m.last_placement_secs),
    );
    gauge(
        reg,
        "flotilla_broker_link_up",
        "Whether the hub's own MQTT connection to the broker is up",
        i64::from(m.link_up),
    );
    counter(
        reg,
        "flotilla_desired_published",
        "Desired states handed to the broker",
        m.desired_published,
    );
    counter(
        reg,
        "flotilla_desired_resent",
        "Desired states handed to the broker again by anti-entropy",
        m.desired_resent,
    );
    gauge(
        reg,
        "flotilla_deployments_failed",
        "Deployments the last placement pass could not deliver everywhere",
        to_i64(h.desired.failed.len()),
    );
    counter_family(
        reg,
        "flotilla_reports",
        "Device reports by result",
        &[
            (labels(&[("result", "accepted")]), m.reports_accepted),
            (labels(&[("result", "rejected")]), m.reports_rejected),
        ],
    );
    counter(
        reg,
        "flotilla_messages_rejected",
        "MQTT messages the hub refused",
        m.messages_rejected,
    );
    counter(
        reg,
        "flotilla_chunks_served",
        "Artifact chunks served",
        m.chunks_served,
    );
    counter(
        reg,
        "flotilla_telemetry_records",
        "Telemetry records accepted",
        m.telemetry_records,
    );
    counter(
        reg,
        "flotilla_enrollments",
        "Devices enrolled",
        m.enrollments,
    );
    counter(
        reg,
        "flotilla_credentials_issued",
        "Client certificates and passwords issued after enrollment",
        m.credentials_issued,
    );
    let mut active: BTreeMap<&str, i64> =
        [("running", 0), ("paused", 0), ("awaiting_approval", 0)].into();
    for r in h.rollouts.values() {
        use flotilla_hub_core::rollout::Phase;
        let state = match (&r.rollout.phase, r.rollout.paused) {
            (Phase::Completed | Phase::Aborted { .. }, _) => continue,
            (_, true) => "paused",
            (Phase::AwaitingApproval(_), false) => "awaiting_approval",
            (Phase::Wave(_), false) => "running",
        };
        *active.entry(state).or_default() += 1;
    }
    let active: Vec<(Labels, i64)> = active
        .into_iter()
        .map(|(s, n)| (labels(&[("state", s)]), n))
        .collect();
    gauge_family(
        reg,
        "flotilla_rollouts_active",
        "Rollouts not finished, by state",
        &active,
    );
    telemetry_metrics(&h.telemetry, reg);
    Ok(())
}

/// Telemetry drops at the hub by reason (every reason, zeros included, so rates exist from the first scrape), JSON
/// feed and history counters.
fn telemetry_metrics(t: &crate::telemetry::Telemetry, reg: &mut Registry) {
    use crate::telemetry::typed::DropReason;
    let drops: Vec<(Labels, u64)> = DropReason::ALL
        .into_iter()
        .map(|r| {
            (
                labels(&[("reason", r.name())]),
                t.dropped.get(&r).copied().unwrap_or(0),
            )
        })
        .collect();
    counter_family(
        reg,
        "flotilla_telemetry_dropped",
        "Telemetry records dropped at the hub, by reason",
        &drops,
    );
    counter_family(
        reg,
        "flotilla_telemetry_feed_dropped",
        "Feed messages the hub's MQTT client could not queue",
        &[
            (labels(&[("feed", "json")]), t.feed_dropped),
            (labels(&[("feed", "sparkplug")]), t.sparkplug_dropped),
        ],
    );
    if let Some(h) = &t.history {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &h.stats;
        counter(
            reg,
            "flotilla_telemetry_history_written",
            "Records written to the history",
            s.written.load(Relaxed),
        );
        counter_family(
            reg,
            "flotilla_telemetry_history_dropped",
            "Records not written to the history",
            &[
                (
                    labels(&[("reason", "backlog")]),
                    s.dropped_backlog.load(Relaxed),
                ),
                (
                    labels(&[("reason", "write_error")]),
                    s.write_errors.load(Relaxed),
                ),
            ],
        );
        counter_family(
            reg,
            "flotilla_telemetry_history_evicted",
            "Records removed from the history by its bounds",
            &[
                (labels(&[("bound", "age")]), s.evicted_age.load(Relaxed)),
                (labels(&[("bound", "bytes")]), s.evicted_bytes.load(Relaxed)),
                (labels(&[("bound", "total")]), s.evicted_total.load(Relaxed)),
            ],
        );
    }
}

/// The embedded broker's gauges and counters.
fn broker_metrics(b: &crate::embedded::Broker, reg: &mut Registry) {
    let b = b.snapshot();
    gauge(
        reg,
        "flotilla_broker_connections",
        "Open MQTT connections",
        to_i64(b.connections),
    );
    gauge(
        reg,
        "flotilla_broker_retained_messages",
        "Retained messages held",
        to_i64(b.retained),
    );
    counter_family(
        reg,
        "flotilla_broker_messages",
        "Messages through the embedded broker",
        &[
            (labels(&[("direction", "received")]), b.received),
            (labels(&[("direction", "delivered")]), b.delivered),
        ],
    );
    counter_family(
        reg,
        "flotilla_broker_messages_dropped",
        "Messages the embedded broker dropped",
        &[
            (labels(&[("reason", "queue_full")]), b.dropped_queue_full),
            (
                labels(&[("reason", "offline_queue_full")]),
                b.dropped_offline,
            ),
        ],
    );
    let denied: Vec<(Labels, u64)> = b
        .denied
        .iter()
        .map(|(action, n)| (labels(&[("action", action)]), *n))
        .collect();
    counter_family(
        reg,
        "flotilla_broker_denied",
        "Requests the access policy refused",
        &denied,
    );
}

pub(super) async fn metrics(State(s): State<ApiState>) -> ApiResult {
    // Built and encoded inside one call into the hub loop: the scrape reads the loop's state once, consistently.
    let mut text = s
        .call(|h| -> Result<String, HubError> {
            let mut reg = Registry::default();
            hub_metrics(h, &mut reg)?;
            h.slis.register(&mut reg);
            let mut out = String::new();
            prometheus_client::encoding::text::encode_registry(&mut out, &reg)
                .map_err(|e| HubError::Internal(e.to_string()))?;
            Ok(out)
        })
        .await??;
    if let Some(b) = &s.broker {
        let mut reg = Registry::default();
        broker_metrics(b, &mut reg);
        prometheus_client::encoding::text::encode_registry(&mut text, &reg)
            .map_err(|e| HubError::Internal(e.to_string()))?;
    }
    prometheus_client::encoding::text::encode_eof(&mut text)
        .map_err(|e| HubError::Internal(e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

pub(super) async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
        .into_response()
}
