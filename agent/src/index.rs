//! The index: which pack holds each chunk.
//!
//! ```text
//! struct IndexObject {
//!     header: Envelope,                       // kind = Index (4)
//!     body:   Sealed<Zstd<IndexBody>>,        // AAD = header
//! }
//! struct IndexBody { packs: u32 LE, [PackRecord; packs] }
//! struct PackRecord { id: [u8; 32], size: u64 LE, count: u32 LE, entries: [BlobEntry; count] }
//! ```
//! Index objects are named `index/<BLAKE3 of the object>` and only ever added.
//! In memory, the index costs about 100 bytes per chunk for its newest 524,288
//! chunks (a hash table) and 4.5 to 5 for the rest, which [`ChunkTable`] keeps on local disk
//! (see docs/performance.md).

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use crate::crypto::{ChunkId, MasterKey};
use crate::error::{Error, Result};
use crate::format::{self, Kind, Reader};
use crate::pack::BlobEntry;
use crate::table::ChunkTable;

// Defined beside the chunk table, which stores them; named here as well, where
// readers of the index look for them.
pub use crate::table::{IdMap, Location};

/// A pack known to the index.
#[derive(Debug, Clone)]
pub struct PackRecord {
    pub id: [u8; 32],
    pub size: u64,
    pub entries: Vec<BlobEntry>,
}

/// Every chunk the repository holds: the packs in memory, the chunks in a
/// [`ChunkTable`] that keeps the newest 524,288 in memory and the rest in
/// sorted runs on local disk (4.5 to 5 bytes of memory per chunk there).
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<([u8; 32], u64)>,
    pack_pos: HashMap<[u8; 32], u32>,
    chunks: ChunkTable,
}

impl Index {
    /// An empty index whose chunk table keeps at most `limit` chunks in memory.
    pub fn with_memory_limit(limit: usize) -> Self {
        Index {
            chunks: ChunkTable::with_limit(limit),
            ..Index::default()
        }
    }

    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        self.chunks.contains(id)
    }

    pub fn get(&self, id: &ChunkId) -> Result<Option<Location>> {
        self.chunks.get(id)
    }

    /// The pack id and size of a location's pack.
    pub fn pack(&self, pos: u32) -> ([u8; 32], u64) {
        self.packs[pos as usize]
    }

    pub fn has_pack(&self, id: &[u8; 32]) -> bool {
        self.pack_pos.contains_key(id)
    }

    pub fn packs(&self) -> impl Iterator<Item = ([u8; 32], u64)> + '_ {
        self.packs.iter().copied()
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Bytes the index holds in memory (its packs and its chunk table's part).
    pub fn memory_bytes(&self) -> usize {
        self.packs.capacity() * 40 + self.pack_pos.capacity() * 44 + self.chunks.memory_bytes()
    }

    /// Every chunk once, in no particular order; stops at the first error.
    pub fn try_for_each_chunk<E: From<Error>>(
        &self,
        f: impl FnMut(&ChunkId, &Location) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        self.chunks.try_for_each(f)
    }

    /// Add a pack's entries; a pack seen twice (two index objects) is added once.
    pub fn add_pack(&mut self, id: [u8; 32], size: u64, entries: &[BlobEntry]) -> Result<()> {
        if self.pack_pos.contains_key(&id) {
            return Ok(());
        }
        let pos = self.packs.len() as u32;
        self.packs.push((id, size));
        self.pack_pos.insert(id, pos);
        for e in entries {
            // The first copy of a chunk wins; later duplicates (two concurrent backups
            // storing the same chunk) stay reachable only through their pack table.
            self.chunks.insert(
                e.id,
                Location {
                    pack: pos,
                    offset: e.offset,
                    length: e.length,
                    raw_len: e.raw_len,
                    inner: e.inner,
                },
            )?;
        }
        Ok(())
    }
}

