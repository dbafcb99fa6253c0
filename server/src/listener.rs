//! The listening socket and the accept loop.
//!
//! Connections are admitted only while a handshake slot is free: beyond
//! `max_concurrent_handshakes` the loop stops accepting and new connections wait in the
//! kernel's listen backlog instead of piling up as tasks. Each accepted connection gets its
//! TLS and WebSocket handshake and its first message within `handshake_timeout`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::either::Either;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::connection::{self, ConnectionContext};

/// Binds with an explicit backlog (std's default is 128, far too short for a reconnect
/// storm) and address reuse, so a restarted server can bind while old sockets linger in
/// TIME_WAIT.
pub fn bind(address: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}

/// The WebSocket settings of every server connection: small buffers, so an idle
/// connection costs a few kilobytes, and hard limits on what a peer may send.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(changeover_protocol::MAX_STATUS_MESSAGE_BYTES)
        .max_message_size(Some(changeover_protocol::MAX_MESSAGE_BYTES))
        .max_frame_size(Some(changeover_protocol::MAX_MESSAGE_BYTES))
}

/// Everything the accept loop needs.
pub struct Listener {
    pub tcp: TcpListener,
    pub tls: Option<TlsAcceptor>,
    /// One permit per handshake in progress.
    pub handshake_slots: Arc<Semaphore>,
    pub context: Arc<ConnectionContext>,
    /// Every connection task, so shutdown can wait for their close frames.
    pub tracker: TaskTracker,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("tcp", &self.tcp)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Accepts until shutdown.
    pub async fn run(self) {
        let shutdown = self.context.shutdown.clone();
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => return,
                permit = Arc::clone(&self.handshake_slots).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = self.tcp.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning; the backlog holds
                    // the waiting connections meanwhile.
                    warn!(cause = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let context = Arc::clone(&self.context);
            let tls = self.tls.clone();
            self.tracker.spawn(async move {
                let hello_deadline = Instant::now() + context.hello_timeout;
                // Boxed: a task is as large as its largest state, and the handshake's state
                // would otherwise stay reserved for the whole life of the connection.
                let handshake = Box::pin(tokio::time::timeout_at(
                    hello_deadline,
                    upgrade(stream, tls),
                ));
                let ws = match handshake.await {
                    Ok(Ok(ws)) => ws,
                    Ok(Err(err)) => {
                        warn!(%peer, cause = %err, "handshake failed");
                        return;
                    }
                    Err(_elapsed) => {
                        warn!(%peer, "handshake not completed in time");
                        return;
                    }
                };
                drop(permit);
                connection::serve(ws, peer, hello_deadline, context).await;
            });
        }
    }
}

// The TLS state is boxed so plain ws:// connections do not pay for its size inline.
type ServerStream = Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;

async fn upgrade(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<ServerStream>> {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(cause = %err, "cannot set TCP_NODELAY");
    }
    let stream = match tls {
        None => Either::Left(stream),
        Some(acceptor) => Either::Right(Box::new(
            acceptor
                .accept(stream)
                .await
                .map_err(|err| anyhow::anyhow!("TLS handshake: {err}"))?,
        )),
    };
    Ok(crate::handshake::upgrade(stream, websocket_config()).await?)
}
