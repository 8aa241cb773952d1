//! The `libvirt` target: the provider-neutral requests mapped onto a libvirt
//! host through `ferry_connectors::libvirt` (`virsh`, nothing linked).
//!
//! | request | libvirt |
//! |---|---|
//! | `volume.restore` | a volume of the target's storage pool: the point's disk restored straight into the pool's directory (a remote host: restored in the work directory, then uploaded); `path` is the volume's file |
//! | `volume.create` | an empty (sparse) volume of the pool |
//! | `instance.launch` | a TCG domain, defined and started: `kernel`/`initrd`/`append` boot directly (the kernel and initrd are copied into the pool, private to the run), else the first disk's own bootloader; `disks` attach in order as `vda`, `vdb`, ...; `ports` are forwarded from free ports on 127.0.0.1 through a restricted user-mode interface; `network` joins a network (the guest's second interface), with an address reserved in the network's DHCP for the interface's MAC (`private_ip`); the address (`opt/ferry/net`: `mac=`, `address=IP/PREFIX`) and `user_data` (`opt/ferry/user-data`) reach the guest through QEMU's firmware configuration, as on the local target |
//! | `network.create` | an isolated libvirt network (no `<forward>`, DNS off, DHCP on): one bridge for `cidr` |
//!
//! Networks. One `network.create` is one libvirt network, which is one
//! bridge and one layer-2 segment. The host side takes the first address of
//! `cidr` with its prefix; every address of `cidr` is on the segment, so
//! guests whose netmask covers `cidr` reach each other directly. `subnets`
//! must lie inside `cidr`; they are not separate segments, since an isolated
//! libvirt network routes nothing, and they come back as the output
//! `subnets` (CIDRs, not ids). DHCP hands out the host addresses of the
//! first subnet (of `cidr` without subnets), never the host's own address.
//! `ingress` rules are checked but not enforced: an isolated network already
//! lets nothing in from beyond the host, but the host and every guest on the
//! network reach each other on every port (per-guest filters would need
//! libvirt's nwfilter, which this target does not use yet).
//!
//! Isolation. The user-mode interface of `ports` is always restricted: the
//! guest reaches nothing through it, and the host reaches only the forwarded
//! ports, on loopback. In a drill an instance joins only an isolated network
//! (a `network.create` output, or any network without `<forward>`); outside
//! drills, an instance that names no `network` and is not `isolated` joins
//! the target's `network` setting, a network the operator manages (NAT or
//! bridged) for recovered machines that must reach the outside.
//!
//! Settings (`targets: {kvm: {type: libvirt, ...}}`): `uri` (default
//! `qemu:///system`), `pool` (default `ferry`) and `path` (its directory;
//! default `/var/lib/libvirt/images/ferry` when the pool does not exist yet;
//! an existing pool elsewhere is a conflict), `network` (above).
//!
//! Everything made is named (volumes, networks) or tagged in its metadata
//! (domains) with the run, so an undo, a drill's teardown, or
//! `Connection::teardown(run)` after a crash finds it from libvirt alone.
//! Decrypted disks are files of mode 0600 owned by Ferry's user in the
//! pool's directory (0711: traversable, not listable); libvirt hands each one
//! to QEMU's user (`libvirt-qemu`) while the domain that uses it runs, and
//! back after (its DAC driver, `dynamic_ownership`).

use super::local::Busy;
use super::{
    CreatedNetwork, CreatedVolume, DiskFormat, Health, InstanceLaunch, Instances, LaunchedInstance,
    NetworkCreate, Networks, Placement, Probe, RestoredVolume, StepCx, Target, TargetResult,
    VolumeCreate, VolumeRestore, Volumes,
};
use crate::step::{ActionError, CancelOnDrop, Ctx, clip, scrub_env};
use async_trait::async_trait;
use ferry_connectors::libvirt::{
    self, Boot, Cidr, Connection, Disk, DomainSpec, Format, NetworkSpec, Nic, Options, PortForward,
    Tag,
};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SETTINGS: &[&str] = &["uri", "pool", "path", "network"];
/// The storage pool volumes go to unless the runbook names one.
pub const DEFAULT_POOL: &str = "ferry";
/// Where that pool is made when it does not exist.
pub const DEFAULT_POOL_PATH: &str = "/var/lib/libvirt/images/ferry";

/// The `libvirt` target (`type: libvirt`).
#[derive(Clone, Copy, Debug, Default)]
pub struct LibvirtTarget;

fn connection(place: &Placement) -> Connection {
    Connection::new(Options {
        uri: place.str("uri").unwrap_or(libvirt::DEFAULT_URI).to_owned(),
        ..Options::default()
    })
}

