//! `changeover-loadgen scale`: the scenarios of issue 6 at fleet sizes of thousands, each
//! beside a raw baseline measured in the same run.
//!
//! For every fleet size, in this order:
//!
//! 1. **Raw baseline** (`raw-server` in its own process): one fleet of returning agents;
//!    broadcast fan-out (SIGUSR1 makes it write one pre-serialised `warning` to every
//!    connection), then a restart storm (SIGTERM, start again on the same address).
//! 2. **Changeover server**, release 1.0.0 installed from a local feed, 2.0.0 downloaded
//!    beforehand: the same fleet size; fan-out of the first countdown `warning` of an
//!    `admin update --grace 300` (cancelled again with `admin cancel` once every agent has
//!    it); the same with one **slow reader** among the agents (a connection with a tiny
//!    receive buffer that never reads after its welcome), the server's memory before and
//!    after, and how long until the server drops it; then restart storms (SIGTERM, start
//!    again on the same address), with agents coming back at once and like the real agent.
//! 3. **Changeover with grace 0**, twice, each in a fresh install: agents back at once, and
//!    like the real agent (inside the announced window); and a third time like the agent in
//!    an install whose server first took a restart storm with the fleet (so it has measured
//!    its handshake rate, as every server that restarted with its agents connected has).
//!    This is [`crate::changeover::measure_update`] without the backups. Beside its figures, how
//!    the agents came back ([`Return`]): the window and the capacity the old process sized
//!    it from (its "reconnect window" line), the time from the new release letting
//!    sessions in again ("agent sessions let in again", the end of `downtime_ms`) to the
//!    first and the last agent welcomed, the peak welcome rate, and the failed attempts
//!    (refusals with `updating`, and everything else: refused connects, handshakes closed or
//!    timed out).
//!
//! The restart storms of the changeover server also report the rate the server itself
//! measured in the storm ("handshake rate measured in a storm"). `--skip-broadcasts` leaves
//! out the fan-out and the slow reader, for the storms and changeovers alone.
//!
//! Times of the broadcast are taken from the sender's log line (`broadcast sent` for the
//! raw server, `countdown warning sent` for the changeover server, both written right
//! after the message was put on the ring) to the moment each agent's task read the frame,
//! both on this machine's wall clock. The results are printed as tables and, with
//! `--json FILE`, written as one JSON document (the smoke test reads it).
//!
//! It is a measurement, not a test: it fails only when something does not happen at all
//! (agents not welcomed, a warning not delivered, a changeover not finished).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use changeover_protocol::{AgentHello, ClientMessage, PROTOCOL_VERSION, ServerMessage};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::changeover::{
    ChangeoverOptions, Expectation, RunContext, Site, UpdateRun, measure_update,
};
use crate::download::{self, NEW_VERSION, Nginx, OLD_VERSION, admin_download, set_mode};
use crate::fleet::{Latency, agent_websocket_config};
use crate::procfs::{self, CpuTime, Pid};
use crate::returning_fleet::{
    AgentEvent, AgentEventKind, Mark, Outage, ReturnPolicy, ReturningFleet, ReturningFleetOptions,
};
use crate::server_log;
use crate::server_process::{ADMIN_PASSWORD, ServerProcess};

/// The grace period of the updates whose first warning is measured; cancelled long before.
const FANOUT_GRACE_SECS: u64 = 300;

/// What `scale` was given.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub server_bin: PathBuf,
    pub agent_bin: PathBuf,
    /// `changeover-loadgen` itself, for `raw-server`.
    pub loadgen_bin: PathBuf,
    pub nginx_bin: PathBuf,
    pub curl_bin: PathBuf,
    /// Fleet sizes, each measured in turn.
    pub agents: Vec<usize>,
    /// Broadcasts measured per server and fleet size (and again with the slow reader).
    pub broadcasts: usize,
    /// The changeover server's `heartbeat_secs`: a slow reader is dropped after two silent
    /// intervals.
    pub heartbeat_secs: u64,
    /// How long any one step may take (a fleet to open, a warning to reach everyone, the
    /// agents to come back, the slow reader to be dropped).
    pub patience: Duration,
    /// The returning agents' pause between failed attempts when they come back at once.
    pub retry: Duration,
    /// Pause before each measured step, so the previous one's stragglers are done.
    pub settle: Duration,
    /// Where to write the results as JSON.
    pub json: Option<PathBuf>,
    /// Keep the work folder (feed, nginx files) instead of removing it.
    pub keep: bool,
    /// Only the restart storms and the changeovers: no broadcasts, no slow reader.
    pub skip_broadcasts: bool,
    /// Only the broadcasts: no slow reader, no restart storms, no changeovers.
    pub only_broadcasts: bool,
    /// Worker threads of this process's runtime (1: current-thread), for the report.
    pub loadgen_threads: usize,
}

/// One broadcast's delivery: from the sender's log line to each agent's read.
#[derive(Debug, Clone)]
pub struct FanOut {
    /// Connections the sender queued the message for.
    pub reached: u64,
    /// Agents that read it.
    pub received: usize,
    /// How long the sender's `send` took (the raw server logs it; the changeover server
    /// does not): its log line comes that much after the message was on the ring.
    pub send_us: Option<u64>,
    pub latency: Latency,
    /// Agents whose read was stamped before the sender's log line (clock granularity):
    /// counted as 0.
    pub before_trigger: usize,
    pub server_cpu: CpuTime,
    pub loadgen_cpu: CpuTime,
}

impl FanOut {
    fn to_json(&self) -> Value {
        json!({
            "reached": self.reached,
            "received": self.received,
            "send_us": self.send_us,
            "p50_ms": ms(self.latency.p50),
            "p99_ms": ms(self.latency.p99),
            "max_ms": ms(self.latency.max),
            "before_trigger": self.before_trigger,
            "server_cpu_s": self.server_cpu.total().as_secs_f64(),
            "loadgen_cpu_s": self.loadgen_cpu.total().as_secs_f64(),
        })
    }
}

