//! The server as a Windows service: registering it (`service install|uninstall`), the
//! dispatcher and control handler a service process must have, the status reports the
//! service manager expects (start pending → running → stop pending → stopped, with the exit
//! code), and starting and stopping the service from a helper process during a changeover.
//!
//! `service install` puts the hidden `--as-service` in the service's command line; only
//! then does `run` connect to the dispatcher. A console start never asks (Wine answers
//! "not a service" only after a 10 s timeout), and if the dispatcher still answers
//! `ERROR_FAILED_SERVICE_CONTROLLER_CONNECT` the server runs as a console program.

use std::ffi::OsString;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tracing::{info, warn};
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

/// What `ERROR_FAILED_SERVICE_CONTROLLER_CONNECT` says: not started by the service manager.
const NOT_A_SERVICE: i32 = 1063;

/// How long the service manager is told a start or a stop may take before it gives up.
const WAIT_HINT: Duration = Duration::from_secs(60);

/// The service's name for an install: `changeover-<name>` (`changeover-server` by default).
pub fn service_name(install_name: &str) -> String {
    format!("changeover-{install_name}")
}

type ServeFn = Box<dyn FnOnce() -> anyhow::Result<()> + Send>;

struct Running {
    name: String,
    handle: Option<service_control_handler::ServiceStatusHandle>,
    checkpoint: u32,
}

static SERVE: Mutex<Option<ServeFn>> = Mutex::new(None);
static SERVICE: OnceLock<Mutex<Running>> = OnceLock::new();

define_windows_service!(ffi_service_main, service_main);

/// Runs `serve` as the service `name` if the service manager started this process, and
/// returns `Ok(false)` at once if it did not (a console start).
pub fn run_as_service(
    name: &str,
    serve: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<bool> {
    if let Ok(mut slot) = SERVE.lock() {
        *slot = Some(Box::new(serve));
    }
    let _ = SERVICE.set(Mutex::new(Running {
        name: name.to_owned(),
        handle: None,
        checkpoint: 0,
    }));
    match service_dispatcher::start(name, ffi_service_main) {
        Ok(()) => Ok(true),
        Err(windows_service::Error::Winapi(err)) if err.raw_os_error() == Some(NOT_A_SERVICE) => {
            Ok(false)
        }
        Err(err) => Err(anyhow::anyhow!(
            "cannot connect to the service manager: {err}"
        )),
    }
}

/// Whether this process is the running service.
pub fn is_service() -> bool {
    SERVICE
        .get()
        .and_then(|running| running.lock().ok().map(|running| running.handle.is_some()))
        .unwrap_or(false)
}

/// This process's service name, when it is the running service.
pub fn running_service_name() -> Option<String> {
    let running = SERVICE.get()?.lock().ok()?;
    running.handle.is_some().then(|| running.name.clone())
}

fn service_main(_arguments: Vec<OsString>) {
    let name = match SERVICE.get().and_then(|running| running.lock().ok()) {
        Some(running) => running.name.clone(),
        None => return,
    };
    let handler = move |control| {
        let answer = answer(control);
        if answer.stop {
            report(ServiceState::StopPending, ServiceExitCode::Win32(0));
            super::request_stop();
        }
        if answer.implemented {
            ServiceControlHandlerResult::NoError
        } else {
            ServiceControlHandlerResult::NotImplemented
        }
    };
    let handle = match service_control_handler::register(&name, handler) {
        Ok(handle) => handle,
        Err(err) => {
            tracing::error!(cause = %err, "cannot register the service control handler");
            return;
        }
    };
    if let Some(mut running) = SERVICE.get().and_then(|running| running.lock().ok()) {
        running.handle = Some(handle);
    }
    report(ServiceState::StartPending, ServiceExitCode::Win32(0));
    let serve = SERVE.lock().ok().and_then(|mut slot| slot.take());
    let result = match serve {
        Some(serve) => serve(),
        None => Err(anyhow::anyhow!("nothing to run")),
    };
    let code = match &result {
        Ok(()) => ServiceExitCode::Win32(0),
        Err(err) => {
            tracing::error!(cause = %format!("{err:#}"), "the service ends with an error");
            ServiceExitCode::ServiceSpecific(1)
        }
    };
    report(ServiceState::Stopped, code);
}

/// What the control handler does with a control from the service manager.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    /// Stop as on SIGTERM, reporting stop pending first.
    stop: bool,
    /// Whether the control is one this service takes (else "not implemented").
    implemented: bool,
}

