//! The local target: volumes are image files in the run's work directory,
//! instances are QEMU VMs under software emulation on user-mode networks.

use super::{ActionError, Call, Ctx, Outputs, file_stem};
use anyhow::Context;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn path_in(ctx: &Ctx, node: &str, ext: &str) -> PathBuf {
    ctx.work_dir.join(format!("{}.{ext}", file_stem(node)))
}

/// Opens the repository named by the call's `repo` input, else the run's.
pub(super) fn open_repo(ctx: &Ctx, call: &Call) -> Result<ferry_agent::Repository, ActionError> {
    let location = call
        .str("repo")
        .filter(|s| !s.is_empty())
        .or_else(|| ctx.repo.clone())
        .ok_or_else(|| {
            ActionError::permanent(
                "no repository: pass -r/--repo (or FERRY_REPO), or give the step a `repo` input",
            )
        })?;
    let password = ctx.password.clone().ok_or_else(|| {
        ActionError::permanent("no repository password: set FERRY_PASSWORD or pass --password-file")
    })?;
    let store = ferry_connectors::store::open(&location, false).map_err(ActionError::from)?;
    ferry_agent::Repository::open(store, &password)
        .map_err(|e| ActionError::from(anyhow::Error::from(e)))
}

/// The index of the disk `name` in a point (its only disk when `None`).
pub(super) fn disk_index(
    point: &ferry_agent::point::Point,
    name: Option<&str>,
) -> Result<usize, ActionError> {
    let names: Vec<&str> = point.meta.disks.iter().map(|d| d.name.as_str()).collect();
    match name {
        Some(n) => names.iter().position(|d| *d == n).ok_or_else(|| {
            ActionError::permanent(format!(
                "point {} has no disk `{n}`; it has {}",
                point.short_id(),
                names.join(", ")
            ))
        }),
        None if names.len() == 1 => Ok(0),
        None => Err(ActionError::permanent(format!(
            "point {} has {} disks ({}); say which with `disk:`",
            point.short_id(),
            names.len(),
            names.join(", ")
        ))),
    }
}

/// `volume.restore`: restores one disk to `WORK/NODE.raw` (resuming a partial
/// restore), converts it to qcow2 if asked, and records what it made in
/// `WORK/NODE.done`; a later try finds that and returns the same outputs.
pub(super) async fn volume_restore(ctx: Arc<Ctx>, call: Call) -> Result<Outputs, ActionError> {
    let done = path_in(&ctx, &call.node, "done");
    if let Ok(text) = std::fs::read_to_string(&done)
        && let Ok(Value::Object(o)) = serde_json::from_str(&text)
    {
        return Ok(o);
    }
    let format = call.str("format").unwrap_or_else(|| "raw".into());
    if format != "raw" && format != "qcow2" {
        return Err(ActionError::permanent(format!(
            "format `{format}`: use raw or qcow2"
        )));
    }
    let raw = path_in(&ctx, &call.node, "raw");
    // One restore into a path at a time: a try that replaces a timed-out or
    // cancelled one waits for its thread to notice and stop.
    let busy = Busy::claim(raw.clone()).await;
    let progress = Arc::new(ferry_agent::progress::Progress::default());
    // Dropping this try (its timeout, a cancelled run) stops the restore at
    // its next chunk instead of letting it run on unseen.
    let _stop = CancelOnDrop(progress.clone());
    let ctx2 = ctx.clone();
    let call2 = call.clone();
    let raw2 = raw.clone();
    let mut out = tokio::task::spawn_blocking(move || -> Result<Outputs, ActionError> {
        let _busy = busy;
        let repo = open_repo(&ctx2, &call2)?;
        let point = repo
            .resolve(&call2.need("point")?)
            .map_err(|e| ActionError::from(anyhow::Error::from(e)))?;
        let disk = disk_index(&point, call2.str("disk").as_deref())?;
        let meta = &point.meta.disks[disk];
        if !raw2.exists() {
            ferry_agent::restore::restore(
                &repo,
                &point,
                &ferry_agent::restore::RestoreOptions {
                    target: raw2.clone(),
                    disk: Some(meta.name.clone()),
                    overwrite: false,
                },
                &progress,
            )
            .map_err(|e| ActionError::from(anyhow::Error::from(e)))?;
        }
        let rpo = (ctx2.started_ms - point.meta.time.timestamp_millis()) as f64 / 1000.0;
        let mut o = Outputs::new();
        o.insert("point".into(), json!(point.id));
        o.insert("source".into(), json!(point.meta.source));
        o.insert("disk".into(), json!(meta.name));
        o.insert("point_time".into(), json!(point.meta.time.to_rfc3339()));
        o.insert("rpo_secs".into(), json!(rpo));
        o.insert("size".into(), json!(meta.size));
        Ok(o)
    })
    .await
    .map_err(|e| ActionError::transient(format!("restore task: {e}")))??;
    let path = if format == "qcow2" {
        let q = path_in(&ctx, &call.node, "qcow2");
        let tmp = path_in(&ctx, &call.node, "qcow2.tmp");
        run_tool(
            "qemu-img",
            &[
                "convert",
                "-O",
                "qcow2",
                &raw.to_string_lossy(),
                &tmp.to_string_lossy(),
            ],
        )
        .await?;
        std::fs::rename(&tmp, &q)
            .map_err(|e| ActionError::permanent(format!("{}: {e}", q.display())))?;
        let _ = std::fs::remove_file(&raw);
        q
    } else {
        raw
    };
    out.insert("path".into(), json!(path.to_string_lossy()));
    out.insert("format".into(), json!(format));
    write_atomic(
        &done,
        serde_json::to_string(&out).unwrap_or_default().as_bytes(),
    )?;
    Ok(out)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ActionError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| ActionError::permanent(format!("cannot write {}: {e}", path.display())))
}

