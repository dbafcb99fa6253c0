//! Mail to the admin: written to an on-disk outbox first, sent from there.
//!
//! `<root>/state/outbox/` holds one JSON file per mail. A sender task sends what is due
//! over SMTP (lettre: `smtp://`, `smtp://…?tls=required`, `smtps://`), retries while the
//! SMTP server is down or answers with a temporary error (at least once a minute, also
//! across restarts, since the outbox is on disk), and moves each mail to `sent/` once the
//! server accepted it, or to `failed/` with the reason when it refused it for good (a bad
//! address). Every mail keeps the Message-ID it was given when queued, so a receiver can
//! recognise the one resend that a crash right after the SMTP server's acceptance causes.
//! An SMTP server that is down never holds up a changeover. The mail is written in the
//! language `[mail] language` names ([`texts`]).

mod texts;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use changeover_protocol::{ChangeoverOutcome, ChangeoverSummary};
use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use texts::MailLanguage;
use texts::MailTexts;

/// The longest pause between two tries of a waiting mail.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// One mail in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMail {
    pub message_id: String,
    /// The recipient; `None` means the configured `mail.to`.
    pub to: Option<String>,
    pub subject: String,
    pub body: String,
    #[serde(with = "changeover_protocol::messages::rfc3339")]
    pub queued_at: SystemTime,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Set when the SMTP server took it but it could not be moved to `sent/`: never sent
    /// again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delivered: bool,
}

/// The [`crate::unwritten`] key of the outbox.
const UNWRITTEN_OUTBOX: &str = "outbox";

/// The outbox folder of a product folder.
pub fn outbox_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("outbox")
}

/// What the journal adds to a changeover's mail beyond its summary.
#[derive(Debug, Clone, Default)]
pub struct MailDetails {
    /// `admin update --notify`; the configured `mail.to` when absent.
    pub notify: Option<String>,
    /// The agent release fetched with the server release, if the feed had one.
    pub agent_release: Option<String>,
    /// Sessions logged out that ran an agent older than the new version.
    pub agents_to_update: u64,
    /// `[mail] language` when the changeover began.
    pub language: MailLanguage,
}

/// Lines of the server log a failure mail ends with.
const LOG_LINES_IN_MAIL: usize = 30;

/// Queues the mail that tells the admin how a changeover ended (none for a cancel: the
/// admin who cancelled knows).
pub fn queue_changeover_mail(
    state_dir: &Path,
    summary: &ChangeoverSummary,
    details: &MailDetails,
) -> anyhow::Result<()> {
    let notify = details.notify.as_deref();
    if summary.outcome == ChangeoverOutcome::Cancelled {
        return Ok(());
    }
    let took = summary
        .ended_at
        .duration_since(summary.started_at)
        .unwrap_or_default();
    let texts = MailTexts::new(details.language);
    let from = summary.from_version.as_str();
    let to = summary.target_version.as_str();
    let (subject, opening) = match summary.outcome {
        ChangeoverOutcome::Committed => (
            texts.text("subject_committed", &[("from", from), ("to", to)]),
            texts.text("opening_committed", &[]),
        ),
        outcome => {
            let outcome = outcome.to_string();
            let phase = summary.phase.to_string();
            (
                texts.text(
                    "subject_not_committed",
                    &[("outcome", &outcome), ("from", from), ("to", to)],
                ),
                texts.text(
                    "opening_not_committed",
                    &[("outcome", &outcome), ("phase", &phase), ("from", from)],
                ),
            )
        }
    };
    let downtime = summary
        .downtime_ms
        .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
        .unwrap_or_else(|| texts.text("downtime_none", &[]));
    let reason = summary
        .reason
        .as_deref()
        .map(|reason| texts.row("label_reason", reason))
        .unwrap_or_default();
    let agents = match (&details.agent_release, summary.outcome) {
        (Some(release), ChangeoverOutcome::Committed) => {
            let count = details.agents_to_update.to_string();
            texts.row(
                "label_agent_release",
                texts.text("agent_release_offered", &[("release", release)]),
            ) + &texts.row(
                "label_agents_to_update",
                texts.text("agents_to_update", &[("count", &count)]),
            )
        }
        (None, ChangeoverOutcome::Committed) => texts.row(
            "label_agent_release",
            texts.text("agent_release_none", &[("version", to)]),
        ),
        _ => String::new(),
    };
    let log = if summary.outcome == ChangeoverOutcome::Committed {
        String::new()
    } else {
        let lines = crate::log_file::tail(state_dir, LOG_LINES_IN_MAIL);
        if lines.is_empty() {
            String::new()
        } else {
            let count = lines.len().to_string();
            let path = state_dir.join(crate::log_file::FILE_NAME);
            let path = path.display().to_string();
            format!(
                "\n{}\n\n{}\n",
                texts.text("log_tail", &[("count", &count), ("path", &path)]),
                lines.join("\n")
            )
        }
    };
    let body = [
        format!("{opening}\n\n"),
        texts.row("label_changeover", &summary.changeover_id),
        texts.row("label_from_version", from),
        texts.row("label_to_version", to),
        texts.row("label_outcome", summary.outcome),
        reason,
        texts.row(
            "label_started",
            humantime::format_rfc3339_seconds(summary.started_at),
        ),
        texts.row(
            "label_ended",
            humantime::format_rfc3339_seconds(summary.ended_at),
        ),
        texts.row(
            "label_took",
            humantime::format_duration(Duration::from_secs(took.as_secs())),
        ),
        texts.row("label_downtime", downtime),
        texts.row("label_sessions_warned", summary.sessions_warned),
        texts.row("label_sessions_logged_out", summary.sessions_logged_out),
        agents,
        log,
    ]
    .concat();
    let host = gethostname();
    let mail = QueuedMail {
        message_id: format!("<{}.{}@{host}>", summary.changeover_id, summary.outcome),
        to: notify.map(str::to_owned),
        subject,
        body,
        queued_at: SystemTime::now(),
        attempts: 0,
        last_error: None,
        delivered: false,
    };
    queue(state_dir, &mail)
}

