//! The baseline: the least a tokio-tungstenite server can do for an agent.
//!
//! It binds the way the changeover server does, upgrades with the very same
//! [`WebSocketConfig`](tokio_tungstenite::tungstenite::protocol::WebSocketConfig)
//! (`changeover_server::listener::websocket_config`), answers the first text message with
//! one fixed `welcome` frame and then only holds the connection, reading. No hub, no
//! session table, no heartbeat, no per-connection logging: whatever the changeover
//! server needs per idle agent beyond this is the cost of its own features.
//!
//! It is not a server to run agents against for anything else: it checks nothing.

use std::net::SocketAddr;

use anyhow::Context as _;
use changeover_protocol::{PROTOCOL_VERSION, ServerMessage};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::{debug, warn};

/// Listens on `listen`, prints `listening on ws://ADDR`, and holds every connection until
/// the process ends (SIGINT or SIGTERM, or a kill).
pub async fn run(listen: SocketAddr, backlog: u32) -> anyhow::Result<()> {
    let server = RawServer::bind(listen, backlog)?;
    println!("listening on ws://{}", server.local_addr()?);
    tokio::select! {
        () = server.serve() => Ok(()),
        () = stop_signal() => Ok(()),
    }
}

/// A bound raw server.
#[derive(Debug)]
pub struct RawServer {
    tcp: TcpListener,
    /// Encoded once; every connection gets the same bytes.
    welcome: Utf8Bytes,
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
        })
        .context("cannot encode the welcome")?;
        Ok(RawServer {
            tcp,
            welcome: Utf8Bytes::from(welcome),
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
                    tokio::spawn(hold(stream, self.welcome.clone()));
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

async fn hold(stream: TcpStream, welcome: Utf8Bytes) {
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
    while let Some(frame) = ws.next().await {
        match frame {
            Ok(Message::Text(_)) if !welcomed => {
                welcomed = true;
                if ws.send(Message::Text(welcome.clone())).await.is_err() {
                    return;
                }
            }
            Ok(Message::Close(_)) | Err(_) => return,
            Ok(_) => {}
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
