//! What a starting server does with a journal it finds: finish the changeover forward or
//! roll it back, so that it ends with the old release or the new one, never half of each.
//!
//! | journal phase                         | what is on disk            | next                       |
//! |---------------------------------------|----------------------------|----------------------------|
//! | up to `stopping`                      | unchanged (maybe staging)  | remove staging; failed     |
//! | `carrying_over`                       | some paths in staging      | move them back; rolled back|
//! | `swapping`, before the exchange       | as above                   | as above                   |
//! | `swapping` after, `restarting`, `health_check` | new release installed | health check in the new release |
//! | `rolling_back`                        | anything                   | undo what is left; rolled back |

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use changeover_protocol::ChangeoverOutcome;
use changeover_protocol::ChangeoverPhase as P;
use changeover_protocol::release::ReleaseKind;
use tracing::{info, warn};

use super::carry;
use super::driver::summarize;
use super::journal::{Journal, JournalFiles};
use super::preflight::staging_dir;
use crate::layout::Layout;
use crate::version::release_version;

/// Starts of the new release without a verdict after which the old one is put back.
pub const MAX_STARTS_AFTER_SWAP: u32 = 3;

/// What the starting server must do next.
#[derive(Debug)]
pub enum Resume {
    /// No changeover was under way (or it has just been ended).
    Nothing,
    /// This process is the new release: check its health, then commit or roll back.
    HealthCheck(Box<Journal>),
    /// Another binary must take over: the one now installed (the new release after a swap
    /// that an old binary found, or the old release after a rollback).
    Restart(PathBuf),
    /// Windows: the rollback must rename the folder this process runs from; the journal
    /// says rolling back, and a helper outside both releases finishes it
    /// (`swap_helper::hand_over_roll_back`) once this process has ended.
    HandOver(String),
}

/// Reads the journal and settles what can be settled before the server serves.
pub fn recover(
    layout: &Layout,
    files: &JournalFiles,
    running_version: &str,
) -> anyhow::Result<Resume> {
    let Some(mut journal) = files.load()? else {
        return Ok(Resume::Nothing);
    };
    info!(
        changeover = %journal.changeover_id,
        phase = %journal.phase,
        "found an unfinished changeover"
    );
    settle_exchange(layout)?;
    let installed_binary = layout.install_dir().join(ReleaseKind::Server.binary_path());
    if journal.committing {
        // The new release was healthy and the old one was being deleted: finish that.
        super::health::delete_old_release(layout)?;
        let summary = super::health::committed_summary(&journal, None);
        info!("changeover ended outcome=committed (the interrupted commit was finished)");
        files.finish_or_keep(&summary);
        if running_version != journal.target_version {
            return Ok(Resume::Restart(installed_binary));
        }
        return Ok(Resume::Nothing);
    }
    let swapped = new_release_installed(layout, &journal);
    match journal.phase {
        P::Idle
        | P::Scheduled
        | P::Preparing
        | P::CountingDown
        | P::LoggingOut
        | P::Stopping
        | P::Unknown => {
            let staging = staging_dir(layout);
            if staging.exists() {
                std::fs::remove_dir_all(&staging)
                    .with_context(|| format!("cannot remove {}", staging.display()))?;
            }
            let reason = format!(
                "the server stopped while the changeover was {}; nothing was changed",
                journal.phase
            );
            end(files, &journal, ChangeoverOutcome::Failed, reason);
            Ok(Resume::Nothing)
        }
        P::CarryingOver | P::Swapping if !swapped => {
            undo(layout, &journal)?;
            let reason = format!(
                "the server stopped while the changeover was {}; the old release was kept and every carried file put back",
                journal.phase
            );
            end(files, &journal, ChangeoverOutcome::RolledBack, reason);
            Ok(Resume::Nothing)
        }
        P::CarryingOver | P::Swapping | P::Restarting | P::HealthCheck => {
            // The exchange happened; finish its second half if the stop came in between.
            let staging = staging_dir(layout);
            let old = layout.old_install_dir();
            if !old.exists() && staging.exists() {
                std::fs::rename(&staging, &old).with_context(|| {
                    format!("cannot rename {} to {}", staging.display(), old.display())
                })?;
            }
            journal.starts_after_swap += 1;
            journal.phase = P::HealthCheck;
            if journal.starts_after_swap > MAX_STARTS_AFTER_SWAP {
                let reason = format!(
                    "the new release started {} times without becoming healthy",
                    journal.starts_after_swap - 1
                );
                return roll_back(layout, files, journal, reason, running_version);
            }
            files.save_or_report(&journal);
            if running_version != journal.target_version {
                // An old binary was started by hand: the installed (new) one takes over.
                return Ok(Resume::Restart(installed_binary));
            }
            Ok(Resume::HealthCheck(Box::new(journal)))
        }
        P::RollingBack => {
            let reason = journal
                .failure
                .clone()
                .unwrap_or_else(|| "the new release failed".to_owned());
            roll_back(layout, files, journal, reason, running_version)
        }
    }
}

