//! The local events stream: what a running agent tells the client application on its own
//! workstation, one JSON object per line.
//!
//! `changeover-agent run` serves the stream on an endpoint only the workstation's own user
//! can open (a Unix domain socket in the agent's state folder, a named pipe on Windows), and
//! `changeover-agent events --json` prints it, so the vendor's client can show its own
//! countdown and close itself at the logout instead of being driven by a shell hook. Every
//! line is an [`AgentEvent`]: the `event` tag, its fields and `at`. The first line of every
//! connection is a [`AgentEventKind::State`] snapshot, so a client started during a
//! countdown still learns of the warning.
//!
//! These types are for the vendor's client to reuse. A reader must ignore fields it does not
//! know and read an `event` it does not know as [`AgentEventKind::Unknown`]: newer agents
//! add both. Not here: how the agent serves the stream (`client-agent/src/events.rs`), and
//! the WebSocket messages these events are made from ([`crate::messages`]).

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::messages::rfc3339;

/// The longest line a reader needs to accept, newline included. Every text in an event
/// comes from a server message of at most [`crate::MAX_MESSAGE_BYTES`], and at most a few of
/// them go into one line.
pub const MAX_EVENT_LINE_BYTES: usize = 256 * 1024;

/// One line of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEvent {
    #[serde(flatten)]
    pub kind: AgentEventKind,
    /// When the agent saw it happen (for `state`: when the snapshot was taken).
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
}

/// What happened, tagged by `event`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AgentEventKind {
    /// The first line of every connection: what the agent knows right now.
    State(AgentState),
    /// The server welcomed the agent.
    Connected {
        /// The server's URL, as the agent was started with it.
        server: String,
        server_version: String,
    },
    /// A session that was up ended (not sent for attempts that never got a session, nor
    /// after a `logout`, which ends the session itself).
    Disconnected { reason: String },
    /// The server announced its update: save your work.
    Warning(CountdownWarning),
    /// The announced update was called off.
    Cancelled {
        changeover_id: String,
        /// What the agent shows its user.
        message: String,
    },
    /// The server logged this session out for its update: close the application now. The
    /// agent reconnects within `reconnect_within_ms`.
    Logout {
        changeover_id: String,
        /// The server's reason.
        reason: String,
        reconnect_within_ms: u64,
        /// What the agent shows its user.
        message: String,
    },
    /// The server offered this agent a newer release of itself, and the agent takes it up.
    UpdateOffered { version: String },
    /// The agent is fetching (`downloading`) or putting in place (`installing`) its update.
    UpdateInstalling { version: String, step: UpdateStep },
    /// The new release is in place and the agent restarts into it now: the stream ends,
    /// and the new agent's `state` names the new `agent_version`.
    UpdateInstalled { version: String },
    /// The update failed, or the new release was put back after a failed trial; the agent
    /// keeps running the release it runs.
    UpdateFailed { version: String, reason: String },
    /// The agent's policy (`--client-update never`, the ask hook) declined the update.
    UpdateDeclined { version: String, reason: String },
    /// An event this build does not know (sent by a newer agent).
    #[serde(other)]
    Unknown,
}

impl AgentEventKind {
    /// The `event` tag.
    pub fn name(&self) -> &'static str {
        match self {
            AgentEventKind::State(_) => "state",
            AgentEventKind::Connected { .. } => "connected",
            AgentEventKind::Disconnected { .. } => "disconnected",
            AgentEventKind::Warning(_) => "warning",
            AgentEventKind::Cancelled { .. } => "cancelled",
            AgentEventKind::Logout { .. } => "logout",
            AgentEventKind::UpdateOffered { .. } => "update_offered",
            AgentEventKind::UpdateInstalling { .. } => "update_installing",
            AgentEventKind::UpdateInstalled { .. } => "update_installed",
            AgentEventKind::UpdateFailed { .. } => "update_failed",
            AgentEventKind::UpdateDeclined { .. } => "update_declined",
            AgentEventKind::Unknown => "unknown",
        }
    }
}

/// A countdown warning as the agent passes it on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountdownWarning {
    pub changeover_id: String,
    /// When the logout comes.
    #[serde(with = "rfc3339")]
    pub deadline: SystemTime,
    /// Seconds from `at` to the deadline.
    pub seconds_left: u64,
    /// The server version being installed.
    pub target_version: String,
    /// What the agent shows its user.
    pub message: String,
}

