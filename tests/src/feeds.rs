//! Release feeds for tests: vendor keys and packages made with the real release tools,
//! served by stock static web servers the project did not write (Python's `http.server`,
//! which ignores `Range`, and nginx, which honours it), and hostile packages crafted by hand.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{Process, binary, eventually};

/// A vendor key pair made with `changeover-server release keygen`.
#[derive(Debug, Clone)]
pub struct Vendor {
    pub secret_key: PathBuf,
    pub public_key: PathBuf,
}

impl Vendor {
    pub fn create(dir: &Path) -> Vendor {
        std::fs::create_dir_all(dir).expect("vendor folder");
        let vendor = Vendor {
            secret_key: dir.join("vendor.key"),
            public_key: dir.join("vendor.pub"),
        };
        let output = Command::new(binary("changeover-server"))
            .args(["release", "keygen", "--secret-key"])
            .arg(&vendor.secret_key)
            .arg("--public-key")
            .arg(&vendor.public_key)
            .env_remove("CHANGEOVER_SIGNING_PASSWORD")
            .stdin(Stdio::null())
            .output()
            .expect("keygen runs");
        assert!(
            output.status.success(),
            "keygen: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        vendor
    }

    /// Packs `tree` into `feed`; returns the archive path the command printed last.
    pub fn pack(&self, kind: &str, version: &str, tree: &Path, feed: &Path) -> PathBuf {
        archive_packed(self.pack_output(kind, version, tree, feed))
    }

    pub fn pack_output(
        &self,
        kind: &str,
        version: &str,
        tree: &Path,
        feed: &Path,
    ) -> std::process::Output {
        self.pack_command(kind, version, tree, feed)
            .output()
            .expect("pack runs")
    }

    /// Packs `tree` into `feed` as a release for `platform` (such as `windows-x86_64`);
    /// returns the archive path.
    pub fn pack_for(
        &self,
        kind: &str,
        version: &str,
        tree: &Path,
        feed: &Path,
        platform: &str,
    ) -> PathBuf {
        let output = self
            .pack_command(kind, version, tree, feed)
            .args(["--platform", platform])
            .output()
            .expect("pack runs");
        archive_packed(output)
    }

    fn pack_command(&self, kind: &str, version: &str, tree: &Path, feed: &Path) -> Command {
        let mut command = Command::new(binary("changeover-server"));
        command
            .args([
                "release",
                "pack",
                "--kind",
                kind,
                "--version",
                version,
                "--from",
            ])
            .arg(tree)
            .arg("--secret-key")
            .arg(&self.secret_key)
            .arg("--feed")
            .arg(feed)
            .args(["--notes", &format!("release {version}")])
            .stdin(Stdio::null());
        command
    }

    /// Signs `archive` as a package described by `entry` (a JSON object), writing
    /// `archive.minisig`: for hostile packages the release tools would never make.
    pub fn sign_as_package(&self, archive: &Path, entry: &serde_json::Value) {
        let text = std::fs::read_to_string(&self.secret_key).expect("secret key");
        let secret = minisign::SecretKeyBox::from_string(&text)
            .and_then(|key| key.into_unencrypted_secret_key())
            .expect("unencrypted test key");
        let signature = minisign::sign(
            None,
            &secret,
            std::fs::File::open(archive).expect("archive"),
            Some(&entry.to_string()),
            None,
        )
        .expect("signs");
        let mut path = archive.as_os_str().to_owned();
        path.push(".minisig");
        std::fs::write(PathBuf::from(path), signature.into_string()).expect("signature written");
    }
}

/// The archive a successful `release pack` printed last.
fn archive_packed(output: std::process::Output) -> PathBuf {
    assert!(
        output.status.success(),
        "pack: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    PathBuf::from(stdout.lines().last().expect("pack prints the archive path"))
}

/// A server release tree: the built server binary plus `extra` files.
pub fn server_tree(dir: &Path, extra: &[(&str, &[u8])]) -> PathBuf {
    std::fs::create_dir_all(dir.join("bin")).expect("tree");
    let target = dir.join("bin/changeover-server");
    std::fs::copy(binary("changeover-server"), &target).expect("binary copied");
    for (path, contents) in extra {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("folders");
        std::fs::write(file, contents).expect("extra file");
    }
    dir.to_owned()
}

/// A server release tree whose binary is a small script: for releases a test packs,
/// serves and verifies but never runs.
pub fn stub_server_tree(dir: &Path, version: &str, extra: &[(&str, &[u8])]) -> PathBuf {
    std::fs::create_dir_all(dir.join("bin")).expect("tree");
    let script = format!("#!/bin/sh\necho \"changeover-server {version} (stub)\"\n");
    std::fs::write(dir.join("bin/changeover-server"), script).expect("stub binary");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let executable = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(dir.join("bin/changeover-server"), executable).expect("chmod");
    }
    for (path, contents) in extra {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("folders");
        std::fs::write(file, contents).expect("extra file");
    }
    dir.to_owned()
}

/// A free port on loopback (bound and released; fine for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// A static file server for a feed folder.
#[derive(Debug)]
pub struct StaticServer {
    pub address: SocketAddr,
    pub process: Process,
    restart: Command,
    log: PathBuf,
}

impl StaticServer {
    /// Python's `http.server`: no `Range` support.
    pub fn python(feed: &Path, log_dir: &Path) -> StaticServer {
        let port = free_port();
        let mut command = Command::new("python3");
        command
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(feed);
        StaticServer::start(command, port, log_dir.join("http-server.log"))
    }

