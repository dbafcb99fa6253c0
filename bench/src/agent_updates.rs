//! `agent-updates`: many agents fetching the agent update from the server at once, against
//! the same clients fetching the same file from a bare tokio server in the same run.
//!
//! The setup is the real thing without a changeover: a vendor key from
//! `changeover-server release keygen`, a server release V (the server binary alone) and an
//! agent release V (`bin/changeover-agent` plus incompressible random data) packed with
//! `release pack`, V installed with `changeover-server install`, the agent archive and its
//! `.minisig` copied into `state/downloads/`, where the installed server finds, verifies and
//! offers it at start-up, with `[agent_updates] max_transfers` set in its config.
//!
//! The clients live in this process: one `GET /agent-updates/<archive>` each, all at once,
//! as a fleet right after a changeover. A `503` is honoured exactly as
//! `client-agent/src/self_update.rs` does: `Retry-After` seconds (5 if absent, 1 to 300)
//! plus a random 0 to as much again, then the request once more. The body is counted and
//! thrown away (the agent writes and syncs it to disk; this measures the server and the
//! wire, not the agents' disks), and hashed with SHA-256 unless `Check::Size` asks only
//! for the size. A broken transfer starts over after the agent's pause (the agent would
//! resume with `Range`); none is expected on loopback, and the count is reported.
//!
//! Baselines, same clients, same file, same run ([`crate::raw_file_server`] in a child
//! process): no cap (what loopback and this machine's two cores allow), the same cap as
//! the server but as an ideal queue (a waiting client is served the moment a slot is free),
//! and a single stream.
//!
//! Not measured: the agents' WebSocket sessions, the offer, the verification and the
//! self-replacement; only the downloads.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use changeover_protocol::release::{FeedManifest, MANIFEST_FILE, PackageEntry, ReleaseKind};
use changeover_server::layout::Layout;
use sha2::Digest as _;

use crate::download::run_tool;
use crate::procfs::{self, CpuTime, Pid, SettlePolicy};
use crate::server_process::ServerProcess;

/// The version of both releases: the server offers the agent release of its own version.
pub const VERSION: &str = "1.0.0";

/// One megabyte as this benchmark counts it (10^6 bytes).
pub const MB: u64 = 1_000_000;

/// How often the load generator notes the transfers in flight and the server's memory.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(20);

/// How long the server may take to offer the archive after it started.
const OFFER_PATIENCE: Duration = Duration::from_secs(60);

/// As the agent: give up after this many broken transfers.
const MAX_ATTEMPTS: u32 = 8;

/// Slices of a run in the timeline printed for each server run.
const TIMELINE_SLICES: usize = 10;

/// How each client checks what it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Check {
    /// SHA-256 of every byte, against the signed entry's hash.
    Sha256,
    /// The byte count only.
    Size,
}

/// What `agent-updates` was given.
#[derive(Debug, Clone)]
pub struct AgentUpdatesOptions {
    /// The release `changeover-server`: packs, installs, and is the server release.
    pub server_bin: PathBuf,
    /// The file put into the agent release as `bin/changeover-agent`.
    pub agent_bin: PathBuf,
    /// `changeover-loadgen` itself, for the `raw-file-server` baseline.
    pub loadgen_bin: PathBuf,
    pub agents: usize,
    /// Random bytes in the agent release, in kB (10^3 bytes): the CLI takes MB.
    pub payload_kb: u64,
    /// One server run per value.
    pub max_transfers: Vec<usize>,
    pub check: Check,
    /// Sequential fetches of the single-stream baseline.
    pub single_stream_fetches: usize,
    /// How long one fleet may take.
    pub patience: Duration,
    /// Keep the work folder (releases, server logs) instead of removing it.
    pub keep: bool,
}

/// What a fleet saw, from the clients' side.
#[derive(Debug, Clone)]
pub struct FleetResult {
    pub agents: usize,
    pub archive_bytes: u64,
    /// From the first request until the last client had the whole file.
    pub total: Duration,
    pub first_done: Duration,
    pub median_done: Duration,
    /// Bytes received, all clients.
    pub bytes: u64,
    /// `503` answers, all clients.
    pub rejections: u64,
    pub max_rejections_per_agent: u32,
    pub broken: u64,
    /// One transfer, from its `200` to its last byte.
    pub transfer_median: Duration,
    pub transfer_max: Duration,
    pub retry_after_max: u64,
    /// Transfers in flight, averaged over the run, and the most at once.
    pub mean_active: f64,
    pub peak_active: usize,
    pub loadgen_cpu: CpuTime,
    pub timeline: Vec<Slice>,
}

