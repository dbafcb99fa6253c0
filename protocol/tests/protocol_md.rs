//! Keeps PROTOCOL.md true: every JSON example in it is a real message of this protocol, every
//! message type has an example, and every close code and error code is in its table.
//!
//! The lists of message types and error codes come from the types' serde derives (see
//! `common`), so a new variant fails here until PROTOCOL.md documents it.

mod common;

use std::collections::BTreeSet;

use changeover_protocol::{ClientMessage, CloseCode, ErrorCode, ServerMessage, StatusReport};
use serde_json::Value;

fn protocol_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("cannot read {path}: {err}"))
}

/// One ```json block: the line its fence opens on (1-based) and its text.
struct Example {
    line: usize,
    text: String,
}

fn json_examples(markdown: &str) -> Vec<Example> {
    let mut examples = Vec::new();
    let mut open: Option<Example> = None;
    for (index, line) in markdown.lines().enumerate() {
        match open.as_mut() {
            None if line.trim_end() == "```json" => {
                open = Some(Example {
                    line: index + 1,
                    text: String::new(),
                });
            }
            None => {}
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
            "PROTOCOL.md line {}: not a message of this protocol\n  as a client message: \
             {client}\n  as a server message: {server}\n{}",
            example.line, example.text
        ),
    }
}

fn documented_messages() -> Vec<(Example, Value, Message)> {
    let examples = json_examples(&protocol_md());
    assert!(!examples.is_empty(), "PROTOCOL.md has no ```json examples");
    examples
        .into_iter()
        .map(|example| {
            let value: Value = serde_json::from_str(&example.text)
                .unwrap_or_else(|err| panic!("PROTOCOL.md line {}: not JSON: {err}", example.line));
            let message = read_message(&example, &value);
            (example, value, message)
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

#[test]
fn every_error_code_is_in_the_error_code_table() {
    let markdown = protocol_md();
    for code in common::unit_variants::<ErrorCode>() {
        let row = format!("| `{code}` ");
        assert!(
            markdown.lines().any(|line| line.starts_with(&row)),
            "PROTOCOL.md has no error code table row starting with {row:?}"
        );
    }
}

// PROTOCOL.md promises a tolerant reader: fields a reader does not know are ignored in every
// message, nested objects included.
#[test]
fn unknown_fields_are_ignored_in_every_documented_message() {
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
            text: value.to_string(),
        };
        assert_eq!(
            read_message(&extended, &value).to_value(),
            message.to_value(),
            "PROTOCOL.md line {}: unknown fields changed the message",
            example.line
        );
    }
}

// PROTOCOL.md says a reader takes a missing `available_version` as null.
#[test]
fn a_status_without_available_version_reads_as_null() {
    let report: StatusReport =
        serde_json::from_str(r#"{"server_version":"2.3.0","phase":"idle","sessions":[]}"#)
            .expect("available_version may be left out");
    assert_eq!(report.available_version, None);
}