/// Rolls back from the new release: undo on disk, then hand over to the old binary if
/// this process is the new one, else record the end.
pub fn roll_back(
    layout: &Layout,
    files: &JournalFiles,
    mut journal: Journal,
    reason: String,
    running_version: &str,
) -> anyhow::Result<Resume> {
    warn!(%reason, "rolling back to the previous release");
    journal.phase = P::RollingBack;
    journal.failure = Some(reason.clone());
    files.save_or_report(&journal);
    if cfg!(windows) && new_release_installed(layout, &journal) && runs_from(&layout.install_dir())
    {
        return Ok(Resume::HandOver(journal.changeover_id));
    }
    undo(layout, &journal)?;
    if running_version == journal.target_version {
        return Ok(Resume::Restart(
            layout.install_dir().join(ReleaseKind::Server.binary_path()),
        ));
    }
    end(files, &journal, ChangeoverOutcome::RolledBack, reason);
    Ok(Resume::Nothing)
}

/// Whether this program is inside `folder`.
fn runs_from(folder: &std::path::Path) -> bool {
    let canonical = |path: &std::path::Path| std::fs::canonicalize(path).unwrap_or(path.to_owned());
    std::env::current_exe().is_ok_and(|exe| canonical(&exe).starts_with(canonical(folder)))
}

fn end(files: &JournalFiles, journal: &Journal, outcome: ChangeoverOutcome, reason: String) {
    let summary = summarize(journal, outcome, journal.phase, Some(reason));
    info!(outcome = %summary.outcome, reason = ?summary.reason, "changeover ended");
    files.finish_or_keep(&summary);
}

/// Finishes an exchange of folders that a crash cut between its renames, where the system
/// has no atomic exchange (`platform::exchange_by_renames`): `X.exchanging` is a release
/// on its way to the install. With the install gone, it is the install now (the exchange
/// went forward); with the install still there, it goes back to `X` (the exchange never
/// happened). Either way the releases are where the journal's identities can find them.
pub fn settle_exchange(layout: &Layout) -> anyhow::Result<()> {
    let install = layout.install_dir();
    for holder in [staging_dir(layout), layout.old_install_dir()] {
        let aside = crate::platform::exchanging_path(&holder);
        if !aside.exists() {
            continue;
        }
        let to = if !install.exists() {
            install.clone()
        } else if !holder.exists() {
            holder.clone()
        } else {
            warn!(
                folder = %aside.display(),
                "a release folder left by an interrupted exchange; both places are taken, so it stays"
            );
            continue;
        };
        info!(from = %aside.display(), to = %to.display(), "finishing an interrupted exchange");
        crate::platform::rename_with_retries(&aside, &to)
            .with_context(|| format!("cannot rename {} to {}", aside.display(), to.display()))?;
    }
    Ok(())
}

/// Whether the install folder holds the new release: by folder identity once the journal
/// has it (recorded before the exchange), else by version (a same-version changeover has
/// no identity yet only before its exchange, when the old release is installed).
pub fn new_release_installed(layout: &Layout, journal: &Journal) -> bool {
    let install = layout.install_dir();
    match journal.releases {
        Some(ids) => ids.new.is_at(&install),
        None => {
            journal.target_version != journal.from_version
                && release_version(&install).as_deref() == Some(journal.target_version.as_str())
        }
    }
}

