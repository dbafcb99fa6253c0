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
    /// What the warnings say in English: the admin's words or the default sentence.
    pub message: String,
    /// The admin's words as given (`update_request.message`), for the agents to show beside
    /// their own text in the user's language. Absent from journals written before it.
    #[serde(default)]
    pub admin_message: Option<String>,
    /// The language of the admin's mail (`[mail] language` when the changeover began): the
    /// mail may be written by the next process, or a watchdog, that reads no config.
    #[serde(default)]
    pub mail_language: crate::mail::MailLanguage,
    #[serde(with = "changeover_protocol::messages::rfc3339")]
    pub started_at: SystemTime,
    #[serde(default, with = "changeover_protocol::messages::optional_rfc3339")]
    pub scheduled_at: Option<SystemTime>,
    #[serde(default, with = "changeover_protocol::messages::optional_rfc3339")]
    pub deadline: Option<SystemTime>,
    /// When the last session's logout was written: the start of the downtime.
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
    /// Every summary, one JSON line each, oldest first (`changeover-history.jsonl`).
    pub history: PathBuf,
    /// Summaries [`JournalFiles::finish_or_keep`] could not write, for
    /// [`JournalFiles::retry_unwritten`]; shared by the clones of these files.
    unwritten: std::sync::Arc<std::sync::Mutex<Vec<ChangeoverSummary>>>,
}

/// The [`crate::unwritten`] keys of the journal's writes.
pub const UNWRITTEN_SUMMARY: &str = "changeover summary";
pub const UNWRITTEN_JOURNAL: &str = "changeover journal";

/// How often a summary that could not be written is tried again.
pub const RETRY_UNWRITTEN: std::time::Duration = std::time::Duration::from_secs(5);

impl JournalFiles {
    pub fn new(state_dir: &Path) -> JournalFiles {
        JournalFiles {
            current: state_dir.join("changeover.json"),
            last: state_dir.join("changeover-last.json"),
            history: state_dir.join("changeover-history.jsonl"),
            unwritten: std::sync::Arc::default(),
        }
    }

    /// [`JournalFiles::finish`], or, when that fails (a full disk), the summary kept in
    /// memory and the journal on disk: the server starts and serves all the same, `admin
    /// status` names what could not be written, and [`JournalFiles::retry_unwritten`]
    /// writes it once there is room. A server that stops before then finds the journal at
    /// its next start and settles it again, the same way.
    pub fn finish_or_keep(&self, summary: &ChangeoverSummary) {
        if let Err(err) = self.finish(summary) {
            let problem = format!(
                "cannot record how changeover {} ended ({}): {err:#}; it is recorded, and \
                 the admin mailed, as soon as there is room",
                summary.changeover_id, summary.outcome
            );
            tracing::error!(%problem, "the server goes on without the record");
            crate::unwritten::report(UNWRITTEN_SUMMARY, problem);
            self.lock_unwritten().push(summary.clone());
        }
    }

    /// [`JournalFiles::save`], or, when that fails (a full disk), an error in the log and in
    /// `admin status`: a starting server goes on from what is on disk, because the steps
    /// that follow are settled from the folders themselves at the next start.
    pub fn save_or_report(&self, journal: &Journal) {
        match self.save(journal) {
            Ok(()) => {
                crate::unwritten::clear(UNWRITTEN_JOURNAL);
            }
            Err(err) => {
                let problem = format!(
                    "cannot update the journal of changeover {}: {err:#}",
                    journal.changeover_id
                );
                tracing::error!(%problem, "going on from what is on disk");
                crate::unwritten::report(UNWRITTEN_JOURNAL, problem);
            }
        }
    }

