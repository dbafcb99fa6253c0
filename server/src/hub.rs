//! The hub: owns the session table and fans messages out to every connection.
//!
//! It is an actor: one task owns the table, and [`HubHandle`]s talk to it over a bounded
//! channel, so no lock is ever held across an await and the table cannot be touched from
//! two places at once. Broadcasts bypass the actor: a message is serialised once into
//! shared bytes and put on a `tokio::sync::broadcast` ring that every connection reads
//! from; a connection that falls a whole ring behind is disconnected as a slow consumer
//! rather than buffered for.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::SystemTime;

use changeover_protocol::{AgentHello, AgentUpdateView, ServerMessage, SessionView};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::peer::AddressKey;

// Commands waiting for the hub task; senders wait when it is full.
const COMMAND_QUEUE: usize = 1024;

/// Broadcast messages a connection may fall behind before it is dropped.
pub const BROADCAST_RING: usize = 64;

/// Why the hub asks a connection to end.
#[derive(Debug, Clone)]
pub enum Kick {
    /// The same agent connected again; the newer connection wins.
    Replaced,
    /// The changeover's deadline: send this `logout` message, then close with 4009, then
    /// drop `closed`, which tells the changeover this connection is done.
    Logout {
        logout: Utf8Bytes,
        closed: mpsc::Sender<()>,
    },
}

/// What [`HubHandle::log_out_all`] did.
#[derive(Debug)]
pub struct LoggedOut {
    /// Sessions logged out.
    pub count: usize,
    /// Ends (`recv` returns `None`) once every logged-out connection has written its
    /// `logout` and close frame, or given up on it.
    pub closing: mpsc::Receiver<()>,
}

/// Why a session could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("the server holds its maximum of {max_sessions} sessions")]
    ServerFull { max_sessions: usize },
    #[error("the server holds its maximum of {max_sessions} sessions from {address}")]
    AddressFull {
        max_sessions: usize,
        address: AddressKey,
    },
    #[error("the server is shutting down")]
    HubStopped,
    #[error("the server is updating; it will be back shortly")]
    Updating,
}

/// What a connection learns when its session is registered.
#[derive(Debug)]
pub struct Registration {
    pub session_id: u64,
    /// Resolves when the hub wants this connection closed.
    pub kick: oneshot::Receiver<Kick>,
    /// What a session joining now must hear first (the countdown's warning).
    pub notice: Option<Utf8Bytes>,
    /// The agent id the session was registered under, when it is not the one the hello
    /// named: that one is connected from another workstation already (a cloned disk).
    pub assigned_agent_id: Option<String>,
}

/// A bounded view of the session table, for the status report.
#[derive(Debug, Default)]
pub struct SessionSnapshot {
    /// The oldest sessions, at most the limit asked for.
    pub sessions: Vec<SessionView>,
    /// Every session, listed or not.
    pub total: usize,
    /// How many sessions run each (platform, agent version), listed or not.
    pub versions: Vec<(String, String, usize)>,
}

/// A cloneable handle to the hub task.
#[derive(Debug, Clone)]
pub struct HubHandle {
    commands: mpsc::Sender<HubCommand>,
    broadcast: broadcast::Sender<Utf8Bytes>,
}

#[derive(Debug)]
enum HubCommand {
    Register {
        hello: AgentHello,
        address: SocketAddr,
        reply: oneshot::Sender<Result<Registration, RegisterError>>,
    },
    Unregister {
        session_id: u64,
    },
    Snapshot {
        limit: usize,
        reply: oneshot::Sender<SessionSnapshot>,
    },
    Count {
        reply: oneshot::Sender<usize>,
    },
    SetNotice(Option<Utf8Bytes>),
    SetUpdate {
        session_id: u64,
        update: AgentUpdateView,
    },
    LogOutAll {
        logout: Utf8Bytes,
        reply: oneshot::Sender<LoggedOut>,
    },
    Reopen,
    CloseDoor,
}

/// One connected agent as the hub keeps it.
#[derive(Debug)]
struct Session {
    view: SessionView,
    /// The instance id of the agent process, from its hello.
    instance_id: Option<String>,
    address: AddressKey,
    /// Dropping or firing this ends the connection's task.
    kick: oneshot::Sender<Kick>,
}

