//! Users' messages in their own language, end to end: a real changeover with agents whose
//! locale is German and French (and one told `--lang en`), whose hooks record what the user
//! is told, and the admin's mail in the language the server's config names.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use changeover_protocol::release::current_platform;
use changeover_tests::feeds::{StaticServer, Vendor, server_tree};
use changeover_tests::{ADMIN_PASSWORD, Process, Server, binary, eventually, status};
use serde_json::Value;

/// The admin's own words, shown untranslated after each language's own sentence.
const ADMIN_WORDS: &str = "Accounting is back at 12:45.";

/// A product folder with 1.0.0 installed and a feed offering 1.1.0 (real server releases).
struct Site {
    dir: tempfile::TempDir,
    root: PathBuf,
    feed_server: StaticServer,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let vendor = Vendor::create(&dir.path().join("vendor"));
        let feed = dir.path().join("feed");
        for version in ["1.0.0", "1.1.0"] {
            let tree = server_tree(&dir.path().join(format!("tree-{version}")), &[]);
            vendor.pack("server", version, &tree, &feed);
        }
        let root = dir.path().join("office");
        let archive = feed.join(format!("server-1.0.0-{}.tar.gz", current_platform()));
        let output = Command::new(binary("changeover-server"))
            .args(["install", "--root"])
            .arg(&root)
            .arg("--package")
            .arg(archive)
            .arg("--public-key")
            .arg(&vendor.public_key)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let feed_server = StaticServer::python(&feed, dir.path());
        Site {
            dir,
            root,
            feed_server,
        }
    }

    fn start(&self) -> Server {
        let config = format!(
            "[server]\nheartbeat_secs = 1\n[feed]\nurl = \"{}\"\n[changeover]\nhealth_timeout_secs = 20\n\
             [mail]\nlanguage = \"de\"\n",
            self.feed_server.url()
        );
        Server::start_installed(&self.root, &config)
    }

    /// An agent whose environment names `locale` in `LANG` alone, with hooks that record
    /// each event as `EVENT|DEADLINE|MESSAGE`.
    fn agent(
        &self,
        server: &Server,
        user: &str,
        locale: &str,
        extra: &[&str],
    ) -> (Process, PathBuf) {
        let state_dir = self.dir.path().join(user);
        std::fs::create_dir_all(&state_dir).unwrap();
        let told = self.dir.path().join(format!("{user}-told.txt"));
        let hook = format!(
            "printf '%s|%s|%s\\n' \"$CHANGEOVER_EVENT\" \"$CHANGEOVER_DEADLINE\" \"$CHANGEOVER_MESSAGE\" >> '{}'",
            told.display()
        );
        let log = state_dir.join("agent.log");
        let child = Command::new(binary("changeover-agent"))
            .args([
                "run",
                "--server",
                &server.url(),
                "--user",
                user,
                "--state-dir",
            ])
            .arg(&state_dir)
            .args(["--warn-hook", &hook, "--logout-hook", &hook])
            .args(extra)
            .env_remove("LC_ALL")
            .env_remove("LC_MESSAGES")
            .env("LANG", locale)
            // Deadlines in UTC, so the test can tell which HH:MM each text must name.
            .env("TZ", "UTC0")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (Process::from_child(child, log), told)
    }
}

/// What an agent's hooks recorded: (event, deadline HH:MM in UTC, message).
fn told(path: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, '|');
            let event = parts.next()?.to_owned();
            // 2026-11-28T12:32:08Z -> 12:32
            let deadline = parts.next()?.get(11..16)?.to_owned();
            Some((event, deadline, parts.next()?.to_owned()))
        })
        .collect()
}

