//! Splitting a disk into chunks.
//!
//! A disk is read in fixed segments of [`SEGMENT_SIZE`] bytes; chunk boundaries
//! always fall on segment boundaries, whatever the chunker, so that a change map (or a
//! changed region) maps to a bounded re-read. Inside a segment the repository's
//! chunker cuts fixed-size chunks or content-defined ones (FastCDC 2020).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The unit of reading; every chunk boundary resynchronises here.
pub const SEGMENT_SIZE: usize = 4 << 20;

/// The largest chunk any chunker may produce.
pub const MAX_CHUNK: usize = SEGMENT_SIZE;

/// How a repository cuts chunks; recorded in its config and never changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Chunker {
    /// Fixed-size chunks; `size` is a power of two from 4 KiB to the segment size.
    Fixed { size: u32 },
    /// Content-defined chunks between `min` and `max` bytes, `avg` on average.
    Cdc { min: u32, avg: u32, max: u32 },
}

impl Default for Chunker {
    /// See docs/performance.md for the measurements behind this default.
    fn default() -> Self {
        Chunker::Fixed { size: 64 * 1024 }
    }
}

impl Chunker {
    /// Check the parameters; a config read back from storage goes through this too.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Chunker::Fixed { size } => {
                let s = size as usize;
                if !s.is_power_of_two() || !(4096..=SEGMENT_SIZE).contains(&s) {
                    return Err(Error::InvalidInput(format!(
                        "fixed chunk size {s} must be a power of two from 4 KiB to 4 MiB"
                    )));
                }
            }
            Chunker::Cdc { min, avg, max } => {
                // min ≥ 4 KiB keeps a 64 MiB span's chunk list under 600 KiB (point.rs).
                let ok = (4096..=fastcdc::v2020::MINIMUM_MAX).contains(&min)
                    && (fastcdc::v2020::AVERAGE_MIN..=fastcdc::v2020::AVERAGE_MAX).contains(&avg)
                    && (fastcdc::v2020::MAXIMUM_MIN..=fastcdc::v2020::MAXIMUM_MAX).contains(&max)
                    && min <= avg
                    && avg <= max
                    && max as usize <= SEGMENT_SIZE;
                if !ok {
                    return Err(Error::InvalidInput(format!(
                        "content-defined chunk sizes min {min}, avg {avg}, max {max} are out of range (4 KiB ≤ min ≤ avg ≤ max ≤ 4 MiB)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The chunk lengths of one segment, in order; they add up to `data.len()`.
    pub fn cut(&self, data: &[u8], out: &mut Vec<u32>) {
        out.clear();
        match *self {
            Chunker::Fixed { size } => {
                let mut left = data.len();
                while left > 0 {
                    let n = left.min(size as usize);
                    out.push(n as u32);
                    left -= n;
                }
            }
            Chunker::Cdc { min, avg, max } => {
                if data.len() <= min as usize {
                    if !data.is_empty() {
                        out.push(data.len() as u32);
                    }
                    return;
                }
                for c in fastcdc::v2020::FastCDC::new(data, min, avg, max) {
                    out.push(c.length as u32);
                }
            }
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            Chunker::Fixed { size } => format!("fixed {} KiB", size / 1024),
            Chunker::Cdc { min, avg, max } => format!(
                "content-defined {}/{}/{} KiB",
                min / 1024,
                avg / 1024,
                max / 1024
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn cuts_cover_the_segment(len in 0usize..300_000, seed in any::<u64>()) {
            let mut x = seed | 1;
            let data: Vec<u8> = (0..len).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 }).collect();
            for c in [Chunker::default(), Chunker::Cdc { min: 16384, avg: 65536, max: 262144 }] {
                let mut out = Vec::new();
                c.cut(&data, &mut out);
                prop_assert_eq!(out.iter().map(|&n| n as usize).sum::<usize>(), len);
                prop_assert!(out.iter().all(|&n| n > 0));
            }
        }
    }

    #[test]
    fn validation() {
        assert!(Chunker::Fixed { size: 65536 }.validate().is_ok());
        assert!(Chunker::Fixed { size: 1000 }.validate().is_err());
        assert!(Chunker::Fixed { size: 8 << 20 }.validate().is_err());
        assert!(
            Chunker::Cdc {
                min: 1 << 20,
                avg: 1 << 16,
                max: 1 << 21
            }
            .validate()
            .is_err()
        );
    }
}
