//! The Windows build under Wine, mixed with the Linux build: a Windows agent on a Linux
//! server, and a Windows server serving a Linux agent. Each test boots a Wine prefix of
//! its own (some seconds) and leaves no Windows process behind.
//!
//! Wine runs on Linux files, so these tests show the Windows build works as a program
//! (sockets, files on `Z:`, the console, Ctrl-C); they cannot show Windows' own file
//! locking rules.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use changeover_tests::feeds::{StaticServer, Vendor};
use changeover_tests::wine::{
    self, Exe, WindowsServer, Wine, install_exe, windows_binaries, windows_path,
};
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

/// Windows releases 1.0.0 and 1.1.0 of the server and the agent in one feed, packed once
/// with the release tools; each tree carries the shim DLL beside its `.exe`, as a Windows
/// release carries the DLLs it needs. Agent 1.1.0 brings a file 1.0.0 lacks.
struct WindowsFeed {
    _dir: tempfile::TempDir,
    vendor: Vendor,
    feed: PathBuf,
}

const PLATFORM: &str = "windows-x86_64";
const NEW_AGENT_FILE: &str = "share/whats-new.txt";

fn windows_feed() -> &'static WindowsFeed {
    static FEED: OnceLock<WindowsFeed> = OnceLock::new();
    FEED.get_or_init(|| {
        let build = windows_binaries();
        let dir = tempfile::tempdir().unwrap();
        let vendor = Vendor::create(&dir.path().join("vendor"));
        let feed = dir.path().join("feed");
        for version in ["1.0.0", "1.1.0"] {
            let server = dir.path().join(format!("server-{version}"));
            install_exe(build, Exe::Server, &server.join("bin"));
            let defaults = format!("shipped_with = \"{version}\"\n");
            std::fs::create_dir_all(server.join("config")).unwrap();
            std::fs::write(server.join("config/release-defaults.toml"), defaults).unwrap();
            vendor.pack_for("server", version, &server, &feed, PLATFORM);

            let agent = dir.path().join(format!("agent-{version}"));
            install_exe(build, Exe::Agent, &agent.join("bin"));
            if version == "1.1.0" {
                std::fs::create_dir_all(agent.join("share")).unwrap();
                std::fs::write(agent.join(NEW_AGENT_FILE), "agent 1.1.0\n").unwrap();
            }
            vendor.pack_for("agent", version, &agent, &feed, PLATFORM);
        }
        WindowsFeed {
            _dir: dir,
            vendor,
            feed,
        }
    })
}

fn windows_archive(kind: &str, version: &str) -> PathBuf {
    windows_feed()
        .feed
        .join(format!("{kind}-{version}-{PLATFORM}.tar.gz"))
}

/// The `version` in an install's `release.json`.
fn release_version(install: &Path) -> String {
    let text = std::fs::read_to_string(install.join("release.json")).unwrap();
    let info: serde_json::Value = serde_json::from_str(&text).unwrap();
    info["version"].as_str().unwrap().to_owned()
}

