//! `changeover-server doctor`: everything a changeover will need from this machine, checked
//! without changing anything, each finding with what an admin does about it.
//!
//! The checks follow what breaks self-updating servers in the field: a server started from
//! outside its product folder, a service user without full rights on that folder (so the old
//! install cannot be renamed to `server_old` and deleted), antivirus software or `noexec`
//! mounts that stop freshly written executables from running, a full disk, and a firewall or
//! proxy between the server and the vendor's feed. Vendor key, config and mail are checked
//! too.
//!
//! This is not the preflight: a changeover checks again, with the package in hand
//! ([`crate::changeover::preflight`]). The only thing doctor writes is a probe folder inside
//! the product folder, removed again before it returns.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use changeover_protocol::package::VendorKey;
use changeover_protocol::release::{ReleaseInfo, ReleaseKind, current_platform};

use crate::changeover::preflight;
use crate::config::Config;
use crate::feed::{Feed, FeedError};
use crate::layout::Layout;

/// How long the probe executable may take to run; antivirus software scanning every new
/// executable makes it slow, one holding it makes it hang.
const EXEC_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long fetching and verifying the feed's manifest may take.
const FEED_TIMEOUT: Duration = Duration::from_secs(15);

/// How long connecting to the SMTP server may take (name lookup included).
const SMTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Room kept free beyond the estimate, as the preflight does.
const SPACE_MARGIN: u64 = 64 * 1024 * 1024;

/// At most this many offending paths are named in one finding.
const MAX_PATHS_NAMED: usize = 5;

// The checks' names, as `render` prints them.
const CHECK_ROOT: &str = "product folder";
const CHECK_INSTALL: &str = "install";
const CHECK_BINARY: &str = "binary";
const CHECK_USER: &str = "user";
const CHECK_RIGHTS: &str = "rights";
const CHECK_EXECUTE: &str = "execute";
const CHECK_SWAP: &str = "swap";
const CHECK_FILESYSTEMS: &str = "filesystems";
const CHECK_LEFTOVERS: &str = "leftovers";
const CHECK_SPACE: &str = "disk space";
const CHECK_STATE: &str = "state folder";
const CHECK_CONFIG: &str = "config";
const CHECK_VENDOR_KEY: &str = "vendor key";
const CHECK_FEED: &str = "feed";
const CHECK_MAIL: &str = "mail";

