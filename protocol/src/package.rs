//! Verifying a release package and unpacking it without trusting its contents.
//!
//! A package is an archive plus its minisign signature, whose trusted comment is the
//! archive's [`PackageEntry`]. Verification streams the archive once, checking its size,
//! SHA-256 and signature together, so a download can be verified while it arrives and a
//! 200 MB release never has to be in memory; its parts can run on threads of their own, so
//! that hashing keeps up with the network. Unpacking refuses every entry that could
//! write outside the target folder or create something other than files, folders and
//! links inside it, and every link that could lead out of it: a link may only point into
//! its own folder or below ([`link_target_problem`]), the rule the release packer applies
//! too.
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
    #[error("the archive entry {path:?} is refused: it links to {target:?}, {reason}")]
    UnsafeLink {
        path: String,
        target: String,
        reason: String,
    },
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
    /// The same signature labelled with minisign's legacy algorithm id, for checking it
    /// against a digest hashed elsewhere ([`relabel_for_digest`]); `None` for a legacy
    /// signature, which [`PackageSignature::verifier`] refuses anyway.
    over_digest: Option<minisign_verify::Signature>,
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
        Ok(PackageSignature {
            signature,
            over_digest: relabel_for_digest(text),
            claimed,
        })
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
    ///
    /// Refused here, before any byte: a signature made with another key
    /// ([`PackageError::WrongKey`]) and a legacy signature over the bytes themselves rather
    /// than their BLAKE2b-512 hash ([`PackageError::SignatureUnreadable`]), which cannot be
    /// checked while the bytes stream by.
    pub fn verifier(&self, key: &VendorKey, what: &str) -> Result<PackageVerifier, PackageError> {
        // minisign-verify's own stream check, for its refusals (the key id, legacy
        // signatures) with their wording; its hashing is not used.
        key.key
            .verify_stream(&self.signature)
            .map_err(|err| signature_error(err, what))?;
        let over_digest =
            self.over_digest
                .clone()
                .ok_or_else(|| PackageError::SignatureUnreadable {
                    what: what.to_owned(),
                    reason: "the signature line cannot be read as a prehashed signature".to_owned(),
                })?;
        let size_limit = SizeLimit {
            what: what.to_owned(),
            limit: self.claimed.size,
            bytes: 0,
        };
        Ok(PackageVerifier {
            size_limit,
            sha256: ArchiveSha256::default(),
            prehash: ArchivePrehash::default(),
            check: FinalCheck {
                what: what.to_owned(),
                entry: self.claimed.clone(),
                key: key.key.clone(),
                over_digest,
            },
        })
    }
}

/// The signature in `text` relabelled from minisign's `ED` (Ed25519 over the BLAKE2b-512
/// hash of the file) to `Ed` (Ed25519 over the bytes given), or `None` if it is not an
/// `ED` signature.
///
/// minisign-verify hashes a streamed file with its own portable BLAKE2b, which takes longer
/// than the download; it has no call that takes a digest. Given the digest as "the bytes"
/// of an `Ed` signature, its `verify` runs exactly the checks of a prehashed verification:
/// the key id, Ed25519 over the digest, and the global signature over the signature and
/// the trusted comment, which does not cover the algorithm id. The relabelled signature is
/// only ever checked against a BLAKE2b-512 digest computed here ([`FinalCheck::finish`]).
fn relabel_for_digest(text: &str) -> Option<minisign_verify::Signature> {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    let mut lines = text.lines();
    let untrusted_comment = lines.next()?;
    let mut signature_line = engine.decode(lines.next()?.trim_end()).ok()?;
    if signature_line.get(..2)? != b"ED" {
        return None;
    }
    signature_line[..2].copy_from_slice(b"Ed");
    let trusted_comment = lines.next()?;
    let global_signature = lines.next()?;
    let relabelled = format!(
        "{untrusted_comment}\n{}\n{trusted_comment}\n{global_signature}\n",
        engine.encode(signature_line)
    );
    minisign_verify::Signature::decode(&relabelled).ok()
}

/// Checks an archive's bytes as they stream by: size, SHA-256 and signature at once.
///
/// It owns all it needs, so it can move to another thread; [`PackageVerifier::into_parts`]
/// splits it so that each hash can run on a thread of its own.
#[derive(Clone)]
pub struct PackageVerifier {
    size_limit: SizeLimit,
    sha256: ArchiveSha256,
    prehash: ArchivePrehash,
    check: FinalCheck,
}

impl std::fmt::Debug for PackageVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackageVerifier")
            .field("what", &self.size_limit.what)
            .field("bytes", &self.size_limit.bytes)
            .finish_non_exhaustive()
    }
}

