//! Keeps PROTOCOL.md true: every JSON example in it is a real message of this protocol or a
//! real file of the release feed, every message type has an example, and every close code and
//! error code is in its table.
//!
//! A block's fence says what it holds: ```` ```json ```` is a wire message, ```` ```json
//! feed-manifest ````, ```` ```json package-entry ```` and ```` ```json release-info ```` are
//! the feed's files. Any other ```` ```json… ```` fence fails, so a typo cannot exempt a
//! block from the checks.
//!
//! The lists of message types, error codes, changeover phases and outcomes, package sources,
//! candidate states and agent update states come from the types' serde derives (see
//! `common`), so a new variant fails here until PROTOCOL.md documents it.

mod common;

use std::collections::BTreeSet;

use changeover_protocol::messages::{DEFAULT_GRACE_SECS, MAX_GRACE_SECS};
use changeover_protocol::package::PackageSignature;
use changeover_protocol::release::{
    FeedManifest, MANIFEST_FORMAT, PRODUCT, PackageEntry, ReleaseInfo, ReleaseKind,
};
use changeover_protocol::{
    AgentUpdateState, CandidateState, ChangeoverOutcome, ChangeoverPhase, ChangeoverSummary,
    ChangeoverView, ClientMessage, CloseCode, ErrorCode, FeedStatus, PackageSource, ServerMessage,
    SessionView, StatusReport,
};
use serde_json::Value;

fn protocol_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("cannot read {path}: {err}"))
}

/// What a ```json block holds, told by its fence's info string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    /// A WebSocket message: a `ClientMessage` or a `ServerMessage`.
    Message,
    /// `manifest.json` of a feed.
    FeedManifest,
    /// One release of a feed, as in the manifest and in a signature's trusted comment.
    PackageEntry,
    /// `release.json` inside a release archive.
    ReleaseInfo,
}

impl BlockKind {
    const ALL: [BlockKind; 4] = [
        BlockKind::Message,
        BlockKind::FeedManifest,
        BlockKind::PackageEntry,
        BlockKind::ReleaseInfo,
    ];

    fn info_string(self) -> &'static str {
        match self {
            BlockKind::Message => "json",
            BlockKind::FeedManifest => "json feed-manifest",
            BlockKind::PackageEntry => "json package-entry",
            BlockKind::ReleaseInfo => "json release-info",
        }
    }
}

/// One ```json block: the line its fence opens on (1-based), what it holds, and its text.
struct Example {
    line: usize,
    kind: BlockKind,
    text: String,
}

fn json_examples(markdown: &str) -> Vec<Example> {
    let mut examples = Vec::new();
    let mut open: Option<Example> = None;
    for (index, line) in markdown.lines().enumerate() {
        match open.as_mut() {
            None => {
                let Some(info) = line.trim_end().strip_prefix("```") else {
                    continue;
                };
                if !info.starts_with("json") {
                    continue;
                }
                let kind = BlockKind::ALL
                    .into_iter()
                    .find(|kind| kind.info_string() == info)
                    .unwrap_or_else(|| {
                        let known: Vec<&str> = BlockKind::ALL
                            .iter()
                            .map(|kind| kind.info_string())
                            .collect();
                        panic!(
                            "PROTOCOL.md line {}: unknown fence ```{info}; use one of {known:?}",
                            index + 1
                        )
                    });
                open = Some(Example {
                    line: index + 1,
                    kind,
                    text: String::new(),
                });
            }
            Some(_) if line.trim_end() == "```" => examples.extend(open.take()),
            Some(example) => {
                example.text.push_str(line);
                example.text.push('\n');
            }
        }
    }
    assert!(open.is_none(), "PROTOCOL.md ends inside a ```json block");
    examples
}

fn parse_json(example: &Example) -> Value {
    serde_json::from_str(&example.text)
        .unwrap_or_else(|err| panic!("PROTOCOL.md line {}: not JSON: {err}", example.line))
}

/// An example read as whichever message it is.
#[derive(Debug)]
enum Message {
    Client(ClientMessage),
    Server(ServerMessage),
}

impl Message {
    fn to_value(&self) -> Value {
        match self {
            Message::Client(message) => serde_json::to_value(message),
            Message::Server(message) => serde_json::to_value(message),
        }
        .expect("a message serialises")
    }
}

