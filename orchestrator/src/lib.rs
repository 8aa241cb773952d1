//! Ferry's control plane as a library: runs of runbooks (state, executor,
//! targets, checks, reports), the HTTP API, and the commands of the `ferry`
//! binary, which is a thin layer over it.
//!
//! The modules form layers; each imports only those below it:
//!
//! ```text
//! commands (the CLI bodies)  api (router, DTOs)
//!             \               /
//!       schedule   alerts   fleet    (cron schedules; alert routes; agents)
//!             \       |      /
//!          control   auth   inventory (run control: create, queue, drive;
//!                                      auth: users, roles, tokens, sessions;
//!                                      inventory: sources, points, repository
//!                                      health, the runbook directory: read-only)
//!                     |
//!                    exec             (the executor of one run)
//!              /      |       \
//!        actions  report, forecast  state   (only `state` knows SQL; forecast,
//!                                            a plan's time and cost, reads the
//!                                            targets' figures and state's history)
//!        /     \
//!   targets   checks
//!        \     /
//!   context, error, fsutil, redact, sys
//! ```

pub mod actions;
pub mod alerts;
pub mod api;
pub mod auth;
pub mod backups;
pub mod checks;
pub mod cli;
pub mod commands;
pub mod context;
pub mod control;
pub mod error;
pub mod exec;
pub mod fleet;
pub mod forecast;
pub mod fsutil;
pub mod groups;
pub mod inventory;
pub mod redact;
pub mod report;
pub mod schedule;
pub mod state;
pub mod step;
pub mod sys;
pub mod targets;

pub use context::Context;
pub use error::{Error, Result};
