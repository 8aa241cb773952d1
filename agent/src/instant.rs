//! Instant restore: random access to one disk of a recovery point, fetching
//! chunks on demand, for `ferry serve-nbd`.
//!
//! Nothing is read at open but the point and the index: a span's chunk list is
//! loaded the first time a read touches it, so the first byte is readable in
//! the same time whatever the disk's size. A miss fetches the chunk and the
//! next ones on the disk up to [`READ_AHEAD`] bytes, grouped by pack into
//! ranged reads, so a sequential reader (a VM booting, `qemu-img convert`)
//! mostly hits the cache. Every chunk is authenticated and checked against its
//! id before it is served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::cache::ChunkCache;
use crate::crypto::ChunkId;
use crate::error::{Error, Result};
use crate::index::{Index, Location};
use crate::pack;
use crate::point::{self, Extent, ListId, Point};
use crate::repo::Repository;

/// Chunk bytes fetched ahead of a miss, in disk order.
pub const READ_AHEAD: u64 = 4 << 20;
/// Neighbouring blobs of one pack closer than this are fetched in one request.
const MAX_GAP: u64 = 256 << 10;
const MAX_READ: u64 = 16 << 20;

/// One span's extents and where each starts on the disk.
struct SpanMap {
    extents: Vec<Extent>,
    starts: Vec<u64>,
}

/// What an instant restore fetched, for its report.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ReaderStats {
    pub bytes_served: u64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    pub requests: u64,
}

/// Random access to one disk of a point.
pub struct DiskReader {
    repo: Repository,
    index: Index,
    lists: Vec<ListId>,
    size: u64,
    disk: String,
    spans: Mutex<HashMap<usize, Arc<SpanMap>>>,
    cache: Mutex<ChunkCache>,
    /// Chunks some thread is fetching; others needing one wait for it instead of
    /// fetching it again (clients send many neighbouring reads at once).
    inflight: Mutex<std::collections::HashSet<ChunkId>>,
    fetched: std::sync::Condvar,
    served: AtomicU64,
    fetched_chunks: AtomicU64,
    fetched_bytes: AtomicU64,
    requests: AtomicU64,
}

