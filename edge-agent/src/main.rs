//! `flotilla-agent`: parses flags, loads the config, enrolls if needed, restores state and runs the main loop.
//! Exit codes: 0 clean stop, 78 bad configuration (do not restart), 75 transient failure (restart later).
// The linker's warnings are shown: a stale symbol ordering file (build.rs) shows as symbols it cannot find, which
// scripts/test-targets.sh counts.
#![warn(linker_messages)]

mod libm_shim;

use clap::Parser;
use flotilla_agent::agent::{self, Agent, EnrollError};
use flotilla_agent::config::{Config, Overrides};
use flotilla_agent::runtime::wasm::WasmRuntime;
use flotilla_agent::store::Store;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

const EXIT_CONFIG: u8 = 78;
const EXIT_TEMPFAIL: u8 = 75;

#[derive(Debug, Parser)]
#[command(name = "flotilla-agent", version, about = "Flotilla edge agent")]
struct Cli {
    #[arg(
        long,
        env = "FLOTILLA_AGENT_CONFIG",
        default_value = "/etc/flotilla/agent.toml"
    )]
    config: PathBuf,
    #[arg(long, env = "FLOTILLA_BROKER")]
    broker: Option<String>,
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, env = "FLOTILLA_DEVICE_ID")]
    device_id: Option<String>,
    #[arg(long, env = "FLOTILLA_ENROLL_TOKEN")]
    enroll_token: Option<String>,
    #[arg(long, env = "FLOTILLA_REGION")]
    region: Option<String>,
    /// `json` (one object per line, for journald) or `text`.
    #[arg(long, env = "FLOTILLA_LOG_FORMAT", default_value = "json")]
    log_format: String,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Firmware through the `[firmware]` A/B backend of agent.toml, by hand (the same steps the agent takes).
    #[command(subcommand)]
    Firmware(FirmwareCmd),
}

#[derive(Debug, clap::Subcommand)]
enum FirmwareCmd {
    /// The booted slot, the boot variables and any update in flight.
    Status,
    /// Writes IMAGE to the slot that is not running, reads it back, activates it; `--reboot` then reboots.
    Install {
        image: PathBuf,
        #[arg(long)]
        sha256: String,
        #[arg(long)]
        version: String,
        #[arg(long)]
        reboot: bool,
    },
    /// After a boot: what the update in flight became (confirm it, rolled back, abandoned).
    AfterBoot,
    /// The booted system is healthy: keep booting it.
    MarkGood,
    /// The booted system is not: never boot it again.
    MarkBad,
}

