//! The agent's way back from its own update. Before an update is put in place, the running
//! release is copied to `DIR/.previous`; after it is in place, `DIR/.trial.json` says that
//! the new release is on trial. Right before the agent becomes the new release (`exec`,
//! same pid) it starts a small detached watcher of the old release. The new agent ends the
//! trial once the server has welcomed it. If its process ends first (a crash, an exit), or
//! the trial outlasts its patience (it hangs, cannot connect), the watcher kills it, puts
//! the previous release back, writes `DIR/.trial-failed.json` and becomes the old agent,
//! which reports the failure to the server when it connects and does not try that release
//! again for a while. This needs no service manager.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// The copy of the release that was running before an update.
pub const PREVIOUS_DIR: &str = ".previous";
const TRIAL_FILE: &str = ".trial.json";
const FAILED_FILE: &str = ".trial-failed.json";

/// How long a new agent has to be welcomed by the server, by default.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(120);

const POLL: Duration = Duration::from_millis(100);

/// A new release on trial.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trial {
    pub from_version: String,
    pub to_version: String,
    pub started_at_unix: u64,
}

/// A trial that failed, for the old agent to report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub version: String,
    pub reason: String,
}

fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).context("cannot encode")?;
    crate::files::write_atomically(path, &bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The release's files in `dir`, relative, without the agent's own dot-folders.
fn release_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut folders = vec![PathBuf::new()];
    while let Some(relative) = folders.pop() {
        let folder = dir.join(&relative);
        for item in std::fs::read_dir(&folder)
            .with_context(|| format!("cannot read {}", folder.display()))?
        {
            let item = item?;
            let name = item.file_name();
            if relative.as_os_str().is_empty() && name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = relative.join(&name);
            if item.file_type()?.is_dir() {
                folders.push(path);
            } else {
                files.push(path);
            }
        }
    }
    Ok(files)
}

/// Copies the running release in `dir` to `dir/.previous` (replacing an older copy).
pub fn keep_previous(dir: &Path) -> anyhow::Result<()> {
    let previous = dir.join(PREVIOUS_DIR);
    if previous.exists() {
        std::fs::remove_dir_all(&previous)
            .with_context(|| format!("cannot remove {}", previous.display()))?;
    }
    let building = dir.join(".previous.tmp");
    if building.exists() {
        std::fs::remove_dir_all(&building)
            .with_context(|| format!("cannot remove {}", building.display()))?;
    }
    for file in release_files(dir)? {
        let target = building.join(&file);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(dir.join(&file), &target)
            .with_context(|| format!("cannot keep a copy of {}", file.display()))?;
        // Opened for writing: Windows flushes only a file opened so.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .and_then(|copy| copy.sync_all())
            .with_context(|| format!("cannot sync the copy of {}", file.display()))?;
    }
    std::fs::rename(&building, &previous)
        .with_context(|| format!("cannot rename to {}", previous.display()))
}

/// Puts every file of `dir/.previous` back into `dir` (each by one rename), then removes
/// the copy.
pub fn restore_previous(dir: &Path) -> anyhow::Result<()> {
    let previous = dir.join(PREVIOUS_DIR);
    if !previous.exists() {
        anyhow::bail!("no previous release kept in {}", previous.display());
    }
    for file in release_files(&previous)? {
        let target = dir.join(&file);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        crate::files::replace(dir, &previous.join(&file), &target)
            .with_context(|| format!("cannot put {} back", file.display()))?;
    }
    std::fs::remove_dir_all(&previous)
        .with_context(|| format!("cannot remove {}", previous.display()))
}

/// Records that `to_version` is on trial in `dir`.
pub fn begin(dir: &Path, from_version: &str, to_version: &str) -> anyhow::Result<()> {
    let started_at_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|age| age.as_secs())
        .unwrap_or(0);
    write_json(
        &dir.join(TRIAL_FILE),
        &Trial {
            from_version: from_version.to_owned(),
            to_version: to_version.to_owned(),
            started_at_unix,
        },
    )
}

