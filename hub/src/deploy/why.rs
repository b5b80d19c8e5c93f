//! `flotilla why DEVICE WORKLOAD`: explains, in one sentence, why a device is or is not running a workload at the
//! expected version (placement, rejections, holds, generations, workload state).

use crate::fleet::device_view;
use crate::hub::{Hub, HubError, unix_now};
use flotilla_hub_core::{DeviceView, Excluded, place};
use flotilla_shared::DeviceId;
use flotilla_shared::wire::WorkloadState;
use std::collections::BTreeSet;

impl Hub {
    /// Explains why `device` is or is not running `workload` at the expected version.
    pub fn why(&self, device: &DeviceId, workload: &str) -> Result<String, HubError> {
        let devices = self.store.devices()?;
        let d = devices
            .iter()
            .find(|d| &d.id == device)
            .ok_or_else(|| HubError::NotFound(format!("no device {device}")))?;
        let Some((dep_name, dep)) = self
            .deployments
            .iter()
            .find(|(_, dep)| dep.workloads.iter().any(|w| w.name.as_str() == workload))
        else {
            return Ok(format!("no deployment contains workload {workload}"));
        };
        let views: Vec<DeviceView> = devices.iter().map(device_view).collect();
        let previous: BTreeSet<DeviceId> = self.store.placements(dep_name)?.into_iter().collect();
        let placement = place(
            &views,
            &dep.target,
            &dep.policy,
            &dep.constraints,
            &previous,
            unix_now(),
        );
        if let Some(why) = placement.excluded.get(device) {
            return Ok(format!(
                "not selected by deployment {dep_name}: {}",
                describe_exclusion(why)
            ));
        }
        // A rollout that leaves this device on the previous release says why before anything else does.
        if let Some(r) = self.rollouts.get(dep_name.as_str())
            && self.store.deployment_source(dep_name)?.as_deref() == Some(r.target_source.as_str())
        {
            use flotilla_hub_core::rollout::DeviceStatus;
            match r.rollout.status.get(device) {
                Some(DeviceStatus::Blocked { reason }) => {
                    return Ok(format!(
                        "left out of the rollout of {dep_name}, so it keeps the previous release: {reason}"
                    ));
                }
                Some(DeviceStatus::Failed { reason }) => {
                    return Ok(format!(
                        "the new release failed its health window here ({reason}), so the device is back on the \
                         previous release and later rollouts leave it out; `flotilla rollout retry {dep_name} \
                         --device {device}` gives it another chance"
                    ));
                }
                _ => {}
            }
        }
        let expected = self
            .resolve(dep)?
            .into_iter()
            .find(|w| w.name.as_str() == workload);
        let desired_gen = self.store.desired(device)?.map_or(0, |(g, ..)| g);
        let offline = if d.online {
            String::new()
        } else {
            format!(
                " (offline since {})",
                d.offline_since.unwrap_or(d.last_seen)
            )
        };
        let Some(report) = &d.last_report else {
            return Ok(format!(
                "placed by {dep_name}; no report from the device yet{offline}"
            ));
        };
        if let Some(rej) = &report.last_rejection
            && rej.generation >= desired_gen
        {
            return Ok(format!(
                "the device refused desired generation {}: {}{offline}",
                rej.generation, rej.reason
            ));
        }
        if let Some(hold) = &report.hold {
            return Ok(format!("the device holds updates: {hold}{offline}"));
        }
        if report.applied_generation < desired_gen {
            return Ok(format!(
                "waiting for the device to apply generation {desired_gen} (it has {}){offline}",
                report.applied_generation
            ));
        }
        let Some(st) = report
            .workloads
            .iter()
            .find(|w| w.name.as_str() == workload)
        else {
            return Ok(format!(
                "placed, but the device does not report {workload}{offline}"
            ));
        };
        let at_expected = expected.as_ref().is_some_and(|e| e.release == st.release);
        let version_of = |digest: &flotilla_shared::Digest| -> Result<String, HubError> {
            Ok(self
                .store
                .release_by_digest(digest)?
                .map_or_else(|| digest.short(), |r| r.release.version))
        };
        let version = version_of(&st.release)?;
        let wanted = match &expected {
            Some(e) => version_of(&e.release)?,
            None => "?".to_owned(),
        };
        let text = match (st.state, &st.rejected) {
            (_, Some(reason)) if at_expected => {
                format!("version {version} was refused by the device: {reason}")
            }
            (_, Some(reason)) => format!(
                "version {wanted} was refused by the device: {reason}. Version {version} keeps running"
            ),
            (WorkloadState::Downloading, _) => {
                format!("waiting for download: the device is fetching version {wanted}")
            }
            (WorkloadState::HeldByGeofence, _) => format!(
                "held by geofence: the device is outside the workload's fence, so version {version} does not run \
                 here until the device moves inside it"
            ),
            (WorkloadState::BackingOff | WorkloadState::Failed, _) => {
                let cause = st
                    .exit
                    .map(|e| e.to_string())
                    .or_else(|| st.last_error.clone())
                    .unwrap_or_else(|| "unknown".into());
                let retry = st.retry_in_ms.map_or_else(String::new, |ms| {
                    format!("; next start in {:.1} s", ms as f64 / 1000.0)
                });
                if st.state == WorkloadState::Failed {
                    format!(
                        "failed at version {version} and its restart policy does not start it again                          ({} restarts), last error: {cause}",
                        st.restarts
                    )
                } else {
                    format!(
                        "crash-looping ({} restarts) at version {version}, last error: {cause}{retry}",
                        st.restarts
                    )
                }
            }
            (WorkloadState::Loading, _) => format!(
                "loading version {version}'s container image into the engine (pulled from its registry or \
                 loaded from the downloaded tarball)"
            ),
            (WorkloadState::Running, _) if at_expected && st.healthy => {
                format!("running version {version} (healthy: true)")
            }
            (WorkloadState::Running, _) if at_expected => format!(
                "running version {version} (healthy: false, it has not yet run for as long as its health rule asks)"
            ),
            (WorkloadState::Running, _) => format!(
                "running version {version} while version {wanted} is on its way; the device switches over once \
                 the new artifact is downloaded and verified"
            ),
            (WorkloadState::Starting, _) => format!("starting version {version}"),
            (WorkloadState::Exited, _) => format!(
                "version {version} ran to completion and exited; its restart policy does not start it again"
            ),
        };
        Ok(format!("{text}{offline}"))
    }
}

fn describe_exclusion(e: &Excluded) -> String {
    match e {
        Excluded::Label(k) => format!("label selector `{k}` does not match"),
        Excluded::Region => "device region is not targeted".into(),
        Excluded::Zone => "device zone is not targeted".into(),
        Excluded::OutsideGeofence => "device location is outside the target geofence".into(),
        Excluded::Arch => "architecture constraint".into(),
        Excluded::Runtime => "runtime constraint".into(),
        Excluded::Memory => "memory constraint".into(),
        Excluded::NotChosen => "eligible, but the placement policy chose other devices".into(),
    }
}
