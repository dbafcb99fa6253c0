//! One task per connection: the hello, then an agent session or an admin session.
//!
//! The task reads the peer, writes what the hub broadcasts, and pings on its own heartbeat
//! phase, all from one `select!` loop over a single WebSocket, so an idle connection costs
//! one task, one socket and the WebSocket's small buffers. Anything the peer gets wrong is
//! answered with an `error` message naming the problem and a close code, logged once.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use changeover_protocol::version::ProtocolRange;
use changeover_protocol::{
    AgentHello, AgentUpdateState, AgentUpdateView, ChangeoverPhase, ClientMessage, CloseCode,
    ErrorCode, ServerMessage, StatusReport,
};
use futures_util::{SinkExt as _, StreamExt as _};
use rand::RngExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::agent_updates::AgentUpdates;
use crate::audit::{Actor, Refused, Via};
use crate::auth::{AdminAuth, LoginOutcome};
use crate::changeover::driver::{ChangeoverHandle, UpdateParams};
use crate::hub::{HubHandle, Kick, RegisterError, encode};
use crate::listener::HandshakeHold;
use crate::releases::Releases;

/// A status report reads the feed again when the last look is older than this.
const STATUS_FEED_MAX_AGE: Duration = Duration::from_secs(60);

/// How long a status report waits for that look.
const STATUS_FEED_PATIENCE: Duration = Duration::from_secs(5);

/// What every connection task shares.
#[derive(Debug)]
pub struct ConnectionContext {
    pub hub: HubHandle,
    pub auth: AdminAuth,
    pub releases: Arc<Releases>,
    /// The agent release offered to older agents, and its transfers.
    pub agent_updates: Arc<AgentUpdates>,
    pub changeover: ChangeoverHandle,
    /// `<root>/state`: the outbox the status report lists.
    pub state_dir: std::path::PathBuf,
    /// Why mail to the admin cannot be sent, if it cannot.
    pub mail_problem: Option<&'static str>,
    pub server_version: String,
    /// How often to ping; two silent intervals end the connection.
    pub heartbeat: Duration,
    /// Time from TCP accept to the peer's first message.
    pub hello_timeout: Duration,
    /// A single write may take this long before the peer counts as not reading.
    pub write_timeout: Duration,
    /// Cancelled once on SIGTERM/SIGINT: every connection closes with "going away".
    pub shutdown: CancellationToken,
    /// The vendor's applications this server supervises, for the status report.
    pub apps: crate::apps::Apps,
    /// The agent id the server's own health check says hello with: a secret of this
    /// process, answered with a welcome without taking a session (see `changeover::health`).
    pub self_check_id: String,
    /// The audit log of admin actions.
    pub audit: crate::audit::AuditLog,
    /// Where the web console is served, if it is.
    pub console_url: Option<String>,
    /// Counts agent handshakes, for the changeover's reconnect window.
    pub handshake_rate: Arc<crate::handshake_rate::HandshakeRate>,
}

/// How a connection ended, for the log.
#[derive(Debug)]
enum Ending {
    /// We sent a close frame with this code and reason.
    Closed(CloseCode, String),
    /// The peer closed or the socket failed.
    PeerGone(String),
}

/// Serves one upgraded WebSocket until it ends. `hello_deadline` is when the peer's
/// first message must have arrived; `hold` is its place at the door, given up once that
/// message is read.
pub async fn serve<S>(
    ws: &mut WebSocketStream<S>,
    peer: SocketAddr,
    hello_deadline: Instant,
    hold: HandshakeHold,
    context: Arc<ConnectionContext>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Boxed: everything before an agent's session runs once (the first message, an admin
    // session, the agent's registration and greeting), and a task is as large as its
    // largest state: unboxed, that state would stay reserved in every agent's task for as
    // long as its session lives.
    let ending = match Box::pin(start(ws, peer, hello_deadline, hold, &context)).await {
        Started::Done(ending) => ending,
        Started::Agent(mut session, greeted) => {
            let ending = match greeted {
                Ok(()) => hold_agent_session(ws, peer, &mut session, &context).await,
                Err(ending) => ending,
            };
            // Boxed for the same reason.
            Box::pin(context.hub.unregister(session.session_id)).await;
            info!(%peer, session_id = session.session_id, user = %session.user, "agent disconnected");
            ending
        }
    };
    match ending {
        Ending::Closed(code, reason) if is_peer_fault(code) => {
            warn!(%peer, close_code = code.code(), %reason, "connection refused");
        }
        Ending::Closed(code, reason) => {
            debug!(%peer, close_code = code.code(), %reason, "connection closed");
        }
        Ending::PeerGone(reason) => debug!(%peer, %reason, "connection ended by peer"),
    }
}

