//! What the agent does for the user when the server announces an update: a line in the
//! log, a desktop notification where the session has a desktop (D-Bus on Linux and the
//! BSDs, Notification Center on macOS, a toast on Windows), and the site's own hooks. The
//! user's texts come from [`crate::i18n`], in the user's language.
//!
//! Hooks run through `sh -c` (on Windows `cmd /V:ON /S /C`, the command line as written)
//! with the event's details in the environment
//! (`CHANGEOVER_DEADLINE`, `CHANGEOVER_TARGET_VERSION`, `CHANGEOVER_MESSAGE`,
//! `CHANGEOVER_SECONDS_LEFT`, `CHANGEOVER_EVENT`). The logout hook is how the client
//! application is closed, so the agent waits for it (a bounded time). The ask hook
//! (`CHANGEOVER_EVENT=ask`) decides on the agent's own update by its exit status.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::i18n::{Catalogue, Language};

/// How long the agent waits for a hook.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a desktop notification may take to be handed over; after that it is given up
/// (a session bus that hangs must not pile up tasks).
#[cfg(unix)]
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// The commands the site configured, and the user's texts.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub warn: Option<String>,
    pub logout: Option<String>,
    /// The user's language: every text the user sees (hooks, notifications) comes from it.
    pub texts: Arc<Catalogue>,
    /// The desktop notification shown last.
    desktop: Desktop,
}

/// The details a hook gets.
#[derive(Debug, Clone)]
pub struct HookEvent {
    pub event: &'static str,
    pub deadline: String,
    pub seconds_left: u64,
    pub target_version: String,
    /// The text for the user, in the user's language (`CHANGEOVER_MESSAGE`, the desktop
    /// notification); the same text wherever else the agent shows the event.
    pub message: String,
}

impl Hooks {
    /// The site's hooks, with the user's texts in `language`.
    pub fn new(warn: Option<String>, logout: Option<String>, language: Language) -> Hooks {
        info!(language = language.code(), "texts for the user");
        Hooks {
            warn,
            logout,
            texts: Arc::new(Catalogue::new(language)),
            desktop: Desktop::default(),
        }
    }

    pub async fn on_warning(&self, event: &HookEvent) {
        notify_desktop(
            &self.desktop,
            &self.texts.notification_title(),
            &event.message,
        );
        if let Some(command) = &self.warn {
            run(command, event).await;
        }
    }

    /// The announced update was called off: the user hears it; no hook runs.
    pub fn on_cancelled(&self, event: &HookEvent) {
        notify_desktop(
            &self.desktop,
            &self.texts.notification_title(),
            &event.message,
        );
    }

    pub async fn on_logout(&self, event: &HookEvent) {
        notify_desktop(
            &self.desktop,
            &self.texts.notification_title(),
            &event.message,
        );
        if let Some(command) = &self.logout {
            run(command, event).await;
        }
    }
}

/// What the agent keeps of its desktop notifications.
#[derive(Debug, Clone, Default)]
struct Desktop {
    /// The id the notification server gave the last one: the next replaces it, so a
    /// countdown is one notification that changes, not a pile of five.
    #[cfg(all(unix, not(target_os = "macos")))]
    last_id: Arc<std::sync::Mutex<Option<u32>>>,
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

// Best effort, and never in the agent's way: over the session bus (zbus on the agent's
// runtime, so nothing blocks), given up after a few seconds. Without a desktop or a session
// bus (a server, a service, ssh) there is only a debug line.
#[cfg(all(unix, not(target_os = "macos")))]
fn notify_desktop(desktop: &Desktop, title: &str, body: &str) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::debug!("no desktop notification outside the agent's runtime");
        return;
    };
    let mut notification = notify_rust::Notification::new();
    notification
        .appname("Changeover")
        .summary(title)
        .body(&escape_markup(body));
    let replaces = desktop.last_id.lock().map_or(None, |last| *last);
    if let Some(id) = replaces {
        notification.id(id);
    }
    let last_id = Arc::clone(&desktop.last_id);
    runtime.spawn(async move {
        match tokio::time::timeout(NOTIFY_TIMEOUT, notification.show_async()).await {
            Ok(Ok(shown)) => {
                if let Ok(mut last) = last_id.lock() {
                    *last = Some(shown.id());
                }
            }
            Ok(Err(err)) => tracing::debug!(cause = %err, "no desktop notification"),
            Err(_) => tracing::debug!(
                "no desktop notification: the session bus did not answer within {} s",
                NOTIFY_TIMEOUT.as_secs()
            ),
        }
    });
}

// Notification servers read the body as a little markup (`<b>`, `&amp;`): the admin's words
// are shown as written.
#[cfg(all(unix, not(target_os = "macos")))]
fn escape_markup(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

// Best effort: Notification Center, on a blocking thread since it answers synchronously,
// given up after a few seconds; without a user session only a debug line.
#[cfg(target_os = "macos")]
fn notify_desktop(_desktop: &Desktop, title: &str, body: &str) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::debug!("no desktop notification outside the agent's runtime");
        return;
    };
    let mut notification = notify_rust::Notification::new();
    notification.summary(title).body(body);
    runtime.spawn(async move {
        let shown = tokio::task::spawn_blocking(move || {
            notification
                .show()
                .map(|_| ())
                .map_err(|err| err.to_string())
        });
        match tokio::time::timeout(NOTIFY_TIMEOUT, shown).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(cause))) => tracing::debug!(%cause, "no desktop notification"),
            Ok(Err(err)) => tracing::debug!(cause = %err, "no desktop notification"),
            Err(_) => tracing::debug!("no desktop notification within a few seconds"),
        }
    });
}

// Best effort: a Windows notification (toast) where the session has a desktop; without
// one (a service, Wine) the error is only logged.
#[cfg(windows)]
fn notify_desktop(_desktop: &Desktop, title: &str, body: &str) {
    use tauri_winrt_notification::{Duration, Toast};

    let title = title.to_owned();
    let message = body.to_owned();
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[cfg(not(target_os = "macos"))]
    #[test]
    fn the_admin_s_words_are_not_read_as_markup() {
        assert_eq!(
            escape_markup("Back <5 min> & <b>soon</b>"),
            "Back &lt;5 min&gt; &amp; &lt;b&gt;soon&lt;/b&gt;"
        );
    }

    // No session bus (as on a server, or here): the notification is given up quietly and
    // the hook still runs at once.
    #[tokio::test]
    async fn a_warning_without_a_desktop_still_runs_the_hook_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("hook.txt");
        let hooks = Hooks::new(
            Some(format!(
                "echo \"$CHANGEOVER_MESSAGE\" > '{}'",
                out.display()
            )),
            None,
            Language::German,
        );
        let event = HookEvent {
            event: "warning",
            deadline: "2026-11-28T12:32:08Z".to_owned(),
            seconds_left: 120,
            target_version: "2.4.0".to_owned(),
            message: hooks.texts.warning(
                "2.4.0",
                120,
                std::time::SystemTime::now() + Duration::from_secs(120),
                None,
            ),
        };
        let started = std::time::Instant::now();
        hooks.on_warning(&event).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        let written = std::fs::read_to_string(&out).unwrap();
        assert!(written.contains("auf Version 2.4.0"), "{written}");
    }
}
