//! The `flotilla` command line: the argument surface (clap), dispatch to one module per command group, output
//! helpers that end quietly when the reader of stdout goes away, and logging set-up.
//!
//! `serve` runs the hub; `demo` a whole fleet; `keys`, `root` and `release sign` are the offline key tool; every
//! other command talks to a running hub over its API, prints a table by default and JSON with `-o json`.

/// `println!` for command output: a closed stdout (`flotilla device ls | head -3`) ends the process quietly with
/// the status a shell gives a command killed by SIGPIPE (141), instead of a panic and a backtrace.
macro_rules! outln {
    () => { $crate::cli::out_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::cli::out_line(format_args!($($arg)*)) };
}

mod deploy;
mod devices;
mod releases;
mod rollout;
mod serve;
mod telemetry;

use crate::client::Client;
use crate::keys_cli::{self, KeysCmd, ReleaseSign, RootCmd};
use crate::server::{self, DataDir};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status of a command whose output pipe was closed (128 + SIGPIPE), as shells report it.
pub const EXIT_BROKEN_PIPE: u8 = 141;

/// Writes one line of command output; see [`outln!`].
pub fn out_line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::exit(i32::from(EXIT_BROKEN_PIPE))
        }
        Err(e) => {
            eprintln!("error: writing to stdout: {e}");
            std::process::exit(1)
        }
    }
}

