//! The server's configuration file, `<root>/server/config/changeover.toml`.
//!
//! Every key is optional: a missing file is created from [`DEFAULT_CONFIG`] (which documents
//! each key), and a file holding only some keys takes the defaults for the rest. Keys this
//! build does not know are reported as warnings, not errors, so a config written for a newer
//! release still starts an older one (which a rollback needs).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;

/// The file written when none exists. Keep it in step with the `Default` impls below;
/// the `default_file_matches_defaults` test checks that.
pub const DEFAULT_CONFIG: &str = r#"# Changeover server configuration.
# Every key is optional; a key left out takes the default shown here.

[server]
# Address to listen on when `run` is given no --listen.
listen = "127.0.0.1:7600"
# The server pings each agent this often (each connection at its own random phase);
# an agent silent for two intervals is dropped from the session table.
heartbeat_secs = 25
# A connection must finish its TLS and WebSocket handshake and send its hello within this time.
handshake_timeout_secs = 10
# ... and its TLS handshake and WebSocket upgrade request within this much of it, so idle
# connections cannot hold the door for long.
upgrade_timeout_secs = 3
# Handshakes in progress at once; further connections wait in the listen backlog.
max_concurrent_handshakes = 1024
# Handshakes in progress at once from one address (an IPv4 address or an IPv6 /64). Up to
# eight times as many more connections of that address wait for a slot of their own; past
# that they are closed at once. Raise it for many workstations behind one NAT address.
max_handshakes_per_address = 64
# Length of the kernel's listen backlog (capped by net.core.somaxconn).
listen_backlog = 4096
# Agent sessions held at once; further agents are refused with "server full".
max_sessions = 100000
# Agent sessions held at once from one address (an IPv4 address or an IPv6 /64): raise it
# for more workstations than this behind one NAT address or terminal server.
max_sessions_per_address = 1000
# Seconds a write to one agent may take before it is dropped as a slow consumer.
write_timeout_secs = 10

[console]
# The admin's web console (open http://<address>/console/ in a browser; https under [tls]).
# "auto": server.listen's address on the next port (any free port when --listen names
# port 0); "off": no console; or an address of its own, such as "0.0.0.0:7601".
listen = "auto"

[tls]
# Serve wss:// with this certificate chain and private key (PEM). Relative paths are
# relative to the install folder, so certificates in certs/ move with each changeover.
# cert = "certs/server.crt"
# key = "certs/server.key"

[feed]
# Where the vendor publishes releases: a folder of static files (manifest.json and the
# archives, each with its .minisig) on any web server. Without it the server updates only
# from packages dropped into <root>/state/inbox/.
# url = "https://updates.example.com/changeover/"
# The vendor's public key (minisign format); relative to the install folder.
# `changeover-server install` puts it here.
public_key = "config/vendor.pub"
# How often to look for a new release, in seconds. `admin status` also looks when the last
# look is older than a minute.
check_interval_secs = 3600
# Accept releases that are not newer than the installed one. Leave off: a downgrade is
# the classic way to bring back a fixed vulnerability.
allow_downgrade = false

[carry_over]
# Folders of the install carried into every new release (relative to the install folder):
# preferences, backups, TLS certificates. They move by rename, so their size does not
# lengthen the downtime, and every file is checked by hash before the new release starts.
paths = ["config", "backups", "certs"]

[changeover]
# A new release that has not proved healthy this long after its start is rolled back.
health_timeout_secs = 60
# Without a service manager, a small process of the old release waits for the new one's
# verdict and puts the old release back if the new one dies or hangs before it. Under
# systemd (INVOCATION_ID or NOTIFY_SOCKET set) the unit's Restart= does that instead.
watchdog = true

[agent_updates]
# After a changeover to version V the server offers the agent release V (fetched from the
# feed with the server release, before anyone is warned) to every older agent, which
# downloads it from this server over HTTP on the listening port and verifies it with its
# own copy of the vendor key. Transfers served at once; agents beyond that are told to come
# back after a randomised pause.
max_transfers = 32
# Offer agent updates at all.
enabled = true

[mail]
# Where the admin's mail goes out: lettre's URL form, smtp://host:port (plain),
# smtp://host:587?tls=required (STARTTLS), smtps://host:465 (TLS); user:password@ for login.
# smtp_url = "smtp://127.0.0.1:25"
from = "changeover@localhost"
# Who gets the mail when `admin update` names nobody with --notify.
# to = "admin@example.com"
# The language the mail is written in: "en", "de" or "fr".
language = "en"