fn gethostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "changeover.invalid".to_owned())
}

/// Writes a mail into the outbox, durably; a mail with the same Message-ID already queued
/// or sent is not queued twice.
pub fn queue(state_dir: &Path, mail: &QueuedMail) -> anyhow::Result<()> {
    let dir = outbox_dir(state_dir);
    let name = file_name(&mail.message_id);
    if dir.join(&name).exists() || dir.join("sent").join(&name).exists() {
        return Ok(());
    }
    let bytes = serde_json::to_vec_pretty(mail).context("cannot encode the mail")?;
    crate::release_tools::write_atomically(&dir.join(name), &bytes, true)
}

fn file_name(message_id: &str) -> String {
    let plain: String = message_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{plain}.json")
}

/// Mails waiting in the outbox, oldest first.
pub fn waiting(state_dir: &Path) -> Vec<QueuedMail> {
    let Ok(listing) = std::fs::read_dir(outbox_dir(state_dir)) else {
        return Vec::new();
    };
    let mut mails: Vec<QueuedMail> = listing
        .flatten()
        .filter(|item| item.path().extension().is_some_and(|ext| ext == "json"))
        .filter_map(|item| serde_json::from_slice(&std::fs::read(item.path()).ok()?).ok())
        .collect();
    mails.sort_by_key(|mail| mail.queued_at);
    mails
}

/// What the sender needs from the config.
#[derive(Debug, Clone)]
pub struct MailSettings {
    pub smtp_url: Option<String>,
    pub from: String,
    pub to: Option<String>,
}

/// What is said when no SMTP server is configured.
pub const NOT_CONFIGURED: &str = "mail is not configured (no [mail] smtp_url in changeover.toml): \
     mail to the admin waits in the outbox until it is set and the server restarted";

impl MailSettings {
    /// Why no mail can be sent with these settings, if none can.
    pub fn problem(&self) -> Option<&'static str> {
        self.smtp_url.is_none().then_some(NOT_CONFIGURED)
    }
}

