//! `volume.backup` on the targets whose disks are image files on this
//! machine (local; libvirt later): a recovery point of a disk where the
//! stack runs, so that a failback or a cutover carries its changes.
//!
//! - A disk no VM has open is read whole and deduplicated against the
//!   repository (only what changed is stored, all of it is read).
//! - A running VM's disk (`qmp`) is cut through QEMU with the same cycle as
//!   `ferry protect`: incremental through its dirty bitmaps when protection
//!   left a chain that continues the source's latest point, else one full
//!   read that starts the chain. With `pause`, the VM is paused first and
//!   stays paused, so nothing it writes is missing from the point; a marker
//!   file in the run's work directory remembers the pause, and the undo
//!   resumes the VM (a rolled-back failback leaves the recovered stack
//!   serving).
//!
//! A finished step records its outputs in `WORK/NODE.backup.json`; a later
//! try returns them instead of taking another point.

use super::{BackedUpVolume, StepCx, TargetResult, VolumeBackup};
use crate::step::{ActionError, CancelOnDrop, Ctx, file_stem};
use ferry_connectors::qemu::{LiveVm, Qmp, VmDisk};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Takes the point (or returns the one an earlier try of the step took).
pub(super) async fn backup(cx: &StepCx, req: VolumeBackup) -> TargetResult<BackedUpVolume> {
    let done = super::local::path_in(&cx.run, &cx.node, "backup.json");
    if let Ok(text) = std::fs::read_to_string(&done)
        && let Ok(out) = serde_json::from_str::<BackedUpVolume>(&text)
    {
        return Ok(out);
    }
    let path = PathBuf::from(&req.path);
    if !path.is_file() {
        return Err(ActionError::permanent(format!(
            "{}: `path` must be a disk image file",
            path.display()
        )));
    }
    if req.qmp.is_none() {
        super::local::refuse_if_open(&path).await?;
    }
    let progress = Arc::new(ferry_agent::progress::Progress::default());
    let _stop = CancelOnDrop(progress.clone());
    let (ctx, node) = (cx.run.clone(), cx.node.clone());
    let out = tokio::task::spawn_blocking(move || take(&ctx, &node, &req, &path, &progress))
        .await
        .map_err(|e| ActionError::transient(format!("backup task: {e}")))??;
    crate::fsutil::write_private(
        &done,
        serde_json::to_string(&out).unwrap_or_default().as_bytes(),
    )
    .map_err(|e| ActionError::permanent(format!("{}: {e}", done.display())))?;
    Ok(out)
}

fn take(
    ctx: &Ctx,
    node: &str,
    req: &VolumeBackup,
    path: &Path,
    progress: &ferry_agent::progress::Progress,
) -> TargetResult<BackedUpVolume> {
    let repo = ctx.open_repo_at(req.repo.as_deref())?;
    let disk = match &req.disk {
        Some(d) => d.clone(),
        None => default_disk_name(&repo, &req.source, path)?,
    };
    let (summary, mode, paused) = match &req.qmp {
        None => {
            let summary = ferry_agent::backup::backup(
                &repo,
                &ferry_agent::backup::BackupOptions {
                    source: req.source.clone(),
                    disks: vec![ferry_agent::backup::DiskSpec {
                        name: disk.clone(),
                        path: path.to_path_buf(),
                    }],
                    consistency: None,
                    time: None,
                    group: None,
                },
                progress,
            )
            .map_err(ActionError::from)?;
            let mode = "full read of the image, deduplicated against the repository".to_owned();
            (summary, mode, false)
        }
        Some(sock) => {
            let sock = PathBuf::from(sock);
            let mut q = Qmp::connect(&sock).map_err(ActionError::from)?;
            let block_node = node_of(&mut q, path)?;
            let mut paused = false;
            if req.pause && running(&mut q)? {
                // The marker first: an undo after a crash right after `stop`
                // still knows to resume the VM.
                let marker = super::local::path_in(ctx, node, "paused");
                crate::fsutil::write_private(&marker, sock.to_string_lossy().as_bytes())
                    .map_err(|e| ActionError::permanent(format!("{}: {e}", marker.display())))?;
                q.execute("stop", json!({})).map_err(ActionError::from)?;
                paused = true;
            } else if std::fs::metadata(super::local::path_in(ctx, node, "paused")).is_ok() {
                // An earlier try paused it.
                paused = true;
            }
            drop(q);
            let vm = LiveVm {
                qmp: sock,
                disks: vec![VmDisk {
                    node: block_node,
                    name: disk.clone(),
                }],
                work_dir: ctx.work_dir.join(format!("protect-{}", file_stem(node))),
            };
            let report = ferry_connectors::qemu::cycle(&repo, &req.source, &vm, None)
                .map_err(ActionError::from)?;
            (report.summary, report.mode, paused)
        }
    };
    let point = repo.resolve(&summary.point).map_err(ActionError::from)?;
    Ok(BackedUpVolume {
        point: summary.point.clone(),
        source: summary.source.clone(),
        disk,
        point_time: point.meta.time.to_rfc3339(),
        parent: summary.parent.clone(),
        mode,
        bytes_read: summary.bytes_read,
        new_bytes: summary.new_bytes,
        paused,
    })
}