[unattended]
# For single-seat installs: update from the feed without an admin, inside the window.
enabled = false
# A daily window in UTC (HH:MM-HH:MM; it may wrap past midnight).
window_utc = "22:00-05:00"
# Seconds from the first warning to the logout, as `admin update --grace`.
grace_secs = 300
"#;

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Config {
    pub server: ServerSection,
    pub tls: TlsSection,
    pub feed: FeedSection,
    pub carry_over: CarryOverSection,
    pub changeover: ChangeoverSection,
    pub unattended: UnattendedSection,
    pub mail: MailSection,
    pub agent_updates: AgentUpdatesSection,
    pub console: ConsoleSection,
}

/// `[console]`: the web console.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ConsoleSection {
    /// `auto`, `off` or an address; see [`crate::console::ConsoleListen`].
    pub listen: String,
}

impl Default for ConsoleSection {
    fn default() -> Self {
        ConsoleSection {
            listen: "auto".to_owned(),
        }
    }
}

impl ConsoleSection {
    pub fn listen(&self) -> anyhow::Result<crate::console::ConsoleListen> {
        self.listen
            .parse()
            .map_err(|err: String| anyhow::anyhow!("console.listen: {err}"))
    }
}

/// `[agent_updates]`: the agents' own updates, served by this server.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AgentUpdatesSection {
    pub enabled: bool,
    pub max_transfers: usize,
}

impl Default for AgentUpdatesSection {
    fn default() -> Self {
        AgentUpdatesSection {
            enabled: true,
            max_transfers: 32,
        }
    }
}

/// `[mail]`: the admin's mail.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MailSection {
    pub smtp_url: Option<String>,
    pub from: String,
    pub to: Option<String>,
    /// The language of the mail about a changeover; English unless set.
    pub language: crate::mail::MailLanguage,
}

impl Default for MailSection {
    fn default() -> Self {
        MailSection {
            smtp_url: None,
            from: "changeover@localhost".to_owned(),
            to: None,
            language: crate::mail::MailLanguage::En,
        }
    }
}

/// `[unattended]`: updates without an admin.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UnattendedSection {
    pub enabled: bool,
    pub window_utc: String,
    pub grace_secs: u64,
}

impl Default for UnattendedSection {
    fn default() -> Self {
        UnattendedSection {
            enabled: false,
            window_utc: "22:00-05:00".to_owned(),
            grace_secs: 300,
        }
    }
}

/// `[carry_over]`: what moves from release to release.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct CarryOverSection {
    pub paths: Vec<String>,
}

impl Default for CarryOverSection {
    fn default() -> Self {
        CarryOverSection {
            paths: vec![
                "config".to_owned(),
                "backups".to_owned(),
                "certs".to_owned(),
            ],
        }
    }
}

/// `[changeover]`: how a changeover behaves.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ChangeoverSection {
    pub health_timeout_secs: u64,
    pub watchdog: bool,
}

impl Default for ChangeoverSection {
    fn default() -> Self {
        ChangeoverSection {
            health_timeout_secs: 60,
            watchdog: true,
        }
    }
}

/// `[server]`: listening and connection handling.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ServerSection {
    pub listen: SocketAddr,
    pub heartbeat_secs: u64,
    pub handshake_timeout_secs: u64,
    pub upgrade_timeout_secs: u64,
    pub max_concurrent_handshakes: usize,
    pub max_handshakes_per_address: usize,
    pub listen_backlog: u32,
    pub max_sessions: usize,
    pub max_sessions_per_address: usize,
    pub write_timeout_secs: u64,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 7600)),
            heartbeat_secs: 25,
            handshake_timeout_secs: 10,
            upgrade_timeout_secs: 3,
            max_concurrent_handshakes: 1024,
            max_handshakes_per_address: 64,
            listen_backlog: 4096,
            max_sessions: 100_000,
            max_sessions_per_address: 1000,
            write_timeout_secs: 10,
        }
    }
}

impl ServerSection {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    /// How long a connection has for its TLS handshake and upgrade request: the
    /// `upgrade_timeout_secs`, but never beyond the whole handshake's timeout.
    pub fn upgrade_timeout(&self) -> Duration {
        Duration::from_secs(self.upgrade_timeout_secs.min(self.handshake_timeout_secs))
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs)
    }
}

/// `[tls]`: both keys set means wss://.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TlsSection {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// `[feed]`: where releases come from and who signs them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct FeedSection {
    pub url: Option<String>,
    pub public_key: PathBuf,
    pub check_interval_secs: u64,
    pub allow_downgrade: bool,
}

