//! Storage servers for end-to-end tests: moto (S3 with versioning and Object
//! Lock) and Azurite (Azure Blob), each on its own port with its own temp dir,
//! stopped by PID when dropped.
//!
//! `scripts/setup-servers` (called by `scripts/setup`) installs both into
//! `$FERRY_TOOLS` (default `/var/tmp/ferry-tools`). When they are missing a
//! test skips with a message, except under CI (`CI=true`), where it fails.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Credentials moto accepts (it accepts any).
pub const AWS_KEY_ID: &str = "testing";
pub const AWS_SECRET: &str = "testing";
pub const AWS_REGION: &str = "us-east-1";

/// Azurite's well-known account and key (the same as object_store's and
/// Azurite's own built-in constants).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Where scripts/setup-servers installs the servers.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("FERRY_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/ferry-tools"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Skip (None) when a server is not installed, or fail under CI.
fn not_installed<T>(what: &str, missing: &Path) -> Option<T> {
    let msg = format!(
        "{what} not installed, run scripts/setup ({} is missing)",
        missing.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI needs the test servers: {msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

/// A scratch directory for one server (under $FERRY_TEST_TMP or /var/tmp).
fn server_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(std::env::var("FERRY_TEST_TMP").unwrap_or_else(|_| "/var/tmp".into()))
        .expect("temp dir")
}

/// The last lines of a server's log, for failure messages.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Whether process `pid` itself has a socket listening on 127.0.0.1:`port`, so
/// a server that lost a race for the port is never mistaken for ready.
fn listens(pid: u32, port: u16) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: HashSet<String> = fds
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?;
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local remote st ... inode (10th field); 0A is LISTEN.
        f.len() > 9 && f[1] == local && f[3] == "0A" && inodes.contains(f[9])
    })
}

/// `GET path` over HTTP/1.0; the status code, or None if the server did not answer.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    // "HTTP/1.x 200 OK"
    String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A server process that is killed (by PID) and reaped when dropped.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
    name: &'static str,
}

