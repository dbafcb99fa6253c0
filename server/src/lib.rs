//! The changeover server: holds a WebSocket session with every agent, knows who is
//! connected, and answers admins.
//!
//! [`run`] is what `changeover-server run` does; the modules are its parts. The binary's
//! `main.rs` only parses the command line and sets up logging.

pub mod agent_updates;
pub mod apps;
pub mod audit;
pub mod auth;
pub mod changeover;
pub mod config;
pub mod connection;
pub mod console;
pub mod demo;
pub mod demo_app;
pub mod doctor;
pub mod download;
pub mod feed;
pub mod handshake;
pub mod handshake_rate;
pub mod hub;
pub mod inbox;
pub mod install;
pub mod layout;
pub mod listener;
pub mod log_file;
pub mod mail;
pub mod peer;
pub mod platform;
pub mod release_tools;
pub mod releases;
pub mod service;
pub mod tls;
pub mod unattended;
pub mod unwritten;
pub mod version;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::agent_updates::{AgentUpdateSettings, AgentUpdates};
use crate::auth::{ADMIN_PASSWORD_ENV, AdminAuth, PasswordOrigin};
use crate::changeover::driver::{Collaborators, Driver};
use crate::changeover::journal::JournalFiles;
use crate::changeover::recovery::Resume;
use crate::config::Config;
use crate::connection::ConnectionContext;
use crate::hub::HubHandle;
use crate::layout::Layout;
use crate::listener::{Listener, ListenerControl};
use crate::releases::{ReleaseSettings, Releases};

/// How long shutdown waits for connections to send their close frames.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What `changeover-server run` was given.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The product folder.
    pub root: PathBuf,
    /// Which install in it (`--name`, default `server`).
    pub name: String,
    /// Overrides `server.listen` from the config.
    pub listen: Option<SocketAddr>,
    /// Overrides `console.listen` from the config.
    pub console_listen: Option<console::ConsoleListen>,
}

/// The listening socket, made before anything else so that it is file descriptor 3 and
/// can be handed to the next process image in a changeover; inherited from the previous
/// image (or systemd socket activation) when there is one. Call it before starting the
/// async runtime.
pub fn open_listener(options: &RunOptions) -> anyhow::Result<std::net::TcpListener> {
    if let Some(inherited) = platform::inherited_listener() {
        inherited
            .set_nonblocking(true)
            .context("cannot use the inherited socket")?;
        return Ok(inherited);
    }
    // Only read: an unfinished changeover may have moved the config into the new release,
    // and nothing may be created in the install before recovery has put things back.
    let layout = Layout::named(&options.root, &options.name);
    let config = match std::fs::read_to_string(layout.config_file()) {
        Ok(text) => {
            Config::parse(&text)
                .with_context(|| format!("invalid config {}", layout.config_file().display()))?
                .0
        }
        Err(_) => Config::default(),
    };
    let address = options.listen.unwrap_or(config.server.listen);
    let tcp = listener::bind_std_with_patience(
        address,
        config.server.listen_backlog,
        platform::BIND_PATIENCE,
    )
    .with_context(|| format!("cannot listen on {address}"))?;
    Ok(tcp)
}

/// Windows: a helper outside both releases finishes the rollback the journal records once
/// this process (the new release, running from the install) has ended; this process ends
/// now (as a service, reporting itself stopped, so the helper can start it again).
fn hand_over_roll_back(
    layout: &Layout,
    changeover_id: &str,
    restart_args: &[std::ffi::OsString],
) -> anyhow::Result<()> {
    let options = changeover::watchdog::WatchOptions {
        root: layout.root().to_owned(),
        name: layout.name().to_owned(),
        changeover_id: changeover_id.to_owned(),
        pid: std::process::id(),
        patience: Duration::ZERO,
        service: service::windows_service_name(),
        run_args: restart_args.to_vec(),
    };
    changeover::swap_helper::hand_over_roll_back(layout, &options)
        .context("cannot hand the rollback over to a swap helper")?;
    info!("the rollback is finished outside this release; this process ends");
    service::exit_now(0)
}

