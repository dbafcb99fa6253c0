//! The vendor's tools: a signing key pair, and packing a release into a feed.
//!
//! `release keygen` writes a minisign key pair, so vendors can also sign and verify with the
//! standard `minisign` tool. `release pack` turns a release tree into a reproducible
//! `.tar.gz` (sorted entries, fixed owners and times), signs it with its [`PackageEntry`] as
//! the trusted comment, and adds it to the feed's signed manifest. Nothing here ever asks
//! for input: a password comes from an option or the environment.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use changeover_protocol::package::{self, VendorKey};
use changeover_protocol::release::{
    FeedManifest, MANIFEST_FILE, PRODUCT, PackageEntry, ReleaseInfo, ReleaseKind, SIGNATURE_SUFFIX,
};
use sha2::{Digest as _, Sha256};

/// The environment variable that holds the signing key's password.
pub const SIGNING_PASSWORD_ENV: &str = "CHANGEOVER_SIGNING_PASSWORD";

/// What `release keygen` was given.
#[derive(Debug)]
pub struct KeygenOptions {
    pub secret_key: PathBuf,
    pub public_key: PathBuf,
    /// Encrypts the secret key when set.
    pub password: Option<String>,
    pub force: bool,
}

/// Writes a new minisign key pair.
pub fn keygen(options: &KeygenOptions) -> anyhow::Result<()> {
    for path in [&options.secret_key, &options.public_key] {
        if path.exists() && !options.force {
            bail!(
                "{} already exists; a new key would orphan every release signed with it \
                 (pass --force to replace it anyway)",
                path.display()
            );
        }
    }
    let pair = match &options.password {
        Some(password) => minisign::KeyPair::generate_encrypted_keypair(Some(password.clone())),
        None => minisign::KeyPair::generate_unencrypted_keypair(),
    }
    .map_err(|err| anyhow::anyhow!("cannot generate a key pair: {err}"))?;
    let public_text = pair
        .pk
        .to_box()
        .map_err(|err| anyhow::anyhow!("cannot encode the public key: {err}"))?
        .into_string();
    // The crate's own label says "encrypted" whether it is or not.
    let label = if options.password.is_some() {
        "changeover release signing key (password-protected)"
    } else {
        "changeover release signing key (no password)"
    };
    let secret_text = pair
        .sk
        .to_box(Some(label))
        .map_err(|err| anyhow::anyhow!("cannot encode the secret key: {err}"))?
        .into_string();
    write_atomically(&options.secret_key, secret_text.as_bytes(), true)?;
    write_atomically(&options.public_key, public_text.as_bytes(), false)?;
    Ok(())
}

/// What `release pack` was given.
#[derive(Debug)]
pub struct PackOptions {
    pub kind: ReleaseKind,
    pub version: semver::Version,
    pub from: PathBuf,
    pub secret_key: PathBuf,
    pub password: Option<String>,
    pub feed: PathBuf,
    pub platform: String,
    pub notes: String,
}

/// What `release pack` did.
#[derive(Debug)]
pub struct Packed {
    pub archive: PathBuf,
    pub entry: PackageEntry,
    /// The same release with the same bytes was already in the feed.
    pub unchanged: bool,
}

