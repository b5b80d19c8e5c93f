//! The agent's own metrics: published on its `agent` telemetry stream and, when `metrics_listen` is set, served as
//! Prometheus text on loopback.

use crate::agent::Agent;
use flotilla_shared::Label;
use flotilla_shared::wire::TelemetryPayload;
use std::time::Duration;

impl Agent {
    /// The agent's own metrics, published on the `agent` telemetry stream.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let status = self.reconciler.status(self.millis());
        let running = status
            .iter()
            .filter(|s| s.state == flotilla_shared::wire::WorkloadState::Running)
            .count();
        let restarts: u32 = status.iter().map(|s| s.restarts).sum();
        let rss = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<f64>().ok())
            })
            .map_or(0.0, |pages| pages * 4096.0);
        let cpu = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
            })
            .unwrap_or(0.0);
        let disk_free = self.free_disk() as f64;
        vec![
            ("workloads_desired".into(), status.len() as f64),
            ("workloads_running".into(), running as f64),
            ("restarts_total".into(), f64::from(restarts)),
            ("rss_bytes".into(), rss),
            ("cpu_seconds_total".into(), cpu),
            ("disk_free_bytes".into(), disk_free),
            ("database_bytes".into(), self.store.disk_bytes() as f64),
            ("mqtt_reconnects_total".into(), self.reconnects as f64),
            (
                "telemetry_dropped_total".into(),
                self.store.counter("telemetry_dropped").unwrap_or(0) as f64,
            ),
            (
                "applied_generation".into(),
                self.trust.floor.generation as f64,
            ),
        ]
    }

    /// Pushes the current metrics onto the `agent` telemetry stream.
    pub(crate) fn push_agent_metrics(&mut self) {
        let metrics = self.metrics();
        if let Ok(stream) = Label::new("agent") {
            self.push_telemetry(stream, TelemetryPayload::Metrics(metrics));
        }
    }
}

/// A minimal Prometheus text endpoint: any request gets the latest snapshot. Bound to loopback only (checked at
/// config load), so it needs no authentication.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    rx: tokio::sync::watch::Receiver<Vec<(String, f64)>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let snapshot = rx.borrow().clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            // Read (and ignore) the request head; a slow client gets a bounded wait.
            let _ = tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf)).await;
            let mut body = String::new();
            for (name, value) in snapshot {
                body.push_str(&format!(
                    "# TYPE flotilla_agent_{name} gauge\nflotilla_agent_{name} {value}\n"
                ));
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
