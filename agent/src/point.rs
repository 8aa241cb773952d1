//! Recovery points: the manifest of every disk of a source at one moment.
//!
//! ```text
//! struct PointObject {
//!     header: Envelope,                        // kind = Point (5)
//!     body:   Sealed<Zstd<PointBody>>,         // AAD = header
//! }
//! struct PointBody {
//!     meta_len: u32 LE, meta: [u8; meta_len],  // JSON, `Meta` below
//!     disks: [Extents; meta.disks.len()],
//! }
//! struct Extents { count: u64 LE, [Extent; count] }
//! // An extent is a u32 LE word: bit 31 set = a run of (word & 0x7fff_ffff) zero
//! // bytes with nothing stored; clear = a chunk of `word` bytes (1..=4 MiB)
//! // followed by its 32-byte id.
//! ```
//! The extents of a disk add up to its size. A point is named `points/<BLAKE3 of
//! the object>` and never rewritten.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::chunker::{Chunker, MAX_CHUNK};
use crate::crypto::{ChunkId, MasterKey};
use crate::error::{Error, Result};
use crate::format::{self, Kind, Reader};

const ZERO_FLAG: u32 = 1 << 31;
const MAX_ZERO_RUN: u64 = (ZERO_FLAG - 1) as u64;
/// A decompressed point larger than this is damage (about 30 TiB of 64 KiB chunks).
const MAX_POINT_BODY: usize = 1 << 34;

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

/// One run of a disk: a stored chunk, or zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub id: Option<ChunkId>,
}

/// What a point records about one disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskMeta {
    /// The disk's name inside the point (the source file's name by default).
    pub name: String,
    /// Where it was read from.
    pub path: String,
    pub size: u64,
    /// Keyed BLAKE3 over the disk's size and its non-zero chunks by offset.
    pub digest: String,
    /// Bytes that held data (not zero).
    pub data_bytes: u64,
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
}

/// A decoded recovery point.
#[derive(Debug, Clone)]
pub struct Point {
    pub id: String,
    pub meta: Meta,
    pub extents: Vec<Vec<Extent>>,
}

impl Point {
    pub fn short_id(&self) -> &str {
        &self.id[..8.min(self.id.len())]
    }

    /// Every chunk the point needs, with its disk and offset.
    pub fn chunks(&self) -> impl Iterator<Item = (usize, u64, u32, ChunkId)> + '_ {
        self.extents.iter().enumerate().flat_map(|(d, ext)| {
            let mut off = 0u64;
            ext.iter().filter_map(move |e| {
                let at = off;
                off += e.len as u64;
                e.id.map(|id| (d, at, e.len, id))
            })
        })
    }
}

/// Append an extent, merging zero runs.
pub fn push_extent(list: &mut Vec<Extent>, len: u32, id: Option<ChunkId>) {
    if id.is_none()
        && let Some(last) = list.last_mut()
        && last.id.is_none()
        && last.len as u64 + len as u64 <= MAX_ZERO_RUN
    {
        last.len += len;
        return;
    }
    list.push(Extent { len, id });
}

/// The content digest of a disk: independent of how zeros were split into runs.
pub fn disk_digest(key: &MasterKey, size: u64, extents: &[Extent]) -> String {
    let mut h = key.keyed_hasher("ferry disk digest v1");
    h.update(&size.to_le_bytes());
    let mut off = 0u64;
    for e in extents {
        if let Some(id) = e.id {
            h.update(&off.to_le_bytes());
            h.update(&(e.len as u64).to_le_bytes());
            h.update(&id.0);
        }
        off += e.len as u64;
    }
    h.finalize().to_hex().to_string()
}

/// Encode a point; returns its id and the object bytes.
pub fn encode(key: &MasterKey, meta: &Meta, extents: &[Vec<Extent>]) -> (String, Vec<u8>) {
    let json = serde_json::to_vec(meta).expect("point metadata serialises");
    let mut body = Vec::with_capacity(json.len() + 64);
    body.extend_from_slice(&(json.len() as u32).to_le_bytes());
    body.extend_from_slice(&json);
    for list in extents {
        body.extend_from_slice(&(list.len() as u64).to_le_bytes());
        for e in list {
            match e.id {
                Some(id) => {
                    body.extend_from_slice(&e.len.to_le_bytes());
                    body.extend_from_slice(&id.0);
                }
                None => body.extend_from_slice(&(e.len | ZERO_FLAG).to_le_bytes()),
            }
        }
    }
    let compressed = zstd::bulk::compress(&body, 3).expect("zstd compresses to memory");
    let header = format::header(Kind::Point);
    let mut out = header.to_vec();
    key.seal_into(&header, &compressed, &mut out);
    let id = blake3::hash(&out).to_hex().to_string();
    (id, out)
}

