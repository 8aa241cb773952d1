//! NBD end to end: `nbd://` backup sources read through real `qemu-nbd` exports
//! with persistent dirty bitmaps (cross-checked with `nbdinfo`), and
//! `serve-nbd` read by `qemu-img`, `nbdcopy`, `nbdinfo` and `qemu-io`.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::servers::free_port;
use common::*;

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

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("tool runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A `qemu-nbd` export, killed by PID on drop.
struct QemuNbd {
    pid_file: PathBuf,
    url: String,
}

impl QemuNbd {
    /// Export `image` (qcow2) read-only on a free port or a unix socket, with `bitmap`.
    fn start(image: &Path, bitmap: Option<&str>, socket: Option<&Path>) -> QemuNbd {
        QemuNbd::start_with(image, bitmap, socket, true)
    }

    fn start_with(
        image: &Path,
        bitmap: Option<&str>,
        socket: Option<&Path>,
        read_only: bool,
    ) -> QemuNbd {
        let pid_file = image.with_extension(format!("pid{}", free_port()));
        let mut c = Command::new("qemu-nbd");
        if read_only {
            c.arg("-r");
        }
        c.args(["-f", "qcow2", "-t", "--fork", "-x", "vda"]);
        c.arg(format!("--pid-file={}", pid_file.display()));
        if let Some(b) = bitmap {
            c.args(["-B", b]);
        }
        let url = match socket {
            Some(s) => {
                c.arg("-k").arg(s);
                format!("nbd+unix:///vda?socket={}", s.display())
            }
            None => {
                let port = free_port();
                c.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
                format!("nbd://127.0.0.1:{port}/vda")
            }
        };
        c.arg(image);
        run(&mut c);
        QemuNbd { pid_file, url }
    }

    fn with_bitmap(&self, b: &str) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}bitmap={b}", self.url)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            let _ = Command::new("kill").arg(pid.trim()).status();
            // qemu-nbd writes the image's bitmaps back as it closes: wait for it.
            for _ in 0..100 {
                let alive = Command::new("kill")
                    .args(["-0", pid.trim()])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !alive {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

/// Write 4 KiB blocks of fresh random data into a qcow2 image at `offsets`.
fn qemu_write(env: &Env, image: &Path, offsets: &[u64], seed: u64) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    let mut rng = Rng(seed | 1);
    for (i, off) in offsets.iter().enumerate() {
        let f = env.path(&format!("blk-{seed}-{i}"));
        let mut b = vec![0u8; 4096];
        rng.fill(&mut b);
        std::fs::write(&f, b).unwrap();
        c.arg("-c")
            .arg(format!("write -s {} {off} 4k", f.display()));
    }
    c.arg(image);
    run(&mut c);
}

/// A new empty qcow2 image in the test's directory.
fn qcow2(env: &Env, name: &str, size: &str) -> PathBuf {
    let img = env.path(name);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(size));
    img
}

fn raw_of(image: &Path, out: &Path) {
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(image)
        .arg(out));
}

