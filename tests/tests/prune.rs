//! forget and prune: retention, space reclaimed, and every overlap with other
//! operations (the concurrency table in ARCHITECTURE.md), plus prune killed
//! with SIGKILL at random moments.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Env, Rng, make_image, same_content, scatter_writes, stderr};

const MIB: u64 = 1 << 20;

fn dir_bytes(dir: &Path) -> u64 {
    common::files_under(dir)
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn ids(env: &Env) -> Vec<String> {
    env.json(&["points"])
        .as_array()
        .expect("test helper")
        .iter()
        .map(|p| p["id"].as_str().expect("test helper").to_string())
        .collect()
}

fn restore_same(env: &Env, point: &str, want: &Path) {
    let out = env.path(&format!("check-{}.img", &point[..point.len().min(12)]));
    let _ = std::fs::remove_file(&out);
    env.ok(&[
        "restore",
        point,
        "--to",
        out.to_str().expect("test helper"),
        "--overwrite",
    ]);
    assert!(
        same_content(want, &out),
        "{point} does not restore to what was backed up"
    );
    std::fs::remove_file(&out).expect("test helper");
}

/// Start ferry slowed down by latency on every request, in the background.
fn slow(env: &Env, latency: &str, args: &[&str]) -> Child {
    env.cmd()
        .env("FERRY_FAULTS", format!("latency={latency}"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferry starts")
}

fn wait_for_lock(env: &Env, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::files_under(&env.repo.join("locks")).is_empty() {
        assert!(
            child.try_wait().expect("test helper").is_none(),
            "the operation ended before it was seen running"
        );
        assert!(Instant::now() < deadline, "no lock appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn finish(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().expect("test helper");
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

#[test]
fn forget_by_policy_and_prune_reclaim_space_and_keep_the_rest() {
    let env = Env::new();
    env.init();
    let disk = env.path("disk.img");
    let mut kept_images = Vec::new();
    for seed in 0..4u64 {
        // Mostly new data each time, so old points own packs of their own.
        make_image(&disk, 24 * MIB, 100 + seed);
        env.backup("web", &[&disk]);
        let copy = env.path(&format!("v{seed}.img"));
        std::fs::copy(&disk, &copy).unwrap();
        kept_images.push(copy);
    }
    make_image(&disk, 8 * MIB, 200);
    env.backup("db", &[&disk]);

    let dry = env.json(&["forget", "--keep-last", "2", "--dry-run"]);
    assert_eq!(dry["removed"], 0);
    assert_eq!(ids(&env).len(), 5, "a dry run removed points");
    let f = env.json(&["forget", "--keep-last", "2"]);
    // web keeps its 2 newest; db has only one and keeps it.
    assert_eq!(f["removed"], 2, "{f}");
    assert_eq!(ids(&env).len(), 3);

    let before = dir_bytes(&env.repo);
    let dry = env.json(&["prune", "--dry-run"]);
    assert!(dry["condemned_packs"].as_u64().unwrap() > 0, "{dry}");
    assert_eq!(
        dir_bytes(&env.repo),
        before,
        "a dry run changed the repository"
    );
    let p = env.json(&["prune"]);
    assert!(p["deleted_packs"].as_u64().unwrap() > 0, "{p}");
    assert_eq!(p["pending_packs"], 0, "{p}");
    let after = dir_bytes(&env.repo);
    assert!(
        after * 10 < before * 7,
        "prune freed too little: {before} -> {after}"
    );
    assert!(common::files_under(&env.repo.join("trash")).is_empty());
    assert!(common::files_under(&env.repo.join("locks")).is_empty());

    let c = env.json(&["check", "--read-data"]);
    assert_eq!(c["ok"], true, "{c}");
    assert!(c["unindexed_packs"].as_array().unwrap().is_empty(), "{c}");
    let points = env.json(&["points", "--source", "web"]);
    for (p, want) in points.as_array().unwrap().iter().zip(&kept_images[2..]) {
        restore_same(&env, p["id"].as_str().unwrap(), want);
    }
    restore_same(&env, "db@latest", &disk);
    // A second prune finds nothing to do.
    let again = env.json(&["prune"]);
    assert_eq!(again["condemned_packs"], 0, "{again}");
}

#[test]
fn prune_repacks_packs_that_are_mostly_unused() {
    let env = Env::new();
    env.init();
    let disk = env.path("disk.img");
    make_image(&disk, 32 * MIB, 300);
    let old = env.backup("vm", &[&disk])["point"]
        .as_str()
        .unwrap()
        .to_string();
    // Rewrite many scattered 64 KiB blocks: the old chunks die in every pack.
    let mut rng = Rng(5);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    for _ in 0..200 {
        let mut buf = vec![0u8; 64 << 10];
        rng.fill(&mut buf);
        let block = rng.below(32 * MIB / (64 << 10));
        std::os::unix::fs::FileExt::write_all_at(&f, &buf, block * (64 << 10)).unwrap();
    }
    drop(f);
    env.backup("vm", &[&disk]);
    env.ok(&["forget", &old]);
    let p = env.json(&["prune", "--max-unused", "5"]);
    assert!(p["repacked_packs"].as_u64().unwrap() >= 1, "{p}");
    assert!(p["repacked_bytes"].as_u64().unwrap() > 0, "{p}");
    assert!(p["live_bytes"].as_u64().unwrap() < p["stored_bytes"].as_u64().unwrap());
    let c = env.json(&["check", "--read-data"]);
    assert_eq!(c["ok"], true, "{c}");
    restore_same(&env, "vm@latest", &disk);
}

/// prune ‖ backup: the backup read the index before prune condemned the packs
/// its point reuses. Prune must wait for it, and then put those packs back.
#[test]
fn prune_during_a_backup_that_reuses_condemned_data() {
    let env = Env::new();
    env.init();
    let disk = env.path("disk.img");
    make_image(&disk, 24 * MIB, 400);
    let old = env.backup("old", &[&disk])["point"]
        .as_str()
        .unwrap()
        .to_string();
    // The same disk, a little changed, under another source: it dedups almost
    // entirely against the packs of `old`.
    scatter_writes(&disk, 10, 8);
    // Slow uploads, quick reads: the backup has read the index long before
    // it commits anything.
    let mut backup = env
        .cmd()
        .env("FERRY_FAULTS", "put-latency=3s")
        .args([
            "--json",
            "backup",
            "--source",
            "new",
            disk.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_lock(&env, &mut backup);
    std::thread::sleep(Duration::from_millis(700));
    env.ok(&["forget", &old]);
    let p = env.json(&["prune"]);
    assert!(p["condemned_packs"].as_u64().unwrap() >= 1, "{p}");
    assert!(p["pending_packs"].as_u64().unwrap() >= 1, "{p}");
    assert_eq!(
        p["deleted_packs"], 0,
        "prune deleted while a backup could use the data: {p}"
    );
    assert!(p["waiting_for"].to_string().contains("backup"), "{p}");
    finish(backup);

    // Right after, before any prune: the new point restores and checks clean.
    restore_same(&env, "new@latest", &disk);
    let c = env.json(&["check", "--read-data"]);
    assert_eq!(c["ok"], true, "{c}");
    // The next prune puts back what the new point uses instead of deleting it.
    let p = env.json(&["prune"]);
    assert!(p["restored_packs"].as_u64().unwrap() >= 1, "{p}");
    assert!(
        common::files_under(&env.repo.join("trash")).is_empty(),
        "{p}"
    );
    restore_same(&env, "new@latest", &disk);
    let c = env.json(&["check", "--read-data"]);
    assert_eq!(c["ok"], true, "{c}");
    // A later backup dedups against the restored packs again.
    let b = env.backup("new", &[&disk]);
    assert!(b["requests"]["bytes_up"].as_u64().unwrap() < 2 * MIB, "{b}");
}

/// prune ‖ restore and prune ‖ check: the point being restored is forgotten
/// and pruned meanwhile; its packs stay until the restore and the check end.
#[test]
fn prune_during_a_restore_and_a_check() {
    let env = Env::new();
    env.init();
    let a = env.path("a.img");
    let b = env.path("b.img");
    make_image(&a, 24 * MIB, 500);
    make_image(&b, 8 * MIB, 501);
    let pa = env.backup("a", &[&a])["point"]
        .as_str()
        .unwrap()
        .to_string();
    env.backup("b", &[&b]);
    let out = env.path("out.img");
    let mut restore = slow(
        &env,
        "700ms",
        &["restore", &pa, "--to", out.to_str().unwrap()],
    );
    wait_for_lock(&env, &mut restore);
    let check = slow(&env, "700ms", &["--json", "check", "--read-data"]);
    env.ok(&["forget", &pa]);
    let p = env.json(&["prune"]);
    assert!(p["pending_packs"].as_u64().unwrap() >= 1, "{p}");
    assert_eq!(p["deleted_packs"], 0, "{p}");
    finish(restore);
    assert!(
        same_content(&a, &out),
        "the restore read data prune removed"
    );
    let c = finish(check);
    assert_eq!(
        c["ok"], true,
        "a check running during prune saw damage: {c}"
    );
    let p = env.json(&["prune"]);
    assert!(p["deleted_packs"].as_u64().unwrap() >= 1, "{p}");
    let c = env.json(&["check", "--read-data"]);
    assert_eq!(c["ok"], true, "{c}");
    restore_same(&env, "b@latest", &b);
}

/// prune ‖ prune: the second one steps back with a clear message.
#[test]
fn two_prunes_never_run_at_once() {
    let env = Env::new();
    env.init();
    let a = env.path("a.img");
    make_image(&a, 16 * MIB, 600);
    let pa = env.backup("a", &[&a])["point"]
        .as_str()
        .unwrap()
        .to_string();
    make_image(&a, 16 * MIB, 601);
    env.backup("a", &[&a]);
    env.ok(&["forget", &pa]);
    let mut first = slow(&env, "500ms", &["prune"]);
    wait_for_lock(&env, &mut first);
    let second = env.run(&["prune"]);
    assert_ne!(second.status.code(), Some(0));
    assert!(
        stderr(&second).contains("another prune"),
        "{}",
        stderr(&second)
    );
    finish(first);
    let c = env.json(&["check", "--read-data"]);
    assert_eq!(c["ok"], true, "{c}");
    restore_same(&env, "a@latest", &a);
}

/// prune killed at random moments: the repository stays valid after each kill
/// and the next prune finishes the job. Every round gives prune new work (a new
/// point, the previous one forgotten), and rounds go on until at least three
/// prunes were killed mid-way.
#[test]
fn prune_killed_at_random_moments_leaves_a_valid_repository() {
    let env = Env::new();
    env.init();
    let disk = env.path("disk.img");
    let mut rng = Rng(77);
    let mut killed_midway = 0;
    for round in 0..16u64 {
        make_image(&disk, 12 * MIB, 700 + round);
        env.backup("vm", &[&disk]);
        env.ok(&["forget", "--keep-last", "1"]);
        let mut child = slow(&env, "40ms", &["prune"]);
        std::thread::sleep(Duration::from_millis(100 + rng.below(1200)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed_midway += 1;
        }
        let _ = child.wait();
        let c = env.json(&["check"]);
        assert_eq!(c["ok"], true, "damage after a killed prune: {c}");
        restore_same(&env, "vm@latest", &disk);
        if killed_midway >= 3 && round >= 4 {
            break;
        }
    }
    assert!(
        killed_midway >= 3,
        "only {killed_midway} prunes were killed mid-way"
    );
    // Locks of killed prunes belong to dead processes: the next prune goes on
    // and leaves only what the one remaining point needs.
    let p = env.json(&["prune"]);
    assert_eq!(p["pending_packs"], 0, "{p}");
    let p = env.json(&["prune"]);
    assert_eq!(p["condemned_packs"], 0, "{p}");
    assert!(common::files_under(&env.repo.join("trash")).is_empty());
    let c = env.json(&["check", "--read-data"]);
    assert_eq!(c["ok"], true, "{c}");
    assert!(c["unindexed_packs"].as_array().unwrap().is_empty(), "{c}");
    let stats = env.json(&["stats"]);
    assert!(
        stats["pack_bytes"].as_u64().unwrap() < 12 * MIB,
        "space of forgotten points was not reclaimed: {stats}"
    );
    restore_same(&env, "vm@latest", &disk);
}
