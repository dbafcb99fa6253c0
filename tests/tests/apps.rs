//! The vendor's application under Changeover: a real Redis (`redis-server` from Debian's
//! packages, installed by `scripts/test`) in the releases, with its data folder carried
//! over; a release whose application fails its probe; applications that crash.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use changeover_protocol::release::current_platform;
use changeover_tests::feeds::{StaticServer, Vendor, free_port, server_tree};
use changeover_tests::smtp::SmtpSink;
use changeover_tests::{ADMIN_PASSWORD, Server, binary, eventually, status, try_status};
use serde_json::Value;

const REDIS: &str = "/usr/bin/redis-server";

/// `bin/cache`: Redis on `$CACHE_PORT`, its data in the carried folder `data/`, saved on
/// SIGTERM.
fn redis_wrapper(version: &str) -> String {
    format!(
        "#!/bin/sh\nmkdir -p data\necho \"cache of release {version}\"\n\
         exec {REDIS} --port \"$CACHE_PORT\" --bind 127.0.0.1 --dir data \
         --dbfilename dump.rdb --save '3600 1' --appendonly no --daemonize no\n"
    )
}

fn app_toml(port: u16, probe_port: u16) -> String {
    format!(
        "[[app]]\nname = \"cache\"\ncommand = [\"bin/cache\"]\n\
         env = {{ CACHE_PORT = \"{port}\" }}\nstop_timeout_secs = 10\n\
         health = {{ tcp = \"127.0.0.1:{probe_port}\" }}\n\
         check = [\"/bin/sh\", \"-c\", \"test -x {REDIS}\"]\n"
    )
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn archive_name(version: &str) -> String {
    format!("server-{version}-{}.tar.gz", current_platform())
}

fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .filter(|text| !text.starts_with("Could not connect"))
}

/// A product folder with release 1.0.0 (carrying Redis) installed, a feed with 1.1.0
/// (Redis again) and 1.2.0 (whose probe never passes).
struct Site {
    dir: tempfile::TempDir,
    root: PathBuf,
    port: u16,
    feed_server: StaticServer,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let vendor = Vendor::create(&dir.path().join("vendor"));
        let feed = dir.path().join("feed");
        let port = free_port();
        let dead_port = free_port();
        for version in ["1.0.0", "1.1.0", "1.2.0"] {
            let probe = if version == "1.2.0" { dead_port } else { port };
            let manifest = app_toml(port, probe);
            let wrapper = redis_wrapper(version);
            let tree = server_tree(
                &dir.path().join(format!("tree-{version}")),
                &[
                    ("app.toml", manifest.as_bytes()),
                    ("bin/cache", wrapper.as_bytes()),
                ],
            );
            make_executable(&tree.join("bin/cache"));
            vendor.pack("server", version, &tree, &feed);
        }
        let root = dir.path().join("office");
        let output = Command::new(binary("changeover-server"))
            .args(["install", "--root"])
            .arg(&root)
            .arg("--package")
            .arg(feed.join(archive_name("1.0.0")))
            .arg("--public-key")
            .arg(&vendor.public_key)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let feed_server = StaticServer::python(&feed, dir.path());
        Site {
            dir,
            root,
            port,
            feed_server,
        }
    }

    fn config(&self) -> String {
        format!(
            "[server]\nheartbeat_secs = 1\n[feed]\nurl = \"{}\"\n[changeover]\nhealth_timeout_secs = 8\n\
             [carry_over]\npaths = [\"config\", \"backups\", \"certs\", \"data\"]\n",
            self.feed_server.url()
        )
    }

    /// Starts with `extra` appended to the config and `env` (the fault switch) set.
    fn start_with(&self, extra: &str, env: &[(&str, &str)]) -> Server {
        let config = format!("{}{extra}", self.config());
        Server::start_installed_with_env(&self.root, &config, env)
    }

    fn write_orders(&self, count: usize) {
        for i in 0..count {
            let key = format!("order:{i}");
            let value = format!("customer-{i}");
            assert_eq!(
                redis_cli(self.port, &["SET", &key, &value]).as_deref(),
                Some("OK")
            );
        }
    }

    fn assert_orders(&self, count: usize) {
        for i in 0..count {
            let key = format!("order:{i}");
            assert_eq!(
                redis_cli(self.port, &["GET", &key]),
                Some(format!("customer-{i}")),
                "{key} lost"
            );
        }
    }

    fn installed_version(&self) -> String {
        let text = std::fs::read_to_string(self.root.join("server/release.json")).unwrap();
        let info: Value = serde_json::from_str(&text).unwrap();
        info["version"].as_str().unwrap().to_owned()
    }

    fn app_log(&self) -> String {
        std::fs::read_to_string(self.root.join("state/apps/cache.log")).unwrap_or_default()
    }
}

