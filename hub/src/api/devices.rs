//! Devices: the registry, one device, and `why` (their telemetry is in `telemetry.rs`).

use super::{ApiResult, ApiState, Problem, Role, ok};
use crate::hub::{Hub, HubError};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use flotilla_shared::DeviceId;
use flotilla_shared::wire::WorkloadState;
use serde_json::{Value, json};
use std::collections::BTreeMap;

pub(crate) fn state_str(s: WorkloadState) -> &'static str {
    match s {
        WorkloadState::Downloading => "downloading",
        WorkloadState::Loading => "loading",
        WorkloadState::Starting => "starting",
        WorkloadState::Running => "running",
        WorkloadState::Exited => "exited",
        WorkloadState::BackingOff => "backing-off",
        WorkloadState::Failed => "failed",
        WorkloadState::HeldByGeofence => "held-by-geofence",
    }
}

/// How a run ended, for the API: a kind plus its detail, and the sentence `why` uses.
fn exit_json(e: &flotilla_shared::wire::ExitCause) -> Value {
    use flotilla_shared::wire::ExitCause;
    let (kind, detail) = match e {
        ExitCause::Code(c) => ("code", json!(c)),
        ExitCause::OomKilled { limit_mib } => ("oom-killed", json!(limit_mib)),
        ExitCause::Unhealthy => ("unhealthy", Value::Null),
    };
    json!({"kind": kind, "detail": detail, "text": e.to_string()})
}

/// Release versions by digest, looked up once per release for a whole listing (not once per device).
pub(super) type Versions = std::collections::HashMap<flotilla_shared::Digest, Option<String>>;

/// The version of release `digest`, looked up in the store once per listing.
pub(super) fn release_version(
    h: &Hub,
    digest: flotilla_shared::Digest,
    versions: &mut Versions,
) -> Option<String> {
    versions
        .entry(digest)
        .or_insert_with(|| {
            h.store
                .release_by_digest(&digest)
                .ok()
                .flatten()
                .map(|r| r.release.version)
        })
        .clone()
}

/// A device as the API shows it: borrowed from the cached row and serialised straight to bytes, so listing
/// 10,000 devices on the hub loop builds no intermediate JSON tree.
#[derive(serde::Serialize)]
pub(super) struct DeviceOut<'a> {
    id: &'a str,
    online: bool,
    last_seen: u64,
    offline_since: Option<u64>,
    region: Option<&'a str>,
    zone: Option<&'a str>,
    labels: std::collections::BTreeMap<&'a str, &'a str>,
    location: Option<LatLonOut>,
    arch: &'a str,
    agent_version: &'a str,
    /// The signed agent release the agent was installed from by a self-update (None: the packaged binary).
    agent_release: Option<&'a str>,
    /// The booted firmware, when the agent manages it.
    firmware: Option<&'a flotilla_shared::wire::FirmwareInventory>,
    memory_mib: u32,
    runtimes: Vec<&'static str>,
    container_engine: Option<EngineOut<'a>>,
    desired_generation: u64,
    applied_generation: u64,
    rejection: Option<String>,
    telemetry_dropped: u64,
    hold: Option<&'a str>,
    revoked: bool,
    workloads: Vec<WorkloadOut<'a>>,
    /// On `GET /api/v1/devices/{id}` only: each workload's config as the device's desired state has it (overrides
    /// by region, zone, labels or device applied).
    #[serde(skip_serializing_if = "Option::is_none")]
    effective_config: Option<BTreeMap<String, String>>,
    /// On `GET /api/v1/devices/{id}` only: its recent reports, summarised, newest first (since the hub started).
    #[serde(skip_serializing_if = "Option::is_none")]
    recent_reports: Option<Vec<crate::fleet::recent::ReportLine>>,
}

#[derive(serde::Serialize)]
struct LatLonOut {
    lat: f64,
    lon: f64,
}

#[derive(serde::Serialize)]
struct EngineOut<'a> {
    name: &'a str,
    api_version: &'a str,
    memory_limit: bool,
    storage_driver: &'a str,
}

#[derive(serde::Serialize)]
struct WorkloadOut<'a> {
    name: &'a str,
    state: &'static str,
    healthy: bool,
    version: Option<String>,
    release: String,
    restarts: u32,
    last_error: Option<&'a str>,
    rejected: Option<String>,
    exit: Option<Value>,
    retry_in_ms: Option<u64>,
}

