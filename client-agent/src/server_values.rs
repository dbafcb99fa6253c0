//! The numbers and times a server sends, brought into ranges the agent can act on.
//!
//! The agent trusts its server to coordinate updates, not to be sane: a broken or hostile
//! one may send `u64::MAX` for a heartbeat, or a deadline in the year 9999. Every such value
//! the agent acts on goes through one function here, which keeps it within a fixed range
//! and logs a warning that names the value it refused, so the agent never overflows a
//! `Duration` or a clock and support can read what the server asked for.
//!
//! Not here: the offered agent archive (sizes, paths, names), which `offer` screens.

use std::time::{Duration, SystemTime};

use tracing::warn;

/// The shortest heartbeat the agent follows: faster would be a busy loop.
pub const MIN_HEARTBEAT_SECS: u64 = 1;

/// The longest heartbeat the agent follows: a dead connection is noticed within two
/// intervals, and more than two hours of not noticing is not a heartbeat any more.
pub const MAX_HEARTBEAT_SECS: u64 = 60 * 60;

/// The longest window after a forced logout within which the agent comes back. The server
/// spreads its fleet over a few seconds for small sites and longer for large ones; ten
/// minutes covers every fleet it is built for.
pub const MAX_RECONNECT_WINDOW_MS: u64 = 10 * 60 * 1000;

/// The longest pause a server's `retry_after_secs` can impose before the agent tries again.
pub const MAX_RETRY_AFTER_SECS: u64 = 60 * 60;

/// The furthest a countdown warning may reach: its `seconds_left`, and its deadline from
/// now. A countdown lasts at most an hour today; a day leaves room for newer servers and
/// skewed clocks.
pub const MAX_WARNING_LEAD_SECS: u64 = 24 * 60 * 60;

/// The last second humantime can format (the end of the year 9999).
const LAST_FORMATTABLE_SECS: u64 = 253_402_300_799;

/// The heartbeat interval of a welcome: 1 s to 1 h.
pub fn heartbeat(asked_secs: u64) -> Duration {
    let used = asked_secs.clamp(MIN_HEARTBEAT_SECS, MAX_HEARTBEAT_SECS);
    if used != asked_secs {
        warn!(
            asked_secs,
            used_secs = used,
            "the server asked for a heartbeat of {asked_secs} s; using {used} s"
        );
    }
    Duration::from_secs(used)
}

/// The window of a logout's `reconnect_within_ms`: at most 10 minutes.
pub fn reconnect_window(asked_ms: u64) -> Duration {
    let used = asked_ms.min(MAX_RECONNECT_WINDOW_MS);
    if used != asked_ms {
        warn!(
            asked_ms,
            used_ms = used,
            "the server asked to reconnect within {asked_ms} ms; using {used} ms"
        );
    }
    Duration::from_millis(used)
}

/// The pause of an error's `retry_after_secs`: at most an hour.
pub fn retry_after(asked_secs: u64) -> Duration {
    let used = asked_secs.min(MAX_RETRY_AFTER_SECS);
    if used != asked_secs {
        warn!(
            asked_secs,
            used_secs = used,
            "the server asked to retry after {asked_secs} s; using {used} s"
        );
    }
    Duration::from_secs(used)
}

/// A countdown warning's deadline and seconds left, as the agent passes them on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Countdown {
    pub deadline: SystemTime,
    pub seconds_left: u64,
}

/// A warning's countdown within a day of `now`. A deadline further away (either way) than
/// a day is replaced by `now + seconds_left`: the server's clock may be off, but not by
/// that much, and the hooks get a time they can use.
pub fn countdown(deadline: SystemTime, seconds_left: u64, now: SystemTime) -> Countdown {
    let lead = Duration::from_secs(MAX_WARNING_LEAD_SECS);
    let seconds = seconds_left.min(MAX_WARNING_LEAD_SECS);
    if seconds != seconds_left {
        warn!(
            asked_secs = seconds_left,
            used_secs = seconds,
            "the server's warning has {seconds_left} seconds left; using {seconds} s"
        );
    }
    let distance = match deadline.duration_since(now) {
        Ok(ahead) => ahead,
        Err(behind) => behind.duration(),
    };
    let deadline = if distance <= lead {
        deadline
    } else {
        let used = now.checked_add(Duration::from_secs(seconds)).unwrap_or(now);
        warn!(
            asked = %rfc3339(deadline),
            used = %rfc3339(used),
            "the server's warning has the deadline {}, more than a day from now; using {}",
            rfc3339(deadline),
            rfc3339(used)
        );
        used
    };
    Countdown {
        deadline,
        seconds_left: seconds,
    }
}

/// RFC 3339 in UTC for any time, never panicking: a time before 1970 shows as the epoch,
/// one after the year 9999 as its last second (humantime formats neither).
pub fn rfc3339(time: SystemTime) -> String {
    let last = SystemTime::UNIX_EPOCH + Duration::from_secs(LAST_FORMATTABLE_SECS);
    let shown = if time < SystemTime::UNIX_EPOCH {
        SystemTime::UNIX_EPOCH
    } else if time > last {
        last
    } else {
        time
    };
    humantime::format_rfc3339_seconds(shown).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_stay_between_a_second_and_an_hour() {
        assert_eq!(heartbeat(u64::MAX), Duration::from_secs(3600));
        assert_eq!(heartbeat(3601), Duration::from_secs(3600));
        assert_eq!(heartbeat(0), Duration::from_secs(1));
        assert_eq!(heartbeat(15), Duration::from_secs(15));
        // What the session loop adds to it must not overflow either.
        let silence = heartbeat(u64::MAX) * 2 + Duration::from_secs(5);
        assert!(tokio::time::Instant::now().checked_add(silence).is_some());
    }

    #[test]
    fn reconnect_windows_and_retry_pauses_are_capped() {
        assert_eq!(reconnect_window(u64::MAX), Duration::from_secs(600));
        assert_eq!(reconnect_window(2_000), Duration::from_secs(2));
        assert_eq!(reconnect_window(0), Duration::ZERO);
        assert_eq!(retry_after(u64::MAX), Duration::from_secs(3600));
        assert_eq!(retry_after(30), Duration::from_secs(30));
    }

    #[test]
    fn countdowns_stay_within_a_day() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let sane = countdown(now + Duration::from_secs(120), 120, now);
        assert_eq!(
            sane,
            Countdown {
                deadline: now + Duration::from_secs(120),
                seconds_left: 120
            }
        );
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(LAST_FORMATTABLE_SECS);
        let clamped = countdown(far, u64::MAX, now);
        assert_eq!(clamped.seconds_left, MAX_WARNING_LEAD_SECS);
        assert_eq!(
            clamped.deadline,
            now + Duration::from_secs(MAX_WARNING_LEAD_SECS)
        );
        let long_ago = countdown(SystemTime::UNIX_EPOCH, 60, now);
        assert_eq!(long_ago.deadline, now + Duration::from_secs(60));
        // A small skew of the server's clock is left alone.
        let skewed = countdown(now - Duration::from_secs(30), 90, now);
        assert_eq!(skewed.deadline, now - Duration::from_secs(30));
    }

    #[test]
    fn any_time_formats_without_panicking() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(86_400);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00Z");
        let beyond =
            SystemTime::UNIX_EPOCH + Duration::from_secs(LAST_FORMATTABLE_SECS + 366 * 86_400);
        assert_eq!(rfc3339(beyond), "9999-12-31T23:59:59Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
            "2027-01-15T08:00:00Z"
        );
    }
}
