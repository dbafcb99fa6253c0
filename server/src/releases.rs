//! The server's releases: what the feed offers, the packages verified and waiting in
//! `<root>/state/downloads/`, and the candidate a changeover would install.
//!
//! Packages reach the downloads folder only verified: from the feed (downloaded, resumable,
//! checked while streaming) or from the inbox (checked, then moved). Whatever happens is
//! published as events every logged-in admin receives, and summarised in a snapshot the
//! status report reads. Only one download runs at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use changeover_protocol::package::{self, PackageError, VendorKey};
use changeover_protocol::release::{FeedManifest, PackageEntry, ReleaseKind, current_platform};
use changeover_protocol::{
    CandidateState, CandidateStatus, ErrorCode, FeedStatus, PackageSource, ServerMessage,
};
use tokio::sync::{Mutex, broadcast, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{info, warn};

use crate::download::{Download, DownloadEvent};
use crate::feed::{Feed, FeedError};
use crate::hub::encode;

/// Events an admin may fall behind before being dropped.
const EVENT_RING: usize = 256;

/// Progress is reported at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// A verified package in the downloads folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyPackage {
    pub entry: PackageEntry,
    pub source: PackageSource,
    pub archive: PathBuf,
}

/// What the status report shows of the releases.
#[derive(Debug, Clone, Default)]
pub struct ReleaseSnapshot {
    pub feed: FeedStatus,
    /// Verified packages waiting in the downloads folder, any kind.
    pub ready: Vec<ReadyPackage>,
    /// The download running now: version, bytes so far, size.
    pub downloading: Option<(semver::Version, u64, u64)>,
    pub last_refusal: Option<String>,
    /// A version the admin explicitly fetched as a downgrade; it is the candidate while
    /// it is ready.
    pub downgrade_to: Option<semver::Version>,
    /// When the feed was last asked, and whether that worked.
    checked: Option<(Instant, bool)>,
}

/// A failed look at the feed is repeated after this long, whatever the caller allows.
const FAILED_CHECK_MAX_AGE: Duration = Duration::from_secs(5);

/// A refused admin request: the error code and the sentence for the admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRefusal {
    pub code: ErrorCode,
    pub message: String,
}

impl RequestRefusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> RequestRefusal {
        RequestRefusal {
            code,
            message: message.into(),
        }
    }
}

/// How the releases are set up.
#[derive(Debug, Clone)]
pub struct ReleaseSettings {
    pub feed_url: Option<String>,
    pub public_key: PathBuf,
    pub allow_downgrade: bool,
    pub downloads_dir: PathBuf,
    pub inbox_dir: PathBuf,
    pub installed_version: semver::Version,
    /// First pause between download attempts.
    pub retry_base: Duration,
}

/// The releases of one server; shared by the connections, the feed checker and the inbox.
#[derive(Debug)]
pub struct Releases {
    settings: ReleaseSettings,
    platform: String,
    feed: Result<Feed, String>,
    state: watch::Sender<ReleaseSnapshot>,
    events: broadcast::Sender<Utf8Bytes>,
    /// Held while the feed is read, so concurrent status requests share one check.
    check_lock: Mutex<()>,
    download_running: AtomicBool,
}

impl Releases {
    pub fn new(settings: ReleaseSettings) -> Arc<Releases> {
        let feed = match &settings.feed_url {
            None => Err("no feed.url is configured; packages come only from the inbox".to_owned()),
            Some(url) => VendorKey::from_file(&settings.public_key)
                .map_err(|err| err.to_string())
                .and_then(|key| Feed::new(url, key).map_err(|err| err.to_string())),
        };
        let snapshot = ReleaseSnapshot {
            feed: FeedStatus {
                url: settings.feed_url.clone(),
                error: feed
                    .as_ref()
                    .err()
                    .filter(|_| settings.feed_url.is_some())
                    .cloned(),
                ..FeedStatus::default()
            },
            ..ReleaseSnapshot::default()
        };
        let (events, _) = broadcast::channel(EVENT_RING);
        Arc::new(Releases {
            settings,
            platform: current_platform(),
            feed,
            state: watch::Sender::new(snapshot),
            events,
            check_lock: Mutex::new(()),
            download_running: AtomicBool::new(false),
        })
    }

    pub fn settings(&self) -> &ReleaseSettings {
        &self.settings
    }

    pub fn snapshot(&self) -> ReleaseSnapshot {
        self.state.borrow().clone()
    }

