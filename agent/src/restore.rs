//! Restore: a recovery point back to image files or block devices.
//!
//! Chunks are fetched pack by pack with ranged reads (neighbouring blobs coalesced
//! into one request), verified against their ids, and written at every offset that
//! uses them, by several threads at once. Zeros are never written to files (the
//! output is sparse). A file is restored to `NAME.ferry-partial` and renamed when
//! complete; running the same restore again resumes: chunks already in place are
//! checked and kept, the rest fetched.

pub use crate::sink::{BlockSink, FileSink, MemSink};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;
use tracing::info;

use crate::crypto::ChunkId;
use crate::error::{Error, Result};
use crate::index::{self, IdMap};
use crate::pack;
use crate::point::{self, Point};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::source::is_zero;

/// Where and what to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// A directory (each disk becomes `DIR/NAME`), a file, or a block device.
    pub target: PathBuf,
    /// Restore only this disk.
    pub disk: Option<String>,
    /// Replace existing files instead of refusing.
    pub overwrite: bool,
    /// Write over existing disks in place, fetching and writing only the
    /// chunks that differ from what is there (failback, re-sync after a drill).
    pub delta: bool,
    /// With `delta`: the point the existing disks hold (they were restored
    /// from it, or backed up as it, and nothing has written to them since).
    /// What it shares with the point being restored is neither read nor
    /// written; a sample of its chunks is checked on the disk first.
    pub base: Option<Point>,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub point: String,
    pub disks: Vec<RestoredDisk>,
    pub bytes_written: u64,
    /// Chunks found already in place in a partial restore and kept.
    pub chunks_kept: u64,
    /// Bytes the base point shares with this one (`--base`): neither read
    /// nor written.
    pub bytes_skipped: u64,
    pub chunks_fetched: u64,
    pub duration_secs: f64,
    pub requests: crate::store::Requests,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoredDisk {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub resumed: bool,
    /// Restored over an existing disk in place (`--delta`).
    pub delta: bool,
}

/// Chunk lists restored together (1 GiB of disk): enough jobs to keep every
/// thread busy, little enough memory for any disk size.
const LISTS_PER_BATCH: usize = 16;
/// Coalesce blobs closer than this into one ranged read.
const MAX_GAP: u64 = 256 << 10;
/// Upper bound of one ranged read.
const MAX_READ: u64 = 8 << 20;
/// The granularity at which zeros inside a chunk are left as holes.
const SPARSE_BLOCK: usize = 4096;
/// Restored bytes between two background syncs.
const SYNC_EVERY: u64 = 256 << 20;
/// Restored bytes gathered before a write (one write may exceed it by one
/// chunk). Not more: writes of 1 MiB and more cost the kernel four to six
/// times the CPU here ([`crate::store::WRITE_PIECE`]); runs used to be cut at 4 MiB, but
/// restores wrote chunk by chunk anyway until the members of a group were read
/// in their order (see `index::plan_reads`).
const WRITE_BATCH: usize = 256 << 10;

/// Where (part of) a chunk goes: `len` bytes from `skip` into it, at disk offset `off`.
#[derive(Debug, Clone, Copy)]
struct Place {
    off: u64,
    skip: u32,
    len: u32,
}

type Job = index::RangedRead;

