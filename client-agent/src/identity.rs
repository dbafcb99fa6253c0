//! Who this agent is: a stable id kept in its state folder, the user, host and platform.

use std::path::Path;

use anyhow::Context as _;
use changeover_protocol::{AgentHello, PROTOCOL_VERSION};

/// What the agent tells the server about itself.
#[derive(Debug, Clone)]
pub struct Identity {
    pub agent_id: String,
    pub user: String,
    pub host: String,
    pub platform: String,
    pub agent_version: String,
}

impl Identity {
    /// Loads the agent id from `state_dir/agent-id`, creating both on first run.
    pub fn load_or_create(state_dir: &Path, user: Option<String>) -> anyhow::Result<Identity> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create the state folder {}", state_dir.display()))?;
        let id_file = state_dir.join("agent-id");
        let agent_id = match std::fs::read_to_string(&id_file) {
            Ok(text) if !text.trim().is_empty() => text.trim().to_owned(),
            Ok(_) => write_new_id(&id_file)?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => write_new_id(&id_file)?,
            Err(err) => {
                return Err(err).with_context(|| format!("cannot read {}", id_file.display()));
            }
        };
        Ok(Identity {
            agent_id,
            user: user.unwrap_or_else(login_name),
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            platform: platform(),
            agent_version: crate::version::running_version(),
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
            instance_id: None,
        }
    }
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
    let temporary = id_file.with_extension("tmp");
    std::fs::write(&temporary, &agent_id)
        .and_then(|()| std::fs::rename(&temporary, id_file))
        .with_context(|| format!("cannot write {}", id_file.display()))?;
    Ok(agent_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_id_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::load_or_create(dir.path(), Some("alice".to_owned())).unwrap();
        let second = Identity::load_or_create(dir.path(), None).unwrap();
        assert_eq!(first.agent_id, second.agent_id);
        assert_eq!(first.user, "alice");
        assert!(uuid::Uuid::parse_str(&first.agent_id).is_ok());
    }
}
