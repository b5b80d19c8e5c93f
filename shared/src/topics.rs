//! The MQTT topic scheme under `flotilla/v1/`. Every topic is built and parsed here, nowhere else.
//!
//! | topic | direction | retained | payload |
//! |---|---|---|---|
//! | `flotilla/v1/dev/{device}/desired` | hub -> agent | yes | `DesiredState` (hub-signed) |
//! | `flotilla/v1/dev/{device}/root` | hub -> agent | yes | `RootUpdate` |
//! | `flotilla/v1/dev/{device}/report` | agent -> hub | no | `Report` (device-signed) |
//! | `flotilla/v1/dev/{device}/presence` | agent -> hub, last will | yes | `Presence` |
//! | `flotilla/v1/dev/{device}/artifact/req` | agent -> hub | no | `ArtifactRequest` |
//! | `flotilla/v1/dev/{device}/artifact/chunk` | hub -> agent | no | `ArtifactChunk` |
//! | `flotilla/v1/dev/{device}/cert/req` | agent -> hub | no | `CredentialRequest` |
//! | `flotilla/v1/dev/{device}/cert/resp` | hub -> agent | no | `CredentialResponse` |
//! | `flotilla/v1/telemetry/{region}/{device}/{stream}` | agent -> consumers | no | `Telemetry` |
//! | `flotilla/v1/feed/json/{region}/{device}/{stream}` | hub -> consumers | no | one JSON record |
//! | `flotilla/v1/enroll/enroll-{nonce}/req` | agent -> hub | no | `EnrollRequest` |
//! | `flotilla/v1/enroll/enroll-{nonce}/resp` | hub -> agent | no | `EnrollResponse` |

use crate::ids::{DeviceId, Label};

/// Prefix of every Flotilla topic; the version changes only with an incompatible topic layout.
pub const PREFIX: &str = "flotilla/v1";
/// Region level used in telemetry topics for devices that have no region.
pub const NO_REGION: &str = "_none";

/// A per-device topic leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTopic {
    Desired,
    Root,
    Report,
    Presence,
    ArtifactRequest,
    ArtifactChunk,
    CredentialRequest,
    CredentialResponse,
    /// Hub -> device: send the last lines of a workload's output.
    LogsRequest,
    /// Device -> hub: the lines asked for.
    LogsResponse,
}

impl DeviceTopic {
    fn leaf(self) -> &'static str {
        match self {
            Self::Desired => "desired",
            Self::Root => "root",
            Self::Report => "report",
            Self::Presence => "presence",
            Self::ArtifactRequest => "artifact/req",
            Self::ArtifactChunk => "artifact/chunk",
            Self::CredentialRequest => "cert/req",
            Self::CredentialResponse => "cert/resp",
            Self::LogsRequest => "logs/req",
            Self::LogsResponse => "logs/resp",
        }
    }
    const ALL: [Self; 10] = [
        Self::Desired,
        Self::Root,
        Self::Report,
        Self::Presence,
        Self::ArtifactRequest,
        Self::ArtifactChunk,
        Self::CredentialRequest,
        Self::CredentialResponse,
        Self::LogsRequest,
        Self::LogsResponse,
    ];
}

/// The topic for `leaf` of `device`.
pub fn device(device: &DeviceId, leaf: DeviceTopic) -> String {
    format!("{PREFIX}/dev/{device}/{}", leaf.leaf())
}

/// Subscription filter matching `leaf` of every device (the hub's view).
pub fn all_devices(leaf: DeviceTopic) -> String {
    format!("{PREFIX}/dev/+/{}", leaf.leaf())
}

/// Parses a per-device topic into its device id and leaf. Unknown or malformed topics give `None`.
pub fn parse_device(topic: &str) -> Option<(DeviceId, DeviceTopic)> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix("/dev/")?;
    let (id, leaf) = rest.split_once('/')?;
    let id = DeviceId::new(id).ok()?;
    DeviceTopic::ALL
        .into_iter()
        .find(|t| t.leaf() == leaf)
        .map(|t| (id, t))
}

/// Telemetry feed topic. Consumers subscribe per region with `flotilla/v1/telemetry/{region}/#`.
pub fn telemetry(region: Option<&Label>, device: &DeviceId, stream: &Label) -> String {
    let region = region.map_or(NO_REGION, Label::as_str);
    format!("{PREFIX}/telemetry/{region}/{device}/{stream}")
}

/// The hub's JSON republication of one accepted telemetry record (`region` is [`NO_REGION`] for none).
pub fn feed_json(region: &str, device: &str, stream: &str) -> String {
    format!("{PREFIX}/feed/json/{region}/{device}/{stream}")
}