/// One restart of a server with the fleet connected.
#[derive(Debug, Clone)]
pub struct Storm {
    pub policy: ReturnPolicy,
    pub signal_to_exit: Duration,
    /// From spawning the new process to its "listening on" line.
    pub start_to_listening: Duration,
    /// From "listening on" to the first and to the last agent welcomed again.
    pub listening_to_first_back: Option<Duration>,
    pub listening_to_all_back: Option<Duration>,
    pub back: usize,
    /// Welcomes per second from the first to the last.
    pub handshake_rate: f64,
    pub failed_attempts: usize,
    /// What the restarted changeover server measured in this storm ("handshake rate
    /// measured in a storm"), if it found it saturated.
    pub server_measured_per_sec: Option<f64>,
    pub server_cpu: CpuTime,
    pub loadgen_cpu: CpuTime,
}

impl Storm {
    fn to_json(&self) -> Value {
        json!({
            "policy": self.policy.to_string(),
            "signal_to_exit_ms": ms(self.signal_to_exit),
            "start_to_listening_ms": ms(self.start_to_listening),
            "listening_to_first_back_ms": self.listening_to_first_back.map(ms),
            "listening_to_all_back_ms": self.listening_to_all_back.map(ms),
            "back": self.back,
            "handshakes_per_s": self.handshake_rate,
            "failed_attempts": self.failed_attempts,
            "server_measured_per_s": self.server_measured_per_sec,
            "server_cpu_s": self.server_cpu.total().as_secs_f64(),
            "loadgen_cpu_s": self.loadgen_cpu.total().as_secs_f64(),
        })
    }
}

/// The slow reader's part.
#[derive(Debug, Clone)]
pub struct SlowReader {
    /// Fan-out to the other agents while it was connected.
    pub fanouts: Vec<FanOut>,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// From its welcome until the server's "agent disconnected" line for it.
    pub dropped_after: Option<Duration>,
    /// The close code it found when it finally read its socket.
    pub close_code: Option<u16>,
    /// What the server logged about it besides connecting and disconnecting (why it
    /// closed the connection).
    pub server_said: Option<String>,
}

/// Everything measured at one fleet size.
#[derive(Debug, Clone)]
pub struct SizeResult {
    pub agents: usize,
    pub raw_fanouts: Vec<FanOut>,
    pub server_fanouts: Vec<FanOut>,
    /// `None` with `--skip-broadcasts`.
    pub slow_reader: Option<SlowReader>,
    /// None with `--only-broadcasts`.
    pub raw_storm: Option<Storm>,
    pub server_storms: Vec<Storm>,
    /// In fresh installs: agents back at once, and like the agent.
    pub changeovers: Vec<Changeover>,
    /// Like the agent, in an install that measured a restart storm before.
    pub changeovers_after_storm: Vec<Changeover>,
}

/// One changeover with grace 0, and how the agents came back.
#[derive(Debug, Clone)]
pub struct Changeover {
    pub policy: ReturnPolicy,
    /// The install measured a restart storm first.
    pub after_storm: bool,
    pub run: UpdateRun,
    pub back: Return,
}

/// How the agents came back after a changeover, from the moment the new release let
/// sessions in again.
#[derive(Debug, Clone, Default)]
pub struct Return {
    /// The new release's "agent sessions let in again" line: the end of `downtime_ms`.
    pub accepting: Option<SystemTime>,
    /// What the old process sized the window from, and the window ("reconnect window").
    pub window_ms: Option<u64>,
    pub capacity_per_sec: Option<f64>,
    /// Whether that capacity was measured (else it is the default).
    pub capacity_measured: Option<bool>,
    /// From `accepting` to the first and the last agent welcomed by the new release.
    pub accepting_to_first_back: Option<Duration>,
    pub accepting_to_last_back: Option<Duration>,
    /// The most welcomes by the new release within one 100 ms slice, per second.
    pub peak_per_sec: f64,
    /// Hellos refused with `updating` (before the stop, and during the health check).
    pub refused_updating: usize,
    /// Every other failed attempt over the fleet's life: refused connects, handshakes
    /// closed or timed out, by reason.
    pub failed_otherwise: BTreeMap<String, usize>,
    /// What the server measured before the request (its log's "handshake rate" lines).
    pub measured_before: Vec<String>,
}

impl Return {
    fn failed_otherwise_total(&self) -> usize {
        self.failed_otherwise.values().sum()
    }
}

/// The width of the slices [`Return::peak_per_sec`] counts welcomes in.
const PEAK_SLICE: Duration = Duration::from_millis(100);

fn return_figures(
    run: &UpdateRun,
    events: &[AgentEvent],
    server_log: &[server_log::LogLine],
) -> Return {
    // A server before this line let sessions in right after "changeover committed".
    let accepting = run
        .log
        .iter()
        .find(|line| line.is("agent sessions let in again"))
        .or_else(|| run.log.iter().find(|line| line.is("changeover committed")))
        .map(|line| line.at);
    let window = run.log.iter().find(|line| line.is("reconnect window"));
    let mut welcomes: Vec<SystemTime> = events
        .iter()
        .filter(|event| {
            event.wall >= run.requested_at
                && matches!(&event.kind, AgentEventKind::Welcomed { server_version } if server_version == NEW_VERSION)
        })
        .map(|event| event.wall)
        .collect();
    welcomes.sort_unstable();
    let after = |at: Option<&SystemTime>| {
        let (accepting, at) = (accepting?, at?);
        Some(at.duration_since(accepting).unwrap_or(Duration::ZERO))
    };
    let mut peak = 0usize;
    if let Some(&first) = welcomes.first() {
        let mut slices: BTreeMap<u128, usize> = BTreeMap::new();
        for at in &welcomes {
            let offset = at.duration_since(first).unwrap_or(Duration::ZERO);
            *slices
                .entry(offset.as_nanos() / PEAK_SLICE.as_nanos())
                .or_default() += 1;
        }
        peak = slices.values().copied().max().unwrap_or(0);
    }
    let (refused_updating, failed_otherwise): (BTreeMap<_, _>, BTreeMap<_, _>) = run
        .failed_attempts
        .clone()
        .into_iter()
        .partition(|(reason, _)| reason.contains("\"updating\""));
    let measured_before = server_log
        .iter()
        .filter(|line| line.at < run.requested_at && line.is("handshake rate"))
        .map(|line| line.text.clone())
        .collect();
    Return {
        accepting,
        window_ms: window.and_then(|line| field_u64(&line.text, "window_ms")),
        capacity_per_sec: window.and_then(|line| field_f64(&line.text, "handshakes_per_sec")),
        capacity_measured: window.and_then(|line| field(&line.text, "measured")?.parse().ok()),
        accepting_to_first_back: after(welcomes.first()),
        accepting_to_last_back: after(welcomes.last()),
        peak_per_sec: peak as f64 / PEAK_SLICE.as_secs_f64(),
        refused_updating: refused_updating.values().sum(),
        failed_otherwise,
        measured_before,
    }
}

