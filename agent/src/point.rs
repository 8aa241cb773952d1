//! Recovery points and the chunk lists they are made of.
//!
//! ```text
//! struct PointObject {
//!     header: Envelope,                        // kind = Point (5)
//!     body:   Sealed<Zstd<PointBody>>,         // AAD = header
//! }
//! struct PointBody {
//!     meta_len: u32 LE, meta: [u8; meta_len],  // JSON, `Meta` below
//!     disks: [Lists; meta.disks.len()],
//! }
//! struct Lists { count: u32 LE, ids: [[u8; 32]; count] }  // ceil(size / LIST_SPAN) ids
//!
//! // A chunk list is stored like a chunk: a blob in a pack, found through the
//! // index, its id the keyed BLAKE3 of this body.
//! struct ListBody { count: u32 LE, [Extent; count] }
//! // An extent is a u32 LE word: bit 31 set = a run of (word & 0x7fff_ffff) zero
//! // bytes with nothing stored; clear = a chunk of `word` bytes (1..=4 MiB)
//! // followed by its 32-byte id.
//! ```
//! A disk is described span by span: list `i` covers bytes `i * LIST_SPAN` up to
//! the next span or the end of the disk. A span that did not change between two
//! points is the same list, stored once, and lists cost no objects of their own.
//! The disk digest is a keyed hash over the list ids, a Merkle root of the disk's
//! content. Points are named `points/<BLAKE3 of the object>` and never rewritten.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::chunker::{Chunker, MAX_CHUNK};
use crate::crypto::{ChunkId, MasterKey};
use crate::error::{Error, Result};
use crate::format::{self, Kind, Reader};

const ZERO_FLAG: u32 = 1 << 31;
/// A slice of a chunk: `len` bytes from `skip` into it (see docs/formats.md#extents).
const SLICE_FLAG: u32 = 1 << 30;
const MAX_ZERO_RUN: u64 = (ZERO_FLAG - 1) as u64;
/// The span of a disk one chunk list describes (16 read segments).
pub const LIST_SPAN: u64 = 64 << 20;
/// A decompressed point larger than this is damage: 64 MiB holds the list ids of
/// 128 TiB of disks (32 bytes per 64 MiB span) and the metadata. It bounds what
/// a point sealed with the password can make a reader allocate: a highly
/// compressible body of a few KiB may claim any size up to it.
pub const MAX_POINT_BODY: usize = 64 << 20;
/// The largest point object readers download (its body sealed and compressed).
pub const MAX_POINT_OBJECT: u64 = format::sealed_zstd_bound(MAX_POINT_BODY);
/// The largest chunk list body: 16 384 extents (a 64 MiB span of extents of at
/// least 4 KiB) of at most 40 bytes, plus the count (docs/formats.md#extents).
pub const MAX_LIST_BODY: usize = 4 + MAX_LIST_EXTENTS * 40;
/// The most extents a span's list holds when each is at least 4 KiB (a 64 MiB
/// span); what readers enforce is [`MAX_LIST_BODY`].
pub const MAX_LIST_EXTENTS: usize = 16_384;

/// A chunk list is stored as a chunk and named by the same keyed hash.
pub type ListId = ChunkId;

/// How consistent the disks' content is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// As after a power cut: a point-in-time image of every disk.
    Crash,
    /// Applications were quiesced before the snapshot.
    App,
    /// Read while it was being written, without a snapshot: may be torn.
    Fuzzy,
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Consistency::Crash => "crash",
            Consistency::App => "app",
            Consistency::Fuzzy => "fuzzy",
        })
    }
}

/// One run of a disk: a stored chunk (or `len` bytes of it from `skip`), or zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub id: Option<ChunkId>,
    /// Where the run starts inside the chunk; 0 for whole chunks and zero runs.
    /// Incrementals through a change map splice small changed pieces into the
    /// parent's list, which cuts the chunks around them into slices.
    pub skip: u32,
}

impl Extent {
    pub fn chunk(len: u32, id: ChunkId) -> Self {
        Extent {
            len,
            id: Some(id),
            skip: 0,
        }
    }
    pub fn zeros(len: u32) -> Self {
        Extent {
            len,
            id: None,
            skip: 0,
        }
    }
    /// The bytes `[from, from + len)` of this extent, as an extent.
    pub fn slice(&self, from: u32, len: u32) -> Self {
        debug_assert!(from + len <= self.len);
        Extent {
            len,
            id: self.id,
            skip: if self.id.is_some() {
                self.skip + from
            } else {
                0
            },
        }
    }
}