/// The state owned by the hub task.
#[derive(Debug)]
struct Hub {
    /// Every registered agent session, by session id (so oldest first).
    sessions: BTreeMap<u64, Session>,
    /// Sessions per address, for `max_sessions_per_address`.
    per_address: HashMap<AddressKey, usize>,
    /// Agent id to session id, so a reconnecting agent replaces its stale session
    /// instead of appearing twice.
    by_agent: HashMap<String, u64>,
    /// Ids only grow, so ordering by id is ordering by connection time.
    next_session_id: u64,
    max_sessions: usize,
    max_sessions_per_address: usize,
    /// Sent to every session that registers while it is set: the current warning.
    notice: Option<Utf8Bytes>,
    /// After the changeover's logout: no sessions until the new version is up.
    updating: bool,
}

impl HubHandle {
    /// Starts the hub task. It ends when the last handle is dropped.
    pub fn spawn(max_sessions: usize, max_sessions_per_address: usize) -> HubHandle {
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        let (broadcast, _) = broadcast::channel(BROADCAST_RING);
        let hub = Hub {
            sessions: BTreeMap::new(),
            per_address: HashMap::new(),
            by_agent: HashMap::new(),
            next_session_id: 1,
            max_sessions,
            max_sessions_per_address,
            notice: None,
            updating: false,
        };
        tokio::spawn(hub.run(receiver));
        HubHandle {
            commands,
            broadcast,
        }
    }

    /// Adds an agent session to the table.
    pub async fn register(
        &self,
        hello: AgentHello,
        address: SocketAddr,
    ) -> Result<Registration, RegisterError> {
        let (reply, response) = oneshot::channel();
        let command = HubCommand::Register {
            hello,
            address,
            reply,
        };
        if self.commands.send(command).await.is_err() {
            return Err(RegisterError::HubStopped);
        }
        response.await.unwrap_or(Err(RegisterError::HubStopped))
    }

    /// Removes a session; a no-op if it was already replaced.
    pub async fn unregister(&self, session_id: u64) {
        // A stopped hub has no table left to clean.
        let _ = self
            .commands
            .send(HubCommand::Unregister { session_id })
            .await;
    }

    /// Every session, oldest first.
    pub async fn sessions(&self) -> Vec<SessionView> {
        self.snapshot(usize::MAX).await.sessions
    }

    /// The oldest `limit` sessions, and counts of all of them.
    pub async fn snapshot(&self, limit: usize) -> SessionSnapshot {
        let (reply, response) = oneshot::channel();
        if self
            .commands
            .send(HubCommand::Snapshot { limit, reply })
            .await
            .is_err()
        {
            return SessionSnapshot::default();
        }
        response.await.unwrap_or_default()
    }

    /// Records what an agent reported about its own update, for the status report.
    pub async fn set_update(&self, session_id: u64, update: AgentUpdateView) {
        let _ = self
            .commands
            .send(HubCommand::SetUpdate { session_id, update })
            .await;
    }

    /// Sets (or clears) the message every newly registered session gets first.
    pub async fn set_notice(&self, message: Option<&ServerMessage>) {
        let notice = message.map(|message| Utf8Bytes::from(encode(message)));
        let _ = self.commands.send(HubCommand::SetNotice(notice)).await;
    }

    /// The deadline: every session gets `logout` and is closed; no new session is accepted
    /// until [`HubHandle::reopen`]. Returns how many sessions were logged out, and a way
    /// to wait until their connections have said so.
    pub async fn log_out_all(&self, logout: &ServerMessage) -> LoggedOut {
        let (reply, response) = oneshot::channel();
        let logout = Utf8Bytes::from(encode(logout));
        let nobody = || LoggedOut {
            count: 0,
            closing: mpsc::channel(1).1,
        };
        if self
            .commands
            .send(HubCommand::LogOutAll { logout, reply })
            .await
            .is_err()
        {
            return nobody();
        }
        response.await.unwrap_or_else(|_| nobody())
    }

    /// Refuses new sessions with "updating" until [`HubHandle::reopen`]: a new release
    /// takes no users before it has proved healthy.
    pub async fn close_door(&self) {
        let _ = self.commands.send(HubCommand::CloseDoor).await;
    }

    /// Accepts sessions again (a changeover that rolled back before the restart, or a new
    /// release that passed its health check).
    pub async fn reopen(&self) {
        let _ = self.commands.send(HubCommand::Reopen).await;
    }

