//! A fleet of agents that come back. Like [`crate::fleet`], each agent is one small task
//! speaking the real protocol (`hello`, wait for `welcome`, idle reading); unlike it, when a
//! connection ends (a `logout` message, a close frame, a reset) the agent notes when and
//! why, and reconnects at once, trying again every [`ReturningFleetOptions::retry`] until it
//! is welcomed, noting which server version welcomed it.
//!
//! It measures how long the server is out of reach as the agents see it. It does not mimic
//! the real agent's pause inside the `reconnect_within_ms` window of a logout, nor its
//! backoff: it comes back as early as it can, so the figures are the server's, not the
//! jitter's. Failed attempts are only counted, by reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use changeover_protocol::{AgentHello, ClientMessage, PROTOCOL_VERSION, ServerMessage};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::fleet::{Latency, agent_websocket_config};

/// What fleet to open and how its agents come back.
#[derive(Debug, Clone)]
pub struct ReturningFleetOptions {
    /// A `ws://host:port` URL.
    pub url: String,
    pub agents: usize,
    /// Agents between TCP connect and their first welcome at once.
    pub concurrency: usize,
    /// Agent ids are `{id_prefix}-{index}`.
    pub id_prefix: String,
    /// The pause after a failed attempt (refused, reset, no listener) before the next.
    pub retry: Duration,
    /// From TCP connect to welcome, per attempt.
    pub welcome_timeout: Duration,
    /// How long the first opening may take until every agent is welcomed.
    pub open_patience: Duration,
}

impl ReturningFleetOptions {
    pub fn new(url: impl Into<String>, agents: usize) -> ReturningFleetOptions {
        ReturningFleetOptions {
            url: url.into(),
            agents,
            concurrency: 500,
            id_prefix: format!("returning-{}", std::process::id()),
            retry: Duration::from_millis(20),
            welcome_timeout: Duration::from_secs(30),
            open_patience: Duration::from_secs(60),
        }
    }
}

/// What happened to one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEventKind {
    /// A `welcome` arrived from a server of this version.
    Welcomed { server_version: String },
    /// The server sent `logout` (the changeover's deadline).
    LoggedOut { reconnect_within_ms: u64 },
    /// The connection ended otherwise: a close frame, a reset, end of stream.
    Disconnected { reason: String },
}

/// One event, with when it was seen here on both clocks.
#[derive(Debug, Clone)]
pub struct AgentEvent {
    pub agent: usize,
    pub at: Instant,
    /// The same moment on the wall clock, to line up with the server's log.
    pub wall: SystemTime,
    pub kind: AgentEventKind,
}

impl AgentEvent {
    fn ends_a_connection(&self) -> bool {
        !matches!(self.kind, AgentEventKind::Welcomed { .. })
    }

    fn welcomed_by(&self, version: &str) -> bool {
        matches!(&self.kind, AgentEventKind::Welcomed { server_version } if server_version == version)
    }
}

/// Every event of the fleet, in the order they were seen.
#[derive(Debug, Default)]
struct EventLog {
    // Only locked to push or copy, never across an await.
    events: Mutex<Vec<AgentEvent>>,
    failed_attempts: Mutex<BTreeMap<String, usize>>,
    changed: Notify,
}

impl EventLog {
    fn push(&self, agent: usize, kind: AgentEventKind) {
        let event = AgentEvent {
            agent,
            at: Instant::now(),
            wall: SystemTime::now(),
            kind,
        };
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
        self.changed.notify_waiters();
    }

    fn fail(&self, reason: String) {
        if let Ok(mut failed) = self.failed_attempts.lock() {
            *failed.entry(reason).or_default() += 1;
        }
    }

    fn snapshot(&self) -> Vec<AgentEvent> {
        self.events
            .lock()
            .map(|events| events.clone())
            .unwrap_or_default()
    }
}

/// The running fleet. Dropping it aborts every agent, which closes its socket.
#[derive(Debug)]
pub struct ReturningFleet {
    tasks: JoinSet<()>,
    log: Arc<EventLog>,
    agents: usize,
}

