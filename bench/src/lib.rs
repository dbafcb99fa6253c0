//! Load generation and measurements for the changeover server.
//!
//! The `changeover-loadgen` binary opens many agent connections from one process
//! ([`fleet`]), serves a bare WebSocket baseline to compare the server with
//! ([`raw_server`]), measures what an idle agent costs the server in memory
//! ([`idle_rss`]), how fast it downloads and verifies a large release ([`download`]), and
//! how long its agents are without it during a changeover and a rollback ([`changeover`],
//! with agents that come back, [`returning_fleet`], and its log read as a timeline,
//! [`server_log`]), and the scenarios at thousands of agents: broadcast fan-out, a slow
//! reader, restart storms and the changeover ([`scale`]).
//! BENCHMARKS.md at the workspace root records the results and the
//! commands that produced them.
//!
//! This crate only observes the server from outside, through its binaries, its socket and
//! `/proc`; it is not part of any release and nothing depends on it.

pub mod agent_updates;
pub mod changeover;
pub mod download;
pub mod fleet;
pub mod idle_rss;
pub mod procfs;
pub mod raw_file_server;
pub mod raw_server;
pub mod returning_fleet;
pub mod scale;
pub mod server_log;
pub mod server_process;
