//! Processes by pid where there is no `/proc` (Windows, macOS), through `sysinfo`.

use sysinfo::{Pid, ProcessStatus, ProcessesToUpdate, System};

fn with_process<T>(pid: u32, read: impl FnOnce(&sysinfo::Process) -> T) -> Option<T> {
    let mut system = System::new();
    let pid = Pid::from_u32(pid);
    system.refresh_processes(ProcessesToUpdate::Some(&[pid]), true);
    system.process(pid).map(read)
}

/// The start time of a process (seconds since the epoch), which tells a pid reused by
/// another process from the one recorded.
pub fn process_start_time(pid: u32) -> Option<u64> {
    with_process(pid, sysinfo::Process::start_time)
}

/// Whether a process runs (alive and not a zombie).
pub fn process_alive(pid: u32) -> bool {
    with_process(pid, |process| {
        !matches!(
            process.status(),
            ProcessStatus::Zombie | ProcessStatus::Dead
        )
    })
    .unwrap_or(false)
}
