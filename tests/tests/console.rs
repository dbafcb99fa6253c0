//! The server's web console, end to end: a headless Chromium logs in, watches three real
//! agents and drives a changeover through the server's restart; a hand-written HTTP client
//! checks that the console's API refuses requests without the session cookie, the CSRF
//! token or a same-origin `Origin`.
//!
//! Screenshots of what the browser saw land in `target/test-artifacts/console/<test>/`.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use changeover_protocol::release::current_platform;
use changeover_tests::browser::Browser;
use changeover_tests::feeds::{StaticServer, Vendor, server_tree};
use changeover_tests::{
    ADMIN_PASSWORD, FAST_HEARTBEAT_CONFIG, Process, Server, binary, eventually, start_agent, status,
};
use serde_json::{Value, json};

/// Long enough for a debug build on a busy two-core machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// The phases of a changeover that commits, in the order the console must list them.
const PHASES_IN_ORDER: [&str; 8] = [
    "preparing",
    "counting_down",
    "logging_out",
    "stopping",
    "carrying_over",
    "swapping",
    "restarting",
    "health_check",
];

/// `bin/office-app` in release 1.1.0: a vendor's application that takes a few seconds to
/// come up, as real ones do, so the new release's health check outlasts the page's
/// one-second poll (and the `#apps` table has a row). It ends with the server, even one
/// killed outright.
const SLOW_APP: &str = "#!/bin/sh\nsleep 3\n: > office-app-ready\n\
    while kill -0 \"$PPID\" 2>/dev/null; do sleep 1; done\n";

const SLOW_APP_TOML: &str = "[[app]]\nname = \"office\"\ncommand = [\"bin/office-app\"]\n\
    stop_timeout_secs = 5\n\
    health = { command = [\"/bin/sh\", \"-c\", \"test -e office-app-ready\"] }\n";

/// A vendor and a feed with two real server releases, 1.0.0 and 1.1.0 (with the slow
/// application), packed once.
struct Fixture {
    _dir: tempfile::TempDir,
    vendor: Vendor,
    feed: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let vendor = Vendor::create(&dir.path().join("vendor"));
        let feed = dir.path().join("feed");
        let old = server_tree(&dir.path().join("tree-1.0.0"), &[]);
        vendor.pack("server", "1.0.0", &old, &feed);
        let new = server_tree(
            &dir.path().join("tree-1.1.0"),
            &[
                ("app.toml", SLOW_APP_TOML.as_bytes()),
                ("bin/office-app", SLOW_APP.as_bytes()),
            ],
        );
        std::fs::set_permissions(
            new.join("bin/office-app"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        vendor.pack("server", "1.1.0", &new, &feed);
        Fixture {
            _dir: dir,
            vendor,
            feed,
        }
    })
}

/// A product folder with release 1.0.0 installed and a feed server offering 1.1.0.
struct Site {
    dir: tempfile::TempDir,
    root: PathBuf,
    feed_server: StaticServer,
}

impl Site {
    fn new() -> Site {
        let fixture = fixture();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("office");
        let archive = format!("server-1.0.0-{}.tar.gz", current_platform());
        let output = Command::new(binary("changeover-server"))
            .args(["install", "--root"])
            .arg(&root)
            .arg("--package")
            .arg(fixture.feed.join(archive))
            .arg("--public-key")
            .arg(&fixture.vendor.public_key)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let feed_server = StaticServer::python(&fixture.feed, dir.path());
        Site {
            dir,
            root,
            feed_server,
        }
    }

    fn start(&self) -> Server {
        let config = format!(
            "[server]\nheartbeat_secs = 1\n[feed]\nurl = \"{}\"\n[changeover]\nhealth_timeout_secs = 20\n",
            self.feed_server.url()
        );
        Server::start_installed(&self.root, &config)
    }

    fn agent(&self, server: &Server, user: &str) -> Process {
        start_agent(&server.url(), user, &self.dir.path().join(user), &[])
    }

    fn installed_version(&self) -> String {
        let text = std::fs::read_to_string(self.root.join("server/release.json")).unwrap();
        let info: Value = serde_json::from_str(&text).unwrap();
        info["version"].as_str().unwrap().to_owned()
    }
}

