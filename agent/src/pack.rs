//! Packs: many encrypted chunks in one object, with their table at the end.
//!
//! ```text
//! struct Pack {
//!     header:    Envelope,                // kind = Pack (3), version 2 (or 1)
//!     blobs:     [SealedBlob],            // nonce[12] || AES-256-GCM(body) || tag[16]
//!     table:     Sealed<Table>,           // AAD = header; lists every chunk
//!     table_len: u32 LE,                  // length of the sealed table
//!     magic:     [u8; 4] = b"FRYT",
//! }
//! struct Table { count: u32 LE, entries: [BlobEntry; count] }
//! struct BlobEntry {                      // 48 bytes (version 1: 44, without `inner`)
//!     id: [u8; 32], offset: u32 LE, length: u32 LE, raw_len: u32 LE,
//!     inner: u32 LE,                      // GROUPED | offset in the group, or 0
//! }
//! ```
//! A blob holds one chunk (compressed exactly when its opened length differs
//! from `raw_len`), or, since version 2, a *compression group*: several chunks
//! compressed together as one zstd frame, each listed with the group's offset
//! and length and its own place inside the group's plaintext. Dedup stays per
//! chunk; compressing runs of new chunks together is what brings a repository
//! to the size of restic's, whose units are about 1 MiB (Ferry's groups are up
//! to 2 MiB).
//! A pack's name is the BLAKE3 hash of its bytes, so `check --read-data` can tell a
//! damaged pack from its name alone. The table makes a pack self-describing: an
//! index lost to a crash is rebuilt from it.

use crate::crypto::{ChunkId, MasterKey, OVERHEAD};
use crate::error::{Error, Result};
use crate::format::{self, HEADER_LEN, Kind, Reader};
use ring::aead::NONCE_LEN;

pub const TRAILER_MAGIC: [u8; 4] = *b"FRYT";
/// A table entry of format version 2; version 1 entries are [`ENTRY_LEN_V1`].
pub const ENTRY_LEN: usize = 48;
pub const ENTRY_LEN_V1: usize = 44;
/// `BlobEntry::inner` of a chunk in a compression group: this bit, and the
/// chunk's offset in the group's plaintext.
pub const GROUPED: u32 = 1 << 31;
/// A compression group holds new chunks of one segment, in disk order, up to
/// this many bytes of plaintext: zstd on 64 KiB units stored 10% more than
/// restic's ~1 MiB units on the benchmark image, and 2 MiB groups store 1.4%
/// less than 1 MiB ones for the same compression CPU (docs/performance.md,
/// Compression groups). Groups of 1 MiB (before) and up to [`MAX_GROUP`] read
/// the same.
pub const GROUP_BYTES: usize = 2 << 20;
/// Readers refuse a group that decompresses to more than this (a segment).
pub const MAX_GROUP: usize = crate::chunker::SEGMENT_SIZE;
/// Packs are cut near this size unless the repository's config says otherwise
/// (`ferry init --pack-size`); a pack never exceeds 4 GiB (offsets are u32).
pub const DEFAULT_PACK_SIZE: usize = 16 << 20;
/// The pack size `ferry init` gives a repository in object storage unless told
/// otherwise: a quarter of restic's objects per GiB, built in a temporary file
/// and uploaded in parts, so no more memory than 16 MiB packs in memory.
pub const REMOTE_PACK_SIZE: usize = 128 << 20;
/// The smallest pack size a repository may set.
pub const MIN_PACK_SIZE: usize = 4 << 20;
/// The largest pack size a repository may set; readers refuse larger
/// unindexed packs. Packs over [`IN_MEMORY_PACK`] are built in a temporary
/// file, so a backup's memory does not grow with the pack size; `check
/// --read-data` and `prune` read a pack whole, one per thread.
pub const MAX_PACK_SIZE: usize = 128 << 20;
/// A sealed table larger than this is treated as damage, not allocated.
const MAX_TABLE: u64 = 64 << 20;
/// A pack is closed when it holds this many blobs, whatever its size, so its
/// table never exceeds [`MAX_WRITTEN_TABLE`]: highly compressible chunks would
/// otherwise fill 16 MiB with hundreds of thousands of tiny blobs.
pub const MAX_PACK_ENTRIES: usize = 16384;
/// The most chunks one compression group holds: it is sealed once it reaches
/// [`GROUP_BYTES`] or this many members, whichever comes first. Kept at what
/// 1 MiB groups of 4 KiB chunks could reach, so that [`MAX_WRITTEN_TABLE`],
/// which readers of every version bound unindexed packs by, did not grow
/// with the groups.
pub const MAX_GROUP_MEMBERS: usize = 257;
/// The largest table a pack of this version writes (about 780 KiB): 4 bytes of
/// count, the entries (a pack is closed at its first blob past
/// [`MAX_PACK_ENTRIES`], which may be a group), and the AEAD overhead.
pub const MAX_WRITTEN_TABLE: u64 =
    (4 + ENTRY_LEN * (MAX_PACK_ENTRIES + MAX_GROUP_MEMBERS) + OVERHEAD) as u64;