/// Builds the feed, serves it, measures every fleet size and prints the results.
pub async fn run(options: &ScaleOptions) -> anyhow::Result<Vec<SizeResult>> {
    anyhow::ensure!(!options.agents.is_empty(), "no fleet size given");
    anyhow::ensure!(options.broadcasts > 0, "at least one broadcast is needed");
    let work = tempfile::Builder::new()
        .prefix("changeover-loadgen-scale-")
        .tempdir()
        .context("cannot create a temporary folder")?;
    // nginx started as root may switch to `nobody`; it must still read the feed.
    set_mode(work.path(), 0o755)?;
    println!("work folder {}", work.path().display());
    println!(
        "load generator: {} runtime thread(s), on a machine with {} CPUs",
        options.loadgen_threads,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    let result = run_in(options, work.path()).await;
    if options.keep {
        let kept = work.keep();
        println!("kept {}", kept.display());
    }
    let results = result?;
    println!();
    print!("{}", summary(&results));
    if let Some(path) = &options.json {
        let document = json!({
            "loadgen_threads": options.loadgen_threads,
            "sizes": results.iter().map(size_json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&document)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(results)
}

async fn run_in(options: &ScaleOptions, work: &Path) -> anyhow::Result<Vec<SizeResult>> {
    // Private copies: others may rebuild target/ while this runs.
    std::fs::create_dir_all(work.join("bin"))?;
    let agent_bin = work.join("bin/changeover-agent");
    std::fs::copy(&options.agent_bin, &agent_bin)
        .with_context(|| format!("cannot copy {}", options.agent_bin.display()))?;
    let loadgen_bin = work.join("bin/changeover-loadgen");
    std::fs::copy(&options.loadgen_bin, &loadgen_bin)
        .with_context(|| format!("cannot copy {}", options.loadgen_bin.display()))?;
    let feed = download::prepare_feed(&options.server_bin, 0, work)?;
    let nginx = Nginx::start(&options.nginx_bin, &feed.dir, &work.join("nginx"))?;
    println!("nginx {} serves the feed", nginx.url());

    let mut results = Vec::new();
    for &agents in &options.agents {
        let changeover_options = ChangeoverOptions {
            server_bin: options.server_bin.clone(),
            agent_bin: options.agent_bin.clone(),
            nginx_bin: options.nginx_bin.clone(),
            curl_bin: options.curl_bin.clone(),
            payload_mb: 0,
            backup_files: 0,
            backup_file_mib: 0,
            agents,
            retry: options.retry,
            repetitions: 1,
            patience: options.patience,
            keep: options.keep,
            agent_policy: ReturnPolicy::AtOnce,
        };
        let context = RunContext {
            options: &changeover_options,
            agent_bin: agent_bin.clone(),
            feed: feed.clone(),
            feed_url: nginx.url(),
        };
        let folder = work.join(format!("agents-{agents}"));
        std::fs::create_dir_all(&folder)?;
        let result = measure_size(options, &context, &loadgen_bin, &folder, agents).await;
        let _ = std::fs::remove_dir_all(&folder);
        results.push(result?);
    }
    drop(nginx);
    Ok(results)
}

async fn measure_size(
    options: &ScaleOptions,
    context: &RunContext<'_>,
    loadgen_bin: &Path,
    folder: &Path,
    agents: usize,
) -> anyhow::Result<SizeResult> {
    let label = format!("[{agents} agents]");
    println!("{label} load average {}", load_average());

    // 1. The raw baseline.
    let raw =
        ServerProcess::start_raw_at(loadgen_bin, SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let fleet = open_fleet(options, &raw, agents, "raw").await?;
    let mut raw_fanouts = Vec::new();
    for index in 1..=broadcasts(options) {
        tokio::time::sleep(options.settle).await;
        let fanout = raw_broadcast(options, &raw, &fleet, agents).await?;
        println!("{label} [raw broadcast {index}] {}", show_fanout(&fanout));
        raw_fanouts.push(fanout);
    }
    let raw_storm = if options.only_broadcasts {
        None
    } else {
        tokio::time::sleep(options.settle).await;
        let (raw_storm, restarted) = storm(options, raw, &fleet, Restart::Raw(loadgen_bin)).await?;
        println!("{label} [raw restart storm] {}", show_storm(&raw_storm));
        drop(restarted);
        Some(raw_storm)
    };
    fleet.close().await;

    // 2. The changeover server: fan-out, the slow reader, restart storms.
    let site = Site::install(context, &folder.join("fanout"))?;
    let config = site.layout.config_file();
    // The site's config has a [server] table already (the fleet's one-address keys).
    let config_text = std::fs::read_to_string(&config)?;
    anyhow::ensure!(
        config_text.contains("[server]\n"),
        "{} has no [server] table",
        config.display()
    );
    let config_text = config_text.replacen(
        "[server]\n",
        &format!("[server]\nheartbeat_secs = {}\n", options.heartbeat_secs),
        1,
    );
    std::fs::write(&config, config_text)?;
    let server = ServerProcess::start_installed_logging(
        &site.server_bin(),
        &site.root,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &[],
    )
    .await?;
    admin_download(&context.agent_bin, options.patience, &server, folder).await?;
    let fleet = open_fleet(options, &server, agents, "server").await?;
    let mut server_fanouts = Vec::new();
    for index in 1..=broadcasts(options) {
        tokio::time::sleep(options.settle).await;
        let fanout = server_broadcast(options, context, &server, &fleet, agents, folder).await?;
        println!("{label} [server warning {index}] {}", show_fanout(&fanout));
        server_fanouts.push(fanout);
    }
    let slow_reader = if options.skip_broadcasts || options.only_broadcasts {
        None
    } else {
        Some(slow_reader(options, context, &server, &fleet, agents, folder, &label).await?)
    };
    if options.only_broadcasts {
        fleet.close().await;
        drop(server);
        let _ = std::fs::remove_dir_all(&site.root);
        return Ok(SizeResult {
            agents,
            raw_fanouts,
            server_fanouts,
            slow_reader,
            raw_storm,
            server_storms: Vec::new(),
            changeovers: Vec::new(),
            changeovers_after_storm: Vec::new(),
        });
    }
    tokio::time::sleep(options.settle).await;
    let mut server_storms = Vec::new();
    let mut server = server;
    for policy in [ReturnPolicy::AtOnce, ReturnPolicy::LikeTheAgent] {
        fleet.set_policy(policy);
        let (result, restarted) = storm(options, server, &fleet, Restart::Installed(&site)).await?;
        println!(
            "{label} [server restart storm, {policy}] {}",
            show_storm(&result)
        );
        server_storms.push(result);
        server = restarted;
        tokio::time::sleep(options.settle).await;
    }
    fleet.close().await;
    drop(server);
    let _ = std::fs::remove_dir_all(&site.root);

    // 3. The changeover with grace 0: in fresh installs, and once more in an install whose
    //    server has measured a restart storm already, as any server that ever restarted
    //    with its fleet connected has.
    let mut changeovers = Vec::new();
    let mut changeovers_after_storm = Vec::new();
    for (policy, after_storm) in [
        (ReturnPolicy::AtOnce, false),
        (ReturnPolicy::LikeTheAgent, false),
        (ReturnPolicy::LikeTheAgent, true),
    ] {
        let mut changeover_options = context.options.clone();
        changeover_options.agent_policy = policy;
        let policy_context = RunContext {
            options: &changeover_options,
            agent_bin: context.agent_bin.clone(),
            feed: context.feed.clone(),
            feed_url: context.feed_url.clone(),
        };
        let name = match (policy, after_storm) {
            (ReturnPolicy::AtOnce, _) => "changeover-at-once",
            (ReturnPolicy::LikeTheAgent, false) => "changeover-like-the-agent",
            (ReturnPolicy::LikeTheAgent, true) => "changeover-after-a-storm",
        };
        let site = Site::install(&policy_context, &folder.join(name))?;
        let step = if after_storm {
            warm_up(options, &site, agents, &label).await?;
            format!("{label} [changeover after a restart storm, {policy}]")
        } else {
            format!("{label} [changeover, {policy}]")
        };
        let (run, server, fleet) = measure_update(
            &policy_context,
            &site,
            &[],
            Expectation::Commit,
            folder,
            &step,
        )
        .await?;
        let server_log = server_log::read(&server.log).unwrap_or_default();
        let back = return_figures(&run, &fleet.events(), &server_log);
        println!("{step} {}", show_return(&back));
        fleet.close().await;
        drop(server);
        let _ = std::fs::remove_dir_all(&site.root);
        let changeover = Changeover {
            policy,
            after_storm,
            run,
            back,
        };
        if after_storm {
            changeovers_after_storm.push(changeover);
        } else {
            changeovers.push(changeover);
        }
    }

    Ok(SizeResult {
        agents,
        raw_fanouts,
        server_fanouts,
        slow_reader,
        raw_storm,
        server_storms,
        changeovers,
        changeovers_after_storm,
    })
}

/// The installed server started, a fleet opened, one restart storm with the agents coming
/// back like the real agent, and a graceful stop: the server has measured its handshake rate and kept it in
/// `state/handshake-rate.json`, as a server that restarted with its fleet once has.
async fn warm_up(
    options: &ScaleOptions,
    site: &Site,
    agents: usize,
    label: &str,
) -> anyhow::Result<()> {
    let server = ServerProcess::start_installed_logging(
        &site.server_bin(),
        &site.root,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &[],
    )
    .await?;
    let fleet = open_fleet(options, &server, agents, "warm-up").await?;
    // Coming back like the real agent: agents retrying every 10 ms overrun the listen
    // backlog, wait for their SYN to be sent again, and never keep the server busy.
    fleet.set_policy(ReturnPolicy::LikeTheAgent);
    tokio::time::sleep(options.settle).await;
    let (result, mut server) = storm(options, server, &fleet, Restart::Installed(site)).await?;
    println!(
        "{label} [warm-up restart storm, like the agent] {}",
        show_storm(&result)
    );
    fleet.close().await;
    // A graceful stop writes the estimate if the storm has not been written yet.
    server
        .stop_with(rustix::process::Signal::TERM, Duration::from_secs(30))
        .await?;
    let saved = site
        .layout
        .state_dir()
        .join(changeover_server::handshake_rate::FILE_NAME);
    match std::fs::read_to_string(&saved) {
        Ok(text) => println!(
            "{label} [warm-up] {}: {}",
            saved.display(),
            text.trim().replace('\n', " ")
        ),
        Err(err) => println!("{label} [warm-up] no {}: {err}", saved.display()),
    }
    Ok(())
}

// How many broadcasts each server gets: none with `--skip-broadcasts`.
fn broadcasts(options: &ScaleOptions) -> usize {
    if options.skip_broadcasts {
        0
    } else {
        options.broadcasts
    }
}

async fn open_fleet(
    options: &ScaleOptions,
    server: &ServerProcess,
    agents: usize,
    name: &str,
) -> anyhow::Result<ReturningFleet> {
    let mut fleet_options = ReturningFleetOptions::new(server.url(), agents);
    fleet_options.id_prefix = format!("{name}-{}", std::process::id());
    fleet_options.retry = options.retry;
    fleet_options.open_patience = options.patience;
    let started = Instant::now();
    let fleet = ReturningFleet::open(&fleet_options).await?;
    println!(
        "[{agents} agents] {name}: fleet welcomed in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(fleet)
}

/// The raw server's broadcast: SIGUSR1, then every agent's read of it.
async fn raw_broadcast(
    options: &ScaleOptions,
    raw: &ServerProcess,
    fleet: &ReturningFleet,
    agents: usize,
) -> anyhow::Result<FanOut> {
    let mark = fleet.mark();
    let before = SystemTime::now();
    let cpu = CpuMeter::start(raw.pid())?;
    raw.signal(rustix::process::Signal::USR1)?;
    if !fleet
        .wait_until_warned(mark, agents, options.patience)
        .await
    {
        bail!("the raw broadcast did not reach all {agents} agents");
    }
    let (server_cpu, loadgen_cpu) = cpu.stop()?;
    let sent = wait_for_log_line(&raw.log, before, "broadcast sent").await?;
    Ok(fan_out(fleet, mark, &sent, server_cpu, loadgen_cpu))
}

/// The changeover server's first countdown warning: `admin update --grace 300`, every
/// agent's read of the warning, then `admin cancel`.
async fn server_broadcast(
    options: &ScaleOptions,
    context: &RunContext<'_>,
    server: &ServerProcess,
    fleet: &ReturningFleet,
    agents: usize,
    folder: &Path,
) -> anyhow::Result<FanOut> {
    let mark = fleet.mark();
    let before = SystemTime::now();
    let cpu = CpuMeter::start(server.pid())?;
    let stderr_path = folder.join("admin-update-fanout.stderr");
    let mut update = tokio::process::Command::new(&context.agent_bin)
        .args(["admin", "update", "--server", &server.url(), "--json"])
        .args(["--grace", &FANOUT_GRACE_SECS.to_string()])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path)?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", context.agent_bin.display()))?;
    let warned = fleet
        .wait_until_warned(mark, agents, options.patience)
        .await;
    let (server_cpu, loadgen_cpu) = cpu.stop()?;
    // Whatever happened, the countdown must not reach its deadline.
    let cancel = admin(&context.agent_bin, server, &["cancel"]).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), update.wait()).await;
    let _ = update.kill().await;
    if !warned {
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        bail!(
            "the warning did not reach all {agents} agents within {} s; admin update: {}",
            options.patience.as_secs(),
            stderr.trim_end()
        );
    }
    cancel.context("admin cancel failed")?;
    let sent = wait_for_log_line(&server.log, before, "countdown warning sent").await?;
    Ok(fan_out(fleet, mark, &sent, server_cpu, loadgen_cpu))
}

fn fan_out(
    fleet: &ReturningFleet,
    mark: Mark,
    sent: &server_log::LogLine,
    server_cpu: CpuTime,
    loadgen_cpu: CpuTime,
) -> FanOut {
    let mut first_read = std::collections::HashMap::new();
    for event in fleet.events_since(mark) {
        if matches!(event.kind, AgentEventKind::Warned { .. }) {
            first_read.entry(event.agent).or_insert(event.wall);
        }
    }
    let mut before_trigger = 0;
    let latencies: Vec<Duration> = first_read
        .values()
        .map(|read| {
            read.duration_since(sent.at).unwrap_or_else(|_| {
                before_trigger += 1;
                Duration::ZERO
            })
        })
        .collect();
    FanOut {
        reached: field_u64(&sent.text, "reached").unwrap_or(0),
        send_us: field_u64(&sent.text, "send_us"),
        received: latencies.len(),
        latency: Latency::of(latencies),
        before_trigger,
        server_cpu,
        loadgen_cpu,
    }
}

// `name=value` among a log line's fields.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
}

fn field_u64(text: &str, name: &str) -> Option<u64> {
    field(text, name)?.parse().ok()
}

fn field_f64(text: &str, name: &str) -> Option<f64> {
    field(text, name)?.parse().ok()
}

async fn wait_for_log_line(
    log: &Path,
    after: SystemTime,
    message: &str,
) -> anyhow::Result<server_log::LogLine> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = server_log::read(log).unwrap_or_default();
        if let Some(line) = lines
            .into_iter()
            .find(|line| line.at >= after && line.is(message))
        {
            return Ok(line);
        }
        if Instant::now() > deadline {
            bail!("no {message:?} line in {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `agent_bin admin ARGS[0] --server URL ARGS[1..]`, without blocking the fleet's thread.
async fn admin(
    agent_bin: &Path,
    server: &ServerProcess,
    args: &[&str],
) -> anyhow::Result<std::process::Output> {
    let output = tokio::process::Command::new(agent_bin)
        .arg("admin")
        .arg(args[0])
        .args(["--server", &server.url()])
        .args(&args[1..])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot start {}", agent_bin.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "admin {} exited with {}: {}",
        args[0],
        output.status,
        String::from_utf8_lossy(&output.stderr).trim_end()
    );
    Ok(output)
}

/// CPU time of the server and of this process over one step.
struct CpuMeter {
    server: Pid,
    server_start: CpuTime,
    loadgen_start: CpuTime,
}

impl CpuMeter {
    fn start(server: u32) -> anyhow::Result<CpuMeter> {
        let server = Pid::Other(server);
        Ok(CpuMeter {
            server,
            server_start: procfs::cpu_time(server)?,
            loadgen_start: procfs::cpu_time(Pid::Myself)?,
        })
    }

    fn stop(self) -> anyhow::Result<(CpuTime, CpuTime)> {
        Ok((
            procfs::cpu_time(self.server)?.since(self.server_start),
            procfs::cpu_time(Pid::Myself)?.since(self.loadgen_start),
        ))
    }
}

/// Which server a storm restarts.
enum Restart<'a> {
    /// `raw-server` from this binary.
    Raw(&'a Path),
    /// The installed changeover server.
    Installed(&'a Site),
}

/// SIGTERM, wait for the exit, start the same server on the same address, and wait until
/// every agent is back.
async fn storm(
    options: &ScaleOptions,
    mut server: ServerProcess,
    fleet: &ReturningFleet,
    restart: Restart<'_>,
) -> anyhow::Result<(Storm, ServerProcess)> {
    let address = server.address;
    let policy = fleet.policy();
    let failed_before: usize = fleet.failed_attempts().values().sum();
    let mark = fleet.mark();
    let loadgen_start = procfs::cpu_time(Pid::Myself)?;
    let signal_to_exit = server
        .stop_with(rustix::process::Signal::TERM, Duration::from_secs(30))
        .await?;
    drop(server);
    let spawned = Instant::now();
    let server = match restart {
        Restart::Raw(loadgen_bin) => ServerProcess::start_raw_at(loadgen_bin, address).await?,
        Restart::Installed(site) => {
            ServerProcess::start_installed_logging(&site.server_bin(), &site.root, address, &[])
                .await?
        }
    };
    let listening = Instant::now();
    let start_to_listening = listening - spawned;
    let version = match restart {
        Restart::Raw(_) => "raw-baseline",
        Restart::Installed(_) => OLD_VERSION,
    };
    let all_back = fleet.wait_until_back(mark, version, options.patience).await;
    let server_cpu = procfs::cpu_time(Pid::Other(server.pid()))?;
    let loadgen_cpu = procfs::cpu_time(Pid::Myself)?.since(loadgen_start);
    let outage = Outage::of(&fleet.events_since(mark), mark.at, version);
    anyhow::ensure!(
        all_back,
        "only {} of {} agents were back within {} s; failed attempts: {:?}",
        outage.back,
        fleet.agents(),
        options.patience.as_secs(),
        fleet.failed_attempts()
    );
    let since_listening = |at: Option<(Instant, SystemTime)>| {
        at.map(|(at, _)| at.saturating_duration_since(listening))
    };
    let handshake_rate = match (outage.first_back, outage.last_back) {
        (Some((first, _)), Some((last, _))) if last > first => {
            outage.back as f64 / (last - first).as_secs_f64()
        }
        _ => 0.0,
    };
    let failed_after: usize = fleet.failed_attempts().values().sum();
    // The changeover server logs what it measured once the storm is over (within about
    // a second of the last handshake).
    let server_measured_per_sec = match restart {
        Restart::Raw(_) => None,
        // A log of its own: every line is the restarted process's.
        Restart::Installed(_) => {
            measured_in_storm(&server.log, SystemTime::UNIX_EPOCH, Duration::from_secs(3)).await
        }
    };
    Ok((
        Storm {
            policy,
            signal_to_exit,
            start_to_listening,
            listening_to_first_back: since_listening(outage.first_back),
            listening_to_all_back: since_listening(outage.last_back),
            back: outage.back,
            handshake_rate,
            failed_attempts: failed_after - failed_before,
            server_measured_per_sec,
            // The new process's whole life so far: start-up and the storm.
            server_cpu,
            loadgen_cpu,
        },
        server,
    ))
}

// The rate of the first "handshake rate measured in a storm" line after `after`, waiting up
// to `patience` for it.
async fn measured_in_storm(log: &Path, after: SystemTime, patience: Duration) -> Option<f64> {
    let deadline = Instant::now() + patience;
    loop {
        let found = server_log::read(log)
            .unwrap_or_default()
            .into_iter()
            .find(|line| line.at >= after && line.is("handshake rate measured in a storm"))
            .and_then(|line| field_f64(&line.text, "handshakes_per_sec"));
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One agent connection that never reads after its welcome, with a tiny receive buffer.
async fn open_slow_reader(
    server: SocketAddr,
    url: &str,
) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    // The kernel doubles it and keeps a floor of a few KiB: the smallest window it allows.
    socket.set_recv_buffer_size(1024)?;
    let tcp = socket.connect(server).await?;
    let request = url.into_client_request()?;
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(agent_websocket_config()))
            .await?;
    let hello = ClientMessage::Hello(AgentHello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: format!("slow-reader-{}", std::process::id()),
        user: "slow-reader".to_owned(),
        host: "loadgen".to_owned(),
        platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        instance_id: None,
    });
    ws.send(Message::text(serde_json::to_string(&hello)?))
        .await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerMessage>(&text)? {
                ServerMessage::Welcome { .. } => return Ok(ws),
                other => bail!("the slow reader got {other:?} instead of welcome"),
            },
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(err.into()),
            None => bail!("the slow reader's connection ended before its welcome"),
        }
    }
}

async fn slow_reader(
    options: &ScaleOptions,
    context: &RunContext<'_>,
    server: &ServerProcess,
    fleet: &ReturningFleet,
    agents: usize,
    folder: &Path,
    label: &str,
) -> anyhow::Result<SlowReader> {
    let pid = Pid::Other(server.pid());
    let rss_before_kib = procfs::resident_kib(pid)?;
    let mut reader = open_slow_reader(server.address, &server.url()).await?;
    let welcomed = SystemTime::now();
    let peer = reader.get_ref().local_addr()?;
    let mut fanouts = Vec::new();
    for index in 1..=options.broadcasts {
        tokio::time::sleep(options.settle).await;
        let fanout = server_broadcast(options, context, server, fleet, agents, folder).await?;
        println!(
            "{label} [server warning {index}, with a slow reader] {}",
            show_fanout(&fanout)
        );
        fanouts.push(fanout);
    }
    let rss_after_kib = procfs::resident_kib(pid)?;
    // Two silent heartbeat intervals, and a margin for the random phase.
    let patience = Duration::from_secs(options.heartbeat_secs * 3 + 10);
    let dropped =
        wait_for_log_line_within(&server.log, welcomed, "user=slow-reader", patience).await;
    let dropped_after = dropped.and_then(|line| line.at.duration_since(welcomed).ok());
    // Now read what it never read, down to the close frame.
    let mut close_code = None;
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(frame)) = reader.next().await {
            if let Message::Close(Some(frame)) = frame {
                close_code = Some(u16::from(frame.code));
            }
        }
    })
    .await;
    let _ = drained;
    let peer_field = format!("peer={peer} ");
    let server_said = server_log::read(&server.log)
        .unwrap_or_default()
        .into_iter()
        .find(|line| {
            line.at >= welcomed
                && format!("{} ", line.text).contains(&peer_field)
                && !line.is("agent connected")
                && !line.is("agent disconnected")
        })
        .map(|line| format!("{} {}", line.level, line.text));
    let slow = SlowReader {
        fanouts,
        rss_before_kib,
        rss_after_kib,
        dropped_after,
        close_code,
        server_said,
    };
    println!(
        "{label} [slow reader] server RSS {} KiB before, {} KiB after; dropped after {}; close code {}",
        slow.rss_before_kib,
        slow.rss_after_kib,
        slow.dropped_after
            .map_or("(not within the patience)".to_owned(), |after| format!(
                "{:.1} s",
                after.as_secs_f64()
            )),
        slow.close_code
            .map_or("(none)".to_owned(), |code| code.to_string())
    );
    if let Some(said) = &slow.server_said {
        println!("{label} [slow reader] the server logged: {said}");
    }
    Ok(slow)
}

