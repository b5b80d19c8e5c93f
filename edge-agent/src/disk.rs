//! The agent's disk budget: free space on the data partition, or what is left of the `limits.max_data_mib` quota
//! on the data directory (database, artifacts, staging, anything else in it), whichever is smaller.

use crate::agent::Agent;
use flotilla_shared::wire::RejectReason;
use std::path::Path;

/// Bytes of every file under `dir`, recursively (symlinks are not followed). Unreadable entries count as 0.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Free bytes for the agent: the partition's available space, capped by what the quota leaves.
pub fn free_bytes(data_dir: &Path, quota: Option<u64>) -> u64 {
    let partition =
        rustix::fs::statvfs(data_dir).map_or(u64::MAX, |s| s.f_bavail.saturating_mul(s.f_frsize));
    match quota {
        Some(q) => partition.min(q.saturating_sub(dir_bytes(data_dir))),
        None => partition,
    }
}

impl Agent {
    /// Free bytes for downloads right now (see [`free_bytes`]).
    pub(crate) fn free_disk(&self) -> u64 {
        free_bytes(&self.cfg.data_dir, self.cfg.max_data_bytes)
    }

    /// Downloads refused for disk space are tried again once the space is there: the refusal is lifted and the
    /// plan recomputed, which starts the download (or refuses it again, unchanged, if it still does not fit).
    pub(crate) fn retry_refused_downloads(&mut self) {
        let waiting: Vec<_> = self
            .workload_rejects
            .iter()
            .filter_map(|(name, r)| match r {
                RejectReason::InsufficientDisk { needed, .. } => Some((name.clone(), *needed)),
                _ => None,
            })
            .collect();
        let free = self.free_disk();
        // Staging refused for space is tried again the same way.
        let staged_before = self.staging.failures.len();
        self.staging.failures.retain(|_, r| match r {
            RejectReason::InsufficientDisk { needed, .. } => {
                crate::fetch::disk_check(*needed, free).is_err()
            }
            _ => true,
        });
        if staged_before != self.staging.failures.len() {
            self.refresh_desired();
        }
        if waiting.is_empty() {
            return;
        }
        let mut lifted = false;
        for (name, needed) in waiting {
            if crate::fetch::disk_check(needed, free).is_ok() {
                tracing::info!(workload = %name, free, "disk space available again; downloading");
                self.workload_rejects.remove(&name);
                lifted = true;
            }
        }
        if lifted {
            self.refresh_desired();
        }
    }

    /// Checkpoints the database once a minute, so its WAL stays within its limit even under steady writes.
    pub(crate) fn checkpoint_if_due(&mut self) {
        if self.last_checkpoint.elapsed() < std::time::Duration::from_secs(60) {
            return;
        }
        self.last_checkpoint = std::time::Instant::now();
        if let Err(e) = self.store.checkpoint() {
            tracing::warn!(error = %e, "database checkpoint failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quota counts everything in the data directory, so freeing a file there frees budget.
    #[test]
    fn quota_counts_the_whole_data_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("artifacts")).expect("mkdir");
        std::fs::write(dir.path().join("artifacts/a"), vec![0u8; 3000]).expect("write");
        std::fs::write(dir.path().join("filler"), vec![0u8; 5000]).expect("write");
        assert_eq!(dir_bytes(dir.path()), 8000);
        assert_eq!(free_bytes(dir.path(), Some(10_000)), 2000);
        assert_eq!(
            free_bytes(dir.path(), Some(1000)),
            0,
            "over quota: nothing free"
        );
        std::fs::remove_file(dir.path().join("filler")).expect("rm");
        assert_eq!(free_bytes(dir.path(), Some(10_000)), 7000);
        assert!(free_bytes(dir.path(), None) > 0);
    }
}
