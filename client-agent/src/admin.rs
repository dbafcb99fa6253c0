//! The admin commands: log in to the server and ask it things.
//!
//! An admin connection is a WebSocket like an agent's, opened with `admin_login` instead of
//! `hello`. It never appears in the session table.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use changeover_protocol::text::escape_control as escape;
use changeover_protocol::{
    ClientMessage, ErrorCode, PROTOCOL_VERSION, PackageSource, ServerMessage, StatusReport,
};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

use crate::agent::{next_message, send};
use crate::dial::{AgentStream, Dialer};
use crate::server_values::rfc3339;

/// The environment variable admin commands read the password from.
pub const ADMIN_PASSWORD_ENV: &str = "CHANGEOVER_ADMIN_PASSWORD";

/// How long an admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no admin password: set {ADMIN_PASSWORD_ENV} or pass --password-file")]
    NoPassword,
    #[error("cannot read the password file {path}: {source}")]
    PasswordFile {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot reach the server: {0:#}")]
    Connect(anyhow::Error),
    #[error("login refused: {message}")]
    LoginRefused { message: String },
    #[error("login refused: {message}")]
    Throttled {
        message: String,
        retry_after_secs: Option<u64>,
    },
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    #[error("the connection to the server failed: {reason}")]
    ConnectionLost { reason: String },
    #[error("the server did not answer within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    #[error("unexpected answer from the server: {0}")]
    Unexpected(String),
}

/// Finds the admin password: `--password-file` first, then the environment.
pub fn admin_password(password_file: Option<&Path>) -> Result<String, AdminError> {
    if let Some(path) = password_file {
        let text = std::fs::read_to_string(path).map_err(|source| AdminError::PasswordFile {
            path: path.display().to_string(),
            source,
        })?;
        return Ok(text.trim_end_matches(['\r', '\n']).to_owned());
    }
    std::env::var(ADMIN_PASSWORD_ENV)
        .ok()
        .filter(|password| !password.is_empty())
        .ok_or(AdminError::NoPassword)
}

/// A logged-in admin connection.
#[derive(Debug)]
pub struct AdminSession {
    ws: WebSocketStream<AgentStream>,
    pub server_version: String,
}

impl AdminSession {
    /// Connects and logs in.
    pub async fn login(dialer: &Dialer, password: String) -> Result<AdminSession, AdminError> {
        let config = WebSocketConfig::default()
            .read_buffer_size(64 * 1024)
            .max_message_size(Some(changeover_protocol::MAX_STATUS_MESSAGE_BYTES))
            .max_frame_size(Some(changeover_protocol::MAX_STATUS_MESSAGE_BYTES));
        let mut ws = dialer.connect(config).await.map_err(AdminError::Connect)?;
        let login = ClientMessage::AdminLogin {
            protocol_version: PROTOCOL_VERSION,
            password,
        };
        send(&mut ws, &login)
            .await
            .map_err(|err| AdminError::ConnectionLost {
                reason: format!("{err:#}"),
            })?;
        match request_answer(&mut ws).await? {
            ServerMessage::AdminWelcome { server_version, .. } => {
                Ok(AdminSession { ws, server_version })
            }
            ServerMessage::Error {
                code: ErrorCode::Throttled,
                message,
                retry_after_secs,
                ..
            } => Err(AdminError::Throttled {
                message,
                retry_after_secs: retry_after_secs
                    .map(|secs| crate::server_values::retry_after(secs).as_secs()),
            }),
            ServerMessage::Error {
                code: ErrorCode::Unauthorized,
                message,
                ..
            } => Err(AdminError::LoginRefused { message }),
            ServerMessage::Error { code, message, .. } => {
                Err(AdminError::Refused { code, message })
            }
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Asks for the server's status.
    pub async fn status(&mut self) -> Result<StatusReport, AdminError> {
        send(&mut self.ws, &ClientMessage::StatusRequest)
            .await
            .map_err(|err| AdminError::ConnectionLost {
                reason: format!("{err:#}"),
            })?;
        match request_answer(&mut self.ws).await? {
            ServerMessage::Status(report) => Ok(*report),
            ServerMessage::Error { code, message, .. } => {
                Err(AdminError::Refused { code, message })
            }
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Asks the server to fetch and verify a release; follows it until it is ready or
    /// refused, calling `on_message` with every message on the way.
    pub async fn download(
        &mut self,
        version: Option<String>,
        allow_downgrade: bool,
        mut on_message: impl FnMut(&ServerMessage),
    ) -> Result<String, AdminError> {
        let request = ClientMessage::DownloadRequest {
            version: version.clone(),
            allow_downgrade,
        };
        send(&mut self.ws, &request)
            .await
            .map_err(|err| AdminError::ConnectionLost {
                reason: format!("{err:#}"),
            })?;
        let wanted = version.clone();
        let mut accepted: Option<String> = None;
        loop {
            // No overall deadline: a large download takes as long as it takes, and the
            // server's heartbeat tells a dead connection from a slow transfer.
            let message = next_message(&mut self.ws)
                .await
                .map_err(|reason| AdminError::ConnectionLost { reason })?;
            on_message(&message);
            match message {
                ServerMessage::DownloadAccepted { version } => accepted = Some(version),
                ServerMessage::Error { code, message, .. } => {
                    return Err(AdminError::Refused { code, message });
                }
                // Only the outcome of this request counts, not an inbox package meanwhile.
                ServerMessage::PackageReady {
                    version, source, ..
                } if source == PackageSource::Feed
                    && accepted
                        .as_ref()
                        .or(wanted.as_ref())
                        .is_none_or(|expected| *expected == version) =>
                {
                    return Ok(version);
                }
                ServerMessage::PackageRefused {
                    version: Some(version),
                    source: PackageSource::Feed,
                    reason,
                } if accepted.as_ref() == Some(&version) => {
                    return Err(AdminError::Refused {
                        code: ErrorCode::Unknown,
                        message: reason,
                    });
                }
                _ => {}
            }
        }
    }

    /// Ends the connection politely.
    pub async fn close(mut self) {
        let frame = CloseFrame {
            code: WsCloseCode::Normal,
            reason: "admin command done".into(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(Some(frame))).await;
    }
}

// The direct answer to a request; events the server sends meanwhile are skipped.
async fn request_answer(
    ws: &mut WebSocketStream<AgentStream>,
) -> Result<ServerMessage, AdminError> {
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, next_message(ws)).await {
            Err(_elapsed) => return Err(AdminError::Timeout),
            Ok(Err(reason)) => return Err(AdminError::ConnectionLost { reason }),
            Ok(Ok(message)) if is_event(&message) => continue,
            Ok(Ok(message)) => return Ok(message),
        }
    }
}

/// Messages the server sends on its own, not as an answer.
pub fn is_event(message: &ServerMessage) -> bool {
    matches!(
        message,
        ServerMessage::DownloadStarted { .. }
            | ServerMessage::DownloadProgress { .. }
            | ServerMessage::DownloadRetrying { .. }
            | ServerMessage::PackageReady { .. }
            | ServerMessage::PackageRefused { .. }
            | ServerMessage::ChangeoverProgress { .. }
            | ServerMessage::ChangeoverFinished(_)
    )
}

/// `admin status`: one JSON document, or a table for people.
pub async fn status_command(dialer: &Dialer, password: String, json: bool) -> anyhow::Result<()> {
    let mut session = AdminSession::login(dialer, password).await?;
    let report = session.status().await?;
    session.close().await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("cannot print the status")?
        );
    } else {
        print!("{}", render_status(&report, SystemTime::now()));
    }
    Ok(())
}

/// `admin download`: fetch and verify a release, with a progress bar on a terminal or one
/// JSON object per message with `--json`.
pub async fn download_command(
    dialer: &Dialer,
    password: String,
    version: Option<String>,
    allow_downgrade: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut session = AdminSession::login(dialer, password).await?;
    let bar = indicatif::ProgressBar::hidden();
    let result = session
        .download(version, allow_downgrade, |message| {
            if json {
                if let Ok(line) = serde_json::to_string(message) {
                    println!("{line}");
                }
                return;
            }
            show_download_progress(&bar, message);
        })
        .await;
    bar.finish_and_clear();
    session.close().await;
    let version = result?;
    if !json {
        println!(
            "server {} is verified and ready for a changeover",
            escape(&version)
        );
    }
    Ok(())
}

fn show_download_progress(bar: &indicatif::ProgressBar, message: &ServerMessage) {
    match message {
        ServerMessage::DownloadStarted {
            version,
            size,
            resumed_from,
        } => {
            let version = escape(version);
            if *resumed_from > 0 {
                eprintln!("resuming server {version} at {resumed_from} of {size} bytes");
            } else {
                eprintln!("downloading server {version} ({size} bytes)");
            }
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(*size);
            bar.set_position(*resumed_from);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style);
            }
        }
        ServerMessage::DownloadProgress { bytes, .. } => bar.set_position(*bytes),
        ServerMessage::DownloadRetrying {
            attempt,
            retry_in_ms,
            reason,
            ..
        } => bar.suspend(|| {
            eprintln!(
                "attempt {attempt} broke off ({}); resuming in {retry_in_ms} ms",
                escape(reason)
            )
        }),
        _ => {}
    }
}

