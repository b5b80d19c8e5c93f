//! `flotilla demo`: a real fleet on one machine. Starts a hub with the embedded broker, enrolls six real
//! `flotilla-agent` processes across three regions (each with its own data directory and position), pushes the
//! signed sample WASM workload from `firmware-images/`, applies a geo-aware deployment and shows the fleet
//! converge in a live table; then, when a Docker engine is reachable, a container workload built on the spot from
//! busybox-static. Leaves everything running until Ctrl-C.

use crate::client::Client;
use crate::keys_cli::{self, ReleaseSign};
use crate::server::{self, BrokerChoice, DataDir};
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The sample workload, built from `firmware-images/wat/sensor.wat` by the recipe in `firmware-images/README.md`.
const SENSOR_WASM: &[u8] = include_bytes!("../../firmware-images/wasm/sensor.wasm");

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the demo keeps the hub and agent data (recreated on each run).
    #[arg(long, default_value = ".flotilla-demo")]
    pub dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt: SocketAddr,
    /// Exit after the fleet converged instead of leaving it running (for scripted runs).
    #[arg(long)]
    pub exit_after_converge: bool,
}

/// (device, region, zone, lat, lon)
const FLEET: &[DemoDevice] = &[
    ("berlin-gw", "eu-west", "eu-a", 52.520, 13.405),
    ("paris-gw", "eu-west", "eu-b", 48.857, 2.352),
    ("newyork-gw", "us-east", "us-a", 40.713, -74.006),
    ("boston-gw", "us-east", "us-b", 42.360, -71.058),
    ("singapore-gw", "ap-south", "ap-a", 1.352, 103.820),
    ("mumbai-gw", "ap-south", "ap-b", 19.076, 72.878),
];

const SPEC: &str = r#"# Demo deployment: one sensor per region, preferring healthy devices; swaps in another device of the
# region if the chosen one stays offline for more than 60 s.
name = "sensors"

[target]
selector = { role = "gateway" }
regions = ["eu-west", "us-east", "ap-south"]

[placement]
policy = "per-region"
count = 1
grace_secs = 60

[[workloads]]
name = "sensor"
release = "sensor@1.0.0"
tick_ms = 1000
memory_mib = 8
cpu_ms = 20
config = { site = "demo", unit = "count" }
# The sensor publishes a counter as 8 little-endian bytes: the JSON feed and history show it as a number.
telemetry = { count = "u64le" }
"#;

fn agent_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let candidate = exe.with_file_name("flotilla-agent");
    if candidate.exists() {
        return Ok(candidate);
    }
    bail!(
        "flotilla-agent not found next to {}; build it with `cargo build --release --bins`",
        exe.display()
    )
}

