//! Repositories written by earlier format versions still open, restore, check,
//! take new backups and prune. `fixtures/repo-v1` was written by the last
//! version-1 build (25b6788, `agent/examples/make_v1.rs` of that tree, which is
//! not kept) with the password `format-v1-fixture`: two points of a 3 MiB disk
//! of text, random bytes and zeros, whose BLAKE3 digests are in
//! `fixtures/expected-v1.json`.

use std::path::Path;
use std::sync::Arc;

use crate::progress::Progress;
use crate::repo::Repository;
use crate::store::Store;
use crate::testing::{check_clean, prune_all, restore_bytes};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn a_version_1_repository_opens_restores_checks_and_takes_version_2_backups() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let expected: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(fixtures.join("expected-v1.json")).unwrap()).unwrap();
    assert_eq!(expected.len(), 2);
    // A copy: the new backup below writes into it.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures.join("repo-v1"), dir.path());
    let config = std::fs::read(dir.path().join("config")).unwrap();
    assert_eq!(config[5], 1, "the fixture is a version-1 repository");
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
    let store = Store::new(Arc::new(fs), dir.path().display().to_string());
    let repo = Repository::open(store, b"format-v1-fixture").unwrap();

    let digest = |b: &[u8]| blake3::hash(b).to_hex().to_string();
    for (point, want) in &expected {
        assert_eq!(&digest(&restore_bytes(&repo, point)), want, "point {point}");
    }
    check_clean(&repo);

    // A new backup of the latest content plus a change: version-2 objects
    // beside the version-1 ones, deduplicated against them.
    let latest = repo.resolve("fixture@latest").unwrap();
    let mut data = restore_bytes(&repo, &latest.id);
    data[2 << 20..(2 << 20) + 65536].fill(7);
    let opts = crate::backup::BackupOptions {
        source: "fixture".into(),
        ..crate::testing::vm_backup()
    };
    let s = crate::backup::backup_sources(
        &repo,
        &opts,
        &[&crate::source::MemSource(data.clone())],
        &Progress::default(),
    )
    .unwrap();
    assert!(s.new_chunks <= 2, "{s:?}");
    assert_eq!(digest(&restore_bytes(&repo, &s.point)), digest(&data));
    let written = repo.store.get(&format!("points/{}", s.point)).unwrap();
    assert_eq!(written[5], crate::format::FORMAT_VERSION);

    // Prune and check the mixed repository; every point still restores.
    crate::prune::forget(
        &repo,
        &crate::retention::Policy::default(),
        None,
        std::slice::from_ref(expected.keys().next().unwrap()),
        false,
    )
    .unwrap();
    prune_all(&repo);
    check_clean(&repo);
    let (second, want) = expected.iter().nth(1).unwrap();
    assert_eq!(&digest(&restore_bytes(&repo, second)), want);
    assert_eq!(digest(&restore_bytes(&repo, &s.point)), digest(&data));
}
