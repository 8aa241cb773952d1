//! A power loss right after `ferry backup` reported success: the repository on
//! disk still holds the point and every byte it needs.
//!
//! The repository lives on ext4 over a loop device. The loop device writes
//! what the filesystem sends it into its backing file, so a copy of that file
//! taken the moment the backup returns is the disk as a power loss would leave
//! it: whatever the filesystem still held in memory (dirty pages, an
//! uncommitted journal) is not in it. Mounting the copy replays the journal,
//! as booting after the power loss would.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// An ext4 filesystem image attached to a loop device and mounted; unmounted
/// and detached on drop.
struct Mounted {
    device: String,
    at: PathBuf,
}

impl Mounted {
    fn mount(image: &Path, at: &Path) -> Option<Mounted> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
        std::fs::create_dir_all(at).unwrap();
        let m = Mounted {
            device,
            at: at.to_path_buf(),
        };
        // A journal commit only every 5 minutes, so that what the copy holds
        // is what Ferry synced, not what a commit happened to carry.
        let ok = Command::new("mount")
            .args(["-t", "ext4", "-o", "commit=300", &m.device])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(m)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.at).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

#[test]
fn a_backup_that_reported_success_survives_a_power_loss() {
    let env = Env::new();
    let image = env.path("fs.ext4");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let made = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&image)
        .status()
        .is_ok_and(|s| s.success());
    let fs = made
        .then(|| Mounted::mount(&image, &env.path("mnt")))
        .flatten();
    let Some(fs) = fs else {
        skip_without_root("make ext4 (mkfs.ext4), attach a loop device and mount it");
        return;
    };
    let repo = fs.at.join("repo");
    let ferry = |repo: &Path, args: &[&str]| {
        let out = env
            .cmd()
            .env("FERRY_REPO", repo)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ferry {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        out.stdout
    };
    // 48 MiB of random data: several 16 MiB packs, nothing deduplicated or compressed.
    let disk = env.path("disk.img");
    let mut data = vec![0u8; 48 << 20];
    Rng(11).fill(&mut data);
    std::fs::write(&disk, &data).unwrap();
    ferry(&repo, &["init"]);
    let out = ferry(
        &repo,
        &["--json", "backup", "--source", "vm", disk.to_str().unwrap()],
    );
    // The power goes out now: the disk holds what the loop device was given.
    let crashed = env.path("crashed.ext4");
    std::fs::copy(&image, &crashed).unwrap();
    let point: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let point = point["point"].as_str().unwrap().to_string();
    drop(fs);

    // After the reboot.
    let fs = Mounted::mount(&crashed, &env.path("after")).expect("mount the copy");
    let repo = fs.at.join("repo");
    let check: serde_json::Value =
        serde_json::from_slice(&ferry(&repo, &["--json", "check", "--read-data"])).unwrap();
    assert_eq!(check["ok"], true, "{check}");
    let out = env.path("restored.img");
    ferry(&repo, &["restore", &point, "--to", out.to_str().unwrap()]);
    assert!(same_content(&out, &disk), "the restored disk differs");
}
