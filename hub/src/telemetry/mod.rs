//! Telemetry ingestion: each accepted record is decoded by its stream's declared type ([`typed`]), counted per
//! stream (records, gaps, redeliveries, latest metrics: the view telemetry gates read), republished as JSON on
//! `flotilla/v1/feed/json/...`, handed to live subscribers (`flotilla telemetry tail`) and stored in the history
//! ([`history`]). Records that cannot be decoded are dropped with a typed reason and counted; nothing a device
//! sends can stop other devices' records.

pub mod history;
pub mod sparkplug;
pub mod typed;

use crate::hub::Hub;
use flotilla_mqtt::Publisher as _;
use flotilla_shared::DeviceId;
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics::{self, NO_REGION};
use flotilla_shared::wire::TelemetryPayload;
use history::History;
use std::collections::BTreeMap;
use std::sync::Arc;
use typed::{Declarations, DropReason, FeedRecord, decode_value};

/// Live subscribers may lag this many records behind before they miss some (and are told how many).
const LIVE_BUFFER: usize = 8192;

/// What the hub keeps of one telemetry stream of one device (in memory: the latest view; history is on disk).
#[derive(Debug, Clone, Default)]
pub struct StreamStats {
    pub records: u64,
    /// Records whose sequence number was not above the last one seen (redeliveries).
    pub duplicates: u64,
    /// Sequence numbers skipped (records the device dropped from its outbox, or lost).
    pub gaps: u64,
    /// Records dropped at the hub (wrong type, invalid JSON, oversized, ...).
    pub dropped: u64,
    /// Why the last dropped record was dropped.
    pub last_drop: Option<DropReason>,
    pub last_seq: u64,
    pub last_at: u64,
    /// Latest value of each named metric (for `Metrics` payloads).
    pub metrics: BTreeMap<String, f64>,
    /// Size of the latest opaque payload (for `Bytes` payloads).
    pub last_bytes: usize,
    /// The type its last accepted record was decoded as (`bytes`, `json`, `metrics`, ...).
    pub content_type: Option<&'static str>,
}

/// The telemetry concern's state, owned by the hub loop.
#[derive(Debug)]
pub struct Telemetry {
    streams: BTreeMap<(DeviceId, String), StreamStats>,
    /// Last telemetry sequence number per device (sequence numbers are per device, across streams).
    seq: BTreeMap<DeviceId, u64>,
    /// Stream declarations of the stored deployments, and where each deployment is placed.
    pub decls: Declarations,
    /// Records dropped at the hub, by reason.
    pub dropped: BTreeMap<DropReason, u64>,
    /// JSON feed messages the MQTT client could not queue.
    pub feed_dropped: u64,
    /// Sparkplug B messages the MQTT client could not queue.
    pub sparkplug_dropped: u64,
    /// The Sparkplug B feed's sessions, when it is on (`serve --sparkplug`).
    pub sparkplug: Option<sparkplug::Sparkplug>,
    /// Republish accepted records as JSON (`serve --no-json-feed` turns it off).
    pub json_feed: bool,
    /// Accepted records for live subscribers.
    pub live: tokio::sync::broadcast::Sender<Arc<FeedRecord>>,
    pub history: Option<History>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            streams: BTreeMap::new(),
            seq: BTreeMap::new(),
            decls: Declarations::default(),
            dropped: BTreeMap::new(),
            feed_dropped: 0,
            sparkplug_dropped: 0,
            sparkplug: None,
            json_feed: true,
            live: tokio::sync::broadcast::channel(LIVE_BUFFER).0,
            history: None,
        }
    }
}

/// Counts a dropped record, on its stream too when it got that far.
fn drop_record(
    dropped: &mut BTreeMap<DropReason, u64>,
    reason: DropReason,
    stream: Option<&mut StreamStats>,
) {
    *dropped.entry(reason).or_insert(0) += 1;
    if let Some(st) = stream {
        st.dropped += 1;
        st.last_drop = Some(reason);
    }
}

impl Telemetry {
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

