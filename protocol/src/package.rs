//! Verifying a release package and unpacking it without trusting its contents.
//!
//! A package is an archive plus its minisign signature, whose trusted comment is the
//! archive's [`PackageEntry`]. Verification streams the archive once, checking its size,
//! SHA-256 and signature together, so a download can be verified while it arrives and a
//! 200 MB release never has to be in memory. Unpacking refuses every entry that could
//! write outside the target folder or create something other than files, folders and
//! links inside it.
//!
//! This is the one module of the crate that touches the file system: the server's install,
//! inbox and downloads and the agent's self-update all verify packages the same way.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::release::{FeedManifest, MANIFEST_FORMAT, PRODUCT, PackageEntry, ReleaseKind};

/// Why a package, a manifest or a key was refused.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("cannot read the vendor public key {path}: {reason}")]
    KeyUnreadable { path: String, reason: String },
    #[error("cannot read the signature of {what}: {reason}")]
    SignatureUnreadable { what: String, reason: String },
    #[error(
        "the signature of {what} was made with another key than the configured vendor key \
         (check feed.public_key)"
    )]
    WrongKey { what: String },
    #[error("the signature of {what} does not verify with the vendor key: the file was altered")]
    BadSignature { what: String },
    #[error("the signed description of {what} is unusable: {reason}")]
    BadEntry { what: String, reason: String },
    #[error("{what} is {actual} bytes, the signed size is {expected}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what} grew beyond its signed size of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error("{what} has SHA-256 {actual}, the signed hash is {expected}")]
    HashMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("the archive entry {path:?} is refused: {reason}")]
    UnsafeEntry { path: String, reason: String },
    #[error("{what} is a {actual} release, and this installs {expected} releases")]
    WrongKind {
        what: String,
        expected: ReleaseKind,
        actual: ReleaseKind,
    },
    #[error("{what} is built for {actual}, this machine is {expected}")]
    WrongPlatform {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl PackageError {
    fn io(what: impl Into<String>, source: std::io::Error) -> PackageError {
        PackageError::Io {
            what: what.into(),
            source,
        }
    }
}

/// The vendor's public key, in minisign's format.
#[derive(Debug, Clone)]
pub struct VendorKey {
    key: minisign_verify::PublicKey,
}

impl VendorKey {
    /// Reads a minisign public key file (`untrusted comment:` line, then the key).
    pub fn from_file(path: &Path) -> Result<VendorKey, PackageError> {
        let text = std::fs::read_to_string(path).map_err(|err| PackageError::KeyUnreadable {
            path: path.display().to_string(),
            reason: err.to_string(),
        })?;
        VendorKey::decode(&text).map_err(|reason| PackageError::KeyUnreadable {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Parses a key file's text, or a bare base64 key.
    pub fn decode(text: &str) -> Result<VendorKey, String> {
        let text = text.trim();
        let key = if text.lines().count() > 1 {
            minisign_verify::PublicKey::decode(text)
        } else {
            minisign_verify::PublicKey::from_base64(text)
        }
        .map_err(|err| format!("not a minisign public key ({err})"))?;
        Ok(VendorKey { key })
    }
}

/// A package's signature and the entry it claims to vouch for.
///
/// The entry is only a claim until [`PackageVerifier::finish`] has checked the signature.
#[derive(Clone)]
pub struct PackageSignature {
    signature: minisign_verify::Signature,
    claimed: PackageEntry,
}

impl std::fmt::Debug for PackageSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackageSignature")
            .field("claimed", &self.claimed)
            .finish_non_exhaustive()
    }
}

impl PackageSignature {
    /// Parses a `.minisig` file's text; `what` names the package in errors.
    pub fn decode(text: &str, what: &str) -> Result<PackageSignature, PackageError> {
        let signature = minisign_verify::Signature::decode(text).map_err(|err| {
            PackageError::SignatureUnreadable {
                what: what.to_owned(),
                reason: err.to_string(),
            }
        })?;
        let claimed: PackageEntry =
            serde_json::from_str(signature.trusted_comment()).map_err(|err| {
                PackageError::BadEntry {
                    what: what.to_owned(),
                    reason: format!("the trusted comment is not a package entry ({err})"),
                }
            })?;
        claimed
            .validate()
            .map_err(|reason| PackageError::BadEntry {
                what: what.to_owned(),
                reason,
            })?;
        Ok(PackageSignature { signature, claimed })
    }

    /// Reads `<archive>.minisig` beside an archive.
    pub fn for_archive(archive: &Path) -> Result<PackageSignature, PackageError> {
        let signature_path = signature_path(archive);
        let what = archive_label(archive);
        let text = std::fs::read_to_string(&signature_path).map_err(|err| {
            PackageError::SignatureUnreadable {
                what: what.clone(),
                reason: format!("{}: {err}", signature_path.display()),
            }
        })?;
        PackageSignature::decode(&text, &what)
    }

    /// The entry the signature claims; trust it only after verification.
    pub fn claimed_entry(&self) -> &PackageEntry {
        &self.claimed
    }

    /// Starts verifying the archive's bytes against this signature.
    pub fn verifier<'a>(
        &'a self,
        key: &'a VendorKey,
        what: &str,
    ) -> Result<PackageVerifier<'a>, PackageError> {
        let stream = key
            .key
            .verify_stream(&self.signature)
            .map_err(|err| signature_error(err, what))?;
        Ok(PackageVerifier {
            what: what.to_owned(),
            entry: &self.claimed,
            stream,
            sha256: Sha256::new(),
            bytes: 0,
        })
    }
}

