//! Helpers the unit tests share.

use crate::backup::{BackupOptions, DiskSpec};
use crate::crypto::KdfParams;
use crate::repo::{InitOptions, Repository};
use crate::store::Store;

/// A repository in memory, with a key derivation cheap enough for tests.
pub(crate) fn memory_repo() -> Repository {
    let kdf = KdfParams {
        memory_kib: 64,
        iterations: 1,
        ..KdfParams::default()
    };
    Repository::init(
        Store::memory(),
        b"pw",
        InitOptions {
            kdf,
            ..InitOptions::default()
        },
    )
    .expect("a repository in memory")
}

/// A backup of source `vm` with one disk, `/dev/vda`.
pub(crate) fn vm_backup() -> BackupOptions {
    BackupOptions {
        source: "vm".into(),
        disks: vec![DiskSpec::from_path("/dev/vda")],
        consistency: None,
        time: None,
    }
}
