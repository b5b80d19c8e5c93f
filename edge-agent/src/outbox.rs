//! Telemetry store-and-forward: every record gets a per-device sequence number and goes into the SQLite outbox
//! (bounded; the oldest are dropped and counted), which drains in order whenever the link is up.

use crate::agent::{Agent, unix_now};
use flotilla_mqtt::Publisher;
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics;
use flotilla_shared::wire::{TelemetryPayload, TelemetryRecord};
use flotilla_shared::{Label, WorkloadName};

/// Outbox records published per drain pass.
const DRAIN_BATCH: usize = 64;

impl Agent {
    /// A guest reported a named metric: published on its `<workload>.metrics` stream (non-finite values dropped).
    pub(crate) fn on_guest_metric(&mut self, name: &WorkloadName, metric: String, value: f64) {
        if !value.is_finite() {
            return;
        }
        if let Ok(stream) = Label::new(format!("{name}.metrics")) {
            self.push_telemetry(stream, TelemetryPayload::Metrics(vec![(metric, value)]));
        }
    }

    /// A guest published opaque telemetry on `stream` (an invalid stream name drops it).
    pub(crate) fn on_guest_telemetry(
        &mut self,
        name: &WorkloadName,
        stream: String,
        payload: Vec<u8>,
    ) {
        let Ok(stream) = Label::new(stream) else {
            tracing::warn!(workload = %name, "telemetry stream name invalid; dropped");
            return;
        };
        self.push_telemetry(stream, TelemetryPayload::Bytes(payload));
    }

    pub(crate) fn push_telemetry(&mut self, stream: Label, payload: TelemetryPayload) {
        let device = self.trust.device.clone();
        let topic = topics::telemetry(self.cfg.region.as_ref(), &device, &stream);
        let at = unix_now();
        let pushed = self.store.outbox_push_with(self.cfg.outbox_bytes, |seq| {
            let rec = TelemetryRecord {
                device,
                stream,
                seq,
                at,
                payload,
            };
            (
                topic,
                codec::encode(&Message::Telemetry(vec![rec])).unwrap_or_default(),
            )
        });
        match pushed {
            Ok(dropped) if dropped > 0 => {
                tracing::warn!(dropped, "telemetry outbox full; oldest records dropped")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "telemetry outbox write failed"),
        }
        self.drain_outbox();
    }

    /// Publishes the outbox in order while connected; records leave the outbox once handed to the MQTT client.
    pub(crate) fn drain_outbox(&mut self) {
        let Some(link) = self.link.clone() else {
            return;
        };
        while self.connected {
            let rows = match self.store.outbox_peek(DRAIN_BATCH) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "outbox read failed");
                    return;
                }
            };
            if rows.is_empty() {
                return;
            }
            let mut last = None;
            for (seq, topic, payload) in &rows {
                if link.publish(topic, payload.clone(), false).is_err() {
                    break; // Client queue full: resume on the next tick.
                }
                last = Some(*seq);
            }
            let Some(last) = last else { return };
            if let Err(e) = self.store.outbox_delete_through(last) {
                tracing::error!(error = %e, "outbox delete failed");
                return;
            }
            if rows.len() < DRAIN_BATCH {
                return;
            }
        }
    }
}