/// Checks an archive's bytes as they stream by: size, SHA-256 and signature at once.
pub struct PackageVerifier<'a> {
    what: String,
    entry: &'a PackageEntry,
    stream: minisign_verify::StreamVerifier<'a>,
    sha256: Sha256,
    bytes: u64,
}

impl std::fmt::Debug for PackageVerifier<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackageVerifier")
            .field("what", &self.what)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl PackageVerifier<'_> {
    /// Feeds the next bytes; refuses as soon as the archive outgrows its signed size.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), PackageError> {
        self.bytes += chunk.len() as u64;
        if self.bytes > self.entry.size {
            return Err(PackageError::TooLarge {
                what: self.what.clone(),
                limit: self.entry.size,
            });
        }
        self.sha256.update(chunk);
        self.stream.update(chunk);
        Ok(())
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Ends verification: the size and hash must match the signed entry, and the
    /// signature must hold for both the bytes and the entry.
    pub fn finish(mut self) -> Result<PackageEntry, PackageError> {
        if self.bytes != self.entry.size {
            return Err(PackageError::SizeMismatch {
                what: self.what,
                expected: self.entry.size,
                actual: self.bytes,
            });
        }
        let actual = hex::encode(self.sha256.finalize());
        if !actual.eq_ignore_ascii_case(&self.entry.sha256) {
            return Err(PackageError::HashMismatch {
                what: self.what,
                expected: self.entry.sha256.clone(),
                actual,
            });
        }
        self.stream
            .finalize()
            .map_err(|err| signature_error(err, &self.what))?;
        Ok(self.entry.clone())
    }
}

fn signature_error(err: minisign_verify::Error, what: &str) -> PackageError {
    match err {
        minisign_verify::Error::UnexpectedKeyId => PackageError::WrongKey {
            what: what.to_owned(),
        },
        minisign_verify::Error::InvalidSignature => PackageError::BadSignature {
            what: what.to_owned(),
        },
        other => PackageError::SignatureUnreadable {
            what: what.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// `<archive>.minisig`.
pub fn signature_path(archive: &Path) -> PathBuf {
    let mut name = archive.as_os_str().to_owned();
    name.push(crate::release::SIGNATURE_SUFFIX);
    PathBuf::from(name)
}

fn archive_label(archive: &Path) -> String {
    archive
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| archive.display().to_string())
}

/// Verifies an archive for installing on this machine: [`verify_archive`], and that it is
/// a `kind` release built for this platform.
pub fn verify_for_install(
    archive: &Path,
    key: &VendorKey,
    kind: ReleaseKind,
) -> Result<PackageEntry, PackageError> {
    let entry = verify_archive(archive, key)?;
    if entry.kind != kind {
        return Err(PackageError::WrongKind {
            what: archive_label(archive),
            expected: kind,
            actual: entry.kind,
        });
    }
    let platform = crate::release::current_platform();
    if entry.platform != platform {
        return Err(PackageError::WrongPlatform {
            what: archive_label(archive),
            expected: platform,
            actual: entry.platform,
        });
    }
    Ok(entry)
}

/// Verifies an archive on disk against the `.minisig` beside it, in one pass.
pub fn verify_archive(archive: &Path, key: &VendorKey) -> Result<PackageEntry, PackageError> {
    let signature = PackageSignature::for_archive(archive)?;
    let what = archive_label(archive);
    let mut verifier = signature.verifier(key, &what)?;
    let mut file = File::open(archive).map_err(|err| PackageError::io(&what, err))?;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|err| PackageError::io(&what, err))?;
        if read == 0 {
            break;
        }
        verifier.update(&buffer[..read])?;
    }
    let entry = verifier.finish()?;
    // The name is part of what was signed: a renamed package is a different claim.
    if entry.archive != what {
        return Err(PackageError::BadEntry {
            what,
            reason: format!("the signature is for the archive {:?}", entry.archive),
        });
    }
    Ok(entry)
}

