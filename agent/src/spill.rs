//! Where Ferry keeps its private working files: the index's sorted runs
//! (`table`) and packs too large to build in memory (`pack`). A leaf module,
//! so that those and `store` can name the place without importing each other.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// `FERRY_SPILL_DIR`, else `TMPDIR`, else `/var/tmp` (on disk on most
/// systems, where `/tmp` is often memory).
pub fn spill_dir() -> PathBuf {
    std::env::var_os("FERRY_SPILL_DIR")
        .or_else(|| std::env::var_os("TMPDIR"))
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from)
}

/// A private, unnamed temporary file in `dir` (`O_TMPFILE`: gone with the
/// process, even after `kill -9`). It is the owner's only, whatever the umask.
/// The first one a process makes in memory (tmpfs, ramfs) logs a warning: such
/// files are there to keep bytes out of memory.
pub fn temp_file(dir: &Path) -> std::io::Result<File> {
    let file = tempfile::tempfile_in(dir)?;
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    static WARNED: AtomicBool = AtomicBool::new(false);
    if in_memory(&file) && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            dir = %dir.display(),
            "Ferry's temporary files (index runs, packs over 16 MiB) are in memory there \
             (tmpfs): a backup can keep up to four packs in them, 512 MiB at 128 MiB packs; \
             set FERRY_SPILL_DIR to a private directory on disk"
        );
    }
    Ok(file)
}

/// Whether `file` lives in memory: on tmpfs or ramfs.
pub fn in_memory(file: &File) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    // `f_type` is a signed word whose width depends on the platform.
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::fstatfs(file)
        .is_ok_and(|s| matches!(s.f_type as u64 & 0xffff_ffff, TMPFS_MAGIC | RAMFS_MAGIC))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_files_are_private_and_memory_is_told_from_disk() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = temp_file(dir.path()).unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // The source tree is on disk.
        let source = File::open(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
        assert!(!in_memory(&source));
        // /dev/shm is a tmpfs on Linux systems with glibc's shm_open.
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            assert!(in_memory(&temp_file(shm.path()).unwrap()));
        }
    }
}
