//! The baseline: the least a tokio-tungstenite server can do for an agent.
//!
//! It binds the way the changeover server does, upgrades with the very same
//! [`WebSocketConfig`](tokio_tungstenite::tungstenite::protocol::WebSocketConfig)
//! (`changeover_server::listener::websocket_config`), answers the first text message with
//! one fixed `welcome` frame and then only holds the connection, reading. No hub, no
//! session table, no heartbeat, no per-connection logging: whatever the changeover
//! server needs per idle agent beyond this is the cost of its own features.
//!
//! The broadcast baseline: on SIGUSR1 it puts one pre-serialised countdown `warning` (the
//! changeover server's message, with the same fields) on a `tokio::sync::broadcast` ring
//! that every connection task reads and writes to its socket, and logs `broadcast sent` at
//! info with the number of connections it was queued for. That is the least a server can
//! do to tell N agents the same thing; the changeover server's hub does the same plus its
//! bookkeeping.
//!
//! It is not a server to run agents against for anything else: it checks nothing.

use std::net::SocketAddr;

use anyhow::Context as _;
use changeover_protocol::{PROTOCOL_VERSION, ServerMessage};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::{debug, info, warn};

/// Broadcasts a connection may fall behind, as the changeover server's hub.
const BROADCAST_RING: usize = 64;

/// Listens on `listen`, prints `listening on ws://ADDR`, and holds every connection until
/// the process ends (SIGINT or SIGTERM, or a kill).
pub async fn run(listen: SocketAddr, backlog: u32) -> anyhow::Result<()> {
    let server = RawServer::bind(listen, backlog)?;
    println!("listening on ws://{}", server.local_addr()?);
    let broadcasts = server.broadcasts.clone();
    tokio::select! {
        () = server.serve() => Ok(()),
        () = stop_signal() => Ok(()),
        result = broadcast_on_signal(broadcasts) => result,
    }
}

// Every SIGUSR1: one warning to every connection, serialised once.
async fn broadcast_on_signal(broadcasts: broadcast::Sender<Utf8Bytes>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut trigger =
        signal(SignalKind::user_defined1()).context("cannot watch SIGUSR1 for broadcasts")?;
    let mut count: u64 = 0;
    while trigger.recv().await.is_some() {
        count += 1;
        let frame = Utf8Bytes::from(warning_frame(count)?);
        let sending = std::time::Instant::now();
        let reached = broadcasts.send(frame).unwrap_or(0);
        // How long `send` took (it wakes every waiting connection): the log line's
        // timestamp is that much after the message was on the ring.
        let send_us = sending.elapsed().as_micros() as u64;
        info!(reached, send_us, "broadcast sent");
    }
    Ok(())
}

/// A countdown warning shaped like the changeover server's first one (60 s of grace).
pub fn warning_frame(count: u64) -> anyhow::Result<String> {
    serde_json::to_string(&ServerMessage::Warning {
        changeover_id: format!("co-{:013}", count),
        deadline: std::time::SystemTime::now() + std::time::Duration::from_secs(60),
        seconds_left: 60,
        target_version: "2.0.0".to_owned(),
        // The changeover server's default text for this target.
        message: "The server will be updated to version 2.0.0. Please save your work and \
                  close the application."
            .to_owned(),
        admin_message: None,
    })
    .context("cannot encode the warning")
}

/// A bound raw server.
#[derive(Debug)]
pub struct RawServer {
    tcp: TcpListener,
    /// Encoded once; every connection gets the same bytes.
    welcome: Utf8Bytes,
    /// The ring every connection reads broadcasts from.
    broadcasts: broadcast::Sender<Utf8Bytes>,
}

impl RawServer {
    /// Binds the way the changeover server does (explicit backlog, address reuse).
    pub fn bind(listen: SocketAddr, backlog: u32) -> anyhow::Result<RawServer> {
        let tcp = changeover_server::listener::bind(listen, backlog)
            .with_context(|| format!("cannot listen on {listen}"))?;
        let welcome = serde_json::to_string(&ServerMessage::Welcome {
            protocol_version: PROTOCOL_VERSION,
            server_version: "raw-baseline".to_owned(),
            session_id: 0,
            heartbeat_secs: 25,
            assigned_agent_id: None,
        })
        .context("cannot encode the welcome")?;
        Ok(RawServer {
            tcp,
            welcome: Utf8Bytes::from(welcome),
            broadcasts: broadcast::channel(BROADCAST_RING).0,
        })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.tcp
            .local_addr()
            .context("cannot read the listening address")
    }

    /// Accepts forever, one task per connection.
    pub async fn serve(self) {
        loop {
            match self.tcp.accept().await {
                Ok((stream, _peer)) => {
                    let broadcasts = self.broadcasts.subscribe();
                    tokio::spawn(hold(stream, self.welcome.clone(), broadcasts));
                }
                Err(err) => {
                    // EMFILE and friends: the backlog holds the waiting connections meanwhile.
                    warn!(cause = %err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn hold(
    stream: TcpStream,
    welcome: Utf8Bytes,
    mut broadcasts: broadcast::Receiver<Utf8Bytes>,
) {
    stream.set_nodelay(true).ok();
    let config = changeover_server::listener::websocket_config();
    let mut ws = match tokio_tungstenite::accept_async_with_config(stream, Some(config)).await {
        Ok(ws) => ws,
        Err(err) => {
            debug!(cause = %err, "handshake failed");
            return;
        }
    };
    let mut welcomed = false;
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(_))) if !welcomed => {
                    welcomed = true;
                    if ws.send(Message::Text(welcome.clone())).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            broadcast = broadcasts.recv(), if welcomed => match broadcast {
                Ok(frame) => {
                    if ws.send(Message::Text(frame)).await.is_err() {
                        return;
                    }
                }
                // Like the changeover server: a connection a whole ring behind is dropped.
                Err(_) => return,
            },
        }
    }
}

async fn stop_signal() {
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
