//! Firmware updates through the built-in A/B backend: the image is written to the slot that is not running, read
//! back and checked against its digest, and only then is the slot activated in U-Boot's environment (RAUC's
//! variables, through Debian's `fw_printenv`/`fw_setenv`; the decisions are `flotilla_agent_core::boot`'s). A
//! power cut at any point before the activation leaves the old slot booting as before; the activation itself is
//! one `fw_setenv --script` call (atomic with a redundant environment). After the reboot the new system must mark
//! itself good within `confirm_secs`; otherwise it is marked bad and the device reboots into the old slot (and
//! U-Boot's attempt counter does the same if the new system never gets that far).
//!
//! The update in flight is kept in `firmware.pending` in the data directory (written atomically) so the agent
//! knows after a boot what it was doing.

use crate::config::FirmwareConfig;
use flotilla_agent_core::boot::{self, AfterBoot, BootEnv, Pending};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a firmware step failed; the running slot is untouched by every one of them.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("the booted slot is not named on {path} (expected rauc.slot=A or rauc.slot=B)")]
    UnknownBootedSlot { path: PathBuf },
    #[error("U-Boot environment: {0}")]
    Env(#[from] boot::BootEnvError),
    #[error("{command} failed ({status}): {stderr}")]
    Tool {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("slot {slot} ({path}): {source}")]
    Slot {
        slot: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the image is {size} bytes; slot {slot} holds {capacity}")]
    TooLarge {
        slot: String,
        size: u64,
        capacity: u64,
    },
    #[error("image {path}: {source}")]
    Image {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the image's SHA-256 is {actual}, not the release's {expected}")]
    ImageDigest { expected: String, actual: String },
    #[error(
        "slot {slot} reads back SHA-256 {actual} after writing, not {expected}: the slot was not activated"
    )]
    ReadBack {
        slot: String,
        expected: String,
        actual: String,
    },
    #[error("an update to slot {to} is already in flight")]
    InFlight { to: String },
    #[error("pending update record {path}: {message}")]
    Pending { path: PathBuf, message: String },
}

/// Where a crash is injected, for the power-cut tests (`FLOTILLA_FIRMWARE_CRASH_AT`): the process kills itself
/// with SIGKILL at that step, as a power cut would stop it.
fn crash_point(step: &str) {
    if std::env::var("FLOTILLA_FIRMWARE_CRASH_AT").is_ok_and(|s| s == step) {
        let _ = Command::new("kill")
            .args(["-9", &std::process::id().to_string()])
            .status();
        // `kill` delivers before it returns; should it not, stop anyway without any cleanup.
        std::process::abort();
    }
}

/// What the agent keeps about firmware updates, whichever backend installs them: the update in flight
/// (`firmware.pending`), the release installed in each slot (`firmware.slots`), and the reboot command.
#[derive(Debug, Clone)]
pub struct Records {
    pending_path: PathBuf,
    reboot_command: Vec<String>,
}

impl Records {
    pub fn new(cfg: &FirmwareConfig, data_dir: &Path) -> Self {
        Self {
            pending_path: data_dir.join("firmware.pending"),
            reboot_command: cfg.reboot_command.clone(),
        }
    }

