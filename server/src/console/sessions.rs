//! The web console's login sessions.
//!
//! A session is a random token in an `HttpOnly` cookie, and a second random token the page
//! sends in a header with every action (CSRF protection: another site can make the browser
//! send the cookie, but cannot read the token). Sessions are kept in
//! `state/console-sessions.json` — the token only as its SHA-256, so the file does not let
//! anyone log in — so that an admin watching a changeover stays logged in across the
//! server's restart into the new release. A session ends at logout, after [`IDLE`] without
//! a request, or [`LIFETIME`] after the login.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tracing::warn;

/// A session unused this long ends.
pub const IDLE: Duration = Duration::from_secs(60 * 60);
/// A session ends this long after its login, used or not.
pub const LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);
/// Sessions held at once; a login beyond that ends the oldest.
pub const MAX_SESSIONS: usize = 64;
/// `last_seen` is written to the file at most this often per session.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// One logged-in browser.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    csrf: String,
    address: String,
    created_secs: u64,
    last_seen_secs: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    /// By the hex SHA-256 of the cookie's token.
    sessions: HashMap<String, Session>,
}

/// What a new login gets.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// Goes into the cookie.
    pub token: String,
    /// Goes into the page, which sends it back with every action.
    pub csrf: String,
}

/// The sessions of this server, shared by its connections.
#[derive(Debug)]
pub struct Sessions {
    path: PathBuf,
    stored: Mutex<Stored>,
}

impl Sessions {
    /// Loads the sessions a previous process of this server left (expired ones dropped);
    /// none when the file is missing or unreadable.
    pub fn load(state_dir: &Path) -> Sessions {
        let path = state_dir.join("console-sessions.json");
        let mut stored: Stored = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let now = now_secs();
        stored.sessions.retain(|_, session| alive(session, now));
        Sessions {
            path,
            stored: Mutex::new(stored),
        }
    }

    /// Starts a session for a browser that gave the right password.
    pub fn create(&self, address: std::net::IpAddr) -> NewSession {
        let token = random_token();
        let csrf = random_token();
        let now = now_secs();
        let mut stored = self.lock();
        stored.sessions.retain(|_, session| alive(session, now));
        while stored.sessions.len() >= MAX_SESSIONS {
            let Some(oldest) = stored
                .sessions
                .iter()
                .min_by_key(|(_, session)| session.last_seen_secs)
                .map(|(key, _)| key.clone())
            else {
                break;
            };
            stored.sessions.remove(&oldest);
        }
        stored.sessions.insert(
            digest(&token),
            Session {
                csrf: csrf.clone(),
                address: address.to_string(),
                created_secs: now,
                last_seen_secs: now,
            },
        );
        self.save(&stored);
        NewSession { token, csrf }
    }

    /// The CSRF token of the session the cookie names, if it is alive; counts as use.
    pub fn check(&self, token: &str) -> Option<String> {
        let now = now_secs();
        let key = digest(token);
        let mut stored = self.lock();
        let session = stored.sessions.get_mut(&key)?;
        if !alive(session, now) {
            stored.sessions.remove(&key);
            self.save(&stored);
            return None;
        }
        let csrf = session.csrf.clone();
        if now.saturating_sub(session.last_seen_secs) >= TOUCH_EVERY.as_secs() {
            session.last_seen_secs = now;
            self.save(&stored);
        }
        Some(csrf)
    }

    /// Ends the session the cookie names.
    pub fn remove(&self, token: &str) {
        let mut stored = self.lock();
        if stored.sessions.remove(&digest(token)).is_some() {
            self.save(&stored);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stored> {
        self.stored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    // Best effort: a session that cannot be written (a full disk) still works until the
    // server restarts.
    fn save(&self, stored: &Stored) {
        let written = serde_json::to_vec(stored)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| crate::release_tools::write_atomically(&self.path, &bytes, true));
        if let Err(err) = written {
            warn!(path = %self.path.display(), cause = %format!("{err:#}"), "cannot write the console sessions");
        }
    }
}

/// Compares two tokens in time independent of where they differ.
pub fn same_token(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

fn alive(session: &Session, now: u64) -> bool {
    now.saturating_sub(session.last_seen_secs) < IDLE.as_secs()
        && now.saturating_sub(session.created_secs) < LIFETIME.as_secs()
}

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRESS: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_session_survives_a_restart_and_ends_at_logout() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = Sessions::load(dir.path());
        let new = sessions.create(ADDRESS);
        assert_eq!(sessions.check(&new.token), Some(new.csrf.clone()));

        let file = std::fs::read_to_string(dir.path().join("console-sessions.json")).unwrap();
        assert!(!file.contains(&new.token), "the token itself is not stored");

        let after_restart = Sessions::load(dir.path());
        assert_eq!(after_restart.check(&new.token), Some(new.csrf));
        after_restart.remove(&new.token);
        assert_eq!(after_restart.check(&new.token), None);
        assert_eq!(Sessions::load(dir.path()).check(&new.token), None);
    }

    #[test]
    fn unknown_and_expired_sessions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = Sessions::load(dir.path());
        assert_eq!(sessions.check("not-a-session"), None);
        let new = sessions.create(ADDRESS);
        {
            let mut stored = sessions.lock();
            let session = stored.sessions.values_mut().next().unwrap();
            session.last_seen_secs -= IDLE.as_secs();
        }
        assert_eq!(sessions.check(&new.token), None);
    }

    #[test]
    fn logins_beyond_the_cap_end_the_oldest_session() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = Sessions::load(dir.path());
        let first = sessions.create(ADDRESS);
        {
            let mut stored = sessions.lock();
            stored.sessions.values_mut().next().unwrap().last_seen_secs -= 10;
        }
        for _ in 0..MAX_SESSIONS {
            sessions.create(ADDRESS);
        }
        assert_eq!(sessions.lock().sessions.len(), MAX_SESSIONS);
        assert_eq!(sessions.check(&first.token), None);
    }

    #[test]
    fn tokens_compare_only_when_equal() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "abcd"));
        assert!(!same_token("", "a"));
    }
}
