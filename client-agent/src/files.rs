//! Writing a small file so that a crash or a power cut leaves either the old content or
//! the new, never a torn mix: write beside it, fsync, rename over it, fsync the folder.
//!
//! For the agent's own records (its id, an update's trial); not for release files, which
//! `self_update` and `trial` move with [`replace`].

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` atomically (the temporary file is `path.tmp`).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = temporary_beside(path);
    let written = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written?;
    sync_folder(path);
    Ok(())
}

fn temporary_beside(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

// The rename is durable only once the folder is synced; where a folder cannot be opened
// (Windows) the rename is all there is.
fn sync_folder(path: &Path) {
    #[cfg(unix)]
    if let Some(folder) = path.parent().map(|parent| {
        if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        }
    }) && let Ok(folder) = std::fs::File::open(folder)
    {
        let _ = folder.sync_all();
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Where [`replace`] moves files that are in use, in the install folder `dir`.
pub const REPLACED_DIR: &str = ".replaced";

/// Moves `from` over `to`. On Windows a file in use (a loaded DLL, a running program)
/// cannot be overwritten, but it can be renamed: then it is first moved aside into
/// `dir/.replaced/` (emptied by [`clear_replaced`] once nothing uses it any more).
pub fn replace(dir: &Path, from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(err) if cfg!(windows) && err.kind() == std::io::ErrorKind::PermissionDenied => {
            let aside_dir = dir.join(REPLACED_DIR);
            std::fs::create_dir_all(&aside_dir)?;
            let name = to.file_name().unwrap_or_default().to_string_lossy();
            let aside = (0u32..)
                .map(|n| aside_dir.join(format!("{name}.{}.{n}", std::process::id())))
                .find(|aside| !aside.exists())
                .unwrap_or_else(|| aside_dir.join(name.as_ref()));
            std::fs::rename(to, &aside)?;
            std::fs::rename(from, to).inspect_err(|_| {
                // The old file goes back rather than leave nothing in its place.
                let _ = std::fs::rename(&aside, to);
            })
        }
        other => other,
    }
}

/// Removes what [`replace`] moved aside in `dir`, as far as nothing uses it any more.
pub fn clear_replaced(dir: &Path) {
    let aside_dir = dir.join(REPLACED_DIR);
    let Ok(entries) = std::fs::read_dir(&aside_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    let _ = std::fs::remove_dir(&aside_dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_file_is_moved_over_the_old_one_and_nothing_is_left_aside() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("lib.dll");
        let new = dir.path().join("staged.dll");
        std::fs::write(&old, b"old").unwrap();
        std::fs::write(&new, b"new").unwrap();
        replace(dir.path(), &new, &old).unwrap();
        assert_eq!(std::fs::read(&old).unwrap(), b"new");
        assert!(!new.exists());
        clear_replaced(dir.path());
        assert!(!dir.path().join(REPLACED_DIR).exists());
    }

    #[test]
    fn a_file_is_replaced_whole_and_nothing_is_left_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent-id");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["agent-id"]);
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a folder fails.
        let path = dir.path().join("taken");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), "x").unwrap();
        assert!(write_atomically(&path, b"new").is_err());
        assert!(!dir.path().join("taken.tmp").exists());
    }
}
