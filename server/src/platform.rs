//! What differs between operating systems, behind one module.
//!
//! The open-file limit: one file descriptor per connection, so the soft limit (often 1024
//! in an interactive shell or a service without `LimitNOFILE`) would cap the server long
//! before memory does. Only the soft limit can be raised without privileges, and only up
//! to the hard limit; child processes inherit whatever this process set.

#[cfg(unix)]
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

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

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit.
#[cfg(unix)]
pub fn raise_open_file_limit() -> std::io::Result<OpenFileLimit> {
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: before.maximum,
                maximum: before.maximum,
            },
        )?;
    }
    let after = getrlimit(Resource::Nofile);
    Ok(OpenFileLimit {
        soft_before: before.current,
        soft: after.current,
        hard: after.maximum,
    })
}

/// Other systems have no such limit to raise.
#[cfg(not(unix))]
pub fn raise_open_file_limit() -> std::io::Result<OpenFileLimit> {
    Ok(OpenFileLimit {
        soft_before: None,
        soft: None,
        hard: None,
    })
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

/// Swaps two folders. On Linux this is one atomic step (`renameat2` with
/// `RENAME_EXCHANGE`), so the start path inside either folder is never missing; elsewhere
/// it is three renames, and the journal covers the moment between them.
pub fn exchange(a: &std::path::Path, b: &std::path::Path) -> std::io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            a,
            rustix::fs::CWD,
            b,
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .map_err(std::io::Error::from)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let aside = a.with_extension("exchanging");
        std::fs::rename(a, &aside)?;
        std::fs::rename(b, a)?;
        std::fs::rename(&aside, b)
    }
}

/// Bytes free for this user on the file system holding `path`.
pub fn free_space(path: &std::path::Path) -> std::io::Result<u64> {
    #[cfg(unix)]
    {
        let stats = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
        Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(u64::MAX)
    }
}

/// The listening socket handed over by the previous process image (or by systemd socket
/// activation): fd 3 with `LISTEN_FDS`/`LISTEN_PID` naming this process.
pub fn inherited_listener() -> Option<std::net::TcpListener> {
    let listener = listenfd::ListenFd::from_env()
        .take_tcp_listener(0)
        .ok()
        .flatten()?;
    // Handed over without close-on-exec; the applications this server starts must not
    // inherit it, or they would hold the port after the server is gone.
    #[cfg(unix)]
    let _ = rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::CLOEXEC);
    Some(listener)
}

/// Replaces this process image with `binary` (same PID, so a supervisor keeps tracking it),
/// handing over the listening socket the way systemd socket activation does, so
/// connections arriving meanwhile wait in its backlog instead of being refused. Returns
/// only on failure.
#[cfg(unix)]
pub fn reexec(
    binary: &std::path::Path,
    args: &[std::ffi::OsString],
    listener: &std::net::TcpListener,
) -> std::io::Error {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;

    let mut command = std::process::Command::new(binary);
    command.args(args);
    // The convention numbers handed-over sockets from 3; the listener is bound first
    // thing at start, so it is fd 3 unless the process was started with extra open files.
    if listener.as_raw_fd() == 3
        && rustix::io::fcntl_setfd(listener, rustix::io::FdFlags::empty()).is_ok()
    {
        command
            .env("LISTEN_FDS", "1")
            .env("LISTEN_PID", std::process::id().to_string())
            .env_remove("LISTEN_FDNAMES");
    } else {
        command.env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
    }
    command.exec()
}

/// Where replacing the process image is not possible, the service manager restarts us.
#[cfg(not(unix))]
pub fn reexec(
    _binary: &std::path::Path,
    _args: &[std::ffi::OsString],
    _listener: &std::net::TcpListener,
) -> std::io::Error {
    std::io::Error::other("restarting in place is not supported on this platform")
}

/// Every mount point on this machine (from `/proc/self/mountinfo` on Linux; empty where
/// it cannot be read).
pub fn mount_points() -> Vec<std::path::PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| parse_mountinfo(&text))
        .unwrap_or_default()
}

/// The mount points of a `mountinfo` text: the fifth field, with its octal escapes
/// (`\040` for a space) decoded.
fn parse_mountinfo(text: &str) -> Vec<std::path::PathBuf> {
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| {
            let bytes = field.as_bytes();
            let mut decoded = Vec::with_capacity(bytes.len());
            let mut index = 0;
            while index < bytes.len() {
                let escaped = bytes.get(index + 1..index + 4).and_then(|digits| {
                    std::str::from_utf8(digits)
                        .ok()
                        .and_then(|digits| u8::from_str_radix(digits, 8).ok())
                });
                match (bytes[index], escaped) {
                    (b'\\', Some(byte)) => {
                        decoded.push(byte);
                        index += 4;
                    }
                    (byte, _) => {
                        decoded.push(byte);
                        index += 1;
                    }
                }
            }
            std::path::PathBuf::from(String::from_utf8_lossy(&decoded).into_owned())
        })
        .collect()
}

#[cfg(test)]
mod mountinfo_tests {
    #[test]
    fn mount_points_are_read_with_their_escapes() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    40 22 0:35 / /srv/office/server/my\\040backups rw - tmpfs tmpfs rw\n";
        assert_eq!(
            super::parse_mountinfo(text),
            vec![
                std::path::PathBuf::from("/"),
                std::path::PathBuf::from("/srv/office/server/my backups")
            ]
        );
    }
}
