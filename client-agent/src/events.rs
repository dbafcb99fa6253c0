//! The local events stream: the running agent tells the client application on its own
//! workstation what it knows — connected or not, the countdown, the logout, its own update —
//! one JSON line per event, so the vendor's client can show its own dialog. The hooks stay.
//!
//! Three parts:
//!
//! - [`Events`], the hub: the agent's code emits into it, and it keeps the snapshot a new
//!   client starts with. Lines go out through a bounded broadcast channel: a client that
//!   falls [`LINES_BEHIND`] lines behind or does not take a line within [`WRITE_PATIENCE`]
//!   is dropped (it reconnects and starts again from a fresh `state` line), so no client can
//!   hold up the agent or make it keep more than that.
//! - [`EventsServer`], the endpoint `run` serves: at most [`MAX_CLIENTS`] clients at once,
//!   each with its own task. The endpoint itself is per platform (`events/endpoint_unix.rs`:
//!   a socket in `STATE_DIR/run/`; `events/endpoint_windows.rs`: a named pipe), behind the
//!   same few functions.
//! - [`follow`], `changeover-agent events`: prints the stream, following the agent across
//!   its restarts.
//!
//! Not here: the event types, which the vendor's client can reuse
//! (`changeover_protocol::agent_events`), and deciding what happened (the session loop in
//! `agent.rs`, the update in `self_update.rs`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use changeover_protocol::agent_events::{
    AgentEvent, AgentEventKind, AgentState, CountdownWarning, MAX_EVENT_LINE_BYTES, UpdateStep,
};
use changeover_protocol::text::escape_control;
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
};
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

#[cfg(unix)]
#[path = "events/endpoint_unix.rs"]
mod endpoint;
#[cfg(windows)]
#[path = "events/endpoint_windows.rs"]
mod endpoint;

/// Events clients served at once; one more is closed right away.
pub const MAX_CLIENTS: usize = 16;

/// Lines a client may fall behind before it is dropped. A changeover makes a handful.
pub const LINES_BEHIND: usize = 64;

/// How long a client may take to accept one line before it is dropped.
pub const WRITE_PATIENCE: Duration = Duration::from_secs(5);

/// How long the agent waits for its clients to take the last lines when it stops or
/// restarts (the `update_installed` before its restart).
const CLOSE_PATIENCE: Duration = Duration::from_secs(1);

/// How often `events` tries again while the agent is not running.
const RETRY_EVERY: Duration = Duration::from_millis(250);

/// How long the agent may be gone (restarting into its update) before `events` says so.
const QUIET_OUTAGE: Duration = Duration::from_secs(2);

/// The hub the agent emits its events into; cheap to clone.
#[derive(Debug, Clone)]
pub struct Events {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Every event as its line (newline included), serialised once for all clients.
    lines: broadcast::Sender<Arc<str>>,
    /// What a new client's `state` line says. Changed under the same lock as each send, so
    /// a snapshot and the lines after it neither miss nor repeat an event.
    state: Mutex<Known>,
}

/// What the agent knows, for the snapshot.
#[derive(Debug)]
struct Known {
    connected: bool,
    server: String,
    server_version: Option<String>,
    agent_version: String,
    /// The warning counting down, and when it came (its `seconds_left` counts from then,
    /// on this machine's monotonic clock, whatever the server's clock says).
    warning: Option<(CountdownWarning, Instant)>,
}

impl Events {
    /// A hub for the agent of `agent_version` talking to `server`, with no client yet.
    pub fn new(server: &str, agent_version: &str) -> Events {
        let (lines, _) = broadcast::channel(LINES_BEHIND);
        Events {
            shared: Arc::new(Shared {
                lines,
                state: Mutex::new(Known {
                    connected: false,
                    server: server.to_owned(),
                    server_version: None,
                    agent_version: agent_version.to_owned(),
                    warning: None,
                }),
            }),
        }
    }

