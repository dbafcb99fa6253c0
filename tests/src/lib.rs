//! Support for the end-to-end tests: builds and starts the real binaries in temporary
//! folders, and kills whatever they started when a test ends, passed or failed.
//!
//! `CARGO_BIN_EXE_<name>` only exists in the package that owns a binary, so this crate
//! finds the binaries in the target folder it was itself built into, and builds them once
//! per test process first.

pub mod browser;
pub mod feeds;
pub mod smtp;
pub mod wine;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The admin password every test server is started with.
pub const ADMIN_PASSWORD: &str = "test-admin-password";

/// A config that makes heartbeats fast enough for tests to watch.
pub const FAST_HEARTBEAT_CONFIG: &str = "[server]\nheartbeat_secs = 1\n";

/// Where cargo put this test's binaries (`target/debug` or `target/release`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_owned()
}

/// The path of a workspace binary, built on first use.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let profile_dir = profile_dir();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut build = Command::new(cargo);
        build.current_dir(&workspace).args([
            "build",
            "--quiet",
            "-p",
            "changeover-server",
            "-p",
            "changeover-agent",
        ]);
        if profile_dir
            .file_name()
            .is_some_and(|name| name == "release")
        {
            build.arg("--release");
        }
        // Build into the same target folder this test binary came from.
        if let Some(target_dir) = profile_dir.parent() {
            build.env("CARGO_TARGET_DIR", target_dir);
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
    });
    let path = profile_dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Polls `check` until it returns `Some`, or panics with `what` after `patience`.
