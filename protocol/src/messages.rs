//! The messages of protocol version 1, both ways.
//!
//! Every message is one JSON object in one WebSocket text frame, with a `type` field naming
//! it. [`ClientMessage`] is what agents and admin clients send, [`ServerMessage`] what the
//! server sends. PROTOCOL.md shows each with an example; the `protocol_md` test keeps the
//! two in step.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::version::ProtocolRange;

/// A message from an agent or an admin client to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// The first message of an agent: who it is. Answered by [`ServerMessage::Welcome`].
    Hello(AgentHello),
    /// The first message of an admin client. Answered by [`ServerMessage::AdminWelcome`],
    /// or by an error and a close when the password is wrong or the address is throttled.
    AdminLogin {
        protocol_version: u32,
        password: String,
    },
    /// Admin only: asks for a [`ServerMessage::Status`].
    StatusRequest,
    /// Admin only: start a changeover (or schedule it with `at`). Answered by
    /// `update_accepted` or an error; then `changeover_progress` events and, at the end,
    /// `changeover_finished` (after a restart: see `last_changeover` in the status).
    UpdateRequest {
        /// The release to install; the newest available when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
        /// Seconds between the first warning and the forced logout, 0 to 3600.
        #[serde(default = "default_grace_secs")]
        grace_secs: u64,
        /// Who gets the mail when it is over.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        notify: Option<String>,
        /// Shown to the users with the warning.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        /// Start at this time (RFC 3339) instead of now: a maintenance window.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<String>,
        #[serde(default)]
        allow_downgrade: bool,
    },
    /// Admin only: call off a changeover that is scheduled or counting down.
    CancelRequest,
    /// Admin only: fetch a server release from the feed and verify it, without installing
    /// it. Progress comes as `download_*` messages, the end as `package_ready` or
    /// `package_refused`.
    DownloadRequest {
        /// The version to fetch; the newest in the feed when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
        /// Accept a version that is not newer than the installed one.
        #[serde(default)]
        allow_downgrade: bool,
    },
    /// Agent only: how the agent's own update (offered with `agent_update_offer`) goes.
    /// Shown in the status report; never answered.
    AgentUpdateReport {
        /// The offered version this report is about.
        version: String,
        state: AgentUpdateState,
        /// Why it failed or was declined; what it is doing otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
}

/// Where an agent's own update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentUpdateState {
    /// The server offered the update (set by the server, not reported by agents).
    Offered,
    /// The agent is fetching the package (or waiting for its turn to).
    Downloading,
    /// The package verified; the agent is putting it in place.
    Installing,
    /// The new agent is in place; the agent restarts and reconnects with it.
    Restarting,
    /// The update failed; the old agent keeps running. The detail says why.
    Failed,
    /// The agent's policy (`--client-update never`, or the ask hook) declined it.
    Declined,
    /// A state this build does not know (sent by a newer agent).
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for AgentUpdateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AgentUpdateState::Offered => "offered",
            AgentUpdateState::Downloading => "downloading",
            AgentUpdateState::Installing => "installing",
            AgentUpdateState::Restarting => "restarting",
            AgentUpdateState::Failed => "failed",
            AgentUpdateState::Declined => "declined",
            AgentUpdateState::Unknown => "unknown",
        })
    }
}

/// An agent release the server offers: what the agent needs to fetch and verify it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUpdateOffer {
    pub version: String,
    pub platform: String,
    /// The archive's file name.
    pub archive: String,
    pub size: u64,
    /// SHA-256 of the archive, lowercase hex.
    pub sha256: String,
    /// Where to fetch it on this server, a path such as `/agent-updates/<archive>`,
    /// over HTTP(S) on the port the WebSocket uses.
    pub path: String,
    /// The archive's minisign signature as the vendor made it (the `.minisig` file). The
    /// agent checks it with the vendor key it trusts itself, so a server cannot push
    /// anything the vendor did not sign.
    pub signature: String,
}

/// What an agent says about itself when it connects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHello {
    /// The protocol version the agent speaks.
    pub protocol_version: u32,
    /// A stable id the agent keeps in its state folder, so a reconnect is recognised.
    pub agent_id: String,
    /// The user logged in at the workstation.
    pub user: String,
    /// The workstation's host name.
    pub host: String,
    /// Operating system and architecture, such as `linux-x86_64`.
    pub platform: String,
    /// The version of the agent release that is running.
    pub agent_version: String,
    /// A random id the agent process picks when it starts (and hands on to the release it
    /// restarts into). Two live connections with one `agent_id` but different instances are
    /// two workstations cloned from one disk image: the server keeps the first and gives the
    /// newcomer a fresh id in its welcome. Absent from agents before 1.1; such a hello
    /// replaces only a session that has no instance either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
}

