//! The new release's health check, and the commit that follows it.
//!
//! Healthy means: the carried files are all there as recorded, the state folder is
//! writable, and the server answers on its port (an HTTP request gets the server's own
//! `426` answer). Only then is the old release deleted.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use changeover_protocol::{ChangeoverOutcome, ServerMessage};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::info;

use super::driver::summarize;
use super::journal::{Journal, JournalFiles};
use super::{carry, fault_point, fault_requested};
use crate::layout::Layout;

/// Runs the checks; `tls` says whether the port speaks TLS (then only the TCP connect is
/// checked from here).
pub async fn check(
    layout: &Layout,
    journal: &Journal,
    address: SocketAddr,
    tls: bool,
) -> anyhow::Result<()> {
    fault_point("health_check");
    if fault_requested("unhealthy") {
        bail!(
            "the health check failed on purpose ({}=unhealthy)",
            super::FAULT_ENV
        );
    }
    let install = layout.install_dir();
    let carried = journal.carried.clone();
    tokio::task::spawn_blocking(move || carry::verify(&install, &carried))
        .await
        .context("the check task failed")??;
    let probe = layout.state_dir().join(".health-probe");
    std::fs::write(&probe, b"ok").context("the state folder is not writable")?;
    let _ = std::fs::remove_file(&probe);

    let connect_to = if address.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], address.port()))
    } else {
        address
    };
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(connect_to),
    )
    .await
    .context("the server does not accept connections on its port")?
    .with_context(|| format!("cannot connect to {connect_to}"))?;
    if !tls {
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .context("cannot send to the server's port")?;
        let mut answer = vec![0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
            .await
            .context("the server does not answer on its port")??;
        if !answer[..read].starts_with(b"HTTP/1.1 426") {
            bail!(
                "the server's port answered {:?}",
                String::from_utf8_lossy(&answer[..read])
            );
        }
    }
    Ok(())
}

/// Deletes the old release and records the success; returns the summary.
pub async fn commit(
    layout: &Layout,
    files: &JournalFiles,
    journal: &Journal,
    sessions_from: SystemTime,
) -> anyhow::Result<changeover_protocol::ChangeoverSummary> {
    fault_point("committing");
    let old = layout.old_install_dir();
    if old.exists() {
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&old))
            .await
            .context("the cleanup task failed")?
            .context("cannot delete the old release")?;
    }
    let mut summary = summarize(journal, ChangeoverOutcome::Committed, journal.phase, None);
    summary.reason = None;
    summary.downtime_ms = journal.stopped_at.and_then(|stopped| {
        sessions_from
            .duration_since(stopped)
            .ok()
            .map(|downtime| downtime.as_millis() as u64)
    });
    files.finish(&summary)?;
    info!(
        from = %summary.from_version,
        to = %summary.target_version,
        downtime_ms = ?summary.downtime_ms,
        "changeover committed"
    );
    Ok(summary)
}

/// The message admins get when it is over.
pub fn finished(summary: changeover_protocol::ChangeoverSummary) -> ServerMessage {
    ServerMessage::ChangeoverFinished(summary)
}
