//! The operator console, served by the hub at `/` beside the API: server-rendered pages (maud), plain forms that
//! work without JavaScript, and one server-sent-events stream per live page that htmx swaps into place.
//!
//! The console is a client of the API, called in-process with the session's token (`tower::ServiceExt::oneshot`
//! on the API router): what a page shows and what a button does pass exactly the API's checks (role, expiry,
//! revocation, region scope, validation), and every denial is answered and audited by the API as for the CLI.
//! Modules: `session` (sessions and CSRF, sans-IO), `model` (what pages show, read from API JSON), `views` (the
//! HTML), `map` (the overview's projection and markers), `live` (the event streams).

// Handlers answer `Result<Response, Response>`: the error is a page or a redirect, built once per request, so its
// size is what a response costs anyway.
#![allow(clippy::result_large_err)]

mod live;
pub mod map;
pub mod model;
pub mod session;
pub mod views;

use crate::api::ApiState;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::Markup;
use serde::de::DeserializeOwned;
use session::{Identity, Session, Sessions};
use std::sync::{Arc, Mutex};
use tower::ServiceExt;
use views::{ApplyOutcome, AuditQuery, DeviceQuery, Frame};

/// The session cookie.
const COOKIE: &str = "flotilla_session";
/// The log-in form's own CSRF cookie (double submit: there is no session yet to hold its token).
const LOGIN_COOKIE: &str = "flotilla_login";

/// Everything the console's handlers share.
#[derive(Clone, Debug)]
pub struct Console {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The API router, called in-process with the session's token.
    api: Router,
    /// For denials the console itself decides (a missing CSRF token): written to the audit log like the API's.
    state: ApiState,
    sessions: Mutex<Sessions>,
    /// Mark cookies `Secure` (the hub is served over TLS, directly or behind a proxy). Also set per request
    /// when a proxy says `X-Forwarded-Proto: https`.
    secure_cookies: bool,
}

/// An answer of the API to an in-process call.
pub(crate) struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// A refusal or failure of the API, as the page shows it.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    status: StatusCode,
    detail: String,
}

impl Reply {
    /// The body as `T` when the call succeeded, else the API's problem detail.
    fn json<T: DeserializeOwned>(&self) -> Result<T, Refusal> {
        if !self.status.is_success() {
            return Err(self.refusal());
        }
        serde_json::from_slice(&self.body).map_err(|e| Refusal {
            status: StatusCode::BAD_GATEWAY,
            detail: format!("the API's answer could not be read: {e}"),
        })
    }

    fn refusal(&self) -> Refusal {
        let detail = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned());
        Refusal {
            status: self.status,
            detail,
        }
    }
}

/// The logged-in operator of a request: the session and its id.
pub(crate) struct Op {
    id: String,
    s: Session,
}

impl Op {
    fn frame(&self) -> Frame<'_> {
        Frame {
            name: &self.s.name,
            role: &self.s.role,
            regions: self.s.regions.as_deref(),
            csrf: &self.s.csrf,
            admin: self.s.is_admin(),
            now: crate::hub::unix_now(),
        }
    }
}

/// A page, a redirect or a refusal.
type Page = Result<Response, Response>;

