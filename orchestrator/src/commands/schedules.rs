//! `ferry schedule add|list|remove`: drills, repository checks and backups
//! that a running `ferry serve` on the same state starts at the times a cron
//! expression names (UTC). Each change goes to the audit log as `USER (cli)`.

use crate::auth;
use crate::context::Context;
use crate::exec::now_ms;
use crate::schedule::{self, Job};
use crate::state::State;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    #[command(subcommand)]
    pub command: ScheduleCommand,
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Add a schedule: a drill of a runbook of the server's runbook
    /// directory, or a check of its repository.
    #[command(group(clap::ArgGroup::new("job").required(true).args(["drill", "check", "backup"])))]
    Add {
        name: String,
        /// Five fields, in UTC: minute hour day-of-month month day-of-week
        /// (e.g. "0 3 * * 0" for 03:00 every Sunday).
        #[arg(long)]
        cron: String,
        /// Drill this runbook file of `ferry serve --runbooks DIR`.
        #[arg(long, value_name = "FILE")]
        drill: Option<String>,
        /// The target of the drill's steps that name none.
        #[arg(long, requires = "drill")]
        target: Option<String>,
        /// Check the server's repository.
        #[arg(long)]
        check: bool,
        /// With --check: read and verify every byte.
        #[arg(long, requires = "check")]
        read_data: bool,
        /// Back up, as this source, the --disk paths the server's machine
        /// reads (an image file, a device, an nbd:// URL) into its repository.
        #[arg(long, value_name = "SOURCE", requires = "disks")]
        backup: Option<String>,
        /// With --backup: a disk (repeat for several, one point holds them all).
        #[arg(long = "disk", value_name = "PATH", requires = "backup")]
        disks: Vec<String>,
    },
    /// List schedules, when each fires next and what it last started.
    List,
    /// Remove a schedule.
    Remove { name: String },
}

fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

pub fn schedule(ctx: &Context, a: &ScheduleArgs) -> Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let state = State::open(&ctx.state_url).await?;
            match &a.command {
                ScheduleCommand::Add {
                    name,
                    cron,
                    drill,
                    target,
                    check: _,
                    read_data,
                    backup,
                    disks,
                } => {
                    let job = match (drill, backup) {
                        (Some(path), _) => Job::Drill {
                            path: path.clone(),
                            target: target.clone(),
                        },
                        (None, Some(source)) => Job::Backup {
                            source: source.clone(),
                            disks: disks.clone(),
                        },
                        (None, None) => Job::Check {
                            read_data: *read_data,
                        },
                    };
                    let s =
                        schedule::add(&state, name, cron, job, &auth::cli_actor(), now_ms())
                            .await?;
                    if ctx.json {
                        println!("{}", serde_json::to_string_pretty(&s)?);
                    } else {
                        println!(
                            "schedule {}: {} at \"{}\"; next {} (a running `ferry serve` on this state fires it)",
                            s.name,
                            s.job.describe(),
                            s.cron,
                            when(s.next_ms)
                        );
                    }
                }
                ScheduleCommand::List => {
                    let all = schedule::list(&state).await?;
                    if ctx.json {
                        println!("{}", serde_json::to_string_pretty(&all)?);
                    } else if all.is_empty() {
                        println!("no schedules; `ferry schedule add NAME --cron EXPR --drill FILE` adds one");
                    } else {
                        for s in all {
                            println!(
                                "{:<20} {:<16} {:<28} next {}  last {}",
                                s.name,
                                s.cron,
                                s.job.describe(),
                                when(s.next_ms),
                                match (s.last_fired_ms, &s.last_outcome) {
                                    (Some(t), Some(o)) => format!("{}: {o}", when(t)),
                                    (Some(t), None) => when(t),
                                    _ => "never".into(),
                                }
                            );
                        }
                    }
                }
                ScheduleCommand::Remove { name } => {
                    schedule::remove(&state, name, &auth::cli_actor()).await?;
                    if !ctx.json {
                        println!("schedule {name} removed");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        })
}