async fn run_tool(prog: &str, args: &[&str]) -> Result<String, ActionError> {
    let out = tokio::process::Command::new(prog)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            ActionError::permanent(format!("cannot run {prog}: {e} (run scripts/setup-vm)"))
        })?;
    if !out.status.success() {
        return Err(ActionError::permanent(format!(
            "{prog} {}: {}",
            args.join(" "),
            super::clip(&out.stderr)
        )));
    }
    Ok(super::clip(&out.stdout))
}

/// `volume.create`: an empty image; an existing one (an earlier try) is kept.
pub(super) async fn volume_create(ctx: &Ctx, call: &Call) -> Result<Outputs, ActionError> {
    let format = call.str("format").unwrap_or_else(|| "raw".into());
    if format != "raw" && format != "qcow2" {
        return Err(ActionError::permanent(format!(
            "format `{format}`: use raw or qcow2"
        )));
    }
    let path = path_in(ctx, &call.node, &format);
    if !path.exists() {
        let tmp = path_in(ctx, &call.node, &format!("{format}.tmp"));
        run_tool(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                &format,
                &tmp.to_string_lossy(),
                &call.need("size")?,
            ],
        )
        .await?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| ActionError::permanent(format!("{}: {e}", path.display())))?;
    }
    let mut o = Outputs::new();
    o.insert("path".into(), json!(path.to_string_lossy()));
    o.insert("format".into(), json!(format));
    Ok(o)
}

/// Paths a restore thread is writing. A blocking thread cannot be aborted,
/// only asked to stop, so whoever comes next (another try, the undo) waits
/// for it here.
static BUSY: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// The right to write one path; released when dropped (on the thread that
/// did the writing).
pub(super) struct Busy(PathBuf);

