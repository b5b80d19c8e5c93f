//! The REST API under `/api/v1` (JSON, `application/problem+json` errors, bearer tokens with roles, audit of every
//! mutating call) and Prometheus `/metrics`. Handlers never touch state directly: they send a closure to the hub
//! loop and await its answer.

use crate::hub::{Call, Hub, HubError, unix_now};
use crate::store::TokenPresets;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_shared::DeviceId;
use flotilla_shared::codec::decode_exact;
use flotilla_shared::wire::{Signed, WorkloadState};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

/// Operator roles, ordered by power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Self::Viewer),
            "operator" => Some(Self::Operator),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// Shared state of the HTTP server: the way into the hub loop.
#[derive(Clone, Debug)]
pub struct ApiState {
    pub calls: mpsc::Sender<Call>,
    /// The embedded broker, when this hub runs one: its gauges and counters join `/metrics`.
    pub broker: Option<crate::broker::Broker>,
}

/// An RFC 9457 problem response.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    title: &'static str,
    detail: String,
}

impl Problem {
    fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            title,
            detail: detail.into(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = json!({ "type": "about:blank", "title": self.title, "status": self.status.as_u16(), "detail": self.detail });
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response()
    }
}

impl From<HubError> for Problem {
    fn from(e: HubError) -> Self {
        match e {
            HubError::BadRequest(m) => Problem::new(StatusCode::BAD_REQUEST, "invalid request", m),
            HubError::NotFound(m) => Problem::new(StatusCode::NOT_FOUND, "not found", m),
            HubError::Conflict(m) => Problem::new(StatusCode::CONFLICT, "conflict", m),
            HubError::Internal(m) => {
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error", m)
            }
        }
    }
}

type ApiResult = Result<Response, Problem>;

impl ApiState {
    /// Runs `f` on the hub loop and returns its result.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Hub) -> T + Send + 'static,
    ) -> Result<T, Problem> {
        let (tx, rx) = oneshot::channel();
        let call: Call = Box::new(move |hub| {
            let _ = tx.send(f(hub));
        });
        self.calls.send(call).await.map_err(|_| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "hub stopping",
                "the hub loop is not running",
            )
        })?;
        rx.await.map_err(|_| {
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
                "hub loop dropped the call",
            )
        })
    }

    /// Checks the bearer token and the role it needs; returns the caller's name for the audit log.
    async fn auth(&self, headers: &HeaderMap, need: Role) -> Result<String, Problem> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned)
            .ok_or_else(|| {
                Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing bearer token",
                )
            })?;
        let found = self.call(move |h| h.store.api_token(&token)).await?;
        let (name, role) = found
            .map_err(|e| {
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error",
                    e.to_string(),
                )
            })?
            .ok_or_else(|| {
                Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token")
            })?;
        let role = Role::parse(&role).unwrap_or(Role::Viewer);
        if role < need {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{name} has role {role:?}; this call needs {need:?}"),
            ));
        }
        Ok(name)
    }
}

fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route(
            "/api/v1/health",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{id}", get(device))
        .route("/api/v1/devices/{id}/telemetry", get(device_telemetry))
        .route("/api/v1/enrollment-tokens", post(enroll_token))
        .route("/api/v1/artifacts", post(upload_artifact))
        .route("/api/v1/releases", get(releases).post(push_release))
        .route("/api/v1/deployments", get(deployments).post(apply))
        .route(
            "/api/v1/deployments/{name}",
            get(deployment_status).delete(delete_deployment),
        )
        .route("/api/v1/why/{device}/{workload}", get(why))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/tokens", post(create_api_token))
        .route("/api/v1/rollouts/{deployment}", get(rollout_status))
        .route(
            "/api/v1/rollouts/{deployment}/{action}",
            post(rollout_action),
        )
        .route("/metrics", get(metrics))
        .with_state(state)
        // Largest artifact accepted through the API.
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
}

fn state_str(s: WorkloadState) -> &'static str {
    match s {
        WorkloadState::Downloading => "downloading",
        WorkloadState::Starting => "starting",
        WorkloadState::Running => "running",
        WorkloadState::Exited => "exited",
        WorkloadState::BackingOff => "backing-off",
        WorkloadState::Failed => "failed",
        WorkloadState::HeldByGeofence => "held-by-geofence",
    }
}

