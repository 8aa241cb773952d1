//! `check`: verify a repository's structure, and with `read_data` every byte, and
//! name exactly which packs and which recovery points are damaged.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::crypto::ChunkId;
use crate::error::{Error, Result};
use crate::index::{self, IdMap};
use crate::pack::{self, BlobEntry};
use crate::point;
use crate::progress::Progress;
use crate::repo::Repository;

#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Read and verify every chunk of every pack.
    pub read_data: bool,
}

/// One damaged object.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub object: String,
    pub detail: String,
}

/// A recovery point that cannot be fully restored.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedPoint {
    pub id: String,
    pub source: String,
    pub time: String,
    /// Damaged chunks as "disk@offset: reason" (the first few).
    pub chunks: Vec<String>,
    pub damaged_chunks: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub read_data: bool,
    pub points: u64,
    pub packs: u64,
    pub chunks: u64,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
    pub damaged_points: Vec<DamagedPoint>,
    /// Packs no index lists: left by an interrupted backup, indexed by the next one.
    pub unindexed_packs: Vec<String>,
    pub requests: crate::store::Requests,
    pub duration_secs: f64,
    /// Each replica's state, for a replicated repository: reachable, and what it
    /// lacks that the others hold (`ferry repair` gives it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<crate::replica::RepairReport>,
}

/// What `--read-data` holds of packs at once: it reads each pack whole (to
/// hash it against its name), one per thread, so its threads are as many as
/// the largest pack fits in this (two of the largest 128 MiB packs; sixteen of
/// the default 16 MiB ones), and at least one.
const READ_DATA_MEMORY: u64 = 288 << 20;