    /// Tells every client; never waits for one.
    pub fn emit(&self, kind: AgentEventKind) {
        let mut known = self
            .shared
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        known.apply(&kind);
        debug!(event = kind.name(), "local event");
        if let Some(line) = encode(AgentEvent {
            kind,
            at: SystemTime::now(),
        }) {
            // Without clients there is nobody to tell, and that is fine.
            let _ = self.shared.lines.send(line);
        }
    }

    /// The `state` line for a new client, and the lines from then on.
    fn subscribe(&self) -> (Option<Arc<str>>, broadcast::Receiver<Arc<str>>) {
        let known = self
            .shared
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let lines = self.shared.lines.subscribe();
        let snapshot = encode(AgentEvent {
            kind: AgentEventKind::State(known.snapshot(Instant::now())),
            at: SystemTime::now(),
        });
        (snapshot, lines)
    }
}

impl Known {
    fn apply(&mut self, kind: &AgentEventKind) {
        match kind {
            AgentEventKind::Connected { server_version, .. } => {
                self.connected = true;
                self.server_version = Some(server_version.clone());
                // A countdown still running is announced again right after the welcome.
                self.warning = None;
            }
            AgentEventKind::Disconnected { .. } => {
                self.connected = false;
                self.server_version = None;
            }
            AgentEventKind::Warning(warning) => {
                self.warning = Some((warning.clone(), Instant::now()));
            }
            AgentEventKind::Cancelled { .. } => self.warning = None,
            AgentEventKind::Logout { .. } => {
                self.connected = false;
                self.server_version = None;
                self.warning = None;
            }
            AgentEventKind::State(_)
            | AgentEventKind::UpdateOffered { .. }
            | AgentEventKind::UpdateInstalling { .. }
            | AgentEventKind::UpdateInstalled { .. }
            | AgentEventKind::UpdateFailed { .. }
            | AgentEventKind::UpdateDeclined { .. }
            | AgentEventKind::Unknown => {}
        }
    }

    fn snapshot(&self, now: Instant) -> AgentState {
        let warning = self.warning.as_ref().and_then(|(warning, received)| {
            let elapsed = now.saturating_duration_since(*received).as_secs();
            (elapsed < warning.seconds_left).then(|| CountdownWarning {
                seconds_left: warning.seconds_left - elapsed,
                ..warning.clone()
            })
        });
        AgentState {
            connected: self.connected,
            server: self.server.clone(),
            server_version: self.server_version.clone(),
            agent_version: self.agent_version.clone(),
            warning,
        }
    }
}

fn encode(event: AgentEvent) -> Option<Arc<str>> {
    match serde_json::to_string(&event) {
        Ok(mut line) => {
            line.push('\n');
            Some(line.into())
        }
        Err(err) => {
            warn!(event = event.kind.name(), cause = %err, "cannot encode a local event");
            None
        }
    }
}

/// Why the local endpoint cannot be served or followed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot prepare {path} for the events socket: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the events socket {path} would be longer than a socket path may be; pass a shorter \
         --state-dir"
    )]
    PathTooLong { path: PathBuf },
    #[error("another agent serves {endpoint}; run one agent per state folder")]
    InUse { endpoint: String },
    #[error("cannot serve {endpoint}: {source}")]
    Serve {
        endpoint: String,
        source: std::io::Error,
    },
}

/// Why `events` could not open the endpoint.
#[derive(Debug)]
enum ConnectError {
    /// Nothing serves it: the agent is not running (or restarting).
    NotRunning,
    /// It is there but takes no client this moment; try again at once.
    Busy,
    /// Anything else (another user's endpoint, say): trying again would not help.
    Failed(std::io::Error),
}

/// The running agent's side of the stream: the hub and its endpoint.
#[derive(Debug)]
pub struct EventsServer {
    events: Events,
    /// Cancelled by [`EventsServer::close`]: the endpoint stops accepting, and each client
    /// takes what is queued for it, then its connection ends.
    stop: CancellationToken,
    /// The accept loop and one task per client, waited for (briefly) at the close.
    tasks: TaskTracker,
}

