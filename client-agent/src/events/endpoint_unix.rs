//! The events endpoint on Unix: the socket `STATE_DIR/run/events.sock`, mode 0600, in a
//! folder of mode 0700, so only the workstation's own user (and root) can open it. The
//! folder is private first: the socket is never reachable by anyone else, not even in the
//! moment between its bind and its chmod.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

use super::{ConnectError, EndpointError};

/// The folder in the state folder that holds the socket.
const FOLDER: &str = "run";

/// The socket's file name.
const SOCKET: &str = "events.sock";

/// The longest socket path every Unix takes (`sun_path` is 108 bytes on Linux, 104 on
/// macOS and the BSDs, the terminating zero included).
const MAX_SOCKET_PATH_BYTES: usize = 103;

fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(FOLDER).join(SOCKET)
}

/// The endpoint in words: the socket's path.
pub(super) fn describe(state_dir: &Path) -> String {
    socket_path(state_dir).display().to_string()
}

/// The listening socket; its file is removed when it is dropped.
#[derive(Debug)]
pub(super) struct Listener {
    socket: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Binds the socket, replacing one that nothing serves (left by a crash); refuses when
    /// another agent serves it.
    pub(super) async fn bind(state_dir: &Path) -> Result<Listener, EndpointError> {
        let folder = state_dir.join(FOLDER);
        let path = socket_path(state_dir);
        if path.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
            return Err(EndpointError::PathTooLong { path });
        }
        let private_folder = || -> std::io::Result<()> {
            match std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&folder)
            {
                Ok(()) => {}
                Err(err) if err.kind() == ErrorKind::AlreadyExists => {}
                Err(err) => return Err(err),
            }
            // Not a link to somewhere else; and made private whatever it was before (only
            // its owner may change its mode).
            if !std::fs::symlink_metadata(&folder)?.is_dir() {
                return Err(std::io::Error::other("it is not a folder"));
            }
            std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o700))
        };
        private_folder().map_err(|source| EndpointError::Folder {
            path: folder.clone(),
            source,
        })?;
        let endpoint = || path.display().to_string();
        if std::fs::symlink_metadata(&path).is_ok() {
            if UnixStream::connect(&path).await.is_ok() {
                return Err(EndpointError::InUse {
                    endpoint: endpoint(),
                });
            }
            std::fs::remove_file(&path).map_err(|source| EndpointError::Serve {
                endpoint: endpoint(),
                source,
            })?;
        }
        let socket = UnixListener::bind(&path).map_err(|source| match source.kind() {
            // Another agent got there between the removal and the bind.
            ErrorKind::AddrInUse => EndpointError::InUse {
                endpoint: endpoint(),
            },
            _ => EndpointError::Serve {
                endpoint: endpoint(),
                source,
            },
        })?;
        let private_socket =
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        let listener = Listener {
            socket,
            path: path.clone(),
        };
        // On failure the listener goes, and its file with it.
        private_socket.map_err(|source| EndpointError::Serve {
            endpoint: path.display().to_string(),
            source,
        })?;
        Ok(listener)
    }

    pub(super) async fn accept(&mut self) -> std::io::Result<UnixStream> {
        self.socket.accept().await.map(|(stream, _)| stream)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Opens the endpoint of the agent keeping its state in `state_dir`.
pub(super) async fn connect(state_dir: &Path) -> Result<UnixStream, ConnectError> {
    match UnixStream::connect(socket_path(state_dir)).await {
        Ok(stream) => Ok(stream),
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::NotFound | ErrorKind::ConnectionRefused
            ) =>
        {
            Err(ConnectError::NotRunning)
        }
        // Its backlog is full.
        Err(err) if err.kind() == ErrorKind::WouldBlock => Err(ConnectError::Busy),
        Err(err) => Err(ConnectError::Failed(err)),
    }
}
