//! A real SMTP server for tests: aiosmtpd from PyPI, in a virtual environment made once
//! under the target folder, writing each accepted mail as one file into a Maildir.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::{Process, eventually};

/// The Python that has aiosmtpd: `CHANGEOVER_TEST_SMTP_PYTHON`, or a venv made on first use.
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            if let Some(python) = std::env::var_os("CHANGEOVER_TEST_SMTP_PYTHON") {
                return PathBuf::from(python);
            }
            let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-smtp-venv");
            let python = venv.join("bin/python");
            let ready = Command::new(&python)
                .args(["-c", "import aiosmtpd"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if !ready {
                let made = Command::new("python3")
                    .args(["-m", "venv"])
                    .arg(&venv)
                    .status();
                assert!(made.is_ok_and(|s| s.success()), "cannot make a Python venv");
                let installed = Command::new(&python)
                    .args(["-m", "pip", "install", "--quiet", "aiosmtpd"])
                    .status();
                assert!(
                    installed.is_ok_and(|s| s.success()),
                    "cannot install aiosmtpd from PyPI"
                );
            }
            python
        })
        .clone()
}

/// An aiosmtpd process on `port`, delivering into `maildir`.
#[derive(Debug)]
pub struct SmtpSink {
    pub process: Process,
    pub maildir: PathBuf,
}

impl SmtpSink {
    pub fn start(port: u16, maildir: &Path) -> SmtpSink {
        // aiosmtpd makes the Maildir itself; an existing empty folder makes it answer 500.
        let log = maildir.with_extension("smtp.log");
        let log_file = std::fs::File::create(&log).expect("log");
        let child = Command::new(python())
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg(maildir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("aiosmtpd starts");
        let process = Process { child, log };
        eventually(Duration::from_secs(20), "aiosmtpd to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(drop)
        });
        SmtpSink {
            process,
            maildir: maildir.to_owned(),
        }
    }

    /// Every mail received so far, as raw text.
    pub fn messages(&self) -> Vec<String> {
        let Ok(listing) = std::fs::read_dir(self.maildir.join("new")) else {
            return Vec::new();
        };
        listing
            .flatten()
            .filter_map(|item| std::fs::read_to_string(item.path()).ok())
            .collect()
    }
}
