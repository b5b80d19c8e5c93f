//! The systemd notify protocol, spoken directly over `$NOTIFY_SOCKET` (a unix datagram socket; `@name` is an
//! abstract one): `READY=1` once the restored workloads run, `WATCHDOG=1` from the main loop at half
//! `$WATCHDOG_USEC`, `STOPPING=1` at shutdown. Without the variables (not under systemd, or a unit that is not
//! `Type=notify`) every call does nothing. Written by hand rather than through a crate: it is one datagram per
//! message, and the parsing of the environment is the part worth testing.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// Where to send, from `$NOTIFY_SOCKET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

/// The notify settings the service manager gave this process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    pub target: Option<Target>,
    /// How often to ping: half the watchdog timeout, when the watchdog is for this process.
    pub ping_every: Option<Duration>,
}

/// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (the watchdog is for another process when that is
/// set to another pid). Pure, for tests.
pub fn settings(socket: Option<&str>, usec: Option<&str>, pid: Option<&str>, me: u32) -> Settings {
    let target = match socket {
        Some(s) if s.starts_with('@') && s.len() > 1 => {
            Some(Target::Abstract(s.as_bytes()[1..].to_vec()))
        }
        Some(s) if s.starts_with('/') => Some(Target::Path(s.into())),
        _ => None,
    };
    let for_me = pid.is_none_or(|p| p.trim().parse::<u32>().ok() == Some(me));
    let ping_every = usec
        .and_then(|u| u.trim().parse::<u64>().ok())
        .filter(|u| *u > 0 && for_me && target.is_some())
        .map(|u| Duration::from_micros(u / 2));
    Settings { target, ping_every }
}

/// Sends notifications to the service manager.
#[derive(Debug)]
pub struct Notifier {
    settings: Settings,
    last_ping: Option<Instant>,
}

impl Notifier {
    /// From this process's environment.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok();
        Self::new(settings(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        ))
    }

    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            last_ping: None,
        }
    }

    /// Whether a service manager listens.
    pub fn active(&self) -> bool {
        self.settings.target.is_some()
    }

    fn send(&self, message: &str) {
        let Some(target) = &self.settings.target else {
            return;
        };
        let addr = match target {
            Target::Path(p) => SocketAddr::from_pathname(p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)
            }
        };
        let sent =
            addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(message.as_bytes(), &addr));
        if let Err(e) = sent {
            tracing::warn!(error = %e, "cannot notify the service manager");
        }
    }

    /// The agent is up: restored workloads run.
    pub fn ready(&mut self, status: &str) {
        self.send(&format!(
            "READY=1\nSTATUS={status}\nMAINPID={}\n",
            std::process::id()
        ));
        self.last_ping = Some(Instant::now());
    }

    /// Pings the watchdog when half its timeout has passed since the last ping; called from the main loop, so a
    /// hung loop stops the pings and the service manager restarts the agent.
    pub fn watchdog(&mut self) {
        let Some(every) = self.settings.ping_every else {
            return;
        };
        if self.last_ping.is_none_or(|t| t.elapsed() >= every) {
            self.send("WATCHDOG=1\n");
            self.last_ping = Some(Instant::now());
        }
    }

    /// The agent is shutting down.
    pub fn stopping(&self) {
        self.send("STOPPING=1\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`, expected).
    type Case = (
        Option<&'static str>,
        Option<&'static str>,
        Option<&'static str>,
        Settings,
    );

    #[test]
    fn settings_from_the_environment() {
        let cases: Vec<Case> = vec![
            (None, None, None, Settings::default()),
            (None, Some("30000000"), None, Settings::default()),
            (
                Some("/run/systemd/notify"),
                Some("30000000"),
                None,
                Settings {
                    target: Some(Target::Path("/run/systemd/notify".into())),
                    ping_every: Some(Duration::from_secs(15)),
                },
            ),
            (
                Some("@sd-notify"),
                Some("30000000"),
                Some("42"),
                Settings {
                    target: Some(Target::Abstract(b"sd-notify".to_vec())),
                    ping_every: Some(Duration::from_secs(15)),
                },
            ),
            // The watchdog belongs to another process, or is malformed: no pings (notifications still go).
            (
                Some("/n"),
                Some("30000000"),
                Some("7"),
                Settings {
                    target: Some(Target::Path("/n".into())),
                    ping_every: None,
                },
            ),
            (
                Some("/n"),
                Some("soon"),
                None,
                Settings {
                    target: Some(Target::Path("/n".into())),
                    ping_every: None,
                },
            ),
            (Some("relative"), None, None, Settings::default()),
            (Some("@"), None, None, Settings::default()),
        ];
        for (socket, usec, pid, want) in cases {
            assert_eq!(
                settings(socket, usec, pid, 42),
                want,
                "{socket:?} {usec:?} {pid:?}"
            );
        }
    }

    #[test]
    fn messages_reach_the_socket() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut n = Notifier::new(Settings {
            target: Some(Target::Path(path)),
            ping_every: Some(Duration::ZERO),
        });
        n.ready("2 workloads restored");
        n.watchdog();
        n.stopping();
        let mut got = vec![];
        for _ in 0..3 {
            let mut buf = [0u8; 256];
            let len = listener.recv(&mut buf).expect("a datagram");
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        assert!(
            got[0].starts_with("READY=1\nSTATUS=2 workloads restored\n"),
            "{got:?}"
        );
        assert_eq!(got[1..], ["WATCHDOG=1\n", "STOPPING=1\n"]);
    }
}