/// The largest pack this version writes: a pack is closed at its first blob past
/// [`MAX_PACK_SIZE`] at most, a blob is at most a sealed 4 MiB chunk, then the table
/// and the 8-byte trailer.
pub const MAX_WRITTEN_PACK: u64 =
    (MAX_PACK_SIZE + crate::chunker::MAX_CHUNK + OVERHEAD + 8) as u64 + MAX_WRITTEN_TABLE;

/// A chunk of a blob being packed: its id, its length and its place in its
/// compression group (`inner` of [`BlobEntry`]).
pub type Member = (ChunkId, u32, u32);

/// Where one chunk sits inside its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobEntry {
    pub id: ChunkId,
    /// The blob (the chunk's own, or its group's) in the pack.
    pub offset: u32,
    pub length: u32,
    /// The chunk's length.
    pub raw_len: u32,
    /// [`GROUPED`] and the chunk's offset in its group's plaintext, or 0 for a
    /// blob of its own.
    pub inner: u32,
}

impl BlobEntry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.extend_from_slice(&self.inner.to_le_bytes());
    }

    /// An entry as the given format version wrote it.
    pub fn decode(r: &mut Reader<'_>, version: u8) -> Option<Self> {
        Some(BlobEntry {
            id: ChunkId(r.array32()?),
            offset: r.u32()?,
            length: r.u32()?,
            raw_len: r.u32()?,
            inner: if version >= 2 { r.u32()? } else { 0 },
        })
    }

    /// The table entry length of a format version.
    pub fn len_in(version: u8) -> usize {
        if version >= 2 {
            ENTRY_LEN
        } else {
            ENTRY_LEN_V1
        }
    }

    /// Whether the chunk shares its blob with others (a compression group).
    pub fn grouped(&self) -> bool {
        self.inner & GROUPED != 0
    }
}

/// The name of a pack object from its id.
pub fn object_name(id: &[u8; 32]) -> String {
    let h = hex::encode(id);
    format!("packs/{}/{}", &h[..2], h)
}

/// Parse a pack object name back into its id.
pub fn parse_name(name: &str) -> Option<[u8; 32]> {
    let hex_part = name.strip_prefix("packs/")?.split('/').nth(1)?;
    let v = hex::decode(hex_part).ok()?;
    v.try_into().ok()
}

/// Packs cut at up to this size are built in memory and put whole; larger
/// ones are built in an unnamed temporary file in the spill directory
/// ([`crate::spill::spill_dir`]) and uploaded from it in parts
/// ([`crate::store::Store::put_file`]), as restic builds every pack, so that
/// a backup's memory does not grow with the pack size.
pub const IN_MEMORY_PACK: usize = 16 << 20;
/// A spilled pack's bytes are written to its file in pieces of this size (see
/// [`crate::store::WRITE_PIECE`] for why not larger).
const SPILL_PIECE: usize = 1 << 20;

/// A finished pack: its id (the BLAKE3 hash of its bytes), bytes and table.
pub struct Sealed {
    pub id: [u8; 32],
    pub body: PackBody,
    pub entries: Vec<BlobEntry>,
}

/// Where a finished pack's bytes are.
pub enum PackBody {
    Memory(Vec<u8>),
    /// An unnamed temporary file (gone when closed) holding `len` bytes.
    File {
        file: std::fs::File,
        len: u64,
    },
}

impl PackBody {
    pub fn len(&self) -> u64 {
        match self {
            PackBody::Memory(v) => v.len() as u64,
            PackBody::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in memory (a spilled pack is read back whole).
    pub fn into_bytes(self) -> std::io::Result<Vec<u8>> {
        match self {
            PackBody::Memory(v) => Ok(v),
            PackBody::File { file, len } => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0; len as usize];
                file.read_exact_at(&mut buf, 0)?;
                Ok(buf)
            }
        }
    }
}