    /// The update in flight, if any.
    pub fn pending(&self) -> Result<Option<Pending>, FirmwareError> {
        let bad = |m: String| FirmwareError::Pending {
            path: self.pending_path.clone(),
            message: m,
        };
        let text = match std::fs::read_to_string(&self.pending_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(e.to_string())),
        };
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_owned)
        };
        let (Some(from), Some(to), Some(version)) = (get("from"), get("to"), get("version")) else {
            return Err(bad("missing from, to or version".into()));
        };
        let rebooted_at = match get("rebooted_at") {
            None => None,
            Some(t) => Some(t.parse().map_err(|_| bad(format!("rebooted_at {t:?}")))?),
        };
        Ok(Some(Pending {
            from,
            to,
            version,
            rebooted_at,
        }))
    }

    /// Persists `p` (write to a temporary file, fsync, rename, fsync the directory).
    pub fn save_pending(&self, p: &Pending) -> Result<(), FirmwareError> {
        let bad = |e: std::io::Error| FirmwareError::Pending {
            path: self.pending_path.clone(),
            message: e.to_string(),
        };
        let mut text = format!("from={}\nto={}\nversion={}\n", p.from, p.to, p.version);
        if let Some(t) = p.rebooted_at {
            text.push_str(&format!("rebooted_at={t}\n"));
        }
        let tmp = self.pending_path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(bad)?;
        f.write_all(text.as_bytes()).map_err(bad)?;
        f.sync_all().map_err(bad)?;
        std::fs::rename(&tmp, &self.pending_path).map_err(bad)?;
        if let Some(dir) = self.pending_path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Refuses a new install while one has been rebooted into and not yet confirmed or rolled back.
    pub fn refuse_if_in_flight(&self) -> Result<(), FirmwareError> {
        match self.pending()? {
            Some(p) if p.rebooted_at.is_some() => Err(FirmwareError::InFlight { to: p.to }),
            _ => Ok(()),
        }
    }

    pub fn clear_pending(&self) {
        let _ = std::fs::remove_file(&self.pending_path);
    }

    /// Where each slot's installed release is recorded (`A=<version> <digest>` lines).
    fn slots_path(&self) -> PathBuf {
        self.pending_path.with_file_name("firmware.slots")
    }

    /// The release installed in `slot` by an update (version, digest hex); None for what the device shipped with.
    pub fn installed(&self, slot: &str) -> Option<(String, String)> {
        let text = std::fs::read_to_string(self.slots_path()).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(slot)?.strip_prefix('='))
            .and_then(|rest| rest.split_once(' '))
            .map(|(v, d)| (v.to_owned(), d.to_owned()))
    }

    /// Records that `slot` is being given `version` (release `digest`): written before the slot is, so a slot
    /// that boots is never one whose record names an older release.
    pub fn record_installed(
        &self,
        slot: &str,
        version: &str,
        digest: &str,
    ) -> Result<(), FirmwareError> {
        let path = self.slots_path();
        let mut lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with(&format!("{slot}=")))
            .map(str::to_owned)
            .collect();
        lines.push(format!("{slot}={version} {digest}"));
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all((lines.join("\n") + "\n").as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| FirmwareError::Pending {
            path: path.clone(),
            message: e.to_string(),
        })
    }

    /// Records that the reboot into the new slot is being asked for, then runs the reboot command.
    pub fn reboot(&self, now: u64) -> Result<(), FirmwareError> {
        if let Some(mut p) = self.pending()? {
            p.rebooted_at = Some(now);
            self.save_pending(&p)?;
        }
        crash_point("rebooting");
        let (prog, args) = self
            .reboot_command
            .split_first()
            .map_or(("true", &[][..]), |(p, a)| (p.as_str(), a));
        let mut c = Command::new(prog);
        c.args(args);
        run(c, &self.reboot_command.join(" ")).map(|_| ())
    }
}

/// The built-in A/B backend.
#[derive(Debug, Clone)]
pub struct AbBackend {
    cfg: FirmwareConfig,
    records: Records,
}

/// SHA-256 of the first `len` bytes of `r`.
/// Opens `image` and checks that its SHA-256 is `sha256` (the signed release's): the file and its size.
pub(crate) fn check_image(
    image: &Path,
    sha256: &str,
) -> Result<(std::fs::File, u64), FirmwareError> {
    let img_err = |e| FirmwareError::Image {
        path: image.to_owned(),
        source: e,
    };
    let mut src = std::fs::File::open(image).map_err(img_err)?;
    let size = src.metadata().map_err(img_err)?.len();
    let actual = sha256_of(&mut src, size).map_err(img_err)?;
    if actual != sha256 {
        return Err(FirmwareError::ImageDigest {
            expected: sha256.to_owned(),
            actual,
        });
    }
    Ok((src, size))
}

fn sha256_of(r: &mut impl Read, len: u64) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut left = len;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "shorter than the image",
            ));
        }
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

impl AbBackend {
    pub fn new(cfg: FirmwareConfig, data_dir: &Path) -> Self {
        Self {
            records: Records::new(&cfg, data_dir),
            cfg,
        }
    }

    fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(name);
        if let Some(conf) = &self.cfg.fw_env_config {
            c.arg("-c").arg(conf);
        }
        c
    }

    fn run(c: Command, what: &str) -> Result<String, FirmwareError> {
        run(c, what)
    }
}

