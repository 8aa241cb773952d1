//! A map from chunk id to location that does not have to fit in memory.
//!
//! The newest entries live in a hash map. When it holds more than its limit,
//! they are sorted and written to a *run*: an unnamed, owner-only temporary
//! file of fixed-size records, gone when the process ends, even by `kill -9`.
//! For each run only two arrays stay in memory, 4.5 to 5 bytes per entry:
//!
//! ```text
//! struct Record { id: [u8; 32], pack: u32 LE, offset: u32 LE, length: u32 LE, raw_len: u32 LE, inner: u32 LE }
//! starts: [u32; 2^bits + 1]   // where each bucket (the id's first `bits` bits) begins
//! prints: [u32; entries]      // the 32 bits after the bucket's, in record order
//! ```
//!
//! A lookup finds the bucket, compares fingerprints in memory and reads a
//! record from disk only where one matches: a chunk that is not there (every
//! new chunk of a backup) costs no read at all, except one in 2^32 per
//! neighbour. Chunk ids are keyed hashes, so buckets hold 4 to 8 entries each.
//!
//! The first entry for an id wins, as in the in-memory index: `insert` checks
//! the runs before adding, so an id is in one place only and every lookup or
//! walk sees it once. Runs merge size-tiered: [`MERGE_FAN_IN`] runs of one
//! level become one of the next, so there are at most 3 per level, log4(entries
//! / limit) levels, and each entry is rewritten once per level.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::crypto::ChunkId;
use crate::error::{Error, Result};
use crate::pack::BlobEntry;

/// Chunk ids are already uniformly random: hash them by their first 8 bytes.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // A `[u8; 32]` hashes as a length prefix and one 32-byte write; XOR keeps
        // the id's first 8 bytes (the constant prefix changes nothing).
        let mut b = [0u8; 8];
        let n = bytes.len().min(8);
        b[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(b);
    }
}

pub type IdMap<V> = HashMap<ChunkId, V, BuildHasherDefault<IdHasher>>;

/// Where a chunk lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Location {
    pub pack: u32,
    pub offset: u32,
    pub length: u32,
    pub raw_len: u32,
    /// As [`BlobEntry::inner`]: the chunk's place in its compression group.
    pub inner: u32,
}

impl Location {
    /// The pack table entry of chunk `id` at this location.
    pub fn entry(&self, id: ChunkId) -> BlobEntry {
        BlobEntry {
            id,
            offset: self.offset,
            length: self.length,
            raw_len: self.raw_len,
            inner: self.inner,
        }
    }
}

/// Bytes of one record in a run.
pub const RECORD: usize = 32 + 5 * 4;
/// Runs of one level that merge into one of the next.
pub const MERGE_FAN_IN: usize = 4;
/// Entries kept in memory by default before they go to a run (about 50 MiB):
/// `FERRY_INDEX_MEMORY_CHUNKS` sets it, at least [`MIN_MEMORY_ENTRIES`].
pub const DEFAULT_MEMORY_ENTRIES: usize = 1 << 19;
/// The least limit the environment may set: smaller runs would cost a file and
/// a merge step per few entries.
pub const MIN_MEMORY_ENTRIES: usize = 1 << 16;

/// The default limit, from `FERRY_INDEX_MEMORY_CHUNKS` when set.
pub fn default_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("FERRY_INDEX_MEMORY_CHUNKS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map(|n| n.max(MIN_MEMORY_ENTRIES))
            .unwrap_or(if cfg!(test) {
                64
            } else {
                DEFAULT_MEMORY_ENTRIES
            })
    })
}

/// Chunk ids and their locations, the newest in memory and the rest on disk.
pub struct ChunkTable {
    recent: IdMap<Location>,
    runs: Vec<Run>,
    limit: usize,
    dir: PathBuf,
    /// Why the last spill failed: the table refuses new entries from then on
    /// (its owner stops and drops it) rather than retry a full disk per insert.
    failed: Option<String>,
}

impl Default for ChunkTable {
    fn default() -> Self {
        Self::with_limit(default_limit())
    }
}

impl std::fmt::Debug for ChunkTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkTable")
            .field("in_memory", &self.recent.len())
            .field("runs", &self.runs.len())
            .field("len", &self.len())
            .finish()
    }
}

