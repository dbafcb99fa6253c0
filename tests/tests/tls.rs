//! wss:// with a site's own certificate authority, generated here.

use std::time::Duration;

use changeover_tests::{
    ADMIN_PASSWORD, Server, admin, eventually, make_site_certificates, start_agent,
};

#[test]
fn agents_and_admins_connect_over_wss_with_the_site_ca() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let ca_file = make_site_certificates(&root.join("server/certs"), &dir.path().join("ca"));
    let config = "[server]\nheartbeat_secs = 1\n\n[tls]\ncert = \"certs/server.crt\"\nkey = \"certs/server.key\"\n";
    let server = Server::start(&root, Some(config));
    assert!(
        server
            .stdout_lines
            .iter()
            .any(|line| line.starts_with("listening on wss://")),
        "{:?}",
        server.stdout_lines
    );
    let url = format!("wss://localhost:{}", server.address.port());
    let ca = ca_file.to_str().unwrap();

    let trusting = start_agent(&url, "heidi", &dir.path().join("heidi"), &["--ca-file", ca]);
    let report = eventually(Duration::from_secs(20), "heidi over wss", || {
        let output = admin(
            &["status", "--server", &url, "--json", "--ca-file", ca],
            ADMIN_PASSWORD,
        );
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        (report["sessions"].as_array()?.len() == 1).then_some(report)
    });
    assert_eq!(report["sessions"][0]["user"], "heidi");
    assert!(trusting.log_text().contains("connected"));

    // Without the site CA the certificate is not trusted, and the agent says so.
    let doubting = start_agent(&url, "ivan", &dir.path().join("ivan"), &[]);
    eventually(
        Duration::from_secs(20),
        "ivan to report the TLS failure",
        || doubting.log_text().contains("TLS handshake").then_some(()),
    );
    let output = admin(&["status", "--server", &url], ADMIN_PASSWORD);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("TLS handshake") && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );

    // A plain ws:// client gets no session from a wss:// server.
    let plain = admin(
        &["status", "--server", &format!("ws://{}", server.address)],
        ADMIN_PASSWORD,
    );
    assert!(!plain.status.success());
}

#[test]
fn a_broken_certificate_config_stops_the_server_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("server/config")).unwrap();
    std::fs::write(
        root.join("server/config/changeover.toml"),
        "[tls]\ncert = \"certs/missing.crt\"\nkey = \"certs/missing.key\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(changeover_tests::binary("changeover-server"))
        .args(["run", "--root"])
        .arg(&root)
        .args(["--listen", "127.0.0.1:0"])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read the certificate chain"),
        "{stderr}"
    );
    assert!(stderr.contains("missing.crt"), "{stderr}");
}

#[test]
fn the_console_is_served_over_https_with_a_secure_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let ca_file = make_site_certificates(&root.join("server/certs"), &dir.path().join("ca"));
    let config = "[tls]\ncert = \"certs/server.crt\"\nkey = \"certs/server.key\"\n";
    let server = Server::start(&root, Some(config));
    let console = server.console_url().expect("a console line");
    assert!(console.starts_with("https://"), "{console}");
    // The certificate names localhost; the console listens on loopback.
    let console = console.replace("127.0.0.1", "localhost");
    let curl = |args: &[&str]| {
        std::process::Command::new("curl")
            .args(["-s", "--max-time", "10", "--cacert"])
            .arg(&ca_file)
            .args(args)
            .output()
            .expect("curl runs")
    };
    let page = curl(&["-o", "/dev/null", "-w", "%{http_code}", &console]);
    assert_eq!(String::from_utf8_lossy(&page.stdout), "200");

    let body = format!("{{\"password\":\"{ADMIN_PASSWORD}\"}}");
    let login = curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data",
        &body,
        &format!("{console}api/login"),
    ]);
    let headers = String::from_utf8_lossy(&login.stdout).to_ascii_lowercase();
    let cookie = headers
        .lines()
        .find(|line| line.starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {headers}"));
    assert!(cookie.contains("; secure"), "{cookie}");
    assert!(
        cookie.contains("httponly") && cookie.contains("samesite=strict"),
        "{cookie}"
    );

    // Plain HTTP to the TLS console gets no page.
    let plain = std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(console.replace("https://", "http://"))
        .output()
        .expect("curl runs");
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");
}
