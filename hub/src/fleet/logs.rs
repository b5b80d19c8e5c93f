//! `flotilla logs`: asking a device for a workload's last output lines over MQTT and handing the answer to the
//! API call that waits for it. Requests are matched by a hub-chosen number; unanswered ones are forgotten after
//! [`PENDING_FOR`].

use crate::hub::Hub;
use flotilla_mqtt::Publisher;
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::wire::{LogsRequest, LogsResponse};
use flotilla_shared::{DeviceId, WorkloadName};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How long the API waits for a device's answer, and how long a request stays matchable.
pub const PENDING_FOR: Duration = Duration::from_secs(10);

/// Requests waiting for their device's answer.
#[derive(Debug, Default)]
pub struct PendingLogs {
    next: u64,
    waiting: BTreeMap<u64, (DeviceId, Instant, oneshot::Sender<LogsResponse>)>,
}

impl Hub {
    /// Sends a logs request to `device`; the receiver gets the device's answer.
    pub(crate) fn request_logs(
        &mut self,
        device: &DeviceId,
        workload: WorkloadName,
        lines: u32,
    ) -> Result<oneshot::Receiver<LogsResponse>, String> {
        let now = Instant::now();
        let p = &mut self.pending_logs;
        p.waiting
            .retain(|_, (_, at, tx)| now.duration_since(*at) < PENDING_FOR && !tx.is_closed());
        p.next += 1;
        let request = p.next;
        let (tx, rx) = oneshot::channel();
        p.waiting.insert(request, (device.clone(), now, tx));
        let msg = Message::LogsRequest(LogsRequest {
            request,
            workload,
            lines,
        });
        let bytes = codec::encode(&msg).map_err(|e| e.to_string())?;
        self.link
            .publish(
                &topics::device(device, DeviceTopic::LogsRequest),
                bytes,
                false,
            )
            .map_err(|e| e.to_string())?;
        Ok(rx)
    }

    /// A device's answer: delivered to the waiting call if it asked this device.
    pub(crate) fn on_logs_response(
        &mut self,
        device: &DeviceId,
        resp: LogsResponse,
    ) -> Result<(), String> {
        match self.pending_logs.waiting.remove(&resp.request) {
            Some((asked, _, tx)) if asked == *device => {
                let _ = tx.send(resp);
                Ok(())
            }
            Some(entry) => {
                // Another device answering someone else's request: keep the request for its own device.
                self.pending_logs.waiting.insert(resp.request, entry);
                Err("a logs answer for a request sent to another device".into())
            }
            None => Err("a logs answer nobody waits for (late or unknown)".into()),
        }
    }
}
