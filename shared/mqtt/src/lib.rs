//! The MQTT seam shared by hub and agent: a small [`Publisher`] trait and a rumqttc-backed [`Link`] that adds what
//! rumqttc lacks: jittered exponential reconnect backoff, a "connected" signal, automatic re-subscription, a max
//! packet size, bounded queues, and rustls (ring) TLS.

use flotilla_shared::codec::MAX_ENVELOPE;
use rumqttc::{
    AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Capacity of the request queue into rumqttc and of the event queue out of the link.
pub const QUEUE: usize = 256;
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why a publish or subscribe could not be queued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("mqtt request queue full or closed: {0}")]
    Client(#[from] rumqttc::ClientError),
}

/// Why a link could not be configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    Tls(String),
}

/// What a link tells its owner.
#[derive(Debug)]
pub enum LinkEvent {
    /// Connected (again); subscriptions have been re-issued.
    Connected,
    /// The connection dropped; the link is backing off before the next attempt.
    Disconnected(String),
    Message {
        topic: String,
        payload: Vec<u8>,
    },
}

/// The publishing side of MQTT as the rest of Flotilla sees it, so a different client can be swapped in.
pub trait Publisher: Send + Sync {
    /// Queues a QoS 1 publish without waiting; fails when the bounded queue is full.
    fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), LinkError>;
}

/// TLS material for `mqtts://`.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM CA bundle the broker's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// Or, without a CA file: the SHA-256 of the broker's CA certificate (DER), which the broker sends in its
    /// chain. Pinned from an enrollment token (`fet_<secret>.<sha256>`), so a fresh device needs nothing else.
    pub ca_sha256: Option<[u8; 32]>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub keepalive: Duration,
    pub tls: Option<TlsSettings>,
    /// MQTT username and password, when the broker authenticates (the embedded one always does).
    pub credentials: Option<(String, String)>,
    /// Retained last-will message (topic, payload), e.g. the offline presence marker.
    pub last_will: Option<(String, Vec<u8>)>,
    /// Topic filters (QoS 1) subscribed on every (re)connect.
    pub subscriptions: Vec<String>,
    /// Start with a clean session; the agent uses persistent state in SQLite, not broker sessions.
    pub clean_session: bool,
    /// Capacity of the outgoing request queue (bounded; `publish` fails when it is full) and of the incoming event
    /// queue (when full, the link stops reading from the broker until the owner catches up).
    pub queue: usize,
}

/// A handle for publishing; cheap to clone.
#[derive(Clone, Debug)]
pub struct Link {
    client: AsyncClient,
}

impl Publisher for Link {
    fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), LinkError> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)?;
        Ok(())
    }
}

impl Link {
    /// Queues a QoS 0 publish (fire and forget), for feeds whose convention asks for it (Sparkplug B NBIRTH and
    /// NDATA); fails when the queue is full.
    pub fn publish_at_most_once(&self, topic: &str, payload: Vec<u8>) -> Result<(), LinkError> {
        self.client
            .try_publish(topic, QoS::AtMostOnce, false, payload)?;
        Ok(())
    }

    /// Subscribes once more at runtime (in addition to the reconnect set).
    pub fn subscribe(&self, filter: &str) -> Result<(), LinkError> {
        self.client.try_subscribe(filter, QoS::AtLeastOnce)?;
        Ok(())
    }

