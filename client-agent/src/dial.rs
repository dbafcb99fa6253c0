//! Opening a WebSocket to the server: `ws://` or `wss://`, with a site's own CA if given.
//!
//! TLS is rustls with the aws-lc-rs provider; trusted roots are the Mozilla set plus the
//! certificates of `--ca-file`, for sites that sign their server certificate themselves.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::either::Either;

/// The stream under an agent's WebSocket.
pub type AgentStream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// TCP connect, TLS and WebSocket handshake must all be done within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Knows how to reach one server URL.
#[derive(Clone)]
pub struct Dialer {
    url: String,
    host: String,
    port: u16,
    tls: Option<TlsConnector>,
    tls_config: Option<rustls::ClientConfig>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Dialer {
    /// Checks the URL and prepares TLS; nothing is connected yet.
    pub fn new(url: &str, ca_file: Option<&Path>) -> anyhow::Result<Dialer> {
        let request = url
            .into_client_request()
            .with_context(|| format!("{url:?} is not a ws:// or wss:// URL"))?;
        let uri = request.uri();
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => anyhow::bail!("{url:?} is not a ws:// or wss:// URL"),
        };
        let host = uri
            .host()
            .with_context(|| format!("{url:?} names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tls_config = if secure {
            Some(tls_config(ca_file)?)
        } else {
            if ca_file.is_some() {
                tracing::warn!("--ca-file is ignored for a ws:// URL");
            }
            None
        };
        Ok(Dialer {
            url: url.to_owned(),
            host,
            port,
            tls: tls_config
                .clone()
                .map(|config| TlsConnector::from(Arc::new(config))),
            tls_config,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The TLS settings of a `wss://` server (the same roots for its HTTP downloads).
    pub fn tls_config(&self) -> Option<rustls::ClientConfig> {
        self.tls_config.clone()
    }

    /// Connects and upgrades, within [`CONNECT_TIMEOUT`].
    pub async fn connect(
        &self,
        config: WebSocketConfig,
    ) -> anyhow::Result<WebSocketStream<AgentStream>> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_unbounded(config))
            .await
            .with_context(|| {
                format!(
                    "no answer from {} within {} s",
                    self.url,
                    CONNECT_TIMEOUT.as_secs()
                )
            })?
    }

    async fn connect_unbounded(
        &self,
        config: WebSocketConfig,
    ) -> anyhow::Result<WebSocketStream<AgentStream>> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot connect to {}:{}", self.host, self.port))?;
        tcp.set_nodelay(true).ok();
        let stream = match &self.tls {
            None => Either::Left(tcp),
            Some(connector) => {
                let name = ServerName::try_from(self.host.clone())
                    .with_context(|| format!("{:?} is not a valid TLS server name", self.host))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {} failed", self.url))?;
                Either::Right(tls)
            }
        };
        let request = self.url.as_str().into_client_request()?;
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await
                .with_context(|| format!("WebSocket handshake with {} failed", self.url))?;
        Ok(ws)
    }
}

fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca_file) = ca_file {
        let certificates = CertificateDer::pem_file_iter(ca_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("cannot read the CA file {}", ca_file.display()))?;
        let (added, _ignored) = roots.add_parsable_certificates(certificates);
        anyhow::ensure!(
            added > 0,
            "the CA file {} holds no usable PEM certificate",
            ca_file.display()
        );
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("cannot set up TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_before_any_connection() {
        assert!(Dialer::new("ws://127.0.0.1:7600", None).is_ok());
        assert!(Dialer::new("wss://example.com", None).is_ok());
        let err = Dialer::new("http://example.com", None).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a ws:// or wss:// URL"),
            "{err:#}"
        );
        assert!(Dialer::new("not a url", None).is_err());
    }

    #[test]
    fn a_missing_ca_file_is_a_clear_error() {
        let err =
            Dialer::new("wss://example.com", Some(Path::new("/nonexistent.pem"))).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot read the CA file"),
            "{err:#}"
        );
    }
}
