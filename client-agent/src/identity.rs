//! Who this agent is: a stable id kept in its state folder, the instance id of this
//! process, the user, host and platform.
//!
//! The agent id says "this workstation" across restarts; the instance id says "this
//! running agent". A disk image cloned onto many workstations carries one agent id to all
//! of them, and only the instance id tells them apart: the server keeps the first and
//! gives a newcomer with a different instance a fresh id in its welcome, which the agent
//! keeps from then on ([`Identity::adopt_assigned_id`]). When the agent restarts into an
//! updated release it hands its instance id on in [`INSTANCE_ENV`], so the new release is
//! the same instance reconnecting, not a clone.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context as _;
use changeover_protocol::text::{MAX_ID_BYTES, is_valid_id};
use changeover_protocol::{AgentHello, PROTOCOL_VERSION};
use tracing::warn;

/// The environment variable an agent hands its instance id on in, to the release it
/// restarts into (and the watcher that may put the previous release back).
pub const INSTANCE_ENV: &str = "CHANGEOVER_AGENT_INSTANCE";

/// The agent id's file in the state folder.
const ID_FILE: &str = "agent-id";

/// What the agent tells the server about itself.
#[derive(Debug, Clone)]
pub struct Identity {
    pub agent_id: String,
    /// This process's [`instance_id`], sent with every hello.
    pub instance_id: String,
    pub user: String,
    pub host: String,
    pub platform: String,
    pub agent_version: String,
    /// `state_dir/agent-id`, where an id the server assigns is kept.
    id_file: PathBuf,
}

impl Identity {
    /// Loads the agent id from `state_dir/agent-id`, creating both on first run.
    pub fn load_or_create(state_dir: &Path, user: Option<String>) -> anyhow::Result<Identity> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create the state folder {}", state_dir.display()))?;
        let id_file = state_dir.join(ID_FILE);
        let agent_id = match std::fs::read_to_string(&id_file) {
            Ok(text) if is_valid_id(text.trim()) => text.trim().to_owned(),
            Ok(text) if text.trim().is_empty() => write_new_id(&id_file)?,
            Ok(text) => {
                warn!(
                    file = %id_file.display(),
                    found = %shown(text.trim()),
                    "the agent id file holds no usable id; starting with a new one"
                );
                write_new_id(&id_file)?
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => write_new_id(&id_file)?,
            Err(err) => {
                return Err(err).with_context(|| format!("cannot read {}", id_file.display()));
            }
        };
        Ok(Identity {
            agent_id,
            instance_id: instance_id().to_owned(),
            user: within_limit(
                "user name",
                user.unwrap_or_else(login_name),
                changeover_protocol::text::MAX_USER_BYTES,
            ),
            host: within_limit(
                "host name",
                gethostname::gethostname().to_string_lossy().into_owned(),
                changeover_protocol::text::MAX_HOST_BYTES,
            ),
            platform: platform(),
            agent_version: crate::version::running_version(),
            id_file,
        })
    }

    /// The first message of every connection.
    pub fn hello(&self) -> AgentHello {
        AgentHello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: self.agent_id.clone(),
            user: self.user.clone(),
            host: self.host.clone(),
            platform: self.platform.clone(),
            agent_version: self.agent_version.clone(),
            instance_id: Some(self.instance_id.clone()),
        }
    }

    /// Takes the id a welcome assigned (the server found this agent's id connected from
    /// another instance: a cloned workstation). Kept in the state folder and used for every
    /// later hello; an id the server itself would refuse in a hello (not 1 to 64 characters
    /// of `A-Z a-z 0-9 . _ -`, [`is_valid_id`]) is ignored.
    /// Returns whether the id changed.
    pub fn adopt_assigned_id(&mut self, assigned: &str) -> bool {
        if assigned == self.agent_id {
            return false;
        }
        if !is_valid_id(assigned) {
            warn!(
                assigned = %shown(assigned),
                "ignoring the agent id the server assigned: an id is 1 to {MAX_ID_BYTES} \
                 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
            );
            return false;
        }
        warn!(
            previous = %self.agent_id,
            assigned,
            "this workstation shares its agent id with another one (a cloned disk?); the \
             server assigned {assigned}"
        );
        if let Err(err) = crate::files::write_atomically(&self.id_file, assigned.as_bytes()) {
            warn!(
                file = %self.id_file.display(),
                cause = %err,
                "cannot keep the assigned agent id; this process uses it until it ends"
            );
        }
        assigned.clone_into(&mut self.agent_id);
        true
    }
}

/// This process's instance id: the one handed on in [`INSTANCE_ENV`] by the agent this
/// process was restarted from, else a new random one. The same for the whole process.
pub fn instance_id() -> &'static str {
    static INSTANCE: OnceLock<String> = OnceLock::new();
    INSTANCE.get_or_init(|| instance_from(std::env::var(INSTANCE_ENV).ok()))
}