impl Console {
    pub fn new(api: Router, state: ApiState, secure_cookies: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                api,
                state,
                sessions: Mutex::new(Sessions::default()),
                secure_cookies,
            }),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        // A panic while holding the lock leaves a table that is still consistent (every operation is one map
        // call), so a poisoned lock is used as it is.
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Calls the API in-process as the session's token.
    pub(crate) async fn api(
        &self,
        token: &str,
        method: Method,
        uri: &str,
        body: Option<(Vec<u8>, &str)>,
        extra: &[(&'static str, String)],
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        for (k, v) in extra {
            req = req.header(*k, v);
        }
        let req = match body {
            Some((b, ct)) => req.header(header::CONTENT_TYPE, ct).body(Body::from(b)),
            None => req.body(Body::empty()),
        };
        let failed = |detail: String| Reply {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            headers: HeaderMap::new(),
            body: Bytes::from(serde_json::json!({ "detail": detail }).to_string()),
        };
        let Ok(req) = req else {
            return failed(format!("bad request to {uri}"));
        };
        let resp = match self.inner.api.clone().oneshot(req).await {
            Ok(r) => r,
            Err(e) => match e {},
        };
        let (parts, body) = resp.into_parts();
        match axum::body::to_bytes(body, 256 * 1024 * 1024).await {
            Ok(b) => Reply {
                status: parts.status,
                headers: parts.headers,
                body: b,
            },
            Err(e) => failed(e.to_string()),
        }
    }

    async fn get<T: DeserializeOwned>(&self, op: &Op, uri: &str) -> Result<T, Response> {
        let r = self.api(&op.s.token, Method::GET, uri, None, &[]).await;
        r.json().map_err(|e| self.refused(op, e))
    }

    /// A page for the API's refusal; a token the API no longer accepts ends the session.
    fn refused(&self, op: &Op, e: Refusal) -> Response {
        if e.status == StatusCode::UNAUTHORIZED {
            self.sessions().close(&op.id);
            return Redirect::to("/login").into_response();
        }
        let active = "";
        page_response(
            e.status,
            views::problem(&op.frame(), active, e.status.as_u16(), &e.detail),
        )
    }

    /// The operator behind the request's session cookie, or a redirect to the log-in page.
    fn op(&self, headers: &HeaderMap) -> Result<Op, Response> {
        let id = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| session::cookie_value(c, COOKIE))
            .map(str::to_owned);
        let now = crate::hub::unix_now();
        id.and_then(|id| self.sessions().get(&id, now).map(|s| Op { id, s }))
            .ok_or_else(|| Redirect::to("/login").into_response())
    }

    /// Refuses a state-changing form without the session's CSRF token (403, audited).
    async fn check_csrf(&self, op: &Op, submitted: Option<&str>) -> Result<(), Response> {
        if session::csrf_ok(&op.s, submitted) {
            return Ok(());
        }
        let _ = self
            .inner
            .state
            .deny(&op.s.name, "console form without a valid CSRF token".into())
            .await;
        Err(page_response(
            StatusCode::FORBIDDEN,
            views::problem(
                &op.frame(),
                "",
                403,
                "this form has no valid CSRF token (reload the page and try again)",
            ),
        ))
    }

    fn secure(&self, headers: &HeaderMap) -> bool {
        self.inner.secure_cookies
            || headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("https"))
    }
}

/// 32 random bytes, hex: session ids and CSRF tokens.
fn random_token() -> Result<String, Response> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut b).map_err(|_| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "no randomness for a session",
        )
            .into_response()
    })?;
    Ok(hex::encode(b))
}

