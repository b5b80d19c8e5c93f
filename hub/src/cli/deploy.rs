//! `flotilla apply -f SPEC` and `flotilla deploy ls|status|rm`.

use super::{Conn, print_json, s};
use anyhow::{Context, Result};
use std::path::Path;

/// Sends a spec file to the hub; a refusal names the file and the line or field.
pub fn apply(file: &Path, conn: Conn) -> Result<()> {
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let name = file.display().to_string();
    let v = conn.client()?.post(
        "/api/v1/deployments",
        "application/toml",
        &text,
        &[("x-flotilla-spec-file", &name)],
    )?;
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

/// Lists deployments.
pub fn ls(conn: Conn) -> Result<()> {
    let v = conn.client()?.get("/api/v1/deployments")?;
    if conn.json() {
        print_json(&v);
    } else {
        outln!(
            "{:<20} {:>7} {:>7}  WORKLOADS",
            "DEPLOYMENT",
            "PLACED",
            "RUNNING"
        );
        for d in v.as_array().into_iter().flatten() {
            outln!(
                "{:<20} {:>7} {:>7}  {}",
                s(d, "name"),
                s(d, "placed"),
                s(d, "running"),
                d["workloads"]
            );
        }
    }

    Ok(())
}

/// Shows a deployment's placed devices and their workload states.
pub fn status(name: &str, conn: Conn) -> Result<()> {
    let v = conn.client()?.get(&format!("/api/v1/deployments/{name}"))?;
    if conn.json() {
        print_json(&v);
    } else {
        outln!(
            "deployment {}: {} of {} placed devices running",
            name,
            s(&v, "running"),
            s(&v, "placed")
        );
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
