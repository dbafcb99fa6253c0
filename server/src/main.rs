//! `changeover-server`: parses the command line, sets up logging, calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};

/// The application server that updates itself safely while people use it.
#[derive(Debug, Parser)]
#[command(name = "changeover-server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr; RUST_LOG filters (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install a server release into DIR/NAME (DIR/server) for the first time, verified
    /// like an update.
    Install {
        /// The product folder.
        #[arg(long)]
        root: PathBuf,
        /// Which application install in the product folder: DIR/NAME, its own state.
        #[arg(long, default_value = changeover_server::layout::INSTALL_DIR_NAME)]
        name: String,
        /// The release archive; its signature FILE.minisig must lie beside it.
        #[arg(long)]
        package: PathBuf,
        /// The vendor's public key (minisign format).
        #[arg(long)]
        public_key: PathBuf,
    },
    /// The vendor's release tools.
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// The whole changeover on this machine with nothing set up: a temporary product
    /// folder, a local feed with a newer signed release, agents, and the update.
    Demo {
        /// How many agents (the first one is the admin).
        #[arg(long, default_value_t = 3)]
        agents: usize,
        /// Seconds from the first warning to the forced logout.
        #[arg(long, default_value_t = 10)]
        grace: u64,
        /// Keep the temporary folder afterwards.
        #[arg(long)]
        keep: bool,
        /// Start the changeover yourself, in the web console (the demo prints its URL and
        /// the admin password), instead of the scripted `admin update`.
        #[arg(long)]
        console: bool,
    },
    /// The demo's stand-in for the vendor's application (an order book over HTTP), run by
    /// the server from the demo release's `app.toml`.
    #[command(hide = true)]
    DemoApp {
        /// Only check that it could run (the preflight's self-check).
        #[arg(long)]
        check: bool,
    },
    /// The watchdog a changeover starts when no service manager supervises the server: it
    /// waits for the new release's verdict and puts the old release back if none comes.
    #[command(hide = true)]
    Watchdog {
        #[command(flatten)]
        options: changeover_server::changeover::watchdog::WatchOptions,
        /// The process that does the waiting (the first one only starts it).
        #[arg(long)]
        detached: bool,
    },
    /// The swap on Windows, run by a changeover from a copy of the new binary in the state
    /// folder: waits for the old server to end, exchanges the releases, starts the new one
    /// and waits for its verdict, rolling back without one.
    #[command(hide = true)]
    SwapHelper {
        #[command(flatten)]
        options: changeover_server::changeover::watchdog::WatchOptions,
        /// Only finish the rollback of a new release that has ended.
        #[arg(long)]
        roll_back: bool,
    },
    /// Register the server as a Windows service, or remove it (Windows only).
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Run every preflight check against an installed server and its feed without changing
    /// anything; say what would fail and how to fix it. Exit 1 if a changeover would fail.
    Doctor {
        /// The product folder.
        #[arg(long)]
        root: PathBuf,
        /// Which application install in the product folder: DIR/NAME, its own state.
        #[arg(long, default_value = changeover_server::layout::INSTALL_DIR_NAME)]
        name: String,
    },
    /// Check that this release can serve a product folder (read its config and state)
    /// without changing anything; run by a changeover before anyone is warned.
    SelfCheck {
        #[arg(long)]
        root: PathBuf,
        /// Which application install in the product folder: DIR/NAME, its own state.
        #[arg(long, default_value = changeover_server::layout::INSTALL_DIR_NAME)]
        name: String,
    },
    /// Run the server for a product folder.
    Run {
        /// The product folder: holds server/ (the install) and state/.
        #[arg(long)]
        root: PathBuf,
        /// Which application install in the product folder: DIR/NAME, its own state.
        #[arg(long, default_value = changeover_server::layout::INSTALL_DIR_NAME)]
        name: String,
        /// Address to listen on [default: server.listen from the config, 127.0.0.1:7600].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Where to serve the web console: an address, "auto" (the next port after
        /// --listen's) or "off" [default: console.listen from the config, auto].
        #[arg(long, value_name = "ADDR|auto|off")]
        console_listen: Option<changeover_server::console::ConsoleListen>,
        /// Put in the service's command line by `service install`: the Windows service
        /// manager starts this process, so it connects to its dispatcher.
        #[arg(long, hide = true)]
        as_service: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// Register DIR/NAME's server as the service `changeover-NAME`, started with the
    /// machine and restarted by the service manager when it crashes.
    Install {
        /// The product folder.
        #[arg(long)]
        root: PathBuf,
        /// Which application install in the product folder.
        #[arg(long, default_value = changeover_server::layout::INSTALL_DIR_NAME)]
        name: String,
    },
    /// Stop the service `changeover-NAME` and remove it; the install stays.
    Uninstall {
        /// The product folder.
        #[arg(long)]
        root: PathBuf,
        /// Which application install in the product folder.
        #[arg(long, default_value = changeover_server::layout::INSTALL_DIR_NAME)]
        name: String,
    },
    /// Start a service again once the process `--after-pid` has ended (used by a server
    /// that hands over to another release while it runs as the service).
    #[command(hide = true)]
    Restart {
        #[arg(long)]
        service_name: String,
        #[arg(long)]
        after_pid: u32,
    },
}