/// The name the source's latest point gives its only disk (so that
/// `SOURCE@latest` keeps restoring with no `disk`), else the file's name.
fn default_disk_name(
    repo: &ferry_agent::Repository,
    source: &str,
    path: &Path,
) -> TargetResult<String> {
    let latest = repo
        .points()
        .map_err(ActionError::from)?
        .0
        .into_iter()
        .rfind(|p| p.meta.source == source);
    if let Some(p) = latest
        && let [only] = p.meta.disks.as_slice()
    {
        return Ok(only.name.clone());
    }
    Ok(ferry_agent::backup::DiskSpec::from_path(path).name)
}

fn running(q: &mut Qmp) -> TargetResult<bool> {
    Ok(q.execute("query-status", json!({}))
        .map_err(ActionError::from)?["running"]
        == json!(true))
}

/// The block node of the VM whose image is `path`: the format node on top
/// of it (not one of Ferry's fleecing nodes).
fn node_of(q: &mut Qmp, path: &Path) -> TargetResult<String> {
    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let nodes = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .map_err(ActionError::from)?;
    let same = |v: &Value| {
        v.as_str()
            .map(|f| std::fs::canonicalize(f).unwrap_or_else(|_| PathBuf::from(f)) == want)
            .unwrap_or(false)
    };
    let found = nodes.as_array().into_iter().flatten().find(|n| {
        n["drv"] != json!("file")
            && !n["node-name"]
                .as_str()
                .is_some_and(|name| name.starts_with(ferry_connectors::qemu::BITMAP_PREFIX))
            && (same(&n["file"]) || same(&n["image"]["filename"]))
    });
    found
        .and_then(|n| n["node-name"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            ActionError::permanent(format!(
                "the VM at this QMP socket has no disk {}; give the image the VM was launched with",
                path.display()
            ))
        })
}

/// Resumes the VM the step paused, if it did; a VM that is gone is fine.
pub(super) async fn release(cx: &StepCx) -> TargetResult<()> {
    let marker = super::local::path_in(&cx.run, &cx.node, "paused");
    let Ok(sock) = std::fs::read_to_string(&marker) else {
        return Ok(());
    };
    let sock = PathBuf::from(sock);
    tokio::task::spawn_blocking(move || -> TargetResult<()> {
        // A VM whose socket no longer answers has stopped: nothing to resume.
        if let Ok(mut q) = Qmp::connect(&sock) {
            q.execute("cont", json!({})).map_err(ActionError::from)?;
        }
        match std::fs::remove_file(&marker) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ActionError::transient(format!("{}: {e}", marker.display()))),
        }
    })
    .await
    .map_err(|e| ActionError::transient(format!("resume task: {e}")))?
}
