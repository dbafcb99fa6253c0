//! Telling a service manager how the server is doing (systemd's `sd_notify` protocol, for
//! `Type=notify` units): `READY=1` once the server serves (again, after a changeover's
//! verdict), `WATCHDOG=1` pings at half the unit's `WatchdogSec` so a hung server is
//! killed and restarted, `STOPPING=1` on the way out. Without `NOTIFY_SOCKET` all of this
//! does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The variables of the protocol, which the applications the server starts must not see.
pub const NOTIFY_ENV: [&str; 4] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "INVOCATION_ID",
];

/// The server serves: `status` says how.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The server is on its way out.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(states) {
        warn!(cause = %err, "cannot notify the service manager");
    }
}

/// Pings the service manager's watchdog until `shutdown`, if the unit asks for it.
pub fn spawn_watchdog_pings(shutdown: CancellationToken) {
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
                _ = ticks.tick() => send(&[NotifyState::Watchdog]),
            }
        }
    });
}
