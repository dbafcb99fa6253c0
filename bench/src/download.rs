//! `download`: how long the server takes to fetch and verify a large release from its feed,
//! against curl fetching the same file from the same web server in the same run.
//!
//! Everything is the real thing: a vendor key from `changeover-server release keygen`, two
//! release trees packed into a feed folder with `release pack` (1.0.0 holds only the
//! server binary; 2.0.0 also holds incompressible random data, so its archive is as large
//! as asked), the feed served by nginx on a loopback port, 1.0.0 installed into a fresh
//! product folder with `changeover-server install`, and the installed binary started with
//! `[feed] url` pointing at nginx. One repetition then times
//! `changeover-agent admin download --json` from its start until `package_ready`, reads
//! the server's CPU time and memory around it, and times `curl -s -o FILE URL` of the same
//! archive, `sync -d FILE` (the server ends with `fdatasync`, curl does not), and the
//! hashes of the copy the server computes while streaming: SHA-256 (`sha256sum`, and
//! `openssl dgst -sha256`, which uses the CPU's SHA extensions as the server's `sha2`
//! does) and BLAKE2b-512, the prehash of the minisign signature (`b2sum`).
//!
//! Each repetition installs into a fresh product folder and starts a fresh server, so every
//! download is a real one and `VmHWM`, which cannot be reset, is that server's own peak.

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use changeover_protocol::ServerMessage;
use changeover_protocol::release::{FeedManifest, MANIFEST_FILE, PackageEntry, ReleaseKind};
use changeover_server::layout::Layout;
use tokio::io::AsyncBufReadExt as _;

use crate::procfs::{self, CpuTime, Pid, ResidentSplit, SettlePolicy, SettledRss};
use crate::server_process::{ADMIN_PASSWORD, ServerProcess};

/// The version installed first, and the one downloaded.
pub(crate) const OLD_VERSION: &str = "1.0.0";
pub(crate) const NEW_VERSION: &str = "2.0.0";

/// How often the server's `VmRSS` is read while it downloads.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(20);

/// How long nginx may take to answer on its port.
const NGINX_PATIENCE: Duration = Duration::from_secs(10);

/// One megabyte as this benchmark counts it (throughput is in MB/s of 10^6 bytes).
const MB: u64 = 1_000_000;

/// What `download` was given.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// The release `changeover-server`: it packs and installs, and is the binary inside
    /// both releases.
    pub server_bin: PathBuf,
    /// `changeover-agent`, for `admin status` and `admin download`.
    pub agent_bin: PathBuf,
    pub nginx_bin: PathBuf,
    pub curl_bin: PathBuf,
    /// Random bytes in the newer release, in MB.
    pub payload_mb: u64,
    pub repetitions: usize,
    /// How long one `admin download` may take.
    pub patience: Duration,
    /// Keep the work folder (feed, nginx config and logs, product folders) for a look.
    pub keep: bool,
}

/// The timings and readings of one repetition.
#[derive(Debug, Clone)]
pub struct Repetition {
    pub archive_bytes: u64,
    /// `admin status`: process start, argon2 login, one request; the fixed cost that
    /// `request_to_ready` also pays.
    pub admin_status: Duration,
    /// From starting `admin download` until its `download_accepted` line: process start,
    /// login, manifest and signature fetched and checked.
    pub request_to_accepted: Duration,
    /// From starting `admin download` until its `package_ready` line.
    pub request_to_ready: Duration,
    /// From the `download_started` line until `package_ready`: transfer, hashing, the
    /// final `fdatasync` and rename.
    pub started_to_ready: Duration,
    pub server_rss_before: SettledRss,
    /// `VmRSS` right before the download request, after `admin status` (whose argon2
    /// login leaves its memory with the allocator).
    pub server_rss_at_request: u64,
    /// The largest `VmRSS` read while the download ran.
    pub server_rss_peak_sampled: u64,
    /// `VmHWM` before the download request and after `package_ready`.
    pub server_hwm_before: u64,
    pub server_hwm_after: u64,
    /// The server's CPU time from the request until `package_ready`.
    pub server_cpu: CpuTime,
    pub curl: Duration,
    /// `sync -d` of curl's copy, to compare with the server's closing `fdatasync`.
    pub curl_copy_fdatasync: Duration,
    /// coreutils' `sha256sum`: portable C without the SHA extensions, so slower than the
    /// server's SHA-256.
    pub sha256sum: Duration,
    /// `openssl dgst -sha256`, which like the server's `sha2` uses the SHA extensions when
    /// the CPU has them; `None` without an `openssl` binary.
    pub openssl_sha256: Option<Duration>,
    /// BLAKE2b-512, the hash minisign signs (the server's second hash of the same bytes).
    pub b2sum: Duration,
}

