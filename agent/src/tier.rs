//! Storage classes: move the packs that only older recovery points use to a
//! colder, cheaper class (S3 `STANDARD_IA`, `GLACIER_IR`, `GLACIER`, ...).
//!
//! A pack moves only when no point newer than the cutoff uses any of its
//! blobs, so restoring a recent point never touches a cold pack. Packs are
//! rewritten in place (S3 CopyObject onto itself with the new class), keeping
//! their bytes and names. A backup made later may still reuse a chunk held by a
//! cold pack; a read of an archived object fails with a message naming it and
//! what restoring it takes.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::pack;
use crate::point::Point;
use crate::repo::Repository;
use crate::store::Requests;

#[derive(Debug, Clone, Serialize)]
pub struct TierReport {
    pub cutoff: DateTime<Utc>,
    pub class: String,
    /// Packs only older points use, moved (or to move, with `dry_run`).
    pub packs: usize,
    pub bytes: u64,
    /// Packs a point newer than the cutoff uses: left where they are.
    pub kept: usize,
    pub dry_run: bool,
    pub requests: Requests,
}

/// The ids of the packs whose blobs (chunks and chunk lists) the points use.
fn packs_used(
    repo: &Repository,
    index: &crate::index::Index,
    points: &[&Point],
) -> Result<HashSet<u32>> {
    let mut used = HashSet::new();
    let mut lists = HashSet::new();
    for p in points {
        for (disk, ids) in p.meta.disks.iter().zip(&p.lists) {
            for (i, id) in ids.iter().enumerate() {
                if !lists.insert(*id) {
                    continue;
                }
                if let Some(l) = index.get(id) {
                    used.insert(l.pack);
                }
                let (_, span) = crate::point::list_span(disk.size, i);
                for x in repo.load_list(index, id, span)?.iter().filter_map(|x| x.id) {
                    if let Some(l) = index.get(&x) {
                        used.insert(l.pack);
                    }
                }
            }
        }
    }
    Ok(used)
}

/// Move the packs that only points made before `cutoff` use.
pub fn tier(
    repo: &Repository,
    cutoff: DateTime<Utc>,
    class: &str,
    dry_run: bool,
) -> Result<TierReport> {
    if class.is_empty() || !class.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
        return Err(Error::InvalidInput(format!(
            "{class:?} is not a storage class name (e.g. STANDARD_IA, GLACIER_IR, GLACIER, STANDARD)"
        )));
    }
    let _lock = crate::lock::Lock::acquire(repo, "tier", false)?;
    let (points, _) = repo.points()?;
    let (index, _) = crate::index::load(&repo.store, &repo.key)?;
    let newer: Vec<&Point> = points.iter().filter(|p| p.meta.time >= cutoff).collect();
    let older: Vec<&Point> = points.iter().filter(|p| p.meta.time < cutoff).collect();
    let hot = packs_used(repo, &index, &newer)?;
    let cold_candidates = packs_used(repo, &index, &older)?;
    let mut report = TierReport {
        cutoff,
        class: class.to_string(),
        packs: 0,
        bytes: 0,
        kept: 0,
        dry_run,
        requests: Requests::default(),
    };
    let mut moving: Vec<u32> = cold_candidates.difference(&hot).copied().collect();
    moving.sort_unstable();
    report.kept = cold_candidates.intersection(&hot).count();
    for pos in moving {
        let (id, size) = index.pack(pos);
        if !dry_run {
            repo.store
                .set_storage_class(&pack::object_name(&id), class)?;
        }
        report.packs += 1;
        report.bytes += size;
    }
    report.requests = repo.store.requests();
    Ok(report)
}