impl Busy {
    pub(super) async fn claim(path: PathBuf) -> Busy {
        loop {
            {
                let mut busy = BUSY
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if !busy.contains(&path) {
                    busy.push(path.clone());
                    return Busy(path);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|p| *p != self.0);
    }
}

/// Asks a blocking operation to stop when the try that started it is
/// dropped (its timeout, a cancelled run).
pub(super) struct CancelOnDrop(pub(super) Arc<ferry_agent::progress::Progress>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Removes every file a volume step made (finished or partial), once no
/// restore thread is still writing them.
pub(super) async fn volume_delete(ctx: &Ctx, node: &str) -> Result<(), ActionError> {
    let _busy = Busy::claim(path_in(ctx, node, "raw")).await;
    let prefix = format!("{}.", file_stem(node));
    let Ok(dir) = std::fs::read_dir(&ctx.work_dir) else {
        return Ok(());
    };
    for e in dir.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            std::fs::remove_file(e.path()).map_err(|err| {
                ActionError::transient(format!("cannot remove {}: {err}", e.path().display()))
            })?;
        }
    }
    Ok(())
}

/// The QEMU process name of an instance: unique per run and node.
fn vm_name(ctx: &Ctx, node: &str) -> String {
    format!("ferry-{}-{}", ctx.run_id, file_stem(node))
}

/// The pid in `pidfile`, if that process is alive and is the VM `name`.
fn live_vm(pidfile: &Path, name: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"-name" && w[1] == name.as_bytes())
        .then_some(pid)
}

fn free_port() -> Result<u16, ActionError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ActionError::transient(format!("no free port on 127.0.0.1: {e}")))
}

