//! Command-line options and the commands they run. Conventions follow restic and
//! borg: `-r/--repo` or `FERRY_REPO`, `FERRY_PASSWORD` or `--password-file`,
//! `--json` on every listing.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_agent::backup::{BackupOptions, DiskSpec};
use ferry_agent::check::CheckOptions;
use ferry_agent::chunker::Chunker;
use ferry_agent::point::Consistency;
use ferry_agent::progress::Progress;
use ferry_agent::repo::{InitOptions, Repository};
use ferry_agent::restore::RestoreOptions;
use ferry_agent::source::{BlockSource, FileSource};
use ferry_connectors::nbd::{NbdSource, NbdUrl};

use crate::output::{self, Bar, bytes};

/// An error in what the user asked for (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

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
    /// More logging (-v info, -vv debug); FERRY_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a repository.
    Init(InitArgs),
    /// Make one recovery point of a source's disks.
    Backup(BackupArgs),
    /// List recovery points.
    Points(PointsArgs),
    /// Restore a recovery point to image files or devices.
    Restore(RestoreArgs),
    /// Verify the repository's structure, and with --read-data every byte.
    Check(CheckArgs),
    /// Remove recovery points a retention policy does not keep (per source).
    Forget(ForgetArgs),
    /// Reclaim the space of data no recovery point uses; safe while backups run.
    Prune(PruneArgs),
    /// What the repository holds, and what storing and restoring it costs.
    Stats(StatsArgs),
    /// On a versioned bucket, put back every object someone deleted or overwrote.
    Undelete(UndeleteArgs),
    /// Move the packs only older recovery points use to a colder storage class (S3).
    Tier(TierArgs),
    /// Instant restore: serve a recovery point's disk over NBD, fetching chunks on demand.
    ServeNbd(ServeNbdArgs),
    /// Continuous protection of running QEMU VMs through QMP (dirty bitmaps, no agent inside).
    Protect(crate::protect::ProtectArgs),
    /// Print the JSON Schema of runbooks (for editors).
    Schema,
    /// Check runbooks and report every problem with its line and column.
    Validate(crate::runs::ValidateArgs),
    /// Show what a runbook would do: waves, recovery points, predicted RTO. Changes nothing.
    Plan(crate::runs::PlanArgs),
    /// Run a runbook (failover, migration cutover, failback): what it builds stays.
    Run(crate::runs::RunArgs),
    /// Run a runbook into an isolated target, verify it, tear it down, and report RTO and RPO.
    Drill(crate::runs::RunArgs),
    /// Continue unfinished runs (after a crash or a kill).
    Resume(crate::runs::ResumeArgs),
    /// List runs.
    Runs(crate::runs::RunsArgs),
    /// A run's report: timeline, RTO, RPO (text, JSON, HTML or JUnit XML).
    Report(crate::runs::ReportArgs),
    /// Recovery points proved by drills (the last known good ones).
    Verified,
    /// Let a run past an approval step.
    Approve(crate::runs::ApproveArgs),
    /// Stop a run: no new steps; running ones are stopped (a drill still tears down).
    Cancel(crate::runs::RunRef),
    /// Undo what a run created, in reverse dependency order.
    Rollback(crate::runs::RollbackArgs),
    /// The HTTP API (with a live event stream), on 127.0.0.1 by default.
    Serve(crate::server::ServeArgs),
    /// Print the OpenAPI description of the HTTP API.
    Openapi,
}

#[derive(Debug, Args)]
pub struct ServeNbdArgs {
    /// Recovery point: an id (or a unique prefix), SOURCE@latest, or SOURCE@TIME.
    pub point: String,
    /// The disk to serve (by name); needed when the point has several.
    #[arg(long)]
    pub disk: Option<String>,
    /// TCP address to listen on; port 0 picks a free one (printed).
    #[arg(long, default_value = "127.0.0.1:10809", conflicts_with = "socket")]
    pub listen: String,
    /// Listen on a unix socket instead.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The export's name (default: the disk's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Accept writes, kept in this new overlay file; the repository is never written.
    #[arg(long, value_name = "FILE")]
    pub overlay: Option<PathBuf>,
    /// Memory for decoded chunks, in MiB.
    #[arg(long, default_value_t = 512)]
    pub cache_mib: usize,
}