fn read_message(example: &Example, value: &Value) -> Message {
    let client = serde_json::from_value::<ClientMessage>(value.clone());
    let server = serde_json::from_value::<ServerMessage>(value.clone());
    match (client, server) {
        (Ok(message), Err(_)) => Message::Client(message),
        (Err(_), Ok(message)) => Message::Server(message),
        (Ok(_), Ok(_)) => panic!(
            "PROTOCOL.md line {}: reads as both a client and a server message",
            example.line
        ),
        (Err(client), Err(server)) => panic!(
            "PROTOCOL.md line {}: not a message of this protocol (a feed file needs its own \
             fence, such as ```json package-entry)\n  as a client message: {client}\n  as a \
             server message: {server}\n{}",
            example.line, example.text
        ),
    }
}

fn documented_messages() -> Vec<(Example, Value, Message)> {
    let examples: Vec<Example> = json_examples(&protocol_md())
        .into_iter()
        .filter(|example| example.kind == BlockKind::Message)
        .collect();
    assert!(!examples.is_empty(), "PROTOCOL.md has no ```json examples");
    examples
        .into_iter()
        .map(|example| {
            let value = parse_json(&example);
            let message = read_message(&example, &value);
            (example, value, message)
        })
        .collect()
}

/// A feed example read as the file its fence names.
#[derive(Debug)]
enum FeedFile {
    Manifest(FeedManifest),
    Entry(PackageEntry),
    Release(ReleaseInfo),
}

impl FeedFile {
    fn to_value(&self) -> Value {
        match self {
            FeedFile::Manifest(manifest) => serde_json::to_value(manifest),
            FeedFile::Entry(entry) => serde_json::to_value(entry),
            FeedFile::Release(info) => serde_json::to_value(info),
        }
        .expect("a feed file serialises")
    }
}

fn read_feed_file(example: &Example, value: &Value) -> FeedFile {
    let read = match example.kind {
        BlockKind::Message => unreachable!("messages are read by read_message"),
        BlockKind::FeedManifest => serde_json::from_value(value.clone()).map(FeedFile::Manifest),
        BlockKind::PackageEntry => serde_json::from_value(value.clone()).map(FeedFile::Entry),
        BlockKind::ReleaseInfo => serde_json::from_value(value.clone()).map(FeedFile::Release),
    };
    read.unwrap_or_else(|err| {
        panic!(
            "PROTOCOL.md line {}: not a ```{} ({err})\n{}",
            example.line,
            example.kind.info_string(),
            example.text
        )
    })
}

fn documented_feed_files() -> Vec<(Example, Value, FeedFile)> {
    json_examples(&protocol_md())
        .into_iter()
        .filter(|example| example.kind != BlockKind::Message)
        .map(|example| {
            let value = parse_json(&example);
            let file = read_feed_file(&example, &value);
            (example, value, file)
        })
        .collect()
}

#[test]
fn every_json_example_is_a_message_that_round_trips() {
    for (example, value, message) in documented_messages() {
        assert_eq!(
            message.to_value(),
            value,
            "PROTOCOL.md line {}: the example does not serialise back to itself \
             (a field missing, extra, or spelled differently)",
            example.line
        );
    }
}

#[test]
fn every_message_type_has_an_example() {
    let mut documented_client = BTreeSet::new();
    let mut documented_server = BTreeSet::new();
    for (_, value, message) in documented_messages() {
        let message_type = value["type"]
            .as_str()
            .expect("a message has a type")
            .to_owned();
        match message {
            Message::Client(_) => documented_client.insert(message_type),
            Message::Server(_) => documented_server.insert(message_type),
        };
    }
    for message_type in common::tagged_variants::<ClientMessage>() {
        assert!(
            documented_client.contains(message_type),
            "PROTOCOL.md has no ```json example of the client message {message_type:?}"
        );
    }
    for message_type in common::tagged_variants::<ServerMessage>() {
        assert!(
            documented_server.contains(message_type),
            "PROTOCOL.md has no ```json example of the server message {message_type:?}"
        );
    }
}

