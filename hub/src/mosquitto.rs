//! Mosquitto as the device broker, enforcing the same identity model as the embedded one:
//! `flotilla broker-config mosquitto --out DIR` writes a configuration (listeners, TLS material, ACL file, password
//! files, revocation list), and `flotilla serve --mosquitto-dir DIR` keeps the files that change with the fleet
//! current as devices enroll, renew, rotate and are revoked, then asks Mosquitto to reload them.
//!
//! Mosquitto 2.0 has no plugin interface we can rely on here (its dynamic-security plugin does not lock out
//! certificate clients, mosquitto#2999), so the model is expressed in its own files:
//! - devices with client certificates: a mutual-TLS listener (`require_certificate`, `use_identity_as_username`,
//!   `use_username_as_clientid`, `crlfile`), so the certificate's subject is the username and the client id;
//! - devices with passwords: a TLS listener with `use_username_as_clientid` and a password file of devices;
//! - enrollment (anonymous) and telemetry consumers: a TLS listener with a password file of feeds and the hub;
//! - the hub and local tools: a loopback listener;
//! - one ACL file: `pattern` lines for per-device and per-enrollment topics (`%u`, `%c`), a `user` block per
//!   device for its telemetry region, per feed for its regions, `topic deny #` for revoked devices.
//!
//! Password lines are Mosquitto's own format (`$7$`: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt) computed
//! with ring when a password is issued; the hub stores those salted lines, never the passwords.

use crate::server::DataDir;
use crate::store::Store;
use anyhow::{Context, Result};
use flotilla_shared::topics::NO_REGION;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Mosquitto's PBKDF2 iteration count for `$7$` lines (what `mosquitto_passwd` writes).
const PBKDF2_ITERATIONS: u32 = 101;

/// A Mosquitto password-file line for `user` (`user:$7$101$salt$hash`).
pub fn password_line(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let salt: [u8; 12] = rand_salt();
    let mut hash = [0u8; 64];
    let iterations = std::num::NonZeroU32::new(PBKDF2_ITERATIONS)
        .unwrap_or_else(|| unreachable!("a non-zero constant"));
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        iterations,
        &salt,
        password.as_bytes(),
        &mut hash,
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "{user}:$7${PBKDF2_ITERATIONS}${}${}",
        b64.encode(salt),
        b64.encode(hash)
    )
}

fn rand_salt() -> [u8; 12] {
    use ring::rand::SecureRandom as _;
    let mut salt = [0u8; 12];
    // The system random source does not fail on Linux once booted; a zero salt would still be a valid line.
    let _ = ring::rand::SystemRandom::new().fill(&mut salt);
    salt
}

/// Where Mosquitto listens, as the generated configuration says.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Address the device listeners bind to (the loopback listener always binds 127.0.0.1).
    pub bind: String,
    /// Devices with client certificates (mutual TLS).
    pub cert_port: u16,
    /// Devices with passwords (TLS).
    pub password_port: u16,
    /// Enrollment (anonymous) and telemetry consumers (TLS).
    pub clients_port: u16,
    /// Whether anonymous clients may connect to enroll.
    pub anonymous_enrollment: bool,
    /// The hub and local tools, on loopback.
    pub local_port: u16,
    /// The user Mosquitto runs as after start (its `user` option); `None` keeps Mosquitto's default (`mosquitto`).
    /// That user must be able to read the generated files: the private ones are written 0640, so put it in the
    /// group of the hub's user (or run both as the same user).
    pub user: Option<String>,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            bind: "0.0.0.0".into(),
            cert_port: 8883,
            password_port: 8884,
            clients_port: 8885,
            anonymous_enrollment: true,
            local_port: 1883,
            user: None,
        }
    }
}

/// The files in an output directory.
#[derive(Debug, Clone)]
pub struct Files {
    pub dir: PathBuf,
}

impl Files {
    pub fn conf(&self) -> PathBuf {
        self.dir.join("mosquitto.conf")
    }
    pub fn acl(&self) -> PathBuf {
        self.dir.join("acl")
    }
    pub fn passwd_devices(&self) -> PathBuf {
        self.dir.join("passwd-devices")
    }
    pub fn passwd_clients(&self) -> PathBuf {
        self.dir.join("passwd-clients")
    }
    pub fn crl(&self) -> PathBuf {
        self.dir.join("devices.crl")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("mosquitto.pid")
    }
}

