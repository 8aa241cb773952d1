//! `ferry copy`: recovery points moved, with their data, into another
//! repository in another store (S3 on moto) with its own password, killed
//! half-way and resumed.

mod common;

use std::time::Duration;

use common::servers::Moto;
use common::{Env, Rng, make_image, same_content, scatter_writes};

const MIB: u64 = 1 << 20;

#[test]
fn points_copy_to_another_cloud_under_another_password_and_resume_after_a_kill() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("copies", false);
    let mut env = Env::new();
    env.vars = moto.env();
    env.init();
    let disk = env.path("disk.img");
    make_image(&disk, 48 * MIB, 3);
    let mut want = Vec::new();
    for round in 0..3u64 {
        if round > 0 {
            scatter_writes(&disk, 60, round);
        }
        let id = env.backup("db", &[&disk])["point"]
            .as_str()
            .unwrap()
            .to_string();
        let snap = env.path(&format!("want-{round}.img"));
        std::fs::copy(&disk, &snap).unwrap();
        want.push((id, snap));
    }

    // The destination: another store, another password.
    let dest = "s3://copies/offsite";
    let mut to = Env::at(dest, moto.env());
    to.dir = tempfile::tempdir_in(env.dir.path()).unwrap();
    let pw = |e: &Env, p: &str| {
        let mut c = e.cmd();
        c.env("FERRY_PASSWORD", p);
        c
    };
    let o = pw(&to, "another secret phrase")
        .arg("init")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let copy_cmd = || {
        let mut c = env.cmd();
        c.env("FERRY_TO_PASSWORD", "another secret phrase")
            .args(["--json", "copy", "--to", dest]);
        c
    };

    // Killed early (while it reads or writes the first points), then run
    // again: it finishes what the killed run left.
    let mut rng = Rng(0xc0fe);
    common::kill_after(&mut copy_cmd(), Duration::from_millis(50 + rng.below(400)));
    let o = copy_cmd().output().unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let copied = r["points"].as_array().unwrap().clone();
    assert_eq!(copied.len(), 3, "{r}");

    // A new point is copied as its difference from the one copied before.
    scatter_writes(&disk, 60, 7);
    let id = env.backup("db", &[&disk])["point"]
        .as_str()
        .unwrap()
        .to_string();
    let snap = env.path("want-3.img");
    std::fs::copy(&disk, &snap).unwrap();
    want.push((id.clone(), snap));
    let o = copy_cmd().output().unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut copied = copied;
    let fresh: Vec<_> = r["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["already"] == false)
        .cloned()
        .collect();
    assert_eq!(fresh.len(), 1, "{r}");
    assert_eq!(fresh[0]["from"], id.as_str(), "{r}");
    assert_eq!(fresh[0]["incremental"], true, "{r}");
    assert!(fresh[0]["bytes_read"].as_u64().unwrap() < 16 * MIB, "{r}");
    copied.push(fresh[0].clone());

    // Each copy restores, from the destination alone, to its point's image,
    // and carries the point's source and time.
    let listed = pw(&to, "another secret phrase")
        .args(["--json", "points"])
        .output()
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let src_points = env.json(&["points"]);
    for (c, (from, snap)) in copied.iter().zip(&want) {
        assert_eq!(c["from"], from.as_str());
        let to_id = c["to"].as_str().unwrap();
        let src_time = src_points
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == from.as_str())
            .unwrap()["time"]
            .clone();
        let dst = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == to_id)
            .unwrap();
        assert_eq!(dst["time"], src_time);
        assert_eq!(dst["source"], "db");
        let out = env.path("out.img");
        let o = pw(&to, "another secret phrase")
            .args(["restore", to_id, "--to", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", common::stderr(&o));
        assert!(same_content(&out, snap), "copy of {from} differs");
        std::fs::remove_file(&out).unwrap();
    }
    // The source's password does not open the copy, and the copy checks clean.
    let o = pw(&to, "correct horse").arg("points").output().unwrap();
    assert!(!o.status.success());
    assert!(
        common::stderr(&o).contains("password"),
        "{}",
        common::stderr(&o)
    );
    let o = pw(&to, "another secret phrase")
        .args(["--json", "check", "--read-data"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));

    // Copying again copies nothing.
    let o = copy_cmd().output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        r["points"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["already"] == true),
        "{r}"
    );
    // A destination that is the source itself is refused.
    let mut c = env.cmd();
    c.env("FERRY_TO_PASSWORD", "correct horse")
        .args(["copy", "--to", &env.location]);
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
}