// `CandidateState` has a `#[serde(other)]` fallback, so serde accepts any tag and cannot be
// asked for the names; the exhaustive match makes a new state fail to compile here until
// it is named (and then documented).
fn candidate_state_names() -> Vec<&'static str> {
    let every_state = [
        CandidateState::Downloading { bytes: 0, size: 0 },
        CandidateState::Ready,
        CandidateState::Unknown,
    ];
    every_state
        .iter()
        .map(|state| match state {
            CandidateState::Downloading { .. } => "downloading",
            CandidateState::Ready => "ready",
            CandidateState::Unknown => "unknown",
        })
        .collect()
}

// Every value of `phase`, `outcome`, `source` and a candidate's `state` is shown on the wire
// at least once; a `#[serde(other)]` fallback such as `unknown` is never sent, so it needs
// none.
#[test]
fn every_phase_outcome_source_and_candidate_state_has_an_example() {
    fn collect(value: &Value, seen: &mut BTreeSet<(String, String)>) {
        match value {
            Value::Object(fields) => {
                for (key, field) in fields {
                    if let Value::String(text) = field {
                        seen.insert((key.clone(), text.clone()));
                    }
                    collect(field, seen);
                }
            }
            Value::Array(items) => items.iter().for_each(|item| collect(item, seen)),
            _ => {}
        }
    }
    let mut seen = BTreeSet::new();
    for (_, value, _) in documented_messages() {
        collect(&value, &mut seen);
    }
    let required = [
        (
            "phase",
            common::unit_variants::<ChangeoverPhase>(),
            common::fallback_variant::<ChangeoverPhase>(),
        ),
        (
            "outcome",
            common::unit_variants::<ChangeoverOutcome>(),
            common::fallback_variant::<ChangeoverOutcome>(),
        ),
        (
            "source",
            common::unit_variants::<PackageSource>(),
            common::fallback_variant::<PackageSource>(),
        ),
        ("state", candidate_state_names(), Some("unknown".to_owned())),
    ];
    for (field, names, fallback) in required {
        for name in names {
            if fallback.as_deref() == Some(name) {
                continue;
            }
            assert!(
                seen.contains(&(field.to_owned(), name.to_owned())),
                "PROTOCOL.md has no ```json example with \"{field}\": {name:?}"
            );
        }
    }
}

// Every agent update state is shown on the wire at least once: the agents' in an
// `agent_update_report`, the server's own (`offered`) in a status session's `update`. The
// `unknown` fallback is never sent.
#[test]
fn every_agent_update_state_has_an_example() {
    let mut seen = BTreeSet::new();
    for (_, value, _) in documented_messages() {
        match value["type"].as_str() {
            Some("agent_update_report") => {
                seen.extend(value["state"].as_str().map(str::to_owned));
            }
            Some("status") => {
                let sessions = value["sessions"]
                    .as_array()
                    .expect("a status lists sessions");
                for session in sessions {
                    seen.extend(session["update"]["state"].as_str().map(str::to_owned));
                }
            }
            _ => {}
        }
    }
    let fallback = common::fallback_variant::<AgentUpdateState>();
    for name in common::unit_variants::<AgentUpdateState>() {
        if fallback.as_deref() == Some(name) {
            continue;
        }
        assert!(
            seen.contains(name),
            "PROTOCOL.md has no ```json agent_update_report or status session update with \
             \"state\": {name:?}"
        );
    }
}

