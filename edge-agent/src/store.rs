//! The agent's SQLite state: identity, trust root and floor, the accepted desired state (signed bytes, verbatim),
//! verified releases, the artifact index, counters and the telemetry outbox.
//!
//! Owned by the main loop alone (one writer). WAL with `synchronous=FULL`, because acknowledgements (reports of the
//! applied generation) depend on what is committed here. A database that fails its integrity check at open is
//! moved aside (quarantined) and a fresh one is created, so a corrupt file never crash-loops the agent.

use flotilla_shared::codec::decode_exact;
use flotilla_shared::trust::TrustFloor;
use flotilla_shared::wire::{Rejection, Signed, WorkloadSpec};
use flotilla_shared::{DeviceId, Digest, WorkloadName};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the database is at schema version {db}, made by a newer agent that needs at least version \
         {min_reader}; this agent knows version {known}"
    )]
    TooNew {
        db: usize,
        known: usize,
        min_reader: usize,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE identity (id INTEGER PRIMARY KEY CHECK (id = 1), device_id TEXT NOT NULL, secret TEXT NOT NULL);
     CREATE TABLE roots (version INTEGER PRIMARY KEY, signed BLOB NOT NULL);
     CREATE TABLE floor (id INTEGER PRIMARY KEY CHECK (id = 1), generation INTEGER NOT NULL, issued_at INTEGER NOT NULL);
     CREATE TABLE epochs (name TEXT PRIMARY KEY, epoch INTEGER NOT NULL);
     CREATE TABLE desired (id INTEGER PRIMARY KEY CHECK (id = 1), generation INTEGER NOT NULL, signed BLOB NOT NULL);
     CREATE TABLE releases (digest BLOB PRIMARY KEY, signed BLOB NOT NULL);
     CREATE TABLE artifacts (digest BLOB PRIMARY KEY, size INTEGER NOT NULL, last_used INTEGER NOT NULL);
     CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
     CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
          CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL);",
    // 2: per-workload runtime history, so restart counts and the last error survive agent restarts.
    "CREATE TABLE workload_state (name TEXT PRIMARY KEY, restarts INTEGER NOT NULL, last_error TEXT);",
    // 3: per workload, the spec and artifact that last started successfully: what runs after a restart when the
    // accepted desired state names a release the device refused or has not fetched yet.
    "CREATE TABLE last_good (name TEXT PRIMARY KEY, spec BLOB NOT NULL, artifact BLOB NOT NULL);",
    // 4: the MQTT secret the hub issued at enrollment (the database is 0600, like the device key in it).
    "ALTER TABLE identity ADD COLUMN mqtt_secret TEXT;",
    // 5: the X25519 key workload secrets are sealed to (the database is 0600).
    "ALTER TABLE identity ADD COLUMN sealing_key BLOB;",
    // 6: container images the agent loaded, per workload: the only images its collection may remove.
    "CREATE TABLE images (workload TEXT NOT NULL, image TEXT NOT NULL, loaded_at INTEGER NOT NULL,
                          PRIMARY KEY (workload, image));",
    // 7: firmware and agent releases that were installed and rolled back: never tried again on this device.
    "CREATE TABLE failed_updates (release BLOB PRIMARY KEY, kind TEXT NOT NULL, reason TEXT NOT NULL,
                                  at INTEGER NOT NULL);",
];

/// The oldest schema version whose agent can still use a database at the current version. Migrations are
/// additive (new tables, new nullable columns) so that an agent rolled back after a self-update opens the database
/// the new agent migrated: raise this only for a migration older agents cannot live with, and they then refuse
/// the file with [`StoreError::TooNew`] instead of misreading it.
const MIN_READER: usize = 6;

/// Largest the write-ahead log may stay after a checkpoint, and roughly how far it grows between automatic ones:
/// on a small data partition an unbounded WAL (SQLite's default leaves it at its high-water mark, ~4 MiB with one
/// busy workload) starves artifact downloads.
pub const WAL_LIMIT_BYTES: u64 = 1024 * 1024;

