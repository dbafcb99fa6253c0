//! A resumable, verified download of one release archive from the feed.
//!
//! The archive streams to `<name>.part` in the downloads folder and through the package
//! verifier at the same time, so memory stays flat whatever the size and the signature is
//! known the moment the last byte arrives. The task that reads the socket only counts each
//! chunk against the signed size and hands it on, through bounded channels, to three
//! blocking threads: one writes the file (syncing it as it goes), one hashes SHA-256, one
//! the signature's BLAKE2b-512. So the download goes as fast as the slowest of them, not
//! as all of them one after the other, and a few chunks at most are in memory. A broken
//! transfer resumes with an HTTP `Range` request from what is already on disk (re-hashing
//! that part first); a host that ignores `Range` gets the whole file again. A file that
//! outgrows its signed size or fails its hash or signature is deleted at once, so nothing
//! ever retries or trusts it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use changeover_protocol::backoff::Backoff;
use changeover_protocol::package::{
    ArchivePrehash, FinalCheck, PackageError, PackageSignature, PackageVerifier, SizeLimit,
    VerifierParts,
};
use changeover_protocol::release::PackageEntry;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::feed::{Feed, error_chain};

/// Tries per download before giving up (the `.part` file stays for the next request).
pub const MAX_ATTEMPTS: u32 = 8;

/// Chunks queued for each worker. The chunks are shared, not copied, and hyper hands out at
/// most about 400 KiB at a time, so this keeps the memory in flight to a few MiB whatever
/// the archive's size, and gives the workers enough to do while the socket is read.
const CHUNKS_IN_FLIGHT: usize = 8;

/// What the file writer collects before a `write`, and what a resumed download's prefix is
/// read in.
const IO_CHUNK_BYTES: usize = 256 * 1024;

/// Bytes written between two background `fdatasync`s ([`write_part`]).
const SYNC_EVERY_BYTES: u64 = 16 * 1024 * 1024;

/// What happens during a download, for progress reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadEvent {
    Started {
        resumed_from: u64,
    },
    Progress {
        bytes: u64,
    },
    Retrying {
        attempt: u32,
        delay: Duration,
        reason: String,
    },
}

/// Why a download ended without a verified archive.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("the download was refused and deleted: {0}")]
    Refused(#[from] PackageError),
    #[error("the feed answered {status} for {url}")]
    Status { url: String, status: u16 },
    #[error(
        "gave up after {attempts} attempts ({last}); what arrived is kept and resumes next time"
    )]
    GaveUp { attempts: u32, last: String },
    #[error(
        "the feed's {url} is {served} bytes but the signed release is {signed} bytes: the file on \
         the feed is truncated or not the one the vendor signed; nothing was kept"
    )]
    WrongSize {
        url: String,
        served: u64,
        signed: u64,
    },
    #[error(
        "{folder} has {free_mib} MiB free; the release needs {needed_mib} MiB more to download \
         ({size_mib} MiB, {kept_mib} MiB of it here already): free some space and try again"
    )]
    NoRoom {
        folder: String,
        free_mib: u64,
        needed_mib: u64,
        size_mib: u64,
        kept_mib: u64,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One download: an entry from a verified manifest and its verified signature.
#[derive(Debug)]
pub struct Download<'a> {
    pub feed: &'a Feed,
    pub entry: &'a PackageEntry,
    pub signature: &'a PackageSignature,
    /// Where the bytes go while they arrive.
    pub part_file: PathBuf,
    /// First delay between attempts; doubles up to 30 s.
    pub retry_base: Duration,
}

#[derive(Debug)]
enum AttemptError {
    /// Worth another try after a pause.
    Transient(String),
    Fatal(DownloadError),
}