/// How a connection's start ended: in a registered agent session, with its greeting's
/// outcome, or in an ending of its own (a refusal, a timeout, a whole admin session).
enum Started {
    Agent(AgentSession, Result<(), Ending>),
    Done(Ending),
}

// The first message and what it starts.
async fn start<S>(
    ws: &mut WebSocketStream<S>,
    peer: SocketAddr,
    hello_deadline: Instant,
    hold: HandshakeHold,
    context: &ConnectionContext,
) -> Started
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Control frames before the first message do not extend the hello deadline.
    let first = loop {
        tokio::select! {
            () = context.shutdown.cancelled() => {
                break Err(close(ws, CloseCode::GoingAway, "server shutting down", context).await);
            }
            next = tokio::time::timeout_at(hello_deadline, next_data(ws)) => match next {
                Ok(Incoming::Alive) => continue,
                Ok(Incoming::Message(message)) => break Ok(message),
                Ok(Incoming::Gone(reason)) => break Err(Ending::PeerGone(reason)),
                Ok(Incoming::Refused(refusal)) => break Err(refuse(ws, refusal, context).await),
                Err(_elapsed) => {
                    let reason = format!(
                        "no hello within {} s of connecting",
                        context.hello_timeout.as_secs()
                    );
                    break Err(close(ws, CloseCode::HelloTimeout, &reason, context).await);
                }
            },
        }
    };
    // The first message is in: the handshake slots go to the next connection.
    drop(hold);
    if matches!(first, Ok(ClientMessage::Hello(_))) {
        context.handshake_rate.handshake();
    }
    let ending = match first {
        Err(ending) => ending,
        Ok(ClientMessage::Hello(hello)) => {
            return match open_agent_session(ws, peer, hello, context).await {
                Ok((session, greeted)) => Started::Agent(session, greeted),
                Err(ending) => Started::Done(ending),
            };
        }
        Ok(ClientMessage::AdminLogin {
            protocol_version,
            password,
        }) => {
            // Boxed: an admin session's state (a status report may read the feed over
            // HTTP) would otherwise be reserved in every connection's start as well.
            Box::pin(admin_session(ws, peer, protocol_version, password, context)).await
        }
        Ok(
            request @ (ClientMessage::StatusRequest
            | ClientMessage::DownloadRequest { .. }
            | ClientMessage::UpdateRequest { .. }
            | ClientMessage::CancelRequest),
        ) => {
            let refusal = Refusal::unauthorized(&format!(
                "{} needs an admin login first",
                request.type_name()
            ));
            refuse(ws, refusal, context).await
        }
        Ok(ClientMessage::AgentUpdateReport { .. }) => {
            let refusal = Refusal::unexpected("agent_update_report", "before hello");
            refuse(ws, refusal, context).await
        }
    };
    Started::Done(ending)
}

fn is_peer_fault(code: CloseCode) -> bool {
    !matches!(
        code,
        CloseCode::Normal | CloseCode::GoingAway | CloseCode::Replaced
    )
}

/// A registered agent session: what its loop needs for as long as it lives.
struct AgentSession {
    session_id: u64,
    user: String,
    /// Subscribed before registering, so nothing broadcast after registration is missed.
    broadcasts: tokio::sync::broadcast::Receiver<tungstenite::Utf8Bytes>,
    kick: tokio::sync::oneshot::Receiver<Kick>,
}

