//! The agent's own updates, and its first install.
//!
//! An installed agent lives in a folder of its own: `DIR/bin/changeover-agent`,
//! `DIR/release.json` (its version) and `DIR/vendor.pub` (the vendor key it trusts).
//! When the server offers a newer agent release, the agent, as its policy says
//! (`--client-update auto|ask|never`):
//!
//! 1. screens the offer's plain fields against fixed limits (`offer::screen`: at most
//!    [`MAX_DOWNLOAD_BYTES`], a plain path on this server), then checks the trusted comment
//!    of the vendor's signature that comes with it with its own key, before believing any
//!    of it: a server can pass on only what the vendor signed, for this platform, newer;
//! 2. checks the free space, then downloads the archive from the server (resuming with
//!    `Range`, waiting its turn when the server says `503` + `Retry-After`), verifying
//!    size, hash and signature as the bytes arrive and stopping at the first byte beyond
//!    the signed size; a download that fails is removed;
//! 3. unpacks it into a staging folder and runs the new binary's `--version`;
//! 4. puts the release in place: the other files first, the binary with self-replace,
//!    `release.json` last, so an interrupted update reports the old version and is
//!    simply offered again;
//! 5. restarts in place and reconnects, reporting the new version.
//!
//! Every step is reported to the server (`agent_update_report`) and told the client
//! application (`update_*` on the local events stream, `events.rs`). Whatever fails leaves
//! the running agent as it was; the failure is reported, and the same release is tried
//! again only after [`RETRY_FAILED_AFTER`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use changeover_protocol::agent_events::{AgentEventKind, UpdateStep};
use changeover_protocol::package::{
    self, PackageError, PackageSignature, PackageVerifier, VendorKey,
};
use changeover_protocol::release::{ReleaseKind, current_platform};
use changeover_protocol::{AgentUpdateOffer, AgentUpdateState};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::events::Events;
pub use crate::offer::MAX_DOWNLOAD_BYTES;
use crate::offer::SignedComment;

/// The vendor key's file name in an installed agent's folder.
pub const VENDOR_KEY_FILE: &str = "vendor.pub";

/// A release that failed is not tried again before this long (or a restart).
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(15 * 60);

/// Download attempts after network failures before the update counts as failed.
const MAX_ATTEMPTS: u32 = 8;

/// How long the agent keeps waiting for a transfer slot the server has none of.
const MAX_QUEUE_WAIT: Duration = Duration::from_secs(60 * 60);

/// How long the new binary's `--version` may take.
const SELF_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// The staging folder's name inside the install folder.
const STAGING_DIR: &str = ".update-staging";

/// `--client-update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Update as soon as the server offers a newer release.
    Auto,
    /// Run `--ask-hook`; update when it exits 0.
    Ask,
    /// Never update; report the offer as declined.
    Never,
}

/// Where the running agent is installed.
#[derive(Debug, Clone)]
pub struct Installation {
    /// `DIR`, holding `bin/changeover-agent` and `release.json`.
    pub dir: PathBuf,
    /// The binary this process was started from.
    pub exe: PathBuf,
}

impl Installation {
    /// The install folder of the running binary, when it has a `release.json`.
    pub fn of_running_binary() -> Option<Installation> {
        let exe = std::env::current_exe().ok()?;
        let dir = exe.parent()?.parent()?.to_owned();
        dir.join("release.json")
            .is_file()
            .then_some(Installation { dir, exe })
    }
}

/// What an update task tells the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateEvent {
    /// Forward to the server as an `agent_update_report`.
    Report {
        version: String,
        state: AgentUpdateState,
        detail: Option<String>,
    },
    /// The new agent is in place: restart into it.
    Restart,
}

/// What the agent was told about its own updates.
#[derive(Debug, Clone)]
pub struct UpdateSettings {
    pub policy: Policy,
    pub ask_hook: Option<String>,
    /// `--public-key`; else the installation's `vendor.pub`.
    pub public_key: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// The server's WebSocket URL; archives are fetched from the same host and port.
    pub server_url: String,
    pub ca_file: Option<PathBuf>,
}

/// Decides on offers and runs at most one update at a time.
#[derive(Debug)]
pub struct Updater {
    settings: UpdateSettings,
    installation: Option<Installation>,
    running: semver::Version,
    platform: String,
    http: reqwest::Client,
    base_url: reqwest::Url,
    /// Versions that failed or were declined, when, and why.
    outcomes: Mutex<HashMap<String, (Instant, AgentUpdateState, String)>>,
    /// The version an update task is working on.
    busy: Mutex<Option<String>>,
    /// A failed trial of an update, to report once connected.
    pending_failure: Mutex<Option<crate::trial::Failure>>,
    /// The local events stream: the client application hears of every step too.
    agent_events: Events,
}