/// Restore a point.
pub fn restore(
    repo: &Repository,
    point: &Point,
    opts: &RestoreOptions,
    progress: &Progress,
) -> Result<Summary> {
    let started = Instant::now();
    // Held until the end: prune deletes nothing this restore may still read.
    let _lock = crate::lock::Lock::acquire(repo, "restore", false)?;
    let disks: Vec<usize> = match &opts.disk {
        Some(name) => vec![
            point
                .meta
                .disks
                .iter()
                .position(|d| &d.name == name)
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "recovery point {} has no disk {name:?}; it has: {}",
                        point.short_id(),
                        point
                            .meta
                            .disks
                            .iter()
                            .map(|d| d.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?,
        ],
        None => (0..point.meta.disks.len()).collect(),
    };
    for &d in &disks {
        let meta = &point.meta.disks[d];
        if point::disk_digest(&repo.key, meta.size, &point.lists[d]) != meta.digest {
            return Err(Error::corrupt(
                point::object_name(&point.id),
                format!("disk {} chunk list does not match its digest", meta.name),
            ));
        }
    }
    // Decoding already applied the rules; a point built in memory has not been decoded.
    point
        .meta
        .validate()
        .map_err(|e| Error::corrupt(point::object_name(&point.id), e))?;
    let target_is_dir = opts.target.is_dir();
    if !target_is_dir && disks.len() > 1 {
        return Err(Error::InvalidInput(format!(
            "recovery point {} has {} disks: restore to a directory, or pick one with --disk",
            point.short_id(),
            disks.len()
        )));
    }

    let (index, _) = crate::prune::readable_index(repo)?;
    let mut summary = Summary {
        point: point.id.clone(),
        disks: Vec::new(),
        bytes_written: 0,
        chunks_kept: 0,
        bytes_skipped: 0,
        chunks_fetched: 0,
        duration_secs: 0.0,
        requests: Default::default(),
    };
    for &d in &disks {
        progress.add_total(point.meta.disks[d].size);
    }
    for d in disks {
        let meta = &point.meta.disks[d];
        let final_path = if target_is_dir {
            opts.target.join(&meta.name)
        } else {
            opts.target.clone()
        };
        if let (Some(b), true) = (&opts.base, opts.delta) {
            // Checked before the disk is opened (which sizes a file to the point).
            base_disk(b, &meta.name, meta.size)?;
            if let Ok(m) = std::fs::metadata(&final_path)
                && m.is_file()
                && m.len() != meta.size
            {
                return Err(Error::InvalidInput(format!(
                    "{} holds {} bytes, so it does not hold point {} ({} bytes): nothing was written; restore with --delta alone",
                    final_path.display(),
                    m.len(),
                    b.short_id(),
                    meta.size
                )));
            }
        }
        let out = if opts.delta {
            FileSink::open_delta(&final_path, meta.size, !target_is_dir)?
        } else {
            FileSink::open(&final_path, meta.size, opts.overwrite, !target_is_dir)?
        };
        info!(disk = %meta.name, to = %final_path.display(), resumed = out.resumed(), "restoring");
        // The base's lists of this disk, when the disk holds the base.
        let base_lists = match (&opts.base, out.is_delta()) {
            (Some(b), true) => {
                let lists = base_disk(b, &meta.name, meta.size)?;
                verify_base(repo, &index, b, lists, meta.size, &out, &final_path)?;
                Some(lists)
            }
            _ => None,
        };
        let stats = restore_disk(repo, &index, point, d, &out, base_lists, None, progress)?;
        summary.bytes_written += stats.0;
        summary.chunks_kept += stats.1;
        summary.chunks_fetched += stats.2;
        summary.bytes_skipped += stats.3;
        summary.disks.push(RestoredDisk {
            name: meta.name.clone(),
            path: final_path.clone(),
            size: meta.size,
            resumed: out.resumed() && !out.is_delta(),
            delta: out.is_delta(),
        });
        out.finish()?;
    }
    summary.duration_secs = started.elapsed().as_secs_f64();
    summary.requests = repo.store.requests();
    Ok(summary)
}

/// What restoring one disk into a sink did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DiskStats {
    pub bytes_written: u64,
    pub chunks_kept: u64,
    pub chunks_fetched: u64,
    /// Bytes left alone because the disk already held them ([`Known`]).
    pub bytes_skipped: u64,
}

/// What a sink's disk is known to hold, so that a restore into it leaves
/// alone, without reading it, what already matches: the disk held `base`,
/// and since then only `changed` was written (a dirty bitmap's ranges).
/// What neither the changes nor the differences between `base` and the
/// point touch is neither read nor written.
#[derive(Clone, Copy, Debug, Default)]
pub struct Known<'a> {
    pub base: Option<&'a Point>,
    /// Byte ranges `(start, end)`, sorted and not overlapping.
    pub changed: Option<&'a [(u64, u64)]>,
}

/// Restores disk `disk` of `point` into any [`BlockSink`] (a file, a device,
/// a target's own volume or snapshot), under a repository lock, verifying
/// every chunk; the sink is finished (made durable and visible) at the end.
pub fn restore_into(
    repo: &Repository,
    point: &Point,
    disk: usize,
    sink: &dyn BlockSink,
    progress: &Progress,
) -> Result<DiskStats> {
    restore_into_known(repo, point, disk, sink, Known::default(), progress)
}

