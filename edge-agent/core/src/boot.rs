//! Sans-IO: A/B boot selection in U-Boot's environment, with RAUC's variables, so a stock RAUC U-Boot boot script
//! works unchanged: `BOOT_ORDER` lists the slots by priority (`"A B"`), `BOOT_<slot>_LEFT` counts the boot attempts
//! each has left. At power-on the script boots the first slot in the order with attempts left, decrementing them;
//! a slot that never gets marked good therefore runs out of attempts and the next slot in the order boots.
//!
//! The agent's firmware backend reads the variables (`fw_printenv`), asks this module what to write, and writes
//! every change of one step in a single `fw_setenv --script` call (atomic with a redundant environment).

use std::collections::BTreeMap;

/// Boot attempts a slot gets when it is activated or marked good (RAUC's default).
pub const ATTEMPTS: u32 = 3;

/// The two slots of an A/B system.
pub const SLOTS: [&str; 2] = ["A", "B"];

/// The boot variables of an A/B system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEnv {
    /// Slots by priority.
    pub order: Vec<String>,
    /// Boot attempts left per slot.
    pub left: BTreeMap<String, u32>,
}

/// Why the environment cannot be read as an A/B boot environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootEnvError {
    /// `BOOT_ORDER` is missing or names no known slot.
    NoOrder,
    /// `BOOT_ORDER` names a slot that is not A or B, or one twice.
    BadOrder(String),
    /// A `BOOT_x_LEFT` is not a small number.
    BadCount { slot: String, value: String },
}

impl std::fmt::Display for BootEnvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoOrder => write!(f, "BOOT_ORDER is not set"),
            Self::BadOrder(o) => write!(f, "BOOT_ORDER {o:?} must list A and B, each once"),
            Self::BadCount { slot, value } => {
                write!(f, "BOOT_{slot}_LEFT is {value:?}, not a number of attempts")
            }
        }
    }
}

impl std::error::Error for BootEnvError {}

/// The other slot of an A/B pair.
pub fn other(slot: &str) -> &'static str {
    if slot == "A" { "B" } else { "A" }
}

impl BootEnv {
    /// Reads the variables (`fw_printenv` output as a map). A missing `BOOT_x_LEFT` counts as 0, as the boot
    /// script treats it.
    pub fn parse(vars: &BTreeMap<String, String>) -> Result<Self, BootEnvError> {
        let raw = vars.get("BOOT_ORDER").ok_or(BootEnvError::NoOrder)?;
        let order: Vec<String> = raw.split_whitespace().map(str::to_owned).collect();
        let mut seen = order.clone();
        seen.sort();
        seen.dedup();
        if order.is_empty() {
            return Err(BootEnvError::NoOrder);
        }
        if seen.len() != order.len() || order.iter().any(|s| !SLOTS.contains(&s.as_str())) {
            return Err(BootEnvError::BadOrder(raw.clone()));
        }
        let mut left = BTreeMap::new();
        for slot in SLOTS {
            let n = match vars.get(&format!("BOOT_{slot}_LEFT")) {
                None => 0,
                Some(v) => v
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n <= 100)
                    .ok_or_else(|| BootEnvError::BadCount {
                        slot: slot.to_owned(),
                        value: v.clone(),
                    })?,
            };
            left.insert(slot.to_owned(), n);
        }
        Ok(Self { order, left })
    }

    /// A fresh environment: A first, both slots with full attempts.
    pub fn initial() -> Self {
        Self {
            order: SLOTS.iter().map(|s| (*s).to_owned()).collect(),
            left: SLOTS.iter().map(|s| ((*s).to_owned(), ATTEMPTS)).collect(),
        }
    }

    /// The variables to write, as `fw_setenv --script` lines (`NAME=value`).
    pub fn script(&self) -> String {
        let mut s = format!("BOOT_ORDER={}\n", self.order.join(" "));
        for (slot, n) in &self.left {
            s.push_str(&format!("BOOT_{slot}_LEFT={n}\n"));
        }
        s
    }

    fn attempts(&self, slot: &str) -> u32 {
        self.left.get(slot).copied().unwrap_or(0)
    }

    /// What the boot script does at power-on: boots the first slot in the order with attempts left and
    /// decrements them; `None` when every slot is out of attempts (the script then resets the counts and
    /// reboots, which [`Self::boot_or_reset`] models).
    pub fn boot(&mut self) -> Option<String> {
        let slot = self.order.iter().find(|s| self.attempts(s) > 0)?.clone();
        if let Some(n) = self.left.get_mut(&slot) {
            *n -= 1;
        }
        Some(slot)
    }

    /// [`Self::boot`], and when no slot has attempts left, RAUC's script resets them all and boots the first.
    pub fn boot_or_reset(&mut self) -> String {
        if let Some(s) = self.boot() {
            return s;
        }
        for n in self.left.values_mut() {
            *n = ATTEMPTS;
        }
        self.boot().unwrap_or_else(|| self.order[0].clone())
    }

    /// After writing a new image to `slot`: boot it next, with full attempts (RAUC's mark-active).
    pub fn mark_active(&mut self, slot: &str) {
        self.order.retain(|s| s != slot);
        self.order.insert(0, slot.to_owned());
        self.left.insert(slot.to_owned(), ATTEMPTS);
    }

    /// The booted slot came up healthy: full attempts again, so it keeps booting (RAUC's mark-good).
    pub fn mark_good(&mut self, slot: &str) {
        self.left.insert(slot.to_owned(), ATTEMPTS);
    }

    /// The slot must not boot again (RAUC's mark-bad): no attempts left, and the other slot first.
    pub fn mark_bad(&mut self, slot: &str) {
        self.left.insert(slot.to_owned(), 0);
        self.order.retain(|s| s != slot);
        self.order.push(slot.to_owned());
    }
}