/// What a point records about one disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskMeta {
    /// The disk's name inside the point (the source file's name by default).
    pub name: String,
    /// Where it was read from.
    pub path: String,
    pub size: u64,
    /// Keyed BLAKE3 over the disk's size and its chunk lists' ids (a Merkle root).
    pub digest: String,
    /// Bytes that held data (not zero).
    pub data_bytes: u64,
    /// The change tracker this point's incremental read through (e.g.
    /// `qemu:dirty-bitmap:gen3`); absent when the whole disk was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<String>,
    /// What records the writes made after this point's instant (e.g. the dirty
    /// bitmap a live-VM cycle started with it), so the next cycle can check its
    /// change map continues this point's chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<String>,
}

/// The JSON part of a point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub source: String,
    pub time: DateTime<Utc>,
    pub parent: Option<String>,
    pub consistency: Consistency,
    pub tool_version: String,
    pub host: String,
    pub chunker: Chunker,
    pub disks: Vec<DiskMeta>,
    /// The coordinated cut across machines this point was taken in, if its
    /// agent belongs to a consistency group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupCut>,
}

/// One coordinated cut of a consistency group: every member's agent held its
/// machine's writes (dm-era devices suspended, or its `pre_cut` hook's freeze)
/// until the server saw all of them held, and only then cut. No member can
/// have written anything that depends on a write another member's point
/// lacks, so the members' points restore to one moment, as a database and
/// its application need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupCut {
    /// The group's name (the agents' policy `group`).
    pub name: String,
    /// This cut's id, the same in every member's point.
    pub round: String,
    /// The sources the server expected: every agent of the group that was
    /// not revoked or silent when the round opened.
    pub members: Vec<String>,
    /// The sources that held their writes in time; a member missing from
    /// here cut later, alone.
    pub arrived: Vec<String>,
    /// Between the first and the last arrival, as the server's clock saw
    /// them: how long the first member's writes were held for the others.
    pub skew_ms: f64,
}

impl GroupCut {
    /// Every member held its writes in time.
    pub fn complete(&self) -> bool {
        self.members.iter().all(|m| self.arrived.contains(m))
    }
}

/// A decoded recovery point: its metadata and, per disk, its chunk lists.
#[derive(Debug, Clone)]
pub struct Point {
    pub id: String,
    pub meta: Meta,
    pub lists: Vec<Vec<ListId>>,
}

/// Why `name` cannot be a disk's name, if it cannot: a restore writes each disk
/// to `DIR/NAME`, so a name must be one plain path component.
pub fn disk_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name == "." || name == ".." {
        Some("is a directory reference")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name.contains('\0') {
        Some("contains a NUL byte")
    } else {
        None
    }
}

impl Meta {
    /// The rules every point must follow beyond its encoding, in one place:
    /// decoding applies them, so `check`, `restore`, `serve-nbd` and every other
    /// reader agree on which points are valid, and backup applies them before it
    /// writes one. Disk names are plain file names, each used once.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for d in &self.disks {
            if let Some(why) = disk_name_problem(&d.name) {
                return Err(format!("disk name {:?} {why}", d.name));
            }
            if !seen.insert(d.name.as_str()) {
                return Err(format!("two disks are named {:?}", d.name));
            }
        }
        Ok(())
    }
}

impl Point {
    pub fn short_id(&self) -> &str {
        &self.id[..8.min(self.id.len())]
    }
}

/// The byte range of a disk that list `i` describes.
pub fn list_span(size: u64, i: usize) -> (u64, u64) {
    let start = i as u64 * LIST_SPAN;
    (start, (size - start.min(size)).min(LIST_SPAN))
}

/// How many lists describe a disk of `size` bytes.
pub fn list_count(size: u64) -> u64 {
    size.div_ceil(LIST_SPAN)
}

/// Append an extent, merging zero runs.
pub fn push_extent(list: &mut Vec<Extent>, e: Extent) {
    if e.id.is_none()
        && let Some(last) = list.last_mut()
        && last.id.is_none()
        && last.len as u64 + e.len as u64 <= MAX_ZERO_RUN
    {
        last.len += e.len;
        return;
    }
    list.push(e);
}

