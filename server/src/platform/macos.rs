//! macOS: what Linux does through `/proc` and `renameat2`. Written for launchd sites, not
//! built here (no macOS toolchain on the build machines; see README).

/// Swaps two folders: three renames, the journal covering the moments between them.
pub fn exchange(a: &std::path::Path, b: &std::path::Path) -> std::io::Result<()> {
    super::exchange_by_renames(a, b)
}

/// Mount points are not read on macOS: a carried folder on another volume is found by the
/// device check in the preflight instead.
pub fn mount_points() -> Vec<std::path::PathBuf> {
    Vec::new()
}
