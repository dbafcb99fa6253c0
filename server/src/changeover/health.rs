//! The new release's health check, and the commit that follows it.
//!
//! Healthy means, in this order: the carried files are all there as recorded and the
//! state folder is writable ([`check_files`], before the new applications start and may
//! change them); then every application of the release passes its probe, and the server
//! completes a real WebSocket handshake and hello/welcome with itself on its own port,
//! over TLS when it serves TLS ([`check_serving`]). Only then is the old release deleted.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use changeover_protocol::{AgentHello, ChangeoverOutcome, PROTOCOL_VERSION, ServerMessage};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use tracing::info;

use super::driver::summarize;
use super::journal::{Journal, JournalFiles};
use super::{carry, fault_point, fault_requested};
use crate::layout::Layout;

/// How long the hello with itself may take.
const SELF_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The first part of the check: the files the new release was given. They are compared
/// with what was recorded before the stop only once, before any application of the new
/// release ran: a later start after a crash finds them as the new applications left them,
/// which is the site's data now, not damage.
pub async fn check_files(
    layout: &Layout,
    files: &JournalFiles,
    journal: &mut Journal,
) -> anyhow::Result<()> {
    fault_point("health_check");
    if fault_requested("unhealthy") {
        bail!(
            "the health check failed on purpose ({}=unhealthy)",
            super::FAULT_ENV
        );
    }
    if !journal.carried_checked {
        let install = layout.install_dir();
        let carried = journal.carried.clone();
        tokio::task::spawn_blocking(move || carry::verify(&install, &carried))
            .await
            .context("the check task failed")??;
        journal.carried_checked = true;
        files.save(journal)?;
    }
    let probe = layout.state_dir().join(".health-probe");
    std::fs::write(&probe, b"ok").context("the state folder is not writable")?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// How the server says hello to itself.
pub struct SelfHello {
    /// The listening address (an unspecified address is reached on loopback).
    pub address: SocketAddr,
    /// Set when the port speaks TLS: trusts exactly the server's own certificate.
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// The agent id the connection code answers without taking a session.
    pub agent_id: String,
    /// The version the welcome must report.
    pub server_version: String,
    /// The listener's door, shut while the check runs: the hello is let through it.
    pub door: std::sync::Arc<crate::listener::Door>,
}

impl std::fmt::Debug for SelfHello {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SelfHello")
            .field("address", &self.address)
            .field("tls", &self.tls.is_some())
            .field("server_version", &self.server_version)
            .finish_non_exhaustive()
    }
}

/// The second part: the applications healthy by `deadline`, and the server serving.
pub async fn check_serving(
    apps: &crate::apps::Apps,
    deadline: tokio::time::Instant,
    hello: &SelfHello,
) -> anyhow::Result<()> {
    apps.wait_healthy(deadline).await?;
    fault_point("apps_healthy");
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    tokio::time::timeout(remaining.min(SELF_HELLO_TIMEOUT), say_hello(hello))
        .await
        .map_err(|_| anyhow::anyhow!("the server did not answer its own hello in time"))?
        .context("the server does not serve agents on its own port")
}

/// Connects to the server's own port as an agent would and checks the welcome.
pub async fn say_hello(hello: &SelfHello) -> anyhow::Result<()> {
    let connect_to = if hello.address.ip().is_unspecified() {
        let loopback: std::net::IpAddr = if hello.address.is_ipv6() {
            std::net::Ipv6Addr::LOCALHOST.into()
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        };
        SocketAddr::new(loopback, hello.address.port())
    } else {
        hello.address
    };
    // Bound first, so the door knows the connection before the accept loop can see it.
    let socket = if connect_to.is_ipv6() {
        tokio::net::TcpSocket::new_v6()
    } else {
        tokio::net::TcpSocket::new_v4()
    }
    .context("cannot make a socket")?;
    socket
        .bind(SocketAddr::new(connect_to.ip(), 0))
        .context("cannot bind a socket on loopback")?;
    hello
        .door
        .let_through(socket.local_addr().context("the socket has no address")?);
    let tcp = socket
        .connect(connect_to)
        .await
        .with_context(|| format!("cannot connect to {connect_to}"))?;
    let greeting = changeover_protocol::ClientMessage::Hello(AgentHello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: hello.agent_id.clone(),
        user: "changeover".to_owned(),
        host: "health-check".to_owned(),
        platform: changeover_protocol::release::current_platform(),
        agent_version: hello.server_version.clone(),
        instance_id: None,
    });
    let welcome = match &hello.tls {
        Some(connector) => {
            let name = rustls::pki_types::ServerName::try_from("localhost")
                .context("a server name")?
                .to_owned();
            let stream = connector
                .connect(name, tcp)
                .await
                .context("the TLS handshake with itself failed")?;
            exchange(&format!("wss://{connect_to}/"), stream, &greeting).await?
        }
        None => exchange(&format!("ws://{connect_to}/"), tcp, &greeting).await?,
    };
    match welcome {
        ServerMessage::Welcome { server_version, .. } if server_version == hello.server_version => {
            info!("the server answered its own hello");
            Ok(())
        }
        ServerMessage::Welcome { server_version, .. } => bail!(
            "the port is served by version {server_version}, not {}",
            hello.server_version
        ),
        other => {
            let text = serde_json::to_string(&other).unwrap_or_default();
            bail!(
                "the server answered its hello with {}",
                text.chars().take(300).collect::<String>()
            )
        }
    }
}

