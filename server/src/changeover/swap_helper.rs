//! The swap on Windows, where a running program's folder cannot be renamed: after the
//! logout and the carry-over, the old server starts a copy of the verified new binary from
//! the state folder (`swap-helper`) and ends. The helper waits for the old process (and the
//! service, when the server is one) to be gone, exchanges the releases (`<name>` →
//! `<name>_old`, staging → `<name>`), starts the new server (the service again, or a new
//! process), and waits for its health verdict like the Unix watchdog: a new release that
//! ends or hangs before it is stopped, everything rolled back from the journal, and the old
//! server started again. Every step is in the journal the servers use, so a crash of the
//! helper is finished by the next start of either release.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use changeover_protocol::ChangeoverPhase;
use changeover_protocol::release::ReleaseKind;
use tracing::{error, info, warn};

use super::journal::JournalFiles;
use super::watchdog::{Verdict, WatchOptions, Watched, await_verdict};
use super::{fault_point, recovery};
use crate::layout::Layout;

/// How long the old server may take to end after it started the helper.
const OLD_SERVER_PATIENCE: Duration = Duration::from_secs(60);

/// How often the helper looks at a process or a service.
const POLL: Duration = Duration::from_millis(50);

/// The helper's own folder in the state folder: outside both releases.
pub fn helper_dir(layout: &Layout) -> PathBuf {
    layout.state_dir().join("swap-helper")
}

/// In the old server: copies the new release's binary (and the DLLs beside it) from
/// `staging` into the state folder and starts it as the helper, detached. Returns once it
/// runs; the caller then ends.
pub fn start(layout: &Layout, staging: &Path, options: &WatchOptions) -> anyhow::Result<()> {
    let binary = staging.join(ReleaseKind::Server.binary_path());
    launch(
        &helper_dir(layout),
        &binary,
        options.arguments("swap-helper", &[]),
    )?;
    Ok(())
}

/// The folder of a helper started only to roll back, one per handing process: beside a
/// watching helper's, and beside an earlier roll-back helper's, whose programs may still
/// run. Folders of earlier ones are removed where nothing runs from them any more.
fn roll_back_dir(layout: &Layout) -> PathBuf {
    const PREFIX: &str = "swap-helper-rollback-";
    if let Ok(entries) = std::fs::read_dir(layout.state_dir()) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(PREFIX) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    layout
        .state_dir()
        .join(format!("{PREFIX}{}", std::process::id()))
}

/// In a new release that must be rolled back while it runs from the install, which
/// Windows cannot rename under it: the journal already says rolling back. If the helper
/// that started this release still watches, it rolls back once this process has ended;
/// else a copy of this program in the state folder is started to do it (`swap-helper
/// --roll-back`: waits for this process, settles the journal, starts the old release).
/// The caller then ends.
pub fn hand_over_roll_back(layout: &Layout, options: &WatchOptions) -> anyhow::Result<()> {
    if watching(layout) {
        info!("the swap helper that started this release rolls it back once it has ended");
        return Ok(());
    }
    let me = std::env::current_exe().context("cannot find this program")?;
    launch(
        &roll_back_dir(layout),
        &me,
        options.arguments("swap-helper", &["--roll-back"]),
    )
}

/// Copies `binary` and the DLLs beside it into `dir` (emptied first) and starts the copy
/// with `args`, detached.
fn launch(dir: &Path, binary: &Path, args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot remove an old {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if let Some(folder) = binary.parent() {
        for entry in std::fs::read_dir(folder)
            .with_context(|| format!("cannot read {}", folder.display()))?
            .flatten()
        {
            let path = entry.path();
            if path
                .extension()
                .is_some_and(|ext| ext.eq_ignore_ascii_case("dll"))
            {
                std::fs::copy(&path, dir.join(entry.file_name()))
                    .with_context(|| format!("cannot copy {}", path.display()))?;
            }
        }
    }
    let helper = dir.join(binary.file_name().context("the binary has no name")?);
    std::fs::copy(binary, &helper)
        .with_context(|| format!("cannot copy {} to {}", binary.display(), helper.display()))?;
    let mut command = std::process::Command::new(&helper);
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    crate::platform::spawn_detached(&mut command).context("cannot start the swap helper")?;
    info!(helper = %helper.display(), "swap helper started");
    Ok(())
}

/// The watching helper's pid and start time, so a new release can tell it still runs.
fn pid_file(layout: &Layout) -> PathBuf {
    helper_dir(layout).join("helper.pid")
}

fn record_own_pid(layout: &Layout) {
    let pid = std::process::id();
    let birth = crate::platform::process_start_time(pid).unwrap_or(0);
    if let Err(err) = std::fs::write(pid_file(layout), format!("{pid} {birth}\n")) {
        warn!(cause = %err, "cannot write the swap helper's pid");
    }
}

/// Whether the helper that recorded its pid still runs.
fn watching(layout: &Layout) -> bool {
    let Ok(text) = std::fs::read_to_string(pid_file(layout)) else {
        return false;
    };
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(pid)), Some(Ok(birth))) = (fields.next(), fields.next()) else {
        return false;
    };
    let Ok(pid) = u32::try_from(pid) else {
        return false;
    };
    crate::platform::process_alive(pid)
        && crate::platform::process_start_time(pid).unwrap_or(0) == birth
}

