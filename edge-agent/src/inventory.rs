//! What the device says about itself: its inventory (labels, region, zone, position, architecture, runtimes,
//! memory, agent version) and its position from the configured source.

use crate::config::{Config, PositionSource};
use flotilla_shared::wire::{Inventory, LatLon, WorkloadKind};

/// The device's inventory as configured, at `position`.
pub(crate) fn inventory(cfg: &Config, position: Option<LatLon>) -> Inventory {
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
        runtimes: vec![WorkloadKind::Wasm],
        memory_mib: cfg.max_memory_mib,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// Reads the position source once. A file that is missing or malformed means "position unknown".
pub(crate) fn read_position(src: &PositionSource) -> Option<LatLon> {
    match src {
        PositionSource::None => None,
        PositionSource::Static(p) => Some(*p),
        PositionSource::File(path) => {
            let text = std::fs::read_to_string(path).ok()?;
            let (mut lat, mut lon) = (None, None);
            // `{"lat": 52.5, "lon": 13.4}`: parsed by hand to keep serde_json out of the agent.
            for part in text
                .trim()
                .trim_start_matches('{')
                .trim_end_matches('}')
                .split(',')
            {
                let (k, v) = part.split_once(':')?;
                let v: f64 = v.trim().parse().ok()?;
                match k.trim().trim_matches('"') {
                    "lat" => lat = Some(v),
                    "lon" => lon = Some(v),
                    _ => {}
                }
            }
            let p = LatLon {
                lat: lat?,
                lon: lon?,
            };
            (p.lat.is_finite() && p.lon.is_finite() && p.lat.abs() <= 90.0 && p.lon.abs() <= 180.0)
                .then_some(p)
        }
    }
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
