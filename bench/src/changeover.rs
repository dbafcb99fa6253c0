//! `changeover`: how long the agents are without a server while it updates itself, and how
//! long a rollback takes, with a large release and a gigabyte of backups to carry over.
//!
//! Everything is the real thing, set up as `download` sets it up: a vendor key, server
//! 1.0.0 and 2.0.0 (the release binary, 2.0.0 also holding incompressible data) packed into
//! a feed that nginx serves, 1.0.0 installed into a fresh product folder with
//! `changeover-server install`. One repetition:
//!
//! 1. **Changeover.** 1 GB of backups is written into `server/backups/` (real writes, then
//!    `sync`), the installed server is started, 2.0.0 downloaded (`admin download`, so the
//!    changeover does not include the download), a fleet of returning agents connected
//!    ([`crate::returning_fleet`]), and `admin update --grace 0 --json` run to its
//!    `changeover_finished`. Measured: the server's own `downtime_ms`; from the agents'
//!    side, the first `logout` seen until the first `welcome` from 2.0.0 and until every
//!    agent is back; per agent, its `logout` to its `welcome`; the whole changeover; the
//!    server's CPU time; the steps from the server's log. The backups must be in the new
//!    install with their inode numbers unchanged: moved, not copied.
//! 2. **Plain restarts**, the floor: the same server is sent SIGTERM and, once it has
//!    exited, started again on the same port; the same fleet's outage is measured. Then
//!    the same with SIGKILL, which leaves out the server's own shutdown.
//! 3. **Moving against copying** the backups folder: `mv` (a rename) and `cp -r` plus the
//!    `sync` that makes the copy durable.
//! 4. **Rollback.** A fresh product folder gets the same backups (moved over), the server
//!    starts with `CHANGEOVER_FAULT_AT=unhealthy` (the new release fails its health check
//!    on purpose), and the same update runs. Measured: from the new release's "rolling back"
//!    log line until the first `welcome` from 1.0.0, the agents' outage, the whole run.
//!
//! The product folders, backups included, are deleted at the end of each repetition.
//! Every process started here is killed when its guard is dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use changeover_protocol::release::ReleaseKind;
use changeover_protocol::{ChangeoverSummary, ServerMessage};
use changeover_server::layout::Layout;
use tokio::io::AsyncBufReadExt as _;

use crate::download::{
    self, NEW_VERSION, Nginx, OLD_VERSION, PreparedFeed, admin_command, admin_download, run_tool,
    set_mode, timed,
};
use crate::procfs::{self, CpuTime, Pid};
use crate::returning_fleet::{Outage, ReturnPolicy, ReturningFleet, ReturningFleetOptions};
use crate::server_log::{self, LogLine, millis_between};
use crate::server_process::{ADMIN_PASSWORD, ServerProcess};

/// How often the server's CPU time is read while a changeover runs.
const CPU_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);

/// Quiet time between connecting the fleet and asking for the update.
const SETTLE: Duration = Duration::from_millis(500);

/// How long the agents may take to be back after the changeover ended.
const RETURN_PATIENCE: Duration = Duration::from_secs(60);

const MIB: u64 = 1024 * 1024;

/// What `changeover` was given.
#[derive(Debug, Clone)]
pub struct ChangeoverOptions {
    /// The release `changeover-server`: packs, installs, and is inside both releases.
    pub server_bin: PathBuf,
    /// `changeover-agent`, for the admin commands.
    pub agent_bin: PathBuf,
    pub nginx_bin: PathBuf,
    pub curl_bin: PathBuf,
    /// Random bytes in release 2.0.0, in MB (10^6 bytes).
    pub payload_mb: u64,
    /// Backups: this many files...
    pub backup_files: usize,
    /// ...of this many MiB each.
    pub backup_file_mib: u64,
    pub agents: usize,
    /// The agents' pause between failed connection attempts.
    pub retry: Duration,
    pub repetitions: usize,
    /// How long one download or one changeover may take.
    pub patience: Duration,
    /// Keep the work folder (feed, nginx files, server logs) instead of removing it.
    pub keep: bool,
    /// How the agents come back after the logout.
    pub agent_policy: ReturnPolicy,
}

/// Which way the update is expected to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expectation {
    /// 2.0.0 is healthy and committed.
    Commit,
    /// 2.0.0 fails its health check on purpose and 1.0.0 serves again.
    Rollback,
}

impl Expectation {
    /// The version the agents must be welcomed by to count as back.
    pub fn back_version(self) -> &'static str {
        match self {
            Expectation::Commit => NEW_VERSION,
            Expectation::Rollback => OLD_VERSION,
        }
    }

    fn outcome(self) -> &'static str {
        match self {
            Expectation::Commit => "committed",
            Expectation::Rollback => "rolled_back",
        }
    }

    fn server_env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Expectation::Commit => &[],
            Expectation::Rollback => &[("CHANGEOVER_FAULT_AT", "unhealthy")],
        }
    }
}

impl std::fmt::Display for Expectation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expectation::Commit => "changeover",
            Expectation::Rollback => "rollback",
        })
    }
}

/// Moments of a changeover in the server's log (the server's clock, which is this one).
#[derive(Debug, Clone, Default)]
pub struct LogSteps {
    /// "sessions logged out": right after `stopped_at`, the start of `downtime_ms`.
    pub logged_out: Option<SystemTime>,
    /// "restarting as the new release": the old process is about to exec.
    pub restarting: Option<SystemTime>,
    /// The first line of the process image after the exec.
    pub new_process: Option<SystemTime>,
    /// "server started" after the exec: listening, `accepting_since` follows at once.
    pub new_listening: Option<SystemTime>,
    /// "changeover committed".
    pub committed: Option<SystemTime>,
    /// The first "rolling back to the previous release": the failed health check.
    pub rolling_back: Option<SystemTime>,
    /// The first line of the old version's process image after the rollback's exec.
    pub old_process: Option<SystemTime>,
    /// "server started" by the old version after the rollback.
    pub old_listening: Option<SystemTime>,
    /// The last "changeover ended" or "changeover committed".
    pub ended: Option<SystemTime>,
}

