//! What a repository holds and what it costs.
//!
//! Sizes come from the index and object listings (no pack is read). Costs come
//! from a price table the user can edit ([`Prices`], JSON); the default is AWS S3
//! Standard in us-east-1 as published in 2026 and is only an estimate.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::index;
use crate::point::Point;
use crate::repo::Repository;
use crate::store::Requests;

/// Prices in US dollars. Edit a copy (`ferry stats --print-prices > p.json`) and
/// pass it with `--prices p.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// What the figures describe, e.g. "AWS S3 Standard, us-east-1".
    pub name: String,
    /// Storage per GB-month, by storage class; `default` applies to the rest.
    pub storage_gb_month: BTreeMap<String, f64>,
    /// PUT, COPY, POST, LIST per 1,000 requests.
    pub put_per_1000: f64,
    /// GET, HEAD per 1,000 requests.
    pub get_per_1000: f64,
    /// DELETE per 1,000 requests (free on most providers).
    pub delete_per_1000: f64,
    /// Data transfer out to the internet per GB.
    pub egress_gb: f64,
    /// Retrieval per GB for cold classes (e.g. GLACIER), by storage class.
    #[serde(default)]
    pub retrieval_gb: BTreeMap<String, f64>,
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            name: "AWS S3, us-east-1 (list prices; edit for your provider and discounts)".into(),
            storage_gb_month: BTreeMap::from([
                ("default".into(), 0.023),
                ("STANDARD_IA".into(), 0.0125),
                ("GLACIER_IR".into(), 0.004),
                ("GLACIER".into(), 0.0036),
                ("DEEP_ARCHIVE".into(), 0.00099),
            ]),
            put_per_1000: 0.005,
            get_per_1000: 0.0004,
            delete_per_1000: 0.0,
            egress_gb: 0.09,
            retrieval_gb: BTreeMap::from([
                ("STANDARD_IA".into(), 0.01),
                ("GLACIER_IR".into(), 0.03),
                ("GLACIER".into(), 0.01),
                ("DEEP_ARCHIVE".into(), 0.02),
            ]),
        }
    }
}

const GB: f64 = 1e9;

impl Prices {
    pub fn storage(&self, class: Option<&str>) -> f64 {
        class
            .and_then(|c| self.storage_gb_month.get(c))
            .or_else(|| self.storage_gb_month.get("default"))
            .copied()
            .unwrap_or(0.0)
    }

    /// The cost of some requests and bytes moved (downloads as egress).
    pub fn requests(&self, r: &Requests) -> f64 {
        (r.puts + r.lists) as f64 / 1000.0 * self.put_per_1000
            + r.gets as f64 / 1000.0 * self.get_per_1000
            + r.deletes as f64 / 1000.0 * self.delete_per_1000
            + r.bytes_down as f64 / GB * self.egress_gb
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub points: usize,
    pub sources: usize,
    /// Sum of the disk sizes of every point: what restoring them all would write.
    pub logical_bytes: u64,
    /// Sum of the disk sizes of the newest point of each source.
    pub latest_logical_bytes: u64,
    /// Unique chunk bytes before compression (after deduplication).
    pub unique_bytes: u64,
    pub unique_chunks: usize,
    /// Bytes of packs as stored (after compression and encryption).
    pub pack_bytes: u64,
    /// Every object, by kind (prefix): count and bytes.
    pub objects: BTreeMap<String, (u64, u64)>,
    pub total_bytes: u64,
    pub storage_class: String,
    pub prices: String,
    /// Storage per month at the price table's rate for the storage class.
    pub monthly_storage_cost: f64,
    /// Restoring the newest point of every source: GET requests, bytes and cost.
    pub restore_latest_gets: u64,
    pub restore_latest_cost: f64,
    pub requests: Requests,
}

/// What restoring some disks reads from the repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReads {
    /// GET requests: ranged reads of up to 8 MiB, at least one per pack reached.
    pub gets: u64,
    /// Stored (compressed, encrypted) bytes of the chunks the disks reach,
    /// each counted once: what leaves the repository's store.
    pub bytes: u64,
}

