//! Block devices as sources and restore targets, through loop devices.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &std::path::Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| Loop(String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn back_up_and_restore_block_devices() {
    let env = Env::new();
    env.init();
    let img = env.path("src.img");
    make_image(&img, 16 << 20, 41);
    let Some(src) = Loop::attach(&img) else {
        skip_without_root("attach a loop device");
        return;
    };
    let s = env.backup("dev", &[std::path::Path::new(&src.0)]);
    // A device has no holes to skip: every byte is read, zeros are still not stored.
    assert_eq!(s["bytes_read"], 16u64 << 20);

    // Restore onto a device that holds garbage: every byte, zeros included, is written.
    let dst_img = env.path("dst.img");
    let mut garbage = vec![0u8; 16 << 20];
    Rng(5).fill(&mut garbage);
    std::fs::write(&dst_img, &garbage).unwrap();
    let dst = Loop::attach(&dst_img).unwrap();
    let disk_name = std::path::Path::new(&src.0)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    env.ok(&[
        "restore",
        "dev@latest",
        "--to",
        &dst.0,
        "--disk",
        &disk_name,
    ]);
    drop(dst);
    assert!(same_content(&dst_img, &img));

    // A device smaller than the disk is refused before anything is written.
    let small_img = env.path("small.img");
    std::fs::write(&small_img, vec![1u8; 8 << 20]).unwrap();
    let small = Loop::attach(&small_img).unwrap();
    let o = env.run(&["restore", "dev@latest", "--to", &small.0]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("holds"), "{}", stderr(&o));
    drop(small);
    assert_eq!(std::fs::read(&small_img).unwrap(), vec![1u8; 8 << 20]);
}
