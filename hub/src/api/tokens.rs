//! Credentials and audit: enrollment tokens, API tokens, the audit log.

use super::{ApiResult, ApiState, Problem, Role, ok};
use crate::hub::{HubError, unix_now};
use crate::store::TokenPresets;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
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

pub(super) async fn audit(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    s.auth(&headers, Role::Admin).await?;
    let rows = s
        .call(|h| h.store.audit_log(200))
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