impl Default for FeedSection {
    fn default() -> Self {
        FeedSection {
            url: None,
            public_key: PathBuf::from("config/vendor.pub"),
            check_interval_secs: 3600,
            allow_downgrade: false,
        }
    }
}

/// A loaded config and what was odd about it.
#[derive(Debug)]
pub struct LoadedConfig {
    pub config: Config,
    /// Keys this build ignored, as dotted paths (`mail.smtp_url`).
    pub unknown_keys: Vec<String>,
    /// Whether the file was missing and has just been written with the defaults.
    pub created: bool,
}

impl Config {
    /// Reads the config file, creating it with the documented defaults if missing.
    pub fn load_or_create(path: &Path) -> anyhow::Result<LoadedConfig> {
        let created = match std::fs::metadata(path) {
            Ok(_) => false,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                write_default(path)?;
                true
            }
            Err(err) => {
                return Err(err).with_context(|| format!("cannot read {}", path.display()));
            }
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let (config, unknown_keys) =
            Config::parse(&text).with_context(|| format!("invalid config {}", path.display()))?;
        config
            .validate()
            .with_context(|| format!("invalid config {}", path.display()))?;
        Ok(LoadedConfig {
            config,
            unknown_keys,
            created,
        })
    }

    /// Parses config text, collecting the keys it ignored.
    pub fn parse(text: &str) -> anyhow::Result<(Config, Vec<String>)> {
        let deserializer = toml::Deserializer::parse(text)?;
        let mut unknown_keys = Vec::new();
        let config = serde_ignored::deserialize(deserializer, |path| {
            unknown_keys.push(path.to_string());
        })?;
        Ok((config, unknown_keys))
    }

    fn validate(&self) -> anyhow::Result<()> {
        let server = &self.server;
        anyhow::ensure!(
            server.heartbeat_secs >= 1,
            "server.heartbeat_secs must be at least 1"
        );
        anyhow::ensure!(
            server.handshake_timeout_secs >= 1,
            "server.handshake_timeout_secs must be at least 1"
        );
        anyhow::ensure!(
            server.max_concurrent_handshakes >= 1,
            "server.max_concurrent_handshakes must be at least 1"
        );
        anyhow::ensure!(
            server.upgrade_timeout_secs >= 1,
            "server.upgrade_timeout_secs must be at least 1"
        );
        anyhow::ensure!(
            server.max_handshakes_per_address >= 1,
            "server.max_handshakes_per_address must be at least 1"
        );
        anyhow::ensure!(
            server.max_sessions >= 1,
            "server.max_sessions must be at least 1"
        );
        anyhow::ensure!(
            server.max_sessions_per_address >= 1,
            "server.max_sessions_per_address must be at least 1"
        );
        anyhow::ensure!(
            server.write_timeout_secs >= 1,
            "server.write_timeout_secs must be at least 1"
        );
        anyhow::ensure!(
            self.feed.check_interval_secs >= 10,
            "feed.check_interval_secs must be at least 10"
        );
        anyhow::ensure!(
            self.agent_updates.max_transfers >= 1,
            "agent_updates.max_transfers must be at least 1"
        );
        self.console.listen()?;
        crate::unattended::Window::parse(&self.unattended.window_utc)
            .map_err(|reason| anyhow::anyhow!("unattended.window_utc: {reason}"))?;
        anyhow::ensure!(
            self.unattended.grace_secs <= changeover_protocol::messages::MAX_GRACE_SECS,
            "unattended.grace_secs must be at most {}",
            changeover_protocol::messages::MAX_GRACE_SECS
        );
        for path in &self.carry_over.paths {
            let plain = !path.is_empty()
                && std::path::Path::new(path)
                    .components()
                    .all(|part| matches!(part, std::path::Component::Normal(_)));
            anyhow::ensure!(
                plain,
                "carry_over.paths holds {path:?}; only folders inside the install can be carried"
            );
            anyhow::ensure!(
                path != "bin",
                "carry_over.paths may not hold \"bin\": the program comes from the release"
            );
        }
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), Some(_)) | (None, None) => Ok(()),
            _ => anyhow::bail!("tls.cert and tls.key must be given together"),
        }
    }
}

