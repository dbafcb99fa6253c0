//! A server started as a child process for a measurement, killed when dropped.
//!
//! Both the changeover server and the raw baseline print `listening on ws://ADDR` on
//! stdout once bound; that line is how the address of a `--listen 127.0.0.1:0` server is
//! learnt. Their stderr (the log) goes to a file, so a chatty log can never block them on
//! a full pipe.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use tempfile::TempDir;

/// How long a server may take from start to its "listening on" line. The real server
/// hashes the admin password on first start, which takes a moment.
const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

/// The admin password the changeover server is started with.
pub const ADMIN_PASSWORD: &str = "loadgen-admin-password";

/// A running server: its address and its log. Dropping it kills the process and then
/// removes its temporary folder.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    /// What the server printed on its "listening on" line.
    pub address: SocketAddr,
    /// The server's stderr.
    pub log: PathBuf,
    /// The folder holding the log (and the product folder of the changeover server);
    /// declared last so it is removed after the process is gone.
    _folder: TempDir,
}

impl ServerProcess {
    /// `server_bin run --root DIR --listen 127.0.0.1:0`, in a fresh product folder whose
    /// config holds `config_toml`.
    pub async fn start_changeover(server_bin: &Path, config_toml: &str) -> anyhow::Result<Self> {
        let folder = tempfile::Builder::new()
            .prefix("changeover-loadgen-")
            .tempdir()
            .context("cannot create a temporary folder")?;
        let root = folder.path().join("product");
        let config_file = root.join("server/config/changeover.toml");
        let config_dir = config_file.parent().context("config path has no folder")?;
        std::fs::create_dir_all(config_dir)
            .with_context(|| format!("cannot create {}", config_dir.display()))?;
        std::fs::write(&config_file, config_toml)
            .with_context(|| format!("cannot write {}", config_file.display()))?;
        let mut command = Command::new(server_bin);
        command
            .arg("run")
            .arg("--root")
            .arg(&root)
            .args(["--listen", "127.0.0.1:0"])
            .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD);
        ServerProcess::start(command, folder).await
    }

    /// `server_bin run --root ROOT --listen 127.0.0.1:0` for a product folder that already
    /// exists (an installed release, `server_bin` normally `ROOT/server/bin/changeover-server`).
    /// The folder is left as it is; only the log goes to a temporary folder.
    pub async fn start_installed(server_bin: &Path, root: &Path) -> anyhow::Result<Self> {
        let folder = tempfile::Builder::new()
            .prefix("changeover-loadgen-log-")
            .tempdir()
            .context("cannot create a temporary folder")?;
        let mut command = Command::new(server_bin);
        command
            .arg("run")
            .arg("--root")
            .arg(root)
            .args(["--listen", "127.0.0.1:0"])
            .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD);
        ServerProcess::start(command, folder).await
    }

    /// As [`ServerProcess::start_installed`], on a given address (a restart on the same
    /// port), with extra environment, and logging at `info` without colours, so that
    /// [`crate::server_log`] can read the steps from the log.
    pub async fn start_installed_logging(
        server_bin: &Path,
        root: &Path,
        listen: SocketAddr,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let folder = tempfile::Builder::new()
            .prefix("changeover-loadgen-log-")
            .tempdir()
            .context("cannot create a temporary folder")?;
        let mut command = Command::new(server_bin);
        command
            .arg("run")
            .arg("--root")
            .arg(root)
            .arg("--listen")
            .arg(listen.to_string())
            .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied());
        ServerProcess::start(command, folder).await
    }

    /// `loadgen_bin raw-server --listen 127.0.0.1:0`.
    pub async fn start_raw(loadgen_bin: &Path) -> anyhow::Result<Self> {
        ServerProcess::start_raw_at(loadgen_bin, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// `loadgen_bin raw-server --listen ADDR`, logging its broadcasts (`broadcast sent`)
    /// at info without colours, so that [`crate::server_log`] can read them.
    pub async fn start_raw_at(loadgen_bin: &Path, listen: SocketAddr) -> anyhow::Result<Self> {
        let folder = tempfile::Builder::new()
            .prefix("changeover-loadgen-raw-")
            .tempdir()
            .context("cannot create a temporary folder")?;
        let mut command = Command::new(loadgen_bin);
        command
            .args(["raw-server", "--listen"])
            .arg(listen.to_string())
            .env("RUST_LOG", "warn,changeover_bench::raw_server=info")
            .env("NO_COLOR", "1");
        ServerProcess::start(command, folder).await
    }

    /// Sends `signal` and returns at once (SIGUSR1: the raw server's broadcast).
    pub fn signal(&self, signal: rustix::process::Signal) -> anyhow::Result<()> {
        let pid = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .context("the server has no valid process id")?;
        rustix::process::kill_process(pid, signal)
            .with_context(|| format!("cannot send {signal:?} to the server"))
    }

    async fn start(mut command: Command, folder: TempDir) -> anyhow::Result<Self> {
        let log = folder.path().join("server.log");
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        let stdout = child.stdout.take().context("the child has no stdout")?;
        // Guard the child before anything else can fail, so it never outlives an error.
        let mut process = ServerProcess {
            child,
            address: SocketAddr::from(([0, 0, 0, 0], 0)),
            log,
            _folder: folder,
        };

        let (address_tx, address_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            // Keep reading after the address so the child never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && let Some(address) = listening_address(&line) {
                    sent = address_tx.send(address).is_ok();
                }
            }
        });
        let waited =
            tokio::task::spawn_blocking(move || address_rx.recv_timeout(STARTUP_PATIENCE)).await?;
        match waited {
            Ok(address) => {
                process.address = address;
                Ok(process)
            }
            Err(_) => {
                let status = process.child.try_wait().ok().flatten();
                let log_text = std::fs::read_to_string(&process.log).unwrap_or_default();
                anyhow::bail!(
                    "{program} printed no \"listening on\" line within {} s (exit status: {}); its log:\n{}",
                    STARTUP_PATIENCE.as_secs(),
                    status.map_or("still running".to_owned(), |status| status.to_string()),
                    log_text.trim_end()
                )
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The URL agents connect to.
    pub fn url(&self) -> String {
        format!("ws://{}", self.address)
    }

    /// Sends `signal` (SIGTERM: a graceful stop; SIGKILL: a crash) and waits until the
    /// process has exited; it is killed if it takes longer than `patience`. Returns how
    /// long it took to exit.
    pub async fn stop_with(
        &mut self,
        signal: rustix::process::Signal,
        patience: Duration,
    ) -> anyhow::Result<Duration> {
        let started = std::time::Instant::now();
        let pid = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .context("the server has no valid process id")?;
        rustix::process::kill_process(pid, signal)
            .with_context(|| format!("cannot send {signal:?} to the server"))?;
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > patience {
                let _ = self.child.kill();
                let _ = self.child.wait();
                anyhow::bail!("the server did not exit within {patience:?} of {signal:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Lines of the log that contain `needle`.
    pub fn log_lines_containing(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(needle))
            .count()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address on a `listening on ws://ADDR` line.
pub fn listening_address(line: &str) -> Option<SocketAddr> {
    line.trim()
        .strip_prefix("listening on ws://")?
        .trim_end_matches('/')
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_the_address() {
        assert_eq!(
            listening_address("listening on ws://127.0.0.1:40123"),
            Some(SocketAddr::from(([127, 0, 0, 1], 40123)))
        );
        assert_eq!(listening_address("listening on wss://127.0.0.1:1"), None);
        assert_eq!(listening_address("generated admin password: x"), None);
    }
}