impl EventsServer {
    /// Serves `events` on the endpoint of `state_dir`, replacing a stale one. When it
    /// cannot (another agent serves it, a folder it may not use), the agent runs on
    /// without: that is logged, and the hooks still run.
    pub fn start(state_dir: &Path, events: Events) -> EventsServer {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let state_dir = state_dir.to_owned();
        let served = events.clone();
        let accepting = stop.clone();
        let spawner = tasks.clone();
        tasks.spawn(async move {
            match endpoint::Listener::bind(&state_dir).await {
                Ok(listener) => {
                    info!(endpoint = %endpoint::describe(&state_dir), "serving local events");
                    accept_clients(listener, served, accepting, spawner).await;
                }
                Err(err) => warn!(cause = %err, "no local events stream; the hooks still run"),
            }
        });
        EventsServer {
            events,
            stop,
            tasks,
        }
    }

    /// The hub the agent emits into.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// Stops serving; the clients get what was emitted up to now (within
    /// [`CLOSE_PATIENCE`]), then see the end of the stream.
    pub async fn close(self) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(CLOSE_PATIENCE, self.tasks.wait())
            .await
            .is_err()
        {
            debug!("an events client did not take its last lines in time");
        }
    }
}

async fn accept_clients(
    mut listener: endpoint::Listener,
    events: Events,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let client = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(client) => client,
                Err(err) => {
                    // Out of file descriptors, say: wait instead of spinning.
                    warn!(cause = %err, "cannot accept an events client");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            warn!(
                max = MAX_CLIENTS,
                "too many events clients; closing the new one"
            );
            continue;
        };
        let events = events.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let _slot = slot;
            match serve_client(client, &events, &stop).await {
                Ok(()) => debug!("events client left"),
                Err(gone) => info!(reason = %gone, "events client dropped"),
            }
        });
    }
}

/// Why the agent let go of a client.
#[derive(Debug, thiserror::Error)]
enum Dropped {
    #[error("it fell {0} lines behind")]
    Lagged(u64),
    #[error("it took no line for {} s", WRITE_PATIENCE.as_secs())]
    Stuck,
    #[error("writing to it failed: {0}")]
    Write(std::io::Error),
}

/// One client: the `state` line, then every event until it leaves, lags or the agent stops.
async fn serve_client<S: AsyncRead + AsyncWrite>(
    client: S,
    events: &Events,
    stop: &CancellationToken,
) -> Result<(), Dropped> {
    let (snapshot, mut lines) = events.subscribe();
    let (mut from_client, mut to_client) = tokio::io::split(client);
    if let Some(snapshot) = snapshot {
        write_line(&mut to_client, &snapshot).await?;
    }
    let mut ignored = [0u8; 256];
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                // What was emitted before the stop still goes out: `update_installed`
                // before a restart.
                while let Ok(line) = lines.try_recv() {
                    write_line(&mut to_client, &line).await?;
                }
                let _ = to_client.shutdown().await;
                return Ok(());
            }
            line = lines.recv() => match line {
                Ok(line) => write_line(&mut to_client, &line).await?,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    return Err(Dropped::Lagged(missed));
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            // The stream goes one way: what a client sends is ignored; its end ends it.
            read = from_client.read(&mut ignored) => match read {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
        }
    }
}

async fn write_line<W: AsyncWrite + Unpin>(to_client: &mut W, line: &str) -> Result<(), Dropped> {
    let written = tokio::time::timeout(WRITE_PATIENCE, async {
        to_client.write_all(line.as_bytes()).await?;
        to_client.flush().await
    })
    .await;
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(Dropped::Write(err)),
        Err(_) => Err(Dropped::Stuck),
    }
}

/// What `changeover-agent events` was given.
#[derive(Debug, Clone)]
pub struct FollowOptions {
    /// The state folder of the agent to follow (its `--state-dir`).
    pub state_dir: PathBuf,
    /// One JSON object per line, as the agent sends it, instead of lines for people.
    pub json: bool,
    /// Print the `state` line and exit.
    pub once: bool,
}