/// What `admin update` asks for.
#[derive(Debug, Clone)]
pub struct UpdateOptions {
    pub grace_secs: u64,
    pub notify: Option<String>,
    pub version: Option<String>,
    /// RFC 3339.
    pub at: Option<String>,
    pub message: Option<String>,
    pub allow_downgrade: bool,
}

/// `--at`: an RFC 3339 time, or a duration from now such as `30m`; returns RFC 3339.
pub fn parse_when(text: &str) -> anyhow::Result<String> {
    if let Ok(time) = humantime::parse_rfc3339_weak(text) {
        return Ok(humantime::format_rfc3339_seconds(time).to_string());
    }
    let after = humantime::parse_duration(text).map_err(|_| {
        anyhow::anyhow!(
            "--at {text:?} is neither a time (2026-11-28T22:00:00Z) nor a duration (30m)"
        )
    })?;
    // RFC 3339 as the protocol writes it ends with the year 9999.
    let last = humantime::parse_rfc3339("9999-12-31T23:59:59Z")?;
    match SystemTime::now().checked_add(after) {
        Some(at) if at <= last => Ok(rfc3339(at)),
        _ => anyhow::bail!("--at {text:?} is beyond the year 9999"),
    }
}

/// How long `admin update` waits for the server to come back after its restart.
/// How many status requests, 2 s apart, may go unanswered while an update is followed
/// before the connection counts as lost.
const SILENT_ASKS: u32 = 5;

