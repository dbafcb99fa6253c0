//! The exact JSON of every wire message and of the release feed's files, pinned in
//! `tests/snapshots/`, so any change to what goes on the wire or into a feed shows up as a
//! diff in review.
//!
//! After an intended change, run `INSTA_UPDATE=always cargo test -p changeover-protocol` and
//! review the changed `.snap` files.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use changeover_protocol::release::{FeedManifest, PRODUCT, PackageEntry, ReleaseKind};
use changeover_protocol::version::ProtocolRange;
use changeover_protocol::{
    AgentHello, AgentUpdateOffer, AgentUpdateState, AgentUpdateView, CandidateState,
    CandidateStatus, ChangeoverOutcome, ChangeoverPhase, ChangeoverSummary, ChangeoverView,
    ClientMessage, ErrorCode, FeedStatus, PackageSource, ServerMessage, SessionView, StatusReport,
};

/// A fixed moment, so snapshots do not change from run to run.
fn at(seconds_since_epoch: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds_since_epoch)
}

fn hello() -> ClientMessage {
    ClientMessage::Hello(AgentHello {
        protocol_version: 1,
        agent_id: "5f0c2a9e-3b7d-4e61-9c28-7a1d4b6e0f93".to_owned(),
        user: "mkoenig".to_owned(),
        host: "ws-accounting-07".to_owned(),
        platform: "windows-x86_64".to_owned(),
        agent_version: "2.3.0".to_owned(),
        instance_id: Some("6f1c0d2e9a7b4c35".to_owned()),
    })
}

fn admin_login() -> ClientMessage {
    ClientMessage::AdminLogin {
        protocol_version: 1,
        password: "Nq7wHk3tRzp9XbE2mVcY".to_owned(),
    }
}

fn welcome() -> ServerMessage {
    ServerMessage::Welcome {
        protocol_version: 1,
        server_version: "2.3.0".to_owned(),
        session_id: 4182,
        heartbeat_secs: 25,
        assigned_agent_id: None,
    }
}

fn admin_welcome() -> ServerMessage {
    ServerMessage::AdminWelcome {
        protocol_version: 1,
        server_version: "2.3.0".to_owned(),
    }
}

fn download_request() -> ClientMessage {
    ClientMessage::DownloadRequest {
        version: Some("2.4.0".to_owned()),
        allow_downgrade: false,
    }
}

// Without a version: the newest release in the feed.
fn download_request_newest() -> ClientMessage {
    ClientMessage::DownloadRequest {
        version: None,
        allow_downgrade: false,
    }
}

// Every field of the status filled that an idle server fills: the feed was read, a download
// is running, an earlier package from the inbox was refused, and the last changeover (to the
// installed release) committed.
fn status() -> ServerMessage {
    ServerMessage::Status(Box::new(StatusReport {
        server_version: "2.3.0".to_owned(),
        available_version: Some("2.4.0".to_owned()),
        phase: ChangeoverPhase::Idle,
        feed: FeedStatus {
            url: Some("https://updates.example.com/changeover/".to_owned()),
            // 2026-11-28T09:14:37Z
            checked_at: Some(at(1_795_857_277)),
            newest_version: Some("2.4.0".to_owned()),
            newest_notes: None,
            error: None,
        },
        candidate: Some(CandidateStatus {
            version: "2.4.0".to_owned(),
            source: PackageSource::Feed,
            state: CandidateState::Downloading {
                bytes: 12_058_624,
                size: 48_213_907,
            },
        }),
        last_refusal: Some(
            "server-2.3.0-linux-x86_64.tar.gz: server 2.3.0 is not newer than the installed \
             2.3.0; a downgrade must be allowed explicitly (admin download --allow-downgrade, or feed.allow_downgrade in the config)"
                .to_owned(),
        ),
        changeover: None,
        last_changeover: Some(last_committed()),
        outbox: vec![changeover_protocol::OutboxEntry {
            message_id: "<co-1795875400188.committed@srv-office>".to_owned(),
            to: Some("it@muster-gmbh.de".to_owned()),
            subject: "Server available again: updated 2.3.0 -> 2.4.0".to_owned(),
            queued_at: at(1_795_875_503),
            attempts: 3,
            last_error: Some(
                "cannot send: Connection error: Connection refused (os error 111)".to_owned(),
            ),
        }],
        mail_problem: None,
        disk_problems: Vec::new(),
        history: Vec::new(),
        audit: Vec::new(),
        console_url: None,
        agent_release: Some("2.3.0".to_owned()),
        agents_behind: 0,
        apps: vec![
            changeover_protocol::AppStatus {
                name: "business".to_owned(),
                state: changeover_protocol::AppState::Healthy,
                pid: Some(48213),
                restarts: 0,
                health: Some("ok".to_owned()),
                health_at: Some(at(1_795_875_520)),
                last_exit: None,
            },
            changeover_protocol::AppStatus {
                name: "finance".to_owned(),
                state: changeover_protocol::AppState::Crashed,
                pid: None,
                restarts: 4,
                health: Some("cannot connect to 127.0.0.1:8081: Connection refused (os error 111)".to_owned()),
                health_at: Some(at(1_795_875_431)),
                last_exit: Some("exit status: 1".to_owned()),
            },
        ],
        sessions: two_sessions(),
        sessions_total: 2,
    }))
}

