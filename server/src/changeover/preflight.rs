//! Everything checked before any user is warned: the package verified again and unpacked
//! into staging, the new binary's self-check against the site's config, the rights to
//! create, rename, execute and delete in the product folder, and the disk space. Any
//! failure ends the changeover here and nobody notices anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use changeover_protocol::package;
use changeover_protocol::release::ReleaseKind;

use crate::layout::Layout;

/// How long the new binary's self-check may take.
const SELF_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Room kept free beyond the estimate.
const SPACE_MARGIN: u64 = 64 * 1024 * 1024;

/// The staging folder a release is unpacked into, beside the install.
pub fn staging_dir(layout: &Layout) -> PathBuf {
    layout.staging_dir()
}

/// Checks that one can create, make executable, run-able, rename and delete in `root`,
/// which is what a swap needs and what antivirus software and missing rights break.
pub fn check_rights(root: &Path) -> anyhow::Result<()> {
    let probe = root.join(".changeover-probe");
    let renamed = root.join(".changeover-probe-renamed");
    let _ = std::fs::remove_dir_all(&probe);
    let _ = std::fs::remove_dir_all(&renamed);
    let result = (|| {
        std::fs::create_dir_all(probe.join("bin"))
            .with_context(|| format!("cannot create folders in {}", root.display()))?;
        let executable = probe.join("bin/probe");
        std::fs::write(&executable, "#!/bin/sh\nexit 0\n")
            .with_context(|| format!("cannot write files in {}", root.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&executable, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot make files executable in {}", root.display()))?;
        }
        std::fs::rename(&probe, &renamed)
            .with_context(|| format!("cannot rename folders in {}", root.display()))?;
        std::fs::remove_dir_all(&renamed)
            .with_context(|| format!("cannot delete folders in {}", root.display()))?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&probe);
    let _ = std::fs::remove_dir_all(&renamed);
    result
}

/// Checks there is room to unpack `archive` beside the install.
pub fn check_space(root: &Path, archive: &Path) -> anyhow::Result<()> {
    let archive_size = std::fs::metadata(archive)
        .with_context(|| format!("cannot read {}", archive.display()))?
        .len();
    // Compressed releases unpack to a few times their size.
    let needed = archive_size.saturating_mul(4).saturating_add(SPACE_MARGIN);
    let free = crate::platform::free_space(root)
        .with_context(|| format!("cannot read the free space of {}", root.display()))?;
    if free < needed {
        bail!(
            "{} has {} MiB free; unpacking the release needs about {} MiB",
            root.display(),
            free / (1024 * 1024),
            needed / (1024 * 1024)
        );
    }
    Ok(())
}

/// What to do about a folder a changeover cannot move by renaming.
pub const FILESYSTEM_FIX: &str = "a changeover moves these folders by renaming them, which \
     cannot cross filesystems or move a mount point: mount the other filesystem outside the \
     install (beside the product folder, say) and point the application at it there, or drop \
     the folder from carry_over.paths";

/// Checks that the install and every carried folder in it can be moved by renaming: none
/// is a mount point, none has a filesystem mounted inside it, and every carried folder is
/// on the install's filesystem (a rename cannot cross filesystems, and a mount point cannot
/// be renamed at all). Found now, before anyone is warned, instead of as `EXDEV` or
/// `EBUSY` after the logout.
pub fn check_one_filesystem(install: &Path, carry_paths: &[String]) -> anyhow::Result<()> {
    let problems = filesystem_problems(install, carry_paths)?;
    if problems.is_empty() {
        return Ok(());
    }
    bail!("{}; {FILESYSTEM_FIX}", problems.join("; "))
}

/// Each folder of [`check_one_filesystem`] that a rename could not move, described.
pub fn filesystem_problems(install: &Path, carry_paths: &[String]) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    if !install.exists() {
        return Ok(problems);
    }
    let mounts = crate::platform::mount_points();
    let install_device = device_of(install)?;
    let mut folders = vec![(install.to_owned(), "the install".to_owned())];
    folders.extend(
        carry_paths
            .iter()
            .map(|path| (install.join(path), format!("the carried folder {path:?}"))),
    );
    for (folder, what) in &folders {
        if !folder.exists() {
            continue;
        }
        let real = folder.canonicalize().unwrap_or_else(|_| folder.clone());
        if let Some(mount) = mounts.iter().find(|mount| **mount == real) {
            problems.push(format!("{what} is a mount point ({})", mount.display()));
        } else if device_of(folder)? != install_device {
            problems.push(format!(
                "{what} ({}) is on another filesystem than the install",
                folder.display()
            ));
        }
        if folder != install
            && let Some(inner) = mounts
                .iter()
                .find(|mount| **mount != real && mount.starts_with(&real))
        {
            problems.push(format!(
                "{what} has a filesystem mounted inside it ({})",
                inner.display()
            ));
        }
    }
    Ok(problems)
}

fn device_of(path: &Path) -> anyhow::Result<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        Ok(std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .dev())
    }
    #[cfg(windows)]
    {
        // The volume serial number.
        match file_id::get_file_id(path)
            .with_context(|| format!("cannot read {}", path.display()))?
        {
            file_id::FileId::Inode { device_id, .. } => Ok(device_id),
            file_id::FileId::LowRes {
                volume_serial_number,
                ..
            } => Ok(u64::from(volume_serial_number)),
            file_id::FileId::HighRes {
                volume_serial_number,
                ..
            } => Ok(volume_serial_number),
        }
    }
}

