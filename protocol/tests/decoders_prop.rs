//! Property tests of everything that decodes what a peer, a feed or a signature file sends:
//! the agent and admin message decoder, the server's messages as the agent reads them, the
//! feed manifest behind its signature, and minisign signatures and keys. None may panic on
//! any input, and what is encoded decodes to the same thing.
//!
//! The valid inputs that get mutated are PROTOCOL.md's own examples (kept true by the
//! `protocol_md` test), so every message type is a starting point without a list here.
//! The cargo-fuzz targets in `fuzz/` search the same decoders far longer; these run in the
//! normal suite, on stable, in a few seconds.

// Only the variant lists are used here.
#[allow(dead_code)]
mod common;

use std::time::{Duration, SystemTime};

use changeover_protocol::messages::MAX_GRACE_SECS;
use changeover_protocol::package::{self, PackageSignature, VendorKey};
use changeover_protocol::release::{FeedManifest, MANIFEST_FORMAT, PRODUCT, PackageEntry};
use changeover_protocol::version::ProtocolRange;
use changeover_protocol::{
    AgentHello, AgentUpdateOffer, AgentUpdateState, ChangeoverPhase, ClientMessage, ErrorCode,
    PackageSource, ServerMessage,
};
use proptest::prelude::*;
use serde_json::Value;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

// ---- valid starting points -------------------------------------------------------------

/// The JSON blocks of PROTOCOL.md whose fence is exactly `info`.
fn protocol_md_blocks(info: &str) -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
    let text = std::fs::read_to_string(path).expect("PROTOCOL.md is readable");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match &mut current {
            None if line.trim_end() == format!("```{info}") => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => {
                let block = current.take().expect("inside a block");
                blocks.push(serde_json::from_str(&block).expect("PROTOCOL.md's JSON parses"));
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(!blocks.is_empty(), "PROTOCOL.md has no ```{info} blocks");
    blocks
}

fn documented_messages() -> &'static [Value] {
    static MESSAGES: std::sync::OnceLock<Vec<Value>> = std::sync::OnceLock::new();
    MESSAGES.get_or_init(|| protocol_md_blocks("json"))
}

fn documented_manifest() -> &'static Value {
    static MANIFEST: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    MANIFEST.get_or_init(|| protocol_md_blocks("json feed-manifest").remove(0))
}

// ---- mutations -------------------------------------------------------------------------

/// Any JSON value, with the numbers and strings that break careless decoders.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        Just(Value::from(i64::MIN)),
        any::<f64>().prop_map(|number| {
            serde_json::Number::from_f64(number).map_or(Value::Null, Value::Number)
        }),
        any::<String>().prop_map(Value::String),
        "[0-9T:Z.+-]{0,30}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,12}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// One change to a JSON document.
#[derive(Debug, Clone)]
enum Mutation {
    /// The value at the `n`th place of the document (in a walk of all of them) becomes this.
    Replace(usize, Value),
    /// The `n`th key of the document goes.
    Remove(usize),
    /// A new key in the `n`th object.
    Add(usize, String, Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), json_value()).prop_map(|(at, value)| Mutation::Replace(at, value)),
        any::<usize>().prop_map(Mutation::Remove),
        (any::<usize>(), "[a-z_]{1,12}", json_value())
            .prop_map(|(at, key, value)| Mutation::Add(at, key, value)),
    ]
}

/// JSON pointers to every value in `value`, the root included.
fn pointers(value: &Value, at: String, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                pointers(
                    child,
                    format!("{at}/{}", key.replace('~', "~0").replace('/', "~1")),
                    found,
                );
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                pointers(child, format!("{at}/{index}"), found);
            }
        }
        _ => {}
    }
    found.push(at);
}

fn apply(document: &mut Value, mutation: &Mutation) {
    let mut places = Vec::new();
    pointers(document, String::new(), &mut places);
    match mutation {
        Mutation::Replace(at, value) => {
            if let Some(place) = document.pointer_mut(&places[at % places.len()]) {
                *place = value.clone();
            }
        }
        Mutation::Remove(at) | Mutation::Add(at, ..) => {
            let objects: Vec<&String> = places
                .iter()
                .filter(|place| document.pointer(place).is_some_and(Value::is_object))
                .collect();
            if objects.is_empty() {
                return;
            }
            let place = objects[at % objects.len()].clone();
            let Some(Value::Object(map)) = document.pointer_mut(&place) else {
                return;
            };
            match mutation {
                Mutation::Add(_, key, value) => {
                    map.insert(key.clone(), value.clone());
                }
                _ if !map.is_empty() => {
                    let key = map.keys().nth(at % map.len()).cloned().expect("a key");
                    map.remove(&key);
                }
                _ => {}
            }
        }
    }
}

