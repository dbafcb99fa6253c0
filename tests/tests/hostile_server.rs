//! A hostile server: a WebSocket server inside the test, on a real socket, that sends the
//! real `changeover-agent` every extreme value the protocol can carry — a heartbeat of
//! `u64::MAX` seconds, deadlines in the year 9999, offers of `u64::MAX` bytes, garbage and a
//! 10 MiB frame. The agent must name what it refused in its log, never panic, keep running
//! and reconnect. The same server feeds `admin status` a report full of terminal escapes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use changeover_tests::{ADMIN_PASSWORD, Process, admin, eventually, start_agent};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

const MAX: u64 = u64::MAX;

/// The agent id the hostile server hands the first agent, as if it were a clone.
const ASSIGNED_ID: &str = "assigned-by-hostile-server";

/// Every hello the server got, in order.
type Hellos = Arc<Mutex<Vec<Value>>>;

/// The hostile server: one runtime of its own, so the test can block on the agent.
struct HostileServer {
    address: SocketAddr,
    hellos: Hellos,
    _runtime: tokio::runtime::Runtime,
}

impl HostileServer {
    fn start() -> HostileServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let hellos: Hellos = Arc::default();
        let recorded = Arc::clone(&hellos);
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(stream, Arc::clone(&recorded)));
            }
        });
        HostileServer {
            address,
            hellos,
            _runtime: runtime,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}", self.address)
    }

    fn hellos_from(&self, user: &str) -> Vec<Value> {
        self.hellos
            .lock()
            .unwrap()
            .iter()
            .filter(|hello| hello["user"] == user)
            .cloned()
            .collect()
    }
}

async fn serve(stream: TcpStream, hellos: Hellos) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let first = match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => {
            serde_json::from_str::<Value>(&text).unwrap_or_default()
        }
        _ => return,
    };
    match first["type"].as_str() {
        Some("hello") => {
            let user = first["user"].as_str().unwrap_or_default().to_owned();
            let earlier = {
                let mut hellos = hellos.lock().unwrap();
                let earlier = hellos.iter().filter(|hello| hello["user"] == user).count();
                hellos.push(first);
                earlier
            };
            match (user.as_str(), earlier) {
                ("extremes", 0) => extremes(ws).await,
                ("extremes", _) => logout_forever(ws).await,
                _ => refuse_for_ever(ws).await,
            }
        }
        Some("admin_login") => fake_admin(ws, &first).await,
        _ => {}
    }
}

async fn send(ws: &mut WebSocketStream<TcpStream>, message: Value) {
    let _ = ws.send(Message::text(message.to_string())).await;
}

fn welcome(heartbeat_secs: u64, assigned: Option<&str>) -> Value {
    let mut welcome = json!({
        "type": "welcome",
        "protocol_version": changeover_protocol::PROTOCOL_VERSION,
        "server_version": "6.6.6",
        "session_id": MAX,
        "heartbeat_secs": heartbeat_secs,
    });
    if let Some(id) = assigned {
        welcome["assigned_agent_id"] = json!(id);
    }
    welcome
}