// Checks the hello, registers the session and greets it: the welcome, the warning of a
// countdown under way, the offer of a newer agent. An `Err` ends a connection that was
// never registered; a failed greeting comes back beside the session, which is registered
// and has to be unregistered.
async fn open_agent_session<S>(
    ws: &mut WebSocketStream<S>,
    peer: SocketAddr,
    mut hello: AgentHello,
    context: &ConnectionContext,
) -> Result<(AgentSession, Result<(), Ending>), Ending>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(protocol_version) = ProtocolRange::SUPPORTED.negotiate(hello.protocol_version) else {
        return Err(refuse(
            ws,
            Refusal::unsupported_protocol(hello.protocol_version),
            context,
        )
        .await);
    };
    // The session table shows the version actually spoken.
    hello.protocol_version = protocol_version;
    let hello = match hello.checked() {
        Ok(hello) => hello,
        Err(reason) => {
            let refusal = Refusal::new(
                ErrorCode::MalformedMessage,
                CloseCode::PolicyViolation,
                format!("hello refused: {reason}"),
            );
            return Err(refuse(ws, refusal, context).await);
        }
    };
    if !context.self_check_id.is_empty() && hello.agent_id == context.self_check_id {
        // The server's own health check: the whole path an agent takes, up to the
        // welcome, also while the door is still closed to sessions.
        let welcome = ServerMessage::Welcome {
            protocol_version,
            server_version: context.server_version.clone(),
            session_id: 0,
            heartbeat_secs: context.heartbeat.as_secs(),
            assigned_agent_id: None,
        };
        send(ws, &welcome, context).await?;
        return Err(close(ws, CloseCode::Normal, "self-check done", context).await);
    }
    let broadcasts = context.hub.subscribe();
    let user = hello.user.clone();
    let agent_version = hello.agent_version.clone();
    let update_offer = context
        .agent_updates
        .offer_for(&hello.platform, &hello.agent_version);
    let registration = match context.hub.register(hello, peer).await {
        Ok(registration) => registration,
        Err(err @ (RegisterError::ServerFull { .. } | RegisterError::AddressFull { .. })) => {
            let refusal = Refusal::new(
                ErrorCode::ServerFull,
                CloseCode::ServerFull,
                err.to_string(),
            );
            return Err(refuse(ws, refusal, context).await);
        }
        Err(RegisterError::HubStopped) => {
            return Err(close(ws, CloseCode::GoingAway, "server shutting down", context).await);
        }
        Err(err @ RegisterError::Updating) => {
            let refusal = Refusal::new(
                ErrorCode::Updating,
                CloseCode::ServerUpdating,
                err.to_string(),
            );
            return Err(refuse(ws, refusal, context).await);
        }
    };
    let session_id = registration.session_id;
    info!(%peer, session_id, %user, %agent_version, "agent connected");
    let welcome = ServerMessage::Welcome {
        protocol_version,
        server_version: context.server_version.clone(),
        session_id,
        heartbeat_secs: context.heartbeat.as_secs(),
        assigned_agent_id: registration.assigned_agent_id,
    };
    let mut greeted = send(ws, &welcome, context).await;
    // Joining during a countdown: the warning comes at once.
    if let (Ok(()), Some(notice)) = (&greeted, registration.notice) {
        greeted = send_frame(ws, Message::Text(notice), context).await;
    }
    // An agent older than the server's agent release is offered it at once.
    if let (Ok(()), Some(offer)) = (&greeted, update_offer) {
        greeted = send_frame(ws, Message::Text(offer), context).await;
    }
    let session = AgentSession {
        session_id,
        user,
        broadcasts,
        kick: registration.kick,
    };
    Ok((session, greeted))
}

