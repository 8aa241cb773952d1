//! Helpers the unit tests share.

use crate::backup::{BackupOptions, DiskSpec, backup_sources};
use crate::crypto::KdfParams;
use crate::point::Point;
use crate::progress::Progress;
use crate::repo::{InitOptions, Repository};
use crate::source::MemSource;
use crate::store::Store;

/// A repository in memory, with a key derivation cheap enough for tests.
pub(crate) fn memory_repo() -> Repository {
    memory_repo_named("memory:")
}

/// A repository in memory that calls itself `location` (`s3://...` makes it
/// count as remote).
pub(crate) fn memory_repo_named(location: &str) -> Repository {
    Repository::init(
        Store::new(
            std::sync::Arc::new(object_store::memory::InMemory::new()),
            location,
        ),
        b"pw",
        cheap_init(),
    )
    .expect("a repository in memory")
}

/// A repository in memory made with `opts` (start from [`cheap_init`]).
pub(crate) fn memory_repo_with(opts: InitOptions) -> Repository {
    Repository::init(Store::memory(), b"pw", opts).expect("a repository in memory")
}

/// `init`'s defaults, with a key derivation cheap enough for tests.
pub(crate) fn cheap_init() -> InitOptions {
    InitOptions {
        kdf: KdfParams {
            memory_kib: 64,
            iterations: 1,
            ..KdfParams::default()
        },
        ..InitOptions::default()
    }
}

/// A backup of source `vm` with one disk, `/dev/vda`.
pub(crate) fn vm_backup() -> BackupOptions {
    BackupOptions {
        source: "vm".into(),
        disks: vec![DiskSpec::from_path("/dev/vda")],
        consistency: None,
        time: None,
        group: None,
    }
}

/// Backs `data` up as the one disk of source `vm`; returns the new point.
pub(crate) fn backup_bytes(repo: &Repository, data: &[u8]) -> Point {
    let s = backup_sources(
        repo,
        &vm_backup(),
        &[&MemSource(data.to_vec())],
        &Progress::default(),
    )
    .expect("a backup in memory");
    repo.load_point(&s.point).expect("the point just written")
}

/// Restores the one disk of `point` (the full restore path: ranged reads,
/// parallel decoding) into a temporary file and returns its bytes.
pub(crate) fn restore_bytes(repo: &Repository, point: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let target = dir.path().join("disk.img");
    let p = repo.resolve(point).expect("the point");
    crate::restore::restore(
        repo,
        &p,
        &crate::restore::RestoreOptions {
            target: target.clone(),
            disk: None,
            overwrite: false,
            delta: false,
            base: None,
        },
        &Progress::default(),
    )
    .expect("a restore");
    std::fs::read(&target).expect("the restored disk")
}

/// Prunes everything no point needs, repacking every pack that holds a dead blob.
pub(crate) fn prune_all(repo: &Repository) -> crate::prune::PruneReport {
    crate::prune::prune(
        repo,
        crate::prune::PruneOptions {
            max_unused: 0.0,
            dry_run: false,
        },
    )
    .expect("a prune")
}

/// `check --read-data` finds nothing wrong.
pub(crate) fn check_clean(repo: &Repository) {
    let report = crate::check::check(
        repo,
        crate::check::CheckOptions { read_data: true },
        &Progress::default(),
    )
    .expect("a check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Fills `data` with seeded noise (xorshift), which does not compress.
pub(crate) fn noise(data: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}
