//! A repository whose disk fills up during a backup: a clear error, nothing
//! committed, a valid repository, and the next backup (with space again)
//! completes and reuses what was written.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

/// A small tmpfs, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .ok()?
            .success();
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot resize the tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_repository_disk_then_resume() {
    let env = Env::new();
    // Two uploaders each write a pack of about 16 MiB at once, so a tmpfs
    // smaller than two packs can fail both writes and keep nothing. At 40 MiB
    // the first write that fails finds at least one whole pack already landed.
    let Some(fs) = Tmpfs::mount(&env.path("small"), "40m") else {
        skip_without_root("mount a tmpfs");
        return;
    };
    let repo = fs.0.join("repo");
    let run = |args: &[&str]| {
        env.cmd()
            .env("FERRY_REPO", &repo)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(run(&["init"]).status.success());
    // 64 MiB of random data cannot fit in 40 MiB.
    let disk = env.path("disk.img");
    let mut data = vec![0u8; 64 << 20];
    Rng(8).fill(&mut data);
    std::fs::write(&disk, &data).unwrap();

    let o = run(&["backup", "--source", "vm", disk.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("disk is full") && err.contains("nothing was committed"),
        "{err}"
    );
    let o = run(&["--json", "check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let pts = run(&["--json", "points"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&pts.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // With room again, the next backup completes and reuses the pack that landed.
    fs.resize("128m");
    let o = run(&["--json", "backup", "--source", "vm", disk.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(s["packs_recovered"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["new_bytes"].as_u64().unwrap() < 64 << 20, "{s}");
    let out = env.path("out.img");
    assert!(
        run(&["restore", "vm@latest", "--to", out.to_str().unwrap()])
            .status
            .success()
    );
    assert!(same_content(&out, &disk));
    assert!(run(&["check", "--read-data"]).status.success());
}
