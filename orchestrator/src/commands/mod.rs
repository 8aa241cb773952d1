//! The bodies of the `ferry` commands: each module owns its commands' `clap`
//! arguments and runs them over a [`Context`](crate::context::Context).

pub mod output;
pub mod protect;
pub mod repo;
pub mod runbooks;
pub mod serve;

use crate::cli::{Cli, Command};
use anyhow::Result;
use std::process::ExitCode;

/// Runs the command the command line names.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let ctx = &cli.global.context();
    match &cli.command {
        Command::Init(a) => repo::init(ctx, a),
        Command::ServeNbd(a) => repo::serve_nbd(ctx, a),
        Command::Protect(a) => protect::protect(ctx, a),
        Command::Backup(a) => repo::backup(ctx, a),
        Command::Points(a) => repo::points(ctx, a),
        Command::Restore(a) => repo::restore(ctx, a),
        Command::Check(a) => repo::check(ctx, a),
        Command::Forget(a) => repo::forget(ctx, a),
        Command::Prune(a) => repo::prune(ctx, a),
        Command::Stats(a) => repo::stats(ctx, a),
        Command::Undelete(a) => repo::undelete(ctx, a),
        Command::Tier(a) => repo::tier(ctx, a),
        Command::Schema(a) => runbooks::schema(a),
        Command::Validate(a) => runbooks::validate(ctx, a),
        Command::Plan(a) => runbooks::plan(ctx, a),
        Command::Run(a) => runbooks::run(ctx, a, ferry_engine::Mode::Run),
        Command::Drill(a) => runbooks::run(ctx, a, ferry_engine::Mode::Drill),
        Command::Resume(a) => runbooks::resume(ctx, a),
        Command::Runs(a) => runbooks::runs(ctx, a),
        Command::Report(a) => runbooks::report(ctx, a),
        Command::Approve(a) => runbooks::approve(ctx, a),
        Command::Verified => runbooks::verified(ctx),
        Command::Cancel(a) => runbooks::cancel(ctx, a),
        Command::Rollback(a) => runbooks::rollback(ctx, a),
        Command::Serve(a) => serve::serve(ctx, a),
        Command::Openapi => serve::print_openapi(),
    }
}
