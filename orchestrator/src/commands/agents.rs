//! `ferry agent-token create` and `ferry agents list|policy|revoke`: the fleet of
//! `ferry-agent`s from the command line, on the same state a `ferry serve`
//! uses (see `crate::fleet`). Each change goes to the audit log as `USER (cli)`.

use crate::auth;
use crate::context::Context;
use crate::exec::now_ms;
use crate::fleet::{self, PolicyTemplate, when};
use crate::state::State;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct AgentTokenArgs {
    #[command(subcommand)]
    pub command: AgentTokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum AgentTokenCommand {
    /// A one-time token that enrolls one machine (`ferry-agent enroll --token`).
    /// The agent's repository is -r/FERRY_REPO if given, else the server's.
    Create {
        /// How long it may be used (e.g. 30m, 1h, 7d; at most 30d).
        #[arg(long, default_value = "1h")]
        expires: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
}

/// What an agent's policy sets beside its devices.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// The source its points are recorded as (default: the machine's host name).
    #[arg(long)]
    source: Option<String>,
    /// A device or image file to protect (repeat; default: every disk it reports).
    #[arg(long = "device", value_name = "PATH")]
    devices: Vec<String>,
    /// Between cycles (e.g. 10s, 5m; default 60s).
    #[arg(long)]
    interval: Option<String>,
    /// Keep this many newest points of the source.
    #[arg(long)]
    keep_last: Option<u32>,
    /// The consistency group it cuts with: the agents of one group hold
    /// their writes until all do, so their points restore to one moment
    /// (`SOURCE@group-latest`). `--group ""` takes it out.
    #[arg(long)]
    group: Option<String>,
}

impl PolicyArgs {
    fn template(&self, repository: Option<String>) -> Result<PolicyTemplate> {
        let interval_secs = self
            .interval
            .as_deref()
            .map(|i| auth::parse_duration_ms(i).map(|ms| (ms / 1000).max(0) as u64))
            .transpose()?;
        Ok(PolicyTemplate {
            source: self.source.clone(),
            devices: self.devices.clone(),
            interval_secs,
            repository,
            keep_last: self.keep_last,
            group: self.group.clone(),
        })
    }
}

#[derive(Debug, Args)]
pub struct AgentsArgs {
    #[command(subcommand)]
    pub command: AgentsCommand,
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Every agent: last seen, silent, lag, mode per device, last error.
    List,
    /// Change an agent's policy: what is given replaces its own; it applies
    /// the change at its next poll.
    Policy {
        id: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Revoke an agent: its next poll is refused and it stops.
    Revoke { id: String },
}

fn block_on<F: std::future::Future<Output = Result<ExitCode>>>(f: F) -> Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

pub fn agent_token(ctx: &Context, a: &AgentTokenArgs) -> Result<ExitCode> {
    let AgentTokenCommand::Create { expires, policy } = &a.command;
    let ttl = auth::parse_duration_ms(expires)?;
    let policy = policy.template(ctx.repo.clone())?;
    block_on(async {
        let state = State::open(&ctx.state_url).await?;
        let t =
            fleet::create_token(&state, &auth::cli_actor(), now_ms(), Some(ttl), policy).await?;
        if ctx.json {
            println!("{}", serde_json::to_string_pretty(&t)?);
        } else {
            println!("{}", t.token);
            eprintln!(
                "enrolls one machine until {}: ferry-agent enroll --server URL --token {}...",
                when(t.expires_ms),
                &t.token[..t.token.len().min(16)]
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn agents(ctx: &Context, a: &AgentsArgs) -> Result<ExitCode> {
    block_on(async {
        let state = State::open(&ctx.state_url).await?;
        match &a.command {
            AgentsCommand::List => {
                let all = fleet::list(&state, now_ms()).await?;
                if ctx.json {
                    println!("{}", serde_json::to_string_pretty(&all)?);
                } else if all.is_empty() {
                    println!("no agents; `ferry agent-token create` makes a token to enroll one");
                } else {
                    for g in all {
                        let health = if g.revoked_ms.is_some() {
                            "revoked".to_string()
                        } else if g.silent {
                            "SILENT".to_string()
                        } else {
                            "ok".to_string()
                        };
                        let s = g.status.as_ref();
                        println!(
                            "{:<14} {:<20} {:<8} source {:<16} every {:>4} s  last seen {}  lag {}  {}",
                            g.id,
                            g.hostname,
                            health,
                            g.policy.source,
                            g.policy.interval_secs,
                            g.last_seen_ms.map_or("never".into(), when),
                            s.and_then(|s| s.lag_secs)
                                .map_or("-".into(), |l| format!("{l:.1} s")),
                            s.and_then(|s| s.last_error.clone()).unwrap_or_default(),
                        );
                        if let Some(g) = &g.policy.group {
                            let last = s.and_then(|s| s.group_cut.as_ref()).map_or_else(
                                || "no cut yet".to_string(),
                                |c| {
                                    format!(
                                        "last cut {} ({} of {} arrived, skew {:.0} ms)",
                                        if c.complete() {
                                            "complete"
                                        } else {
                                            "INCOMPLETE"
                                        },
                                        c.arrived.len(),
                                        c.members.len(),
                                        c.skew_ms
                                    )
                                },
                            );
                            let err = s.and_then(|s| s.group_error.clone()).unwrap_or_default();
                            println!("{:<14} group {g}: {last} {err}", "");
                        }
                    }
                }
            }
            AgentsCommand::Policy { id, policy } => {
                let p = fleet::set_policy(&state, id, policy.template(None)?, &auth::cli_actor())
                    .await?;
                if ctx.json {
                    println!("{}", serde_json::to_string_pretty(&p)?);
                } else {
                    println!(
                        "agent {id}: {} every {} s{}; it applies this at its next poll",
                        p.source,
                        p.interval_secs,
                        p.group
                            .as_deref()
                            .map_or(String::new(), |g| format!(", group {g}"))
                    );
                }
            }
            AgentsCommand::Revoke { id } => {
                fleet::revoke(&state, id, &auth::cli_actor(), now_ms()).await?;
                if !ctx.json {
                    println!("agent {id} revoked; it stops at its next poll");
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