fn answer(control: ServiceControl) -> Answer {
    match control {
        ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => Answer {
            stop: true,
            implemented: true,
        },
        // "Are you there?": the last status reported stands.
        ServiceControl::Interrogate => Answer {
            stop: false,
            implemented: true,
        },
        _ => Answer {
            stop: false,
            implemented: false,
        },
    }
}

/// The status to report for `state`, after `checkpoint` (the last one reported): pending
/// states count their checkpoint up and give a wait hint, so a long start or stop is not
/// taken for a hang; only a running service takes stop and shutdown.
fn status_for(state: ServiceState, exit_code: ServiceExitCode, checkpoint: u32) -> ServiceStatus {
    let pending = matches!(
        state,
        ServiceState::StartPending | ServiceState::StopPending
    );
    let controls_accepted = match state {
        ServiceState::Running => ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN,
        _ => ServiceControlAccept::empty(),
    };
    ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted,
        exit_code,
        checkpoint: if pending { checkpoint + 1 } else { 0 },
        wait_hint: if pending { WAIT_HINT } else { Duration::ZERO },
        process_id: None,
    }
}

/// Tells the service manager the service's state (nothing when not a service).
pub fn report(state: ServiceState, exit_code: ServiceExitCode) {
    let Some(mut running) = SERVICE.get().and_then(|running| running.lock().ok()) else {
        return;
    };
    let Some(handle) = running.handle else {
        return;
    };
    let status = status_for(state, exit_code, running.checkpoint);
    running.checkpoint = status.checkpoint;
    if let Err(err) = handle.set_service_status(status) {
        warn!(cause = %err, "cannot report the service status");
    }
}

/// Registers the server of `root`/`name` as a service that starts with the machine and is
/// restarted by the service manager if it crashes.
pub fn install(root: &Path, name: &str) -> anyhow::Result<String> {
    let service = service_name(name);
    let binary = crate::layout::Layout::named(root, name)
        .install_dir()
        .join(changeover_protocol::release::ReleaseKind::Server.binary_path_for("windows"));
    if !binary.is_file() {
        bail!(
            "{} is not there: install the server first (changeover-server install)",
            binary.display()
        );
    }
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .context("cannot open the service manager (run this as an administrator)")?;
    let info = ServiceInfo {
        name: service.clone().into(),
        display_name: format!("Changeover server ({name})").into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: binary,
        launch_arguments: vec![
            "run".into(),
            "--root".into(),
            root.as_os_str().to_owned(),
            "--name".into(),
            name.into(),
            "--as-service".into(),
        ],
        dependencies: Vec::new(),
        account_name: None,
        account_password: None,
    };
    let created = manager
        .create_service(
            &info,
            ServiceAccess::CHANGE_CONFIG | ServiceAccess::START | ServiceAccess::QUERY_STATUS,
        )
        .with_context(|| format!("cannot create the service {service}"))?;
    if let Err(err) = created.set_description(
        "The application server; updates itself with changeover-agent admin update.",
    ) {
        warn!(cause = %err, "cannot set the service's description");
    }
    let restart = |seconds| ServiceAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(seconds),
    };
    let actions = ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(86_400)),
        reboot_msg: None,
        command: None,
        actions: Some(vec![restart(5), restart(10), restart(30)]),
    };
    if let Err(err) = created.update_failure_actions(actions) {
        warn!(cause = %err, "cannot set the service's restart on failure");
    }
    info!(%service, "service installed");
    Ok(service)
}

