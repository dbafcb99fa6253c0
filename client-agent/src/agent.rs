//! The background agent: stays connected to the server, whatever happens to the network
//! or the server.
//!
//! One loop: connect, say hello, wait for the welcome, then listen until the connection
//! ends; back off with full jitter and do it again, forever. Every state change is logged
//! at info, so the user (or support) can read from the log what the agent went through.

use std::path::PathBuf;
use std::time::Duration;

use changeover_protocol::agent_events::{AgentEventKind, CountdownWarning};
use changeover_protocol::{ClientMessage, CloseCode, ErrorCode, ServerMessage};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::dial::{AgentStream, Dialer};
use crate::events::{Events, EventsServer};
use crate::hooks::{HookEvent, Hooks};
use crate::identity::Identity;
use crate::self_update::{UpdateEvent, UpdateSettings, Updater};
use crate::server_values;
use changeover_protocol::backoff::{BASE_DELAY, Backoff, MAX_DELAY};

/// How long to wait for the welcome after sending the hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Extra patience on top of two heartbeat intervals before the server counts as silent.
const SILENCE_SLACK: Duration = Duration::from_secs(5);

/// What `changeover-agent run` was given.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub server_url: String,
    pub user: Option<String>,
    pub state_dir: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub hooks: Hooks,
    pub updates: UpdateSettings,
}

/// Why [`run`] returned.
#[derive(Debug)]
pub enum AgentExit {
    /// `shutdown` was cancelled.
    Stopped,
    /// A new agent was put in place: start this binary again with the same arguments.
    Restart(PathBuf),
}

/// Runs the agent until `shutdown` is cancelled or it updated itself.
pub async fn run(options: AgentOptions, shutdown: CancellationToken) -> anyhow::Result<AgentExit> {
    let mut identity = Identity::load_or_create(&options.state_dir, options.user.clone())?;
    let dialer = Dialer::new(&options.server_url, options.ca_file.as_deref())?;
    // What the client application on this workstation hears of all this.
    let events_server = EventsServer::start(
        &options.state_dir,
        Events::new(dialer.url(), &identity.agent_version),
    );
    let local_events = events_server.events().clone();
    let updater = Updater::new(
        options.updates.clone(),
        &identity.agent_version,
        dialer.tls_config(),
        local_events.clone(),
    )?;
    let (update_events, mut update_progress) = tokio::sync::mpsc::channel(16);
    let mut link = UpdateLink {
        updater,
        events: update_events,
        progress: &mut update_progress,
    };
    info!(
        server = %dialer.url(),
        agent_id = %identity.agent_id,
        instance_id = %identity.instance_id,
        user = %identity.user,
        version = %identity.agent_version,
        "agent starting"
    );
    let mut backoff = Backoff::new(BASE_DELAY, MAX_DELAY);
    let exit = loop {
        info!(server = %dialer.url(), "connecting");
        let ending = tokio::select! {
            ending = session(&dialer, &mut identity, &options.hooks, &local_events, &shutdown, &mut link) => ending,
            () = shutdown.cancelled() => SessionEnd::Stopped,
        };
        // A pause the server asked for on refusing the hello (already clamped).
        let mut at_least = Duration::ZERO;
        match ending {
            SessionEnd::Stopped => {
                info!("agent stopped");
                break AgentExit::Stopped;
            }
            SessionEnd::Restart => break restart(&link.updater),
            SessionEnd::ConnectFailed(err) => {
                warn!(cause = %format!("{err:#}"), "cannot reach the server");
            }
            SessionEnd::Lost { reason } => {
                // It worked until now: the next retry may be quick again.
                backoff.reset();
                info!(%reason, "disconnected");
                local_events.emit(AgentEventKind::Disconnected { reason });
            }
            SessionEnd::LoggedOut { reconnect_within } => {
                backoff.reset();
                // The whole fleet was logged out at once: come back at a random moment of
                // the window the server announced, not all in the same millisecond.
                let window = u64::try_from(reconnect_within.as_millis())
                    .unwrap_or(crate::server_values::MAX_RECONNECT_WINDOW_MS);
                let pause = Duration::from_millis(rand::random_range(0..=window));
                info!(
                    pause_ms = pause.as_millis() as u64,
                    "logged out for the update; returning after a pause"
                );
                if let Some(exit) = pause_for(pause, &shutdown, &mut link).await {
                    break exit;
                }
                continue;
            }
            SessionEnd::Refused {
                code: ErrorCode::Updating,
                message,
                retry_after,
            } => {
                info!(%message, "the server is updating; trying again shortly");
                at_least = retry_after.unwrap_or_default();
            }
            SessionEnd::Refused {
                code,
                message,
                retry_after,
            } => {
                error!(?code, %message, "the server refused this agent");
                if code == ErrorCode::UnsupportedProtocol {
                    backoff.give_up_quick_retries();
                }
                at_least = retry_after.unwrap_or_default();
            }
        }
        let delay = backoff.next_delay().max(at_least);
        info!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting after a pause"
        );
        if let Some(exit) = pause_for(delay, &shutdown, &mut link).await {
            break exit;
        }
    };
    // The clients take the last lines first: `update_installed` before a restart.
    events_server.close().await;
    Ok(exit)
}