fn cookie(name: &str, value: &str, path: &str, max_age: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn page_response(status: StatusCode, m: Markup) -> Response {
    (status, Html(m.into_string())).into_response()
}

fn ok_page(m: Markup) -> Page {
    Ok(page_response(StatusCode::OK, m))
}

/// The console's routes; `api` is the API router it calls in-process.
pub fn router(api: Router, state: ApiState, secure_cookies: bool) -> Router {
    let console = Console::new(api, state, secure_cookies);
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/devices", get(devices))
        .route("/devices/{id}", get(device))
        .route("/releases", get(releases))
        .route("/releases/{digest}", get(release))
        .route("/deployments", get(deployments).post(apply))
        .route("/deployments/{name}", get(deployment))
        .route("/rollouts", get(rollouts))
        .route("/rollouts/{name}", get(rollout))
        .route("/rollouts/{name}/{action}", post(rollout_action))
        .route("/audit", get(audit))
        .route("/events/overview", get(live::overview))
        .route("/events/rollouts/{name}", get(live::rollout))
        .route("/static/{file}", get(static_file))
        .with_state(console)
        .layer(axum::middleware::from_fn(security_headers))
        // Spec uploads are text; 4 MiB is far above any real spec.
        .layer(axum::extract::DefaultBodyLimit::max(4 * 1024 * 1024))
}

/// Content-Security-Policy without inline script or style, no framing, no sniffing, and pages never cached.
async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let is_static = req.uri().path().starts_with("/static/");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !is_static {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// The vendored scripts (see `static/PROVENANCE.md`), the stylesheet and the basemap.
async fn static_file(Path(file): Path<String>) -> Response {
    let (body, ct): (&'static [u8], &str) = match file.as_str() {
        "htmx-2.min.js" => (include_bytes!("static/htmx-2.min.js"), "text/javascript"),
        "hx-sse-2.min.js" => (include_bytes!("static/hx-sse-2.min.js"), "text/javascript"),
        "console.css" => (include_bytes!("static/console.css"), "text/css"),
        "world-110m.svg" => (include_bytes!("static/world-110m.svg"), "image/svg+xml"),
        _ => return (StatusCode::NOT_FOUND, "no such file").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, ct),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

// ---- Log-in and log-out ---------------------------------------------------------------------------------------

async fn login_form(State(c): State<Console>, headers: HeaderMap) -> Page {
    if c.op(&headers).is_ok() {
        return Ok(Redirect::to("/").into_response());
    }
    login_page(&c, &headers, StatusCode::OK, None)
}

fn login_page(c: &Console, headers: &HeaderMap, status: StatusCode, error: Option<&str>) -> Page {
    let csrf = random_token()?;
    let mut resp = page_response(status, views::login(&csrf, error));
    resp.headers_mut().append(
        header::SET_COOKIE,
        cookie(LOGIN_COOKIE, &csrf, "/login", 600, c.secure(headers)),
    );
    Ok(resp)
}

#[derive(serde::Deserialize)]
struct LoginForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    token: String,
}

#[derive(serde::Deserialize)]
struct WhoAmI {
    name: String,
    role: String,
    regions: Option<Vec<String>>,
    expires_at: Option<u64>,
}

async fn login(State(c): State<Console>, headers: HeaderMap, body: Bytes) -> Page {
    // A body that is not a form reads as an empty one, and is refused below for its missing CSRF token.
    let form: LoginForm = serde_urlencoded::from_bytes(&body).unwrap_or(LoginForm {
        csrf: String::new(),
        token: String::new(),
    });
    let expected = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| session::cookie_value(h, LOGIN_COOKIE))
        .unwrap_or("");
    // Double submit: the form's token must equal its cookie, which another site cannot read or set.
    if !session::tokens_match(expected, Some(&form.csrf)) {
        return login_page(
            &c,
            &headers,
            StatusCode::FORBIDDEN,
            Some("The log-in form expired; try again."),
        );
    }
    let token = form.token.trim().to_owned();
    if token.is_empty() {
        return login_page(
            &c,
            &headers,
            StatusCode::UNAUTHORIZED,
            Some("Give an API token."),
        );
    }
    let r = c
        .api(&token, Method::GET, "/api/v1/whoami", None, &[])
        .await;
    let who: WhoAmI = match r.json() {
        Ok(w) => w,
        Err(e) => {
            return login_page(
                &c,
                &headers,
                e.status,
                Some(&format!("Not logged in: {}", e.detail)),
            );
        }
    };
    let id = random_token()?;
    let csrf = random_token()?;
    let now = crate::hub::unix_now();
    let expires_at = c
        .sessions()
        .open(
            id.clone(),
            csrf,
            token,
            Identity {
                name: who.name.clone(),
                role: who.role,
                regions: who.regions,
                expires_at: who.expires_at,
            },
            now,
        )
        .expires_at;
    tracing::info!(token = %who.name, "console log-in");
    let mut resp = Redirect::to("/").into_response();
    let secure = c.secure(&headers);
    let h = resp.headers_mut();
    h.append(
        header::SET_COOKIE,
        cookie(COOKIE, &id, "/", expires_at.saturating_sub(now), secure),
    );
    h.append(
        header::SET_COOKIE,
        cookie(LOGIN_COOKIE, "", "/login", 0, secure),
    );
    Ok(resp)
}

/// A form body (`application/x-www-form-urlencoded`) as a map; a repeated key keeps its last value.
fn form_map(body: &[u8]) -> std::collections::HashMap<String, String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .unwrap_or_default()
        .into_iter()
        .collect()
}

async fn logout(State(c): State<Console>, headers: HeaderMap, body: Bytes) -> Page {
    let op = c.op(&headers)?;
    let form = form_map(&body);
    c.check_csrf(&op, form.get("csrf").map(String::as_str))
        .await?;
    c.sessions().close(&op.id);
    tracing::info!(token = %op.s.name, "console log-out");
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        cookie(COOKIE, "", "/", 0, c.secure(&headers)),
    );
    Ok(resp)
}

// ---- Pages ----------------------------------------------------------------------------------------------------

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct OverviewQuery {
    colour: String,
}

pub(crate) fn colouring(s: &str) -> map::Colouring {
    if s == "version" {
        map::Colouring::Version
    } else {
        map::Colouring::Health
    }
}