impl AgentHello {
    /// The hello as a server may keep it, or why it is refused: ids, platform and version
    /// must be short tokens (see [`crate::text`]), user and host within their limits;
    /// control characters in user and host are kept escaped, so they reach no terminal.
    pub fn checked(mut self) -> Result<AgentHello, String> {
        use crate::text::{
            MAX_HOST_BYTES, MAX_ID_BYTES, MAX_USER_BYTES, escape_control, is_valid_id,
            is_valid_token,
        };
        if !is_valid_id(&self.agent_id) {
            return Err(format!(
                "the agent id must be 1 to {MAX_ID_BYTES} letters, digits, '.', '_' or '-'"
            ));
        }
        if self
            .instance_id
            .as_deref()
            .is_some_and(|id| !is_valid_id(id))
        {
            return Err(format!(
                "the instance id must be 1 to {MAX_ID_BYTES} letters, digits, '.', '_' or '-'"
            ));
        }
        for (name, value) in [
            ("platform", &self.platform),
            ("agent version", &self.agent_version),
        ] {
            if !is_valid_token(value) {
                return Err(format!(
                    "the {name} must be 1 to {MAX_ID_BYTES} printable characters without spaces"
                ));
            }
        }
        for (name, value, max) in [
            ("user name", &mut self.user, MAX_USER_BYTES),
            ("host name", &mut self.host, MAX_HOST_BYTES),
        ] {
            if value.len() > max {
                return Err(format!(
                    "the {name} is {} bytes long; at most {max} are allowed",
                    value.len()
                ));
            }
            if let std::borrow::Cow::Owned(escaped) = escape_control(value) {
                *value = escaped;
            }
        }
        Ok(self)
    }
}

impl AgentUpdateView {
    /// The view of an agent's report as a server keeps it: the version and the detail
    /// cut to their limits, control characters escaped.
    pub fn from_report(version: &str, state: AgentUpdateState, detail: Option<&str>) -> Self {
        use crate::text::{MAX_DETAIL_BYTES, MAX_ID_BYTES, escape_control, truncate};
        let keep = |text: &str, max: usize| escape_control(truncate(text, max)).into_owned();
        AgentUpdateView {
            version: keep(version, MAX_ID_BYTES),
            state,
            detail: detail.map(|detail| keep(detail, MAX_DETAIL_BYTES)),
        }
    }
}

