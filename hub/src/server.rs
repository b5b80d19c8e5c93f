//! `flotilla init` and `flotilla serve`: data directory set-up and the running hub (broker, MQTT link, hub loop,
//! HTTP API).

use crate::api::{self, ApiState};
use crate::hub::Hub;
use crate::keyfile;
use crate::store::Store;
use anyhow::{Context, Result, bail};
use flotilla_mqtt::LinkSettings;
use flotilla_shared::trust::{self, DocType};
use flotilla_shared::wire::Root;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Paths inside a hub data directory.
#[derive(Debug, Clone)]
pub struct DataDir(pub PathBuf);

impl DataDir {
    pub fn keys(&self) -> PathBuf {
        self.0.join("keys")
    }
    pub fn root(&self) -> PathBuf {
        self.0.join("root.signed")
    }
    pub fn hub_key(&self) -> PathBuf {
        self.keys().join("hub.key")
    }
    pub fn release_key(&self) -> PathBuf {
        self.keys().join("release.key")
    }
    pub fn admin_token(&self) -> PathBuf {
        self.0.join("admin.token")
    }
    /// Written at start: where the API and broker listen (port 0 resolved), for tools and tests.
    pub fn endpoints(&self) -> PathBuf {
        self.0.join("endpoints.txt")
    }
    /// The hub's own MQTT secret (username `hub`), 0600.
    /// The hub's sealing key for stored workload secrets (32 bytes, 0600).
    pub fn secrets_key(&self) -> PathBuf {
        self.keys().join("secrets.key")
    }
    pub fn hub_mqtt_secret(&self) -> PathBuf {
        self.0.join("mqtt-hub.secret")
    }
    pub fn initialized(&self) -> bool {
        self.root().exists() && self.hub_key().exists()
    }
}

/// Creates keys, a root, the database, an admin token and the broker's TLS material. Refuses to overwrite an
/// initialised directory.
pub fn init(dir: &DataDir) -> Result<String> {
    init_with(dir, &[])
}

/// [`init`], with extra names for the broker's TLS certificate.
pub fn init_with(dir: &DataDir, broker_hosts: &[String]) -> Result<String> {
    if dir.initialized() {
        bail!("{} is already initialised", dir.0.display());
    }
    std::fs::create_dir_all(dir.keys())
        .with_context(|| format!("creating {}", dir.keys().display()))?;
    let (root_key, root_path, _) = keyfile::generate(&dir.keys().join("root"))?;
    let (release_key, release_path, _) = keyfile::generate(&dir.keys().join("release"))?;
    let (hub_key, hub_path, _) = keyfile::generate(&dir.keys().join("hub"))?;
    let root = Root {
        version: 1,
        expires_at: crate::keys_cli::now() + 365 * 86_400,
        root_keys: vec![root_key.public()],
        root_threshold: 1,
        release_keys: vec![release_key.public()],
        release_threshold: 1,
        hub_keys: vec![hub_key.public()],
        hub_threshold: 1,
    };
    let signed = trust::sign(DocType::Root, &root, &[&root_key]);
    keyfile::write_signed(&dir.root(), &signed)?;
    let store = Store::open(&dir.0)?;
    let token = format!("fat_{}", trust::random_hex(20));
    store.add_api_token(
        &token,
        &crate::store::ApiToken {
            name: "admin".into(),
            role: "admin".into(),
            created_at: crate::hub::unix_now(),
            expires_at: None,
            regions: None,
        },
    )?;
    keyfile::write_private(&dir.admin_token(), &format!("{token}\n"))?;
    hub_mqtt_secret(dir)?;
    let pki = crate::pki::BrokerPki::in_dir(&dir.0);
    pki.create(&crate::pki::default_hosts(broker_hosts))?;
    crate::pki::DeviceCa::in_dir(&dir.0).create()?;
    println!("initialised {}", dir.0.display());
    println!("  root key (move offline!): {}", root_path.display());
    println!("  release key:              {}", release_path.display());
    println!("  hub key:                  {}", hub_path.display());
    println!("  trust root:               {}", dir.root().display());
    println!(
        "  admin API token:          {}",
        dir.admin_token().display()
    );
    println!(
        "  broker CA (devices pin it through their enrollment token): {}",
        pki.ca.display()
    );
    Ok(token)
}

