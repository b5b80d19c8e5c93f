//! Telemetry: a device's streams with a page of its history (or downsampled metrics), and the live tail as
//! server-sent events.

use super::{ApiResult, ApiState, Problem, Role, ok};
use crate::telemetry::history::{self, MAX_LIMIT, Query};
use crate::telemetry::typed::FeedRecord;
use axum::extract::{Path, Query as QueryString, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

/// Records per page when the caller does not say.
const DEFAULT_LIMIT: usize = 100;

/// `?stream=&since=&until=&after=&limit=&step=` (times: device time, Unix seconds).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryParams {
    stream: Option<String>,
    since: Option<u64>,
    until: Option<u64>,
    after: Option<u64>,
    limit: Option<usize>,
    step: Option<u64>,
}

fn bad(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid query", detail)
}

/// `GET /api/v1/devices/{id}/telemetry`: every stream's counters and latest values, and one page of history
/// (`records` and `next_after`), or with `step` the stream's metrics downsampled into `buckets`.
pub(super) async fn device_telemetry(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    params: Result<QueryString<HistoryParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    let id = super::devices::device_id(id)?;
    s.require_device(&caller, &id).await?;
    let QueryString(p) = params.map_err(|e| bad(e.body_text()))?;
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(bad(format!("limit must be 1..={MAX_LIMIT}")));
    }
    if let (Some(a), Some(b)) = (p.since, p.until)
        && a >= b
    {
        return Err(bad("since must be before until"));
    }
    if p.step.is_some() && p.stream.is_none() {
        return Err(bad("step downsamples one metric stream: give stream too"));
    }
    if p.step == Some(0) {
        return Err(bad("step must be at least 1 second"));
    }
    let dev = id.clone();
    let (streams, path) = s
        .call(move |h| {
            let streams: Vec<Value> = h
                .telemetry
                .device_streams(&dev)
                .map(|(stream, st)| {
                    json!({"stream": stream, "type": st.content_type, "records": st.records, "gaps": st.gaps,
                           "duplicates": st.duplicates, "dropped": st.dropped,
                           "last_drop": st.last_drop.map(|r| r.name()), "last_seq": st.last_seq,
                           "last_at": st.last_at, "metrics": st.metrics, "last_bytes": st.last_bytes})
                })
                .collect();
            // History rows carry no region or zone: records are shown with the device's current ones.
            let place = h.store.with_device(&dev, |d| {
                (
                    d.inventory.region.as_ref().map(|r| r.to_string()),
                    d.inventory.zone.as_ref().map(|z| z.to_string()),
                )
            });
            (
                place.ok().flatten().map(|p| (streams, p)),
                h.telemetry.history.as_ref().map(|x| x.path().to_owned()),
            )
        })
        .await?;
    let Some((streams, (region, zone))) = streams else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not found",
            format!("no device {id}"),
        ));
    };
    let mut out = json!({"device": id.as_str(), "streams": streams});
    let Some(path) = path else {
        out["history"] = json!("off");
        return ok(out);
    };
    let q = Query {
        device: id.to_string(),
        stream: p.stream,
        since: p.since,
        until: p.until,
        after: p.after,
        limit,
        step: p.step,
    };
    let page = tokio::task::spawn_blocking(move || -> Result<Value, history::HistoryError> {
        Ok(match q.step {
            Some(step) => json!({"buckets": history::downsample(&path, &q, step)?}),
            None => {
                let mut page = history::query(&path, &q)?;
                for r in &mut page.records {
                    r.region.clone_from(&region);
                    r.zone.clone_from(&zone);
                }
                json!({"records": page.records, "next_after": page.next_after})
            }
        })
    })
    .await
    .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    if let (Value::Object(o), Value::Object(page)) = (&mut out, page) {
        o.extend(page);
    }
    ok(out)
}

/// `?region=&device=&stream=`: which accepted records a tail shows (all when empty).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TailParams {
    region: Option<String>,
    device: Option<String>,
    stream: Option<String>,
}

impl TailParams {
    fn matches(&self, r: &FeedRecord) -> bool {
        let region = r
            .region
            .as_deref()
            .unwrap_or(flotilla_shared::topics::NO_REGION);
        self.region.as_deref().is_none_or(|x| x == region)
            && self.device.as_deref().is_none_or(|x| x == r.device)
            && self.stream.as_deref().is_none_or(|x| x == r.stream)
    }
}

/// `GET /api/v1/telemetry/tail`: accepted records as they arrive, one server-sent event each (`data:` is the JSON
/// feed record); a subscriber that falls behind gets a `lagged` event saying how many it missed.
pub(super) async fn tail(
    State(s): State<ApiState>,
    headers: HeaderMap,
    params: Result<QueryString<TailParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    s.auth(&headers, Role::Viewer).await?;
    let QueryString(p) = params.map_err(|e| bad(e.body_text()))?;
    let rx = s.call(|h| h.telemetry.live.subscribe()).await?;
    let stream = futures_util::stream::unfold((rx, p), |(mut rx, p)| async move {
        loop {
            let ev = match rx.recv().await {
                Ok(r) if p.matches(&r) => Event::default()
                    .event("record")
                    .data(serde_json::to_string(&*r).unwrap_or_default()),
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    Event::default().event("lagged").data(n.to_string())
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            return Some((Ok::<_, std::convert::Infallible>(ev), (rx, p)));
        }
    });
    let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
    // Proxies must pass events through as they come.
    Ok(([("x-accel-buffering", "no")], sse).into_response())
}