/// Sends what waits in the outbox until `shutdown`: every mail at least once a minute
/// while it waits. Without an SMTP server nothing is tried (and nothing logged each
/// minute): that is said once at the start, and in status and doctor.
pub async fn run_sender(state_dir: PathBuf, settings: MailSettings, shutdown: CancellationToken) {
    if let Some(problem) = settings.problem() {
        let waiting = waiting(&state_dir).len();
        warn!(waiting, "{problem}");
        shutdown.cancelled().await;
        return;
    }
    let mut delay = Duration::from_secs(1);
    // Delivered in this process: never sent twice, even if neither the move to `sent/` nor
    // the mark in the outbox could be written (a full disk, a read-only folder).
    let mut delivered: std::collections::HashSet<String> = std::collections::HashSet::new();
    loop {
        let waiting = waiting(&state_dir);
        let mut all_sent = true;
        for mail in waiting {
            if mail.delivered || delivered.contains(&mail.message_id) {
                // Only the move is left; tried again, quietly, at the pace of retries.
                if move_to(&state_dir, &mail, "sent", None).is_err() {
                    all_sent = false;
                }
                continue;
            }
            match send(&settings, &mail).await {
                Ok(()) => {
                    info!(message_id = %mail.message_id, "mail sent");
                    delivered.insert(mail.message_id.clone());
                    if let Err(err) = move_to(&state_dir, &mail, "sent", None) {
                        warn!(cause = %err, message_id = %mail.message_id, "cannot move a sent mail to sent/; it is not sent again");
                        all_sent = false;
                        let mut marked = mail.clone();
                        marked.delivered = true;
                        if let Ok(bytes) = serde_json::to_vec_pretty(&marked) {
                            let path = outbox_dir(&state_dir).join(file_name(&mail.message_id));
                            let _ = crate::release_tools::write_atomically(&path, &bytes, true);
                        }
                    }
                }
                Err(Failure::Permanent(reason)) => {
                    warn!(message_id = %mail.message_id, %reason, "mail refused for good");
                    if let Err(err) = move_to(&state_dir, &mail, "failed", Some(reason)) {
                        warn!(cause = %err, "cannot move a refused mail to failed/");
                    }
                }
                Err(Failure::Transient(reason)) => {
                    all_sent = false;
                    warn!(message_id = %mail.message_id, %reason, "mail waits in the outbox");
                    let mut retried = mail.clone();
                    retried.attempts += 1;
                    retried.last_error = Some(reason);
                    if let Ok(bytes) = serde_json::to_vec_pretty(&retried) {
                        let path = outbox_dir(&state_dir).join(file_name(&mail.message_id));
                        // The mail itself stays queued as it was; only its count is behind.
                        match crate::release_tools::write_atomically(&path, &bytes, true) {
                            Ok(()) => {
                                crate::unwritten::clear(UNWRITTEN_OUTBOX);
                            }
                            Err(err) => {
                                crate::unwritten::report(
                                    UNWRITTEN_OUTBOX,
                                    format!(
                                        "cannot update the outbox: {err:#}; the mail stays queued"
                                    ),
                                );
                            }
                        }
                    }
                }
            }
        }
        delay = if all_sent {
            Duration::from_secs(1)
        } else {
            (delay * 2).min(MAX_RETRY)
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

enum Failure {
    Transient(String),
    Permanent(String),
}

async fn send(settings: &MailSettings, mail: &QueuedMail) -> Result<(), Failure> {
    let Some(url) = &settings.smtp_url else {
        return Err(Failure::Transient(
            "no mail.smtp_url is configured; the mail waits until one is".to_owned(),
        ));
    };
    let Some(to) = mail.to.as_ref().or(settings.to.as_ref()) else {
        return Err(Failure::Permanent(
            "no recipient: pass --notify to admin update or set mail.to".to_owned(),
        ));
    };
    let from = settings.from.parse().map_err(|err| {
        Failure::Permanent(format!(
            "mail.from {:?} is not an address: {err}",
            settings.from
        ))
    })?;
    let to = to
        .parse()
        .map_err(|err| Failure::Permanent(format!("{to:?} is not an address: {err}")))?;
    let message = Message::builder()
        .message_id(Some(mail.message_id.clone()))
        .from(from)
        .to(to)
        .subject(mail.subject.clone())
        .header(ContentType::TEXT_PLAIN)
        .body(mail.body.clone())
        .map_err(|err| Failure::Permanent(format!("cannot build the mail: {err}")))?;
    let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
        .map_err(|err| Failure::Transient(format!("mail.smtp_url {url:?} is not usable: {err}")))?
        .timeout(Some(Duration::from_secs(20)))
        .build();
    match transport.send(message).await {
        Ok(_) => Ok(()),
        Err(err) if err.is_permanent() => Err(Failure::Permanent(format!(
            "the SMTP server refused the mail: {err}"
        ))),
        Err(err) => Err(Failure::Transient(format!(
            "cannot send: {}",
            crate::feed::error_chain(&err)
        ))),
    }
}

/// Moves a mail out of the outbox into `folder`, durably (both folders synced).
fn move_to(
    state_dir: &Path,
    mail: &QueuedMail,
    folder: &str,
    reason: Option<String>,
) -> std::io::Result<()> {
    let dir = outbox_dir(state_dir);
    let name = file_name(&mail.message_id);
    let target = dir.join(folder);
    if let Some(reason) = reason {
        std::fs::create_dir_all(&target)?;
        let _ = std::fs::write(
            target.join(format!("{name}.reason.txt")),
            format!("{reason}\n"),
        );
    }
    std::fs::create_dir_all(&target)?;
    std::fs::rename(dir.join(&name), target.join(&name))?;
    // Both folders hold the rename; on Windows a folder cannot be opened to sync it, and
    // NTFS journals the rename itself.
    #[cfg(unix)]
    {
        std::fs::File::open(&target)?.sync_all()?;
        std::fs::File::open(&dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(outcome: ChangeoverOutcome) -> ChangeoverSummary {
        ChangeoverSummary {
            changeover_id: "co-1".to_owned(),
            outcome,
            from_version: "1.0.0".to_owned(),
            target_version: "1.1.0".to_owned(),
            phase: changeover_protocol::ChangeoverPhase::HealthCheck,
            reason: Some("the health check failed".to_owned()),
            started_at: SystemTime::UNIX_EPOCH,
            ended_at: SystemTime::UNIX_EPOCH + Duration::from_secs(95),
            downtime_ms: Some(640),
            sessions_warned: 12,
            sessions_logged_out: 3,
        }
    }

    #[tokio::test]
    async fn without_an_smtp_server_mail_waits_untried_and_nothing_spins() {
        let dir = tempfile::tempdir().unwrap();
        let details = MailDetails {
            notify: Some("it@example.com".to_owned()),
            ..MailDetails::default()
        };
        queue_changeover_mail(dir.path(), &summary(ChangeoverOutcome::Committed), &details)
            .unwrap();
        let settings = MailSettings {
            smtp_url: None,
            from: "changeover@example.com".to_owned(),
            to: None,
        };
        assert_eq!(settings.problem(), Some(NOT_CONFIGURED));
        let shutdown = CancellationToken::new();
        let sender = tokio::spawn(run_sender(
            dir.path().to_owned(),
            settings,
            shutdown.clone(),
        ));
        // A retrying sender tries at once and again after a second.
        tokio::time::sleep(Duration::from_secs(3)).await;
        shutdown.cancel();
        sender.await.unwrap();
        let queued = waiting(dir.path());
        assert_eq!(queued.len(), 1, "the mail still waits");
        assert_eq!(queued[0].attempts, 0, "and was never tried");
        let configured = MailSettings {
            smtp_url: Some("smtp://127.0.0.1:1".to_owned()),
            from: "changeover@example.com".to_owned(),
            to: None,
        };
        assert_eq!(configured.problem(), None);
    }

    #[test]
    fn a_changeover_queues_one_mail_and_a_cancel_none() {
        let dir = tempfile::tempdir().unwrap();
        let details = MailDetails {
            notify: Some("it@example.com".to_owned()),
            agent_release: Some("1.1.0".to_owned()),
            agents_to_update: 3,
            language: MailLanguage::En,
        };
        queue_changeover_mail(dir.path(), &summary(ChangeoverOutcome::Committed), &details)
            .unwrap();
        queue_changeover_mail(dir.path(), &summary(ChangeoverOutcome::Committed), &details)
            .unwrap();
        let no_one = MailDetails::default();
        queue_changeover_mail(dir.path(), &summary(ChangeoverOutcome::Cancelled), &no_one).unwrap();
        let queued = waiting(dir.path());
        assert_eq!(queued.len(), 1, "queued once");
        assert!(
            queued[0].subject.contains("available again"),
            "{}",
            queued[0].subject
        );
        assert!(
            queued[0].body.contains("Downtime:       0.6 s"),
            "{}",
            queued[0].body
        );
        assert!(
            queued[0].body.contains("Agents to update: 3"),
            "{}",
            queued[0].body
        );
        assert_eq!(queued[0].to.as_deref(), Some("it@example.com"));
        std::fs::write(
            dir.path().join(crate::log_file::FILE_NAME),
            "line one\nERROR the new release failed its health check\n",
        )
        .unwrap();
        queue_changeover_mail(dir.path(), &summary(ChangeoverOutcome::RolledBack), &no_one)
            .unwrap();
        let rolled_back = &waiting(dir.path())[1];
        assert!(
            rolled_back.body.contains("the health check failed"),
            "{}",
            rolled_back.body
        );
        assert!(
            rolled_back
                .body
                .contains("The last 2 lines of the server log")
                && rolled_back
                    .body
                    .ends_with("ERROR the new release failed its health check\n"),
            "{}",
            rolled_back.body
        );
        assert!(!rolled_back.body.contains("Agent release"));
    }

    #[test]
    fn the_mail_is_written_in_the_configured_language() {
        let dir = tempfile::tempdir().unwrap();
        let german = MailDetails {
            notify: None,
            agent_release: Some("1.1.0".to_owned()),
            agents_to_update: 2,
            language: MailLanguage::De,
        };
        queue_changeover_mail(dir.path(), &summary(ChangeoverOutcome::Committed), &german).unwrap();
        let mail = &waiting(dir.path())[0];
        assert_eq!(
            mail.subject,
            "Server wieder verfügbar: aktualisiert von 1.0.0 auf 1.1.0"
        );
        for line in [
            "Der Server wurde aktualisiert und ist wieder verfügbar.\n\n",
            "\nChangeover:     co-1\n",
            "\nVon Version:    1.0.0\n",
            "\nAuf Version:    1.1.0\n",
            "\nErgebnis:       committed\n",
            "\nGrund:          the health check failed\n",
            "\nAusfallzeit:    0.6 s\n",
            "\nGewarnte Sitzungen: 12\n",
            "\nZum Termin abgemeldete Sitzungen: 3\n",
            "\nAgent-Release:  1.1.0, wird jedem älteren Agenten bei seiner nächsten Verbindung angeboten\n",
            "\nZu aktualisierende Agenten: 2 (`changeover-agent admin status` zeigt ihren Fortschritt)\n",
        ] {
            assert!(mail.body.contains(line), "{line:?} in:\n{}", mail.body);
        }

        std::fs::write(
            dir.path().join(crate::log_file::FILE_NAME),
            "ERROR the new release failed its health check\n",
        )
        .unwrap();
        let french = MailDetails {
            language: MailLanguage::Fr,
            ..MailDetails::default()
        };
        queue_changeover_mail(dir.path(), &summary(ChangeoverOutcome::RolledBack), &french)
            .unwrap();
        let mail = &waiting(dir.path())[1];
        assert_eq!(
            mail.subject,
            "Mise à jour du serveur non terminée (rolled_back)\u{a0}: 1.0.0 -> 1.1.0"
        );
        assert!(
            mail.body.starts_with(
                "La mise à jour du serveur n’a pas abouti (rolled_back pendant la phase \
                 health_check). Le serveur fonctionne toujours avec la version 1.0.0.\n\n"
            ),
            "{}",
            mail.body
        );
        assert!(
            mail.body
                .contains("\nLes 1 dernières lignes du journal du serveur ("),
            "{}",
            mail.body
        );
        assert!(!mail.body.contains("Version de l’agent"), "{}", mail.body);
    }

    #[test]
    fn an_english_mail_reads_as_before_the_catalogues() {
        let dir = tempfile::tempdir().unwrap();
        let details = MailDetails {
            agent_release: None,
            ..MailDetails::default()
        };
        let mut summary = summary(ChangeoverOutcome::Committed);
        summary.reason = None;
        summary.downtime_ms = None;
        queue_changeover_mail(dir.path(), &summary, &details).unwrap();
        let mail = &waiting(dir.path())[0];
        assert_eq!(
            mail.subject,
            "Server available again: updated 1.0.0 -> 1.1.0"
        );
        assert_eq!(
            mail.body,
            "The server has been updated and is available again.\n\n\
             Changeover:     co-1\n\
             From version:   1.0.0\n\
             To version:     1.1.0\n\
             Outcome:        committed\n\
             Started:        1970-01-01T00:00:00Z\n\
             Ended:          1970-01-01T00:01:35Z\n\
             Took:           1m 35s\n\
             Downtime:       none\n\
             Sessions warned: 12\n\
             Sessions logged out at the deadline: 3\n\
             Agent release:  none of version 1.1.0 in the feed; the agents keep their version\n"
        );
    }
}
