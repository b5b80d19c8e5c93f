//! `flotilla-sim`: a scale simulator. Starts a hub with default settings (embedded broker) and N lightweight
//! simulated agents in this process: each is a real MQTT session that enrolls with a one-time token, verifies every
//! desired state with the real trust code and sends device-signed reports. It then applies a deployment to every
//! device and measures apply -> each device reporting running (p50, p99, max), the hub's convergence as seen by its
//! API, hub+broker RSS and CPU, and MQTT messages per second. Artifacts are not downloaded (the simulated agents
//! report running as soon as they have verified the desired state).
//!
//! `cargo build --release --bins -p flotilla-hub -p flotilla-fleet-tests && target/release/flotilla-sim 10000`

use anyhow::{Context, Result, bail};
use flotilla_mqtt::{LinkEvent, LinkSettings, Publisher};
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::trust::{self, DocType, SigningKey, TrustFloor};
use flotilla_shared::wire::{
    EnrollRequest, EnrollResponse, Inventory, Presence, Report, WorkloadKind, WorkloadState,
    WorkloadStatus,
};
use flotilla_shared::{DeviceId, Label};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const REGIONS: [&str; 5] = ["eu-west", "eu-north", "us-east", "us-west", "ap-south"];

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

fn settings(
    client_id: String,
    port: u16,
    subs: Vec<String>,
    will: Option<(String, Vec<u8>)>,
) -> LinkSettings {
    LinkSettings {
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
    }
}

/// One simulated agent: enroll, then serve desired states until the process ends.
async fn agent(
    i: usize,
    port: u16,
    token: String,
    counters: Arc<Counters>,
    t0: Arc<OnceLock<Instant>>,
    done: mpsc::UnboundedSender<Duration>,
    enroll_slots: Arc<tokio::sync::Semaphore>,
) -> Result<()> {
    // Bounded concurrent enrollments: one process holds every session, and file descriptors are finite (an
    // enrollment session plus a device session per agent would otherwise need two sockets each at the peak).
    let permit = enroll_slots.acquire_owned().await?;
    let key = SigningKey::from_seed({
        let mut s = [7u8; 32];
        s[..8].copy_from_slice(&(i as u64).to_le_bytes());
        s
    });
    let region = REGIONS[i % REGIONS.len()];
    let nonce = trust::random_hex(16);
    let (link, mut rx) = flotilla_mqtt::connect(settings(
        format!("enroll-{nonce}"),
        port,
        vec![topics::enroll_response(&nonce)],
        None,
    ))?;
    let id = DeviceId::new(format!("sim-{i:05}"))?;
    let req = codec::encode(&Message::EnrollRequest(EnrollRequest {
        token,
        public_key: key.public(),
        requested_id: Some(id.clone()),
        inventory: inventory(region),
    }))?;
    let root = loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
        match ev {
            Ok(Some(LinkEvent::Connected)) | Err(_) => {
                link.publish(&topics::enroll_request(&nonce), req.clone(), false)?;
                counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(LinkEvent::Message { payload, .. })) => match codec::decode(&payload)? {
                Message::EnrollResponse(EnrollResponse::Accepted { root, .. }) => break root,
                Message::EnrollResponse(EnrollResponse::Refused { reason }) => {
                    bail!("refused: {reason}")
                }
                _ => {}
            },
            Ok(Some(LinkEvent::Disconnected(_))) => {}
            Ok(None) => bail!("link closed"),
        }
    };
    link.disconnect().await;
    drop(link);
    drop(rx);
    drop(permit);
    let root = trust::verify_initial_root(&root, 0)?;
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
    ))?;
    let mut floor = TrustFloor::default();
    let mut accepted: Option<Vec<u8>> = None;
    let mut counter = 0u64;
    let mut workloads: Vec<WorkloadStatus> = vec![];
    let mut applied = 0;
    let mut reported_running = false;
    let report = |counter: u64,
                  applied: u64,
                  workloads: Vec<WorkloadStatus>,
                  inv: bool|
     -> Result<Vec<u8>> {
        let r = Report {
            device: id.clone(),
            counter,
            sent_at: trust_now(),
            applied_generation: applied,
            last_rejection: None,
            workloads,
            inventory: inv.then(|| inventory(region)),
            telemetry_dropped: 0,
            hold: None,
        };
        Ok(codec::encode(&Message::Report(trust::sign(
            DocType::Report,
            &r,
            &[&key],
        )))?)
    };
    let report_topic = topics::device(&id, DeviceTopic::Report);
    while let Some(ev) = rx.recv().await {
        match ev {
            LinkEvent::Connected => {
                counter += 1;
                link.publish(
                    &report_topic,
                    report(counter, applied, workloads.clone(), true)?,
                    false,
                )?;
                counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            LinkEvent::Message { payload, .. } => {
                counters.received.fetch_add(1, Ordering::Relaxed);
                let Ok(Message::DesiredState(signed)) = codec::decode(&payload) else {
                    continue;
                };
                if accepted.as_deref() == Some(signed.body.as_slice()) {
                    continue;
                }
                let Ok(ds) = trust::verify_desired(
                    &root,
                    &id,
                    &signed,
                    &floor,
                    accepted.as_deref(),
                    trust_now(),
                ) else {
                    continue;
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
                    })
                    .collect();
                counter += 1;
                link.publish(
                    &report_topic,
                    report(counter, applied, workloads.clone(), false)?,
                    false,
                )?;
                counters.sent.fetch_add(1, Ordering::Relaxed);
                if !workloads.is_empty() && !reported_running {
                    reported_running = true;
                    if let Some(t0) = t0.get() {
                        let _ = done.send(t0.elapsed());
                    }
                }
            }
            LinkEvent::Disconnected(_) => {}
        }
    }
    Ok(())
}

