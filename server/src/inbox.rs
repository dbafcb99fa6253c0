//! The offline inbox: `<root>/state/inbox/`, for sites whose firewall keeps the feed out.
//!
//! An admin copies a package (the archive and its `.minisig`) into the folder; a file
//! watcher notices within a fraction of a second, and the package is verified exactly like
//! a download. A good one moves into the downloads folder as an update candidate; a refused
//! one moves to `inbox/rejected/` with the reason written next to it, so it is neither
//! retried forever nor silently lost. A package still being copied (shorter than its
//! signed size, or without its signature yet) is left alone until it is complete.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use changeover_protocol::PackageSource;
use changeover_protocol::package::{self, PackageSignature};
use notify::Watcher as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::releases::{ReadyPackage, Releases};

/// The folder refused packages are moved to, inside the inbox.
pub const REJECTED_DIR: &str = "rejected";

// Changes arrive in bursts while a file is written; wait this long after the last one.
const SETTLE: Duration = Duration::from_millis(150);

// Without events (a file system that does not report them), look anyway this often.
const RESCAN: Duration = Duration::from_secs(5);

/// Watches the inbox until `shutdown`; scans once at start for packages dropped while the
/// server was down.
pub async fn watch(inbox: PathBuf, releases: Arc<Releases>, shutdown: CancellationToken) {
    if let Err(err) = std::fs::create_dir_all(&inbox) {
        warn!(path = %inbox.display(), cause = %err, "cannot create the inbox; it is not watched");
        return;
    }
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only changes count: the scan itself opens the folder, and reacting to that access
        // would make every scan trigger the next.
        if event.is_ok_and(|event| !matches!(event.kind, notify::EventKind::Access(_))) {
            // A full channel already means "look again".
            let _ = changed_tx.try_send(());
        }
    })
    .and_then(|mut watcher| {
        watcher.watch(&inbox, notify::RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    let _watcher = match watcher {
        Ok(watcher) => Some(watcher),
        Err(err) => {
            warn!(cause = %err, "cannot watch the inbox; looking every few seconds instead");
            None
        }
    };
    info!(path = %inbox.display(), "watching the inbox");
    loop {
        scan(&inbox, &releases).await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = changed.recv() => {
                // Let a burst of writes settle, then look once.
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(SETTLE) => break,
                        _ = changed.recv() => {}
                    }
                }
            }
            () = tokio::time::sleep(RESCAN) => {}
        }
    }
}

async fn scan(inbox: &Path, releases: &Arc<Releases>) {
    let inbox = inbox.to_owned();
    let releases = Arc::clone(releases);
    let scanned = tokio::task::spawn_blocking(move || scan_blocking(&inbox, &releases)).await;
    if let Err(err) = scanned {
        warn!(cause = %err, "the inbox scan failed");
    }
}

fn scan_blocking(inbox: &Path, releases: &Releases) {
    let Ok(listing) = std::fs::read_dir(inbox) else {
        return;
    };
    let mut archives: Vec<PathBuf> = listing
        .flatten()
        .map(|item| item.path())
        .filter(|path| {
            path.is_file()
                && path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.ends_with(".tar.gz") && !name.starts_with('.'))
        })
        .collect();
    archives.sort();
    for archive in archives {
        if !is_complete(&archive) {
            debug!(path = %archive.display(), "inbox package not complete yet");
            continue;
        }
        match releases.verify_local(&archive, true) {
            Ok(entry) => match accept(&archive, &releases.settings().downloads_dir) {
                Ok(target) => releases.ready(ReadyPackage {
                    entry,
                    source: PackageSource::Inbox,
                    archive: target,
                }),
                Err(err) => {
                    warn!(path = %archive.display(), cause = %err, "cannot take the package from the inbox")
                }
            },
            Err(reason) => {
                let version = PackageSignature::for_archive(&archive)
                    .ok()
                    .map(|signature| signature.claimed_entry().version.to_string());
                let name = file_name(&archive);
                if let Err(err) = reject(&archive, inbox, &reason) {
                    warn!(path = %archive.display(), cause = %err, "cannot move a refused package aside");
                }
                releases.refuse(
                    version.as_deref(),
                    PackageSource::Inbox,
                    format!("{name}: {reason}"),
                );
            }
        }
    }
}

// A signature that does not parse may still be being written; it is judged once it has
// not changed for this long.
const SIGNATURE_QUIET: Duration = Duration::from_secs(2);

// Complete: the signature is there and the archive has reached its signed size. An
// unreadable signature that has stopped changing is complete too (it will be refused
// with its reason).
fn is_complete(archive: &Path) -> bool {
    let signature_path = package::signature_path(archive);
    if !signature_path.is_file() {
        return false;
    }
    match PackageSignature::for_archive(archive) {
        Ok(signature) => std::fs::metadata(archive)
            .is_ok_and(|metadata| metadata.len() >= signature.claimed_entry().size),
        Err(_) => std::fs::metadata(&signature_path)
            .and_then(|metadata| metadata.modified())
            .is_ok_and(|modified| modified.elapsed().unwrap_or_default() >= SIGNATURE_QUIET),
    }
}

fn accept(archive: &Path, downloads: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(downloads)?;
    let target = downloads.join(archive.file_name().unwrap_or_default());
    std::fs::rename(
        package::signature_path(archive),
        package::signature_path(&target),
    )?;
    std::fs::rename(archive, &target)?;
    Ok(target)
}

fn reject(archive: &Path, inbox: &Path, reason: &str) -> std::io::Result<()> {
    let rejected = inbox.join(REJECTED_DIR);
    std::fs::create_dir_all(&rejected)?;
    let name = file_name(archive);
    std::fs::write(
        rejected.join(format!("{name}.reason.txt")),
        format!("{reason}\n"),
    )?;
    let signature = package::signature_path(archive);
    if signature.exists() {
        std::fs::rename(&signature, package::signature_path(&rejected.join(&name)))?;
    }
    std::fs::rename(archive, rejected.join(&name))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}