impl Repetition {
    /// Download + verify time over curl's time for the same file.
    pub fn ratio(&self) -> f64 {
        self.request_to_ready.as_secs_f64() / self.curl.as_secs_f64().max(1e-9)
    }
}

/// Builds the feed, serves it, runs every repetition and prints the results.
pub async fn run(options: &DownloadOptions) -> anyhow::Result<Vec<Repetition>> {
    anyhow::ensure!(options.repetitions > 0, "at least one repetition is needed");
    let work = tempfile::Builder::new()
        .prefix("changeover-loadgen-download-")
        .tempdir()
        .context("cannot create a temporary folder")?;
    // nginx started as root may switch to `nobody`; it must still read the feed.
    set_mode(work.path(), 0o755)?;
    println!("work folder {}", work.path().display());
    let result = run_in(options, work.path()).await;
    if options.keep {
        let kept = work.keep();
        println!("kept {}", kept.display());
    }
    result
}

async fn run_in(options: &DownloadOptions, work: &Path) -> anyhow::Result<Vec<Repetition>> {
    let feed = prepare_feed(&options.server_bin, options.payload_mb, work)?;
    println!(
        "feed {}: {} ({} bytes = {:.1} MB)",
        feed.dir.display(),
        feed.newer.archive,
        feed.newer.size,
        feed.newer.size as f64 / MB as f64
    );
    let nginx = Nginx::start(&options.nginx_bin, &feed.dir, &work.join("nginx"))?;
    let archive_url = format!("{}{}", nginx.url(), feed.newer.archive);
    let range_status = run_tool(Command::new(&options.curl_bin).args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-r",
        "0-99",
        &archive_url,
    ]))?;
    let range_status = String::from_utf8_lossy(&range_status.stdout).into_owned();
    anyhow::ensure!(
        range_status.trim() == "206",
        "nginx answered {range_status} to a Range request, not 206"
    );
    println!(
        "nginx {} serves the feed; a Range request gets 206",
        nginx.url()
    );

    let mut repetitions = Vec::new();
    for index in 1..=options.repetitions {
        let repetition = repeat_once(options, work, &feed, &nginx, &archive_url, index).await?;
        println!(
            "[run {index}] download+verify {:.2} s, curl {:.2} s, ratio {:.2}",
            repetition.request_to_ready.as_secs_f64(),
            repetition.curl.as_secs_f64(),
            repetition.ratio()
        );
        repetitions.push(repetition);
    }
    drop(nginx);
    println!();
    print!("{}", summary_table(&repetitions));
    Ok(repetitions)
}

/// The feed folder and what is in it.
#[derive(Debug, Clone)]
pub(crate) struct PreparedFeed {
    pub(crate) dir: PathBuf,
    pub(crate) public_key: PathBuf,
    pub(crate) older_archive: PathBuf,
    pub(crate) newer: PackageEntry,
}