impl LogSteps {
    pub fn of(lines: &[LogLine]) -> LogSteps {
        let mut steps = LogSteps::default();
        for line in lines {
            let at = Some(line.at);
            if line.is("sessions logged out") {
                steps.logged_out = steps.logged_out.or(at);
            } else if line.is("restarting as the new release") {
                steps.restarting = steps.restarting.or(at);
            } else if line.is("one file descriptor per agent") {
                if steps.rolling_back.is_some() {
                    steps.old_process = steps.old_process.or(at);
                } else if steps.restarting.is_some() {
                    steps.new_process = steps.new_process.or(at);
                }
            } else if line.is("server started") {
                if steps.rolling_back.is_some() {
                    steps.old_listening = steps.old_listening.or(at);
                } else if steps.restarting.is_some() {
                    steps.new_listening = steps.new_listening.or(at);
                }
            } else if line.is("changeover committed") {
                steps.committed = steps.committed.or(at);
                steps.ended = at;
            } else if line.is("rolling back to the previous release") {
                steps.rolling_back = steps.rolling_back.or(at);
            } else if line.is("changeover ended") {
                steps.ended = at;
            }
        }
        steps
    }
}

/// One update (a changeover or a rollback) as measured.
#[derive(Debug, Clone)]
pub struct UpdateRun {
    pub expectation: Expectation,
    pub summary: ChangeoverSummary,
    /// `admin download` of 2.0.0 before the update, start to `package_ready`.
    pub predownload: Duration,
    /// From starting `admin update` until its `changeover_finished` line.
    pub request_to_finished: Duration,
    /// From starting `admin update` until the first agent had its `logout`.
    pub request_to_logout: Option<Duration>,
    /// The agents' outage, from each one's `logout` to its welcome by the expected version.
    pub outage: Outage,
    /// Failed connection attempts of the fleet while it ran, by reason.
    pub failed_attempts: BTreeMap<String, usize>,
    /// The server's CPU time from the request until `changeover_finished`.
    pub server_cpu: CpuTime,
    /// The server's CPU time from the first `logout` until every agent was back.
    pub server_cpu_outage: CpuTime,
    pub loadgen_cpu: CpuTime,
    pub steps: LogSteps,
    /// The server's log lines from the request on.
    pub log: Vec<LogLine>,
    /// The wall-clock moment the request was made.
    pub requested_at: SystemTime,
    /// Every backup file is where the serving release expects it, with its inode unchanged.
    pub backups_moved: bool,
}

impl UpdateRun {
    /// From the failed health check (the new release's "rolling back" line) until the
    /// first welcome by the old version.
    pub fn rollback_to_first_back(&self) -> Option<f64> {
        Some(millis_between(
            self.steps.rolling_back?,
            self.outage.first_back?.1,
        ))
    }

    /// From the failed health check until the old version logged "server started".
    pub fn rollback_to_old_listening(&self) -> Option<f64> {
        Some(millis_between(
            self.steps.rolling_back?,
            self.steps.old_listening?,
        ))
    }

    /// Milliseconds between two logged moments.
    fn step(&self, from: Option<SystemTime>, to: Option<SystemTime>) -> f64 {
        match (from, to) {
            (Some(from), Some(to)) => millis_between(from, to),
            _ => f64::NAN,
        }
    }

    /// The first welcome by the expected version on the wall clock.
    fn first_back_wall(&self) -> Option<SystemTime> {
        self.outage.first_back.map(|(_, wall)| wall)
    }

    /// Agents welcomed by another version than the expected one meanwhile.
    pub fn welcomes_by_other_versions(&self) -> usize {
        self.outage.welcomes_by_other_versions.values().sum()
    }

    /// Agents' connection attempts reset (by an exec) before their welcome: the failed
    /// attempts that name a reset.
    pub fn attempts_reset(&self) -> usize {
        self.failed_attempts
            .iter()
            .filter(|(reason, _)| reason.contains("reset"))
            .map(|(_, count)| count)
            .sum()
    }

    /// From the request until the server logged the end.
    pub fn request_to_end_logged(&self) -> Option<f64> {
        Some(millis_between(self.requested_at, self.steps.ended?))
    }
}

/// How the plain restart stops the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM: the server closes every session with 1001 and exits.
    Term,
    /// SIGKILL: the process is gone at once, as in a crash; the floor of a restart.
    Kill,
}

impl StopSignal {
    fn signal(self) -> rustix::process::Signal {
        match self {
            StopSignal::Term => rustix::process::Signal::TERM,
            StopSignal::Kill => rustix::process::Signal::KILL,
        }
    }
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Kill => "SIGKILL",
        })
    }
}

/// The plain restart of the same server with the same fleet.
#[derive(Debug, Clone)]
pub struct RestartRun {
    pub signal: StopSignal,
    /// From sending the signal until the process had exited.
    pub signal_to_exit: Duration,
    /// From spawning the server until its "listening on" line.
    pub start_to_listening: Duration,
    pub signal_to_first_back: Option<Duration>,
    pub signal_to_all_back: Option<Duration>,
    pub outage: Outage,
}

/// Moving and copying the backups folder with the ordinary tools.
#[derive(Debug, Clone, Copy)]
pub struct FileOps {
    pub backup_bytes: u64,
    pub mv: Duration,
    pub mv_back: Duration,
    pub cp: Duration,
    /// `sync` right after the copy: writing it to disk.
    pub sync_after_cp: Duration,
}

/// Everything one repetition measured.
#[derive(Debug, Clone)]
pub struct Repetition {
    pub write_backups: Duration,
    pub changeover: UpdateRun,
    /// Restart after SIGTERM: the "raw" floor issue 4 compares with.
    pub restart: RestartRun,
    /// Restart after SIGKILL: without the server's own shutdown.
    pub restart_killed: RestartRun,
    pub files: FileOps,
    pub rollback: UpdateRun,
}