fn two_sessions() -> Vec<SessionView> {
    vec![
        SessionView {
            session_id: 4181,
            agent_id: "c2b8e4f1-6a0d-4f3e-8b57-1e9d2c4a7b60".to_owned(),
            user: "aschmidt".to_owned(),
            host: "ws-reception-01".to_owned(),
            platform: "linux-x86_64".to_owned(),
            agent_version: "2.3.0".to_owned(),
            protocol_version: 1,
            address: "10.20.4.31:51822".to_owned(),
            // 2026-11-28T07:58:41Z
            connected_since: at(1_795_852_721),
            update: None,
            clone_of: None,
        },
        SessionView {
            session_id: 4182,
            agent_id: "5f0c2a9e-3b7d-4e61-9c28-7a1d4b6e0f93".to_owned(),
            user: "mkoenig".to_owned(),
            host: "ws-accounting-07".to_owned(),
            platform: "windows-x86_64".to_owned(),
            agent_version: "2.3.0".to_owned(),
            protocol_version: 1,
            address: "[fd00:20:7::112]:60315".to_owned(),
            // 2026-11-28T09:15:02Z
            connected_since: at(1_795_857_302),
            update: None,
            clone_of: None,
        },
    ]
}

// A site without a feed: the candidate came from the inbox and is ready; no agents yet.
fn status_inbox_only() -> ServerMessage {
    ServerMessage::Status(Box::new(StatusReport {
        server_version: "2.3.0".to_owned(),
        available_version: Some("2.4.0".to_owned()),
        phase: ChangeoverPhase::Idle,
        feed: FeedStatus::default(),
        candidate: Some(CandidateStatus {
            version: "2.4.0".to_owned(),
            source: PackageSource::Inbox,
            state: CandidateState::Ready,
        }),
        last_refusal: None,
        changeover: None,
        last_changeover: None,
        outbox: Vec::new(),
        mail_problem: None,
        disk_problems: Vec::new(),
        history: Vec::new(),
        audit: Vec::new(),
        console_url: None,
        agent_release: None,
        agents_behind: 0,
        apps: Vec::new(),
        sessions: Vec::new(),
        sessions_total: 0,
    }))
}

/// The changeover most examples follow: 2.3.0 to 2.4.0, asked for at 12:30:00, prepared in
/// 8 s, two minutes of warnings, logout at 12:32:08.
const CHANGEOVER_ID: &str = "co-1795869000412";

// 2026-11-28T12:30:00Z
const REQUESTED_AT: u64 = 1_795_869_000;

// 2026-11-28T12:32:08Z
const DEADLINE: u64 = 1_795_869_128;

// How the changeover to the installed 2.3.0 ended, weeks ago.
fn last_committed() -> ChangeoverSummary {
    ChangeoverSummary {
        changeover_id: "co-1791231300556".to_owned(),
        outcome: ChangeoverOutcome::Committed,
        from_version: "2.2.1".to_owned(),
        target_version: "2.3.0".to_owned(),
        phase: ChangeoverPhase::HealthCheck,
        reason: None,
        // 2026-10-05T20:15:00Z
        started_at: at(1_791_231_300),
        // 2026-10-05T20:17:09Z
        ended_at: at(1_791_231_429),
        downtime_ms: Some(2_406),
        sessions_warned: 41,
        sessions_logged_out: 17,
    }
}

// Counting down: everyone is warned, the deadline is set; the package is ready.
fn status_counting_down() -> ServerMessage {
    ServerMessage::Status(Box::new(StatusReport {
        server_version: "2.3.0".to_owned(),
        available_version: Some("2.4.0".to_owned()),
        phase: ChangeoverPhase::CountingDown,
        feed: FeedStatus {
            url: Some("https://updates.example.com/changeover/".to_owned()),
            // 2026-11-28T12:30:01Z
            checked_at: Some(at(1_795_869_001)),
            newest_version: Some("2.4.0".to_owned()),
            newest_notes: None,
            error: None,
        },
        candidate: Some(CandidateStatus {
            version: "2.4.0".to_owned(),
            source: PackageSource::Feed,
            state: CandidateState::Ready,
        }),
        last_refusal: None,
        changeover: Some(ChangeoverView {
            changeover_id: CHANGEOVER_ID.to_owned(),
            from_version: "2.3.0".to_owned(),
            target_version: "2.4.0".to_owned(),
            phase: ChangeoverPhase::CountingDown,
            scheduled_at: None,
            deadline: Some(at(DEADLINE)),
        }),
        last_changeover: Some(last_committed()),
        outbox: Vec::new(),
        mail_problem: None,
        disk_problems: Vec::new(),
        history: Vec::new(),
        audit: Vec::new(),
        console_url: None,
        agent_release: Some("2.3.0".to_owned()),
        agents_behind: 0,
        apps: Vec::new(),
        sessions: two_sessions(),
        sessions_total: 2,
    }))
}