pub(crate) fn print_json(v: &Value) {
    outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A JSON field as table text: strings bare, missing or null as `-`.
pub(crate) fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

/// Logs go to stderr (or a file, for the demo); colour only when the destination is a terminal.
pub fn init_logging(to_file: Option<std::fs::File>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match to_file {
        Some(file) => builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .init(),
        None => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
}

/// The `flotilla` binary's `main`: parse, run, map errors to exit codes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.cmd {
        // The demo's table owns the terminal: its hub logs go to a file under the demo directory.
        Cmd::Demo(args) => match crate::demo::prepare(args) {
            Ok(log) => init_logging(Some(log)),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(1);
            }
        },
        _ => init_logging(None),
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Flotilla edge fleet orchestrator: hub server and operator CLI"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Args, Clone)]
pub struct Conn {
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
        /// Names devices reach the broker by, for its TLS certificate (repeatable; localhost, the loopback
        /// addresses and this machine's hostname are always included).
        #[arg(long = "broker-host")]
        broker_hosts: Vec<String>,
    },
    /// Run the hub (embedded MQTT broker unless --broker is given).
    Serve(serve::ServeArgs),
    /// Start a hub and a small fleet of real agents across three regions, deploy, and watch it converge.
    Demo(crate::demo::DemoArgs),
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
    /// MQTT credentials for telemetry consumers (Grafana, Node-RED, mosquitto_sub).
    #[command(subcommand, name = "feed-credential")]
    FeedCredential(FeedCmd),
    /// One-time enrollment tokens.
    #[command(subcommand, name = "enroll-token")]
    EnrollToken(TokenCmd),
    /// Workload secrets of a deployment (write-only: values are never shown again).
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Configuration for an external broker that enforces the hub's identity model.
    #[command(subcommand, name = "broker-config")]
    BrokerConfig(BrokerConfigCmd),
    /// Apply a deployment spec file (TOML).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Apply even if the change removes a workload from every device it runs on, or targets a region or zone
        /// no device or enrollment token knows yet.
        #[arg(long)]
        force: bool,
        /// Show what the apply would change, device by device (and the waves of a rollout), and change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Deployments.
    #[command(subcommand)]
    Deploy(DeployCmd),
    /// Progressive rollouts: a deployment spec with a [rollout] section moves devices wave by wave.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// API tokens for operators and tools (admin only): `--name N --role R [--ttl-secs S]` makes one and prints
    /// it (the only time it is shown); `ls` lists them; `revoke NAME` ends one at once.
    #[command(args_conflicts_with_subcommands = true)]
    Token {
        #[command(subcommand)]
        cmd: Option<ApiTokenCmd>,
        #[arg(long)]
        name: Option<String>,
        /// viewer, operator or admin.
        #[arg(long)]
        role: Option<String>,
        /// Lifetime in seconds; without it the token works until revoked.
        #[arg(long)]
        ttl_secs: Option<u64>,
        /// Limit the token to these regions (comma-separated): it sees and acts only on their devices and on
        /// rollouts that stay within them. Not for admin tokens.
        #[arg(long, value_delimiter = ',')]
        regions: Vec<String>,
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
    /// Telemetry history and live records.
    #[command(subcommand)]
    Telemetry(TelemetryCmd),
    /// The last output lines of a workload (WASM or container), asked of the device (it must be online).
    Logs {
        device: String,
        workload: String,
        /// How many lines (1-10000).
        #[arg(long, default_value_t = 100)]
        lines: u32,
        /// Keep asking every 2 s and print new lines as they come (Ctrl-C to stop).
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
enum TelemetryCmd {
    /// A device stream's history, oldest first (`--step` summarises a metric stream per bucket instead).
    Query {
        device: String,
        stream: String,
        /// From: 30s, 15m, 2h, 7d ago, or Unix seconds (device time).
        #[arg(long)]
        since: Option<String>,
        /// Until (exclusive), in the same forms.
        #[arg(long)]
        until: Option<String>,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Downsample a metric stream into buckets of this many seconds (min, mean, max per metric).
        #[arg(long)]
        step: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Records as the hub accepts them, until interrupted (`-o json`: one JSON record per line).
    Tail {
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        stream: Option<String>,
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
    /// Revoke a device: disconnect it now, refuse its credential, clear its retained state, stop placing on it.
    Revoke {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Rotate a device's credentials: it makes a new key and gets a new client certificate and MQTT password;
    /// the old ones are refused once it has connected with the new ones.
    RotateCredentials {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
enum FeedCmd {
    /// A read-only MQTT credential for the telemetry of some regions (printed once).
    Create {
        #[arg(long)]
        name: String,
        /// Comma-separated regions the credential may read.
        #[arg(long, value_delimiter = ',', required = true)]
        regions: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
enum SecretCmd {
    /// Set a secret for every workload of a deployment (a new version: they restart with it). The value is read
    /// from --file, or from standard input; it is sealed to each device and never returned.
    Set {
        name: String,
        #[arg(long)]
        deployment: String,
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List a deployment's secrets (names and versions).
    Ls {
        #[arg(long)]
        deployment: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
enum BrokerConfigCmd {
    /// Write a Mosquitto configuration (listeners, TLS, ACL, password files, revocation list) for this hub's data
    /// directory; run the hub with `serve --broker mqtt://127.0.0.1:LOCAL_PORT --mosquitto-dir DIR` to keep it
    /// current.
    Mosquitto {
        #[arg(long, default_value = "flotilla-data")]
        data_dir: PathBuf,
        /// Directory to write into (created).
        #[arg(long)]
        out: PathBuf,
        /// Address the device listeners bind to.
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        /// Devices with client certificates (mutual TLS).
        #[arg(long, default_value_t = 8883)]
        cert_port: u16,
        /// Devices with passwords (TLS).
        #[arg(long, default_value_t = 8884)]
        password_port: u16,
        /// Enrollment and telemetry consumers (TLS).
        #[arg(long, default_value_t = 8885)]
        clients_port: u16,
        /// The hub and local tools (loopback, plain).
        #[arg(long, default_value_t = 1883)]
        local_port: u16,
        /// Refuse anonymous enrollment connections.
        #[arg(long)]
        no_anonymous_enrollment: bool,
        /// The user Mosquitto runs as (its `user` option); it must be able to read the generated files.
        #[arg(long)]
        user: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ApiTokenCmd {
    /// Every API token: name, role, created, expiry (secrets are never stored, so never shown).
    Ls {
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke the token named NAME: it stops working at once.
    Revoke {
        name: String,
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
pub enum RolloutCmd {
    /// Apply a spec whose [rollout] section says how to roll the change out.
    Start {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// As for `flotilla apply --force`.
        #[arg(long)]
        force: bool,
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
    /// Per wave: start, end, devices healthy / failed (with reasons) / undetermined / held; gate evaluations;
    /// who paused, approved or aborted; total time.
    Report {
        deployment: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Give a device (or every device) where the rollout's release failed another chance: later rollouts leave
    /// such devices out until this is said.
    Retry {
        deployment: String,
        #[arg(long)]
        device: Option<String>,
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
    /// What changed between two revisions of a deployment: in meaning, then as a unified diff of the spec.
    Diff {
        name: String,
        /// The older revision (default: the one before --to).
        #[arg(long)]
        from: Option<u64>,
        /// The newer revision (default: the current one).
        #[arg(long)]
        to: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
}

impl Conn {
    pub fn client(&self) -> Result<Client> {
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
    pub fn json(&self) -> bool {
        self.output == "json"
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init {
            data_dir,
            broker_hosts,
        } => {
            server::init_with(&DataDir(data_dir), &broker_hosts)?;
        }
        Cmd::Serve(args) => serve::run(args)?,
        Cmd::Secret(SecretCmd::Set {
            name,
            deployment,
            file,
            conn,
        }) => deploy::set_secret(&name, &deployment, file.as_deref(), conn)?,
        Cmd::Secret(SecretCmd::Ls { deployment, conn }) => deploy::list_secrets(&deployment, conn)?,
        Cmd::BrokerConfig(BrokerConfigCmd::Mosquitto {
            data_dir,
            out,
            bind,
            cert_port,
            password_port,
            clients_port,
            local_port,
            no_anonymous_enrollment,
            user,
        }) => {
            let layout = crate::mosquitto::Layout {
                bind,
                cert_port,
                password_port,
                clients_port,
                anonymous_enrollment: !no_anonymous_enrollment,
                local_port,
                user,
            };
            let files = crate::mosquitto::write_config(&DataDir(data_dir.clone()), &out, &layout)?;
            outln!("wrote {}", files.conf().display());
            outln!("  start it:  mosquitto -c {}", files.conf().display());
            outln!(
                "  then:      flotilla serve --data-dir {} --broker mqtt://127.0.0.1:{local_port} --mosquitto-dir {}",
                data_dir.display(),
                files.dir.display()
            );
            outln!(
                "  devices:   broker = \"mqtts://HOST:{cert_port}\" (certificates) or :{password_port} (passwords), \
                 enroll_broker = \"mqtts://HOST:{clients_port}\""
            );
        }
        Cmd::Demo(args) => crate::demo::run(args)?,
        Cmd::Keys(c) => keys_cli::run_keys(c)?,
        Cmd::Root(c) => keys_cli::run_root(c)?,
        Cmd::Release(ReleaseCmd::Sign(a)) => keys_cli::run_release_sign(a)?,
        Cmd::Release(ReleaseCmd::Push { sign, conn }) => releases::push(sign, conn)?,
        Cmd::Release(ReleaseCmd::Ls { conn }) => releases::ls(conn)?,
        Cmd::Device(DeviceCmd::Ls { conn }) => devices::ls(conn)?,
        Cmd::Device(DeviceCmd::Show { id, conn }) => devices::show(&id, conn)?,
        Cmd::Device(DeviceCmd::Revoke { id, conn }) => devices::revoke(&id, conn)?,
        Cmd::Device(DeviceCmd::RotateCredentials { id, conn }) => {
            devices::rotate_credentials(&id, conn)?
        }
        Cmd::FeedCredential(FeedCmd::Create {
            name,
            regions,
            conn,
        }) => devices::feed_credential(&name, &regions, conn)?,
        Cmd::EnrollToken(TokenCmd::Create {
            region,
            zone,
            labels,
            ttl_secs,
            conn,
        }) => devices::enroll_token(region, zone, labels, ttl_secs, conn)?,
        Cmd::Apply {
            file,
            force,
            dry_run,
            conn,
        } => {
            if dry_run {
                deploy::dry_run(&file, force, conn)?
            } else {
                deploy::apply(&file, force, conn)?
            }
        }
        Cmd::Deploy(DeployCmd::Ls { conn }) => deploy::ls(conn)?,
        Cmd::Deploy(DeployCmd::Status { name, conn }) => deploy::status(&name, conn)?,
        Cmd::Deploy(DeployCmd::Rm { name, conn }) => deploy::rm(&name, conn)?,
        Cmd::Deploy(DeployCmd::Diff {
            name,
            from,
            to,
            conn,
        }) => deploy::diff(&name, from, to, conn)?,
        Cmd::Rollout(cmd) => rollout::run(cmd)?,
        Cmd::Token {
            cmd: Some(ApiTokenCmd::Ls { conn }),
            ..
        } => devices::api_tokens(conn)?,
        Cmd::Token {
            cmd: Some(ApiTokenCmd::Revoke { name, conn }),
            ..
        } => devices::revoke_api_token(&name, conn)?,
        Cmd::Token {
            cmd: None,
            name,
            role,
            ttl_secs,
            regions,
            conn,
        } => {
            let (Some(name), Some(role)) = (name, role) else {
                anyhow::bail!(
                    "flotilla token needs --name and --role (or: flotilla token ls | revoke NAME)"
                );
            };
            devices::api_token(name, role, ttl_secs, regions, conn)?
        }
        Cmd::Why {
            device,
            workload,
            conn,
        } => devices::why(&device, &workload, conn)?,
        Cmd::Telemetry(TelemetryCmd::Query {
            device,
            stream,
            since,
            until,
            limit,
            step,
            conn,
        }) => telemetry::query(
            telemetry::QueryArgs {
                device,
                stream,
                since,
                until,
                limit,
                step,
            },
            &conn,
        )?,
        Cmd::Telemetry(TelemetryCmd::Tail {
            region,
            device,
            stream,
            conn,
        }) => telemetry::tail(
            region.as_deref(),
            device.as_deref(),
            stream.as_deref(),
            &conn,
        )?,
        Cmd::Logs {
            device,
            workload,
            lines,
            follow,
            conn,
        } => devices::logs(&device, &workload, lines, follow, conn)?,
    }
    Ok(())
}
