//! What travels between a changeover server and its agents, and what the release feed holds.
//!
//! This crate is the only place that defines bytes on the wire and in the feed: the
//! WebSocket messages ([`messages`]), the close codes a side ends a connection with
//! ([`close`]), the rule for which protocol versions can talk to each other ([`version`]),
//! and releases, feed manifests and their signatures ([`release`], [`package`]). Both the
//! server and the agent depend on it; it depends on neither. It does no network I/O; only
//! [`package`] reads and writes files, to verify and unpack a release.

pub mod agent_events;
pub mod backoff;
pub mod close;
pub mod messages;
pub mod package;
pub mod release;
pub mod text;
pub mod version;

pub use close::CloseCode;
pub use messages::{
    AgentHello, AgentUpdateOffer, AgentUpdateState, AgentUpdateView, AppState, AppStatus,
    CandidateState, CandidateStatus, ChangeoverOutcome, ChangeoverPhase, ChangeoverSummary,
    ChangeoverView, ClientMessage, DecodeError, ErrorCode, FeedStatus, OutboxEntry, PackageSource,
    ServerMessage, SessionView, StatusReport,
};
pub use version::{MAX_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// The largest WebSocket message either side accepts, in bytes.
///
/// Every message of protocol 1 fits in a few hundred bytes; a status report with
/// thousands of sessions is the exception, which is why only admin clients (which
/// receive status reports) raise their limit, see [`MAX_STATUS_MESSAGE_BYTES`].
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The largest message an admin client accepts: a status report listing every session.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Sessions a status report lists at most (the oldest); `sessions_total` counts them all.
/// With every field at its limit of [`text`] a session takes under 4.5 KB of JSON, so the
/// report stays well under [`MAX_STATUS_MESSAGE_BYTES`].
pub const MAX_LISTED_SESSIONS: usize = 10_000;
