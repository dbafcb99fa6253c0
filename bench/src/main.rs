//! `changeover-loadgen`: parses the command line, sets up logging, calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use changeover_bench::agent_updates::{AgentUpdatesOptions, Check};
use changeover_bench::changeover::ChangeoverOptions;
use changeover_bench::download::DownloadOptions;
use changeover_bench::fleet::{DEFAULT_AGENTS_PER_SOURCE_ADDRESS, FleetOptions};
use changeover_bench::idle_rss::IdleRssOptions;
use changeover_bench::procfs::SettlePolicy;
use changeover_bench::returning_fleet::ReturnPolicy;
use changeover_bench::scale::ScaleOptions;
use clap::{Parser, Subcommand};

/// Load generator and measurements for the changeover server.
#[derive(Debug, Parser)]
#[command(name = "changeover-loadgen", version)]
struct Cli {
    /// Worker threads of the load generator's own runtime; 1 is a current-thread runtime.
    /// Raising it shows whether a figure is bounded by the load generator.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    loadgen_threads: u16,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open agent connections to a running server and hold them.
    Connect {
        /// The server, ws:// only.
        #[arg(long, default_value = "ws://127.0.0.1:7600")]
        url: String,
        #[arg(long)]
        agents: usize,
        /// Connections between TCP connect and welcome at once.
        #[arg(long, default_value_t = 500)]
        concurrency: usize,
        /// Hold the connections this many seconds [default: until Ctrl-C].
        #[arg(long)]
        hold_secs: Option<u64>,
        /// Connections from one loopback source address before the next (127.0.0.2, …).
        #[arg(long, default_value_t = DEFAULT_AGENTS_PER_SOURCE_ADDRESS)]
        per_source_address: usize,
    },
    /// Measure the server's resident memory per idle agent, against a raw baseline.
    IdleRss {
        /// The changeover-server binary to start.
        #[arg(long)]
        server_bin: PathBuf,
        /// Fleet size; repeat for several.
        #[arg(long = "agents", required = true)]
        agents: Vec<usize>,
        /// Connections between TCP connect and welcome at once.
        #[arg(long, default_value_t = 500)]
        concurrency: usize,
        /// Memory counts as settled when readings over this many seconds agree.
        #[arg(long, default_value_t = 2)]
        settle_secs: u64,
        /// Connections from one loopback source address before the next (127.0.0.2, …).
        #[arg(long, default_value_t = DEFAULT_AGENTS_PER_SOURCE_ADDRESS)]
        per_source_address: usize,
    },
    /// Time the server's download + verify of a large release from a local nginx, against
    /// curl fetching the same file; the server's memory and CPU while it downloads.
    Download {
        /// The release changeover-server: packs, installs, and is inside both releases.
        #[arg(long)]
        server_bin: PathBuf,
        /// The changeover-agent binary (admin status, admin download).
        #[arg(long)]
        agent_bin: PathBuf,
        #[arg(long, default_value = "nginx")]
        nginx_bin: PathBuf,
        #[arg(long, default_value = "curl")]
        curl_bin: PathBuf,
        /// Incompressible random data in the downloaded release, in MB (10^6 bytes).
        #[arg(long, default_value_t = 200)]
        payload_mb: u64,
        #[arg(long, default_value_t = 3)]
        repetitions: usize,
        /// Seconds one download may take.
        #[arg(long, default_value_t = 600)]
        patience_secs: u64,
        /// Keep the work folder (feed, nginx config and logs) instead of removing it.
        #[arg(long)]
        keep: bool,
    },
    /// Downtime of a changeover (last forced logout → new version accepting) and time of a
    /// rollback (failed health check → old version serving), with a large release and
    /// carried backups, against a plain restart and against copying the backups.
    Changeover {
        /// The release changeover-server: packs, installs, and is inside both releases.
        #[arg(long)]
        server_bin: PathBuf,
        /// The changeover-agent binary (admin status, download, update).
        #[arg(long)]
        agent_bin: PathBuf,
        #[arg(long, default_value = "nginx")]
        nginx_bin: PathBuf,
        #[arg(long, default_value = "curl")]
        curl_bin: PathBuf,
        /// Incompressible random data in release 2.0.0, in MB (10^6 bytes).
        #[arg(long, default_value_t = 50)]
        payload_mb: u64,
        /// Backup files in server/backups/...
        #[arg(long, default_value_t = 8)]
        backup_files: usize,
        /// ...of this many MiB each.
        #[arg(long, default_value_t = 128)]
        backup_file_mib: u64,
        /// Agents connected during the changeover; they come back at once.
        #[arg(long, default_value_t = 100)]
        agents: usize,
        /// The agents' pause between failed connection attempts, in ms.
        #[arg(long, default_value_t = 10)]
        retry_ms: u64,
        #[arg(long, default_value_t = 3)]
        repetitions: usize,
        /// Seconds one download or one changeover may take.
        #[arg(long, default_value_t = 600)]
        patience_secs: u64,
        /// Keep the work folder (feed, nginx config and logs) instead of removing it.
        #[arg(long)]
        keep: bool,
    },
    /// The scenarios at scale, each beside the raw baseline in the same run: broadcast
    /// fan-out, a slow reader among the agents, restart storms, and a changeover with grace 0.
    Scale {
        /// The release changeover-server: packs, installs, and is inside both releases.
        #[arg(long)]
        server_bin: PathBuf,
        /// The changeover-agent binary (admin status, download, update, cancel).
        #[arg(long)]
        agent_bin: PathBuf,
        #[arg(long, default_value = "nginx")]
        nginx_bin: PathBuf,
        #[arg(long, default_value = "curl")]
        curl_bin: PathBuf,
        /// Fleet size; repeat for several.
        #[arg(long = "agents", required = true)]
        agents: Vec<usize>,
        /// Broadcasts measured per server and fleet size.
        #[arg(long, default_value_t = 5)]
        broadcasts: usize,
        /// The changeover server's heartbeat_secs (a slow reader is dropped after two
        /// silent intervals).
        #[arg(long, default_value_t = 25)]
        heartbeat_secs: u64,
        /// Seconds any one step may take.
        #[arg(long, default_value_t = 120)]
        patience_secs: u64,
        /// The agents' pause between failed attempts when they come back at once, in ms.
        #[arg(long, default_value_t = 10)]
        retry_ms: u64,
        /// Pause before each measured step, in ms.
        #[arg(long, default_value_t = 500)]
        settle_ms: u64,
        /// Also write the results to this file as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Keep the work folder (feed, nginx files) instead of removing it.
        #[arg(long)]
        keep: bool,
        /// Only the restart storms and the changeovers: no broadcasts, no slow reader.
        #[arg(long, conflicts_with = "only_broadcasts")]
        skip_broadcasts: bool,
        /// Only the broadcasts: no slow reader, no restart storms, no changeovers.
        #[arg(long)]
        only_broadcasts: bool,
    },
    /// Many agents fetching the agent update from the server at once (503 + Retry-After
    /// honoured as the agent does), against a bare file server in the same run.
    AgentUpdates {
        /// The release changeover-server: packs, installs, and is the server release.
        #[arg(long)]
        server_bin: PathBuf,
        /// Put into the agent release as bin/changeover-agent [default: changeover-agent
        /// beside --server-bin].
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Incompressible random data in the agent release, in MB (10^6 bytes).
        #[arg(long, default_value_t = 20)]
        payload_mb: u64,
        /// The server's [agent_updates] max_transfers; repeat for one run per value.
        #[arg(long = "max-transfers", default_values_t = [8, 32, 128])]
        max_transfers: Vec<usize>,
        /// What each client checks of the file it received (SHA-256 of every byte makes
        /// the load generator the bottleneck on this machine).
        #[arg(long, value_enum, default_value_t = Check::Size)]
        check: Check,
        /// Sequential fetches for the single-stream baseline.
        #[arg(long, default_value_t = 20)]
        single_stream_fetches: usize,
        /// Seconds one fleet may take.
        #[arg(long, default_value_t = 900)]
        patience_secs: u64,
        /// Keep the work folder (releases, server logs) instead of removing it.
        #[arg(long)]
        keep: bool,
    },
    /// A bare tokio server that streams one file to every GET: the baseline of
    /// agent-updates.
    RawFileServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 4096)]
        backlog: u32,
        #[arg(long)]
        file: PathBuf,
        /// Transfers at once; the others wait on their connection. 0: no cap.
        #[arg(long, default_value_t = 0)]
        max_transfers: usize,
    },
    /// A bare tokio-tungstenite server with the changeover server's WebSocket settings:
    /// answers the first message with a fixed welcome and holds the connection.
    RawServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Listen backlog, as the changeover server's default.
        #[arg(long, default_value_t = 4096)]
        backlog: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // Child servers inherit the raised limit too.
    match changeover_server::platform::raise_open_file_limit() {
        // The raw server's stdout is read for its address; keep it to that line.
        Ok(limit) if matches!(cli.command, Command::RawServer { .. }) => {
            tracing::debug!(%limit, "raised the open-file limit");
        }
        Ok(limit) => println!("{limit}"),
        Err(err) => tracing::warn!(cause = %err, "cannot raise the open-file limit"),
    }
    let runtime = match &cli.command {
        // The baseline runs like the changeover server: a worker thread per core.
        Command::RawServer { .. } | Command::RawFileServer { .. } => tokio::runtime::Runtime::new(),
        // One thread is plenty to hold idle connections and leaves a core to the server.
        _ if cli.loadgen_threads == 1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(cli.loadgen_threads))
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Connect {
                url,
                agents,
                concurrency,
                hold_secs,
                per_source_address,
            } => {
                let mut options = FleetOptions::new(url, agents);
                options.concurrency = concurrency;
                options.agents_per_source_address = per_source_address;
                changeover_bench::fleet::connect_and_hold(
                    &options,
                    hold_secs.map(Duration::from_secs),
                )
                .await
            }
            Command::IdleRss {
                server_bin,
                agents,
                concurrency,
                settle_secs,
                per_source_address,
            } => {
                let options = IdleRssOptions {
                    server_bin,
                    raw_bin: match std::env::current_exe() {
                        Ok(path) => path,
                        Err(err) => return Err(anyhow::anyhow!("cannot find this binary: {err}")),
                    },
                    agents,
                    concurrency,
                    agents_per_source_address: per_source_address,
                    settle: SettlePolicy {
                        window: Duration::from_secs(settle_secs),
                        ..SettlePolicy::default()
                    },
                };
                changeover_bench::idle_rss::run(&options).await.map(drop)
            }
            Command::Download {
                server_bin,
                agent_bin,
                nginx_bin,
                curl_bin,
                payload_mb,
                repetitions,
                patience_secs,
                keep,
            } => {
                let options = DownloadOptions {
                    server_bin,
                    agent_bin,
                    nginx_bin,
                    curl_bin,
                    payload_mb,
                    repetitions,
                    patience: Duration::from_secs(patience_secs),
                    keep,
                };
                changeover_bench::download::run(&options).await.map(drop)
            }
            Command::Changeover {
                server_bin,
                agent_bin,
                nginx_bin,
                curl_bin,
                payload_mb,
                backup_files,
                backup_file_mib,
                agents,
                retry_ms,
                repetitions,
                patience_secs,
                keep,
            } => {
                let options = ChangeoverOptions {
                    server_bin,
                    agent_bin,
                    nginx_bin,
                    curl_bin,
                    payload_mb,
                    backup_files,
                    backup_file_mib,
                    agents,
                    retry: Duration::from_millis(retry_ms),
                    repetitions,
                    patience: Duration::from_secs(patience_secs),
                    keep,
                    agent_policy: ReturnPolicy::AtOnce,
                };
                changeover_bench::changeover::run(&options).await.map(drop)
            }
            Command::Scale {
                server_bin,
                agent_bin,
                nginx_bin,
                curl_bin,
                agents,
                broadcasts,
                heartbeat_secs,
                patience_secs,
                retry_ms,
                settle_ms,
                json,
                keep,
                skip_broadcasts,
                only_broadcasts,
            } => {
                let options = ScaleOptions {
                    server_bin,
                    agent_bin,
                    loadgen_bin: match std::env::current_exe() {
                        Ok(path) => path,
                        Err(err) => return Err(anyhow::anyhow!("cannot find this binary: {err}")),
                    },
                    nginx_bin,
                    curl_bin,
                    agents,
                    broadcasts,
                    heartbeat_secs,
                    patience: Duration::from_secs(patience_secs),
                    retry: Duration::from_millis(retry_ms),
                    settle: Duration::from_millis(settle_ms),
                    json,
                    keep,
                    skip_broadcasts,
                    only_broadcasts,
                    loadgen_threads: usize::from(cli.loadgen_threads),
                };
                changeover_bench::scale::run(&options).await.map(drop)
            }
            Command::AgentUpdates {
                server_bin,
                agent_bin,
                agents,
                payload_mb,
                max_transfers,
                check,
                single_stream_fetches,
                patience_secs,
                keep,
            } => {
                let options = AgentUpdatesOptions {
                    agent_bin: agent_bin
                        .unwrap_or_else(|| server_bin.with_file_name("changeover-agent")),
                    server_bin,
                    loadgen_bin: match std::env::current_exe() {
                        Ok(path) => path,
                        Err(err) => return Err(anyhow::anyhow!("cannot find this binary: {err}")),
                    },
                    agents,
                    payload_kb: payload_mb * 1000,
                    max_transfers,
                    check,
                    single_stream_fetches,
                    patience: Duration::from_secs(patience_secs),
                    keep,
                };
                changeover_bench::agent_updates::run(&options)
                    .await
                    .map(drop)
            }
            Command::RawFileServer {
                listen,
                backlog,
                file,
                max_transfers,
            } => {
                changeover_bench::raw_file_server::run(listen, backlog, &file, max_transfers).await
            }
            Command::RawServer { listen, backlog } => {
                changeover_bench::raw_server::run(listen, backlog).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
