//! A fleet of simulated agents in one process: one small task per connection, each
//! speaking the real protocol (`hello`, wait for `welcome`, then idle reading, which is
//! what lets tungstenite answer the server's pings).
//!
//! Connections are opened with bounded concurrency, so the server's listen backlog is not
//! overrun and the figures measure the server rather than SYN retransmits. Past
//! [`FleetOptions::agents_per_source_address`] connections each further group binds its
//! sockets to the next loopback address (127.0.0.2, 127.0.0.3, …): one source address
//! reaches one server port through at most the ephemeral port range, and `connect()`
//! slows down long before that range is used up (see [`DEFAULT_AGENTS_PER_SOURCE_ADDRESS`]).
//!
//! It simulates connections, not agents: no backoff, no reconnect, no update handling.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use changeover_protocol::{AgentHello, ClientMessage, PROTOCOL_VERSION, ServerMessage};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Connections per source address by default. Linux's `connect()` picks ephemeral ports
/// of one parity first (half of the ~28k in `ip_local_port_range`); past ~14k on one
/// address its search for a free port turns into a scan. Measured here: 19,000 agents from
/// 127.0.0.1 alone took 6.6 s with the load generator at 97% of a core, 6.0 s of it in the
/// kernel; spread over four addresses, 1.06 s. At 10,000 it makes no difference.
pub const DEFAULT_AGENTS_PER_SOURCE_ADDRESS: usize = 10_000;

/// What fleet to open.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// A `ws://host:port` URL.
    pub url: String,
    pub agents: usize,
    /// Connections between TCP connect and welcome at once.
    pub concurrency: usize,
    /// Agent ids are `{id_prefix}-{index}`; unique per fleet, and per process by default.
    pub id_prefix: String,
    /// From TCP connect to welcome, per agent.
    pub welcome_timeout: Duration,
    /// Connections per loopback source address before the next one is used.
    pub agents_per_source_address: usize,
}

impl FleetOptions {
    pub fn new(url: impl Into<String>, agents: usize) -> FleetOptions {
        FleetOptions {
            url: url.into(),
            agents,
            concurrency: 500,
            id_prefix: format!("loadgen-{}", std::process::id()),
            welcome_timeout: Duration::from_secs(30),
            agents_per_source_address: DEFAULT_AGENTS_PER_SOURCE_ADDRESS,
        }
    }
}

/// The WebSocket settings of a simulated agent: the real agent's small buffers
/// The `[server]` keys every measurement with a fleet needs: the whole fleet connects from
/// 127.0.0.1, one address, which the server's per-address limits would otherwise cut short.
pub const ONE_ADDRESS_FLEET_KEYS: &str =
    "max_sessions_per_address = 1000000\nmax_handshakes_per_address = 1000000\n";

/// (`changeover_agent::agent::websocket_config`), so the load generator itself stays small.
pub fn agent_websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(changeover_protocol::MAX_MESSAGE_BYTES))
        .max_frame_size(Some(changeover_protocol::MAX_MESSAGE_BYTES))
}

/// How opening the fleet went.
#[derive(Debug, Clone)]
pub struct OpenReport {
    pub requested: usize,
    pub welcomed: usize,
    /// Why the others did not get a welcome, with how many each.
    pub failures: BTreeMap<String, usize>,
    /// From the first connect to the last welcome or failure.
    pub elapsed: Duration,
    /// Connect-to-welcome time of the welcomed agents.
    pub latency: Latency,
}

impl OpenReport {
    /// Welcomes per second over the whole opening.
    pub fn welcome_rate(&self) -> f64 {
        self.welcomed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for OpenReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} welcomed in {:.2} s ({:.0}/s); connect-to-welcome p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.welcomed,
            self.requested,
            self.elapsed.as_secs_f64(),
            self.welcome_rate(),
            millis(self.latency.p50),
            millis(self.latency.p99),
            millis(self.latency.max),
        )?;
        for (reason, count) in &self.failures {
            write!(f, "\n  {count} failed: {reason}")?;
        }
        Ok(())
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Percentiles of a set of durations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latency {
    pub fn of(mut samples: Vec<Duration>) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let at = |fraction: f64| {
            let rank = ((samples.len() as f64 * fraction).ceil() as usize).max(1);
            samples[rank.min(samples.len()) - 1]
        };
        Latency {
            p50: at(0.50),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        }
    }
}

/// The open connections. Dropping the fleet aborts every task, which closes its socket.
#[derive(Debug)]
pub struct Fleet {
    tasks: JoinSet<()>,
    /// Welcomed connections that ended since, by reason.
    lost: Arc<LostConnections>,
}

#[derive(Debug, Default)]
struct LostConnections {
    count: AtomicUsize,
    // Only touched when a connection ends, never across an await.
    reasons: Mutex<BTreeMap<String, usize>>,
}