    /// Records dropped at the hub in all.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Publishes Sparkplug messages (births and data at QoS 0, deaths at QoS 1); returns how many could not be queued.
fn publish_sparkplug(link: &flotilla_mqtt::Link, out: Vec<sparkplug::Out>) -> u64 {
    let mut dropped = 0;
    for o in out {
        let sent = if o.at_least_once {
            link.publish(&o.topic, o.payload, false)
        } else {
            link.publish_at_most_once(&o.topic, o.payload)
        };
        dropped += u64::from(sent.is_err());
    }
    dropped
}

/// Unix seconds with millisecond precision (the feed's `hub_time`).
fn hub_time() -> f64 {
    now_ms() as f64 / 1000.0
}

impl Hub {
    /// One telemetry message published on `device`'s `stream` topic.
    pub(crate) fn on_telemetry(&mut self, device: &DeviceId, stream: &str, payload: &[u8]) {
        let t = &mut self.telemetry;
        let records = match codec::decode(payload) {
            Ok(Message::Telemetry(r)) => r,
            _ => {
                self.metrics.messages_rejected += 1;
                drop_record(&mut t.dropped, DropReason::Undecodable, None);
                return;
            }
        };
        // The broker's ACLs keep unknown devices out; a record from one that was deleted meanwhile is dropped.
        let place = self.store.with_device(device, |d| {
            (
                d.inventory.region.as_ref().map(|r| r.as_str().to_owned()),
                d.inventory.zone.as_ref().map(|z| z.as_str().to_owned()),
            )
        });
        let Ok(Some((region, zone))) = place else {
            self.metrics.messages_rejected += 1;
            for _ in &records {
                drop_record(&mut t.dropped, DropReason::UnknownDevice, None);
            }
            return;
        };
        let resolved = t.decls.resolve(device, stream);
        let now = hub_time();
        for rec in records {
            if &rec.device != device || rec.stream.as_str() != stream {
                self.metrics.messages_rejected += 1;
                drop_record(&mut t.dropped, DropReason::WrongTopic, None);
                continue;
            }
            let key = (device.clone(), stream.to_owned());
            let last = t.seq.entry(device.clone()).or_insert(0);
            let st = t.streams.entry(key.clone()).or_default();
            if rec.seq <= *last {
                st.duplicates += 1;
                continue;
            }
            // Sequence numbers advance even for a record dropped below: its redelivery is a duplicate.
            if *last > 0 {
                st.gaps += rec.seq - *last - 1;
            }
            *last = rec.seq;
            st.last_seq = rec.seq;
            st.last_at = rec.at;
            let (ty, value) = match decode_value(resolved.declared, &rec.payload) {
                Ok(v) => v,
                Err(reason) => {
                    tracing::debug!(device = %device, stream, reason = reason.name(), "telemetry record dropped");
                    drop_record(&mut t.dropped, reason, Some(st));
                    continue;
                }
            };
            self.metrics.telemetry_records += 1;
            st.records += 1;
            st.content_type = Some(ty.name());
            match rec.payload {
                TelemetryPayload::Bytes(b) => st.last_bytes = b.len(),
                TelemetryPayload::Metrics(m) => st.metrics.extend(m),
            }
            let fr = Arc::new(FeedRecord {
                device: device.to_string(),
                region: region.clone(),
                zone: zone.clone(),
                workload: resolved.workload.clone(),
                stream: stream.to_owned(),
                seq: rec.seq,
                device_time: rec.at,
                hub_time: now,
                content_type: ty.name().to_owned(),
                value,
            });
            if t.json_feed {
                let topic = topics::feed_json(
                    region.as_deref().unwrap_or(NO_REGION),
                    device.as_str(),
                    stream,
                );
                let body = serde_json::to_vec(&*fr).unwrap_or_default();
                if self.link.publish(&topic, body, false).is_err() {
                    t.feed_dropped += 1;
                }
            }
            if let Some(sp) = &mut t.sparkplug {
                let group = region.as_deref().unwrap_or(NO_REGION);
                let out = sp.record(group, &fr, now_ms());
                t.sparkplug_dropped += publish_sparkplug(&self.link, out);
            }
            if let Some(h) = &t.history {
                h.record(fr.clone());
            }
            // No receivers is the normal case; the send then fails and costs nothing.
            let _ = t.live.send(fr);
        }
    }

    /// Sparkplug: a device came online or went offline (births carry the device's region as the group).
    pub(crate) fn sparkplug_presence(&mut self, device: &DeviceId, online: bool) {
        let Some(sp) = &mut self.telemetry.sparkplug else {
            return;
        };
        let out = if online {
            let group = self
                .store
                .with_device(device, |d| {
                    d.inventory.region.as_ref().map(|r| r.to_string())
                })
                .ok()
                .flatten()
                .flatten()
                .unwrap_or_else(|| NO_REGION.to_owned());
            sp.online(device.as_str(), &group, now_ms())
        } else {
            sp.offline(device.as_str(), now_ms())
        };
        self.telemetry.sparkplug_dropped += publish_sparkplug(&self.link, out);
    }

    /// Sparkplug: a message on `spBv1.0/{group}/NCMD/{node}` (a host application's command to a node). Only rebirth
    /// requests are honoured.
    pub(crate) fn on_sparkplug_command(&mut self, topic: &str, payload: &[u8]) {
        let Some(sp) = &mut self.telemetry.sparkplug else {
            return;
        };
        let Some((group, node)) = sparkplug::parse_ncmd(topic) else {
            return;
        };
        if !sparkplug::is_rebirth_request(payload) {
            return;
        }
        let out = sp.rebirth(node, group, now_ms());
        self.telemetry.sparkplug_dropped += publish_sparkplug(&self.link, out);
    }

    /// Sparkplug: the hub (re)connected to the broker. Consumers may have missed anything since, so every online
    /// device is born again.
    pub(crate) fn sparkplug_rebirth_all(&mut self) {
        let Some(sp) = &mut self.telemetry.sparkplug else {
            return;
        };
        sp.forget_sessions();
        let online: Vec<(String, String)> = self
            .store
            .with_devices(|devs| {
                devs.filter(|d| d.online)
                    .map(|d| {
                        let group = d
                            .inventory
                            .region
                            .as_ref()
                            .map_or(NO_REGION, |r| r.as_str());
                        (d.id.to_string(), group.to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let now = now_ms();
        let out: Vec<sparkplug::Out> = online
            .iter()
            .flat_map(|(d, g)| sp.online(d, g, now))
            .collect();
        self.telemetry.sparkplug_dropped += publish_sparkplug(&self.link, out);
    }

    /// Rebuilds the stream declarations after deployments changed.
    pub(crate) fn refresh_telemetry_declarations(&mut self) {
        let decls = self.deployments.iter().flat_map(|(name, d)| {
            d.workloads.iter().flat_map(move |w| {
                w.telemetry.iter().map(move |(stream, ty)| {
                    (name.clone(), w.name.to_string(), stream.to_string(), *ty)
                })
            })
        });
        self.telemetry
            .decls
            .set_declarations(decls.collect::<Vec<_>>());
    }
}