/// Encode an index object for some packs.
pub fn encode(key: &MasterKey, packs: &[PackRecord]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in packs {
        body.extend_from_slice(&p.id);
        body.extend_from_slice(&p.size.to_le_bytes());
        body.extend_from_slice(&(p.entries.len() as u32).to_le_bytes());
        for e in &p.entries {
            e.encode(&mut body);
        }
    }
    let compressed = zstd::bulk::compress(&body, 3).expect("zstd compresses to memory");
    let header = format::header(Kind::Index);
    let mut out = header.to_vec();
    key.seal_into(&header, &compressed, &mut out);
    out
}

/// The limit on a decompressed index object (about 6 million chunk entries).
pub const MAX_INDEX_BODY: usize = 256 << 20;
/// The largest index object readers download.
pub const MAX_INDEX_OBJECT: u64 = format::sealed_zstd_bound(MAX_INDEX_BODY);

/// Read an index object, refusing one larger than any index object can be.
pub fn get(store: &crate::store::Store, name: &str) -> Result<Bytes> {
    store.get_bounded(name, MAX_INDEX_OBJECT)
}

/// Decode an index object.
pub fn decode(key: &MasterKey, name: &str, bytes: &[u8]) -> Result<Vec<PackRecord>> {
    let (version, sealed) = format::split_versioned(name, Kind::Index, bytes)?;
    let compressed = key
        .open(format::aad(bytes), sealed)
        .ok_or_else(|| Error::corrupt(name, "fails authentication"))?;
    let body = format::decompress_bounded(&compressed, MAX_INDEX_BODY)
        .ok_or_else(|| {
            Error::corrupt(
                name,
                format!("cannot be decompressed into at most {MAX_INDEX_BODY} bytes, the most an index object holds"),
            )
        })?;
    decode_body(name, &body, version)
}

fn decode_body(name: &str, body: &[u8], version: u8) -> Result<Vec<PackRecord>> {
    let bad = |what: &str| Error::corrupt(name, what.to_string());
    let mut r = Reader::new(body);
    // A pack record is at least its id, size and count.
    let n = r
        .count(32 + 8 + 4)
        .ok_or_else(|| bad("pack count out of bounds"))?;
    let mut packs = Vec::with_capacity(n);
    for _ in 0..n {
        let id = r.array32().ok_or_else(|| bad("short pack record"))?;
        let size = r.u64().ok_or_else(|| bad("short pack record"))?;
        let count = r
            .count(BlobEntry::len_in(version))
            .ok_or_else(|| bad("entry count out of bounds"))?;
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let e = BlobEntry::decode(&mut r, version).ok_or_else(|| bad("short entry"))?;
            if (e.offset as usize) < format::HEADER_LEN || e.offset as u64 + e.length as u64 > size
            {
                return Err(bad("entry points outside its pack"));
            }
            entries.push(e);
        }
        packs.push(PackRecord { id, size, entries });
    }
    if r.remaining() != 0 {
        return Err(bad("trailing bytes"));
    }
    Ok(packs)
}

/// The object name of an encoded index object.
pub fn object_name(encoded: &[u8]) -> String {
    format!("index/{}", blake3::hash(encoded).to_hex())
}

/// Load every index object into memory; damaged ones are returned, not fatal.
pub fn load(store: &crate::store::Store, key: &MasterKey) -> Result<(Index, Vec<Error>)> {
    load_without(store, key, &HashSet::new())
}

/// Like [`load`], leaving out the given packs (condemned by a prune).
pub fn load_without(
    store: &crate::store::Store,
    key: &MasterKey,
    exclude: &HashSet<[u8; 32]>,
) -> Result<(Index, Vec<Error>)> {
    let (kept, damaged) = load_onto(store, key, exclude, None)?;
    Ok((kept.index, damaged))
}

/// An index with the names of the index objects it was built from and the packs
/// left out, kept between the backups of a long-lived process (`ferry protect`,
/// the agent) so that each one reads only the index objects that are new since
/// the last: a cycle's cost follows what changed, not the repository's history.
#[derive(Default)]
pub struct Kept {
    pub index: Index,
    names: HashSet<String>,
    exclude: HashSet<[u8; 32]>,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept")
            .field("objects", &self.names.len())
            .field("chunks", &self.index.chunk_count())
            .finish()
    }
}