impl Updater {
    pub fn new(
        settings: UpdateSettings,
        running_version: &str,
        tls: Option<rustls::ClientConfig>,
        agent_events: Events,
    ) -> anyhow::Result<Arc<Updater>> {
        let base_url = http_base(&settings.server_url)?;
        let mut http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("changeover-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(tls) = tls {
            http = http.tls_backend_preconfigured(tls);
        }
        let http = http.build().context("cannot set up the HTTP client")?;
        let installation = Installation::of_running_binary();
        if let Some(installation) = &installation {
            // Files the last update had to move aside while they were in use (Windows).
            crate::files::clear_replaced(&installation.dir);
        }
        let mut outcomes = HashMap::new();
        let pending_failure = installation
            .as_ref()
            .and_then(|installation| crate::trial::take_failure(&installation.dir));
        if let Some(failure) = &pending_failure {
            warn!(version = %failure.version, reason = %failure.reason, "the last agent update was put back");
            outcomes.insert(
                failure.version.clone(),
                (
                    Instant::now(),
                    AgentUpdateState::Failed,
                    failure.reason.clone(),
                ),
            );
        }
        Ok(Arc::new(Updater {
            installation,
            running: running_version
                .parse()
                .unwrap_or(semver::Version::new(0, 0, 0)),
            platform: current_platform(),
            http,
            base_url,
            settings,
            outcomes: Mutex::new(outcomes),
            busy: Mutex::new(None),
            pending_failure: Mutex::new(pending_failure),
            agent_events,
        }))
    }

    /// The failed trial of an update to report to the server, if one is waiting.
    pub fn pending_failure(&self) -> Option<crate::trial::Failure> {
        self.pending_failure
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// The failed trial was reported; the client application hears of it now too (the
    /// new agent's stream ended with `update_installed`).
    pub fn failure_reported(&self) {
        let failure = self
            .pending_failure
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        if let Some(failure) = failure {
            self.agent_events.emit(AgentEventKind::UpdateFailed {
                version: failure.version,
                reason: failure.reason,
            });
        }
    }

    /// Where the running agent was installed when it started.
    pub fn installation(&self) -> Option<&Installation> {
        self.installation.as_ref()
    }

    /// Handles an offer from the server: ignored when it is not for this agent, answered
    /// from memory when this release already failed or was declined, else an update task
    /// starts (unless one runs already).
    pub fn consider(self: &Arc<Self>, offer: AgentUpdateOffer, events: mpsc::Sender<UpdateEvent>) {
        let Ok(offered) = offer.version.parse::<semver::Version>() else {
            warn!(version = %offer.version, "ignoring an update offer with an unreadable version");
            return;
        };
        if offer.platform != self.platform || offered <= self.running {
            return;
        }
        {
            let mut busy = self
                .busy
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if busy.is_some() {
                return;
            }
            let mut outcomes = self
                .outcomes
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if let Some((at, state, reason)) = outcomes.get(&offer.version) {
                let remembered = match state {
                    AgentUpdateState::Declined => true,
                    _ => at.elapsed() < RETRY_FAILED_AFTER,
                };
                if remembered {
                    let _ = events.try_send(UpdateEvent::Report {
                        version: offer.version.clone(),
                        state: *state,
                        detail: Some(reason.clone()),
                    });
                    return;
                }
                outcomes.remove(&offer.version);
            }
            self.agent_events.emit(AgentEventKind::UpdateOffered {
                version: offer.version.clone(),
            });
            if let Err(reason) = crate::offer::screen(&offer) {
                warn!(version = %offer.version, %reason, "refusing the agent update offer");
                self.agent_events.emit(AgentEventKind::UpdateFailed {
                    version: offer.version.clone(),
                    reason: reason.clone(),
                });
                outcomes.insert(
                    offer.version.clone(),
                    (Instant::now(), AgentUpdateState::Failed, reason.clone()),
                );
                let _ = events.try_send(UpdateEvent::Report {
                    version: offer.version.clone(),
                    state: AgentUpdateState::Failed,
                    detail: Some(reason),
                });
                return;
            }
            *busy = Some(offer.version.clone());
        }
        let updater = Arc::clone(self);
        tokio::spawn(async move {
            let version = offer.version.clone();
            let report = |state, detail| UpdateEvent::Report {
                version: version.clone(),
                state,
                detail,
            };
            match updater.update(&offer, &events).await {
                Ok(Done::Installed) => {
                    info!(%version, "agent update installed; restarting");
                    // Sent before the restart, to the clients of this agent, which see the
                    // stream end next: the new agent cannot know who missed it.
                    updater.agent_events.emit(AgentEventKind::UpdateInstalled {
                        version: version.clone(),
                    });
                    let _ = events
                        .send(report(
                            AgentUpdateState::Restarting,
                            Some("installed; restarting".to_owned()),
                        ))
                        .await;
                    let _ = events.send(UpdateEvent::Restart).await;
                    // Stays busy: nothing else happens before the restart.
                    return;
                }
                Ok(Done::Declined(reason)) => {
                    info!(%version, %reason, "agent update declined");
                    updater.agent_events.emit(AgentEventKind::UpdateDeclined {
                        version: version.clone(),
                        reason: reason.clone(),
                    });
                    updater.remember(&version, AgentUpdateState::Declined, &reason);
                    let _ = events
                        .send(report(AgentUpdateState::Declined, Some(reason)))
                        .await;
                }
                Err(err) => {
                    let reason = format!("{err:#}");
                    warn!(%version, %reason, "agent update failed; the running agent stays");
                    updater.agent_events.emit(AgentEventKind::UpdateFailed {
                        version: version.clone(),
                        reason: reason.clone(),
                    });
                    // A transfer that gave up on the network is tried again with the next
                    // offer (the server is back then); anything else waits a while.
                    if err.downcast_ref::<TransferGaveUp>().is_none() {
                        updater.remember(&version, AgentUpdateState::Failed, &reason);
                    }
                    let _ = events
                        .send(report(AgentUpdateState::Failed, Some(reason)))
                        .await;
                }
            }
            *updater
                .busy
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()) = None;
        });
    }