// A session's life after its greeting: broadcasts out, the agent's reports in, pings,
// until the agent leaves, the hub kicks it or the server shuts down.
async fn hold_agent_session<S>(
    ws: &mut WebSocketStream<S>,
    peer: SocketAddr,
    session: &mut AgentSession,
    context: &ConnectionContext,
) -> Ending
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let AgentSession {
        session_id,
        user,
        broadcasts,
        kick,
    } = session;
    let session_id = *session_id;
    let mut heartbeat = Heartbeat::start(context.heartbeat);
    // Registered with the shutdown token once, not on every wake-up: the token is shared
    // by every connection, and registering takes its lock.
    let shutdown = context.shutdown.cancelled();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            broadcast = broadcasts.recv() => match broadcast {
                Ok(bytes) => {
                    if let Err(ending) = send_frame(ws, Message::Text(bytes), context).await {
                        break ending;
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    let reason = format!("fell {missed} messages behind");
                    break close(ws, CloseCode::SlowConsumer, &reason, context).await;
                }
                Err(RecvError::Closed) => {
                    break close(ws, CloseCode::GoingAway, "server shutting down", context).await;
                }
            },
            () = &mut shutdown => {
                break close(ws, CloseCode::GoingAway, "server shutting down", context).await;
            }
            kicked = &mut *kick => {
                break match kicked {
                    Ok(Kick::Replaced) => {
                        close(ws, CloseCode::Replaced, "the agent connected again", context).await
                    }
                    Ok(Kick::Logout { logout, closed }) => {
                        // Queued, not flushed: the close frame's flush writes both in
                        // one go, one write for the server and one read for the agent.
                        let _ = Box::pin(timeout(context.write_timeout, ws.feed(Message::Text(logout)))).await;
                        // Once the close frame is written the changeover may go on.
                        close_then(ws, CloseCode::ServerUpdating, "the server is updating", context, move || drop(closed)).await
                    }
                    Err(_) => close(ws, CloseCode::GoingAway, "server shutting down", context).await,
                };
            }
            incoming = next_data(ws) => {
                heartbeat.heard();
                match incoming {
                    Incoming::Alive => {}
                    Incoming::Gone(reason) => break Ending::PeerGone(reason),
                    Incoming::Refused(refusal) => break refuse(ws, refusal, context).await,
                    Incoming::Message(ClientMessage::AgentUpdateReport { version, state, detail }) => {
                        match state {
                            AgentUpdateState::Failed => warn!(%peer, session_id, %user, %version, detail = detail.as_deref().unwrap_or(""), "agent update failed"),
                            _ => info!(%peer, session_id, %user, %version, %state, detail = detail.as_deref().unwrap_or(""), "agent update"),
                        }
                        let update = AgentUpdateView::from_report(&version, state, detail.as_deref());
                        Box::pin(context.hub.set_update(session_id, update)).await;
                    }
                    Incoming::Message(
                        request @ (ClientMessage::StatusRequest
                        | ClientMessage::DownloadRequest { .. }
                        | ClientMessage::UpdateRequest { .. }
                        | ClientMessage::CancelRequest),
                    ) => {
                        let refusal = Refusal::unauthorized(&format!(
                            "{} is for admin logins, not agent sessions",
                            request.type_name()
                        ));
                        break refuse(ws, refusal, context).await;
                    }
                    Incoming::Message(other) => {
                        break refuse(ws, Refusal::unexpected(other.type_name(), "after hello"), context).await;
                    }
                }
            }
            () = heartbeat.tick() => {
                if let Err(ending) = Box::pin(heartbeat.ping_or_give_up(ws, context)).await {
                    break ending;
                }
            }
        }
    }
}

async fn admin_session<S>(
    ws: &mut WebSocketStream<S>,
    peer: SocketAddr,
    requested_protocol: u32,
    password: String,
    context: &ConnectionContext,
) -> Ending
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(protocol_version) = ProtocolRange::SUPPORTED.negotiate(requested_protocol) else {
        return refuse(
            ws,
            Refusal::unsupported_protocol(requested_protocol),
            context,
        )
        .await;
    };
    let actor = Actor {
        address: peer.ip(),
        via: Via::Cli,
    };
    match log_in(context, actor, password).await {
        LoginOutcome::Accepted => info!(%peer, "admin logged in"),
        LoginOutcome::WrongPassword => {
            return refuse(ws, Refusal::unauthorized("wrong admin password"), context).await;
        }
        LoginOutcome::Throttled { retry_after } => {
            let seconds = retry_after.as_secs().max(1);
            let refusal = Refusal {
                error: ServerMessage::Error {
                    code: ErrorCode::Throttled,
                    message: format!(
                        "too many failed logins from {}; try again in {seconds} s",
                        peer.ip()
                    ),
                    retry_after_secs: Some(seconds),
                    supported_protocol: None,
                },
                close: CloseCode::Throttled,
            };
            return refuse(ws, refusal, context).await;
        }
        LoginOutcome::Busy { retry_after } => {
            let seconds = retry_after.as_secs().max(1);
            warn!(%peer, "admin login turned away: too many logins waiting");
            let refusal = Refusal {
                error: ServerMessage::Error {
                    code: ErrorCode::Throttled,
                    message: format!(
                        "too many logins are waiting to be checked; try again in {seconds} s"
                    ),
                    retry_after_secs: Some(seconds),
                    supported_protocol: None,
                },
                close: CloseCode::Throttled,
            };
            return refuse(ws, refusal, context).await;
        }
    }
    let welcome = ServerMessage::AdminWelcome {
        protocol_version,
        server_version: context.server_version.clone(),
    };
    if let Err(ending) = send(ws, &welcome, context).await {
        return ending;
    }
    let mut heartbeat = Heartbeat::start(context.heartbeat);
    let mut events = context.releases.subscribe_events();
    loop {
        tokio::select! {
            () = context.shutdown.cancelled() => {
                return close(ws, CloseCode::GoingAway, "server shutting down", context).await;
            }
            () = heartbeat.tick() => {
                if let Err(ending) = Box::pin(heartbeat.ping_or_give_up(ws, context)).await {
                    return ending;
                }
            }
            event = events.recv() => match event {
                Ok(bytes) => {
                    if let Err(ending) = send_frame(ws, Message::Text(bytes), context).await {
                        return ending;
                    }
                }
                // An admin that misses progress reports still gets the outcome later.
                Err(RecvError::Lagged(missed)) => debug!(%peer, missed, "admin missed events"),
                Err(RecvError::Closed) => {
                    return close(ws, CloseCode::GoingAway, "server shutting down", context).await;
                }
            },
            incoming = next_data(ws) => {
                heartbeat.heard();
                let answer = match incoming {
                    Incoming::Alive => continue,
                    Incoming::Gone(reason) => return Ending::PeerGone(reason),
                    Incoming::Refused(refusal) => return refuse(ws, refusal, context).await,
                    Incoming::Message(request) => {
                        let type_name = request.type_name();
                        match answer_admin(context, actor, request).await {
                            Some(answer) => answer,
                            None => {
                                return refuse(ws, Refusal::unexpected(type_name, "after admin_login"), context).await;
                            }
                        }
                    }
                };
                if let Err(ending) = send(ws, &answer, context).await {
                    return ending;
                }
            }
        }
    }
}

