//! The command line: global options and the subcommands, assembled from the
//! `Args` each command module owns. The outermost layer: nothing imports it.
//! Conventions follow restic and borg: `-r/--repo` or `FERRY_REPO`,
//! `FERRY_PASSWORD` or `--password-file`, `--json` on every listing.

use crate::commands::{agents, keys, protect, repo, runbooks, schedules, serve, users};
use crate::context::{Context, PasswordSource, default_home};
use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Ferry: encrypted, deduplicated recovery points of whole disks.
#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    max_term_width = 100,
    after_help = "Example:\n  export FERRY_REPO=/srv/ferry-repo\n  ferry init\n  ferry backup --source web-1 /dev/vg0/web-1\n  ferry points --source web-1\n  ferry restore web-1@latest --to /restore/\n  ferry check --read-data\n\nExit codes: 0 success, 1 the operation failed, 2 bad usage or input."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Repository: a directory path, file://, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX.
    #[arg(
        short = 'r',
        long = "repo",
        env = "FERRY_REPO",
        global = true,
        hide_env_values = true
    )]
    pub repo: Option<String>,
    /// Read the repository password from this file (else FERRY_PASSWORD, else a prompt).
    #[arg(long, env = "FERRY_PASSWORD_FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bar.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Orchestrator state: sqlite://PATH or postgres://USER@HOST/DB (default: sqlite in FERRY_HOME, ~/.config/ferry).
    #[arg(long, env = "FERRY_STATE", global = true, hide_env_values = true)]
    pub state: Option<String>,
    /// Read a replicated repository from this replica alone (its id or
    /// location, as `ferry check` lists them), e.g. to restore from the one
    /// cloud left, or to prove that one replica alone restores every point.
    /// Nothing is written but locks.
    #[arg(long, env = "FERRY_READ_REPLICA", global = true)]
    pub read_replica: Option<String>,
    /// More logging (-v info, -vv debug); FERRY_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a repository.
    Init(repo::InitArgs),
    /// A repository's passwords: list, add, change and remove key files.
    Key(keys::KeyArgs),
    /// Make one recovery point of a source's disks.
    Backup(repo::BackupArgs),
    /// List recovery points.
    Points(repo::PointsArgs),
    /// Protected sources: newest point, protection lag, backlog, errors and
    /// RPO against the objectives of a runbook directory.
    Sources(runbooks::SourcesArgs),
    /// Restore a recovery point to image files or devices.
    Restore(repo::RestoreArgs),
    /// Verify the repository's structure, and with --read-data every byte.
    Check(repo::CheckArgs),
    /// Copy recovery points, with their data, into another repository (another
    /// cloud, an offline copy), re-encrypted under its own password; resumable.
    Copy(repo::CopyArgs),
    /// Give each replica of a replicated repository what it lacks: the objects
    /// its records list, and whatever the others' listings hold that it does not.
    Repair(repo::RepairArgs),
    /// Remove recovery points a retention policy does not keep (per source).
    Forget(repo::ForgetArgs),
    /// Reclaim the space of data no recovery point uses; safe while backups run.
    Prune(repo::PruneArgs),
    /// What the repository holds, and what storing and restoring it costs.
    Stats(repo::StatsArgs),
    /// On a versioned bucket, put back every object someone deleted or overwrote.
    Undelete(repo::UndeleteArgs),
    /// Move the packs only older recovery points use to a colder storage class (S3).
    Tier(repo::TierArgs),
    /// Instant restore: serve a recovery point's disk over NBD, fetching chunks on demand.
    ///
    /// Who can connect: by default, only you, through a unix socket (mode 0600)
    /// in a new private directory (0700); --socket PATH puts it at PATH, still
    /// 0600. TCP (--listen) needs TLS: --tls-cert and --tls-key, and with
    /// --tls-ca only clients holding a certificate that CA signed. --insecure
    /// serves TCP without TLS: anyone who can reach the port can read the
    /// decrypted disk, and write to it with --overlay.
    ServeNbd(repo::ServeNbdArgs),
    /// Continuous protection of running QEMU VMs through QMP (dirty bitmaps, no agent inside).
    Protect(protect::ProtectArgs),
    /// Print the JSON Schema of runbooks (for editors).
    Schema(runbooks::SchemaArgs),
    /// Check runbooks and report every problem with its line and column.
    Validate(runbooks::ValidateArgs),
    /// Show what a runbook would do: waves, recovery points, predicted RTO. Changes nothing.
    Plan(runbooks::PlanArgs),
    /// Run a runbook (failover, migration cutover, failback): what it builds stays.
    Run(runbooks::RunArgs),
    /// Run a runbook into an isolated target, verify it, tear it down, and report RTO and RPO.
    Drill(runbooks::RunArgs),
    /// Continue unfinished runs (after a crash or a kill).
    Resume(runbooks::ResumeArgs),
    /// List runs.
    Runs(runbooks::RunsArgs),
    /// A run's report: timeline, RTO, RPO (text, JSON, HTML or JUnit XML).
    Report(runbooks::ReportArgs),
    /// Recovery points proved by drills (the last known good ones).
    Verified,
    /// Let a run past an approval step.
    Approve(runbooks::ApproveArgs),
    /// Stop a run: no new steps; running ones are stopped (a drill still tears down).
    Cancel(runbooks::RunRef),
    /// Undo what a run created, in reverse dependency order.
    Rollback(runbooks::RollbackArgs),
    /// The HTTP API (with a live event stream), on 127.0.0.1 by default.
    Serve(serve::ServeArgs),
    /// Print the OpenAPI description of the HTTP API.
    Openapi,
    /// Users of the console and the API, with roles (viewer, operator, admin).
    User(users::UserArgs),
    /// API tokens that act as a user, with the user's role.
    Token(users::TokenArgs),
    /// Drills and repository checks `ferry serve` starts on a cron schedule.
    Schedule(schedules::ScheduleArgs),
    /// One-time tokens that enroll a `ferry-agent` inside a machine.
    #[command(name = "agent-token")]
    AgentToken(agents::AgentTokenArgs),
    /// The enrolled `ferry-agent`s: list, revoke.
    Agents(agents::AgentsArgs),
}

impl Global {
    /// The context every command runs with.
    pub fn context(&self) -> Context {
        let mut ctx = Context::new(
            self.repo.clone(),
            PasswordSource::from_env(self.password_file.clone()),
            self.state.as_deref(),
            default_home(),
        );
        ctx.json = self.json;
        ctx.quiet = self.quiet;
        ctx.read_replica = self.read_replica.clone();
        ctx
    }
}

/// Runs the command the command line names.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let ctx = &cli.global.context();
    match &cli.command {
        Command::Init(a) => repo::init(ctx, a),
        Command::Key(a) => keys::key(ctx, a),
        Command::ServeNbd(a) => repo::serve_nbd(ctx, a),
        Command::Protect(a) => protect::protect(ctx, a),
        Command::Backup(a) => repo::backup(ctx, a),
        Command::Points(a) => repo::points(ctx, a),
        Command::Sources(a) => runbooks::sources(ctx, a),
        Command::Restore(a) => repo::restore(ctx, a),
        Command::Check(a) => repo::check(ctx, a),
        Command::Repair(a) => repo::repair(ctx, a),
        Command::Copy(a) => repo::copy(ctx, a),
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
        Command::User(a) => users::user(ctx, a),
        Command::Token(a) => users::token(ctx, a),
        Command::Schedule(a) => schedules::schedule(ctx, a),
        Command::AgentToken(a) => agents::agent_token(ctx, a),
        Command::Agents(a) => agents::agents(ctx, a),
    }
}
