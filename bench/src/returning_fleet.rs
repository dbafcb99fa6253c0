//! A fleet of agents that come back. Like [`crate::fleet`], each agent is one small task
//! speaking the real protocol (`hello`, wait for `welcome`, idle reading); unlike it, when a
//! connection ends (a `logout` message, a close frame, a reset) the agent notes when and
//! why, and reconnects, noting which server version welcomed it. Every countdown `warning`
//! it reads is noted too, with the moment its frame arrived, for the broadcast fan-out.
//!
//! How it comes back is the [`ReturnPolicy`], switchable while the fleet runs: at once,
//! retrying every [`ReturningFleetOptions::retry`] (so the figures are the server's, not
//! the jitter's), or like the real agent (`client-agent/src/agent.rs`): after a lost
//! connection the full-jitter backoff of `changeover_protocol::backoff` (first retry within
//! 0.5 s), after a `logout` a random moment of the announced `reconnect_within_ms` window.
//! Failed attempts are only counted, by reason.
//!
//! Like [`crate::fleet`], agents bind to further loopback source addresses past
//! [`ReturningFleetOptions::agents_per_source_address`], so repeated storms of thousands of
//! reconnects do not run one address out of ephemeral ports (the closed connections linger
//! in TIME_WAIT); and each fleet takes bound addresses the fleets before it did not use,
//! since `bind()` on an address full of TIME_WAIT turns into a scan of the port range.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use changeover_protocol::backoff::{BASE_DELAY, Backoff, MAX_DELAY};
use changeover_protocol::{AgentHello, ClientMessage, PROTOCOL_VERSION, ServerMessage};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
    /// Connections per loopback source address before the next one is used.
    pub agents_per_source_address: usize,
    /// How agents come back at first; [`ReturningFleet::set_policy`] changes it.
    pub policy: ReturnPolicy,
}

/// How an agent comes back after its connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnPolicy {
    /// At once, and every `retry` after a failed attempt: the server's limit.
    AtOnce,
    /// Like the real agent: full-jitter backoff after a loss or a failed attempt, a random
    /// moment of the announced window after a `logout`.
    LikeTheAgent,
}

impl std::fmt::Display for ReturnPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReturnPolicy::AtOnce => "at once",
            ReturnPolicy::LikeTheAgent => "like the agent",
        })
    }
}

/// Source addresses for a returning fleet: fewer agents per address than a one-off fleet,
/// since every storm leaves as many closed connections in TIME_WAIT for a minute.
pub const RETURNING_AGENTS_PER_SOURCE_ADDRESS: usize = 2_000;

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
            agents_per_source_address: RETURNING_AGENTS_PER_SOURCE_ADDRESS,
            policy: ReturnPolicy::AtOnce,
        }
    }
}

/// The next bound source address a returning fleet starts from, counted from 127.0.0.2.
static NEXT_SOURCE: AtomicUsize = AtomicUsize::new(0);

/// The bound source addresses of `sources` (all but the kernel's choice) moved on to
/// addresses no earlier fleet of this process used lately: every storm leaves each agent's
/// closed connection in TIME_WAIT for a minute, and a `bind()` to port 0 counts those as
/// taken (unlike `connect()`, which reuses them on loopback), so on an address that took a
/// few storms it scans the port range for every socket. Seen at 10,000 agents: the load
/// generator spent 12 s in the kernel binding 10,000 sockets on addresses the storms before
/// had used, and the agents came back 10 s late.
fn rotate_sources(sources: Vec<Option<IpAddr>>) -> Vec<Option<IpAddr>> {
    let bound = sources.iter().filter(|source| source.is_some()).count();
    if bound == 0 {
        return sources;
    }
    // 127.0.0.2 to 127.0.0.254.
    const ADDRESSES: usize = 253;
    let first = NEXT_SOURCE.fetch_add(bound, Ordering::Relaxed);
    let mut next = first;
    sources
        .into_iter()
        .map(|source| {
            source.map(|_| {
                let octet = 2 + (next % ADDRESSES) as u8;
                next += 1;
                IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, octet))
            })
        })
        .collect()
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
    /// A countdown `warning` arrived (noted when its frame was read, before decoding).
    Warned { seconds_left: u64 },
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
        matches!(
            self.kind,
            AgentEventKind::LoggedOut { .. } | AgentEventKind::Disconnected { .. }
        )
    }

    fn welcomed_by(&self, version: &str) -> bool {
        matches!(&self.kind, AgentEventKind::Welcomed { server_version } if server_version == version)
    }
}