/// The file a large pack is built in, with the hash of what went into it.
struct Spill {
    dir: std::path::PathBuf,
    /// Created at the first write.
    file: Option<std::fs::File>,
    hasher: blake3::Hasher,
    written: u64,
}

impl Spill {
    /// Write `bytes` to the file, which must be open (see `PackWriter::open_spill`).
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let fail = |dir: &std::path::Path, source| Error::Spill {
            path: dir.to_path_buf(),
            source,
        };
        let file = self.file.as_mut().expect("the spill file is open");
        for piece in bytes.chunks(SPILL_PIECE) {
            file.write_all(piece).map_err(|e| fail(&self.dir, e))?;
        }
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Builds one pack, in memory or (over [`IN_MEMORY_PACK`]) in a temporary file.
pub struct PackWriter {
    /// The whole pack in memory; for a spilled pack, what is not written yet.
    buf: Vec<u8>,
    spill: Option<Spill>,
    entries: Vec<BlobEntry>,
    /// Where the pack is cut (the repository's pack size).
    target: usize,
}

impl PackWriter {
    /// A pack cut near `target` bytes (clamped to the sizes a repository may
    /// set); spilled into [`crate::spill::spill_dir`] when over [`IN_MEMORY_PACK`].
    pub fn new(target: usize) -> Self {
        Self::in_dir(target, crate::spill::spill_dir())
    }

    /// [`PackWriter::new`], spilling into `dir`.
    pub fn in_dir(target: usize, dir: std::path::PathBuf) -> Self {
        let target = target.clamp(MIN_PACK_SIZE, MAX_PACK_SIZE);
        let spill = (target > IN_MEMORY_PACK).then(|| Spill {
            dir,
            file: None,
            hasher: blake3::Hasher::new(),
            written: 0,
        });
        // Reserved, not touched: pages become resident as blobs arrive.
        let reserve = if spill.is_some() {
            2 * SPILL_PIECE
        } else {
            target + (1 << 20)
        };
        let mut buf = Vec::with_capacity(reserve);
        buf.extend_from_slice(&format::header(Kind::Pack));
        PackWriter {
            buf,
            spill,
            entries: Vec::new(),
            target,
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len() + self.spill.as_ref().map_or(0, |s| s.written as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether adding a blob of `next` bytes would take the pack past its
    /// size or [`MAX_PACK_ENTRIES`] (never for an empty pack).
    pub fn full_before(&self, next: usize) -> bool {
        !self.is_empty()
            && (self.len() + next > self.target || self.entries.len() >= MAX_PACK_ENTRIES)
    }

    /// Whether the pack has reached its size or [`MAX_PACK_ENTRIES`].
    pub fn full(&self) -> bool {
        self.len() >= self.target || self.entries.len() >= MAX_PACK_ENTRIES
    }

    /// Append an already sealed blob of one chunk.
    pub fn add(&mut self, id: ChunkId, raw_len: u32, sealed: &[u8]) -> Result<()> {
        self.add_blob(&[(id, raw_len, 0)], sealed)
    }

    /// Append an already sealed blob: one chunk (`inner` 0), or a compression
    /// group whose members are `(id, raw_len, inner)` with `inner` as in
    /// [`BlobEntry::inner`]. Fails only when a spilled pack cannot be written
    /// (`Error::Spill`, naming the directory).
    pub fn add_blob(&mut self, members: &[Member], sealed: &[u8]) -> Result<()> {
        let offset = self.len() as u32;
        for &(id, raw_len, inner) in members {
            self.entries.push(BlobEntry {
                id,
                offset,
                length: sealed.len() as u32,
                raw_len,
                inner,
            });
        }
        self.open_spill();
        match &mut self.spill {
            None => self.buf.extend_from_slice(sealed),
            Some(spill) => {
                if !self.buf.is_empty() && self.buf.len() + sealed.len() > SPILL_PIECE {
                    spill.write(&self.buf)?;
                    self.buf.clear();
                }
                if sealed.len() >= SPILL_PIECE {
                    spill.write(sealed)?;
                } else {
                    self.buf.extend_from_slice(sealed);
                }
            }
        }
        Ok(())
    }

    /// Opens the spill file on first use. Where it cannot be created (a
    /// spill directory that is missing or not writable, as inside a minimal
    /// guest) the pack is built in memory instead, with a warning, rather than
    /// failing the backup; a write that fails once the file is open is an
    /// error (`Error::Spill`, naming the directory).
    fn open_spill(&mut self) {
        let Some(spill) = self.spill.as_mut() else {
            return;
        };
        if spill.file.is_none() {
            match crate::spill::temp_file(&spill.dir) {
                Ok(f) => spill.file = Some(f),
                Err(e) => {
                    static WARNED: std::sync::atomic::AtomicBool =
                        std::sync::atomic::AtomicBool::new(false);
                    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(dir = %spill.dir.display(), error = %e, "cannot create a temporary file for a pack there; building packs in memory (set FERRY_SPILL_DIR to a private directory with room)");
                    }
                    // Nothing was written yet: the pack so far is in `buf`.
                    self.spill = None;
                }
            }
        }
    }

    /// Seal the table and return the pack's id, bytes and entries.
    pub fn finish(mut self, key: &MasterKey) -> Result<Sealed> {
        let mut table = Vec::with_capacity(4 + self.entries.len() * ENTRY_LEN);
        table.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            e.encode(&mut table);
        }
        let before = self.buf.len();
        key.seal_into(&format::header(Kind::Pack), &table, &mut self.buf);
        let table_len = (self.buf.len() - before) as u32;
        self.buf.extend_from_slice(&table_len.to_le_bytes());
        self.buf.extend_from_slice(&TRAILER_MAGIC);
        self.open_spill();
        let (id, body) = match self.spill.take() {
            None => (
                *blake3::hash(&self.buf).as_bytes(),
                PackBody::Memory(self.buf),
            ),
            Some(mut spill) => {
                spill.write(&self.buf)?;
                let file = spill.file.take().expect("a spilled pack was written");
                (
                    *spill.hasher.finalize().as_bytes(),
                    PackBody::File {
                        file,
                        len: spill.written,
                    },
                )
            }
        };
        Ok(Sealed {
            id,
            body,
            entries: self.entries,
        })
    }
}

/// Compresses (when that saves space) and encrypts chunks, one thread's worth:
/// it keeps its zstd context and buffers from one chunk to the next.
pub struct Sealer {
    compressor: zstd::bulk::Compressor<'static>,
    /// Chunks copied together when they do not lie together already.
    group: Vec<u8>,
}

impl Sealer {
    /// `level` must be a valid zstd level (the repository config checks it).
    pub fn new(level: i32) -> Self {
        Sealer {
            compressor: zstd::bulk::Compressor::new(level).expect("zstd level was validated"),
            group: Vec::new(),
        }
    }

