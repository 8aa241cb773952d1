#![recursion_limit = "256"]
//! Ferry's runbook language and DAG engine.
//!
//! Pure by design: no IO, no clock, no randomness. [`runbook::parse`] turns
//! text into a validated [`runbook::Runbook`] (or every problem at once, with
//! line and column), [`plan::plan`] binds params and builds the DAG, and
//! [`machine::Engine`] folds a run's event log into its state and decides what
//! happens next. The executor, state and IO live in `ferry-orchestrator`.

pub mod catalog;
pub mod diag;
pub mod expr;
pub mod limits;
pub mod machine;
pub mod plan;
pub mod runbook;
pub mod schema;

pub use diag::{Diagnostic, Diagnostics};
pub use limits::Limits;
pub use machine::{Action, Engine, Event, Mode, RunStatus, StepState};
pub use plan::{Plan, plan};
pub use runbook::{Runbook, parse, parse_with};
