//! `flotilla serve`: turns the command line into a broker choice and runs the hub until SIGTERM or ctrl-c.

use crate::server::{self, BrokerChoice, DataDir};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The `serve` arguments.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "flotilla-data")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Embedded broker listen address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt: SocketAddr,
    /// External broker instead of the embedded one: mqtt://host:port or mqtts://host:port.
    #[arg(long)]
    pub broker: Option<String>,
    /// CA certificate (PEM) for an mqtts:// broker.
    #[arg(long)]
    pub broker_ca: Option<PathBuf>,
    /// MQTT over TLS for devices (embedded broker), with the certificate `flotilla init` made unless
    /// --mqtt-tls-cert/--mqtt-tls-key name others. The plain --mqtt listener stays for the hub and local tools.
    #[arg(long, default_value = "0.0.0.0:8883", conflicts_with = "broker")]
    pub mqtt_tls: SocketAddr,
    /// Serve no TLS listener (devices then reach the broker only through --mqtt).
    #[arg(long, conflicts_with_all = ["mqtt_tls_cert", "mqtt_tls_key", "mqtt_client_ca"])]
    pub no_mqtt_tls: bool,
    /// Server certificate chain (PEM) for --mqtt-tls, instead of the generated one.
    #[arg(long, requires = "mqtt_tls_key")]
    pub mqtt_tls_cert: Option<PathBuf>,
    /// Server private key (PEM) for --mqtt-tls.
    #[arg(long, requires = "mqtt_tls_cert")]
    pub mqtt_tls_key: Option<PathBuf>,
    /// Require device certificates that chain to this CA (PEM) on --mqtt-tls (mutual TLS).
    #[arg(long)]
    pub mqtt_client_ca: Option<PathBuf>,
    /// Lifetime of the client certificates the device CA issues, in seconds; agents renew after two thirds.
    #[arg(long, default_value_t = crate::fleet::credentials::DEFAULT_CERT_LIFETIME_SECS, value_parser = clap::value_parser!(u64).range(60..))]
    pub device_cert_secs: u64,
    /// Keep the ACL, password files and revocation list of an external Mosquitto current in this directory (made
    /// by `flotilla broker-config mosquitto --out DIR`), reloading Mosquitto after each change.
    #[arg(long, requires = "broker")]
    pub mosquitto_dir: Option<PathBuf>,
    /// Command that makes Mosquitto reload its files (default: SIGHUP to the pid in DIR/mosquitto.pid).
    #[arg(long, requires = "mosquitto_dir")]
    pub mosquitto_reload: Option<String>,
    /// Do not republish telemetry as JSON on flotilla/v1/feed/json/{region}/{device}/{stream}.
    #[arg(long)]
    pub no_json_feed: bool,
    /// Also publish telemetry as Sparkplug B (group = region, edge node = device) on spBv1.0/{region}/...
    #[arg(long)]
    pub sparkplug: bool,
    /// Keep telemetry history this long, in seconds (0: keep none).
    #[arg(long, default_value_t = 7 * 86_400)]
    pub telemetry_history_secs: u64,
    /// Keep at most this many MiB of telemetry history per device (oldest records go first).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub telemetry_history_mib: u64,
    /// Keep at most this many MiB of telemetry history in all (the oldest records go first, of any device).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    pub telemetry_history_total_mib: u64,
    /// Admission policy (TOML) every apply and rollout start is checked against; re-read when it changes (a bad
    /// edit keeps the previous policy). See the README, "Admission policy".
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Mark the console's session cookies `Secure`: set this when operators reach the hub over HTTPS through a
    /// proxy (a proxy's `X-Forwarded-Proto: https` also sets it per request).
    #[arg(long)]
    pub secure_cookies: bool,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let ServeArgs {
        data_dir,
        http,
        mqtt,
        broker,
        broker_ca,
        mqtt_tls,
        no_mqtt_tls,
        mqtt_tls_cert,
        mqtt_tls_key,
        mqtt_client_ca,
        device_cert_secs,
        mosquitto_dir,
        mosquitto_reload,
        no_json_feed,
        sparkplug,
        telemetry_history_secs,
        telemetry_history_mib,
        telemetry_history_total_mib,
        policy,
        secure_cookies,
    } = args;
    let choice = match broker {
        Some(url) => {
            let (tls, rest) = match (url.strip_prefix("mqtts://"), url.strip_prefix("mqtt://")) {
                (Some(rest), _) => (true, rest),
                (None, Some(rest)) => (false, rest),
                _ => anyhow::bail!("--broker must be mqtt://host:port or mqtts://host:port"),
            };
            let (host, port) = rest.rsplit_once(':').context("--broker needs a port")?;
            let tls = match (tls, broker_ca) {
                (true, Some(ca_file)) => Some(flotilla_mqtt::TlsSettings {
                    ca_file: Some(ca_file),
                    ca_sha256: None,
                    client_cert: None,
                    client_key: None,
                }),
                (true, None) => anyhow::bail!("mqtts:// needs --broker-ca"),
                (false, _) => None,
            };
            BrokerChoice::External {
                host: host.into(),
                port: port.parse().context("--broker port")?,
                tls,
            }
        }
        None => BrokerChoice::Embedded {
            listen: mqtt,
            tls: (!no_mqtt_tls).then_some(server::EmbeddedTls {
                listen: mqtt_tls,
                // clap's `requires` rules give both or neither; neither means the generated pair.
                cert_and_key: mqtt_tls_cert.zip(mqtt_tls_key),
                client_ca: mqtt_client_ca,
            }),
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let options = server::ServeOptions {
        device_cert_secs,
        mosquitto: mosquitto_dir.map(|d| (d, mosquitto_reload)),
        json_feed: !no_json_feed,
        sparkplug,
        history: (telemetry_history_secs > 0).then_some(crate::telemetry::history::Retention {
            max_age_secs: telemetry_history_secs,
            max_bytes_per_device: telemetry_history_mib.saturating_mul(1 << 20),
            max_bytes_total: telemetry_history_total_mib.saturating_mul(1 << 20),
        }),
        policy,
        secure_cookies,
    };
    rt.block_on(server::serve_with(DataDir(data_dir), http, choice, options))?;

    Ok(())
}
