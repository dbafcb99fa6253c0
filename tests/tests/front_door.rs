//! The front door under a hostile crowd: anyone who can reach the port, with no login,
//! must not be able to guess passwords faster than the throttle allows, lock the admin
//! out, hold the door with idle connections, grow the server's memory with huge hellos, or
//! reach the admin's terminal with escape sequences. Floods come from other loopback
//! addresses (127.0.0.2 and up) than the admin and the real agents (127.0.0.1).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use changeover_tests::{
    ADMIN_PASSWORD, FAST_HEARTBEAT_CONFIG, Server, admin, eventually, session_users, start_agent,
    status,
};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// A TCP connection to `server` from the loopback address `source`.
async fn connect_from(source: Ipv4Addr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    socket.connect(server).await
}

/// A WebSocket to `server` from `source`.
async fn websocket_from(
    source: Ipv4Addr,
    server: SocketAddr,
) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let tcp = connect_from(source, server).await?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{server}/"), tcp).await?;
    Ok(ws)
}

/// Sends `first` and returns the first text message the server answers with.
async fn answer_to(ws: &mut WebSocketStream<TcpStream>, first: Value) -> anyhow::Result<Value> {
    ws.send(Message::text(first.to_string())).await?;
    while let Some(frame) = ws.next().await {
        if let Message::Text(text) = frame? {
            return Ok(serde_json::from_str(&text)?);
        }
    }
    anyhow::bail!("closed without an answer")
}

