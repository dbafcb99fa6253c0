//! The messages agents and admin clients send (`ClientMessage::decode`), and the same text
//! read as a server message, as an agent reads it: never a panic, and whatever decodes
//! encodes to something that decodes to the same again.

#![no_main]

use changeover_protocol::{ClientMessage, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // WebSocket text frames are UTF-8 by the protocol; tungstenite refuses anything else.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ClientMessage::decode(text) {
        Ok(message) => {
            let encoded = serde_json::to_string(&message).expect("a decoded message encodes");
            let once = ClientMessage::decode(&encoded).expect("an encoded message decodes");
            let again = serde_json::to_string(&once).expect("encodes");
            assert_eq!(again, encoded, "encoding is not stable for {text:?}");
        }
        Err(err) => {
            let _ = err.error_code();
        }
    }
    if let Ok(message) = serde_json::from_str::<ServerMessage>(text) {
        let encoded = serde_json::to_string(&message).expect("a decoded message encodes");
        let once: ServerMessage = serde_json::from_str(&encoded).expect("decodes again");
        let again = serde_json::to_string(&once).expect("encodes");
        assert_eq!(again, encoded, "encoding is not stable for {text:?}");
    }
});
