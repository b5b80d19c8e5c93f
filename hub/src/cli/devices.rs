//! `flotilla device ls|show`, `flotilla enroll-token create`, `flotilla token`, `flotilla why`, `flotilla logs`.

use super::{Conn, print_json, s};
use anyhow::{Context, Result};
use serde_json::Value;

/// One line per device: presence, region, zone, generations and workloads.
pub fn ls(conn: Conn) -> Result<()> {
    let v = conn.client()?.get("/api/v1/devices")?;
    if conn.json() {
        print_json(&v);
    } else {
        outln!(
            "{:<16} {:<8} {:<12} {:<8} {:>5}/{:<5} WORKLOADS",
            "DEVICE",
            "ONLINE",
            "REGION",
            "ZONE",
            "APPL",
            "WANT"
        );
        for d in v.as_array().into_iter().flatten() {
            let ws: Vec<String> = d["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| format!("{}@{}:{}", s(w, "name"), s(w, "version"), s(w, "state")))
                .collect();
            outln!(
                "{:<16} {:<8} {:<12} {:<8} {:>5}/{:<5} {}",
                s(d, "id"),
                s(d, "online"),
                s(d, "region"),
                s(d, "zone"),
                s(d, "applied_generation"),
                s(d, "desired_generation"),
                ws.join(" ")
            );
        }
    }

    Ok(())
}

/// One device in detail: a readable summary by default, the API's JSON with `-o json`.
pub fn show(id: &str, conn: Conn) -> Result<()> {
    let v = conn.client()?.get(&format!("/api/v1/devices/{id}"))?;
    if conn.json() {
        print_json(&v);
        return Ok(());
    }
    let rows = [
        ("device", s(&v, "id")),
        ("online", s(&v, "online")),
        ("region", s(&v, "region")),
        ("zone", s(&v, "zone")),
        ("arch", s(&v, "arch")),
        ("agent", s(&v, "agent_version")),
        (
            "location",
            match (v["location"]["lat"].as_f64(), v["location"]["lon"].as_f64()) {
                (Some(lat), Some(lon)) => format!("{lat:.3}, {lon:.3}"),
                _ => "-".into(),
            },
        ),
        ("labels", labels(&v["labels"])),
        (
            "generation",
            format!(
                "{} applied / {} desired",
                s(&v, "applied_generation"),
                s(&v, "desired_generation")
            ),
        ),
        ("last seen", s(&v, "last_seen")),
        ("hold", s(&v, "hold")),
        ("rejection", s(&v, "rejection")),
        ("telemetry dropped", s(&v, "telemetry_dropped")),
    ];
    for (k, val) in rows {
        outln!("{:<18} {val}", format!("{k}:"));
    }
    let workloads = v["workloads"].as_array().cloned().unwrap_or_default();
    if workloads.is_empty() {
        outln!("workloads:         -");
    } else {
        outln!(
            "\n{:<16} {:<12} {:<16} {:>8} {:>8}  LAST ERROR",
            "WORKLOAD",
            "VERSION",
            "STATE",
            "HEALTHY",
            "RESTARTS"
        );
        for w in &workloads {
            outln!(
                "{:<16} {:<12} {:<16} {:>8} {:>8}  {}",
                s(w, "name"),
                s(w, "version"),
                s(w, "state"),
                s(w, "healthy"),
                s(w, "restarts"),
                s(w, "last_error")
            );
        }
    }
    // The config each workload reads on this device, overrides applied.
    if let Some(configs) = v["effective_config"].as_object().filter(|c| !c.is_empty()) {
        outln!();
        for (workload, text) in configs {
            let lines: Vec<&str> = text.as_str().unwrap_or_default().lines().collect();
            outln!(
                "config of {workload}: {}",
                if lines.is_empty() {
                    "-".to_owned()
                } else {
                    lines.join(", ")
                }
            );
        }
    }
    Ok(())
}

/// `{"k": "v", ...}` or `[["k", "v"], ...]` as `k=v, ...`.
fn labels(v: &Value) -> String {
    let pairs: Vec<String> = match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
            .collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(|p| Some(format!("{}={}", p.get(0)?.as_str()?, p.get(1)?.as_str()?)))
            .collect(),
        _ => vec![],
    };
    if pairs.is_empty() {
        "-".into()
    } else {
        pairs.join(", ")
    }
}

/// Creates a one-time enrollment token with presets.
pub fn enroll_token(
    region: Option<String>,
    zone: Option<String>,
    labels: Vec<String>,
    ttl_secs: u64,
    conn: Conn,
) -> Result<()> {
    let mut l = serde_json::Map::new();
    for kv in labels {
        let (k, v) = kv.split_once('=').context("--label must be key=value")?;
        l.insert(k.into(), Value::from(v));
    }
    let body =
        serde_json::json!({"region": region, "zone": zone, "labels": l, "ttl_secs": ttl_secs});
    let v = conn.client()?.post(
        "/api/v1/enrollment-tokens",
        "application/json",
        body.to_string().as_bytes(),
        &[],
    )?;
    if conn.json() {
        print_json(&v);
    } else {
        outln!("{}", s(&v, "token"));
    }

    Ok(())
}

/// Creates an API token for an operator or a tool.
pub fn api_token(
    name: String,
    role: String,
    ttl_secs: Option<u64>,
    regions: Vec<String>,
    conn: Conn,
) -> Result<()> {
    let regions = (!regions.is_empty()).then_some(regions);
    let body =
        serde_json::json!({"name": name, "role": role, "ttl_secs": ttl_secs, "regions": regions});
    let v = conn.client()?.post(
        "/api/v1/tokens",
        "application/json",
        body.to_string().as_bytes(),
        &[],
    )?;
    outln!("{}", s(&v, "token"));

    Ok(())
}