/// Packs a release tree, signs it and adds it to the feed's signed manifest.
pub fn pack(options: &PackOptions) -> anyhow::Result<Packed> {
    let binary = options
        .from
        .join(options.kind.binary_path_for(&options.platform));
    if !binary.is_file() {
        bail!(
            "{} is not a {} release tree: {} is missing",
            options.from.display(),
            options.kind,
            options.kind.binary_path_for(&options.platform)
        );
    }
    let secret_key = load_secret_key(&options.secret_key, options.password.clone())?;
    let vendor_key = vendor_key_of(&secret_key)?;
    std::fs::create_dir_all(&options.feed)
        .with_context(|| format!("cannot create the feed folder {}", options.feed.display()))?;
    let mut manifest = read_feed_manifest(&options.feed, &vendor_key)?;

    let archive_name =
        PackageEntry::archive_name(options.kind, &options.version, &options.platform);
    let existing = manifest
        .releases
        .iter()
        .find(|entry| {
            entry.kind == options.kind
                && entry.version == options.version
                && entry.platform == options.platform
        })
        .cloned();
    // Re-packing the same tree must give the same bytes, so an existing entry keeps its date.
    let date = existing
        .as_ref()
        .map(|entry| entry.date.clone())
        .unwrap_or_else(|| {
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
        });
    let info = ReleaseInfo {
        product: PRODUCT.to_owned(),
        kind: options.kind,
        version: options.version.clone(),
        platform: options.platform.clone(),
        notes: options.notes.clone(),
        date,
    };

    let archive = options.feed.join(&archive_name);
    let temporary = options.feed.join(format!(".{archive_name}.packing"));
    let result = write_archive(&options.from, &info, &temporary).and_then(|()| {
        let (size, sha256) = size_and_sha256(&temporary)?;
        Ok(PackageEntry {
            product: info.product.clone(),
            kind: info.kind,
            version: info.version.clone(),
            platform: info.platform.clone(),
            archive: archive_name.clone(),
            size,
            sha256,
            notes: info.notes.clone(),
            date: info.date.clone(),
        })
    });
    let entry = match result {
        Ok(entry) => entry,
        Err(err) => {
            let _ = std::fs::remove_file(&temporary);
            return Err(err);
        }
    };
    if let Some(existing) = existing {
        let _ = std::fs::remove_file(&temporary);
        if existing.sha256 == entry.sha256 && archive.is_file() {
            return Ok(Packed {
                archive,
                entry: existing,
                unchanged: true,
            });
        }
        bail!(
            "{} {} for {} is already in the feed with different contents; \
             a published version never changes, so pack this tree as a new version",
            options.kind,
            options.version,
            options.platform
        );
    }

    let trusted_comment = serde_json::to_string(&entry).context("cannot encode the entry")?;
    let signature = sign(&secret_key, &temporary, &trusted_comment)?;
    write_atomically(
        &package::signature_path(&archive),
        signature.as_bytes(),
        false,
    )?;
    // For people and scripts: the same entry, readable. Nothing trusts this copy; the
    // signature's trusted comment and the signed manifest are what count.
    let mut readable = serde_json::to_vec_pretty(&entry).context("cannot encode the entry")?;
    readable.push(b'\n');
    write_atomically(&entry_json_path(&archive), &readable, false)?;
    std::fs::rename(&temporary, &archive)
        .with_context(|| format!("cannot move the archive to {}", archive.display()))?;

    manifest.releases.push(entry.clone());
    manifest.releases.sort_by(|a, b| {
        (a.kind.as_str(), &a.version, &a.platform).cmp(&(b.kind.as_str(), &b.version, &b.platform))
    });
    manifest.updated = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    write_feed_manifest(&options.feed, &manifest, &secret_key)?;
    Ok(Packed {
        archive,
        entry,
        unchanged: false,
    })
}

/// `<name>.release.json` beside `<name>.tar.gz` in a feed.
pub fn entry_json_path(archive: &Path) -> PathBuf {
    let name = archive
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".tar.gz").unwrap_or(&name);
    archive.with_file_name(format!("{stem}.release.json"))
}

fn load_secret_key(path: &Path, password: Option<String>) -> anyhow::Result<minisign::SecretKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the secret key {}", path.display()))?;
    let parse = || {
        minisign::SecretKeyBox::from_string(&text).map_err(|err| {
            anyhow::anyhow!("{} is not a minisign secret key: {err}", path.display())
        })
    };
    if let Some(key) = unencrypted_by_minisign_tool(&text) {
        if password.is_some() {
            tracing::warn!(
                key = %path.display(),
                "the secret key has no password; the password given is not needed"
            );
        }
        return Ok(key);
    }
    // Decoding without a password never prompts; it fails when a password is needed.
    match parse()?.into_unencrypted_secret_key() {
        Ok(key) if !key.is_encrypted() => {
            if password.is_some() {
                tracing::warn!(
                    key = %path.display(),
                    "the secret key has no password; the password given is not needed"
                );
            }
            return Ok(key);
        }
        // No password to blame: the key itself is wrong.
        Err(err) if key_bytes(&text).is_some_and(|bytes| bytes.get(2..4) == Some(&[0, 0])) => {
            bail!(
                "the secret key {} has no password but is damaged: {err}",
                path.display()
            );
        }
        _ => {}
    }
    let Some(password) = password else {
        bail!(
            "the secret key {} is password-protected: set {SIGNING_PASSWORD_ENV} or pass --password-file",
            path.display()
        );
    };
    parse()?
        .into_secret_key(Some(password))
        .map_err(|err| anyhow::anyhow!("cannot unlock the secret key {}: {err}", path.display()))
}