/// [`restore_into`] a sink whose disk is [`Known`] to hold a base point
/// except for a change map: only what the map marks and what differs from
/// the base is fetched and written, and nothing is read from the disk.
pub fn restore_into_known(
    repo: &Repository,
    point: &Point,
    disk: usize,
    sink: &dyn BlockSink,
    known: Known<'_>,
    progress: &Progress,
) -> Result<DiskStats> {
    let _lock = crate::lock::Lock::acquire(repo, "restore", false)?;
    point
        .meta
        .validate()
        .map_err(|e| Error::corrupt(point::object_name(&point.id), e))?;
    let meta = point.meta.disks.get(disk).ok_or_else(|| {
        Error::InvalidInput(format!(
            "recovery point {} has no disk number {disk}",
            point.short_id()
        ))
    })?;
    if point::disk_digest(&repo.key, meta.size, &point.lists[disk]) != meta.digest {
        return Err(Error::corrupt(
            point::object_name(&point.id),
            format!("disk {} chunk list does not match its digest", meta.name),
        ));
    }
    if sink.size() < meta.size {
        return Err(Error::InvalidInput(format!(
            "the target holds {} bytes, disk {} needs {}",
            sink.size(),
            meta.name,
            meta.size
        )));
    }
    let base = match (known.base, known.changed) {
        (Some(b), Some(_)) => Some(base_disk(b, &meta.name, meta.size)?),
        (None, None) => None,
        _ => {
            return Err(Error::InvalidInput(
                "a base point says what a disk held only together with what was written to it since (a change map)".into(),
            ));
        }
    };
    let (index, _) = crate::prune::readable_index(repo)?;
    progress.add_total(meta.size);
    let (bytes_written, chunks_kept, chunks_fetched, bytes_skipped) = restore_disk(
        repo,
        &index,
        point,
        disk,
        sink,
        base,
        known.changed,
        progress,
    )?;
    sink.finish()?;
    Ok(DiskStats {
        bytes_written,
        chunks_kept,
        chunks_fetched,
        bytes_skipped,
    })
}

/// `Err(Cancelled)` once the caller has asked the restore to stop.
fn cancelled(progress: &Progress) -> Result<()> {
    if progress.cancelled() {
        return Err(Error::Cancelled {
            operation: "the restore".into(),
            kept: "what it wrote is kept in the partial file, and the next restore to the same path resumes it".into(),
        });
    }
    Ok(())
}

/// The chunk lists of the base point's disk `name`, which must have `size`.
fn base_disk<'a>(base: &'a Point, name: &str, size: u64) -> Result<&'a [point::ListId]> {
    let i = base
        .meta
        .disks
        .iter()
        .position(|m| m.name == name && m.size == size)
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "the base point {} has no disk {name:?} of {size} bytes: restore without --base, which compares every chunk",
                base.short_id()
            ))
        })?;
    Ok(&base.lists[i])
}

/// Chunks of the base point checked on the disk before it is trusted.
const BASE_SAMPLES: usize = 32;

/// Check that the disk holds the base point, on a sample of its chunks spread
/// over the disk: a disk that was written since (or never held it) would be
/// left half-restored by a restore that trusts it.
fn verify_base(
    repo: &Repository,
    index: &index::Index,
    base: &Point,
    lists: &[point::ListId],
    size: u64,
    out: &dyn BlockSink,
    path: &std::path::Path,
) -> Result<()> {
    let spans = lists.len();
    let mut buf = Vec::new();
    let mut checked = 0;
    for n in 0..BASE_SAMPLES.min(spans) {
        let k = n * spans / BASE_SAMPLES.min(spans);
        let (start, span) = point::list_span(size, k);
        let mut off = start;
        for e in repo.load_list(index, &lists[k], span)? {
            let whole = match e.id {
                Some(id) => index.get(&id)?.map(|l| l.raw_len),
                None => None,
            };
            if let (Some(id), 0, Some(raw)) = (e.id, e.skip, whole)
                && raw == e.len
            {
                buf.resize(e.len as usize, 0);
                out.read_at(&mut buf, off)?;
                if repo.key.chunk_id(&buf) != id {
                    return Err(Error::InvalidInput(format!(
                        "{} does not hold point {} (the chunk at byte {off} differs; was it written since?): nothing was written; restore with --delta alone, which compares every chunk",
                        path.display(),
                        base.short_id()
                    )));
                }
                checked += 1;
                break;
            }
            off += u64::from(e.len);
        }
    }
    tracing::debug!(checked, "the disk holds the base point");
    Ok(())
}

