//! Typed telemetry, sans-IO: the content types a workload declares for its streams, which workload and type a
//! record on a device's stream belongs to, decoding its value by that type, and the JSON feed record built from it.
//!
//! The device uplink is unchanged (compact postcard, `TelemetryPayload::{Bytes, Metrics}`); declarations live only
//! in the hub's deployment specs, so changing one restarts nothing on the devices.

use base64::Engine as _;
use flotilla_shared::DeviceId;
use flotilla_shared::wire::TelemetryPayload;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Largest value the hub accepts in one record (the agents' host APIs cap guest telemetry at the same 16 KiB).
pub const MAX_VALUE_BYTES: usize = 16 * 1024;

/// A stream's content type: how the hub decodes its records for the JSON feed and the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ContentType {
    /// Opaque bytes (base64 in JSON): what an undeclared guest stream is.
    Bytes,
    /// UTF-8 text.
    Text,
    /// A JSON document.
    Json,
    U64Le,
    I64Le,
    F64Le,
    U32Le,
    I32Le,
    F32Le,
    /// Named numbers (the `metric` host call, `<workload>.metrics` streams, the agent's own `agent` stream).
    Metrics,
}

impl ContentType {
    pub const ALL: [Self; 10] = [
        Self::Bytes,
        Self::Text,
        Self::Json,
        Self::U64Le,
        Self::I64Le,
        Self::F64Le,
        Self::U32Le,
        Self::I32Le,
        Self::F32Le,
        Self::Metrics,
    ];

    /// The name used in specs, in the feed's `type` field and in the history.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bytes => "bytes",
            Self::Text => "text",
            Self::Json => "json",
            Self::U64Le => "u64le",
            Self::I64Le => "i64le",
            Self::F64Le => "f64le",
            Self::U32Le => "u32le",
            Self::I32Le => "i32le",
            Self::F32Le => "f32le",
            Self::Metrics => "metrics",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }

    /// Whether records of this type carry named metrics (as opposed to a payload).
    pub fn is_metrics(self) -> bool {
        self == Self::Metrics
    }
}

/// Why the hub dropped a telemetry record (counted per reason on `/metrics`, kept per stream for `device show`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// The message is not a telemetry envelope.
    Undecodable,
    /// No registered device has the id in the topic.
    UnknownDevice,
    /// The record names another device or stream than the topic it came on.
    WrongTopic,
    /// Metrics on a stream declared as a payload type, or a payload on a stream declared `metrics`.
    WrongType,
    /// A fixed-width number whose payload is not exactly its width.
    BadLength,
    InvalidJson,
    InvalidText,
    /// A value above [`MAX_VALUE_BYTES`].
    Oversized,
    /// A metric that is NaN or infinite (JSON has no such numbers).
    NotFinite,
}

impl DropReason {
    pub const ALL: [Self; 9] = [
        Self::Undecodable,
        Self::UnknownDevice,
        Self::WrongTopic,
        Self::WrongType,
        Self::BadLength,
        Self::InvalidJson,
        Self::InvalidText,
        Self::Oversized,
        Self::NotFinite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::UnknownDevice => "unknown_device",
            Self::WrongTopic => "wrong_topic",
            Self::WrongType => "wrong_type",
            Self::BadLength => "bad_length",
            Self::InvalidJson => "invalid_json",
            Self::InvalidText => "invalid_text",
            Self::Oversized => "oversized",
            Self::NotFinite => "not_finite",
        }
    }
}

