//! Sans-IO fleet overview: each device is classified once (online, converged, failing, held), and the fleet is
//! counted per region and zone with a coarse centre, so a page about 10,000 devices carries a few dozen numbers.
//! The device list's `state` filter uses the same classification, so the map's counts and the filtered list agree.

use flotilla_shared::wire::{Report, WorkloadState};
use serde::Serialize;
use std::collections::BTreeMap;

/// One device's health, as the overview counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Health {
    pub online: bool,
    /// The device applied its current desired generation and every workload of it runs.
    pub converged: bool,
    /// A workload failed or backs off, or the device refused its current desired state.
    pub failing: bool,
    /// The device holds updates.
    pub held: bool,
}

impl Health {
    /// Classifies a device from its presence, its last report and the generation the hub last published to it.
    pub fn of(online: bool, report: Option<&Report>, desired_generation: u64) -> Self {
        let Some(r) = report else {
            return Self {
                online,
                // Nothing desired and nothing reported: nothing to converge to.
                converged: desired_generation == 0,
                ..Self::default()
            };
        };
        let refused = r
            .last_rejection
            .as_ref()
            .is_some_and(|x| x.generation >= desired_generation && desired_generation > 0);
        let failing = refused
            || r.workloads
                .iter()
                .any(|w| matches!(w.state, WorkloadState::Failed | WorkloadState::BackingOff));
        let converged = !failing
            && r.applied_generation >= desired_generation
            && r.workloads.iter().all(|w| {
                matches!(
                    w.state,
                    WorkloadState::Running | WorkloadState::HeldByGeofence
                )
            });
        Self {
            online,
            converged,
            failing,
            held: r.hold.is_some(),
        }
    }

    /// Whether the device matches a `state` filter of the device list (`online`, `offline`, `converged`,
    /// `failing`, `held`); `None` for a filter that is not one of those.
    pub fn matches(&self, state: &str) -> Option<bool> {
        Some(match state {
            "online" => self.online,
            "offline" => !self.online,
            "converged" => self.converged,
            "failing" => self.failing,
            "held" => self.held,
            _ => return None,
        })
    }
}

/// The `state` filter values, for error messages.
pub const STATES: &str = "online, offline, converged, failing, held";

/// Device counts of a region or zone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub devices: u32,
    pub online: u32,
    pub offline: u32,
    pub converged: u32,
    pub failing: u32,
    pub held: u32,
}

impl Counts {
    fn add(&mut self, h: Health) {
        self.devices += 1;
        if h.online {
            self.online += 1;
        } else {
            self.offline += 1;
        }
        self.converged += u32::from(h.converged);
        self.failing += u32::from(h.failing);
        self.held += u32::from(h.held);
    }
}

/// What the overview needs of one device.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub region: Option<&'a str>,
    pub zone: Option<&'a str>,
    pub health: Health,
    /// (lat, lon), when the device reports a position.
    pub location: Option<(f64, f64)>,
    /// The versions its workloads run (`1.2.0`, or `1.2.0+2.0.1` for several), for colouring by version.
    pub version: Option<String>,
}

/// A zone of a region (or the devices of a region without a zone).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Zone {
    pub zone: Option<String>,
    pub counts: Counts,
    /// Mean position of its devices that report one, rounded to 0.1 degree (about 11 km): never a device's
    /// exact position.
    pub centre: Option<Centre>,
    /// Devices per running version.
    pub versions: BTreeMap<String, u32>,
}

/// A region with its zones.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Region {
    pub region: Option<String>,
    pub counts: Counts,
    pub centre: Option<Centre>,
    pub versions: BTreeMap<String, u32>,
    pub zones: Vec<Zone>,
}

/// A coarse position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Centre {
    pub lat: f64,
    pub lon: f64,
}

/// Running sums for a mean position.
#[derive(Debug, Default)]
struct Acc {
    counts: Counts,
    lat: f64,
    lon: f64,
    located: u32,
    versions: BTreeMap<String, u32>,
}

