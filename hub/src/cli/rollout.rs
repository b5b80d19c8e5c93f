//! `flotilla rollout start|status|pause|resume|abort|approve`.

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
            .map(|d| format!("{}={}", s(d, "device"), s(d, "status")))
            .collect();
        outln!("  wave {}: {}", s(w, "wave"), devs.join(" "));
    }
    if let Some(last) = v["history"].as_array().and_then(|h| h.last()) {
        outln!("  last event: {}", s(last, "event"));
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