/// Prefix of the JSON feed's topics, before the region level.
pub const FEED_JSON_PREFIX: &str = "flotilla/v1/feed/json/";
/// Prefix of the Sparkplug B feed's topics (`spBv1.0/{group = region}/{NBIRTH|NDATA|NDEATH}/{device}`).
pub const SPARKPLUG_PREFIX: &str = "spBv1.0/";

/// Subscription filter for the whole telemetry feed, or one region of it.
pub fn telemetry_filter(region: Option<&Label>) -> String {
    match region {
        Some(r) => format!("{PREFIX}/telemetry/{r}/#"),
        None => format!("{PREFIX}/telemetry/#"),
    }
}

/// Parses a telemetry topic into (region, device, stream).
pub fn parse_telemetry(topic: &str) -> Option<(String, DeviceId, Label)> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix("/telemetry/")?;
    let mut parts = rest.split('/');
    let (region, device, stream) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some((
        region.to_owned(),
        DeviceId::new(device).ok()?,
        Label::new(stream).ok()?,
    ))
}

/// Enrollment request/response topics for one attempt. The nonce is random hex chosen by the agent, which connects
/// with client id `enroll-{nonce}`; the topic level is that client id, so an external broker can confine an
/// anonymous client to its own enrollment topics with a client-id pattern (Mosquitto's `%c`).
pub fn enroll_request(nonce: &str) -> String {
    format!("{PREFIX}/enroll/{ENROLL_CLIENT_PREFIX}{nonce}/req")
}
pub fn enroll_response(nonce: &str) -> String {
    format!("{PREFIX}/enroll/{ENROLL_CLIENT_PREFIX}{nonce}/resp")
}
/// Client-id prefix of an enrolling agent (`enroll-{nonce}`).
pub const ENROLL_CLIENT_PREFIX: &str = "enroll-";
/// The hub's subscription to every enrollment request.
pub const ENROLL_REQUESTS: &str = "flotilla/v1/enroll/+/req";

/// Parses the nonce out of an enrollment request topic; only 16-64 lowercase hex characters are accepted.
pub fn parse_enroll_request(topic: &str) -> Option<&str> {
    let nonce = topic
        .strip_prefix(PREFIX)?
        .strip_prefix("/enroll/")?
        .strip_prefix(ENROLL_CLIENT_PREFIX)?
        .strip_suffix("/req")?;
    let ok = (16..=64).contains(&nonce.len())
        && nonce
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then_some(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every per-device topic parses back to the device and leaf it was built from; foreign topics do not parse.
    #[test]
    fn device_topics_round_trip() {
        let id = DeviceId::new("gw-7").expect("valid");
        for leaf in DeviceTopic::ALL {
            assert_eq!(parse_device(&device(&id, leaf)), Some((id.clone(), leaf)));
        }
        for bad in [
            "flotilla/v1/dev/gw-7/other",
            "flotilla/v1/dev/GW/report",
            "flotilla/v2/dev/a/report",
            "x",
        ] {
            assert_eq!(parse_device(bad), None, "{bad}");
        }
        assert_eq!(all_devices(DeviceTopic::Report), "flotilla/v1/dev/+/report");
    }

    /// Telemetry topics put the region first so a consumer can subscribe to one region with a wildcard.
    #[test]
    fn telemetry_topics() {
        let id = DeviceId::new("gw-7").expect("valid");
        let region = Label::new("eu-west").expect("valid");
        let stream = Label::new("temp").expect("valid");
        let t = telemetry(Some(&region), &id, &stream);
        assert_eq!(t, "flotilla/v1/telemetry/eu-west/gw-7/temp");
        assert!(t.starts_with(telemetry_filter(Some(&region)).trim_end_matches('#')));
        assert_eq!(
            parse_telemetry(&t),
            Some(("eu-west".into(), id.clone(), stream.clone()))
        );
        assert_eq!(
            telemetry(None, &id, &stream),
            "flotilla/v1/telemetry/_none/gw-7/temp"
        );
        assert_eq!(
            parse_enroll_request(&enroll_request("0123456789abcdef")),
            Some("0123456789abcdef")
        );
        assert_eq!(
            enroll_request("0123456789abcdef"),
            "flotilla/v1/enroll/enroll-0123456789abcdef/req"
        );
        assert_eq!(parse_enroll_request("flotilla/v1/enroll/+/req"), None);
        assert_eq!(
            parse_enroll_request("flotilla/v1/enroll/0123456789abcdef/req"),
            None
        );
    }
}