/// Restore one disk; returns (bytes written, chunks kept, chunks fetched,
/// bytes skipped). With `base` (the lists of the point the disk holds), spans
/// and extents the two points share are neither read nor written.
/// Restores one disk of a point into `out`; with `base` (the lists of a point
/// the disk holds), what the two share is skipped, except where `changed`
/// (what was written to the disk since) says the disk no longer holds it.
#[allow(clippy::too_many_arguments)]
fn restore_disk(
    repo: &Repository,
    index: &index::Index,
    point: &Point,
    disk: usize,
    out: &dyn BlockSink,
    base: Option<&[point::ListId]>,
    changed: Option<&[(u64, u64)]>,
    progress: &Progress,
) -> Result<(u64, u64, u64, u64)> {
    let meta = &point.meta.disks[disk];
    // Whether the disk was written in [a, b) since it held the base.
    let touched = |a: u64, b: u64| {
        changed.is_some_and(|c| {
            let i = c.partition_point(|r| r.1 <= a);
            c.get(i).is_some_and(|r| r.0 < b)
        })
    };
    let mut totals = (0, 0, 0, 0);
    let load = |lid: &point::ListId, k: usize| -> Result<Vec<point::Extent>> {
        let (start, span) = point::list_span(meta.size, k);
        repo.load_list(index, lid, span).map_err(|e| match e {
            Error::Missing { ref object } | Error::Corrupt { ref object, .. }
                if object.starts_with("chunk list") =>
            {
                Error::DamagedChunk {
                    chunk: lid.to_hex(),
                    disk: meta.name.clone(),
                    offset: start,
                    detail: format!("it is the chunk list of the {span} bytes from here, and {e}"),
                }
            }
            e => e,
        })
    };
    // A batch of lists at a time, so memory does not grow with the disk; a
    // span the base shares ends a run of extents, restored on its own.
    for (b, batch) in point.lists[disk].chunks(LISTS_PER_BATCH).enumerate() {
        let first = b * LISTS_PER_BATCH;
        let mut run: Option<u64> = None;
        let mut extents = Vec::new();
        let mut same = Vec::new();
        let flush = |run: &mut Option<u64>,
                     extents: &mut Vec<point::Extent>,
                     same: &mut Vec<bool>|
         -> Result<(u64, u64, u64, u64)> {
            let t = match run.take() {
                Some(at) => {
                    restore_extents(repo, index, &meta.name, at, extents, same, out, progress)?
                }
                None => (0, 0, 0, 0),
            };
            extents.clear();
            same.clear();
            Ok(t)
        };
        let add = |totals: &mut (u64, u64, u64, u64), t: (u64, u64, u64, u64)| {
            *totals = (
                totals.0 + t.0,
                totals.1 + t.1,
                totals.2 + t.2,
                totals.3 + t.3,
            );
        };
        for (k, lid) in batch.iter().enumerate() {
            cancelled(progress)?;
            let k = first + k;
            let (start, span) = point::list_span(meta.size, k);
            let base_lid = base.and_then(|b| b.get(k));
            if base_lid == Some(lid) && !touched(start, start + span) {
                add(&mut totals, flush(&mut run, &mut extents, &mut same)?);
                progress.add_done(span);
                totals.3 += span;
                continue;
            }
            let list = load(lid, k)?;
            let differ = match base_lid {
                // The same list, written to since: only the changes differ.
                Some(old) if old == lid => Some(Vec::new()),
                Some(old) => Some(point::differing_ranges(start, &load(old, k)?, &list)),
                None => None,
            };
            let mut at = start;
            for e in &list {
                let end = at + u64::from(e.len);
                same.push(
                    differ.as_ref().is_some_and(|d| {
                        // Equal unless a differing range overlaps [at, end).
                        let i = d.partition_point(|r| r.1 <= at);
                        d.get(i).is_none_or(|r| r.0 >= end)
                    }) && !touched(at, end),
                );
                at = end;
            }
            run.get_or_insert(start);
            extents.extend(list);
        }
        add(&mut totals, flush(&mut run, &mut extents, &mut same)?);
    }
    Ok(totals)
}

