//! Copy recovery points into another repository (`ferry copy`): to another
//! cloud, or to an offline copy, with its own password and chunk secret.
//!
//! A point is copied by backing it up into the destination as if its disks
//! were block devices: each disk is read from the source repository through
//! an [`instant::DiskReader`](crate::instant::DiskReader) and goes through the
//! destination's ordinary backup pipeline, so the data is re-encrypted under
//! the destination's key and deduplicated against what the destination holds.
//! The copy keeps the point's source, time, consistency, group and disk
//! names and paths.
//!
//! Points of a source are copied oldest first. When the destination's newest
//! point of the source is the copy of the source repository's previous point,
//! the difference between the two source points' chunk lists is the change
//! map of the copy: only the ranges whose chunks differ are read (the
//! incremental path of [`backup`](crate::backup)), so copying a chain costs
//! about what the chain stored, not its full size every time.
//!
//! Resuming: a point whose source and time the destination already has is
//! skipped; a copy killed in the middle of a point left packs that the next
//! backup into the destination indexes and reuses.

use std::collections::HashMap;

use serde::Serialize;

use crate::backup::{BackupOptions, DiskSpec, backup_sources};
use crate::error::{Error, Result};
use crate::index::Index;
use crate::instant::DiskReader;
use crate::point::{self, Point};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::source::{BlockSource, ChangeMap};

/// Decoded chunks a copy keeps per disk while reading it.
const CACHE_BYTES: usize = 64 << 20;

/// What copying one point did.
#[derive(Debug, Clone, Serialize)]
pub struct CopiedPoint {
    /// The point in the source repository.
    pub from: String,
    /// Its copy in the destination.
    pub to: String,
    pub source: String,
    pub time: chrono::DateTime<chrono::Utc>,
    /// The destination had it already (an earlier copy).
    pub already: bool,
    /// Read as the difference from the previous copied point.
    pub incremental: bool,
    /// Bytes of the disks read from the source repository.
    pub bytes_read: u64,
    /// Bytes new to the destination (before compression).
    pub new_bytes: u64,
    pub stored_bytes: u64,
}

/// What `copy` did.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    pub points: Vec<CopiedPoint>,
    pub duration_secs: f64,
}

/// One disk of a source point, as a block source for the destination's backup.
struct PointDisk {
    reader: DiskReader,
    changes: Option<ChangeMap>,
    tracking: Option<String>,
}

impl BlockSource for PointDisk {
    fn size(&self) -> Result<u64> {
        Ok(self.reader.size())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.reader.read_at(buf, offset)
    }

    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let size = self.reader.size();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = 0;
        while at < size {
            let runs = self.reader.allocation(at, size - at)?;
            if runs.is_empty() {
                break;
            }
            for (len, data) in runs {
                if data {
                    match out.last_mut() {
                        Some(last) if last.1 == at => last.1 = at + len,
                        _ => out.push((at, at + len)),
                    }
                }
                at += len;
            }
        }
        Ok(out)
    }

    fn change_map(&self) -> Result<Option<ChangeMap>> {
        Ok(self.changes.clone())
    }

    fn tracking(&self) -> Option<String> {
        self.tracking.clone()
    }
}

/// The change map of `cur`'s disk `d` against `prev`'s disk of the same name
/// and size: the ranges whose chunks differ. `None` when there is no such disk.
fn change_map(
    src: &Repository,
    index: &Index,
    prev: &Point,
    cur: &Point,
    d: usize,
) -> Result<Option<ChangeMap>> {
    let meta = &cur.meta.disks[d];
    let Some(p) = prev
        .meta
        .disks
        .iter()
        .position(|m| m.name == meta.name && m.size == meta.size)
    else {
        return Ok(None);
    };
    let mut ranges = Vec::new();
    for (k, (a, b)) in prev.lists[p].iter().zip(&cur.lists[d]).enumerate() {
        if a == b {
            continue;
        }
        let (start, span) = point::list_span(meta.size, k);
        let old = src.load_list(index, a, span)?;
        let new = src.load_list(index, b, span)?;
        for r in point::differing_ranges(start, &old, &new) {
            match ranges.last_mut() {
                Some((_, end)) if *end == r.0 => *end = r.1,
                _ => ranges.push(r),
            }
        }
    }
    Ok(Some(ChangeMap {
        tracker: format!("copy:{}", prev.id),
        ranges,
    }))
}