// An agent accepts an offer only when the vendor's signature describes exactly that release
// (`client-agent/src/self_update.rs`); the examples must pass the same checks, and offer a
// release the documented feed publishes.
#[test]
fn every_agent_update_offer_matches_its_signature_and_the_feed() {
    let manifests: Vec<FeedManifest> = documented_feed_files()
        .into_iter()
        .filter_map(|(_, _, file)| match file {
            FeedFile::Manifest(manifest) => Some(manifest),
            _ => None,
        })
        .collect();
    let mut offers = 0;
    for (example, _, message) in documented_messages() {
        let Message::Server(ServerMessage::AgentUpdateOffer(offer)) = message else {
            continue;
        };
        offers += 1;
        let line = example.line;
        let signature = PackageSignature::decode(&offer.signature, &offer.archive)
            .unwrap_or_else(|err| panic!("PROTOCOL.md line {line}: the signature: {err}"));
        let signed = signature.claimed_entry();
        assert_eq!(signed.kind, ReleaseKind::Agent, "PROTOCOL.md line {line}");
        assert_eq!(
            (
                signed.version.to_string(),
                signed.platform.as_str(),
                signed.archive.as_str(),
                signed.size,
                signed.sha256.as_str(),
            ),
            (
                offer.version.clone(),
                offer.platform.as_str(),
                offer.archive.as_str(),
                offer.size,
                offer.sha256.as_str(),
            ),
            "PROTOCOL.md line {line}: the offer is not the release its signature describes"
        );
        assert_eq!(
            offer.path,
            format!("/agent-updates/{}", offer.archive),
            "PROTOCOL.md line {line}: the path is not where the server serves the archive"
        );
        // The trusted comment is the entry as one line, exactly as `release pack` writes it.
        let comment = offer
            .signature
            .lines()
            .find_map(|text| text.strip_prefix("trusted comment: "))
            .expect("a signature has a trusted comment");
        assert_eq!(
            serde_json::to_string(signed).expect("an entry serialises"),
            comment,
            "PROTOCOL.md line {line}: the trusted comment is not the entry as `release pack` \
             writes it"
        );
        assert!(
            manifests
                .iter()
                .any(|manifest| manifest.releases.contains(signed)),
            "PROTOCOL.md line {line}: {} is in no ```json feed-manifest",
            signed.archive
        );
    }
    assert!(offers > 0, "PROTOCOL.md has no agent_update_offer example");
}

#[test]
fn every_feed_example_is_a_valid_feed_file_that_round_trips() {
    for (example, value, file) in documented_feed_files() {
        assert_eq!(
            file.to_value(),
            value,
            "PROTOCOL.md line {}: the example does not serialise back to itself \
             (a field missing, extra, or spelled differently)",
            example.line
        );
        // What the server checks before it believes a feed file.
        let line = example.line;
        match file {
            FeedFile::Manifest(manifest) => {
                assert_eq!(manifest.format, MANIFEST_FORMAT, "PROTOCOL.md line {line}");
                assert_eq!(manifest.product, PRODUCT, "PROTOCOL.md line {line}");
                for entry in &manifest.releases {
                    entry.validate().unwrap_or_else(|reason| {
                        panic!("PROTOCOL.md line {line}: an invalid entry: {reason}")
                    });
                }
            }
            FeedFile::Entry(entry) => entry.validate().unwrap_or_else(|reason| {
                panic!("PROTOCOL.md line {line}: an invalid entry: {reason}")
            }),
            FeedFile::Release(info) => assert_eq!(info.product, PRODUCT, "PROTOCOL.md line {line}"),
        }
    }
}

#[test]
fn every_feed_file_has_an_example() {
    let documented: Vec<BlockKind> = json_examples(&protocol_md())
        .iter()
        .map(|example| example.kind)
        .collect();
    for kind in BlockKind::ALL {
        assert!(
            documented.contains(&kind),
            "PROTOCOL.md has no ```{} example",
            kind.info_string()
        );
    }
}

// The feed section follows one release through the manifest, its signature and its
// archive; the examples must agree with each other as a real feed's files would.
#[test]
fn the_feed_examples_describe_one_release_consistently() {
    let mut manifests = Vec::new();
    let mut entries = Vec::new();
    let mut infos = Vec::new();
    for (_, _, file) in documented_feed_files() {
        match file {
            FeedFile::Manifest(manifest) => manifests.push(manifest),
            FeedFile::Entry(entry) => entries.push(entry),
            FeedFile::Release(info) => infos.push(info),
        }
    }
    for entry in &entries {
        assert!(
            manifests
                .iter()
                .any(|manifest| manifest.releases.contains(entry)),
            "the ```json package-entry of {} is not in any ```json feed-manifest",
            entry.archive
        );
    }
    for info in &infos {
        assert!(
            entries.iter().any(|entry| &entry.release_info() == info),
            "the ```json release-info of {} {} matches no ```json package-entry",
            info.kind,
            info.version
        );
    }
    // A signature's trusted comment is the entry as one line of JSON, exactly as
    // `release pack` writes it.
    let markdown = protocol_md();
    let comments: Vec<&str> = markdown
        .lines()
        .filter_map(|line| line.strip_prefix("trusted comment: "))
        .filter(|comment| comment.starts_with('{'))
        .collect();
    assert!(
        !comments.is_empty(),
        "PROTOCOL.md shows no signature with a package entry as its trusted comment"
    );
    for comment in comments {
        let entry: PackageEntry = serde_json::from_str(comment)
            .unwrap_or_else(|err| panic!("a trusted comment is not a package entry ({err})"));
        assert_eq!(
            serde_json::to_string(&entry).expect("an entry serialises"),
            comment,
            "a trusted comment is not the entry as `release pack` writes it"
        );
        assert!(
            entries.contains(&entry),
            "the trusted comment of {} matches no ```json package-entry",
            entry.archive
        );
    }
}