/// Byte edits of a text: (position, what to do, byte).
fn byte_edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), 0u8..3, any::<u8>()), 0..6)
}

fn edit_bytes(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, operation, byte) in edits {
        let at = at % (bytes.len() + 1);
        match operation {
            0 => bytes.insert(at, byte),
            1 if at < bytes.len() => {
                bytes.remove(at);
            }
            _ if at < bytes.len() => bytes[at] = byte,
            _ => bytes.push(byte),
        }
    }
    bytes
}

/// Decodes `text` both ways. A message that decodes must encode, and what it encodes to
/// must decode to itself: the first decode may normalise (a time with more digits than
/// the wire's whole seconds), after that nothing may change.
fn decode_both_ways(text: &str) {
    match ClientMessage::decode(text) {
        Ok(message) => {
            message.type_name();
            let once = ClientMessage::decode(&serde_json::to_string(&message).expect("encodes"))
                .expect("an encoded message decodes");
            let twice = ClientMessage::decode(&serde_json::to_string(&once).expect("encodes"));
            assert_eq!(twice.as_ref(), Ok(&once), "{text}");
        }
        Err(err) => {
            // What the server answers with must exist for every refusal.
            err.error_code();
            err.to_string();
        }
    }
    if let Ok(message) = serde_json::from_str::<ServerMessage>(text) {
        let encoded = serde_json::to_string(&message).expect("encodes");
        let once: ServerMessage = serde_json::from_str(&encoded).expect("decodes again");
        let encoded_again = serde_json::to_string(&once).expect("encodes");
        assert_eq!(encoded_again, encoded, "{text}");
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_both_ways(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn decoders_never_panic_on_json_like_text(text in r#"[\[\]{}":,.0-9eE+\-a-z_ \\]{0,300}"#) {
        decode_both_ways(&text);
    }

    #[test]
    fn decoders_never_panic_on_mutated_valid_messages(
        example in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
        edits in byte_edits(),
    ) {
        let messages = documented_messages();
        let mut document = messages[example.index(messages.len())].clone();
        for mutation in &mutations {
            apply(&mut document, mutation);
        }
        let text = serde_json::to_string(&document).expect("encodes");
        decode_both_ways(&text);
        decode_both_ways(&String::from_utf8_lossy(&edit_bytes(text.into_bytes(), &edits)));
    }
}

// ---- round trips of generated messages -------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-z0-9 .-]{0,24}"]
}

fn optional_text() -> impl Strategy<Value = Option<String>> {
    prop::option::of(text())
}

/// A variant of a plain-name enum, picked from the names its serde derive knows.
fn unit_variant<T>() -> impl Strategy<Value = T>
where
    T: for<'de> serde::Deserialize<'de> + std::fmt::Debug + Clone + 'static,
{
    let variants: Vec<T> = common::unit_variants::<T>()
        .into_iter()
        .map(|name| serde_json::from_value(Value::from(name)).expect("a known name decodes"))
        .collect();
    prop::sample::select(variants)
}

/// Whole seconds from 1970 to 9999: what RFC 3339 on the wire can say.
fn wire_time() -> impl Strategy<Value = SystemTime> {
    (0u64..253_402_300_799).prop_map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    let hello = (
        any::<u32>(),
        (text(), text(), text()),
        (text(), text(), optional_text()),
    )
        .prop_map(
            |(protocol_version, (agent_id, user, host), (platform, agent_version, instance_id))| {
                ClientMessage::Hello(AgentHello {
                    protocol_version,
                    agent_id,
                    user,
                    host,
                    platform,
                    agent_version,
                    instance_id,
                })
            },
        );
    prop_oneof![
        hello,
        (any::<u32>(), text()).prop_map(|(protocol_version, password)| {
            ClientMessage::AdminLogin {
                protocol_version,
                password,
            }
        }),
        Just(ClientMessage::StatusRequest),
        Just(ClientMessage::CancelRequest),
        (
            optional_text(),
            prop_oneof![0..=MAX_GRACE_SECS, any::<u64>()],
            (optional_text(), optional_text(), optional_text()),
            any::<bool>()
        )
            .prop_map(
                |(version, grace_secs, (notify, message, at), allow_downgrade)| {
                    ClientMessage::UpdateRequest {
                        version,
                        grace_secs,
                        notify,
                        message,
                        at,
                        allow_downgrade,
                    }
                }
            ),
        (optional_text(), any::<bool>()).prop_map(|(version, allow_downgrade)| {
            ClientMessage::DownloadRequest {
                version,
                allow_downgrade,
            }
        }),
        (text(), unit_variant::<AgentUpdateState>(), optional_text()).prop_map(
            |(version, state, detail)| ClientMessage::AgentUpdateReport {
                version,
                state,
                detail,
            }
        ),
    ]
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    let welcome = (
        any::<u32>(),
        text(),
        any::<u64>(),
        any::<u64>(),
        optional_text(),
    )
        .prop_map(
            |(protocol_version, server_version, session_id, heartbeat_secs, assigned_agent_id)| {
                ServerMessage::Welcome {
                    protocol_version,
                    server_version,
                    session_id,
                    heartbeat_secs,
                    assigned_agent_id,
                }
            },
        );
    let warning = (
        text(),
        wire_time(),
        any::<u64>(),
        text(),
        text(),
        optional_text(),
    )
        .prop_map(
            |(changeover_id, deadline, seconds_left, target_version, message, admin_message)| {
                ServerMessage::Warning {
                    changeover_id,
                    deadline,
                    seconds_left,
                    target_version,
                    message,
                    admin_message,
                }
            },
        );
    let offer = (
        (text(), text(), text()),
        any::<u64>(),
        (text(), text(), text()),
    )
        .prop_map(
            |((version, platform, archive), size, (sha256, path, signature))| {
                ServerMessage::AgentUpdateOffer(Box::new(AgentUpdateOffer {
                    version,
                    platform,
                    archive,
                    size,
                    sha256,
                    path,
                    signature,
                }))
            },
        );
    let error = (
        unit_variant::<ErrorCode>(),
        text(),
        prop::option::of(any::<u64>()),
        prop::option::of((any::<u32>(), any::<u32>())),
    )
        .prop_map(
            |(code, message, retry_after_secs, range)| ServerMessage::Error {
                code,
                message,
                retry_after_secs,
                supported_protocol: range.map(|(min, max)| ProtocolRange { min, max }),
            },
        );
    prop_oneof![
        welcome,
        warning,
        offer,
        error,
        (any::<u32>(), text()).prop_map(|(protocol_version, server_version)| {
            ServerMessage::AdminWelcome {
                protocol_version,
                server_version,
            }
        }),
        (text(), text(), prop::option::of(wire_time())).prop_map(
            |(changeover_id, target_version, scheduled_at)| ServerMessage::UpdateAccepted {
                changeover_id,
                target_version,
                scheduled_at,
            }
        ),
        (text(), unit_variant::<ChangeoverPhase>(), text()).prop_map(
            |(changeover_id, phase, detail)| ServerMessage::ChangeoverProgress {
                changeover_id,
                phase,
                detail,
            }
        ),
        (
            text(),
            text(),
            any::<u64>(),
            optional_text(),
            optional_text()
        )
            .prop_map(
                |(changeover_id, reason, reconnect_within_ms, target_version, admin_message)| {
                    ServerMessage::Logout {
                        changeover_id,
                        reason,
                        reconnect_within_ms,
                        target_version,
                        admin_message,
                    }
                }
            ),
        (text(), any::<u32>(), any::<u64>(), text()).prop_map(
            |(version, attempt, retry_in_ms, reason)| ServerMessage::DownloadRetrying {
                version,
                attempt,
                retry_in_ms,
                reason,
            }
        ),
        (optional_text(), unit_variant::<PackageSource>(), text()).prop_map(
            |(version, source, reason)| ServerMessage::PackageRefused {
                version,
                source,
                reason,
            }
        ),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn generated_client_messages_round_trip(message in client_message()) {
        let text = serde_json::to_string(&message).expect("encodes");
        prop_assert_eq!(ClientMessage::decode(&text), Ok(message));
    }

    #[test]
    fn generated_server_messages_round_trip(message in server_message()) {
        let text = serde_json::to_string(&message).expect("encodes");
        let decoded: ServerMessage = serde_json::from_str(&text).expect("decodes");
        prop_assert_eq!(decoded, message);
    }
}

// ---- the feed manifest and signatures --------------------------------------------------

/// A key pair made once for this test process.
struct TestKey {
    secret: minisign::SecretKey,
    public: VendorKey,
}

fn test_key() -> &'static TestKey {
    static KEY: std::sync::OnceLock<TestKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let pair = minisign::KeyPair::generate_unencrypted_keypair().expect("a key pair");
        let public = VendorKey::decode(&pair.pk.to_base64()).expect("the public key reads");
        TestKey {
            secret: pair.sk,
            public,
        }
    })
}