pub(super) fn device_out<'a>(
    h: &Hub,
    d: &'a crate::store::DeviceRow,
    versions: &mut Versions,
) -> DeviceOut<'a> {
    let report = d.last_report.as_ref();
    let workloads = report.map_or(vec![], |r| {
        r.workloads
            .iter()
            .map(|w| WorkloadOut {
                name: w.name.as_str(),
                state: state_str(w.state),
                healthy: w.healthy,
                version: release_version(h, w.release, versions),
                release: w.release.to_hex(),
                restarts: w.restarts,
                last_error: w.last_error.as_deref(),
                rejected: w.rejected.as_ref().map(ToString::to_string),
                exit: w.exit.map(|e| exit_json(&e)),
                retry_in_ms: w.retry_in_ms,
            })
            .collect()
    });
    let inv = &d.inventory;
    DeviceOut {
        id: d.id.as_str(),
        online: d.online,
        last_seen: d.last_seen,
        offline_since: d.offline_since,
        region: inv.region.as_ref().map(|r| r.as_str()),
        zone: inv.zone.as_ref().map(|z| z.as_str()),
        // Later entries win, as the inventory's merge of token presets over reported labels intends.
        labels: inv
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        location: inv.location.map(|l| LatLonOut {
            lat: l.lat,
            lon: l.lon,
        }),
        arch: &inv.arch,
        agent_version: &inv.agent_version,
        agent_release: inv.agent_release.as_deref(),
        firmware: inv.firmware.as_ref(),
        memory_mib: inv.memory_mib,
        runtimes: inv
            .runtimes
            .iter()
            .map(|k| crate::store::kind_str(*k))
            .collect(),
        container_engine: inv.container_engine.as_ref().map(|e| EngineOut {
            name: &e.name,
            api_version: &e.api_version,
            memory_limit: e.memory_limit,
            storage_driver: &e.storage_driver,
        }),
        desired_generation: h.desired_generation(&d.id),
        applied_generation: report.map_or(0, |r| r.applied_generation),
        rejection: report
            .and_then(|r| r.last_rejection.as_ref())
            .map(|r| format!("generation {}: {}", r.generation, r.reason)),
        telemetry_dropped: report.map_or(0, |r| r.telemetry_dropped),
        hold: report.and_then(|r| r.hold.as_deref()),
        revoked: h.access.is_revoked(&d.id),
        workloads,
        effective_config: None,
        recent_reports: None,
    }
}

