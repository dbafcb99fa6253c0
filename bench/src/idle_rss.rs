//! `idle-rss`: what one idle agent connection costs the server in resident memory.
//!
//! For each fleet size, a fresh changeover server and a fresh raw baseline
//! ([`crate::raw_server`]) are started in turn as child processes. Each is left to settle,
//! its `VmRSS` read, a fleet opened against it from this process, and once every agent is
//! welcomed and memory has settled again `VmRSS` is read a second time; the difference
//! divided by the connections held is the cost per idle agent. The CPU time of this
//! process is reported beside the server's, to show whether the load generator was the
//! bottleneck.
//!
//! It measures one thing at a time and prints it; comparing figures over time is left to
//! BENCHMARKS.md.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::fleet::{self, FleetOptions, OpenReport};
use crate::procfs::{self, CpuTime, Pid, SettlePolicy, SettledRss};
use crate::server_process::ServerProcess;

/// What `idle-rss` was given.
#[derive(Debug, Clone)]
pub struct IdleRssOptions {
    /// The `changeover-server` binary.
    pub server_bin: PathBuf,
    /// A binary with the `raw-server` subcommand: normally this very one.
    pub raw_bin: PathBuf,
    /// Fleet sizes, measured in this order.
    pub agents: Vec<usize>,
    pub concurrency: usize,
    /// See [`FleetOptions::agents_per_source_address`].
    pub agents_per_source_address: usize,
    pub settle: SettlePolicy,
}

/// Which server a measurement is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Changeover,
    Raw,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Changeover => "changeover-server",
            Target::Raw => "raw baseline",
        })
    }
}

/// One server at one fleet size.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub target: Target,
    pub open: OpenReport,
    pub before: SettledRss,
    pub after: SettledRss,
    /// Welcomed connections that ended before the second reading.
    pub lost: usize,
    /// CPU time of the server while the fleet was being opened.
    pub server_cpu: CpuTime,
    /// CPU time of this process (the load generator) over the same span.
    pub loadgen_cpu: CpuTime,
    /// "accept failed" lines in the server's log (EMFILE: the open-file limit).
    pub accept_failures: usize,
}

impl Measurement {
    /// Connections actually held during the second reading.
    pub fn held(&self) -> usize {
        self.open.welcomed.saturating_sub(self.lost)
    }

    /// Resident memory per held connection, in KiB.
    pub fn per_agent_kib(&self) -> f64 {
        (self.after.kib as f64 - self.before.kib as f64) / self.held().max(1) as f64
    }
}

/// The `[server]` table written for the changeover server: only what this measurement
/// depends on, every other key keeps its default (listen comes from `--listen`).
pub fn server_config(largest_fleet: usize) -> String {
    // The default is already far above what one machine can hold, but a fleet must never
    // be cut short by "server full" should that default change.
    let max_sessions = largest_fleet.max(100_000);
    format!(
        "# Written by changeover-loadgen idle-rss; every other key keeps its default.\n\
         [server]\n\
         max_sessions = {max_sessions}\n{}",
        crate::fleet::ONE_ADDRESS_FLEET_KEYS
    )
}

/// Measures every fleet size against both servers and prints the results.
pub async fn run(options: &IdleRssOptions) -> anyhow::Result<Vec<(Measurement, Measurement)>> {
    let largest = options.agents.iter().copied().max().unwrap_or(0);
    let config = server_config(largest);
    let mut results = Vec::new();
    for &agents in &options.agents {
        let server = ServerProcess::start_changeover(&options.server_bin, &config).await?;
        let changeover = measure(Target::Changeover, server, agents, options).await?;
        let raw_server = ServerProcess::start_raw(&options.raw_bin).await?;
        let raw = measure(Target::Raw, raw_server, agents, options).await?;
        println!(
            "N={agents}: server/raw per connection = {:.2}",
            changeover.per_agent_kib() / raw.per_agent_kib()
        );
        results.push((changeover, raw));
    }
    println!();
    print!("{}", summary_table(&results));
    Ok(results)
}

