//! Desired state received -> WASM workload running, measured in-process:
//! - runtime warm: `Runtime::start` -> `Started` with the compiled module cached on disk;
//! - runtime cold: the same with a module never seen before (Cranelift compile + cache write);
//! - full path warm: decode + verify the signed desired state, commit it to SQLite (synchronous=FULL), plan with the
//!   reconciler, start -> `Started`.
//!
//! - peer, same run: `runc run` of a trivial container (busybox-static rootfs running `true`), when `runc` and
//!   `/bin/busybox` are installed (Debian `runc`, `busybox-static`; needs root), with the ratio to our warm start.
//!
//! Run: `cargo bench --profile dev -p flotilla-agent --bench start_latency`.

use flotilla_agent::runtime::wasm::WasmRuntime;
use flotilla_agent::runtime::{Runtime, RuntimeEvent, StartRequest};
use flotilla_agent::store::Store;
use flotilla_agent_core::{Action, DesiredWorkload, Reconciler};
use flotilla_shared::codec::{self, Message};
use flotilla_shared::trust::{self, DocType, SigningKey, TrustFloor};
use flotilla_shared::wire::{
    DesiredState, HealthRule, Resources, RestartPolicy, Root, WorkloadKind, WorkloadSpec,
};
use flotilla_shared::{DeviceId, Digest, WorkloadName};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

fn sensor() -> Vec<u8> {
    wat::parse_file(Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-images/wat/sensor.wat"))
        .unwrap_or_default()
}

/// The same module with a distinct custom section, so it has a new digest (and no compiled cache entry).
fn variant(base: &[u8], tag: u32) -> Vec<u8> {
    let mut out = base.to_vec();
    let mut payload = vec![1u8, b'v'];
    payload.extend_from_slice(&tag.to_le_bytes());
    out.push(0);
    out.push(u8::try_from(payload.len()).unwrap_or(0));
    out.extend_from_slice(&payload);
    out
}

fn spec(name: &str, digest: Digest) -> WorkloadSpec {
    WorkloadSpec {
        name: WorkloadName::new(name).unwrap_or_else(|_| unreachable!()),
        kind: WorkloadKind::Wasm,
        release: digest,
        config: vec![],
        resources: Resources {
            memory_mib: 4,
            cpu_ms: 50,
        },
        restart: RestartPolicy::OnFailure,
        health: HealthRule::RunningFor(1),
        tick_ms: 1000,
        geofence: None,
        secrets: vec![],
        container: None,
    }
}

/// Prints n, p50, p99 and max (milliseconds) and returns the p50.
fn stats(name: &str, mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name:<34} n={:<4} p50 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms",
        v.len(),
        p(0.5),
        p(0.99),
        p(1.0)
    );
    p(0.5)
}

