//! How many agent handshakes a second this server can take, and from that the window over
//! which a changeover spreads the agents' return (`logout`'s `reconnect_within_ms`).
//!
//! The meter counts agent handshakes (a connection that got as far as its `hello`,
//! welcomed or refused: during a new release's health check the refusals cost the door the
//! same as welcomes) and measures their rate **only while the server is saturated**: while
//! connections wait in the listen backlog for a handshake slot, every one of the
//! `max_concurrent_handshakes` being busy. When agents arrive spread out, their arrival
//! rate says nothing about the capacity, and a window sized from it would grow with every
//! changeover. A saturated stretch (a *storm*: the start-up after a restart, agents coming
//! back at once) of at least [`MIN_STORM_HANDSHAKES`] gives one measurement, smoothed into
//! the estimate with the ones before (the first replaces a burst's lower bound).
//! Unsaturated bursts only ever raise the estimate: a server that took N handshakes within
//! one second can take at least N a second.
//!
//! The estimate is kept in `state/handshake-rate.json`, so the next release (and the next
//! start) begins with it; the file is written best-effort and a failed write changes
//! nothing but the next start's first window. Without any measurement the estimate is
//! [`DEFAULT_HANDSHAKES_PER_SEC`].
//!
//! Not here: the handshake slots themselves (`listener.rs`), and what an agent does with
//! the window (`client-agent`, `server_values.rs`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The estimate when nothing was ever measured. The changeover server took 5,200–6,800
/// handshakes a second in 10,000-agent restart storms on a 2-core machine busy with other
/// builds, and 15,900 on the same machine when quiet (BENCHMARKS.md, "At scale"); half the
/// slowest of those is a rate any machine that holds thousands of agents should manage.
pub const DEFAULT_HANDSHAKES_PER_SEC: f64 = 2_500.0;

/// The share of the measured capacity the agents' return may use. The measurement comes
/// from storms in which the server did nothing else; after a changeover the new release
/// also re-verifies its packages, offers and serves agent updates, and takes the agents
/// that came back during the downtime all at once, and the same machine measured 5.2k/s
/// and 15.9k/s depending on what else ran. Half leaves room for all of that and for the
/// random clustering of a uniform spread.
pub const MARGIN: f64 = 0.5;

/// The shortest window: a handful of agents is not stampeded into the same millisecond.
pub const WINDOW_FLOOR: Duration = Duration::from_secs(1);

/// The longest window: even a slow server at 100,000 agents has them back within two
/// minutes. (The agent itself accepts up to ten.)
pub const WINDOW_CAP: Duration = Duration::from_secs(120);

/// The meter's time unit: handshakes are counted per slice, and a slice in which a
/// connection waited for a handshake slot is saturated.
pub const SLICE: Duration = Duration::from_millis(100);

/// Handshakes a storm must have, not counting its first and last slice (which are only
/// partly saturated), to count as a measurement: fewer say more about timing than rate.
pub const MIN_STORM_HANDSHAKES: u64 = 500;

/// Saturated slices a storm must span: the first and the last are left out of the rate.
const MIN_STORM_SLICES: u32 = 3;

/// The span an unsaturated burst is counted over (in slices: one second).
const BURST_SLICES: usize = 10;

/// Handshakes within [`BURST_SLICES`] that make a burst worth raising the estimate for.
const MIN_BURST_HANDSHAKES: u64 = 1_000;

/// The weight of the newest storm in the smoothed estimate.
const SMOOTHING: f64 = 0.5;

/// Estimates outside this range (a damaged or hand-edited file) are not believed.
const PLAUSIBLE_PER_SEC: std::ops::RangeInclusive<f64> = 50.0..=1_000_000.0;

/// How long after the last handshake the estimate is written: a storm is over by then.
const SAVE_AFTER: Duration = Duration::from_secs(1);

/// How long a failed write waits before it is tried again.
const RETRY_SAVE: Duration = Duration::from_secs(60);

/// The file's name in the state folder.
pub const FILE_NAME: &str = "handshake-rate.json";

/// What `unwritten` lists while the file cannot be written.
const UNWRITTEN: &str = "handshake rate";