/// Builds the feed, serves it, runs every repetition and prints the results.
pub async fn run(options: &ChangeoverOptions) -> anyhow::Result<Vec<Repetition>> {
    anyhow::ensure!(options.repetitions > 0, "at least one repetition is needed");
    anyhow::ensure!(options.agents > 0, "at least one agent is needed");
    let work = tempfile::Builder::new()
        .prefix("changeover-loadgen-changeover-")
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

async fn run_in(options: &ChangeoverOptions, work: &Path) -> anyhow::Result<Vec<Repetition>> {
    // Private copies: others may rebuild target/ while this runs.
    let agent_bin = work.join("bin/changeover-agent");
    std::fs::create_dir_all(work.join("bin"))?;
    std::fs::copy(&options.agent_bin, &agent_bin)
        .with_context(|| format!("cannot copy {}", options.agent_bin.display()))?;
    let feed = download::prepare_feed(&options.server_bin, options.payload_mb, work)?;
    println!(
        "feed {}: {} ({} bytes = {:.1} MB)",
        feed.dir.display(),
        feed.newer.archive,
        feed.newer.size,
        feed.newer.size as f64 / 1e6
    );
    let nginx = Nginx::start(&options.nginx_bin, &feed.dir, &work.join("nginx"))?;
    let manifest_status = run_tool(Command::new(&options.curl_bin).args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{}manifest.json", nginx.url()),
    ]))?;
    let manifest_status = String::from_utf8_lossy(&manifest_status.stdout).into_owned();
    anyhow::ensure!(
        manifest_status.trim() == "200",
        "nginx answered {manifest_status} for the manifest"
    );
    println!("nginx {} serves the feed", nginx.url());

    let context = RunContext {
        options,
        agent_bin,
        feed,
        feed_url: nginx.url(),
    };
    let mut repetitions = Vec::new();
    for index in 1..=options.repetitions {
        let folder = work.join(format!("run-{index}"));
        let result = repeat_once(&context, &folder, index).await;
        // The gigabyte goes, whatever happened.
        remove_product_folders(&folder);
        repetitions.push(result?);
        run_tool(&mut Command::new("sync"))?;
    }
    drop(nginx);
    println!();
    print!("{}", summary(&repetitions));
    Ok(repetitions)
}

fn remove_product_folders(folder: &Path) {
    for name in ["changeover", "rollback", "copies"] {
        let path = folder.join(name);
        if path.exists()
            && let Err(err) = std::fs::remove_dir_all(&path)
        {
            eprintln!("cannot remove {}: {err}", path.display());
        }
    }
}

#[derive(Debug)]
pub(crate) struct RunContext<'a> {
    pub(crate) options: &'a ChangeoverOptions,
    pub(crate) agent_bin: PathBuf,
    pub(crate) feed: PreparedFeed,
    pub(crate) feed_url: String,
}

/// A product folder with 1.0.0 installed from the feed.
#[derive(Debug)]
pub(crate) struct Site {
    pub(crate) root: PathBuf,
    pub(crate) layout: Layout,
}

impl Site {
    pub(crate) fn install(context: &RunContext<'_>, root: &Path) -> anyhow::Result<Site> {
        let mut install = Command::new(&context.options.server_bin);
        install
            .arg("install")
            .arg("--root")
            .arg(root)
            .arg("--package")
            .arg(&context.feed.older_archive)
            .arg("--public-key")
            .arg(&context.feed.public_key);
        run_tool(&mut install)?;
        let layout = Layout::new(root);
        let config_file = layout.config_file();
        std::fs::write(&config_file, download::product_config(&context.feed_url))
            .with_context(|| format!("cannot write {}", config_file.display()))?;
        Ok(Site {
            root: root.to_owned(),
            layout,
        })
    }

    pub(crate) fn server_bin(&self) -> PathBuf {
        self.layout
            .install_dir()
            .join(ReleaseKind::Server.binary_path())
    }
}

/// One backup file: its name and the inode it must keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BackupFile {
    name: String,
    inode: u64,
    size: u64,
}

async fn repeat_once(
    context: &RunContext<'_>,
    folder: &Path,
    index: usize,
) -> anyhow::Result<Repetition> {
    let options = context.options;
    let label = format!("[run {index}]");
    std::fs::create_dir_all(folder)?;

    // 1. The changeover.
    let site = Site::install(context, &folder.join("changeover"))?;
    let started = Instant::now();
    let backups = write_backups(
        &site.layout.backups_dir(),
        options.backup_files,
        options.backup_file_mib * MIB,
        index as u64,
    )?;
    run_tool(&mut Command::new("sync"))?;
    let write_backups = started.elapsed();
    let backup_bytes: u64 = backups.iter().map(|file| file.size).sum();
    println!(
        "{label} wrote {} backups, {:.2} GiB, in {:.1} s (with sync)",
        backups.len(),
        backup_bytes as f64 / (1024.0 * MIB as f64),
        write_backups.as_secs_f64()
    );
    let (changeover, server, fleet) = measure_update(
        context,
        &site,
        &backups,
        Expectation::Commit,
        folder,
        &label,
    )
    .await?;

    // 2. Plain restarts of the same server, with the same fleet.
    let (restart, server) =
        measure_restart(server, &fleet, &site, StopSignal::Term, &label).await?;
    let (restart_killed, server) =
        measure_restart(server, &fleet, &site, StopSignal::Kill, &label).await?;
    fleet.close().await;
    drop(server);

    // 3. Moving and copying the backups folder, with the server stopped.
    let files = move_and_copy(&site.layout.backups_dir(), &folder.join("copies"))?;
    println!(
        "{label} backups folder: mv {:.1} ms (back {:.1} ms), cp -r {:.2} s, sync after it {:.2} s",
        files.mv.as_secs_f64() * 1000.0,
        files.mv_back.as_secs_f64() * 1000.0,
        files.cp.as_secs_f64(),
        files.sync_after_cp.as_secs_f64()
    );

    // 4. The rollback, in a fresh product folder with the same backups.
    let rollback_site = Site::install(context, &folder.join("rollback"))?;
    let target = rollback_site.layout.backups_dir();
    if target.exists() {
        std::fs::remove_dir_all(&target)
            .with_context(|| format!("cannot remove {}", target.display()))?;
    }
    std::fs::rename(site.layout.backups_dir(), &target)
        .context("cannot move the backups to the rollback's product folder")?;
    std::fs::remove_dir_all(&site.root)
        .with_context(|| format!("cannot remove {}", site.root.display()))?;
    run_tool(&mut Command::new("sync"))?;
    let (rollback, server, fleet) = measure_update(
        context,
        &rollback_site,
        &backups,
        Expectation::Rollback,
        folder,
        &label,
    )
    .await?;
    fleet.close().await;
    drop(server);

    Ok(Repetition {
        write_backups,
        changeover,
        restart,
        restart_killed,
        files,
        rollback,
    })
}

/// Writes `count` files of `bytes` each: fresh pseudo-random bytes (so nothing can share
/// or compress them), written for real, not allocated.
fn write_backups(
    dir: &Path,
    count: usize,
    bytes: u64,
    seed: u64,
) -> anyhow::Result<Vec<BackupFile>> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut chunk = vec![0u8; MIB as usize];
    let mut files = Vec::new();
    for number in 0..count {
        let name = format!("backup-{number:02}.bak");
        let path = dir.join(&name);
        let mut file = std::io::BufWriter::with_capacity(
            MIB as usize,
            std::fs::File::create(&path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        );
        let mut left = bytes;
        while left > 0 {
            fill_pseudo_random(&mut chunk, &mut state);
            let now = left.min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..now])
                .with_context(|| format!("cannot write {}", path.display()))?;
            left -= now as u64;
        }
        file.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
        drop(file);
        let metadata = std::fs::metadata(&path)?;
        files.push(BackupFile {
            name,
            inode: metadata.ino(),
            size: metadata.len(),
        });
    }
    Ok(files)
}

