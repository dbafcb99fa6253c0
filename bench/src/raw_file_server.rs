//! The baseline for agent update downloads: the least a tokio server can do to stream one
//! file to many HTTP clients on loopback.
//!
//! It binds the way the changeover server does, reads a request head, answers any `GET`
//! with `200`, `Content-Length` and `Connection: close`, and writes the file in chunks of
//! 256 KiB, read with `pread` straight from the page cache in the connection's task (the
//! file is hot after the first transfer; no blocking pool, no per-chunk allocation). It is
//! the limit, not a peer: it gets the best settings it can have, never fewer than the
//! server's (which reads 256 KiB at a time too). With `max_transfers` it serves that many at once and lets the
//! others wait for a slot on their open connection: the ideal queue, with no client ever
//! idle while a slot is free. No `Range`, no `503`, no checks: not a server for anything
//! but the comparison.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Bytes read from the file and written to the client at a time: as many as
/// `server/src/agent_updates.rs` reads (`CHUNK_BYTES`), a quarter of the system calls of
/// the 64 KiB it used before.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// The longest request head read.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Serves `file` on `listen`, prints `listening on http://ADDR`, and runs until the process
/// ends (SIGINT or SIGTERM, or a kill). `max_transfers` 0: no cap.
pub async fn run(
    listen: SocketAddr,
    backlog: u32,
    file: &Path,
    max_transfers: usize,
) -> anyhow::Result<()> {
    let tcp = changeover_server::listener::bind(listen, backlog)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let file = Arc::new(
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
    );
    let size = file
        .metadata()
        .context("cannot read the file's size")?
        .len();
    let slots = (max_transfers > 0).then(|| Arc::new(Semaphore::new(max_transfers)));
    println!(
        "listening on http://{}",
        tcp.local_addr().context("no local address")?
    );
    let serve = async {
        loop {
            match tcp.accept().await {
                Ok((stream, _peer)) => {
                    tokio::spawn(serve_one(stream, Arc::clone(&file), size, slots.clone()));
                }
                Err(err) => {
                    warn!(cause = %err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    };
    tokio::select! {
        () = serve => Ok(()),
        () = stop_signal() => Ok(()),
    }
}

async fn serve_one(
    mut stream: TcpStream,
    file: Arc<std::fs::File>,
    size: u64,
    slots: Option<Arc<Semaphore>>,
) {
    stream.set_nodelay(true).ok();
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => head.extend_from_slice(&chunk[..read]),
        }
        if head.len() > MAX_HEAD_BYTES {
            return;
        }
    }
    let _permit = match &slots {
        Some(slots) => match Arc::clone(slots).acquire_owned().await {
            Ok(permit) => Some(permit),
            Err(_) => return,
        },
        None => None,
    };
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {size}\r\n\
         Connection: close\r\n\r\n"
    );
    if stream.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let mut buffer = vec![0u8; CHUNK_BYTES];
    let mut offset = 0u64;
    while offset < size {
        let want = usize::try_from((size - offset).min(CHUNK_BYTES as u64)).unwrap_or(CHUNK_BYTES);
        // Page-cache hot: a copy, not a wait on the disk.
        let read = match file.read_at(&mut buffer[..want], offset) {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if let Err(err) = stream.write_all(&buffer[..read]).await {
            debug!(cause = %err, "client went away");
            return;
        }
        offset += read as u64;
    }
    let _ = stream.shutdown().await;
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
