//! The task that runs a changeover in the server: it feeds the state machine, takes the
//! actions it asks for, journals each step before taking it, and tells admins and agents.
//!
//! One task owns the changeover; connections talk to it through a [`ChangeoverHandle`].
//! In the old process it goes from the request to the restart; the new process picks the
//! journal up in `recovery.rs` and finishes with the health check.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use changeover_protocol::messages::{DEFAULT_GRACE_SECS, MAX_GRACE_SECS};
use changeover_protocol::{
    ChangeoverOutcome, ChangeoverPhase, ChangeoverSummary, ChangeoverView, ErrorCode, ServerMessage,
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use super::journal::{FolderId, Journal, JournalFiles, ReleaseIds};
use super::machine::{self, Action, Event};
use super::{carry, fault_point, preflight};
use crate::hub::HubHandle;
use crate::layout::Layout;
use crate::listener::ListenerControl;
use crate::releases::{ReadyPackage, Releases, RequestRefusal};

/// Seconds before the deadline at which the warning is repeated.
const WARNING_MARKS: [u64; 4] = [60, 30, 10, 5];

/// Whether a phase comes after the deadline, when nothing can be called off any more.
fn past_deadline(phase: ChangeoverPhase) -> bool {
    !matches!(
        phase,
        ChangeoverPhase::Idle
            | ChangeoverPhase::Scheduled
            | ChangeoverPhase::Preparing
            | ChangeoverPhase::CountingDown
    )
}

/// What an admin asked for.
#[derive(Debug, Clone)]
pub struct UpdateParams {
    pub version: Option<String>,
    pub grace_secs: u64,
    pub notify: Option<String>,
    pub message: Option<String>,
    pub at: Option<SystemTime>,
    pub allow_downgrade: bool,
}

impl UpdateParams {
    /// Checks the request before anything starts.
    pub fn validate(&self) -> Result<(), RequestRefusal> {
        if self.grace_secs > MAX_GRACE_SECS {
            return Err(refusal(
                ErrorCode::InvalidRequest,
                format!(
                    "a grace period of {} s is out of range: 0 to {MAX_GRACE_SECS} s (default {DEFAULT_GRACE_SECS})",
                    self.grace_secs
                ),
            ));
        }
        if let Some(at) = self.at
            && at < SystemTime::now() - Duration::from_secs(60)
        {
            return Err(refusal(
                ErrorCode::InvalidRequest,
                "the scheduled time is in the past",
            ));
        }
        Ok(())
    }
}

fn refusal(code: ErrorCode, message: impl Into<String>) -> RequestRefusal {
    RequestRefusal {
        code,
        message: message.into(),
    }
}

#[derive(Debug)]
pub enum Command {
    Start {
        params: UpdateParams,
        reply: oneshot::Sender<Result<ChangeoverView, RequestRefusal>>,
    },
    Cancel {
        reply: oneshot::Sender<Result<String, RequestRefusal>>,
    },
}

/// How connections reach the changeover.
#[derive(Debug, Clone)]
pub struct ChangeoverHandle {
    commands: mpsc::Sender<Command>,
    view: watch::Receiver<Option<ChangeoverView>>,
    files: JournalFiles,
}

impl ChangeoverHandle {
    pub async fn start(&self, params: UpdateParams) -> Result<ChangeoverView, RequestRefusal> {
        params.validate()?;
        // Past its deadline the driver is busy with the steps and reads no requests.
        if let Some(view) = self.current()
            && past_deadline(view.phase)
        {
            return Err(refusal(
                ErrorCode::Busy,
                format!(
                    "changeover {} is already {}",
                    view.changeover_id, view.phase
                ),
            ));
        }
        let (reply, response) = oneshot::channel();
        self.commands
            .send(Command::Start { params, reply })
            .await
            .map_err(|_| refusal(ErrorCode::Internal, "the changeover task has stopped"))?;
        response.await.unwrap_or_else(|_| {
            Err(refusal(
                ErrorCode::Internal,
                "the changeover task has stopped",
            ))
        })
    }

    pub async fn cancel(&self) -> Result<String, RequestRefusal> {
        if let Some(view) = self.current()
            && past_deadline(view.phase)
        {
            return Err(refusal(
                ErrorCode::NothingToCancel,
                format!(
                    "too late to cancel changeover {}: it is {} (the sessions were logged out)",
                    view.changeover_id, view.phase
                ),
            ));
        }
        let (reply, response) = oneshot::channel();
        self.commands
            .send(Command::Cancel { reply })
            .await
            .map_err(|_| refusal(ErrorCode::Internal, "the changeover task has stopped"))?;
        response.await.unwrap_or_else(|_| {
            Err(refusal(
                ErrorCode::Internal,
                "the changeover task has stopped",
            ))
        })
    }

    /// The changeover scheduled or running.
    pub fn current(&self) -> Option<ChangeoverView> {
        self.view.borrow().clone()
    }

    /// How the last one ended.
    pub fn last(&self) -> Option<ChangeoverSummary> {
        self.files.last().ok().flatten()
    }

    /// Past changeovers, newest first.
    pub fn history(&self, limit: usize) -> Vec<ChangeoverSummary> {
        self.files.history(limit)
    }
}

/// What the driver works with.
#[derive(Debug)]
pub struct Collaborators {
    pub layout: Layout,
    pub carry_paths: Vec<String>,
    pub hub: HubHandle,
    pub releases: Arc<Releases>,
    pub listener: Arc<ListenerControl>,
    /// The vendor's applications: stopped before the carry-over, started again after a
    /// rollback in this process.
    pub apps: crate::apps::Apps,
    pub server_version: String,
    /// Arguments the new process is started with (`run --root … --listen …`).
    pub restart_args: Vec<std::ffi::OsString>,
    /// The new release's health timeout, which the watchdog extends a little.
    pub health_timeout: Duration,
    /// Whether to start the watchdog (`[changeover] watchdog`).
    pub watchdog: bool,
    /// `[mail] language`, kept in the journal for whichever process writes the mail.
    pub mail_language: crate::mail::MailLanguage,
    /// What the server can take, which sizes the window the agents return over.
    pub handshake_rate: Arc<crate::handshake_rate::HandshakeRate>,
}

/// How much longer than its health timeout the watchdog gives a new release.
const WATCHDOG_MARGIN: Duration = Duration::from_secs(3);

/// The changeover task.
#[derive(Debug)]
pub struct Driver {
    parts: Collaborators,
    files: JournalFiles,
    phase: ChangeoverPhase,
    journal: Option<Journal>,
    view: watch::Sender<Option<ChangeoverView>>,
    /// After the logout: ends when every logged-out connection has written its close.
    closing: Option<mpsc::Receiver<()>>,
    /// The listening socket, taken from the accept loop at the logout: agents returning
    /// before the new release takes sessions wait in its backlog instead of being refused.
    paused: Option<tokio::net::TcpListener>,
}

/// The longest the stop waits for logged-out connections to write their logout.
const LOGOUT_FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// The driver's side of the channel [`channel`] creates.
#[derive(Debug)]
pub struct DriverInbox {
    commands: mpsc::Receiver<Command>,
    view: watch::Sender<Option<ChangeoverView>>,
}

/// The handle connections use, and the inbox the driver will read.
pub fn channel(state_dir: &std::path::Path) -> (ChangeoverHandle, DriverInbox) {
    let (commands, receiver) = mpsc::channel(16);
    let (view, view_receiver) = watch::channel(None);
    let handle = ChangeoverHandle {
        commands,
        view: view_receiver,
        files: JournalFiles::new(state_dir),
    };
    (
        handle,
        DriverInbox {
            commands: receiver,
            view,
        },
    )
}

impl Driver {
    pub fn new(parts: Collaborators, inbox: DriverInbox) -> (Driver, mpsc::Receiver<Command>) {
        let files = JournalFiles::new(&parts.layout.state_dir());
        let driver = Driver {
            parts,
            files,
            phase: ChangeoverPhase::Idle,
            journal: None,
            view: inbox.view,
            closing: None,
            paused: None,
        };
        (driver, inbox.commands)
    }

    /// Serves requests until the process ends (or restarts as the new release).
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        while let Some(command) = commands.recv().await {
            match command {
                Command::Cancel { reply } => {
                    let _ = reply.send(Err(refusal(
                        ErrorCode::NothingToCancel,
                        "no changeover is scheduled or counting down",
                    )));
                }
                Command::Start { params, reply } => {
                    let accepted = self.begin(&params).await;
                    let view = accepted.as_ref().ok().cloned();
                    let _ = reply.send(accepted);
                    if view.is_some() {
                        self.drive(params, &mut commands).await;
                    }
                }
            }
        }
    }

    /// Picks the release and writes the journal; answers the admin.
    async fn begin(&mut self, params: &UpdateParams) -> Result<ChangeoverView, RequestRefusal> {
        if let Ok(Some(unfinished)) = self.files.load() {
            if crate::unwritten::is_failing(super::journal::UNWRITTEN_SUMMARY) {
                return Err(refusal(
                    ErrorCode::Busy,
                    format!(
                        "changeover {} is over, but how it ended cannot be recorded: the disk \
                         is full (see disk_problems in the status); free some space and it is \
                         recorded within seconds, then a changeover can start",
                        unfinished.changeover_id
                    ),
                ));
            }
            return Err(refusal(
                ErrorCode::Busy,
                format!(
                    "changeover {} is not finished ({}); restart the server to finish it first",
                    unfinished.changeover_id,
                    unfinished
                        .failure
                        .as_deref()
                        .unwrap_or("its journal is still there")
                ),
            ));
        }
        let target = self.pick_target(params).await?;
        // Blank words are no words: the agents' own sentence says it all.
        let admin_message = params
            .message
            .clone()
            .filter(|words| !words.trim().is_empty());
        let id = format!(
            "co-{}",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|age| age.as_millis())
                .unwrap_or(0)
        );
        let journal = Journal {
            changeover_id: id,
            phase: ChangeoverPhase::Idle,
            from_version: self.parts.server_version.clone(),
            target_version: target.to_string(),
            archive: PathBuf::new(),
            grace_secs: params.grace_secs,
            notify: params.notify.clone(),
            message: admin_message.clone().unwrap_or_else(|| {
                changeover_protocol::messages::default_warning_message(&target.to_string())
            }),
            admin_message,
            mail_language: self.parts.mail_language,
            started_at: SystemTime::now(),
            scheduled_at: params.at,
            deadline: None,
            stopped_at: None,
            moved: Vec::new(),
            carried: Vec::new(),
            carried_checked: false,
            starts_after_swap: 0,
            failure: None,
            sessions_warned: 0,
            sessions_logged_out: 0,
            agent_release: None,
            agents_to_update: 0,
            releases: None,
            committing: false,
        };
        self.journal = Some(journal);
        let scheduled = params.at.is_some_and(|at| at > SystemTime::now());
        self.apply(Event::Requested { scheduled })
            .map_err(|err| refusal(ErrorCode::Busy, err.to_string()))?;
        Ok(self.view_now())
    }

    async fn pick_target(&self, params: &UpdateParams) -> Result<semver::Version, RequestRefusal> {
        let releases = &self.parts.releases;
        let installed = &releases.settings().installed_version;
        let wanted = params
            .version
            .as_deref()
            .map(|text| {
                text.parse::<semver::Version>().map_err(|err| {
                    refusal(
                        ErrorCode::InvalidRequest,
                        format!("{text:?} is not a version: {err}"),
                    )
                })
            })
            .transpose()?;
        if let Some(version) = &wanted {
            if version <= installed
                && !params.allow_downgrade
                && !releases.settings().allow_downgrade
            {
                return Err(refusal(
                    ErrorCode::NotNewer,
                    format!("server {version} is not newer than the installed {installed}"),
                ));
            }
            return Ok(version.clone());
        }
        // An admin waiting for an answer gets a fresh look at the feed.
        let _ = tokio::time::timeout(Duration::from_secs(10), releases.check_feed()).await;
        releases
            .available_version()
            .and_then(|version| version.parse().ok())
            .ok_or_else(|| {
                refusal(
                    ErrorCode::ReleaseNotFound,
                    format!("no release newer than the installed {installed} is available (feed or inbox)"),
                )
            })
    }

    /// Runs the changeover until it ends or the process restarts.
    async fn drive(&mut self, params: UpdateParams, commands: &mut mpsc::Receiver<Command>) {
        // A scheduled changeover waits, cancellable.
        if self.phase == ChangeoverPhase::Scheduled {
            let at = params.at.unwrap_or_else(SystemTime::now);
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    command = commands.recv() => match command {
                        Some(command) => if self.handle_meanwhile(command) { return; },
                        None => return,
                    },
                }
            }
            if self.apply(Event::StartTimeReached).is_err() {
                return;
            }
        }

        // Preparing: cancellable; nobody is disturbed yet.
        let prepared = {
            let target = self
                .journal
                .as_ref()
                .map(|j| j.target_version.clone())
                .unwrap_or_default();
            let prepare = prepare(
                self.parts.layout.clone(),
                self.parts.carry_paths.clone(),
                Arc::clone(&self.parts.releases),
                params.version.clone().unwrap_or(target),
                params.allow_downgrade,
            );
            tokio::pin!(prepare);
            loop {
                tokio::select! {
                    result = &mut prepare => break Some(result),
                    command = commands.recv() => match command {
                        Some(Command::Cancel { reply }) => {
                            let _ = reply.send(Ok(self.id()));
                            break None;
                        }
                        Some(command) => { self.handle_meanwhile(command); }
                        None => return,
                    },
                }
            }
        };
        match prepared {
            None => {
                let _ = std::fs::remove_dir_all(preflight::staging_dir(&self.parts.layout));
                let _ = self.apply(Event::CancelRequested);
                return;
            }
            Some(Err(err)) => {
                let reason = format!("{err:#}");
                warn!(%reason, "preflight failed; nobody was warned");
                let _ = std::fs::remove_dir_all(preflight::staging_dir(&self.parts.layout));
                let _ = self.apply(Event::PrepareFailed(reason));
                return;
            }
            Some(Ok(prepared)) => {
                if let Some(journal) = self.journal.as_mut() {
                    journal.archive = prepared.archive;
                    journal.carried = prepared.carried;
                    journal.agent_release = prepared.agent_release;
                }
            }
        }
        if self.apply(Event::Prepared).is_err() {
            return;
        }

        // Counting down: warnings at the marks; cancellable until the deadline.
        if !self.count_down(commands).await {
            return;
        }
        self.after_deadline().await;
    }

    // Requests that arrive while a changeover runs: a second start is refused, a cancel
    // ends a scheduled changeover. Returns whether the changeover ended.
    fn handle_meanwhile(&mut self, command: Command) -> bool {
        match command {
            Command::Start { reply, .. } => {
                let _ = reply.send(Err(refusal(
                    ErrorCode::Busy,
                    format!("changeover {} is already {}", self.id(), self.phase),
                )));
                false
            }
            Command::Cancel { reply } => match self.apply(Event::CancelRequested) {
                Ok(()) => {
                    let _ = reply.send(Ok(self.last_id()));
                    true
                }
                Err(err) => {
                    let _ = reply.send(Err(refusal(ErrorCode::NothingToCancel, err.to_string())));
                    false
                }
            },
        }
    }

    async fn count_down(&mut self, commands: &mut mpsc::Receiver<Command>) -> bool {
        let grace = Duration::from_secs(self.journal.as_ref().map_or(0, |j| j.grace_secs));
        let deadline_at = SystemTime::now() + grace;
        let deadline = tokio::time::Instant::now() + grace;
        let warned = self.parts.hub.session_count().await as u64;
        if let Some(journal) = self.journal.as_mut() {
            journal.deadline = Some(deadline_at);
            journal.sessions_warned = warned;
        }
        self.save();
        self.view.send_replace(Some(self.view_now()));
        let sessions = if warned == 1 { "session" } else { "sessions" };
        self.publish_progress(format!(
            "{warned} {sessions} warned; logout in {} s",
            grace.as_secs()
        ));
        let mut marks: Vec<u64> = WARNING_MARKS
            .iter()
            .copied()
            .filter(|mark| *mark < grace.as_secs())
            .collect();
        self.warn(deadline_at, grace.as_secs()).await;
        loop {
            let next_mark = marks
                .first()
                .map(|mark| deadline - Duration::from_secs(*mark));
            let wake = next_mark.unwrap_or(deadline);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {
                    if let Some(mark) = next_mark.and(marks.first().copied()) {
                        marks.remove(0);
                        self.warn(deadline_at, mark).await;
                    } else {
                        break;
                    }
                }
                command = commands.recv() => match command {
                    Some(Command::Cancel { reply }) => {
                        let id = self.id();
                        if self.apply(Event::CancelRequested).is_ok() {
                            let _ = reply.send(Ok(id));
                            return false;
                        }
                    }
                    Some(command) => { self.handle_meanwhile(command); }
                    None => return false,
                },
            }
        }
        self.parts.hub.set_notice(None).await;
        true
    }

    async fn warn(&self, deadline: SystemTime, seconds_left: u64) {
        let Some(journal) = &self.journal else { return };
        let warning = ServerMessage::Warning {
            changeover_id: journal.changeover_id.clone(),
            deadline,
            seconds_left,
            target_version: journal.target_version.clone(),
            message: journal.message.clone(),
            admin_message: journal.admin_message.clone(),
        };
        self.parts.hub.set_notice(Some(&warning)).await;
        let reached = self.parts.hub.broadcast(&warning);
        info!(seconds_left, reached, "countdown warning sent");
    }

    // From the deadline to the restart, each step journaled before it is taken; a failure
    // puts everything back and the old release serves again.
    async fn after_deadline(&mut self) {
        if self.apply(Event::DeadlineReached).is_err() {
            return;
        }
        if let Err(err) = self.log_out().await {
            return self.roll_back_here(err, None).await;
        }
        let _ = self.apply(Event::LoggedOut);
        let tcp = match self.stop().await {
            Ok(tcp) => tcp,
            Err(err) => return self.roll_back_here(err, None).await,
        };
        let _ = self.apply(Event::Stopped);
        fault_point("carrying_over");
        if let Err(err) = self.checkpoint().and_then(|()| self.carry_over()) {
            return self.roll_back_here(err, Some(tcp)).await;
        }
        let _ = self.apply(Event::CarriedOver);
        fault_point("swapping");
        if cfg!(windows) {
            return self.hand_over_to_swap_helper(tcp).await;
        }
        if let Err(err) = self.checkpoint().and_then(|()| self.swap()) {
            return self.roll_back_here(err, Some(tcp)).await;
        }
        let _ = self.apply(Event::Swapped);
        fault_point("restarting");
        if let Err(err) = self.checkpoint() {
            return self.roll_back_here(err, Some(tcp)).await;
        }
        let binary = self
            .parts
            .layout
            .install_dir()
            .join(changeover_protocol::release::ReleaseKind::Server.binary_path());
        if !self.parts.watchdog {
            info!("the watchdog is off ([changeover] watchdog = false)");
        } else if super::watchdog::under_service_manager() {
            info!("a service manager supervises the server: no watchdog needed");
        } else if let Some(journal) = &self.journal {
            let watch = self.watch_options(&journal.changeover_id);
            // Without it a new release that dies or hangs before its verdict would stay
            // down: the old release must not go on without one.
            if let Err(err) = super::watchdog::start(&watch, &tcp) {
                return self.roll_back_here(err, Some(tcp)).await;
            }
        }
        info!(binary = %binary.display(), "restarting as the new release");
        // Only returns if the new release could not be started at all.
        let err = crate::platform::reexec(&binary, &self.parts.restart_args, Some(&tcp));
        let err = anyhow::anyhow!("cannot start the new release {}: {err}", binary.display());
        self.roll_back_here(err, Some(tcp)).await;
    }

    /// What the watchdog or the swap helper is told: this process, the new release's
    /// patience, how the server runs.
    fn watch_options(&self, changeover_id: &str) -> super::watchdog::WatchOptions {
        super::watchdog::WatchOptions {
            root: self.parts.layout.root().to_owned(),
            name: self.parts.layout.name().to_owned(),
            changeover_id: changeover_id.to_owned(),
            pid: std::process::id(),
            patience: self.parts.health_timeout + WATCHDOG_MARGIN,
            service: crate::service::windows_service_name(),
            run_args: self.parts.restart_args.clone(),
        }
    }

    // Windows: the swap and the restart are the helper's, from outside both releases; this
    // process lets the port go and ends (as a service: reports itself stopped).
    async fn hand_over_to_swap_helper(&mut self, tcp: std::net::TcpListener) {
        let Some(journal) = &self.journal else { return };
        let options = self.watch_options(&journal.changeover_id);
        let layout = self.parts.layout.clone();
        let staging = preflight::staging_dir(&layout);
        if let Err(err) = self
            .checkpoint()
            .and_then(|()| super::swap_helper::start(&layout, &staging, &options))
        {
            return self.roll_back_here(err, Some(tcp)).await;
        }
        info!("the swap helper exchanges the releases and starts the new one; this process ends");
        drop(tcp);
        crate::service::exit_now(0);
    }

    // A step failed in this (old) process: undo, record, and serve again.
    async fn roll_back_here(&mut self, err: anyhow::Error, tcp: Option<std::net::TcpListener>) {
        let reason = format!("{err:#}");
        error!(%reason, "the changeover failed; putting the old release back");
        if self.apply(Event::StepFailed(reason.clone())).is_err() {
            return;
        }
        let undone = match self.journal.clone() {
            Some(journal) => {
                let layout = self.parts.layout.clone();
                tokio::task::spawn_blocking(move || super::recovery::undo(&layout, &journal))
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|result| result)
            }
            None => Ok(()),
        };
        if let Err(undo_err) = &undone {
            error!(cause = %format!("{undo_err:#}"), "could not undo everything");
        }
        let unfinished = undone.is_err();
        let reason = match undone {
            Ok(()) => reason,
            Err(undo_err) => format!(
                "{reason}; undoing it also failed: {undo_err:#}; the journal is kept, so the next \
                 start of the server finishes the rollback, and no changeover starts before"
            ),
        };
        if unfinished {
            self.keep_unfinished(reason);
            let _ = self.apply(Event::RolledBack);
        } else {
            let _ = self.apply(Event::RolledBack);
            self.finish(ChangeoverOutcome::RolledBack, Some(reason));
        }
        // The old release's applications run again, on the data as it was.
        if self.parts.apps.is_empty() {
            match crate::apps::Manifest::load(&self.parts.layout.install_dir()) {
                Ok(Some(manifest)) => self.parts.apps.start(&manifest),
                Ok(None) => {}
                Err(err) => {
                    error!(cause = %format!("{err:#}"), "cannot start the applications again")
                }
            }
        }
        self.parts.hub.reopen().await;
        let tcp = match (tcp, self.paused.take()) {
            (Some(tcp), _) => Some(tcp),
            (None, Some(paused)) => paused.into_std().ok(),
            (None, None) => self
                .parts
                .listener
                .pause()
                .await
                .and_then(|tcp| tcp.into_std().ok()),
        };
        if let Some(tcp) = tcp
            && let Ok(tcp) = tokio::net::TcpListener::from_std(tcp)
        {
            self.parts.listener.resume(tcp).await;
        }
    }

    async fn log_out(&mut self) -> anyhow::Result<()> {
        fault_point("logging_out");
        let sessions = self.parts.hub.sessions().await;
        let count = sessions.len();
        // Spread the return over the time the server needs to take everyone back at half
        // the handshake rate it measured: a second for a handful, two minutes at most.
        let (window, capacity) = self.parts.handshake_rate.reconnect_window(count);
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        info!(
            sessions = count,
            handshakes_per_sec = capacity.per_sec.round(),
            measured = capacity.measured,
            storms = capacity.storms,
            window_ms,
            "reconnect window"
        );
        let journal = self.journal()?;
        let agents_to_update = journal
            .target_version
            .parse::<semver::Version>()
            .map(|target| {
                sessions
                    .iter()
                    .filter(|session| {
                        session
                            .agent_version
                            .parse::<semver::Version>()
                            .is_ok_and(|running| running < target)
                    })
                    .count() as u64
            })
            .unwrap_or(0);
        let logout = ServerMessage::Logout {
            changeover_id: journal.changeover_id.clone(),
            reason: format!(
                "the server is being updated to version {}",
                journal.target_version
            ),
            reconnect_within_ms: window_ms,
            target_version: Some(journal.target_version.clone()),
            admin_message: journal.admin_message.clone(),
        };
        // No one is let in any more: who comes back early waits in the backlog and is taken
        // the moment the new release lets sessions in, instead of being refused now.
        self.paused = self.parts.listener.pause().await;
        let logged_out = self.parts.hub.log_out_all(&logout).await;
        self.closing = Some(logged_out.closing);
        let logged_out = logged_out.count as u64;
        let journal = self.journal_mut()?;
        journal.sessions_logged_out = logged_out;
        journal.agents_to_update = agents_to_update;
        info!(logged_out, "sessions logged out");
        Ok(())
    }

    async fn stop(&mut self) -> anyhow::Result<std::net::TcpListener> {
        fault_point("stopping");
        let tcp = match self.paused.take() {
            Some(paused) => paused,
            None => self
                .parts
                .listener
                .pause()
                .await
                .context("the listening socket is gone")?,
        };
        // The logged-out sessions are out of the table already; their connections write the
        // logout and the close frame before the process image goes, or their agents would
        // come back at once instead of spread over the announced window. With thousands of
        // agents on two cores that takes a few hundred milliseconds; a peer that does not
        // read is not waited for longer than the limit.
        if let Some(mut closing) = self.closing.take() {
            let started = std::time::Instant::now();
            let flushed = tokio::time::timeout(LOGOUT_FLUSH_LIMIT, closing.recv())
                .await
                .is_ok();
            info!(
                waited_ms = started.elapsed().as_millis() as u64,
                flushed, "logged-out connections closed"
            );
        }
        // The downtime runs from here: the last session's logout is written, and no one works
        // on this server any more.
        self.journal_mut()?.stopped_at = Some(SystemTime::now());
        // The applications stop before anything is carried, so their data is at rest.
        if !self.parts.apps.is_empty() {
            let started = std::time::Instant::now();
            self.parts.apps.stop_all().await;
            info!(
                took_ms = started.elapsed().as_millis() as u64,
                "applications stopped"
            );
        }
        fault_point("apps_stopped");
        tcp.into_std()
            .context("cannot take the listening socket out of the runtime")
    }

    fn carry_over(&mut self) -> anyhow::Result<()> {
        let layout = self.parts.layout.clone();
        let install = layout.install_dir();
        let staging = preflight::staging_dir(&layout);
        let paths = self.parts.carry_paths.clone();
        // Only what changed since the countdown's hashing is hashed again.
        let previous = self.journal()?.carried.clone();
        let carried = carry::record(&install, &paths, &previous)?;
        self.journal_mut()?.carried = carried.clone();
        self.save();
        for (index, path) in paths.iter().enumerate() {
            // A path the old release does not have is not carried, so a rollback will not
            // move the new release's own copy of it into the old one.
            if !install.join(path).exists() {
                continue;
            }
            self.journal_mut()?.moved.push(path.clone());
            self.checkpoint()?;
            carry::move_path(&install, &staging, path)?;
            if index == 0 {
                fault_point("carried_partly");
            }
        }
        carry::verify(&staging, &carried)
    }

    fn swap(&mut self) -> anyhow::Result<()> {
        let layout = self.parts.layout.clone();
        let Some(journal) = self.journal.as_mut() else {
            bail!("no changeover under way");
        };
        swap_releases(&layout, journal, &self.files)
    }

    fn apply(&mut self, event: Event) -> Result<(), machine::IllegalTransition> {
        let (next, actions) = machine::step(self.phase, event)?;
        self.set_phase(next);
        for action in actions {
            self.take(action);
        }
        Ok(())
    }

    // Synchronous bookkeeping actions happen here; the long ones are driven by `drive` and
    // `after_deadline`, which feed their results back through `apply`.
    fn take(&mut self, action: Action) {
        match action {
            Action::Prepare | Action::StartCountdown | Action::CheckHealth => {}
            Action::AnnounceCancel => {
                if let Some(journal) = &self.journal {
                    let cancelled = ServerMessage::UpdateCancelled {
                        changeover_id: journal.changeover_id.clone(),
                        message: "The announced update was called off; carry on working."
                            .to_owned(),
                        target_version: Some(journal.target_version.clone()),
                    };
                    let hub = self.parts.hub.clone();
                    tokio::spawn(async move {
                        hub.set_notice(None).await;
                        hub.broadcast(&cancelled);
                    });
                }
            }
            // The steps after the deadline are taken by `after_deadline` in order.
            Action::LogOutSessions
            | Action::Stop
            | Action::CarryOver
            | Action::Swap
            | Action::Restart => {}
            Action::Commit => {}
            Action::RollBack(reason) => {
                if let Some(journal) = self.journal.as_mut() {
                    journal.failure = Some(reason);
                }
            }
            Action::Finish(outcome, reason) => self.finish(outcome, reason),
        }
    }

    // A rollback that could not undo everything: reported and mailed, but the journal
    // stays (phase `rolling_back`) for the next start, and nothing may touch staging or
    // `<name>_old` until then.
    fn keep_unfinished(&mut self, reason: String) {
        let Some(mut journal) = self.journal.take() else {
            return;
        };
        journal.phase = ChangeoverPhase::RollingBack;
        journal.failure = Some(reason.clone());
        if let Err(err) = self.files.save(&journal) {
            error!(cause = %format!("{err:#}"), "cannot write the changeover journal");
        }
        let summary = summarize(
            &journal,
            ChangeoverOutcome::RolledBack,
            journal.phase,
            Some(reason),
        );
        if let Err(err) = self.files.report(&summary) {
            error!(cause = %format!("{err:#}"), "cannot record how the changeover ended");
        }
        self.parts
            .releases
            .publish(&ServerMessage::ChangeoverFinished(summary));
        self.view.send_replace(None);
    }

    fn finish(&mut self, outcome: ChangeoverOutcome, reason: Option<String>) {
        let Some(journal) = self.journal.take() else {
            return;
        };
        if matches!(
            outcome,
            ChangeoverOutcome::Cancelled | ChangeoverOutcome::Failed
        ) {
            // What the preflight unpacked is of no use any more.
            let staging = preflight::staging_dir(&self.parts.layout);
            if staging.exists()
                && let Err(err) = std::fs::remove_dir_all(&staging)
            {
                warn!(path = %staging.display(), cause = %err, "cannot remove the staging folder");
            }
        }
        let summary = summarize(&journal, outcome, journal.phase, reason);
        if let Err(err) = self.files.finish(&summary) {
            error!(cause = %format!("{err:#}"), "cannot record how the changeover ended");
        }
        info!(outcome = %summary.outcome, reason = ?summary.reason, "changeover ended");
        self.parts
            .releases
            .publish(&ServerMessage::ChangeoverFinished(summary));
        self.view.send_replace(None);
    }

    /// The new release checks its own health before this driver runs: the status report
    /// and every admin see that phase meanwhile, as they saw the ones before the restart.
    pub fn show_health_check(&self, journal: &Journal) {
        self.view.send_replace(Some(ChangeoverView {
            changeover_id: journal.changeover_id.clone(),
            from_version: journal.from_version.clone(),
            target_version: journal.target_version.clone(),
            phase: ChangeoverPhase::HealthCheck,
            scheduled_at: journal.scheduled_at,
            deadline: journal.deadline,
        }));
        self.parts
            .releases
            .publish(&ServerMessage::ChangeoverProgress {
                changeover_id: journal.changeover_id.clone(),
                phase: ChangeoverPhase::HealthCheck,
                detail: format!("release {} checks its health", journal.target_version),
            });
    }

    /// The health check is over (committed): no changeover is under way.
    pub fn clear_view(&self) {
        self.view.send_replace(None);
    }

    fn set_phase(&mut self, phase: ChangeoverPhase) {
        self.phase = phase;
        if phase != ChangeoverPhase::Idle {
            if let Some(journal) = self.journal.as_mut() {
                journal.phase = phase;
            }
            self.save();
            self.publish_progress(String::new());
        }
        let view = (phase != ChangeoverPhase::Idle).then(|| self.view_now());
        self.view.send_replace(view);
    }

    /// Writes the journal and fails if it cannot: a step is only taken once it is recorded.
    fn checkpoint(&self) -> anyhow::Result<()> {
        match &self.journal {
            Some(journal) => self
                .files
                .save(journal)
                .context("cannot write the changeover journal, so the step is not taken"),
            None => Ok(()),
        }
    }

    fn save(&self) {
        if let Some(journal) = &self.journal
            && let Err(err) = self.files.save(journal)
        {
            error!(cause = %format!("{err:#}"), "cannot write the changeover journal");
        }
    }

    fn publish_progress(&self, detail: String) {
        if let Some(journal) = &self.journal {
            self.parts
                .releases
                .publish(&ServerMessage::ChangeoverProgress {
                    changeover_id: journal.changeover_id.clone(),
                    phase: self.phase,
                    detail,
                });
        }
    }

    fn view_now(&self) -> ChangeoverView {
        let journal = self.journal.as_ref();
        ChangeoverView {
            changeover_id: self.id(),
            from_version: journal.map(|j| j.from_version.clone()).unwrap_or_default(),
            target_version: journal
                .map(|j| j.target_version.clone())
                .unwrap_or_default(),
            phase: self.phase,
            scheduled_at: journal.and_then(|j| j.scheduled_at),
            deadline: journal.and_then(|j| j.deadline),
        }
    }

    fn id(&self) -> String {
        self.journal
            .as_ref()
            .map(|j| j.changeover_id.clone())
            .unwrap_or_default()
    }

    fn last_id(&self) -> String {
        self.files
            .last()
            .ok()
            .flatten()
            .map(|summary| summary.changeover_id)
            .unwrap_or_default()
    }

    fn journal(&self) -> anyhow::Result<&Journal> {
        self.journal.as_ref().context("no changeover is under way")
    }

    fn journal_mut(&mut self) -> anyhow::Result<&mut Journal> {
        self.journal.as_mut().context("no changeover is under way")
    }
}