/// The agent's own update as the session loop sees it: the updater, and the channel its
/// task reports on.
struct UpdateLink<'a> {
    updater: std::sync::Arc<Updater>,
    events: tokio::sync::mpsc::Sender<UpdateEvent>,
    progress: &'a mut tokio::sync::mpsc::Receiver<UpdateEvent>,
}

// Waits between connections; an update that finishes meanwhile restarts the agent.
async fn pause_for(
    pause: Duration,
    shutdown: &CancellationToken,
    link: &mut UpdateLink<'_>,
) -> Option<AgentExit> {
    let sleep = tokio::time::sleep(pause);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return None,
            () = shutdown.cancelled() => {
                info!("agent stopped");
                return Some(AgentExit::Stopped);
            }
            event = link.progress.recv() => match event {
                Some(UpdateEvent::Restart) => return Some(restart(&link.updater)),
                // Reported when the server is back: it offers again and hears the outcome.
                Some(UpdateEvent::Report { .. }) | None => {}
            },
        }
    }
}

// The binary's path as found at start: once replaced, the running one reads as deleted.
fn restart(updater: &Updater) -> AgentExit {
    let exe = updater
        .installation()
        .map(|installation| installation.exe.clone())
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_default();
    info!(binary = %exe.display(), "restarting into the updated agent");
    AgentExit::Restart(exe)
}

/// How one connection ended.
#[derive(Debug)]
enum SessionEnd {
    /// The agent was asked to stop.
    Stopped,
    /// No session came about: network, TLS or handshake failure.
    ConnectFailed(anyhow::Error),
    /// The session was up and then ended.
    Lost { reason: String },
    /// The server refused the hello, maybe saying when to try again (clamped).
    Refused {
        code: ErrorCode,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The server logged everyone out for an update; come back within this (clamped).
    LoggedOut { reconnect_within: Duration },
    /// The agent updated itself and restarts.
    Restart,
}

/// The agent's WebSocket settings: small buffers, the protocol's size limits.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(changeover_protocol::MAX_MESSAGE_BYTES))
        .max_frame_size(Some(changeover_protocol::MAX_MESSAGE_BYTES))
}