/// Checks an admin's password (throttled per address, as [`AdminAuth::login`] does) and
/// records the attempt in the audit log: the one login of the command line and the console.
pub async fn log_in(context: &ConnectionContext, actor: Actor, password: String) -> LoginOutcome {
    let outcome = context.auth.login(actor.address, password).await;
    let audited = match &outcome {
        LoginOutcome::Accepted => Ok(()),
        LoginOutcome::WrongPassword => Err(Refused::Because("wrong admin password".to_owned())),
        LoginOutcome::Throttled { .. } => Err(Refused::Throttled(
            "too many failed logins from this address".to_owned(),
        )),
        LoginOutcome::Busy { .. } => Err(Refused::Throttled(
            "too many logins waiting to be checked".to_owned(),
        )),
    };
    context.audit.record(actor, "login", None, audited).await;
    outcome
}

/// The answer to a logged-in admin's request: the same call for the command line and the
/// web console. Actions (not status requests) go into the audit log with their outcome.
/// `None` when `request` is not an admin request.
pub async fn answer_admin(
    context: &ConnectionContext,
    actor: Actor,
    request: ClientMessage,
) -> Option<ServerMessage> {
    let (action, detail, answer) = match request {
        ClientMessage::StatusRequest => return Some(status_report(context).await),
        ClientMessage::DownloadRequest {
            version,
            allow_downgrade,
        } => {
            let detail = version.clone().unwrap_or_else(|| "newest".to_owned());
            let answer = download_request(context, version, allow_downgrade).await;
            ("download", detail, answer)
        }
        ClientMessage::UpdateRequest {
            version,
            grace_secs,
            notify,
            message,
            at,
            allow_downgrade,
        } => {
            let mut detail = format!(
                "{}, grace {grace_secs} s",
                version.as_deref().unwrap_or("newest")
            );
            if let Some(at) = &at {
                detail.push_str(&format!(", at {at}"));
            }
            if let Some(notify) = &notify {
                detail.push_str(&format!(", mail to {notify}"));
            }
            let params = UpdateParams {
                version,
                grace_secs,
                notify,
                message,
                at: None,
                allow_downgrade,
            };
            ("update", detail, update_request(context, params, at).await)
        }
        ClientMessage::CancelRequest => {
            let answer = match context.changeover.cancel().await {
                Ok(changeover_id) => ServerMessage::CancelAccepted { changeover_id },
                Err(refusal) => ServerMessage::error(refusal.code, refusal.message),
            };
            ("cancel", String::new(), answer)
        }
        ClientMessage::Hello(_)
        | ClientMessage::AdminLogin { .. }
        | ClientMessage::AgentUpdateReport { .. } => return None,
    };
    let outcome = match &answer {
        ServerMessage::Error { message, .. } => Err(Refused::Because(message.clone())),
        _ => Ok(()),
    };
    let detail = (!detail.is_empty()).then_some(detail);
    context.audit.record(actor, action, detail, outcome).await;
    Some(answer)
}