/// Runs the server until SIGINT or SIGTERM, then closes every session with a reason.
pub async fn run(options: RunOptions, std_listener: std::net::TcpListener) -> anyhow::Result<()> {
    // The socket has its descriptor: the log file may have the next one.
    let layout = Layout::named(&options.root, &options.name);
    log_file::attach(&layout.state_dir());
    // From the first moment on, also through recovery and a new release's health check
    // (each bounded by its own timeout): only a process that hangs stops pinging.
    service::spawn_watchdog_pings(CancellationToken::new());
    match platform::raise_open_file_limit() {
        Ok(limit) => info!(%limit, "one file descriptor per agent"),
        Err(err) => warn!(cause = %err, "cannot raise the open-file limit"),
    }
    std::fs::create_dir_all(layout.state_dir())
        .with_context(|| format!("cannot create {}", layout.state_dir().display()))?;
    // Which process serves (a watchdog may have become the server after a failed release).
    if let Err(err) = std::fs::write(
        layout.state_dir().join("server.pid"),
        format!("{}\n", std::process::id()),
    ) {
        warn!(cause = %err, "cannot write server.pid");
    }
    let server_version = version::running_version();
    let bound = std_listener
        .local_addr()
        .context("cannot read the listening address")?;
    let mut restart_args: Vec<std::ffi::OsString> = vec![
        "run".into(),
        "--root".into(),
        options.root.clone().into_os_string(),
        "--name".into(),
        options.name.clone().into(),
        "--listen".into(),
        bound.to_string().into(),
    ];

    // Applications a killed predecessor left running are stopped first: their data must
    // be at rest before recovery moves any folder, and their ports free for the next start.
    let apps_dir = layout.apps_dir();
    let orphans = tokio::task::spawn_blocking(move || apps::stop_orphans(&apps_dir))
        .await
        .unwrap_or_default();
    if !orphans.is_empty() {
        warn!(
            ?orphans,
            "stopped applications left running by the previous server process"
        );
    }

    // An unfinished changeover is settled before anything else.
    let journal_files = JournalFiles::new(&layout.state_dir());
    let resume = changeover::recovery::recover(&layout, &journal_files, &server_version)?;
    if let Resume::Restart(binary) = &resume {
        info!(binary = %binary.display(), "handing over to the installed release");
        let err = platform::reexec(binary, &restart_args, Some(&std_listener));
        anyhow::bail!("cannot start {}: {err}", binary.display());
    }
    if let Resume::HandOver(changeover_id) = &resume {
        return hand_over_roll_back(&layout, changeover_id, &restart_args);
    }

    layout.create_dirs()?;
    let loaded = Config::load_or_create(&layout.config_file())?;
    if loaded.created {
        info!(path = %layout.config_file().display(), "wrote the default config");
    }
    for key in &loaded.unknown_keys {
        warn!(%key, "config key not known to this version; ignored");
    }
    let config = loaded.config;

    let (auth, origin) = AdminAuth::load_or_create(
        &layout.admin_credentials_file(),
        std::env::var(ADMIN_PASSWORD_ENV).ok(),
    )?;
    match origin {
        PasswordOrigin::Stored => {}
        PasswordOrigin::FromEnvironment => {
            info!("admin password set from {ADMIN_PASSWORD_ENV}");
        }
        PasswordOrigin::Generated(password) => {
            // Shown once, on stdout rather than in the log, and never again.
            say(&format!(
                "generated admin password (shown only now): {password}"
            ));
        }
    }

    let tls = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(
            &layout.resolve_install_path(cert),
            &layout.resolve_install_path(key),
        )?),
        _ => None,
    };
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let self_tls = match &config.tls.cert {
        Some(cert) if tls.is_some() => {
            Some(tls::self_connector(&layout.resolve_install_path(cert))?)
        }
        _ => None,
    };
    // The console is a convenience: a port it cannot have leaves the server running.
    let console_listen = match options.console_listen {
        Some(listen) => listen,
        None => config.console.listen()?,
    };
    let console_socket = console::bind_for(console_listen, bound);
    let console_url = match console_socket
        .as_ref()
        .map(tokio::net::TcpListener::local_addr)
    {
        Some(Ok(console_bound)) => {
            // The next release (exec'd in place) serves the console on the same port.
            restart_args.push("--console-listen".into());
            restart_args.push(console_bound.to_string().into());
            let url = console::url(console_bound, tls.is_some());
            say(&format!("console on {url}"));
            info!(%url, "web console served");
            Some(url)
        }
        Some(Err(err)) => {
            warn!(cause = %err, "cannot read the console's address");
            None
        }
        None => None,
    };
    // A plain line on stdout for scripts and tests; the same in the log.
    say(&format!("listening on {scheme}://{bound}"));
    info!(version = %server_version, address = %bound, %scheme, "server started");

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    // What recovery could not record (a full disk) is recorded once there is room.
    tracker.spawn(journal_files.clone().retry_unwritten(shutdown.clone()));
    let releases = Releases::new(ReleaseSettings {
        feed_url: config.feed.url.clone(),
        public_key: layout.resolve_install_path(&config.feed.public_key),
        allow_downgrade: config.feed.allow_downgrade,
        downloads_dir: layout.downloads_dir(),
        inbox_dir: layout.inbox_dir(),
        installed_version: server_version
            .parse()
            .unwrap_or(semver::Version::new(0, 0, 0)),
        retry_base: Duration::from_secs(1),
    });
    let hub = HubHandle::spawn(
        config.server.max_sessions,
        config.server.max_sessions_per_address,
    );
    let hub_for_health = hub.clone();
    let checking_health = matches!(resume, Resume::HealthCheck(_));
    if checking_health {
        // No user session before the new release proved healthy: a rollback would cut it.
        hub.close_door().await;
    }
    // Returning agents wait before their handshake meanwhile, and are taken once it opens.
    // At most as many held as the kernel's backlog would hold.
    let door = listener::Door::new(
        !checking_health,
        usize::try_from(config.server.listen_backlog).unwrap_or(usize::MAX),
    );
    let agent_updates = AgentUpdates::new(
        Arc::clone(&releases),
        AgentUpdateSettings {
            enabled: config.agent_updates.enabled,
            max_transfers: config.agent_updates.max_transfers,
            write_timeout: config.server.write_timeout(),
        },
    );
    tracker.spawn(Arc::clone(&agent_updates).run(hub.clone(), shutdown.clone()));
    let (changeover, driver_inbox) = changeover::driver::channel(&layout.state_dir());
    let apps = apps::Apps::new(layout.install_dir(), layout.apps_dir());
    let self_check_id = format!(
        "changeover-self-check-{}",
        hex::encode(rand::random::<[u8; 16]>())
    );
    let changeover_handle = changeover.clone();
    // Measured in every storm of handshakes, kept across releases: what sizes the window
    // a changeover spreads the agents' return over.
    let handshake_rate = handshake_rate::HandshakeRate::load(&layout.state_dir());
    tracker.spawn(Arc::clone(&handshake_rate).keep_saved(shutdown.clone()));
    let mail_settings = mail::MailSettings {
        smtp_url: config.mail.smtp_url.clone(),
        from: config.mail.from.clone(),
        to: config.mail.to.clone(),
    };
    let context = Arc::new(ConnectionContext {
        hub: hub.clone(),
        auth,
        releases: Arc::clone(&releases),
        agent_updates,
        changeover,
        state_dir: layout.state_dir(),
        mail_problem: mail_settings.problem(),
        server_version: server_version.clone(),
        heartbeat: config.server.heartbeat_interval(),
        hello_timeout: config.server.handshake_timeout(),
        write_timeout: config.server.write_timeout(),
        shutdown: shutdown.clone(),
        apps: apps.clone(),
        self_check_id: self_check_id.clone(),
        audit: audit::AuditLog::new(&layout.state_dir()),
        console_url,
        handshake_rate: Arc::clone(&handshake_rate),
    });
    if let Some(socket) = console_socket {
        Arc::new(console::Console::new(Arc::clone(&context), tls.clone())).spawn(
            socket,
            &tracker,
            shutdown.clone(),
        );
    }
    let listener = Arc::new(Listener {
        tls,
        handshake_slots: Arc::new(Semaphore::new(config.server.max_concurrent_handshakes)),
        gate: crate::peer::HandshakeGate::new(
            config.server.max_handshakes_per_address,
            config.server.max_handshakes_per_address.saturating_mul(8),
        ),
        upgrade_timeout: config.server.upgrade_timeout(),
        context,
        tracker: tracker.clone(),
        door: Arc::clone(&door),
    });
    let tcp = tokio::net::TcpListener::from_std(std_listener)
        .context("cannot use the listening socket")?;
    let listener_control = ListenerControl::start(listener, tcp);

    let (driver, commands) = Driver::new(
        Collaborators {
            layout: layout.clone(),
            carry_paths: config.carry_over.paths.clone(),
            hub,
            releases: Arc::clone(&releases),
            listener: Arc::clone(&listener_control),
            server_version: server_version.clone(),
            restart_args: restart_args.clone(),
            apps: apps.clone(),
            health_timeout: Duration::from_secs(config.changeover.health_timeout_secs),
            watchdog: config.changeover.watchdog,
            mail_language: config.mail.language,
            handshake_rate,
        },
        driver_inbox,
    );
    let manifest = apps::Manifest::load(&layout.install_dir());
    if let Resume::HealthCheck(mut journal) = resume {
        driver.show_health_check(&journal);
        let health_timeout = Duration::from_secs(config.changeover.health_timeout_secs);
        let deadline = tokio::time::Instant::now() + health_timeout;
        let hello = changeover::health::SelfHello {
            address: bound,
            tls: self_tls,
            agent_id: self_check_id,
            server_version: server_version.clone(),
            door: Arc::clone(&door),
        };
        let check = async {
            changeover::health::check_files(&layout, &journal_files, &mut journal).await?;
            // Started only now: the carried files were checked as they arrived.
            if let Some(manifest) = manifest? {
                apps.start(&manifest);
                changeover::fault_point("apps_started");
            }
            changeover::health::check_serving(&apps, deadline, &hello).await
        };
        // The applications' wait ends at the deadline with their own reason; this bound
        // only catches a check that hangs elsewhere.
        let outcome = tokio::time::timeout(health_timeout + Duration::from_secs(10), check)
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "not healthy within {} s",
                    health_timeout.as_secs()
                ))
            });
        let committed = match outcome {
            // The old release goes first, then sessions are taken again: that ends the
            // downtime users see.
            Ok(()) => changeover::health::commit(&layout, &journal_files, &journal, async {
                hub_for_health.reopen().await;
                door.open();
            })
            .await
            .map_err(|err| {
                format!("the new release passed its health check, but cannot be committed: {err:#}")
            }),
            Err(err) => Err(format!("the new release failed its health check: {err:#}")),
        };
        match committed {
            Ok(summary) => {
                driver.clear_view();
                releases.publish(&changeover::health::finished(summary));
            }
            Err(reason) => {
                // The new applications stop before their folders are exchanged back.
                apps.stop_all().await;
                let resume = changeover::recovery::roll_back(
                    &layout,
                    &journal_files,
                    *journal,
                    reason,
                    &server_version,
                )?;
                if let Resume::HandOver(changeover_id) = &resume {
                    return hand_over_roll_back(&layout, changeover_id, &restart_args);
                }
                if let Resume::Restart(binary) = resume {
                    let tcp = listener_control
                        .pause()
                        .await
                        .context("the listening socket is gone")?
                        .into_std()
                        .context("cannot take the listening socket back")?;
                    let err = platform::reexec(&binary, &restart_args, Some(&tcp));
                    anyhow::bail!(
                        "cannot start the previous release {}: {err}",
                        binary.display()
                    );
                }
            }
        }
    } else {
        match manifest {
            Ok(Some(manifest)) => apps.start(&manifest),
            Ok(None) => {}
            // The server serves anyway: a site must never be locked out of it.
            Err(err) => tracing::error!(
                cause = %format!("{err:#}"),
                "cannot start the applications of this release"
            ),
        }
    }
    // The packages are verified again only now: after a changeover, hashing them would
    // compete with the health check and lengthen the downtime. Agents that return before
    // the agent release is loaded are offered it by broadcast when it is.
    {
        let releases = Arc::clone(&releases);
        let inbox = layout.inbox_dir();
        let shutdown = shutdown.clone();
        let check_interval = Duration::from_secs(config.feed.check_interval_secs);
        let journal_in_progress = journal_files.current.clone();
        tracker.spawn(async move {
            let loaded = Arc::clone(&releases);
            let _ = tokio::task::spawn_blocking(move || {
                loaded.load_downloads();
                // A changeover under way may still need its package.
                if !journal_in_progress.exists() {
                    loaded.prune();
                }
            })
            .await;
            tokio::spawn(check_feed_periodically(
                Arc::clone(&releases),
                check_interval,
                shutdown.clone(),
            ));
            inbox::watch(inbox, releases, shutdown).await;
        });
    }
    tracker.spawn(mail::run_sender(
        layout.state_dir(),
        mail_settings,
        shutdown.clone(),
    ));
    if config.unattended.enabled {
        let window = unattended::Window::parse(&config.unattended.window_utc)
            .map_err(|reason| anyhow::anyhow!("unattended.window_utc: {reason}"))?;
        tokio::spawn(unattended::run(
            window,
            config.unattended.grace_secs,
            Duration::from_secs(60).min(Duration::from_secs(config.feed.check_interval_secs)),
            Arc::clone(&releases),
            changeover_handle.clone(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(driver.run(commands));
    service::ready(&format!("serving version {server_version} on {bound}"));

    wait_for_stop_signal().await?;
    info!("stopping: closing every session");
    service::stopping();
    shutdown.cancel();
    let _ = listener_control.pause().await;
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = tracker.len(),
            "some connections did not close in time"
        );
    }
    if !apps.is_empty() {
        info!("stopping the applications, the last started first");
        apps.stop_all().await;
    }
    info!("stopped");
    Ok(())
}

/// `changeover-server self-check`: what a new release runs in the preflight, against the
/// product folder it is about to serve. Starts, reads the config it will get (without
/// writing anything), checks the state folder is readable, prints its version.
pub fn self_check(root: &std::path::Path, name: &str) -> anyhow::Result<String> {
    let layout = Layout::named(root, name);
    let text = std::fs::read_to_string(layout.config_file())
        .or_else(|err| {
            if err.kind() == std::io::ErrorKind::NotFound {
                Ok(config::DEFAULT_CONFIG.to_owned())
            } else {
                Err(err)
            }
        })
        .with_context(|| format!("cannot read {}", layout.config_file().display()))?;
    let (_config, unknown) = Config::parse(&text).with_context(|| {
        format!(
            "this release cannot read {}",
            layout.config_file().display()
        )
    })?;
    for key in unknown {
        eprintln!("note: config key {key} is not known to this release");
    }
    std::fs::read_dir(layout.state_dir())
        .with_context(|| format!("cannot read {}", layout.state_dir().display()))?;
    Ok(version::running_version())
}

// A line on stdout that must never take the server down: whoever read our stdout may be
// gone (a closed pipe after a restart in place), and `println!` would panic then.
fn say(line: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

async fn check_feed_periodically(
    releases: Arc<Releases>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    if releases.settings().feed_url.is_none() {
        return;
    }
    loop {
        releases.check_feed_if_older_than(interval / 2).await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    platform::wait_for_stop_request().await
}