    /// nginx from the distribution, one unprivileged process, optionally rate-limited
    /// (`limit_rate`, such as `"2m"`) so a test can cut a transfer half-way.
    pub fn nginx(feed: &Path, work_dir: &Path, limit_rate: Option<&str>) -> StaticServer {
        let port = free_port();
        std::fs::create_dir_all(work_dir.join("tmp")).expect("nginx folder");
        let prefix = work_dir.display();
        let rate = limit_rate
            .map(|rate| format!("limit_rate {rate};"))
            .unwrap_or_default();
        let config = format!(
            "daemon off;\nmaster_process off;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log {prefix}/access.log;\n  client_body_temp_path {prefix}/tmp/body;\n\
               proxy_temp_path {prefix}/tmp/proxy;\n  fastcgi_temp_path {prefix}/tmp/fastcgi;\n\
               uwsgi_temp_path {prefix}/tmp/uwsgi;\n  scgi_temp_path {prefix}/tmp/scgi;\n\
               default_type application/octet-stream;\n  sendfile on;\n\
               server {{\n    listen 127.0.0.1:{port};\n    root {feed};\n    location / {{ {rate} }}\n  }}\n}}\n",
            feed = feed.display()
        );
        let config_file = work_dir.join("nginx.conf");
        std::fs::write(&config_file, config).expect("nginx config");
        let mut command = Command::new(nginx_binary());
        command.arg("-c").arg(&config_file).arg("-p").arg(work_dir);
        StaticServer::start(command, port, work_dir.join("nginx.out"))
    }

    fn start(mut command: Command, port: u16, log: PathBuf) -> StaticServer {
        let process = spawn_logged(&mut command, &log);
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until_listening(address, &process);
        StaticServer {
            address,
            process,
            restart: command,
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.address)
    }

    /// Kills the server outright, as a crash or a pulled cable would.
    pub fn kill(&mut self) {
        self.process.signal("KILL");
        self.process.wait_exit(Duration::from_secs(10));
    }

    /// Starts it again on the same port.
    pub fn start_again(&mut self) {
        self.process = spawn_logged(&mut self.restart, &self.log);
        wait_until_listening(self.address, &self.process);
    }
}

fn spawn_logged(command: &mut Command, log: &Path) -> Process {
    let log_file = std::fs::File::create(log).expect("log file");
    let child = command
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log file"))
        .stderr(log_file)
        .spawn()
        .expect("static server starts");
    Process {
        child,
        log: log.to_owned(),
    }
}

fn wait_until_listening(address: SocketAddr, process: &Process) {
    eventually(
        Duration::from_secs(15),
        "the static server to listen",
        || {
            TcpStream::connect_timeout(&address, Duration::from_millis(200))
                .ok()
                .map(drop)
                .or_else(|| {
                    // Show why if it died.
                    let log = process.log_text();
                    assert!(!log.contains("emerg"), "{log}");
                    None
                })
        },
    );
}

fn nginx_binary() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .expect("nginx is installed (.ci/run installs it from Debian's packages)")
}
