//! `flotilla-sim`: a scale simulator. Starts a hub with default settings (embedded broker) and N lightweight
//! simulated agents in this process: each is a real MQTT session that enrolls with a one-time token, verifies every
//! desired state with the real trust code and sends device-signed reports. It then applies a deployment to every
//! device and measures apply -> each device reporting running (p50, p99, max), the hub's convergence as seen by its
//! API, hub+broker RSS and CPU, and MQTT messages per second. Artifacts are not downloaded (the simulated agents
//! report running as soon as they have verified the desired state).
//!
//! `cargo build --release --bins -p flotilla-hub -p flotilla-fleet-tests && target/release/flotilla-sim 10000
//! [--mosquitto] [--source-addresses K] [--api-probe]`
//!
//! `--api-probe` also times `GET /api/v1/devices/{id}` and `GET /api/v1/devices` from another thread during the
//! apply. `--console-probe` times the console's pages (logged in as the admin: the overview, a filtered and sorted
//! page of the device list, a device) and its overview event stream (time to the first event, longest silence)
//! from other threads during the apply. `--telemetry SECS` measures telemetry ingest instead: three hubs in turn (raw feed only; JSON feed and
//! history, the default; JSON feed, history and Sparkplug B), each with N devices sending one record a second for
//! SECS seconds, and prints records accepted and stored per second, drops, and hub+broker CPU and RSS.

use anyhow::{Context, Result, bail};
use flotilla_fleet_tests::sim::{SimFleet, proc_cpu_secs, proc_rss_kib};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn pct(v: &[f64], q: f64) -> f64 {
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// This binary re-executed in a helper role (`--relay` or `--guard`), with stdin and stdout piped: it answers with
/// one line (a port or a pid) and runs until its stdin closes, which happens when the simulator exits for any
/// reason, a kill included.
struct Helper {
    child: std::process::Child,
    /// The helper's one-line answer.
    answer: u32,
}

impl Helper {
    fn spawn(args: &[String], stderr: std::process::Stdio) -> Result<Self> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("start helper {args:?}"))?;
        let mut line = String::new();
        let out = child.stdout.take().context("helper stdout")?;
        std::io::BufReader::new(out).read_line(&mut line)?;
        let answer = line
            .trim()
            .parse()
            .with_context(|| format!("helper {args:?} said {line:?}"))?;
        Ok(Self { child, answer })
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Closing its stdin ends the helper (a guard kills its program first).
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// A relay (`--relay`): each relay needs two descriptors per session, which for 10,000 sessions would not fit
/// beside the sessions themselves under one process's limit, hence a process of its own.
fn spawn_relay(upstream: u16, source: std::net::Ipv4Addr) -> Result<(Helper, u16)> {
    let args = [
        "--relay".to_owned(),
        upstream.to_string(),
        source.to_string(),
    ];
    let relay = Helper::spawn(&args, std::process::Stdio::inherit())?;
    let port = u16::try_from(relay.answer).context("relay port")?;
    Ok((relay, port))
}

/// `--relay UPSTREAM_PORT SOURCE_IP`: forwards to the broker from `SOURCE_IP`, prints its own port, and runs until
/// its stdin closes.
fn relay_main(args: &[String]) -> Result<()> {
    use std::io::{Read, Write};
    let upstream: u16 = args.get(2).context("upstream port")?.parse()?;
    let source: std::net::Ipv4Addr = args.get(3).context("source address")?.parse()?;
    let proxy =
        flotilla_fleet_tests::proxy::Proxy::start_from(("127.0.0.1", upstream), Some(source))?;
    println!("{}", proxy.port());
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// Established TCP connections whose local port is `port` (the broker's side), counted by peer IPv4 address, read
/// from `/proc/net/tcp`.
fn sessions_by_peer(port: u16) -> std::collections::BTreeMap<std::net::Ipv4Addr, usize> {
    let mut out = std::collections::BTreeMap::new();
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some(&"01")) = (f.get(1), f.get(2), f.get(3)) else {
            continue;
        };
        let parse = |hexaddr: &str| -> Option<(std::net::Ipv4Addr, u16)> {
            let (ip, p) = hexaddr.split_once(':')?;
            // The kernel prints the address as a native-endian u32 in hex.
            let ip = u32::from_str_radix(ip, 16).ok()?.to_ne_bytes();
            Some((ip.into(), u16::from_str_radix(p, 16).ok()?))
        };
        if let (Some((_, lp)), Some((rip, _))) = (parse(local), parse(remote))
            && lp == port
        {
            *out.entry(rip).or_insert(0) += 1;
        }
    }
    out
}

