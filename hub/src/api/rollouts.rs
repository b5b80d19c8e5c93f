//! Rollouts: status, the report, and operator commands (pause, resume, abort, approve, retry).

use super::{ApiResult, ApiState, Caller, Problem, Role, ok};
use crate::hub::HubError;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

/// Refuses a region-scoped caller unless every device of the rollout (in a wave or left out) lies in its regions:
/// a rollout that spans other regions can be neither watched nor commanded by it.
async fn require_rollout_scope(s: &ApiState, caller: &Caller, name: &str) -> Result<(), Problem> {
    if caller.regions.is_none() {
        return Ok(());
    }
    let n = name.to_owned();
    let regions = s
        .call(move |h| -> Result<Vec<Option<String>>, HubError> {
            let r = h.rollout(&n)?;
            Ok(r.rollout
                .status
                .keys()
                // Unknown, without a region, or unreadable: outside every scope.
                .map(|d| h.store.device_region(d).ok().flatten().flatten())
                .collect())
        })
        .await??;
    s.require_regions(
        caller,
        &format!("the rollout of {name}"),
        regions.iter().map(Option::as_deref),
    )
    .await
}

/// A rollout's phase in words (`wave 2 of 3`, `awaiting approval for wave 2`, `completed`, `aborted: ...`).
fn phase_text(ro: &flotilla_hub_core::rollout::Rollout) -> String {
    use flotilla_hub_core::rollout::Phase;
    match &ro.phase {
        Phase::Wave(w) => format!("wave {} of {}", w + 1, ro.waves.len()),
        Phase::AwaitingApproval(w) => format!("awaiting approval for wave {}", w + 1),
        Phase::Completed => "completed".into(),
        Phase::Aborted { reason } => format!("aborted: {reason}"),
    }
}

/// Seconds left of the current wave's soak, while it soaks.
fn soak_left(ro: &flotilla_hub_core::rollout::Rollout, now: u64) -> Option<u64> {
    use flotilla_hub_core::rollout::Phase;
    match ro.phase {
        Phase::Wave(_) => ro
            .soak_start
            .map(|t| (t + ro.plan.soak_secs).saturating_sub(now)),
        _ => None,
    }
}

/// `GET /api/v1/rollouts`: every rollout the caller may see (a region-scoped token: those wholly within its
/// regions), with its phase and device counts per status.
pub(super) async fn rollouts(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    let v = s
        .call(move |h| -> Value {
            let now = crate::hub::unix_now();
            h.rollouts
                .iter()
                .filter(|(_, r)| {
                    r.rollout
                        .status
                        .keys()
                        .all(|d| caller.sees(h.store.device_region(d).ok().flatten().flatten().as_deref()))
                })
                .map(|(name, r)| {
                    let ro = &r.rollout;
                    let mut counts = std::collections::BTreeMap::<&str, u32>::new();
                    for st in ro.status.values() {
                        *counts.entry(st.name()).or_default() += 1;
                    }
                    json!({"deployment": name, "phase": phase_text(ro), "paused": ro.paused,
                           "finished": ro.is_finished(), "waves": ro.waves.len(), "devices": ro.status.len(),
                           "counts": counts, "started_at": ro.started_at, "finished_at": ro.finished_at,
                           "soak_left_secs": soak_left(ro, now)})
                })
                .collect()
        })
        .await?;
    ok(v)
}