fn console_url(server: &Server) -> String {
    server.console_url().unwrap_or_else(|| {
        panic!(
            "the server printed no `console on` line: {:?}",
            server.stdout_lines
        )
    })
}

/// Logs in through the form and waits for the dashboard.
fn log_in(browser: &Browser, url: &str) {
    browser.goto(url);
    browser.wait_for("#login-form", PATIENCE);
    browser.fill("#password", ADMIN_PASSWORD);
    browser.screenshot("login");
    browser.click("#login-button");
    browser.wait_for("#dashboard", PATIENCE);
}

/// The phase a `#phases` entry names, if it names one.
fn phase_named(text: &str) -> Option<&'static str> {
    PHASES_IN_ORDER
        .iter()
        .copied()
        .find(|phase| text.contains(phase))
}

#[test]
fn console_drives_a_changeover_through_the_restart() {
    let site = Site::new();
    let server = site.start();
    let url = console_url(&server);
    let _agents: Vec<Process> = ["anna", "ben", "cleo"]
        .iter()
        .map(|user| site.agent(&server, user))
        .collect();

    let browser = Browser::start("console_drives_a_changeover_through_the_restart");
    log_in(&browser, &url);
    browser.screenshot("dashboard");
    browser.wait_until(PATIENCE, "three sessions listed", |browser| {
        (browser.text_of("#sessions-count").trim() == "3" && browser.count("tr.session") == 3)
            .then_some(())
    });
    let mut users = browser.texts_of("tr.session td.user");
    users.sort();
    assert_eq!(users, ["anna", "ben", "cleo"]);
    for cell in ["td.host", "td.agent-version", "td.connected-since"] {
        let texts = browser.texts_of(&format!("tr.session {cell}"));
        assert_eq!(texts.len(), 3, "{cell}: {texts:?}");
        assert!(
            texts.iter().all(|text| !text.trim().is_empty()),
            "{cell}: {texts:?}"
        );
    }
    assert_eq!(browser.count("tr.session td.update-state"), 3);
    assert!(browser.text_of("#server-version").contains("1.0.0"));
    browser.wait_until(PATIENCE, "1.1.0 offered", |browser| {
        browser
            .text_of("#available-version")
            .contains("1.1.0")
            .then_some(())
    });
    browser.screenshot("three-sessions");

    browser.fill("#grace", "5");
    browser.fill("#message", "Back in a minute");
    browser.click("#update-button");
    browser.wait_for("#confirm", PATIENCE);
    let confirm_text = browser.text_of("#confirm-text");
    assert!(confirm_text.contains("3 users"), "{confirm_text}");
    browser.screenshot("confirm");
    browser.click("#confirm-yes");

    // The countdown ticks down: two different numbers, the later one smaller.
    let mut countdown_seen: Vec<u64> = Vec::new();
    browser.wait_until(PATIENCE, "the countdown to tick", |browser| {
        let seconds = browser
            .try_text_of("#countdown")
            .and_then(|text| first_number(&text));
        if let Some(seconds) = seconds
            && countdown_seen.last() != Some(&seconds)
        {
            countdown_seen.push(seconds);
        }
        (countdown_seen.len() >= 2).then_some(())
    });
    assert!(
        countdown_seen.windows(2).all(|pair| pair[0] > pair[1]),
        "{countdown_seen:?}"
    );
    assert!(countdown_seen[0] <= 5, "{countdown_seen:?}");
    browser.screenshot("countdown");

    // Through the logout and the restart to the outcome, noting what the page showed. The
    // page must stay logged in: its session outlives the server's restart.
    let mut phases_shown: Vec<String> = Vec::new();
    let mut saw_restarting = false;
    let mut saw_login_form = false;
    let outcome = browser.wait_until(Duration::from_secs(120), "the outcome", |browser| {
        if let Some(phase) = browser.try_text_of("#phase") {
            let phase = phase.trim().to_owned();
            if !phase.is_empty() && phases_shown.last() != Some(&phase) {
                phases_shown.push(phase);
            }
        }
        let restarting = browser.is_visible("#restarting")
            || phases_shown
                .last()
                .is_some_and(|phase| phase == "restarting" || phase == "health_check");
        if restarting && !saw_restarting {
            browser.screenshot("restarting");
        }
        saw_restarting |= restarting;
        saw_login_form |= browser.is_visible("#login-form");
        browser
            .try_text_of("#outcome")
            .filter(|text| !text.trim().is_empty())
    });
    browser.screenshot("outcome");
    assert!(outcome.contains("committed"), "{outcome}");
    assert!(outcome.contains("ms"), "the downtime in ms: {outcome}");

    // The page's own list of the phases it saw, in order.
    let listed: Vec<String> = browser.texts_of("#phases li");
    let listed_phases: Vec<&str> = listed.iter().filter_map(|text| phase_named(text)).collect();
    assert!(
        listed_phases.starts_with(&["preparing", "counting_down"]),
        "{listed:?}"
    );
    assert!(listed_phases.contains(&"logging_out"), "{listed:?}");
    let positions: Vec<usize> = listed_phases
        .iter()
        .map(|phase| {
            PHASES_IN_ORDER
                .iter()
                .position(|known| known == phase)
                .unwrap()
        })
        .collect();
    assert!(
        positions.windows(2).all(|pair| pair[0] <= pair[1]),
        "{listed:?}"
    );
    assert!(
        !saw_login_form,
        "the page asked for the password again during the changeover: shown {phases_shown:?}"
    );
    // The restart shows: the event stream drops when the old process gives way, and the
    // new release reports its health check (the slow app makes that last seconds).
    assert!(
        listed_phases.contains(&"health_check"),
        "the health check after the restart: {listed:?}, shown {phases_shown:?}"
    );
    assert!(saw_restarting, "shown {phases_shown:?}, listed {listed:?}");

    browser.wait_until(PATIENCE, "the new version on the dashboard", |browser| {
        browser
            .text_of("#server-version")
            .contains("1.1.0")
            .then_some(())
    });
    browser.wait_until(PATIENCE, "the agents back", |browser| {
        (browser.text_of("#sessions-count").trim() == "3").then_some(())
    });
    browser.wait_until(PATIENCE, "the changeover in the history", |browser| {
        browser
            .texts_of("#history tr.changeover")
            .iter()
            .any(|row| row.contains("1.1.0") && row.contains("committed"))
            .then_some(())
    });
    browser.wait_until(PATIENCE, "the update in the audit log", |browser| {
        let actions = browser.texts_of("#audit tr.audit td.action");
        actions
            .iter()
            .any(|action| action.contains("update"))
            .then_some(())
    });
    let addresses = browser.texts_of("#audit tr.audit td.address");
    assert!(
        addresses
            .iter()
            .any(|address| address.contains("127.0.0.1")),
        "{addresses:?}"
    );
    // The new release's application, which the health check waited for.
    browser.wait_until(PATIENCE, "the application listed", |browser| {
        let rows = browser.texts_of("#apps tbody tr");
        rows.iter()
            .any(|row| row.contains("office") && row.contains("healthy"))
            .then_some(())
    });
    browser.screenshot("committed");
    browser.scroll_to("#history");
    browser.screenshot("history-and-audit");

    // The server agrees: the same process now runs 1.1.0 from the swapped install.
    let report = eventually(PATIENCE, "1.1.0 in admin status", || {
        let report = status(&server.url());
        (report["server_version"] == "1.1.0").then_some(report)
    });
    assert_eq!(
        report["last_changeover"]["outcome"], "committed",
        "{report}"
    );
    assert_eq!(site.installed_version(), "1.1.0");
    assert!(
        !site.root.join("server_old").exists(),
        "the old release is deleted after the commit"
    );
    let audit = report["audit"].as_array().cloned().unwrap_or_default();
    assert!(
        audit
            .iter()
            .any(|entry| entry["action"] == "update" && entry["via"] == "console"),
        "{report}"
    );
}