/// How the hub reaches MQTT.
#[derive(Debug, Clone)]
pub enum BrokerChoice {
    /// Start the embedded broker listening here (port 0 picks a free port), and optionally on a TLS listener.
    Embedded {
        listen: SocketAddr,
        tls: Option<EmbeddedTls>,
    },
    /// Use an external broker (`tls` for `mqtts://`).
    External {
        host: String,
        port: u16,
        tls: Option<flotilla_mqtt::TlsSettings>,
    },
}

/// The embedded broker's TLS listener for devices.
#[derive(Debug, Clone)]
pub struct EmbeddedTls {
    pub listen: SocketAddr,
    /// Certificate chain and key; `None` uses the pair `flotilla init` made (`tls/server.pem`).
    pub cert_and_key: Option<(PathBuf, PathBuf)>,
    /// When set, devices must present a certificate that chains to this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// The hub's MQTT secret, created (random, 0600) on first use: data directories made before brokers
/// authenticated get one on their next start.
pub fn hub_mqtt_secret(dir: &DataDir) -> Result<String> {
    let path = dir.hub_mqtt_secret();
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        _ => {
            let secret = trust::random_hex(32);
            keyfile::write_private(&path, &format!("{secret}\n"))?;
            Ok(secret)
        }
    }
}

/// The hub's secrets key, created (random, 0600) on first use.
pub fn secrets_key(dir: &DataDir) -> Result<flotilla_shared::seal::SealingKey> {
    let path = dir.secrets_key();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bytes =
                hex::decode(text.trim()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            flotilla_shared::seal::SealingKey::from_bytes(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = flotilla_shared::seal::SealingKey::generate();
            keyfile::write_private(&path, &format!("{}\n", hex::encode(key.to_bytes())))?;
            Ok(key)
        }
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// The credential registry as stored: every device's and feed's secret hash, region and revocation.
pub fn load_credentials(
    store: &Store,
    hub_secret: &str,
    anonymous_enrollment: bool,
) -> Result<crate::access::Credentials> {
    use crate::access::policy::Principal;
    let access = crate::access::Credentials::new(hub_secret, anonymous_enrollment);
    for row in store.credentials()? {
        match Principal::parse(&row.principal) {
            Some(Principal::Device(id)) => {
                let region = store
                    .device(&id)?
                    .and_then(|d| d.inventory.region.map(|r| r.to_string()));
                // Mid-rotation: the previous secret first, so the current one ends up newest.
                match store.previous_secret(&row.principal)? {
                    Some(prev) => {
                        access.set_device(&id, prev, region, row.revoked);
                        access.add_generation(&id, Some(row.secret_hash), None);
                    }
                    None => access.set_device(&id, row.secret_hash, region, row.revoked),
                }
            }
            Some(Principal::Feed(name)) if !row.revoked => {
                access.set_feed(&name, row.secret_hash, row.regions);
            }
            _ => {}
        }
    }
    // Unexpired, unretired certificates, oldest first so each device's newest ends up first.
    let mut certs: Vec<_> = store
        .device_certs(crate::hub::unix_now())?
        .into_iter()
        .filter(|c| c.retired_at.is_none())
        .collect();
    certs.sort_by_key(|c| c.issued_at);
    for c in certs {
        if let Ok(id) = flotilla_shared::DeviceId::new(c.device.clone()) {
            access.add_generation(&id, None, Some(c.sha256));
        }
    }
    Ok(access)
}

/// Runs the hub until ctrl-c/SIGTERM. Initialises the data directory on first start (zero set-up).
pub async fn serve(dir: DataDir, http: SocketAddr, broker: BrokerChoice) -> Result<()> {
    serve_with(dir, http, broker, ServeOptions::default()).await
}

/// What `flotilla serve` can set beyond where to listen.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Lifetime of the client certificates the device CA issues.
    pub device_cert_secs: u64,
    /// Keep an external Mosquitto's files in this directory current, reloading it with this command (or SIGHUP
    /// to the pid in the directory).
    pub mosquitto: Option<(PathBuf, Option<String>)>,
    /// Republish accepted telemetry as JSON on `flotilla/v1/feed/json/...`.
    pub json_feed: bool,
    /// Publish the Sparkplug B feed (`spBv1.0/{region}/...`).
    pub sparkplug: bool,
    /// How much telemetry history to keep (`telemetry.db`); `None` keeps none.
    pub history: Option<crate::telemetry::history::Retention>,
    /// The admission policy file every apply is checked against.
    pub policy: Option<PathBuf>,
    /// Mark the console's cookies `Secure` (the hub is reached over TLS through a proxy); a proxy's
    /// `X-Forwarded-Proto: https` does the same per request.
    pub secure_cookies: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            device_cert_secs: crate::fleet::credentials::DEFAULT_CERT_LIFETIME_SECS,
            mosquitto: None,
            json_feed: true,
            sparkplug: false,
            history: Some(crate::telemetry::history::Retention::default()),
            policy: None,
            secure_cookies: false,
        }
    }
}

