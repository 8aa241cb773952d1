//! The `ferry` command: repository operations, runbooks, and the API server.
//!
//! Exit codes: 0 success, 1 the operation failed, 2 bad usage or input.

mod actions;
mod cli;
mod exec;
mod output;
mod protect;
mod report;
mod runs;
mod server;
mod state;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = <cli::Cli as clap::Parser>::parse();
    init_logging(args.global.verbose);
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {}", output::error_chain(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ferry_agent::Error>() {
        Some(fe) if fe.is_usage() => 2,
        Some(_) => 1,
        None if e.downcast_ref::<cli::UsageError>().is_some() => 2,
        None => 1,
    }
}

/// Quiet, structured logs on stderr; `-v` or `FERRY_LOG` for more.
fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