/// What the preflight found ready.
struct Prepared {
    /// The verified server package.
    archive: PathBuf,
    /// The carried files as recorded now.
    carried: Vec<super::journal::CarriedFile>,
    /// The agent release of the target version, when the feed (or inbox) had one.
    agent_release: Option<String>,
}

/// The preflight: everything checked before anyone is warned.
async fn prepare(
    layout: Layout,
    carry_paths: Vec<String>,
    releases: Arc<Releases>,
    target: String,
    allow_downgrade: bool,
) -> anyhow::Result<Prepared> {
    fault_point("preparing");
    let package = ready_package(&releases, &target, allow_downgrade).await?;
    // The agents' own release comes along now, so that it can be offered the moment they
    // reconnect; one that fails to verify stops the changeover before anyone is warned.
    let agent_releases = releases
        .fetch_agent_releases(&package.entry.version)
        .await
        .map_err(|reason| anyhow::anyhow!("cannot fetch the agent release: {reason}"))?;
    if agent_releases.is_empty() {
        warn!(
            version = %package.entry.version,
            "no agent release of this version in the feed or inbox; agents will not be offered an update"
        );
    } else {
        let platforms: Vec<&str> = agent_releases
            .iter()
            .map(|ready| ready.entry.platform.as_str())
            .collect();
        info!(version = %package.entry.version, ?platforms, "agent release ready to offer after the changeover");
    }
    let root = layout.root().to_owned();
    let archive = package.archive.clone();
    let staging = preflight::staging_dir(&layout);
    let install = layout.install_dir();
    let staging_for_unpack = staging.clone();
    let checked = Arc::clone(&releases);
    let carried = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        checked
            .verify_local(&archive, false)
            .map_err(|reason| anyhow::anyhow!("the package no longer verifies: {reason}"))?;
        preflight::check_space(&root, &archive)?;
        preflight::check_rights(&root)?;
        preflight::check_one_filesystem(&install, &carry_paths)?;
        preflight::check_not_held(&install, &carry_paths)?;
        preflight::unpack(&archive, &staging_for_unpack)?;
        // Hashed now, while people still work, so the downtime does not pay for it.
        carry::record(&install, &carry_paths, &[])
    })
    .await
    .context("the preflight task failed")??;
    preflight::self_check(&staging, &layout, &target).await?;
    // The new release's applications: a manifest it can run, and their own self-checks.
    if let Some(manifest) =
        crate::apps::Manifest::load(&staging).context("the new release's application list")?
    {
        manifest.check_programs(&staging)?;
        crate::apps::run_checks(&manifest, &staging).await?;
    }
    Ok(Prepared {
        archive: package.archive,
        carried,
        agent_release: (!agent_releases.is_empty()).then(|| package.entry.version.to_string()),
    })
}

