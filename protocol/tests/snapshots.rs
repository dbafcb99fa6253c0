//! The exact JSON of every wire message and of the release feed's files, pinned in
//! `tests/snapshots/`, so any change to what goes on the wire or into a feed shows up as a
//! diff in review.
//!
//! After an intended change, run `INSTA_UPDATE=always cargo test -p changeover-protocol` and
//! review the changed `.snap` files.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use changeover_protocol::release::{FeedManifest, PRODUCT, PackageEntry, ReleaseKind};
use changeover_protocol::version::ProtocolRange;
use changeover_protocol::{
    AgentHello, CandidateState, CandidateStatus, ChangeoverPhase, ClientMessage, ErrorCode,
    FeedStatus, PackageSource, ServerMessage, SessionView, StatusReport,
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

fn download_request() -> ClientMessage {
    ClientMessage::DownloadRequest {
        version: Some("2.4.0".to_owned()),
        allow_downgrade: false,
    }
}

// Without a version: the newest release in the feed.
fn download_request_newest() -> ClientMessage {
    ClientMessage::DownloadRequest {
        version: None,
        allow_downgrade: false,
    }
}

// Every field of the status filled: the feed was read, a download is running, and an
// earlier package from the inbox was refused.
fn status() -> ServerMessage {
    ServerMessage::Status(StatusReport {
        server_version: "2.3.0".to_owned(),
        available_version: Some("2.4.0".to_owned()),
        phase: ChangeoverPhase::Idle,
        feed: FeedStatus {
            url: Some("https://updates.example.com/changeover/".to_owned()),
            // 2026-11-28T09:14:37Z
            checked_at: Some(at(1_795_857_277)),
            newest_version: Some("2.4.0".to_owned()),
            error: None,
        },
        candidate: Some(CandidateStatus {
            version: "2.4.0".to_owned(),
            source: PackageSource::Feed,
            state: CandidateState::Downloading {
                bytes: 12_058_624,
                size: 48_213_907,
            },
        }),
        last_refusal: Some(
            "server-2.3.0-linux-x86_64.tar.gz: server 2.3.0 is not newer than the installed \
             2.3.0; a downgrade must be allowed explicitly (admin download --allow-downgrade, or feed.allow_downgrade in the config)"
                .to_owned(),
        ),
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

// A site without a feed: the candidate came from the inbox and is ready; no agents yet.
fn status_inbox_only() -> ServerMessage {
    ServerMessage::Status(StatusReport {
        server_version: "2.3.0".to_owned(),
        available_version: Some("2.4.0".to_owned()),
        phase: ChangeoverPhase::Idle,
        feed: FeedStatus::default(),
        candidate: Some(CandidateStatus {
            version: "2.4.0".to_owned(),
            source: PackageSource::Inbox,
            state: CandidateState::Ready,
        }),
        last_refusal: None,
        sessions: Vec::new(),
    })
}

fn download_accepted() -> ServerMessage {
    ServerMessage::DownloadAccepted {
        version: "2.4.0".to_owned(),
    }
}

fn download_started() -> ServerMessage {
    ServerMessage::DownloadStarted {
        version: "2.4.0".to_owned(),
        size: 48_213_907,
        resumed_from: 31_457_280,
    }
}

fn download_progress() -> ServerMessage {
    ServerMessage::DownloadProgress {
        version: "2.4.0".to_owned(),
        bytes: 12_058_624,
        size: 48_213_907,
    }
}

fn download_retrying() -> ServerMessage {
    ServerMessage::DownloadRetrying {
        version: "2.4.0".to_owned(),
        attempt: 2,
        retry_in_ms: 1_742,
        reason: "the connection ended after 31457280 of 48213907 bytes".to_owned(),
    }
}

fn package_ready() -> ServerMessage {
    ServerMessage::PackageReady {
        version: "2.4.0".to_owned(),
        source: PackageSource::Feed,
        archive: "server-2.4.0-linux-x86_64.tar.gz".to_owned(),
    }
}

fn package_refused() -> ServerMessage {
    ServerMessage::PackageRefused {
        version: Some("2.4.0".to_owned()),
        source: PackageSource::Feed,
        reason: "the download was refused and deleted: the signature of \
                 server-2.4.0-linux-x86_64.tar.gz does not verify with the vendor key: the \
                 file was altered"
            .to_owned(),
    }
}

// An inbox package whose signature cannot be read: its version is not known.
fn package_refused_without_version() -> ServerMessage {
    ServerMessage::PackageRefused {
        version: None,
        source: PackageSource::Inbox,
        reason: "server-2.4.0-linux-x86_64.tar.gz: cannot read the signature of \
                 server-2.4.0-linux-x86_64.tar.gz: Invalid encoding in minisign data"
            .to_owned(),
    }
}

// An error that answers an admin request and leaves the connection open.
fn error_request() -> ServerMessage {
    ServerMessage::error(
        ErrorCode::NotNewer,
        "server 2.3.0 is not newer than the installed 2.3.0; a downgrade must be allowed explicitly (admin download --allow-downgrade, or feed.allow_downgrade in the config)",
    )
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
        ("download_request", download_request()),
        ("download_request_newest", download_request_newest()),
    ]
}

/// One sample of every server message, named as its snapshot; `error` once per shape.
fn server_samples() -> Vec<(&'static str, ServerMessage)> {
    vec![
        ("welcome", welcome()),
        ("admin_welcome", admin_welcome()),
        ("status", status()),
        ("status_inbox_only", status_inbox_only()),
        ("download_accepted", download_accepted()),
        ("download_started", download_started()),
        ("download_progress", download_progress()),
        ("download_retrying", download_retrying()),
        ("package_ready", package_ready()),
        ("package_refused", package_refused()),
        (
            "package_refused_without_version",
            package_refused_without_version(),
        ),
        ("error", error_plain()),
        ("error_unsupported_protocol", error_unsupported_protocol()),
        ("error_throttled", error_throttled()),
        ("error_request", error_request()),
    ]
}

fn package_entry(
    kind: ReleaseKind,
    version: &str,
    platform: &str,
    size: u64,
    sha256: &str,
) -> PackageEntry {
    let version: semver::Version = version.parse().expect("a semantic version");
    PackageEntry {
        product: PRODUCT.to_owned(),
        kind,
        archive: PackageEntry::archive_name(kind, &version, platform),
        version,
        platform: platform.to_owned(),
        size,
        sha256: sha256.to_owned(),
        notes: "Faster month-end reports; fixes the duplicate invoice number warning".to_owned(),
        date: "2026-11-27T16:40:12Z".to_owned(),
    }
}

fn server_entry() -> PackageEntry {
    package_entry(
        ReleaseKind::Server,
        "2.4.0",
        "linux-x86_64",
        48_213_907,
        "682de40589923ca7c7aaadc7f31df8ecbf2612355e186d653c1e64d8ddd032a8",
    )
}

fn feed_manifest() -> FeedManifest {
    FeedManifest {
        format: 1,
        product: PRODUCT.to_owned(),
        updated: "2026-11-27T16:41:03Z".to_owned(),
        releases: vec![
            package_entry(
                ReleaseKind::Agent,
                "2.4.0",
                "windows-x86_64",
                9_873_410,
                "9ba4c411748c88f878df8289cbac949858c2c202f986c839205f5d7ae845920d",
            ),
            server_entry(),
        ],
    }
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

// The names a reader may meet in `code`, `phase`, `source` and a candidate's `state`, as
// they travel.
#[test]
fn code_and_phase_names() {
    insta::assert_json_snapshot!("error_codes", common::unit_variants::<ErrorCode>());
    insta::assert_json_snapshot!(
        "changeover_phases",
        common::unit_variants::<ChangeoverPhase>()
    );
    insta::assert_json_snapshot!("package_sources", common::unit_variants::<PackageSource>());
    // `CandidateState` reads unknown states as `unknown`, so serde cannot list its names;
    // the states are shown as they travel instead.
    insta::assert_json_snapshot!(
        "candidate_states",
        [
            CandidateState::Downloading {
                bytes: 1_048_576,
                size: 41_943_040
            },
            CandidateState::Ready,
            CandidateState::Unknown,
        ]
    );
    // What a reader makes of a name it does not know.
    let fallbacks = serde_json::json!({
        "code": common::fallback_variant::<ErrorCode>(),
        "phase": common::fallback_variant::<ChangeoverPhase>(),
        "source": common::fallback_variant::<PackageSource>(),
        "state": serde_json::to_value(
            serde_json::from_value::<CandidateState>(serde_json::json!({"state": "future_state"}))
                .expect("an unknown state reads")
        )
        .expect("serialises")["state"],
    });
    insta::assert_json_snapshot!("fallback_names", fallbacks);
}

// Only the codes that answer an admin request leave the connection open.
#[test]
fn request_error_codes() {
    let request_errors: Vec<&str> = common::unit_variants::<ErrorCode>()
        .into_iter()
        .filter(|name| {
            serde_json::from_value::<ErrorCode>(serde_json::Value::from(*name))
                .expect("a code reads back")
                .is_request_error()
        })
        .collect();
    insta::assert_json_snapshot!("request_error_codes", request_errors);
}

// Not wire messages, but as binding: what a vendor's feed holds.
#[test]
fn feed_files() {
    insta::assert_json_snapshot!("feed_manifest", feed_manifest());
    insta::assert_json_snapshot!("package_entry", server_entry());
    // The trusted comment of the archive's signature: the entry as one line.
    insta::assert_snapshot!(
        "package_entry_trusted_comment",
        serde_json::to_string(&server_entry()).expect("an entry serialises")
    );
    insta::assert_json_snapshot!("release_info", server_entry().release_info());
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
