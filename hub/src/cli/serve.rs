//! `flotilla serve`: turns the command line into a broker choice and runs the hub until SIGTERM or ctrl-c.

use crate::server::{self, BrokerChoice, DataDir};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The `serve` arguments, as clap parsed them.
#[derive(Debug)]
pub struct ServeArgs {
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    pub broker: Option<String>,
    pub broker_ca: Option<PathBuf>,
    pub mqtt_tls: SocketAddr,
    pub no_mqtt_tls: bool,
    pub mqtt_tls_cert: Option<PathBuf>,
    pub mqtt_tls_key: Option<PathBuf>,
    pub mqtt_client_ca: Option<PathBuf>,
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
    rt.block_on(server::serve(DataDir(data_dir), http, choice))?;

    Ok(())
}
