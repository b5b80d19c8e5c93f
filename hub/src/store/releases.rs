//! Releases and blobs: the content-addressed artifact store and the signed releases that name its blobs.

use super::{ReleaseRow, Result, Store, StoreError, kind_str, to_i64};
use flotilla_shared::Digest;
use flotilla_shared::wire::{Release, Signed};
use rusqlite::params;
use std::path::PathBuf;

impl Store {
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::of(bytes);
        let path = self.blob_path(&d);
        if !path.exists() {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(d)
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blobs.join(d.to_hex())
    }

    pub fn insert_release(
        &self,
        digest: &Digest,
        release: &Release,
        signed: &Signed,
        now: u64,
    ) -> Result<()> {
        let bytes = postcard::to_stdvec(signed).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn.execute(
            "INSERT INTO releases (digest, name, version, epoch, kind, artifact_digest, artifact_size, signed, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                digest.0.as_slice(),
                release.name.as_str(),
                release.version,
                release.epoch,
                kind_str(release.kind),
                release.artifact_digest.0.as_slice(),
                to_i64(release.artifact_size),
                bytes,
                to_i64(now)
            ],
        )?;
        Ok(())
    }

    pub fn releases(&self) -> Result<Vec<ReleaseRow>> {
        self.release_query(
            "SELECT digest, signed, created_at FROM releases ORDER BY name, created_at",
            [],
        )
    }

    pub fn release_by_digest(&self, d: &Digest) -> Result<Option<ReleaseRow>> {
        Ok(self
            .release_query(
                "SELECT digest, signed, created_at FROM releases WHERE digest = ?1",
                [d.0.as_slice()],
            )?
            .pop())
    }

    pub fn release_by_version(&self, name: &str, version: &str) -> Result<Option<ReleaseRow>> {
        Ok(self
            .release_query(
                "SELECT digest, signed, created_at FROM releases WHERE name = ?1 AND version = ?2",
                params![name, version],
            )?
            .pop())
    }
}
