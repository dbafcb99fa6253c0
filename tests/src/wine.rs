//! The Windows build (`x86_64-pc-windows-gnu`) run under Wine, for end-to-end tests that
//! mix Windows and Linux processes on this machine.
//!
//! [`windows_binaries`] cross-builds the server and the agent once per test process, and
//! the `bcryptprimitives.dll` shim from `packaging/wine` that Rust programs need under
//! Wine 8 (it lacks `ProcessPrng`). [`Wine`] is a fresh Wine prefix of one test, killed with
//! everything running in it when dropped. Wine maps the Linux root to drive `Z:`, so the
//! Windows programs get paths from [`windows_path`].

use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use crate::{ADMIN_PASSWORD, Process};

/// The Rust target of the Windows build.
pub const TARGET: &str = "x86_64-pc-windows-gnu";

/// The mingw-w64 C compiler for that target (the linker too).
const MINGW_GCC: &str = "x86_64-w64-mingw32-gcc";

/// How long a fresh prefix may take to boot, or a reboot, or a `wineserver -w`.
const BOOT_PATIENCE: Duration = Duration::from_secs(90);

/// The Windows binaries, built for [`TARGET`], and the shim DLL they need under Wine.
#[derive(Debug)]
pub struct WindowsBuild {
    pub server: PathBuf,
    pub agent: PathBuf,
    /// `bcryptprimitives.dll`, to be placed beside each `.exe` (see [`install_exe`]).
    pub shim_dll: PathBuf,
}

/// One of the two Windows programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exe {
    Server,
    Agent,
}

impl WindowsBuild {
    pub fn exe(&self, which: Exe) -> &Path {
        match which {
            Exe::Server => &self.server,
            Exe::Agent => &self.agent,
        }
    }
}

/// A program on `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The 64-bit Wine loader: `wine64` on `PATH`, or where Debian's `wine64` package keeps it
/// (it puts only the `wine` wrapper on `PATH`).
fn wine64() -> Option<PathBuf> {
    on_path("wine64").or_else(|| {
        let debian = PathBuf::from("/usr/lib/wine/wine64");
        debian.is_file().then_some(debian)
    })
}

/// `wineserver` on `PATH`, or beside Debian's loader.
fn wineserver() -> Option<PathBuf> {
    on_path("wineserver").or_else(|| {
        let debian = PathBuf::from("/usr/lib/wine/wineserver");
        debian.is_file().then_some(debian)
    })
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether the Rust standard library for [`TARGET`] is installed (by `rustup target add`).
fn rust_target_installed() -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(output) = Command::new(rustc)
        .current_dir(workspace())
        .args(["--print", "sysroot"])
        .output()
    else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    output.status.success()
        && Path::new(&sysroot)
            .join("lib/rustlib")
            .join(TARGET)
            .join("lib")
            .is_dir()
}

/// Panics naming what is missing to build and run the Windows binaries here.
fn require_tools() {
    let mut missing = Vec::new();
    if wine64().is_none() || wineserver().is_none() {
        missing.push("wine64 (Debian package wine64)");
    }
    if on_path(MINGW_GCC).is_none() {
        missing.push("x86_64-w64-mingw32-gcc (Debian package mingw-w64)");
    }
    if !rust_target_installed() {
        missing.push(
            "the Rust target x86_64-pc-windows-gnu (rustup target add x86_64-pc-windows-gnu)",
        );
    }
    assert!(
        missing.is_empty(),
        "the Windows tests need {}; run scripts/test once, which installs them",
        missing.join(", ")
    );
}

