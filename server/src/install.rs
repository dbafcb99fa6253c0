//! The first install: a verified server release unpacked into `<root>/server`.
//!
//! Verified exactly like an update (signature with the vendor key, size, hash, kind and
//! platform), unpacked into a staging folder beside the target and renamed into place, so
//! a failed install leaves nothing behind. The vendor key is copied into the release's
//! `config/vendor.pub`, where the default `feed.public_key` finds it and from where every
//! changeover carries it over.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use changeover_protocol::package::{self, PackageError, VendorKey};
use changeover_protocol::release::ReleaseKind;

use crate::layout::Layout;

/// The vendor key's place inside an install, relative to the install folder.
pub const VENDOR_KEY_IN_INSTALL: &str = "config/vendor.pub";

/// What `changeover-server install` was given.
#[derive(Debug)]
pub struct InstallOptions {
    pub root: PathBuf,
    /// The install's name (`--name`): the release goes to `<root>/<name>`.
    pub name: String,
    pub package: PathBuf,
    pub public_key: PathBuf,
}

/// Installs a server release into `<root>/server`; returns its version.
pub fn install(options: &InstallOptions) -> anyhow::Result<semver::Version> {
    let layout = Layout::named(&options.root, &options.name);
    let key = VendorKey::from_file(&options.public_key)?;
    let entry = package::verify_for_install(&options.package, &key, ReleaseKind::Server)
        .map_err(|err| match err {
            PackageError::WrongKind { .. } => {
                anyhow::anyhow!("{err}; install agent releases with `changeover-agent install`")
            }
            err => anyhow::Error::from(err),
        })
        .with_context(|| format!("refusing to install {}", options.package.display()))?;
    let install_dir = layout.install_dir();
    if let Some(installed) = crate::version::release_version(&install_dir) {
        bail!(
            "{} already holds release {installed}; later releases are installed by a \
             changeover (`changeover-agent admin update`), which keeps the old one until the \
             new one is healthy",
            install_dir.display()
        );
    }
    std::fs::create_dir_all(layout.root())
        .with_context(|| format!("cannot create {}", layout.root().display()))?;

    let staging = layout.root().join(format!(".{}.installing", layout.name()));
    let before = layout
        .root()
        .join(format!(".{}.before-install", layout.name()));
    // An install interrupted between its two renames: the site's folder comes back first.
    if before.exists() && !install_dir.exists() {
        std::fs::rename(&before, &install_dir).with_context(|| {
            format!(
                "cannot put {} back to {}",
                before.display(),
                install_dir.display()
            )
        })?;
    }
    if staging.exists() {
        // Only the release and copies of site files: nothing of the site's own.
        std::fs::remove_dir_all(&staging).with_context(|| {
            format!("cannot remove a stale staging folder {}", staging.display())
        })?;
    }
    let result = stage(
        &options.package,
        &options.public_key,
        &staging,
        &install_dir,
        entry.kind,
    );
    if let Err(err) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(err);
    }
    // The site's folder (if any) steps aside whole and the release takes its place; a
    // failure in between puts the folder back.
    if install_dir.exists() {
        if before.exists() {
            let _ = std::fs::remove_dir_all(&staging);
            bail!(
                "{} is in the way: it holds what an earlier install found in {}; move what \
                 you need from it and remove it",
                before.display(),
                install_dir.display()
            );
        }
        std::fs::rename(&install_dir, &before)
            .with_context(|| format!("cannot move {} aside", install_dir.display()))?;
    }
    if let Err(err) = std::fs::rename(&staging, &install_dir) {
        let _ = std::fs::remove_dir_all(&staging);
        if before.exists() {
            std::fs::rename(&before, &install_dir).with_context(|| {
                format!(
                    "cannot move the release to {} ({err}), nor put {} back",
                    install_dir.display(),
                    before.display()
                )
            })?;
        }
        return Err(err)
            .with_context(|| format!("cannot move the release to {}", install_dir.display()));
    }
    if before.exists() {
        tidy_before_install(&before);
    }
    layout.create_dirs()?;
    Ok(entry.version)
}

