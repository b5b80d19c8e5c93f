//! MQTT credentials: one row per principal (`device:ID`, `feed:NAME`) with the SHA-256 of its secret, the regions
//! a feed may read, and whether it is revoked; the previous secret of a device mid-rotation; the client
//! certificates the device CA issued (fingerprint, serial, expiry, and when each was retired, for the revocation
//! list); and rotations an operator asked for. The secrets themselves are never stored.

use super::{Result, Store, StoreError, to_i64, to_u64};
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

/// A client certificate the device CA issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRow {
    pub device: String,
    pub sha256: [u8; 32],
    pub serial: Vec<u8>,
    pub not_after: u64,
    pub issued_at: u64,
    /// When it was superseded by a newer certificate or its device was revoked.
    pub retired_at: Option<u64>,
}

impl Store {
    /// Records a certificate the device CA issued.
    pub fn add_device_cert(
        &self,
        device: &str,
        sha256: &[u8; 32],
        serial: &[u8],
        not_after: u64,
        now: u64,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO device_certs (sha256, device, serial, not_after, issued_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![sha256.as_slice(), device, serial, to_i64(not_after), to_i64(now)],
        )?;
        Ok(())
    }

    /// Retires a device's certificates other than `keep` (all of them with `None`: revocation).
    pub fn retire_device_certs(
        &self,
        device: &str,
        keep: Option<&[u8; 32]>,
        now: u64,
    ) -> Result<usize> {
        let keep = keep.map_or(Vec::new(), |k| k.to_vec());
        Ok(self.conn.execute(
            "UPDATE device_certs SET retired_at = ?3 WHERE device = ?1 AND sha256 != ?2 AND retired_at IS NULL",
            params![device, keep, to_i64(now)],
        )?)
    }

    /// Retires every certificate of `device` but its newest.
    pub fn retire_older_certs(&self, device: &str, now: u64) -> Result<usize> {
        Ok(self.conn.execute(
            "UPDATE device_certs SET retired_at = ?2 WHERE device = ?1 AND retired_at IS NULL AND sha256 !=
               (SELECT sha256 FROM device_certs WHERE device = ?1 ORDER BY issued_at DESC, rowid DESC LIMIT 1)",
            params![device, to_i64(now)],
        )?)
    }

    /// A principal's current secret hash.
    pub fn secret_hash(&self, principal: &str) -> Result<Option<Digest>> {
        self.hash_of(
            "SELECT secret_hash FROM mqtt_credentials WHERE principal = ?1",
            principal,
        )
    }

    /// The 32-byte hash the query (one `?1`, one column) finds for `principal`, if any.
    fn hash_of(&self, sql: &str, principal: &str) -> Result<Option<Digest>> {
        let hash: Option<Vec<u8>> = self
            .conn
            .query_row(sql, [principal], |r| r.get(0))
            .optional()?;
        hash.map(|h| {
            h.as_slice()
                .try_into()
                .map(Digest)
                .map_err(|_| StoreError::Corrupt(format!("secret hash of {principal}")))
        })
        .transpose()
    }

    /// Every certificate not yet expired at `now`, newest first per device.
    pub fn device_certs(&self, now: u64) -> Result<Vec<CertRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT device, sha256, serial, not_after, issued_at, retired_at FROM device_certs
             WHERE not_after > ?1 ORDER BY device, issued_at DESC, rowid DESC",
        )?;
        let rows = stmt.query_map([to_i64(now)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<i64>>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (device, sha, serial, not_after, issued_at, retired_at) = row?;
            let sha256: [u8; 32] = sha
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("certificate fingerprint of {device}")))?;
            out.push(CertRow {
                device,
                sha256,
                serial,
                not_after: to_u64(not_after),
                issued_at: to_u64(issued_at),
                retired_at: retired_at.map(to_u64),
            });
        }
        Ok(out)
    }

    /// Sets (or with `None` clears) a principal's previous secret hash, accepted until the new one is used.
    pub fn set_previous_secret(&self, principal: &str, hash: Option<&Digest>) -> Result<()> {
        match hash {
            Some(h) => self.conn.execute(
                "INSERT OR REPLACE INTO mqtt_previous_secrets (principal, secret_hash) VALUES (?1, ?2)",
                params![principal, h.0.as_slice()],
            )?,
            None => self.conn.execute(
                "DELETE FROM mqtt_previous_secrets WHERE principal = ?1",
                [principal],
            )?,
        };
        Ok(())
    }

    /// A principal's previous secret hash, if it is mid-rotation.
    pub fn previous_secret(&self, principal: &str) -> Result<Option<Digest>> {
        self.hash_of(
            "SELECT secret_hash FROM mqtt_previous_secrets WHERE principal = ?1",
            principal,
        )
    }

    /// Stores the external broker's salted password line for a principal (Mosquitto's `$7$` format).
    pub fn set_password_line(&self, principal: &str, line: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO broker_password_lines (principal, line) VALUES (?1, ?2)",
            params![principal, line],
        )?;
        Ok(())
    }

    /// Every stored password line, by principal.
    pub fn password_lines(&self) -> Result<Vec<(String, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT principal, line FROM broker_password_lines ORDER BY principal")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Records (or with `false` clears) an operator's request to rotate a device's credentials.
    pub fn set_rotation_requested(&self, device: &str, requested: bool, now: u64) -> Result<()> {
        if requested {
            self.conn.execute(
                "INSERT OR REPLACE INTO credential_rotations (device, requested_at) VALUES (?1, ?2)",
                params![device, to_i64(now)],
            )?;
        } else {
            self.conn.execute(
                "DELETE FROM credential_rotations WHERE device = ?1",
                [device],
            )?;
        }
        Ok(())
    }

    /// Whether a rotation is pending for `device`.
    pub fn rotation_requested(&self, device: &str) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM credential_rotations WHERE device = ?1",
                [device],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

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