impl FleetResult {
    /// Bytes per second over the whole run.
    pub fn throughput(&self) -> f64 {
        self.bytes as f64 / self.total.as_secs_f64().max(1e-9)
    }
}

/// One tenth of a run.
#[derive(Debug, Clone, Default)]
pub struct Slice {
    pub from: Duration,
    pub to: Duration,
    pub mean_active: f64,
    pub rejections: u64,
    pub mean_retry_after: f64,
    pub completed: usize,
}

/// The serving process's readings around a fleet.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerReadings {
    /// `VmRSS` once settled, before the fleet.
    pub rss_before_kib: u64,
    /// The largest `VmRSS` read every 20 ms during the fleet.
    pub rss_peak_kib: u64,
    pub hwm_before_kib: u64,
    pub hwm_after_kib: u64,
    pub threads_peak: u64,
    pub cpu: CpuTime,
}

/// One fleet against one server.
#[derive(Debug, Clone)]
pub struct Run {
    pub label: String,
    /// The cap: the server's `max_transfers`, the raw queue's slots, 0 for none.
    pub max_transfers: usize,
    pub fleet: FleetResult,
    pub server: ServerReadings,
}

/// Everything one invocation measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub archive_bytes: u64,
    pub single_stream: f64,
    pub raw_uncapped: Run,
    /// Per cap: the changeover server, then the raw queue with the same cap.
    pub capped: Vec<(Run, Run)>,
}

/// Packs the releases, runs every baseline and server run, prints the results.
pub async fn run(options: &AgentUpdatesOptions) -> anyhow::Result<Report> {
    anyhow::ensure!(options.agents > 0, "at least one agent is needed");
    anyhow::ensure!(
        options.max_transfers.iter().all(|&cap| cap > 0),
        "max_transfers must be at least 1"
    );
    let work = tempfile::Builder::new()
        .prefix("changeover-loadgen-agent-updates-")
        .tempdir()
        .context("cannot create a temporary folder")?;
    println!("work folder {}", work.path().display());
    let result = run_in(options, work.path()).await;
    if options.keep {
        let kept = work.keep();
        println!("kept {}", kept.display());
    }
    result
}

async fn run_in(options: &AgentUpdatesOptions, work: &Path) -> anyhow::Result<Report> {
    let releases = prepare_releases(options, work)?;
    let archive_bytes = releases.agent.size;
    println!(
        "agent release {}: {} bytes ({:.1} MB), sha256 {}",
        releases.agent.archive,
        archive_bytes,
        archive_bytes as f64 / MB as f64,
        releases.agent.sha256
    );

    let single_stream = {
        let raw = RawFileServer::start(&options.loadgen_bin, &releases.agent_archive, 0)?;
        let target = Target::new(raw.url(&releases.agent.archive)?, &releases.agent);
        let started = Instant::now();
        let client = http_client()?;
        let mut bytes = 0;
        for _ in 0..options.single_stream_fetches.max(1) {
            bytes += fetch_once(&client, &target, options.check).await?;
        }
        bytes as f64 / started.elapsed().as_secs_f64()
    };
    println!(
        "single stream from the raw server: {:.0} MB/s ({} fetches, check {:?})",
        single_stream / MB as f64,
        options.single_stream_fetches.max(1),
        options.check
    );

    let raw_uncapped = raw_run(options, &releases, 0).await?;
    println!("{}", one_line(&raw_uncapped, None));

    let mut capped = Vec::new();
    for &cap in &options.max_transfers {
        let server = server_run(options, &releases, work, cap).await?;
        println!("{}", one_line(&server, Some(&raw_uncapped)));
        print!("{}", timeline_table(&server));
        let raw = raw_run(options, &releases, cap).await?;
        println!("{}", one_line(&raw, Some(&raw_uncapped)));
        capped.push((server, raw));
    }
    let report = Report {
        archive_bytes,
        single_stream,
        raw_uncapped,
        capped,
    };
    println!();
    print!("{}", summary_table(&report));
    Ok(report)
}