/// Runs a Windows program's `install` (`--root` for the server, `--dir` for the agent) of
/// `package` with the vendor's key, from a copy of the build outside the target folder.
fn windows_install(wine: &Wine, which: Exe, target: &Path, package: &Path) {
    let tools = wine.scratch().join(match which {
        Exe::Server => "tools/server",
        Exe::Agent => "tools/agent",
    });
    let exe = install_exe(windows_binaries(), which, &tools);
    let flag = match which {
        Exe::Server => "--root",
        Exe::Agent => "--dir",
    };
    let output = wine::run(
        wine,
        &exe,
        &[
            "install".to_owned(),
            flag.to_owned(),
            windows_path(target),
            "--package".to_owned(),
            windows_path(package),
            "--public-key".to_owned(),
            windows_path(&windows_feed().vendor.public_key),
        ],
    );
    assert!(
        output.status.success(),
        "install of {}: {}{}",
        package.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_windows_server_changes_over_through_the_swap_helper_and_windows_agents_update_themselves() {
    let wine = Wine::new();
    let feed = windows_feed();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("office");
    windows_install(
        &wine,
        Exe::Server,
        &root,
        &windows_archive("server", "1.0.0"),
    );
    assert_eq!(release_version(&root.join("server")), "1.0.0");

    // What the site must never lose, in the install the swap renames.
    let carried: Vec<(&str, Vec<u8>)> = vec![
        (
            "config/site-preferences.toml",
            b"company = \"Muster GmbH\"\n".to_vec(),
        ),
        (
            "backups/2026-11-27.bak",
            (0..(1024 * 1024u32))
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
                .collect(),
        ),
        (
            "certs/server.pem",
            b"-----BEGIN CERTIFICATE-----\n".to_vec(),
        ),
    ];
    for (path, contents) in &carried {
        let file = root.join("server").join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, contents).unwrap();
    }
    let feed_server = StaticServer::python(&feed.feed, dir.path());
    std::fs::write(
        root.join("server/config/changeover.toml"),
        format!(
            "[server]\nheartbeat_secs = 1\n[feed]\nurl = \"{}\"\n[changeover]\nhealth_timeout_secs = 60\n",
            feed_server.url()
        ),
    )
    .unwrap();

    let mut server = WindowsServer::start(
        &wine,
        &root.join("server/bin/changeover-server.exe"),
        &root,
        None,
    );
    let url = server.url();

    // Two Windows workstations with agent 1.0.0 installed, hooks through cmd, and a Linux
    // one with the built agent.
    let mut hook_logs = Vec::new();
    let mut agent_dirs = Vec::new();
    let mut agents = Vec::new();
    for user in ["wanda", "walter"] {
        let agent_dir = dir.path().join(user).join("agent");
        windows_install(
            &wine,
            Exe::Agent,
            &agent_dir,
            &windows_archive("agent", "1.0.0"),
        );
        let hook_log = dir.path().join(format!("{user}-hooks.log"));
        let log = windows_path(&hook_log);
        let warn = format!(
            "echo warning %CHANGEOVER_SECONDS_LEFT% !CHANGEOVER_TARGET_VERSION!>> \"{log}\""
        );
        let logout = format!("echo logout %CHANGEOVER_TARGET_VERSION%>> {log}");
        agents.push(wine::start_agent(
            &wine,
            &agent_dir.join("bin/changeover-agent.exe"),
            &url,
            user,
            &dir.path().join(user).join("state"),
            &["--warn-hook", &warn, "--logout-hook", &logout],
        ));
        hook_logs.push(hook_log);
        agent_dirs.push(agent_dir);
    }
    let linux_hooks = dir.path().join("linus-hooks.log");
    let linux_warn = format!(
        "echo \"warning $CHANGEOVER_TARGET_VERSION\" >> {}",
        linux_hooks.display()
    );
    let linus = start_agent(
        &url,
        "linus",
        &dir.path().join("linus"),
        &["--warn-hook", &linux_warn],
    );
    eventually(Duration::from_secs(60), "three agents on 1.0.0", || {
        for agent in &mut agents {
            assert!(agent.try_status().is_none(), "{}", agent.log_text());
        }
        let report = try_status(&url)?;
        (report["sessions"].as_array()?.len() == 3).then_some(())
    });

    let mut update = std::process::Command::new(changeover_tests::binary("changeover-agent"));
    update
        .args([
            "admin", "update", "--server", &url, "--grace", "3", "--json",
        ])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD);
    let output = wine::output_within(update, Duration::from_secs(240))
        .expect("admin update ends once the changeover has");
    let events = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{events}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(events.contains("\"counting_down\""), "{events}");

    // The old server handed the swap to the helper and ended.
    let exit = wine::exit_within(&mut server.process, Duration::from_secs(60));
    assert!(
        exit.is_some_and(|status| status.success()),
        "the old server did not end after handing over ({exit:?}): {}",
        server.process.log_text()
    );
    let state_log = || std::fs::read_to_string(root.join("state/server.log")).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let report = loop {
        let report = try_status(&url);
        if let Some(report) = &report {
            let on = |user: &str, version: &str| {
                session_of(report, user).is_some_and(|s| s["agent_version"] == version)
            };
            if report["server_version"] == "1.1.0"
                && report["last_changeover"]["outcome"] == "committed"
                && on("wanda", "1.1.0")
                && on("walter", "1.1.0")
                && session_of(report, "linus").is_some()
            {
                break report.clone();
            }
        }
        if std::time::Instant::now() >= deadline {
            let agent_logs: Vec<String> = ["wanda", "walter"]
                .iter()
                .map(|user| {
                    std::fs::read_to_string(dir.path().join(user).join("state/agent.log"))
                        .unwrap_or_default()
                })
                .collect();
            panic!(
                "the server on 1.1.0 and the Windows agents updated: not within 180 s\n\
                 status: {report:#?}\nagents:\n{}\nserver log:\n{}",
                agent_logs.join("\n---\n"),
                state_log()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    // Only the Linux agent: this feed has no Linux agent release to offer it.
    assert_eq!(report["agents_behind"], 1, "{report:#}");
    let log = state_log();
    assert!(
        log.contains("swap helper waiting for the old server to end"),
        "the Windows path ran: {log}"
    );
    assert_eq!(release_version(&root.join("server")), "1.1.0");
    for (path, contents) in &carried {
        let now = std::fs::read(root.join("server").join(path))
            .unwrap_or_else(|err| panic!("{path} is gone: {err}\n{log}"));
        assert!(now == *contents, "{path} changed");
    }
    assert!(
        root.join("server/config.release-default/release-defaults.toml")
            .exists()
    );
    eventually(
        Duration::from_secs(60),
        "server_old deleted after the commit",
        || (!root.join("server_old").exists()).then_some(()),
    );

    for (agent_dir, hook_log) in agent_dirs.iter().zip(&hook_logs) {
        assert_eq!(release_version(agent_dir), "1.1.0");
        assert!(agent_dir.join(NEW_AGENT_FILE).is_file());
        let hooks = std::fs::read_to_string(hook_log).unwrap_or_default();
        let lines: Vec<&str> = hooks.lines().map(str::trim).collect();
        assert_eq!(lines.first(), Some(&"warning 3 1.1.0"), "{hooks}");
        assert_eq!(lines.last(), Some(&"logout 1.1.0"), "{hooks}");
    }
    let hooks = std::fs::read_to_string(&linux_hooks).unwrap();
    assert!(hooks.contains("warning 1.1.0"), "{hooks}");
    drop(linus);
    drop(feed_server);
}

/// The `STATE` line of `sc query SERVICE` (`RUNNING`, `STOPPED`…).
fn service_state(wine: &Wine, service: &str) -> String {
    let output = wine.tool("sc", &["query", service]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.trim_start().starts_with("STATE"))
        .and_then(|line| line.split_whitespace().last())
        .unwrap_or("")
        .to_owned()
}

#[test]
fn the_windows_service_changes_over_stops_and_starts_again_through_the_service_manager() {
    let wine = Wine::new();
    let feed = windows_feed();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("office");
    windows_install(
        &wine,
        Exe::Server,
        &root,
        &windows_archive("server", "1.0.0"),
    );
    let preferences = b"company = \"Muster GmbH\"\n";
    std::fs::write(
        root.join("server/config/site-preferences.toml"),
        preferences,
    )
    .unwrap();
    let feed_server = StaticServer::python(&feed.feed, dir.path());
    let port = changeover_tests::feeds::free_port();
    std::fs::write(
        root.join("server/config/changeover.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nheartbeat_secs = 1\n[feed]\nurl = \"{}\"\n\
             [changeover]\nhealth_timeout_secs = 60\n",
            feed_server.url()
        ),
    )
    .unwrap();
    let exe = root.join("server/bin/changeover-server.exe");

    // README's way: once from a console with the admin password, then as a service.
    let mut first = WindowsServer::start(&wine, &exe, &root, None);
    first.process.signal("INT");
    let exit = wine::exit_within(&mut first.process, Duration::from_secs(20));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");

    let _keeper = wine.keep_services_running();
    let installed = wine::run(
        &wine,
        &exe,
        &[
            "service".to_owned(),
            "install".to_owned(),
            "--root".to_owned(),
            windows_path(&root),
        ],
    );
    assert!(
        installed.status.success(),
        "{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    let service = "changeover-server";
    let started = wine.tool("sc", &["start", service]);
    assert!(started.status.success(), "{started:?}");
    let url = format!("ws://127.0.0.1:{port}");
    eventually(Duration::from_secs(60), "the service serving", || {
        try_status(&url)
    });
    assert_eq!(service_state(&wine, service), "RUNNING");
    let service_pid = |wine: &Wine| {
        wine.live_processes()
            .into_iter()
            .find(|(_, cmdline)| cmdline.contains("changeover-server.exe run"))
    };
    let (old_pid, cmdline) = service_pid(&wine).expect("the service's process");
    assert!(cmdline.contains("--as-service"), "{cmdline}");

    let agent = start_agent(&url, "linus", &dir.path().join("linus"), &[]);
    eventually(Duration::from_secs(30), "the agent connected", || {
        session_of(&try_status(&url)?, "linus")
    });

    let mut update = std::process::Command::new(changeover_tests::binary("changeover-agent"));
    update
        .args([
            "admin", "update", "--server", &url, "--grace", "2", "--json",
        ])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD);
    let output = wine::output_within(update, Duration::from_secs(240))
        .expect("admin update ends once the changeover has");
    let events = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{events}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let state_log = || std::fs::read_to_string(root.join("state/server.log")).unwrap_or_default();
    let report = eventually(
        Duration::from_secs(120),
        "the service back on 1.1.0 with its agent",
        || {
            let report = try_status(&url)?;
            (report["server_version"] == "1.1.0"
                && report["last_changeover"]["outcome"] == "committed"
                && session_of(&report, "linus").is_some())
            .then_some(report)
        },
    );
    assert!(report["changeover"].is_null(), "{report:#}");
    let log = state_log();
    assert!(
        log.contains("swap helper waiting for the old server to end"),
        "{log}"
    );
    // The service manager started the new release: a new process, as the service.
    assert_eq!(service_state(&wine, service), "RUNNING", "{log}");
    let (new_pid, cmdline) = service_pid(&wine).expect("the service's process");
    assert_ne!(new_pid, old_pid);
    assert!(cmdline.contains("--as-service"), "{cmdline}");
    assert_eq!(release_version(&root.join("server")), "1.1.0");
    assert_eq!(
        std::fs::read(root.join("server/config/site-preferences.toml")).unwrap(),
        preferences
    );

    // Stopped by the service manager: sessions closed with a reason, exit code 0.
    let stopped = wine.tool("sc", &["stop", service]);
    assert!(stopped.status.success(), "{stopped:?}");
    eventually(Duration::from_secs(30), "the service stopped", || {
        (service_state(&wine, service) == "STOPPED").then_some(())
    });
    assert!(state_log().contains("stopping: closing every session"));
    eventually(Duration::from_secs(20), "the agent told", || {
        agent.log_text().contains("disconnected").then_some(())
    });
    let removed = wine::run(
        &wine,
        &exe,
        &[
            "service".to_owned(),
            "uninstall".to_owned(),
            "--root".to_owned(),
            windows_path(&root),
        ],
    );
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    drop(feed_server);
}

#[test]
fn a_file_another_program_holds_open_in_the_install_is_named_before_anyone_is_warned() {
    let wine = Wine::new();
    let feed = windows_feed();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("office");
    windows_install(
        &wine,
        Exe::Server,
        &root,
        &windows_archive("server", "1.0.0"),
    );
    let manual = root.join("server/docs/manual.txt");
    std::fs::create_dir_all(manual.parent().unwrap()).unwrap();
    std::fs::write(&manual, "the manual\n").unwrap();
    let feed_server = StaticServer::python(&feed.feed, dir.path());
    std::fs::write(
        root.join("server/config/changeover.toml"),
        format!(
            "[server]\nheartbeat_secs = 1\n[feed]\nurl = \"{}\"\n[changeover]\nhealth_timeout_secs = 60\n",
            feed_server.url()
        ),
    )
    .unwrap();
    let server = WindowsServer::start(
        &wine,
        &root.join("server/bin/changeover-server.exe"),
        &root,
        None,
    );
    let url = server.url();
    let hook_log = dir.path().join("hooks.log");
    let warn = format!("echo warned >> {}", hook_log.display());
    let _agent = start_agent(
        &url,
        "linus",
        &dir.path().join("linus"),
        &["--warn-hook", &warn],
    );
    eventually(Duration::from_secs(30), "the agent connected", || {
        session_of(&try_status(&url)?, "linus")
    });

    // A Windows program with the manual open (cmd appending to it, waiting for a key).
    let mut holder = wine.command(Path::new("cmd"));
    holder
        .args(["/C", &format!("pause >> {}", windows_path(&manual))])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut holder = holder.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));

    let update = || {
        let mut update = std::process::Command::new(changeover_tests::binary("changeover-agent"));
        update
            .args(["admin", "update", "--server", &url, "--grace", "2"])
            .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD);
        wine::output_within(update, Duration::from_secs(240)).expect("admin update ends")
    };
    let refused = update();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("another program holds files in the install open")
            && stderr.contains("manual.txt"),
        "{stderr}"
    );
    let report = status(&url);
    assert_eq!(report["server_version"], "1.0.0", "{report:#}");
    assert_eq!(report["phase"], "idle", "{report:#}");
    assert!(session_of(&report, "linus").is_some(), "{report:#}");
    assert!(
        !hook_log.exists(),
        "nobody is warned for an update that cannot work"
    );

    // Closed, the update goes through.
    drop(holder.stdin.take());
    let _ = holder.kill();
    let _ = holder.wait();
    let done = update();
    assert!(
        done.status.success(),
        "{}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    eventually(Duration::from_secs(120), "the server on 1.1.0", || {
        (try_status(&url)?["server_version"] == "1.1.0").then_some(())
    });
    assert!(
        std::fs::read_to_string(&hook_log)
            .unwrap()
            .contains("warned")
    );
    drop(feed_server);
}