/// A message from the server to an agent or an admin client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The answer to a hello: the session is registered.
    Welcome {
        /// The protocol version both sides speak from now on.
        protocol_version: u32,
        server_version: String,
        /// The server's id for this session, unique while the server process runs.
        session_id: u64,
        /// The server pings this often; an agent that hears nothing for two intervals
        /// (plus a few seconds of slack) treats the connection as dead and reconnects.
        heartbeat_secs: u64,
        /// Present when the server registered the session under another id than the hello
        /// named, because that id is already connected from another instance (a cloned
        /// workstation). The agent keeps this id in its state folder from now on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        assigned_agent_id: Option<String>,
    },
    /// The answer to a correct admin login.
    AdminWelcome {
        protocol_version: u32,
        server_version: String,
    },
    /// The answer to a status request (boxed: it is by far the largest message).
    Status(Box<StatusReport>),
    /// The answer to an update request: a changeover has begun (or is scheduled).
    UpdateAccepted {
        changeover_id: String,
        target_version: String,
        #[serde(
            default,
            with = "optional_rfc3339",
            skip_serializing_if = "Option::is_none"
        )]
        scheduled_at: Option<SystemTime>,
    },
    /// The answer to a cancel request.
    CancelAccepted { changeover_id: String },
    /// A changeover moved to another phase (to every admin).
    ChangeoverProgress {
        changeover_id: String,
        phase: ChangeoverPhase,
        detail: String,
    },
    /// A changeover ended (to every admin).
    ChangeoverFinished(ChangeoverSummary),
    /// To every agent: the server will update; leave before the deadline. Repeated as the
    /// deadline nears, and sent at once to agents that connect during the countdown.
    ///
    /// An agent builds the user's text in the user's language from the structured fields
    /// (`deadline`, `target_version`, `admin_message`); `message` is the same in English
    /// for agents built before they could.
    Warning {
        changeover_id: String,
        #[serde(with = "rfc3339")]
        deadline: SystemTime,
        seconds_left: u64,
        target_version: String,
        /// The admin's words, or the server's default sentence, in English.
        message: String,
        /// The admin's own words (`update_request.message`) as typed, for the agent to add
        /// to its text; absent when the admin gave none (or the server predates it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        admin_message: Option<String>,
    },
    /// To every agent: the announced update was called off.
    UpdateCancelled {
        changeover_id: String,
        /// For the user, in English.
        message: String,
        /// The release the warnings announced; absent from servers that predate it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target_version: Option<String>,
    },
    /// To every agent at the deadline: the session ends now (close the application); the
    /// connection closes with 4009. Reconnect at a random moment within the window.
    Logout {
        changeover_id: String,
        /// For the user and the log, in English.
        reason: String,
        reconnect_within_ms: u64,
        /// The release being installed; absent from servers that predate it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target_version: Option<String>,
        /// As in the warning: the admin's own words, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        admin_message: Option<String>,
    },
    /// The answer to a download request: the feed has this release and it is being
    /// fetched (or is already verified: a `package_ready` follows either way).
    DownloadAccepted { version: String },
    /// A download from the feed began (or resumed from `resumed_from` bytes).
    DownloadStarted {
        version: String,
        size: u64,
        resumed_from: u64,
    },
    /// A download advanced; sent at most a few times a second.
    DownloadProgress {
        version: String,
        bytes: u64,
        size: u64,
    },
    /// A download broke off and will resume after a pause.
    DownloadRetrying {
        version: String,
        attempt: u32,
        retry_in_ms: u64,
        reason: String,
    },
    /// A package was verified and is ready to be installed by a changeover.
    PackageReady {
        version: String,
        source: PackageSource,
        /// The archive's file name in the server's downloads folder.
        archive: String,
    },
    /// A package was refused (a refused download is deleted, a refused inbox package moved
    /// aside), or a download ended without one (the feed gave up or refused; what arrived
    /// is kept to resume).
    PackageRefused {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
        source: PackageSource,
        reason: String,
    },
    /// To an agent older than the server's agent release, right after the welcome: update
    /// yourself to this.
    AgentUpdateOffer(Box<AgentUpdateOffer>),
    /// Something the peer sent was refused. Followed by a close, except for the codes that
    /// answer an admin request ([`ErrorCode::is_request_error`]).
    Error {
        code: ErrorCode,
        /// A sentence for the human reading the agent's log.
        message: String,
        /// For [`ErrorCode::Throttled`]: seconds until a login is accepted again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_secs: Option<u64>,
        /// For [`ErrorCode::UnsupportedProtocol`]: the versions the server speaks.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        supported_protocol: Option<ProtocolRange>,
    },
}

impl ServerMessage {
    /// An error without the optional details.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> ServerMessage {
        ServerMessage::Error {
            code,
            message: message.into(),
            retry_after_secs: None,
            supported_protocol: None,
        }
    }
}

/// Why the server refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The text was not JSON, or not a message of this protocol.
    MalformedMessage,
    /// The JSON had a `type` this server does not know.
    UnknownMessageType,
    /// A known message at the wrong moment: a request before hello, a second hello.
    UnexpectedMessage,
    /// The protocol version is outside the range the server speaks.
    UnsupportedProtocol,
    /// A wrong admin password, or an admin request without an admin login.
    Unauthorized,
    /// Too many failed logins from this address within a minute.
    Throttled,
    /// A message above the size limit.
    MessageTooLarge,
    /// A binary frame; this protocol is JSON text only.
    BinaryNotSupported,
    /// The server holds as many sessions as it is configured for.
    ServerFull,
    /// The server could not do what was asked because of its own failure.
    Internal,
    /// An admin request needs the feed, which is not configured or not reachable.
    FeedUnavailable,
    /// The requested release is not in the feed.
    ReleaseNotFound,
    /// The requested release is not newer than the installed one.
    NotNewer,
    /// Another download or changeover is already running.
    Busy,
    /// The request is not valid (a grace period out of range, a time in the past).
    InvalidRequest,
    /// Nothing to cancel.
    NothingToCancel,
    /// The server is updating: no sessions until it is back.
    Updating,
    /// A code this build does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Codes that answer an admin request; the connection stays open after them.
    pub fn is_request_error(self) -> bool {
        matches!(
            self,
            ErrorCode::FeedUnavailable
                | ErrorCode::ReleaseNotFound
                | ErrorCode::NotNewer
                | ErrorCode::Busy
                | ErrorCode::InvalidRequest
                | ErrorCode::NothingToCancel
        )
    }
}