#[test]
fn a_wrong_password_shows_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("office"), Some(FAST_HEARTBEAT_CONFIG));
    let url = console_url(&server);

    let browser = Browser::start("a_wrong_password_shows_an_error");
    browser.goto(&url);
    browser.wait_for("#login-form", PATIENCE);
    browser.fill("#password", "not-the-password");
    browser.click("#login-button");
    let error = browser.wait_until(PATIENCE, "a login error", |browser| {
        browser
            .is_visible("#login-error")
            .then(|| browser.text_of("#login-error"))
            .filter(|text| !text.trim().is_empty())
    });
    browser.screenshot("wrong-password");
    assert!(!browser.is_visible("#dashboard"), "{error}");

    // The right password still gets in, and logging out leads back to the form.
    log_in(&browser, &url);
    browser.screenshot("dashboard");
    browser.click("#logout-button");
    browser.wait_for("#login-form", PATIENCE);
    assert!(!browser.is_visible("#dashboard"));
    browser.screenshot("logged-out");
}

#[test]
fn a_changeover_cancelled_in_the_console_tells_the_users_and_changes_nothing() {
    let site = Site::new();
    let server = site.start();
    let url = console_url(&server);
    let told = site.dir.path().join("dora-told.txt");
    let hook = format!("echo \"$CHANGEOVER_EVENT\" >> '{}'", told.display());
    let dora = start_agent(
        &server.url(),
        "dora",
        &site.dir.path().join("dora"),
        &["--warn-hook", &hook],
    );

    let browser = Browser::start("a_changeover_cancelled_in_the_console");
    log_in(&browser, &url);
    browser.wait_until(PATIENCE, "dora listed and 1.1.0 offered", |browser| {
        (browser.count("tr.session") == 1
            && browser.text_of("#available-version").contains("1.1.0"))
        .then_some(())
    });
    // No: nothing starts.
    browser.fill("#grace", "60");
    browser.click("#update-button");
    browser.wait_for("#confirm", PATIENCE);
    assert!(browser.text_of("#confirm-text").contains("1 user"));
    browser.click("#confirm-no");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(status(&server.url())["phase"], "idle");

    // Yes, then cancel during the countdown.
    browser.click("#update-button");
    browser.wait_for("#confirm", PATIENCE);
    browser.click("#confirm-yes");
    browser.wait_until(PATIENCE, "the countdown", |browser| {
        (browser.text_of("#phase").trim() == "counting_down"
            && browser.is_visible("#cancel-button"))
        .then_some(())
    });
    browser.screenshot("counting-down");
    browser.click("#cancel-button");
    let outcome = browser.wait_until(PATIENCE, "the outcome", |browser| {
        browser
            .try_text_of("#outcome")
            .filter(|text| !text.trim().is_empty())
    });
    browser.screenshot("cancelled");
    assert!(outcome.contains("cancelled"), "{outcome}");
    let report = status(&server.url());
    assert_eq!(
        report["last_changeover"]["outcome"], "cancelled",
        "{report}"
    );
    assert_eq!(report["server_version"], "1.0.0");
    assert_eq!(site.installed_version(), "1.0.0");
    let cancel_audited = report["audit"].as_array().is_some_and(|entries| {
        entries
            .iter()
            .any(|entry| entry["action"] == "cancel" && entry["via"] == "console")
    });
    assert!(cancel_audited, "{report}");
    eventually(PATIENCE, "dora told of the warning and the cancel", || {
        let warned = std::fs::read_to_string(&told).ok()?.contains("warning");
        (warned && dora.log_text().contains("called off")).then_some(())
    });
}

