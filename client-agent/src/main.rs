//! `changeover-agent`: parses the command line, sets up logging, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Admin commands (need the admin password).
    #[command(subcommand)]
    Admin(AdminCommand),
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
    /// The vendor key for the agent's own updates. Accepted for the command-line contract;
    /// this build does not update itself yet and says so in its log.
    #[arg(long)]
    public_key: Option<PathBuf>,
    /// auto, ask or never. Accepted for the command-line contract; see --public-key.
    #[arg(long, value_parser = ["auto", "ask", "never"])]
    client_update: Option<String>,
    /// Accepted for the command-line contract; see --public-key.
    #[arg(long)]
    ask_hook: Option<String>,
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
    init_logging(cli.log_format, matches!(cli.command, Command::Admin(_)));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            let state_dir = match args.state_dir {
                Some(dir) => dir,
                None => default_state_dir()?,
            };
            if args.public_key.is_some() || args.client_update.is_some() || args.ask_hook.is_some()
            {
                tracing::warn!(
                    "--public-key, --client-update and --ask-hook are accepted, but this build \
                     of the agent does not update itself yet"
                );
            }
            let options = agent::AgentOptions {
                server_url: args.server,
                user: args.user,
                state_dir,
                ca_file: args.ca_file,
                hooks: changeover_agent::hooks::Hooks {
                    warn: args.warn_hook,
                    logout: args.logout_hook,
                },
            };
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            agent::run(options, shutdown).await
        }
        Command::Admin(AdminCommand::Status { connection, json }) => {
            let password = admin::admin_password(connection.password_file.as_deref())?;
            let dialer = Dialer::new(&connection.server, connection.ca_file.as_deref())?;
            admin::status_command(&dialer, password, json).await
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
            admin::update_command(&dialer, password, request, json).await
        }
        Command::Admin(AdminCommand::Cancel { connection }) => {
            let password = admin::admin_password(connection.password_file.as_deref())?;
            let dialer = Dialer::new(&connection.server, connection.ca_file.as_deref())?;
            admin::cancel_command(&dialer, password).await
        }
        Command::Admin(AdminCommand::Download {
            connection,
            version,
            allow_downgrade,
            json,
        }) => {
            let password = admin::admin_password(connection.password_file.as_deref())?;
            let dialer = Dialer::new(&connection.server, connection.ca_file.as_deref())?;
            admin::download_command(&dialer, password, version, allow_downgrade, json).await
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