/// The snapshot a connection starts with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// Whether the agent has a session with the server now.
    pub connected: bool,
    /// The server's URL, as the agent was started with it.
    pub server: String,
    /// The server's version while connected, else null.
    pub server_version: Option<String>,
    /// The version of the running agent.
    pub agent_version: String,
    /// The warning counting down now (its `seconds_left` as of `at`), else null.
    pub warning: Option<CountdownWarning>,
}

/// The part of its update the agent is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateStep {
    /// Fetching the archive from the server (or waiting for its turn to).
    Downloading,
    /// The archive verified; unpacking, checking and putting it in place.
    Installing,
    /// A step this build does not know (sent by a newer agent).
    #[serde(other)]
    Unknown,
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn warning() -> CountdownWarning {
        CountdownWarning {
            changeover_id: "c-20261128-2200".to_owned(),
            deadline: at(1_795_903_320),
            seconds_left: 120,
            target_version: "2.4.0".to_owned(),
            message: "The server is updated to 2.4.0: please save your work".to_owned(),
        }
    }

    /// One event of every kind, with the exact line each one travels as.
    fn every_kind() -> Vec<(AgentEventKind, &'static str)> {
        let all = vec![
            (
                AgentEventKind::State(AgentState {
                    connected: true,
                    server: "ws://server-host:7600".to_owned(),
                    server_version: Some("2.3.0".to_owned()),
                    agent_version: "2.3.0".to_owned(),
                    warning: Some(warning()),
                }),
                r#"{"event":"state","connected":true,"server":"ws://server-host:7600","server_version":"2.3.0","agent_version":"2.3.0","warning":{"changeover_id":"c-20261128-2200","deadline":"2026-11-28T22:02:00Z","seconds_left":120,"target_version":"2.4.0","message":"The server is updated to 2.4.0: please save your work"},"at":"2026-11-28T22:00:00Z"}"#,
            ),
            (
                AgentEventKind::Connected {
                    server: "ws://server-host:7600".to_owned(),
                    server_version: "2.3.0".to_owned(),
                },
                r#"{"event":"connected","server":"ws://server-host:7600","server_version":"2.3.0","at":"2026-11-28T22:00:00Z"}"#,
            ),
            (
                AgentEventKind::Disconnected {
                    reason: "connection closed".to_owned(),
                },
                r#"{"event":"disconnected","reason":"connection closed","at":"2026-11-28T22:00:00Z"}"#,
            ),
            (
                AgentEventKind::Warning(warning()),
                r#"{"event":"warning","changeover_id":"c-20261128-2200","deadline":"2026-11-28T22:02:00Z","seconds_left":120,"target_version":"2.4.0","message":"The server is updated to 2.4.0: please save your work","at":"2026-11-28T22:00:00Z"}"#,
            ),
            (
                AgentEventKind::Cancelled {
                    changeover_id: "c-20261128-2200".to_owned(),
                    message: "the update was called off".to_owned(),
                },
                r#"{"event":"cancelled","changeover_id":"c-20261128-2200","message":"the update was called off","at":"2026-11-28T22:00:00Z"}"#,
            ),
            (
                AgentEventKind::Logout {
                    changeover_id: "c-20261128-2200".to_owned(),
                    reason: "the server is being updated to version 2.4.0".to_owned(),
                    reconnect_within_ms: 2006,
                    message: "the server is being updated to version 2.4.0".to_owned(),
                },
                r#"{"event":"logout","changeover_id":"c-20261128-2200","reason":"the server is being updated to version 2.4.0","reconnect_within_ms":2006,"message":"the server is being updated to version 2.4.0","at":"2026-11-28T22:00:00Z"}"#,
            ),
            (
                AgentEventKind::UpdateOffered {
                    version: "2.4.0".to_owned(),
                },
                r#"{"event":"update_offered","version":"2.4.0","at":"2026-11-28T22:00:00Z"}"#,
            ),
            (
                AgentEventKind::UpdateInstalling {
                    version: "2.4.0".to_owned(),
                    step: UpdateStep::Downloading,
                },
                r#"{"event":"update_installing","version":"2.4.0","step":"downloading","at":"2026-11-28T22:00:00Z"}"#,
            ),
            (
                AgentEventKind::UpdateInstalled {
                    version: "2.4.0".to_owned(),
                },
                r#"{"event":"update_installed","version":"2.4.0","at":"2026-11-28T22:00:00Z"}"#,
            ),
            (
                AgentEventKind::UpdateFailed {
                    version: "2.4.0".to_owned(),
                    reason: "the new agent's --version failed".to_owned(),
                },
                r#"{"event":"update_failed","version":"2.4.0","reason":"the new agent's --version failed","at":"2026-11-28T22:00:00Z"}"#,
            ),
            (
                AgentEventKind::UpdateDeclined {
                    version: "2.4.0".to_owned(),
                    reason: "this agent runs with --client-update never".to_owned(),
                },
                r#"{"event":"update_declined","version":"2.4.0","reason":"this agent runs with --client-update never","at":"2026-11-28T22:00:00Z"}"#,
            ),
        ];
        // A new kind fails to compile here until it is added above (and documented).
        for (kind, _) in &all {
            match kind {
                AgentEventKind::State(_)
                | AgentEventKind::Connected { .. }
                | AgentEventKind::Disconnected { .. }
                | AgentEventKind::Warning(_)
                | AgentEventKind::Cancelled { .. }
                | AgentEventKind::Logout { .. }
                | AgentEventKind::UpdateOffered { .. }
                | AgentEventKind::UpdateInstalling { .. }
                | AgentEventKind::UpdateInstalled { .. }
                | AgentEventKind::UpdateFailed { .. }
                | AgentEventKind::UpdateDeclined { .. }
                | AgentEventKind::Unknown => {}
            }
        }
        all
    }

    #[test]
    fn every_event_travels_as_its_pinned_line_and_reads_back() {
        for (kind, line) in every_kind() {
            let event = AgentEvent {
                kind,
                at: at(1_795_903_200),
            };
            assert_eq!(serde_json::to_string(&event).unwrap(), line);
            let read: AgentEvent = serde_json::from_str(line).unwrap();
            assert_eq!(read, event);
            assert!(line.starts_with(&format!("{{\"event\":\"{}\"", event.kind.name())));
        }
    }

    #[test]
    fn a_reader_takes_what_newer_agents_add() {
        let newer =
            r#"{"event":"update_reboot_needed","version":"3.0.0","at":"2027-01-01T00:00:00Z"}"#;
        let read: AgentEvent = serde_json::from_str(newer).unwrap();
        assert_eq!(read.kind, AgentEventKind::Unknown);
        let extra = r#"{"event":"update_installing","version":"3.0.0","step":"verifying","percent":40,"at":"2027-01-01T00:00:00Z"}"#;
        let read: AgentEvent = serde_json::from_str(extra).unwrap();
        assert_eq!(
            read.kind,
            AgentEventKind::UpdateInstalling {
                version: "3.0.0".to_owned(),
                step: UpdateStep::Unknown
            }
        );
        let idle = r#"{"event":"state","connected":false,"server":"ws://h:7600","server_version":null,"agent_version":"1.0.0","warning":null,"at":"2027-01-01T00:00:00Z"}"#;
        let read: AgentEvent = serde_json::from_str(idle).unwrap();
        assert!(matches!(
            read.kind,
            AgentEventKind::State(AgentState {
                connected: false,
                warning: None,
                ..
            })
        ));
        assert!(serde_json::from_str::<AgentEvent>(r#"{"event":"warning"}"#).is_err());
    }

    // Every line in a ```ndjson block of PROTOCOL.md's events section is an event that
    // serialises back to itself, and every kind has one.
    #[test]
    fn protocol_md_shows_every_event_as_it_travels() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
        let text = std::fs::read_to_string(path).unwrap();
        let mut shown = std::collections::BTreeSet::new();
        let mut inside = false;
        for (index, line) in text.lines().enumerate() {
            match (inside, line.trim_end()) {
                (false, "```ndjson") => inside = true,
                (true, "```") => inside = false,
                (true, line) => {
                    let number = index + 1;
                    let value: serde_json::Value = serde_json::from_str(line)
                        .unwrap_or_else(|err| panic!("PROTOCOL.md line {number}: {err}"));
                    let event: AgentEvent = serde_json::from_value(value.clone())
                        .unwrap_or_else(|err| panic!("PROTOCOL.md line {number}: {err}"));
                    assert_ne!(
                        event.kind,
                        AgentEventKind::Unknown,
                        "PROTOCOL.md line {number}"
                    );
                    assert_eq!(
                        serde_json::to_value(&event).unwrap(),
                        value,
                        "PROTOCOL.md line {number} does not serialise back to itself"
                    );
                    shown.insert(event.kind.name());
                }
                (false, _) => {}
            }
        }
        assert!(!inside, "PROTOCOL.md ends inside a ```ndjson block");
        for (kind, _) in every_kind() {
            assert!(
                shown.contains(kind.name()),
                "PROTOCOL.md has no ```ndjson line of the event {:?}",
                kind.name()
            );
        }
    }
}