// Scheduled for the evening: no deadline yet, nobody warned.
fn status_scheduled() -> ServerMessage {
    ServerMessage::Status(Box::new(StatusReport {
        server_version: "2.3.0".to_owned(),
        available_version: Some("2.4.0".to_owned()),
        phase: ChangeoverPhase::Scheduled,
        feed: FeedStatus {
            url: Some("https://updates.example.com/changeover/".to_owned()),
            // 2026-11-28T16:05:12Z
            checked_at: Some(at(1_795_881_912)),
            newest_version: Some("2.4.0".to_owned()),
            newest_notes: None,
            error: None,
        },
        candidate: Some(CandidateStatus {
            version: "2.4.0".to_owned(),
            source: PackageSource::Feed,
            state: CandidateState::Ready,
        }),
        last_refusal: None,
        changeover: Some(ChangeoverView {
            changeover_id: "co-1795881912087".to_owned(),
            from_version: "2.3.0".to_owned(),
            target_version: "2.4.0".to_owned(),
            phase: ChangeoverPhase::Scheduled,
            // 2026-11-28T22:00:00Z
            scheduled_at: Some(at(1_795_903_200)),
            deadline: None,
        }),
        last_changeover: Some(last_committed()),
        outbox: Vec::new(),
        mail_problem: None,
        disk_problems: Vec::new(),
        history: Vec::new(),
        audit: Vec::new(),
        console_url: None,
        agent_release: Some("2.3.0".to_owned()),
        agents_behind: 0,
        apps: Vec::new(),
        sessions: Vec::new(),
        sessions_total: 0,
    }))
}

// After the changeover to 2.4.0 (committed at 12:32:11): the server offers agent 2.4.0.
// mkoenig's agent updated itself and came back as 2.4.0; aschmidt's could not install it;
// jwagner's asks its user (ask hook) and has not reported yet; tbraun's, which connected
// a moment ago, is fetching it.
fn status_after_changeover() -> ServerMessage {
    ServerMessage::Status(Box::new(StatusReport {
        server_version: "2.4.0".to_owned(),
        available_version: None,
        phase: ChangeoverPhase::Idle,
        feed: FeedStatus {
            url: Some("https://updates.example.com/changeover/".to_owned()),
            // 2026-11-28T12:41:54Z
            checked_at: Some(at(1_795_869_714)),
            newest_version: Some("2.4.0".to_owned()),
            newest_notes: None,
            error: None,
        },
        candidate: None,
        last_refusal: None,
        changeover: None,
        last_changeover: Some(committed()),
        outbox: Vec::new(),
        mail_problem: None,
        disk_problems: Vec::new(),
        history: Vec::new(),
        audit: Vec::new(),
        console_url: None,
        agent_release: Some("2.4.0".to_owned()),
        agents_behind: 3,
        apps: Vec::new(),
        sessions: sessions_after_changeover(),
        sessions_total: 4,
    }))
}