/// Whether the URI names this machine (`qemu:///system`, `qemu+unix:///...`):
/// then the pool's directory is here and restores write straight into it.
fn is_local(uri: &str) -> bool {
    uri.split_once("://")
        .is_some_and(|(_, rest)| rest.starts_with('/'))
}

fn fail(e: libvirt::Error) -> ActionError {
    match e.retry() {
        ferry_agent::Retry::Transient => ActionError::transient(e.to_string()),
        ferry_agent::Retry::Never => ActionError::permanent(e.to_string()),
    }
}

/// Runs blocking connector calls off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> TargetResult<T> + Send + 'static,
) -> TargetResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ActionError::transient(format!("libvirt task: {e}")))?
}

/// A node's name in libvirt: `disk[1]` is `disk.1` (step ids have no `.`,
/// so no two nodes share one).
fn stem(node: &str) -> String {
    node.replace('[', ".").replace(']', "")
}

fn tag(cx: &StepCx) -> TargetResult<Tag> {
    Tag::new(&cx.run.run_id, &stem(&cx.node)).map_err(fail)
}

fn pool_name(place: &Placement) -> &str {
    place.str("pool").unwrap_or(DEFAULT_POOL)
}

/// One pool made at a time: parallel steps of a run would otherwise race to
/// define the same pool.
static POOL_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The target's pool, made (or started) if needed: its name and directory.
fn ensure_pool(lv: &Connection, place: &Placement) -> TargetResult<(String, PathBuf)> {
    let _one = POOL_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let name = pool_name(place).to_owned();
    let dir = match place.str("path") {
        Some(p) => PathBuf::from(p),
        None => lv
            .pool_path(&name)
            .map_err(fail)?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_POOL_PATH)),
    };
    lv.ensure_dir_pool(&name, &dir).map_err(|e| match e {
        libvirt::Error::Conflict { .. } => {
            ActionError::permanent(format!("{e} (the target's `pool` and `path` settings)"))
        }
        e => fail(e),
    })?;
    Ok((name, dir))
}

/// The target's pool if it exists, without making it (for undos).
fn existing_pool(lv: &Connection, place: &Placement) -> TargetResult<Option<(String, PathBuf)>> {
    let name = pool_name(place).to_owned();
    Ok(lv.pool_path(&name).map_err(fail)?.map(|dir| (name, dir)))
}

/// The volume names a node's steps may have made in the pool: the volume
/// in either format, a restore's partial file, a conversion's temporary
/// file, and an instance's kernel and initrd.
fn node_volumes(tag: &Tag, stem: &str) -> TargetResult<Vec<String>> {
    [
        "raw",
        "qcow2",
        "raw.ferry-partial",
        "qcow2.tmp",
        "kernel",
        "initrd",
    ]
    .iter()
    .map(|ext| tag.object_name(&format!("{stem}.{ext}")).map_err(fail))
    .collect()
}

/// Deletes volumes `names` of the target's pool (gone is done), and their
/// files when the pool's directory is on this machine.
fn delete_volumes(lv: &Connection, place: &Placement, names: &[String]) -> TargetResult<()> {
    let Some((pool, dir)) = existing_pool(lv, place)? else {
        return Ok(());
    };
    // A file a crashed restore left is a volume only after a refresh.
    match lv.refresh_pool(&pool) {
        Ok(()) => {}
        Err(e) if e.is_not_found() => {}
        // An inactive pool: its files are removed below.
        Err(libvirt::Error::Failed { .. }) => {}
        Err(e) => return Err(fail(e)),
    }
    for name in names {
        lv.delete_volume(&pool, name).map_err(fail)?;
        if is_local(lv.uri()) {
            let f = dir.join(name);
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ActionError::transient(format!(
                        "cannot remove {}: {e}",
                        f.display()
                    )));
                }
            }
        }
    }
    Ok(())
}

