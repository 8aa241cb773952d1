//! `ferry restore --delta`: a point restored over an existing disk in place,
//! fetching and writing only what differs (the engine of failback and of a
//! re-sync after a drill).

mod common;

use std::os::unix::fs::FileExt;

use common::{Env, make_image, same_content, scatter_writes};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

/// 64 KiB chunks of `a` that differ from `b`'s.
fn differing_chunks(a: &std::path::Path, b: &std::path::Path) -> u64 {
    let (fa, fb) = (
        std::fs::File::open(a).expect("open a"),
        std::fs::File::open(b).expect("open b"),
    );
    let size = fa.metadata().expect("size").len();
    let (mut x, mut y) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    (0..size / CHUNK)
        .filter(|i| {
            fa.read_exact_at(&mut x, i * CHUNK).expect("read a");
            fb.read_exact_at(&mut y, i * CHUNK).expect("read b");
            x != y
        })
        .count() as u64
}

#[test]
fn delta_restore_fetches_and_writes_only_the_chunks_that_differ() {
    let env = Env::new();
    env.init();
    let disk = env.path("disk.img");
    make_image(&disk, 64 * MIB, 5);
    let point = env.backup("vm", &[&disk])["point"]
        .as_str()
        .unwrap()
        .to_string();
    let out = env.path("out.img");
    env.ok(&["restore", &point, "--to", out.to_str().unwrap()]);

    // 1% of the 4 KiB blocks changed, scattered.
    scatter_writes(&out, 164, 77);
    let changed = differing_chunks(&out, &disk);
    assert!(changed > 100, "{changed}");

    let s = env.json(&["restore", &point, "--to", out.to_str().unwrap(), "--delta"]);
    assert!(
        same_content(&out, &disk),
        "the delta restore is not the point"
    );
    assert_eq!(s["disks"][0]["delta"], true, "{s}");
    let fetched = s["chunks_fetched"].as_u64().unwrap();
    let written = s["bytes_written"].as_u64().unwrap();
    // Changes that fell in zero runs are punched out, not fetched.
    assert!(
        fetched <= changed,
        "fetched {fetched} chunks for {changed} changed: {s}"
    );
    // Only the 4 KiB blocks that differ are written back: at most what the
    // scattered writes changed.
    assert!(
        written <= 164 * 4096,
        "wrote {written} bytes back for 164 changed 4 KiB blocks"
    );
    assert!(written > 0);
    assert!(s["chunks_kept"].as_u64().unwrap() > 0, "{s}");

    // Nothing differs now: nothing is fetched or written.
    let s = env.json(&["restore", &point, "--to", out.to_str().unwrap(), "--delta"]);
    assert_eq!(
        (s["chunks_fetched"].as_u64(), s["bytes_written"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    assert!(same_content(&out, &disk));

    // A disk that grew is cut back to the point's size.
    let f = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
    f.write_all_at(b"tail", 64 * MIB + 100).unwrap();
    env.json(&["restore", &point, "--to", out.to_str().unwrap(), "--delta"]);
    assert!(same_content(&out, &disk));

    // A target that is not there is restored whole.
    let fresh = env.path("fresh.img");
    let s = env.json(&[
        "restore",
        &point,
        "--to",
        fresh.to_str().unwrap(),
        "--delta",
    ]);
    assert!(same_content(&fresh, &disk));
    assert_eq!(s["disks"][0]["delta"], false, "{s}");
}

#[test]
fn delta_restore_never_writes_through_a_link() {
    let env = Env::new();
    env.init();
    let disk = env.path("disk.img");
    make_image(&disk, 8 * MIB, 6);
    env.backup("vm", &[&disk]);
    // In a directory target, a disk's name that is a symlink to someone
    // else's file is refused, and the file is left alone.
    let victim = env.path("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let dir = env.path("restore-dir");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("disk.img")).unwrap();
    let o = env.run(&[
        "restore",
        "vm@latest",
        "--to",
        dir.to_str().unwrap(),
        "--delta",
    ]);
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // --delta and --overwrite are two different things.
    let o = env.run(&[
        "restore",
        "vm@latest",
        "--to",
        "x.img",
        "--delta",
        "--overwrite",
    ]);
    assert_eq!(o.status.code(), Some(2));
}

/// Failback's engine: the original disk still holds the point it was last
/// backed up as; the recovered machine's newer point is restored over it,
/// and what the two points share is neither read nor written.
#[test]
fn delta_restore_from_a_base_point_touches_only_what_the_points_do_not_share() {
    let env = Env::new();
    env.init();
    for d in ["site-a", "site-b", "site-c"] {
        std::fs::create_dir(env.path(d)).unwrap();
    }
    let original = env.path("site-a/disk.img");
    make_image(&original, 64 * MIB, 9);
    let before = env.backup("vm", &[&original])["point"]
        .as_str()
        .unwrap()
        .to_string();
    // Failed over: the recovered copy runs elsewhere and changes.
    let recovered = env.path("site-b/disk.img");
    env.ok(&["restore", &before, "--to", recovered.to_str().unwrap()]);
    scatter_writes(&recovered, 164, 12);
    let after = env.backup("vm", &[&recovered])["point"]
        .as_str()
        .unwrap()
        .to_string();

    let s = env.json(&[
        "restore",
        &after,
        "--to",
        original.to_str().unwrap(),
        "--delta",
        "--base",
        &before,
    ]);
    assert!(
        same_content(&original, &recovered),
        "failback did not bring the changes home"
    );
    let skipped = s["bytes_skipped"].as_u64().unwrap();
    assert!(
        skipped > 40 * MIB,
        "only {skipped} bytes were known equal: {s}"
    );
    assert!(s["chunks_fetched"].as_u64().unwrap() <= 164, "{s}");
    assert!(s["bytes_written"].as_u64().unwrap() <= 164 * 4096, "{s}");

    // A disk that does not hold the base is refused before anything is written.
    let other = env.path("site-c/disk.img");
    env.ok(&["restore", &before, "--to", other.to_str().unwrap()]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&other)
        .unwrap();
    f.write_all_at(&[0xee; 4096], 0).unwrap();
    drop(f);
    let snapshot = std::fs::read(&other).unwrap();
    let o = env.run(&[
        "restore",
        &after,
        "--to",
        other.to_str().unwrap(),
        "--delta",
        "--base",
        &before,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("does not hold point"),
        "{}",
        common::stderr(&o)
    );
    assert_eq!(
        std::fs::read(&other).unwrap(),
        snapshot,
        "a refused restore wrote"
    );
}
