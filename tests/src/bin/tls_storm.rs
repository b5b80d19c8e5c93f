//! `tls-storm`: what a device connection costs the hub's embedded broker, plain TCP against the device listener's
//! TLS (server certificate and an ECDSA P-256 client certificate checked against a device CA, as `flotilla serve`
//! configures it), when N devices connect at once and again when all of them reconnect after dropping their
//! connections (the reconnect storm after a broker or network blip).
//!
//! The broker runs in its own process (a re-executed copy of this binary) so that its CPU time and memory are its
//! own; the clients run here. Prints, per mode: wall time until every CONNACK, broker CPU per connection (user +
//! system from /proc), and broker RSS per connection.
//!
//! `cargo build --release -p flotilla-fleet-tests --bin tls-storm && target/release/tls-storm [N]`

use anyhow::{Context, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, TlsConfiguration, Transport};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct BrokerProc(Child);

impl Drop for BrokerProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (CPU seconds, RSS bytes) of process `pid`, from /proc.
fn usage(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = (f.get(11).context("utime")?.parse::<f64>()?
        + f.get(12).context("stime")?.parse::<f64>()?)
        / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")?;
    Ok((cpu, rss_kib * 1024))
}

/// A CA, a server certificate for localhost and one client certificate it signs, as PEM files in `dir`.
fn pki(dir: &Path) -> Result<()> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let server =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&key, &issuer)?;
    let ckey = rcgen::KeyPair::generate()?;
    let mut cp = rcgen::CertificateParams::new(Vec::<String>::new())?;
    cp.distinguished_name
        .push(rcgen::DnType::CommonName, "gw-bench");
    cp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = cp.signed_by(&ckey, &issuer)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(
        dir.join("server.pem"),
        format!("{}{}", server.pem(), ca.pem()),
    )?;
    std::fs::write(dir.join("server.key"), key.serialize_pem())?;
    std::fs::write(dir.join("client.pem"), client.pem())?;
    std::fs::write(dir.join("client.key"), ckey.serialize_pem())?;
    Ok(())
}

/// Connects `n` clients at once and returns the wall time until all are connected, with the clients kept alive.
async fn storm(
    n: usize,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(Duration, Vec<tokio::task::JoinHandle<()>>)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(n);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let mut opts = MqttOptions::new(format!("gw-{i}"), "localhost", port);
        opts.set_keep_alive(Duration::from_secs(60));
        if let Some(c) = &tls {
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                c.clone(),
            )));
        }
        let (_client, mut el) = AsyncClient::new(opts, 10);
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let _client = _client;
            let mut told = false;
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) if !told => {
                        told = true;
                        let _ = tx.send(()).await;
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }));
    }
    for _ in 0..n {
        rx.recv().await.context("a client gave up")?;
    }
    Ok((t0.elapsed(), tasks))
}

fn main() -> Result<()> {
    flotilla_fleet_tests::answer_help(
        "tls-storm: broker cost of N device connections at once, plain vs mutual TLS, and of reconnecting them all.\n\n\
         Usage: tls-storm [N]   (default 2000)",
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        let (plain, tls, dir) = (
            args.get(2).context("port")?.parse::<u16>()?,
            args.get(3).context("tls port")?.parse::<u16>()?,
            Path::new(args.get(4).context("dir")?),
        );
        let broker = flotilla_broker::start(
            format!("127.0.0.1:{plain}").parse()?,
            flotilla_hub::embedded::config(flotilla_hub::embedded::MAX_CONNECTIONS),
            Arc::new(flotilla_broker::auth::AllowAll),
        )?;
        let config = flotilla_broker::tls::server_config(
            &dir.join("server.pem"),
            &dir.join("server.key"),
            flotilla_broker::tls::ClientAuth::Optional(&dir.join("ca.pem")),
        )?;
        broker.listen_tls(format!("127.0.0.1:{tls}").parse()?, config)?;
        loop {
            std::thread::park();
        }
    }
    let n: usize = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(2000);
    let dir = tempfile::tempdir()?;
    pki(dir.path())?;
    let client_tls = Arc::new(flotilla_mqtt::tls_client_config(
        &flotilla_mqtt::TlsSettings {
            ca_file: Some(dir.path().join("ca.pem")),
            ca_sha256: None,
            client_cert: Some(dir.path().join("client.pem")),
            client_key: Some(dir.path().join("client.key")),
        },
    )?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!("devices: {n}");
    // The peer in the same run: Mosquitto with the same certificates and `require_certificate`.
    for (label, use_tls, mosquitto) in [
        ("embedded, plain", false, false),
        ("embedded, mutual TLS", true, false),
        ("mosquitto, plain", false, true),
        ("mosquitto, mutual TLS", true, true),
    ] {
        let (plain, tls) = (
            flotilla_fleet_tests::free_port(),
            flotilla_fleet_tests::free_port(),
        );
        let broker = if mosquitto {
            let d = dir.path();
            let conf = d.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "per_listener_settings true\npersistence false\nlistener {plain} 127.0.0.1\nallow_anonymous true\n\
                     listener {tls} 127.0.0.1\nallow_anonymous true\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
                     require_certificate true\nuse_identity_as_username true\n",
                    ca = d.join("ca.pem").display(),
                    cert = d.join("server.pem").display(),
                    key = d.join("server.key").display(),
                ),
            )?;
            let mut cmd = Command::new("mosquitto");
            cmd.arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            BrokerProc(
                cmd.spawn()
                    .context("mosquitto (apt-get install mosquitto)")?,
            )
        } else {
            BrokerProc(
                Command::new(std::env::current_exe()?)
                    .args(["--serve", &plain.to_string(), &tls.to_string()])
                    .arg(dir.path())
                    .stdout(Stdio::null())
                    .spawn()?,
            )
        };
        let port = if use_tls { tls } else { plain };
        flotilla_fleet_tests::wait_for("the broker", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })?;
        let pid = broker.0.id();
        let (cpu0, rss0) = usage(pid)?;
        let config = use_tls.then(|| client_tls.clone());
        let (first, tasks) = rt.block_on(storm(n, port, config.clone()))?;
        let (cpu1, rss1) = usage(pid)?;
        // The reconnect storm: every connection drops at once (no DISCONNECT) and every device comes back.
        for t in &tasks {
            t.abort();
        }
        drop(tasks);
        std::thread::sleep(Duration::from_secs(2));
        let (cpu2, _) = usage(pid)?;
        let (again, tasks) = rt.block_on(storm(n, port, config))?;
        let (cpu3, rss3) = usage(pid)?;
        println!(
            "{label:>22}: connect storm {:>7.0} ms ({:.2} ms broker CPU/device), reconnect storm {:>7.0} ms \
             ({:.2} ms broker CPU/device), broker RSS {:.1} KiB/device ({:.0} MiB total)",
            first.as_secs_f64() * 1e3,
            (cpu1 - cpu0) * 1e3 / n as f64,
            again.as_secs_f64() * 1e3,
            (cpu3 - cpu2) * 1e3 / n as f64,
            rss1.saturating_sub(rss0) as f64 / 1024.0 / n as f64,
            rss3 as f64 / 1024.0 / 1024.0,
        );
        for t in &tasks {
            t.abort();
        }
        drop(broker);
    }
    Ok(())
}