impl PackageVerifier {
    /// Feeds the next bytes; refuses as soon as the archive outgrows its signed size.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), PackageError> {
        self.size_limit.admit(chunk.len())?;
        self.sha256.update(chunk);
        self.prehash.update(chunk);
        Ok(())
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.size_limit.bytes
    }

    /// Ends verification: the size and hash must match the signed entry, and the
    /// signature must hold for both the bytes and the entry.
    pub fn finish(self) -> Result<PackageEntry, PackageError> {
        self.check.finish(self.sha256, self.prehash)
    }

    /// The verifier as independent parts, each owned, for hashing on several threads: the
    /// size limit for the task that receives the bytes, a hasher each for SHA-256 and for
    /// the signature's BLAKE2b-512, and the check that joins the two hashes. Bytes fed
    /// before the split count in the parts.
    pub fn into_parts(self) -> VerifierParts {
        VerifierParts {
            size_limit: self.size_limit,
            sha256: self.sha256,
            prehash: self.prehash,
            check: self.check,
        }
    }
}

/// A [`PackageVerifier`] taken apart ([`PackageVerifier::into_parts`]). Every byte goes
/// through `size_limit` first, then to both hashers in order; [`FinalCheck::finish`]
/// refuses unless both hashed exactly the signed size.
#[derive(Debug)]
pub struct VerifierParts {
    pub size_limit: SizeLimit,
    pub sha256: ArchiveSha256,
    pub prehash: ArchivePrehash,
    pub check: FinalCheck,
}

/// Counts the bytes as they arrive and refuses the first one beyond the signed size, so a
/// hostile feed cannot fill the disk.
#[derive(Debug, Clone)]
pub struct SizeLimit {
    what: String,
    limit: u64,
    bytes: u64,
}

impl SizeLimit {
    /// Counts `len` more bytes; refuses if they take the archive beyond its signed size.
    pub fn admit(&mut self, len: usize) -> Result<(), PackageError> {
        let bytes = self.bytes.saturating_add(len as u64);
        if bytes > self.limit {
            return Err(PackageError::TooLarge {
                what: self.what.clone(),
                limit: self.limit,
            });
        }
        self.bytes = bytes;
        Ok(())
    }

    /// Bytes admitted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The archive's SHA-256, as the manifest and the trusted comment state it.
#[derive(Debug, Clone, Default)]
pub struct ArchiveSha256 {
    state: Sha256,
    bytes: u64,
}

impl ArchiveSha256 {
    pub fn update(&mut self, chunk: &[u8]) {
        self.state.update(chunk);
        self.bytes += chunk.len() as u64;
    }
}

/// The archive's BLAKE2b-512, which the minisign signature signs (minisign's prehashed
/// mode).
#[derive(Debug, Clone, Default)]
pub struct ArchivePrehash {
    state: blake2b_simd::State,
    bytes: u64,
}

impl ArchivePrehash {
    pub fn update(&mut self, chunk: &[u8]) {
        self.state.update(chunk);
        self.bytes += chunk.len() as u64;
    }
}

/// What the hashes are checked against: the signed entry and the signature.
#[derive(Clone)]
pub struct FinalCheck {
    what: String,
    entry: PackageEntry,
    key: minisign_verify::PublicKey,
    over_digest: minisign_verify::Signature,
}

impl std::fmt::Debug for FinalCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FinalCheck")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl FinalCheck {
    /// Ends verification: both hashers must have seen the signed size, the SHA-256 must be
    /// the signed one, and the signature must hold for the BLAKE2b-512 and the entry.
    pub fn finish(
        self,
        sha256: ArchiveSha256,
        prehash: ArchivePrehash,
    ) -> Result<PackageEntry, PackageError> {
        self.check_size(sha256.bytes)?;
        let actual = hex::encode(sha256.state.finalize());
        if !actual.eq_ignore_ascii_case(&self.entry.sha256) {
            return Err(PackageError::HashMismatch {
                what: self.what,
                expected: self.entry.sha256,
                actual,
            });
        }
        self.finish_signed(prehash)
    }

    /// Ends verification by the signature alone: the BLAKE2b-512 must have seen the signed
    /// size, and the signature must hold for it and the entry.
    ///
    /// The signature binds every byte (Ed25519 over the BLAKE2b-512 of the archive) and the
    /// entry, SHA-256 included, so a second hash of the same bytes adds no assurance; a
    /// download that must keep pace with the wire hashes once ([`PackageVerifier`] checks
    /// both).
    pub fn finish_signed(self, prehash: ArchivePrehash) -> Result<PackageEntry, PackageError> {
        self.check_size(prehash.bytes)?;
        let digest = prehash.state.finalize();
        self.key
            .verify(digest.as_bytes(), &self.over_digest, true)
            .map_err(|err| signature_error(err, &self.what))?;
        Ok(self.entry)
    }

