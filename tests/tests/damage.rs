//! Damaged repositories: a flipped byte, a truncated object, a missing pack and a
//! garbage recovery point are each named by `check`, a restore of an affected point
//! fails naming the chunk and offset, and unaffected points still restore.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Two sources backed up separately, so their data sits in different packs.
/// Returns the packs that hold source `a`'s data.
fn two_sources(env: &Env) -> (PathBuf, PathBuf, Vec<PathBuf>) {
    env.init();
    let a = env.path("a.img");
    let b = env.path("b.img");
    make_image(&a, 8 << 20, 21);
    make_image(&b, 8 << 20, 22);
    env.backup("a", &[&a]);
    let packs_a = files_under(&env.repo.join("packs"));
    env.backup("b", &[&b]);
    (a, b, packs_a)
}

fn restore_to(env: &Env, point: &str, name: &str) -> (std::process::Output, PathBuf) {
    let out = env.path(name);
    (
        env.run(&["restore", point, "--to", out.to_str().unwrap()]),
        out,
    )
}

fn assert_b_still_restores(env: &Env, b: &Path) {
    let _ = std::fs::remove_file(env.path("b-restored.img"));
    let (o, out) = restore_to(env, "b@latest", "b-restored.img");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(same_content(&out, b));
}

fn point_id(env: &Env, source: &str) -> String {
    let pts = env.json(&["points", "--source", source]);
    pts[0]["id"].as_str().unwrap().to_string()
}

#[test]
fn flipped_byte_in_a_pack() {
    let env = Env::new();
    let (_a, b, packs_a) = two_sources(&env);
    let pack = &packs_a[0];
    let mut bytes = std::fs::read(pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(pack, &bytes).unwrap();
    let pack_name = pack.file_name().unwrap().to_str().unwrap();

    // Structure alone cannot see it; reading the data does, and names pack and point.
    assert_eq!(env.json(&["check"])["ok"], true);
    let o = env.run(&["check", "--read-data"]);
    assert_eq!(o.status.code(), Some(1));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.contains(pack_name), "{report}");
    assert!(report.contains(&point_id(&env, "a")[..8]), "{report}");
    assert!(!report.contains(&point_id(&env, "b")[..8]), "{report}");
    let json = env.json_allow_fail(&["check", "--read-data"]);
    assert_eq!(json["damaged_points"].as_array().unwrap().len(), 1);
    assert_eq!(json["damaged_points"][0]["source"], "a");

    let (o, _) = restore_to(&env, "a@latest", "a-restored.img");
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("chunk ") && err.contains("offset") && err.contains("a.img"),
        "{err}"
    );
    assert_b_still_restores(&env, &b);
}

#[test]
fn truncated_and_missing_packs() {
    let env = Env::new();
    let (_a, b, packs_a) = two_sources(&env);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&packs_a[0])
        .unwrap();
    f.set_len(1000).unwrap();
    let name = packs_a[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();

    let o = env.run(&["check"]);
    assert_eq!(o.status.code(), Some(1));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        report.contains(&name) && report.contains("truncated"),
        "{report}"
    );
    assert!(report.contains("cannot be fully restored"), "{report}");
    let (o, _) = restore_to(&env, "a@latest", "a1.img");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("chunk "), "{}", stderr(&o));

    std::fs::remove_file(&packs_a[0]).unwrap();
    let o = env.run(&["check"]);
    assert_eq!(o.status.code(), Some(1));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        report.contains(&name) && report.contains("missing"),
        "{report}"
    );
    let (o, _) = restore_to(&env, "a@latest", "a2.img");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing"), "{}", stderr(&o));
    assert_b_still_restores(&env, &b);
}

#[test]
fn garbage_recovery_point_and_truncated_index() {
    let env = Env::new();
    let (_a, b, _) = two_sources(&env);
    let id_a = point_id(&env, "a");
    let point = env.repo.join("points").join(&id_a);
    let mut bytes = std::fs::read(&point).unwrap();
    Rng(3).fill(&mut bytes[8..]);
    std::fs::write(&point, &bytes).unwrap();

    let o = env.run(&["check"]);
    assert_eq!(o.status.code(), Some(1));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.contains(&format!("points/{id_a}")), "{report}");
    // Listing still works and warns; restoring it names the object.
    let o = env.run(&["points"]);
    assert!(o.status.success());
    assert!(stderr(&o).contains(&id_a), "{}", stderr(&o));
    let o = env.run(&[
        "restore",
        &id_a,
        "--to",
        env.path("x.img").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("damaged"), "{}", stderr(&o));
    assert_b_still_restores(&env, &b);

    // A truncated index object is reported, and the next backup re-indexes its packs
    // from their tables, so nothing is lost.
    let index = files_under(&env.repo.join("index"));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&index[0])
        .unwrap();
    f.set_len(20).unwrap();
    let o = env.run(&["check"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("index/"));
    let c = env.path("c.img");
    make_image(&c, 1 << 20, 30);
    env.backup("c", &[&c]);
    assert_b_still_restores(&env, &b);
}