/// `runc run` of a container whose rootfs is busybox-static and whose process is `true`: create, start, exit and
/// delete, timed from the command's spawn to its exit. `None` when runc or busybox is missing or runc fails (not
/// root, no namespaces).
fn runc_runs(dir: &Path, n: usize) -> Option<Vec<f64>> {
    use std::process::{Command, Stdio};
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        println!("runc comparison skipped: /bin/busybox missing (apt-get install busybox-static)");
        return None;
    }
    let bundle = dir.join("runc-bundle");
    std::fs::create_dir_all(bundle.join("rootfs/bin")).ok()?;
    std::fs::copy(busybox, bundle.join("rootfs/bin/busybox")).ok()?;
    let spec = Command::new("runc")
        .arg("spec")
        .current_dir(&bundle)
        .status()
        .ok()?;
    if !spec.success() {
        println!("runc comparison skipped: `runc spec` failed (apt-get install runc)");
        return None;
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).ok()?).ok()?;
    config["process"]["args"] = serde_json::json!(["/bin/busybox", "true"]);
    config["process"]["terminal"] = serde_json::Value::Bool(false);
    std::fs::write(bundle.join("config.json"), config.to_string()).ok()?;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let status = Command::new("runc")
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("flotilla-bench-{}-{i}", std::process::id()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .ok()?;
        if !status.success() {
            println!("runc comparison skipped: `runc run` failed ({status})");
            return None;
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Some(times)
}

async fn wait_started(rx: &mut mpsc::Receiver<RuntimeEvent>) {
    while let Some(ev) = rx.recv().await {
        if let RuntimeEvent::Started { result, .. } = ev {
            assert!(result.is_ok(), "{result:?}");
            return;
        }
    }
}

async fn wait_stopped(rx: &mut mpsc::Receiver<RuntimeEvent>) {
    while let Some(ev) = rx.recv().await {
        if matches!(ev, RuntimeEvent::Stopped { .. }) {
            return;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let rt = WasmRuntime::new(&dir.path().join("modules")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (tx, mut rx) = mpsc::channel(1024);
    let base = sensor();
    let digest = Digest::of(&base);
    let path = dir.path().join(digest.to_hex());
    std::fs::write(&path, &base)?;
    let req = |op: u64, d: Digest, p: &Path| StartRequest {
        name: WorkloadName::new("sensor").unwrap_or_else(|_| unreachable!()),
        op,
        spec: spec("sensor", d),
        artifact_path: p.to_owned(),
        artifact: d,
        image: None,
        generation: 1,
        secrets: Default::default(),
    };
    // Warm the compiled-module cache once.
    let mut h = rt.start(req(0, digest, &path), tx.clone());
    wait_started(&mut rx).await;
    h.stop(1);
    wait_stopped(&mut rx).await;

    let mut warm = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        let mut h = rt.start(req(10 + i, digest, &path), tx.clone());
        wait_started(&mut rx).await;
        warm.push(t.elapsed().as_secs_f64() * 1000.0);
        h.stop(1);
        wait_stopped(&mut rx).await;
    }
    let warm_p50 = stats("runtime start, warm (cached module)", warm);

    let mut cold = Vec::new();
    for i in 0..30 {
        let bytes = variant(&base, i);
        let d = Digest::of(&bytes);
        let p = dir.path().join(d.to_hex());
        std::fs::write(&p, &bytes)?;
        let t = Instant::now();
        let mut h = rt.start(req(1000 + u64::from(i), d, &p), tx.clone());
        wait_started(&mut rx).await;
        cold.push(t.elapsed().as_secs_f64() * 1000.0);
        h.stop(1);
        wait_stopped(&mut rx).await;
    }
    stats("runtime start, cold (compile)", cold);

    // Full path: the bytes of a signed desired state -> running.
    let hub = SigningKey::from_seed([3; 32]);
    let root = Root {
        version: 1,
        expires_at: u64::MAX,
        root_keys: vec![hub.public()],
        root_threshold: 1,
        release_keys: vec![hub.public()],
        release_threshold: 1,
        hub_keys: vec![hub.public()],
        hub_threshold: 1,
    };
    let device = DeviceId::new("bench").unwrap_or_else(|_| unreachable!());
    let mut store = Store::open(&dir.path().join("state"))?;
    let mut floor = TrustFloor::default();
    let mut full = Vec::new();
    for g in 1..=100u64 {
        let ds = DesiredState {
            device: device.clone(),
            generation: g,
            issued_at: 1,
            expires_at: u64::MAX - 1,
            workloads: vec![spec("sensor", digest)],
            sealed: vec![],
            staged: vec![],
        };
        let wire = codec::encode(&Message::DesiredState(trust::sign(
            DocType::DesiredState,
            &ds,
            &[&hub],
        )))?;
        let mut reconciler = Reconciler::new();
        let t = Instant::now();
        let Ok(Message::DesiredState(signed)) = codec::decode(&wire) else {
            anyhow::bail!("decode")
        };
        let ds = trust::verify_desired(&root, &device, &signed, &floor, None, 2)?;
        store.accept_desired(ds.generation, ds.issued_at, &signed)?;
        floor.generation = ds.generation;
        let wanted = ds.workloads.into_iter().map(|spec| DesiredWorkload {
            spec,
            artifact: Some(digest),
            inside_fence: true,
            rejected: None,
        });
        reconciler.set_desired(0, wanted.collect());
        let Some(Action::Start { op, .. }) = reconciler.poll_action() else {
            anyhow::bail!("no start")
        };
        let mut h = rt.start(req(op, digest, &path), tx.clone());
        wait_started(&mut rx).await;
        full.push(t.elapsed().as_secs_f64() * 1000.0);
        h.stop(1);
        wait_stopped(&mut rx).await;
    }
    let full_p50 = stats("desired bytes -> running, warm", full);
    if let Some(runc) = runc_runs(dir.path(), 50) {
        let runc_p50 = stats("peer: runc run (busybox true)", runc);
        println!(
            "runc run p50 / WASM warm start p50 = {:.0}x; runc run p50 / full path p50 = {:.0}x",
            runc_p50 / warm_p50,
            runc_p50 / full_p50
        );
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