fn app(report: &Value, name: &str) -> Value {
    report["apps"]
        .as_array()
        .and_then(|apps| apps.iter().find(|app| app["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

fn wait_healthy(server: &Server, name: &str) -> Value {
    eventually(Duration::from_secs(20), "the application healthy", || {
        let found = app(&status(&server.url()), name);
        (found["state"] == "healthy").then_some(found)
    })
}

fn update(server: &Server, args: &[&str]) -> (bool, String) {
    update_at(&server.url(), args)
}

fn process_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let end = stat.rfind(')')?;
            stat[end + 1..]
                .split_whitespace()
                .next()
                .map(|state| state != "Z")
        })
        .unwrap_or(false)
}

#[test]
fn redis_data_survives_the_changeover_and_a_failing_release_is_rolled_back() {
    let site = Site::new();
    let smtp_port = free_port();
    let sink = SmtpSink::start(smtp_port, &site.dir.path().join("maildir"));
    let mut server = site.start_with(
        &format!("[mail]\nsmtp_url = \"smtp://127.0.0.1:{smtp_port}\"\nto = \"it@example.com\"\n"),
        &[],
    );
    let old = wait_healthy(&server, "cache");
    let old_pid = old["pid"].as_u64().unwrap();
    assert_eq!(old["restarts"], 0);
    site.write_orders(100);

    let (ok, output) = update(&server, &["--grace", "0", "--version", "1.1.0"]);
    assert!(
        ok,
        "{output}\n{}",
        std::fs::read_to_string(site.root.join("state/server.log")).unwrap_or_default()
    );
    assert_eq!(site.installed_version(), "1.1.0");
    assert!(!site.root.join("server_old").exists());
    // The 1.0.0 Redis was stopped with SIGTERM and saved its data before the carry-over.
    assert!(!process_alive(old_pid), "the old Redis still runs");
    let log = site.app_log();
    assert!(log.contains("Saving the final RDB snapshot"), "{log}");
    assert!(log.contains("cache of release 1.1.0"), "{log}");
    let new = wait_healthy(&server, "cache");
    assert_ne!(new["pid"], old["pid"]);
    assert_eq!(redis_cli(site.port, &["PING"]).as_deref(), Some("PONG"));
    site.assert_orders(100);

    // 1.2.0's application never passes its probe: everything goes back to 1.1.0.
    redis_cli(site.port, &["SET", "written-before-1.2.0", "yes"]);
    let (ok, output) = update(&server, &["--grace", "0", "--version", "1.2.0"]);
    assert!(!ok, "{output}");
    assert!(output.contains("\"cache\""), "{output}");
    assert!(output.contains("health probe"), "{output}");
    assert_eq!(site.installed_version(), "1.1.0");
    let back = wait_healthy(&server, "cache");
    assert!(back["pid"].is_u64());
    assert_eq!(
        redis_cli(site.port, &["GET", "written-before-1.2.0"]).as_deref(),
        Some("yes")
    );
    assert_eq!(
        redis_cli(site.port, &["GET", "order:42"]).as_deref(),
        Some("customer-42")
    );
    let report = status(&server.url());
    assert_eq!(report["last_changeover"]["outcome"], "rolled_back");
    assert!(
        report["last_changeover"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("\"cache\""),
        "{report}"
    );
    // The admin's mail about the rollback names the application and quotes its log.
    let mail = eventually(Duration::from_secs(60), "the rollback mail", || {
        sink.messages()
            .into_iter()
            .find(|mail| mail.contains("rolled_back"))
    });
    let mail = mail
        .replace("=\r\n", "")
        .replace("=\n", "")
        .replace("=3D", "=");
    assert!(
        mail.contains("application \"cache\" did not pass"),
        "{mail}"
    );
    assert!(mail.contains("the last lines of its log"), "{mail}");
    assert!(mail.contains("Ready to accept connections"), "{mail}");

    // The rolled-back release keeps starting on the data 1.2.0's Redis rewrote at its stop
    // (a carried file that no longer matches its record is the site's data, not damage).
    server.restart();
    assert_eq!(status(&server.url())["server_version"], "1.1.0");
    let back = wait_healthy(&server, "cache");
    assert_eq!(
        redis_cli(site.port, &["GET", "written-before-1.2.0"]).as_deref(),
        Some("yes")
    );

    // SIGTERM stops the server and its Redis, which saves again.
    let pid = back["pid"].as_u64().unwrap();
    server.stop();
    assert!(!process_alive(pid), "Redis outlived the server");
    assert!(site.root.join("server/data/dump.rdb").exists());
    drop(site.dir);
}

/// A release tree without a feed: only the server and an `app.toml` of shell programs.
fn shell_site(manifest: &str) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("office");
    std::fs::create_dir_all(root.join("server")).unwrap();
    std::fs::write(root.join("server/app.toml"), manifest).unwrap();
    let server = Server::start(&root, None);
    (dir, server)
}

#[test]
fn an_application_that_dies_is_restarted_and_one_that_always_dies_is_reported_crashed() {
    let (dir, mut server) = shell_site(
        "[[app]]\nname = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"echo working; exec sleep 600\"]\n\
         stop_timeout_secs = 2\n\n\
         [[app]]\nname = \"broken\"\ncommand = [\"/bin/sh\", \"-c\", \"echo cannot open the database >&2; exit 3\"]\n",
    );
    let worker = eventually(Duration::from_secs(10), "the worker running", || {
        let found = app(&status(&server.url()), "worker");
        (found["state"] == "running").then_some(found)
    });
    let pid = worker["pid"].as_u64().unwrap();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let again = eventually(Duration::from_secs(10), "the worker restarted", || {
        let found = app(&status(&server.url()), "worker");
        (found["state"] == "running" && found["pid"].as_u64() != Some(pid)).then_some(found)
    });
    assert_eq!(again["restarts"], 1);
    assert!(
        again["last_exit"].as_str().unwrap_or("").contains("signal"),
        "{again}"
    );

    let broken = eventually(Duration::from_secs(20), "the broken app crashed", || {
        let found = app(&status(&server.url()), "broken");
        (found["state"] == "crashed").then_some(found)
    });
    assert!(broken["pid"].is_null());
    assert_eq!(broken["restarts"], 4);
    assert!(
        broken["last_exit"].as_str().unwrap_or("").contains("3"),
        "{broken}"
    );
    // It stays given up: no hot loop.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(app(&status(&server.url()), "broken")["restarts"], 4);
    let table = Command::new(binary("changeover-agent"))
        .args(["admin", "status", "--server", &server.url()])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("broken") && table.contains("crashed"),
        "{table}"
    );
    let log = std::fs::read_to_string(dir.path().join("office/state/apps/broken.log")).unwrap();
    assert!(log.contains("cannot open the database"), "{log}");

    let pid = again["pid"].as_u64().unwrap();
    server.stop();
    assert!(!process_alive(pid), "the worker outlived the server");
}

