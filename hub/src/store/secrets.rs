//! Workload secrets, per deployment: each value sealed to the hub's own secrets key (never stored in the clear),
//! with a version that goes up on every change and the plaintext's size (for the desired-state size check).

use super::{Result, Store, to_i64, to_u64};
use rusqlite::{OptionalExtension, params};

/// One stored secret (sealed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRow {
    pub deployment: String,
    pub name: String,
    pub version: u64,
    pub sealed: Vec<u8>,
    pub size: usize,
    pub updated_at: u64,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SecretRow> {
    Ok(SecretRow {
        deployment: r.get(0)?,
        name: r.get(1)?,
        version: to_u64(r.get(2)?),
        sealed: r.get(3)?,
        size: usize::try_from(r.get::<_, i64>(4)?).unwrap_or(usize::MAX),
        updated_at: to_u64(r.get(5)?),
    })
}

const COLUMNS: &str = "deployment, name, version, sealed, size, updated_at";

impl Store {
    /// Stores a new value of a secret (sealed to the hub) and returns its version (1, then one more each time).
    pub fn set_secret(
        &self,
        deployment: &str,
        name: &str,
        sealed: &[u8],
        size: usize,
        now: u64,
    ) -> Result<u64> {
        let version: Option<i64> = self
            .conn
            .query_row(
                "SELECT version FROM secrets WHERE deployment = ?1 AND name = ?2",
                params![deployment, name],
                |r| r.get(0),
            )
            .optional()?;
        let version = version.map_or(1, |v| to_u64(v) + 1);
        self.conn.execute(
            "INSERT OR REPLACE INTO secrets (deployment, name, version, sealed, size, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                deployment,
                name,
                to_i64(version),
                sealed,
                to_i64(size as u64),
                to_i64(now)
            ],
        )?;
        Ok(version)
    }

    /// A deployment's secrets, by name.
    pub fn deployment_secrets(&self, deployment: &str) -> Result<Vec<SecretRow>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {COLUMNS} FROM secrets WHERE deployment = ?1 ORDER BY name"
        ))?;
        let rows = stmt.query_map([deployment], row)?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// One secret at one version, if that is the current one.
    pub fn secret(&self, deployment: &str, name: &str, version: u64) -> Result<Option<SecretRow>> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM secrets WHERE deployment = ?1 AND name = ?2 AND version = ?3"
                ),
                params![deployment, name, to_i64(version)],
                row,
            )
            .optional()?)
    }
}