/// The Windows server and agent, cross-built on first use into the target folder this test
/// binary came from (same profile), and the shim DLL compiled beside them.
pub fn windows_binaries() -> &'static WindowsBuild {
    static BUILD: OnceLock<WindowsBuild> = OnceLock::new();
    BUILD.get_or_init(|| {
        require_tools();
        let profile_dir = crate::profile_dir();
        let target_dir = profile_dir
            .parent()
            .expect("the profile folder is inside the target folder");
        let release = profile_dir
            .file_name()
            .is_some_and(|name| name == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.current_dir(workspace()).args([
            "build",
            "--quiet",
            "--target",
            TARGET,
            "-p",
            "changeover-server",
            "-p",
            "changeover-agent",
        ]);
        if release {
            build.arg("--release");
        }
        // cargo's lock on the target folder keeps parallel test binaries from racing here.
        build.env("CARGO_TARGET_DIR", target_dir);
        let linker_env = "CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER";
        if std::env::var_os(linker_env).is_none() {
            build.env(linker_env, MINGW_GCC);
        }
        let status = build.status().expect("cargo runs");
        assert!(
            status.success(),
            "building the Windows binaries ({TARGET}) failed"
        );

        let out_dir = target_dir
            .join(TARGET)
            .join(if release { "release" } else { "debug" });
        let server = out_dir.join("changeover-server.exe");
        let agent = out_dir.join("changeover-agent.exe");
        for exe in [&server, &agent] {
            assert!(exe.is_file(), "{} was not built", exe.display());
        }
        let shim_dll = out_dir.join("bcryptprimitives.dll");
        build_shim_dll(&shim_dll);
        WindowsBuild {
            server,
            agent,
            shim_dll,
        }
    })
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Compiles `packaging/wine/bcryptprimitives.{c,def}` into `dll` unless it is up to date;
/// written under a temporary name and renamed, so parallel test binaries never see half a
/// DLL.
fn build_shim_dll(dll: &Path) {
    let sources_dir = workspace().join("packaging/wine");
    let sources = [
        sources_dir.join("bcryptprimitives.c"),
        sources_dir.join("bcryptprimitives.def"),
    ];
    let newest_source = sources
        .iter()
        .map(|source| modified(source).unwrap_or_else(|| panic!("{} is missing", source.display())))
        .max()
        .expect("two sources");
    if modified(dll).is_some_and(|built| built >= newest_source) {
        return;
    }
    let temporary = dll.with_extension(format!("dll.{}.tmp", std::process::id()));
    let output = Command::new(MINGW_GCC)
        .arg("-shared")
        .arg("-o")
        .arg(&temporary)
        .args(&sources)
        .arg("-ladvapi32")
        .output()
        .expect("x86_64-w64-mingw32-gcc runs");
    assert!(
        output.status.success(),
        "compiling the ProcessPrng shim failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::rename(&temporary, dll).expect("the shim DLL is moved into place");
}

/// Copies the program and the shim DLL into `dir` (made if missing); returns the `.exe`.
/// Wine, like Windows, looks for a DLL beside the program first.
pub fn install_exe(build: &WindowsBuild, which: Exe, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("install folder");
    let source = build.exe(which);
    let exe = dir.join(source.file_name().expect("an exe has a name"));
    std::fs::copy(source, &exe).expect("exe copied");
    std::fs::copy(&build.shim_dll, dir.join("bcryptprimitives.dll")).expect("DLL copied");
    exe
}

/// The path Windows programs under Wine see for `path`: Wine maps `/` to drive `Z:`.
pub fn windows_path(path: &Path) -> String {
    assert!(
        path.is_absolute(),
        "{} must be absolute to name it on Z:",
        path.display()
    );
    format!("Z:{}", path.display()).replace('/', "\\")
}

/// Runs `command`, panicking with its output if it fails or takes longer than `patience`.
fn run_within(mut command: Command, patience: Duration, what: &str) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("{what}: cannot start: {err}"));
    let output = wait_output_within(child, patience)
        .unwrap_or_else(|| panic!("{what}: still running after {patience:?}"));
    assert!(
        output.status.success(),
        "{what} failed with {}:\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `command` with piped output; `None` (and killed) if it takes longer than
/// `patience`.
pub fn output_within(mut command: Command, patience: Duration) -> Option<Output> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the program starts");
    wait_output_within(child, patience)
}

/// Collects a child's output, or kills it and returns `None` after `patience`.
fn wait_output_within(child: Child, patience: Duration) -> Option<Output> {
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    match done_rx.recv_timeout(patience) {
        Ok(output) => Some(output.expect("waiting for a child works")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            None
        }
    }
}

/// A Wine prefix of its own (a "Windows machine"), in a temporary folder. Dropping it kills
/// its `wineserver` and with it every Windows process still running in it.
#[derive(Debug)]
pub struct Wine {
    dir: tempfile::TempDir,
    prefix: PathBuf,
    wine64: PathBuf,
    wineserver: PathBuf,
}

impl Wine {
    /// Creates and boots a fresh prefix (`wineboot --init`), and waits until it is idle.
    /// The first boot takes some seconds.
    #[expect(
        clippy::new_without_default,
        reason = "booting a Wine prefix is too much for a Default"
    )]
    pub fn new() -> Wine {
        require_tools();
        let dir = tempfile::Builder::new()
            .prefix("changeover-wine-")
            .tempdir()
            .expect("temporary folder");
        let prefix = dir.path().join("prefix");
        let wine = Wine {
            prefix,
            dir,
            wine64: wine64().expect("checked"),
            wineserver: wineserver().expect("checked"),
        };
        let mut boot = wine.command(Path::new("wineboot"));
        boot.arg("--init");
        run_within(boot, BOOT_PATIENCE, "wineboot --init");
        wine.wait_idle();
        wine
    }

    /// The prefix folder (`WINEPREFIX`).
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// A scratch folder beside the prefix, removed with it.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    fn environment(&self, command: &mut Command) {
        command
            .env("WINEPREFIX", &self.prefix)
            .env("WINEARCH", "win64")
            .env("WINEDEBUG", "-all")
            // No .NET or Gecko installers, no desktop menu entries.
            .env("WINEDLLOVERRIDES", "mscoree,mshtml=;winemenubuilder.exe=d")
            .env("NO_COLOR", "1")
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY");
    }

    /// `wine64 <exe>` in this prefix; add the program's arguments. `exe` is a Linux path to
    /// a `.exe` (or the name of one of Wine's own programs, such as `wineboot`).
    pub fn command(&self, exe: &Path) -> Command {
        let mut command = Command::new(&self.wine64);
        command.arg(exe);
        self.environment(&mut command);
        command
    }

    /// `wineserver <args>` for this prefix.
    fn wineserver(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.wineserver);
        command.args(args);
        self.environment(&mut command);
        command
    }

    /// Waits until every process of the prefix has exited (`wineserver -w`).
    pub fn wait_idle(&self) {
        run_within(self.wineserver(&["-w"]), BOOT_PATIENCE, "wineserver -w");
    }

    /// Restarts the "machine" (`wineboot -r`) and waits until it is idle again. Programs
    /// still running keep the prefix from becoming idle: stop them first.
    pub fn reboot(&self) {
        let mut reboot = self.command(Path::new("wineboot"));
        reboot.arg("-r");
        run_within(reboot, BOOT_PATIENCE, "wineboot -r");
        self.wait_idle();
    }

    /// Kills every process of the prefix (`wineserver -k`).
    pub fn kill_all(&self) {
        let mut kill = self.wineserver(&["-k"]);
        kill.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Ok(child) = kill.spawn() {
            let _ = wait_output_within(child, Duration::from_secs(20));
        }
    }

    /// A program that runs until dropped (`cmd` waiting on its input). Wine ends its
    /// services once no other program of the prefix runs; a Windows machine keeps them
    /// running, and so does this.
    pub fn keep_services_running(&self) -> Process {
        let log = self.scratch().join("keeper.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut command = self.command(Path::new("cmd"));
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log_file);
        Process::from_child(command.spawn().expect("wine64 starts"), log)
    }

    /// Runs one of Wine's own programs (`sc`, say) with `args`; its output.
    pub fn tool(&self, program: &str, args: &[&str]) -> Output {
        let mut command = self.command(Path::new(program));
        command.args(args);
        output_within(command, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{program} {args:?} did not end within 60 s"))
    }

    /// The Linux processes still alive in this prefix (the wineserver, Wine's own services,
    /// the programs): those whose environment names it. Exited processes not yet reaped
    /// show no environment and are not counted.
    pub fn live_processes(&self) -> Vec<(u32, String)> {
        let wanted = format!("WINEPREFIX={}", self.prefix.display());
        let own = std::process::id();
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return found;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == own {
                continue;
            }
            let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            if environ
                .split(|b| *b == 0)
                .any(|var| var == wanted.as_bytes())
            {
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                found.push((pid, cmdline.trim().to_owned()));
            }
        }
        found
    }
}

