//! Lightweight simulated agents for scale runs and reconnect storms: each is a real MQTT session (the product's own
//! `flotilla-mqtt` link, with its jittered reconnect backoff) that enrolls with a one-time token, verifies every
//! desired state with the real trust code and sends device-signed reports. They run no workloads: a simulated agent
//! reports its workloads running as soon as it has verified the desired state. Used by `flotilla-sim` and by the R7
//! reconnect-storm test.

use anyhow::{Result, bail};
use flotilla_mqtt::{LinkEvent, LinkSettings, Publisher};
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::trust::{self, DocType, SigningKey, TrustFloor};
use flotilla_shared::wire::{
    EnrollRequest, EnrollResponse, Inventory, Presence, Report, TelemetryPayload, TelemetryRecord,
    WorkloadKind, WorkloadState, WorkloadStatus,
};
use flotilla_shared::{DeviceId, Label};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Regions the simulated devices are spread over, round-robin by index.
pub const REGIONS: [&str; 5] = ["eu-west", "eu-north", "us-east", "us-west", "ap-south"];

/// Enrollment sessions open at once: one process holds every session, and file descriptors are finite (an
/// enrollment session plus a device session per agent would otherwise need two sockets each at the peak).
const ENROLL_CONCURRENCY: usize = 256;

/// How often a simulated agent repeats its report, as the real agent's default `report_interval_secs`.
const REPORT_INTERVAL_SECS: u64 = 60;

/// What the simulated fleet has done, readable while it runs.
#[derive(Debug)]
pub struct Shared {
    /// MQTT messages the simulated agents published.
    pub sent: AtomicU64,
    /// MQTT messages the simulated agents received.
    pub received: AtomicU64,
    /// Device sessions connected right now.
    pub connected: AtomicUsize,
    /// Device-session connects so far (reconnects included).
    pub connects: AtomicU64,
    /// Enrollment failures (refused, or the link closed); the reasons go to stderr.
    pub failed: AtomicUsize,
    /// While set, every connected device publishes one telemetry record a second (stream `count`, a u64 LE).
    pub telemetry: AtomicBool,
    /// Telemetry records the simulated agents published.
    pub telemetry_sent: AtomicU64,
    /// Per device: the last desired-state generation it verified and applied.
    applied: Vec<AtomicU64>,
    /// The current measurement: when it was armed, and its number (0 = none yet).
    mark: Mutex<(Instant, u64)>,
    done: mpsc::UnboundedSender<(usize, Duration)>,
}

impl Shared {
    /// The last generation device `i` applied.
    pub fn applied(&self, i: usize) -> u64 {
        self.applied.get(i).map_or(0, |a| a.load(Ordering::Acquire))
    }
}

/// A simulated fleet on its own tokio runtime.
pub struct SimFleet {
    rt: tokio::runtime::Runtime,
    pub shared: Arc<Shared>,
    done_rx: mpsc::UnboundedReceiver<(usize, Duration)>,
}

impl std::fmt::Debug for SimFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimFleet")
            .field("shared", &self.shared)
            .finish()
    }
}

impl SimFleet {
    /// Starts one simulated agent per token; device `i` is `sim-{i:05}` in region `REGIONS[i % 5]` and connects to
    /// loopback port `ports[i % ports.len()]` (the broker, or proxies in front of it). Returns at once; enrollment
    /// proceeds in the background.
    pub fn start(ports: &[u16], tokens: Vec<String>, worker_threads: usize) -> Result<Self> {
        if ports.is_empty() {
            bail!("no broker port");
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads)
            .enable_all()
            .build()?;
        let (done, done_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            connected: AtomicUsize::new(0),
            connects: AtomicU64::new(0),
            failed: AtomicUsize::new(0),
            telemetry: AtomicBool::new(false),
            telemetry_sent: AtomicU64::new(0),
            applied: tokens.iter().map(|_| AtomicU64::new(0)).collect(),
            mark: Mutex::new((Instant::now(), 0)),
            done,
        });
        let slots = Arc::new(tokio::sync::Semaphore::new(ENROLL_CONCURRENCY));
        for (i, token) in tokens.into_iter().enumerate() {
            let (shared, slots) = (shared.clone(), slots.clone());
            let port = ports[i % ports.len()];
            rt.spawn(async move {
                if let Err(e) = agent(i, port, token, &shared, slots).await {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("sim agent {i}: {e:#}");
                }
            });
        }
        Ok(Self {
            rt,
            shared,
            done_rx,
        })
    }

    /// Starts a measurement: from now on, each device's first newly applied desired state with workloads is timed
    /// from this instant and delivered by [`SimFleet::next_done`].
    pub fn arm(&mut self) {
        while self.done_rx.try_recv().is_ok() {}
        if let Ok(mut m) = self.shared.mark.lock() {
            *m = (Instant::now(), m.1 + 1);
        }
    }

    /// The next (device index, time since `arm`) of a device that applied a new desired state, or `None` after
    /// `patience` without one.
    pub fn next_done(&mut self, patience: Duration) -> Option<(usize, Duration)> {
        let rx = &mut self.done_rx;
        self.rt
            .block_on(async { tokio::time::timeout(patience, rx.recv()).await })
            .ok()
            .flatten()
    }
}

