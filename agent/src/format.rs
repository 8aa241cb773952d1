//! The envelope every stored object starts with, and bounded binary decoding.
//!
//! ```text
//! struct Envelope {
//!     magic:    [u8; 4] = b"FERY",
//!     kind:     u8,        // Kind below
//!     version:  u8,        // FORMAT_VERSION
//!     reserved: [u8; 2] = [0, 0],
//!     body:     [u8],      // per kind, see docs/formats.md
//! }
//! ```
//! The magic and the meaning of `kind` and `version` never change, so that every
//! future Ferry can tell which object it holds and which version wrote it.

use crate::error::{Error, Result};

pub const MAGIC: [u8; 4] = *b"FERY";
/// The version new objects are written with. Version 2 added compression groups
/// (several chunks compressed together, docs/formats.md#compression-groups) to
/// pack tables and index objects; every other body is as in version 1.
pub const FORMAT_VERSION: u8 = 2;
/// The oldest version this build reads.
pub const OLDEST_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;

/// What an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Config = 1,
    Key = 2,
    Pack = 3,
    Index = 4,
    Point = 5,
    Lock = 6,
    Trash = 7,
    Replica = 8,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Config => "config",
            Kind::Key => "key",
            Kind::Pack => "pack",
            Kind::Index => "index",
            Kind::Point => "recovery point",
            Kind::Lock => "lock",
            Kind::Trash => "prune record",
            Kind::Replica => "replica record",
        }
    }
}

/// The largest `config` object accepted: its JSON is a few hundred bytes.
pub const MAX_CONFIG_OBJECT: u64 = 64 << 10;

/// The 8-byte header for an object of this kind at the current version.
pub fn header(kind: Kind) -> [u8; HEADER_LEN] {
    header_of(kind, FORMAT_VERSION)
}

/// The 8-byte header for an object of this kind at a given version.
pub fn header_of(kind: Kind, version: u8) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = kind as u8;
    h[5] = version;
    h
}

/// Check an object's header and return its body. A sealed body's AAD is the
/// object's own header ([`aad`]), which names the version that wrote it.
pub fn split<'a>(object: &str, kind: Kind, bytes: &'a [u8]) -> Result<&'a [u8]> {
    split_versioned(object, kind, bytes).map(|(_, body)| body)
}

/// The header of an object [`split`] accepted: the AAD of its sealed body.
pub fn aad(bytes: &[u8]) -> &[u8] {
    &bytes[..HEADER_LEN]
}

/// [`split`], with the version the object was written in.
pub fn split_versioned<'a>(object: &str, kind: Kind, bytes: &'a [u8]) -> Result<(u8, &'a [u8])> {
    if bytes.len() < HEADER_LEN {
        return Err(Error::corrupt(
            object,
            format!(
                "{} bytes is shorter than the 8-byte header (truncated?)",
                bytes.len()
            ),
        ));
    }
    if bytes[..4] != MAGIC {
        return Err(Error::corrupt(object, "not a Ferry object (bad magic)"));
    }
    if bytes[4] != kind as u8 {
        return Err(Error::corrupt(
            object,
            format!("expected a {} object, found kind {}", kind.name(), bytes[4]),
        ));
    }
    if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&bytes[5]) {
        return Err(Error::UnsupportedVersion {
            object: object.to_string(),
            found: bytes[5],
            supported: FORMAT_VERSION,
        });
    }
    Ok((bytes[5], &bytes[HEADER_LEN..]))
}

/// A cursor over untrusted bytes: every read is bounds-checked.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    pub fn array32(&mut self) -> Option<[u8; 32]> {
        self.bytes(32).map(|b| b.try_into().expect("32 bytes"))
    }

    /// A count that is plausible given the bytes left and the minimum size of an item.
    pub fn count(&mut self, min_item: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n.checked_mul(min_item)? <= self.remaining()).then_some(n)
    }
}

/// The largest object that holds `Sealed<Zstd<body>>` of at most `max_body`
/// bytes after its envelope: zstd's worst case for incompressible input (its
/// `ZSTD_COMPRESSBOUND`) plus the seal and the header. Readers refuse a larger
/// object before downloading it.
pub const fn sealed_zstd_bound(max_body: usize) -> u64 {
    (HEADER_LEN + crate::crypto::OVERHEAD + max_body + max_body / 256 + (128 << 10) / 2048) as u64
}

/// Decompress with a hard bound on the output size.
pub fn decompress_bounded(data: &[u8], limit: usize) -> Option<Vec<u8>> {
    let size = zstd::zstd_safe::get_frame_content_size(data).ok()??;
    if size > limit as u64 {
        return None;
    }
    let out = zstd::bulk::decompress(data, size as usize).ok()?;
    (out.len() as u64 == size).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trip() {
        let mut obj = header(Kind::Index).to_vec();
        obj.extend_from_slice(b"body");
        assert_eq!(split("x", Kind::Index, &obj).unwrap(), b"body");
        assert!(matches!(
            split("x", Kind::Point, &obj),
            Err(Error::Corrupt { .. })
        ));
        obj[5] = 1;
        assert_eq!(
            split_versioned("x", Kind::Index, &obj).unwrap(),
            (1, &b"body"[..])
        );
        obj[5] = 9;
        assert!(matches!(
            split("x", Kind::Index, &obj),
            Err(Error::UnsupportedVersion { found: 9, .. })
        ));
    }

    proptest! {
        #[test]
        fn split_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = split("x", Kind::Pack, &bytes);
        }

        #[test]
        fn decompress_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decompress_bounded(&bytes, 1 << 20);
        }
    }
}