    /// Seal one chunk; the caller records `raw_len = plain.len()`.
    pub fn seal(&mut self, key: &MasterKey, plain: &[u8]) -> Vec<u8> {
        // (Skipping zstd after incompressible chunks, with a 4 KiB probe, saved
        // about 3% of a full backup's CPU for 0.6% more stored bytes: not kept.)
        self.seal_compressed(key, plain)
            .unwrap_or_else(|| self.seal_raw(key, plain))
    }

    /// Seal chunks as one compression group; `None` when compressing them
    /// together does not save 1/32 (they are then sealed one by one, stored as
    /// they are). The members' entries are `inner = GROUPED | offset`.
    /// `joint`, when the caller has it, is the chunks as one slice already
    /// (they lie one after the other in its buffer): it is compressed where it
    /// lies instead of being copied together.
    pub fn seal_group(
        &mut self,
        key: &MasterKey,
        chunks: &[&[u8]],
        joint: Option<&[u8]>,
    ) -> Option<Vec<u8>> {
        if let Some(plain) = joint {
            debug_assert_eq!(plain.len(), chunks.iter().map(|c| c.len()).sum::<usize>());
            return self.seal_compressed(key, plain);
        }
        let mut plain = std::mem::take(&mut self.group);
        plain.clear();
        for c in chunks {
            plain.extend_from_slice(c);
        }
        let out = self.seal_compressed(key, &plain);
        self.group = plain;
        out
    }

