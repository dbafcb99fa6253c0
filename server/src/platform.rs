//! What differs between operating systems, behind one module.
//!
//! The open-file limit: one file descriptor per connection, so the soft limit (often 1024
//! in an interactive shell or a service without `LimitNOFILE`) would cap the server long
//! before memory does. Only the soft limit can be raised without privileges, and only up
//! to the hard limit; child processes inherit whatever this process set.

#[cfg(unix)]
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The open-file limit before and after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// The soft limit this process started with (`None`: unlimited).
    pub soft_before: Option<u64>,
    /// The soft limit now in force.
    pub soft: Option<u64>,
    /// The hard limit, the ceiling for the soft one.
    pub hard: Option<u64>,
}

impl std::fmt::Display for OpenFileLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |limit: Option<u64>| limit.map_or("unlimited".to_owned(), |n| n.to_string());
        write!(
            f,
            "open-file limit {} (was {}, hard {})",
            show(self.soft),
            show(self.soft_before),
            show(self.hard)
        )
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit.
#[cfg(unix)]
pub fn raise_open_file_limit() -> std::io::Result<OpenFileLimit> {
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: before.maximum,
                maximum: before.maximum,
            },
        )?;
    }
    let after = getrlimit(Resource::Nofile);
    Ok(OpenFileLimit {
        soft_before: before.current,
        soft: after.current,
        hard: after.maximum,
    })
}

/// Other systems have no such limit to raise.
#[cfg(not(unix))]
pub fn raise_open_file_limit() -> std::io::Result<OpenFileLimit> {
    Ok(OpenFileLimit {
        soft_before: None,
        soft: None,
        hard: None,
    })
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let limit = raise_open_file_limit().unwrap();
        assert_eq!(limit.soft, limit.hard);
        // Raising twice changes nothing.
        assert_eq!(raise_open_file_limit().unwrap().soft, limit.soft);
    }
}
