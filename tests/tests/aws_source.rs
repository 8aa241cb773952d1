//! The agentless AWS source against moto: an EC2 machine's EBS snapshots
//! backed up into a repository through the EBS direct APIs, the first whole
//! (only the blocks that hold data), the next incrementally from the
//! snapshot the previous point was taken from (ListChangedBlocks), each
//! restored byte for byte.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use common::servers::Moto;
use common::*;

#[test]
fn ebs_snapshots_are_backed_up_whole_then_incrementally_and_restore_exactly() {
    let Some(moto) = Moto::start() else { return };
    // "The machine": its volume's two snapshots, made in moto through
    // `ferry restore --to ebs://` of a scratch repository.
    let machine = moto_env(&moto);
    machine.init();
    let img = machine.path("root.img");
    let size = 64u64 << 20;
    make_image(&img, size, 11);
    let v1 = machine.path("v1.img");
    std::fs::copy(&img, &v1).unwrap();
    let snap = |e: &Env, path: &std::path::Path| -> String {
        let p = e.backup("machine", &[path])["point"]
            .as_str()
            .unwrap()
            .to_owned();
        e.json(&["restore", &p, "--to", "ebs://"])["snapshot_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let snap1 = snap(&machine, &img);
    // 6 scattered 4 KiB writes, some into blocks that were zero before.
    scatter_writes(&img, 6, 5);
    let snap2 = snap(&machine, &img);
    assert_ne!(snap1, snap2);

    // Ferry protects the machine from outside: no agent in it.
    let e = moto_env(&moto);
    e.init();
    let full = e.json(&[
        "backup",
        "--source",
        "ec2-web",
        &format!("ebs://{snap1}?name=root"),
    ]);
    let p1 = full["point"].as_str().unwrap().to_owned();
    let inc = e.json(&[
        "backup",
        "--source",
        "ec2-web",
        &format!("ebs://{snap2}?name=root"),
    ]);
    let p2 = inc["point"].as_str().unwrap().to_owned();
    // The incremental read what changed, found through the earlier
    // snapshot recorded with the first point: far less than the disk.
    let read = |s: &serde_json::Value| s["bytes_read"].as_u64().unwrap();
    assert!(read(&full) > 0, "{full}");
    let changed = inc["changed_bytes"].as_u64().unwrap();
    assert!(
        changed > 0 && changed <= 6 * 2 * 512 * 1024,
        "6 writes changed {changed} bytes of 512 KiB blocks: {inc}"
    );
    assert!(
        read(&inc) < read(&full) / 4,
        "the incremental read {} of the full backup's {} bytes: {inc}",
        read(&inc),
        read(&full)
    );
    // (Both snapshots may carry the same start time, to the second: find
    // the incremental by its id, not by its place in the list.)
    let points = e.json(&["points", "--source", "ec2-web"]);
    let second = points
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == p2.as_str())
        .unwrap();
    assert_eq!(second["parent"], p1.as_str(), "{points}");
    let disk = &second["disks"][0];
    assert_eq!(disk["name"], "root", "{points}");
    assert_eq!(
        disk["changes"],
        format!("ebs:changed-blocks:{snap1}"),
        "{points}"
    );
    assert_eq!(
        disk["tracking"],
        format!("ebs:snapshot:{snap2}"),
        "{points}"
    );
    // Each point restores to its snapshot's content exactly.
    for (p, want) in [(&p1, &v1), (&p2, &img)] {
        let out = e.path(&format!("{p}.img"));
        e.ok(&["restore", p, "--to", out.to_str().unwrap()]);
        // EBS volumes are whole GiB: the content, then zeros.
        let got = std::fs::read(&out).unwrap();
        let want = std::fs::read(want).unwrap();
        assert_eq!(got.len() as u64, 1 << 30);
        assert!(
            got[..want.len()] == want[..],
            "point {p} differs from its snapshot"
        );
        assert!(got[want.len()..].iter().all(|&b| b == 0));
    }
    // Nothing that is not a completed snapshot is backed up.
    let out = e.run(&[
        "backup",
        "--source",
        "ec2-web",
        "ebs://snap-0000000000000dead",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("snap-0000000000000dead"),
        "{}",
        stderr(&out)
    );
    let out = e.run(&["backup", "--source", "ec2-web", "ebs://vol-1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
