//! Unix (Linux and macOS): resource limits, signals, process groups, and the restart in
//! place by `exec` with the listening socket handed over.

use std::ffi::OsString;
use std::path::Path;

use anyhow::Context as _;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use super::{OpenFileLimit, Stop};

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit.
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

/// Bytes free for this user on the file system holding `path`.
pub fn free_space(path: &Path) -> std::io::Result<u64> {
    let stats = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// Which filesystem `path` is on (its device number): two paths on one filesystem share
/// its free space.
pub fn filesystem_id(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|metadata| metadata.dev())
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
    let _ = rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::CLOEXEC);
    Some(listener)
}

/// Lets `listener` go along to a program `command` starts, as fd 3 the way systemd socket
/// activation names it (`LISTEN_FDS=1`; `LISTEN_PID` only when `pid` is known, as for an
/// `exec` that keeps this process's pid). Without a socket at fd 3 nothing is handed over.
pub fn hand_over_listener(
    command: &mut std::process::Command,
    listener: &std::net::TcpListener,
    pid: Option<u32>,
) {
    use std::os::fd::AsRawFd as _;

    // The convention numbers handed-over sockets from 3; the listener is bound first
    // thing at start, so it is fd 3 unless the process was started with extra open files.
    if listener.as_raw_fd() == 3
        && rustix::io::fcntl_setfd(listener, rustix::io::FdFlags::empty()).is_ok()
    {
        command.env("LISTEN_FDS", "1").env_remove("LISTEN_FDNAMES");
        match pid {
            Some(pid) => command.env("LISTEN_PID", pid.to_string()),
            None => command.env_remove("LISTEN_PID"),
        };
    } else {
        command.env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
    }
}

/// Replaces this process image with `binary` (same PID, so a supervisor keeps tracking it),
/// handing over the listening socket the way systemd socket activation does, so
/// connections arriving meanwhile wait in its backlog instead of being refused (none:
/// the new image binds the port itself). Returns only on failure.
pub fn reexec(
    binary: &Path,
    args: &[OsString],
    listener: Option<&std::net::TcpListener>,
) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;

    let mut command = std::process::Command::new(binary);
    command.args(args);
    match listener {
        Some(listener) => hand_over_listener(&mut command, listener, Some(std::process::id())),
        None => {
            command.env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
        }
    }
    command.exec()
}

/// Accepted connections are close-on-exec already: nothing to do.
pub fn keep_from_children(_stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    Ok(())
}

/// Starts `command` in a process group of its own, so that it outlives this process and a
/// Ctrl-C meant for this one does not reach it. Its streams are the caller's to set.
pub fn spawn_detached(command: &mut std::process::Command) -> anyhow::Result<std::process::Child> {
    use std::os::unix::process::CommandExt as _;

    command
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", command.get_program().to_string_lossy()))
}

/// A child in a process group of its own: a stop reaches its children too, and a Ctrl-C
/// meant for the server does not reach it before the server stops it in order.
pub fn own_process_group(command: &mut tokio::process::Command) {
    command.process_group(0);
}

/// Sends SIGTERM or SIGKILL to the process group `pid` leads.
pub fn signal_group(pid: u32, how: Stop) {
    let signal = match how {
        Stop::Terminate => rustix::process::Signal::TERM,
        Stop::Kill => rustix::process::Signal::KILL,
    };
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// Kills one process (SIGKILL).
pub fn kill(pid: u32) -> std::io::Result<()> {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return Err(std::io::Error::other(format!("{pid} is not a process id")));
    };
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).map_err(Into::into)
}

/// Returns at SIGINT (Ctrl-C) or SIGTERM.
pub async fn stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot watch SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}