/// At most this many files are tried by [`held_files`]; a release is far smaller.
const MAX_FILES_TRIED: usize = 100_000;

/// The files in `install` another program holds open, found by opening each without
/// sharing (Windows refuses that with a sharing violation while any other handle is open;
/// a folder with such a file in it cannot be renamed). The running server's own folder
/// (`bin/`, its binary and DLLs) and, since the applications are stopped before anything
/// moves, the carried folders are not tried. Elsewhere nothing holds a rename back: empty.
pub fn held_files(install: &Path, carry_paths: &[String]) -> Vec<PathBuf> {
    #[cfg(windows)]
    {
        use std::os::windows::fs::OpenOptionsExt as _;

        let skipped: Vec<PathBuf> = std::iter::once(install.join("bin"))
            .chain(carry_paths.iter().map(|path| install.join(path)))
            .collect();
        walkdir::WalkDir::new(install)
            .into_iter()
            .filter_entry(|entry| !skipped.iter().any(|skip| entry.path() == skip))
            .flatten()
            .filter(|entry| entry.file_type().is_file())
            .take(MAX_FILES_TRIED)
            .filter(|entry| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .share_mode(0)
                    .open(entry.path())
                    .is_err_and(|err| crate::platform::is_held_elsewhere(&err))
            })
            .map(walkdir::DirEntry::into_path)
            .collect()
    }
    #[cfg(not(windows))]
    {
        let _ = (install, carry_paths, MAX_FILES_TRIED);
        Vec::new()
    }
}

/// Refuses while another program holds files open in the install (see [`held_files`]),
/// naming them, before anyone is warned.
pub fn check_not_held(install: &Path, carry_paths: &[String]) -> anyhow::Result<()> {
    let held = held_files(install, carry_paths);
    if held.is_empty() {
        return Ok(());
    }
    let mut named: Vec<String> = held
        .iter()
        .take(5)
        .map(|path| path.display().to_string())
        .collect();
    if held.len() > named.len() {
        named.push(format!("and {} more", held.len() - named.len()));
    }
    bail!(
        "another program holds files in the install open, so its folder cannot be renamed: \
         {}; close that program (an editor, a backup tool, an antivirus scan), or exclude the \
         product folder from it, then update again",
        named.join(", ")
    )
}

/// Unpacks the package into a fresh staging folder.
pub fn unpack(archive: &Path, staging: &Path) -> anyhow::Result<()> {
    if staging.exists() {
        std::fs::remove_dir_all(staging).with_context(|| {
            format!("cannot remove the old staging folder {}", staging.display())
        })?;
    }
    package::unpack(archive, staging)?;
    let binary = staging.join(ReleaseKind::Server.binary_path());
    if !binary.is_file() {
        bail!("the release has no {}", ReleaseKind::Server.binary_path());
    }
    Ok(())
}

/// Runs the staged binary's `self-check` against this product folder: it must start,
/// read the config it will get, and report the expected version.
pub async fn self_check(
    staging: &Path,
    layout: &Layout,
    expected_version: &str,
) -> anyhow::Result<()> {
    let binary = staging.join(ReleaseKind::Server.binary_path());
    let mut command = tokio::process::Command::new(&binary);
    command
        .arg("self-check")
        .arg("--root")
        .arg(layout.root())
        .arg("--name")
        .arg(layout.name())
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(SELF_CHECK_TIMEOUT, command.output())
        .await
        .with_context(|| {
            format!(
                "the new release's self-check did not finish within {} s",
                SELF_CHECK_TIMEOUT.as_secs()
            )
        })?
        .with_context(|| format!("cannot run the new release's binary {}", binary.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!(
            "the new release's self-check failed ({}): {}",
            output.status,
            stderr.trim().lines().last().unwrap_or("no message")
        );
    }
    let reported = stdout.split_whitespace().nth(1).unwrap_or("");
    if reported != expected_version {
        bail!(
            "the new release's self-check reports version {reported:?}, expected {expected_version}"
        );
    }
    Ok(())
}