// xorshift64*: fast enough that writing, not generating, is what a gigabyte costs.
fn fill_pseudo_random(buffer: &mut [u8], state: &mut u64) {
    for word in buffer.chunks_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let value = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        word.copy_from_slice(&value[..word.len()]);
    }
}

/// Whether every backup is in `dir` with the inode and size it was written with.
fn backups_unmoved_inodes(dir: &Path, backups: &[BackupFile]) -> bool {
    backups.iter().all(|file| {
        std::fs::metadata(dir.join(&file.name))
            .is_ok_and(|metadata| metadata.ino() == file.inode && metadata.len() == file.size)
    })
}

pub(crate) async fn measure_update(
    context: &RunContext<'_>,
    site: &Site,
    backups: &[BackupFile],
    expectation: Expectation,
    folder: &Path,
    label: &str,
) -> anyhow::Result<(UpdateRun, ServerProcess, ReturningFleet)> {
    let options = context.options;
    let label = format!("{label} [{expectation}]");
    let server = ServerProcess::start_installed_logging(
        &site.server_bin(),
        &site.root,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        expectation.server_env(),
    )
    .await?;
    let status = admin_command(&context.agent_bin, &server, &["status", "--json"])?;
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).context("admin status printed no JSON")?;
    anyhow::ensure!(
        status["server_version"] == OLD_VERSION,
        "the installed server reports {} instead of {OLD_VERSION}",
        status["server_version"]
    );
    let predownload = admin_download(&context.agent_bin, options.patience, &server, folder)
        .await
        .map_err(|err| with_log(err, &server))?
        .ready;

    let mut fleet_options = ReturningFleetOptions::new(server.url(), options.agents);
    fleet_options.retry = options.retry;
    fleet_options.policy = options.agent_policy;
    let fleet = ReturningFleet::open(&fleet_options).await?;
    tokio::time::sleep(SETTLE).await;

    let pid = Pid::Other(server.pid());
    let (stop_sampling, sampler) = sample_cpu(pid);
    let loadgen_cpu_start = procfs::cpu_time(Pid::Myself)?;
    let mark = fleet.mark();
    let since = mark.at;
    let requested_at = SystemTime::now();
    let update = admin_update(&context.agent_bin, &server, folder, options.patience).await;
    let update = match update {
        Ok(update) => update,
        Err(err) => {
            let _ = stop_sampling.send(());
            return Err(with_log(err, &server));
        }
    };
    let back_version = expectation.back_version();
    let all_back = fleet
        .wait_until_back(mark, back_version, RETURN_PATIENCE)
        .await;
    let _ = stop_sampling.send(());
    let cpu_samples = sampler.await.unwrap_or_default();
    let loadgen_cpu = procfs::cpu_time(Pid::Myself)?.since(loadgen_cpu_start);
    let events = fleet.events_since(mark);
    let outage = Outage::of(&events, since, back_version);
    if !all_back {
        bail!(
            "{label} only {} of {} agents were back on {back_version} within {} s \
             ({} disconnected); failed attempts: {:?}",
            outage.back,
            options.agents,
            RETURN_PATIENCE.as_secs(),
            outage.disconnected,
            fleet.failed_attempts()
        );
    }
    let summary = update.summary;
    anyhow::ensure!(
        summary.outcome.to_string() == expectation.outcome(),
        "{label} the update ended {} ({:?}), not {}",
        summary.outcome,
        summary.reason,
        expectation.outcome()
    );
    let log: Vec<LogLine> = server_log::read(&server.log)
        .with_context(|| format!("cannot read {}", server.log.display()))?
        .into_iter()
        .filter(|line| line.at >= requested_at - Duration::from_millis(5))
        .collect();
    let steps = LogSteps::of(&log);
    let first_logout = outage.first_disconnect.map(|(at, _)| at);
    let all_back_at = outage.last_back.map(|(at, _)| at);
    let run = UpdateRun {
        expectation,
        summary,
        predownload,
        request_to_finished: update.finished_at.saturating_duration_since(since),
        request_to_logout: first_logout.map(|at| at.saturating_duration_since(since)),
        server_cpu: cpu_between(&cpu_samples, since, update.finished_at),
        server_cpu_outage: match (first_logout, all_back_at) {
            (Some(from), Some(to)) => cpu_between(&cpu_samples, from, to),
            _ => CpuTime::default(),
        },
        loadgen_cpu,
        steps,
        log,
        requested_at,
        backups_moved: backups_unmoved_inodes(&site.layout.backups_dir(), backups),
        outage,
        failed_attempts: fleet.failed_attempts(),
    };
    print_update(&label, &run);
    anyhow::ensure!(
        run.backups_moved,
        "{label} the backups are not in {} with their inodes unchanged",
        site.layout.backups_dir().display()
    );
    Ok((run, server, fleet))
}

fn with_log(err: anyhow::Error, server: &ServerProcess) -> anyhow::Error {
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    err.context(format!("the server's log:\n{}", log.trim_end()))
}

/// What `admin update --json` printed.
#[derive(Debug)]
struct AdminUpdate {
    summary: ChangeoverSummary,
    /// When its `changeover_finished` line arrived.
    finished_at: Instant,
}

async fn admin_update(
    agent_bin: &Path,
    server: &ServerProcess,
    folder: &Path,
    patience: Duration,
) -> anyhow::Result<AdminUpdate> {
    let stderr_path = folder.join("admin-update.stderr");
    let stderr = std::fs::File::create(&stderr_path)
        .with_context(|| format!("cannot create {}", stderr_path.display()))?;
    let mut child = tokio::process::Command::new(agent_bin)
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
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", agent_bin.display()))?;
    let stdout = child.stdout.take().context("the agent has no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let follow = async {
        while let Some(line) = lines.next_line().await? {
            let at = Instant::now();
            // Tolerant: a line this build cannot read is skipped, not fatal.
            if let Ok(ServerMessage::ChangeoverFinished(summary)) =
                serde_json::from_str::<ServerMessage>(&line)
            {
                return Ok((summary, at));
            }
            if let Ok(ServerMessage::Error { .. }) = serde_json::from_str::<ServerMessage>(&line) {
                bail!("admin update printed an error: {line}");
            }
        }
        bail!("admin update ended without changeover_finished")
    };
    let (summary, finished_at) = match tokio::time::timeout(patience, follow).await {
        Ok(Ok(finished)) => finished,
        Ok(Err(err)) => {
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            return Err(err.context(format!("admin update's stderr: {}", stderr.trim_end())));
        }
        Err(_elapsed) => bail!("no changeover_finished within {} s", patience.as_secs()),
    };
    // It exits non-zero after a rollback; either way it must exit.
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .context("admin update did not exit after changeover_finished")??;
    Ok(AdminUpdate {
        summary,
        finished_at,
    })
}