fn instance_from(inherited: Option<String>) -> String {
    match inherited {
        Some(id) if is_valid_id(&id) => id,
        Some(id) => {
            warn!(
                found = %shown(&id),
                "ignoring {INSTANCE_ENV}: not an instance id; this agent is a new instance"
            );
            uuid::Uuid::new_v4().to_string()
        }
        None => uuid::Uuid::new_v4().to_string(),
    }
}

// An id from elsewhere as a log shows it: quoted, escaped, and not 60 KiB long.
fn shown(id: &str) -> String {
    const SHOWN_CHARS: usize = 80;
    let mut cut: String = id.chars().take(SHOWN_CHARS).collect();
    if cut.len() < id.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

// The server refuses a hello with a longer field; better a shortened name than none.
fn within_limit(what: &str, text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let cut = changeover_protocol::text::truncate(&text, max).to_owned();
    tracing::warn!(
        "the {what} is {} bytes long; the server takes {max}, so it is sent as {cut:?}",
        text.len()
    );
    cut
}

/// Operating system and architecture, such as `linux-x86_64`.
pub fn platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

fn login_name() -> String {
    ["USER", "USERNAME", "LOGNAME"]
        .into_iter()
        .find_map(|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn write_new_id(id_file: &Path) -> anyhow::Result<String> {
    let agent_id = uuid::Uuid::new_v4().to_string();
    crate::files::write_atomically(id_file, agent_id.as_bytes())
        .with_context(|| format!("cannot write {}", id_file.display()))?;
    Ok(agent_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_beyond_the_servers_limits_are_shortened_not_refused() {
        assert_eq!(within_limit("user name", "anna".to_owned(), 256), "anna");
        let long = "ü".repeat(200);
        let cut = within_limit("user name", long, 256);
        assert_eq!(cut.len(), 256);
        assert!(cut.chars().all(|c| c == 'ü'));
    }

    #[test]
    fn the_agent_id_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::load_or_create(dir.path(), Some("alice".to_owned())).unwrap();
        let second = Identity::load_or_create(dir.path(), None).unwrap();
        assert_eq!(first.agent_id, second.agent_id);
        assert_eq!(first.user, "alice");
        assert!(uuid::Uuid::parse_str(&first.agent_id).is_ok());
    }

    #[test]
    fn every_hello_of_a_process_names_its_one_instance() {
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity::load_or_create(dir.path(), None).unwrap();
        let again = Identity::load_or_create(dir.path(), None).unwrap();
        assert_eq!(identity.hello().instance_id.as_deref(), Some(instance_id()));
        assert_eq!(again.hello().instance_id, identity.hello().instance_id);
        assert!(is_valid_id(instance_id()));
    }

    #[test]
    fn an_instance_id_is_handed_on_only_when_it_is_one() {
        let handed = "3f1c9f0e-8a51-4c38-9d0e-6b1f4f3b2a10".to_owned();
        assert_eq!(instance_from(Some(handed.clone())), handed);
        let fresh = instance_from(None);
        assert!(uuid::Uuid::parse_str(&fresh).is_ok());
        assert_ne!(instance_from(None), fresh);
        let refused = instance_from(Some("x\u{1b}[2J".to_owned()));
        assert!(uuid::Uuid::parse_str(&refused).is_ok());
        assert!(uuid::Uuid::parse_str(&instance_from(Some("a".repeat(65)))).is_ok());
    }

    #[test]
    fn an_assigned_id_is_kept_and_used_for_the_next_hello() {
        let dir = tempfile::tempdir().unwrap();
        let mut identity = Identity::load_or_create(dir.path(), None).unwrap();
        let instance = identity.instance_id.clone();
        assert!(identity.adopt_assigned_id("clone-2.ws_7"));
        assert_eq!(identity.hello().agent_id, "clone-2.ws_7");
        assert_eq!(identity.hello().instance_id, Some(instance));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("agent-id")).unwrap(),
            "clone-2.ws_7"
        );
        // The same id again changes nothing; a restart reads it back.
        assert!(!identity.adopt_assigned_id("clone-2.ws_7"));
        let restarted = Identity::load_or_create(dir.path(), None).unwrap();
        assert_eq!(restarted.agent_id, "clone-2.ws_7");
        assert!(!dir.path().join("agent-id.tmp").exists());
    }

    #[test]
    fn an_unusable_assigned_id_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut identity = Identity::load_or_create(dir.path(), None).unwrap();
        let original = identity.agent_id.clone();
        for bad in [
            "",
            "has space",
            "../../etc/passwd",
            "\u{1b}[31mred",
            "ünïcode",
            &"a".repeat(65),
        ] {
            assert!(!identity.adopt_assigned_id(bad), "{bad:?}");
        }
        assert!(is_valid_id(&"a".repeat(64)));
        assert_eq!(identity.agent_id, original);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("agent-id")).unwrap(),
            original
        );
    }

    #[test]
    fn a_garbled_id_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agent-id"), "x".repeat(70_000)).unwrap();
        let identity = Identity::load_or_create(dir.path(), None).unwrap();
        assert!(uuid::Uuid::parse_str(&identity.agent_id).is_ok());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("agent-id")).unwrap(),
            identity.agent_id
        );
    }
}
