//! Prometheus `/metrics` (hub counters, fleet gauges, the embedded broker's) and the OpenAPI document.

use super::{ApiResult, ApiState};
use crate::hub::HubError;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

pub(super) async fn metrics(State(s): State<ApiState>) -> ApiResult {
    let text = s
        .call(|h| -> Result<String, HubError> {
            // One pass over the cached rows, no copies: scrapes must stay cheap at 10,000+ devices.
            let (mut total, mut online) = (0usize, 0usize);
            let (mut desired, mut acked, mut converged) = (0u64, 0u64, 0usize);
            h.store.with_devices(|devs| {
                for d in devs {
                    let g = h.desired_generation(&d.id);
                    let a = d.last_report.as_ref().map_or(0, |r| r.applied_generation);
                    total += 1;
                    online += usize::from(d.online);
                    desired += g;
                    acked += a;
                    converged += usize::from(a >= g);
                }
            })?;
            let m = &h.metrics;
            Ok(format!(
                "# TYPE flotilla_devices gauge\nflotilla_devices{{state=\"online\"}} {online}\nflotilla_devices{{state=\"offline\"}} {}\n\
                 # TYPE flotilla_generation_sum gauge\nflotilla_generation_sum{{kind=\"desired\"}} {desired}\nflotilla_generation_sum{{kind=\"acknowledged\"}} {acked}\n\
                 # TYPE flotilla_devices_converged gauge\nflotilla_devices_converged {converged}\n\
                 # TYPE flotilla_placement_duration_seconds gauge\nflotilla_placement_duration_seconds {}\n\
                 # TYPE flotilla_desired_published_total counter\nflotilla_desired_published_total {}\n\
                 # TYPE flotilla_desired_resent_total counter\nflotilla_desired_resent_total {}\n\
                 # TYPE flotilla_deployments_failed gauge\nflotilla_deployments_failed {}\n\
                 # TYPE flotilla_reports_total counter\nflotilla_reports_total{{result=\"accepted\"}} {}\nflotilla_reports_total{{result=\"rejected\"}} {}\n\
                 # TYPE flotilla_messages_rejected_total counter\nflotilla_messages_rejected_total {}\n\
                 # TYPE flotilla_chunks_served_total counter\nflotilla_chunks_served_total {}\n\
                 # TYPE flotilla_telemetry_records_total counter\nflotilla_telemetry_records_total {}\n\
                 # TYPE flotilla_report_lag_seconds gauge\nflotilla_report_lag_seconds {}\n\
                 # TYPE flotilla_enrollments_total counter\nflotilla_enrollments_total {}\n\
                 # TYPE flotilla_credentials_issued_total counter\nflotilla_credentials_issued_total {}\n",
                total - online,
                m.last_placement_secs,
                m.desired_published,
                m.desired_resent,
                h.desired.failed.len(),
                m.reports_accepted,
                m.reports_rejected,
                m.messages_rejected,
                m.chunks_served,
                m.telemetry_records,
                m.report_lag_secs,
                m.enrollments,
                m.credentials_issued,
            ) + &telemetry_metrics(&h.telemetry))
        })
        .await??;
    let mut text = text;
    if let Some(b) = &s.broker {
        let b = b.snapshot();
        text += &format!(
            "# TYPE flotilla_broker_connections gauge\nflotilla_broker_connections {}\n\
             # TYPE flotilla_broker_retained_messages gauge\nflotilla_broker_retained_messages {}\n\
             # TYPE flotilla_broker_messages_total counter\nflotilla_broker_messages_total{{direction=\"received\"}} {}\n\
             flotilla_broker_messages_total{{direction=\"delivered\"}} {}\n\
             # TYPE flotilla_broker_messages_dropped_total counter\n\
             flotilla_broker_messages_dropped_total{{reason=\"queue_full\"}} {}\n\
             flotilla_broker_messages_dropped_total{{reason=\"offline_queue_full\"}} {}\n",
            b.connections,
            b.retained,
            b.received,
            b.delivered,
            b.dropped_queue_full,
            b.dropped_offline
        );
        text += "# TYPE flotilla_broker_denied_total counter\n";
        for (action, n) in b.denied {
            text += &format!("flotilla_broker_denied_total{{action=\"{action}\"}} {n}\n");
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// Telemetry drops at the hub by reason (every reason, zeros included, so rates exist from the first scrape), JSON
/// feed and history counters.
fn telemetry_metrics(t: &crate::telemetry::Telemetry) -> String {
    use crate::telemetry::typed::DropReason;
    use std::fmt::Write as _;
    let mut out = String::from("# TYPE flotilla_telemetry_dropped_total counter\n");
    for r in DropReason::ALL {
        let n = t.dropped.get(&r).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "flotilla_telemetry_dropped_total{{reason=\"{}\"}} {n}",
            r.name()
        );
    }
    let _ = write!(
        out,
        "# TYPE flotilla_telemetry_feed_dropped_total counter\nflotilla_telemetry_feed_dropped_total{{feed=\"json\"}} {}\n",
        t.feed_dropped
    );
    if let Some(h) = &t.history {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &h.stats;
        let _ = write!(
            out,
            "# TYPE flotilla_telemetry_history_written_total counter\nflotilla_telemetry_history_written_total {}\n\
             # TYPE flotilla_telemetry_history_dropped_total counter\nflotilla_telemetry_history_dropped_total{{reason=\"backlog\"}} {}\n\
             flotilla_telemetry_history_dropped_total{{reason=\"write_error\"}} {}\n\
             # TYPE flotilla_telemetry_history_evicted_total counter\nflotilla_telemetry_history_evicted_total{{bound=\"age\"}} {}\n\
             flotilla_telemetry_history_evicted_total{{bound=\"bytes\"}} {}\n",
            s.written.load(Relaxed),
            s.dropped_backlog.load(Relaxed),
            s.write_errors.load(Relaxed),
            s.evicted_age.load(Relaxed),
            s.evicted_bytes.load(Relaxed),
        );
    }
    out
}

pub(super) async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
        .into_response()
}
