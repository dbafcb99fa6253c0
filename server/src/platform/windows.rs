//! Windows: no `exec`, no signals, no folder rename while a program in it runs. The server
//! restarts as a new process (which binds the port once this one has let it go), a stop is
//! Ctrl-C, Ctrl-Break, the console closing or the service manager's control, and
//! processes are ended with `taskkill`.

use std::ffi::OsString;
use std::path::Path;

use anyhow::Context as _;
use std::os::windows::process::CommandExt as _;

use super::{OpenFileLimit, Stop};

/// `CREATE_NEW_PROCESS_GROUP`: Ctrl-C of this console does not reach the child.
const CREATE_NEW_PROCESS_GROUP: u32 = 0x0000_0200;
/// `DETACHED_PROCESS`: no console of its own, none inherited.
const DETACHED_PROCESS: u32 = 0x0000_0008;
/// `CREATE_NO_WINDOW`: a console program started without a window popping up.
const CREATE_NO_WINDOW: u32 = 0x0800_0000;

/// Windows has no per-process descriptor limit to raise (sockets are bounded by memory).
pub fn raise_open_file_limit() -> std::io::Result<OpenFileLimit> {
    Ok(OpenFileLimit {
        soft_before: None,
        soft: None,
        hard: None,
    })
}

/// Bytes free for this user on the volume holding `path` (`GetDiskFreeSpaceExW`, which
/// honours quotas).
pub fn free_space(path: &Path) -> std::io::Result<u64> {
    fs4::available_space(path)
}

/// Which volume `path` is on (its drive or share, from the full path): two paths on one
/// volume share its free space.
pub fn filesystem_id(path: &Path) -> Option<u64> {
    use std::hash::{Hash as _, Hasher as _};
    let full = std::fs::canonicalize(path).ok()?;
    let std::path::Component::Prefix(prefix) = full.components().next()? else {
        return None;
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    prefix
        .as_os_str()
        .to_string_lossy()
        .to_ascii_lowercase()
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// Windows hands no socket from one process to the next here: the next release binds the
/// port itself (see [`crate::listener::bind_std_with_patience`]).
pub fn inherited_listener() -> Option<std::net::TcpListener> {
    None
}

/// Swaps two folders: three renames, each retried while another process holds a file in
/// the folder; the journal covers the moments between them.
pub fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    super::exchange_by_renames(a, b)
}

/// Mount points inside the product folder are not looked for on Windows (volumes are
/// mounted at drive letters there; a carried folder on another volume is found by the
/// preflight's volume check).
pub fn mount_points() -> Vec<std::path::PathBuf> {
    Vec::new()
}

/// Starts `binary` as the server in a new process, then ends this one, which lets the
/// listening socket go so the new process can bind it. Under the service manager the
/// service is restarted instead. Returns only on failure.
pub fn reexec(
    binary: &Path,
    args: &[OsString],
    listener: Option<&std::net::TcpListener>,
) -> std::io::Error {
    let _ = listener;
    if crate::service::is_windows_service() {
        return match crate::service::restart_service_with(binary) {
            Ok(()) => crate::service::exit_now(0),
            Err(err) => std::io::Error::other(format!("{err:#}")),
        };
    }
    let mut command = std::process::Command::new(binary);
    command.args(args);
    match spawn_detached(&mut command) {
        Ok(_) => crate::service::exit_now(0),
        Err(err) => std::io::Error::other(format!("{err:#}")),
    }
}

/// Keeps an accepted connection out of the processes this one starts (the swap helper, a
/// new release, applications): a connection inherited by one stays open after this
/// process ends, and its peer waits on a silent socket. Sockets are made non-inheritable
/// by the standard library, but an accepted one does not always take that over from its
/// listener (Wine 8 does not).
pub fn keep_from_children(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    socket2::SockRef::from(stream).set_no_inherit(true)
}

/// Starts `command` detached from this console and in a process group of its own, so that
/// it outlives this process and this console's Ctrl-C does not reach it. Its streams are
/// the caller's to set.
pub fn spawn_detached(command: &mut std::process::Command) -> anyhow::Result<std::process::Child> {
    command
        .creation_flags(DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP)
        .spawn()
        .with_context(|| format!("cannot start {}", command.get_program().to_string_lossy()))
}

/// A child in a process group of its own, without a console window.
pub fn own_process_group(command: &mut tokio::process::Command) {
    command.creation_flags(CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW);
}

/// Ends the process tree `pid` leads: `taskkill /T` asks its windows to close, `/F` forces.
pub fn signal_group(pid: u32, how: Stop) {
    let mut command = std::process::Command::new("taskkill");
    command.args(["/PID", &pid.to_string(), "/T"]);
    if how == Stop::Kill {
        command.arg("/F");
    }
    let _ = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .creation_flags(CREATE_NO_WINDOW)
        .status();
}

/// Kills one process (`TerminateProcess`).
pub fn kill(pid: u32) -> std::io::Result<()> {
    let mut system = sysinfo::System::new();
    let id = sysinfo::Pid::from_u32(pid);
    system.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[id]), true);
    match system.process(id) {
        Some(process) if process.kill() => Ok(()),
        Some(_) => Err(std::io::Error::other(format!("cannot kill process {pid}"))),
        None => Ok(()),
    }
}

/// Returns at Ctrl-C, Ctrl-Break, the console window closing, or the system shutting down.
pub async fn stop_signal() -> anyhow::Result<()> {
    use tokio::signal::windows::{ctrl_break, ctrl_close, ctrl_shutdown};
    let mut brk = ctrl_break().context("cannot watch Ctrl-Break")?;
    let mut close = ctrl_close().context("cannot watch the console closing")?;
    let mut shutdown = ctrl_shutdown().context("cannot watch the shutdown")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot watch Ctrl-C")?,
        _ = brk.recv() => {}
        _ = close.recv() => {}
        _ = shutdown.recv() => {}
    }
    Ok(())
}