/// Lists the API tokens (no secrets).
pub fn api_tokens(conn: Conn) -> Result<()> {
    let v = conn.client()?.get("/api/v1/tokens")?;
    if conn.json() {
        print_json(&v);
        return Ok(());
    }
    outln!(
        "{:<24} {:<9} {:<20} {:>12}  EXPIRES",
        "NAME",
        "ROLE",
        "REGIONS",
        "CREATED"
    );
    for t in v.as_array().into_iter().flatten() {
        let expires = match (t["expires_at"].as_u64(), t["expired"].as_bool()) {
            (None, _) => "never".to_owned(),
            (Some(at), Some(true)) => format!("{at} (expired)"),
            (Some(at), _) => at.to_string(),
        };
        let regions = t["regions"].as_array().map_or("all".to_owned(), |r| {
            r.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(",")
        });
        outln!(
            "{:<24} {:<9} {:<20} {:>12}  {}",
            s(t, "name"),
            s(t, "role"),
            regions,
            s(t, "created_at"),
            expires
        );
    }
    Ok(())
}

/// Revokes the API token named `name`.
pub fn revoke_api_token(name: &str, conn: Conn) -> Result<()> {
    conn.client()?.delete(&format!("/api/v1/tokens/{name}"))?;
    outln!("revoked {name}");
    Ok(())
}

/// Explains why a device is or is not running a workload.
pub fn why(device: &str, workload: &str, conn: Conn) -> Result<()> {
    let v = conn
        .client()?
        .get(&format!("/api/v1/why/{device}/{workload}"))?;
    if conn.json() {
        print_json(&v);
    } else {
        outln!("{device} / {workload}: {}", s(&v, "explanation"));
    }

    Ok(())
}

/// Prints a workload's last output lines; with `follow`, asks again every 2 s and prints only what is new.
pub fn logs(device: &str, workload: &str, lines: u32, follow: bool, conn: Conn) -> Result<()> {
    let client = conn.client()?;
    let path = format!("/api/v1/devices/{device}/logs/{workload}?lines={lines}");
    let v = client.get(&path)?;
    if conn.json() && !follow {
        print_json(&v);
        return Ok(());
    }
    let mut last = v["text"].as_str().unwrap_or_default().to_owned();
    for line in last.lines() {
        outln!("{line}");
    }
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(2));
        let v = client.get(&path)?;
        let text = v["text"].as_str().unwrap_or_default().to_owned();
        for line in new_lines(&last, &text).lines() {
            outln!("{line}");
        }
        last = text;
    }
}

/// The lines of `new` after its overlap with the end of `old` (both are tails of the same growing output).
fn new_lines(old: &str, new: &str) -> String {
    let (o, n): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    let overlap = (0..=o.len().min(n.len()))
        .rev()
        .find(|k| o[o.len() - k..] == n[..*k])
        .unwrap_or(0);
    n[overlap..].iter().map(|l| format!("{l}\n")).collect()
}

/// Revokes a device.
pub fn revoke(id: &str, conn: Conn) -> Result<()> {
    let v = conn.client()?.post(
        &format!("/api/v1/devices/{id}/revoke"),
        "application/json",
        b"{}",
        &[],
    )?;
    if conn.json() {
        print_json(&v);
    } else {
        outln!(
            "revoked {id}: {} connection(s) closed; it can enroll again only with a new token",
            s(&v, "connections_closed")
        );
    }
    Ok(())
}

/// Asks a device to rotate its credentials.
pub fn rotate_credentials(id: &str, conn: Conn) -> Result<()> {
    let v = conn.client()?.post(
        &format!("/api/v1/devices/{id}/rotate-credentials"),
        "application/json",
        b"{}",
        &[],
    )?;
    if conn.json() {
        print_json(&v);
    } else if v["online"] == true {
        outln!(
            "asked {id} for a new key: it gets a new certificate and password now; its old ones stop working \
             when it first connects with the new ones"
        );
    } else {
        outln!("{id} is offline: it will be asked for a new key when it next connects");
    }
    Ok(())
}

/// Creates a telemetry feed credential and prints it once.
pub fn feed_credential(name: &str, regions: &[String], conn: Conn) -> Result<()> {
    let body = serde_json::json!({"name": name, "regions": regions});
    let v = conn.client()?.post(
        "/api/v1/feed-credentials",
        "application/json",
        body.to_string().as_bytes(),
        &[],
    )?;
    if conn.json() {
        print_json(&v);
    } else {
        outln!("username:  {}", s(&v, "username"));
        outln!("password:  {}", s(&v, "password"));
        outln!(
            "client id: {} (or {}-anything)",
            s(&v, "client_id"),
            s(&v, "client_id")
        );
        outln!("(the password is shown only now; create a new credential to replace it)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// `logs --follow` prints each line once, whether the window moved by some lines, by all, or not at all.
    #[test]
    fn follow_prints_only_new_lines() {
        let cases = [
            ("a\nb\nc\n", "b\nc\nd\n", "d\n"),
            ("a\nb\n", "a\nb\n", ""),
            ("a\nb\n", "x\ny\n", "x\ny\n"),
            ("", "a\n", "a\n"),
        ];
        for (old, new, want) in cases {
            assert_eq!(super::new_lines(old, new), want, "{old:?} -> {new:?}");
        }
    }
}