// The first "agent disconnected" line naming `needle` after `after`.
async fn wait_for_log_line_within(
    log: &Path,
    after: SystemTime,
    needle: &str,
    patience: Duration,
) -> Option<server_log::LogLine> {
    let deadline = Instant::now() + patience;
    loop {
        let found = server_log::read(log)
            .unwrap_or_default()
            .into_iter()
            .find(|line| {
                line.at >= after && line.is("agent disconnected") && line.text.contains(needle)
            });
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn show_fanout(fanout: &FanOut) -> String {
    let mut notes = String::new();
    if let Some(send_us) = fanout.send_us {
        notes.push_str(&format!("; send took {send_us} µs"));
    }
    if fanout.before_trigger > 0 {
        notes.push_str(&format!(
            "; {} stamped before the log line",
            fanout.before_trigger
        ));
    }
    format!(
        "{} of {} read it: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; CPU server {:.2} s, load generator {:.2} s{notes}",
        fanout.received,
        fanout.reached,
        ms(fanout.latency.p50),
        ms(fanout.latency.p99),
        ms(fanout.latency.max),
        fanout.server_cpu.total().as_secs_f64(),
        fanout.loadgen_cpu.total().as_secs_f64(),
    )
}

fn show_storm(storm: &Storm) -> String {
    let show = |duration: Option<Duration>| {
        duration.map_or("-".to_owned(), |duration| format!("{:.0} ms", ms(duration)))
    };
    format!(
        "SIGTERM→exit {:.0} ms, start→listening {:.0} ms, listening→first back {}, →all {} back {}; \
         {:.0} handshakes/s{}; {} failed attempts; CPU server {:.2} s, load generator {:.2} s",
        ms(storm.signal_to_exit),
        ms(storm.start_to_listening),
        show(storm.listening_to_first_back),
        storm.back,
        show(storm.listening_to_all_back),
        storm.handshake_rate,
        storm
            .server_measured_per_sec
            .map_or(String::new(), |rate| format!(
                " (the server measured {rate:.0}/s)"
            )),
        storm.failed_attempts,
        storm.server_cpu.total().as_secs_f64(),
        storm.loadgen_cpu.total().as_secs_f64(),
    )
}

fn show_return(back: &Return) -> String {
    let show = |duration: Option<Duration>| {
        duration.map_or("-".to_owned(), |duration| format!("{:.0} ms", ms(duration)))
    };
    let mut text = format!(
        "window {} from {} handshakes/s ({}); accepting→first back {}, →last back {}; \
         peak {:.0} welcomes/s; {} refused with updating, {} other failed attempts",
        back.window_ms
            .map_or("-".to_owned(), |window| format!("{window} ms")),
        back.capacity_per_sec
            .map_or("-".to_owned(), |rate| format!("{rate:.0}")),
        match back.capacity_measured {
            Some(true) => "measured",
            Some(false) => "the default",
            None => "-",
        },
        show(back.accepting_to_first_back),
        show(back.accepting_to_last_back),
        back.peak_per_sec,
        back.refused_updating,
        back.failed_otherwise_total(),
    );
    if !back.failed_otherwise.is_empty() {
        text.push_str(&format!(" {:?}", back.failed_otherwise));
    }
    for line in &back.measured_before {
        text.push_str(&format!("\n    before: {line}"));
    }
    text
}

/// The median of each figure over the broadcasts.
fn median_fanout(fanouts: &[FanOut]) -> (f64, f64, f64) {
    let median = |pick: fn(&FanOut) -> Duration| {
        let mut values: Vec<f64> = fanouts.iter().map(|fanout| ms(pick(fanout))).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(0.0)
    };
    (
        median(|fanout| fanout.latency.p50),
        median(|fanout| fanout.latency.p99),
        median(|fanout| fanout.latency.max),
    )
}

/// The load generator's median CPU per broadcast, in seconds.
fn median_loadgen_cpu(fanouts: &[FanOut]) -> f64 {
    let mut values: Vec<f64> = fanouts
        .iter()
        .map(|fanout| fanout.loadgen_cpu.total().as_secs_f64())
        .collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn ratio(value: f64, baseline: f64) -> String {
    if baseline > 0.0 {
        format!("{:.2}", value / baseline)
    } else {
        "-".to_owned()
    }
}

/// The tables BENCHMARKS.md quotes.
pub fn summary(results: &[SizeResult]) -> String {
    let mut out = String::new();
    out.push_str("Broadcast fan-out (medians over the broadcasts; ratio = server / raw):\n\n");
    out.push_str("| agents | raw p50 | raw p99 | raw max | server p50 | p99 | max | max / raw max | with slow reader p50 | p99 | max | max / raw max | load generator CPU, raw / server |\n");
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for result in results {
        if result.raw_fanouts.is_empty() {
            continue;
        }
        let raw = median_fanout(&result.raw_fanouts);
        let server = median_fanout(&result.server_fanouts);
        let slow = median_fanout(
            result
                .slow_reader
                .as_ref()
                .map_or(&[][..], |slow| &slow.fanouts),
        );
        out.push_str(&format!(
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | **{}** | {:.1} ms | {:.1} ms | {:.1} ms | {} | {:.3} / {:.3} s |\n",
            result.agents,
            raw.0,
            raw.1,
            raw.2,
            server.0,
            server.1,
            server.2,
            ratio(server.2, raw.2),
            slow.0,
            slow.1,
            slow.2,
            ratio(slow.2, raw.2),
            median_loadgen_cpu(&result.raw_fanouts),
            median_loadgen_cpu(&result.server_fanouts),
        ));
    }
    out.push_str(
        "\nSlow reader (one agent that never reads, receive buffer at the kernel's minimum):\n\n",
    );
    out.push_str(
        "| agents | server RSS before | after its broadcasts | dropped after | close code |\n",
    );
    out.push_str("|---:|---:|---:|---:|---:|\n");
    for result in results {
        let Some(slow) = &result.slow_reader else {
            continue;
        };
        out.push_str(&format!(
            "| {} | {} KiB | {} KiB | {} | {} |\n",
            result.agents,
            slow.rss_before_kib,
            slow.rss_after_kib,
            slow.dropped_after.map_or("-".to_owned(), |after| format!(
                "{:.1} s",
                after.as_secs_f64()
            )),
            slow.close_code
                .map_or("-".to_owned(), |code| code.to_string()),
        ));
    }
    out.push_str("\nRestart storms (SIGTERM, start again on the same address):\n\n");
    out.push_str("| agents | server | agents come back | SIGTERM→exit | start→listening | listening→first back | listening→all back | handshakes/s | measured by the server | failed attempts | server CPU | load generator CPU |\n");
    out.push_str("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for result in results {
        let storms = result.raw_storm.iter().map(|storm| ("raw", storm)).chain(
            result
                .server_storms
                .iter()
                .map(|storm| ("changeover-server", storm)),
        );
        for (name, storm) in storms {
            let show = |duration: Option<Duration>| {
                duration.map_or("-".to_owned(), |duration| format!("{:.0} ms", ms(duration)))
            };
            out.push_str(&format!(
                "| {} | {name} | {} | {:.0} ms | {:.0} ms | {} | {} | {:.0} | {} | {} | {:.2} s | {:.2} s |\n",
                result.agents,
                storm.policy,
                ms(storm.signal_to_exit),
                ms(storm.start_to_listening),
                show(storm.listening_to_first_back),
                show(storm.listening_to_all_back),
                storm.handshake_rate,
                storm
                    .server_measured_per_sec
                    .map_or("-".to_owned(), |rate| format!("{rate:.0}/s")),
                storm.failed_attempts,
                storm.server_cpu.total().as_secs_f64(),
                storm.loadgen_cpu.total().as_secs_f64(),
            ));
        }
    }
    out.push_str("\nChangeover, grace 0 (1.0.0 → 2.0.0, no backups):\n\n");
    out.push_str("| agents | agents come back | window announced | server downtime_ms | first logout→first welcome (2.0.0) | first logout→all back | per agent p50 | p99 | max | request→changeover_finished | load generator CPU |\n");
    out.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let show = |duration: Option<Duration>| {
        duration.map_or("-".to_owned(), |duration| format!("{:.0} ms", ms(duration)))
    };
    for result in results {
        for Changeover {
            policy,
            after_storm,
            run,
            ..
        } in result
            .changeovers
            .iter()
            .chain(&result.changeovers_after_storm)
        {
            let policy = show_policy(*policy, *after_storm);
            out.push_str(&format!(
                "| {} | {policy} | {} | {} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.2} s |\n",
                result.agents,
                run.outage
                    .reconnect_within_ms
                    .map_or("-".to_owned(), |window| format!("{window} ms")),
                run.summary
                    .downtime_ms
                    .map_or("-".to_owned(), |downtime| format!("{downtime} ms")),
                show(run.outage.first_disconnect_to_first_back()),
                show(run.outage.first_disconnect_to_all_back()),
                ms(run.outage.per_agent.p50),
                ms(run.outage.per_agent.p99),
                ms(run.outage.per_agent.max),
                ms(run.request_to_finished),
                run.loadgen_cpu.total().as_secs_f64(),
            ));
        }
    }
    out.push_str("\nThe return after a changeover (accepting = the new release lets sessions in again, the end of downtime_ms):\n\n");
    out.push_str("| agents | agents come back | capacity the window came from | window announced | window for 100,000 at that capacity | accepting→first back | **accepting→last back** | peak welcomes/s (100 ms) | refused `updating` | other failed attempts |\n");
    out.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for result in results {
        for Changeover {
            policy,
            after_storm,
            back,
            ..
        } in result
            .changeovers
            .iter()
            .chain(&result.changeovers_after_storm)
        {
            let policy = show_policy(*policy, *after_storm);
            out.push_str(&format!(
                "| {} | {policy} | {} | {} | {} | {} | **{}** | {:.0} | {} | {} |\n",
                result.agents,
                back.capacity_per_sec.map_or("-".to_owned(), |rate| format!(
                    "{rate:.0}/s ({})",
                    if back.capacity_measured == Some(true) {
                        "measured"
                    } else {
                        "default"
                    }
                )),
                back.window_ms
                    .map_or("-".to_owned(), |window| format!("{window} ms")),
                back.capacity_per_sec.map_or("-".to_owned(), |rate| format!(
                    "{} ms",
                    changeover_server::handshake_rate::reconnect_window(100_000, rate).as_millis()
                )),
                show(back.accepting_to_first_back),
                show(back.accepting_to_last_back),
                back.peak_per_sec,
                back.refused_updating,
                back.failed_otherwise_total(),
            ));
        }
    }
    out
}

fn size_json(result: &SizeResult) -> Value {
    json!({
        "agents": result.agents,
        "broadcast": {
            "raw": result.raw_fanouts.iter().map(FanOut::to_json).collect::<Vec<_>>(),
            "server": result.server_fanouts.iter().map(FanOut::to_json).collect::<Vec<_>>(),
        },
        "slow_reader": result.slow_reader.as_ref().map(|slow| json!({
            "broadcasts": slow.fanouts.iter().map(FanOut::to_json).collect::<Vec<_>>(),
            "rss_before_kib": slow.rss_before_kib,
            "rss_after_kib": slow.rss_after_kib,
            "dropped_after_ms": slow.dropped_after.map(ms),
            "close_code": slow.close_code,
            "server_said": slow.server_said,
        })),
        "storm": {
            "raw": result.raw_storm.as_ref().map(Storm::to_json),
            "server": result.server_storms.iter().map(Storm::to_json).collect::<Vec<_>>(),
        },
        "changeover": result.changeovers.iter().map(changeover_json).collect::<Vec<_>>(),
        "changeover_after_storm": result
            .changeovers_after_storm
            .iter()
            .map(changeover_json)
            .collect::<Vec<_>>(),
    })
}

fn show_policy(policy: ReturnPolicy, after_storm: bool) -> String {
    if after_storm {
        format!("{policy}, after a restart storm")
    } else {
        policy.to_string()
    }
}

fn changeover_json(changeover: &Changeover) -> Value {
    let Changeover {
        policy,
        after_storm,
        run,
        back,
    } = changeover;
    json!({
        "policy": policy.to_string(),
        "after_storm": after_storm,
        "outcome": run.summary.outcome.to_string(),
        "server_version": NEW_VERSION,
        "downtime_ms": run.summary.downtime_ms,
        "reconnect_within_ms": run.outage.reconnect_within_ms,
        "disconnected": run.outage.disconnected,
        "back": run.outage.back,
        "first_logout_to_first_back_ms": run.outage.first_disconnect_to_first_back().map(ms),
        "first_logout_to_all_back_ms": run.outage.first_disconnect_to_all_back().map(ms),
        "per_agent_p50_ms": ms(run.outage.per_agent.p50),
        "per_agent_p99_ms": ms(run.outage.per_agent.p99),
        "per_agent_max_ms": ms(run.outage.per_agent.max),
        "request_to_finished_ms": ms(run.request_to_finished),
        "window_capacity_per_s": back.capacity_per_sec,
        "window_capacity_measured": back.capacity_measured,
        "accepting_to_first_back_ms": back.accepting_to_first_back.map(ms),
        "accepting_to_last_back_ms": back.accepting_to_last_back.map(ms),
        "peak_welcomes_per_s": back.peak_per_sec,
        "refused_updating": back.refused_updating,
        "failed_otherwise": back.failed_otherwise,
    })
}