/// `instance.launch`: boots a VM, or adopts the one an earlier try of the
/// same step left running (found by its pid file and name).
pub(super) async fn instance_launch(ctx: &Ctx, call: &Call) -> Result<Outputs, ActionError> {
    let name = vm_name(ctx, &call.node);
    let pidfile = path_in(ctx, &call.node, "pid");
    let console = path_in(ctx, &call.node, "console");
    let plan_file = path_in(ctx, &call.node, "launch.json");
    let ready = call.str("ready").filter(|s| !s.is_empty());
    let ready_timeout = call.duration("ready_timeout", Duration::from_secs(180))?;

    let ports: serde_json::Map<String, Value> = match (
        live_vm(&pidfile, &name),
        std::fs::read_to_string(&plan_file),
    ) {
        (Some(_), Ok(text)) => serde_json::from_str(&text).unwrap_or_default(),
        _ => {
            let mut ports = serde_json::Map::new();
            for p in call.list("ports") {
                let guest: u16 = p.parse().map_err(|_| {
                    ActionError::permanent(format!("port `{p}` is not a TCP port number"))
                })?;
                ports.insert(
                    guest.to_string(),
                    json!(format!("127.0.0.1:{}", free_port()?)),
                );
            }
            write_atomic(
                &plan_file,
                serde_json::to_string(&ports).unwrap_or_default().as_bytes(),
            )?;
            let _ = std::fs::remove_file(&console);
            boot(ctx, call, &name, &pidfile, &console, &ports).await?;
            ports
        }
    };
    let pid = live_vm(&pidfile, &name).ok_or_else(|| {
        let tail = console_tail(&console);
        ActionError::transient(format!("VM {name} exited right after starting{tail}"))
    })?;
    if let Some(text) = ready {
        let start = Instant::now();
        loop {
            if std::fs::read_to_string(&console).is_ok_and(|c| c.contains(&text)) {
                break;
            }
            if live_vm(&pidfile, &name).is_none() {
                return Err(ActionError::transient(format!(
                    "VM {name} stopped before printing `{text}`{}",
                    console_tail(&console)
                )));
            }
            if start.elapsed() > ready_timeout {
                return Err(ActionError::transient(format!(
                    "VM {name} did not print `{text}` within {}s{}",
                    ready_timeout.as_secs(),
                    console_tail(&console)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut o = Outputs::new();
    o.insert("name".into(), json!(call.node));
    o.insert("pid".into(), json!(pid));
    o.insert(
        "addr".into(),
        ports.values().next().cloned().unwrap_or(Value::Null),
    );
    o.insert("ports".into(), Value::Object(ports));
    o.insert("console".into(), json!(console.to_string_lossy()));
    Ok(o)
}

fn console_tail(console: &Path) -> String {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!(
            "; console ({}) ends:\n  {}",
            console.display(),
            lines.into_iter().rev().collect::<Vec<_>>().join("\n  ")
        )
    }
}

async fn boot(
    ctx: &Ctx,
    call: &Call,
    name: &str,
    pidfile: &Path,
    console: &Path,
    ports: &serde_json::Map<String, Value>,
) -> Result<(), ActionError> {
    let kernel = call.need("kernel")?;
    let mut append = String::from("console=ttyS0 quiet panic=-1");
    if let Some(a) = call.str("append") {
        append.push(' ');
        append.push_str(&a);
    }
    let isolated = call.bool("isolated").unwrap_or(ctx.drill);
    let mut netdev = format!(
        "user,id=n0,restrict={}",
        if isolated { "on" } else { "off" }
    );
    for (guest, host) in ports {
        let host = host.as_str().unwrap_or_default();
        netdev.push_str(&format!(",hostfwd=tcp:{host}-:{guest}"));
    }
    for (guest, host) in call.map("links") {
        if !guest.contains(':') || !host.contains(':') {
            return Err(ActionError::permanent(format!(
                "link `{guest}: {host}`: write GUEST_IP:PORT: HOST:PORT"
            )));
        }
        // One `busybox nc` per guest connection: a `tcp:` chardev would open a
        // single connection at start-up (and fail if the peer is not up yet).
        let (addr, port) = host.rsplit_once(':').unwrap_or((&host, ""));
        netdev.push_str(&format!(
            ",guestfwd=tcp:{guest}-cmd:busybox nc {addr} {port}"
        ));
    }
    let qemu = std::env::var("FERRY_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let mut cmd = tokio::process::Command::new(&qemu);
    cmd.env_remove("FERRY_PASSWORD")
        .env_remove("FERRY_API_TOKEN");
    cmd.args([
        "-name",
        name,
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args([
        "-m",
        &call.int("memory", 256)?.to_string(),
        "-smp",
        &call.int("cpus", 1)?.to_string(),
    ])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .args(["-kernel", &kernel, "-append", &append])
    .args([
        "-netdev",
        &netdev,
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
    ])
    .arg("-pidfile")
    .arg(pidfile)
    .arg("-daemonize");
    if let Some(initrd) = call.str("initrd") {
        cmd.args(["-initrd", &initrd]);
    }
    for (i, disk) in call.list("disks").iter().enumerate() {
        let format = if disk.ends_with(".qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        cmd.arg("-blockdev")
            .arg(format!("driver=file,filename={disk},node-name=f{i}"));
        cmd.arg("-blockdev")
            .arg(format!("driver={format},file=f{i},node-name=d{i}"));
        cmd.arg("-device").arg(format!("virtio-blk-pci,drive=d{i}"));
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| {
            ActionError::permanent(format!("cannot run {qemu}: {e} (run scripts/setup-vm)"))
        })?;
    if !out.status.success() {
        return Err(ActionError::permanent(format!(
            "{qemu} failed to start {name}: {}",
            super::clip(&out.stderr)
        )));
    }
    Ok(())
}

/// Stops the VM of a node: SIGTERM, then SIGKILL after 10 s. Nothing to do
/// when it is not running.
pub(super) async fn instance_stop(ctx: &Ctx, node: &str) -> Result<(), ActionError> {
    let name = vm_name(ctx, node);
    let pidfile = path_in(ctx, node, "pid");
    let Some(pid) = live_vm(&pidfile, &name) else {
        return Ok(());
    };
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
    };
    let _ = signal("-TERM");
    let start = Instant::now();
    while live_vm(&pidfile, &name).is_some() {
        if start.elapsed() > Duration::from_secs(10) {
            let _ = signal("-KILL");
        }
        if start.elapsed() > Duration::from_secs(20) {
            return Err(ActionError::transient(format!(
                "VM {name} (pid {pid}) does not stop"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(&pidfile);
    Ok(())
}

/// BLAKE3 of a file, and its size.
pub(super) fn file_digest(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let n =
        std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok((h.finalize().to_hex().to_string(), n))
}