impl Kept {
    /// How many index objects this index was built from.
    pub fn objects(&self) -> usize {
        self.names.len()
    }
}

/// The index of the index objects the store lists now, leaving out `exclude`.
/// Built on `kept` when it still applies: the same packs are left out and every
/// object it was built from is still listed (index objects are only ever added,
/// except by prune, which also changes what is left out or removes objects);
/// otherwise read whole.
pub fn load_onto(
    store: &crate::store::Store,
    key: &MasterKey,
    exclude: &HashSet<[u8; 32]>,
    kept: Option<Kept>,
) -> Result<(Kept, Vec<Error>)> {
    let listed: Vec<String> = store.list("index/")?.into_iter().map(|(n, _)| n).collect();
    let mut out = match kept {
        Some(k)
            if k.exclude == *exclude && {
                let now: HashSet<&str> = listed.iter().map(String::as_str).collect();
                k.names.iter().all(|n| now.contains(n.as_str()))
            } =>
        {
            k
        }
        _ => Kept {
            exclude: exclude.clone(),
            ..Kept::default()
        },
    };
    let mut damaged = Vec::new();
    for name in listed {
        if out.names.contains(&name) {
            continue;
        }
        let bytes: Bytes = match get(store, &name) {
            Ok(b) => b,
            Err(Error::Missing { .. }) => continue, // removed since the listing
            Err(e) => return Err(e),
        };
        match decode(key, &name, &bytes) {
            Ok(packs) => {
                for p in packs.iter().filter(|p| !exclude.contains(&p.id)) {
                    out.index.add_pack(p.id, p.size, &p.entries)?;
                }
                out.names.insert(name);
            }
            Err(e) => damaged.push(e),
        }
    }
    Ok((out, damaged))
}

/// Blobs of one pack fetched with one ranged read.
#[derive(Debug)]
pub struct RangedRead {
    pub pack: u32,
    pub start: u64,
    pub end: u64,
    pub blobs: Vec<(ChunkId, Location)>,
}

