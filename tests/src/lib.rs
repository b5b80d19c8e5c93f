//! The fleet harness: starts a real hub (`flotilla serve`), a real broker (the hub's embedded one, or Mosquitto on a
//! free port), and N real `flotilla-agent` processes with temp data dirs, positions and labels, optionally each
//! behind its own fault proxy. Helpers wait on observable state with a patience budget; nothing sleeps and hopes.
//!
//! The binaries must be built first (`cargo build --workspace --bins`; the README's test command does it).

pub mod browser;
pub mod proxy;
pub mod sim;

use anyhow::{Context, Result, bail};
use flotilla_hub::client::Client;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Answers `-h`/`--help` for the harness's hand-parsed binaries: prints `usage` and exits 0 when asked.
pub fn answer_help(usage: &str) {
    if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        println!("{}", usage.trim());
        std::process::exit(0);
    }
}

/// Default patience for waits: generous, because CI machines are shared and builds may run alongside.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Directory holding `flotilla` and `flotilla-agent` (next to the test executable's `deps/` folder).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // Test binaries live in target/<profile>/deps, bench binaries beside the product binaries.
    let here = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if here.join("flotilla").exists() {
        here
    } else {
        here.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    for b in ["flotilla", "flotilla-agent"] {
        assert!(
            dir.join(b).exists(),
            "{} missing: run `cargo build --workspace --bins` first",
            dir.join(b).display()
        );
    }
    dir
}

/// Polls `f` until it returns `Some`, or fails after `patience` naming `what`.
pub fn wait_for<T>(what: &str, patience: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > patience {
            bail!("timed out after {:?} waiting for {what}", patience);
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// A seeded xorshift generator for fault campaigns: every run prints its seed so a failure replays exactly.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// A generator from `FLOTILLA_SEED` if set, else `default`; prints the seed.
    pub fn from_env(what: &str, default: u64) -> Self {
        let seed = std::env::var("FLOTILLA_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default);
        println!("{what} seed {seed} (replay with FLOTILLA_SEED={seed})");
        Self(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A free loopback port (bound, then released; the owner binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}

/// Which broker the fleet uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Embedded,
    Mosquitto,
    /// Mosquitto with a plain listener for the hub and a TLS listener (test CA) that the agents use (`mqtts://`).
    MosquittoTls,
    /// The embedded broker with its TLS listener requiring client certificates (mutual TLS, test CA): the agents
    /// use `mqtts://` with a device certificate; the hub's own link stays on the plain loopback listener.
    EmbeddedTls,
    /// Mosquitto started from `flotilla broker-config mosquitto`, kept current by the hub (`--mosquitto-dir`):
    /// agents enroll anonymously on its clients listener and connect with their issued certificate (or, with
    /// [`AgentSpec::password_auth`], their password) over TLS, pinned by their token.
    MosquittoSecure,
}

/// The listeners of a Mosquitto started from the generated configuration.
#[derive(Debug, Clone)]
pub struct SecurePorts {
    pub cert: u16,
    pub password: u16,
    pub clients: u16,
    pub local: u16,
    /// The generated configuration directory.
    pub dir: PathBuf,
}

/// A child process killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// Sends SIGTERM (graceful stop) and waits for the exit status.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A Mosquitto broker on a free loopback port (and optionally a TLS listener with a freshly made test CA).
#[derive(Debug)]
pub struct Mosquitto {
    pub proc: Proc,
    pub port: u16,
    /// (TLS port, CA certificate file) when started with TLS.
    pub tls: Option<(u16, PathBuf)>,
    /// The listeners, when started from the configuration `flotilla broker-config mosquitto` wrote.
    pub secure: Option<SecurePorts>,
}

/// A test CA with a server certificate for `localhost`/127.0.0.1 and a client (device) certificate, as PEM files.
#[derive(Debug, Clone)]
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Writes a fresh [`TestPki`] into `dir`.
pub fn test_pki(dir: &Path) -> Result<TestPki> {
    std::fs::create_dir_all(dir)?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "flotilla test CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    let cert = params.signed_by(&key, &issuer)?;
    let client_key = rcgen::KeyPair::generate()?;
    let mut client_params = rcgen::CertificateParams::new(vec!["device.flotilla.test".to_owned()])?;
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &issuer)?;
    let pki = TestPki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    std::fs::write(&pki.ca, ca.pem())?;
    std::fs::write(&pki.server_cert, cert.pem())?;
    std::fs::write(&pki.server_key, key.serialize_pem())?;
    std::fs::write(&pki.client_cert, client.pem())?;
    std::fs::write(&pki.client_key, client_key.serialize_pem())?;
    Ok(pki)
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_with(dir, false)
    }

    pub fn start_with(dir: &Path, tls: bool) -> Result<Self> {
        retry_mosquitto(|| Self::try_start_with(dir, tls))
    }

    fn try_start_with(dir: &Path, tls: bool) -> Result<Self> {
        let port = free_port();
        std::fs::create_dir_all(dir)?;
        let conf = dir.join("mosquitto.conf");
        let mut text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_packet_size 200000\npersistence false\n"
        );
        let tls = if tls {
            let pki = test_pki(dir)?;
            let tls_port = free_port();
            text += &format!(
                "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
                pki.ca.display(),
                pki.server_cert.display(),
                pki.server_key.display()
            );
            Some((tls_port, pki.ca))
        } else {
            None
        };
        std::fs::write(&conf, text)?;
        Ok(Self {
            proc: spawn_mosquitto(&conf, port)?,
            port,
            tls,
            secure: None,
        })
    }

    /// Writes the configuration for the hub data directory `hub_dir` (initialised) with
    /// `flotilla broker-config mosquitto` into `dir`, on free loopback ports, and starts Mosquitto from it.
    pub fn start_generated(hub_dir: &Path, dir: &Path) -> Result<Self> {
        retry_mosquitto(|| Self::try_start_generated(hub_dir, dir))
    }

    fn try_start_generated(hub_dir: &Path, dir: &Path) -> Result<Self> {
        let (cert, password, clients, local) = (free_port(), free_port(), free_port(), free_port());
        let mut cmd = Command::new(bin_dir().join("flotilla"));
        cmd.args(["broker-config", "mosquitto", "--bind", "127.0.0.1"])
            .arg("--data-dir")
            .arg(hub_dir)
            .arg("--out")
            .arg(dir)
            .args(["--cert-port", &cert.to_string()])
            .args(["--password-port", &password.to_string()])
            .args(["--clients-port", &clients.to_string()])
            .args(["--local-port", &local.to_string()]);
        // As root, Mosquitto would switch to its own user, which cannot read a test's temporary files.
        if rustix_is_root() {
            cmd.args(["--user", "root"]);
        }
        let status = cmd.stdout(Stdio::null()).status()?;
        if !status.success() {
            bail!("flotilla broker-config mosquitto failed");
        }
        Ok(Self {
            proc: spawn_mosquitto(&dir.join("mosquitto.conf"), local)?,
            port: local,
            tls: None,
            secure: Some(SecurePorts {
                cert,
                password,
                clients,
                local,
                dir: dir.to_owned(),
            }),
        })
    }
}

/// Starts Mosquitto on `conf` (its log beside it) and waits until it listens on `port`.
fn spawn_mosquitto(conf: &Path, port: u16) -> Result<Proc> {
    let log = conf.with_file_name("mosquitto.log");
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting mosquitto (apt-get install mosquitto)")?;
    let mut proc = Proc { child, log };
    // Mosquitto exits at once when a port it was given was taken in the meantime (the ports come from
    // `free_port`, which races with every other test); that is reported as `Exited` so the caller can retry
    // on fresh ports instead of waiting out the patience.
    let up = wait_for("mosquitto to listen", PATIENCE, || {
        if let Ok(Some(status)) = proc.child.try_wait() {
            return Some(Err(status));
        }
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| Ok(()))
    })?;
    match up {
        Ok(()) => Ok(proc),
        Err(status) => Err(MosquittoExited {
            status: status.to_string(),
            log: proc.log_text(),
        }
        .into()),
    }
}