/// [`serve`], with [`ServeOptions`].
pub async fn serve_with(
    dir: DataDir,
    http: SocketAddr,
    broker: BrokerChoice,
    options: ServeOptions,
) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if !dir.initialized() {
        init(&dir)?;
    }
    let store = Store::open(&dir.0)?;
    let hub_secret = hub_mqtt_secret(&dir)?;
    // Data directories from before the broker had TLS get their certificates on the next start.
    let pki = crate::pki::BrokerPki::in_dir(&dir.0);
    if !pki.exists() {
        pki.create(&crate::pki::default_hosts(&[]))?;
    }
    let device_ca = crate::pki::DeviceCa::in_dir(&dir.0);
    if !device_ca.exists() {
        device_ca.create()?;
    }
    let access = load_credentials(&store, &hub_secret, true)?;
    let hub_secret_for_key = hub_secret.clone();
    let mut mqtts = None;
    let embedded_tls_generated = match &broker {
        BrokerChoice::Embedded { tls: Some(t), .. } => Some(t.cert_and_key.is_none()),
        _ => None,
    };
    let (host, port, tls, embedded) = match broker {
        BrokerChoice::Embedded { listen, tls } => {
            let (broker, tls_addr) = crate::embedded::start(
                listen,
                tls.as_ref().map(|t| {
                    let (cert, key) = match &t.cert_and_key {
                        Some((c, k)) => (c.as_path(), k.as_path()),
                        None => (pki.server_chain.as_path(), pki.server_key.as_path()),
                    };
                    // Device certificates are optional on the listener (password devices and enrollment use it
                    // too) unless --mqtt-client-ca makes them mandatory.
                    let client_auth = match t.client_ca.as_deref() {
                        Some(ca) => crate::embedded::ClientAuth::Required(ca),
                        None => crate::embedded::ClientAuth::Optional(device_ca.cert.as_path()),
                    };
                    (t.listen, cert, key, client_auth)
                }),
                access.clone(),
            )?;
            mqtts = tls_addr;
            let addr = broker.addr();
            let (ip, port) = (addr.ip().to_string(), addr.port());
            (ip, port, None, Some(broker))
        }
        BrokerChoice::External { host, port, tls } => (host, port, tls, None),
    };
    let hub_key = keyfile::read_signing_key(&dir.hub_key())?;
    let root = keyfile::read_signed(&dir.root())?;
    let hub_link_tls = tls.clone();
    let (link, link_rx) = flotilla_mqtt::connect(LinkSettings {
        client_id: format!("flotilla-hub-{}", trust::random_hex(4)),
        host: host.clone(),
        port,
        keepalive: Duration::from_secs(30),
        tls,
        credentials: Some(("hub".to_owned(), hub_secret.clone())),
        last_will: None,
        subscriptions: Hub::subscriptions(),
        clean_session: true,
        // One desired state per device can be queued by a single placement pass: size for large fleets.
        queue: 65_536,
    })?;
    let mut hub = Hub::new(store, link, hub_key, root, access)?;
    hub.set_enroll_key(hub_secret_for_key.as_bytes());
    hub.set_device_certs(device_ca.clone(), options.device_cert_secs);
    hub.set_secrets_key(secrets_key(&dir)?);
    hub.telemetry.json_feed = options.json_feed;
    if let Some(path) = &options.policy {
        // A policy that does not read stops the hub: running without the rules the operator asked for would
        // admit what they meant to refuse.
        hub.set_policy(crate::admission::file::PolicyFile::open(path)?);
    }
    if options.sparkplug {
        hub.telemetry.sparkplug = Some(Default::default());
    }
    if let Some(retention) = options.history {
        hub.telemetry.history = Some(crate::telemetry::history::History::open(
            &dir.0.join("telemetry.db"),
            retention,
        )?);
    }
    if let Some((mdir, reload)) = options.mosquitto {
        anyhow::ensure!(
            mdir.join("mosquitto.conf").exists(),
            "{} has no mosquitto.conf: write it first with `flotilla broker-config mosquitto --out {}`",
            mdir.display(),
            mdir.display()
        );
        // The generated Mosquitto configuration serves the hub's own broker certificate: tokens pin it.
        hub.set_broker_ca_fingerprint(pki.ca_fingerprint()?);
        let mut export = crate::mosquitto::Export::new(
            std::fs::canonicalize(&mdir)?,
            device_ca.clone(),
            hub_secret.clone(),
            reload,
        );
        export.broker = Some((host.clone(), port, hub_link_tls.clone()));
        hub.set_mosquitto_export(export);
    }
    // Tokens carry the CA's fingerprint only when devices can actually meet this broker's own certificate.
    if matches!(&embedded_tls_generated, Some(true)) {
        hub.set_broker_ca_fingerprint(pki.ca_fingerprint()?);
    }
    if let Some(b) = &embedded {
        hub.set_broker(b.clone());
    }
    let (calls_tx, calls_rx) = tokio::sync::mpsc::channel(256);
    let listener = tokio::net::TcpListener::bind(http)
        .await
        .with_context(|| format!("binding {http}"))?;
    let http_addr = listener.local_addr()?;
    let mqtts_line = mqtts.map_or(String::new(), |a| format!("mqtts=mqtts://{a}\n"));
    std::fs::write(
        dir.endpoints(),
        format!("http=http://{http_addr}\nmqtt=mqtt://{host}:{port}\n{mqtts_line}"),
    )?;
    let mqtts_note = mqtts.map_or(String::new(), |a| format!("  mqtts mqtts://{a}"));
    println!(
        "flotilla hub serving: console http://{http_addr}/  api http://{http_addr}/api/v1  mqtt mqtt://{host}:{port}{mqtts_note}  data {}",
        dir.0.display()
    );
    let state = ApiState {
        calls: calls_tx,
        broker: embedded,
        slis: hub.slis.clone(),
    };
    let api = api::router(state.clone());
    // The console at `/`, beside the API it calls in-process.
    let app = api
        .clone()
        .merge(crate::console::router(api, state, options.secure_cookies));
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal());
    tokio::select! {
        r = server => r.context("http server")?,
        () = hub.run(link_rx, calls_rx) => {}
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (ctrl-c).
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => std::future::pending().await,
    }
}

/// Reads `endpoints.txt` of a running hub.
pub fn read_endpoints(dir: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(dir.join("endpoints.txt")).ok()?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::to_owned)
    };
    Some((get("http=")?, get("mqtt=")?))
}