    fn remember(&self, version: &str, state: AgentUpdateState, reason: &str) {
        self.outcomes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .insert(
                version.to_owned(),
                (Instant::now(), state, reason.to_owned()),
            );
    }

    async fn update(
        &self,
        offer: &AgentUpdateOffer,
        events: &mpsc::Sender<UpdateEvent>,
    ) -> anyhow::Result<Done> {
        match self.settings.policy {
            Policy::Never => {
                return Ok(Done::Declined(
                    "this agent runs with --client-update never".to_owned(),
                ));
            }
            Policy::Ask => {
                if let Some(reason) = self.ask(offer).await {
                    return Ok(Done::Declined(reason));
                }
            }
            Policy::Auto => {}
        }
        let installation = self.installation.clone().context(
            "this agent is not an installed release (no release.json beside its bin folder); \
             install it with `changeover-agent install` to have it update itself",
        )?;
        let key_file = self
            .settings
            .public_key
            .clone()
            .unwrap_or_else(|| installation.dir.join(VENDOR_KEY_FILE));
        let no_key = || {
            format!(
                "no vendor key to check the update with (pass --public-key, or keep it in {})",
                installation.dir.join(VENDOR_KEY_FILE).display()
            )
        };
        let key_text = std::fs::read_to_string(&key_file)
            .with_context(|| format!("cannot read {}", key_file.display()))
            .with_context(no_key)?;
        let key = VendorKey::decode(&key_text)
            .map_err(|reason| anyhow::anyhow!("{}: {reason}", key_file.display()))
            .with_context(no_key)?;
        let comment_key = SignedComment::from_key_text(&key_text)
            .map_err(|reason| anyhow::anyhow!("{}: {reason}", key_file.display()))
            .with_context(no_key)?;
        let signature = self.check_offer(offer, &comment_key)?;
        let report = |state, detail: &str| UpdateEvent::Report {
            version: offer.version.clone(),
            state,
            detail: Some(detail.to_owned()),
        };
        self.agent_events.emit(AgentEventKind::UpdateInstalling {
            version: offer.version.clone(),
            step: UpdateStep::Downloading,
        });
        let _ = events
            .send(report(
                AgentUpdateState::Downloading,
                &format!("{} bytes", offer.size),
            ))
            .await;
        let archive = self.download(offer, &signature, &key).await?;
        self.agent_events.emit(AgentEventKind::UpdateInstalling {
            version: offer.version.clone(),
            step: UpdateStep::Installing,
        });
        let _ = events
            .send(report(AgentUpdateState::Installing, "verified"))
            .await;
        let version = offer.version.clone();
        let running = self.running.to_string();
        let result = tokio::task::spawn_blocking(move || {
            let staging = installation.dir.join(STAGING_DIR);
            let result = stage(&archive, &staging, &version).and_then(|()| {
                // The running release is kept whole until the new one has been welcomed.
                crate::trial::keep_previous(&installation.dir)?;
                if let Err(err) = put_in_place(&staging, &installation) {
                    // Never a mix of old and new files.
                    if let Err(undo) = crate::trial::restore_previous(&installation.dir) {
                        return Err(err.context(format!(
                            "and putting the previous files back failed: {undo:#}"
                        )));
                    }
                    return Err(err);
                }
                crate::trial::begin(&installation.dir, &running, &version)
            });
            let _ = std::fs::remove_dir_all(&staging);
            // Verified, but a release that did not stage must not stay on the disk either.
            let _ = std::fs::remove_file(&archive);
            result
        })
        .await
        .context("the install task failed")?;
        result.map(|()| Done::Installed)
    }

