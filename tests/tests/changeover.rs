//! The changeover end to end: real server releases packed with the release tools, served by
//! a stock static server, agents with hooks, and the server killed at every step.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use changeover_protocol::release::current_platform;
use changeover_tests::feeds::{StaticServer, Vendor, server_tree, stub_server_tree};
use changeover_tests::{ADMIN_PASSWORD, Process, Server, binary, eventually, start_agent, status};
use serde_json::Value;

/// A vendor and a feed with two real server releases, 1.0.0 and 1.1.0, packed once for
/// every test in this file.
struct Fixture {
    _dir: tempfile::TempDir,
    vendor: Vendor,
    feed: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let vendor = Vendor::create(&dir.path().join("vendor"));
        let feed = dir.path().join("feed");
        for version in ["1.0.0", "1.1.0"] {
            let defaults = format!("shipped_with = \"{version}\"\n");
            let tree = server_tree(
                &dir.path().join(format!("tree-{version}")),
                &[("config/release-defaults.toml", defaults.as_bytes())],
            );
            vendor.pack("server", version, &tree, &feed);
        }
        Fixture {
            _dir: dir,
            vendor,
            feed,
        }
    })
}

fn archive_name(version: &str) -> String {
    format!("server-{version}-{}.tar.gz", current_platform())
}

/// A product folder with 1.0.0 installed, site files to carry, and a feed server.
struct Site {
    /// A filesystem of its own for the product folder; unmounted before `dir` goes.
    _mount: Option<Mount>,
    dir: tempfile::TempDir,
    root: PathBuf,
    feed_server: StaticServer,
    carried: Vec<(String, Vec<u8>)>,
}

impl Site {
    fn new() -> Site {
        Site::with_feed(&fixture().feed)
    }

    fn with_feed(feed: &Path) -> Site {
        Site::build(feed, None)
    }

    /// A site whose product folder is a tmpfs of `size` (such as `"512m"`): a small disk.
    fn on_a_small_disk(size: &str) -> Site {
        Site::build(&fixture().feed, Some(size))
    }

    fn build(feed: &Path, disk_size: Option<&str>) -> Site {
        let fixture = fixture();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("office");
        let mount = disk_size.map(|size| {
            std::fs::create_dir_all(&root).unwrap();
            Mount::tmpfs_of(&root, size)
        });
        let output = Command::new(binary("changeover-server"))
            .args(["install", "--root"])
            .arg(&root)
            .arg("--package")
            .arg(fixture.feed.join(archive_name("1.0.0")))
            .arg("--public-key")
            .arg(&fixture.vendor.public_key)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // What the site must never lose: preferences, backups, certificates.
        let mut big = Vec::with_capacity(2 * 1024 * 1024);
        for i in 0..(2 * 1024 * 1024u32) {
            big.push((i.wrapping_mul(2_654_435_761) >> 24) as u8);
        }
        let carried = vec![
            (
                "config/site-preferences.toml".to_owned(),
                b"company = \"Muster GmbH\"\n".to_vec(),
            ),
            ("backups/2026-11-27.bak".to_owned(), big),
            (
                "certs/server.pem".to_owned(),
                b"-----BEGIN CERTIFICATE-----\nMIIB\n".to_vec(),
            ),
        ];
        for (path, contents) in &carried {
            let file = root.join("server").join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, contents).unwrap();
        }
        let feed_server = StaticServer::python(feed, dir.path());
        Site {
            _mount: mount,
            dir,
            root,
            feed_server,
            carried,
        }
    }

    fn config(&self) -> String {
        format!(
            "[server]\nheartbeat_secs = 1\n[feed]\nurl = \"{}\"\n[changeover]\nhealth_timeout_secs = 20\n",
            self.feed_server.url()
        )
    }

    fn start(&self, env: &[(&str, &str)]) -> Server {
        Server::start_installed_with_env(&self.root, &self.config(), env)
    }

    fn installed_version(&self) -> String {
        let text = std::fs::read_to_string(self.root.join("server/release.json")).unwrap();
        let info: Value = serde_json::from_str(&text).unwrap();
        info["version"].as_str().unwrap().to_owned()
    }

    fn assert_carried_files_intact(&self) {
        for (path, contents) in &self.carried {
            let now = std::fs::read(self.root.join("server").join(path)).unwrap_or_else(|err| {
                let log =
                    std::fs::read_to_string(self.root.join("state/server.log")).unwrap_or_default();
                let tree = Command::new("find")
                    .arg(&self.root)
                    .arg("-maxdepth")
                    .arg("3")
                    .output()
                    .unwrap();
                let tree = String::from_utf8_lossy(&tree.stdout);
                panic!("{path} is gone: {err}\n{log}\n{tree}")
            });
            assert!(now == *contents, "{path} changed");
        }
    }

    fn agent(&self, server: &Server, user: &str) -> (Process, PathBuf) {
        let hook_log = self.dir.path().join(format!("{user}-hooks.log"));
        let log = hook_log.display();
        let warn = format!(
            "echo \"warning $CHANGEOVER_SECONDS_LEFT $CHANGEOVER_TARGET_VERSION\" >> {log}"
        );
        let logout = format!("echo \"logout $CHANGEOVER_TARGET_VERSION\" >> {log}");
        let agent = start_agent(
            &server.url(),
            user,
            &self.dir.path().join(user),
            &["--warn-hook", &warn, "--logout-hook", &logout],
        );
        (agent, hook_log)
    }
}

