//! A resumable, verified download of one release archive from the feed.
//!
//! The archive streams to `<name>.part` in the downloads folder and through the package
//! verifier at the same time, so memory stays flat whatever the size and the signature is
//! known the moment the last byte arrives. A broken transfer resumes with an HTTP `Range`
//! request from what is already on disk (re-hashing that part first); a host that ignores
//! `Range` gets the whole file again. A file that outgrows its signed size or fails its
//! hash or signature is deleted at once, so nothing ever retries or trusts it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use changeover_protocol::backoff::Backoff;
use changeover_protocol::package::{PackageError, PackageSignature, PackageVerifier};
use changeover_protocol::release::PackageEntry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::feed::{Feed, error_chain};

/// Tries per download before giving up (the `.part` file stays for the next request).
pub const MAX_ATTEMPTS: u32 = 8;

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
        let mut verifier = self
            .signature
            .verifier(self.feed.key(), &self.entry.archive)
            .map_err(|err| AttemptError::Fatal(err.into()))?;
        if existing > 0 {
            hash_prefix(&self.part_file, &mut verifier).await?;
        }
        if existing == size {
            on_event(DownloadEvent::Started {
                resumed_from: existing,
            });
            return finish(verifier);
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
        let mut file = if status == reqwest::StatusCode::PARTIAL_CONTENT && existing > 0 {
            if content_range_start(&response) != Some(existing) {
                self.discard_part().await?;
                return Err(AttemptError::Transient(
                    "the feed answered a different range than asked for".to_owned(),
                ));
            }
            self.open_part(true).await?
        } else if status.is_success() {
            // A host without Range support sends everything again: start over.
            if existing > 0 {
                verifier = self
                    .signature
                    .verifier(self.feed.key(), &self.entry.archive)
                    .map_err(|err| AttemptError::Fatal(err.into()))?;
                existing = 0;
            }
            self.open_part(false).await?
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
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(err) => {
                    // Keep what arrived: the next attempt resumes from it.
                    self.flush(&mut file).await?;
                    return Err(AttemptError::Transient(error_chain(&err)));
                }
            };
            verifier
                .update(&chunk)
                .map_err(|err| AttemptError::Fatal(err.into()))?;
            file.write_all(&chunk)
                .await
                .map_err(|err| self.io_error(err))?;
            written += chunk.len() as u64;
            on_event(DownloadEvent::Progress { bytes: written });
        }
        self.flush(&mut file).await?;
        if written < size {
            return Err(AttemptError::Transient(format!(
                "the connection ended after {written} of {size} bytes"
            )));
        }
        finish(verifier)
    }

    async fn open_part(
        &self,
        append: bool,
    ) -> Result<tokio::io::BufWriter<tokio::fs::File>, AttemptError> {
        let mut options = tokio::fs::OpenOptions::new();
        options.create(true);
        if append {
            options.append(true);
        } else {
            options.write(true).truncate(true);
        }
        let file = options
            .open(&self.part_file)
            .await
            .map_err(|err| self.io_error(err))?;
        Ok(tokio::io::BufWriter::with_capacity(256 * 1024, file))
    }

    async fn flush(
        &self,
        file: &mut tokio::io::BufWriter<tokio::fs::File>,
    ) -> Result<(), AttemptError> {
        file.flush().await.map_err(|err| self.io_error(err))?;
        file.get_ref()
            .sync_data()
            .await
            .map_err(|err| self.io_error(err))
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

fn finish(verifier: PackageVerifier<'_>) -> Result<(), AttemptError> {
    verifier
        .finish()
        .map(drop)
        .map_err(|err| AttemptError::Fatal(err.into()))
}

// What is already on disk counts toward the hash before the rest arrives.
async fn hash_prefix(
    part_file: &Path,
    verifier: &mut PackageVerifier<'_>,
) -> Result<(), AttemptError> {
    let io_error = |source| {
        AttemptError::Fatal(DownloadError::Io {
            path: part_file.display().to_string(),
            source,
        })
    };
    let mut file = tokio::fs::File::open(part_file).await.map_err(io_error)?;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = file.read(&mut buffer).await.map_err(io_error)?;
        if read == 0 {
            return Ok(());
        }
        verifier
            .update(&buffer[..read])
            .map_err(|err| AttemptError::Fatal(err.into()))?;
    }
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
