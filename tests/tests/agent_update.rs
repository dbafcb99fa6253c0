//! The agents' own update after a changeover, end to end: agent releases packed with the
//! release tools and installed with `changeover-agent install`, a server changing over
//! from 1.0.0 to 1.1.0 from a stock static feed, and agents that update themselves from
//! the server, or refuse to.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use changeover_protocol::release::current_platform;
use changeover_tests::feeds::{StaticServer, Vendor, server_tree};
use changeover_tests::{
    ADMIN_PASSWORD, Process, Server, admin, binary, eventually, make_site_certificates, status,
};
use serde_json::Value;

/// Server and agent releases 1.0.0 and 1.1.0 in one feed; agent 1.1.0 brings a file
/// 1.0.0 does not have, so a test can tell the two apart on disk.
struct Fixture {
    _dir: tempfile::TempDir,
    vendor: Vendor,
    /// A second vendor: an agent trusting only this key must refuse the first's releases.
    stranger: Vendor,
    feed: PathBuf,
}

const NEW_FILE: &str = "share/whats-new.txt";

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let vendor = Vendor::create(&dir.path().join("vendor"));
        let stranger = Vendor::create(&dir.path().join("stranger"));
        let feed = dir.path().join("feed");
        for version in ["1.0.0", "1.1.0"] {
            let tree = server_tree(&dir.path().join(format!("server-{version}")), &[]);
            vendor.pack("server", version, &tree, &feed);
            let agent_tree = dir.path().join(format!("agent-{version}"));
            std::fs::create_dir_all(agent_tree.join("bin")).unwrap();
            std::fs::copy(
                binary("changeover-agent"),
                agent_tree.join("bin/changeover-agent"),
            )
            .unwrap();
            if version == "1.1.0" {
                std::fs::create_dir_all(agent_tree.join("share")).unwrap();
                std::fs::write(agent_tree.join(NEW_FILE), "agent 1.1.0\n").unwrap();
            }
            vendor.pack("agent", version, &agent_tree, &feed);
        }
        Fixture {
            _dir: dir,
            vendor,
            stranger,
            feed,
        }
    })
}

fn archive(kind: &str, version: &str) -> PathBuf {
    fixture()
        .feed
        .join(format!("{kind}-{version}-{}.tar.gz", current_platform()))
}

/// `PROGRAM install` of `package` into `target` (`--root` for the server, `--dir` for the
/// agent), with the vendor's key.
fn install(program: &str, target: &Path, package: &Path) -> std::process::Output {
    let flag = if program == "changeover-server" {
        "--root"
    } else {
        "--dir"
    };
    Command::new(binary(program))
        .args(["install", flag])
        .arg(target)
        .arg("--package")
        .arg(package)
        .arg("--public-key")
        .arg(&fixture().vendor.public_key)
        .output()
        .unwrap()
}

/// Server 1.0.0 installed, the feed served by Python's http.server.
struct Site {
    dir: tempfile::TempDir,
    root: PathBuf,
    _feed_server: StaticServer,
    config: String,
}

impl Site {
    fn new() -> Site {
        Site::with_server("1.0.0")
    }

    /// A site with server `version` installed.
    fn with_server(version: &str) -> Site {
        let fixture = fixture();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("office");
        let output = install("changeover-server", &root, &archive("server", version));
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let feed_server = StaticServer::python(&fixture.feed, dir.path());
        let config = format!(
            "[server]\nheartbeat_secs = 1\n[feed]\nurl = \"{}\"\n[changeover]\nhealth_timeout_secs = 20\n",
            feed_server.url()
        );
        Site {
            dir,
            root,
            _feed_server: feed_server,
            config,
        }
    }

    /// `changeover-agent install` of agent 1.0.0 into a workstation folder of its own.
    fn install_agent(&self, user: &str) -> PathBuf {
        let dir = self.dir.path().join(user).join("agent");
        let output = install("changeover-agent", &dir, &archive("agent", "1.0.0"));
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(agent_version(&dir), "1.0.0");
        dir
    }

    /// Runs the installed agent in `dir`.
    fn run_agent(&self, server: &Server, user: &str, dir: &Path, extra: &[&str]) -> Process {
        self.run_agent_at(&server.url(), user, dir, extra)
    }

    fn run_agent_at(&self, url: &str, user: &str, dir: &Path, extra: &[&str]) -> Process {
        let state = self.dir.path().join(user).join("state");
        std::fs::create_dir_all(&state).unwrap();
        let log = state.join("agent.log");
        let child = Command::new(dir.join("bin/changeover-agent"))
            .args(["run", "--server", url, "--user", user, "--state-dir"])
            .arg(&state)
            .args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Process::from_child(child, log)
    }
}

