//! The MQTT access policy, sans-IO: who may connect as what, and what each identity may publish and subscribe to.
//! Derived from the identity alone, with no per-device configuration:
//!
//! | principal | publish | retained publish / will | subscribe |
//! |---|---|---|---|
//! | `hub` | everything | everything | everything |
//! | `device:{id}` | its own `report`, `artifact/req`, `cert/req`, `logs/resp`, `presence`; telemetry under its own region and id | its own `presence` | exactly its own `desired`, `root`, `artifact/chunk`, `cert/resp`, `logs/req` |
//! | `feed:{name}` | Sparkplug `NCMD` (rebirth requests) to nodes of its regions | nothing | telemetry, JSON feed and Sparkplug filters whose region level is one of its regions |
//! | `enroll:{nonce}` (anonymous) | its own `enroll/enroll-{nonce}/req` | nothing | exactly its own `enroll/enroll-{nonce}/resp` |
//!
//! Client ids are namespaced per principal so that no identity can take over another's session: a device connects
//! with its id, the hub with `flotilla-hub-*`, a feed consumer with `feed-{name}` or `feed-{name}-*`, an
//! enrollment with `enroll-{nonce}`. Device ids that would collide with those namespaces are refused at
//! enrollment ([`reserved_device_id`]).

use flotilla_shared::DeviceId;
use flotilla_shared::topics::{self, NO_REGION, PREFIX};

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Hub,
    Device(DeviceId),
    Feed(String),
    Enroll(String),
}

impl Principal {
    /// The broker's name for it (`hub`, `device:gw-1`, `feed:grafana`, `enroll:ab12...`).
    pub fn name(&self) -> String {
        match self {
            Self::Hub => "hub".into(),
            Self::Device(d) => format!("device:{d}"),
            Self::Feed(n) => format!("feed:{n}"),
            Self::Enroll(n) => format!("enroll:{n}"),
        }
    }

    /// Parses a broker principal name back.
    pub fn parse(name: &str) -> Option<Self> {
        if name == "hub" {
            return Some(Self::Hub);
        }
        let (kind, rest) = name.split_once(':')?;
        match kind {
            "device" => DeviceId::new(rest).ok().map(Self::Device),
            "feed" => Some(Self::Feed(rest.to_owned())),
            "enroll" => Some(Self::Enroll(rest.to_owned())),
            _ => None,
        }
    }
}

/// What a connection asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Publish,
    PublishRetained,
    Subscribe,
    Will,
}

/// The client-id prefix reserved for the hub's own connections.
pub const HUB_CLIENT_PREFIX: &str = "flotilla-hub-";

/// Device ids that would fall into another principal's client-id namespace.
pub fn reserved_device_id(id: &str) -> bool {
    id.starts_with("enroll-") || id.starts_with("feed-") || id.starts_with("flotilla-hub")
}

/// Whether `client_id` belongs to `principal`'s namespace.
pub fn client_id_ok(principal: &Principal, client_id: &str) -> bool {
    match principal {
        Principal::Hub => client_id.starts_with(HUB_CLIENT_PREFIX),
        Principal::Device(d) => client_id == d.as_str(),
        Principal::Feed(n) => {
            let base = format!("feed-{n}");
            client_id == base || client_id.starts_with(&format!("{base}-"))
        }
        Principal::Enroll(nonce) => client_id == format!("enroll-{nonce}"),
    }
}

/// The nonce of an anonymous enrollment client id (`enroll-<16..64 lowercase hex>`).
pub fn enrollment_nonce(client_id: &str) -> Option<&str> {
    let nonce = client_id.strip_prefix("enroll-")?;
    topics::parse_enroll_request(&topics::enroll_request(nonce)).map(|_| nonce)
}

/// The facts about a principal the policy needs beyond its name.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// A device's registered region (`None`: it publishes telemetry under `_none`).
    pub region: Option<String>,
    /// A feed consumer's regions.
    pub regions: Vec<String>,
}

/// Whether `principal` may do `access` on `topic` (a filter when subscribing).
pub fn allow(principal: &Principal, facts: &Facts, access: Access, topic: &str) -> bool {
    match principal {
        Principal::Hub => true,
        Principal::Device(d) => device_allows(d.as_str(), facts.region.as_deref(), access, topic),
        Principal::Feed(_) => feed_allows(&facts.regions, access, topic),
        Principal::Enroll(nonce) => enroll_allows(nonce, access, topic),
    }
}

// The checks below run for every message a device sends, on the broker's connection tasks: they compare slices
// of the topic and allocate nothing.

/// `flotilla/v1/dev/{id}/{leaf}` split into (id, leaf).
fn split_device(topic: &str) -> Option<(&str, &str)> {
    topic
        .strip_prefix(PREFIX)?
        .strip_prefix("/dev/")?
        .split_once('/')
}

