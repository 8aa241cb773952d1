//! Live VMs under software emulation (real QEMU processes, scripts/make-guest
//! guests): `ferry protect` through QMP while the guest keeps writing, with each
//! point compared to the frozen view `qemu-img` read at the same instant, the
//! failure cases (a failed cycle, QEMU killed and restarted, the VM gone), and a
//! VM running from a `serve-nbd` export.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::servers::free_port;
use common::*;

/// A QEMU process, killed by PID on drop.
struct Qemu {
    pid: u32,
    qmp: PathBuf,
    serial: PathBuf,
}

impl Qemu {
    /// Boot the guest in `mode` with `drive` as its virtio disk (`-blockdev` options
    /// whose top node is `disk0`), plus extra arguments.
    fn boot(
        env: &Env,
        guest: &Path,
        tag: &str,
        append: &str,
        drive: &[String],
        extra: &[String],
    ) -> Qemu {
        let qmp = env.path(&format!("{tag}.qmp"));
        let serial = env.path(&format!("{tag}.serial"));
        let pid_file = env.path(&format!("{tag}.pid"));
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-no-reboot", "-daemonize"])
        .arg("-pidfile")
        .arg(&pid_file)
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initrd.gz"))
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 {append}"))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        for d in drive {
            c.arg("-blockdev").arg(d);
        }
        c.args(["-device", "virtio-blk-pci,drive=disk0"])
            .args(extra);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "qemu failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Qemu { pid, qmp, serial }
    }

    fn boot_writer(env: &Env, guest: &Path, disk: &Path, rate: u32) -> Qemu {
        let q = Qemu::boot(
            env,
            guest,
            "writer",
            &format!("ferry.mode=writer ferry.rate={rate}"),
            &[
                format!("driver=file,filename={},node-name=file0", disk.display()),
                "driver=qcow2,file=file0,node-name=disk0".into(),
            ],
            &[],
        );
        q.wait_serial("ferry-writer: t=2", Duration::from_secs(90));
        q
    }

    fn wait_serial(&self, what: &str, timeout: Duration) {
        wait_serial(&self.serial, what, timeout);
    }

    fn kill(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.pid.to_string()])
            .status();
        for _ in 0..100 {
            let alive = Command::new("kill")
                .args(["-0", &self.pid.to_string()])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !alive {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill("-KILL");
    }
}

/// A new empty qcow2 image `name` of `size` (e.g. `16M`) in the test's directory.
fn blank_qcow2(env: &Env, name: &str, size: &str) -> PathBuf {
    let disk = env.path(name);
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg(size)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create {}", disk.display());
    disk
}

/// Run `ferry protect` for `cycles` cycles; the JSON line of every cycle. The
/// hook copies each frozen view with qemu-img to `truth-<run>-<cycle>.raw`.
fn protect(
    env: &Env,
    qemu: &Qemu,
    run: &str,
    cycles: u32,
    fail_cycle: Option<u32>,
) -> (Vec<serde_json::Value>, bool) {
    let fail = fail_cycle.map_or(String::new(), |c| {
        format!("[ \"$FERRY_CYCLE\" = {c} ] && exit 1; ")
    });
    let hook = format!(
        "{fail}qemu-img convert -f raw -O raw \"$FERRY_NBD_URL\" {}/truth-{run}-$FERRY_CYCLE.raw",
        env.dir.path().display()
    );
    let out = env.run(&[
        "--json",
        "protect",
        "--vm",
        &format!("vm={}", qemu.qmp.display()),
        "--interval",
        "1s",
        "--cycles",
        &cycles.to_string(),
        "--work-dir",
        env.path("work").to_str().unwrap(),
        "--status",
        env.path("status.json").to_str().unwrap(),
        "--hook",
        &hook,
    ]);
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (lines, out.status.success())
}

