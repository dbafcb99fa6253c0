//! What a release is: the `release.json` inside every release, and the entries of the
//! signed feed manifest that lists them.
//!
//! A feed is plain static files, so any web server or CDN can host it:
//!
//! ```text
//! manifest.json                               every release, newest last (FeedManifest)
//! manifest.json.minisig                       its minisign signature
//! server-1.2.0-linux-x86_64.tar.gz            a release archive (the "package")
//! server-1.2.0-linux-x86_64.tar.gz.minisig    its signature; the trusted comment is the
//!                                             archive's PackageEntry as one line of JSON
//! ```
//!
//! An archive together with its `.minisig` is a complete package: it can be copied out of
//! the feed (to a USB stick, into the server's inbox) and still be verified on its own.

use serde::{Deserialize, Serialize};

/// The product name every release and manifest carries.
pub const PRODUCT: &str = "changeover";

/// The format version of `manifest.json` this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// The manifest's file name in a feed.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The suffix of a detached signature file.
pub const SIGNATURE_SUFFIX: &str = ".minisig";

/// Which program a release is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseKind {
    Server,
    Agent,
}

impl ReleaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseKind::Server => "server",
            ReleaseKind::Agent => "agent",
        }
    }

    /// The executable inside a release of this kind built for this platform, relative to
    /// its root.
    pub fn binary_path(self) -> &'static str {
        self.binary_path_for(std::env::consts::OS)
    }

    /// The executable inside a release of this kind for the operating system `os` (the
    /// first part of a platform such as `windows-x86_64`): `.exe` on Windows.
    pub fn binary_path_for(self, os: &str) -> &'static str {
        let windows = os == "windows" || os.starts_with("windows-");
        match (self, windows) {
            (ReleaseKind::Server, false) => "bin/changeover-server",
            (ReleaseKind::Agent, false) => "bin/changeover-agent",
            (ReleaseKind::Server, true) => "bin/changeover-server.exe",
            (ReleaseKind::Agent, true) => "bin/changeover-agent.exe",
        }
    }
}

impl std::fmt::Display for ReleaseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ReleaseKind {
    type Err = String;

    fn from_str(text: &str) -> Result<ReleaseKind, String> {
        match text {
            "server" => Ok(ReleaseKind::Server),
            "agent" => Ok(ReleaseKind::Agent),
            other => Err(format!("unknown release kind {other:?} (server or agent)")),
        }
    }
}

/// `release.json` at the root of every release: what is installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub product: String,
    pub kind: ReleaseKind,
    pub version: semver::Version,
    /// Operating system and architecture, such as `linux-x86_64`.
    pub platform: String,
    /// What changed, for the admin.
    #[serde(default)]
    pub notes: String,
    /// When the release was packed, RFC 3339.
    pub date: String,
}

/// One release in the feed: the release and its archive. This is also, as one line of
/// JSON, the trusted comment of the archive's signature, so the signature vouches for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageEntry {
    pub product: String,
    pub kind: ReleaseKind,
    pub version: semver::Version,
    pub platform: String,
    /// The archive's file name in the feed; never a path.
    pub archive: String,
    /// The archive's size in bytes.
    pub size: u64,
    /// The archive's SHA-256, lowercase hex.
    pub sha256: String,
    #[serde(default)]
    pub notes: String,
    pub date: String,
}

impl PackageEntry {
    /// The archive name a release gets in a feed.
    pub fn archive_name(kind: ReleaseKind, version: &semver::Version, platform: &str) -> String {
        format!("{kind}-{version}-{platform}.tar.gz")
    }

    /// Whether two entries describe the same release (kind, version, platform).
    pub fn same_release(&self, other: &PackageEntry) -> bool {
        self.kind == other.kind && self.version == other.version && self.platform == other.platform
    }

    /// The `release.json` of the release this entry describes.
    pub fn release_info(&self) -> ReleaseInfo {
        ReleaseInfo {
            product: self.product.clone(),
            kind: self.kind,
            version: self.version.clone(),
            platform: self.platform.clone(),
            notes: self.notes.clone(),
            date: self.date.clone(),
        }
    }