/// Where a package came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackageSource {
    /// Downloaded from the feed.
    Feed,
    /// Dropped into the server's inbox folder (sites without internet access).
    Inbox,
    /// A source this build does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for PackageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PackageSource::Feed => "feed",
            PackageSource::Inbox => "inbox",
            PackageSource::Unknown => "unknown",
        })
    }
}

/// The server's state as an admin sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub server_version: String,
    /// The newest release (in the feed, or a verified package) when it is newer than the
    /// installed one, else null.
    pub available_version: Option<String>,
    pub phase: ChangeoverPhase,
    /// What the server last learnt from its feed.
    #[serde(default)]
    pub feed: FeedStatus,
    /// The verified package a changeover would install, or the one being downloaded.
    #[serde(default)]
    pub candidate: Option<CandidateStatus>,
    /// Why the last package was refused, if one was.
    #[serde(default)]
    pub last_refusal: Option<String>,
    /// The changeover scheduled or running, if any.
    #[serde(default)]
    pub changeover: Option<ChangeoverView>,
    /// How the last changeover ended.
    #[serde(default)]
    pub last_changeover: Option<ChangeoverSummary>,
    /// Mail to the admin still waiting to be sent, oldest first; absent when none waits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<OutboxEntry>,
    /// Why mail to the admin cannot be sent at all (no `mail.smtp_url` configured); absent
    /// when mail is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mail_problem: Option<String>,
    /// The agent release the server offers to older agents (its own version, from the
    /// feed or the inbox), or null when it has none.
    #[serde(default)]
    pub agent_release: Option<String>,
    /// Connected agents older than `agent_release`.
    #[serde(default)]
    pub agents_behind: u64,
    /// The vendor's applications the server supervises (from the release's `app.toml`),
    /// in start order; empty when the release has none.
    #[serde(default)]
    pub apps: Vec<AppStatus>,
    /// What the server cannot write to disk now (a full disk): each a sentence naming the
    /// file and the error; absent when every write works. The server serves on meanwhile
    /// and writes each as soon as there is room.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_problems: Vec<String>,
    /// Past changeovers, newest first (at most [`MAX_LISTED_HISTORY`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<ChangeoverSummary>,
    /// The latest admin actions, newest first (at most [`MAX_LISTED_AUDIT`]); the whole
    /// log is `state/audit.jsonl`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<AuditEntry>,
    /// Where the web console is served (`http://…/console/`), or absent when it is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_url: Option<String>,
    /// The connected agent sessions, oldest first: all of them, or the oldest
    /// [`MAX_LISTED_SESSIONS`](crate::MAX_LISTED_SESSIONS) when there are more.
    pub sessions: Vec<SessionView>,
    /// How many agent sessions are connected, listed or not.
    #[serde(default)]
    pub sessions_total: u64,
}

/// One supervised application of the installed release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStatus {
    /// Its name in `app.toml`.
    pub name: String,
    pub state: AppState,
    /// The process id while it runs, else null.
    pub pid: Option<u32>,
    /// How often the server started it again after it died.
    pub restarts: u32,
    /// The last health probe: `ok`, or why it failed; null before the first probe or when
    /// the application has none.
    #[serde(default)]
    pub health: Option<String>,
    /// When its last probe ran.
    #[serde(default, with = "optional_rfc3339")]
    pub health_at: Option<SystemTime>,
    /// Why it last stopped or was given up, if it did.
    #[serde(default)]
    pub last_exit: Option<String>,
}

