//! The bodies of the `ferry` commands: each module owns its commands' `clap`
//! arguments and runs them over a [`Context`](crate::context::Context);
//! `cli` (the command line, outermost) picks which.

pub mod agents;
pub mod keys;
pub mod output;
pub mod protect;
pub mod repo;
pub mod runbooks;
pub mod schedules;
pub mod serve;
pub mod users;
