//! Reading the server's log (its stderr, `tracing`'s text format) as a timeline: each line's
//! timestamp and message, so that the steps of a changeover can be timed from the server's
//! side and lined up with what the load generator saw.
//!
//! It only reads the default text format (`2026-11-28T14:42:08.123456Z  INFO target: message
//! fields`); lines it cannot read are skipped. Both sides read the same system clock, so a
//! log timestamp and a `SystemTime` taken here can be subtracted.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub at: SystemTime,
    /// `INFO`, `WARN`, …
    pub level: String,
    /// The message and its fields, without timestamp, level and target.
    pub text: String,
}

impl LogLine {
    /// Whether the message (not the fields after it) starts with `message`.
    pub fn is(&self, message: &str) -> bool {
        self.text.starts_with(message)
    }
}

/// Every readable line of the log file, in file order.
pub fn read(path: &Path) -> std::io::Result<Vec<LogLine>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().filter_map(parse_line).collect())
}

/// Reads one line of `tracing`'s default text format; `None` for anything else.
pub fn parse_line(line: &str) -> Option<LogLine> {
    let line = strip_ansi(line);
    let mut parts = line.trim_start().splitn(2, char::is_whitespace);
    let at = parse_rfc3339_utc(parts.next()?)?;
    let rest = parts.next()?.trim_start();
    let (level, rest) = rest.split_once(char::is_whitespace)?;
    let rest = rest.trim_start();
    // "changeover_server::changeover::driver: sessions logged out logged_out=100"
    let text = match rest.split_once(": ") {
        Some((target, text)) if !target.contains(' ') => text,
        _ => rest,
    };
    Some(LogLine {
        at,
        level: level.to_owned(),
        text: text.to_owned(),
    })
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, the form `tracing` writes.
pub fn parse_rfc3339_utc(text: &str) -> Option<SystemTime> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut date_parts = date.splitn(3, '-');
    let year: i64 = date_parts.next()?.parse().ok()?;
    let month: u32 = date_parts.next()?.parse().ok()?;
    let day: u32 = date_parts.next()?.parse().ok()?;
    let (clock, fraction) = match time.split_once('.') {
        Some((clock, fraction)) => (clock, fraction),
        None => (time, ""),
    };
    let mut clock_parts = clock.splitn(3, ':');
    let hour: u64 = clock_parts.next()?.parse().ok()?;
    let minute: u64 = clock_parts.next()?.parse().ok()?;
    let second: u64 = clock_parts.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let nanos = if fraction.is_empty() {
        0
    } else {
        if !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits: String = fraction
            .chars()
            .chain(std::iter::repeat('0'))
            .take(9)
            .collect();
        digits.parse::<u32>().ok()?
    };
    let days = u64::try_from(days_from_civil(year, month, day)).ok()?;
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second;
    Some(UNIX_EPOCH + Duration::new(seconds, nanos))
}

// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Signed milliseconds from `earlier` to `later` (negative when `later` is earlier).
pub fn millis_between(earlier: SystemTime, later: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(after) => after.as_secs_f64() * 1000.0,
        Err(before) => -before.duration().as_secs_f64() * 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_read_to_the_microsecond() {
        let at = parse_rfc3339_utc("2026-11-28T14:42:08.123456Z").unwrap();
        let since_epoch = at.duration_since(UNIX_EPOCH).unwrap();
        // date -u -d 2026-11-28T14:42:08Z +%s
        assert_eq!(since_epoch.as_secs(), 1_795_876_928);
        assert_eq!(since_epoch.subsec_micros(), 123_456);
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        assert_eq!(
            parse_rfc3339_utc("2000-03-01T00:00:00.5Z")
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap(),
            Duration::from_millis(951_868_800_500)
        );
        assert_eq!(parse_rfc3339_utc("2026-11-28 14:42:08Z"), None);
        assert_eq!(parse_rfc3339_utc("listening on ws://x"), None);
    }

    #[test]
    fn a_log_line_gives_time_level_and_message() {
        let line = parse_line(
            "2026-11-28T14:42:08.000001Z  INFO changeover_server::changeover::driver: sessions logged out logged_out=100",
        )
        .unwrap();
        assert_eq!(line.level, "INFO");
        assert_eq!(line.text, "sessions logged out logged_out=100");
        assert!(line.is("sessions logged out"));
        let colored = parse_line(
            "\u{1b}[2m2026-11-28T14:42:08.000001Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mchangeover_server\u{1b}[0m\u{1b}[2m:\u{1b}[0m server started",
        )
        .unwrap();
        assert_eq!(colored.text, "server started");
        assert_eq!(parse_line("listening on ws://127.0.0.1:1"), None);
        assert_eq!(parse_line(""), None);
    }

    #[test]
    fn millis_between_is_signed() {
        let t = UNIX_EPOCH + Duration::from_secs(10);
        assert_eq!(millis_between(t, t + Duration::from_millis(250)), 250.0);
        assert_eq!(millis_between(t + Duration::from_millis(250), t), -250.0);
    }
}
