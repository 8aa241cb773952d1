//! The seams' conformance suites (`ferry_agent::conformance`,
//! `ferry_connectors::conformance`) against real implementations that need a
//! server: stores opened through `ferry_connectors::store::open` on moto (S3,
//! versions and Object Lock) and Azurite (Azure Blob), and `NbdSource` on a
//! real `qemu-nbd` export of a sparse raw image. The memory and directory
//! stores, the memory and file sources and the NBD exports run the same suites
//! in their crates' unit tests.
//!
//! Stores read their credentials and endpoints from the environment, which a
//! test cannot set safely in a threaded test process: each server test runs an
//! ignored child test of this binary with the server's environment.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::run_child;
use common::servers::{Azurite, Moto, free_port, s3_python};
use ferry_agent::conformance;
use ferry_connectors::nbd::{NbdSource, NbdUrl};

fn open(location: &str) -> ferry_agent::Store {
    ferry_connectors::store::open(location, false).unwrap()
}

#[test]
fn s3_stores_conform_on_moto() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("conformance", false);
    moto.create_bucket("conformance-locked", true);
    run_child("child_s3", |c| moto.apply(c));
}

#[test]
#[ignore = "run by s3_stores_conform_on_moto with the server's environment"]
fn child_s3() {
    let store = open("s3://conformance/repo");
    conformance::store(&store, "suite", true).unwrap();
    // The same bucket with no prefix in the URL.
    conformance::store(&open("s3://conformance"), "bare", false).unwrap();

    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap();
    let store = open("s3://conformance-locked/repo");
    conformance::versioned(
        &store,
        |name| {
            s3_python(
                &endpoint,
                "s3.delete_object(Bucket='conformance-locked', Key='repo/' + sys.argv[1])",
                &[name],
            );
        },
        "suite",
    )
    .unwrap();
}

#[test]
fn azure_stores_conform_on_azurite() {
    let Some(az) = Azurite::start() else { return };
    az.create_container("conformance");
    run_child("child_azure", |c| az.apply(c));
}

#[test]
#[ignore = "run by azure_stores_conform_on_azurite with the server's environment"]
fn child_azure() {
    conformance::store(&open("az://conformance/repo"), "suite", true).unwrap();
}

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: {tool} is not installed (scripts/setup-vm installs it)");
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must have {tool}"
        );
    }
    ok
}

/// A read-only `qemu-nbd` export of a raw image, killed by PID on drop.
struct QemuNbd {
    pid_file: PathBuf,
    url: String,
}

impl QemuNbd {
    fn start(image: &Path) -> QemuNbd {
        let pid_file = image.with_extension("pid");
        let port = free_port();
        let out = Command::new("qemu-nbd")
            .args(["-r", "-f", "raw", "-t", "--fork", "-x", "vda"])
            .arg(format!("--pid-file={}", pid_file.display()))
            .args(["-b", "127.0.0.1", "-p", &port.to_string()])
            .arg(image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        QemuNbd {
            pid_file,
            url: format!("nbd://127.0.0.1:{port}/vda"),
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

#[test]
fn nbd_sources_conform_on_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    // 5 MiB + 512: data, a hole, data at an odd place, and a tail that is not a
    // multiple of the NBD block size's larger cousins.
    let mut disk = vec![0u8; (5 << 20) + 512];
    for (i, b) in disk[..200_000].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    let n = disk.len();
    disk[(3 << 20) + 1..(3 << 20) + 70_001].fill(9);
    disk[n - 100..].fill(3);
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(n as u64).unwrap();
    use std::os::unix::fs::FileExt;
    for (a, b) in [
        (0, 200_000),
        ((3 << 20) + 1, (3 << 20) + 70_001),
        (n - 100, n),
    ] {
        f.write_all_at(&disk[a..b], a as u64).unwrap();
    }
    drop(f);

    let server = QemuNbd::start(&image);
    let source = NbdSource::open(&NbdUrl::parse(&server.url).unwrap()).unwrap();
    conformance::block_source(&source, &disk).unwrap();
}