const RETURN_PATIENCE: Duration = Duration::from_secs(180);

/// `admin update`: starts a changeover and follows it, through the server's restart,
/// until it ends. Succeeds only when the new version runs, healthy and committed.
pub async fn update_command(
    dialer: &Dialer,
    password: String,
    options: UpdateOptions,
    json: bool,
) -> anyhow::Result<()> {
    use changeover_protocol::messages::MAX_GRACE_SECS;
    if options.grace_secs > MAX_GRACE_SECS {
        anyhow::bail!(
            "--grace {} is out of range: 0 to {MAX_GRACE_SECS} seconds",
            options.grace_secs
        );
    }
    let started = std::time::Instant::now();
    let mut session = AdminSession::login(dialer, password.clone()).await?;
    let request = ClientMessage::UpdateRequest {
        version: options.version,
        grace_secs: options.grace_secs,
        notify: options.notify,
        message: options.message,
        at: options.at,
        allow_downgrade: options.allow_downgrade,
    };
    send(&mut session.ws, &request)
        .await
        .map_err(|err| AdminError::ConnectionLost {
            reason: format!("{err:#}"),
        })?;
    let id = match request_answer(&mut session.ws).await? {
        ServerMessage::UpdateAccepted {
            changeover_id,
            target_version,
            scheduled_at,
        } => {
            let message = ServerMessage::UpdateAccepted {
                changeover_id: changeover_id.clone(),
                target_version: target_version.clone(),
                scheduled_at,
            };
            if json {
                print_json(&message);
            } else {
                let (id, target) = (escape(&changeover_id), escape(&target_version));
                match scheduled_at {
                    Some(at) => {
                        println!("changeover {id} to {target} scheduled for {}", rfc3339(at))
                    }
                    None => println!("changeover {id} to {target} started"),
                }
            }
            changeover_id
        }
        ServerMessage::Error { code, message, .. } => {
            return Err(AdminError::Refused { code, message }.into());
        }
        other => return Err(AdminError::Unexpected(format!("{other:?}")).into()),
    };

    let bar = indicatif::ProgressBar::hidden();
    // Status requests sent since the server last said anything.
    let mut unanswered = 0u32;
    // The last phase the server reported: from the stop on, a lost connection is the
    // restart the admin asked for, not a failure.
    let mut last_phase = None;
    loop {
        let next =
            tokio::time::timeout(Duration::from_secs(2), next_message(&mut session.ws)).await;
        let next = match next {
            // Asked and asked again, and still silent: the connection is as good as gone
            // (a process that ended may leave its socket open in another).
            Err(_) if unanswered >= SILENT_ASKS => {
                Ok(Err("the server stopped answering".to_owned()))
            }
            other => other,
        };
        let message = match next {
            // Quiet for a while: ask, in case the end happened while we were away.
            Err(_) => {
                unanswered += 1;
                let _ = send(&mut session.ws, &ClientMessage::StatusRequest).await;
                continue;
            }
            Ok(Err(reason)) => {
                unanswered = 0;
                bar.finish_and_clear();
                if !json {
                    if last_phase.is_some_and(restarts_from) {
                        println!("the server is restarting…");
                    } else {
                        println!(
                            "connection to the server lost ({}); waiting for it to come back",
                            escape(&reason)
                        );
                    }
                }
                session = reconnect(dialer, &password).await?;
                let _ = send(&mut session.ws, &ClientMessage::StatusRequest).await;
                continue;
            }
            Ok(Ok(message)) => {
                unanswered = 0;
                if let ServerMessage::ChangeoverProgress { phase, .. } = &message {
                    last_phase = Some(*phase);
                }
                message
            }
        };
        let summary = match message {
            ServerMessage::ChangeoverFinished(summary) if summary.changeover_id == id => summary,
            ServerMessage::Status(report) => match report.last_changeover {
                Some(summary) if summary.changeover_id == id => summary,
                _ => continue,
            },
            other => {
                if json {
                    print_json(&other);
                } else {
                    show_update_progress(&bar, &other, started);
                }
                continue;
            }
        };
        bar.finish_and_clear();
        session.close().await;
        if json {
            print_json(&ServerMessage::ChangeoverFinished(summary.clone()));
        }
        return finish_line(&summary, json);
    }
}