fn path_in(ctx: &Ctx, node: &str, ext: &str) -> PathBuf {
    ctx.work_dir.join(format!("{}.{ext}", stem(node)))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ActionError> {
    crate::fsutil::write_private(path, bytes)
        .map_err(|e| ActionError::permanent(format!("cannot write {}: {e}", path.display())))
}

/// A problem with a setting's value, if any.
fn check_value(key: &str, v: &Value) -> Option<String> {
    let Some(s) = v.as_str() else {
        return Some(format!("`{key}` must be a string"));
    };
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 100
            && !s.starts_with(['-', '.'])
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    match key {
        "uri" if !s.contains("://") => Some(format!(
            "`uri` {s:?} is not a libvirt URI like qemu:///system or qemu+ssh://HOST/system"
        )),
        "pool" | "network" if !name_ok(s) => Some(format!(
            "`{key}` {s:?} is not a libvirt name: use up to 100 letters, digits, ., _ and -, not starting with . or -"
        )),
        "path" if !s.starts_with('/') => Some(format!(
            "`path` {s:?} must be an absolute directory (the storage pool's)"
        )),
        _ => None,
    }
}

#[async_trait]
impl Target for LibvirtTarget {
    fn kind(&self) -> &'static str {
        "libvirt"
    }
    fn volumes(&self) -> Option<&dyn Volumes> {
        Some(self)
    }
    fn instances(&self) -> Option<&dyn Instances> {
        Some(self)
    }
    fn networks(&self) -> Option<&dyn Networks> {
        Some(self)
    }
    fn settings(&self) -> &'static [&'static str] {
        SETTINGS
    }

    fn check_settings(&self, settings: &Map<String, Value>) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in settings {
            if !SETTINGS.contains(&k.as_str()) {
                out.push(format!(
                    "target type `libvirt` takes no setting `{k}`; it takes: {}",
                    SETTINGS.join(", ")
                ));
            } else if let Some(problem) = check_value(k, v) {
                out.push(problem);
            }
        }
        out
    }

    /// libvirt answers and runs QEMU guests, the pool exists (at `path`,
    /// when given) or its directory can be made, the `network` setting names
    /// a network, `qemu-img` runs, and the work directory is writable.
    /// Makes nothing: only listings and `--version`.
    async fn health(&self, run: &Ctx, place: &Placement) -> Health {
        let place2 = place.clone();
        let mut probes = blocking(move || Ok(libvirt_probes(&place2)))
            .await
            .unwrap_or_else(|e| {
                vec![Probe {
                    what: "libvirt".into(),
                    ok: false,
                    detail: e.message,
                }]
            });
        let r = tokio::process::Command::new("qemu-img")
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await;
        probes.push(match r {
            Ok(o) if o.status.success() => Probe {
                what: "qemu-img".into(),
                ok: true,
                detail: clip(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            },
            Ok(o) => Probe {
                what: "qemu-img".into(),
                ok: false,
                detail: format!("qemu-img --version: {}", clip(&o.stderr)),
            },
            Err(e) => Probe {
                what: "qemu-img".into(),
                ok: false,
                detail: format!("cannot run qemu-img: {e} (install qemu-utils: scripts/setup-vm)"),
            },
        });
        probes.push(writable("work directory", &run.work_dir));
        Health {
            target: "libvirt".into(),
            ok: probes.iter().all(|p| p.ok),
            probes,
        }
    }
}

/// Whether `dir`, or the nearest directory above it that exists, is writable.
fn writable(what: &str, dir: &Path) -> Probe {
    let near = dir
        .ancestors()
        .find(|d| d.exists())
        .unwrap_or(Path::new("/"));
    let r = rustix::fs::access(near, rustix::fs::Access::WRITE_OK);
    Probe {
        what: what.into(),
        ok: r.is_ok(),
        detail: match r {
            Ok(()) if near == dir => format!("{} is writable", dir.display()),
            Ok(()) => format!(
                "{} can be made ({} is writable)",
                dir.display(),
                near.display()
            ),
            Err(e) => format!("{} is not writable: {e}", near.display()),
        },
    }
}

fn libvirt_probes(place: &Placement) -> Vec<Probe> {
    let lv = connection(place);
    let mut probes = Vec::new();
    let h = match lv.health() {
        Ok(h) => h,
        Err(e) => {
            probes.push(Probe {
                what: "libvirt".into(),
                ok: false,
                detail: e.to_string(),
            });
            return probes;
        }
    };
    probes.push(Probe {
        what: "libvirt".into(),
        ok: true,
        detail: format!(
            "{} runs QEMU guests; {} pools, {} networks",
            h.uri,
            h.pools.len(),
            h.networks.len()
        ),
    });
    let pool = pool_name(place);
    let want = place.str("path").map(PathBuf::from);
    probes.push(match lv.pool_path(pool) {
        Ok(Some(dir)) if want.as_ref().is_some_and(|w| *w != dir) => Probe {
            what: "storage pool".into(),
            ok: false,
            detail: format!(
                "pool {pool} is at {}, not at the `path` setting {}; choose another `pool` or give its path",
                dir.display(),
                want.unwrap_or_default().display()
            ),
        },
        Ok(Some(dir)) => Probe {
            what: "storage pool".into(),
            ok: true,
            detail: format!("pool {pool} at {}", dir.display()),
        },
        Ok(None) => {
            let dir = want.unwrap_or_else(|| PathBuf::from(DEFAULT_POOL_PATH));
            if is_local(lv.uri()) {
                let mut p = writable("storage pool", &dir);
                p.detail = format!("pool {pool} will be made at {}: {}", dir.display(), p.detail);
                p
            } else {
                Probe {
                    what: "storage pool".into(),
                    ok: true,
                    detail: format!(
                        "pool {pool} will be made at {} on the libvirt host",
                        dir.display()
                    ),
                }
            }
        }
        Err(e) => Probe {
            what: "storage pool".into(),
            ok: false,
            detail: e.to_string(),
        },
    });
    if let Some(net) = place.str("network") {
        probes.push(Probe {
            what: "network".into(),
            ok: h.networks.iter().any(|n| n == net),
            detail: if h.networks.iter().any(|n| n == net) {
                format!("network {net} exists (joined outside drills)")
            } else {
                format!(
                    "there is no network {net} (the `network` setting); it has: {}",
                    h.networks.join(", ")
                )
            },
        });
    }
    probes
}