pub fn check(repo: &Repository, opts: CheckOptions, progress: &Progress) -> Result<Report> {
    let started = Instant::now();
    let _lock = crate::lock::Lock::acquire(repo, "check", false)?;
    let mut problems = Vec::new();
    // Points are listed before the index is loaded: a backup writes its index
    // objects before its point, so every listed point's chunks are in the index
    // even when a backup commits while the check runs.
    let point_ids = repo.point_ids()?;
    let (index, damaged_index) = crate::prune::readable_index(repo)?;
    for e in damaged_index {
        problems.push(problem_of(e));
    }
    let listed: HashMap<String, u64> = repo.store.list("packs/")?.into_iter().collect();

    // Packs: present, and of the size the index recorded.
    let mut bad_packs: HashMap<u32, String> = HashMap::new();
    let mut pack_names = Vec::new();
    for (pos, (id, size)) in index.packs().enumerate() {
        let name = pack::object_name(&id);
        let pos = pos as u32;
        match listed.get(&name) {
            // On a versioned store, a pack hidden by a delete marker is read from its original version.
            None if !repo.store.recover_original(&name)? => {
                bad_packs.insert(pos, "pack is missing".into());
                problems.push(Problem {
                    object: name.clone(),
                    detail: "is missing".into(),
                });
            }
            Some(&actual) if actual != size && !repo.store.recover_original(&name)? => {
                let d = format!("is {actual} bytes, the index says {size} (truncated?)");
                bad_packs.insert(pos, format!("pack {d}"));
                problems.push(Problem {
                    object: name.clone(),
                    detail: d,
                });
            }
            None | Some(_) => {}
        }
        pack_names.push((pos, name, size));
    }
    // Condemned by a prune and awaiting deletion: neither damage nor leftovers.
    let trashed = crate::prune::trashed_packs(repo)?;
    let unindexed_packs: Vec<String> = listed
        .keys()
        .filter(|n| {
            pack::parse_name(n).is_some_and(|id| !index.has_pack(&id) && !trashed.contains(&id))
        })
        .cloned()
        .collect();

    // Every byte: packs hash to their names, every chunk opens and matches its id.
    let mut bad_chunks: IdMap<String> = IdMap::default();
    let bytes_read = AtomicU64::new(0);
    if opts.read_data {
        let mut by_pack: BTreeMap<u32, Vec<BlobEntry>> = BTreeMap::new();
        index.try_for_each_chunk(|id, loc| -> Result<()> {
            by_pack.entry(loc.pack).or_default().push(loc.entry(*id));
            Ok(())
        })?;
        // In pack order: a compression group's chunks are then opened in a row,
        // the group decompressed once.
        for entries in by_pack.values_mut() {
            entries.sort_unstable_by_key(|e| (e.offset, e.inner));
        }
        progress.add_total(pack_names.iter().map(|p| p.2).sum());
        let found: Mutex<(Vec<Problem>, IdMap<String>)> = Mutex::default();
        let next = AtomicU64::new(0);
        // A pack is read whole: as many at once as fit in READ_DATA_MEMORY.
        let largest = pack_names.iter().map(|p| p.2).max().unwrap_or(0).max(1);
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(2)
            .min((READ_DATA_MEMORY / largest).max(1) as usize);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some((pos, name, size)) = pack_names.get(i) else {
                            return;
                        };
                        let entries = by_pack.get(pos).map(Vec::as_slice).unwrap_or_default();
                        let (probs, bad) =
                            verify_pack(repo, name, *size, entries, &bad_packs, *pos);
                        bytes_read.fetch_add(*size, Ordering::Relaxed);
                        progress.add_done(*size);
                        let mut f = found.lock().expect("check results");
                        f.0.extend(probs);
                        f.1.extend(bad);
                    }
                });
            }
        });
        let (probs, bad) = found.into_inner().expect("check results");
        problems.extend(probs);
        bad_chunks = bad;
    }

    // Points: readable, consistent, and every chunk available and sound. A list
    // shared by many points is read and judged once.
    let mut damaged_points = Vec::new();
    let mut point_count = 0u64;
    let mut judged: HashMap<point::ListId, ListVerdict> = HashMap::new();
    let mut known = Known {
        index: &index,
        bad_packs: &bad_packs,
        bad_chunks: &bad_chunks,
        sound: Sound::default(),
    };
    for id in point_ids {
        point_count += 1;
        let p = match repo.load_point(&id) {
            Ok(p) => p,
            Err(e) => {
                let pr = problem_of(e);
                damaged_points.push(DamagedPoint {
                    id: id.clone(),
                    source: "?".into(),
                    time: "?".into(),
                    chunks: vec![format!("the recovery point itself: {}", pr.detail)],
                    damaged_chunks: 0,
                });
                problems.push(pr);
                continue;
            }
        };
        let mut reasons = Vec::new();
        let mut count = 0u64;
        for (d, meta) in p.meta.disks.iter().enumerate() {
            if point::disk_digest(&repo.key, meta.size, &p.lists[d]) != meta.digest {
                reasons.push(format!(
                    "disk {}: chunk lists do not match its digest",
                    meta.name
                ));
                count += 1;
            }
            for (i, lid) in p.lists[d].iter().enumerate() {
                let (start, span) = point::list_span(meta.size, i);
                if !judged.contains_key(lid) {
                    let v = judge_list(repo, &mut known, lid, span, &mut problems)?;
                    judged.insert(*lid, v);
                }
                let verdict = &judged[lid];
                count += verdict.damaged;
                for (rel, why) in &verdict.first {
                    if reasons.len() < 10 {
                        reasons.push(format!("{}@{}: {why}", meta.name, start + rel));
                    }
                }
            }
        }
        if count > 0 {
            damaged_points.push(DamagedPoint {
                id: p.id.clone(),
                source: p.meta.source.clone(),
                time: p.meta.time.to_rfc3339(),
                chunks: reasons,
                damaged_chunks: count,
            });
        }
    }

    let replicas = match crate::replica::of(&repo.store) {
        Some(set) => Some(set.repair(crate::replica::RepairOptions {
            dry_run: true,
            read_data: opts.read_data,
        })?),
        None => None,
    };
    Ok(Report {
        ok: problems.is_empty()
            && damaged_points.is_empty()
            && replicas.as_ref().is_none_or(|r| r.in_sync()),
        replicas,
        read_data: opts.read_data,
        points: point_count,
        packs: pack_names.len() as u64,
        chunks: index.chunk_count() as u64,
        bytes_read: bytes_read.into_inner(),
        problems,
        damaged_points,
        unindexed_packs,
        requests: repo.store.requests(),
        duration_secs: started.elapsed().as_secs_f64(),
    })
}

/// Chunks found sound (indexed, in a pack and not damaged), with their
/// length: a point's lists share most chunks with the points before it, and
/// an index lookup past memory is a read from its runs. Without it, check
/// looked up every extent of every list (636 s for the 598 points a one-hour
/// protect soak kept; 5.7 times the time of this on the agent's 60-cycle
/// test). Emptied when it reaches [`MAX_SOUND`] entries, so it stays under
/// about 40 MiB.
type Sound = IdMap<u32>;