async fn reconnect(dialer: &Dialer, password: &str) -> anyhow::Result<AdminSession> {
    let deadline = std::time::Instant::now() + RETURN_PATIENCE;
    let mut backoff = changeover_protocol::backoff::Backoff::new(
        Duration::from_millis(100),
        Duration::from_secs(2),
    );
    loop {
        match AdminSession::login(dialer, password.to_owned()).await {
            Ok(session) => return Ok(session),
            Err(err @ (AdminError::LoginRefused { .. } | AdminError::Throttled { .. })) => {
                return Err(err.into());
            }
            Err(err) if std::time::Instant::now() >= deadline => {
                anyhow::bail!(
                    "the server did not come back within {} s: {err}",
                    RETURN_PATIENCE.as_secs()
                );
            }
            Err(_) => tokio::time::sleep(backoff.next_delay()).await,
        }
    }
}

/// Phases after which the server's process ends (the old release stops, the new one
/// starts).
fn restarts_from(phase: changeover_protocol::ChangeoverPhase) -> bool {
    use changeover_protocol::ChangeoverPhase as P;
    matches!(
        phase,
        P::LoggingOut | P::Stopping | P::CarryingOver | P::Swapping | P::Restarting
    )
}

/// A downtime as people read it: milliseconds below a second.
fn downtime_text(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// `1 session`, `3 sessions`.
fn sessions(count: u64) -> String {
    if count == 1 {
        "1 session".to_owned()
    } else {
        format!("{count} sessions")
    }
}

fn finish_line(summary: &changeover_protocol::ChangeoverSummary, json: bool) -> anyhow::Result<()> {
    use changeover_protocol::ChangeoverOutcome;
    let took = summary
        .ended_at
        .duration_since(summary.started_at)
        .unwrap_or_default();
    match summary.outcome {
        ChangeoverOutcome::Committed => {
            if !json {
                let downtime = summary
                    .downtime_ms
                    .map_or_else(|| "unknown".to_owned(), downtime_text);
                println!(
                    "server updated {} -> {} in {} (downtime {downtime}; {} warned, {} logged out)",
                    escape(&summary.from_version),
                    escape(&summary.target_version),
                    humantime::format_duration(Duration::from_secs(took.as_secs())),
                    sessions(summary.sessions_warned),
                    summary.sessions_logged_out
                );
            }
            Ok(())
        }
        outcome => anyhow::bail!(
            "the changeover to {} ended {outcome} during {}: {}",
            summary.target_version,
            summary.phase,
            summary.reason.as_deref().unwrap_or("no reason given")
        ),
    }
}

fn show_update_progress(
    bar: &indicatif::ProgressBar,
    message: &ServerMessage,
    started: std::time::Instant,
) {
    match message {
        ServerMessage::ChangeoverProgress { phase, detail, .. } => bar.suspend(|| {
            let elapsed = started.elapsed().as_secs_f64();
            if detail.is_empty() {
                println!("[{elapsed:6.1}s] {phase}");
            } else {
                println!("[{elapsed:6.1}s] {phase}: {}", escape(detail));
            }
        }),
        other => show_download_progress(bar, other),
    }
}

fn print_json(message: &ServerMessage) {
    if let Ok(line) = serde_json::to_string(message) {
        println!("{line}");
    }
}

/// `admin cancel`.
pub async fn cancel_command(dialer: &Dialer, password: String) -> anyhow::Result<()> {
    let mut session = AdminSession::login(dialer, password).await?;
    send(&mut session.ws, &ClientMessage::CancelRequest)
        .await
        .map_err(|err| AdminError::ConnectionLost {
            reason: format!("{err:#}"),
        })?;
    let answer = request_answer(&mut session.ws).await?;
    session.close().await;
    match answer {
        ServerMessage::CancelAccepted { changeover_id } => {
            println!(
                "changeover {} cancelled; the users were told",
                escape(&changeover_id)
            );
            Ok(())
        }
        ServerMessage::Error { code, message, .. } => {
            Err(AdminError::Refused { code, message }.into())
        }
        other => Err(AdminError::Unexpected(format!("{other:?}")).into()),
    }
}

/// The status as a human reads it. Every string in it came from the server or an agent, so
/// each is printed through [`escape`]: a host name cannot move the admin's cursor.
pub fn render_status(report: &StatusReport, now: SystemTime) -> String {
    let mut out = String::new();
    let available = report
        .available_version
        .as_deref()
        .unwrap_or("none newer than installed");
    out.push_str(&format!(
        "server version     {}\n",
        escape(&report.server_version)
    ));
    out.push_str(&format!("available release  {}\n", escape(available)));
    if let Some(url) = &report.console_url {
        out.push_str(&format!("web console        {}\n", escape(url)));
    }
    let feed = match (&report.feed.url, &report.feed.error) {
        (None, _) => "not configured (packages come from the inbox)".to_owned(),
        (Some(url), Some(error)) => format!("{}: {}", escape(url), escape(error)),
        (Some(url), None) => {
            let newest = report
                .feed
                .newest_version
                .as_deref()
                .unwrap_or("no server release");
            let checked = report
                .feed
                .checked_at
                .map(|at| format!(", checked {}", rfc3339(at)))
                .unwrap_or_default();
            format!("{}: newest {}{checked}", escape(url), escape(newest))
        }
    };
    out.push_str(&format!("feed               {feed}\n"));
    if let Some(candidate) = &report.candidate {
        let state = match candidate.state {
            changeover_protocol::CandidateState::Ready => "verified, ready".to_owned(),
            changeover_protocol::CandidateState::Downloading { bytes, size } => {
                format!("downloading, {bytes} of {size} bytes")
            }
            changeover_protocol::CandidateState::Unknown => {
                "in a state unknown to this version".to_owned()
            }
        };
        out.push_str(&format!(
            "candidate          {} from {} ({state})\n",
            escape(&candidate.version),
            candidate.source
        ));
    }
    for problem in &report.disk_problems {
        out.push_str(&format!("disk problem       {}\n", escape(problem)));
    }
    if let Some(problem) = &report.mail_problem {
        out.push_str(&format!("mail               {}\n", escape(problem)));
    }
    for mail in &report.outbox {
        let why = mail.last_error.as_deref().unwrap_or("not tried yet");
        out.push_str(&format!(
            "mail waiting       \"{}\" to {} ({} tries; {})\n",
            escape(&mail.subject),
            escape(mail.to.as_deref().unwrap_or("the configured mail.to")),
            mail.attempts,
            escape(why)
        ));
    }
    if let Some(refusal) = &report.last_refusal {
        out.push_str(&format!("last refusal       {}\n", escape(refusal)));
    }
    out.push_str(&format!("changeover phase   {}\n", report.phase));
    if let Some(changeover) = &report.changeover {
        let when = match (changeover.scheduled_at, changeover.deadline) {
            (_, Some(deadline)) => format!(", logout at {}", rfc3339(deadline)),
            (Some(at), None) => format!(", scheduled for {}", rfc3339(at)),
            (None, None) => String::new(),
        };
        out.push_str(&format!(
            "changeover         {} -> {} ({}{when})\n",
            escape(&changeover.from_version),
            escape(&changeover.target_version),
            escape(&changeover.changeover_id)
        ));
    }
    if let Some(last) = &report.last_changeover {
        let reason = last
            .reason
            .as_deref()
            .map(|r| format!(": {}", escape(r)))
            .unwrap_or_default();
        out.push_str(&format!(
            "last changeover    {} -> {} {} at {}{reason}\n",
            escape(&last.from_version),
            escape(&last.target_version),
            last.outcome,
            rfc3339(last.ended_at)
        ));
    }
    // The latest few admin actions; `--json` has more, state/audit.jsonl all.
    for entry in report.audit.iter().take(3) {
        let reason = entry
            .reason
            .as_deref()
            .map(|r| format!(": {}", escape(r)))
            .unwrap_or_default();
        out.push_str(&format!(
            "admin action       {} {} from {} via {}, {}{reason}\n",
            rfc3339(entry.at),
            escape(&entry.action),
            escape(&entry.address),
            escape(&entry.via),
            escape(&entry.outcome)
        ));
    }
    match &report.agent_release {
        Some(release) => out.push_str(&format!(
            "agent release      {} offered to older agents; {} behind\n",
            escape(release),
            report.agents_behind
        )),
        None => out.push_str("agent release      none on offer\n"),
    }
    if !report.apps.is_empty() {
        out.push_str(&format!("applications       {}\n", report.apps.len()));
        let rows: Vec<Vec<String>> = report
            .apps
            .iter()
            .map(|app| {
                let health = match (&app.health, app.health_at) {
                    (Some(health), Some(at)) => format!("{health} ({})", rfc3339(at)),
                    (Some(health), None) => health.clone(),
                    (None, _) => "-".to_owned(),
                };
                vec![
                    app.name.clone(),
                    app.state.to_string(),
                    app.pid
                        .map_or_else(|| "-".to_owned(), |pid| pid.to_string()),
                    app.restarts.to_string(),
                    one_line(&health),
                    app.last_exit
                        .as_deref()
                        .map_or_else(|| "-".to_owned(), one_line),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &[
                "APP",
                "STATE",
                "PID",
                "RESTARTS",
                "LAST HEALTH",
                "LAST EXIT",
            ],
            &rows,
        ));
        out.push('\n');
    }
    // Older servers do not count; a large site's report lists only the oldest sessions.
    let total = report.sessions_total.max(report.sessions.len() as u64);
    if total > report.sessions.len() as u64 {
        out.push_str(&format!(
            "sessions           {total} (the oldest {} listed; --json has the same)\n",
            report.sessions.len()
        ));
    } else {
        out.push_str(&format!("sessions           {total}\n"));
    }
    if report.sessions.is_empty() {
        return out;
    }
    let rows: Vec<Vec<String>> = report
        .sessions
        .iter()
        .map(|session| {
            let age = now
                .duration_since(session.connected_since)
                .unwrap_or_default();
            vec![
                session.user.clone(),
                session.host.clone(),
                session.agent_version.clone(),
                update_cell(session, report.agent_release.as_deref()),
                session.platform.clone(),
                session.address.clone(),
                format!(
                    "{} ({} ago)",
                    rfc3339(session.connected_since),
                    humantime::format_duration(Duration::from_secs(age.as_secs()))
                ),
            ]
        })
        .collect();
    out.push('\n');
    let clones: Vec<String> = report
        .sessions
        .iter()
        .filter_map(|session| {
            session.clone_of.as_ref().map(|original| {
                format!(
                    "clone              {}@{} came with the agent id {} of another connected \
                     workstation (a cloned disk?); it is {} now\n",
                    escape(&session.user),
                    escape(&session.host),
                    escape(original),
                    escape(&session.agent_id)
                )
            })
        })
        .collect();
    out.push_str(&table(
        &[
            "USER",
            "HOST",
            "AGENT",
            "UPDATE",
            "PLATFORM",
            "ADDRESS",
            "CONNECTED SINCE",
        ],
        &rows,
    ));
    if !clones.is_empty() {
        out.push('\n');
        out.extend(clones);
    }
    out
}

// A multi-line text (a probe's error) as one table cell.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

// Left-aligned columns two spaces apart, the header first. Every cell is escaped first
// (its width is the width of what is printed).
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| escape(cell).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push_row = |cells: &mut dyn Iterator<Item = &str>| {
        let line: Vec<String> = cells
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    };
    push_row(&mut header.iter().copied());
    for row in &rows {
        push_row(&mut row.iter().map(String::as_str));
    }
    out
}

// The UPDATE column: the agent's own update as it reported it, else whether it is current.
fn update_cell(session: &changeover_protocol::SessionView, release: Option<&str>) -> String {
    if let Some(update) = &session.update {
        // The whole reason is in --json; the table keeps its columns readable.
        const DETAIL_CHARS: usize = 48;
        let detail = update
            .detail
            .as_deref()
            .map(|detail| {
                if detail.chars().count() > DETAIL_CHARS {
                    let cut: String = detail.chars().take(DETAIL_CHARS - 1).collect();
                    format!(": {cut}…")
                } else {
                    format!(": {detail}")
                }
            })
            .unwrap_or_default();
        return format!("{} {}{detail}", update.state, update.version);
    }
    let older = |release: &str| match (
        session.agent_version.parse::<semver::Version>(),
        release.parse::<semver::Version>(),
    ) {
        (Ok(running), Ok(release)) => running < release,
        _ => false,
    };
    match release {
        Some(release) if older(release) => format!("behind {release}"),
        Some(_) => "current".to_owned(),
        None => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finish_line_reads_as_people_write() {
        assert_eq!(downtime_text(25), "25 ms");
        assert_eq!(downtime_text(999), "999 ms");
        assert_eq!(downtime_text(1250), "1.2 s");
        assert_eq!(sessions(1), "1 session");
        assert_eq!(sessions(0), "0 sessions");
        assert_eq!(sessions(3), "3 sessions");
        use changeover_protocol::ChangeoverPhase as P;
        assert!(restarts_from(P::Restarting) && restarts_from(P::LoggingOut));
        assert!(!restarts_from(P::CountingDown) && !restarts_from(P::Preparing));
    }
    use changeover_protocol::{ChangeoverPhase, SessionView};

    fn since() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn session(user: &str, host: &str) -> SessionView {
        SessionView {
            session_id: 1,
            agent_id: "id".to_owned(),
            user: user.to_owned(),
            host: host.to_owned(),
            platform: "linux-x86_64".to_owned(),
            agent_version: "1.2.0".to_owned(),
            protocol_version: 1,
            address: "10.0.0.7:50000".to_owned(),
            connected_since: since(),
            update: None,
            clone_of: None,
        }
    }

    fn report(sessions: Vec<SessionView>) -> StatusReport {
        StatusReport {
            server_version: "1.2.0".to_owned(),
            available_version: None,
            phase: ChangeoverPhase::Idle,
            feed: Default::default(),
            candidate: None,
            last_refusal: None,
            changeover: None,
            last_changeover: None,
            outbox: Vec::new(),
            mail_problem: None,
            disk_problems: Vec::new(),
            history: Vec::new(),
            audit: Vec::new(),
            console_url: None,
            agent_release: Some("1.2.0".to_owned()),
            agents_behind: 0,
            apps: vec![changeover_protocol::AppStatus {
                name: "business".to_owned(),
                state: changeover_protocol::AppState::Healthy,
                pid: Some(4242),
                restarts: 1,
                health: Some("ok".to_owned()),
                health_at: None,
                last_exit: Some("exit status: 1".to_owned()),
            }],
            sessions_total: sessions.len() as u64,
            sessions,
        }
    }

    #[test]
    fn the_table_lists_every_session_aligned() {
        let report = report(vec![
            session("alice", "ws-1"),
            session("bob", "workstation-22"),
        ]);
        let text = render_status(&report, since() + Duration::from_secs(125));
        assert!(text.contains("changeover phase   idle"), "{text}");
        assert!(text.contains("sessions           2\n"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("USER")).unwrap();
        assert!(
            lines[header + 1].starts_with("alice  ws-1            1.2.0  current"),
            "{text}"
        );
        assert!(lines[header + 2].contains("(2m 5s ago)"), "{text}");
        let apps = lines.iter().position(|l| l.starts_with("APP")).unwrap();
        assert!(
            lines[apps + 1].starts_with("business  healthy  4242  1         ok"),
            "{text}"
        );
    }

    #[test]
    fn escapes_from_peers_are_shown_not_obeyed() {
        let mut sneaky = session("\u{1b}[2J\u{1b}[31mroot", "ws\u{202e}1\nfake row");
        sneaky.platform = "linux\u{9b}x".to_owned();
        sneaky.update = Some(changeover_protocol::AgentUpdateView {
            version: "9.9.9\u{7}".to_owned(),
            state: changeover_protocol::AgentUpdateState::Failed,
            detail: Some("bad\u{1b}]0;title\u{7}".to_owned()),
        });
        sneaky.clone_of = Some("orig\u{1b}".to_owned());
        let mut report = report(vec![session("alice", "ws-1"), sneaky]);
        report.server_version = "1.2.0\u{1b}[8m".to_owned();
        report.last_refusal = Some("refused\u{2066}".to_owned());
        report.apps[0].name = "app\u{1b}c".to_owned();
        report.feed.url = Some("http://feed\u{1b}/".to_owned());
        report.feed.error = Some("down\r\n".to_owned());
        let text = render_status(&report, since());
        for c in text.chars() {
            assert!(
                c == '\n' || !(c.is_control() || ('\u{202a}'..='\u{2069}').contains(&c)),
                "{c:?} reached the terminal: {text}"
            );
        }
        assert!(text.contains("\\x1b[2J\\x1b[31mroot"), "{text}");
        assert!(text.contains("ws\\u{202e}1\\x0afake row"), "{text}");
        assert!(text.contains("app\\x1bc"), "{text}");
        assert!(text.contains("server version     1.2.0\\x1b[8m"), "{text}");
        // The injected newline did not make a row: two sessions, two rows.
        let header = text.lines().position(|l| l.starts_with("USER")).unwrap();
        assert!(
            text.lines().nth(header + 3).is_none_or(str::is_empty),
            "{text}"
        );
        assert!(text.contains("clone              "), "{text}");
    }

    #[test]
    fn a_long_list_says_how_many_are_left_out() {
        let mut report = report(vec![session("alice", "ws-1")]);
        report.sessions_total = 12_000;
        let text = render_status(&report, since());
        assert!(
            text.contains("sessions           12000 (the oldest 1 listed"),
            "{text}"
        );
    }

    #[test]
    fn at_refuses_times_no_clock_holds() {
        assert!(parse_when("30m").is_ok());
        assert!(parse_when("2030-01-01T00:00:00Z").is_ok());
        let err = parse_when("100000years").unwrap_err();
        assert!(err.to_string().contains("beyond the year 9999"), "{err}");
    }

    #[test]
    fn the_password_file_wins_and_loses_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(admin_password(Some(&file)).unwrap(), "s3cret");
        let missing = admin_password(Some(&dir.path().join("nope"))).unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("cannot read the password file")
        );
    }
}
