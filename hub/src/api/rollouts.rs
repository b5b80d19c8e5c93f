//! Rollouts: status and operator commands (pause, resume, abort, approve).

use super::{ApiResult, ApiState, Problem, Role, ok};
use crate::hub::HubError;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

pub(super) async fn rollout_status(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    s.auth(&headers, Role::Viewer).await?;
    let v = s
        .call(move |h| -> Result<Value, HubError> {
            let r = h.rollouts.get(&name).ok_or_else(|| HubError::NotFound(format!("no rollout for deployment {name}")))?;
            let ro = &r.rollout;
            let phase = match &ro.phase {
                flotilla_hub_core::rollout::Phase::Wave(w) => format!("wave {} of {}", w + 1, ro.waves.len()),
                flotilla_hub_core::rollout::Phase::AwaitingApproval(w) => format!("awaiting approval for wave {}", w + 1),
                flotilla_hub_core::rollout::Phase::Completed => "completed".into(),
                flotilla_hub_core::rollout::Phase::Aborted { reason } => format!("aborted: {reason}"),
            };
            let waves: Vec<Value> = ro
                .waves
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let devices: Vec<Value> = w
                        .iter()
                        .map(|d| json!({"device": d.as_str(), "status": ro.status.get(d).map(|s| s.name()),
                                      "detail": ro.status.get(d).and_then(|s| s.detail())}))
                        .collect();
                    json!({"wave": i + 1, "devices": devices})
                })
                .collect();
            let history: Vec<Value> = ro.history.iter().map(|(t, e)| json!({"at": t, "event": e})).collect();
            Ok(json!({"deployment": name, "phase": phase, "paused": ro.paused, "finished": ro.is_finished(),
                      "on_new": ro.on_new.iter().map(|d| d.as_str()).collect::<Vec<_>>(), "waves": waves, "history": history}))
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
    let who = s.auth(&headers, Role::Operator).await?;
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
    s.call(move |h| h.rollout_command(&name, cmd, &who))
        .await??;
    ok(json!({"ok": true}))
}