/// The window for `sessions` agents at `capacity_per_sec` handshakes a second:
/// `sessions / (capacity × MARGIN)`, within [`WINDOW_FLOOR`] and [`WINDOW_CAP`].
pub fn reconnect_window(sessions: usize, capacity_per_sec: f64) -> Duration {
    let usable = capacity_per_sec.max(1.0) * MARGIN;
    let seconds = sessions as f64 / usable;
    if !seconds.is_finite() || seconds >= WINDOW_CAP.as_secs_f64() {
        return WINDOW_CAP;
    }
    // Whole milliseconds, rounded up, as the wire carries them.
    Duration::from_millis((seconds * 1000.0).ceil() as u64).clamp(WINDOW_FLOOR, WINDOW_CAP)
}

/// The capacity a window is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    pub per_sec: f64,
    /// Storms measured so far (also by earlier releases); 0 with the default, or with only
    /// an unsaturated burst's lower bound.
    pub storms: u64,
    /// Whether anything was measured at all, or this is the default.
    pub measured: bool,
}

/// What the meter found when a slice closed, for the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Finding {
    /// A storm ended: `handshakes` within `over` (its saturated middle) gave `rate`.
    Storm {
        handshakes: u64,
        over: Duration,
        rate: f64,
        estimate: f64,
    },
    /// An unsaturated second took more handshakes than the estimate said it could: the
    /// estimate is `rate` now.
    Burst { rate: f64 },
}

#[derive(Debug, Clone, Copy)]
struct Slice {
    start: Instant,
    handshakes: u64,
    /// A connection waited for a handshake slot during this slice.
    saturated: bool,
}

/// A run of saturated slices.
#[derive(Debug, Clone, Copy)]
struct Run {
    slices: u32,
    handshakes: u64,
    first: u64,
    last: u64,
}

/// The meter itself, without a clock: every call says what time it is, so tests drive it.
#[derive(Debug)]
pub struct RateMeter {
    /// Handshakes a second; `None` until something was measured.
    estimate: Option<f64>,
    /// Storms that went into the estimate.
    storms: u64,
    /// The slice being counted; `None` before the first event.
    slice: Option<Slice>,
    /// The storm under way, if the last closed slices were saturated.
    run: Option<Run>,
    /// Handshakes of the last closed slices, oldest first, at most [`BURST_SLICES`].
    recent: VecDeque<u64>,
    /// The estimate changed since [`RateMeter::take_unsaved`] last took it.
    unsaved: bool,
}

impl RateMeter {
    /// A meter starting from an earlier estimate (from the file), or from nothing.
    pub fn new(estimate: Option<f64>, storms: u64) -> RateMeter {
        RateMeter {
            estimate: estimate.filter(|rate| PLAUSIBLE_PER_SEC.contains(rate)),
            storms,
            slice: None,
            run: None,
            recent: VecDeque::with_capacity(BURST_SLICES + 1),
            unsaved: false,
        }
    }

    /// One agent handshake completed (its `hello` read) at `now`.
    pub fn handshake(&mut self, now: Instant) -> Vec<Finding> {
        let findings = self.advance(now);
        if let Some(slice) = &mut self.slice {
            slice.handshakes += 1;
        }
        findings
    }

    /// A connection waited in the backlog for a handshake slot at `now`: every slot was
    /// busy.
    pub fn saturated(&mut self, now: Instant) -> Vec<Finding> {
        let findings = self.advance(now);
        if let Some(slice) = &mut self.slice {
            slice.saturated = true;
        }
        findings
    }

    /// The capacity as of `now` (a storm that has ended is taken into account).
    pub fn capacity(&mut self, now: Instant) -> (Capacity, Vec<Finding>) {
        let findings = self.advance(now);
        (self.current(), findings)
    }

    fn current(&self) -> Capacity {
        Capacity {
            per_sec: self.estimate.unwrap_or(DEFAULT_HANDSHAKES_PER_SEC),
            storms: self.storms,
            measured: self.estimate.is_some(),
        }
    }

    /// Whether a storm may be under way: something was counted in the last second.
    pub fn is_quiet(&self) -> bool {
        self.run.is_none()
            && self.slice.is_none_or(|slice| slice.handshakes == 0)
            && self.recent.iter().all(|&handshakes| handshakes == 0)
    }

