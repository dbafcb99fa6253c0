//! The server's log, kept in `<root>/state/server.log` as well as on stderr.
//!
//! Stderr goes wherever the service manager sends it; the copy in the state folder is what
//! the server itself can read back: the mail about a failed or rolled-back changeover ends
//! with its last lines, written by whichever process (old or new release) saw the failure.
//! The file is bounded: past [`MAX_BYTES`] it becomes `server.log.1` and a new one starts.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The size at which the log file is rotated.
pub const MAX_BYTES: u64 = 4 * 1024 * 1024;

/// The [`crate::unwritten`] key of the log file.
const UNWRITTEN: &str = "log";

/// The log file's name in the state folder.
pub const FILE_NAME: &str = "server.log";

/// The log file of one product folder, shared by every writer.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    max_bytes: u64,
    state: Mutex<Option<(File, u64)>>,
    /// The last write failed (and is named in [`crate::unwritten`]).
    failing: std::sync::atomic::AtomicBool,
}

impl LogFile {
    /// Opens (appending) `state_dir/server.log`; `None` when it cannot be written, and the
    /// log goes to stderr only.
    pub fn open(state_dir: &Path) -> Option<Arc<LogFile>> {
        LogFile::open_at(state_dir.join(FILE_NAME), MAX_BYTES)
    }

    /// Opens (appending) the log file `path`, rotated to `<path>.1` past `max_bytes`.
    pub fn open_at(path: PathBuf, max_bytes: u64) -> Option<Arc<LogFile>> {
        std::fs::create_dir_all(path.parent()?).ok()?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .ok()?;
        let size = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
        Some(Arc::new(LogFile {
            path,
            max_bytes,
            state: Mutex::new(Some((file, size))),
            failing: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Appends `bytes`; what cannot be written is dropped, never an error.
    pub fn append(&self, bytes: &[u8]) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some((_, size)) = state.as_ref()
            && *size + bytes.len() as u64 > self.max_bytes
        {
            *state = None;
            let _ = std::fs::rename(&self.path, rotated(&self.path));
            *state = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok()
                .map(|file| (file, 0));
        }
        // A line that cannot be written (a full disk) is named in the status, not logged:
        // this is the log.
        match state
            .as_mut()
            .map(|(file, size)| (file.write_all(bytes), size))
        {
            Some((Ok(()), size)) => {
                *size += bytes.len() as u64;
                if self
                    .failing
                    .swap(false, std::sync::atomic::Ordering::Relaxed)
                {
                    crate::unwritten::clear(UNWRITTEN);
                }
            }
            Some((Err(err), _)) => {
                self.failing
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                crate::unwritten::report(
                    UNWRITTEN,
                    format!(
                        "cannot write the log {}: {err}; it goes to stderr only meanwhile",
                        self.path.display()
                    ),
                );
            }
            None => {}
        }
    }
}

/// The process's log file, once [`attach`]ed.
static PROCESS_LOG: OnceLock<Arc<LogFile>> = OnceLock::new();

/// From now on the log is copied to `state_dir/server.log` too. Called after the listening
/// socket is open, so that the socket, not the log file, is descriptor 3.
pub fn attach(state_dir: &Path) {
    if let Some(file) = LogFile::open(state_dir) {
        let _ = PROCESS_LOG.set(file);
    }
}

/// Writes each log line to stderr and to the log file: the process's (see [`attach`]) or
/// the one given.
#[derive(Debug, Clone, Default)]
pub struct Tee {
    file: Option<Arc<LogFile>>,
}

impl Tee {
    pub fn new(file: Option<Arc<LogFile>>) -> Tee {
        Tee { file }
    }
}

impl Write for Tee {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        // A log line that cannot be written anywhere is dropped, never an error.
        let _ = std::io::stderr().write_all(bytes);
        if let Some(file) = self.file.as_ref().or_else(|| PROCESS_LOG.get()) {
            file.append(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The last `count` lines of the log in `state_dir` (reaching into the rotated file when
/// the current one is shorter), oldest first.
pub fn tail(state_dir: &Path, count: usize) -> Vec<String> {
    tail_of(&state_dir.join(FILE_NAME), count)
}

/// The rotated copy of the log file `path`: `<path>.1`.
fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The last `count` lines of the log file `path` and its rotated copy, oldest first.
pub fn tail_of(path: &Path, count: usize) -> Vec<String> {
    let read = |path: PathBuf| {
        std::fs::read(path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    };
    let current = read(path.to_owned());
    let mut lines: Vec<String> = current.lines().map(str::to_owned).collect();
    if lines.len() < count {
        let rotated = read(rotated(path));
        let mut older: Vec<String> = rotated.lines().map(str::to_owned).collect();
        older.append(&mut lines);
        lines = older;
    }
    let skip = lines.len().saturating_sub(count);
    lines.split_off(skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_spans_the_rotation_and_the_file_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::open(dir.path()).unwrap();
        let mut tee = Tee::new(Some(log));
        let line = format!("{}\n", "x".repeat(1023));
        for _ in 0..(MAX_BYTES / 1024 + 10) {
            tee.write_all(line.as_bytes()).unwrap();
        }
        tee.write_all(b"the last line\n").unwrap();
        let size = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
        assert!(size < MAX_BYTES, "{size}");
        assert!(dir.path().join("server.log.1").exists());
        let tail = tail(dir.path(), 20);
        assert_eq!(tail.len(), 20);
        assert_eq!(tail.last().map(String::as_str), Some("the last line"));
    }
}
