//! Sans-IO: the fleet overview's map. Regions and zones become markers on an equirectangular projection of the
//! basemap (`static/world-110m.svg`, the same projection), sized by device count and coloured by health, or by
//! the version most of their devices run while a rollout changes versions.

use super::model::{Counts, Region};
use std::collections::BTreeMap;

/// The basemap's projection: x = lon + 180, y = 84 - lat, in a 360 x 144 box (84 N to 60 S; Antarctica left out).
pub const WIDTH: f64 = 360.0;
pub const HEIGHT: f64 = 144.0;
pub const NORTH: f64 = 84.0;

/// Where (lat, lon) falls on the map; `None` outside its box.
pub fn project(lat: f64, lon: f64) -> Option<(f64, f64)> {
    let (x, y) = (lon + 180.0, NORTH - lat);
    ((0.0..=WIDTH).contains(&x) && (0.0..=HEIGHT).contains(&y)).then_some((x, y))
}

/// What a marker's colour says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colouring {
    Health,
    Version,
}

/// Health classes, worst first: the marker shows the worst that applies to any of its devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Failing,
    Held,
    Offline,
    Updating,
    Converged,
    /// The n-th version of the legend.
    Version(usize),
}

impl Tone {
    pub fn class(self) -> String {
        match self {
            Self::Failing => "t-failing".into(),
            Self::Held => "t-held".into(),
            Self::Offline => "t-offline".into(),
            Self::Updating => "t-updating".into(),
            Self::Converged => "t-converged".into(),
            // Eight version colours in the stylesheet, reused in turn.
            Self::Version(i) => format!("t-v{}", i % 8),
        }
    }
}

/// The health tone of a set of counts: any failing device, then any held, then mostly offline, then any not yet
/// converged.
pub fn health_tone(c: &Counts) -> Tone {
    if c.failing > 0 {
        Tone::Failing
    } else if c.held > 0 {
        Tone::Held
    } else if c.devices > 0 && c.offline * 2 > c.devices {
        Tone::Offline
    } else if c.converged < c.devices {
        Tone::Updating
    } else {
        Tone::Converged
    }
}

/// One marker: a zone (or a region without zones of known position).
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub region: Option<String>,
    pub zone: Option<String>,
    pub x: f64,
    pub y: f64,
    pub r: f64,
    pub tone: Tone,
    pub counts: Counts,
    /// Devices per version, for the marker's title.
    pub versions: BTreeMap<String, u32>,
}

