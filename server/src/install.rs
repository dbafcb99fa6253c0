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
    if staging.exists() {
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
    )
    .and_then(|()| {
        std::fs::rename(&staging, &install_dir)
            .with_context(|| format!("cannot move the release to {}", install_dir.display()))
    });
    if let Err(err) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(err);
    }
    layout.create_dirs()?;
    Ok(entry.version)
}

// Unpacks into staging and carries over what a development run may already have put in
// the install folder (config, certificates, backups), then removes that folder.
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
    if install_dir.exists() {
        for name in ["config", "certs", "backups"] {
            let from = install_dir.join(name);
            if from.is_dir() {
                merge_into(&from, &staging.join(name))?;
            }
        }
        std::fs::remove_dir_all(install_dir)
            .with_context(|| format!("cannot replace {}", install_dir.display()))?;
    }
    let key_target = staging.join(VENDOR_KEY_IN_INSTALL);
    std::fs::create_dir_all(key_target.parent().context("key path has a folder")?)?;
    std::fs::copy(public_key, &key_target)
        .with_context(|| format!("cannot copy the vendor key to {}", key_target.display()))?;
    Ok(())
}

// Moves every file of `from` into `to`; files already in `to` from the release are
// replaced, because the site's own settings win over a release's defaults.
fn merge_into(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for item in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let item = item?;
        let target = to.join(item.file_name());
        if item.file_type()?.is_dir() {
            merge_into(&item.path(), &target)?;
        } else {
            std::fs::rename(item.path(), &target)
                .with_context(|| format!("cannot move {}", item.path().display()))?;
        }
    }
    Ok(())
}