fn server_memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_wrong_logins_verify_at_most_five_and_the_admin_still_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), None);
    let address = server.address;
    let guesser = Ipv4Addr::new(127, 0, 0, 2);
    let guesses: Vec<_> = (0..50)
        .map(|n| {
            tokio::spawn(async move {
                let mut ws = websocket_from(guesser, address).await?;
                let login = json!({
                    "type": "admin_login",
                    "protocol_version": 1,
                    "password": format!("guess-{n}"),
                });
                answer_to(&mut ws, login).await
            })
        })
        .collect();
    // The real admin, from another address, during the flood.
    let url = server.url();
    let admin_login = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let output = admin(&["status", "--server", &url], ADMIN_PASSWORD);
        (started.elapsed(), output)
    });
    let mut checked = 0;
    let mut throttled = 0;
    for guess in guesses {
        let answer = guess.await.unwrap().expect("every guess gets an answer");
        assert_eq!(answer["type"], "error", "{answer}");
        match answer["code"].as_str() {
            Some("unauthorized") => checked += 1,
            Some("throttled") => {
                throttled += 1;
                assert!(answer["retry_after_secs"].as_u64().is_some(), "{answer}");
            }
            _ => panic!("unexpected answer to a wrong password: {answer}"),
        }
    }
    assert!(
        checked <= 5,
        "{checked} wrong passwords were checked in a minute"
    );
    assert_eq!(checked + throttled, 50);
    let (took, output) = admin_login.await.unwrap();
    assert!(
        output.status.success(),
        "the admin was kept out: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        took < Duration::from_secs(2),
        "the admin's status took {took:?}"
    );

    // The guessing address stays throttled, with the right password too.
    let mut ws = websocket_from(guesser, address).await.unwrap();
    let login = json!({"type": "admin_login", "protocol_version": 1, "password": ADMIN_PASSWORD});
    let answer = answer_to(&mut ws, login).await.unwrap();
    assert_eq!(answer["code"], "throttled", "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_fake_agents_with_huge_hellos_are_refused_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), Some(FAST_HEARTBEAT_CONFIG));
    let address = server.address;
    let pid = server.process.pid();
    let url = server.url();
    let _agent = start_agent(&url, "grace", &dir.path().join("grace"), &[]);
    let listed = url.clone();
    tokio::task::spawn_blocking(move || {
        eventually(Duration::from_secs(20), "grace connected", || {
            (session_users(&status(&listed)) == ["grace"]).then_some(())
        })
    })
    .await
    .unwrap();
    let before = server_memory_kib(pid, "VmRSS:");

    // 2,000 fake agents from 40 addresses, each hello field 60 KiB: the whole crowd at
    // once, as an attacker would send it.
    let field = "x".repeat(60 * 1024 / 4);
    let fakes: Vec<_> = (0..2000u32)
        .map(|n| {
            let source = Ipv4Addr::new(127, 0, 1, 1 + (n % 40) as u8);
            let field = field.clone();
            tokio::spawn(async move {
                let mut ws = websocket_from(source, address).await?;
                let hello = json!({
                    "type": "hello",
                    "protocol_version": 1,
                    "agent_id": format!("fake-{n}-{field}"),
                    "user": field,
                    "host": field,
                    "platform": field,
                    "agent_version": "1.0.0",
                });
                answer_to(&mut ws, hello).await
            })
        })
        .collect();
    let mut refused = 0;
    for fake in fakes {
        // A connection turned away at the door (too many from one address) is fine too.
        if let Ok(Ok(answer)) = fake.await {
            assert_eq!(
                answer["type"], "error",
                "a fake agent was welcomed: {answer}"
            );
            assert_eq!(answer["code"], "malformed_message", "{answer}");
            refused += 1;
        }
    }
    assert!(
        refused >= 1000,
        "only {refused} fake hellos were read and refused"
    );
    let peak = server_memory_kib(pid, "VmHWM:");
    let after = server_memory_kib(pid, "VmRSS:");
    // ARCHITECTURE.md "Limits": hellos being read take at most the global handshake slots
    // times the 64 KiB message limit (64 MiB); refused hellos are not kept.
    assert!(
        peak < before + 160 * 1024,
        "peak RSS {peak} KiB, {before} KiB before the crowd"
    );
    eprintln!("RSS before {before} KiB, peak {peak} KiB, after {after} KiB, {refused} refused");

    let report = tokio::task::spawn_blocking(move || status(&url))
        .await
        .unwrap();
    assert_eq!(session_users(&report), ["grace"]);
    assert_eq!(report["sessions_total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifteen_hundred_idle_connections_from_one_address_do_not_keep_an_agent_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), Some(FAST_HEARTBEAT_CONFIG));
    let address = server.address;
    let idle_source = Ipv4Addr::new(127, 0, 0, 3);
    let mut idle = Vec::new();
    for _ in 0..1500 {
        match connect_from(idle_source, address).await {
            Ok(stream) => idle.push(stream),
            Err(err) => panic!("cannot open idle connection {}: {err}", idle.len()),
        }
    }
    let url = server.url();
    let started = Instant::now();
    let _agent = start_agent(&url, "heidi", &dir.path().join("heidi"), &[]);
    let listed = url.clone();
    let connected = tokio::task::spawn_blocking(move || {
        eventually(Duration::from_secs(20), "heidi connected", || {
            (session_users(&status(&listed)) == ["heidi"]).then(|| started.elapsed())
        })
    })
    .await
    .unwrap();
    assert!(
        connected < Duration::from_secs(2),
        "the agent needed {connected:?} to get in past the idle connections"
    );
    drop(idle);
    let log = std::fs::read_to_string(&server.process.log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_named_with_escape_sequences_is_shown_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), Some(FAST_HEARTBEAT_CONFIG));
    let mut fake = websocket_from(Ipv4Addr::new(127, 0, 0, 4), server.address)
        .await
        .unwrap();
    let hello = json!({
        "type": "hello",
        "protocol_version": 1,
        "agent_id": "ansi-fake",
        "user": "\u{1b}[2J\u{1b}[31mmallory\u{1b}[0m",
        "host": "ws-\u{202e}exe.txt\u{7}",
        "platform": "linux-x86_64",
        "agent_version": "1.0.0",
    });
    let welcome = answer_to(&mut fake, hello).await.unwrap();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    // Keep answering pings while the admin looks.
    let keep_alive = tokio::spawn(async move { while fake.next().await.is_some() {} });

    let url = server.url();
    let (table, report) = tokio::task::spawn_blocking(move || {
        let output = admin(&["status", "--server", &url], ADMIN_PASSWORD);
        assert!(output.status.success(), "{output:?}");
        (output.stdout, status(&url))
    })
    .await
    .unwrap();
    keep_alive.abort();
    let text = String::from_utf8(table).expect("the table is UTF-8");
    assert!(
        !text.contains('\u{1b}'),
        "an escape reached the terminal: {text:?}"
    );
    assert!(
        !text.contains('\u{202e}'),
        "a bidi override reached the terminal: {text:?}"
    );
    assert!(
        !text.contains('\u{7}'),
        "a bell reached the terminal: {text:?}"
    );
    assert!(text.contains("\\x1b[2J\\x1b[31mmallory"), "{text}");
    assert!(text.contains("ws-\\u{202e}exe.txt\\x07"), "{text}");
    // The server keeps the names escaped, so the JSON shows the same.
    assert_eq!(
        report["sessions"][0]["user"],
        "\\x1b[2J\\x1b[31mmallory\\x1b[0m"
    );
}

#[test]
fn two_agents_from_one_copied_state_folder_both_stay_connected() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), Some(FAST_HEARTBEAT_CONFIG));
    let url = server.url();
    let original = dir.path().join("original");
    let first = start_agent(&url, "ida", &original, &[]);
    eventually(Duration::from_secs(20), "ida connected", || {
        (session_users(&status(&url)) == ["ida"]).then_some(())
    });
    // The disk image is copied while the agent runs, as a cloned workstation would be.
    let cloned = dir.path().join("cloned");
    std::fs::create_dir_all(&cloned).unwrap();
    let id_file =
        |state: &std::path::Path| std::fs::read_to_string(state.join("agent-id")).unwrap();
    std::fs::write(cloned.join("agent-id"), id_file(&original)).unwrap();
    let original_id = id_file(&original).trim().to_owned();
    let second = start_agent(&url, "jan", &cloned, &[]);
    let report = eventually(Duration::from_secs(20), "both listed", || {
        let report = status(&url);
        (session_users(&report) == ["ida", "jan"]).then_some(report)
    });
    let sessions = report["sessions"].as_array().unwrap();
    let jan = sessions.iter().find(|s| s["user"] == "jan").unwrap();
    let ida = sessions.iter().find(|s| s["user"] == "ida").unwrap();
    assert_eq!(ida["agent_id"], original_id.as_str());
    assert_ne!(jan["agent_id"], original_id.as_str());
    assert_eq!(jan["clone_of"], original_id.as_str());
    // The clone keeps its new id, so it is not a clone any more after a reconnect.
    let assigned = jan["agent_id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(10), "the new id kept", || {
        (id_file(&cloned).trim() == assigned).then_some(())
    });

    // No loop: both stay in their first sessions for several heartbeats.
    std::thread::sleep(Duration::from_secs(5));
    let later = status(&url);
    assert_eq!(session_users(&later), ["ida", "jan"]);
    let session_ids = |report: &Value| -> Vec<u64> {
        report["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["session_id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        session_ids(&later),
        session_ids(&report),
        "a session was replaced"
    );
    let log = std::fs::read_to_string(&server.process.log).unwrap();
    assert!(!log.contains("agent reconnected"), "{log}");
    assert!(log.contains("cloned disk"), "{log}");
    for agent in [&first, &second] {
        assert!(
            !agent.log_text().contains("panicked"),
            "{}",
            agent.log_text()
        );
    }
    assert!(
        second.log_text().contains("assigned"),
        "{}",
        second.log_text()
    );
}
