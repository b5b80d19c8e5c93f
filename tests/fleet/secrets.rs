//! Sealed workload secrets: set once with `flotilla secret set` (write-only), sealed to each placed device's own
//! key, read by a WASM guest through `secret_read`, and never in the clear on the hub (database, logs, API) or in
//! the agent's state.

use flotilla_fleet_tests::{AgentSpec, Fleet, FleetBuilder, PATIENCE, bin_dir, firmware, wait_for};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

const SPEC: &str = "name = \"vault\"\n[[workloads]]\nname = \"secret-reader\"\n\
                    release = \"secret-reader@1.0.0\"\ntick_ms = 200\n";

/// `flotilla secret set NAME --deployment vault` with the value on standard input.
fn set_secret(fleet: &Fleet, name: &str, value: &[u8]) -> std::process::Output {
    let mut child = Command::new(bin_dir().join("flotilla"))
        .args(["secret", "set", name, "--deployment", "vault"])
        .env("FLOTILLA_SERVER", &fleet.hub.api)
        .env("FLOTILLA_TOKEN_FILE", fleet.hub.dir.join("admin.token"))
        .env("FLOTILLA_CONFIG", "/nonexistent/cli.toml")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(value)
        .expect("write the value");
    child.wait_with_output().expect("exits")
}

/// The guest's latest `secret_len` and `secret_sum` metrics on `device`.
fn guest_metrics(fleet: &Fleet, device: &str) -> Option<(f64, f64)> {
    let v = fleet
        .hub
        .client
        .get(&format!("/api/v1/devices/{device}/telemetry"))
        .ok()?;
    let stream = v["streams"]
        .as_array()?
        .iter()
        .find(|s| s["stream"] == "secret-reader.metrics")?;
    Some((
        stream["metrics"]["secret_len"].as_f64()?,
        stream["metrics"]["secret_sum"].as_f64()?,
    ))
}

fn wait_secret(fleet: &Fleet, device: &str, value: &[u8]) {
    let want = (
        value.len() as f64,
        value.iter().map(|b| f64::from(*b)).sum::<f64>(),
    );
    wait_for(
        &format!("{device}'s guest to read the secret"),
        PATIENCE,
        || (guest_metrics(fleet, device) == Some(want)).then_some(()),
    )
    .expect("the guest reads the secret");
}