async fn session(
    dialer: &Dialer,
    identity: &mut Identity,
    hooks: &Hooks,
    local_events: &Events,
    shutdown: &CancellationToken,
    link: &mut UpdateLink<'_>,
) -> SessionEnd {
    let mut ws = match dialer.connect(websocket_config()).await {
        Ok(ws) => ws,
        Err(err) => return SessionEnd::ConnectFailed(err),
    };
    let hello = ClientMessage::Hello(identity.hello());
    if let Err(err) = send(&mut ws, &hello).await {
        return SessionEnd::ConnectFailed(err);
    }
    let heartbeat = match tokio::time::timeout(WELCOME_TIMEOUT, next_message(&mut ws)).await {
        Err(_elapsed) => {
            return SessionEnd::ConnectFailed(anyhow::anyhow!(
                "no welcome within {} s of the hello",
                WELCOME_TIMEOUT.as_secs()
            ));
        }
        Ok(Err(reason)) => return SessionEnd::ConnectFailed(anyhow::anyhow!(reason)),
        Ok(Ok(ServerMessage::Welcome {
            session_id,
            server_version,
            heartbeat_secs,
            protocol_version,
            assigned_agent_id,
        })) => {
            info!(session_id, %server_version, protocol_version, "connected");
            local_events.emit(AgentEventKind::Connected {
                server: dialer.url().to_owned(),
                server_version: server_version.clone(),
            });
            if let Some(assigned) = assigned_agent_id {
                identity.adopt_assigned_id(&assigned);
            }
            server_values::heartbeat(heartbeat_secs)
        }
        Ok(Ok(ServerMessage::Error {
            code,
            message,
            retry_after_secs,
            ..
        })) => {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            return SessionEnd::Refused {
                code,
                message,
                retry_after: retry_after_secs.map(server_values::retry_after),
            };
        }
        Ok(Ok(other)) => {
            return SessionEnd::ConnectFailed(anyhow::anyhow!(
                "the server answered the hello with {other:?}"
            ));
        }
    };

    // Welcomed: an updated agent on trial has passed it; an agent put back after a failed
    // trial says so.
    if let Some(installation) = link.updater.installation() {
        crate::trial::confirm(&installation.dir, &identity.agent_version);
    }
    if let Some(failure) = link.updater.pending_failure() {
        let report = ClientMessage::AgentUpdateReport {
            version: failure.version,
            state: changeover_protocol::AgentUpdateState::Failed,
            detail: Some(failure.reason),
        };
        if let Err(err) = send(&mut ws, &report).await {
            return SessionEnd::Lost {
                reason: format!("{err:#}"),
            };
        }
        link.updater.failure_reported();
    }

    // The server pings every heartbeat; two intervals of silence mean it is gone even if
    // the TCP connection never says so (a pulled cable, a dead NAT entry). The heartbeat is
    // at most an hour, so neither this nor `silent_since + silence_limit` can overflow.
    let silence_limit = heartbeat.saturating_mul(2).saturating_add(SILENCE_SLACK);
    // The version the last warning announced, for the logout hook.
    let mut announced_version = String::new();
    let mut silent_since = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                let frame = CloseFrame { code: WsCloseCode::Normal, reason: "agent stopping".into() };
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
                return SessionEnd::Stopped;
            }
            event = link.progress.recv() => match event {
                Some(UpdateEvent::Report { version, state, detail }) => {
                    let report = ClientMessage::AgentUpdateReport { version, state, detail };
                    if let Err(err) = send(&mut ws, &report).await {
                        return SessionEnd::Lost { reason: format!("{err:#}") };
                    }
                }
                Some(UpdateEvent::Restart) => {
                    let frame = CloseFrame { code: WsCloseCode::Normal, reason: "agent restarting for its update".into() };
                    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
                    return SessionEnd::Restart;
                }
                None => {}
            },
            () = tokio::time::sleep_until(silent_since + silence_limit) => {
                return SessionEnd::Lost {
                    reason: format!("nothing heard from the server for {} s", silence_limit.as_secs()),
                };
            }
            frame = ws.next() => {
                silent_since = Instant::now();
                match frame {
                    None => return SessionEnd::Lost { reason: "connection closed".to_owned() },
                    Some(Err(err)) => return SessionEnd::Lost { reason: err.to_string() },
                    Some(Ok(Message::Close(frame))) => {
                        return SessionEnd::Lost { reason: describe_close(frame.as_ref()) };
                    }
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerMessage>(&text) {
                        Ok(ServerMessage::Error { code, message, .. }) => {
                            warn!(?code, %message, "the server reported an error");
                        }
                        Ok(ServerMessage::Warning { changeover_id, deadline, seconds_left, target_version, message, admin_message, .. }) => {
                            let countdown = server_values::countdown(deadline, seconds_left, std::time::SystemTime::now());
                            let seconds_left = countdown.seconds_left;
                            let admin_message = crate::i18n::admin_words(admin_message, &message, &target_version);
                            let text = hooks.texts.warning(&target_version, seconds_left, countdown.deadline, admin_message.as_deref());
                            let deadline = server_values::rfc3339(countdown.deadline);
                            announced_version.clone_from(&target_version);
                            warn!(%deadline, seconds_left, %target_version, %message, "the server will be updated: save your work");
                            let event = HookEvent { event: "warning", deadline, seconds_left, target_version, message: text };
                            // The client application hears first; a slow hook cannot delay it.
                            local_events.emit(AgentEventKind::Warning(CountdownWarning {
                                changeover_id,
                                deadline: countdown.deadline,
                                seconds_left,
                                target_version: event.target_version.clone(),
                                message: event.message.clone(),
                            }));
                            hooks.on_warning(&event).await;
                        }
                        Ok(ServerMessage::AgentUpdateOffer(offer)) => {
                            link.updater.consider(*offer, link.events.clone());
                        }
                        Ok(ServerMessage::UpdateCancelled { changeover_id, message, target_version, .. }) => {
                            info!(%message, "the announced update was called off");
                            let target_version = target_version.unwrap_or_else(|| announced_version.clone());
                            let event = HookEvent {
                                event: "cancelled",
                                deadline: String::new(),
                                seconds_left: 0,
                                message: hooks.texts.cancelled(Some(&target_version)),
                                target_version,
                            };
                            hooks.on_cancelled(&event);
                            local_events.emit(AgentEventKind::Cancelled { changeover_id, message: event.message });
                        }
                        Ok(ServerMessage::Logout { changeover_id, reason, reconnect_within_ms, target_version, admin_message, .. }) => {
                            warn!(%reason, "logged out by the server");
                            let reconnect_within = server_values::reconnect_window(reconnect_within_ms);
                            // An older server names no version: the one its warnings named.
                            let target_version = target_version.unwrap_or_else(|| announced_version.clone());
                            let event = HookEvent {
                                event: "logout",
                                deadline: server_values::rfc3339(std::time::SystemTime::now()),
                                seconds_left: 0,
                                message: hooks.texts.logout(Some(&target_version), admin_message.as_deref()),
                                target_version,
                            };
                            local_events.emit(AgentEventKind::Logout {
                                changeover_id,
                                reason,
                                reconnect_within_ms: u64::try_from(reconnect_within.as_millis()).unwrap_or(u64::MAX),
                                message: event.message.clone(),
                            });
                            hooks.on_logout(&event).await;
                            return SessionEnd::LoggedOut { reconnect_within };
                        }
                        Ok(other) => debug!(message = ?other, "message not handled in this state"),
                        Err(err) => warn!(cause = %err, "unreadable message from the server"),
                    },
                    Some(Ok(_)) => {}
                }
            }
        }
    }
}

