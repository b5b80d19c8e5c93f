//! Telemetry history: accepted records in their own SQLite file (`telemetry.db` beside the hub's store), written by
//! one thread of its own so that ingesting 10,000 records a second never waits on the hub loop's store, and read by
//! API calls on their own connections (WAL: readers never block the writer).
//!
//! Bounded three ways, oldest first, every eviction counted: by age (`max_age_secs`), by bytes per device
//! (`max_bytes_per_device`, the stored size of a record's value and names), and by bytes in all
//! (`max_bytes_total`: 10,000 devices at the per-device bound would otherwise be 80 GiB). Metric streams can be read downsampled
//! (`step`: per bucket min/max/mean/count of each metric), so a week at one record a second is one page.

use super::typed::FeedRecord;
use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// Records the writer may lag behind by before new ones are dropped (and counted): about 5 s at 10,000/s.
const QUEUE: usize = 50_000;
/// Records written per transaction at most.
const BATCH: usize = 5_000;
/// How often the age bound is applied.
const AGE_SWEEP: Duration = Duration::from_secs(30);
/// Fixed per-record bytes counted on top of the value and names (keys, times, index entries).
const RECORD_OVERHEAD: u64 = 48;

/// How much history the hub keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_age_secs: u64,
    pub max_bytes_per_device: u64,
    /// Over every device: the oldest records (by the hub's time) go first, whichever device they are from.
    pub max_bytes_total: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age_secs: 7 * 86_400,
            max_bytes_per_device: 8 << 20,
            max_bytes_total: 2 << 30,
        }
    }
}

/// Counters the writer keeps (read by `/metrics`).
#[derive(Debug, Default)]
pub struct HistoryStats {
    pub written: AtomicU64,
    /// Records not written because the writer was `QUEUE` records behind.
    pub dropped_backlog: AtomicU64,
    pub evicted_age: AtomicU64,
    pub evicted_bytes: AtomicU64,
    /// Records removed by the fleet-wide byte bound.
    pub evicted_total: AtomicU64,
    /// Records lost because their batch could not be written.
    pub write_errors: AtomicU64,
}

/// The hub loop's handle: hands records to the writer thread.
#[derive(Debug)]
pub struct History {
    tx: SyncSender<Arc<FeedRecord>>,
    path: PathBuf,
    pub stats: Arc<HistoryStats>,
}

/// Why the history could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("telemetry history: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored record is damaged: {0}")]
    Damaged(String),
}

fn open(path: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    let db = Connection::open_with_flags(path, flags)?;
    db.busy_timeout(Duration::from_secs(5))?;
    Ok(db)
}

impl History {
    /// Opens (creating) the history at `path` and starts its writer thread.
    pub fn open(path: &Path, retention: Retention) -> Result<Self, HistoryError> {
        let db = open(path, OpenFlags::default())?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS records (
                 device TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 stream TEXT NOT NULL,
                 workload TEXT,
                 device_time INTEGER NOT NULL,
                 hub_ms INTEGER NOT NULL,
                 type TEXT NOT NULL,
                 value TEXT NOT NULL,
                 bytes INTEGER NOT NULL,
                 PRIMARY KEY (device, seq)
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS records_by_stream ON records (device, stream, seq);
             CREATE INDEX IF NOT EXISTS records_by_age ON records (hub_ms);",
        )?;
        let mut totals = HashMap::new();
        {
            let mut q = db.prepare("SELECT device, SUM(bytes) FROM records GROUP BY device")?;
            let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (d, b) = row?;
                totals.insert(d, u64::try_from(b).unwrap_or(0));
            }
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let stats = Arc::new(HistoryStats::default());
        let writer = Writer {
            db,
            retention,
            totals,
            stats: stats.clone(),
        };
        std::thread::Builder::new()
            .name("telemetry-history".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| HistoryError::Damaged(format!("cannot start the writer: {e}")))?;
        Ok(Self {
            tx,
            path: path.to_owned(),
            stats,
        })
    }

