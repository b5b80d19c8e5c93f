//! `flotilla-agent-launcher --state DIR --agent BINARY [AGENT ARGS...]`: runs the agent that `DIR/agent/current`
//! names (else BINARY, the packaged one) and undoes a self-update that does not come up healthy.
//!
//! It is the service's main process; the agent is its child. When the old agent exits after writing a trial
//! record and switching `current`, the launcher starts the new agent; if that one exits, cannot start at all
//! (wrong architecture, not executable) or has not removed the trial record within its `confirm_secs`, the
//! launcher points `current` back, writes the reason to `DIR/agent/result` and starts the old agent, which reports
//! it. Nothing here depends on the new agent's code. The decisions are in `lib.rs`; this file does the I/O.

// Two libc calls need `unsafe`: the signal handler that forwards SIGTERM/SIGINT to the agent, and the parent-death
// signal that stops the agent if the launcher is killed (so no agent outlives its supervisor).
#![allow(unsafe_code)]

use flotilla_agent_launcher::{Ended, Next, Trial, on_end, on_wait, valid_dir};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn log(msg: &str) {
    eprintln!("flotilla-agent-launcher: {msg}");
}

const USAGE: &str = "usage: flotilla-agent-launcher --state DIR --agent BINARY [AGENT ARGS...]\n\
  Runs DIR/agent/current/flotilla-agent (else BINARY) with AGENT ARGS, and switches back to the previous agent\n\
  when a self-updated one exits, cannot be executed or does not confirm itself in time.";

struct Args {
    state: PathBuf,
    fallback: PathBuf,
    rest: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut state = None;
    let mut fallback = None;
    while state.is_none() || fallback.is_none() {
        match it.next().as_deref() {
            Some("--state") => state = it.next().map(PathBuf::from),
            Some("--agent") => fallback = it.next().map(PathBuf::from),
            Some("--help" | "-h") => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            None => return Err(USAGE.into()),
            Some(other) => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(Args {
        state: state.ok_or("--state DIR is required")?,
        fallback: fallback.ok_or("--agent BINARY is required")?,
        rest: it.collect(),
    })
}

/// The trial record, if any. An unreadable one is set aside (and said so): a switch is then not in progress.
fn read_trial(dir: &Path) -> Option<Trial> {
    let path = dir.join("trial");
    let text = std::fs::read_to_string(&path).ok()?;
    match Trial::parse(&text) {
        Ok(t) => Some(t),
        Err(e) => {
            log(&format!("{}: {e}; ignoring it", path.display()));
            let _ = std::fs::rename(&path, dir.join("trial.invalid"));
            None
        }
    }
}

/// The `<dir>` that `current` points at (None: no link, or one that does not name a release directory).
fn current(dir: &Path) -> Option<String> {
    let target = std::fs::read_link(dir.join("current")).ok()?;
    let name = target.file_name()?.to_str()?.to_owned();
    valid_dir(&name).then_some(name)
}

/// Writes `text` to `path` atomically (temporary file, fsync, rename).
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Points `current` at `to` (None: removes it, so the packaged binary runs).
fn set_current(dir: &Path, to: Option<&str>) -> std::io::Result<()> {
    let link = dir.join("current");
    match to {
        Some(to) => {
            let tmp = dir.join("current.tmp");
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(to, &tmp)?;
            std::fs::rename(&tmp, &link)
        }
        None => match std::fs::remove_file(&link) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// Undoes a switch: the result first (so the old agent can report it even if the rest is cut short), then the
/// link, then the trial record, then the failed release's directory.
fn roll_back(dir: &Path, t: &Trial, reason: &str) -> std::io::Result<()> {
    log(&format!(
        "rolling back agent {} ({}): {reason}",
        t.version, t.to
    ));
    let reason = reason.replace('\n', " ");
    write_atomic(
        &dir.join("result"),
        &format!(
            "status=rolled-back\nrelease={}\nversion={}\nreason={reason}\n",
            t.release, t.version
        ),
    )?;
    set_current(dir, t.from.as_deref())?;
    std::fs::remove_file(dir.join("trial"))?;
    // The failed release is never run again (the agent remembers it): its binary only takes space.
    if let Err(e) = std::fs::remove_dir_all(dir.join(&t.to)) {
        log(&format!("cannot remove {}: {e}", t.to));
    }
    Ok(())
}

fn ended(status: std::process::ExitStatus) -> Ended {
    match (status.code(), status.signal()) {
        (Some(c), _) => Ended::Code(c),
        (None, Some(s)) => Ended::Signal(s),
        (None, None) => Ended::Code(1),
    }
}

fn spawn(bin: &Path, args: &Args) -> std::io::Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.args(&args.rest)
        .env("FLOTILLA_LAUNCHER_STATE", &args.state);
    // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
}

/// What happens to a running agent: it ends by itself, is stopped by a signal to the launcher (then the launcher
/// exits with it), or is stopped for running out of time to confirm.
enum Outcome {
    Ended(Ended),
    Stopped(i32),
    OutOfTime(String),
}

fn supervise(child: &mut Child, dir: &Path, started: Option<&str>) -> Outcome {
    let t0 = Instant::now();
    let mut trial = read_trial(dir);
    let mut last_read = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Outcome::Ended(ended(status)),
            Ok(None) => {}
            Err(e) => return Outcome::Ended(Ended::NotStarted(e.to_string())),
        }
        let sig = SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, sig);
            }
            let code = child.wait().map(|s| match ended(s) {
                Ended::Code(c) => c,
                Ended::Signal(s) => 128 + s,
                Ended::NotStarted(_) => 1,
            });
            return Outcome::Stopped(code.unwrap_or(1));
        }
        if last_read.elapsed() >= Duration::from_millis(500) {
            trial = read_trial(dir);
            last_read = Instant::now();
        }
        if let Some(reason) = on_wait(trial.as_ref(), started, t0.elapsed().as_secs()) {
            let _ = child.kill();
            let _ = child.wait();
            return Outcome::OutOfTime(reason);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            log(&e);
            return ExitCode::from(64);
        }
    };
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    let dir = args.state.join("agent");
    loop {
        let started = current(&dir);
        let bin = started.as_ref().map_or_else(
            || args.fallback.clone(),
            |d| dir.join(d).join("flotilla-agent"),
        );
        let outcome = match spawn(&bin, &args) {
            Ok(mut child) => supervise(&mut child, &dir, started.as_deref()),
            Err(e) => Outcome::Ended(Ended::NotStarted(format!("{}: {e}", bin.display()))),
        };
        let trial = read_trial(&dir);
        let next = match outcome {
            Outcome::Stopped(code) => return ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Outcome::OutOfTime(reason) => Next::RollBack(reason),
            Outcome::Ended(how) => on_end(trial.as_ref(), started.as_deref(), &how),
        };
        match (next, trial) {
            (Next::Start, _) => {}
            (Next::Exit(code), _) => return ExitCode::from(u8::try_from(code).unwrap_or(1)),
            (Next::RollBack(reason), Some(t)) => {
                if let Err(e) = roll_back(&dir, &t, &reason) {
                    log(&format!("cannot roll back: {e}"));
                    return ExitCode::from(71);
                }
            }
            // Out of time, and the trial went away meanwhile: the agent confirmed at the last moment. Start it.
            (Next::RollBack(_), None) => {}
        }
    }
}