/// The content digest of a disk: a keyed hash over its size and its lists' ids.
/// Each list id is itself a keyed hash of the list, so this is a Merkle root.
pub fn disk_digest(key: &MasterKey, size: u64, lists: &[ListId]) -> String {
    let mut h = key.keyed_hasher("ferry disk digest v1");
    h.update(&size.to_le_bytes());
    for l in lists {
        h.update(&l.0);
    }
    h.finalize().to_hex().to_string()
}

/// Encode a chunk list's body (stored as a chunk whose id is its keyed hash).
pub fn encode_list(extents: &[Extent]) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + extents.len() * 36);
    body.extend_from_slice(&(extents.len() as u32).to_le_bytes());
    encode_extents(extents, &mut body);
    body
}

fn encode_extents(extents: &[Extent], body: &mut Vec<u8>) {
    for e in extents {
        match e.id {
            Some(id) if e.skip == 0 => {
                body.extend_from_slice(&e.len.to_le_bytes());
                body.extend_from_slice(&id.0);
            }
            Some(id) => {
                body.extend_from_slice(&(e.len | SLICE_FLAG).to_le_bytes());
                body.extend_from_slice(&id.0);
                body.extend_from_slice(&e.skip.to_le_bytes());
            }
            None => body.extend_from_slice(&(e.len | ZERO_FLAG).to_le_bytes()),
        }
    }
}

/// The length of [`encode_list`]'s body for these extents.
pub fn list_body_len(extents: &[Extent]) -> usize {
    4 + extents
        .iter()
        .map(|e| match e.id {
            Some(_) if e.skip == 0 => 36,
            Some(_) => 40,
            None => 4,
        })
        .sum::<usize>()
}

/// The first word of a delta list's body, where a full list has its extent
/// count (never this large: a count is bounded by the body's length).
const DELTA_MARK: u32 = u32::MAX;

/// The longest chain of delta lists: a reader loads at most this many lists
/// and one full list for a span.
pub const MAX_DELTA_DEPTH: u32 = 32;

/// A change of a span against another list of it: the bytes `[start, end)`
/// of the span (from its first byte) are `extents`.
pub type Patch = (u64, u64, Vec<Extent>);

/// A decoded chunk list body: the extents of its span, or a delta against
/// the list `base` of the same span, `depth` deltas above a full list (see
/// docs/formats.md#delta-lists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListBody {
    Full(Vec<Extent>),
    Delta {
        base: ListId,
        depth: u32,
        patches: Vec<Patch>,
    },
}

/// Encode a delta list: `base` (itself `depth - 1` deltas above a full list)
/// with `patches` (sorted, apart).
pub fn encode_delta(base: &ListId, depth: u32, patches: &[Patch]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&DELTA_MARK.to_le_bytes());
    body.extend_from_slice(&depth.to_le_bytes());
    body.extend_from_slice(&base.0);
    body.extend_from_slice(&(patches.len() as u32).to_le_bytes());
    for (start, end, extents) in patches {
        body.extend_from_slice(&(*start as u32).to_le_bytes());
        body.extend_from_slice(&(*end as u32).to_le_bytes());
        body.extend_from_slice(&(extents.len() as u32).to_le_bytes());
        encode_extents(extents, &mut body);
    }
    body
}

/// The patches that make `new` out of `base` (both extents of one span):
/// each range where they differ, with `new`'s extents there.
pub fn delta_patches(base: &[Extent], new: &[Extent]) -> Vec<Patch> {
    let mut cur = Cursor::new(new);
    let mut at = 0;
    let mut out = Vec::new();
    for (a, b) in differing_ranges(0, base, new) {
        cur.skip(a - at);
        let mut extents = Vec::new();
        cur.take(b - a, &mut extents);
        out.push((a, b, extents));
        at = b;
    }
    out
}

/// Decode a chunk list body of either form; a full list must describe
/// exactly `span` bytes, and a delta's patches must lie inside it.
pub fn decode_list(name: &str, body: &[u8], span: u64) -> Result<ListBody> {
    if body.len() >= 4 && body[..4] == DELTA_MARK.to_le_bytes() {
        return decode_delta(name, body, span);
    }
    decode_list_body(name, body, span).map(ListBody::Full)
}

