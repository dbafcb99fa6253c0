//! Property tests of the front door's request parser, `handshake::parse_head`: whatever
//! bytes a peer sends, it answers without panicking; a well-formed request is read back
//! with its method, path and headers and the exact length of its head, and every strict
//! prefix of one is "not complete yet", never an error.

use changeover_server::handshake::{MAX_HEAD_BYTES, parse_head};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

/// A generated request and its bytes.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    minor_version: u8,
    headers: Vec<(String, String)>,
}

impl Request {
    fn head(&self) -> Vec<u8> {
        let mut head = format!(
            "{} {} HTTP/1.{}\r\n",
            self.method, self.path, self.minor_version
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        head.into_bytes()
    }
}

fn request() -> impl Strategy<Value = Request> {
    let method = prop_oneof![
        prop::sample::select(vec!["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"])
            .prop_map(str::to_owned),
        "[A-Z]{1,10}",
    ];
    let path = "/[A-Za-z0-9._~!$&'()*+,;=:@/-]{0,60}(\\?[A-Za-z0-9._~=&-]{0,30})?";
    // Header names are tokens; values visible ASCII with inner spaces, trimmed.
    let name = "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}";
    let value = "([!-~]([ !-~]{0,40}[!-~])?)?";
    let websocket = prop::collection::vec(
        prop::sample::select(vec![
            ("Host", "localhost:7600"),
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]),
        0..5,
    );
    (
        method,
        path,
        0u8..2,
        websocket,
        prop::collection::vec((name, value), 0..20),
    )
        .prop_map(|(method, path, minor_version, websocket, other)| {
            let headers = websocket
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .chain(other)
                .collect();
            Request {
                method,
                path,
                minor_version,
                headers,
            }
        })
}

/// Byte edits of a request: (position, what to do, byte).
fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), 0u8..3, any::<u8>()), 1..8)
}

fn edit(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
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

/// What the parser says, checked for consistency: a complete head is never longer than
/// the bytes it was read from.
fn parse(bytes: &[u8]) {
    if let Ok(Some((_, head_len))) = parse_head(bytes) {
        assert!(
            head_len <= bytes.len(),
            "a head of {head_len} bytes in {}",
            bytes.len()
        );
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..MAX_HEAD_BYTES / 4)) {
        parse(&bytes);
    }

    #[test]
    fn text_that_looks_like_http_never_panics(text in "([A-Z]{0,8} [ -~]{0,40} HTTP/[0-9.]{0,4}\r?\n)?([ -~]{0,30}(\r\n|\n|\r)){0,10}(\r\n)?") {
        parse(text.as_bytes());
    }

    #[test]
    fn mutated_requests_never_panic(request in request(), edits in edits()) {
        parse(&edit(request.head(), &edits));
    }

    #[test]
    fn well_formed_requests_are_read_back(request in request(), first_frame in prop::collection::vec(any::<u8>(), 0..32)) {
        let head = request.head();
        let mut bytes = head.clone();
        bytes.extend_from_slice(&first_frame);
        let (parsed, head_len) = parse_head(&bytes)
            .unwrap_or_else(|err| panic!("refused {:?}: {err}", String::from_utf8_lossy(&head)))
            .expect("a complete head");
        prop_assert_eq!(head_len, head.len());
        prop_assert_eq!(parsed.method().as_str(), request.method.as_str());
        prop_assert_eq!(parsed.uri().to_string(), request.path.clone());
        let expected_version = if request.minor_version == 1 {
            http::Version::HTTP_11
        } else {
            http::Version::HTTP_10
        };
        prop_assert_eq!(parsed.version(), expected_version);
        prop_assert_eq!(parsed.headers().len(), request.headers.len());
        for (name, value) in &request.headers {
            let values: Vec<&[u8]> = parsed
                .headers()
                .get_all(name.as_str())
                .iter()
                .map(|value| value.as_bytes())
                .collect();
            prop_assert!(values.contains(&value.as_bytes()), "{name}: {value} not in {values:?}");
        }
        // Every strict prefix is an incomplete head, never a refusal.
        for cut in 0..head.len() {
            let prefix = parse_head(&head[..cut]);
            prop_assert!(matches!(prefix, Ok(None)), "prefix of {cut} bytes: {:?}", prefix.map(|parsed| parsed.map(|(_, len)| len)));
        }
    }
}
