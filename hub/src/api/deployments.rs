//! Deployments: apply a spec, list, status, delete.

use super::devices::state_str;
use super::{ApiResult, ApiState, Caller, Problem, Role, ok};
use crate::hub::{Hub, HubError};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use flotilla_shared::wire::WorkloadState;
use serde_json::{Value, json};

/// `?dry_run=true`: report what the apply would change and change nothing.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApplyParams {
    #[serde(default)]
    dry_run: bool,
}

/// Whether a deployment stays within `scope`: its target names regions (placement never leaves them) and all of
/// them are in the scope. A deployment without target regions may place anywhere, so it is outside every scope.
fn within(target_regions: &[String], scope: &std::collections::BTreeSet<String>) -> bool {
    !target_regions.is_empty() && target_regions.iter().all(|r| scope.contains(r))
}

/// Refuses a region-scoped caller unless deployment `name` stays within its regions (an unknown name passes: the
/// call answers 404).
async fn require_deployment_scope(
    s: &ApiState,
    caller: &Caller,
    name: &str,
) -> Result<(), Problem> {
    let Some(scope) = caller.regions.clone() else {
        return Ok(());
    };
    let n = name.to_owned();
    let target = s
        .call(move |h| h.deployments().get(&n).map(|d| d.target.regions.clone()))
        .await?;
    match target {
        Some(t) if !within(&t, &scope) => {
            Err(s.deny(&caller.name, outside(caller, name, &t)).await)
        }
        _ => Ok(()),
    }
}

/// The reason a deployment with `target` regions is outside `caller`'s scope.
fn outside(caller: &Caller, name: &str, target: &[String]) -> String {
    let scope: Vec<String> = caller.regions.iter().flatten().cloned().collect();
    if target.is_empty() {
        format!(
            "{} is limited to {}; deployment {name} names no target regions, so it may place anywhere",
            caller.name,
            scope.join(", ")
        )
    } else {
        format!(
            "{} is limited to {}; deployment {name} targets {}",
            caller.name,
            scope.join(", "),
            target.join(", ")
        )
    }
}

pub(super) async fn apply(
    State(s): State<ApiState>,
    headers: HeaderMap,
    params: Result<axum::extract::Query<ApplyParams>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Operator).await?;
    let axum::extract::Query(params) = params
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid query", e.body_text()))?;
    let file = headers
        .get("x-flotilla-spec-file")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("spec")
        .to_owned();
    let text = String::from_utf8(body.to_vec()).map_err(|_| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid request",
            format!("{file}: not UTF-8"),
        )
    })?;
    // `x-flotilla-force: true` (the CLI's --force): apply even if it removes a workload from every device, or
    // names a region or zone nobody knows yet.
    let force = headers
        .get("x-flotilla-force")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "true");
    // A region-scoped operator applies only specs confined to its regions, and cannot take over a deployment
    // that is not (same name, wider target).
    if let Some(scope) = caller.regions.clone()
        && let Ok(d) = crate::spec::parse(&file, &text)
    {
        if !within(&d.target.regions, &scope) {
            return Err(s
                .deny(
                    &caller.name,
                    outside(&caller, d.name.as_str(), &d.target.regions),
                )
                .await);
        }
        require_deployment_scope(&s, &caller, d.name.as_str()).await?;
    }
    let who = caller.name.clone();
    if params.dry_run {
        let plan = s
            .call(move |h| h.apply_dry_run(&file, &text, force))
            .await??;
        return ok(json!({"dry_run": plan}));
    }
    let (name, rev) = s
        .call(move |h| h.apply(&file, &text, &who, force))
        .await??;
    ok(json!({"deployment": name, "revision": rev}))
}

