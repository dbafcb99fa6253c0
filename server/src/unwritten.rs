//! What the server could not write to disk, and why: a full disk must never keep the server
//! from starting or serving, so a failed write of a summary, the log, the outbox or the
//! audit log is recorded here instead of ending anything. `admin status` (`disk_problems`)
//! and the console list it, and each entry is cleared as soon as its write succeeds again
//! (the writers retry: see `changeover::journal::retry_unwritten`).
//!
//! One registry per process, like the log it also serves: the log writer itself reports
//! here, and it cannot log its own failure.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// What could not be written, by what it is (`"summary"`, `"log"`, `"outbox"`, …).
static PROBLEMS: Mutex<BTreeMap<&'static str, String>> = Mutex::new(BTreeMap::new());

fn problems() -> std::sync::MutexGuard<'static, BTreeMap<&'static str, String>> {
    PROBLEMS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records that `what` could not be written; `true` when this is news (so the caller logs
/// it once, not on every retry).
pub fn report(what: &'static str, problem: impl Into<String>) -> bool {
    problems().insert(what, problem.into()).is_none()
}

/// `what` was written after all; `true` when it had been reported.
pub fn clear(what: &'static str) -> bool {
    problems().remove(what).is_some()
}

/// Every write that is failing now, as sentences.
pub fn list() -> Vec<String> {
    problems().values().cloned().collect()
}

/// Whether `what` is failing now.
pub fn is_failing(what: &'static str) -> bool {
    problems().contains_key(what)
}

/// Whether an I/O error says the disk (or the user's quota) is full.
pub fn is_full(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_is_news_once_and_gone_when_cleared() {
        assert!(report(
            "test-only",
            "cannot write x: No space left on device"
        ));
        assert!(!report(
            "test-only",
            "cannot write x: No space left on device"
        ));
        assert!(is_failing("test-only"));
        assert!(
            list()
                .iter()
                .any(|problem| problem.starts_with("cannot write x"))
        );
        assert!(clear("test-only"));
        assert!(!clear("test-only"));
        assert!(!is_failing("test-only"));
    }
}
