//! Forget and prune: retention, and garbage collection that is safe while
//! backups, restores and checks run.
//!
//! `forget` removes recovery-point objects a retention policy does not keep.
//! `prune` reclaims the space of chunks no point references, in two phases:
//!
//! 1. **Condemn.** Under the prune lock, prune lists the locks (a snapshot),
//!    then every point, and computes the live chunks (chunk lists and the chunks
//!    they name). Packs with nothing live are condemned; packs mostly unused are
//!    repacked (their live blobs copied, still sealed, into new packs) and then
//!    condemned. Prune writes a new index that leaves the condemned packs out,
//!    then a *prune record* `trash/<id>` naming the condemned packs and the index
//!    objects it replaces, then deletes those index objects, then lists the locks
//!    again and writes `trash/<id>.waits` naming every live lock it saw.
//! 2. **Delete.** A condemned pack is deleted only once every lock named in its
//!    `.waits` is gone (so no backup or restore that read the old index still
//!    runs), and only after a fresh look at the points shows no live chunk whose
//!    only copy is in that pack; such a pack is put back in the index instead.
//!    With no concurrent operation, phase 2 follows phase 1 in the same run;
//!    otherwise a later prune finishes it.
//!
//! A backup never re-adopts a condemned pack as "left by an interrupted backup"
//! ([`trashed_packs`]). Every step leaves the repository valid if the process is
//! killed: the prune record is written before anything is deleted, and a record
//! without its `.waits` is redone by the next prune. Objects under Object Lock
//! cannot be deleted before they expire; they stay condemned and a later prune
//! deletes them.
//!
//! ```text
//! trash/<hex>         Envelope(kind Trash) || Sealed<JSON Record>
//! trash/<hex>.waits   Envelope(kind Trash) || Sealed<JSON Waits>
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::crypto::{ChunkId, random_hex};
use crate::error::{Error, Result};
use crate::format::{self, Kind};
use crate::index::{self, Index, PackRecord};
use crate::lock::{self, Lock};
use crate::pack::{self, ChunkOpener, PackWriter};
use crate::point::{self, Point};
use crate::repo::Repository;
use crate::retention::{self, Policy};
use crate::store::Requests;

/// Packs per index object written by prune.
const PACKS_PER_INDEX: usize = 2048;

/// What a prune record names.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    created: DateTime<Utc>,
    /// Condemned packs (hex ids).
    packs: Vec<String>,
    /// Index objects replaced by the new index.
    indexes: Vec<String>,
}

/// The locks that must be gone before a record's packs may be deleted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Waits {
    locks: Vec<String>,
}

fn seal<T: Serialize>(repo: &Repository, v: &T) -> Vec<u8> {
    let header = format::header(Kind::Trash);
    let mut out = header.to_vec();
    repo.key.seal_into(
        &header,
        &serde_json::to_vec(v).expect("record serialises"),
        &mut out,
    );
    out
}

fn unseal<T: for<'de> Deserialize<'de>>(repo: &Repository, name: &str) -> Result<T> {
    let bytes = repo.store.get(name)?;
    let body = format::split(name, Kind::Trash, &bytes)?;
    let json = repo
        .key
        .open(format::aad(&bytes), body)
        .ok_or_else(|| Error::corrupt(name, "does not authenticate"))?;
    serde_json::from_slice(&json).map_err(|e| Error::corrupt(name, e.to_string()))
}