fn sessions_after_changeover() -> Vec<SessionView> {
    let update = |state, detail: Option<&str>| {
        Some(AgentUpdateView {
            version: "2.4.0".to_owned(),
            state,
            detail: detail.map(str::to_owned),
        })
    };
    vec![
        SessionView {
            session_id: 1,
            agent_id: "c2b8e4f1-6a0d-4f3e-8b57-1e9d2c4a7b60".to_owned(),
            user: "aschmidt".to_owned(),
            host: "ws-reception-01".to_owned(),
            platform: "linux-x86_64".to_owned(),
            agent_version: "2.3.0".to_owned(),
            protocol_version: 1,
            address: "10.20.4.31:52214".to_owned(),
            // 2026-11-28T12:32:11Z
            connected_since: at(1_795_869_131),
            update: update(AgentUpdateState::Failed, Some(AGENT_UPDATE_FAILURE)),
            clone_of: None,
        },
        SessionView {
            session_id: 3,
            agent_id: "5f0c2a9e-3b7d-4e61-9c28-7a1d4b6e0f93".to_owned(),
            user: "mkoenig".to_owned(),
            host: "ws-accounting-07".to_owned(),
            platform: "windows-x86_64".to_owned(),
            agent_version: "2.4.0".to_owned(),
            protocol_version: 1,
            address: "10.20.7.112:60788".to_owned(),
            // 2026-11-28T12:32:14Z
            connected_since: at(1_795_869_134),
            update: None,
            clone_of: None,
        },
        SessionView {
            session_id: 4,
            agent_id: "f3299712-96fe-4eca-b845-3b228bd25945".to_owned(),
            user: "jwagner".to_owned(),
            host: "ws-accounting-03".to_owned(),
            platform: "windows-x86_64".to_owned(),
            agent_version: "2.3.0".to_owned(),
            protocol_version: 1,
            address: "10.20.7.103:49731".to_owned(),
            // 2026-11-28T12:41:49Z
            connected_since: at(1_795_869_709),
            update: update(AgentUpdateState::Offered, None),
            clone_of: None,
        },
        SessionView {
            session_id: 5,
            agent_id: "7d7d1d8e-ded6-4256-b171-1e611c7aea00".to_owned(),
            user: "tbraun".to_owned(),
            host: "ws-sales-04".to_owned(),
            platform: "windows-x86_64".to_owned(),
            agent_version: "2.3.0".to_owned(),
            protocol_version: 1,
            address: "10.20.9.24:55102".to_owned(),
            // 2026-11-28T12:41:52Z
            connected_since: at(1_795_869_712),
            update: update(AgentUpdateState::Downloading, Some("9873410 bytes")),
            clone_of: None,
        },
    ]
}

// Every field, as for a maintenance window in the evening.
fn update_request() -> ClientMessage {
    ClientMessage::UpdateRequest {
        version: Some("2.4.0".to_owned()),
        grace_secs: 300,
        notify: Some("it@example.com".to_owned()),
        message: Some(
            "The accounting server is updated to 2.4.0 at 22:00. Please save your work and \
             close the application; it will be back in a few minutes."
                .to_owned(),
        ),
        at: Some("2026-11-28T22:00:00Z".to_owned()),
        allow_downgrade: false,
    }
}

// What `admin update` sends without options: the newest release, now, two minutes' grace.
fn update_request_now() -> ClientMessage {
    ClientMessage::UpdateRequest {
        version: None,
        grace_secs: 120,
        notify: None,
        message: None,
        at: None,
        allow_downgrade: false,
    }
}

fn update_accepted() -> ServerMessage {
    ServerMessage::UpdateAccepted {
        changeover_id: CHANGEOVER_ID.to_owned(),
        target_version: "2.4.0".to_owned(),
        scheduled_at: None,
    }
}

fn update_accepted_scheduled() -> ServerMessage {
    ServerMessage::UpdateAccepted {
        changeover_id: "co-1795881912087".to_owned(),
        target_version: "2.4.0".to_owned(),
        // 2026-11-28T22:00:00Z
        scheduled_at: Some(at(1_795_903_200)),
    }
}

fn cancel_accepted() -> ServerMessage {
    ServerMessage::CancelAccepted {
        changeover_id: "co-1795877415260".to_owned(),
    }
}

// The one progress report with a detail: the countdown began.
fn changeover_progress() -> ServerMessage {
    ServerMessage::ChangeoverProgress {
        changeover_id: CHANGEOVER_ID.to_owned(),
        phase: ChangeoverPhase::CountingDown,
        detail: "2 sessions warned; logout in 120 s".to_owned(),
    }
}

// Every other phase change: the phase alone.
fn changeover_progress_phase() -> ServerMessage {
    ServerMessage::ChangeoverProgress {
        changeover_id: CHANGEOVER_ID.to_owned(),
        phase: ChangeoverPhase::Swapping,
        detail: String::new(),
    }
}

fn changeover_finished() -> ServerMessage {
    ServerMessage::ChangeoverFinished(committed())
}

// How the changeover most examples follow ended.
fn committed() -> ChangeoverSummary {
    ChangeoverSummary {
        changeover_id: CHANGEOVER_ID.to_owned(),
        outcome: ChangeoverOutcome::Committed,
        from_version: "2.3.0".to_owned(),
        target_version: "2.4.0".to_owned(),
        phase: ChangeoverPhase::HealthCheck,
        reason: None,
        started_at: at(REQUESTED_AT),
        // 2026-11-28T12:32:11Z
        ended_at: at(1_795_869_131),
        downtime_ms: Some(1_874),
        sessions_warned: 2,
        sessions_logged_out: 2,
    }
}