pub(super) fn deployment_json(h: &Hub, name: &str) -> Result<Value, HubError> {
    let placed = h.store.placements(name)?;
    // By id, so a deployment placed on 10,000 devices is one pass, not 10,000 scans of the fleet.
    let devices: std::collections::HashMap<flotilla_shared::DeviceId, crate::store::DeviceRow> = h
        .store
        .devices()?
        .into_iter()
        .map(|d| (d.id.clone(), d))
        .collect();
    let dep = h
        .deployments()
        .get(name)
        .ok_or_else(|| HubError::NotFound(format!("no deployment {name}")))?;
    let names: Vec<&str> = dep.workloads.iter().map(|w| w.name.as_str()).collect();
    let mut running = 0;
    let mut rows = Vec::new();
    for id in &placed {
        let d = devices.get(id);
        let states: Vec<Value> = names
            .iter()
            .map(|n| {
                let st = d
                    .and_then(|d| d.last_report.as_ref())
                    .and_then(|r| r.workloads.iter().find(|w| w.name.as_str() == *n));
                json!({"workload": n, "state": st.map_or("pending", |w| state_str(w.state))})
            })
            .collect();
        let all_running = d.and_then(|d| d.last_report.as_ref()).is_some_and(|r| {
            names.iter().all(|n| {
                r.workloads
                    .iter()
                    .any(|w| w.name.as_str() == *n && w.state == WorkloadState::Running)
            })
        });
        if all_running {
            running += 1;
        }
        rows.push(json!({"device": id.as_str(), "online": d.is_some_and(|d| d.online), "workloads": states}));
    }
    let revisions: Vec<Value> = h
        .store
        .deployment_revisions(name)?
        .into_iter()
        .map(|(revision, at)| json!({"revision": revision, "at": at}))
        .collect();
    let revision = revisions.last().map(|r| r["revision"].clone());
    Ok(
        json!({"name": name, "revision": revision, "revisions": revisions, "workloads": names,
               "placed": placed.len(), "running": running, "devices": rows, "failed": h.desired.failed.get(name)}),
    )
}

pub(super) async fn deployments(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    let v = s
        .call(move |h| -> Result<Value, HubError> {
            // A region-scoped token sees the deployments confined to its regions.
            let names: Vec<String> = h
                .deployments()
                .iter()
                .filter(|(_, d)| {
                    caller
                        .regions
                        .as_ref()
                        .is_none_or(|scope| within(&d.target.regions, scope))
                })
                .map(|(n, _)| n.clone())
                .collect();
            Ok(Value::Array(
                names
                    .iter()
                    .map(|n| deployment_json(h, n))
                    .collect::<Result<_, _>>()?,
            ))
        })
        .await??;
    ok(v)
}

pub(super) async fn deployment_status(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    require_deployment_scope(&s, &caller, &name).await?;
    let v = s.call(move |h| deployment_json(h, &name)).await??;
    ok(v)
}

pub(super) async fn delete_deployment(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Operator).await?;
    require_deployment_scope(&s, &caller, &name).await?;
    let who = caller.name;
    s.call(move |h| h.delete_deployment(&name, &who)).await??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Sets a deployment's secret from the raw request body. The response names the version, never the value.
pub(super) async fn set_secret(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((deployment, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Operator).await?;
    require_deployment_scope(&s, &caller, &deployment).await?;
    let who = caller.name;
    let (d, n) = (deployment.clone(), name.clone());
    let version = s.call(move |h| h.set_secret(&d, &n, &body, &who)).await??;
    ok(json!({"deployment": deployment, "secret": name, "version": version}))
}

/// A deployment's secrets: names, versions and sizes only (write-only values).
pub(super) async fn list_secrets(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(deployment): Path<String>,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    require_deployment_scope(&s, &caller, &deployment).await?;
    let d = deployment.clone();
    let rows = s.call(move |h| h.list_secrets(&d)).await??;
    let secrets: Vec<Value> = rows
        .into_iter()
        .map(|(name, version, size, updated_at)| {
            json!({"name": name, "version": version, "bytes": size, "updated_at": updated_at})
        })
        .collect();
    ok(json!({"deployment": deployment, "secrets": secrets}))
}

/// `?from=REV&to=REV`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DiffQuery {
    from: u64,
    to: u64,
}

/// `GET /api/v1/deployments/{name}/diff?from=REV&to=REV`: what changed between two kept revisions.
pub(super) async fn deployment_diff(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    query: Result<axum::extract::Query<DiffQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    require_deployment_scope(&s, &caller, &name).await?;
    let axum::extract::Query(q) = query.map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid request",
            format!("query: {}", e.body_text()),
        )
    })?;
    let v = s
        .call(move |h| h.deployment_diff(&name, q.from, q.to))
        .await??;
    ok(serde_json::to_value(v).map_err(|e| HubError::Internal(e.to_string()))?)
}

/// `GET /api/v1/deployments/{name}/revisions/{rev}`: the spec text of a kept revision.
pub(super) async fn deployment_revision(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((name, rev)): Path<(String, u64)>,
) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    require_deployment_scope(&s, &caller, &name).await?;
    let n = name.clone();
    let spec = s
        .call(move |h| h.store.deployment_revision(&n, rev))
        .await?
        .map_err(HubError::from)?
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "not found",
                format!("deployment {name} has no kept revision {rev}"),
            )
        })?;
    ok(json!({"deployment": name, "revision": rev, "spec": spec}))
}