/// `admin update` in the background, its output collected when it ends.
fn update(server: &Server, args: &[&str]) -> Child {
    Command::new(binary("changeover-agent"))
        .args(["admin", "update", "--server", &server.url(), "--json"])
        .args(args)
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> (bool, Vec<Value>, String) {
    let output = child.wait_with_output().unwrap();
    let events = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    (
        output.status.success(),
        events,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn users(report: &Value) -> usize {
    report["sessions"].as_array().map_or(0, Vec::len)
}

#[test]
fn a_full_changeover_with_three_agents() {
    let site = Site::new();
    let server = site.start(&[]);
    let pid = server.process.pid();
    let agents: Vec<(Process, PathBuf)> = ["anna", "ben", "cleo"]
        .iter()
        .map(|user| site.agent(&server, user))
        .collect();
    eventually(Duration::from_secs(20), "three agents", || {
        (users(&status(&server.url())) == 3).then_some(())
    });

    let (ok, events, stderr) = finish(update(&server, &["--grace", "6"]));
    assert!(ok, "{stderr}\n{events:?}");
    let finished = events.last().unwrap();
    assert_eq!(finished["type"], "changeover_finished");
    assert_eq!(finished["outcome"], "committed");
    assert_eq!(finished["sessions_warned"], 3);
    let phases: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "changeover_progress")
        .filter_map(|e| e["phase"].as_str())
        .collect();
    // In this order; the last few may be cut off by the restart, which ends the admin's
    // connection before they are written.
    let expected = [
        "preparing",
        "counting_down",
        "logging_out",
        "stopping",
        "carrying_over",
        "swapping",
        "restarting",
    ];
    let positions: Vec<usize> = phases
        .iter()
        .map(|phase| {
            expected
                .iter()
                .position(|e| e == phase)
                .expect("a known phase")
        })
        .collect();
    assert!(
        positions.windows(2).all(|pair| pair[0] <= pair[1]),
        "{phases:?}"
    );
    assert!(
        phases.starts_with(&["preparing", "counting_down"]),
        "{phases:?}"
    );
    assert!(phases.contains(&"logging_out"), "{phases:?}");

    // The same process (a supervisor keeps tracking it) now runs the new release.
    assert_eq!(server.process.pid(), pid);
    let report = eventually(Duration::from_secs(30), "agents back on 1.1.0", || {
        let report = status(&server.url());
        (report["server_version"] == "1.1.0" && users(&report) == 3).then_some(report)
    });
    assert_eq!(report["last_changeover"]["outcome"], "committed");
    assert_eq!(site.installed_version(), "1.1.0");
    site.assert_carried_files_intact();
    assert!(
        !site.root.join("server_old").exists(),
        "the old release is deleted after the commit"
    );
    // The release's own defaults stay beside the site's carried config.
    assert!(
        site.root
            .join("server/config.release-default/release-defaults.toml")
            .exists()
    );

    for (agent, hook_log) in &agents {
        let hooks = std::fs::read_to_string(hook_log).unwrap();
        let lines: Vec<&str> = hooks.lines().collect();
        assert_eq!(lines.first(), Some(&"warning 6 1.1.0"), "{hooks}");
        assert!(
            lines.contains(&"warning 5 1.1.0"),
            "repeated near the deadline: {hooks}"
        );
        assert_eq!(lines.last(), Some(&"logout 1.1.0"), "{hooks}");
        assert!(agent.log_text().contains("logged out for the update"));
    }
}

/// A tmpfs mounted at a folder, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path) -> Mount {
        Mount::tmpfs_of(at, "16m")
    }

    fn tmpfs_of(at: &Path, size: &str) -> Mount {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount runs");
        assert!(status.success(), "cannot mount a tmpfs at {}", at.display());
        Mount(at.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_carried_folder_on_a_tmpfs_mount_is_refused_before_anyone_is_warned() {
    let site = Site::new();
    let backups = site.root.join("server/backups");
    let backup = std::fs::read(backups.join("2026-11-27.bak")).unwrap();
    let _mount = Mount::tmpfs(&backups);
    std::fs::write(backups.join("2026-11-27.bak"), &backup).unwrap();

    let doctor = Command::new(binary("changeover-server"))
        .args(["doctor", "--root"])
        .arg(&site.root)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(!doctor.status.success(), "{report}");
    assert!(
        report.contains("filesystems") && report.contains("\"backups\" is a mount point"),
        "{report}"
    );

    let server = site.start(&[]);
    let (_agent, hook_log) = site.agent(&server, "erik");
    eventually(Duration::from_secs(20), "erik", || {
        (users(&status(&server.url())) == 1).then_some(())
    });
    let (ok, _, stderr) = finish(update(&server, &["--grace", "2"]));
    assert!(!ok);
    assert!(stderr.contains("\"backups\" is a mount point"), "{stderr}");
    let report = status(&server.url());
    assert_eq!(report["last_changeover"]["phase"], "preparing", "{report}");
    assert_eq!(report["server_version"], "1.0.0");
    assert!(!hook_log.exists(), "nobody was warned");
    assert_eq!(users(&report), 1, "nobody was logged out");
    assert!(!site.root.join(".server.staging").exists());
    site.assert_carried_files_intact();
}

/// Writes `path` until the filesystem is full; its size.
fn fill_up(path: &Path) -> u64 {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5a_u8; 1024 * 1024];
    let mut written = 0;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(count) => written += count as u64,
            Err(err) => {
                assert_eq!(err.kind(), std::io::ErrorKind::StorageFull, "{err}");
                break;
            }
        }
    }
    // What is left below a whole chunk.
    while let Ok(count) = file.write(&chunk[..4096]) {
        if count == 0 {
            break;
        }
        written += count as u64;
    }
    written
}