fn sign(bytes: &[u8], trusted_comment: &str) -> String {
    minisign::sign(None, &test_key().secret, bytes, Some(trusted_comment), None)
        .expect("signs")
        .into_string()
}

fn package_entry() -> impl Strategy<Value = PackageEntry> {
    (
        prop::sample::select(vec![
            changeover_protocol::release::ReleaseKind::Server,
            changeover_protocol::release::ReleaseKind::Agent,
        ]),
        (0u64..100, 0u64..100, 0u64..100),
        "[a-z0-9_-]{1,16}",
        any::<u64>(),
        prop::array::uniform32(any::<u8>()),
        ".{0,40}",
    )
        .prop_map(
            |(kind, (major, minor, patch), platform, size, hash, notes)| {
                let version = semver::Version::new(major, minor, patch);
                PackageEntry {
                    product: PRODUCT.to_owned(),
                    kind,
                    archive: PackageEntry::archive_name(kind, &version, &platform),
                    version,
                    platform,
                    size,
                    sha256: hex::encode(hash),
                    notes,
                    date: "2026-11-28T09:00:00Z".to_owned(),
                }
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_manifest_check_never_panics_on_arbitrary_files(
        manifest in prop::collection::vec(any::<u8>(), 0..512),
        signature in prop_oneof![any::<String>(), "(untrusted comment: [a-z ]{0,10}\n)?[A-Za-z0-9+/=]{0,120}\n(trusted comment: [ -~]{0,40}\n)?[A-Za-z0-9+/=]{0,100}\n?"],
    ) {
        prop_assert!(package::verify_manifest(&manifest, &signature, &test_key().public).is_err());
    }

    #[test]
    fn a_signed_mutated_manifest_is_checked_without_panicking(
        mutations in prop::collection::vec(mutation(), 0..4),
        edits in byte_edits(),
    ) {
        let mut document = documented_manifest().clone();
        for mutation in &mutations {
            apply(&mut document, mutation);
        }
        let bytes = edit_bytes(serde_json::to_vec(&document).expect("encodes"), &edits);
        let signature = sign(&bytes, "changeover feed manifest");
        let _ = package::verify_manifest(&bytes, &signature, &test_key().public);
        // One byte changed after signing: refused by the signature, whatever it says.
        let mut altered = bytes.clone();
        altered.push(b' ');
        prop_assert!(package::verify_manifest(&altered, &signature, &test_key().public).is_err());
    }

    #[test]
    fn a_signed_well_formed_manifest_is_read_back(
        releases in prop::collection::vec(package_entry(), 0..5),
    ) {
        let manifest = FeedManifest {
            format: MANIFEST_FORMAT,
            product: PRODUCT.to_owned(),
            updated: "2026-11-28T09:00:00Z".to_owned(),
            releases,
        };
        let bytes = serde_json::to_vec_pretty(&manifest).expect("encodes");
        let signature = sign(&bytes, "changeover feed manifest");
        let read = package::verify_manifest(&bytes, &signature, &test_key().public);
        prop_assert_eq!(read.expect("verifies"), manifest);
    }

    #[test]
    fn signature_and_key_parsers_never_panic_on_arbitrary_text(text in any::<String>()) {
        let _ = minisign_verify::Signature::decode(&text);
        let _ = PackageSignature::decode(&text, "an arbitrary signature");
        let _ = VendorKey::decode(&text);
    }

    #[test]
    fn signature_parsers_never_panic_on_mutated_package_signatures(
        entry in package_entry(),
        edits in byte_edits(),
        archive in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let comment = serde_json::to_string(&entry).expect("encodes");
        let valid = sign(&archive, &comment);
        let decoded = PackageSignature::decode(&valid, "a package").expect("a valid signature reads");
        prop_assert_eq!(decoded.claimed_entry(), &entry);

        let mutated = String::from_utf8_lossy(&edit_bytes(valid.into_bytes(), &edits)).into_owned();
        let _ = minisign_verify::Signature::decode(&mutated);
        if let Ok(signature) = PackageSignature::decode(&mutated, "a package") {
            // Whatever it claims, streaming bytes through its verifier must not panic.
            if let Ok(mut verifier) = signature.verifier(&test_key().public, "a package") {
                let _ = verifier.update(&archive);
                let _ = verifier.finish();
            }
        }
    }
}
