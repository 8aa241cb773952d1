//! `ferry-agent`: a thin command line over `ferry_fleet::daemon`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use clap::{Parser, Subcommand};
use ferry_fleet::config::{self, Config};
use ferry_fleet::daemon;

/// jemalloc, as in `ferry`: the daemon runs every scheduled backup's pipeline
/// on new threads for weeks, and glibc's per-thread arenas keep what such
/// threads once held (docs/performance.md, Continuous protection).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "ferry-agent",
    version,
    about = "Protect this machine's disks into a Ferry repository, as `ferry serve` directs",
    after_help = "Example:\n  ferry agent-token create --expires 1h --device /dev/vdb    # on the server\n  ferry-agent enroll --server https://ferry:8443 --token fenroll_...\n  systemctl enable --now ferry-agent\n\nExit codes: 0 stopped as asked, 1 failed, 3 the server refused this agent (revoked)."
)]
struct Cli {
    /// The agent's config file (written by `enroll`, mode 0600).
    #[arg(long, global = true, default_value = config::DEFAULT_PATH, env = "FERRY_AGENT_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register this machine with `ferry serve` using a one-time token.
    Enroll {
        /// The server (https://HOST:PORT).
        #[arg(long)]
        server: String,
        /// The token from `ferry agent-token create`.
        #[arg(long, env = "FERRY_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// The PEM of the CA that signed the server's certificate.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// Where the repository password is kept on this machine (else FERRY_PASSWORD).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Report these devices or image files instead of the machine's disks.
        #[arg(long = "device")]
        devices: Vec<PathBuf>,
        /// Replace an existing config (a second identity for this machine).
        #[arg(long)]
        force: bool,
    },
    /// Protect as the policy says, until stopped or revoked.
    Run {
        /// Stop after this many cycles.
        #[arg(long)]
        cycles: Option<u64>,
    },
    /// What this agent is and what it was last told to do (no secrets).
    Status,
    /// Take the agent's dm-era layers out from under a device (before LVM
    /// resizes or deactivates it): the device gets its original table back.
    /// The next cycle puts them back and reads the device whole once. Stop
    /// the agent first.
    Release {
        /// The device, as its `[[dm_era]]` entry names it.
        device: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match &cli.command {
        Command::Enroll {
            server,
            token,
            ca_cert,
            password_file,
            devices,
            force,
        } => daemon::enroll(
            &cli.config,
            server,
            token,
            ca_cert.clone(),
            password_file.clone(),
            devices,
            *force,
        )
        .map(|e| {
            println!(
                "enrolled as agent {}: source {:?}, devices {:?}, every {} s; config in {}",
                e.agent_id,
                e.policy.source,
                e.policy.devices,
                e.policy.interval_secs,
                cli.config.display()
            );
        }),
        Command::Run { cycles } => {
            let stop = AtomicBool::new(false);
            daemon::run(&cli.config, &daemon::RunOptions { cycles: *cycles }, &stop).map(|s| {
                println!("{}", serde_json::to_string(&s).unwrap_or_default());
            })
        }
        Command::Release { device } => Config::load(&cli.config).and_then(|c| {
            let e = c.era_for(&device.to_string_lossy()).ok_or_else(|| {
                anyhow::anyhow!(
                    "{} has no [[dm_era]] entry in {}",
                    device.display(),
                    cli.config.display()
                )
            })?;
            if ferry_fleet::era::release(e)? {
                println!(
                    "released {}: it has its original table again",
                    device.display()
                );
            } else {
                println!("{} has no dm-era layers under it", device.display());
            }
            Ok(())
        }),
        Command::Status => Config::load(&cli.config).map(|c| {
            let policy = Config::load_policy(&cli.config);
            println!(
                "{}",
                serde_json::json!({
                    "server": c.server, "agent_id": c.agent_id,
                    "password_file": c.password_file, "policy": policy,
                })
            );
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-agent: {e:#}");
            if e.downcast_ref::<daemon::Stopped>().is_some() {
                ExitCode::from(3)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