/// A key the standard `minisign -G -W` wrote: no password (no key derivation) and an
/// all-zero checksum, which the minisign crate takes for a corrupted key. Anything else
/// (a key with a password, or with a checksum) is left to the crate's own checks.
fn unencrypted_by_minisign_tool(text: &str) -> Option<minisign::SecretKey> {
    use base64::Engine as _;

    const NO_KDF: [u8; 2] = [0, 0];
    const CHECKSUM_BYTES: usize = 32;
    let encoded = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with("untrusted comment:"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let unencrypted = bytes.get(2..4) == Some(&NO_KDF[..]);
    let zero_checksum = bytes.len() > CHECKSUM_BYTES
        && bytes[bytes.len() - CHECKSUM_BYTES..]
            .iter()
            .all(|byte| *byte == 0);
    if !(unencrypted && zero_checksum) {
        return None;
    }
    minisign::SecretKey::from_bytes(&bytes).ok()
}

/// The decoded key line of a minisign secret key file.
fn key_bytes(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;

    let encoded = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with("untrusted comment:"))?;
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
}

fn vendor_key_of(secret_key: &minisign::SecretKey) -> anyhow::Result<VendorKey> {
    let public = minisign::PublicKey::from_secret_key(secret_key)
        .and_then(|key| key.to_box())
        .map_err(|err| anyhow::anyhow!("cannot derive the public key: {err}"))?;
    VendorKey::decode(&public.into_string()).map_err(|reason| anyhow::anyhow!(reason))
}

fn sign(
    secret_key: &minisign::SecretKey,
    file: &Path,
    trusted_comment: &str,
) -> anyhow::Result<String> {
    let reader =
        std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let signature = minisign::sign(
        None,
        secret_key,
        std::io::BufReader::new(reader),
        Some(trusted_comment),
        Some("signature from the changeover release tools"),
    )
    .map_err(|err| anyhow::anyhow!("cannot sign {}: {err}", file.display()))?;
    Ok(signature.into_string())
}

/// Reads the feed's manifest, checking it was signed with the same key; a new feed starts empty.
fn read_feed_manifest(feed: &Path, vendor_key: &VendorKey) -> anyhow::Result<FeedManifest> {
    let manifest_path = feed.join(MANIFEST_FILE);
    let bytes = match std::fs::read(&manifest_path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
            return Ok(FeedManifest::empty(now));
        }
        Err(err) => {
            return Err(err).with_context(|| format!("cannot read {}", manifest_path.display()));
        }
    };
    let signature_path = feed.join(format!("{MANIFEST_FILE}{SIGNATURE_SUFFIX}"));
    let signature = std::fs::read_to_string(&signature_path)
        .with_context(|| format!("cannot read {}", signature_path.display()))?;
    package::verify_manifest(&bytes, &signature, vendor_key).with_context(|| {
        format!(
            "the feed {} was not signed with this secret key; refusing to add to it",
            feed.display()
        )
    })
}