    /// Writes the summaries [`JournalFiles::finish_or_keep`] kept, every
    /// [`RETRY_UNWRITTEN`], until they are all written or `shutdown`.
    pub async fn retry_unwritten(self, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RETRY_UNWRITTEN) => {}
            }
            let waiting = std::mem::take(&mut *self.lock_unwritten());
            if waiting.is_empty() {
                continue;
            }
            let files = self.clone();
            let left = tokio::task::spawn_blocking(move || {
                waiting
                    .into_iter()
                    .filter(|summary| files.finish(summary).is_err())
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            let mut unwritten = self.lock_unwritten();
            if left.is_empty() && unwritten.is_empty() {
                crate::unwritten::clear(UNWRITTEN_SUMMARY);
                tracing::info!("the changeover's record is written now that there is room");
            }
            unwritten.extend(left);
        }
    }

    /// Whether a summary waits to be written.
    pub fn has_unwritten(&self) -> bool {
        !self.lock_unwritten().is_empty()
    }

    fn lock_unwritten(&self) -> std::sync::MutexGuard<'_, Vec<ChangeoverSummary>> {
        self.unwritten
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        // The history is for people reading it; the summary above is what counts.
        if let Err(err) = self.append_history(summary) {
            tracing::warn!(path = %self.history.display(), cause = %err, "cannot add to the changeover history");
        }
        let details = self
            .load()
            .ok()
            .flatten()
            .map(|journal| crate::mail::MailDetails {
                notify: journal.notify,
                agent_release: journal.agent_release,
                agents_to_update: journal.agents_to_update,
                language: journal.mail_language,
            })
            .unwrap_or_default();
        if let Some(state_dir) = self.current.parent()
            && let Err(err) = crate::mail::queue_changeover_mail(state_dir, summary, &details)
        {
            // A full disk: the whole report is tried again once there is room (the outbox
            // skips a Message-ID it holds already), so the admin's mail is not lost.
            if err
                .chain()
                .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                .any(crate::unwritten::is_full)
            {
                return Err(err.context("cannot queue the mail to the admin"));
            }
            tracing::error!(cause = %format!("{err:#}"), "cannot queue the mail to the admin");
        }
        Ok(())
    }

    pub fn last(&self) -> anyhow::Result<Option<ChangeoverSummary>> {
        read_json(&self.last)
    }

    fn append_history(&self, summary: &ChangeoverSummary) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut line = serde_json::to_vec(summary).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.history)?;
        file.write_all(&line)?;
        file.sync_data()
    }

    /// Past changeovers, newest first; a changeover reported twice (a rollback finished
    /// at the next start) is listed once, as it ended. Unreadable lines are skipped.
    pub fn history(&self, limit: usize) -> Vec<ChangeoverSummary> {
        let Ok(text) = std::fs::read_to_string(&self.history) else {
            return self.last().ok().flatten().into_iter().collect();
        };
        let mut seen = std::collections::HashSet::new();
        text.lines()
            .rev()
            .filter_map(|line| serde_json::from_str::<ChangeoverSummary>(line).ok())
            .filter(|summary| seen.insert(summary.changeover_id.clone()))
            .take(limit)
            .collect()
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
            admin_message: Some("update".to_owned()),
            mail_language: crate::mail::MailLanguage::De,
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
        assert_eq!(files.last().unwrap(), Some(summary.clone()));

        // The history lists each changeover once, as it ended, newest first.
        let second = ChangeoverSummary {
            changeover_id: "c-2".to_owned(),
            outcome: ChangeoverOutcome::Failed,
            ..summary.clone()
        };
        files.report(&second).unwrap();
        let finished = ChangeoverSummary {
            outcome: ChangeoverOutcome::RolledBack,
            ..second.clone()
        };
        files.finish(&finished).unwrap();
        assert_eq!(files.history(10), vec![finished, summary.clone()]);
        assert_eq!(files.history(1).len(), 1);
    }

    #[test]
    fn a_journal_written_before_the_admin_s_words_and_the_mail_language_still_reads() {
        let mut older = serde_json::to_value(journal()).unwrap();
        let fields = older.as_object_mut().unwrap();
        fields.remove("admin_message");
        fields.remove("mail_language");
        let read: Journal = serde_json::from_value(older).unwrap();
        assert_eq!(read.admin_message, None);
        assert_eq!(read.mail_language, crate::mail::MailLanguage::En);
        assert_eq!(read.message, "update");
    }

    #[test]
    fn a_damaged_journal_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let files = JournalFiles::new(dir.path());
        std::fs::write(&files.current, "{ half").unwrap();
        assert!(files.load().unwrap_err().to_string().contains("damaged"));
    }
}
