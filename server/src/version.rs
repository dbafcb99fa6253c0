//! Which version this server is.
//!
//! An installed release knows its version from the `release.json` beside its `bin/`
//! folder, so two releases of the same build can be told apart. A development build
//! without one reports its crate version.

use std::path::Path;

/// The version of the running release.
pub fn running_version() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_owned))
        .and_then(|release_dir| release_version(&release_dir))
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}

/// The `version` field of `<release_dir>/release.json`, if it is there and readable.
pub fn release_version(release_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(release_dir.join("release.json")).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value.get("version")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_release_version_and_ignores_junk() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(release_version(dir.path()), None);
        std::fs::write(dir.path().join("release.json"), "not json").unwrap();
        assert_eq!(release_version(dir.path()), None);
        std::fs::write(dir.path().join("release.json"), r#"{"version":"2.1.0"}"#).unwrap();
        assert_eq!(release_version(dir.path()).as_deref(), Some("2.1.0"));
    }
}