async fn status_report(context: &ConnectionContext) -> ServerMessage {
    let releases = &context.releases;
    let _ = timeout(
        STATUS_FEED_PATIENCE,
        releases.check_feed_if_older_than(STATUS_FEED_MAX_AGE),
    )
    .await;
    let snapshot = releases.snapshot();
    let changeover = context.changeover.current();
    let listed = context
        .hub
        .snapshot(changeover_protocol::MAX_LISTED_SESSIONS)
        .await;
    let mut sessions = listed.sessions;
    let agents_behind = context
        .agent_updates
        .annotate(&mut sessions, &listed.versions);
    ServerMessage::Status(Box::new(StatusReport {
        server_version: context.server_version.clone(),
        available_version: releases.available_version(),
        phase: changeover
            .as_ref()
            .map_or(ChangeoverPhase::Idle, |view| view.phase),
        feed: snapshot.feed,
        candidate: releases.candidate_status(),
        last_refusal: snapshot.last_refusal,
        changeover,
        last_changeover: context.changeover.last(),
        outbox: crate::mail::waiting(&context.state_dir)
            .into_iter()
            .map(|mail| changeover_protocol::OutboxEntry {
                message_id: mail.message_id,
                to: mail.to,
                subject: mail.subject,
                queued_at: mail.queued_at,
                attempts: mail.attempts,
                last_error: mail.last_error,
            })
            .collect(),
        mail_problem: context.mail_problem.map(str::to_owned),
        agent_release: context
            .agent_updates
            .release_version()
            .map(|version| version.to_string()),
        agents_behind,
        apps: context.apps.statuses(),
        disk_problems: crate::unwritten::list(),
        history: context
            .changeover
            .history(changeover_protocol::messages::MAX_LISTED_HISTORY),
        audit: context
            .audit
            .latest(changeover_protocol::messages::MAX_LISTED_AUDIT),
        console_url: context.console_url.clone(),
        sessions,
        sessions_total: listed.total as u64,
    }))
}

async fn update_request(
    context: &ConnectionContext,
    mut params: UpdateParams,
    at: Option<String>,
) -> ServerMessage {
    if let Some(text) = at {
        match humantime::parse_rfc3339_weak(&text) {
            Ok(time) => params.at = Some(time),
            Err(err) => {
                return ServerMessage::error(
                    ErrorCode::InvalidRequest,
                    format!("{text:?} is not a time such as 2026-11-28T22:00:00Z: {err}"),
                );
            }
        }
    }
    match context.changeover.start(params).await {
        Ok(view) => ServerMessage::UpdateAccepted {
            changeover_id: view.changeover_id,
            target_version: view.target_version,
            scheduled_at: view.scheduled_at,
        },
        Err(refusal) => ServerMessage::error(refusal.code, refusal.message),
    }
}

// Answers at once with `download_accepted`; progress and the outcome (`package_ready` or
// `package_refused`) come as events. A refusal is an error that keeps the connection.
async fn download_request(
    context: &ConnectionContext,
    version: Option<String>,
    allow_downgrade: bool,
) -> ServerMessage {
    let version = match version
        .map(|text| text.parse::<semver::Version>())
        .transpose()
    {
        Ok(version) => version,
        Err(err) => {
            return ServerMessage::error(
                ErrorCode::ReleaseNotFound,
                format!("not a semantic version such as 1.4.0: {err}"),
            );
        }
    };
    match context
        .releases
        .start_download(version, allow_downgrade)
        .await
    {
        Ok(version) => ServerMessage::DownloadAccepted {
            version: version.to_string(),
        },
        Err(refusal) => ServerMessage::error(refusal.code, refusal.message),
    }
}

/// The server's pings, at a random phase per connection so that thousands of connections
/// do not all wake in the same millisecond.
#[derive(Debug)]
struct Heartbeat {
    interval: tokio::time::Interval,
    last_heard: Instant,
    period: Duration,
}

