//! Where things live in a product folder.
//!
//! ```text
//! <root>/server/             the installed release (swapped by a changeover)
//!        server/config/      changeover.toml and the application's preferences
//!        server/certs/       the site's TLS certificate and key
//!        server/backups/     the application's backups
//! <root>/state/              admin credentials, journal, downloads: never swapped
//! <root>/state/apps/         the applications' logs and pid files
//! ```
//!
//! With `--name NAME` (another application install in the same product folder, as the
//! seed's Business, Finance and Staff servers) the install is `<root>/NAME`, the previous
//! release `<root>/NAME_old`, staging `<root>/.NAME.staging` and the state
//! `<root>/NAME_state`; the default name `server` keeps the paths above.
//!
//! This module only names paths and creates folders; it reads no file.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The name of the install folder inside the product folder when `--name` is not given.
pub const INSTALL_DIR_NAME: &str = "server";

/// The paths of one application install in a product folder.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
    name: String,
}

/// Checks an install name given with `--name`: it becomes folder names beside the others.
pub fn check_install_name(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name != "state"
        && !name.ends_with("_old")
        && !name.ends_with("_failed")
        && !name.ends_with("_state");
    if !valid {
        anyhow::bail!(
            "--name {name:?}: use 1 to 64 letters, digits, '-' or '_', starting with a letter or digit, \
             not \"state\" and not ending in _old, _failed or _state"
        );
    }
    Ok(())
}

impl Layout {
    /// The default install (`<root>/server`).
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout::named(root, INSTALL_DIR_NAME)
    }

    /// The install called `name` (see [`check_install_name`]).
    pub fn named(root: impl Into<PathBuf>, name: &str) -> Layout {
        Layout {
            root: root.into(),
            name: name.to_owned(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The install's name: `server` unless `--name` gave another.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The installed release: `<root>/<name>`.
    pub fn install_dir(&self) -> PathBuf {
        self.root.join(&self.name)
    }

    /// The previous release during a changeover: `<root>/<name>_old`.
    pub fn old_install_dir(&self) -> PathBuf {
        self.root.join(format!("{}_old", self.name))
    }

    /// The old release while the commit deletes it: `<root>/.<name>_old.deleting`.
    pub fn doomed_install_dir(&self) -> PathBuf {
        self.root.join(format!(".{}_old.deleting", self.name))
    }

    /// A release that failed after a swap, kept for diagnosis: `<root>/<name>_failed`.
    pub fn failed_install_dir(&self) -> PathBuf {
        self.root.join(format!("{}_failed", self.name))
    }

    /// Where a release is unpacked before the swap: `<root>/.<name>.staging`.
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join(format!(".{}.staging", self.name))
    }

    pub fn config_dir(&self) -> PathBuf {
        self.install_dir().join("config")
    }

    pub fn config_file(&self) -> PathBuf {
        self.config_dir().join("changeover.toml")
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.install_dir().join("certs")
    }

    pub fn backups_dir(&self) -> PathBuf {
        self.install_dir().join("backups")
    }

    /// State that survives every changeover: `<root>/state` for the default install,
    /// `<root>/<name>_state` for another.
    pub fn state_dir(&self) -> PathBuf {
        if self.name == INSTALL_DIR_NAME {
            self.root.join("state")
        } else {
            self.root.join(format!("{}_state", self.name))
        }
    }

    /// The applications' logs and pid files.
    pub fn apps_dir(&self) -> PathBuf {
        self.state_dir().join("apps")
    }

    /// The argon2 hash of the admin password.
    pub fn admin_credentials_file(&self) -> PathBuf {
        self.state_dir().join("admin.argon2")
    }

    /// Verified packages waiting to be installed, and downloads in progress.
    pub fn downloads_dir(&self) -> PathBuf {
        self.state_dir().join("downloads")
    }

    /// Where an admin drops packages by hand.
    pub fn inbox_dir(&self) -> PathBuf {
        self.state_dir().join("inbox")
    }

    /// Creates the folders a running server needs; existing ones are left as they are.
    pub fn create_dirs(&self) -> anyhow::Result<()> {
        for dir in [
            self.config_dir(),
            self.certs_dir(),
            self.backups_dir(),
            self.state_dir(),
            self.downloads_dir(),
            self.inbox_dir(),
            self.apps_dir(),
        ] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create folder {}", dir.display()))?;
        }
        Ok(())
    }

    /// Resolves a path from the config: relative paths are relative to the install folder,
    /// so they move with it in a changeover.
    pub fn resolve_install_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.install_dir().join(path)
        }
    }
}
