//! A headless Chromium for the tests that drive a web page as a person would: starts
//! `chromedriver` on a free port, opens one WebDriver session (fantoccini) and offers
//! blocking helpers (`goto`, `fill`, `click`, `text_of`, `wait_for`, `screenshot`).
//!
//! Every screenshot lands in `target/test-artifacts/console/<test>/NN-<name>.png`, so a
//! person can look at what the test saw. When the test panics, dropping the [`Browser`]
//! saves a last screenshot, the page source and the browser's console log there too.
//! Not a general WebDriver wrapper: only what the tests here use.
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/test installs them).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::Process;
use crate::feeds::free_port;

/// The browser chromedriver starts (Debian's package).
const CHROMIUM: &str = "/usr/bin/chromium";
/// How often the `wait_*` helpers look again.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// One headless Chromium under one chromedriver, for one test.
#[derive(Debug)]
pub struct Browser {
    /// Drives the async WebDriver client from these blocking tests; a current-thread
    /// runtime is enough because every call waits for its answer.
    runtime: tokio::runtime::Runtime,
    /// `None` once the session was closed.
    client: Option<Client>,
    /// Killed on drop, after the session (and with it Chromium) was closed.
    chromedriver: Process,
    /// Where the screenshots and the failure dump go; emptied when the browser starts.
    artifacts: PathBuf,
    /// Numbers the screenshots in the order they were taken.
    screenshots_taken: std::cell::Cell<u32>,
    /// Chromium's profile, thrown away with the browser.
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium; `test_name` names the artifacts folder.
    pub fn start(test_name: &str) -> Browser {
        let artifacts = artifacts_root().join(test_name);
        let _ = std::fs::remove_dir_all(&artifacts);
        std::fs::create_dir_all(&artifacts).expect("artifacts folder");
        let chromedriver_binary = which("chromedriver")
            .expect("chromedriver is installed (scripts/test installs Debian's chromium-driver)");
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is installed (scripts/test installs Debian's chromium)"
        );

        let port = free_port();
        let log = artifacts.join("chromedriver.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(chromedriver_binary)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("chromedriver starts");
        let chromedriver = Process::from_child(child, log);
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        crate::eventually(Duration::from_secs(20), "chromedriver to listen", || {
            TcpStream::connect_timeout(&address, Duration::from_millis(200))
                .ok()
                .map(drop)
        });

        let profile = tempfile::tempdir().expect("profile folder");
        let mut capabilities = Capabilities::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        // Keeps what the page logs, for the dump when a test fails.
        capabilities.insert("goog:loggingPrefs".to_owned(), json!({ "browser": "ALL" }));

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = runtime
            .block_on(
                ClientBuilder::new(connector)
                    .capabilities(capabilities)
                    .connect(&format!("http://{address}")),
            )
            .unwrap_or_else(|err| {
                panic!(
                    "no WebDriver session: {err}; chromedriver log:\n{}",
                    chromedriver.log_text()
                )
            });
        Browser {
            runtime,
            client: Some(client),
            chromedriver,
            artifacts,
            screenshots_taken: std::cell::Cell::new(0),
            _profile: profile,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("the session is open")
    }

    /// The folder this test's screenshots go to.
    pub fn artifacts(&self) -> &Path {
        &self.artifacts
    }

    /// Opens `url` and waits for the page to load.
    pub fn goto(&self, url: &str) {
        self.runtime
            .block_on(self.client().goto(url))
            .unwrap_or_else(|err| panic!("opening {url}: {err}"));
    }

    /// Replaces the value of the input `css` with `text`.
    pub fn fill(&self, css: &str, text: &str) {
        let result = self.runtime.block_on(async {
            let input = self.client().find(Locator::Css(css)).await?;
            input.clear().await?;
            input.send_keys(text).await
        });
        result.unwrap_or_else(|err| panic!("filling {css}: {err}"));
    }

    pub fn click(&self, css: &str) {
        let result = self
            .runtime
            .block_on(async { self.client().find(Locator::Css(css)).await?.click().await });
        result.unwrap_or_else(|err| panic!("clicking {css}: {err}"));
    }

    /// The rendered text of the element `css`; panics when there is none.
    pub fn text_of(&self, css: &str) -> String {
        self.try_text_of(css)
            .unwrap_or_else(|| panic!("no element {css} on the page"))
    }

    /// The rendered text of the element `css`, or `None` when there is none (or it went
    /// away while being read, as happens while a page re-renders).
    pub fn try_text_of(&self, css: &str) -> Option<String> {
        self.runtime
            .block_on(async { self.client().find(Locator::Css(css)).await?.text().await })
            .ok()
    }

    /// The rendered texts of every element matching `css`, in document order.
    pub fn texts_of(&self, css: &str) -> Vec<String> {
        self.runtime
            .block_on(async {
                let mut texts = Vec::new();
                for element in self.client().find_all(Locator::Css(css)).await? {
                    texts.push(element.text().await?);
                }
                Ok::<_, fantoccini::error::CmdError>(texts)
            })
            .unwrap_or_default()
    }

    /// How many elements match `css`.
    pub fn count(&self, css: &str) -> usize {
        self.runtime
            .block_on(self.client().find_all(Locator::Css(css)))
            .map_or(0, |elements| elements.len())
    }

    /// Whether an element `css` exists and is displayed.
    pub fn is_visible(&self, css: &str) -> bool {
        self.runtime
            .block_on(async {
                self.client()
                    .find(Locator::Css(css))
                    .await?
                    .is_displayed()
                    .await
            })
            .unwrap_or(false)
    }

    /// The value of the form field `css` (what `fill` typed, or what the page put there).
    pub fn value_of(&self, css: &str) -> Option<String> {
        self.runtime
            .block_on(async {
                self.client()
                    .find(Locator::Css(css))
                    .await?
                    .prop("value")
                    .await
            })
            .ok()
            .flatten()
    }

    /// Scrolls the element `css` into view, for a screenshot of what lies below the fold.
    pub fn scroll_to(&self, css: &str) {
        let script = "document.querySelector(arguments[0]).scrollIntoView()";
        self.runtime
            .block_on(self.client().execute(script, vec![json!(css)]))
            .unwrap_or_else(|err| panic!("scrolling to {css}: {err}"));
    }

    /// Runs `script` in the page and returns what it returned.
    pub fn execute(&self, script: &str) -> Value {
        self.runtime
            .block_on(self.client().execute(script, Vec::new()))
            .unwrap_or_else(|err| panic!("running a script: {err}"))
    }

    /// Waits until an element `css` is displayed, polling every 100 ms.
    pub fn wait_for(&self, css: &str, patience: Duration) {
        self.wait_until(patience, &format!("{css} to be visible"), |browser| {
            browser.is_visible(css).then_some(())
        });
    }

    /// Polls `check` every 100 ms until it returns `Some`, or panics naming `what` after
    /// `patience` (and the drop saves what the page showed then).
    pub fn wait_until<T>(
        &self,
        patience: Duration,
        what: &str,
        mut check: impl FnMut(&Browser) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(value) = check(self) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {patience:?} waiting for {what}"
            );
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// Saves what the window shows as `NN-<name>.png`; returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .runtime
            .block_on(self.client().screenshot())
            .unwrap_or_else(|err| panic!("screenshot {name}: {err}"));
        self.save(name, "png", &png)
    }

    /// The page's HTML as the browser has it now (after scripts changed it).
    pub fn page_source(&self) -> String {
        self.runtime
            .block_on(self.client().source())
            .unwrap_or_else(|err| panic!("page source: {err}"))
    }

    /// What the page wrote to the browser's console since the last call (chromedriver's
    /// log extension), one line per entry.
    pub fn console_log(&self) -> Vec<String> {
        let entries = self
            .runtime
            .block_on(self.client().issue_cmd(BrowserLog))
            .unwrap_or_else(|err| Value::String(format!("no browser log: {err}")));
        match entries {
            Value::Array(entries) => entries
                .iter()
                .map(|entry| {
                    format!(
                        "{} {}",
                        entry["level"].as_str().unwrap_or("?"),
                        entry["message"].as_str().unwrap_or("")
                    )
                })
                .collect(),
            other => vec![other.to_string()],
        }
    }

    fn save(&self, name: &str, extension: &str, contents: &[u8]) -> PathBuf {
        let number = self.screenshots_taken.get() + 1;
        self.screenshots_taken.set(number);
        let path = self
            .artifacts
            .join(format!("{number:02}-{name}.{extension}"));
        std::fs::write(&path, contents).expect("artifact written");
        path
    }

    /// The last screenshot, the page source and the console log, for a failed test.
    fn dump_after_failure(&self) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let patience = Duration::from_secs(10);
        let screenshot = self
            .runtime
            .block_on(async { tokio::time::timeout(patience, client.screenshot()).await });
        if let Ok(Ok(png)) = screenshot {
            self.save("failure", "png", &png);
        }
        let source = self
            .runtime
            .block_on(async { tokio::time::timeout(patience, client.source()).await });
        if let Ok(Ok(html)) = source {
            self.save("failure", "html", html.as_bytes());
        }
        let log = self
            .runtime
            .block_on(async { tokio::time::timeout(patience, client.issue_cmd(BrowserLog)).await });
        if let Ok(Ok(entries)) = log {
            let text = serde_json::to_string_pretty(&entries).unwrap_or_default();
            self.save("failure-console", "json", text.as_bytes());
        }
        eprintln!(
            "browser: what the page showed is in {}",
            self.artifacts.display()
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_after_failure();
        }
        // Closing the session makes chromedriver end Chromium; killing chromedriver alone
        // would leave Chromium running.
        if let Some(client) = self.client.take() {
            let _ = self.runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), client.close()).await
            });
        }
        // `chromedriver` (a Process) is killed when the fields drop.
        let _ = &self.chromedriver;
    }
}

