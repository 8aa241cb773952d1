//! Block sources: image files and block devices, read by position.
//!
//! Reads skip holes (`SEEK_DATA`/`SEEK_HOLE`) so that the empty part of a sparse
//! image costs nothing; zeros that are really written are detected per chunk.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Something with a size that can be read at any position.
pub trait BlockSource: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> Result<u64>;
    /// Fill `buf` from `offset`; a short read past the end is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Fill several buffers, each from its offset; sources that can keep many
    /// requests in flight (NBD) override this.
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<()> {
        for (offset, buf) in reqs.iter_mut() {
            self.read_exact_at(buf, *offset)?;
        }
        Ok(())
    }
    /// The ranges that may hold data, in order; the rest reads as zeros.
    /// The default says the whole source may hold data.
    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        Ok(vec![(0, self.size()?)])
    }
    /// A marker that changes when the source is written (mtime for files), if known.
    fn change_marker(&self) -> Option<(i64, i64)> {
        None
    }
    /// Change tracking: the ranges written since the source's latest recovery
    /// point, when something tracked them (a dirty bitmap); `None` when unknown,
    /// and the backup then reads the whole disk.
    fn change_map(&self) -> Result<Option<ChangeMap>> {
        Ok(None)
    }
    /// What tracks the writes made after this read's instant, recorded in the
    /// point for the next incremental (a live VM's new dirty bitmap).
    fn tracking(&self) -> Option<String> {
        None
    }
}

/// The ranges of a disk written since its latest recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeMap {
    /// What tracked them, recorded in the point (e.g. `qemu:dirty-bitmap:gen3`).
    pub tracker: String,
    /// Sorted, non-overlapping `[start, end)` ranges.
    pub ranges: Vec<(u64, u64)>,
}

/// An image file or a block device.
pub struct FileSource {
    path: PathBuf,
    file: File,
    is_device: bool,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<Self> {
        let err = |source| Error::Source {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(Error::InvalidInput(format!(
                "{} is neither an image file nor a block device",
                path.display()
            )));
        }
        Ok(FileSource {
            path: path.to_path_buf(),
            file,
            is_device: ft.is_block_device(),
        })
    }

    fn io_err(&self, source: std::io::Error) -> Error {
        Error::Source {
            path: self.path.clone(),
            source,
        }
    }
}

impl BlockSource for FileSource {
    fn size(&self) -> Result<u64> {
        if self.is_device {
            // The length of a block device is where a seek to its end lands.
            rustix::fs::seek(&self.file, rustix::fs::SeekFrom::End(0))
                .map_err(|e| self.io_err(e.into()))
        } else {
            Ok(self.file.metadata().map_err(|e| self.io_err(e))?.len())
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::SourceChanged {
                    path: self.path.clone(),
                    before: offset + buf.len() as u64,
                    after: self.size().unwrap_or(0),
                }
            } else {
                self.io_err(e)
            }
        })
    }

    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let size = self.size()?;
        if self.is_device {
            return Ok(vec![(0, size)]);
        }
        let mut ranges = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            let start = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(pos)) {
                Ok(p) => p,
                // ENXIO: no data after pos.
                Err(rustix::io::Errno::NXIO) => break,
                // The file system cannot tell: treat everything as data.
                Err(_) => return Ok(vec![(0, size)]),
            };
            let end = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(start)) {
                Ok(p) => p.min(size),
                Err(_) => size,
            };
            if end > start {
                ranges.push((start, end));
            }
            pos = end.max(start + 1);
        }
        Ok(ranges)
    }

    fn change_marker(&self) -> Option<(i64, i64)> {
        if self.is_device {
            return None;
        }
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata().ok()?;
        Some((m.mtime(), m.mtime_nsec()))
    }
}

/// An in-memory source, for tests and fuzzing.
pub struct MemSource(pub Vec<u8>);

impl BlockSource for MemSource {
    fn size(&self) -> Result<u64> {
        Ok(self.0.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let start = offset as usize;
        let src = self
            .0
            .get(start..start + buf.len())
            .ok_or_else(|| Error::InvalidInput("read past the end of a memory source".into()))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// True when every byte is zero. ORing 64-byte blocks lets the compiler vectorise
/// the loop while still stopping early on data.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn holes_are_skipped() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(64 << 20).unwrap();
        f.as_file().write_all_at(b"data", 8 << 20).unwrap();
        f.flush().unwrap();
        let s = FileSource::open(f.path()).unwrap();
        let ranges = s.data_ranges().unwrap();
        let covered: u64 = ranges.iter().map(|(a, b)| b - a).sum();
        assert!(covered < 64 << 20, "holes were not skipped: {ranges:?}");
        assert!(ranges.iter().any(|&(a, b)| a <= 8 << 20 && b > 8 << 20));
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        let mut b = vec![0u8; 4097];
        b[4096] = 1;
        assert!(!is_zero(&b));
        b[4096] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
    }
}
