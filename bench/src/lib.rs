//! Load generation and measurements for the changeover server.
//!
//! The `changeover-loadgen` binary opens many agent connections from one process
//! ([`fleet`]), serves a bare WebSocket baseline to compare the server with
//! ([`raw_server`]), measures what an idle agent costs the server in memory
//! ([`idle_rss`]) and how fast it downloads and verifies a large release ([`download`]).
//! BENCHMARKS.md at the workspace root records the results and the
//! commands that produced them.
//!
//! This crate only observes the server from outside, through its binaries, its socket and
//! `/proc`; it is not part of any release and nothing depends on it.

pub mod download;
pub mod fleet;
pub mod idle_rss;
pub mod procfs;
pub mod raw_server;
pub mod server_process;
