//! The hub's SQLite state and content-addressed blob store. Owned by the hub loop alone.

use flotilla_shared::codec::decode_exact;
use flotilla_shared::wire::{Inventory, PublicKey, Release, Report, Signed, WorkloadKind};
use flotilla_shared::{DeviceId, Digest};
use rusqlite::{Connection, OptionalExtension, params};
use std::cell::{Ref, RefCell, RefMut};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why a hub store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// (labels, region, zone, expires_at, used_by) of an enrollment token row.
type TokenRow = (String, Option<String>, Option<String>, i64, Option<String>);
/// (id, public_key, inventory, online, last_seen, offline_since, report_counter, last_report) as stored.
type RawDeviceRow = (
    String,
    Vec<u8>,
    Vec<u8>,
    i64,
    i64,
    Option<i64>,
    i64,
    Option<Vec<u8>>,
);
/// (deployment, stable source, target source, snapshot) of a stored rollout.
pub type RolloutRow = (String, String, String, Vec<u8>);
/// (generation, content, signed, expires_at) of a published desired state.
pub type DesiredRow = (u64, Vec<u8>, Signed, u64);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, public_key BLOB NOT NULL, inventory BLOB NOT NULL, enrolled_at INTEGER NOT NULL,
    online INTEGER NOT NULL DEFAULT 0, last_seen INTEGER NOT NULL DEFAULT 0, offline_since INTEGER,
    report_counter INTEGER NOT NULL DEFAULT 0, last_report BLOB);
CREATE TABLE IF NOT EXISTS enroll_tokens (
    token_hash BLOB PRIMARY KEY, labels TEXT NOT NULL, region TEXT, zone TEXT, expires_at INTEGER NOT NULL,
    used_by TEXT);
CREATE TABLE IF NOT EXISTS api_tokens (token_hash BLOB PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
    digest BLOB PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL, epoch INTEGER NOT NULL, kind TEXT NOT NULL,
    artifact_digest BLOB NOT NULL, artifact_size INTEGER NOT NULL, signed BLOB NOT NULL, created_at INTEGER NOT NULL,
    UNIQUE (name, version));
CREATE TABLE IF NOT EXISTS deployments (name TEXT PRIMARY KEY, source TEXT NOT NULL, revision INTEGER NOT NULL,
    updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS placements (deployment TEXT NOT NULL, device TEXT NOT NULL,
    PRIMARY KEY (deployment, device));
CREATE TABLE IF NOT EXISTS desired (device TEXT PRIMARY KEY, generation INTEGER NOT NULL, content BLOB NOT NULL,
    signed BLOB NOT NULL, issued_at INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (deployment TEXT PRIMARY KEY, stable_source TEXT NOT NULL,
    target_source TEXT NOT NULL, snapshot BLOB NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, who TEXT NOT NULL,
    action TEXT NOT NULL, detail TEXT NOT NULL);
";

/// A registered device as the hub sees it.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    pub id: DeviceId,
    pub public_key: PublicKey,
    pub inventory: Inventory,
    pub online: bool,
    pub last_seen: u64,
    pub offline_since: Option<u64>,
    pub report_counter: u64,
    pub last_report: Option<Report>,
}

/// A stored release.
#[derive(Debug, Clone)]
pub struct ReleaseRow {
    pub digest: Digest,
    pub release: Release,
    pub signed: Signed,
    pub created_at: u64,
}

/// An enrollment token's presets.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenPresets {
    pub labels: BTreeMap<String, String>,
    pub region: Option<String>,
    pub zone: Option<String>,
}

/// Why an enrollment token cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("unknown enrollment token")]
    Unknown,
    #[error("enrollment token already used")]
    Used,
    #[error("enrollment token expired")]
    Expired,
}

/// The hub database plus blob directory.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    /// `synchronous=NORMAL` connection for high-rate, self-healing writes (reports, presence): a report lost to
    /// power loss is replaced by the device's next one, and an fsync per report would cap the fleet size.
    /// Desired states, releases, tokens and the audit log stay on the FULL connection.
    fast: Connection,
    blobs: PathBuf,
    /// Write-through cache of the devices table, loaded on first use. At fleet scale reports, presence, placement
    /// and metrics read device rows tens of thousands of times a second, and decoding them from SQLite each time
    /// dominated the hub's CPU. Every write to `devices` goes through this type and updates the cache after the
    /// SQL succeeds; a rolled-back transaction drops the cache so it is reloaded from what was committed.
    devices: RefCell<Option<BTreeMap<DeviceId, DeviceRow>>>,
}

/// What an unloaded cache reads as (not reached: loading either succeeds or returns its error first).
static EMPTY_DEVICES: BTreeMap<DeviceId, DeviceRow> = BTreeMap::new();

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn kind_str(k: WorkloadKind) -> &'static str {
    match k {
        WorkloadKind::Wasm => "wasm",
        WorkloadKind::Container => "container",
    }
}