impl ChunkTable {
    /// A table that keeps at most `limit` entries in memory.
    pub fn with_limit(limit: usize) -> Self {
        Self::in_dir(limit, crate::spill::spill_dir())
    }

    /// A table that keeps at most `limit` entries in memory and writes runs in `dir`.
    pub fn in_dir(limit: usize, dir: PathBuf) -> Self {
        ChunkTable {
            recent: IdMap::default(),
            runs: Vec::new(),
            limit,
            dir,
            failed: None,
        }
    }

    fn spill_error(&self, source: std::io::Error) -> Error {
        Error::Spill {
            path: self.dir.clone(),
            source,
        }
    }

    pub fn len(&self) -> usize {
        self.recent.len() + self.runs.iter().map(|r| r.prints.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many runs are on disk (for tests and reports).
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// Bytes this table holds in memory: entries not yet in a run, and each
    /// run's arrays.
    pub fn memory_bytes(&self) -> usize {
        let entry = std::mem::size_of::<(ChunkId, Location)>() + 1;
        self.recent.capacity() * entry
            + self
                .runs
                .iter()
                .map(|r| (r.starts.capacity() + r.prints.capacity()) * 4)
                .sum::<usize>()
    }

    pub fn get(&self, id: &ChunkId) -> Result<Option<Location>> {
        if let Some(l) = self.recent.get(id) {
            return Ok(Some(*l));
        }
        for r in &self.runs {
            if let Some(l) = r.get(id).map_err(|e| self.spill_error(e))? {
                return Ok(Some(l));
            }
        }
        Ok(None)
    }

    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.get(id)?.is_some())
    }

    /// Add `id` unless it is already here; returns whether it was added. An
    /// error (a spill that failed) may come after the entry was added; the
    /// table refuses every insert after it.
    pub fn insert(&mut self, id: ChunkId, loc: Location) -> Result<bool> {
        if let Some(why) = &self.failed {
            return Err(self.spill_error(std::io::Error::other(why.clone())));
        }
        if self.recent.contains_key(&id) {
            return Ok(false);
        }
        for r in &self.runs {
            if r.get(&id).map_err(|e| self.spill_error(e))?.is_some() {
                return Ok(false);
            }
        }
        self.recent.insert(id, loc);
        if self.recent.len() > self.limit
            && let Err(e) = self.spill()
        {
            self.failed = Some(e.to_string());
            return Err(e);
        }
        Ok(true)
    }

    /// Write the entries in memory to a new run, and merge it with the last
    /// runs while the last is no larger than the new one.
    fn spill(&mut self) -> Result<()> {
        let mut entries: Vec<(ChunkId, Location)> = self.recent.drain().collect();
        entries.sort_unstable_by_key(|e| e.0.0);
        match Run::write(&self.dir, entries.len(), entries.iter().map(|e| Ok(*e))) {
            Ok(run) => self.runs.push(run),
            Err(e) => {
                // Nothing is lost: the entries stay in memory.
                self.recent.extend(entries);
                return Err(self.spill_error(e));
            }
        }
        self.recent.shrink_to(self.limit.min(1 << 16));
        // Size-tiered: MERGE_FAN_IN runs of one level merge into one of the
        // next, so each entry is rewritten once per level.
        while self.runs.len() >= MERGE_FAN_IN {
            let n = self.runs.len();
            let tail = &self.runs[n - MERGE_FAN_IN..];
            let level = tail[0].level;
            if tail.iter().any(|r| r.level != level) {
                break;
            }
            let total = tail.iter().map(|r| r.prints.len()).sum();
            let mut merged =
                Run::write(&self.dir, total, Merge::new(tail)).map_err(|e| self.spill_error(e))?;
            merged.level = level + 1;
            self.runs.truncate(n - MERGE_FAN_IN);
            self.runs.push(merged);
        }
        Ok(())
    }

    /// Every entry, once each, in no particular order. Stops at the first
    /// entry `f` refuses, or at a read error.
    pub fn try_for_each<E: From<Error>>(
        &self,
        mut f: impl FnMut(&ChunkId, &Location) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        for (id, loc) in &self.recent {
            f(id, loc)?;
        }
        for r in &self.runs {
            let mut reader = RunReader::new(r);
            while let Some(rec) = reader
                .next_record()
                .map_err(|e| E::from(self.spill_error(e)))?
            {
                f(&rec.0, &rec.1)?;
            }
        }
        Ok(())
    }
}

