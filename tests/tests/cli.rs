//! The `ferry` command end to end: init, backup, incremental, points, restore,
//! check, several sources, concurrent backups, and clear errors for bad input.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;

#[test]
fn backup_incremental_restore_round_trip() {
    let env = Env::new();
    env.init();
    let disk = env.path("web.img");
    make_image(&disk, 24 << 20, 1);

    let full = env.backup("web", &[&disk]);
    let point1 = full["point"].as_str().unwrap().to_string();
    // Holes were not read; real data was stored once.
    assert!(full["bytes_read"].as_u64().unwrap() < 24 << 20);
    assert!(full["new_bytes"].as_u64().unwrap() > 0);

    // An unchanged disk adds nothing.
    let same = env.backup("web", &[&disk]);
    assert_eq!(same["new_bytes"], 0, "{same}");
    assert_eq!(same["parent"], full["point"]);

    // Forty 4 KiB writes add at most forty chunks.
    let before = std::fs::read(&disk).unwrap();
    scatter_writes(&disk, 40, 7);
    let inc = env.backup("web", &[&disk]);
    let new = inc["new_bytes"].as_u64().unwrap();
    assert!(
        new > 0 && new <= 40 * 64 * 1024,
        "incremental stored {new} bytes"
    );

    // Both points restore byte-identical; the restore is sparse.
    let out = env.path("out");
    std::fs::create_dir(&out).unwrap();
    env.ok(&["restore", &point1[..10], "--to", out.to_str().unwrap()]);
    let restored = out.join("web.img");
    assert_eq!(std::fs::read(&restored).unwrap(), before);
    let meta = std::fs::metadata(&restored).unwrap();
    assert!(meta.blocks() * 512 < meta.len(), "restore is not sparse");

    let latest = env.path("latest.img");
    env.ok(&["restore", "web@latest", "--to", latest.to_str().unwrap()]);
    assert!(same_content(&latest, &disk));

    // Restoring onto an existing file is refused unless asked.
    let again = env.run(&["restore", "web@latest", "--to", latest.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    env.ok(&[
        "restore",
        "web@latest",
        "--to",
        latest.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(same_content(&latest, &disk));

    let check = env.json(&["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    assert_eq!(check["points"], 3);
}

#[test]
fn points_listing_and_references() {
    let env = Env::new();
    env.init();
    let a = env.path("a.img");
    let b = env.path("b.img");
    make_image(&a, 4 << 20, 2);
    make_image(&b, 4 << 20, 3);
    let pa = env.backup("db", &[&a, &b]);
    let pb = env.backup("web", &[&b]);

    let all = env.json(&["points"]);
    assert_eq!(all.as_array().unwrap().len(), 2);
    let db = env.json(&["points", "--source", "db"]);
    assert_eq!(db.as_array().unwrap().len(), 1);
    assert_eq!(db[0]["id"], pa["point"]);
    assert_eq!(db[0]["disks"].as_array().unwrap().len(), 2);
    assert_eq!(db[0]["consistency"], "crash");

    let human = env.ok(&["points"]);
    assert!(human.contains("db") && human.contains("web") && human.contains("2 recovery point(s)"));

    // A multi-disk point restores into a directory, one file per disk.
    let out = env.path("dbout");
    std::fs::create_dir(&out).unwrap();
    env.ok(&["restore", "db@latest", "--to", out.to_str().unwrap()]);
    assert!(same_content(&out.join("a.img"), &a));
    assert!(same_content(&out.join("b.img"), &b));
    // ... or one disk to a file.
    let one = env.path("one.img");
    env.ok(&[
        "restore",
        pb["point"].as_str().unwrap(),
        "--to",
        one.to_str().unwrap(),
        "--disk",
        "b.img",
    ]);
    assert!(same_content(&one, &b));

    // A time before any point, and an unknown source, name the problem.
    let o = env.run(&["restore", "db@2001-01-01", "--to", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no recovery point of source \"db\""),
        "{}",
        stderr(&o)
    );
    let o = env.run(&["restore", "zzzz", "--to", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn concurrent_backups_to_one_repository() {
    let env = Env::new();
    env.init();
    let disks: Vec<_> = (0..2)
        .map(|i| {
            let p = env.path(&format!("d{i}.img"));
            make_image(&p, 32 << 20, 10 + i);
            p
        })
        .collect();
    let children: Vec<_> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            env.cmd()
                .args(["backup", "--source", &format!("vm{i}"), d.to_str().unwrap()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(env.json(&["check", "--read-data"])["ok"], true);
    for (i, d) in disks.iter().enumerate() {
        let out = env.path(&format!("r{i}.img"));
        env.ok(&[
            "restore",
            &format!("vm{i}@latest"),
            "--to",
            out.to_str().unwrap(),
        ]);
        assert!(same_content(&out, d));
    }
}

#[test]
fn interrupted_restore_resumes() {
    let env = Env::new();
    env.init();
    let disk = env.path("d.img");
    make_image(&disk, 16 << 20, 4);
    env.backup("vm", &[&disk]);

    // A partial restore left behind: mostly right, but its first MiB (data) and its
    // last 4 MiB (a hole in the source) hold garbage.
    let target = env.path("restored.img");
    let partial = env.path("restored.img.ferry-partial");
    let mut content = std::fs::read(&disk).unwrap();
    let len = content.len();
    Rng(99).fill(&mut content[..1 << 20]);
    Rng(98).fill(&mut content[len - (4 << 20)..]);
    std::fs::write(&partial, &content).unwrap();

    let s = env.json(&["restore", "vm@latest", "--to", target.to_str().unwrap()]);
    assert_eq!(s["disks"][0]["resumed"], true);
    assert!(s["chunks_kept"].as_u64().unwrap() > 0, "{s}");
    assert!(s["chunks_fetched"].as_u64().unwrap() > 0, "{s}");
    assert!(same_content(&target, &disk));
    assert!(!partial.exists());
}

#[test]
fn bad_input_gets_clear_errors_and_exit_codes() {
    let env = Env::new();

    // No repository yet.
    let o = env.run(&["points"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("ferry -r") && stderr(&o).contains("init"),
        "{}",
        stderr(&o)
    );

    // A pack size outside what a repository may have is refused before
    // anything is written, naming the range.
    let o = env.run(&["init", "--pack-size", "2MiB"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("4 to 128 MiB"), "{}", stderr(&o));
    assert!(!env.repo.exists(), "a refused init created {:?}", env.repo);
    let o = env.run(&["init", "--pack-size", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("pack size \"lots\""), "{}", stderr(&o));

    env.init();
    // init twice changes nothing.
    let o = env.run(&["init"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("already exists"));

    // Wrong password.
    let o = env
        .cmd()
        .env("FERRY_PASSWORD", "wrong")
        .args(["points"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("wrong password"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("correct horse"));

    // Password from a file works; a missing file is named.
    let pwf = env.path("pw");
    std::fs::write(&pwf, "correct horse\n").unwrap();
    let o = env
        .cmd()
        .env_remove("FERRY_PASSWORD")
        .args(["points", "--password-file", pwf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env
        .cmd()
        .env_remove("FERRY_PASSWORD")
        .args(["points", "--password-file", "/nonexistent/pw"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/pw"));

    // Unreadable sources.
    let o = env.run(&["backup", "--source", "x", "/nonexistent/disk.img"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("/nonexistent/disk.img"),
        "{}",
        stderr(&o)
    );
    let o = env.run(&["backup", "--source", "x", env.dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("neither an image file nor a block device"));
    let o = env.run(&["backup", "--source", "bad@name", "/dev/null"]);
    assert_eq!(o.status.code(), Some(2));

    // Nothing was committed by the failures.
    assert_eq!(env.json(&["points"]).as_array().unwrap().len(), 0);

    // A restore thread count that is not one is refused, naming the variable.
    let disk = env.path("small.img");
    make_image(&disk, 4 << 20, 7);
    env.backup("vm", &[&disk]);
    let target = env.path("threads.img");
    let restore_on = |threads: &str| {
        env.cmd()
            .env("FERRY_RESTORE_THREADS", threads)
            .args(["restore", "vm@latest", "--to", target.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let o = restore_on("lots");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("FERRY_RESTORE_THREADS=\"lots\""),
        "{}",
        stderr(&o)
    );
    let o = restore_on("1");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(same_content(&target, &disk));

    // A repository written by a newer format version.
    let config = env.repo.join("config");
    let mut bytes = std::fs::read(&config).unwrap();
    bytes[5] = 3;
    std::fs::write(&config, &bytes).unwrap();
    let o = env.run(&["points"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("format version 3") && stderr(&o).contains("upgrade ferry"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn odd_sized_disk_across_list_spans() {
    let env = Env::new();
    env.init();
    // Past one 64 MiB chunk-list span, with a size no chunk or block divides.
    let disk = env.path("odd.img");
    let size = (64u64 << 20) + (3 << 20) + 4097;
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng(61);
    let mut block = vec![0u8; 70_000];
    for at in [0, 10 << 20, (64 << 20) - 30_000, size - 70_000] {
        rng.fill(&mut block);
        std::os::unix::fs::FileExt::write_all_at(&f, &block, at).unwrap();
    }
    drop(f);
    env.backup("odd", &[&disk]);
    let pts = env.json(&["points"]);
    assert_eq!(pts[0]["disks"][0]["size"], size);
    let out = env.path("odd.out");
    env.ok(&["restore", "odd@latest", "--to", out.to_str().unwrap()]);
    assert!(same_content(&out, &disk));
    assert_eq!(env.json(&["check", "--read-data"])["ok"], true);
}