/// Stops the service if it runs, then removes it.
pub fn uninstall(name: &str) -> anyhow::Result<String> {
    let service = service_name(name);
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .context("cannot open the service manager (run this as an administrator)")?;
    let opened = manager
        .open_service(
            &service,
            ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
        )
        .with_context(|| format!("there is no service {service}"))?;
    if opened.query_status()?.current_state != ServiceState::Stopped {
        let _ = opened.stop();
        wait_for_state(&service, ServiceState::Stopped, WAIT_HINT)?;
    }
    opened
        .delete()
        .with_context(|| format!("cannot remove the service {service}"))?;
    Ok(service)
}

/// The service's state and process id.
pub fn status(service: &str) -> anyhow::Result<(ServiceState, Option<u32>)> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)?;
    let opened = manager.open_service(service, ServiceAccess::QUERY_STATUS)?;
    let status = opened.query_status()?;
    Ok((status.current_state, status.process_id))
}

/// Asks the service manager to stop the service, unless it is stopped already.
pub fn stop(service: &str) -> anyhow::Result<()> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)?;
    let opened =
        manager.open_service(service, ServiceAccess::QUERY_STATUS | ServiceAccess::STOP)?;
    if opened.query_status()?.current_state != ServiceState::Stopped {
        opened
            .stop()
            .with_context(|| format!("cannot stop the service {service}"))?;
    }
    Ok(())
}

/// Asks the service manager to start the service. The service reports itself running only
/// once it is healthy, and the manager names its process only then: the caller finds the
/// process through the pid file the server writes as it starts.
pub fn start(service: &str) -> anyhow::Result<()> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)?;
    let opened = manager.open_service(service, ServiceAccess::START)?;
    opened
        .start::<&str>(&[])
        .with_context(|| format!("cannot start the service {service}"))
}

/// Waits until the service is in `state`.
pub fn wait_for_state(
    service: &str,
    state: ServiceState,
    patience: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let (now, _) = status(service)?;
        if now == state {
            return Ok(());
        }
        if started.elapsed() > patience {
            bail!(
                "the service {service} is {now:?}, not {state:?}, after {} s",
                patience.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_and_shutdown_stop_the_server_interrogate_answers_and_the_rest_is_refused() {
        for control in [
            ServiceControl::Stop,
            ServiceControl::Shutdown,
            ServiceControl::Preshutdown,
        ] {
            let answer = answer(control);
            assert!(answer.stop && answer.implemented, "{control:?}");
        }
        assert_eq!(
            answer(ServiceControl::Interrogate),
            Answer {
                stop: false,
                implemented: true
            }
        );
        for control in [
            ServiceControl::Pause,
            ServiceControl::Continue,
            ServiceControl::ParamChange,
        ] {
            assert_eq!(
                answer(control),
                Answer {
                    stop: false,
                    implemented: false
                },
                "{control:?}"
            );
        }
    }

    #[test]
    fn pending_states_count_up_and_only_a_running_service_takes_a_stop() {
        let ok = ServiceExitCode::Win32(0);
        let first = status_for(ServiceState::StartPending, ok, 0);
        assert_eq!(first.checkpoint, 1);
        assert_eq!(first.wait_hint, WAIT_HINT);
        assert!(first.controls_accepted.is_empty());
        let second = status_for(ServiceState::StartPending, ok, first.checkpoint);
        assert_eq!(second.checkpoint, 2);

        let running = status_for(ServiceState::Running, ok, second.checkpoint);
        assert_eq!(running.checkpoint, 0);
        assert_eq!(running.wait_hint, Duration::ZERO);
        assert_eq!(
            running.controls_accepted,
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
        );

        let stopping = status_for(ServiceState::StopPending, ok, running.checkpoint);
        assert_eq!(stopping.checkpoint, 1);
        assert!(stopping.controls_accepted.is_empty());
        let failed = status_for(
            ServiceState::Stopped,
            ServiceExitCode::ServiceSpecific(1),
            stopping.checkpoint,
        );
        assert_eq!(failed.checkpoint, 0);
        assert_eq!(failed.exit_code, ServiceExitCode::ServiceSpecific(1));
        assert!(failed.controls_accepted.is_empty());
    }
}
