//! Admin login: the password, what a wrong one gets, and throttling of guessers.

use std::time::Duration;

use changeover_tests::{ADMIN_PASSWORD, Server, admin, eventually, start_agent, status};

#[test]
fn a_wrong_password_fails_clearly_and_repeated_failures_are_throttled() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), None);
    let url = server.url();

    let wrong = admin(&["status", "--server", &url], "not-the-password");
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("wrong admin password"), "{stderr}");
    assert!(wrong.stdout.is_empty(), "nothing printed as if it worked");

    // Four more failures make five within a minute.
    for _ in 0..4 {
        assert!(
            !admin(&["status", "--server", &url], "guess")
                .status
                .success()
        );
    }
    // Now even the right password is refused from this address, with a hint when to retry.
    let throttled = admin(&["status", "--server", &url, "--json"], ADMIN_PASSWORD);
    assert!(!throttled.status.success());
    let stderr = String::from_utf8_lossy(&throttled.stderr);
    assert!(stderr.contains("too many failed logins"), "{stderr}");
    assert!(stderr.contains("try again in"), "{stderr}");
}

#[test]
fn the_password_comes_from_a_file_and_a_missing_password_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), None);
    let url = server.url();

    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{ADMIN_PASSWORD}\n")).unwrap();
    let output = changeover_tests::admin_without_env(&[
        "status",
        "--server",
        &url,
        "--password-file",
        password_file.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("changeover phase   idle"), "{table}");

    let no_password = changeover_tests::admin_without_env(&["status", "--server", &url]);
    assert!(!no_password.status.success());
    let stderr = String::from_utf8_lossy(&no_password.stderr);
    assert!(stderr.contains("CHANGEOVER_ADMIN_PASSWORD"), "{stderr}");
}

#[test]
fn a_generated_password_is_printed_once_and_stored_only_as_a_hash() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut server = Server::start_without_password(&root);
    let line = server
        .stdout_lines
        .iter()
        .find_map(|line| line.strip_prefix("generated admin password (shown only now): "))
        .expect("the generated password is printed")
        .to_owned();
    let stored = std::fs::read_to_string(root.join("state/admin.argon2")).unwrap();
    assert!(stored.starts_with("$argon2id$"), "{stored}");
    assert!(!stored.contains(&line));

    let url = server.url();
    let output = admin(&["status", "--server", &url, "--json"], &line);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    server.restart();
    assert!(
        !server
            .stdout_lines
            .iter()
            .any(|l| l.contains("generated admin password")),
        "printed again: {:?}",
        server.stdout_lines
    );
    let output = admin(&["status", "--server", &url, "--json"], &line);
    assert!(
        output.status.success(),
        "the stored password still works after a restart"
    );
}

#[test]
fn an_agent_session_cannot_ask_for_admin_things_and_admins_are_not_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), None);
    let url = server.url();
    let _agent = start_agent(&url, "frank", &dir.path().join("frank"), &[]);
    let report = eventually(Duration::from_secs(20), "frank connected", || {
        let report = status(&url);
        (report["sessions"].as_array()?.len() == 1).then_some(report)
    });
    // The admin connection asking for the status is not listed as a session.
    assert_eq!(report["sessions"][0]["user"], "frank");
}
