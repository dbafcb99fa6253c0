//! The admin account: its password hash on disk, checking a login, and throttling guessers.
//!
//! The password is never stored, only its argon2 hash (PHC string) in
//! `<root>/state/admin.argon2`, readable by the service user alone. Checking a password
//! costs tens of milliseconds of CPU on purpose, so it runs on the blocking pool, a few at a
//! time, and an address that failed too often is refused before any hashing happens.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use argon2::{Argon2, PasswordHash, PasswordHasher as _};
use rand::RngExt as _;
use tokio::sync::oneshot;

use crate::peer::AddressKey;

/// The environment variable that sets the admin password on first start.
pub const ADMIN_PASSWORD_ENV: &str = "CHANGEOVER_ADMIN_PASSWORD";

/// Failed or pending logins allowed per address (an IPv4 address or an IPv6 /64) within
/// [`THROTTLE_WINDOW`].
pub const MAX_FAILED_LOGINS: usize = 5;

/// The window in which failed logins are counted.
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(60);

/// Failed logins of all addresses together within [`THROTTLE_WINDOW`] before every address
/// that is not trusted gets only one try per window.
pub const GLOBAL_FAILED_LOGINS: usize = 100;

/// Logins waiting for the verification at once; past this a newcomer is told to come back
/// unless it has a better priority than the worst waiter.
pub const MAX_QUEUED_LOGINS: usize = 16;

/// How long a login waits for its turn at the verification before it is told to come back.
pub const LOGIN_QUEUE_PATIENCE: Duration = Duration::from_secs(3);

// How long an address an admin logged in from keeps its precedence.
const TRUST_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);
const MAX_TRUSTED_ADDRESSES: usize = 64;

// Addresses remembered at most; past this the stalest entry goes, so a flood of spoofed
// sources cannot grow the table without bound.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

/// How the admin password came to be, so `run` can tell the operator once.
#[derive(Debug, PartialEq, Eq)]
pub enum PasswordOrigin {
    /// A hash was already stored.
    Stored,
    /// Set from [`ADMIN_PASSWORD_ENV`] on this first start.
    FromEnvironment,
    /// Generated on this first start; shown to the operator exactly once.
    Generated(String),
}

/// The admin credentials and the login throttle.
#[derive(Debug, Clone)]
pub struct AdminAuth {
    password_hash: Arc<str>,
    throttle: Arc<LoginThrottle>,
    /// One password check at a time: argon2 is deliberately expensive, and each check
    /// needs its working memory (the hash's `m`, 19 MiB by default).
    queue: Arc<VerificationQueue>,
    /// argon2's working memory, allocated once and reused by every check. Freshly
    /// allocated each time, glibc kept the freed megabytes and the server grew by ~19 MiB
    /// per login up to hundreds of MiB (measured in BENCHMARKS.md).
    working_memory: Arc<Mutex<Vec<argon2::Block>>>,
}

/// The outcome of a login attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginOutcome {
    Accepted,
    WrongPassword,
    /// Refused without checking: too many failures; retry after this long.
    Throttled {
        retry_after: Duration,
    },
    /// Refused without checking: too many logins wait for the verification.
    Busy {
        retry_after: Duration,
    },
}

