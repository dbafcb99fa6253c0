//! Where things live in a product folder.
//!
//! ```text
//! <root>/server/             the installed release (swapped by a changeover)
//!        server/config/      changeover.toml and the application's preferences
//!        server/certs/       the site's TLS certificate and key
//!        server/backups/     the application's backups
//! <root>/state/              admin credentials, journal, downloads: never swapped
//! ```
//!
//! This module only names paths and creates folders; it reads no file.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The name of the install folder inside the product folder.
pub const INSTALL_DIR_NAME: &str = "server";

/// The paths of one product folder.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The installed release: `<root>/server`.
    pub fn install_dir(&self) -> PathBuf {
        self.root.join(INSTALL_DIR_NAME)
    }

    /// The previous release during a changeover: `<root>/server_old`.
    pub fn old_install_dir(&self) -> PathBuf {
        self.root.join(format!("{INSTALL_DIR_NAME}_old"))
    }

    /// A release that failed after a swap, kept for diagnosis: `<root>/server_failed`.
    pub fn failed_install_dir(&self) -> PathBuf {
        self.root.join(format!("{INSTALL_DIR_NAME}_failed"))
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

    /// State that survives every changeover: `<root>/state`.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
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