/// `(offset, length, type)` extents of a context, as nbdinfo reports them.
fn nbdinfo_map(url: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let out = run(Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg("--json")
        .arg(url));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn bitmap_incrementals_read_only_what_changed_and_restore_exactly() {
    if !have("qemu-nbd") || !have("nbdinfo") {
        return;
    }
    let env = Env::new();
    env.init();
    let img = qcow2(&env, "vm.qcow2", "192M");
    // Data in the first 40 MiB and at 150 MiB; the rest never written (holes).
    let data: Vec<u64> = (0..40 * 256)
        .map(|i| i * 4096)
        .chain((0..256).map(|i| (150 << 20) + i * 4096))
        .collect();
    for part in data.chunks(2048) {
        qemu_write(&env, &img, part, part[0] + 1);
    }

    // Full read through NBD: only what base:allocation says holds data is read.
    let s0 = {
        let nbd = QemuNbd::start(&img, None, None);
        let alloc = nbdinfo_map(&nbd.url, "base:allocation");
        let s = env.json(&["backup", "--source", "vm", &nbd.url]);
        // Ferry reads whole 4 MiB segments that hold any data.
        let seg = 4u64 << 20;
        let mut segs = std::collections::BTreeSet::new();
        for &(o, l, t) in &alloc {
            if t & 2 == 0 {
                for k in o / seg..(o + l).div_ceil(seg) {
                    segs.insert(k);
                }
            }
        }
        assert_eq!(
            s["bytes_read"].as_u64().unwrap(),
            segs.len() as u64 * seg,
            "{alloc:?}"
        );
        assert!(s["changed_bytes"].is_null());
        s
    };
    let ref0 = env.path("ref0.raw");
    raw_of(&img, &ref0);

    // A bitmap from now on, then scattered 4 KiB writes (one zeroed block too).
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "-g", "4096"])
        .arg(&img)
        .arg("bm0"));
    let mut rng = Rng(77);
    let offsets: Vec<u64> = (0..40)
        .map(|_| rng.below((192 << 20) / 4096) * 4096)
        .collect();
    qemu_write(&env, &img, &offsets, 5);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -z 8M 4k"])
        .arg(&img));
    let ref1 = env.path("ref1.raw");
    raw_of(&img, &ref1);

    let s1 = {
        let nbd = QemuNbd::start(&img, Some("bm0"), None);
        let dirty: u64 = nbdinfo_map(&nbd.url, "qemu:dirty-bitmap:bm0")
            .iter()
            .filter(|e| e.2 & 1 == 1)
            .map(|e| e.1)
            .sum();
        assert!((4096..=41 * 4096).contains(&dirty), "{dirty}");
        let s = env.json(&["backup", "--source", "vm", &nbd.with_bitmap("bm0")]);
        // What ferry saw through the bitmap is what nbdinfo sees.
        assert_eq!(s["changed_bytes"].as_u64().unwrap(), dirty);
        assert_eq!(s["bytes_read"].as_u64().unwrap(), dirty);
        let new = s["new_bytes"].as_u64().unwrap();
        assert!(
            new as f64 <= 1.5 * dirty as f64,
            "{new} new bytes for {dirty} changed"
        );
        s
    };
    assert_eq!(s1["parent"], s0["point"]);

    // Next generation over a unix socket: rotate the bitmap, write again.
    run(Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(&img)
        .arg("bm0"));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "-g", "4096"])
        .arg(&img)
        .arg("bm1"));
    let offsets: Vec<u64> = (0..25)
        .map(|_| rng.below((192 << 20) / 4096) * 4096)
        .collect();
    qemu_write(&env, &img, &offsets, 9);
    let ref2 = env.path("ref2.raw");
    raw_of(&img, &ref2);
    let s2 = {
        let sock = env.path("nbd.sock");
        let nbd = QemuNbd::start(&img, Some("bm1"), Some(&sock));
        env.json(&["backup", "--source", "vm", &nbd.with_bitmap("bm1")])
    };
    assert!(s2["bytes_read"].as_u64().unwrap() <= 25 * 4096);

    // Every point restores to exactly what the disk held, and check agrees.
    for (s, reference) in [(&s0, &ref0), (&s1, &ref1), (&s2, &ref2)] {
        let out = env.path("out.raw");
        let _ = std::fs::remove_file(&out);
        env.ok(&[
            "restore",
            s["point"].as_str().unwrap(),
            "--to",
            out.to_str().unwrap(),
        ]);
        assert!(
            same_content(&out, reference),
            "point {} differs",
            s["point"]
        );
    }
    env.ok(&["check", "--read-data"]);
    let points = env.json(&["points"]);
    let disks = &points.as_array().unwrap()[2]["disks"];
    assert_eq!(disks[0]["changes"], "qemu:dirty-bitmap:bm1", "{points}");
}

#[test]
fn nbd_sources_that_cannot_be_read_give_clear_errors() {
    if !have("qemu-nbd") {
        return;
    }
    let env = Env::new();
    env.init();
    let img = qcow2(&env, "vm.qcow2", "16M");
    let port = free_port();
    let cases: Vec<(String, &str)> = vec![
        (format!("nbd://127.0.0.1:{port}/vda"), "connecting"),
        ("nbd://127.0.0.1:notaport/vda".into(), "not a valid NBD URL"),
        ("nbd+unix:///vda".into(), "needs ?socket=PATH"),
    ];
    for (url, want) in &cases {
        let out = env.run(&["backup", "--source", "vm", url]);
        assert_eq!(out.status.code(), Some(2), "{url}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{url}: {}", stderr(&out));
    }
    let nbd = QemuNbd::start(&img, None, None);
    let wrong_export = nbd.url.replace("/vda", "/nosuch");
    let out = env.run(&["backup", "--source", "vm", &wrong_export]);
    assert!(
        stderr(&out).contains("no export named \"nosuch\""),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["backup", "--source", "vm", &nbd.with_bitmap("nosuch")]);
    assert!(
        stderr(&out).contains("does not offer qemu:dirty-bitmap:nosuch"),
        "{}",
        stderr(&out)
    );
    assert!(env.json(&["points"]).as_array().unwrap().is_empty());
}