    fn check_size(&self, bytes: u64) -> Result<(), PackageError> {
        if bytes != self.entry.size {
            return Err(PackageError::SizeMismatch {
                what: self.what.clone(),
                expected: self.entry.size,
                actual: bytes,
            });
        }
        Ok(())
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
/// Refused, with nothing left behind: absolute paths and `..` in entry paths; links whose
/// target is absolute or holds a `..` (text cannot tell where `b/..` leads once `b` is
/// itself a link, so no link may climb at all); entries written through, or over, a link
/// the archive made earlier; hard links to anything but a file unpacked earlier; device
/// files, FIFOs and any other special entry.
pub fn unpack(archive: &Path, target: &Path) -> Result<(), PackageError> {
    let what = archive_label(archive);
    std::fs::create_dir(target)
        .map_err(|err| PackageError::io(format!("cannot create {}", target.display()), err))?;
    let result = std::fs::File::open(archive)
        .map_err(|err| PackageError::io(&what, err))
        .and_then(|file| unpack_reader(std::io::BufReader::new(file), target, &what));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(target);
    }
    result
}

// Unpacks a `.tar.gz` stream into the existing folder `target` by the rules of `unpack`,
// leaving what it unpacked before a refusal for the caller to remove.
fn unpack_reader(archive: impl Read, target: &Path, what: &str) -> Result<(), PackageError> {
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    tar.set_preserve_permissions(false);
    tar.set_overwrite(false);
    let entries = tar.entries().map_err(|err| PackageError::io(what, err))?;
    for entry in entries {
        let mut entry = entry.map_err(|err| PackageError::io(what, err))?;
        let path = entry
            .path()
            .map_err(|err| PackageError::io(what, err))?
            .into_owned();
        check_entry(&mut entry, &path, target, what)?;
        let shown = path.display().to_string();
        let unpacked = entry
            .unpack_in(target)
            .map_err(|err| PackageError::io(format!("{what}: {shown}"), err))?;
        if !unpacked {
            return Err(PackageError::UnsafeEntry {
                path: shown,
                reason: "it would be written outside the install folder".to_owned(),
            });
        }
    }
    Ok(())
}

// Decides on one entry before anything of it is written, against what the archive has
// unpacked into `target` so far.
fn check_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    path: &Path,
    target: &Path,
    what: &str,
) -> Result<(), PackageError> {
    let shown = path.display().to_string();
    let unsafe_entry = |reason: String| PackageError::UnsafeEntry {
        path: shown.clone(),
        reason,
    };
    let relative = plain_relative(path).ok_or_else(|| {
        unsafe_entry("absolute paths and \"..\" could write outside the install folder".into())
    })?;
    // On disk, not from the archive's own list: a hard link to a link, or a name that
    // differs only in case on a case-insensitive file system, is a link all the same.
    if let Some(link) = first_link_on_path(target, &relative) {
        let reason = if link == relative {
            format!(
                "it would replace the link {:?} that the archive made earlier",
                link.display().to_string()
            )
        } else {
            format!(
                "it would be written through the link {:?} that the archive made earlier",
                link.display().to_string()
            )
        };
        return Err(unsafe_entry(reason));
    }
    let kind = entry.header().entry_type();
    match kind {
        tar::EntryType::Regular | tar::EntryType::GNUSparse | tar::EntryType::Directory => Ok(()),
        tar::EntryType::Symlink | tar::EntryType::Link => {
            let link = entry
                .link_name()
                .map_err(|err| PackageError::io(what, err))?
                .ok_or_else(|| unsafe_entry("a link without a target".into()))?
                .into_owned();
            let unsafe_link = |reason: String| PackageError::UnsafeLink {
                path: shown.clone(),
                target: link.display().to_string(),
                reason,
            };
            if let Some(reason) = link_target_problem(&link) {
                return Err(unsafe_link(reason.to_owned()));
            }
            if kind == tar::EntryType::Link {
                // A hard link names another entry of the archive by its own path.
                let linked = plain_relative(&link).unwrap_or_default();
                if let Some(through) = first_link_on_path(target, &linked) {
                    let reason = if through == linked {
                        "which is a link, not a file the archive unpacked earlier".to_owned()
                    } else {
                        format!(
                            "reached through the link {:?}; a hard link must name a file the \
                             archive unpacked earlier",
                            through.display().to_string()
                        )
                    };
                    return Err(unsafe_link(reason));
                }
                let is_file = std::fs::symlink_metadata(target.join(&linked))
                    .is_ok_and(|metadata| metadata.is_file());
                if !is_file {
                    return Err(unsafe_link(
                        "which is not a file the archive unpacked earlier".to_owned(),
                    ));
                }
            }
            Ok(())
        }
        tar::EntryType::Char | tar::EntryType::Block => Err(unsafe_entry(
            "device files are never part of a release".into(),
        )),
        tar::EntryType::Fifo => Err(unsafe_entry("FIFOs are never part of a release".into())),
        other => Err(unsafe_entry(format!("unsupported entry type {other:?}"))),
    }
}