/// How following one connection ended.
enum Relayed {
    /// Stopped (Ctrl-C), or `--once` printed its line.
    Done,
    /// Whoever reads our output went away.
    OutputClosed,
    /// The agent ended the stream (it stopped or restarts) after this many lines.
    Ended { lines: u64 },
}

/// `changeover-agent events`: prints the agent's events to `output` as they come, until
/// `stop` is cancelled or `output` is closed; follows the agent across its restarts.
pub async fn follow<W: AsyncWrite + Unpin>(
    options: &FollowOptions,
    output: &mut W,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let endpoint = endpoint::describe(&options.state_dir);
    let mut ever_connected = false;
    let mut down_since: Option<Instant> = None;
    let mut said_not_running = false;
    let mut said_closed_at_once = false;
    loop {
        let attempt = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            attempt = endpoint::connect(&options.state_dir) => attempt,
        };
        let mut pause = RETRY_EVERY;
        match attempt {
            Ok(stream) => {
                ever_connected = true;
                down_since = None;
                said_not_running = false;
                match relay(stream, options, output, stop).await? {
                    Relayed::Done | Relayed::OutputClosed => return Ok(()),
                    Relayed::Ended { lines: 0 } => {
                        if !said_closed_at_once {
                            eprintln!(
                                "the agent closed the connection before its first line (it \
                                 serves at most {MAX_CLIENTS} clients at once); trying again"
                            );
                            said_closed_at_once = true;
                        }
                        pause = Duration::from_secs(1);
                    }
                    Relayed::Ended { .. } => said_closed_at_once = false,
                }
            }
            Err(ConnectError::NotRunning) => {
                if options.once {
                    anyhow::bail!("the agent is not running (nothing serves {endpoint})");
                }
                let since = *down_since.get_or_insert_with(Instant::now);
                if !said_not_running && (!ever_connected || since.elapsed() >= QUIET_OUTAGE) {
                    eprintln!(
                        "the agent is not running (nothing serves {endpoint}); waiting for it"
                    );
                    said_not_running = true;
                }
            }
            Err(ConnectError::Busy) => pause = Duration::from_millis(20),
            Err(ConnectError::Failed(err)) => {
                anyhow::bail!("cannot open {endpoint}: {err}");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(pause) => {}
        }
    }
}

async fn relay<S: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    stream: S,
    options: &FollowOptions,
    output: &mut W,
    stop: &CancellationToken,
) -> anyhow::Result<Relayed> {
    let mut reader = tokio::io::BufReader::new(stream);
    let mut line = Vec::new();
    let mut lines = 0;
    loop {
        let read = tokio::select! {
            () = stop.cancelled() => return Ok(Relayed::Done),
            read = read_line(&mut reader, &mut line) => read,
        };
        match read {
            Ok(true) => {}
            Ok(false) => return Ok(Relayed::Ended { lines }),
            Err(err) => {
                debug!(cause = %err, "the events stream broke off");
                return Ok(Relayed::Ended { lines });
            }
        }
        lines += 1;
        let Some(shown) = show(&line, options.json) else {
            continue;
        };
        let written = async {
            output.write_all(shown.as_bytes()).await?;
            output.flush().await
        }
        .await;
        match written {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {
                return Ok(Relayed::OutputClosed);
            }
            Err(err) => return Err(anyhow::Error::from(err).context("cannot write the events")),
        }
        if options.once {
            return Ok(Relayed::Done);
        }
    }
}

/// Reads one line (at most [`MAX_EVENT_LINE_BYTES`]) into `line`; `false` at the end.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<bool> {
    line.clear();
    let limit = u64::try_from(MAX_EVENT_LINE_BYTES).unwrap_or(u64::MAX);
    let read = (&mut *reader).take(limit).read_until(b'\n', line).await?;
    if read == 0 {
        return Ok(false);
    }
    if !line.ends_with(b"\n") && read >= MAX_EVENT_LINE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line longer than {MAX_EVENT_LINE_BYTES} bytes"),
        ));
    }
    Ok(true)
}