/// A sorted run on disk and what finds its records.
struct Run {
    file: File,
    /// 0 for a spill; a merge of runs of level n is of level n + 1.
    level: u32,
    bits: u32,
    starts: Vec<u32>,
    prints: Vec<u32>,
}

/// The bucket and fingerprint of an id in a run with `bits` bucket bits.
fn split(id: &ChunkId, bits: u32) -> (usize, u32) {
    let x = u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"));
    ((x >> (64 - bits)) as usize, ((x << bits) >> 32) as u32)
}

fn encode(id: &ChunkId, l: &Location, out: &mut [u8; RECORD]) {
    out[..32].copy_from_slice(&id.0);
    for (i, v) in [l.pack, l.offset, l.length, l.raw_len, l.inner]
        .into_iter()
        .enumerate()
    {
        out[32 + 4 * i..36 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
}

fn decode(b: &[u8]) -> (ChunkId, Location) {
    let u = |i: usize| u32::from_le_bytes(b[32 + 4 * i..36 + 4 * i].try_into().expect("4 bytes"));
    (
        ChunkId(b[..32].try_into().expect("32 bytes")),
        Location {
            pack: u(0),
            offset: u(1),
            length: u(2),
            raw_len: u(3),
            inner: u(4),
        },
    )
}

impl Run {
    /// A run of `n` entries given in id order.
    fn write(
        dir: &std::path::Path,
        n: usize,
        entries: impl Iterator<Item = std::io::Result<(ChunkId, Location)>>,
    ) -> std::io::Result<Run> {
        // 2^bits buckets in (n/8, n/4]: 4 to 8 entries each.
        let bits = (usize::BITS - (n / 8).max(1).leading_zeros()).clamp(1, 28);
        let file = crate::spill::temp_file(dir)?;
        let mut out = BufWriter::with_capacity(1 << 20, &file);
        let mut counts = vec![0u32; (1usize << bits) + 1];
        let mut prints = Vec::with_capacity(n);
        let mut rec = [0u8; RECORD];
        for e in entries {
            let (id, loc) = e?;
            let (bucket, print) = split(&id, bits);
            counts[bucket + 1] += 1;
            prints.push(print);
            encode(&id, &loc, &mut rec);
            out.write_all(&rec)?;
        }
        out.flush()?;
        drop(out);
        for i in 1..counts.len() {
            counts[i] += counts[i - 1];
        }
        Ok(Run {
            file,
            level: 0,
            bits,
            starts: counts,
            prints,
        })
    }

    fn get(&self, id: &ChunkId) -> std::io::Result<Option<Location>> {
        let (bucket, print) = split(id, self.bits);
        let (lo, hi) = (
            self.starts[bucket] as usize,
            self.starts[bucket + 1] as usize,
        );
        let prints = &self.prints[lo..hi];
        let mut i = lo + prints.partition_point(|p| *p < print);
        let mut rec = [0u8; RECORD];
        while i < hi && self.prints[i] == print {
            self.file.read_exact_at(&mut rec, (i * RECORD) as u64)?;
            let (rid, loc) = decode(&rec);
            if rid == *id {
                return Ok(Some(loc));
            }
            i += 1;
        }
        Ok(None)
    }
}

/// Reads a run's records in order, a buffer at a time.
struct RunReader<'a> {
    run: &'a Run,
    next: usize,
    buf: Vec<u8>,
    at: usize,
}

impl<'a> RunReader<'a> {
    fn new(run: &'a Run) -> Self {
        RunReader {
            run,
            next: 0,
            buf: Vec::new(),
            at: 0,
        }
    }

    fn next_record(&mut self) -> std::io::Result<Option<(ChunkId, Location)>> {
        if self.at == self.buf.len() {
            let left = self.run.prints.len() - self.next;
            if left == 0 {
                return Ok(None);
            }
            let n = left.min((256 << 10) / RECORD);
            self.buf.resize(n * RECORD, 0);
            self.run
                .file
                .read_exact_at(&mut self.buf, (self.next * RECORD) as u64)?;
            self.next += n;
            self.at = 0;
        }
        let rec = decode(&self.buf[self.at..self.at + RECORD]);
        self.at += RECORD;
        Ok(Some(rec))
    }
}

/// The records of several runs in id order (an id is in one run only).
struct Merge<'a> {
    readers: Vec<RunReader<'a>>,
    heads: Vec<Option<(ChunkId, Location)>>,
    started: bool,
    /// After an error the merge yields nothing more.
    failed: bool,
}