#[test]
fn applications_left_running_by_a_killed_server_are_stopped_at_its_next_start() {
    let (_dir, mut server) = shell_site(
        "[[app]]\nname = \"worker\"\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 600\"]\n",
    );
    let worker = eventually(Duration::from_secs(10), "the worker running", || {
        let found = app(&status(&server.url()), "worker");
        (found["state"] == "running").then_some(found)
    });
    let orphan = worker["pid"].as_u64().unwrap();
    server.process.signal("KILL");
    server.process.wait_exit(Duration::from_secs(5));
    assert!(process_alive(orphan));
    server.restart();
    let fresh = eventually(Duration::from_secs(10), "the worker running again", || {
        let found = app(&status(&server.url()), "worker");
        (found["state"] == "running").then_some(found)
    });
    assert_ne!(fresh["pid"].as_u64(), Some(orphan));
    assert!(!process_alive(orphan), "the orphan still runs");
}

#[test]
fn two_installs_side_by_side_are_updated_each_by_its_own_changeover() {
    let dir = tempfile::tempdir().unwrap();
    let vendor = Vendor::create(&dir.path().join("vendor"));
    let feed = dir.path().join("feed");
    for version in ["1.0.0", "1.1.0"] {
        let manifest = format!(
            "[[app]]\nname = \"office\"\ncommand = [\"/bin/sh\", \"-c\", \"echo office {version}; exec sleep 600\"]\nstop_timeout_secs = 2\n"
        );
        let tree = server_tree(
            &dir.path().join(format!("tree-{version}")),
            &[("app.toml", manifest.as_bytes())],
        );
        vendor.pack("server", version, &tree, &feed);
    }
    let feed_server = StaticServer::python(&feed, dir.path());
    let root = dir.path().join("product");
    let mut servers = Vec::new();
    for name in ["business", "finance"] {
        let output = Command::new(binary("changeover-server"))
            .args(["install", "--root"])
            .arg(&root)
            .args(["--name", name, "--package"])
            .arg(feed.join(archive_name("1.0.0")))
            .arg("--public-key")
            .arg(&vendor.public_key)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let config = format!(
            "[feed]\nurl = \"{}\"\n[changeover]\nhealth_timeout_secs = 10\n",
            feed_server.url()
        );
        std::fs::write(root.join(name).join("config/changeover.toml"), config).unwrap();
        std::fs::write(
            root.join(name).join("config/site.toml"),
            format!("who = \"{name}\"\n"),
        )
        .unwrap();
        let child = Command::new(root.join(name).join("bin/changeover-server"))
            .args(["run", "--root"])
            .arg(&root)
            .args([
                "--name",
                name,
                "--listen",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        servers.push(child);
    }
    let state_of = |name: &str| root.join(format!("{name}_state"));
    let url_of = |name: &str| {
        eventually(Duration::from_secs(20), "the server listening", || {
            let log = std::fs::read_to_string(state_of(name).join("server.log")).ok()?;
            let at = log.rfind("address=")?;
            let address: String = log[at + 8..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            Some(format!("ws://{address}"))
        })
    };
    let business = url_of("business");
    let finance = url_of("finance");
    let running = |url: &str| {
        eventually(Duration::from_secs(10), "the application running", || {
            let found = app(&status(url), "office");
            (found["state"] == "running").then_some(found)
        })
    };
    let finance_before = running(&finance);
    running(&business);

    let output = Command::new(binary("changeover-agent"))
        .args(["admin", "update", "--server", &business, "--grace", "0"])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let version = |name: &str| {
        let text = std::fs::read_to_string(root.join(name).join("release.json")).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["version"].clone()
    };
    assert_eq!(version("business"), "1.1.0");
    assert_eq!(version("finance"), "1.0.0");
    assert!(!root.join("business_old").exists() && !root.join("finance_old").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("business/config/site.toml")).unwrap(),
        "who = \"business\"\n"
    );
    running(&business);
    let finance_after = running(&finance);
    assert_eq!(
        finance_after["pid"], finance_before["pid"],
        "finance's application was touched"
    );
    assert_eq!(status(&finance)["server_version"], "1.0.0");
    assert_eq!(status(&business)["server_version"], "1.1.0");
    for mut child in servers {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
}

/// Kills the server (as `kill -9` would) at `step` of a changeover to 1.1.0 with Redis
/// holding orders, starts it again from the install path, and checks that the site ends in
/// one whole version whose Redis runs on the orders as they were.
fn crash_with_redis_at(step: &str, expected_version: &str) {
    let site = Site::new();
    // A power cut: the watchdog dies too, the next start recovers.
    let config = site
        .config()
        .replace("[changeover]\n", "[changeover]\nwatchdog = false\n");
    let mut server =
        Server::start_installed_with_env(&site.root, &config, &[("CHANGEOVER_FAULT_AT", step)]);
    wait_healthy(&server, "cache");
    site.write_orders(50);
    let url = server.url();
    let admin =
        std::thread::spawn(move || update_at(&url, &["--grace", "0", "--version", "1.1.0"]));
    let status_at_crash = server.process.wait_exit(Duration::from_secs(60));
    assert!(
        !status_at_crash.success(),
        "{step}: the server should have died"
    );
    server.restart();
    let _ = admin.join();
    let report = eventually(Duration::from_secs(60), "the server settled", || {
        let report = try_status(&server.url())?;
        (report["last_changeover"].is_object() && report["phase"] == "idle").then_some(report)
    });
    assert_eq!(
        report["server_version"], expected_version,
        "{step}: {report}"
    );
    assert_eq!(site.installed_version(), expected_version, "{step}");
    let cache = wait_healthy(&server, "cache");
    // The Redis answering is the one the server supervises, not one left by the killed server.
    let info = redis_cli(site.port, &["INFO", "server"]).unwrap_or_default();
    assert!(
        info.contains(&format!("process_id:{}", cache["pid"])),
        "{step}: {cache} {info}"
    );
    site.assert_orders(50);
    for leftover in [".server.staging", "server_old", "state/changeover.json"] {
        assert!(
            !site.root.join(leftover).exists(),
            "{step}: {leftover} left"
        );
    }
    let pid = cache["pid"].as_u64().unwrap();
    server.stop();
    assert!(!process_alive(pid), "{step}: Redis outlived the server");
}

fn update_at(url: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(binary("changeover-agent"))
        .args(["admin", "update", "--server", url])
        .args(args)
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn a_crash_after_the_applications_stopped_ends_with_the_old_release_serving() {
    crash_with_redis_at("apps_stopped", "1.0.0");
}

#[test]
fn a_crash_after_the_new_applications_started_ends_in_one_whole_version() {
    crash_with_redis_at("apps_started", "1.1.0");
}

#[test]
fn a_crash_after_the_application_health_passed_ends_in_one_whole_version() {
    crash_with_redis_at("apps_healthy", "1.1.0");
}
