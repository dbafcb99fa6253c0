//! The HTTP request that opens every connection, and where it goes.
//!
//! Every connection starts as HTTP/1.1. A WebSocket upgrade becomes an agent or admin
//! session; anything else gets a short, clear HTTP answer instead of a silently dropped
//! socket: `426 Upgrade Required` for a plain request (a browser, a health probe, `curl`),
//! `400 Bad Request` for bytes that are not HTTP at all. The one plain request served is
//! an agent fetching its own update (`GET /agent-updates/…`), handed back to the caller.
//! The request head is read here (bounded in size) and handed to tungstenite for the
//! upgrade itself.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{create_response, write_response};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// The largest request head accepted; a WebSocket upgrade needs a few hundred bytes.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// The most header fields read from a request head (a WebSocket upgrade sends about eight).
pub const MAX_HEADERS: usize = 32;

/// Why a connection did not become a WebSocket.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("not a WebSocket request: {reason} (answered {status})")]
    Refused { status: u16, reason: String },
    #[error("connection failed during the handshake: {0}")]
    Io(#[from] std::io::Error),
}

/// What a connection turned out to be.
#[derive(Debug)]
pub enum Opened<S> {
    WebSocket(WebSocketStream<S>),
    /// A plain `GET`/`HEAD` under [`crate::agent_updates::PATH_PREFIX`]: an agent fetching
    /// its update. The request head is consumed; the caller answers.
    AgentDownload {
        stream: S,
        request: http::Request<()>,
    },
}

/// Reads the request head and upgrades it to a WebSocket, hands an agent's download
/// request back, or answers it with an HTTP error.
pub async fn upgrade<S>(mut stream: S, config: WebSocketConfig) -> Result<Opened<S>, UpgradeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buffer = Vec::with_capacity(1024);
    let (request, head_len) = loop {
        let mut chunk = [0u8; 1024];
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(UpgradeError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buffer.extend_from_slice(&chunk[..read]);
        match parse_head(&buffer) {
            Ok(Some(parsed)) => break parsed,
            Ok(None) if buffer.len() < MAX_HEAD_BYTES => continue,
            Ok(None) => {
                let reason = format!("request head longer than {MAX_HEAD_BYTES} bytes");
                return Err(
                    answer(&mut stream, 431, "Request Header Fields Too Large", reason).await,
                );
            }
            Err(HeadError::TooManyHeaders) => {
                let reason = format!("more than {MAX_HEADERS} header fields");
                return Err(
                    answer(&mut stream, 431, "Request Header Fields Too Large", reason).await,
                );
            }
            Err(HeadError::Malformed(reason)) => {
                return Err(answer(&mut stream, 400, "Bad Request", reason).await);
            }
        }
    };
    let response = match create_response(&request) {
        Ok(response) => response,
        Err(_) if crate::agent_updates::is_download(&request) => {
            return Ok(Opened::AgentDownload { stream, request });
        }
        Err(err) => {
            let reason = format!(
                "this is a changeover server: connect with the changeover agent over WebSocket ({err})"
            );
            // RFC 9110 (15.5.22): a 426 names the protocol to upgrade to.
            let upgrade = [("Upgrade", "websocket".to_owned())];
            return Err(answer_with(&mut stream, 426, "Upgrade Required", &upgrade, reason).await);
        }
    };
    let mut head = Vec::with_capacity(256);
    write_response(&mut head, &response)
        .map_err(|err| UpgradeError::Io(std::io::Error::other(err)))?;
    stream.write_all(&head).await?;
    stream.flush().await?;
    // Whatever the client sent after the head (a pipelined first frame) is not lost.
    let rest = buffer.split_off(head_len);
    Ok(Opened::WebSocket(
        WebSocketStream::from_partially_read(stream, rest, Role::Server, Some(config)).await,
    ))
}

type ParsedHead = (http::Request<()>, usize);

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// More header fields than the server reads (431).
    TooManyHeaders,
    /// Not an HTTP request at all, or not a valid one (400).
    Malformed(String),
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadError::TooManyHeaders => {
                write!(formatter, "more than {MAX_HEADERS} header fields")
            }
            HeadError::Malformed(reason) => formatter.write_str(reason),
        }
    }
}