fn decode_delta(name: &str, body: &[u8], span: u64) -> Result<ListBody> {
    let bad = |what: String| Error::corrupt(name, what);
    if body.len() > MAX_LIST_BODY {
        return Err(bad(format!(
            "its body is {} bytes, more than the {MAX_LIST_BODY} a chunk list can hold",
            body.len()
        )));
    }
    let mut r = Reader::new(&body[4..]);
    let depth = r.u32().ok_or_else(|| bad("short delta list".into()))?;
    if !(1..=MAX_DELTA_DEPTH).contains(&depth) {
        return Err(bad(format!(
            "a delta list of depth {depth}, not 1 to {MAX_DELTA_DEPTH}"
        )));
    }
    let base = ChunkId(r.array32().ok_or_else(|| bad("short delta list".into()))?);
    // A patch is at least its start, end and count.
    let count = r
        .count(12)
        .ok_or_else(|| bad("patch count out of bounds".into()))?;
    let mut patches = Vec::with_capacity(count);
    let mut prev_end = 0u64;
    for _ in 0..count {
        let (start, end) = match (r.u32(), r.u32()) {
            (Some(s), Some(e)) => (u64::from(s), u64::from(e)),
            _ => return Err(bad("short patch".into())),
        };
        if start < prev_end || start >= end || end > span {
            return Err(bad(format!(
                "a patch of [{start}, {end}) is out of order, empty or past the span's {span} bytes"
            )));
        }
        let n = r
            .count(4)
            .ok_or_else(|| bad("extent count out of bounds".into()))?;
        let (extents, total) = read_extents(&mut r, n, &bad)?;
        if total != end - start {
            return Err(bad(format!(
                "a patch's extents add up to {total} bytes, not its {}",
                end - start
            )));
        }
        patches.push((start, end, extents));
        prev_end = end;
    }
    if r.remaining() != 0 {
        return Err(bad("trailing bytes".into()));
    }
    Ok(ListBody::Delta {
        base,
        depth,
        patches,
    })
}

/// Walks a list of extents, handing out the next bytes as (sliced) extents.
pub(crate) struct Cursor<'a> {
    list: &'a [Extent],
    i: usize,
    within: u32,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(list: &'a [Extent]) -> Self {
        Cursor {
            list,
            i: 0,
            within: 0,
        }
    }

    /// The next `n` bytes; fewer only if the list ends.
    pub(crate) fn take(&mut self, mut n: u64, out: &mut Vec<Extent>) {
        while n > 0 && self.i < self.list.len() {
            let e = self.list[self.i];
            let here = ((e.len - self.within) as u64).min(n) as u32;
            push_extent(out, e.slice(self.within, here));
            self.advance(here);
            n -= here as u64;
        }
    }

    pub(crate) fn skip(&mut self, mut n: u64) {
        while n > 0 && self.i < self.list.len() {
            let here = ((self.list[self.i].len - self.within) as u64).min(n) as u32;
            self.advance(here);
            n -= here as u64;
        }
    }

    fn advance(&mut self, by: u32) {
        self.within += by;
        if self.within == self.list[self.i].len {
            self.i += 1;
            self.within = 0;
        }
    }
}

/// `base` with the ranges `[start, end)` of `patches` (sorted, apart) replaced
/// by their extents: a delta list applied, or a segment's changes spliced in.
pub fn apply_patches(base: &[Extent], patches: Vec<Patch>) -> Vec<Extent> {
    let total: u64 = base.iter().map(|e| e.len as u64).sum();
    let mut cur = Cursor::new(base);
    let mut out = Vec::with_capacity(base.len() + patches.len() * 3);
    let mut pos = 0u64;
    for (a, b, exts) in patches {
        cur.take(a - pos, &mut out);
        cur.skip(b - a);
        for e in exts {
            push_extent(&mut out, e);
        }
        pos = b;
    }
    cur.take(total - pos, &mut out);
    out
}

/// Decode a chunk list's body, which must describe exactly `span` bytes.
pub fn decode_list_body(name: &str, body: &[u8], span: u64) -> Result<Vec<Extent>> {
    let bad = |what: String| Error::corrupt(name, what);
    if body.len() > MAX_LIST_BODY {
        return Err(bad(format!(
            "its body is {} bytes, more than the {MAX_LIST_BODY} a chunk list can hold",
            body.len()
        )));
    }
    let mut r = Reader::new(body);
    let count = r
        .count(4)
        .ok_or_else(|| bad("extent count out of bounds".into()))?;
    let (list, total) = read_extents(&mut r, count, &bad)?;
    if total != span {
        return Err(bad(format!(
            "extents add up to {total} bytes, not the span's {span}"
        )));
    }
    if r.remaining() != 0 {
        return Err(bad("trailing bytes".into()));
    }
    Ok(list)
}