/// Decodes a record's value by its stream's type. Undeclared streams (`None`) are bytes or metrics, by payload.
pub fn decode_value(
    declared: Option<ContentType>,
    payload: &TelemetryPayload,
) -> Result<(ContentType, serde_json::Value), DropReason> {
    use serde_json::Value;
    match payload {
        TelemetryPayload::Metrics(m) => {
            if declared.is_some_and(|t| !t.is_metrics()) {
                return Err(DropReason::WrongType);
            }
            let mut out = serde_json::Map::new();
            let mut size = 0usize;
            for (name, v) in m {
                size += name.len() + 8;
                let n = serde_json::Number::from_f64(*v).ok_or(DropReason::NotFinite)?;
                out.insert(name.clone(), Value::Number(n));
            }
            if size > MAX_VALUE_BYTES {
                return Err(DropReason::Oversized);
            }
            Ok((ContentType::Metrics, Value::Object(out)))
        }
        TelemetryPayload::Bytes(b) => {
            let ty = declared.unwrap_or(ContentType::Bytes);
            if b.len() > MAX_VALUE_BYTES {
                return Err(DropReason::Oversized);
            }
            let fixed = |n: usize| -> Result<&[u8], DropReason> {
                (b.len() == n)
                    .then_some(b.as_slice())
                    .ok_or(DropReason::BadLength)
            };
            let float = |f: f64| {
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or(DropReason::NotFinite)
            };
            let value = match ty {
                ContentType::Metrics => return Err(DropReason::WrongType),
                ContentType::Bytes => {
                    Value::String(base64::engine::general_purpose::STANDARD.encode(b))
                }
                ContentType::Text => Value::String(
                    String::from_utf8(b.clone()).map_err(|_| DropReason::InvalidText)?,
                ),
                ContentType::Json => {
                    serde_json::from_slice(b).map_err(|_| DropReason::InvalidJson)?
                }
                ContentType::U64Le => Value::from(u64::from_le_bytes(array(fixed(8)?))),
                ContentType::I64Le => Value::from(i64::from_le_bytes(array(fixed(8)?))),
                ContentType::U32Le => Value::from(u32::from_le_bytes(array(fixed(4)?))),
                ContentType::I32Le => Value::from(i32::from_le_bytes(array(fixed(4)?))),
                ContentType::F64Le => float(f64::from_le_bytes(array(fixed(8)?)))?,
                ContentType::F32Le => float(f64::from(f32::from_le_bytes(array(fixed(4)?))))?,
            };
            Ok((ty, value))
        }
    }
}

/// The first `N` bytes of a slice already checked to be `N` long.
fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[..N]);
    out
}

/// One record as the JSON feed (`flotilla/v1/feed/json/{region}/{device}/{stream}`), the history API and
/// `flotilla telemetry tail` show it. `deploy/schemas/telemetry-feed.schema.json` is its JSON Schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedRecord {
    pub device: String,
    /// The device's region (`null` without one; its topic then uses `_none`).
    pub region: Option<String>,
    pub zone: Option<String>,
    /// The workload that declared the stream or whose metrics it carries; `null` for the agent's own stream and
    /// for undeclared streams.
    pub workload: Option<String>,
    pub stream: String,
    /// Per-device sequence number (gaps: records the device dropped from its outbox).
    pub seq: u64,
    /// When the device recorded it (Unix seconds, the device's clock).
    pub device_time: u64,
    /// When the hub accepted it (Unix seconds, millisecond precision).
    pub hub_time: f64,
    #[serde(rename = "type")]
    pub content_type: String,
    pub value: serde_json::Value,
}

/// One declaration of a stream: which deployment's workload declared it, as which type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declaration {
    pub deployment: String,
    pub workload: String,
    pub content_type: ContentType,
}

/// Every stream declaration of the stored deployments, and the devices each deployment is placed on, so that a
/// record on `(device, stream)` resolves to its workload and type without touching the store.
#[derive(Debug, Default)]
pub struct Declarations {
    by_stream: BTreeMap<String, Vec<Declaration>>,
    placed: BTreeMap<String, BTreeSet<DeviceId>>,
}

/// Which workload a record belongs to, and the type it is decoded as (`None`: undeclared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub workload: Option<String>,
    pub declared: Option<ContentType>,
}

impl Declarations {
    /// Replaces the declarations: (deployment, workload, stream, type) for every declared stream.
    pub fn set_declarations(
        &mut self,
        decls: impl IntoIterator<Item = (String, String, String, ContentType)>,
    ) {
        self.by_stream.clear();
        for (deployment, workload, stream, content_type) in decls {
            self.by_stream.entry(stream).or_default().push(Declaration {
                deployment,
                workload,
                content_type,
            });
        }
        let declaring: BTreeSet<&String> = self
            .by_stream
            .values()
            .flatten()
            .map(|d| &d.deployment)
            .collect();
        self.placed.retain(|dep, _| declaring.contains(dep));
    }