#[test]
fn on_a_full_disk_the_server_starts_and_serves_and_only_a_changeover_waits() {
    let site = Site::on_a_small_disk("512m");
    let config = site
        .config()
        .replace("[changeover]\n", "[changeover]\nwatchdog = false\n");
    // A power cut while a changeover prepares leaves its journal behind.
    let mut server = Server::start_installed_with_env(
        &site.root,
        &config,
        &[("CHANGEOVER_FAULT_AT", "preparing")],
    );
    let (_agent, hook_log) = site.agent(&server, "frida");
    eventually(Duration::from_secs(20), "frida", || {
        (users(&status(&server.url())) == 1).then_some(())
    });
    let (ok, _, _) = finish(update(&server, &["--grace", "2"]));
    assert!(!ok);
    assert!(!server.process.wait_exit(Duration::from_secs(30)).success());
    assert!(site.root.join("state/changeover.json").exists());

    // Then the disk fills up.
    let filler = site.root.join("filler");
    assert!(fill_up(&filler) > 0);

    // The server starts anyway, serves its agent, and says what it cannot write.
    server.restart();
    let report = eventually(Duration::from_secs(30), "frida back", || {
        let report = status(&server.url());
        (users(&report) == 1).then_some(report)
    });
    let problems = report["disk_problems"].to_string();
    assert!(
        problems.contains("cannot record how changeover") && problems.contains("No space left"),
        "{report}"
    );
    let doctor = Command::new(binary("changeover-server"))
        .args(["doctor", "--root"])
        .arg(&site.root)
        .output()
        .unwrap();
    let doctor_report = String::from_utf8_lossy(&doctor.stdout);
    assert!(!doctor.status.success(), "{doctor_report}");
    assert!(doctor_report.contains("disk space"), "{doctor_report}");
    assert!(doctor_report.contains("cannot write"), "{doctor_report}");

    // A changeover waits until there is room, and nobody hears of it.
    let (ok, _, stderr) = finish(update(&server, &["--grace", "2"]));
    assert!(!ok);
    assert!(stderr.contains("the disk is full"), "{stderr}");
    assert!(!hook_log.exists(), "nobody was warned");

    // With room again the record is written, nothing written before is lost, and a
    // changeover goes through.
    std::fs::remove_file(&filler).unwrap();
    let report = eventually(Duration::from_secs(20), "the record written", || {
        let report = status(&server.url());
        (report["disk_problems"].is_null() && report["last_changeover"].is_object())
            .then_some(report)
    });
    assert_eq!(report["last_changeover"]["outcome"], "failed", "{report}");
    assert!(!site.root.join("state/changeover.json").exists());
    site.assert_carried_files_intact();

    let (ok, events, stderr) = finish(update(&server, &["--grace", "2"]));
    assert!(ok, "{stderr}\n{events:?}");
    let report = eventually(Duration::from_secs(30), "1.1.0 with frida", || {
        let report = status(&server.url());
        (report["server_version"] == "1.1.0" && users(&report) == 1).then_some(report)
    });
    let history: Vec<&str> = report["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|summary| summary["outcome"].as_str())
        .collect();
    assert_eq!(history, ["committed", "failed"], "{report}");
    site.assert_carried_files_intact();
    assert!(
        std::fs::read_to_string(&hook_log)
            .unwrap()
            .contains("warning")
    );
}

#[test]
fn a_download_the_disk_has_no_room_for_is_refused_before_anyone_is_warned() {
    let site = Site::on_a_small_disk("512m");
    let server = site.start(&[]);
    let (_agent, hook_log) = site.agent(&server, "gero");
    eventually(Duration::from_secs(20), "gero", || {
        (users(&status(&server.url())) == 1).then_some(())
    });
    // Room for the server's own small writes, not for a release.
    let filler = site.root.join("filler");
    fill_up(&filler);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap();
    let size = file.metadata().unwrap().len();
    file.set_len(size - 4 * 1024 * 1024).unwrap();
    drop(file);

    let (ok, _, stderr) = finish(update(&server, &["--grace", "2"]));
    assert!(!ok);
    assert!(
        stderr.contains("MiB free") && stderr.contains("free some space"),
        "{stderr}"
    );
    let report = status(&server.url());
    assert_eq!(report["server_version"], "1.0.0");
    assert!(!hook_log.exists(), "nobody was warned");
    assert_eq!(users(&report), 1, "nobody was logged out");
    site.assert_carried_files_intact();
}

/// A feed with 1.0.0 and a 1.2.0 whose server passes its self-check and then, started for
/// real, does `behaviour` (a shell command) instead of serving.
fn feed_with_a_release_that(behaviour: &str, dir: &Path) -> PathBuf {
    let fixture = fixture();
    let feed = dir.join("feed");
    std::fs::create_dir_all(&feed).unwrap();
    for name in [
        archive_name("1.0.0"),
        format!("{}.minisig", archive_name("1.0.0")),
        "manifest.json".to_owned(),
        "manifest.json.minisig".to_owned(),
    ] {
        std::fs::copy(fixture.feed.join(&name), feed.join(&name)).unwrap();
    }
    let broken = stub_server_tree(&dir.join("broken"), "1.2.0", &[]);
    std::fs::write(
        broken.join("bin/changeover-server"),
        format!(
            "#!/bin/sh
if [ \"$1\" = self-check ]; then echo 'changeover-server 1.2.0 ok'; exit 0; fi
{behaviour}
"
        ),
    )
    .unwrap();
    fixture.vendor.pack("server", "1.2.0", &broken, &feed);
    feed
}

/// Started by hand (no service manager), the server changes over to a 1.2.0 that does
/// `behaviour`: the watchdog must put 1.0.0 back within the health timeout + 10 s, with a
/// rollback mail in the outbox.
fn watchdog_puts_the_old_release_back_when_the_new_one(behaviour: &str, expected: &str) {
    const HEALTH_TIMEOUT_SECS: u64 = 5;
    let dir = tempfile::tempdir().unwrap();
    let feed = feed_with_a_release_that(behaviour, dir.path());
    let site = Site::with_feed(&feed);
    let config = site.config().replace(
        "health_timeout_secs = 20",
        &format!("health_timeout_secs = {HEALTH_TIMEOUT_SECS}"),
    );
    let mut server = Server::start_installed(&site.root, &config);
    let follower = update(&server, &["--grace", "0", "--version", "1.2.0"]);
    // The old process becomes 1.2.0 (same pid), which then fails.
    eventually(Duration::from_secs(30), "the new release started", || {
        let log = std::fs::read_to_string(site.root.join("state/server.log")).ok()?;
        log.contains("watchdog waiting").then_some(())
    });
    let started = std::time::Instant::now();
    let report = eventually(
        Duration::from_secs(HEALTH_TIMEOUT_SECS + 10),
        "the old release serving again",
        || {
            let report = changeover_tests::try_status(&server.url())?;
            (report["server_version"] == "1.0.0" && report["last_changeover"].is_object())
                .then_some(report)
        },
    );
    let back_after = started.elapsed();
    let (ok, _, stderr) = finish(follower);
    assert!(!ok, "{stderr}");
    let last = &report["last_changeover"];
    assert_eq!(last["outcome"], "rolled_back", "{report}");
    assert!(
        last["reason"].as_str().unwrap_or("").contains(expected),
        "{report}"
    );
    assert_eq!(site.installed_version(), "1.0.0");
    site.assert_carried_files_intact();
    assert!(!site.root.join("state/changeover.json").exists());
    let mails: Vec<String> = std::fs::read_dir(site.root.join("state/outbox"))
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("rolled_back"))
        .collect();
    assert_eq!(mails.len(), 1, "{mails:?}");
    // The server now runs in the watchdog's process, not in the one the test started.
    assert!(
        server.process.try_status().is_some(),
        "the failed release still runs"
    );
    let pid: u32 = std::fs::read_to_string(site.root.join("state/server.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    eventually(Duration::from_secs(15), "the server stopped", || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.contains(") Z ")))
        .then_some(())
    });
    // And it keeps starting from its install path.
    server.restart();
    assert_eq!(status(&server.url())["server_version"], "1.0.0");
    eprintln!("old release back {back_after:?} after the new one started");
}