impl Download<'_> {
    /// Downloads and verifies; on success the complete archive is in `part_file`.
    pub async fn run(&self, mut on_event: impl FnMut(DownloadEvent)) -> Result<(), DownloadError> {
        let mut backoff = Backoff::new(self.retry_base, Duration::from_secs(30));
        let mut attempt = 1;
        loop {
            match self.attempt(&mut on_event).await {
                Ok(()) => return Ok(()),
                Err(AttemptError::Fatal(err)) => {
                    if matches!(err, DownloadError::Refused(_)) {
                        let _ = tokio::fs::remove_file(&self.part_file).await;
                    }
                    return Err(err);
                }
                Err(AttemptError::Transient(reason)) if attempt >= MAX_ATTEMPTS => {
                    return Err(DownloadError::GaveUp {
                        attempts: attempt,
                        last: reason,
                    });
                }
                Err(AttemptError::Transient(reason)) => {
                    let delay = backoff.next_delay().max(Duration::from_millis(100));
                    on_event(DownloadEvent::Retrying {
                        attempt,
                        delay,
                        reason,
                    });
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Refuses, with the figures, a download the disk has no room for, before any byte of
    /// it is fetched (a disk that fills meanwhile still fails the write, cleanly).
    fn check_room(&self, existing: u64) -> Result<(), DownloadError> {
        let Some(folder) = self.part_file.parent() else {
            return Ok(());
        };
        let Ok(free) = crate::platform::free_space(folder) else {
            return Ok(());
        };
        let needed = self.entry.size.saturating_sub(existing);
        if free >= needed {
            return Ok(());
        }
        let mib = |bytes: u64| bytes.div_ceil(1024 * 1024);
        Err(DownloadError::NoRoom {
            folder: folder.display().to_string(),
            free_mib: free / (1024 * 1024),
            needed_mib: mib(needed),
            size_mib: mib(self.entry.size),
            kept_mib: existing / (1024 * 1024),
        })
    }

    async fn attempt(&self, on_event: &mut impl FnMut(DownloadEvent)) -> Result<(), AttemptError> {
        let size = self.entry.size;
        let mut existing = match tokio::fs::metadata(&self.part_file).await {
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        };
        if existing > size {
            self.discard_part().await?;
            existing = 0;
        }
        self.check_room(existing).map_err(AttemptError::Fatal)?;
        let mut hashing = Hashing::start(self.verifier()?);
        if existing > 0 {
            hash_prefix(&self.part_file, &mut hashing).await?;
        }
        if existing == size {
            on_event(DownloadEvent::Started {
                resumed_from: existing,
            });
            return hashing.finish(&self.part_file).await;
        }

        let url = self
            .feed
            .archive_url(self.entry)
            .map_err(|err| AttemptError::Transient(err.to_string()))?;
        let mut request = self.feed.http().get(url.clone());
        if existing > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={existing}-"));
        }
        let mut response = request
            .send()
            .await
            .map_err(|err| AttemptError::Transient(error_chain(&err)))?;
        let status = response.status();
        let append = if status == reqwest::StatusCode::PARTIAL_CONTENT && existing > 0 {
            if content_range_start(&response) != Some(existing) {
                self.discard_part().await?;
                return Err(AttemptError::Transient(
                    "the feed answered a different range than asked for".to_owned(),
                ));
            }
            true
        } else if status.is_success() {
            // A host without Range support sends everything again: start over.
            if existing > 0 {
                hashing = Hashing::start(self.verifier()?);
                existing = 0;
            }
            false
        } else if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            self.discard_part().await?;
            return Err(AttemptError::Transient(
                "the feed refused the range; starting over".to_owned(),
            ));
        } else if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(AttemptError::Transient(format!(
                "the feed answered {status}"
            )));
        } else {
            return Err(AttemptError::Fatal(DownloadError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            }));
        };
        let mut writer = PartWriter::open(&self.part_file, append)
            .await
            .map_err(|err| self.io_error(err))?;
        // The whole file's size as the feed states it: a stock web server serving a truncated
        // (or different) file says so up front, and no retry can make it right.
        let served = if status == reqwest::StatusCode::PARTIAL_CONTENT {
            content_range_total(&response)
        } else {
            response.content_length()
        };
        if let Some(served) = served
            && served != size
        {
            writer.abandon().await;
            self.discard_part().await?;
            return Err(AttemptError::Fatal(DownloadError::WrongSize {
                url: url.to_string(),
                served,
                signed: size,
            }));
        }
        on_event(DownloadEvent::Started {
            resumed_from: existing,
        });

        let mut written = existing;
        // The socket's reads, gathered into chunks of at least IO_CHUNK_BYTES before they go
        // to the writer and the hash: a fast sender delivers many small reads, and handing
        // each to two threads cost more in wake-ups than the copy that gathers them.
        let mut gathered = Gathered::default();
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(err) => {
                    // Keep what arrived: the next attempt resumes from it.
                    if let Some(chunk) = gathered.take() {
                        writer = self.pass_on(chunk, writer, &mut hashing).await?;
                    }
                    writer.sync_and_close(&self.part_file).await?;
                    return Err(AttemptError::Transient(error_chain(&err)));
                }
            };
            // Not a byte beyond the signed size reaches the disk.
            if let Err(err) = hashing.admit(&chunk) {
                writer.abandon().await;
                return Err(err);
            }
            written += chunk.len() as u64;
            if let Some(chunk) = gathered.add(chunk) {
                writer = self.pass_on(chunk, writer, &mut hashing).await?;
                on_event(DownloadEvent::Progress { bytes: written });
            }
        }
        if let Some(chunk) = gathered.take() {
            writer = self.pass_on(chunk, writer, &mut hashing).await?;
            on_event(DownloadEvent::Progress { bytes: written });
        }
        writer.sync_and_close(&self.part_file).await?;
        if written < size {
            return Err(AttemptError::Transient(format!(
                "the connection ended after {written} of {size} bytes"
            )));
        }
        hashing.finish(&self.part_file).await
    }

    // An admitted chunk to the file writer and the hash.
    async fn pass_on(
        &self,
        chunk: Bytes,
        mut writer: PartWriter,
        hashing: &mut Hashing,
    ) -> Result<PartWriter, AttemptError> {
        if !writer.write(chunk.clone()).await {
            return Err(writer.failure(&self.part_file).await);
        }
        if let Err(err) = hashing.hash(chunk, &self.part_file).await {
            writer.abandon().await;
            return Err(err);
        }
        Ok(writer)
    }

    fn verifier(&self) -> Result<PackageVerifier, AttemptError> {
        self.signature
            .verifier(self.feed.key(), &self.entry.archive)
            .map_err(|err| AttemptError::Fatal(err.into()))
    }

    async fn discard_part(&self) -> Result<(), AttemptError> {
        match tokio::fs::remove_file(&self.part_file).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(self.io_error(err)),
        }
    }

    fn io_error(&self, source: std::io::Error) -> AttemptError {
        AttemptError::Fatal(DownloadError::Io {
            path: self.part_file.display().to_string(),
            source,
        })
    }
}