#[test]
fn every_close_code_is_in_the_close_code_table() {
    let markdown = protocol_md();
    for code in CloseCode::ALL {
        let number = code.code();
        // Display is "4001 (unsupported protocol)"; the table row names it the same way.
        let display = code.to_string();
        let name = display
            .strip_prefix(&format!("{number} ("))
            .and_then(|rest| rest.strip_suffix(')'))
            .expect("a close code displays as `number (name)`");
        let row = format!("| {number} | {name} ");
        assert!(
            markdown.lines().any(|line| line.starts_with(&row)),
            "PROTOCOL.md has no close code table row starting with {row:?}"
        );
    }
}

// The last column says how the connection goes on; only the codes that answer an admin
// request leave it open.
#[test]
fn every_error_code_is_in_the_error_code_table() {
    let markdown = protocol_md();
    for name in common::unit_variants::<ErrorCode>() {
        let row_start = format!("| `{name}` ");
        let row = markdown
            .lines()
            .find(|line| line.starts_with(&row_start))
            .unwrap_or_else(|| {
                panic!("PROTOCOL.md has no error code table row starting with {row_start:?}")
            });
        let code: ErrorCode =
            serde_json::from_value(Value::String(name.to_owned())).expect("a code reads back");
        let then = row
            .trim_end()
            .trim_end_matches('|')
            .rsplit('|')
            .next()
            .expect("a table row has cells");
        assert_eq!(
            then.contains("stays open"),
            code.is_request_error(),
            "PROTOCOL.md: the row of {name:?} should say the connection {} (last cell {then:?})",
            if code.is_request_error() {
                "stays open"
            } else {
                "is closed"
            }
        );
    }
}

// The `unknown_message_type` row lists the types the server knows: every client message.
#[test]
fn the_unknown_message_type_row_names_every_client_message() {
    let markdown = protocol_md();
    let row = markdown
        .lines()
        .find(|line| line.starts_with("| `unknown_message_type` "))
        .expect("PROTOCOL.md has an error code table row for unknown_message_type");
    for message_type in common::tagged_variants::<ClientMessage>() {
        assert!(
            row.contains(&format!("`{message_type}`")),
            "PROTOCOL.md: the unknown_message_type row does not name {message_type:?}: {row}"
        );
    }
}

// PROTOCOL.md promises a tolerant reader: fields a reader does not know are ignored in every
// message and every feed file, nested objects included.
#[test]
fn unknown_fields_are_ignored_in_every_documented_message_and_feed_file() {
    fn add_unknown_fields(value: &mut Value) {
        match value {
            Value::Object(fields) => {
                fields.values_mut().for_each(add_unknown_fields);
                fields.insert("added_in_a_later_version".to_owned(), Value::Bool(true));
            }
            Value::Array(items) => items.iter_mut().for_each(add_unknown_fields),
            _ => {}
        }
    }
    for (example, mut value, message) in documented_messages() {
        add_unknown_fields(&mut value);
        let extended = Example {
            line: example.line,
            kind: example.kind,
            text: value.to_string(),
        };
        assert_eq!(
            read_message(&extended, &value).to_value(),
            message.to_value(),
            "PROTOCOL.md line {}: unknown fields changed the message",
            example.line
        );
    }
    for (example, mut value, file) in documented_feed_files() {
        add_unknown_fields(&mut value);
        let extended = Example {
            line: example.line,
            kind: example.kind,
            text: value.to_string(),
        };
        assert_eq!(
            read_feed_file(&extended, &value).to_value(),
            file.to_value(),
            "PROTOCOL.md line {}: unknown fields changed the feed file",
            example.line
        );
    }
}