/// How much a finding matters for the next changeover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Worth fixing; a changeover still works.
    Warning,
    /// A changeover would fail (or could not even start) until this is fixed.
    Blocker,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The check's short name, such as `vendor key`.
    pub check: &'static str,
    pub status: Status,
    /// What was found, on one line.
    pub detail: String,
    /// What an admin does about it; set for every warning and blocker.
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, detail: impl Into<String>) -> Finding {
        Finding {
            check,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warning(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            check,
            status: Status::Warning,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn blocker(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            check,
            status: Status::Blocker,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Runs every check against the product folder `root`. Changes nothing, except a probe
/// folder it creates inside `root` and removes again. An `Err` means doctor itself failed,
/// not a check.
pub async fn examine(root: &Path) -> anyhow::Result<Vec<Finding>> {
    examine_named(root, crate::layout::INSTALL_DIR_NAME).await
}

/// [`examine`] for the install called `name` (`--name`).
pub async fn examine_named(root: &Path, name: &str) -> anyhow::Result<Vec<Finding>> {
    let owned_root = root.to_owned();
    let name = name.to_owned();
    let local = tokio::task::spawn_blocking(move || examine_locally(&owned_root, &name)).await?;
    let mut findings = local.findings;
    if let Some(followups) = local.followups {
        findings.push(check_feed(&followups.feed, followups.installed_version.as_ref()).await);
        findings.push(check_mail(&followups.mail).await);
    }
    Ok(findings)
}

/// The findings as a report for a terminal: one line per check, an indented `fix:` line
/// under each warning and blocker, and a verdict at the end.
pub fn render(findings: &[Finding]) -> String {
    let width = findings
        .iter()
        .map(|finding| finding.check.len())
        .max()
        .unwrap_or(0);
    let mut report = String::new();
    for finding in findings {
        let label = match finding.status {
            Status::Ok => "ok",
            Status::Warning => "WARN",
            Status::Blocker => "FAIL",
        };
        let _ = writeln!(
            report,
            "{label:<4}  {check:<width$}  {detail}",
            check = finding.check,
            detail = finding.detail
        );
        if let Some(fix) = &finding.fix {
            let _ = writeln!(report, "      {:<width$}  fix: {fix}", "");
        }
    }
    let count = |status| {
        findings
            .iter()
            .filter(|finding| finding.status == status)
            .count()
    };
    let blockers = count(Status::Blocker);
    let warnings = count(Status::Warning);
    let verdict = if blockers > 0 {
        format!(
            "{blockers} blocker(s), {warnings} warning(s): a changeover would fail; fix the FAIL lines first"
        )
    } else if warnings > 0 {
        format!("no blockers, {warnings} warning(s): a changeover would work")
    } else {
        "everything is ready for a changeover".to_owned()
    };
    report.push_str(&verdict);
    report.push('\n');
    report
}

/// Whether any finding would make a changeover fail.
pub fn blocks_changeover(findings: &[Finding]) -> bool {
    findings
        .iter()
        .any(|finding| finding.status == Status::Blocker)
}

/// What the file-system checks found, and what the network checks need.
struct LocalResult {
    findings: Vec<Finding>,
    /// `None` when the product folder is missing and nothing else is worth checking.
    followups: Option<Followups>,
}

struct Followups {
    feed: FeedSetting,
    /// From the install's `release.json`, to tell whether the feed has something newer.
    installed_version: Option<semver::Version>,
    mail: MailSetting,
}

/// Where releases come from, as far as the config and the vendor key allow checking.
enum FeedSetting {
    NoUrl {
        config_file: PathBuf,
        inbox: PathBuf,
    },
    NoKey {
        url: String,
    },
    Ready {
        url: String,
        key: VendorKey,
    },
}

/// The `[mail]` table's SMTP server, as doctor checks it.
#[derive(Debug, PartialEq, Eq)]
enum MailSetting {
    NotConfigured {
        config_file: PathBuf,
    },
    ConfigUnreadable,
    Invalid {
        reason: String,
        config_file: PathBuf,
    },
    Smtp {
        host: String,
        port: u16,
    },
}

fn examine_locally(root: &Path, name: &str) -> LocalResult {
    if !root.is_dir() {
        // Nothing else makes sense, and the rights probe would create the folder.
        return LocalResult {
            findings: vec![Finding::blocker(
                CHECK_ROOT,
                format!("{} does not exist or is not a folder", root.display()),
                format!(
                    "pass the product folder the service runs with (its `--root`); a first \
                     install creates it: `changeover-server install --root {} --package \
                     <server archive> --public-key <vendor.pub>`",
                    root.display()
                ),
            )],
            followups: None,
        };
    }
    let layout = Layout::named(root, name);
    let mut findings = Vec::new();
    let (install, installed_version) = check_install(&layout);
    findings.push(install);
    findings.push(check_binary_location(&layout));
    findings.push(check_user(&layout));
    findings.push(check_rights(root));
    findings.push(check_execute(root));
    let loaded = load_config(&layout);
    findings.push(check_swap(&layout, &loaded.config.carry_over.paths));
    findings.push(check_filesystems(&layout, &loaded.config.carry_over.paths));
    findings.push(check_leftovers(&layout));
    findings.push(check_space(&layout, &loaded.config.carry_over.paths));
    findings.push(check_state_writable(&layout));
    findings.push(loaded.finding);
    findings.extend(check_apps(&layout));
    let (vendor_key, key) = check_vendor_key(&layout, &loaded.config);
    findings.push(vendor_key);
    let feed = match (&loaded.config.feed.url, key) {
        (None, _) => FeedSetting::NoUrl {
            config_file: layout.config_file(),
            inbox: layout.inbox_dir(),
        },
        (Some(url), None) => FeedSetting::NoKey { url: url.clone() },
        (Some(url), Some(key)) => FeedSetting::Ready {
            url: url.clone(),
            key,
        },
    };
    let mail = match &loaded.text {
        Some(text) => mail_setting(text, &layout.config_file()),
        None if loaded.config_file_exists => MailSetting::ConfigUnreadable,
        None => MailSetting::NotConfigured {
            config_file: layout.config_file(),
        },
    };
    LocalResult {
        findings,
        followups: Some(Followups {
            feed,
            installed_version,
            mail,
        }),
    }
}

// ---- 1. the install and the binary that runs ----------------------------------------------

fn check_install(layout: &Layout) -> (Finding, Option<semver::Version>) {
    let install = layout.install_dir();
    let root = layout.root().display();
    if !install.is_dir() {
        return (
            Finding::blocker(
                CHECK_INSTALL,
                format!("no installed release: {} does not exist", install.display()),
                format!(
                    "install the server release: `changeover-server install --root {root} \
                     --package <server archive> --public-key <vendor.pub>`"
                ),
            ),
            None,
        );
    }
    let binary = install.join(ReleaseKind::Server.binary_path());
    let restore = format!(
        "restore {} from the release archive of the installed version (`tar -xzf <archive> \
         -C {}`), or move {} aside and install again with `changeover-server install --root \
         {root} ...`, then move its config/, certs/ and backups/ back",
        ReleaseKind::Server.binary_path(),
        install.display(),
        install.display()
    );
    if !binary.is_file() {
        return (
            Finding::blocker(
                CHECK_INSTALL,
                format!(
                    "{} is missing: there is nothing for the service to start",
                    binary.display()
                ),
                restore,
            ),
            None,
        );
    }
    if !is_executable(&binary) {
        return (
            Finding::blocker(
                CHECK_INSTALL,
                format!("{} is not executable", binary.display()),
                format!("`chmod 755 {}`", binary.display()),
            ),
            None,
        );
    }
    let release_file = install.join("release.json");
    let info = std::fs::read_to_string(&release_file)
        .map_err(|err| err.to_string())
        .and_then(|text| serde_json::from_str::<ReleaseInfo>(&text).map_err(|err| err.to_string()));
    let info = match info {
        Ok(info) => info,
        Err(reason) => {
            return (
                Finding::warning(
                    CHECK_INSTALL,
                    format!(
                        "{} is unreadable ({reason}): the server cannot tell which release is \
                         installed and reports its build version {} instead, against which \
                         newer releases are judged",
                        release_file.display(),
                        env!("CARGO_PKG_VERSION")
                    ),
                    format!(
                        "restore release.json from the release archive of the installed \
                         version (`tar -xzf <archive> -C {} release.json`)",
                        install.display()
                    ),
                ),
                None,
            );
        }
    };
    if info.kind != ReleaseKind::Server {
        return (
            Finding::blocker(
                CHECK_INSTALL,
                format!(
                    "{} holds a {} release, not a server release",
                    install.display(),
                    info.kind
                ),
                restore,
            ),
            None,
        );
    }
    let platform = current_platform();
    if info.platform != platform {
        return (
            Finding::blocker(
                CHECK_INSTALL,
                format!(
                    "{} holds release {} built for {}, this machine is {platform}",
                    install.display(),
                    info.version,
                    info.platform
                ),
                format!(
                    "install the {platform} build of the server (move {} aside, then \
                     `changeover-server install --root {root} ...`)",
                    install.display()
                ),
            ),
            None,
        );
    }
    (
        Finding::ok(
            CHECK_INSTALL,
            format!(
                "release {} ({platform}) in {}",
                info.version,
                install.display()
            ),
        ),
        Some(info.version),
    )
}

fn check_binary_location(layout: &Layout) -> Finding {
    let installed = layout.install_dir().join(ReleaseKind::Server.binary_path());
    let installed_shown = std::fs::canonicalize(&installed).unwrap_or_else(|_| installed.clone());
    let service_should_start = format!(
        "the service manager must start {} (systemd `ExecStart=`, the Windows service's \
         binary path, launchd `ProgramArguments`): a changeover replaces that file, a copy \
         elsewhere would keep running the old release",
        installed_shown.display()
    );
    let running = match std::env::current_exe() {
        Ok(running) => std::fs::canonicalize(&running).unwrap_or(running),
        Err(err) => {
            return Finding::warning(
                CHECK_BINARY,
                format!("cannot tell which binary runs doctor: {err}"),
                service_should_start,
            );
        }
    };
    if running == installed_shown {
        Finding::ok(
            CHECK_BINARY,
            format!(
                "doctor runs from the installed {}, the binary the service must start",
                running.display()
            ),
        )
    } else {
        Finding::warning(
            CHECK_BINARY,
            format!(
                "doctor runs from {}, not from the product folder's {}",
                running.display(),
                installed_shown.display()
            ),
            format!(
                "run doctor as `{} doctor --root {}`; {service_should_start}",
                installed_shown.display(),
                layout.root().display()
            ),
        )
    }
}

// ---- 2. rights, and running an executable ------------------------------------------------

/// Root passes every rights check, so they say nothing about a service with its own user.
#[cfg(unix)]
fn check_user(layout: &Layout) -> Finding {
    let uid = rustix::process::getuid();
    if uid.is_root() {
        Finding::warning(
            CHECK_USER,
            "doctor runs as root: the rights checks below pass for root even where the \
             service's own user would fail",
            format!(
                "run doctor as the user the service runs as, e.g. `sudo -u <service user> {} \
                 doctor --root {}`; if the service itself runs as root, nothing to do",
                layout
                    .install_dir()
                    .join(ReleaseKind::Server.binary_path())
                    .display(),
                layout.root().display()
            ),
        )
    } else {
        Finding::ok(
            CHECK_USER,
            format!(
                "running as {}; the checks below hold for this user, which must be the \
                 service's",
                user_name()
            ),
        )
    }
}

/// On Windows the service runs as its own account (LocalSystem unless changed), which has
/// rights of its own.
#[cfg(windows)]
fn check_user(layout: &Layout) -> Finding {
    Finding::ok(
        CHECK_USER,
        format!(
            "running as {}; the checks below hold for this account; the service's account \
             (see `sc qc changeover-{}`) needs the same rights",
            user_name(),
            layout.name()
        ),
    )
}

fn check_rights(root: &Path) -> Finding {
    match preflight::check_rights(root) {
        Ok(()) => Finding::ok(
            CHECK_RIGHTS,
            format!(
                "can create, make executable, rename and delete folders in {}",
                root.display()
            ),
        ),
        Err(err) => Finding::blocker(CHECK_RIGHTS, format!("{err:#}"), rights_fix(root)),
    }
}

fn rights_fix(root: &Path) -> String {
    if cfg!(windows) {
        format!(
            "give the service's account Full control of {} (inherited by everything in it), \
             and add an antivirus exception for that folder",
            root.display()
        )
    } else {
        format!(
            "give the service's user full rights on {root} and everything in it, e.g. `chown \
             -R {user} {root} && chmod -R u+rwX {root}`, and add an antivirus exception for \
             that folder",
            root = root.display(),
            user = user_name()
        )
    }
}

/// The user doctor runs as, for fix texts.
fn user_name() -> String {
    if let Some(name) = std::env::var_os("USER").or_else(|| std::env::var_os("USERNAME")) {
        return name.to_string_lossy().into_owned();
    }
    #[cfg(unix)]
    {
        rustix::process::getuid().as_raw().to_string()
    }
    #[cfg(not(unix))]
    {
        "<service user>".to_owned()
    }
}

/// Writes a tiny executable into the product folder and runs it: what a changeover does
/// with the new release, and what `noexec` mounts and antivirus software break even when
/// every permission is right.
fn check_execute(root: &Path) -> Finding {
    let probe_dir = root.join(format!(".changeover-doctor-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&probe_dir);
    let outcome = run_probe(&probe_dir);
    let removed = std::fs::remove_dir_all(&probe_dir);
    let av_fix = format!(
        "add an exception for {} to the antivirus software (and to any execution policy: \
         fapolicyd, SELinux, AppArmor), so that new executables there may run",
        root.display()
    );
    let finding = match outcome {
        Ok(()) => Finding::ok(
            CHECK_EXECUTE,
            format!(
                "a new executable written to {} runs and exits 0",
                root.display()
            ),
        ),
        Err(ProbeError::Setup(err)) => Finding::blocker(
            CHECK_EXECUTE,
            format!("cannot write the probe executable: {err:#}"),
            rights_fix(root),
        ),
        Err(ProbeError::Refused(err)) if mounted_noexec(root) => Finding::blocker(
            CHECK_EXECUTE,
            format!(
                "the file system holding {} is mounted noexec: a new release could not run \
                 ({err})",
                root.display()
            ),
            format!(
                "remount it without noexec (see `findmnt -T {}` and /etc/fstab), or move the \
                 product folder to a file system that allows executables",
                root.display()
            ),
        ),
        Err(ProbeError::Refused(err)) => Finding::blocker(
            CHECK_EXECUTE,
            format!("a new executable may not run here ({err}): a new release could not start"),
            av_fix,
        ),
        Err(ProbeError::Vanished) => Finding::blocker(
            CHECK_EXECUTE,
            "the probe executable disappeared before it could run: antivirus software \
             probably quarantined it",
            av_fix,
        ),
        Err(ProbeError::Failed(status)) => Finding::blocker(
            CHECK_EXECUTE,
            format!("the probe executable (`exit 0`) ended with {status}: something stopped it"),
            av_fix,
        ),
        Err(ProbeError::TimedOut) => Finding::blocker(
            CHECK_EXECUTE,
            format!(
                "the probe executable (`exit 0`) did not finish within {} s: antivirus \
                 software is probably holding new executables for scanning",
                EXEC_PROBE_TIMEOUT.as_secs()
            ),
            av_fix,
        ),
    };
    match removed {
        Err(err) if finding.status == Status::Ok && probe_dir.exists() => Finding::blocker(
            CHECK_EXECUTE,
            format!(
                "the probe ran, but {} cannot be deleted: {err}",
                probe_dir.display()
            ),
            format!(
                "{}; then delete {} by hand",
                rights_fix(root),
                probe_dir.display()
            ),
        ),
        _ => finding,
    }
}

enum ProbeError {
    Setup(anyhow::Error),
    Refused(std::io::Error),
    Vanished,
    Failed(std::process::ExitStatus),
    TimedOut,
}

fn run_probe(probe_dir: &Path) -> Result<(), ProbeError> {
    let executable = write_probe(probe_dir).map_err(ProbeError::Setup)?;

    let mut child = spawn_fresh_executable(&executable).map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => ProbeError::Vanished,
        _ => ProbeError::Refused(err),
    })?;
    let deadline = std::time::Instant::now() + EXEC_PROBE_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(ProbeError::Failed(status)),
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ProbeError::TimedOut);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(err) => return Err(ProbeError::Refused(err)),
        }
    }
}

/// A shell script that exits 0.
#[cfg(unix)]
fn write_probe(probe_dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt as _;

    let executable = probe_dir.join("probe");
    std::fs::create_dir_all(probe_dir)
        .with_context(|| format!("cannot create {}", probe_dir.display()))?;
    std::fs::write(&executable, "#!/bin/sh\nexit 0\n")
        .with_context(|| format!("cannot write {}", executable.display()))?;
    std::fs::set_permissions(&executable, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", executable.display()))?;
    Ok(executable)
}

/// A copy of this program (with the DLLs beside it), run as `probe.exe --version`, then
/// renamed: what antivirus software watching for new executables reacts to, and what the
/// service account must be allowed to do with a release's files (the seed's failure
/// article).
#[cfg(windows)]
fn write_probe(probe_dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;

    let me = std::env::current_exe().context("cannot find this program")?;
    std::fs::create_dir_all(probe_dir)
        .with_context(|| format!("cannot create {}", probe_dir.display()))?;
    if let Some(folder) = me.parent()
        && let Ok(entries) = std::fs::read_dir(folder)
    {
        for entry in entries.flatten() {
            let path = entry.path();
            if path
                .extension()
                .is_some_and(|ext| ext.eq_ignore_ascii_case("dll"))
            {
                let _ = std::fs::copy(&path, probe_dir.join(entry.file_name()));
            }
        }
    }
    let written = probe_dir.join("probe-new.exe");
    std::fs::copy(&me, &written)
        .with_context(|| format!("cannot write the executable {}", written.display()))?;
    let executable = probe_dir.join("probe.exe");
    crate::platform::rename_with_retries(&written, &executable)
        .with_context(|| format!("cannot rename the executable {}", written.display()))?;
    Ok(executable)
}

/// Spawns a file just written. Another thread forking while it was open for writing keeps
/// a write handle alive in that child until it execs, and the kernel refuses to run a file
/// open for writing ("text file busy"), so that is retried briefly.
fn spawn_fresh_executable(executable: &Path) -> std::io::Result<std::process::Child> {
    let mut attempts = 0;
    loop {
        let mut command = std::process::Command::new(executable);
        if cfg!(windows) {
            command.arg("--version");
        }
        let spawned = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        match spawned {
            Err(err) if err.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 20 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            other => return other,
        }
    }
}

#[cfg(windows)]
fn mounted_noexec(_path: &Path) -> bool {
    false
}

#[cfg(unix)]
fn mounted_noexec(path: &Path) -> bool {
    rustix::fs::statvfs(path)
        .is_ok_and(|stats| stats.f_flag.contains(rustix::fs::StatVfsMountFlags::NOEXEC))
}

// ---- 3. renaming the install, leftovers ---------------------------------------------------

/// A changeover renames `<root>/server` (exchanging it with the staged release), moves the
/// carried folders out of it, and deletes it as `server_old` once the new release is healthy;
/// the journal and downloads live in `<root>/state`. The rights probe proved renaming inside
/// `<root>`; this checks the folders that already exist, which may belong to someone else.
#[cfg(unix)]
fn check_swap(layout: &Layout, carry_paths: &[String]) -> Finding {
    use std::os::unix::fs::MetadataExt as _;

    use rustix::fs::Access;

    let install = layout.install_dir();
    let mut problems = Vec::new();
    let uid = rustix::process::getuid();
    if let (Ok(root_meta), Ok(install_meta)) = (
        std::fs::metadata(layout.root()),
        std::fs::symlink_metadata(&install),
    ) {
        let sticky = root_meta.mode() & 0o1000 != 0;
        if sticky && !uid.is_root() && install_meta.uid() != uid.as_raw() {
            problems.push(format!(
                "{} has the sticky bit set and {} belongs to uid {}: only its owner may rename it",
                layout.root().display(),
                install.display(),
                install_meta.uid()
            ));
        }
    }
    let carried: Vec<PathBuf> = carry_paths.iter().map(|path| install.join(path)).collect();
    for top in [install.clone(), layout.state_dir()] {
        if !top.exists() {
            continue;
        }
        for item in walkdir::WalkDir::new(&top).follow_links(false) {
            let item = match item {
                Ok(item) => item,
                Err(err) => {
                    problems.push(format!("cannot read {err}"));
                    continue;
                }
            };
            let path = item.path();
            if item.file_type().is_dir() {
                // Listing, deleting and adding entries, and moving a folder to another
                // parent (which rewrites its `..`) all need these.
                if let Err(err) =
                    rustix::fs::access(path, Access::READ_OK | Access::WRITE_OK | Access::EXEC_OK)
                {
                    problems.push(format!(
                        "{} is not writable ({})",
                        path.display(),
                        std::io::Error::from(err)
                    ));
                }
            } else if item.file_type().is_file()
                && carried.iter().any(|folder| path.starts_with(folder))
            {
                // Carried files are hashed before and after the move.
                if let Err(err) = rustix::fs::access(path, Access::READ_OK) {
                    problems.push(format!(
                        "{} is not readable ({})",
                        path.display(),
                        std::io::Error::from(err)
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        return Finding::ok(
            CHECK_SWAP,
            format!(
                "every folder in {} and {} is writable: the install can be renamed to {}, its \
                 carried folders moved and the old release deleted",
                install.display(),
                layout.state_dir().display(),
                layout
                    .old_install_dir()
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
            ),
        );
    }
    Finding::blocker(
        CHECK_SWAP,
        format!(
            "a changeover could not move or delete the old release: {}",
            name_some(&problems)
        ),
        rights_fix(layout.root()),
    )
}

/// On Windows a folder with a file open in it cannot be renamed: files in the install that
/// another program holds open (an antivirus scan, a backup tool, an editor) are named.
#[cfg(windows)]
fn check_swap(layout: &Layout, carry_paths: &[String]) -> Finding {
    let install = layout.install_dir();
    let held = crate::changeover::preflight::held_files(&install, carry_paths);
    if held.is_empty() {
        return Finding::ok(
            CHECK_SWAP,
            format!(
                "no file in {} is held open by another program",
                install.display()
            ),
        );
    }
    let named: Vec<String> = held.iter().map(|path| path.display().to_string()).collect();
    Finding::blocker(
        CHECK_SWAP,
        format!(
            "files in the install are held open by another program, so the release folder \
             could not be renamed: {}",
            name_some(&named)
        ),
        "close the program holding them (Resource Monitor, CPU tab, \"Associated Handles\", \
         finds it), or exclude the product folder from the antivirus and backup software",
    )
}

/// The install and the carried folders must be movable by renaming: one filesystem, no
/// mount points (the same check as the preflight's).
fn check_filesystems(layout: &Layout, carry_paths: &[String]) -> Finding {
    let install = layout.install_dir();
    match crate::changeover::preflight::filesystem_problems(&install, carry_paths) {
        Ok(problems) if problems.is_empty() => Finding::ok(
            CHECK_FILESYSTEMS,
            format!(
                "the install and its carried folders ({}) are on one filesystem, none a mount point",
                carry_paths.join(", ")
            ),
        ),
        Ok(problems) => Finding::blocker(
            CHECK_FILESYSTEMS,
            problems.join("; "),
            crate::changeover::preflight::FILESYSTEM_FIX,
        ),
        Err(err) => Finding::blocker(
            CHECK_FILESYSTEMS,
            format!("{err:#}"),
            "check that the install can be read",
        ),
    }
}

/// Names the first few of `items`, and how many more there are.
fn name_some(items: &[String]) -> String {
    let mut text = items
        .iter()
        .take(MAX_PATHS_NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > MAX_PATHS_NAMED {
        let _ = write!(text, "; and {} more", items.len() - MAX_PATHS_NAMED);
    }
    text
}

fn check_leftovers(layout: &Layout) -> Finding {
    let journal = crate::changeover::journal::JournalFiles::new(&layout.state_dir()).current;
    let unfinished: Vec<String> = [
        layout.old_install_dir(),
        preflight::staging_dir(layout),
        journal,
    ]
    .into_iter()
    .filter(|path| path.exists())
    .map(|path| path.display().to_string())
    .collect();
    if !unfinished.is_empty() {
        return Finding::warning(
            CHECK_LEFTOVERS,
            format!(
                "a changeover is under way or was interrupted: {} exist(s)",
                unfinished.join(", ")
            ),
            format!(
                "if no changeover is running, start the server (the service, or \
                 `changeover-server run --root {}`): it finishes or rolls back the unfinished \
                 changeover before anything else. Do not delete these by hand: the journal \
                 records which folder holds which release",
                layout.root().display()
            ),
        );
    }
    let interrupted_install = layout.root().join(".server.installing");
    if interrupted_install.exists() {
        return Finding::warning(
            CHECK_LEFTOVERS,
            format!(
                "an interrupted first install left {}",
                interrupted_install.display()
            ),
            format!("delete {}", interrupted_install.display()),
        );
    }
    let failed = layout.failed_install_dir();
    if failed.exists() {
        return Finding::ok(
            CHECK_LEFTOVERS,
            format!(
                "no unfinished changeover; {} holds a release that failed after an earlier \
                 changeover, kept for diagnosis (delete it when done, to free its space)",
                failed.display()
            ),
        );
    }
    Finding::ok(CHECK_LEFTOVERS, "no unfinished changeover")
}

// ---- 4. disk space ------------------------------------------------------------------------

/// One thing a changeover writes, and where.
#[derive(Debug, Clone)]
struct Need {
    what: &'static str,
    bytes: u64,
}

/// A filesystem a changeover writes on: its free space and what goes there.
#[derive(Debug, Clone)]
struct Room {
    /// The folder it is named by (the first place that needs it).
    shown: PathBuf,
    free: Result<u64, String>,
    needs: Vec<Need>,
}

impl Room {
    fn needed(&self) -> u64 {
        self.needs
            .iter()
            .map(|need| need.bytes)
            .fold(SPACE_MARGIN, u64::saturating_add)
    }
}

/// What a changeover writes, on each filesystem it writes on: the download (into
/// `state/downloads`) and the new release unpacked beside the install (in the product
/// folder). The old release is kept until the commit by renaming it, and the carried
/// folders move by rename too: neither takes room. A state folder on the install's
/// filesystem adds up the two.
fn check_space(layout: &Layout, carry_paths: &[String]) -> Finding {
    let carried: Vec<PathBuf> = carry_paths
        .iter()
        .map(|path| layout.install_dir().join(path))
        .collect();
    // The release's own files: the install without the site's carried folders.
    let release_bytes: u64 = walkdir::WalkDir::new(layout.install_dir())
        .follow_links(false)
        .into_iter()
        .filter_entry(|item| !carried.iter().any(|path| item.path() == path))
        .filter_map(Result::ok)
        .filter(|item| item.file_type().is_file())
        .filter_map(|item| item.metadata().ok())
        .map(|metadata| metadata.len())
        .sum();
    let downloads = existing_ancestor(&layout.downloads_dir());
    let places = [
        (downloads, "the download", release_bytes),
        (
            layout.root().to_owned(),
            "the new release unpacked beside the install",
            release_bytes,
        ),
    ];
    let mut rooms: Vec<(Option<u64>, Room)> = Vec::new();
    for (place, what, bytes) in places {
        let filesystem = crate::platform::filesystem_id(&place);
        let need = Need { what, bytes };
        match rooms
            .iter_mut()
            .find(|(id, _)| id.is_some() && *id == filesystem)
        {
            Some((_, room)) => room.needs.push(need),
            None => {
                let free = crate::platform::free_space(&place).map_err(|err| err.to_string());
                rooms.push((
                    filesystem,
                    Room {
                        shown: place,
                        free,
                        needs: vec![need],
                    },
                ));
            }
        }
    }
    let rooms: Vec<Room> = rooms.into_iter().map(|(_, room)| room).collect();
    space_finding(&rooms)
}

/// Whether the server can write what it keeps in `state/` (its records, log, outbox and
/// audit log). A server that cannot still starts and serves; it names what waits in `admin
/// status` and writes it once there is room.
fn check_state_writable(layout: &Layout) -> Finding {
    let state = layout.state_dir();
    if !state.exists() {
        return Finding::ok(CHECK_STATE, "no state folder yet; the server creates it");
    }
    let probe = state.join(".changeover-doctor-probe");
    let written =
        std::fs::write(&probe, [0u8; 4096]).and_then(|()| std::fs::File::open(&probe)?.sync_all());
    let _ = std::fs::remove_file(&probe);
    match written {
        Ok(()) => Finding::ok(CHECK_STATE, format!("{} can be written", state.display())),
        Err(err) => Finding::warning(
            CHECK_STATE,
            format!(
                "cannot write {}: {err}; the server starts and serves all the same, but the \
                 record of a changeover, its log, the outbox and the audit log wait (listed \
                 under disk_problems in `admin status`) until there is room",
                state.display()
            ),
            format!("free space on the filesystem holding {}", state.display()),
        ),
    }
}

/// The nearest folder of `path` that exists (the downloads folder may not yet).
fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|folder| folder.exists())
        .unwrap_or(path)
        .to_owned()
}

fn space_finding(rooms: &[Room]) -> Finding {
    let describe = |room: &Room| {
        let needs = room
            .needs
            .iter()
            .map(|need| format!("{} MiB for {}", mib(need.bytes), need.what))
            .collect::<Vec<_>>()
            .join(", ");
        let free = match &room.free {
            Ok(free) => format!("{} MiB free", mib(*free)),
            Err(err) => format!("free space unknown ({err})"),
        };
        format!(
            "{free} on the filesystem of {}, where a changeover needs about {} MiB ({needs}, \
             {} MiB margin)",
            room.shown.display(),
            mib(room.needed()),
            mib(SPACE_MARGIN)
        )
    };
    let detail = format!(
        "{}; the old release is kept until the commit by renaming it, which takes no room",
        rooms.iter().map(describe).collect::<Vec<_>>().join("; ")
    );
    let short: Vec<&Room> = rooms
        .iter()
        .filter(|room| room.free.as_ref().is_ok_and(|free| *free < room.needed()))
        .collect();
    if let Some(room) = short.first() {
        let free = room.free.as_ref().map_or(0, |free| *free);
        return Finding::blocker(
            CHECK_SPACE,
            detail,
            format!(
                "free at least {} MiB on the filesystem holding {} (old backups in \
                 server/backups/ and a kept server_failed/ are the usual candidates)",
                mib(room.needed() - free),
                room.shown.display()
            ),
        );
    }
    if let Some(room) = rooms.iter().find(|room| room.free.is_err()) {
        return Finding::warning(
            CHECK_SPACE,
            detail.clone(),
            format!(
                "make sure the filesystem of {} has at least {} MiB free",
                room.shown.display(),
                mib(room.needed())
            ),
        );
    }
    Finding::ok(CHECK_SPACE, detail)
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1024 * 1024)
}

// ---- 5./6. config and vendor key ----------------------------------------------------------

struct LoadedForDoctor {
    finding: Finding,
    /// What the server would use; the defaults when the file is missing or broken.
    config: Config,
    /// The file's text, when it could be read.
    text: Option<String>,
    config_file_exists: bool,
}

fn load_config(layout: &Layout) -> LoadedForDoctor {
    let path = layout.config_file();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return LoadedForDoctor {
                finding: Finding::ok(
                    CHECK_CONFIG,
                    format!(
                        "{} is not written yet: the server starts with the defaults and \
                         writes them there",
                        path.display()
                    ),
                ),
                config: Config::default(),
                text: None,
                config_file_exists: false,
            };
        }
        Err(err) => {
            return LoadedForDoctor {
                finding: Finding::blocker(
                    CHECK_CONFIG,
                    format!("cannot read {}: {err}", path.display()),
                    rights_fix(layout.root()),
                ),
                config: Config::default(),
                text: None,
                config_file_exists: true,
            };
        }
    };
    // The file exists, so this only reads it; it also checks the values, as `run` does.
    let finding_and_config = match Config::load_or_create(&path) {
        Err(err) => (
            Finding::blocker(
                CHECK_CONFIG,
                format!("{err:#}: the server would not start"),
                format!(
                    "correct {} (every key is optional; a file holding only some keys takes \
                     the defaults for the rest)",
                    path.display()
                ),
            ),
            Config::default(),
        ),
        Ok(loaded) if !loaded.unknown_keys.is_empty() => (
            Finding::warning(
                CHECK_CONFIG,
                format!(
                    "{} holds keys this release ignores: {}",
                    path.display(),
                    loaded.unknown_keys.join(", ")
                ),
                "check them for typos (a misspelt key leaves its setting at the default); \
                 keys meant for a newer release can stay",
            ),
            loaded.config,
        ),
        Ok(loaded) => (
            Finding::ok(CHECK_CONFIG, format!("{} is valid", path.display())),
            loaded.config,
        ),
    };
    let (finding, config) = finding_and_config;
    LoadedForDoctor {
        finding,
        config,
        text: Some(text),
        config_file_exists: true,
    }
}

fn check_vendor_key(layout: &Layout, config: &Config) -> (Finding, Option<VendorKey>) {
    let path = layout.resolve_install_path(&config.feed.public_key);
    match VendorKey::from_file(&path) {
        Ok(key) => (
            Finding::ok(
                CHECK_VENDOR_KEY,
                format!("{} is a minisign public key", path.display()),
            ),
            Some(key),
        ),
        Err(err) => (
            Finding::blocker(
                CHECK_VENDOR_KEY,
                format!("{err}: no release can be verified, from the feed or the inbox"),
                format!(
                    "copy the vendor's public key (the vendor.pub shipped with the release; \
                     `changeover-server install` puts it there) to {}, or point \
                     feed.public_key in {} at it",
                    path.display(),
                    layout.config_file().display()
                ),
            ),
            None,
        ),
    }
}

// ---- 5b. the vendor's applications (app.toml) ----------------------------------------------

const CHECK_APPS: &str = "applications";

// One finding per application: its programs exist and are executable, and its probe's port
// is free or served by it (its pid file names a live process).
fn check_apps(layout: &Layout) -> Vec<Finding> {
    let install = layout.install_dir();
    if !install.is_dir() {
        return Vec::new();
    }
    let manifest = match crate::apps::Manifest::load(&install) {
        Ok(Some(manifest)) => manifest,
        Ok(None) => {
            return vec![Finding::ok(
                CHECK_APPS,
                format!(
                    "no {} in the release: the server runs alone",
                    crate::apps::manifest::FILE_NAME
                ),
            )];
        }
        Err(err) => {
            return vec![Finding::blocker(
                CHECK_APPS,
                format!("{err:#}"),
                "the release's app.toml is the vendor's: ask for a release with a valid one \
                 (README, \"Putting your application under Changeover\")",
            )];
        }
    };
    let mut findings = Vec::new();
    for app in &manifest.apps {
        let single = crate::apps::Manifest {
            apps: vec![app.clone()],
        };
        if let Err(err) = single.check_programs(&install) {
            findings.push(Finding::blocker(
                CHECK_APPS,
                format!("{err:#}"),
                format!(
                    "the application cannot start: make the program executable \
                     (`chmod +x`) or reinstall the release into {}",
                    install.display()
                ),
            ));
            continue;
        }
        let port = match &app.health {
            Some(crate::apps::Probe::Tcp(address)) => Some(address.clone()),
            Some(crate::apps::Probe::Http(url)) => url.parse::<http::Uri>().ok().and_then(|uri| {
                let host = uri.host()?.trim_matches(['[', ']']).to_owned();
                let port = uri
                    .port_u16()
                    .unwrap_or(if uri.scheme_str() == Some("https") {
                        443
                    } else {
                        80
                    });
                Some(if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                })
            }),
            _ => None,
        };
        let running = app_pid(layout, &app.name);
        let in_use = port.as_deref().is_some_and(port_in_use);
        let probe = app
            .health
            .as_ref()
            .map_or_else(|| "no health probe".to_owned(), |probe| probe.to_string());
        match (in_use, running) {
            (true, None) => findings.push(Finding::blocker(
                CHECK_APPS,
                format!(
                    "{}: its probe's address {} is already taken by another program",
                    app.name,
                    port.as_deref().unwrap_or("")
                ),
                "stop whatever listens there (`ss -ltnp`), or the application will not start \
                 and a changeover would roll back",
            )),
            (_, Some(pid)) => findings.push(Finding::ok(
                CHECK_APPS,
                format!("{}: running as pid {pid}; {probe}", app.name),
            )),
            (false, None) => findings.push(Finding::ok(
                CHECK_APPS,
                format!("{}: ready to start; {probe}", app.name),
            )),
        }
    }
    findings
}

// The pid of the running application from its pid file, when that process is alive.
fn app_pid(layout: &Layout, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(layout.apps_dir().join(format!("{name}.pid"))).ok()?;
    let pid: u32 = text.split_whitespace().next()?.parse().ok()?;
    #[cfg(target_os = "linux")]
    {
        std::path::Path::new(&format!("/proc/{pid}"))
            .exists()
            .then_some(pid)
    }
    #[cfg(not(target_os = "linux"))]
    Some(pid)
}

fn port_in_use(address: &str) -> bool {
    use std::net::ToSocketAddrs as _;
    let Ok(addresses) = address.to_socket_addrs() else {
        return false;
    };
    addresses.into_iter().any(|address| {
        std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_millis(500))
            .is_ok()
    })
}

// ---- 7. the feed --------------------------------------------------------------------------

async fn check_feed(setting: &FeedSetting, installed: Option<&semver::Version>) -> Finding {
    let (url, key) = match setting {
        FeedSetting::NoUrl { config_file, inbox } => {
            return Finding::warning(
                CHECK_FEED,
                format!(
                    "no feed.url: updates only from the inbox {}",
                    inbox.display()
                ),
                format!(
                    "set `url` in the [feed] section of {} to the vendor's feed if this server \
                     may reach it; otherwise copy each release (the archive with its .minisig) \
                     into {}",
                    config_file.display(),
                    inbox.display()
                ),
            );
        }
        FeedSetting::NoKey { url } => {
            return Finding::warning(
                CHECK_FEED,
                format!(
                    "{url} not checked: its manifest cannot be verified without the vendor key"
                ),
                "fix the vendor key, then run doctor again",
            );
        }
        FeedSetting::Ready { url, key } => (url, key),
    };
    let feed = match Feed::new(url, key.clone()) {
        Ok(feed) => feed,
        Err(err) => {
            return Finding::blocker(
                CHECK_FEED,
                err.to_string(),
                "correct feed.url: the http:// or https:// address of the vendor's feed folder",
            );
        }
    };
    let proxy = proxy_for(feed.url());
    let route = match &proxy {
        Some(proxy) => format!(
            "through the proxy {} (from {} in doctor's environment)",
            proxy.address, proxy.variable
        ),
        None => "directly (no proxy set in doctor's environment)".to_owned(),
    };
    let host = feed_host(feed.url());
    let network_fix = match &proxy {
        Some(proxy) => format!(
            "make sure the proxy {} lets this server reach {host} (HTTP status 407 means it \
             wants credentials: put them in {}); the service needs the same {} as doctor \
             (systemd: `Environment={}=...`)",
            proxy.address, proxy.variable, proxy.variable, proxy.variable
        ),
        None => format!(
            "allow outbound connections from this server to {host} in the firewall (and in \
             the antivirus web filter); if the network requires a proxy, set HTTPS_PROXY for \
             the service (systemd: `Environment=HTTPS_PROXY=http://proxy:3128`). Until then, \
             copy releases into the inbox by hand"
        ),
    };
    let manifest = match tokio::time::timeout(FEED_TIMEOUT, feed.manifest()).await {
        Err(_) => {
            return Finding::blocker(
                CHECK_FEED,
                format!(
                    "{} did not answer within {} s, tried {route}",
                    feed.url(),
                    FEED_TIMEOUT.as_secs()
                ),
                network_fix,
            );
        }
        Ok(Err(err)) => return feed_failure(&err, &route, network_fix),
        Ok(Ok(manifest)) => manifest,
    };
    let platform = current_platform();
    let reached = format!("{} reached {route}, manifest verified", feed.url());
    match manifest.newest(ReleaseKind::Server, &platform) {
        None => Finding::warning(
            CHECK_FEED,
            format!("{reached}, but it lists no server release for {platform}"),
            "check feed.url points at the feed for this product, and ask the vendor for a \
             server build for this platform",
        ),
        Some(newest) => {
            let verdict = match installed {
                Some(installed) if newest.version > *installed => {
                    format!("newer than the installed {installed}: a changeover can start")
                }
                Some(installed) => format!("the installed {installed} is up to date"),
                None => "the installed version is unknown".to_owned(),
            };
            Finding::ok(
                CHECK_FEED,
                format!(
                    "{reached}; newest server release {} for {platform}, {verdict}",
                    newest.version
                ),
            )
        }
    }
}

fn feed_failure(err: &FeedError, route: &str, network_fix: String) -> Finding {
    match err {
        FeedError::Unreachable { reason, .. } if reason.contains("certificate") => {
            Finding::blocker(
                CHECK_FEED,
                format!("{err}, tried {route}"),
                "the feed's TLS certificate is not trusted here: a TLS-inspecting proxy or \
                 antivirus web filter usually causes this. Exempt the feed's host from \
                 inspection, or add the inspecting CA to the system's trusted certificates",
            )
        }
        FeedError::Unreachable { .. } => {
            Finding::blocker(CHECK_FEED, format!("{err}, tried {route}"), network_fix)
        }
        FeedError::Status { status: 404, .. } => Finding::blocker(
            CHECK_FEED,
            err.to_string(),
            "correct feed.url: it must name the folder holding manifest.json",
        ),
        FeedError::Status {
            status: 403 | 407, ..
        } => Finding::blocker(CHECK_FEED, format!("{err}, tried {route}"), network_fix),
        FeedError::Status { .. } | FeedError::TooLarge { .. } => Finding::blocker(
            CHECK_FEED,
            format!("{err}, tried {route}"),
            "the feed's web server does not serve the manifest: try again later, and tell the \
             vendor if it persists",
        ),
        FeedError::Refused(_) => Finding::blocker(
            CHECK_FEED,
            err.to_string(),
            "feed.public_key must be the key the vendor signs this feed with; if it is, \
             something between here and the feed (a proxy or captive portal) changed the \
             answer",
        ),
        FeedError::BadUrl { .. } => Finding::blocker(
            CHECK_FEED,
            err.to_string(),
            "correct feed.url: the http:// or https:// address of the vendor's feed folder",
        ),
    }
}

fn feed_host(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or("the feed's host");
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// The proxy the feed's requests go through, as reqwest picks it from the environment.
#[derive(Debug, PartialEq, Eq)]
struct Proxy {
    variable: &'static str,
    /// Credentials are hidden.
    address: String,
}

fn proxy_for(url: &reqwest::Url) -> Option<Proxy> {
    proxy_from(url, |name| std::env::var(name).ok())
}

fn proxy_from(url: &reqwest::Url, lookup: impl Fn(&str) -> Option<String>) -> Option<Proxy> {
    let variables: &[&'static str] = if url.scheme() == "https" {
        &["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
    } else {
        &["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
    };
    let (variable, value) = variables.iter().find_map(|variable| {
        lookup(variable)
            .filter(|value| !value.trim().is_empty())
            .map(|value| (*variable, value))
    })?;
    let mut address = hide_credentials(value.trim());
    if let Some(no_proxy) = ["NO_PROXY", "no_proxy"]
        .into_iter()
        .find_map(|name| lookup(name).filter(|value| !value.trim().is_empty()))
    {
        let _ = write!(address, ", NO_PROXY={no_proxy}");
    }
    Some(Proxy { variable, address })
}

/// `http://user:secret@proxy:3128` becomes `http://***@proxy:3128`: the report may be
/// pasted into a ticket.
fn hide_credentials(address: &str) -> String {
    let (scheme, rest) = match address.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), address),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}***{}", &rest[at..]),
        None => address.to_owned(),
    }
}