/// `count` extents, and the bytes they add up to.
fn read_extents(
    r: &mut Reader<'_>,
    count: usize,
    bad: &dyn Fn(String) -> Error,
) -> Result<(Vec<Extent>, u64)> {
    let mut list = Vec::with_capacity(count);
    let mut total = 0u64;
    for _ in 0..count {
        let word = r.u32().ok_or_else(|| bad("short extent".into()))?;
        let e = if word & ZERO_FLAG != 0 {
            Extent::zeros(word & !ZERO_FLAG)
        } else {
            let len = word & !SLICE_FLAG;
            let id = r.array32().ok_or_else(|| bad("short extent".into()))?;
            if len == 0 || len as usize > MAX_CHUNK {
                return Err(bad(format!("chunk length {len} out of bounds")));
            }
            let skip = if word & SLICE_FLAG != 0 {
                let skip = r.u32().ok_or_else(|| bad("short extent".into()))?;
                if skip as u64 + len as u64 > MAX_CHUNK as u64 {
                    return Err(bad(format!(
                        "a slice of {len} bytes from {skip} lies past the largest chunk"
                    )));
                }
                skip
            } else {
                0
            };
            Extent {
                len,
                id: Some(ChunkId(id)),
                skip,
            }
        };
        total += e.len as u64;
        list.push(e);
    }
    Ok((list, total))
}

fn seal_object(key: &MasterKey, kind: Kind, body: &[u8]) -> Vec<u8> {
    let compressed = zstd::bulk::compress(body, 3).expect("zstd compresses to memory");
    let header = format::header(kind);
    let mut out = header.to_vec();
    key.seal_into(&header, &compressed, &mut out);
    out
}

fn open_object(
    key: &MasterKey,
    name: &str,
    kind: Kind,
    bytes: &[u8],
    limit: usize,
) -> Result<Vec<u8>> {
    let sealed = format::split(name, kind, bytes)?;
    let compressed = key
        .open(format::aad(bytes), sealed)
        .ok_or_else(|| Error::corrupt(name, "fails authentication"))?;
    format::decompress_bounded(&compressed, limit).ok_or_else(|| {
        Error::corrupt(
            name,
            format!(
                "cannot be decompressed into at most {limit} bytes, the most a {} holds",
                kind.name()
            ),
        )
    })
}

/// Encode a point; returns its id and the object bytes.
pub fn encode(key: &MasterKey, meta: &Meta, lists: &[Vec<ListId>]) -> (String, Vec<u8>) {
    let json = serde_json::to_vec(meta).expect("point metadata serialises");
    let mut body = Vec::with_capacity(json.len() + 64);
    body.extend_from_slice(&(json.len() as u32).to_le_bytes());
    body.extend_from_slice(&json);
    for ids in lists {
        body.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        for id in ids {
            body.extend_from_slice(&id.0);
        }
    }
    let out = seal_object(key, Kind::Point, &body);
    let id = blake3::hash(&out).to_hex().to_string();
    (id, out)
}

pub fn object_name(id: &str) -> String {
    format!("points/{id}")
}

/// Decode a point object.
pub fn decode(key: &MasterKey, id: &str, bytes: &[u8]) -> Result<Point> {
    let name = object_name(id);
    let body = open_object(key, &name, Kind::Point, bytes, MAX_POINT_BODY)?;
    let (meta, lists) = decode_body(&name, &body)?;
    Ok(Point {
        id: id.to_string(),
        meta,
        lists,
    })
}

