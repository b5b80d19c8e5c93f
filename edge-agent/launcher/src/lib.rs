//! The launcher's decisions, sans-IO: the trial record's format, and what to do when the agent exits or a new
//! agent's time to confirm itself runs out. `main.rs` does the process and file work.
//!
//! Files, in `<state>/agent/` (the agent writes all but `result` on rollback):
//! - `<dir>/flotilla-agent`, `<dir>/release`: an installed agent release (`dir` is `<version>-<digest prefix>`);
//! - `current`: a symlink to the `<dir>` the launcher starts (absent: the packaged binary);
//! - `trial`: a switch in progress ([`Trial`]); the new agent removes it once healthy (confirmed);
//! - `result`: what the last switch became (`status=confirmed` or `status=rolled-back` with `reason=`), read and
//!   removed by the next agent, which reports it.

use std::fmt::Write as _;

/// A switch to a new agent release, written by the old agent before it exits for the switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trial {
    /// The release's digest (hex) and version, for the report.
    pub release: String,
    pub version: String,
    /// The `<dir>` `current` pointed at before the switch (None: the packaged binary).
    pub from: Option<String>,
    /// The `<dir>` switched to.
    pub to: String,
    /// How long the new agent has to remove the trial record.
    pub confirm_secs: u64,
}

impl Trial {
    /// `key=value` lines.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "release={}", self.release);
        let _ = writeln!(s, "version={}", self.version);
        if let Some(f) = &self.from {
            let _ = writeln!(s, "from={f}");
        }
        let _ = writeln!(s, "to={}", self.to);
        let _ = writeln!(s, "confirm_secs={}", self.confirm_secs);
        s
    }

    /// Parses [`Trial::render`]'s output; names what is missing or wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
                .map(str::to_owned)
        };
        let need = |k: &str| get(k).ok_or_else(|| format!("the trial record has no {k}"));
        let to = need("to")?;
        if !valid_dir(&to) || get("from").is_some_and(|f| !valid_dir(&f)) {
            return Err("the trial record names a directory outside the agent's".into());
        }
        Ok(Self {
            release: need("release")?,
            version: need("version")?,
            from: get("from"),
            to,
            confirm_secs: need("confirm_secs")?
                .parse()
                .map_err(|_| "the trial record's confirm_secs is not a number".to_owned())?,
        })
    }
}

/// A release directory name: one path component of `[A-Za-z0-9._+-]`, not `.` or `..`.
pub fn valid_dir(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

/// How the agent process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Code(i32),
    Signal(i32),
    /// It could not be started at all (missing, not executable, wrong architecture).
    NotStarted(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exited with code {c}"),
            Self::Signal(s) => write!(f, "was killed by signal {s}"),
            Self::NotStarted(e) => write!(f, "could not be started: {e}"),
        }
    }
}

/// What the launcher does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Start the agent `current` names (after a switch, the new one).
    Start,
    /// Exit with this code (the service manager decides about restarts; 78 stays "bad configuration").
    Exit(i32),
    /// Point `current` back at the trial's `from`, record the reason, start the old agent.
    RollBack(String),
}

/// The agent that was started from `started` (a `<dir>`, None for the packaged binary) ended as `how`.
pub fn on_end(trial: Option<&Trial>, started: Option<&str>, how: &Ended) -> Next {
    match trial {
        // The new agent ended before it confirmed itself: whatever the cause, it is not healthy.
        Some(t) if started == Some(t.to.as_str()) => {
            Next::RollBack(format!("the new agent {how} before it confirmed itself"))
        }
        // The old agent wrote the trial and exited for the switch.
        Some(_) => Next::Start,
        None => match how {
            Ended::Code(c) => Next::Exit(*c),
            Ended::Signal(s) => Next::Exit(128 + s),
            // EX_OSERR: the packaged binary (or a confirmed one) cannot run; systemd may retry.
            Ended::NotStarted(_) => Next::Exit(71),
        },
    }
}

/// While the agent started from `started` runs for `elapsed_secs`: a new agent out of time is rolled back.
pub fn on_wait(trial: Option<&Trial>, started: Option<&str>, elapsed_secs: u64) -> Option<String> {
    let t = trial?;
    (started == Some(t.to.as_str()) && elapsed_secs >= t.confirm_secs).then(|| {
        format!(
            "the new agent did not confirm itself within {} s (not connected or not healthy)",
            t.confirm_secs
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(from: Option<&str>) -> Trial {
        Trial {
            release: "ab".repeat(32),
            version: "1.2.0".into(),
            from: from.map(str::to_owned),
            to: "1.2.0-abababab".into(),
            confirm_secs: 30,
        }
    }

    #[test]
    fn trial_records_round_trip_and_refuse_paths() {
        for t in [trial(None), trial(Some("1.1.0-cdcdcdcd"))] {
            assert_eq!(Trial::parse(&t.render()), Ok(t));
        }
        let cases = [
            (
                "release=a\nversion=1\nto=../etc\nconfirm_secs=3\n",
                "outside",
            ),
            (
                "release=a\nversion=1\nto=x\nfrom=/usr\nconfirm_secs=3\n",
                "outside",
            ),
            ("release=a\nversion=1\nconfirm_secs=3\n", "no to"),
            (
                "release=a\nversion=1\nto=x\nconfirm_secs=soon\n",
                "not a number",
            ),
            ("", "no to"),
        ];
        for (text, want) in cases {
            let err = Trial::parse(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn what_an_ending_agent_leads_to() {
        let t = trial(Some("old"));
        let new = Some("1.2.0-abababab");
        let cases: Vec<(Option<&Trial>, Option<&str>, Ended, Next)> = vec![
            // No switch in progress: the service manager sees the agent's own exit.
            (None, None, Ended::Code(0), Next::Exit(0)),
            (None, Some("old"), Ended::Code(78), Next::Exit(78)),
            (None, None, Ended::Signal(9), Next::Exit(137)),
            (None, None, Ended::NotStarted("gone".into()), Next::Exit(71)),
            // The old agent exits after writing the trial: start the new one.
            (Some(&t), Some("old"), Ended::Code(0), Next::Start),
            (Some(&t), None, Ended::Code(0), Next::Start),
            // The new one ends before confirming, however it ends: back to the old one.
            (
                Some(&t),
                new,
                Ended::Code(0),
                Next::RollBack(
                    "the new agent exited with code 0 before it confirmed itself".into(),
                ),
            ),
            (
                Some(&t),
                new,
                Ended::Signal(11),
                Next::RollBack(
                    "the new agent was killed by signal 11 before it confirmed itself".into(),
                ),
            ),
            (
                Some(&t),
                new,
                Ended::NotStarted("Exec format error (os error 8)".into()),
                Next::RollBack(
                    "the new agent could not be started: Exec format error (os error 8) before it \
                     confirmed itself"
                        .into(),
                ),
            ),
        ];
        for (trial, started, how, want) in cases {
            assert_eq!(
                on_end(trial, started, &how),
                want,
                "{trial:?} {started:?} {how:?}"
            );
        }
    }

    #[test]
    fn a_new_agent_out_of_time_is_rolled_back() {
        let t = trial(None);
        let new = Some("1.2.0-abababab");
        assert_eq!(on_wait(Some(&t), new, 29), None);
        assert!(on_wait(Some(&t), new, 30).is_some_and(|r| r.contains("within 30 s")));
        // The old agent (writing the trial, about to exit) has no deadline; nor has any agent without a trial.
        assert_eq!(on_wait(Some(&t), Some("old"), 3000), None);
        assert_eq!(on_wait(None, new, 3000), None);
    }
}