impl Acc {
    fn add(&mut self, f: &Facts<'_>) {
        self.counts.add(f.health);
        if let Some((lat, lon)) = f.location.filter(|(a, o)| a.is_finite() && o.is_finite()) {
            self.lat += lat;
            self.lon += lon;
            self.located += 1;
        }
        if let Some(v) = &f.version {
            *self.versions.entry(v.clone()).or_default() += 1;
        }
    }

    fn centre(&self) -> Option<Centre> {
        (self.located > 0).then(|| {
            let n = f64::from(self.located);
            Centre {
                lat: coarse(self.lat / n),
                lon: coarse(self.lon / n),
            }
        })
    }
}

/// Rounded to 0.1 degree.
fn coarse(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Running sums per zone of one region.
type ZoneAccs<'a> = BTreeMap<Option<&'a str>, Acc>;

/// Counts the fleet per region and zone (regions and zones in name order; devices without a region or zone last).
pub fn summarize<'a>(devices: impl IntoIterator<Item = Facts<'a>>) -> (Counts, Vec<Region>) {
    // Keys sort `None` first; the output puts it last, where "no region" reads naturally.
    let mut regions: BTreeMap<Option<&str>, (Acc, ZoneAccs<'_>)> = BTreeMap::new();
    let mut total = Counts::default();
    for f in devices {
        total.add(f.health);
        let (r, zones) = regions.entry(f.region).or_default();
        r.add(&f);
        zones.entry(f.zone).or_default().add(&f);
    }
    let last_none = |k: &Option<&str>| (k.is_none(), k.map(str::to_owned));
    let mut out: Vec<Region> = regions
        .into_iter()
        .map(|(region, (acc, zones))| {
            let mut zones: Vec<(Option<&str>, Acc)> = zones.into_iter().collect();
            zones.sort_by_key(|(z, _)| last_none(z));
            Region {
                region: region.map(str::to_owned),
                centre: acc.centre(),
                versions: acc.versions.clone(),
                counts: acc.counts,
                zones: zones
                    .into_iter()
                    .map(|(zone, a)| Zone {
                        zone: zone.map(str::to_owned),
                        centre: a.centre(),
                        versions: a.versions.clone(),
                        counts: a.counts,
                    })
                    .collect(),
            }
        })
        .collect();
    out.sort_by_key(|r| (r.region.is_none(), r.region.clone()));
    (total, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::wire::{Rejection, WorkloadStatus};

    fn report(
        generation: u64,
        states: &[WorkloadState],
        hold: bool,
        rejected_gen: Option<u64>,
    ) -> Report {
        Report {
            device: flotilla_shared::DeviceId::new("d").expect("valid id"),
            counter: 1,
            sent_at: 0,
            applied_generation: generation,
            last_rejection: rejected_gen.map(|g| Rejection {
                generation: g,
                reason: flotilla_shared::wire::RejectReason::BadSignature,
            }),
            workloads: states
                .iter()
                .enumerate()
                .map(|(i, s)| WorkloadStatus {
                    name: flotilla_shared::WorkloadName::new(format!("w{i}")).expect("valid name"),
                    release: flotilla_shared::Digest([0; 32]),
                    state: *s,
                    healthy: true,
                    restarts: 0,
                    last_error: None,
                    rejected: None,
                    exit: None,
                    retry_in_ms: None,
                })
                .collect(),
            inventory: None,
            telemetry_dropped: 0,
            hold: hold.then(|| "in motion".to_owned()),
            staged: vec![],
        }
    }

    #[test]
    fn health_is_classified_from_presence_report_and_desired_generation() {
        use WorkloadState::*;
        let h = |online, converged, failing, held| Health {
            online,
            converged,
            failing,
            held,
        };
        // (case, online, report, desired generation, expected)
        let cases: Vec<(&str, bool, Option<Report>, u64, Health)> = vec![
            (
                "never reported, nothing desired",
                false,
                None,
                0,
                h(false, true, false, false),
            ),
            (
                "never reported, something desired",
                true,
                None,
                3,
                h(true, false, false, false),
            ),
            (
                "all running at the desired generation",
                true,
                Some(report(3, &[Running, Running], false, None)),
                3,
                h(true, true, false, false),
            ),
            (
                "behind the desired generation",
                true,
                Some(report(2, &[Running], false, None)),
                3,
                h(true, false, false, false),
            ),
            (
                "still downloading",
                true,
                Some(report(3, &[Downloading], false, None)),
                3,
                h(true, false, false, false),
            ),
            (
                "a workload failed",
                true,
                Some(report(3, &[Running, Failed], false, None)),
                3,
                h(true, false, true, false),
            ),
            (
                "a workload backs off",
                false,
                Some(report(3, &[BackingOff], false, None)),
                3,
                h(false, false, true, false),
            ),
            (
                "refused the current generation",
                true,
                Some(report(2, &[Running], false, Some(3))),
                3,
                h(true, false, true, false),
            ),
            (
                "an old refusal does not count",
                true,
                Some(report(3, &[Running], false, Some(2))),
                3,
                h(true, true, false, false),
            ),
            (
                "holding updates",
                true,
                Some(report(2, &[Running], true, None)),
                3,
                h(true, false, false, true),
            ),
            (
                "held by its geofence counts as converged",
                true,
                Some(report(3, &[HeldByGeofence], false, None)),
                3,
                h(true, true, false, false),
            ),
        ];
        for (case, online, r, generation, want) in cases {
            assert_eq!(Health::of(online, r.as_ref(), generation), want, "{case}");
        }
    }

    #[test]
    fn state_filters_match_the_classification() {
        let h = Health {
            online: false,
            converged: false,
            failing: true,
            held: true,
        };
        let cases = [
            ("online", Some(false)),
            ("offline", Some(true)),
            ("converged", Some(false)),
            ("failing", Some(true)),
            ("held", Some(true)),
            ("sideways", None),
        ];
        for (state, want) in cases {
            assert_eq!(h.matches(state), want, "{state}");
        }
    }

    #[test]
    fn the_fleet_is_counted_per_region_and_zone_with_coarse_centres() {
        let ok = Health {
            online: true,
            converged: true,
            ..Health::default()
        };
        let bad = Health {
            online: true,
            failing: true,
            ..Health::default()
        };
        let off = Health::default();
        let f = |region, zone, health, location, version: &str| Facts {
            region,
            zone,
            health,
            location,
            version: (!version.is_empty()).then(|| version.to_owned()),
        };
        let (total, regions) = summarize(vec![
            f(
                Some("eu-west"),
                Some("dub"),
                ok,
                Some((53.349_81, -6.260_31)),
                "1.0",
            ),
            f(
                Some("eu-west"),
                Some("dub"),
                bad,
                Some((53.351_01, -6.250_01)),
                "2.0",
            ),
            f(Some("eu-west"), None, off, None, ""),
            f(
                Some("us-east"),
                Some("nyc"),
                ok,
                Some((40.712_77, -74.005_97)),
                "1.0",
            ),
            f(None, None, ok, Some((0.0, 0.0)), "1.0"),
        ]);
        assert_eq!(
            total,
            Counts {
                devices: 5,
                online: 4,
                offline: 1,
                converged: 3,
                failing: 1,
                held: 0
            }
        );
        let names: Vec<Option<&str>> = regions.iter().map(|r| r.region.as_deref()).collect();
        assert_eq!(
            names,
            [Some("eu-west"), Some("us-east"), None],
            "named regions first, the rest last"
        );
        let eu = &regions[0];
        assert_eq!(eu.counts.devices, 3);
        assert_eq!(eu.counts.failing, 1);
        assert_eq!(
            eu.versions,
            BTreeMap::from([("1.0".into(), 1), ("2.0".into(), 1)])
        );
        let zones: Vec<Option<&str>> = eu.zones.iter().map(|z| z.zone.as_deref()).collect();
        assert_eq!(zones, [Some("dub"), None]);
        // Two devices' mean, at 0.1 degree: neither device's own position.
        assert_eq!(
            eu.zones[0].centre,
            Some(Centre {
                lat: 53.4,
                lon: -6.3
            })
        );
        assert_eq!(
            eu.zones[1].centre, None,
            "no device of the zone reports a position"
        );
        assert_eq!(
            regions[1].centre,
            Some(Centre {
                lat: 40.7,
                lon: -74.0
            })
        );
    }
}