    /// The estimate to write, once per change.
    pub fn take_unsaved(&mut self) -> Option<(f64, u64)> {
        if !std::mem::take(&mut self.unsaved) {
            return None;
        }
        self.estimate.map(|estimate| (estimate, self.storms))
    }

    /// Marks the estimate as still to be written (its write failed).
    pub fn keep_unsaved(&mut self) {
        self.unsaved = true;
    }

    // Closes every slice that ended before `now`.
    fn advance(&mut self, now: Instant) -> Vec<Finding> {
        let mut findings = Vec::new();
        let Some(slice) = self.slice else {
            self.slice = Some(Slice::empty(now));
            return findings;
        };
        let elapsed = now.saturating_duration_since(slice.start);
        if elapsed < SLICE {
            return findings;
        }
        let passed = elapsed.as_nanos() / SLICE.as_nanos();
        self.close(slice, &mut findings);
        // The slices without an event in between; past a second of them nothing is left
        // to count.
        let empty = (passed - 1).min(BURST_SLICES as u128 + 1);
        for _ in 0..empty {
            self.close(Slice::empty(now), &mut findings);
        }
        let start = u32::try_from(passed)
            .ok()
            .and_then(|passed| SLICE.checked_mul(passed))
            .and_then(|offset| slice.start.checked_add(offset))
            .unwrap_or(now);
        self.slice = Some(Slice::empty(start));
        findings
    }

    fn close(&mut self, slice: Slice, findings: &mut Vec<Finding>) {
        if slice.saturated {
            let run = self.run.get_or_insert(Run {
                slices: 0,
                handshakes: 0,
                first: slice.handshakes,
                last: 0,
            });
            run.slices += 1;
            run.handshakes += slice.handshakes;
            run.last = slice.handshakes;
        } else if let Some(run) = self.run.take() {
            findings.extend(self.end_storm(run));
        }
        self.recent.push_back(slice.handshakes);
        if self.recent.len() > BURST_SLICES {
            self.recent.pop_front();
        }
        if self.recent.len() == BURST_SLICES {
            let handshakes: u64 = self.recent.iter().sum();
            let rate = handshakes as f64 / (SLICE.as_secs_f64() * BURST_SLICES as f64);
            if handshakes >= MIN_BURST_HANDSHAKES && rate > self.current().per_sec {
                self.estimate = Some(rate);
                self.unsaved = true;
                findings.push(Finding::Burst { rate });
            }
        }
    }

    fn end_storm(&mut self, run: Run) -> Option<Finding> {
        if run.slices < MIN_STORM_SLICES {
            return None;
        }
        let handshakes = run.handshakes - run.first - run.last;
        if handshakes < MIN_STORM_HANDSHAKES {
            return None;
        }
        let over = SLICE * (run.slices - 2);
        let rate = handshakes as f64 / over.as_secs_f64();
        let estimate = match self.estimate {
            // Before the first storm the estimate is at most a burst's lower bound, which
            // the first real measurement replaces (and can only be above, unless the
            // machine got busier meanwhile: then the bound, which it did reach, stands).
            Some(before) if self.storms > 0 => before + SMOOTHING * (rate - before),
            Some(bound) => rate.max(bound),
            None => rate,
        };
        self.estimate = Some(estimate);
        self.storms += 1;
        self.unsaved = true;
        Some(Finding::Storm {
            handshakes,
            over,
            rate,
            estimate,
        })
    }
}

impl Slice {
    fn empty(start: Instant) -> Slice {
        Slice {
            start,
            handshakes: 0,
            saturated: false,
        }
    }
}

/// The meter as the server shares it: connections count, the accept loop reports
/// connections that waited for a slot, the changeover asks for the window, and [`HandshakeRate::keep_saved`] writes the
/// estimate.
#[derive(Debug)]
pub struct HandshakeRate {
    // Held for a few arithmetic operations per handshake, never across an await.
    meter: Mutex<RateMeter>,
    file: PathBuf,
    /// Wakes the writer after handshakes.
    activity: Notify,
}

