//! `GET /api/v1/fleet/summary`: the fleet counted per region and zone on the hub (what the console's map draws),
//! so no client needs the 10,000-row device list to draw an overview.

use super::devices::Versions;
use super::{ApiResult, ApiState, Role, ok};
use crate::fleet::summary::{self, Facts, Health};
use crate::hub::{Hub, HubError};
use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::json;

/// The versions a device's workloads run, joined (`1.2.0`, or `1.2.0+2.0.1`), looked up once per release.
pub(super) fn version_label(
    h: &Hub,
    report: Option<&flotilla_shared::wire::Report>,
    versions: &mut Versions,
) -> Option<String> {
    let mut vs: Vec<String> = report?
        .workloads
        .iter()
        .filter_map(|w| super::devices::release_version(h, w.release, versions))
        .collect();
    vs.sort();
    vs.dedup();
    (!vs.is_empty()).then(|| vs.join("+"))
}

/// A device's health as the overview and the device list's `state` filter classify it.
pub(super) fn health(h: &Hub, d: &crate::store::DeviceRow) -> Health {
    Health::of(
        d.online,
        d.last_report.as_ref(),
        h.desired_generation(&d.id),
    )
}

pub(super) async fn fleet_summary(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    let caller = s.auth_scoped(&headers, Role::Viewer).await?;
    let v = s
        .call(move |h| -> Result<serde_json::Value, HubError> {
            let mut versions = Versions::new();
            let (total, regions) = h
                .store
                .with_devices(|devs| {
                    summary::summarize(
                        devs.filter(|d| {
                            caller.sees(d.inventory.region.as_ref().map(|r| r.as_str()))
                        })
                        .map(|d| Facts {
                            region: d.inventory.region.as_ref().map(|r| r.as_str()),
                            zone: d.inventory.zone.as_ref().map(|z| z.as_str()),
                            health: health(h, d),
                            location: d.inventory.location.map(|l| (l.lat, l.lon)),
                            version: version_label(h, d.last_report.as_ref(), &mut versions),
                        }),
                    )
                })
                .map_err(HubError::from)?;
            Ok(json!({"total": total, "regions": regions}))
        })
        .await??;
    ok(v)
}
