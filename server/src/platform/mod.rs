//! What differs between operating systems, behind one module: `unix.rs` (Linux and
//! macOS), `linux.rs`, `macos.rs` and `windows.rs` hold the implementations, this file the
//! shared types and what the rest of the server calls.
//!
//! The open-file limit: one file descriptor per connection, so the soft limit (often 1024
//! in an interactive shell or a service without `LimitNOFILE`) would cap the server long
//! before memory does. Only the soft limit can be raised without privileges, and only up
//! to the hard limit; child processes inherit whatever this process set.
//!
//! Restarting: on Unix the server replaces its own process image (`exec`, same pid) and
//! hands the listening socket over; on Windows a running program cannot be replaced nor its
//! folder renamed, so the next release is started as a new process after this one has
//! closed its socket (see `changeover::swap_helper`).

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "macos")]
mod macos;
#[cfg(any(windows, target_os = "macos"))]
mod sysinfo_backed;
#[cfg(unix)]
mod unix;
#[cfg(windows)]
mod windows;
#[cfg(windows)]
pub mod windows_service;

#[cfg(target_os = "linux")]
pub use linux::{exchange, mount_points, process_alive, process_start_time};
#[cfg(target_os = "macos")]
pub use macos::{exchange, mount_points};
#[cfg(any(windows, target_os = "macos"))]
pub use sysinfo_backed::{process_alive, process_start_time};
#[cfg(unix)]
pub use unix::{
    filesystem_id, free_space, hand_over_listener, inherited_listener, keep_from_children, kill,
    own_process_group, raise_open_file_limit, reexec, signal_group, spawn_detached, stop_signal,
};
#[cfg(windows)]
pub use windows::{
    exchange, filesystem_id, free_space, inherited_listener, keep_from_children, kill,
    mount_points, own_process_group, raise_open_file_limit, reexec, signal_group, spawn_detached,
    stop_signal,
};

use std::sync::LazyLock;

use tokio_util::sync::CancellationToken;

/// How long a starting server waits for its port to be let go: on Windows the previous
/// release is a separate process that may still be ending; on Unix the socket is handed
/// over, and a port in use means another server.
pub const BIND_PATIENCE: std::time::Duration = if cfg!(windows) {
    std::time::Duration::from_secs(15)
} else {
    std::time::Duration::ZERO
};

/// How a process group is asked to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM (on Windows, the console's Ctrl-Break, then `taskkill /T`).
    Terminate,
    /// SIGKILL (on Windows, `taskkill /T /F`).
    Kill,
}

static STOP_REQUESTED: LazyLock<CancellationToken> = LazyLock::new(CancellationToken::new);

/// Asks the running server to stop as if it got SIGTERM (the Windows service manager's
/// stop and shutdown controls come this way).
pub fn request_stop() {
    STOP_REQUESTED.cancel();
}

/// Returns once the server is asked to stop: a signal, Ctrl-C, or [`request_stop`].
pub async fn wait_for_stop_request() -> anyhow::Result<()> {
    tokio::select! {
        result = stop_signal() => result,
        () = STOP_REQUESTED.cancelled() => Ok(()),
    }
}

/// The folder exchange where the system has no atomic one: three renames, the middle name
/// `<a>.exchanging`, which recovery knows (see `changeover::recovery`). Each rename is
/// retried for a while when another process holds a file in the folder (an antivirus
/// scanning it, a backup tool), which on Windows fails it with a sharing violation.
pub fn exchange_by_renames(a: &std::path::Path, b: &std::path::Path) -> std::io::Result<()> {
    let aside = exchanging_path(a);
    rename_with_retries(a, &aside)?;
    if let Err(err) = rename_with_retries(b, a) {
        // Undo the first step; the journal covers a crash right here.
        let _ = rename_with_retries(&aside, a);
        return Err(err);
    }
    rename_with_retries(&aside, b)
}

/// Where [`exchange_by_renames`] keeps `a` for the moment between its renames.
pub fn exchanging_path(a: &std::path::Path) -> std::path::PathBuf {
    let mut name = a.as_os_str().to_owned();
    name.push(".exchanging");
    std::path::PathBuf::from(name)
}

/// How long a rename is retried while it fails because something else holds a file open.
pub const RENAME_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// `std::fs::rename`, retried with a growing pause (up to [`RENAME_PATIENCE`] in all) while
/// it fails as a file held open elsewhere makes it fail; any other error at once.
pub fn rename_with_retries(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(20);
    loop {
        match std::fs::rename(from, to) {
            Ok(()) => return Ok(()),
            Err(err) if is_held_elsewhere(&err) && started.elapsed() < RENAME_PATIENCE => {
                tracing::debug!(from = %from.display(), cause = %err, "rename retried");
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(500));
            }
            Err(err) => return Err(err),
        }
    }
}

/// Whether an error says another process holds the file: Windows' sharing violation (32),
/// lock violation (33) and access denied (5, what a folder rename with an open file in it
/// gets); `EBUSY` elsewhere.
pub fn is_held_elsewhere(err: &std::io::Error) -> bool {
    if cfg!(windows) {
        matches!(err.raw_os_error(), Some(5 | 32 | 33))
    } else {
        err.kind() == std::io::ErrorKind::ResourceBusy
    }
}

/// The open-file limit before and after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// The soft limit this process started with (`None`: unlimited).
    pub soft_before: Option<u64>,
    /// The soft limit now in force.
    pub soft: Option<u64>,
    /// The hard limit, the ceiling for the soft one.
    pub hard: Option<u64>,
}

impl std::fmt::Display for OpenFileLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |limit: Option<u64>| limit.map_or("unlimited".to_owned(), |n| n.to_string());
        write!(
            f,
            "open-file limit {} (was {}, hard {})",
            show(self.soft),
            show(self.soft_before),
            show(self.hard)
        )
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let limit = raise_open_file_limit().unwrap();
        assert_eq!(limit.soft, limit.hard);
        // Raising twice changes nothing.
        assert_eq!(raise_open_file_limit().unwrap().soft, limit.soft);
    }
}
