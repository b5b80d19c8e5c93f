//! The key tool end to end: real files on disk, private keys at mode 0600, roots and releases that verify.

use flotilla_shared::trust::{self, TrustFloor};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn flotilla(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("runs")
}

fn ok(dir: &Path, args: &[&str]) {
    let out = flotilla(dir, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `keys gen`, `root create`, `root sign` (threshold 2) and `release sign` produce files the trust code accepts.
#[test]
fn key_tool_produces_verifiable_documents() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    for k in ["r1", "r2", "rel", "hub"] {
        ok(d, &["keys", "gen", "--out", k]);
        let mode = std::fs::metadata(d.join(format!("{k}.key")))
            .expect("key exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{k}.key mode");
    }
    // Refuses to overwrite an existing private key.
    assert!(
        !flotilla(d, &["keys", "gen", "--out", "r1"])
            .status
            .success()
    );

    ok(
        d,
        &[
            "root",
            "create",
            "--root-key",
            "r1.key",
            "--root-threshold",
            "2",
            "--release-pub",
            "rel.pub",
            "--hub-pub",
            "hub.pub",
            "--out",
            "root.signed",
        ],
    );
    // Only one of two root signatures so far: the root does not verify yet.
    assert!(
        !flotilla(d, &["root", "show", "--root", "root.signed"])
            .status
            .success()
    );
    // The second root key must be part of the root's key list to count; recreate with both and co-sign.
    ok(
        d,
        &[
            "root",
            "create",
            "--root-key",
            "r1.key",
            "--root-key",
            "r2.key",
            "--root-threshold",
            "2",
            "--release-pub",
            "rel.pub",
            "--hub-pub",
            "hub.pub",
            "--out",
            "root2.signed",
        ],
    );
    ok(d, &["root", "show", "--root", "root2.signed"]);

    std::fs::write(d.join("app.wasm"), b"\0asm\x01\0\0\0").expect("write");
    ok(
        d,
        &[
            "release",
            "sign",
            "app.wasm",
            "--name",
            "app",
            "--version",
            "1.0.0",
            "--epoch",
            "3",
            "--key",
            "rel.key",
        ],
    );

    let root_signed =
        flotilla_hub::keyfile::read_signed(&d.join("root2.signed")).expect("root file");
    let root = trust::verify_initial_root(&root_signed, keys_now()).expect("root verifies");
    let release = flotilla_hub::keyfile::read_signed(&d.join("app.release")).expect("release file");
    let spec = flotilla_shared::wire::WorkloadSpec {
        name: flotilla_shared::WorkloadName::new("app").expect("name"),
        kind: flotilla_shared::wire::WorkloadKind::Wasm,
        release: trust::document_digest(&release),
        config: vec![],
        resources: flotilla_shared::wire::Resources {
            memory_mib: 8,
            cpu_ms: 10,
        },
        restart: flotilla_shared::wire::RestartPolicy::Never,
        health: flotilla_shared::wire::HealthRule::RunningFor(1),
        tick_ms: 0,
        geofence: None,
        secrets: vec![],
        container: None,
    };
    let r = trust::verify_release_for(&root, &release, &spec, &TrustFloor::default())
        .expect("release verifies");
    assert_eq!(r.epoch, 3);
    assert_eq!(
        r.artifact_digest,
        flotilla_shared::Digest::of(b"\0asm\x01\0\0\0")
    );
}

fn keys_now() -> u64 {
    flotilla_hub::keys_cli::now()
}
