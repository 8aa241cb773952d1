//! The `ferry` command: a thin layer over the `ferry_orchestrator` library.
//!
//! Exit codes: 0 success, 1 the operation failed, 2 bad usage or input.

use std::process::ExitCode;

/// jemalloc, not glibc's malloc: `ferry protect` runs the backup pipeline on
/// new threads every cycle, and glibc's per-thread arenas kept what they
/// once held, so its memory grew by about 20 MiB a minute over a 15-minute
/// soak (docs/performance.md, Continuous protection).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args = <ferry_orchestrator::cli::Cli as clap::Parser>::parse();
    init_logging(args.global.verbose);
    // Other processes of this user may not read this one's memory or its
    // environment (`/proc/PID/environ` holds FERRY_PASSWORD): runbook
    // commands run as the same user.
    ferry_orchestrator::sys::harden_process();
    match ferry_orchestrator::cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {}", ferry_orchestrator::error::anyhow_chain(&e));
            ExitCode::from(ferry_orchestrator::error::exit_code(&e))
        }
    }
}

/// Quiet, structured logs on stderr; `-v` or `FERRY_LOG` for more.
fn init_logging(verbose: u8) {
    // sqlx logs connection settings and statements at `warn` (a MySQL
    // DSN's `PassWord=` among them): only its errors, unless FERRY_LOG asks.
    let default = match verbose {
        0 => "warn,sqlx=error",
        1 => "info,sqlx=error",
        _ => "debug,sqlx=warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