impl<'a> Merge<'a> {
    fn new(runs: &'a [Run]) -> Self {
        Merge {
            readers: runs.iter().map(RunReader::new).collect(),
            heads: vec![None; runs.len()],
            started: false,
            failed: false,
        }
    }
}

impl Iterator for Merge<'_> {
    type Item = std::io::Result<(ChunkId, Location)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if !self.started {
            self.started = true;
            for (h, r) in self.heads.iter_mut().zip(&mut self.readers) {
                match r.next_record() {
                    Ok(x) => *h = x,
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                }
            }
        }
        // Two heads: a scan is as fast as a heap.
        let (i, _) = self
            .heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|h| (i, h.0.0)))
            .min_by_key(|(_, id)| *id)?;
        let out = self.heads[i].take();
        match self.readers[i].next_record() {
            Ok(x) => self.heads[i] = x,
            Err(e) => {
                self.failed = true;
                return Some(Err(e));
            }
        }
        out.map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn id(n: u64) -> ChunkId {
        ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    fn loc(n: u64) -> Location {
        Location {
            pack: n as u32,
            offset: (n * 3) as u32,
            length: (n * 5) as u32,
            raw_len: (n * 7) as u32,
            inner: (n * 11) as u32,
        }
    }

    #[test]
    fn entries_on_disk_are_found_once_and_the_first_wins() {
        let mut t = ChunkTable::with_limit(100);
        let mut want = HashMap::new();
        for n in 0..5000u64 {
            assert!(t.insert(id(n), loc(n)).unwrap());
            want.insert(id(n), loc(n));
        }
        // 49 spills of 101, merged by fours: 49 = 3·16 + 0·4 + 1, so three
        // runs of level 2 and one of level 0.
        assert_eq!(t.runs(), 4, "{t:?}");
        assert_eq!(
            t.runs.iter().map(|r| r.level).collect::<Vec<_>>(),
            [2, 2, 2, 0]
        );
        for r in &t.runs {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                r.file.metadata().unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(t.len(), 5000);
        // A later copy of an id loses, wherever the first one is.
        for n in (0..5000u64).step_by(7) {
            assert!(!t.insert(id(n), loc(n + 1)).unwrap());
        }
        assert_eq!(t.len(), 5000);
        for (i, l) in &want {
            assert_eq!(t.get(i).unwrap(), Some(*l));
        }
        for n in 5000..6000u64 {
            assert_eq!(t.get(&id(n)).unwrap(), None);
        }
        let mut seen = HashMap::new();
        t.try_for_each(|i, l| -> Result<()> {
            assert!(seen.insert(*i, *l).is_none(), "walked twice");
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, want);
        // Far less memory than the entries themselves.
        let entries = 5000 * std::mem::size_of::<(ChunkId, Location)>();
        assert!(t.memory_bytes() * 3 < entries, "{}", t.memory_bytes());
    }

    #[test]
    fn ids_that_share_their_first_bytes_are_told_apart_on_disk() {
        // Hostile ids: the same bucket and fingerprint, different tails.
        let mut t = ChunkTable::with_limit(3);
        let same = |n: u8| {
            let mut b = [0xab; 32];
            b[31] = n;
            ChunkId(b)
        };
        for n in 0..50u8 {
            assert!(t.insert(same(n), loc(n.into())).unwrap());
        }
        for n in 0..50u8 {
            assert_eq!(t.get(&same(n)).unwrap(), Some(loc(n.into())));
        }
        assert_eq!(t.get(&same(200)).unwrap(), None);
    }

    #[test]
    fn a_spill_directory_that_cannot_be_written_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = ChunkTable::in_dir(0, dir.path().join("gone"));
        let e = t.insert(id(1), loc(1)).unwrap_err().to_string();
        assert!(e.contains("gone") && e.contains("FERRY_SPILL_DIR"), "{e}");
        // Nothing was lost, and the table does not try again per insert.
        assert_eq!(t.get(&id(1)).unwrap(), Some(loc(1)));
        assert!(t.insert(id(2), loc(2)).is_err());
        assert_eq!(t.get(&id(2)).unwrap(), None);
    }
}