/// A vendor key and a feed folder under `work` with server 1.0.0 (`server_bin` alone) and
/// 2.0.0 (`server_bin` and `payload_mb` MB of random data), readable by nginx.
pub(crate) fn prepare_feed(
    server_bin: &Path,
    payload_mb: u64,
    work: &Path,
) -> anyhow::Result<PreparedFeed> {
    let keys = work.join("keys");
    let public_key = keys.join("vendor.pub");
    let secret_key = keys.join("vendor.key");
    let feed_dir = work.join("feed");
    let mut keygen = Command::new(server_bin);
    keygen
        .args(["release", "keygen", "--secret-key"])
        .arg(&secret_key)
        .arg("--public-key")
        .arg(&public_key)
        .env_remove("CHANGEOVER_SIGNING_PASSWORD");
    run_tool(&mut keygen)?;

    for (version, payload_bytes) in [(OLD_VERSION, 0), (NEW_VERSION, payload_mb * MB)] {
        let tree = work.join("trees").join(version);
        let binary = tree.join(ReleaseKind::Server.binary_path());
        std::fs::create_dir_all(binary.parent().context("binary path has a folder")?)?;
        std::fs::copy(server_bin, &binary).with_context(|| {
            format!(
                "cannot copy {} to {}",
                server_bin.display(),
                binary.display()
            )
        })?;
        if payload_bytes > 0 {
            let blob = tree.join("data/blob.bin");
            write_random_file(&blob, payload_bytes)?;
        }
        let started = Instant::now();
        let mut pack = Command::new(server_bin);
        pack.args(["release", "pack", "--kind", "server", "--version", version])
            .arg("--from")
            .arg(&tree)
            .arg("--secret-key")
            .arg(&secret_key)
            .arg("--feed")
            .arg(&feed_dir)
            .env_remove("CHANGEOVER_SIGNING_PASSWORD");
        run_tool(&mut pack)?;
        println!(
            "packed server {version} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        // The tree is in the archive now; its copy of the payload is no longer needed.
        std::fs::remove_dir_all(&tree)
            .with_context(|| format!("cannot remove {}", tree.display()))?;
    }

    let manifest_path = feed_dir.join(MANIFEST_FILE);
    let manifest: FeedManifest = serde_json::from_slice(
        &std::fs::read(&manifest_path)
            .with_context(|| format!("cannot read {}", manifest_path.display()))?,
    )
    .with_context(|| format!("{} is not a feed manifest", manifest_path.display()))?;
    let entry = |version: &str| -> anyhow::Result<PackageEntry> {
        manifest
            .releases
            .iter()
            .find(|entry| entry.kind == ReleaseKind::Server && entry.version.to_string() == version)
            .cloned()
            .with_context(|| format!("the feed manifest has no server {version}"))
    };
    let older = entry(OLD_VERSION)?;
    let newer = entry(NEW_VERSION)?;
    for item in std::fs::read_dir(&feed_dir)? {
        set_mode(&item?.path(), 0o644)?;
    }
    set_mode(&feed_dir, 0o755)?;
    Ok(PreparedFeed {
        older_archive: feed_dir.join(&older.archive),
        dir: feed_dir,
        public_key,
        newer,
    })
}

async fn repeat_once(
    options: &DownloadOptions,
    work: &Path,
    feed: &PreparedFeed,
    nginx: &Nginx,
    archive_url: &str,
    index: usize,
) -> anyhow::Result<Repetition> {
    let label = format!("[run {index}]");
    let folder = work.join(format!("run-{index}"));
    let root = folder.join("product");
    std::fs::create_dir_all(&folder)?;
    let mut install = Command::new(&options.server_bin);
    install
        .arg("install")
        .arg("--root")
        .arg(&root)
        .arg("--package")
        .arg(&feed.older_archive)
        .arg("--public-key")
        .arg(&feed.public_key);
    run_tool(&mut install)?;
    let layout = Layout::new(&root);
    let config_file = layout.config_file();
    std::fs::write(&config_file, product_config(&nginx.url()))
        .with_context(|| format!("cannot write {}", config_file.display()))?;
    // Whatever earlier steps left dirty is written out before anything is timed.
    run_tool(&mut Command::new("sync"))?;

    let server_bin = layout.install_dir().join(ReleaseKind::Server.binary_path());
    let server = ServerProcess::start_installed(&server_bin, &root).await?;
    let pid = Pid::Other(server.pid());
    let gone = || format!("cannot read /proc/{} (server exited?)", server.pid());
    let server_rss_before = procfs::settled_resident_kib(pid, SettlePolicy::default())
        .await
        .with_context(gone)?;

    // One admin command first: it shows the fixed cost of an admin command, makes sure
    // the server sees the feed, and puts the login's argon2 memory into VmHWM before the
    // download starts.
    let status_started = Instant::now();
    let status = admin_command(&options.agent_bin, &server, &["status", "--json"])?;
    let admin_status = status_started.elapsed();
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).context("admin status printed no JSON")?;
    anyhow::ensure!(
        status["server_version"] == OLD_VERSION,
        "the installed server reports {} instead of {OLD_VERSION}",
        status["server_version"]
    );

    let server_rss_at_request = procfs::resident_kib(pid).with_context(gone)?;
    let server_hwm_before = procfs::peak_resident_kib(pid).with_context(gone)?;
    let cpu_start = procfs::cpu_time(pid).with_context(gone)?;
    let (stop_sampling, sampler) = sample_peak_rss(pid);
    let timeline = admin_download(&options.agent_bin, options.patience, &server, &folder).await;
    let server_cpu = procfs::cpu_time(pid).with_context(gone)?.since(cpu_start);
    let _ = stop_sampling.send(());
    let server_rss_peak = sampler.await.unwrap_or_default();
    let server_rss_peak_sampled = server_rss_peak.total_kib;
    let server_hwm_after = procfs::peak_resident_kib(pid).with_context(gone)?;
    let timeline = match timeline {
        Ok(timeline) => timeline,
        Err(err) => {
            let log = std::fs::read_to_string(&server.log).unwrap_or_default();
            return Err(err.context(format!("the server's log:\n{}", log.trim_end())));
        }
    };
    drop(server);
    let downloaded = layout.downloads_dir().join(&feed.newer.archive);
    let downloaded_bytes = std::fs::metadata(&downloaded)
        .with_context(|| format!("the download is not at {}", downloaded.display()))?
        .len();
    anyhow::ensure!(
        downloaded_bytes == feed.newer.size,
        "the download is {downloaded_bytes} bytes, the feed says {}",
        feed.newer.size
    );
    println!(
        "{label} server: RSS {} KiB settled, {} KiB at the request, peak {} KiB while downloading \
         ({} KiB anonymous, {} KiB files, {} threads), VmHWM {} → {} KiB, CPU {}",
        server_rss_before.kib,
        server_rss_at_request,
        server_rss_peak_sampled,
        server_rss_peak.anon_kib,
        server_rss_peak.file_kib,
        server_rss_peak.threads,
        server_hwm_before,
        server_hwm_after,
        server_cpu
    );
    std::fs::remove_dir_all(&root).with_context(|| format!("cannot remove {}", root.display()))?;
    run_tool(&mut Command::new("sync"))?;

    let copy = folder.join(&feed.newer.archive);
    let curl = timed(
        Command::new(&options.curl_bin)
            .args(["-s", "-o"])
            .arg(&copy)
            .arg(archive_url),
    )?;
    let copy_bytes = std::fs::metadata(&copy)
        .with_context(|| format!("curl wrote nothing to {}", copy.display()))?
        .len();
    anyhow::ensure!(
        copy_bytes == feed.newer.size,
        "curl fetched {copy_bytes} bytes, the feed says {}",
        feed.newer.size
    );
    let curl_copy_fdatasync = timed(Command::new("sync").arg("-d").arg(&copy))?;
    let sha256_started = Instant::now();
    let sha256 = run_tool(Command::new("sha256sum").arg(&copy))?;
    let sha256sum = sha256_started.elapsed();
    let sha256 = String::from_utf8_lossy(&sha256.stdout).into_owned();
    anyhow::ensure!(
        sha256.split_whitespace().next() == Some(feed.newer.sha256.as_str()),
        "curl's copy has SHA-256 {sha256}, the feed says {}",
        feed.newer.sha256
    );
    let openssl_sha256 = timed(Command::new("openssl").args(["dgst", "-sha256"]).arg(&copy)).ok();
    let b2sum = timed(Command::new("b2sum").arg(&copy))?;
    std::fs::remove_dir_all(&folder)
        .with_context(|| format!("cannot remove {}", folder.display()))?;

    Ok(Repetition {
        archive_bytes: feed.newer.size,
        admin_status,
        request_to_accepted: timeline.accepted,
        request_to_ready: timeline.ready,
        started_to_ready: timeline.ready.saturating_sub(timeline.started),
        server_rss_before,
        server_rss_at_request,
        server_rss_peak_sampled,
        server_hwm_before,
        server_hwm_after,
        server_cpu,
        curl,
        curl_copy_fdatasync,
        sha256sum,
        openssl_sha256,
        b2sum,
    })
}