#[test]
fn requests_without_the_cookie_or_the_csrf_token_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("office"), Some(FAST_HEARTBEAT_CONFIG));
    let url = console_url(&server);
    let console = Console::at(&url);
    let status_request = json!({ "type": "status_request" });

    // The page itself is public; what it talks to is not.
    let page = console.request("GET", "/console/", &[], None);
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.header("content-type")
            .unwrap_or_default()
            .contains("text/html")
    );
    assert!(page.body.contains("login-form"), "{page:?}");
    let anonymous = console.request("POST", "/console/api/call", &[], Some(&status_request));
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    let anonymous_events = console.request("GET", "/console/api/events", &[], None);
    assert_eq!(anonymous_events.status, 401, "{anonymous_events:?}");

    let wrong = console.request(
        "POST",
        "/console/api/login",
        &[],
        Some(&json!({ "password": "not-the-password" })),
    );
    assert_eq!(wrong.status, 401, "{wrong:?}");
    assert!(wrong.json()["error"].is_string(), "{wrong:?}");
    assert!(wrong.header("set-cookie").is_none(), "{wrong:?}");

    let login = console.request(
        "POST",
        "/console/api/login",
        &[],
        Some(&json!({ "password": ADMIN_PASSWORD })),
    );
    assert_eq!(login.status, 200, "{login:?}");
    let csrf = login.json()["csrf"]
        .as_str()
        .expect("the login answers with a CSRF token")
        .to_owned();
    assert!(!csrf.is_empty());
    let set_cookie = login.header("set-cookie").expect("a session cookie");
    let (cookie, attributes) = set_cookie.split_once(';').unwrap_or((set_cookie, ""));
    assert!(cookie.starts_with("changeover_console="), "{set_cookie}");
    let attributes: Vec<String> = attributes
        .split(';')
        .map(|attribute| attribute.trim().to_ascii_lowercase())
        .collect();
    for wanted in ["httponly", "samesite=strict", "path=/console"] {
        assert!(
            attributes.iter().any(|attribute| attribute == wanted),
            "{wanted} in {set_cookie}"
        );
    }
    assert!(
        !attributes.iter().any(|attribute| attribute == "secure"),
        "no Secure over plain HTTP: {set_cookie}"
    );
    let cookie_header = ("Cookie", cookie.trim().to_owned());
    let csrf_header = ("X-CSRF-Token", csrf.clone());
    let same_origin = ("Origin", console.origin());

    let without_csrf = console.request(
        "POST",
        "/console/api/call",
        std::slice::from_ref(&cookie_header),
        Some(&status_request),
    );
    assert_eq!(without_csrf.status, 403, "{without_csrf:?}");
    let wrong_csrf = console.request(
        "POST",
        "/console/api/call",
        &[cookie_header.clone(), ("X-CSRF-Token", format!("{csrf}x"))],
        Some(&status_request),
    );
    assert_eq!(wrong_csrf.status, 403, "{wrong_csrf:?}");
    let csrf_without_cookie = console.request(
        "POST",
        "/console/api/call",
        std::slice::from_ref(&csrf_header),
        Some(&status_request),
    );
    assert_eq!(csrf_without_cookie.status, 401, "{csrf_without_cookie:?}");
    let cross_origin = console.request(
        "POST",
        "/console/api/call",
        &[
            cookie_header.clone(),
            csrf_header.clone(),
            ("Origin", "http://evil.example".to_owned()),
        ],
        Some(&status_request),
    );
    assert_eq!(cross_origin.status, 403, "{cross_origin:?}");
    let cross_origin_login = console.request(
        "POST",
        "/console/api/login",
        &[("Origin", "http://evil.example".to_owned())],
        Some(&json!({ "password": ADMIN_PASSWORD })),
    );
    assert_eq!(cross_origin_login.status, 403, "{cross_origin_login:?}");

    let answer = console.request(
        "POST",
        "/console/api/call",
        &[
            cookie_header.clone(),
            csrf_header.clone(),
            same_origin.clone(),
        ],
        Some(&status_request),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    let report = answer.json();
    assert_eq!(report["type"], "status", "{answer:?}");
    assert!(report["server_version"].is_string(), "{answer:?}");
    // The CLI's status names the same console.
    assert_eq!(status(&server.url())["console_url"], json!(url));

    let events = console.request(
        "GET",
        "/console/api/events",
        std::slice::from_ref(&cookie_header),
        None,
    );
    assert_eq!(events.status, 200, "{events:?}");
    assert!(
        events
            .header("content-type")
            .unwrap_or_default()
            .starts_with("text/event-stream"),
        "{events:?}"
    );

    // After the logout the cookie opens nothing.
    let logout = console.request(
        "POST",
        "/console/api/logout",
        &[
            cookie_header.clone(),
            csrf_header.clone(),
            same_origin.clone(),
        ],
        None,
    );
    assert!((200..300).contains(&logout.status), "{logout:?}");
    let after_logout = console.request(
        "POST",
        "/console/api/call",
        &[cookie_header, csrf_header, same_origin],
        Some(&status_request),
    );
    assert_eq!(after_logout.status, 401, "{after_logout:?}");

    // Guessing is throttled per address: the sixth failure within a minute is refused
    // unread, and so is the right password then.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let guess = console.request(
            "POST",
            "/console/api/login",
            &[],
            Some(&json!({ "password": "guess" })),
        );
        statuses.push(guess.status);
    }
    // One wrong password above already counted.
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses[..4].iter().all(|&status| status == 401),
        "{statuses:?}"
    );
    let throttled = console.request(
        "POST",
        "/console/api/login",
        &[],
        Some(&json!({ "password": ADMIN_PASSWORD })),
    );
    assert_eq!(throttled.status, 429, "{throttled:?}");
}

