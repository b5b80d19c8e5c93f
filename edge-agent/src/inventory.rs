//! What the device says about itself: its inventory (labels, region, zone, position, architecture, runtimes,
//! memory, agent version) and its position from the configured source.

use crate::config::{Config, PositionSource};
use flotilla_shared::wire::{Inventory, LatLon, WorkloadKind};

/// The device's inventory as configured, at `position`, with the public key its secrets are sealed to.
pub(crate) fn inventory(
    cfg: &Config,
    position: Option<LatLon>,
    sealing_key: Option<[u8; 32]>,
    container_engine: Option<flotilla_shared::wire::ContainerEngine>,
) -> Inventory {
    let mut runtimes = vec![WorkloadKind::Wasm];
    if container_engine.is_some() {
        runtimes.push(WorkloadKind::Container);
    }
    Inventory {
        labels: cfg
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        region: cfg.region.clone(),
        zone: cfg.zone.clone(),
        location: position,
        arch: std::env::consts::ARCH.to_owned(),
        runtimes,
        memory_mib: cfg.max_memory_mib,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        sealing_key,
        container_engine,
        // Filled in by the loop (`system.rs`), which knows the booted slot and the running release.
        firmware: None,
        agent_release: None,
    }
}

/// The position file's format: a JSON object with `lat` and `lon` in degrees (WGS 84). Other fields (a GPS
/// daemon's `accuracy_m`, `source`, `at`, ...) are ignored.
#[derive(Debug, serde::Deserialize)]
struct PositionFile {
    lat: f64,
    lon: f64,
}

/// Reads the position source once. A file that is missing, is not such an object, or holds an impossible
/// position means "position unknown", never a bogus position.
pub(crate) fn read_position(src: &PositionSource) -> Option<LatLon> {
    let p = match src {
        PositionSource::None => return None,
        PositionSource::Static(p) => *p,
        PositionSource::File(path) => {
            let text = std::fs::read_to_string(path).ok()?;
            let f: PositionFile = serde_json::from_str(&text).ok()?;
            LatLon {
                lat: f.lat,
                lon: f.lon,
            }
        }
    };
    (p.lat.is_finite() && p.lon.is_finite() && p.lat.abs() <= 90.0 && p.lon.abs() <= 180.0)
        .then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Position files with bad or out-of-range values mean "position unknown", never a bogus position.
    #[test]
    fn position_file_parsing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pos.json");
        let cases = [
            (
                "{\"lat\": 52.5, \"lon\": 13.4}",
                Some(LatLon {
                    lat: 52.5,
                    lon: 13.4,
                }),
            ),
            ("{\"lat\": 95.0, \"lon\": 13.4}", None),
            ("{\"lat\": \"x\"}", None),
            ("garbage", None),
            // A GPS daemon's extra fields are ignored, whatever their type.
            (
                "{\"lat\": 48.1, \"lon\": 11.6, \"accuracy_m\": 4.5, \"source\": \"gps\", \"sats\": [1, 2]}",
                Some(LatLon {
                    lat: 48.1,
                    lon: 11.6,
                }),
            ),
            ("{\"lon\": 11.6}", None),
        ];
        for (text, want) in cases {
            std::fs::write(&path, text).expect("write");
            assert_eq!(
                read_position(&PositionSource::File(path.clone())),
                want,
                "{text}"
            );
        }
        assert_eq!(
            read_position(&PositionSource::File(dir.path().join("missing"))),
            None
        );
    }
}