fn part_file_error(part_file: &Path, source: std::io::Error) -> AttemptError {
    AttemptError::Fatal(DownloadError::Io {
        path: part_file.display().to_string(),
        source,
    })
}

// A worker thread that panicked or was cancelled: nothing it did can be trusted.
fn worker_lost(part_file: &Path, err: tokio::task::JoinError) -> AttemptError {
    part_file_error(
        part_file,
        std::io::Error::other(format!("a download worker stopped: {err}")),
    )
}

// What is already on disk counts toward the hashes before the rest arrives.
async fn hash_prefix(part_file: &Path, hashing: &mut Hashing) -> Result<(), AttemptError> {
    let io_error = |source| part_file_error(part_file, source);
    let mut file = tokio::fs::File::open(part_file).await.map_err(io_error)?;
    let mut buffer = BytesMut::new();
    loop {
        buffer.reserve(IO_CHUNK_BYTES);
        let read = file.read_buf(&mut buffer).await.map_err(io_error)?;
        if read == 0 {
            return Ok(());
        }
        let chunk = buffer.split().freeze();
        hashing.admit(&chunk)?;
        hashing.hash(chunk, part_file).await?;
    }
}

/// The package verifier taken apart: the size limit on the task that reads the socket, and
/// the signature's BLAKE2b-512 on a blocking thread of its own, fed the chunks in the order
/// they arrive. The signature binds every byte and the signed entry, so the download is
/// hashed once ([`FinalCheck::finish_signed`]): a second hash (SHA-256) took a fifth of the
/// CPU of a download that has two cores to share with the sender.
struct Hashing {
    size_limit: SizeLimit,
    prehash: HashWorker<ArchivePrehash>,
    /// Checks the size and the signature once the last byte is in.
    check: FinalCheck,
}