fn write_feed_manifest(
    feed: &Path,
    manifest: &FeedManifest,
    secret_key: &minisign::SecretKey,
) -> anyhow::Result<()> {
    let mut json = serde_json::to_vec_pretty(manifest).context("cannot encode the manifest")?;
    json.push(b'\n');
    let manifest_path = feed.join(MANIFEST_FILE);
    let staged = feed.join(format!(".{MANIFEST_FILE}.writing"));
    write_atomically(&staged, &json, false)?;
    let comment = format!("changeover feed manifest, updated {}", manifest.updated);
    let signature = sign(secret_key, &staged, &comment)?;
    // The manifest and its signature change as close together as two renames allow; a
    // reader between them sees a mismatch, refuses it and simply tries again later.
    write_atomically(
        &feed.join(format!("{MANIFEST_FILE}{SIGNATURE_SUFFIX}")),
        signature.as_bytes(),
        false,
    )?;
    std::fs::rename(&staged, &manifest_path)
        .with_context(|| format!("cannot write {}", manifest_path.display()))?;
    Ok(())
}

/// Writes the release tree as a reproducible `.tar.gz`: sorted, owned by root, dated 0,
/// with a generated `release.json` first.
fn write_archive(from: &Path, info: &ReleaseInfo, target: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    let encoder = flate2::GzBuilder::new().mtime(0).write(
        std::io::BufWriter::new(file),
        flate2::Compression::default(),
    );
    let mut builder = tar::Builder::new(encoder);
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    builder.sparse(false);

    let mut release_json = serde_json::to_vec_pretty(info).context("cannot encode release.json")?;
    release_json.push(b'\n');
    let mut header = tar::Header::new_gnu();
    header.set_size(release_json.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, "release.json", release_json.as_slice())
        .context("cannot write release.json into the archive")?;

    let walker = walkdir::WalkDir::new(from)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name();
    for item in walker {
        let item = item.with_context(|| format!("cannot read {}", from.display()))?;
        let relative = item
            .path()
            .strip_prefix(from)
            .context("walked outside the release tree")?;
        if relative == Path::new("release.json") {
            continue; // generated above
        }
        let file_type = item.file_type();
        if file_type.is_symlink() {
            let target = std::fs::read_link(item.path())
                .with_context(|| format!("cannot read the link {}", item.path().display()))?;
            // The installer's own rule, so a release that packs also unpacks.
            if let Some(problem) = package::link_target_problem(&target) {
                bail!(
                    "{} links to {}, {problem}; installs would refuse it (make the link \
                     relative without \"..\", or put a copy of the file there)",
                    item.path().display(),
                    target.display()
                );
            }
        } else if !file_type.is_file() && !file_type.is_dir() {
            bail!(
                "{} is neither a file, a folder nor a link; a release cannot hold it",
                item.path().display()
            );
        }
        builder
            .append_path_with_name(item.path(), relative)
            .with_context(|| format!("cannot add {} to the archive", item.path().display()))?;
    }
    let encoder = builder.into_inner().context("cannot finish the archive")?;
    let mut writer = encoder.finish().context("cannot finish the archive")?;
    writer.flush().context("cannot write the archive")?;
    writer
        .into_inner()
        .map_err(|err| anyhow::anyhow!("cannot write the archive: {}", err.error()))?
        .sync_all()
        .context("cannot write the archive")?;
    Ok(())
}