/// Mosquitto exited before it listened (its log says why; usually a port taken since `free_port`).
#[derive(Debug)]
struct MosquittoExited {
    status: String,
    log: String,
}

impl std::fmt::Display for MosquittoExited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mosquitto exited before listening ({}): {}",
            self.status, self.log
        )
    }
}

impl std::error::Error for MosquittoExited {}

/// Runs `start` up to three times while Mosquitto exits before listening, each time on fresh ports.
fn retry_mosquitto<T>(mut start: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match start() {
            Err(e) if attempt < 3 && e.downcast_ref::<MosquittoExited>().is_some() => {
                eprintln!("retrying on fresh ports: {e:#}");
            }
            other => return other,
        }
    }
}

/// Whether this process runs as root (`id -u`).
fn rustix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A running hub.
#[derive(Debug)]
pub struct Hub {
    pub proc: Proc,
    pub dir: PathBuf,
    pub api: String,
    pub mqtt_port: u16,
    pub client: Client,
    http: SocketAddr,
    broker: Option<ExternalBroker>,
    /// The embedded broker's TLS listener port and the PKI it uses, for [`BrokerKind::EmbeddedTls`].
    pub embedded_tls: Option<(u16, TestPki)>,
    /// More `flotilla serve` arguments, kept for restarts.
    extra_args: Vec<String>,
}

/// How a hub reaches an external broker: its URL (`mqtt://` or `mqtts://`), the CA for TLS, and the broker's
/// plain port that test clients use.
#[derive(Debug, Clone)]
pub struct ExternalBroker {
    pub url: String,
    pub ca: Option<PathBuf>,
    pub plain_port: u16,
}