/// An open agent database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    /// A second connection with `synchronous=NORMAL` for the telemetry outbox: telemetry is not what any
    /// acknowledgement depends on, and an fsync per record would wear flash and cost milliseconds.
    outbox: Connection,
    path: PathBuf,
    /// Whether `open` had to quarantine a corrupt file (reported once, so operators learn about it).
    pub quarantined: Option<PathBuf>,
}

fn open_conn(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    no_lookaside(&conn)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "journal_size_limit", to_i64(WAL_LIMIT_BYTES))?;
    // Pages of 4 KiB: an automatic checkpoint once the WAL holds about WAL_LIMIT_BYTES.
    conn.pragma_update(None, "wal_autocheckpoint", to_i64(WAL_LIMIT_BYTES / 4096))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// Turns off the connection's lookaside allocator: 48 KiB of small-object slots that SQLite sets up (and touches)
/// per connection, a fifth of an idle agent's heap for its two connections. The agent runs a few statements a
/// second at most, where the slots save nothing measurable; they pay off in the hub, which keeps them.
fn no_lookaside(conn: &Connection) -> Result<()> {
    use rusqlite::ffi;
    // SAFETY: `handle` is this open connection's own pointer, used on this thread while `conn` is borrowed; no
    // statement has run yet, so no lookaside memory is in use (SQLite returns SQLITE_BUSY otherwise). With a
    // null buffer and a zero size and count, SQLite reads no buffer and frees its own slots.
    #[allow(unsafe_code)]
    let rc = unsafe {
        ffi::sqlite3_db_config(
            conn.handle(),
            ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            0 as std::ffi::c_int,
            0 as std::ffi::c_int,
        )
    };
    if rc != ffi::SQLITE_OK {
        return Err(
            rusqlite::Error::SqliteFailure(ffi::Error::new(rc), Some("lookaside".into())).into(),
        );
    }
    Ok(())
}

fn integrity_ok(conn: &Connection) -> bool {
    conn.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
        .is_ok_and(|s| s == "ok")
}

/// Brings the database to `migrations.len()`, recording the oldest version that can still read it. A database
/// a newer agent migrated (a rollback after a self-update) is used as it is when this agent is at least its
/// recorded oldest reader, and refused otherwise; it is never migrated down.
fn migrate(conn: &mut Connection, migrations: &[&str], min_reader: usize) -> Result<()> {
    let version: usize = conn
        .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))?
        .try_into()
        .unwrap_or(0);
    if version > migrations.len() {
        let recorded: Option<Vec<u8>> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_min_reader'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        // A database without the record predates it: every migration then was additive.
        let needed = recorded
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if needed > migrations.len() {
            return Err(StoreError::TooNew {
                db: version,
                known: migrations.len(),
                min_reader: needed,
            });
        }
        tracing::info!(
            db = version,
            known = migrations.len(),
            "the database was migrated by a newer agent; using it as it is"
        );
        return Ok(());
    }
    for (i, sql) in migrations.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_min_reader', ?1)",
            [min_reader.to_string().into_bytes()],
        )?;
        tx.commit()?;
    }
    Ok(())
}

impl Store {
    /// Opens (or creates) `dir/agent.db`, checking integrity first.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("agent.db");
        let mut quarantined = None;
        let healthy = path.exists() && open_conn(&path).map(|c| integrity_ok(&c)).unwrap_or(false);
        if path.exists() && !healthy {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let aside = dir.join(format!("agent.db.corrupt-{stamp}"));
            std::fs::rename(&path, &aside)?;
            for ext in ["-wal", "-shm"] {
                let side = dir.join(format!("agent.db{ext}"));
                if side.exists() {
                    std::fs::rename(&side, dir.join(format!("agent.db.corrupt-{stamp}{ext}")))?;
                }
            }
            quarantined = Some(aside);
        }
        let mut conn = open_conn(&path)?;
        migrate(&mut conn, MIGRATIONS, MIN_READER)?;
        // The database holds the device's signing key and MQTT secret: readable by the agent's user alone.
        for ext in ["", "-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(ext);
            let p = PathBuf::from(p);
            if p.exists() {
                std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            }
        }
        let outbox = open_conn(&path)?;
        outbox.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(Self {
            conn,
            outbox,
            path,
            quarantined,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores the MQTT secret issued at enrollment.
    pub fn set_mqtt_secret(&mut self, secret: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE identity SET mqtt_secret = ?1 WHERE id = 1",
            [secret],
        )?;
        Ok(())
    }

    /// Remembers the validity of the client certificate the hub issued.
    pub fn set_cert_validity(&self, not_before: u64, not_after: u64) -> Result<()> {
        let mut value = not_before.to_le_bytes().to_vec();
        value.extend_from_slice(&not_after.to_le_bytes());
        self.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('client_cert_validity', ?1)",
            [value],
        )?;
        Ok(())
    }

