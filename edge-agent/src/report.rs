//! What the device tells the hub: its full observed state as a report signed with the device key and a persisted
//! monotonic counter (level-based: sent on change, on connect and every `report_interval_secs`), and its presence.

use crate::agent::{Agent, unix_now};
use crate::inventory::inventory;
use anyhow::Result;
use flotilla_mqtt::Publisher;
use flotilla_shared::WorkloadName;
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::trust::{self, DocType};
use flotilla_shared::wire::{Inventory, Presence, Report, Signed};
use std::time::Instant;

impl Agent {
    /// The full observed state, signed with the device key and a persisted monotonic counter.
    pub fn build_report(&mut self) -> Result<Signed> {
        Ok(self.build_report_with_inventory()?.0)
    }

    /// The signed report, and the inventory it carries (when it differs from what the hub last received).
    fn build_report_with_inventory(&mut self) -> Result<(Signed, Option<Inventory>)> {
        let counter = self.store.next_counter("report")?;
        let engine = self.containers.as_ref().and_then(|rt| rt.engine());
        let mut current = inventory(
            &self.cfg,
            self.position,
            Some(self.sealing.public()),
            engine,
        );
        current.firmware = self.firmware_inventory();
        current.agent_release = self.running_agent_release().map(|(_, v)| v);
        // Placement sends firmware and agent releases only to devices that can install them.
        if current.firmware.is_some() {
            current
                .runtimes
                .push(flotilla_shared::wire::WorkloadKind::Firmware);
        }
        if self.system.launcher.is_some() {
            current
                .runtimes
                .push(flotilla_shared::wire::WorkloadKind::Agent);
        }
        let changed = (self.inventory_sent.as_ref() != Some(&current)).then_some(current);
        let report = Report {
            device: self.trust.device.clone(),
            counter,
            sent_at: unix_now(),
            applied_generation: self.accepted.as_ref().map_or(0, |(_, ds)| ds.generation),
            last_rejection: self.rejection.clone(),
            workloads: {
                let mut w = self.reconciler.status(self.millis());
                w.extend(self.system_status());
                w
            },
            inventory: changed.clone(),
            telemetry_dropped: self.store.counter("telemetry_dropped")?,
            hold: self.hold_reason(),
            staged: self.staged_status(),
        };
        Ok((
            trust::sign(DocType::Report, &report, &[&self.trust.key]),
            changed,
        ))
    }

    pub(crate) fn send_report(&mut self) {
        self.last_report = Instant::now();
        if !self.connected {
            return; // Level-based: the next connect sends the then-current state.
        }
        let (signed, inventory) = match self.build_report_with_inventory() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot build report");
                return;
            }
        };
        let Some(link) = &self.link else { return };
        match codec::encode(&Message::Report(signed)) {
            Ok(bytes) => {
                if link
                    .publish(
                        &topics::device(&self.trust.device, DeviceTopic::Report),
                        bytes,
                        false,
                    )
                    .is_ok()
                    && let Some(inv) = inventory
                {
                    self.inventory_sent = Some(inv);
                }
            }
            Err(e) => tracing::error!(error = %e, "report too large"),
        }
    }

    pub(crate) fn publish_presence(&self, online: bool) {
        let Some(link) = &self.link else { return };
        let p = Presence {
            online,
            at: unix_now(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        };
        if let Ok(bytes) = codec::encode(&Message::Presence(p)) {
            let _ = link.publish(
                &topics::device(&self.trust.device, DeviceTopic::Presence),
                bytes,
                true,
            );
        }
    }

    pub(crate) fn save_workload_states(&mut self) {
        let states: Vec<(WorkloadName, u32, Option<String>)> = self
            .reconciler
            .status(self.millis())
            .into_iter()
            .map(|s| (s.name, s.restarts, s.last_error))
            .collect();
        if let Err(e) = self.store.save_workload_states(&states) {
            tracing::warn!(error = %e, "cannot persist workload state");
        }
    }
}
