//! Unattended mode, for single-seat installs: the server updates itself from its feed,
//! inside a maintenance window, with the configured grace period. Off unless the config
//! turns it on.
//!
//! A release whose last changeover did not commit (refused, failed, rolled back) is not
//! tried again by itself, so a bad release cannot make the server update every night.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use changeover_protocol::ChangeoverOutcome;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::changeover::driver::{ChangeoverHandle, UpdateParams};
use crate::releases::Releases;

/// A daily window in UTC, `22:00-05:00` style; it may wrap past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start_minute: u32,
    end_minute: u32,
}

impl Window {
    pub fn parse(text: &str) -> Result<Window, String> {
        let minute = |part: &str| -> Result<u32, String> {
            let (hours, minutes) = part
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("{part:?} is not HH:MM"))?;
            let hours: u32 = hours
                .parse()
                .map_err(|_| format!("{part:?} is not HH:MM"))?;
            let minutes: u32 = minutes
                .parse()
                .map_err(|_| format!("{part:?} is not HH:MM"))?;
            if hours > 23 || minutes > 59 {
                return Err(format!("{part:?} is not a time of day"));
            }
            Ok(hours * 60 + minutes)
        };
        let (start, end) = text
            .split_once('-')
            .ok_or_else(|| format!("{text:?} is not a window such as 22:00-05:00"))?;
        Ok(Window {
            start_minute: minute(start)?,
            end_minute: minute(end)?,
        })
    }

    /// Whether `time` lies inside the window.
    pub fn contains(&self, time: SystemTime) -> bool {
        let seconds = time
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let minute = ((seconds / 60) % (24 * 60)) as u32;
        if self.start_minute <= self.end_minute {
            (self.start_minute..self.end_minute).contains(&minute)
        } else {
            minute >= self.start_minute || minute < self.end_minute
        }
    }
}

/// Looks for a newer release every `interval` and starts a changeover inside the window.
pub async fn run(
    window: Window,
    grace_secs: u64,
    interval: Duration,
    releases: Arc<Releases>,
    changeover: ChangeoverHandle,
    shutdown: CancellationToken,
) {
    info!(?window, grace_secs, "unattended updates are on");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if !window.contains(SystemTime::now()) || changeover.current().is_some() {
            continue;
        }
        releases.check_feed_if_older_than(interval / 2).await;
        let Some(available) = releases.available_version() else {
            continue;
        };
        let failed_before = changeover.last().is_some_and(|last| {
            last.target_version == available && last.outcome != ChangeoverOutcome::Committed
        });
        if failed_before {
            continue;
        }
        info!(version = %available, "a newer release is available: updating unattended");
        let params = UpdateParams {
            version: Some(available),
            grace_secs,
            notify: None,
            message: Some("Scheduled maintenance: the server is being updated.".to_owned()),
            at: None,
            allow_downgrade: false,
        };
        if let Err(refusal) = changeover.start(params).await {
            warn!(reason = %refusal.message, "the unattended update did not start");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hours: u64, minutes: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + hours * 3600 + minutes * 60)
    }

    #[test]
    fn windows_may_wrap_past_midnight() {
        let night = Window::parse("22:00-05:00").unwrap();
        assert!(night.contains(at(23, 30)));
        assert!(night.contains(at(0, 0)));
        assert!(night.contains(at(4, 59)));
        assert!(!night.contains(at(5, 0)));
        assert!(!night.contains(at(12, 0)));
        let lunch = Window::parse("12:00-13:00").unwrap();
        assert!(lunch.contains(at(12, 30)));
        assert!(!lunch.contains(at(13, 0)));
        assert!(Window::parse("25:00-01:00").is_err());
        assert!(Window::parse("nonsense").is_err());
    }
}