    /// (not_before, not_after) of the issued client certificate, if there is one.
    pub fn cert_validity(&self) -> Result<Option<(u64, u64)>> {
        let v: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'client_cert_validity'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        v.map(|v| {
            let (a, b) = v
                .split_at_checked(8)
                .ok_or_else(|| StoreError::Corrupt("certificate validity".into()))?;
            let a: [u8; 8] = a
                .try_into()
                .map_err(|_| StoreError::Corrupt("certificate validity".into()))?;
            let b: [u8; 8] = b
                .try_into()
                .map_err(|_| StoreError::Corrupt("certificate validity".into()))?;
            Ok((u64::from_le_bytes(a), u64::from_le_bytes(b)))
        })
        .transpose()
    }

    /// Stores the key workload secrets are sealed to.
    pub fn set_sealing_key(&self, key: &[u8; 32]) -> Result<()> {
        self.conn.execute(
            "UPDATE identity SET sealing_key = ?1 WHERE id = 1",
            [key.as_slice()],
        )?;
        Ok(())
    }

    /// The key workload secrets are sealed to, if the device has one.
    pub fn sealing_key(&self) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row("SELECT sealing_key FROM identity WHERE id = 1", [], |r| {
                r.get::<_, Option<Vec<u8>>>(0)
            })
            .optional()?
            .flatten())
    }

    /// The MQTT secret issued at enrollment, if any.
    pub fn mqtt_secret(&self) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT mqtt_secret FROM identity WHERE id = 1", [], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()?
            .flatten())
    }

    /// Copies the WAL into the database and truncates it (bounded disk use; run every minute by the agent).
    pub fn checkpoint(&self) -> Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Bytes the database uses on disk: the file, its WAL and its shared-memory index.
    pub fn disk_bytes(&self) -> u64 {
        ["", "-wal", "-shm"]
            .iter()
            .filter_map(|ext| {
                let mut p = self.path.clone().into_os_string();
                p.push(ext);
                std::fs::metadata(p).ok().map(|m| m.len())
            })
            .sum()
    }

    /// Records what a workload is running after a successful start (spec and artifact), for restarts.
    pub fn save_last_good(&mut self, spec: &WorkloadSpec, artifact: &Digest) -> Result<()> {
        let bytes = postcard::to_stdvec(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn.execute(
            "INSERT OR REPLACE INTO last_good (name, spec, artifact) VALUES (?1, ?2, ?3)",
            params![spec.name.as_str(), bytes, artifact.0.as_slice()],
        )?;
        Ok(())
    }

    /// Forgets the last-good entries of workloads not in `keep` (they left the desired state).
    pub fn retain_last_good(&mut self, keep: &[WorkloadName]) -> Result<()> {
        for (name, ..) in self.last_good()? {
            if !keep.contains(&name) {
                self.conn
                    .execute("DELETE FROM last_good WHERE name = ?1", [name.as_str()])?;
            }
        }
        Ok(())
    }

    /// Records that the agent loaded `image` for `workload` (a reload refreshes the time).
    pub fn record_image(&mut self, workload: &str, image: &str, now: u64) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO images (workload, image, loaded_at) VALUES (?1, ?2, ?3)",
            params![workload, image, i64::try_from(now).unwrap_or(i64::MAX)],
        )?;
        Ok(())
    }

    /// Every image the agent loaded.
    pub fn images(&self) -> Result<Vec<flotilla_agent_core::containers::LoadedImage>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT workload, image, loaded_at FROM images")?;
        let rows = stmt.query_map([], |r| {
            Ok(flotilla_agent_core::containers::LoadedImage {
                workload: r.get(0)?,
                image: r.get(1)?,
                loaded_at: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Forgets images the engine no longer has.
    pub fn forget_images(&mut self, images: &[String]) -> Result<()> {
        for i in images {
            self.conn
                .execute("DELETE FROM images WHERE image = ?1", [i])?;
        }
        Ok(())
    }

    /// Every workload's last successfully started spec and artifact.
    pub fn last_good(&self) -> Result<Vec<(WorkloadName, WorkloadSpec, Digest)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT spec, artifact FROM last_good ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (spec, artifact) = row?;
            // A row written by an older protocol version no longer decodes: it is only a fallback, so it is
            // skipped (and replaced at the next successful start) instead of keeping the agent from starting.
            let spec: WorkloadSpec = match decode_exact(&spec) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an undecodable last good version");
                    continue;
                }
            };
            let artifact: [u8; 32] = artifact
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("last_good artifact digest".into()))?;
            out.push((spec.name.clone(), spec, Digest(artifact)));
        }
        Ok(out)
    }

    /// `PRAGMA integrity_check` (used by the crash campaign and at start).
    pub fn integrity_ok(&self) -> bool {
        integrity_ok(&self.conn)
    }

    pub fn identity(&self) -> Result<Option<(DeviceId, String)>> {
        let row: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT device_id, secret FROM identity WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(id, secret)| {
            DeviceId::new(id)
                .map(|id| (id, secret))
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .transpose()
    }

    /// Stores the identity and the pinned root in one transaction (enrollment).
    pub fn save_identity(
        &mut self,
        device: &DeviceId,
        secret: &str,
        root: &Signed,
        root_version: u32,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO identity (id, device_id, secret) VALUES (1, ?1, ?2)",
            params![device.as_str(), secret],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO roots (version, signed) VALUES (?1, ?2)",
            params![root_version, encode(root)],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn save_root(&mut self, version: u32, signed: &Signed) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO roots (version, signed) VALUES (?1, ?2)",
            params![version, encode(signed)],
        )?;
        Ok(())
    }

    /// All stored roots, oldest first (the first is the pinned one; the rest a rotation chain re-verified at boot).
    pub fn roots(&self) -> Result<Vec<Signed>> {
        let mut stmt = self
            .conn
            .prepare("SELECT signed FROM roots ORDER BY version")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        rows.map(|b| decode_signed(&b?)).collect()
    }

    pub fn floor(&self) -> Result<TrustFloor> {
        let (generation, issued_at) = self
            .conn
            .query_row(
                "SELECT generation, issued_at FROM floor WHERE id = 1",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()?
            .unwrap_or((0, 0));
        let mut stmt = self.conn.prepare("SELECT name, epoch FROM epochs")?;
        let mut epochs = std::collections::BTreeMap::new();
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (name, epoch) = row?;
            let name = WorkloadName::new(name).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            epochs.insert(
                name,
                u32::try_from(epoch).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            );
        }
        Ok(TrustFloor {
            generation: u64::try_from(generation).unwrap_or(0),
            issued_at: u64::try_from(issued_at).unwrap_or(0),
            epochs,
        })
    }

    /// Commits a newly accepted desired state and raises the floor, atomically. Returns only once durable.
    pub fn accept_desired(
        &mut self,
        generation: u64,
        issued_at: u64,
        signed: &Signed,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO desired (id, generation, signed) VALUES (1, ?1, ?2)",
            params![to_i64(generation), encode(signed)],
        )?;
        tx.execute(
            "INSERT INTO floor (id, generation, issued_at) VALUES (1, ?1, ?2)
             ON CONFLICT(id) DO UPDATE SET generation = max(generation, ?1), issued_at = max(issued_at, ?2)",
            params![to_i64(generation), to_i64(issued_at)],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn desired(&self) -> Result<Option<Signed>> {
        let bytes: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT signed FROM desired WHERE id = 1", [], |r| r.get(0))
            .optional()?;
        bytes.map(|b| decode_signed(&b)).transpose()
    }

    /// Stores a verified release and raises the workload's epoch floor in one transaction.
    pub fn accept_release(
        &mut self,
        digest: &Digest,
        signed: &Signed,
        name: &WorkloadName,
        epoch: u32,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO releases (digest, signed) VALUES (?1, ?2)",
            params![digest.0.as_slice(), encode(signed)],
        )?;
        tx.execute(
            "INSERT INTO epochs (name, epoch) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET epoch = max(epoch, ?2)",
            params![name.as_str(), epoch],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Remembers a firmware or agent release that was installed and rolled back, with the reason.
    pub fn record_failed_update(
        &mut self,
        release: &Digest,
        kind: &str,
        reason: &str,
        now: u64,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO failed_updates (release, kind, reason, at) VALUES (?1, ?2, ?3, ?4)",
            params![release.0.as_slice(), kind, reason, to_i64(now)],
        )?;
        Ok(())
    }

    /// Every firmware or agent release that was rolled back on this device, with the reason.
    pub fn failed_updates(&self) -> Result<Vec<(Digest, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT release, reason FROM failed_updates")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (d, reason) = row?;
            let d: [u8; 32] = d
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("failed update digest".into()))?;
            out.push((Digest(d), reason));
        }
        Ok(out)
    }

    /// Stores a verified release staged ahead of its cutover, leaving the epoch floor where it is.
    pub fn stage_release(&mut self, digest: &Digest, signed: &Signed) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO releases (digest, signed) VALUES (?1, ?2)",
            params![digest.0.as_slice(), encode(signed)],
        )?;
        Ok(())
    }

    pub fn release(&self, digest: &Digest) -> Result<Option<Signed>> {
        let bytes: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT signed FROM releases WHERE digest = ?1",
                [digest.0.as_slice()],
                |r| r.get(0),
            )
            .optional()?;
        bytes.map(|b| decode_signed(&b)).transpose()
    }

    pub fn add_artifact(&mut self, digest: &Digest, size: u64, now: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO artifacts (digest, size, last_used) VALUES (?1, ?2, ?3)
             ON CONFLICT(digest) DO UPDATE SET last_used = ?3",
            params![digest.0.as_slice(), to_i64(size), to_i64(now)],
        )?;
        Ok(())
    }

    /// Every indexed artifact and its recorded size.
    pub fn artifacts(&self) -> Result<Vec<(Digest, u64)>> {
        let mut stmt = self.conn.prepare("SELECT digest, size FROM artifacts")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (d, size) = row?;
            let d: [u8; 32] = d
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("artifact digest".into()))?;
            out.push((Digest(d), u64::try_from(size).unwrap_or(0)));
        }
        Ok(out)
    }

    pub fn has_artifact(&self, digest: &Digest) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM artifacts WHERE digest = ?1",
                [digest.0.as_slice()],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Forgets artifacts not in `keep` and returns their digests so the caller can delete the files.
    pub fn collect_artifacts(&mut self, keep: &[Digest]) -> Result<Vec<Digest>> {
        let mut stmt = self.conn.prepare("SELECT digest FROM artifacts")?;
        let all: Vec<Vec<u8>> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<std::result::Result<_, _>>()?;
        drop(stmt);
        let mut gone = Vec::new();
        for raw in all {
            let Ok(arr) = <[u8; 32]>::try_from(raw.as_slice()) else {
                continue;
            };
            let d = Digest(arr);
            if !keep.contains(&d) {
                self.conn
                    .execute("DELETE FROM artifacts WHERE digest = ?1", [raw.as_slice()])?;
                gone.push(d);
            }
        }
        Ok(gone)
    }

    /// Increments and returns a persisted counter (report counter, telemetry sequence). Durable before use.
    pub fn next_counter(&mut self, name: &str) -> Result<u64> {
        let v: i64 = self.conn.query_row(
            "INSERT INTO counters (name, value) VALUES (?1, 1)
             ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value",
            [name],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(v).unwrap_or(0))
    }

    pub fn counter(&self, name: &str) -> Result<u64> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
    }

    pub fn set_rejection(&mut self, rejection: Option<&Rejection>) -> Result<()> {
        match rejection {
            Some(r) => {
                let bytes =
                    postcard::to_stdvec(r).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                self.conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('rejection', ?1)",
                    [bytes],
                )?;
            }
            None => {
                self.conn
                    .execute("DELETE FROM meta WHERE key = 'rejection'", [])?;
            }
        }
        Ok(())
    }

    pub fn rejection(&self) -> Result<Option<Rejection>> {
        let b: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'rejection'", [], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(b.and_then(|b| decode_exact(&b).ok()))
    }

    /// Replaces the stored per-workload runtime history (restart counts, last errors).
    pub fn save_workload_states(
        &mut self,
        states: &[(WorkloadName, u32, Option<String>)],
    ) -> Result<()> {
        // Not something an acknowledgement depends on: the NORMAL-sync connection avoids an fsync per change.
        let tx = self.outbox.transaction()?;
        tx.execute("DELETE FROM workload_state", [])?;
        for (name, restarts, err) in states {
            tx.execute(
                "INSERT INTO workload_state (name, restarts, last_error) VALUES (?1, ?2, ?3)",
                params![name.as_str(), restarts, err],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn workload_states(&self) -> Result<Vec<(WorkloadName, u32, Option<String>)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, restarts, last_error FROM workload_state")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (n, restarts, err) = row?;
            if let Ok(n) = WorkloadName::new(n) {
                out.push((n, restarts, err));
            }
        }
        Ok(out)
    }

    /// Appends to the outbox, then drops the oldest records while over `cap_bytes`. Returns how many were dropped.
    pub fn outbox_push(&mut self, topic: &str, payload: &[u8], cap_bytes: u64) -> Result<u64> {
        self.outbox_push_with(cap_bytes, |_| (topic.to_owned(), payload.to_vec()))
    }

    /// Like [`Store::outbox_push`], but `build` receives the next telemetry sequence number, allocated in the same
    /// transaction as the insert so sequence numbers and outbox order always agree.
    pub fn outbox_push_with(
        &mut self,
        cap_bytes: u64,
        build: impl FnOnce(u64) -> (String, Vec<u8>),
    ) -> Result<u64> {
        let tx = self.outbox.transaction()?;
        let seq: i64 = tx.query_row(
            "INSERT INTO counters (name, value) VALUES ('telemetry_seq', 1)
             ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value",
            [],
            |r| r.get(0),
        )?;
        let (topic, payload) = build(u64::try_from(seq).unwrap_or(0));
        tx.execute(
            "INSERT INTO outbox (topic, payload) VALUES (?1, ?2)",
            params![topic, payload],
        )?;
        let mut dropped = 0;
        loop {
            let total: i64 = tx.query_row(
                "SELECT COALESCE(SUM(length(payload) + length(topic)), 0) FROM outbox",
                [],
                |r| r.get(0),
            )?;
            if u64::try_from(total).unwrap_or(0) <= cap_bytes {
                break;
            }
            tx.execute(
                "DELETE FROM outbox WHERE seq = (SELECT MIN(seq) FROM outbox)",
                [],
            )?;
            dropped += 1;
        }
        if dropped > 0 {
            tx.execute(
                "INSERT INTO counters (name, value) VALUES ('telemetry_dropped', ?1)
                 ON CONFLICT(name) DO UPDATE SET value = value + ?1",
                [dropped],
            )?;
        }
        tx.commit()?;
        Ok(u64::try_from(dropped).unwrap_or(0))
    }

    /// The oldest `limit` outbox records, in order.
    pub fn outbox_peek(&self, limit: usize) -> Result<Vec<(i64, String, Vec<u8>)>> {
        let mut stmt = self
            .outbox
            .prepare("SELECT seq, topic, payload FROM outbox ORDER BY seq LIMIT ?1")?;
        let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    pub fn outbox_delete_through(&mut self, seq: i64) -> Result<()> {
        self.outbox
            .execute("DELETE FROM outbox WHERE seq <= ?1", [seq])?;
        Ok(())
    }

    pub fn outbox_len(&self) -> Result<u64> {
        let n: i64 = self
            .outbox
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn encode(signed: &Signed) -> Vec<u8> {
    postcard::to_stdvec(signed).unwrap_or_default()
}

fn decode_signed(bytes: &[u8]) -> Result<Signed> {
    decode_exact(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent rolled back after a self-update opens the database the newer agent migrated: the previous
    /// version's code (the migrations it knew) reads and writes it as it is, and a database whose newer schema
    /// its agent marked unreadable for older ones is refused with a typed error, untouched.
    #[test]
    fn a_rolled_back_agent_opens_the_database_a_newer_one_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.db");
        {
            let mut s = Store::open(dir.path()).expect("open");
            s.conn
                .execute(
                    "INSERT INTO identity (id, device_id, secret) VALUES (1, 'dev-1', 'secret')",
                    [],
                )
                .expect("identity");
            s.record_failed_update(&Digest([7; 32]), "agent", "exited", 1)
                .expect("failed update");
        }
        // The previous agent knew one migration less: the current schema must be usable by it.
        let previous = &MIGRATIONS[..MIGRATIONS.len() - 1];
        assert!(
            MIN_READER <= previous.len(),
            "the newest migration must be additive"
        );
        let mut conn = open_conn(&path).expect("conn");
        migrate(&mut conn, previous, MIN_READER).expect("the previous agent opens it");
        let (id, secret): (String, String) = conn
            .query_row("SELECT device_id, secret FROM identity", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("identity readable");
        assert_eq!((id.as_str(), secret.as_str()), ("dev-1", "secret"));
        // It writes with the statements it knows (they name their columns, so new ones keep their defaults).
        conn.execute(
            "INSERT INTO counters (name, value) VALUES ('report', 5)",
            [],
        )
        .expect("the previous agent writes");
        drop(conn);
        // And the newer agent, once the update is tried again, still finds its own rows.
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.counter("report").expect("counter"), 5);
        assert_eq!(s.failed_updates().expect("failed").len(), 1);
        drop(s);

        // A future migration that older agents cannot live with says so; they refuse the file, typed.
        let conn = open_conn(&path).expect("conn");
        conn.pragma_update(None, "user_version", to_i64(MIGRATIONS.len() as u64 + 1))
            .expect("version");
        conn.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'schema_min_reader'",
            [(MIGRATIONS.len() + 1).to_string().into_bytes()],
        )
        .expect("min reader");
        drop(conn);
        let err = Store::open(dir.path()).expect_err("too new");
        assert!(
            matches!(err, StoreError::TooNew { known, .. } if known == MIGRATIONS.len()),
            "{err}"
        );
    }

    /// The outbox keeps order and, past its byte cap, drops the oldest records and counts them.
    #[test]
    fn outbox_cap_drops_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(dir.path()).expect("open");
        let mut dropped = 0;
        for i in 0..10u8 {
            dropped += s.outbox_push("t", &[i; 100], 350).expect("push");
        }
        assert_eq!(dropped, 7);
        assert_eq!(s.counter("telemetry_dropped").expect("counter"), 7);
        let rows = s.outbox_peek(10).expect("peek");
        assert_eq!(
            rows.iter().map(|r| r.2[0]).collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
    }

    /// A corrupt database file is quarantined and replaced instead of failing the agent.
    #[test]
    fn corrupt_database_is_quarantined() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("agent.db"),
            b"this is not a database, it is garbage ".repeat(200),
        )
        .expect("write");
        let s = Store::open(dir.path()).expect("open recovers");
        assert!(s.quarantined.is_some());
        assert!(s.integrity_ok());
        assert_eq!(s.desired().expect("query"), None);
    }

    /// The floor only ever rises, whatever order commits arrive in.
    #[test]
    fn floor_only_rises() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store::open(dir.path()).expect("open");
        let doc = Signed {
            body: vec![1],
            signatures: vec![],
        };
        s.accept_desired(5, 100, &doc).expect("commit");
        s.accept_desired(3, 50, &doc).expect("commit");
        let f = s.floor().expect("floor");
        assert_eq!((f.generation, f.issued_at), (5, 100));
        let n = WorkloadName::new("a").expect("name");
        s.accept_release(&Digest([1; 32]), &doc, &n, 4)
            .expect("release");
        s.accept_release(&Digest([2; 32]), &doc, &n, 2)
            .expect("release");
        assert_eq!(s.floor().expect("floor").epochs.get(&n), Some(&4));
    }
}
