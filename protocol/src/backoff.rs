//! Retry delays: exponential backoff with full jitter. Agents use it to reconnect (part of
//! how they behave towards a server, hence here), the server to resume a broken download.
//!
//! `delay = random(0, min(cap, base * 2^attempt))`. The first retry after a loss is quick
//! (at most `base`); the ceiling doubles with every failure up to `cap`. Full jitter spreads
//! thousands of agents that lost the same server over the whole window instead of having
//! them return in waves.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};

/// The agent's reconnect defaults: about half a second at first, never more than 30 s.
pub const BASE_DELAY: Duration = Duration::from_millis(500);
pub const MAX_DELAY: Duration = Duration::from_secs(30);

/// Backoff state for one connection's retries.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: StdRng,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff::with_rng(base, cap, rand::make_rng())
    }

    /// A backoff with a seeded generator, for reproducible tests.
    pub fn with_seed(base: Duration, cap: Duration, seed: u64) -> Backoff {
        Backoff::with_rng(base, cap, StdRng::seed_from_u64(seed))
    }

    fn with_rng(base: Duration, cap: Duration, rng: StdRng) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
            rng,
        }
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.random_range(0..=nanos))
    }

    /// Jumps to the longest delay: for refusals that a quick retry cannot cure.
    pub fn give_up_quick_retries(&mut self) {
        self.attempt = 31;
    }

    /// Starts over after a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_from_base_up_to_cap() {
        let mut backoff = Backoff::with_seed(BASE_DELAY, MAX_DELAY, 7);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(backoff.ceiling().as_millis());
            backoff.next_delay();
        }
        assert_eq!(
            ceilings,
            [
                500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000
            ]
        );
    }

    #[test]
    fn every_delay_lies_within_its_ceiling_and_they_spread() {
        let mut backoff = Backoff::with_seed(BASE_DELAY, MAX_DELAY, 42);
        for _ in 0..1000 {
            let ceiling = backoff.ceiling();
            assert!(backoff.next_delay() <= ceiling);
        }
        // Full jitter: first retries of many agents spread over the whole first window.
        let firsts: Vec<Duration> = (0..1000)
            .map(|seed| Backoff::with_seed(BASE_DELAY, MAX_DELAY, seed).next_delay())
            .collect();
        assert!(firsts.iter().all(|delay| *delay <= BASE_DELAY));
        let early = firsts.iter().filter(|d| **d < BASE_DELAY / 2).count();
        assert!(
            (350..650).contains(&early),
            "{early} of 1000 in the first half"
        );
    }

    #[test]
    fn reset_makes_the_next_retry_quick_again() {
        let mut backoff = Backoff::with_seed(BASE_DELAY, MAX_DELAY, 1);
        for _ in 0..20 {
            backoff.next_delay();
        }
        assert_eq!(backoff.ceiling(), MAX_DELAY);
        backoff.reset();
        assert_eq!(backoff.ceiling(), BASE_DELAY);
        backoff.give_up_quick_retries();
        assert_eq!(backoff.ceiling(), MAX_DELAY);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut backoff = Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(60), 3);
        for _ in 0..100 {
            assert!(backoff.next_delay() <= Duration::from_secs(60));
        }
    }
}
