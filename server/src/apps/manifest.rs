//! `app.toml`: the vendor's applications a release carries, and how to run and probe them.
//!
//! The file sits at the release root, so it is signed with the release. A release without
//! it runs the server alone.

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// The manifest's file name at the release root.
pub const FILE_NAME: &str = "app.toml";

/// The stop timeout when `app.toml` names none.
pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 30;

/// The longest stop timeout a manifest may ask for.
const MAX_STOP_TIMEOUT_SECS: u64 = 3600;

/// The applications of one release, in start order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    pub apps: Vec<AppSpec>,
}

/// One `[[app]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSpec {
    pub name: String,
    /// The program (resolved against the release root when relative) and its arguments.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub stop_timeout: Duration,
    pub health: Option<Probe>,
    /// The application's own self-check, run in the preflight.
    pub check: Option<Vec<String>>,
}

/// How the server tells that an application works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// An HTTP(S) URL that must answer 2xx.
    Http(String),
    /// A `host:port` that must accept a TCP connection.
    Tcp(String),
    /// A command (first element relative to the release root) that must exit 0.
    Command(Vec<String>),
}

impl std::fmt::Display for Probe {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Http(url) => write!(formatter, "http {url}"),
            Probe::Tcp(address) => write!(formatter, "tcp {address}"),
            Probe::Command(command) => write!(formatter, "command {}", command.join(" ")),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    app: Vec<RawApp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: String,
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    stop_timeout_secs: Option<u64>,
    #[serde(default)]
    health: Option<RawProbe>,
    #[serde(default)]
    check: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    http: Option<String>,
    tcp: Option<String>,
    command: Option<Vec<String>>,
}

impl Manifest {
    /// Reads `release/app.toml`; `None` when the release has none.
    pub fn load(release: &Path) -> anyhow::Result<Option<Manifest>> {
        let path = release.join(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(err).with_context(|| format!("cannot read {}", path.display()));
            }
        };
        Manifest::parse(&text)
            .with_context(|| format!("invalid {}", path.display()))
            .map(Some)
    }

    /// Parses and checks a manifest's text.
    pub fn parse(text: &str) -> anyhow::Result<Manifest> {
        let raw: RawManifest = toml::from_str(text)?;
        let mut names = HashSet::new();
        let mut apps = Vec::with_capacity(raw.app.len());
        for raw_app in raw.app {
            let app = AppSpec::from_raw(raw_app)?;
            if !names.insert(app.name.clone()) {
                bail!("two applications are named {:?}", app.name);
            }
            apps.push(app);
        }
        Ok(Manifest { apps })
    }

    /// Checks that every program the manifest names is in `release` and executable.
    pub fn check_programs(&self, release: &Path) -> anyhow::Result<()> {
        for app in &self.apps {
            let mut commands = vec![("command", &app.command)];
            if let Some(check) = &app.check {
                commands.push(("check", check));
            }
            if let Some(Probe::Command(probe)) = &app.health {
                commands.push(("health command", probe));
            }
            for (what, command) in commands {
                let program = resolve_program(release, &command[0]);
                executable(&program).with_context(|| {
                    format!(
                        "application {:?}: its {what} {}",
                        app.name,
                        program.display()
                    )
                })?;
            }
        }
        Ok(())
    }
}

impl AppSpec {
    fn from_raw(raw: RawApp) -> anyhow::Result<AppSpec> {
        check_name(&raw.name)?;
        let name = raw.name;
        check_command(&raw.command).with_context(|| format!("application {name:?}: command"))?;
        if let Some(check) = &raw.check {
            check_command(check).with_context(|| format!("application {name:?}: check"))?;
        }
        for (key, value) in &raw.env {
            if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
                bail!("application {name:?}: env key {key:?} is not a valid variable");
            }
        }
        let stop_timeout_secs = raw.stop_timeout_secs.unwrap_or(DEFAULT_STOP_TIMEOUT_SECS);
        if !(1..=MAX_STOP_TIMEOUT_SECS).contains(&stop_timeout_secs) {
            bail!(
                "application {name:?}: stop_timeout_secs must be 1 to {MAX_STOP_TIMEOUT_SECS}, not {stop_timeout_secs}"
            );
        }
        let health = match raw.health {
            None => None,
            Some(probe) => Some(
                Probe::from_raw(probe).with_context(|| format!("application {name:?}: health"))?,
            ),
        };
        Ok(AppSpec {
            name,
            command: raw.command,
            env: raw.env,
            stop_timeout: Duration::from_secs(stop_timeout_secs),
            health,
            check: raw.check,
        })
    }
}

impl Probe {
    fn from_raw(raw: RawProbe) -> anyhow::Result<Probe> {
        match (raw.http, raw.tcp, raw.command) {
            (Some(url), None, None) => {
                let parsed: http::Uri = url
                    .parse()
                    .with_context(|| format!("{url:?} is not a URL"))?;
                if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none()
                {
                    bail!("{url:?} is not an http:// or https:// URL");
                }
                Ok(Probe::Http(url))
            }
            (None, Some(address), None) => {
                match address.rsplit_once(':') {
                    Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
                    _ => bail!("{address:?} is not host:port"),
                }
                Ok(Probe::Tcp(address))
            }
            (None, None, Some(command)) => {
                check_command(&command)?;
                Ok(Probe::Command(command))
            }
            _ => bail!("give exactly one of http, tcp or command"),
        }
    }
}

