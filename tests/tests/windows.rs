//! The Windows build under Wine, mixed with the Linux build: a Windows agent on a Linux
//! server, and a Windows server serving a Linux agent. Each test boots a Wine prefix of
//! its own (some seconds) and leaves no Windows process behind.
//!
//! Wine runs on Linux files, so these tests show the Windows build works as a program
//! (sockets, files on `Z:`, the console, Ctrl-C); they cannot show Windows' own file
//! locking rules.

use std::time::Duration;

use changeover_tests::wine::{self, Exe, WindowsServer, Wine, install_exe, windows_binaries};
use changeover_tests::{
    ADMIN_PASSWORD, Server, eventually, session_users, start_agent, status, try_status,
};

/// The session of `user` in a status document, if it is listed.
fn session_of(report: &serde_json::Value, user: &str) -> Option<serde_json::Value> {
    report["sessions"]
        .as_array()?
        .iter()
        .find(|session| session["user"] == user)
        .cloned()
}

/// Checks that nothing of the prefix runs any more, after killing what is left.
fn assert_nothing_left(wine: &Wine) {
    wine.kill_all();
    eventually(Duration::from_secs(20), "no Wine process left", || {
        wine.live_processes().is_empty().then_some(())
    });
}

#[test]
fn a_windows_agent_connects_to_a_linux_server_and_its_admin_commands_work() {
    let build = windows_binaries();
    let wine = Wine::new();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), None);
    let url = server.url();
    let agent_exe = install_exe(build, Exe::Agent, &dir.path().join("windows/agent"));

    let version = wine::run(&wine, &agent_exe, &["--version"]);
    assert!(
        version.status.success(),
        "{}",
        String::from_utf8_lossy(&version.stderr)
    );
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    assert!(!version.is_empty(), "--version prints a version");

    let state_dir = dir.path().join("winnie");
    let mut agent = wine::start_agent(&wine, &agent_exe, &url, "winnie", &state_dir, &[]);
    let session = eventually(
        Duration::from_secs(60),
        "the Windows agent in the Linux server's status",
        || {
            assert!(
                agent.try_status().is_none(),
                "the Windows agent exited: {}",
                agent.log_text()
            );
            session_of(&status(&url), "winnie")
        },
    );
    assert_eq!(session["platform"], "windows-x86_64", "{session}");
    let agent_version = session["agent_version"].as_str().unwrap();
    assert!(
        !agent_version.is_empty() && version.contains(agent_version),
        "session says {agent_version}, --version says {version}"
    );
    assert!(
        session["host"].as_str().is_some_and(|h| !h.is_empty()),
        "{session}"
    );
    // The agent keeps its id in the state folder it was given as Z:\….
    let agent_id = std::fs::read_to_string(state_dir.join("agent-id")).unwrap();
    assert_eq!(session["agent_id"], agent_id.trim(), "{session}");

    // The Windows agent's own admin commands, against the same Linux server.
    let linux_report = status(&url);
    let output = wine::admin(
        &wine,
        &agent_exe,
        &["status", "--server", &url, "--json"],
        ADMIN_PASSWORD,
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["server_version"], linux_report["server_version"]);
    assert_eq!(report["phase"], linux_report["phase"]);
    assert_eq!(session_users(&report), ["winnie"]);

    let output = wine::admin(
        &wine,
        &agent_exe,
        &["status", "--server", &url],
        ADMIN_PASSWORD,
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("changeover phase   idle"), "{table}");
    assert!(table.contains("winnie"), "{table}");

    let wrong = wine::admin(&wine, &agent_exe, &["status", "--server", &url], "wrong");
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("wrong admin password"), "{stderr}");

    // Killing the Windows process ends its session on the server.
    agent.signal("KILL");
    agent.wait_exit(Duration::from_secs(10));
    eventually(Duration::from_secs(30), "the session gone", || {
        session_of(&status(&url), "winnie").is_none().then_some(())
    });
    assert_nothing_left(&wine);
}

#[test]
fn a_windows_server_serves_a_linux_agent_stops_on_ctrl_c_and_starts_again_after_a_reboot() {
    let build = windows_binaries();
    let wine = Wine::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server_exe = install_exe(build, Exe::Server, &dir.path().join("windows/server"));

    let mut server = WindowsServer::start(&wine, &server_exe, &root, None);
    let url = server.url();
    // The server made its layout through Z:\….
    assert!(root.join("server/config/changeover.toml").is_file());
    assert!(root.join("state/admin.argon2").is_file());

    let agent = start_agent(&url, "linus", &dir.path().join("linus"), &[]);
    let report = eventually(
        Duration::from_secs(30),
        "the Linux agent in the Windows server's status",
        || {
            let report = try_status(&url)?;
            session_of(&report, "linus").map(|_| report)
        },
    );
    assert_eq!(report["phase"], "idle", "{report}");
    assert!(
        report["server_version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{report}"
    );
    assert_eq!(
        session_of(&report, "linus").unwrap()["platform"],
        "linux-x86_64"
    );

    // Wine turns SIGINT into the console's Ctrl-C event.
    server.process.signal("INT");
    let exit = wine::exit_within(&mut server.process, Duration::from_secs(20));
    let log = server.process.log_text();
    assert!(
        exit.is_some_and(|status| status.success()),
        "the Windows server did not stop cleanly on Ctrl-C (exit: {exit:?}); log:\n{log}"
    );
    assert!(log.contains("stopping: closing every session"), "{log}");
    assert!(log.contains("stopped"), "{log}");
    eventually(
        Duration::from_secs(20),
        "the Linux agent told it was disconnected",
        || agent.log_text().contains("disconnected").then_some(()),
    );
    wine.wait_idle();
    assert!(
        wine.live_processes().is_empty(),
        "{:?}",
        wine.live_processes()
    );

    // A restarted machine: the server starts again on the same address from its folder,
    // and the agent comes back by itself.
    wine.reboot();
    let address = server.address;
    drop(server);
    let server = WindowsServer::start(&wine, &server_exe, &root, Some(address));
    assert!(
        !server
            .stdout_lines
            .iter()
            .any(|line| line.contains("generated admin password")),
        "{:?}",
        server.stdout_lines
    );
    // Its backoff grew while the server was down (full jitter, capped at 30 s).
    eventually(
        Duration::from_secs(45),
        "the Linux agent back on the restarted Windows server",
        || session_of(&try_status(&url)?, "linus"),
    );

    // Killing the Windows server's process (what a service manager's last resort does)
    // leaves nothing running.
    let mut server = server;
    server.process.signal("KILL");
    server.process.wait_exit(Duration::from_secs(10));
    assert_nothing_left(&wine);
    assert!(
        try_status(&url).is_none(),
        "nothing answers on {url} any more"
    );
}