impl AdminAuth {
    /// Loads the stored hash, or creates it on first start from the environment or a
    /// freshly generated password.
    pub fn load_or_create(
        credentials_file: &Path,
        password_from_env: Option<String>,
    ) -> anyhow::Result<(AdminAuth, PasswordOrigin)> {
        let (password_hash, origin) = match std::fs::read_to_string(credentials_file) {
            Ok(text) => {
                let hash = text.trim().to_owned();
                PasswordHash::new(&hash).map_err(|err| {
                    anyhow::anyhow!(
                        "{} does not hold an argon2 hash ({err}); delete it to set a new admin password",
                        credentials_file.display()
                    )
                })?;
                (hash, PasswordOrigin::Stored)
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let (password, origin) = match password_from_env.filter(|p| !p.is_empty()) {
                    Some(password) => (password, PasswordOrigin::FromEnvironment),
                    None => {
                        let password = generate_password();
                        (password.clone(), PasswordOrigin::Generated(password))
                    }
                };
                let hash = hash_password(&password)?;
                write_private_file(credentials_file, &hash)?;
                (hash, origin)
            }
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("cannot read {}", credentials_file.display()));
            }
        };
        let auth = AdminAuth {
            password_hash: password_hash.into(),
            throttle: Arc::new(LoginThrottle::default()),
            queue: Arc::new(VerificationQueue::default()),
            working_memory: Arc::new(Mutex::new(Vec::new())),
        };
        Ok((auth, origin))
    }

    /// Checks a login from `address`, counting it against the address before the check.
    pub async fn login(&self, address: IpAddr, password: String) -> LoginOutcome {
        let key = AddressKey::of(address);
        let priority = match self.throttle.admit(key, Instant::now()) {
            Ok(priority) => priority,
            Err(retry_after) => return LoginOutcome::Throttled { retry_after },
        };
        let attempt = Attempt {
            throttle: Arc::clone(&self.throttle),
            key,
            checked: false,
        };
        let busy = LoginOutcome::Busy {
            retry_after: Duration::from_secs(1),
        };
        let turn = match self.queue.enter(priority) {
            Err(QueueFull) => return busy,
            Ok(Ok(turn)) => turn,
            Ok(Err(place)) => {
                match tokio::time::timeout(LOGIN_QUEUE_PATIENCE, VerificationQueue::wait(place))
                    .await
                {
                    Ok(Ok(turn)) => turn,
                    Ok(Err(QueueFull)) | Err(_) => return busy,
                }
            }
        };
        let hash = Arc::clone(&self.password_hash);
        let memory = Arc::clone(&self.working_memory);
        // The attempt and the turn go with the check, so a login whose connection is gone
        // is still counted, and the next one waits until this one is done.
        let check = tokio::task::spawn_blocking(move || {
            let mut attempt = attempt;
            let correct = {
                let mut memory = memory.lock().unwrap_or_else(|e| e.into_inner());
                verify_password(&hash, &password, &mut memory)
            };
            attempt.checked = true;
            attempt
                .throttle
                .settle(attempt.key, correct, Instant::now());
            drop(turn);
            correct
        });
        if check.await.unwrap_or(false) {
            LoginOutcome::Accepted
        } else {
            LoginOutcome::WrongPassword
        }
    }
}

// An admitted login; given back uncounted if it is dropped before its password was checked.
#[derive(Debug)]
struct Attempt {
    throttle: Arc<LoginThrottle>,
    key: AddressKey,
    checked: bool,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.checked {
            self.throttle.release(self.key);
        }
    }
}

// Recomputes the hash with the stored salt and parameters in `memory` (grown once to the
// parameters' size, then reused) and compares in constant time.
fn verify_password(hash: &str, password: &str, memory: &mut Vec<argon2::Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        return false;
    };
    let algorithm = match parsed.algorithm.as_ref() {
        "argon2id" => argon2::Algorithm::Argon2id,
        "argon2i" => argon2::Algorithm::Argon2i,
        "argon2d" => argon2::Algorithm::Argon2d,
        _ => return false,
    };
    let Ok(params) = argon2::Params::try_from(&parsed) else {
        return false;
    };
    let block_count = params.block_count();
    let argon = Argon2::new(algorithm, argon2::Version::V0x13, params);
    if memory.len() < block_count {
        memory.resize(block_count, argon2::Block::default());
    }
    let expected = expected.as_bytes();
    let mut computed = vec![0u8; expected.len()];
    if argon
        .hash_password_into_with_memory(
            password.as_bytes(),
            salt.as_ref(),
            &mut computed,
            &mut memory[..block_count],
        )
        .is_err()
    {
        return false;
    }
    computed
        .iter()
        .zip(expected)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

fn hash_password(password: &str) -> anyhow::Result<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|err| anyhow::anyhow!("cannot hash the admin password: {err}"))
}

// 20 characters from an alphabet without look-alikes: about 115 bits.
fn generate_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

fn write_private_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;

    let temporary = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&temporary)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Failed and pending logins per address within a sliding window, and failed logins of
/// all addresses together.
///
/// An attempt is counted when it is admitted, before its password is checked, so logins
/// sent at once from one address cannot all be verified: with five in flight or failed
/// within the window, the sixth is refused without hashing. A login that never reached the
/// verification (turned away by a full queue, or its connection gone) is not counted as a
/// failure; one that did is, whether or not anyone waits for its answer.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    addresses: HashMap<AddressKey, AddressRecord>,
    /// The most recent failures of every address, at most [`GLOBAL_FAILED_LOGINS`].
    global_failures: VecDeque<Instant>,
    /// Addresses an admin logged in from lately, with the time of the last success.
    trusted: HashMap<AddressKey, Instant>,
}

