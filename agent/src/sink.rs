//! Where a restore writes: the [`BlockSink`] seam, mirroring
//! [`BlockSource`](crate::source::BlockSource). A file or a block device
//! today ([`FileSink`]); a target's own volume or snapshot (EBS direct, a
//! libvirt pool) implements the same trait so a restore writes straight into
//! it. [`MemSink`] is the in-memory one for tests.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// A disk being restored. Writes come from several threads at once, at any
/// offsets; `finish` is called once, after the last write.
pub trait BlockSink: Send + Sync {
    /// How many bytes it holds (at least the disk's size).
    fn size(&self) -> u64;
    /// Every byte not written reads as zero (a new sparse file, a new
    /// snapshot): zero runs and zero blocks need no write at all.
    fn fresh(&self) -> bool;
    /// It holds what an interrupted restore wrote: the restore reads back
    /// each chunk's place ([`BlockSink::read_at`]) and keeps what matches.
    fn resumed(&self) -> bool;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Reads back what is there; asked only of a resumed sink.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Makes a range read as zeros. A restore zeroes only ranges it does not
    /// write, so a fresh sink may do nothing here.
    fn zero(&self, offset: u64, len: u64) -> Result<()>;
    /// Pushes what was written toward durable storage; called as the restore
    /// goes, so that `finish` waits only for the tail.
    fn flush(&self) -> Result<()>;
    /// Everything is written: make it durable, and visible under its final
    /// name (a renamed file, a completed snapshot).
    fn finish(&self) -> Result<()>;
    /// It is an existing disk written in place (`restore --delta`): writes go
    /// through [`BlockSink::write_differing`].
    fn in_place(&self) -> bool {
        false
    }
    /// Write `buf` at `offset`, leaving alone the 4 KiB blocks that already
    /// hold those bytes; returns the bytes written.
    fn write_differing(&self, buf: &[u8], offset: u64) -> Result<u64> {
        self.write_at(buf, offset)?;
        Ok(buf.len() as u64)
    }
}

impl BlockSink for FileSink {
    fn size(&self) -> u64 {
        self.size
    }
    fn fresh(&self) -> bool {
        !self.is_device && !self.resumed
    }
    fn resumed(&self) -> bool {
        self.resumed
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write(buf, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| Error::Target {
                path: self.path.clone(),
                source,
            })
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.zeroes(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|source| Error::Target {
            path: self.path.clone(),
            source,
        })
    }
    fn finish(&self) -> Result<()> {
        self.complete()
    }
    fn in_place(&self) -> bool {
        self.delta
    }
    fn write_differing(&self, buf: &[u8], offset: u64) -> Result<u64> {
        if !self.delta {
            self.write(buf, offset)?;
            return Ok(buf.len() as u64);
        }
        let mut there = vec![0u8; buf.len()];
        self.file
            .read_exact_at(&mut there, offset)
            .map_err(|source| Error::Target {
                path: self.path.clone(),
                source,
            })?;
        // Runs of differing 4 KiB blocks, each written with one call.
        const BLOCK: usize = 4096;
        let mut written = 0u64;
        let mut run: Option<usize> = None;
        let mut at = 0;
        while at <= buf.len() {
            let end = (at + BLOCK).min(buf.len());
            let differs = at < buf.len() && buf[at..end] != there[at..end];
            match (differs, run) {
                (true, None) => run = Some(at),
                (false, Some(start)) => {
                    self.write(&buf[start..at], offset + start as u64)?;
                    written += (at - start) as u64;
                    run = None;
                }
                _ => {}
            }
            if at == buf.len() {
                break;
            }
            at = end;
        }
        Ok(written)
    }
}

/// A disk in memory (tests, and the conformance suite's reference).
#[derive(Debug)]
pub struct MemSink {
    bytes: Mutex<Vec<u8>>,
    resumed: bool,
    finished: std::sync::atomic::AtomicBool,
}

impl MemSink {
    /// A new, all-zero disk of `size` bytes.
    pub fn new(size: u64) -> MemSink {
        MemSink {
            bytes: Mutex::new(vec![0; size as usize]),
            resumed: false,
            finished: Default::default(),
        }
    }