/// Group blobs by pack, in pack order, and coalesce neighbours that lie at most
/// `max_gap` apart into reads of at most `max_read` bytes (restore, instant restore).
/// The members of a compression group come in their order inside it, which
/// for a full backup's groups is their order on the disk: a restore writes a
/// run of them with one call instead of one call per chunk.
pub fn plan_reads(
    blobs: impl IntoIterator<Item = (ChunkId, Location)>,
    max_gap: u64,
    max_read: u64,
) -> Vec<RangedRead> {
    let mut by_pack: std::collections::BTreeMap<u32, Vec<(ChunkId, Location)>> =
        std::collections::BTreeMap::new();
    for (id, loc) in blobs {
        by_pack.entry(loc.pack).or_default().push((id, loc));
    }
    let mut reads = Vec::new();
    for (pack, mut blobs) in by_pack {
        blobs.sort_unstable_by_key(|b| (b.1.offset, b.1.inner));
        let mut cur: Option<RangedRead> = None;
        for (id, loc) in blobs {
            let (s, e) = (loc.offset as u64, loc.offset as u64 + loc.length as u64);
            if let Some(r) = &mut cur
                && s <= r.end + max_gap
                && e - r.start <= max_read
            {
                r.end = r.end.max(e);
                r.blobs.push((id, loc));
                continue;
            }
            reads.extend(cur.take());
            cur = Some(RangedRead {
                pack,
                start: s,
                end: e,
                blobs: vec![(id, loc)],
            });
        }
        reads.extend(cur);
    }
    reads
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let key = MasterKey::generate();
        let rec = PackRecord {
            id: [3; 32],
            size: 1000,
            entries: vec![BlobEntry {
                id: ChunkId([9; 32]),
                offset: 8,
                length: 100,
                raw_len: 200,
                inner: 0,
            }],
        };
        let obj = encode(&key, std::slice::from_ref(&rec));
        let back = decode(&key, "i", &obj).unwrap();
        assert_eq!(back[0].entries, rec.entries);
        let mut idx = Index::default();
        idx.add_pack(back[0].id, back[0].size, &back[0].entries)
            .unwrap();
        assert_eq!(idx.get(&ChunkId([9; 32])).unwrap().unwrap().raw_len, 200);
    }

    #[test]
    fn reads_come_in_pack_order_and_a_group_in_its_members_order() {
        let at = |pack, offset, length, inner| Location {
            pack,
            offset,
            length,
            raw_len: 65536,
            inner,
        };
        // Given in another order (a restore collects them from a hash map).
        let mut blobs = Vec::new();
        for k in (0..8u32).rev() {
            blobs.push((
                ChunkId([k as u8; 32]),
                at(1, 500, 9000, crate::pack::GROUPED | (k << 16)),
            ));
        }
        blobs.push((ChunkId([20; 32]), at(1, 9500, 100, 0)));
        blobs.push((ChunkId([21; 32]), at(0, 8, 100, 0)));
        blobs.push((ChunkId([22; 32]), at(1, 100, 300, 0)));
        blobs.push((ChunkId([23; 32]), at(1, 1 << 30, 100, 0)));
        let reads = plan_reads(blobs, 256 << 10, 8 << 20);
        let order: Vec<Vec<u8>> = reads
            .iter()
            .map(|r| r.blobs.iter().map(|(id, _)| id.0[0]).collect())
            .collect();
        assert_eq!(
            order,
            vec![vec![21], vec![22, 0, 1, 2, 3, 4, 5, 6, 7, 20], vec![23]]
        );
        assert_eq!((reads[1].start, reads[1].end), (100, 9600));
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_kept_index_reads_only_the_index_objects_written_since() {
        let repo = crate::testing::memory_repo();
        let (store, key) = (&repo.store, &repo.key);
        let none = HashSet::new();
        let gets = || store.requests().gets;
        let a = crate::testing::backup_bytes(&repo, &random(1 << 20, 1));
        let (kept, damaged) = load_onto(store, key, &none, None).unwrap();
        assert!(damaged.is_empty());
        let first = kept.objects();
        assert!(first >= 1);
        let b = crate::testing::backup_bytes(&repo, &random(1 << 20, 2));

        // Built on: only the new object is read, and both backups' chunks are in.
        let before = gets();
        let (kept, _) = load_onto(store, key, &none, Some(kept)).unwrap();
        assert_eq!(gets() - before, (kept.objects() - first) as u64);
        assert!(kept.objects() > first);
        let (whole, _) = load(store, key).unwrap();
        assert_eq!(kept.index.chunk_count(), whole.chunk_count());
        for p in [&a, &b] {
            assert!(
                kept.index.contains(&p.lists[0][0]).unwrap(),
                "the point's list is indexed"
            );
        }

        // Nothing new: nothing read.
        let before = gets();
        let (kept, _) = load_onto(store, key, &none, Some(kept)).unwrap();
        assert_eq!(gets(), before);

        // Other packs left out (a prune condemned one): read whole, without it.
        let (pack, _) = whole.packs().next().unwrap();
        let exclude: HashSet<[u8; 32]> = [pack].into();
        let objects = kept.objects();
        let before = gets();
        let (kept, _) = load_onto(store, key, &exclude, Some(kept)).unwrap();
        assert_eq!(gets() - before, objects as u64);
        assert!(!kept.index.has_pack(&pack));

        // An object it was built from is gone (a prune replaced it): read whole.
        let gone = store.list("index/").unwrap()[0].0.clone();
        store.delete(&gone).unwrap();
        let (kept, _) = load_onto(store, key, &exclude, Some(kept)).unwrap();
        assert_eq!(kept.objects(), objects - 1);
        let (fresh, _) = load_without(store, key, &exclude).unwrap();
        assert_eq!(kept.index.chunk_count(), fresh.chunk_count());
    }

    proptest! {
        #[test]
        fn hostile_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_body("i", &bytes, 1);
            let _ = decode_body("i", &bytes, 2);
            let key = MasterKey::generate();
            let _ = decode(&key, "i", &bytes);
        }
    }
}
