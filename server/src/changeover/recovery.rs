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
    let installed_binary = layout.install_dir().join(ReleaseKind::Server.binary_path());
    let swapped =
        release_version(&layout.install_dir()).as_deref() == Some(journal.target_version.as_str());
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
            end(files, &journal, ChangeoverOutcome::Failed, reason)?;
            Ok(Resume::Nothing)
        }
        P::CarryingOver | P::Swapping if !swapped => {
            undo(layout, &journal)?;
            let reason = format!(
                "the server stopped while the changeover was {}; the old release was kept and every carried file put back",
                journal.phase
            );
            end(files, &journal, ChangeoverOutcome::RolledBack, reason)?;
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
            files.save(&journal)?;
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
    files.save(&journal)?;
    undo(layout, &journal)?;
    if running_version == journal.target_version {
        return Ok(Resume::Restart(
            layout.install_dir().join(ReleaseKind::Server.binary_path()),
        ));
    }
    end(files, &journal, ChangeoverOutcome::RolledBack, reason)?;
    Ok(Resume::Nothing)
}

fn end(
    files: &JournalFiles,
    journal: &Journal,
    outcome: ChangeoverOutcome,
    reason: String,
) -> anyhow::Result<()> {
    let summary = summarize(journal, outcome, journal.phase, Some(reason));
    info!(outcome = %summary.outcome, reason = ?summary.reason, "changeover ended");
    files.finish(&summary)
}

/// Puts the old release back, whatever part of the changeover was done; safe to repeat.
pub fn undo(layout: &Layout, journal: &Journal) -> anyhow::Result<()> {
    let install = layout.install_dir();
    let old = layout.old_install_dir();
    let staging = staging_dir(layout);
    let installed = release_version(&install);
    if installed.as_deref() == Some(journal.target_version.as_str())
        && journal.target_version != journal.from_version
    {
        // Swapped: the old release is `<name>_old`, or still at the staging path.
        let old_at = if old.exists() {
            old
        } else if release_version(&staging).as_deref() == Some(journal.from_version.as_str()) {
            staging
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
        for path in journal.moved.iter().rev() {
            carry::move_back(&old_at, &install, path)?;
        }
        // The failed release is kept for diagnosis, replacing an older one.
        let failed = layout.failed_install_dir();
        if failed.exists() {
            std::fs::remove_dir_all(&failed)
                .with_context(|| format!("cannot remove {}", failed.display()))?;
        }
        std::fs::rename(&old_at, &failed)
            .with_context(|| format!("cannot keep the failed release as {}", failed.display()))?;
    } else if staging.exists() {
        for path in journal.moved.iter().rev() {
            carry::move_back(&staging, &install, path)?;
        }
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot remove {}", staging.display()))?;
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