/// A line as `events` prints it, newline included: with `--json` as the agent sent it
/// (fields a newer agent adds pass through), else in words; `None` for what is no event.
fn show(line: &[u8], json: bool) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?.trim_end();
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    if !value.is_object() {
        return None;
    }
    if json {
        return Some(format!("{text}\n"));
    }
    let shown = match serde_json::from_value::<AgentEvent>(value.clone()) {
        Ok(AgentEvent {
            kind: AgentEventKind::Unknown,
            ..
        })
        | Err(_) => {
            let name = value["event"].as_str().unwrap_or("?");
            let at = value["at"].as_str().unwrap_or("");
            format!("{at} {}", escape_control(name))
        }
        Ok(event) => format!(
            "{} {}",
            crate::server_values::rfc3339(event.at),
            describe(&event.kind)
        ),
    };
    Some(format!("{shown}\n"))
}

/// An event in words, for a person at a terminal; text from the server shown escaped.
pub fn describe(kind: &AgentEventKind) -> String {
    let text = |text: &str| escape_control(text).into_owned();
    match kind {
        AgentEventKind::State(state) => {
            let mut line = if state.connected {
                format!(
                    "state: connected to {} (server {}), agent {}",
                    text(&state.server),
                    text(state.server_version.as_deref().unwrap_or("?")),
                    text(&state.agent_version)
                )
            } else {
                format!(
                    "state: not connected to {}, agent {}",
                    text(&state.server),
                    text(&state.agent_version)
                )
            };
            if let Some(warning) = &state.warning {
                line.push_str(&format!(
                    "; update to {} in {} s: {}",
                    text(&warning.target_version),
                    warning.seconds_left,
                    text(&warning.message)
                ));
            }
            line
        }
        AgentEventKind::Connected {
            server,
            server_version,
        } => format!(
            "connected to {} (server {})",
            text(server),
            text(server_version)
        ),
        AgentEventKind::Disconnected { reason } => format!("disconnected: {}", text(reason)),
        AgentEventKind::Warning(warning) => format!(
            "update to {} in {} s (logout at {}): {}",
            text(&warning.target_version),
            warning.seconds_left,
            crate::server_values::rfc3339(warning.deadline),
            text(&warning.message)
        ),
        AgentEventKind::Cancelled { message, .. } => {
            format!("update called off: {}", text(message))
        }
        AgentEventKind::Logout {
            message,
            reconnect_within_ms,
            ..
        } => format!(
            "logged out: {}; reconnecting within {reconnect_within_ms} ms",
            text(message)
        ),
        AgentEventKind::UpdateOffered { version } => {
            format!("agent update {} offered", text(version))
        }
        AgentEventKind::UpdateInstalling { version, step } => {
            let step = match step {
                UpdateStep::Downloading => "downloading",
                UpdateStep::Installing => "installing",
                UpdateStep::Unknown => "in progress",
            };
            format!("agent update {}: {step}", text(version))
        }
        AgentEventKind::UpdateInstalled { version } => {
            format!(
                "agent update {} installed; the agent restarts",
                text(version)
            )
        }
        AgentEventKind::UpdateFailed { version, reason } => {
            format!("agent update {} failed: {}", text(version), text(reason))
        }
        AgentEventKind::UpdateDeclined { version, reason } => {
            format!("agent update {} declined: {}", text(version), text(reason))
        }
        AgentEventKind::Unknown => "unknown event".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warning(seconds_left: u64) -> CountdownWarning {
        CountdownWarning {
            changeover_id: "c-1".to_owned(),
            deadline: SystemTime::now() + Duration::from_secs(seconds_left),
            seconds_left,
            target_version: "1.1.0".to_owned(),
            message: "save your work".to_owned(),
        }
    }

    fn parse(line: &str) -> AgentEvent {
        serde_json::from_str(line.trim_end()).unwrap()
    }

    // Reads the lines a client got, as far as they came.
    async fn lines_from(mut reader: tokio::io::DuplexStream) -> Vec<AgentEvent> {
        let mut text = String::new();
        reader.read_to_string(&mut text).await.unwrap();
        text.lines().map(parse).collect()
    }

    #[tokio::test]
    async fn a_new_client_gets_the_snapshot_first_then_every_event_in_order() {
        let events = Events::new("ws://server:7600", "1.0.0");
        events.emit(AgentEventKind::Connected {
            server: "ws://server:7600".to_owned(),
            server_version: "1.0.0".to_owned(),
        });
        events.emit(AgentEventKind::Warning(warning(60)));
        let stop = CancellationToken::new();
        let (agent_side, client_side) = tokio::io::duplex(64 * 1024);
        let served = {
            let events = events.clone();
            let stop = stop.clone();
            tokio::spawn(async move { serve_client(agent_side, &events, &stop).await })
        };
        tokio::task::yield_now().await;
        events.emit(AgentEventKind::Logout {
            changeover_id: "c-1".to_owned(),
            reason: "the server is being updated".to_owned(),
            reconnect_within_ms: 2000,
            message: "the server is being updated".to_owned(),
        });
        events.emit(AgentEventKind::UpdateInstalled {
            version: "1.1.0".to_owned(),
        });
        // Closing right after the last emit: the client still gets it.
        stop.cancel();
        served.await.unwrap().unwrap();
        let got = lines_from(client_side).await;
        let names: Vec<&str> = got.iter().map(|event| event.kind.name()).collect();
        assert_eq!(names, ["state", "logout", "update_installed"]);
        let AgentEventKind::State(state) = &got[0].kind else {
            unreachable!()
        };
        assert!(state.connected);
        assert_eq!(state.server_version.as_deref(), Some("1.0.0"));
        assert_eq!(state.agent_version, "1.0.0");
        let warning = state
            .warning
            .as_ref()
            .expect("the countdown is in the snapshot");
        assert!((59..=60).contains(&warning.seconds_left), "{warning:?}");
        assert_eq!(warning.target_version, "1.1.0");

        // After the logout the snapshot has neither the session nor the warning.
        let AgentEventKind::State(after) = parse(&events.subscribe().0.unwrap()).kind else {
            unreachable!()
        };
        assert!(!after.connected && after.warning.is_none(), "{after:?}");
    }

    #[test]
    fn a_warning_leaves_the_snapshot_when_its_time_is_up() {
        let events = Events::new("ws://server:7600", "1.0.0");
        events.emit(AgentEventKind::Warning(warning(5)));
        let known = events.shared.state.lock().unwrap();
        let now = Instant::now();
        assert_eq!(known.snapshot(now).warning.unwrap().seconds_left, 5);
        let later = known
            .snapshot(now + Duration::from_secs(3))
            .warning
            .unwrap();
        assert_eq!(later.seconds_left, 2);
        assert_eq!(known.snapshot(now + Duration::from_secs(5)).warning, None);
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_is_dropped_and_the_agent_never_waits() {
        let events = Events::new("ws://server:7600", "1.0.0");
        let stop = CancellationToken::new();
        // Room for the snapshot and little more; the client never reads.
        let (agent_side, client_side) = tokio::io::duplex(1024);
        let served = {
            let events = events.clone();
            let stop = stop.clone();
            tokio::spawn(async move { serve_client(agent_side, &events, &stop).await })
        };
        tokio::task::yield_now().await;
        // All of these are emitted before the client's task runs again: no emit waits.
        for n in 0..(LINES_BEHIND + 10) {
            events.emit(AgentEventKind::Disconnected {
                reason: format!("reason {n}"),
            });
        }
        let dropped = tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the client is let go")
            .unwrap();
        assert!(matches!(dropped, Err(Dropped::Lagged(_))), "{dropped:?}");
        drop(client_side);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_is_dropped_after_the_write_patience() {
        let events = Events::new("ws://server:7600", "1.0.0");
        let stop = CancellationToken::new();
        // Not even the snapshot fits.
        let (agent_side, _client_side) = tokio::io::duplex(16);
        let dropped = serve_client(agent_side, &events, &stop).await;
        assert!(matches!(dropped, Err(Dropped::Stuck)), "{dropped:?}");
    }

    #[tokio::test]
    async fn a_client_that_leaves_frees_its_slot_without_an_event_to_write() {
        let events = Events::new("ws://server:7600", "1.0.0");
        let stop = CancellationToken::new();
        let (agent_side, mut client_side) = tokio::io::duplex(64 * 1024);
        let served = {
            let events = events.clone();
            let stop = stop.clone();
            tokio::spawn(async move { serve_client(agent_side, &events, &stop).await })
        };
        let mut first = [0u8; 1];
        client_side.read_exact(&mut first).await.unwrap();
        drop(client_side);
        let result = tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the task ends")
            .unwrap();
        assert!(result.is_ok(), "{result:?}");
    }

    #[test]
    fn events_print_as_json_lines_or_in_words() {
        let line = br#"{"event":"warning","changeover_id":"c-1","deadline":"2026-11-28T22:02:00Z","seconds_left":120,"target_version":"2.4.0","message":"save\u001b[2J your work","at":"2026-11-28T22:00:00Z","new_field":1}
"#;
        assert_eq!(
            show(line, true).unwrap(),
            String::from_utf8_lossy(line).into_owned()
        );
        assert_eq!(
            show(line, false).unwrap(),
            "2026-11-28T22:00:00Z update to 2.4.0 in 120 s (logout at 2026-11-28T22:02:00Z): \
             save\\x1b[2J your work\n"
        );
        let newer = br#"{"event":"reboot_needed","at":"2027-01-01T00:00:00Z"}"#;
        assert_eq!(
            show(newer, false).unwrap(),
            "2027-01-01T00:00:00Z reboot_needed\n"
        );
        assert_eq!(show(b"not json\n", true), None);
        assert_eq!(show(b"[1]\n", false), None);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_endpoint_is_the_users_own_and_serves_at_most_max_clients() {
        use std::os::unix::fs::PermissionsExt as _;

        let state = tempfile::tempdir().unwrap();
        // A socket a crashed agent left behind is replaced.
        std::fs::create_dir_all(state.path().join("run")).unwrap();
        drop(std::os::unix::net::UnixListener::bind(state.path().join("run/events.sock")).unwrap());
        let events = Events::new("ws://server:7600", "1.0.0");
        let server = EventsServer::start(state.path(), events.clone());
        let socket = state.path().join("run/events.sock");
        let mut clients = Vec::new();
        for _ in 0..MAX_CLIENTS {
            let stream = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    if let Ok(stream) = endpoint::connect(state.path()).await {
                        break stream;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("the endpoint serves");
            let mut reader = tokio::io::BufReader::new(stream);
            let mut line = Vec::new();
            assert!(read_line(&mut reader, &mut line).await.unwrap());
            assert_eq!(
                parse(std::str::from_utf8(&line).unwrap()).kind.name(),
                "state"
            );
            clients.push(reader);
        }
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&socket), 0o600);
        assert_eq!(mode(&state.path().join("run")), 0o700);

        // One more is closed before its first line.
        let extra = endpoint::connect(state.path()).await.unwrap();
        let mut reader = tokio::io::BufReader::new(extra);
        let mut line = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), read_line(&mut reader, &mut line))
            .await
            .unwrap();
        assert!(!read.unwrap_or(false), "{line:?}");

        // A second agent on the same state folder leaves the first one's endpoint alone.
        let second = EventsServer::start(state.path(), Events::new("ws://x:1", "1.0.0"));
        second.close().await;
        events.emit(AgentEventKind::UpdateOffered {
            version: "1.1.0".to_owned(),
        });
        let mut line = Vec::new();
        assert!(read_line(&mut clients[0], &mut line).await.unwrap());
        assert_eq!(
            parse(std::str::from_utf8(&line).unwrap()).kind.name(),
            "update_offered"
        );

        server.close().await;
        assert!(!socket.exists(), "the socket goes with the agent");
        assert!(matches!(
            endpoint::connect(state.path()).await,
            Err(ConnectError::NotRunning)
        ));
    }
}
