//! The host API for containers: the same calls and limits a WASM guest has (telemetry, metric, hold, config),
//! as small HTTP endpoints on a per-workload unix socket mounted at `/run/flotilla/api.sock`:
//!
//! ```text
//! POST   /v1/telemetry/{stream}      body: the payload (<= 16 KiB)            -> 204
//! POST   /v1/metrics/{name}          body: a number, e.g. `21.5`               -> 204
//! POST   /v1/hold?secs=N             body: the reason (<= 256 bytes)           -> 204
//! DELETE /v1/hold                                                              -> 204
//! GET    /v1/config                  the workload's `config` bytes             -> 200
//! ```
//!
//! A full event queue answers 429 (the record is dropped and counted, as for WASM). Routing is [`route`], a pure
//! function; [`serve`] is the thin hyper shell around it. Only the one container has the socket's directory
//! mounted, so the socket itself needs no authentication: who can reach it is decided by the mount.

use super::RuntimeEvent;
use bytes::Bytes;
use flotilla_shared::WorkloadName;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use std::path::Path;
use tokio::sync::mpsc;

/// Largest telemetry payload, as for WASM guests.
pub const MAX_TELEMETRY: usize = 16 * 1024;
/// Largest stream or metric name, and hold reason.
const MAX_NAME: usize = 64;
const MAX_REASON: usize = 256;

/// What a request asks of the agent, once routed.
#[derive(Debug, PartialEq)]
pub enum Routed {
    /// Answer with this status and body; nothing for the agent.
    Reply(StatusCode, Vec<u8>),
    /// Send this event to the agent, then answer 204 (or 429 when its queue is full).
    Event(RuntimeEvent),
}

fn bad(status: StatusCode, why: &str) -> Routed {
    Routed::Reply(status, format!("{why}\n").into_bytes())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Routes one request of workload `name` (whose config is `config`).
pub fn route(
    name: &WorkloadName,
    config: &[u8],
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Routed {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::POST, ["v1", "telemetry", stream]) => {
            if !valid_name(stream) {
                return bad(StatusCode::BAD_REQUEST, "stream: 1-64 of a-z A-Z 0-9 _ - .");
            }
            if body.len() > MAX_TELEMETRY {
                return bad(StatusCode::PAYLOAD_TOO_LARGE, "payload above 16 KiB");
            }
            Routed::Event(RuntimeEvent::Telemetry {
                name: name.clone(),
                stream: (*stream).to_owned(),
                payload: body.to_vec(),
            })
        }
        (&Method::POST, ["v1", "metrics", metric]) => {
            if !valid_name(metric) {
                return bad(StatusCode::BAD_REQUEST, "metric: 1-64 of a-z A-Z 0-9 _ - .");
            }
            match std::str::from_utf8(body)
                .ok()
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite())
            {
                Some(value) => Routed::Event(RuntimeEvent::Metric {
                    name: name.clone(),
                    metric: (*metric).to_owned(),
                    value,
                }),
                None => bad(StatusCode::BAD_REQUEST, "body: a finite number"),
            }
        }
        (&Method::POST, ["v1", "hold"]) => {
            let secs = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("secs="))
                .and_then(|v| v.parse::<u32>().ok());
            let Some(secs) = secs else {
                return bad(StatusCode::BAD_REQUEST, "query: secs=N");
            };
            if body.len() > MAX_REASON {
                return bad(StatusCode::PAYLOAD_TOO_LARGE, "reason above 256 bytes");
            }
            Routed::Event(RuntimeEvent::Hold {
                name: name.clone(),
                reason: String::from_utf8_lossy(body).trim().to_owned(),
                secs,
            })
        }
        (&Method::DELETE, ["v1", "hold"]) => Routed::Event(RuntimeEvent::Hold {
            name: name.clone(),
            reason: String::new(),
            secs: 0,
        }),
        (&Method::GET, ["v1", "config"]) => Routed::Reply(StatusCode::OK, config.to_vec()),
        (_, ["v1", "telemetry" | "metrics" | "hold" | "config", ..]) => {
            bad(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => bad(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

/// Serves the host API for `name` on a fresh socket at `socket` until the returned task is aborted.
pub fn serve(
    socket: &Path,
    name: WorkloadName,
    config: Vec<u8>,
    events: mpsc::Sender<RuntimeEvent>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // A socket left by an earlier run (or an earlier agent) is replaced; the container sees the new one through
    // its directory mount.
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    // The container may run as any user; only it has this directory mounted.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
    let config = Bytes::from(config);
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (name, config, events) = (name.clone(), config.clone(), events.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (name, config, events) = (name.clone(), config.clone(), events.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            handle(req, &name, &config, &events).await,
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    }))
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    name: &WorkloadName,
    config: &[u8],
    events: &mpsc::Sender<RuntimeEvent>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    // One byte over the largest accepted body is enough to refuse with the right status.
    let body = match Limited::new(body, MAX_TELEMETRY + 1).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE, b"body too large\n".to_vec()),
    };
    match route(
        name,
        config,
        &parts.method,
        parts.uri.path(),
        parts.uri.query(),
        &body,
    ) {
        Routed::Reply(status, body) => reply(status, body),
        Routed::Event(ev) => match events.try_send(ev) {
            Ok(()) => reply(StatusCode::NO_CONTENT, vec![]),
            Err(_) => reply(
                StatusCode::TOO_MANY_REQUESTS,
                b"the agent's queue is full; the record was dropped\n".to_vec(),
            ),
        },
    }
}