async fn overview(
    State(c): State<Console>,
    headers: HeaderMap,
    q: Result<Query<OverviewQuery>, axum::extract::rejection::QueryRejection>,
) -> Page {
    let op = c.op(&headers)?;
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let summary: model::Summary = c.get(&op, "/api/v1/fleet/summary").await?;
    let rollouts: Vec<model::RolloutRow> = c.get(&op, "/api/v1/rollouts").await?;
    ok_page(views::overview(
        &op.frame(),
        &summary,
        &rollouts,
        colouring(&q.colour),
    ))
}

async fn devices(
    State(c): State<Console>,
    headers: HeaderMap,
    q: Result<Query<DeviceQuery>, axum::extract::rejection::QueryRejection>,
) -> Page {
    let op = c.op(&headers)?;
    let (q, mut error) = match q {
        Ok(Query(q)) => (q, None),
        Err(e) => (DeviceQuery::default(), Some(e.body_text())),
    };
    let mut api_q = q.to_query(&q.sort, q.desc, 0);
    if !api_q.is_empty() {
        api_q.push('&');
    }
    api_q.push_str(&format!(
        "limit={}&offset={}",
        views::PAGE_SIZE,
        q.page * views::PAGE_SIZE
    ));
    let r = c
        .api(
            &op.s.token,
            Method::GET,
            &format!("/api/v1/devices?{api_q}"),
            None,
            &[],
        )
        .await;
    let (rows, total) = match r.json::<Vec<model::Device>>() {
        Ok(rows) => {
            let total = r
                .headers
                .get("x-total-count")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(rows.len());
            (rows, total)
        }
        // A bad filter is shown beside the form; a refusal is a page of its own.
        Err(e) if e.status == StatusCode::BAD_REQUEST => {
            error = Some(e.detail);
            (vec![], 0)
        }
        Err(e) => return Err(c.refused(&op, e)),
    };
    ok_page(views::devices(
        &op.frame(),
        &rows,
        total,
        &q,
        error.as_deref(),
    ))
}

