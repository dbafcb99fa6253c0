//! The changeover agent: the background process on each workstation that keeps a session
//! with the server, and the admin commands that talk to the server on an admin's behalf.
//!
//! `main.rs` only parses the command line; [`agent::run`] is the background agent and
//! [`admin`] the admin commands; [`self_update`] is how the agent updates itself.

pub mod admin;
pub mod agent;
pub mod dial;
pub mod disk;
pub mod events;
pub mod files;
pub mod hooks;
pub mod i18n;
pub mod identity;
pub mod offer;
pub mod self_update;
pub mod server_values;
pub mod trial;
pub mod version;
