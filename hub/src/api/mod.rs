//! The REST API under `/api/v1` (JSON, `application/problem+json` errors, bearer tokens with roles, audit of every
//! mutating call) and Prometheus `/metrics`. Handlers never touch state directly: they send a closure to the hub
//! loop and await its answer.

mod deployments;
mod devices;
mod metrics;
mod releases;
mod rollouts;
mod telemetry;
mod tokens;

use crate::hub::{Call, Hub, HubError};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use deployments::{
    apply, delete_deployment, deployment_diff, deployment_status, deployments, list_secrets,
    set_secret,
};
use devices::{device, devices, logs, revoke, rotate_credentials, why};
use metrics::{metrics, openapi};
use releases::{push_release, releases, upload_artifact};
use rollouts::{rollout_action, rollout_report, rollout_retry, rollout_status};
use serde_json::{Value, json};
use telemetry::{device_telemetry, tail};
use tokens::{
    api_tokens, audit, create_api_token, create_feed_credential, enroll_token, revoke_api_token,
};
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
    pub broker: Option<crate::embedded::Broker>,
    /// The SLI metrics; the API observes its own latency into them.
    pub slis: crate::slis::Slis,
}

/// Observes every request's latency by method, matched route and status (`flotilla_api_request_duration_seconds`).
async fn observe_latency(
    axum::extract::State(slis): axum::extract::State<crate::slis::Slis>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let resp = next.run(req).await;
    slis.api_latency
        .get_or_create(&crate::slis::ApiLabels {
            method,
            route,
            status: resp.status().as_u16().to_string(),
        })
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// An RFC 9457 problem response.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    title: &'static str,
    detail: String,
}

impl Problem {
    pub(crate) fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
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
            HubError::Policy(m) => {
                Problem::new(StatusCode::FORBIDDEN, "refused by the admission policy", m)
            }
            HubError::Internal(m) => {
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error", m)
            }
        }
    }
}

pub(crate) type ApiResult = Result<Response, Problem>;

impl ApiState {
    /// Runs `f` on the hub loop and returns its result.
    pub(crate) async fn call<T: Send + 'static>(
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
    pub(crate) async fn auth(&self, headers: &HeaderMap, need: Role) -> Result<String, Problem> {
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
        let (name, role, expires_at) = found
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
        if expires_at.is_some_and(|at| at <= crate::hub::unix_now()) {
            return Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!("token {name} has expired"),
            ));
        }
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

pub(crate) fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}

pub fn router(state: ApiState) -> Router {
    let slis = state.slis.clone();
    Router::new()
        .route(
            "/api/v1/health",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{id}", get(device))
        .route("/api/v1/devices/{id}/telemetry", get(device_telemetry))
        .route("/api/v1/telemetry/tail", get(tail))
        .route("/api/v1/devices/{id}/revoke", post(revoke))
        .route(
            "/api/v1/devices/{id}/rotate-credentials",
            post(rotate_credentials),
        )
        .route("/api/v1/feed-credentials", post(create_feed_credential))
        .route("/api/v1/enrollment-tokens", post(enroll_token))
        .route("/api/v1/artifacts", post(upload_artifact))
        .route("/api/v1/releases", get(releases).post(push_release))
        .route("/api/v1/deployments", get(deployments).post(apply))
        .route(
            "/api/v1/deployments/{name}",
            get(deployment_status).delete(delete_deployment),
        )
        .route("/api/v1/deployments/{name}/diff", get(deployment_diff))
        .route("/api/v1/deployments/{name}/secrets", get(list_secrets))
        .route(
            "/api/v1/deployments/{name}/secrets/{secret}",
            post(set_secret),
        )
        .route("/api/v1/why/{device}/{workload}", get(why))
        .route("/api/v1/devices/{device}/logs/{workload}", get(logs))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/tokens", post(create_api_token).get(api_tokens))
        .route("/api/v1/tokens/{name}", delete(revoke_api_token))
        .route("/api/v1/rollouts/{deployment}", get(rollout_status))
        .route("/api/v1/rollouts/{deployment}/report", get(rollout_report))
        .route("/api/v1/rollouts/{deployment}/retry", post(rollout_retry))
        .route(
            "/api/v1/rollouts/{deployment}/{action}",
            post(rollout_action),
        )
        .route("/metrics", get(metrics))
        .with_state(state)
        // `route_layer`: runs after routing, so the matched route template is known.
        .route_layer(axum::middleware::from_fn_with_state(slis, observe_latency))
        // Largest artifact accepted through the API.
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
}