    // `--ask-hook`: `None` when it said yes (exit 0), else why not.
    async fn ask(&self, offer: &AgentUpdateOffer) -> Option<String> {
        let Some(command) = &self.settings.ask_hook else {
            return Some("--client-update ask, but no --ask-hook to ask with".to_owned());
        };
        let event = crate::hooks::HookEvent {
            event: "ask",
            deadline: String::new(),
            seconds_left: 0,
            target_version: offer.version.clone(),
            message: format!(
                "agent {} is available ({} bytes); the running agent is {}",
                offer.version, offer.size, self.running
            ),
        };
        match crate::hooks::run_for_status(command, &event).await {
            Ok(status) if status.success() => None,
            Ok(status) => Some(format!("the ask hook declined ({status})")),
            Err(reason) => Some(format!("the ask hook did not answer: {reason}")),
        }
    }

    // The offer must be exactly what the vendor signed: an agent release for this
    // platform, newer than the running one. The trusted comment is verified first, so no
    // field of it (the size above all) is believed on the server's word.
    fn check_offer(
        &self,
        offer: &AgentUpdateOffer,
        key: &SignedComment,
    ) -> anyhow::Result<PackageSignature> {
        key.verify(&offer.signature).map_err(anyhow::Error::msg)?;
        let signature = PackageSignature::decode(&offer.signature, &offer.archive)?;
        let signed = signature.claimed_entry();
        let matches = signed.kind == ReleaseKind::Agent
            && signed.version.to_string() == offer.version
            && signed.platform == offer.platform
            && signed.archive == offer.archive
            && signed.size == offer.size
            && signed.sha256.eq_ignore_ascii_case(&offer.sha256);
        if !matches {
            bail!(
                "the offer does not match the release its signature describes ({} {} {} for {})",
                signed.kind,
                signed.version,
                signed.archive,
                signed.platform
            );
        }
        if signed.size > MAX_DOWNLOAD_BYTES {
            bail!(
                "the signed archive is {} bytes, above the agent's download cap of \
                 {MAX_DOWNLOAD_BYTES} bytes",
                signed.size
            );
        }
        if signed.version <= self.running {
            bail!(
                "the offered {} is not newer than the running {}",
                signed.version,
                self.running
            );
        }
        if offer.archive.contains('/')
            || offer.archive.contains('\\')
            || offer.archive.starts_with('.')
        {
            bail!(
                "the archive name {:?} is not a plain file name",
                offer.archive
            );
        }
        Ok(signature)
    }