/// What `DIR/bin/changeover-agent --version` says.
fn agent_version(dir: &Path) -> String {
    let output = Command::new(dir.join("bin/changeover-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .last()
        .unwrap()
        .to_owned()
}

fn session<'a>(report: &'a Value, user: &str) -> Option<&'a Value> {
    report["sessions"]
        .as_array()?
        .iter()
        .find(|session| session["user"] == user)
}

/// Changes the server over to 1.1.0 with no grace period; returns when it is committed.
fn change_over(server: &Server) {
    let output = Command::new(binary("changeover-agent"))
        .args([
            "admin",
            "update",
            "--server",
            &server.url(),
            "--grace",
            "0",
            "--json",
        ])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn older_agents_update_themselves_after_the_changeover() {
    let site = Site::new();
    let server = Server::start_installed(&site.root, &site.config);
    let anna = site.install_agent("anna");
    let ben = site.install_agent("ben");
    let cleo = site.install_agent("cleo");
    let dora = site.install_agent("dora");
    let hook_log = site.dir.path().join("ask.log");
    let ask_yes = format!(
        "echo \"$CHANGEOVER_EVENT $CHANGEOVER_TARGET_VERSION\" >> {}",
        hook_log.display()
    );
    let mut agents = [
        site.run_agent(&server, "anna", &anna, &[]),
        site.run_agent(&server, "ben", &ben, &[]),
        site.run_agent(
            &server,
            "cleo",
            &cleo,
            &["--client-update", "ask", "--ask-hook", &ask_yes],
        ),
        site.run_agent(&server, "dora", &dora, &["--client-update", "never"]),
    ];
    let pids: Vec<u32> = agents.iter().map(Process::pid).collect();
    eventually(Duration::from_secs(20), "four agents on 1.0.0", || {
        let report = status(&server.url());
        (report["sessions"].as_array().map_or(0, Vec::len) == 4).then_some(())
    });
    // Nothing to offer yet: the server has no agent release of its own version.
    let report = status(&server.url());
    assert_eq!(report["agent_release"], Value::Null, "{report:#}");

    change_over(&server);

    let report = eventually(
        Duration::from_secs(60),
        "three agents updated to 1.1.0, one declined",
        || {
            let report = status(&server.url());
            let on = |user: &str, version: &str| {
                session(&report, user).is_some_and(|s| s["agent_version"] == version)
            };
            let declined =
                session(&report, "dora").is_some_and(|s| s["update"]["state"] == "declined");
            (report["server_version"] == "1.1.0"
                && on("anna", "1.1.0")
                && on("ben", "1.1.0")
                && on("cleo", "1.1.0")
                && on("dora", "1.0.0")
                && declined)
                .then_some(report)
        },
    );
    assert_eq!(report["agent_release"], "1.1.0", "{report:#}");
    assert_eq!(report["agents_behind"], 1, "{report:#}");

    for dir in [&anna, &ben, &cleo] {
        assert_eq!(agent_version(dir), "1.1.0");
        assert_eq!(
            std::fs::read_to_string(dir.join(NEW_FILE)).unwrap(),
            "agent 1.1.0\n"
        );
        let info: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("release.json")).unwrap())
                .unwrap();
        assert_eq!(info["version"], "1.1.0");
        assert!(!dir.join(".update-staging").exists());
        // Welcomed by the server: the trial is over and the previous release not kept.
        eventually(Duration::from_secs(10), "the trial confirmed", || {
            (!dir.join(".trial.json").exists() && !dir.join(".previous").exists()).then_some(())
        });
    }
    assert_eq!(agent_version(&dora), "1.0.0");
    assert!(!dora.join(NEW_FILE).exists());
    assert_eq!(
        std::fs::read_to_string(&hook_log).unwrap().trim(),
        "ask 1.1.0"
    );
    // Restarted in place: the same processes, now running the new release.
    for (agent, pid) in agents.iter_mut().zip(pids) {
        assert_eq!(agent.pid(), pid);
        assert!(agent.try_status().is_none(), "{}", agent.log_text());
    }
    assert!(
        agents[0]
            .log_text()
            .contains("restarting into the updated agent")
    );
    // The text table says the same.
    let table = admin(&["status", "--server", &server.url()], ADMIN_PASSWORD);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("agent release      1.1.0 offered to older agents; 1 behind"),
        "{table}"
    );
    assert!(table.contains("declined 1.1.0"), "{table}");
}