    /// Wakes whenever the snapshot changes (a package became ready, a download moved).
    pub fn watch(&self) -> watch::Receiver<ReleaseSnapshot> {
        self.state.subscribe()
    }

    /// The verified agent packages of the installed server version, one per platform:
    /// what this server offers to older agents.
    pub fn agent_releases(&self) -> Vec<ReadyPackage> {
        let installed = &self.settings.installed_version;
        self.state
            .borrow()
            .ready
            .iter()
            .filter(|package| {
                package.entry.kind == ReleaseKind::Agent && &package.entry.version == installed
            })
            .cloned()
            .collect()
    }

    /// Fetches and verifies the agent releases of `version` from the feed (every platform
    /// it has), so that a changeover to `version` can offer them to the agents afterwards.
    /// A feed without an agent release of that version, or no feed at all, is not an
    /// error: the agents then stay as they are. A package that fails its verification is.
    pub async fn fetch_agent_releases(
        &self,
        version: &semver::Version,
    ) -> Result<Vec<ReadyPackage>, String> {
        let ready_now = || {
            self.snapshot()
                .ready
                .into_iter()
                .filter(|package| {
                    package.entry.kind == ReleaseKind::Agent && &package.entry.version == version
                })
                .collect::<Vec<_>>()
        };
        let Ok(feed) = &self.feed else {
            return Ok(ready_now());
        };
        let manifest = {
            let _one_check_at_a_time = self.check_lock.lock().await;
            let result = feed.manifest().await;
            self.record_check(&result);
            match result {
                Ok(manifest) => manifest,
                Err(err) => {
                    warn!(cause = %err, "cannot read the feed for the agent release; offering what is here");
                    return Ok(ready_now());
                }
            }
        };
        let wanted: Vec<PackageEntry> = manifest
            .releases
            .iter()
            .filter(|entry| entry.kind == ReleaseKind::Agent && &entry.version == version)
            .cloned()
            .collect();
        for entry in wanted {
            let have = ready_now().iter().any(|ready| {
                ready.entry.same_release(&entry)
                    && ready.entry.sha256.eq_ignore_ascii_case(&entry.sha256)
            });
            if have {
                continue;
            }
            // One download at a time: wait for an admin's download to end.
            while self
                .download_running
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let outcome = match feed.package_signature(&entry).await {
                Ok((signature, text)) => {
                    self.download(entry.clone(), signature, text).await;
                    Ok(())
                }
                Err(err) => Err(err.to_string()),
            };
            self.download_running.store(false, Ordering::Release);
            outcome.map_err(|reason| format!("agent release {}: {reason}", entry.archive))?;
            let fetched = ready_now()
                .iter()
                .any(|ready| ready.entry.same_release(&entry));
            if !fetched {
                let reason = self
                    .snapshot()
                    .last_refusal
                    .unwrap_or_else(|| "it did not verify".to_owned());
                return Err(format!("agent release {}: {reason}", entry.archive));
            }
        }
        Ok(ready_now())
    }

