//! `flotilla apply -f SPEC` and `flotilla deploy ls|status|rm`.

use super::{Conn, print_json, s};
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;

/// Sends a spec file to the hub; a refusal names the file and the line or field.
pub fn apply(file: &Path, force: bool, conn: Conn) -> Result<()> {
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let v = post_spec(&conn, file, &text, force)?;
    if conn.json() {
        print_json(&v);
    } else {
        outln!(
            "applied deployment {} (revision {})",
            s(&v, "deployment"),
            s(&v, "revision")
        );
    }

    Ok(())
}

/// `flotilla apply --dry-run`: what the apply would change, device by device.
pub fn dry_run(file: &Path, force: bool, conn: Conn) -> Result<()> {
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let v = post_spec_to(
        &conn,
        "/api/v1/deployments?dry_run=true",
        file,
        &text,
        force,
    )?;
    let plan = &v["dry_run"];
    if conn.json() {
        print_json(plan);
        return Ok(());
    }
    let changes = plan["changes"].as_array().cloned().unwrap_or_default();
    outln!(
        "dry run of deployment {}: placed on {} devices, {} would change, {} unchanged; nothing was applied",
        s(plan, "deployment"),
        s(plan, "placed"),
        changes.len(),
        s(plan, "unchanged")
    );
    for c in &changes {
        for w in c["workloads"].as_array().map_or(&[][..], Vec::as_slice) {
            let what = match w["change"].as_str() {
                Some("add") => format!("+ {} {}", s(w, "workload"), s(w, "to")),
                Some("remove") => format!("- {} {}", s(w, "workload"), s(w, "from")),
                _ if w["from"] != w["to"] => {
                    format!("~ {} {} -> {}", s(w, "workload"), s(w, "from"), s(w, "to"))
                }
                _ => format!("~ {} {}", s(w, "workload"), s(w, "to")),
            };
            let config = if w["config_changed"] == true && w["change"] == "update" {
                " (config changes)"
            } else {
                ""
            };
            outln!("  {:<20} {what}{config}", s(c, "device"));
        }
    }
    if let Some(waves) = plan["waves"].as_array() {
        outln!("rollout waves:");
        for (i, w) in waves.iter().enumerate() {
            let ids: Vec<&str> = w
                .as_array()
                .map_or(vec![], |a| a.iter().filter_map(|x| x.as_str()).collect());
            outln!("  wave {i}: {} devices: {}", ids.len(), ids.join(" "));
        }
    }
    let verdicts = plan["policy"].as_array().cloned().unwrap_or_default();
    if !verdicts.is_empty() {
        outln!("admission policy:");
        for v in &verdicts {
            let mark = if v["allowed"] == true {
                "ok    "
            } else {
                "REFUSE"
            };
            outln!(
                "  {mark} {} ({}): {}",
                s(v, "rule"),
                s(v, "field"),
                s(v, "message")
            );
        }
    }
    if plan["refused_by_policy"].is_string() {
        outln!("the apply would be refused by the admission policy");
    }
    Ok(())
}

/// Posts a spec file to the hub's deployments endpoint.
pub(super) fn post_spec(
    conn: &Conn,
    file: &Path,
    text: &[u8],
    force: bool,
) -> Result<serde_json::Value> {
    post_spec_to(conn, "/api/v1/deployments", file, text, force)
}

/// Posts a spec file to `path` (the deployments endpoint, with or without `?dry_run=true`).
fn post_spec_to(
    conn: &Conn,
    path: &str,
    file: &Path,
    text: &[u8],
    force: bool,
) -> Result<serde_json::Value> {
    let name = file.display().to_string();
    let mut headers = vec![("x-flotilla-spec-file", name.as_str())];
    if force {
        headers.push(("x-flotilla-force", "true"));
    }
    conn.client()?
        .post(path, "application/toml", text, &headers)
}

/// Lists deployments.
pub fn ls(conn: Conn) -> Result<()> {
    let v = conn.client()?.get("/api/v1/deployments")?;
    if conn.json() {
        print_json(&v);
    } else {
        outln!(
            "{:<20} {:>7} {:>7}  {:<8} WORKLOADS",
            "DEPLOYMENT",
            "PLACED",
            "RUNNING",
            "STATUS"
        );
        for d in v.as_array().into_iter().flatten() {
            let workloads: Vec<&str> = d["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            outln!(
                "{:<20} {:>7} {:>7}  {:<8} {}",
                s(d, "name"),
                s(d, "placed"),
                s(d, "running"),
                if d["failed"].is_string() {
                    "failed"
                } else {
                    "ok"
                },
                workloads.join(", ")
            );
        }
    }

    Ok(())
}

