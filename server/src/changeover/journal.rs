//! The changeover journal: the on-disk record of a changeover, written before each step.
//!
//! `<root>/state/changeover.json` exists exactly while a changeover is under way. Every
//! write goes to a temporary file that is synced and renamed over the old one, and the
//! folder is synced, so after a crash or power loss the journal is either the previous
//! record or the new one, never half of each. `<root>/state/changeover-last.json` keeps
//! how the last changeover ended, for the status report and the admin's follow-up.
//!
//! This module is the only definition of the journal's format.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use changeover_protocol::{ChangeoverPhase, ChangeoverSummary};
use serde::{Deserialize, Serialize};

/// The journal of one changeover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub changeover_id: String,
    pub phase: ChangeoverPhase,
    pub from_version: String,
    pub target_version: String,
    /// The verified package being installed.
    pub archive: PathBuf,
    pub grace_secs: u64,
    pub notify: Option<String>,
    pub message: String,
    #[serde(with = "changeover_protocol::messages::rfc3339")]
    pub started_at: SystemTime,
    #[serde(default, with = "changeover_protocol::messages::optional_rfc3339")]
    pub scheduled_at: Option<SystemTime>,
    #[serde(default, with = "changeover_protocol::messages::optional_rfc3339")]
    pub deadline: Option<SystemTime>,
    /// When the last session was logged out: the start of the downtime.
    #[serde(
        default,
        with = "changeover_protocol::messages::optional_rfc3339_millis"
    )]
    pub stopped_at: Option<SystemTime>,
    /// The carried paths (relative to the install folder) already moved into the new
    /// release; a rollback moves exactly these back.
    #[serde(default)]
    pub moved: Vec<String>,
    /// What the carried files were before they moved: checked before the new release
    /// starts.
    #[serde(default)]
    pub carried: Vec<CarriedFile>,
    /// Set once the new release found the carried files as recorded, before its
    /// applications started and began to change them.
    #[serde(default)]
    pub carried_checked: bool,
    /// How often the new release has started without reaching a verdict; after too many,
    /// the old release is put back.
    #[serde(default)]
    pub starts_after_swap: u32,
    /// Why it is rolling back.
    #[serde(default)]
    pub failure: Option<String>,
    #[serde(default)]
    pub sessions_warned: u64,
    #[serde(default)]
    pub sessions_logged_out: u64,
    /// The agent release fetched with the server release, offered to agents afterwards.
    #[serde(default)]
    pub agent_release: Option<String>,
    /// Sessions logged out that ran an agent older than the target version.
    #[serde(default)]
    pub agents_to_update: u64,
    /// The two release folders by identity, recorded before the exchange: which one is
    /// installed is read from the folder itself, not from its version (which may be the
    /// same on both sides).
    #[serde(default)]
    pub releases: Option<ReleaseIds>,
    /// Set before the old release is deleted: from then on the changeover can only end
    /// committed.
    #[serde(default)]
    pub committing: bool,
}

/// The identity of the old and the new release folder (device and inode), which a rename
/// keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseIds {
    pub old: FolderId,
    pub new: FolderId,
}

/// A folder's device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderId {
    pub dev: u64,
    pub ino: u64,
}

impl FolderId {
    /// The identity of the folder at `path`, if there is one.
    pub fn of(path: &Path) -> Option<FolderId> {
        let metadata = std::fs::symlink_metadata(path).ok()?;
        if !metadata.is_dir() {
            return None;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            Some(FolderId {
                dev: metadata.dev(),
                ino: metadata.ino(),
            })
        }
        #[cfg(windows)]
        {
            // The volume serial number and the file index NTFS keeps across renames.
            match file_id::get_file_id(path).ok()? {
                file_id::FileId::Inode {
                    device_id,
                    inode_number,
                } => Some(FolderId {
                    dev: device_id,
                    ino: inode_number,
                }),
                file_id::FileId::LowRes {
                    volume_serial_number,
                    file_index,
                } => Some(FolderId {
                    dev: u64::from(volume_serial_number),
                    ino: file_index,
                }),
                file_id::FileId::HighRes {
                    volume_serial_number,
                    file_id,
                } => Some(FolderId {
                    dev: volume_serial_number,
                    ino: (file_id as u64) ^ ((file_id >> 64) as u64),
                }),
            }
        }
    }

    /// Whether the folder at `path` is this one.
    pub fn is_at(self, path: &Path) -> bool {
        FolderId::of(path) == Some(self)
    }
}

/// One carried file as it was recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedFile {
    /// Relative to the install folder.
    pub path: String,
    pub size: u64,
    /// Nanoseconds since the epoch; a changed time means the file must be hashed again.
    pub modified_ns: u128,
    pub sha256: String,
}

/// Where the journal lives.
#[derive(Debug, Clone)]
pub struct JournalFiles {
    pub current: PathBuf,
    pub last: PathBuf,
}