    /// Checks what a hostile feed could put in an entry: the archive name must be a plain
    /// file name, the hash a SHA-256.
    pub fn validate(&self) -> Result<(), String> {
        if self.product != PRODUCT {
            return Err(format!(
                "the entry is for product {:?}, not {PRODUCT:?}",
                self.product
            ));
        }
        let name_is_plain = !self.archive.is_empty()
            && !self.archive.starts_with('.')
            && self
                .archive
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'));
        if !name_is_plain {
            return Err(format!(
                "the archive name {:?} is not a plain file name",
                self.archive
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("{:?} is not a SHA-256 in hex", self.sha256));
        }
        Ok(())
    }
}

/// `manifest.json`: every release a feed offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedManifest {
    pub format: u32,
    pub product: String,
    /// When the manifest was last written, RFC 3339.
    pub updated: String,
    pub releases: Vec<PackageEntry>,
}

impl FeedManifest {
    pub fn empty(updated: String) -> FeedManifest {
        FeedManifest {
            format: MANIFEST_FORMAT,
            product: PRODUCT.to_owned(),
            updated,
            releases: Vec::new(),
        }
    }

    /// The newest release of `kind` for `platform`.
    pub fn newest(&self, kind: ReleaseKind, platform: &str) -> Option<&PackageEntry> {
        self.releases
            .iter()
            .filter(|entry| entry.kind == kind && entry.platform == platform)
            .max_by(|a, b| a.version.cmp(&b.version))
    }

    /// The release of `kind` for `platform` with exactly `version`.
    pub fn find(
        &self,
        kind: ReleaseKind,
        platform: &str,
        version: &semver::Version,
    ) -> Option<&PackageEntry> {
        self.releases.iter().find(|entry| {
            entry.kind == kind && entry.platform == platform && &entry.version == version
        })
    }
}

/// The platform this build runs on, as release names and entries spell it.
pub fn current_platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_releases_hold_exe_files() {
        assert_eq!(
            ReleaseKind::Server.binary_path_for("windows-x86_64"),
            "bin/changeover-server.exe"
        );
        assert_eq!(
            ReleaseKind::Agent.binary_path_for("linux-x86_64"),
            "bin/changeover-agent"
        );
    }

    fn entry(kind: ReleaseKind, version: &str) -> PackageEntry {
        let version: semver::Version = version.parse().unwrap();
        PackageEntry {
            product: PRODUCT.to_owned(),
            kind,
            archive: PackageEntry::archive_name(kind, &version, "linux-x86_64"),
            version,
            platform: "linux-x86_64".to_owned(),
            size: 10,
            sha256: "ab".repeat(32),
            notes: String::new(),
            date: "2026-11-28T09:00:00Z".to_owned(),
        }
    }

    #[test]
    fn newest_compares_versions_as_semver_not_text() {
        let mut manifest = FeedManifest::empty("2026-11-28T09:00:00Z".to_owned());
        manifest.releases.push(entry(ReleaseKind::Server, "1.10.0"));
        manifest.releases.push(entry(ReleaseKind::Server, "1.9.0"));
        manifest.releases.push(entry(ReleaseKind::Agent, "2.0.0"));
        manifest
            .releases
            .push(entry(ReleaseKind::Server, "1.11.0-rc.1"));
        let newest = manifest
            .newest(ReleaseKind::Server, "linux-x86_64")
            .unwrap();
        assert_eq!(newest.version.to_string(), "1.11.0-rc.1");
        assert!(
            manifest
                .newest(ReleaseKind::Server, "windows-x86_64")
                .is_none()
        );
    }

    #[test]
    fn entries_with_path_tricks_or_bad_hashes_are_invalid() {
        let good = entry(ReleaseKind::Server, "1.0.0");
        assert_eq!(good.validate(), Ok(()));
        for archive in ["../evil.tar.gz", "/etc/passwd", "a/b.tar.gz", ".hidden", ""] {
            let bad = PackageEntry {
                archive: archive.to_owned(),
                ..good.clone()
            };
            assert!(bad.validate().is_err(), "{archive:?} accepted");
        }
        let bad_hash = PackageEntry {
            sha256: "xyz".to_owned(),
            ..good.clone()
        };
        assert!(bad_hash.validate().is_err());
        let other_product = PackageEntry {
            product: "other".to_owned(),
            ..good
        };
        assert!(other_product.validate().is_err());
    }
}