/// Restore a run of extents starting at disk offset `base`; returns (bytes
/// written, chunks kept, chunks fetched).
#[allow(clippy::too_many_arguments)]
fn restore_extents(
    repo: &Repository,
    index: &index::Index,
    name: &str,
    base: u64,
    extents: &[point::Extent],
    same: &[bool],
    out: &dyn BlockSink,
    progress: &Progress,
) -> Result<(u64, u64, u64, u64)> {
    // Where every chunk goes (whole, or a slice of it); zero runs are handled here.
    let mut wanted: IdMap<Vec<Place>> = IdMap::default();
    let mut off = base;
    let mut skipped = 0u64;
    for (i, e) in extents.iter().enumerate() {
        if same.get(i).copied().unwrap_or(false) {
            // The disk holds the base point, which has this extent here.
            progress.add_done(e.len as u64);
            skipped += e.len as u64;
            off += e.len as u64;
            continue;
        }
        match e.id {
            None => {
                out.zero(off, e.len as u64)?;
                progress.add_done(e.len as u64);
            }
            Some(id) => wanted.entry(id).or_default().push(Place {
                off,
                skip: e.skip,
                len: e.len,
            }),
        }
        off += e.len as u64;
    }

    // A resumed restore keeps every whole chunk already in place (slices are
    // fetched again: a slice alone cannot be checked against the chunk's id).
    let mut kept = 0u64;
    if out.resumed() {
        let still: Mutex<IdMap<Vec<Place>>> = Mutex::default();
        let kept_n = AtomicU64::new(0);
        let items: Vec<_> = wanted.into_iter().collect();
        let next = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..std::thread::available_parallelism().map_or(2, |n| n.get()) {
                s.spawn(|| {
                    let mut buf = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some((id, places)) = items.get(i) else {
                            return;
                        };
                        if progress.cancelled() {
                            return;
                        }
                        // A lookup that fails only means the chunk is fetched.
                        let whole = index.get(id).ok().flatten().map(|l| l.raw_len);
                        let mut missing = Vec::new();
                        for p in places {
                            let good = p.skip == 0
                                && whole == Some(p.len)
                                && {
                                    buf.resize(p.len as usize, 0);
                                    out.read_at(&mut buf, p.off).is_ok()
                                }
                                && repo.key.chunk_id(&buf) == *id;
                            if good {
                                kept_n.fetch_add(1, Ordering::Relaxed);
                                progress.add_done(p.len as u64);
                            } else {
                                missing.push(*p);
                            }
                        }
                        if !missing.is_empty() {
                            still.lock().expect("resume map").insert(*id, missing);
                        }
                    }
                });
            }
        });
        wanted = still.into_inner().expect("resume map");
        kept = kept_n.into_inner();
        cancelled(progress)?;
    }

    // Every chunk must be in the index; report the missing one that comes first on the disk.
    let mut unindexed: Option<(u64, ChunkId)> = None;
    let mut located = Vec::with_capacity(wanted.len());
    for (id, places) in &wanted {
        match index.get(id)? {
            Some(loc) => located.push((*id, loc)),
            None => {
                let here = (places[0].off, *id);
                if unindexed.is_none_or(|first| here < first) {
                    unindexed = Some(here);
                }
            }
        }
    }
    if let Some((offset, id)) = unindexed {
        return Err(Error::DamagedChunk {
            chunk: id.to_hex(),
            disk: name.to_string(),
            offset,
            detail: "no pack holds it (its pack or index is missing)".into(),
        });
    }
    let jobs = index::plan_reads(located, MAX_GAP, MAX_READ);

    let written = AtomicU64::new(0);
    let fetched = AtomicU64::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let next = AtomicU64::new(0);
    let threads = restore_threads(
        std::thread::available_parallelism().map_or(2, |n| n.get()),
        repo.store.is_remote(),
        std::env::var("FERRY_RESTORE_THREADS").ok().as_deref(),
    )?;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // Start writeback while chunks are still arriving, so the final sync only
        // waits for the tail instead of the whole disk.
        s.spawn(|| {
            let mut synced = 0u64;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(50));
                let now = written.load(Ordering::Relaxed);
                if now - synced >= SYNC_EVERY {
                    let _ = out.flush();
                    synced = now;
                }
            }
        });
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut worker = Worker {
                        repo,
                        index,
                        wanted: &wanted,
                        disk: name,
                        out,
                        progress,
                        written: &written,
                        fetched: &fetched,
                        opener: pack::ChunkOpener::default(),
                        run: Vec::with_capacity(WRITE_BATCH + crate::chunker::MAX_CHUNK),
                    };
                    loop {
                        if failure.lock().expect("failure slot").is_some() {
                            return;
                        }
                        if let Err(e) = cancelled(progress) {
                            failure.lock().expect("failure slot").get_or_insert(e);
                            return;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(job) = jobs.get(i) else { return };
                        if let Err(e) = worker.run_job_through(job) {
                            failure.lock().expect("failure slot").get_or_insert(e);
                            return;
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        done.store(true, Ordering::Relaxed);
    });
    if let Some(e) = failure.into_inner().expect("failure slot") {
        return Err(e);
    }
    Ok((written.into_inner(), kept, fetched.into_inner(), skipped))
}

