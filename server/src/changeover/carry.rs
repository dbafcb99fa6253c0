//! Carrying preferences, backups and certificates from the old install into the new one.
//!
//! The files are hashed while the users still work (during the countdown); after the stop
//! only files whose size or time changed are hashed again. Folders move by rename, so a
//! gigabyte of backups costs the downtime nothing; after the move every file is checked
//! against its record before the new release may start.

use std::io::Read as _;
use std::path::Path;
use std::time::UNIX_EPOCH;

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

use super::journal::CarriedFile;

/// Files up to this size are hashed again after the move; larger ones are compared by size
/// and modification time (a rename changes neither).
const REHASH_AFTER_MOVE_LIMIT: u64 = 1024 * 1024;

/// Records every file under the carried paths of `install`.
pub fn record(
    install: &Path,
    paths: &[String],
    previous: &[CarriedFile],
) -> anyhow::Result<Vec<CarriedFile>> {
    let mut files = Vec::new();
    for carried in paths {
        let root = install.join(carried);
        if !root.exists() {
            continue;
        }
        for item in walkdir::WalkDir::new(&root)
            .follow_links(false)
            .sort_by_file_name()
        {
            let item = item.with_context(|| format!("cannot read {}", root.display()))?;
            if !item.file_type().is_file() {
                continue;
            }
            let relative = item
                .path()
                .strip_prefix(install)
                .context("walked outside the install")?
                .to_string_lossy()
                .into_owned();
            let metadata = item
                .metadata()
                .with_context(|| format!("cannot read {}", item.path().display()))?;
            let modified_ns = modified_ns(&metadata);
            let unchanged = previous.iter().find(|file| {
                file.path == relative
                    && file.size == metadata.len()
                    && file.modified_ns == modified_ns
            });
            let sha256 = match unchanged {
                Some(file) => file.sha256.clone(),
                None => sha256_of(item.path())?,
            };
            files.push(CarriedFile {
                path: relative,
                size: metadata.len(),
                modified_ns,
                sha256,
            });
        }
    }
    Ok(files)
}