/// Shows a deployment's placed devices and their workload states.
/// `flotilla deploy diff NAME [--from REV] [--to REV]`.
pub fn diff(name: &str, from: Option<u64>, to: Option<u64>, conn: Conn) -> Result<()> {
    let c = conn.client()?;
    let to = match to {
        Some(t) => t,
        None => c.get(&format!("/api/v1/deployments/{name}"))?["revision"]
            .as_u64()
            .context("the hub did not say the current revision")?,
    };
    let from = from.unwrap_or(to.saturating_sub(1).max(1));
    let v = c.get(&format!(
        "/api/v1/deployments/{name}/diff?from={from}&to={to}"
    ))?;
    if conn.json() {
        print_json(&v);
        return Ok(());
    }
    let changes = v["changes"].as_array().cloned().unwrap_or_default();
    outln!(
        "deployment {name}, revision {from} -> {to}: {}",
        if changes.is_empty() {
            "no change in meaning".to_owned()
        } else {
            format!("{} change(s)", changes.len())
        }
    );
    for c in &changes {
        outln!("  {}", c.as_str().unwrap_or_default());
    }
    let unified = s(&v, "unified");
    if !unified.is_empty() {
        outln!();
        outln!("{}", unified.trim_end());
    }
    Ok(())
}

pub fn status(name: &str, conn: Conn) -> Result<()> {
    let v = conn.client()?.get(&format!("/api/v1/deployments/{name}"))?;
    if conn.json() {
        print_json(&v);
    } else {
        outln!(
            "deployment {} (revision {}): {} of {} placed devices running",
            name,
            s(&v, "revision"),
            s(&v, "running"),
            s(&v, "placed")
        );
        if let Some(reason) = v["failed"].as_str() {
            outln!("  FAILED: {reason}");
        }
        for d in v["devices"].as_array().into_iter().flatten() {
            let st: Vec<String> = d["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| format!("{}:{}", s(w, "workload"), s(w, "state")))
                .collect();
            outln!(
                "  {:<16} online={:<5} {}",
                s(d, "device"),
                s(d, "online"),
                st.join(" ")
            );
        }
    }

    Ok(())
}

/// Deletes a deployment (its workloads leave every device).
pub fn rm(name: &str, conn: Conn) -> Result<()> {
    conn.client()?
        .delete(&format!("/api/v1/deployments/{name}"))?;
    outln!("deleted deployment {name}");

    Ok(())
}

/// `flotilla secret set`: reads the value from a file or standard input and sends it once.
pub fn set_secret(
    name: &str,
    deployment: &str,
    file: Option<&std::path::Path>,
    conn: Conn,
) -> Result<()> {
    use anyhow::Context as _;
    use std::io::Read as _;
    let value = match file {
        Some(f) => std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
        None => {
            let mut v = Vec::new();
            std::io::stdin()
                .read_to_end(&mut v)
                .context("reading the secret from standard input")?;
            v
        }
    };
    let v = conn.client()?.post(
        &format!("/api/v1/deployments/{deployment}/secrets/{name}"),
        "application/octet-stream",
        &value,
        &[],
    )?;
    if conn.json() {
        print_json(&v);
    } else {
        outln!(
            "secret {name} of {deployment} set (version {}); its workloads restart with it",
            v["version"]
        );
    }
    Ok(())
}

/// `flotilla secret ls`.
pub fn list_secrets(deployment: &str, conn: Conn) -> Result<()> {
    let v = conn
        .client()?
        .get(&format!("/api/v1/deployments/{deployment}/secrets"))?;
    if conn.json() {
        print_json(&v);
        return Ok(());
    }
    outln!("{:<24} {:>8} {:>8}", "SECRET", "VERSION", "BYTES");
    for s in v["secrets"].as_array().map_or(&[][..], |a| a.as_slice()) {
        outln!(
            "{:<24} {:>8} {:>8}",
            s["name"].as_str().unwrap_or(""),
            s["version"],
            s["bytes"]
        );
    }
    Ok(())
}