/// Threads that fetch, open and write chunks: `FERRY_RESTORE_THREADS` (1 to
/// 64) when set; else two per core, so that one waits on a read while the
/// other works, and four per core from object storage, where a ranged GET
/// waits on a round trip and on the server (docs/performance.md, Object
/// storage). Each holds at most one read of [`MAX_READ`] and a write batch.
/// `set` is the variable's value; empty counts as unset, anything else but a
/// count from 1 to 64 is refused (not silently replaced by the default).
fn restore_threads(cores: usize, remote: bool, set: Option<&str>) -> Result<usize> {
    match set.map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "FERRY_RESTORE_THREADS={v:?} is not a thread count from 1 to 64; \
                     set one or unset it for the default"
                ))
            }),
        None if remote => Ok((cores * 4).max(8)),
        None => Ok((cores * 2).max(4)),
    }
}

/// One restore thread: what it shares with the others, and the buffers it reuses
/// from one job to the next.
struct Worker<'a> {
    repo: &'a Repository,
    index: &'a index::Index,
    wanted: &'a IdMap<Vec<Place>>,
    disk: &'a str,
    out: &'a dyn BlockSink,
    progress: &'a Progress,
    written: &'a AtomicU64,
    fetched: &'a AtomicU64,
    opener: pack::ChunkOpener,
    run: Vec<u8>,
}