fn trust_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn proc_mem_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn proc_cpu_secs(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let f: Vec<String> = s
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

fn pct(v: &[f64], q: f64) -> f64 {
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() -> Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    // `--mosquitto`: the hub uses an external Mosquitto (started here) instead of its embedded broker.
    let mosquitto = std::env::args().any(|a| a == "--mosquitto");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let hub_dir = dir.path().join("hub");
    let bins = std::env::current_exe()?
        .parent()
        .context("bin dir")?
        .to_owned();
    let broker = if mosquitto {
        Some(flotilla_fleet_tests::Mosquitto::start(
            &dir.path().join("mosquitto"),
        )?)
    } else {
        None
    };
    let mut cmd = std::process::Command::new(bins.join("flotilla"));
    cmd.args(["serve", "--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"]);
    if let Some(m) = &broker {
        cmd.arg("--broker")
            .arg(format!("mqtt://127.0.0.1:{}", m.port));
    }
    let mut hub_proc = cmd
        .arg("--data-dir")
        .arg(&hub_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("hub.log"))?)
        .spawn()
        .context("start flotilla serve")?;
    let hub_pid = hub_proc.id();
    let broker_pid = broker.as_ref().map(|m| m.proc.child.id());
    let result = run(n, &hub_dir, hub_pid, broker_pid);
    let _ = hub_proc.kill();
    let _ = hub_proc.wait();
    result
}