/// Writes `contents` to `path` through a temporary file and a rename, so Mosquitto never reads half a file.
/// Private files (keys, password hashes) are readable by the owner and its group only: Mosquitto runs as its own
/// user and reads them through the group.
fn replace(path: &Path, contents: &str, private: bool) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o640 } else { 0o644 })
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// Writes the whole configuration for the hub in `data`: `mosquitto.conf`, the server certificate and key (the
/// hub's broker certificate, so tokens pin Mosquitto exactly as they pin the embedded broker), the device CA, and
/// the files [`write_dynamic`] keeps current.
pub fn write_config(data: &DataDir, out: &Path, layout: &Layout) -> Result<Files> {
    std::fs::create_dir_all(out.join("data"))
        .with_context(|| format!("creating {}", out.display()))?;
    let out = std::fs::canonicalize(out)?;
    let files = Files { dir: out.clone() };
    let pki = crate::pki::BrokerPki::in_dir(&data.0);
    let device_ca = crate::pki::DeviceCa::in_dir(&data.0);
    anyhow::ensure!(
        pki.exists() && device_ca.exists(),
        "{} has no broker or device CA: run `flotilla init` (or start the hub once) first",
        data.0.display()
    );
    let copy = |from: &Path, name: &str, private: bool| -> Result<PathBuf> {
        let text =
            std::fs::read_to_string(from).with_context(|| format!("reading {}", from.display()))?;
        let to = out.join(name);
        replace(&to, &text, private)?;
        Ok(to)
    };
    let server = copy(&pki.server_chain, "server.pem", false)?;
    let key = copy(&pki.server_key, "server.key", true)?;
    let ca = copy(&device_ca.cert, "device-ca.pem", false)?;
    let tls = format!("certfile {}\nkeyfile {}\n", server.display(), key.display());
    let common = format!("acl_file {}\n", files.acl().display());
    let mut conf = String::new();
    let _ = write!(
        conf,
        "# Generated by `flotilla broker-config mosquitto`. The hub (`flotilla serve --mosquitto-dir {dir}`) keeps\n\
         # acl, passwd-devices, passwd-clients and devices.crl current and makes Mosquitto reload them (SIGHUP).\n\
         {user}per_listener_settings true\n\
         persistence true\n\
         persistence_location {data}/\n\
         pid_file {pid}\n\
         # A whole fleet's reports may queue for the hub at once; Mosquitto's default (1,000) would drop them.\n\
         max_queued_messages 100000\n\
         max_packet_size {max_packet}\n\n\
         # Devices with client certificates from the hub's device CA: the certificate's subject (the device id) is\n\
         # the username and the client id, so no device can pose as another or take over its session.\n\
         listener {cert_port} {bind}\n{tls}cafile {ca}\nrequire_certificate true\nuse_identity_as_username true\n\
         use_username_as_clientid true\ncrlfile {crl}\n{common}\n\
         # Devices with passwords (username: the device id; the client id is forced to it).\n\
         listener {password_port} {bind}\n{tls}password_file {pd}\nuse_username_as_clientid true\nallow_anonymous false\n{common}\n\
         # Enrollment (anonymous clients, confined to their own enrollment topics) and telemetry consumers.\n\
         listener {clients_port} {bind}\n{tls}password_file {pc}\nallow_anonymous {anon}\n{common}\n\
         # The hub and local tools, loopback only.\n\
         listener {local_port} 127.0.0.1\npassword_file {pc}\nallow_anonymous false\n{common}",
        dir = out.display(),
        user = layout
            .user
            .as_ref()
            .map_or(String::new(), |u| format!("user {u}\n")),
        data = out.join("data").display(),
        pid = files.pid().display(),
        max_packet = flotilla_shared::codec::MAX_ENVELOPE + 1024,
        cert_port = layout.cert_port,
        bind = layout.bind,
        ca = ca.display(),
        crl = files.crl().display(),
        password_port = layout.password_port,
        pd = files.passwd_devices().display(),
        clients_port = layout.clients_port,
        pc = files.passwd_clients().display(),
        anon = layout.anonymous_enrollment,
        local_port = layout.local_port,
    );
    replace(&files.conf(), &conf, false)?;
    let store = Store::open(&data.0)?;
    let hub_secret = crate::server::hub_mqtt_secret(data)?;
    write_dynamic(
        &store,
        &device_ca,
        &hub_secret,
        &files,
        crate::hub::unix_now(),
    )?;
    Ok(files)
}

/// How long a generated revocation list is valid; the hub rewrites it well before (OpenSSL refuses every
/// certificate once the list has expired).
pub const CRL_VALIDITY_SECS: u64 = 7 * 24 * 3600;
/// The hub rewrites the revocation list at least this often.
pub const CRL_REFRESH_SECS: u64 = 24 * 3600;

