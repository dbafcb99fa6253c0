//! Runs the applications of the installed release: one task per application starts it,
//! probes it, restarts it with capped backoff when it dies, gives up when it keeps dying,
//! and stops it gracefully (SIGTERM to its process group, SIGKILL after its stop timeout).
//!
//! Each running application has a pid file in `<state>/apps/`, so that a server killed
//! without a chance to stop them (kill -9, a power cut of the process tree) finds and
//! stops the orphans at its next start, before recovery moves any folder: see
//! [`stop_orphans`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use changeover_protocol::{AppState, AppStatus};
use tokio::io::AsyncReadExt as _;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use super::manifest::{AppSpec, Manifest, resolve_program};
use super::probe;
use crate::log_file::LogFile;
use crate::platform::{Stop, process_alive, process_start_time};

/// The size at which an application's log is rotated.
pub const APP_LOG_MAX_BYTES: u64 = 1024 * 1024;

/// Lines of an application's log quoted when it fails.
pub const FAILURE_LOG_LINES: usize = 10;

/// The first wait before a restart; doubled after each quick failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// The longest wait before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A run this long counts as stable: the next failure starts the backoff afresh.
const STABLE_RUN: Duration = Duration::from_secs(30);

/// Quick failures in a row after which the application is reported crashed.
const MAX_QUICK_FAILURES: u32 = 5;

/// How often a starting application is probed.
const STARTING_PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// How often a running application is probed.
const RUNNING_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// The applications the server runs now; cheap to clone.
#[derive(Clone)]
pub struct Apps {
    inner: Arc<Inner>,
}

struct Inner {
    /// The working folder: the install.
    install: PathBuf,
    /// `<state>/apps`: logs and pid files.
    dir: PathBuf,
    http: reqwest::Client,
    running: Mutex<Vec<Running>>,
}

struct Running {
    name: String,
    probe: Option<String>,
    snapshot: watch::Receiver<Snapshot>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// What one application's task reports.
#[derive(Debug, Clone)]
struct Snapshot {
    status: AppStatus,
    /// Exits since it was first started.
    exits: u32,
}

impl std::fmt::Debug for Apps {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Apps")
            .field("install", &self.inner.install)
            .field("apps", &self.statuses())
            .finish()
    }
}