#[test]
fn each_user_is_told_in_their_own_language_and_the_admin_in_the_configured_one() {
    let site = Site::new();
    let server = site.start();
    let (_greta, greta_told) = site.agent(&server, "greta", "de_DE.UTF-8", &[]);
    let (_fleur, fleur_told) = site.agent(&server, "fleur", "fr_FR.UTF-8", &[]);
    let (_emma, emma_told) = site.agent(&server, "emma", "de_DE.UTF-8", &["--lang", "en"]);
    eventually(Duration::from_secs(20), "three agents", || {
        (status(&server.url())["sessions"].as_array()?.len() == 3).then_some(())
    });

    // What greta's own client application hears: the events stream, in her language.
    let mut greta_events = Command::new(binary("changeover-agent"))
        .args(["events", "--json", "--state-dir"])
        .arg(site.dir.path().join("greta"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let output = Command::new(binary("changeover-agent"))
        .args(["admin", "update", "--server", &server.url(), "--json"])
        .args([
            "--version",
            "1.1.0",
            "--grace",
            "6",
            "--message",
            ADMIN_WORDS,
        ])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let german = eventually(Duration::from_secs(30), "greta's logout", || {
        let told = told(&greta_told);
        told.iter()
            .any(|(event, ..)| event == "logout")
            .then_some(told)
    });
    let (_, deadline, _) = &german[0];
    let expected_warning = |seconds: u64| {
        format!(
            "Der Server wird in {seconds} Sekunden (um {deadline} Uhr) auf Version 1.1.0 \
             aktualisiert. Bitte speichern Sie Ihre Arbeit und schließen Sie die Anwendung. \
             Nachricht der Administration: {ADMIN_WORDS}"
        )
    };
    let messages: Vec<(&str, &str)> = german
        .iter()
        .map(|(event, _, message)| (event.as_str(), message.as_str()))
        .collect();
    assert!(
        messages.contains(&("warning", expected_warning(6).as_str())),
        "{german:#?}"
    );
    assert!(
        messages.contains(&("warning", expected_warning(5).as_str())),
        "{german:#?}"
    );
    assert_eq!(
        messages.last(),
        Some(&(
            "logout",
            format!(
                "Der Server wird jetzt auf Version 1.1.0 aktualisiert. Ihre Sitzung wurde \
                 beendet; die Anwendung steht in Kürze wieder zur Verfügung. Nachricht der \
                 Administration: {ADMIN_WORDS}"
            )
            .as_str()
        )),
        "{german:#?}"
    );

    // The same words reach the client application through the events stream.
    let _ = greta_events.kill();
    let streamed = greta_events.wait_with_output().unwrap();
    let streamed: Vec<Value> = String::from_utf8_lossy(&streamed.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let streamed_warning = streamed
        .iter()
        .find(|event| event["event"] == "warning")
        .unwrap_or_else(|| panic!("no warning in the events stream: {streamed:#?}"));
    assert!(
        streamed_warning["message"].as_str().is_some_and(|text| text
            .starts_with("Der Server wird in ")
            && text.contains(ADMIN_WORDS)),
        "{streamed_warning}"
    );
    let streamed_logout = streamed
        .iter()
        .find(|event| event["event"] == "logout")
        .unwrap_or_else(|| panic!("no logout in the events stream: {streamed:#?}"));
    assert!(
        streamed_logout["message"]
            .as_str()
            .is_some_and(|text| text.starts_with("Der Server wird jetzt auf Version 1.1.0")),
        "{streamed_logout}"
    );

    let french = eventually(Duration::from_secs(30), "fleur's logout", || {
        let told = told(&fleur_told);
        told.iter()
            .any(|(event, ..)| event == "logout")
            .then_some(told)
    });
    let (_, deadline, _) = &french[0];
    let messages: Vec<(&str, &str)> = french
        .iter()
        .map(|(event, _, message)| (event.as_str(), message.as_str()))
        .collect();
    let expected_warning = format!(
        "Le serveur sera mis à jour vers la version 1.1.0 dans 6 secondes (à {deadline}). \
         Veuillez enregistrer votre travail et fermer l’application. Message de \
         l’administration\u{a0}: {ADMIN_WORDS}"
    );
    assert!(
        messages.contains(&("warning", expected_warning.as_str())),
        "{french:#?}"
    );
    assert_eq!(
        messages.last(),
        Some(&(
            "logout",
            format!(
                "Le serveur est en cours de mise à jour vers la version 1.1.0. Votre session a \
                 été fermée\u{a0}; l’application sera de nouveau disponible dans quelques \
                 instants. Message de l’administration\u{a0}: {ADMIN_WORDS}"
            )
            .as_str()
        )),
        "{french:#?}"
    );

    // --lang wins over the locale.
    let english = eventually(Duration::from_secs(30), "emma's logout", || {
        let told = told(&emma_told);
        told.iter()
            .any(|(event, ..)| event == "logout")
            .then_some(told)
    });
    assert!(
        english[0]
            .2
            .starts_with("The server will be updated to version 1.1.0 in 6 seconds (at "),
        "{english:#?}"
    );

    // The admin's mail, written by the new release after its health check, in German.
    let mail = eventually(Duration::from_secs(30), "the mail in the outbox", || {
        let file = std::fs::read_dir(site.root.join("state/outbox"))
            .ok()?
            .flatten()
            .find(|file| file.path().extension().is_some_and(|ext| ext == "json"))?;
        serde_json::from_slice::<Value>(&std::fs::read(file.path()).ok()?).ok()
    });
    assert_eq!(
        mail["subject"], "Server wieder verfügbar: aktualisiert von 1.0.0 auf 1.1.0",
        "{mail}"
    );
    assert!(
        mail["body"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Der Server wurde aktualisiert und ist wieder verfügbar."),
        "{mail}"
    );
}