/// The helper started by [`hand_over_roll_back`]: once the new release has ended, the
/// journal's rollback is finished from here, outside both releases, and the old release
/// started. The server is started whatever happened: a site must not be locked out.
fn roll_back(options: &WatchOptions) -> anyhow::Result<()> {
    let layout = Layout::named(&options.root, &options.name);
    let files = JournalFiles::new(&layout.state_dir());
    info!(
        pid = options.pid,
        "swap helper waiting for the new release to end, to roll it back"
    );
    let mut settled = wait_for_old_server(options);
    if settled.is_ok() {
        // As neither release: a journal that says rolling back is finished here. A rename
        // another program holds up gets a few more tries.
        for attempt in 1..=ROLL_BACK_ATTEMPTS {
            settled = recovery::recover(&layout, &files, "").map(|_| ());
            match &settled {
                Ok(()) => break,
                Err(err) => warn!(
                    attempt,
                    cause = %format!("{err:#}"),
                    "the rollback could not be finished yet"
                ),
            }
            std::thread::sleep(ROLL_BACK_PAUSE);
        }
    }
    if let Err(err) = &settled {
        // The installed release starts and, if it is still the new one, hands the rollback
        // over again: retried every start rather than a site left without a server.
        error!(cause = %format!("{err:#}"), "the rollback could not be finished; starting the server anyway");
    }
    start_server(&layout, options)?;
    settled
}

/// How often, and how far apart, a roll-back helper tries to finish the rollback.
const ROLL_BACK_ATTEMPTS: u32 = 3;
const ROLL_BACK_PAUSE: Duration = Duration::from_secs(10);

/// The helper process: swap, start, wait for the verdict, roll back if there is none; or,
/// with `roll_back`, only finish a rollback (see [`hand_over_roll_back`]).
pub fn run(options: &WatchOptions, roll_back: bool) -> anyhow::Result<()> {
    let layout = Layout::named(&options.root, &options.name);
    crate::log_file::attach(&layout.state_dir());
    if roll_back {
        return self::roll_back(options);
    }
    record_own_pid(&layout);
    let files = JournalFiles::new(&layout.state_dir());
    info!(
        changeover = %options.changeover_id,
        pid = options.pid,
        "swap helper waiting for the old server to end"
    );
    wait_for_old_server(options)?;
    let Some(mut journal) = files.load()? else {
        info!("no changeover under way any more; the swap helper has nothing to do");
        return start_server(&layout, options).map(|_| ());
    };
    if journal.changeover_id != options.changeover_id {
        bail!(
            "the journal is changeover {}'s, not {}'s",
            journal.changeover_id,
            options.changeover_id
        );
    }
    let swapped = match journal.phase {
        ChangeoverPhase::Swapping => {
            match super::driver::swap_releases(&layout, &mut journal, &files) {
                Ok(()) => {
                    journal.phase = ChangeoverPhase::Restarting;
                    files.save(&journal)?;
                    fault_point("restarting");
                    true
                }
                Err(err) => {
                    let reason = format!("{err:#}");
                    error!(%reason, "the swap failed; putting the old release back");
                    // As the old release: the rollback ends the changeover here.
                    let from = journal.from_version.clone();
                    recovery::roll_back(&layout, &files, journal, reason, &from)?;
                    false
                }
            }
        }
        // Anything else is what a start of the server settles (recovery).
        _ => true,
    };
    let started = start_server(&layout, options);
    if !swapped {
        return started.map(|_| ());
    }
    let (reason, pid) = match started {
        Err(err) => (format!("the new release did not start: {err:#}"), None),
        Ok(pid) => {
            let mut server = Watched {
                alive: follow_server(&layout),
                pid,
            };
            match await_verdict(
                &options.changeover_id,
                options.patience,
                &files,
                &mut server,
            ) {
                Verdict::Decided => {
                    info!("the new release reached its verdict; swap helper done");
                    return Ok(());
                }
                Verdict::Failed(reason) => (reason, Some(server.pid)),
            }
        }
    };
    warn!(%reason, "the new release failed before its verdict; the swap helper rolls back");
    stop_server(options, pid);
    let orphans = crate::apps::stop_orphans(&layout.apps_dir());
    if !orphans.is_empty() {
        warn!(?orphans, "stopped the failed release's applications");
    }
    if let Some(journal) = files.load()?
        && journal.changeover_id == options.changeover_id
    {
        let from = journal.from_version.clone();
        if journal.committing {
            recovery::recover(&layout, &files, &journal.target_version)?;
        } else {
            let reason = match &journal.failure {
                Some(earlier) => format!("{earlier}; then {reason}"),
                None => reason,
            };
            recovery::roll_back(&layout, &files, journal, reason, &from)?;
        }
    }
    start_server(&layout, options).map(|_| ())
}