/// Every file under `dir`, as bytes, with its path.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p.display().to_string(), bytes));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A WASM guest on each device reads the deployment's secret; a new value is a new version and the guest restarts
/// with it; the value sealed to one device does not open with another's key; bad input is refused and changes
/// nothing; and the plaintext is nowhere on the hub (database, WAL, every file, log, API responses) nor in the
/// agents' state directories.
#[test]
fn workload_secrets_are_sealed_to_each_device() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("gw-a", "eu-west", 52.5, 13.4))
        .agent(AgentSpec::new("gw-b", "eu-west", 48.1, 11.6))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    hub.push_release("secret-reader", "1.0.0", 1, &firmware("secret-reader"))
        .expect("release");
    hub.apply(SPEC).expect("apply");
    for d in ["gw-a", "gw-b"] {
        hub.wait_workload(d, "secret-reader", "running")
            .expect("running");
    }
    wait_for("the guest reports no secret yet", PATIENCE, || {
        guest_metrics(&fleet, "gw-a")
            .filter(|(len, _)| *len == -1.0)
            .map(|_| ())
    })
    .expect("no secret before it is set");

    let first = b"s3cr3t-Plaintext-7Q";
    let out = set_secret(&fleet, "token", first);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("version 1") && !said.contains("Plaintext"),
        "{said}"
    );
    for d in ["gw-a", "gw-b"] {
        wait_secret(&fleet, d, first);
    }

    // Sealed per device: gw-a's copy opens with gw-a's key only.
    let sealed_for_a = {
        let store = flotilla_hub::store::Store::open(&hub.dir).expect("hub store");
        let dev = flotilla_shared::DeviceId::new("gw-a").expect("id");
        let (_, _, signed, _) = store.desired(&dev).expect("read").expect("a desired state");
        let ds: flotilla_shared::wire::DesiredState =
            flotilla_shared::codec::decode_exact(&signed.body).expect("decodes");
        ds.sealed.first().expect("a sealed secret").sealed.clone()
    };
    let key_of = |id: &str| {
        let store =
            flotilla_agent::store::Store::open(&fleet.agent(id).state_dir()).expect("agent store");
        let bytes = store.sealing_key().expect("read").expect("a sealing key");
        flotilla_shared::seal::SealingKey::from_bytes(&bytes).expect("32 bytes")
    };
    assert_eq!(
        key_of("gw-a").open(&sealed_for_a).as_deref(),
        Ok(&first[..])
    );
    assert!(
        key_of("gw-b").open(&sealed_for_a).is_err(),
        "gw-b cannot open gw-a's copy"
    );

    // A new value: version 2, and the guests restart with it.
    let second = b"rotated-Plaintext-99";
    let out = set_secret(&fleet, "token", second);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("version 2"),
        "{out:?}"
    );
    for d in ["gw-a", "gw-b"] {
        wait_secret(&fleet, d, second);
    }

    // Bad input is refused with a reason, and changes nothing.
    for (path, body, status) in [
        ("/api/v1/deployments/nope/secrets/token", &b"x"[..], "404"),
        ("/api/v1/deployments/vault/secrets/token", b"", "400"),
        ("/api/v1/deployments/vault/secrets/Bad%20Name", b"x", "400"),
        (
            "/api/v1/deployments/vault/secrets/token",
            &[b'x'; 5000][..],
            "400",
        ),
    ] {
        let err = hub
            .client
            .post(path, "application/octet-stream", body, &[])
            .expect_err("refused")
            .to_string();
        assert!(err.starts_with(status), "{path}: {err}");
    }
    let list = hub
        .client
        .get("/api/v1/deployments/vault/secrets")
        .expect("list");
    assert_eq!(list["secrets"][0]["version"], 2, "{list}");

    // No plaintext anywhere: every API response an operator can read, every hub file and log, every agent file.
    let mut responses = String::new();
    for path in [
        "/api/v1/devices",
        "/api/v1/devices/gw-a",
        "/api/v1/devices/gw-a/telemetry",
        "/api/v1/deployments",
        "/api/v1/deployments/vault",
        "/api/v1/deployments/vault/secrets",
        "/api/v1/audit",
        "/api/v1/why/gw-a/secret-reader",
    ] {
        responses.push_str(&hub.client.get(path).expect(path).to_string());
    }
    responses.push_str(&hub.client.get_text("/metrics").expect("metrics"));
    let mut places = files(&hub.dir);
    places.push(("hub log".into(), hub.proc.log_text().into_bytes()));
    places.push(("api".into(), responses.into_bytes()));
    for a in &fleet.agents {
        places.extend(files(&a.dir));
    }
    for value in [&first[..], &second[..]] {
        for (place, bytes) in &places {
            assert!(
                !contains(bytes, value),
                "{} found in {place}",
                String::from_utf8_lossy(value)
            );
        }
    }
}

