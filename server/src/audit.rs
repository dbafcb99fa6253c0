//! The audit log of admin actions: `<root>/state/audit.jsonl`, one JSON object per line
//! (an [`AuditEntry`]), appended as each action is answered.
//!
//! The log is bounded: past [`ROTATE_AT`] bytes it becomes `audit.jsonl.1` (replacing the
//! one before), so failed logins from many addresses cannot fill the disk. A write that
//! fails (a full disk) is logged and the action goes on: the audit log never stands
//! between the admin and the server.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use changeover_protocol::messages::AuditEntry;
use tracing::warn;

/// The [`crate::unwritten`] key of the audit log.
const UNWRITTEN: &str = "audit log";

/// Size past which the log is rotated.
pub const ROTATE_AT: u64 = 1024 * 1024;
/// How much of the end of the log [`AuditLog::latest`] reads.
const TAIL_BYTES: u64 = 64 * 1024;

/// Through which door an admin came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Cli,
    Console,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Cli => "cli",
            Via::Console => "console",
        }
    }
}

/// Who asked, from where.
#[derive(Debug, Clone, Copy)]
pub struct Actor {
    pub address: std::net::IpAddr,
    pub via: Via,
}

/// The log; cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    path: PathBuf,
    // Appends and rotations from concurrent tasks do not interleave.
    lock: Arc<Mutex<()>>,
}

impl AuditLog {
    pub fn new(state_dir: &Path) -> AuditLog {
        AuditLog {
            path: state_dir.join("audit.jsonl"),
            lock: Arc::new(Mutex::new(())),
        }
    }

    /// Appends one action (on a blocking thread; a failure is logged, not returned).
    pub async fn record(
        &self,
        actor: Actor,
        action: &str,
        detail: Option<String>,
        outcome: Result<(), Refused>,
    ) {
        let (outcome, reason) = match outcome {
            Ok(()) => ("ok", None),
            Err(Refused::Throttled(reason)) => ("throttled", Some(reason)),
            Err(Refused::Because(reason)) => ("refused", Some(reason)),
        };
        let entry = AuditEntry {
            at: SystemTime::now(),
            actor: "admin".to_owned(),
            address: actor.address.to_string(),
            via: actor.via.as_str().to_owned(),
            action: action.to_owned(),
            detail,
            outcome: outcome.to_owned(),
            reason,
        };
        let log = self.clone();
        let written = tokio::task::spawn_blocking(move || log.append(&entry)).await;
        match written {
            Ok(Ok(())) => {
                crate::unwritten::clear(UNWRITTEN);
            }
            Ok(Err(err)) => {
                let problem = format!("cannot write the audit log {}: {err}", self.path.display());
                if crate::unwritten::report(UNWRITTEN, problem) {
                    warn!(path = %self.path.display(), cause = %err, "cannot write the audit log; admin actions go on unrecorded");
                }
            }
            Err(err) => warn!(cause = %err, "the audit log writer failed"),
        }
    }

    fn append(&self, entry: &AuditEntry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if std::fs::metadata(&self.path).is_ok_and(|meta| meta.len() >= ROTATE_AT) {
            std::fs::rename(&self.path, self.path.with_extension("jsonl.1"))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.write_all(&line)?;
        file.sync_data()
    }

    /// The latest `limit` entries, newest first. Unreadable lines are skipped.
    pub fn latest(&self, limit: usize) -> Vec<AuditEntry> {
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let length = file.metadata().map_or(0, |meta| meta.len());
        let start = length.saturating_sub(TAIL_BYTES);
        let mut tail = Vec::new();
        if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut tail).is_err() {
            return Vec::new();
        }
        let mut lines: Vec<&[u8]> = tail.split(|byte| *byte == b'\n').collect();
        if start > 0 && !lines.is_empty() {
            // The first line was cut by the seek.
            lines.remove(0);
        }
        lines
            .into_iter()
            .rev()
            .filter_map(|line| serde_json::from_slice(line).ok())
            .take(limit)
            .collect()
    }
}

/// Why an action was not done.
#[derive(Debug, Clone)]
pub enum Refused {
    Throttled(String),
    Because(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor() -> Actor {
        Actor {
            address: "192.0.2.7".parse().unwrap(),
            via: Via::Console,
        }
    }

    #[tokio::test]
    async fn entries_come_back_newest_first_with_who_what_and_how_it_ended() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path());
        log.record(actor(), "login", None, Ok(())).await;
        log.record(
            actor(),
            "update",
            Some("1.1.0, grace 5 s".to_owned()),
            Err(Refused::Because("no release".to_owned())),
        )
        .await;
        let entries = log.latest(10);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].action, "update");
        assert_eq!(entries[0].outcome, "refused");
        assert_eq!(entries[0].reason.as_deref(), Some("no release"));
        assert_eq!(entries[0].via, "console");
        assert_eq!(entries[0].address, "192.0.2.7");
        assert_eq!(entries[1].action, "login");
        assert_eq!(log.latest(1).len(), 1);
    }

    #[tokio::test]
    async fn the_log_is_rotated_and_stays_readable() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path());
        let long = "x".repeat(10_000);
        for _ in 0..(ROTATE_AT / 10_000 + 5) {
            log.record(actor(), "login", Some(long.clone()), Ok(()))
                .await;
        }
        let size = std::fs::metadata(dir.path().join("audit.jsonl"))
            .unwrap()
            .len();
        assert!(size < ROTATE_AT, "{size}");
        assert!(dir.path().join("audit.jsonl.1").exists());
        let latest = log.latest(3);
        assert_eq!(latest.len(), 3);
    }

    #[tokio::test]
    async fn an_unwritable_log_does_not_fail_the_action() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(&dir.path().join("missing"));
        log.record(actor(), "login", None, Ok(())).await;
        assert!(log.latest(5).is_empty());
    }
}