async fn exchange<S>(
    url: &str,
    stream: S,
    greeting: &changeover_protocol::ClientMessage,
) -> anyhow::Result<ServerMessage>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .context("the WebSocket handshake with itself failed")?;
    let text = serde_json::to_string(greeting).context("cannot encode the hello")?;
    ws.send(Message::text(text))
        .await
        .context("cannot send the hello")?;
    let answer = loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => break text,
            Some(Ok(Message::Close(frame))) => bail!(
                "the server closed the connection: {}",
                frame
                    .map(|frame| frame.reason.to_string())
                    .unwrap_or_default()
            ),
            Some(Ok(_)) => {}
            Some(Err(err)) => bail!("the connection failed: {err}"),
            None => bail!("the server closed the connection without a welcome"),
        }
    };
    let _ = ws.close(None).await;
    serde_json::from_str(answer.as_str()).context("the server's answer is not a message")
}

/// Records the commit, moves the old release out of its place, lets agent sessions in
/// again (`let_sessions_in`), deletes the old release and records the success; returns
/// the summary. An error means the commit could not be recorded: nothing was moved and
/// no session let in, so the caller rolls back. Once it is recorded the commit only goes
/// forward: what fails after that is logged, and the journal, saying `committing`, has
/// the next start finish it instead of ever exchanging a half-deleted release back. The
/// downtime ends when `let_sessions_in` has run: that is when users can work again; the
/// delete of the old files does not keep them waiting.
pub async fn commit(
    layout: &Layout,
    files: &JournalFiles,
    journal: &Journal,
    let_sessions_in: impl std::future::Future<Output = ()>,
) -> anyhow::Result<changeover_protocol::ChangeoverSummary> {
    fault_point("committing");
    let mut journal = journal.clone();
    journal.committing = true;
    files
        .save(&journal)
        .context("cannot record the commit in the journal")?;
    fault_point("commit_recorded");
    // The old release leaves its place in one rename before sessions are let in; the
    // delete of its files, which takes as long as the release is large, comes after, while
    // people work again. The journal says `committing` until it is done, so a crash in the
    // delete is finished by the next start.
    let layout_for_delete = layout.clone();
    let moved = tokio::task::spawn_blocking(move || move_old_release_aside(&layout_for_delete))
        .await
        .context("the cleanup task failed")
        .and_then(|moved| moved);
    if let Err(err) = &moved {
        // Recorded already: the next start moves and deletes it; users need not wait.
        tracing::error!(cause = %format!("{err:#}"), "the old release stays in place for now");
    }
    let_sessions_in.await;
    let sessions_from = SystemTime::now();
    info!("agent sessions let in again");
    // From here on the new release serves: what fails is logged, and the journal, still
    // saying `committing`, has the next start finish it. A leftover folder must not stop
    // a healthy server.
    let layout_for_delete = layout.clone();
    let deleted = match moved {
        Ok(()) => tokio::task::spawn_blocking(move || delete_old_release(&layout_for_delete))
            .await
            .context("the cleanup task failed")
            .and_then(|deleted| deleted),
        Err(err) => Err(err),
    };
    let summary = committed_summary(&journal, Some(sessions_from));
    match deleted.and_then(|()| files.finish(&summary)) {
        Ok(()) => info!(
            from = %summary.from_version,
            to = %summary.target_version,
            downtime_ms = ?summary.downtime_ms,
            "changeover committed"
        ),
        Err(err) => tracing::error!(
            cause = %format!("{err:#}"),
            "the new release serves, but the commit is not finished; the next start finishes it"
        ),
    }
    Ok(summary)
}

/// The summary of a committed changeover; the downtime runs from the last logout written
/// (`stopped_at`) to `sessions_from`, when agent sessions were let in again (unknown when a
/// commit is finished by a later start).
pub fn committed_summary(
    journal: &Journal,
    sessions_from: Option<SystemTime>,
) -> changeover_protocol::ChangeoverSummary {
    let mut summary = summarize(journal, ChangeoverOutcome::Committed, journal.phase, None);
    summary.reason = None;
    summary.downtime_ms = journal
        .stopped_at
        .zip(sessions_from)
        .and_then(|(stopped, taken)| taken.duration_since(stopped).ok())
        .map(|downtime| downtime.as_millis() as u64);
    summary
}

/// Deletes `<name>_old`: first renamed out of the way in one step (so it is either whole
/// at its place or not there at all), then removed; safe to repeat.
pub fn delete_old_release(layout: &Layout) -> anyhow::Result<()> {
    move_old_release_aside(layout)?;
    let doomed = layout.doomed_install_dir();
    if doomed.exists() {
        if fault_requested("commit_deleted_partly") {
            if let Some(Ok(entry)) = std::fs::read_dir(&doomed)?.next() {
                let _ = std::fs::remove_dir_all(entry.path());
                let _ = std::fs::remove_file(entry.path());
            }
            fault_point("commit_deleted_partly");
        }
        std::fs::remove_dir_all(&doomed).context("cannot delete the old release")?;
    }
    Ok(())
}

/// Renames `<name>_old` to the folder [`delete_old_release`] deletes, in one step, deleting
/// what an earlier, unfinished delete left there first; safe to repeat.
fn move_old_release_aside(layout: &Layout) -> anyhow::Result<()> {
    let old = layout.old_install_dir();
    let doomed = layout.doomed_install_dir();
    if old.exists() {
        if doomed.exists() {
            std::fs::remove_dir_all(&doomed)
                .with_context(|| format!("cannot delete {}", doomed.display()))?;
        }
        std::fs::rename(&old, &doomed)
            .with_context(|| format!("cannot move {} out of the way", old.display()))?;
    }
    Ok(())
}

/// The message admins get when it is over.
pub fn finished(summary: changeover_protocol::ChangeoverSummary) -> ServerMessage {
    ServerMessage::ChangeoverFinished(summary)
}