#[derive(Debug, Args)]
pub struct TierArgs {
    /// Points older than this (e.g. 30d, 6m) are "older"; their packs that no
    /// newer point uses move.
    #[arg(
        long,
        value_name = "DURATION",
        required_unless_present = "before",
        conflicts_with = "before"
    )]
    pub older_than: Option<String>,
    /// Or: points made before this time (RFC 3339 or YYYY-MM-DD[ HH:MM[:SS]], UTC).
    #[arg(long, value_name = "TIME")]
    pub before: Option<String>,
    /// The storage class to move them to, e.g. STANDARD_IA, GLACIER_IR, GLACIER (STANDARD moves them back).
    #[arg(long)]
    pub class: String,
    /// Show what would move; move nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// A retention policy on the command line (`forget`, `protect`).
#[derive(Debug, Args)]
pub struct KeepArgs {
    /// Keep the newest N points.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest point of each of the last N hours that have points.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Keep every point within this long of the newest one: y, m (months), w, d, h, min, s; e.g. 30min, 36h, 7d, 1y6m.
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<String>,
}

impl KeepArgs {
    pub fn policy(&self) -> Result<ferry_agent::retention::Policy> {
        let within = self
            .keep_within
            .as_deref()
            .map(ferry_agent::retention::Policy::parse_within)
            .transpose()
            .map_err(UsageError)?;
        Ok(ferry_agent::retention::Policy {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
            within,
        })
    }
}

#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// Remove exactly these recovery points (ids, prefixes, SOURCE@latest, SOURCE@TIME).
    pub points: Vec<String>,
    /// Only this source's points (default: every source, each on its own).
    #[arg(long)]
    pub source: Option<String>,
    #[command(flatten)]
    pub keep: KeepArgs,
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run prune afterwards.
    #[arg(long)]
    pub prune: bool,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Repack a pack when more than this percentage of it is unused.
    #[arg(long, default_value_t = 10.0)]
    pub max_unused: f64,
    /// Show what would be reclaimed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// A price table (JSON) to estimate costs with; see --print-prices.
    #[arg(long)]
    pub prices: Option<PathBuf>,
    /// Print the built-in price table as JSON (to edit and pass to --prices).
    #[arg(long)]
    pub print_prices: bool,
    /// Storage class to price the data in (e.g. STANDARD_IA); default: the table's default.
    #[arg(long)]
    pub storage_class: Option<String>,
}