#[test]
fn a_new_windows_release_that_fails_its_health_check_is_rolled_back_by_the_swap_helper() {
    let wine = Wine::new();
    let feed = windows_feed();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("office");
    windows_install(
        &wine,
        Exe::Server,
        &root,
        &windows_archive("server", "1.0.0"),
    );
    let preferences = b"company = \"Muster GmbH\"\n";
    std::fs::write(
        root.join("server/config/site-preferences.toml"),
        preferences,
    )
    .unwrap();
    let feed_server = StaticServer::python(&feed.feed, dir.path());
    std::fs::write(
        root.join("server/config/changeover.toml"),
        format!(
            "[server]\nheartbeat_secs = 1\n[feed]\nurl = \"{}\"\n[changeover]\nhealth_timeout_secs = 60\n",
            feed_server.url()
        ),
    )
    .unwrap();
    // The switch reaches the new release through the helper; only its health check
    // consults it.
    let server = WindowsServer::start_with_env(
        &wine,
        &root.join("server/bin/changeover-server.exe"),
        &root,
        None,
        &[("CHANGEOVER_FAULT_AT", "unhealthy")],
    );
    let url = server.url();
    let mut update = std::process::Command::new(changeover_tests::binary("changeover-agent"));
    update
        .args(["admin", "update", "--server", &url, "--grace", "0"])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD);
    let output = wine::output_within(update, Duration::from_secs(240))
        .expect("admin update ends once the changeover has");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let state_log = || std::fs::read_to_string(root.join("state/server.log")).unwrap_or_default();
    let report = eventually(Duration::from_secs(120), "the old release serving", || {
        let report = try_status(&url)?;
        (report["server_version"] == "1.0.0"
            && report["last_changeover"]["outcome"] == "rolled_back")
            .then_some(report)
    });
    let reason = report["last_changeover"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("health check"), "{report:#}");
    let log = state_log();
    // The new release did not rename the folder it ran from: the helper did, after it ended.
    assert!(
        log.contains("the swap helper that started this release rolls it back"),
        "{log}"
    );
    assert_eq!(release_version(&root.join("server")), "1.0.0");
    assert_eq!(
        std::fs::read(root.join("server/config/site-preferences.toml")).unwrap(),
        preferences
    );
    assert!(!root.join("server_old").exists());
    drop(feed_server);
}