/// The key, the two archives and the agent release's signed entry.
#[derive(Debug)]
struct Releases {
    public_key: PathBuf,
    server_archive: PathBuf,
    agent_archive: PathBuf,
    agent: PackageEntry,
}

fn prepare_releases(options: &AgentUpdatesOptions, work: &Path) -> anyhow::Result<Releases> {
    let keys = work.join("keys");
    let public_key = keys.join("vendor.pub");
    let secret_key = keys.join("vendor.key");
    let feed = work.join("feed");
    run_tool(
        Command::new(&options.server_bin)
            .args(["release", "keygen", "--secret-key"])
            .arg(&secret_key)
            .arg("--public-key")
            .arg(&public_key)
            .env_remove("CHANGEOVER_SIGNING_PASSWORD"),
    )?;
    for kind in [ReleaseKind::Server, ReleaseKind::Agent] {
        let (name, binary_source, payload_bytes) = match kind {
            ReleaseKind::Server => ("server", &options.server_bin, 0),
            ReleaseKind::Agent => ("agent", &options.agent_bin, options.payload_kb * 1000),
        };
        let tree = work.join("trees").join(name);
        let binary = tree.join(kind.binary_path());
        std::fs::create_dir_all(binary.parent().context("binary path has a folder")?)?;
        std::fs::copy(binary_source, &binary).with_context(|| {
            format!(
                "cannot copy {} to {}",
                binary_source.display(),
                binary.display()
            )
        })?;
        if payload_bytes > 0 {
            write_random_file(&tree.join("share/payload.bin"), payload_bytes)?;
        }
        let started = Instant::now();
        run_tool(
            Command::new(&options.server_bin)
                .args(["release", "pack", "--kind", name, "--version", VERSION])
                .arg("--from")
                .arg(&tree)
                .arg("--secret-key")
                .arg(&secret_key)
                .arg("--feed")
                .arg(&feed)
                .env_remove("CHANGEOVER_SIGNING_PASSWORD"),
        )?;
        println!(
            "packed {name} {VERSION} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        std::fs::remove_dir_all(&tree)
            .with_context(|| format!("cannot remove {}", tree.display()))?;
    }
    let manifest_path = feed.join(MANIFEST_FILE);
    let manifest: FeedManifest = serde_json::from_slice(
        &std::fs::read(&manifest_path)
            .with_context(|| format!("cannot read {}", manifest_path.display()))?,
    )
    .with_context(|| format!("{} is not a feed manifest", manifest_path.display()))?;
    let entry = |kind: ReleaseKind| -> anyhow::Result<PackageEntry> {
        manifest
            .releases
            .iter()
            .find(|entry| entry.kind == kind)
            .cloned()
            .with_context(|| format!("the feed manifest has no {kind:?} release"))
    };
    let server = entry(ReleaseKind::Server)?;
    let agent = entry(ReleaseKind::Agent)?;
    Ok(Releases {
        public_key,
        server_archive: feed.join(&server.archive),
        agent_archive: feed.join(&agent.archive),
        agent,
    })
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

/// The server's config for one run: only the cap.
pub fn product_config(max_transfers: usize) -> String {
    format!(
        "# Written by changeover-loadgen agent-updates; every other key keeps its default.\n\
         [server]\n{}\
         [agent_updates]\n\
         max_transfers = {max_transfers}\n",
        crate::fleet::ONE_ADDRESS_FLEET_KEYS
    )
}

// Installs V into a fresh product folder, puts the agent release into its downloads,
// starts the installed server, and runs the fleet against it.
async fn server_run(
    options: &AgentUpdatesOptions,
    releases: &Releases,
    work: &Path,
    cap: usize,
) -> anyhow::Result<Run> {
    let root = work.join(format!("product-{cap}"));
    run_tool(
        Command::new(&options.server_bin)
            .arg("install")
            .arg("--root")
            .arg(&root)
            .arg("--package")
            .arg(&releases.server_archive)
            .arg("--public-key")
            .arg(&releases.public_key),
    )?;
    let layout = Layout::new(&root);
    let config_file = layout.config_file();
    std::fs::write(&config_file, product_config(cap))
        .with_context(|| format!("cannot write {}", config_file.display()))?;
    let downloads = layout.downloads_dir();
    std::fs::create_dir_all(&downloads)
        .with_context(|| format!("cannot create {}", downloads.display()))?;
    let signature = changeover_protocol::package::signature_path(&releases.agent_archive);
    for file in [&releases.agent_archive, &signature] {
        let name = file.file_name().context("archive has a name")?;
        std::fs::copy(file, downloads.join(name))
            .with_context(|| format!("cannot copy {} into the downloads", file.display()))?;
    }
    run_tool(&mut Command::new("sync"))?;

    let server_bin = layout.install_dir().join(ReleaseKind::Server.binary_path());
    let server = ServerProcess::start_installed(&server_bin, &root).await?;
    let url = reqwest::Url::parse(&format!(
        "http://{}{}{}",
        server.address,
        changeover_server::agent_updates::PATH_PREFIX,
        releases.agent.archive
    ))?;
    let target = Target::new(url, &releases.agent);
    let outcome = async {
        wait_for_offer(&target).await?;
        measure(options, &target, server.pid()).await
    }
    .await;
    let run = match outcome {
        Ok((fleet, readings)) => Run {
            label: "changeover-server".to_owned(),
            max_transfers: cap,
            fleet,
            server: readings,
        },
        Err(err) => {
            let log = std::fs::read_to_string(&server.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(err.context(format!("the server's log ends:\n{}", tail.join("\n"))));
        }
    };
    let warnings = server.log_lines_containing("WARN") + server.log_lines_containing("ERROR");
    if warnings > 0 {
        println!("(server log: {warnings} WARN/ERROR lines)");
    }
    if options.keep {
        let kept = work.join(format!("server-{cap}.log"));
        let _ = std::fs::copy(&server.log, kept);
    }
    drop(server);
    std::fs::remove_dir_all(&root).with_context(|| format!("cannot remove {}", root.display()))?;
    Ok(run)
}

// The server verifies the archive at start-up and offers it once it is ready: a HEAD
// (which takes no transfer slot) answers 200 from then on. No admin login, whose argon2
// memory would land in the server's peak.
async fn wait_for_offer(target: &Target) -> anyhow::Result<()> {
    let client = http_client()?;
    let started = Instant::now();
    loop {
        let status = client
            .head(target.url.clone())
            .send()
            .await
            .map(|r| r.status());
        match status {
            Ok(status) if status == reqwest::StatusCode::OK => return Ok(()),
            _ if started.elapsed() > OFFER_PATIENCE => {
                bail!(
                    "the server did not offer {} within {} s (last answer: {status:?})",
                    target.url,
                    OFFER_PATIENCE.as_secs()
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn raw_run(
    options: &AgentUpdatesOptions,
    releases: &Releases,
    cap: usize,
) -> anyhow::Result<Run> {
    let raw = RawFileServer::start(&options.loadgen_bin, &releases.agent_archive, cap)?;
    let target = Target::new(raw.url(&releases.agent.archive)?, &releases.agent);
    let (fleet, readings) = measure(options, &target, raw.pid()).await?;
    Ok(Run {
        label: if cap == 0 {
            "raw, no cap".to_owned()
        } else {
            "raw, queue".to_owned()
        },
        max_transfers: cap,
        fleet,
        server: readings,
    })
}

// The serving process's memory and CPU around one fleet.
async fn measure(
    options: &AgentUpdatesOptions,
    target: &Target,
    pid: u32,
) -> anyhow::Result<(FleetResult, ServerReadings)> {
    let pid = Pid::Other(pid);
    let gone = || "cannot read the serving process's /proc (exited?)".to_owned();
    let settled = procfs::settled_resident_kib(pid, SettlePolicy::default())
        .await
        .with_context(gone)?;
    let hwm_before_kib = procfs::peak_resident_kib(pid).with_context(gone)?;
    let cpu_before = procfs::cpu_time(pid).with_context(gone)?;
    let fleet = fetch_fleet(
        target,
        options.agents,
        options.check,
        Some(pid),
        options.patience,
    );
    let (fleet, peak) = fleet.await?;
    let cpu = procfs::cpu_time(pid).with_context(gone)?.since(cpu_before);
    let hwm_after_kib = procfs::peak_resident_kib(pid).with_context(gone)?;
    Ok((
        fleet,
        ServerReadings {
            rss_before_kib: settled.kib,
            rss_peak_kib: peak.total_kib,
            hwm_before_kib,
            hwm_after_kib,
            threads_peak: peak.threads,
            cpu,
        },
    ))
}

/// What the clients fetch and what it must be.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: reqwest::Url,
    pub size: u64,
    pub sha256: String,
}

impl Target {
    pub fn new(url: reqwest::Url, entry: &PackageEntry) -> Target {
        Target {
            url,
            size: entry.size,
            sha256: entry.sha256.clone(),
        }
    }
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        // Every answer ends with `Connection: close`; nothing to keep.
        .pool_max_idle_per_host(0)
        .build()
        .context("cannot build the HTTP client")
}

// What the fleet's clients share: the transfers in flight and every 503 seen.
#[derive(Debug, Default)]
struct Shared {
    active: AtomicUsize,
    /// (when, Retry-After seconds) of every 503.
    rejections: Mutex<Vec<(Duration, u64)>>,
}

#[derive(Debug, Clone, Copy)]
struct AgentRecord {
    done_at: Duration,
    transfer: Duration,
    rejections: u32,
    broken: u32,
    bytes: u64,
}

/// Runs `agents` clients at once against `target` until each has the whole file; samples
/// the transfers in flight and, with `server`, that process's memory.
pub async fn fetch_fleet(
    target: &Target,
    agents: usize,
    check: Check,
    server: Option<Pid>,
    patience: Duration,
) -> anyhow::Result<(FleetResult, procfs::ResidentSplit)> {
    let client = http_client()?;
    let shared = Arc::new(Shared::default());
    let target = Arc::new(target.clone());
    let cpu_before = procfs::cpu_time(Pid::Myself)?;
    let started = Instant::now();

    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut peak = procfs::ResidentSplit::default();
            let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    _ = ticks.tick() => {}
                }
                samples.push((started.elapsed(), shared.active.load(Ordering::Relaxed)));
                if let Some(pid) = server
                    && let Ok(split) = procfs::resident_split(pid)
                    && split.total_kib > peak.total_kib
                {
                    peak = split;
                }
            }
            (samples, peak)
        })
    };

    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..agents {
        let client = client.clone();
        let target = Arc::clone(&target);
        let shared = Arc::clone(&shared);
        clients.spawn(async move { one_agent(&client, &target, check, &shared, started).await });
    }
    let mut records = Vec::with_capacity(agents);
    let collected = tokio::time::timeout(patience, async {
        while let Some(joined) = clients.join_next().await {
            records.push(joined.context("a client task failed")??);
        }
        anyhow::Ok(())
    })
    .await;
    let total = started.elapsed();
    let loadgen_cpu = procfs::cpu_time(Pid::Myself)?.since(cpu_before);
    let _ = stop_tx.send(());
    let (samples, peak) = sampler.await.context("the sampler failed")?;
    match collected {
        Ok(result) => result?,
        Err(_) => bail!(
            "{} of {agents} clients had the whole file after {} s",
            records.len(),
            patience.as_secs()
        ),
    }
    let rejections = std::mem::take(&mut *shared.rejections.lock().expect("not poisoned"));
    Ok((
        summarise(
            &records,
            &samples,
            &rejections,
            total,
            target.size,
            loadgen_cpu,
        ),
        peak,
    ))
}

fn summarise(
    records: &[AgentRecord],
    samples: &[(Duration, usize)],
    rejections: &[(Duration, u64)],
    total: Duration,
    archive_bytes: u64,
    loadgen_cpu: CpuTime,
) -> FleetResult {
    let mut done: Vec<Duration> = records.iter().map(|record| record.done_at).collect();
    done.sort();
    let mut transfers: Vec<Duration> = records.iter().map(|record| record.transfer).collect();
    transfers.sort();
    let median = |sorted: &[Duration]| sorted.get(sorted.len() / 2).copied().unwrap_or_default();
    let mean_active = if samples.is_empty() {
        0.0
    } else {
        samples
            .iter()
            .map(|(_, active)| *active as f64)
            .sum::<f64>()
            / samples.len() as f64
    };
    let slice_length = total / TIMELINE_SLICES as u32;
    let timeline = (0..TIMELINE_SLICES)
        .map(|index| {
            let from = slice_length * index as u32;
            let to = if index + 1 == TIMELINE_SLICES {
                total
            } else {
                slice_length * (index as u32 + 1)
            };
            let within = |at: Duration| at >= from && (at < to || index + 1 == TIMELINE_SLICES);
            let active: Vec<f64> = samples
                .iter()
                .filter(|(at, _)| within(*at))
                .map(|(_, active)| *active as f64)
                .collect();
            let retries: Vec<u64> = rejections
                .iter()
                .filter(|(at, _)| within(*at))
                .map(|(_, after)| *after)
                .collect();
            Slice {
                from,
                to,
                mean_active: mean(&active),
                rejections: retries.len() as u64,
                mean_retry_after: mean(&retries.iter().map(|&r| r as f64).collect::<Vec<_>>()),
                completed: done.iter().filter(|&&at| within(at)).count(),
            }
        })
        .collect();
    FleetResult {
        agents: records.len(),
        archive_bytes,
        total,
        first_done: done.first().copied().unwrap_or_default(),
        median_done: median(&done),
        bytes: records.iter().map(|record| record.bytes).sum(),
        rejections: records
            .iter()
            .map(|record| u64::from(record.rejections))
            .sum(),
        max_rejections_per_agent: records
            .iter()
            .map(|record| record.rejections)
            .max()
            .unwrap_or(0),
        broken: records.iter().map(|record| u64::from(record.broken)).sum(),
        transfer_median: median(&transfers),
        transfer_max: transfers.last().copied().unwrap_or_default(),
        retry_after_max: rejections
            .iter()
            .map(|(_, after)| *after)
            .max()
            .unwrap_or(0),
        mean_active,
        peak_active: samples.iter().map(|(_, active)| *active).max().unwrap_or(0),
        loadgen_cpu,
        timeline,
    }
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

// One agent: GET until the whole file arrived, waiting out every 503 as the agent does.
async fn one_agent(
    client: &reqwest::Client,
    target: &Target,
    check: Check,
    shared: &Shared,
    started: Instant,
) -> anyhow::Result<AgentRecord> {
    let mut rejections = 0;
    let mut broken = 0;
    loop {
        let failure = match client.get(target.url.clone()).send().await {
            Err(err) => format!("request failed: {err}"),
            Ok(response) if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                let after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|text| text.trim().parse::<u64>().ok())
                    .unwrap_or(5)
                    .clamp(1, 300);
                drop(response);
                rejections += 1;
                shared
                    .rejections
                    .lock()
                    .expect("not poisoned")
                    .push((started.elapsed(), after));
                // The server's pause plus up to as much again, as the agent waits.
                let jitter = rand::random_range(0..=after * 1000);
                tokio::time::sleep(Duration::from_secs(after) + Duration::from_millis(jitter))
                    .await;
                continue;
            }
            Ok(response) if response.status() != reqwest::StatusCode::OK => {
                bail!(
                    "the server answered {} for {}",
                    response.status(),
                    target.url
                )
            }
            Ok(response) => {
                let transfer_started = Instant::now();
                shared.active.fetch_add(1, Ordering::Relaxed);
                let received = receive(response, target, check).await;
                shared.active.fetch_sub(1, Ordering::Relaxed);
                match received {
                    Ok(bytes) => {
                        return Ok(AgentRecord {
                            done_at: started.elapsed(),
                            transfer: transfer_started.elapsed(),
                            rejections,
                            broken,
                            bytes,
                        });
                    }
                    Err(Received::Wrong(reason)) => bail!("{reason}"),
                    Err(Received::Broken(reason)) => reason,
                }
            }
        };
        broken += 1;
        if broken >= MAX_ATTEMPTS {
            bail!("gave up after {broken} broken transfers: {failure}");
        }
        // The agent's pause after a broken transfer.
        let pause = rand::random_range(500..=1000u64 << broken.min(5));
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

enum Received {
    /// The file arrived, but not the right one.
    Wrong(String),
    Broken(String),
}

async fn receive(
    mut response: reqwest::Response,
    target: &Target,
    check: Check,
) -> Result<u64, Received> {
    let mut hasher = (check == Check::Sha256).then(sha2::Sha256::new);
    let mut bytes = 0u64;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                bytes += chunk.len() as u64;
                if let Some(hasher) = &mut hasher {
                    hasher.update(&chunk);
                }
            }
            Ok(None) => break,
            Err(err) => return Err(Received::Broken(format!("transfer broke off: {err}"))),
        }
    }
    if bytes != target.size {
        return Err(Received::Broken(format!(
            "{bytes} bytes arrived, the signed size is {}",
            target.size
        )));
    }
    if let Some(hasher) = hasher {
        let sha256 = hex::encode(hasher.finalize());
        if sha256 != target.sha256 {
            return Err(Received::Wrong(format!(
                "SHA-256 {sha256} arrived, the signed hash is {}",
                target.sha256
            )));
        }
    }
    Ok(bytes)
}

