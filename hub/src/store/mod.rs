//! The hub's SQLite state and content-addressed blob store. Owned by the hub loop alone.

mod credentials;
mod deployments;
mod devices;
mod releases;
mod secrets;

pub use credentials::{CertRow, CredentialRow};

pub use devices::DeviceRow;

pub use secrets::SecretRow;

use flotilla_shared::codec::decode_exact;
use flotilla_shared::wire::{Release, Signed, WorkloadKind};
use flotilla_shared::{DeviceId, Digest};
use rusqlite::{Connection, OptionalExtension, params};
use std::cell::RefCell;
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
/// An API token as stored (its secret never is, only its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub name: String,
    pub role: String,
    pub created_at: u64,
    /// None: until revoked.
    pub expires_at: Option<u64>,
    /// None: the whole fleet; Some: only devices, deployments and rollouts in these regions.
    pub regions: Option<Vec<String>>,
}
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
CREATE TABLE IF NOT EXISTS mqtt_credentials (principal TEXT PRIMARY KEY, secret_hash BLOB NOT NULL,
    regions TEXT NOT NULL DEFAULT '', revoked INTEGER NOT NULL DEFAULT 0, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS mqtt_previous_secrets (principal TEXT PRIMARY KEY, secret_hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS device_certs (sha256 BLOB PRIMARY KEY, device TEXT NOT NULL, serial BLOB NOT NULL,
    not_after INTEGER NOT NULL, issued_at INTEGER NOT NULL, retired_at INTEGER);
CREATE INDEX IF NOT EXISTS device_certs_by_device ON device_certs (device);
CREATE TABLE IF NOT EXISTS broker_password_lines (principal TEXT PRIMARY KEY, line TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS credential_rotations (device TEXT PRIMARY KEY, requested_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS secrets (deployment TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    sealed BLOB NOT NULL, size INTEGER NOT NULL, updated_at INTEGER NOT NULL, PRIMARY KEY (deployment, name));
CREATE TABLE IF NOT EXISTS failed_releases (device TEXT NOT NULL, release TEXT NOT NULL, deployment TEXT NOT NULL,
    reason TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (device, release));
CREATE TABLE IF NOT EXISTS deployment_revisions (name TEXT NOT NULL, revision INTEGER NOT NULL, source TEXT NOT NULL,
    at INTEGER NOT NULL, PRIMARY KEY (name, revision));
CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, who TEXT NOT NULL,
    action TEXT NOT NULL, detail TEXT NOT NULL);
";

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
/// Filters of the audit log (`GET /api/v1/audit?who=&action=&q=`).
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub who: Option<String>,
    pub action: Option<String>,
    pub text: Option<String>,
}

#[derive(Debug)]
pub struct Store {
    pub(super) conn: Connection,
    /// `synchronous=NORMAL` connection for high-rate, self-healing writes (reports, presence): a report lost to
    /// power loss is replaced by the device's next one, and an fsync per report would cap the fleet size.
    /// Desired states, releases, tokens and the audit log stay on the FULL connection.
    pub(super) fast: Connection,
    pub(super) blobs: PathBuf,
    /// Write-through cache of the devices table, loaded on first use. At fleet scale reports, presence, placement
    /// and metrics read device rows tens of thousands of times a second, and decoding them from SQLite each time
    /// dominated the hub's CPU. Every write to `devices` goes through this type and updates the cache after the
    /// SQL succeeds; a rolled-back transaction drops the cache so it is reloaded from what was committed.
    pub(super) devices: RefCell<Option<BTreeMap<DeviceId, DeviceRow>>>,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub fn kind_str(k: WorkloadKind) -> &'static str {
    k.name()
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
        // API tokens of hubs from before token expiry: the columns are added, existing tokens never expire.
        let token_columns: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('api_tokens')")?
            .query_map([], |r| r.get(0))?
            .collect::<std::result::Result<_, _>>()?;
        if !token_columns.iter().any(|c| c == "expires_at") {
            conn.execute_batch(
                "ALTER TABLE api_tokens ADD COLUMN expires_at INTEGER;
                 ALTER TABLE api_tokens ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;",
            )?;
        }
        // Region scopes (NULL: the whole fleet), the same way.
        if !token_columns.iter().any(|c| c == "regions") {
            conn.execute_batch("ALTER TABLE api_tokens ADD COLUMN regions TEXT;")?;
        }
        // Deployments stored by hubs from before revisions were kept: their current revision is the first kept.
        conn.execute(
            "INSERT OR IGNORE INTO deployment_revisions (name, revision, source, at)
             SELECT name, revision, source, updated_at FROM deployments",
            [],
        )?;
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

    /// The newest `limit` audit entries that match `f` (each filter narrows; `text` is a case-insensitive
    /// substring of the detail).
    pub fn audit_log(
        &self,
        limit: u32,
        f: &AuditFilter,
    ) -> Result<Vec<(u64, String, String, String)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT at, who, action, detail FROM audit \
             WHERE (?2 IS NULL OR who = ?2) AND (?3 IS NULL OR action = ?3) \
               AND (?4 IS NULL OR instr(lower(detail), lower(?4)) > 0) \
             ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit, f.who, f.action, f.text], |r| {
            Ok((to_u64(r.get(0)?), r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Stores an API token (only its hash).
    pub fn add_api_token(&self, token: &str, t: &ApiToken) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO api_tokens (token_hash, name, role, created_at, expires_at, regions)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                hash_token(token),
                t.name,
                t.role,
                to_i64(t.created_at),
                t.expires_at.map(to_i64),
                t.regions.as_ref().map(|r| r.join(","))
            ],
        )?;
        Ok(())
    }

    fn api_token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ApiToken> {
        Ok(ApiToken {
            name: r.get(0)?,
            role: r.get(1)?,
            created_at: to_u64(r.get(2)?),
            expires_at: r.get::<_, Option<i64>>(3)?.map(to_u64),
            regions: r.get::<_, Option<String>>(4)?.map(|s| {
                s.split(',')
                    .filter(|r| !r.is_empty())
                    .map(str::to_owned)
                    .collect()
            }),
        })
    }

    /// The API token whose secret is `token`.
    pub fn api_token(&self, token: &str) -> Result<Option<ApiToken>> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, role, created_at, expires_at, regions FROM api_tokens WHERE token_hash = ?1",
                [hash_token(token)],
                Self::api_token_row,
            )
            .optional()?)
    }

    /// Every API token, by name.
    pub fn api_tokens(&self) -> Result<Vec<ApiToken>> {
        let mut stmt = self.conn.prepare(
            "SELECT name, role, created_at, expires_at, regions FROM api_tokens ORDER BY name, created_at",
        )?;
        let rows = stmt.query_map([], Self::api_token_row)?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Deletes the API tokens named `name`; how many there were.
    pub fn revoke_api_token(&self, name: &str) -> Result<usize> {
        Ok(self
            .conn
            .execute("DELETE FROM api_tokens WHERE name = ?1", [name])?)
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

    /// Every region and zone an enrollment token presets (used or not): places the operator has announced.
    pub fn token_locations(&self) -> Result<(Vec<String>, Vec<String>)> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT region, zone FROM enroll_tokens")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Option<String>>(0)?,
                r.get::<_, Option<String>>(1)?,
            ))
        })?;
        let (mut regions, mut zones) = (Vec::new(), Vec::new());
        for row in rows {
            let (region, zone) = row?;
            regions.extend(region);
            zones.extend(zone);
        }
        Ok((regions, zones))
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::wire::{Inventory, PublicKey, Report};

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
            sealing_key: None,
            container_engine: None,
            firmware: None,
            agent_release: None,
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
            staged: vec![],
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