    /// Asks the broker to close the session cleanly (no last will).
    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, SetupError> {
    std::fs::read(path).map_err(|source| SetupError::Read {
        path: path.clone(),
        source,
    })
}

/// The rustls client configuration for `tls` (CA file or pinned CA, optional client certificate); public so that
/// tests and tools build exactly what the link uses.
pub fn tls_client_config(tls: &TlsSettings) -> Result<rustls::ClientConfig, SetupError> {
    tls_config(tls)
}

fn tls_config(tls: &TlsSettings) -> Result<rustls::ClientConfig, SetupError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::Tls(e.to_string()))?;
    let builder = match (&tls.ca_file, tls.ca_sha256) {
        (Some(ca_file), _) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read(ca_file)?) {
                let cert = cert.map_err(|e| SetupError::Tls(format!("ca_file: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| SetupError::Tls(format!("ca_file: {e}")))?;
            }
            versions.with_root_certificates(roots)
        }
        (None, Some(pin)) => versions
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(pin::PinnedCa::new(pin, provider))),
        (None, None) => {
            return Err(SetupError::Tls(
                "mqtts needs a CA: ca_file, or an enrollment token that pins one".into(),
            ));
        }
    };
    match (&tls.client_cert, &tls.client_key) {
        (Some(c), Some(k)) => {
            let certs = CertificateDer::pem_slice_iter(&read(c)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| SetupError::Tls(format!("client_cert: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(&read(k)?)
                .map_err(|e| SetupError::Tls(format!("client_key: {e}")))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| SetupError::Tls(e.to_string()))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(SetupError::Tls(
            "client_cert and client_key go together".into(),
        )),
    }
}

mod pin {
    //! Verifying a broker against a pinned CA fingerprint: the CA must be in the chain the broker presents, and
    //! the broker's certificate must verify against that CA (name, validity, signature) exactly as with a CA file.
    use rustls::DigitallySignedStruct;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;

    #[derive(Debug)]
    pub struct PinnedCa {
        pin: [u8; 32],
        provider: Arc<CryptoProvider>,
    }

    impl PinnedCa {
        pub fn new(pin: [u8; 32], provider: Arc<CryptoProvider>) -> Self {
            Self { pin, provider }
        }
    }

    impl ServerCertVerifier for PinnedCa {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let ca = intermediates
                .iter()
                .find(|c| flotilla_shared::Digest::of(c.as_ref()).0 == self.pin)
                .ok_or_else(|| {
                    rustls::Error::General(
                        "the broker's certificate chain does not contain the pinned CA".into(),
                    )
                })?;
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.clone().into_owned())?;
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                self.provider.clone(),
            )
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
            verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
}

/// A small xorshift for backoff jitter; cryptographic quality is not needed, independence between devices is.
fn jitter(seed: &mut u64) -> f64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    0.5 + (*seed % 1000) as f64 / 1000.0
}

/// Connects in the background and returns the publishing handle and the event stream.
///
/// The task ends when the event receiver is dropped.
pub fn connect(settings: LinkSettings) -> Result<(Link, mpsc::Receiver<LinkEvent>), SetupError> {
    let mut opts = MqttOptions::new(
        settings.client_id.clone(),
        settings.host.clone(),
        settings.port,
    );
    opts.set_keep_alive(settings.keepalive);
    opts.set_clean_session(settings.clean_session);
    if let Some((user, pass)) = &settings.credentials {
        opts.set_credentials(user.clone(), pass.clone());
    }
    // Slightly above the largest envelope so a maximal chunk plus MQTT framing fits, and nothing larger does.
    opts.set_max_packet_size(MAX_ENVELOPE + 1024, MAX_ENVELOPE + 1024);
    opts.set_inflight(64);
    if let Some((topic, payload)) = &settings.last_will {
        opts.set_last_will(LastWill::new(
            topic,
            payload.clone(),
            QoS::AtLeastOnce,
            true,
        ));
    }
    if let Some(tls) = &settings.tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_config(tls)?),
        )));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, settings.queue.max(16));
    // Small request/answer exchanges (a chunk request, a release document) must not wait out Nagle's algorithm
    // against the peer's delayed ACK: ~40 ms per hop, ~90 ms per round trip through the broker (measured; with
    // Nagle on the hub's side only, still ~44 ms). The fleet-scale simulator showed no cost within its noise.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    // Incoming messages get the same capacity as outgoing requests. A hub (queue 65,536) must keep reading the
    // socket through a burst of reports from a whole fleet while its loop catches up: a client that stops reading
    // makes the broker queue for it, and Mosquitto drops QoS 1 messages beyond `max_queued_messages` (1,000).
    let (tx, rx) = mpsc::channel(settings.queue.max(16));
    let subs = settings.subscriptions.clone();
    let sub_client = client.clone();
    let mut seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    tokio::spawn(async move {
        let mut failures: u32 = 0;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    for s in &subs {
                        // Re-issued on every connect: rumqttc does not restore subscriptions itself.
                        if let Err(e) = sub_client.subscribe(s.clone(), QoS::AtLeastOnce).await {
                            tracing::warn!(error = %e, filter = %s, "re-subscribe failed");
                        }
                    }
                    if tx.send(LinkEvent::Connected).await.is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let ev = LinkEvent::Message {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                    };
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if tx
                        .send(LinkEvent::Disconnected(e.to_string()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    failures = failures.saturating_add(1);
                    let exp = BACKOFF_BASE
                        .saturating_mul(1u32 << failures.min(8))
                        .min(BACKOFF_MAX);
                    tokio::time::sleep(exp.mul_f64(jitter(&mut seed))).await;
                }
            }
        }
    });
    Ok((Link { client }, rx))
}