/// Writes the files that change with the fleet: the ACL, both password files and the revocation list.
pub fn write_dynamic(
    store: &Store,
    device_ca: &crate::pki::DeviceCa,
    hub_secret: &str,
    files: &Files,
    now: u64,
) -> Result<()> {
    use crate::access::policy::Principal;
    let lines = store.password_lines()?;
    let credentials = store.credentials()?;
    // One set, not a scan per password line: this runs after every enrollment burst at fleet size.
    let revoked_set: std::collections::HashSet<&str> = credentials
        .iter()
        .filter(|c| c.revoked)
        .map(|c| c.principal.as_str())
        .collect();
    let revoked = |p: &str| revoked_set.contains(p);
    let mut devices_pw = String::new();
    let mut clients_pw = format!("{}\n", password_line("hub", hub_secret));
    for (principal, line) in &lines {
        if revoked(principal) {
            continue;
        }
        let file = match Principal::parse(principal) {
            Some(Principal::Device(_)) => &mut devices_pw,
            Some(Principal::Feed(_)) => &mut clients_pw,
            _ => continue,
        };
        file.push_str(line);
        file.push('\n');
    }
    let mut acl = String::from(
        "# Generated by flotilla; rewritten as devices enroll, renew, rotate and are revoked.\n\
         # Enrollment: an anonymous client reaches only the topics named after its own client id (enroll-<nonce>).\n\
         pattern write flotilla/v1/enroll/%c/req\n\
         pattern read flotilla/v1/enroll/%c/resp\n\
         # Devices (username = device id): their own topics only.\n\
         pattern read flotilla/v1/dev/%u/desired\n\
         pattern read flotilla/v1/dev/%u/root\n\
         pattern read flotilla/v1/dev/%u/artifact/chunk\n\
         pattern read flotilla/v1/dev/%u/cert/resp\n\
         pattern read flotilla/v1/dev/%u/logs/req\n\
         pattern write flotilla/v1/dev/%u/report\n\
         pattern write flotilla/v1/dev/%u/presence\n\
         pattern write flotilla/v1/dev/%u/artifact/req\n\
         pattern write flotilla/v1/dev/%u/cert/req\n\
         pattern write flotilla/v1/dev/%u/logs/resp\n\n\
         user hub\ntopic readwrite flotilla/#\ntopic readwrite spBv1.0/#\n",
    );
    for c in &credentials {
        match Principal::parse(&c.principal) {
            Some(Principal::Device(id)) => {
                let _ = write!(acl, "\nuser {id}\n");
                if c.revoked {
                    acl.push_str("topic deny #\n");
                } else {
                    let region = store
                        .device(&id)?
                        .and_then(|d| d.inventory.region.map(|r| r.to_string()))
                        .unwrap_or_else(|| NO_REGION.to_owned());
                    let _ = writeln!(acl, "topic write flotilla/v1/telemetry/{region}/{id}/+");
                }
            }
            Some(Principal::Feed(name)) if !c.revoked => {
                let _ = write!(acl, "\nuser feed-{name}\n");
                for r in &c.regions {
                    let _ = writeln!(acl, "topic read flotilla/v1/telemetry/{r}/#");
                    let _ = writeln!(acl, "topic read flotilla/v1/feed/json/{r}/#");
                    let _ = writeln!(acl, "topic read spBv1.0/{r}/#");
                    let _ = writeln!(acl, "topic write spBv1.0/{r}/NCMD/+");
                }
            }
            _ => {}
        }
    }
    let serials: Vec<(Vec<u8>, u64)> = store
        .device_certs(now)?
        .into_iter()
        .filter_map(|c| c.retired_at.map(|at| (c.serial, at)))
        .collect();
    let crl = device_ca
        .crl(&serials, now, now, CRL_VALIDITY_SECS)
        .map_err(|e| anyhow::anyhow!("revocation list: {e}"))?;
    replace(&files.passwd_devices(), &devices_pw, true)?;
    replace(&files.passwd_clients(), &clients_pw, true)?;
    replace(&files.acl(), &acl, false)?;
    replace(&files.crl(), &crl, false)?;
    Ok(())
}

/// The hub's side: where it keeps Mosquitto's files current and how it makes Mosquitto reload them.
#[derive(Debug)]
pub struct Export {
    pub files: Files,
    pub device_ca: crate::pki::DeviceCa,
    pub hub_secret: String,
    /// A shell command that makes Mosquitto reload (e.g. `systemctl reload mosquitto`); without one, the hub sends
    /// SIGHUP to the pid in the directory's `mosquitto.pid` (the generated configuration writes it).
    pub reload: Option<String>,
    /// How the hub reaches Mosquitto (host, port, TLS), to end a revoked device's session.
    pub broker: Option<(String, u16, Option<flotilla_mqtt::TlsSettings>)>,
    dirty: bool,
    written_at: u64,
}