    // Fetches the archive into the state folder, verifying it as it arrives; returns the
    // verified archive. Whatever fails, the partial download is removed: a workstation's
    // disk does not keep what the agent could not use.
    async fn download(
        &self,
        offer: &AgentUpdateOffer,
        signature: &PackageSignature,
        key: &VendorKey,
    ) -> anyhow::Result<PathBuf> {
        let folder = self.settings.state_dir.join("updates");
        tokio::fs::create_dir_all(&folder)
            .await
            .with_context(|| format!("cannot create {}", folder.display()))?;
        let part = folder.join(format!("{}.part", offer.archive));
        let result = self
            .download_into(&folder, &part, offer, signature, key)
            .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&part).await;
        }
        result
    }

    async fn download_into(
        &self,
        folder: &Path,
        part: &Path,
        offer: &AgentUpdateOffer,
        signature: &PackageSignature,
        key: &VendorKey,
    ) -> anyhow::Result<PathBuf> {
        let url = archive_url(&self.base_url, &offer.path)?;
        // The size is the vendor's (its signed comment is verified) and within the cap.
        let have = tokio::fs::metadata(part)
            .await
            .map(|metadata| metadata.len())
            .unwrap_or(0);
        let folder_for_check = folder.to_owned();
        let needed = offer.size.saturating_sub(have);
        tokio::task::spawn_blocking(move || crate::disk::ensure_room(&folder_for_check, needed))
            .await
            .context("the free space check failed")??;
        let started = Instant::now();
        let mut failures = 0;
        loop {
            match self.attempt(&url, part, offer, signature, key).await {
                Ok(()) => break,
                Err(Attempt::Refused(err)) => return Err(err),
                Err(Attempt::ComeBack(after)) => {
                    if started.elapsed() > MAX_QUEUE_WAIT {
                        return Err(TransferGaveUp(format!(
                            "the server had no transfer slot for {} minutes",
                            MAX_QUEUE_WAIT.as_secs() / 60
                        ))
                        .into());
                    }
                    // The server's pause plus up to as much again, so a queue spreads.
                    let jitter = rand::random_range(0..=after.as_millis() as u64);
                    tokio::time::sleep(after + Duration::from_millis(jitter)).await;
                }
                Err(Attempt::Broken(reason)) => {
                    failures += 1;
                    if failures >= MAX_ATTEMPTS {
                        return Err(TransferGaveUp(format!(
                            "gave up after {failures} attempts: {reason}"
                        ))
                        .into());
                    }
                    let pause =
                        Duration::from_millis(rand::random_range(500..=1000u64 << failures.min(5)));
                    warn!(%reason, pause_ms = pause.as_millis() as u64, "agent update download broke off; resuming");
                    tokio::time::sleep(pause).await;
                }
            }
        }
        let archive = folder.join(&offer.archive);
        tokio::fs::rename(part, &archive)
            .await
            .with_context(|| format!("cannot move the download to {}", archive.display()))?;
        Ok(archive)
    }

    async fn attempt(
        &self,
        url: &reqwest::Url,
        part: &Path,
        offer: &AgentUpdateOffer,
        signature: &PackageSignature,
        key: &VendorKey,
    ) -> Result<(), Attempt> {
        let mut verifier = signature
            .verifier(key, &offer.archive)
            .map_err(|err| Attempt::Refused(err.into()))?;
        // The signed size, and never more than the cap whatever was signed.
        let limit = offer.size.min(MAX_DOWNLOAD_BYTES);
        let mut have = match tokio::fs::metadata(part).await {
            Ok(metadata) if metadata.len() <= limit => metadata.len(),
            _ => 0,
        };
        if have > 0 {
            hash_prefix(part, &mut verifier).await?;
        }
        if have < limit {
            let mut request = self.http.get(url.clone());
            if have > 0 {
                request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
            }
            let mut response = request
                .send()
                .await
                .map_err(|err| Attempt::Broken(error_chain(&err)))?;
            let status = response.status();
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                let after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|text| text.trim().parse::<u64>().ok())
                    .unwrap_or(5)
                    .clamp(1, 300);
                return Err(Attempt::ComeBack(Duration::from_secs(after)));
            }
            let append = status == reqwest::StatusCode::PARTIAL_CONTENT && have > 0;
            if !append {
                if !status.is_success() {
                    let reason = format!("the server answered {status} for {url}");
                    return Err(if status.is_server_error() {
                        Attempt::Broken(reason)
                    } else {
                        Attempt::Refused(anyhow::anyhow!(reason))
                    });
                }
                if have > 0 {
                    // Sent from the start after all: hash from the start.
                    verifier = signature
                        .verifier(key, &offer.archive)
                        .map_err(|err| Attempt::Refused(err.into()))?;
                    have = 0;
                }
            }
            if let Some(announced) = response.content_length()
                && announced > limit - have
            {
                return Err(Attempt::Refused(anyhow::anyhow!(
                    "the server announced {announced} bytes for {url}, more than the {} bytes \
                     left of the signed size",
                    limit - have
                )));
            }
            let mut file = open_part(part, append).await?;
            loop {
                let chunk = match response.chunk().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(err) => {
                        let _ = file.flush().await;
                        return Err(Attempt::Broken(error_chain(&err)));
                    }
                };
                // Not a byte beyond the signed size (or the cap) reaches the disk.
                if chunk.len() as u64 > limit - have {
                    return Err(Attempt::Refused(anyhow::anyhow!(
                        "{} grew beyond its signed size of {limit} bytes",
                        offer.archive
                    )));
                }
                verifier
                    .update(&chunk)
                    .map_err(|err| Attempt::Refused(err.into()))?;
                file.write_all(&chunk)
                    .await
                    .map_err(|err| local(part, err))?;
                have += chunk.len() as u64;
            }
            file.flush().await.map_err(|err| local(part, err))?;
            file.get_ref()
                .sync_data()
                .await
                .map_err(|err| local(part, err))?;
            if have < limit {
                return Err(Attempt::Broken(format!(
                    "the transfer ended after {have} of {limit} bytes"
                )));
            }
        }
        verifier
            .finish()
            .map(drop)
            .map_err(|err| Attempt::Refused(err.into()))
    }
}

/// The download gave up on the network; the next offer starts it again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransferGaveUp(String);

enum Done {
    Installed,
    Declined(String),
}

