//! The agents' own updates: which agent release this server offers, and serving it.
//!
//! After a changeover to version V the server holds the agent release V (fetched and
//! verified with the server release, before anyone was warned). Every agent older than V
//! is offered it right after its welcome, and once more by broadcast when the package
//! becomes ready while agents are already connected. The agent fetches the archive from
//! this server, over HTTP(S) on the port its WebSocket uses, and verifies it against the
//! vendor key it trusts itself: the offer carries the vendor's signature, so a server can
//! only pass on what the vendor signed.
//!
//! Downloads are plain `GET`/`HEAD` requests with `Range` support, streamed from the file
//! in chunks of 256 KiB, so memory stays flat however many agents fetch. At most
//! `max_transfers` run at once. A request beyond that waits on its open connection for a
//! slot (first come, first served) for up to 30 s, so no slot idles while agents wait;
//! when the queue is longer than 64 per slot or the wait runs out, it gets `503` with a
//! `Retry-After` at a random moment of the time the queue ahead takes to drain, estimated
//! from how long recent transfers took, so a fleet spreads itself out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use changeover_protocol::package;
use changeover_protocol::{AgentUpdateOffer, AgentUpdateState, AgentUpdateView, ServerMessage};
use changeover_protocol::{SessionView, release::ReleaseKind};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::handshake::plain_answer;
use crate::hub::{HubHandle, encode};
use crate::releases::{ReadyPackage, Releases};

/// Where agent archives are served: `/agent-updates/<archive>`.
pub const PATH_PREFIX: &str = "/agent-updates/";

/// Bytes read from the archive and written to the agent at a time: the memory of one
/// transfer slot.
const CHUNK_BYTES: usize = 256 * 1024;

/// How long a request waits on its open connection for a transfer slot before it is told
/// to come back later.
const QUEUE_PATIENCE: Duration = Duration::from_secs(30);

/// Requests waiting for a slot at most, per slot; beyond, they are told to come back.
const WAITING_PER_SLOT: usize = 64;

/// Whether a plain HTTP request is an agent fetching its update.
pub fn is_download(request: &http::Request<()>) -> bool {
    matches!(*request.method(), http::Method::GET | http::Method::HEAD)
        && request.uri().path().starts_with(PATH_PREFIX)
}

/// How the agent updates are set up.
#[derive(Debug, Clone)]
pub struct AgentUpdateSettings {
    pub enabled: bool,
    pub max_transfers: usize,
    /// One write to a downloading agent may take this long.
    pub write_timeout: Duration,
}

/// One agent release on offer.
#[derive(Debug)]
struct Offered {
    version: semver::Version,
    archive_name: String,
    path: PathBuf,
    size: u64,
    sha256: String,
    /// The `agent_update_offer` message, serialised once.
    frame: Utf8Bytes,
}

/// The agent releases this server offers, by platform, and the transfers serving them.
#[derive(Debug)]
pub struct AgentUpdates {
    settings: AgentUpdateSettings,
    releases: Arc<Releases>,
    offers: RwLock<HashMap<String, Arc<Offered>>>,
    transfers: Arc<Semaphore>,
    /// Requests waiting on their connection for a slot now.
    waiting: AtomicU64,
    /// How long a whole transfer took lately (a moving average), in ms; 0 before the first.
    transfer_ms: AtomicU64,
    served: AtomicU64,
}

impl AgentUpdates {
    pub fn new(releases: Arc<Releases>, settings: AgentUpdateSettings) -> Arc<AgentUpdates> {
        let transfers = Arc::new(Semaphore::new(settings.max_transfers.max(1)));
        let updates = Arc::new(AgentUpdates {
            settings,
            releases,
            offers: RwLock::new(HashMap::new()),
            transfers,
            waiting: AtomicU64::new(0),
            transfer_ms: AtomicU64::new(0),
            served: AtomicU64::new(0),
        });
        updates.refresh();
        updates
    }