impl Worker<'_> {
    /// [`Worker::run_job`], and once more from the pack's original version when
    /// the store has versions and the current one was overwritten or hidden
    /// (chunks already written are written again with the same bytes; the byte
    /// counters then count them twice).
    fn run_job_through(&mut self, job: &Job) -> Result<()> {
        match self.run_job(job) {
            Err(e @ Error::DamagedChunk { .. }) => {
                let (pack_id, _) = self.index.pack(job.pack);
                if self
                    .repo
                    .store
                    .recover_original(&pack::object_name(&pack_id))?
                {
                    self.run_job(job)
                } else {
                    Err(e)
                }
            }
            other => other,
        }
    }

    /// Fetch one pack region, verify its chunks, and write them where they go.
    fn run_job(&mut self, job: &Job) -> Result<()> {
        let Worker {
            repo,
            index,
            wanted,
            disk,
            out,
            progress,
            written,
            fetched,
            ..
        } = *self;
        let (opener, run) = (&mut self.opener, &mut self.run);
        let (pack_id, _) = index.pack(job.pack);
        let name = pack::object_name(&pack_id);
        let damaged = |id: &ChunkId, detail: String| Error::DamagedChunk {
            chunk: id.to_hex(),
            disk: disk.to_string(),
            offset: wanted[id][0].off,
            detail,
        };
        let bytes = match repo.store.get_range(&name, job.start..job.end) {
            Ok(b) => b,
            Err(e @ (Error::Missing { .. } | Error::Corrupt { .. })) => {
                return Err(damaged(&job.blobs[0].0, format!("{name}: {e}")));
            }
            Err(e) => return Err(e),
        };
        // Chunks that follow each other on the disk are written with one call: one
        // large write costs the file system far less than many chunk-sized ones.
        run.clear();
        let mut run_start = 0u64;
        for (id, loc) in &job.blobs {
            let s = (loc.offset as u64 - job.start) as usize;
            let sealed = &bytes[s..s + loc.length as usize];
            let entry = loc.entry(*id);
            let plain = opener
                .open(&repo.key, &entry, sealed)
                .map_err(|d| damaged(id, format!("in {name}: {d}")))?;
            for place in &wanted[id] {
                let o = place.off;
                let (a, b) = (
                    place.skip as usize,
                    place.skip as usize + place.len as usize,
                );
                let Some(plain) = plain.get(a..b) else {
                    return Err(damaged(
                        id,
                        format!(
                            "a chunk list takes bytes {a}..{b} of it, but it has {} bytes",
                            plain.len()
                        ),
                    ));
                };
                // A fresh file already reads zeros: its zero blocks stay holes, so the
                // restored image is as sparse as the source was, block by block.
                let pieces: Box<dyn Iterator<Item = (usize, &[u8])>> = if out.fresh() {
                    Box::new(
                        plain
                            .chunks(SPARSE_BLOCK)
                            .enumerate()
                            .map(|(i, b)| (i * SPARSE_BLOCK, b))
                            .filter(|(_, b)| !is_zero(b)),
                    )
                } else {
                    Box::new(std::iter::once((0, plain)))
                };
                for (at, piece) in pieces {
                    let o = o + at as u64;
                    if !run.is_empty()
                        && (run_start + run.len() as u64 != o || run.len() >= WRITE_BATCH)
                    {
                        write_run(out, run, run_start, written)?;
                        run.clear();
                    }
                    if run.is_empty() {
                        run_start = o;
                    }
                    run.extend_from_slice(piece);
                }
                if !out.in_place() {
                    written.fetch_add(plain.len() as u64, Ordering::Relaxed);
                }
                progress.add_done(plain.len() as u64);
            }
            fetched.fetch_add(1, Ordering::Relaxed);
        }
        if !run.is_empty() {
            write_run(out, run, run_start, written)?;
        }
        Ok(())
    }
}