/// Every event of the fleet, in the order they were seen.
#[derive(Debug, Default)]
struct EventLog {
    // Only locked to push or read, never across an await.
    events: Mutex<Vec<AgentEvent>>,
    failed_attempts: Mutex<BTreeMap<String, usize>>,
    /// Welcomes so far: a cheap test before a waiter reads the events.
    welcomes: AtomicUsize,
    /// Warnings so far, likewise.
    warnings: AtomicUsize,
}

impl EventLog {
    fn push(&self, agent: usize, kind: AgentEventKind) {
        self.push_seen(agent, (Instant::now(), SystemTime::now()), kind);
    }

    fn push_seen(&self, agent: usize, (at, wall): (Instant, SystemTime), kind: AgentEventKind) {
        match kind {
            AgentEventKind::Welcomed { .. } => self.welcomes.fetch_add(1, Ordering::Relaxed),
            AgentEventKind::Warned { .. } => self.warnings.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        let event = AgentEvent {
            agent,
            at,
            wall,
            kind,
        };
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
    }

    fn fail(&self, reason: String) {
        if let Ok(mut failed) = self.failed_attempts.lock() {
            *failed.entry(reason).or_default() += 1;
        }
    }

    fn len(&self) -> usize {
        self.events.lock().map(|events| events.len()).unwrap_or(0)
    }

    fn check<T>(&self, from: usize, look: impl FnOnce(&[AgentEvent]) -> T) -> T {
        let events = self
            .events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        look(&events[from.min(events.len())..])
    }

    fn copy_from(&self, from: usize) -> Vec<AgentEvent> {
        self.check(from, <[AgentEvent]>::to_vec)
    }
}

/// A place in the fleet's event log: what a measurement looks at starts there.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    index: usize,
    /// Welcomes and warnings before the mark.
    welcomes: usize,
    warnings: usize,
    pub at: Instant,
}

/// How often a waiter looks at the events: every event carries its own time, so this only
/// decides when the harness moves on, and keeps the looking off the agents' thread.
const WAIT_POLL: Duration = Duration::from_millis(25);

/// The running fleet. Dropping it aborts every agent, which closes its socket.
#[derive(Debug)]
pub struct ReturningFleet {
    tasks: JoinSet<()>,
    log: Arc<EventLog>,
    agents: usize,
    /// Whether agents come back like the real agent ([`ReturnPolicy::LikeTheAgent`]).
    like_the_agent: Arc<AtomicBool>,
}

