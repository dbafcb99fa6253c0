//! Agents come and go: the session table follows, and agents come back by themselves.

use std::time::{Duration, Instant};

use changeover_tests::{
    FAST_HEARTBEAT_CONFIG, Server, eventually, session_users, start_agent, status,
};

#[test]
fn status_follows_agents_through_a_kill_and_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("root"), Some(FAST_HEARTBEAT_CONFIG));
    let url = server.url();
    let _alice = start_agent(&url, "alice", &dir.path().join("alice"), &[]);
    let bob = start_agent(&url, "bob", &dir.path().join("bob"), &[]);
    let _carol = start_agent(&url, "carol", &dir.path().join("carol"), &[]);

    let report = eventually(Duration::from_secs(20), "three sessions", || {
        let report = status(&url);
        (session_users(&report) == ["alice", "bob", "carol"]).then_some(report)
    });
    assert_eq!(report["phase"], "idle");
    assert_eq!(report["available_version"], serde_json::Value::Null);
    assert_eq!(report["server_version"], env!("CARGO_PKG_VERSION"));
    for session in report["sessions"].as_array().unwrap() {
        assert_eq!(session["agent_version"], env!("CARGO_PKG_VERSION"));
        assert!(session["host"].as_str().is_some_and(|h| !h.is_empty()));
        assert!(
            session["connected_since"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
    }

    // A killed agent leaves within the heartbeat window (2 intervals of 1 s, plus slack).
    bob.signal("KILL");
    let killed_at = Instant::now();
    eventually(Duration::from_secs(5), "bob to leave", || {
        (session_users(&status(&url)) == ["alice", "carol"]).then_some(())
    });
    assert!(killed_at.elapsed() < Duration::from_secs(4));

    // The agents that are still running come back to a restarted server by themselves.
    server.restart();
    assert_eq!(server.url(), url);
    eventually(Duration::from_secs(20), "alice and carol to return", || {
        (session_users(&status(&url)) == ["alice", "carol"]).then_some(())
    });
}

#[test]
fn an_agent_keeps_its_id_across_restarts_and_a_reconnect_replaces_the_stale_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), Some(FAST_HEARTBEAT_CONFIG));
    let url = server.url();
    let state = dir.path().join("dave");
    let first = start_agent(&url, "dave", &state, &[]);
    let first_id = eventually(Duration::from_secs(20), "dave connected", || {
        let report = status(&url);
        report["sessions"][0]["agent_id"]
            .as_str()
            .map(str::to_owned)
    });
    drop(first);
    let _second = start_agent(&url, "dave", &state, &[]);
    eventually(Duration::from_secs(20), "dave back, once", || {
        let report = status(&url);
        let sessions = report["sessions"].as_array()?;
        (sessions.len() == 1 && sessions[0]["agent_id"] == first_id.as_str()).then_some(())
    });
}

#[test]
fn an_agent_started_before_the_server_connects_once_it_is_up() {
    let dir = tempfile::tempdir().unwrap();
    // Find a free port, then start the agent against it while nothing listens there.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = probe.local_addr().unwrap();
    drop(probe);
    let agent = start_agent(
        &format!("ws://{address}"),
        "erin",
        &dir.path().join("erin"),
        &[],
    );
    eventually(Duration::from_secs(10), "the agent to retry", || {
        agent
            .log_text()
            .contains("cannot reach the server")
            .then_some(())
    });
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("server/config")).unwrap();
    std::fs::write(
        root.join("server/config/changeover.toml"),
        format!("[server]\nlisten = \"{address}\"\nheartbeat_secs = 1\n"),
    )
    .unwrap();
    let server = Server::start_with(&root, None, None);
    assert_eq!(server.address, address);
    eventually(Duration::from_secs(40), "erin to connect", || {
        (session_users(&status(&server.url())) == ["erin"]).then_some(())
    });
    let log = agent.log_text();
    assert!(
        log.contains("connecting") && log.contains("connected"),
        "{log}"
    );
}

#[test]
fn an_agent_gives_up_on_a_silent_server_and_returns_when_it_wakes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), Some(FAST_HEARTBEAT_CONFIG));
    let url = server.url();
    let agent = start_agent(&url, "judy", &dir.path().join("judy"), &[]);
    eventually(Duration::from_secs(20), "judy connected", || {
        (session_users(&status(&url)) == ["judy"]).then_some(())
    });
    // A frozen server keeps its sockets open but says nothing: only the heartbeat notices.
    server.process.signal("STOP");
    let frozen = Instant::now();
    eventually(
        Duration::from_secs(15),
        "the agent to notice the silence",
        || {
            agent
                .log_text()
                .contains("nothing heard from the server")
                .then_some(())
        },
    );
    // Two heartbeats of 1 s plus the agent's 5 s of slack.
    assert!(
        frozen.elapsed() >= Duration::from_secs(6),
        "{:?}",
        frozen.elapsed()
    );
    server.process.signal("CONT");
    eventually(Duration::from_secs(40), "judy back", || {
        (session_users(&status(&url)) == ["judy"]).then_some(())
    });
}