fn settings(
    client_id: String,
    port: u16,
    subs: Vec<String>,
    will: Option<(String, Vec<u8>)>,
    secret: Option<String>,
) -> LinkSettings {
    LinkSettings {
        credentials: secret.map(|s| (client_id.clone(), s)),
        client_id,
        host: "127.0.0.1".into(),
        port,
        keepalive: Duration::from_secs(120),
        tls: None,
        last_will: will,
        subscriptions: subs,
        clean_session: true,
        queue: flotilla_mqtt::QUEUE,
    }
}

fn inventory(region: &str) -> Inventory {
    Inventory {
        labels: vec![("role".into(), "sim".into())],
        region: Label::new(region).ok(),
        zone: None,
        location: None,
        arch: "x86_64".into(),
        runtimes: vec![WorkloadKind::Wasm],
        memory_mib: 256,
        agent_version: "sim".into(),
        sealing_key: None,
        container_engine: None,
        firmware: None,
        agent_release: None,
    }
}

/// Device `i`'s key: derived from the index, so runs are repeatable.
fn device_key(i: usize) -> SigningKey {
    let mut s = [7u8; 32];
    s[..8].copy_from_slice(&(i as u64).to_le_bytes());
    SigningKey::from_seed(s)
}

/// Enrolls over a short-lived session and returns the verified root of trust and the device's MQTT secret.
async fn enroll(
    i: usize,
    port: u16,
    token: String,
    key: &SigningKey,
    id: &DeviceId,
    shared: &Shared,
) -> Result<(flotilla_shared::wire::Root, String)> {
    let nonce = trust::random_hex(16);
    let (link, mut rx) = flotilla_mqtt::connect(settings(
        format!("enroll-{nonce}"),
        port,
        vec![topics::enroll_response(&nonce)],
        None,
        None,
    ))?;
    let req = codec::encode(&Message::EnrollRequest(Box::new(EnrollRequest {
        token,
        public_key: key.public(),
        requested_id: Some(id.clone()),
        inventory: inventory(REGIONS[i % REGIONS.len()]),
        // Simulated devices connect on the plain listener with their passwords.
        csr: None,
    })))?;
    let root = loop {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            // (Re)send on connect, and again after 30 s of silence: the request is idempotent for the same token
            // and key, and a hub that was busy may have missed it.
            Ok(Some(LinkEvent::Connected)) | Err(_) => {
                link.publish(&topics::enroll_request(&nonce), req.clone(), false)?;
                shared.sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(LinkEvent::Message { payload, .. })) => match codec::decode(&payload)? {
                Message::EnrollResponse(EnrollResponse::Accepted {
                    root,
                    mqtt_password,
                    ..
                }) => break (root, mqtt_password),
                Message::EnrollResponse(EnrollResponse::Refused { reason }) => {
                    bail!("refused: {reason}")
                }
                _ => {}
            },
            Ok(Some(LinkEvent::Disconnected(_))) => {}
            Ok(None) => bail!("enrollment link closed"),
        }
    };
    link.disconnect().await;
    Ok((trust::verify_initial_root(&root.0, 0)?, root.1))
}

