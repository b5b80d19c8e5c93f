//! `flotilla rollout start|status|pause|resume|abort|approve|report|retry`.

use super::{Conn, RolloutCmd, print_json, s};
use anyhow::{Context, Result};
use serde_json::Value;

fn print_rollout(v: &Value) {
    outln!(
        "rollout of {}: {}{}",
        s(v, "deployment"),
        s(v, "phase"),
        if v["paused"] == true { " (paused)" } else { "" }
    );
    for w in v["waves"].as_array().into_iter().flatten() {
        let devs: Vec<String> = w["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| match d["stage"].as_str() {
                // A device not moved yet shows how far its download is (`pending/staged`).
                Some(stage)
                    if stage != s(d, "status") && !matches!(stage, "applying" | "healthy") =>
                {
                    format!("{}={}/{stage}", s(d, "device"), s(d, "status"))
                }
                _ => format!("{}={}", s(d, "device"), s(d, "status")),
            })
            .collect();
        outln!("  wave {}: {}", s(w, "wave"), devs.join(" "));
    }
    for d in v["left_out"].as_array().into_iter().flatten() {
        outln!("  left out: {}: {}", s(d, "device"), s(d, "detail"));
    }
    if let Some(last) = v["history"].as_array().and_then(|h| h.last()) {
        outln!("  last event: {}", s(last, "event"));
    }
}

/// A report time as RFC 3339 (UTC), `-` when unset.
fn at(v: &Value) -> String {
    v.as_u64()
        .map_or_else(|| "-".to_owned(), super::telemetry::when)
}

fn print_report(v: &Value) {
    outln!(
        "rollout of {}: {} (total {} s)",
        s(v, "deployment"),
        s(v, "outcome"),
        v["total_secs"]
    );
    outln!(
        "  started {}, finished {}",
        at(&v["started_at"]),
        at(&v["finished_at"])
    );
    outln!(
        "  {:<5} {:<21} {:<21} {:>7} {:>7} {:>6} {:>12} {:>5} {:>11}",
        "WAVE",
        "STARTED",
        "ENDED",
        "DEVICES",
        "HEALTHY",
        "FAILED",
        "UNDETERMINED",
        "HELD",
        "ROLLED-BACK"
    );
    for w in v["waves"].as_array().into_iter().flatten() {
        outln!(
            "  {:<5} {:<21} {:<21} {:>7} {:>7} {:>6} {:>12} {:>5} {:>11}",
            w["wave"].to_string(),
            at(&w["started"]),
            at(&w["ended"]),
            w["devices"].to_string(),
            w["healthy"].to_string(),
            w["failed"].to_string(),
            w["undetermined"].to_string(),
            w["held"].to_string(),
            w["rolled_back"].to_string()
        );
        for e in w["exceptions"].as_array().into_iter().flatten() {
            let reason = e["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            outln!("        {} {}{reason}", s(e, "device"), s(e, "status"));
        }
    }
    for e in v["left_out"].as_array().into_iter().flatten() {
        outln!("  left out: {}: {}", s(e, "device"), s(e, "reason"));
    }
    for g in v["gates"].as_array().into_iter().flatten() {
        let verdict = if g["passed"] == true {
            "passed"
        } else {
            "HALTED"
        };
        let wave = g["wave"].as_u64().map_or(0, |w| w + 1);
        outln!(
            "  gate, wave {wave}, {}: {verdict}: {}",
            at(&g["at"]),
            s(g, "detail")
        );
    }
    for o in v["operators"].as_array().into_iter().flatten() {
        outln!("  {} {}: {}", at(&o["at"]), s(o, "who"), s(o, "command"));
    }
}

pub fn run(cmd: RolloutCmd) -> Result<()> {
    match cmd {
        RolloutCmd::Start { file, force, conn } => {
            let text =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            if !String::from_utf8_lossy(&text).contains("[rollout]") {
                anyhow::bail!(
                    "{}: a rollout needs a [rollout] section (use `flotilla apply` for an immediate change)",
                    file.display()
                );
            }
            let v = super::deploy::post_spec(&conn, &file, &text, force)?;
            outln!(
                "rollout of {} started (revision {}); follow it with `flotilla rollout status {} --watch`",
                s(&v, "deployment"),
                s(&v, "revision"),
                s(&v, "deployment")
            );
        }
        RolloutCmd::Status {
            deployment,
            watch,
            conn,
        } => {
            let c = conn.client()?;
            loop {
                let v = c.get(&format!("/api/v1/rollouts/{deployment}"))?;
                if conn.json() {
                    print_json(&v);
                } else {
                    print_rollout(&v);
                }
                if !watch || v["finished"] == true {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
                outln!();
            }
        }
        RolloutCmd::Pause { deployment, conn } => rollout_action(&conn, &deployment, "pause")?,
        RolloutCmd::Resume { deployment, conn } => rollout_action(&conn, &deployment, "resume")?,
        RolloutCmd::Abort { deployment, conn } => rollout_action(&conn, &deployment, "abort")?,
        RolloutCmd::Approve { deployment, conn } => rollout_action(&conn, &deployment, "approve")?,
        RolloutCmd::Report { deployment, conn } => {
            let v = conn
                .client()?
                .get(&format!("/api/v1/rollouts/{deployment}/report"))?;
            if conn.json() {
                print_json(&v);
            } else {
                print_report(&v);
            }
        }
        RolloutCmd::Retry {
            deployment,
            device,
            conn,
        } => {
            let body = serde_json::json!({ "device": device });
            let v = conn.client()?.post(
                &format!("/api/v1/rollouts/{deployment}/retry"),
                "application/json",
                body.to_string().as_bytes(),
                &[],
            )?;
            let retried: Vec<&str> = v["retried"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            outln!(
                "rollout of {deployment}: {} remembered failures forgotten; {}",
                v["forgotten"],
                if retried.is_empty() {
                    "the next rollout includes the device(s) again".to_owned()
                } else {
                    format!("retrying now: {}", retried.join(" "))
                }
            );
        }
    }
    Ok(())
}

fn rollout_action(conn: &Conn, deployment: &str, action: &str) -> Result<()> {
    conn.client()?.post(
        &format!("/api/v1/rollouts/{deployment}/{action}"),
        "application/json",
        b"{}",
        &[],
    )?;
    outln!("rollout of {deployment}: {action} accepted");
    Ok(())
}