#[derive(Debug, Default)]
struct AddressRecord {
    failures: VecDeque<Instant>,
    pending: usize,
}

/// Where an admitted login queues for the verification: lower goes first.
pub type Priority = usize;

impl LoginThrottle {
    /// Admits a login attempt from `key` at `now`, counting it as pending, or says how
    /// long to wait. The returned priority orders the verification queue: an address an
    /// admin logged in from lately first, then by how many attempts the address has in
    /// flight or failed, so a flooding address queues behind everyone else.
    pub fn admit(&self, key: AddressKey, now: Instant) -> Result<Priority, Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *state;
        forget_expired(&mut state.global_failures, now);
        state
            .trusted
            .retain(|_, since| now.saturating_duration_since(*since) < TRUST_PERIOD);
        let trusted = state.trusted.contains_key(&key);
        let (failures, pending, oldest) = match state.addresses.get_mut(&key) {
            Some(record) => {
                forget_expired(&mut record.failures, now);
                (
                    record.failures.len(),
                    record.pending,
                    record.failures.front().copied(),
                )
            }
            None => (0, 0, None),
        };
        let used = failures + pending;
        if used >= MAX_FAILED_LOGINS {
            // Refused until the oldest failure that still counts leaves the window; while
            // attempts are still in flight, shortly.
            let retry_after = match oldest {
                Some(oldest) if failures >= MAX_FAILED_LOGINS => {
                    (oldest + THROTTLE_WINDOW).saturating_duration_since(now)
                }
                _ => Duration::from_secs(1),
            };
            return Err(retry_after.max(Duration::from_secs(1)));
        }
        // Past the global budget an address that is not trusted gets one try per window.
        if state.global_failures.len() >= GLOBAL_FAILED_LOGINS && !trusted && used > 0 {
            let retry_after = state
                .global_failures
                .front()
                .map_or(THROTTLE_WINDOW, |oldest| {
                    (*oldest + THROTTLE_WINDOW).saturating_duration_since(now)
                });
            return Err(retry_after.max(Duration::from_secs(1)));
        }
        if !state.addresses.contains_key(&key) && state.addresses.len() >= MAX_TRACKED_ADDRESSES {
            make_room(&mut state.addresses, now);
        }
        state.addresses.entry(key).or_default().pending += 1;
        Ok(if trusted { 0 } else { 1 + used })
    }

    /// Settles an admitted attempt whose password was checked.
    pub fn settle(&self, key: AddressKey, accepted: bool, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *state;
        let record = state.addresses.entry(key).or_default();
        record.pending = record.pending.saturating_sub(1);
        if accepted {
            record.failures.clear();
            if !state.trusted.contains_key(&key) && state.trusted.len() >= MAX_TRUSTED_ADDRESSES {
                let stalest = state
                    .trusted
                    .iter()
                    .min_by_key(|(_, since)| **since)
                    .map(|(key, _)| *key);
                if let Some(stalest) = stalest {
                    state.trusted.remove(&stalest);
                }
            }
            state.trusted.insert(key, now);
        } else {
            forget_expired(&mut record.failures, now);
            record.failures.push_back(now);
            while record.failures.len() > MAX_FAILED_LOGINS {
                record.failures.pop_front();
            }
            state.global_failures.push_back(now);
            while state.global_failures.len() > GLOBAL_FAILED_LOGINS {
                state.global_failures.pop_front();
            }
        }
        if record.pending == 0 && record.failures.is_empty() {
            state.addresses.remove(&key);
        }
    }

    /// Gives back an admitted attempt that was never checked.
    pub fn release(&self, key: AddressKey) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(record) = state.addresses.get_mut(&key) {
            record.pending = record.pending.saturating_sub(1);
            if record.pending == 0 && record.failures.is_empty() {
                state.addresses.remove(&key);
            }
        }
    }
}