fn device_json(h: &Hub, d: &crate::store::DeviceRow) -> Value {
    let desired = h.desired_generation(&d.id);
    let workloads: Vec<Value> = d.last_report.as_ref().map_or(vec![], |r| {
        r.workloads
            .iter()
            .map(|w| {
                let version = h.store.release_by_digest(&w.release).ok().flatten().map(|r| r.release.version);
                json!({"name": w.name.as_str(), "state": state_str(w.state), "healthy": w.healthy,
                       "version": version, "release": w.release.to_hex(), "restarts": w.restarts,
                       "last_error": w.last_error, "rejected": w.rejected.as_ref().map(|r| format!("{r:?}"))})
            })
            .collect()
    });
    let inv = &d.inventory;
    json!({
        "id": d.id.as_str(),
        "online": d.online,
        "last_seen": d.last_seen,
        "offline_since": d.offline_since,
        "region": inv.region.as_ref().map(|r| r.as_str()),
        "zone": inv.zone.as_ref().map(|z| z.as_str()),
        "labels": inv.labels.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
        "location": inv.location.map(|l| json!({"lat": l.lat, "lon": l.lon})),
        "arch": inv.arch, "agent_version": inv.agent_version, "memory_mib": inv.memory_mib,
        "desired_generation": desired,
        "applied_generation": d.last_report.as_ref().map_or(0, |r| r.applied_generation),
        "rejection": d.last_report.as_ref().and_then(|r| r.last_rejection.as_ref()).map(|r| format!("gen {}: {:?}", r.generation, r.reason)),
        "telemetry_dropped": d.last_report.as_ref().map_or(0, |r| r.telemetry_dropped),
        "hold": d.last_report.as_ref().and_then(|r| r.hold.clone()),
        "workloads": workloads,
    })
}

async fn devices(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    s.auth(&headers, Role::Viewer).await?;
    let v = s
        .call(|h| -> Result<Value, HubError> {
            let devs = h.store.devices()?;
            Ok(Value::Array(
                devs.iter().map(|d| device_json(h, d)).collect(),
            ))
        })
        .await??;
    ok(v)
}

async fn device(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    s.auth(&headers, Role::Viewer).await?;
    let id = DeviceId::new(id)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid device id", e.to_string()))?;
    let v = s
        .call(move |h| -> Result<Value, HubError> {
            let devs = h.store.devices()?;
            let d = devs
                .iter()
                .find(|d| d.id == id)
                .ok_or_else(|| HubError::NotFound(format!("no device {id}")))?;
            Ok(device_json(h, d))
        })
        .await??;
    ok(v)
}

async fn enroll_token(State(s): State<ApiState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let who = s.auth(&headers, Role::Operator).await?;
    let v: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid JSON", e.to_string()))?
    };
    let labels = v
        .get("labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let presets = TokenPresets {
        labels,
        region: v.get("region").and_then(Value::as_str).map(str::to_owned),
        zone: v.get("zone").and_then(Value::as_str).map(str::to_owned),
    };
    let ttl = v.get("ttl_secs").and_then(Value::as_u64).unwrap_or(3600);
    // Bulk provisioning: `count` tokens with the same presets in one call (one transaction, one audit entry).
    let count = v.get("count").and_then(Value::as_u64).unwrap_or(1);
    if !(1..=10_000).contains(&count) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid request",
            "count must be 1..10000",
        ));
    }
    let tokens = s
        .call(move |h| h.create_enroll_tokens(presets, ttl, count as usize, &who))
        .await??;
    let body = if count == 1 {
        json!({"token": tokens[0], "expires_in_secs": ttl})
    } else {
        json!({"tokens": tokens, "expires_in_secs": ttl})
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn upload_artifact(State(s): State<ApiState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let who = s.auth(&headers, Role::Operator).await?;
    let len = body.len();
    let digest = s
        .call(move |h| -> Result<_, HubError> {
            let d = h.store.put_blob(&body)?;
            h.store
                .audit(unix_now(), &who, "artifact", &format!("{d} ({len} bytes)"))?;
            Ok(d)
        })
        .await??;
    Ok((
        StatusCode::CREATED,
        Json(json!({"digest": digest.to_hex(), "size": len})),
    )
        .into_response())
}

async fn push_release(State(s): State<ApiState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let who = s.auth(&headers, Role::Operator).await?;
    let signed: Signed = decode_exact(&body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid release",
            format!("not a signed release: {e}"),
        )
    })?;
    let (digest, name) = s.call(move |h| h.push_release(signed, &who)).await??;
    Ok((
        StatusCode::CREATED,
        Json(json!({"digest": digest.to_hex(), "release": name})),
    )
        .into_response())
}

async fn releases(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    s.auth(&headers, Role::Viewer).await?;
    let v = s
        .call(|h| -> Result<Value, HubError> {
            Ok(Value::Array(
                h.store
                    .releases()?
                    .iter()
                    .map(|r| {
                        json!({"name": r.release.name.as_str(), "version": r.release.version, "epoch": r.release.epoch,
                           "digest": r.digest.to_hex(), "artifact": r.release.artifact_digest.to_hex(),
                           "size": r.release.artifact_size, "created_at": r.created_at})
                    })
                    .collect(),
            ))
        })
        .await??;
    ok(v)
}

