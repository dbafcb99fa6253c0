//! The local events stream end to end: `changeover-agent events --json` follows a real
//! agent through a real changeover of its server from 1.0.0 to 1.1.0 and the agent's own
//! update that follows, across the agent's restart into its new release.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use changeover_protocol::release::current_platform;
use changeover_tests::feeds::{StaticServer, Vendor, server_tree};
use changeover_tests::{ADMIN_PASSWORD, Process, Server, binary, eventually, status};
use serde_json::Value;

/// Server and agent releases 1.0.0 and 1.1.0, packed with the release tools.
fn feed(dir: &Path) -> (Vendor, PathBuf) {
    let vendor = Vendor::create(&dir.join("vendor"));
    let feed = dir.join("feed");
    for version in ["1.0.0", "1.1.0"] {
        let tree = server_tree(&dir.join(format!("server-{version}")), &[]);
        vendor.pack("server", version, &tree, &feed);
        let agent_tree = dir.join(format!("agent-{version}"));
        std::fs::create_dir_all(agent_tree.join("bin")).unwrap();
        std::fs::copy(
            binary("changeover-agent"),
            agent_tree.join("bin/changeover-agent"),
        )
        .unwrap();
        vendor.pack("agent", version, &agent_tree, &feed);
    }
    (vendor, feed)
}

fn install(program: &str, flag: &str, target: &Path, package: &Path, vendor: &Vendor) {
    let output = Command::new(binary(program))
        .args(["install", flag])
        .arg(target)
        .arg("--package")
        .arg(package)
        .arg("--public-key")
        .arg(&vendor.public_key)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `changeover-agent events --json` for `state_dir`, and the events it printed, parsed.
fn follow_events(state_dir: &Path, log: PathBuf) -> (Process, mpsc::Receiver<Value>) {
    let mut child = Command::new(binary("changeover-agent"))
        .args(["events", "--json", "--state-dir"])
        .arg(state_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let value: Value = serde_json::from_str(&line)
                .unwrap_or_else(|err| panic!("not a JSON line: {line:?}: {err}"));
            if lines_tx.send(value).is_err() {
                break;
            }
        }
    });
    (Process::from_child(child, log), lines_rx)
}

/// Takes events into `seen` until one satisfies `wanted`, which it returns.
fn wait_for(
    lines: &mpsc::Receiver<Value>,
    seen: &mut Vec<Value>,
    patience: Duration,
    what: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + patience;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(event) => {
                seen.push(event.clone());
                if wanted(&event) {
                    return event;
                }
            }
            Err(_) => panic!("no event for: {what} within {patience:?}; seen:\n{seen:#?}"),
        }
    }
}

fn is(event: &Value, name: &str) -> bool {
    event["event"] == name
}

/// The position of the first event in `seen` after `from` satisfying `wanted`.
fn position(seen: &[Value], from: usize, wanted: impl Fn(&Value) -> bool) -> Option<usize> {
    seen.iter()
        .skip(from)
        .position(wanted)
        .map(|index| index + from)
}

