//! The policy file on disk: read at start (a bad file stops the hub), re-read when its modification time or size
//! changes. A bad edit keeps the previous policy in force (logged, and counted in `errors`), so a typo never opens
//! the fleet up.

use super::{Policy, PolicyError};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A policy file and the policy last read from it.
#[derive(Debug)]
pub struct PolicyFile {
    path: PathBuf,
    stamp: Option<(SystemTime, u64)>,
    policy: Policy,
    /// The last reload error, while the file stays bad.
    pub error: Option<String>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn read(path: &Path) -> Result<Policy, PolicyError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
        file: file.clone(),
        message: e.to_string(),
    })?;
    Policy::parse(&file, &text)
}

impl PolicyFile {
    /// Reads the file; an unreadable or invalid file is an error (the hub does not start on it).
    pub fn open(path: &Path) -> Result<Self, PolicyError> {
        let stamp = stamp(path);
        let policy = read(path)?;
        Ok(Self {
            path: path.to_owned(),
            stamp,
            policy,
            error: None,
        })
    }

    /// The policy in force, re-read first when the file changed since the last read.
    pub fn current(&mut self) -> &Policy {
        let now = stamp(&self.path);
        if now != self.stamp {
            self.stamp = now;
            match read(&self.path) {
                Ok(p) => {
                    tracing::info!(file = %self.path.display(), "admission policy reloaded");
                    self.policy = p;
                    self.error = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "admission policy not reloaded; the previous one stays in force");
                    self.error = Some(e.to_string());
                }
            }
        }
        &self.policy
    }
}