impl LostConnections {
    fn record(&self, reason: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut reasons) = self.reasons.lock() {
            *reasons.entry(reason).or_default() += 1;
        }
    }
}

impl Fleet {
    /// Welcomed connections that have ended since.
    pub fn lost(&self) -> usize {
        self.lost.count.load(Ordering::Relaxed)
    }

    /// Why connections were lost, with how many each.
    pub fn lost_reasons(&self) -> BTreeMap<String, usize> {
        self.lost
            .reasons
            .lock()
            .map(|reasons| reasons.clone())
            .unwrap_or_default()
    }

    /// Closes every connection at once (no close handshake: a fleet disappearing).
    pub async fn close(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Opens the fleet: returns once every agent has its welcome or has failed.
pub async fn open(options: &FleetOptions) -> anyhow::Result<(Fleet, OpenReport)> {
    anyhow::ensure!(options.concurrency >= 1, "concurrency must be at least 1");
    anyhow::ensure!(
        options.agents_per_source_address >= 1,
        "agents per source address must be at least 1"
    );
    let server = resolve(&options.url).await?;
    let source_addresses =
        source_addresses(server, options.agents, options.agents_per_source_address)?;

    let lost = Arc::new(LostConnections::default());
    let slots = Arc::new(Semaphore::new(options.concurrency));
    let (outcome_tx, mut outcome_rx) = mpsc::channel::<Result<Duration, String>>(1024);
    let mut tasks = JoinSet::new();
    let started = Instant::now();

    let spawn_all = async {
        for index in 0..options.agents {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                break;
            };
            let agent = Agent {
                index,
                server,
                source: source_addresses[index / options.agents_per_source_address],
                url: options.url.clone(),
                agent_id: format!("{}-{index}", options.id_prefix),
                welcome_timeout: options.welcome_timeout,
            };
            let outcome_tx = outcome_tx.clone();
            let lost = Arc::clone(&lost);
            tasks.spawn(async move {
                let started = Instant::now();
                let opened = agent.open().await;
                drop(permit);
                match opened {
                    Ok(ws) => {
                        let _ = outcome_tx.send(Ok(started.elapsed())).await;
                        lost.record(idle(ws).await);
                    }
                    Err(reason) => {
                        let _ = outcome_tx.send(Err(reason)).await;
                    }
                }
            });
        }
    };
    let collect_all = async {
        let mut latencies = Vec::with_capacity(options.agents);
        let mut failures = BTreeMap::new();
        for _ in 0..options.agents {
            match outcome_rx.recv().await {
                Some(Ok(latency)) => latencies.push(latency),
                Some(Err(reason)) => *failures.entry(reason).or_default() += 1,
                None => break,
            }
        }
        (latencies, failures)
    };
    let ((), (latencies, failures)) = tokio::join!(spawn_all, collect_all);
    let report = OpenReport {
        requested: options.agents,
        welcomed: latencies.len(),
        failures,
        elapsed: started.elapsed(),
        latency: Latency::of(latencies),
    };
    Ok((Fleet { tasks, lost }, report))
}

/// `connect`: opens the fleet, prints how it went, and holds it for `hold` (or until
/// Ctrl-C), then says how many connections were lost meanwhile.
pub async fn connect_and_hold(
    options: &FleetOptions,
    hold: Option<Duration>,
) -> anyhow::Result<()> {
    let (fleet, report) = open(options).await?;
    println!("{report}");
    match hold {
        Some(hold) => tokio::time::sleep(hold).await,
        None => {
            println!("holding the connections; Ctrl-C to stop");
            tokio::signal::ctrl_c()
                .await
                .context("cannot watch Ctrl-C")?;
        }
    }
    println!(
        "{} of {} connections lost while held",
        fleet.lost(),
        report.welcomed
    );
    for (reason, count) in fleet.lost_reasons() {
        println!("  {count}: {reason}");
    }
    fleet.close().await;
    Ok(())
}

pub(crate) async fn resolve(url: &str) -> anyhow::Result<SocketAddr> {
    let request = url
        .into_client_request()
        .with_context(|| format!("{url:?} is not a ws:// URL"))?;
    let uri = request.uri();
    anyhow::ensure!(
        uri.scheme_str() == Some("ws"),
        "{url:?}: only ws:// is supported (the load generator runs on the server's machine)"
    );
    let host = uri
        .host()
        .with_context(|| format!("{url:?} names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))
}

// The source address of each group of agents: the kernel's choice for the first, then
// 127.0.0.2, 127.0.0.3, … for a loopback server.
pub(crate) fn source_addresses(
    server: SocketAddr,
    agents: usize,
    agents_per_source_address: usize,
) -> anyhow::Result<Vec<Option<IpAddr>>> {
    let groups = agents.div_ceil(agents_per_source_address).max(1);
    if groups > 1 {
        anyhow::ensure!(
            server.ip().is_loopback() && server.is_ipv4(),
            "more than {agents_per_source_address} agents need several source addresses, \
             which is only done for a 127.x.x.x server"
        );
        anyhow::ensure!(groups < 254, "too many agents for 127.0.0.2 to 127.0.0.254");
    }
    Ok((0..groups)
        .map(|group| match group {
            0 => None,
            _ => Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + group as u8))),
        })
        .collect())
}