// Written beside the target and renamed, so a crash never leaves half a config.
fn write_default(path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().context("config path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let temporary = path.with_extension("toml.tmp");
    std::fs::write(&temporary, DEFAULT_CONFIG)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_matches_defaults() {
        let (parsed, unknown) = Config::parse(DEFAULT_CONFIG).unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(parsed.console.listen, ConsoleSection::default().listen);
        assert_eq!(
            parsed.console.listen().unwrap(),
            crate::console::ConsoleListen::Auto
        );
        let defaults = ServerSection::default();
        assert_eq!(parsed.server.listen, defaults.listen);
        assert_eq!(parsed.server.heartbeat_secs, defaults.heartbeat_secs);
        assert_eq!(
            parsed.server.handshake_timeout_secs,
            defaults.handshake_timeout_secs
        );
        assert_eq!(
            parsed.server.max_concurrent_handshakes,
            defaults.max_concurrent_handshakes
        );
        assert_eq!(parsed.server.listen_backlog, defaults.listen_backlog);
        assert_eq!(parsed.server.max_sessions, defaults.max_sessions);
        assert_eq!(
            parsed.server.upgrade_timeout_secs,
            defaults.upgrade_timeout_secs
        );
        assert_eq!(
            parsed.server.max_handshakes_per_address,
            defaults.max_handshakes_per_address
        );
        assert_eq!(
            parsed.server.max_sessions_per_address,
            defaults.max_sessions_per_address
        );
        assert_eq!(
            parsed.server.write_timeout_secs,
            defaults.write_timeout_secs
        );
        assert!(parsed.tls.cert.is_none() && parsed.tls.key.is_none());
        let feed = FeedSection::default();
        assert_eq!(parsed.feed.url, feed.url);
        assert_eq!(parsed.feed.public_key, feed.public_key);
        assert_eq!(parsed.feed.check_interval_secs, feed.check_interval_secs);
        assert_eq!(parsed.feed.allow_downgrade, feed.allow_downgrade);
        assert_eq!(parsed.carry_over.paths, CarryOverSection::default().paths);
        assert_eq!(
            parsed.changeover.health_timeout_secs,
            ChangeoverSection::default().health_timeout_secs
        );
        let unattended = UnattendedSection::default();
        assert_eq!(parsed.unattended.enabled, unattended.enabled);
        assert_eq!(parsed.unattended.window_utc, unattended.window_utc);
        assert_eq!(parsed.unattended.grace_secs, unattended.grace_secs);
        let agent_updates = AgentUpdatesSection::default();
        assert_eq!(parsed.agent_updates.enabled, agent_updates.enabled);
        assert_eq!(
            parsed.agent_updates.max_transfers,
            agent_updates.max_transfers
        );
    }

    #[test]
    fn partial_file_takes_defaults_and_reports_unknown_keys() {
        let text = "[server]\nheartbeat_secs = 3\n[feed]\nurl = \"http://h/\"\n[mail]\nsmtp_url = \"smtp://x\"\n";
        let (config, unknown) = Config::parse(text).unwrap();
        assert_eq!(config.server.heartbeat_secs, 3);
        assert_eq!(config.server.max_sessions, 100_000);
        assert_eq!(config.feed.url.as_deref(), Some("http://h/"));
        assert_eq!(config.feed.check_interval_secs, 3600);
        assert_eq!(unknown, Vec::<String>::new());
        assert_eq!(config.mail.smtp_url.as_deref(), Some("smtp://x"));
        assert_eq!(config.mail.language, crate::mail::MailLanguage::En);
    }

    #[test]
    fn the_mail_language_is_one_with_a_catalogue() {
        let (config, _) = Config::parse("[mail]\nlanguage = \"de\"\n").unwrap();
        assert_eq!(config.mail.language, crate::mail::MailLanguage::De);
        let err = Config::parse("[mail]\nlanguage = \"german\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("`de`"), "{err:#}");
    }

    #[test]
    fn carried_paths_must_stay_inside_the_install() {
        for bad in ["../etc", "/etc", "bin", ""] {
            let text = format!("[carry_over]\npaths = [\"{bad}\"]\n");
            let (config, _) = Config::parse(&text).unwrap();
            assert!(config.validate().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn half_a_tls_pair_is_refused() {
        let (config, _) = Config::parse("[tls]\ncert = \"certs/a.crt\"\n").unwrap();
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("together"), "{err}");
    }

    #[test]
    fn missing_file_is_created_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config/changeover.toml");
        let first = Config::load_or_create(&path).unwrap();
        assert!(first.created);
        let second = Config::load_or_create(&path).unwrap();
        assert!(!second.created);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), DEFAULT_CONFIG);
    }
}