fn run(n: usize, hub_dir: &std::path::Path, hub_pid: u32, broker_pid: Option<u32>) -> Result<()> {
    let mem = || proc_mem_kib(hub_pid) + broker_pid.map_or(0, proc_mem_kib);
    let start = Instant::now();
    let (api, mqtt) = loop {
        if let Some(e) = flotilla_hub::server::read_endpoints(hub_dir) {
            break e;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("hub did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let port: u16 = mqtt.rsplit(':').next().context("port")?.parse()?;
    let token = std::fs::read_to_string(hub_dir.join("admin.token"))?;
    let client = flotilla_hub::client::Client::new(&api, &token);
    while client.get("/api/v1/devices").is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut tokens = Vec::new();
    while tokens.len() < n {
        let count = (n - tokens.len()).min(10_000);
        let body = serde_json::json!({"count": count, "labels": {"role": "sim"}, "ttl_secs": 3600});
        let v = client.post(
            "/api/v1/enrollment-tokens",
            "application/json",
            body.to_string().as_bytes(),
            &[],
        )?;
        match (v["token"].as_str(), v["tokens"].as_array()) {
            (Some(t), _) => tokens.push(t.to_owned()),
            (_, Some(ts)) => tokens.extend(ts.iter().filter_map(|t| t.as_str().map(str::to_owned))),
            _ => bail!("no tokens"),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let counters = Arc::new(Counters::default());
    let t0 = Arc::new(OnceLock::new());
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let enroll_slots = Arc::new(tokio::sync::Semaphore::new(256));
    let enroll_start = Instant::now();
    for (i, token) in tokens.into_iter().enumerate() {
        let (c, t, d, slots) = (
            counters.clone(),
            t0.clone(),
            done_tx.clone(),
            enroll_slots.clone(),
        );
        rt.spawn(async move {
            if let Err(e) = agent(i, port, token, c, t, d, slots).await {
                eprintln!("sim agent {i}: {e:#}");
            }
        });
    }
    // Wait until the hub sees every device online and reporting.
    loop {
        // The cheap endpoint: listing 10,000 devices every half second would load the hub more than the fleet.
        let text = client.get_text("/metrics")?;
        let online = text
            .lines()
            .find(|l| l.starts_with("flotilla_devices{state=\"online\"}"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
            .unwrap_or(0);
        if online >= n {
            break;
        }
        if enroll_start.elapsed() > Duration::from_secs(600) {
            bail!("only {online} of {n} devices online after 600 s");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let enrolled_in = enroll_start.elapsed();
    let rss_idle = mem();
    println!(
        "{n} simulated agents enrolled and online in {enrolled_in:.1?}; hub+broker RSS {} MiB",
        rss_idle / 1024
    );

    let wasm = tempfile::NamedTempFile::new()?;
    std::fs::write(wasm.path(), b"\0asm\x01\0\0\0")?;
    let sign = flotilla_hub::keys_cli::ReleaseSign {
        artifact: wasm.path().to_owned(),
        name: "app".into(),
        version: "1.0.0".into(),
        epoch: 1,
        kind: "wasm".into(),
        keys: vec![hub_dir.join("keys/release.key")],
        out: Some(wasm.path().with_extension("release")),
    };
    let (signed, _) = flotilla_hub::keys_cli::sign_release(&sign)?;
    client.post(
        "/api/v1/artifacts",
        "application/octet-stream",
        b"\0asm\x01\0\0\0",
        &[],
    )?;
    client.post(
        "/api/v1/releases",
        "application/octet-stream",
        &postcard::to_stdvec(&signed)?,
        &[],
    )?;
    let (sent0, recv0) = (
        counters.sent.load(Ordering::Relaxed),
        counters.received.load(Ordering::Relaxed),
    );
    let cpu_all = || proc_cpu_secs(hub_pid) + broker_pid.map_or(0.0, proc_cpu_secs);
    let cpu0 = cpu_all();
    let spec = "name = \"app\"\n[target]\nselector = { role = \"sim\" }\n[[workloads]]\nname = \"app\"\nrelease = \"app@1.0.0\"\n";
    let _ = t0.set(Instant::now());
    let apply_at = Instant::now();
    client.post(
        "/api/v1/deployments",
        "application/toml",
        spec.as_bytes(),
        &[],
    )?;
    let mut lat = Vec::with_capacity(n);
    let mut peak_rss = 0;
    while lat.len() < n {
        match rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), done_rx.recv()).await })
        {
            Ok(Some(d)) => lat.push(d.as_secs_f64()),
            _ => {
                // Report what arrived instead of nothing: the missing devices are the finding.
                println!(
                    "MISSING: only {} of {n} devices reported running (30 s without progress)",
                    lat.len()
                );
                break;
            }
        }
        if lat.len() % 500 == 0 {
            peak_rss = peak_rss.max(mem());
        }
    }
    let all_running = apply_at.elapsed();
    // Convergence as the hub sees it (reports processed, generations acknowledged).
    let expected = lat.len();
    loop {
        let text = client.get_text("/metrics")?;
        let converged = text
            .lines()
            .find(|l| l.starts_with("flotilla_devices_converged"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
            .unwrap_or(0);
        if converged >= expected {
            break;
        }
        if apply_at.elapsed() > Duration::from_secs(600) {
            bail!("hub saw only {converged} of {n} devices converge");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let hub_converged = apply_at.elapsed();
    let cpu = cpu_all() - cpu0;
    peak_rss = peak_rss.max(mem());
    let msgs = (counters.sent.load(Ordering::Relaxed) - sent0)
        + (counters.received.load(Ordering::Relaxed) - recv0);
    lat.sort_by(f64::total_cmp);
    println!(
        "apply -> device reports running ({} of {n} devices): p50 {:.3} s  p99 {:.3} s  max {:.3} s  (last device {:.3} s)",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        all_running.as_secs_f64()
    );
    println!(
        "apply -> hub sees every device converged: {:.3} s",
        hub_converged.as_secs_f64()
    );
    println!(
        "hub+broker: RSS peak {} MiB (idle after enrollment {} MiB), CPU {:.2} s over the apply window ({:.0} % of one core)",
        peak_rss / 1024,
        rss_idle / 1024,
        cpu,
        cpu / hub_converged.as_secs_f64() * 100.0
    );
    println!(
        "simulated-agent MQTT messages during the apply window: {msgs} ({:.0}/s)",
        msgs as f64 / hub_converged.as_secs_f64()
    );
    Ok(())
}