/// Copy `points` of `src` into `dst`, oldest first (see the module's text).
pub fn copy(
    src: &Repository,
    dst: &Repository,
    points: &[Point],
    progress: &Progress,
) -> Result<CopyReport> {
    let started = std::time::Instant::now();
    let mut todo: Vec<&Point> = points.iter().collect();
    todo.sort_by(|a, b| a.meta.time.cmp(&b.meta.time).then(a.id.cmp(&b.id)));
    // The destination's points by (source, time): what was copied already.
    let mut have: HashMap<(String, i64), String> = HashMap::new();
    let mut newest: HashMap<String, (i64, String)> = HashMap::new();
    for p in dst.points()?.0 {
        let t = p.meta.time.timestamp_micros();
        have.insert((p.meta.source.clone(), t), p.id.clone());
        let e = newest
            .entry(p.meta.source.clone())
            .or_insert((t, p.id.clone()));
        if t >= e.0 {
            *e = (t, p.id.clone());
        }
    }
    // The source's points by source, oldest first, to find each one's predecessor.
    let (all, _) = src.points()?;
    let mut chains: HashMap<&str, Vec<&Point>> = HashMap::new();
    for p in &all {
        chains.entry(p.meta.source.as_str()).or_default().push(p);
    }
    for chain in chains.values_mut() {
        chain.sort_by(|a, b| a.meta.time.cmp(&b.meta.time).then(a.id.cmp(&b.id)));
    }
    let (index, _) = crate::prune::readable_index(src)?;
    let mut report = CopyReport {
        points: Vec::new(),
        duration_secs: 0.0,
    };
    for p in todo {
        let key = (p.meta.source.clone(), p.meta.time.timestamp_micros());
        if let Some(id) = have.get(&key) {
            report.points.push(CopiedPoint {
                from: p.id.clone(),
                to: id.clone(),
                source: p.meta.source.clone(),
                time: p.meta.time,
                already: true,
                incremental: false,
                bytes_read: 0,
                new_bytes: 0,
                stored_bytes: 0,
            });
            continue;
        }
        // The previous point of this source, if its copy is the destination's
        // newest point of the source (the parent the backup will pick).
        let prev = chains
            .get(p.meta.source.as_str())
            .and_then(|c| c.iter().rev().find(|q| q.meta.time < p.meta.time))
            .copied()
            .filter(|q| {
                newest.get(&q.meta.source).is_some_and(|(t, _)| {
                    *t == q.meta.time.timestamp_micros()
                        && have.contains_key(&(q.meta.source.clone(), *t))
                })
            });
        let mut disks = Vec::with_capacity(p.meta.disks.len());
        for (d, meta) in p.meta.disks.iter().enumerate() {
            let changes = match prev {
                Some(q) => change_map(src, &index, q, p, d)?,
                None => None,
            };
            disks.push(PointDisk {
                reader: DiskReader::open(src.clone(), p, d, CACHE_BYTES)?,
                changes,
                tracking: meta.tracking.clone(),
            });
        }
        let sources: Vec<&dyn BlockSource> = disks.iter().map(|d| d as &dyn BlockSource).collect();
        let opts = BackupOptions {
            source: p.meta.source.clone(),
            disks: p
                .meta
                .disks
                .iter()
                .map(|m| DiskSpec {
                    name: m.name.clone(),
                    path: m.path.clone().into(),
                })
                .collect(),
            consistency: Some(p.meta.consistency),
            time: Some(p.meta.time),
            group: p.meta.group.clone(),
        };
        let s = backup_sources(dst, &opts, &sources, progress).map_err(|e| match e {
            Error::DamagedChunk { .. } | Error::Corrupt { .. } | Error::Missing { .. } => {
                Error::InvalidInput(format!(
                    "cannot copy point {} ({} at {}): the source repository is damaged: {e}; run `ferry check --read-data` on it",
                    p.short_id(),
                    p.meta.source,
                    p.meta.time
                ))
            }
            e => e,
        })?;
        let incremental = disks.iter().all(|d| d.changes.is_some());
        have.insert(key.clone(), s.point.clone());
        newest.insert(key.0.clone(), (key.1, s.point.clone()));
        report.points.push(CopiedPoint {
            from: p.id.clone(),
            to: s.point,
            source: p.meta.source.clone(),
            time: p.meta.time,
            already: false,
            incremental,
            bytes_read: s.bytes_read,
            new_bytes: s.new_bytes,
            stored_bytes: s.stored_bytes,
        });
    }
    report.duration_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::ChunkId;
    use crate::point::Extent;
    use crate::sink::MemSink;

    fn id(n: u8) -> Option<ChunkId> {
        Some(ChunkId([n; 32]))
    }

    #[test]
    fn differences_are_where_chunks_differ() {
        let e = |len, id, skip| Extent { len, id, skip };
        let old = [e(100, id(1), 0), e(50, None, 0), e(100, id(2), 0)];
        // Same chunk 1; zeros became chunk 3 for 30 bytes; chunk 2 sliced.
        let new = [
            e(100, id(1), 0),
            e(20, None, 0),
            e(30, id(3), 0),
            e(40, id(2), 0),
            e(60, id(2), 40),
        ];
        assert_eq!(
            point::differing_ranges(1000, &old, &new),
            vec![(1120, 1150)]
        );
        // A slice from another place in the chunk differs.
        let moved = [e(100, id(1), 0), e(50, None, 0), e(100, id(2), 4)];
        assert_eq!(point::differing_ranges(0, &old, &moved), vec![(150, 250)]);
        assert!(point::differing_ranges(0, &old, &old).is_empty());
    }

    #[test]
    fn a_chain_copies_whole_then_by_difference_and_resumes() {
        let src = crate::testing::memory_repo();
        let dst = crate::testing::memory_repo();
        let mut disk = vec![0u8; 8 << 20];
        for (i, b) in disk.iter_mut().enumerate().take(3 << 20) {
            *b = (i * 7 % 251) as u8;
        }
        let p1 = crate::testing::backup_bytes(&src, &disk);
        disk[5 << 20..(5 << 20) + 4096].fill(9);
        let p2 = crate::testing::backup_bytes(&src, &disk);
        let r = copy(&src, &dst, &[p2.clone(), p1.clone()], &Progress::default()).unwrap();
        assert_eq!(r.points.len(), 2);
        assert_eq!(r.points[0].from, p1.id, "oldest first");
        assert!(!r.points[0].incremental && r.points[1].incremental);
        // The second copy read only the changed chunk's neighbourhood.
        assert!(r.points[1].bytes_read <= 1 << 20, "{:?}", r.points[1]);
        for (c, want) in r.points.iter().zip([&p1, &p2]) {
            let copied = dst.load_point(&c.to).unwrap();
            assert_eq!(copied.meta.time, want.meta.time);
            let sink = MemSink::new(disk.len() as u64);
            crate::restore::restore_into(&dst, &copied, 0, &sink, &Progress::default()).unwrap();
            let expect = MemSink::new(disk.len() as u64);
            crate::restore::restore_into(&src, want, 0, &expect, &Progress::default()).unwrap();
            assert_eq!(sink.bytes(), expect.bytes());
        }
        let again = copy(&src, &dst, &[p1, p2], &Progress::default()).unwrap();
        assert!(again.points.iter().all(|c| c.already));
    }
}
