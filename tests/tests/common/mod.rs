//! Helpers for end-to-end tests: run the real `ferry` binary on real files.
#![allow(dead_code)]
pub mod libvirt;
pub mod servers;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `ferry` binary built next to this test (scripts/test builds it first).
pub fn ferry_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FERRY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("ferry");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p ferry-orchestrator` first (scripts/test does)",
        bin.display()
    );
    bin
}

/// A scratch directory with a repository path and a password.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    /// What FERRY_REPO is set to: the `repo` directory unless a test points it
    /// at an object store.
    pub location: String,
    /// Extra environment for every ferry process (credentials, endpoints, faults).
    pub vars: Vec<(String, String)>,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir_in(
            std::env::var("FERRY_TEST_TMP").unwrap_or_else(|_| "/var/tmp".into()),
        )
        .expect("temp dir");
        let repo = dir.path().join("repo");
        let location = repo.display().to_string();
        Env {
            dir,
            repo,
            location,
            vars: Vec::new(),
        }
    }

    /// An environment whose repository is at `location` (a URL), reached with `vars`.
    pub fn at(location: &str, vars: Vec<(String, String)>) -> Env {
        let mut e = Env::new();
        e.location = location.to_string();
        e.vars = vars;
        e
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(ferry_bin());
        // Ferry's home (its state) inside the test's directory: `check` and
        // `protect` record what they find there, never in the user's home.
        c.env("FERRY_REPO", &self.location)
            .env("FERRY_HOME", self.dir.path().join("home"))
            .env_remove("FERRY_STATE")
            .env("FERRY_PASSWORD", "correct horse")
            .env_remove("FERRY_PASSWORD_FILE")
            .env_remove("FERRY_LOG")
            .env_remove("FERRY_FAULTS")
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .arg("--quiet");
        c
    }

    /// Run ferry with arguments; returns the output whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("ferry runs")
    }

    /// Run ferry and insist on success.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ferry {args:?} failed with {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Run ferry with --json and parse stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).expect("JSON output")
    }

    /// Run ferry with --json and parse stdout, whatever the exit code.
    pub fn json_allow_fail(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    pub fn init(&self) {
        self.ok(&["init"]);
    }

    /// Back up and return the JSON summary.
    pub fn backup(&self, source: &str, disks: &[&Path]) -> serde_json::Value {
        let mut a = vec!["backup", "--source", source];
        let ds: Vec<String> = disks.iter().map(|d| d.display().to_string()).collect();
        a.extend(ds.iter().map(String::as_str));
        self.json(&a)
    }
}

/// A deterministic pseudo-random generator (xorshift), so tests need no crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A sparse image of `size` bytes: random data in some places, compressible text in
/// others, real zeros, and holes.
pub fn make_image(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    let mut rng = Rng(seed | 1);
    let mut off = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        // Patterns change every 4 MiB, the read segment, so whole segments are holes.
        match (off >> 22) % 4 {
            0 => {
                rng.fill(&mut buf[..n]);
                f.write_all_at(&buf[..n], off).expect("write");
            }
            1 => {
                let text =
                    format!("line {seed} of a log file that compresses well\n").repeat(n / 40 + 1);
                f.write_all_at(&text.as_bytes()[..n], off).expect("write");
            }
            2 => f.write_all_at(&vec![0u8; n], off).expect("write zeros"),
            _ => {} // hole
        }
        off += n as u64;
    }
    f.sync_all().expect("sync");
}

/// `size` bytes (whole MiB) of random data only, so every chunk is new and
/// packs keep being written.
pub fn random_image(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).expect("create image");
    let mut buf = vec![0u8; 1 << 20];
    let mut rng = Rng(seed);
    let mut w = std::io::BufWriter::new(f);
    for _ in 0..size >> 20 {
        rng.fill(&mut buf);
        std::io::Write::write_all(&mut w, &buf).expect("write image");
    }
}

/// Overwrite `count` random 4 KiB blocks with random data.
pub fn scatter_writes(path: &Path, count: usize, seed: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    let size = f.metadata().expect("meta").len();
    let mut rng = Rng(seed | 1);
    let mut block = vec![0u8; 4096];
    for _ in 0..count {
        rng.fill(&mut block);
        let at = rng.below(size / 4096) * 4096;
        f.write_all_at(&block, at).expect("write");
    }
}

pub fn same_content(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read a") == std::fs::read(b).expect("read b")
}

/// `curl ARGS...` (30 s at most): the HTTP status (0 when there was none)
/// and the body.
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-m", "30", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file under a directory (recursively).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        // A directory that does not exist (yet, or any more) holds nothing.
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Say why a test that needs root cannot run here, and return so the caller
/// skips; under CI (which runs as root) this fails the test instead.
pub fn skip_without_root(what: &str) {
    eprintln!("skipped: cannot {what} (not root?)");
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "CI must be able to {what}"
    );
}

/// QEMU processes of a run's VMs still alive (the local target names them
/// `ferry-RUN-NODE`).
pub fn qemu_processes_named(run: &str) -> usize {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("-name ferry-{run}-")])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// An environment whose ferry processes reach moto as AWS, with its own
/// home.
pub fn moto_env(moto: &servers::Moto) -> Env {
    let mut e = Env::new();
    e.vars = moto.env();
    e.vars.push((
        "FERRY_HOME".into(),
        e.dir.path().join("home").display().to_string(),
    ));
    e
}

/// Run the ignored test `name` of this test binary in a child process, with
/// the environment `apply` gives it (a server's credentials and endpoint, which
/// a threaded test process cannot set safely), and fail with its output if it
/// fails. Returns what it printed.
pub fn run_child(name: &str, apply: impl FnOnce(&mut Command) -> &mut Command) -> String {
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    apply(&mut cmd);
    let out = cmd.output().expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A `ferry --json serve` started by [`serve`], stopped (by PID) when dropped.
pub struct Served {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`, as the server printed it.
    pub url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `cmd` with its output discarded, kill it (SIGKILL) after `after`,