    /// Follows the releases: when an agent release of this version becomes ready (loaded
    /// after a restart, dropped into the inbox), agents already connected are offered it.
    pub async fn run(self: Arc<Self>, hub: HubHandle, shutdown: CancellationToken) {
        let mut changes = self.releases.watch();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            for frame in self.refresh() {
                let queued = hub.broadcast_encoded(frame);
                debug!(queued, "agent update offered to the connected agents");
            }
        }
    }

    // Rebuilds the offers from the ready packages; returns the frames of new offers.
    fn refresh(&self) -> Vec<Utf8Bytes> {
        if !self.settings.enabled {
            return Vec::new();
        }
        let packages = self.releases.agent_releases();
        let unchanged = {
            let offers = self
                .offers
                .read()
                .unwrap_or_else(|poison| poison.into_inner());
            offers.len() == packages.len()
                && packages.iter().all(|package| {
                    offers
                        .get(&package.entry.platform)
                        .is_some_and(|offered| offered.sha256 == package.entry.sha256)
                })
        };
        if unchanged {
            return Vec::new();
        }
        let mut offers = self
            .offers
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut fresh = Vec::new();
        let mut rebuilt = HashMap::new();
        for package in packages {
            if let Some(offered) = offers
                .get(&package.entry.platform)
                .filter(|offered| offered.sha256 == package.entry.sha256)
            {
                rebuilt.insert(package.entry.platform.clone(), Arc::clone(offered));
                continue;
            }
            match offer(&package) {
                Ok(offered) => {
                    info!(
                        version = %offered.version,
                        platform = %package.entry.platform,
                        "offering this agent release to older agents"
                    );
                    fresh.push(offered.frame.clone());
                    rebuilt.insert(package.entry.platform.clone(), Arc::new(offered));
                }
                Err(reason) => {
                    warn!(archive = %package.entry.archive, %reason, "cannot offer an agent release")
                }
            }
        }
        *offers = rebuilt;
        fresh
    }

    /// The offer for an agent of this platform and version, if it is older.
    pub fn offer_for(&self, platform: &str, agent_version: &str) -> Option<Utf8Bytes> {
        let running = agent_version.parse::<semver::Version>().ok()?;
        let offers = self
            .offers
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        offers
            .get(platform)
            .filter(|offered| offered.version > running)
            .map(|offered| offered.frame.clone())
    }

    /// The version on offer (the server's own), or `None` when there is none.
    pub fn release_version(&self) -> Option<semver::Version> {
        let offers = self
            .offers
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        offers.values().map(|offered| offered.version.clone()).max()
    }

    /// Marks in `sessions` the agents that were offered an update and have not reported
    /// on it; returns how many of all sessions (`versions`: platform, agent version and
    /// how many run it) run an agent older than the release on offer.
    pub fn annotate(
        &self,
        sessions: &mut [SessionView],
        versions: &[(String, String, usize)],
    ) -> u64 {
        let Some(release) = self.release_version() else {
            return 0;
        };
        let older = |version: &str| {
            version
                .parse::<semver::Version>()
                .is_ok_and(|running| running < release)
        };
        for session in sessions {
            if session.update.is_none()
                && older(&session.agent_version)
                && self
                    .offer_for(&session.platform, &session.agent_version)
                    .is_some()
            {
                session.update = Some(AgentUpdateView {
                    version: release.to_string(),
                    state: AgentUpdateState::Offered,
                    detail: None,
                });
            }
        }
        versions
            .iter()
            .filter(|(_, version, _)| older(version))
            .map(|(_, _, count)| *count as u64)
            .sum()
    }

    /// Answers one `GET`/`HEAD` for an agent archive: the file (or the requested range of
    /// it), `503` when all transfer slots are busy, `404` for anything not on offer.
    pub async fn serve<S>(
        &self,
        mut stream: S,
        request: http::Request<()>,
        peer: SocketAddr,
        shutdown: &CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = request
            .uri()
            .path()
            .strip_prefix(PATH_PREFIX)
            .unwrap_or_default();
        let offered = {
            let offers = self
                .offers
                .read()
                .unwrap_or_else(|poison| poison.into_inner());
            offers
                .values()
                .find(|offered| offered.archive_name == name)
                .cloned()
        };
        let Some(offered) = offered else {
            debug!(%peer, %name, "agent update request for something not on offer");
            let _ = plain_answer(
                &mut stream,
                404,
                "Not Found",
                &[],
                "no such agent update on this server",
            )
            .await;
            return;
        };
        let range = match byte_range(request.headers().get(http::header::RANGE), offered.size) {
            Ok(range) => range,
            Err(()) => {
                let headers = [("Content-Range", format!("bytes */{}", offered.size))];
                let _ = plain_answer(
                    &mut stream,
                    416,
                    "Range Not Satisfiable",
                    &headers,
                    "the requested range is outside the file",
                )
                .await;
                return;
            }
        };
        let head_only = request.method() == http::Method::HEAD;
        let _permit = if head_only {
            None
        } else {
            match self.wait_for_slot(shutdown).await {
                Some(permit) => Some(permit),
                None => {
                    let retry_after = self.retry_after();
                    debug!(%peer, retry_after, "agent update: no transfer slot; told to come back");
                    let headers = [("Retry-After", retry_after.to_string())];
                    let _ = plain_answer(
                        &mut stream,
                        503,
                        "Service Unavailable",
                        &headers,
                        "every transfer slot is busy; come back after Retry-After seconds",
                    )
                    .await;
                    return;
                }
            }
        };
        let started = std::time::Instant::now();
        let outcome = tokio::select! {
            () = shutdown.cancelled() => Err("the server is shutting down".to_owned()),
            outcome = self.send_file(&mut stream, &offered, range, head_only) => outcome,
        };
        match outcome {
            Ok(bytes) if !head_only => {
                self.served.fetch_add(1, Ordering::Relaxed);
                self.record_transfer(started.elapsed(), bytes, offered.size);
                debug!(%peer, archive = %offered.archive_name, bytes, "agent update sent");
            }
            Ok(_) => {}
            Err(reason) => {
                debug!(%peer, archive = %offered.archive_name, %reason, "agent update transfer ended early")
            }
        }
        let _ = stream.shutdown().await;
    }

    // A slot, waiting for one on the open connection for a while (slots are handed out in
    // the order asked for); `None` when the queue is long or the wait ran out.
    async fn wait_for_slot(
        &self,
        shutdown: &CancellationToken,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(permit) = Arc::clone(&self.transfers).try_acquire_owned() {
            return Some(permit);
        }
        let slots = self.settings.max_transfers.max(1);
        if self.waiting.load(Ordering::Relaxed) as usize >= slots * WAITING_PER_SLOT {
            return None;
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = tokio::select! {
            () = shutdown.cancelled() => None,
            acquired = tokio::time::timeout(
                QUEUE_PATIENCE,
                Arc::clone(&self.transfers).acquire_owned(),
            ) => acquired.ok().and_then(Result::ok),
        };
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        permit
    }

    // A complete transfer's duration feeds the estimate of how fast the queue drains.
    fn record_transfer(&self, took: Duration, bytes: u64, size: u64) {
        if bytes < size {
            return;
        }
        let took = u64::try_from(took.as_millis()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .transfer_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |average| {
                Some(if average == 0 {
                    took
                } else {
                    (average * 7 + took) / 8
                })
            });
    }

    // A random pause within the time the queue ahead takes to drain: the agents waiting,
    // shared among the slots, each transfer taking as long as the recent ones did (1 s
    // before any finished). At least 1 s, at most 5 minutes.
    fn retry_after(&self) -> u64 {
        let waiting = self.waiting.load(Ordering::Relaxed) + 1;
        let slots = self.settings.max_transfers.max(1) as u64;
        let transfer_ms = match self.transfer_ms.load(Ordering::Relaxed) {
            0 => 1000,
            measured => measured,
        };
        let window_ms = waiting.div_ceil(slots).saturating_mul(transfer_ms);
        let window = window_ms.div_ceil(1000).clamp(1, 300);
        rand::random_range(1..=window)
    }

    async fn send_file<S>(
        &self,
        stream: &mut S,
        offered: &Offered,
        range: Option<(u64, u64)>,
        head_only: bool,
    ) -> Result<u64, String>
    where
        S: AsyncWrite + Unpin,
    {
        let (start, end) = range.unwrap_or((0, offered.size.saturating_sub(1)));
        let length = if offered.size == 0 {
            0
        } else {
            end - start + 1
        };
        let path = offered.path.clone();
        let mut file = tokio::task::spawn_blocking(move || std::fs::File::open(path))
            .await
            .map_err(|err| format!("cannot open the archive: {err}"))?
            .map_err(|err| format!("cannot open {}: {err}", offered.path.display()))?;
        let status = if range.is_some() {
            "206 Partial Content"
        } else {
            "200 OK"
        };
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/gzip\r\nContent-Length: {length}\r\n\
             Accept-Ranges: bytes\r\nETag: \"{}\"\r\nCache-Control: no-store\r\nConnection: close\r\n",
            offered.sha256
        );
        if range.is_some() {
            head.push_str(&format!(
                "Content-Range: bytes {start}-{end}/{}\r\n",
                offered.size
            ));
        }
        head.push_str("\r\n");
        self.write(stream, head.as_bytes()).await?;
        if head_only || length == 0 {
            return Ok(0);
        }
        // One trip to the blocking pool per chunk, reading straight into the buffer that is
        // written out (tokio::fs would copy through a buffer of its own).
        let mut buffer = vec![0u8; CHUNK_BYTES];
        let mut offset = start;
        let end_offset = start + length;
        while offset < end_offset {
            let want = usize::try_from((end_offset - offset).min(CHUNK_BYTES as u64))
                .unwrap_or(CHUNK_BYTES);
            let (returned_file, returned_buffer, read) = tokio::task::spawn_blocking(move || {
                let read = read_at(&mut file, &mut buffer[..want], offset);
                (file, buffer, read)
            })
            .await
            .map_err(|err| format!("cannot read the archive: {err}"))?;
            file = returned_file;
            buffer = returned_buffer;
            let read = read.map_err(|err| format!("cannot read the archive: {err}"))?;
            if read == 0 {
                return Err("the archive is shorter than its signed size".to_owned());
            }
            self.write(stream, &buffer[..read]).await?;
            offset += read as u64;
        }
        stream
            .flush()
            .await
            .map_err(|err| format!("the agent went away: {err}"))?;
        Ok(length)
    }

    async fn write<S>(&self, stream: &mut S, bytes: &[u8]) -> Result<(), String>
    where
        S: AsyncWrite + Unpin,
    {
        match tokio::time::timeout(self.settings.write_timeout, stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("the agent went away: {err}")),
            Err(_) => Err(format!(
                "the agent read nothing for {} s",
                self.settings.write_timeout.as_secs()
            )),
        }
    }
}