impl ReturningFleet {
    /// Opens the fleet and returns once every agent has its first welcome.
    pub async fn open(options: &ReturningFleetOptions) -> anyhow::Result<ReturningFleet> {
        anyhow::ensure!(options.concurrency >= 1, "concurrency must be at least 1");
        let server = crate::fleet::resolve(&options.url).await?;
        let log = Arc::new(EventLog::default());
        let slots = Arc::new(Semaphore::new(options.concurrency));
        let mut tasks = JoinSet::new();
        for index in 0..options.agents {
            let permit = Arc::clone(&slots).acquire_owned().await?;
            let agent = ReturningAgent {
                index,
                server,
                url: options.url.clone(),
                agent_id: format!("{}-{index}", options.id_prefix),
                retry: options.retry,
                welcome_timeout: options.welcome_timeout,
            };
            tasks.spawn(agent.run(Arc::clone(&log), permit));
        }
        let fleet = ReturningFleet {
            tasks,
            log,
            agents: options.agents,
        };
        let agents = options.agents;
        let welcomed = fleet
            .wait_until(options.open_patience, |events| {
                welcomed_agents(events) == agents
            })
            .await;
        if !welcomed {
            anyhow::bail!(
                "only {} of {agents} agents were welcomed within {} s; failed attempts: {:?}",
                welcomed_agents(&fleet.events()),
                options.open_patience.as_secs(),
                fleet.failed_attempts()
            );
        }
        Ok(fleet)
    }

