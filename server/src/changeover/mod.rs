//! The changeover: from an admin's request to the new release running, or the old one
//! running again, and never anything in between.
//!
//! - `machine.rs`: the pure state machine (events in, actions out);
//! - `journal.rs`: the on-disk record written before every step;
//! - `carry.rs`: carrying preferences, backups and certificates over;
//! - `preflight.rs`: everything checked before any user is warned;
//! - `driver.rs`: the task that performs the actions in the running server;
//! - `recovery.rs`: what a starting server does with a journal it finds;
//! - `watchdog.rs`: the Unix watchdog for a new release's verdict without a service manager;
//! - `swap_helper.rs`: the swap on Windows, from a process outside both releases.

pub mod carry;
pub mod driver;
pub mod health;
pub mod journal;
pub mod machine;
pub mod preflight;
pub mod recovery;
pub mod swap_helper;
pub mod watchdog;

/// Names of the steps at which the test-only switch `CHANGEOVER_FAULT_AT` makes the server
/// abort (as `kill -9` would), right after the journal recorded the step. It may name
/// several, separated by commas (`unhealthy,rollback_exchanged`: a failed health check,
/// then a crash in the middle of its rollback).
pub const FAULT_ENV: &str = "CHANGEOVER_FAULT_AT";

/// Aborts the process if the fault switch names `step`. Tests use it to prove that every
/// journaled step can be interrupted and recovered from.
pub fn fault_point(step: &str) {
    if fault_requested(step) {
        eprintln!("{FAULT_ENV}={step}: aborting here on purpose");
        std::process::abort();
    }
}

/// Whether the fault switch names `step`, for faults that are not aborts.
pub fn fault_requested(step: &str) -> bool {
    std::env::var(FAULT_ENV).is_ok_and(|wanted| wanted.split(',').any(|one| one == step))
}