impl JournalFiles {
    pub fn new(state_dir: &Path) -> JournalFiles {
        JournalFiles {
            current: state_dir.join("changeover.json"),
            last: state_dir.join("changeover-last.json"),
        }
    }

    /// The changeover under way, if any.
    pub fn load(&self) -> anyhow::Result<Option<Journal>> {
        read_json(&self.current)
    }

    /// Records the journal durably before the step it describes is taken.
    pub fn save(&self, journal: &Journal) -> anyhow::Result<()> {
        write_durably(&self.current, journal)
    }

    /// Ends the journal: how it ended is kept, the admin's mail queued, and the journal
    /// itself removed (in that order, so a crash in between queues no mail twice: the
    /// outbox skips a Message-ID it already holds).
    pub fn finish(&self, summary: &ChangeoverSummary) -> anyhow::Result<()> {
        self.report(summary)?;
        match std::fs::remove_file(&self.current) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("cannot remove {}", self.current.display()));
            }
        }
        sync_dir(&self.current)
    }

    /// Records how the changeover went and queues the admin's mail, but keeps the journal:
    /// for a rollback that could not undo everything, which the next start finishes.
    pub fn report(&self, summary: &ChangeoverSummary) -> anyhow::Result<()> {
        write_durably(&self.last, summary)?;
        let details = self
            .load()
            .ok()
            .flatten()
            .map(|journal| crate::mail::MailDetails {
                notify: journal.notify,
                agent_release: journal.agent_release,
                agents_to_update: journal.agents_to_update,
            })
            .unwrap_or_default();
        if let Some(state_dir) = self.current.parent()
            && let Err(err) = crate::mail::queue_changeover_mail(state_dir, summary, &details)
        {
            tracing::error!(cause = %format!("{err:#}"), "cannot queue the mail to the admin");
        }
        Ok(())
    }

    pub fn last(&self) -> anyhow::Result<Option<ChangeoverSummary>> {
        read_json(&self.last)
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is damaged", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_durably<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).context("cannot encode the journal")?;
    bytes.push(b'\n');
    crate::release_tools::write_atomically(path, &bytes, false)?;
    sync_dir(path)
}

// The rename is durable only once the folder holding it is synced.
// On Windows a folder cannot be opened as a file; NTFS journals the rename itself.
fn sync_dir(path: &Path) -> anyhow::Result<()> {
    #[cfg(not(unix))]
    let _ = path;
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use changeover_protocol::ChangeoverOutcome;

    fn journal() -> Journal {
        Journal {
            changeover_id: "c-1".to_owned(),
            phase: ChangeoverPhase::CarryingOver,
            from_version: "1.0.0".to_owned(),
            target_version: "1.1.0".to_owned(),
            archive: PathBuf::from("/srv/state/downloads/x.tar.gz"),
            grace_secs: 90,
            notify: Some("it@example.com".to_owned()),
            message: "update".to_owned(),
            started_at: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
            scheduled_at: None,
            deadline: None,
            stopped_at: Some(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_800_000_000_123),
            ),
            moved: vec!["config".to_owned()],
            carried: vec![CarriedFile {
                path: "config/changeover.toml".to_owned(),
                size: 10,
                modified_ns: 5,
                sha256: "ab".repeat(32),
            }],
            carried_checked: false,
            releases: None,
            committing: false,
            starts_after_swap: 0,
            failure: None,
            sessions_warned: 3,
            sessions_logged_out: 1,
            agent_release: Some("1.1.0".to_owned()),
            agents_to_update: 1,
        }
    }

    #[test]
    fn the_journal_round_trips_and_finishing_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let files = JournalFiles::new(dir.path());
        assert_eq!(files.load().unwrap(), None);
        files.save(&journal()).unwrap();
        assert_eq!(files.load().unwrap(), Some(journal()));
        let summary = ChangeoverSummary {
            changeover_id: "c-1".to_owned(),
            outcome: ChangeoverOutcome::Committed,
            from_version: "1.0.0".to_owned(),
            target_version: "1.1.0".to_owned(),
            phase: ChangeoverPhase::HealthCheck,
            reason: None,
            started_at: SystemTime::UNIX_EPOCH,
            ended_at: SystemTime::UNIX_EPOCH,
            downtime_ms: Some(800),
            sessions_warned: 3,
            sessions_logged_out: 1,
        };
        files.finish(&summary).unwrap();
        assert_eq!(files.load().unwrap(), None);
        assert_eq!(files.last().unwrap(), Some(summary));
    }

    #[test]
    fn a_damaged_journal_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let files = JournalFiles::new(dir.path());
        std::fs::write(&files.current, "{ half").unwrap();
        assert!(files.load().unwrap_err().to_string().contains("damaged"));
    }
}