/// Runs a tool; its stdout, or a typed error with its status and stderr.
pub(crate) fn run(mut c: Command, what: &str) -> Result<String, FirmwareError> {
    {
        let out = c.output().map_err(|e| FirmwareError::Tool {
            command: what.to_owned(),
            status: "not run".into(),
            stderr: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(FirmwareError::Tool {
                command: what.to_owned(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl AbBackend {
    /// U-Boot's boot variables, read with `fw_printenv`.
    pub fn env(&self) -> Result<BootEnv, FirmwareError> {
        let text = Self::run(self.tool("fw_printenv"), "fw_printenv")?;
        let vars: BTreeMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(BootEnv::parse(&vars)?)
    }

    /// Writes the variables in one `fw_setenv --script` call.
    fn write_env(&self, env: &BootEnv) -> Result<(), FirmwareError> {
        let script = self.records.pending_path.with_extension("fw_setenv");
        std::fs::write(&script, env.script()).map_err(|e| FirmwareError::Pending {
            path: script.clone(),
            message: e.to_string(),
        })?;
        let mut c = self.tool("fw_setenv");
        c.arg("--script").arg(&script);
        let r = Self::run(c, "fw_setenv");
        let _ = std::fs::remove_file(&script);
        r.map(|_| ())
    }

    /// The slot this system booted from (`rauc.slot=` on the kernel command line).
    pub fn booted(&self) -> Result<String, FirmwareError> {
        let unknown = || FirmwareError::UnknownBootedSlot {
            path: self.cfg.cmdline.clone(),
        };
        let text = std::fs::read_to_string(&self.cfg.cmdline).map_err(|_| unknown())?;
        text.split_whitespace()
            .find_map(|w| w.strip_prefix("rauc.slot="))
            .filter(|s| self.cfg.slots.contains_key(*s))
            .map(str::to_owned)
            .ok_or_else(unknown)
    }

    fn slot_path(&self, slot: &str) -> &Path {
        self.cfg
            .slots
            .get(slot)
            .map_or(Path::new("/nonexistent"), PathBuf::as_path)
    }

    /// The slot an install would write (the one not booted).
    pub fn inactive(&self) -> Result<String, FirmwareError> {
        Ok(boot::other(&self.booted()?).to_owned())
    }

    /// Installs `image` (whose SHA-256 must be `sha256`) as `version` into the slot that is not running and
    /// activates that slot for the next boot. Returns (from, to). Nothing is activated unless the slot reads back
    /// exactly the image.
    pub fn install(
        &self,
        image: &Path,
        sha256: &str,
        version: &str,
    ) -> Result<(String, String), FirmwareError> {
        self.records.refuse_if_in_flight()?;
        let from = self.booted()?;
        let to = boot::other(&from).to_owned();
        let mut env = self.env()?;
        let img_err = |e| FirmwareError::Image {
            path: image.to_owned(),
            source: e,
        };
        // The image is checked before a byte of the slot is touched.
        let (mut src, size) = check_image(image, sha256)?;
        src.seek(SeekFrom::Start(0)).map_err(img_err)?;
        let path = self.slot_path(&to).to_owned();
        let slot_err = |e| FirmwareError::Slot {
            slot: to.clone(),
            path: path.clone(),
            source: e,
        };
        // A block device has a capacity; a slot file grows.
        let mut dst = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create(!path.starts_with("/dev"))
            .truncate(false)
            .open(&path)
            .map_err(slot_err)?;
        let meta = dst.metadata().map_err(slot_err)?;
        if !meta.is_file() {
            let capacity = dst.seek(SeekFrom::End(0)).map_err(slot_err)?;
            if size > capacity {
                return Err(FirmwareError::TooLarge {
                    slot: to.clone(),
                    size,
                    capacity,
                });
            }
        }
        // From here the inactive slot is being changed: record it, so a boot that finds the record knows the slot
        // holds no trustworthy system until the update is activated.
        self.records.save_pending(&Pending {
            from: from.clone(),
            to: to.clone(),
            version: version.to_owned(),
            rebooted_at: None,
        })?;
        // The slot must not stay bootable with half an image: it is taken out of the boot order first.
        env.mark_bad(&to);
        self.write_env(&env)?;
        crash_point("before-write");
        dst.seek(SeekFrom::Start(0)).map_err(slot_err)?;
        let mut buf = vec![0u8; 1 << 16];
        let mut written = 0u64;
        loop {
            let n = src.read(&mut buf).map_err(img_err)?;
            if n == 0 {
                break;
            }
            dst.write_all(&buf[..n]).map_err(slot_err)?;
            written += n as u64;
            if written >= size / 2 && written - (n as u64) < size / 2 {
                crash_point("mid-write");
            }
        }
        if meta.is_file() {
            dst.set_len(size).map_err(slot_err)?;
        }
        dst.sync_all().map_err(slot_err)?;
        crash_point("written");
        // Read back what the slot now holds.
        dst.seek(SeekFrom::Start(0)).map_err(slot_err)?;
        let back = sha256_of(&mut dst, size).map_err(slot_err)?;
        if back != sha256 {
            return Err(FirmwareError::ReadBack {
                slot: to,
                expected: sha256.to_owned(),
                actual: back,
            });
        }
        crash_point("verified");
        env.mark_active(&to);
        self.write_env(&env)?;
        crash_point("activated");
        Ok((from, to))
    }

    /// At boot: what the pending update became (none: nothing pending).
    pub fn after_boot(&self, now: u64) -> Result<Option<(Pending, AfterBoot)>, FirmwareError> {
        let Some(p) = self.records.pending()? else {
            return Ok(None);
        };
        let booted = self.booted()?;
        let outcome = boot::after_boot(&p, &booted, now, self.cfg.confirm_secs);
        match &outcome {
            AfterBoot::RolledBack { .. } | AfterBoot::Abandoned => {
                // The new slot stays out of the boot order; the record is done with once reported.
                let mut env = self.env()?;
                env.mark_bad(&p.to);
                env.mark_good(&booted);
                self.write_env(&env)?;
                self.records.clear_pending();
            }
            AfterBoot::Confirm { .. } => {}
        }
        Ok(Some((p, outcome)))
    }

    /// The new system is healthy: keep booting it.
    pub fn mark_good(&self) -> Result<String, FirmwareError> {
        let booted = self.booted()?;
        let mut env = self.env()?;
        env.mark_good(&booted);
        self.write_env(&env)?;
        self.records.clear_pending();
        Ok(booted)
    }

    /// A normal boot (no update in flight): the running slot is reset to full attempts, as RAUC systems do at
    /// every boot, so reboots without an update (power cycles, offline or not) never use up its attempts and fall
    /// over to the other slot. Writes the environment only when the count went down.
    pub fn keep_booting(&self) -> Result<Option<String>, FirmwareError> {
        let booted = self.booted()?;
        let mut env = self.env()?;
        if env.left.get(&booted).copied().unwrap_or(0) >= boot::ATTEMPTS {
            return Ok(None);
        }
        env.mark_good(&booted);
        self.write_env(&env)?;
        Ok(Some(booted))
    }

    /// The new system did not come up healthy in time: never boot it again, and go back to the other slot.
    pub fn mark_bad(&self) -> Result<String, FirmwareError> {
        let booted = self.booted()?;
        let mut env = self.env()?;
        env.mark_bad(&booted);
        self.write_env(&env)?;
        Ok(booted)
    }
}

/// A firmware update backend: the built-in A/B one ([`AbBackend`]) or RAUC ([`crate::rauc::RaucBackend`]). The
/// agent's decisions (when to install, confirm, give up) are the same for both; what differs is how an image
/// gets into the other slot and how slots are marked.
pub trait FirmwareBackend: std::fmt::Debug + Send + Sync {
    /// `ab` or `rauc`, as the inventory reports it.
    fn name(&self) -> &'static str;
    /// The update in flight and each slot's installed release.
    fn records(&self) -> &Records;
    /// The slot this system booted from.
    fn booted(&self) -> Result<String, FirmwareError>;
    /// The slot an install writes.
    fn inactive(&self) -> Result<String, FirmwareError>;
    /// Installs `image` (SHA-256 `sha256`) as `version` into the inactive slot and activates it for the next
    /// boot: (from, to). Nothing is activated unless the whole image is in place and checked.
    fn install(
        &self,
        image: &Path,
        sha256: &str,
        version: &str,
    ) -> Result<(String, String), FirmwareError>;
    /// At boot: what the update in flight became.
    fn after_boot(&self, now: u64) -> Result<Option<(Pending, AfterBoot)>, FirmwareError>;
    fn mark_good(&self) -> Result<String, FirmwareError>;
    fn mark_bad(&self) -> Result<String, FirmwareError>;
    /// A normal boot: keep the running slot bootable (reset its attempts).
    fn keep_booting(&self) -> Result<Option<String>, FirmwareError>;
    /// A few lines for `flotilla-agent firmware status`.
    fn status(&self) -> Result<String, FirmwareError>;
}

/// The backend `[firmware]` names.
pub fn backend(cfg: FirmwareConfig, data_dir: &Path) -> Box<dyn FirmwareBackend> {
    match cfg.backend {
        crate::config::FirmwareBackendKind::Ab => Box::new(AbBackend::new(cfg, data_dir)),
        crate::config::FirmwareBackendKind::Rauc => {
            Box::new(crate::rauc::RaucBackend::new(cfg, data_dir))
        }
    }
}

impl FirmwareBackend for AbBackend {
    fn name(&self) -> &'static str {
        "ab"
    }
    fn records(&self) -> &Records {
        &self.records
    }
    fn booted(&self) -> Result<String, FirmwareError> {
        AbBackend::booted(self)
    }
    fn inactive(&self) -> Result<String, FirmwareError> {
        AbBackend::inactive(self)
    }
    fn install(
        &self,
        image: &Path,
        sha256: &str,
        version: &str,
    ) -> Result<(String, String), FirmwareError> {
        AbBackend::install(self, image, sha256, version)
    }
    fn after_boot(&self, now: u64) -> Result<Option<(Pending, AfterBoot)>, FirmwareError> {
        AbBackend::after_boot(self, now)
    }
    fn mark_good(&self) -> Result<String, FirmwareError> {
        AbBackend::mark_good(self)
    }
    fn mark_bad(&self) -> Result<String, FirmwareError> {
        AbBackend::mark_bad(self)
    }
    fn keep_booting(&self) -> Result<Option<String>, FirmwareError> {
        AbBackend::keep_booting(self)
    }
    fn status(&self) -> Result<String, FirmwareError> {
        let env = self.env()?;
        Ok(format!(
            "booted {}\nboot order {}\n{}pending {:?}",
            AbBackend::booted(self)?,
            env.order.join(" "),
            env.left
                .iter()
                .map(|(s, n)| format!("slot {s}: {n} attempts left\n"))
                .collect::<String>(),
            self.records.pending()?
        ))
    }
}

/// A new slot proving itself after an update.
#[derive(Debug)]
pub struct Confirming {
    backend: Box<dyn FirmwareBackend>,
    deadline: u64,
    needs_hub: bool,
}

impl crate::agent::Agent {
    /// At start: what a pending firmware update became (the loop confirms a new slot once healthy).
    pub(crate) fn firmware_at_boot(&mut self) {
        let Some(cfg) = self.cfg.firmware.clone() else {
            return;
        };
        let needs_hub = cfg.confirm_needs_hub;
        let backend = backend(cfg, &self.cfg.data_dir);
        match backend.after_boot(crate::agent::unix_now()) {
            Ok(None) => match backend.keep_booting() {
                Ok(Some(slot)) => tracing::info!(%slot, "boot attempts of the running slot reset"),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "resetting the running slot's boot attempts"),
            },
            Ok(Some((p, AfterBoot::Confirm { deadline }))) => {
                tracing::info!(version = %p.version, slot = %p.to, deadline, "new firmware booted; confirming once healthy");
                self.firmware_confirm = Some(Confirming {
                    backend,
                    deadline,
                    needs_hub,
                });
            }
            Ok(Some((p, AfterBoot::RolledBack { reason }))) => {
                tracing::error!(version = %p.version, slot = %p.to, %reason, "firmware update rolled back");
                self.firmware_rolled_back(&p.to, &reason.to_string());
            }
            Ok(Some((p, AfterBoot::Abandoned))) => {
                tracing::warn!(version = %p.version, slot = %p.to, "firmware update abandoned before its reboot (power cut?); the old slot runs");
            }
            Err(e) => tracing::error!(error = %e, "firmware state unreadable at boot"),
        }
    }

    /// Each tick while a new slot proves itself: healthy (workloads restored, and a report delivered to the hub
    /// unless the policy allows confirming offline) marks it good; the deadline passed marks it bad and reboots
    /// into the old slot.
    pub(crate) fn firmware_tick(&mut self) {
        let Some(c) = &self.firmware_confirm else {
            return;
        };
        // The loop runs only after restore, so restored workloads are a given here.
        let healthy = !c.needs_hub || (self.connected && self.inventory_sent.is_some());
        match boot::confirm(crate::agent::unix_now(), c.deadline, healthy) {
            boot::Confirmation::Wait => {}
            boot::Confirmation::MarkGood => {
                match c.backend.mark_good() {
                    Ok(slot) => tracing::info!(%slot, "new firmware confirmed: slot marked good"),
                    Err(e) => tracing::error!(error = %e, "marking the new firmware good"),
                }
                self.firmware_confirm = None;
                // The firmware workload is now running its release: say so.
                self.refresh_desired();
                self.send_report();
            }
            boot::Confirmation::MarkBadAndReboot => {
                tracing::error!(
                    "new firmware not healthy in time: marking its slot bad and rebooting into the old one"
                );
                let r = c
                    .backend
                    .mark_bad()
                    .and_then(|_| c.backend.records().reboot(crate::agent::unix_now()));
                if let Err(e) = r {
                    tracing::error!(error = %e, "rolling the firmware back");
                }
                self.firmware_confirm = None;
            }
        }
    }
}
