//! Smoke test of `changeover-loadgen scale`: every scenario at 20 agents against the real
//! binaries, checking only that it runs and that its results are well-formed. No timing is
//! asserted: CI machines are small and shared. The full runs are in BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const AGENTS: u64 = 20;

/// `target/<profile>`, where cargo put this test and the loadgen.
fn profile_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_changeover-loadgen"))
        .parent()
        .expect("the loadgen lives in target/<profile>")
        .to_owned()
}

/// The server and agent binaries, built into the same target folder first (only the
/// package that owns a binary gets `CARGO_BIN_EXE_<name>`).
fn workspace_binaries() -> (PathBuf, PathBuf) {
    let profile_dir = profile_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args([
            "build",
            "--quiet",
            "-p",
            "changeover-server",
            "-p",
            "changeover-agent",
        ]);
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
        "build failed"
    );
    (
        profile_dir.join("changeover-server"),
        profile_dir.join("changeover-agent"),
    )
}

fn nginx() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

fn number(value: &Value, what: &str) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {value}"))
}

fn check_fanout(fanout: &Value, what: &str) {
    assert_eq!(fanout["received"], AGENTS, "{what}: {fanout}");
    assert!(
        number(&fanout["reached"], what) >= AGENTS as f64,
        "{what}: {fanout}"
    );
    let p50 = number(&fanout["p50_ms"], what);
    let p99 = number(&fanout["p99_ms"], what);
    let max = number(&fanout["max_ms"], what);
    assert!(0.0 <= p50 && p50 <= p99 && p99 <= max, "{what}: {fanout}");
}

fn check_storm(storm: &Value, what: &str) {
    assert_eq!(storm["back"], AGENTS, "{what}: {storm}");
    let first = number(&storm["listening_to_first_back_ms"], what);
    let all = number(&storm["listening_to_all_back_ms"], what);
    assert!(first <= all, "{what}: {storm}");
    number(&storm["handshakes_per_s"], what);
    number(&storm["signal_to_exit_ms"], what);
}

#[test]
fn every_scale_scenario_runs_at_twenty_agents_and_reports_well_formed_results() {
    let (server_bin, agent_bin) = workspace_binaries();
    let folder = tempfile::tempdir().unwrap();
    let json = folder.path().join("scale.json");
    let output = Command::new(env!("CARGO_BIN_EXE_changeover-loadgen"))
        .arg("scale")
        .arg("--server-bin")
        .arg(&server_bin)
        .arg("--agent-bin")
        .arg(&agent_bin)
        .args(["--nginx-bin", nginx()])
        .args(["--agents", &AGENTS.to_string()])
        .args([
            "--broadcasts",
            "1",
            "--heartbeat-secs",
            "1",
            "--settle-ms",
            "50",
        ])
        .args(["--patience-secs", "60"])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let printed = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "scale failed\n{printed}");
    assert!(
        printed.contains("| agents |"),
        "no tables printed\n{printed}"
    );

    let results: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let sizes = results["sizes"].as_array().expect("sizes");
    assert_eq!(sizes.len(), 1);
    let size = &sizes[0];
    assert_eq!(size["agents"], AGENTS);

    // 1. Broadcast fan-out, raw and server, one broadcast each.
    for server in ["raw", "server"] {
        let fanouts = size["broadcast"][server].as_array().expect("broadcasts");
        assert_eq!(fanouts.len(), 1, "{server}");
        check_fanout(&fanouts[0], server);
    }
    // 2. Restart storms: the raw server's, and the changeover server's both ways.
    check_storm(&size["storm"]["raw"], "raw storm");
    let storms = size["storm"]["server"].as_array().expect("server storms");
    let policies: Vec<&str> = storms
        .iter()
        .map(|s| s["policy"].as_str().unwrap())
        .collect();
    assert_eq!(policies, ["at once", "like the agent"]);
    for storm in storms {
        check_storm(storm, "server storm");
    }
    // 3. The changeover with grace 0, both ways: committed, everybody back.
    let changeovers = size["changeover"].as_array().expect("changeovers");
    assert_eq!(changeovers.len(), 2);
    for changeover in changeovers {
        assert_eq!(changeover["outcome"], "committed", "{changeover}");
        assert_eq!(changeover["back"], AGENTS, "{changeover}");
        assert_eq!(changeover["disconnected"], AGENTS, "{changeover}");
        number(&changeover["downtime_ms"], "downtime_ms");
        let first = number(&changeover["first_logout_to_first_back_ms"], "first back");
        let all = number(&changeover["first_logout_to_all_back_ms"], "all back");
        assert!(first <= all, "{changeover}");
    }
    // 4. The slow reader: the others still got every broadcast; the server dropped it
    //    (heartbeat 1 s: two silent intervals).
    let slow = &size["slow_reader"];
    let fanouts = slow["broadcasts"]
        .as_array()
        .expect("slow reader broadcasts");
    assert_eq!(fanouts.len(), 1);
    check_fanout(&fanouts[0], "with a slow reader");
    assert!(number(&slow["rss_before_kib"], "rss") > 0.0);
    assert!(number(&slow["rss_after_kib"], "rss") > 0.0);
    number(&slow["dropped_after_ms"], "dropped_after_ms");
}