/// `--guard PROGRAM ARGS..`: runs PROGRAM, prints its pid, and kills it when this process's stdin closes: a killed
/// simulator leaves no hub behind.
fn guard_main(args: &[String]) -> Result<()> {
    use std::io::{Read, Write};
    let program = args.get(2).context("program")?;
    let mut child = std::process::Command::new(program)
        .args(&args[3..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("start {program}"))?;
    println!("{}", child.id());
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

/// Page latencies by page, from the console probe's page thread.
type PageTimes = Vec<(&'static str, Vec<f64>)>;

/// `--console-probe`: logs in to the console as the admin, then times its pages every 100 ms from one thread and
/// reads its overview event stream on another (time to the first event, number of events, longest silence
/// between events), until `stop`.
#[allow(clippy::type_complexity)]
fn console_probe(
    client: &flotilla_hub::client::Client,
    n: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<(
    std::thread::JoinHandle<PageTimes>,
    std::thread::JoinHandle<(f64, f64, usize)>,
)> {
    use flotilla_fleet_tests::browser::{console_login, request};
    use std::io::{BufRead, BufReader, Write};
    let base = client.server.clone();
    let cookie = console_login(&base, &client.token)?;
    let (b, c, st) = (base.clone(), cookie.clone(), stop.clone());
    let pages = std::thread::spawn(move || {
        let mut out: PageTimes = vec![
            ("overview /", vec![]),
            ("devices ?state=online&sort=state&page=N (50 rows)", vec![]),
            ("device /devices/{id}", vec![]),
        ];
        let mut k = 0usize;
        while !st.load(Ordering::Relaxed) {
            let page = (k * 31) % (n / 50).max(1);
            let paths = [
                "/".to_owned(),
                format!("/devices?state=online&sort=state&page={page}"),
                format!("/devices/sim-{:05}", (k * 7_919) % n),
            ];
            for (i, path) in paths.iter().enumerate() {
                let t = Instant::now();
                if request(&b, "GET", path, Some(&c), "").is_ok_and(|r| r.status == 200) {
                    out[i].1.push(t.elapsed().as_secs_f64());
                }
            }
            k += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        out
    });
    let events = std::thread::spawn(move || -> (f64, f64, usize) {
        let host = base.trim_start_matches("http://").to_owned();
        let Ok(mut s) = std::net::TcpStream::connect(&host) else {
            return (f64::NAN, f64::NAN, 0);
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let _ = write!(
            s,
            "GET /events/overview HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n"
        );
        let started = Instant::now();
        let (mut first, mut last, mut longest, mut count) = (f64::NAN, started, 0.0f64, 0usize);
        let mut r = BufReader::new(s);
        let mut line = String::new();
        while !stop.load(Ordering::Relaxed) {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) if line.starts_with("event:") => {
                    let now = Instant::now();
                    if count == 0 {
                        first = now.duration_since(started).as_secs_f64();
                    } else {
                        longest = longest.max(now.duration_since(last).as_secs_f64());
                    }
                    last = now;
                    count += 1;
                }
                // Data lines, blank lines, keep-alives, read timeouts: keep reading.
                _ => {}
            }
        }
        (first, longest, count)
    });
    Ok((pages, events))
}

/// `--help` text.
const USAGE: &str = "
flotilla-sim: scale simulator. A hub (embedded broker, or Mosquitto) and N simulated agents in this process;
applies a deployment to every device and measures apply -> running (p50, p99, max), hub+broker RSS and CPU.

Usage: flotilla-sim [DEVICES] [--mosquitto] [--source-addresses K] [--api-probe] [--console-probe]
       flotilla-sim [DEVICES] --telemetry SECS

  DEVICES                 simulated devices (default 1000)
  --mosquitto             the hub uses an external Mosquitto started here instead of its embedded broker
  --source-addresses K    spread the devices' connections over K loopback source addresses
  --api-probe             time device API calls (one device, a page, the whole list) from another thread during the apply
  --console-probe         time the console's pages and its overview event stream from other threads during the apply
  --telemetry SECS        measure telemetry ingest (one record per device per second for SECS seconds) with the raw
                          feed only, with the JSON feed and history (default hub), and with Sparkplug B too
  -h, --help              this text
";

fn main() -> Result<()> {
    flotilla_fleet_tests::answer_help(USAGE);
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--relay") {
        return relay_main(&args);
    }
    if args.get(1).map(String::as_str) == Some("--guard") {
        return guard_main(&args);
    }
    let n: usize = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with("--"))
        .map(|s| {
            s.parse()
                .with_context(|| format!("DEVICES {s:?} is not a number; see --help"))
        })
        .transpose()?
        .unwrap_or(1000);
    // `--mosquitto`: the hub uses an external Mosquitto (started here) instead of its embedded broker.
    let mosquitto = std::env::args().any(|a| a == "--mosquitto");
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(secs) = flag_value("--telemetry")? {
        return telemetry_bench(n, secs);
    }
    let dir = tempfile::tempdir()?;
    let broker = if mosquitto {
        Some(flotilla_fleet_tests::Mosquitto::start(
            &dir.path().join("mosquitto"),
        )?)
    } else {
        None
    };
    let hub = HubProc::start(dir.path(), broker.as_ref().map(|m| m.port), &[])?;
    let broker_pid = broker.as_ref().map(|m| m.proc.child.id());
    let result = run(n, &hub.dir, hub.pid(), broker_pid);
    if result.is_err() || std::env::var_os("FLOTILLA_SIM_KEEP_LOGS").is_some() {
        hub.keep_logs(dir.path());
    }
    result
}

/// The value after `flag` on the command line, parsed as a number.
fn flag_value(flag: &str) -> Result<Option<u64>> {
    std::env::args()
        .skip_while(|a| a != flag)
        .nth(1)
        .map(|s| {
            s.parse()
                .with_context(|| format!("{flag} {s:?} is not a number; see --help"))
        })
        .transpose()
}

/// A hub started through a guard helper (killed with this process).
struct HubProc {
    helper: Helper,
    dir: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl HubProc {
    /// `flotilla serve` on free ports with its data in `dir/hub`, on the embedded broker or the external one.
    fn start(dir: &std::path::Path, external_port: Option<u16>, extra: &[&str]) -> Result<Self> {
        let hub_dir = dir.join("hub");
        let bins = std::env::current_exe()?
            .parent()
            .context("bin dir")?
            .to_owned();
        let mut hub_args: Vec<String> = ["serve", "--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"]
            .map(str::to_owned)
            .to_vec();
        match external_port {
            Some(port) => {
                hub_args.push("--broker".into());
                hub_args.push(format!("mqtt://127.0.0.1:{port}"));
            }
            // The default device TLS listener on a free port (the simulated devices use the loopback listener).
            None => hub_args.extend(["--mqtt-tls".to_owned(), "127.0.0.1:0".to_owned()]),
        }
        hub_args.push("--data-dir".into());
        hub_args.push(hub_dir.display().to_string());
        hub_args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut guard_args = vec![
            "--guard".to_owned(),
            bins.join("flotilla").display().to_string(),
        ];
        guard_args.extend(hub_args);
        let log = dir.join("hub.log");
        let helper = Helper::spawn(&guard_args, std::fs::File::create(&log)?.into())?;
        Ok(Self {
            helper,
            dir: hub_dir,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.helper.answer
    }

    /// Keeps the hub's and broker's logs for diagnosis; the temp dir goes away with this process.
    fn keep_logs(&self, dir: &std::path::Path) {
        let keep = std::env::temp_dir().join(format!("flotilla-sim-logs-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(&self.log, keep.join("hub.log"));
        let _ = std::fs::copy(
            dir.join("mosquitto/mosquitto.log"),
            keep.join("mosquitto.log"),
        );
        eprintln!("logs kept in {}", keep.display());
    }
}

/// A hub's API client and an enrolled simulated fleet, all online; the relays (if any) must outlive the fleet.
struct Up {
    client: flotilla_hub::client::Client,
    sim: SimFleet,
    _relays: Vec<(Helper, u16)>,
}

/// Waits for the hub in `hub_dir`, makes N enrollment tokens and starts N simulated agents, and returns once the
/// hub sees every one online.
fn bring_up(n: usize, hub_dir: &std::path::Path, mem: &dyn Fn() -> u64) -> Result<Up> {
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
    let enroll_start = Instant::now();
    // `--source-addresses K`: the sessions reach the broker through K relays whose upstream connections come
    // from 127.0.0.2 .. 127.0.0.(K+1), as from K hosts. Costs a relay hop on the same cores.
    let spread: usize = std::env::args()
        .skip_while(|a| a != "--source-addresses")
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(0);
    let relays = (0..spread)
        .map(|k| {
            let ip = std::net::Ipv4Addr::new(127, 0, 0, u8::try_from(k + 2).unwrap_or(254));
            spawn_relay(port, ip)
        })
        .collect::<Result<Vec<_>>>()?;
    let ports: Vec<u16> = if relays.is_empty() {
        vec![port]
    } else {
        relays.iter().map(|(_, p)| *p).collect()
    };
    let sim = SimFleet::start(&ports, tokens, 2)?;
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
            bail!(
                "only {online} of {n} devices online after 600 s ({} sessions connected, {} enrollments failed)",
                sim.shared.connected.load(Ordering::Relaxed),
                sim.shared.failed.load(Ordering::Relaxed)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let enrolled_in = enroll_start.elapsed();
    let rss_idle = mem();
    println!(
        "{n} simulated agents enrolled and online in {enrolled_in:.1?}; hub+broker RSS {} MiB",
        rss_idle / 1024
    );
    // What the broker sees, from the kernel's table: established sessions on its port by peer address.
    let peers = sessions_by_peer(port);
    let shown: Vec<String> = peers.iter().map(|(ip, c)| format!("{ip} x{c}")).collect();
    println!(
        "broker sessions by source address ({} addresses): {}",
        peers.len(),
        shown.join(", ")
    );
    Ok(Up {
        client,
        sim,
        _relays: relays,
    })
}

/// Signs and uploads release `app@1.0.0` (a minimal WASM module) with the hub's release key.
fn push_app_release(
    client: &flotilla_hub::client::Client,
    hub_dir: &std::path::Path,
) -> Result<()> {
    let wasm = tempfile::NamedTempFile::new()?;
    std::fs::write(wasm.path(), b"\0asm\x01\0\0\0")?;
    let sign = flotilla_hub::keys_cli::ReleaseSign {
        compatible: None,
        artifact: wasm.path().to_owned(),
        name: "app".into(),
        version: "1.0.0".into(),
        epoch: 1,
        kind: "wasm".into(),
        keys: vec![hub_dir.join("keys/release.key")],
        registry: None,
        precompile: vec![],
        out: Some(wasm.path().with_extension("release")),
    };
    let signed = flotilla_hub::keys_cli::sign_release(&sign)?.signed;
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
    Ok(())
}

fn run(n: usize, hub_dir: &std::path::Path, hub_pid: u32, broker_pid: Option<u32>) -> Result<()> {
    let mem = || proc_rss_kib(hub_pid) + broker_pid.map_or(0, proc_rss_kib);
    let Up {
        client,
        mut sim,
        _relays,
    } = bring_up(n, hub_dir, &mem)?;
    let rss_idle = mem();
    push_app_release(&client, hub_dir)?;
    let counters = sim.shared.clone();
    let (sent0, recv0) = (
        counters.sent.load(Ordering::Relaxed),
        counters.received.load(Ordering::Relaxed),
    );
    let cpu_all = || proc_cpu_secs(hub_pid) + broker_pid.map_or(0.0, proc_cpu_secs);
    let cpu0 = cpu_all();
    let spec = "name = \"app\"\n[target]\nselector = { role = \"sim\" }\n[[workloads]]\nname = \"app\"\nrelease = \"app@1.0.0\"\n";
    eprintln!("release uploaded; applying the deployment");
    if std::env::args().any(|a| a == "--api-probe") {
        // The same calls on the idle hub first: what the listing itself costs, without the apply's queue.
        let mut idle: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                client
                    .get_text("/api/v1/devices")
                    .map(|_| t.elapsed().as_secs_f64())
            })
            .collect::<Result<_>>()?;
        idle.sort_by(f64::total_cmp);
        println!(
            "idle hub, GET /api/v1/devices (all {n}): p50 {:.1} ms  max {:.1} ms",
            pct(&idle, 0.5) * 1e3,
            pct(&idle, 1.0) * 1e3
        );
    }
    // `--api-probe`: an operator's view during the apply, from another thread: one device and one page of 100
    // devices every 50 ms, the whole list every 250 ms. Latency is to the last byte of the response (what the API
    // answers in), not including the client parsing 5 MB of JSON.
    let stop_probe = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = std::env::args().any(|a| a == "--api-probe").then(|| {
        let (client, stop) = (client.clone(), stop_probe.clone());
        std::thread::spawn(move || {
            let (mut one, mut list, mut paged) = (Vec::new(), Vec::new(), Vec::new());
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("sim-{:05}", (k * 7_919) % n);
                let t = Instant::now();
                if client.get_text(&format!("/api/v1/devices/{id}")).is_ok() {
                    one.push(t.elapsed().as_secs_f64());
                }
                let t = Instant::now();
                let after = format!("sim-{:05}", (k * 104_729) % n);
                if client
                    .get_text(&format!("/api/v1/devices?limit=100&after={after}"))
                    .is_ok()
                {
                    paged.push(t.elapsed().as_secs_f64());
                }
                if k.is_multiple_of(5) {
                    let t = Instant::now();
                    if client.get_text("/api/v1/devices").is_ok() {
                        list.push(t.elapsed().as_secs_f64());
                    }
                }
                k += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (one, list, paged)
        })
    });
    let console = std::env::args()
        .any(|a| a == "--console-probe")
        .then(|| console_probe(&client, n, stop_probe.clone()))
        .transpose()?;
    sim.arm();
    let apply_at = Instant::now();
    client.post(
        "/api/v1/deployments",
        "application/toml",
        spec.as_bytes(),
        &[],
    )?;
    let mut lat = Vec::with_capacity(n);
    let mut peak_rss = 0;
    let mut seen = vec![false; n];
    while lat.len() < n {
        match sim.next_done(Duration::from_secs(30)) {
            Some((i, d)) => {
                lat.push(d.as_secs_f64());
                if let Some(s) = seen.get_mut(i) {
                    *s = true;
                }
            }
            None => {
                // Report what arrived instead of nothing: the missing devices are the finding.
                let missing: Vec<usize> = (0..n).filter(|&i| !seen[i]).collect();
                println!(
                    "MISSING: only {} of {n} devices reported running (30 s without progress); {} sessions connected, {} enrollments failed",
                    lat.len(),
                    counters.connected.load(Ordering::Relaxed),
                    counters.failed.load(Ordering::Relaxed),
                );
                for &i in missing.iter().take(5) {
                    let id = format!("sim-{i:05}");
                    let view = client.get(&format!("/api/v1/devices/{id}"));
                    println!(
                        "  {id}: applied generation {} on the device; hub view: {}",
                        counters.applied(i),
                        view.map_or_else(|e| e.to_string(), |v| v.to_string())
                    );
                }
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
    stop_probe.store(true, Ordering::Relaxed);
    if let Some(Ok((mut one, mut list, mut paged))) = probe.map(std::thread::JoinHandle::join) {
        for v in [&mut one, &mut list, &mut paged] {
            v.sort_by(f64::total_cmp);
        }
        for (what, v) in [
            ("GET /api/v1/devices/{id}", &one),
            ("GET /api/v1/devices?limit=100&after=ID", &paged),
            ("GET /api/v1/devices (all)", &list),
        ] {
            println!(
                "during the apply, {what}: n={} p50 {:.1} ms  p95 {:.1} ms  max {:.1} ms",
                v.len(),
                pct(v, 0.5) * 1e3,
                pct(v, 0.95) * 1e3,
                pct(v, 1.0) * 1e3
            );
        }
    }
    if let Some((pages, events)) = console {
        if let Ok(mut pages) = pages.join() {
            for (what, v) in &mut pages {
                v.sort_by(f64::total_cmp);
                if v.is_empty() {
                    println!("during the apply, console {what}: no answer");
                    continue;
                }
                println!(
                    "during the apply, console {what}: n={} p50 {:.1} ms  p95 {:.1} ms  max {:.1} ms",
                    v.len(),
                    pct(v, 0.5) * 1e3,
                    pct(v, 0.95) * 1e3,
                    pct(v, 1.0) * 1e3
                );
            }
        }
        if let Ok((first, gaps, count)) = events.join() {
            println!(
                "during the apply, console overview stream: first event after {:.1} ms, {count} events, longest silence {:.2} s",
                first * 1e3,
                gaps
            );
        }
    }
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

/// The sum of every sample of `name` (any labels) in a `/metrics` text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `--telemetry SECS`: telemetry ingest with each feed configuration in turn, N devices at one record a second.
fn telemetry_bench(n: usize, secs: u64) -> Result<()> {
    let configs: [(&str, &[&str]); 3] = [
        (
            "raw feed only",
            &["--no-json-feed", "--telemetry-history-secs", "0"],
        ),
        ("JSON feed + history (default)", &[]),
        ("JSON feed + history + Sparkplug B", &["--sparkplug"]),
    ];
    let mut rows = Vec::new();
    for (name, extra) in configs {
        let dir = tempfile::tempdir()?;
        let hub = HubProc::start(dir.path(), None, extra)?;
        let pid = hub.pid();
        let mem = || proc_rss_kib(pid);
        let up = bring_up(n, &hub.dir, &mem)?;
        // A deployment that declares the stream, so the feeds decode it as a number; wait until it has settled.
        push_app_release(&up.client, &hub.dir)?;
        let spec = "name = \"app\"\n[target]\nselector = { role = \"sim\" }\n[[workloads]]\nname = \"app\"\n\
                    release = \"app@1.0.0\"\ntelemetry = { count = \"u64le\" }\n";
        up.client.post(
            "/api/v1/deployments",
            "application/toml",
            spec.as_bytes(),
            &[],
        )?;
        let settle = Instant::now();
        while metric_sum(
            &up.client.get_text("/metrics")?,
            "flotilla_devices_converged",
        ) < n as f64
        {
            if settle.elapsed() > Duration::from_secs(300) {
                bail!("{name}: the deployment did not converge");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let snapshot = |c: &flotilla_hub::client::Client| -> Result<[f64; 6]> {
            let t = c.get_text("/metrics")?;
            Ok([
                metric_sum(&t, "flotilla_telemetry_records_total"),
                metric_sum(&t, "flotilla_telemetry_history_written_total"),
                metric_sum(&t, "flotilla_telemetry_dropped_total"),
                metric_sum(&t, "flotilla_telemetry_feed_dropped_total"),
                metric_sum(&t, "flotilla_telemetry_history_dropped_total"),
                metric_sum(&t, "flotilla_broker_messages_dropped_total"),
            ])
        };
        let m0 = snapshot(&up.client)?;
        let shared = up.sim.shared.clone();
        let sent0 = shared.telemetry_sent.load(Ordering::Relaxed);
        let cpu0 = proc_cpu_secs(pid);
        shared.telemetry.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        let mut peak = 0;
        while t0.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_millis(500));
            peak = peak.max(mem());
        }
        shared.telemetry.store(false, Ordering::Relaxed);
        let window = t0.elapsed().as_secs_f64();
        let cpu = proc_cpu_secs(pid) - cpu0;
        let sent = (shared.telemetry_sent.load(Ordering::Relaxed) - sent0) as f64;
        // Drain: everything sent accepted (or dropped), and the history caught up with what was accepted.
        let history_on = !extra.contains(&"--telemetry-history-secs");
        let drained_at = Instant::now();
        let m1 = loop {
            let m = snapshot(&up.client)?;
            let accepted = m[0] - m0[0];
            let settled = accepted + (m[2] - m0[2]) >= sent
                && (!history_on || m[1] - m0[1] + (m[4] - m0[4]) >= accepted);
            if settled || drained_at.elapsed() > Duration::from_secs(60) {
                break m;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let drain = drained_at.elapsed().as_secs_f64();
        let row = format!(
            "| {name} | {n} | {sent:.0} | {:.0} ({:.0}/s) | {} | {:.0} / {:.0} / {:.0} / {:.0} | {:.2} s ({:.0} % of one core) | {} MiB | {drain:.1} s |",
            m1[0] - m0[0],
            (m1[0] - m0[0]) / window,
            if history_on {
                format!("{:.0}", m1[1] - m0[1])
            } else {
                "off".to_owned()
            },
            m1[2] - m0[2],
            m1[3] - m0[3],
            m1[4] - m0[4],
            m1[5] - m0[5],
            cpu,
            cpu / window * 100.0,
            peak / 1024,
        );
        println!("{row}");
        rows.push(row);
        drop(up);
        drop(hub);
    }
    println!(
        "\n| hub configuration | devices | records sent | accepted at the hub | written to history | dropped: hub / feed / history / broker | hub CPU over {secs} s | hub RSS peak | drain after the window |\n|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
