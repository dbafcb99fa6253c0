//! The events endpoint on Windows: the named pipe `\\.\pipe\changeover-agent-events-HASH`,
//! HASH taken from the state folder's full path, so each agent (and each user's) has its
//! own. Remote clients are refused. The pipe has the default security of a pipe the user
//! creates: full control for the user, SYSTEM and administrators, and read access for
//! everyone else on the machine, who could thus read (not write) the events too. A pipe
//! with its own security descriptor needs raw Windows calls (tokio's
//! `create_with_security_attributes_raw` is `unsafe`), which `unsafe_code = "forbid"`
//! leaves out.

use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

use tokio::net::windows::named_pipe::{
    ClientOptions, NamedPipeClient, NamedPipeServer, ServerOptions,
};

use super::{ConnectError, EndpointError};

/// All instances of the pipe are taken; a new one comes in a moment.
const ERROR_PIPE_BUSY: i32 = 231;

/// How long a starting agent waits for the pipe of the agent it replaces to go (an update
/// starts the new agent as the old one ends).
const TAKE_OVER_PATIENCE: Duration = Duration::from_secs(3);

/// The pipe's name: the same for every spelling of the folder's path (relative, with `/`,
/// another case, a trailing separator), whether the folder exists yet or not, as `events`
/// may look before the agent first ran.
fn pipe_name(state_dir: &Path) -> String {
    let folder = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    // Paths on Windows are case-insensitive: one folder, one name.
    let text = folder.to_string_lossy().to_lowercase();
    let text = text.trim_end_matches(['\\', '/']);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    let hash: String = digest.as_ref()[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!(r"\\.\pipe\changeover-agent-events-{hash}")
}

/// The endpoint in words: the pipe's name.
pub(super) fn describe(state_dir: &Path) -> String {
    pipe_name(state_dir)
}

/// The pipe instance the next client connects to.
#[derive(Debug)]
pub(super) struct Listener {
    next: NamedPipeServer,
    name: String,
}

impl Listener {
    /// Creates the pipe's first instance; refuses when another agent serves it.
    pub(super) async fn bind(state_dir: &Path) -> Result<Listener, EndpointError> {
        let name = pipe_name(state_dir);
        let started = std::time::Instant::now();
        loop {
            match ServerOptions::new()
                .first_pipe_instance(true)
                .reject_remote_clients(true)
                .create(&name)
            {
                Ok(next) => return Ok(Listener { next, name }),
                Err(err)
                    if err.kind() == ErrorKind::PermissionDenied
                        && started.elapsed() < TAKE_OVER_PATIENCE =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) if err.kind() == ErrorKind::PermissionDenied => {
                    return Err(EndpointError::InUse { endpoint: name });
                }
                Err(source) => {
                    return Err(EndpointError::Serve {
                        endpoint: name,
                        source,
                    });
                }
            }
        }
    }

    /// Waits for a client on the waiting instance, and puts up the next one.
    /// A client that left before it was taken breaks its instance: a new one replaces it
    /// either way.
    pub(super) async fn accept(&mut self) -> std::io::Result<NamedPipeServer> {
        let connected = self.next.connect().await;
        let following = ServerOptions::new()
            .reject_remote_clients(true)
            .create(&self.name)?;
        let client = std::mem::replace(&mut self.next, following);
        connected.map(|()| client)
    }
}

/// Opens the endpoint of the agent keeping its state in `state_dir`.
pub(super) async fn connect(state_dir: &Path) -> Result<NamedPipeClient, ConnectError> {
    match ClientOptions::new().open(pipe_name(state_dir)) {
        Ok(client) => Ok(client),
        Err(err) if err.kind() == ErrorKind::NotFound => Err(ConnectError::NotRunning),
        Err(err) if err.raw_os_error() == Some(ERROR_PIPE_BUSY) => Err(ConnectError::Busy),
        Err(err) => Err(ConnectError::Failed(err)),
    }
}