enum Attempt {
    /// Not worth trying again: a bad signature, a refused request.
    Refused(anyhow::Error),
    /// The server's slots are busy: come back after this long.
    ComeBack(Duration),
    /// The network: resume after a pause.
    Broken(String),
}

fn local(path: &Path, err: std::io::Error) -> Attempt {
    Attempt::Refused(anyhow::anyhow!("cannot write {}: {err}", path.display()))
}

async fn open_part(
    path: &Path,
    append: bool,
) -> Result<tokio::io::BufWriter<tokio::fs::File>, Attempt> {
    let mut options = tokio::fs::OpenOptions::new();
    options.create(true);
    if append {
        options.append(true);
    } else {
        options.write(true).truncate(true);
    }
    let file = options.open(path).await.map_err(|err| local(path, err))?;
    Ok(tokio::io::BufWriter::with_capacity(256 * 1024, file))
}

// What is on disk from an earlier attempt counts toward the hash first.
async fn hash_prefix(path: &Path, verifier: &mut PackageVerifier) -> Result<(), Attempt> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|err| local(path, err))?;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = file
            .read(&mut buffer)
            .await
            .map_err(|err| local(path, err))?;
        if read == 0 {
            return Ok(());
        }
        verifier
            .update(&buffer[..read])
            .map_err(|err| Attempt::Refused(err.into()))?;
    }
}

// ws://host:port → http://host:port/, wss:// → https://.
fn http_base(server_url: &str) -> anyhow::Result<reqwest::Url> {
    let mut url =
        reqwest::Url::parse(server_url).with_context(|| format!("{server_url:?} is not a URL"))?;
    let scheme = match url.scheme() {
        "ws" => "http",
        "wss" => "https",
        other => bail!("{server_url:?} has the scheme {other}, not ws or wss"),
    };
    url.set_scheme(scheme)
        .map_err(|()| anyhow::anyhow!("cannot turn {server_url:?} into an HTTP URL"))?;
    url.set_path("/");
    Ok(url)
}

// The offer's path on the server this agent is connected to; an offer pointing anywhere
// else is refused.
fn archive_url(base: &reqwest::Url, path: &str) -> anyhow::Result<reqwest::Url> {
    let url = base
        .join(path)
        .with_context(|| format!("{path:?} is not a usable path"))?;
    anyhow::ensure!(
        url.origin() == base.origin(),
        "the offer points to {url}, not to this server"
    );
    Ok(url)
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

// Unpacks the verified archive and runs the new binary's `--version`, which must name
// the version offered.
fn stage(archive: &Path, staging: &Path, version: &str) -> anyhow::Result<()> {
    if staging.exists() {
        std::fs::remove_dir_all(staging)
            .with_context(|| format!("cannot remove {}", staging.display()))?;
    }
    package::unpack(archive, staging)?;
    let binary = staging.join(ReleaseKind::Agent.binary_path());
    anyhow::ensure!(
        binary.is_file(),
        "the release has no {}",
        ReleaseKind::Agent.binary_path()
    );
    self_check(&binary, version)
}

fn self_check(binary: &Path, version: &str) -> anyhow::Result<()> {
    let mut child = std::process::Command::new(binary)
        .arg("--version")
        .env_remove(crate::identity::INSTANCE_ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("the new agent does not start: {}", binary.display()))?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > SELF_CHECK_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the new agent's --version did not finish within {} s",
                SELF_CHECK_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut output = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        use std::io::Read as _;
        let _ = stdout.read_to_string(&mut output);
    }
    anyhow::ensure!(
        status.success(),
        "the new agent's --version failed ({status})"
    );
    anyhow::ensure!(
        output.split_whitespace().any(|word| word == version),
        "the new agent says it is {:?}, not {version}",
        output.trim()
    );
    Ok(())
}

// The other files first, then the binary (self-replace), then release.json: until the
// last rename the agent still reports its old version and would be offered the update
// again.
fn put_in_place(staging: &Path, installation: &Installation) -> anyhow::Result<()> {
    let binary = Path::new(ReleaseKind::Agent.binary_path());
    let release_json = Path::new("release.json");
    for file in files_under(staging)? {
        let relative = file.strip_prefix(staging).context("a staged file")?;
        if relative == binary || relative == release_json {
            continue;
        }
        let target = installation.dir.join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        crate::files::replace(&installation.dir, &file, &target)
            .with_context(|| format!("cannot put {} in place", target.display()))?;
    }
    self_replace::self_replace(staging.join(binary)).context("cannot replace the agent binary")?;
    std::fs::rename(
        staging.join(release_json),
        installation.dir.join(release_json),
    )
    .context("cannot put release.json in place")?;
    Ok(())
}

