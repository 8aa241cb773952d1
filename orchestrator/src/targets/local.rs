//! The local target: volumes are image files in the run's work directory,
//! instances are QEMU VMs under software emulation on user-mode networks.
//! The embedded default, and the reference implementation of the seam.

use super::TargetPrices;
use super::{
    CreatedVolume, DiskFormat, DiskSize, Health, InstanceLaunch, Instances, LaunchedInstance,
    Placement, Planned, PlannedResource, Probe, RestoredVolume, StepCx, Target, TargetAction,
    TargetResult, VolumeCreate, VolumeRestore, Volumes, gib, planned_shape,
};
use crate::step::{ActionError, Call, CancelOnDrop, Ctx, clip, disk_index, file_stem, scrub_env};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The local target (`type: local`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Local;

#[async_trait]
impl Target for Local {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn volumes(&self) -> Option<&dyn Volumes> {
        Some(self)
    }

    fn instances(&self) -> Option<&dyn Instances> {
        Some(self)
    }

    fn backups(&self) -> Option<&dyn super::Backups> {
        Some(self)
    }

    fn networks(&self) -> Option<&dyn super::Networks> {
        Some(self)
    }

    /// Files in the work directory and QEMU processes: nothing is charged
    /// but the table's `instance_hour` (0 by default: own hardware).
    fn forecast(
        &self,
        _place: &Placement,
        action: TargetAction,
        call: &Call,
        disk: Option<&DiskSize>,
        prices: &TargetPrices,
    ) -> Planned {
        let file = |size: Option<u64>| PlannedResource {
            kind: "disk image".into(),
            detail: size.map_or("in the run's work directory".into(), |s| {
                format!("{} GiB in the run's work directory", gib(s))
            }),
            ..PlannedResource::default()
        };
        match action {
            TargetAction::VolumeRestore => Planned {
                resources: vec![file(disk.map(|d| d.size))],
                secs: 10.0,
                once_cost: 0.0,
            },
            TargetAction::VolumeCreate => Planned {
                resources: vec![file(VolumeCreate::parse(call).ok().map(|v| v.size_bytes))],
                secs: 1.0,
                once_cost: 0.0,
            },
            // A point in the repository (its storage is the repository's).
            TargetAction::VolumeBackup => Planned {
                resources: Vec::new(),
                secs: 10.0,
                once_cost: 0.0,
            },
            TargetAction::InstanceLaunch => {
                let (cpus, mem) = planned_shape(call);
                Planned {
                    resources: vec![PlannedResource {
                        kind: "QEMU VM".into(),
                        detail: format!("{cpus} vCPU, {mem} MiB, software emulation"),
                        hourly: prices.instance_hour("default"),
                        monthly_standby: 0.0,
                    }],
                    secs: prices.boot_secs,
                    once_cost: 0.0,
                }
            }
            // Not offered here: validation refuses them first.
            TargetAction::InstanceStop
            | TargetAction::NetworkCreate
            | TargetAction::LoadBalancerCreate
            | TargetAction::DnsSwitch
            | TargetAction::DatabaseRestore => Planned {
                secs: 2.0,
                ..Planned::default()
            },
        }
    }

    /// The tools real work runs (`qemu-img`, QEMU) answer, and the run's work
    /// directory (or the nearest existing parent) is writable. Creates nothing.
    async fn health(&self, run: &Ctx, _place: &Placement) -> Health {
        let mut probes = Vec::new();
        for (what, prog) in [("qemu-img", "qemu-img".to_owned()), ("qemu", qemu())] {
            let r = tokio::process::Command::new(&prog)
                .arg("--version")
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output()
                .await;
            probes.push(match r {
                Ok(o) if o.status.success() => Probe {
                    what: what.into(),
                    ok: true,
                    detail: clip(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                },
                Ok(o) => Probe {
                    what: what.into(),
                    ok: false,
                    detail: format!("{prog} --version: {}", clip(&o.stderr)),
                },
                Err(e) => Probe {
                    what: what.into(),
                    ok: false,
                    detail: format!("cannot run {prog}: {e} (run scripts/setup-vm)"),
                },
            });
        }
        let dir = run
            .work_dir
            .ancestors()
            .find(|d| d.exists())
            .unwrap_or(Path::new("/"))
            .to_path_buf();
        let writable = rustix::fs::access(&dir, rustix::fs::Access::WRITE_OK);
        probes.push(Probe {
            what: "work directory".into(),
            ok: writable.is_ok(),
            detail: match writable {
                Ok(()) => format!("{} is writable", dir.display()),
                Err(e) => format!("{} is not writable: {e}", dir.display()),
            },
        });
        Health {
            target: "local".into(),
            ok: probes.iter().all(|p| p.ok),
            probes,
        }
    }
}

fn qemu() -> String {
    std::env::var("FERRY_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// `WORK/NODE.EXT`: a file of one node in the run's work directory.
pub(super) fn path_in(ctx: &Ctx, node: &str, ext: &str) -> PathBuf {
    ctx.work_dir.join(format!("{}.{ext}", file_stem(node)))
}

#[async_trait]
impl Volumes for Local {
    /// Restores one disk to `WORK/NODE.raw` (resuming a partial restore),
    /// converts it to qcow2 if asked, and records what it made in
    /// `WORK/NODE.done`; a later try finds that and returns the same outputs.
    async fn restore(&self, cx: &StepCx, req: VolumeRestore) -> TargetResult<RestoredVolume> {
        let ctx = &cx.run;
        let done = path_in(ctx, &cx.node, "done");
        if let Ok(text) = std::fs::read_to_string(&done)
            && let Ok(out) = serde_json::from_str::<RestoredVolume>(&text)
        {
            return Ok(out);
        }
        if let Some(to) = &req.to {
            let out = restore_in_place(cx, &req, Path::new(to)).await?;
            write_atomic(
                &done,
                serde_json::to_string(&out).unwrap_or_default().as_bytes(),
            )?;
            return Ok(out);
        }
        let raw = path_in(ctx, &cx.node, "raw");
        // One restore into a path at a time: a try that replaces a timed-out or
        // cancelled one waits for its thread to notice and stop.
        let busy = Busy::claim(raw.clone()).await;
        let progress = Arc::new(ferry_agent::progress::Progress::default());
        // Dropping this try (its timeout, a cancelled run) stops the restore at
        // its next chunk instead of letting it run on unseen.
        let _stop = CancelOnDrop(progress.clone());
        let (ctx2, req2, raw2) = (ctx.clone(), req.clone(), raw.clone());
        let mut out = tokio::task::spawn_blocking(move || -> TargetResult<RestoredVolume> {
            let _busy = busy;
            restore_to_file(&ctx2, &req2, &raw2, &progress)
        })
        .await
        .map_err(|e| ActionError::transient(format!("restore task: {e}")))??;
        if req.format == DiskFormat::Qcow2 {
            let q = path_in(ctx, &cx.node, "qcow2");
            let tmp = path_in(ctx, &cx.node, "qcow2.tmp");
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
            out.path = q.to_string_lossy().into_owned();
            out.format = DiskFormat::Qcow2;
        }
        write_atomic(
            &done,
            serde_json::to_string(&out).unwrap_or_default().as_bytes(),
        )?;
        Ok(out)
    }

    /// An empty image; an existing one (an earlier try) is kept.
    async fn create(&self, cx: &StepCx, req: VolumeCreate) -> TargetResult<CreatedVolume> {
        let format = req.format.name();
        let path = path_in(&cx.run, &cx.node, format);
        if !path.exists() {
            let tmp = path_in(&cx.run, &cx.node, &format!("{format}.tmp"));
            run_tool(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    format,
                    &tmp.to_string_lossy(),
                    &req.size_bytes.to_string(),
                ],
            )
            .await?;
            std::fs::rename(&tmp, &path)
                .map_err(|e| ActionError::permanent(format!("{}: {e}", path.display())))?;
        }
        Ok(CreatedVolume {
            path: path.to_string_lossy().into_owned(),
            format: req.format,
        })
    }

    /// Removes every file a volume step made (finished or partial), once no
    /// restore thread is still writing them.
    async fn delete(&self, cx: &StepCx) -> TargetResult<()> {
        let _busy = Busy::claim(path_in(&cx.run, &cx.node, "raw")).await;
        let prefix = format!("{}.", file_stem(&cx.node));
        let Ok(dir) = std::fs::read_dir(&cx.run.work_dir) else {
            return Ok(());
        };
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => {
                        return Err(ActionError::transient(format!(
                            "cannot remove {}: {err}",
                            e.path().display()
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// `volume.restore` with `to`: brings an existing disk image to the point in
/// place (a delta restore, resumable), once no VM has it open. What an
/// interrupted try wrote is compared again by the next, so a retry is safe.
pub(super) async fn restore_in_place(
    cx: &StepCx,
    req: &VolumeRestore,
    to: &Path,
) -> TargetResult<RestoredVolume> {
    if !to.is_file() {
        return Err(ActionError::permanent(format!(
            "{}: `to` must be an existing disk image file",
            to.display()
        )));
    }
    refuse_if_open(to).await?;
    let busy = Busy::claim(to.to_path_buf()).await;
    let progress = Arc::new(ferry_agent::progress::Progress::default());
    let _stop = CancelOnDrop(progress.clone());
    let (ctx, req, to) = (cx.run.clone(), req.clone(), to.to_path_buf());
    tokio::task::spawn_blocking(move || -> TargetResult<RestoredVolume> {
        let _busy = busy;
        restore_to_file(&ctx, &req, &to, &progress)
    })
    .await
    .map_err(|e| ActionError::transient(format!("restore task: {e}")))?
}

/// Refuses a disk image a running VM has open: QEMU holds a lock on the
/// images it writes, which `qemu-img info` (without `-U`) runs into.
/// Writing under a running guest would corrupt what it sees.
pub(super) async fn refuse_if_open(path: &Path) -> TargetResult<()> {
    let mut cmd = tokio::process::Command::new("qemu-img");
    scrub_env(&mut cmd);
    let out = cmd
        .args(["info", "--output=json"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            ActionError::permanent(format!("cannot run qemu-img: {e} (run scripts/setup-vm)"))
        })?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && err.contains("lock") {
        return Err(ActionError::permanent(format!(
            "{} is open in a running VM ({}); stop that VM first, or back it up live with `qmp`",
            path.display(),
            err.trim()
        )));
    }
    Ok(())
}

/// Restores a point's disk to the raw image `path` (unless an earlier try
/// finished it there) and says what was restored: the blocking part of a
/// restore into a file, shared by the targets whose volumes are files. With
/// `to` in the request, `path` is that existing disk, brought to the point in
/// place (a delta restore, from `base` when given).
pub(super) fn restore_to_file(
    ctx: &Ctx,
    req: &VolumeRestore,
    path: &Path,
    progress: &ferry_agent::progress::Progress,
) -> TargetResult<RestoredVolume> {
    let repo = ctx.open_repo_at(req.repo.as_deref())?;
    let point = repo.resolve(&req.point).map_err(ActionError::from)?;
    let disk = disk_index(&point, req.disk.as_deref())?;
    let meta = &point.meta.disks[disk];
    let in_place = req.to.is_some();
    let mut summary = None;
    if in_place || !path.exists() {
        let base = req
            .base
            .as_deref()
            .map(|b| repo.resolve(b))
            .transpose()
            .map_err(ActionError::from)?;
        // A new file is private (0600) to this user; a target that lends it
        // to another user (libvirt's QEMU) does so while a domain runs on it.
        let s = ferry_agent::restore::restore(
            &repo,
            &point,
            &ferry_agent::restore::RestoreOptions {
                target: path.to_path_buf(),
                disk: Some(meta.name.clone()),
                overwrite: false,
                delta: in_place,
                base,
            },
            progress,
        )
        .map_err(ActionError::from)?;
        summary = Some(s).filter(|_| in_place);
    }
    Ok(RestoredVolume {
        path: path.to_string_lossy().into_owned(),
        format: DiskFormat::Raw,
        point: point.id.clone(),
        source: point.meta.source.clone(),
        disk: meta.name.clone(),
        point_time: point.meta.time.to_rfc3339(),
        // A point taken during the run (a final incremental) lost nothing: 0.
        rpo_secs: ((ctx.started_ms - point.meta.time.timestamp_millis()) as f64 / 1000.0).max(0.0),
        size: meta.size,
        bytes_written: summary.as_ref().map(|s| s.bytes_written),
        bytes_skipped: summary.as_ref().map(|s| s.bytes_skipped),
    })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ActionError> {
    crate::fsutil::write_private(path, bytes)
        .map_err(|e| ActionError::permanent(format!("cannot write {}: {e}", path.display())))
}

async fn run_tool(prog: &str, args: &[&str]) -> Result<String, ActionError> {
    let mut cmd = tokio::process::Command::new(prog);
    scrub_env(&mut cmd);
    let out = cmd
        .args(args)
        .stdin(std::process::Stdio::null())
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
            clip(&out.stderr)
        )));
    }
    Ok(clip(&out.stdout))
}

/// Paths a restore thread is writing. A blocking thread cannot be aborted,
/// only asked to stop, so whoever comes next (another try, the undo) waits
/// for it here.
static BUSY: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// The right to write one path; released when dropped (on the thread that
/// did the writing). Other targets that restore into files use it too.
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

#[async_trait]
impl super::Backups for Local {
    async fn backup(
        &self,
        cx: &StepCx,
        req: super::VolumeBackup,
    ) -> TargetResult<super::BackedUpVolume> {
        super::backup::backup(cx, req).await
    }

    async fn release(&self, cx: &StepCx) -> TargetResult<()> {
        super::backup::release(cx).await
    }
}

#[async_trait]
impl Instances for Local {
    /// Boots a VM, or adopts the one an earlier try of the same step left
    /// running (found by its pid file and name).
    /// `instance_type` is for cloud targets and means nothing here (the
    /// VM's size is `cpus`/`memory`). Each VM has its own user-mode network;
    /// `network` puts it on a `network.create` network (see `local_net`),
    /// `links` joins it to single addresses. `user_data` reaches the guest
    /// as QEMU firmware configuration `opt/ferry/user-data`.
    async fn launch(&self, cx: &StepCx, req: InstanceLaunch) -> TargetResult<LaunchedInstance> {
        if let Some(image) = &req.image {
            return Err(ActionError::permanent(format!(
                "the local target boots a kernel or the first disk, not an image (`{image}`)"
            )));
        }
        let ctx = &cx.run;
        let name = vm_name(ctx, &cx.node);
        let pidfile = path_in(ctx, &cx.node, "pid");
        let console = path_in(ctx, &cx.node, "console");
        let plan_file = path_in(ctx, &cx.node, "launch.json");
        // A unix socket's path is at most 107 bytes: a deeper work directory
        // gets no QMP socket (the VM runs; it cannot be protected live).
        let qmp = Some(path_in(ctx, &cx.node, "qmp")).filter(|p| p.as_os_str().len() < 100);

        let adopted: Option<BTreeMap<String, String>> = live_vm(&pidfile, &name)
            .and_then(|_| std::fs::read_to_string(&plan_file).ok())
            .and_then(|text| serde_json::from_str(&text).ok());
        let joined = match &req.network {
            Some(id) => Some(super::local_net::join(cx, id)?),
            None => None,
        };
        let ports = match adopted {
            Some(ports) => ports,
            None => {
                let mut ports = BTreeMap::new();
                for guest in &req.ports {
                    ports.insert(guest.to_string(), format!("127.0.0.1:{}", free_port()?));
                }
                write_atomic(
                    &plan_file,
                    serde_json::to_string(&ports).unwrap_or_default().as_bytes(),
                )?;
                let _ = std::fs::remove_file(&console);
                let guest = Guest {
                    name: &name,
                    node: &cx.node,
                    pidfile: &pidfile,
                    qmp: qmp.as_deref(),
                    console: &console,
                    ports: &ports,
                    joined: joined.as_ref(),
                };
                boot(ctx, &req, &guest).await?;
                ports
            }
        };
        let pid = live_vm(&pidfile, &name).ok_or_else(|| {
            let tail = console_tail(&console);
            ActionError::transient(format!("VM {name} exited right after starting{tail}"))
        })?;
        if let Some(j) = &joined {
            j.record_ports(&cx.node, &ports)?;
        }
        if let Some(text) = &req.ready {
            let start = Instant::now();
            loop {
                if std::fs::read_to_string(&console).is_ok_and(|c| c.contains(text.as_str())) {
                    break;
                }
                if live_vm(&pidfile, &name).is_none() {
                    return Err(ActionError::transient(format!(
                        "VM {name} stopped before printing `{text}`{}",
                        console_tail(&console)
                    )));
                }
                if start.elapsed() > req.ready_timeout {
                    return Err(ActionError::transient(format!(
                        "VM {name} did not print `{text}` within {}s{}",
                        req.ready_timeout.as_secs(),
                        console_tail(&console)
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // Ports in the order the runbook gave them: `addr` is the first.
        let addr = req
            .ports
            .first()
            .and_then(|p| ports.get(&p.to_string()).cloned());
        Ok(LaunchedInstance {
            name: cx.node.clone(),
            pid: Some(pid),
            addr,
            ports,
            console: Some(console.to_string_lossy().into_owned()),
            private_ip: joined.map(|j| j.ip.to_string()),
            qmp: qmp.map(|q| q.to_string_lossy().into_owned()),
        })
    }

    async fn stop(&self, cx: &StepCx, name: &str) -> TargetResult<()> {
        stop_vm(&cx.run, name).await
    }

    async fn terminate(&self, cx: &StepCx) -> TargetResult<()> {
        stop_vm(&cx.run, &cx.node).await
    }
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

/// One VM to boot: where its files go and how it is reached.
struct Guest<'a> {
    name: &'a str,
    node: &'a str,
    pidfile: &'a Path,
    /// Its QMP socket: what `ferry protect` and `volume.backup` talk to.
    qmp: Option<&'a Path>,
    console: &'a Path,
    ports: &'a BTreeMap<String, String>,
    joined: Option<&'a super::local_net::Joined>,
}

async fn boot(ctx: &Ctx, req: &InstanceLaunch, g: &Guest<'_>) -> Result<(), ActionError> {
    let (name, pidfile, console, ports) = (g.name, g.pidfile, g.console, g.ports);
    let mut append = String::from("console=ttyS0 quiet panic=-1");
    if let Some(a) = &req.append {
        append.push(' ');
        append.push_str(a);
    }
    // A VM on a network reaches its members and nothing else.
    let isolated = g.joined.is_some() || req.isolated.unwrap_or(ctx.drill);
    let mut netdev = format!(
        "user,id=n0,restrict={}",
        if isolated { "on" } else { "off" }
    );
    let guest_ip = g.joined.map(|j| j.ip.to_string()).unwrap_or_default();
    if let Some(j) = g.joined {
        netdev.push_str(&j.netdev());
    }
    for (guest, host) in ports {
        netdev.push_str(&format!(",hostfwd=tcp:{host}-{guest_ip}:{guest}"));
    }
    let peers = g.joined.map(|j| j.peers.as_slice()).unwrap_or_default();
    for (guest, host) in req.links.iter().chain(peers.iter()) {
        // One `busybox nc` per guest connection: a `tcp:` chardev would open a
        // single connection at start-up (and fail if the peer is not up yet).
        let (addr, port) = host.rsplit_once(':').unwrap_or((host, ""));
        netdev.push_str(&format!(
            ",guestfwd=tcp:{guest}-cmd:busybox nc {addr} {port}"
        ));
    }
    let qemu = qemu();
    let mut cmd = tokio::process::Command::new(&qemu);
    // The VM and the commands QEMU runs for it (guestfwd) see none of
    // Ferry's secrets.
    scrub_env(&mut cmd);
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
        &req.memory_mib.to_string(),
        "-smp",
        &req.cpus.to_string(),
    ])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .args([
        "-netdev",
        &netdev,
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
    ])
    .arg("-pidfile")
    .arg(pidfile)
    .arg("-daemonize");
    if let Some(q) = g.qmp {
        let _ = std::fs::remove_file(q);
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", q.display()));
    } else {
        tracing::warn!(
            vm = name,
            "the run's work directory is too deep for a QMP socket; the VM cannot be protected live"
        );
    }
    // What a cloud's metadata service would tell the guest: its network
    // settings and the runbook's user data (private files: user data may
    // hold what the guest needs to reach its peers).
    let mut fw_cfg = Vec::new();
    if let Some(j) = g.joined {
        fw_cfg.push(("net", j.guest_settings()));
    }
    if let Some(u) = &req.user_data {
        fw_cfg.push(("user-data", u.clone()));
    }
    for (what, text) in fw_cfg {
        let file = path_in(ctx, g.node, what);
        write_atomic(&file, text.as_bytes())?;
        cmd.arg("-fw_cfg")
            .arg(format!("name=opt/ferry/{what},file={}", file.display()));
    }
    // A kernel boots directly; without one, the first disk's own
    // bootloader boots (SeaBIOS, from the disk with boot index 0).
    if let Some(kernel) = &req.kernel {
        cmd.args(["-kernel", kernel, "-append", &append]);
        if let Some(initrd) = &req.initrd {
            cmd.args(["-initrd", initrd]);
        }
    }
    for (i, disk) in req.disks.iter().enumerate() {
        let format = if disk.ends_with(".qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        // `disk0`, `disk1`, ...: the node names `ferry protect` takes by default.
        cmd.arg("-blockdev")
            .arg(format!("driver=file,filename={disk},node-name=file{i}"));
        cmd.arg("-blockdev")
            .arg(format!("driver={format},file=file{i},node-name=disk{i}"));
        let boot = if i == 0 && req.kernel.is_none() {
            ",bootindex=0"
        } else {
            ""
        };
        cmd.arg("-device")
            .arg(format!("virtio-blk-pci,drive=disk{i}{boot}"));
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
            clip(&out.stderr)
        )));
    }
    Ok(())
}

/// Stops the VM of a node: SIGTERM, then SIGKILL after 10 s. Nothing to do
/// when it is not running.
async fn stop_vm(ctx: &Ctx, node: &str) -> Result<(), ActionError> {
    let name = vm_name(ctx, node);
    let pidfile = path_in(ctx, node, "pid");
    let Some(pid) = live_vm(&pidfile, &name) else {
        return Ok(());
    };
    let _ = crate::sys::signal(pid, false);
    let start = Instant::now();
    while live_vm(&pidfile, &name).is_some() {
        if start.elapsed() > Duration::from_secs(10) {
            let _ = crate::sys::signal(pid, true);
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
