//! `changeover-agent`: parses the command line, sets up logging, calls the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use changeover_agent::self_update::{self, Policy, UpdateSettings};
use changeover_agent::{admin, agent, dial::Dialer};
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

/// The workstation agent of a changeover server, and the admin commands.
#[derive(Debug, Parser)]
#[command(name = "changeover-agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr; RUST_LOG filters (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the background agent: stay connected to the server, reconnecting forever.
    Run(RunArgs),
    /// Install an agent release archive into a folder, verified against the vendor key
    /// with the signature beside the archive.
    Install {
        /// The folder to install into (new or empty); gets bin/changeover-agent,
        /// release.json and the vendor key.
        #[arg(long)]
        dir: PathBuf,
        /// The release archive (agent-<version>-<platform>.tar.gz), its .minisig beside it.
        #[arg(long)]
        package: PathBuf,
        /// The vendor's public key (minisign format).
        #[arg(long)]
        public_key: PathBuf,
    },
    /// Admin commands (need the admin password).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Print what the running agent tells the client application (the countdown, the
    /// logout, its own update) as it happens, following it across its restarts.
    Events(EventsArgs),
    /// Watches an updated agent on trial and puts the previous one back if it fails;
    /// started by the agent itself.
    #[command(hide = true)]
    TrialWatch {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        patience_secs: u64,
        #[arg(long)]
        detached: bool,
        #[arg(last = true)]
        run_args: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The server, ws://host:port or wss://host:port.
    #[arg(long)]
    server: String,
    /// The user name shown to the admin [default: the login name].
    #[arg(long)]
    user: Option<String>,
    /// Where the agent keeps its id [default: the user's state folder].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// A PEM file of CA certificates to trust for wss:// besides the public ones.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Run through `sh -c` on every countdown warning (details in CHANGEOVER_* variables).
    #[arg(long)]
    warn_hook: Option<String>,
    /// Run through `sh -c` when the server forces the logout: close the application here.
    #[arg(long)]
    logout_hook: Option<String>,
    /// The vendor key the agent checks its own updates against [default: vendor.pub
    /// beside the installed agent's release.json].
    #[arg(long)]
    public_key: Option<PathBuf>,
    /// Whether to install a newer agent the server offers: at once (auto), when
    /// --ask-hook exits 0 (ask), or not at all (never).
    #[arg(long, value_enum, default_value_t = Policy::Auto)]
    client_update: Policy,
    /// Seconds an updated agent has to be welcomed by the server before the previous one
    /// is put back.
    #[arg(long, default_value_t = changeover_agent::trial::DEFAULT_PATIENCE.as_secs())]
    update_trial_secs: u64,
    /// Run through `sh -c` when an agent update is offered and --client-update is ask;
    /// exit 0 to install it (CHANGEOVER_EVENT=ask, CHANGEOVER_TARGET_VERSION).
    #[arg(long)]
    ask_hook: Option<String>,
    /// The language of the user's messages: en, de, fr, or a locale such as de_DE.UTF-8
    /// [default: from LC_ALL, LC_MESSAGES or LANG; English without a catalogue for it].
    #[arg(long)]
    lang: Option<String>,
}