fn wait_for_old_server(options: &WatchOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let birth = crate::platform::process_start_time(options.pid);
    let running = || {
        birth.is_some()
            && crate::platform::process_alive(options.pid)
            && crate::platform::process_start_time(options.pid) == birth
    };
    while running() {
        if started.elapsed() > OLD_SERVER_PATIENCE {
            warn!(pid = options.pid, "the old server did not end; stopping it");
            stop_server(options, Some(options.pid));
            break;
        }
        std::thread::sleep(POLL);
    }
    #[cfg(windows)]
    if let Some(service) = &options.service {
        crate::platform::windows_service::wait_for_state(
            service,
            windows_service::service::ServiceState::Stopped,
            OLD_SERVER_PATIENCE,
        )?;
    }
    Ok(())
}

/// How long a started service may take to write its pid.
#[cfg(windows)]
const START_PATIENCE: Duration = Duration::from_secs(60);

/// The pid in `state/server.pid`, if it names a running process.
#[cfg(windows)]
fn server_pid(layout: &Layout) -> Option<u32> {
    std::fs::read_to_string(layout.state_dir().join("server.pid"))
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .filter(|pid| crate::platform::process_alive(*pid))
}

/// Starts the installed release: the service, or a new detached process. Returns its pid.
fn start_server(layout: &Layout, options: &WatchOptions) -> anyhow::Result<u32> {
    #[cfg(windows)]
    if let Some(service) = &options.service {
        let before = server_pid(layout);
        crate::platform::windows_service::start(service)?;
        let started = Instant::now();
        loop {
            if let Some(pid) = server_pid(layout)
                && Some(pid) != before
            {
                info!(%service, pid, "service started");
                return Ok(pid);
            }
            if started.elapsed() > START_PATIENCE {
                bail!(
                    "the service {service} wrote no pid within {} s",
                    START_PATIENCE.as_secs()
                );
            }
            std::thread::sleep(POLL);
        }
    }
    let binary = layout.install_dir().join(ReleaseKind::Server.binary_path());
    let mut command = std::process::Command::new(&binary);
    command
        .args(&options.run_args)
        .env_remove(super::FAULT_ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // The test switch goes on to the new release only when it names its own steps.
    if let Ok(fault) = std::env::var(super::FAULT_ENV) {
        command.env(super::FAULT_ENV, fault);
    }
    let child = crate::platform::spawn_detached(&mut command)?;
    info!(binary = %binary.display(), pid = child.id(), "server started");
    Ok(child.id())
}

/// Stops the service (when the server is one) and kills `pid` if it still runs.
fn stop_server(options: &WatchOptions, pid: Option<u32>) {
    #[cfg(windows)]
    if let Some(service) = &options.service {
        if let Err(err) = crate::platform::windows_service::stop(service) {
            warn!(cause = %format!("{err:#}"), "cannot stop the service");
        }
        let _ = crate::platform::windows_service::wait_for_state(
            service,
            windows_service::service::ServiceState::Stopped,
            Duration::from_secs(20),
        );
    }
    #[cfg(not(windows))]
    let _ = options;
    if let Some(pid) = pid.filter(|pid| crate::platform::process_alive(*pid)) {
        super::watchdog::kill(pid);
    }
}

/// Whether the server still runs: the process started, or the one that took over from it
/// (a rollback in the new release starts the old binary as a new process, which writes
/// its pid to `server.pid`).
fn follow_server(layout: &Layout) -> Box<dyn FnMut(&mut u32) -> bool> {
    let pid_file = layout.state_dir().join("server.pid");
    Box::new(move |pid: &mut u32| {
        if crate::platform::process_alive(*pid) {
            return true;
        }
        // A successor may take a moment to write its pid.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(next) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|text| text.trim().parse::<u32>().ok())
                && next != *pid
                && crate::platform::process_alive(next)
            {
                *pid = next;
                return true;
            }
            std::thread::sleep(POLL);
        }
        false
    })
}
