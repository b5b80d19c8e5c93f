//! The REST API under `/api/v1` (JSON, `application/problem+json` errors, bearer tokens with roles, audit of every
//! mutating call) and Prometheus `/metrics`. Handlers never touch state directly: they send a closure to the hub
//! loop and await its answer.

mod deployments;
mod devices;
mod fleet;
mod metrics;
mod releases;
mod rollouts;
mod telemetry;
mod tokens;

pub(crate) use devices::state_str as state_name;

use crate::hub::{Call, Hub, HubError};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use deployments::{
    apply, delete_deployment, deployment_diff, deployment_revision, deployment_status, deployments,
    list_secrets, set_secret,
};
use devices::{device, devices, logs, revoke, rotate_credentials, why};
use metrics::{metrics, openapi};
use releases::{push_release, releases, upload_artifact};
use rollouts::{rollout_action, rollout_report, rollout_retry, rollout_status, rollouts};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use telemetry::{device_telemetry, tail};
use tokens::{
    api_tokens, audit, create_api_token, create_feed_credential, enroll_token, revoke_api_token,
    whoami,
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

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
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

    /// Checks the bearer token, its expiry and the role the call needs. A denial is answered 403 with the reason
    /// and written to the audit log.
    async fn authenticate(&self, headers: &HeaderMap, need: Role) -> Result<Caller, Problem> {
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
        let t = found
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
        if t.expires_at.is_some_and(|at| at <= crate::hub::unix_now()) {
            return Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!("token {} has expired", t.name),
            ));
        }
        let role = Role::parse(&t.role).unwrap_or(Role::Viewer);
        if role < need {
            return Err(self
                .deny(
                    &t.name,
                    format!("{} has role {role:?}; this call needs {need:?}", t.name),
                )
                .await);
        }
        Ok(Caller {
            name: t.name,
            role,
            expires_at: t.expires_at,
            regions: t.regions.map(|r| r.into_iter().collect()),
        })
    }

    /// For calls that are not region-aware: the caller's name, and a refusal for region-scoped tokens (they see
    /// and act only where each call checks their regions, so a call that does not check refuses them).
    pub(crate) async fn auth(&self, headers: &HeaderMap, need: Role) -> Result<String, Problem> {
        let c = self.authenticate(headers, need).await?;
        if c.regions.is_some() {
            return Err(self
                .deny(
                    &c.name,
                    format!(
                        "{} is limited to regions; this call is for tokens of the whole fleet",
                        c.name
                    ),
                )
                .await);
        }
        Ok(c.name)
    }

    /// For region-aware calls: the caller with its regions, which the call checks.
    pub(crate) async fn auth_scoped(
        &self,
        headers: &HeaderMap,
        need: Role,
    ) -> Result<Caller, Problem> {
        self.authenticate(headers, need).await
    }

    /// Refuses `caller` when device `id` lies outside its regions (an unknown device passes: the call says 404).
    pub(crate) async fn require_device(
        &self,
        caller: &Caller,
        id: &flotilla_shared::DeviceId,
    ) -> Result<(), Problem> {
        if caller.regions.is_none() {
            return Ok(());
        }
        let d = id.clone();
        // A store error refuses (fail closed) rather than passing as "unknown device".
        let region = self
            .call(move |h| h.store.device_region(&d))
            .await?
            .map_err(|e| {
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error",
                    e.to_string(),
                )
            })?;
        match region {
            None => Ok(()),
            Some(r) => {
                self.require_regions(caller, &format!("device {id}"), [r.as_deref()])
                    .await
            }
        }
    }

    /// A 403 with `reason`, written to the audit log as a denied attempt.
    pub(crate) async fn deny(&self, who: &str, reason: String) -> Problem {
        let (w, r) = (who.to_owned(), reason.clone());
        let _ = self
            .call(move |h| h.store.audit(crate::hub::unix_now(), &w, "denied", &r))
            .await;
        Problem::new(StatusCode::FORBIDDEN, "forbidden", reason)
    }

    /// Refuses `caller` unless every region in `regions` is within its scope (None: a device without a region,
    /// which only whole-fleet tokens see).
    pub(crate) async fn require_regions<'a>(
        &self,
        caller: &Caller,
        what: &str,
        regions: impl IntoIterator<Item = Option<&'a str>>,
    ) -> Result<(), Problem> {
        let Some(scope) = &caller.regions else {
            return Ok(());
        };
        let outside: BTreeSet<String> = regions
            .into_iter()
            .filter(|r| r.is_none_or(|r| !scope.contains(r)))
            .map(|r| r.unwrap_or("(no region)").to_owned())
            .collect();
        if outside.is_empty() {
            return Ok(());
        }
        Err(self
            .deny(
                &caller.name,
                format!(
                    "{} is limited to {}; {what} reaches {}",
                    caller.name,
                    scope.iter().cloned().collect::<Vec<_>>().join(", "),
                    outside.into_iter().collect::<Vec<_>>().join(", ")
                ),
            )
            .await)
    }
}

/// Who is calling: the token's name (for the audit log) and, for a region-scoped token, its regions.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub name: String,
    pub role: Role,
    pub expires_at: Option<u64>,
    pub regions: Option<BTreeSet<String>>,
}

impl Caller {
    /// Whether a device in `region` is within this caller's scope.
    pub fn sees(&self, region: Option<&str>) -> bool {
        match (&self.regions, region) {
            (None, _) => true,
            (Some(scope), Some(r)) => scope.contains(r),
            (Some(_), None) => false,
        }
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
        .route("/api/v1/fleet/summary", get(fleet::fleet_summary))
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
        .route(
            "/api/v1/deployments/{name}/revisions/{rev}",
            get(deployment_revision),
        )
        .route("/api/v1/deployments/{name}/secrets", get(list_secrets))
        .route(
            "/api/v1/deployments/{name}/secrets/{secret}",
            post(set_secret),
        )
        .route("/api/v1/why/{device}/{workload}", get(why))
        .route("/api/v1/devices/{device}/logs/{workload}", get(logs))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/tokens", post(create_api_token).get(api_tokens))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/tokens/{name}", delete(revoke_api_token))
        .route("/api/v1/rollouts", get(rollouts))
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