/// What device `id` (registered in `region`) may do on `topic`.
pub fn device_allows(id: &str, region: Option<&str>, access: Access, topic: &str) -> bool {
    if let Some((owner, leaf)) = split_device(topic) {
        if owner != id {
            return false;
        }
        return match access {
            Access::Subscribe => {
                matches!(
                    leaf,
                    "desired" | "root" | "artifact/chunk" | "cert/resp" | "logs/req"
                )
            }
            Access::Will | Access::PublishRetained => leaf == "presence",
            Access::Publish => matches!(
                leaf,
                "report" | "presence" | "artifact/req" | "cert/req" | "logs/resp"
            ),
        };
    }
    access == Access::Publish && own_telemetry(id, region, topic)
}

/// `flotilla/v1/telemetry/{its region}/{its id}/{one stream level}`.
fn own_telemetry(id: &str, region: Option<&str>, topic: &str) -> bool {
    let Some(rest) = topic
        .strip_prefix(PREFIX)
        .and_then(|t| t.strip_prefix("/telemetry/"))
    else {
        return false;
    };
    let mut parts = rest.splitn(3, '/');
    let (Some(r), Some(owner), Some(stream)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    r == region.unwrap_or(NO_REGION)
        && owner == id
        && !stream.is_empty()
        && !stream.contains(['/', '+', '#'])
}

/// A feed consumer subscribes to telemetry filters whose region level is literally one of `regions` (the levels
/// after it may be wildcards), and publishes only Sparkplug B commands to its regions' nodes (rebirth requests, as
/// a Sparkplug host application sends them), never retained.
pub fn feed_allows(regions: &[String], access: Access, filter: &str) -> bool {
    if access == Access::Publish {
        return crate::telemetry::sparkplug::parse_ncmd(filter).is_some_and(|(group, node)| {
            regions.iter().any(|r| r == group) && !node.contains(['+', '#'])
        });
    }
    if access != Access::Subscribe {
        return false;
    }
    // The raw feed (postcard records) and the hub's JSON republication of it, per region alike.
    let Some(rest) = filter
        .strip_prefix(PREFIX)
        .and_then(|t| t.strip_prefix("/telemetry/"))
        .or_else(|| filter.strip_prefix(topics::FEED_JSON_PREFIX))
        .or_else(|| filter.strip_prefix(topics::SPARKPLUG_PREFIX))
    else {
        return false;
    };
    let region = rest.split('/').next().unwrap_or("");
    regions.iter().any(|r| r == region)
}

/// An anonymous enrollment publishes its own request and subscribes to its own response, nothing else.
pub fn enroll_allows(nonce: &str, access: Access, topic: &str) -> bool {
    let Some(rest) = topic
        .strip_prefix(PREFIX)
        .and_then(|t| t.strip_prefix("/enroll/"))
        .and_then(|t| t.strip_prefix(topics::ENROLL_CLIENT_PREFIX))
        .and_then(|t| t.strip_prefix(nonce))
    else {
        return false;
    };
    match access {
        Access::Publish => rest == "/req",
        Access::Subscribe => rest == "/resp",
        Access::PublishRetained | Access::Will => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str) -> Principal {
        Principal::Device(DeviceId::new(id).expect("id"))
    }

    /// The ACL matrix for every identity against own topics, another device's, `#`, `+` patterns and `$SYS`:
    /// each row is (principal, access, topic, allowed).
    #[test]
    fn acl_matrix() {
        let a = device("gw-a");
        let eu = Facts {
            region: Some("eu-west".into()),
            ..Facts::default()
        };
        let feed = Principal::Feed("grafana".into());
        let feed_facts = Facts {
            regions: vec!["eu-west".into()],
            ..Facts::default()
        };
        let nonce = "0123456789abcdef";
        let enroll = Principal::Enroll(nonce.into());
        use Access::*;
        let rows: &[(&Principal, &Facts, Access, &str, bool)] = &[
            (&a, &eu, Subscribe, "flotilla/v1/dev/gw-a/desired", true),
            (&a, &eu, Subscribe, "flotilla/v1/dev/gw-a/root", true),
            (
                &a,
                &eu,
                Subscribe,
                "flotilla/v1/dev/gw-a/artifact/chunk",
                true,
            ),
            (&a, &eu, Subscribe, "flotilla/v1/dev/gw-a/cert/resp", true),
            (&a, &eu, Subscribe, "flotilla/v1/dev/gw-b/cert/resp", false),
            (&a, &eu, Subscribe, "flotilla/v1/dev/gw-a/cert/req", false),
            (&a, &eu, Publish, "flotilla/v1/dev/gw-a/cert/req", true),
            (&a, &eu, Publish, "flotilla/v1/dev/gw-b/cert/req", false),
            (&a, &eu, Subscribe, "flotilla/v1/dev/gw-a/logs/req", true),
            (&a, &eu, Subscribe, "flotilla/v1/dev/gw-b/logs/req", false),
            (&a, &eu, Publish, "flotilla/v1/dev/gw-a/logs/resp", true),
            (&a, &eu, Publish, "flotilla/v1/dev/gw-b/logs/resp", false),
            (&a, &eu, Publish, "flotilla/v1/dev/gw-a/logs/req", false),
            (&a, &eu, Publish, "flotilla/v1/dev/gw-a/cert/resp", false),
            (&a, &eu, Subscribe, "flotilla/v1/dev/gw-a/report", false),
            (&a, &eu, Subscribe, "flotilla/v1/dev/gw-b/desired", false),
            (&a, &eu, Subscribe, "flotilla/v1/dev/+/desired", false),
            (&a, &eu, Subscribe, "flotilla/v1/dev/gw-a/#", false),
            (&a, &eu, Subscribe, "#", false),
            (&a, &eu, Subscribe, "$SYS/#", false),
            (&a, &eu, Subscribe, "flotilla/v1/telemetry/#", false),
            (&a, &eu, Publish, "flotilla/v1/dev/gw-a/report", true),
            (&a, &eu, Publish, "flotilla/v1/dev/gw-a/artifact/req", true),
            (&a, &eu, Publish, "flotilla/v1/dev/gw-a/presence", true),
            (&a, &eu, Publish, "flotilla/v1/dev/gw-b/report", false),
            (&a, &eu, Publish, "flotilla/v1/dev/gw-a/desired", false),
            (
                &a,
                &eu,
                Publish,
                "flotilla/v1/telemetry/eu-west/gw-a/count",
                true,
            ),
            (
                &a,
                &eu,
                Publish,
                "flotilla/v1/telemetry/us-east/gw-a/count",
                false,
            ),
            (
                &a,
                &eu,
                Publish,
                "flotilla/v1/telemetry/eu-west/gw-b/count",
                false,
            ),
            (
                &a,
                &eu,
                Publish,
                "flotilla/v1/telemetry/eu-west/gw-a/x/y",
                false,
            ),
            (
                &a,
                &Facts::default(),
                Publish,
                "flotilla/v1/telemetry/_none/gw-a/count",
                true,
            ),
            (
                &a,
                &eu,
                PublishRetained,
                "flotilla/v1/dev/gw-a/presence",
                true,
            ),
            (
                &a,
                &eu,
                PublishRetained,
                "flotilla/v1/dev/gw-a/desired",
                false,
            ),
            (
                &a,
                &eu,
                PublishRetained,
                "flotilla/v1/dev/gw-b/presence",
                false,
            ),
            (&a, &eu, Will, "flotilla/v1/dev/gw-a/presence", true),
            (&a, &eu, Will, "flotilla/v1/dev/gw-b/presence", false),
            (
                &feed,
                &feed_facts,
                Subscribe,
                "flotilla/v1/telemetry/eu-west/#",
                true,
            ),
            (
                &feed,
                &feed_facts,
                Subscribe,
                "flotilla/v1/telemetry/eu-west/+/count",
                true,
            ),
            (
                &feed,
                &feed_facts,
                Subscribe,
                "flotilla/v1/telemetry/us-east/#",
                false,
            ),
            (
                &feed,
                &feed_facts,
                Subscribe,
                "flotilla/v1/telemetry/+/gw-a/count",
                false,
            ),
            (
                &feed,
                &feed_facts,
                Subscribe,
                "flotilla/v1/telemetry/#",
                false,
            ),
            (
                &feed,
                &feed_facts,
                Subscribe,
                "flotilla/v1/dev/+/desired",
                false,
            ),
            (&feed, &feed_facts, Subscribe, "#", false),
            (
                &feed,
                &feed_facts,
                Subscribe,
                "flotilla/v1/feed/json/eu-west/#",
                true,
            ),
            (
                &feed,
                &feed_facts,
                Subscribe,
                "flotilla/v1/feed/json/eu-west/gw-a/+",
                true,
            ),
            (
                &feed,
                &feed_facts,
                Subscribe,
                "flotilla/v1/feed/json/us-east/#",
                false,
            ),
            (
                &feed,
                &feed_facts,
                Subscribe,
                "flotilla/v1/feed/json/+/gw-a/x",
                false,
            ),
            (
                &feed,
                &feed_facts,
                Subscribe,
                "flotilla/v1/feed/json/#",
                false,
            ),
            (&feed, &feed_facts, Subscribe, "flotilla/v1/feed/#", false),
            (&feed, &feed_facts, Subscribe, "spBv1.0/eu-west/#", true),
            (
                &feed,
                &feed_facts,
                Subscribe,
                "spBv1.0/eu-west/NDATA/+",
                true,
            ),
            (&feed, &feed_facts, Subscribe, "spBv1.0/us-east/#", false),
            (&feed, &feed_facts, Subscribe, "spBv1.0/#", false),
            (&feed, &feed_facts, Subscribe, "spBv1.0/+/NBIRTH/+", false),
            (
                &feed,
                &feed_facts,
                Publish,
                "spBv1.0/eu-west/NCMD/gw-a",
                true,
            ),
            (
                &feed,
                &feed_facts,
                PublishRetained,
                "spBv1.0/eu-west/NCMD/gw-a",
                false,
            ),
            (
                &feed,
                &feed_facts,
                Publish,
                "spBv1.0/us-east/NCMD/gw-b",
                false,
            ),
            (
                &feed,
                &feed_facts,
                Publish,
                "spBv1.0/eu-west/NDATA/gw-a",
                false,
            ),
            (
                &feed,
                &feed_facts,
                Publish,
                "spBv1.0/eu-west/NCMD/gw-a/x",
                false,
            ),
            (&a, &eu, Publish, "spBv1.0/eu-west/NDATA/gw-a", false),
            (
                &feed,
                &feed_facts,
                Publish,
                "flotilla/v1/feed/json/eu-west/gw-a/x",
                false,
            ),
            // Only the hub writes the JSON feed: a device cannot forge records there.
            (
                &a,
                &eu,
                Publish,
                "flotilla/v1/feed/json/eu-west/gw-a/count",
                false,
            ),
            (&a, &eu, Subscribe, "flotilla/v1/feed/json/eu-west/#", false),
            (&feed, &feed_facts, Subscribe, "$SYS/#", false),
            (
                &feed,
                &feed_facts,
                Publish,
                "flotilla/v1/telemetry/eu-west/gw-a/count",
                false,
            ),
            (
                &enroll,
                &Facts::default(),
                Publish,
                "flotilla/v1/enroll/enroll-0123456789abcdef/req",
                true,
            ),
            (
                &enroll,
                &Facts::default(),
                Publish,
                "flotilla/v1/enroll/enroll-fedcba9876543210/req",
                false,
            ),
            (
                &enroll,
                &Facts::default(),
                Subscribe,
                "flotilla/v1/enroll/enroll-0123456789abcdef/resp",
                true,
            ),
            (
                &enroll,
                &Facts::default(),
                Subscribe,
                "flotilla/v1/enroll/+/resp",
                false,
            ),
            (
                &enroll,
                &Facts::default(),
                Subscribe,
                "flotilla/v1/enroll/+/req",
                false,
            ),
            (
                &enroll,
                &Facts::default(),
                PublishRetained,
                "flotilla/v1/enroll/enroll-0123456789abcdef/req",
                false,
            ),
            (&enroll, &Facts::default(), Subscribe, "#", false),
            (
                &Principal::Hub,
                &Facts::default(),
                PublishRetained,
                "flotilla/v1/dev/gw-a/desired",
                true,
            ),
            (
                &Principal::Hub,
                &Facts::default(),
                Subscribe,
                "flotilla/v1/dev/+/report",
                true,
            ),
        ];
        for (p, f, access, topic, want) in rows {
            assert_eq!(
                allow(p, f, *access, topic),
                *want,
                "{p:?} {access:?} {topic}"
            );
        }
    }

    /// Client ids are namespaced per principal, and device ids that would enter another namespace are reserved.
    #[test]
    fn client_id_namespaces() {
        let a = device("gw-a");
        assert!(client_id_ok(&a, "gw-a"));
        assert!(!client_id_ok(&a, "gw-b"));
        assert!(client_id_ok(&Principal::Hub, "flotilla-hub-1f2e"));
        assert!(!client_id_ok(&Principal::Hub, "gw-a"));
        let feed = Principal::Feed("grafana".into());
        assert!(client_id_ok(&feed, "feed-grafana") && client_id_ok(&feed, "feed-grafana-2"));
        assert!(!client_id_ok(&feed, "gw-a") && !client_id_ok(&feed, "feed-grafanax"));
        assert_eq!(
            enrollment_nonce("enroll-0123456789abcdef"),
            Some("0123456789abcdef")
        );
        assert_eq!(enrollment_nonce("enroll-short"), None);
        assert_eq!(enrollment_nonce("gw-a"), None);
        for id in ["enroll-0123456789abcdef", "feed-x", "flotilla-hub-1"] {
            assert!(reserved_device_id(id), "{id}");
        }
        assert!(!reserved_device_id("gw-a"));
        for p in [a, Principal::Hub, feed, Principal::Enroll("ab".into())] {
            assert_eq!(Principal::parse(&p.name()), Some(p));
        }
    }
}