    /// How many sessions are connected (without a snapshot's walk over every session).
    pub async fn session_count(&self) -> usize {
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(HubCommand::Count { reply })
            .await
            .is_err()
        {
            return 0;
        }
        answer.await.unwrap_or(0)
    }

    /// A receiver of every broadcast from now on; connections take one before registering.
    pub fn subscribe(&self) -> broadcast::Receiver<Utf8Bytes> {
        self.broadcast.subscribe()
    }

    /// Sends `message` to every subscribed connection, serialised once. Returns how many
    /// connections it was queued for.
    pub fn broadcast(&self, message: &ServerMessage) -> usize {
        self.broadcast_encoded(Utf8Bytes::from(encode(message)))
    }

    /// [`HubHandle::broadcast`] for a message serialised already.
    pub fn broadcast_encoded(&self, bytes: Utf8Bytes) -> usize {
        self.broadcast.send(bytes).unwrap_or(0)
    }
}

/// Serialises a server message. Serialising our own enum cannot fail.
pub fn encode(message: &ServerMessage) -> String {
    serde_json::to_string(message).unwrap_or_else(|err| {
        tracing::error!(cause = %err, "cannot serialise a server message");
        String::from(r#"{"type":"error","code":"internal","message":"serialisation failed"}"#)
    })
}

impl Hub {
    async fn run(mut self, mut commands: mpsc::Receiver<HubCommand>) {
        while let Some(command) = commands.recv().await {
            match command {
                HubCommand::Register {
                    hello,
                    address,
                    reply,
                } => {
                    let outcome = self.register(hello, address);
                    // The connection may have gone away meanwhile; its unregister follows.
                    let _ = reply.send(outcome);
                }
                HubCommand::Unregister { session_id } => self.unregister(session_id),
                HubCommand::Snapshot { limit, reply } => {
                    let _ = reply.send(self.snapshot(limit));
                }
                HubCommand::Count { reply } => {
                    let _ = reply.send(self.sessions.len());
                }
                HubCommand::SetNotice(notice) => self.notice = notice,
                HubCommand::SetUpdate { session_id, update } => {
                    if let Some(session) = self.sessions.get_mut(&session_id) {
                        session.view.update = Some(update);
                    }
                }
                HubCommand::LogOutAll { logout, reply } => {
                    self.updating = true;
                    self.notice = None;
                    let count = self.sessions.len();
                    let (closed, closing) = mpsc::channel(1);
                    for (_, session) in std::mem::take(&mut self.sessions) {
                        let _ = session.kick.send(Kick::Logout {
                            logout: logout.clone(),
                            closed: closed.clone(),
                        });
                    }
                    self.by_agent.clear();
                    self.per_address.clear();
                    let _ = reply.send(LoggedOut { count, closing });
                }
                HubCommand::Reopen => self.updating = false,
                HubCommand::CloseDoor => self.updating = true,
            }
        }
    }

    fn register(
        &mut self,
        hello: AgentHello,
        address: SocketAddr,
    ) -> Result<Registration, RegisterError> {
        if self.updating {
            return Err(RegisterError::Updating);
        }
        let key = AddressKey::of(address.ip());
        let mut agent_id = hello.agent_id;
        let mut clone_of = None;
        if let Some(&old_id) = self.by_agent.get(&agent_id) {
            let old = &self.sessions[&old_id];
            // A session without an instance (an agent before 1.1) is replaced by any
            // reconnect of its id; one with an instance only by the same instance.
            let same_agent = old.instance_id.is_none() || old.instance_id == hello.instance_id;
            if same_agent {
                if let Some(old) = self.remove(old_id) {
                    tracing::info!(
                        %agent_id,
                        old_session = old.view.session_id,
                        "agent reconnected; closing its previous connection"
                    );
                    let _ = old.kick.send(Kick::Replaced);
                }
            } else {
                let fresh = fresh_agent_id();
                tracing::warn!(
                    %agent_id,
                    assigned_agent_id = %fresh,
                    first = %old.view.address,
                    second = %address,
                    "two workstations connected with one agent id (a cloned disk?); the second gets a fresh id"
                );
                clone_of = Some(std::mem::replace(&mut agent_id, fresh));
            }
        }
        if self.sessions.len() >= self.max_sessions {
            return Err(RegisterError::ServerFull {
                max_sessions: self.max_sessions,
            });
        }
        let from_address = self.per_address.get(&key).copied().unwrap_or(0);
        if from_address >= self.max_sessions_per_address {
            return Err(RegisterError::AddressFull {
                max_sessions: self.max_sessions_per_address,
                address: key,
            });
        }
        let session_id = self.next_session_id;
        self.next_session_id += 1;
        let (kick, kick_receiver) = oneshot::channel();
        let view = SessionView {
            session_id,
            agent_id,
            user: hello.user,
            host: hello.host,
            platform: hello.platform,
            agent_version: hello.agent_version,
            protocol_version: hello.protocol_version,
            address: address.to_string(),
            connected_since: SystemTime::now(),
            update: None,
            clone_of,
        };
        let assigned_agent_id = view.clone_of.as_ref().map(|_| view.agent_id.clone());
        self.by_agent.insert(view.agent_id.clone(), session_id);
        *self.per_address.entry(key).or_default() += 1;
        self.sessions.insert(
            session_id,
            Session {
                view,
                instance_id: hello.instance_id,
                address: key,
                kick,
            },
        );
        Ok(Registration {
            session_id,
            kick: kick_receiver,
            notice: self.notice.clone(),
            assigned_agent_id,
        })
    }

    fn unregister(&mut self, session_id: u64) {
        self.remove(session_id);
    }

    // Takes a session out of the table and every index.
    fn remove(&mut self, session_id: u64) -> Option<Session> {
        let session = self.sessions.remove(&session_id)?;
        if self.by_agent.get(&session.view.agent_id) == Some(&session_id) {
            self.by_agent.remove(&session.view.agent_id);
        }
        if let Some(count) = self.per_address.get_mut(&session.address) {
            *count -= 1;
            if *count == 0 {
                self.per_address.remove(&session.address);
            }
        }
        Some(session)
    }

    fn snapshot(&self, limit: usize) -> SessionSnapshot {
        let sessions = self
            .sessions
            .values()
            .take(limit)
            .map(|session| session.view.clone())
            .collect();
        let mut versions: HashMap<(&str, &str), usize> = HashMap::new();
        for session in self.sessions.values() {
            *versions
                .entry((&session.view.platform, &session.view.agent_version))
                .or_default() += 1;
        }
        SessionSnapshot {
            sessions,
            total: self.sessions.len(),
            versions: versions
                .into_iter()
                .map(|((platform, version), count)| {
                    (platform.to_owned(), version.to_owned(), count)
                })
                .collect(),
        }
    }
}

// A new agent id for the second of two cloned workstations, in the form agents make.
fn fresh_agent_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(agent_id: &str, user: &str) -> AgentHello {
        AgentHello {
            protocol_version: 1,
            agent_id: agent_id.to_owned(),
            user: user.to_owned(),
            host: "ws1".to_owned(),
            platform: "linux-x86_64".to_owned(),
            agent_version: "1.0.0".to_owned(),
            instance_id: None,
        }
    }

    fn address() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 40000))
    }

    #[tokio::test]
    async fn sessions_are_listed_oldest_first_and_leave_on_unregister() {
        let hub = HubHandle::spawn(10, 1000);
        let alice = hub.register(hello("a", "alice"), address()).await.unwrap();
        let bob = hub.register(hello("b", "bob"), address()).await.unwrap();
        let users: Vec<String> = hub.sessions().await.into_iter().map(|s| s.user).collect();
        assert_eq!(users, ["alice", "bob"]);
        hub.unregister(alice.session_id).await;
        let left = hub.sessions().await;
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].session_id, bob.session_id);
    }

    #[tokio::test]
    async fn a_reconnecting_agent_replaces_its_stale_session() {
        let hub = HubHandle::spawn(10, 1000);
        let first = hub.register(hello("a", "alice"), address()).await.unwrap();
        let second = hub.register(hello("a", "alice"), address()).await.unwrap();
        assert!(matches!(first.kick.await, Ok(Kick::Replaced)));
        // The stale connection's late unregister must not remove the new session.
        hub.unregister(first.session_id).await;
        let sessions = hub.sessions().await;
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].session_id, second.session_id);
    }

    #[tokio::test]
    async fn a_full_table_refuses_new_agents_but_not_reconnects() {
        let hub = HubHandle::spawn(1, 1000);
        let _alice = hub.register(hello("a", "alice"), address()).await.unwrap();
        let refused = hub
            .register(hello("b", "bob"), address())
            .await
            .unwrap_err();
        assert_eq!(refused, RegisterError::ServerFull { max_sessions: 1 });
        assert!(hub.register(hello("a", "alice"), address()).await.is_ok());
    }

    fn instance(agent_id: &str, instance: &str) -> AgentHello {
        AgentHello {
            instance_id: Some(instance.to_owned()),
            ..hello(agent_id, "alice")
        }
    }

    #[tokio::test]
    async fn a_clone_gets_a_fresh_id_and_the_first_workstation_keeps_its_session() {
        let hub = HubHandle::spawn(10, 1000);
        let first = hub.register(instance("a", "one"), address()).await.unwrap();
        assert_eq!(first.assigned_agent_id, None);
        let clone = hub.register(instance("a", "two"), address()).await.unwrap();
        let fresh = clone
            .assigned_agent_id
            .clone()
            .expect("the clone gets a new id");
        assert_ne!(fresh, "a");
        assert!(changeover_protocol::text::is_valid_id(&fresh));
        let sessions = hub.sessions().await;
        assert_eq!(sessions.len(), 2, "both stay connected");
        assert_eq!(sessions[1].agent_id, fresh);
        assert_eq!(sessions[1].clone_of.as_deref(), Some("a"));
        // The same instance reconnecting replaces its own session, not the other one.
        let again = hub.register(instance("a", "one"), address()).await.unwrap();
        assert!(matches!(first.kick.await, Ok(Kick::Replaced)));
        assert_eq!(again.assigned_agent_id, None);
        // The clone, now under its fresh id, reconnects as itself.
        let back = hub
            .register(instance(&fresh, "two"), address())
            .await
            .unwrap();
        assert!(matches!(clone.kick.await, Ok(Kick::Replaced)));
        assert_eq!(back.assigned_agent_id, None);
        assert_eq!(hub.session_count().await, 2);
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share_of_sessions() {
        let hub = HubHandle::spawn(10, 2);
        let _a = hub.register(hello("a", "alice"), address()).await.unwrap();
        let _b = hub.register(hello("b", "bob"), address()).await.unwrap();
        let refused = hub
            .register(hello("c", "carol"), address())
            .await
            .unwrap_err();
        assert!(matches!(
            refused,
            RegisterError::AddressFull {
                max_sessions: 2,
                ..
            }
        ));
        let elsewhere = SocketAddr::from(([10, 0, 0, 9], 40000));
        assert!(hub.register(hello("c", "carol"), elsewhere).await.is_ok());
        // A reconnect from the full address still works.
        assert!(hub.register(hello("a", "alice"), address()).await.is_ok());
    }

    #[tokio::test]
    async fn a_snapshot_lists_the_oldest_and_counts_all() {
        let hub = HubHandle::spawn(10, 1000);
        let mut kept = Vec::new();
        for n in 0..5 {
            let mut agent = hello(&format!("a{n}"), &format!("user{n}"));
            if n == 4 {
                agent.agent_version = "1.1.0".to_owned();
            }
            kept.push(hub.register(agent, address()).await.unwrap());
        }
        let snapshot = hub.snapshot(3).await;
        let users: Vec<_> = snapshot.sessions.iter().map(|s| s.user.as_str()).collect();
        assert_eq!(users, ["user0", "user1", "user2"]);
        assert_eq!(snapshot.total, 5);
        assert_eq!(hub.session_count().await, 5);
        let mut versions = snapshot.versions;
        versions.sort();
        assert_eq!(
            versions,
            [
                ("linux-x86_64".to_owned(), "1.0.0".to_owned(), 4),
                ("linux-x86_64".to_owned(), "1.1.0".to_owned(), 1)
            ]
        );
    }

    #[tokio::test]
    async fn a_broadcast_is_serialised_once_and_shared() {
        let hub = HubHandle::spawn(10, 1000);
        let mut first = hub.subscribe();
        let mut second = hub.subscribe();
        let message = ServerMessage::error(changeover_protocol::ErrorCode::Internal, "x");
        assert_eq!(hub.broadcast(&message), 2);
        let a = first.recv().await.unwrap();
        let b = second.recv().await.unwrap();
        assert_eq!(a.as_str(), encode(&message));
        // Both receivers hold the very same buffer, not copies.
        assert_eq!(a.as_str().as_ptr(), b.as_str().as_ptr());
    }
}