impl DiskReader {
    /// Open disk `disk` of `point`; `cache_bytes` bounds the decoded chunks kept.
    pub fn open(repo: Repository, point: &Point, disk: usize, cache_bytes: usize) -> Result<Self> {
        let (index, _) = crate::prune::readable_index(&repo)?;
        let meta = point.meta.disks.get(disk).ok_or_else(|| {
            Error::InvalidInput(format!(
                "point {} has {} disk(s); there is no disk {disk}",
                point.short_id(),
                point.meta.disks.len()
            ))
        })?;
        Ok(DiskReader {
            repo,
            index,
            lists: point.lists[disk].clone(),
            size: meta.size,
            disk: meta.name.clone(),
            spans: Mutex::default(),
            cache: Mutex::new(ChunkCache::new(cache_bytes.max(2 * READ_AHEAD as usize))),
            inflight: Mutex::default(),
            fetched: std::sync::Condvar::new(),
            served: AtomicU64::new(0),
            fetched_chunks: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            bytes_served: self.served.load(Ordering::Relaxed),
            chunks_fetched: self.fetched_chunks.load(Ordering::Relaxed),
            bytes_fetched: self.fetched_bytes.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
        }
    }

    fn span(&self, i: usize) -> Result<Arc<SpanMap>> {
        if let Some(s) = self.spans.lock().expect("span map").get(&i) {
            return Ok(s.clone());
        }
        let (start, len) = point::list_span(self.size, i);
        let extents = self.repo.load_list(&self.index, &self.lists[i], len)?;
        let mut starts = Vec::with_capacity(extents.len());
        let mut at = start;
        for e in &extents {
            starts.push(at);
            at += e.len as u64;
        }
        let map = Arc::new(SpanMap { extents, starts });
        self.spans.lock().expect("span map").insert(i, map.clone());
        Ok(map)
    }

    /// Fill `buf` from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "a read of {} bytes at {offset} is past the end of disk {} ({} bytes)",
                    buf.len(),
                    self.disk,
                    self.size
                ))
            })?;
        let mut pos = offset;
        while pos < end {
            let si = (pos / point::LIST_SPAN) as usize;
            let span = self.span(si)?;
            let mut i = span.starts.partition_point(|s| *s <= pos) - 1;
            while pos < end && i < span.extents.len() {
                let e = span.extents[i];
                let from = pos - span.starts[i];
                let n = (e.len as u64 - from).min(end - pos) as usize;
                let out = &mut buf[(pos - offset) as usize..][..n];
                match e.id {
                    None => out.fill(0),
                    Some(id) => {
                        let cached = self.cache.lock().expect("cache").get(&id);
                        let data = match cached {
                            Some(d) => d,
                            None => self.fetch(&span, i)?,
                        };
                        let a = e.skip as usize + from as usize;
                        let src = data.get(a..a + n).ok_or_else(|| Error::DamagedChunk {
                            chunk: id.to_hex(),
                            disk: self.disk.clone(),
                            offset: pos,
                            detail: format!(
                                "a chunk list takes bytes {a}..{} of it, but it has {}",
                                a + n,
                                data.len()
                            ),
                        })?;
                        out.copy_from_slice(src);
                    }
                }
                pos += n as u64;
                i += 1;
            }
        }
        self.served.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Fetch the chunk of extent `i` and the chunks after it up to
    /// [`READ_AHEAD`] bytes that no other thread is fetching; returns extent
    /// `i`'s chunk (waiting for the thread that fetches it, if another does).
    fn fetch(&self, span: &SpanMap, i: usize) -> Result<Arc<Vec<u8>>> {
        let first = span.extents[i].id.expect("a chunk extent");
        let mut claimed: Vec<(ChunkId, Location)> = Vec::new();
        {
            let cache = self.cache.lock().expect("cache");
            let mut inflight = self.inflight.lock().expect("in-flight set");
            let mut ahead = 0u64;
            for e in &span.extents[i..] {
                let Some(id) = e.id else { continue };
                if ahead >= READ_AHEAD {
                    break;
                }
                if cache.get(&id).is_some() || inflight.contains(&id) {
                    continue;
                }
                let loc = self.index.get(&id)?.ok_or_else(|| Error::DamagedChunk {
                    chunk: id.to_hex(),
                    disk: self.disk.clone(),
                    offset: span.starts[i],
                    detail: "no pack holds it (its pack or index is missing)".into(),
                })?;
                inflight.insert(id);
                ahead += loc.raw_len as u64;
                claimed.push((id, loc));
            }
        }
        let result = self.fetch_claimed(span, i, &claimed);
        {
            let mut inflight = self.inflight.lock().expect("in-flight set");
            for (id, _) in &claimed {
                inflight.remove(id);
            }
        }
        self.fetched.notify_all();
        result?;
        loop {
            let cached = self.cache.lock().expect("cache").get(&first);
            if let Some(d) = cached {
                return Ok(d);
            }
            let inflight = self.inflight.lock().expect("in-flight set");
            if !inflight.contains(&first) {
                break;
            }
            // Woken when any fetch finishes; the timeout only guards against a
            // missed wake-up.
            let _ = self
                .fetched
                .wait_timeout(inflight, std::time::Duration::from_millis(100));
        }
        // Evicted already (a tiny cache) or the other fetch failed: fetch it alone.
        let plain = self.repo.read_blob(&self.index, &first, "chunk")?;
        Ok(Arc::new(plain))
    }

    /// Fetch the claimed chunks into the cache, grouped into ranged reads.
    fn fetch_claimed(&self, span: &SpanMap, i: usize, want: &[(ChunkId, Location)]) -> Result<()> {
        let mut opener = pack::ChunkOpener::default();
        for read in crate::index::plan_reads(want.iter().copied(), MAX_GAP, MAX_READ) {
            let (pack_id, _) = self.index.pack(read.pack);
            let name = pack::object_name(&pack_id);
            match self.fetch_read(&mut opener, span, i, &read, &name) {
                // An overwritten pack on a versioned store: read its original version.
                Err(
                    e
                    @ (Error::DamagedChunk { .. } | Error::Corrupt { .. } | Error::Missing { .. }),
                ) => {
                    if !self.repo.store.recover_original(&name)? {
                        return Err(e);
                    }
                    self.fetch_read(&mut opener, span, i, &read, &name)?;
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// One ranged read of a pack: its blobs opened, verified and cached.
    fn fetch_read(
        &self,
        opener: &mut pack::ChunkOpener,
        span: &SpanMap,
        i: usize,
        read: &crate::index::RangedRead,
        name: &str,
    ) -> Result<()> {
        let bytes = self.repo.store.get_range(name, read.start..read.end)?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.fetched_bytes
            .fetch_add(read.end - read.start, Ordering::Relaxed);
        for &(id, loc) in &read.blobs {
            let s = (loc.offset as u64 - read.start) as usize;
            let entry = loc.entry(id);
            let plain = opener
                .open(&self.repo.key, &entry, &bytes[s..s + loc.length as usize])
                .map_err(|d| Error::DamagedChunk {
                    chunk: id.to_hex(),
                    disk: self.disk.clone(),
                    offset: span.starts[i],
                    detail: format!("in {name}: {d}"),
                })?;
            self.fetched_chunks.fetch_add(1, Ordering::Relaxed);
            self.cache
                .lock()
                .expect("cache")
                .insert(id, Arc::new(plain.to_vec()));
        }
        Ok(())
    }

    /// Allocation over `[offset, offset + len)`: `(length, holds data)` runs in
    /// order, as far as the first span touched goes (callers ask again for more).
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let si = (offset / point::LIST_SPAN) as usize;
        let span = self.span(si)?;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut i = span.starts.partition_point(|s| *s <= offset) - 1;
        let mut pos = offset;
        while pos < end && i < span.extents.len() {
            let e = span.extents[i];
            let n = (span.starts[i] + e.len as u64).min(end) - pos;
            let data = e.id.is_some();
            match out.last_mut() {
                Some(last) if last.1 == data => last.0 += n,
                _ => out.push((n, data)),
            }
            pos += n;
            i += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_reads_match_the_disk() {
        let repo = crate::testing::memory_repo();
        let mut data = vec![0u8; (70 << 20) + 12345];
        let mut x = 1u64;
        for (i, b) in data.iter_mut().enumerate() {
            if (i >> 20) % 3 == 1 {
                continue; // some MiB stay zero
            }
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8;
        }
        let p = crate::testing::backup_bytes(&repo, &data);
        let r = DiskReader::open(repo, &p, 0, 1 << 20).unwrap();
        assert_eq!(r.size(), data.len() as u64);
        for (off, len) in [
            (0u64, 1usize),
            (4095, 8193),
            ((1 << 20) - 7, 100),
            ((64 << 20) - 3000, 9000),
            (data.len() as u64 - 10, 10),
            (5 << 20, 3 << 20),
        ] {
            let mut buf = vec![0xAAu8; len];
            r.read_at(&mut buf, off).unwrap();
            assert!(buf == data[off as usize..off as usize + len], "{off} {len}");
        }
        assert!(r.read_at(&mut [0u8; 2], data.len() as u64 - 1).is_err());
        let alloc = r.allocation(0, 4 << 20).unwrap();
        assert_eq!(alloc[0], (1 << 20, true));
        assert_eq!(alloc[1], (1 << 20, false));
    }
}