impl ReturningFleet {
    /// Opens the fleet and returns once every agent has its first welcome.
    pub async fn open(options: &ReturningFleetOptions) -> anyhow::Result<ReturningFleet> {
        anyhow::ensure!(options.concurrency >= 1, "concurrency must be at least 1");
        anyhow::ensure!(
            options.agents_per_source_address >= 1,
            "agents per source address must be at least 1"
        );
        let server = crate::fleet::resolve(&options.url).await?;
        let sources = rotate_sources(crate::fleet::source_addresses(
            server,
            options.agents,
            options.agents_per_source_address,
        )?);
        let log = Arc::new(EventLog::default());
        let like_the_agent = Arc::new(AtomicBool::new(
            options.policy == ReturnPolicy::LikeTheAgent,
        ));
        let slots = Arc::new(Semaphore::new(options.concurrency));
        let mut tasks = JoinSet::new();
        let start = Mark {
            index: 0,
            welcomes: 0,
            warnings: 0,
            at: Instant::now(),
        };
        for index in 0..options.agents {
            let permit = Arc::clone(&slots).acquire_owned().await?;
            let agent = ReturningAgent {
                index,
                server,
                source: sources[index / options.agents_per_source_address],
                url: options.url.clone(),
                agent_id: format!("{}-{index}", options.id_prefix),
                retry: options.retry,
                welcome_timeout: options.welcome_timeout,
                like_the_agent: Arc::clone(&like_the_agent),
            };
            tasks.spawn(agent.run(Arc::clone(&log), permit));
        }
        let fleet = ReturningFleet {
            tasks,
            log,
            agents: options.agents,
            like_the_agent,
        };
        let agents = options.agents;
        let welcomed = fleet
            .wait_until(start, options.open_patience, |mark, log| {
                log.welcomes.load(Ordering::Relaxed) - mark.welcomes >= agents
                    && log.check(mark.index, welcomed_agents) == agents
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

    /// How agents come back now.
    pub fn policy(&self) -> ReturnPolicy {
        if self.like_the_agent.load(Ordering::Relaxed) {
            ReturnPolicy::LikeTheAgent
        } else {
            ReturnPolicy::AtOnce
        }
    }

    /// How agents come back from now on.
    pub fn set_policy(&self, policy: ReturnPolicy) {
        self.like_the_agent
            .store(policy == ReturnPolicy::LikeTheAgent, Ordering::Relaxed);
    }

    /// The present end of the event log.
    pub fn mark(&self) -> Mark {
        Mark {
            index: self.log.len(),
            welcomes: self.log.welcomes.load(Ordering::Relaxed),
            warnings: self.log.warnings.load(Ordering::Relaxed),
            at: Instant::now(),
        }
    }

    /// The events after `mark`.
    pub fn events_since(&self, mark: Mark) -> Vec<AgentEvent> {
        self.log.copy_from(mark.index)
    }

    /// Waits until `agents` agents have had a warning after `mark`; false when `patience`
    /// ran out.
    pub async fn wait_until_warned(&self, mark: Mark, agents: usize, patience: Duration) -> bool {
        self.wait_until(mark, patience, |mark, log| {
            log.warnings.load(Ordering::Relaxed) - mark.warnings >= agents
                && log.check(mark.index, warned_agents) >= agents
        })
        .await
    }

    pub fn agents(&self) -> usize {
        self.agents
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<AgentEvent> {
        self.log.copy_from(0)
    }

    /// Failed connection attempts so far, by reason.
    pub fn failed_attempts(&self) -> BTreeMap<String, usize> {
        self.log
            .failed_attempts
            .lock()
            .map(|failed| failed.clone())
            .unwrap_or_default()
    }

    /// Waits until `done` holds for the events after `mark`, looking every [`WAIT_POLL`];
    /// false when `patience` ran out.
    async fn wait_until(
        &self,
        mark: Mark,
        patience: Duration,
        done: impl Fn(Mark, &EventLog) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            if done(mark, &self.log) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }

    /// Waits until every agent whose connection ended after `mark` has been welcomed again
    /// by `version`, and at least one has; false when `patience` ran out.
    pub async fn wait_until_back(&self, mark: Mark, version: &str, patience: Duration) -> bool {
        let agents = self.agents;
        self.wait_until(mark, patience, |mark, log| {
            log.welcomes.load(Ordering::Relaxed) - mark.welcomes >= agents
                && log.check(mark.index, |events| {
                    let outage = Outage::of(events, mark.at, version);
                    outage.disconnected == agents && outage.back == agents
                })
        })
        .await
    }

    /// Waits until `agents` agents have lost their connection after `mark`.
    pub async fn wait_until_disconnected(
        &self,
        mark: Mark,
        agents: usize,
        patience: Duration,
    ) -> bool {
        self.wait_until(mark, patience, |mark, log| {
            log.check(mark.index, |events| {
                Outage::of(events, mark.at, "").disconnected >= agents
            })
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

fn warned_agents(events: &[AgentEvent]) -> usize {
    let mut warned = std::collections::HashSet::new();
    for event in events {
        if matches!(event.kind, AgentEventKind::Warned { .. }) {
            warned.insert(event.agent);
        }
    }
    warned.len()
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
                    AgentEventKind::Warned { .. } => {}
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
    source: Option<IpAddr>,
    url: String,
    agent_id: String,
    retry: Duration,
    welcome_timeout: Duration,
    like_the_agent: Arc<AtomicBool>,
}

impl ReturningAgent {
    async fn run(self, log: Arc<EventLog>, first_slot: OwnedSemaphorePermit) {
        // Held until the first attempt ends, so the first opening is bounded.
        let mut first_slot = Some(first_slot);
        let mut backoff = Backoff::with_seed(BASE_DELAY, MAX_DELAY, self.index as u64);
        loop {
            let attempt = tokio::time::timeout(self.welcome_timeout, self.open()).await;
            drop(first_slot.take());
            let like_the_agent = self.like_the_agent.load(Ordering::Relaxed);
            match attempt {
                Ok(Ok((ws, server_version))) => {
                    log.push(self.index, AgentEventKind::Welcomed { server_version });
                    let ending = idle(ws, self.index, &log).await;
                    let logout_window = match ending {
                        AgentEventKind::LoggedOut {
                            reconnect_within_ms,
                        } => Some(Duration::from_millis(reconnect_within_ms)),
                        _ => None,
                    };
                    log.push(self.index, ending);
                    if self.like_the_agent.load(Ordering::Relaxed) {
                        backoff.reset();
                        let pause = match logout_window {
                            // A random moment of the announced window.
                            Some(window) => {
                                Backoff::with_seed(window, window, self.index as u64 ^ 0x5eed)
                                    .next_delay()
                            }
                            None => backoff.next_delay(),
                        };
                        tokio::time::sleep(pause).await;
                    }
                    // Otherwise straight back, as early as the server lets it.
                }
                Ok(Err(reason)) => {
                    log.fail(reason);
                    tokio::time::sleep(self.pause_after_failure(like_the_agent, &mut backoff))
                        .await;
                }
                Err(_elapsed) => {
                    log.fail(format!(
                        "no welcome within {} s",
                        self.welcome_timeout.as_secs()
                    ));
                    tokio::time::sleep(self.pause_after_failure(like_the_agent, &mut backoff))
                        .await;
                }
            }
        }
    }

    fn pause_after_failure(&self, like_the_agent: bool, backoff: &mut Backoff) -> Duration {
        if like_the_agent {
            backoff.next_delay()
        } else {
            self.retry
        }
    }

    async fn connect_tcp(&self) -> std::io::Result<TcpStream> {
        match self.source {
            None => TcpStream::connect(self.server).await,
            Some(source) => {
                let socket = match source {
                    IpAddr::V4(_) => TcpSocket::new_v4()?,
                    IpAddr::V6(_) => TcpSocket::new_v6()?,
                };
                socket.bind(SocketAddr::new(source, 0))?;
                socket.connect(self.server).await
            }
        }
    }

    async fn open(&self) -> Result<(AgentSocket, String), String> {
        let tcp = self
            .connect_tcp()
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
            instance_id: None,
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
async fn idle(mut ws: AgentSocket, index: usize, log: &EventLog) -> AgentEventKind {
    while let Some(frame) = ws.next().await {
        match frame {
            Ok(Message::Text(text)) => {
                let seen = (Instant::now(), SystemTime::now());
                match serde_json::from_str::<ServerMessage>(&text) {
                    Ok(ServerMessage::Logout {
                        reconnect_within_ms,
                        ..
                    }) => {
                        // The real agent leaves on the logout without waiting for the close.
                        return AgentEventKind::LoggedOut {
                            reconnect_within_ms,
                        };
                    }
                    Ok(ServerMessage::Warning { seconds_left, .. }) => {
                        log.push_seen(index, seen, AgentEventKind::Warned { seconds_left });
                    }
                    _ => {}
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
    fn each_fleet_binds_to_addresses_the_one_before_did_not_use() {
        let server = SocketAddr::from(([127, 0, 0, 1], 7600));
        let sources =
            || rotate_sources(crate::fleet::source_addresses(server, 6_000, 2_000).unwrap());
        let first = sources();
        let second = sources();
        assert_eq!(first.len(), 3);
        assert_eq!(first[0], None, "the first group is the kernel's choice");
        assert_eq!(second[0], None);
        for source in first[1..].iter().chain(&second[1..]) {
            let Some(IpAddr::V4(address)) = source else {
                panic!("{source:?}");
            };
            assert_eq!(address.octets()[..3], [127, 0, 0]);
            assert!((2..=254).contains(&address.octets()[3]));
        }
        assert!(first[1..].iter().all(|source| !second.contains(source)));
        assert_eq!(rotate_sources(vec![None]), [None]);
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
        let since = fleet.mark();
        server.shutdown_background();
        assert!(
            fleet
                .wait_until_disconnected(since, 5, Duration::from_secs(10))
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
        let outage = Outage::of(&fleet.events_since(since), since.at, "raw-baseline");
        assert_eq!(outage.back, 5);
        assert!(outage.per_agent.max >= Duration::from_millis(50));
        assert!(!fleet.failed_attempts().is_empty());
        fleet.close().await;
        server.shutdown_background();
    }
}