/// Where a supervised application is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppState {
    /// Started; its health probe has not passed yet.
    Starting,
    /// Running; it has no probe, or its last probe failed after it had passed.
    Running,
    /// Running and its last health probe passed.
    Healthy,
    /// Being stopped: SIGTERM sent, SIGKILL after its stop timeout.
    Stopping,
    /// Not running: stopped by the server, or waiting to be started again after it died.
    Stopped,
    /// It kept dying soon after each start; the server gave up restarting it.
    Crashed,
    /// A state this build does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl AppState {
    pub fn as_str(self) -> &'static str {
        match self {
            AppState::Starting => "starting",
            AppState::Running => "running",
            AppState::Healthy => "healthy",
            AppState::Stopping => "stopping",
            AppState::Stopped => "stopped",
            AppState::Crashed => "crashed",
            AppState::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for AppState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A mail waiting in the server's outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub message_id: String,
    /// The recipient, or null for the configured default.
    pub to: Option<String>,
    pub subject: String,
    #[serde(with = "rfc3339")]
    pub queued_at: SystemTime,
    pub attempts: u32,
    /// Why the last try failed.
    pub last_error: Option<String>,
}

/// Past changeovers a status report lists.
pub const MAX_LISTED_HISTORY: usize = 20;
/// Audit log entries a status report lists.
pub const MAX_LISTED_AUDIT: usize = 50;

/// One admin action, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
    /// Who acted: `admin` (the one admin account).
    pub actor: String,
    /// The client's address as the server saw it.
    pub address: String,
    /// `cli` (an admin command over the WebSocket) or `console` (the web console).
    pub via: String,
    /// `login`, `logout`, `update`, `cancel` or `download`.
    pub action: String,
    /// What was asked: the version, grace, time, recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `ok`, `refused` (with the reason) or `throttled`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The feed as the server last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedStatus {
    /// The configured feed, or null when the server updates only from its inbox.
    pub url: Option<String>,
    /// When the feed was last read successfully.
    #[serde(default, with = "optional_rfc3339")]
    pub checked_at: Option<SystemTime>,
    /// The newest server release the feed offers for this platform.
    pub newest_version: Option<String>,
    /// What changed in it, as the vendor wrote it; absent when the feed says nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_notes: Option<String>,
    /// Why the last check failed, if it did.
    pub error: Option<String>,
}

/// A package on its way to being installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateStatus {
    pub version: String,
    pub source: PackageSource,
    #[serde(flatten)]
    pub state: CandidateState,
}

/// How far a candidate package is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CandidateState {
    /// Being downloaded.
    Downloading { bytes: u64, size: u64 },
    /// Verified and waiting in the downloads folder.
    Ready,
    /// A state this build does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

/// Where the server is in a changeover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeoverPhase {
    /// No changeover is scheduled or running.
    Idle,
    /// Waiting for the time the admin chose.
    Scheduled,
    /// Fetching, verifying, unpacking and checking the release; nobody is disturbed yet.
    Preparing,
    /// Every session has been warned; the deadline approaches.
    CountingDown,
    /// The deadline passed: the remaining sessions are being logged out.
    LoggingOut,
    /// The server stops taking work and writes what it holds.
    Stopping,
    /// Preferences, backups and certificates move into the new release.
    CarryingOver,
    /// The old install becomes `<name>_old`, the new one takes its place.
    Swapping,
    /// The server restarts as the new release.
    Restarting,
    /// The new release checks itself before the old one is deleted.
    HealthCheck,
    /// The new release failed; the old one is being put back.
    RollingBack,
    /// A phase this build does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl ChangeoverPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeoverPhase::Idle => "idle",
            ChangeoverPhase::Scheduled => "scheduled",
            ChangeoverPhase::Preparing => "preparing",
            ChangeoverPhase::CountingDown => "counting_down",
            ChangeoverPhase::LoggingOut => "logging_out",
            ChangeoverPhase::Stopping => "stopping",
            ChangeoverPhase::CarryingOver => "carrying_over",
            ChangeoverPhase::Swapping => "swapping",
            ChangeoverPhase::Restarting => "restarting",
            ChangeoverPhase::HealthCheck => "health_check",
            ChangeoverPhase::RollingBack => "rolling_back",
            ChangeoverPhase::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ChangeoverPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a changeover ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeoverOutcome {
    /// The new release runs, is healthy, and the old one is deleted.
    Committed,
    /// The new release failed after the swap; the old one runs again.
    RolledBack,
    /// Stopped before anything changed (a failed check, an interrupted preparation).
    Failed,
    /// The admin called it off before the deadline.
    Cancelled,
    /// An outcome this build does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for ChangeoverOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChangeoverOutcome::Committed => "committed",
            ChangeoverOutcome::RolledBack => "rolled_back",
            ChangeoverOutcome::Failed => "failed",
            ChangeoverOutcome::Cancelled => "cancelled",
            ChangeoverOutcome::Unknown => "unknown",
        })
    }
}