/// Puts the old release back, whatever part of the changeover was done; safe to repeat
/// after a crash at any point of it.
pub fn undo(layout: &Layout, journal: &Journal) -> anyhow::Result<()> {
    settle_exchange(layout)?;
    let install = layout.install_dir();
    let old = layout.old_install_dir();
    let staging = staging_dir(layout);
    if new_release_installed(layout, journal) {
        // Swapped: the old release is `<name>_old`, or still at the staging path.
        let holds_old = |path: &std::path::Path| match journal.releases {
            Some(ids) => ids.old.is_at(path),
            None => release_version(path).as_deref() == Some(journal.from_version.as_str()),
        };
        let old_at = if holds_old(&old) {
            old.clone()
        } else if holds_old(&staging) {
            staging.clone()
        } else {
            bail!(
                "the previous release is gone: neither {} nor {} holds it",
                old.display(),
                staging.display()
            );
        };
        crate::platform::exchange(&old_at, &install).with_context(|| {
            format!(
                "cannot exchange {} and {}",
                old_at.display(),
                install.display()
            )
        })?;
        super::fault_point("rollback_exchanged");
    }
    // The old release is installed. The carried folders are in the new release, wherever
    // it is now: in staging (before the exchange, or when the exchange back came before the
    // rename to `<name>_old`), or in `<name>_old` (after the exchange back).
    let holds_new = |path: &std::path::Path| match journal.releases {
        Some(ids) => ids.new.is_at(path),
        // Without identities no exchange happened: the new release is only in staging.
        None => false,
    };
    for holder in [&staging, &old] {
        let is_new = holds_new(holder) || (holder == &staging && holder.exists());
        if !is_new {
            continue;
        }
        for (index, path) in journal.moved.iter().rev().enumerate() {
            carry::move_back(holder, &install, path)?;
            if index == 0 {
                super::fault_point("rollback_moved_partly");
            }
        }
        super::fault_point("rollback_moved_back");
        if journal.releases.is_some() {
            // The failed release is kept for diagnosis, replacing an older one.
            let failed = layout.failed_install_dir();
            if failed.exists() {
                std::fs::remove_dir_all(&failed)
                    .with_context(|| format!("cannot remove {}", failed.display()))?;
            }
            std::fs::rename(holder, &failed).with_context(|| {
                format!("cannot keep the failed release as {}", failed.display())
            })?;
            super::fault_point("rollback_failed_kept");
        } else {
            std::fs::remove_dir_all(holder)
                .with_context(|| format!("cannot remove {}", holder.display()))?;
        }
    }
    // Out of the way, the failed release gets its own defaults back.
    if let Some(ids) = journal.releases {
        let failed = layout.failed_install_dir();
        if ids.new.is_at(&failed) {
            for path in &journal.moved {
                carry::restore_release_defaults(&failed, path)?;
            }
        }
    }
    // The new release and its applications ran on the carried files and may have changed
    // them (a database saved at its stop, a preference written): what is there now is the
    // site's data, carried back as it is. A difference is reported, never a reason for the
    // old release not to start.
    if let Err(err) = carry::verify(&install, &journal.carried) {
        warn!(
            cause = %format!("{err:#}"),
            "the carried files changed while the new release ran; kept as they are now"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(path: &std::path::Path, version: &str) {
        std::fs::create_dir_all(path).unwrap();
        std::fs::write(path.join("VERSION"), version).unwrap();
    }

    fn version_at(path: &std::path::Path) -> Option<String> {
        std::fs::read_to_string(path.join("VERSION")).ok()
    }

    #[test]
    fn an_exchange_cut_after_its_first_rename_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::named(dir.path(), "server");
        release(&layout.install_dir(), "old");
        let staging = staging_dir(&layout);
        release(&crate::platform::exchanging_path(&staging), "new");
        settle_exchange(&layout).unwrap();
        assert_eq!(version_at(&layout.install_dir()).as_deref(), Some("old"));
        assert_eq!(version_at(&staging).as_deref(), Some("new"));
    }

    #[test]
    fn an_exchange_cut_after_its_second_rename_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::named(dir.path(), "server");
        let staging = staging_dir(&layout);
        release(&staging, "old");
        release(&crate::platform::exchanging_path(&staging), "new");
        settle_exchange(&layout).unwrap();
        assert_eq!(version_at(&layout.install_dir()).as_deref(), Some("new"));
        assert_eq!(version_at(&staging).as_deref(), Some("old"));
        // Nothing left to settle: a second pass changes nothing.
        settle_exchange(&layout).unwrap();
        assert_eq!(version_at(&layout.install_dir()).as_deref(), Some("new"));
    }

    #[test]
    fn the_exchange_by_renames_swaps_and_leaves_nothing_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        release(&a, "A");
        release(&b, "B");
        crate::platform::exchange_by_renames(&a, &b).unwrap();
        assert_eq!(version_at(&a).as_deref(), Some("B"));
        assert_eq!(version_at(&b).as_deref(), Some("A"));
        assert!(!crate::platform::exchanging_path(&a).exists());
        // A missing second folder fails it, and the first is where it was.
        let err = crate::platform::exchange_by_renames(&a, &dir.path().join("missing"));
        assert!(err.is_err());
        assert_eq!(version_at(&a).as_deref(), Some("B"));
    }
}