/// Verifies a feed manifest's bytes against its detached signature and parses it.
pub fn verify_manifest(
    manifest: &[u8],
    signature_text: &str,
    key: &VendorKey,
) -> Result<FeedManifest, PackageError> {
    const WHAT: &str = "the feed manifest";
    let signature = minisign_verify::Signature::decode(signature_text).map_err(|err| {
        PackageError::SignatureUnreadable {
            what: WHAT.to_owned(),
            reason: err.to_string(),
        }
    })?;
    key.key
        .verify(manifest, &signature, false)
        .map_err(|err| signature_error(err, WHAT))?;
    let parsed: FeedManifest =
        serde_json::from_slice(manifest).map_err(|err| PackageError::BadEntry {
            what: WHAT.to_owned(),
            reason: format!("not a manifest ({err})"),
        })?;
    if parsed.format != MANIFEST_FORMAT || parsed.product != PRODUCT {
        return Err(PackageError::BadEntry {
            what: WHAT.to_owned(),
            reason: format!(
                "format {} of product {:?}; this build reads format {MANIFEST_FORMAT} of {PRODUCT:?}",
                parsed.format, parsed.product
            ),
        });
    }
    for entry in &parsed.releases {
        entry.validate().map_err(|reason| PackageError::BadEntry {
            what: WHAT.to_owned(),
            reason,
        })?;
    }
    Ok(parsed)
}

/// Unpacks a verified `.tar.gz` archive into `target`, which must not exist yet.
///
/// Refused, with nothing left behind: absolute paths, `..`, symlinks or hard links that
/// point outside `target`, device files, FIFOs and any other special entry.
pub fn unpack(archive: &Path, target: &Path) -> Result<(), PackageError> {
    let what = archive_label(archive);
    std::fs::create_dir(target)
        .map_err(|err| PackageError::io(format!("cannot create {}", target.display()), err))?;
    let result = unpack_into(archive, target, &what);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(target);
    }
    result
}