#[derive(Debug, Args)]
struct EventsArgs {
    /// The state folder of the agent to follow, as given to its `run` [default: the
    /// user's state folder].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// One JSON object per line (each flushed) instead of lines for people.
    #[arg(long)]
    json: bool,
    /// Print the agent's current state (one line) and exit; exit 1 when it is not running.
    #[arg(long)]
    once: bool,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Update the server: download, warn everyone, log out, swap, restart; follows it
    /// through the restart until the new version runs (exit 0) or it failed (exit 1).
    Update {
        #[command(flatten)]
        connection: AdminConnectionArgs,
        /// Seconds from the first warning to the forced logout (0 to 3600).
        #[arg(long, default_value_t = 120)]
        grace: u64,
        /// Who is to be mailed when it is over (recorded with the changeover).
        #[arg(long)]
        notify: Option<String>,
        /// The release to install [default: the newest available].
        #[arg(long)]
        version: Option<String>,
        /// Start at this time instead of now, RFC 3339 (2026-11-28T22:00:00Z) or a
        /// duration from now (30m, 2h).
        #[arg(long)]
        at: Option<String>,
        /// What the users are told with the warning.
        #[arg(long)]
        message: Option<String>,
        /// Accept a release that is not newer than the installed one.
        #[arg(long)]
        allow_downgrade: bool,
        /// One JSON object per event instead of lines for people.
        #[arg(long)]
        json: bool,
    },
    /// Call off a changeover that is scheduled or counting down; users are told.
    Cancel {
        #[command(flatten)]
        connection: AdminConnectionArgs,
    },
    /// Show the server's version, changeover phase and connected sessions.
    Status {
        #[command(flatten)]
        connection: AdminConnectionArgs,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Have the server fetch a release from its feed and verify it (no install yet).
    Download {
        #[command(flatten)]
        connection: AdminConnectionArgs,
        /// The release to fetch [default: the newest in the feed].
        #[arg(long)]
        version: Option<String>,
        /// Accept a release that is not newer than the installed one.
        #[arg(long)]
        allow_downgrade: bool,
        /// Print one JSON object per message instead of a progress bar.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct AdminConnectionArgs {
    /// The server, ws://host:port or wss://host:port.
    #[arg(long)]
    server: String,
    /// Read the admin password from this file [default: $CHANGEOVER_ADMIN_PASSWORD].
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust for wss:// besides the public ones.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    // The version is the installed release's, known only at run time.
    let version: &'static str =
        Box::leak(changeover_agent::version::running_version().into_boxed_str());
    let matches = Cli::command().version(version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    init_logging(
        cli.log_format,
        matches!(cli.command, Command::Admin(_) | Command::Events(_)),
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let done = runtime.block_on(dispatch(cli.command));
    // Connections and tasks end before the process becomes the new agent.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match done {
        Ok(Done::Exit) => ExitCode::SUCCESS,
        Ok(Done::Restart(exe, patience)) => {
            // The previous release watches the new one until the server has welcomed it.
            let watch = |pid: u32| {
                if let Some(dir) = exe.parent().and_then(Path::parent)
                    && changeover_agent::trial::current(dir).is_some()
                {
                    let watcher = dir
                        .join(changeover_agent::trial::PREVIOUS_DIR)
                        .join(changeover_protocol::release::ReleaseKind::Agent.binary_path());
                    let options = changeover_agent::trial::WatchOptions {
                        dir: dir.to_owned(),
                        pid,
                        patience,
                        run_args: std::env::args_os().skip(1).collect(),
                    };
                    if let Err(err) = changeover_agent::trial::start_watcher(&watcher, &options) {
                        eprintln!("warning: {err:#}; the update runs without a way back");
                    }
                }
            };
            let err = self_update::restart(&exe, watch);
            eprintln!(
                "error: the agent updated itself but cannot start {}: {err}",
                exe.display()
            );
            ExitCode::FAILURE
        }
        Err(err) => {
            // The reason may quote the server (a refusal's message): shown, not obeyed.
            let reason = format!("{err:#}");
            eprintln!(
                "error: {}",
                changeover_protocol::text::escape_control(&reason)
            );
            ExitCode::FAILURE
        }
    }
}

/// How a command ended.
enum Done {
    Exit,
    /// The agent updated itself: start the new binary in this process, watched for this
    /// long.
    Restart(PathBuf, std::time::Duration),
}

async fn dispatch(command: Command) -> anyhow::Result<Done> {
    match command {
        Command::TrialWatch {
            dir,
            pid,
            patience_secs,
            detached,
            run_args,
        } => {
            let options = changeover_agent::trial::WatchOptions {
                dir,
                pid,
                patience: std::time::Duration::from_secs(patience_secs),
                run_args,
            };
            tokio::task::spawn_blocking(move || {
                if detached {
                    changeover_agent::trial::watch(&options)
                } else {
                    changeover_agent::trial::detach(&options)
                }
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|result| result)
            .map(|()| Done::Exit)
        }
        Command::Run(args) => {
            let state_dir = match args.state_dir {
                Some(dir) => dir,
                None => default_state_dir()?,
            };
            if args.client_update == Policy::Ask && args.ask_hook.is_none() {
                anyhow::bail!("--client-update ask needs an --ask-hook to ask with");
            }
            let trial_patience = std::time::Duration::from_secs(args.update_trial_secs);
            let options = agent::AgentOptions {
                server_url: args.server.clone(),
                user: args.user,
                state_dir: state_dir.clone(),
                ca_file: args.ca_file.clone(),
                hooks: changeover_agent::hooks::Hooks::new(
                    args.warn_hook,
                    args.logout_hook,
                    changeover_agent::i18n::Language::choose(args.lang.as_deref()),
                ),
                updates: UpdateSettings {
                    policy: args.client_update,
                    ask_hook: args.ask_hook,
                    public_key: args.public_key,
                    state_dir,
                    server_url: args.server,
                    ca_file: args.ca_file,
                },
            };
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            match agent::run(options, shutdown).await? {
                agent::AgentExit::Stopped => Ok(Done::Exit),
                agent::AgentExit::Restart(exe) => Ok(Done::Restart(exe, trial_patience)),
            }
        }
        Command::Events(args) => {
            let options = changeover_agent::events::FollowOptions {
                state_dir: match args.state_dir {
                    Some(dir) => dir,
                    None => default_state_dir()?,
                },
                json: args.json,
                once: args.once,
            };
            let stop = CancellationToken::new();
            tokio::spawn(stop_on_signal(stop.clone()));
            changeover_agent::events::follow(&options, &mut tokio::io::stdout(), &stop)
                .await
                .map(|()| Done::Exit)
        }
        Command::Install {
            dir,
            package,
            public_key,
        } => {
            let version = self_update::install(&self_update::InstallOptions {
                dir: dir.clone(),
                package,
                public_key,
            })?;
            println!(
                "installed agent {version} in {}",
                dir.join("bin/changeover-agent").display()
            );
            Ok(Done::Exit)
        }
        Command::Admin(AdminCommand::Status { connection, json }) => {
            let password = admin::admin_password(connection.password_file.as_deref())?;
            let dialer = Dialer::new(&connection.server, connection.ca_file.as_deref())?;
            admin::status_command(&dialer, password, json)
                .await
                .map(|()| Done::Exit)
        }
        Command::Admin(AdminCommand::Update {
            connection,
            grace,
            notify,
            version,
            at,
            message,
            allow_downgrade,
            json,
        }) => {
            let password = admin::admin_password(connection.password_file.as_deref())?;
            let dialer = Dialer::new(&connection.server, connection.ca_file.as_deref())?;
            let request = admin::UpdateOptions {
                grace_secs: grace,
                notify,
                version,
                at: at.map(|at| admin::parse_when(&at)).transpose()?,
                message,
                allow_downgrade,
            };
            admin::update_command(&dialer, password, request, json)
                .await
                .map(|()| Done::Exit)
        }
        Command::Admin(AdminCommand::Cancel { connection }) => {
            let password = admin::admin_password(connection.password_file.as_deref())?;
            let dialer = Dialer::new(&connection.server, connection.ca_file.as_deref())?;
            admin::cancel_command(&dialer, password)
                .await
                .map(|()| Done::Exit)
        }
        Command::Admin(AdminCommand::Download {
            connection,
            version,
            allow_downgrade,
            json,
        }) => {
            let password = admin::admin_password(connection.password_file.as_deref())?;
            let dialer = Dialer::new(&connection.server, connection.ca_file.as_deref())?;
            admin::download_command(&dialer, password, version, allow_downgrade, json)
                .await
                .map(|()| Done::Exit)
        }
    }
}

fn default_state_dir() -> anyhow::Result<PathBuf> {
    dirs::state_dir()
        .or_else(dirs::data_local_dir)
        .map(|dir| dir.join("changeover-agent"))
        .ok_or_else(|| anyhow::anyhow!("no state folder known for this user; pass --state-dir"))
}

async fn stop_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    shutdown.cancel();
}

// Admin commands print results on stdout; their log stays quiet unless RUST_LOG asks.
fn init_logging(format: LogFormat, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if quiet { "warn" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only for a person at a terminal, not in a log file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