// One whole fetch, no 503 expected: the single-stream baseline.
async fn fetch_once(
    client: &reqwest::Client,
    target: &Target,
    check: Check,
) -> anyhow::Result<u64> {
    let response = client.get(target.url.clone()).send().await?;
    anyhow::ensure!(
        response.status() == reqwest::StatusCode::OK,
        "the raw server answered {}",
        response.status()
    );
    match receive(response, target, check).await {
        Ok(bytes) => Ok(bytes),
        Err(Received::Wrong(reason) | Received::Broken(reason)) => bail!("{reason}"),
    }
}

/// `changeover-loadgen raw-file-server` as a child process, killed when dropped.
#[derive(Debug)]
struct RawFileServer {
    child: Child,
    address: SocketAddr,
}

impl RawFileServer {
    fn start(loadgen_bin: &Path, file: &Path, max_transfers: usize) -> anyhow::Result<Self> {
        let mut child = Command::new(loadgen_bin)
            .arg("raw-file-server")
            .arg("--file")
            .arg(file)
            .args(["--listen", "127.0.0.1:0"])
            .arg("--max-transfers")
            .arg(max_transfers.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", loadgen_bin.display()))?;
        let stdout = child.stdout.take().context("the child has no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let address = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the raw file server printed no \"listening on\" line");
            };
            if let Some(address) = line
                .trim()
                .strip_prefix("listening on http://")
                .and_then(|address| address.parse().ok())
            {
                break address;
            }
        };
        // Keep draining, so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(RawFileServer { child, address })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self, archive: &str) -> anyhow::Result<reqwest::Url> {
        Ok(reqwest::Url::parse(&format!(
            "http://{}/agent-updates/{archive}",
            self.address
        ))?)
    }
}

