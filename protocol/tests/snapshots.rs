//! The exact JSON of every wire message, pinned in `tests/snapshots/`, so any change to what
//! goes on the wire shows up as a diff in review.
//!
//! After an intended change, run `INSTA_UPDATE=always cargo test -p changeover-protocol` and
//! review the changed `.snap` files.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use changeover_protocol::version::ProtocolRange;
use changeover_protocol::{
    AgentHello, ChangeoverPhase, ClientMessage, ErrorCode, ServerMessage, SessionView, StatusReport,
};

/// A fixed moment, so snapshots do not change from run to run.
fn at(seconds_since_epoch: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds_since_epoch)
}

fn hello() -> ClientMessage {
    ClientMessage::Hello(AgentHello {
        protocol_version: 1,
        agent_id: "5f0c2a9e-3b7d-4e61-9c28-7a1d4b6e0f93".to_owned(),
        user: "mkoenig".to_owned(),
        host: "ws-accounting-07".to_owned(),
        platform: "windows-x86_64".to_owned(),
        agent_version: "2.3.0".to_owned(),
    })
}

fn admin_login() -> ClientMessage {
    ClientMessage::AdminLogin {
        protocol_version: 1,
        password: "Nq7wHk3tRzp9XbE2mVcY".to_owned(),
    }
}

fn welcome() -> ServerMessage {
    ServerMessage::Welcome {
        protocol_version: 1,
        server_version: "2.3.0".to_owned(),
        session_id: 4182,
        heartbeat_secs: 25,
    }
}

fn admin_welcome() -> ServerMessage {
    ServerMessage::AdminWelcome {
        protocol_version: 1,
        server_version: "2.3.0".to_owned(),
    }
}

fn status() -> ServerMessage {
    ServerMessage::Status(StatusReport {
        server_version: "2.3.0".to_owned(),
        available_version: Some("2.4.0".to_owned()),
        phase: ChangeoverPhase::Idle,
        sessions: vec![
            SessionView {
                session_id: 4181,
                agent_id: "c2b8e4f1-6a0d-4f3e-8b57-1e9d2c4a7b60".to_owned(),
                user: "aschmidt".to_owned(),
                host: "ws-reception-01".to_owned(),
                platform: "linux-x86_64".to_owned(),
                agent_version: "2.3.0".to_owned(),
                protocol_version: 1,
                address: "10.20.4.31:51822".to_owned(),
                // 2026-11-28T07:58:41Z
                connected_since: at(1_795_852_721),
            },
            SessionView {
                session_id: 4182,
                agent_id: "5f0c2a9e-3b7d-4e61-9c28-7a1d4b6e0f93".to_owned(),
                user: "mkoenig".to_owned(),
                host: "ws-accounting-07".to_owned(),
                platform: "windows-x86_64".to_owned(),
                agent_version: "2.3.0".to_owned(),
                protocol_version: 1,
                address: "[fd00:20:7::112]:60315".to_owned(),
                // 2026-11-28T09:15:02Z
                connected_since: at(1_795_857_302),
            },
        ],
    })
}

fn error_plain() -> ServerMessage {
    ServerMessage::error(ErrorCode::Unauthorized, "wrong admin password")
}

fn error_unsupported_protocol() -> ServerMessage {
    ServerMessage::Error {
        code: ErrorCode::UnsupportedProtocol,
        message: "this server speaks protocol 1, the peer speaks 2; update the agent \
                  (or the server) so they overlap"
            .to_owned(),
        retry_after_secs: None,
        supported_protocol: Some(ProtocolRange { min: 1, max: 1 }),
    }
}

fn error_throttled() -> ServerMessage {
    ServerMessage::Error {
        code: ErrorCode::Throttled,
        message: "too many failed logins from 10.20.7.112; try again in 42 s".to_owned(),
        retry_after_secs: Some(42),
        supported_protocol: None,
    }
}

/// One sample of every client message, named as its snapshot.
fn client_samples() -> Vec<(&'static str, ClientMessage)> {
    vec![
        ("hello", hello()),
        ("admin_login", admin_login()),
        ("status_request", ClientMessage::StatusRequest),
    ]
}

/// One sample of every server message, named as its snapshot; `error` once per shape.
fn server_samples() -> Vec<(&'static str, ServerMessage)> {
    vec![
        ("welcome", welcome()),
        ("admin_welcome", admin_welcome()),
        ("status", status()),
        ("error", error_plain()),
        ("error_unsupported_protocol", error_unsupported_protocol()),
        ("error_throttled", error_throttled()),
    ]
}

#[test]
fn client_messages() {
    for (name, message) in client_samples() {
        insta::assert_json_snapshot!(name, message);
    }
}

#[test]
fn server_messages() {
    for (name, message) in server_samples() {
        insta::assert_json_snapshot!(name, message);
    }
}

// The names a reader may meet in `code` and `phase`, as they travel.
#[test]
fn code_and_phase_names() {
    insta::assert_json_snapshot!("error_codes", common::unit_variants::<ErrorCode>());
    insta::assert_json_snapshot!(
        "changeover_phases",
        common::unit_variants::<ChangeoverPhase>()
    );
}

// A new message type fails here until it has a sample above, and so a snapshot.
#[test]
fn every_message_type_has_a_sample() {
    let client: BTreeSet<String> = client_samples()
        .iter()
        .map(|(_, message)| type_of(serde_json::to_value(message)))
        .collect();
    let server: BTreeSet<String> = server_samples()
        .iter()
        .map(|(_, message)| type_of(serde_json::to_value(message)))
        .collect();
    for message_type in common::tagged_variants::<ClientMessage>() {
        assert!(
            client.contains(message_type),
            "no sample of the client message {message_type:?}"
        );
    }
    for message_type in common::tagged_variants::<ServerMessage>() {
        assert!(
            server.contains(message_type),
            "no sample of the server message {message_type:?}"
        );
    }
}

fn type_of(value: serde_json::Result<serde_json::Value>) -> String {
    let value = value.expect("a message serialises");
    value["type"]
        .as_str()
        .expect("a message has a type")
        .to_owned()
}