    /// Queues one accepted record; never blocks (a full queue drops it and counts it).
    pub fn record(&self, rec: Arc<FeedRecord>) {
        match self.tx.try_send(rec) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.dropped_backlog.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Where the history lives, for readers ([`query`]).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

struct Writer {
    db: Connection,
    retention: Retention,
    /// Stored bytes per device.
    totals: HashMap<String, u64>,
    stats: Arc<HistoryStats>,
}

fn record_bytes(r: &FeedRecord, value: &str) -> u64 {
    (value.len() + r.stream.len() + r.workload.as_ref().map_or(0, String::len)) as u64
        + RECORD_OVERHEAD
}

impl Writer {
    fn run(mut self, rx: &Receiver<Arc<FeedRecord>>) {
        let mut last_sweep = Instant::now();
        loop {
            // Wake at least every sweep period, so age eviction runs on an idle fleet too.
            let first = match rx.recv_timeout(AGE_SWEEP) {
                Ok(r) => Some(r),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut batch: Vec<Arc<FeedRecord>> = first.into_iter().collect();
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if !batch.is_empty()
                && let Err(e) = self.write(&batch)
            {
                self.stats
                    .write_errors
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                tracing::error!(error = %e, records = batch.len(), "telemetry history write failed");
            }
            if last_sweep.elapsed() >= AGE_SWEEP {
                last_sweep = Instant::now();
                if let Err(e) = self.evict_old(now_ms()) {
                    tracing::error!(error = %e, "telemetry history age eviction failed");
                }
            }
        }
    }

    /// Writes a batch in one transaction, then brings every device over its byte budget back under it.
    fn write(&mut self, batch: &[Arc<FeedRecord>]) -> rusqlite::Result<()> {
        let tx = self.db.transaction()?;
        let mut over = Vec::new();
        {
            let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO records (device, seq, stream, workload, device_time, hub_ms, type, value, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for r in batch {
                let value = r.value.to_string();
                let bytes = record_bytes(r, &value);
                let n = ins.execute(params![
                    r.device,
                    i64::try_from(r.seq).unwrap_or(i64::MAX),
                    r.stream,
                    r.workload,
                    i64::try_from(r.device_time).unwrap_or(i64::MAX),
                    (r.hub_time * 1000.0) as i64,
                    r.content_type,
                    value,
                    i64::try_from(bytes).unwrap_or(i64::MAX),
                ])?;
                if n == 0 {
                    continue;
                }
                let total = self.totals.entry(r.device.clone()).or_insert(0);
                *total += bytes;
                if *total > self.retention.max_bytes_per_device {
                    over.push(r.device.clone());
                }
            }
        }
        over.sort();
        over.dedup();
        for device in over {
            evict_bytes(&tx, &device, self.retention, &mut self.totals, &self.stats)?;
        }
        if self.totals.values().sum::<u64>() > self.retention.max_bytes_total {
            evict_total(&tx, self.retention, &mut self.totals, &self.stats)?;
        }
        tx.commit()?;
        self.stats
            .written
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Drops every record the hub accepted more than `max_age_secs` ago.
    fn evict_old(&mut self, now_ms: i64) -> rusqlite::Result<()> {
        let cutoff = now_ms.saturating_sub(
            i64::try_from(self.retention.max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
        );
        let tx = self.db.transaction()?;
        let mut n = 0u64;
        {
            let mut del =
                tx.prepare_cached("DELETE FROM records WHERE hub_ms < ?1 RETURNING device, bytes")?;
            let rows = del.query_map(params![cutoff], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?;
            for row in rows {
                let (device, bytes) = row?;
                if let Some(t) = self.totals.get_mut(&device) {
                    *t = t.saturating_sub(u64::try_from(bytes).unwrap_or(0));
                }
                n += 1;
            }
        }
        tx.commit()?;
        self.stats.evicted_age.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// Drops a device's oldest records until it is at 90% of its budget (so eviction is not paid per record).
fn evict_bytes(
    tx: &rusqlite::Transaction<'_>,
    device: &str,
    retention: Retention,
    totals: &mut HashMap<String, u64>,
    stats: &HistoryStats,
) -> rusqlite::Result<()> {
    let budget = retention.max_bytes_per_device;
    let target = budget - budget / 10;
    let Some(total) = totals.get_mut(device) else {
        return Ok(());
    };
    let mut q = tx.prepare_cached(
        "SELECT seq, bytes FROM records WHERE device = ?1 ORDER BY seq LIMIT 1000",
    )?;
    let mut del = tx.prepare_cached("DELETE FROM records WHERE device = ?1 AND seq <= ?2")?;
    while *total > target {
        let rows: Vec<(i64, i64)> = q
            .query_map(params![device], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        if rows.is_empty() {
            *total = 0;
            break;
        }
        let mut upto = None;
        let mut n = 0u64;
        for (seq, bytes) in rows {
            if *total <= target {
                break;
            }
            *total = total.saturating_sub(u64::try_from(bytes).unwrap_or(0));
            upto = Some(seq);
            n += 1;
        }
        if let Some(seq) = upto {
            del.execute(params![device, seq])?;
            stats.evicted_bytes.fetch_add(n, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Drops the oldest records of the whole history (by the hub's time) until it is under the fleet-wide budget by
/// 10% of it or 8 MiB, whichever is less: enough that eviction is not paid per batch, little enough that one
/// eviction never stalls the writer for long (8 MiB is about 80,000 records).
fn evict_total(
    tx: &rusqlite::Transaction<'_>,
    retention: Retention,
    totals: &mut HashMap<String, u64>,
    stats: &HistoryStats,
) -> rusqlite::Result<()> {
    let budget = retention.max_bytes_total;
    let target = budget - (budget / 10).min(8 << 20);
    let mut grand: u64 = totals.values().sum();
    let mut oldest = tx.prepare_cached(
        "SELECT device, seq, bytes FROM records ORDER BY hub_ms, device, seq LIMIT 1000",
    )?;
    let mut del = tx.prepare_cached("DELETE FROM records WHERE device = ?1 AND seq = ?2")?;
    while grand > target {
        let rows: Vec<(String, i64, i64)> = oldest
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        if rows.is_empty() {
            totals.clear();
            break;
        }
        // Only as many as it takes: a chunk may hold more than the excess.
        for (device, seq, bytes) in rows {
            if grand <= target {
                break;
            }
            del.execute(params![device, seq])?;
            let b = u64::try_from(bytes).unwrap_or(0);
            grand = grand.saturating_sub(b);
            if let Some(t) = totals.get_mut(&device) {
                *t = t.saturating_sub(b);
            }
            stats.evicted_total.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A history read: one device, optionally one stream, a device-time range, a page.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub device: String,
    pub stream: Option<String>,
    /// Device time, Unix seconds, inclusive.
    pub since: Option<u64>,
    /// Device time, Unix seconds, exclusive.
    pub until: Option<u64>,
    /// Records with a sequence number above this one (the previous page's `next_after`).
    pub after: Option<u64>,
    pub limit: usize,
    /// Downsample metric records into buckets of this many seconds (metric streams only).
    pub step: Option<u64>,
}

/// One page of records, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    pub records: Vec<FeedRecord>,
    /// Pass as `after` for the next page; `null` when this page is the last.
    pub next_after: Option<u64>,
}

/// One downsampled bucket of a metric stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bucket {
    /// Start of the bucket (device time, Unix seconds).
    pub t: u64,
    pub records: u64,
    pub metrics: std::collections::BTreeMap<String, Summary>,
}

/// Min, max and mean of one metric in a bucket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub count: u64,
}

/// Largest page a query returns.
pub const MAX_LIMIT: usize = 10_000;

/// Reads one page of a device's history (on the caller's thread: call it from a blocking task).
pub fn query(path: &Path, q: &Query) -> Result<Page, HistoryError> {
    let db = open(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let limit = q.limit.clamp(1, MAX_LIMIT);
    let mut stmt = db.prepare_cached(
        "SELECT device, seq, stream, workload, device_time, hub_ms, type, value FROM records
         WHERE device = ?1 AND (?2 IS NULL OR stream = ?2) AND seq > ?3
           AND device_time >= ?4 AND device_time < ?5
         ORDER BY seq LIMIT ?6",
    )?;
    let rows = stmt.query_map(
        params![
            q.device,
            q.stream,
            to_i64(q.after.unwrap_or(0)),
            to_i64(q.since.unwrap_or(0)),
            to_i64(q.until.unwrap_or(u64::MAX)),
            i64::try_from(limit + 1).unwrap_or(i64::MAX),
        ],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, String>(7)?,
            ))
        },
    )?;
    let mut records = Vec::new();
    for row in rows {
        let (device, seq, stream, workload, device_time, hub_ms, ty, value) = row?;
        let value = serde_json::from_str(&value)
            .map_err(|e| HistoryError::Damaged(format!("{device} seq {seq}: {e}")))?;
        records.push(FeedRecord {
            device,
            region: None,
            zone: None,
            workload,
            stream,
            seq: u64::try_from(seq).unwrap_or(0),
            device_time: u64::try_from(device_time).unwrap_or(0),
            hub_time: hub_ms as f64 / 1000.0,
            content_type: ty,
            value,
        });
    }
    let next_after = if records.len() > limit {
        records.truncate(limit);
        records.last().map(|r| r.seq)
    } else {
        None
    };
    Ok(Page {
        records,
        next_after,
    })
}

/// Downsamples a metric stream's records in `[since, until)` into `step`-second buckets (at most [`MAX_LIMIT`]
/// buckets; a range that would need more is refused by the caller choosing a larger step).
pub fn downsample(path: &Path, q: &Query, step: u64) -> Result<Vec<Bucket>, HistoryError> {
    let db = open(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let step = step.max(1);
    let mut stmt = db.prepare_cached(
        "SELECT device_time, value FROM records
         WHERE device = ?1 AND stream = ?2 AND type = 'metrics' AND device_time >= ?3 AND device_time < ?4
         ORDER BY device_time",
    )?;
    let rows = stmt.query_map(
        params![
            q.device,
            q.stream,
            to_i64(q.since.unwrap_or(0)),
            to_i64(q.until.unwrap_or(u64::MAX)),
        ],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
    )?;
    let mut buckets: Vec<Bucket> = Vec::new();
    for row in rows {
        let (t, value) = row?;
        let t = u64::try_from(t).unwrap_or(0);
        let start = t - t % step;
        let metrics: std::collections::BTreeMap<String, f64> = serde_json::from_str(&value)
            .map_err(|e| HistoryError::Damaged(format!("metrics at {t}: {e}")))?;
        if buckets.last().is_none_or(|b| b.t != start) {
            if buckets.len() == MAX_LIMIT {
                break;
            }
            buckets.push(Bucket {
                t: start,
                records: 0,
                metrics: Default::default(),
            });
        }
        let Some(b) = buckets.last_mut() else { break };
        b.records += 1;
        for (name, v) in metrics {
            let s = b.metrics.entry(name).or_insert(Summary {
                min: v,
                max: v,
                mean: 0.0,
                count: 0,
            });
            s.min = s.min.min(v);
            s.max = s.max.max(v);
            s.count += 1;
            // Running mean: no sum to overflow precision on long buckets.
            s.mean += (v - s.mean) / s.count as f64;
        }
    }
    Ok(buckets)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(
        device: &str,
        stream: &str,
        seq: u64,
        t: u64,
        value: serde_json::Value,
    ) -> Arc<FeedRecord> {
        Arc::new(FeedRecord {
            device: device.into(),
            region: None,
            zone: None,
            workload: Some("w".into()),
            stream: stream.into(),
            seq,
            device_time: t,
            hub_time: now_ms() as f64 / 1000.0,
            content_type: if value.is_object() {
                "metrics"
            } else {
                "u64le"
            }
            .into(),
            value,
        })
    }

    /// Waits until the writer has written `n` records in all (it runs on its own thread).
    fn written(h: &History, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while h.stats.written.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "writer stuck");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn pages_cover_every_record_once_in_order() {
        let dir = tempfile::tempdir().expect("dir");
        let h = History::open(&dir.path().join("t.db"), Retention::default()).expect("open");
        for seq in 1..=25 {
            let stream = if seq % 2 == 0 { "even" } else { "odd" };
            h.record(rec("gw-1", stream, seq, 1000 + seq, json!(seq)));
        }
        h.record(rec("gw-2", "even", 1, 1000, json!(0)));
        written(&h, 26);
        let mut q = Query {
            device: "gw-1".into(),
            stream: Some("odd".into()),
            limit: 4,
            ..Default::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = query(h.path(), &q).expect("page");
            assert!(page.records.len() <= 4);
            seen.extend(page.records.iter().map(|r| r.seq));
            match page.next_after {
                Some(a) => q.after = Some(a),
                None => break,
            }
        }
        assert_eq!(seen, (1..=25).step_by(2).collect::<Vec<_>>());
        // Time range: device time in [1010, 1015).
        let page = query(
            h.path(),
            &Query {
                device: "gw-1".into(),
                since: Some(1010),
                until: Some(1015),
                limit: 100,
                ..Default::default()
            },
        )
        .expect("range");
        let seqs: Vec<u64> = page.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [10, 11, 12, 13, 14]);
        assert_eq!(page.next_after, None);
        assert_eq!(page.records[0].value, json!(10));
    }

    #[test]
    fn byte_budget_drops_the_oldest_records_of_that_device_only() {
        let dir = tempfile::tempdir().expect("dir");
        let h = History::open(
            &dir.path().join("t.db"),
            Retention {
                max_age_secs: 86_400,
                max_bytes_per_device: 10_000,
                max_bytes_total: u64::MAX,
            },
        )
        .expect("open");
        // ~100 bytes per record: 1,000 records are ten times the budget.
        let pad = "x".repeat(40);
        for seq in 1..=1000 {
            h.record(rec("big", "s", seq, seq, json!(pad)));
        }
        h.record(rec("small", "s", 1, 1, json!(pad)));
        written(&h, 1001);
        let all = |device: &str| {
            query(
                h.path(),
                &Query {
                    device: device.into(),
                    limit: MAX_LIMIT,
                    ..Default::default()
                },
            )
            .expect("query")
            .records
        };
        let big = all("big");
        let bytes: u64 = big
            .iter()
            .map(|r| record_bytes(r, &r.value.to_string()))
            .sum();
        assert!(bytes <= 10_000, "{bytes} bytes kept");
        assert!(big.len() >= 80, "only {} kept", big.len());
        // The newest survive, contiguous up to the last one.
        assert_eq!(big.last().map(|r| r.seq), Some(1000));
        assert!(big.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        assert_eq!(
            h.stats.evicted_bytes.load(Ordering::Relaxed),
            1000 - big.len() as u64
        );
        assert_eq!(all("small").len(), 1);
    }

    #[test]
    fn fleet_wide_bound_drops_the_oldest_records_of_any_device() {
        let dir = tempfile::tempdir().expect("dir");
        let h = History::open(
            &dir.path().join("t.db"),
            Retention {
                max_age_secs: 86_400,
                max_bytes_per_device: u64::MAX,
                max_bytes_total: 20_000,
            },
        )
        .expect("open");
        // ~100 bytes per record, two devices alternating one millisecond apart: 400 records are twice the budget.
        let pad = "x".repeat(40);
        let base = now_ms() as f64 / 1000.0;
        let at = |n: u64| base + n as f64 / 1000.0;
        for seq in 1..=200 {
            for (k, device) in ["a", "b"].into_iter().enumerate() {
                let mut r = (*rec(device, "s", seq, seq, json!(pad))).clone();
                r.hub_time = at(2 * seq + k as u64);
                h.record(Arc::new(r));
            }
        }
        written(&h, 400);
        let all = |device: &str| -> Vec<u64> {
            query(
                h.path(),
                &Query {
                    device: device.into(),
                    limit: MAX_LIMIT,
                    ..Default::default()
                },
            )
            .expect("query")
            .records
            .iter()
            .map(|r| r.seq)
            .collect()
        };
        let (a, b) = (all("a"), all("b"));
        let kept: u64 = (a.len() + b.len()) as u64;
        assert!(kept * 100 <= 20_000 && kept >= 150, "{kept} records kept");
        // Both devices keep their newest records: the oldest went first, from both.
        assert_eq!((a.last(), b.last()), (Some(&200), Some(&200)));
        assert!(a.len().abs_diff(b.len()) <= 1, "{} / {}", a.len(), b.len());
        assert_eq!(h.stats.evicted_total.load(Ordering::Relaxed), 400 - kept);
    }

    #[test]
    fn age_bound_drops_old_records_and_downsampling_summarises_metrics() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t.db");
        let h = History::open(&path, Retention::default()).expect("open");
        for (seq, t, v) in [(1, 100, 1.0), (2, 130, 3.0), (3, 170, 5.0), (4, 185, 7.0)] {
            h.record(rec(
                "gw",
                "w.metrics",
                seq,
                t,
                json!({ "temp": v, "one": 1.0 }),
            ));
        }
        written(&h, 4);
        let q = Query {
            device: "gw".into(),
            stream: Some("w.metrics".into()),
            ..Default::default()
        };
        let b = downsample(&path, &q, 60).expect("downsample");
        let temps: Vec<(u64, u64, f64, f64, f64)> = b
            .iter()
            .map(|b| {
                let s = &b.metrics["temp"];
                (b.t, b.records, s.min, s.max, s.mean)
            })
            .collect();
        assert_eq!(
            temps,
            [
                (60, 1, 1.0, 1.0, 1.0),
                (120, 2, 3.0, 5.0, 4.0),
                (180, 1, 7.0, 7.0, 7.0)
            ]
        );
        // Age: a writer whose bound is 0 s drops everything the hub accepted before now.
        let mut w = Writer {
            db: open(&path, OpenFlags::default()).expect("open"),
            retention: Retention {
                max_age_secs: 0,
                max_bytes_per_device: u64::MAX,
                max_bytes_total: u64::MAX,
            },
            totals: HashMap::new(),
            stats: Arc::new(HistoryStats::default()),
        };
        w.evict_old(now_ms() + 1).expect("evict");
        assert_eq!(w.stats.evicted_age.load(Ordering::Relaxed), 4);
        assert!(query(&path, &q).expect("q").records.is_empty());
    }
}