/// The changeover in progress, as a status report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeoverView {
    pub changeover_id: String,
    pub from_version: String,
    pub target_version: String,
    pub phase: ChangeoverPhase,
    /// When it starts, for a scheduled changeover.
    #[serde(default, with = "optional_rfc3339")]
    pub scheduled_at: Option<SystemTime>,
    /// When the remaining sessions are logged out, once counting down.
    #[serde(default, with = "optional_rfc3339")]
    pub deadline: Option<SystemTime>,
}

/// How the last changeover ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeoverSummary {
    pub changeover_id: String,
    pub outcome: ChangeoverOutcome,
    pub from_version: String,
    pub target_version: String,
    /// The phase it ended in or failed at.
    pub phase: ChangeoverPhase,
    /// Why it did not commit, in words.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(with = "rfc3339")]
    pub started_at: SystemTime,
    #[serde(with = "rfc3339")]
    pub ended_at: SystemTime,
    /// From the last forced logout to the new version accepting sessions.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Sessions warned, and sessions still connected at the deadline.
    #[serde(default)]
    pub sessions_warned: u64,
    #[serde(default)]
    pub sessions_logged_out: u64,
}

/// One connected agent, as listed in a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    pub session_id: u64,
    pub agent_id: String,
    pub user: String,
    pub host: String,
    pub platform: String,
    pub agent_version: String,
    pub protocol_version: u32,
    /// The agent's address as the server sees it.
    pub address: String,
    /// When the session began, RFC 3339 in UTC.
    #[serde(with = "rfc3339")]
    pub connected_since: SystemTime,
    /// The agent's own update, when one was offered in this session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<AgentUpdateView>,
    /// The agent id this agent came with, when another workstation was connected with it
    /// already (a cloned disk image): the server gave this one `agent_id` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<String>,
}

/// An agent's own update as the status report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUpdateView {
    pub version: String,
    pub state: AgentUpdateState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Why a text frame could not be read as a [`ClientMessage`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a JSON object: {reason}")]
    NotJson { reason: String },
    #[error("unknown message type {message_type:?}")]
    UnknownType { message_type: String },
    #[error("invalid {message_type:?} message: {reason}")]
    InvalidFields {
        message_type: String,
        reason: String,
    },
}

impl DecodeError {
    /// The error code to answer this with.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::UnknownType { .. } => ErrorCode::UnknownMessageType,
            DecodeError::NotJson { .. } | DecodeError::InvalidFields { .. } => {
                ErrorCode::MalformedMessage
            }
        }
    }
}

impl ClientMessage {
    /// The message's `type` name, for logs.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientMessage::Hello(_) => "hello",
            ClientMessage::AdminLogin { .. } => "admin_login",
            ClientMessage::StatusRequest => "status_request",
            ClientMessage::DownloadRequest { .. } => "download_request",
            ClientMessage::UpdateRequest { .. } => "update_request",
            ClientMessage::CancelRequest => "cancel_request",
            ClientMessage::AgentUpdateReport { .. } => "agent_update_report",
        }
    }

    /// Reads one text frame, telling apart broken JSON, an unknown type and bad fields.
    pub fn decode(text: &str) -> Result<ClientMessage, DecodeError> {
        match serde_json::from_str(text) {
            Ok(message) => Ok(message),
            Err(first_error) => Err(Self::classify(text, first_error)),
        }
    }

    // Only on the error path: parse again loosely to say what exactly was wrong.
    fn classify(text: &str, first_error: serde_json::Error) -> DecodeError {
        #[derive(Deserialize)]
        struct Envelope {
            #[serde(rename = "type")]
            message_type: String,
        }
        const KNOWN_TYPES: [&str; 7] = [
            "hello",
            "admin_login",
            "status_request",
            "download_request",
            "update_request",
            "cancel_request",
            "agent_update_report",
        ];

        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(value) => value,
            Err(err) => {
                return DecodeError::NotJson {
                    reason: err.to_string(),
                };
            }
        };
        match Envelope::deserialize(&value) {
            Ok(envelope) if KNOWN_TYPES.contains(&envelope.message_type.as_str()) => {
                DecodeError::InvalidFields {
                    message_type: envelope.message_type,
                    reason: first_error.to_string(),
                }
            }
            Ok(envelope) => DecodeError::UnknownType {
                message_type: envelope.message_type,
            },
            Err(_) => DecodeError::NotJson {
                reason: "expected an object with a string field \"type\"".to_owned(),
            },
        }
    }
}

