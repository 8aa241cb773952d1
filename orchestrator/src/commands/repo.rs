//! The repository commands: init, backup, points, restore, check, forget,
//! prune, stats, undelete, tier and serve-nbd.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use ferry_agent::backup::{BackupOptions, DiskSpec};
use ferry_agent::check::CheckOptions;
use ferry_agent::chunker::Chunker;
use ferry_agent::point::Consistency;
use ferry_agent::progress::Progress;
use ferry_agent::repo::{InitOptions, Repository};
use ferry_agent::restore::RestoreOptions;
use ferry_agent::source::BlockSource;

use super::output::{self, Bar, bytes, print_json};
use crate::context::{Context, PasswordSource};
use crate::error::Error;

#[derive(Debug, Args)]
pub struct ServeNbdArgs {
    /// Recovery point: an id (or a unique prefix), SOURCE@latest, or SOURCE@TIME.
    pub point: String,
    /// The disk to serve (by name); needed when the point has several.
    #[arg(long)]
    pub disk: Option<String>,
    /// Listen on TCP (HOST:PORT; port 0 picks a free one, printed); needs
    /// --tls-cert and --tls-key, or --insecure.
    #[arg(long, value_name = "ADDR", conflicts_with = "socket")]
    pub listen: Option<String>,
    /// Listen on a unix socket at this path (mode 0600) rather than in a new
    /// private directory; a file there that is not a stale socket is never removed.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Require TLS (NBD STARTTLS): this server certificate (PEM), with --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Also require client certificates signed by this CA (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Serve --listen without TLS: anyone who can reach the port can read the
    /// decrypted disk (and write to it with --overlay).
    #[arg(long, requires = "listen", conflicts_with = "tls_cert")]
    pub insecure: bool,
    /// Clients served at once; more are refused with a message.
    #[arg(long, default_value_t = 16)]
    pub max_connections: usize,
    /// Seconds a client may take to negotiate before it is dropped.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub handshake_timeout: f64,
    /// Seconds a client may stay idle (no request, no reply taken) before it is dropped.
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    pub idle_timeout: f64,
    /// Memory for request and reply payloads over all clients, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub buffer_mib: u64,
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
    /// Points older than this (e.g. 30d, 6mo, 1y) are "older"; their packs that no
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
    /// Keep every point within this long of the newest one: y, mo (months), w, d, h, min, s; e.g. 30min, 36h, 7d, 1y6mo.
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
            .map_err(Error::Usage)?;
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
    /// Where packs are cut, 4MiB to 128MiB [default: 128MiB in object
    /// storage without replicas, else 16MiB]. Larger packs
    /// mean fewer objects
    /// (per-object fees, listings); packs over 16MiB are built in a
    /// temporary file (FERRY_SPILL_DIR, TMPDIR or /var/tmp) and uploaded in
    /// 16MiB parts, so memory does not grow with them, but `check
    /// --read-data` reads fewer at once and prune frees space later and in
    /// larger steps; see docs/performance.md (object storage).
    #[arg(long)]
    pub pack_size: Option<String>,
    /// Make recovery points immutable with S3 Object Lock: every object is written
    /// with a retention in this mode (the bucket must have Object Lock enabled).
    #[arg(long, value_enum)]
    pub object_lock: Option<LockModeArg>,
    /// Days each object stays locked after it is written (or last extended by prune).
    #[arg(long, default_value_t = 30, requires = "object_lock")]
    pub lock_days: u32,
    /// Another replica of the repository (repeat for each): a directory, s3://,
    /// gs:// or az:// location, ideally in another cloud. The repository (-r)
    /// is the first replica; each replica's config records them all, so any of
    /// them opens the whole set.
    #[arg(long = "replica", value_name = "LOCATION")]
    pub replicas: Vec<String>,
    /// Replicas that must hold an object before a write succeeds (default: a
    /// majority). What the others miss is recorded and given by `ferry repair`.
    #[arg(long, requires = "replicas")]
    pub write_quorum: Option<usize>,
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The destination repository (create it first with `ferry -r LOCATION init`);
    /// its own password and keys: the data is re-encrypted and deduplicated there.
    #[arg(long = "to", value_name = "LOCATION")]
    pub to: String,
    /// The destination's password file (else FERRY_TO_PASSWORD, else a prompt).
    #[arg(long, env = "FERRY_TO_PASSWORD_FILE")]
    pub to_password_file: Option<PathBuf>,
    /// Only this source's points.
    #[arg(long)]
    pub source: Option<String>,
    /// Points to copy (ids, prefixes, SOURCE@latest, SOURCE@TIME); all when none.
    pub points: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RepairArgs {
    /// Report what each replica lacks; copy nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also read every pack, index object and point on every replica and
    /// rewrite the ones whose bytes do not match their name.
    #[arg(long)]
    pub read_data: bool,
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
    /// Image files, block devices, NBD exports:
    /// nbd://HOST[:PORT]/EXPORT[?bitmap=NAME], nbd+unix:///EXPORT?socket=PATH[&bitmap=NAME],
    /// or EBS snapshots (agentless, through the EBS direct APIs):
    /// ebs://snap-ID[?region=NAME&endpoint=URL&name=DISK&parent=snap-ID].
    /// With a bitmap, only the extents it marks dirty are read: it must hold every
    /// write since the source's latest point. An EBS snapshot is read
    /// incrementally from the snapshot the disk's latest point was taken from
    /// (ListChangedBlocks), or from `parent`.
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
    /// A directory (one file per disk), an image file, a block device,
    /// `ebs://[?region=NAME&endpoint=URL]`: a new EBS snapshot written
    /// through the EBS direct APIs (one disk; needs --disk when the point has
    /// several; a killed restore to EBS resumes when run again), or an
    /// existing disk exported over NBD (`nbd://HOST:PORT/EXPORT`,
    /// `nbd+unix:///EXPORT?socket=PATH`), written in place; with
    /// `&bitmap=NAME` (its dirty bitmap since it held the --base point) the
    /// restore reads nothing of the disk.
    #[arg(long = "to")]
    pub to: PathBuf,
    /// Restore only this disk.
    #[arg(long)]
    pub disk: Option<String>,
    /// Replace existing image files.
    #[arg(long)]
    pub overwrite: bool,
    /// Restore over an existing disk (an image file or a block device) in
    /// place: every chunk's place is read and hashed, and only the chunks
    /// that differ are fetched and written (failback, re-sync after a drill).
    /// A target that is not there is restored whole.
    #[arg(long, conflicts_with = "overwrite")]
    pub delta: bool,
    /// With --delta: the recovery point the existing disk holds (it was
    /// restored from it, or backed up as it, and has not run since, like the
    /// original disks at failback). What the two points share is neither read
    /// nor written; a sample of the base's chunks is checked on the disk first.
    #[arg(long, requires = "delta", value_name = "POINT")]
    pub base: Option<String>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Read and verify every byte of every pack.
    #[arg(long)]
    pub read_data: bool,
}

pub fn init(ctx: &Context, a: &InitArgs) -> Result<ExitCode> {
    let size = output::parse_size(&a.chunk_size)
        .filter(|&s| s <= u32::MAX as u64)
        .ok_or_else(|| {
            Error::Usage(format!(
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
    let pack_size = match &a.pack_size {
        Some(text) => output::parse_size(text)
            .ok_or_else(|| Error::Usage(format!("cannot read pack size {text:?} (e.g. 32MiB)")))?,
        None => ferry_agent::pack::DEFAULT_PACK_SIZE as u64,
    };
    let mut opts = InitOptions {
        chunker,
        compression_level: a.compression,
        lock: a.object_lock.map(|m| ferry_agent::store::LockPolicy {
            mode: match m {
                LockModeArg::Compliance => ferry_agent::store::LockMode::Compliance,
                LockModeArg::Governance => ferry_agent::store::LockMode::Governance,
            },
            days: a.lock_days,
        }),
        write_quorum: a.write_quorum,
        pack_size,
        ..InitOptions::default()
    };
    // Refused before a directory or bucket prefix is created for nothing.
    opts.validate()?;
    let location = ctx.repo_location()?;
    let store = ferry_connectors::store::open(&replica_location(location), true)?;
    for r in &a.replicas {
        opts.replicas
            .push(ferry_connectors::store::open(&replica_location(r), true)?);
    }
    // In object storage, larger packs: a quarter of restic's objects per GiB
    // for no more memory (docs/performance.md, Pack size), with or without
    // Object Lock. Not with replicas, which send one payload to every
    // replica and so would hold each pack whole in memory.
    if a.pack_size.is_none() && opts.replicas.is_empty() && store.is_remote() {
        opts.pack_size = ferry_agent::pack::REMOTE_PACK_SIZE as u64;
    }
    let pw = ctx.password(true)?;
    ferry_agent::crypto::check_new_password(pw.bytes())?;
    let repo = Repository::init(store, pw.bytes(), opts)?;
    if ctx.json {
        print_json(repo.config())?;
    } else {
        println!(
            "created repository {} at {location} ({} chunks, zstd level {}, {} MiB packs)",
            &repo.config().id[..8],
            chunker.describe(),
            a.compression,
            repo.config().pack_size as f64 / f64::from(1 << 20)
        );
        if let Some(l) = repo.config().lock {
            println!(
                "every object is written under S3 Object Lock ({}, {} days)",
                l.mode.as_str(),
                l.days
            );
        }
        if let Some(rc) = &repo.config().replicas {
            println!(
                "{} replicas; a write succeeds when {} hold it:",
                rc.replicas.len(),
                rc.write_quorum
            );
            for r in &rc.replicas {
                println!(
                    "  {} {}{}",
                    r.id,
                    r.location,
                    match r.lock {
                        Some(l) => format!(" (Object Lock {}, {} days)", l.mode.as_str(), l.days),
                        None => String::new(),
                    }
                );
            }
        }
        println!("keep the password safe: without it the data cannot be read");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn backup(ctx: &Context, a: &BackupArgs) -> Result<ExitCode> {
    let repo = ctx.open_repo(false)?;
    let mut specs = Vec::new();
    let mut sources: Vec<Box<dyn BlockSource>> = Vec::new();
    let mut taken = None;
    for (i, d) in a.disks.iter().enumerate() {
        if let Some(rest) = d.strip_prefix("ebs://") {
            let (spec, src) = ebs_source(&repo, &a.source, rest)?;
            // The point is as of the snapshot's instant, not the backup's.
            taken = taken.or(src.start_time);
            sources.push(Box::new(src));
            specs.push(spec);
        } else {
            let (spec, src) = crate::backups::open_disk(d, i)?;
            sources.push(src);
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
        time: taken,
        group: None,
    };
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), "backup", !ctx.quiet && !ctx.json);
    let refs: Vec<&dyn BlockSource> = sources.iter().map(|s| s.as_ref()).collect();
    let s = ferry_agent::backup::backup_sources(&repo, &opts, &refs, &progress).map_err(|e| {
        let storage = matches!(
            e,
            ferry_agent::Error::Store { .. } | ferry_agent::Error::Unreachable { .. }
        );
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
    if ctx.json {
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

pub fn points(ctx: &Context, a: &PointsArgs) -> Result<ExitCode> {
    let repo = ctx.open_repo(false)?;
    let (points, bad) = repo.points()?;
    let points: Vec<_> = points
        .into_iter()
        .filter(|p| a.source.as_ref().is_none_or(|s| &p.meta.source == s))
        .collect();
    for e in &bad {
        eprintln!("ferry: warning: {e}; run `ferry check`");
    }
    if ctx.json {
        let v: Vec<_> = points
            .iter()
            .map(|p| {
                serde_json::json!({
                    "id": p.id, "source": p.meta.source, "time": p.meta.time,
                    "parent": p.meta.parent, "consistency": p.meta.consistency,
                    "host": p.meta.host, "tool_version": p.meta.tool_version,
                    "disks": p.meta.disks, "group": p.meta.group,
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
        if let Some(g) = &p.meta.group {
            println!(
                "{:<10} group {} cut {}: {} of {} members, skew {:.0} ms{}",
                "",
                g.name,
                g.round,
                g.arrived.len(),
                g.members.len(),
                g.skew_ms,
                if g.complete() {
                    ""
                } else {
                    " (INCOMPLETE: not one moment with the missing)"
                }
            );
        }
    }
    println!("{} recovery point(s)", points.len());
    Ok(ExitCode::SUCCESS)
}

pub fn serve_nbd(ctx: &Context, a: &ServeNbdArgs) -> Result<ExitCode> {
    use ferry_connectors::nbd::listen::{self, ListenError, ListenOptions};
    use ferry_connectors::nbd::point_export::PointExport;
    use ferry_connectors::nbd::server::{Export, Limits, ServeOptions, Server};
    use ferry_connectors::nbd::tls::TlsFiles;
    let started = std::time::Instant::now();
    let usage = |e: ListenError| -> anyhow::Error {
        if e.is_usage() {
            Error::Usage(e.to_string()).into()
        } else {
            e.into()
        }
    };
    let listen_opts = ListenOptions {
        socket: a.socket.clone(),
        tcp: a.listen.clone(),
        tls: a
            .tls_cert
            .clone()
            .zip(a.tls_key.clone())
            .map(|(cert, key)| TlsFiles {
                cert,
                key,
                ca: a.tls_ca.clone(),
            }),
        insecure: a.insecure,
    };
    // Before the repository is opened: a refused address costs no wait.
    listen_opts.check().map_err(usage)?;
    let repo = ctx.open_repo(false)?;
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
    let bound = listen::bind(&listen_opts, &name).map_err(usage)?;
    if let Some(w) = &bound.warning {
        eprintln!("{w}");
    }
    let url = bound.url.clone();
    let mode = if a.overlay.is_some() {
        "writable, writes kept in the overlay"
    } else {
        "read-only"
    };
    if ctx.json {
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
    let secs = |s: f64, flag: &str| {
        std::time::Duration::try_from_secs_f64(s)
            .map_err(|_| Error::Usage(format!("{flag} must be a number of seconds, not {s}")))
    };
    let server = Server::new(
        export,
        name,
        ServeOptions {
            limits: Limits {
                max_connections: a.max_connections,
                handshake_timeout: secs(a.handshake_timeout, "--handshake-timeout")?,
                idle_timeout: secs(a.idle_timeout, "--idle-timeout")?,
                buffer_budget: a.buffer_mib << 20,
                ..Limits::default()
            },
            tls: bound.tls.clone(),
        },
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    server.serve(bound.listener, &stop)?;
    Ok(ExitCode::SUCCESS)
}

pub fn restore(ctx: &Context, a: &RestoreArgs) -> Result<ExitCode> {
    if let Some(rest) = a.to.to_str().and_then(|t| t.strip_prefix("ebs://")) {
        return restore_ebs(ctx, a, rest);
    }
    if let Some(to) =
        a.to.to_str()
            .filter(|t| ferry_connectors::nbd::NbdUrl::is_nbd(t))
    {
        return restore_nbd(ctx, a, to);
    }
    let repo = ctx.open_repo(false)?;
    let point = repo.resolve(&a.point)?;
    let base = match &a.base {
        Some(b) => Some(repo.resolve(b)?),
        None => None,
    };
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), "restore", !ctx.quiet && !ctx.json);
    let s = ferry_agent::restore::restore(
        &repo,
        &point,
        &RestoreOptions {
            target: a.to.clone(),
            disk: a.disk.clone(),
            overwrite: a.overwrite,
            delta: a.delta,
            base,
        },
        &progress,
    )?;
    drop(bar);
    if ctx.json {
        print_json(&s)?;
    } else {
        for d in &s.disks {
            println!(
                "restored {} ({}) to {}{}",
                d.name,
                bytes(d.size),
                d.path.display(),
                if d.resumed {
                    " (resumed)"
                } else if d.delta {
                    " (in place: only what differed)"
                } else {
                    ""
                }
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
        if s.bytes_skipped > 0 {
            println!(
                "  {} the disk shares with the base point were neither read nor written",
                bytes(s.bytes_skipped)
            );
        }
        print_requests(&s.requests);
    }
    Ok(ExitCode::SUCCESS)
}

/// What `ferry restore --to ebs://` did (`--json`).
#[derive(Debug, serde::Serialize)]
struct EbsRestore {
    snapshot_id: String,
    point: String,
    disk: String,
    size: u64,
    /// Blocks put by this run (512 KiB each).
    blocks_put: u64,
    /// Blocks of zeros, never sent.
    blocks_zero: u64,
    /// Blocks an interrupted earlier run had put.
    blocks_resumed: u64,
    /// `PutSnapshotBlock` requests, retries included.
    requests: u64,
    /// An earlier run had completed this snapshot already.
    already_complete: bool,
    duration_secs: f64,
}

/// `ebs://[ID][?region=NAME&endpoint=URL&OPTION=VALUE...]`: the id part,
/// where the SDK finds AWS, and the `extra` options it may also carry.
fn parse_ebs_url(
    rest: &str,
    extra: &[&str],
) -> Result<(String, ferry_aws::AwsConfig, BTreeMap<String, String>)> {
    let mut cfg = ferry_aws::AwsConfig::default();
    let mut options = BTreeMap::new();
    let (id, query) = rest.split_once('?').unwrap_or((rest, ""));
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned();
        match k {
            "region" => cfg.region = Some(v),
            "endpoint" => cfg.endpoint = Some(v),
            k if extra.contains(&k) => {
                options.insert(k.to_owned(), v);
            }
            _ => {
                let mut takes = vec!["region=", "endpoint="];
                let more: Vec<String> = extra.iter().map(|e| format!("{e}=")).collect();
                takes.extend(more.iter().map(String::as_str));
                return Err(Error::Usage(format!(
                    "ebs://: unknown option `{k}`; it takes {}",
                    takes.join(", ")
                ))
                .into());
            }
        }
    }
    Ok((id.to_owned(), cfg, options))
}

/// `ebs://SNAPSHOT_ID[?name=DISK&parent=SNAPSHOT_ID]` as a backup source:
/// the disk's name is `name`, else the snapshot's volume id; the parent is
/// `parent`, else the snapshot the source's latest point of that disk was
/// taken from (an incremental through `ListChangedBlocks`).
fn ebs_source(
    repo: &ferry_agent::Repository,
    source: &str,
    rest: &str,
) -> Result<(DiskSpec, ferry_aws::source::EbsSource)> {
    let (id, cfg, opts) = parse_ebs_url(rest, &["name", "parent"])?;
    let src_of = |e: ferry_aws::Error| anyhow::Error::from(e).context(format!("ebs://{id}"));
    if !id.starts_with("snap-") {
        return Err(Error::Usage(format!(
            "ebs://{rest}: name the snapshot to back up: ebs://snap-...[?region=NAME&endpoint=URL&name=DISK]"
        ))
        .into());
    }
    // The source's latest point, for the parent snapshot and the disk name.
    let latest = repo
        .points()?
        .0
        .into_iter()
        .rfind(|p| p.meta.source == source);
    let parent_of = |name: &str| {
        latest.as_ref().and_then(|p| {
            p.meta
                .disks
                .iter()
                .find(|d| d.name == name)
                .and_then(|d| d.tracking.as_deref())
                .and_then(ferry_aws::source::snapshot_of)
                .map(str::to_owned)
        })
    };
    let mut src = ferry_aws::source::EbsSource::open(&cfg, &id).map_err(src_of)?;
    let name = opts
        .get("name")
        .cloned()
        .or_else(|| src.volume_id.clone())
        .unwrap_or_else(|| id.clone());
    match opts.get("parent").cloned().or_else(|| parent_of(&name)) {
        Some(p) if p != id => src.since(&p).map_err(src_of)?,
        _ => {}
    }
    if let Some(problem) = ferry_agent::point::disk_name_problem(&name) {
        return Err(Error::Usage(format!("ebs://{rest}: disk name `{name}` {problem}")).into());
    }
    Ok((
        DiskSpec {
            name,
            path: PathBuf::from(format!("ebs://{id}")),
        },
        src,
    ))
}

/// The disk `--disk` names, or the point's only one: for targets that hold
/// one disk (`what`).
fn one_disk(point: &ferry_agent::point::Point, disk: Option<&str>, what: &str) -> Result<usize> {
    let names = || {
        point
            .meta
            .disks
            .iter()
            .map(|x| x.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match disk {
        Some(d) => Ok(point
            .meta
            .disks
            .iter()
            .position(|x| x.name == d)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "recovery point {} has no disk `{d}`; it has: {}",
                    point.short_id(),
                    names()
                ))
            })?),
        None if point.meta.disks.len() == 1 => Ok(0),
        None => Err(Error::Usage(format!(
            "recovery point {} has {} disks and {what} holds one: name it with --disk",
            point.short_id(),
            point.meta.disks.len()
        ))
        .into()),
    }
}

/// What `restore --to nbd://...` did.
#[derive(serde::Serialize)]
struct NbdRestore {
    point: String,
    disk: String,
    to: String,
    /// `bitmap` (the export's dirty bitmap and --base: nothing unchanged is
    /// read), `compare` (--delta: every chunk's place read and compared) or
    /// `full`.
    mode: &'static str,
    bytes_written: u64,
    bytes_skipped: u64,
    /// Bytes read from the export (the existing disk).
    disk_bytes_read: u64,
    /// Bytes the bitmap marks as written since the base.
    changed_bytes: Option<u64>,
    chunks_fetched: u64,
    duration_secs: f64,
}

/// `restore --to nbd://...`: onto an existing disk exported over NBD (a VM's
/// disk under `qemu-nbd`), in place. With `?bitmap=NAME` and `--base`, the
/// bitmap is the disk's change map since it held the base: only what it
/// marks and what differs between the base and the point is written, and
/// nothing is read from the disk. With `--delta` alone every chunk's place is
/// read and compared; without either, the whole disk is written.
fn restore_nbd(ctx: &Context, a: &RestoreArgs, to: &str) -> Result<ExitCode> {
    use ferry_agent::source::BlockSource;
    use ferry_connectors::nbd::{NbdSource, NbdUrl, sink::NbdSink};
    let url = NbdUrl::parse(to).map_err(|e| Error::Usage(format!("--to {to}: {e}")))?;
    let mode = match (url.bitmap.is_some(), a.delta, a.base.is_some()) {
        (true, true, true) => "bitmap",
        (true, _, false) | (true, false, _) => {
            return Err(Error::usage(format!(
                "--to {url}?bitmap=...: a dirty bitmap says what was written to the disk since it held a point; name that point with --delta --base POINT"
            ))
            .into());
        }
        (false, true, true) => {
            return Err(Error::usage(format!(
                "--to {url} --base: nothing says what was written to the disk since it held the base; give the export's dirty bitmap since then (?bitmap=NAME), or drop --base to compare every block"
            ))
            .into());
        }
        (false, true, false) => "compare",
        (false, false, _) => "full",
    };
    let started = std::time::Instant::now();
    let repo = ctx.open_repo(false)?;
    let point = repo.resolve(&a.point)?;
    let base = a.base.as_deref().map(|b| repo.resolve(b)).transpose()?;
    let disk = one_disk(&point, a.disk.as_deref(), "an NBD export")?;
    // The export's bitmap, read as a backup reads it: the disk's change map.
    let changed = match mode {
        "bitmap" => NbdSource::open(&url)?.change_map()?.map(|m| m.ranges),
        _ => None,
    };
    let sink = NbdSink::open(&url, mode == "compare")?;
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), "restore", !ctx.quiet && !ctx.json);
    let stats = ferry_agent::restore::restore_into_known(
        &repo,
        &point,
        disk,
        &sink,
        ferry_agent::restore::Known {
            base: base.as_ref(),
            changed: changed.as_deref(),
        },
        &progress,
    )?;
    drop(bar);
    let out = NbdRestore {
        point: point.id.clone(),
        disk: point.meta.disks[disk].name.clone(),
        to: url.to_string(),
        mode,
        bytes_written: stats.bytes_written,
        bytes_skipped: stats.bytes_skipped,
        disk_bytes_read: sink.bytes_read(),
        changed_bytes: changed.as_ref().map(|c| c.iter().map(|(s, e)| e - s).sum()),
        chunks_fetched: stats.chunks_fetched,
        duration_secs: started.elapsed().as_secs_f64(),
    };
    if ctx.json {
        print_json(&out)?;
    } else {
        println!(
            "restored {} of point {} onto {} in place ({})",
            out.disk,
            point.short_id(),
            out.to,
            match mode {
                "bitmap" => "through the export's dirty bitmap: nothing unchanged was read",
                "compare" => "every block compared: only what differed was written",
                _ => "every block written",
            }
        );
        println!(
            "  wrote {}, read {} of the disk, {} chunk(s) fetched and verified, {} left alone, {:.2} s",
            bytes(out.bytes_written),
            bytes(out.disk_bytes_read),
            out.chunks_fetched,
            bytes(out.bytes_skipped),
            out.duration_secs
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn restore_ebs(ctx: &Context, a: &RestoreArgs, rest: &str) -> Result<ExitCode> {
    let (id, cfg, _) = parse_ebs_url(rest, &[])?;
    if !id.is_empty() {
        return Err(Error::Usage(format!(
            "ebs://{rest}: a restore makes a new snapshot; write ebs:// or ebs://?region=NAME&endpoint=URL"
        ))
        .into());
    }
    let started = std::time::Instant::now();
    let repo = ctx.open_repo(false)?;
    let point = repo.resolve(&a.point)?;
    let disk = one_disk(&point, a.disk.as_deref(), "an EBS snapshot")?;
    let meta = point.meta.disks[disk].clone();
    // The journal that lets a killed restore resume: per point and disk,
    // private (the staging file beside it holds decrypted blocks in flight).
    let key = format!("restore-{}/{}", point.short_id(), meta.name);
    let dir = ctx.home.join("ebs").join(format!(
        "{}-{}",
        point.id,
        crate::step::file_stem(&meta.name)
    ));
    crate::fsutil::create_private_dir(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let description = format!(
        "Ferry: {} disk {} point {}",
        point.meta.source, meta.name, point.id
    );
    let (aws, opened) = rt.block_on(async {
        let aws = ferry_aws::Aws::connect(&cfg).await?;
        let opened =
            ferry_aws::ebs::EbsSink::open(&aws, &key, meta.size, &description, &dir).await?;
        Ok::<_, ferry_aws::Error>((aws, opened))
    })?;
    let mut out = EbsRestore {
        snapshot_id: String::new(),
        point: point.id.clone(),
        disk: meta.name.clone(),
        size: meta.size,
        blocks_put: 0,
        blocks_zero: 0,
        blocks_resumed: 0,
        requests: 0,
        already_complete: false,
        duration_secs: 0.0,
    };
    match opened {
        ferry_aws::ebs::Opened::Complete(id) => {
            out.snapshot_id = id;
            out.already_complete = true;
        }
        ferry_aws::ebs::Opened::Writer(sink) => {
            let progress = Arc::new(Progress::default());
            let bar = Bar::start(progress.clone(), "restore", !ctx.quiet && !ctx.json);
            ferry_agent::restore::restore_into(&repo, &point, disk, &sink, &progress)?;
            drop(bar);
            let w = sink.written();
            out.snapshot_id = w.snapshot_id;
            out.blocks_put = w.blocks_put;
            out.blocks_zero = w.blocks_zero;
            out.blocks_resumed = w.blocks_resumed;
            out.requests = w.requests;
            rt.block_on(ferry_aws::ebs::wait_completed(
                &aws,
                &out.snapshot_id,
                std::time::Duration::from_secs(1800),
            ))?;
        }
    }
    out.duration_secs = started.elapsed().as_secs_f64();
    if ctx.json {
        print_json(&out)?;
    } else {
        println!(
            "restored {} ({}) of point {} to EBS snapshot {}",
            out.disk,
            bytes(out.size),
            point.short_id(),
            out.snapshot_id
        );
        if out.already_complete {
            println!("  an earlier run had completed it; nothing was sent");
        } else {
            println!(
                "  {} block(s) put, {} zero block(s) skipped, {} resumed from an interrupted run, {:.2} s",
                out.blocks_put, out.blocks_zero, out.blocks_resumed, out.duration_secs
            );
        }
    }
    // The journal stays (a few bytes, marked complete): running the same
    // restore again answers with this snapshot instead of making another.
    Ok(ExitCode::SUCCESS)
}

/// A replica's location as the config records it: a directory by its absolute
/// path, so that any working directory opens it again.
fn replica_location(location: &str) -> String {
    if location.contains("://") || location.starts_with("memory:") {
        return location.to_string();
    }
    std::path::absolute(location)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| location.to_string())
}

/// Print each replica's state (check and repair).
fn print_replicas(r: &ferry_agent::replica::RepairReport, repaired: bool) {
    println!(
        "{} replicas, write quorum {}; {} object(s) compared, {} record(s) of missed objects",
        r.replicas.len(),
        r.write_quorum,
        r.objects,
        r.records
    );
    for s in &r.replicas {
        let state = if !s.reachable {
            format!("UNREACHABLE: {}", s.error.as_deref().unwrap_or("no answer"))
        } else if repaired {
            format!(
                "{} missing, {} recorded, {} damaged; copied {} object(s), {}{}",
                s.missing,
                s.recorded,
                s.damaged,
                s.copied,
                bytes(s.copied_bytes),
                if s.failed > 0 {
                    format!("; {} could not be repaired", s.failed)
                } else {
                    String::new()
                }
            )
        } else if s.missing + s.damaged + s.recorded_damaged == 0 {
            if s.recorded > 0 {
                format!(
                    "in sync ({} recorded object(s) arrived since; `ferry repair` removes the records)",
                    s.recorded
                )
            } else {
                "in sync".to_string()
            }
        } else {
            format!(
                "BEHIND: {} missing, {} damaged ({} recorded); run `ferry repair`",
                s.missing,
                s.damaged + s.recorded_damaged,
                s.recorded
            )
        };
        println!("  replica {} {}: {state}", s.id, s.location);
    }
}

pub fn copy(ctx: &Context, a: &CopyArgs) -> Result<ExitCode> {
    let src = ctx.open_repo(false)?;
    let dest_password =
        PasswordSource::from_file_or_var(a.to_password_file.clone(), "FERRY_TO_PASSWORD");
    let dctx = Context::new(
        Some(a.to.clone()),
        dest_password,
        Some(&ctx.state_url),
        ctx.home.clone(),
    );
    let dst = dctx.open_repo(false).map_err(|e| {
        e.context(format!(
            "cannot open the destination repository {} (create it with `ferry -r {} init`; its password comes from --to-password-file or FERRY_TO_PASSWORD)",
            a.to, a.to
        ))
    })?;
    if dst.config().id == src.config().id {
        return Err(Error::Usage(format!(
            "{} is the repository being copied (or a replica of it)",
            a.to
        ))
        .into());
    }
    let points: Vec<_> = if a.points.is_empty() {
        src.points()?.0
    } else {
        a.points
            .iter()
            .map(|r| src.resolve(r))
            .collect::<Result<_, _>>()?
    };
    let points: Vec<_> = points
        .into_iter()
        .filter(|p| a.source.as_ref().is_none_or(|s| &p.meta.source == s))
        .collect();
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), "copy", !ctx.quiet && !ctx.json);
    let r = ferry_agent::copy::copy(&src, &dst, &points, &progress)?;
    drop(bar);
    if ctx.json {
        print_json(&r)?;
    } else {
        for c in &r.points {
            println!(
                "{} {} at {} -> {}{}",
                &c.from[..8],
                c.source,
                c.time.format("%Y-%m-%d %H:%M:%S UTC"),
                &c.to[..8],
                if c.already {
                    " (copied before)".to_string()
                } else {
                    format!(
                        ": read {}{}, {} new",
                        bytes(c.bytes_read),
                        if c.incremental {
                            " (the difference from the previous point)"
                        } else {
                            ""
                        },
                        bytes(c.new_bytes)
                    )
                }
            );
        }
        println!(
            "copied {} point(s) in {:.1} s",
            r.points.len(),
            r.duration_secs
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn repair(ctx: &Context, a: &RepairArgs) -> Result<ExitCode> {
    let repo = ctx.open_repo(false)?;
    let Some(set) = ferry_agent::replica::of(repo.store()) else {
        return Err(Error::Usage(format!(
            "the repository at {} has no replicas: nothing to repair (create one with `ferry init --replica LOCATION ...`)",
            ctx.repo_location()?
        ))
        .into());
    };
    // Repair writes: it holds a lock like every writer, so a prune that finds
    // no live lock knows no write of it is in flight.
    let _lock = if a.dry_run {
        None
    } else {
        Some(ferry_agent::lock::Lock::acquire(&repo, "repair", false)?)
    };
    let r = set.repair(ferry_agent::replica::RepairOptions {
        dry_run: a.dry_run,
        read_data: a.read_data,
    })?;
    let ok = r.replicas.iter().all(|s| s.reachable && s.failed == 0) && (!a.dry_run || r.in_sync());
    if ctx.json {
        print_json(&r)?;
    } else {
        print_replicas(&r, !a.dry_run);
        if r.records_removed > 0 {
            println!("removed {} record(s) now fulfilled", r.records_removed);
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn check(ctx: &Context, a: &CheckArgs) -> Result<ExitCode> {
    let repo = ctx.open_repo(false)?;
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), "check", !ctx.quiet && !ctx.json);
    let r = ferry_agent::check::check(
        &repo,
        CheckOptions {
            read_data: a.read_data,
        },
        &progress,
    )?;
    drop(bar);
    record_check(ctx, &r);
    if ctx.json {
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
        if let Some(rep) = &r.replicas {
            print_replicas(rep, false);
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

/// Records a check's outcome in the state, where the console shows the
/// repository's health. A state that cannot be written is warned about: the
/// check's own answer (its output and exit code) stands either way.
fn record_check(ctx: &Context, r: &ferry_agent::check::Report) {
    let row = crate::inventory::check_row(
        &crate::control::new_run_id(),
        ctx.repo.as_deref().unwrap_or_default(),
        r,
    );
    let written = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                crate::state::State::open(&ctx.state_url)
                    .await?
                    .record_check(&row)
                    .await
            })
        });
    if let Err(e) = written {
        eprintln!(
            "ferry: warning: the check's result was not recorded in the state: {}",
            crate::error::anyhow_chain(&e)
        );
    }
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

pub fn forget(ctx: &Context, a: &ForgetArgs) -> Result<ExitCode> {
    let policy = a.keep.policy()?;
    let repo = ctx.open_repo(false)?;
    let r = ferry_agent::prune::forget(&repo, &policy, a.source.as_deref(), &a.points, a.dry_run)?;
    if ctx.json && !a.prune {
        print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !ctx.json {
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
            ctx,
            &PruneArgs {
                max_unused: 10.0,
                dry_run: false,
            },
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn prune(ctx: &Context, a: &PruneArgs) -> Result<ExitCode> {
    if !(0.0..=100.0).contains(&a.max_unused) {
        return Err(
            Error::Usage(format!("--max-unused {} is not a percentage", a.max_unused)).into(),
        );
    }
    let repo = ctx.open_repo(false)?;
    let r = ferry_agent::prune::prune(
        &repo,
        ferry_agent::prune::PruneOptions {
            max_unused: a.max_unused / 100.0,
            dry_run: a.dry_run,
        },
    )?;
    if ctx.json {
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
    let verb = if r.dry_run { "would remove" } else { "removed" };
    if r.invalid_objects > 0 {
        println!(
            "{verb} {} object(s) under packs/ that are not packs of this repository ({})",
            r.invalid_objects,
            bytes(r.invalid_bytes)
        );
    }
    if r.unfinished_writes > 0 {
        println!(
            "{verb} {} write(s) that never finished ({}): staging files or uploads in parts left by a process killed mid-write",
            r.unfinished_writes,
            bytes(r.unfinished_bytes)
        );
    }
    if r.unfinished_unlisted > 0 {
        println!(
            "could not list the writes that never finished in {} store(s) (see the warning); a bucket lifecycle rule can abort old uploads",
            r.unfinished_unlisted
        );
    }
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

pub fn stats(ctx: &Context, a: &StatsArgs) -> Result<ExitCode> {
    let prices = match &a.prices {
        Some(f) => {
            let text = std::fs::read_to_string(f).map_err(|e| {
                Error::Usage(format!("cannot read price table {}: {e}", f.display()))
            })?;
            serde_json::from_str(&text).map_err(|e| {
                Error::Usage(format!(
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
    let repo = ctx.open_repo(false)?;
    let s = ferry_agent::stats::stats(&repo, &prices, a.storage_class.as_deref())?;
    if ctx.json {
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

pub fn undelete(ctx: &Context, a: &UndeleteArgs) -> Result<ExitCode> {
    let store = ferry_connectors::store::open(ctx.repo_location()?, false)?;
    let r = ferry_agent::undelete::undelete(&store, a.dry_run)?;
    if ctx.json {
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

pub fn tier(ctx: &Context, a: &TierArgs) -> Result<ExitCode> {
    let cutoff = match (&a.older_than, &a.before) {
        (Some(d), _) => {
            chrono::Utc::now()
                - ferry_agent::retention::Policy::parse_within(d).map_err(Error::Usage)?
        }
        (None, Some(t)) => ferry_agent::repo::parse_time(t)?,
        (None, None) => unreachable!("clap requires one of them"),
    };
    let repo = ctx.open_repo(false)?;
    let r = ferry_agent::tier::tier(&repo, cutoff, &a.class, a.dry_run)?;
    if ctx.json {
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
    for rep in &r.replicas {
        match &rep.why {
            None => println!("  replica {} ({}): moved", rep.id, rep.location),
            Some(why) => println!("  replica {} ({}): {why}", rep.id, rep.location),
        }
    }
    print_requests(&r.requests);
    Ok(ExitCode::SUCCESS)
}