/// Entries [`Sound`] holds at most: what a table of 2^20 buckets takes (7/8 of
/// them) before it doubles; 37 bytes a bucket (id, length, control byte).
const MAX_SOUND: usize = (1 << 20) / 8 * 7;

/// What chunks are known to be: where (the index), damaged (by pack or by
/// chunk, from reading data), or sound.
struct Known<'a> {
    index: &'a index::Index,
    bad_packs: &'a HashMap<u32, String>,
    bad_chunks: &'a IdMap<String>,
    sound: Sound,
}

/// What a chunk list contributes to a point's damage.
#[derive(Default)]
struct ListVerdict {
    damaged: u64,
    /// The first few damaged chunks: offset within the span, and why.
    first: Vec<(u64, String)>,
}

fn judge_list(
    repo: &Repository,
    known: &mut Known<'_>,
    lid: &point::ListId,
    span: u64,
    problems: &mut Vec<Problem>,
) -> Result<ListVerdict> {
    let Known {
        index,
        bad_packs,
        bad_chunks,
        sound,
    } = known;
    let extents = match repo.load_list(index, lid, span) {
        Ok(e) => e,
        // This machine's trouble, not the repository's: say so, not "damaged".
        Err(e @ Error::Spill { .. }) => return Err(e),
        Err(e) => {
            let pr = problem_of(e);
            let v = ListVerdict {
                damaged: 1,
                first: vec![(0, format!("{}: {}", pr.object, pr.detail))],
            };
            problems.push(pr);
            return Ok(v);
        }
    };
    let mut v = ListVerdict::default();
    let mut off = 0u64;
    for e in extents {
        if let Some(cid) = e.id {
            let raw_len = match sound.get(&cid) {
                Some(&raw_len) => Ok(raw_len),
                None => match index.get(&cid)? {
                    None => Err("no pack holds it".to_string()),
                    Some(loc) => match bad_packs.get(&loc.pack).or_else(|| bad_chunks.get(&cid)) {
                        Some(why) => Err(why.clone()),
                        None => {
                            if sound.len() >= MAX_SOUND {
                                sound.clear();
                            }
                            sound.insert(cid, loc.raw_len);
                            Ok(loc.raw_len)
                        }
                    },
                },
            };
            let why = match raw_len {
                Err(why) => Some(why),
                Ok(raw_len) if e.skip as u64 + e.len as u64 > raw_len as u64 => Some(format!(
                    "the list takes {} bytes from {} of it, but it has {}",
                    e.len, e.skip, raw_len
                )),
                Ok(_) => None,
            };
            if let Some(why) = why {
                v.damaged += 1;
                if v.first.len() < 10 {
                    v.first
                        .push((off, format!("chunk {}: {why}", &cid.to_hex()[..16])));
                }
            }
        }
        off += e.len as u64;
    }
    Ok(v)
}

fn problem_of(e: Error) -> Problem {
    match e {
        Error::Corrupt { object, detail } => Problem { object, detail },
        Error::Missing { object } => Problem {
            object,
            detail: "is missing".into(),
        },
        Error::UnsupportedVersion {
            object,
            found,
            supported,
        } => Problem {
            object,
            detail: format!("has format version {found}, this ferry reads 1 to {supported}"),
        },
        other => Problem {
            object: "repository".into(),
            detail: other.to_string(),
        },
    }
}

