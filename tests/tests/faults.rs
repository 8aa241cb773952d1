//! Backups and restores through a store that fails on purpose (FERRY_FAULTS):
//! errors, 503 SlowDown, resets, short bodies, lost answers, hung requests and
//! an outage. Everything completes or stops cleanly, nothing unverified is
//! committed or written, and an interrupted backup resumes without uploading
//! again what landed.

mod common;

use common::{Env, make_image, same_content, scatter_writes, stderr};

const MIB: u64 = 1 << 20;

fn with_faults(env: &Env, spec: &str, extra: &[(&str, &str)]) -> Env {
    let mut vars = vec![("FERRY_FAULTS".to_string(), spec.to_string())];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut e = Env::at(&env.location, vars);
    e.repo = env.repo.clone();
    e
}

fn retries(v: &serde_json::Value) -> u64 {
    v["requests"]["retries"].as_u64().expect("retries counted")
}

#[test]
fn backup_and_restore_complete_under_five_percent_faults() {
    let env = Env::new();
    env.init();
    let disk = env.path("disk.img");
    make_image(&disk, 40 * MIB, 41);
    let mut total_retries = 0;
    // Two rounds at the 5%, and one at 25% so that every kind of
    // fault certainly happens in a repository this small (a few dozen requests).
    for (i, (seed, rate)) in [(3u64, 0.05), (4, 0.05), (5, 0.25)].into_iter().enumerate() {
        let faulty = with_faults(
            &env,
            &format!("rate={rate} seed={seed} kinds=error+slowdown+reset+partial+lost"),
            &[],
        );
        if i > 0 {
            scatter_writes(&disk, 50, seed);
        }
        let b = faulty.backup("vm", &[&disk]);
        total_retries += retries(&b);
        let out = env.path(&format!("r{i}.img"));
        let r = faulty.json(&["restore", "vm@latest", "--to", out.to_str().unwrap()]);
        total_retries += retries(&r);
        assert!(same_content(&disk, &out), "restore {i} differs");
        let c = faulty.json(&["check", "--read-data"]);
        assert_eq!(c["ok"], true, "{c}");
        total_retries += retries(&c);
    }
    // Which requests fail is fixed by the seeds; a few dozen requests in all.
    assert!(
        total_retries >= 3,
        "faults were injected but nothing retried ({total_retries})"
    );
    // Without faults the repository is just as sound.
    let c = env.json(&["check", "--read-data"]);
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(env.json(&["points"]).as_array().unwrap().len(), 3);
    // No point was committed with a missing or damaged chunk: every one restores.
    for p in env.json(&["points"]).as_array().unwrap() {
        let out = env.path("any.img");
        env.ok(&[
            "restore",
            p["id"].as_str().unwrap(),
            "--to",
            out.to_str().unwrap(),
            "--overwrite",
        ]);
    }
}

#[test]
fn hung_requests_time_out_and_are_retried() {
    let env = Env::new();
    env.init();
    let disk = env.path("disk.img");
    make_image(&disk, 24 * MIB, 42);
    let faulty = with_faults(
        &env,
        "rate=0.08 seed=11 kinds=hang hang=5s",
        &[("FERRY_STORE_TIMEOUT", "0.4")],
    );
    let started = std::time::Instant::now();
    let b = faulty.backup("vm", &[&disk]);
    assert!(retries(&b) >= 1, "{b}");
    // Every hang was cut at the timeout, not waited out.
    assert!(
        started.elapsed().as_secs_f64() < 5.0 * retries(&b) as f64,
        "hangs were waited out"
    );
    let out = env.path("r.img");
    env.ok(&["restore", "vm@latest", "--to", out.to_str().unwrap()]);
    assert!(same_content(&disk, &out));
}

#[test]
fn persistent_failure_gives_up_with_a_clear_error_and_commits_nothing() {
    let env = Env::new();
    env.init();
    let disk = env.path("disk.img");
    make_image(&disk, 8 * MIB, 43);
    let faulty = with_faults(
        &env,
        "rate=1 kinds=slowdown",
        &[("FERRY_STORE_ATTEMPTS", "3")],
    );
    let out = faulty.run(&["backup", "--source", "vm", disk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("SlowDown"), "{err}");
    // The error names the object and the cause.
    assert!(err.contains("config"), "{err}");
    assert!(env.json(&["points"]).as_array().unwrap().is_empty());
}

#[test]
fn backup_cut_by_an_outage_resumes_without_uploading_again() {
    let env = Env::new();
    env.init();
    let disk = env.path("disk.img");
    make_image(&disk, 64 * MIB, 44);

    // A full backup in a scratch repository, for the bytes it uploads.
    let scratch = Env::new();
    scratch.init();
    let b = scratch.backup("vm", &[&disk]);
    // The outage starts with the first index write: after every pack has
    // landed, before any is indexed or the point is committed. (A cut by
    // request count raced the concurrent pack uploads: whichever pack was
    // sent last fell inside the outage.)
    let cut = with_faults(&env, "outage-from=index/", &[("FERRY_STORE_ATTEMPTS", "2")]);
    let out = cut.run(&["backup", "--source", "vm", disk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(env.json(&["points"]).as_array().unwrap().is_empty());
    let c = env.json(&["check"]);
    assert_eq!(c["ok"], true, "{c}");
    assert!(!c["unindexed_packs"].as_array().unwrap().is_empty(), "{c}");

    let resumed = env.backup("vm", &[&disk]);
    assert!(
        resumed["packs_recovered"].as_u64().unwrap() >= 1,
        "{resumed}"
    );
    let up = resumed["requests"]["bytes_up"].as_u64().unwrap();
    let full = b["requests"]["bytes_up"].as_u64().unwrap();
    assert!(
        up * 10 < full,
        "the resumed backup uploaded {up} of {full} bytes again"
    );
    let out = env.path("r.img");
    env.ok(&["restore", "vm@latest", "--to", out.to_str().unwrap()]);
    assert!(same_content(&disk, &out));
}

#[test]
fn bad_fault_specs_are_usage_errors() {
    let env = Env::new();
    env.init();
    let faulty = with_faults(&env, "rate=7", &[]);
    let out = faulty.run(&["points"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("rate"), "{}", stderr(&out));
}