    /// Seal `plain` compressed, or `None` when that does not save 1/32:
    /// decompressing a chunk that barely shrank costs more at restore than the
    /// bytes it saves. zstd writes straight after the nonce's room and the
    /// cipher runs in place, so the compressed bytes are not copied.
    fn seal_compressed(&mut self, key: &MasterKey, plain: &[u8]) -> Option<Vec<u8>> {
        let bound = zstd::zstd_safe::compress_bound(plain.len());
        let mut out = Vec::with_capacity(bound + OVERHEAD);
        out.extend_from_slice(&[0; NONCE_LEN]);
        let mut at = std::io::Cursor::new(out);
        at.set_position(NONCE_LEN as u64);
        let n = self.compressor.compress_to_buffer(plain, &mut at).ok()?;
        if n >= plain.len() - plain.len() / 32 {
            return None;
        }
        let mut out = at.into_inner();
        key.seal_in_place(BLOB_AAD, &mut out, 0);
        Some(out)
    }

    /// Seal one chunk as it is, without trying to compress it.
    pub fn seal_raw(&mut self, key: &MasterKey, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD);
        key.seal_into(BLOB_AAD, plain, &mut out);
        out
    }
}

const BLOB_AAD: &[u8] = b"ferry blob v1";

/// Opens, decompresses and verifies blobs, reusing its buffers and zstd context
/// from one blob to the next (restore and check open millions of them). The
/// last compression group it opened is kept, so the group's other chunks, which
/// readers meet next (they read blobs in pack order), cost a slice and a hash.
pub struct ChunkOpener {
    sealed: Vec<u8>,
    plain: Vec<u8>,
    decompressor: zstd::bulk::Decompressor<'static>,
    /// The nonce and length of the group in `plain`, when it holds one.
    group: Option<([u8; 12], usize)>,
}

impl Default for ChunkOpener {
    fn default() -> Self {
        ChunkOpener {
            sealed: Vec::new(),
            plain: Vec::new(),
            decompressor: zstd::bulk::Decompressor::new().expect("zstd context"),
            group: None,
        }
    }
}

impl ChunkOpener {
    /// The chunk's plaintext, or what was wrong with the blob.
    pub fn open(
        &mut self,
        key: &MasterKey,
        entry: &BlobEntry,
        sealed: &[u8],
    ) -> Result<&[u8], String> {
        let raw_len = entry.raw_len as usize;
        if raw_len > crate::chunker::MAX_CHUNK {
            return Err(format!("impossible chunk length {raw_len}"));
        }
        let plain: &[u8] = if entry.grouped() {
            self.open_group(key, entry, sealed)?
        } else {
            self.group = None;
            self.sealed.clear();
            self.sealed.extend_from_slice(sealed);
            let body = key
                .open_in_place(BLOB_AAD, &mut self.sealed)
                .ok_or("authentication failed (the stored bytes were altered)")?;
            if body.len() == raw_len {
                body
            } else {
                inflate(&mut self.decompressor, body, &mut self.plain, |n| {
                    n == raw_len as u64
                })?;
                &self.plain
            }
        };
        if key.chunk_id(plain) != entry.id {
            return Err("content does not match its id".into());
        }
        Ok(plain)
    }

