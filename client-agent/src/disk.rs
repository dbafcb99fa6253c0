//! Free space on a workstation's file system, so a download that would not fit is refused
//! before it starts instead of filling the disk the user works on.
//!
//! Only the question "does this fit"; what is downloaded and how big it may be is decided
//! by `offer` and `self_update`.

use std::path::Path;

/// Space the agent leaves free for the user, on top of what a download needs.
pub const SPARE_BYTES: u64 = 64 * 1024 * 1024;

/// Bytes free for this user on the file system holding `path`.
pub fn free_space(path: &Path) -> std::io::Result<u64> {
    #[cfg(unix)]
    {
        let stats = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
        Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
    }
    #[cfg(not(unix))]
    {
        // No portable safe call here; the download's hard cap still bounds it.
        let _ = path;
        Ok(u64::MAX)
    }
}

/// Refuses unless `folder`'s file system has `needed` bytes free plus [`SPARE_BYTES`].
pub fn ensure_room(folder: &Path, needed: u64) -> anyhow::Result<()> {
    let free = free_space(folder).map_err(|err| {
        anyhow::anyhow!("cannot tell the free space in {}: {err}", folder.display())
    })?;
    check_room(folder, free, needed)
}

fn check_room(folder: &Path, free: u64, needed: u64) -> anyhow::Result<()> {
    let wanted = needed.saturating_add(SPARE_BYTES);
    anyhow::ensure!(
        free >= wanted,
        "not enough free space in {}: {free} bytes free, the download needs {needed} bytes \
         and {SPARE_BYTES} are kept free for the user; free some space and the update is \
         tried again",
        folder.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_fits_only_with_room_to_spare() {
        let folder = Path::new("/state/updates");
        assert!(check_room(folder, SPARE_BYTES + 1000, 1000).is_ok());
        let err = check_room(folder, SPARE_BYTES + 999, 1000).unwrap_err();
        assert!(err.to_string().contains("not enough free space"), "{err}");
        assert!(check_room(folder, u64::MAX - 1, u64::MAX).is_err());
    }

    #[test]
    fn the_free_space_of_a_real_folder_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_space(dir.path()).unwrap();
        assert!(free > 0);
        #[cfg(unix)]
        assert!(ensure_room(dir.path(), u64::MAX).is_err());
    }
}