// ---- 8. mail ------------------------------------------------------------------------------

/// Reads `[mail] smtp_url` from the config text.
fn mail_setting(config_text: &str, config_file: &Path) -> MailSetting {
    let Ok(table) = toml::from_str::<toml::Table>(config_text) else {
        return MailSetting::ConfigUnreadable;
    };
    let Some(mail) = table.get("mail") else {
        return MailSetting::NotConfigured {
            config_file: config_file.to_owned(),
        };
    };
    let invalid = |reason: String| MailSetting::Invalid {
        reason,
        config_file: config_file.to_owned(),
    };
    match mail.get("smtp_url") {
        None => invalid("[mail] has no smtp_url".to_owned()),
        Some(toml::Value::String(url)) => match smtp_address(url) {
            Ok((host, port)) => MailSetting::Smtp { host, port },
            Err(reason) => invalid(reason),
        },
        Some(_) => invalid("mail.smtp_url is not a string".to_owned()),
    }
}

/// Host and port of an `smtp://` or `smtps://` URL. Default ports as lettre's URLs have them:
/// 465 for `smtps://` (TLS from the start), 587 for `smtp://…?tls=required` or
/// `?tls=opportunistic` (STARTTLS submission), 25 for plain `smtp://`.
fn smtp_address(url: &str) -> Result<(String, u16), String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|err| format!("mail.smtp_url is not a URL ({err})"))?;
    let default_port = match parsed.scheme() {
        "smtps" => 465,
        "smtp" => {
            let starttls = parsed.query_pairs().any(|(key, value)| {
                key == "tls" && matches!(&*value, "required" | "opportunistic")
            });
            if starttls { 587 } else { 25 }
        }
        other => {
            return Err(format!(
                "mail.smtp_url has the scheme {other}://; use smtp:// or smtps://"
            ));
        }
    };
    // IPv6 addresses come in brackets, which a socket address does not take.
    let host = parsed
        .host_str()
        .map(|host| host.trim_start_matches('[').trim_end_matches(']'))
        .filter(|host| !host.is_empty())
        .ok_or_else(|| "mail.smtp_url names no host".to_owned())?
        .to_owned();
    Ok((host, parsed.port().unwrap_or(default_port)))
}

