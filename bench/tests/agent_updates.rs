//! `agent-updates` end to end with a tiny fleet and payload: the releases pack, the server
//! offers the agent release, every client gets the whole file (SHA-256 checked), and the
//! report is well-formed. No timing is asserted.
//!
//! `CARGO_BIN_EXE_<name>` only names this package's binaries, so the server is built here
//! into the same target folder (a no-op when it is up to date).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use changeover_bench::agent_updates::{self, AgentUpdatesOptions, Check};

// target/<profile>/changeover-server, built first.
fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    // target/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_owned();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args(["build", "--quiet", "-p", "changeover-server"]);
    if profile_dir
        .file_name()
        .is_some_and(|name| name == "release")
    {
        build.arg("--release");
    }
    if let Some(target_dir) = profile_dir.parent() {
        build.env("CARGO_TARGET_DIR", target_dir);
    }
    assert!(
        build.status().expect("cargo runs").success(),
        "building changeover-server failed"
    );
    let server = profile_dir.join("changeover-server");
    assert!(server.exists(), "{} was not built", server.display());
    server
}

#[tokio::test]
async fn a_tiny_fleet_fetches_the_agent_update_from_the_server_and_the_baseline() {
    let work = tempfile::tempdir().unwrap();
    // Only packed, never run: a stand-in keeps the archive small.
    let agent_bin = work.path().join("changeover-agent");
    std::fs::write(&agent_bin, "#!/bin/sh\necho stand-in\n").unwrap();
    let options = AgentUpdatesOptions {
        server_bin: server_binary(),
        agent_bin,
        loadgen_bin: PathBuf::from(env!("CARGO_BIN_EXE_changeover-loadgen")),
        agents: 5,
        payload_kb: 1000,
        // Two slots for five agents: some may be told to come back (Retry-After 1 s).
        max_transfers: vec![2],
        check: Check::Sha256,
        single_stream_fetches: 2,
        patience: Duration::from_secs(60),
        keep: false,
    };
    let report = agent_updates::run(&options).await.unwrap();

    assert!(report.archive_bytes > 1_000_000, "{}", report.archive_bytes);
    assert!(report.single_stream > 0.0);
    let runs = std::iter::once(&report.raw_uncapped)
        .chain(report.capped.iter().flat_map(|(server, raw)| [server, raw]));
    for run in runs {
        let fleet = &run.fleet;
        assert_eq!(fleet.agents, 5, "{run:?}");
        assert_eq!(fleet.bytes, 5 * report.archive_bytes, "{run:?}");
        assert_eq!(fleet.broken, 0, "{run:?}");
        assert!(fleet.first_done <= fleet.median_done && fleet.median_done <= fleet.total);
        assert_eq!(
            fleet
                .timeline
                .iter()
                .map(|slice| slice.completed)
                .sum::<usize>(),
            5
        );
        assert!(
            run.server.rss_peak_kib > 0 && run.server.hwm_after_kib > 0,
            "{run:?}"
        );
    }
    let (server, raw) = &report.capped[0];
    assert_eq!(server.label, "changeover-server");
    assert_eq!(server.max_transfers, 2);
    assert_eq!(raw.fleet.rejections, 0, "the raw queue never answers 503");
    let table = agent_updates::summary_table(&report);
    // A header, its rule, and one row per run.
    assert_eq!(
        table.lines().filter(|line| line.starts_with('|')).count(),
        2 + 3
    );
}