fn files_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut folders = vec![dir.to_owned()];
    while let Some(folder) = folders.pop() {
        for item in std::fs::read_dir(&folder)
            .with_context(|| format!("cannot read {}", folder.display()))?
        {
            let item = item?;
            if item.file_type()?.is_dir() {
                folders.push(item.path());
            } else {
                files.push(item.path());
            }
        }
    }
    Ok(files)
}

/// Starts the agent binary again, with the same arguments: the agent that was just put in
/// place. It gets this process's instance id ([`crate::identity::INSTANCE_ENV`]), so the
/// server sees the same agent reconnecting and not a clone. `before` is told the pid the
/// new agent runs as, before this process lets go: on Unix the new agent is this process
/// (`exec`); on Windows, where a running program cannot become another, it is a new
/// process, started first, and this one then exits. Returns only when that fails.
pub fn restart(exe: &Path, before: impl FnOnce(u32)) -> std::io::Error {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut command = std::process::Command::new(exe);
    command.args(&args).env(
        crate::identity::INSTANCE_ENV,
        crate::identity::instance_id(),
    );
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        before(std::process::id());
        command.exec()
    }
    #[cfg(not(unix))]
    {
        match command.spawn() {
            Ok(child) => {
                before(child.id());
                std::process::exit(0)
            }
            Err(err) => err,
        }
    }
}

/// What `changeover-agent install` was given.
#[derive(Debug)]
pub struct InstallOptions {
    pub dir: PathBuf,
    pub package: PathBuf,
    pub public_key: PathBuf,
}