// The first connection: every extreme value, garbage, and at last a frame far beyond the
// agent's limit, which ends the connection.
async fn extremes(mut ws: WebSocketStream<TcpStream>) {
    let platform = changeover_protocol::release::current_platform();
    send(&mut ws, welcome(MAX, Some(ASSIGNED_ID))).await;
    send(
        &mut ws,
        json!({
            "type": "warning",
            "changeover_id": "c-hostile",
            "deadline": "9999-12-31T23:59:59Z",
            "seconds_left": MAX,
            "target_version": "9.9.9",
            "message": "save your work \u{1b}[2J",
        }),
    )
    .await;
    let offer = |version: &str, size: u64, path: &str| {
        json!({
            "type": "agent_update_offer",
            "version": version,
            "platform": platform,
            "archive": format!("agent-{version}-{platform}.tar.gz"),
            "size": size,
            "sha256": "ab".repeat(32),
            "path": path,
            "signature": "untrusted comment: not a signature\nAAAA\ntrusted comment: {}\nAAAA",
        })
    };
    send(&mut ws, offer("999.0.0", MAX, "/agent-updates/a.tar.gz")).await;
    send(
        &mut ws,
        offer("999.0.1", 1000, "/agent-updates/../../../etc/passwd"),
    )
    .await;
    send(
        &mut ws,
        json!({"type": "update_cancelled", "changeover_id": "c-hostile", "message": "never mind"}),
    )
    .await;
    send(
        &mut ws,
        json!({"type": "error", "code": "internal", "message": "boom", "retry_after_secs": MAX}),
    )
    .await;
    for garbage in [
        "{not json".to_owned(),
        r#"{"type":"launch_rockets","fuel":1e999}"#.to_owned(),
        r#"{"type":"warning"}"#.to_owned(),
        r#"{"type":"welcome","heartbeat_secs":-1}"#.to_owned(),
        r#"{"type":"logout","changeover_id":"x","reason":"r","reconnect_within_ms":1e400}"#
            .to_owned(),
        "[".repeat(10_000),
        "\"\u{0}\u{1b}\"".to_owned(),
    ] {
        let _ = ws.send(Message::text(garbage)).await;
    }
    let _ = ws.send(Message::binary(vec![0xff; 4096])).await;
    let _ = ws.send(Message::Ping(vec![1, 2, 3].into())).await;
    send(&mut ws, welcome(0, Some("in-session welcome"))).await;
    // Far beyond the agent's 64 KiB: it must drop the connection, not buffer it.
    let huge = format!(
        r#"{{"type":"update_cancelled","message":"{}"}}"#,
        "x".repeat(10 << 20)
    );
    let _ = tokio::time::timeout(Duration::from_secs(20), ws.send(Message::text(huge))).await;
    // Whatever the agent does now, it does on a new connection.
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

// Later connections: welcomed (with an assigned id the agent must not take), then logged
// out with a reconnect window of `u64::MAX` milliseconds.
async fn logout_forever(mut ws: WebSocketStream<TcpStream>) {
    send(&mut ws, welcome(1, Some("not an id \u{1b}[31m"))).await;
    send(
        &mut ws,
        json!({
            "type": "logout",
            "changeover_id": "c-hostile",
            "reason": "the server is updating",
            "reconnect_within_ms": MAX,
        }),
    )
    .await;
    let _ = ws.close(None).await;
}

async fn refuse_for_ever(mut ws: WebSocketStream<TcpStream>) {
    send(
        &mut ws,
        json!({
            "type": "error",
            "code": "server_full",
            "message": "come back never",
            "retry_after_secs": MAX,
        }),
    )
    .await;
    let _ = ws.close(None).await;
}

// An admin connection: the right password gets a status report whose every string tries
// to steer the terminal; a wrong one gets a refusal that tries the same.
async fn fake_admin(mut ws: WebSocketStream<TcpStream>, login: &Value) {
    if login["password"] != ADMIN_PASSWORD {
        send(
            &mut ws,
            json!({
                "type": "error",
                "code": "unauthorized",
                "message": "wrong password\u{1b}]0;pwned\u{7}\u{1b}[2J",
            }),
        )
        .await;
        let _ = ws.close(None).await;
        return;
    }
    send(
        &mut ws,
        json!({
            "type": "admin_welcome",
            "protocol_version": changeover_protocol::PROTOCOL_VERSION,
            "server_version": "6.6.6\u{1b}[8m",
        }),
    )
    .await;
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        if !text.contains("status_request") {
            continue;
        }
        let session = |user: &str, host: &str| {
            json!({
                "session_id": 1,
                "agent_id": "id-1",
                "user": user,
                "host": host,
                "platform": "linux-x86_64",
                "agent_version": "1.0.0\u{7}",
                "protocol_version": 1,
                "address": "10.0.0.9:4000",
                "connected_since": "2026-01-01T00:00:00Z",
            })
        };
        send(
            &mut ws,
            json!({
                "type": "status",
                "server_version": "6.6.6\u{1b}[8m",
                "available_version": null,
                "phase": "idle",
                "last_refusal": "bad \u{202e}txt.exe",
                "sessions": [
                    session("alice", "ws-1"),
                    session("\u{1b}[2J\u{1b}[31mroot", "ws\u{202e}2\nfake row"),
                ],
            }),
        )
        .await;
    }
}

fn alive(agent: &mut Process) -> bool {
    agent.try_status().is_none()
}

fn assert_logged(agent: &Process, what: &str, needle: &str) {
    eventually(Duration::from_secs(20), what, || {
        agent.log_text().contains(needle).then_some(())
    });
}

fn assert_no_panic(agent: &Process) {
    let log = agent.log_text();
    assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
}