pub fn eventually<T>(patience: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {patience:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Process {
    pub(crate) child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Takes over a child started by the test itself, logging to `log`.
    pub fn from_child(child: Child, log: PathBuf) -> Process {
        Process { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// Waits for the process to exit, at most `patience`.
    pub fn wait_exit(&mut self, patience: Duration) -> ExitStatus {
        eventually(patience, "the process to exit", || {
            self.child.try_wait().expect("try_wait works")
        })
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait works")
    }

    /// What the process logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `changeover-server run` for a product folder.
#[derive(Debug)]
pub struct Server {
    pub root: PathBuf,
    /// The executable started (a build, or an installed release).
    pub binary: PathBuf,
    pub address: SocketAddr,
    pub process: Process,
    /// Lines the server printed on stdout before it listened.
    pub stdout_lines: Vec<String>,
    starts: u32,
    admin_password: Option<&'static str>,
}

impl Server {
    /// Starts a server on a fresh port. `config`, if given, is written as
    /// `changeover.toml` first.
    pub fn start(root: &Path, config: Option<&str>) -> Server {
        let any_port: SocketAddr = "127.0.0.1:0".parse().expect("address");
        Server::start_with(root, config, Some(any_port))
    }

    /// Starts a server on `listen`, or on the config's address when `None`.
    pub fn start_with(root: &Path, config: Option<&str>, listen: Option<SocketAddr>) -> Server {
        if let Some(config) = config {
            let dir = root.join("server/config");
            std::fs::create_dir_all(&dir).expect("config folder");
            std::fs::write(dir.join("changeover.toml"), config).expect("config written");
        }
        let binary = binary("changeover-server");
        let (process, address, stdout_lines) =
            spawn_server(&binary, root, listen, 0, Some(ADMIN_PASSWORD));
        Server {
            root: root.to_owned(),
            binary,
            address,
            process,
            stdout_lines,
            starts: 1,
            admin_password: Some(ADMIN_PASSWORD),
        }
    }

    /// Starts the release installed in `root` (`root/server/bin/changeover-server`), as a
    /// service manager would, after writing `config` as its `changeover.toml`.
    pub fn start_installed(root: &Path, config: &str) -> Server {
        Server::start_installed_with_env(root, config, &[])
    }

    /// [`Server::start_installed`] with extra environment (the fault switch, say); a
    /// [`Server::restart`] starts without it, as a supervisor would.
    pub fn start_installed_with_env(root: &Path, config: &str, env: &[(&str, &str)]) -> Server {
        let config_dir = root.join("server/config");
        std::fs::create_dir_all(&config_dir).expect("config folder");
        std::fs::write(config_dir.join("changeover.toml"), config).expect("config written");
        let binary = root.join("server/bin/changeover-server");
        let any_port: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let (process, address, stdout_lines) =
            spawn_server_with_env(&binary, root, Some(any_port), 0, Some(ADMIN_PASSWORD), env);
        Server {
            root: root.to_owned(),
            binary,
            address,
            process,
            stdout_lines,
            starts: 1,
            admin_password: Some(ADMIN_PASSWORD),
        }
    }

    /// Starts a server without `CHANGEOVER_ADMIN_PASSWORD`, so it generates a password.
    pub fn start_without_password(root: &Path) -> Server {
        let any_port: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let binary = binary("changeover-server");
        let (process, address, stdout_lines) = spawn_server(&binary, root, Some(any_port), 0, None);
        Server {
            root: root.to_owned(),
            binary,
            address,
            process,
            stdout_lines,
            starts: 1,
            admin_password: None,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.address)
    }

    /// The web console's address from the `console on URL` line the server printed before
    /// it listened; `None` when the console is off.
    pub fn console_url(&self) -> Option<String> {
        self.stdout_lines
            .iter()
            .find_map(|line| line.strip_prefix("console on "))
            .map(|url| url.trim().to_owned())
    }

    /// Stops with SIGTERM and checks the exit status is 0.
    pub fn stop(&mut self) {
        self.process.signal("TERM");
        let status = self.process.wait_exit(Duration::from_secs(15));
        assert!(
            status.success(),
            "server exited with {status}: {}",
            self.process.log_text()
        );
    }

    /// Starts again on the same address, as an admin or a supervisor would.
    pub fn restart(&mut self) {
        if self.process.try_status().is_none() {
            self.stop();
        }
        let (process, address, stdout_lines) = spawn_server(
            &self.binary,
            &self.root,
            Some(self.address),
            self.starts,
            self.admin_password,
        );
        self.starts += 1;
        self.process = process;
        self.address = address;
        self.stdout_lines = stdout_lines;
    }
}

fn spawn_server(
    binary: &Path,
    root: &Path,
    listen: Option<SocketAddr>,
    start_number: u32,
    admin_password: Option<&str>,
) -> (Process, SocketAddr, Vec<String>) {
    spawn_server_with_env(binary, root, listen, start_number, admin_password, &[])
}

fn spawn_server_with_env(
    binary: &Path,
    root: &Path,
    listen: Option<SocketAddr>,
    start_number: u32,
    admin_password: Option<&str>,
    env: &[(&str, &str)],
) -> (Process, SocketAddr, Vec<String>) {
    let log = root.with_extension(format!("server-{start_number}.log"));
    let log_file = std::fs::File::create(&log).expect("log file");
    let mut command = Command::new(binary);
    command
        .args(["run", "--root"])
        .arg(root)
        .env_remove("CHANGEOVER_ADMIN_PASSWORD")
        .env("RUST_LOG", "info,changeover_server=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    if let Some(listen) = listen {
        command.args(["--listen", &listen.to_string()]);
    }
    if let Some(password) = admin_password {
        command.env("CHANGEOVER_ADMIN_PASSWORD", password);
    }
    command.env_remove("CHANGEOVER_FAULT_AT");
    // Started by hand, as far as the server can tell: no service manager.
    command
        .env_remove("INVOCATION_ID")
        .env_remove("NOTIFY_SOCKET");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("server starts");
    let stdout = child.stdout.take().expect("stdout piped");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    // Keeps reading after the listening line too: a server whose stdout pipe closed would
    // see EPIPE, which is not what these tests are about.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = lines_tx.send(line);
        }
    });
    let mut process = Process { child, log };
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(remaining) {
            Ok(line) => {
                if let Some(url) = line.strip_prefix("listening on ") {
                    let bound = url
                        .split("://")
                        .nth(1)
                        .and_then(|a| a.parse().ok())
                        .expect("listening line names an address");
                    lines.push(line);
                    return (process, bound, lines);
                }
                lines.push(line);
            }
            Err(_) => panic!(
                "server did not start listening (exit: {:?}); log:\n{}",
                process.try_status(),
                process.log_text()
            ),
        }
    }
}

/// Starts `changeover-agent run` against `url` as `user`, keeping its state in `state_dir`.
pub fn start_agent(url: &str, user: &str, state_dir: &Path, extra_args: &[&str]) -> Process {
    std::fs::create_dir_all(state_dir).expect("state folder");
    let log = state_dir.join("agent.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(binary("changeover-agent"))
        .args(["run", "--server", url, "--user", user, "--state-dir"])
        .arg(state_dir)
        .args(extra_args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("agent starts");
    Process { child, log }
}

/// Runs `changeover-agent admin ...` with the given password and returns its output.
pub fn admin(args: &[&str], password: &str) -> Output {
    Command::new(binary("changeover-agent"))
        .arg("admin")
        .args(args)
        .env("CHANGEOVER_ADMIN_PASSWORD", password)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("admin command runs")
}

/// Runs `changeover-agent admin ...` with no password in the environment.
pub fn admin_without_env(args: &[&str]) -> Output {
    Command::new(binary("changeover-agent"))
        .arg("admin")
        .args(args)
        .env_remove("CHANGEOVER_ADMIN_PASSWORD")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("admin command runs")
}

/// `admin status --json` with the right password, parsed; panics if it fails.
pub fn status(url: &str) -> serde_json::Value {
    let output = admin(&["status", "--server", url, "--json"], ADMIN_PASSWORD);
    assert!(
        output.status.success(),
        "admin status failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("status is JSON")
}

/// `admin status --json`, or `None` while the server does not answer (it is restarting).
pub fn try_status(url: &str) -> Option<serde_json::Value> {
    let output = admin(&["status", "--server", url, "--json"], ADMIN_PASSWORD);
    if !output.status.success() {
        return None;
    }
    serde_json::from_slice(&output.stdout).ok()
}

/// The users of the sessions in a status document, sorted.
pub fn session_users(status: &serde_json::Value) -> Vec<String> {
    let mut users: Vec<String> = status["sessions"]
        .as_array()
        .expect("sessions is a list")
        .iter()
        .map(|session| {
            session["user"]
                .as_str()
                .expect("user is a string")
                .to_owned()
        })
        .collect();
    users.sort();
    users
}

/// Writes a site CA and a `localhost` server certificate it signed (`server.crt`,
/// `server.key` in `certs_dir`); returns the CA file in `ca_dir`.
pub fn make_site_certificates(certs_dir: &Path, ca_dir: &Path) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Example Site CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key"))
        .expect("CA certificate");
    let server_key = KeyPair::generate().expect("key");
    let server_params =
        CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    let server_cert = server_params
        .signed_by(&server_key, &ca)
        .expect("server certificate");
    std::fs::create_dir_all(certs_dir).expect("certs folder");
    std::fs::write(certs_dir.join("server.crt"), server_cert.pem()).expect("certificate");
    std::fs::write(certs_dir.join("server.key"), server_key.serialize_pem()).expect("key");
    std::fs::create_dir_all(ca_dir).expect("CA folder");
    let ca_file = ca_dir.join("site-ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("CA file");
    ca_file
}