impl Heartbeat {
    fn start(period: Duration) -> Heartbeat {
        let phase = rand::rng().random_range(Duration::ZERO..period);
        let mut interval = tokio::time::interval_at(Instant::now() + phase, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Heartbeat {
            interval,
            last_heard: Instant::now(),
            period,
        }
    }

    async fn tick(&mut self) {
        self.interval.tick().await;
    }

    fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    async fn ping_or_give_up<S>(
        &mut self,
        ws: &mut WebSocketStream<S>,
        context: &ConnectionContext,
    ) -> Result<(), Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let silent_for = self.last_heard.elapsed();
        if silent_for >= self.period * 2 {
            let reason = format!("nothing heard for {} s", silent_for.as_secs());
            return Err(close(ws, CloseCode::HeartbeatTimeout, &reason, context).await);
        }
        send_frame(ws, Message::Ping(Default::default()), context).await
    }
}

/// A refusal: the error message to send, then the close code.
#[derive(Debug)]
struct Refusal {
    error: ServerMessage,
    close: CloseCode,
}

impl Refusal {
    fn new(code: ErrorCode, close: CloseCode, message: impl Into<String>) -> Refusal {
        Refusal {
            error: ServerMessage::error(code, message),
            close,
        }
    }

    fn unauthorized(message: &str) -> Refusal {
        Refusal::new(ErrorCode::Unauthorized, CloseCode::Unauthorized, message)
    }

    fn unexpected(message_type: &str, when: &str) -> Refusal {
        Refusal::new(
            ErrorCode::UnexpectedMessage,
            CloseCode::PolicyViolation,
            format!("{message_type} is not expected {when}"),
        )
    }

    fn unsupported_protocol(requested: u32) -> Refusal {
        let supported = ProtocolRange::SUPPORTED;
        Refusal {
            error: ServerMessage::Error {
                code: ErrorCode::UnsupportedProtocol,
                message: format!(
                    "this server speaks protocol {supported}, the peer speaks {requested}; \
                     update the agent (or the server) so they overlap"
                ),
                retry_after_secs: None,
                supported_protocol: Some(supported),
            },
            close: CloseCode::UnsupportedProtocol,
        }
    }
}

/// What the peer sent next, already judged.
#[derive(Debug)]
enum Incoming {
    Message(ClientMessage),
    /// A ping or pong: proof of life, nothing to answer (tungstenite answers pings).
    Alive,
    Refused(Refusal),
    Gone(String),
}

// Reads the next frame and judges it.
async fn next_data<S>(ws: &mut WebSocketStream<S>) -> Incoming
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    {
        let Some(frame) = ws.next().await else {
            return Incoming::Gone("connection closed".to_owned());
        };
        match frame {
            Ok(Message::Text(text)) => match ClientMessage::decode(&text) {
                Ok(message) => Incoming::Message(message),
                Err(err) => Incoming::Refused(Refusal::new(
                    err.error_code(),
                    CloseCode::InvalidPayload,
                    err.to_string(),
                )),
            },
            Ok(Message::Binary(_)) => Incoming::Refused(Refusal::new(
                ErrorCode::BinaryNotSupported,
                CloseCode::UnsupportedData,
                "binary frames are not part of this protocol; send JSON text",
            )),
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Incoming::Alive,
            Ok(Message::Close(frame)) => Incoming::Gone(match frame {
                Some(frame) => format!(
                    "peer closed with {} {:?}",
                    u16::from(frame.code),
                    frame.reason.as_str()
                ),
                None => "peer closed".to_owned(),
            }),
            Err(tungstenite::Error::Capacity(err)) => Incoming::Refused(Refusal::new(
                ErrorCode::MessageTooLarge,
                CloseCode::MessageTooBig,
                format!(
                    "{err}; the limit is {} bytes",
                    changeover_protocol::MAX_MESSAGE_BYTES
                ),
            )),
            Err(tungstenite::Error::Utf8(_)) => Incoming::Refused(Refusal::new(
                ErrorCode::MalformedMessage,
                CloseCode::InvalidPayload,
                "a text frame that is not UTF-8",
            )),
            Err(tungstenite::Error::Protocol(err)) => Incoming::Refused(Refusal::new(
                ErrorCode::MalformedMessage,
                CloseCode::ProtocolError,
                format!("WebSocket protocol violation: {err}"),
            )),
            Err(err) => Incoming::Gone(err.to_string()),
        }
    }
}