/// The versions in the fleet, most devices first (the legend's order, and each version's colour).
pub fn legend(regions: &[Region]) -> Vec<(String, u32)> {
    let mut all: BTreeMap<&str, u32> = BTreeMap::new();
    for r in regions {
        for (v, n) in &r.versions {
            *all.entry(v).or_default() += n;
        }
    }
    let mut v: Vec<(String, u32)> = all.into_iter().map(|(k, n)| (k.to_owned(), n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// Markers for every zone with a known position; a zone without one is drawn at its region's centre, and a
/// region with no position at all is left off the map (its row in the table still counts it).
pub fn markers(regions: &[Region], colouring: Colouring) -> Vec<Marker> {
    let legend = legend(regions);
    let tone = |c: &Counts, versions: &BTreeMap<String, u32>| match colouring {
        Colouring::Health => health_tone(c),
        Colouring::Version => {
            let top = versions
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
                .map(|(v, _)| v.as_str());
            match top.and_then(|t| legend.iter().position(|(v, _)| v == t)) {
                Some(i) => Tone::Version(i),
                None => Tone::Offline,
            }
        }
    };
    let mut out = vec![];
    for r in regions {
        for z in &r.zones {
            let Some(c) = z.centre.or(r.centre) else {
                continue;
            };
            let Some((x, y)) = project(c.lat, c.lon) else {
                continue;
            };
            out.push(Marker {
                region: r.region.clone(),
                zone: z.zone.clone(),
                x,
                y,
                r: radius(z.counts.devices),
                tone: tone(&z.counts, &z.versions),
                counts: z.counts.clone(),
                versions: z.versions.clone(),
            });
        }
    }
    // Big markers first, so small ones stay visible on top.
    out.sort_by(|a, b| b.r.total_cmp(&a.r));
    out
}

/// Marker radius in map units: grows with the square root of the device count (area ~ devices), bounded.
pub fn radius(devices: u32) -> f64 {
    (1.2 + f64::from(devices).sqrt() * 0.35).min(9.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::model::{Centre, Zone};

    fn counts(devices: u32, offline: u32, converged: u32, failing: u32, held: u32) -> Counts {
        Counts {
            devices,
            online: devices - offline,
            offline,
            converged,
            failing,
            held,
        }
    }

    #[test]
    fn projection_is_equirectangular_within_the_box() {
        let cases = [
            ((0.0, 0.0), Some((180.0, 84.0))),
            ((84.0, -180.0), Some((0.0, 0.0))),
            ((-60.0, 180.0), Some((360.0, 144.0))),
            ((53.3, -6.3), Some((173.7, 30.700_000_000_000_003))),
            ((-75.0, 0.0), None),
            ((f64::NAN, 0.0), None),
        ];
        for ((lat, lon), want) in cases {
            assert_eq!(project(lat, lon), want, "{lat},{lon}");
        }
    }

    #[test]
    fn health_tone_shows_the_worst() {
        let cases = [
            (counts(10, 0, 9, 1, 1), Tone::Failing),
            (counts(10, 0, 9, 0, 1), Tone::Held),
            (counts(10, 6, 4, 0, 0), Tone::Offline),
            (counts(10, 5, 5, 0, 0), Tone::Updating),
            (counts(10, 0, 10, 0, 0), Tone::Converged),
            (counts(0, 0, 0, 0, 0), Tone::Converged),
        ];
        for (c, want) in cases {
            assert_eq!(health_tone(&c), want, "{c:?}");
        }
    }

    #[test]
    fn markers_per_zone_coloured_by_health_or_majority_version() {
        let v = |pairs: &[(&str, u32)]| pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect();
        let regions = vec![
            Region {
                region: Some("eu-west".into()),
                counts: counts(30, 0, 30, 0, 0),
                centre: Some(Centre {
                    lat: 50.0,
                    lon: 0.0,
                }),
                versions: v(&[("1.0", 10), ("2.0", 20)]),
                zones: vec![
                    Zone {
                        zone: Some("dub".into()),
                        counts: counts(20, 0, 20, 0, 0),
                        centre: Some(Centre {
                            lat: 53.3,
                            lon: -6.3,
                        }),
                        versions: v(&[("2.0", 20)]),
                    },
                    Zone {
                        zone: None,
                        counts: counts(10, 0, 9, 1, 0),
                        centre: None,
                        versions: v(&[("1.0", 10)]),
                    },
                ],
            },
            Region {
                region: Some("nowhere".into()),
                counts: counts(1, 1, 0, 0, 0),
                centre: None,
                versions: v(&[]),
                zones: vec![Zone {
                    zone: None,
                    counts: counts(1, 1, 0, 0, 0),
                    centre: None,
                    versions: v(&[]),
                }],
            },
        ];
        let health = markers(&regions, Colouring::Health);
        let got: Vec<(Option<&str>, Tone)> =
            health.iter().map(|m| (m.zone.as_deref(), m.tone)).collect();
        // The zone without a position sits at its region's centre; the region without any is not drawn.
        assert_eq!(got, [(Some("dub"), Tone::Converged), (None, Tone::Failing)]);
        assert_eq!((health[1].x, health[1].y), (180.0, 34.0));
        let version = markers(&regions, Colouring::Version);
        let got: Vec<Tone> = version.iter().map(|m| m.tone).collect();
        // 2.0 has most devices, so it is the legend's first colour.
        assert_eq!(got, [Tone::Version(0), Tone::Version(1)]);
        assert_eq!(
            legend(&regions),
            [("2.0".to_owned(), 20), ("1.0".to_owned(), 10)]
        );
    }

    #[test]
    fn radius_grows_with_devices_and_is_bounded() {
        assert!(radius(1) < radius(100));
        assert!(radius(100) < radius(400));
        assert_eq!(radius(1_000_000), 9.0);
    }
}
