//! The raw baseline as `idle-rss` runs it: a child process found by its "listening on"
//! line, measured through /proc, and gone once its guard is dropped.

use std::path::Path;

use changeover_bench::fleet::{self, FleetOptions};
use changeover_bench::procfs::{self, Pid};
use changeover_bench::server_process::ServerProcess;

#[tokio::test]
async fn the_raw_server_holds_a_fleet_and_dies_with_its_guard() {
    let loadgen = Path::new(env!("CARGO_BIN_EXE_changeover-loadgen"));
    let server = ServerProcess::start_raw(loadgen).await.unwrap();
    let pid = server.pid();
    let rss_before = procfs::resident_kib(Pid::Other(pid)).unwrap();
    assert!(rss_before > 0);

    let (fleet, report) = fleet::open(&FleetOptions::new(server.url(), 25))
        .await
        .unwrap();
    assert_eq!(report.welcomed, 25, "{report}");
    procfs::cpu_time(Pid::Other(pid)).unwrap();
    fleet.close().await;

    drop(server);
    // Killed and reaped: not even a zombie is left.
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the raw server outlived its guard"
    );
}