// The ways a connection ends run once, but an inline future's state is reserved in every
// connection's task for its whole life; boxed, they cost a pointer there until they run.
// (Measured with -Zprint-type-sizes: the task of an idle agent was 3.9 KB before.)

fn refuse<'a, S>(
    ws: &'a mut WebSocketStream<S>,
    refusal: Refusal,
    context: &'a ConnectionContext,
) -> Pin<Box<impl Future<Output = Ending> + 'a>>
where
    S: AsyncRead + AsyncWrite + Unpin + 'a,
{
    Box::pin(refuse_inline(ws, refusal, context))
}

async fn refuse_inline<S>(
    ws: &mut WebSocketStream<S>,
    refusal: Refusal,
    context: &ConnectionContext,
) -> Ending
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let reason = match &refusal.error {
        ServerMessage::Error { message, .. } => message.clone(),
        _ => String::new(),
    };
    if let Err(ending) = send(ws, &refusal.error, context).await {
        return ending;
    }
    close(ws, refusal.close, &reason, context).await
}

async fn send<S>(
    ws: &mut WebSocketStream<S>,
    message: &ServerMessage,
    context: &ConnectionContext,
) -> Result<(), Ending>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_frame(ws, Message::text(encode(message)), context).await
}

async fn send_frame<S>(
    ws: &mut WebSocketStream<S>,
    frame: Message,
    context: &ConnectionContext,
) -> Result<(), Ending>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The timer is armed only if the write has to wait: at a broadcast to thousands of
    // sessions nearly every write completes at once, and a timer each costs more than the
    // write's own bookkeeping. Boxed, that rare wait takes no room in every session's task.
    let mut sending = std::pin::pin!(ws.send(frame));
    let written = match std::future::poll_fn(|cx| Poll::Ready(sending.as_mut().poll(cx))).await {
        Poll::Ready(written) => Ok(written),
        Poll::Pending => Box::pin(timeout(context.write_timeout, sending)).await,
    };
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(Ending::PeerGone(format!("write failed: {err}"))),
        Err(_elapsed) => Err(Ending::Closed(
            CloseCode::SlowConsumer,
            format!(
                "a write took longer than {} s",
                context.write_timeout.as_secs()
            ),
        )),
    }
}

// Sends the close frame and waits briefly for the peer's reply so the close is clean.
fn close<'a, S>(
    ws: &'a mut WebSocketStream<S>,
    code: CloseCode,
    reason: &'a str,
    context: &'a ConnectionContext,
) -> Pin<Box<impl Future<Output = Ending> + 'a>>
where
    S: AsyncRead + AsyncWrite + Unpin + 'a,
{
    close_then(ws, code, reason, context, || {})
}

// Sends the close frame, calls `sent` once it is written (or could not be), then waits a
// little for the peer's answer.
fn close_then<'a, S>(
    ws: &'a mut WebSocketStream<S>,
    code: CloseCode,
    reason: &'a str,
    context: &'a ConnectionContext,
    sent: impl FnOnce() + 'a,
) -> Pin<Box<impl Future<Output = Ending> + 'a>>
where
    S: AsyncRead + AsyncWrite + Unpin + 'a,
{
    Box::pin(close_inline(ws, code, reason, context, sent))
}

async fn close_inline<S>(
    ws: &mut WebSocketStream<S>,
    code: CloseCode,
    reason: &str,
    context: &ConnectionContext,
    sent: impl FnOnce(),
) -> Ending
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code: WsCloseCode::from(code.code()),
        reason: truncate_reason(reason).into(),
    };
    let closing = async {
        let written = ws.close(Some(frame)).await;
        sent();
        written?;
        while ws.next().await.transpose()?.is_some() {}
        Ok::<_, tungstenite::Error>(())
    };
    let _ = timeout(context.write_timeout.min(Duration::from_secs(2)), closing).await;
    Ending::Closed(code, reason.to_owned())
}

// A close reason must fit in 123 bytes; cut on a character boundary.
fn truncate_reason(reason: &str) -> &str {
    const MAX: usize = 123;
    if reason.len() <= MAX {
        return reason;
    }
    let mut end = MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_are_cut_to_the_frame_limit_on_a_char_boundary() {
        assert_eq!(truncate_reason("short"), "short");
        let long = "ä".repeat(100);
        let cut = truncate_reason(&long);
        assert!(cut.len() <= 123);
        assert!(long.starts_with(cut));
    }
}