#[test]
fn without_a_service_manager_a_new_release_that_exits_at_once_is_rolled_back() {
    watchdog_puts_the_old_release_back_when_the_new_one(
        "exit 0",
        "ended before its health verdict",
    );
}

#[test]
fn without_a_service_manager_a_new_release_that_segfaults_is_rolled_back() {
    watchdog_puts_the_old_release_back_when_the_new_one(
        "kill -SEGV $$",
        "ended before its health verdict",
    );
}

#[test]
fn without_a_service_manager_a_new_release_that_stops_answering_is_rolled_back() {
    watchdog_puts_the_old_release_back_when_the_new_one("kill -STOP $$", "watchdog killed it");
}

#[test]
fn a_release_that_fails_its_preflight_disturbs_nobody() {
    // A release whose binary cannot run its self-check.
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture();
    let feed = dir.path().join("feed");
    std::fs::create_dir_all(&feed).unwrap();
    for name in [
        archive_name("1.0.0"),
        format!("{}.minisig", archive_name("1.0.0")),
    ] {
        std::fs::copy(fixture.feed.join(&name), feed.join(&name)).unwrap();
    }
    std::fs::copy(
        fixture.feed.join("manifest.json"),
        feed.join("manifest.json"),
    )
    .unwrap();
    std::fs::copy(
        fixture.feed.join("manifest.json.minisig"),
        feed.join("manifest.json.minisig"),
    )
    .unwrap();
    let broken = stub_server_tree(&dir.path().join("broken"), "1.2.0", &[]);
    std::fs::write(
        broken.join("bin/changeover-server"),
        "#!/bin/sh\necho 'cannot start' >&2\nexit 3\n",
    )
    .unwrap();
    fixture.vendor.pack("server", "1.2.0", &broken, &feed);

    let site = Site::with_feed(&feed);
    let server = site.start(&[]);
    let (_agent, hook_log) = site.agent(&server, "dora");
    eventually(Duration::from_secs(20), "dora", || {
        (users(&status(&server.url())) == 1).then_some(())
    });

    let (ok, _, stderr) = finish(update(&server, &["--grace", "2", "--version", "1.2.0"]));
    assert!(!ok);
    assert!(
        stderr.contains("self-check failed") && stderr.contains("cannot start"),
        "{stderr}"
    );
    let report = status(&server.url());
    assert_eq!(report["last_changeover"]["outcome"], "failed");
    assert_eq!(report["last_changeover"]["phase"], "preparing");
    assert_eq!(report["server_version"], "1.0.0");
    assert!(!hook_log.exists(), "nobody was warned");
    assert_eq!(users(&report), 1, "nobody was logged out");
    assert!(!site.root.join(".server.staging").exists());
    site.assert_carried_files_intact();
}