// A step between the logout and the restart failed; the old release serves again.
fn changeover_finished_rolled_back() -> ServerMessage {
    ServerMessage::ChangeoverFinished(ChangeoverSummary {
        changeover_id: "co-1795890604118".to_owned(),
        outcome: ChangeoverOutcome::RolledBack,
        from_version: "2.3.0".to_owned(),
        target_version: "2.4.0".to_owned(),
        phase: ChangeoverPhase::RollingBack,
        reason: Some(
            "cannot move /opt/changeover/server/backups to \
             /opt/changeover/.server.staging/backups: Permission denied (os error 13)"
                .to_owned(),
        ),
        // 2026-11-28T18:30:04Z
        started_at: at(1_795_890_604),
        // 2026-11-28T18:32:14Z
        ended_at: at(1_795_890_734),
        downtime_ms: None,
        sessions_warned: 2,
        sessions_logged_out: 2,
    })
}

// Called off during the countdown: the users were warned and told.
fn changeover_finished_cancelled() -> ServerMessage {
    ServerMessage::ChangeoverFinished(ChangeoverSummary {
        changeover_id: "co-1795877415260".to_owned(),
        outcome: ChangeoverOutcome::Cancelled,
        from_version: "2.3.0".to_owned(),
        target_version: "2.4.0".to_owned(),
        phase: ChangeoverPhase::CountingDown,
        reason: None,
        // 2026-11-28T14:50:15Z
        started_at: at(1_795_877_415),
        // 2026-11-28T14:51:02Z
        ended_at: at(1_795_877_462),
        downtime_ms: None,
        sessions_warned: 2,
        sessions_logged_out: 0,
    })
}

// The preflight could not fetch the release; nobody noticed.
fn changeover_finished_failed() -> ServerMessage {
    ServerMessage::ChangeoverFinished(ChangeoverSummary {
        changeover_id: "co-1795855960731".to_owned(),
        outcome: ChangeoverOutcome::Failed,
        from_version: "2.3.0".to_owned(),
        target_version: "2.4.0".to_owned(),
        phase: ChangeoverPhase::Preparing,
        reason: Some(
            "cannot reach the feed at https://updates.example.com/changeover/manifest.json: \
             error sending request for url \
             (https://updates.example.com/changeover/manifest.json): operation timed out"
                .to_owned(),
        ),
        // 2026-11-28T08:52:40Z
        started_at: at(1_795_855_960),
        // 2026-11-28T08:53:11Z
        ended_at: at(1_795_855_991),
        downtime_ms: None,
        sessions_warned: 0,
        sessions_logged_out: 0,
    })
}

// The first warning, as the countdown begins, with the admin's own words.
fn warning() -> ServerMessage {
    ServerMessage::Warning {
        changeover_id: CHANGEOVER_ID.to_owned(),
        deadline: at(DEADLINE),
        seconds_left: 120,
        target_version: "2.4.0".to_owned(),
        message: "Accounting is back at 12:45.".to_owned(),
        admin_message: Some("Accounting is back at 12:45.".to_owned()),
    }
}

// The last one before the deadline.
fn warning_last() -> ServerMessage {
    ServerMessage::Warning {
        changeover_id: CHANGEOVER_ID.to_owned(),
        deadline: at(DEADLINE),
        seconds_left: 5,
        target_version: "2.4.0".to_owned(),
        message: "The server will be updated to version 2.4.0. Please save your work and close \
                  the application."
            .to_owned(),
        admin_message: None,
    }
}

fn update_cancelled() -> ServerMessage {
    ServerMessage::UpdateCancelled {
        changeover_id: "co-1795877415260".to_owned(),
        message: "The announced update was called off; carry on working.".to_owned(),
        target_version: Some("2.4.0".to_owned()),
    }
}

// Two sessions at the deadline: a window of 2000 + 2 * 2 ms.
fn logout() -> ServerMessage {
    ServerMessage::Logout {
        changeover_id: CHANGEOVER_ID.to_owned(),
        reason: "the server is being updated to version 2.4.0".to_owned(),
        reconnect_within_ms: 2_004,
        target_version: Some("2.4.0".to_owned()),
        admin_message: Some("Accounting is back at 12:45.".to_owned()),
    }
}