#[derive(Debug, Args)]
pub struct UndeleteArgs {
    /// Show what would be put back; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ChunkerKind {
    /// Fixed-size chunks (best for disks: writes stay aligned).
    Fixed,
    /// Content-defined chunks (FastCDC), resynchronised every 4 MiB.
    Cdc,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// How to cut chunks; fixed for the repository's life.
    #[arg(long, value_enum, default_value = "fixed")]
    pub chunker: ChunkerKind,
    /// Chunk size (fixed) or average chunk size (cdc), e.g. 64KiB.
    #[arg(long, default_value = "64KiB")]
    pub chunk_size: String,
    /// zstd level for chunks, 1 to 19.
    #[arg(long, default_value_t = ferry_agent::repo::DEFAULT_COMPRESSION_LEVEL)]
    pub compression: i32,
    /// Make recovery points immutable with S3 Object Lock: every object is written
    /// with a retention in this mode (the bucket must have Object Lock enabled).
    #[arg(long, value_enum)]
    pub object_lock: Option<LockModeArg>,
    /// Days each object stays locked after it is written (or last extended by prune).
    #[arg(long, default_value_t = 30, requires = "object_lock")]
    pub lock_days: u32,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LockModeArg {
    /// Nobody can delete a locked version before it expires, not even the account root.
    Compliance,
    /// Users granted s3:BypassGovernanceRetention can still delete early.
    Governance,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Name of the machine or VM the disks belong to.
    #[arg(long)]
    pub source: String,
    /// Record this consistency instead of detecting it (crash, or fuzzy when a disk changed while read).
    #[arg(long, value_enum)]
    pub consistency: Option<ConsistencyArg>,
    /// Image files, block devices, or NBD exports:
    /// nbd://HOST[:PORT]/EXPORT[?bitmap=NAME], nbd+unix:///EXPORT?socket=PATH[&bitmap=NAME].
    /// With a bitmap, only the extents it marks dirty are read: it must hold every
    /// write since the source's latest point.
    #[arg(required = true)]
    pub disks: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ConsistencyArg {
    Crash,
    App,
    Fuzzy,
}

#[derive(Debug, Args)]
pub struct PointsArgs {
    /// Only this source's points.
    #[arg(long)]
    pub source: Option<String>,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Recovery point: an id (or a unique prefix), SOURCE@latest, or SOURCE@TIME.
    pub point: String,
    /// A directory (one file per disk), an image file, or a block device.
    #[arg(long = "to")]
    pub to: PathBuf,
    /// Restore only this disk.
    #[arg(long)]
    pub disk: Option<String>,
    /// Replace existing image files.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Read and verify every byte of every pack.
    #[arg(long)]
    pub read_data: bool,
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let g = &cli.global;
    match &cli.command {
        Command::Init(a) => init(g, a),
        Command::ServeNbd(a) => serve_nbd(g, a),
        Command::Protect(a) => crate::protect::protect(g, a),
        Command::Backup(a) => backup(g, a),
        Command::Points(a) => points(g, a),
        Command::Restore(a) => restore(g, a),
        Command::Check(a) => check(g, a),
        Command::Forget(a) => forget(g, a),
        Command::Prune(a) => prune(g, a),
        Command::Stats(a) => stats(g, a),
        Command::Undelete(a) => undelete(g, a),
        Command::Tier(a) => tier(g, a),
        Command::Schema => crate::runs::schema(),
        Command::Validate(a) => crate::runs::validate(g, a),
        Command::Plan(a) => crate::runs::plan(g, a),
        Command::Run(a) => crate::runs::run(g, a, "run"),
        Command::Drill(a) => crate::runs::run(g, a, "drill"),
        Command::Resume(a) => crate::runs::resume(g, a),
        Command::Runs(a) => crate::runs::runs(g, a),
        Command::Report(a) => crate::runs::report(g, a),
        Command::Approve(a) => crate::runs::approve(g, a),
        Command::Verified => crate::runs::verified(g),
        Command::Cancel(a) => crate::runs::cancel(g, a),
        Command::Rollback(a) => crate::runs::rollback(g, a),
        Command::Serve(a) => crate::server::serve(g, a),
        Command::Openapi => crate::server::print_openapi(),
    }
}

fn repo_location(g: &Global) -> Result<&str> {
    g.repo.as_deref().filter(|r| !r.is_empty()).ok_or_else(|| {
        UsageError("no repository given: pass -r/--repo PATH or set FERRY_REPO".into()).into()
    })
}

/// The password from --password-file, FERRY_PASSWORD, or a prompt on a terminal.
fn password(g: &Global, confirm: bool) -> Result<Vec<u8>> {
    if let Some(file) = &g.password_file {
        let mut s = std::fs::read(file)
            .with_context(|| format!("cannot read password file {}", file.display()))
            .map_err(|e| UsageError(output::error_chain(&e)))?;
        while s.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            s.pop();
        }
        return Ok(s);
    }
    if let Ok(p) = std::env::var("FERRY_PASSWORD") {
        return Ok(p.into_bytes());
    }
    if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password("repository password: ")?;
        if confirm && rpassword::prompt_password("again: ")? != p {
            return Err(UsageError("the passwords differ; nothing was created".into()).into());
        }
        return Ok(p.into_bytes());
    }
    Err(UsageError("no password: set FERRY_PASSWORD or pass --password-file FILE".into()).into())
}

