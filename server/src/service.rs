//! Telling a service manager how the server is doing.
//!
//! - systemd (`sd_notify`, for `Type=notify` units): `READY=1` once the server serves
//!   (again, after a changeover's verdict), `WATCHDOG=1` pings at half the unit's
//!   `WatchdogSec` so a hung server is killed and restarted, `STOPPING=1` on the way out.
//!   Without `NOTIFY_SOCKET` all of this does nothing.
//! - The Windows service manager: running once the server serves, stop pending on the way
//!   out, stopped with the exit code at the end (`platform::windows_service`).

#[cfg(target_os = "linux")]
use std::time::Duration;

use tokio_util::sync::CancellationToken;
#[cfg(target_os = "linux")]
use tracing::{debug, warn};

/// The variables of the systemd protocol, which the applications the server starts must not
/// see.
pub const NOTIFY_ENV: [&str; 4] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "INVOCATION_ID",
];

/// The server serves: `status` says how.
pub fn ready(status: &str) {
    #[cfg(target_os = "linux")]
    send(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    #[cfg(windows)]
    {
        let _ = status;
        crate::platform::windows_service::report(
            windows_service::service::ServiceState::Running,
            windows_service::service::ServiceExitCode::Win32(0),
        );
    }
    #[cfg(not(any(target_os = "linux", windows)))]
    let _ = status;
}

/// The server is on its way out.
pub fn stopping() {
    #[cfg(target_os = "linux")]
    send(&[sd_notify::NotifyState::Stopping]);
    #[cfg(windows)]
    crate::platform::windows_service::report(
        windows_service::service::ServiceState::StopPending,
        windows_service::service::ServiceExitCode::Win32(0),
    );
}

#[cfg(target_os = "linux")]
fn send(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(states) {
        warn!(cause = %err, "cannot notify the service manager");
    }
}

/// Pings the service manager's watchdog until `shutdown`, if the unit asks for it (systemd
/// only; the Windows service manager has no watchdog).
pub fn spawn_watchdog_pings(shutdown: CancellationToken) {
    #[cfg(target_os = "linux")]
    {
        let Some(interval) = sd_notify::watchdog_enabled() else {
            return;
        };
        let every = (interval / 2).max(Duration::from_millis(100));
        debug!(
            every_ms = every.as_millis() as u64,
            "pinging the service manager's watchdog"
        );
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = ticks.tick() => send(&[sd_notify::NotifyState::Watchdog]),
                }
            }
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = shutdown;
}

/// Whether this process is a running Windows service.
pub fn is_windows_service() -> bool {
    #[cfg(windows)]
    return crate::platform::windows_service::is_service();
    #[cfg(not(windows))]
    false
}

/// The Windows service this process runs as, if it is one.
pub fn windows_service_name() -> Option<String> {
    #[cfg(windows)]
    return crate::platform::windows_service::running_service_name();
    #[cfg(not(windows))]
    None
}

/// Ends this process now with `code`, after telling the Windows service manager that the
/// service stopped (when it is one).
pub fn exit_now(code: i32) -> ! {
    #[cfg(windows)]
    crate::platform::windows_service::report(
        windows_service::service::ServiceState::Stopped,
        windows_service::service::ServiceExitCode::Win32(u32::try_from(code).unwrap_or(1)),
    );
    std::process::exit(code)
}

/// Under the Windows service manager: has `binary` (the release now installed) restart the
/// service once this process has ended, from a process of its own (`service restart`).
#[cfg(windows)]
pub fn restart_service_with(binary: &std::path::Path) -> anyhow::Result<()> {
    let Some(service) = crate::platform::windows_service::running_service_name() else {
        anyhow::bail!("this process is not a Windows service");
    };
    let mut command = std::process::Command::new(binary);
    command
        .args([
            "service",
            "restart",
            "--service-name",
            &service,
            "--after-pid",
        ])
        .arg(std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    crate::platform::spawn_detached(&mut command)?;
    Ok(())
}

/// Runs `serve` as the Windows service for the install `name` when `as_service` (the
/// hidden `run --as-service` that `service install` puts in the service's command line)
/// says the service manager started this process, else as a console program.
///
/// Only a service start asks the dispatcher: for a console program its answer ("not a
/// service") can take long (10 s under Wine, its control pipe's timeout). A service
/// started by hand without the flag still runs, as a console program, and the service
/// manager gives up on it after its start timeout.
pub fn run_under_any_manager(
    name: &str,
    as_service: bool,
    serve: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<()> {
    if !as_service {
        return serve();
    }
    #[cfg(windows)]
    {
        use std::sync::{Arc, Mutex};
        // The dispatcher takes the closure only when it is a service; keep it for a
        // console start otherwise.
        let slot = Arc::new(Mutex::new(Some(serve)));
        let for_service = Arc::clone(&slot);
        let service = crate::platform::windows_service::service_name(name);
        let ran =
            crate::platform::windows_service::run_as_service(&service, move || match for_service
                .lock()
                .ok()
                .and_then(|mut serve| serve.take())
            {
                Some(serve) => serve(),
                None => Ok(()),
            })?;
        if ran {
            return Ok(());
        }
        let serve = slot.lock().ok().and_then(|mut serve| serve.take());
        match serve {
            Some(serve) => serve(),
            None => Ok(()),
        }
    }
    #[cfg(not(windows))]
    {
        let _ = (name, serve);
        anyhow::bail!("--as-service is for the Windows service manager only")
    }
}

/// What `changeover-server service …` does.
#[derive(Debug, Clone)]
pub enum ServiceAction {
    Install {
        root: std::path::PathBuf,
        name: String,
    },
    Uninstall {
        root: std::path::PathBuf,
        name: String,
    },
    Restart {
        service_name: String,
        after_pid: u32,
    },
}

/// Registers, removes or restarts the Windows service; elsewhere says what to use instead.
pub fn command(action: ServiceAction) -> anyhow::Result<()> {
    #[cfg(windows)]
    {
        use crate::platform::windows_service as scm;
        match action {
            ServiceAction::Install { root, name } => {
                crate::layout::check_install_name(&name)?;
                let root = std::path::absolute(&root)
                    .map_err(|err| anyhow::anyhow!("cannot resolve {}: {err}", root.display()))?;
                let service = scm::install(&root, &name)?;
                println!(
                    "installed the service {service}; start it with `sc start {service}` or \
                     `net start {service}` (it starts with the machine from now on)"
                );
                Ok(())
            }
            ServiceAction::Uninstall { root, name } => {
                let _ = root;
                crate::layout::check_install_name(&name)?;
                let service = scm::uninstall(&name)?;
                println!("removed the service {service}; the install is left as it is");
                Ok(())
            }
            ServiceAction::Restart {
                service_name,
                after_pid,
            } => {
                let started = std::time::Instant::now();
                while crate::platform::process_alive(after_pid)
                    && started.elapsed() < std::time::Duration::from_secs(60)
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                scm::wait_for_state(
                    &service_name,
                    windows_service::service::ServiceState::Stopped,
                    std::time::Duration::from_secs(60),
                )?;
                scm::start(&service_name).map(|_| ())
            }
        }
    }
    #[cfg(not(windows))]
    {
        let _ = action;
        anyhow::bail!(
            "`service install|uninstall` registers a Windows service; on Linux use the systemd \
             unit in packaging/ (see README), on macOS the launchd job in packaging/macos/"
        )
    }
}
