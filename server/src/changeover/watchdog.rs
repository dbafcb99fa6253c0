//! The watchdog that needs no service manager. Right before the old process becomes the
//! new release (`exec`, same pid), it starts a small detached process of the old release
//! that holds the listening socket and waits for the new release's verdict. A new release
//! that dies before its verdict (a crash, an exit, a segfault) or has none within its
//! patience (it hangs, or was stopped) is killed, the changeover rolled back from the
//! journal exactly as the next start would, the admin's mail queued, and the watchdog
//! becomes the old release's server on the same socket. A verdict (the journal gone or
//! another changeover's) ends it.
//!
//! Under a service manager (`INVOCATION_ID` or `NOTIFY_SOCKET` set by systemd) there is
//! no watchdog: the manager restarts the server and recovery counts the starts.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use changeover_protocol::ChangeoverPhase;
use changeover_protocol::release::ReleaseKind;
use tracing::{error, info, warn};

use super::journal::JournalFiles;
use super::recovery;
use crate::layout::Layout;

/// How often the watchdog looks at the journal and the process.
const POLL: Duration = Duration::from_millis(100);

/// Extra patience for a rollback or a commit under way in the new process.
const FINISHING_PATIENCE: Duration = Duration::from_secs(30);

/// What the old process tells the process that waits for the new release's verdict: the
/// Unix watchdog and the Windows swap helper (hidden commands, so these are their
/// command-line arguments too).
#[derive(Debug, Clone, clap::Args)]
pub struct WatchOptions {
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long)]
    pub name: String,
    #[arg(long = "changeover")]
    pub changeover_id: String,
    /// The server's pid: kept by the new release on Unix, gone before the swap on Windows.
    #[arg(long)]
    pub pid: u32,
    /// How long the new release has for its verdict.
    #[arg(long = "patience-secs", value_parser = parse_seconds)]
    pub patience: Duration,
    /// The Windows service the server runs as, if it does.
    #[arg(long)]
    pub service: Option<String>,
    /// The arguments the server runs with (`run --root … --listen …`).
    #[arg(last = true)]
    pub run_args: Vec<OsString>,
}

fn parse_seconds(text: &str) -> Result<Duration, std::num::ParseIntError> {
    text.parse().map(Duration::from_secs)
}

impl WatchOptions {
    /// The command line of `command` (`watchdog`, `swap-helper`) with these options, and
    /// `flags` before the server's own arguments.
    pub fn arguments(&self, command: &str, flags: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            command.into(),
            "--root".into(),
            self.root.clone().into_os_string(),
            "--name".into(),
            self.name.clone().into(),
            "--changeover".into(),
            self.changeover_id.clone().into(),
            "--pid".into(),
            self.pid.to_string().into(),
            "--patience-secs".into(),
            self.patience.as_secs().to_string().into(),
        ];
        if let Some(service) = &self.service {
            args.push("--service".into());
            args.push(service.into());
        }
        args.extend(flags.iter().map(OsString::from));
        args.push("--".into());
        args.extend(self.run_args.iter().cloned());
        args
    }
}

