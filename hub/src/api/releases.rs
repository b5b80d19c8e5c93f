//! Artifacts and releases: uploading an artifact, pushing a signed release, listing releases.

use super::{ApiResult, ApiState, Problem, Role, ok};
use crate::hub::{HubError, unix_now};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use flotilla_shared::codec::decode_exact;
use flotilla_shared::wire::Signed;
use serde_json::{Value, json};

pub(super) async fn upload_artifact(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
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

pub(super) async fn push_release(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
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

/// `GET /api/v1/releases`: the release catalogue. Releases belong to no region, so region-scoped tokens read it
/// too (they name releases in the specs they apply within their regions).
pub(super) async fn releases(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    s.auth_scoped(&headers, Role::Viewer).await?;
    let v = s
        .call(|h| -> Result<Value, HubError> {
            Ok(Value::Array(
                h.store
                    .releases()?
                    .iter()
                    .map(|r| {
                        json!({"name": r.release.name.as_str(), "version": r.release.version, "epoch": r.release.epoch,
                           "digest": r.digest.to_hex(), "artifact": r.release.artifact_digest.to_hex(),
                           "size": r.release.artifact_size, "created_at": r.created_at,
                           "precompiled": r.release.precompiled.iter().map(|p| p.target.as_str()).collect::<Vec<_>>()})
                    })
                    .collect(),
            ))
        })
        .await??;
    ok(v)
}