#[test]
fn a_cancelled_countdown_changes_nothing_and_users_are_told() {
    let site = Site::new();
    let server = site.start(&[]);
    let (agent, hook_log) = site.agent(&server, "emil");
    eventually(Duration::from_secs(20), "emil", || {
        (users(&status(&server.url())) == 1).then_some(())
    });

    let follower = update(&server, &["--grace", "60"]);
    eventually(Duration::from_secs(30), "the first warning", || {
        hook_log.exists().then_some(())
    });
    let report = status(&server.url());
    assert_eq!(report["phase"], "counting_down");
    assert!(report["changeover"]["deadline"].is_string(), "{report}");

    let cancel = changeover_tests::admin(&["cancel", "--server", &server.url()], ADMIN_PASSWORD);
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    let (ok, _, stderr) = finish(follower);
    assert!(!ok);
    assert!(stderr.contains("cancelled"), "{stderr}");
    eventually(Duration::from_secs(10), "emil told", || {
        agent.log_text().contains("called off").then_some(())
    });
    let report = status(&server.url());
    assert_eq!(report["last_changeover"]["outcome"], "cancelled");
    assert_eq!(report["phase"], "idle");
    assert_eq!(report["server_version"], "1.0.0");
    assert_eq!(users(&report), 1);
    assert!(
        !std::fs::read_to_string(&hook_log)
            .unwrap()
            .contains("logout")
    );
    assert!(!site.root.join(".server.staging").exists());
    // Too late or nothing to cancel is a clear refusal.
    let again = changeover_tests::admin(&["cancel", "--server", &server.url()], ADMIN_PASSWORD);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no changeover"));
}

#[test]
fn a_grace_period_out_of_range_is_refused() {
    let site = Site::new();
    let server = site.start(&[]);
    let (ok, _, stderr) = finish(update(&server, &["--grace", "3601"]));
    assert!(!ok);
    assert!(stderr.contains("out of range"), "{stderr}");
}

#[test]
fn a_new_release_that_fails_its_health_check_is_rolled_back() {
    let site = Site::new();
    // The switch is inherited across the re-exec; only the new release's health check
    // consults it.
    let server = site.start(&[("CHANGEOVER_FAULT_AT", "unhealthy")]);
    let (ok, events, stderr) = finish(update(&server, &["--grace", "0"]));
    assert!(!ok, "{events:?}");
    assert!(
        stderr.contains("rolled_back") && stderr.contains("health check"),
        "{stderr}\nserver log:\n{}",
        server.process.log_text()
    );
    let report = eventually(Duration::from_secs(30), "the old release serving", || {
        let report = status(&server.url());
        (report["server_version"] == "1.0.0").then_some(report)
    });
    assert_eq!(report["last_changeover"]["outcome"], "rolled_back");
    assert_eq!(site.installed_version(), "1.0.0");
    site.assert_carried_files_intact();
    assert!(
        site.root.join("server_failed/release.json").exists(),
        "kept for diagnosis"
    );
    assert!(!site.root.join("server_old").exists());
}