/// Prune records by name, each with its waits when written.
fn records(repo: &Repository) -> Result<BTreeMap<String, (Record, Option<Waits>)>> {
    let names: HashSet<String> = repo
        .store
        .list("trash/")?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut out = BTreeMap::new();
    for name in names.iter().filter(|n| !n.ends_with(".waits")) {
        let record: Record = match unseal(repo, name) {
            Ok(r) => r,
            Err(Error::Missing { .. }) => continue, // finished by another prune
            Err(e) => return Err(e),
        };
        let waits_name = format!("{name}.waits");
        let waits = if names.contains(&waits_name) {
            match unseal(repo, &waits_name) {
                Ok(w) => Some(w),
                Err(Error::Missing { .. }) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        out.insert(name.clone(), (record, waits));
    }
    Ok(out)
}

/// Packs condemned by a prune and not yet deleted: backups must not re-index them.
pub fn trashed_packs(repo: &Repository) -> Result<HashSet<[u8; 32]>> {
    let mut out = HashSet::new();
    for (record, _) in records(repo)?.into_values() {
        for p in &record.packs {
            if let Some(id) = hex::decode(p).ok().and_then(|v| v.try_into().ok()) {
                out.insert(id);
            }
        }
    }
    Ok(out)
}

/// The index for reading (restore, check): the index objects plus the tables of
/// condemned packs not yet deleted. A point committed by a backup that read the
/// index before a prune may use chunks only those packs hold until the next
/// prune puts them back. Backups never use this: they must not dedup against
/// condemned packs.
pub fn readable_index(repo: &Repository) -> Result<(Index, Vec<Error>)> {
    let (mut index, mut damaged) = index::load(&repo.store, &repo.key)?;
    let mut trashed: Vec<_> = trashed_packs(repo)?.into_iter().collect();
    trashed.sort();
    for id in trashed {
        if index.has_pack(&id) {
            continue;
        }
        let name = pack::object_name(&id);
        let Some(size) = repo.store.size(&name)? else {
            continue;
        };
        match pack::read_table(&repo.store, &repo.key, &name, size) {
            Ok(entries) => index.add_pack(id, size, &entries)?,
            Err(Error::Missing { .. }) => {}
            Err(e) => damaged.push(e),
        }
    }
    Ok((index, damaged))
}

// ---------------------------------------------------------------- forget

/// What `forget` decided for one point.
#[derive(Debug, Clone, Serialize)]
pub struct Forgotten {
    pub id: String,
    pub source: String,
    pub time: DateTime<Utc>,
    pub keep: bool,
    pub reasons: Vec<&'static str>,
    /// Set when the point could not be removed because it is under Object Lock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForgetReport {
    pub points: Vec<Forgotten>,
    pub removed: usize,
    pub locked: usize,
    pub dry_run: bool,
    pub requests: Requests,
}

/// Delete a point's object; one under Object Lock is counted and kept.
fn remove_point(
    repo: &Repository,
    f: &mut Forgotten,
    removed: &mut usize,
    locked: &mut usize,
) -> Result<()> {
    match repo.store.delete(&point::object_name(&f.id)) {
        Ok(()) => *removed += 1,
        Err(Error::Locked { until, .. }) => {
            *locked += 1;
            f.locked_until = until;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Apply a retention policy to the points of every source (or one source), and
/// remove the points it does not keep (unless `dry_run`). With `explicit`
/// references, remove exactly those points instead.
pub fn forget(
    repo: &Repository,
    policy: &Policy,
    source: Option<&str>,
    explicit: &[String],
    dry_run: bool,
) -> Result<ForgetReport> {
    // A point forgotten on some replicas only would come back in the union
    // of their listings.
    if let (Some(set), false) = (crate::replica::of(&repo.store), dry_run) {
        set.require_all("forget")?;
    }
    if !explicit.is_empty() {
        if !policy.is_empty() {
            return Err(Error::InvalidInput(
                "give either recovery points or --keep-* options, not both (nothing was removed)"
                    .into(),
            ));
        }
        let chosen: Vec<Point> = explicit
            .iter()
            .map(|r| repo.resolve(r))
            .collect::<Result<_>>()?;
        let mut out = Vec::new();
        let (mut removed, mut locked) = (0, 0);
        for p in chosen {
            let mut f = Forgotten {
                id: p.id.clone(),
                source: p.meta.source.clone(),
                time: p.meta.time,
                keep: false,
                reasons: vec!["named"],
                locked_until: None,
            };
            if !dry_run {
                remove_point(repo, &mut f, &mut removed, &mut locked)?;
            }
            out.push(f);
        }
        return Ok(ForgetReport {
            points: out,
            removed,
            locked,
            dry_run,
            requests: repo.store.requests(),
        });
    }
    if policy.is_empty() {
        return Err(Error::InvalidInput(
            "no retention policy given: pass at least one --keep-* option or name the points to remove (nothing was removed)"
                .into(),
        ));
    }
    let (points, bad) = repo.points()?;
    for e in &bad {
        warn!(error = %e, "an unreadable recovery point is left alone");
    }
    let mut by_source: BTreeMap<&str, Vec<&Point>> = BTreeMap::new();
    for p in &points {
        if source.is_none_or(|s| s == p.meta.source) {
            by_source.entry(p.meta.source.as_str()).or_default().push(p);
        }
    }
    let mut out = Vec::new();
    let (mut removed, mut locked) = (0, 0);
    for pts in by_source.values() {
        for d in retention::apply(pts, |p| p.meta.time, policy) {
            let p = *d.item;
            let mut f = Forgotten {
                id: p.id.clone(),
                source: p.meta.source.clone(),
                time: p.meta.time,
                keep: d.keep,
                reasons: d.reasons.clone(),
                locked_until: None,
            };
            if !d.keep && !dry_run {
                remove_point(repo, &mut f, &mut removed, &mut locked)?;
            }
            out.push(f);
        }
    }
    Ok(ForgetReport {
        points: out,
        removed,
        locked,
        dry_run,
        requests: repo.store.requests(),
    })
}

// ---------------------------------------------------------------- prune

#[derive(Debug, Clone, Copy)]
pub struct PruneOptions {
    /// A pack whose unused fraction exceeds this is repacked (0 to 1).
    pub max_unused: f64,
    /// Decide and report, change nothing.
    pub dry_run: bool,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            max_unused: 0.10,
            dry_run: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub points: usize,
    pub packs: usize,
    pub stored_bytes: u64,
    pub live_bytes: u64,
    /// Packs condemned by this run (deleted now or by a later prune).
    pub condemned_packs: usize,
    pub repacked_packs: usize,
    pub repacked_bytes: u64,
    pub deleted_packs: usize,
    pub deleted_bytes: u64,
    /// Condemned packs waiting for running operations to finish.
    pub pending_packs: usize,
    /// Locks (operation@host:pid) that condemned packs wait for.
    pub waiting_for: Vec<String>,
    /// Condemned packs put back because a new point uses them.
    pub restored_packs: usize,
    /// Condemned packs under Object Lock, left for a later prune.
    pub locked_packs: usize,
    pub locked_until: Option<DateTime<Utc>>,
    /// Objects under `packs/` that are not packs of this repository, older than
    /// [`INVALID_PACK_GRACE`]: removed (or, in a dry run, that would be).
    pub invalid_objects: usize,
    pub invalid_bytes: u64,
    /// Writes that never finished, left by a process killed mid-write (a
    /// directory repository's staging files, S3's uploads in parts), judged
    /// [`abandoned`]: removed or aborted (or, in a dry run, that would be).
    pub unfinished_writes: usize,
    pub unfinished_bytes: u64,
    /// Stores (replicas) whose unfinished writes could not be listed (the
    /// warning says why); prune went on without them.
    pub unfinished_unlisted: usize,
    /// Objects whose Object Lock retention was extended (locked repositories).
    pub extended: usize,
    pub dry_run: bool,
    pub requests: Requests,
}

/// Live locks other than `own`, by name, with a printable description.
fn live_locks(repo: &Repository, own: &str) -> Result<BTreeMap<String, String>> {
    let now = Utc::now();
    let mut out = BTreeMap::new();
    for (name, info) in lock::list(repo)? {
        if name == own {
            continue;
        }
        match info {
            Ok(i) if i.is_stale(now) => {}
            Ok(i) => {
                let why = i.describe(&name, now);
                out.insert(name, why);
            }
            // An unreadable lock is treated as live: never delete on a guess.
            Err(e) => {
                out.insert(name, format!("unreadable lock ({e})"));
            }
        }
    }
    Ok(out)
}

/// Finds chunk lists through the index, else in condemned packs: a backup that
/// read the index before a prune may have committed a point whose lists (or
/// chunks) sit in packs that prune since condemned.
struct Lists<'a> {
    repo: &'a Repository,
    index: &'a Index,
    trashed: &'a HashSet<[u8; 32]>,
    extra: Option<Index>,
}

impl Lists<'_> {
    fn load(&mut self, id: &ChunkId, span: u64) -> Result<crate::repo::ListParts> {
        match self.repo.load_list_parts(&[self.index], id, span) {
            Err(Error::Missing { .. }) => {}
            r => return r,
        }
        if self.extra.is_none() {
            let mut extra = Index::default();
            for id in self.trashed {
                let name = pack::object_name(id);
                if let Some(size) = self.repo.store.size(&name)? {
                    extra.add_pack(
                        *id,
                        size,
                        &pack::read_table(&self.repo.store, &self.repo.key, &name, size)?,
                    )?;
                }
            }
            self.extra = Some(extra);
        }
        let extra = self.extra.as_ref().expect("built above");
        self.repo.load_list_parts(&[self.index, extra], id, span)
    }
}

/// The chunk lists and chunks the given points reference, each list read once.
fn live_chunks<'a>(
    lists: &mut Lists<'_>,
    points: impl IntoIterator<Item = &'a Point>,
    live: &mut HashSet<ChunkId>,
) -> Result<()> {
    // Lists walked in this call, apart from `live`: a list may be live already
    // as the base of a delta, which keeps only what the delta still uses, and
    // must still be walked when a point names it.
    let mut walked: HashSet<ChunkId> = HashSet::new();
    for p in points {
        for (disk, ids) in p.meta.disks.iter().zip(&p.lists) {
            for (i, id) in ids.iter().enumerate() {
                if !walked.insert(*id) {
                    continue;
                }
                live.insert(*id);
                let (_, span) = point::list_span(disk.size, i);
                let parts = lists.load(id, span).map_err(|e| match e {
                    // This machine's trouble, not the point's.
                    e @ Error::Spill { .. } => e,
                    e => Error::InvalidInput(format!(
                        "recovery point {} is damaged ({e}); prune deletes nothing while a point is unreadable: run `ferry check`",
                        p.short_id()
                    )),
                })?;
                // A delta list needs the lists it is built on, not the chunks
                // of theirs that its patches replaced.
                live.extend(parts.bases.iter().copied());
                live.extend(parts.extents.iter().filter_map(|x| x.id));
            }
        }
    }
    Ok(())
}

fn all_points(repo: &Repository) -> Result<Vec<Point>> {
    let (points, bad) = repo.points()?;
    if let Some(e) = bad.into_iter().next() {
        return Err(Error::InvalidInput(format!(
            "{e}; prune deletes nothing while a recovery point is unreadable: run `ferry check`"
        )));
    }
    Ok(points)
}

fn pack_id(hex_id: &str) -> Option<[u8; 32]> {
    hex::decode(hex_id).ok()?.try_into().ok()
}

/// Run both phases.
/// How old an object under `packs/` that is not a valid pack (and that no
/// index lists) must be before prune removes it. Validity, not age, is what
/// protects a running backup: every pack Ferry writes is complete when it
/// appears (one atomic put) and its table authenticates. The grace covers what
/// cannot be judged at one instant: an object whose write is still settling on
/// a store with slower listings, and a pack a newer Ferry is writing in a format
/// this one cannot read (whose index object follows within a lock's lifetime).
/// It is the lock staleness window, the time Ferry already allows any operation
/// to be silent before it is presumed dead.
pub const INVALID_PACK_GRACE: chrono::TimeDelta =
    chrono::TimeDelta::seconds(lock::STALE_AFTER.as_secs() as i64);

pub fn prune(repo: &Repository, opts: PruneOptions) -> Result<PruneReport> {
    prune_at(repo, opts, Utc::now())
}

/// Objects under `packs/` that no index lists, that are not condemned packs,
/// that are older than [`INVALID_PACK_GRACE`] at `now`, and that are not a pack
/// of this repository: their name is not a pack name, or their trailer and table
/// (read within the bounds of what Ferry writes) fail. Real unindexed packs are
/// kept: the next backup indexes them.
fn invalid_packs(
    repo: &Repository,
    indexed: &HashMap<[u8; 32], PackRecord>,
    trashed: &HashSet<[u8; 32]>,
    now: DateTime<Utc>,
) -> Result<Vec<(String, u64, String)>> {
    let mut out = Vec::new();
    for (name, size, modified) in repo.store.list_modified("packs/")? {
        if now - modified < INVALID_PACK_GRACE {
            continue;
        }
        let why = match pack::parse_name(&name) {
            None => "its name is not a pack name".to_string(),
            Some(id) if indexed.contains_key(&id) || trashed.contains(&id) => continue,
            Some(_) => match pack::read_unindexed_table(&repo.store, &repo.key, &name, size) {
                Ok(_) | Err(Error::Missing { .. }) => continue,
                Err(e @ Error::Corrupt { .. }) => e.to_string(),
                // Not a verdict on the object: a store error stops the prune.
                Err(e) => return Err(e),
            },
        };
        out.push((name, size, why));
    }
    Ok(out)
}

/// How long after its last sign of life a write is abandoned even while other
/// operations hold live locks: far beyond the slowest upload in parts (every
/// part retried to its last attempt at the longest timeout).
pub const ABANDONED_AFTER: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// Whether a write that never finished is abandoned, so prune may remove it.
///
/// `modified` is its last sign of life (a file's last write; an upload's
/// latest part, else its start). `others_live` says whether another operation
/// held a live lock when prune looked, after listing the write: every writer
/// holds a lock from before its first write, so a write listed before a look
/// that finds no lock has no live writer.
///
/// The time is believed when it falls between the repository's creation and
/// `now`, each give or take [`lock::MAX_FUTURE`]. Then the write is abandoned
/// once older than [`INVALID_PACK_GRACE`] if no other lock is live, and once
/// older than [`ABANDONED_AFTER`] whatever the locks (an upload whose parts are
/// retried at a long `FERRY_STORE_TIMEOUT` may be silent for most of an hour).
/// A time outside that span is the store's clock lying (moto dates every
/// upload 2010-11-10): the write is abandoned only if no other lock is live.
fn abandoned(
    modified: DateTime<Utc>,
    now: DateTime<Utc>,
    created: DateTime<Utc>,
    others_live: bool,
) -> bool {
    let skew = chrono::TimeDelta::from_std(lock::MAX_FUTURE).unwrap_or(chrono::TimeDelta::MAX);
    let believable = modified >= created - skew && modified <= now + skew;
    if !believable {
        return !others_live;
    }
    let age = now - modified;
    (age >= INVALID_PACK_GRACE && !others_live) || age >= ABANDONED_AFTER
}

/// Remove the writes that never finished (staging files, open uploads) that
/// are [`abandoned`], in every replica of a replicated repository.
fn sweep_unfinished(
    repo: &Repository,
    own: &str,
    now: DateTime<Utc>,
    dry_run: bool,
    report: &mut PruneReport,
) -> Result<()> {
    let stores: Vec<&crate::store::Store> = match crate::replica::of(&repo.store) {
        Some(set) => set.members().map(|(_, _, s)| s).collect(),
        None => vec![&repo.store],
    };
    for store in stores {
        // Cleaning up after killed writers is not worth failing a prune for:
        // credentials without `s3:ListBucketMultipartUploads`, or a store
        // that does not list uploads, leave them to the bucket's lifecycle.
        let found = match store.unfinished_writes() {
            Ok(f) => f,
            Err(e) => {
                warn!(store = store.location(), error = %e, "cannot list the writes that never finished; they stay (a bucket lifecycle rule can abort old uploads)");
                report.unfinished_unlisted += 1;
                continue;
            }
        };
        if found.is_empty() {
            continue;
        }
        // Looked at after the listing: see `abandoned`.
        let others_live = !live_locks(repo, own)?.is_empty();
        for l in found {
            if !abandoned(l.modified, now, repo.config.created, others_live) {
                continue;
            }
            warn!(object = %l.name, bytes = l.size, modified = %l.modified, dry_run, "removing a write that never finished");
            if !dry_run {
                store.remove_unfinished(&l)?;
            }
            report.unfinished_writes += 1;
            report.unfinished_bytes += l.size;
        }
    }
    Ok(())
}

/// [`prune`] as if the clock read `now`: what ages against the grace
/// ([`INVALID_PACK_GRACE`]) is judged from it. For tests that cannot wait half
/// an hour, and tools that judge by another clock.
pub fn prune_at(repo: &Repository, opts: PruneOptions, now: DateTime<Utc>) -> Result<PruneReport> {
    // Prune condemns what no point in the union of the replicas uses, and
    // deletes it from every replica: it needs all of them.
    if let (Some(set), false) = (crate::replica::of(&repo.store), opts.dry_run) {
        set.require_all("prune")?;
    }
    let own = Lock::acquire(repo, "prune", true)?;
    let mut report = PruneReport {
        dry_run: opts.dry_run,
        ..PruneReport::default()
    };

    // Locks first, then points: a lock gone from this snapshot belonged to an
    // operation whose point (if any) the listing below sees.
    let locks_before = live_locks(repo, own.name())?;
    let pending = records(repo)?;
    let trashed: HashSet<[u8; 32]> = pending
        .values()
        .flat_map(|(r, _)| r.packs.iter().filter_map(|p| pack_id(p)))
        .collect();

    // The index, without condemned packs; and which objects it came from.
    let index_names: Vec<String> = repo
        .store
        .list("index/")?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut records_by_pack: HashMap<[u8; 32], PackRecord> = HashMap::new();
    let mut loaded_names = Vec::new();
    for name in &index_names {
        let bytes = match index::get(&repo.store, name) {
            Ok(b) => b,
            Err(Error::Missing { .. }) => continue,
            Err(e) => return Err(e),
        };
        let recs = index::decode(&repo.key, name, &bytes).map_err(|e| {
            Error::InvalidInput(format!(
                "{e}; prune changes nothing while an index object is damaged: run `ferry check`"
            ))
        })?;
        for r in recs {
            if !trashed.contains(&r.id) {
                records_by_pack.entry(r.id).or_insert(r);
            }
        }
        loaded_names.push(name.clone());
    }
    let mut index = Index::default();
    let mut order: Vec<[u8; 32]> = records_by_pack.keys().copied().collect();
    order.sort();
    for id in &order {
        let r = &records_by_pack[id];
        index.add_pack(r.id, r.size, &r.entries)?;
    }

    let points = all_points(repo)?;
    let mut live = HashSet::new();
    live_chunks(
        &mut Lists {
            repo,
            index: &index,
            trashed: &trashed,
            extra: None,
        },
        &points,
        &mut live,
    )?;
    let seen_points: HashSet<String> = points.iter().map(|p| p.id.clone()).collect();
    report.points = points.len();

    // Objects planted under packs/ (or left there by anything but a backup).
    for (name, size, why) in invalid_packs(repo, &records_by_pack, &trashed, now)? {
        warn!(object = %name, reason = %why, dry_run = opts.dry_run, "removing an object under packs/ that is not a pack of this repository");
        if !opts.dry_run {
            match repo.store.delete(&name) {
                Ok(()) => {}
                // Planted with a retention: it stays until then, costing no backup more than its table.
                Err(e @ Error::Locked { .. }) => {
                    warn!(object = %name, error = %e, "cannot remove it yet");
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        report.invalid_objects += 1;
        report.invalid_bytes += size;
    }

    sweep_unfinished(repo, own.name(), now, opts.dry_run, &mut report)?;

    // Phase 2 for earlier records whose waits have cleared.
    if !opts.dry_run {
        for (name, (record, waits)) in &pending {
            let mut restored = Vec::new();
            match waits {
                None => {
                    // A prune stopped before writing the waits: finish its phase 1.
                    delete_indexes(repo, &record.indexes)?;
                    let locks = write_waits(repo, name, own.name())?;
                    if locks.is_empty() {
                        // Nobody else is here: only points committed since the
                        // listing above could still use the condemned packs.
                        add_fresh_points(repo, &index, &trashed, &seen_points, &mut live)?;
                        restored = settle(repo, name, record, &mut index, &live, &mut report)?;
                    } else {
                        report.pending_packs += record.packs.len();
                        report.waiting_for.extend(locks.into_values());
                    }
                }
                Some(w) => {
                    let blocking: Vec<String> = w
                        .locks
                        .iter()
                        .filter_map(|l| locks_before.get(l).cloned())
                        .collect();
                    if blocking.is_empty() {
                        restored = settle(repo, name, record, &mut index, &live, &mut report)?;
                    } else {
                        report.pending_packs += record.packs.len();
                        report.waiting_for.extend(blocking);
                    }
                }
            }
            // Put-back packs are indexed packs like any other from here on.
            for r in restored {
                order.push(r.id);
                records_by_pack.insert(r.id, r);
            }
        }
    }

    // Phase 1: condemn and repack.
    let locked_repo = repo.store.lock().is_some();
    let mut live_bytes: HashMap<u32, u64> = HashMap::new();
    // A compression group is live when any of its chunks is, and counts once.
    let mut live_blobs: HashSet<(u32, u32)> = HashSet::new();
    index.try_for_each_chunk(|id, loc| -> Result<()> {
        if live.contains(id) && live_blobs.insert((loc.pack, loc.offset)) {
            *live_bytes.entry(loc.pack).or_default() += u64::from(loc.length);
        }
        Ok(())
    })?;
    let mut condemned = Vec::new();
    let mut repack = Vec::new();
    for (pos, (id, size)) in index.packs().enumerate() {
        report.packs += 1;
        report.stored_bytes += size;
        let used = live_bytes.get(&(pos as u32)).copied().unwrap_or(0);
        report.live_bytes += used;
        // Waste is the sealed bytes of dead blobs only: a pack's header and
        // table are not reclaimed by repacking it, and counting them made a
        // small repacked pack look wasteful to every later prune.
        let dead = records_by_pack
            .get(&id)
            .map_or(0, |r| blob_bytes(&r.entries).saturating_sub(used));
        if used == 0 {
            condemned.push(id);
        } else if !locked_repo && dead > 0 && dead as f64 > opts.max_unused * size as f64 {
            // Under Object Lock the original could not be deleted before it
            // expires, so repacking would only add data.
            repack.push((pos as u32, id));
        }
    }
    report.condemned_packs = condemned.len() + repack.len();
    report.repacked_packs = repack.len();
    if opts.dry_run || report.condemned_packs == 0 {
        if !opts.dry_run {
            let packs: Vec<[u8; 32]> = index.packs().map(|(id, _)| id).collect();
            report.extended = extend_retention(repo, &packs)?;
        }
        report.requests = repo.store.requests();
        return Ok(report);
    }

    // Copy the live blobs of mostly-unused packs into new packs, verifying each.
    let mut new_records = Vec::new();
    let pack_size = repo.config().pack_size as usize;
    let mut writer = PackWriter::new(pack_size);
    let mut opener = ChunkOpener::default();
    let mut kept_after_all = HashSet::new();
    let flush = |w: PackWriter, out: &mut Vec<PackRecord>| -> Result<()> {
        let pack::Sealed { id, body, entries } = w.finish(&repo.key)?;
        let size = body.len();
        repo.put_pack(&pack::object_name(&id), body)?;
        out.push(PackRecord { id, size, entries });
        Ok(())
    };
    for (pos, id) in &repack {
        let name = pack::object_name(id);
        let data = repo.store.get(&name)?;
        let rec = &records_by_pack[id];
        let mut ok = true;
        // Each live blob once, with its live chunks: a compression group is
        // copied whole, as it is sealed, and keeps the entries still needed.
        let mut blobs: Vec<(u32, &[u8], Vec<pack::Member>)> = Vec::new();
        let mut entries: Vec<&pack::BlobEntry> = rec.entries.iter().collect();
        entries.sort_by_key(|e| (e.offset, e.inner));
        for e in entries {
            if !live.contains(&e.id) || index.get(&e.id)?.is_none_or(|l| l.pack != *pos) {
                continue;
            }
            let sealed = data
                .get(e.offset as usize..(e.offset + e.length) as usize)
                .ok_or_else(|| Error::corrupt(&name, "entry outside the pack"))?;
            if let Err(why) = opener.open(&repo.key, e, sealed) {
                warn!(pack = %name, error = %why, "a damaged blob: the pack is kept as it is");
                ok = false;
                break;
            }
            let member = (e.id, e.raw_len, e.inner);
            match blobs.last_mut() {
                Some((offset, _, members)) if e.grouped() && *offset == e.offset => {
                    members.push(member)
                }
                _ => blobs.push((e.offset, sealed, vec![member])),
            }
        }
        if !ok {
            kept_after_all.insert(*id);
            continue;
        }
        for (_, sealed, members) in blobs {
            if writer.full_before(sealed.len()) {
                flush(
                    std::mem::replace(&mut writer, PackWriter::new(pack_size)),
                    &mut new_records,
                )?;
            }
            writer.add_blob(&members, sealed)?;
            report.repacked_bytes += sealed.len() as u64;
        }
    }
    if !writer.is_empty() {
        flush(writer, &mut new_records)?;
    }
    let condemned: Vec<[u8; 32]> = condemned
        .into_iter()
        .chain(repack.iter().map(|(_, id)| *id))
        .filter(|id| !kept_after_all.contains(id))
        .collect();
    report.condemned_packs = condemned.len();
    let condemned_set: HashSet<_> = condemned.iter().copied().collect();

    // The new index: every pack but the condemned, plus the new packs.
    let mut keep: Vec<PackRecord> = order
        .iter()
        .filter(|id| !condemned_set.contains(*id))
        .map(|id| records_by_pack[id].clone())
        .collect();
    keep.extend(new_records.iter().cloned());
    let mut new_index_names = HashSet::new();
    for group in keep.chunks(PACKS_PER_INDEX) {
        let obj = index::encode(&repo.key, group);
        let name = index::object_name(&obj);
        repo.put_object(&name, obj)?;
        new_index_names.insert(name);
    }
    let replaced: Vec<String> = loaded_names
        .into_iter()
        .filter(|n| !new_index_names.contains(n))
        .collect();

    let record = Record {
        created: Utc::now(),
        packs: condemned.iter().map(hex::encode).collect(),
        indexes: replaced.clone(),
    };
    let name = format!("trash/{}", random_hex(16));
    repo.put_object(&name, seal(repo, &record))?;
    delete_indexes(repo, &replaced)?;
    let locks = write_waits(repo, &name, own.name())?;
    info!(record = %name, packs = condemned.len(), "condemned packs");

    if locks.is_empty() {
        // Nobody else is here: points committed since the first listing are the
        // only ones that could still use a condemned pack. Their lists are read
        // through the index as it was (condemned packs included).
        add_fresh_points(repo, &index, &trashed, &seen_points, &mut live)?;
        let mut index = Index::default();
        for r in &keep {
            index.add_pack(r.id, r.size, &r.entries)?;
        }
        settle(repo, &name, &record, &mut index, &live, &mut report)?;
    } else {
        report.pending_packs += condemned.len();
        report.waiting_for.extend(locks.into_values());
    }
    report.waiting_for.sort();
    report.waiting_for.dedup();
    let packs: Vec<[u8; 32]> = keep.iter().map(|r| r.id).collect();
    report.extended = extend_retention(repo, &packs)?;
    drop(own);
    report.requests = repo.store.requests();
    Ok(report)
}

/// Under Object Lock, a pack written long ago may still be needed by today's
/// points after its own retention ran out. Prune therefore moves the retention
/// of every object still in use (the given packs, every index object and point,
/// the key files and the config) to a full period from now whenever less than
/// half a period is left. Run prune at least every half period.
fn extend_retention(repo: &Repository, packs: &[[u8; 32]]) -> Result<usize> {
    let Some(lock) = repo.store.lock() else {
        return Ok(0);
    };
    if repo.store.versioned().is_none() {
        return Ok(0);
    }
    let now = Utc::now();
    let horizon = now + chrono::Duration::days(i64::from(lock.days)) / 2;
    let target = crate::store::Retention {
        mode: lock.mode,
        until: now + chrono::Duration::days(i64::from(lock.days)),
    };
    let replaced: HashSet<String> = records(repo)?
        .into_values()
        .flat_map(|(r, _)| r.indexes)
        .collect();
    let mut names: Vec<String> = packs.iter().map(pack::object_name).collect();
    for prefix in ["index/", "points/", "keys/"] {
        names.extend(
            repo.store
                .list(prefix)?
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| !replaced.contains(n)),
        );
    }
    names.push("config".into());
    let mut extended = 0;
    for name in names {
        let current = match repo.store.retention(&name) {
            Ok(r) => r,
            Err(Error::Missing { .. }) => continue,
            Err(e) => return Err(e),
        };
        if current.is_none_or(|r| r.until < horizon) {
            repo.store.extend_retention(&name, target)?;
            extended += 1;
        }
    }
    if extended > 0 {
        info!(objects = extended, "extended Object Lock retention");
    }
    Ok(extended)
}

/// Phase 2 for one record: put back condemned packs a live chunk needs (added to
/// `index` and returned), delete the rest, then the record.
fn settle(
    repo: &Repository,
    name: &str,
    record: &Record,
    index: &mut Index,
    live: &HashSet<ChunkId>,
    report: &mut PruneReport,
) -> Result<Vec<PackRecord>> {
    let mut needed: HashSet<&ChunkId> = HashSet::new();
    for c in live {
        if !index.contains(c)? {
            needed.insert(c);
        }
    }
    let indexes_left = delete_indexes(repo, &record.indexes)?;
    let mut restored = Vec::new();
    let mut left = 0;
    for hex_id in &record.packs {
        let Some(id) = pack_id(hex_id) else { continue };
        if index.has_pack(&id) {
            continue;
        }
        let pack_name = pack::object_name(&id);
        let Some(size) = repo.store.size(&pack_name)? else {
            continue;
        };
        if !needed.is_empty() {
            let entries = pack::read_table(&repo.store, &repo.key, &pack_name, size)?;
            if entries.iter().any(|e| needed.contains(&e.id)) {
                index.add_pack(id, size, &entries)?;
                restored.push(PackRecord { id, size, entries });
                continue;
            }
        }
        match repo.store.delete(&pack_name) {
            Ok(()) => {
                report.deleted_packs += 1;
                report.deleted_bytes += size;
            }
            Err(Error::Locked { until, .. }) => {
                left += 1;
                report.locked_packs += 1;
                report.locked_until = report.locked_until.max(until);
            }
            Err(e) => return Err(e),
        }
    }
    if !restored.is_empty() {
        let obj = index::encode(&repo.key, &restored);
        repo.put_object(&index::object_name(&obj), obj)?;
        report.restored_packs += restored.len();
        info!(
            packs = restored.len(),
            "condemned packs put back: a new point uses them"
        );
    }
    // The record goes only when nothing it names is left: while a replaced index
    // object survives (under Object Lock), the record keeps its packs out of
    // every backup's index.
    if left == 0 && indexes_left == 0 {
        repo.store.delete(&format!("{name}.waits"))?;
        repo.store.delete(name)?;
    }
    Ok(restored)
}

/// Add the live chunks of points committed since `seen` was listed, reading
/// their lists through `index` or, failing that, condemned packs.
fn add_fresh_points(
    repo: &Repository,
    index: &Index,
    trashed: &HashSet<[u8; 32]>,
    seen: &HashSet<String>,
    live: &mut HashSet<ChunkId>,
) -> Result<()> {
    let fresh: Vec<Point> = all_points(repo)?
        .into_iter()
        .filter(|p| !seen.contains(&p.id))
        .collect();
    live_chunks(
        &mut Lists {
            repo,
            index,
            trashed,
            extra: None,
        },
        &fresh,
        live,
    )
}

/// Write a record's `.waits`: the locks live now, once the replaced index
/// objects are deleted, are every operation that could still use them.
fn write_waits(repo: &Repository, record: &str, own: &str) -> Result<BTreeMap<String, String>> {
    let locks = live_locks(repo, own)?;
    repo.put_object(
        &format!("{record}.waits"),
        seal(
            repo,
            &Waits {
                locks: locks.keys().cloned().collect(),
            },
        ),
    )?;
    Ok(locks)
}

/// Delete replaced index objects; those under Object Lock stay (counted).
fn delete_indexes(repo: &Repository, names: &[String]) -> Result<usize> {
    let mut left = 0;
    for i in names {
        match repo.store.delete(i) {
            Ok(()) => {}
            Err(Error::Locked { .. }) => left += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(left)
}

/// The sealed bytes of a pack's blobs, a compression group counted once.
fn blob_bytes(entries: &[pack::BlobEntry]) -> u64 {
    let mut blobs: Vec<(u32, u32)> = entries.iter().map(|e| (e.offset, e.length)).collect();
    blobs.sort_unstable();
    blobs.dedup();
    blobs.iter().map(|&(_, len)| u64::from(len)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::backup_sources;
    use crate::progress::Progress;
    use crate::source::MemSource;
    use crate::testing::{memory_repo, vm_backup};

    /// Bytes that look like a pack from outside: a trailer whose table spans
    /// the whole object, so reading "the table" would read everything.
    fn planted(size: usize, seed: u8) -> (String, Vec<u8>) {
        let mut b: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let table_len = (size - 16) as u32;
        b[size - 8..size - 4].copy_from_slice(&table_len.to_le_bytes());
        b[size - 4..].copy_from_slice(&pack::TRAILER_MAGIC);
        (pack::object_name(blake3::hash(&b).as_bytes()), b)
    }

    /// A real pack of this repository that no index lists (a running backup's).
    fn real_unindexed(repo: &Repository, data: &[u8]) -> String {
        let mut w = PackWriter::new(pack::DEFAULT_PACK_SIZE);
        let sealed = crate::pack::Sealer::new(3).seal(&repo.key, data);
        w.add(repo.key.chunk_id(data), data.len() as u32, &sealed)
            .unwrap();
        let p = w.finish(&repo.key).unwrap();
        let name = pack::object_name(&p.id);
        repo.put_pack(&name, p.body).unwrap();
        name
    }

    #[test]
    fn planted_packs_cost_backups_little_and_prune_removes_them_after_the_grace() {
        let repo = memory_repo();
        let disk: Vec<u8> = (0..(2u64 << 20))
            .map(|i| ((i * 2654435761) >> 13) as u8)
            .collect();
        let run = || {
            backup_sources(
                &repo,
                &vm_backup(),
                &[&MemSource(disk.clone())],
                &Progress::default(),
            )
            .unwrap()
        };
        run();
        let mut garbage = Vec::new();
        for (i, size) in [6usize << 20, 5 << 20, 4 << 20].into_iter().enumerate() {
            let (name, bytes) = planted(size, i as u8 + 3);
            repo.store.put(&name, bytes.into()).unwrap();
            garbage.push(name);
        }
        // Plain garbage, and an object under packs/ that is not even named like a pack.
        repo.store
            .put("packs/zz/not-a-pack", vec![1u8; 3 << 20].into())
            .unwrap();
        garbage.push("packs/zz/not-a-pack".into());
        let left_by_crash = real_unindexed(&repo, b"a chunk an interrupted backup stored");
        let planted_bytes: u64 = (15 + 3) << 20;

        for _ in 0..2 {
            let before = repo.store.requests().bytes_down;
            let s = run();
            let read = repo.store.requests().bytes_down - before;
            assert!(
                read < 1 << 20,
                "a backup read {read} bytes with {planted_bytes} bytes of planted objects"
            );
            assert!(s.packs_recovered <= 1);
        }
        assert!(repo.store.exists(&left_by_crash).unwrap());

        // A running backup's pack, not indexed yet.
        let running = real_unindexed(&repo, b"a chunk a running backup just stored");
        // Within the grace nothing goes.
        let r = prune(&repo, PruneOptions::default()).unwrap();
        assert_eq!(r.invalid_objects, 0);
        for g in &garbage {
            assert!(
                repo.store.exists(g).unwrap(),
                "{g} removed within the grace"
            );
        }
        let later = Utc::now() + INVALID_PACK_GRACE + chrono::TimeDelta::minutes(1);
        let dry = prune_at(
            &repo,
            PruneOptions {
                dry_run: true,
                ..PruneOptions::default()
            },
            later,
        )
        .unwrap();
        assert_eq!(dry.invalid_objects, garbage.len());
        assert!(repo.store.exists(&garbage[0]).unwrap());
        let r = prune_at(&repo, PruneOptions::default(), later).unwrap();
        assert_eq!(r.invalid_objects, garbage.len(), "{r:?}");
        assert_eq!(r.invalid_bytes, planted_bytes);
        for g in &garbage {
            assert!(!repo.store.exists(g).unwrap(), "{g} survived prune");
        }
        assert!(
            repo.store.exists(&running).unwrap(),
            "prune removed a running backup's pack"
        );
        // The repository is whole: its point still restores.
        let p = repo.load_point(&repo.point_ids().unwrap()[0]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let opts = crate::restore::RestoreOptions {
            target: dir.path().join("vda"),
            disk: None,
            overwrite: false,
            delta: false,
            base: None,
        };
        crate::restore::restore(&repo, &p, &opts, &Progress::default()).unwrap();
        assert_eq!(std::fs::read(dir.path().join("vda")).unwrap(), disk);
    }

    #[test]
    fn a_repacked_pack_is_not_repacked_again_for_its_table() {
        // Chunks that compress to almost nothing, in groups: a pack's table
        // is then a large part of it, and must not count as waste.
        let repo = memory_repo();
        let chunk = |i: u64| -> Vec<u8> {
            let line = format!("chunk {i:08} of a disk that compresses very well\n");
            line.into_bytes()
                .into_iter()
                .cycle()
                .take(64 << 10)
                .collect()
        };
        let disk = |from: u64| -> Vec<u8> { (from..from + 64).flat_map(chunk).collect() };
        let first = crate::testing::backup_bytes(&repo, &disk(0));
        // Half the chunks change, so the first point's groups die in part.
        let mut second = disk(0);
        second[..32 << 16].copy_from_slice(&disk(1000)[..32 << 16]);
        let kept = crate::testing::backup_bytes(&repo, &second);
        forget(
            &repo,
            &crate::retention::Policy::default(),
            None,
            std::slice::from_ref(&first.id),
            false,
        )
        .unwrap();
        let r = prune(&repo, PruneOptions::default()).unwrap();
        assert!(r.condemned_packs > 0, "{r:?}");
        let again = prune(&repo, PruneOptions::default()).unwrap();
        assert_eq!(again.condemned_packs, 0, "{again:?}");
        assert_eq!(again.repacked_bytes, 0, "{again:?}");
        assert_eq!(crate::testing::restore_bytes(&repo, &kept.id), second);
    }

    #[test]
    fn a_write_is_abandoned_by_its_age_and_the_locks() {
        let created = Utc::now() - chrono::TimeDelta::days(3);
        let now = Utc::now();
        let minutes = |m: i64| now - chrono::TimeDelta::minutes(m);
        // A believable time, no other operation running: its age decides.
        assert!(!abandoned(minutes(1), now, created, false));
        assert!(!abandoned(minutes(29), now, created, false));
        assert!(abandoned(minutes(31), now, created, false));
        // Another operation running: it may be that writer's slow upload,
        // until a day has passed.
        assert!(!abandoned(minutes(31), now, created, true));
        assert!(!abandoned(minutes(23 * 60), now, created, true));
        assert!(abandoned(minutes(25 * 60), now, created, true));
        // Before the repository existed, or far ahead of now: only a look at
        // the locks that finds none lets it go.
        let lies = [
            created - chrono::TimeDelta::days(5000),
            now + chrono::TimeDelta::hours(2),
        ];
        for t in lies {
            assert!(!abandoned(t, now, created, true), "{t}");
            assert!(abandoned(t, now, created, false), "{t}");
        }
        // A little clock skew is believed: just written.
        assert!(!abandoned(
            now + chrono::TimeDelta::minutes(5),
            now,
            created,
            false
        ));
    }
}
