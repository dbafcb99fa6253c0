//! The listening socket and the accept loop.
//!
//! Connections are admitted only while a handshake slot is free: beyond
//! `max_concurrent_handshakes` the loop stops accepting and new connections wait in the
//! kernel's listen backlog instead of piling up as tasks. One address (see
//! [`crate::peer::AddressKey`]) holds at most `max_handshakes_per_address` of those slots;
//! its further connections wait for a slot of their own without holding a global one, up
//! to a bound, and are closed beyond it, so one address cannot take the door. Each
//! connection gets its TLS handshake and upgrade request within `upgrade_timeout`, and its
//! first message within `handshake_timeout`; it keeps both slots until that message is
//! read, so the memory of messages being read is bounded too.
//!
//! After a changeover the new release keeps its [`Door`] shut until its health check has
//! passed: connections accepted meanwhile wait, parked before their handshake, and go on
//! once the door opens (at most `listen_backlog` of them; beyond that they go on at once,
//! as without a door). The returning agents are taken the moment sessions are let in,
//! instead of being refused and coming back later, and the check's own hello, let through
//! by its address, is not queued behind thousands of refusals.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::connection::{self, ConnectionContext};
use crate::handshake::Opened;
use crate::peer::{Entry, HandshakeGate, HandshakeTicket};

/// Binds with an explicit backlog (std's default is 128, far too short for a reconnect
/// storm) and address reuse, so a restarted server can bind while old sockets linger in
/// TIME_WAIT.
pub fn bind(address: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(address, backlog)?)
}