/// Each workload's config (the `key=value` text it reads) in the device's stored desired state.
fn effective_config(h: &Hub, id: &DeviceId) -> BTreeMap<String, String> {
    let Ok(Some((_, content, ..))) = h.store.desired(id) else {
        return BTreeMap::new();
    };
    postcard::from_bytes::<Vec<flotilla_shared::wire::WorkloadSpec>>(&content)
        .map(|specs| {
            specs
                .into_iter()
                .map(|w| {
                    (
                        w.name.to_string(),
                        String::from_utf8_lossy(&w.config).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `?limit=N&after=ID`: one page of devices in id order, after device ID; or, with filters, a sort and an offset,
/// the page the console's device list shows. Every filter narrows; the total after filtering is in the
/// `X-Total-Count` header.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Page {
    limit: Option<usize>,
    after: Option<String>,
    offset: Option<usize>,
    region: Option<String>,
    zone: Option<String>,
    /// `key=value`, or `key` for any value.
    label: Option<String>,
    /// One of [`crate::fleet::summary::STATES`].
    state: Option<String>,
    /// Devices whose workloads run this version.
    version: Option<String>,
    /// Part of the device id (case-insensitive).
    q: Option<String>,
    sort: Option<Sort>,
    #[serde(default)]
    desc: bool,
}

/// Columns the device list sorts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Sort {
    Id,
    Region,
    Zone,
    LastSeen,
    Version,
    State,
}

/// Largest page of devices.
const MAX_PAGE: usize = 10_000;

/// Why a device row is kept or not, and the key it sorts by, without building its JSON.
struct Row<'a> {
    d: &'a crate::store::DeviceRow,
    health: crate::fleet::summary::Health,
    version: Option<String>,
}

impl Page {
    fn keeps(&self, r: &Row<'_>) -> bool {
        let inv = &r.d.inventory;
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| Some(w) == have)
        };
        eq(&self.region, inv.region.as_ref().map(|x| x.as_str()))
            && eq(&self.zone, inv.zone.as_ref().map(|x| x.as_str()))
            && self
                .label
                .as_deref()
                .is_none_or(|l| match l.split_once('=') {
                    Some((k, v)) => inv
                        .labels
                        .iter()
                        .any(|(lk, lv)| lk.as_str() == k && lv.as_str() == v),
                    None => inv.labels.iter().any(|(lk, _)| lk.as_str() == l),
                })
            && self
                .state
                .as_deref()
                .is_none_or(|s| r.health.matches(s).unwrap_or(false))
            && self.version.as_deref().is_none_or(|v| {
                r.version
                    .as_deref()
                    .is_some_and(|have| have.split('+').any(|x| x == v))
            })
            && self.q.as_deref().is_none_or(|q| {
                r.d.id
                    .as_str()
                    .to_ascii_lowercase()
                    .contains(&q.to_ascii_lowercase())
            })
    }
}

/// State rank for sorting: failing first, then held, offline, updating, converged.
fn state_rank(h: crate::fleet::summary::Health) -> u8 {
    if h.failing {
        0
    } else if h.held {
        1
    } else if !h.online {
        2
    } else if !h.converged {
        3
    } else {
        4
    }
}

/// `GET /api/v1/devices`: every device, or with `limit` one page of them; a page that is not the last has a
/// `Link: <...>; rel="next"` header (RFC 8288), so the body stays the same JSON array either way.
pub(super) async fn devices(
    State(s): State<ApiState>,
    headers: HeaderMap,
    page: Result<axum::extract::Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, Problem> {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    let axum::extract::Query(page) =
        page.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid query", e.body_text()))?;
    let invalid = |m: String| Problem::new(StatusCode::BAD_REQUEST, "invalid query", m);
    if page.limit.is_some_and(|l| l == 0 || l > MAX_PAGE) {
        return Err(invalid(format!("limit must be 1..={MAX_PAGE}")));
    }
    if let Some(st) = &page.state
        && crate::fleet::summary::Health::default()
            .matches(st)
            .is_none()
    {
        return Err(invalid(format!(
            "state {st:?}: one of {}",
            crate::fleet::summary::STATES
        )));
    }
    if page.after.is_some()
        && (page.offset.is_some() || page.sort.is_some_and(|s| s != Sort::Id) || page.desc)
    {
        return Err(invalid(
            "after pages in id order; use offset with sort".into(),
        ));
    }
    let limit = page.limit.unwrap_or(usize::MAX);
    // The `next` link carries only `limit` and `after`: it is given for plain id-ordered pages only (sorted or
    // filtered pages are addressed by offset, with the total in `X-Total-Count`).
    let plain = page.offset.is_none()
        && page.sort.is_none()
        && !page.desc
        && [
            &page.region,
            &page.zone,
            &page.label,
            &page.state,
            &page.version,
            &page.q,
        ]
        .iter()
        .all(|f| f.is_none());
    let page_limit = page.limit;
    let (body, next, total) = s
        .call(
            move |h| -> Result<(Vec<u8>, Option<String>, usize), HubError> {
                // Borrowed rows serialised straight to bytes: this runs on the hub loop, at 10,000+ devices.
                let mut versions = Versions::new();
                h.store
                    .with_devices(|devs| {
                        // A region-scoped token sees only its regions' devices.
                        let mut rows: Vec<Row<'_>> = devs
                            .filter(|d| {
                                caller.sees(d.inventory.region.as_ref().map(|r| r.as_str()))
                            })
                            .map(|d| Row {
                                d,
                                health: super::fleet::health(h, d),
                                version: super::fleet::version_label(
                                    h,
                                    d.last_report.as_ref(),
                                    &mut versions,
                                ),
                            })
                            .filter(|r| page.keeps(r))
                            .collect();
                        let total = rows.len();
                        // Rows come in id order; a stable sort keeps it as the tie-break.
                        match page.sort.unwrap_or(Sort::Id) {
                            Sort::Id => {}
                            Sort::Region => {
                                rows.sort_by(|a, b| a.d.inventory.region.cmp(&b.d.inventory.region))
                            }
                            Sort::Zone => {
                                rows.sort_by(|a, b| a.d.inventory.zone.cmp(&b.d.inventory.zone))
                            }
                            Sort::LastSeen => rows.sort_by_key(|r| r.d.last_seen),
                            Sort::Version => rows.sort_by(|a, b| a.version.cmp(&b.version)),
                            Sort::State => rows.sort_by_key(|r| state_rank(r.health)),
                        }
                        if page.desc {
                            rows.reverse();
                        }
                        let mut rows = rows
                            .into_iter()
                            .skip_while(|r| {
                                page.after.as_deref().is_some_and(|a| r.d.id.as_str() <= a)
                            })
                            .skip(page.offset.unwrap_or(0))
                            .peekable();
                        let mut out = Vec::new();
                        while out.len() < limit {
                            let Some(r) = rows.next() else { break };
                            out.push(device_out(h, r.d, &mut versions));
                        }
                        let next = rows.peek().and(out.last().map(|d| d.id.to_owned()));
                        serde_json::to_vec(&out)
                            .map(|b| (b, next, total))
                            .map_err(|e| HubError::Internal(e.to_string()))
                    })
                    .map_err(HubError::from)?
            },
        )
        .await??;
    let mut resp = (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    resp.headers_mut()
        .insert("x-total-count", axum::http::HeaderValue::from(total));
    if let (Some(after), Some(limit), true) = (next, page_limit, plain)
        && let Ok(link) = axum::http::HeaderValue::from_str(&format!(
            "</api/v1/devices?limit={limit}&after={after}>; rel=\"next\""
        ))
    {
        resp.headers_mut().insert(axum::http::header::LINK, link);
    }
    Ok(resp)
}

pub(super) async fn device(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    let id = device_id(id)?;
    s.require_device(&caller, &id).await?;
    let v = s
        .call(move |h| -> Result<Value, HubError> {
            let mut versions = Versions::new();
            h.store
                .with_device(&id, |d| {
                    let mut out = device_out(h, d, &mut versions);
                    out.effective_config = Some(effective_config(h, &id));
                    out.recent_reports = Some(h.recent_reports.of(&id));
                    serde_json::to_value(out).unwrap_or(Value::Null)
                })?
                .ok_or_else(|| HubError::NotFound(format!("no device {id}")))
        })
        .await??;
    ok(v)
}

/// A device id from the path, or a 400 naming what is wrong with it.
pub(super) fn device_id(id: String) -> Result<DeviceId, Problem> {
    DeviceId::new(id)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid device id", e.to_string()))
}

pub(super) async fn why(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((device, workload)): Path<(String, String)>,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    let id = device_id(device)?;
    s.require_device(&caller, &id).await?;
    let w = workload.clone();
    let text = s.call(move |h| h.why(&id, &w)).await??;
    ok(json!({"workload": workload, "explanation": text}))
}

/// `GET /api/v1/devices/{id}/logs/{workload}?lines=N`: the workload's last output lines, asked of the device
/// over MQTT (so the device must be online).
pub(super) async fn logs(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((device, workload)): Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<std::collections::BTreeMap<String, String>>,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    let id = device_id(device)?;
    s.require_device(&caller, &id).await?;
    let name = flotilla_shared::WorkloadName::new(workload.clone()).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid workload name",
            e.to_string(),
        )
    })?;
    let lines = match q.get("lines") {
        None => 100,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| {
                Problem::new(StatusCode::BAD_REQUEST, "invalid lines", "lines: 1..10000")
            })?,
    };
    let target = id.clone();
    let rx = s
        .call(move |h| -> Result<_, HubError> {
            if h.store.device(&target)?.is_none() {
                return Err(HubError::NotFound(format!("no device {target}")));
            }
            h.request_logs(&target, name, lines)
                .map_err(HubError::Internal)
        })
        .await??;
    match tokio::time::timeout(crate::fleet::logs::PENDING_FOR, rx).await {
        Ok(Ok(resp)) => match resp.error {
            None => ok(json!({"device": id.as_str(), "workload": workload, "text": resp.text})),
            Some(e) => Err(Problem::new(StatusCode::CONFLICT, "no logs", e)),
        },
        _ => Err(Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "device did not answer",
            format!(
                "{id} did not answer within {} s (offline, or an agent too old for `logs`)",
                crate::fleet::logs::PENDING_FOR.as_secs()
            ),
        )),
    }
}

pub(super) async fn revoke(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let who = s.auth(&headers, Role::Admin).await?;
    let id = device_id(id)?;
    let device = id.to_string();
    let closed = s.call(move |h| h.revoke_device(&id, &who)).await??;
    ok(json!({"device": device, "revoked": true, "connections_closed": closed}))
}

pub(super) async fn rotate_credentials(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let who = s.auth(&headers, Role::Admin).await?;
    let id = device_id(id)?;
    let device = id.to_string();
    let online = s
        .call(move |h| h.rotate_device_credentials(&id, &who))
        .await??;
    ok(json!({"device": device, "rotation_requested": true, "online": online}))
}