    /// Whether `deployment` declares any stream (only then does its placement matter here).
    pub fn declares(&self, deployment: &str) -> bool {
        self.by_stream
            .values()
            .flatten()
            .any(|d| d.deployment == deployment)
    }

    /// Records where a deployment is placed; `None` when it no longer exists.
    pub fn set_placement(&mut self, deployment: &str, devices: Option<BTreeSet<DeviceId>>) {
        match devices {
            Some(d) => {
                self.placed.insert(deployment.to_owned(), d);
            }
            None => {
                self.placed.remove(deployment);
            }
        }
    }

    /// Whether the stored placement of `deployment` is already `devices` (so the caller can skip a copy).
    pub fn placement_is(&self, deployment: &str, devices: &BTreeSet<DeviceId>) -> bool {
        self.placed.get(deployment) == Some(devices)
    }

    /// The workload and declared type of a record on `device`'s `stream`:
    /// - `agent` is the agent's own metrics; `<workload>.metrics` carries that workload's metrics;
    /// - otherwise a declaration by a workload of a deployment placed on the device wins (the first in deployment
    ///   and workload order when several are), then any declaration (a device between placements), else the
    ///   stream is undeclared.
    pub fn resolve(&self, device: &DeviceId, stream: &str) -> Resolved {
        if stream == "agent" {
            return Resolved {
                workload: None,
                declared: Some(ContentType::Metrics),
            };
        }
        if let Some(w) = stream.strip_suffix(".metrics") {
            return Resolved {
                workload: Some(w.to_owned()),
                declared: Some(ContentType::Metrics),
            };
        }
        let Some(decls) = self.by_stream.get(stream) else {
            return Resolved {
                workload: None,
                declared: None,
            };
        };
        let on_device = |d: &&Declaration| {
            self.placed
                .get(&d.deployment)
                .is_some_and(|p| p.contains(device))
        };
        let chosen = decls.iter().find(on_device).or_else(|| decls.first());
        Resolved {
            workload: chosen.map(|d| d.workload.clone()),
            declared: chosen.map(|d| d.content_type),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bytes(b: &[u8]) -> TelemetryPayload {
        TelemetryPayload::Bytes(b.to_vec())
    }

    #[test]
    fn values_decode_by_declared_type() {
        let big = vec![b'a'; MAX_VALUE_BYTES + 1];
        type Case = (
            Option<ContentType>,
            TelemetryPayload,
            Result<(&'static str, serde_json::Value), DropReason>,
        );
        let cases: Vec<Case> = vec![
            (None, bytes(b"\x00\xff"), Ok(("bytes", json!("AP8=")))),
            (
                Some(ContentType::Bytes),
                bytes(b""),
                Ok(("bytes", json!(""))),
            ),
            (
                Some(ContentType::Text),
                bytes("grüße".as_bytes()),
                Ok(("text", json!("grüße"))),
            ),
            (
                Some(ContentType::Text),
                bytes(b"\xff\xfe"),
                Err(DropReason::InvalidText),
            ),
            (
                Some(ContentType::Json),
                bytes(br#"{"t":21.5,"ok":true}"#),
                Ok(("json", json!({"t": 21.5, "ok": true}))),
            ),
            (
                Some(ContentType::Json),
                bytes(b"{\"t\":"),
                Err(DropReason::InvalidJson),
            ),
            (
                Some(ContentType::Json),
                bytes(b""),
                Err(DropReason::InvalidJson),
            ),
            (
                Some(ContentType::U64Le),
                bytes(&u64::MAX.to_le_bytes()),
                Ok(("u64le", json!(u64::MAX))),
            ),
            (
                Some(ContentType::U64Le),
                bytes(&7u32.to_le_bytes()),
                Err(DropReason::BadLength),
            ),
            (
                Some(ContentType::I64Le),
                bytes(&(-5i64).to_le_bytes()),
                Ok(("i64le", json!(-5))),
            ),
            (
                Some(ContentType::U32Le),
                bytes(&9u32.to_le_bytes()),
                Ok(("u32le", json!(9))),
            ),
            (
                Some(ContentType::I32Le),
                bytes(&(-9i32).to_le_bytes()),
                Ok(("i32le", json!(-9))),
            ),
            (
                Some(ContentType::I32Le),
                bytes(&[1, 2, 3]),
                Err(DropReason::BadLength),
            ),
            (
                Some(ContentType::F64Le),
                bytes(&21.25f64.to_le_bytes()),
                Ok(("f64le", json!(21.25))),
            ),
            (
                Some(ContentType::F64Le),
                bytes(&f64::NAN.to_le_bytes()),
                Err(DropReason::NotFinite),
            ),
            (
                Some(ContentType::F32Le),
                bytes(&0.5f32.to_le_bytes()),
                Ok(("f32le", json!(0.5))),
            ),
            (
                Some(ContentType::F32Le),
                bytes(&f32::INFINITY.to_le_bytes()),
                Err(DropReason::NotFinite),
            ),
            (
                Some(ContentType::Json),
                bytes(&big),
                Err(DropReason::Oversized),
            ),
            (None, bytes(&big), Err(DropReason::Oversized)),
            (
                None,
                TelemetryPayload::Metrics(vec![("cpu".into(), 0.25), ("mem".into(), 3.0)]),
                Ok(("metrics", json!({"cpu": 0.25, "mem": 3.0}))),
            ),
            (
                Some(ContentType::Metrics),
                TelemetryPayload::Metrics(vec![("x".into(), f64::INFINITY)]),
                Err(DropReason::NotFinite),
            ),
            (
                Some(ContentType::Json),
                TelemetryPayload::Metrics(vec![("x".into(), 1.0)]),
                Err(DropReason::WrongType),
            ),
            (
                Some(ContentType::Metrics),
                bytes(b"1"),
                Err(DropReason::WrongType),
            ),
        ];
        for (i, (declared, payload, want)) in cases.into_iter().enumerate() {
            let got = decode_value(declared, &payload).map(|(t, v)| (t.name(), v));
            assert_eq!(got, want, "case {i}: {declared:?} {payload:?}");
        }
    }

    #[test]
    fn content_type_names_round_trip() {
        for t in ContentType::ALL {
            assert_eq!(ContentType::parse(t.name()), Some(t));
        }
        assert_eq!(ContentType::parse("u128le"), None);
    }

    #[test]
    fn records_resolve_to_their_workload_and_type() {
        let mut d = Declarations::default();
        d.set_declarations([
            (
                "sensors".into(),
                "temp".into(),
                "readings".into(),
                ContentType::Json,
            ),
            (
                "sensors".into(),
                "temp".into(),
                "count".into(),
                ContentType::U64Le,
            ),
            (
                "legacy".into(),
                "old".into(),
                "readings".into(),
                ContentType::Text,
            ),
        ]);
        let id = |s: &str| DeviceId::new(s).expect("id");
        d.set_placement("sensors", Some([id("gw-1")].into()));
        d.set_placement("legacy", Some([id("gw-2")].into()));
        let r = |w: Option<&str>, t: Option<ContentType>| Resolved {
            workload: w.map(str::to_owned),
            declared: t,
        };
        let cases = [
            ("gw-1", "agent", r(None, Some(ContentType::Metrics))),
            (
                "gw-1",
                "temp.metrics",
                r(Some("temp"), Some(ContentType::Metrics)),
            ),
            ("gw-1", "readings", r(Some("temp"), Some(ContentType::Json))),
            // The same stream name declared by another deployment placed on this device.
            ("gw-2", "readings", r(Some("old"), Some(ContentType::Text))),
            // Placed on neither: the first declaration.
            ("gw-3", "readings", r(Some("temp"), Some(ContentType::Json))),
            ("gw-1", "count", r(Some("temp"), Some(ContentType::U64Le))),
            ("gw-1", "raw", r(None, None)),
        ];
        for (device, stream, want) in cases {
            assert_eq!(d.resolve(&id(device), stream), want, "{device} {stream}");
        }
        d.set_placement("legacy", None);
        assert_eq!(
            d.resolve(&id("gw-2"), "readings"),
            r(Some("temp"), Some(ContentType::Json))
        );
        assert!(d.placement_is("sensors", &[id("gw-1")].into()));
    }
}
