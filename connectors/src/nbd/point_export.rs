//! A recovery point's disk as an NBD export: read-only, or writable with every
//! write kept in a local overlay file (the repository is never written).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_agent::instant::DiskReader;

use super::server::{Export, ExportError};

/// The overlay's unit: a block is either all from the point or all from the overlay.
const BLOCK: u64 = 4096;

struct Overlay {
    path: PathBuf,
    file: File,
    /// One bit per block: written through the export.
    written: Mutex<Vec<u64>>,
}

/// A failure of the recovery point behind the export, with its cause.
fn point(offset: u64) -> impl FnOnce(ferry_agent::Error) -> ExportError {
    move |e| ExportError::Backing {
        doing: "reading the recovery point",
        offset,
        source: Box::new(e),
    }
}

impl Overlay {
    /// A failure of the overlay file, naming it, with its cause.
    fn failed(
        &self,
        doing: &'static str,
        offset: u64,
    ) -> impl FnOnce(std::io::Error) -> ExportError {
        let path = self.path.clone();
        move |e| ExportError::Backing {
            doing,
            offset,
            source: Box::new(OverlayError { path, source: e }),
        }
    }

    fn is_written(map: &[u64], b: u64) -> bool {
        map[(b / 64) as usize] & (1 << (b % 64)) != 0
    }
}

/// An overlay file failed (named, with the I/O error as its cause).
#[derive(Debug, thiserror::Error)]
#[error("overlay {}: {source}", path.display())]
struct OverlayError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

pub struct PointExport {
    reader: DiskReader,
    overlay: Option<Overlay>,
}

impl PointExport {
    pub fn read_only(reader: DiskReader) -> Self {
        PointExport {
            reader,
            overlay: None,
        }
    }

    /// Writable: writes go to `path`, a new sparse file of the disk's size.
    pub fn with_overlay(reader: DiskReader, path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(reader.size())?;
        let blocks = reader.size().div_ceil(BLOCK);
        Ok(PointExport {
            overlay: Some(Overlay {
                path: path.to_path_buf(),
                file,
                written: Mutex::new(vec![0u64; blocks.div_ceil(64) as usize]),
            }),
            reader,
        })
    }

    pub fn reader(&self) -> &DiskReader {
        &self.reader
    }
}

impl Export for PointExport {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
        let Some(ov) = &self.overlay else {
            return self.reader.read_at(buf, offset).map_err(point(offset));
        };
        // Runs of blocks from one side or the other.
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let b = pos / BLOCK;
            let from_overlay = Overlay::is_written(&ov.written.lock().expect("overlay map"), b);
            let mut stop = ((b + 1) * BLOCK).min(end);
            {
                let map = ov.written.lock().expect("overlay map");
                while stop < end && Overlay::is_written(&map, stop / BLOCK) == from_overlay {
                    stop = ((stop / BLOCK + 1) * BLOCK).min(end);
                }
            }
            let out = &mut buf[(pos - offset) as usize..(stop - offset) as usize];
            if from_overlay {
                ov.file
                    .read_exact_at(out, pos)
                    .map_err(ov.failed("reading the overlay", pos))?;
            } else {
                self.reader.read_at(out, pos).map_err(point(pos))?;
            }
            pos = stop;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ExportError> {
        let Some(ov) = &self.overlay else {
            return Err(ExportError::ReadOnly);
        };
        let end = offset + buf.len() as u64;
        // One writer at a time: a partial block is completed from the point first.
        let mut map = ov.written.lock().expect("overlay map");
        let mut pos = offset;
        let mut block = vec![0u8; BLOCK as usize];
        while pos < end {
            let b = pos / BLOCK;
            let (bs, be) = (b * BLOCK, ((b + 1) * BLOCK).min(self.size()));
            let stop = be.min(end);
            let part = &buf[(pos - offset) as usize..(stop - offset) as usize];
            if pos == bs && stop == be || Overlay::is_written(&map, b) {
                ov.file
                    .write_all_at(part, pos)
                    .map_err(ov.failed("writing the overlay", pos))?;
            } else {
                let blk = &mut block[..(be - bs) as usize];
                self.reader.read_at(blk, bs).map_err(point(bs))?;
                blk[(pos - bs) as usize..(stop - bs) as usize].copy_from_slice(part);
                ov.file
                    .write_all_at(blk, bs)
                    .map_err(ov.failed("writing the overlay", bs))?;
            }
            map[(b / 64) as usize] |= 1 << (b % 64);
            pos = stop;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ExportError> {
        match &self.overlay {
            Some(ov) => ov
                .file
                .sync_data()
                .map_err(ov.failed("syncing the overlay", 0)),
            None => Ok(()),
        }
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, ExportError> {
        if self.overlay.is_some() {
            // Written blocks hold data wherever the point had zeros: say data.
            return Ok(vec![(len.min(self.size() - offset), true)]);
        }
        self.reader.allocation(offset, len).map_err(point(offset))
    }
}