/// The verified package for `version`, fetched from the feed first if need be.
async fn ready_package(
    releases: &Arc<Releases>,
    version: &str,
    allow_downgrade: bool,
) -> anyhow::Result<ReadyPackage> {
    let find = || {
        releases.snapshot().ready.into_iter().find(|package| {
            package.entry.kind == changeover_protocol::release::ReleaseKind::Server
                && package.entry.version.to_string() == version
        })
    };
    if let Some(package) = find() {
        return Ok(package);
    }
    let mut events = releases.subscribe_events();
    let parsed: semver::Version = version.parse().context("not a version")?;
    releases
        .start_download(Some(parsed), allow_downgrade)
        .await
        .map_err(|refusal| anyhow::anyhow!(refusal.message))?;
    loop {
        if let Some(package) = find() {
            return Ok(package);
        }
        match tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
            Ok(Ok(bytes)) => {
                if let Ok(ServerMessage::PackageRefused {
                    version: Some(refused),
                    reason,
                    ..
                }) = serde_json::from_str::<ServerMessage>(bytes.as_str())
                    && refused == version
                {
                    anyhow::bail!("the release could not be fetched: {reason}");
                }
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                anyhow::bail!("the server is shutting down")
            }
            Ok(Err(_)) | Err(_) => {}
        }
    }
}