impl Drop for Wine {
    fn drop(&mut self) {
        self.kill_all();
        self.remove_server_dir();
    }
}

impl Wine {
    /// Removes what the wineserver of this prefix keeps outside it: a folder
    /// `server-<dev>-<inode>` (of the prefix, in hex) holding its lock, in a `wine-XXXXXX`
    /// folder of its own (Debian's Wine) or the shared `.wine-<uid>` (upstream's) under
    /// the temporary folder. Left alone, every test would leave one behind.
    fn remove_server_dir(&self) {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(prefix) = std::fs::metadata(&self.prefix) else {
            return;
        };
        let name = format!("server-{:x}-{:x}", prefix.dev(), prefix.ino());
        let mut temp_dirs = vec![std::env::temp_dir(), PathBuf::from("/tmp")];
        temp_dirs.dedup();
        for temp_dir in temp_dirs {
            let Ok(entries) = std::fs::read_dir(&temp_dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let file_name = entry.file_name();
                let file_name = file_name.to_string_lossy();
                if !(file_name.starts_with("wine-") || file_name.starts_with(".wine-")) {
                    continue;
                }
                let server_dir = entry.path().join(&name);
                if server_dir.is_dir() {
                    let _ = std::fs::remove_dir_all(&server_dir);
                    // Only when nothing else is in it (the shared folder may hold others).
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
    }
}

/// A Windows `changeover-server.exe run` under Wine.
#[derive(Debug)]
pub struct WindowsServer {
    /// The product folder, as a Linux path.
    pub root: PathBuf,
    pub address: SocketAddr,
    pub process: Process,
    /// Lines the server printed on stdout before it listened.
    pub stdout_lines: Vec<String>,
}

impl WindowsServer {
    /// Starts `exe run --root Z:\… --listen <listen>` (any free port when `None`) with the
    /// tests' admin password, and waits for its `listening on` line. Its log (stderr) goes
    /// to `<root>.server-wine-<n>.log`, `n` counting the starts for one root.
    /// A console start does not ask the service manager (only `run --as-service` does),
    /// so it is not held up by Wine's 10 s control-pipe timeout.
    pub fn start(wine: &Wine, exe: &Path, root: &Path, listen: Option<SocketAddr>) -> Self {
        WindowsServer::start_with_env(wine, exe, root, listen, &[])
    }

    /// [`WindowsServer::start`] with extra environment (the fault switch, say).
    pub fn start_with_env(
        wine: &Wine,
        exe: &Path,
        root: &Path,
        listen: Option<SocketAddr>,
        env: &[(&str, &str)],
    ) -> Self {
        let listen = listen.unwrap_or_else(|| "127.0.0.1:0".parse().expect("address"));
        let log = (0..)
            .map(|n| root.with_extension(format!("server-wine-{n}.log")))
            .find(|log| !log.exists())
            .expect("a free log name");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut command = wine.command(exe);
        command
            .args(["run", "--root", &windows_path(root)])
            .args(["--listen", &listen.to_string()])
            .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("RUST_LOG", "info,changeover_server=debug")
            .env_remove("CHANGEOVER_FAULT_AT")
            .env_remove("INVOCATION_ID")
            .env_remove("NOTIFY_SOCKET")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        let mut child = command.spawn().expect("wine64 starts");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut process = Process::from_child(child, log);
        let (address, stdout_lines) = wait_for_listening(&mut process, stdout);
        WindowsServer {
            root: root.to_owned(),
            address,
            process,
            stdout_lines,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.address)
    }
}

/// Reads `stdout` until the server's `listening on ws://ADDR` line; keeps draining it in a
/// thread afterwards, so the server never writes into a closed pipe.
fn wait_for_listening(
    process: &mut Process,
    stdout: impl std::io::Read + Send + 'static,
) -> (SocketAddr, Vec<String>) {
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = lines_tx.send(line);
        }
    });
    let mut lines = Vec::new();
    // Wine starts its services with the first program of a prefix: allow for that.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines_rx.recv_timeout(remaining) else {
            panic!(
                "the Windows server did not start listening (exit: {:?}); stdout: {lines:?}; log:\n{}",
                process.try_status(),
                process.log_text()
            );
        };
        let line = line.trim_end().to_owned();
        if let Some(url) = line.strip_prefix("listening on ") {
            let address = url
                .split("://")
                .nth(1)
                .and_then(|a| a.parse().ok())
                .expect("the listening line names an address");
            lines.push(line);
            return (address, lines);
        }
        lines.push(line);
    }
}