/// Kills the server at `step` (as a crash or power loss would), starts it again as a
/// supervisor would, and checks how the changeover ended.
fn crash_at(step: &str, expected_outcome: &str, expected_version: &str) {
    crash_with(
        step,
        "",
        &["--grace", "0"],
        expected_outcome,
        expected_version,
    );
}

/// [`crash_at`] with `feed_extra` added to the `[feed]` section and `args` for the update.
fn crash_with(
    step: &str,
    feed_extra: &str,
    args: &[&str],
    expected_outcome: &str,
    expected_version: &str,
) {
    let site = Site::new();
    // A kill -9 here stands for a power cut: nothing of the old process survives it, so
    // the watchdog is off and the next start (from the install path) recovers.
    let config = site
        .config()
        .replace("[feed]\n", &format!("[feed]\n{feed_extra}"))
        .replace("[changeover]\n", "[changeover]\nwatchdog = false\n");
    let mut server =
        Server::start_installed_with_env(&site.root, &config, &[("CHANGEOVER_FAULT_AT", step)]);
    let follower = update(&server, args);
    let status = server.process.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{step}: the server should have died");
    server.restart();
    let (ok, events, stderr) = finish(follower);
    assert_eq!(
        ok,
        expected_outcome == "committed",
        "{step}: {stderr} {events:?}"
    );
    let report = eventually(Duration::from_secs(30), "the server settled", || {
        let report = changeover_tests::status(&server.url());
        (report["last_changeover"].is_object() && report["phase"] == "idle").then_some(report)
    });
    assert_eq!(
        report["last_changeover"]["outcome"], expected_outcome,
        "{step}: {report}"
    );
    assert_eq!(report["server_version"], expected_version, "{step}");
    assert_eq!(site.installed_version(), expected_version, "{step}");
    site.assert_carried_files_intact();
    assert!(
        !site.root.join(".server.staging").exists(),
        "{step}: staging left"
    );
    assert!(
        !site.root.join("state/changeover.json").exists(),
        "{step}: journal left"
    );
    if expected_outcome == "committed" {
        assert!(
            !site.root.join("server_old").exists(),
            "{step}: old release left"
        );
        assert!(
            !site.root.join(".server_old.deleting").exists(),
            "{step}: half-deleted old release left"
        );
    }
    // The site keeps starting from its install path.
    server.restart();
    assert_eq!(
        changeover_tests::status(&server.url())["server_version"],
        expected_version,
        "{step}"
    );
    site.assert_carried_files_intact();
}

#[test]
fn a_crash_while_preparing_ends_with_the_old_release() {
    crash_at("preparing", "failed", "1.0.0");
}

#[test]
fn a_crash_while_logging_out_ends_with_the_old_release() {
    crash_at("logging_out", "failed", "1.0.0");
}

#[test]
fn a_crash_while_stopping_ends_with_the_old_release() {
    crash_at("stopping", "failed", "1.0.0");
}

#[test]
fn a_crash_before_carrying_over_ends_with_the_old_release() {
    crash_at("carrying_over", "rolled_back", "1.0.0");
}

#[test]
fn a_crash_half_way_through_the_carry_over_puts_every_file_back() {
    crash_at("carried_partly", "rolled_back", "1.0.0");
}

#[test]
fn a_crash_before_the_swap_ends_with_the_old_release() {
    crash_at("swapping", "rolled_back", "1.0.0");
}

#[test]
fn a_crash_right_after_the_exchange_finishes_forward() {
    crash_at("swapped", "committed", "1.1.0");
}

#[test]
fn a_crash_before_the_restart_finishes_forward() {
    crash_at("restarting", "committed", "1.1.0");
}

#[test]
fn a_crash_of_the_new_release_during_its_health_check_finishes_forward_on_the_next_start() {
    crash_at("health_check", "committed", "1.1.0");
}

#[test]
fn a_crash_while_committing_finishes_forward() {
    crash_at("committing", "committed", "1.1.0");
}

#[test]
fn a_crash_after_the_commit_was_recorded_finishes_the_commit() {
    crash_at("commit_recorded", "committed", "1.1.0");
}

#[test]
fn a_crash_half_way_through_deleting_the_old_release_finishes_the_commit() {
    crash_at("commit_deleted_partly", "committed", "1.1.0");
}

#[test]
fn a_crash_right_after_the_rollbacks_exchange_puts_every_carried_file_back() {
    crash_at("unhealthy,rollback_exchanged", "rolled_back", "1.0.0");
}

#[test]
fn a_crash_half_way_through_the_rollbacks_moves_puts_every_carried_file_back() {
    crash_at("unhealthy,rollback_moved_partly", "rolled_back", "1.0.0");
}