async fn check_mail(setting: &MailSetting) -> Finding {
    let (host, port) = match setting {
        MailSetting::NotConfigured { config_file } => {
            return Finding::warning(
                CHECK_MAIL,
                "no mail configured: nobody is told by mail when a changeover ends",
                format!(
                    "add a [mail] section with smtp_url (such as \
                     \"smtp://mail.example.com:587?tls=required\") to {}",
                    config_file.display()
                ),
            );
        }
        MailSetting::ConfigUnreadable => {
            return Finding::warning(
                CHECK_MAIL,
                "not checked: the config cannot be read",
                "fix the config first, then run doctor again",
            );
        }
        MailSetting::Invalid {
            reason,
            config_file,
        } => {
            return Finding::warning(
                CHECK_MAIL,
                reason.clone(),
                format!(
                    "set smtp_url in the [mail] section of {} to smtp://host[:port] or \
                     smtps://host[:port]",
                    config_file.display()
                ),
            );
        }
        MailSetting::Smtp { host, port } => (host, *port),
    };
    let connected = tokio::time::timeout(
        SMTP_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await;
    let reason = match connected {
        Ok(Ok(_stream)) => {
            return Finding::ok(
                CHECK_MAIL,
                format!(
                    "the SMTP server {host}:{port} accepts connections (nothing was sent, no \
                     login tried)"
                ),
            );
        }
        Ok(Err(err)) => err.to_string(),
        Err(_) => format!("no answer within {} s", SMTP_TIMEOUT.as_secs()),
    };
    Finding::warning(
        CHECK_MAIL,
        format!(
            "cannot reach the SMTP server {host}:{port} ({reason}); a changeover is not held \
             up by it (the mail waits in the outbox)"
        ),
        format!(
            "allow outbound TCP from this server to {host}:{port} in the firewall, or correct \
             mail.smtp_url"
        ),
    )
}

// ---- helpers ------------------------------------------------------------------------------

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path).is_ok_and(|metadata| metadata.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::release_tools::{self, KeygenOptions, PackOptions};

    /// A product folder made by hand: an installed release 1.0.0 with a vendor key and the
    /// default config. The secret key lies outside the product folder.
    struct Product {
        dir: tempfile::TempDir,
        secret_key: PathBuf,
    }

    impl Product {
        fn new() -> Product {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("product");
            let install = root.join("server");
            std::fs::create_dir_all(install.join("bin")).unwrap();
            std::fs::create_dir_all(install.join("config")).unwrap();
            std::fs::create_dir_all(root.join("state/inbox")).unwrap();
            let info = ReleaseInfo {
                product: "changeover".to_owned(),
                kind: ReleaseKind::Server,
                version: semver::Version::new(1, 0, 0),
                platform: current_platform(),
                notes: String::new(),
                date: "2026-01-01T00:00:00Z".to_owned(),
            };
            std::fs::write(
                install.join("release.json"),
                serde_json::to_vec_pretty(&info).unwrap(),
            )
            .unwrap();
            let binary = install.join("bin/changeover-server");
            std::fs::write(&binary, "#!/bin/sh\nexit 0\n").unwrap();
            std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::write(
                install.join("config/changeover.toml"),
                crate::config::DEFAULT_CONFIG,
            )
            .unwrap();
            let secret_key = dir.path().join("vendor.key");
            release_tools::keygen(&KeygenOptions {
                secret_key: secret_key.clone(),
                public_key: install.join("config/vendor.pub"),
                password: None,
                force: false,
            })
            .unwrap();
            Product { dir, secret_key }
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("product")
        }

        fn config_file(&self) -> PathBuf {
            self.root().join("server/config/changeover.toml")
        }

        fn append_config(&self, text: &str) {
            let mut config = std::fs::read_to_string(self.config_file()).unwrap();
            config.push_str(text);
            std::fs::write(self.config_file(), config).unwrap();
        }
    }

    fn status_of(findings: &[Finding], check: &str) -> Status {
        find(findings, check).status
    }

    fn find<'a>(findings: &'a [Finding], check: &str) -> &'a Finding {
        findings
            .iter()
            .find(|finding| finding.check == check)
            .unwrap_or_else(|| panic!("no {check} finding in {findings:#?}"))
    }

    /// Every file and folder under `dir`, to prove doctor leaves nothing behind.
    fn listing(dir: &Path) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = walkdir::WalkDir::new(dir)
            .into_iter()
            .map(|item| item.unwrap().into_path())
            .collect();
        paths.sort();
        paths
    }

    #[tokio::test]
    async fn a_healthy_folder_without_feed_has_only_warnings() {
        let product = Product::new();
        let before = listing(&product.root());
        let findings = examine(&product.root()).await.unwrap();
        assert_eq!(
            listing(&product.root()),
            before,
            "doctor changed the folder"
        );

        let expected = [
            (CHECK_INSTALL, Status::Ok),
            // The test binary runs doctor, not the installed one.
            (CHECK_BINARY, Status::Warning),
            (CHECK_RIGHTS, Status::Ok),
            (CHECK_EXECUTE, Status::Ok),
            (CHECK_SWAP, Status::Ok),
            (CHECK_FILESYSTEMS, Status::Ok),
            (CHECK_LEFTOVERS, Status::Ok),
            (CHECK_SPACE, Status::Ok),
            (CHECK_CONFIG, Status::Ok),
            (CHECK_VENDOR_KEY, Status::Ok),
            (CHECK_FEED, Status::Warning),
            (CHECK_MAIL, Status::Warning),
        ];
        for (check, status) in expected {
            assert_eq!(
                status_of(&findings, check),
                status,
                "{check}: {findings:#?}"
            );
        }
        let user = if rustix::process::getuid().is_root() {
            Status::Warning
        } else {
            Status::Ok
        };
        assert_eq!(status_of(&findings, CHECK_USER), user);
        assert!(
            find(&findings, CHECK_INSTALL)
                .detail
                .contains("release 1.0.0")
        );
        assert!(
            find(&findings, CHECK_BINARY)
                .fix
                .as_deref()
                .unwrap()
                .contains("server/bin/changeover-server")
        );
        assert!(find(&findings, CHECK_FEED).detail.contains("inbox"));
        for finding in &findings {
            assert_eq!(
                finding.fix.is_some(),
                finding.status != Status::Ok,
                "{finding:?}"
            );
        }
        assert!(!blocks_changeover(&findings));

        let report = render(&findings);
        assert_eq!(
            report.lines().count(),
            findings.len() + count_fixes(&findings) + 1
        );
        assert!(report.contains("WARN  feed"), "{report}");
        assert!(report.contains("ok    vendor key"), "{report}");
        assert!(report.contains("  fix: "), "{report}");
        assert!(
            report.trim_end().ends_with("a changeover would work"),
            "{report}"
        );
    }

    fn count_fixes(findings: &[Finding]) -> usize {
        findings
            .iter()
            .filter(|finding| finding.fix.is_some())
            .count()
    }

    #[tokio::test]
    async fn a_missing_vendor_key_blocks() {
        let product = Product::new();
        std::fs::remove_file(product.root().join("server/config/vendor.pub")).unwrap();
        let findings = examine(&product.root()).await.unwrap();
        let key = find(&findings, CHECK_VENDOR_KEY);
        assert_eq!(key.status, Status::Blocker, "{key:?}");
        assert!(key.detail.contains("vendor.pub"), "{key:?}");
        assert!(
            key.fix.as_deref().unwrap().contains("vendor.pub"),
            "{key:?}"
        );
        assert!(blocks_changeover(&findings));
        let report = render(&findings);
        assert!(report.contains("FAIL  vendor key"), "{report}");
        assert!(report.contains("a changeover would fail"), "{report}");
    }

    #[tokio::test]
    async fn with_a_feed_url_but_no_key_the_feed_is_not_fetched() {
        let product = Product::new();
        std::fs::remove_file(product.root().join("server/config/vendor.pub")).unwrap();
        set_feed_url(&product, "http://127.0.0.1:9/");
        let findings = examine(&product.root()).await.unwrap();
        assert_eq!(status_of(&findings, CHECK_VENDOR_KEY), Status::Blocker);
        assert_eq!(status_of(&findings, CHECK_FEED), Status::Warning);
    }

    #[test]
    fn free_space_is_weighed_per_filesystem_against_what_goes_there() {
        let mib = 1024 * 1024;
        let room = |free: Result<u64, String>, needs: &[u64]| Room {
            shown: PathBuf::from("/srv/product"),
            free,
            needs: needs
                .iter()
                .map(|bytes| Need {
                    what: "x",
                    bytes: *bytes,
                })
                .collect(),
        };
        // One filesystem holding both the download and the unpacked release.
        let needed = 200 * mib + SPACE_MARGIN;
        let both = [room(Ok(needed), &[100 * mib, 100 * mib])];
        assert_eq!(space_finding(&both).status, Status::Ok);
        let short = space_finding(&[room(Ok(needed - 1), &[100 * mib, 100 * mib])]);
        assert_eq!(short.status, Status::Blocker);
        assert!(short.detail.contains("264 MiB"), "{short:?}");
        assert!(short.fix.unwrap().contains("/srv/product"));
        // Two filesystems: each must hold its own part; one short blocks.
        let apart = [
            room(Ok(100 * mib + SPACE_MARGIN), &[100 * mib]),
            room(Ok(10 * mib), &[100 * mib]),
        ];
        assert_eq!(space_finding(&apart).status, Status::Blocker);
        // Unknown free space is a warning, not a blocker.
        let unknown = [room(Err("no statvfs".to_owned()), &[mib])];
        assert_eq!(space_finding(&unknown).status, Status::Warning);
        // An empty install still needs the margin.
        assert_eq!(space_finding(&[room(Ok(0), &[0])]).status, Status::Blocker);
    }

    #[tokio::test]
    async fn a_missing_install_blocks_and_nothing_is_created() {
        let product = Product::new();
        std::fs::remove_dir_all(product.root().join("server")).unwrap();
        let findings = examine(&product.root()).await.unwrap();
        assert_eq!(status_of(&findings, CHECK_INSTALL), Status::Blocker);
        assert!(!product.root().join("server").exists());

        let nowhere = product.dir.path().join("nowhere");
        let findings = examine(&nowhere).await.unwrap();
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].status, Status::Blocker);
        assert!(!nowhere.exists(), "doctor created the product folder");
    }

    #[tokio::test]
    async fn an_unfinished_changeover_is_a_warning() {
        let product = Product::new();
        std::fs::create_dir(product.root().join("server_old")).unwrap();
        std::fs::write(product.root().join("state/changeover.json"), "{}").unwrap();
        let findings = examine(&product.root()).await.unwrap();
        let leftovers = find(&findings, CHECK_LEFTOVERS);
        assert_eq!(leftovers.status, Status::Warning, "{leftovers:?}");
        assert!(leftovers.detail.contains("server_old"), "{leftovers:?}");
        assert!(
            leftovers.detail.contains("changeover.json"),
            "{leftovers:?}"
        );
        assert!(leftovers.fix.as_deref().unwrap().contains("run --root"));
    }

    #[tokio::test]
    async fn broken_and_unknown_config_keys() {
        let product = Product::new();
        product.append_config("\n[server]\nheartbeat_secs = 0\n");
        let findings = examine(&product.root()).await.unwrap();
        // A duplicate [server] table does not parse: the server would not start.
        assert_eq!(status_of(&findings, CHECK_CONFIG), Status::Blocker);

        std::fs::write(product.config_file(), "[server]\nheartbeat_secs = 0\n").unwrap();
        let findings = examine(&product.root()).await.unwrap();
        let config = find(&findings, CHECK_CONFIG);
        assert_eq!(config.status, Status::Blocker, "{config:?}");
        assert!(config.detail.contains("heartbeat_secs"), "{config:?}");

        std::fs::write(product.config_file(), "[feed]\nurll = \"x\"\n").unwrap();
        let findings = examine(&product.root()).await.unwrap();
        let config = find(&findings, CHECK_CONFIG);
        assert_eq!(config.status, Status::Warning, "{config:?}");
        assert!(config.detail.contains("feed.urll"), "{config:?}");
    }

    #[tokio::test]
    async fn smtp_is_a_warning_at_worst() {
        let product = Product::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = std::fs::read_to_string(product.config_file()).unwrap();
        let with_mail = config.replace(
            "# smtp_url = \"smtp://127.0.0.1:25\"",
            &format!("smtp_url = \"smtp://127.0.0.1:{port}\""),
        );
        assert_ne!(config, with_mail, "the default config documents smtp_url");
        std::fs::write(product.config_file(), with_mail).unwrap();
        let findings = examine(&product.root()).await.unwrap();
        let mail = find(&findings, CHECK_MAIL);
        assert_eq!(mail.status, Status::Ok, "{mail:?}");
        assert_eq!(status_of(&findings, CHECK_CONFIG), Status::Ok);

        drop(listener);
        let findings = examine(&product.root()).await.unwrap();
        let mail = find(&findings, CHECK_MAIL);
        assert_eq!(mail.status, Status::Warning, "{mail:?}");
        assert!(mail.detail.contains("outbox"), "{mail:?}");
        assert!(!blocks_changeover(&findings));
    }

    #[test]
    fn smtp_urls_take_the_usual_default_ports() {
        let address = |url: &str| smtp_address(url).unwrap();
        assert_eq!(
            address("smtp://mail.example.com"),
            ("mail.example.com".to_owned(), 25)
        );
        assert_eq!(
            address("smtp://user:secret@mail.example.com?tls=required"),
            ("mail.example.com".to_owned(), 587)
        );
        assert_eq!(
            address("smtps://mail.example.com"),
            ("mail.example.com".to_owned(), 465)
        );
        assert_eq!(
            address("smtps://mail.example.com:2465"),
            ("mail.example.com".to_owned(), 2465)
        );
        assert_eq!(address("smtp://[::1]:2525"), ("::1".to_owned(), 2525));
        assert!(smtp_address("https://mail.example.com").is_err());
        assert!(smtp_address("mail.example.com:25").is_err());

        let file = Path::new("changeover.toml");
        assert!(matches!(
            mail_setting("[mail]\n", file),
            MailSetting::Invalid { .. }
        ));
        assert!(matches!(
            mail_setting("[server]\n", file),
            MailSetting::NotConfigured { .. }
        ));
    }

    #[test]
    fn the_proxy_is_named_without_its_password() {
        let https: reqwest::Url = "https://updates.example.com/feed/".parse().unwrap();
        let http: reqwest::Url = "http://updates.example.com/feed/".parse().unwrap();
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| (*value).to_owned())
            }
        };
        let vars = env(&[
            ("https_proxy", "http://alice:secret@proxy.corp:3128"),
            ("HTTP_PROXY", "http://plain.corp:8080"),
        ]);
        assert_eq!(
            proxy_from(&https, vars),
            Some(Proxy {
                variable: "https_proxy",
                address: "http://***@proxy.corp:3128".to_owned()
            })
        );
        assert_eq!(
            proxy_from(&http, vars).unwrap().address,
            "http://plain.corp:8080"
        );
        assert_eq!(proxy_from(&https, env(&[])), None);
        let with_exceptions = env(&[("ALL_PROXY", "proxy:3128"), ("NO_PROXY", "localhost")]);
        assert_eq!(
            proxy_from(&https, with_exceptions).unwrap().address,
            "proxy:3128, NO_PROXY=localhost"
        );
        assert_eq!(hide_credentials("bob@proxy:3128"), "***@proxy:3128");
    }

    #[tokio::test]
    async fn an_unreachable_feed_blocks_with_a_firewall_fix() {
        let product = Product::new();
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        set_feed_url(&product, &format!("http://127.0.0.1:{port}/feed/"));
        let findings = examine(&product.root()).await.unwrap();
        let feed = find(&findings, CHECK_FEED);
        assert_eq!(feed.status, Status::Blocker, "{feed:?}");
        assert!(
            feed.fix.as_deref().unwrap().contains("firewall")
                || feed.fix.as_deref().unwrap().contains("proxy"),
            "{feed:?}"
        );
        assert!(blocks_changeover(&findings));
    }

    #[tokio::test]
    async fn a_reachable_feed_reports_the_newer_release() {
        let product = Product::new();
        let feed_dir = product.dir.path().join("feed");
        let tree = product.dir.path().join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/changeover-server"), "#!/bin/sh\nexit 0\n").unwrap();
        release_tools::pack(&PackOptions {
            kind: ReleaseKind::Server,
            version: semver::Version::new(2, 0, 0),
            from: tree,
            secret_key: product.secret_key.clone(),
            password: None,
            feed: feed_dir.clone(),
            platform: current_platform(),
            notes: String::new(),
        })
        .unwrap();
        let address = serve_folder(feed_dir).await;
        set_feed_url(&product, &format!("http://{address}/"));
        let findings = examine(&product.root()).await.unwrap();
        let feed = find(&findings, CHECK_FEED);
        assert_eq!(feed.status, Status::Ok, "{feed:?}");
        assert!(feed.detail.contains("2.0.0"), "{feed:?}");
        assert!(
            feed.detail.contains("newer than the installed 1.0.0"),
            "{feed:?}"
        );
    }

    fn set_feed_url(product: &Product, url: &str) {
        let text = std::fs::read_to_string(product.config_file())
            .unwrap()
            .replace(
                "# url = \"https://updates.example.com/changeover/\"",
                &format!("url = \"{url}\""),
            );
        std::fs::write(product.config_file(), text).unwrap();
    }

    /// A minimal static web server: `GET /name` answers the file `name` from `dir`.
    async fn serve_folder(dir: PathBuf) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let dir = dir.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 1024];
                    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => request.extend_from_slice(&buffer[..read]),
                        }
                    }
                    let request = String::from_utf8_lossy(&request);
                    let path = request.split_whitespace().nth(1).unwrap_or("/");
                    let name = path.trim_start_matches('/');
                    let response = match std::fs::read(dir.join(name)) {
                        Ok(body) if !name.contains("..") && !name.is_empty() => {
                            let mut response = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            response.extend_from_slice(&body);
                            response
                        }
                        _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            .to_vec(),
                    };
                    let _ = stream.write_all(&response).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        address
    }
}