/// `ferry serve-nbd`, stopped by PID on drop.
struct Served {
    child: Child,
    url: String,
    ready_secs: f64,
    stderr: PathBuf,
}

impl Served {
    fn start(env: &Env, extra: &[&str]) -> Served {
        let mut c = env.cmd();
        c.args(["--json", "serve-nbd"]).args(extra);
        let stderr = env.path(&format!("serve-nbd-{}.err", free_port()));
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("serve-nbd prints its URL");
        Served {
            child,
            url: v["url"].as_str().unwrap().to_string(),
            ready_secs: v["ready_secs"].as_f64().unwrap(),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap()
    }

    /// The unix socket of an `nbd+unix://` URL.
    fn socket(&self) -> PathBuf {
        PathBuf::from(self.url.split_once("?socket=").unwrap().1)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A killed server leaves its private directory behind.
        if self.url.contains("?socket=") {
            let dir = self.socket().parent().unwrap().to_path_buf();
            if dir
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("ferry-nbd-")
            {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

#[test]
fn serve_nbd_is_read_by_real_clients() {
    if !have("qemu-img") || !have("nbdcopy") || !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let env = Env::new();
    env.init();
    // 80 MiB with data in the first 8 MiB and at 70 MiB; the rest zeros.
    let img = env.path("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(80 << 20).unwrap();
    drop(f);
    let mut buf = vec![0u8; 8 << 20];
    Rng(3).fill(&mut buf);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&buf, 0).unwrap();
    f.write_all_at(&buf[..1 << 20], 70 << 20).unwrap();
    drop(f);
    let s = env.backup("vm", &[&img]);
    let point = s["point"].as_str().unwrap().to_string();

    // By default only this user can connect: a unix socket, 0600, in a 0700 directory.
    let served = Served::start(&env, &[&point]);
    assert!(served.ready_secs < 5.0, "{}", served.ready_secs);
    assert!(served.url.starts_with("nbd+unix:///"), "{}", served.url);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&served.socket()), 0o600, "socket mode");
    assert_eq!(
        mode(served.socket().parent().unwrap()),
        0o700,
        "directory mode"
    );
    let a = env.path("qemu-img.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &served.url])
        .arg(&a));
    assert!(same_content(&a, &img), "qemu-img convert differs");
    let b = env.path("nbdcopy.raw");
    run(Command::new("nbdcopy").arg(&served.url).arg(&b));
    assert!(same_content(&b, &img), "nbdcopy differs");
    let map = nbdinfo_map(&served.url, "base:allocation");
    let kind_at = |o: u64| map.iter().find(|e| e.0 <= o && o < e.0 + e.1).unwrap().2;
    assert_eq!(kind_at(0), 0, "{map:?}");
    assert_eq!(kind_at(70 << 20), 0, "{map:?}");
    assert_eq!(
        kind_at(30 << 20),
        3,
        "zeros are reported as hole,zero: {map:?}"
    );
    // Read-only: a write is refused.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 4k", &served.url])
        .output()
        .unwrap();
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("failed"),
        "a read-only export took a write"
    );
    drop(served);

    // Writable, over a unix socket: writes land in the overlay, never the repository.
    let sock = env.path("serve.sock");
    let overlay = env.path("overlay.img");
    let before = files_under(&env.repo);
    let served = Served::start(
        &env,
        &[
            &point,
            "--socket",
            sock.to_str().unwrap(),
            "--overlay",
            overlay.to_str().unwrap(),
        ],
    );
    assert_eq!(mode(&sock), 0o600, "--socket mode");
    let io = |cmd: &str| run(Command::new("qemu-io").args(["-f", "raw", "-c", cmd, &served.url]));
    io("write -P 0x5a 1000 5000");
    io("write -P 0x6b 75M 4k");
    let out = io("read -P 0x5a 1000 5000");
    assert!(
        !out.contains("failed") && !out.contains("mismatch"),
        "{out}"
    );
    let out = io("read -P 0x6b 75M 4k");
    assert!(
        !out.contains("failed") && !out.contains("mismatch"),
        "{out}"
    );
    // Bytes around a partial write still come from the point.
    let c = env.path("after-write.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &served.url])
        .arg(&c));
    let (orig, now) = (std::fs::read(&img).unwrap(), std::fs::read(&c).unwrap());
    assert_eq!(&now[..1000], &orig[..1000]);
    assert!(now[1000..6000].iter().all(|&x| x == 0x5a));
    assert_eq!(&now[6000..75 << 20], &orig[6000..75 << 20]);
    drop(served);
    assert_eq!(files_under(&env.repo), before, "the repository was written");
    let r = env.path("restored.raw");
    env.ok(&["restore", &point, "--to", r.to_str().unwrap()]);
    assert!(same_content(&r, &img));
}

#[test]
fn serve_nbd_lets_in_only_who_it_should() {
    if !have("qemu-img") || !have("nbdinfo") {
        return;
    }
    let env = Env::new();
    env.init();
    let img = env.path("disk.img");
    let mut data = vec![0u8; 6 << 20];
    Rng(5).fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    let s = env.backup("vm", &[&img]);
    let point = s["point"].as_str().unwrap().to_string();

    // TCP without TLS is refused, naming the choices, before anything listens.
    let out = env.run(&["serve-nbd", &point, "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    for choice in ["--tls-cert", "--tls-key", "--insecure", "--socket"] {
        assert!(stderr(&out).contains(choice), "{}", stderr(&out));
    }

    // A file at --socket PATH is never deleted.
    let precious = env.path("precious.img");
    std::fs::write(&precious, b"keep me").unwrap();
    let out = env.run(&["serve-nbd", &point, "--socket", precious.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "{} exists and is a regular file",
            precious.display()
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");

    // --insecure serves TCP, and says what that means.
    let served = Served::start(&env, &[&point, "--listen", "127.0.0.1:0", "--insecure"]);
    assert!(served.url.starts_with("nbd://127.0.0.1:"), "{}", served.url);
    let info = run(Command::new("nbdinfo").args(["--size", &served.url]));
    assert_eq!(info.trim(), (6u64 << 20).to_string());
    assert!(
        served.stderr().contains("without TLS (--insecure)"),
        "{}",
        served.stderr()
    );
    drop(served);

    // With TLS and a CA: clients with a certificate it signed read the disk.
    let pki = env.path("pki");
    make_pki(&pki);
    let f = |n: &str| pki.join(n).to_str().unwrap().to_string();
    let served = Served::start(
        &env,
        &[
            &point,
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &f("server-cert.pem"),
            "--tls-key",
            &f("server-key.pem"),
            "--tls-ca",
            &f("ca-cert.pem"),
        ],
    );
    assert!(
        served.url.starts_with("nbds://127.0.0.1:"),
        "{}",
        served.url
    );
    let (hostport, export) = served
        .url
        .trim_start_matches("nbds://")
        .split_once('/')
        .unwrap();
    let port = hostport.split_once(':').unwrap().1;
    let tls_url = format!("{}?tls-certificates={}", served.url, pki.display());
    let info = run(Command::new("nbdinfo").args(["--size", &tls_url]));
    assert_eq!(info.trim(), (6u64 << 20).to_string());
    let copy = env.path("over-tls.raw");
    run(Command::new("qemu-img")
        .args(["convert", "--object"])
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            pki.display()
        ))
        .args(["--image-opts"])
        .arg(format!(
            "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},file.export={export},file.tls-creds=tls0"
        ))
        .args(["-O", "raw"])
        .arg(&copy));
    assert!(
        same_content(&copy, &img),
        "qemu-img over TLS read other bytes"
    );

    // Plain-text clients are refused, and so is TLS without a client certificate.
    let plain = served.url.replacen("nbds://", "nbd://", 1);
    let out = Command::new("nbdinfo").arg(&plain).output().unwrap();
    assert!(!out.status.success(), "a plain-text client got in");
    let out = Command::new("qemu-img")
        .args(["info", "-f", "raw", &plain])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a plain-text qemu-img got in");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let no_cert = env.path("ca-only");
    std::fs::create_dir_all(&no_cert).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), no_cert.join("ca-cert.pem")).unwrap();
    let out = Command::new("nbdinfo")
        .arg(format!(
            "{}?tls-certificates={}",
            served.url,
            no_cert.display()
        ))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a client without a certificate got in"
    );
}

