//! An NBD export as a restore target: a disk that exists (a VM's disk
//! exported by `qemu-nbd`, a QEMU NBD server) restored in place.
//!
//! - With a change map (the export's `qemu:dirty-bitmap:NAME`, recording
//!   every write since the disk held a base point), the restore needs no
//!   read of the disk at all: what the bitmap marks and what differs between
//!   the base and the point are written, nothing else is touched.
//! - Without one it is compared block by block ([`BlockSink::in_place`]):
//!   each chunk's place is read and only the 4 KiB blocks that differ are
//!   written.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_agent::sink::BlockSink;
use ferry_agent::{Error, Result};

use super::{Client, NbdError, NbdUrl};

/// The size of the blocks compared and written in place.
const BLOCK: usize = 4096;

pub struct NbdSink {
    label: String,
    client: Mutex<Client>,
    size: u64,
    /// Compare before writing (no change map).
    compare: bool,
    /// Bytes read back from the disk.
    read: AtomicU64,
}

impl NbdSink {
    /// Connects to the export, which must be writable. `compare`: read and
    /// compare before writing (a restore with no change map).
    pub fn open(url: &NbdUrl, compare: bool) -> Result<NbdSink> {
        let label = url.to_string();
        let mut contexts = Vec::new();
        contexts.extend(url.bitmap_context());
        let client = Client::connect(url, &contexts).map_err(|e| err(&label, e))?;
        if !client.writable() {
            return Err(Error::InvalidInput(format!(
                "{label} is exported read-only; export the disk writable to restore onto it (qemu-nbd without -r)"
            )));
        }
        Ok(NbdSink {
            size: client.size(),
            label,
            client: Mutex::new(client),
            compare,
            read: AtomicU64::new(0),
        })
    }

    /// Bytes read back from the disk so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    fn client(&self) -> std::sync::MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn err(label: &str, e: NbdError) -> Error {
    Error::Target {
        path: label.into(),
        source: std::io::Error::other(e),
    }
}

impl BlockSink for NbdSink {
    fn size(&self) -> u64 {
        self.size
    }
    fn fresh(&self) -> bool {
        false
    }
    fn resumed(&self) -> bool {
        false
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.client()
            .write_at(buf, offset)
            .map_err(|e| err(&self.label, e))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.client()
            .read_at(buf, offset)
            .map_err(|e| err(&self.label, e))
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.client()
            .write_zeroes(offset, len)
            .map_err(|e| err(&self.label, e))
    }
    fn flush(&self) -> Result<()> {
        self.client().flush().map_err(|e| err(&self.label, e))
    }
    fn finish(&self) -> Result<()> {
        self.flush()
    }
    fn in_place(&self) -> bool {
        self.compare
    }
    fn write_differing(&self, buf: &[u8], offset: u64) -> Result<u64> {
        let mut have = vec![0u8; buf.len()];
        self.read_at(&mut have, offset)?;
        let mut written = 0;
        // Runs of differing blocks, one write each.
        let mut run: Option<usize> = None;
        let blocks = buf.len().div_ceil(BLOCK);
        for i in 0..=blocks {
            let differs = i < blocks && {
                let r = i * BLOCK..((i + 1) * BLOCK).min(buf.len());
                buf[r.clone()] != have[r]
            };
            match (differs, run) {
                (true, None) => run = Some(i),
                (false, Some(first)) => {
                    let r = first * BLOCK..(i * BLOCK).min(buf.len());
                    self.write_at(&buf[r.clone()], offset + r.start as u64)?;
                    written += r.len() as u64;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(written)
    }
}
