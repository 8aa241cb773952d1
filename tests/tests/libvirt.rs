//! The libvirt connector against a real libvirt 9 host (`qemu:///system`,
//! QEMU 10 under TCG): storage pools and volumes, isolated networks, domains
//! booted from scripts/make-guest's kernel, adoption, teardown by run tag,
//! undo of what is already gone, and an incremental pull-mode backup through
//! a checkpoint read by Ferry's NBD reader into a repository.
//!
//! common::libvirt starts virtlogd and libvirtd when they are not running and
//! stops the ones it started; the tests skip without root or libvirt (and fail
//! under CI).

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::libvirt::{Libvirtd, guest};
use common::servers::{free_port, http_status};
use ferry_agent::backup::{BackupOptions, DiskSpec, backup_sources};
use ferry_agent::progress::Progress;
use ferry_agent::sink::MemSink;
use ferry_agent::source::BlockSource;
use ferry_connectors::libvirt::{
    Boot, Connection, Disk, DomainSpec, Error, Format, NetworkSpec, Nic, PortForward, Tag,
};
use ferry_connectors::nbd::{NbdSource, NbdUrl};

/// A run id of its own for each test (and each test process).
fn run_id(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{what}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A scratch directory QEMU's user can traverse (it holds the pool).
fn scratch() -> tempfile::TempDir {
    let d =
        tempfile::tempdir_in(std::env::var("FERRY_TEST_TMP").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    d
}

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Tears a run down and removes its pool even when the test fails half-way.
struct Cleanup {
    lv: Connection,
    run: String,
    pool: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = self.lv.teardown(&self.run) {
            eprintln!("cleanup of run {}: {e}", self.run);
        }
        if let Err(e) = self.lv.remove_pool(&self.pool) {
            eprintln!("cleanup of pool {}: {e}", self.pool);
        }
    }
}

fn wait_serial(log: &Path, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(what) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never printed {what:?} within {timeout:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

#[test]
fn pools_volumes_and_isolated_networks_are_idempotent_and_torn_down_by_run() {
    let Some(_daemons) = Libvirtd::get() else {
        return;
    };
    let started = Instant::now();
    let env = scratch();
    let lv = Connection::system();
    let run = run_id("store");
    let tag = Tag::new(&run, "restore").unwrap();
    let pool = format!("ferrytest-{run}");
    let _cleanup = Cleanup {
        lv: lv.clone(),
        run: run.clone(),
        pool: pool.clone(),
    };
    let pool_dir = env.path().join("pool");

    // The pool: made once, found the second time, never moved.
    lv.ensure_dir_pool(&pool, &pool_dir).unwrap();
    lv.ensure_dir_pool(&pool, &pool_dir).unwrap();
    let e = lv
        .ensure_dir_pool(&pool, &env.path().join("elsewhere"))
        .unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "{e}");
    let health = lv.health().unwrap();
    assert!(health.pools.contains(&pool), "{health:?}");

    // A raw image with data, a hole inside and one at the end.
    let raw = env.path().join("disk.raw");
    let mut data = vec![0u8; 3 << 20];
    for (i, b) in data[..1 << 20].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    data[(3 << 20) - 100..].fill(0xee);
    std::fs::write(&raw, &data).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let want = std::fs::read(&raw).unwrap();
    let v = lv
        .upload_volume(&pool, &tag, "disk0", &raw, Format::Raw)
        .unwrap();
    assert_eq!(v.name, tag.object_name("disk0").unwrap());
    assert!(std::fs::read(&v.path).unwrap() == want, "raw bytes differ");
    // Again (a retried step): the same volume, the same bytes.
    let again = lv
        .upload_volume(&pool, &tag, "disk0", &raw, Format::Raw)
        .unwrap();
    assert_eq!(again, v);
    assert!(std::fs::read(&v.path).unwrap() == want, "raw bytes differ");

    // A qcow2 image stays qcow2 with the same guest-visible content.
    let q = env.path().join("disk.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&q)
        .arg("32M"));
    sh(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 1M 64k"])
        .arg(&q));
    let qv = lv
        .upload_volume(&pool, &tag, "disk1", &q, Format::Qcow2)
        .unwrap();
    assert_eq!(lv.volume_path(&pool, &qv.name).unwrap(), qv.path);
    sh(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
        .arg(&q)
        .arg(&qv.path));
    // An image that would make QEMU open another file is refused, and so is
    // a raw file that claims to be qcow2.
    let b = env.path().join("backed.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&raw)
        .arg(&b));
    for (img, fmt) in [(&b, Format::Qcow2), (&raw, Format::Qcow2)] {
        let e = lv.upload_volume(&pool, &tag, "bad", img, fmt).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
    }

    // An isolated network: created, then found; other addresses under the same
    // name are a conflict; a DHCP range outside the network is refused.
    let spec = NetworkSpec {
        name: "drill".into(),
        cidr: "10.213.7.0/24".parse().unwrap(),
        dhcp: Some((
            "10.213.7.100".parse().unwrap(),
            "10.213.7.200".parse().unwrap(),
        )),
    };
    let n = lv.create_network(&tag, &spec).unwrap();
    assert!(n.created);
    assert_eq!(n.name, tag.object_name("drill").unwrap());
    let n2 = lv.create_network(&tag, &spec).unwrap();
    assert!(!n2.created);
    assert_eq!(n2.name, n.name);
    let xml = virsh(&["net-dumpxml", &n.name]);
    assert!(!xml.contains("<forward"), "{xml}");
    assert!(
        xml.contains("<dns enable='no'/>") || xml.contains("<dns enable=\"no\"/>"),
        "{xml}"
    );
    let other = NetworkSpec {
        cidr: "10.213.8.0/24".parse().unwrap(),
        dhcp: None,
        ..spec.clone()
    };
    let e = lv.create_network(&tag, &other).unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "{e}");
    let outside = NetworkSpec {
        name: "x".into(),
        dhcp: Some((
            "10.213.7.100".parse().unwrap(),
            "10.213.9.1".parse().unwrap(),
        )),
        ..spec.clone()
    };
    let e = lv.create_network(&tag, &outside).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    // Delete is undo: twice is fine.
    assert!(lv.delete_network(&n.name).unwrap());
    assert!(!lv.delete_network(&n.name).unwrap());
    assert!(lv.create_network(&tag, &spec).unwrap().created);

    // Everything of the run, found by name prefix, then torn down.
    let found = lv.list_tagged(&run).unwrap();
    assert!(found.domains.is_empty());
    assert_eq!(found.networks, vec![n.name.clone()]);
    assert_eq!(
        sorted(found.volumes.clone()),
        vec![
            (pool.clone(), v.name.clone()),
            (pool.clone(), qv.name.clone())
        ]
    );
    let removed = lv.teardown(&run).unwrap();
    assert_eq!(removed, found);
    assert!(lv.list_tagged(&run).unwrap().is_empty());
    assert!(!virsh(&["net-list", "--all", "--name"]).contains(&n.name));
    assert!(virsh(&["vol-list", "--pool", &pool]).trim().is_empty());
    assert!(!lv.delete_volume(&pool, &v.name).unwrap());
    assert!(lv.teardown(&run).unwrap().is_empty());
    assert!(lv.remove_pool(&pool).unwrap());
    assert!(!lv.remove_pool(&pool).unwrap());
    eprintln!("storage and networks: {:?}", started.elapsed());
}

#[test]
fn a_domain_is_adopted_backed_up_incrementally_through_checkpoints_and_torn_down() {
    let Some(_daemons) = Libvirtd::get() else {
        return;
    };
    let started = Instant::now();
    let env = scratch();
    let Some((kernel, initrd)) = guest(env.path()) else {
        return;
    };
    let lv = Connection::system();
    let run = run_id("dom");
    let tag = Tag::new(&run, "boot").unwrap();
    let pool = format!("ferrytest-{run}");
    let _cleanup = Cleanup {
        lv: lv.clone(),
        run: run.clone(),
        pool: pool.clone(),
    };
    lv.ensure_dir_pool(&pool, &env.path().join("pool")).unwrap();

    // A qcow2 disk (checkpoints keep persistent bitmaps in it) and a network.
    let disk_size = 16u64 << 20;
    let img = env.path().join("vda.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(disk_size.to_string()));
    let vol = lv
        .upload_volume(&pool, &tag, "vda", &img, Format::Qcow2)
        .unwrap();
    let net = lv
        .create_network(
            &tag,
            &NetworkSpec {
                name: "lan".into(),
                cidr: "10.213.9.0/24".parse().unwrap(),
                dhcp: Some((
                    "10.213.9.10".parse().unwrap(),
                    "10.213.9.20".parse().unwrap(),
                )),
            },
        )
        .unwrap();

    // The guest writes 4 KiB blocks at random among the first 16 blocks of
    // its disk, 20 a second: every change falls in the first 64 KiB.
    let name = format!("ferry-test-{run}");
    let serial = env.path().join("serial.log");
    let spec = DomainSpec {
        name: name.clone(),
        memory_mib: 256,
        vcpus: 1,
        disks: vec![Disk {
            path: vol.path.clone(),
            format: Format::Qcow2,
        }],
        boot: Boot::Kernel {
            kernel,
            initrd: Some(initrd),
            cmdline: "console=ttyS0 quiet panic=-1 ferry.mode=writer ferry.rate=20 ferry.blocks=16"
                .into(),
        },
        nics: vec![Nic::Network {
            network: net.name.clone(),
            mac: None,
        }],
        serial_log: serial.clone(),
        fw_cfg: Vec::new(),
    };
    let t = Instant::now();
    let d = lv.define_and_start(&tag, &spec).unwrap();
    eprintln!("define + start: {:?}", t.elapsed());
    assert!(!d.adopted);
    assert_eq!(lv.domain_state(&name).unwrap(), "running");
    assert_eq!(lv.tag_of(&name).unwrap(), Some(tag.clone()));
    // Defined again (a retried step): adopted, still running.
    assert!(lv.define_and_start(&tag, &spec).unwrap().adopted);
    // Stopped behind Ferry's back: adopted and started again.
    assert!(lv.stop(&name).unwrap());
    assert_eq!(lv.domain_state(&name).unwrap(), "shut off");
    assert!(lv.define_and_start(&tag, &spec).unwrap().adopted);
    assert_eq!(lv.domain_state(&name).unwrap(), "running");
    wait_serial(&serial, "ferry-writer: t=2 ", Duration::from_secs(120));
    eprintln!("booted and writing: {:?}", started.elapsed());

    // A full pull-mode backup that starts checkpoint cp1, read by Ferry's NBD
    // reader into a repository.
    let repo = ferry_agent::Repository::init(
        ferry_agent::Store::memory(),
        b"pw",
        ferry_agent::repo::InitOptions {
            kdf: ferry_agent::crypto::KdfParams {
                memory_kib: 64,
                iterations: 1,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let opts = BackupOptions {
        source: "vm".into(),
        disks: vec![DiskSpec {
            name: "vda".into(),
            path: PathBuf::from("vda"),
        }],
        consistency: None,
        time: None,
        group: None,
    };
    let full = lv.backup_begin(&name, "vda", "cp1", None).unwrap();
    assert!(full.bitmap_context().is_none());
    let s0 = {
        let src = NbdSource::open(&full.url).unwrap();
        assert_eq!(src.size().unwrap(), disk_size);
        assert!(src.change_map().unwrap().is_none());
        backup_sources(&repo, &opts, &[&src], &Progress::default()).unwrap()
    };
    assert!(s0.changed_bytes.is_none());
    lv.backup_end(full).unwrap();

    // More writes, then an incremental from cp1 that starts cp2.
    let heartbeats = std::fs::read_to_string(&serial)
        .unwrap()
        .matches("ferry-writer: t=")
        .count();
    wait_serial(
        &serial,
        &format!("ferry-writer: t={} ", heartbeats + 2),
        Duration::from_secs(60),
    );
    let inc = lv.backup_begin(&name, "vda", "cp2", Some("cp1")).unwrap();
    assert_eq!(
        inc.bitmap_context().as_deref(),
        Some("qemu:dirty-bitmap:backup-vda")
    );
    // What `ferry backup` takes on its command line names the same export.
    assert_eq!(NbdUrl::parse(&inc.source_url()).unwrap(), inc.url);
    let src = NbdSource::open(&inc.url).unwrap();
    let changes = src.change_map().unwrap().unwrap();
    let dirty: u64 = changes.ranges.iter().map(|r| r.1 - r.0).sum();
    assert!(dirty > 0, "{changes:?}");
    assert!(
        changes.ranges.iter().all(|r| r.1 <= 64 << 10),
        "changes outside the blocks the guest writes: {changes:?}"
    );
    let s1 = backup_sources(&repo, &opts, &[&src], &Progress::default()).unwrap();
    assert_eq!(s1.parent.as_deref(), Some(s0.point.as_str()));
    assert_eq!(s1.changed_bytes, Some(dirty));
    assert_eq!(
        s1.bytes_read, dirty,
        "the incremental read more than the changes"
    );
    // The incremental point is the export at cp2, byte for byte.
    let mut whole = vec![0u8; disk_size as usize];
    src.read_exact_at(&mut whole, 0).unwrap();
    assert!(
        whole[..64 << 10].windows(8).any(|w| w == b"FERRYBLK"),
        "the guest's writes are not in the export"
    );
    let point = repo.load_point(&s1.point).unwrap();
    let sink = MemSink::new(disk_size);
    ferry_agent::restore::restore_into(&repo, &point, 0, &sink, &Progress::default()).unwrap();
    assert!(
        sink.bytes() == whole,
        "the restored incremental differs from the export"
    );
    drop(src);
    lv.backup_end(inc).unwrap();
    assert_eq!(lv.checkpoints(&name).unwrap(), ["cp1", "cp2"]);
    lv.abort_job(&name).unwrap(); // no job left: nothing to do
    eprintln!("full + incremental pull backups: {:?}", started.elapsed());

    // Teardown by run: the domain (with its checkpoints), the network, the volume.
    let found = lv.list_tagged(&run).unwrap();
    assert_eq!(found.domains, vec![name.clone()]);
    assert_eq!(found.networks, vec![net.name.clone()]);
    assert_eq!(found.volumes, vec![(pool.clone(), vol.name.clone())]);
    assert_eq!(lv.teardown(&run).unwrap(), found);
    assert!(lv.list_tagged(&run).unwrap().is_empty());
    assert!(!virsh(&["list", "--all", "--name"]).contains(&name));
    assert!(!virsh(&["net-list", "--all", "--name"]).contains(&net.name));
    assert!(virsh(&["vol-list", "--pool", &pool]).trim().is_empty());
    // Undo of what is already gone succeeds.
    assert!(!lv.stop(&name).unwrap());
    assert!(!lv.undefine(&name).unwrap());
    assert!(!lv.delete_domain(&name).unwrap());
    assert!(!lv.delete_network(&net.name).unwrap());
    assert!(!lv.delete_volume(&pool, &vol.name).unwrap());
    lv.abort_job(&name).unwrap();
    assert!(lv.domain_state(&name).unwrap_err().is_not_found());
    eprintln!("domain test: {:?}", started.elapsed());
}

#[test]
fn user_mode_networking_forwards_a_loopback_port_to_the_guest() {
    let Some(_daemons) = Libvirtd::get() else {
        return;
    };
    let started = Instant::now();
    let env = scratch();
    let Some((kernel, initrd)) = guest(env.path()) else {
        return;
    };
    let lv = Connection::system();
    let run = run_id("web");
    let tag = Tag::new(&run, "web").unwrap();
    let _cleanup = Cleanup {
        lv: lv.clone(),
        run: run.clone(),
        pool: format!("ferrytest-{run}"),
    };
    let port = free_port();
    let name = format!("ferry-test-{run}");
    let serial = env.path().join("serial.log");
    let spec = DomainSpec {
        name: name.clone(),
        memory_mib: 256,
        vcpus: 1,
        disks: vec![],
        boot: Boot::Kernel {
            kernel,
            initrd: Some(initrd),
            cmdline: "console=ttyS0 quiet panic=-1 ferry.mode=web".into(),
        },
        nics: vec![Nic::User {
            forwards: vec![PortForward {
                host: port,
                guest: 80,
            }],
        }],
        serial_log: serial.clone(),
        fw_cfg: Vec::new(),
    };
    assert!(!lv.define_and_start(&tag, &spec).unwrap().adopted);
    wait_serial(&serial, "ferry-guest: web ready", Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_status(port, "/") != Some(200) {
        assert!(Instant::now() < deadline, "no HTTP 200 on 127.0.0.1:{port}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(lv.teardown(&run).unwrap().domains, vec![name]);
    assert!(lv.list_tagged(&run).unwrap().is_empty());
    eprintln!("user-mode networking: {:?}", started.elapsed());
}
