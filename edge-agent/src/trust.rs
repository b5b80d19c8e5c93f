//! The device's trust state: its identity and key, the pinned root chain (rotations verified link by link) and the
//! anti-rollback floor. At boot everything stored is verified again before anything runs.

use crate::agent::{Agent, unix_now};
use crate::store::Store;
use anyhow::{Context, Result};
use flotilla_shared::DeviceId;
use flotilla_shared::codec;
use flotilla_shared::trust::{self, SigningKey, TrustFloor};
use flotilla_shared::wire::{DesiredState, Root, Signed};

/// Device identity and trust state loaded from the store.
#[derive(Debug)]
pub struct Trust {
    pub device: DeviceId,
    pub key: SigningKey,
    pub root: Root,
    pub floor: TrustFloor,
}

/// Loads identity and trust from the store, re-verifying every root in the stored chain.
pub(crate) fn load_trust(store: &Store) -> Result<Option<Trust>> {
    let Some((device, secret)) = store.identity()? else {
        return Ok(None);
    };
    let key = SigningKey::from_file_text(&secret).context("stored device key")?;
    let roots = store.roots()?;
    let (first, rest) = roots
        .split_first()
        .context("identity without a trust root")?;
    // Signatures are re-checked at boot; expiry is not (time 0), so an expired root keeps running workloads but
    // freezes updates (checked again in verify_desired with the real clock).
    let mut root = trust::verify_initial_root(first, 0).context("stored root")?;
    root = trust::verify_root_chain(&root, rest, 0).context("stored root chain")?;
    let floor = store.floor()?;
    Ok(Some(Trust {
        device,
        key,
        root,
        floor,
    }))
}

impl Agent {
    /// Brings back every desired workload from SQLite alone: the stored desired state is re-verified, its releases
    /// re-verified, and whatever has its artifact in the cache starts immediately.
    pub fn restore(&mut self) -> Result<()> {
        let Some(signed) = self.store.desired()? else {
            return Ok(());
        };
        let t = &self.trust;
        match trust::verify_desired(
            &t.root,
            &t.device,
            &signed,
            &t.floor,
            Some(&signed.body),
            unix_now(),
        ) {
            Ok(ds) => self.accepted = Some((signed, ds)),
            Err(trust::DesiredError::Expired { .. } | trust::DesiredError::RootExpired { .. }) => {
                // Availability: keep running what was accepted; freeze protection: install nothing new.
                let ds: DesiredState = codec::decode_exact(&signed.body)?;
                tracing::warn!(
                    generation = ds.generation,
                    "stored desired state expired; running it frozen"
                );
                self.frozen = true;
                self.accepted = Some((signed, ds));
            }
            // Nothing runs from a stored state that does not verify (or, after an upgrade to a new protocol
            // version, no longer decodes); the agent still starts, connects and takes the hub's current one.
            Err(e) => {
                tracing::error!(error = %e, "stored desired state does not verify; waiting for the hub's");
                return Ok(());
            }
        }
        // The releases of the desired workloads, and of their last good versions (what runs if the wanted one
        // cannot): each is verified against the current root and floor before it may run.
        let last_good: Vec<_> = self
            .last_good
            .values()
            .map(|(spec, _)| spec.clone())
            .collect();
        if let Some((_, ds)) = &self.accepted {
            // Staged releases too: what was staged before a restart stays staged.
            for w in ds
                .workloads
                .clone()
                .into_iter()
                .chain(ds.staged.clone())
                .chain(last_good)
            {
                if let Some(signed) = self.store.release(&w.release)? {
                    let verified =
                        trust::verify_release_for(&self.trust.root, &signed, &w, &self.trust.floor)
                            .map_err(|e| flotilla_shared::wire::RejectReason::from(&e))
                            .and_then(crate::variant::for_this_agent);
                    match verified {
                        Ok(r) => {
                            self.releases.insert(w.release, r);
                        }
                        Err(reason) => {
                            tracing::warn!(workload = %w.name, %reason, "stored release no longer usable")
                        }
                    }
                }
            }
        }
        self.refresh_desired();
        for (name, restarts, last_error) in self.store.workload_states()? {
            self.reconciler.restore_history(&name, restarts, last_error);
        }
        Ok(())
    }

    pub(crate) fn on_root(&mut self, chain: &[Signed]) {
        match trust::verify_root_chain(&self.trust.root, chain, unix_now()) {
            Ok(root) if root.version > self.trust.root.version => {
                for s in chain {
                    if let Ok(r) = codec::decode_exact::<Root>(&s.body)
                        && r.version > self.trust.root.version
                        && r.version <= root.version
                        && let Err(e) = self.store.save_root(r.version, s)
                    {
                        tracing::error!(error = %e, "cannot persist root");
                        return;
                    }
                }
                tracing::info!(version = root.version, "trust root rotated");
                self.trust.root = root;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "root update rejected"),
        }
    }
}
