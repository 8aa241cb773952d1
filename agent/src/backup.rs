//! Backup: read → find changes → chunk → hash → dedup → compress → encrypt → pack →
//! upload → index → commit the recovery point.
//!
//! ```text
//! reader ──segments──▶ workers (one per core) ──results──▶ collector ──packs──▶ uploaders
//!    ▲                      │ chunk, hash, dedup,            │ packs blobs,        │ put pack
//!    └──── free buffers ◀───┘ compress, encrypt               │ orders extents      ▼
//!                                                             └◀──── uploaded pack records
//! ```
//! Every channel is bounded, so memory stays flat whatever the disk size.
//! Without a change map, an incremental re-reads the disk and hashes it (memory or
//! disk speed); chunks whose id the index already holds cost nothing more.
//!
//! As each 64 MiB span of a disk completes, the collector stores its chunk list
//! as one more blob in the packs (once: a span that did not change is the same
//! list). Commit order: packs, then index objects, then the point. A crash leaves
//! packs without an index; the next backup indexes them from their tables and
//! reuses their chunks and lists (see [`recover_unindexed_packs`]).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::bounded;
use serde::Serialize;
use tracing::{info, warn};

use crate::chunker::SEGMENT_SIZE;
use crate::crypto::ChunkId;
use crate::error::{Error, Result};
use crate::index::{self, Index, PackRecord};
use crate::pack::{self, PackWriter, TARGET_PACK_SIZE};
use crate::point::{self, Consistency, DiskMeta, Extent, LIST_SPAN, ListId, Meta};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::source::{BlockSource, FileSource, is_zero};

/// One disk to back up.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Name inside the point; unique within it.
    pub name: String,
    pub path: PathBuf,
}

impl DiskSpec {
    /// A disk named after its file name.
    pub fn from_path(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        DiskSpec { name, path }
    }
}

/// What to back up.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub source: String,
    pub disks: Vec<DiskSpec>,
    /// The consistency to record; `None` records `crash`, or `fuzzy` when a disk
    /// changed while it was read.
    pub consistency: Option<Consistency>,
}

/// What a backup did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub point: String,
    pub source: String,
    pub parent: Option<String>,
    pub consistency: Consistency,
    /// Size of all disks.
    pub disk_bytes: u64,
    /// Bytes actually read (holes are skipped).
    pub bytes_read: u64,
    /// Chunks and bytes that were new to the repository.
    pub new_chunks: u64,
    pub new_bytes: u64,
    /// What the new chunks take in the repository (compressed, encrypted).
    pub stored_bytes: u64,
    pub packs_written: u64,
    /// Chunk lists stored (spans that differ from every stored one).
    pub lists_written: u64,
    /// Packs left by an interrupted backup that this one indexed and reused.
    pub packs_recovered: u64,
    pub duration_secs: f64,
    pub requests: crate::store::Requests,
}

struct Segment {
    disk: usize,
    seq: u64,
    len: usize,
    /// `None` for a segment that lies entirely in a hole.
    data: Option<Vec<u8>>,
}

/// A chunk's length and id (`None` for zeros), in segment order.
type SegExtent = (u32, Option<ChunkId>);

struct SegResult {
    disk: usize,
    seq: u64,
    extents: Vec<SegExtent>,
    blobs: Vec<(ChunkId, u32, Vec<u8>)>,
    buf: Option<Vec<u8>>,
}

#[derive(Default)]
struct Shared {
    error: Mutex<Option<Error>>,
    uploaded: Mutex<Vec<PackRecord>>,
    bytes_read: AtomicU64,
    new_chunks: AtomicU64,
    new_bytes: AtomicU64,
    stored_bytes: AtomicU64,
}

impl Shared {
    fn fail(&self, e: Error) {
        let mut slot = self.error.lock().expect("error slot");
        if slot.is_none() {
            *slot = Some(e);
        }
    }
    fn failed(&self) -> bool {
        self.error.lock().expect("error slot").is_some()
    }
}

/// How many packs between two index objects written during a backup.
const INDEX_EVERY: usize = 64;