fn unpack_into(archive: &Path, target: &Path, what: &str) -> Result<(), PackageError> {
    let file = File::open(archive).map_err(|err| PackageError::io(what, err))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    tar.set_preserve_permissions(false);
    tar.set_overwrite(false);
    let entries = tar.entries().map_err(|err| PackageError::io(what, err))?;
    // Links this archive created: nothing may be written through one, and no link may
    // point through one, so a chain of links that each look harmless cannot add up to a
    // way out (`a -> .`, then `a/b -> ..`).
    let mut links: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let through_link = |links: &std::collections::HashSet<PathBuf>, path: &Path| {
        path.ancestors()
            .skip(1)
            .any(|ancestor| links.contains(ancestor))
    };
    for entry in entries {
        let mut entry = entry.map_err(|err| PackageError::io(what, err))?;
        let path = entry
            .path()
            .map_err(|err| PackageError::io(what, err))?
            .into_owned();
        let shown = path.display().to_string();
        let unsafe_entry = |reason: &str| PackageError::UnsafeEntry {
            path: shown.clone(),
            reason: reason.to_owned(),
        };
        let relative = normal_relative(&path).ok_or_else(|| {
            unsafe_entry("absolute paths and \"..\" could write outside the install folder")
        })?;
        if through_link(&links, &relative) || links.contains(&relative) {
            return Err(unsafe_entry(
                "it would be written through a link the archive made",
            ));
        }
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular | tar::EntryType::GNUSparse | tar::EntryType::Directory => {}
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(|err| PackageError::io(what, err))?
                    .ok_or_else(|| unsafe_entry("a link without a target"))?;
                let resolved = if kind == tar::EntryType::Symlink {
                    // Relative to the link's own folder.
                    let base = relative.parent().unwrap_or(Path::new(""));
                    if link.is_absolute() {
                        None
                    } else {
                        normal_relative(&base.join(&link))
                    }
                } else {
                    // Hard links name a path inside the archive.
                    normal_relative(&link)
                };
                let stays_inside = resolved
                    .as_ref()
                    .is_some_and(|resolved| !through_link(&links, resolved));
                if !stays_inside {
                    return Err(unsafe_entry(&format!(
                        "it links to {} outside the install folder",
                        link.display()
                    )));
                }
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(unsafe_entry("device files are never part of a release"));
            }
            tar::EntryType::Fifo => return Err(unsafe_entry("FIFOs are never part of a release")),
            other => {
                return Err(unsafe_entry(&format!("unsupported entry type {other:?}")));
            }
        }
        if kind == tar::EntryType::Symlink {
            links.insert(relative.clone());
        }
        let unpacked = entry
            .unpack_in(target)
            .map_err(|err| PackageError::io(format!("{what}: {shown}"), err))?;
        if !unpacked {
            return Err(unsafe_entry(
                "it would be written outside the install folder",
            ));
        }
    }
    Ok(())
}

/// The path with `.` removed, if it is relative and never climbs above its start.
fn normal_relative(path: &Path) -> Option<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_that_climb_out_are_caught() {
        assert_eq!(
            normal_relative(Path::new("bin/x")),
            Some(PathBuf::from("bin/x"))
        );
        assert_eq!(
            normal_relative(Path::new("./bin/../lib/x")),
            Some(PathBuf::from("lib/x"))
        );
        assert_eq!(normal_relative(Path::new("../x")), None);
        assert_eq!(normal_relative(Path::new("bin/../../x")), None);
        assert_eq!(normal_relative(Path::new("/etc/passwd")), None);
    }

    fn archive_with(dir: &Path, entries: &[(tar::EntryType, &str, Option<&str>)]) -> PathBuf {
        let mut builder = tar::Builder::new(Vec::new());
        for (kind, path, link) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(0o755);
            header.set_size(0);
            if let Some(link) = link {
                header.set_link_name(link).unwrap();
            }
            builder
                .append_data(&mut header, path, std::io::empty())
                .unwrap();
        }
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, &builder.into_inner().unwrap()).unwrap();
        let archive = dir.join("test.tar.gz");
        std::fs::write(&archive, encoder.finish().unwrap()).unwrap();
        archive
    }

    #[test]
    fn a_chain_of_links_cannot_lead_outside() {
        let dir = tempfile::tempdir().unwrap();
        let archive = archive_with(
            dir.path(),
            &[
                (tar::EntryType::Symlink, "l1", Some(".")),
                (tar::EntryType::Symlink, "l1/l2", Some("..")),
            ],
        );
        let err = unpack(&archive, &dir.path().join("target")).unwrap_err();
        assert!(err.to_string().contains("through a link"), "{err}");
        assert!(!dir.path().join("target").exists());
    }

    #[test]
    fn links_that_stay_inside_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let archive = archive_with(
            dir.path(),
            &[
                (tar::EntryType::Directory, "lib", None),
                (tar::EntryType::Regular, "lib/libx.so.1", None),
                (tar::EntryType::Symlink, "lib/libx.so", Some("libx.so.1")),
            ],
        );
        let target = dir.path().join("target");
        unpack(&archive, &target).unwrap();
        assert_eq!(
            std::fs::read_link(target.join("lib/libx.so")).unwrap(),
            Path::new("libx.so.1")
        );
    }
}
