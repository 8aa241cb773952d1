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
