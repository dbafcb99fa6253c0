//! What the agent does for the user when the server announces an update: a line in the
//! log, a desktop notification where one is available (`notify-send`; a toast on Windows),
//! and the site's own hooks.
//!
//! Hooks run through `sh -c` (on Windows `cmd /V:ON /S /C`, the command line as written)
//! with the event's details in the environment
//! (`CHANGEOVER_DEADLINE`, `CHANGEOVER_TARGET_VERSION`, `CHANGEOVER_MESSAGE`,
//! `CHANGEOVER_SECONDS_LEFT`, `CHANGEOVER_EVENT`). The logout hook is how the client
//! application is closed, so the agent waits for it (a bounded time). The ask hook
//! (`CHANGEOVER_EVENT=ask`) decides on the agent's own update by its exit status.

use std::time::Duration;

use tracing::{info, warn};

/// How long the agent waits for a hook.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// The commands the site configured.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub warn: Option<String>,
    pub logout: Option<String>,
}

/// The details a hook gets.
#[derive(Debug, Clone)]
pub struct HookEvent {
    pub event: &'static str,
    pub deadline: String,
    pub seconds_left: u64,
    pub target_version: String,
    pub message: String,
}

impl Hooks {
    pub async fn on_warning(&self, event: &HookEvent) {
        notify_desktop(event);
        if let Some(command) = &self.warn {
            run(command, event).await;
        }
    }

    pub async fn on_logout(&self, event: &HookEvent) {
        if let Some(command) = &self.logout {
            run(command, event).await;
        }
    }
}

async fn run(command: &str, event: &HookEvent) {
    match run_for_status(command, event).await {
        Ok(status) if status.success() => info!(hook = event.event, "hook ran"),
        Ok(status) => warn!(hook = event.event, %status, "hook failed"),
        Err(reason) => warn!(hook = event.event, %reason, "hook did not run"),
    }
}

/// Runs a hook and waits for it (at most [`HOOK_TIMEOUT`]); its exit status, or why
/// there is none.
pub async fn run_for_status(
    command: &str,
    event: &HookEvent,
) -> Result<std::process::ExitStatus, String> {
    let mut child = shell(command);
    child
        .env("CHANGEOVER_EVENT", event.event)
        .env("CHANGEOVER_DEADLINE", &event.deadline)
        .env("CHANGEOVER_SECONDS_LEFT", event.seconds_left.to_string())
        .env("CHANGEOVER_TARGET_VERSION", &event.target_version)
        .env("CHANGEOVER_MESSAGE", &event.message)
        // An agent a hook starts is another instance, not this one.
        .env_remove(crate::identity::INSTANCE_ENV)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(HOOK_TIMEOUT, child.status()).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(err)) => Err(format!("cannot run it: {err}")),
        Err(_) => Err(format!(
            "it did not finish within {} s",
            HOOK_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(not(windows))]
fn shell(command: &str) -> tokio::process::Command {
    let mut shell = tokio::process::Command::new("sh");
    shell.arg("-c").arg(command);
    shell
}

// cmd has its own quoting: the command goes as written inside one pair of quotes, which
// `/S` strips and nothing else, so quoted paths and arguments in it stay as they are.
// `/V:ON` lets a hook read text from the server as `!CHANGEOVER_MESSAGE!`, expanded after
// the line is parsed, so `&` or `|` in it are never taken as commands (`%VAR%` is expanded
// before).
#[cfg(windows)]
fn shell(command: &str) -> tokio::process::Command {
    let mut shell = tokio::process::Command::new("cmd");
    shell.raw_arg(format!("/V:ON /S /C \"{command}\""));
    shell
}

// Best effort: `notify-send` where a desktop is there; nothing happens otherwise.
#[cfg(not(windows))]
fn notify_desktop(event: &HookEvent) {
    let spawned = std::process::Command::new("notify-send")
        .arg(format!("Server update in {} s", event.seconds_left))
        .arg(&event.message)
        .env_remove(crate::identity::INSTANCE_ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Ok(mut child) = spawned {
        std::thread::spawn(move || child.wait());
    }
}

// Best effort: a Windows notification (toast) where the session has a desktop; without
// one (a service, Wine) the error is only logged.
#[cfg(windows)]
fn notify_desktop(event: &HookEvent) {
    use tauri_winrt_notification::{Duration, Toast};

    let title = format!("Server update in {} s", event.seconds_left);
    let message = event.message.clone();
    std::thread::spawn(move || {
        let shown = Toast::new(Toast::POWERSHELL_APP_ID)
            .title(&title)
            .text1(&message)
            .duration(Duration::Long)
            .show();
        if let Err(err) = shown {
            tracing::debug!(cause = %err, "no desktop notification");
        }
    });
}
