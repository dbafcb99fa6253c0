//! The changeover server: holds a WebSocket session with every agent, knows who is
//! connected, and answers admins.
//!
//! [`run`] is what `changeover-server run` does; the modules are its parts. The binary's
//! `main.rs` only parses the command line and sets up logging.

pub mod auth;
pub mod config;
pub mod connection;
pub mod download;
pub mod feed;
pub mod handshake;
pub mod hub;
pub mod inbox;
pub mod install;
pub mod layout;
pub mod listener;
pub mod platform;
pub mod release_tools;
pub mod releases;
pub mod tls;
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

use crate::auth::{ADMIN_PASSWORD_ENV, AdminAuth, PasswordOrigin};
use crate::config::Config;
use crate::connection::ConnectionContext;
use crate::hub::HubHandle;
use crate::layout::Layout;
use crate::listener::Listener;
use crate::releases::{ReleaseSettings, Releases};

/// How long shutdown waits for connections to send their close frames.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What `changeover-server run` was given.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The product folder.
    pub root: PathBuf,
    /// Overrides `server.listen` from the config.
    pub listen: Option<SocketAddr>,
}

/// Runs the server until SIGINT or SIGTERM, then closes every session with a reason.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    match platform::raise_open_file_limit() {
        Ok(limit) => info!(%limit, "one file descriptor per agent"),
        Err(err) => warn!(cause = %err, "cannot raise the open-file limit"),
    }
    let layout = Layout::new(&options.root);
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
            println!("generated admin password (shown only now): {password}");
        }
    }

    let tls = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(
            &layout.resolve_install_path(cert),
            &layout.resolve_install_path(key),
        )?),
        _ => None,
    };
    let address = options.listen.unwrap_or(config.server.listen);
    let tcp = listener::bind(address, config.server.listen_backlog)
        .with_context(|| format!("cannot listen on {address}"))?;
    let bound = tcp
        .local_addr()
        .context("cannot read the listening address")?;
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let server_version = version::running_version();
    // A plain line on stdout for scripts and tests; the same in the log.
    println!("listening on {scheme}://{bound}");
    info!(version = %server_version, address = %bound, %scheme, "server started");

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
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
    {
        let releases = Arc::clone(&releases);
        let inbox = layout.inbox_dir();
        let shutdown = shutdown.clone();
        let check_interval = Duration::from_secs(config.feed.check_interval_secs);
        tracker.spawn(async move {
            let loaded = Arc::clone(&releases);
            let _ = tokio::task::spawn_blocking(move || loaded.load_downloads()).await;
            tokio::spawn(check_feed_periodically(
                Arc::clone(&releases),
                check_interval,
                shutdown.clone(),
            ));
            inbox::watch(inbox, releases, shutdown).await;
        });
    }
    let context = Arc::new(ConnectionContext {
        hub: HubHandle::spawn(config.server.max_sessions),
        auth,
        releases,
        server_version,
        heartbeat: config.server.heartbeat_interval(),
        hello_timeout: config.server.handshake_timeout(),
        write_timeout: config.server.write_timeout(),
        shutdown: shutdown.clone(),
    });
    let listener = Listener {
        tcp,
        tls,
        handshake_slots: Arc::new(Semaphore::new(config.server.max_concurrent_handshakes)),
        context,
        tracker: tracker.clone(),
    };
    let accept_loop = tokio::spawn(listener.run());

    wait_for_stop_signal().await?;
    info!("stopping: closing every session");
    shutdown.cancel();
    let _ = accept_loop.await;
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
    info!("stopped");
    Ok(())
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
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("cannot watch SIGINT")?,
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("cannot watch Ctrl-C")?;
    Ok(())
}