#[test]
fn an_agent_refuses_an_update_its_own_key_does_not_vouch_for() {
    let site = Site::new();
    let server = Server::start_installed(&site.root, &site.config);
    let dir = site.install_agent("erik");
    // This agent trusts another vendor: to it, the server pushes an unsigned binary.
    let stranger_key = fixture().stranger.public_key.display().to_string();
    let mut agent = site.run_agent(&server, "erik", &dir, &["--public-key", &stranger_key]);
    eventually(Duration::from_secs(20), "the agent connected", || {
        session(&status(&server.url()), "erik").map(drop)
    });

    change_over(&server);

    let report = eventually(
        Duration::from_secs(60),
        "the update reported failed",
        || {
            let report = status(&server.url());
            session(&report, "erik")
                .is_some_and(|s| s["update"]["state"] == "failed")
                .then_some(report)
        },
    );
    let erik = session(&report, "erik").unwrap();
    assert_eq!(erik["agent_version"], "1.0.0");
    let detail = erik["update"]["detail"].as_str().unwrap();
    assert!(detail.contains("key"), "{detail}");
    assert_eq!(agent_version(&dir), "1.0.0");
    assert!(!dir.join(NEW_FILE).exists());
    assert!(agent.try_status().is_none(), "{}", agent.log_text());
    assert!(
        agent.log_text().contains("the running agent stays"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn agent_install_refuses_a_tampered_package_and_leaves_nothing() {
    let site = Site::new();
    let copy = site.dir.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    let original = archive("agent", "1.0.0");
    let tampered = copy.join(original.file_name().unwrap());
    let mut bytes = std::fs::read(&original).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&tampered, bytes).unwrap();
    let mut signature = original.as_os_str().to_owned();
    signature.push(".minisig");
    let mut copied_signature = tampered.as_os_str().to_owned();
    copied_signature.push(".minisig");
    std::fs::copy(PathBuf::from(signature), PathBuf::from(copied_signature)).unwrap();

    let dir = site.dir.path().join("agent");
    let output = install("changeover-agent", &dir, &tampered);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refusing to install"), "{stderr}");
    assert!(!dir.exists());
    let leftovers: Vec<_> = std::fs::read_dir(site.dir.path())
        .unwrap()
        .flatten()
        .filter(|item| item.file_name().to_string_lossy().contains("installing"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn over_wss_the_update_comes_over_https_and_is_offered_from_the_downloads_at_start() {
    // A server that is 1.1.0 already, with agent 1.1.0 verified in its downloads folder
    // (as a changeover leaves it): it offers the agent release from its first second.
    let site = Site::with_server("1.1.0");
    let downloads = site.root.join("state/downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let agent_archive = archive("agent", "1.1.0");
    let name = agent_archive
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    std::fs::copy(&agent_archive, downloads.join(&name)).unwrap();
    std::fs::copy(
        fixture().feed.join(format!("{name}.minisig")),
        downloads.join(format!("{name}.minisig")),
    )
    .unwrap();
    let ca_file =
        make_site_certificates(&site.root.join("server/certs"), &site.dir.path().join("ca"));
    let config = format!(
        "{}[tls]\ncert = \"certs/server.crt\"\nkey = \"certs/server.key\"\n",
        site.config
    );
    let server = Server::start_installed(&site.root, &config);
    let url = format!("wss://localhost:{}", server.address.port());
    let ca = ca_file.to_str().unwrap();
    let dir = site.install_agent("frida");
    let agent = site.run_agent_at(&url, "frida", &dir, &["--ca-file", ca]);

    let report = eventually(Duration::from_secs(60), "frida on 1.1.0", || {
        let output = admin(
            &["status", "--server", &url, "--json", "--ca-file", ca],
            ADMIN_PASSWORD,
        );
        let report: Value = serde_json::from_slice(&output.stdout).ok()?;
        session(&report, "frida")
            .is_some_and(|s| s["agent_version"] == "1.1.0")
            .then_some(report)
    });
    assert_eq!(report["agent_release"], "1.1.0");
    assert_eq!(report["agents_behind"], 0);
    assert_eq!(agent_version(&dir), "1.1.0");
    assert!(dir.join(NEW_FILE).exists());
    assert!(
        agent.log_text().contains("agent update installed"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn each_installer_takes_only_its_own_kind_of_release() {
    let site = Site::new();
    let dir = site.dir.path().join("agent");
    let output = install("changeover-agent", &dir, &archive("server", "1.1.0"));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is a server release, and this installs agent releases")
            && stderr.contains("changeover-server install"),
        "{stderr}"
    );
    assert!(!dir.exists());

    let root = site.dir.path().join("other-office");
    let output = install("changeover-server", &root, &archive("agent", "1.1.0"));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("changeover-agent install"), "{stderr}");
    assert!(!root.join("server").exists());
}

/// Kills every process whose command line names `path` (agents the test did not start
/// itself: an agent put back by its watcher runs in the watcher's process).
fn kill_processes_naming(path: &Path) {
    let needle = path.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

#[test]
fn a_broken_but_signed_agent_release_is_put_back_by_every_agent_and_reported() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let feed = dir.path().join("feed");
    for version in ["1.0.0", "1.1.0"] {
        let tree = server_tree(&dir.path().join(format!("server-{version}")), &[]);
        fixture.vendor.pack("server", version, &tree, &feed);
    }
    let good = dir.path().join("agent-1.0.0");
    std::fs::create_dir_all(good.join("bin")).unwrap();
    std::fs::copy(
        binary("changeover-agent"),
        good.join("bin/changeover-agent"),
    )
    .unwrap();
    fixture.vendor.pack("agent", "1.0.0", &good, &feed);
    // Signed by the vendor, passes its self-check, and dies as soon as it runs for real.
    let broken = dir.path().join("agent-1.1.0");
    std::fs::create_dir_all(broken.join("bin")).unwrap();
    std::fs::write(
        broken.join("bin/changeover-agent"),
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'changeover-agent 1.1.0'; exit 0; fi\n\
         echo 'cannot load the configuration' >&2\nexit 3\n",
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            broken.join("bin/changeover-agent"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }
    fixture.vendor.pack("agent", "1.1.0", &broken, &feed);

    let root = dir.path().join("office");
    let output = install(
        "changeover-server",
        &root,
        &feed.join(format!("server-1.0.0-{}.tar.gz", current_platform())),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let feed_server = StaticServer::python(&feed, dir.path());
    let config = format!(
        "[server]\nheartbeat_secs = 1\n[feed]\nurl = \"{}\"\n[changeover]\nhealth_timeout_secs = 20\n",
        feed_server.url()
    );
    let server = Server::start_installed(&root, &config);
    let users = ["emil", "fritz"];
    let mut agents = Vec::new();
    let mut dirs = Vec::new();
    for user in users {
        let agent_dir = dir.path().join(user).join("agent");
        let output = install(
            "changeover-agent",
            &agent_dir,
            &feed.join(format!("agent-1.0.0-{}.tar.gz", current_platform())),
        );
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let state = dir.path().join(user).join("state");
        std::fs::create_dir_all(&state).unwrap();
        let log = state.join("agent.log");
        let child = Command::new(agent_dir.join("bin/changeover-agent"))
            .args([
                "run",
                "--server",
                &server.url(),
                "--user",
                user,
                "--state-dir",
            ])
            .arg(&state)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        agents.push(Process::from_child(child, log));
        dirs.push(agent_dir);
    }
    eventually(Duration::from_secs(20), "two agents on 1.0.0", || {
        let report = status(&server.url());
        (report["sessions"].as_array().map_or(0, Vec::len) == 2).then_some(())
    });

    change_over(&server);

    let report = eventually(
        Duration::from_secs(60),
        "both agents back on 1.0.0, their update reported failed",
        || {
            let report = status(&server.url());
            users
                .iter()
                .all(|user| {
                    session(&report, user).is_some_and(|s| {
                        s["agent_version"] == "1.0.0" && s["update"]["state"] == "failed"
                    })
                })
                .then_some(report)
        },
    );
    let detail = session(&report, "emil").unwrap()["update"].to_string();
    assert!(detail.contains("put back"), "{detail}");
    for agent_dir in &dirs {
        assert_eq!(agent_version(agent_dir), "1.0.0");
        assert!(!agent_dir.join(".trial.json").exists());
        assert!(!agent_dir.join(".previous").exists());
    }
    // The broken release is not tried again in a loop: they stay connected on 1.0.0.
    std::thread::sleep(Duration::from_secs(3));
    let report = status(&server.url());
    for user in users {
        assert_eq!(session(&report, user).unwrap()["agent_version"], "1.0.0");
    }
    for agent in &mut agents {
        agent.signal("TERM");
    }
    kill_processes_naming(dir.path());
}