pub(super) async fn rollout_status(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    require_rollout_scope(&s, &caller, &name).await?;
    let v = s
        .call(move |h| -> Result<Value, HubError> {
            let r = h.rollout(&name)?;
            let ro = &r.rollout;
            let phase = phase_text(ro);
            let now = crate::hub::unix_now();
            let current_wave = match ro.phase {
                flotilla_hub_core::rollout::Phase::Wave(w) | flotilla_hub_core::rollout::Phase::AwaitingApproval(w) => Some(w + 1),
                _ => None,
            };
            // Regions of the rollout with a maintenance window, and whether it is open now (for the device's own
            // clock where a window follows it, the hub's otherwise).
            let windows: Vec<Value> = ro
                .plan
                .windows
                .iter()
                .map(|(region, w)| json!({"region": region, "open": w.contains(now, None)}))
                .collect();
            // The target's releases, to read each device's staging progress from its last report.
            let target: Vec<flotilla_shared::Digest> = h
                .deployments
                .get(&name)
                .and_then(|d| h.resolve(d).ok())
                .map(|specs| specs.iter().map(|s| s.release).collect())
                .unwrap_or_default();
            let stage = |d: &flotilla_shared::DeviceId| -> Option<&'static str> {
                use flotilla_hub_core::rollout::DeviceStatus;
                match ro.status.get(d)? {
                    DeviceStatus::Updating { .. } => return Some("applying"),
                    DeviceStatus::Healthy { .. } => return Some("healthy"),
                    _ => {}
                }
                h.store
                    .with_device(d, |row| {
                        let staged = &row.last_report.as_ref()?.staged;
                        let states: Vec<&flotilla_shared::wire::StageState> = target
                            .iter()
                            .filter_map(|t| staged.iter().find(|s| s.release == *t).map(|s| &s.state))
                            .collect();
                        // The least advanced of the target's releases.
                        states
                            .iter()
                            .find(|s| matches!(s, flotilla_shared::wire::StageState::Failed(_)))
                            .or_else(|| states.iter().find(|s| !matches!(s, flotilla_shared::wire::StageState::Staged)))
                            .or(states.first())
                            .map(|s| s.name())
                    })
                    .ok()
                    .flatten()
                    .flatten()
            };
            let waves: Vec<Value> = ro
                .waves
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let devices: Vec<Value> = w
                        .iter()
                        .map(|d| json!({"device": d.as_str(), "status": ro.status.get(d).map(|s| s.name()),
                                      "detail": ro.status.get(d).and_then(|s| s.detail()), "stage": stage(d)}))
                        .collect();
                    json!({"wave": i + 1, "devices": devices})
                })
                .collect();
            let history: Vec<Value> = ro.history.iter().map(|(t, e)| json!({"at": t, "event": e})).collect();
            // Devices in no wave: left out because the release failed on them before.
            let left_out: Vec<Value> = ro
                .status
                .iter()
                .filter(|(d, _)| ro.wave_of(d).is_none())
                .map(|(d, st)| json!({"device": d.as_str(), "status": st.name(), "detail": st.detail()}))
                .collect();
            Ok(json!({"deployment": name, "phase": phase, "paused": ro.paused, "finished": ro.is_finished(),
                      "current_wave": current_wave, "soak_secs": ro.plan.soak_secs, "soak_left_secs": soak_left(ro, now),
                      "manual_approval": ro.plan.manual_approval, "windows": windows,
                      "max_failure_ratio": ro.plan.max_failure_ratio,
                      "on_new": ro.on_new.iter().map(|d| d.as_str()).collect::<Vec<_>>(), "waves": waves,
                      "left_out": left_out, "history": history}))
        })
        .await??;
    ok(v)
}

/// `POST /api/v1/rollouts/{deployment}/{pause|resume|abort|approve}`, with an optional body
/// `{"remark": "..."}` recorded in the rollout's history and the audit log.
pub(super) async fn rollout_action(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    use flotilla_hub_core::rollout::Command;
    let caller = s.auth_scoped(&headers, Role::Operator).await?;
    let cmd = match action.as_str() {
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "abort" => Command::Abort,
        "approve" => Command::Approve,
        other => {
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                "not found",
                format!("unknown rollout action {other:?}"),
            ));
        }
    };
    let bad = |m: String| Problem::new(StatusCode::BAD_REQUEST, "bad request", m);
    let remark = if body.is_empty() {
        None
    } else {
        let v: Value = serde_json::from_slice(&body).map_err(|e| bad(format!("body: {e}")))?;
        match v.get("remark") {
            None | Some(Value::Null) => None,
            Some(Value::String(m))
                if m.chars().count() <= 500 && !m.chars().any(char::is_control) =>
            {
                (!m.trim().is_empty()).then(|| m.trim().to_owned())
            }
            Some(_) => return Err(bad("remark: a line of at most 500 characters".into())),
        }
    };
    require_rollout_scope(&s, &caller, &name).await?;
    let who = caller.name;
    s.call(move |h| h.rollout_command(&name, cmd, &who, remark.as_deref()))
        .await??;
    ok(json!({"ok": true}))
}

/// `GET /api/v1/rollouts/{deployment}/report`: per wave start, end and outcome counts with reasons, the gate
/// evaluations, who did what, total time.
pub(super) async fn rollout_report(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    require_rollout_scope(&s, &caller, &name).await?;
    let v = s
        .call(move |h| -> Result<Value, HubError> {
            let r = h.rollout(&name)?;
            let report = r.rollout.report(crate::hub::unix_now());
            let mut v =
                serde_json::to_value(report).map_err(|e| HubError::Internal(e.to_string()))?;
            v["deployment"] = json!(name);
            Ok(v)
        })
        .await??;
    ok(v)
}

/// `POST /api/v1/rollouts/{deployment}/retry` with `{"device": ID}` (or `{}` for every device): forget the
/// failures of the rollout's releases and give the devices another chance.
pub(super) async fn rollout_retry(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Operator).await?;
    require_rollout_scope(&s, &caller, &name).await?;
    let who = caller.name;
    let bad = |m: String| Problem::new(StatusCode::BAD_REQUEST, "bad request", m);
    let req: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|e| bad(format!("body: {e}")))?
    };
    let device = match req.get("device") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(
            flotilla_shared::DeviceId::new(d.as_str()).map_err(|e| bad(format!("device: {e}")))?,
        ),
        Some(_) => return Err(bad("device: must be a device id".into())),
    };
    let (retried, forgotten) = s
        .call(move |h| h.rollout_retry(&name, device, &who))
        .await??;
    ok(json!({"retried": retried, "forgotten": forgotten}))
}