/// A container reads its deployment's secret from `/run/secrets/<name>`: a file on a tmpfs (never an environment
/// variable), written before the container starts, replaced with a new container when the value changes, and
/// removed with the container. An agent whose `secrets_dir` is on a disk refuses to write it and says why. The
/// plaintext is nowhere on the hub, in the agents' state, in their logs or in `docker inspect`.
#[test]
fn container_secrets_are_files_on_a_tmpfs() {
    use super::containers::{cleanup, container_agent, running};
    let shm = std::path::PathBuf::from(format!("/dev/shm/flotilla-test-{}", std::process::id()));
    let (id, mut agent) = container_agent("secret");
    agent.container_config = format!("secrets_dir = \"{}\"", shm.join("secrets").display());
    // The same, with its secrets directory on the disk: refused.
    let (disk_id, mut disk_agent) = container_agent("secret-disk");
    let disk_dir = std::env::temp_dir().join(format!("flotilla-secrets-{}", std::process::id()));
    disk_agent.container_config = format!("secrets_dir = \"{}\"", disk_dir.display());
    // Declared before the fleet, so it runs after the agents are gone (they would re-create containers).
    let _cleanup = (cleanup(&id), cleanup(&disk_id));
    let fleet = FleetBuilder::new()
        .agent(agent)
        .agent(disk_agent)
        .start()
        .expect("fleet");
    let tar = flotilla_fleet_tests::busybox_image(&fleet.hub.dir, "vault").expect("image");
    fleet
        .hub
        .push_container("vaultc", "1.0.0", 1, &tar)
        .expect("release");
    fleet
        .hub
        .apply(
            "name = \"vault\"\n[target]\nselector = { role = \"gateway\" }\n[[workloads]]\nname = \"vaultc\"\n\
             release = \"vaultc@1.0.0\"\nkind = \"container\"\nmemory_mib = 16\nrestart = \"always\"\n\
             command = [\"/bin/sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done\"]\n",
        )
        .expect("apply");
    fleet
        .hub
        .wait_workload(&id, "vaultc", "running")
        .expect("running");
    let read_secret = |name: &str| {
        let out = Command::new("docker")
            .args(["exec", name, "cat", "/run/secrets/token"])
            .output()
            .expect("docker exec");
        out.stdout
    };
    let mut seen = Vec::new();
    for value in [&b"ctr-Plaintext-x1"[..], &b"ctr-rotated-Plaintext-2"[..]] {
        let out = set_secret(&fleet, "token", value);
        assert!(out.status.success(), "{out:?}");
        let name = wait_for("the container with its secret", PATIENCE, || {
            let (name, _) = running(&id, "vaultc")?;
            (read_secret(&name) == value).then_some(name)
        })
        .expect("the container reads the secret");
        let inspect = flotilla_fleet_tests::docker(&["inspect", &name]);
        assert!(
            !inspect.contains(std::str::from_utf8(value).expect("utf-8")),
            "not in the container's configuration"
        );
        assert!(
            inspect.contains("/run/secrets"),
            "mounted at /run/secrets: {inspect}"
        );
        seen.push((name, value));
    }
    // The first container's secret directory went with it.
    let (first, _) = &seen[0];
    wait_for("the old secret directory removed", PATIENCE, || {
        (!shm.join("secrets").join(first).exists()).then_some(())
    })
    .expect("removed");
    // On the disk-backed agent the start fails, naming the setting, and nothing was written.
    let why = wait_for("the disk agent's refusal", PATIENCE, || {
        let d = fleet.hub.device(&disk_id)?;
        let e = d["workloads"][0]["last_error"].as_str()?.to_owned();
        e.contains("not on a tmpfs").then_some(e)
    })
    .expect("refused");
    assert!(why.contains("secrets_dir"), "{why}");
    assert!(
        files(&disk_dir).is_empty(),
        "nothing written on the disk: {:?}",
        files(&disk_dir)
    );
    // No plaintext on the hub, in the agents' files and logs.
    let mut places = files(&fleet.hub.dir);
    places.push(("hub log".into(), fleet.hub.proc.log_text().into_bytes()));
    for a in &fleet.agents {
        places.extend(files(&a.dir));
        places.push((format!("{} log", a.spec.id), a.log().into_bytes()));
    }
    for (_, value) in &seen {
        for (place, bytes) in &places {
            assert!(
                !contains(bytes, value),
                "{} found in {place}",
                String::from_utf8_lossy(value)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&shm);
    let _ = std::fs::remove_dir_all(&disk_dir);
}