// Forgets addresses with nothing left in the window, else the one with the stalest
// failure among those with nothing in flight.
fn make_room(addresses: &mut HashMap<AddressKey, AddressRecord>, now: Instant) {
    addresses.retain(|_, record| {
        forget_expired(&mut record.failures, now);
        record.pending > 0 || !record.failures.is_empty()
    });
    if addresses.len() < MAX_TRACKED_ADDRESSES {
        return;
    }
    let stalest = addresses
        .iter()
        .filter(|(_, record)| record.pending == 0)
        .min_by_key(|(_, record)| record.failures.back().copied())
        .map(|(key, _)| *key);
    if let Some(stalest) = stalest {
        addresses.remove(&stalest);
    }
}

fn forget_expired(times: &mut VecDeque<Instant>, now: Instant) {
    while times
        .front()
        .is_some_and(|&time| now.saturating_duration_since(time) >= THROTTLE_WINDOW)
    {
        times.pop_front();
    }
}

/// The queue for the verification slot: bounded, ordered by [`Priority`] and then by
/// arrival. When it is full a newcomer of better priority takes the place of the worst
/// waiter, who is told to come back; otherwise the newcomer is.
#[derive(Debug, Default)]
struct VerificationQueue {
    state: Mutex<QueueState>,
}

#[derive(Debug, Default)]
struct QueueState {
    /// Whether a verification holds the slot.
    busy: bool,
    waiting: Vec<Waiter>,
    next_arrival: u64,
}

#[derive(Debug)]
struct Waiter {
    priority: Priority,
    arrival: u64,
    turn: oneshot::Sender<()>,
}

/// The verification slot, held until dropped; then it passes to the best waiter.
#[derive(Debug)]
struct Turn {
    queue: Arc<VerificationQueue>,
}

// A place in the queue. Dropped before its turn came, it leaves the queue; dropped after
// the turn was handed to it but before it was taken, it hands the turn on.
#[derive(Debug)]
struct Place {
    queue: Arc<VerificationQueue>,
    arrival: u64,
    turn: oneshot::Receiver<()>,
}

/// Why a login got no turn at the verification.
#[derive(Debug)]
struct QueueFull;