async fn apply(State(s): State<ApiState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let who = s.auth(&headers, Role::Operator).await?;
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
    let (name, rev) = s.call(move |h| h.apply(&file, &text, &who)).await??;
    ok(json!({"deployment": name, "revision": rev}))
}

fn deployment_json(h: &Hub, name: &str) -> Result<Value, HubError> {
    let placed = h.store.placements(name)?;
    let devices = h.store.devices()?;
    let dep = h
        .deployments()
        .get(name)
        .ok_or_else(|| HubError::NotFound(format!("no deployment {name}")))?;
    let names: Vec<&str> = dep.workloads.iter().map(|w| w.name.as_str()).collect();
    let mut running = 0;
    let mut rows = Vec::new();
    for id in &placed {
        let d = devices.iter().find(|d| &d.id == id);
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
    Ok(
        json!({"name": name, "workloads": names, "placed": placed.len(), "running": running, "devices": rows}),
    )
}

async fn deployments(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    s.auth(&headers, Role::Viewer).await?;
    let v = s
        .call(|h| -> Result<Value, HubError> {
            let names: Vec<String> = h.deployments().keys().cloned().collect();
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

async fn deployment_status(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    s.auth(&headers, Role::Viewer).await?;
    let v = s.call(move |h| deployment_json(h, &name)).await??;
    ok(v)
}

async fn delete_deployment(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let who = s.auth(&headers, Role::Operator).await?;
    s.call(move |h| h.delete_deployment(&name, &who)).await??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn why(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((device, workload)): Path<(String, String)>,
) -> ApiResult {
    s.auth(&headers, Role::Viewer).await?;
    let id = DeviceId::new(device)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid device id", e.to_string()))?;
    let w = workload.clone();
    let text = s.call(move |h| h.why(&id, &w)).await??;
    ok(json!({"workload": workload, "explanation": text}))
}

async fn create_api_token(State(s): State<ApiState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let who = s.auth(&headers, Role::Admin).await?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid JSON", e.to_string()))?;
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let role = v
        .get("role")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if name.is_empty() || name.len() > 64 {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid request",
            "name: 1 to 64 characters",
        ));
    }
    if Role::parse(&role).is_none() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid request",
            format!("role {role:?} is not viewer, operator or admin"),
        ));
    }
    let token = format!("fat_{}", flotilla_shared::trust::random_hex(20));
    let t = token.clone();
    s.call(move |h| -> Result<(), HubError> {
        h.store.add_api_token(&t, &name, &role)?;
        h.store
            .audit(unix_now(), &who, "api-token", &format!("{name} as {role}"))?;
        Ok(())
    })
    .await??;
    Ok((StatusCode::CREATED, Json(json!({"token": token}))).into_response())
}

async fn audit(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    s.auth(&headers, Role::Admin).await?;
    let rows = s
        .call(|h| h.store.audit_log(200))
        .await?
        .map_err(HubError::from)?;
    ok(Value::Array(
        rows.into_iter().map(|(at, who, action, detail)| json!({"at": at, "who": who, "action": action, "detail": detail})).collect(),
    ))
}

async fn metrics(State(s): State<ApiState>) -> ApiResult {
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
                 # TYPE flotilla_reports_total counter\nflotilla_reports_total{{result=\"accepted\"}} {}\nflotilla_reports_total{{result=\"rejected\"}} {}\n\
                 # TYPE flotilla_messages_rejected_total counter\nflotilla_messages_rejected_total {}\n\
                 # TYPE flotilla_chunks_served_total counter\nflotilla_chunks_served_total {}\n\
                 # TYPE flotilla_telemetry_records_total counter\nflotilla_telemetry_records_total {}\n\
                 # TYPE flotilla_report_lag_seconds gauge\nflotilla_report_lag_seconds {}\n",
                total - online,
                m.last_placement_secs,
                m.desired_published,
                m.reports_accepted,
                m.reports_rejected,
                m.messages_rejected,
                m.chunks_served,
                m.telemetry_records,
                m.report_lag_secs,
            ))
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
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

async fn rollout_status(
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
                        .map(|d| json!({"device": d.as_str(), "status": ro.status.get(d).map(|s| format!("{s:?}"))}))
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

async fn rollout_action(
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

async fn device_telemetry(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    s.auth(&headers, Role::Viewer).await?;
    let id = DeviceId::new(id)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid device id", e.to_string()))?;
    let v = s
        .call(move |h| {
            let streams: Vec<Value> = h
                .telemetry
                .range((id.clone(), String::new())..)
                .take_while(|((d, _), _)| d == &id)
                .map(|((_, stream), st)| {
                    json!({"stream": stream, "records": st.records, "gaps": st.gaps, "duplicates": st.duplicates,
                           "last_seq": st.last_seq, "last_at": st.last_at, "metrics": st.metrics, "last_bytes": st.last_bytes})
                })
                .collect();
            json!({"device": id.as_str(), "streams": streams})
        })
        .await?;
    ok(v)
}