/// The product's config: only where the feed is; everything else keeps its default.
pub fn product_config(feed_url: &str) -> String {
    format!(
        "# Written by changeover-loadgen download; every other key keeps its default.\n\
         [server]\n{}\
         [feed]\n\
         url = \"{feed_url}\"\n",
        crate::fleet::ONE_ADDRESS_FLEET_KEYS
    )
}

/// When the lines of `admin download --json` arrived, counted from its start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeline {
    pub(crate) accepted: Duration,
    pub(crate) started: Duration,
    pub(crate) ready: Duration,
}

/// `agent_bin admin ARGS[0] --server URL ARGS[1..]` with the admin password, to its end.
pub(crate) fn admin_command(
    agent_bin: &Path,
    server: &ServerProcess,
    args: &[&str],
) -> anyhow::Result<std::process::Output> {
    let mut command = Command::new(agent_bin);
    command
        .arg("admin")
        .arg(args[0])
        .args(["--server", &server.url()])
        .args(&args[1..])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD);
    run_tool(&mut command)
}

/// Runs `admin download --json` until `package_ready`; a fresh download is required.
pub(crate) async fn admin_download(
    agent_bin: &Path,
    patience: Duration,
    server: &ServerProcess,
    folder: &Path,
) -> anyhow::Result<Timeline> {
    let stderr_path = folder.join("admin-download.stderr");
    let stderr = std::fs::File::create(&stderr_path)
        .with_context(|| format!("cannot create {}", stderr_path.display()))?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(agent_bin)
        .args(["admin", "download", "--server", &server.url(), "--json"])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", agent_bin.display()))?;
    let stdout = child.stdout.take().context("the agent has no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut accepted = None;
    let mut download_started = None;
    let follow = async {
        while let Some(line) = lines.next_line().await? {
            let at = started.elapsed();
            let message: ServerMessage = serde_json::from_str(&line)
                .with_context(|| format!("admin download printed {line:?}"))?;
            match message {
                ServerMessage::DownloadAccepted { .. } => accepted = accepted.or(Some(at)),
                ServerMessage::DownloadStarted { resumed_from, .. } => {
                    anyhow::ensure!(
                        resumed_from == 0,
                        "the download resumed at {resumed_from}: not a fresh download"
                    );
                    download_started = download_started.or(Some(at));
                }
                ServerMessage::PackageReady { .. } => return Ok(at),
                ServerMessage::PackageRefused { .. } | ServerMessage::Error { .. } => {
                    bail!("the download failed: {line}")
                }
                _ => {}
            }
        }
        bail!("admin download ended without package_ready")
    };
    let ready = match tokio::time::timeout(patience, follow).await {
        Ok(Ok(ready)) => ready,
        Ok(Err(err)) => {
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            return Err(err.context(format!("admin download's stderr: {}", stderr.trim_end())));
        }
        Err(_elapsed) => bail!("no package_ready within {} s", patience.as_secs()),
    };
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .context("admin download did not exit after package_ready")??;
    anyhow::ensure!(status.success(), "admin download exited with {status}");
    Ok(Timeline {
        accepted: accepted.context("no download_accepted line")?,
        started: download_started.context("no download_started line")?,
        ready,
    })
}

// Reads the resident memory every RSS_SAMPLE_INTERVAL until told to stop; returns the
// reading with the largest VmRSS.
fn sample_peak_rss(
    pid: Pid,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<ResidentSplit>,
) {
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut peak = ResidentSplit::default();
        let mut interval = tokio::time::interval(RSS_SAMPLE_INTERVAL);
        loop {
            tokio::select! {
                _ = &mut stop_rx => return peak,
                _ = interval.tick() => {
                    if let Ok(reading) = procfs::resident_split(pid)
                        && reading.total_kib > peak.total_kib
                    {
                        peak = reading;
                    }
                }
            }
        }
    });
    (stop_tx, sampler)
}