impl Drop for RawFileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mb_per_second(bytes_per_second: f64) -> f64 {
    bytes_per_second / MB as f64
}

fn one_line(run: &Run, baseline: Option<&Run>) -> String {
    let fleet = &run.fleet;
    let ratio = baseline.map_or(String::new(), |baseline| {
        format!(
            ", {:.2}× the raw server without a cap",
            fleet.throughput() / baseline.fleet.throughput().max(1e-9)
        )
    });
    format!(
        "[{} cap {}] {} agents in {:.2} s: {:.0} MB/s{ratio}; 503s {} (max {} per agent), broken {}; \
         in flight mean {:.1} max {}; serving process CPU {}, RSS {} → peak {} KiB; load generator CPU {}",
        run.label,
        cap_text(run.max_transfers),
        fleet.agents,
        fleet.total.as_secs_f64(),
        mb_per_second(fleet.throughput()),
        fleet.rejections,
        fleet.max_rejections_per_agent,
        fleet.broken,
        fleet.mean_active,
        fleet.peak_active,
        run.server.cpu,
        run.server.rss_before_kib,
        run.server.rss_peak_kib,
        fleet.loadgen_cpu,
    )
}

fn cap_text(cap: usize) -> String {
    if cap == 0 {
        "none".to_owned()
    } else {
        cap.to_string()
    }
}