fn size_and_sha256(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if read == 0 {
            break;
        }
        size += read as u64;
        hasher.update(&buffer[..read]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// Writes `contents` beside `path`, syncs it and renames it into place.
pub fn write_atomically(path: &Path, contents: &[u8], private: bool) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path.file_name().context("a file path has a file name")?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(".tmp");
    let temporary = dir.join(temporary_name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(&temporary)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use changeover_protocol::package::verify_archive;

    #[test]
    fn a_key_the_minisign_tool_wrote_without_a_password_signs_with_or_without_one() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let pair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        // What `minisign -G -W` writes: no key derivation, and a checksum of zeros.
        let text = pair.sk.to_box(None).unwrap().into_string();
        let encoded = text.lines().nth(1).unwrap();
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        let len = bytes.len();
        bytes[len - 32..].fill(0);
        let key_file = dir.path().join("minisign.key");
        std::fs::write(
            &key_file,
            format!(
                "untrusted comment: minisign encrypted secret key\n{}\n",
                base64::engine::general_purpose::STANDARD.encode(&bytes)
            ),
        )
        .unwrap();
        assert!(
            minisign::SecretKeyBox::from_string(&std::fs::read_to_string(&key_file).unwrap())
                .unwrap()
                .into_unencrypted_secret_key()
                .is_err(),
            "the crate alone refuses it"
        );
        let file = dir.path().join("data");
        std::fs::write(&file, b"release").unwrap();
        for password in [None, Some("not needed".to_owned())] {
            let key = load_secret_key(&key_file, password).unwrap();
            let signature = sign(&key, &file, "trusted").unwrap();
            let signature = minisign::SignatureBox::from_string(&signature).unwrap();
            minisign::verify(
                &pair.pk,
                &signature,
                std::io::Cursor::new(b"release"),
                true,
                false,
                false,
            )
            .unwrap();
        }
        // A key with a checksum that does not match is still refused, not repaired.
        bytes[len - 1] = 1;
        std::fs::write(
            &key_file,
            format!(
                "untrusted comment: x\n{}\n",
                base64::engine::general_purpose::STANDARD.encode(&bytes)
            ),
        )
        .unwrap();
        let err = format!("{:#}", load_secret_key(&key_file, None).unwrap_err());
        assert!(err.contains("has no password but is damaged"), "{err}");
    }

    fn release_tree(dir: &Path, binary_contents: &str) -> PathBuf {
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/changeover-server"), binary_contents).unwrap();
        std::fs::create_dir_all(tree.join("config")).unwrap();
        std::fs::write(tree.join("config/defaults.toml"), "x = 1\n").unwrap();
        tree
    }

    fn keys(dir: &Path, password: Option<&str>) -> (PathBuf, PathBuf) {
        let options = KeygenOptions {
            secret_key: dir.join("vendor.key"),
            public_key: dir.join("vendor.pub"),
            password: password.map(str::to_owned),
            force: false,
        };
        keygen(&options).unwrap();
        (options.secret_key, options.public_key)
    }

    fn pack_options(dir: &Path, tree: &Path, secret: &Path, version: &str) -> PackOptions {
        PackOptions {
            kind: ReleaseKind::Server,
            version: version.parse().unwrap(),
            from: tree.to_owned(),
            secret_key: secret.to_owned(),
            password: None,
            feed: dir.join("feed"),
            platform: "linux-x86_64".to_owned(),
            notes: "test".to_owned(),
        }
    }

    #[test]
    fn a_packed_release_verifies_and_unpacks_with_its_release_json() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = keys(dir.path(), None);
        let tree = release_tree(dir.path(), "binary v1");
        let packed = pack(&pack_options(dir.path(), &tree, &secret, "1.2.0")).unwrap();
        assert!(!packed.unchanged);
        let key = VendorKey::from_file(&public).unwrap();
        let entry = verify_archive(&packed.archive, &key).unwrap();
        assert_eq!(entry, packed.entry);
        let readable: PackageEntry =
            serde_json::from_slice(&std::fs::read(entry_json_path(&packed.archive)).unwrap())
                .unwrap();
        assert_eq!(readable, entry);
        let target = dir.path().join("unpacked");
        package::unpack(&packed.archive, &target).unwrap();
        let info: ReleaseInfo =
            serde_json::from_slice(&std::fs::read(target.join("release.json")).unwrap()).unwrap();
        assert_eq!(info.version.to_string(), "1.2.0");
        assert_eq!(
            std::fs::read_to_string(target.join("bin/changeover-server")).unwrap(),
            "binary v1"
        );
        // The manifest lists it and verifies with the same key.
        let feed = dir.path().join("feed");
        let manifest = package::verify_manifest(
            &std::fs::read(feed.join(MANIFEST_FILE)).unwrap(),
            &std::fs::read_to_string(feed.join("manifest.json.minisig")).unwrap(),
            &key,
        )
        .unwrap();
        assert_eq!(manifest.releases, vec![entry]);
    }

    #[test]
    fn repacking_is_reproducible_and_changed_bytes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, _) = keys(dir.path(), None);
        let tree = release_tree(dir.path(), "binary v1");
        let first = pack(&pack_options(dir.path(), &tree, &secret, "1.0.0")).unwrap();
        let again = pack(&pack_options(dir.path(), &tree, &secret, "1.0.0")).unwrap();
        assert!(again.unchanged);
        assert_eq!(first.entry.sha256, again.entry.sha256);

        std::fs::write(tree.join("bin/changeover-server"), "binary v1, patched").unwrap();
        let err = pack(&pack_options(dir.path(), &tree, &secret, "1.0.0")).unwrap_err();
        assert!(
            err.to_string()
                .contains("already in the feed with different contents"),
            "{err}"
        );
        // The other kind may reuse the version number.
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/changeover-agent"), "agent").unwrap();
        let agent = PackOptions {
            kind: ReleaseKind::Agent,
            ..pack_options(dir.path(), &tree, &secret, "1.0.0")
        };
        assert!(pack(&agent).is_ok());
    }

    #[test]
    fn a_password_protected_key_needs_its_password_and_never_prompts() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = keys(dir.path(), Some("hunter2"));
        let tree = release_tree(dir.path(), "binary");
        let err = pack(&pack_options(dir.path(), &tree, &secret, "1.0.0")).unwrap_err();
        assert!(err.to_string().contains(SIGNING_PASSWORD_ENV), "{err}");
        let with_password = PackOptions {
            password: Some("hunter2".to_owned()),
            ..pack_options(dir.path(), &tree, &secret, "1.0.0")
        };
        let packed = pack(&with_password).unwrap();
        let key = VendorKey::from_file(&public).unwrap();
        assert!(verify_archive(&packed.archive, &key).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn links_that_could_lead_outside_are_not_packed() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, _) = keys(dir.path(), None);
        let tree = release_tree(dir.path(), "binary");
        // The chain: `b -> .` is harmless alone, `a -> b/..` leads out of the release.
        std::os::unix::fs::symlink(".", tree.join("b")).unwrap();
        std::os::unix::fs::symlink("b/..", tree.join("a")).unwrap();
        let err = pack(&pack_options(dir.path(), &tree, &secret, "1.0.0")).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("links to b/..") && text.contains("\"..\""),
            "{text}"
        );
        std::fs::remove_file(tree.join("a")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tree.join("a")).unwrap();
        let err = pack(&pack_options(dir.path(), &tree, &secret, "1.0.0")).unwrap_err();
        assert!(format!("{err:#}").contains("absolute"), "{err:#}");

        // A link that points down packs and unpacks as a link.
        std::fs::remove_file(tree.join("a")).unwrap();
        std::fs::create_dir_all(tree.join("lib")).unwrap();
        std::fs::write(tree.join("lib/libfoo.so.1"), "elf").unwrap();
        std::os::unix::fs::symlink("libfoo.so.1", tree.join("lib/libfoo.so")).unwrap();
        let packed = pack(&pack_options(dir.path(), &tree, &secret, "1.0.0")).unwrap();
        let target = dir.path().join("unpacked");
        package::unpack(&packed.archive, &target).unwrap();
        assert_eq!(
            std::fs::read_link(target.join("lib/libfoo.so")).unwrap(),
            Path::new("libfoo.so.1")
        );
    }

    #[test]
    fn keygen_does_not_overwrite_a_key() {
        let dir = tempfile::tempdir().unwrap();
        keys(dir.path(), None);
        let again = KeygenOptions {
            secret_key: dir.path().join("vendor.key"),
            public_key: dir.path().join("vendor.pub"),
            password: None,
            force: false,
        };
        assert!(
            keygen(&again)
                .unwrap_err()
                .to_string()
                .contains("already exists")
        );
    }

    #[test]
    fn a_feed_signed_by_another_key_is_not_added_to() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, _) = keys(dir.path(), None);
        let tree = release_tree(dir.path(), "binary");
        pack(&pack_options(dir.path(), &tree, &secret, "1.0.0")).unwrap();
        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        let (other_secret, _) = keys(&other, None);
        let err = pack(&pack_options(dir.path(), &tree, &other_secret, "1.1.0")).unwrap_err();
        assert!(
            format!("{err:#}").contains("not signed with this secret key"),
            "{err:#}"
        );
    }
}
