//! kill -9 during backups: a backup killed after a pack landed leaves packs the
//! next backup adopts, and at random moments the repository stays valid and the
//! next backup completes.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

#[test]
fn kill_9_during_backups_leaves_a_valid_repository() {
    let env = Env::new();
    env.init();
    let disk = env.path("big.img");
    let size = 96u64 << 20;
    random_image(&disk, size, 5);
    // Reuse: kill the first backup of the repository (so no committed point
    // holds its data) as soon as a pack has landed; the next backup must adopt
    // the packs it left instead of uploading their chunks again.
    // Landed packs only: object_store stages uploads as `NAME#N` before a rename.
    let packs = |env: &Env| {
        files_under(&env.repo.join("packs"))
            .iter()
            .filter(|p| !p.to_string_lossy().contains('#'))
            .count()
    };
    let mut reuse = None;
    for _ in 0..5 {
        let env = Env::new();
        env.init();
        let mut child = env
            .cmd()
            .args(["--json", "backup", "--source", "vm", disk.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        while packs(&env) == 0 && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.kill(); // SIGKILL
        // One that finished before the kill proves nothing: try again afresh.
        if !child.wait().unwrap().success() {
            reuse = Some(env);
            break;
        }
    }
    let reuse = reuse.expect("no backup was killed after its first pack landed");
    let left = packs(&reuse);
    assert!(
        reuse.json(&["points"]).as_array().unwrap().is_empty(),
        "the killed backup committed a point"
    );
    let next = reuse.backup("vm", &[&disk]);
    assert!(
        next["packs_recovered"].as_u64().unwrap() >= 1,
        "the {left} pack(s) a killed backup left were not adopted: {next}"
    );
    assert!(
        next["new_bytes"].as_u64().unwrap() < size - (8 << 20),
        "chunks already in the adopted packs were uploaded again: {next}"
    );

    // The trials are incremental backups, far quicker than the full one:
    // their kill times are spread over how long one of them takes (spread
    // over the full backup's time, most kills landed after the end).
    env.backup("vm", &[&disk]);
    scatter_writes(&disk, 8, 999);
    let t = std::time::Instant::now();
    env.backup("vm", &[&disk]);
    let incremental = t.elapsed();

    let mut rng = Rng(0xfe77);
    // At least 20 trials, and more (up to 60) until 5 of them were killed
    // mid-way: under load from other tests, the measured time above can be
    // far longer than a trial's, and most kills would land after the end.
    let (min_trials, max_trials, min_killed) = (20, 60, 5);
    let mut killed = 0;
    let mut trials = 0;
    for trial in 0..max_trials {
        if trial >= min_trials && killed >= min_killed {
            break;
        }
        trials += 1;
        // Each trial writes a few new blocks, so there is always something new to store.
        scatter_writes(&disk, 8, 1000 + trial);
        let mut child = env
            .cmd()
            .args(["--json", "backup", "--source", "vm", disk.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Somewhere between start-up and well past the end of the upload.
        let delay = Duration::from_micros(rng.below(incremental.as_micros() as u64 * 12 / 10 + 1));
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            killed += 1;
        }
        // The repository is valid after every kill.
        let check = env.json(&["check"]);
        assert_eq!(
            check["ok"], true,
            "trial {trial} (killed after {delay:?}): {check}"
        );
    }

    assert!(
        killed >= min_killed,
        "only {killed} of {trials} backups were killed mid-way"
    );

    // The next backup completes and restores exactly.
    env.backup("vm", &[&disk]);
    assert_eq!(env.json(&["check", "--read-data"])["ok"], true);
    let out = env.path("out.img");
    env.ok(&["restore", "vm@latest", "--to", out.to_str().unwrap()]);
    assert!(same_content(&out, &disk));
}

#[test]
fn kill_9_during_restore_then_resume() {
    let env = Env::new();
    env.init();
    let disk = env.path("d.img");
    make_image(&disk, 64 << 20, 77);
    env.backup("vm", &[&disk]);
    let target = env.path("restored.img");
    let probe = env.path("probe.img");
    let t = std::time::Instant::now();
    env.ok(&["restore", "vm@latest", "--to", probe.to_str().unwrap()]);
    let full = t.elapsed();

    // Kills land in the last two thirds of a restore's time (the first third is
    // mostly key derivation), until three restores were killed while writing.
    let mut resumed = 0;
    let mut rng = Rng(0xabc);
    for _ in 0..20 {
        let mut child = env
            .cmd()
            .args(["restore", "vm@latest", "--to", target.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let third = full.as_micros() as u64 / 3;
        std::thread::sleep(Duration::from_micros(third + rng.below(2 * third + 1)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.success() {
            std::fs::remove_file(&target).unwrap();
            continue;
        }
        // A killed restore never leaves a partial file under the final name.
        // The kill can land after the rename and before the exit, so a file
        // that is there must be the whole disk.
        if target.exists() {
            assert!(
                same_content(&target, &disk),
                "a killed restore left a partial file"
            );
            std::fs::remove_file(&target).unwrap();
            continue;
        }
        let s = env.json(&["restore", "vm@latest", "--to", target.to_str().unwrap()]);
        if s["disks"][0]["resumed"] == true {
            resumed += 1;
        }
        assert!(same_content(&target, &disk));
        std::fs::remove_file(&target).unwrap();
        if resumed == 3 {
            break;
        }
    }
    assert!(resumed > 0, "no restore was killed mid-way in 20 tries");
}

/// Staging files (`NAME#DIGITS`) under a directory repository.
fn staged(env: &Env) -> Vec<std::path::PathBuf> {
    files_under(&env.repo)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| f.split_once('#'))
                .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect()
}

#[test]
fn a_write_killed_before_its_rename_leaves_a_file_prune_removes_once_it_is_stale() {
    let disk_env = Env::new();
    let disk = disk_env.path("big.img");
    let size = 128u64 << 20;
    random_image(&disk, size, 77);
    // Kill the backup while a pack's staging file exists; a kill that lands
    // after its rename proves nothing, so try again afresh.
    let mut killed = None;
    for _ in 0..5 {
        let env = Env::new();
        env.init();
        let mut child = env
            .cmd()
            .args(["--json", "backup", "--source", "vm", disk.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        while staged(&env).is_empty() && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        if !staged(&env).is_empty() {
            killed = Some(env);
            break;
        }
    }
    let env = killed.expect("no backup was killed with a staging file on disk in 5 tries");
    let left = staged(&env);
    let left_bytes: u64 = left
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();

    // A staging file this young may be a live writer's: prune keeps it.
    let p = env.json(&["prune"]);
    assert_eq!(p["unfinished_writes"], 0, "{p}");
    assert_eq!(staged(&env), left, "prune removed a fresh staging file");

    // Once older than a lock's lifetime its writer is gone.
    let old = std::time::SystemTime::now() - Duration::from_secs(31 * 60);
    for f in &left {
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    let dry = env.json(&["prune", "--dry-run"]);
    assert_eq!(dry["unfinished_writes"], left.len(), "{dry}");
    assert_eq!(staged(&env), left, "a dry run removed a staging file");
    let text = env.ok(&["prune", "--dry-run"]);
    assert!(
        text.contains(&format!(
            "would remove {} write(s) that never finished",
            left.len()
        )),
        "{text}"
    );
    let p = env.json(&["prune"]);
    assert_eq!(p["unfinished_writes"], left.len(), "{p}");
    assert_eq!(p["unfinished_bytes"], left_bytes, "{p}");
    assert!(staged(&env).is_empty(), "left: {:?}", staged(&env));

    // The repository is whole, and the next backup completes and restores exactly.
    assert_eq!(env.json(&["check"])["ok"], true);
    env.backup("vm", &[&disk]);
    assert_eq!(env.json(&["check", "--read-data"])["ok"], true);
    let out = env.path("out.img");
    env.ok(&["restore", "vm@latest", "--to", out.to_str().unwrap()]);
    assert!(same_content(&out, &disk));
    assert!(staged(&env).is_empty());
}