struct Fleet(Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Containers outlive their agent by design (a restarted agent adopts them); the demo's do not outlive it.
        for (id, ..) in FLEET {
            let ids = Command::new("docker")
                .args(["ps", "-aq", "--filter"])
                .arg(format!("label=io.flotilla.device={id}"))
                .stderr(Stdio::null())
                .output();
            if let Ok(out) = ids {
                for cid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("docker")
                        .args(["rm", "-f", cid])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }
}

const CONTAINER_SPEC: &str = r#"# Demo container deployment: one busybox ticker in eu-west, on a device whose agent reached a container engine.
name = "ticker"

[target]
selector = { role = "gateway" }
regions = ["eu-west"]

[placement]
policy = "per-region"
count = 1

[constraints]
runtime = "container"

[[workloads]]
name = "ticker"
release = "ticker@1.0.0"
kind = "container"
memory_mib = 16
restart = "always"
command = ["/bin/sh", "-c", "while true; do echo tick; sleep 5; done"]
"#;

/// Builds a tiny image from Debian's busybox-static on the spot (`docker import` of a one-binary rootfs, then
/// `docker save`), or says why it cannot.
fn busybox_image(dir: &Path) -> std::result::Result<PathBuf, String> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        return Err("/bin/busybox is missing (apt-get install busybox-static)".into());
    }
    let up = Command::new("docker")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !up.is_ok_and(|s| s.success()) {
        return Err("no Docker engine is reachable".into());
    }
    let root = dir.join("ticker-rootfs");
    let tar = dir.join("ticker.tar");
    let made = (|| -> std::io::Result<bool> {
        std::fs::create_dir_all(root.join("bin"))?;
        std::fs::create_dir_all(root.join("tmp"))?;
        std::fs::copy(busybox, root.join("bin/busybox"))?;
        for applet in ["sh", "sleep", "echo"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
        let tag = "flotilla-demo/ticker:1.0.0";
        let script = format!(
            "tar -C '{}' -c . | docker import - {tag} >/dev/null && docker save -o '{}' {tag} && docker rmi {tag} >/dev/null",
            root.display(),
            tar.display()
        );
        Ok(Command::new("sh").arg("-c").arg(script).status()?.success())
    })();
    match made {
        Ok(true) => Ok(tar),
        Ok(false) => Err("docker import/save failed".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Pushes and applies the container deployment and waits until it runs; `Err` says why it was skipped.
fn container_demo(
    client: &Client,
    dir: &Path,
    key: PathBuf,
) -> std::result::Result<String, String> {
    let tar = busybox_image(dir)?;
    let sign = ReleaseSign {
        compatible: None,
        artifact: tar,
        name: "ticker".into(),
        version: "1.0.0".into(),
        epoch: 1,
        kind: "container".into(),
        keys: vec![key],
        registry: None,
        precompile: vec![],
        out: None,
    };
    let keys_cli::SignedRelease {
        signed, artifact, ..
    } = keys_cli::sign_release(&sign).map_err(|e| format!("{e:#}"))?;
    let e = |e: anyhow::Error| format!("{e:#}");
    client
        .post(
            "/api/v1/artifacts",
            "application/octet-stream",
            &artifact,
            &[],
        )
        .map_err(e)?;
    client
        .post(
            "/api/v1/releases",
            "application/octet-stream",
            &postcard::to_stdvec(&signed).map_err(|x| x.to_string())?,
            &[],
        )
        .map_err(e)?;
    client
        .post(
            "/api/v1/deployments",
            "application/toml",
            CONTAINER_SPEC.as_bytes(),
            &[("x-flotilla-spec-file", "ticker.toml")],
        )
        .map_err(e)?;
    let start = Instant::now();
    wait_for("the container", Duration::from_secs(60), || {
        let devices = client.get("/api/v1/devices").ok()?;
        devices.as_array()?.iter().find_map(|d| {
            let w = d["workloads"].as_array()?.iter().find(|w| w["name"] == "ticker")?;
            (w["state"] == "running").then(|| d["id"].as_str().unwrap_or("?").to_owned())
        })
    })
    .map(|device| {
        format!(
            "container ticker@1.0.0 running on {device}, {:.1} s after apply ({} KiB signed image over MQTT)",
            start.elapsed().as_secs_f64(),
            artifact.len() / 1024
        )
    })
    .map_err(e)
}

fn wait_for<T>(what: &str, patience: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > patience {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn table(devices: &Value) -> (String, usize) {
    let mut out = format!(
        "{:<14} {:<9} {:<7} {:<7} {:>4}/{:<4} {}\n",
        "DEVICE", "REGION", "ZONE", "ONLINE", "GEN", "WANT", "WORKLOADS"
    );
    let mut running = 0;
    for d in devices.as_array().into_iter().flatten() {
        let ws: Vec<String> = d["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| {
                if w["state"] == "running" {
                    running += 1;
                }
                format!(
                    "{}@{} {}",
                    w["name"].as_str().unwrap_or("?"),
                    w["version"].as_str().unwrap_or("?"),
                    w["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        out += &format!(
            "{:<14} {:<9} {:<7} {:<7} {:>4}/{:<4} {}\n",
            d["id"].as_str().unwrap_or("?"),
            d["region"].as_str().unwrap_or("-"),
            d["zone"].as_str().unwrap_or("-"),
            d["online"].to_string(),
            d["applied_generation"].to_string(),
            d["desired_generation"].to_string(),
            if ws.is_empty() {
                "-".to_owned()
            } else {
                ws.join(", ")
            }
        );
    }
    (out, running)
}

/// One demo device: (id, region, zone, lat, lon).
type DemoDevice = (&'static str, &'static str, &'static str, f64, f64);

fn write_agent_config(dir: &Path, mqtt: &str, token: &str, device: &DemoDevice) -> Result<PathBuf> {
    let (id, region, zone, lat, lon) = *device;
    std::fs::create_dir_all(dir)?;
    let cfg = format!(
        "version = 1\ndevice_id = \"{id}\"\ndata_dir = \"{}\"\nbroker = \"{mqtt}\"\nenroll_token = \"{token}\"\n\
         region = \"{region}\"\nzone = \"{zone}\"\nlabels = {{ role = \"gateway\" }}\n\n[position]\nlat = {lat}\nlon = {lon}\n\n\
         [limits]\nreport_interval_secs = 10\n\n[telemetry]\nmetrics_interval_secs = 10\n",
        dir.join("state").display()
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, cfg)?;
    Ok(path)
}

/// Recreates the demo directory and opens the hub's log file in it, before logging starts: the hub runs in this
/// process, and its log lines must not interleave with the live table.
pub fn prepare(args: &DemoArgs) -> Result<std::fs::File> {
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("clearing {}", args.dir.display()))?;
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let log = args.dir.join("hub.log");
    std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))
}

pub fn run(args: DemoArgs) -> Result<()> {
    let agent_bin = agent_binary()?;
    let hub_dir = DataDir(args.dir.join("hub"));
    std::fs::create_dir_all(&hub_dir.0)?;
    let token = server::init(&hub_dir)?;
    let (http, mqtt, dir) = (args.http, args.mqtt, hub_dir.clone());
    std::thread::Builder::new()
        .name("hub".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return eprintln!("hub runtime: {e}"),
            };
            if let Err(e) = rt.block_on(server::serve(
                dir,
                http,
                BrokerChoice::Embedded {
                    listen: mqtt,
                    tls: None,
                },
            )) {
                eprintln!("hub stopped: {e:#}");
                std::process::exit(1);
            }
        })?;
    let (api, mqtt_url) = wait_for("the hub to start", Duration::from_secs(30), || {
        server::read_endpoints(&hub_dir.0)
    })?;
    let client = Client::new(&api, &token);
    wait_for("the API", Duration::from_secs(30), || {
        client.get("/api/v1/devices").ok()
    })?;

    outln!("\n== enrolling {} agents across 3 regions", FLEET.len());
    let mut fleet = Fleet(Vec::new());
    for device in FLEET {
        let (id, region, zone, ..) = device;
        let body = serde_json::json!({"region": region, "zone": zone, "labels": {"role": "gateway"}, "ttl_secs": 600});
        let t = client.post(
            "/api/v1/enrollment-tokens",
            "application/json",
            body.to_string().as_bytes(),
            &[],
        )?;
        let t = t["token"].as_str().context("token")?.to_owned();
        let dir = args.dir.join("agents").join(id);
        let cfg = write_agent_config(&dir, &mqtt_url, &t, device)?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let child = Command::new(&agent_bin)
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", agent_bin.display()))?;
        fleet.0.push(child);
    }
    wait_for("all agents to enroll", Duration::from_secs(60), || {
        client
            .get("/api/v1/devices")
            .ok()
            .filter(|v| v.as_array().is_some_and(|a| a.len() == FLEET.len()))
    })?;

    outln!(
        "== signing and pushing the sample workload sensor@1.0.0 ({} bytes of WASM)",
        SENSOR_WASM.len()
    );
    let wasm = args.dir.join("sensor.wasm");
    std::fs::write(&wasm, SENSOR_WASM)?;
    let sign = ReleaseSign {
        compatible: None,
        artifact: wasm.clone(),
        name: "sensor".into(),
        version: "1.0.0".into(),
        epoch: 1,
        kind: "wasm".into(),
        keys: vec![hub_dir.release_key()],
        registry: None,
        precompile: vec![],
        out: None,
    };
    let signed = keys_cli::sign_release(&sign)?.signed;
    client.post(
        "/api/v1/artifacts",
        "application/octet-stream",
        SENSOR_WASM,
        &[],
    )?;
    client.post(
        "/api/v1/releases",
        "application/octet-stream",
        &postcard::to_stdvec(&signed)?,
        &[],
    )?;

    outln!("== applying a geo-aware deployment (one sensor per region)\n");
    let spec_path = args.dir.join("sensors.toml");
    std::fs::write(&spec_path, SPEC)?;
    client.post(
        "/api/v1/deployments",
        "application/toml",
        SPEC.as_bytes(),
        &[("x-flotilla-spec-file", "sensors.toml")],
    )?;

    let start = Instant::now();
    let mut last = String::new();
    loop {
        let devices = client.get("/api/v1/devices")?;
        let (text, running) = table(&devices);
        if text != last {
            outln!("t+{:>5.1}s\n{text}", start.elapsed().as_secs_f64());
            last = text;
        }
        if running == 3 {
            outln!(
                "converged: 3 regions, one sensor each, in {:.1} s after apply",
                start.elapsed().as_secs_f64()
            );
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!(
                "fleet did not converge within 120 s; agent logs are in {}/agents/*/agent.log",
                args.dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    outln!("\n== a container workload (busybox ticker in eu-west)");
    match container_demo(&client, &args.dir, hub_dir.release_key()) {
        Ok(done) => outln!("{done}"),
        Err(why) => outln!("skipped the container workload: {why}"),
    }
    // The telemetry feed needs a credential like any other client: a read-only one for the demo's eu-west region.
    let feed = client.post(
        "/api/v1/feed-credentials",
        "application/json",
        br#"{"name": "demo", "regions": ["eu-west"]}"#,
        &[],
    )?;
    let feed_login = format!(
        "-i {} -u {} -P {}",
        feed["client_id"].as_str().unwrap_or("feed-demo"),
        feed["username"].as_str().unwrap_or("feed-demo"),
        feed["password"].as_str().unwrap_or("?")
    );
    let token_file = std::path::absolute(hub_dir.admin_token())?;
    // The hints must work as printed: the binaries are not on the PATH after `./scripts/demo.sh`.
    let bin_dir = agent_bin
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    outln!(
        "\nThe hub is running (logs: {logs}/hub.log and {logs}/agents/*/agent.log). Try the CLI against it:\n\
         \x20 export PATH=\"{bin}:$PATH\" FLOTILLA_SERVER={api} FLOTILLA_TOKEN_FILE={}\n\
         \x20 flotilla device ls\n\
         \x20 flotilla deploy status sensors\n\
         \x20 flotilla why paris-gw sensor\n\
         \x20 flotilla why berlin-gw ticker\n\
         \x20 mosquitto_sub -h {} -p {} {feed_login} -t 'flotilla/v1/feed/json/eu-west/#'   # telemetry as JSON\n\
         \x20 flotilla telemetry tail --region eu-west\n\
         \x20 flotilla telemetry query berlin-gw count --since 5m\n\
         Console: {api}/  (log in with the admin token: cat {})\n\
         API: {api}/api/v1/openapi.json   metrics: {api}/metrics   spec: {}\n",
        token_file.display(),
        mqtt.ip(),
        mqtt_url.rsplit(':').next().unwrap_or("1883"),
        token_file.display(),
        spec_path.display(),
        logs = args.dir.display(),
        bin = std::path::absolute(&bin_dir)?.display(),
    );
    if args.exit_after_converge {
        return Ok(());
    }
    outln!("Press Ctrl-C to stop the hub and the agents.");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // SIGTERM too (systemd, `timeout`, `docker stop`): the hub thread catches it as well, so waiting for ctrl-c
    // alone would leave the demo hanging with its hub stopped.
    rt.block_on(server::shutdown_signal());
    drop(fleet);
    Ok(())
}