/// One simulated agent: enroll, then serve desired states until the runtime ends.
async fn agent(
    i: usize,
    port: u16,
    token: String,
    shared: &Shared,
    slots: Arc<tokio::sync::Semaphore>,
) -> Result<()> {
    let key = device_key(i);
    let region = REGIONS[i % REGIONS.len()];
    let id = DeviceId::new(format!("sim-{i:05}"))?;
    let (root, secret) = {
        let _permit = slots.acquire_owned().await?;
        enroll(i, port, token, &key, &id, shared).await?
    };
    let offline = codec::encode(&Message::Presence(Presence {
        online: false,
        at: 0,
        agent_version: "sim".into(),
    }))?;
    let (link, mut rx) = flotilla_mqtt::connect(settings(
        id.to_string(),
        port,
        vec![topics::device(&id, DeviceTopic::Desired)],
        Some((topics::device(&id, DeviceTopic::Presence), offline)),
        Some(secret),
    ))?;
    let mut floor = TrustFloor::default();
    let mut accepted: Option<Vec<u8>> = None;
    let mut counter = 0u64;
    let mut workloads: Vec<WorkloadStatus> = vec![];
    let mut applied = 0;
    // The measurement this device last reported done for.
    let mut done_mark = 0;
    let mut is_connected = false;
    let report_topic = topics::device(&id, DeviceTopic::Report);
    // Signs and publishes the next report (a new counter each time) and counts it.
    let mut send_report = |applied: u64, workloads: &[WorkloadStatus], inv: bool| -> Result<()> {
        counter += 1;
        let r = Report {
            device: id.clone(),
            counter,
            sent_at: trust_now(),
            applied_generation: applied,
            last_rejection: None,
            workloads: workloads.to_vec(),
            inventory: inv.then(|| inventory(region)),
            telemetry_dropped: 0,
            hold: None,
            staged: vec![],
        };
        let bytes = codec::encode(&Message::Report(trust::sign(DocType::Report, &r, &[&key])))?;
        link.publish(&report_topic, bytes, false)?;
        shared.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    // Like the real agent (`report_interval_secs`, default 60), reports are level-based and repeated: a report the
    // broker dropped is replaced by the next one. The phase is spread per device so the fleet does not beat.
    let period = Duration::from_secs(REPORT_INTERVAL_SECS);
    let phase = Duration::from_millis((i as u64 * 7_919) % (REPORT_INTERVAL_SECS * 1000));
    let mut periodic = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
    // Telemetry (when the run asks for it): one record a second, spread over the second by device.
    let stream = Label::new("count")?;
    let telemetry_topic = topics::telemetry(Label::new(region).ok().as_ref(), &id, &stream);
    let mut telemetry_seq = 0u64;
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_millis((i as u64 * 7_919) % 1000),
        Duration::from_secs(1),
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => ev,
                None => break,
            },
            _ = periodic.tick() => {
                if is_connected {
                    send_report(applied, &workloads, false)?;
                }
                continue;
            }
            _ = ticker.tick() => {
                if is_connected && shared.telemetry.load(Ordering::Relaxed) {
                    telemetry_seq += 1;
                    let rec = TelemetryRecord {
                        device: id.clone(),
                        stream: stream.clone(),
                        seq: telemetry_seq,
                        at: trust_now(),
                        payload: TelemetryPayload::Bytes(telemetry_seq.to_le_bytes().to_vec()),
                    };
                    let bytes = codec::encode(&Message::Telemetry(vec![rec]))?;
                    if link.publish(&telemetry_topic, bytes, false).is_ok() {
                        shared.telemetry_sent.fetch_add(1, Ordering::Relaxed);
                        shared.sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                continue;
            }
        };
        match ev {
            LinkEvent::Connected => {
                if !is_connected {
                    is_connected = true;
                    shared.connected.fetch_add(1, Ordering::Relaxed);
                }
                shared.connects.fetch_add(1, Ordering::Relaxed);
                send_report(applied, &workloads, true)?;
            }
            LinkEvent::Disconnected(_) => {
                if is_connected {
                    is_connected = false;
                    shared.connected.fetch_sub(1, Ordering::Relaxed);
                }
            }
            LinkEvent::Message { payload, .. } => {
                shared.received.fetch_add(1, Ordering::Relaxed);
                let Ok(Message::DesiredState(signed)) = codec::decode(&payload) else {
                    continue;
                };
                if accepted.as_deref() == Some(signed.body.as_slice()) {
                    continue;
                }
                let ds = match trust::verify_desired(
                    &root,
                    &id,
                    &signed,
                    &floor,
                    accepted.as_deref(),
                    trust_now(),
                ) {
                    Ok(ds) => ds,
                    Err(e) => {
                        eprintln!("sim agent {i}: desired state rejected: {e}");
                        continue;
                    }
                };
                floor.generation = ds.generation;
                floor.issued_at = floor.issued_at.max(ds.issued_at);
                applied = ds.generation;
                accepted = Some(signed.body.clone());
                workloads = ds
                    .workloads
                    .iter()
                    .map(|w| WorkloadStatus {
                        name: w.name.clone(),
                        release: w.release,
                        state: WorkloadState::Running,
                        healthy: true,
                        restarts: 0,
                        last_error: None,
                        rejected: None,
                        exit: None,
                        retry_in_ms: None,
                    })
                    .collect();
                send_report(applied, &workloads, false)?;
                if let Some(a) = shared.applied.get(i) {
                    a.store(applied, Ordering::Release);
                }
                let (t0, mark) = shared
                    .mark
                    .lock()
                    .map(|m| *m)
                    .unwrap_or((Instant::now(), 0));
                if !workloads.is_empty() && mark > done_mark {
                    done_mark = mark;
                    let _ = shared.done.send((i, t0.elapsed()));
                }
            }
        }
    }
    Ok(())
}

/// Seconds since the Unix epoch (the trust checks' clock).
pub fn trust_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Resident set size of `pid` in KiB (0 if it is gone).
pub fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds `pid` has used (0 if it is gone).
pub fn proc_cpu_secs(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}