    /// Every event from now on, serialised once for all admins.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Utf8Bytes> {
        self.events.subscribe()
    }

    /// Sends a message to every logged-in admin (release and changeover events alike).
    pub fn publish(&self, message: &ServerMessage) {
        let _ = self.events.send(Utf8Bytes::from(encode(message)));
    }

    /// The newest server release newer than the installed one, from the feed or ready.
    pub fn available_version(&self) -> Option<String> {
        let snapshot = self.state.borrow();
        let installed = &self.settings.installed_version;
        let from_feed = snapshot
            .feed
            .newest_version
            .as_deref()
            .and_then(|version| version.parse::<semver::Version>().ok());
        let ready = self
            .candidate_in(&snapshot)
            .map(|package| package.entry.version.clone());
        from_feed
            .into_iter()
            .chain(ready)
            .filter(|version| version > installed)
            .max()
            .map(|version| version.to_string())
    }

    /// The verified server package a changeover would install: the newest one above the
    /// installed version.
    pub fn candidate(&self) -> Option<ReadyPackage> {
        self.candidate_in(&self.state.borrow()).cloned()
    }

    fn candidate_in<'a>(&self, snapshot: &'a ReleaseSnapshot) -> Option<&'a ReadyPackage> {
        let servers = || {
            snapshot
                .ready
                .iter()
                .filter(|package| package.entry.kind == ReleaseKind::Server)
        };
        if let Some(wanted) = &snapshot.downgrade_to
            && let Some(package) = servers().find(|package| &package.entry.version == wanted)
        {
            return Some(package);
        }
        servers()
            .filter(|package| {
                package.entry.version > self.settings.installed_version
                    || self.settings.allow_downgrade
            })
            .max_by(|a, b| a.entry.version.cmp(&b.entry.version))
    }

    /// The candidate as the status report shows it.
    pub fn candidate_status(&self) -> Option<CandidateStatus> {
        let snapshot = self.state.borrow();
        if let Some((version, bytes, size)) = &snapshot.downloading {
            return Some(CandidateStatus {
                version: version.to_string(),
                source: PackageSource::Feed,
                state: CandidateState::Downloading {
                    bytes: *bytes,
                    size: *size,
                },
            });
        }
        self.candidate_in(&snapshot).map(|package| CandidateStatus {
            version: package.entry.version.to_string(),
            source: package.source,
            state: CandidateState::Ready,
        })
    }

    /// Reads the feed unless it was read within `max_age`; failures land in the snapshot.
    pub async fn check_feed_if_older_than(&self, max_age: Duration) {
        let fresh = self.state.borrow().checked.is_some_and(|(at, worked)| {
            at.elapsed()
                < if worked {
                    max_age
                } else {
                    FAILED_CHECK_MAX_AGE.min(max_age)
                }
        });
        if !fresh {
            let _ = self.check_feed().await;
        }
    }

    /// Reads and verifies the feed's manifest; returns the newest server release for this
    /// platform.
    pub async fn check_feed(&self) -> Result<Option<PackageEntry>, RequestRefusal> {
        let feed = self
            .feed
            .as_ref()
            .map_err(|reason| RequestRefusal::new(ErrorCode::FeedUnavailable, reason.clone()))?;
        let _one_check_at_a_time = self.check_lock.lock().await;
        let result = feed.manifest().await;
        self.record_check(&result);
        match result {
            Ok(manifest) => Ok(manifest
                .newest(ReleaseKind::Server, &self.platform)
                .cloned()),
            Err(err) => {
                warn!(cause = %err, "cannot read the feed");
                Err(RequestRefusal::new(
                    ErrorCode::FeedUnavailable,
                    err.to_string(),
                ))
            }
        }
    }

    fn record_check(&self, result: &Result<FeedManifest, FeedError>) {
        let now = SystemTime::now();
        self.state.send_modify(|snapshot| {
            snapshot.checked = Some((Instant::now(), result.is_ok()));
            match result {
                Ok(manifest) => {
                    snapshot.feed.checked_at = Some(now);
                    snapshot.feed.error = None;
                    let newest = manifest.newest(ReleaseKind::Server, &self.platform);
                    snapshot.feed.newest_version = newest.map(|entry| entry.version.to_string());
                    snapshot.feed.newest_notes = newest
                        .map(|entry| entry.notes.clone())
                        .filter(|notes| !notes.is_empty());
                }
                Err(err) => snapshot.feed.error = Some(err.to_string()),
            }
        });
    }

    /// Starts fetching a server release (the newest when `version` is `None`) and returns
    /// its version; progress and the outcome arrive as events.
    pub async fn start_download(
        self: &Arc<Self>,
        version: Option<semver::Version>,
        allow_downgrade: bool,
    ) -> Result<semver::Version, RequestRefusal> {
        let feed = self
            .feed
            .as_ref()
            .map_err(|reason| RequestRefusal::new(ErrorCode::FeedUnavailable, reason.clone()))?;
        let manifest = {
            let _one_check_at_a_time = self.check_lock.lock().await;
            let result = feed.manifest().await;
            self.record_check(&result);
            result
                .map_err(|err| RequestRefusal::new(ErrorCode::FeedUnavailable, err.to_string()))?
        };
        let entry = match &version {
            Some(version) => manifest.find(ReleaseKind::Server, &self.platform, version),
            None => manifest.newest(ReleaseKind::Server, &self.platform),
        }
        .cloned()
        .ok_or_else(|| {
            let which = version
                .as_ref()
                .map_or("any server release".to_owned(), |v| format!("server {v}"));
            RequestRefusal::new(
                ErrorCode::ReleaseNotFound,
                format!("the feed has no {which} for {}", self.platform),
            )
        })?;
        self.check_version(&entry.version, allow_downgrade)?;
        if entry.version <= self.settings.installed_version {
            let wanted = entry.version.clone();
            self.state
                .send_modify(|snapshot| snapshot.downgrade_to = Some(wanted));
        }
        if let Some(ready) = self.snapshot().ready.into_iter().find(|ready| {
            ready.entry.same_release(&entry)
                && ready.entry.sha256.eq_ignore_ascii_case(&entry.sha256)
        }) {
            // Already verified and waiting: say so without fetching it again.
            self.publish(&ServerMessage::PackageReady {
                version: entry.version.to_string(),
                source: ready.source,
                archive: entry.archive.clone(),
            });
            return Ok(entry.version);
        }
        if self
            .download_running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(RequestRefusal::new(
                ErrorCode::Busy,
                "a download is already running; wait for it to end",
            ));
        }
        let (signature, signature_text) = match feed.package_signature(&entry).await {
            Ok(found) => found,
            Err(err) => {
                self.download_running.store(false, Ordering::Release);
                return Err(RequestRefusal::new(
                    ErrorCode::FeedUnavailable,
                    err.to_string(),
                ));
            }
        };
        let releases = Arc::clone(self);
        let version = entry.version.clone();
        tokio::spawn(async move {
            releases.download(entry, signature, signature_text).await;
            releases.download_running.store(false, Ordering::Release);
        });
        Ok(version)
    }

    fn check_version(
        &self,
        version: &semver::Version,
        allow_downgrade: bool,
    ) -> Result<(), RequestRefusal> {
        let installed = &self.settings.installed_version;
        if version > installed || allow_downgrade || self.settings.allow_downgrade {
            return Ok(());
        }
        Err(RequestRefusal::new(
            ErrorCode::NotNewer,
            format!(
                "server {version} is not newer than the installed {installed}; a downgrade \
                 must be allowed explicitly (admin download --allow-downgrade, or \
                 feed.allow_downgrade in the config)"
            ),
        ))
    }

    async fn download(
        &self,
        entry: PackageEntry,
        signature: package::PackageSignature,
        signature_text: String,
    ) {
        let feed = match &self.feed {
            Ok(feed) => feed,
            Err(_) => return,
        };
        let version = entry.version.to_string();
        if let Err(err) = std::fs::create_dir_all(&self.settings.downloads_dir) {
            self.refuse(
                Some(&version),
                PackageSource::Feed,
                format!("cannot create the downloads folder: {err}"),
            );
            return;
        }
        let archive = self.settings.downloads_dir.join(&entry.archive);
        let part_file = self
            .settings
            .downloads_dir
            .join(format!("{}.part", entry.archive));
        info!(kind = %entry.kind, %version, size = entry.size, "downloading a release");
        // Progress is the admin's for server releases; an agent release comes along with
        // one, quietly (the admin follows the server's download).
        let announce = entry.kind == ReleaseKind::Server;
        if announce {
            self.state.send_modify(|snapshot| {
                snapshot.downloading = Some((entry.version.clone(), 0, entry.size));
            });
        }
        let download = Download {
            feed,
            entry: &entry,
            signature: &signature,
            part_file: part_file.clone(),
            retry_base: self.settings.retry_base,
        };
        let mut last_report = Instant::now() - PROGRESS_INTERVAL;
        let result = download
            .run(|event| match event {
                _ if !announce => {}
                DownloadEvent::Started { resumed_from } => {
                    self.publish(&ServerMessage::DownloadStarted {
                        version: version.clone(),
                        size: entry.size,
                        resumed_from,
                    });
                }
                DownloadEvent::Progress { bytes } => {
                    self.state.send_modify(|snapshot| {
                        snapshot.downloading = Some((entry.version.clone(), bytes, entry.size));
                    });
                    if last_report.elapsed() >= PROGRESS_INTERVAL || bytes == entry.size {
                        last_report = Instant::now();
                        self.publish(&ServerMessage::DownloadProgress {
                            version: version.clone(),
                            bytes,
                            size: entry.size,
                        });
                    }
                }
                DownloadEvent::Retrying {
                    attempt,
                    delay,
                    reason,
                } => {
                    warn!(%version, attempt, %reason, "download broke off; resuming later");
                    self.publish(&ServerMessage::DownloadRetrying {
                        version: version.clone(),
                        attempt,
                        retry_in_ms: delay.as_millis() as u64,
                        reason,
                    });
                }
            })
            .await;
        if announce {
            self.state
                .send_modify(|snapshot| snapshot.downloading = None);
        }
        let outcome = result.map_err(|err| err.to_string()).and_then(|()| {
            // The signature goes in first: an archive without one is never trusted.
            crate::release_tools::write_atomically(
                &package::signature_path(&archive),
                signature_text.as_bytes(),
                false,
            )
            .and_then(|()| {
                std::fs::rename(&part_file, &archive)
                    .map_err(|err| anyhow::anyhow!("cannot move the download into place: {err}"))
            })
            .map_err(|err| format!("{err:#}"))
        });
        match outcome {
            Ok(()) => self.ready(ReadyPackage {
                entry,
                source: PackageSource::Feed,
                archive,
            }),
            Err(reason) => self.refuse(Some(&version), PackageSource::Feed, reason),
        }
    }

    /// Records a verified package and tells the admins.
    pub fn ready(&self, package: ReadyPackage) {
        info!(
            kind = %package.entry.kind,
            version = %package.entry.version,
            source = %package.source,
            "package verified and ready"
        );
        self.publish(&ServerMessage::PackageReady {
            version: package.entry.version.to_string(),
            source: package.source,
            archive: package.entry.archive.clone(),
        });
        self.state.send_modify(|snapshot| {
            snapshot
                .ready
                .retain(|ready| !ready.entry.same_release(&package.entry));
            snapshot.ready.push(package);
        });
    }

    /// Records a refusal and tells the admins.
    pub fn refuse(&self, version: Option<&str>, source: PackageSource, reason: String) {
        warn!(?version, %source, %reason, "package refused");
        self.publish(&ServerMessage::PackageRefused {
            version: version.map(str::to_owned),
            source,
            reason: reason.clone(),
        });
        self.state
            .send_modify(|snapshot| snapshot.last_refusal = Some(reason));
    }

    /// Checks a package (archive with its `.minisig` beside it) for this server: signature,
    /// size, hash, and for server releases the platform and (with `version_rule`) that it
    /// is newer than the installed one. Agent releases may be for any workstation platform.
    pub fn verify_local(&self, archive: &Path, version_rule: bool) -> Result<PackageEntry, String> {
        let key = VendorKey::from_file(&self.settings.public_key).map_err(|err| err.to_string())?;
        let entry =
            package::verify_archive(archive, &key).map_err(|err: PackageError| err.to_string())?;
        if entry.kind == ReleaseKind::Server {
            if entry.platform != self.platform {
                return Err(format!(
                    "{} is built for {}, this server runs on {}",
                    entry.archive, entry.platform, self.platform
                ));
            }
            if version_rule {
                self.check_version(&entry.version, false)
                    .map_err(|refusal| refusal.message)?;
            }
        }
        Ok(entry)
    }

    /// Deletes verified packages no changeover can use any more: server releases not newer
    /// than the installed one (unless downgrades are allowed) and agent releases older than
    /// it. The agent release of the installed version stays: it is what agents are offered.
    /// Call only when no changeover is under way.
    pub fn prune(&self) {
        let installed = self.settings.installed_version.clone();
        let allow_downgrade = self.settings.allow_downgrade;
        let useless = |package: &ReadyPackage| match package.entry.kind {
            ReleaseKind::Server => package.entry.version <= installed && !allow_downgrade,
            ReleaseKind::Agent => package.entry.version < installed,
        };
        let mut removed = Vec::new();
        self.state.send_if_modified(|snapshot| {
            let before = snapshot.ready.len();
            snapshot.ready.retain(|package| {
                if useless(package) {
                    removed.push(package.archive.clone());
                    false
                } else {
                    true
                }
            });
            snapshot.ready.len() != before
        });
        for archive in removed {
            info!(archive = %archive.display(), "removing a package no changeover can use any more");
            let _ = std::fs::remove_file(package::signature_path(&archive));
            let _ = std::fs::remove_file(&archive);
        }
    }

    /// Verifies the packages already in the downloads folder (from before a restart).
    /// Unverifiable files are deleted, so nothing untrusted stays where packages are trusted.
    pub fn load_downloads(&self) {
        let Ok(listing) = std::fs::read_dir(&self.settings.downloads_dir) else {
            return;
        };
        for item in listing.flatten() {
            let path = item.path();
            let is_archive = path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.ends_with(".tar.gz"));
            if !is_archive {
                continue;
            }
            // Versions were judged when the package arrived; the candidate rule picks.
            match self.verify_local(&path, false) {
                Ok(entry) => {
                    self.state.send_modify(|snapshot| {
                        snapshot.ready.push(ReadyPackage {
                            entry,
                            source: PackageSource::Feed,
                            archive: path.clone(),
                        });
                    });
                }
                Err(reason) => {
                    warn!(path = %path.display(), %reason, "removing an unverifiable download");
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(package::signature_path(&path));
                }
            }
        }
    }
}