/// Write a run of restored bytes; over an existing disk, only the blocks that
/// differ, counted as they are written.
fn write_run(out: &dyn BlockSink, run: &[u8], at: u64, written: &AtomicU64) -> Result<()> {
    if out.in_place() {
        written.fetch_add(out.write_differing(run, at)?, Ordering::Relaxed);
        Ok(())
    } else {
        out.write_at(run, at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_threads_follow_the_store_and_the_variable_and_refuse_nonsense() {
        // Two per core locally, four per core from object storage, at least 4 and 8.
        assert_eq!(restore_threads(2, false, None).unwrap(), 4);
        assert_eq!(restore_threads(2, true, None).unwrap(), 8);
        assert_eq!(restore_threads(16, false, None).unwrap(), 32);
        assert_eq!(restore_threads(16, true, None).unwrap(), 64);
        assert_eq!(restore_threads(2, true, Some("")).unwrap(), 8);
        assert_eq!(restore_threads(2, true, Some(" 3 ")).unwrap(), 3);
        assert_eq!(restore_threads(2, false, Some("64")).unwrap(), 64);
        for bad in ["0", "65", "lots", "-1", "2.5"] {
            let e = restore_threads(2, false, Some(bad))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("FERRY_RESTORE_THREADS") && e.contains("1 to 64") && e.contains(bad),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_cancelled_restore_stops_keeps_its_partial_and_resumes() {
        let repo = crate::testing::memory_repo();
        let mut data = vec![0u8; 8 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let point = crate::testing::backup_bytes(&repo, &data);
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("vda.raw");
        let ropts = RestoreOptions {
            target: target.clone(),
            disk: None,
            overwrite: false,
            delta: false,
            base: None,
        };

        let cancelled = Progress::default();
        cancelled.cancel();
        let err = restore(&repo, &point, &ropts, &cancelled).unwrap_err();
        assert!(matches!(err, Error::Cancelled { .. }), "{err}");
        assert!(err.to_string().contains("resumes"), "{err}");
        assert!(
            !target.exists(),
            "a cancelled restore left a finished-looking file"
        );
        assert!(dir.path().join("vda.raw.ferry-partial").exists());

        let again = restore(&repo, &point, &ropts, &Progress::default()).unwrap();
        assert!(again.disks[0].resumed);
        assert_eq!(std::fs::read(&target).unwrap(), data);
    }

    fn small_point() -> (Repository, Point, Vec<u8>) {
        let repo = crate::testing::memory_repo();
        let data: Vec<u8> = (0..(1u64 << 20)).map(|i| ((i * 7919) >> 3) as u8).collect();
        let point = crate::testing::backup_bytes(&repo, &data);
        (repo, point, data)
    }

    #[test]
    fn restored_files_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let (repo, point, data) = small_point();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("vda.raw");
        let opts = RestoreOptions {
            target: target.clone(),
            disk: None,
            overwrite: false,
            delta: false,
            base: None,
        };
        // A partial from an older ferry, readable by everyone, is tightened too.
        let partial = dir.path().join("vda.raw.ferry-partial");
        std::fs::write(&partial, b"").unwrap();
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o644)).unwrap();
        restore(&repo, &point, &opts, &Progress::default()).unwrap();
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a restored disk is {mode:o}");
        assert_eq!(std::fs::read(&target).unwrap(), data);

        std::fs::remove_file(&target).unwrap();
        restore(&repo, &point, &opts, &Progress::default()).unwrap();
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a fresh restored disk is {mode:o}");
    }

    #[test]
    fn a_link_planted_at_the_partial_path_is_refused_and_not_written_through() {
        let (repo, point, _) = small_point();
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let to = dir.path().join("to");
        std::fs::create_dir(&to).unwrap();
        let partial = to.join("vda.ferry-partial");
        let opts = RestoreOptions {
            target: to.clone(),
            disk: None,
            overwrite: true,
            delta: false,
            base: None,
        };
        // A link at the final path inside the directory is removed with
        // --overwrite, never written through.
        std::os::unix::fs::symlink(&victim, to.join("vda")).unwrap();
        restore(&repo, &point, &opts, &Progress::default()).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(
            !to.join("vda")
                .symlink_metadata()
                .unwrap()
                .file_type()
                .is_symlink()
        );
        std::fs::remove_file(to.join("vda")).unwrap();
        for plant in ["symlink", "hard link"] {
            let _ = std::fs::remove_file(&partial);
            if plant == "symlink" {
                std::os::unix::fs::symlink(&victim, &partial).unwrap();
            } else {
                std::fs::hard_link(&victim, &partial).unwrap();
            }
            let err = restore(&repo, &point, &opts, &Progress::default()).unwrap_err();
            assert!(matches!(err, Error::UnsafeTarget { .. }), "{plant}: {err}");
            let msg = err.to_string();
            assert!(msg.contains("vda.ferry-partial"), "{msg}");
            assert!(msg.contains("remove it, and restore again"), "{msg}");
            assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "{plant}");
            assert!(!to.join("vda").exists());
        }
    }

    #[test]
    fn restore_into_any_sink_writes_the_disk_and_resumes() {
        let (repo, point, data) = small_point();
        let sink = MemSink::new(data.len() as u64);
        let stats = restore_into(&repo, &point, 0, &sink, &Progress::default()).unwrap();
        assert!(sink.finished());
        assert_eq!(sink.bytes(), data);
        assert!(stats.chunks_fetched > 0);
        // A sink that already holds the disk keeps every chunk and fetches none.
        let again = MemSink::resume(data.clone());
        let stats = restore_into(&repo, &point, 0, &again, &Progress::default()).unwrap();
        assert_eq!(again.bytes(), data);
        assert_eq!(stats.chunks_fetched, 0, "{stats:?}");
        // A sink too small is refused before anything is written.
        let small = MemSink::new(data.len() as u64 - 1);
        let e = restore_into(&repo, &point, 0, &small, &Progress::default()).unwrap_err();
        assert!(e.to_string().contains("needs"), "{e}");
    }
}