pub fn object_name(id: &str) -> String {
    format!("points/{id}")
}

/// Decode a point object.
pub fn decode(key: &MasterKey, id: &str, bytes: &[u8]) -> Result<Point> {
    let name = object_name(id);
    let sealed = format::split(&name, Kind::Point, bytes)?;
    let compressed = key
        .open(&format::header(Kind::Point), sealed)
        .ok_or_else(|| Error::corrupt(&name, "fails authentication"))?;
    let body = format::decompress_bounded(&compressed, MAX_POINT_BODY)
        .ok_or_else(|| Error::corrupt(&name, "cannot be decompressed"))?;
    let (meta, extents) = decode_body(&name, &body)?;
    Ok(Point {
        id: id.to_string(),
        meta,
        extents,
    })
}

fn decode_body(name: &str, body: &[u8]) -> Result<(Meta, Vec<Vec<Extent>>)> {
    let bad = |what: String| Error::corrupt(name, what);
    let mut r = Reader::new(body);
    let json_len = r.u32().ok_or_else(|| bad("short header".into()))? as usize;
    let json = r
        .bytes(json_len)
        .ok_or_else(|| bad("metadata length out of bounds".into()))?;
    let meta: Meta = serde_json::from_slice(json).map_err(|e| bad(format!("metadata: {e}")))?;
    let mut extents = Vec::with_capacity(meta.disks.len().min(1024));
    for disk in &meta.disks {
        let count = r.u64().ok_or_else(|| bad("short extent list".into()))?;
        if count > (r.remaining() / 4) as u64 {
            return Err(bad("extent count out of bounds".into()));
        }
        let mut list = Vec::with_capacity(count as usize);
        let mut total = 0u64;
        for _ in 0..count {
            let word = r.u32().ok_or_else(|| bad("short extent".into()))?;
            let e = if word & ZERO_FLAG != 0 {
                Extent {
                    len: word & !ZERO_FLAG,
                    id: None,
                }
            } else {
                let id = r.array32().ok_or_else(|| bad("short extent".into()))?;
                if word == 0 || word as usize > MAX_CHUNK {
                    return Err(bad(format!("chunk length {word} out of bounds")));
                }
                Extent {
                    len: word,
                    id: Some(ChunkId(id)),
                }
            };
            total += e.len as u64;
            list.push(e);
        }
        if total != disk.size {
            return Err(bad(format!(
                "disk {} extents add up to {total} bytes, not its size {}",
                disk.name, disk.size
            )));
        }
        extents.push(list);
    }
    if r.remaining() != 0 {
        return Err(bad("trailing bytes".into()));
    }
    Ok((meta, extents))
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
            }],
        }
    }

    #[test]
    fn round_trip_and_zero_runs_merge() {
        let key = MasterKey::generate();
        let mut ext = Vec::new();
        push_extent(&mut ext, 100, Some(ChunkId([1; 32])));
        push_extent(&mut ext, 4096, None);
        push_extent(&mut ext, 4096, None);
        push_extent(&mut ext, 50, Some(ChunkId([2; 32])));
        assert_eq!(ext.len(), 3);
        let (id, obj) = encode(&key, &meta(100 + 8192 + 50), std::slice::from_ref(&ext));
        let p = decode(&key, &id, &obj).unwrap();
        assert_eq!(p.extents[0], ext);
        let chunks: Vec<_> = p.chunks().map(|(_, off, len, _)| (off, len)).collect();
        assert_eq!(chunks, vec![(0, 100), (8292, 50)]);
    }

    #[test]
    fn digest_ignores_how_zeros_are_split() {
        let key = MasterKey::generate();
        let a = vec![
            Extent {
                len: 8192,
                id: None,
            },
            Extent {
                len: 10,
                id: Some(ChunkId([1; 32])),
            },
        ];
        let b = vec![
            Extent {
                len: 4096,
                id: None,
            },
            Extent {
                len: 4096,
                id: None,
            },
            Extent {
                len: 10,
                id: Some(ChunkId([1; 32])),
            },
        ];
        assert_eq!(disk_digest(&key, 8202, &a), disk_digest(&key, 8202, &b));
        let c = vec![
            Extent {
                len: 10,
                id: Some(ChunkId([1; 32])),
            },
            Extent {
                len: 8192,
                id: None,
            },
        ];
        assert_ne!(disk_digest(&key, 8202, &a), disk_digest(&key, 8202, &c));
    }

    proptest! {
        #[test]
        fn hostile_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_body("p", &bytes);
            let mut framed = (bytes.len() as u32).to_le_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            let _ = decode_body("p", &framed);
        }
    }
}