async fn measure(
    target: Target,
    server: ServerProcess,
    agents: usize,
    options: &IdleRssOptions,
) -> anyhow::Result<Measurement> {
    let label = format!("[{target} N={agents}]");
    let pid = Pid::Other(server.pid());
    println!("{label} pid {}, {}", server.pid(), server.url());
    let gone = || format!("cannot read /proc/{} ({target} exited?)", server.pid());
    let before = procfs::settled_resident_kib(pid, options.settle)
        .await
        .with_context(gone)?;
    println!("{label} RSS before: {}", show_rss(before));

    let server_cpu_start = procfs::cpu_time(pid).with_context(gone)?;
    let loadgen_cpu_start = procfs::cpu_time(Pid::Myself)?;
    let mut fleet_options = FleetOptions::new(server.url(), agents);
    fleet_options.concurrency = options.concurrency;
    fleet_options.agents_per_source_address = options.agents_per_source_address;
    let (fleet, open) = fleet::open(&fleet_options).await?;
    let server_cpu = procfs::cpu_time(pid)
        .with_context(gone)?
        .since(server_cpu_start);
    let loadgen_cpu = procfs::cpu_time(Pid::Myself)?.since(loadgen_cpu_start);
    let wall = open.elapsed.as_secs_f64().max(1e-9);
    println!("{label} {open}");
    println!(
        "{label} CPU while opening ({:.2} s): server {server_cpu} = {:.0}% of one core; \
         load generator {loadgen_cpu} = {:.0}% of one core",
        open.elapsed.as_secs_f64(),
        100.0 * server_cpu.total().as_secs_f64() / wall,
        100.0 * loadgen_cpu.total().as_secs_f64() / wall,
    );

    let after = procfs::settled_resident_kib(pid, options.settle)
        .await
        .with_context(gone)?;
    let lost = fleet.lost();
    let measurement = Measurement {
        target,
        open,
        before,
        after,
        lost,
        server_cpu,
        loadgen_cpu,
        accept_failures: server.log_lines_containing("accept failed"),
    };
    println!(
        "{label} RSS after: {}; {} held, {:.2} KiB per connection",
        show_rss(after),
        measurement.held(),
        measurement.per_agent_kib(),
    );
    if lost > 0 {
        println!(
            "{label} {lost} connections lost after their welcome: {:?}",
            fleet.lost_reasons()
        );
    }
    if measurement.accept_failures > 0 {
        println!(
            "{label} the server logged {} failed accepts (see its open-file limit)",
            measurement.accept_failures
        );
    }
    // Agents go first, so the next measurement starts on a machine with nothing open.
    fleet.close().await;
    drop(server);
    Ok(measurement)
}

fn show_rss(reading: SettledRss) -> String {
    format!(
        "{} KiB ({} after {:.1} s)",
        reading.kib,
        if reading.settled {
            "settled"
        } else {
            "NOT settled"
        },
        reading.waited.as_secs_f64()
    )
}

/// The results as a Markdown table, ready for BENCHMARKS.md.
pub fn summary_table(results: &[(Measurement, Measurement)]) -> String {
    let mut table = String::from(
        "| agents | server | welcomed | open time | RSS before | RSS after | per connection | server CPU while opening | loadgen CPU while opening |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (changeover, raw) in results {
        for measurement in [changeover, raw] {
            table.push_str(&format!(
                "| {} | {} | {} | {:.2} s | {} KiB | {} KiB | {:.2} KiB | {:.2} s | {:.2} s |\n",
                measurement.open.requested,
                measurement.target,
                measurement.open.welcomed,
                measurement.open.elapsed.as_secs_f64(),
                measurement.before.kib,
                measurement.after.kib,
                measurement.per_agent_kib(),
                measurement.server_cpu.total().as_secs_f64(),
                measurement.loadgen_cpu.total().as_secs_f64(),
            ));
        }
    }
    table.push('\n');
    for (changeover, raw) in results {
        table.push_str(&format!(
            "N={}: changeover-server / raw baseline per connection = {:.2} ({:.2} KiB vs {:.2} KiB)\n",
            changeover.open.requested,
            changeover.per_agent_kib() / raw.per_agent_kib(),
            changeover.per_agent_kib(),
            raw.per_agent_kib(),
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_only_raises_max_sessions_when_needed() {
        let small = server_config(10_000);
        assert!(small.contains("[server]"));
        assert!(small.contains("max_sessions = 100000"));
        assert!(server_config(250_000).contains("max_sessions = 250000"));
    }
}