async fn measure_restart(
    mut server: ServerProcess,
    fleet: &ReturningFleet,
    site: &Site,
    signal: StopSignal,
    label: &str,
) -> anyhow::Result<(RestartRun, ServerProcess)> {
    let label = format!("{label} [restart after {signal}]");
    let address = server.address;
    let version = NEW_VERSION;
    tokio::time::sleep(SETTLE).await;
    let mark = fleet.mark();
    let since = mark.at;
    let since_wall = SystemTime::now();
    let signal_to_exit = server
        .stop_with(signal.signal(), Duration::from_secs(30))
        .await?;
    let old_log = server_log::read(&server.log).unwrap_or_default();
    drop(server);
    let spawned = Instant::now();
    let server =
        ServerProcess::start_installed_logging(&site.server_bin(), &site.root, address, &[])
            .await?;
    let start_to_listening = spawned.elapsed();
    let all_back = fleet.wait_until_back(mark, version, RETURN_PATIENCE).await;
    let outage = Outage::of(&fleet.events_since(mark), since, version);
    anyhow::ensure!(
        all_back,
        "{label} only {} of {} agents were back within {} s; failed attempts: {:?}",
        outage.back,
        fleet.agents(),
        RETURN_PATIENCE.as_secs(),
        fleet.failed_attempts()
    );
    let run = RestartRun {
        signal,
        signal_to_exit,
        start_to_listening,
        signal_to_first_back: outage
            .first_back
            .map(|(at, _)| at.saturating_duration_since(since)),
        signal_to_all_back: outage
            .last_back
            .map(|(at, _)| at.saturating_duration_since(since)),
        outage,
    };
    println!(
        "{label} {signal}→exit {}, start→listening {}, {signal}→first welcome {}, {signal}→all back {}; \
         first disconnection→first welcome {}; per agent p50 {} p99 {} max {}",
        ms(Some(run.signal_to_exit)),
        ms(Some(run.start_to_listening)),
        ms(run.signal_to_first_back),
        ms(run.signal_to_all_back),
        ms(run.outage.first_disconnect_to_first_back()),
        ms(Some(run.outage.per_agent.p50)),
        ms(Some(run.outage.per_agent.p99)),
        ms(Some(run.outage.per_agent.max)),
    );
    // What each process logged, from the SIGTERM on.
    let new_log = server_log::read(&server.log).unwrap_or_default();
    for line in old_log.iter().chain(&new_log).filter(|line| {
        line.at >= since_wall && !line.is("agent connected") && !line.is("agent disconnected")
    }) {
        println!(
            "    {:>+9.1} ms  {} {}",
            millis_between(since_wall, line.at),
            line.level,
            line.text
        );
    }
    Ok((run, server))
}

fn move_and_copy(backups: &Path, scratch: &Path) -> anyhow::Result<FileOps> {
    std::fs::create_dir_all(scratch)?;
    let backup_bytes = walkdir_size(backups)?;
    let moved = scratch.join("backups-moved");
    let copy = scratch.join("backups-copy");
    let mv = timed(Command::new("mv").arg(backups).arg(&moved))?;
    let mv_back = timed(Command::new("mv").arg(&moved).arg(backups))?;
    run_tool(&mut Command::new("sync"))?;
    let cp = timed(Command::new("cp").arg("-r").arg(backups).arg(&copy))?;
    let sync_after_cp = timed(&mut Command::new("sync"))?;
    let copied = walkdir_size(&copy)?;
    anyhow::ensure!(
        copied == backup_bytes,
        "cp -r copied {copied} of {backup_bytes} bytes"
    );
    std::fs::remove_dir_all(&copy).with_context(|| format!("cannot remove {}", copy.display()))?;
    run_tool(&mut Command::new("sync"))?;
    Ok(FileOps {
        backup_bytes,
        mv,
        mv_back,
        cp,
        sync_after_cp,
    })
}

fn walkdir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for item in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let metadata = item?.metadata()?;
        total += if metadata.is_dir() { 0 } else { metadata.len() };
    }
    Ok(total)
}

// Reads the CPU time every CPU_SAMPLE_INTERVAL until told to stop.
fn sample_cpu(
    pid: Pid,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Vec<(Instant, CpuTime)>>,
) {
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut interval = tokio::time::interval(CPU_SAMPLE_INTERVAL);
        loop {
            tokio::select! {
                _ = &mut stop_rx => {
                    if let Ok(cpu) = procfs::cpu_time(pid) {
                        samples.push((Instant::now(), cpu));
                    }
                    return samples;
                }
                _ = interval.tick() => {
                    if let Ok(cpu) = procfs::cpu_time(pid) {
                        samples.push((Instant::now(), cpu));
                    }
                }
            }
        }
    });
    (stop_tx, sampler)
}

/// The CPU time used between two moments, from the samples taken at or before each.
fn cpu_between(samples: &[(Instant, CpuTime)], from: Instant, to: Instant) -> CpuTime {
    let at_or_before = |moment: Instant| {
        samples
            .iter()
            .take_while(|(at, _)| *at <= moment)
            .last()
            .or(samples.first())
            .map(|(_, cpu)| *cpu)
            .unwrap_or_default()
    };
    at_or_before(to).since(at_or_before(from))
}

fn ms(duration: Option<Duration>) -> String {
    match duration {
        Some(duration) => format!("{:.0} ms", duration.as_secs_f64() * 1000.0),
        None => "–".to_owned(),
    }
}

fn ms_f(value: Option<f64>) -> String {
    match value {
        Some(value) => format!("{value:.0} ms"),
        None => "–".to_owned(),
    }
}