/// Installs an agent release into `DIR`, verified against the vendor key with the
/// signature beside the archive; returns its version. Nothing is left behind on failure.
pub fn install(options: &InstallOptions) -> anyhow::Result<semver::Version> {
    let key = VendorKey::from_file(&options.public_key)?;
    let entry = package::verify_for_install(&options.package, &key, ReleaseKind::Agent)
        .map_err(|err| match err {
            PackageError::WrongKind { .. } => {
                anyhow::anyhow!("{err}; install server releases with `changeover-server install`")
            }
            err => anyhow::Error::from(err),
        })
        .with_context(|| format!("refusing to install {}", options.package.display()))?;
    let dir = &options.dir;
    if dir.join("release.json").exists() {
        bail!(
            "{} already holds an agent release; it updates itself from the server",
            dir.display()
        );
    }
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_none();
        anyhow::ensure!(
            empty,
            "{} exists and is not empty; install into a new or empty folder",
            dir.display()
        );
        std::fs::remove_dir(dir).with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    let parent = dir
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dir
        .file_name()
        .context("the install folder needs a name")?
        .to_string_lossy();
    let staging = parent.join(format!(".{name}.installing"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot remove {}", staging.display()))?;
    }
    let result = package::unpack(&options.package, &staging)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            anyhow::ensure!(
                staging.join(ReleaseKind::Agent.binary_path()).is_file(),
                "the release has no {}",
                ReleaseKind::Agent.binary_path()
            );
            std::fs::copy(&options.public_key, staging.join(VENDOR_KEY_FILE))
                .context("cannot copy the vendor key")?;
            std::fs::rename(&staging, dir)
                .with_context(|| format!("cannot move the release to {}", dir.display()))
        });
    if let Err(err) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(err);
    }
    Ok(entry.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_events() -> Events {
        Events::new("ws://127.0.0.1:1", "1.0.0")
    }

    #[test]
    fn an_offer_cannot_point_elsewhere() {
        let base = http_base("ws://10.0.0.5:7600").unwrap();
        assert!(archive_url(&base, "http://attacker.example/a.tar.gz").is_err());
        assert!(archive_url(&base, "//attacker.example/a.tar.gz").is_err());
        assert!(archive_url(&base, "http://10.0.0.5:7601/a.tar.gz").is_err());
        assert_eq!(
            archive_url(&base, "/agent-updates/a.tar.gz")
                .unwrap()
                .as_str(),
            "http://10.0.0.5:7600/agent-updates/a.tar.gz"
        );
    }

    /// A vendor, a signed 1,000-byte agent archive, and an offer of it from `server_url`.
    struct SignedOffer {
        public_key: String,
        key: VendorKey,
        signature: PackageSignature,
        offer: AgentUpdateOffer,
    }

    fn signed_offer(server_url_path: &str) -> SignedOffer {
        let pair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let platform = current_platform();
        let archive = format!("agent-9.0.0-{platform}.tar.gz");
        let entry = serde_json::json!({
            "product": "changeover",
            "kind": "agent",
            "version": "9.0.0",
            "platform": platform,
            "archive": archive,
            "size": 1000,
            "sha256": "ab".repeat(32),
            "date": "2026-01-01T00:00:00Z",
        });
        let signature_text = minisign::sign(
            None,
            &pair.sk,
            &[b'x'; 1000][..],
            Some(&entry.to_string()),
            None,
        )
        .unwrap()
        .to_string();
        let public_key = pair.pk.to_box().unwrap().to_string();
        let key = VendorKey::decode(&public_key).unwrap();
        SignedOffer {
            public_key,
            key,
            signature: PackageSignature::decode(&signature_text, &archive).unwrap(),
            offer: AgentUpdateOffer {
                version: "9.0.0".to_owned(),
                platform,
                archive,
                size: 1000,
                sha256: "ab".repeat(32),
                path: server_url_path.to_owned(),
                signature: signature_text,
            },
        }
    }

    // An HTTP server that answers every request with `head` and then `body_bytes` bytes.
    async fn serve_too_much(head: &'static str, body_bytes: usize) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => request.extend_from_slice(&buffer[..read]),
                        }
                    }
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(&vec![b'x'; body_bytes]).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        address
    }

    // Downloads the signed offer from `address`; the result and the state folder.
    async fn download_from(
        address: std::net::SocketAddr,
    ) -> (anyhow::Result<PathBuf>, tempfile::TempDir) {
        let state = tempfile::tempdir().unwrap();
        let settings = UpdateSettings {
            policy: Policy::Auto,
            ask_hook: None,
            public_key: None,
            state_dir: state.path().to_owned(),
            server_url: format!("ws://{address}"),
            ca_file: None,
        };
        let updater = Updater::new(settings, "1.0.0", None, test_events()).unwrap();
        let signed = signed_offer("/agent-updates/agent.tar.gz");
        let result = updater
            .download(&signed.offer, &signed.signature, &signed.key)
            .await;
        (result, state)
    }

    fn files_in(folder: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(folder)
            .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn a_download_announced_beyond_its_signed_size_is_refused_and_removed() {
        let address = serve_too_much("HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", 5000).await;
        let (result, state) = download_from(address).await;
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.contains("announced 5000 bytes"), "{err}");
        assert_eq!(
            files_in(&state.path().join("updates")),
            Vec::<PathBuf>::new()
        );
    }

    #[tokio::test]
    async fn a_download_stops_at_the_first_byte_beyond_its_signed_size() {
        // No length announced: the body simply goes on.
        let address = serve_too_much("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", 300_000).await;
        let (result, state) = download_from(address).await;
        let err = format!("{:#}", result.unwrap_err());
        assert!(
            err.contains("grew beyond its signed size of 1000 bytes"),
            "{err}"
        );
        assert_eq!(
            files_in(&state.path().join("updates")),
            Vec::<PathBuf>::new()
        );
    }

    #[tokio::test]
    async fn an_offer_is_believed_only_once_its_trusted_comment_verifies() {
        let signed = signed_offer("/agent-updates/agent.tar.gz");
        let settings = UpdateSettings {
            policy: Policy::Auto,
            ask_hook: None,
            public_key: None,
            state_dir: PathBuf::from("/nonexistent"),
            server_url: "ws://127.0.0.1:1".to_owned(),
            ca_file: None,
        };
        let updater = Updater::new(settings, "1.0.0", None, test_events()).unwrap();
        let vendor = SignedComment::from_key_text(&signed.public_key).unwrap();
        assert!(updater.check_offer(&signed.offer, &vendor).is_ok());

        let stranger = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let stranger =
            SignedComment::from_key_text(&stranger.pk.to_box().unwrap().to_string()).unwrap();
        let err = updater
            .check_offer(&signed.offer, &stranger)
            .unwrap_err()
            .to_string();
        assert!(err.contains("another key"), "{err}");

        // A server that writes another size into the signed comment is caught before a
        // byte is fetched.
        let forged = AgentUpdateOffer {
            signature: signed
                .offer
                .signature
                .replace("\"size\":1000", "\"size\":400000000"),
            size: 400_000_000,
            ..signed.offer.clone()
        };
        assert_ne!(forged.signature, signed.offer.signature);
        let err = updater
            .check_offer(&forged, &vendor)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not verify"), "{err}");
    }

    #[test]
    fn archives_come_from_the_websocket_host_and_port() {
        assert_eq!(
            http_base("ws://10.0.0.5:7600").unwrap().as_str(),
            "http://10.0.0.5:7600/"
        );
        assert_eq!(
            http_base("wss://server.example.com:7600/x")
                .unwrap()
                .join("/agent-updates/a.tar.gz")
                .unwrap()
                .as_str(),
            "https://server.example.com:7600/agent-updates/a.tar.gz"
        );
        assert!(http_base("http://example.com").is_err());
    }
}