impl Server {
    /// Start `cmd` (given a port) until it listens and `ready(port)` holds.
    /// A port taken in between by someone else means another try on another port.
    fn start(
        name: &'static str,
        dir: &Path,
        mut cmd: impl FnMut(u16) -> Command,
        ready: impl Fn(u16) -> bool,
    ) -> Server {
        let log = dir.join(format!("{name}.log"));
        let mut last = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let out = std::fs::File::create(&log).expect("create server log");
            let err = out.try_clone().expect("clone log handle");
            let child = cmd(port)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
            let mut server = Server {
                child,
                port,
                log: log.clone(),
                name,
            };
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Ok(Some(status)) = server.child.try_wait() {
                    last = format!("{name} exited with {status}:\n{}", log_tail(&log));
                    break; // and try another port
                }
                if listens(server.child.id(), port) && ready(port) {
                    return server;
                }
                if Instant::now() > deadline {
                    panic!(
                        "{name} did not get ready on port {port} within {START_TIMEOUT:?}:\n{}",
                        log_tail(&log)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("{last}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's PID only.
        if let Err(e) = self.child.kill() {
            eprintln!("stopping {} (pid {}): {e}", self.name, self.child.id());
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "{} log ({}), last lines:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
    }
}

/// Remove the common leading indentation of a script, so tests can write
/// Python in an indented raw string.
fn dedent(script: &str) -> String {
    let indent = script
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    script
        .lines()
        .map(|l| l.get(indent..).unwrap_or("").trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Run a Python script with the tools venv's interpreter and return stdout;
/// panic with stderr if it fails.
fn run_python(script: &str, args: &[&str]) -> String {
    let python = tools_dir().join("moto/bin/python");
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        // Keep a developer's own AWS settings out of the way.
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_DEFAULT_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "python failed with {}\n--- script:\n{script}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`Moto::python_args`] for a moto at `endpoint` (a child process that was
/// handed the server's environment, not the server).
pub fn s3_python(endpoint: &str, script: &str, args: &[&str]) -> String {
    let full = format!(
        "import sys, json, boto3\n\
         s3 = boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='{AWS_KEY_ID}', \
         aws_secret_access_key='{AWS_SECRET}', region_name='{AWS_REGION}')\n{}\n",
        dedent(script)
    );
    run_python(&full, args)
}

/// Environment variables a command must not inherit when it is pointed at a
/// test server (they would override or confuse the ones we set).
const CLEARED_ENV: &[&str] = &[
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT",
    "AWS_ENDPOINT_URL_S3",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "AZURE_STORAGE_ENDPOINT",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_TOKEN",
    "AZURE_STORAGE_CLIENT_ID",
    "AZURE_CLIENT_ID",
];

fn apply_env<'c>(cmd: &'c mut Command, env: &[(String, String)]) -> &'c mut Command {
    for k in CLEARED_ENV {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// A moto S3 server (versioning, Object Lock, legal hold) on 127.0.0.1.
pub struct Moto {
    pub port: u16,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    server: Server,
    dir: tempfile::TempDir,
}

impl Moto {
    /// Start a fresh moto; None (test skipped) when it is not installed and
    /// this is not CI.
    pub fn start() -> Option<Moto> {
        let bin = tools_dir().join("moto/bin/moto_server");
        if !bin.exists() {
            return not_installed("moto", &bin);
        }
        let dir = server_dir();
        let server = Server::start(
            "moto",
            dir.path(),
            |port| {
                let mut c = Command::new(&bin);
                c.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
                c
            },
            |port| http_status(port, "/moto-api/") == Some(200),
        );
        let port = server.port;
        Some(Moto {
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            server,
            dir,
        })
    }

    /// The server's scratch directory (its log is `moto.log` there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Create a bucket in us-east-1; with `object_lock`, with Object Lock
    /// enabled (which also turns versioning on).
    pub fn create_bucket(&self, name: &str, object_lock: bool) {
        self.python_args(
            "s3.create_bucket(Bucket=sys.argv[1], ObjectLockEnabledForBucket=sys.argv[2] == '1')",
            &[name, if object_lock { "1" } else { "0" }],
        );
    }

    /// Run a Python snippet that has `s3` (a boto3 S3 client for this server),
    /// `boto3`, `json` and `sys` at hand; returns its stdout, panics with its
    /// stderr if it fails. Indentation common to all lines is removed.
    pub fn python(&self, script: &str) -> String {
        self.python_args(script, &[])
    }

    /// The storage class of every object under `prefix` in `bucket`, by key.
    pub fn storage_classes(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> serde_json::Map<String, serde_json::Value> {
        let out = self.python_args(
            r#"
            out = {}
            for o in s3.list_objects_v2(Bucket=sys.argv[1], Prefix=sys.argv[2])['Contents']:
                out[o['Key']] = o.get('StorageClass', 'STANDARD')
            print(json.dumps(out))
            "#,
            &[bucket, prefix],
        );
        serde_json::from_str(&out).expect("storage classes as JSON")
    }

    /// Like [`Moto::python`], with `sys.argv[1..]` set to `args`.
    pub fn python_args(&self, script: &str, args: &[&str]) -> String {
        s3_python(&self.endpoint, script, args)
    }

    /// What a `ferry` process needs to reach this server through object_store's
    /// `AmazonS3Builder::from_env` (path-style requests are its default).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", AWS_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", AWS_SECRET),
            ("AWS_REGION", AWS_REGION),
            ("AWS_ENDPOINT_URL", &self.endpoint),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Set [`Moto::env`] on a command and clear AWS variables that would interfere.
    pub fn apply<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        apply_env(cmd, &self.env())
    }

    /// The PID of the server process.
    pub fn pid(&self) -> u32 {
        self.server.child.id()
    }
}

/// An Azurite Blob server on 127.0.0.1 with its data in a temp dir.
pub struct Azurite {
    pub port: u16,
    /// `http://127.0.0.1:PORT` (blobs are under `/devstoreaccount1/`).
    pub endpoint: String,
    server: Server,
    dir: tempfile::TempDir,
}

impl Azurite {
    /// Start a fresh Azurite; None (test skipped) when it is not installed and
    /// this is not CI.
    pub fn start() -> Option<Azurite> {
        let bin = tools_dir().join("azurite/node_modules/.bin/azurite-blob");
        if !bin.exists() {
            return not_installed("azurite", &bin);
        }
        let dir = server_dir();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("azurite data dir");
        let server = Server::start(
            "azurite",
            dir.path(),
            |port| {
                let mut c = Command::new(&bin);
                c.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                    .arg("--location")
                    .arg(&data)
                    .args(["--skipApiVersionCheck", "--loose", "--disableTelemetry"]);
                c
            },
            |port| TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        let port = server.port;
        Some(Azurite {
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            server,
            dir,
        })
    }

    /// The server's scratch directory (`azurite.log` and `data/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The connection string Azure SDKs take for this server.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};\
             BlobEndpoint={}/{AZURITE_ACCOUNT};",
            self.endpoint
        )
    }

    /// Create a blob container.
    pub fn create_container(&self, name: &str) {
        self.python_args("service.create_container(sys.argv[1])", &[name]);
    }

    /// Run a Python snippet that has `service` (an azure-storage-blob
    /// `BlobServiceClient` for this server), `json` and `sys` at hand; returns
    /// its stdout, panics with its stderr if it fails.
    pub fn python(&self, script: &str) -> String {
        self.python_args(script, &[])
    }

    /// Like [`Azurite::python`], with `sys.argv[1..]` set to `args`.
    pub fn python_args(&self, script: &str, args: &[&str]) -> String {
        let full = format!(
            "import sys, json\n\
             from azure.storage.blob import BlobServiceClient\n\
             service = BlobServiceClient.from_connection_string('{}')\n{}\n",
            self.connection_string(),
            dedent(script)
        );
        run_python(&full, args)
    }

    /// What a `ferry` process needs to reach this server through object_store's
    /// `MicrosoftAzureBuilder::from_env`: emulator mode, whose URL object_store
    /// reads from `AZURITE_BLOB_STORAGE_URL` (it ignores `AZURE_STORAGE_ENDPOINT`
    /// in emulator mode, and emulator mode already allows plain HTTP).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT),
            ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY),
            ("AZURE_STORAGE_USE_EMULATOR", "true"),
            ("AZURITE_BLOB_STORAGE_URL", &self.endpoint),
            ("AZURE_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Set [`Azurite::env`] on a command and clear Azure variables that would interfere.
    pub fn apply<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        apply_env(cmd, &self.env())
    }

    /// The PID of the server process.
    pub fn pid(&self) -> u32 {
        self.server.child.id()
    }
}
