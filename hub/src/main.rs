//! `flotilla`: the hub server and the operator CLI in one binary. Thin: everything is in `flotilla_hub::cli`.

fn main() -> std::process::ExitCode {
    flotilla_hub::cli::main()
}