#[async_trait]
impl Volumes for LibvirtTarget {
    /// Restores one disk into the pool as `ferry-RUN_NODE.raw` (resuming a
    /// partial restore), converts it to qcow2 if asked, and records the
    /// outputs in `WORK/NODE.done`; a later try returns them again.
    async fn restore(&self, cx: &StepCx, req: VolumeRestore) -> TargetResult<RestoredVolume> {
        let ctx = cx.run.clone();
        let done = path_in(&ctx, &cx.node, "done");
        let lv = connection(&cx.place);
        let local = is_local(lv.uri());
        // What an earlier try finished (the volume still there, when it is
        // a file of this machine).
        if let Ok(text) = std::fs::read_to_string(&done)
            && let Ok(out) = serde_json::from_str::<RestoredVolume>(&text)
            && (!local || Path::new(&out.path).exists())
        {
            return Ok(out);
        }
        if let Some(to) = &req.to {
            if !local {
                return Err(ActionError::permanent(format!(
                    "`to` restores onto a disk of this machine; {} is another host",
                    lv.uri()
                )));
            }
            let out = super::local::restore_in_place(cx, &req, Path::new(to)).await?;
            crate::fsutil::write_private(
                &done,
                serde_json::to_string(&out).unwrap_or_default().as_bytes(),
            )
            .map_err(|e| ActionError::permanent(format!("{}: {e}", done.display())))?;
            return Ok(out);
        }
        let tag = tag(cx)?;
        let stem = stem(&cx.node);
        let raw_name = tag.object_name(&format!("{stem}.raw")).map_err(fail)?;
        let (lv2, place) = (lv.clone(), cx.place.clone());
        let (pool, dir) = blocking(move || ensure_pool(&lv2, &place)).await?;
        // Into the pool's directory when it is here; else into the work
        // directory, uploaded afterwards.
        let raw = if local {
            dir.join(&raw_name)
        } else {
            ctx.work_dir.join(&raw_name)
        };
        let busy = Busy::claim(raw.clone()).await;
        let progress = Arc::new(ferry_agent::progress::Progress::default());
        // Dropping this try (its timeout, a cancelled run) stops the restore
        // at its next chunk.
        let _stop = CancelOnDrop(progress.clone());
        let (ctx2, req2, raw2) = (ctx.clone(), req.clone(), raw.clone());
        let mut out = blocking(move || {
            let _busy = busy;
            super::local::restore_to_file(&ctx2, &req2, &raw2, &progress)
        })
        .await?;
        let (mut file, mut name, mut format) = (raw.clone(), raw_name.clone(), Format::Raw);
        if req.format == DiskFormat::Qcow2 {
            name = tag.object_name(&format!("{stem}.qcow2")).map_err(fail)?;
            let q = raw.with_file_name(&name);
            let tmp = raw.with_file_name(format!("{name}.tmp"));
            // Made private first: qemu-img keeps the mode of a file it
            // overwrites, and the pool's directory is traversable by all.
            crate::fsutil::private_file(&tmp)
                .map_err(|e| ActionError::permanent(format!("{}: {e}", tmp.display())))?;
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
            (file, format) = (q, Format::Qcow2);
            out.format = DiskFormat::Qcow2;
        }
        let (lv2, tag2) = (lv.clone(), tag.clone());
        let path = blocking(move || {
            if local {
                lv2.refresh_pool(&pool).map_err(fail)?;
                lv2.volume_path(&pool, &name).map_err(fail)
            } else {
                let file_name = name.strip_prefix(&tag2.prefix()).unwrap_or(&name);
                let v = lv2
                    .upload_volume(&pool, &tag2, file_name, &file, format)
                    .map_err(fail)?;
                let _ = std::fs::remove_file(&file);
                Ok(v.path)
            }
        })
        .await?;
        out.path = path.to_string_lossy().into_owned();
        write_private(
            &done,
            serde_json::to_string(&out).unwrap_or_default().as_bytes(),
        )?;
        Ok(out)
    }

