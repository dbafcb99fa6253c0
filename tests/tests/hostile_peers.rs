//! Foreign clients that are not our agent: garbage, oversized and out-of-order messages,
//! silence. Each gets an error or a close code, and the server keeps serving real agents.

use std::time::Duration;

use changeover_tests::{
    FAST_HEARTBEAT_CONFIG, Server, eventually, session_users, start_agent, status,
};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the server answered before closing: its error message (if any) and close code.
#[derive(Debug)]
struct Refusal {
    error: Option<Value>,
    close_code: Option<u16>,
    close_reason: String,
}

async fn connect(url: &str) -> Client {
    connect_async(url).await.expect("websocket handshake").0
}

/// Sends `message` and reads until the server closes.
async fn refusal_after(url: &str, messages: Vec<Message>) -> Refusal {
    let mut client = connect(url).await;
    for message in messages {
        // The server may already have closed after an earlier message.
        if client.send(message).await.is_err() {
            break;
        }
    }
    read_until_close(&mut client).await
}

async fn read_until_close(client: &mut Client) -> Refusal {
    let mut refusal = Refusal {
        error: None,
        close_code: None,
        close_reason: String::new(),
    };
    let reading = async {
        while let Some(frame) = client.next().await {
            match frame {
                Ok(Message::Text(text)) => {
                    let value: Value = serde_json::from_str(&text).expect("server sends JSON");
                    if value["type"] == "error" {
                        refusal.error = Some(value);
                    }
                }
                Ok(Message::Close(Some(frame))) => {
                    refusal.close_code = Some(u16::from(frame.code));
                    refusal.close_reason = frame.reason.to_string();
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), reading)
        .await
        .expect("the server closes the connection");
    refusal
}

fn hello(version: u32) -> Message {
    Message::text(
        json!({
            "type": "hello",
            "protocol_version": version,
            "agent_id": format!("foreign-{version}"),
            "user": "mallory",
            "host": "evil",
            "platform": "linux-x86_64",
            "agent_version": "0.0.1"
        })
        .to_string(),
    )
}

fn assert_refused(refusal: &Refusal, error_code: &str, close_code: u16) {
    let error = refusal
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("no error message: {refusal:?}"));
    assert_eq!(error["code"], error_code, "{refusal:?}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{refusal:?}"
    );
    assert_eq!(refusal.close_code, Some(close_code), "{refusal:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_errors_and_closes_while_real_agents_stay_served() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let config = "[server]\nheartbeat_secs = 1\nhandshake_timeout_secs = 2\n";
    let server = Server::start(&root, Some(config));
    let url = server.url();
    let _alice = start_agent(&url, "alice", &dir.path().join("alice"), &[]);
    let _bob = start_agent(&url, "bob", &dir.path().join("bob"), &[]);
    let wait_for_agents = |url: String| {
        tokio::task::spawn_blocking(move || {
            eventually(Duration::from_secs(20), "alice and bob", || {
                (session_users(&status(&url)) == ["alice", "bob"]).then_some(())
            })
        })
    };
    wait_for_agents(url.clone()).await.unwrap();

    let not_json = refusal_after(&url, vec![Message::text("{this is not json")]).await;
    assert_refused(&not_json, "malformed_message", 1007);

    let unknown = refusal_after(&url, vec![Message::text(r#"{"type":"format_disk"}"#)]).await;
    assert_refused(&unknown, "unknown_message_type", 1007);
    assert!(
        unknown.error.unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("format_disk")
    );

    let missing_fields = refusal_after(&url, vec![Message::text(r#"{"type":"hello"}"#)]).await;
    assert_refused(&missing_fields, "malformed_message", 1007);

    let binary = refusal_after(&url, vec![Message::binary(vec![0u8, 159, 146, 150])]).await;
    assert_refused(&binary, "binary_not_supported", 1003);

    let oversized = refusal_after(&url, vec![Message::text("x".repeat(200 * 1024))]).await;
    assert_eq!(oversized.close_code, Some(1009), "{oversized:?}");

    let admin_first =
        refusal_after(&url, vec![Message::text(r#"{"type":"status_request"}"#)]).await;
    assert_refused(&admin_first, "unauthorized", 4003);

    let second_hello = refusal_after(&url, vec![hello(1), hello(1)]).await;
    assert_refused(&second_hello, "unexpected_message", 1008);

    let agent_asks_status = refusal_after(
        &url,
        vec![hello(1), Message::text(r#"{"type":"status_request"}"#)],
    )
    .await;
    assert_refused(&agent_asks_status, "unauthorized", 4003);

    let newer = refusal_after(&url, vec![hello(99)]).await;
    assert_refused(&newer, "unsupported_protocol", 4001);
    let error = newer.error.unwrap();
    assert_eq!(error["supported_protocol"], json!({"min": 1, "max": 1}));
    assert!(error["message"].as_str().unwrap().contains("99"));

    // Silence after the WebSocket handshake: closed once the hello timeout passes.
    let mut silent = connect(&url).await;
    let silent_refusal = read_until_close(&mut silent).await;
    assert_eq!(silent_refusal.close_code, Some(4002), "{silent_refusal:?}");

    // Not even WebSocket: plain garbage over TCP gets an HTTP error and a closed socket.
    let mut raw = TcpStream::connect(server.address).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer))
        .await
        .expect("the server closes a non-WebSocket connection")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 426 Upgrade Required"),
        "{answer}"
    );

    // The agent-update path serves only archives on offer: no path tricks, no listing,
    // and an agent sending an update report before its hello is refused.
    for request in [
        "GET /agent-updates/../../../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /agent-updates/%2e%2e%2fstate%2fadmin.argon2 HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /agent-updates/ HTTP/1.1\r\nHost: x\r\n\r\n",
        "HEAD /agent-updates/agent-9.9.9-linux-x86_64.tar.gz HTTP/1.1\r\nHost: x\r\nRange: bytes=garbage\r\n\r\n",
    ] {
        let mut raw = TcpStream::connect(server.address).await.unwrap();
        raw.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer))
            .await
            .expect("the server answers and closes")
            .ok();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 404 Not Found"),
            "{request}: {answer}"
        );
    }
    let early_report = refusal_after(
        &url,
        vec![Message::text(
            json!({"type": "agent_update_report", "version": "1.0.0", "state": "failed"})
                .to_string(),
        )],
    )
    .await;
    assert_refused(&early_report, "unexpected_message", 1008);

    let mut junk = TcpStream::connect(server.address).await.unwrap();
    junk.write_all(b"\x00\x01\x02 definitely not HTTP\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), junk.read_to_end(&mut answer))
        .await
        .expect("the server closes a garbage connection")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request"), "{answer}");

    // A TCP connection that never sends anything is dropped after the handshake timeout.
    let mut mute = TcpStream::connect(server.address).await.unwrap();
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), mute.read(&mut buffer))
        .await
        .expect("a mute connection is closed by the server");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // Through all of that the real agents stayed connected and the server kept answering.
    wait_for_agents(url.clone()).await.unwrap();
    let log = std::fs::read_to_string(&server.process.log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("connection refused"),
        "refusals are logged: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_dropped_within_two_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), Some(FAST_HEARTBEAT_CONFIG));
    let url = server.url();
    let mut client = connect(&url).await;
    client.send(hello(1)).await.unwrap();
    let welcome = client.next().await.unwrap().unwrap();
    assert!(
        welcome.to_text().unwrap().contains("\"welcome\""),
        "{welcome:?}"
    );

    let listed_url = url.clone();
    tokio::task::spawn_blocking(move || {
        eventually(Duration::from_secs(10), "the silent peer listed", || {
            (session_users(&status(&listed_url)) == ["mallory"]).then_some(())
        })
    })
    .await
    .unwrap();
    // From now on the client reads nothing, so it never answers the server's pings.
    let gone_url = url.clone();
    tokio::task::spawn_blocking(move || {
        eventually(Duration::from_secs(6), "the silent peer dropped", || {
            session_users(&status(&gone_url)).is_empty().then_some(())
        })
    })
    .await
    .unwrap();
    // The server closed it for silence (the client itself cannot read that close any
    // more: its queued pong replies hit a socket the server has already shut).
    let log = std::fs::read_to_string(&server.process.log).unwrap();
    assert!(log.contains("close_code=4006"), "{log}");
    assert!(log.contains("nothing heard for"), "{log}");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_session_with_a_reason_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("root"), None);
    let mut client = connect(&server.url()).await;
    client.send(hello(1)).await.unwrap();
    let _welcome = client.next().await.unwrap().unwrap();
    server.process.signal("TERM");
    let refusal = read_until_close(&mut client).await;
    assert_eq!(refusal.close_code, Some(1001), "{refusal:?}");
    assert_eq!(refusal.close_reason, "server shutting down");
    let status = tokio::task::spawn_blocking(move || {
        let status = server.process.wait_exit(Duration::from_secs(10));
        (status, server)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_waits_in_the_backlog_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[server]\nheartbeat_secs = 1\nhandshake_timeout_secs = 2\nmax_concurrent_handshakes = 20\n";
    let server = Server::start(&dir.path().join("root"), Some(config));
    let url = server.url();
    let agent = start_agent(&url, "grace", &dir.path().join("grace"), &[]);
    let listed_url = url.clone();
    tokio::task::spawn_blocking(move || {
        eventually(Duration::from_secs(20), "grace connected", || {
            (session_users(&status(&listed_url)) == ["grace"]).then_some(())
        })
    })
    .await
    .unwrap();

    // 400 connections that never say a word: far more than the 20 handshake slots.
    let mut flood = Vec::new();
    for _ in 0..400 {
        flood.push(
            TcpStream::connect(server.address)
                .await
                .expect("backlog takes it"),
        );
    }
    // The established session is not disturbed while the flood waits (heartbeats go on).
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(flood);

    let drained_url = url.clone();
    tokio::task::spawn_blocking(move || {
        eventually(
            Duration::from_secs(30),
            "the server answering again",
            || (session_users(&status(&drained_url)) == ["grace"]).then_some(()),
        )
    })
    .await
    .unwrap();
    assert!(
        !agent.log_text().contains("disconnected"),
        "{}",
        agent.log_text()
    );
    let log = std::fs::read_to_string(&server.process.log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}