/// The password from --password-file or FERRY_PASSWORD, or a prompt on a
/// terminal when a repository is given; `None` when there is no way to get one.
pub(crate) fn password_quiet(g: &Global) -> Result<Option<Vec<u8>>> {
    if g.password_file.is_some()
        || std::env::var_os("FERRY_PASSWORD").is_some()
        || (g.repo.is_some() && std::io::stdin().is_terminal())
    {
        return password(g, false).map(Some);
    }
    Ok(None)
}

pub(crate) fn open(g: &Global) -> Result<Repository> {
    open_with(g, false)
}

/// Open the repository; `long_lived` keeps the immutable objects it reads
/// (index objects, points) for a process that backs up again and again.
pub(crate) fn open_with(g: &Global, long_lived: bool) -> Result<Repository> {
    let mut store = ferry_connectors::store::open(repo_location(g)?, false)?;
    if long_lived {
        store = store.with_immutable_cache();
    }
    let pw = password(g, false)?;
    Ok(Repository::open(store, &pw)?)
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn init(g: &Global, a: &InitArgs) -> Result<ExitCode> {
    let size = output::parse_size(&a.chunk_size)
        .filter(|&s| s <= u32::MAX as u64)
        .ok_or_else(|| {
            UsageError(format!(
                "cannot read chunk size {:?} (e.g. 64KiB)",
                a.chunk_size
            ))
        })? as u32;
    let chunker = match a.chunker {
        ChunkerKind::Fixed => Chunker::Fixed { size },
        ChunkerKind::Cdc => Chunker::Cdc {
            min: size / 4,
            avg: size,
            max: size * 4,
        },
    };
    let location = repo_location(g)?;
    let store = ferry_connectors::store::open(location, true)?;
    let pw = password(g, true)?;
    if pw.is_empty() {
        return Err(UsageError("the password is empty; choose one".into()).into());
    }
    let repo = Repository::init(
        store,
        &pw,
        InitOptions {
            chunker,
            compression_level: a.compression,
            lock: a.object_lock.map(|m| ferry_agent::store::LockPolicy {
                mode: match m {
                    LockModeArg::Compliance => ferry_agent::store::LockMode::Compliance,
                    LockModeArg::Governance => ferry_agent::store::LockMode::Governance,
                },
                days: a.lock_days,
            }),
            ..InitOptions::default()
        },
    )?;
    if g.json {
        print_json(repo.config())?;
    } else {
        println!(
            "created repository {} at {location} ({} chunks, zstd level {})",
            &repo.config().id[..8],
            chunker.describe(),
            a.compression
        );
        if let Some(l) = repo.config().lock {
            println!(
                "every object is written under S3 Object Lock ({}, {} days)",
                l.mode.as_str(),
                l.days
            );
        }
        println!("keep the password safe: without it the data cannot be read");
    }
    Ok(ExitCode::SUCCESS)
}

fn backup(g: &Global, a: &BackupArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let mut specs = Vec::new();
    let mut sources: Vec<Box<dyn BlockSource>> = Vec::new();
    for (i, d) in a.disks.iter().enumerate() {
        if NbdUrl::is_nbd(d) {
            let url = NbdUrl::parse(d).map_err(ferry_agent::Error::InvalidInput)?;
            let name = match url.export.rsplit('/').next() {
                Some(n) if !n.is_empty() => n.to_string(),
                _ => format!("disk{i}"),
            };
            sources.push(Box::new(NbdSource::open(&url)?));
            specs.push(DiskSpec {
                name,
                path: PathBuf::from(url.to_string()),
            });
        } else {
            let spec = DiskSpec::from_path(d);
            sources.push(Box::new(FileSource::open(&spec.path)?));
            specs.push(spec);
        }
    }
    let opts = BackupOptions {
        source: a.source.clone(),
        disks: specs,
        consistency: a.consistency.map(|c| match c {
            ConsistencyArg::Crash => Consistency::Crash,
            ConsistencyArg::App => Consistency::App,
            ConsistencyArg::Fuzzy => Consistency::Fuzzy,
        }),
        time: None,
    };
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), "backup", !g.quiet && !g.json);
    let refs: Vec<&dyn BlockSource> = sources.iter().map(|s| s.as_ref()).collect();
    let s = ferry_agent::backup::backup_sources(&repo, &opts, &refs, &progress).map_err(|e| {
        let storage = matches!(e, ferry_agent::Error::Store { .. } | ferry_agent::Error::Unreachable { .. });
        let full = ferry_agent::store::is_storage_full(&e);
        let e = anyhow::Error::from(e);
        if full {
            e.context("the repository's disk is full; nothing was committed: free space and run the backup again, the packs already written are reused")
        } else if storage {
            e.context("nothing was committed: fix the repository's storage and run the backup again, the packs already written are reused")
        } else {
            e
        }
    })?;
    drop(bar);
    if g.json {
        print_json(&s)?;
    } else {
        println!(
            "recovery point {} of {} committed ({})",
            &s.point[..8],
            s.source,
            s.consistency
        );
        println!(
            "  read {} of {}, new {} stored as {} in {} pack(s), {:.2} s ({}/s)",
            bytes(s.bytes_read),
            bytes(s.disk_bytes),
            bytes(s.new_bytes),
            bytes(s.stored_bytes),
            s.packs_written,
            s.duration_secs,
            bytes((s.bytes_read as f64 / s.duration_secs.max(1e-6)) as u64),
        );
        if let Some(c) = s.changed_bytes {
            println!(
                "  change map: {} changed since the parent point, {} new stored",
                bytes(c),
                bytes(s.stored_bytes)
            );
        }
        if s.packs_recovered > 0 {
            println!(
                "  reused {} pack(s) left by an interrupted backup",
                s.packs_recovered
            );
        }
        print_requests(&s.requests);
    }
    Ok(ExitCode::SUCCESS)
}