#[test]
fn the_console_can_be_switched_off() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("{FAST_HEARTBEAT_CONFIG}[console]\nlisten = \"off\"\n");
    let server = Server::start(&dir.path().join("office"), Some(&config));
    assert_eq!(server.console_url(), None, "{:?}", server.stdout_lines);
    let report = status(&server.url());
    assert!(report["console_url"].is_null(), "{report}");
}

/// The first run of digits in `text`, as a number.
fn first_number(text: &str) -> Option<u64> {
    let digits: String = text
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A small HTTP/1.1 client for the console's API: one request per connection, every header
/// exactly as the test gives it.
struct Console {
    address: SocketAddr,
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|err| panic!("not JSON ({err}): {self:?}"))
    }
}

impl Console {
    /// From the `http://host:port/console/` URL the server printed.
    fn at(url: &str) -> Console {
        let address = url
            .strip_prefix("http://")
            .and_then(|rest| rest.split('/').next())
            .and_then(|authority| authority.parse().ok())
            .unwrap_or_else(|| panic!("a console URL like http://127.0.0.1:PORT/console/: {url}"));
        Console { address }
    }

    fn origin(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Sends one request; reads the answer until the connection closes, or only its head
    /// for an event stream (which never ends).
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&Value>,
    ) -> Response {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.address
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if method == "POST" {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(&body);

        let mut stream = TcpStream::connect(self.address).expect("the console accepts");
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        stream.write_all(request.as_bytes()).expect("request sent");
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut received = Vec::new();
        let mut buffer = [0; 8192];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => received.extend_from_slice(&buffer[..read]),
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(err) => panic!("reading the answer to {method} {path}: {err}"),
            }
            if let Some(response) = parse_response(&received)
                && (response.complete
                    || response
                        .response
                        .header("content-type")
                        .is_some_and(|kind| kind.starts_with("text/event-stream")))
            {
                return response.response;
            }
            assert!(
                Instant::now() < deadline,
                "no whole answer to {method} {path}: {:?}",
                String::from_utf8_lossy(&received)
            );
        }
        parse_response(&received)
            .unwrap_or_else(|| {
                panic!(
                    "no HTTP answer to {method} {path}: {:?}",
                    String::from_utf8_lossy(&received)
                )
            })
            .response
    }
}