/// An estimate of what restoring `disks` (point, disk index) reads: every
/// chunk the disks' lists reach, once, in ranged reads of up to 8 MiB. Lists
/// that cannot be read count nothing (the restore would fail on them anyway).
pub fn restore_reads(
    repo: &Repository,
    idx: &index::Index,
    disks: &[(&Point, usize)],
) -> RestoreReads {
    let mut used_packs = HashSet::new();
    let mut seen = HashSet::new();
    let mut blobs = HashSet::new();
    let mut bytes = 0u64;
    for &(p, d) in disks {
        let (Some(disk), Some(ids)) = (p.meta.disks.get(d), p.lists.get(d)) else {
            continue;
        };
        for (i, id) in ids.iter().enumerate() {
            // An estimate: a chunk the index cannot give is left out.
            if let Some(l) = idx.get(id).ok().flatten() {
                used_packs.insert(l.pack);
            }
            let (_, span) = crate::point::list_span(disk.size, i);
            if let Ok(parts) = repo.load_list_parts(&[idx], id, span) {
                for base in &parts.bases {
                    if let Some(l) = idx.get(base).ok().flatten() {
                        used_packs.insert(l.pack);
                    }
                }
                for x in parts.extents.iter().filter_map(|x| x.id) {
                    if let Some(l) = idx.get(&x).ok().flatten()
                        && seen.insert(x)
                    {
                        used_packs.insert(l.pack);
                        // A compression group is fetched once for all its chunks.
                        if blobs.insert((l.pack, l.offset)) {
                            bytes += u64::from(l.length);
                        }
                    }
                }
            }
        }
    }
    RestoreReads {
        gets: (bytes / (8 << 20)).max(used_packs.len() as u64),
        bytes,
    }
}

pub fn stats(repo: &Repository, prices: &Prices, class: Option<&str>) -> Result<Stats> {
    let (points, _) = repo.points()?;
    let mut objects: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (name, size) in repo.store.list("")? {
        let kind = name.split('/').next().unwrap_or("").to_string();
        let e = objects.entry(kind).or_default();
        e.0 += 1;
        e.1 += size;
    }
    let total_bytes = objects.values().map(|(_, b)| b).sum();
    let (idx, _) = index::load(&repo.store, &repo.key)?;
    let mut unique_bytes = 0u64;
    idx.try_for_each_chunk(|_, l| -> Result<()> {
        unique_bytes += u64::from(l.raw_len);
        Ok(())
    })?;
    let pack_bytes = idx.packs().map(|(_, s)| s).sum::<u64>();
    let mut latest = BTreeMap::new();
    for p in &points {
        latest.insert(p.meta.source.clone(), p);
    }
    // Restoring the latest points reads (about) the packs their lists reach: an
    // upper bound is every pack once, in ranged reads of up to 8 MiB.
    let latest_logical_bytes: u64 = latest
        .values()
        .map(|p| p.meta.disks.iter().map(|d| d.size).sum::<u64>())
        .sum();
    let disks: Vec<(&Point, usize)> = latest
        .values()
        .flat_map(|p| (0..p.meta.disks.len()).map(move |d| (*p, d)))
        .collect();
    let reads = restore_reads(repo, &idx, &disks);
    let (restore_latest_gets, restore_bytes) = (reads.gets, reads.bytes);
    let restore = Requests {
        gets: restore_latest_gets,
        bytes_down: restore_bytes,
        ..Requests::default()
    };
    let class_name = class.unwrap_or("default");
    let retrieval = prices.retrieval_gb.get(class_name).copied().unwrap_or(0.0);
    Ok(Stats {
        points: points.len(),
        sources: latest.len(),
        logical_bytes: points
            .iter()
            .map(|p| p.meta.disks.iter().map(|d| d.size).sum::<u64>())
            .sum(),
        latest_logical_bytes,
        unique_bytes,
        unique_chunks: idx.chunk_count(),
        pack_bytes,
        objects,
        total_bytes,
        storage_class: class_name.to_string(),
        prices: prices.name.clone(),
        monthly_storage_cost: total_bytes as f64 / GB * prices.storage(class),
        restore_latest_gets,
        restore_latest_cost: prices.requests(&restore) + restore_bytes as f64 / GB * retrieval,
        requests: repo.store.requests(),
    })
}