/// How a journal ends, for the status and the admin.
pub fn summarize(
    journal: &Journal,
    outcome: ChangeoverOutcome,
    phase: ChangeoverPhase,
    reason: Option<String>,
) -> ChangeoverSummary {
    let ended_at = SystemTime::now();
    ChangeoverSummary {
        changeover_id: journal.changeover_id.clone(),
        outcome,
        from_version: journal.from_version.clone(),
        target_version: journal.target_version.clone(),
        phase,
        reason: reason.or_else(|| journal.failure.clone()),
        started_at: journal.started_at,
        ended_at,
        downtime_ms: None,
        sessions_warned: journal.sessions_warned,
        sessions_logged_out: journal.sessions_logged_out,
    }
}

/// Puts the staged release in place of the installed one and the old one at `<name>_old`,
/// the folders' identities journaled first so that recovery can tell them apart whatever
/// moment a crash comes. Taken by the old process on Unix, by the swap helper on Windows.
pub fn swap_releases(
    layout: &Layout,
    journal: &mut Journal,
    files: &JournalFiles,
) -> anyhow::Result<()> {
    let install = layout.install_dir();
    let staging = preflight::staging_dir(layout);
    let old = layout.old_install_dir();
    if old.exists() {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove a stale {}", old.display()))?;
    }
    let ids = match (FolderId::of(&install), FolderId::of(&staging)) {
        (Some(old), Some(new)) => ReleaseIds { old, new },
        _ => bail!(
            "{} or {} is not a folder",
            install.display(),
            staging.display()
        ),
    };
    journal.releases = Some(ids);
    files
        .save(journal)
        .context("cannot write the changeover journal, so the step is not taken")?;
    // One step on Linux: the start path is never missing, even if the power fails here.
    crate::platform::exchange(&staging, &install).with_context(|| {
        format!(
            "cannot exchange {} and {}",
            staging.display(),
            install.display()
        )
    })?;
    fault_point("swapped");
    crate::platform::rename_with_retries(&staging, &old)
        .with_context(|| format!("cannot rename the old release to {}", old.display()))
}
