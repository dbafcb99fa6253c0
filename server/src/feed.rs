//! Reading the vendor's feed: the signed manifest and the signatures beside the archives.
//!
//! The feed is plain static files on any HTTP host, so nothing here expects more than
//! `GET` (and, for downloads, optionally `Range`). Everything read is verified with the
//! vendor key before it is believed; proxies come from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`.

use std::time::Duration;

use changeover_protocol::package::{self, PackageError, PackageSignature, VendorKey};
use changeover_protocol::release::{FeedManifest, MANIFEST_FILE, PackageEntry, SIGNATURE_SUFFIX};
use reqwest::Url;

/// The largest manifest or signature file accepted; a manifest of thousands of releases
/// is well below this.
const MAX_METADATA_BYTES: usize = 8 * 1024 * 1024;

/// Why the feed could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("the feed URL {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot reach the feed at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the feed answered {status} for {url}")]
    Status { url: String, status: u16 },
    #[error("{url} is larger than {MAX_METADATA_BYTES} bytes")]
    TooLarge { url: String },
    #[error(transparent)]
    Refused(#[from] PackageError),
}

impl FeedError {
    /// Whether trying again later may help (the network), or not (a bad signature).
    pub fn is_transient(&self) -> bool {
        match self {
            FeedError::Unreachable { .. } => true,
            FeedError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// A client for one feed.
#[derive(Debug, Clone)]
pub struct Feed {
    http: reqwest::Client,
    base: Url,
    key: VendorKey,
}

impl Feed {
    /// A feed at `url` (a folder: a missing trailing slash is added) checked with `key`.
    pub fn new(url: &str, key: VendorKey) -> Result<Feed, FeedError> {
        let with_slash = if url.ends_with('/') {
            url.to_owned()
        } else {
            format!("{url}/")
        };
        let base = Url::parse(&with_slash).map_err(|err| FeedError::BadUrl {
            url: url.to_owned(),
            reason: err.to_string(),
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(FeedError::BadUrl {
                url: url.to_owned(),
                reason: "only http:// and https:// feeds are supported".to_owned(),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(30))
            .user_agent(concat!("changeover-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| FeedError::BadUrl {
                url: url.to_owned(),
                reason: err.to_string(),
            })?;
        Ok(Feed { http, base, key })
    }

    pub fn url(&self) -> &Url {
        &self.base
    }

    pub fn key(&self) -> &VendorKey {
        &self.key
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Fetches and verifies the manifest.
    pub async fn manifest(&self) -> Result<FeedManifest, FeedError> {
        let manifest = self.fetch_small(MANIFEST_FILE).await?;
        let signature = self
            .fetch_small(&format!("{MANIFEST_FILE}{SIGNATURE_SUFFIX}"))
            .await?;
        let signature = String::from_utf8_lossy(&signature);
        Ok(package::verify_manifest(&manifest, &signature, &self.key)?)
    }

    /// Fetches an archive's signature and checks it describes exactly the manifest's entry.
    pub async fn package_signature(
        &self,
        entry: &PackageEntry,
    ) -> Result<(PackageSignature, String), FeedError> {
        let text = self
            .fetch_small(&format!("{}{SIGNATURE_SUFFIX}", entry.archive))
            .await?;
        let text = String::from_utf8_lossy(&text).into_owned();
        let signature = PackageSignature::decode(&text, &entry.archive)?;
        if signature.claimed_entry() != entry {
            return Err(FeedError::Refused(PackageError::BadEntry {
                what: entry.archive.clone(),
                reason: "its signature describes another release than the manifest".to_owned(),
            }));
        }
        Ok((signature, text))
    }

    /// The URL of an entry's archive.
    pub fn archive_url(&self, entry: &PackageEntry) -> Result<Url, FeedError> {
        self.join(&entry.archive)
    }

    fn join(&self, name: &str) -> Result<Url, FeedError> {
        self.base.join(name).map_err(|err| FeedError::BadUrl {
            url: format!("{}{name}", self.base),
            reason: err.to_string(),
        })
    }

    async fn fetch_small(&self, name: &str) -> Result<Vec<u8>, FeedError> {
        let url = self.join(name)?;
        let unreachable = |err: reqwest::Error| FeedError::Unreachable {
            url: url.to_string(),
            reason: error_chain(&err),
        };
        let mut response = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(unreachable)?;
        if !response.status().is_success() {
            return Err(FeedError::Status {
                url: url.to_string(),
                status: response.status().as_u16(),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > MAX_METADATA_BYTES {
                return Err(FeedError::TooLarge {
                    url: url.to_string(),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// An error with its causes, as one line (reqwest hides the useful part in the sources).
pub fn error_chain(err: &dyn std::error::Error) -> String {
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