/// nginx serving one folder on a loopback port, in the foreground, killed when dropped.
#[derive(Debug)]
pub(crate) struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    pub(crate) fn start(nginx_bin: &Path, root: &Path, prefix: &Path) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(prefix.join("temp"))
            .with_context(|| format!("cannot create {}", prefix.display()))?;
        let port = free_port()?;
        let config = prefix.join("nginx.conf");
        std::fs::write(&config, nginx_config(prefix, root, port))
            .with_context(|| format!("cannot write {}", config.display()))?;
        let error_log = prefix.join("error.log");
        let child = Command::new(nginx_bin)
            .arg("-c")
            .arg(&config)
            .arg("-p")
            .arg(prefix)
            // Before it reads the config nginx logs to its built-in path; not here.
            .arg("-e")
            .arg(&error_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (Debian: apt-get install nginx)",
                    nginx_bin.display()
                )
            })?;
        let mut nginx = Nginx { child, port };
        let started = Instant::now();
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        while TcpStream::connect(address).is_err() {
            if let Some(status) = nginx.child.try_wait()? {
                bail!(
                    "nginx exited with {status}; {}:\n{}",
                    error_log.display(),
                    std::fs::read_to_string(&error_log).unwrap_or_default()
                );
            }
            if started.elapsed() > NGINX_PATIENCE {
                bail!("nginx did not listen on {address} within {NGINX_PATIENCE:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An nginx configuration that serves `root` as static files on `127.0.0.1:port`: one
/// process in the foreground (so killing it leaves nothing behind), every file it writes
/// under `prefix`, `sendfile` as a production host would have it.
pub fn nginx_config(prefix: &Path, root: &Path, port: u16) -> String {
    let prefix = prefix.display();
    let root = root.display();
    format!(
        "# Written by changeover-loadgen download.\n\
         daemon off;\n\
         master_process off;\n\
         worker_processes 1;\n\
         pid {prefix}/nginx.pid;\n\
         error_log {prefix}/error.log warn;\n\
         events {{\n    worker_connections 64;\n}}\n\
         http {{\n\
         \x20   access_log {prefix}/access.log;\n\
         \x20   client_body_temp_path {prefix}/temp/client_body;\n\
         \x20   proxy_temp_path {prefix}/temp/proxy;\n\
         \x20   fastcgi_temp_path {prefix}/temp/fastcgi;\n\
         \x20   uwsgi_temp_path {prefix}/temp/uwsgi;\n\
         \x20   scgi_temp_path {prefix}/temp/scgi;\n\
         \x20   default_type application/octet-stream;\n\
         \x20   sendfile on;\n\
         \x20   tcp_nopush on;\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{port};\n\
         \x20       root {root};\n\
         \x20   }}\n\
         }}\n"
    )
}

// A port that was free a moment ago; nginx binds it right after.
fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

fn write_random_file(path: &Path, bytes: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().context("file path has a folder")?)?;
    let mut random = std::fs::File::open("/dev/urandom")
        .context("cannot open /dev/urandom")?
        .take(bytes);
    let mut file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let copied = std::io::copy(&mut random, &mut file)
        .with_context(|| format!("cannot write {}", path.display()))?;
    anyhow::ensure!(
        copied == bytes,
        "/dev/urandom gave {copied} of {bytes} bytes"
    );
    Ok(())
}

pub(crate) fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot change the mode of {}", path.display()))
}

/// Runs a command to its end; a failure carries its stderr.
pub(crate) fn run_tool(command: &mut Command) -> anyhow::Result<std::process::Output> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    Ok(output)
}