/// An update in flight, as the agent persists it before each step (so a power cut resumes or undoes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The slot that ran when the update began.
    pub from: String,
    /// The slot written.
    pub to: String,
    pub version: String,
    /// When the reboot into `to` was asked (unix seconds); `None` before it.
    pub rebooted_at: Option<u64>,
}

/// What to do about a pending update once the device has booted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterBoot {
    /// Running the new slot: confirm it once healthy, before `deadline`.
    Confirm { deadline: u64 },
    /// Running the old slot: the new one never came up (its attempts ran out, or it was marked bad).
    RolledBack { reason: String },
    /// The update never reached its reboot (power cut while writing or before activating): the old slot runs
    /// as before, and the new one must not be booted by accident.
    Abandoned,
}

/// Decides, at boot, what a pending update became.
pub fn after_boot(p: &Pending, booted: &str, now: u64, confirm_secs: u64) -> AfterBoot {
    match (p.rebooted_at, booted == p.to) {
        (Some(_), true) => AfterBoot::Confirm {
            deadline: now + confirm_secs,
        },
        (Some(_), false) => AfterBoot::RolledBack {
            reason: format!(
                "slot {} did not boot to a healthy system; the bootloader went back to slot {booted}",
                p.to
            ),
        },
        // No reboot was asked, yet the new slot runs: the activation was written and the device restarted on its
        // own before the agent recorded the reboot. It is the new system, so it must prove itself like any.
        (None, true) => AfterBoot::Confirm {
            deadline: now + confirm_secs,
        },
        (None, false) => AfterBoot::Abandoned,
    }
}

/// While confirming: mark good once healthy; past the deadline unhealthy, mark bad and reboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    Wait,
    MarkGood,
    MarkBadAndReboot,
}