async fn device(State(c): State<Console>, headers: HeaderMap, Path(id): Path<String>) -> Page {
    let op = c.op(&headers)?;
    let enc = views::urlencode(&id);
    let d: model::Device = c.get(&op, &format!("/api/v1/devices/{enc}")).await?;
    // `why` for every workload reported or desired here.
    let mut names: Vec<String> = d.workloads.iter().map(|w| w.name.clone()).collect();
    names.extend(d.effective_config.iter().flat_map(|m| m.keys().cloned()));
    names.sort();
    names.dedup();
    let mut why = vec![];
    for n in names.iter().take(32) {
        #[derive(serde::Deserialize)]
        struct Why {
            explanation: String,
        }
        if let Ok(w) = c
            .api(
                &op.s.token,
                Method::GET,
                &format!("/api/v1/why/{enc}/{}", views::urlencode(n)),
                None,
                &[],
            )
            .await
            .json::<Why>()
        {
            why.push((n.clone(), w.explanation));
        }
    }
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Telemetry {
        streams: Vec<model::Stream>,
    }
    let mut t: Telemetry = c
        .api(
            &op.s.token,
            Method::GET,
            &format!("/api/v1/devices/{enc}/telemetry?limit=1"),
            None,
            &[],
        )
        .await
        .json()
        .unwrap_or_default();
    // Sparklines: the last hour of each metric stream in one-minute means, from the telemetry history.
    let since = crate::hub::unix_now().saturating_sub(3600);
    for s in t
        .streams
        .iter_mut()
        .filter(|s| !s.metrics.is_empty())
        .take(8)
    {
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct Buckets {
            buckets: Vec<Bucket>,
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct Bucket {
            metrics: std::collections::BTreeMap<String, Mean>,
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct Mean {
            mean: f64,
        }
        let uri = format!(
            "/api/v1/devices/{enc}/telemetry?stream={}&step=60&since={since}&limit=100",
            views::urlencode(&s.stream)
        );
        let b: Buckets = c
            .api(&op.s.token, Method::GET, &uri, None, &[])
            .await
            .json()
            .unwrap_or_default();
        for bucket in b.buckets {
            for (m, v) in bucket.metrics {
                s.points.entry(m).or_default().push(v.mean);
            }
        }
    }
    let audit: Option<Vec<model::AuditEntry>> = if op.s.is_admin() {
        c.api(
            &op.s.token,
            Method::GET,
            &format!("/api/v1/audit?q={enc}&limit=20"),
            None,
            &[],
        )
        .await
        .json()
        .ok()
    } else {
        None
    };
    ok_page(views::device(
        &op.frame(),
        &d,
        &why,
        &t.streams,
        audit.as_deref(),
    ))
}

async fn releases(State(c): State<Console>, headers: HeaderMap) -> Page {
    let op = c.op(&headers)?;
    let rows: Vec<model::Release> = c.get(&op, "/api/v1/releases").await?;
    ok_page(views::releases(&op.frame(), &rows))
}

async fn release(State(c): State<Console>, headers: HeaderMap, Path(digest): Path<String>) -> Page {
    let op = c.op(&headers)?;
    let rows: Vec<model::Release> = c.get(&op, "/api/v1/releases").await?;
    let Some(r) = rows.into_iter().find(|r| r.digest == digest) else {
        return Err(page_response(
            StatusCode::NOT_FOUND,
            views::problem(
                &op.frame(),
                "/releases",
                404,
                &format!("no release {digest}"),
            ),
        ));
    };
    // Devices running its version, counted by the API's filter (within the caller's regions).
    let uri = format!(
        "/api/v1/devices?version={}&limit=1",
        views::urlencode(&r.version)
    );
    let reply = c.api(&op.s.token, Method::GET, &uri, None, &[]).await;
    let running_on = reply
        .status
        .is_success()
        .then(|| {
            reply
                .headers
                .get("x-total-count")?
                .to_str()
                .ok()?
                .parse()
                .ok()
        })
        .flatten();
    ok_page(views::release(&op.frame(), &r, running_on))
}

async fn deployments(State(c): State<Console>, headers: HeaderMap) -> Page {
    let op = c.op(&headers)?;
    let rows: Vec<model::Deployment> = c.get(&op, "/api/v1/deployments").await?;
    ok_page(views::deployments(
        &op.frame(),
        &rows,
        op.s.can_act(),
        None,
        "",
    ))
}

/// `POST /deployments` (multipart: `csrf`, `spec` text and/or a `file`): applies the spec through the API and
/// shows the outcome inline, the API's validation error word for word, with the spec kept in the form.
async fn apply(State(c): State<Console>, headers: HeaderMap, mut form: Multipart) -> Page {
    let op = c.op(&headers)?;
    let (mut csrf, mut text, mut file, mut file_name) = (None, String::new(), None, None);
    loop {
        match form.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or("").to_owned();
                let fname = field.file_name().map(str::to_owned);
                let Ok(bytes) = field.bytes().await else {
                    break;
                };
                match name.as_str() {
                    "csrf" => csrf = Some(String::from_utf8_lossy(&bytes).into_owned()),
                    "spec" => text = String::from_utf8_lossy(&bytes).into_owned(),
                    "file" if !bytes.is_empty() => {
                        file = Some(bytes.to_vec());
                        file_name = fname;
                    }
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(e) => {
                return Err(page_response(
                    StatusCode::BAD_REQUEST,
                    views::problem(
                        &op.frame(),
                        "/deployments",
                        400,
                        &format!("the form could not be read: {e}"),
                    ),
                ));
            }
        }
    }
    c.check_csrf(&op, csrf.as_deref()).await?;
    // An uploaded file wins over the text box; the text box then shows it, so nothing typed or sent is lost.
    let (body, shown) = match file {
        Some(f) => (f.clone(), String::from_utf8_lossy(&f).into_owned()),
        None => (text.clone().into_bytes(), text),
    };
    let spec_name = file_name.unwrap_or_else(|| "spec".into());
    let r = c
        .api(
            &op.s.token,
            Method::POST,
            "/api/v1/deployments",
            Some((body, "application/toml")),
            &[("x-flotilla-spec-file", spec_name)],
        )
        .await;
    #[derive(serde::Deserialize)]
    struct Applied {
        deployment: String,
        revision: u64,
    }
    let (status, outcome, keep) = match r.json::<Applied>() {
        Ok(a) => (
            StatusCode::OK,
            ApplyOutcome::Applied {
                deployment: a.deployment,
                revision: a.revision,
            },
            String::new(),
        ),
        Err(e) if e.status == StatusCode::UNAUTHORIZED => return Err(c.refused(&op, e)),
        Err(e) => (e.status, ApplyOutcome::Refused(e.detail), shown),
    };
    let rows: Vec<model::Deployment> = c.get(&op, "/api/v1/deployments").await?;
    Ok(page_response(
        status,
        views::deployments(&op.frame(), &rows, op.s.can_act(), Some(&outcome), &keep),
    ))
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct RevQuery {
    rev: Option<u64>,
    from: Option<u64>,
    to: Option<u64>,
}

async fn deployment(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(name): Path<String>,
    q: Result<Query<RevQuery>, axum::extract::rejection::QueryRejection>,
) -> Page {
    let op = c.op(&headers)?;
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let enc = views::urlencode(&name);
    let d: model::Deployment = c.get(&op, &format!("/api/v1/deployments/{enc}")).await?;
    let diff: Option<model::Diff> = match (q.from, q.to) {
        (Some(a), Some(b)) => Some(
            c.get(
                &op,
                &format!("/api/v1/deployments/{enc}/diff?from={a}&to={b}"),
            )
            .await?,
        ),
        _ => None,
    };
    #[derive(serde::Deserialize)]
    struct Spec {
        revision: u64,
        spec: String,
    }
    let spec: Option<Spec> = match q.rev.or(if diff.is_none() { d.revision } else { None }) {
        Some(rev) => Some(
            c.get(&op, &format!("/api/v1/deployments/{enc}/revisions/{rev}"))
                .await?,
        ),
        None => None,
    };
    ok_page(views::deployment(
        &op.frame(),
        &d,
        spec.as_ref().map(|s| (s.revision, s.spec.as_str())),
        diff.as_ref(),
    ))
}

async fn rollouts(State(c): State<Console>, headers: HeaderMap) -> Page {
    let op = c.op(&headers)?;
    let rows: Vec<model::RolloutRow> = c.get(&op, "/api/v1/rollouts").await?;
    ok_page(views::rollouts(&op.frame(), &rows))
}

async fn rollout_page(
    c: &Console,
    op: &Op,
    name: &str,
    status: StatusCode,
    flash: Option<&str>,
) -> Page {
    let enc = views::urlencode(name);
    let r: model::Rollout = c.get(op, &format!("/api/v1/rollouts/{enc}")).await?;
    let rep: model::Report = c.get(op, &format!("/api/v1/rollouts/{enc}/report")).await?;
    Ok(page_response(
        status,
        views::rollout(&op.frame(), &r, &rep, op.s.can_act(), flash),
    ))
}

async fn rollout(State(c): State<Console>, headers: HeaderMap, Path(name): Path<String>) -> Page {
    let op = c.op(&headers)?;
    rollout_page(&c, &op, &name, StatusCode::OK, None).await
}

/// `POST /rollouts/{name}/{pause|resume|approve|abort}` (form: `csrf`, `remark` for approve): the API's command;
/// back to the rollout page, with the API's refusal shown when it refused.
async fn rollout_action(
    State(c): State<Console>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    body: Bytes,
) -> Page {
    let op = c.op(&headers)?;
    let form = form_map(&body);
    c.check_csrf(&op, form.get("csrf").map(String::as_str))
        .await?;
    let body = serde_json::json!({ "remark": form.get("remark").filter(|r| !r.trim().is_empty()) })
        .to_string();
    let uri = format!(
        "/api/v1/rollouts/{}/{}",
        views::urlencode(&name),
        views::urlencode(&action)
    );
    let r = c
        .api(
            &op.s.token,
            Method::POST,
            &uri,
            Some((body.into_bytes(), "application/json")),
            &[],
        )
        .await;
    if r.status.is_success() {
        return Ok(Redirect::to(&format!("/rollouts/{}", views::urlencode(&name))).into_response());
    }
    let e = r.refusal();
    if e.status == StatusCode::UNAUTHORIZED
        || e.status == StatusCode::FORBIDDEN
        || e.status == StatusCode::NOT_FOUND
    {
        return Err(c.refused(&op, e));
    }
    rollout_page(
        &c,
        &op,
        &name,
        e.status,
        Some(&format!("{action} refused: {}", e.detail)),
    )
    .await
}

async fn audit(
    State(c): State<Console>,
    headers: HeaderMap,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Page {
    let op = c.op(&headers)?;
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let mut uri = String::from("/api/v1/audit?limit=500");
    for (k, v) in [("who", &q.who), ("action", &q.action), ("q", &q.q)] {
        if !v.is_empty() {
            uri.push_str(&format!("&{k}={}", views::urlencode(v)));
        }
    }
    let rows: Vec<model::AuditEntry> = c.get(&op, &uri).await?;
    ok_page(views::audit(&op.frame(), &rows, &q))
}

#[cfg(test)]
mod tests;
