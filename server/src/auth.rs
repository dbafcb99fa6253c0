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
use tokio::sync::Semaphore;

/// The environment variable that sets the admin password on first start.
pub const ADMIN_PASSWORD_ENV: &str = "CHANGEOVER_ADMIN_PASSWORD";

/// Failed logins allowed per address within [`THROTTLE_WINDOW`].
pub const MAX_FAILED_LOGINS: usize = 5;

/// The window in which failed logins are counted.
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(60);

// Addresses remembered at most; past this the oldest entry goes, so a flood of spoofed
// sources cannot grow the table without bound.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

// Password checks running at once: argon2 is deliberately expensive, and each check needs
// its working memory (the hash's `m`, 19 MiB by default).
const CONCURRENT_VERIFICATIONS: usize = 1;

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
    verification_slots: Arc<Semaphore>,
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
            verification_slots: Arc::new(Semaphore::new(CONCURRENT_VERIFICATIONS)),
            working_memory: Arc::new(Mutex::new(Vec::new())),
        };
        Ok((auth, origin))
    }

    /// Checks a login from `address`, counting failures against it.
    pub async fn login(&self, address: IpAddr, password: String) -> LoginOutcome {
        if let Some(retry_after) = self.throttle.refusal(address, Instant::now()) {
            return LoginOutcome::Throttled { retry_after };
        }
        let correct = self.verify(password).await;
        if correct {
            LoginOutcome::Accepted
        } else {
            self.throttle.record_failure(address, Instant::now());
            LoginOutcome::WrongPassword
        }
    }

    async fn verify(&self, password: String) -> bool {
        let Ok(_slot) = self.verification_slots.acquire().await else {
            return false;
        };
        let hash = Arc::clone(&self.password_hash);
        let memory = Arc::clone(&self.working_memory);
        tokio::task::spawn_blocking(move || {
            let mut memory = memory.lock().unwrap_or_else(|e| e.into_inner());
            verify_password(&hash, &password, &mut memory)
        })
        .await
        .unwrap_or(false)
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

/// Failed logins per client address within a sliding window.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl LoginThrottle {
    /// Whether `address` is refused at `now`, and for how long.
    pub fn refusal(&self, address: IpAddr, now: Instant) -> Option<Duration> {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let recent = failures.get_mut(&address)?;
        forget_expired(recent, now);
        if recent.len() < MAX_FAILED_LOGINS {
            return None;
        }
        // Refused until the oldest failure that still counts leaves the window.
        let oldest = *recent.front()?;
        Some(
            (oldest + THROTTLE_WINDOW)
                .saturating_duration_since(now)
                .max(Duration::from_secs(1)),
        )
    }

    /// Counts a failed login of `address` at `now`.
    pub fn record_failure(&self, address: IpAddr, now: Instant) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if !failures.contains_key(&address) && failures.len() >= MAX_TRACKED_ADDRESSES {
            failures.retain(|_, times| {
                forget_expired(times, now);
                !times.is_empty()
            });
            if failures.len() >= MAX_TRACKED_ADDRESSES {
                let stalest = failures
                    .iter()
                    .min_by_key(|(_, times)| times.back().copied())
                    .map(|(address, _)| *address);
                if let Some(stalest) = stalest {
                    failures.remove(&stalest);
                }
            }
        }
        let recent = failures.entry(address).or_default();
        forget_expired(recent, now);
        recent.push_back(now);
        while recent.len() > MAX_FAILED_LOGINS {
            recent.pop_front();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const BOB: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn throttles_after_five_failures_within_a_minute_per_address() {
        let throttle = LoginThrottle::default();
        let start = Instant::now();
        for second in 0..MAX_FAILED_LOGINS as u64 {
            assert_eq!(throttle.refusal(ALICE, start), None);
            throttle.record_failure(ALICE, start + Duration::from_secs(second));
        }
        let now = start + Duration::from_secs(10);
        assert_eq!(throttle.refusal(ALICE, now), Some(Duration::from_secs(50)));
        assert_eq!(throttle.refusal(BOB, now), None);
        // The first failure leaves the window after 60 s; then one more try is allowed.
        assert_eq!(throttle.refusal(ALICE, start + THROTTLE_WINDOW), None);
    }

    #[test]
    fn failures_spread_over_more_than_a_minute_do_not_throttle() {
        let throttle = LoginThrottle::default();
        let start = Instant::now();
        for minute in 0..10 {
            let now = start + Duration::from_secs(61 * minute);
            assert_eq!(throttle.refusal(ALICE, now), None);
            throttle.record_failure(ALICE, now);
        }
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
