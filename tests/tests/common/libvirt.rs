//! A libvirt host for tests: `virtlogd` and `libvirtd` on this machine,
//! reached at `qemu:///system`.
//!
//! scripts/setup-libvirt installs them (scripts/setup calls it). Init scripts
//! do not run on these machines, so when a daemon is not running the fixture
//! starts it in the foreground as its own child (libvirtd without `--listen`:
//! unix sockets only, nothing on any network address), and when the last test
//! holding [`Libvirtd`] drops it, stops the daemons it started by their PIDs
//! (SIGTERM, then SIGKILL after 10 s). Daemons it found running are left alone.
//!
//! Tests skip with a message when libvirt is not installed or the user is not
//! root; under CI (`CI=true`) those fail instead.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

const LIBVIRTD: &str = "/usr/sbin/libvirtd";
const VIRTLOGD: &str = "/usr/sbin/virtlogd";
const LIBVIRT_SOCK: &str = "/run/libvirt/libvirt-sock";
const VIRTLOGD_SOCK: &str = "/run/libvirt/virtlogd-sock";
/// The NAT network Debian defines; it must never start here.
const DEFAULT_NET_AUTOSTART: &str = "/etc/libvirt/qemu/networks/autostart/default.xml";
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Skip (None) with a message, or fail under CI.
fn missing<T>(msg: &str) -> Option<T> {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI needs libvirt: {msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

/// Daemons this process started, stopped when the last holder drops them.
pub struct Libvirtd {
    started: Vec<(&'static str, Child)>,
    _logs: tempfile::TempDir,
}

static SHARED: Mutex<Weak<Libvirtd>> = Mutex::new(Weak::new());

impl Libvirtd {
    /// The running daemons (started if needed); None when the test must skip.
    pub fn get() -> Option<Arc<Libvirtd>> {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = shared.upgrade() {
            return Some(d);
        }
        for bin in [LIBVIRTD, VIRTLOGD, "/usr/bin/virsh"] {
            if !Path::new(bin).exists() {
                return missing(&format!(
                    "libvirt is not installed ({bin} is missing): run scripts/setup"
                ));
            }
        }
        let root = std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        if !root {
            return missing(
                "the libvirt tests run QEMU domains through qemu:///system and need root",
            );
        }
        assert!(
            !Path::new(DEFAULT_NET_AUTOSTART).exists(),
            "{DEFAULT_NET_AUTOSTART} would start a NAT network on a non-loopback address: run scripts/setup-libvirt (it removes the link)"
        );
        let logs = tempfile::tempdir_in(
            std::env::var("FERRY_TEST_TMP").unwrap_or_else(|_| "/var/tmp".into()),
        )
        .expect("temp dir");
        let mut started = Vec::new();
        // virtlogd first: libvirtd hands QEMU's logs and consoles to it.
        for (name, bin, sock) in [
            ("virtlogd", VIRTLOGD, VIRTLOGD_SOCK),
            ("libvirtd", LIBVIRTD, LIBVIRT_SOCK),
        ] {
            if UnixStream::connect(sock).is_ok() {
                continue;
            }
            let log = logs.path().join(format!("{name}.log"));
            let out = std::fs::File::create(&log).expect("daemon log");
            let err = out.try_clone().expect("daemon log");
            let mut child = Command::new(bin)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
            let deadline = Instant::now() + START_TIMEOUT;
            while UnixStream::connect(sock).is_err() {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!(
                        "{bin} exited with {st}:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "{bin} did not listen on {sock} within {START_TIMEOUT:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("started {name} (pid {})", child.id());
            started.push((name, child));
        }
        let d = Arc::new(Libvirtd {
            started,
            _logs: logs,
        });
        *shared = Arc::downgrade(&d);
        Some(d)
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        // libvirtd before virtlogd, the reverse of starting.
        while let Some((name, mut child)) = self.started.pop() {
            let pid = child.id();
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("{name} (pid {pid}) ignored SIGTERM; killing it");
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// The guest kernel and initrd of scripts/make-guest, built once per machine,
/// copied into `dir` (libvirt hands kernel files to QEMU's user and back, so
/// tests do not share them with other tests).
pub fn guest(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let have = Command::new("sh")
        .args([
            "-c",
            "command -v qemu-system-x86_64 && ls /boot/vmlinuz-* && command -v busybox",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        return missing(
            "qemu-system-x86_64, busybox or a kernel is missing (scripts/setup-vm installs them)",
        );
    }
    let built = PathBuf::from("/var/tmp/ferry-tools/guest");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-guest");
    let st = Command::new("bash")
        .arg(&script)
        .arg(&built)
        .stdout(Stdio::null())
        .status()
        .expect("run scripts/make-guest");
    assert!(st.success(), "scripts/make-guest failed");
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.gz");
    std::fs::copy(built.join("vmlinuz"), &kernel).expect("copy the kernel");
    std::fs::copy(built.join("initrd.gz"), &initrd).expect("copy the initrd");
    Some((kernel, initrd))
}
