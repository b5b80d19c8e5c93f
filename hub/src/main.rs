//! `flotilla`: the hub server and the operator CLI in one binary. Thin: parses arguments and maps errors to exit codes.

use clap::{Parser, Subcommand};
use flotilla_hub::keys_cli::{self, KeysCmd, ReleaseSign, RootCmd};
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

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Key generation.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Create, co-sign and inspect trust roots.
    #[command(subcommand)]
    Root(RootCmd),
    /// Sign releases (offline, with release keys).
    #[command(subcommand)]
    Release(ReleaseCmd),
}

#[derive(Debug, Subcommand)]
enum ReleaseCmd {
    /// Sign an artifact as a release and write the signed release file.
    Sign(ReleaseSign),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Keys(c) => keys_cli::run_keys(c),
        Cmd::Root(c) => keys_cli::run_root(c),
        Cmd::Release(ReleaseCmd::Sign(a)) => keys_cli::run_release_sign(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