/// [`bind`] without a runtime: the socket for `open_listener`, made before the runtime.
pub fn bind_std(address: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    // On Unix this only lets a restart bind past connections in TIME_WAIT; on Windows it
    // would let a second server bind the same port while the first still listens.
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// [`bind_std`], retried while the address is in use for up to `patience`: on Windows the
/// next release starts while the previous process is still letting the port go.
pub fn bind_std_with_patience(
    address: SocketAddr,
    backlog: u32,
    patience: Duration,
) -> io::Result<std::net::TcpListener> {
    let started = std::time::Instant::now();
    loop {
        match bind_std(address, backlog) {
            Err(err) if err.kind() == io::ErrorKind::AddrInUse && started.elapsed() < patience => {
                std::thread::sleep(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

/// The WebSocket settings of every server connection: small buffers, so an idle
/// connection costs a few kilobytes, and hard limits on what a peer may send.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(2048)
        // Small enough that a message passed on with `feed` waits only for the next flush
        // (every `send` flushes at once).
        .write_buffer_size(4096)
        .max_write_buffer_size(changeover_protocol::MAX_STATUS_MESSAGE_BYTES)
        .max_message_size(Some(changeover_protocol::MAX_MESSAGE_BYTES))
        .max_frame_size(Some(changeover_protocol::MAX_MESSAGE_BYTES))
}

/// Whether connections go on to their handshake, or wait (see the module's text).
#[derive(Debug)]
pub struct Door {
    open: tokio::sync::watch::Sender<bool>,
    /// Local addresses of this process's own connections, let through while it is shut.
    through: std::sync::Mutex<Vec<SocketAddr>>,
    /// One permit per connection held; beyond them connections go on at once (and agents
    /// are refused `updating`), so a flood cannot hold every file descriptor meanwhile.
    places: Arc<Semaphore>,
}

impl Door {
    /// A door holding at most `places` connections while it is shut.
    pub fn new(open: bool, places: usize) -> Arc<Door> {
        Arc::new(Door {
            open: tokio::sync::watch::Sender::new(open),
            through: std::sync::Mutex::new(Vec::new()),
            places: Arc::new(Semaphore::new(places)),
        })
    }

    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// Lets every waiting connection go on, and every later one straight through.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// Lets the connection from `local` (a socket of this process, bound but not yet
    /// connected) through while the door is shut.
    pub fn let_through(&self, local: SocketAddr) {
        if let Ok(mut through) = self.through.lock() {
            through.push(local);
        }
    }

    /// Whether the connection from `peer` was let through; it is forgotten then.
    fn takes_through(&self, peer: SocketAddr) -> bool {
        let Ok(mut through) = self.through.lock() else {
            return false;
        };
        match through.iter().position(|local| *local == peer) {
            Some(index) => {
                through.swap_remove(index);
                true
            }
            None => false,
        }
    }

    /// Ends when the door is open.
    async fn opened(&self) {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }
}

/// Everything the accept loop needs, apart from the socket itself, which it borrows while
/// it runs and hands back when paused (a changeover passes it on to the next process).
pub struct Listener {
    pub tls: Option<TlsAcceptor>,
    /// One permit per handshake in progress.
    pub handshake_slots: Arc<Semaphore>,
    /// The handshakes in progress per address.
    pub gate: Arc<HandshakeGate>,
    /// How long the TLS handshake and the upgrade request may take.
    pub upgrade_timeout: Duration,
    pub context: Arc<ConnectionContext>,
    /// Every connection task, so shutdown can wait for their close frames.
    pub tracker: TaskTracker,
    /// Shut while a new release proves itself; connections wait behind it.
    pub door: Arc<Door>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Accepts until shutdown or `pause`; returns the socket, still listening, so that
    /// connections arriving meanwhile wait in its backlog.
    pub async fn run(self: Arc<Self>, tcp: TcpListener, pause: CancellationToken) -> TcpListener {
        let shutdown = self.context.shutdown.clone();
        loop {
            if shutdown.is_cancelled() || pause.is_cancelled() {
                return tcp;
            }
            let mut waited_for_slot = false;
            let permit = match Arc::clone(&self.handshake_slots).try_acquire_owned() {
                Ok(permit) => permit,
                Err(TryAcquireError::Closed) => return tcp,
                Err(TryAcquireError::NoPermits) => {
                    waited_for_slot = true;
                    tokio::select! {
                        () = shutdown.cancelled() => return tcp,
                        () = pause.cancelled() => return tcp,
                        permit = Arc::clone(&self.handshake_slots).acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => return tcp,
                        },
                    }
                }
            };
            // A connection that was in the backlog while every slot was busy waited for
            // its slot: the server takes handshakes as fast as it can, and only then does
            // their rate measure it.
            let waiting = if waited_for_slot {
                tcp.accept().now_or_never()
            } else {
                None
            };
            let accepted = match waiting {
                Some(accepted) => {
                    self.context.handshake_rate.saturated();
                    accepted
                }
                None => tokio::select! {
                    () = shutdown.cancelled() => return tcp,
                    () = pause.cancelled() => return tcp,
                    accepted = tcp.accept() => accepted,
                },
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
            if let Err(err) = crate::platform::keep_from_children(&stream) {
                debug!(%peer, cause = %err, "cannot make the connection non-inheritable");
            }
            if !self.door.is_open()
                && !self.door.takes_through(peer)
                && let Ok(place) = Arc::clone(&self.door.places).try_acquire_owned()
            {
                drop(permit);
                self.tracker
                    .spawn(Arc::clone(&self).wait_at_door(stream, peer, place));
                continue;
            }
            if let Some(admission) = self.admit(peer, permit) {
                self.tracker
                    .spawn(Arc::clone(&self).connection(stream, peer, admission));
            }
        }
    }

    /// The connection's place at the door, or `None` when too many from its address wait.
    fn admit(&self, peer: SocketAddr, permit: OwnedSemaphorePermit) -> Option<Admission> {
        match self.gate.enter(peer.ip()) {
            Entry::Admitted(ticket) => Some(Admission::Admitted(HandshakeHold {
                _slot: permit,
                _address: ticket,
            })),
            // Waits without the global slot, so others get it meanwhile.
            Entry::Wait(waiting) => Some(Admission::Waiting(waiting)),
            Entry::Refused => {
                debug!(%peer, "too many connections from one address are waiting; closed");
                None
            }
        }
    }

    /// Holds a connection accepted while the door is shut until it opens, for at most the
    /// upgrade timeout (then it goes on and is told the server is updating), and then
    /// admits it as the accept loop would have.
    async fn wait_at_door(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        place: OwnedSemaphorePermit,
    ) {
        let shutdown = self.context.shutdown.clone();
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tokio::time::timeout(self.upgrade_timeout, self.door.opened()) => {}
        }
        drop(place);
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            permit = Arc::clone(&self.handshake_slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        if let Some(admission) = self.admit(peer, permit) {
            self.connection(stream, peer, admission).await;
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        admission: Admission,
    ) {
        let accepted = Instant::now();
        let hello_deadline = accepted + self.context.hello_timeout;
        let upgrade_deadline = accepted + self.upgrade_timeout;
        let hold = match admission {
            Admission::Admitted(hold) => hold,
            Admission::Waiting(waiting) => {
                let slots = Arc::clone(&self.handshake_slots);
                let admitted = tokio::time::timeout_at(upgrade_deadline, async move {
                    let ticket = waiting.admitted().await;
                    let slot = slots.acquire_owned().await.ok()?;
                    Some(HandshakeHold {
                        _slot: slot,
                        _address: ticket,
                    })
                });
                match admitted.await {
                    Ok(Some(hold)) => hold,
                    Ok(None) => return,
                    Err(_elapsed) => {
                        debug!(%peer, "no handshake slot for this address in time; closed");
                        return;
                    }
                }
            }
        };
        let context = Arc::clone(&self.context);
        // Boxed: a task is as large as its largest state, and the handshake's state
        // would otherwise stay reserved for the whole life of the connection.
        let handshake = Box::pin(tokio::time::timeout_at(
            upgrade_deadline,
            upgrade(stream, self.tls.clone()),
        ));
        let mut opened = match handshake.await {
            Ok(Ok(opened)) => opened,
            Ok(Err(err)) => {
                warn!(%peer, cause = %err, "handshake failed");
                return;
            }
            Err(_elapsed) => {
                warn!(%peer, "handshake not completed in time");
                return;
            }
        };
        // Served in place: moved out of `opened`, the stream would take its room in the
        // task a second time.
        if let Opened::WebSocket(ws) = &mut opened {
            connection::serve(ws, peer, hello_deadline, hold, context).await;
            return;
        }
        if let Opened::AgentDownload { stream, request } = opened {
            drop(hold);
            // Boxed: a transfer's state is not reserved in every agent's task.
            Box::pin(
                context
                    .agent_updates
                    .serve(stream, request, peer, &context.shutdown),
            )
            .await;
        }
    }
}

/// A connection's place at the door: a global handshake slot and one of its address. The
/// connection gives it up once its first message is read.
#[derive(Debug)]
pub struct HandshakeHold {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _address: HandshakeTicket,
}

enum Admission {
    Admitted(HandshakeHold),
    Waiting(crate::peer::Waiting),
}

// The TLS state is boxed so plain ws:// connections do not pay for its size inline.
type ServerStream = Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;

async fn upgrade(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
) -> anyhow::Result<Opened<ServerStream>> {
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

/// The running accept loop: paused and resumed by a changeover.
#[derive(Debug)]
pub struct ListenerControl {
    listener: Arc<Listener>,
    running: tokio::sync::Mutex<Option<(CancellationToken, tokio::task::JoinHandle<TcpListener>)>>,
}

impl ListenerControl {
    /// Starts accepting on `tcp`.
    pub fn start(listener: Arc<Listener>, tcp: TcpListener) -> Arc<ListenerControl> {
        let pause = CancellationToken::new();
        let handle = tokio::spawn(Arc::clone(&listener).run(tcp, pause.clone()));
        Arc::new(ListenerControl {
            listener,
            running: tokio::sync::Mutex::new(Some((pause, handle))),
        })
    }

    /// Stops accepting and returns the socket (`None` if it is already paused or gone).
    pub async fn pause(&self) -> Option<TcpListener> {
        let (pause, handle) = self.running.lock().await.take()?;
        pause.cancel();
        handle.await.ok()
    }

    /// Accepts again on `tcp`.
    pub async fn resume(&self, tcp: TcpListener) {
        let pause = CancellationToken::new();
        let handle = tokio::spawn(Arc::clone(&self.listener).run(tcp, pause.clone()));
        *self.running.lock().await = Some((pause, handle));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_shut_door_lets_through_only_what_it_was_told_once_and_opens_for_all() {
        let door = Door::new(false, 2);
        let own: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:40002".parse().unwrap();
        door.let_through(own);
        assert!(!door.takes_through(other));
        assert!(door.takes_through(own));
        assert!(!door.takes_through(own), "let through once only");

        let waiting = tokio::spawn({
            let door = Arc::clone(&door);
            async move { door.opened().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        door.open();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the wait ends when the door opens")
            .unwrap();
        assert!(door.is_open());
        // Its places are counted: beyond them nothing is held.
        let first = Arc::clone(&door.places).try_acquire_owned().unwrap();
        let _second = Arc::clone(&door.places).try_acquire_owned().unwrap();
        assert!(Arc::clone(&door.places).try_acquire_owned().is_err());
        drop(first);
        assert!(Arc::clone(&door.places).try_acquire_owned().is_ok());
    }
}