// A positional read: no seek state shared between chunks.
#[cfg(unix)]
fn read_at(file: &mut std::fs::File, buffer: &mut [u8], offset: u64) -> std::io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buffer, offset)
}

#[cfg(not(unix))]
fn read_at(file: &mut std::fs::File, buffer: &mut [u8], offset: u64) -> std::io::Result<usize> {
    use std::io::{Read as _, Seek as _};
    file.seek(std::io::SeekFrom::Start(offset))?;
    file.read(buffer)
}

// The offer for one ready agent package: its entry and the vendor's signature beside it.
fn offer(package: &ReadyPackage) -> Result<Offered, String> {
    if package.entry.kind != ReleaseKind::Agent {
        return Err("not an agent release".to_owned());
    }
    let signature_file = package::signature_path(&package.archive);
    let signature = std::fs::read_to_string(&signature_file)
        .map_err(|err| format!("cannot read {}: {err}", signature_file.display()))?;
    let message = ServerMessage::AgentUpdateOffer(Box::new(AgentUpdateOffer {
        version: package.entry.version.to_string(),
        platform: package.entry.platform.clone(),
        archive: package.entry.archive.clone(),
        size: package.entry.size,
        sha256: package.entry.sha256.clone(),
        path: format!("{PATH_PREFIX}{}", package.entry.archive),
        signature,
    }));
    Ok(Offered {
        version: package.entry.version.clone(),
        archive_name: package.entry.archive.clone(),
        path: package.archive.clone(),
        size: package.entry.size,
        sha256: package.entry.sha256.clone(),
        frame: Utf8Bytes::from(encode(&message)),
    })
}