/// Make one recovery point of all disks of a source.
pub fn backup(repo: &Repository, opts: &BackupOptions, progress: &Progress) -> Result<Summary> {
    if opts.source.is_empty() || opts.source.contains('@') || opts.source.contains('/') {
        return Err(Error::InvalidInput(format!(
            "source name {:?} must be non-empty, without '@' or '/'",
            opts.source
        )));
    }
    if opts.disks.is_empty() {
        return Err(Error::InvalidInput(
            "give at least one disk to back up".into(),
        ));
    }
    let mut names = HashSet::new();
    for d in &opts.disks {
        if !names.insert(&d.name) {
            return Err(Error::InvalidInput(format!(
                "two disks are named {:?}; give them different file names",
                d.name
            )));
        }
    }
    let sources: Vec<FileSource> = opts
        .disks
        .iter()
        .map(|d| FileSource::open(&d.path))
        .collect::<Result<_>>()?;
    let sources: Vec<&dyn BlockSource> = sources.iter().map(|s| s as &dyn BlockSource).collect();
    backup_sources(repo, opts, &sources, progress)
}

/// The backup pipeline over any block sources.
pub fn backup_sources(
    repo: &Repository,
    opts: &BackupOptions,
    sources: &[&dyn BlockSource],
    progress: &Progress,
) -> Result<Summary> {
    let started = Instant::now();
    // The lock goes up before the index is read: prune waits for it.
    let lock = crate::lock::Lock::acquire(repo, "backup", false)?;
    // Without condemned packs: under Object Lock the index objects naming them
    // may outlive them, and a backup must never dedup against them.
    let trashed = crate::prune::trashed_packs(repo)?;
    let (mut index, damaged) = index::load_without(&repo.store, &repo.key, &trashed)?;
    for e in &damaged {
        warn!(error = %e, "ignoring a damaged index object; its chunks will be stored again");
    }
    let recovered = recover_unindexed_packs(repo, &mut index, &trashed)?;
    let parent = repo
        .points()?
        .0
        .into_iter()
        .rfind(|p| p.meta.source == opts.source)
        .map(|p| p.id);

    struct DiskState {
        size: u64,
        marker: Option<(i64, i64)>,
        ranges: Vec<(u64, u64)>,
    }
    let mut disks = Vec::new();
    for s in sources {
        let size = s.size()?;
        let marker = s.change_marker();
        let ranges = s.data_ranges()?;
        progress.add_total(size);
        disks.push(DiskState {
            size,
            marker,
            ranges,
        });
    }

    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let shared = Shared::default();
    let chunker = repo.config.chunker;
    let level = repo.config.compression_level;
    let pending: Mutex<HashSet<ChunkId>> = Mutex::default();
    let index = &index;

    let (seg_tx, seg_rx) = bounded::<Segment>(workers);
    let (res_tx, res_rx) = bounded::<SegResult>(workers);
    let (free_tx, free_rx) = bounded::<Vec<u8>>(workers * 2 + 2);
    let (pack_tx, pack_rx) = bounded::<([u8; 32], Vec<u8>, Vec<pack::BlobEntry>)>(1);
    for _ in 0..workers * 2 + 2 {
        free_tx.send(Vec::new()).expect("free list has room");
    }

    // Per disk: the extents of the span being completed, the lists of the spans
    // done, and how many data bytes were seen. Only one span per disk is held.
    let n = sources.len();
    let mut span_ext: Vec<Vec<Extent>> = vec![Vec::new(); n];
    let mut lists: Vec<Vec<ListId>> = vec![Vec::new(); n];
    let mut data_bytes = vec![0u64; n];
    let mut covered = vec![0u64; n];
    let mut lists_written = 0u64;
    let segs_per_span = LIST_SPAN / SEGMENT_SIZE as u64;
    let seg_count: Vec<u64> = disks
        .iter()
        .map(|d| d.size.div_ceil(SEGMENT_SIZE as u64))
        .collect();
    let mut packs_written = 0u64;

    std::thread::scope(|scope| -> Result<()> {
        // Reader: segments in order, holes without reading.
        {
            let shared = &shared;
            let disks = &disks;
            scope.spawn(move || {
                let free_rx = free_rx;
                for (d, (src, st)) in sources.iter().zip(disks).enumerate() {
                    let mut ranges = st.ranges.iter().peekable();
                    let mut seq = 0u64;
                    let mut off = 0u64;
                    while off < st.size {
                        let len = (st.size - off).min(SEGMENT_SIZE as u64) as usize;
                        let end = off + len as u64;
                        while ranges.peek().is_some_and(|r| r.1 <= off) {
                            ranges.next();
                        }
                        let has_data = ranges.peek().is_some_and(|r| r.0 < end);
                        let data = if has_data {
                            let Ok(mut buf) = free_rx.recv() else { return };
                            buf.resize(len, 0);
                            if let Err(e) = src.read_exact_at(&mut buf, off) {
                                shared.fail(e);
                                return;
                            }
                            shared.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                            Some(buf)
                        } else {
                            None
                        };
                        if seg_tx
                            .send(Segment {
                                disk: d,
                                seq,
                                len,
                                data,
                            })
                            .is_err()
                        {
                            return;
                        }
                        seq += 1;
                        off = end;
                    }
                }
            });
        }

        // Workers: chunk, hash, dedup, compress, encrypt.
        for _ in 0..workers {
            let seg_rx = seg_rx.clone();
            let res_tx = res_tx.clone();
            let (shared, pending, key) = (&shared, &pending, &repo.key);
            scope.spawn(move || {
                let mut sealer = pack::Sealer::new(level);
                let mut cuts = Vec::new();
                for seg in seg_rx.iter() {
                    let mut out = SegResult {
                        disk: seg.disk,
                        seq: seg.seq,
                        extents: Vec::new(),
                        blobs: Vec::new(),
                        buf: None,
                    };
                    match &seg.data {
                        None => out.extents.push((seg.len as u32, None)),
                        Some(data) => {
                            chunker.cut(data, &mut cuts);
                            let mut at = 0usize;
                            for &n in &cuts {
                                let chunk = &data[at..at + n as usize];
                                at += n as usize;
                                if is_zero(chunk) {
                                    out.extents.push((n, None));
                                    continue;
                                }
                                let id = key.chunk_id(chunk);
                                out.extents.push((n, Some(id)));
                                if index.contains(&id)
                                    || !pending.lock().expect("pending set").insert(id)
                                {
                                    continue;
                                }
                                let sealed = sealer.seal(key, chunk);
                                shared.new_chunks.fetch_add(1, Ordering::Relaxed);
                                shared.new_bytes.fetch_add(n as u64, Ordering::Relaxed);
                                shared
                                    .stored_bytes
                                    .fetch_add(sealed.len() as u64, Ordering::Relaxed);
                                out.blobs.push((id, n, sealed));
                            }
                        }
                    }
                    out.buf = seg.data;
                    if res_tx.send(out).is_err() {
                        return;
                    }
                }
            });
        }
        drop(seg_rx);
        drop(res_tx);

        // Uploaders: put packs, record them for the index.
        for _ in 0..2 {
            let pack_rx = pack_rx.clone();
            let shared = &shared;
            scope.spawn(move || {
                for (id, bytes, entries) in pack_rx.iter() {
                    let size = bytes.len() as u64;
                    let name = pack::object_name(&id);
                    if let Err(e) = repo.put_object(&name, bytes) {
                        shared.fail(e);
                        return;
                    }
                    info!(pack = %name, size, chunks = entries.len(), "pack uploaded");
                    shared
                        .uploaded
                        .lock()
                        .expect("uploaded list")
                        .push(PackRecord { id, size, entries });
                }
            });
        }
        drop(pack_rx);

        // Collector (this thread): pack blobs, put extents in order, flush indexes.
        let mut writer = PackWriter::new();
        let mut reorder: Vec<BTreeMap<u64, Vec<SegExtent>>> = vec![BTreeMap::new(); sources.len()];
        let mut next_seq = vec![0u64; sources.len()];
        let flush_index = || -> Result<()> {
            let records = {
                let mut up = shared.uploaded.lock().expect("uploaded list");
                if up.len() < INDEX_EVERY {
                    return Ok(());
                }
                std::mem::take(&mut *up)
            };
            let obj = index::encode(&repo.key, &records);
            repo.put_object(&index::object_name(&obj), obj)
        };
        let mut list_sealer = pack::Sealer::new(level);
        for res in res_rx.iter() {
            if shared.failed() {
                break;
            }
            if let Some(buf) = res.buf {
                let _ = free_tx.send(buf);
            }
            let mut blobs = res.blobs;
            let seg_len: u64 = res.extents.iter().map(|e| e.0 as u64).sum();
            progress.add_done(seg_len);
            let d = res.disk;
            reorder[d].insert(res.seq, res.extents);
            while let Some(ext) = reorder[d].remove(&next_seq[d]) {
                for (len, id) in ext {
                    covered[d] += len as u64;
                    if id.is_some() {
                        data_bytes[d] += len as u64;
                    }
                    point::push_extent(&mut span_ext[d], len, id);
                }
                next_seq[d] += 1;
                if next_seq[d].is_multiple_of(segs_per_span) || next_seq[d] == seg_count[d] {
                    // A span is complete: its list is stored like a chunk, once.
                    let body = point::encode_list(&span_ext[d]);
                    // Chunker::validate keeps chunks ≥ 4 KiB, so this cannot fail.
                    debug_assert!(body.len() <= crate::chunker::MAX_CHUNK);
                    let lid = repo.key.chunk_id(&body);
                    if !index.contains(&lid) && pending.lock().expect("pending set").insert(lid) {
                        let sealed = list_sealer.seal(&repo.key, &body);
                        shared
                            .stored_bytes
                            .fetch_add(sealed.len() as u64, Ordering::Relaxed);
                        blobs.push((lid, body.len() as u32, sealed));
                        lists_written += 1;
                    }
                    lists[d].push(lid);
                    span_ext[d].clear();
                }
            }
            for (id, raw_len, sealed) in blobs {
                writer.add(id, raw_len, &sealed);
                if writer.len() >= TARGET_PACK_SIZE {
                    let full = std::mem::take(&mut writer).finish(&repo.key);
                    packs_written += 1;
                    if pack_tx.send(full).is_err() {
                        break;
                    }
                    if let Err(e) = flush_index() {
                        shared.fail(e);
                    }
                }
            }
        }
        // Dropping the receivers unblocks any stage still sending after a failure.
        drop(res_rx);
        drop(free_tx);
        if !shared.failed() && !writer.is_empty() {
            packs_written += 1;
            if pack_tx.send(writer.finish(&repo.key)).is_err() {
                shared.fail(Error::InvalidInput("uploaders stopped".into()));
            }
        }
        drop(pack_tx);
        Ok(())
    })?;

    if let Some(e) = shared.error.lock().expect("error slot").take() {
        return Err(e);
    }
    // Every pack landed: index them, then commit the point.
    let records = std::mem::take(&mut *shared.uploaded.lock().expect("uploaded list"));
    if !records.is_empty() {
        let obj = index::encode(&repo.key, &records);
        repo.put_object(&index::object_name(&obj), obj)?;
    }

    let mut consistency = opts.consistency.unwrap_or(Consistency::Crash);
    let mut disk_meta = Vec::new();
    for (d, (spec, (src, st))) in opts
        .disks
        .iter()
        .zip(sources.iter().zip(&disks))
        .enumerate()
    {
        let after = src.size()?;
        if after != st.size {
            return Err(Error::SourceChanged {
                path: spec.path.clone(),
                before: st.size,
                after,
            });
        }
        if covered[d] != st.size || lists[d].len() as u64 != point::list_count(st.size) {
            return Err(Error::InvalidInput(format!(
                "internal error: disk {} lists cover {} of {} bytes",
                spec.name, covered[d], st.size
            )));
        }
        if st.marker.is_some() && src.change_marker() != st.marker && opts.consistency.is_none() {
            warn!(disk = %spec.path.display(), "disk was written while it was read; the point is recorded as fuzzy");
            consistency = Consistency::Fuzzy;
        }
        disk_meta.push(DiskMeta {
            name: spec.name.clone(),
            path: spec.path.display().to_string(),
            size: st.size,
            digest: point::disk_digest(&repo.key, st.size, &lists[d]),
            data_bytes: data_bytes[d],
        });
    }
    let meta = Meta {
        source: opts.source.clone(),
        time: chrono::Utc::now(),
        parent: parent.clone(),
        consistency,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        host: crate::crypto::hostname(),
        chunker: repo.config.chunker,
        disks: disk_meta,
    };
    let (id, obj) = point::encode(&repo.key, &meta, &lists);
    lock.ensure_fresh()?;
    repo.put_object(&point::object_name(&id), obj)?;
    drop(lock);
    let summary = Summary {
        point: id,
        source: opts.source.clone(),
        parent,
        consistency,
        disk_bytes: disks.iter().map(|d| d.size).sum(),
        bytes_read: shared.bytes_read.load(Ordering::Relaxed),
        new_chunks: shared.new_chunks.load(Ordering::Relaxed),
        new_bytes: shared.new_bytes.load(Ordering::Relaxed),
        stored_bytes: shared.stored_bytes.load(Ordering::Relaxed),
        packs_written,
        lists_written,
        packs_recovered: recovered,
        duration_secs: started.elapsed().as_secs_f64(),
        requests: repo.store.requests(),
    };
    info!(point = %summary.point, source = %summary.source, new_bytes = summary.new_bytes, "recovery point committed");
    Ok(summary)
}