/// Why a link with this target may not be part of a release, if it may not: release
/// packing and unpacking apply the same rule.
///
/// A link may only point into its own folder or below: relative, without `..`. Text
/// cannot tell where `..` leads once some folder on the way is itself a link (`b -> .`,
/// then `a -> b/..` is `a -> ..`), so no link may climb at all.
pub fn link_target_problem(target: &Path) -> Option<&'static str> {
    if target.as_os_str().is_empty() {
        return Some("an empty target");
    }
    for component in target.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => {
                return Some(
                    "an absolute target, outside the install folder; links in a release must \
                     be relative",
                );
            }
            Component::ParentDir => {
                return Some(
                    "a target with \"..\", which could lead outside the install folder; links \
                     in a release may only point into their own folder or below",
                );
            }
            Component::CurDir | Component::Normal(_) => {}
        }
    }
    None
}

/// The first part of `root/relative` that is a symbolic link on disk, the last part
/// included, as a path relative to `root`.
pub fn first_link_on_path(root: &Path, relative: &Path) -> Option<PathBuf> {
    let mut partial = PathBuf::new();
    for part in relative.components() {
        partial.push(part);
        let is_link = std::fs::symlink_metadata(root.join(&partial))
            .is_ok_and(|metadata| metadata.file_type().is_symlink());
        if is_link {
            return Some(partial);
        }
    }
    None
}