pub fn confirm(now: u64, deadline: u64, healthy: bool) -> Confirmation {
    if healthy {
        Confirmation::MarkGood
    } else if now >= deadline {
        Confirmation::MarkBadAndReboot
    } else {
        Confirmation::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// (order, attempts of A, attempts of B), or the refusal.
    type Parsed = Result<(&'static str, u32, u32), BootEnvError>;

    #[test]
    fn the_environment_is_read_or_refused_with_the_reason() {
        let cases: Vec<(BTreeMap<String, String>, Parsed)> = vec![
            (
                vars(&[
                    ("BOOT_ORDER", "A B"),
                    ("BOOT_A_LEFT", "3"),
                    ("BOOT_B_LEFT", "1"),
                ]),
                Ok(("A B", 3, 1)),
            ),
            (
                vars(&[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "2")]),
                Ok(("B A", 2, 0)),
            ),
            (vars(&[("BOOT_A_LEFT", "3")]), Err(BootEnvError::NoOrder)),
            (vars(&[("BOOT_ORDER", "  ")]), Err(BootEnvError::NoOrder)),
            (
                vars(&[("BOOT_ORDER", "A C")]),
                Err(BootEnvError::BadOrder("A C".into())),
            ),
            (
                vars(&[("BOOT_ORDER", "A A")]),
                Err(BootEnvError::BadOrder("A A".into())),
            ),
            (
                vars(&[("BOOT_ORDER", "A B"), ("BOOT_B_LEFT", "x")]),
                Err(BootEnvError::BadCount {
                    slot: "B".into(),
                    value: "x".into(),
                }),
            ),
        ];
        for (v, want) in cases {
            let got =
                BootEnv::parse(&v).map(|e| (e.order.join(" "), e.attempts("A"), e.attempts("B")));
            let want = want.map(|(o, a, b)| (o.to_owned(), a, b));
            assert_eq!(got, want, "{v:?}");
        }
    }

    #[test]
    fn the_boot_script_takes_the_first_slot_with_attempts_left() {
        let mut e = BootEnv::initial();
        e.mark_active("B");
        assert_eq!(e.script(), "BOOT_ORDER=B A\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n");
        // A new slot that is never marked good boots ATTEMPTS times, then the old one takes over.
        let boots: Vec<String> = (0..5).map(|_| e.boot_or_reset()).collect();
        assert_eq!(boots, ["B", "B", "B", "A", "A"]);
    }

    #[test]
    fn a_good_slot_keeps_booting_and_a_bad_one_never_again() {
        let mut e = BootEnv::initial();
        e.mark_active("B");
        assert_eq!(e.boot().as_deref(), Some("B"));
        e.mark_good("B");
        for _ in 0..10 {
            assert_eq!(e.boot().as_deref(), Some("B"));
            e.mark_good("B");
        }
        e.mark_bad("B");
        assert_eq!(e.order, ["A", "B"]);
        assert_eq!(e.boot().as_deref(), Some("A"));
        // Every slot out of attempts: RAUC's script resets the counts and boots by the order.
        let mut spent = BootEnv::parse(&vars(&[
            ("BOOT_ORDER", "A B"),
            ("BOOT_A_LEFT", "0"),
            ("BOOT_B_LEFT", "0"),
        ]))
        .expect("env");
        assert_eq!(spent.boot(), None);
        assert_eq!(spent.boot_or_reset(), "A");
    }

    #[test]
    fn after_boot_the_update_is_confirmed_rolled_back_or_abandoned() {
        let p = |rebooted_at| Pending {
            from: "A".into(),
            to: "B".into(),
            version: "2".into(),
            rebooted_at,
        };
        let cases = [
            (p(Some(100)), "B", AfterBoot::Confirm { deadline: 1060 }),
            (p(None), "B", AfterBoot::Confirm { deadline: 1060 }),
            (p(None), "A", AfterBoot::Abandoned),
        ];
        for (pending, booted, want) in cases {
            assert_eq!(
                after_boot(&pending, booted, 1000, 60),
                want,
                "{pending:?} booted {booted}"
            );
        }
        match after_boot(&p(Some(100)), "A", 1000, 60) {
            AfterBoot::RolledBack { reason } => {
                assert!(reason.contains("slot B did not boot"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn confirmation_waits_for_health_until_the_deadline() {
        let cases = [
            (10, 20, true, Confirmation::MarkGood),
            (10, 20, false, Confirmation::Wait),
            (20, 20, false, Confirmation::MarkBadAndReboot),
            (25, 20, true, Confirmation::MarkGood),
        ];
        for (now, deadline, healthy, want) in cases {
            assert_eq!(
                confirm(now, deadline, healthy),
                want,
                "now {now} deadline {deadline} healthy {healthy}"
            );
        }
    }
}
