//! Where Ferry keeps its private working files: the index's sorted runs
//! (`table`) and packs too large to build in memory (`pack`). A leaf module,
//! so that those and `store` can name the place without importing each other.

use std::path::PathBuf;

/// `FERRY_SPILL_DIR`, else `TMPDIR`, else `/var/tmp` (on disk on most
/// systems, where `/tmp` is often memory).
pub fn spill_dir() -> PathBuf {
    std::env::var_os("FERRY_SPILL_DIR")
        .or_else(|| std::env::var_os("TMPDIR"))
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from)
}