/// Reads a `Range` header for a file of `size` bytes: `Ok(None)` for the whole file (no
/// header, or one this server does not serve: several ranges, another unit), the inclusive
/// range otherwise, `Err` when it lies outside the file.
fn byte_range(header: Option<&http::HeaderValue>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let range = match (first.parse::<u64>(), last.parse::<u64>()) {
        // bytes=-500: the last 500 bytes.
        (Err(_), Ok(suffix)) if first.is_empty() => {
            if suffix == 0 {
                return Err(());
            }
            (size.saturating_sub(suffix), size.checked_sub(1).ok_or(())?)
        }
        (Ok(start), Err(_)) if last.is_empty() => (start, size.checked_sub(1).ok_or(())?),
        (Ok(start), Ok(end)) if start <= end => (start, end.min(size.saturating_sub(1))),
        _ => return Ok(None),
    };
    if range.0 >= size {
        return Err(());
    }
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(text: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
        let value = http::HeaderValue::from_str(text).unwrap();
        byte_range(Some(&value), size)
    }

    #[test]
    fn ranges_are_read_as_the_rfc_says() {
        assert_eq!(byte_range(None, 100), Ok(None));
        assert_eq!(range("bytes=10-", 100), Ok(Some((10, 99))));
        assert_eq!(range("bytes=10-19", 100), Ok(Some((10, 19))));
        assert_eq!(range("bytes=90-200", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=-30", 100), Ok(Some((70, 99))));
        assert_eq!(range("bytes=-300", 100), Ok(Some((0, 99))));
        assert_eq!(range("bytes=100-", 100), Err(()));
        assert_eq!(range("bytes=-0", 100), Err(()));
        // What this server does not serve is answered with the whole file.
        assert_eq!(range("bytes=0-1,5-9", 100), Ok(None));
        assert_eq!(range("items=0-1", 100), Ok(None));
        assert_eq!(range("bytes=20-10", 100), Ok(None));
    }

    #[test]
    fn only_gets_under_the_prefix_are_downloads() {
        let request = |method: &str, path: &str| {
            http::Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .unwrap()
        };
        assert!(is_download(&request("GET", "/agent-updates/a.tar.gz")));
        assert!(is_download(&request("HEAD", "/agent-updates/a.tar.gz")));
        assert!(!is_download(&request("POST", "/agent-updates/a.tar.gz")));
        assert!(!is_download(&request("GET", "/")));
    }
}
