//! Telemetry ingestion: per device and stream, record counts, gaps, redeliveries and the latest metric values
//! (an in-memory latest-value view, not a history). Telemetry gates of rollouts read it.

use crate::hub::HubMetrics;
use crate::store::Store;
use flotilla_shared::DeviceId;
use flotilla_shared::codec::{self, Message};
use flotilla_shared::wire::TelemetryPayload;
use std::collections::{BTreeMap, BTreeSet};

/// What the hub keeps of one telemetry stream of one device (in memory: the latest view, not history).
#[derive(Debug, Clone, Default)]
pub struct StreamStats {
    pub records: u64,
    /// Records whose sequence number was not above the last one seen (redeliveries).
    pub duplicates: u64,
    /// Sequence numbers skipped (records the device dropped from its outbox, or lost).
    pub gaps: u64,
    pub last_seq: u64,
    pub last_at: u64,
    /// Latest value of each named metric (for `Metrics` payloads).
    pub metrics: BTreeMap<String, f64>,
    /// Size of the latest opaque payload (for `Bytes` payloads).
    pub last_bytes: usize,
}

/// The telemetry view of the fleet, owned by the hub loop.
#[derive(Debug, Default)]
pub struct Telemetry {
    streams: BTreeMap<(DeviceId, String), StreamStats>,
    /// Last telemetry sequence number per device (sequence numbers are per device, across streams).
    seq: BTreeMap<DeviceId, u64>,
    /// Devices seen registered, so the store is asked once per device and not once per record.
    known: BTreeSet<DeviceId>,
}

impl Telemetry {
    /// Ingests one telemetry message published on `device`'s `stream` topic.
    pub fn ingest(
        &mut self,
        store: &Store,
        metrics: &mut HubMetrics,
        device: &DeviceId,
        stream: &str,
        payload: &[u8],
    ) {
        let records = match codec::decode(payload) {
            Ok(Message::Telemetry(r)) => r,
            _ => {
                metrics.messages_rejected += 1;
                return;
            }
        };
        // Topic and payload must agree; unknown devices are not tracked (the broker's ACLs keep them out).
        if !self.known.contains(device) && !store.device_exists(device).unwrap_or(false) {
            metrics.messages_rejected += 1;
            return;
        }
        self.known.insert(device.clone());
        for rec in records {
            if &rec.device != device || rec.stream.as_str() != stream {
                metrics.messages_rejected += 1;
                continue;
            }
            metrics.telemetry_records += 1;
            let last = self.seq.entry(device.clone()).or_insert(0);
            let st = self
                .streams
                .entry((device.clone(), stream.to_owned()))
                .or_default();
            if rec.seq <= *last {
                st.duplicates += 1;
                continue;
            }
            if *last > 0 {
                st.gaps += rec.seq - *last - 1;
            }
            *last = rec.seq;
            st.records += 1;
            st.last_seq = rec.seq;
            st.last_at = rec.at;
            match rec.payload {
                TelemetryPayload::Bytes(b) => st.last_bytes = b.len(),
                TelemetryPayload::Metrics(m) => st.metrics.extend(m),
            }
        }
    }

    /// Every stream of `device`, by stream name.
    pub fn device_streams<'a>(
        &'a self,
        device: &'a DeviceId,
    ) -> impl Iterator<Item = (&'a str, &'a StreamStats)> + 'a {
        self.streams
            .range((device.clone(), String::new())..)
            .take_while(move |((d, _), _)| d == device)
            .map(|((_, stream), st)| (stream.as_str(), st))
    }

    /// The latest value of `metric` on `device`'s `stream`, if it ever reported one.
    pub fn metric(&self, device: &DeviceId, stream: &str, metric: &str) -> Option<f64> {
        self.streams
            .get(&(device.clone(), stream.to_owned()))
            .and_then(|s| s.metrics.get(metric))
            .copied()
    }
}
