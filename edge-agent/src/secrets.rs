//! Workload secrets on the device: the accepted desired state carries each secret sealed to this device's key
//! (stored only in that sealed form, inside the signed state); a secret is opened in memory when its workload
//! starts and handed to the runtime, never written, logged or reported.

use crate::agent::Agent;
use crate::runtime::Secrets;
use flotilla_shared::WorkloadName;
use flotilla_shared::wire::WorkloadSpec;

impl Agent {
    /// Opens the secrets `spec` references, from the accepted desired state. An error names the secret and says
    /// why (never its value).
    pub(crate) fn open_secrets(
        &self,
        name: &WorkloadName,
        spec: &WorkloadSpec,
    ) -> Result<Secrets, String> {
        let mut out = Secrets::default();
        for r in &spec.secrets {
            let sealed = self
                .accepted
                .as_ref()
                .and_then(|(_, ds)| {
                    ds.sealed
                        .iter()
                        .find(|s| s.workload == *name && s.name == r.name && s.version == r.version)
                })
                .ok_or_else(|| {
                    format!(
                        "secret {} (version {}) was not delivered to this device (is its sealing key registered \
                         with the hub?)",
                        r.name, r.version
                    )
                })?;
            let value = self
                .sealing
                .open(&sealed.sealed)
                .map_err(|e| format!("secret {}: {e}", r.name))?;
            out.0.insert(r.name.clone(), value);
        }
        Ok(out)
    }
}