/// Parses the request head at the start of `buffer`: the request and the head's length in
/// bytes (what follows it is the peer's first frame), `None` while the head is incomplete,
/// or why the bytes are not an HTTP request. Public for the property tests and the fuzzer;
/// it never panics, whatever the bytes.
pub fn parse_head(buffer: &[u8]) -> Result<Option<ParsedHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buffer) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(err) => return Err(HeadError::Malformed(format!("not an HTTP request ({err})"))),
    };
    let version = match parsed.version {
        Some(1) => http::Version::HTTP_11,
        _ => http::Version::HTTP_10,
    };
    let mut request = http::Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"))
        .version(version);
    for header in parsed.headers.iter() {
        request = request.header(header.name, header.value);
    }
    let request = request
        .body(())
        .map_err(|err| HeadError::Malformed(format!("invalid HTTP request ({err})")))?;
    Ok(Some((request, head_len)))
}

async fn answer<S>(stream: &mut S, status: u16, phrase: &str, reason: String) -> UpgradeError
where
    S: AsyncWrite + Unpin,
{
    answer_with(stream, status, phrase, &[], reason).await
}

async fn answer_with<S>(
    stream: &mut S,
    status: u16,
    phrase: &str,
    extra_headers: &[(&str, String)],
    reason: String,
) -> UpgradeError
where
    S: AsyncWrite + Unpin,
{
    // The peer may already be gone; the refusal is logged either way.
    if plain_answer(stream, status, phrase, extra_headers, &reason)
        .await
        .is_ok()
    {
        let _ = stream.shutdown().await;
    }
    UpgradeError::Refused { status, reason }
}

/// Writes a short `text/plain` HTTP answer with `extra_headers` (name, value); the
/// connection closes after it. With an `Upgrade` header, `Connection` names it too
/// (RFC 9110, 7.8).
pub async fn plain_answer<S>(
    stream: &mut S,
    status: u16,
    phrase: &str,
    extra_headers: &[(&str, String)],
    reason: &str,
) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let body = format!("{reason}\n");
    let connection = if extra_headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("upgrade"))
    {
        "Upgrade, close"
    } else {
        "close"
    };
    let mut response = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: {connection}\r\n",
        body.len()
    );
    for (name, value) in extra_headers {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    response.push_str(&body);
    stream.write_all(response.as_bytes()).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exchange(request: &[u8]) -> (Result<(), String>, String) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        client_write.write_all(request).await.unwrap();
        let outcome = upgrade(server, WebSocketConfig::default())
            .await
            .map(|opened| assert!(matches!(opened, Opened::WebSocket(_))))
            .map_err(|err| err.to_string());
        drop(client_write);
        let mut answer = vec![0u8; 4096];
        let read = client_read.read(&mut answer).await.unwrap_or(0);
        (
            outcome,
            String::from_utf8_lossy(&answer[..read]).into_owned(),
        )
    }

    #[tokio::test]
    async fn a_websocket_upgrade_is_accepted() {
        let request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
            Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let (outcome, answer) = exchange(request).await;
        assert!(outcome.is_ok(), "{outcome:?}");
        assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
        assert!(answer.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{answer}");
    }

    #[tokio::test]
    async fn a_plain_request_is_told_to_upgrade() {
        let (outcome, answer) = exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(outcome.unwrap_err().contains("426"));
        assert!(
            answer.starts_with("HTTP/1.1 426 Upgrade Required"),
            "{answer}"
        );
        assert!(answer.contains("changeover agent"), "{answer}");
        assert!(answer.contains("\r\nUpgrade: websocket\r\n"), "{answer}");
        assert!(
            answer.contains("\r\nConnection: Upgrade, close\r\n"),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn too_many_header_fields_are_too_large() {
        let mut request = b"GET / HTTP/1.1\r\n".to_vec();
        for n in 0..=MAX_HEADERS {
            request.extend_from_slice(format!("X-Field-{n}: a\r\n").as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        let (outcome, answer) = exchange(&request).await;
        assert!(outcome.unwrap_err().contains("431"));
        assert!(
            answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn garbage_is_a_bad_request() {
        let (outcome, answer) = exchange(b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
        assert!(outcome.unwrap_err().contains("400"));
        assert!(answer.starts_with("HTTP/1.1 400 Bad Request"), "{answer}");
    }

    #[tokio::test]
    async fn an_endless_head_is_cut_off() {
        let mut request = b"GET / HTTP/1.1\r\n".to_vec();
        while request.len() < MAX_HEAD_BYTES + 100 {
            request.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let (outcome, answer) = exchange(&request).await;
        assert!(outcome.is_err());
        assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    }
}