impl Apps {
    /// Applications run in `install`; their logs and pid files are kept in `dir`.
    pub fn new(install: PathBuf, dir: PathBuf) -> Apps {
        Apps {
            inner: Arc::new(Inner {
                install,
                dir,
                http: probe::http_client(),
                running: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The folder of the logs and pid files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Starts every application of `manifest`, in its order.
    pub fn start(&self, manifest: &Manifest) {
        let mut running = self.lock();
        for spec in &manifest.apps {
            let (report, snapshot) = watch::channel(Snapshot {
                status: AppStatus {
                    name: spec.name.clone(),
                    state: AppState::Starting,
                    pid: None,
                    restarts: 0,
                    health: None,
                    health_at: None,
                    last_exit: None,
                },
                exits: 0,
            });
            let (stop, stop_requested) = oneshot::channel();
            let task = tokio::spawn(supervise(
                spec.clone(),
                Arc::clone(&self.inner),
                report,
                stop_requested,
            ));
            running.push(Running {
                name: spec.name.clone(),
                probe: spec.health.as_ref().map(ToString::to_string),
                snapshot,
                stop: Some(stop),
                task,
            });
        }
    }

    /// How every application is doing, in start order.
    pub fn statuses(&self) -> Vec<AppStatus> {
        self.lock()
            .iter()
            .map(|app| app.snapshot.borrow().status.clone())
            .collect()
    }

    /// Whether any application is supervised.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Stops every application, the last started first, each gracefully within its stop
    /// timeout; returns when all have exited.
    pub async fn stop_all(&self) {
        let running: Vec<Running> = std::mem::take(&mut *self.lock());
        for mut app in running.into_iter().rev() {
            if let Some(stop) = app.stop.take() {
                let _ = stop.send(());
            }
            if let Err(err) = app.task.await {
                warn!(app = %app.name, cause = %err, "the application's supervisor failed");
            }
        }
    }

    /// Waits until every application passes its probe (or, without one, runs), at most
    /// until `deadline`. Fails at once when one exits meanwhile; the error names the
    /// application, why, and the last lines of its log.
    pub async fn wait_healthy(&self, deadline: tokio::time::Instant) -> anyhow::Result<()> {
        let watched: Vec<(String, Option<String>, watch::Receiver<Snapshot>)> = self
            .lock()
            .iter()
            .map(|app| (app.name.clone(), app.probe.clone(), app.snapshot.clone()))
            .collect();
        for (name, probe, mut snapshot) in watched {
            let outcome = tokio::time::timeout_at(
                deadline,
                snapshot.wait_for(|snapshot| {
                    snapshot.exits > 0
                        || matches!(snapshot.status.state, AppState::Healthy | AppState::Crashed)
                        || (probe.is_none() && snapshot.status.state == AppState::Running)
                }),
            )
            .await
            .map(|waited| waited.map(|snapshot| snapshot.clone()));
            let why = match outcome {
                Ok(Ok(snapshot))
                    if snapshot.exits == 0 && snapshot.status.state != AppState::Crashed =>
                {
                    info!(app = %name, "application healthy");
                    continue;
                }
                Ok(Ok(snapshot)) => format!(
                    "exited while starting ({})",
                    snapshot
                        .status
                        .last_exit
                        .clone()
                        .unwrap_or_else(|| "no reason known".to_owned())
                ),
                Ok(Err(_)) => "its supervisor stopped".to_owned(),
                Err(_) => {
                    let last = snapshot.borrow().status.health.clone();
                    format!(
                        "did not pass its health probe ({}) in time{}",
                        probe.as_deref().unwrap_or("none"),
                        last.map(|health| format!(": {health}")).unwrap_or_default()
                    )
                }
            };
            anyhow::bail!("{}", self.failure(&name, &why));
        }
        Ok(())
    }

    /// "application NAME WHY", with the last lines of its log.
    pub fn failure(&self, name: &str, why: &str) -> String {
        let lines = crate::log_file::tail_of(&log_path(&self.inner.dir, name), FAILURE_LOG_LINES);
        if lines.is_empty() {
            format!("application {name:?} {why}; its log is empty")
        } else {
            format!(
                "application {name:?} {why}; the last lines of its log:\n{}",
                lines.join("\n")
            )
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Running>> {
        self.inner
            .running
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// `<dir>/<name>.log`.
pub fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

fn pid_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pid"))
}

// One application, from its first start to its stop.
async fn supervise(
    spec: AppSpec,
    inner: Arc<Inner>,
    report: watch::Sender<Snapshot>,
    mut stop_requested: oneshot::Receiver<()>,
) {
    let name = spec.name.clone();
    let log = LogFile::open_at(log_path(&inner.dir, &name), APP_LOG_MAX_BYTES);
    let note = |line: &str| {
        if let Some(log) = &log {
            let stamp = humantime::format_rfc3339_seconds(SystemTime::now());
            log.append(format!("--- {stamp} changeover: {line}\n").as_bytes());
        }
    };
    let mut quick_failures = 0u32;
    loop {
        report.send_modify(|snapshot| {
            snapshot.status.state = AppState::Starting;
            snapshot.status.health = None;
            snapshot.status.health_at = None;
        });
        let started = Instant::now();
        let exit = match spawn(&spec, &inner, log.clone()) {
            Err(err) => format!("cannot start: {err:#}"),
            Ok(mut child) => {
                let pid = child.id();
                report.send_modify(|snapshot| snapshot.status.pid = pid);
                note(&format!("started pid {}", pid.unwrap_or(0)));
                info!(app = %name, pid = ?pid, "application started");
                if let Some(pid) = pid {
                    write_pid_file(&inner.dir, &name, pid, spec.stop_timeout);
                }
                let ended =
                    run_until_exit_or_stop(&spec, &inner, &mut child, &report, &mut stop_requested)
                        .await;
                let _ = std::fs::remove_file(pid_path(&inner.dir, &name));
                match ended {
                    Ended::Stopped(how) => {
                        note(&format!("stopped ({how})"));
                        info!(app = %name, %how, "application stopped");
                        report.send_modify(|snapshot| {
                            snapshot.status.state = AppState::Stopped;
                            snapshot.status.pid = None;
                            snapshot.status.last_exit =
                                Some(format!("stopped by the server ({how})"));
                        });
                        return;
                    }
                    Ended::Exited(how) => how,
                }
            }
        };
        note(&format!("exited: {exit}"));
        if started.elapsed() >= STABLE_RUN {
            quick_failures = 0;
        }
        quick_failures += 1;
        let crashed = quick_failures >= MAX_QUICK_FAILURES;
        report.send_modify(|snapshot| {
            snapshot.exits += 1;
            snapshot.status.pid = None;
            snapshot.status.last_exit = Some(exit.clone());
            snapshot.status.state = if crashed {
                AppState::Crashed
            } else {
                AppState::Stopped
            };
        });
        if crashed {
            warn!(app = %name, %exit, failures = quick_failures, "the application keeps dying; not restarting it");
            note(&format!("gave up after {quick_failures} failures in a row"));
            let _ = stop_requested.await;
            return;
        }
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (quick_failures - 1).min(16))
            .min(MAX_BACKOFF);
        warn!(app = %name, %exit, backoff_ms = backoff.as_millis() as u64, "the application died; restarting it");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = &mut stop_requested => {
                report.send_modify(|snapshot| snapshot.status.state = AppState::Stopped);
                return;
            }
        }
        report.send_modify(|snapshot| snapshot.status.restarts += 1);
    }
}

enum Ended {
    /// The server stopped it; how (`exit status 0`, `killed after 20 s`).
    Stopped(String),
    /// It exited by itself; how.
    Exited(String),
}

async fn run_until_exit_or_stop(
    spec: &AppSpec,
    inner: &Inner,
    child: &mut tokio::process::Child,
    report: &watch::Sender<Snapshot>,
    stop_requested: &mut oneshot::Receiver<()>,
) -> Ended {
    let mut next_probe = tokio::time::Instant::now() + STARTING_PROBE_INTERVAL;
    let mut ever_healthy = false;
    if spec.health.is_none() {
        report.send_modify(|snapshot| snapshot.status.state = AppState::Running);
    }
    loop {
        tokio::select! {
            status = child.wait() => {
                return Ended::Exited(match status {
                    Ok(status) => status.to_string(),
                    Err(err) => format!("cannot wait for it: {err}"),
                });
            }
            _ = &mut *stop_requested => {
                report.send_modify(|snapshot| snapshot.status.state = AppState::Stopping);
                return Ended::Stopped(stop(child, spec.stop_timeout).await);
            }
            () = tokio::time::sleep_until(next_probe), if spec.health.is_some() => {
                let Some(health) = &spec.health else { continue };
                let result = probe::run(health, &inner.install, &inner.http).await;
                let passed = result.is_ok();
                if passed && !ever_healthy {
                    info!(app = %spec.name, "application passed its health probe");
                }
                if !passed && ever_healthy {
                    warn!(app = %spec.name, cause = %format!("{:#}", result.as_ref().err().map(ToString::to_string).unwrap_or_default()), "application failed its health probe");
                }
                ever_healthy |= passed;
                report.send_modify(|snapshot| {
                    // A probe that ended after a stop began does not undo "stopping".
                    if snapshot.status.state == AppState::Stopping {
                        return;
                    }
                    snapshot.status.health = Some(match &result {
                        Ok(()) => "ok".to_owned(),
                        Err(err) => format!("{err:#}"),
                    });
                    snapshot.status.health_at = Some(SystemTime::now());
                    snapshot.status.state = if passed {
                        AppState::Healthy
                    } else if ever_healthy {
                        AppState::Running
                    } else {
                        AppState::Starting
                    };
                });
                next_probe = tokio::time::Instant::now()
                    + if ever_healthy { RUNNING_PROBE_INTERVAL } else { STARTING_PROBE_INTERVAL };
            }
        }
    }
}

// SIGTERM to the process group, SIGKILL after the timeout; says how it ended.
async fn stop(child: &mut tokio::process::Child, timeout: Duration) -> String {
    let Some(pid) = child.id() else {
        return "had already exited".to_owned();
    };
    crate::platform::signal_group(pid, Stop::Terminate);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status.to_string(),
        Ok(Err(err)) => format!("cannot wait for it: {err}"),
        Err(_) => {
            crate::platform::signal_group(pid, Stop::Kill);
            let _ = child.wait().await;
            format!("killed after {} s", timeout.as_secs())
        }
    }
}

fn spawn(
    spec: &AppSpec,
    inner: &Inner,
    log: Option<Arc<LogFile>>,
) -> anyhow::Result<tokio::process::Child> {
    let program = resolve_program(&inner.install, &spec.command[0]);
    let mut command = tokio::process::Command::new(&program);
    command
        .args(&spec.command[1..])
        .current_dir(&inner.install)
        .envs(&spec.env)
        .env("CHANGEOVER_APP", &spec.name)
        .env_remove(crate::auth::ADMIN_PASSWORD_ENV)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(false);
    // Its own process group: a stop reaches its children too, and a Ctrl-C meant for the
    // server does not reach it before the server stops it in order.
    crate::platform::own_process_group(&mut command);
    // The service manager speaks with the server only.
    for name in crate::service::NOTIFY_ENV {
        command.env_remove(name);
    }
    let mut child = command
        .spawn()
        .map_err(|err| anyhow::anyhow!("{}: {err}", program.display()))?;
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(copy_to_log(stdout, log.clone()));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(copy_to_log(stderr, log));
    }
    Ok(child)
}

async fn copy_to_log(mut from: impl tokio::io::AsyncRead + Unpin, log: Option<Arc<LogFile>>) {
    let mut buffer = vec![0u8; 8192];
    loop {
        match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => {
                if let Some(log) = &log {
                    log.append(&buffer[..read]);
                }
            }
        }
    }
}

fn write_pid_file(dir: &Path, name: &str, pid: u32, stop_timeout: Duration) {
    let started = process_start_time(pid).unwrap_or(0);
    let line = format!("{pid} {started} {}\n", stop_timeout.as_secs());
    let path = pid_path(dir, name);
    if let Err(err) = std::fs::write(&path, line) {
        warn!(path = %path.display(), cause = %err, "cannot write the application's pid file");
    }
}

/// Stops applications a previous server process left running (it was killed before it
/// could stop them): SIGTERM, then SIGKILL after their stop timeout. Blocking; called
/// first thing at start, before recovery moves any folder. Returns the names stopped.
pub fn stop_orphans(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut stopped = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|ext| ext.to_str()) != Some("pid") {
            continue;
        }
        let name = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut fields = text.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(pid)), Some(Ok(started)), Some(Ok(timeout))) =
            (fields.next(), fields.next(), fields.next())
        else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        let Ok(pid) = u32::try_from(pid) else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        // Only the process that was started, not whatever has its pid now.
        if process_alive(pid) && process_start_time(pid) == Some(started) {
            warn!(app = %name, pid, "stopping an application a previous server left running");
            crate::platform::signal_group(pid, Stop::Terminate);
            let deadline = Instant::now() + Duration::from_secs(timeout.max(1));
            while process_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if process_alive(pid) {
                crate::platform::signal_group(pid, Stop::Kill);
                while process_alive(pid) && Instant::now() < deadline + Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            stopped.push(name);
        }
        let _ = std::fs::remove_file(&path);
    }
    stopped
}