/// The path with `.` removed, if it is relative and has no `..`.
fn plain_relative(path: &Path) -> Option<PathBuf> {
    let mut plain = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => plain.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    mod verification {
        use super::*;
        use crate::release::{PRODUCT, ReleaseKind};
        use base64::Engine as _;

        const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

        struct Signer {
            secret: minisign::SecretKey,
            public: VendorKey,
            /// The public key's 42 bytes: algorithm, key id, Ed25519 key.
            public_bytes: Vec<u8>,
        }

        fn signer() -> Signer {
            let pair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
            let public_base64 = pair.pk.to_base64();
            Signer {
                secret: pair.sk,
                public: VendorKey::decode(&public_base64).unwrap(),
                public_bytes: BASE64.decode(public_base64).unwrap(),
            }
        }

        fn archive_bytes(len: usize) -> Vec<u8> {
            let mut state = 0x9e37_79b9_7f4a_7c15_u64;
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        }

        fn entry_for(bytes: &[u8]) -> PackageEntry {
            let version = semver::Version::new(2, 0, 0);
            PackageEntry {
                product: PRODUCT.to_owned(),
                kind: ReleaseKind::Server,
                archive: PackageEntry::archive_name(ReleaseKind::Server, &version, "linux-x86_64"),
                version,
                platform: "linux-x86_64".to_owned(),
                size: bytes.len() as u64,
                sha256: hex::encode(Sha256::digest(bytes)),
                notes: "release notes".to_owned(),
                date: "2026-11-28T09:00:00Z".to_owned(),
            }
        }

        /// The `.minisig` text of `signed` with `entry` as its trusted comment.
        fn sign(signer: &Signer, signed: &[u8], entry: &PackageEntry) -> String {
            let comment = serde_json::to_string(entry).unwrap();
            minisign::sign(None, &signer.secret, signed, Some(&comment), None)
                .unwrap()
                .into_string()
        }

        fn verify_in_chunks(
            text: &str,
            key: &VendorKey,
            bytes: &[u8],
            chunk: usize,
        ) -> Result<PackageEntry, PackageError> {
            let signature = PackageSignature::decode(text, "a package")?;
            let mut verifier = signature.verifier(key, "a package")?;
            for piece in bytes.chunks(chunk.max(1)) {
                verifier.update(piece)?;
            }
            verifier.finish()
        }

        /// Replaces line `line` (0-based) of a signature with `edit` applied to it.
        fn edit_line(text: &str, line: usize, edit: impl FnOnce(&str) -> String) -> String {
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            lines[line] = edit(&lines[line]);
            lines.join("\n") + "\n"
        }

        /// A signature line with byte `index` of its decoded bytes flipped.
        fn flip_decoded_byte(line: &str, index: usize) -> String {
            let mut bytes = BASE64.decode(line).unwrap();
            bytes[index] ^= 0x01;
            BASE64.encode(bytes)
        }

        #[test]
        fn blake2b_512_is_the_standard_one() {
            // RFC 7693, appendix A.
            let mut prehash = ArchivePrehash::default();
            prehash.update(b"abc");
            assert_eq!(
                hex::encode(prehash.state.finalize().as_bytes()),
                "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d1\
                 7d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923"
            );
        }

        #[test]
        fn a_vendor_signed_archive_verifies_in_any_chunking() {
            let signer = signer();
            let bytes = archive_bytes(300_001);
            let entry = entry_for(&bytes);
            let text = sign(&signer, &bytes, &entry);
            for chunk in [1, 127, 128, 129, 4096, 65_537, 300_001] {
                assert_eq!(
                    verify_in_chunks(&text, &signer.public, &bytes, chunk).unwrap(),
                    entry,
                    "chunks of {chunk}"
                );
            }
            // An empty archive is an archive too.
            let entry = entry_for(b"");
            let text = sign(&signer, b"", &entry);
            assert_eq!(
                verify_in_chunks(&text, &signer.public, b"", 1).unwrap(),
                entry
            );
        }

        #[test]
        fn the_parts_verify_what_the_whole_verifies_and_refuse_unequal_counts() {
            let signer = signer();
            let bytes = archive_bytes(100_000);
            let entry = entry_for(&bytes);
            let signature =
                PackageSignature::decode(&sign(&signer, &bytes, &entry), "a package").unwrap();

            // Some bytes before the split (a resumed download's prefix), the rest after.
            let mut verifier = signature.verifier(&signer.public, "a package").unwrap();
            verifier.update(&bytes[..30_000]).unwrap();
            let VerifierParts {
                mut size_limit,
                mut sha256,
                mut prehash,
                check,
            } = verifier.into_parts();
            for piece in bytes[30_000..].chunks(7_000) {
                size_limit.admit(piece.len()).unwrap();
                sha256.update(piece);
                prehash.update(piece);
            }
            assert_eq!(size_limit.bytes(), 100_000);
            assert_eq!(check.finish(sha256, prehash).unwrap(), entry);

            // A chunk that reached one hasher and not the other is refused.
            let parts = signature
                .verifier(&signer.public, "a package")
                .unwrap()
                .into_parts();
            let (mut sha256, mut prehash) = (parts.sha256, parts.prehash);
            sha256.update(&bytes);
            prehash.update(&bytes[..99_999]);
            let err = parts.check.finish(sha256, prehash).unwrap_err();
            assert!(
                matches!(err, PackageError::SizeMismatch { actual: 99_999, .. }),
                "{err:?}"
            );
        }

        #[test]
        fn the_signature_alone_refuses_a_flipped_byte_and_a_short_archive() {
            let signer = signer();
            let bytes = archive_bytes(60_000);
            let entry = entry_for(&bytes);
            let signature =
                PackageSignature::decode(&sign(&signer, &bytes, &entry), "a package").unwrap();
            let by_signature = |data: &[u8]| {
                let parts = signature
                    .verifier(&signer.public, "a package")
                    .unwrap()
                    .into_parts();
                let mut prehash = parts.prehash;
                for piece in data.chunks(4_096) {
                    prehash.update(piece);
                }
                parts.check.finish_signed(prehash)
            };
            assert_eq!(by_signature(&bytes).unwrap(), entry);

            let mut altered = bytes.clone();
            altered[30_000] ^= 0x01;
            let err = by_signature(&altered).unwrap_err();
            assert!(matches!(err, PackageError::BadSignature { .. }), "{err:?}");

            let err = by_signature(&bytes[..59_999]).unwrap_err();
            assert!(
                matches!(err, PackageError::SizeMismatch { actual: 59_999, .. }),
                "{err:?}"
            );
        }

        #[test]
        fn a_flipped_byte_in_the_archive_is_refused() {
            let signer = signer();
            let bytes = archive_bytes(50_000);
            let entry = entry_for(&bytes);
            let text = sign(&signer, &bytes, &entry);
            let mut altered = bytes.clone();
            altered[25_000] ^= 0x01;
            let err = verify_in_chunks(&text, &signer.public, &altered, 4096).unwrap_err();
            assert!(matches!(err, PackageError::HashMismatch { .. }), "{err:?}");

            // A trusted comment with the altered archive's SHA-256 over a signature of the
            // original: only the signature's BLAKE2b-512 can tell, and it does.
            let text = sign(&signer, &bytes, &entry_for(&altered));
            let err = verify_in_chunks(&text, &signer.public, &altered, 4096).unwrap_err();
            assert!(matches!(err, PackageError::BadSignature { .. }), "{err:?}");
            assert!(
                err.to_string()
                    .contains("does not verify with the vendor key"),
                "{err}"
            );
        }

        #[test]
        fn a_flipped_byte_in_the_signature_or_the_trusted_comment_is_refused() {
            let signer = signer();
            let bytes = archive_bytes(10_000);
            let entry = entry_for(&bytes);
            let text = sign(&signer, &bytes, &entry);
            assert!(verify_in_chunks(&text, &signer.public, &bytes, 999).is_ok());

            // The Ed25519 signature over the BLAKE2b-512 hash (after algorithm and key id),
            // its first and last bytes and one in between.
            for index in [10, 41, 73] {
                let altered = edit_line(&text, 1, |line| flip_decoded_byte(line, index));
                let err = verify_in_chunks(&altered, &signer.public, &bytes, 999).unwrap_err();
                assert!(
                    matches!(err, PackageError::BadSignature { .. }),
                    "byte {index}: {err:?}"
                );
            }
            // The global signature over the signature and the trusted comment.
            for index in [0, 31, 63] {
                let altered = edit_line(&text, 3, |line| flip_decoded_byte(line, index));
                let err = verify_in_chunks(&altered, &signer.public, &bytes, 999).unwrap_err();
                assert!(
                    matches!(err, PackageError::BadSignature { .. }),
                    "byte {index}: {err:?}"
                );
            }
            // The trusted comment, still a valid entry: other notes.
            let altered = edit_line(&text, 2, |line| {
                line.replace("release notes", "release notez")
            });
            assert_ne!(altered, text);
            let signature = PackageSignature::decode(&altered, "a package").unwrap();
            assert_eq!(signature.claimed_entry().notes, "release notez");
            let err = verify_in_chunks(&altered, &signer.public, &bytes, 999).unwrap_err();
            assert!(matches!(err, PackageError::BadSignature { .. }), "{err:?}");
        }

        #[test]
        fn another_key_is_refused_whether_or_not_its_key_id_matches() {
            let signer = signer();
            let other = self::signer();
            let bytes = archive_bytes(10_000);
            let entry = entry_for(&bytes);
            let text = sign(&signer, &bytes, &entry);
            let signature = PackageSignature::decode(&text, "a package").unwrap();
            let err = signature.verifier(&other.public, "a package").unwrap_err();
            assert!(matches!(err, PackageError::WrongKey { .. }), "{err:?}");

            // The other key's Ed25519 key under the signer's key id: the key id passes,
            // the signature does not.
            let mut impostor = signer.public_bytes.clone();
            impostor[10..].copy_from_slice(&other.public_bytes[10..]);
            let impostor = VendorKey::decode(&BASE64.encode(impostor)).unwrap();
            let err = verify_in_chunks(&text, &impostor, &bytes, 999).unwrap_err();
            assert!(matches!(err, PackageError::BadSignature { .. }), "{err:?}");
        }

        #[test]
        fn a_legacy_signature_over_the_bytes_themselves_is_refused_as_today() {
            let signer = signer();
            let bytes = archive_bytes(1_000);
            let entry = entry_for(&bytes);
            let text = sign(&signer, &bytes, &entry);
            // Labelled `Ed`, the legacy algorithm: it decodes, and is refused before any
            // byte is hashed.
            let legacy = edit_line(&text, 1, |line| {
                let mut decoded = BASE64.decode(line).unwrap();
                decoded[..2].copy_from_slice(b"Ed");
                BASE64.encode(decoded)
            });
            let signature = PackageSignature::decode(&legacy, "a package").unwrap();
            let err = signature.verifier(&signer.public, "a package").unwrap_err();
            assert!(
                matches!(&err, PackageError::SignatureUnreadable { reason, .. }
                    if reason.contains("non-legacy")),
                "{err:?}"
            );
        }

        #[test]
        fn size_limits_hold_while_streaming_and_at_the_end() {
            let signer = signer();
            let bytes = archive_bytes(10_000);
            let entry = entry_for(&bytes);
            let text = sign(&signer, &bytes, &entry);
            let mut longer = bytes.clone();
            longer.push(0);
            let err = verify_in_chunks(&text, &signer.public, &longer, 10_001).unwrap_err();
            assert!(
                matches!(err, PackageError::TooLarge { limit: 10_000, .. }),
                "{err:?}"
            );
            let err = verify_in_chunks(&text, &signer.public, &bytes[..9_999], 100).unwrap_err();
            assert!(
                matches!(
                    err,
                    PackageError::SizeMismatch {
                        expected: 10_000,
                        actual: 9_999,
                        ..
                    }
                ),
                "{err:?}"
            );
        }

        #[test]
        fn a_refused_chunk_is_not_counted() {
            let signer = signer();
            let entry = entry_for(&[0; 10]);
            let signature =
                PackageSignature::decode(&sign(&signer, &[0; 10], &entry), "a package").unwrap();
            let mut size_limit = signature
                .verifier(&signer.public, "a package")
                .unwrap()
                .into_parts()
                .size_limit;
            size_limit.admit(6).unwrap();
            assert!(size_limit.admit(5).is_err());
            assert_eq!(size_limit.bytes(), 6);
            size_limit.admit(4).unwrap();
            assert_eq!(size_limit.bytes(), 10);
        }
    }

    #[test]
    fn entry_paths_that_are_absolute_or_climb_are_caught() {
        assert_eq!(
            plain_relative(Path::new("./bin/x")),
            Some(PathBuf::from("bin/x"))
        );
        assert_eq!(plain_relative(Path::new("../x")), None);
        assert_eq!(plain_relative(Path::new("bin/../lib/x")), None);
        assert_eq!(plain_relative(Path::new("/etc/passwd")), None);
    }

    #[test]
    fn link_targets_may_only_point_down() {
        for harmless in ["libfoo.so.1", "./libfoo.so.1", "sub/dir/file", "."] {
            assert_eq!(link_target_problem(Path::new(harmless)), None, "{harmless}");
        }
        for refused in ["", "..", "b/..", "a/../b", "/etc/passwd", "/"] {
            assert!(
                link_target_problem(Path::new(refused)).is_some(),
                "{refused:?} accepted"
            );
        }
    }

    /// One archive entry; `contents` only for regular files.
    struct Raw<'a> {
        kind: tar::EntryType,
        path: &'a str,
        link: Option<&'a str>,
        contents: &'a [u8],
    }

    fn file<'a>(path: &'a str, contents: &'a [u8]) -> Raw<'a> {
        Raw {
            kind: tar::EntryType::Regular,
            path,
            link: None,
            contents,
        }
    }

    #[cfg(unix)]
    fn folder(path: &str) -> Raw<'_> {
        Raw {
            kind: tar::EntryType::Directory,
            path,
            link: None,
            contents: b"",
        }
    }

    fn symlink<'a>(path: &'a str, link: &'a str) -> Raw<'a> {
        Raw {
            kind: tar::EntryType::Symlink,
            path,
            link: Some(link),
            contents: b"",
        }
    }

    #[cfg(unix)]
    fn hard_link<'a>(path: &'a str, link: &'a str) -> Raw<'a> {
        Raw {
            kind: tar::EntryType::Link,
            path,
            link: Some(link),
            contents: b"",
        }
    }

    // Headers written byte by byte: the tar crate's builder refuses the hostile paths
    // these tests need.
    fn archive_with(dir: &Path, entries: &[Raw<'_>]) -> PathBuf {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let mut header = tar::Header::new_old();
            let old = header.as_old_mut();
            old.name[..entry.path.len()].copy_from_slice(entry.path.as_bytes());
            if let Some(link) = entry.link {
                old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_entry_type(entry.kind);
            header.set_mode(0o755);
            header.set_size(entry.contents.len() as u64);
            header.set_cksum();
            builder.append(&header, entry.contents).unwrap();
        }
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, &builder.into_inner().unwrap()).unwrap();
        let archive = dir.join("test.tar.gz");
        std::fs::write(&archive, encoder.finish().unwrap()).unwrap();
        archive
    }

    /// Unpacks into `dir/root/target`; returns the error's text and checks that nothing
    /// is left, neither in the target nor beside it.
    fn refused(entries: &[Raw<'_>]) -> (PackageError, String) {
        let dir = tempfile::tempdir().unwrap();
        let archive = archive_with(dir.path(), entries);
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let err = unpack(&archive, &root.join("target")).unwrap_err();
        let left: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().collect();
        assert!(left.is_empty(), "{left:?} left behind after: {err}");
        let text = err.to_string();
        (err, text)
    }

    // Unpacking links: making one on Windows takes a privilege (and Wine follows them).
    #[cfg(unix)]
    #[test]
    fn a_chain_of_links_that_adds_up_to_a_way_out_is_refused() {
        // `b -> .` is harmless alone; `a -> b/..` looks like `a -> .` as text but is `..`
        // on disk, because `b` is a link.
        let (err, text) = refused(&[
            file("bin/changeover-server", b"#!/bin/sh\n"),
            symlink("b", "."),
            symlink("a", "b/.."),
        ]);
        assert!(
            matches!(&err, PackageError::UnsafeLink { path, target, .. }
                if path == "a" && target == "b/.."),
            "{err:?}"
        );
        assert!(text.contains("\"a\"") && text.contains("\"..\""), "{text}");
    }

    #[test]
    fn absolute_link_targets_are_refused() {
        for kind in [tar::EntryType::Symlink, tar::EntryType::Link] {
            let (err, text) = refused(&[Raw {
                kind,
                path: "bin/passwd",
                link: Some("/etc/passwd"),
                contents: b"",
            }]);
            assert!(matches!(err, PackageError::UnsafeLink { .. }), "{err:?}");
            assert!(
                text.contains("\"bin/passwd\"") && text.contains("absolute"),
                "{text}"
            );
        }
    }

    #[test]
    fn link_targets_with_dot_dot_are_refused_even_when_they_stay_inside() {
        for target in ["../lib/libfoo.so", "x/../libfoo.so", ".."] {
            let (err, text) = refused(&[
                file("lib/libfoo.so", b"elf"),
                symlink("lib/sub/libfoo.so", target),
            ]);
            assert!(matches!(err, PackageError::UnsafeLink { .. }), "{err:?}");
            assert!(
                text.contains("lib/sub/libfoo.so") && text.contains("\"..\""),
                "{text}"
            );
        }
    }

    // Unpacking links: making one on Windows takes a privilege (and Wine follows them).
    #[cfg(unix)]
    #[test]
    fn nothing_is_written_through_or_over_a_link_made_earlier() {
        let (err, text) = refused(&[symlink("l1", "."), symlink("l1/l2", "..")]);
        assert!(matches!(err, PackageError::UnsafeEntry { .. }), "{err:?}");
        assert!(
            text.contains("\"l1/l2\"") && text.contains("through the link \"l1\""),
            "{text}"
        );

        // A link into a folder of the release is still a link: nothing goes through it.
        let (_, text) = refused(&[
            folder("data"),
            symlink("shortcut", "data"),
            file("shortcut/config.toml", b"evil = true\n"),
        ]);
        assert!(text.contains("through the link \"shortcut\""), "{text}");

        let (_, text) = refused(&[
            file("lib/libfoo.so.1", b"elf"),
            symlink("lib/libfoo.so", "libfoo.so.1"),
            file("lib/libfoo.so", b"replaced"),
        ]);
        assert!(
            text.contains("replace the link \"lib/libfoo.so\""),
            "{text}"
        );
    }

    // Unpacking links: making one on Windows takes a privilege (and Wine follows them).
    #[cfg(unix)]
    #[test]
    fn hard_links_only_name_files_unpacked_earlier() {
        let (_, text) = refused(&[hard_link("bin/evil", "../../etc/passwd")]);
        assert!(text.contains("outside the install folder"), "{text}");

        // Through a link the archive made, or to a link: refused, though both stay inside.
        let (_, text) = refused(&[
            file("data/file", b"x"),
            symlink("shortcut", "data"),
            hard_link("copy", "shortcut/file"),
        ]);
        assert!(text.contains("through the link \"shortcut\""), "{text}");
        let (_, text) = refused(&[symlink("b", "."), hard_link("c", "b")]);
        assert!(
            text.contains("not a file the archive unpacked earlier"),
            "{text}"
        );
        let (_, text) = refused(&[hard_link("early", "later"), file("later", b"x")]);
        assert!(text.contains("\"early\""), "{text}");
    }

    // Unpacking links: making one on Windows takes a privilege (and Wine follows them).
    #[cfg(unix)]
    #[test]
    fn links_that_point_down_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let archive = archive_with(
            dir.path(),
            &[
                folder("lib"),
                file("lib/libfoo.so.1", b"elf"),
                symlink("lib/libfoo.so", "libfoo.so.1"),
                symlink("lib/current", "."),
                symlink("bin", "lib"),
                hard_link("lib/libfoo.so.1.0", "lib/libfoo.so.1"),
            ],
        );
        let target = dir.path().join("target");
        unpack(&archive, &target).unwrap();
        assert_eq!(
            std::fs::read_link(target.join("lib/libfoo.so")).unwrap(),
            Path::new("libfoo.so.1")
        );
        assert_eq!(std::fs::read(target.join("lib/libfoo.so")).unwrap(), b"elf");
        assert_eq!(
            std::fs::read(target.join("bin/libfoo.so.1.0")).unwrap(),
            b"elf"
        );
    }
}
