//! The health probes of `app.toml`: an HTTP URL answering 2xx, a TCP address accepting, or
//! a command exiting 0.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::manifest::{Probe, resolve_program};

/// How long one probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs one probe from `release` (the working folder of a command probe).
pub async fn run(probe: &Probe, release: &Path, http: &reqwest::Client) -> anyhow::Result<()> {
    match tokio::time::timeout(PROBE_TIMEOUT, run_unbounded(probe, release, http)).await {
        Ok(result) => result,
        Err(_) => bail!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
    }
}

async fn run_unbounded(
    probe: &Probe,
    release: &Path,
    http: &reqwest::Client,
) -> anyhow::Result<()> {
    match probe {
        Probe::Http(url) => {
            let response = http
                .get(url)
                .send()
                .await
                .map_err(|err| anyhow::anyhow!("GET {url}: {}", describe(&err)))?;
            let status = response.status();
            if !status.is_success() {
                bail!("GET {url} answered {status}");
            }
            Ok(())
        }
        Probe::Tcp(address) => {
            tokio::net::TcpStream::connect(address.as_str())
                .await
                .with_context(|| format!("cannot connect to {address}"))?;
            Ok(())
        }
        Probe::Command(command) => {
            let program = resolve_program(release, &command[0]);
            let output = tokio::process::Command::new(&program)
                .args(&command[1..])
                .current_dir(release)
                .env_remove(crate::auth::ADMIN_PASSWORD_ENV)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .with_context(|| format!("cannot run {}", program.display()))?;
            if !output.status.success() {
                bail!(
                    "{} {}{}",
                    command.join(" "),
                    output.status,
                    last_line(&output.stdout, &output.stderr)
                        .map(|line| format!(": {line}"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}

/// The HTTP client of the probes: local addresses, so no proxy.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(PROBE_TIMEOUT)
        .connect_timeout(PROBE_TIMEOUT)
        .build()
        .unwrap_or_default()
}

/// The last non-empty line of a command's output, stderr first.
pub fn last_line(stdout: &[u8], stderr: &[u8]) -> Option<String> {
    [stderr, stdout].into_iter().find_map(|bytes| {
        String::from_utf8_lossy(bytes)
            .lines()
            .rev()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .map(|line| line.chars().take(300).collect())
    })
}

// reqwest's error with its causes, which say what actually went wrong.
fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_kind_of_probe_passes_and_fails() {
        let release = tempfile::tempdir().unwrap();
        let http = http_client();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = Probe::Tcp(other.local_addr().unwrap().to_string());
        run(&tcp, release.path(), &http).await.unwrap();
        let answers = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            for answer in ["200 OK", "503 Service Unavailable"] {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buffer = [0u8; 1024];
                let _ = stream.read(&mut buffer).await.unwrap();
                let reply =
                    format!("HTTP/1.1 {answer}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                stream.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let url = Probe::Http(format!("http://{address}/health"));
        run(&url, release.path(), &http).await.unwrap();
        let err = run(&url, release.path(), &http).await.unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
        answers.await.unwrap();

        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = run(&Probe::Tcp(free.to_string()), release.path(), &http)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("cannot connect"), "{err:#}");

        // A command probe through the shell.
        #[cfg(unix)]
        {
            let ok = Probe::Command(vec!["/bin/sh".into(), "-c".into(), "exit 0".into()]);
            run(&ok, release.path(), &http).await.unwrap();
            let failing = Probe::Command(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo not ready >&2; exit 3".into(),
            ]);
            let err = run(&failing, release.path(), &http).await.unwrap_err();
            assert!(err.to_string().contains("not ready"), "{err}");
        }
    }
}