/// The site folders a first install carries into the release.
const SITE_FOLDERS: [&str; 3] = ["config", "certs", "backups"];

// Unpacks into staging and copies in what a development run or an admin may already have
// put in the install folder (config, certificates, backups); the originals stay untouched
// until the release is in place.
fn stage(
    archive: &Path,
    public_key: &Path,
    staging: &Path,
    install_dir: &Path,
    kind: ReleaseKind,
) -> anyhow::Result<()> {
    package::unpack(archive, staging)?;
    let binary = staging.join(kind.binary_path());
    if !binary.is_file() {
        bail!("the release has no {}", kind.binary_path());
    }
    if let Some(manifest) = crate::apps::Manifest::load(staging)? {
        manifest.check_programs(staging)?;
    }
    for name in SITE_FOLDERS {
        let from = install_dir.join(name);
        if from.is_dir() {
            copy_into(&from, &staging.join(name))?;
        }
    }
    let key_target = staging.join(VENDOR_KEY_IN_INSTALL);
    std::fs::create_dir_all(key_target.parent().context("key path has a folder")?)?;
    std::fs::copy(public_key, &key_target)
        .with_context(|| format!("cannot copy the vendor key to {}", key_target.display()))?;
    Ok(())
}

// What the install found is in the release now: the originals of the copied folders go,
// and whatever else was there stays in `before` for the admin, who is told.
fn tidy_before_install(before: &Path) {
    for name in SITE_FOLDERS {
        let folder = before.join(name);
        if folder.is_dir()
            && let Err(err) = std::fs::remove_dir_all(&folder)
        {
            eprintln!("note: cannot remove {}: {err}", folder.display());
        }
    }
    if std::fs::remove_dir(before).is_err() {
        eprintln!(
            "note: {} keeps what the install folder held besides {}: move what you need from it",
            before.display(),
            SITE_FOLDERS.join(", ")
        );
    }
}

// Copies every file of `from` into `to`, each synced; files already in `to` from the
// release are replaced, because the site's own settings win over a release's defaults.
// Nothing is written through a link the release made (its links are checked by
// `package::unpack` and may only point down, but through one a site's file could land on
// a release file of another name): a release file that is a link is replaced like any
// other, a release folder that is a link is refused. The site's own links are copied as
// they are: they were the admin's before the install, wherever they point.
fn copy_into(from: &Path, to: &Path) -> anyhow::Result<()> {
    let is_link = |path: &Path| {
        std::fs::symlink_metadata(path).is_ok_and(|metadata| metadata.file_type().is_symlink())
    };
    if is_link(to) {
        bail!(
            "cannot carry {} into the release: the release's {} is a link, and the site's \
             files are never written through one",
            from.display(),
            to.display()
        );
    }
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for item in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let item = item?;
        let target = to.join(item.file_name());
        let file_type = item.file_type()?;
        if file_type.is_dir() {
            copy_into(&item.path(), &target)?;
        } else if file_type.is_symlink() {
            let link = std::fs::read_link(item.path())?;
            let _ = std::fs::remove_file(&target);
            #[cfg(unix)]
            std::os::unix::fs::symlink(&link, &target)
                .with_context(|| format!("cannot copy the link {}", item.path().display()))?;
            #[cfg(not(unix))]
            let _ = link;
        } else {
            if is_link(&target) {
                std::fs::remove_file(&target).with_context(|| {
                    format!("cannot replace the release's link {}", target.display())
                })?;
            }
            std::fs::copy(item.path(), &target)
                .with_context(|| format!("cannot copy {}", item.path().display()))?;
            // Opened for writing: Windows flushes only a file opened so.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .and_then(|file| file.sync_all())
                .with_context(|| format!("cannot sync {}", target.display()))?;
        }
    }
    Ok(())
}