/// Reads the next protocol message, skipping control frames and (tolerant reader) messages
/// of types a newer server may send that this build does not know.
pub(crate) async fn next_message(
    ws: &mut WebSocketStream<AgentStream>,
) -> Result<ServerMessage, String> {
    loop {
        match ws.next().await {
            None => return Err("the server closed the connection".to_owned()),
            Some(Err(err)) => return Err(format!("connection failed: {err}")),
            Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
                Ok(message) => return Ok(message),
                Err(err) if has_type(&text) => {
                    debug!(cause = %err, "skipping a message this version does not know");
                }
                Err(err) => return Err(format!("unreadable message from the server: {err}")),
            },
            Some(Ok(Message::Close(frame))) => return Err(describe_close(frame.as_ref())),
            Some(Ok(_)) => continue,
        }
    }
}

fn has_type(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .is_some_and(|value| value.get("type").is_some_and(serde_json::Value::is_string))
}

pub(crate) async fn send(
    ws: &mut WebSocketStream<AgentStream>,
    message: &ClientMessage,
) -> anyhow::Result<()> {
    let text = serde_json::to_string(message)?;
    ws.send(Message::text(text)).await?;
    Ok(())
}

/// A close frame in words: our name for the code, and the server's reason.
pub(crate) fn describe_close(frame: Option<&CloseFrame>) -> String {
    match frame {
        None => "the server closed the connection".to_owned(),
        Some(frame) => {
            let number = u16::from(frame.code);
            let code = CloseCode::from_code(number)
                .map(|code| code.to_string())
                .unwrap_or_else(|| number.to_string());
            format!(
                "the server closed the connection: {code}: {}",
                frame.reason.as_str()
            )
        }
    }
}