fn points(g: &Global, a: &PointsArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let (points, bad) = repo.points()?;
    let points: Vec<_> = points
        .into_iter()
        .filter(|p| a.source.as_ref().is_none_or(|s| &p.meta.source == s))
        .collect();
    for e in &bad {
        eprintln!("ferry: warning: {e}; run `ferry check`");
    }
    if g.json {
        let v: Vec<_> = points
            .iter()
            .map(|p| {
                serde_json::json!({
                    "id": p.id, "source": p.meta.source, "time": p.meta.time,
                    "parent": p.meta.parent, "consistency": p.meta.consistency,
                    "host": p.meta.host, "tool_version": p.meta.tool_version,
                    "disks": p.meta.disks,
                })
            })
            .collect();
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<10} {:<20} {:<16} {:<11} {:>10}  disks",
        "id", "time (UTC)", "source", "consistency", "size"
    );
    for p in &points {
        let size: u64 = p.meta.disks.iter().map(|d| d.size).sum();
        let names: Vec<_> = p.meta.disks.iter().map(|d| d.name.as_str()).collect();
        println!(
            "{:<10} {:<20} {:<16} {:<11} {:>10}  {}",
            p.short_id(),
            p.meta.time.format("%Y-%m-%d %H:%M:%S"),
            p.meta.source,
            p.meta.consistency.to_string(),
            bytes(size),
            names.join(", ")
        );
    }
    println!("{} recovery point(s)", points.len());
    Ok(ExitCode::SUCCESS)
}