    /// A grouped chunk's bytes: the group is opened and decompressed whole
    /// (at most [`MAX_GROUP`] bytes), once for all its chunks read in a row.
    fn open_group(
        &mut self,
        key: &MasterKey,
        entry: &BlobEntry,
        sealed: &[u8],
    ) -> Result<&[u8], String> {
        let nonce: Option<[u8; 12]> = sealed.get(..12).and_then(|n| n.try_into().ok());
        let same = nonce.is_some_and(|n| self.group == Some((n, sealed.len())));
        if !same {
            self.group = None;
            self.sealed.clear();
            self.sealed.extend_from_slice(sealed);
            let body = key
                .open_in_place(BLOB_AAD, &mut self.sealed)
                .ok_or("authentication failed (the stored bytes were altered)")?;
            inflate(&mut self.decompressor, body, &mut self.plain, |n| {
                n <= MAX_GROUP as u64
            })?;
            self.group = nonce.map(|n| (n, sealed.len()));
        }
        let at = (entry.inner & !GROUPED) as usize;
        self.plain
            .get(at..at + entry.raw_len as usize)
            .ok_or_else(|| "lies outside its compression group".to_string())
    }
}

/// Decompress one zstd frame into `out`, refusing a frame whose header does not
/// state a size that `fits` accepts, or that decompresses to another size.
fn inflate(
    decompressor: &mut zstd::bulk::Decompressor<'static>,
    body: &[u8],
    out: &mut Vec<u8>,
    fits: impl Fn(u64) -> bool,
) -> Result<(), String> {
    let size = match zstd::zstd_safe::get_frame_content_size(body) {
        Ok(Some(n)) if fits(n) => n as usize,
        _ => return Err("decompression failed (bad frame header)".into()),
    };
    out.clear();
    out.reserve(size);
    match decompressor.decompress_to_buffer(body, out) {
        Ok(n) if n == size => Ok(()),
        _ => Err("decompression failed".into()),
    }
}

/// Read a pack's table from the pack's last bytes (two ranged reads).
pub fn read_table(
    store: &crate::store::Store,
    key: &MasterKey,
    name: &str,
    size: u64,
) -> Result<Vec<BlobEntry>> {
    read_table_within(store, key, name, size, MAX_TABLE)
}

/// [`read_table`] for an object nothing vouches for (a pack no index lists):
/// only what this version writes is accepted, so an object planted under
/// `packs/` costs at most 8 bytes and a [`MAX_WRITTEN_TABLE`] read, never its body.
pub fn read_unindexed_table(
    store: &crate::store::Store,
    key: &MasterKey,
    name: &str,
    size: u64,
) -> Result<Vec<BlobEntry>> {
    if size > MAX_WRITTEN_PACK {
        return Err(Error::corrupt(
            name,
            format!("{size} bytes is larger than any pack ferry writes ({MAX_WRITTEN_PACK} bytes)"),
        ));
    }
    read_table_within(store, key, name, size, MAX_WRITTEN_TABLE)
}

fn read_table_within(
    store: &crate::store::Store,
    key: &MasterKey,
    name: &str,
    size: u64,
    max_table: u64,
) -> Result<Vec<BlobEntry>> {
    if size < (HEADER_LEN + OVERHEAD + 8) as u64 {
        return Err(Error::corrupt(
            name,
            format!("{size} bytes is too short for a pack (truncated?)"),
        ));
    }
    let tail = store.get_range(name, size - 8..size)?;
    if tail[4..] != TRAILER_MAGIC {
        return Err(Error::corrupt(name, "no pack trailer (truncated?)"));
    }
    let table_len = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as u64;
    if table_len > max_table || table_len + 8 + HEADER_LEN as u64 > size {
        return Err(Error::corrupt(
            name,
            format!(
                "pack table length {table_len} out of bounds (at most {max_table} bytes, and less than the pack)"
            ),
        ));
    }
    let sealed = store.get_range(name, size - 8 - table_len..size - 8)?;
    parse_table(key, name, &sealed, size)
}

/// Open and check a sealed pack table against the pack's size.
pub fn parse_table(
    key: &MasterKey,
    name: &str,
    sealed: &[u8],
    size: u64,
) -> Result<Vec<BlobEntry>> {
    // A pack's header is not read (packs are read from their trailer): the
    // table authenticates under the header of the version that wrote it.
    let (version, table) = [format::FORMAT_VERSION, 1]
        .into_iter()
        .find_map(|v| Some((v, key.open(&format::header_of(Kind::Pack, v), sealed)?)))
        .ok_or_else(|| Error::corrupt(name, "pack table fails authentication"))?;
    let mut r = Reader::new(&table);
    let n = r
        .count(BlobEntry::len_in(version))
        .ok_or_else(|| Error::corrupt(name, "pack table count out of bounds"))?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        let e = BlobEntry::decode(&mut r, version)
            .ok_or_else(|| Error::corrupt(name, "short pack table"))?;
        if (e.offset as u64) < HEADER_LEN as u64 || e.offset as u64 + e.length as u64 > size {
            return Err(Error::corrupt(
                name,
                "pack table entry points outside the pack",
            ));
        }
        entries.push(e);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pack_round_trip_through_store() {
        let key = MasterKey::generate();
        let mut sealer = Sealer::new(3);
        let mut w = PackWriter::new(DEFAULT_PACK_SIZE);
        let chunks: Vec<Vec<u8>> = vec![
            vec![7u8; 10000],
            (0..5000u32).map(|i| (i * 7919) as u8).collect(),
        ];
        for c in &chunks {
            let sealed = sealer.seal(&key, c);
            w.add(key.chunk_id(c), c.len() as u32, &sealed).unwrap();
        }
        let Sealed { id, body, entries } = w.finish(&key).unwrap();
        let bytes = body.into_bytes().unwrap();
        let store = crate::store::Store::memory();
        let name = object_name(&id);
        assert_eq!(parse_name(&name), Some(id));
        store.put(&name, bytes.clone().into()).unwrap();
        let table = read_table(&store, &key, &name, bytes.len() as u64).unwrap();
        assert_eq!(table, entries);
        for (e, c) in entries.iter().zip(&chunks) {
            let sealed = &bytes[e.offset as usize..(e.offset + e.length) as usize];
            assert_eq!(
                ChunkOpener::default().open(&key, e, sealed).unwrap(),
                &c[..]
            );
        }
        // The compressible chunk was stored compressed.
        assert!(entries[0].length < 1000);
    }

    #[test]
    fn a_spilled_pack_is_the_same_bytes_as_one_built_in_memory() {
        let key = MasterKey::generate();
        let mut sealer = Sealer::new(2);
        // Blobs below and above the spill piece, compressible and not.
        let chunks: Vec<Vec<u8>> = (0..40u32)
            .map(|k| {
                let len = [4096, 65536, 3 << 20, 777][k as usize % 4];
                (0..len as u32)
                    .map(|i| {
                        if k % 3 == 0 {
                            (i % 7) as u8
                        } else {
                            (i.wrapping_mul(2654435761) >> 13) as u8 ^ k as u8
                        }
                    })
                    .collect()
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let mut spilled = PackWriter::in_dir(64 << 20, dir.path().to_path_buf());
        let mut memory = PackWriter::new(IN_MEMORY_PACK);
        for c in &chunks {
            let sealed = sealer.seal_raw(&key, c);
            let id = key.chunk_id(c);
            spilled.add(id, c.len() as u32, &sealed).unwrap();
            // The same sealed bytes (nonces are random) in both.
            memory.add(id, c.len() as u32, &sealed).unwrap();
            assert_eq!(spilled.len(), memory.len());
        }
        assert!(spilled.len() > IN_MEMORY_PACK && !spilled.full());
        // An unnamed file: nothing is left in the directory, even now.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let a = spilled.finish(&key).unwrap();
        let b = memory.finish(&key).unwrap();
        assert!(matches!(a.body, PackBody::File { .. }));
        assert!(matches!(b.body, PackBody::Memory(_)));
        assert_eq!(a.entries, b.entries);
        // The tables are sealed with their own nonces: compare up to them.
        let (a_bytes, b_bytes) = (a.body.into_bytes().unwrap(), b.body.into_bytes().unwrap());
        assert_eq!(a_bytes.len(), b_bytes.len());
        let table_at = a
            .entries
            .last()
            .map(|e| (e.offset + e.length) as usize)
            .unwrap();
        assert_eq!(a_bytes[..table_at], b_bytes[..table_at]);
        assert_eq!(&a.id, blake3::hash(&a_bytes).as_bytes());
        let store = crate::store::Store::memory();
        let name = object_name(&a.id);
        store.put(&name, a_bytes.clone().into()).unwrap();
        assert_eq!(
            read_table(&store, &key, &name, a_bytes.len() as u64).unwrap(),
            a.entries
        );
        let mut opener = ChunkOpener::default();
        for (e, c) in a.entries.iter().zip(&chunks) {
            let sealed = &a_bytes[e.offset as usize..(e.offset + e.length) as usize];
            assert_eq!(opener.open(&key, e, sealed).unwrap(), &c[..]);
        }
    }

    #[test]
    fn a_pack_that_cannot_spill_is_built_in_memory() {
        let key = MasterKey::generate();
        let missing = std::path::PathBuf::from("/nonexistent/ferry-spill");
        let mut w = PackWriter::in_dir(32 << 20, missing);
        let blob = vec![1u8; 2 << 20];
        for _ in 0..3 {
            w.add(key.chunk_id(&blob), blob.len() as u32, &blob)
                .unwrap();
        }
        let p = w.finish(&key).unwrap();
        assert!(matches!(p.body, PackBody::Memory(_)));
        let bytes = p.body.into_bytes().unwrap();
        assert_eq!(&p.id, blake3::hash(&bytes).as_bytes());
        assert_eq!(p.entries[2].offset as usize, HEADER_LEN + 2 * blob.len());
    }

    #[test]
    fn a_compression_group_is_read_chunk_by_chunk_and_checked() {
        let key = MasterKey::generate();
        let mut sealer = Sealer::new(2);
        let chunks: Vec<Vec<u8>> = (0..4u32)
            .map(|k| (0..20000u32).map(|i| ((i / 7 + k) % 13) as u8).collect())
            .collect();
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let sealed = sealer.seal_group(&key, &refs, None).expect("compressible");
        // The same chunks lying one after the other in one buffer (as a full
        // backup's segment holds them) are compressed where they lie.
        let joined = chunks.concat();
        let sealed_joint = sealer
            .seal_group(&key, &refs, Some(&joined))
            .expect("compressible");
        let mut members = Vec::new();
        let mut at = 0u32;
        for c in &chunks {
            members.push((key.chunk_id(c), c.len() as u32, GROUPED | at));
            at += c.len() as u32;
        }
        let mut w = PackWriter::new(DEFAULT_PACK_SIZE);
        w.add(key.chunk_id(b"alone"), 5, &sealer.seal(&key, b"alone"))
            .unwrap();
        w.add_blob(&members, &sealed).unwrap();
        w.add_blob(&members, &sealed_joint).unwrap();
        let Sealed {
            id,
            body,
            mut entries,
        } = w.finish(&key).unwrap();
        let bytes = body.into_bytes().unwrap();
        let joint_entries = entries.split_off(5);
        let store = crate::store::Store::memory();
        let name = object_name(&id);
        store.put(&name, bytes.clone().into()).unwrap();
        let mut table = read_table(&store, &key, &name, bytes.len() as u64).unwrap();
        assert_eq!(table.split_off(5), joint_entries);
        assert_eq!(table, entries);
        let mut opener = ChunkOpener::default();
        let blob = |e: &BlobEntry| &bytes[e.offset as usize..(e.offset + e.length) as usize];
        for (e, c) in joint_entries.iter().zip(&chunks) {
            assert_eq!(opener.open(&key, e, blob(e)).unwrap(), &c[..]);
        }
        assert_eq!(
            opener.open(&key, &entries[0], blob(&entries[0])).unwrap(),
            b"alone"
        );
        for (e, c) in entries[1..].iter().zip(&chunks) {
            assert!(e.grouped());
            assert_eq!(opener.open(&key, e, blob(e)).unwrap(), &c[..]);
        }
        // Out of order, and with a fresh opener, the same bytes.
        assert_eq!(
            ChunkOpener::default()
                .open(&key, &entries[3], blob(&entries[3]))
                .unwrap(),
            &chunks[2][..]
        );
        // One group, stored once: 80 KB of plaintext in a few KB.
        assert!(entries[1].length < 8000, "{}", entries[1].length);
        // A member whose place lies outside the group, or whose id differs, fails.
        let mut bad = entries[4];
        bad.inner = GROUPED | 79_000;
        assert!(ChunkOpener::default().open(&key, &bad, blob(&bad)).is_err());
        let mut bad = entries[4];
        bad.id = entries[3].id;
        assert!(opener.open(&key, &bad, blob(&bad)).is_err());
        // Incompressible chunks are not grouped.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(
            sealer
                .seal_group(&key, &[&noise[..32768], &noise[32768..]], Some(&noise[..]))
                .is_none()
        );
    }

    #[test]
    fn a_version_1_pack_table_is_still_read() {
        let key = MasterKey::generate();
        let mut table = 1u32.to_le_bytes().to_vec();
        table.extend_from_slice(&[9u8; 32]);
        for v in [8u32, 100, 200] {
            table.extend_from_slice(&v.to_le_bytes());
        }
        let sealed = key.seal(&format::header_of(Kind::Pack, 1), &table);
        let entries = parse_table(&key, "p", &sealed, 1000).unwrap();
        assert_eq!(
            entries,
            vec![BlobEntry {
                id: ChunkId([9; 32]),
                offset: 8,
                length: 100,
                raw_len: 200,
                inner: 0
            }]
        );
    }

    proptest! {
        #[test]
        fn hostile_tables_and_blobs_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), raw_len in any::<u32>()) {
            // Sealed with the right key, so the decoders behind authentication see the bytes.
            let key = MasterKey::generate();
            let _ = parse_table(&key, "p", &bytes, 1 << 20);
            let _ = parse_table(&key, "p", &key.seal(&format::header(Kind::Pack), &bytes), 1 << 20);
            for inner in [0, GROUPED, GROUPED | raw_len] {
                let e = BlobEntry { id: ChunkId([0; 32]), offset: 8, length: bytes.len() as u32, raw_len, inner };
                let mut opener = ChunkOpener::default();
                let _ = opener.open(&key, &e, &bytes);
                let _ = opener.open(&key, &e, &key.seal(BLOB_AAD, &bytes));
            }
        }
    }
}