/// The trial under way in `dir`, if any.
pub fn current(dir: &Path) -> Option<Trial> {
    read_json(&dir.join(TRIAL_FILE))
}

/// Called by the new agent once the server welcomed it: the trial passed, the previous
/// release is no longer needed.
pub fn confirm(dir: &Path, running_version: &str) {
    let Some(trial) = current(dir) else { return };
    if trial.to_version != running_version {
        return;
    }
    match std::fs::remove_file(dir.join(TRIAL_FILE)) {
        Ok(()) => {
            info!(version = %running_version, "the updated agent is connected: its update is confirmed");
            let _ = std::fs::remove_dir_all(dir.join(PREVIOUS_DIR));
        }
        Err(err) => warn!(cause = %err, "cannot end the update's trial"),
    }
}

/// A failed trial left for this (old) agent to report, taken from `dir`.
pub fn take_failure(dir: &Path) -> Option<Failure> {
    let path = dir.join(FAILED_FILE);
    let failure = read_json(&path)?;
    let _ = std::fs::remove_file(&path);
    Some(failure)
}

/// What the old agent tells the watcher.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub dir: PathBuf,
    pub pid: u32,
    pub patience: Duration,
    /// The arguments the agent runs with (`run --server …`).
    pub run_args: Vec<OsString>,
}

fn arguments(options: &WatchOptions, detached: bool) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "trial-watch".into(),
        "--dir".into(),
        options.dir.clone().into_os_string(),
        "--pid".into(),
        options.pid.to_string().into(),
        "--patience-secs".into(),
        options.patience.as_secs().to_string().into(),
    ];
    if detached {
        args.push("--detached".into());
    }
    args.push("--".into());
    args.extend(options.run_args.iter().cloned());
    args
}

/// In the old agent, right before it becomes the new one: starts the watcher (which
/// detaches itself) and waits for that. The watcher carries this agent's instance id, so a
/// previous release it puts back is this instance too.
pub fn start_watcher(exe: &Path, options: &WatchOptions) -> anyhow::Result<()> {
    let status = std::process::Command::new(exe)
        .args(arguments(options, false))
        .env(
            crate::identity::INSTANCE_ENV,
            crate::identity::instance_id(),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .status()
        .with_context(|| format!("cannot start the update's watcher {}", exe.display()))?;
    if !status.success() {
        anyhow::bail!("the update's watcher did not start ({status})");
    }
    Ok(())
}

/// The first watcher process: starts the detached one and exits, so that the watcher is
/// nobody's child.
pub fn detach(options: &WatchOptions) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("cannot find this program")?;
    let mut command = std::process::Command::new(me);
    command
        .args(arguments(options, true))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        command.process_group(0);
    }
    command
        .spawn()
        .context("cannot start the detached watcher")?;
    Ok(())
}

/// The detached watcher: returns when the trial passed; after a failure it becomes the
/// previous agent (returns only if that cannot start).
pub fn watch(options: &WatchOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let birth = start_time(options.pid);
    let alive = || alive(options.pid) && start_time(options.pid) == birth;
    let reason = loop {
        std::thread::sleep(POLL);
        if current(&options.dir).is_none() {
            return Ok(());
        }
        if birth.is_none() || !alive() {
            std::thread::sleep(POLL);
            if current(&options.dir).is_none() {
                return Ok(());
            }
            break "the updated agent ended before the server welcomed it (it crashed or exited)"
                .to_owned();
        }
        if started.elapsed() >= options.patience {
            kill(options.pid);
            let killed = Instant::now();
            while alive() && killed.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(POLL);
            }
            // Putting the previous agent back beside a running new one would make two.
            anyhow::ensure!(
                !alive(),
                "the updated agent (pid {}) hangs and cannot be stopped; it stays",
                options.pid
            );
            break format!(
                "the updated agent was not welcomed by the server within {} s; it was stopped",
                options.patience.as_secs()
            );
        }
    };
    let trial = current(&options.dir).context("the trial ended meanwhile")?;
    eprintln!(
        "changeover-agent: {reason}; putting agent {} back",
        trial.from_version
    );
    restore_previous(&options.dir)?;
    write_json(
        &options.dir.join(FAILED_FILE),
        &Failure {
            version: trial.to_version.clone(),
            reason: format!("{reason}; agent {} was put back", trial.from_version),
        },
    )?;
    let _ = std::fs::remove_file(options.dir.join(TRIAL_FILE));
    let binary = options
        .dir
        .join(changeover_protocol::release::ReleaseKind::Agent.binary_path());
    let err = exec(&binary, &options.run_args);
    Err(anyhow::anyhow!(
        "cannot start the previous agent {}: {err}",
        binary.display()
    ))
}