/// Failback onto a disk exported by `qemu-nbd`: the disk held point P1 when
/// its dirty bitmap was created, then was written to (the machine ran on);
/// point P2 is restored onto it with `--delta --base P1` through the bitmap,
/// which writes what the bitmap marks and what differs between P1 and P2
/// and reads nothing of the disk. Without the bitmap, `--delta` reads every
/// block to compare it.
#[test]
fn delta_restore_onto_an_nbd_export_through_its_dirty_bitmap_reads_nothing() {
    if !have("qemu-nbd") || !have("qemu-io") {
        return;
    }
    let env = Env::new();
    env.init();
    const SIZE: u64 = 64 << 20;
    let first = env.path("first.raw");
    make_image(&first, SIZE, 17);
    let p1 = env.backup("vm", &[&first])["point"]
        .as_str()
        .unwrap()
        .to_owned();
    // The second point: the source moved on elsewhere (0.1% scattered writes).
    // (The same file name: a point names its disk after it.)
    std::fs::create_dir(env.path("later")).unwrap();
    let second = env.path("later/first.raw");
    std::fs::copy(&first, &second).unwrap();
    scatter_writes(&second, 16, 5);
    let p2 = env.backup("vm", &[&second])["point"]
        .as_str()
        .unwrap()
        .to_owned();
    // The disk: P1, a bitmap from then on, and writes the machine made since.
    let disk = env.path("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&first)
        .arg(&disk));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&disk)
        .arg("since-p1"));
    let written: Vec<u64> = (0..12u64).map(|i| (i * 5 + 3) << 20).collect();
    qemu_write(&env, &disk, &written, 9);

    let sock = env.path("nbd.sock");
    let nbd = QemuNbd::start_with(&disk, Some("since-p1"), Some(&sock), false);
    let to = nbd.with_bitmap("since-p1");
    // A bitmap alone is not enough: it says what changed since some point.
    let out = env.run(&["restore", &p2, "--to", &to, "--delta"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--delta --base POINT"),
        "{}",
        stderr(&out)
    );

    let r = env.json(&["restore", &p2, "--to", &to, "--delta", "--base", &p1]);
    eprintln!("through the bitmap: {r}");
    assert_eq!(r["mode"], "bitmap");
    assert_eq!(r["disk_bytes_read"], 0, "{r:#}");
    assert!(r["changed_bytes"].as_u64().unwrap() >= 12 * 4096, "{r:#}");
    let w = r["bytes_written"].as_u64().unwrap();
    assert!(w > 0 && w < SIZE / 8, "wrote {w} bytes: {r:#}");
    assert!(r["bytes_skipped"].as_u64().unwrap() > SIZE / 2, "{r:#}");
    drop(nbd);
    let got = env.path("got.raw");
    raw_of(&disk, &got);
    assert!(same_content(&got, &second), "the disk does not hold P2");

    // Back to P1 without a bitmap: every block is read and compared, and
    // only what differs is written.
    let nbd = QemuNbd::start_with(&disk, None, Some(&sock), false);
    let r = env.json(&["restore", &p1, "--to", &nbd.url, "--delta"]);
    eprintln!("compared: {r}");
    assert_eq!(r["mode"], "compare");
    // (Every place of a data chunk; the image's zero runs are zeroed, not read.)
    assert!(r["disk_bytes_read"].as_u64().unwrap() >= SIZE / 4, "{r:#}");
    let w = r["bytes_written"].as_u64().unwrap();
    assert!(w > 0 && w <= 16 * 4096 * 2, "wrote {w} bytes: {r:#}");
    drop(nbd);
    raw_of(&disk, &got);
    assert!(same_content(&got, &first), "the disk does not hold P1");

    // A read-only export is refused with the way out.
    let nbd = QemuNbd::start_with(&disk, None, Some(&sock), true);
    let out = env.run(&["restore", &p1, "--to", &nbd.url, "--delta"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("read-only"), "{}", stderr(&out));
}
