//! The embedded MQTT broker (rumqttd) behind the default `embedded-broker` feature, for zero-setup hubs.
//! External brokers (Mosquitto, EMQX, HiveMQ) are used through `--broker` instead; nothing here is required.

use std::net::SocketAddr;

/// Resolves port 0 to a free port: rumqttd binds its own listener and cannot report the port it got.
pub fn resolve_port(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = std::net::TcpListener::bind(addr)?;
    l.local_addr()
}

/// Starts the broker on `listen` in its own threads. Returns once the port accepts connections.
#[cfg(feature = "embedded-broker")]
pub fn start(listen: SocketAddr, max_connections: usize) -> anyhow::Result<()> {
    use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
    use std::collections::HashMap;
    let server = ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: flotilla_shared::codec::MAX_ENVELOPE + 1024,
            max_inflight_count: 256,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 1024,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })?;
    // Wait until the listener is up so callers can connect right away.
    for _ in 0..200 {
        if std::net::TcpStream::connect(listen).is_ok() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    anyhow::bail!("embedded broker did not start listening on {listen}")
}

#[cfg(not(feature = "embedded-broker"))]
pub fn start(_listen: SocketAddr, _max_connections: usize) -> anyhow::Result<()> {
    anyhow::bail!("this build has no embedded broker; pass --broker mqtt://host:port")
}