fn reply(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every endpoint and every refusal, with the same limits as the WASM host calls.
    #[test]
    fn routes() {
        let n = WorkloadName::new("web").expect("name");
        let big = vec![b'x'; MAX_TELEMETRY + 1];
        type Case<'a> = (
            Method,
            &'a str,
            Option<&'a str>,
            &'a [u8],
            Result<RuntimeEvent, StatusCode>,
        );
        let cases: Vec<Case> = vec![
            (
                Method::POST,
                "/v1/telemetry/count",
                None,
                b"\x01\x00",
                Ok(RuntimeEvent::Telemetry {
                    name: n.clone(),
                    stream: "count".into(),
                    payload: vec![1, 0],
                }),
            ),
            (
                Method::POST,
                "/v1/telemetry/a b",
                None,
                b"",
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                Method::POST,
                "/v1/telemetry/count",
                None,
                &big,
                Err(StatusCode::PAYLOAD_TOO_LARGE),
            ),
            (
                Method::POST,
                "/v1/metrics/temp",
                None,
                b" 21.5\n",
                Ok(RuntimeEvent::Metric {
                    name: n.clone(),
                    metric: "temp".into(),
                    value: 21.5,
                }),
            ),
            (
                Method::POST,
                "/v1/metrics/temp",
                None,
                b"NaN",
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                Method::POST,
                "/v1/hold",
                Some("secs=30"),
                b"in motion",
                Ok(RuntimeEvent::Hold {
                    name: n.clone(),
                    reason: "in motion".into(),
                    secs: 30,
                }),
            ),
            (
                Method::POST,
                "/v1/hold",
                None,
                b"x",
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                Method::DELETE,
                "/v1/hold",
                None,
                b"",
                Ok(RuntimeEvent::Hold {
                    name: n.clone(),
                    reason: String::new(),
                    secs: 0,
                }),
            ),
            (
                Method::GET,
                "/v1/telemetry/count",
                None,
                b"",
                Err(StatusCode::METHOD_NOT_ALLOWED),
            ),
            (
                Method::GET,
                "/v2/anything",
                None,
                b"",
                Err(StatusCode::NOT_FOUND),
            ),
        ];
        for (m, path, q, body, want) in cases {
            let got = route(&n, b"", &m, path, q, body);
            match (got, want) {
                (Routed::Event(ev), Ok(w)) => {
                    assert_eq!(format!("{ev:?}"), format!("{w:?}"), "{m} {path}")
                }
                (Routed::Reply(s, _), Err(w)) => assert_eq!(s, w, "{m} {path}"),
                (got, want) => panic!("{m} {path}: {got:?} where {want:?}"),
            }
        }
        assert_eq!(
            route(&n, b"a=1\n", &Method::GET, "/v1/config", None, b""),
            Routed::Reply(StatusCode::OK, b"a=1\n".to_vec())
        );
    }
}