/// Where one server run's time went, in tenths: transfers in flight, 503s answered and
/// their mean `Retry-After`, clients done.
pub fn timeline_table(run: &Run) -> String {
    let mut table = String::from(
        "| slice | in flight (mean) | 503s | mean Retry-After | done |\n|---|---:|---:|---:|---:|\n",
    );
    for slice in &run.fleet.timeline {
        table.push_str(&format!(
            "| {:.1}–{:.1} s | {:.1} | {} | {:.1} s | {} |\n",
            slice.from.as_secs_f64(),
            slice.to.as_secs_f64(),
            slice.mean_active,
            slice.rejections,
            slice.mean_retry_after,
            slice.completed
        ));
    }
    table
}

/// Every run as one table, with the ratios to the raw server of the same invocation.
pub fn summary_table(report: &Report) -> String {
    let mut table = format!(
        "archive {} bytes; single stream from the raw server {:.0} MB/s\n\n\
         | server | cap | agents | total | first done | median done | throughput | vs raw, no cap | vs raw, same cap | 503s | max 503s per agent | broken | transfer p50 | transfer max | in flight mean | serving CPU user+sys | RSS before | RSS peak | VmHWM before→after | threads peak | load generator CPU |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        report.archive_bytes,
        mb_per_second(report.single_stream)
    );
    let uncapped = report.raw_uncapped.fleet.throughput().max(1e-9);
    let mut row = |run: &Run, same_cap: Option<&Run>| {
        let fleet = &run.fleet;
        table.push_str(&format!(
            "| {} | {} | {} | {:.2} s | {:.2} s | {:.2} s | {:.0} MB/s | {:.2} | {} | {} | {} | {} | {:.2} s | {:.2} s | {:.1} | {:.2} + {:.2} s | {:.1} MiB | {:.1} MiB | {:.1} → {:.1} MiB | {} | {:.2} + {:.2} s |\n",
            run.label,
            cap_text(run.max_transfers),
            fleet.agents,
            fleet.total.as_secs_f64(),
            fleet.first_done.as_secs_f64(),
            fleet.median_done.as_secs_f64(),
            mb_per_second(fleet.throughput()),
            fleet.throughput() / uncapped,
            same_cap.map_or("".to_owned(), |raw| format!(
                "{:.2}",
                fleet.throughput() / raw.fleet.throughput().max(1e-9)
            )),
            fleet.rejections,
            fleet.max_rejections_per_agent,
            fleet.broken,
            fleet.transfer_median.as_secs_f64(),
            fleet.transfer_max.as_secs_f64(),
            fleet.mean_active,
            run.server.cpu.user.as_secs_f64(),
            run.server.cpu.system.as_secs_f64(),
            run.server.rss_before_kib as f64 / 1024.0,
            run.server.rss_peak_kib as f64 / 1024.0,
            run.server.hwm_before_kib as f64 / 1024.0,
            run.server.hwm_after_kib as f64 / 1024.0,
            run.server.threads_peak,
            fleet.loadgen_cpu.user.as_secs_f64(),
            fleet.loadgen_cpu.system.as_secs_f64(),
        ));
    };
    row(&report.raw_uncapped, None);
    for (server, raw) in &report.capped {
        row(server, Some(raw));
        row(raw, None);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_product_config_names_only_the_cap_and_the_fleets_one_address() {
        let config = product_config(8);
        assert!(config.contains("[agent_updates]\nmax_transfers = 8\n"));
        assert!(
            config.contains(crate::fleet::ONE_ADDRESS_FLEET_KEYS),
            "{config}"
        );
        assert_eq!(config.lines().filter(|line| line.contains('=')).count(), 3);
        changeover_server::config::Config::parse(&config).expect("a valid config");
    }

    #[test]
    fn a_run_is_cut_into_tenths() {
        let record = |done_ms: u64| AgentRecord {
            done_at: Duration::from_millis(done_ms),
            transfer: Duration::from_millis(100),
            rejections: 1,
            broken: 0,
            bytes: 10,
        };
        let records = [record(50), record(500), record(1000)];
        let samples = [
            (Duration::from_millis(10), 2),
            (Duration::from_millis(950), 1),
        ];
        let rejections = [(Duration::from_millis(5), 3), (Duration::from_millis(6), 1)];
        let fleet = summarise(
            &records,
            &samples,
            &rejections,
            Duration::from_secs(1),
            10,
            CpuTime::default(),
        );
        assert_eq!(fleet.timeline.len(), TIMELINE_SLICES);
        assert_eq!(fleet.timeline[0].completed, 1);
        assert_eq!(fleet.timeline[0].rejections, 2);
        assert!((fleet.timeline[0].mean_retry_after - 2.0).abs() < 1e-9);
        // The last client, done at the very end, falls into the last slice.
        assert_eq!(fleet.timeline[9].completed, 1);
        assert_eq!(fleet.bytes, 30);
        assert_eq!(fleet.rejections, 3);
        assert_eq!(fleet.median_done, Duration::from_millis(500));
        assert!((fleet.mean_active - 1.5).abs() < 1e-9);
        assert!((fleet.throughput() - 30.0).abs() < 1e-9);
    }
}