/// The grace period when an update request names none: two minutes.
pub const DEFAULT_GRACE_SECS: u64 = 120;

/// The longest grace period accepted.
pub const MAX_GRACE_SECS: u64 = 3600;

/// A warning's English `message` when the admin wrote none: what an agent that builds its
/// own text compares `message` with, to tell an older server's default from the admin's
/// words (an older server sends no `admin_message`).
pub fn default_warning_message(target_version: &str) -> String {
    format!(
        "The server will be updated to version {target_version}. Please save your work and close the application."
    )
}

fn default_grace_secs() -> u64 {
    DEFAULT_GRACE_SECS
}

/// Timestamps on the wire: RFC 3339, UTC, whole seconds.
pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_seconds(*time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

/// Optional timestamps with milliseconds (RFC 3339), for durations measured from them.
pub mod optional_rfc3339_millis {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        time: &Option<SystemTime>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match time {
            Some(time) => serializer.collect_str(&humantime::format_rfc3339_millis(*time)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Optional timestamps on the wire: RFC 3339 or null.
pub mod optional_rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        time: &Option<SystemTime>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match time {
            Some(time) => serializer.collect_str(&humantime::format_rfc3339_seconds(*time)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_tells_broken_json_from_unknown_types_and_bad_fields() {
        assert!(matches!(
            ClientMessage::decode("{not json"),
            Err(DecodeError::NotJson { .. })
        ));
        assert!(matches!(
            ClientMessage::decode("[1,2]"),
            Err(DecodeError::NotJson { .. })
        ));
        assert_eq!(
            ClientMessage::decode(r#"{"type":"launch_rockets"}"#),
            Err(DecodeError::UnknownType {
                message_type: "launch_rockets".to_owned()
            })
        );
        let bad_fields = ClientMessage::decode(r#"{"type":"hello","user":"x"}"#).unwrap_err();
        assert!(matches!(bad_fields, DecodeError::InvalidFields { .. }));
        assert_eq!(bad_fields.error_code(), ErrorCode::MalformedMessage);
        assert_eq!(
            ClientMessage::decode(r#"{"type":"status_request"}"#),
            Ok(ClientMessage::StatusRequest)
        );
    }

    #[test]
    fn unknown_codes_and_phases_from_a_newer_server_still_parse() {
        let message: ServerMessage =
            serde_json::from_str(r#"{"type":"error","code":"brand_new","message":"m"}"#).unwrap();
        assert_eq!(message, ServerMessage::error(ErrorCode::Unknown, "m"));
        let phase: ChangeoverPhase = serde_json::from_str(r#""warp_drive""#).unwrap();
        assert_eq!(phase, ChangeoverPhase::Unknown);
    }

    // The admin's words and the version came later than the English texts: a server that
    // sends only those still reads, and messages without the new fields leave them out.
    #[test]
    fn changeover_messages_from_an_older_server_read_without_the_structured_fields() {
        let warning: ServerMessage = serde_json::from_str(
            r#"{"type":"warning","changeover_id":"co-1","deadline":"2026-11-28T12:32:08Z",
                "seconds_left":5,"target_version":"2.4.0","message":"m"}"#,
        )
        .unwrap();
        assert!(matches!(
            &warning,
            ServerMessage::Warning {
                admin_message: None,
                ..
            }
        ));
        assert!(
            !serde_json::to_string(&warning)
                .unwrap()
                .contains("admin_message")
        );
        let logout: ServerMessage = serde_json::from_str(
            r#"{"type":"logout","changeover_id":"co-1","reason":"r","reconnect_within_ms":2004}"#,
        )
        .unwrap();
        assert_eq!(
            logout,
            ServerMessage::Logout {
                changeover_id: "co-1".to_owned(),
                reason: "r".to_owned(),
                reconnect_within_ms: 2004,
                target_version: None,
                admin_message: None,
            }
        );
        let cancelled: ServerMessage = serde_json::from_str(
            r#"{"type":"update_cancelled","changeover_id":"co-1","message":"m"}"#,
        )
        .unwrap();
        assert!(matches!(
            cancelled,
            ServerMessage::UpdateCancelled {
                target_version: None,
                ..
            }
        ));
    }
}