/// The vendor's signature of agent 2.4.0 for windows-x86_64, as `release pack` writes it
/// (`agent-2.4.0-windows-x86_64.tar.gz.minisig`); its trusted comment is the package entry
/// in the feed's manifest. The signature bytes are illustrative.
const AGENT_SIGNATURE: &str = concat!(
    "untrusted comment: signature from the changeover release tools\n",
    "RUTOnSShnx35tH0ufd0kOVdQnLdMKa5ZlN3Zynn9OZguTbEqHQUV1+1d+ouUt8rFWjQG",
    "uSnugXu2D8R5cU5/W23ZQAIHJJ7cKAE=\n",
    "trusted comment: {\"product\":\"changeover\",\"kind\":\"agent\",\"version\":\"2.4.0\",",
    "\"platform\":\"windows-x86_64\",\"archive\":\"agent-2.4.0-windows-x86_64.tar.gz\",",
    "\"size\":9873410,",
    "\"sha256\":\"9ba4c411748c88f878df8289cbac949858c2c202f986c839205f5d7ae845920d\",",
    "\"notes\":\"Faster month-end reports; fixes the duplicate invoice number warning\",",
    "\"date\":\"2026-11-27T16:40:12Z\"}\n",
    "ZbaAhLUtA2wji3FCiLonydJxMXV95P5LMg5xTEaVz2FuHGTJYgV0ODgopVgMolsHiA8v",
    "AgiMRe94Cd6wcHuPAA==\n",
);

/// Why aschmidt's agent could not install its update: it runs as the user, and its
/// install folder belongs to root.
const AGENT_UPDATE_FAILURE: &str =
    "cannot create /opt/changeover-agent/.update-staging: Permission denied (os error 13)";

// To mkoenig's agent 2.3.0, right after its welcome from the new server 2.4.0.
fn agent_update_offer() -> ServerMessage {
    ServerMessage::AgentUpdateOffer(Box::new(AgentUpdateOffer {
        version: "2.4.0".to_owned(),
        platform: "windows-x86_64".to_owned(),
        archive: "agent-2.4.0-windows-x86_64.tar.gz".to_owned(),
        size: 9_873_410,
        sha256: "9ba4c411748c88f878df8289cbac949858c2c202f986c839205f5d7ae845920d".to_owned(),
        path: "/agent-updates/agent-2.4.0-windows-x86_64.tar.gz".to_owned(),
        signature: AGENT_SIGNATURE.to_owned(),
    }))
}

// The agent verified the offer and fetches the archive.
fn agent_update_report_downloading() -> ClientMessage {
    ClientMessage::AgentUpdateReport {
        version: "2.4.0".to_owned(),
        state: AgentUpdateState::Downloading,
        detail: Some("9873410 bytes".to_owned()),
    }
}

// The update failed; the old agent keeps running.
fn agent_update_report_failed() -> ClientMessage {
    ClientMessage::AgentUpdateReport {
        version: "2.4.0".to_owned(),
        state: AgentUpdateState::Failed,
        detail: Some(AGENT_UPDATE_FAILURE.to_owned()),
    }
}

fn download_accepted() -> ServerMessage {
    ServerMessage::DownloadAccepted {
        version: "2.4.0".to_owned(),
    }
}

fn download_started() -> ServerMessage {
    ServerMessage::DownloadStarted {
        version: "2.4.0".to_owned(),
        size: 48_213_907,
        resumed_from: 31_457_280,
    }
}

fn download_progress() -> ServerMessage {
    ServerMessage::DownloadProgress {
        version: "2.4.0".to_owned(),
        bytes: 12_058_624,
        size: 48_213_907,
    }
}

fn download_retrying() -> ServerMessage {
    ServerMessage::DownloadRetrying {
        version: "2.4.0".to_owned(),
        attempt: 2,
        retry_in_ms: 1_742,
        reason: "the connection ended after 31457280 of 48213907 bytes".to_owned(),
    }
}

fn package_ready() -> ServerMessage {
    ServerMessage::PackageReady {
        version: "2.4.0".to_owned(),
        source: PackageSource::Feed,
        archive: "server-2.4.0-linux-x86_64.tar.gz".to_owned(),
    }
}

fn package_refused() -> ServerMessage {
    ServerMessage::PackageRefused {
        version: Some("2.4.0".to_owned()),
        source: PackageSource::Feed,
        reason: "the download was refused and deleted: the signature of \
                 server-2.4.0-linux-x86_64.tar.gz does not verify with the vendor key: the \
                 file was altered"
            .to_owned(),
    }
}

// An inbox package whose signature cannot be read: its version is not known.
fn package_refused_without_version() -> ServerMessage {
    ServerMessage::PackageRefused {
        version: None,
        source: PackageSource::Inbox,
        reason: "server-2.4.0-linux-x86_64.tar.gz: cannot read the signature of \
                 server-2.4.0-linux-x86_64.tar.gz: Invalid encoding in minisign data"
            .to_owned(),
    }
}

// An error that answers an admin request and leaves the connection open.
fn error_request() -> ServerMessage {
    ServerMessage::error(
        ErrorCode::NotNewer,
        "server 2.3.0 is not newer than the installed 2.3.0; a downgrade must be allowed explicitly (admin download --allow-downgrade, or feed.allow_downgrade in the config)",
    )
}