impl Export {
    pub fn new(
        dir: PathBuf,
        device_ca: crate::pki::DeviceCa,
        hub_secret: String,
        reload: Option<String>,
    ) -> Self {
        Self {
            files: Files { dir },
            device_ca,
            hub_secret,
            reload,
            broker: None,
            dirty: true,
            written_at: 0,
        }
    }

    /// Rewrites the files and reloads Mosquitto now (revocation does not wait for the next tick).
    pub fn sync_now(&mut self, store: &Store, now: u64) -> Result<()> {
        self.dirty = true;
        self.sync(store, now).map(|_| ())
    }

    /// Ends the live session of `client_id` by taking it over with the hub's own credentials (Mosquitto closes
    /// the older connection of a client id) and disconnecting at once. Mosquitto cannot disconnect a client from
    /// outside; with the files already reloaded, the device's reconnect is then refused.
    pub fn end_session(&self, client_id: &str) {
        let Some((host, port, tls)) = self.broker.clone() else {
            return;
        };
        let settings = flotilla_mqtt::LinkSettings {
            client_id: client_id.to_owned(),
            host,
            port,
            keepalive: std::time::Duration::from_secs(10),
            tls,
            credentials: Some(("hub".to_owned(), self.hub_secret.clone())),
            last_will: None,
            subscriptions: vec![],
            clean_session: true,
            queue: 16,
        };
        let id = client_id.to_owned();
        tokio::spawn(async move {
            let Ok((link, mut rx)) = flotilla_mqtt::connect(settings) else {
                return;
            };
            let connected = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while let Some(ev) = rx.recv().await {
                    if matches!(ev, flotilla_mqtt::LinkEvent::Connected) {
                        return true;
                    }
                }
                false
            })
            .await;
            link.disconnect().await;
            match connected {
                Ok(true) => tracing::info!(client_id = %id, "ended the session on mosquitto"),
                _ => tracing::warn!(client_id = %id, "could not end the session on mosquitto"),
            }
        });
    }

    /// Something the files show changed (an enrollment, new credentials, a revocation, a feed credential).
    pub fn changed(&mut self) {
        self.dirty = true;
    }

    /// Rewrites the files and reloads Mosquitto when something changed or the revocation list is due; called once
    /// a second by the hub loop.
    pub fn sync(&mut self, store: &Store, now: u64) -> Result<bool> {
        if !self.dirty && now < self.written_at + CRL_REFRESH_SECS {
            return Ok(false);
        }
        write_dynamic(store, &self.device_ca, &self.hub_secret, &self.files, now)?;
        self.dirty = false;
        self.written_at = now;
        self.reload_broker()?;
        Ok(true)
    }

    fn reload_broker(&self) -> Result<()> {
        let status = match &self.reload {
            Some(cmd) => std::process::Command::new("sh").arg("-c").arg(cmd).status(),
            None => {
                let Ok(pid) = std::fs::read_to_string(self.files.pid()) else {
                    // Mosquitto is not running from this directory (yet): it reads the files when it starts.
                    return Ok(());
                };
                std::process::Command::new("kill")
                    .arg("-HUP")
                    .arg(pid.trim())
                    .status()
            }
        }
        .context("running the Mosquitto reload command")?;
        anyhow::ensure!(
            status.success(),
            "the Mosquitto reload command failed: {status}"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Password lines have Mosquitto's `$7$` shape, and the hash is PBKDF2-HMAC-SHA512 of the password with the
    /// line's own salt (so `mosquitto` accepts the password and only it).
    #[test]
    fn password_lines_are_mosquittos_pbkdf2() {
        use base64::Engine as _;
        let line = password_line("gw-a", "s3cret");
        let parts: Vec<&str> = line.split('$').collect();
        assert_eq!(parts[..3], ["gw-a:", "7", "101"], "{line}");
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = b64.decode(parts[3]).expect("salt");
        let hash = b64.decode(parts[4]).expect("hash");
        assert_eq!((salt.len(), hash.len()), (12, 64));
        let iterations = std::num::NonZeroU32::new(101).expect("non-zero");
        for (password, ok) in [("s3cret", true), ("s3cret ", false)] {
            let verified = ring::pbkdf2::verify(
                ring::pbkdf2::PBKDF2_HMAC_SHA512,
                iterations,
                &salt,
                password.as_bytes(),
                &hash,
            );
            assert_eq!(verified.is_ok(), ok, "{password:?}");
        }
        assert_ne!(
            line,
            password_line("gw-a", "s3cret"),
            "a fresh salt each time"
        );
    }
}
