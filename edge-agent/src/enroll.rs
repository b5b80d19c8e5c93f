//! Enrollment: a fresh device presents its one-time token and a new public key over MQTT and receives its device
//! id and the trust root (checked against a pinned `trust_root` when configured).

use crate::agent::{tls_settings_to, unix_now};
use crate::config::Config;
use crate::inventory::{inventory, read_position};
use crate::store::Store;
use flotilla_mqtt::{LinkEvent, LinkSettings, Publisher};
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics;
use flotilla_shared::trust::{self, SigningKey};
use flotilla_shared::wire::{EnrollRequest, EnrollResponse, Signed};
use std::time::Duration;

/// Enrolls with the hub over MQTT: presents the one-time token and a fresh public key, receives the device id and
/// the trust root, and stores both. Refusal is a configuration error (a bad token will not fix itself).
pub async fn enroll(cfg: &Config, store: &mut Store) -> Result<(), EnrollError> {
    let token = cfg.enroll_token.clone().ok_or(EnrollError::NoToken)?;
    let key = SigningKey::generate();
    // The MQTT client key pair: the hub's device CA signs a certificate for it; the key never leaves the device.
    let (mqtt_key, csr) = crate::credentials::new_csr()
        .map_err(|e| EnrollError::Config(format!("key generation: {e}")))?;
    // The key workload secrets will be sealed to; its public half goes in the inventory.
    let sealing = flotilla_shared::seal::SealingKey::generate();
    let nonce = trust::random_hex(16);
    let settings = LinkSettings {
        client_id: format!("enroll-{nonce}"),
        host: cfg.enroll_broker.host.clone(),
        port: cfg.enroll_broker.port,
        keepalive: Duration::from_secs(30),
        tls: tls_settings_to(cfg, &cfg.enroll_broker),
        credentials: None,
        last_will: None,
        subscriptions: vec![topics::enroll_response(&nonce)],
        clean_session: true,
        queue: flotilla_mqtt::QUEUE,
    };
    let (link, mut rx) =
        flotilla_mqtt::connect(settings).map_err(|e| EnrollError::Transient(e.to_string()))?;
    let request = codec::encode(&Message::EnrollRequest(Box::new(EnrollRequest {
        token,
        public_key: key.public(),
        requested_id: cfg.device_id.clone(),
        inventory: inventory(
            cfg,
            read_position(&cfg.position),
            Some(sealing.public()),
            None,
        ),
        csr: Some(csr),
    })))
    .map_err(|e| EnrollError::Transient(e.to_string()))?;
    let pinned = match &cfg.trust_root {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|e| EnrollError::Config(format!("trust_root {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    let mut connected = false;
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(LinkEvent::Connected) => {
                    connected = true;
                    link.publish(&topics::enroll_request(&nonce), request.clone(), false)
                        .map_err(|e| EnrollError::Transient(e.to_string()))?;
                }
                Some(LinkEvent::Disconnected(e)) => {
                    connected = false;
                    tracing::warn!(error = %e, "enrollment: broker unreachable, retrying");
                }
                Some(LinkEvent::Message { payload, .. }) => match codec::decode(&payload) {
                    Ok(Message::EnrollResponse(EnrollResponse::Accepted { device, root, mqtt_password, client_cert })) => {
                        let verified = trust::verify_initial_root(&root, unix_now())
                            .map_err(|e| EnrollError::Config(format!("hub sent an invalid root: {e}")))?;
                        if let Some(pinned) = &pinned {
                            let pinned: Signed = codec::decode_exact(pinned)
                                .map_err(|e| EnrollError::Config(format!("trust_root: {e}")))?;
                            if pinned.body != root.body {
                                return Err(EnrollError::Config("hub's root differs from the pinned trust_root".into()));
                            }
                        }
                        store.save_identity(&device, &key.to_file_text(), &root, verified.version)
                            .and_then(|()| store.set_mqtt_secret(&mqtt_password))
                            .and_then(|()| store.set_sealing_key(&sealing.to_bytes()))
                            .and_then(|()| match &client_cert {
                                Some(cert) => crate::credentials::save_issued(&cfg.data_dir, store, &mqtt_key, cert),
                                None => Ok(()),
                            })
                            .map_err(|e| EnrollError::Transient(e.to_string()))?;
                        link.disconnect().await;
                        tracing::info!(device = %device, "enrolled");
                        return Ok(());
                    }
                    Ok(Message::EnrollResponse(EnrollResponse::Refused { reason })) => {
                        link.disconnect().await;
                        return Err(EnrollError::Refused(reason));
                    }
                    _ => tracing::warn!("enrollment: ignoring unexpected message"),
                },
                None => return Err(EnrollError::Transient("mqtt link closed".into())),
            },
            _ = ticker.tick() => {
                if connected {
                    // No answer yet (a lost message, or the hub was restarting): ask again.
                    let _ = link.publish(&topics::enroll_request(&nonce), request.clone(), false);
                }
            }
        }
    }
}

/// Why enrollment did not complete.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("no identity yet and no enroll_token configured")]
    NoToken,
    #[error("enrollment refused by the hub: {0}")]
    Refused(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Transient(String),
}