#[derive(Debug, Subcommand)]
enum ReleaseCommand {
    /// Create an Ed25519 key pair for signing releases (minisign format).
    Keygen {
        #[arg(long)]
        secret_key: PathBuf,
        #[arg(long)]
        public_key: PathBuf,
        /// Encrypt the secret key with the password in this file [or $CHANGEOVER_SIGNING_PASSWORD].
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Replace existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Pack a release tree into a signed archive and add it to a feed folder.
    Pack {
        #[arg(long, value_parser = ["server", "agent"])]
        kind: String,
        /// The release's semantic version, such as 1.4.0.
        #[arg(long)]
        version: String,
        /// The release tree: bin/changeover-server (or -agent) plus its resources.
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        secret_key: PathBuf,
        /// The secret key's password, if it has one [or $CHANGEOVER_SIGNING_PASSWORD].
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// The feed folder (created if missing).
        #[arg(long)]
        feed: PathBuf,
        /// Release notes shown to the admin.
        #[arg(long, default_value = "")]
        notes: String,
        /// The platform the release is for [default: this machine's, such as linux-x86_64].
        #[arg(long)]
        platform: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    // The version is the installed release's, known only at run time.
    let version: &'static str =
        Box::leak(changeover_server::version::running_version().into_boxed_str());
    let matches = Cli::command().version(version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run {
            root,
            name,
            listen,
            console_listen,
            as_service,
        } => {
            let options = changeover_server::RunOptions {
                root,
                name,
                listen,
                console_listen,
            };
            // The socket comes first, before the runtime opens its own descriptors, so it
            // is descriptor 3 and can be handed over to the next release in place.
            changeover_server::layout::check_install_name(&options.name).and_then(|()| {
                changeover_server::service::run_under_any_manager(
                    &options.name.clone(),
                    as_service,
                    move || {
                        let listener = changeover_server::open_listener(&options)?;
                        tokio::runtime::Runtime::new()
                            .context("cannot start the async runtime")?
                            .block_on(changeover_server::run(options, listener))
                    },
                )
            })
        }
        Command::SwapHelper { options, roll_back } => {
            changeover_server::changeover::swap_helper::run(&options, roll_back)
        }
        Command::Service(command) => changeover_server::service::command(match command {
            ServiceCommand::Install { root, name } => {
                changeover_server::service::ServiceAction::Install { root, name }
            }
            ServiceCommand::Uninstall { root, name } => {
                changeover_server::service::ServiceAction::Uninstall { root, name }
            }
            ServiceCommand::Restart {
                service_name,
                after_pid,
            } => changeover_server::service::ServiceAction::Restart {
                service_name,
                after_pid,
            },
        }),
        Command::Demo {
            agents,
            grace,
            keep,
            console,
        } => tokio::runtime::Runtime::new()
            .context("cannot start the async runtime")
            .and_then(|runtime| {
                runtime.block_on(changeover_server::demo::run(
                    changeover_server::demo::DemoOptions {
                        agents,
                        grace_secs: grace,
                        keep,
                        console,
                    },
                ))
            })
            .and_then(|ok| {
                if ok {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!(
                        "the demo changeover did not end on the new version"
                    ))
                }
            }),
        Command::Watchdog { options, detached } => {
            if detached {
                changeover_server::changeover::watchdog::watch(&options)
            } else {
                changeover_server::changeover::watchdog::detach(&options)
            }
        }
        Command::DemoApp { check: true } => changeover_server::demo_app::check(),
        Command::DemoApp { check: false } => tokio::runtime::Runtime::new()
            .context("cannot start the async runtime")
            .and_then(|runtime| runtime.block_on(changeover_server::demo_app::run())),
        Command::Doctor { root, name } => changeover_server::layout::check_install_name(&name)
            .and_then(|()| tokio::runtime::Runtime::new().context("cannot start the async runtime"))
            .and_then(|runtime| {
                runtime.block_on(changeover_server::doctor::examine_named(&root, &name))
            })
            .and_then(|findings| {
                print!("{}", changeover_server::doctor::render(&findings));
                if changeover_server::doctor::blocks_changeover(&findings) {
                    Err(anyhow::anyhow!(
                        "a changeover would fail; see the fixes above"
                    ))
                } else {
                    Ok(())
                }
            }),
        Command::SelfCheck { root, name } => changeover_server::layout::check_install_name(&name)
            .and_then(|()| changeover_server::self_check(&root, &name))
            .map(|version| {
                println!("changeover-server {version} ok");
            }),
        Command::Install {
            root,
            name,
            package,
            public_key,
        } => changeover_server::layout::check_install_name(&name)
            .and_then(|()| install(root, name, package, public_key)),
        Command::Release(command) => release(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn install(
    root: PathBuf,
    name: String,
    package: PathBuf,
    public_key: PathBuf,
) -> anyhow::Result<()> {
    let options = changeover_server::install::InstallOptions {
        root,
        name,
        package,
        public_key,
    };
    let version = changeover_server::install::install(&options)?;
    println!(
        "installed server {version} into {}",
        options.root.join(&options.name).display()
    );
    Ok(())
}

fn release(command: ReleaseCommand) -> anyhow::Result<()> {
    use changeover_server::release_tools::{self, KeygenOptions, PackOptions};
    match command {
        ReleaseCommand::Keygen {
            secret_key,
            public_key,
            password_file,
            force,
        } => {
            let options = KeygenOptions {
                secret_key,
                public_key,
                password: signing_password(password_file.as_deref())?,
                force,
            };
            release_tools::keygen(&options)?;
            println!("secret key: {}", options.secret_key.display());
            println!("public key: {}", options.public_key.display());
            Ok(())
        }
        ReleaseCommand::Pack {
            kind,
            version,
            from,
            secret_key,
            password_file,
            feed,
            notes,
            platform,
        } => {
            let options = PackOptions {
                kind: kind.parse().map_err(anyhow::Error::msg)?,
                version: version.parse().map_err(|err| {
                    anyhow::anyhow!("{version:?} is not a semantic version such as 1.4.0: {err}")
                })?,
                from,
                secret_key,
                password: signing_password(password_file.as_deref())?,
                feed,
                platform: platform.unwrap_or_else(changeover_protocol::release::current_platform),
                notes,
            };
            let packed = release_tools::pack(&options)?;
            let entry = &packed.entry;
            if packed.unchanged {
                println!(
                    "{} {} for {} is already in the feed with these exact bytes",
                    entry.kind, entry.version, entry.platform
                );
            } else {
                println!(
                    "packed {} {} for {}: {} bytes, sha256 {}",
                    entry.kind, entry.version, entry.platform, entry.size, entry.sha256
                );
            }
            println!("{}", packed.archive.display());
            Ok(())
        }
    }
}

// A password never comes from a prompt: a file, else the environment, else none.
fn signing_password(password_file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    use anyhow::Context as _;
    if let Some(path) = password_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the password file {}", path.display()))?;
        return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
    }
    Ok(
        std::env::var(changeover_server::release_tools::SIGNING_PASSWORD_ENV)
            .ok()
            .filter(|password| !password.is_empty()),
    )
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Stderr, and the product folder's state/server.log once `run` has attached it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(changeover_server::log_file::Tee::default);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