    pub fn agents(&self) -> usize {
        self.agents
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<AgentEvent> {
        self.log.snapshot()
    }

    /// Failed connection attempts so far, by reason.
    pub fn failed_attempts(&self) -> BTreeMap<String, usize> {
        self.log
            .failed_attempts
            .lock()
            .map(|failed| failed.clone())
            .unwrap_or_default()
    }

    /// Waits until `done` holds for the events so far; false when `patience` ran out.
    pub async fn wait_until(
        &self,
        patience: Duration,
        done: impl Fn(&[AgentEvent]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let changed = self.log.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so an event between the look and the wait counts.
            changed.as_mut().enable();
            if done(&self.log.snapshot()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return done(&self.log.snapshot());
            }
        }
    }

    /// Waits until every agent whose connection ended after `since` has been welcomed again
    /// by `version`, and at least one has; false when `patience` ran out.
    pub async fn wait_until_back(&self, since: Instant, version: &str, patience: Duration) -> bool {
        let agents = self.agents;
        self.wait_until(patience, |events| {
            let outage = Outage::of(events, since, version);
            outage.disconnected == agents && outage.back == agents
        })
        .await
    }

    /// Closes every connection at once.
    pub async fn close(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

fn welcomed_agents(events: &[AgentEvent]) -> usize {
    let mut welcomed = std::collections::HashSet::new();
    for event in events {
        if matches!(event.kind, AgentEventKind::Welcomed { .. }) {
            welcomed.insert(event.agent);
        }
    }
    welcomed.len()
}

/// One outage as the fleet saw it: from each agent's first disconnection after a moment
/// until its first welcome by the expected version after that.
#[derive(Debug, Clone, Default)]
pub struct Outage {
    /// Agents whose connection ended after the moment.
    pub disconnected: usize,
    /// Of them, the agents welcomed again by the expected version.
    pub back: usize,
    /// Disconnections that were `logout` messages.
    pub logouts: usize,
    /// The window the `logout` messages announced (the largest seen).
    pub reconnect_within_ms: Option<u64>,
    pub first_disconnect: Option<(Instant, SystemTime)>,
    pub last_disconnect: Option<(Instant, SystemTime)>,
    pub first_back: Option<(Instant, SystemTime)>,
    pub last_back: Option<(Instant, SystemTime)>,
    /// Per agent: its own disconnection to its own welcome by the expected version.
    pub per_agent: Latency,
    /// Welcomes by other versions in between, by version.
    pub welcomes_by_other_versions: BTreeMap<String, usize>,
    /// Connections that ended again after such a welcome, before the expected one.
    pub dropped_after_other_welcome: usize,
}

impl Outage {
    /// Reads the outage that starts after `since` from the events, `version` being the one
    /// that counts as back.
    pub fn of(events: &[AgentEvent], since: Instant, version: &str) -> Outage {
        let mut by_agent: BTreeMap<usize, Vec<&AgentEvent>> = BTreeMap::new();
        for event in events.iter().filter(|event| event.at >= since) {
            by_agent.entry(event.agent).or_default().push(event);
        }
        let mut outage = Outage::default();
        let mut reconnect_times = Vec::new();
        for agent_events in by_agent.values() {
            let Some(start) = agent_events
                .iter()
                .position(|event| event.ends_a_connection())
            else {
                continue;
            };
            let disconnect = agent_events[start];
            outage.disconnected += 1;
            if let AgentEventKind::LoggedOut {
                reconnect_within_ms,
            } = disconnect.kind
            {
                outage.logouts += 1;
                outage.reconnect_within_ms =
                    outage.reconnect_within_ms.max(Some(reconnect_within_ms));
            }
            widen(
                &mut outage.first_disconnect,
                &mut outage.last_disconnect,
                disconnect,
            );
            let mut other_welcome = false;
            for event in &agent_events[start + 1..] {
                if event.welcomed_by(version) {
                    outage.back += 1;
                    reconnect_times.push(event.at.saturating_duration_since(disconnect.at));
                    widen(&mut outage.first_back, &mut outage.last_back, event);
                    break;
                }
                match &event.kind {
                    AgentEventKind::Welcomed { server_version } => {
                        other_welcome = true;
                        *outage
                            .welcomes_by_other_versions
                            .entry(server_version.clone())
                            .or_default() += 1;
                    }
                    _ if other_welcome => {
                        outage.dropped_after_other_welcome += 1;
                        other_welcome = false;
                    }
                    _ => {}
                }
            }
        }
        outage.per_agent = Latency::of(reconnect_times);
        outage
    }

    /// From the first disconnection seen to the first welcome by the expected version.
    pub fn first_disconnect_to_first_back(&self) -> Option<Duration> {
        Some(
            self.first_back?
                .0
                .saturating_duration_since(self.first_disconnect?.0),
        )
    }

    /// From the first disconnection seen until every agent was back.
    pub fn first_disconnect_to_all_back(&self) -> Option<Duration> {
        Some(
            self.last_back?
                .0
                .saturating_duration_since(self.first_disconnect?.0),
        )
    }

    /// From the last disconnection seen to the first welcome by the expected version.
    pub fn last_disconnect_to_first_back(&self) -> Option<Duration> {
        Some(
            self.first_back?
                .0
                .saturating_duration_since(self.last_disconnect?.0),
        )
    }
}

fn widen(
    first: &mut Option<(Instant, SystemTime)>,
    last: &mut Option<(Instant, SystemTime)>,
    event: &AgentEvent,
) {
    if first.is_none_or(|(at, _)| event.at < at) {
        *first = Some((event.at, event.wall));
    }
    if last.is_none_or(|(at, _)| event.at > at) {
        *last = Some((event.at, event.wall));
    }
}

type AgentSocket = WebSocketStream<TcpStream>;

#[derive(Debug)]
struct ReturningAgent {
    index: usize,
    server: SocketAddr,
    url: String,
    agent_id: String,
    retry: Duration,
    welcome_timeout: Duration,
}

impl ReturningAgent {
    async fn run(self, log: Arc<EventLog>, first_slot: OwnedSemaphorePermit) {
        // Held until the first attempt ends, so the first opening is bounded.
        let mut first_slot = Some(first_slot);
        loop {
            let attempt = tokio::time::timeout(self.welcome_timeout, self.open()).await;
            drop(first_slot.take());
            match attempt {
                Ok(Ok((ws, server_version))) => {
                    log.push(self.index, AgentEventKind::Welcomed { server_version });
                    let ending = idle(ws).await;
                    log.push(self.index, ending);
                    // Straight back, as early as the server lets it.
                }
                Ok(Err(reason)) => {
                    log.fail(reason);
                    tokio::time::sleep(self.retry).await;
                }
                Err(_elapsed) => {
                    log.fail(format!(
                        "no welcome within {} s",
                        self.welcome_timeout.as_secs()
                    ));
                    tokio::time::sleep(self.retry).await;
                }
            }
        }
    }

    async fn open(&self) -> Result<(AgentSocket, String), String> {
        let tcp = TcpStream::connect(self.server)
            .await
            .map_err(|err| format!("tcp connect: {}", err.kind()))?;
        tcp.set_nodelay(true).ok();
        let request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|err| format!("bad url: {err}"))?;
        let (mut ws, _response) = tokio_tungstenite::client_async_with_config(
            request,
            tcp,
            Some(agent_websocket_config()),
        )
        .await
        .map_err(|err| format!("websocket handshake: {}", short_error(&err)))?;
        let hello = ClientMessage::Hello(AgentHello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: self.agent_id.clone(),
            user: format!("returning-{}", self.index),
            host: "loadgen".to_owned(),
            platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        });
        let text = serde_json::to_string(&hello).map_err(|err| format!("encode hello: {err}"))?;
        ws.send(Message::text(text))
            .await
            .map_err(|err| format!("send hello: {}", short_error(&err)))?;
        loop {
            match ws.next().await {
                None => return Err("closed before welcome".to_owned()),
                Some(Err(err)) => {
                    return Err(format!("read before welcome: {}", short_error(&err)));
                }
                Some(Ok(Message::Text(text))) => {
                    return match serde_json::from_str::<ServerMessage>(&text) {
                        Ok(ServerMessage::Welcome { server_version, .. }) => {
                            Ok((ws, server_version))
                        }
                        Ok(ServerMessage::Error { code, .. }) => Err(format!(
                            "refused with {}",
                            serde_json::to_string(&code).unwrap_or_default()
                        )),
                        Ok(_) => Err("another message instead of welcome".to_owned()),
                        Err(err) => Err(format!("unreadable welcome: {err}")),
                    };
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(match frame {
                        Some(frame) => format!("closed before welcome with {}", frame.code),
                        None => "closed before welcome".to_owned(),
                    });
                }
                Some(Ok(_)) => {}
            }
        }
    }
}

// Failure reasons are counted by text, so they must not carry addresses or ports.
fn short_error(err: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match err {
        Error::Io(io) => format!("io {}", io.kind()),
        Error::Protocol(protocol) => format!("protocol {protocol}"),
        other => other.to_string(),
    }
}

// Reads until the connection ends; reading is what answers the server's pings.
async fn idle(mut ws: AgentSocket) -> AgentEventKind {
    while let Some(frame) = ws.next().await {
        match frame {
            Ok(Message::Text(text)) => {
                if let Ok(ServerMessage::Logout {
                    reconnect_within_ms,
                    ..
                }) = serde_json::from_str::<ServerMessage>(&text)
                {
                    // The real agent leaves on the logout without waiting for the close.
                    return AgentEventKind::LoggedOut {
                        reconnect_within_ms,
                    };
                }
            }
            Ok(Message::Close(Some(frame))) => {
                return AgentEventKind::Disconnected {
                    reason: format!("server closed with {}", frame.code),
                };
            }
            Ok(Message::Close(None)) => {
                return AgentEventKind::Disconnected {
                    reason: "server closed".to_owned(),
                };
            }
            Ok(_) => {}
            Err(err) => {
                return AgentEventKind::Disconnected {
                    reason: format!("read failed: {}", short_error(&err)),
                };
            }
        }
    }
    AgentEventKind::Disconnected {
        reason: "connection ended".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw_server::RawServer;

    fn event(agent: usize, at: Instant, kind: AgentEventKind) -> AgentEvent {
        AgentEvent {
            agent,
            at,
            wall: SystemTime::UNIX_EPOCH,
            kind,
        }
    }

    fn welcomed(version: &str) -> AgentEventKind {
        AgentEventKind::Welcomed {
            server_version: version.to_owned(),
        }
    }

    #[test]
    fn an_outage_runs_from_each_disconnection_to_the_expected_welcome() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let logout = AgentEventKind::LoggedOut {
            reconnect_within_ms: 2200,
        };
        let reset = AgentEventKind::Disconnected {
            reason: "read failed".to_owned(),
        };
        let events = vec![
            event(0, ms(0), welcomed("1.0.0")),
            event(1, ms(0), welcomed("1.0.0")),
            event(0, ms(100), logout.clone()),
            event(1, ms(110), logout),
            // Agent 1 is let in by the release being rolled back, then dropped.
            event(1, ms(300), welcomed("2.0.0")),
            event(1, ms(310), reset),
            event(0, ms(400), welcomed("1.0.0")),
            event(1, ms(450), welcomed("1.0.0")),
        ];
        let outage = Outage::of(&events, ms(50), "1.0.0");
        assert_eq!(outage.disconnected, 2);
        assert_eq!(outage.back, 2);
        assert_eq!(outage.logouts, 2);
        assert_eq!(outage.reconnect_within_ms, Some(2200));
        assert_eq!(
            outage.first_disconnect_to_first_back(),
            Some(Duration::from_millis(300))
        );
        assert_eq!(
            outage.first_disconnect_to_all_back(),
            Some(Duration::from_millis(350))
        );
        assert_eq!(
            outage.last_disconnect_to_first_back(),
            Some(Duration::from_millis(290))
        );
        assert_eq!(outage.per_agent.max, Duration::from_millis(340));
        assert_eq!(outage.welcomes_by_other_versions.get("2.0.0"), Some(&1));
        assert_eq!(outage.dropped_after_other_welcome, 1);
        // Before the moment nothing counts; a version nobody reached is not back.
        let none = Outage::of(&events, ms(500), "1.0.0");
        assert_eq!(none.disconnected, 0);
        assert_eq!(Outage::of(&events, ms(50), "3.0.0").back, 0);
    }

    // A raw server on a runtime of its own: shutting that runtime down ends every
    // connection at once, as a server process going away would.
    fn raw_server(address: SocketAddr) -> (SocketAddr, tokio::runtime::Runtime) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = {
            let _inside = runtime.enter();
            RawServer::bind(address, 128).unwrap()
        };
        let bound = server.local_addr().unwrap();
        runtime.spawn(server.serve());
        (bound, runtime)
    }

    #[tokio::test]
    async fn agents_come_back_after_their_connection_ends() {
        let (address, server) = raw_server(SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut options = ReturningFleetOptions::new(format!("ws://{address}"), 5);
        options.retry = Duration::from_millis(5);
        let fleet = ReturningFleet::open(&options).await.unwrap();
        assert_eq!(welcomed_agents(&fleet.events()), 5);
        // The server goes away: every connection ends, and nothing listens for a moment.
        let since = Instant::now();
        server.shutdown_background();
        assert!(
            fleet
                .wait_until(Duration::from_secs(10), |events| {
                    Outage::of(events, since, "raw-baseline").disconnected == 5
                })
                .await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        // It comes back on the same port; the agents find it.
        let (_, server) = raw_server(address);
        assert!(
            fleet
                .wait_until_back(since, "raw-baseline", Duration::from_secs(10))
                .await
        );
        let outage = Outage::of(&fleet.events(), since, "raw-baseline");
        assert_eq!(outage.back, 5);
        assert!(outage.per_agent.max >= Duration::from_millis(50));
        assert!(!fleet.failed_attempts().is_empty());
        fleet.close().await;
        server.shutdown_background();
    }
}