pub fn hash_token(token: &str) -> Vec<u8> {
    Digest::of(token.as_bytes()).0.to_vec()
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("blobs"))?;
        let conn = Connection::open(dir.join("hub.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let fast = Connection::open(dir.join("hub.db"))?;
        fast.pragma_update(None, "synchronous", "NORMAL")?;
        fast.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self {
            conn,
            fast,
            blobs: dir.join("blobs"),
            devices: RefCell::new(None),
        })
    }

    /// The device cache for reading, loaded from the table if it is not loaded. Shared borrows: reads may nest.
    fn device_rows(&self) -> Result<Ref<'_, BTreeMap<DeviceId, DeviceRow>>> {
        drop(self.device_cache()?);
        Ok(Ref::map(self.devices.borrow(), |c| match c {
            Some(map) => map,
            None => &EMPTY_DEVICES,
        }))
    }

    /// The device cache for writing, loaded from the table if it is not loaded.
    fn device_cache(&self) -> Result<RefMut<'_, BTreeMap<DeviceId, DeviceRow>>> {
        let mut cache = self.devices.borrow_mut();
        if cache.is_none() {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, public_key, inventory, online, last_seen, offline_since, report_counter, last_report
                 FROM devices",
            )?;
            let rows = stmt.query_map([], Self::device_from_row)?;
            let mut map = BTreeMap::new();
            for r in rows {
                let row = Self::device_row(r?)?;
                map.insert(row.id.clone(), row);
            }
            *cache = Some(map);
        }
        Ok(RefMut::map(cache, |c| c.get_or_insert_with(BTreeMap::new)))
    }

    /// Starts a transaction on the durable connection; pair with [`Store::commit`] or [`Store::rollback`]. For
    /// callers that interleave their own state with the writes and cannot run inside a closure.
    pub fn begin(&self) -> Result<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    pub fn commit(&self) -> Result<()> {
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }

    pub fn rollback(&self) {
        let _ = self.conn.execute_batch("ROLLBACK");
        // The cache may hold rows the rollback removed.
        *self.devices.borrow_mut() = None;
    }

    /// Runs `f` inside one transaction on the durable connection: all of its writes commit together, or none.
    pub fn transaction<T>(&self, f: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(v) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }

    pub fn audit(&self, now: u64, who: &str, action: &str, detail: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO audit (at, who, action, detail) VALUES (?1, ?2, ?3, ?4)",
            params![to_i64(now), who, action, detail],
        )?;
        Ok(())
    }

    pub fn audit_log(&self, limit: u32) -> Result<Vec<(u64, String, String, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT at, who, action, detail FROM audit ORDER BY id DESC LIMIT ?1")?;
        let rows = stmt.query_map([limit], |r| {
            Ok((to_u64(r.get(0)?), r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    pub fn add_api_token(&self, token: &str, name: &str, role: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO api_tokens (token_hash, name, role) VALUES (?1, ?2, ?3)",
            params![hash_token(token), name, role],
        )?;
        Ok(())
    }

    /// (name, role) of an API token.
    pub fn api_token(&self, token: &str) -> Result<Option<(String, String)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, role FROM api_tokens WHERE token_hash = ?1",
                [hash_token(token)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Adds several tokens with the same presets in one transaction.
    pub fn add_enroll_tokens(
        &mut self,
        tokens: &[String],
        presets: &TokenPresets,
        expires_at: u64,
    ) -> Result<()> {
        let labels = presets
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("\n");
        let tx = self.conn.transaction()?;
        for token in tokens {
            tx.execute(
                "INSERT INTO enroll_tokens (token_hash, labels, region, zone, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![hash_token(token), labels, presets.region, presets.zone, to_i64(expires_at)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks a token used by `device` if it is valid; single use, checked and consumed in one statement.
    pub fn consume_enroll_token(
        &self,
        token: &str,
        device: &DeviceId,
        now: u64,
    ) -> Result<std::result::Result<TokenPresets, TokenError>> {
        let row: Option<TokenRow> = self
            .conn
            .query_row(
                "SELECT labels, region, zone, expires_at, used_by FROM enroll_tokens WHERE token_hash = ?1",
                [hash_token(token)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let Some((labels, region, zone, expires_at, used_by)) = row else {
            return Ok(Err(TokenError::Unknown));
        };
        if used_by.is_some() {
            return Ok(Err(TokenError::Used));
        }
        if to_u64(expires_at) <= now {
            return Ok(Err(TokenError::Expired));
        }
        let n = self.conn.execute(
            "UPDATE enroll_tokens SET used_by = ?2 WHERE token_hash = ?1 AND used_by IS NULL",
            params![hash_token(token), device.as_str()],
        )?;
        if n == 0 {
            return Ok(Err(TokenError::Used));
        }
        let labels = labels
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        Ok(Ok(TokenPresets {
            labels,
            region,
            zone,
        }))
    }

    pub fn insert_device(
        &self,
        id: &DeviceId,
        key: &PublicKey,
        inventory: &Inventory,
        now: u64,
    ) -> Result<()> {
        let inv = postcard::to_stdvec(inventory).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut cache = self.device_cache()?;
        self.conn.execute(
            "INSERT INTO devices (id, public_key, inventory, enrolled_at) VALUES (?1, ?2, ?3, ?4)",
            params![id.as_str(), key.0.as_slice(), inv, to_i64(now)],
        )?;
        // The column defaults of the table.
        cache.insert(
            id.clone(),
            DeviceRow {
                id: id.clone(),
                public_key: *key,
                inventory: inventory.clone(),
                online: false,
                last_seen: 0,
                offline_since: None,
                report_counter: 0,
                last_report: None,
            },
        );
        Ok(())
    }

    pub fn device_exists(&self, id: &DeviceId) -> Result<bool> {
        Ok(self.device_rows()?.contains_key(id))
    }

    fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawDeviceRow> {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
        ))
    }

    /// One device (the hot path for reports).
    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRow>> {
        Ok(self.device_rows()?.get(id).cloned())
    }

    fn device_row(raw: RawDeviceRow) -> Result<DeviceRow> {
        let (id, key, inv, online, last_seen, offline_since, counter, report) = raw;
        let key: [u8; 32] = key
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Corrupt("public key".into()))?;
        Ok(DeviceRow {
            id: DeviceId::new(id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            public_key: PublicKey(key),
            inventory: decode_exact(&inv).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            online: online != 0,
            last_seen: to_u64(last_seen),
            offline_since: offline_since.map(to_u64),
            report_counter: to_u64(counter),
            last_report: report.and_then(|b| decode_exact(&b).ok()),
        })
    }

    /// Every device, ordered by id.
    pub fn devices(&self) -> Result<Vec<DeviceRow>> {
        Ok(self.device_rows()?.values().cloned().collect())
    }

    /// Runs `f` over every device (ordered by id) without copying the rows. `f` may read the store but must not
    /// write devices (the rows are borrowed while it runs).
    pub fn with_devices<T>(
        &self,
        f: impl FnOnce(&mut dyn Iterator<Item = &DeviceRow>) -> T,
    ) -> Result<T> {
        Ok(f(&mut self.device_rows()?.values()))
    }

    pub fn set_presence(&self, id: &DeviceId, online: bool, now: u64) -> Result<()> {
        let mut cache = self.device_cache()?;
        self.fast
            .prepare_cached(
                "UPDATE devices SET online = ?2, last_seen = ?3,
                    offline_since = CASE WHEN ?2 THEN NULL ELSE COALESCE(offline_since, ?3) END WHERE id = ?1",
            )?
            .execute(params![id.as_str(), online, to_i64(now)])?;
        if let Some(d) = cache.get_mut(id) {
            d.online = online;
            d.last_seen = now;
            d.offline_since = if online {
                None
            } else {
                d.offline_since.or(Some(now))
            };
        }
        Ok(())
    }

    /// Stores an accepted report (and the inventory it carries, if any).
    pub fn save_report(&self, id: &DeviceId, report: &Report, now: u64) -> Result<()> {
        let bytes = postcard::to_stdvec(report).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut cache = self.device_cache()?;
        self.fast
            .prepare_cached(
                "UPDATE devices SET report_counter = ?2, last_report = ?3, last_seen = ?4, online = 1,
                    offline_since = NULL WHERE id = ?1",
            )?
            .execute(params![id.as_str(), to_i64(report.counter), bytes, to_i64(now)])?;
        if let Some(inv) = &report.inventory {
            let inv = postcard::to_stdvec(inv).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            self.fast
                .prepare_cached("UPDATE devices SET inventory = ?2 WHERE id = ?1")?
                .execute(params![id.as_str(), inv])?;
        }
        if let Some(d) = cache.get_mut(id) {
            d.report_counter = report.counter;
            d.last_seen = now;
            d.online = true;
            d.offline_since = None;
            if let Some(inv) = &report.inventory {
                d.inventory = inv.clone();
            }
            d.last_report = Some(report.clone());
        }
        Ok(())
    }

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

    fn release_query(&self, sql: &str, p: impl rusqlite::Params) -> Result<Vec<ReleaseRow>> {
        let mut stmt = self.conn.prepare(sql)?;
        let rows = stmt.query_map(p, |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (digest, signed, created) = row?;
            let digest: [u8; 32] = digest
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("digest".into()))?;
            let signed: Signed =
                decode_exact(&signed).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let release: Release =
                decode_exact(&signed.body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push(ReleaseRow {
                digest: Digest(digest),
                release,
                signed,
                created_at: to_u64(created),
            });
        }
        Ok(out)
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
        self.conn.execute(
            "UPDATE deployments SET source = ?2, revision = revision + 1, updated_at = ?3 WHERE name = ?1",
            params![name, source, to_i64(now)],
        )?;
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

    pub fn upsert_deployment(&self, name: &str, source: &str, now: u64) -> Result<u64> {
        let rev: i64 = self.conn.query_row(
            "INSERT INTO deployments (name, source, revision, updated_at) VALUES (?1, ?2, 1, ?3)
             ON CONFLICT(name) DO UPDATE SET source = ?2, revision = revision + 1, updated_at = ?3 RETURNING revision",
            params![name, source, to_i64(now)],
            |r| r.get(0),
        )?;
        Ok(to_u64(rev))
    }

    pub fn delete_deployment(&self, name: &str) -> Result<bool> {
        self.conn
            .execute("DELETE FROM placements WHERE deployment = ?1", [name])?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Enrollment tokens are single-use and expire; unknown tokens are refused. Time is a parameter, not a sleep.
    #[test]
    fn enroll_tokens_single_use_and_expiring() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        let presets = TokenPresets {
            labels: BTreeMap::new(),
            region: Some("eu-west".into()),
            zone: None,
        };
        store
            .add_enroll_tokens(&["t1".into(), "t2".into()], &presets, 1_000)
            .expect("add");
        let a = DeviceId::new("a").expect("id");
        assert_eq!(
            store.consume_enroll_token("nope", &a, 10).expect("query"),
            Err(TokenError::Unknown)
        );
        assert_eq!(
            store.consume_enroll_token("t1", &a, 10).expect("query"),
            Ok(presets.clone())
        );
        assert_eq!(
            store.consume_enroll_token("t1", &a, 11).expect("query"),
            Err(TokenError::Used)
        );
        assert_eq!(
            store.consume_enroll_token("t2", &a, 1_000).expect("query"),
            Err(TokenError::Expired)
        );
    }

    /// The device cache is write-through: after enrollments, reports, presence changes and a rolled-back
    /// transaction, what a fresh store reads from SQLite equals what the running store serves from memory.
    #[test]
    fn device_cache_matches_the_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let inv = |region: &str| Inventory {
            labels: vec![("role".into(), "gw".into())],
            region: flotilla_shared::Label::new(region).ok(),
            zone: None,
            location: None,
            arch: "x86_64".into(),
            runtimes: vec![WorkloadKind::Wasm],
            memory_mib: 64,
            agent_version: "t".into(),
        };
        let ids: Vec<DeviceId> = ["a", "b", "c"]
            .iter()
            .map(|i| DeviceId::new(*i).expect("id"))
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let key = PublicKey([u8::try_from(i).expect("small"); 32]);
            store
                .insert_device(id, &key, &inv("eu-west"), 10)
                .expect("insert");
        }
        let report = |id: &DeviceId, counter: u64, inventory: Option<Inventory>| Report {
            device: id.clone(),
            counter,
            sent_at: 20,
            applied_generation: counter,
            last_rejection: None,
            workloads: vec![],
            inventory,
            telemetry_dropped: 0,
            hold: None,
        };
        store
            .save_report(&ids[0], &report(&ids[0], 3, None), 21)
            .expect("report");
        store
            .save_report(&ids[1], &report(&ids[1], 1, Some(inv("us-east"))), 22)
            .expect("report with inventory");
        store.set_presence(&ids[1], false, 30).expect("offline");
        store
            .set_presence(&ids[1], false, 40)
            .expect("still offline keeps offline_since");
        store.set_presence(&ids[2], true, 50).expect("online");
        // A transaction that registers a device and then fails leaves no trace, in the table or the cache.
        let phantom = DeviceId::new("phantom").expect("id");
        let failed: Result<()> = store.transaction(|s| {
            s.insert_device(&phantom, &PublicKey([9; 32]), &inv("eu-west"), 60)?;
            Err(StoreError::Corrupt("injected".into()))
        });
        assert!(failed.is_err());
        assert!(!store.device_exists(&phantom).expect("exists"));
        let fresh = Store::open(dir.path()).expect("reopen");
        let view = |s: &Store| format!("{:?}", s.devices().expect("devices"));
        assert_eq!(view(&store), view(&fresh));
        let b = store.device(&ids[1]).expect("query").expect("b");
        assert_eq!(
            (b.online, b.offline_since, b.report_counter),
            (false, Some(30), 1)
        );
        assert_eq!(
            b.inventory.region.as_ref().map(|r| r.as_str()),
            Some("us-east")
        );
    }
}
