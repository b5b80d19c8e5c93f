//! Deployments, their placements, rollouts and published desired states.

use super::{DesiredRow, Result, RolloutRow, Store, StoreError, to_i64, to_u64};
use flotilla_shared::DeviceId;
use flotilla_shared::codec::decode_exact;
use flotilla_shared::wire::Signed;
use rusqlite::{OptionalExtension, params};

impl Store {
    /// Persists a rollout snapshot (after every transition).
    pub fn save_rollout(
        &self,
        deployment: &str,
        stable: &str,
        target: &str,
        snapshot: &[u8],
        now: u64,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO rollouts (deployment, stable_source, target_source, snapshot, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![deployment, stable, target, snapshot, to_i64(now)],
        )?;
        Ok(())
    }

    /// (deployment, stable source, target source, snapshot) of every stored rollout.
    pub fn rollouts(&self) -> Result<Vec<RolloutRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT deployment, stable_source, target_source, snapshot FROM rollouts")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Overwrites a deployment's source without bumping the revision history semantics (rollback to stable).
    pub fn set_deployment_source(&self, name: &str, source: &str, now: u64) -> Result<()> {
        let rev: Option<i64> = self
            .conn
            .query_row(
                "UPDATE deployments SET source = ?2, revision = revision + 1, updated_at = ?3 WHERE name = ?1
                 RETURNING revision",
                params![name, source, to_i64(now)],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(rev) = rev {
            self.keep_revision(name, rev, source, now)?;
        }
        Ok(())
    }

    pub fn deployment_source(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT source FROM deployments WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Stores a deployment's new source as its next revision, and keeps the revision for `deploy diff`.
    pub fn upsert_deployment(&self, name: &str, source: &str, now: u64) -> Result<u64> {
        let rev: i64 = self.conn.query_row(
            "INSERT INTO deployments (name, source, revision, updated_at) VALUES (?1, ?2, 1, ?3)
             ON CONFLICT(name) DO UPDATE SET source = ?2, revision = revision + 1, updated_at = ?3 RETURNING revision",
            params![name, source, to_i64(now)],
            |r| r.get(0),
        )?;
        self.keep_revision(name, rev, source, now)?;
        Ok(to_u64(rev))
    }

    fn keep_revision(&self, name: &str, rev: i64, source: &str, now: u64) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO deployment_revisions (name, revision, source, at) VALUES (?1, ?2, ?3, ?4)",
            params![name, rev, source, to_i64(now)],
        )?;
        Ok(())
    }

    /// The source of one kept revision of a deployment.
    pub fn deployment_revision(&self, name: &str, revision: u64) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT source FROM deployment_revisions WHERE name = ?1 AND revision = ?2",
                params![name, to_i64(revision)],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// (revision, at) of every kept revision of a deployment, oldest first.
    pub fn deployment_revisions(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let mut stmt = self.conn.prepare(
            "SELECT revision, at FROM deployment_revisions WHERE name = ?1 ORDER BY revision",
        )?;
        let rows = stmt.query_map([name], |r| {
            Ok((to_u64(r.get::<_, i64>(0)?), to_u64(r.get::<_, i64>(1)?)))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Remembers that `release` (`name@version`) failed its health window on `device`, so later rollouts leave
    /// the device out until an operator retries.
    pub fn remember_failure(
        &self,
        device: &DeviceId,
        release: &str,
        deployment: &str,
        reason: &str,
        now: u64,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO failed_releases (device, release, deployment, reason, at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![device.as_str(), release, deployment, reason, to_i64(now)],
        )?;
        Ok(())
    }

    /// (release, deployment, reason, at) of every release remembered as failed on `device`.
    pub fn failed_releases(&self, device: &DeviceId) -> Result<Vec<(String, String, String, u64)>> {
        // Cached: a rollout's start asks once per member.
        let mut stmt = self.conn.prepare_cached(
            "SELECT release, deployment, reason, at FROM failed_releases WHERE device = ?1 ORDER BY release",
        )?;
        let rows = stmt.query_map([device.as_str()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, to_u64(r.get::<_, i64>(3)?)))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Forgets the failures of `releases` (on one device, or on every device): the operator's retry.
    pub fn forget_failures(&self, releases: &[String], device: Option<&DeviceId>) -> Result<usize> {
        let mut n = 0;
        for release in releases {
            n += match device {
                Some(d) => self.conn.execute(
                    "DELETE FROM failed_releases WHERE release = ?1 AND device = ?2",
                    params![release, d.as_str()],
                )?,
                None => self
                    .conn
                    .execute("DELETE FROM failed_releases WHERE release = ?1", [release])?,
            };
        }
        Ok(n)
    }

    pub fn delete_deployment(&self, name: &str) -> Result<bool> {
        self.conn
            .execute("DELETE FROM placements WHERE deployment = ?1", [name])?;
        self.conn
            .execute("DELETE FROM deployment_revisions WHERE name = ?1", [name])?;
        Ok(self
            .conn
            .execute("DELETE FROM deployments WHERE name = ?1", [name])?
            > 0)
    }

    /// (name, source, revision, updated_at) of every deployment.
    pub fn deployments(&self) -> Result<Vec<(String, String, u64, u64)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, source, revision, updated_at FROM deployments ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, to_u64(r.get(2)?), to_u64(r.get(3)?)))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    pub fn placements(&self, deployment: &str) -> Result<Vec<DeviceId>> {
        let mut stmt = self
            .conn
            .prepare("SELECT device FROM placements WHERE deployment = ?1 ORDER BY device")?;
        let rows = stmt.query_map([deployment], |r| r.get::<_, String>(0))?;
        rows.map(|r| DeviceId::new(r?).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect()
    }

    pub fn set_placements(&mut self, deployment: &str, devices: &[DeviceId]) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM placements WHERE deployment = ?1", [deployment])?;
        for d in devices {
            tx.execute(
                "INSERT INTO placements (deployment, device) VALUES (?1, ?2)",
                params![deployment, d.as_str()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// (generation, content hash, signed, expires_at) of the last published desired state of a device.
    pub fn desired(&self, device: &DeviceId) -> Result<Option<DesiredRow>> {
        let row: Option<(i64, Vec<u8>, Vec<u8>, i64)> = self
            .conn
            .query_row(
                "SELECT generation, content, signed, expires_at FROM desired WHERE device = ?1",
                [device.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        row.map(|(g, c, s, e)| {
            let signed = decode_exact(&s).map_err(|err| StoreError::Corrupt(err.to_string()))?;
            Ok((to_u64(g), c, signed, to_u64(e)))
        })
        .transpose()
    }

    /// Every stored signed desired state, by device.
    pub fn all_desired(&self) -> Result<Vec<(DeviceId, Signed)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT device, signed FROM desired ORDER BY device")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, signed) = row?;
            let id = DeviceId::new(id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let signed = decode_exact(&signed).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push((id, signed));
        }
        Ok(out)
    }

    pub fn save_desired(
        &self,
        device: &DeviceId,
        generation: u64,
        content: &[u8],
        signed: &Signed,
        issued_at: u64,
        expires_at: u64,
    ) -> Result<()> {
        let bytes = postcard::to_stdvec(signed).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn.execute(
            "INSERT OR REPLACE INTO desired (device, generation, content, signed, issued_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![device.as_str(), to_i64(generation), content, bytes, to_i64(issued_at), to_i64(expires_at)],
        )?;
        Ok(())
    }
}