impl Hub {
    /// Runs the operator CLI (`flotilla ARGS..`) against this hub as the admin: its stdout, or an error with its
    /// stderr when it exits non-zero.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(bin_dir().join("flotilla"))
            .args(args)
            .env("FLOTILLA_SERVER", &self.api)
            .env("FLOTILLA_TOKEN_FILE", self.dir.join("admin.token"))
            .env("FLOTILLA_CONFIG", "/nonexistent/cli.toml")
            .output()
            .context("running flotilla")?;
        if !out.status.success() {
            bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn(
        dir: &Path,
        http: SocketAddr,
        mqtt: SocketAddr,
        broker: &Option<ExternalBroker>,
        embedded_tls: &Option<(u16, TestPki)>,
        extra_args: &[String],
    ) -> Result<Proc> {
        let mut cmd = Command::new(bin_dir().join("flotilla"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .arg("--http")
            .arg(http.to_string())
            .args(extra_args);
        match broker {
            Some(b) => {
                cmd.arg("--broker").arg(&b.url);
                if let Some(ca) = &b.ca {
                    cmd.arg("--broker-ca").arg(ca);
                }
            }
            None => {
                cmd.arg("--mqtt").arg(mqtt.to_string());
                if let Some((port, pki)) = embedded_tls {
                    cmd.arg("--mqtt-tls")
                        .arg(format!("127.0.0.1:{port}"))
                        .arg("--mqtt-tls-cert")
                        .arg(&pki.server_cert)
                        .arg("--mqtt-tls-key")
                        .arg(&pki.server_key)
                        .arg("--mqtt-client-ca")
                        .arg(&pki.ca);
                } else {
                    // The default TLS listener (0.0.0.0:8883) on a free loopback port, so hubs run side by side.
                    cmd.arg("--mqtt-tls").arg("127.0.0.1:0");
                }
            }
        }
        let log = dir.with_extension("log");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)?,
            )
            .spawn()?;
        Ok(Proc { child, log })
    }

    /// Starts a hub with a fresh data directory.
    pub fn start(dir: &Path, broker: Option<ExternalBroker>) -> Result<Self> {
        Self::start_with(dir, broker, None, vec![])
    }

    /// Like [`Hub::start`], with the embedded broker's TLS listener on the given port and PKI.
    pub fn start_with(
        dir: &Path,
        broker: Option<ExternalBroker>,
        embedded_tls: Option<(u16, TestPki)>,
        extra_args: Vec<String>,
    ) -> Result<Self> {
        Self::init(dir)?;
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mqtt: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let proc = Self::spawn(dir, http, mqtt, &broker, &embedded_tls, &extra_args)?;
        let (api, mqtt_url) = wait_for("hub endpoints", PATIENCE, || {
            flotilla_hub::server::read_endpoints(dir)
        })?;
        let mqtt_port = match &broker {
            Some(b) => b.plain_port,
            None => mqtt_url
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .context("mqtt port")?,
        };
        let token = std::fs::read_to_string(dir.join("admin.token"))?;
        let client = Client::new(&api, &token);
        wait_for("hub API", PATIENCE, || client.get("/api/v1/devices").ok())?;
        Ok(Self {
            proc,
            dir: dir.to_owned(),
            api,
            mqtt_port,
            client,
            http,
            broker,
            embedded_tls,
            extra_args,
        })
    }

    /// `flotilla init` on `dir`, unless it is initialised already.
    pub fn init(dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        if dir.join("admin.token").exists() {
            return Ok(());
        }
        let status = Command::new(bin_dir().join("flotilla"))
            .arg("init")
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("flotilla init failed");
        }
        Ok(())
    }

    /// Kills the hub with SIGKILL and starts it again on the same ports and data directory.
    pub fn restart_kill9(&mut self) -> Result<()> {
        self.proc.kill9();
        let _ = std::fs::remove_file(self.dir.join("endpoints.txt"));
        let mqtt: SocketAddr = format!("127.0.0.1:{}", self.mqtt_port).parse()?;
        self.proc = Self::spawn(
            &self.dir,
            self.http,
            mqtt,
            &self.broker,
            &self.embedded_tls,
            &self.extra_args,
        )?;
        wait_for("hub endpoints after restart", PATIENCE, || {
            flotilla_hub::server::read_endpoints(&self.dir)
        })?;
        wait_for("hub API after restart", PATIENCE, || {
            self.client.get("/api/v1/devices").ok()
        })?;
        Ok(())
    }

    /// The port of the hub's device TLS listener (the default one, with the certificate `flotilla init` made).
    pub fn mqtts_port(&self) -> Option<u16> {
        let text = std::fs::read_to_string(self.dir.join("endpoints.txt")).ok()?;
        let url = text
            .lines()
            .find_map(|l| l.strip_prefix("mqtts=mqtts://"))?;
        url.rsplit_once(':')?.1.parse().ok()
    }

    /// A client with the hub's own MQTT credentials: what a compromised broker or a misbehaving privileged tool
    /// can do (trust tests inject forged documents this way; the broker lets nobody else publish them).
    pub fn privileged_client(&self, subscriptions: &[&str]) -> Result<TestClient> {
        let secret = std::fs::read_to_string(self.dir.join("mqtt-hub.secret"))?;
        TestClient::connect_with(
            self.mqtt_port,
            &format!(
                "flotilla-hub-test-{}",
                flotilla_shared::trust::random_hex(4)
            ),
            Some(("hub".into(), secret.trim().to_owned())),
            subscriptions,
        )
    }

    /// A feed credential for `regions`, created through the API: (username, password, client id).
    pub fn feed_credential(
        &self,
        name: &str,
        regions: &[&str],
    ) -> Result<(String, String, String)> {
        let body = serde_json::json!({"name": name, "regions": regions});
        let c = self.client.post(
            "/api/v1/feed-credentials",
            "application/json",
            body.to_string().as_bytes(),
            &[],
        )?;
        let field =
            |k: &str| -> Result<String> { Ok(c[k].as_str().context(k.to_owned())?.to_owned()) };
        Ok((field("username")?, field("password")?, field("client_id")?))
    }