#[test]
fn events_json_prints_the_warning_the_logout_and_the_update_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (vendor, feed) = feed(dir.path());
    let platform = current_platform();
    let root = dir.path().join("office");
    let server_package = feed.join(format!("server-1.0.0-{platform}.tar.gz"));
    install(
        "changeover-server",
        "--root",
        &root,
        &server_package,
        &vendor,
    );
    let agent_dir = dir.path().join("anna/agent");
    let agent_package = feed.join(format!("agent-1.0.0-{platform}.tar.gz"));
    install(
        "changeover-agent",
        "--dir",
        &agent_dir,
        &agent_package,
        &vendor,
    );
    let feed_server = StaticServer::python(&feed, dir.path());
    let config = format!(
        "[server]\nheartbeat_secs = 1\n[feed]\nurl = \"{}\"\n[changeover]\nhealth_timeout_secs = 20\n",
        feed_server.url()
    );
    let server = Server::start_installed(&root, &config);
    let state_dir = dir.path().join("anna/state");
    std::fs::create_dir_all(&state_dir).unwrap();

    // The client application may well start before the agent.
    let (mut follower, lines) = follow_events(&state_dir, dir.path().join("events.log"));
    let agent_log = state_dir.join("agent.log");
    let agent = Process::from_child(
        Command::new(agent_dir.join("bin/changeover-agent"))
            .args(["run", "--server", &server.url(), "--user", "anna"])
            .arg("--state-dir")
            .arg(&state_dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log).unwrap())
            .spawn()
            .unwrap(),
        agent_log,
    );
    let mut seen = Vec::new();
    let first = wait_for(
        &lines,
        &mut seen,
        Duration::from_secs(30),
        "the state",
        |_| true,
    );
    assert!(is(&first, "state"), "{first:#}");
    assert_eq!(first["agent_version"], "1.0.0", "{first:#}");
    assert_eq!(first["server"], server.url(), "{first:#}");
    if first["connected"] != true {
        let connected = wait_for(
            &lines,
            &mut seen,
            Duration::from_secs(30),
            "connected",
            |e| is(e, "connected"),
        );
        assert_eq!(connected["server_version"], "1.0.0", "{connected:#}");
    }
    eventually(Duration::from_secs(20), "anna connected", || {
        (status(&server.url())["sessions"]
            .as_array()
            .map_or(0, Vec::len)
            == 1)
            .then_some(())
    });

    let update = Command::new(binary("changeover-agent"))
        .args([
            "admin",
            "update",
            "--server",
            &server.url(),
            "--grace",
            "6",
            "--json",
        ])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let warning = wait_for(
        &lines,
        &mut seen,
        Duration::from_secs(60),
        "a warning",
        |e| is(e, "warning"),
    );
    assert_eq!(warning["target_version"], "1.1.0", "{warning:#}");
    assert!(
        warning["seconds_left"].as_u64().unwrap() <= 6,
        "{warning:#}"
    );
    assert!(
        !warning["message"].as_str().unwrap().is_empty(),
        "{warning:#}"
    );

    // A client application started during the countdown learns of it from its first line.
    let once = Command::new(binary("changeover-agent"))
        .args(["events", "--json", "--once", "--state-dir"])
        .arg(&state_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        once.status.success(),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    let snapshot: Value = serde_json::from_slice(&once.stdout).unwrap();
    assert!(is(&snapshot, "state"), "{snapshot:#}");
    assert_eq!(snapshot["connected"], true, "{snapshot:#}");
    assert_eq!(
        snapshot["warning"]["target_version"], "1.1.0",
        "{snapshot:#}"
    );
    assert_eq!(
        snapshot["warning"]["changeover_id"], warning["changeover_id"],
        "{snapshot:#}"
    );

    // The agent restarts into its update: the stream ends, and the new agent's first line
    // says it is the new release.
    let mut back = wait_for(
        &lines,
        &mut seen,
        Duration::from_secs(120),
        "the new agent's state",
        |e| is(e, "state") && e["agent_version"] == "1.1.0",
    );
    if back["connected"] != true {
        back = wait_for(
            &lines,
            &mut seen,
            Duration::from_secs(30),
            "the new agent connected",
            |e| is(e, "connected"),
        );
    }
    assert_eq!(back["server_version"], "1.1.0", "{back:#}");
    let update = update.wait_with_output().unwrap();
    assert!(
        update.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&update.stdout),
        String::from_utf8_lossy(&update.stderr)
    );

    // In order: warnings, the logout, back on the new server, the offer, the download and
    // the install, the restart.
    let names: Vec<&str> = seen.iter().filter_map(|e| e["event"].as_str()).collect();
    let first_warning = position(&seen, 0, |e| is(e, "warning")).unwrap();
    let logout = position(&seen, first_warning, |e| is(e, "logout"))
        .unwrap_or_else(|| panic!("no logout after the warning: {names:?}"));
    assert!(
        seen[first_warning..logout]
            .iter()
            .all(|e| is(e, "warning") && e["target_version"] == "1.1.0"),
        "{names:?}"
    );
    assert_eq!(
        seen[logout]["changeover_id"], warning["changeover_id"],
        "{:#}",
        seen[logout]
    );
    assert!(
        !seen[logout]["message"].as_str().unwrap().is_empty(),
        "{:#}",
        seen[logout]
    );
    let reconnected = position(&seen, logout, |e| {
        is(e, "connected") && e["server_version"] == "1.1.0"
    })
    .unwrap_or_else(|| panic!("not reconnected to 1.1.0 after the logout: {names:?}"));
    let offered = position(&seen, reconnected, |e| is(e, "update_offered"))
        .unwrap_or_else(|| panic!("no update_offered after the reconnect: {names:?}"));
    let downloading = position(&seen, offered, |e| {
        is(e, "update_installing") && e["step"] == "downloading"
    })
    .unwrap_or_else(|| panic!("no download after the offer: {names:?}"));
    let installing = position(&seen, downloading, |e| {
        is(e, "update_installing") && e["step"] == "installing"
    })
    .unwrap_or_else(|| panic!("no install after the download: {names:?}"));
    let installed = position(&seen, installing, |e| is(e, "update_installed"))
        .unwrap_or_else(|| panic!("no update_installed after the install: {names:?}"));
    for index in [offered, downloading, installing, installed] {
        assert_eq!(seen[index]["version"], "1.1.0", "{:#}", seen[index]);
    }
    assert!(
        !names[logout..].contains(&"update_failed"),
        "{names:?}\n{}",
        agent.log_text()
    );
    // The new agent's stream starts after the old one's last line.
    let new_state = position(&seen, installed, |e| {
        is(e, "state") && e["agent_version"] == "1.1.0"
    });
    assert_eq!(new_state, Some(installed + 1), "{names:?}");
    for event in &seen {
        assert!(
            event["at"].as_str().is_some_and(|at| at.ends_with('Z')),
            "{event:#}"
        );
    }

    // It said once that it was waiting for the agent, and stops cleanly.
    let said = follower.log_text();
    assert!(said.contains("the agent is not running"), "{said}");
    follower.signal("TERM");
    let exit = follower.wait_exit(Duration::from_secs(10));
    assert!(exit.success(), "{exit}: {}", follower.log_text());
}