fn print_update(label: &str, run: &UpdateRun) {
    let outage = &run.outage;
    println!(
        "{label} {}: downtime_ms {:?}; agents: first logout→first welcome from {} {}, \
         last logout→first welcome {}, first logout→all back {}; per agent p50 {} p99 {} max {}; \
         request→logout {}, request→changeover_finished {}; predownload {}",
        run.summary.outcome,
        run.summary.downtime_ms,
        run.expectation.back_version(),
        ms(outage.first_disconnect_to_first_back()),
        ms(outage.last_disconnect_to_first_back()),
        ms(outage.first_disconnect_to_all_back()),
        ms(Some(outage.per_agent.p50)),
        ms(Some(outage.per_agent.p99)),
        ms(Some(outage.per_agent.max)),
        ms(run.request_to_logout),
        ms(Some(run.request_to_finished)),
        ms(Some(run.predownload)),
    );
    println!(
        "{label} {} of {} agents logged out (window {:?} ms), {} back; welcomes by other versions {:?}, \
         {} of those dropped again; failed attempts {:?}",
        outage.logouts,
        outage.disconnected,
        outage.reconnect_within_ms,
        outage.back,
        outage.welcomes_by_other_versions,
        outage.dropped_after_other_welcome,
        run.failed_attempts
    );
    println!(
        "{label} server CPU request→finished {}, first logout→all back {}; load generator {}",
        run.server_cpu, run.server_cpu_outage, run.loadgen_cpu
    );
    if run.expectation == Expectation::Rollback {
        println!(
            "{label} failed health check→old version listening {}, →first welcome from {} {}",
            ms_f(run.rollback_to_old_listening()),
            OLD_VERSION,
            ms_f(run.rollback_to_first_back()),
        );
    }
    print!("{}", timeline(run));
}

/// The server's log lines and the fleet's moments, in time order, in ms from the logout.
fn timeline(run: &UpdateRun) -> String {
    let zero = run
        .steps
        .logged_out
        .or(run.outage.first_disconnect.map(|(_, wall)| wall))
        .unwrap_or(run.requested_at);
    let mut entries: Vec<(SystemTime, String)> = Vec::new();
    entries.push((run.requested_at, "(admin update started)".to_owned()));
    let mut want_first_agent = false;
    // Refusals of agents that came back too early: the first is shown, with the count.
    let refusals = run
        .log
        .iter()
        .filter(|line| line.is("connection refused"))
        .count();
    let mut refusal_shown = false;
    for line in &run.log {
        if line.is("connection refused") {
            if !refusal_shown {
                refusal_shown = true;
                entries.push((line.at, format!("{} {refusals}× {}", line.level, line.text)));
            }
            continue;
        }
        if line.is("agent connected") {
            if want_first_agent {
                entries.push((line.at, format!("{} (first after start)", line.text)));
                want_first_agent = false;
            }
            continue;
        }
        if line.is("agent disconnected") || line.is("admin logged in") {
            continue;
        }
        if line.is("server started") {
            want_first_agent = true;
        }
        let mut text = format!("{} {}", line.level, line.text);
        if text.len() > 140 {
            let cut = (0..=140)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            text.truncate(cut);
            text.push('…');
        }
        entries.push((line.at, text));
    }
    let outage = &run.outage;
    for (moment, what) in [
        (outage.first_disconnect, "(fleet: first logout seen)"),
        (outage.last_disconnect, "(fleet: last logout seen)"),
        (
            outage.first_back,
            "(fleet: first welcome by the expected version)",
        ),
        (outage.last_back, "(fleet: every agent back)"),
    ] {
        if let Some((_, wall)) = moment {
            entries.push((wall, what.to_owned()));
        }
    }
    entries.sort_by_key(|(at, _)| *at);
    let mut out = String::new();
    for (at, text) in entries {
        out.push_str(&format!(
            "    {:>+9.1} ms  {text}\n",
            millis_between(zero, at)
        ));
    }
    out
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|value| !value.is_nan());
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn millis(duration: Option<Duration>) -> f64 {
    duration.map_or(f64::NAN, |duration| duration.as_secs_f64() * 1000.0)
}

/// One cell of a summary table; NaN means not measured.
#[derive(Debug, Clone, Copy)]
enum Cell {
    Millis(f64),
    Seconds(f64),
    Count(f64),
}

impl Cell {
    fn value(self) -> f64 {
        match self {
            Cell::Millis(value) | Cell::Seconds(value) | Cell::Count(value) => value,
        }
    }

    fn with_value(self, value: f64) -> Cell {
        match self {
            Cell::Millis(_) => Cell::Millis(value),
            Cell::Seconds(_) => Cell::Seconds(value),
            Cell::Count(_) => Cell::Count(value),
        }
    }
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            cell if cell.value().is_nan() => f.write_str("–"),
            Cell::Millis(value) if value < 10.0 => write!(f, "{value:.1} ms"),
            Cell::Millis(value) => write!(f, "{value:.0} ms"),
            Cell::Seconds(value) => write!(f, "{value:.2} s"),
            Cell::Count(value) => write!(f, "{value:.0}"),
        }
    }
}