/// Runs a command to its end and says how long it took.
pub(crate) fn timed(command: &mut Command) -> anyhow::Result<Duration> {
    let started = Instant::now();
    run_tool(command)?;
    Ok(started.elapsed())
}

fn median_by(repetitions: &[Repetition], value: impl Fn(&Repetition) -> f64) -> f64 {
    let mut values: Vec<f64> = repetitions.iter().map(value).collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The repetitions and their medians as Markdown, ready for BENCHMARKS.md.
pub fn summary_table(repetitions: &[Repetition]) -> String {
    type Column = (&'static str, fn(&Repetition) -> f64, fn(f64) -> String);
    // NaN: not measured (no openssl).
    let seconds: fn(f64) -> String = |value| {
        if value.is_nan() {
            "–".to_owned()
        } else {
            format!("{value:.2} s")
        }
    };
    let mib: fn(f64) -> String = |value| format!("{:.1} MiB", value / 1024.0);
    let columns: [Column; 16] = [
        (
            "download+verify",
            |r| r.request_to_ready.as_secs_f64(),
            seconds,
        ),
        (
            "of it started→ready",
            |r| r.started_to_ready.as_secs_f64(),
            seconds,
        ),
        ("curl", |r| r.curl.as_secs_f64(), seconds),
        ("ratio", Repetition::ratio, |value| format!("{value:.2}")),
        (
            "download MB/s",
            |r| throughput(r, r.request_to_ready),
            |value| format!("{value:.0}"),
        ),
        (
            "curl MB/s",
            |r| throughput(r, r.curl),
            |value| format!("{value:.0}"),
        ),
        ("server RSS before", |r| r.server_rss_before.kib as f64, mib),
        (
            "server RSS at request",
            |r| r.server_rss_at_request as f64,
            mib,
        ),
        (
            "server peak RSS (sampled)",
            |r| r.server_rss_peak_sampled as f64,
            mib,
        ),
        ("server VmHWM", |r| r.server_hwm_after as f64, mib),
        (
            "server CPU user",
            |r| r.server_cpu.user.as_secs_f64(),
            seconds,
        ),
        (
            "server CPU system",
            |r| r.server_cpu.system.as_secs_f64(),
            seconds,
        ),
        ("sha256sum", |r| r.sha256sum.as_secs_f64(), seconds),
        (
            "openssl sha256",
            |r| r.openssl_sha256.map_or(f64::NAN, |time| time.as_secs_f64()),
            seconds,
        ),
        ("b2sum", |r| r.b2sum.as_secs_f64(), seconds),
        (
            "fdatasync of curl's copy",
            |r| r.curl_copy_fdatasync.as_secs_f64(),
            seconds,
        ),
    ];
    let mut table = String::from("| run |");
    for (name, _, _) in &columns {
        table.push_str(&format!(" {name} |"));
    }
    table.push_str("\n|---|");
    table.push_str(&"---:|".repeat(columns.len()));
    table.push('\n');
    for (index, repetition) in repetitions.iter().enumerate() {
        table.push_str(&format!("| {} |", index + 1));
        for (_, value, show) in &columns {
            table.push_str(&format!(" {} |", show(value(repetition))));
        }
        table.push('\n');
    }
    table.push_str("| **median** |");
    for (_, value, show) in &columns {
        table.push_str(&format!(" **{}** |", show(median_by(repetitions, value))));
    }
    table.push('\n');
    if let Some(first) = repetitions.first() {
        table.push_str(&format!(
            "\narchive {} bytes; admin status (process start + login + one request) median {:.2} s; \
             request → download_accepted median {:.2} s; \
             VmHWM before the request median {:.1} MiB\n",
            first.archive_bytes,
            median_by(repetitions, |r| r.admin_status.as_secs_f64()),
            median_by(repetitions, |r| r.request_to_accepted.as_secs_f64()),
            median_by(repetitions, |r| r.server_hwm_before as f64) / 1024.0,
        ));
    }
    table
}

fn throughput(repetition: &Repetition, time: Duration) -> f64 {
    repetition.archive_bytes as f64 / MB as f64 / time.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nginx_config_keeps_everything_under_its_prefix() {
        let config = nginx_config(Path::new("/w/nginx"), Path::new("/w/feed"), 40123);
        assert!(config.contains("daemon off;"));
        assert!(config.contains("sendfile on;"));
        assert!(config.contains("listen 127.0.0.1:40123;"));
        assert!(config.contains("root /w/feed;"));
        for line in config.lines().filter(|line| line.contains("/w/")) {
            assert!(
                line.contains("/w/nginx/") || line.contains("root /w/feed"),
                "{line}"
            );
        }
        assert_eq!(config.matches('{').count(), config.matches('}').count());
    }

    #[test]
    fn the_product_config_names_only_the_feed() {
        let (config, unknown) =
            changeover_server::config::Config::parse(&product_config("http://127.0.0.1:9/"))
                .unwrap();
        assert!(unknown.is_empty());
        assert_eq!(config.feed.url.as_deref(), Some("http://127.0.0.1:9/"));
    }

    fn repetition(seconds: f64) -> Repetition {
        Repetition {
            archive_bytes: 200 * MB,
            admin_status: Duration::ZERO,
            request_to_accepted: Duration::ZERO,
            request_to_ready: Duration::from_secs_f64(seconds),
            started_to_ready: Duration::ZERO,
            server_rss_before: SettledRss {
                kib: 0,
                settled: true,
                waited: Duration::ZERO,
            },
            server_rss_at_request: 0,
            server_rss_peak_sampled: 0,
            server_hwm_before: 0,
            server_hwm_after: 0,
            server_cpu: CpuTime::default(),
            curl: Duration::from_secs(1),
            curl_copy_fdatasync: Duration::ZERO,
            sha256sum: Duration::ZERO,
            openssl_sha256: None,
            b2sum: Duration::ZERO,
        }
    }

    #[test]
    fn medians_take_the_middle_value() {
        let runs = [repetition(3.0), repetition(1.0), repetition(2.0)];
        assert_eq!(median_by(&runs, Repetition::ratio), 2.0);
        assert_eq!(median_by(&runs[..2], Repetition::ratio), 2.0);
        let table = summary_table(&runs);
        assert!(table.contains("| **median** | **2.00 s** |"), "{table}");
        assert!(table.contains("| 3 | 2.00 s |"), "{table}");
    }
}