/// One hash on a blocking thread; it hands the hasher back when its channel closes.
struct HashWorker<H> {
    chunks: mpsc::Sender<Bytes>,
    done: JoinHandle<H>,
}

impl<H: Send + 'static> HashWorker<H> {
    fn start(mut hasher: H, update: fn(&mut H, &[u8])) -> HashWorker<H> {
        let (chunks, mut incoming) = mpsc::channel::<Bytes>(CHUNKS_IN_FLIGHT);
        let done = tokio::task::spawn_blocking(move || {
            while let Some(chunk) = incoming.blocking_recv() {
                update(&mut hasher, &chunk);
            }
            hasher
        });
        HashWorker { chunks, done }
    }

    async fn finish(self, part_file: &Path) -> Result<H, AttemptError> {
        drop(self.chunks);
        self.done.await.map_err(|err| worker_lost(part_file, err))
    }
}

impl Hashing {
    fn start(verifier: PackageVerifier) -> Hashing {
        let VerifierParts {
            size_limit,
            prehash,
            check,
            ..
        } = verifier.into_parts();
        Hashing {
            size_limit,
            prehash: HashWorker::start(prehash, ArchivePrehash::update),
            check,
        }
    }

    /// Counts a chunk; refuses it, and the download, if it takes the archive beyond its
    /// signed size.
    fn admit(&mut self, chunk: &Bytes) -> Result<(), AttemptError> {
        self.size_limit
            .admit(chunk.len())
            .map_err(|err| AttemptError::Fatal(err.into()))
    }

    /// Queues an admitted chunk for the hash, waiting while it is behind.
    async fn hash(&mut self, chunk: Bytes, part_file: &Path) -> Result<(), AttemptError> {
        if self.prehash.chunks.send(chunk).await.is_ok() {
            return Ok(());
        }
        // The hash thread only stops early by panicking; its join error says so.
        Err(match (&mut self.prehash.done).await.err() {
            Some(err) => worker_lost(part_file, err),
            None => part_file_error(
                part_file,
                std::io::Error::other("the hash thread stopped early"),
            ),
        })
    }

    /// Waits for the hash and checks it, the size and the signature.
    async fn finish(self, part_file: &Path) -> Result<(), AttemptError> {
        let prehash = self.prehash.finish(part_file).await?;
        self.check
            .finish_signed(prehash)
            .map(drop)
            .map_err(|err| AttemptError::Fatal(err.into()))
    }
}

/// Reads gathered into chunks of at least [`IO_CHUNK_BYTES`]; a read that size or larger
/// with nothing gathered before it passes through without a copy.
#[derive(Default)]
struct Gathered {
    bytes: BytesMut,
}

impl Gathered {
    /// Adds a read; returns a chunk once there is one of at least [`IO_CHUNK_BYTES`].
    fn add(&mut self, chunk: Bytes) -> Option<Bytes> {
        if self.bytes.is_empty() && chunk.len() >= IO_CHUNK_BYTES {
            return Some(chunk);
        }
        if self.bytes.is_empty() {
            self.bytes.reserve(IO_CHUNK_BYTES.max(chunk.len()));
        }
        self.bytes.extend_from_slice(&chunk);
        (self.bytes.len() >= IO_CHUNK_BYTES).then(|| self.bytes.split().freeze())
    }

    /// What is gathered so far, if anything.
    fn take(&mut self) -> Option<Bytes> {
        (!self.bytes.is_empty()).then(|| self.bytes.split().freeze())
    }
}

/// What the file writer is told.
enum ToWriter {
    Chunk(Bytes),
    /// Everything is queued: flush, `fdatasync`, close.
    SyncAndClose,
}

/// The part file, written on a blocking thread so the socket is read while the disk works.
struct PartWriter {
    chunks: mpsc::Sender<ToWriter>,
    done: JoinHandle<std::io::Result<()>>,
}

impl PartWriter {
    async fn open(part_file: &Path, append: bool) -> std::io::Result<PartWriter> {
        let mut options = tokio::fs::OpenOptions::new();
        options.create(true);
        if append {
            options.append(true);
        } else {
            options.write(true).truncate(true);
        }
        let file = options.open(part_file).await?.into_std().await;
        let (chunks, incoming) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let done = tokio::task::spawn_blocking(move || write_part(&file, incoming));
        Ok(PartWriter { chunks, done })
    }

