//! Storage classes: move the packs that only older recovery points use to a
//! colder, cheaper class (S3 `STANDARD_IA`, `GLACIER_IR`, `GLACIER`, ...).
//!
//! A pack moves only when no point newer than the cutoff uses any of its
//! blobs, so restoring a recent point never touches a cold pack. Packs are
//! rewritten in place (S3 CopyObject onto itself with the new class), keeping
//! their bytes and names. A backup made later may still reuse a chunk held by a
//! cold pack; a read of an archived object fails with a message naming it and
//! what restoring it takes.
//!
//! In a replicated repository every replica that has storage classes (an
//! S3 bucket) moves the same packs, each under its own Object Lock; a
//! replica without them (a directory) keeps its copy where it is, and the
//! report says so. Every replica must answer first, as for prune.

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
    /// In a replicated repository: what each replica did.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<TierReplica>,
    pub requests: Requests,
}

/// One replica's part in a [`tier`].
#[derive(Debug, Clone, Serialize)]
pub struct TierReplica {
    pub id: String,
    pub location: String,
    /// Its packs were moved (or would be, with `dry_run`).
    pub moved: bool,
    /// Why not, when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
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
                if let Some(l) = index.get(id)? {
                    used.insert(l.pack);
                }
                let (_, span) = crate::point::list_span(disk.size, i);
                let parts = repo.load_list_parts(&[index], id, span)?;
                for base in &parts.bases {
                    if let Some(l) = index.get(base)? {
                        used.insert(l.pack);
                    }
                }
                for x in parts.extents.iter().filter_map(|x| x.id) {
                    if let Some(l) = index.get(&x)? {
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
    let set = crate::replica::of(&repo.store);
    if let Some(set) = set {
        set.require_all("tier")?;
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
        replicas: Vec::new(),
        requests: Requests::default(),
    };
    // Where the packs move: the store, or each replica that has classes.
    let mut stores = Vec::new();
    match set {
        None => stores.push(&repo.store),
        Some(set) => {
            for (id, location, store) in set.members() {
                let moved = store.versioned().is_some();
                report.replicas.push(TierReplica {
                    id: id.to_owned(),
                    location: location.to_owned(),
                    moved,
                    why: (!moved).then(|| {
                        "it has no storage classes (not an S3 bucket); its copy stays".to_owned()
                    }),
                });
                if moved {
                    stores.push(store);
                }
            }
            if stores.is_empty() {
                return Err(Error::InvalidInput(format!(
                    "no replica of {} has storage classes (S3 buckets do)",
                    repo.store.location()
                )));
            }
        }
    }
    let mut moving: Vec<u32> = cold_candidates.difference(&hot).copied().collect();
    moving.sort_unstable();
    report.kept = cold_candidates.intersection(&hot).count();
    for pos in moving {
        let (id, size) = index.pack(pos);
        if !dry_run {
            for store in &stores {
                store.set_storage_class(&pack::object_name(&id), class)?;
            }
        }
        report.packs += 1;
        report.bytes += size;
    }
    report.requests = repo.store.requests();
    Ok(report)
}
