//! What `/proc` says about a process: resident memory and CPU time.
//!
//! Linux only, like the measurements that use it. Resident memory is `VmRSS` from
//! `/proc/PID/status` (user-space pages only: socket buffers and the page cache live in
//! the kernel and are not in it), its peak over the process's life `VmHWM`; CPU time is
//! `utime + stime` from `/proc/PID/stat`, all threads together.

use std::io;
use std::time::{Duration, Instant};

/// A process to read: this one or another by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pid {
    Myself,
    Other(u32),
}

impl Pid {
    fn proc_path(self, file: &str) -> String {
        match self {
            Pid::Myself => format!("/proc/self/{file}"),
            Pid::Other(pid) => format!("/proc/{pid}/{file}"),
        }
    }
}

/// The resident set size in KiB (`VmRSS`).
pub fn resident_kib(pid: Pid) -> io::Result<u64> {
    status_kib(pid, "VmRSS")
}

/// The highest resident set size since the process started, in KiB (`VmHWM`). It cannot
/// be reset, so a measurement that needs the peak of one phase starts a fresh process.
pub fn peak_resident_kib(pid: Pid) -> io::Result<u64> {
    status_kib(pid, "VmHWM")
}

/// One reading of a process's resident memory, split the way `/proc/PID/status` splits it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResidentSplit {
    /// `VmRSS`, KiB.
    pub total_kib: u64,
    /// `RssAnon`, KiB: the heap, stacks and other private memory.
    pub anon_kib: u64,
    /// `RssFile`, KiB: mapped files, such as the executable's own pages.
    pub file_kib: u64,
    /// `Threads`: every thread has its own stack and may have its own malloc arena.
    pub threads: u64,
}

/// `VmRSS`, `RssAnon`, `RssFile` and `Threads` from one read of `/proc/PID/status`.
pub fn resident_split(pid: Pid) -> io::Result<ResidentSplit> {
    let status = std::fs::read_to_string(pid.proc_path("status"))?;
    let field = |name: &str| {
        parse_status_kib(&status, name)
            .ok_or_else(|| io::Error::other(format!("no {name} line in /proc status")))
    };
    Ok(ResidentSplit {
        total_kib: field("VmRSS")?,
        anon_kib: field("RssAnon")?,
        file_kib: field("RssFile")?,
        threads: field("Threads")?,
    })
}

fn status_kib(pid: Pid, field: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(pid.proc_path("status"))?;
    parse_status_kib(&status, field)
        .ok_or_else(|| io::Error::other(format!("no {field} line in /proc status")))
}

fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|line| {
        line.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    // "VmRSS:     12345 kB"
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time used so far by every thread of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    pub fn total(self) -> Duration {
        self.user + self.system
    }

    /// The time used between `earlier` and this reading.
    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

impl std::fmt::Display for CpuTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} s ({:.2} user + {:.2} system)",
            self.total().as_secs_f64(),
            self.user.as_secs_f64(),
            self.system.as_secs_f64()
        )
    }
}

/// User and system CPU time used so far (in clock ticks, 10 ms on Linux).
pub fn cpu_time(pid: Pid) -> io::Result<CpuTime> {
    let stat = std::fs::read_to_string(pid.proc_path("stat"))?;
    let (user, system) =
        parse_cpu_ticks(&stat).ok_or_else(|| io::Error::other("unreadable /proc stat line"))?;
    let ticks_per_second = rustix::param::clock_ticks_per_second().max(1) as f64;
    Ok(CpuTime {
        user: Duration::from_secs_f64(user as f64 / ticks_per_second),
        system: Duration::from_secs_f64(system as f64 / ticks_per_second),
    })
}

// utime and stime are fields 14 and 15; the command name (field 2) is in parentheses and
// may itself hold spaces or parentheses, so count from the last ')'.
fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user = fields.next()?.parse().ok()?;
    let system = fields.next()?.parse().ok()?;
    Some((user, system))
}

/// When resident memory counts as settled.
#[derive(Debug, Clone, Copy)]
pub struct SettlePolicy {
    /// Readings over this long must agree.
    pub window: Duration,
    /// Time between two readings.
    pub interval: Duration,
    /// Readings agree when they differ by at most this many KiB...
    pub tolerance_kib: u64,
    /// ...or by at most this fraction of the reading, whichever is larger.
    pub tolerance_fraction: f64,
    /// Give up waiting after this long and take the last reading.
    pub patience: Duration,
}

impl Default for SettlePolicy {
    fn default() -> Self {
        SettlePolicy {
            window: Duration::from_secs(2),
            interval: Duration::from_millis(200),
            tolerance_kib: 256,
            tolerance_fraction: 0.005,
            patience: Duration::from_secs(60),
        }
    }
}

/// A resident-memory reading taken once it stopped moving.
#[derive(Debug, Clone, Copy)]
pub struct SettledRss {
    /// The last reading, in KiB.
    pub kib: u64,
    /// False when `patience` ran out before the readings agreed.
    pub settled: bool,
    /// How long it took to settle.
    pub waited: Duration,
}

/// Reads `VmRSS` every `interval` until the readings of the last `window` agree.
pub async fn settled_resident_kib(pid: Pid, policy: SettlePolicy) -> io::Result<SettledRss> {
    let started = Instant::now();
    let needed = (policy.window.as_secs_f64() / policy.interval.as_secs_f64()).ceil() as usize + 1;
    let mut recent: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
    loop {
        let kib = resident_kib(pid)?;
        recent.push_back(kib);
        if recent.len() > needed {
            recent.pop_front();
        }
        if recent.len() == needed && agree(&recent, policy) {
            return Ok(SettledRss {
                kib,
                settled: true,
                waited: started.elapsed(),
            });
        }
        if started.elapsed() >= policy.patience {
            return Ok(SettledRss {
                kib,
                settled: false,
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(policy.interval).await;
    }
}

fn agree(readings: &std::collections::VecDeque<u64>, policy: SettlePolicy) -> bool {
    let (Some(low), Some(high)) = (readings.iter().min(), readings.iter().max()) else {
        return false;
    };
    let allowed = policy
        .tolerance_kib
        .max((*high as f64 * policy.tolerance_fraction) as u64);
    high - low <= allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_and_vm_hwm_are_read_from_the_status_text() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t   5000 kB\nVmRSS:\t   4321 kB\n\
                      RssAnon:\t 100 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(4321));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(5000));
        assert_eq!(parse_status_kib("Name:\tx\n", "VmRSS"), None);
        // "Threads:\t4" has no unit; the same parser reads it.
        assert_eq!(parse_status_kib("Threads:\t4\n", "Threads"), Some(4));
    }

    #[test]
    fn cpu_ticks_survive_odd_command_names() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat), Some((7, 3)));
    }

    #[test]
    fn this_process_can_be_read() {
        let resident = resident_kib(Pid::Myself).unwrap();
        assert!(resident > 0);
        // The peak never falls, so a later peak is at least an earlier reading.
        assert!(peak_resident_kib(Pid::Myself).unwrap() >= resident);
        let split = resident_split(Pid::Myself).unwrap();
        assert!(split.anon_kib > 0 && split.threads >= 1);
        cpu_time(Pid::Myself).unwrap();
    }

    #[test]
    fn readings_agree_within_the_larger_tolerance() {
        let policy = SettlePolicy::default();
        let close: std::collections::VecDeque<u64> = [100_000, 100_400, 100_200].into();
        assert!(agree(&close, policy));
        let apart: std::collections::VecDeque<u64> = [100_000, 101_000].into();
        assert!(!agree(&apart, policy));
    }
}