struct Parsed {
    response: Response,
    /// The whole body is there (by `Content-Length`, or the last chunk).
    complete: bool,
}

/// The response in `received`, once its head is complete.
fn parse_response(received: &[u8]) -> Option<Parsed> {
    let head_end = received
        .windows(4)
        .position(|window| window == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&received[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let raw_body = &received[head_end + 4..];
    let header = |name: &str| {
        headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.clone())
    };
    let chunked = header("transfer-encoding").is_some_and(|value| value.contains("chunked"));
    let (body, complete) = if chunked {
        dechunk(raw_body)
    } else if let Some(length) = header("content-length").and_then(|value| value.parse().ok()) {
        let length: usize = length;
        (
            raw_body[..raw_body.len().min(length)].to_vec(),
            raw_body.len() >= length,
        )
    } else {
        (raw_body.to_vec(), false)
    };
    Some(Parsed {
        response: Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        },
        complete,
    })
}

/// The body of a chunked transfer so far, and whether its last chunk arrived.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = raw.windows(2).position(|window| window == b"\r\n") else {
            return (body, false);
        };
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (body, false);
        };
        if size == 0 {
            return (body, true);
        }
        let start = line_end + 2;
        if raw.len() < start + size + 2 {
            body.extend_from_slice(&raw[start..raw.len().min(start + size)]);
            return (body, false);
        }
        body.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
}