/// Application names: what may appear in a file name and a status table.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if !valid {
        bail!(
            "application name {name:?}: use 1 to 64 letters, digits, '-' or '_', starting with a letter or digit"
        );
    }
    Ok(())
}

fn check_command(command: &[String]) -> anyhow::Result<()> {
    let Some(program) = command.first() else {
        bail!("is empty");
    };
    if program.is_empty() || command.iter().any(|part| part.contains('\0')) {
        bail!("has an empty program or a NUL character");
    }
    let path = Path::new(program);
    if !path.is_absolute()
        && path
            .components()
            .any(|part| !matches!(part, Component::Normal(_) | Component::CurDir))
    {
        bail!("{program:?} must stay inside the release (no '..')");
    }
    Ok(())
}

/// The program of a command: relative to the release root unless absolute.
pub fn resolve_program(release: &Path, program: &str) -> PathBuf {
    let path = Path::new(program);
    if path.is_absolute() {
        path.to_owned()
    } else {
        release.join(path)
    }
}

fn executable(program: &Path) -> anyhow::Result<()> {
    let metadata = std::fs::metadata(program).context("does not exist")?;
    if !metadata.is_file() {
        bail!("is not a file");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if metadata.permissions().mode() & 0o111 == 0 {
            bail!("is not executable");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let manifest = Manifest::parse(
            r#"
            [[app]]
            name = "business"
            command = ["bin/business-server", "--port", "8080"]
            env = { BUSINESS_DATA = "data" }
            stop_timeout_secs = 20
            health = { http = "http://127.0.0.1:8080/health" }
            check = ["bin/business-server", "--self-check"]

            [[app]]
            name = "finance"
            command = ["bin/finance"]
            health = { tcp = "127.0.0.1:8081" }
            "#,
        )
        .unwrap();
        assert_eq!(manifest.apps.len(), 2);
        let business = &manifest.apps[0];
        assert_eq!(business.stop_timeout, Duration::from_secs(20));
        assert_eq!(
            business.health,
            Some(Probe::Http("http://127.0.0.1:8080/health".to_owned()))
        );
        assert_eq!(business.env["BUSINESS_DATA"], "data");
        assert_eq!(
            manifest.apps[1].stop_timeout,
            Duration::from_secs(DEFAULT_STOP_TIMEOUT_SECS)
        );
        assert_eq!(manifest.apps[1].check, None);
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        let cases = [
            ("[[app]]\nname = \"a\"\ncommand = []\n", "is empty"),
            (
                "[[app]]\nname = \"a\"\ncommand = [\"../x\"]\n",
                "inside the release",
            ),
            (
                "[[app]]\nname = \"a b\"\ncommand = [\"x\"]\n",
                "application name",
            ),
            (
                "[[app]]\nname = \"a\"\ncommand = [\"x\"]\n[[app]]\nname = \"a\"\ncommand = [\"y\"]\n",
                "two applications",
            ),
            (
                "[[app]]\nname = \"a\"\ncommand = [\"x\"]\nhealth = { tcp = \"h:1\", http = \"http://h/\" }\n",
                "exactly one",
            ),
            (
                "[[app]]\nname = \"a\"\ncommand = [\"x\"]\nhealth = { tcp = \"nohost\" }\n",
                "host:port",
            ),
            (
                "[[app]]\nname = \"a\"\ncommand = [\"x\"]\nhealth = { http = \"ftp://h/\" }\n",
                "http://",
            ),
            (
                "[[app]]\nname = \"a\"\ncommand = [\"x\"]\nstop_timeout_secs = 0\n",
                "stop_timeout_secs",
            ),
            (
                "[[app]]\nname = \"a\"\ncommand = [\"x\"]\ncolour = 1\n",
                "colour",
            ),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", Manifest::parse(text).unwrap_err());
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    // Windows has no execute bit to miss.
    #[cfg(unix)]
    #[test]
    fn programs_must_exist_and_be_executable() {
        let release = tempfile::tempdir().unwrap();
        std::fs::create_dir(release.path().join("bin")).unwrap();
        std::fs::write(release.path().join("bin/app"), "#!/bin/sh\n").unwrap();
        let manifest = Manifest::parse("[[app]]\nname = \"a\"\ncommand = [\"bin/app\"]\n").unwrap();
        let err = format!("{:#}", manifest.check_programs(release.path()).unwrap_err());
        assert!(err.contains("not executable"), "{err}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(
                release.path().join("bin/app"),
                std::fs::Permissions::from_mode(0o755),
            )
            .unwrap();
            manifest.check_programs(release.path()).unwrap();
        }
        assert_eq!(Manifest::load(&release.path().join("none")).unwrap(), None);
    }
}