    /// Queues a chunk; false if the writer has stopped ([`PartWriter::failure`] says why).
    async fn write(&mut self, chunk: Bytes) -> bool {
        self.chunks.send(ToWriter::Chunk(chunk)).await.is_ok()
    }

    /// Writes what is queued, makes it durable and closes the file: what arrived is kept
    /// for a resumed download, and a verified archive is on disk before anyone is told.
    async fn sync_and_close(self, part_file: &Path) -> Result<(), AttemptError> {
        // A failed send means the writer stopped on an error, which the join returns.
        let _ = self.chunks.send(ToWriter::SyncAndClose).await;
        match self.done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(part_file_error(part_file, err)),
            Err(err) => Err(worker_lost(part_file, err)),
        }
    }

    /// Why the writer stopped early.
    async fn failure(self, part_file: &Path) -> AttemptError {
        drop(self.chunks);
        match self.done.await {
            Ok(Err(err)) => part_file_error(part_file, err),
            Ok(Ok(())) => part_file_error(
                part_file,
                std::io::Error::other("the file writer stopped early"),
            ),
            Err(err) => worker_lost(part_file, err),
        }
    }

    /// Stops writing without a sync, and waits until the file is closed (so it can be
    /// deleted, on Windows too).
    async fn abandon(self) {
        drop(self.chunks);
        let _ = self.done.await;
    }
}

// The file writer's thread. Every `SYNC_EVERY_BYTES` a second thread starts an
// `fdatasync` of what is written so far, so the disk writes the archive while the rest
// arrives and the closing sync, which `package_ready` waits for, has only the tail left.
fn write_part(file: &std::fs::File, mut incoming: mpsc::Receiver<ToWriter>) -> std::io::Result<()> {
    use std::io::Write as _;
    std::thread::scope(|scope| {
        // One sync running and one asked for at most; a request while both are taken is
        // covered by the one asked for.
        let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let syncer = scope.spawn(move || -> std::io::Result<()> {
            while sync_rx.recv().is_ok() {
                file.sync_data()?;
            }
            Ok(())
        });
        // An error seen by the background sync is reported to it and not again to a
        // later sync of the same file, so it is kept and returned.
        let join_syncer = |sync_tx| {
            drop(sync_tx);
            syncer
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the sync thread panicked")))
        };
        let mut out = std::io::BufWriter::with_capacity(IO_CHUNK_BYTES, file);
        let mut unsynced = 0u64;
        while let Some(message) = incoming.blocking_recv() {
            match message {
                ToWriter::Chunk(chunk) => {
                    out.write_all(&chunk)?;
                    unsynced += chunk.len() as u64;
                    if unsynced >= SYNC_EVERY_BYTES {
                        out.flush()?;
                        let _ = sync_tx.try_send(());
                        unsynced = 0;
                    }
                }
                ToWriter::SyncAndClose => {
                    out.flush()?;
                    join_syncer(sync_tx)?;
                    return file.sync_data();
                }
            }
        }
        // Abandoned (a refused download, or one dropped half way): no closing sync for a
        // file that is about to go or will be hashed again from the start anyway.
        out.flush()?;
        join_syncer(sync_tx)
    })
}

// `Content-Range: bytes 1000-1999/2000` → 2000 (none for `*`).
fn content_range_total(response: &reqwest::Response) -> Option<u64> {
    let value = response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    value.rsplit('/').next()?.trim().parse().ok()
}