/// Index packs that an interrupted backup uploaded but never indexed, so their
/// chunks are reused instead of uploaded again. Returns how many were recovered.
pub fn recover_unindexed_packs(
    repo: &Repository,
    index: &mut Index,
    trashed: &HashSet<[u8; 32]>,
) -> Result<u64> {
    let mut records = Vec::new();
    for (name, size) in repo.store.list("packs/")? {
        let Some(id) = pack::parse_name(&name) else {
            continue;
        };
        if index.has_pack(&id) {
            continue;
        }
        // Packs a prune condemned are not "left by an interrupted backup".
        if trashed.contains(&id) {
            continue;
        }
        match pack::read_table(&repo.store, &repo.key, &name, size) {
            Ok(entries) => {
                index.add_pack(id, size, &entries);
                records.push(PackRecord { id, size, entries });
            }
            Err(Error::Missing { .. }) => {}
            Err(e) => {
                warn!(error = %e, "an unindexed pack is unreadable; its chunks will be stored again")
            }
        }
    }
    if !records.is_empty() {
        info!(
            packs = records.len(),
            "indexed packs left by an interrupted backup"
        );
        let obj = index::encode(&repo.key, &records);
        repo.put_object(&index::object_name(&obj), obj)?;
    }
    Ok(records.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KdfParams;
    use crate::repo::InitOptions;
    use crate::source::MemSource;
    use crate::store::Store;
    use std::sync::atomic::AtomicUsize;

    fn repo() -> Repository {
        let kdf = KdfParams {
            memory_kib: 64,
            iterations: 1,
            ..KdfParams::default()
        };
        Repository::init(
            Store::memory(),
            b"pw",
            InitOptions {
                kdf,
                ..InitOptions::default()
            },
        )
        .unwrap()
    }

    fn opts() -> BackupOptions {
        BackupOptions {
            source: "vm".into(),
            disks: vec![DiskSpec::from_path("/dev/vda")],
            consistency: None,
        }
    }

    /// A disk that grows after the backup has started.
    struct Growing {
        inner: MemSource,
        calls: AtomicUsize,
    }

    impl BlockSource for Growing {
        fn size(&self) -> Result<u64> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(self.inner.0.len() as u64 + if n > 0 { 4096 } else { 0 })
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.inner.read_exact_at(buf, offset)
        }
    }

    #[test]
    fn a_disk_that_changes_size_commits_nothing() {
        let repo = repo();
        let src = Growing {
            inner: MemSource(vec![7u8; 1 << 20]),
            calls: AtomicUsize::new(0),
        };
        let err = backup_sources(&repo, &opts(), &[&src], &Progress::default()).unwrap_err();
        assert!(
            matches!(err, Error::SourceChanged { before, after, .. } if after == before + 4096),
            "{err}"
        );
        assert!(err.to_string().contains("nothing was committed"));
        assert!(repo.point_ids().unwrap().is_empty());
    }

    #[test]
    fn backup_then_restore_chunks_match_in_memory() {
        let repo = repo();
        let mut data = vec![0u8; 3 << 20];
        for (i, b) in data.iter_mut().enumerate().take(1 << 20) {
            *b = (i * 31 % 251) as u8;
        }
        let run =
            |src: &MemSource| backup_sources(&repo, &opts(), &[src], &Progress::default()).unwrap();
        let src = MemSource(data.clone());
        let s = run(&src);
        let p = repo.load_point(&s.point).unwrap();
        assert_eq!(p.meta.disks[0].size, data.len() as u64);
        // Only the first MiB holds data; the rest is one zero run.
        assert_eq!(p.meta.disks[0].data_bytes, 1 << 20);
        let (index, _) = index::load(&repo.store, &repo.key).unwrap();
        let extents = repo
            .load_list(&index, &p.lists[0][0], data.len() as u64)
            .unwrap();
        assert_eq!(extents.iter().filter(|e| e.id.is_none()).count(), 1);
        let mut off = 0usize;
        for e in extents {
            let len = e.len as usize;
            if let Some(id) = e.id {
                let plain = repo.read_blob(&index, &id, "chunk").unwrap();
                assert_eq!(&plain[..], &data[off..off + len]);
            }
            off += len;
        }
        assert_eq!(off, data.len());

        // The same disk again writes no new list; a changed span writes one.
        assert_eq!(run(&src).lists_written, 0);
        let mut changed = data.clone();
        changed[5] ^= 1;
        let third = run(&MemSource(changed));
        assert_eq!(third.lists_written, 1);
        assert_eq!(third.new_chunks, 1);
    }
}
