//! The demo's stand-in for the vendor's application server: a small order book over HTTP
//! that keeps its orders in `data/orders.txt` (a carried folder), so the demo can show the
//! site's data surviving a changeover. `changeover-server demo-app` runs it under the
//! server's supervision, configured by its `app.toml`:
//!
//! - `GET /health`: `200 ok VERSION` once the order book is open;
//! - `GET /orders`: `{"version": "...", "orders": ["...", ...]}`;
//! - `POST /orders`: the body (one line of text) appended and synced, `201`.
//!
//! SIGTERM ends it after the request in hand; every order answered `201` is on disk.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The environment the application is configured by (set in `app.toml`).
pub const PORT_ENV: &str = "DEMO_APP_PORT";
pub const VERSION_ENV: &str = "DEMO_APP_VERSION";

const MAX_HEAD: usize = 8 * 1024;
const MAX_BODY: usize = 4 * 1024;

/// Where the orders are kept, relative to the release root (the working folder).
pub fn orders_file(root: &Path) -> PathBuf {
    root.join("data/orders.txt")
}

/// The self-check the preflight runs: the configuration is complete and the data folder
/// can be written.
pub fn check() -> anyhow::Result<()> {
    settings()?;
    std::fs::create_dir_all("data").context("cannot create data/")?;
    let probe = Path::new("data/.check");
    std::fs::write(probe, b"ok").context("data/ is not writable")?;
    std::fs::remove_file(probe).context("cannot clean up data/.check")?;
    Ok(())
}

fn settings() -> anyhow::Result<(SocketAddr, String)> {
    let port: u16 = std::env::var(PORT_ENV)
        .with_context(|| format!("{PORT_ENV} is not set"))?
        .parse()
        .with_context(|| format!("{PORT_ENV} is not a port"))?;
    let version =
        std::env::var(VERSION_ENV).with_context(|| format!("{VERSION_ENV} is not set"))?;
    Ok((SocketAddr::from(([127, 0, 0, 1], port)), version))
}

/// Serves until SIGTERM or SIGINT.
pub async fn run() -> anyhow::Result<()> {
    let (address, version) = settings()?;
    let orders = orders_file(Path::new("."));
    std::fs::create_dir_all("data").context("cannot create data/")?;
    let count = read_orders(&orders)?.len();
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    println!("order book {version} on http://{address}/ with {count} orders");
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // One request at a time: appends are ordered and nothing is half-written
                // when the signal is handled.
                if let Err(err) = serve(stream, &orders, &version).await {
                    eprintln!("request failed: {err:#}");
                }
            }
            _ = crate::platform::stop_signal() => break,
        }
    }
    println!("order book {version} stopped; every order is on disk");
    Ok(())
}

fn read_orders(file: &Path) -> anyhow::Result<Vec<String>> {
    match std::fs::read_to_string(file) {
        Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", file.display())),
    }
}

fn append_order(file: &Path, order: &str) -> anyhow::Result<()> {
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .with_context(|| format!("cannot open {}", file.display()))?;
    writeln!(out, "{order}")?;
    out.sync_all()?;
    Ok(())
}

async fn serve(mut stream: TcpStream, orders: &Path, version: &str) -> anyhow::Result<()> {
    let request =
        tokio::time::timeout(std::time::Duration::from_secs(5), read_request(&mut stream))
            .await
            .context("the request did not arrive in time")?;
    let (status, body) = match request {
        Ok((method, path, body)) => respond(&method, &path, &body, orders, version),
        Err(err) => ("400 Bad Request", format!("{err:#}\n")),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

fn respond(
    method: &str,
    path: &str,
    body: &[u8],
    orders: &Path,
    version: &str,
) -> (&'static str, String) {
    match (method, path) {
        ("GET", "/health") => ("200 OK", format!("ok {version}\n")),
        ("GET", "/orders") => match read_orders(orders) {
            Ok(list) => (
                "200 OK",
                serde_json::json!({ "version": version, "orders": list }).to_string(),
            ),
            Err(err) => ("500 Internal Server Error", format!("{err:#}\n")),
        },
        ("POST", "/orders") => {
            let order = String::from_utf8_lossy(body);
            let order = order.trim();
            if order.is_empty() || order.contains(['\n', '\r']) {
                return (
                    "400 Bad Request",
                    "an order is one line of text\n".to_owned(),
                );
            }
            match append_order(orders, order) {
                Ok(()) => ("201 Created", "stored\n".to_owned()),
                Err(err) => ("500 Internal Server Error", format!("{err:#}\n")),
            }
        }
        _ => ("404 Not Found", "no such page\n".to_owned()),
    }
}

async fn read_request(stream: &mut TcpStream) -> anyhow::Result<(String, String, Vec<u8>)> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            bail!("the connection closed before the request was complete");
        }
        buffer.extend_from_slice(&chunk[..read]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buffer)? {
            httparse::Status::Partial if buffer.len() > MAX_HEAD => bail!("request head too long"),
            httparse::Status::Partial => {}
            httparse::Status::Complete(head) => {
                let length = request
                    .headers
                    .iter()
                    .find(|header| header.name.eq_ignore_ascii_case("content-length"))
                    .map(|header| {
                        std::str::from_utf8(header.value)
                            .unwrap_or("x")
                            .trim()
                            .parse()
                    })
                    .transpose()
                    .context("bad content-length")?
                    .unwrap_or(0usize);
                if length > MAX_BODY {
                    bail!("body larger than {MAX_BODY} bytes");
                }
                let method = request.method.unwrap_or("").to_owned();
                let path = request.path.unwrap_or("").to_owned();
                let mut body = buffer[head..].to_vec();
                while body.len() < length {
                    let read = stream.read(&mut chunk).await?;
                    if read == 0 {
                        bail!("the connection closed before the body was complete");
                    }
                    body.extend_from_slice(&chunk[..read]);
                }
                body.truncate(length);
                return Ok((method, path, body));
            }
        }
    }
}