impl HandshakeRate {
    /// The meter, starting from `state_dir/handshake-rate.json` if it can be read.
    pub fn load(state_dir: &Path) -> Arc<HandshakeRate> {
        let file = state_dir.join(FILE_NAME);
        let (estimate, storms) = match std::fs::read(&file) {
            Ok(bytes) => match parse(&bytes) {
                Some((estimate, storms)) => {
                    info!(
                        handshakes_per_sec = estimate.round(),
                        storms, "handshake rate from earlier storms"
                    );
                    (Some(estimate), storms)
                }
                None => {
                    warn!(path = %file.display(), "cannot read the handshake rate; starting from the default");
                    (None, 0)
                }
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => (None, 0),
            Err(err) => {
                warn!(path = %file.display(), cause = %err, "cannot read the handshake rate; starting from the default");
                (None, 0)
            }
        };
        Arc::new(HandshakeRate::new(file, RateMeter::new(estimate, storms)))
    }

    fn new(file: PathBuf, meter: RateMeter) -> HandshakeRate {
        HandshakeRate {
            meter: Mutex::new(meter),
            file,
            activity: Notify::new(),
        }
    }

    fn meter(&self) -> std::sync::MutexGuard<'_, RateMeter> {
        self.meter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An agent's `hello` was read.
    pub fn handshake(&self) {
        let findings = self.meter().handshake(Instant::now());
        report(&findings);
        self.activity.notify_one();
    }

    /// The accept loop took a connection that had waited for a handshake slot.
    pub fn saturated(&self) {
        let findings = self.meter().saturated(Instant::now());
        report(&findings);
    }

    /// The capacity now.
    pub fn capacity(&self) -> Capacity {
        let (capacity, findings) = self.meter().capacity(Instant::now());
        report(&findings);
        capacity
    }

    /// The window for `sessions` agents, and the capacity it came from.
    pub fn reconnect_window(&self, sessions: usize) -> (Duration, Capacity) {
        let capacity = self.capacity();
        (reconnect_window(sessions, capacity.per_sec), capacity)
    }

    /// Writes the estimate whenever a burst of handshakes has changed it, until
    /// `shutdown` (and once more then).
    pub async fn keep_saved(self: Arc<Self>, shutdown: CancellationToken) {
        self.keep_saved_with(shutdown, SAVE_AFTER, RETRY_SAVE).await;
    }

    async fn keep_saved_with(
        self: Arc<Self>,
        shutdown: CancellationToken,
        save_after: Duration,
        retry: Duration,
    ) {
        let mut failing = false;
        loop {
            let wait = async {
                if failing {
                    tokio::time::sleep(retry).await;
                } else {
                    self.activity.notified().await;
                    // Until the handshakes stop: a storm is measured when it is over.
                    loop {
                        tokio::time::sleep(save_after).await;
                        let quiet = {
                            let mut meter = self.meter();
                            let (_, findings) = meter.capacity(Instant::now());
                            report(&findings);
                            meter.is_quiet()
                        };
                        if quiet {
                            break;
                        }
                    }
                }
            };
            let stopping = tokio::select! {
                () = shutdown.cancelled() => true,
                () = wait => false,
            };
            failing = !self.save().await;
            if stopping {
                return;
            }
        }
    }

    // Writes the estimate if it changed; false when that failed.
    async fn save(self: &Arc<Self>) -> bool {
        let unsaved = {
            let mut meter = self.meter();
            let (_, findings) = meter.capacity(Instant::now());
            report(&findings);
            meter.take_unsaved()
        };
        let Some((estimate, storms)) = unsaved else {
            return true;
        };
        let path = self.file.clone();
        let contents = render(estimate, storms, SystemTime::now());
        let written = tokio::task::spawn_blocking(move || {
            crate::release_tools::write_atomically(&path, contents.as_bytes(), false)
        })
        .await
        .unwrap_or_else(|err| Err(anyhow::anyhow!("the writer failed: {err}")));
        match written {
            Ok(()) => {
                crate::unwritten::clear(UNWRITTEN);
                debug!(path = %self.file.display(), "handshake rate saved");
                true
            }
            Err(err) => {
                self.meter().keep_unsaved();
                let problem = format!(
                    "cannot save the handshake rate in {}: {err:#}; the next start begins \
                     with an older estimate",
                    self.file.display()
                );
                if crate::unwritten::report(UNWRITTEN, problem) {
                    warn!(path = %self.file.display(), cause = %format!("{err:#}"), "cannot save the handshake rate");
                }
                false
            }
        }
    }
}

fn report(findings: &[Finding]) {
    for finding in findings {
        match *finding {
            Finding::Storm {
                handshakes,
                over,
                rate,
                estimate,
            } => info!(
                handshakes,
                over_ms = over.as_millis() as u64,
                handshakes_per_sec = rate.round(),
                estimate_per_sec = estimate.round(),
                "handshake rate measured in a storm"
            ),
            Finding::Burst { rate } => info!(
                handshakes_per_sec = rate.round(),
                "handshake rate raised by a burst"
            ),
        }
    }
}

// The file: `{"handshakes_per_sec": 8123.4, "storms": 3, "updated_at": "…"}`; its format
// is defined here and nowhere else.
fn render(estimate: f64, storms: u64, now: SystemTime) -> String {
    let document = serde_json::json!({
        "handshakes_per_sec": (estimate * 10.0).round() / 10.0,
        "storms": storms,
        "updated_at": humantime::format_rfc3339_seconds(now).to_string(),
    });
    format!("{document:#}\n")
}

fn parse(bytes: &[u8]) -> Option<(f64, u64)> {
    let document: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let estimate = document.get("handshakes_per_sec")?.as_f64()?;
    let storms = document
        .get("storms")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    PLAUSIBLE_PER_SEC
        .contains(&estimate)
        .then_some((estimate, storms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// `count` handshakes evenly over `over` from `start`, each after a wait for its slot if
    /// `saturated`; returns the findings.
    fn traffic(
        meter: &mut RateMeter,
        start: Instant,
        over: Duration,
        count: u64,
        saturated: bool,
    ) -> Vec<Finding> {
        let mut findings = Vec::new();
        for n in 0..count {
            let at = start + over.mul_f64(n as f64 / count as f64);
            if saturated {
                findings.extend(meter.saturated(at));
            }
            findings.extend(meter.handshake(at));
        }
        findings
    }

    fn storms(findings: &[Finding]) -> Vec<f64> {
        findings
            .iter()
            .filter_map(|finding| match finding {
                Finding::Storm { rate, .. } => Some(*rate),
                Finding::Burst { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_storm_measures_the_rate_of_its_saturated_middle() {
        let t0 = Instant::now();
        let mut meter = RateMeter::new(None, 0);
        assert_eq!(meter.capacity(t0).0.per_sec, DEFAULT_HANDSHAKES_PER_SEC);
        // 10,000 handshakes in a second, every slot busy all along.
        let mut findings = traffic(&mut meter, t0, ms(1_000), 10_000, true);
        // Nothing after it: asking for the capacity closes the storm.
        let (capacity, closing) = meter.capacity(t0 + ms(1_500));
        findings.extend(closing);
        let rates = storms(&findings);
        assert_eq!(rates.len(), 1, "{findings:?}");
        assert!((rates[0] - 10_000.0).abs() < 200.0, "{rates:?}");
        assert!(capacity.measured);
        assert_eq!(capacity.storms, 1);
        assert!((capacity.per_sec - 10_000.0).abs() < 200.0);
        assert!(meter.take_unsaved().is_some());
        assert!(meter.take_unsaved().is_none(), "taken once per change");
    }

    #[test]
    fn spread_arrivals_are_not_a_measurement() {
        let t0 = Instant::now();
        let mut meter = RateMeter::new(Some(8_000.0), 2);
        // 4,000 a second for five seconds, none waiting for a slot: that is their arrival
        // rate, not what the server could take.
        let findings = traffic(&mut meter, t0, ms(5_000), 20_000, false);
        let (capacity, _) = meter.capacity(t0 + ms(6_000));
        assert!(findings.is_empty(), "{findings:?}");
        assert_eq!(capacity.per_sec, 8_000.0);
        assert_eq!(capacity.storms, 2);
        assert!(meter.take_unsaved().is_none());
    }

    #[test]
    fn an_unsaturated_burst_only_raises_the_estimate() {
        let t0 = Instant::now();
        let mut meter = RateMeter::new(None, 0);
        // 12,000 within 1.5 s, none waiting for a slot: at least 8,000 a second.
        let findings = traffic(&mut meter, t0, ms(1_500), 12_000, false);
        let (capacity, _) = meter.capacity(t0 + ms(3_000));
        assert!(
            findings
                .iter()
                .any(|finding| matches!(finding, Finding::Burst { .. }))
        );
        assert!((capacity.per_sec - 8_000.0).abs() < 200.0, "{capacity:?}");
        assert!(capacity.measured);
        assert_eq!(capacity.storms, 0);
        // Slower traffic later does not lower it.
        traffic(&mut meter, t0 + ms(10_000), ms(2_000), 6_000, false);
        let (later, _) = meter.capacity(t0 + ms(13_000));
        assert_eq!(later.per_sec, capacity.per_sec);
    }

    #[test]
    fn the_first_storm_replaces_a_bursts_lower_bound() {
        let t0 = Instant::now();
        let mut meter = RateMeter::new(None, 0);
        // The fleet opening at 6,000 a second, nobody waiting for a slot.
        traffic(&mut meter, t0, ms(2_000), 12_000, false);
        let (bound, _) = meter.capacity(t0 + ms(3_000));
        assert!((bound.per_sec - 6_000.0).abs() < 200.0, "{bound:?}");
        // Then a restart storm at 15,000 a second.
        traffic(&mut meter, t0 + ms(10_000), ms(1_000), 15_000, true);
        let (after, _) = meter.capacity(t0 + ms(12_000));
        assert_eq!(after.storms, 1);
        assert!((after.per_sec - 15_000.0).abs() < 300.0, "{after:?}");
    }

    #[test]
    fn storms_are_smoothed_and_a_slower_one_lowers_the_estimate() {
        let t0 = Instant::now();
        let mut meter = RateMeter::new(None, 0);
        traffic(&mut meter, t0, ms(1_000), 10_000, true);
        let (first, _) = meter.capacity(t0 + ms(2_000));
        // The machine is busier now: 6,000 a second with every slot busy.
        traffic(&mut meter, t0 + ms(10_000), ms(2_000), 12_000, true);
        let (second, _) = meter.capacity(t0 + ms(13_000));
        assert_eq!(second.storms, 2);
        assert!(second.per_sec < first.per_sec);
        assert!((second.per_sec - 8_000.0).abs() < 300.0, "{second:?}");
    }

    #[test]
    fn a_short_or_thin_storm_is_not_a_measurement() {
        let t0 = Instant::now();
        let mut meter = RateMeter::new(None, 0);
        // 1,000 agents in 50 ms: one slice, no middle to measure.
        let mut findings = traffic(&mut meter, t0, ms(50), 1_000, true);
        findings.extend(meter.capacity(t0 + ms(1_000)).1);
        assert!(storms(&findings).is_empty(), "{findings:?}");
        // Connections that hold every slot and send nothing (slowloris): others waiting
        // for two seconds with a trickle of handshakes says nothing about the rate.
        let start = t0 + ms(5_000);
        for n in 0..200u64 {
            findings.extend(meter.saturated(start + ms(n * 10)));
        }
        findings.extend(traffic(&mut meter, start, ms(2_000), 100, true));
        findings.extend(meter.capacity(start + ms(3_000)).1);
        assert!(storms(&findings).is_empty(), "{findings:?}");
        assert_eq!(meter.capacity(start + ms(3_000)).0.per_sec, 2_500.0);
    }

    #[test]
    fn a_quiet_meter_says_so_after_a_second_without_handshakes() {
        let t0 = Instant::now();
        let mut meter = RateMeter::new(None, 0);
        assert!(meter.is_quiet());
        meter.handshake(t0);
        assert!(!meter.is_quiet());
        meter.capacity(t0 + ms(500));
        assert!(!meter.is_quiet());
        meter.capacity(t0 + ms(1_200));
        assert!(meter.is_quiet());
    }

    #[test]
    fn the_window_is_sessions_over_half_the_capacity_within_its_bounds() {
        // A handful of agents: the floor.
        assert_eq!(reconnect_window(3, 8_000.0), WINDOW_FLOOR);
        assert_eq!(reconnect_window(0, 8_000.0), WINDOW_FLOOR);
        // 10,000 agents at 8,000 a second: 2.5 s.
        assert_eq!(reconnect_window(10_000, 8_000.0), ms(2_500));
        // 100,000: 25 s, and with the default 80 s.
        assert_eq!(reconnect_window(100_000, 8_000.0), ms(25_000));
        assert_eq!(
            reconnect_window(100_000, DEFAULT_HANDSHAKES_PER_SEC),
            ms(80_000)
        );
        // Under 1,000 agents a few seconds at most, even with the default.
        assert!(reconnect_window(999, DEFAULT_HANDSHAKES_PER_SEC) <= ms(3_000));
        // It grows with the fleet and stops at the cap.
        assert!(reconnect_window(5_000, 2_500.0) > reconnect_window(4_000, 2_500.0));
        assert_eq!(reconnect_window(1_000_000, 2_500.0), WINDOW_CAP);
        assert_eq!(reconnect_window(usize::MAX, 0.0), WINDOW_CAP);
        // A capacity that is no number counts as one handshake a second.
        assert_eq!(reconnect_window(10, f64::NAN), ms(20_000));
    }

    #[test]
    fn the_file_round_trips_and_nonsense_is_not_believed() {
        let text = render(8_123.44, 3, SystemTime::UNIX_EPOCH);
        assert_eq!(parse(text.as_bytes()), Some((8_123.4, 3)));
        assert!(
            text.contains("\"updated_at\": \"1970-01-01T00:00:00Z\""),
            "{text}"
        );
        assert_eq!(parse(br#"{"handshakes_per_sec": 1e12}"#), None);
        assert_eq!(parse(br#"{"handshakes_per_sec": -5}"#), None);
        assert_eq!(parse(br#"{"storms": 3}"#), None);
        assert_eq!(parse(b"not json"), None);
        assert_eq!(parse(br#"{"handshakes_per_sec": 900}"#), Some((900.0, 0)));
    }

    #[tokio::test]
    async fn the_estimate_is_saved_after_a_storm_even_after_a_failed_write() {
        let dir = tempfile::tempdir().unwrap();
        // The state folder's place is taken by a file: nothing can be written below it.
        let state = dir.path().join("state");
        std::fs::write(&state, b"not a folder").unwrap();
        let meter = HandshakeRate::load(&state);
        assert!(!meter.capacity().measured);
        let shutdown = CancellationToken::new();
        let retry = ms(300);
        let saver =
            tokio::spawn(Arc::clone(&meter).keep_saved_with(shutdown.clone(), ms(100), retry));
        // A storm: 300 handshakes every 20 ms for a second, each having waited for its
        // slot (up to 15,000 a second, less as the sleeps overrun).
        for _ in 0..50 {
            for _ in 0..300 {
                meter.saturated();
                meter.handshake();
            }
            tokio::time::sleep(ms(20)).await;
        }
        // The writer waits for the storm to end (a quiet second), then tries to write.
        let failed = async {
            while !crate::unwritten::is_failing(UNWRITTEN) {
                tokio::time::sleep(ms(20)).await;
            }
        };
        tokio::time::timeout(ms(5_000), failed).await.unwrap();
        // The estimate is used all the same.
        let capacity = meter.capacity();
        // (A busy machine may stretch the storm into a burst, or split it in two.)
        assert!(capacity.measured);
        assert!(
            (1_000.0..=15_000.0).contains(&capacity.per_sec),
            "{capacity:?}"
        );
        // Room again: the retry writes it and the problem is gone.
        std::fs::remove_file(&state).unwrap();
        std::fs::create_dir(&state).unwrap();
        let written = async {
            while crate::unwritten::is_failing(UNWRITTEN) {
                tokio::time::sleep(ms(20)).await;
            }
        };
        tokio::time::timeout(retry * 10, written).await.unwrap();
        let text = std::fs::read_to_string(state.join(FILE_NAME)).unwrap();
        let (saved, storms) = parse(text.as_bytes()).unwrap();
        assert_eq!(storms, capacity.storms);
        assert!((saved - capacity.per_sec).abs() < 0.1, "{text}");
        shutdown.cancel();
        saver.await.unwrap();
        // The next start begins with it.
        let next = HandshakeRate::load(&state).capacity();
        assert!(next.measured);
        assert_eq!(next.storms, capacity.storms);
        assert_eq!(next.per_sec, saved);
    }
}