#[test]
fn a_crash_after_the_rollbacks_moves_ends_with_the_old_release() {
    crash_at("unhealthy,rollback_moved_back", "rolled_back", "1.0.0");
}

#[test]
fn a_crash_after_the_failed_release_was_set_aside_ends_with_the_old_release() {
    crash_at("unhealthy,rollback_failed_kept", "rolled_back", "1.0.0");
}

#[test]
fn a_same_version_changeover_crashed_before_its_swap_keeps_every_carried_file() {
    crash_with(
        "carried_partly",
        "allow_downgrade = true\n",
        &["--grace", "0", "--version", "1.0.0"],
        "rolled_back",
        "1.0.0",
    );
}

#[test]
fn a_same_version_changeover_crashed_after_its_swap_finishes_forward() {
    crash_with(
        "swapped",
        "allow_downgrade = true\n",
        &["--grace", "0", "--version", "1.0.0"],
        "committed",
        "1.0.0",
    );
}

#[test]
fn a_scheduled_changeover_shows_in_the_status_and_can_be_called_off() {
    let site = Site::new();
    let server = site.start(&[]);
    // `admin update` follows a scheduled changeover too, so it runs in the background.
    let follower = update(&server, &["--at", "1h", "--grace", "0"]);
    let report = eventually(Duration::from_secs(20), "the changeover scheduled", || {
        let report = status(&server.url());
        (report["phase"] == "scheduled").then_some(report)
    });
    assert!(report["changeover"]["scheduled_at"].is_string(), "{report}");
    let cancel = changeover_tests::admin(&["cancel", "--server", &server.url()], ADMIN_PASSWORD);
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    let report = status(&server.url());
    assert_eq!(report["phase"], "idle");
    assert_eq!(report["last_changeover"]["outcome"], "cancelled");
    assert_eq!(report["server_version"], "1.0.0");
    let (ok, events, stderr) = finish(follower);
    assert!(!ok && stderr.contains("cancelled"), "{stderr}");
    assert!(events[0]["scheduled_at"].is_string(), "{events:?}");
}

#[test]
fn unattended_mode_updates_inside_its_window_by_itself() {
    let site = Site::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let minute = |seconds: u64| {
        let of_day = seconds % 86_400;
        format!("{:02}:{:02}", of_day / 3600, (of_day % 3600) / 60)
    };
    let window = format!("{}-{}", minute(now - 3600), minute(now + 3600));
    let config = format!(
        "{}[unattended]\nenabled = true\nwindow_utc = \"{window}\"\ngrace_secs = 0\n",
        site.config()
            .replace("[feed]\n", "[feed]\ncheck_interval_secs = 10\n")
    );
    let server = Server::start_installed(&site.root, &config);
    // The new release answers status while its health check still runs; the changeover
    // is over once its outcome is recorded.
    // Polled across the restart, when the server briefly does not answer.
    let report = eventually(Duration::from_secs(90), "the unattended update", || {
        let report = changeover_tests::try_status(&server.url())?;
        (report["server_version"] == "1.1.0" && report["last_changeover"].is_object())
            .then_some(report)
    });
    assert_eq!(report["last_changeover"]["outcome"], "committed");
    site.assert_carried_files_intact();
}

#[test]
fn the_admins_mail_waits_while_smtp_is_down_and_arrives_exactly_once() {
    let site = Site::new();
    let smtp_port = changeover_tests::feeds::free_port();
    let config = format!(
        "{}[mail]\nsmtp_url = \"smtp://127.0.0.1:{smtp_port}\"\nfrom = \"changeover@example.com\"\nto = \"default@example.com\"\n",
        site.config()
    );
    let mut server = Server::start_installed(&site.root, &config);
    // The SMTP server is down during the whole changeover: it must not hold anything up.
    let (ok, _, stderr) = finish(update(
        &server,
        &["--grace", "0", "--notify", "boss@example.com"],
    ));
    assert!(ok, "{stderr}");
    let outbox = site.root.join("state/outbox");
    let waiting = eventually(
        Duration::from_secs(20),
        "the mail waiting with a reason",
        || {
            let file = std::fs::read_dir(&outbox)
                .ok()?
                .flatten()
                .find(|f| f.path().extension().is_some_and(|e| e == "json"))?;
            let mail: Value = serde_json::from_slice(&std::fs::read(file.path()).ok()?).ok()?;
            mail["last_error"].is_string().then_some(mail)
        },
    );
    assert!(
        waiting["last_error"]
            .as_str()
            .unwrap()
            .contains("cannot send"),
        "{waiting}"
    );
    // The server restarts while the mail waits; then the SMTP server comes up.
    server.restart();
    let sink = changeover_tests::smtp::SmtpSink::start(smtp_port, &site.dir.path().join("maildir"));
    let mail = eventually(Duration::from_secs(90), "the mail delivered", || {
        sink.messages().into_iter().next()
    });
    assert!(mail.contains("To: boss@example.com"), "{mail}");
    assert!(
        mail.contains("Subject: Server available again: updated 1.0.0 -> 1.1.0"),
        "{mail}"
    );
    assert!(mail.contains("Message-ID: <co-"), "{mail}");
    assert!(mail.contains("Downtime:"), "{mail}");
    // This feed has no agent release: the admin learns the agents stay as they are.
    assert!(
        mail.contains("Agent release:  none of version 1.1.0"),
        "{mail}"
    );
    // Never twice, also not after another restart.
    server.restart();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(sink.messages().len(), 1);
    assert!(
        site.root
            .join("state/outbox/sent")
            .read_dir()
            .unwrap()
            .count()
            == 1
    );
}