fn serve_nbd(g: &Global, a: &ServeNbdArgs) -> Result<ExitCode> {
    use ferry_connectors::nbd::point_export::PointExport;
    use ferry_connectors::nbd::server::{self, Export, Listener};
    let started = std::time::Instant::now();
    let repo = open(g)?;
    let point = repo.resolve(&a.point)?;
    let disk = match &a.disk {
        Some(d) => point
            .meta
            .disks
            .iter()
            .position(|m| &m.name == d)
            .ok_or_else(|| {
                ferry_agent::Error::InvalidInput(format!(
                    "point {} has no disk {d:?}; it has {}",
                    point.short_id(),
                    point
                        .meta
                        .disks
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?,
        None if point.meta.disks.len() == 1 => 0,
        None => {
            return Err(ferry_agent::Error::InvalidInput(format!(
                "point {} has {} disks; choose one with --disk ({})",
                point.short_id(),
                point.meta.disks.len(),
                point
                    .meta
                    .disks
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .into());
        }
    };
    let meta = point.meta.disks[disk].clone();
    let reader = ferry_agent::instant::DiskReader::open(repo, &point, disk, a.cache_mib << 20)?;
    let export: Arc<dyn Export> = match &a.overlay {
        Some(p) => Arc::new(PointExport::with_overlay(reader, p).with_context(|| {
            format!(
                "cannot create the overlay {} (it must not exist yet)",
                p.display()
            )
        })?),
        None => Arc::new(PointExport::read_only(reader)),
    };
    let name = a.name.clone().unwrap_or_else(|| meta.name.clone());
    let (listener, url) = match &a.socket {
        Some(path) => {
            // A socket file left by an earlier server that is gone.
            if std::os::unix::net::UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
            let l = std::os::unix::net::UnixListener::bind(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            (
                Listener::Unix(l),
                format!("nbd+unix:///{name}?socket={}", path.display()),
            )
        }
        None => {
            let l = std::net::TcpListener::bind(&a.listen)
                .with_context(|| format!("cannot listen on {}", a.listen))?;
            let addr = l.local_addr()?;
            (Listener::Tcp(l), format!("nbd://{addr}/{name}"))
        }
    };
    let mode = if a.overlay.is_some() {
        "writable, writes kept in the overlay"
    } else {
        "read-only"
    };
    if g.json {
        // One line, so a supervisor can read the URL and go on.
        println!(
            "{}",
            serde_json::json!({
                "url": url,
                "point": point.id,
                "disk": meta.name,
                "size": meta.size,
                "writable": a.overlay.is_some(),
                "ready_secs": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        println!(
            "serving point {} disk {} ({}, {mode}) at {url}; ready in {:.2} s; stop with Ctrl-C",
            point.short_id(),
            meta.name,
            bytes(meta.size),
            started.elapsed().as_secs_f64()
        );
    }
    use std::io::Write as _;
    std::io::stdout().flush()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    server::serve(listener, export, name, stop)?;
    Ok(ExitCode::SUCCESS)
}

fn restore(g: &Global, a: &RestoreArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let point = repo.resolve(&a.point)?;
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), "restore", !g.quiet && !g.json);
    let s = ferry_agent::restore::restore(
        &repo,
        &point,
        &RestoreOptions {
            target: a.to.clone(),
            disk: a.disk.clone(),
            overwrite: a.overwrite,
        },
        &progress,
    )?;
    drop(bar);
    if g.json {
        print_json(&s)?;
    } else {
        for d in &s.disks {
            println!(
                "restored {} ({}) to {}{}",
                d.name,
                bytes(d.size),
                d.path.display(),
                if d.resumed { " (resumed)" } else { "" }
            );
        }
        println!(
            "  point {}, wrote {}, {} chunk(s) fetched and verified, {} kept, {:.2} s",
            point.short_id(),
            bytes(s.bytes_written),
            s.chunks_fetched,
            s.chunks_kept,
            s.duration_secs
        );
        print_requests(&s.requests);
    }
    Ok(ExitCode::SUCCESS)
}

fn check(g: &Global, a: &CheckArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), "check", !g.quiet && !g.json);
    let r = ferry_agent::check::check(
        &repo,
        CheckOptions {
            read_data: a.read_data,
        },
        &progress,
    )?;
    drop(bar);
    if g.json {
        print_json(&r)?;
    } else {
        println!(
            "checked {} recovery point(s), {} pack(s), {} chunk(s){}",
            r.points,
            r.packs,
            r.chunks,
            if r.read_data {
                format!(", read {}", bytes(r.bytes_read))
            } else {
                String::new()
            }
        );
        for p in &r.problems {
            println!("damaged: {} {}", p.object, p.detail);
        }
        for p in &r.damaged_points {
            println!(
                "recovery point {} ({} at {}) cannot be fully restored: {} damaged chunk(s)",
                &p.id[..8.min(p.id.len())],
                p.source,
                p.time,
                p.damaged_chunks
            );
            for c in &p.chunks {
                println!("  {c}");
            }
        }
        if !r.unindexed_packs.is_empty() {
            println!(
                "note: {} pack(s) left by an interrupted backup are not indexed yet; the next backup indexes and reuses them",
                r.unindexed_packs.len()
            );
        }
        if r.ok {
            println!("no damage found");
        }
        print_requests(&repo.store().requests());
    }
    Ok(if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One line of request counts, for every command that talks to the store.
fn print_requests(r: &ferry_agent::store::Requests) {
    println!(
        "  requests: {} PUT, {} GET, {} LIST, {} DELETE ({} retried); {} up, {} down",
        r.puts,
        r.gets,
        r.lists,
        r.deletes,
        r.retries,
        bytes(r.bytes_up),
        bytes(r.bytes_down)
    );
}

fn forget(g: &Global, a: &ForgetArgs) -> Result<ExitCode> {
    let policy = a.keep.policy()?;
    let repo = open(g)?;
    let r = ferry_agent::prune::forget(&repo, &policy, a.source.as_deref(), &a.points, a.dry_run)?;
    if g.json && !a.prune {
        print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !g.json {
        let mut source = "";
        for p in &r.points {
            if p.source != source {
                source = &p.source;
                println!("{source}:");
            }
            println!(
                "  {} {}  {:<6} {}{}",
                &p.id[..8.min(p.id.len())],
                p.time.format("%Y-%m-%d %H:%M:%S"),
                if p.keep { "keep" } else { "remove" },
                p.reasons.join(", "),
                p.locked_until
                    .map(|u| format!(
                        " (under Object Lock until {}: kept)",
                        u.format("%Y-%m-%d %H:%M")
                    ))
                    .unwrap_or_default()
            );
        }
        let verb = if a.dry_run { "would remove" } else { "removed" };
        println!(
            "{verb} {} recovery point(s), kept {}{}",
            if a.dry_run {
                r.points.iter().filter(|p| !p.keep).count()
            } else {
                r.removed
            },
            r.points.iter().filter(|p| p.keep).count(),
            if r.locked > 0 {
                format!(
                    "; {} still under Object Lock stay until it expires",
                    r.locked
                )
            } else {
                String::new()
            }
        );
    }
    if a.prune && !a.dry_run {
        return prune(
            g,
            &PruneArgs {
                max_unused: 10.0,
                dry_run: false,
            },
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn prune(g: &Global, a: &PruneArgs) -> Result<ExitCode> {
    if !(0.0..=100.0).contains(&a.max_unused) {
        return Err(
            UsageError(format!("--max-unused {} is not a percentage", a.max_unused)).into(),
        );
    }
    let repo = open(g)?;
    let r = ferry_agent::prune::prune(
        &repo,
        ferry_agent::prune::PruneOptions {
            max_unused: a.max_unused / 100.0,
            dry_run: a.dry_run,
        },
    )?;
    if g.json {
        print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} recovery point(s) use {} of {} in {} pack(s)",
        r.points,
        bytes(r.live_bytes),
        bytes(r.stored_bytes),
        r.packs
    );
    if r.dry_run {
        println!(
            "would condemn {} pack(s) ({} of them repacked); nothing was changed",
            r.condemned_packs, r.repacked_packs
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "condemned {} pack(s) ({} repacked, {} copied); deleted {} pack(s), {} freed",
        r.condemned_packs,
        r.repacked_packs,
        bytes(r.repacked_bytes),
        r.deleted_packs,
        bytes(r.deleted_bytes)
    );
    if r.pending_packs > 0 {
        println!(
            "{} condemned pack(s) wait for running operations to finish ({}); the next prune deletes them",
            r.pending_packs,
            r.waiting_for.join(", ")
        );
    }
    if r.restored_packs > 0 {
        println!(
            "{} condemned pack(s) were put back: a backup made meanwhile uses them",
            r.restored_packs
        );
    }
    if r.locked_packs > 0 {
        println!(
            "{} pack(s) are under Object Lock{}; a later prune deletes them",
            r.locked_packs,
            r.locked_until
                .map(|u| format!(" until {}", u.format("%Y-%m-%d %H:%M UTC")))
                .unwrap_or_default()
        );
    }
    if r.extended > 0 {
        println!(
            "extended the Object Lock retention of {} object(s) still in use",
            r.extended
        );
    }
    print_requests(&r.requests);
    Ok(ExitCode::SUCCESS)
}

fn stats(g: &Global, a: &StatsArgs) -> Result<ExitCode> {
    let prices = match &a.prices {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| UsageError(format!("cannot read price table {}: {e}", f.display())))?;
            serde_json::from_str(&text).map_err(|e| {
                UsageError(format!(
                    "price table {} is not valid: {e}; start from `ferry stats --print-prices`",
                    f.display()
                ))
            })?
        }
        None => ferry_agent::stats::Prices::default(),
    };
    if a.print_prices {
        print_json(&prices)?;
        return Ok(ExitCode::SUCCESS);
    }
    let repo = open(g)?;
    let s = ferry_agent::stats::stats(&repo, &prices, a.storage_class.as_deref())?;
    if g.json {
        print_json(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("{} recovery point(s) of {} source(s)", s.points, s.sources);
    println!("  logical (all points)   {:>12}", bytes(s.logical_bytes));
    println!(
        "  logical (latest each)  {:>12}",
        bytes(s.latest_logical_bytes)
    );
    println!(
        "  after dedup            {:>12}  ({} unique chunks)",
        bytes(s.unique_bytes),
        s.unique_chunks
    );
    println!("  stored (packs)         {:>12}", bytes(s.pack_bytes));
    println!("  stored (all objects)   {:>12}", bytes(s.total_bytes));
    for (kind, (count, size)) in &s.objects {
        println!("    {kind:<10} {count:>8} object(s) {:>12}", bytes(*size));
    }
    println!("cost estimate ({}):", s.prices);
    println!(
        "  storage in {}: ${:.2} per month",
        s.storage_class, s.monthly_storage_cost
    );
    println!(
        "  restoring the latest point of every source: about {} GET(s), ${:.2} with egress",
        s.restore_latest_gets, s.restore_latest_cost
    );
    Ok(ExitCode::SUCCESS)
}

fn undelete(g: &Global, a: &UndeleteArgs) -> Result<ExitCode> {
    let store = ferry_connectors::store::open(repo_location(g)?, false)?;
    let r = ferry_agent::undelete::undelete(&store, a.dry_run)?;
    if g.json {
        print_json(&r)?;
    } else {
        for o in &r.restored {
            println!(
                "{} {o}",
                if a.dry_run {
                    "would put back"
                } else {
                    "put back"
                }
            );
        }
        for o in &r.lost {
            println!("lost: {o} (no version of it is left)");
        }
        println!(
            "{} object(s) examined, {} put back, {} lost",
            r.objects,
            r.restored.len(),
            r.lost.len()
        );
        print_requests(&store.requests());
    }
    Ok(if r.lost.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn tier(g: &Global, a: &TierArgs) -> Result<ExitCode> {
    let cutoff = match (&a.older_than, &a.before) {
        (Some(d), _) => {
            chrono::Utc::now()
                - ferry_agent::retention::Policy::parse_within(d).map_err(UsageError)?
        }
        (None, Some(t)) => ferry_agent::repo::parse_time(t)?,
        (None, None) => unreachable!("clap requires one of them"),
    };
    let repo = open(g)?;
    let r = ferry_agent::tier::tier(&repo, cutoff, &a.class, a.dry_run)?;
    if g.json {
        print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} {} pack(s) ({}) used only by points before {} to {}; {} pack(s) stay (newer points use them)",
        if r.dry_run { "would move" } else { "moved" },
        r.packs,
        bytes(r.bytes),
        r.cutoff.format("%Y-%m-%d %H:%M UTC"),
        r.class,
        r.kept
    );
    print_requests(&r.requests);
    Ok(ExitCode::SUCCESS)
}