    /// A read-only telemetry consumer for `regions`, with a credential created through the API.
    pub fn feed_client(
        &self,
        name: &str,
        regions: &[&str],
        subscriptions: &[&str],
    ) -> Result<TestClient> {
        let (user, pass, id) = self.feed_credential(name, regions)?;
        TestClient::connect_with(self.mqtt_port, &id, Some((user, pass)), subscriptions)
    }

    pub fn release_key(&self) -> PathBuf {
        self.dir.join("keys/release.key")
    }

    pub fn enroll_token(
        &self,
        region: &str,
        zone: &str,
        labels: &[(&str, &str)],
    ) -> Result<String> {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect();
        let body =
            serde_json::json!({"region": region, "zone": zone, "labels": labels, "ttl_secs": 600});
        let v = self.client.post(
            "/api/v1/enrollment-tokens",
            "application/json",
            body.to_string().as_bytes(),
            &[],
        )?;
        Ok(v["token"].as_str().context("token")?.to_owned())
    }

    /// Signs `wasm` as release `name@version` (epoch) with the hub's release key, uploads artifact and release.
    pub fn push_release(
        &self,
        name: &str,
        version: &str,
        epoch: u32,
        wasm: &[u8],
    ) -> Result<String> {
        let path = self.dir.join(format!("{name}-{version}.wasm"));
        std::fs::write(&path, wasm)?;
        self.push_kind(name, version, epoch, "wasm", &path, None, &[])
    }

    /// Signs the container image tarball at `tar` (`docker save` output) as release `name@version`, uploading
    /// the canonical tarball the release names.
    pub fn push_container(
        &self,
        name: &str,
        version: &str,
        epoch: u32,
        tar: &Path,
    ) -> Result<String> {
        self.push_kind(name, version, epoch, "container", tar, None, &[])
    }

    /// As [`Hub::push_container`], offering the image from `registry` too (`REGISTRY/REPO@sha256:...`).
    pub fn push_container_with_registry(
        &self,
        name: &str,
        version: &str,
        epoch: u32,
        tar: &Path,
        registry: &str,
    ) -> Result<String> {
        self.push_kind(name, version, epoch, "container", tar, Some(registry), &[])
    }

    /// Signs and uploads a WASM module with variants precompiled for `targets` (`release push --precompile`).
    pub fn push_wasm_precompiled(
        &self,
        name: &str,
        version: &str,
        epoch: u32,
        wasm: &Path,
        targets: &[&str],
    ) -> Result<String> {
        self.push_kind(name, version, epoch, "wasm", wasm, None, targets)
    }