#[test]
fn a_mail_that_cannot_be_moved_to_sent_is_still_sent_only_once() {
    let site = Site::new();
    let smtp_port = changeover_tests::feeds::free_port();
    let sink = changeover_tests::smtp::SmtpSink::start(smtp_port, &site.dir.path().join("maildir"));
    // `sent` is a file, so the outbox cannot move a sent mail there.
    let outbox = site.root.join("state/outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    std::fs::write(outbox.join("sent"), "in the way\n").unwrap();
    let config = format!(
        "{}[mail]\nsmtp_url = \"smtp://127.0.0.1:{smtp_port}\"\nto = \"it@example.com\"\n",
        site.config()
    );
    let server = Server::start_installed(&site.root, &config);
    let (ok, _, stderr) = finish(update(&server, &["--grace", "0"]));
    assert!(ok, "{stderr}");
    eventually(Duration::from_secs(60), "the mail", || {
        sink.messages().into_iter().next()
    });
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(sink.messages().len(), 1, "sent again");
}

#[test]
fn a_rollback_is_mailed_with_its_reason() {
    let site = Site::new();
    let smtp_port = changeover_tests::feeds::free_port();
    let sink = changeover_tests::smtp::SmtpSink::start(smtp_port, &site.dir.path().join("maildir"));
    let config = format!(
        "{}[mail]\nsmtp_url = \"smtp://127.0.0.1:{smtp_port}\"\nto = \"it@example.com\"\n",
        site.config()
    );
    let server = Server::start_installed_with_env(
        &site.root,
        &config,
        &[("CHANGEOVER_FAULT_AT", "unhealthy")],
    );
    let (ok, _, _) = finish(update(&server, &["--grace", "0"]));
    assert!(!ok);
    let mail = eventually(Duration::from_secs(60), "the rollback mail", || {
        sink.messages().into_iter().next()
    });
    assert!(mail.contains("To: it@example.com"), "{mail}");
    assert!(mail.contains("rolled_back"), "{mail}");
    assert!(mail.contains("health check"), "{mail}");
    // The server log's last lines, from the release that failed and the one that took over.
    assert!(mail.contains("lines of the server log"), "{mail}");
    assert!(mail.contains("unhealthy"), "{mail}");
}

#[test]
fn under_systemd_the_server_says_ready_pings_the_watchdog_and_starts_no_watchdog_of_its_own() {
    let site = Site::new();
    let socket_path = site.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let path = socket_path.to_string_lossy().into_owned();
    let mut server = Server::start_installed_with_env(
        &site.root,
        &site.config(),
        &[
            ("NOTIFY_SOCKET", path.as_str()),
            ("WATCHDOG_USEC", "400000"),
            ("INVOCATION_ID", "0123456789abcdef"),
        ],
    );
    let mut heard = Vec::new();
    let mut buffer = [0u8; 4096];
    while !(heard.iter().any(|m: &String| m.contains("READY=1"))
        && heard.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3)
    {
        let read = socket.recv(&mut buffer).expect("a notification");
        heard.push(String::from_utf8_lossy(&buffer[..read]).into_owned());
    }
    assert!(
        heard
            .iter()
            .any(|m| m.contains("STATUS=serving version 1.0.0")),
        "{heard:?}"
    );
    // The changeover relies on the service manager: no watchdog process of its own.
    let (ok, _, stderr) = finish(update(&server, &["--grace", "0"]));
    assert!(ok, "{stderr}");
    let log = std::fs::read_to_string(site.root.join("state/server.log")).unwrap();
    assert!(
        log.contains("a service manager supervises the server"),
        "{log}"
    );
    assert!(!log.contains("watchdog waiting"), "{log}");
    // The new release says ready too, and goes on pinging.
    let mut again = Vec::new();
    while !again
        .iter()
        .any(|m: &String| m.contains("STATUS=serving version 1.1.0"))
    {
        let read = socket.recv(&mut buffer).expect("a notification");
        again.push(String::from_utf8_lossy(&buffer[..read]).into_owned());
    }
    server.stop();
    let mut last = Vec::new();
    while let Ok(read) = socket.recv(&mut buffer) {
        last.push(String::from_utf8_lossy(&buffer[..read]).into_owned());
        if last.iter().any(|m| m.contains("STOPPING=1")) {
            break;
        }
    }
    assert!(last.iter().any(|m| m.contains("STOPPING=1")), "{last:?}");
}