#[derive(Debug)]
struct Agent {
    index: usize,
    server: SocketAddr,
    source: Option<IpAddr>,
    url: String,
    agent_id: String,
    welcome_timeout: Duration,
}

type AgentSocket = WebSocketStream<TcpStream>;

impl Agent {
    async fn open(&self) -> Result<AgentSocket, String> {
        match tokio::time::timeout(self.welcome_timeout, self.open_unbounded()).await {
            Ok(opened) => opened,
            Err(_elapsed) => Err(format!(
                "no welcome within {} s",
                self.welcome_timeout.as_secs()
            )),
        }
    }

    async fn open_unbounded(&self) -> Result<AgentSocket, String> {
        let tcp = self
            .connect_tcp()
            .await
            .map_err(|err| format!("tcp connect: {err}"))?;
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
        .map_err(|err| format!("websocket handshake: {err}"))?;
        let hello = ClientMessage::Hello(AgentHello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: self.agent_id.clone(),
            user: format!("load-{}", self.index),
            host: "loadgen".to_owned(),
            platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            instance_id: None,
        });
        let text = serde_json::to_string(&hello).map_err(|err| format!("encode hello: {err}"))?;
        ws.send(Message::text(text))
            .await
            .map_err(|err| format!("send hello: {err}"))?;
        loop {
            match ws.next().await {
                None => return Err("closed before welcome".to_owned()),
                Some(Err(err)) => return Err(format!("read before welcome: {err}")),
                Some(Ok(Message::Text(text))) => {
                    return match serde_json::from_str::<ServerMessage>(&text) {
                        Ok(ServerMessage::Welcome { .. }) => Ok(ws),
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
}

// Reads until the connection ends; reading is what answers the server's pings.
async fn idle(mut ws: AgentSocket) -> String {
    while let Some(frame) = ws.next().await {
        match frame {
            Ok(Message::Close(Some(frame))) => {
                return format!("server closed with {} {}", frame.code, frame.reason);
            }
            Ok(Message::Close(None)) => return "server closed".to_owned(),
            Ok(_) => {}
            Err(err) => return format!("read failed: {err}"),
        }
    }
    "connection ended".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw_server::RawServer;

    #[tokio::test]
    async fn a_fleet_is_welcomed_and_held_by_a_raw_server() {
        let server = RawServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), 128).unwrap();
        let url = format!("ws://{}", server.local_addr().unwrap());
        let serving = tokio::spawn(server.serve());
        let mut options = FleetOptions::new(url, 40);
        options.concurrency = 7;
        let (fleet, report) = open(&options).await.unwrap();
        assert_eq!(report.welcomed, 40, "{report}");
        assert!(report.failures.is_empty(), "{report}");
        assert!(report.latency.max >= report.latency.p50);
        assert_eq!(fleet.lost(), 0);
        fleet.close().await;
        serving.abort();
    }

    #[tokio::test]
    async fn a_missing_server_is_reported_per_agent_not_as_an_error() {
        // Bind and drop to find a port that nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = FleetOptions::new(format!("ws://127.0.0.1:{port}"), 3);
        let (fleet, report) = open(&options).await.unwrap();
        assert_eq!(report.welcomed, 0);
        assert_eq!(report.failures.values().sum::<usize>(), 3, "{report}");
        assert!(
            report
                .failures
                .keys()
                .all(|reason| reason.starts_with("tcp connect")),
            "{report}"
        );
        fleet.close().await;
    }

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let latency = Latency::of(samples);
        assert_eq!(latency.p50, Duration::from_millis(50));
        assert_eq!(latency.p99, Duration::from_millis(99));
        assert_eq!(latency.max, Duration::from_millis(100));
        assert_eq!(Latency::of(Vec::new()), Latency::default());
    }

    #[test]
    fn groups_past_the_first_bind_to_further_loopback_addresses() {
        let server = SocketAddr::from(([127, 0, 0, 1], 7600));
        let options = FleetOptions::new("ws://127.0.0.1:7600", 60_000);
        let sources = source_addresses(server, options.agents, 25_000).unwrap();
        assert_eq!(
            sources,
            [
                None,
                Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))),
                Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)))
            ]
        );
        assert_eq!(source_addresses(server, 10, 25_000).unwrap(), [None]);
        let remote = SocketAddr::from(([192, 0, 2, 1], 7600));
        assert!(source_addresses(remote, 60_000, 25_000).is_err());
    }
}