/// Starts the Windows `exe run --server URL --user USER --state-dir Z:\…` under Wine,
/// logging (stderr) to `state_dir/agent.log`.
pub fn start_agent(
    wine: &Wine,
    exe: &Path,
    url: &str,
    user: &str,
    state_dir: &Path,
    extra_args: &[&str],
) -> Process {
    std::fs::create_dir_all(state_dir).expect("state folder");
    let log = state_dir.join("agent.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let child = wine
        .command(exe)
        .args(["run", "--server", url, "--user", user, "--state-dir"])
        .arg(windows_path(state_dir))
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("wine64 starts");
    Process::from_child(child, log)
}

/// Runs the Windows `exe admin <args>` under Wine with `password` and returns its output.
pub fn admin(wine: &Wine, exe: &Path, args: &[&str], password: &str) -> Output {
    let child = wine
        .command(exe)
        .arg("admin")
        .args(args)
        .env("CHANGEOVER_ADMIN_PASSWORD", password)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wine64 starts");
    wait_output_within(child, Duration::from_secs(60)).expect("the admin command ends in time")
}

/// Runs the Windows `exe <args>` under Wine and returns its output.
pub fn run<S: AsRef<OsStr>>(wine: &Wine, exe: &Path, args: &[S]) -> Output {
    let child = wine
        .command(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wine64 starts");
    wait_output_within(child, Duration::from_secs(60)).expect("the program ends in time")
}

/// Waits for `process` to exit, at most `patience`; `None` if it still runs.
pub fn exit_within(process: &mut Process, patience: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(status) = process.try_status() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