// Its applications are shell scripts.
#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn manifest(text: &str) -> Manifest {
        Manifest::parse(text).unwrap()
    }

    #[tokio::test]
    async fn an_application_runs_is_probed_and_stops_gracefully() {
        let dir = tempfile::tempdir().unwrap();
        let install = dir.path().join("install");
        std::fs::create_dir(&install).unwrap();
        let apps = Apps::new(install.clone(), dir.path().join("apps"));
        apps.start(&manifest(
            r#"
            [[app]]
            name = "sleeper"
            command = ["/bin/sh", "-c", "trap 'echo bye; exit 0' TERM; echo hello; touch ready; while true; do sleep 0.1; done"]
            health = { command = ["/bin/sh", "-c", "test -e ready"] }
            stop_timeout_secs = 5
            "#,
        ));
        apps.wait_healthy(tokio::time::Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
        let status = apps.statuses().remove(0);
        assert_eq!(status.state, AppState::Healthy);
        assert_eq!(status.health.as_deref(), Some("ok"));
        let pid = status.pid.unwrap();
        assert!(dir.path().join("apps/sleeper.pid").exists());
        apps.stop_all().await;
        assert!(!process_alive(pid));
        assert!(!dir.path().join("apps/sleeper.pid").exists());
        let log = std::fs::read_to_string(dir.path().join("apps/sleeper.log")).unwrap();
        assert!(log.contains("hello") && log.contains("bye"), "{log}");
        assert!(apps.statuses().is_empty());
    }

    #[tokio::test]
    async fn a_failing_start_names_the_application_and_quotes_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let apps = Apps::new(dir.path().to_owned(), dir.path().join("apps"));
        apps.start(&manifest(
            r#"
            [[app]]
            name = "broken"
            command = ["/bin/sh", "-c", "echo cannot open data/db: permission denied >&2; exit 2"]
            health = { tcp = "127.0.0.1:1" }
            "#,
        ));
        let err = apps
            .wait_healthy(tokio::time::Instant::now() + Duration::from_secs(10))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"broken\""), "{err}");
        assert!(err.contains("permission denied"), "{err}");
        apps.stop_all().await;
    }

    #[tokio::test]
    async fn a_stubborn_application_is_killed_after_its_stop_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let apps = Apps::new(dir.path().to_owned(), dir.path().join("apps"));
        apps.start(&manifest(
            r#"
            [[app]]
            name = "stubborn"
            command = ["/bin/sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"]
            stop_timeout_secs = 1
            "#,
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pid = apps.statuses()[0].pid.unwrap();
        let started = Instant::now();
        apps.stop_all().await;
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert!(!process_alive(pid));
    }

    #[test]
    fn orphans_are_found_by_their_pid_file_and_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let mut orphan = std::process::Command::new("/bin/sh");
        {
            use std::os::unix::process::CommandExt as _;
            orphan
                .args(["-c", "while true; do sleep 0.1; done"])
                .process_group(0);
        }
        let mut orphan = orphan.spawn().unwrap();
        let pid = orphan.id();
        write_pid_file(dir.path(), "left", pid, Duration::from_secs(5));
        // A pid file of a process long gone, and one of a pid now used by someone else.
        std::fs::write(dir.path().join("gone.pid"), "999999999 1 5\n").unwrap();
        std::fs::write(
            dir.path().join("reused.pid"),
            format!("{} 1 5\n", std::process::id()),
        )
        .unwrap();
        let stopped = stop_orphans(dir.path());
        assert_eq!(stopped, vec!["left".to_owned()]);
        let status = orphan.wait().unwrap();
        assert!(!status.success());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
