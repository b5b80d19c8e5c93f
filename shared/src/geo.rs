//! Geofence evaluation: is a position inside a circle, polygon or set of H3 cells. Pure functions.

use crate::wire::{Geofence, LatLon};

const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Great-circle distance in metres (haversine). The trigonometry is the `libm` crate's (see Cargo.toml), so hub
/// and agent compute the same bits on every platform.
pub fn distance_m(a: LatLon, b: LatLon) -> f64 {
    let (p1, p2) = (a.lat.to_radians(), b.lat.to_radians());
    let dp = p2 - p1;
    let dl = (b.lon - a.lon).to_radians();
    let h =
        libm::sin(dp / 2.0).powi(2) + libm::cos(p1) * libm::cos(p2) * libm::sin(dl / 2.0).powi(2);
    2.0 * EARTH_RADIUS_M * libm::asin(h.sqrt().min(1.0))
}

/// Ray casting on lat/lon treated as planar; fine for fences far smaller than a hemisphere and not crossing the
/// antimeridian, which is what device fences are.
fn in_polygon(p: LatLon, poly: &[LatLon]) -> bool {
    if poly.len() < 3 {
        return false;
    }
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (a, b) = (poly[i], poly[j]);
        if (a.lat > p.lat) != (b.lat > p.lat) {
            let x = (b.lon - a.lon) * (p.lat - a.lat) / (b.lat - a.lat) + a.lon;
            if p.lon < x {
                inside = !inside;
            }
        }
        j = i;
    }
    inside
}

fn in_h3(p: LatLon, cells: &[u64]) -> bool {
    let Ok(ll) = h3o::LatLng::new(p.lat, p.lon) else {
        return false;
    };
    cells
        .iter()
        .filter_map(|c| h3o::CellIndex::try_from(*c).ok())
        .any(|cell| ll.to_cell(cell.resolution()) == cell)
}

/// Whether `position` lies inside `fence`. An unknown position is outside every fence (fail closed).
pub fn contains(fence: &Geofence, position: Option<LatLon>) -> bool {
    let Some(p) = position.filter(|p| p.lat.is_finite() && p.lon.is_finite()) else {
        return false;
    };
    match fence {
        Geofence::Circle { center, radius_m } => distance_m(*center, p) <= *radius_m,
        Geofence::Polygon(points) => in_polygon(p, points),
        Geofence::H3Cells(cells) => in_h3(p, cells),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ll(lat: f64, lon: f64) -> LatLon {
        LatLon { lat, lon }
    }

    /// Each fence shape against points inside, outside and unknown.
    #[test]
    fn fences() {
        let berlin = ll(52.5200, 13.4050);
        let h3_berlin = u64::from(
            h3o::LatLng::new(52.5200, 13.4050)
                .expect("valid")
                .to_cell(h3o::Resolution::Seven),
        );
        let square = Geofence::Polygon(vec![
            ll(52.0, 13.0),
            ll(53.0, 13.0),
            ll(53.0, 14.0),
            ll(52.0, 14.0),
        ]);
        let cases: Vec<(Geofence, Option<LatLon>, bool)> = vec![
            (
                Geofence::Circle {
                    center: berlin,
                    radius_m: 1_000.0,
                },
                Some(ll(52.5210, 13.4060)),
                true,
            ),
            (
                Geofence::Circle {
                    center: berlin,
                    radius_m: 1_000.0,
                },
                Some(ll(52.5400, 13.4050)),
                false,
            ),
            (
                Geofence::Circle {
                    center: berlin,
                    radius_m: 1_000.0,
                },
                None,
                false,
            ),
            (square.clone(), Some(berlin), true),
            (square.clone(), Some(ll(51.9, 13.5)), false),
            (square, Some(ll(f64::NAN, 13.5)), false),
            (
                Geofence::Polygon(vec![ll(0.0, 0.0), ll(1.0, 1.0)]),
                Some(ll(0.5, 0.5)),
                false,
            ),
            (Geofence::H3Cells(vec![h3_berlin]), Some(berlin), true),
            (
                Geofence::H3Cells(vec![h3_berlin]),
                Some(ll(48.1351, 11.5820)),
                false,
            ),
            (Geofence::H3Cells(vec![0xdead]), Some(berlin), false),
        ];
        for (i, (fence, pos, want)) in cases.into_iter().enumerate() {
            assert_eq!(contains(&fence, pos), want, "case {i}: {fence:?} {pos:?}");
        }
        assert!((distance_m(berlin, ll(48.1351, 11.5820)) - 504_000.0).abs() < 5_000.0);
    }
}
