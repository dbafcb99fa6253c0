//! Which version this agent is: its release's `release.json` when installed, else the
//! crate version of this development build.

use std::path::Path;

/// The version of the running agent release.
pub fn running_version() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_owned))
        .and_then(|release_dir| {
            let text = std::fs::read_to_string(release_dir.join("release.json")).ok()?;
            let value: serde_json::Value = serde_json::from_str(&text).ok()?;
            value.get("version")?.as_str().map(str::to_owned)
        })
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}