// Request errors of the changeover; the connection stays open.
fn error_invalid_request() -> ServerMessage {
    ServerMessage::error(
        ErrorCode::InvalidRequest,
        "a grace period of 7200 s is out of range: 0 to 3600 s (default 120)",
    )
}

fn error_nothing_to_cancel() -> ServerMessage {
    ServerMessage::error(
        ErrorCode::NothingToCancel,
        "no changeover is scheduled or counting down",
    )
}

// A hello between the logout and the restart; followed by close 4009.
fn error_updating() -> ServerMessage {
    ServerMessage::error(
        ErrorCode::Updating,
        "the server is updating; it will be back shortly",
    )
}

fn error_plain() -> ServerMessage {
    ServerMessage::error(ErrorCode::Unauthorized, "wrong admin password")
}

fn error_unsupported_protocol() -> ServerMessage {
    ServerMessage::Error {
        code: ErrorCode::UnsupportedProtocol,
        message: "this server speaks protocol 1, the peer speaks 2; update the agent \
                  (or the server) so they overlap"
            .to_owned(),
        retry_after_secs: None,
        supported_protocol: Some(ProtocolRange { min: 1, max: 1 }),
    }
}

fn error_throttled() -> ServerMessage {
    ServerMessage::Error {
        code: ErrorCode::Throttled,
        message: "too many failed logins from 10.20.7.112; try again in 42 s".to_owned(),
        retry_after_secs: Some(42),
        supported_protocol: None,
    }
}

/// One sample of every client message, named as its snapshot.
fn client_samples() -> Vec<(&'static str, ClientMessage)> {
    vec![
        ("hello", hello()),
        ("admin_login", admin_login()),
        ("status_request", ClientMessage::StatusRequest),
        ("download_request", download_request()),
        ("download_request_newest", download_request_newest()),
        ("update_request", update_request()),
        ("update_request_now", update_request_now()),
        ("cancel_request", ClientMessage::CancelRequest),
        ("agent_update_report", agent_update_report_failed()),
        (
            "agent_update_report_downloading",
            agent_update_report_downloading(),
        ),
    ]
}

/// One sample of every server message, named as its snapshot; `error` once per shape.
fn server_samples() -> Vec<(&'static str, ServerMessage)> {
    vec![
        ("welcome", welcome()),
        ("admin_welcome", admin_welcome()),
        ("status", status()),
        ("status_inbox_only", status_inbox_only()),
        ("status_counting_down", status_counting_down()),
        ("status_scheduled", status_scheduled()),
        ("status_after_changeover", status_after_changeover()),
        ("update_accepted", update_accepted()),
        ("update_accepted_scheduled", update_accepted_scheduled()),
        ("cancel_accepted", cancel_accepted()),
        ("changeover_progress", changeover_progress()),
        ("changeover_progress_phase", changeover_progress_phase()),
        ("changeover_finished", changeover_finished()),
        (
            "changeover_finished_rolled_back",
            changeover_finished_rolled_back(),
        ),
        (
            "changeover_finished_cancelled",
            changeover_finished_cancelled(),
        ),
        ("changeover_finished_failed", changeover_finished_failed()),
        ("warning", warning()),
        ("warning_last", warning_last()),
        ("update_cancelled", update_cancelled()),
        ("logout", logout()),
        ("agent_update_offer", agent_update_offer()),
        ("download_accepted", download_accepted()),
        ("download_started", download_started()),
        ("download_progress", download_progress()),
        ("download_retrying", download_retrying()),
        ("package_ready", package_ready()),
        ("package_refused", package_refused()),
        (
            "package_refused_without_version",
            package_refused_without_version(),
        ),
        ("error", error_plain()),
        ("error_unsupported_protocol", error_unsupported_protocol()),
        ("error_throttled", error_throttled()),
        ("error_request", error_request()),
        ("error_invalid_request", error_invalid_request()),
        ("error_nothing_to_cancel", error_nothing_to_cancel()),
        ("error_updating", error_updating()),
    ]
}

fn package_entry(
    kind: ReleaseKind,
    version: &str,
    platform: &str,
    size: u64,
    sha256: &str,
) -> PackageEntry {
    let version: semver::Version = version.parse().expect("a semantic version");
    PackageEntry {
        product: PRODUCT.to_owned(),
        kind,
        archive: PackageEntry::archive_name(kind, &version, platform),
        version,
        platform: platform.to_owned(),
        size,
        sha256: sha256.to_owned(),
        notes: "Faster month-end reports; fixes the duplicate invoice number warning".to_owned(),
        date: "2026-11-27T16:40:12Z".to_owned(),
    }
}