impl VerificationQueue {
    fn enter(self: &Arc<Self>, priority: Priority) -> Result<Result<Turn, Place>, QueueFull> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.busy && state.waiting.is_empty() {
            state.busy = true;
            return Ok(Ok(Turn {
                queue: Arc::clone(self),
            }));
        }
        if state.waiting.len() >= MAX_QUEUED_LOGINS {
            let worst = state
                .waiting
                .iter()
                .enumerate()
                .max_by_key(|(_, waiter)| (waiter.priority, waiter.arrival))
                .map(|(index, waiter)| (index, waiter.priority));
            match worst {
                // Dropping its sender tells the worst waiter to come back later.
                Some((index, worst)) if worst > priority => drop(state.waiting.swap_remove(index)),
                _ => return Err(QueueFull),
            }
        }
        let arrival = state.next_arrival;
        state.next_arrival += 1;
        let (turn, receiver) = oneshot::channel();
        state.waiting.push(Waiter {
            priority,
            arrival,
            turn,
        });
        Ok(Err(Place {
            queue: Arc::clone(self),
            arrival,
            turn: receiver,
        }))
    }

    // Passes the slot to the best waiter still waiting, or frees it.
    fn pass_on(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let best = state
                .waiting
                .iter()
                .enumerate()
                .min_by_key(|(_, waiter)| (waiter.priority, waiter.arrival))
                .map(|(index, _)| index);
            let Some(best) = best else {
                state.busy = false;
                return;
            };
            let waiter = state.waiting.swap_remove(best);
            if waiter.turn.send(()).is_ok() {
                return;
            }
        }
    }

    async fn wait(place: Place) -> Result<Turn, QueueFull> {
        let mut place = place;
        let outcome = (&mut place.turn).await;
        let queue = Arc::clone(&place.queue);
        // The turn is taken now (or there is none); the place must not hand it on.
        place.arrival = u64::MAX;
        drop(place);
        match outcome {
            Ok(()) => Ok(Turn { queue }),
            Err(_) => Err(QueueFull),
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.queue.pass_on();
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.arrival == u64::MAX {
            return;
        }
        let arrival = self.arrival;
        {
            let mut state = self.queue.state.lock().unwrap_or_else(|e| e.into_inner());
            let before = state.waiting.len();
            state.waiting.retain(|waiter| waiter.arrival != arrival);
            if state.waiting.len() < before {
                return;
            }
        }
        // No longer queued: evicted, or handed the turn as the waiting login went away (the
        // hand-over happens under the lock, so it is complete by now). Pass it on.
        if self.turn.try_recv().is_ok() {
            self.queue.pass_on();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const BOB: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn key(address: IpAddr) -> AddressKey {
        AddressKey::of(address)
    }

    #[test]
    fn attempts_count_when_admitted_not_when_checked() {
        let throttle = LoginThrottle::default();
        let now = Instant::now();
        for _ in 0..MAX_FAILED_LOGINS {
            throttle.admit(key(ALICE), now).unwrap();
        }
        // Five in flight: the sixth is refused before any of them was checked.
        assert_eq!(throttle.admit(key(ALICE), now), Err(Duration::from_secs(1)));
        assert!(throttle.admit(key(BOB), now).is_ok());
        for second in 0..MAX_FAILED_LOGINS as u64 {
            throttle.settle(key(ALICE), false, now + Duration::from_secs(second));
        }
        let later = now + Duration::from_secs(10);
        assert_eq!(
            throttle.admit(key(ALICE), later),
            Err(Duration::from_secs(50))
        );
        // The first failure leaves the window after 60 s; then one more try is allowed.
        assert!(throttle.admit(key(ALICE), now + THROTTLE_WINDOW).is_ok());
    }

    #[test]
    fn an_attempt_given_back_unchecked_is_not_a_failure() {
        let throttle = LoginThrottle::default();
        let now = Instant::now();
        for _ in 0..3 * MAX_FAILED_LOGINS {
            throttle.admit(key(ALICE), now).unwrap();
            throttle.release(key(ALICE));
        }
        assert!(throttle.admit(key(ALICE), now).is_ok());
    }

    #[test]
    fn failures_spread_over_more_than_a_minute_do_not_throttle() {
        let throttle = LoginThrottle::default();
        let start = Instant::now();
        for minute in 0..10 {
            let now = start + Duration::from_secs(61 * minute);
            throttle.admit(key(ALICE), now).unwrap();
            throttle.settle(key(ALICE), false, now);
        }
    }

    #[test]
    fn one_ipv6_host_cannot_rotate_through_its_64() {
        let throttle = LoginThrottle::default();
        let now = Instant::now();
        for host in 0..MAX_FAILED_LOGINS as u16 {
            let address = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 7, host, 0, 0, 1));
            throttle.admit(key(address), now).unwrap();
        }
        let another = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 99, 9, 9, 9));
        assert!(throttle.admit(key(another), now).is_err());
        let next_net = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 8, 0, 0, 0, 1));
        assert!(throttle.admit(key(next_net), now).is_ok());
    }

    #[test]
    fn past_the_global_budget_only_trusted_and_clean_addresses_get_a_try() {
        let throttle = LoginThrottle::default();
        let now = Instant::now();
        let admin = key(IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 9, 9)));
        throttle.admit(admin, now).unwrap();
        throttle.settle(admin, true, now);
        for n in 0..GLOBAL_FAILED_LOGINS as u32 {
            let guesser = key(IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + n)));
            throttle.admit(guesser, now).unwrap();
            throttle.settle(guesser, false, now);
        }
        // A guesser that failed once is refused; a fresh address gets one try; the
        // address the admin logged in from gets as many as ever, and goes first.
        let guesser = key(IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000)));
        assert!(throttle.admit(guesser, now).is_err());
        let fresh = key(IpAddr::V4(std::net::Ipv4Addr::new(10, 7, 7, 7)));
        assert_eq!(throttle.admit(fresh, now), Ok(1));
        assert!(throttle.admit(fresh, now).is_err());
        for _ in 0..MAX_FAILED_LOGINS {
            assert_eq!(throttle.admit(admin, now), Ok(0));
        }
    }

    #[tokio::test]
    async fn the_queue_serves_by_priority_and_evicts_the_worst_when_full() {
        let queue = Arc::new(VerificationQueue::default());
        let Ok(Ok(first)) = queue.enter(3) else {
            panic!("an idle queue gives the turn at once");
        };
        let mut places = Vec::new();
        for _ in 0..MAX_QUEUED_LOGINS {
            let Ok(Err(place)) = queue.enter(5) else {
                panic!("there is room to wait");
            };
            places.push(place);
        }
        // Full of priority-5 waiters: another one is turned away, a better one gets in
        // and the newest of the worst is told to come back.
        assert!(matches!(queue.enter(5), Err(QueueFull)));
        let Ok(Err(admin)) = queue.enter(1) else {
            panic!("a better priority takes a place");
        };
        let evicted = places.pop().unwrap();
        assert!(matches!(
            VerificationQueue::wait(evicted).await,
            Err(QueueFull)
        ));
        drop(first);
        let turn = tokio::time::timeout(Duration::from_secs(1), VerificationQueue::wait(admin))
            .await
            .expect("the admin goes first")
            .unwrap();
        // A waiter that gives up leaves no hole: the turn still reaches the next one.
        let gone = places.remove(0);
        drop(gone);
        drop(turn);
        let next = places.remove(0);
        let turn = tokio::time::timeout(Duration::from_secs(1), VerificationQueue::wait(next))
            .await
            .expect("the turn is passed on")
            .unwrap();
        drop(turn);
        drop(places);
        assert!(
            matches!(queue.enter(9), Ok(Ok(_))),
            "the queue is idle again"
        );
    }

    #[tokio::test]
    async fn a_turn_handed_to_a_waiter_that_went_away_is_passed_on() {
        let queue = Arc::new(VerificationQueue::default());
        let Ok(Ok(first)) = queue.enter(1) else {
            panic!("idle queue");
        };
        let Ok(Err(leaving)) = queue.enter(1) else {
            panic!("room");
        };
        let Ok(Err(staying)) = queue.enter(1) else {
            panic!("room");
        };
        // The turn goes to `leaving`, which is dropped before it takes it.
        drop(first);
        drop(leaving);
        let turn = tokio::time::timeout(Duration::from_secs(1), VerificationQueue::wait(staying))
            .await
            .expect("the turn reaches the next waiter")
            .unwrap();
        drop(turn);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifty_concurrent_wrong_logins_from_one_address_check_at_most_five() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.argon2");
        let (auth, _) = AdminAuth::load_or_create(&file, Some("right".to_owned())).unwrap();
        let logins: Vec<_> = (0..50)
            .map(|_| {
                let auth = auth.clone();
                tokio::spawn(async move { auth.login(ALICE, "wrong".to_owned()).await })
            })
            .collect();
        let admin = auth.login(BOB, "right".to_owned()).await;
        let mut checked = 0;
        for login in logins {
            match login.await.unwrap() {
                LoginOutcome::WrongPassword => checked += 1,
                LoginOutcome::Throttled { .. } | LoginOutcome::Busy { .. } => {}
                LoginOutcome::Accepted => panic!("a wrong password was accepted"),
            }
        }
        assert!(
            checked <= MAX_FAILED_LOGINS,
            "{checked} wrong passwords were checked"
        );
        assert_eq!(admin, LoginOutcome::Accepted);
    }

    #[tokio::test]
    async fn stored_hash_accepts_only_the_right_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.argon2");
        let (auth, origin) =
            AdminAuth::load_or_create(&file, Some("correct horse".to_owned())).unwrap();
        assert_eq!(origin, PasswordOrigin::FromEnvironment);
        let stored = std::fs::read_to_string(&file).unwrap();
        assert!(stored.starts_with("$argon2"), "{stored}");
        assert!(!stored.contains("correct horse"));
        assert_eq!(
            auth.login(ALICE, "correct horse".to_owned()).await,
            LoginOutcome::Accepted
        );
        assert_eq!(
            auth.login(ALICE, "wrong".to_owned()).await,
            LoginOutcome::WrongPassword
        );

        // A later start keeps the stored password whatever the environment says.
        let (again, origin) = AdminAuth::load_or_create(&file, Some("other".to_owned())).unwrap();
        assert_eq!(origin, PasswordOrigin::Stored);
        assert_eq!(
            again.login(BOB, "correct horse".to_owned()).await,
            LoginOutcome::Accepted
        );
    }

    #[test]
    fn generated_password_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.argon2");
        let (_, origin) = AdminAuth::load_or_create(&file, None).unwrap();
        let PasswordOrigin::Generated(password) = origin else {
            panic!("expected a generated password, got {origin:?}");
        };
        assert_eq!(password.len(), 20);
        let (_, origin) = AdminAuth::load_or_create(&file, None).unwrap();
        assert_eq!(origin, PasswordOrigin::Stored);
    }
}