// PROTOCOL.md says a reader takes a missing `available_version`, `candidate`,
// `last_refusal`, `changeover`, `last_changeover` and `agent_release` as null, a missing
// `agents_behind` as 0, a missing `feed` as one with every field null, and a session without
// `update` as one without an agent update.
#[test]
fn a_status_without_the_newer_fields_reads_them_as_null() {
    let report: StatusReport =
        serde_json::from_str(r#"{"server_version":"2.3.0","phase":"idle","sessions":[]}"#)
            .expect("these fields may be left out");
    assert_eq!(report.available_version, None);
    assert_eq!(report.feed, FeedStatus::default());
    assert_eq!(report.candidate, None);
    assert_eq!(report.last_refusal, None);
    assert_eq!(report.changeover, None);
    assert_eq!(report.last_changeover, None);
    assert_eq!(report.agent_release, None);
    assert_eq!(report.agents_behind, 0);
    let session: SessionView = serde_json::from_str(
        r#"{"session_id":1,"agent_id":"a","user":"u","host":"h","platform":"linux-x86_64",
            "agent_version":"2.3.0","protocol_version":1,"address":"10.0.0.1:50000",
            "connected_since":"2026-11-28T12:32:11Z"}"#,
    )
    .expect("update may be left out");
    assert_eq!(session.update, None);
}

// PROTOCOL.md says which fields of a changeover's view and summary a reader may miss, and
// what it takes them for.
#[test]
fn a_changeover_without_its_optional_fields_reads_them_as_null_or_zero() {
    let view: ChangeoverView = serde_json::from_str(
        r#"{"changeover_id":"co-1","from_version":"2.3.0","target_version":"2.4.0",
            "phase":"preparing"}"#,
    )
    .expect("scheduled_at and deadline may be left out");
    assert_eq!((view.scheduled_at, view.deadline), (None, None));
    let summary: ChangeoverSummary = serde_json::from_str(
        r#"{"changeover_id":"co-1","outcome":"failed","from_version":"2.3.0",
            "target_version":"2.4.0","phase":"preparing",
            "started_at":"2026-11-28T12:30:00Z","ended_at":"2026-11-28T12:30:09Z"}"#,
    )
    .expect("reason, downtime_ms and the session counts may be left out");
    assert_eq!((summary.reason, summary.downtime_ms), (None, None));
    assert_eq!(
        (summary.sessions_warned, summary.sessions_logged_out),
        (0, 0)
    );
}

// PROTOCOL.md says every field of `update_request` may be left out, and gives the default
// and the range of `grace_secs`.
#[test]
fn a_bare_update_request_asks_for_the_newest_release_now_with_the_default_grace() {
    let request = ClientMessage::decode(r#"{"type":"update_request"}"#)
        .expect("an update request needs no fields");
    assert_eq!(
        request,
        ClientMessage::UpdateRequest {
            version: None,
            grace_secs: DEFAULT_GRACE_SECS,
            notify: None,
            message: None,
            at: None,
            allow_downgrade: false,
        }
    );
    let markdown = protocol_md();
    let row = markdown
        .lines()
        .find(|line| line.starts_with("| `grace_secs`"))
        .expect("PROTOCOL.md has a table row for grace_secs");
    for promise in [
        format!("`{DEFAULT_GRACE_SECS}` when left out"),
        format!("`0` to `{MAX_GRACE_SECS}`"),
    ] {
        assert!(
            row.contains(&promise),
            "PROTOCOL.md: the grace_secs row should say {promise:?}: {row}"
        );
    }
}

// PROTOCOL.md says both fields of `download_request` may be left out.
#[test]
fn a_bare_download_request_asks_for_the_newest_release_without_downgrade() {
    let request = ClientMessage::decode(r#"{"type":"download_request"}"#)
        .expect("a download request needs no fields");
    assert_eq!(
        request,
        ClientMessage::DownloadRequest {
            version: None,
            allow_downgrade: false,
        }
    );
}
