//! `flotilla`: the hub server and the operator CLI in one binary. Thin: parses arguments, dispatches, and maps
//! errors to exit codes.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use flotilla_hub::client::Client;
use flotilla_hub::keys_cli::{self, KeysCmd, ReleaseSign, RootCmd};
use flotilla_hub::server::{self, BrokerChoice, DataDir};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Flotilla edge fleet orchestrator: hub server and operator CLI"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Args, Clone)]
struct Conn {
    /// Hub API URL.
    #[arg(long, env = "FLOTILLA_SERVER", global = true)]
    server: Option<String>,
    /// API bearer token (or FLOTILLA_TOKEN, or --token-file).
    #[arg(long, env = "FLOTILLA_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    #[arg(long, env = "FLOTILLA_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// `table` for people, `json` for scripts.
    #[arg(long, short = 'o', default_value = "table", global = true)]
    output: String,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a hub data directory: keys, trust root, database, admin token.
    Init {
        #[arg(long, default_value = "flotilla-data")]
        data_dir: PathBuf,
    },
    /// Run the hub (embedded MQTT broker unless --broker is given).
    Serve {
        #[arg(long, default_value = "flotilla-data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// Embedded broker listen address.
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt: SocketAddr,
        /// External broker instead of the embedded one: mqtt://host:port or mqtts://host:port.
        #[arg(long)]
        broker: Option<String>,
        /// CA certificate (PEM) for an mqtts:// broker.
        #[arg(long)]
        broker_ca: Option<PathBuf>,
        /// Also serve MQTT over TLS for devices on this address (embedded broker only); needs --mqtt-tls-cert and
        /// --mqtt-tls-key.
        #[arg(long, requires_all = ["mqtt_tls_cert", "mqtt_tls_key"], conflicts_with = "broker")]
        mqtt_tls: Option<SocketAddr>,
        /// Server certificate chain (PEM) for --mqtt-tls.
        #[arg(long, requires = "mqtt_tls")]
        mqtt_tls_cert: Option<PathBuf>,
        /// Server private key (PEM) for --mqtt-tls.
        #[arg(long, requires = "mqtt_tls")]
        mqtt_tls_key: Option<PathBuf>,
        /// Require device certificates that chain to this CA (PEM) on --mqtt-tls (mutual TLS).
        #[arg(long, requires = "mqtt_tls")]
        mqtt_client_ca: Option<PathBuf>,
    },
    /// Start a hub and a small fleet of real agents across three regions, deploy, and watch it converge.
    Demo(flotilla_hub::demo::DemoArgs),
    /// Key generation.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Create, co-sign and inspect trust roots.
    #[command(subcommand)]
    Root(RootCmd),
    /// Sign, push and list releases.
    #[command(subcommand)]
    Release(ReleaseCmd),
    /// Devices.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// One-time enrollment tokens.
    #[command(subcommand, name = "enroll-token")]
    EnrollToken(TokenCmd),
    /// Apply a deployment spec file (TOML).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// Deployments.
    #[command(subcommand)]
    Deploy(DeployCmd),
    /// Progressive rollouts: a deployment spec with a [rollout] section moves devices wave by wave.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// API tokens for operators and tools (admin only).
    Token {
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Explain why a device is or is not running a workload.
    Why {
        device: String,
        workload: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
enum ReleaseCmd {
    /// Sign an artifact as a release and write the signed release file (offline).
    Sign(ReleaseSign),
    /// Sign (with your release key) and upload an artifact and its release.
    Push {
        #[command(flatten)]
        sign: ReleaseSign,
        #[command(flatten)]
        conn: Conn,
    },
    Ls {
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    Ls {
        #[command(flatten)]
        conn: Conn,
    },
    Show {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    Create {
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        zone: Option<String>,
        /// key=value, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutCmd {
    /// Apply a spec whose [rollout] section says how to roll the change out.
    Start {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show waves, device states and history; --watch refreshes until the rollout finishes.
    Status {
        deployment: String,
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        conn: Conn,
    },
    Pause {
        deployment: String,
        #[command(flatten)]
        conn: Conn,
    },
    Resume {
        deployment: String,
        #[command(flatten)]
        conn: Conn,
    },
    Abort {
        deployment: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Approve the next wave (plans with manual_approval = true).
    Approve {
        deployment: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
enum DeployCmd {
    Ls {
        #[command(flatten)]
        conn: Conn,
    },
    Status {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    Rm {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

impl Conn {
    fn client(&self) -> Result<Client> {
        let server = self
            .server
            .clone()
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => {
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
            }
            (None, None) => std::fs::read_to_string("flotilla-data/admin.token")
                .context("no token: pass --token, FLOTILLA_TOKEN or --token-file")?,
        };
        Ok(Client::new(&server, &token))
    }
    fn json(&self) -> bool {
        self.output == "json"
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init { data_dir } => {
            server::init(&DataDir(data_dir))?;
        }
        Cmd::Serve {
            data_dir,
            http,
            mqtt,
            broker,
            broker_ca,
            mqtt_tls,
            mqtt_tls_cert,
            mqtt_tls_key,
            mqtt_client_ca,
        } => {
            let choice = match broker {
                Some(url) => {
                    let (tls, rest) =
                        match (url.strip_prefix("mqtts://"), url.strip_prefix("mqtt://")) {
                            (Some(rest), _) => (true, rest),
                            (None, Some(rest)) => (false, rest),
                            _ => anyhow::bail!(
                                "--broker must be mqtt://host:port or mqtts://host:port"
                            ),
                        };
                    let (host, port) = rest.rsplit_once(':').context("--broker needs a port")?;
                    let tls = match (tls, broker_ca) {
                        (true, Some(ca_file)) => Some(flotilla_mqtt::TlsSettings {
                            ca_file,
                            client_cert: None,
                            client_key: None,
                        }),
                        (true, None) => anyhow::bail!("mqtts:// needs --broker-ca"),
                        (false, _) => None,
                    };
                    BrokerChoice::External {
                        host: host.into(),
                        port: port.parse().context("--broker port")?,
                        tls,
                    }
                }
                None => BrokerChoice::Embedded {
                    listen: mqtt,
                    tls: match (mqtt_tls, mqtt_tls_cert, mqtt_tls_key) {
                        (Some(listen), Some(cert), Some(key)) => Some(server::EmbeddedTls {
                            listen,
                            cert,
                            key,
                            client_ca: mqtt_client_ca,
                        }),
                        // clap's `requires` rules make any other combination unreachable.
                        _ => None,
                    },
                },
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(server::serve(DataDir(data_dir), http, choice))?;
        }
        Cmd::Demo(args) => flotilla_hub::demo::run(args)?,
        Cmd::Keys(c) => keys_cli::run_keys(c)?,
        Cmd::Root(c) => keys_cli::run_root(c)?,
        Cmd::Release(ReleaseCmd::Sign(a)) => keys_cli::run_release_sign(a)?,
        Cmd::Release(ReleaseCmd::Push { sign, conn }) => {
            let c = conn.client()?;
            let (signed, release) = keys_cli::sign_release(&sign)?;
            let bytes = std::fs::read(&sign.artifact)?;
            eprintln!(
                "uploading {} ({} bytes)...",
                sign.artifact.display(),
                bytes.len()
            );
            c.upload("/api/v1/artifacts", bytes)?;
            let body = postcard::to_stdvec(&signed)?;
            let v = c.post("/api/v1/releases", "application/octet-stream", &body, &[])?;
            if conn.json() {
                print_json(&v);
            } else {
                println!(
                    "pushed {}@{} release {}",
                    release.name,
                    release.version,
                    s(&v, "digest")
                );
            }
        }
        Cmd::Release(ReleaseCmd::Ls { conn }) => {
            let v = conn.client()?.get("/api/v1/releases")?;
            if conn.json() {
                print_json(&v);
            } else {
                println!(
                    "{:<20} {:<12} {:>5} {:>10}  DIGEST",
                    "NAME", "VERSION", "EPOCH", "SIZE"
                );
                for r in v.as_array().into_iter().flatten() {
                    let d = s(r, "digest");
                    println!(
                        "{:<20} {:<12} {:>5} {:>10}  {}",
                        s(r, "name"),
                        s(r, "version"),
                        s(r, "epoch"),
                        s(r, "size"),
                        &d[..d.len().min(16)]
                    );
                }
            }
        }
        Cmd::Device(DeviceCmd::Ls { conn }) => {
            let v = conn.client()?.get("/api/v1/devices")?;
            if conn.json() {
                print_json(&v);
            } else {
                println!(
                    "{:<16} {:<8} {:<12} {:<8} {:>5}/{:<5} WORKLOADS",
                    "DEVICE", "ONLINE", "REGION", "ZONE", "APPL", "WANT"
                );
                for d in v.as_array().into_iter().flatten() {
                    let ws: Vec<String> = d["workloads"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|w| format!("{}@{}:{}", s(w, "name"), s(w, "version"), s(w, "state")))
                        .collect();
                    println!(
                        "{:<16} {:<8} {:<12} {:<8} {:>5}/{:<5} {}",
                        s(d, "id"),
                        s(d, "online"),
                        s(d, "region"),
                        s(d, "zone"),
                        s(d, "applied_generation"),
                        s(d, "desired_generation"),
                        ws.join(" ")
                    );
                }
            }
        }
        Cmd::Device(DeviceCmd::Show { id, conn }) => {
            print_json(&conn.client()?.get(&format!("/api/v1/devices/{id}"))?)
        }
        Cmd::EnrollToken(TokenCmd::Create {
            region,
            zone,
            labels,
            ttl_secs,
            conn,
        }) => {
            let mut l = serde_json::Map::new();
            for kv in labels {
                let (k, v) = kv.split_once('=').context("--label must be key=value")?;
                l.insert(k.into(), Value::from(v));
            }
            let body = serde_json::json!({"region": region, "zone": zone, "labels": l, "ttl_secs": ttl_secs});
            let v = conn.client()?.post(
                "/api/v1/enrollment-tokens",
                "application/json",
                body.to_string().as_bytes(),
                &[],
            )?;
            if conn.json() {
                print_json(&v);
            } else {
                println!("{}", s(&v, "token"));
            }
        }
        Cmd::Apply { file, conn } => {
            let text =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let name = file.display().to_string();
            let v = conn.client()?.post(
                "/api/v1/deployments",
                "application/toml",
                &text,
                &[("x-flotilla-spec-file", &name)],
            )?;
            if conn.json() {
                print_json(&v);
            } else {
                println!(
                    "applied deployment {} (revision {})",
                    s(&v, "deployment"),
                    s(&v, "revision")
                );
            }
        }
        Cmd::Deploy(DeployCmd::Ls { conn }) => {
            let v = conn.client()?.get("/api/v1/deployments")?;
            if conn.json() {
                print_json(&v);
            } else {
                println!(
                    "{:<20} {:>7} {:>7}  WORKLOADS",
                    "DEPLOYMENT", "PLACED", "RUNNING"
                );
                for d in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<20} {:>7} {:>7}  {}",
                        s(d, "name"),
                        s(d, "placed"),
                        s(d, "running"),
                        d["workloads"]
                    );
                }
            }
        }
        Cmd::Deploy(DeployCmd::Status { name, conn }) => {
            let v = conn.client()?.get(&format!("/api/v1/deployments/{name}"))?;
            if conn.json() {
                print_json(&v);
            } else {
                println!(
                    "deployment {}: {} of {} placed devices running",
                    name,
                    s(&v, "running"),
                    s(&v, "placed")
                );
                for d in v["devices"].as_array().into_iter().flatten() {
                    let st: Vec<String> = d["workloads"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|w| format!("{}:{}", s(w, "workload"), s(w, "state")))
                        .collect();
                    println!(
                        "  {:<16} online={:<5} {}",
                        s(d, "device"),
                        s(d, "online"),
                        st.join(" ")
                    );
                }
            }
        }
        Cmd::Deploy(DeployCmd::Rm { name, conn }) => {
            conn.client()?
                .delete(&format!("/api/v1/deployments/{name}"))?;
            println!("deleted deployment {name}");
        }
        Cmd::Rollout(cmd) => run_rollout(cmd)?,
        Cmd::Token { name, role, conn } => {
            let body = serde_json::json!({"name": name, "role": role});
            let v = conn.client()?.post(
                "/api/v1/tokens",
                "application/json",
                body.to_string().as_bytes(),
                &[],
            )?;
            println!("{}", s(&v, "token"));
        }
        Cmd::Why {
            device,
            workload,
            conn,
        } => {
            let v = conn
                .client()?
                .get(&format!("/api/v1/why/{device}/{workload}"))?;
            if conn.json() {
                print_json(&v);
            } else {
                println!("{device} / {workload}: {}", s(&v, "explanation"));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn print_rollout(v: &Value) {
    println!(
        "rollout of {}: {}{}",
        s(v, "deployment"),
        s(v, "phase"),
        if v["paused"] == true { " (paused)" } else { "" }
    );
    for w in v["waves"].as_array().into_iter().flatten() {
        let devs: Vec<String> = w["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                format!(
                    "{}={}",
                    s(d, "device"),
                    s(d, "status").split([' ', '{']).next().unwrap_or("?")
                )
            })
            .collect();
        println!("  wave {}: {}", s(w, "wave"), devs.join(" "));
    }
    if let Some(last) = v["history"].as_array().and_then(|h| h.last()) {
        println!("  last event: {}", s(last, "event"));
    }
}

fn run_rollout(cmd: RolloutCmd) -> Result<()> {
    match cmd {
        RolloutCmd::Start { file, conn } => {
            let text =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            if !String::from_utf8_lossy(&text).contains("[rollout]") {
                anyhow::bail!(
                    "{}: a rollout needs a [rollout] section (use `flotilla apply` for an immediate change)",
                    file.display()
                );
            }
            let name = file.display().to_string();
            let v = conn.client()?.post(
                "/api/v1/deployments",
                "application/toml",
                &text,
                &[("x-flotilla-spec-file", &name)],
            )?;
            println!(
                "rollout of {} started (revision {}); follow it with `flotilla rollout status {} --watch`",
                s(&v, "deployment"),
                s(&v, "revision"),
                s(&v, "deployment")
            );
        }
        RolloutCmd::Status {
            deployment,
            watch,
            conn,
        } => {
            let c = conn.client()?;
            loop {
                let v = c.get(&format!("/api/v1/rollouts/{deployment}"))?;
                if conn.json() {
                    print_json(&v);
                } else {
                    print_rollout(&v);
                }
                if !watch || v["finished"] == true {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
                println!();
            }
        }
        RolloutCmd::Pause { deployment, conn } => rollout_action(&conn, &deployment, "pause")?,
        RolloutCmd::Resume { deployment, conn } => rollout_action(&conn, &deployment, "resume")?,
        RolloutCmd::Abort { deployment, conn } => rollout_action(&conn, &deployment, "abort")?,
        RolloutCmd::Approve { deployment, conn } => rollout_action(&conn, &deployment, "approve")?,
    }
    Ok(())
}

fn rollout_action(conn: &Conn, deployment: &str, action: &str) -> Result<()> {
    conn.client()?.post(
        &format!("/api/v1/rollouts/{deployment}/{action}"),
        "application/json",
        b"{}",
        &[],
    )?;
    println!("rollout of {deployment}: {action} accepted");
    Ok(())
}