/// Each committed cycle's point restores to exactly the view qemu-img copied.
fn verify(env: &Env, run: &str, lines: &[serde_json::Value]) {
    for l in lines.iter().filter(|l| l.get("point").is_some()) {
        let truth = env.path(&format!("truth-{run}-{}.raw", l["cycle"]));
        let out = env.path("restored.raw");
        let _ = std::fs::remove_file(&out);
        env.ok(&[
            "restore",
            l["point"].as_str().unwrap(),
            "--to",
            out.to_str().unwrap(),
        ]);
        assert!(
            same_content(&out, &truth),
            "run {run} cycle {} ({}) differs from the guest's disk at its instant",
            l["cycle"],
            l["mode"]
        );
    }
}

#[test]
fn live_vm_protection_loses_no_write_and_catches_up_after_failures() {
    let Some(guest) = guest() else { return };
    let env = Env::new();
    env.init();
    let disk = blank_qcow2(&env, "vm.qcow2", "128M");
    let qemu = Qemu::boot_writer(&env, &guest, &disk, 400);

    // Four cycles while the guest writes 1.6 MB/s: a full read, then bitmaps.
    let (lines, ok) = protect(&env, &qemu, "a", 4, None);
    assert!(ok, "{lines:?}");
    assert_eq!(lines.len(), 4);
    assert!(
        lines[0]["mode"]
            .as_str()
            .unwrap()
            .starts_with("full read: first point"),
        "{lines:?}"
    );
    for l in &lines[1..] {
        assert!(
            l["mode"]
                .as_str()
                .unwrap()
                .starts_with("incremental through bitmap"),
            "{l}"
        );
        let changed = l["changed_bytes"].as_u64().unwrap();
        assert!(
            changed > 0 && l["bytes_read"].as_u64().unwrap() == changed,
            "{l}"
        );
    }
    verify(&env, "a", &lines);
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.path("status.json")).unwrap()).unwrap();
    let s = &status["sources"][0];
    assert_eq!(s["cycles_ok"], 4);
    assert_eq!(s["last_point"], lines[3]["point"]);
    assert!(s["lag_secs"].as_f64().unwrap() >= 0.0);
    // The same status reached the state, where the console and /metrics read it.
    let sources = env.json(&["sources"]);
    let vm = sources
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == "vm")
        .unwrap_or_else(|| panic!("{sources}"));
    assert_eq!(vm["protection"]["cycles_ok"], 4, "{vm}");
    assert_eq!(vm["protection"]["stale"], false, "{vm}");
    assert_eq!(vm["last_point"], lines[3]["point"], "{vm}");
    assert_eq!(vm["points"], 4, "{vm}");

    // A cycle that fails after its cut keeps its bitmaps; the next one merges them.
    let (lines, ok) = protect(&env, &qemu, "b", 3, Some(2));
    assert!(ok);
    assert!(lines[1].get("error").is_some(), "{lines:?}");
    let merged = lines[2]["mode"].as_str().unwrap();
    assert!(
        merged.contains("merged from interrupted cycles"),
        "{merged}"
    );
    verify(&env, "b", &lines);

    // ferry protect killed (SIGKILL) while a view is exported: the next run
    // removes what it left in the VM and merges its bitmaps.
    let mut killed = env
        .cmd()
        .args([
            "protect",
            "--vm",
            &format!("vm={}", qemu.qmp.display()),
            "--interval",
            "1s",
            "--cycles",
            "1",
        ])
        .args([
            "--work-dir",
            env.path("work").to_str().unwrap(),
            "--hook",
            "sleep 60",
        ])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !files_under(&env.path("work"))
        .iter()
        .any(|f| f.to_string_lossy().contains("nbd-"))
    {
        assert!(
            Instant::now() < deadline,
            "the killed run never exported its view"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    killed.kill().unwrap();
    killed.wait().unwrap();
    let (lines, ok) = protect(&env, &qemu, "k", 2, None);
    assert!(ok, "{lines:?}");
    assert!(
        lines[0]["mode"]
            .as_str()
            .unwrap()
            .contains("merged from interrupted cycles"),
        "{lines:?}"
    );
    verify(&env, "k", &lines);

    // QEMU killed: its bitmaps are lost. Restarted, the chain is broken: full read, and say so.
    qemu.kill("-KILL");
    drop(qemu);
    let qemu = Qemu::boot_writer(&env, &guest, &disk, 400);
    let (lines, ok) = protect(&env, &qemu, "c", 2, None);
    assert!(ok, "{lines:?}");
    let mode = lines[0]["mode"].as_str().unwrap();
    assert!(
        mode.starts_with("full read:") && mode.contains("is gone"),
        "{mode}"
    );
    assert!(
        lines[1]["mode"]
            .as_str()
            .unwrap()
            .starts_with("incremental"),
        "{lines:?}"
    );
    verify(&env, "c", &lines);

    // The VM gone: the cycle fails, saying what to check, and nothing is committed.
    qemu.kill("-KILL");
    let before = env.json(&["points"]).as_array().unwrap().len();
    let (lines, ok) = protect(&env, &qemu, "d", 1, None);
    assert!(!ok);
    let err = lines[0]["error"].as_str().unwrap();
    assert!(err.contains("is the VM running"), "{err}");
    assert_eq!(env.json(&["points"]).as_array().unwrap().len(), before);
    env.ok(&["check", "--read-data"]);
}

#[test]
fn a_vm_runs_from_a_served_recovery_point() {
    let Some(guest) = guest() else { return };
    let env = Env::new();
    env.init();
    // An ext4 disk with a web page, protected as an image file.
    let www = env.path("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "ferry instant restore works\n").unwrap();
    let img = env.path("web.img");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&www)
        .arg(&img)
        .arg("64M")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let s = env.backup("web", &[&img]);
    std::fs::remove_file(&img).unwrap();

    // Serve the point writable (the guest mounts it read-write) and boot from it.
    let overlay = env.path("overlay.img");
    let mut serve = env
        .cmd()
        .args([
            "--json",
            "serve-nbd",
            s["point"].as_str().unwrap(),
            "--overlay",
        ])
        .arg(&overlay)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(serve.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    // The default: a unix socket only this user can open.
    let url = v["url"].as_str().unwrap();
    let (export, socket) = url
        .trim_start_matches("nbd+unix:///")
        .split_once("?socket=")
        .unwrap();
    let web_port = free_port();
    let qemu = Qemu::boot(
        &env,
        &guest,
        "web",
        "ferry.mode=web",
        &[format!(
            "driver=raw,node-name=disk0,file.driver=nbd,file.server.type=unix,file.server.path={socket},file.export={export}"
        )],
        &[
            "-netdev".into(),
            format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{web_port}-:80"),
            "-device".into(),
            "virtio-net-pci,netdev=n0,romfile=".into(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let page = loop {
        let out = Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "2",
                &format!("http://127.0.0.1:{web_port}/index.html"),
            ])
            .output()
            .unwrap();
        if out.status.success() && !out.stdout.is_empty() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the VM never served the page:\n{}",
            std::fs::read_to_string(&qemu.serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(page, "ferry instant restore works\n");
    drop(qemu);
    let _ = serve.kill();
    let _ = serve.wait();
    // A killed server leaves its private directory behind.
    let _ = std::fs::remove_dir_all(Path::new(socket).parent().unwrap());
}

/// The sequence number in block 0 of a disk the pair writer wrote.
fn pair_seq(path: &Path) -> u64 {
    use std::io::Read as _;
    let mut line = [0u8; 64];
    std::fs::File::open(path)
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    let s = String::from_utf8_lossy(&line);
    if line.iter().all(|&b| b == 0) {
        return 0;
    }
    s.strip_prefix("FERRYPAIR seq=")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{} block 0 is not a pair line: {s:?}", path.display()))
}

/// Two disks of one VM are one consistency group: each cycle cuts both in one
/// QMP transaction and commits one point, so the guest's pair writer (block 0
/// of vda, then block 0 of vdb, same sequence number) is seen in every point
/// with vda's number equal to vdb's or one ahead, never further apart. Before,
/// two `--vm` entries on one socket ran as two sources whose cycles tore down
/// each other's exports.
#[test]
fn two_disks_of_one_vm_are_cut_at_one_instant() {
    let Some(guest) = guest() else { return };
    let env = Env::new();
    env.init();
    let mut drive = Vec::new();
    for (i, name) in ["a", "b"].iter().enumerate() {
        let disk = blank_qcow2(&env, &format!("{name}.qcow2"), "16M");
        drive.push(format!(
            "driver=file,filename={},node-name=file{i}",
            disk.display()
        ));
        drive.push(format!("driver=qcow2,file=file{i},node-name=disk{i}"));
    }
    let qemu = Qemu::boot(
        &env,
        &guest,
        "pair",
        "ferry.mode=pair ferry.rate=300",
        &drive,
        &["-device".into(), "virtio-blk-pci,drive=disk1".into()],
    );
    qemu.wait_serial("ferry-pair: t=2", Duration::from_secs(90));

    let sock = qemu.qmp.display().to_string();
    let hook = format!(
        "qemu-img convert -f raw -O raw \"$FERRY_NBD_URL\" {}/truth-$FERRY_CYCLE-$FERRY_DISK.raw",
        env.dir.path().display()
    );
    let out = env.run(&[
        "--json",
        "protect",
        "--vm",
        &format!("db={sock},node=disk0,disk=vda"),
        "--vm",
        &format!("db={sock},node=disk1,disk=vdb"),
        "--interval",
        "1s",
        "--cycles",
        "4",
        "--work-dir",
        env.path("work").to_str().unwrap(),
        "--hook",
        &hook,
    ]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        out.status.success(),
        "{lines:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines.len(), 4, "{lines:?}");
    let first = lines[0]["mode"].as_str().unwrap();
    assert!(
        first.starts_with("vda: full read: first point") && first.contains("; vdb: full read"),
        "{first}"
    );
    let mut seqs = Vec::new();
    for l in &lines {
        let cycle = &l["cycle"];
        if cycle.as_u64() > Some(1) {
            let mode = l["mode"].as_str().unwrap();
            assert!(
                mode.starts_with("vda: incremental") && mode.contains("; vdb: incremental"),
                "{mode}"
            );
        }
        let point = l["point"].as_str().unwrap();
        let points = env.json(&["points", "--source", "db"]);
        let shown = points
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == point)
            .unwrap_or_else(|| panic!("{points}"));
        let disks: Vec<&str> = shown["disks"]
            .as_array()
            .unwrap_or_else(|| panic!("{shown}"))
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        assert_eq!(disks, ["vda", "vdb"], "one point holds both disks");
        let mut seq = Vec::new();
        for disk in ["vda", "vdb"] {
            let out = env.path(&format!("restored-{cycle}-{disk}.raw"));
            env.ok(&[
                "restore",
                point,
                "--disk",
                disk,
                "--to",
                out.to_str().unwrap(),
            ]);
            let truth = env.path(&format!("truth-{cycle}-{disk}.raw"));
            assert!(
                same_content(&out, &truth),
                "cycle {cycle}: {disk} differs from the guest's view at the cut"
            );
            seq.push(pair_seq(&out));
        }
        let (a, b) = (seq[0], seq[1]);
        assert!(
            a > 0 && (a == b || a == b + 1),
            "cycle {cycle}: vda holds pair {a} and vdb pair {b}: the disks were not cut at one instant"
        );
        seqs.push(a);
    }
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "the writer kept writing between cycles: {seqs:?}"
    );
    // One name on two sockets, or two names on one socket, is refused up front.
    let out = env.run(&[
        "protect",
        "--vm",
        &format!("db={sock},node=disk0"),
        "--vm",
        &format!("web={sock},node=disk1"),
        "--cycles",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the disks of one VM take one NAME"), "{err}");
    env.ok(&["check", "--read-data"]);
}

/// Two VMs of one application are cut at one instant with `--together`:
/// VM a writes a number to its disk and only then sends it (its second
/// serial port, copied by this test to b's), and b writes each number it
/// receives. In every round b's point may lag a's but never holds a number
/// a's point does not: both were paused before either was cut. Each round
/// reports how long the VMs were paused.
#[test]
fn vms_of_one_application_are_cut_together() {
    use std::io::{Read as _, Write as _};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(guest) = guest() else { return };
    let env = Env::new();
    env.init();
    let boot = |tag: &str, mode: &str| {
        let disk = blank_qcow2(&env, &format!("{tag}.qcow2"), "16M");
        let tty = env.path(&format!("{tag}.tty"));
        let q = Qemu::boot(
            &env,
            &guest,
            tag,
            &format!("ferry.mode={mode} ferry.rate=200"),
            &[
                format!("driver=file,filename={},node-name=file0", disk.display()),
                "driver=qcow2,file=file0,node-name=disk0".into(),
            ],
            &[
                "-serial".into(),
                format!("unix:{},server=on,wait=off", tty.display()),
            ],
        );
        (q, tty)
    };
    let (a, a_tty) = boot("a", "relay-send");
    let (b, b_tty) = boot("b", "relay-recv");
    let stop = Arc::new(AtomicBool::new(false));
    let relay = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let connect = |p: &Path| {
                for _ in 0..300 {
                    if let Ok(s) = UnixStream::connect(p) {
                        return s;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                panic!("no serial socket at {}", p.display());
            };
            let (mut from, mut to) = (connect(&a_tty), connect(&b_tty));
            from.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => to.write_all(&buf[..n]).unwrap(),
                    Err(_) => {}
                }
            }
        })
    };
    a.wait_serial("ferry-pair: t=2 sent", Duration::from_secs(90));
    b.wait_serial("received=", Duration::from_secs(90));

    let hook = format!(
        "qemu-img convert -f raw -O raw \"$FERRY_NBD_URL\" {}/truth-$FERRY_SOURCE-$FERRY_CYCLE.raw",
        env.dir.path().display()
    );
    // 300 ms between the two cuts: b would receive some 60 numbers meanwhile
    // if it were not paused (without the pause this test fails).
    let out = env
        .cmd()
        .env("FERRY_TEST_GROUP_CUT_GAP_MS", "300")
        .args([
            "--json",
            "protect",
            "--together",
            "--vm",
            &format!("a={}", a.qmp.display()),
            "--vm",
            &format!("b={}", b.qmp.display()),
            "--interval",
            "1s",
            "--cycles",
            "3",
            "--work-dir",
            env.path("work").to_str().unwrap(),
            "--hook",
            &hook,
        ])
        .output()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    relay.join().unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        out.status.success(),
        "{lines:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines.len(), 6, "{lines:?}");
    let mut last = 0;
    for cycle in 1..=3u64 {
        let mut seq = std::collections::BTreeMap::new();
        for l in lines.iter().filter(|l| l["cycle"] == cycle) {
            let source = l["source"].as_str().unwrap();
            let pause = l["group_pause_secs"].as_f64().unwrap();
            let skew = l["group_skew_secs"].as_f64().unwrap();
            assert!(pause < 2.0 && (0.3..=pause).contains(&skew), "{l}");
            let restored = env.path(&format!("restored-{source}-{cycle}.raw"));
            env.ok(&[
                "restore",
                l["point"].as_str().unwrap(),
                "--to",
                restored.to_str().unwrap(),
            ]);
            let truth = env.path(&format!("truth-{source}-{cycle}.raw"));
            assert!(same_content(&restored, &truth), "{source} cycle {cycle}");
            seq.insert(source.to_owned(), pair_seq(&restored));
        }
        let (sa, sb) = (seq["a"], seq["b"]);
        assert!(
            sb > 0 && sb <= sa,
            "round {cycle}: b holds {sb}, which a (at {sa}) had not written yet: the VMs were not cut at one instant"
        );
        assert!(sa > last, "a kept writing: {sa} after {last}");
        last = sa;
    }
    drop((a, b));
}