/// A Markdown table: one row per repetition and a row of medians.
fn table(names: &[&str], rows: &[Vec<Cell>]) -> String {
    let mut out = String::from("| run |");
    for name in names {
        out.push_str(&format!(" {name} |"));
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(names.len()));
    out.push('\n');
    for (index, row) in rows.iter().enumerate() {
        out.push_str(&format!("| {} |", index + 1));
        for cell in row {
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out.push_str("| **median** |");
    for column in 0..names.len() {
        let values: Vec<f64> = rows.iter().map(|row| row[column].value()).collect();
        let middle = rows[0][column].with_value(median(values));
        out.push_str(&format!(" **{middle}** |"));
    }
    out.push('\n');
    out
}

/// The repetitions and their medians as Markdown, ready for BENCHMARKS.md.
pub fn summary(repetitions: &[Repetition]) -> String {
    use Cell::{Count, Millis, Seconds};
    if repetitions.is_empty() {
        return String::new();
    }
    let downtime_ms = |run: &UpdateRun| run.summary.downtime_ms.map_or(f64::NAN, |ms| ms as f64);
    let changeover: Vec<Vec<Cell>> = repetitions
        .iter()
        .map(|r| {
            let run = &r.changeover;
            vec![
                Millis(downtime_ms(run)),
                Millis(millis(run.outage.first_disconnect_to_first_back())),
                Millis(millis(run.outage.last_disconnect_to_first_back())),
                Millis(millis(run.outage.first_disconnect_to_all_back())),
                Millis(millis(Some(run.outage.per_agent.p50))),
                Millis(millis(Some(run.outage.per_agent.p99))),
                Millis(millis(Some(run.outage.per_agent.max))),
                Millis(millis(run.request_to_logout)),
                Millis(millis(Some(run.request_to_finished))),
                Seconds(run.server_cpu.total().as_secs_f64()),
                Seconds(run.server_cpu_outage.total().as_secs_f64()),
            ]
        })
        .collect();
    let rollback: Vec<Vec<Cell>> = repetitions
        .iter()
        .map(|r| {
            let run = &r.rollback;
            vec![
                Millis(run.rollback_to_old_listening().unwrap_or(f64::NAN)),
                Millis(run.rollback_to_first_back().unwrap_or(f64::NAN)),
                Millis(millis(run.outage.first_disconnect_to_first_back())),
                Millis(millis(run.outage.first_disconnect_to_all_back())),
                Millis(millis(Some(run.outage.per_agent.p50))),
                Millis(millis(Some(run.outage.per_agent.p99))),
                Millis(millis(Some(run.outage.per_agent.max))),
                Count(run.welcomes_by_other_versions() as f64),
                Count(run.attempts_reset() as f64),
                Millis(millis(Some(run.request_to_finished))),
                Seconds(run.server_cpu.total().as_secs_f64()),
            ]
        })
        .collect();
    let changeover_steps: Vec<Vec<Cell>> = repetitions
        .iter()
        .map(|r| {
            let run = &r.changeover;
            let steps = &run.steps;
            vec![
                Millis(run.step(steps.logged_out, steps.restarting)),
                Millis(run.step(steps.restarting, steps.new_process)),
                Millis(run.step(steps.new_process, steps.new_listening)),
                Millis(run.step(steps.new_listening, run.first_back_wall())),
                Millis(run.step(steps.logged_out, run.first_back_wall())),
                Millis(run.step(run.first_back_wall(), steps.committed)),
            ]
        })
        .collect();
    let rollback_steps: Vec<Vec<Cell>> = repetitions
        .iter()
        .map(|r| {
            let run = &r.rollback;
            let steps = &run.steps;
            vec![
                Millis(run.step(steps.logged_out, steps.restarting)),
                Millis(run.step(steps.restarting, steps.new_process)),
                Millis(run.step(steps.new_process, steps.new_listening)),
                Millis(run.step(steps.new_listening, steps.rolling_back)),
                Millis(run.step(steps.rolling_back, steps.old_process)),
                Millis(run.step(steps.old_process, steps.old_listening)),
                Millis(run.step(steps.old_listening, run.first_back_wall())),
            ]
        })
        .collect();
    let restarts: Vec<Vec<Cell>> = repetitions
        .iter()
        .map(|r| {
            let mut row = Vec::new();
            for restart in [&r.restart, &r.restart_killed] {
                row.extend([
                    Millis(millis(Some(restart.signal_to_exit))),
                    Millis(millis(Some(restart.start_to_listening))),
                    Millis(millis(restart.signal_to_first_back)),
                    Millis(millis(restart.outage.first_disconnect_to_first_back())),
                    Millis(millis(restart.signal_to_all_back)),
                ]);
            }
            row
        })
        .collect();
    let files: Vec<Vec<Cell>> = repetitions
        .iter()
        .map(|r| {
            vec![
                Millis(millis(Some(r.files.mv))),
                Millis(millis(Some(r.files.mv_back))),
                Seconds(r.files.cp.as_secs_f64()),
                Seconds(r.files.sync_after_cp.as_secs_f64()),
                Seconds(r.write_backups.as_secs_f64()),
            ]
        })
        .collect();

    let mut out = String::from("Changeover (commit):\n\n");
    out.push_str(&table(
        &[
            "server downtime_ms",
            "first logout→first welcome (2.0.0)",
            "last logout→first welcome",
            "first logout→all back",
            "per agent p50",
            "p99",
            "max",
            "request→first logout",
            "request→changeover_finished",
            "server CPU request→finished",
            "server CPU first logout→all back",
        ],
        &changeover,
    ));
    out.push_str("\nWhere the changeover's downtime goes (server log, then the fleet):\n\n");
    out.push_str(&table(
        &[
            "logout→\"restarting\" (stop, carry-over, swap)",
            "→first line of the new image (exec)",
            "→\"server started\" (recovery, start-up)",
            "→first welcome",
            "logout→first welcome",
            "first welcome→\"committed\" (health check, commit)",
        ],
        &changeover_steps,
    ));
    out.push_str("\nRollback (CHANGEOVER_FAULT_AT=unhealthy):\n\n");
    out.push_str(&table(
        &[
            "failed check→1.0.0 listening (log)",
            "failed check→first welcome (1.0.0)",
            "first logout→first welcome (1.0.0)",
            "first logout→all back",
            "per agent p50",
            "p99",
            "max",
            "welcomed by 2.0.0, then cut",
            "attempts reset before welcome",
            "request→changeover_finished",
            "server CPU request→finished",
        ],
        &rollback,
    ));
    out.push_str("\nWhere the rollback's time goes (server log, then the fleet):\n\n");
    out.push_str(&table(
        &[
            "logout→\"restarting\"",
            "→new image (exec)",
            "→2.0.0 \"server started\"",
            "→\"rolling back\" (failed check)",
            "→old image (undo, exec)",
            "→1.0.0 \"server started\"",
            "→first welcome by 1.0.0",
        ],
        &rollback_steps,
    ));
    out.push_str("\nPlain restarts of the same server, same fleet (SIGTERM, then SIGKILL):\n\n");
    out.push_str(&table(
        &[
            "SIGTERM→exit",
            "start→listening",
            "SIGTERM→first welcome",
            "first close→first welcome",
            "SIGTERM→all back",
            "SIGKILL→exit",
            "start→listening",
            "SIGKILL→first welcome",
            "first reset→first welcome",
            "SIGKILL→all back",
        ],
        &restarts,
    ));
    out.push_str("\nThe backups folder with the ordinary tools:\n\n");
    out.push_str(&table(
        &[
            "mv",
            "mv back",
            "cp -r",
            "sync after cp -r",
            "writing it (+sync)",
        ],
        &files,
    ));

    let med = |value: &dyn Fn(&Repetition) -> f64| median(repetitions.iter().map(value).collect());
    let term = med(&|r| millis(r.restart.outage.first_disconnect_to_first_back()));
    let kill = med(&|r| millis(r.restart_killed.outage.first_disconnect_to_first_back()));
    let figures = [
        (
            "changeover, agents' first logout→first welcome",
            med(&|r| millis(r.changeover.outage.first_disconnect_to_first_back())),
        ),
        (
            "changeover, server downtime_ms",
            med(&|r| downtime_ms(&r.changeover)),
        ),
        (
            "rollback, agents' first logout→first welcome by 1.0.0",
            med(&|r| millis(r.rollback.outage.first_disconnect_to_first_back())),
        ),
        (
            "rollback, failed check→first welcome by 1.0.0",
            med(&|r| r.rollback.rollback_to_first_back().unwrap_or(f64::NAN)),
        ),
    ];
    out.push_str(&format!(
        "\nRatios of medians to the plain restarts' first disconnection→first welcome \
         (SIGTERM {term:.0} ms, SIGKILL {kill:.0} ms):\n"
    ));
    for (name, value) in figures {
        out.push_str(&format!(
            "- {name}: {value:.0} ms = {:.2}× SIGTERM restart, {:.2}× SIGKILL restart\n",
            value / term,
            value / kill
        ));
    }
    let mv = med(&|r| r.files.mv.as_secs_f64());
    out.push_str(&format!(
        "- cp -r of the backups / mv: {:.0}×; cp -r + sync / mv: {:.0}×\n",
        med(&|r| r.files.cp.as_secs_f64()) / mv,
        med(&|r| (r.files.cp + r.files.sync_after_cp).as_secs_f64()) / mv,
    ));
    let first = &repetitions[0];
    out.push_str(&format!(
        "\n{} agents; backups {:.2} GiB; 2.0.0 downloaded beforehand in {:.2} s (median); \
         load generator CPU during the changeover {:.2} s (median)\n",
        first.changeover.outage.disconnected,
        first.files.backup_bytes as f64 / (1024.0 * MIB as f64),
        med(&|r| r.changeover.predownload.as_secs_f64()),
        med(&|r| r.changeover.loadgen_cpu.total().as_secs_f64()),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(offset_ms: u64, text: &str) -> LogLine {
        LogLine {
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_000 + offset_ms),
            level: "INFO".to_owned(),
            text: text.to_owned(),
        }
    }

    #[test]
    fn the_steps_of_a_rollback_are_found_in_the_log() {
        let lines = [
            line(0, "server started version=1.0.0"),
            line(100, "sessions logged out logged_out=100"),
            line(310, "restarting as the new release binary=/x"),
            line(320, "one file descriptor per agent limit=20000"),
            line(330, "found an unfinished changeover"),
            line(340, "server started version=2.0.0"),
            line(345, "rolling back to the previous release reason=…"),
            line(360, "one file descriptor per agent limit=20000"),
            line(365, "rolling back to the previous release reason=…"),
            line(370, "changeover ended outcome=rolled_back"),
            line(380, "server started version=1.0.0"),
        ];
        let steps = LogSteps::of(&lines);
        let at = |ms: u64| Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_000 + ms));
        assert_eq!(steps.logged_out, at(100));
        assert_eq!(steps.restarting, at(310));
        assert_eq!(steps.new_process, at(320));
        assert_eq!(steps.new_listening, at(340));
        assert_eq!(steps.rolling_back, at(345));
        assert_eq!(steps.old_process, at(360));
        assert_eq!(steps.old_listening, at(380));
        assert_eq!(steps.ended, at(370));
        assert_eq!(steps.committed, None);
    }

    #[test]
    fn cpu_between_takes_the_samples_at_or_before_each_moment() {
        let t0 = Instant::now();
        let cpu = |ms: u64| CpuTime {
            user: Duration::from_millis(ms),
            system: Duration::ZERO,
        };
        let samples = [
            (t0, cpu(0)),
            (t0 + Duration::from_millis(10), cpu(10)),
            (t0 + Duration::from_millis(20), cpu(30)),
        ];
        let used = cpu_between(
            &samples,
            t0 + Duration::from_millis(5),
            t0 + Duration::from_millis(25),
        );
        assert_eq!(used.user, Duration::from_millis(30));
        assert_eq!(cpu_between(&[], t0, t0), CpuTime::default());
    }

    #[test]
    fn backups_are_written_for_real_and_differ() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_backups(dir.path(), 2, 3 * MIB + 5, 1).unwrap();
        assert_eq!(files.len(), 2);
        let first = std::fs::read(dir.path().join("backup-00.bak")).unwrap();
        let second = std::fs::read(dir.path().join("backup-01.bak")).unwrap();
        assert_eq!(first.len() as u64, 3 * MIB + 5);
        assert_ne!(first, second);
        // Nothing like a run of zeros an allocation would leave.
        assert!(first.chunks(4096).all(|page| page.iter().any(|&b| b != 0)));
        assert!(backups_unmoved_inodes(dir.path(), &files));
        let moved = dir.path().join("elsewhere");
        std::fs::create_dir(&moved).unwrap();
        std::fs::rename(
            dir.path().join("backup-00.bak"),
            moved.join("backup-00.bak"),
        )
        .unwrap();
        std::fs::rename(
            dir.path().join("backup-01.bak"),
            moved.join("backup-01.bak"),
        )
        .unwrap();
        assert!(
            backups_unmoved_inodes(&moved, &files),
            "a rename keeps the inode"
        );
        std::fs::copy(
            moved.join("backup-00.bak"),
            dir.path().join("backup-00.bak"),
        )
        .unwrap();
        std::fs::copy(
            moved.join("backup-01.bak"),
            dir.path().join("backup-01.bak"),
        )
        .unwrap();
        assert!(
            !backups_unmoved_inodes(dir.path(), &files),
            "a copy does not"
        );
    }

    #[test]
    fn tables_end_with_the_median_of_each_column() {
        let rows = vec![
            vec![Cell::Millis(300.0), Cell::Seconds(1.5), Cell::Count(3.0)],
            vec![
                Cell::Millis(100.0),
                Cell::Seconds(f64::NAN),
                Cell::Count(1.0),
            ],
            vec![Cell::Millis(200.0), Cell::Seconds(0.5), Cell::Count(2.0)],
        ];
        let out = table(&["a", "b", "c"], &rows);
        assert!(
            out.starts_with("| run | a | b | c |\n|---|---:|---:|---:|\n"),
            "{out}"
        );
        assert!(out.contains("| 2 | 100 ms | – | 1 |"), "{out}");
        assert!(
            out.ends_with("| **median** | **200 ms** | **1.00 s** | **2** |\n"),
            "{out}"
        );
        assert_eq!(Cell::Millis(4.25).to_string(), "4.2 ms");
    }

    #[test]
    fn medians_skip_what_was_not_measured() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, f64::NAN, 2.0]), 3.0);
        assert!(median(Vec::new()).is_nan());
    }
}