/// `flotilla-agent firmware ...`: exit 0 on success, 1 with the typed reason, 78 without a `[firmware]` section.
fn firmware(cli: &Cli, cmd: &FirmwareCmd) -> ExitCode {
    let overrides = Overrides {
        data_dir: cli.data_dir.clone(),
        ..Overrides::default()
    };
    let cfg = match Config::load(&cli.config, &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(fw) = cfg.firmware.clone() else {
        eprintln!("{}: no [firmware] section", cli.config.display());
        return ExitCode::from(EXIT_CONFIG);
    };
    let b = flotilla_agent::firmware::backend(fw, &cfg.data_dir);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let r: Result<String, flotilla_agent::firmware::FirmwareError> = match cmd {
        FirmwareCmd::Status => b.status(),
        FirmwareCmd::Install {
            image,
            sha256,
            version,
            reboot,
        } => b.install(image, sha256, version).and_then(|(from, to)| {
            if *reboot {
                b.records().reboot(now)?;
            }
            Ok(format!(
                "installed {version} into slot {to} (running {from}); boots next"
            ))
        }),
        FirmwareCmd::AfterBoot => b.after_boot(now).map(|o| match o {
            None => "nothing pending".into(),
            Some((p, outcome)) => format!("{} -> {}: {outcome:?}", p.from, p.to),
        }),
        FirmwareCmd::MarkGood => b.mark_good().map(|s| format!("slot {s} marked good")),
        FirmwareCmd::MarkBad => b.mark_bad().map(|s| format!("slot {s} marked bad")),
    };
    match r {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Config(String),
    Transient(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Firmware(cmd)) = &cli.command {
        return firmware(&cli, cmd);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: logs that go to journald or a file must not carry ANSI codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cli.log_format == "text" {
        builder.init();
    } else {
        builder.json().init();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::from(EXIT_TEMPFAIL);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(m)) => {
            tracing::error!(error = %m, "bad configuration");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Transient(m)) => {
            tracing::error!(error = %m, "transient failure");
            ExitCode::from(EXIT_TEMPFAIL)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => std::future::pending().await,
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let overrides = Overrides {
        broker: cli.broker,
        data_dir: cli.data_dir,
        device_id: cli.device_id,
        enroll_token: cli.enroll_token,
        region: cli.region,
    };
    let cfg = Config::load(&cli.config, &overrides).map_err(|e| Failure::Config(e.to_string()))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut store = Store::open(&cfg.data_dir).map_err(|e| Failure::Transient(e.to_string()))?;
    if let Some(q) = &store.quarantined {
        tracing::error!(path = %q.display(), "database failed its integrity check; quarantined, re-bootstrapping");
    }
    if store
        .identity()
        .map_err(|e| Failure::Transient(e.to_string()))?
        .is_none()
    {
        agent::enroll(&cfg, &mut store).await.map_err(|e| match e {
            EnrollError::NoToken | EnrollError::Refused(_) | EnrollError::Config(_) => {
                Failure::Config(e.to_string())
            }
            EnrollError::Transient(_) => Failure::Transient(e.to_string()),
        })?;
    }
    let wasm = WasmRuntime::new(&cfg.data_dir.join("modules"))
        .map_err(|e| Failure::Transient(e.to_string()))?;
    let (firmware_cfg, data_dir) = (cfg.firmware.clone(), cfg.data_dir.clone());
    let mut agent =
        Agent::new(cfg, store, Arc::new(wasm)).map_err(|e| Failure::Transient(format!("{e:#}")))?;
    if agent.config().container.enabled {
        let rt = flotilla_agent::runtime::container::ContainerRuntime::new(
            agent.config().container.clone(),
            agent.device().as_str(),
            &agent.config().data_dir,
        )
        .map_err(|e| Failure::Transient(format!("container runtime: {e}")))?;
        agent.with_containers(rt);
    }
    tracing::info!(device = %agent.device(), version = env!("CARGO_PKG_VERSION"), "agent starting");
    agent.set_notifier(flotilla_agent::notify::Notifier::from_env());
    // Workloads come back from SQLite before any network is attempted.
    agent
        .restore()
        .map_err(|e| Failure::Transient(format!("{e:#}")))?;
    agent
        .connect()
        .map_err(|e| Failure::Config(format!("{e:#}")))?;
    let exit = agent
        .run(shutdown_signal())
        .await
        .map_err(|e| Failure::Transient(format!("{e:#}")))?;
    match exit {
        // The workloads are stopped and the hub told: now the reboot into the new slot.
        Some(flotilla_agent::system::Exit::Reboot) => {
            if let Some(backend) =
                firmware_cfg.map(|f| flotilla_agent::firmware::backend(f, &data_dir))
            {
                let now = flotilla_agent::agent::unix_now();
                if let Err(e) = backend.records().reboot(now) {
                    tracing::error!(error = %e, "the reboot into the new firmware failed");
                    return Err(Failure::Transient(e.to_string()));
                }
                tracing::info!("rebooting into the new firmware");
            }
            Ok(())
        }
        // `current` names the new agent: the launcher starts it once this process is gone.
        Some(flotilla_agent::system::Exit::SwitchAgent) | None => Ok(()),
    }
}