// The previous agent, as the instance the watcher was started for.
fn previous_agent(binary: &Path, args: &[OsString]) -> std::process::Command {
    let mut command = std::process::Command::new(binary);
    command.args(args).env(
        crate::identity::INSTANCE_ENV,
        crate::identity::instance_id(),
    );
    command
}

#[cfg(unix)]
fn exec(binary: &Path, args: &[OsString]) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    previous_agent(binary, args).exec()
}

#[cfg(not(unix))]
fn exec(binary: &Path, args: &[OsString]) -> std::io::Error {
    match previous_agent(binary, args).spawn() {
        Ok(_) => std::process::exit(0),
        Err(err) => err,
    }
}

#[cfg(target_os = "linux")]
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(target_os = "linux")]
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

#[cfg(not(target_os = "linux"))]
fn with_process<T>(pid: u32, read: impl FnOnce(&sysinfo::Process) -> T) -> Option<T> {
    let mut system = sysinfo::System::new();
    let pid = sysinfo::Pid::from_u32(pid);
    system.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[pid]), true);
    system.process(pid).map(read)
}

#[cfg(not(target_os = "linux"))]
fn start_time(pid: u32) -> Option<u64> {
    with_process(pid, sysinfo::Process::start_time)
}

#[cfg(not(target_os = "linux"))]
fn alive(pid: u32) -> bool {
    with_process(pid, |process| {
        !matches!(
            process.status(),
            sysinfo::ProcessStatus::Zombie | sysinfo::ProcessStatus::Dead
        )
    })
    .unwrap_or(false)
}

#[cfg(unix)]
fn kill(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

#[cfg(not(unix))]
fn kill(pid: u32) {
    // TerminateProcess: a hung agent gets no say.
    with_process(pid, sysinfo::Process::kill);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_release_is_kept_and_put_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let install = dir.path();
        std::fs::create_dir_all(install.join("bin")).unwrap();
        std::fs::write(install.join("bin/changeover-agent"), "old binary").unwrap();
        std::fs::write(install.join("release.json"), r#"{"version":"1.0.0"}"#).unwrap();
        std::fs::create_dir_all(install.join(".update-staging")).unwrap();
        keep_previous(install).unwrap();
        assert!(!install.join(".previous/.update-staging").exists());
        // A partial update: the binary replaced, release.json not yet.
        std::fs::write(install.join("bin/changeover-agent"), "new binary").unwrap();
        restore_previous(install).unwrap();
        assert_eq!(
            std::fs::read_to_string(install.join("bin/changeover-agent")).unwrap(),
            "old binary"
        );
        assert!(!install.join(PREVIOUS_DIR).exists());
    }

    #[test]
    fn a_trial_is_confirmed_only_by_the_release_on_trial() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(PREVIOUS_DIR)).unwrap();
        begin(dir.path(), "1.0.0", "1.1.0").unwrap();
        confirm(dir.path(), "1.0.0");
        assert!(current(dir.path()).is_some());
        confirm(dir.path(), "1.1.0");
        assert!(current(dir.path()).is_none());
        assert!(!dir.path().join(PREVIOUS_DIR).exists());
    }
}