/// Whether a service manager supervises this process (and so restarts it).
pub fn under_service_manager() -> bool {
    ["INVOCATION_ID", "NOTIFY_SOCKET"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

/// In the old process, right before the `exec`: starts the watchdog, detached, with the
/// listening socket. Returns once it runs on its own.
#[cfg(unix)]
pub fn start(options: &WatchOptions, listener: &std::net::TcpListener) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("cannot find this program")?;
    let mut command = std::process::Command::new(&me);
    command.args(options.arguments("watchdog", &[]));
    // The socket goes along as fd 3 (it is fd 3 here, and the exec clears close-on-exec on
    // it anyway); without a pid check, since the watchdog's pid is not known beforehand.
    crate::platform::hand_over_listener(&mut command, listener, None);
    command
        .env_remove(super::FAULT_ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // The first process only starts the real watchdog and exits, so that the watchdog is
    // nobody's child: it outlives the new release and never lingers as its zombie.
    let status = command
        .status()
        .with_context(|| format!("cannot start the watchdog {}", me.display()))?;
    if !status.success() {
        anyhow::bail!("the watchdog did not start ({status})");
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn start(_options: &WatchOptions, _listener: &std::net::TcpListener) -> anyhow::Result<()> {
    anyhow::bail!("the watchdog is not available on this platform")
}

/// The first watchdog process: starts the detached one in its own process group and
/// exits.
pub fn detach(options: &WatchOptions) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("cannot find this program")?;
    let mut command = std::process::Command::new(me);
    command
        .args(options.arguments("watchdog", &["--detached"]))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    crate::platform::spawn_detached(&mut command).context("cannot start the detached watchdog")?;
    Ok(())
}

/// Why the watchdog stepped in.
pub(crate) enum Verdict {
    /// The journal is gone (or is another changeover's): the new release decided.
    Decided,
    /// The new release failed before deciding.
    Failed(String),
}

/// The detached watchdog: waits for the verdict; on a failure rolls back and becomes the
/// old release's server (returns only if that cannot be started).
pub fn watch(options: &WatchOptions) -> anyhow::Result<()> {
    let layout = Layout::named(&options.root, &options.name);
    crate::log_file::attach(&layout.state_dir());
    let listener = crate::platform::inherited_listener();
    let files = JournalFiles::new(&layout.state_dir());
    info!(
        changeover = %options.changeover_id,
        pid = options.pid,
        patience_secs = options.patience.as_secs(),
        "watchdog waiting for the new release's verdict"
    );
    let reason = match wait_for_verdict(options, &files) {
        Verdict::Decided => {
            info!("the new release reached its verdict; watchdog done");
            return Ok(());
        }
        Verdict::Failed(reason) => reason,
    };
    warn!(%reason, "the new release failed before its verdict; the watchdog takes over");
    // Its applications may still run: their data must be at rest before folders move.
    let orphans = crate::apps::stop_orphans(&layout.apps_dir());
    if !orphans.is_empty() {
        warn!(?orphans, "stopped the failed release's applications");
    }
    let running = crate::version::running_version();
    let resume = match files.load()? {
        Some(journal) if journal.changeover_id == options.changeover_id => {
            if journal.committing {
                // Healthy and deleting the old release when it died: finish as a start would.
                recovery::recover(&layout, &files, &journal.target_version)?
            } else {
                let reason = match &journal.failure {
                    Some(earlier) => format!("{earlier}; then {reason}"),
                    None => reason,
                };
                recovery::roll_back(&layout, &files, journal, reason, &running)?
            }
        }
        _ => recovery::Resume::Nothing,
    };
    let _ = resume;
    let binary = layout.install_dir().join(ReleaseKind::Server.binary_path());
    info!(binary = %binary.display(), "watchdog starting the installed release");
    let err = crate::platform::reexec(&binary, &options.run_args, listener.as_ref());
    error!(cause = %err, "cannot start the installed release");
    Err(anyhow::anyhow!("cannot start {}: {err}", binary.display()))
}

fn wait_for_verdict(options: &WatchOptions, files: &JournalFiles) -> Verdict {
    let birth = crate::platform::process_start_time(options.pid);
    let mut server = Watched {
        alive: Box::new(move |pid: &mut u32| {
            birth.is_some()
                && crate::platform::process_alive(*pid)
                && crate::platform::process_start_time(*pid) == birth
        }),
        pid: options.pid,
    };
    await_verdict(&options.changeover_id, options.patience, files, &mut server)
}

/// The server process whose verdict is awaited.
pub(crate) struct Watched {
    /// Whether the process with this pid is still the server that was started (it may
    /// name the process that took over from it instead).
    pub alive: Box<dyn FnMut(&mut u32) -> bool>,
    pub pid: u32,
}

impl Watched {
    fn alive(&mut self) -> bool {
        (self.alive)(&mut self.pid)
    }
}

/// Waits until the changeover `changeover_id` has its verdict (its journal is gone or is
/// another changeover's) or the server fails before it: ends, or has none within
/// `patience` (then it is killed).
pub(crate) fn await_verdict(
    changeover_id: &str,
    patience: Duration,
    files: &JournalFiles,
    server: &mut Watched,
) -> Verdict {
    let started = Instant::now();
    loop {
        std::thread::sleep(POLL);
        let journal = match files.load() {
            Ok(Some(journal)) if journal.changeover_id == changeover_id => journal,
            Ok(_) => return Verdict::Decided,
            // Half-written is impossible (atomic renames); keep looking.
            Err(err) => {
                warn!(cause = %format!("{err:#}"), "watchdog cannot read the journal");
                continue;
            }
        };
        if !server.alive() {
            // Give a process that just ended the journal a moment to have removed it.
            std::thread::sleep(POLL);
            if !matches!(files.load(), Ok(Some(ref again)) if again.changeover_id == changeover_id)
            {
                return Verdict::Decided;
            }
            return Verdict::Failed(
                "the new release's process ended before its health verdict (it crashed or exited)"
                    .to_owned(),
            );
        }
        let finishing = journal.committing || journal.phase == ChangeoverPhase::RollingBack;
        let patience = if finishing {
            patience + FINISHING_PATIENCE
        } else {
            patience
        };
        if started.elapsed() < patience {
            continue;
        }
        if journal.committing {
            // Never interfere with a commit: the next start finishes it anyway.
            continue;
        }
        kill(server.pid);
        let killed = Instant::now();
        while server.alive() && killed.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(POLL);
        }
        return Verdict::Failed(format!(
            "the new release had no health verdict within {} s (it hung or was stopped); the \
             watchdog killed it",
            patience.as_secs()
        ));
    }
}

pub(crate) fn kill(pid: u32) {
    if let Err(err) = crate::platform::kill(pid) {
        warn!(cause = %err, "cannot kill the new release");
    }
}
