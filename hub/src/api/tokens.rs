//! Credentials and audit: enrollment tokens, API tokens, the audit log.

use super::{ApiResult, ApiState, Problem, Role, ok};
use crate::hub::{HubError, unix_now};
use crate::store::TokenPresets;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::{Value, json};

pub(super) async fn enroll_token(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
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

pub(super) async fn create_api_token(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
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
    // Names are how tokens are listed, revoked (in a URL path) and named in the audit log.
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
    {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid request",
            "name: 1 to 64 of letters, digits, '.', '_', '-' and '@'",
        ));
    }
    if Role::parse(&role).is_none() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid request",
            format!("role {role:?} is not viewer, operator or admin"),
        ));
    }
    // Optional lifetime: a token for a contractor or a CI job should not outlive its purpose.
    let ttl = match v.get("ttl_secs") {
        None | Some(Value::Null) => None,
        Some(t) => match t.as_u64() {
            Some(t) if (1..=MAX_TOKEN_TTL_SECS).contains(&t) => Some(t),
            _ => {
                return Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid request",
                    format!("ttl_secs: a whole number of seconds from 1 to {MAX_TOKEN_TTL_SECS}"),
                ));
            }
        },
    };
    // Optional region scope: the token sees and acts only on devices, deployments and rollouts in these regions.
    let regions = match v.get("regions") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => {
            let mut out = Vec::new();
            for r in a {
                let Some(r) = r.as_str().filter(|r| {
                    flotilla_shared::Label::new(r.to_string()).is_ok() && !r.contains(',')
                }) else {
                    return Err(Problem::new(
                        StatusCode::BAD_REQUEST,
                        "invalid request",
                        format!("regions: {r} is not a region name"),
                    ));
                };
                out.push(r.to_owned());
            }
            if out.is_empty() {
                return Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid request",
                    "regions: name at least one region, or leave it out for the whole fleet",
                ));
            }
            out.sort();
            out.dedup();
            Some(out)
        }
        Some(_) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid request",
                "regions: a list of region names",
            ));
        }
    };
    // An admin makes and revokes tokens and reads the whole audit log: a fleet-wide power by nature.
    if regions.is_some() && role == "admin" {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid request",
            "an admin token cannot be limited to regions (use operator or viewer)",
        ));
    }
    let token = format!("fat_{}", flotilla_shared::trust::random_hex(20));
    let t = token.clone();
    let now = unix_now();
    let expires_at = ttl.map(|t| now + t);
    let shown = json!({"token": token, "name": name, "expires_at": expires_at, "regions": regions});
    s.call(move |h| -> Result<(), HubError> {
        // Names identify tokens for listing and revocation: one live token per name.
        if h.store.api_tokens()?.iter().any(|tok| tok.name == name) {
            return Err(HubError::Conflict(format!(
                "a token named {name} exists; revoke it first or pick another name"
            )));
        }
        let until = expires_at.map_or("no expiry".to_owned(), |at| format!("expires at {at}"));
        let scope = regions
            .as_ref()
            .map_or("the whole fleet".to_owned(), |r| r.join(","));
        h.store.add_api_token(
            &t,
            &crate::store::ApiToken {
                name: name.clone(),
                role: role.clone(),
                created_at: now,
                expires_at,
                regions,
            },
        )?;
        h.store.audit(
            now,
            &who,
            "api-token",
            &format!("{name} as {role} for {scope}, {until}"),
        )?;
        Ok(())
    })
    .await??;
    Ok((StatusCode::CREATED, Json(shown)).into_response())
}

/// Ten years: longer lifetimes are "no expiry", which is said by leaving `ttl_secs` out.
const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// `GET /api/v1/tokens`: every API token's name, role, creation and expiry (never a secret: only hashes are kept).
pub(super) async fn api_tokens(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    s.auth(&headers, Role::Admin).await?;
    let rows = s
        .call(|h| h.store.api_tokens())
        .await?
        .map_err(HubError::from)?;
    let now = unix_now();
    ok(Value::Array(
        rows.into_iter()
            .map(|t| {
                json!({"name": t.name, "role": t.role, "created_at": t.created_at, "expires_at": t.expires_at,
                       "expired": t.expires_at.is_some_and(|at| at <= now), "regions": t.regions})
            })
            .collect(),
    ))
}

/// `DELETE /api/v1/tokens/{name}`: the token stops working at once. The last admin token cannot be revoked (the
/// hub would have no one left to make tokens).
pub(super) async fn revoke_api_token(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let who = s.auth(&headers, Role::Admin).await?;
    let revoked = name.clone();
    s.call(move |h| -> Result<(), HubError> {
        let tokens = h.store.api_tokens()?;
        let now = unix_now();
        let Some(found) = tokens.iter().find(|t| t.name == name) else {
            return Err(HubError::NotFound(format!("no API token named {name}")));
        };
        let live_admins = tokens
            .iter()
            .filter(|t| {
                t.role == "admin" && t.name != name && t.expires_at.is_none_or(|at| at > now)
            })
            .count();
        if found.role == "admin" && live_admins == 0 {
            return Err(HubError::Conflict(format!(
                "{name} is the last admin token; make another admin token before revoking it"
            )));
        }
        h.store.revoke_api_token(&name)?;
        h.store.audit(now, &who, "api-token-revoke", &name)?;
        Ok(())
    })
    .await??;
    ok(json!({"revoked": revoked}))
}

/// `GET /api/v1/audit?who=&action=&q=&limit=`: the newest entries first (denied attempts have action `denied`).
pub(super) async fn audit(
    State(s): State<ApiState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<std::collections::BTreeMap<String, String>>,
) -> ApiResult {
    s.auth(&headers, Role::Admin).await?;
    let bad = |m: String| Problem::new(StatusCode::BAD_REQUEST, "invalid query", m);
    if let Some(k) = q
        .keys()
        .find(|k| !["who", "action", "q", "limit"].contains(&k.as_str()))
    {
        return Err(bad(format!(
            "unknown parameter {k:?} (who, action, q, limit)"
        )));
    }
    let limit = match q.get("limit") {
        None => 200,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| bad("limit: 1..10000".into()))?,
    };
    let nonempty = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    let filter = crate::store::AuditFilter {
        who: nonempty("who"),
        action: nonempty("action"),
        text: nonempty("q"),
    };
    let rows = s
        .call(move |h| h.store.audit_log(limit, &filter))
        .await?
        .map_err(HubError::from)?;
    ok(Value::Array(
        rows.into_iter().map(|(at, who, action, detail)| json!({"at": at, "who": who, "action": action, "detail": detail})).collect(),
    ))
}

/// `POST /api/v1/feed-credentials {"name": .., "regions": [..]}`: a read-only MQTT credential for telemetry of
/// those regions. The password is in this response only.
pub(super) async fn create_feed_credential(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let who = s.auth(&headers, Role::Admin).await?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid JSON", e.to_string()))?;
    let name = v["name"].as_str().unwrap_or_default().to_owned();
    let regions: Vec<String> = v["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    let c = s
        .call(move |h| h.create_feed_credential(&name, regions, &who))
        .await??;
    Ok((
        StatusCode::CREATED,
        Json(json!({"username": c.username, "password": c.password, "client_id": c.client_id})),
    )
        .into_response())
}

/// `GET /api/v1/whoami`: the calling token's name, role, expiry and regions (the console's log-in checks a token
/// with it; the CLI shows it).
pub(super) async fn whoami(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    let c = s.auth_scoped(&headers, Role::Viewer).await?;
    ok(
        json!({"name": c.name, "role": c.role.as_str(), "expires_at": c.expires_at, "regions": c.regions}),
    )
}
