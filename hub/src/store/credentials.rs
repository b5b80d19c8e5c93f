//! MQTT credentials: one row per principal (`device:ID`, `feed:NAME`) with the SHA-256 of its secret, the regions
//! a feed may read, and whether it is revoked. The secrets themselves are never stored.

use super::{Result, Store, StoreError, to_i64};
use flotilla_shared::Digest;
use rusqlite::{OptionalExtension, params};

/// One stored credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRow {
    pub principal: String,
    pub secret_hash: Digest,
    pub regions: Vec<String>,
    pub revoked: bool,
}

impl Store {
    /// Stores (or replaces) a principal's secret hash; a replaced credential is no longer revoked.
    pub fn set_credential(
        &self,
        principal: &str,
        secret_hash: &Digest,
        regions: &[String],
        now: u64,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO mqtt_credentials (principal, secret_hash, regions, revoked, updated_at)
             VALUES (?1, ?2, ?3, 0, ?4)",
            params![principal, secret_hash.0.as_slice(), regions.join(","), to_i64(now)],
        )?;
        Ok(())
    }

    /// Marks a principal's credential revoked; false when it has none.
    pub fn revoke_credential(&self, principal: &str, now: u64) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE mqtt_credentials SET revoked = 1, updated_at = ?2 WHERE principal = ?1",
            params![principal, to_i64(now)],
        )?;
        Ok(n > 0)
    }

    /// Every stored credential.
    pub fn credentials(&self) -> Result<Vec<CredentialRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT principal, secret_hash, regions, revoked FROM mqtt_credentials")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (principal, hash, regions, revoked) = row?;
            let hash: [u8; 32] = hash
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("credential hash of {principal}")))?;
            out.push(CredentialRow {
                principal,
                secret_hash: Digest(hash),
                regions: regions
                    .split(',')
                    .filter(|r| !r.is_empty())
                    .map(str::to_owned)
                    .collect(),
                revoked: revoked != 0,
            });
        }
        Ok(out)
    }

    /// Whether `principal`'s credential is revoked.
    pub fn credential_revoked(&self, principal: &str) -> Result<bool> {
        let revoked: Option<i64> = self
            .conn
            .query_row(
                "SELECT revoked FROM mqtt_credentials WHERE principal = ?1",
                [principal],
                |r| r.get(0),
            )
            .optional()?;
        Ok(revoked == Some(1))
    }
}