/// and reap it: a crash at a moment of the test's choosing.
pub fn kill_after(cmd: &mut Command, after: std::time::Duration) {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the command starts");
    std::thread::sleep(after);
    let _ = child.kill();
    let _ = child.wait();
}

/// A child process killed and reaped when dropped, however the test ends.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` (a `ferry` command set up by the caller) as `--json serve
/// --listen 127.0.0.1:0 EXTRA...` and waits for the line with its URL.
pub fn serve(mut cmd: Command, extra: &[&std::ffi::OsStr]) -> Served {
    use std::io::BufRead as _;
    let mut child = cmd
        .args(["--json", "serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ferry serve starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("ferry serve prints its address");
    // Owned before parsing, so a bad line still stops the server.
    let mut served = Served {
        child,
        url: String::new(),
    };
    let info: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("ferry serve printed {line:?}: {e}"));
    served.url = info["url"].as_str().expect("url").to_owned();
    served
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate it
/// signed, laid out as QEMU's `tls-creds-x509` and libnbd's `tls-certificates`
/// read a client's directory (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`),
/// with the server's files beside them.
pub fn make_pki(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).expect("pki directory");
    let ca_key = KeyPair::generate().expect("rcgen");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("rcgen");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Names of their own: with rcgen's default name on both, OpenSSL takes
    // the leaf for a self-signed certificate.
    ca.distinguished_name
        .push(DnType::CommonName, "Ferry test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca.self_signed(&ca_key).expect("rcgen");
    let leaf = |names: Vec<String>, usage| {
        let key = KeyPair::generate().expect("rcgen");
        let cn = names[0].clone();
        let mut p = CertificateParams::new(names).expect("rcgen");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &ca, &ca_key).expect("rcgen");
        (cert.pem(), key.serialize_pem())
    };
    let (sc, sk) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (cc, ck) = leaf(vec!["client".into()], ExtendedKeyUsagePurpose::ClientAuth);
    for (name, pem) in [
        ("ca-cert.pem", ca.pem()),
        ("server-cert.pem", sc),
        ("server-key.pem", sk),
        ("client-cert.pem", cc),
        ("client-key.pem", ck),
    ] {
        std::fs::write(dir.join(name), pem).expect("pki file");
    }
}

/// `DIR` built (once per machine, cached) by `scripts/SCRIPT DIR`, when the
/// machine has the tools `have` checks (a shell test); `None` (the test
/// skips) otherwise, which CI must not see.
fn built_by(script: &str, dir: &str, have: &str, tools: &str) -> Option<PathBuf> {
    let ok = Command::new("sh")
        .args(["-c", have])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: {tools} missing (scripts/setup-vm installs them)");
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must have {tools}"
        );
        return None;
    }
    let dir = PathBuf::from(dir);
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(script);
    let st = Command::new("bash")
        .arg(&path)
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
    assert!(st.success(), "scripts/{script} failed");
    Some(dir)
}

/// The guest kernel and initrd, built once per machine by scripts/make-guest.
pub fn guest() -> Option<PathBuf> {
    built_by(
        "make-guest",
        "/var/tmp/ferry-tools/guest",
        "command -v qemu-system-x86_64 && ls /boot/vmlinuz-*",
        "qemu-system-x86_64 or a kernel is",
    )
}

/// The example stack's images and guest, built once per machine by
/// scripts/make-stack.
pub fn stack() -> Option<PathBuf> {
    built_by(
        "make-stack",
        "/var/tmp/ferry-tools/stack",
        "command -v qemu-system-x86_64 && command -v busybox && ls /boot/vmlinuz-*",
        "qemu-system-x86_64, busybox or a kernel is",
    )
}

/// Now, in UTC, to the second (`2026-12-06T10:00:00Z`), as `--before` takes it.
pub fn utc_now() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date runs");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// Waits until the guest's serial log at `serial` holds `what`; the log.
pub fn wait_serial(serial: &Path, what: &str, timeout: std::time::Duration) -> String {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(serial).unwrap_or_default();
        if log.contains(what) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never printed {what:?}:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