/// Read one pack whole and verify it; returns problems and damaged chunks.
fn verify_pack(
    repo: &Repository,
    name: &str,
    size: u64,
    entries: &[BlobEntry],
    bad_packs: &HashMap<u32, String>,
    pos: u32,
) -> (Vec<Problem>, Vec<(ChunkId, String)>) {
    let mut problems = Vec::new();
    let mut bad = Vec::new();
    if bad_packs.contains_key(&pos) {
        return (problems, bad); // missing or truncated: already reported
    }
    let bytes = match repo.store.get(name) {
        Ok(b) => b,
        Err(e) => {
            let pr = problem_of(e);
            for en in entries {
                bad.push((en.id, format!("pack {}", pr.detail)));
            }
            problems.push(pr);
            return (problems, bad);
        }
    };
    if let Err(e) = crate::format::split(name, crate::format::Kind::Pack, &bytes) {
        problems.push(problem_of(e));
    }
    if blake3::hash(&bytes).as_bytes() != &pack::parse_name(name).unwrap_or_default() {
        problems.push(Problem {
            object: name.to_string(),
            detail: "content does not match its name (bytes were altered)".into(),
        });
    }
    if bytes.len() as u64 != size {
        problems.push(Problem {
            object: name.to_string(),
            detail: format!("is {} bytes, the index says {size}", bytes.len()),
        });
    }
    let mut bad_in_pack = 0;
    let mut opener = pack::ChunkOpener::default();
    for en in entries {
        let end = en.offset as usize + en.length as usize;
        let result = match bytes.get(en.offset as usize..end) {
            Some(sealed) => opener.open(&repo.key, en, sealed).map(|_| ()),
            None => Err("lies past the end of the pack".to_string()),
        };
        if let Err(d) = result {
            bad_in_pack += 1;
            bad.push((en.id, format!("in {name}: {d}")));
        }
    }
    if bad_in_pack > 0 {
        problems.push(Problem {
            object: name.to_string(),
            detail: format!("{bad_in_pack} of its {} chunks are damaged", entries.len()),
        });
    }
    (problems, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::{RestoreOptions, restore};

    /// Seal `point` again (with the repository's key, as someone with the
    /// password could) after `edit` changed its metadata; returns the new id.
    fn reseal(repo: &Repository, point: &point::Point, edit: impl Fn(&mut point::Meta)) -> String {
        let mut meta = point.meta.clone();
        edit(&mut meta);
        let (id, obj) = point::encode(
            &repo.key,
            &meta,
            &vec![point.lists[0].clone(); meta.disks.len()],
        );
        repo.store
            .put(&point::object_name(&id), obj.into())
            .unwrap();
        id
    }

    #[test]
    fn check_and_restore_agree_on_points_with_hostile_disk_names() {
        let repo = crate::testing::memory_repo();
        let good = crate::testing::backup_bytes(&repo, &[5u8; 1 << 16]);
        let escaping = reseal(&repo, &good, |m| m.disks[0].name = "../x".into());
        let twice = reseal(&repo, &good, |m| {
            let d = m.disks[0].clone();
            m.disks.push(d);
        });
        let report = check(&repo, CheckOptions::default(), &Progress::default()).unwrap();
        assert!(!report.ok);
        for (id, why) in [(&escaping, "\"../x\""), (&twice, "two disks are named")] {
            let damaged = report
                .damaged_points
                .iter()
                .find(|p| &p.id == id)
                .unwrap_or_else(|| panic!("check passed point {id}: {report:?}"));
            assert!(damaged.chunks[0].contains(why), "{damaged:?}");
            assert!(
                report
                    .problems
                    .iter()
                    .any(|p| p.object == point::object_name(id) && p.detail.contains(why)),
                "{:?}",
                report.problems
            );
            // What restore (and serve-nbd) load is refused by the same rule.
            let err = repo.load_point(id).unwrap_err();
            assert!(err.to_string().contains(&point::object_name(id)), "{err}");
        }
        assert!(!report.damaged_points.iter().any(|p| p.id == good.id));

        // A point built in memory, never decoded, is refused by restore too.
        let top = tempfile::tempdir().unwrap();
        let to = top.path().join("to");
        std::fs::create_dir(&to).unwrap();
        let mut hostile = good.clone();
        hostile.meta.disks[0].name = "../x".into();
        let opts = RestoreOptions {
            target: to.clone(),
            disk: None,
            overwrite: true,
            delta: false,
            base: None,
        };
        let err = restore(&repo, &hostile, &opts, &Progress::default()).unwrap_err();
        assert!(err.to_string().contains("\"../x\""), "{err}");
        let mut doubled = good.clone();
        doubled.meta.disks.push(doubled.meta.disks[0].clone());
        doubled.lists.push(doubled.lists[0].clone());
        let err = restore(&repo, &doubled, &opts, &Progress::default()).unwrap_err();
        assert!(err.to_string().contains("two disks are named"), "{err}");
        let written: Vec<_> = std::fs::read_dir(top.path()).unwrap().collect();
        assert_eq!(written.len(), 1, "restore wrote next to --to: {written:?}");
        assert_eq!(std::fs::read_dir(&to).unwrap().count(), 0);
    }
}