    /// A disk that already holds `bytes` (an interrupted restore's).
    pub fn resume(bytes: Vec<u8>) -> MemSink {
        MemSink {
            bytes: Mutex::new(bytes),
            resumed: true,
            finished: Default::default(),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.lock().expect("sink").clone()
    }

    pub fn finished(&self) -> bool {
        self.finished.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>> {
        let size = self.size();
        let end = offset.checked_add(len as u64).filter(|&e| e <= size);
        match end {
            Some(end) => Ok(offset as usize..end as usize),
            None => Err(Error::InvalidInput(format!(
                "bytes {offset}..{} are past the end of a {size}-byte disk",
                offset.saturating_add(len as u64)
            ))),
        }
    }
}

impl BlockSink for MemSink {
    fn size(&self) -> u64 {
        self.bytes.lock().expect("sink").len() as u64
    }
    fn fresh(&self) -> bool {
        !self.resumed
    }
    fn resumed(&self) -> bool {
        self.resumed
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let r = self.range(offset, buf.len())?;
        self.bytes.lock().expect("sink")[r].copy_from_slice(buf);
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.bytes.lock().expect("sink")[r]);
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.range(offset, len as usize)?;
        self.bytes.lock().expect("sink")[r].fill(0);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn finish(&self) -> Result<()> {
        self.finished
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// A restore into an image file (through `NAME.ferry-partial`, renamed when
/// complete, resumed when found) or a block device written in place.
pub struct FileSink {
    file: File,
    /// The disk's size.
    size: u64,
    /// Where the data is written (the partial file for files).
    path: PathBuf,
    final_path: PathBuf,
    is_device: bool,
    resumed: bool,
    /// Written in place over an existing disk (`restore --delta`): what is
    /// there already is read and kept where it matches.
    delta: bool,
}

impl FileSink {
    /// A delta restore onto an existing image file or block device: written in
    /// place, after reading each chunk's place and keeping what already
    /// matches, so only what differs is fetched and written. A file that is not
    /// there is restored whole, as [`FileSink::open`] does. An existing file
    /// must be a regular file of this user with one name (never written
    /// through a link), and is cut or grown to the disk's size.
    pub fn open_delta(path: &Path, size: u64, follow: bool) -> Result<FileSink> {
        let meta = if follow {
            std::fs::metadata(path)
        } else {
            std::fs::symlink_metadata(path)
        };
        match meta {
            Err(_) => FileSink::open(path, size, false, follow),
            Ok(m) if m.file_type().is_block_device() => {
                let mut sink = FileSink::open(path, size, false, true)?;
                sink.resumed = true;
                sink.delta = true;
                Ok(sink)
            }
            Ok(_) => {
                let file = open_partial(path)?;
                file.set_len(size).map_err(|source| Error::Target {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok(FileSink {
                    file,
                    size,
                    path: path.to_path_buf(),
                    final_path: path.to_path_buf(),
                    is_device: false,
                    resumed: true,
                    delta: true,
                })
            }
        }
    }

    /// Whether this sink writes over an existing disk in place.
    pub fn is_delta(&self) -> bool {
        self.delta
    }

    /// `follow`: whether a link at `final_path` may lead to a block device. Only
    /// for a target the user named (`/dev/disk/by-id/...` is a link); inside a
    /// target directory, a link there is a file like any other and never followed.
    pub fn open(final_path: &Path, size: u64, overwrite: bool, follow: bool) -> Result<FileSink> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Target { path, source }
        };
        let meta = if follow {
            std::fs::metadata(final_path)
        } else {
            std::fs::symlink_metadata(final_path)
        };
        if let Ok(meta) = meta
            && meta.file_type().is_block_device()
        {
            let file = OpenOptions::new()
                .write(true)
                .read(true)
                .open(final_path)
                .map_err(err(final_path))?;
            let dev_size = rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0)).map_err(|e| {
                Error::Target {
                    path: final_path.to_path_buf(),
                    source: e.into(),
                }
            })?;
            if dev_size < size {
                return Err(Error::InvalidInput(format!(
                    "device {} holds {dev_size} bytes, the disk needs {size}",
                    final_path.display()
                )));
            }
            return Ok(FileSink {
                file,
                size: dev_size,
                path: final_path.to_path_buf(),
                final_path: final_path.to_path_buf(),
                is_device: true,
                resumed: false,
                delta: false,
            });
        }
        // `symlink_metadata`: a link at the final path is itself "something there",
        // and `--overwrite` removes the link, never what it points to.
        if final_path.symlink_metadata().is_ok() {
            if !overwrite {
                return Err(Error::InvalidInput(format!(
                    "{} already exists; remove it, pick another target, or pass --overwrite",
                    final_path.display()
                )));
            }
            std::fs::remove_file(final_path).map_err(err(final_path))?;
        }
        let mut partial = final_path.as_os_str().to_owned();
        partial.push(".ferry-partial");
        let partial = PathBuf::from(partial);
        let resumed = partial.symlink_metadata().is_ok();
        let file = open_partial(&partial)?;
        file.set_len(size).map_err(err(&partial))?;
        Ok(FileSink {
            file,
            size,
            path: partial,
            final_path: final_path.to_path_buf(),
            is_device: false,
            resumed,
            delta: false,
        })
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        // Never past the disk: a file would grow silently, a device would
        // take the bytes of whatever follows.
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(Error::InvalidInput(format!(
                "a write of bytes {offset}..{} is past the end of {} ({} bytes)",
                offset.saturating_add(buf.len() as u64),
                self.path.display(),
                self.size
            )));
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| Error::Target {
                path: self.path.clone(),
                source,
            })
    }

    /// Make a range read as zeros.
    fn zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if !self.is_device && !self.resumed {
            return Ok(());
        }
        if !self.is_device {
            let punched = rustix::fs::fallocate(
                &self.file,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                offset,
                len,
            );
            if punched.is_ok() {
                return Ok(());
            }
        }
        let zeros = vec![0u8; len.min(4 << 20) as usize];
        // Over an existing device, only what is not zero already is written.
        let mut seen = if self.delta {
            vec![0u8; zeros.len()]
        } else {
            Vec::new()
        };
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            if self.delta {
                self.file
                    .read_exact_at(&mut seen[..n], at)
                    .map_err(|source| Error::Target {
                        path: self.path.clone(),
                        source,
                    })?;
                if crate::source::is_zero(&seen[..n]) {
                    at += n as u64;
                    continue;
                }
            }
            self.write(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn complete(&self) -> Result<()> {
        let err = |source| Error::Target {
            path: self.path.clone(),
            source,
        };
        self.file.sync_all().map_err(err)?;
        if !self.is_device && self.path != self.final_path {
            std::fs::rename(&self.path, &self.final_path).map_err(err)?;
            // The new name, too, must outlive a power loss.
            let dir = self.final_path.parent().unwrap_or(Path::new(""));
            sync_dir(dir).map_err(|source| Error::Target {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        Ok(())
    }
}

/// `fsync` of a directory (`""` is the current one), so that the names just
/// made or changed in it outlive a power loss. A filesystem that cannot sync a
/// directory (`EINVAL`, as some FUSE and network filesystems answer) is let be,
/// as SQLite does.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    match File::open(dir).and_then(|d| d.sync_all()) {
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        r => r,
    }
}

/// Open (or create) a partial restore file without following a link at its path,
/// and make sure it is a file a restore of this user made: a regular file, owned
/// by us, with one name. Anything else (a symlink or hard link planted to redirect
/// the decrypted disk, a fifo, a device) is refused, not written through.
/// A new file is created 0600 (the umask can only make it stricter): it holds a
/// decrypted disk.
fn open_partial(partial: &Path) -> Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let unsafe_partial = |detail: String| Error::UnsafeTarget {
        path: partial.to_path_buf(),
        detail,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        // O_NOFOLLOW: a symlink at the path fails the open (ELOOP) instead of
        // being followed; O_NONBLOCK keeps a planted fifo from blocking the open.
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(partial)
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                unsafe_partial("it is a symbolic link".into())
            } else {
                Error::Target {
                    path: partial.to_path_buf(),
                    source: e,
                }
            }
        })?;
    let meta = file.metadata().map_err(|source| Error::Target {
        path: partial.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(unsafe_partial(format!(
            "it is not a regular file ({:?})",
            meta.file_type()
        )));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(unsafe_partial(format!(
            "it belongs to user {}, not to this user ({me})",
            meta.uid()
        )));
    }
    if meta.nlink() != 1 {
        return Err(unsafe_partial(format!(
            "it has {} names (a hard link to another file?)",
            meta.nlink()
        )));
    }
    // A partial file left by an older ferry may be readable by others: tighten it.
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o700))
            .map_err(|source| Error::Target {
                path: partial.to_path_buf(),
                source,
            })?;
    }
    Ok(file)
}
