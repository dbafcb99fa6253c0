//! `changeover-server demo`: the whole changeover on this machine with nothing set up.
//!
//! A temporary product folder, a vendor key, a feed holding two signed releases of this very
//! binary and of the agent beside it (1.0.0 installed, 1.1.0 offered) served over HTTP, a
//! local mail sink standing in for the site's SMTP server, real agent processes installed
//! with `changeover-agent install` (one of them the admin who starts the update), and the
//! real `admin update` following it to the end. It prints each phase as it happens and a
//! summary, and succeeds only if the server ended on the new version, every agent came back
//! and updated itself to the new version, and every carried file is intact.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use changeover_protocol::release::{ReleaseKind, current_platform};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::install::{InstallOptions, install};
use crate::release_tools::{KeygenOptions, PackOptions, keygen, pack};

/// What `demo` was given.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub agents: usize,
    pub grace_secs: u64,
    /// Keep the temporary folder for a look afterwards.
    pub keep: bool,
    /// Let the admin start the changeover in the web console instead of `admin update`.
    pub console: bool,
}

/// Children that die with the demo.
#[derive(Debug, Default)]
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the demo; `Ok(true)` when everything ended on the new version.
pub async fn run(options: DemoOptions) -> anyhow::Result<bool> {
    let me = std::env::current_exe().context("cannot find this program")?;
    let agent_binary = me.with_file_name("changeover-agent");
    if !agent_binary.is_file() {
        bail!(
            "the demo needs changeover-agent beside this program ({}); build both: \
             cargo build --release -p changeover-server -p changeover-agent",
            agent_binary.display()
        );
    }
    let temp = tempfile::Builder::new()
        .prefix("changeover-demo-")
        .tempdir()?;
    let dir = temp.path().to_owned();
    let started = Instant::now();
    let step = |text: &str| println!("[{:6.1}s] {text}", started.elapsed().as_secs_f64());

    step(&format!("demo folder {}", dir.display()));
    let vendor_key = dir.join("vendor/vendor.key");
    let vendor_pub = dir.join("vendor/vendor.pub");
    keygen(&KeygenOptions {
        secret_key: vendor_key.clone(),
        public_key: vendor_pub.clone(),
        password: None,
        force: false,
    })?;
    let feed = dir.join("feed");
    let app_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    for version in ["1.0.0", "1.1.0"] {
        for (kind, binary) in [
            (ReleaseKind::Server, &me),
            (ReleaseKind::Agent, &agent_binary),
        ] {
            let tree = dir.join(format!("build/{kind}-{version}"));
            std::fs::create_dir_all(tree.join("bin"))?;
            std::fs::copy(binary, tree.join(kind.binary_path()))
                .with_context(|| format!("cannot copy {} into a release tree", binary.display()))?;
            if kind == ReleaseKind::Server {
                std::fs::write(tree.join("app.toml"), app_manifest(app_port, version))?;
            }
            let packed = pack(&PackOptions {
                kind,
                version: version.parse()?,
                from: tree,
                secret_key: vendor_key.clone(),
                password: None,
                feed: feed.clone(),
                platform: current_platform(),
                notes: format!("demo release {version}"),
            })?;
            step(&format!(
                "vendor packed and signed {kind} {version} ({} bytes)",
                packed.entry.size
            ));
        }
    }
    let root = dir.join("office");
    install(&InstallOptions {
        root: root.clone(),
        name: crate::layout::INSTALL_DIR_NAME.to_owned(),
        package: feed.join(format!("server-1.0.0-{}.tar.gz", current_platform())),
        public_key: vendor_pub.clone(),
    })?;
    step(&format!(
        "installed server 1.0.0 into {}",
        root.join("server").display()
    ));
    let carried = site_files(&root)?;

    let feed_address = serve_folder(feed.clone()).await?;
    step(&format!("feed served at http://{feed_address}/"));
    let (mail_address, mut mailbox) = mail_sink().await?;
    step(&format!("mail sink listening on smtp://{mail_address}"));
    std::fs::write(
        root.join("server/config/changeover.toml"),
        format!(
            "[server]\nheartbeat_secs = 5\n\n[feed]\nurl = \"http://{feed_address}/\"\n\n\
             [carry_over]\npaths = [\"config\", \"backups\", \"certs\", \"data\"]\n\n\
             [mail]\nsmtp_url = \"smtp://{mail_address}\"\nfrom = \"changeover@demo.invalid\"\n"
        ),
    )?;

    let password = format!("demo-{}", std::process::id());
    let mut children = Children::default();
    let mut server = Command::new(root.join("server/bin/changeover-server"))
        .args(["run", "--root"])
        .arg(&root)
        .args(["--listen", "127.0.0.1:0"])
        .env("CHANGEOVER_ADMIN_PASSWORD", &password)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("server.log"))?)
        .spawn()
        .context("cannot start the installed server")?;
    let (url, console) = listening_url(&mut server)?;
    children.0.push(server);
    step(&format!("server 1.0.0 listening on {url}"));
    if let Some(console) = &console {
        step(&format!(
            "web console at {console} (admin password: {password})"
        ));
    }
    let business = format!("http://127.0.0.1:{app_port}");
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let placed = place_orders(&http, &business).await?;
    step(&format!(
        "application \"business\" 1.0.0 (run by the server) took {} orders at {business}/orders",
        placed.len()
    ));

    let users: Vec<String> = (0..options.agents.max(1))
        .map(|index| {
            if index == 0 {
                "admin".to_owned()
            } else {
                format!("user{index}")
            }
        })
        .collect();
    let agent_package = feed.join(format!("agent-1.0.0-{}.tar.gz", current_platform()));
    for user in &users {
        let installed = dir.join(format!("workstations/{user}"));
        let output = Command::new(&agent_binary)
            .args(["install", "--dir"])
            .arg(&installed)
            .arg("--package")
            .arg(&agent_package)
            .arg("--public-key")
            .arg(&vendor_pub)
            .stdin(Stdio::null())
            .output()
            .context("cannot run changeover-agent install")?;
        if !output.status.success() {
            bail!(
                "changeover-agent install failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }
    step(&format!(
        "installed agent 1.0.0 on {} workstations (changeover-agent install)",
        users.len()
    ));
    for user in &users {
        let hook = format!(
            "echo \"$(date +%T) logout: the client application closes\" >> {}/{user}.hooks",
            dir.display()
        );
        let agent = Command::new(dir.join(format!("workstations/{user}/bin/changeover-agent")))
            .args(["run", "--server", &url, "--user", user, "--state-dir"])
            .arg(dir.join(format!("agents/{user}")))
            .args(["--logout-hook", &hook])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{user}.log")))?)
            .spawn()
            .context("cannot start an agent")?;
        children.0.push(agent);
    }
    wait_for_sessions(&agent_binary, &url, &password, users.len()).await?;
    step(&format!(
        "{} agents connected ({})",
        users.len(),
        users.join(", ")
    ));

    let updated = if options.console {
        let Some(console) = &console else {
            bail!("the server serves no web console (see server.log)");
        };
        step(&format!(
            "waiting for you: open {console}, log in with {password} and start the changeover"
        ));
        wait_for_console_changeover(&agent_binary, &url, &password).await?
    } else {
        step(&format!(
            "admin: changeover-agent admin update --grace {}",
            options.grace_secs
        ));
        admin_update(&agent_binary, &url, &password, options.grace_secs)?
    };

    let report = wait_for_back(&agent_binary, &url, &password, users.len()).await;
    let mut ok = updated;
    println!();
    println!("summary");
    match &report {
        Ok(report) => {
            let version = report["server_version"].as_str().unwrap_or("?");
            let sessions = report["sessions"].as_array().map_or(0, Vec::len);
            let updated = agents_on(report, "1.1.0");
            println!("  server version      {version}");
            println!("  agents connected    {sessions} of {}", users.len());
            println!(
                "  agents on 1.1.0     {updated} of {} (updated themselves)",
                users.len()
            );
            ok &= version == "1.1.0" && sessions == users.len() && updated == users.len();
            if let Some(last) = report.get("last_changeover") {
                println!(
                    "  changeover          {} (downtime {} ms)",
                    last["outcome"].as_str().unwrap_or("?"),
                    last["downtime_ms"]
                );
            }
        }
        Err(err) => {
            println!("  the server did not answer: {err:#}");
            ok = false;
        }
    }
    let intact = carried.iter().all(|(path, contents)| {
        std::fs::read(root.join("server").join(path)).ok().as_ref() == Some(contents)
    });
    println!(
        "  carried files       {}",
        if intact {
            "intact"
        } else {
            "CHANGED OR MISSING"
        }
    );
    ok &= intact;
    match orders_kept(&http, &business).await {
        Ok((version, orders)) => {
            let kept = placed.iter().filter(|order| orders.contains(order)).count();
            println!(
                "  application data    {kept} of {} orders kept, served by business {version}",
                placed.len()
            );
            ok &= kept == placed.len() && version == "1.1.0";
        }
        Err(err) => {
            println!("  application data    NOT READABLE: {err:#}");
            ok = false;
        }
    }
    println!(
        "  old release         {}",
        if root.join("server_old").exists() {
            "still there"
        } else {
            "deleted after the commit"
        }
    );
    let hooks = users
        .iter()
        .filter(|user| dir.join(format!("{user}.hooks")).exists())
        .count();
    println!("  logout hooks run    {hooks} of {}", users.len());
    let mail = tokio::time::timeout(Duration::from_secs(15), mailbox.recv())
        .await
        .ok()
        .flatten();
    match &mail {
        Some(mail) => {
            let subject = mail
                .lines()
                .find_map(|line| line.strip_prefix("Subject: "))
                .unwrap_or("(no subject)");
            println!("  mail to the admin   {subject:?}");
        }
        None => println!("  mail to the admin   NOT RECEIVED"),
    }
    ok &= mail.is_some();
    println!("  result              {}", if ok { "OK" } else { "FAILED" });
    drop(children);
    if options.keep {
        let kept = temp.keep();
        println!("  files kept in       {}", kept.display());
    }
    Ok(ok)
}

/// The demo release's `app.toml`: the order book ([`crate::demo_app`]) as the vendor's
/// application, its data in the carried folder `data/`.
fn app_manifest(port: u16, version: &str) -> String {
    format!(
        "[[app]]\nname = \"business\"\ncommand = [\"bin/changeover-server\", \"demo-app\"]\n\
         env = {{ {port_env} = \"{port}\", {version_env} = \"{version}\" }}\n\
         stop_timeout_secs = 5\nhealth = {{ http = \"http://127.0.0.1:{port}/health\" }}\n\
         check = [\"bin/changeover-server\", \"demo-app\", \"--check\"]\n",
        port_env = crate::demo_app::PORT_ENV,
        version_env = crate::demo_app::VERSION_ENV,
    )
}

/// Waits for the order book, then places a few orders as the office's users would.
async fn place_orders(http: &reqwest::Client, base: &str) -> anyhow::Result<Vec<String>> {
    let ready = Instant::now();
    loop {
        let answer = http.get(format!("{base}/health")).send().await;
        if answer.is_ok_and(|answer| answer.status().is_success()) {
            break;
        }
        if ready.elapsed() > Duration::from_secs(20) {
            bail!("the application did not become healthy at {base}/health");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let orders: Vec<String> = [
        "12 chairs for Müller GmbH",
        "3 desks for Dupont SA",
        "1 printer for Staff",
    ]
    .map(str::to_owned)
    .into();
    for order in &orders {
        http.post(format!("{base}/orders"))
            .body(order.clone())
            .send()
            .await?
            .error_for_status()
            .with_context(|| format!("the application refused the order {order:?}"))?;
    }
    Ok(orders)
}

/// The orders the application serves now, and its version.
async fn orders_kept(http: &reqwest::Client, base: &str) -> anyhow::Result<(String, Vec<String>)> {
    let ready = Instant::now();
    loop {
        let answer = async {
            let bytes = http
                .get(format!("{base}/orders"))
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            anyhow::Ok(serde_json::from_slice::<serde_json::Value>(&bytes)?)
        }
        .await;
        match answer {
            Ok(body) => {
                let version = body["version"].as_str().unwrap_or("?").to_owned();
                let orders = body["orders"]
                    .as_array()
                    .map(|list| {
                        list.iter()
                            .filter_map(|o| o.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                return Ok((version, orders));
            }
            Err(err) if ready.elapsed() > Duration::from_secs(20) => return Err(err),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

// Preferences, backups and a certificate the changeover must carry over untouched.
fn site_files(root: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let files = vec![
        (
            "config/preferences.toml".to_owned(),
            b"company = \"Office Maker demo\"\n".to_vec(),
        ),
        (
            "backups/nightly.bak".to_owned(),
            vec![42u8; 4 * 1024 * 1024],
        ),
        (
            "certs/site.pem".to_owned(),
            b"-----BEGIN CERTIFICATE-----\ndemo\n".to_vec(),
        ),
    ];
    for (path, contents) in &files {
        let file = root.join("server").join(path);
        std::fs::create_dir_all(file.parent().context("a parent")?)?;
        std::fs::write(&file, contents)?;
    }
    Ok(files)
}

/// The scripted admin: `changeover-agent admin update`, its output indented.
fn admin_update(
    agent_binary: &Path,
    url: &str,
    password: &str,
    grace_secs: u64,
) -> anyhow::Result<bool> {
    let mut update = Command::new(agent_binary)
        .args([
            "admin",
            "update",
            "--server",
            url,
            "--notify",
            "admin@demo.invalid",
            "--grace",
        ])
        .arg(grace_secs.to_string())
        .env("CHANGEOVER_ADMIN_PASSWORD", password)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run admin update")?;
    // Its download line and any error sit in the same indented block as its progress.
    let stderr = update.stderr.take().map(|stderr| {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("           | {line}");
            }
        })
    });
    if let Some(stdout) = update.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("           | {line}");
        }
    }
    let updated = update.wait()?.success();
    if let Some(stderr) = stderr {
        let _ = stderr.join();
    }
    Ok(updated)
}

/// The server's URL for agents and its console's URL (if it serves one), from the lines
/// it prints on start.
fn listening_url(server: &mut Child) -> anyhow::Result<(String, Option<String>)> {
    let stdout = server.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut console = None;
    loop {
        let line = lines
            .next()
            .context("the server ended before listening (see server.log)")??;
        if let Some(url) = line.strip_prefix("console on ") {
            console = Some(url.to_owned());
        } else if let Some(url) = line.strip_prefix("listening on ") {
            // Keep draining so the server never writes to a closed pipe.
            std::thread::spawn(move || for _ in lines {});
            return Ok((url.to_owned(), console));
        } else {
            bail!("unexpected line from the server: {line}");
        }
    }
}

/// `--console`: the admin starts the changeover in the browser; the demo follows the
/// server's phases until one has ended.
async fn wait_for_console_changeover(
    agent: &Path,
    url: &str,
    password: &str,
) -> anyhow::Result<bool> {
    let before = status(agent, url, password).await?["last_changeover"]["changeover_id"].clone();
    let mut phase = String::new();
    let mut waiting_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(report) = status(agent, url, password).await else {
            if phase != "restarting" {
                phase = "restarting".to_owned();
                println!("           | the server is restarting…");
            }
            continue;
        };
        let now = report["phase"].as_str().unwrap_or("?").to_owned();
        if now != phase && now != "idle" {
            println!("           | {now}");
        }
        phase = now;
        let last = &report["last_changeover"];
        if !last.is_null() && last["changeover_id"] != before {
            println!(
                "           | {} (downtime {} ms)",
                last["outcome"].as_str().unwrap_or("?"),
                last["downtime_ms"]
            );
            return Ok(last["outcome"] == "committed");
        }
        if phase == "idle" && waiting_since.elapsed() > Duration::from_secs(600) {
            println!("           | still waiting for a changeover started in the console…");
            waiting_since = Instant::now();
        }
    }
}

async fn status(agent: &Path, url: &str, password: &str) -> anyhow::Result<serde_json::Value> {
    let output = tokio::process::Command::new(agent)
        .args(["admin", "status", "--server", url, "--json"])
        .env("CHANGEOVER_ADMIN_PASSWORD", password)
        .output()
        .await?;
    if !output.status.success() {
        bail!("{}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

async fn wait_for_sessions(
    agent: &Path,
    url: &str,
    password: &str,
    count: usize,
) -> anyhow::Result<()> {
    for _ in 0..100 {
        if let Ok(report) = status(agent, url, password).await
            && report["sessions"].as_array().map_or(0, Vec::len) >= count
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the agents did not connect within 20 s")
}

// Connected agents running `version`.
fn agents_on(report: &serde_json::Value, version: &str) -> usize {
    report["sessions"].as_array().map_or(0, |sessions| {
        sessions
            .iter()
            .filter(|session| session["agent_version"] == version)
            .count()
    })
}

async fn wait_for_back(
    agent: &Path,
    url: &str,
    password: &str,
    count: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut last = Err(anyhow::anyhow!("no answer"));
    for _ in 0..200 {
        last = status(agent, url, password).await;
        if let Ok(report) = &last
            && report["phase"] == "idle"
            && report["server_version"] == "1.1.0"
            && agents_on(report, "1.1.0") >= count
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last
}

/// A tiny SMTP sink standing in for the site's mail server: it accepts every mail and hands
/// its text over.
async fn mail_sink() -> anyhow::Result<(std::net::SocketAddr, tokio::sync::mpsc::Receiver<String>)>
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (mails, mailbox) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let mails = mails.clone();
            tokio::spawn(async move {
                let (reader, mut writer) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(reader);
                let mut line = String::new();
                let mut in_data = false;
                let mut data = String::new();
                if writer.write_all(b"220 demo mail sink\r\n").await.is_err() {
                    return;
                }
                loop {
                    line.clear();
                    match tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if in_data {
                        if line == ".\r\n" || line == ".\n" {
                            in_data = false;
                            let _ = mails.send(std::mem::take(&mut data)).await;
                            let _ = writer.write_all(b"250 queued\r\n").await;
                        } else {
                            data.push_str(&line);
                        }
                        continue;
                    }
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    let answer: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 demo\r\n",
                        "DATA" => {
                            in_data = true;
                            b"354 go ahead\r\n"
                        }
                        "QUIT" => {
                            let _ = writer.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        _ => b"250 ok\r\n",
                    };
                    if writer.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((address, mailbox))
}

/// A tiny static file server for the demo's feed (GET only; the real thing is any web
/// server or CDN).
async fn serve_folder(folder: PathBuf) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let folder = folder.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let Ok(read) = stream.read(&mut request).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&request[..read]);
                let path = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/');
                let plain = !path.is_empty() && !path.contains('/') && !path.starts_with('.');
                let body = if plain {
                    std::fs::read(folder.join(path)).ok()
                } else {
                    None
                };
                let response = match &body {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    ),
                    None => {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_owned()
                    }
                };
                let _ = stream.write_all(response.as_bytes()).await;
                if let Some(body) = body {
                    let _ = stream.write_all(&body).await;
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(address)
}