    /// An empty volume of the pool; the one an earlier try made is kept.
    async fn create(&self, cx: &StepCx, req: VolumeCreate) -> TargetResult<CreatedVolume> {
        let tag = tag(cx)?;
        let name = format!("{}.{}", stem(&cx.node), req.format.name());
        let format = match req.format {
            DiskFormat::Raw => Format::Raw,
            DiskFormat::Qcow2 => Format::Qcow2,
        };
        let (lv, place) = (connection(&cx.place), cx.place.clone());
        let v = blocking(move || {
            let (pool, _) = ensure_pool(&lv, &place)?;
            lv.create_volume(&pool, &tag, &name, req.size_bytes, format)
                .map_err(fail)
        })
        .await?;
        Ok(CreatedVolume {
            path: v.path.to_string_lossy().into_owned(),
            format: req.format,
        })
    }

    /// Removes every volume a volume step made (finished or partial), once
    /// no restore thread is still writing it; never makes the pool.
    async fn delete(&self, cx: &StepCx) -> TargetResult<()> {
        let tag = tag(cx)?;
        let stem = stem(&cx.node);
        let names = node_volumes(&tag, &stem)?;
        let lv = connection(&cx.place);
        // A restore still writing (a timed-out try) is waited for.
        let held = match existing_pool_async(&lv, &cx.place).await? {
            Some((_, dir)) => Some(Busy::claim(dir.join(&names[0])).await),
            None => None,
        };
        let _remote_busy = Busy::claim(cx.run.work_dir.join(&names[0])).await;
        let place = cx.place.clone();
        blocking(move || delete_volumes(&lv, &place, &names)).await?;
        drop(held);
        for f in [
            path_in(&cx.run, &cx.node, "done"),
            cx.run
                .work_dir
                .join(tag.object_name(&format!("{stem}.raw")).map_err(fail)?),
            cx.run.work_dir.join(
                tag.object_name(&format!("{stem}.raw.ferry-partial"))
                    .map_err(fail)?,
            ),
        ] {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ActionError::transient(format!(
                        "cannot remove {}: {e}",
                        f.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

async fn existing_pool_async(
    lv: &Connection,
    place: &Arc<Placement>,
) -> TargetResult<Option<(String, PathBuf)>> {
    let (lv, place) = (lv.clone(), place.clone());
    blocking(move || existing_pool(&lv, &place)).await
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

fn free_port() -> Result<u16, ActionError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ActionError::transient(format!("no free port on 127.0.0.1: {e}")))
}

/// The domain of a node of this run (or `name`, when it already is one).
fn domain_of(cx: &StepCx, name: &str) -> TargetResult<String> {
    let t = tag(cx)?;
    if name.starts_with(&t.prefix()) {
        return Ok(name.to_owned());
    }
    t.object_name(&stem(name)).map_err(fail)
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

/// What `launch` decided before it touches libvirt.
struct LaunchPlan {
    domain: String,
    network: Option<String>,
    console: PathBuf,
}

fn plan_launch(cx: &StepCx, req: &InstanceLaunch) -> TargetResult<LaunchPlan> {
    if let Some(image) = &req.image {
        return Err(ActionError::permanent(format!(
            "the libvirt target boots a kernel or the first disk, not an image (`{image}`): restore or create the image as a volume and give it as the first of `disks`"
        )));
    }
    if !req.links.is_empty() {
        return Err(ActionError::permanent(
            "the libvirt target does not take `links`: put the instances on one network (a network.create output `id` as `network`)",
        ));
    }
    if req.kernel.is_none() && req.disks.is_empty() {
        return Err(ActionError::permanent(
            "nothing to boot: give `kernel` (and `initrd`), or `disks` whose first disk has a bootloader",
        ));
    }
    let network = match &req.network {
        Some(n) => Some(n.clone()),
        None if cx.run.drill || req.isolated == Some(true) => None,
        None => cx.place.str("network").map(str::to_owned),
    };
    Ok(LaunchPlan {
        domain: domain_of(cx, &cx.node)?,
        network,
        console: path_in(&cx.run, &cx.node, "console"),
    })
}

#[async_trait]
impl Instances for LibvirtTarget {
    /// Defines and starts a domain, or adopts the one an earlier try of the
    /// same step made (found by name; its port forwards read back from its
    /// definition, its address from the network). `instance_type` means
    /// nothing here (the size is `cpus`/`memory`).
    async fn launch(&self, cx: &StepCx, req: InstanceLaunch) -> TargetResult<LaunchedInstance> {
        let plan = plan_launch(cx, &req)?;
        let tag = tag(cx)?;
        let lv = connection(&cx.place);
        let (lv2, place, req2, drill) = (lv.clone(), cx.place.clone(), req.clone(), cx.run.drill);
        let (domain, console, stem) = (plan.domain.clone(), plan.console.clone(), stem(&cx.node));
        let (forwards, private_ip) = blocking(move || {
            let lv = lv2;
            let existing = match lv.domain_state(&domain) {
                Ok(state) => Some(state),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(fail(e)),
            };
            if let Some(net) = &plan.network
                && drill
                && !lv.network_is_isolated(net).map_err(fail)?
            {
                return Err(ActionError::permanent(format!(
                    "network {net} forwards traffic beyond the host (it has <forward>): a drill joins only isolated networks, such as a network.create output `id`"
                )));
            }
            let forwards = match existing {
                Some(_) => lv.port_forwards(&domain).map_err(fail)?,
                None => req2
                    .ports
                    .iter()
                    .map(|&guest| Ok(PortForward { host: free_port()?, guest }))
                    .collect::<TargetResult<Vec<_>>>()?,
            };
            let boot = match &req2.kernel {
                None => Boot::Disk,
                Some(kernel) => {
                    let mut cmdline = String::from("console=ttyS0 quiet panic=-1");
                    if let Some(a) = &req2.append {
                        cmdline.push(' ');
                        cmdline.push_str(a);
                    }
                    // Copies in the pool, private to the run: libvirt hands
                    // them to QEMU's user while the domain runs, which must
                    // not touch the runbook's own files.
                    let (pool, _) = ensure_pool(&lv, &place)?;
                    let copy = |file: &str, ext: &str| -> TargetResult<PathBuf> {
                        let name = format!("{stem}.{ext}");
                        if existing.is_some() {
                            return lv
                                .volume_path(&pool, &tag.object_name(&name).map_err(fail)?)
                                .map_err(fail);
                        }
                        lv.upload_volume(&pool, &tag, &name, Path::new(file), Format::Raw)
                            .map(|v| v.path)
                            .map_err(fail)
                    };
                    let kernel = copy(kernel, "kernel")?;
                    let initrd = match &req2.initrd {
                        Some(i) => Some(copy(i, "initrd")?),
                        None => None,
                    };
                    Boot::Kernel {
                        kernel,
                        initrd,
                        cmdline,
                    }
                }
            };
            let mut nics = Vec::new();
            if !forwards.is_empty() {
                nics.push(Nic::User {
                    forwards: forwards.clone(),
                });
            }
            // What a cloud's metadata service would tell the guest: its
            // address on the network (reserved in the network's DHCP, by the
            // interface's MAC, which the guest finds it by) and the user data.
            let mut fw_cfg = Vec::new();
            let mut private_ip = None;
            if let Some(net) = plan.network {
                let mac = libvirt::mac_for(&domain, &net);
                if let Some(r) = lv.reserve_address(&net, &mac).map_err(fail)? {
                    fw_cfg.push((
                        "opt/ferry/net".to_owned(),
                        format!("mac={mac}\naddress={}/{}\n", r.ip, r.prefix),
                    ));
                    private_ip = Some(r.ip.to_string());
                }
                nics.push(Nic::Network {
                    network: net,
                    mac: Some(mac),
                });
            }
            if let Some(u) = &req2.user_data {
                fw_cfg.push(("opt/ferry/user-data".to_owned(), u.clone()));
            }
            let spec = DomainSpec {
                name: domain.clone(),
                memory_mib: u64::from(req2.memory_mib),
                vcpus: req2.cpus,
                disks: req2
                    .disks
                    .iter()
                    .map(|d| Disk {
                        path: PathBuf::from(d),
                        format: if d.ends_with(".qcow2") {
                            Format::Qcow2
                        } else {
                            Format::Raw
                        },
                    })
                    .collect(),
                boot,
                nics,
                serial_log: console.clone(),
                fw_cfg,
            };
            if existing.is_none() {
                let _ = std::fs::remove_file(&console);
            }
            if let Err(e) = lv.define_and_start(&tag, &spec) {
                // The next try starts clean (new ports, say) instead of
                // adopting a domain that cannot start.
                if let Err(e2) = lv.delete_domain(&domain) {
                    tracing::warn!(domain = %domain, error = %e2, "cannot remove a domain that failed to start");
                }
                return Err(fail(e));
            }
            Ok((forwards, private_ip))
        })
        .await?;
        if let Some(text) = &req.ready {
            wait_ready(&lv, &plan.domain, &plan.console, text, req.ready_timeout).await?;
        }
        let ports: BTreeMap<String, String> = forwards
            .iter()
            .map(|f| (f.guest.to_string(), format!("127.0.0.1:{}", f.host)))
            .collect();
        // `addr` is the first port the runbook gave.
        let addr = req
            .ports
            .first()
            .and_then(|p| ports.get(&p.to_string()).cloned());
        Ok(LaunchedInstance {
            name: plan.domain,
            pid: None,
            ports,
            addr,
            console: Some(plan.console.to_string_lossy().into_owned()),
            private_ip,
            qmp: None,
        })
    }

    /// Pulls the plug (`virsh destroy`); the definition and disks stay.
    async fn stop(&self, cx: &StepCx, name: &str) -> TargetResult<()> {
        let domain = domain_of(cx, name)?;
        let lv = connection(&cx.place);
        blocking(move || lv.stop(&domain).map(drop).map_err(fail)).await
    }

    /// Destroys and undefines the node's domain, and removes its kernel and
    /// initrd copies.
    async fn terminate(&self, cx: &StepCx) -> TargetResult<()> {
        let domain = domain_of(cx, &cx.node)?;
        let tag = tag(cx)?;
        let stem = stem(&cx.node);
        let names = vec![
            tag.object_name(&format!("{stem}.kernel")).map_err(fail)?,
            tag.object_name(&format!("{stem}.initrd")).map_err(fail)?,
        ];
        let (lv, place) = (connection(&cx.place), cx.place.clone());
        blocking(move || {
            lv.delete_domain(&domain).map_err(fail)?;
            delete_volumes(&lv, &place, &names)
        })
        .await
    }
}

/// Waits until the console shows `text`, the domain stops, or the time is up.
async fn wait_ready(
    lv: &Connection,
    domain: &str,
    console: &Path,
    text: &str,
    timeout: Duration,
) -> TargetResult<()> {
    let start = Instant::now();
    let mut last_state_check = Instant::now();
    loop {
        if std::fs::read_to_string(console).is_ok_and(|c| c.contains(text)) {
            return Ok(());
        }
        if last_state_check.elapsed() > Duration::from_secs(2) {
            last_state_check = Instant::now();
            let (lv, d) = (lv.clone(), domain.to_owned());
            let state = blocking(move || lv.domain_state(&d).map_err(fail)).await?;
            if state != "running" {
                return Err(ActionError::transient(format!(
                    "domain {domain} is {state} and never printed `{text}`{}",
                    console_tail(console)
                )));
            }
        }
        if start.elapsed() > timeout {
            return Err(ActionError::transient(format!(
                "domain {domain} did not print `{text}` within {}s{}",
                timeout.as_secs(),
                console_tail(console)
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An ingress rule as the runbook writes it: `PROTO/PORT[-PORT] [from CIDR]`
/// or `icmp [from CIDR]`; checked so a typo is caught on every target.
fn check_ingress(rule: &str) -> TargetResult<()> {
    let bad = |why: &str| {
        ActionError::permanent(format!(
            "ingress rule `{rule}`: {why}; write tcp/80, udp/53, tcp/8000-8100 or icmp, optionally followed by `from CIDR`"
        ))
    };
    let mut words = rule.split_whitespace();
    let what = words.next().ok_or_else(|| bad("empty"))?;
    match (words.next(), words.next(), words.next()) {
        (None, _, _) => {}
        (Some("from"), Some(c), None) => {
            c.parse::<Cidr>()
                .map_err(|e| bad(&format!("bad source: {e}")))?;
        }
        _ => return Err(bad("unexpected words")),
    }
    if what == "icmp" {
        return Ok(());
    }
    let (proto, ports) = what.split_once('/').ok_or_else(|| bad("no /PORT"))?;
    if !matches!(proto, "tcp" | "udp") {
        return Err(bad("the protocol must be tcp, udp or icmp"));
    }
    let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p > 0);
    let ok = match ports.split_once('-') {
        Some((a, b)) => port(a).zip(port(b)).is_some_and(|(a, b)| a <= b),
        None => port(ports).is_some(),
    };
    if !ok {
        return Err(bad("bad port"));
    }
    Ok(())
}

/// The host addresses DHCP hands out on `range`, without the host's own.
fn dhcp_range(range: Cidr, host: Ipv4Addr) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let net = u64::from(u32::from(range.network()));
    let size = 1u64 << (32 - u32::from(range.prefix()));
    let mut first = net + 1;
    let last = net + size - 2;
    if first == u64::from(u32::from(host)) {
        first += 1;
    }
    let ip = |n: u64| u32::try_from(n).ok().map(Ipv4Addr::from);
    (first <= last)
        .then(|| Some((ip(first)?, ip(last)?)))
        .flatten()
}

fn inside(outer: Cidr, inner: Cidr) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(outer.prefix()))
        .unwrap_or(0);
    inner.prefix() >= outer.prefix()
        && u32::from(inner.network()) & mask == u32::from(outer.network())
}

#[async_trait]
impl Networks for LibvirtTarget {
    async fn create(&self, cx: &StepCx, req: NetworkCreate) -> TargetResult<CreatedNetwork> {
        let cidr: Cidr = req.cidr.parse().map_err(fail)?;
        let subnets = req
            .subnets
            .iter()
            .map(|s| {
                let c: Cidr = s.parse().map_err(fail)?;
                if !inside(cidr, c) {
                    return Err(ActionError::permanent(format!(
                        "subnet {s} is not inside the network's cidr {cidr}"
                    )));
                }
                Ok(c)
            })
            .collect::<TargetResult<Vec<_>>>()?;
        for r in &req.ingress {
            check_ingress(r)?;
        }
        if !req.ingress.is_empty() {
            tracing::info!(
                node = %cx.node,
                rules = req.ingress.len(),
                "the libvirt target does not enforce ingress rules: the isolated network lets nothing in from beyond the host"
            );
        }
        // libvirt 9 starts a domain on a network only if its dnsmasq state
        // directory exists, which only a network with DHCP makes: DHCP is
        // always on.
        let dhcp = dhcp_range(subnets.first().copied().unwrap_or(cidr), cidr.gateway());
        let spec = NetworkSpec {
            name: stem(&cx.node),
            cidr,
            dhcp,
        };
        let tag = tag(cx)?;
        let lv = connection(&cx.place);
        let n = blocking(move || lv.create_network(&tag, &spec).map_err(fail)).await?;
        Ok(CreatedNetwork {
            id: n.name,
            subnets: if subnets.is_empty() {
                vec![cidr.to_string()]
            } else {
                subnets.iter().map(Cidr::to_string).collect()
            },
            // libvirt has no security groups (see the module's notes).
            security_group: String::new(),
        })
    }

    async fn delete(&self, cx: &StepCx) -> TargetResult<()> {
        let name = tag(cx)?.object_name(&stem(&cx.node)).map_err(fail)?;
        let lv = connection(&cx.place);
        blocking(move || lv.delete_network(&name).map(drop).map_err(fail)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_uris_and_ranges() {
        assert_eq!(stem("disk[1]"), "disk.1");
        assert_eq!(stem("web"), "web");
        assert!(is_local("qemu:///system"));
        assert!(is_local("qemu+unix:///system"));
        assert!(!is_local("qemu+ssh://kvm1/system"));
        let c: Cidr = "10.77.0.0/16".parse().unwrap();
        let s: Cidr = "10.77.1.0/24".parse().unwrap();
        assert!(inside(c, s));
        assert!(!inside(s, c));
        assert!(!inside(c, "10.78.1.0/24".parse().unwrap()));
        assert_eq!(
            dhcp_range(s, c.gateway()),
            Some(("10.77.1.1".parse().unwrap(), "10.77.1.254".parse().unwrap()))
        );
        // The first subnet holds the host's address: DHCP skips it.
        let first: Cidr = "10.77.0.0/24".parse().unwrap();
        assert_eq!(
            dhcp_range(first, c.gateway()),
            Some(("10.77.0.2".parse().unwrap(), "10.77.0.254".parse().unwrap()))
        );
    }

    #[test]
    fn ingress_rules_are_checked() {
        for ok in [
            "tcp/80",
            "udp/53",
            "tcp/8000-8100",
            "icmp",
            "tcp/3306 from 10.77.1.0/24",
        ] {
            assert!(check_ingress(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "tcp",
            "sctp/1",
            "tcp/0",
            "tcp/90-80",
            "tcp/80 to x",
            "tcp/80 from 10.0.0.1/8",
        ] {
            assert!(check_ingress(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn settings_are_checked_with_the_next_step() {
        let t = LibvirtTarget;
        let m = |v: Value| v.as_object().cloned().unwrap();
        assert!(
            t.check_settings(&m(serde_json::json!({
                "uri": "qemu:///system", "pool": "ferry", "path": "/var/lib/libvirt/images/ferry", "network": "default"
            })))
            .is_empty()
        );
        let p = t.check_settings(&m(serde_json::json!({
            "uri": "system", "pool": "a b", "path": "rel", "network": 3, "region": "x"
        })));
        assert_eq!(p.len(), 5, "{p:?}");
        assert!(
            p.iter()
                .any(|p| p.contains("it takes: uri, pool, path, network"))
        );
    }
}