fn decode_body(name: &str, body: &[u8]) -> Result<(Meta, Vec<Vec<ListId>>)> {
    let bad = |what: String| Error::corrupt(name, what);
    let mut r = Reader::new(body);
    let json_len = r.u32().ok_or_else(|| bad("short header".into()))? as usize;
    let json = r
        .bytes(json_len)
        .ok_or_else(|| bad("metadata length out of bounds".into()))?;
    let meta: Meta = serde_json::from_slice(json).map_err(|e| bad(format!("metadata: {e}")))?;
    meta.validate()
        .map_err(|e| bad(format!("{e}; this point cannot be restored as it is")))?;
    let mut lists = Vec::with_capacity(meta.disks.len().min(1024));
    for disk in &meta.disks {
        let count = r
            .count(32)
            .ok_or_else(|| bad("list count out of bounds".into()))?;
        if count as u64 != list_count(disk.size) {
            return Err(bad(format!(
                "disk {} of {} bytes has {count} chunk lists, not {}",
                disk.name,
                disk.size,
                list_count(disk.size)
            )));
        }
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(ChunkId(
                r.array32().ok_or_else(|| bad("short list id".into()))?,
            ));
        }
        lists.push(ids);
    }
    if r.remaining() != 0 {
        return Err(bad("trailing bytes".into()));
    }
    Ok((meta, lists))
}