/// chromedriver's `POST /session/{id}/se/log` with `{"type": "browser"}`: the page's
/// console messages, which the WebDriver standard has no command for.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({ "type": "browser" }).to_string()),
        )
    }
}

/// `target/test-artifacts/console`: under `CARGO_TARGET_DIR` when set, else the
/// workspace's `target/`.
fn artifacts_root() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace");
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    target.join("test-artifacts/console")
}

/// The first `name` on `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feeds::StaticServer;

    /// The harness itself, against a static page served by Python's `http.server`.
    #[test]
    fn drives_a_static_page() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("site");
        std::fs::create_dir_all(&site).unwrap();
        std::fs::write(
            site.join("index.html"),
            r#"<!doctype html><title>harness</title>
<form id="form"><input id="name"><button id="go" type="button">go</button></form>
<p id="greeting" hidden></p>
<ul id="items"><li>one</li><li>two</li></ul>
<script>
  document.getElementById("go").addEventListener("click", () => {
    setTimeout(() => {
      const greeting = document.getElementById("greeting");
      greeting.textContent = "hello " + document.getElementById("name").value;
      greeting.hidden = false;
      console.log("greeted");
    }, 300);
  });
</script>"#,
        )
        .unwrap();
        let server = StaticServer::python(&site, dir.path());

        let browser = Browser::start("harness-drives-a-static-page");
        browser.goto(&server.url());
        assert!(!browser.is_visible("#greeting"));
        browser.fill("#name", "first");
        browser.fill("#name", "anna");
        assert_eq!(browser.value_of("#name").as_deref(), Some("anna"));
        browser.click("#go");
        browser.wait_for("#greeting", Duration::from_secs(5));
        assert_eq!(browser.text_of("#greeting"), "hello anna");
        assert_eq!(browser.texts_of("#items li"), ["one", "two"]);
        assert_eq!(browser.count("#items li"), 2);
        assert_eq!(browser.try_text_of("#missing"), None);
        assert_eq!(browser.execute("return 1 + 2"), json!(3));
        browser.scroll_to("#items");
        assert!(browser.page_source().contains("hello anna"));
        let console_log = browser.console_log();
        assert!(
            console_log.iter().any(|line| line.contains("greeted")),
            "{console_log:?}"
        );
        let shot = browser.screenshot("greeted");
        assert!(shot.ends_with("01-greeted.png"), "{}", shot.display());
        let png = std::fs::read(&shot).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
    }

    /// A test that fails leaves the last screenshot, the page and its console log behind.
    #[test]
    fn a_panic_leaves_a_dump() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("index.html"),
            "<!doctype html><p id=broken>what went wrong</p><script>console.error('oops')</script>",
        )
        .unwrap();
        let server = StaticServer::python(dir.path(), dir.path());
        let url = server.url();
        let test_name = "harness-a-panic-leaves-a-dump";
        let artifacts = artifacts_root().join(test_name);
        let failed = std::panic::catch_unwind(move || {
            let browser = Browser::start(test_name);
            browser.goto(&url);
            browser.wait_for("#never", Duration::from_millis(300));
        });
        assert!(failed.is_err(), "waiting for a missing element fails");
        let html = std::fs::read_to_string(artifacts.join("02-failure.html")).unwrap();
        assert!(html.contains("what went wrong"), "{html}");
        let png = std::fs::read(artifacts.join("01-failure.png")).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let log = std::fs::read_to_string(artifacts.join("03-failure-console.json")).unwrap();
        assert!(log.contains("oops"), "{log}");
    }
}