    /// Signs and uploads a firmware image or agent binary (`kind`) for the hardware `compatible` names.
    pub fn push_system(
        &self,
        name: &str,
        version: &str,
        epoch: u32,
        kind: &str,
        path: &Path,
        compatible: &str,
    ) -> Result<String> {
        self.push_signed(
            name,
            version,
            epoch,
            kind,
            path,
            None,
            &[],
            Some(compatible),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn push_kind(
        &self,
        name: &str,
        version: &str,
        epoch: u32,
        kind: &str,
        path: &Path,
        registry: Option<&str>,
        precompile: &[&str],
    ) -> Result<String> {
        self.push_signed(name, version, epoch, kind, path, registry, precompile, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn push_signed(
        &self,
        name: &str,
        version: &str,
        epoch: u32,
        kind: &str,
        path: &Path,
        registry: Option<&str>,
        precompile: &[&str],
        compatible: Option<&str>,
    ) -> Result<String> {
        let sign = flotilla_hub::keys_cli::ReleaseSign {
            compatible: compatible.map(str::to_owned),
            artifact: path.to_owned(),
            name: name.into(),
            version: version.into(),
            epoch,
            kind: kind.into(),
            keys: vec![self.release_key()],
            registry: registry.map(str::to_owned),
            precompile: precompile.iter().map(|t| (*t).to_owned()).collect(),
            out: None,
        };
        let signed = flotilla_hub::keys_cli::sign_release(&sign)?;
        for blob in std::iter::once(&signed.artifact).chain(&signed.variants) {
            self.client
                .post("/api/v1/artifacts", "application/octet-stream", blob, &[])?;
        }
        let signed = signed.signed;
        let v = self.client.post(
            "/api/v1/releases",
            "application/octet-stream",
            &postcard::to_stdvec(&signed)?,
            &[],
        )?;
        Ok(v["digest"].as_str().context("digest")?.to_owned())
    }

    pub fn apply(&self, spec: &str) -> Result<Value> {
        self.client.post(
            "/api/v1/deployments",
            "application/toml",
            spec.as_bytes(),
            &[("x-flotilla-spec-file", "spec.toml")],
        )
    }

    pub fn device(&self, id: &str) -> Option<Value> {
        self.client.get(&format!("/api/v1/devices/{id}")).ok()
    }

    /// The observed state of `workload` on `device` from the device's last report ("running", "downloading", ..).
    pub fn workload_state(&self, device: &str, workload: &str) -> Option<String> {
        let d = self.device(device)?;
        d["workloads"]
            .as_array()?
            .iter()
            .find(|w| w["name"] == workload)
            .and_then(|w| w["state"].as_str().map(str::to_owned))
    }

    pub fn wait_workload(&self, device: &str, workload: &str, state: &str) -> Result<()> {
        wait_for(&format!("{device}/{workload} {state}"), PATIENCE, || {
            (self.workload_state(device, workload).as_deref() == Some(state)).then_some(())
        })
    }
}

/// What one agent looks like.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub id: String,
    pub region: String,
    pub zone: String,
    pub lat: f64,
    pub lon: f64,
    pub labels: Vec<(String, String)>,
    /// Read the position from this file (written by the test) instead of a static one.
    pub position_file: bool,
    /// Extra top-level TOML lines for the agent config (placed before any table).
    pub extra_config: String,
    /// Extra lines for the agent config's `[limits]` table (e.g. `max_data_mib = 8`).
    pub extra_limits: String,
    /// Lines for the agent config's `[container]` table (e.g. `secrets_dir = "/dev/shm/x"`).
    pub container_config: String,
    /// Connect to the hub's default TLS listener with no `[tls]` table: the enrollment token's CA fingerprint is
    /// all the agent has to verify the broker.
    pub pinned_tls: bool,
    /// With [`BrokerKind::MosquittoSecure`]: connect on the password listener instead of with a certificate.
    pub password_auth: bool,
    /// Run this agent binary instead of the workspace's (an aarch64 build, a build without the compiler).
    pub binary: Option<PathBuf>,
    /// Run the binary through this command (e.g. `qemu-aarch64-static -L /usr/aarch64-linux-gnu`).
    pub launcher: Vec<String>,
}

impl AgentSpec {
    pub fn new(id: &str, region: &str, lat: f64, lon: f64) -> Self {
        Self {
            id: id.into(),
            region: region.into(),
            zone: format!("{region}-a"),
            lat,
            lon,
            labels: vec![("role".into(), "gateway".into())],
            position_file: false,
            extra_config: String::new(),
            extra_limits: String::new(),
            container_config: String::new(),
            pinned_tls: false,
            password_auth: false,
            binary: None,
            launcher: vec![],
        }
    }
}

/// A running (or stopped) agent process and its files.
#[derive(Debug)]
pub struct Agent {
    pub spec: AgentSpec,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub proc: Option<Proc>,
    pub proxy: Option<proxy::Proxy>,
    /// More environment for the agent process (from its next start).
    pub env: Vec<(String, String)>,
    starts: u32,
}

impl Agent {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Starts (or restarts) the agent process.
    pub fn start(&mut self) -> Result<()> {
        self.starts += 1;
        let log = self.dir.join(format!("agent-{}.log", self.starts));
        let binary = (self.spec.binary.clone()).unwrap_or_else(|| bin_dir().join("flotilla-agent"));
        let mut cmd = match self.spec.launcher.split_first() {
            Some((launcher, args)) => {
                let mut c = Command::new(launcher);
                c.args(args).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .env("FLOTILLA_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        self.proc = Some(Proc { child, log });
        Ok(())
    }

    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// The current run's log (JSON lines).
    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// Waits until the current run's log has at least `n` lines containing every one of `needles`.
    pub fn wait_log(&self, needles: &[&str], n: usize) -> Result<()> {
        wait_for(
            &format!("{} log {needles:?} x{n}", self.spec.id),
            PATIENCE,
            || {
                (self
                    .log()
                    .lines()
                    .filter(|l| needles.iter().all(|x| l.contains(x)))
                    .count()
                    >= n)
                    .then_some(())
            },
        )
    }

    pub fn set_position(&self, lat: f64, lon: f64) -> Result<()> {
        let path = self.dir.join("position.json");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{{\"lat\": {lat}, \"lon\": {lon}}}"))?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

/// A fleet under test.
#[derive(Debug)]
pub struct Fleet {
    pub root: tempfile::TempDir,
    pub mosquitto: Option<Mosquitto>,
    pub hub: Hub,
    pub agents: Vec<Agent>,
}

/// Builds a [`Fleet`].
#[derive(Debug)]
pub struct FleetBuilder {
    broker: BrokerKind,
    agents: Vec<AgentSpec>,
    proxies: bool,
    hub_args: Vec<String>,
}

impl Default for FleetBuilder {
    fn default() -> Self {
        Self {
            broker: BrokerKind::Embedded,
            agents: vec![],
            proxies: false,
            hub_args: vec![],
        }
    }
}

impl FleetBuilder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn broker(mut self, b: BrokerKind) -> Self {
        self.broker = b;
        self
    }
    pub fn agent(mut self, a: AgentSpec) -> Self {
        self.agents.push(a);
        self
    }
    /// Passes more arguments to `flotilla serve`.
    pub fn hub_args(mut self, args: &[&str]) -> Self {
        self.hub_args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }
    /// Puts a fault proxy between each agent and the broker.
    pub fn with_proxies(mut self) -> Self {
        self.proxies = true;
        self
    }

    /// Starts everything and waits until every agent has enrolled and reported.
    pub fn start(self) -> Result<Fleet> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let root = tempfile::tempdir()?;
        let mosquitto = match self.broker {
            BrokerKind::Mosquitto => Some(Mosquitto::start(&root.path().join("mosquitto"))?),
            BrokerKind::MosquittoTls => {
                Some(Mosquitto::start_with(&root.path().join("mosquitto"), true)?)
            }
            BrokerKind::MosquittoSecure => {
                Hub::init(&root.path().join("hub"))?;
                Some(Mosquitto::start_generated(
                    &root.path().join("hub"),
                    &root.path().join("mosquitto"),
                )?)
            }
            BrokerKind::Embedded | BrokerKind::EmbeddedTls => None,
        };
        let mut hub_args = self.hub_args;
        if let Some(sp) = mosquitto.as_ref().and_then(|m| m.secure.as_ref()) {
            hub_args.push("--mosquitto-dir".into());
            hub_args.push(sp.dir.display().to_string());
        }
        let tls = mosquitto.as_ref().and_then(|m| m.tls.clone());
        // With a TLS listener the hub itself connects over mqtts:// too.
        let external = mosquitto.as_ref().map(|m| match &m.tls {
            Some((tls_port, ca)) => ExternalBroker {
                url: format!("mqtts://localhost:{tls_port}"),
                ca: Some(ca.clone()),
                plain_port: m.port,
            },
            None => ExternalBroker {
                url: format!("mqtt://127.0.0.1:{}", m.port),
                ca: None,
                plain_port: m.port,
            },
        });
        let embedded_tls = match self.broker {
            BrokerKind::EmbeddedTls => Some((free_port(), test_pki(&root.path().join("pki"))?)),
            _ => None,
        };
        let hub = Hub::start_with(&root.path().join("hub"), external, embedded_tls, hub_args)?;
        let mut agents = Vec::new();
        for spec in self.agents {
            let dir = root.path().join("agents").join(&spec.id);
            std::fs::create_dir_all(&dir)?;
            let proxy = if self.proxies {
                Some(proxy::Proxy::start(("127.0.0.1", hub.mqtt_port))?)
            } else {
                None
            };
            let port = proxy.as_ref().map_or(hub.mqtt_port, |p| p.port());
            let secure = mosquitto.as_ref().and_then(|m| m.secure.clone());
            let enroll_line = secure.as_ref().map_or(String::new(), |sp| {
                format!("enroll_broker = \"mqtts://localhost:{}\"\n", sp.clients)
            });
            let (scheme, host, port, tls_table) = match (&tls, &hub.embedded_tls) {
                // The generated Mosquitto: enroll on its clients listener, then certificate or password.
                _ if secure.is_some() => {
                    let sp = secure.as_ref().context("secure ports")?;
                    let port = if spec.password_auth {
                        sp.password
                    } else {
                        sp.cert
                    };
                    ("mqtts", "localhost", port, String::new())
                }
                (Some((tls_port, ca)), _) => (
                    "mqtts",
                    "localhost",
                    *tls_port,
                    format!("[tls]\nca_file = \"{}\"\n", ca.display()),
                ),
                (None, Some((tls_port, pki))) => (
                    "mqtts",
                    "localhost",
                    *tls_port,
                    format!(
                        "[tls]\nca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
                        pki.ca.display(),
                        pki.client_cert.display(),
                        pki.client_key.display()
                    ),
                ),
                // The hub's default device listener, pinned by the CA fingerprint in the token alone.
                (None, None) if spec.pinned_tls => (
                    "mqtts",
                    "localhost",
                    hub.mqtts_port().context("the hub's TLS listener")?,
                    String::new(),
                ),
                (None, None) => ("mqtt", "127.0.0.1", port, String::new()),
            };
            let labels: Vec<(&str, &str)> = spec
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let token = hub.enroll_token(&spec.region, &spec.zone, &labels)?;
            let position = if spec.position_file {
                format!(
                    "[position]\nfile = \"{}\"\n",
                    dir.join("position.json").display()
                )
            } else {
                format!("[position]\nlat = {}\nlon = {}\n", spec.lat, spec.lon)
            };
            let config = dir.join("agent.toml");
            std::fs::write(
                &config,
                format!(
                    "version = 1\n{}device_id = \"{}\"\ndata_dir = \"{}\"\nbroker = \"{scheme}://{host}:{port}\"\nenroll_token = \"{token}\"\n{enroll_line}\
                     region = \"{}\"\nzone = \"{}\"\n{position}\n[limits]\nkeepalive_secs = 5\nreport_interval_secs = 5\n{}\n\
                     [telemetry]\nmetrics_interval_secs = 3600\n[container]\n{}\n{tls_table}",
                    spec.extra_config,
                    spec.id,
                    dir.join("state").display(),
                    spec.region,
                    spec.zone,
                    spec.extra_limits,
                    spec.container_config,
                ),
            )?;
            let mut agent = Agent {
                spec,
                dir,
                config,
                proc: None,
                proxy,
                env: vec![],
                starts: 0,
            };
            if agent.spec.position_file {
                agent.set_position(agent.spec.lat, agent.spec.lon)?;
            }
            agent.start()?;
            agents.push(agent);
        }
        for a in &agents {
            wait_for(
                &format!("{} to enroll and report", a.spec.id),
                PATIENCE,
                || {
                    hub.device(&a.spec.id)
                        .filter(|d| d["online"] == true && d["agent_version"].is_string())
                },
            )?;
        }
        Ok(Fleet {
            root,
            mosquitto,
            hub,
            agents,
        })
    }
}

impl Fleet {
    pub fn agent(&self, id: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.spec.id == id)
            .unwrap_or_else(|| panic!("no agent {id}"))
    }
    pub fn agent_mut(&mut self, id: &str) -> &mut Agent {
        self.agents
            .iter_mut()
            .find(|a| a.spec.id == id)
            .unwrap_or_else(|| panic!("no agent {id}"))
    }
    /// The broker port tests connect their own MQTT clients to.
    pub fn broker_port(&self) -> u16 {
        self.hub.mqtt_port
    }
}

/// The committed prebuilt firmware modules.
pub fn firmware(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../firmware-images/wasm")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A raw MQTT client for tests: subscribe to feeds, inject messages.
pub struct TestClient {
    pub link: flotilla_mqtt::Link,
    pub rx: tokio::sync::mpsc::Receiver<flotilla_mqtt::LinkEvent>,
    pub rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for TestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestClient")
    }
}

impl TestClient {
    /// An anonymous client (the embedded broker refuses it unless it is an enrollment, `enroll-<nonce>`).
    pub fn connect(port: u16, subscriptions: &[&str]) -> Result<Self> {
        Self::connect_with(
            port,
            &format!("test-{}", flotilla_shared::trust::random_hex(4)),
            None,
            subscriptions,
        )
    }

    /// A client with `client_id` and, when given, (username, password). Fails at once when the broker refuses the
    /// connection.
    pub fn connect_with(
        port: u16,
        client_id: &str,
        credentials: Option<(String, String)>,
        subscriptions: &[&str],
    ) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let settings = flotilla_mqtt::LinkSettings {
            client_id: client_id.to_owned(),
            host: "127.0.0.1".into(),
            port,
            keepalive: Duration::from_secs(30),
            tls: None,
            credentials,
            last_will: None,
            subscriptions: subscriptions.iter().map(|s| (*s).to_owned()).collect(),
            clean_session: true,
            queue: flotilla_mqtt::QUEUE,
        };
        let (link, mut rx) = rt.block_on(async { flotilla_mqtt::connect(settings) })?;
        let connected = rt.block_on(async {
            tokio::time::timeout(PATIENCE, async {
                while let Some(ev) = rx.recv().await {
                    match ev {
                        flotilla_mqtt::LinkEvent::Connected => return Ok(()),
                        flotilla_mqtt::LinkEvent::Disconnected(e) => return Err(e),
                        flotilla_mqtt::LinkEvent::Message { .. } => {}
                    }
                }
                Err("link closed".to_owned())
            })
            .await
        });
        match connected {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                rt.block_on(link.disconnect());
                bail!("test client {client_id} refused: {e}")
            }
            Err(_) => bail!("test client {client_id}: no CONNACK in time"),
        }
        // Give the broker a moment to register the subscriptions sent right after CONNACK.
        std::thread::sleep(Duration::from_millis(200));
        Ok(Self { link, rx, rt })
    }

    /// The next message within `patience`, if any.
    pub fn next_message(&mut self, patience: Duration) -> Option<(String, Vec<u8>)> {
        let rx = &mut self.rx;
        self.rt.block_on(async {
            tokio::time::timeout(patience, async {
                loop {
                    match rx.recv().await {
                        Some(flotilla_mqtt::LinkEvent::Message { topic, payload }) => {
                            return Some((topic, payload));
                        }
                        Some(_) => continue,
                        None => return None,
                    }
                }
            })
            .await
            .ok()
            .flatten()
        })
    }

    pub fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<()> {
        use flotilla_mqtt::Publisher;
        let _g = self.rt.enter();
        self.link.publish(topic, payload, retain)?;
        Ok(())
    }
}

/// Builds a tiny container image from Debian's `busybox-static` (no registry is reachable here): a rootfs with
/// `/bin/busybox` and its applets, `docker import`ed, `docker save`d to `dir/NAME.tar`, then removed from the
/// engine again so that the agent has to load it from the signed tarball.
pub fn busybox_image(dir: &Path, name: &str) -> Result<PathBuf> {
    busybox_image_with(dir, name, r#"CMD ["/bin/sh"]"#)
}

/// [`busybox_image`] with the image's default command set by `cmd` (a Dockerfile `CMD` line).
pub fn busybox_image_with(dir: &Path, name: &str, cmd: &str) -> Result<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    anyhow::ensure!(
        busybox.exists(),
        "/bin/busybox missing (apt-get install busybox-static)"
    );
    let root = dir.join(format!("{name}-rootfs"));
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::create_dir_all(root.join("tmp"))?;
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    for applet in [
        "sh", "sleep", "echo", "cat", "ls", "true", "false", "yes", "head", "dd",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    // The host API client, with the shared libraries it links (busybox's rootfs has no libc).
    let client = bin_dir().join("api-client");
    std::fs::copy(&client, root.join("bin/api-client"))?;
    let ldd = Command::new("ldd").arg(&client).output()?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dest = root.join(lib.trim_start_matches('/'));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(lib, &dest)?;
    }
    let tag = format!("flotilla-test/{name}:{}", std::process::id());
    let mut tar_proc = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()?;
    let rootfs = tar_proc.stdout.take().context("tar stdout")?;
    let import = Command::new("docker")
        .args(["import", "-c", cmd, "-", &tag])
        .stdin(rootfs)
        .stdout(Stdio::null())
        .status()?;
    let _ = tar_proc.wait();
    anyhow::ensure!(import.success(), "docker import failed");
    let tar = dir.join(format!("{name}.tar"));
    let saved = Command::new("docker")
        .args(["save", "-o"])
        .arg(&tar)
        .arg(&tag)
        .status()?;
    let _ = Command::new("docker")
        .args(["rmi", "-f", &tag])
        .stdout(Stdio::null())
        .status();
    anyhow::ensure!(saved.success(), "docker save failed");
    Ok(tar)
}

/// Version `n` of the image `base` (`docker save` output): one more layer holding `/version` with `n` in it, so
/// every variant is a distinct image (config digest) sharing the base's layers. Written as a canonical tarball at
/// `out`, without a round trip through the engine (fast enough for tens of versions).
pub fn image_variant(base: &Path, n: u32, out: &Path) -> Result<PathBuf> {
    let mut parts = flotilla_hub::image_import::read_source(std::io::BufReader::new(
        std::fs::File::open(base)?,
    ))?;
    let mut layer = tar::Builder::new(Vec::new());
    let body = format!("{n}\n");
    let mut header = tar::Header::new_gnu();
    header.set_size(body.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    layer.append_data(&mut header, "version", body.as_bytes())?;
    let layer = layer.into_inner()?;
    let mut config: Value = serde_json::from_slice(&parts.config)?;
    let diff_id = format!("sha256:{}", flotilla_shared::Digest::of(&layer).to_hex());
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .context("base config has no diff_ids")?
        .push(Value::from(diff_id));
    if let Some(history) = config["history"].as_array_mut() {
        history.push(serde_json::json!({"created_by": format!("flotilla test version {n}")}));
    }
    parts.config = serde_json::to_vec(&config)?;
    parts.layers.push(layer);
    let (bytes, _) = flotilla_shared::image::write_canonical(&parts)
        .map_err(|e| anyhow::anyhow!("variant {n}: {e}"))?;
    let path = out.join(format!("variant-{n}.tar"));
    std::fs::write(&path, bytes)?;
    Ok(path)
}

/// Whether the engine has `image` (an ID or a reference).
pub fn image_present(image: &str) -> bool {
    !docker(&["image", "inspect", "-f", "{{.Id}}", image]).is_empty()
}

/// A `docker-registry` (Debian's distribution registry) on loopback, stopped when dropped. The engine reaches
/// it as `127.0.0.1:PORT` (loopback registries need no TLS for Docker).
#[derive(Debug)]
pub struct Registry {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Result<Registry> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("docker-registry (apt-get install docker-registry)")?;
        let mut registry = Registry {
            child,
            port,
            _dir: dir,
        };
        wait_for("the registry listening", PATIENCE, || {
            if let Ok(Some(status)) = registry.child.try_wait() {
                return Some(Err(anyhow::anyhow!("docker-registry exited: {status}")));
            }
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| Ok(()))
        })??;
        Ok(registry)
    }

    /// Pushes the image in `tar` as `flotilla-test/web:{tag}` and removes it from the engine again; returns its
    /// digest reference (`127.0.0.1:PORT/flotilla-test/web@sha256:...`).
    pub fn push(&self, tar: &Path, tag: &str) -> Result<String> {
        let loaded = docker(&["load", "-q", "-i", &tar.display().to_string()]);
        let image = loaded.rsplit(' ').next().unwrap_or_default().to_owned();
        let name = format!("127.0.0.1:{}/flotilla-test/web:{tag}", self.port);
        docker(&["tag", &image, &name]);
        let pushed = Command::new("docker")
            .args(["push", &name])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(pushed.success(), "docker push {name}");
        let reference = docker(&["inspect", "-f", "{{index .RepoDigests 0}}", &name]);
        anyhow::ensure!(
            reference.contains("@sha256:"),
            "no digest for {name}: {reference}"
        );
        docker(&["rmi", "-f", &name]);
        docker(&["rmi", "-f", &image]);
        anyhow::ensure!(!image_present(&image), "the engine still has {image}");
        Ok(reference)
    }

    /// Stops the registry now (a registry that went down).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `docker ARGS` and returns its trimmed stdout (empty on failure).
pub fn docker(args: &[&str]) -> String {
    Command::new("docker")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Removes, when dropped, every container labelled for `device` and the images named (tests share one engine).
#[derive(Debug)]
pub struct DockerCleanup {
    pub device: String,
    pub images: Vec<String>,
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        let ids = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=io.flotilla.device={}", self.device),
        ]);
        for id in ids.lines() {
            docker(&["rm", "-f", id]);
        }
        for image in &self.images {
            docker(&["rmi", "-f", image]);
        }
    }
}

/// A child process whose stdout lines arrive on a channel; killed when dropped.
#[derive(Debug)]
pub struct ChildLines {
    child: std::process::Child,
    pub rx: std::sync::mpsc::Receiver<String>,
}

impl ChildLines {
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawns");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, rx }
    }

    /// The next `n` lines, waiting at most `PATIENCE` in all.
    pub fn take(&self, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + PATIENCE;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(_) => panic!("only {} of {n} lines: {out:?}", out.len()),
            }
        }
        out
    }
}

impl Drop for ChildLines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