fn server_entry() -> PackageEntry {
    package_entry(
        ReleaseKind::Server,
        "2.4.0",
        "linux-x86_64",
        48_213_907,
        "682de40589923ca7c7aaadc7f31df8ecbf2612355e186d653c1e64d8ddd032a8",
    )
}

fn feed_manifest() -> FeedManifest {
    FeedManifest {
        format: 1,
        product: PRODUCT.to_owned(),
        updated: "2026-11-27T16:41:03Z".to_owned(),
        releases: vec![
            package_entry(
                ReleaseKind::Agent,
                "2.4.0",
                "windows-x86_64",
                9_873_410,
                "9ba4c411748c88f878df8289cbac949858c2c202f986c839205f5d7ae845920d",
            ),
            server_entry(),
        ],
    }
}

#[test]
fn client_messages() {
    for (name, message) in client_samples() {
        insta::assert_json_snapshot!(name, message);
    }
}

#[test]
fn server_messages() {
    for (name, message) in server_samples() {
        insta::assert_json_snapshot!(name, message);
    }
}

// The names a reader may meet in `code`, `phase`, `outcome`, `source`, a candidate's
// `state` and an agent update's `state`, as they travel.
#[test]
fn code_and_phase_names() {
    insta::assert_json_snapshot!("error_codes", common::unit_variants::<ErrorCode>());
    insta::assert_json_snapshot!(
        "changeover_phases",
        common::unit_variants::<ChangeoverPhase>()
    );
    insta::assert_json_snapshot!(
        "changeover_outcomes",
        common::unit_variants::<ChangeoverOutcome>()
    );
    insta::assert_json_snapshot!("package_sources", common::unit_variants::<PackageSource>());
    insta::assert_json_snapshot!(
        "agent_update_states",
        common::unit_variants::<AgentUpdateState>()
    );
    // `CandidateState` reads unknown states as `unknown`, so serde cannot list its names;
    // the states are shown as they travel instead.
    insta::assert_json_snapshot!(
        "candidate_states",
        [
            CandidateState::Downloading {
                bytes: 1_048_576,
                size: 41_943_040
            },
            CandidateState::Ready,
            CandidateState::Unknown,
        ]
    );
    // What a reader makes of a name it does not know.
    let fallbacks = serde_json::json!({
        "code": common::fallback_variant::<ErrorCode>(),
        "phase": common::fallback_variant::<ChangeoverPhase>(),
        "outcome": common::fallback_variant::<ChangeoverOutcome>(),
        "source": common::fallback_variant::<PackageSource>(),
        "update_state": common::fallback_variant::<AgentUpdateState>(),
        "state": serde_json::to_value(
            serde_json::from_value::<CandidateState>(serde_json::json!({"state": "future_state"}))
                .expect("an unknown state reads")
        )
        .expect("serialises")["state"],
    });
    insta::assert_json_snapshot!("fallback_names", fallbacks);
}

// Only the codes that answer an admin request leave the connection open.
#[test]
fn request_error_codes() {
    let request_errors: Vec<&str> = common::unit_variants::<ErrorCode>()
        .into_iter()
        .filter(|name| {
            serde_json::from_value::<ErrorCode>(serde_json::Value::from(*name))
                .expect("a code reads back")
                .is_request_error()
        })
        .collect();
    insta::assert_json_snapshot!("request_error_codes", request_errors);
}

// Not wire messages, but as binding: what a vendor's feed holds.
#[test]
fn feed_files() {
    insta::assert_json_snapshot!("feed_manifest", feed_manifest());
    insta::assert_json_snapshot!("package_entry", server_entry());
    // The trusted comment of the archive's signature: the entry as one line.
    insta::assert_snapshot!(
        "package_entry_trusted_comment",
        serde_json::to_string(&server_entry()).expect("an entry serialises")
    );
    insta::assert_json_snapshot!("release_info", server_entry().release_info());
}

// A new message type fails here until it has a sample above, and so a snapshot.
#[test]
fn every_message_type_has_a_sample() {
    let client: BTreeSet<String> = client_samples()
        .iter()
        .map(|(_, message)| type_of(serde_json::to_value(message)))
        .collect();
    let server: BTreeSet<String> = server_samples()
        .iter()
        .map(|(_, message)| type_of(serde_json::to_value(message)))
        .collect();
    for message_type in common::tagged_variants::<ClientMessage>() {
        assert!(
            client.contains(message_type),
            "no sample of the client message {message_type:?}"
        );
    }
    for message_type in common::tagged_variants::<ServerMessage>() {
        assert!(
            server.contains(message_type),
            "no sample of the server message {message_type:?}"
        );
    }
}

fn type_of(value: serde_json::Result<serde_json::Value>) -> String {
    let value = value.expect("a message serialises");
    value["type"]
        .as_str()
        .expect("a message has a type")
        .to_owned()
}