/// Moves one carried path from the old install into the new one. Whatever the release
/// itself ships under that path is kept beside it as `<path>.release-default`, because the
/// site's own files win.
pub fn move_path(from_install: &Path, to_install: &Path, path: &str) -> anyhow::Result<()> {
    let source = from_install.join(path);
    if !source.exists() {
        return Ok(());
    }
    let target = to_install.join(path);
    if target.exists() {
        let defaults = to_install.join(format!("{path}.release-default"));
        if defaults.exists() {
            std::fs::remove_dir_all(&defaults)
                .with_context(|| format!("cannot remove {}", defaults.display()))?;
        }
        std::fs::rename(&target, &defaults)
            .with_context(|| format!("cannot move {} aside", target.display()))?;
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::rename(&source, &target)
        .with_context(|| format!("cannot move {} to {}", source.display(), target.display()))
}

/// Moves a carried path back (a rollback). The carried files always win: anything that
/// appeared at the old place meanwhile is moved aside as `<path>.displaced`, never the
/// other way round. Safe to repeat: a path already moved back is left alone. The new
/// release's own defaults are put back separately ([`restore_release_defaults`]), once it
/// is out of the way, so that a repeat never takes them for the site's files.
pub fn move_back(from_install: &Path, to_install: &Path, path: &str) -> anyhow::Result<()> {
    let source = from_install.join(path);
    let target = to_install.join(path);
    if source.exists() {
        if target.exists() {
            let displaced = to_install.join(format!("{path}.displaced"));
            if displaced.exists() {
                std::fs::remove_dir_all(&displaced)
                    .with_context(|| format!("cannot remove {}", displaced.display()))?;
            }
            std::fs::rename(&target, &displaced)
                .with_context(|| format!("cannot move {} aside", target.display()))?;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(&source, &target).with_context(|| {
            format!(
                "cannot move {} back to {}",
                source.display(),
                target.display()
            )
        })?;
    }
    Ok(())
}

/// Gives a release its own `<path>` back from `<path>.release-default`, where it was set
/// aside when the site's files came in; safe to repeat.
pub fn restore_release_defaults(install: &Path, path: &str) -> anyhow::Result<()> {
    let source = install.join(path);
    let defaults = install.join(format!("{path}.release-default"));
    if defaults.exists() && !source.exists() {
        std::fs::rename(&defaults, &source)
            .with_context(|| format!("cannot restore {}", source.display()))?;
    }
    Ok(())
}

/// Checks every recorded file is in `install` as it was.
pub fn verify(install: &Path, carried: &[CarriedFile]) -> anyhow::Result<()> {
    for file in carried {
        let path = install.join(&file.path);
        let metadata = std::fs::metadata(&path)
            .with_context(|| format!("carried file {} is missing", file.path))?;
        if metadata.len() != file.size {
            bail!(
                "carried file {} has {} bytes, {} were recorded",
                file.path,
                metadata.len(),
                file.size
            );
        }
        let unchanged_time = modified_ns(&metadata) == file.modified_ns;
        if !unchanged_time || file.size <= REHASH_AFTER_MOVE_LIMIT {
            let sha256 = sha256_of(&path)?;
            if sha256 != file.sha256 {
                bail!(
                    "carried file {} changed on the way (SHA-256 differs)",
                    file.path
                );
            }
        }
    }
    Ok(())
}

fn modified_ns(metadata: &std::fs::Metadata) -> u128 {
    metadata
        .modified()
        .ok()
        .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
        .map(|age| age.as_nanos())
        .unwrap_or(0)
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if read == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_files_move_verify_and_move_back() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        let new = dir.path().join("new");
        std::fs::create_dir_all(old.join("config")).unwrap();
        std::fs::create_dir_all(old.join("backups/2026")).unwrap();
        std::fs::create_dir_all(new.join("config")).unwrap();
        std::fs::write(old.join("config/site.toml"), "site = 1\n").unwrap();
        std::fs::write(old.join("backups/2026/db.bak"), vec![7u8; 3 * 1024 * 1024]).unwrap();
        std::fs::write(new.join("config/defaults.toml"), "release = 2\n").unwrap();
        let paths = vec![
            "config".to_owned(),
            "backups".to_owned(),
            "certs".to_owned(),
        ];

        let recorded = record(&old, &paths, &[]).unwrap();
        assert_eq!(recorded.len(), 2);
        // Unchanged files are not hashed again: the old hash is reused.
        let again = record(&old, &paths, &recorded).unwrap();
        assert_eq!(again, recorded);

        for path in &paths {
            move_path(&old, &new, path).unwrap();
        }
        verify(&new, &recorded).unwrap();
        assert!(new.join("config.release-default/defaults.toml").exists());
        assert!(!old.join("config").exists());

        for path in &paths {
            move_back(&new, &old, path).unwrap();
        }
        // Repeated, as after a crash: nothing of the release is taken for the site's.
        for path in &paths {
            move_back(&new, &old, path).unwrap();
        }
        assert!(!old.join("config.displaced").exists());
        for path in &paths {
            restore_release_defaults(&new, path).unwrap();
        }
        verify(&old, &recorded).unwrap();
        assert!(
            new.join("config/defaults.toml").exists(),
            "the release's defaults are restored"
        );
    }

    #[test]
    fn moving_back_wins_over_what_appeared_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        let new = dir.path().join("new");
        std::fs::create_dir_all(new.join("config")).unwrap();
        std::fs::write(new.join("config/site.toml"), "site").unwrap();
        // Something re-created the folder at the old place (a default config, say).
        std::fs::create_dir_all(old.join("config")).unwrap();
        std::fs::write(old.join("config/changeover.toml"), "defaults").unwrap();
        move_back(&new, &old, "config").unwrap();
        assert_eq!(
            std::fs::read_to_string(old.join("config/site.toml")).unwrap(),
            "site"
        );
        assert!(old.join("config.displaced/changeover.toml").exists());
    }

    #[test]
    fn a_changed_carried_file_fails_verification() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        std::fs::write(dir.path().join("certs/server.key"), "key").unwrap();
        let recorded = record(dir.path(), &["certs".to_owned()], &[]).unwrap();
        std::fs::write(dir.path().join("certs/server.key"), "KEY").unwrap();
        let err = verify(dir.path(), &recorded).unwrap_err();
        assert!(err.to_string().contains("changed on the way"), "{err}");
        std::fs::remove_file(dir.path().join("certs/server.key")).unwrap();
        assert!(
            verify(dir.path(), &recorded)
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
    }
}
