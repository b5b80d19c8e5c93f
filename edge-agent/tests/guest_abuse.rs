//! R8 guest abuse against the real WASM runtime: an infinite loop, a memory bomb, deep recursion and a trap are
//! each stopped within their limits and reported with a reason, while a well-behaved workload keeps ticking.

use flotilla_agent::runtime::wasm::WasmRuntime;
use flotilla_agent::runtime::{Runtime, RuntimeEvent, StartRequest};
use flotilla_agent_core::Exit;
use flotilla_shared::wire::{HealthRule, Resources, RestartPolicy, WorkloadKind, WorkloadSpec};
use flotilla_shared::{Digest, WorkloadName};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

fn firmware(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../firmware-images/wat")
        .join(format!("{name}.wat"));
    wat::parse_file(&path).expect("valid wat")
}

fn request(dir: &Path, name: &str, op: u64, tick_ms: u32, memory_mib: u32) -> StartRequest {
    let bytes = firmware(name);
    let digest = Digest::of(&bytes);
    let path: PathBuf = dir.join(digest.to_hex());
    std::fs::write(&path, &bytes).expect("write artifact");
    StartRequest {
        name: WorkloadName::new(name).expect("valid"),
        op,
        spec: WorkloadSpec {
            name: WorkloadName::new(name).expect("valid"),
            kind: WorkloadKind::Wasm,
            release: digest,
            config: b"site=test".to_vec(),
            resources: Resources {
                memory_mib,
                cpu_ms: 50,
            },
            restart: RestartPolicy::OnFailure,
            health: HealthRule::RunningFor(1),
            tick_ms,
            geofence: None,
            secrets: vec![],
            container: None,
        },
        artifact_path: path,
        artifact: digest,
        image: None,
        generation: 1,
        secrets: Default::default(),
    }
}

/// Waits for the next event matching `pred`, with a generous patience budget (the machine may be busy compiling).
async fn wait_for(
    rx: &mut mpsc::Receiver<RuntimeEvent>,
    mut pred: impl FnMut(&RuntimeEvent) -> bool,
) -> RuntimeEvent {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let ev = rx.recv().await.expect("runtime channel open");
            if pred(&ev) {
                return ev;
            }
        }
    })
    .await
    .expect("event within patience budget")
}

/// Each abusive guest ends with the right reason; the sensor keeps publishing telemetry before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_guests_are_contained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = WasmRuntime::new(&dir.path().join("modules")).expect("runtime");
    let (tx, mut rx) = mpsc::channel(1024);
    let _sensor = rt.start(request(dir.path(), "sensor", 1, 20, 4), tx.clone());
    let is_sensor_tick = |e: &RuntimeEvent| matches!(e, RuntimeEvent::Telemetry { name, .. } if name.as_str() == "sensor");
    wait_for(&mut rx, is_sensor_tick).await;

    let cases = [
        ("spin", "cpu budget exceeded"),
        ("membomb", "memory"),
        ("recurse", "call stack exhausted"),
        ("trap", "unreachable"),
    ];
    for (i, (guest, reason)) in cases.into_iter().enumerate() {
        let op = 10 + i as u64;
        let mut req = request(dir.path(), guest, op, 10, 2);
        if guest != "spin" {
            // Only the spinner is meant to run out of time. The budget is measured in epochs of wall-clock time,
            // so on a loaded machine (or under qemu) a guest that is not scheduled for 50 ms would be stopped
            // for time before it reaches the limit it is there to hit.
            req.spec.resources.cpu_ms = 5_000;
        }
        let _h = rt.start(req, tx.clone());
        let ev = wait_for(
            &mut rx,
            |e| matches!(e, RuntimeEvent::Exited { name, .. } if name.as_str() == guest),
        )
        .await;
        let RuntimeEvent::Exited {
            exit: Exit::Failed(msg),
            op: got,
            ..
        } = ev
        else {
            panic!("{guest}: {ev:?}")
        };
        assert_eq!(got, op);
        assert!(
            msg.to_lowercase().contains(reason),
            "{guest}: {msg:?} should mention {reason:?}"
        );
        // The well-behaved workload is unaffected: it keeps ticking after each abuse.
        wait_for(&mut rx, is_sensor_tick).await;
    }
}

/// A command-style guest runs `_start` to completion, writes to the captured stdout and publishes telemetry; a
/// ticked guest is stopped on request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_completes_and_ticked_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = WasmRuntime::new(&dir.path().join("modules")).expect("runtime");
    let (tx, mut rx) = mpsc::channel(1024);
    let hello = rt.start(request(dir.path(), "hello", 1, 0, 4), tx.clone());
    let ev = wait_for(&mut rx, |e| matches!(e, RuntimeEvent::Telemetry { .. })).await;
    let RuntimeEvent::Telemetry {
        stream, payload, ..
    } = ev
    else {
        unreachable!()
    };
    assert_eq!(
        (stream.as_str(), payload.as_slice()),
        ("boot", b"hello from flotilla".as_slice())
    );
    let ev = wait_for(&mut rx, |e| matches!(e, RuntimeEvent::Exited { .. })).await;
    assert!(
        matches!(
            ev,
            RuntimeEvent::Exited {
                exit: Exit::Completed,
                ..
            }
        ),
        "{ev:?}"
    );
    assert!(hello.logs().contains("hello from flotilla"));

    let mut sensor = rt.start(request(dir.path(), "sensor", 2, 10, 4), tx.clone());
    wait_for(&mut rx, |e| {
        matches!(e, RuntimeEvent::Started { result: Ok(()), .. })
    })
    .await;
    assert!(
        sensor.logs().contains("site=test"),
        "config reached the guest: {:?}",
        sensor.logs()
    );
    sensor.stop(3);
    let ev = wait_for(&mut rx, |e| matches!(e, RuntimeEvent::Stopped { .. })).await;
    assert!(matches!(ev, RuntimeEvent::Stopped { op: 3, .. }));
    // The compiled module was cached on disk keyed by digest and engine fingerprint.
    let cached = std::fs::read_dir(dir.path().join("modules"))
        .expect("cache dir")
        .count();
    assert!(cached >= 2, "{cached} cached modules");
}

/// A guest holds updates through the host API (with a duration) and lifts the hold later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_hold_through_host_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = WasmRuntime::new(&dir.path().join("modules")).expect("runtime");
    let (tx, mut rx) = mpsc::channel(1024);
    let _h = rt.start(request(dir.path(), "holder", 1, 10, 2), tx.clone());
    let ev = wait_for(&mut rx, |e| matches!(e, RuntimeEvent::Hold { .. })).await;
    let RuntimeEvent::Hold { reason, secs, .. } = ev else {
        unreachable!()
    };
    assert_eq!((reason.as_str(), secs), ("vehicle in motion", 60));
    let ev = wait_for(&mut rx, |e| matches!(e, RuntimeEvent::Hold { .. })).await;
    assert!(matches!(ev, RuntimeEvent::Hold { secs: 0, .. }), "{ev:?}");
}