// `Content-Range: bytes 1000-1999/2000` → 1000.
fn content_range_start(response: &reqwest::Response) -> Option<u64> {
    let value = response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use changeover_protocol::package::VendorKey;
    use changeover_protocol::release::{PRODUCT, ReleaseKind};
    use sha2::Digest as _;

    use super::*;

    fn archive_bytes(len: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// A vendor key and the signature of `bytes` as a server archive.
    fn signed(bytes: &[u8]) -> (VendorKey, PackageSignature) {
        let pair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let version = semver::Version::new(2, 0, 0);
        let entry = PackageEntry {
            product: PRODUCT.to_owned(),
            kind: ReleaseKind::Server,
            archive: PackageEntry::archive_name(ReleaseKind::Server, &version, "linux-x86_64"),
            version,
            platform: "linux-x86_64".to_owned(),
            size: bytes.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(bytes)),
            notes: String::new(),
            date: "2026-11-28T09:00:00Z".to_owned(),
        };
        let comment = serde_json::to_string(&entry).unwrap();
        let text = minisign::sign(None, &pair.sk, bytes, Some(&comment), None)
            .unwrap()
            .into_string();
        let key = VendorKey::decode(&pair.pk.to_base64()).unwrap();
        (
            key,
            PackageSignature::decode(&text, &entry.archive).unwrap(),
        )
    }

    fn chunks_of(bytes: &[u8], size: usize) -> impl Iterator<Item = Bytes> + '_ {
        bytes.chunks(size).map(Bytes::copy_from_slice)
    }

    #[tokio::test]
    async fn hashing_on_worker_threads_verifies_and_refuses_as_the_verifier_does() {
        let bytes = archive_bytes(3 * 1024 * 1024 + 17);
        let (key, signature) = signed(&bytes);
        let part_file = Path::new("unused.part");

        let mut hashing = Hashing::start(signature.verifier(&key, "archive").unwrap());
        for chunk in chunks_of(&bytes, 100_003) {
            hashing.admit(&chunk).unwrap();
            hashing.hash(chunk, part_file).await.unwrap();
        }
        assert!(hashing.finish(part_file).await.is_ok());

        // One byte flipped: refused at the end, as fatal.
        let mut altered = bytes.clone();
        altered[1_000_000] ^= 0x80;
        let mut hashing = Hashing::start(signature.verifier(&key, "archive").unwrap());
        for chunk in chunks_of(&altered, 65_536) {
            hashing.admit(&chunk).unwrap();
            hashing.hash(chunk, part_file).await.unwrap();
        }
        let refused = hashing.finish(part_file).await;
        assert!(
            matches!(
                refused,
                Err(AttemptError::Fatal(DownloadError::Refused(
                    PackageError::BadSignature { .. }
                )))
            ),
            "the altered archive was not refused by its signature"
        );

        // A byte beyond the signed size is refused before it is hashed or written.
        let mut hashing = Hashing::start(signature.verifier(&key, "archive").unwrap());
        hashing.admit(&Bytes::copy_from_slice(&bytes)).unwrap();
        let refused = hashing.admit(&Bytes::from_static(b"x"));
        assert!(matches!(
            refused,
            Err(AttemptError::Fatal(DownloadError::Refused(
                PackageError::TooLarge { .. }
            )))
        ));
    }

    #[tokio::test]
    async fn the_writer_keeps_every_byte_in_order_across_background_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let part_file = dir.path().join("archive.part");
        // More than two background syncs' worth, in uneven chunks.
        let bytes = archive_bytes(2 * SYNC_EVERY_BYTES as usize + 123_457);
        let (first, rest) = bytes.split_at(5_000_001);

        let mut writer = PartWriter::open(&part_file, false).await.unwrap();
        for chunk in chunks_of(first, 333_333) {
            assert!(writer.write(chunk).await);
        }
        writer.sync_and_close(&part_file).await.unwrap();
        assert_eq!(std::fs::read(&part_file).unwrap(), first);

        // Resumed: appended after what is there.
        let mut writer = PartWriter::open(&part_file, true).await.unwrap();
        for chunk in chunks_of(rest, 417_792) {
            assert!(writer.write(chunk).await);
        }
        writer.sync_and_close(&part_file).await.unwrap();
        assert!(std::fs::read(&part_file).unwrap() == bytes);

        // Abandoned: what was queued is still written (and then closed, so it can go).
        let mut writer = PartWriter::open(&part_file, false).await.unwrap();
        assert!(writer.write(Bytes::from_static(b"abandoned")).await);
        writer.abandon().await;
        assert_eq!(std::fs::read(&part_file).unwrap(), b"abandoned");
        std::fs::remove_file(&part_file).unwrap();
    }
}