#[test]
fn an_agent_clamps_what_a_hostile_server_sends_and_keeps_running() {
    let server = HostileServer::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("extremes");
    let mut agent = start_agent(&server.url(), "extremes", &state, &[]);

    assert_logged(
        &agent,
        "the heartbeat clamped",
        "the server asked for a heartbeat of 18446744073709551615 s; using 3600 s",
    );
    assert_logged(
        &agent,
        "the warning's seconds clamped",
        "the server's warning has 18446744073709551615 seconds left; using 86400 s",
    );
    assert_logged(
        &agent,
        "the warning's deadline replaced",
        "the server's warning has the deadline 9999-12-31T23:59:59Z, more than a day from now",
    );
    assert_logged(
        &agent,
        "the huge offer refused",
        "the offered archive is 18446744073709551615 bytes, above the agent's download cap",
    );
    assert_logged(
        &agent,
        "the offer's path refused",
        r#"the offer's path "/agent-updates/../../../etc/passwd" is not a plain path"#,
    );
    assert_logged(
        &agent,
        "the assigned id taken",
        &format!("the server assigned {ASSIGNED_ID}"),
    );

    // The 10 MiB frame ended the first connection; the agent came back.
    let hellos = eventually(Duration::from_secs(40), "the agent reconnects", || {
        let hellos = server.hellos_from("extremes");
        (hellos.len() >= 2).then_some(hellos)
    });
    assert!(alive(&mut agent), "{}", agent.log_text());
    // The same process: the same instance, now under the id the server assigned.
    assert!(
        hellos[0]["instance_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    assert_eq!(hellos[1]["instance_id"], hellos[0]["instance_id"]);
    assert_ne!(hellos[0]["agent_id"], ASSIGNED_ID);
    assert_eq!(hellos[1]["agent_id"], ASSIGNED_ID);
    assert_eq!(
        std::fs::read_to_string(state.join("agent-id")).unwrap(),
        ASSIGNED_ID
    );

    assert_logged(
        &agent,
        "the bad assigned id ignored",
        "ignoring the agent id the server assigned",
    );
    assert_logged(
        &agent,
        "the reconnect window clamped",
        "the server asked to reconnect within 18446744073709551615 ms; using 600000 ms",
    );
    assert_logged(
        &agent,
        "the pause after the logout",
        "logged out for the update; returning after a pause",
    );
    assert!(
        agent
            .log_text()
            .contains("unreadable message from the server"),
        "{}",
        agent.log_text()
    );

    // A second agent is refused with a retry-after of u64::MAX seconds.
    let refused_state = dir.path().join("refused");
    let mut refused = start_agent(&server.url(), "refused", &refused_state, &[]);
    assert_logged(
        &refused,
        "the retry-after clamped",
        "the server asked to retry after 18446744073709551615 s; using 3600 s",
    );

    // Everything was taken in; both still run, and neither panicked.
    std::thread::sleep(Duration::from_secs(1));
    assert!(alive(&mut agent), "{}", agent.log_text());
    assert!(alive(&mut refused), "{}", refused.log_text());
    assert_no_panic(&agent);
    assert_no_panic(&refused);
    assert_eq!(
        std::fs::read_to_string(state.join("agent-id")).unwrap(),
        ASSIGNED_ID,
        "the invalid id was not written"
    );
    assert_no_download_left(&state);
}

fn assert_no_download_left(state: &Path) {
    let updates = state.join("updates");
    let left: Vec<_> = std::fs::read_dir(&updates)
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", updates.display());
}

#[test]
fn admin_status_shows_escapes_from_the_server_escaped() {
    let server = HostileServer::start();
    let url = server.url();
    let output = admin(&["status", "--server", &url], ADMIN_PASSWORD);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(!stdout.contains('\u{1b}'), "a raw escape: {stdout:?}");
    assert!(
        !stdout.contains('\u{202e}'),
        "a raw bidi override: {stdout:?}"
    );
    assert!(!stdout.contains('\u{7}'), "a raw bell: {stdout:?}");
    assert!(stdout.contains(r"\x1b[2J\x1b[31mroot"), "{stdout}");
    assert!(stdout.contains(r"ws\u{202e}2\x0afake row"), "{stdout}");
    assert!(stdout.contains(r"6.6.6\x1b[8m"), "{stdout}");
    // The injected newline made no row of its own.
    assert!(
        !stdout.lines().any(|line| line.starts_with("fake row")),
        "{stdout}"
    );

    // JSON stays JSON: the same strings, escaped by serde.
    let output = admin(&["status", "--server", &url, "--json"], ADMIN_PASSWORD);
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(report["sessions"][1]["user"], "\u{1b}[2J\u{1b}[31mroot");

    // A refusal's message reaches stderr escaped too.
    let output = admin(&["status", "--server", &url], "wrong");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains('\u{1b}'), "a raw escape: {stderr:?}");
    assert!(
        stderr.contains(r"wrong password\x1b]0;pwned\x07"),
        "{stderr}"
    );
}
