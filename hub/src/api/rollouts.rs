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
            let phase = match &ro.phase {
                flotilla_hub_core::rollout::Phase::Wave(w) => format!("wave {} of {}", w + 1, ro.waves.len()),
                flotilla_hub_core::rollout::Phase::AwaitingApproval(w) => format!("awaiting approval for wave {}", w + 1),
                flotilla_hub_core::rollout::Phase::Completed => "completed".into(),
                flotilla_hub_core::rollout::Phase::Aborted { reason } => format!("aborted: {reason}"),
            };
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
                      "on_new": ro.on_new.iter().map(|d| d.as_str()).collect::<Vec<_>>(), "waves": waves,
                      "left_out": left_out, "history": history}))
        })
        .await??;
    ok(v)
}

pub(super) async fn rollout_action(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
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
    require_rollout_scope(&s, &caller, &name).await?;
    let who = caller.name;
    s.call(move |h| h.rollout_command(&name, cmd, &who))
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