/// Where the extents of two versions of a disk differ: sorted `[start, end)`
/// ranges. Extents are equal when they name the same chunk (or both are
/// zeros) from the same place in it.
pub fn differing_ranges(base: u64, old: &[Extent], new: &[Extent]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    // Where each current extent starts, and how far into it we are.
    let (mut oi, mut nj) = (0u64, 0u64);
    let mut at = base;
    while i < old.len() && j < new.len() {
        let (a, b) = (&old[i], &new[j]);
        let left_a = u64::from(a.len) - oi;
        let left_b = u64::from(b.len) - nj;
        let n = left_a.min(left_b);
        let same =
            a.id == b.id && (a.id.is_none() || u64::from(a.skip) + oi == u64::from(b.skip) + nj);
        // An extent of 0 bytes (readers accept empty zero runs) differs in nothing.
        if !same && n > 0 {
            match out.last_mut() {
                Some(last) if last.1 == at => last.1 = at + n,
                _ => out.push((at, at + n)),
            }
        }
        at += n;
        oi += n;
        nj += n;
        if oi == u64::from(a.len) {
            i += 1;
            oi = 0;
        }
        if nj == u64::from(b.len) {
            j += 1;
            nj = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(size: u64) -> Meta {
        Meta {
            source: "web".into(),
            time: Utc::now(),
            parent: None,
            consistency: Consistency::Crash,
            tool_version: "test".into(),
            host: "h".into(),
            chunker: Chunker::default(),
            disks: vec![DiskMeta {
                name: "d".into(),
                path: "/d".into(),
                size,
                digest: String::new(),
                data_bytes: 0,
                changes: None,
                tracking: None,
            }],
            group: None,
        }
    }

    #[test]
    fn round_trip_and_zero_runs_merge() {
        let key = MasterKey::generate();
        let mut ext = Vec::new();
        push_extent(&mut ext, Extent::chunk(100, ChunkId([1; 32])));
        push_extent(&mut ext, Extent::zeros(4096));
        push_extent(&mut ext, Extent::zeros(4096));
        push_extent(&mut ext, Extent::chunk(50, ChunkId([2; 32])).slice(0, 20));
        push_extent(&mut ext, Extent::chunk(50, ChunkId([2; 32])).slice(20, 30));
        let size = 100 + 8192 + 50;
        assert_eq!(ext.len(), 4, "zero runs merge, slices do not");
        assert_eq!(ext[3].skip, 20);
        let body = encode_list(&ext);
        assert_eq!(decode_list_body("l", &body, size).unwrap(), ext);
        assert!(decode_list_body("l", &body, size + 1).is_err());
        let lid = key.chunk_id(&body);
        let (id, obj) = encode(&key, &meta(size), &[vec![lid]]);
        let p = decode(&key, &id, &obj).unwrap();
        assert_eq!(p.lists, vec![vec![lid]]);
        // The number of lists must fit the disk's size.
        let (id, obj) = encode(&key, &meta(LIST_SPAN + 1), &[vec![lid]]);
        assert!(decode(&key, &id, &obj).is_err());
    }

    #[test]
    fn a_list_larger_than_a_span_can_need_is_refused() {
        // 170 000 empty zero runs and one real one: adds up to the span, but no
        // backup writes more than 16 384 extents for one span.
        let mut ext = vec![Extent::zeros(0); 170_000];
        ext.push(Extent::zeros(4096));
        let body = encode_list(&ext);
        assert!(body.len() > MAX_LIST_BODY);
        let err = decode_list_body("chunk list ab", &body, 4096).unwrap_err();
        assert!(err.to_string().contains("chunk list ab"), "{err}");
        assert!(err.to_string().contains("more than"), "{err}");
    }

    #[test]
    fn identical_spans_share_a_list_and_the_digest_follows_content() {
        let key = MasterKey::generate();
        let a = vec![Extent::zeros(8192), Extent::chunk(10, ChunkId([1; 32]))];
        let b = vec![Extent::chunk(10, ChunkId([1; 32])), Extent::zeros(8192)];
        let id = |e: &[Extent]| key.chunk_id(&encode_list(e));
        assert_eq!(id(&a), id(&a.clone()));
        let (la, lb) = (id(&a), id(&b));
        assert_ne!(la, lb);
        assert_ne!(
            disk_digest(&key, 8202, &[la]),
            disk_digest(&key, 8202, &[lb])
        );
        assert_ne!(
            disk_digest(&key, 8202, &[la]),
            disk_digest(&key, 8203, &[la])
        );
    }

    proptest! {
        #[test]
        fn hostile_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), span in 0u64..1 << 24) {
            let _ = decode_body("p", &bytes);
            let mut framed = (bytes.len() as u32).to_le_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            let _ = decode_body("p", &framed);
            let _ = decode_list_body("l", &bytes, span);
            let _ = decode_list("l", &bytes, span);
            // The same bytes behind a delta list's mark and a valid depth.
            let mut delta = DELTA_MARK.to_le_bytes().to_vec();
            delta.extend_from_slice(&1u32.to_le_bytes());
            delta.extend_from_slice(&bytes);
            let _ = decode_list("l", &delta, span);
        }

        #[test]
        fn a_delta_list_applied_to_its_base_gives_the_new_list(
            cuts in proptest::collection::vec((0u64..256, 1u64..4, any::<bool>()), 0..40),
        ) {
            // A span of 256 blocks of 4 KiB in 16 KiB chunks; `cuts` overwrite
            // runs of blocks with new pieces or zeros.
            let span = 256 * 4096u64;
            let id = |n: u64| ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes());
            let base: Vec<Extent> = (0..64).map(|i| Extent::chunk(16384, id(i))).collect();
            let mut patches: Vec<Patch> = Vec::new();
            let mut blocks: Vec<(u64, u64, bool)> = cuts
                .into_iter()
                .map(|(b, n, z)| (b * 4096, ((b + n) * 4096).min(span), z))
                .collect();
            blocks.sort();
            let mut end = 0;
            for (a, b, z) in blocks {
                if a < end || a >= b {
                    continue;
                }
                let e = if z { Extent::zeros((b - a) as u32) } else { Extent::chunk((b - a) as u32, id(1000 + a)) };
                patches.push((a, b, vec![e]));
                end = b;
            }
            let new = apply_patches(&base, patches);
            let found = delta_patches(&base, &new);
            let body = encode_delta(&id(7), 3, &found);
            let ListBody::Delta { base: b, depth, patches } = decode_list("l", &body, span).unwrap() else {
                panic!("not decoded as a delta");
            };
            prop_assert_eq!((b, depth), (id(7), 3));
            prop_assert_eq!(apply_patches(&base, patches), new);
        }
    }

    #[test]
    fn malformed_delta_lists_are_refused() {
        let span = 1 << 20;
        let id = ChunkId([5; 32]);
        let piece = |n: u32| vec![Extent::chunk(n, id)];
        let body = |depth: u32, patches: &[Patch]| {
            let mut b = encode_delta(&id, 1, patches);
            b[4..8].copy_from_slice(&depth.to_le_bytes());
            b
        };
        for (what, bytes) in [
            ("depth", body(0, &[])),
            ("depth", body(MAX_DELTA_DEPTH + 1, &[])),
            (
                "out of order",
                body(1, &[(8192, 12288, piece(4096)), (4096, 8192, piece(4096))]),
            ),
            (
                "out of order",
                body(1, &[(0, 8192, piece(8192)), (4096, 12288, piece(8192))]),
            ),
            (
                "past the span",
                body(1, &[(span - 4096, span + 4096, piece(8192))]),
            ),
            ("add up", body(1, &[(0, 8192, piece(4096))])),
        ] {
            let e = decode_list("chunk list ab", &bytes, span)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(what) && e.contains("chunk list ab"),
                "{what}: {e}"
            );
        }
        let mut trailing = body(1, &[(0, 4096, piece(4096))]);
        trailing.push(0);
        assert!(decode_list("l", &trailing, span).is_err());
    }
}
